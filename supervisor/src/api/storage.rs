//! `storage.k8s.io/v1` StorageClass.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Validate;
use super::meta::ObjectMeta;
use crate::error::FieldError;

/// A StorageClass (cluster-scoped; upstream has top-level fields, no spec).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageClass {
    /// `storage.k8s.io/v1`.
    #[serde(default)]
    pub api_version: String,
    /// `StorageClass`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// CSI driver name.
    #[serde(default)]
    pub provisioner: String,
    /// Driver parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
    /// Delete (default) or Retain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim_policy: Option<String>,
    /// Immediate (default) or WaitForFirstConsumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_binding_mode: Option<String>,
    /// Whether volumes can grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_volume_expansion: Option<bool>,
    /// Mount options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_options: Option<Vec<String>>,
    /// Topology constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_topologies: Option<Vec<Value>>,
}

impl Validate for StorageClass {
    fn default_fields(&mut self) {
        self.reclaim_policy.get_or_insert_with(|| "Delete".into());
        self.volume_binding_mode
            .get_or_insert_with(|| "Immediate".into());
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if self.provisioner.is_empty() {
            errs.push(FieldError::required("provisioner"));
        }
        // The driver takes one parameter, a workload cluster's `svStorageClass` (the supervisor
        // class its volumes are made with), and the provisioner the filesystem; in the
        // supervisor the class itself is the policy (which namespaces may use it, its reclaim
        // policy, its zones).
        if self.provisioner == slipway_api::volumes::DRIVER {
            use slipway_api::volumes::{FS_TYPES, FSTYPE_PARAMETER, SV_STORAGE_CLASS};
            for (k, v) in self.parameters.iter().flatten() {
                if k == FSTYPE_PARAMETER {
                    if !FS_TYPES.contains(&v.as_str()) {
                        errs.push(FieldError::not_supported(
                            format!("parameters.{k}"),
                            v,
                            &FS_TYPES,
                        ));
                    }
                } else if k != SV_STORAGE_CLASS {
                    errs.push(FieldError::invalid(
                        format!("parameters.{k}"),
                        k,
                        format!(
                            "unknown parameter: {} takes {SV_STORAGE_CLASS} and {FSTYPE_PARAMETER}",
                            slipway_api::volumes::DRIVER,
                        ),
                    ));
                }
            }
        }
        if let Some(p) = &self.reclaim_policy
            && p != "Delete"
            && p != "Retain"
        {
            errs.push(FieldError::not_supported(
                "reclaimPolicy",
                p,
                &["Delete", "Retain"],
            ));
        }
        if let Some(m) = &self.volume_binding_mode
            && m != "Immediate"
            && m != "WaitForFirstConsumer"
        {
            errs.push(FieldError::not_supported(
                "volumeBindingMode",
                m,
                &["Immediate", "WaitForFirstConsumer"],
            ));
        }
    }
}
