//! The volume kinds: `v1` PersistentVolume and `storage.k8s.io/v1` VolumeAttachment (upstream
//! types, served to workload clusters' provisioners and agents as kube-apiserver serves them)
//! and Slipway's namespaced `slipway.dev/v1alpha1` HostVolumeAttachment (the pvCSI controller's
//! request to attach a supervisor volume to a host).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use slipway_api::slipway::{GROUP, VERSION};
use slipway_api::volumes::HostVolumeAttachment;

use super::Validate;
use super::registry::{
    Column, ResourceType, access_modes, col, decode, decode_upstream, jp, phase_or_pending, s,
    schema,
};
use crate::error::FieldError;

/// A PersistentVolume (cluster-scoped), the upstream type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct PersistentVolume(pub k8s_openapi::api::core::v1::PersistentVolume);

const RECLAIM_POLICIES: &[&str] = &["Retain", "Delete", "Recycle"];

impl Validate for PersistentVolume {
    fn default_fields(&mut self) {
        let spec = self.0.spec.get_or_insert_with(Default::default);
        spec.persistent_volume_reclaim_policy
            .get_or_insert_with(|| "Retain".into());
        spec.volume_mode.get_or_insert_with(|| "Filesystem".into());
        let status = self.0.status.get_or_insert_with(Default::default);
        status.phase.get_or_insert_with(|| "Pending".into());
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let Some(spec) = &self.0.spec else {
            errs.push(FieldError::required("spec"));
            return;
        };
        if spec
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .is_none()
        {
            errs.push(FieldError::required("spec.capacity.storage"));
        }
        if spec.access_modes.as_ref().is_none_or(Vec::is_empty) {
            errs.push(FieldError::required("spec.accessModes"));
        }
        if let Some(p) = &spec.persistent_volume_reclaim_policy
            && !RECLAIM_POLICIES.contains(&p.as_str())
        {
            errs.push(FieldError::not_supported(
                "spec.persistentVolumeReclaimPolicy",
                p,
                RECLAIM_POLICIES,
            ));
        }
        if let Some(csi) = &spec.csi {
            if csi.driver.is_empty() {
                errs.push(FieldError::required("spec.csi.driver"));
            }
            if csi.volume_handle.is_empty() {
                errs.push(FieldError::required("spec.csi.volumeHandle"));
            }
        }
    }
}

/// A VolumeAttachment (cluster-scoped), the upstream type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct VolumeAttachment(pub k8s_openapi::api::storage::v1::VolumeAttachment);

impl Validate for VolumeAttachment {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let spec = &self.0.spec;
        if spec.attacher.is_empty() {
            errs.push(FieldError::required("spec.attacher"));
        }
        if spec.node_name.is_empty() {
            errs.push(FieldError::required("spec.nodeName"));
        }
        if spec.source.persistent_volume_name.is_none() && spec.source.inline_volume_spec.is_none()
        {
            errs.push(FieldError::required("spec.source.persistentVolumeName"));
        }
    }
}

fn claim_ref(v: &Value) -> Value {
    match (
        jp(v, "spec.claimRef.namespace").and_then(Value::as_str),
        jp(v, "spec.claimRef.name").and_then(Value::as_str),
    ) {
        (Some(ns), Some(n)) => Value::String(format!("{ns}/{n}")),
        _ => Value::String(String::new()),
    }
}

fn attached(v: &Value) -> Value {
    Value::String(
        jp(v, "status.attached")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .to_string(),
    )
}

/// The volume kinds' registry entries.
pub(super) fn resources() -> Vec<ResourceType> {
    vec![
        ResourceType {
            group: "",
            version: "v1",
            kind: "PersistentVolume",
            plural: "persistentvolumes",
            singular: "persistentvolume",
            namespaced: false,
            short_names: &["pv"],
            has_status: true,
            merge_keys: &[],
            columns: vec![
                col("Capacity", "Capacity", |v| s(v, "spec.capacity.storage")),
                col("Access Modes", "Access modes", access_modes),
                col("Reclaim Policy", "Reclaim policy", |v| {
                    s(v, "spec.persistentVolumeReclaimPolicy")
                }),
                Column {
                    name: "Status",
                    type_: "string",
                    description: "Phase",
                    priority: 0,
                    cell: phase_or_pending,
                },
                col("Claim", "Bound claim", claim_ref),
                col("StorageClass", "StorageClass", |v| {
                    s(v, "spec.storageClassName")
                }),
            ],
            decode: decode_upstream::<PersistentVolume>,
            schema: schema::<PersistentVolume>,
        },
        ResourceType {
            group: "storage.k8s.io",
            version: "v1",
            kind: "VolumeAttachment",
            plural: "volumeattachments",
            singular: "volumeattachment",
            namespaced: false,
            short_names: &[],
            has_status: true,
            merge_keys: &[],
            columns: vec![
                col("Attacher", "CSI driver", |v| s(v, "spec.attacher")),
                col("PV", "Volume", |v| s(v, "spec.source.persistentVolumeName")),
                col("Node", "Node", |v| s(v, "spec.nodeName")),
                col("Attached", "Attached", attached),
            ],
            decode: decode_upstream::<VolumeAttachment>,
            schema: schema::<VolumeAttachment>,
        },
        ResourceType {
            group: GROUP,
            version: VERSION,
            kind: "HostVolumeAttachment",
            plural: "hostvolumeattachments",
            singular: "hostvolumeattachment",
            namespaced: true,
            short_names: &["hva"],
            has_status: true,
            merge_keys: &[],
            columns: vec![
                col("Claim", "PersistentVolumeClaim", |v| s(v, "spec.claim")),
                col("Host", "Host", |v| s(v, "spec.host")),
                col("Attached", "Attached", attached),
            ],
            decode: decode::<HostVolumeAttachment>,
            schema: schema::<HostVolumeAttachment>,
        },
    ]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::registry::lookup;

    #[test]
    fn volume_kinds_are_served_with_defaults_and_checks() {
        let pv = lookup("", "v1", "persistentvolumes").expect("served");
        let (obj, errs) = pv
            .decode(json!({"metadata": {"name": "pv-1"}, "spec": {
                "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "csi": {"driver": "csi.slipway.dev", "volumeHandle": "pvc-1"}}}))
            .expect("decodes");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(obj["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(obj["status"]["phase"], "Pending");
        let (_, errs) = pv
            .decode(json!({"metadata": {"name": "pv-1"}, "spec": {
                "persistentVolumeReclaimPolicy": "Keep"}}))
            .expect("decodes");
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.capacity.storage",
                "spec.accessModes",
                "spec.persistentVolumeReclaimPolicy"
            ]
        );
        let va = lookup("storage.k8s.io", "v1", "volumeattachments").expect("served");
        let (_, errs) = va
            .decode(
                json!({"metadata": {"name": "a"}, "spec": {"attacher": "", "nodeName": "n",
                "source": {}}}),
            )
            .expect("decodes");
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.attacher", "spec.source.persistentVolumeName"]
        );
        let hva = lookup("slipway.dev", "v1alpha1", "hostvolumeattachments").expect("served");
        assert!(hva.namespaced);
        assert!(
            hva.decode(
                json!({"metadata": {"name": "a"}, "spec": {"claim": "c", "host": "h", "x": 1}})
            )
            .is_err(),
            "unknown fields are refused"
        );
    }
}
