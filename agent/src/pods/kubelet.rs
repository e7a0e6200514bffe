//! The pod runner fed by a Kubernetes API, as kubelet is: the Pods bound to this host's Node
//! (list+watch through kube-rs, only upstream kinds and fields) are handed to the
//! [`PodRunner`] at every change and every period (level-triggered: it compares what runs with
//! what is wanted), and the statuses it reports are written back to each Pod's `status`
//! subresource when they change. A Pod deleted from the API is torn down at the next sync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use tracing::{debug, info, warn};

use super::claims::ClaimVolume;
use super::runner::PodRunner;
use super::volumes::{Kind, Objects, Reference, references};

/// How `slipway agent` runs a cluster's Pods.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeletArgs {
    /// Kubeconfig of the cluster (`in-cluster`: the Pod's service account) whose Nodes,
    /// Services, EndpointSlices, Pods and NetworkPolicies feed the datapath and, with
    /// --containerd-dir, whose Pods bound to this node the agent runs.
    #[arg(long = "cluster-kubeconfig")]
    pub cluster_kubeconfig: Option<PathBuf>,
    /// This node's name in that cluster (default: --host-name).
    #[arg(long = "node-name")]
    pub node_name: Option<String>,
    /// Where to serve the kubelet's HTTPS endpoint (container logs for `kubectl logs`), e.g.
    /// 0.0.0.0:10250; off when not set. Needs --cluster-kubeconfig: only clients with a
    /// certificate of that cluster's CA and the API server's kubelet-client name are served.
    #[arg(long = "kubelet-listen", value_name = "ADDR")]
    pub kubelet_listen: Option<std::net::SocketAddr>,
}

impl KubeletArgs {
    /// The kubeconfig and node name to run Pods for, if asked; every bad flag named.
    pub fn wanted(
        &self,
        containerd: bool,
        host_name: Option<&str>,
    ) -> anyhow::Result<Option<(PathBuf, String)>> {
        let Some(kubeconfig) = &self.cluster_kubeconfig else {
            anyhow::ensure!(
                self.node_name.is_none(),
                "--node-name: needs --cluster-kubeconfig"
            );
            anyhow::ensure!(
                self.kubelet_listen.is_none(),
                "--kubelet-listen: needs --cluster-kubeconfig (its CA authenticates clients)"
            );
            return Ok(None);
        };
        let mut problems = Vec::new();
        if !containerd {
            problems.push("--cluster-kubeconfig: needs --containerd-dir (the pod runtime)");
        }
        let node = self
            .node_name
            .as_deref()
            .or(host_name)
            .filter(|n| !n.is_empty());
        if node.is_none() {
            problems.push("--node-name: required with --cluster-kubeconfig (or --host-name)");
        }
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
        Ok(Some((
            kubeconfig.clone(),
            node.unwrap_or_default().to_owned(),
        )))
    }
}

/// How often the runner syncs when the API is quiet (restarts, probes and back-off are
/// matters of time).
pub const PERIOD: Duration = Duration::from_secs(1);

/// Runs the Pods bound to `node` until `stop` resolves; returns the runner (which still holds
/// whatever runs).
pub async fn run_until(
    client: kube::Client,
    node: String,
    mut runner: PodRunner,
    stop: impl Future<Output = ()>,
) -> PodRunner {
    let pods: Api<Pod> = Api::all(client);
    let (reader, writer) = reflector::store();
    // The API serves no field selectors yet: every Pod is watched and this host's are taken.
    let mut events = reflector(writer, watcher(pods.clone(), watcher::Config::default()))
        .default_backoff()
        .boxed();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut objects = ObjectCache::new(pods.clone().into_client(), node.clone());
    info!(%node, "running the Pods bound to this node");
    tokio::pin!(stop);
    // Nothing runs until the first full list is in: an empty store is not "no Pods".
    let mut listed = false;
    loop {
        tokio::select! {
            () = &mut stop => return runner,
            _ = tick.tick() => {}
            e = events.next() => match e {
                Some(Ok(watcher::Event::InitDone)) => listed = true,
                Some(Err(e)) => debug!(error = %e, "watching Pods"),
                _ => {}
            }
        }
        if !listed {
            continue;
        }
        let desired: Vec<Pod> = reader
            .state()
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
            .map(|p| (**p).clone())
            .collect();
        objects.refresh(&desired).await;
        let report = runner.sync(&desired, &objects.objects).await;
        for e in &report.errors {
            warn!(error = %super::error_chain(e), "pod teardown failed; retried next sync");
        }
        for (key, status) in report.statuses {
            let Ok(status) = status else { continue };
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let Ok(value) = serde_json::to_value(&status) else {
                continue;
            };
            if written.get(&key) == Some(&value) {
                continue;
            }
            let api: Api<Pod> = Api::namespaced(pods.clone().into_client(), ns);
            match api
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"status": value})),
                )
                .await
            {
                Ok(_) => {
                    written.insert(key, value);
                }
                Err(e) => debug!(pod = %key, error = %e, "writing the Pod's status; next sync"),
            }
        }
        written.retain(|k, _| {
            desired.iter().any(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default()
                ) == *k
            })
        });
    }
}

/// Claim `name`'s volume on `node`, as kubelet's CSI plugin finds it: the claim's bound
/// PersistentVolume (its `spec.csi`) and the VolumeAttachment that attached it to the node
/// (its `attachmentMetadata` is the publish context); `Ok(Err(reason))` while the pod waits.
async fn claim_volume(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    node: &str,
) -> Result<Result<ClaimVolume, String>, kube::Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let Some(claim) = claims.get_opt(name).await? else {
        return Ok(Err(format!("persistentvolumeclaim {name:?} not found")));
    };
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let Some(pv_name) = claim
        .spec
        .and_then(|s| s.volume_name)
        .filter(|v| bound && !v.is_empty())
    else {
        return Ok(Err(format!("persistentvolumeclaim {name:?} is not bound")));
    };
    let Some(pv) = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&pv_name)
        .await?
    else {
        return Ok(Err(format!("persistentvolume {pv_name:?} not found")));
    };
    let spec = pv.spec.unwrap_or_default();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a PV's capacity is a positive byte count well inside u64"
    )]
    let capacity = spec
        .capacity
        .as_ref()
        .and_then(|c| c.get("storage"))
        .and_then(|q| slipway_api::meta::parse_quantity(&q.0))
        .map_or(0, |b| b as u64);
    let Some(csi) = spec.csi else {
        return Ok(Err(format!(
            "persistentvolume {pv_name:?} is not a CSI volume"
        )));
    };
    let attachments = Api::<VolumeAttachment>::all(client.clone())
        .list(&Default::default())
        .await?;
    let attached = attachments.items.into_iter().find(|a| {
        a.spec.node_name == node
            && a.spec.source.persistent_volume_name.as_deref() == Some(pv_name.as_str())
    });
    let Some(status) = attached.and_then(|a| a.status).filter(|s| s.attached) else {
        return Ok(Err(format!(
            "volume {pv_name:?} is not attached to node {node:?} yet"
        )));
    };
    Ok(Ok(ClaimVolume {
        driver: csi.driver,
        volume_id: csi.volume_handle,
        fs_type: csi.fs_type.unwrap_or_default(),
        mount_flags: spec.mount_options.unwrap_or_default(),
        volume_context: csi
            .volume_attributes
            .unwrap_or_default()
            .into_iter()
            .collect(),
        publish_context: status
            .attachment_metadata
            .unwrap_or_default()
            .into_iter()
            .collect(),
        read_only: csi.read_only.unwrap_or(false),
        block: spec.volume_mode.as_deref() == Some("Block"),
        capacity,
    }))
}

/// How long a fetched ConfigMap or Secret is used before it is read again (kubelet's
/// TTL-based change detection; its default is a minute).
pub const OBJECT_TTL: Duration = Duration::from_secs(5);

/// The ConfigMaps and Secrets the node's pods mount, read from the API when first needed and
/// again after [`OBJECT_TTL`]: the node reads only the objects its pods name, as kubelet does.
struct ObjectCache {
    client: kube::Client,
    node: String,
    read_at: HashMap<Reference, Instant>,
    objects: Objects,
}

impl ObjectCache {
    fn new(client: kube::Client, node: String) -> Self {
        Self {
            client,
            node,
            read_at: HashMap::new(),
            objects: Objects::default(),
        }
    }

    async fn refresh(&mut self, pods: &[Pod]) {
        let wanted: HashSet<Reference> = references(pods).into_iter().collect();
        for r in &wanted {
            if self
                .read_at
                .get(r)
                .is_some_and(|at| at.elapsed() < OBJECT_TTL)
            {
                continue;
            }
            let (kind, ns, name) = r;
            let read = match kind {
                Kind::ConfigMap => Api::<ConfigMap>::namespaced(self.client.clone(), ns)
                    .get_opt(name)
                    .await
                    .map(|cm| self.objects.insert_config_map(ns, name, cm.as_ref())),
                Kind::Secret => Api::<Secret>::namespaced(self.client.clone(), ns)
                    .get_opt(name)
                    .await
                    .map(|s| self.objects.insert_secret(ns, name, s.as_ref())),
                Kind::Claim => match claim_volume(&self.client, ns, name, &self.node).await {
                    // A claim not bound or attached yet is looked at again at the next sync.
                    Ok(Err(reason)) => {
                        self.objects.insert_claim(ns, name, Err(reason));
                        continue;
                    }
                    Ok(volume) => {
                        self.objects.insert_claim(ns, name, volume);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            match read {
                Ok(()) => {
                    self.read_at.insert(r.clone(), Instant::now());
                }
                // What was read before stays in use; never read: the pod waits.
                Err(e) => debug!(object = ?r, error = %e, "reading a pod's volume source"),
            }
        }
        self.read_at.retain(|r, _| wanted.contains(r));
        self.objects.retain(&wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelet_flags_need_a_runtime_and_a_node_name() {
        let args = |k: Option<&str>, n: Option<&str>| KubeletArgs {
            cluster_kubeconfig: k.map(PathBuf::from),
            node_name: n.map(str::to_owned),
            kubelet_listen: None,
        };
        assert_eq!(args(None, None).wanted(false, None).expect("none"), None);
        let err = args(None, Some("n1"))
            .wanted(true, None)
            .expect_err("node name alone");
        assert!(err.to_string().contains("--node-name"), "{err}");
        let mut listen = args(None, None);
        listen.kubelet_listen = Some(([0, 0, 0, 0], 10250).into());
        let err = listen.wanted(true, None).expect_err("listen alone");
        assert!(err.to_string().contains("--kubelet-listen"), "{err}");
        let err = args(Some("/k"), None)
            .wanted(false, None)
            .expect_err("no runtime");
        let text = err.to_string();
        assert!(
            text.contains("--containerd-dir") && text.contains("--node-name"),
            "{text}"
        );
        assert_eq!(
            args(Some("/k"), None)
                .wanted(true, Some("h1"))
                .expect("host name"),
            Some((PathBuf::from("/k"), "h1".to_owned()))
        );
    }
}
