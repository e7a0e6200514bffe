//! Paravirtual storage's shared names and Slipway's one volume kind: `slipway.dev/v1alpha1`
//! HostVolumeAttachment, what a workload cluster's pvCSI controller writes in its supervisor
//! namespace to have a volume attached to one of its hosts (vSphere's CnsNodeVmAttachment).
//!
//! It is namespaced, unlike upstream's cluster-scoped `storage.k8s.io` VolumeAttachment, so a
//! cluster's namespace-scoped identity can write it and can name only its own namespace's
//! claims; it names a supervisor Host, not a workload Node; and its status carries upstream's
//! `attached` and `attachmentMetadata` so the pvCSI controller hands them on unchanged.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{FieldError, Validate, kind};

/// The CSI driver's name (StorageClass `provisioner`, PV `spec.csi.driver`).
pub const DRIVER: &str = "csi.slipway.dev";

/// The topology key of a volume's zone (CSI `accessible_topology`, PV node affinity).
pub const ZONE_TOPOLOGY_KEY: &str = "topology.slipway.dev/zone";

/// Annotation on a supervisor PersistentVolumeClaim asking for the block store of a zone.
pub const ZONE_ANNOTATION: &str = "slipway.dev/zone";

/// Volume context key (PV `spec.csi.volumeAttributes`): where the node plugin reaches the NBD
/// export, `tcp:HOST:PORT` or `unix:/path`.
pub const CTX_NBD: &str = "nbdAddress";

/// Annotation the volume reconciler writes on a claim it bound: the volume handle (the CSI
/// volume ID, the PV's name), for readers that may not read PVs (a cluster's pvCSI controller).
pub const VOLUME_HANDLE_ANNOTATION: &str = "csi.slipway.dev/volume-handle";

/// Annotation the volume reconciler writes on a claim it bound: the NBD address of its
/// volume (the volume context's [`CTX_NBD`]).
pub const NBD_ADDRESS_ANNOTATION: &str = "csi.slipway.dev/nbd-address";

/// Annotation the volume reconciler writes on a VolumeSnapshot it took: the block store
/// snapshot (the CSI snapshot ID).
pub const SNAPSHOT_HANDLE_ANNOTATION: &str = "csi.slipway.dev/snapshot-handle";

/// Label on the supervisor claims a workload cluster's pvCSI controller makes: the cluster.
pub const CLUSTER_LABEL: &str = "slipway.dev/cluster";

/// Annotation on those claims: the CSI volume name the cluster asked for.
pub const CSI_NAME_ANNOTATION: &str = "csi.slipway.dev/name";

/// The one StorageClass parameter of `csi.slipway.dev` in a workload cluster: the supervisor
/// StorageClass its volumes are made with (vSphere pvCSI's name for it).
pub const SV_STORAGE_CLASS: &str = "svStorageClass";

/// The StorageClass parameter naming a volume's filesystem (upstream's external-provisioner
/// key); parameters under `csi.storage.k8s.io/` are the provisioner's, not the driver's.
pub const FSTYPE_PARAMETER: &str = "csi.storage.k8s.io/fstype";

/// The filesystems the node plugin makes.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

/// Attachment metadata key (the CSI publish context): the client name the export allows.
pub const CTX_NBD_CLIENT: &str = "nbdClient";

/// A never-issued client name: the allow-list of an export nobody may open (the block store
/// reads an empty list as "any client").
pub const NO_CLIENT: &str = "nobody.invalid";

/// The DNS name a host's client certificate proves to a block store, and that an export's
/// allow-list names when the host may open it. Its join certificate carries it.
pub fn host_nbd_client(host: &str) -> String {
    format!("{host}.hosts.slipway.internal")
}

/// HostVolumeAttachment spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostVolumeAttachmentSpec {
    /// The PersistentVolumeClaim (in this namespace) whose volume is attached.
    #[serde(default)]
    pub claim: String,
    /// The Host that may open it.
    #[serde(default)]
    pub host: String,
}

/// HostVolumeAttachment status, written by the supervisor's volume reconciler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostVolumeAttachmentStatus {
    /// The host may open the export.
    #[serde(default)]
    pub attached: bool,
    /// What the host needs to open it (the CSI publish context).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attachment_metadata: BTreeMap<String, String>,
    /// Why it is not attached, when it cannot be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

kind!(
    /// A volume attached to a host: the host's certificate is allowed on the export.
    HostVolumeAttachment,
    HostVolumeAttachmentSpec,
    HostVolumeAttachmentStatus
);

impl Validate for HostVolumeAttachment {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if self.spec.claim.is_empty() {
            errs.push(FieldError::required("spec.claim"));
        } else {
            crate::meta::check_dns_subdomain("spec.claim", &self.spec.claim, errs);
        }
        if self.spec.host.is_empty() {
            errs.push(FieldError::required("spec.host"));
        } else {
            crate::meta::check_dns_label("spec.host", &self.spec.host, errs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_named() {
        let mut a = HostVolumeAttachment::default();
        let mut errs = Vec::new();
        a.validate(&mut errs);
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.claim", "spec.host"]);
        a.spec.claim = "data".into();
        a.spec.host = "Not_A_Label".into();
        errs.clear();
        a.validate(&mut errs);
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.host"]);
    }

    #[test]
    fn host_names_are_client_names() {
        assert_eq!(
            host_nbd_client("ns-c-w-0"),
            "ns-c-w-0.hosts.slipway.internal"
        );
    }
}
