//! The attach-detach controller (kube-controller-manager's): a Pod bound to a node that mounts
//! a claim whose PersistentVolume is a CSI volume needs that volume attached to the node, so a
//! `storage.k8s.io/v1` VolumeAttachment (attacher = the driver, upstream's name
//! `csi-<sha256(volumeHandle + driver + node)>`) is made for it; the driver's attacher does the
//! attaching and the node's kubelet waits for `status.attached`. An attachment no Pod on its
//! node needs any more is deleted (the attacher detaches before its finalizer goes). A
//! ReadWriteOnce volume attached to one node is not attached to another while the first still
//! holds it: the Pod waits, with a `FailedAttachVolume` Event ("Multi-Attach error"), as upstream.
//! Level-triggered: every Pod or VolumeAttachment event and every [`PERIOD`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{
    VolumeAttachment, VolumeAttachmentSource, VolumeAttachmentSpec,
};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::{info, warn};

use crate::wake::Wakeups;
use crate::{Error, api_err};

/// How often the controller looks when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(2);

/// One volume on one node: (driver, PersistentVolume, node).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub driver: String,
    pub volume_handle: String,
    pub pv: String,
    pub node: String,
    /// Only one node at a time (the PV's access modes are ReadWriteOnce or ReadWriteOncePod).
    pub single_node: bool,
    /// A Pod that needs it (`namespace/name`), for Events.
    pub pod: String,
}

impl Attachment {
    /// Upstream's VolumeAttachment name: `csi-` and the SHA-256 of handle, driver and node.
    pub fn name(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let digest = Sha256::digest(format!(
            "{}{}{}",
            self.volume_handle, self.driver, self.node
        ));
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("csi-{hex}")
    }
}

/// The attachments the Pods need: every Pod bound to a node (its object still there, whatever
/// its phase: its node may still have the volume mounted) with a claim bound to a CSI PV.
pub fn wanted(
    pods: &[Pod],
    claims: &[PersistentVolumeClaim],
    pvs: &[PersistentVolume],
) -> Vec<Attachment> {
    let claim_pv: BTreeMap<(String, String), String> = claims
        .iter()
        .filter_map(|c| {
            let ns = c.metadata.namespace.clone()?;
            let name = c.metadata.name.clone()?;
            let pv = c.spec.as_ref()?.volume_name.clone()?;
            Some(((ns, name), pv))
        })
        .collect();
    let pv_by_name: BTreeMap<&str, &PersistentVolume> = pvs
        .iter()
        .filter_map(|pv| Some((pv.metadata.name.as_deref()?, pv)))
        .collect();
    let mut out = BTreeSet::new();
    for pod in pods {
        let Some(spec) = &pod.spec else { continue };
        let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
            continue;
        };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        for v in spec.volumes.iter().flatten() {
            let Some(claim) = &v.persistent_volume_claim else {
                continue;
            };
            let Some(pv_name) = claim_pv.get(&(ns.clone(), claim.claim_name.clone())) else {
                continue;
            };
            let Some(pv) = pv_by_name.get(pv_name.as_str()) else {
                continue;
            };
            let Some(pv_spec) = &pv.spec else { continue };
            let Some(csi) = &pv_spec.csi else { continue };
            let modes = pv_spec.access_modes.clone().unwrap_or_default();
            let single_node = modes.is_empty()
                || modes
                    .iter()
                    .all(|m| m == "ReadWriteOnce" || m == "ReadWriteOncePod");
            out.insert(Attachment {
                driver: csi.driver.clone(),
                volume_handle: csi.volume_handle.clone(),
                pv: pv_name.clone(),
                node: node.clone(),
                single_node,
                pod: format!("{ns}/{}", pod.metadata.name.as_deref().unwrap_or_default()),
            });
        }
    }
    // One entry per (volume, node), whichever pod named it first.
    let mut seen = BTreeSet::new();
    out.into_iter()
        .filter(|a| seen.insert((a.pv.clone(), a.node.clone())))
        .collect()
}

/// What to change: (attachments to make, VolumeAttachments to delete by name, attachments
/// held back by another node's hold on a single-node volume).
pub fn plan(
    wanted: &[Attachment],
    existing: &[VolumeAttachment],
) -> (Vec<Attachment>, Vec<String>, Vec<(Attachment, String)>) {
    let key = |va: &VolumeAttachment| {
        (
            va.spec
                .source
                .persistent_volume_name
                .clone()
                .unwrap_or_default(),
            va.spec.node_name.clone(),
        )
    };
    let wanted_keys: BTreeSet<(String, String)> = wanted
        .iter()
        .map(|a| (a.pv.clone(), a.node.clone()))
        .collect();
    let existing_keys: BTreeSet<(String, String)> = existing.iter().map(key).collect();
    let delete: Vec<String> = existing
        .iter()
        .filter(|va| va.metadata.deletion_timestamp.is_none() && !wanted_keys.contains(&key(va)))
        .filter_map(|va| va.metadata.name.clone())
        .collect();
    let mut create = Vec::new();
    let mut held = Vec::new();
    for a in wanted {
        if existing_keys.contains(&(a.pv.clone(), a.node.clone())) {
            continue;
        }
        // Any attachment to another node (being deleted or not) still holds the volume.
        let other = existing
            .iter()
            .map(key)
            .find(|(pv, node)| *pv == a.pv && *node != a.node);
        match other {
            Some((_, node)) if a.single_node => held.push((a.clone(), node)),
            _ => create.push(a.clone()),
        }
    }
    (create, delete, held)
}

/// Runs until the task is dropped.
pub async fn run(client: kube::Client) {
    let pods: Api<Pod> = Api::all(client.clone());
    let attachments: Api<VolumeAttachment> = Api::all(client.clone());
    let events = futures_util::stream::select(
        watcher(pods, watcher::Config::default())
            .default_backoff()
            .map(|_| ()),
        watcher(attachments, watcher::Config::default())
            .default_backoff()
            .map(|_| ()),
    );
    let mut wake = Wakeups::new(events, PERIOD);
    // Holds already told as an Event: one Event per hold, not one per pass.
    let mut told = BTreeSet::new();
    loop {
        wake.next().await;
        if let Err(e) = pass(&client, &mut told).await {
            warn!(error = ?e, "attach-detach pass failed; retrying");
        }
    }
}

async fn pass(client: &kube::Client, told: &mut BTreeSet<(String, String)>) -> Result<(), Error> {
    let lp = ListParams::default();
    let pods = Api::<Pod>::all(client.clone())
        .list(&lp)
        .await
        .map_err(api_err("list", "pods"))?
        .items;
    let claims = Api::<PersistentVolumeClaim>::all(client.clone())
        .list(&lp)
        .await
        .map_err(api_err("list", "persistentvolumeclaims"))?
        .items;
    let pvs = Api::<PersistentVolume>::all(client.clone())
        .list(&lp)
        .await
        .map_err(api_err("list", "persistentvolumes"))?
        .items;
    let api: Api<VolumeAttachment> = Api::all(client.clone());
    let existing = api
        .list(&lp)
        .await
        .map_err(api_err("list", "volumeattachments"))?
        .items;
    let wanted = wanted(&pods, &claims, &pvs);
    let (create, delete, held) = plan(&wanted, &existing);
    for a in create {
        let va = VolumeAttachment {
            metadata: kube::api::ObjectMeta {
                name: Some(a.name()),
                ..Default::default()
            },
            spec: VolumeAttachmentSpec {
                attacher: a.driver.clone(),
                node_name: a.node.clone(),
                source: VolumeAttachmentSource {
                    persistent_volume_name: Some(a.pv.clone()),
                    ..Default::default()
                },
            },
            status: None,
        };
        match api.create(&PostParams::default(), &va).await {
            Ok(_) => info!(pv = %a.pv, node = %a.node, "volume attachment made"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(api_err("create", format!("volumeattachment for {}", a.pv))(
                    e,
                ));
            }
        }
    }
    for name in delete {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => info!(%name, "volume attachment no pod needs deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(api_err("delete", format!("volumeattachment {name}"))(e)),
        }
    }
    let holds: BTreeSet<(String, String)> = held
        .iter()
        .map(|(a, _)| (a.pod.clone(), a.pv.clone()))
        .collect();
    for (a, node) in held {
        if told.contains(&(a.pod.clone(), a.pv.clone())) {
            continue;
        }
        let Some((ns, name)) = a.pod.split_once('/') else {
            continue;
        };
        let pod = pods.iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)
        });
        if let Some(pod) = pod {
            crate::events::publish(
                client,
                pod,
                crate::events::Type::Warning,
                "FailedAttachVolume",
                format!(
                    "Multi-Attach error for volume \"{}\": the volume is already attached to \
                     node {node:?} and can be attached to one node at a time",
                    a.pv
                ),
            )
            .await;
        }
    }
    *told = holds;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: &str, claim: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"nodeName": node, "containers": [],
                     "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]},
        }))
        .expect("pod")
    }

    fn claim(name: &str, pv: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"volumeName": pv},
        }))
        .expect("claim")
    }

    fn pv(name: &str, modes: &[&str]) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"accessModes": modes,
                     "csi": {"driver": "csi.slipway.dev", "volumeHandle": format!("h-{name}")}},
        }))
        .expect("pv")
    }

    fn va(a: &Attachment) -> VolumeAttachment {
        serde_json::from_value(json!({
            "metadata": {"name": a.name()},
            "spec": {"attacher": a.driver, "nodeName": a.node,
                     "source": {"persistentVolumeName": a.pv}},
        }))
        .expect("va")
    }

    #[test]
    fn pods_on_nodes_need_their_claims_attachments_once_per_node() {
        let pods = [
            pod("a", "n1", "c1"),
            pod("b", "n1", "c1"),
            pod("c", "n2", "c2"),
            pod("unbound-claim", "n1", "c3"),
            pod("no-claim", "n1", "missing"),
        ];
        let mut unscheduled = pod("d", "", "c1");
        unscheduled.spec.as_mut().expect("spec").node_name = None;
        let mut all = pods.to_vec();
        all.push(unscheduled);
        let claims = [
            claim("c1", "pv1"),
            claim("c2", "pv2"),
            claim("c3", "pv-gone"),
        ];
        let pvs = [pv("pv1", &["ReadWriteOnce"]), pv("pv2", &["ReadWriteMany"])];
        let w = wanted(&all, &claims, &pvs);
        let keys: Vec<(&str, &str, bool)> = w
            .iter()
            .map(|a| (a.pv.as_str(), a.node.as_str(), a.single_node))
            .collect();
        assert_eq!(keys, [("pv1", "n1", true), ("pv2", "n2", false)]);
        assert_eq!(w[0].volume_handle, "h-pv1");
        assert!(w[0].name().starts_with("csi-") && w[0].name().len() == 4 + 64);
    }

    #[test]
    fn plans_make_the_missing_delete_the_unneeded_and_hold_single_node_volumes() {
        let pvs = [pv("pv1", &["ReadWriteOnce"]), pv("pv2", &["ReadWriteMany"])];
        let claims = [claim("c1", "pv1"), claim("c2", "pv2")];
        // pv1 is attached to n1 but the pod moved to n2; pv2 likewise; an old attachment of
        // pv9 is needed by nobody.
        let on_n1 = wanted(&[pod("a", "n1", "c1"), pod("b", "n1", "c2")], &claims, &pvs);
        let mut stale = on_n1[0].clone();
        stale.pv = "pv9".into();
        let existing: Vec<VolumeAttachment> = on_n1.iter().chain([&stale]).map(va).collect();
        let on_n2 = wanted(&[pod("a", "n2", "c1"), pod("b", "n2", "c2")], &claims, &pvs);
        let (create, delete, held) = plan(&on_n2, &existing);
        // The many-node volume attaches at once; the single-node one waits for n1 to let go.
        assert_eq!(
            create.iter().map(|a| a.pv.as_str()).collect::<Vec<_>>(),
            ["pv2"]
        );
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].0.pv.as_str(), held[0].1.as_str()), ("pv1", "n1"));
        let mut deleted = delete.clone();
        deleted.sort();
        let mut expected: Vec<String> = existing
            .iter()
            .filter_map(|v| v.metadata.name.clone())
            .collect();
        expected.sort();
        assert_eq!(
            deleted, expected,
            "every n1 attachment and the stale one go"
        );
        // Once n1's is gone, n2's is made; nothing more to do after that.
        let (create, _, held) = plan(&on_n2, &[]);
        assert_eq!(create.len(), 2);
        assert!(held.is_empty());
        let made: Vec<VolumeAttachment> = on_n2.iter().map(va).collect();
        let (create, delete, held) = plan(&on_n2, &made);
        assert!(create.is_empty() && delete.is_empty() && held.is_empty());
    }
}
