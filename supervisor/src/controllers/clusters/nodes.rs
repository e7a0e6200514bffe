//! The workload cluster's Nodes, one per host of the cluster: registered with their addresses,
//! capacity and zone label, and removed (with the Pods bound to them) when their host is gone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use slipway_api::slipway::CONTROL_PLANE_POOL;
use slipway_api::volumes::ZONE_TOPOLOGY_KEY;
use tracing::info;

use super::HOST_UID;
use crate::api::meta::{now_secs, rfc3339};

/// Removes the Node of a host that is gone, and the Pods bound to it first: they went with the
/// machine (upstream's PodGC collects them once the Node is gone, but a host replaced under the
/// same name brings its Node back too soon for that, and its kubelet would take them up).
async fn remove_node(workload: &kube::Client, name: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(workload.clone());
    let bound = pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name));
    for pod in bound {
        let (Some(ns), Some(pod_name)) = (
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        match Api::<Pod>::namespaced(workload.clone(), ns)
            .delete(pod_name, &dp)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    match Api::<Node>::all(workload.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Each host of the cluster a Node of the workload cluster; Nodes of hosts gone are removed.
pub(super) async fn sync_nodes(
    workload: &kube::Client,
    owned: &[&DynamicObject],
    classes: &BTreeMap<String, Value>,
) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(workload.clone());
    let names: BTreeSet<&str> = owned
        .iter()
        .filter_map(|h| h.metadata.name.as_deref())
        .collect();
    for n in nodes.list(&ListParams::default()).await?.items {
        if let Some(node) = n.metadata.name.as_deref()
            && !names.contains(node)
        {
            remove_node(workload, node).await?;
        }
    }
    for host in owned {
        let Some(name) = host.metadata.name.as_deref() else {
            continue;
        };
        if host.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let spec = &host.data["spec"];
        let class_name = spec["hostClass"].as_str().unwrap_or_default();
        let class = classes.get(class_name).cloned().unwrap_or(Value::Null);
        let mut labels = json!({
            "kubernetes.io/hostname": name,
            "topology.kubernetes.io/zone": spec["zone"],
            "node.kubernetes.io/instance-type": class_name,
            // The CSI node plugin's topology (every cluster host runs it), as kubelet labels a
            // Node from its plugins' NodeGetInfo: the PVs of zonal volumes select it.
            ZONE_TOPOLOGY_KEY: spec["zone"],
        });
        if spec["pool"] == CONTROL_PLANE_POOL {
            labels["node-role.kubernetes.io/control-plane"] = json!("");
        }
        // Control plane hosts take no workloads, as kubeadm taints them.
        let mut node_spec = if host.data["spec"]["pool"] == CONTROL_PLANE_POOL {
            json!({"taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]})
        } else {
            json!({})
        };
        if let Some(block) = spec["podCIDR"].as_str() {
            node_spec["podCIDR"] = json!(block);
            node_spec["podCIDRs"] = json!([block]);
        }
        let uid = host.metadata.uid.clone().unwrap_or_default();
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels, "annotations": {HOST_UID: uid}},
            "spec": node_spec,
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // A host replaced under the same name is a new machine: its Node (pod CIDR,
                // identity) is made anew, and the Pods bound to the old one are collected.
                let current = nodes.get(name).await?;
                let of = current
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(HOST_UID));
                if of.is_some_and(|of| *of != uid) {
                    remove_node(workload, name).await?;
                    info!(
                        node = name,
                        "the host was replaced: its Pods deleted, its Node made anew"
                    );
                    continue;
                }
                // Labels this reconciler owns that the Node lacks (a Node made by an older
                // version) are added; labels others set are kept.
                let have = current.metadata.labels.clone().unwrap_or_default();
                let missing = labels.as_object().is_some_and(|want| {
                    want.iter().any(|(k, v)| {
                        v.as_str()
                            .is_some_and(|v| have.get(k).map(String::as_str) != Some(v))
                    })
                });
                if missing {
                    nodes
                        .patch(
                            name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"metadata": {"labels": labels}})),
                        )
                        .await?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        let ready = host.data["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned())
            .unwrap_or_else(|| json!({"status": "Unknown", "reason": "NoLease", "message": "the host has not registered"}));
        let capacity = json!({
            "cpu": class["cpus"].as_u64().unwrap_or(0).to_string(),
            "memory": class["memory"],
            "pods": "110",
        });
        let mut status = json!({
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{
                "type": "Ready",
                "status": ready["status"],
                "reason": ready["reason"],
                "message": ready["message"],
                "lastHeartbeatTime": rfc3339(now_secs()),
                "lastTransitionTime": ready.get("lastTransitionTime").cloned().unwrap_or_else(|| json!(rfc3339(now_secs()))),
            }],
        });
        if let Some(address) = host.data["status"]["address"].as_str() {
            status["addresses"] = json!([
                {"type": "InternalIP", "address": address},
                {"type": "Hostname", "address": name},
            ]);
        }
        let current = nodes.get(name).await?;
        let same = serde_json::to_value(&current.status)
            .ok()
            .is_some_and(|cur| {
                cur["conditions"][0]["status"] == status["conditions"][0]["status"]
                    && cur["conditions"][0]["reason"] == status["conditions"][0]["reason"]
                    && cur["addresses"] == status["addresses"]
                    && cur["capacity"] == status["capacity"]
            });
        if !same {
            nodes
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await?;
        }
    }
    Ok(())
}
