//! HostVolumeAttachments: each export's allow-list is exactly the hosts attached to it (their
//! certificates' names), nobody otherwise; each attachment's status says whether its host may
//! open the export and what it needs to (the publish context); a deleted attachment lets go,
//! behind the finalizer, once its host is off the list.

use std::collections::{BTreeMap, BTreeSet};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use slipway_api::volumes::{CTX_NBD, CTX_NBD_CLIENT, DRIVER, host_nbd_client};
use slipway_blockstore::control::ControlRequest;
use tracing::{debug, info, warn};

use super::{FINALIZER, Served, VolumeReconciler, World, hva_resource, str_at};
use crate::controllers::volume_plan::{allow_list, may_attach};

impl VolumeReconciler {
    /// Attachments: each export allows exactly its attached hosts; each attachment's status
    /// says so; a deleted attachment lets go once its host is off the list.
    pub(super) async fn attach_all(
        &self,
        served: &[Served<'_>],
        world: &World,
    ) -> anyhow::Result<()> {
        let by_claim: BTreeMap<(&str, &str), &Served> = served
            .iter()
            .map(|s| ((s.ns.as_str(), s.name.as_str()), s))
            .collect();
        // Per volume, the hosts allowed, and the verdict on each attachment.
        let mut allowed: BTreeMap<&str, BTreeSet<String>> = served
            .iter()
            .map(|s| (s.volume.as_str(), BTreeSet::new()))
            .collect();
        let mut verdicts = Vec::new();
        for a in &world.attachments {
            let ns = a.metadata.namespace.clone().unwrap_or_default();
            let claim = str_at(&a.data, "/spec/claim");
            let host = str_at(&a.data, "/spec/host");
            let deleting = a.metadata.deletion_timestamp.is_some();
            let verdict = match by_claim.get(&(ns.as_str(), claim)) {
                None => Err(format!(
                    "spec.claim: PersistentVolumeClaim {claim:?} has no volume of {DRIVER} (yet)"
                )),
                Some(s) => may_attach(&ns, host, world.hosts.get(host), &s.zone).map(|()| *s),
            };
            if let (Ok(s), false) = (&verdict, deleting) {
                allowed
                    .entry(s.volume.as_str())
                    .or_default()
                    .insert(host.to_owned());
            }
            verdicts.push((a, verdict));
        }
        for s in served {
            let Some(vols) = world.volumes.get(&s.zone) else {
                continue;
            };
            let want = allow_list(
                allowed
                    .get(s.volume.as_str())
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            );
            let have = vols.get(&s.volume).map(|v| v.clients.clone());
            if have.is_some() && have.as_ref() != Some(&want) {
                self.store_call(
                    &s.zone,
                    ControlRequest::Authorize {
                        name: s.volume.clone(),
                        clients: want.clone(),
                    },
                )
                .await?;
                info!(volume = %s.volume, clients = ?want, "export allow-list set");
            }
        }
        for (a, verdict) in verdicts {
            if let Err(e) = self.attachment_status(a, verdict, world).await {
                warn!(attachment = ?a.metadata.name, error = %format!("{e:#}"), "attachment status");
            }
        }
        Ok(())
    }

    async fn attachment_status(
        &self,
        a: &DynamicObject,
        verdict: Result<&Served<'_>, String>,
        world: &World,
    ) -> anyhow::Result<()> {
        let ns = a.metadata.namespace.clone().unwrap_or_default();
        let name = a.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &ns, &hva_resource());
        let host = str_at(&a.data, "/spec/host");
        let finalizers = a.metadata.finalizers.clone().unwrap_or_default();
        let ours = finalizers.iter().any(|f| f == FINALIZER);
        if a.metadata.deletion_timestamp.is_some() {
            // The allow-list written above no longer names the host (or it never did).
            if ours {
                let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
                )
                .await?;
                info!(attachment = %format!("{ns}/{name}"), host, "detached");
            }
            return Ok(());
        }
        if !ours {
            let mut f = finalizers.clone();
            f.push(FINALIZER.to_owned());
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": f}})),
            )
            .await?;
        }
        let status = match verdict {
            Ok(s) => {
                // Attached only once the store's allow-list names the host.
                let listed = world
                    .volumes
                    .get(&s.zone)
                    .and_then(|v| v.get(&s.volume))
                    .is_some_and(|v| v.clients.contains(&host_nbd_client(host)));
                let nbd = self
                    .stores
                    .get(&s.zone)
                    .map(|b| b.nbd.clone())
                    .unwrap_or_default();
                if listed && ours {
                    json!({"attached": true, "attachmentMetadata": {
                        CTX_NBD: nbd, CTX_NBD_CLIENT: host_nbd_client(host)}, "error": null})
                } else {
                    debug!(attachment = %format!("{ns}/{name}"), "allow-list not yet written");
                    return Ok(());
                }
            }
            Err(e) => json!({"attached": false, "attachmentMetadata": null, "error": e}),
        };
        let mut want = status.clone();
        want["observedGeneration"] = json!(a.metadata.generation);
        let have = a.data.get("status").cloned().unwrap_or(Value::Null);
        let same = [
            "attached",
            "attachmentMetadata",
            "error",
            "observedGeneration",
        ]
        .iter()
        .all(|k| {
            let w = want.get(*k).filter(|v| !v.is_null());
            let h = have.get(*k).filter(|v| !v.is_null());
            w == h || (*k == "attached" && w == Some(&json!(false)) && h.is_none())
        });
        if !same {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": want})),
            )
            .await?;
            info!(attachment = %format!("{ns}/{name}"), host, status = %want, "attachment status");
        }
        Ok(())
    }
}
