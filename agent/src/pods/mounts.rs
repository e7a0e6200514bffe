//! Where a container sees its pod's volumes: `volumeMounts` (a volume's directory, or a path
//! inside it) and `volumeDevices` (a claim's raw block device), checked against the pod's
//! volumes; every bad field is named.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Container;
use slipway_api::FieldError;

use super::volumes::check_relative;

/// Where a container sees a claim's raw block device (`volumeDevices`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSpec {
    pub volume: String,
    pub path: String,
}

/// Where a container sees a volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MountSpec {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
    /// A path inside the volume to mount instead of its root.
    pub sub_path: String,
}

/// The pod's volume names, each with whether its mounts are always read-only (configMap and
/// secret volumes are, as kubelet mounts API data; a claim the pod asks for read-only), for
/// [`parse_mounts`].
pub fn mount_rules(spec: &k8s_openapi::api::core::v1::PodSpec) -> HashMap<String, bool> {
    spec.volumes
        .iter()
        .flatten()
        .map(|v| {
            let claim_ro = v
                .persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.read_only == Some(true));
            (
                v.name.clone(),
                v.config_map.is_some() || v.secret.is_some() || claim_ro,
            )
        })
        .collect()
}

/// The container's volume mounts, each naming one of the pod's volumes (`rules`, from
/// [`mount_rules`]).
pub fn parse_mounts(
    c: &Container,
    path: &str,
    rules: &HashMap<String, bool>,
    errors: &mut Vec<FieldError>,
) -> Vec<MountSpec> {
    let mut paths = HashSet::new();
    let mut out = Vec::new();
    for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
        let field = format!("{path}.volumeMounts[{j}]");
        if m.name.is_empty() {
            errors.push(FieldError::required(format!("{field}.name")));
        } else if !rules.contains_key(&m.name) {
            errors.push(FieldError::invalid(
                format!("{field}.name"),
                &m.name,
                "must name a volume of the pod",
            ));
        }
        if !m.mount_path.starts_with('/') {
            errors.push(FieldError::invalid(
                format!("{field}.mountPath"),
                &m.mount_path,
                "must be an absolute path",
            ));
        } else if !paths.insert(m.mount_path.trim_end_matches('/').to_owned()) {
            errors.push(FieldError::invalid(
                format!("{field}.mountPath"),
                &m.mount_path,
                "must be unique",
            ));
        }
        let sub_path = m.sub_path.clone().unwrap_or_default();
        if !sub_path.is_empty() {
            check_relative(&format!("{field}.subPath"), &sub_path, errors);
        }
        if m.sub_path_expr.as_deref().is_some_and(|e| !e.is_empty()) {
            errors.push(FieldError::forbidden(
                format!("{field}.subPathExpr"),
                "is not supported by this runner",
            ));
        }
        out.push(MountSpec {
            volume: m.name.clone(),
            path: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false) || rules.get(&m.name).copied().unwrap_or(false),
            sub_path,
        });
    }
    out
}

/// The container's raw block devices, each naming a claim of the pod that no container
/// mounts as a filesystem, at an absolute path no mount of the container uses.
pub fn parse_devices(
    c: &Container,
    path: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    mounts: &[MountSpec],
    errors: &mut Vec<FieldError>,
) -> Vec<DeviceSpec> {
    let mut paths: HashSet<String> = mounts
        .iter()
        .map(|m| m.path.trim_end_matches('/').to_owned())
        .collect();
    let mut out = Vec::new();
    for (j, d) in c.volume_devices.iter().flatten().enumerate() {
        let field = format!("{path}.volumeDevices[{j}]");
        let claim = spec
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == d.name && v.persistent_volume_claim.is_some());
        let mounted = spec
            .containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .any(|m| m.name == d.name);
        if !claim {
            errors.push(FieldError::invalid(
                format!("{field}.name"),
                &d.name,
                "must name a persistentVolumeClaim volume of the pod",
            ));
        } else if mounted {
            errors.push(FieldError::invalid(
                format!("{field}.name"),
                &d.name,
                "must not name a volume a container mounts as a filesystem (volumeMounts)",
            ));
        }
        if !d.device_path.starts_with('/') {
            errors.push(FieldError::invalid(
                format!("{field}.devicePath"),
                &d.device_path,
                "must be an absolute path",
            ));
        } else if !paths.insert(d.device_path.trim_end_matches('/').to_owned()) {
            errors.push(FieldError::invalid(
                format!("{field}.devicePath"),
                &d.device_path,
                "must be unique among the container's mount and device paths",
            ));
        }
        out.push(DeviceSpec {
            volume: d.name.clone(),
            path: d.device_path.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    #[test]
    fn devices_name_claims_not_mounted_as_filesystems_at_unique_paths() {
        let pod: Pod = serde_json::from_value(json!({"spec": {
            "volumes": [
                {"name": "raw", "persistentVolumeClaim": {"claimName": "r"}},
                {"name": "fs", "persistentVolumeClaim": {"claimName": "f"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "containers": [{"name": "c",
                "volumeMounts": [{"name": "fs", "mountPath": "/data"}],
                "volumeDevices": [
                    {"name": "raw", "devicePath": "/dev/xvda"},
                    {"name": "fs", "devicePath": "/dev/xvdb"},
                    {"name": "scratch", "devicePath": "/dev/xvdc"},
                    {"name": "raw", "devicePath": "dev/xvdd"},
                    {"name": "raw", "devicePath": "/data"},
                ],
            }],
        }}))
        .expect("pod");
        let spec = pod.spec.as_ref().expect("spec");
        let mut errors = Vec::new();
        let c = &spec.containers[0];
        let mounts = parse_mounts(c, "spec.containers[0]", &mount_rules(spec), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let devices = parse_devices(c, "spec.containers[0]", spec, &mounts, &mut errors);
        assert_eq!(
            devices[0],
            DeviceSpec {
                volume: "raw".into(),
                path: "/dev/xvda".into()
            }
        );
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.containers[0].volumeDevices[1].name",
                "spec.containers[0].volumeDevices[2].name",
                "spec.containers[0].volumeDevices[3].devicePath",
                "spec.containers[0].volumeDevices[4].devicePath",
            ],
            "{errors:?}"
        );
        // The claim a container uses as a device is published as one.
        let volumes = crate::pods::volumes::parse(spec, &mut Vec::new());
        let block = |name: &str| {
            volumes.iter().find(|v| v.name == name).map(|v| {
                matches!(
                    v.source,
                    crate::pods::volumes::Source::Claim { block: true, .. }
                )
            })
        };
        assert_eq!((block("raw"), block("fs")), (Some(true), Some(true)));
    }
}
