//! A core/v1 Pod as CRI configs: validation (every bad field at once), the sandbox config
//! (metadata, labels the runner finds it by, log directory, cgroup parent) and each container's
//! config (command, args, env, workingDir, cgroup limits from requests and limits, as kubelet's
//! `kuberuntime` computes them). Pure: no I/O.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::image::normalize;
use super::mounts::{DeviceSpec, MountSpec};
use super::probe::ProbeSpec;
use super::volumes::VolumeSpec;
use crate::Invalid;
use slipway_api::FieldError;

/// Labels the runner marks and finds its sandboxes and containers by (kubelet's names).
pub const LABEL_MANAGED: &str = "slipway.dev/managed-by";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// What the container was made from; another value means the spec changed.
pub const LABEL_CONTAINER_HASH: &str = "slipway.dev/container-hash";
/// The grace period a sandbox's containers get when the Pod goes away (kept on the sandbox:
/// the Pod object may be gone by then).
pub const ANNOTATION_GRACE: &str = "slipway.dev/termination-grace-period-seconds";

/// kubelet's CFS period and the minimum shares and quota (`pkg/kubelet/cm/helpers_linux.go`).
const CPU_PERIOD: i64 = 100_000;
const MIN_SHARES: i64 = 2;
const MIN_QUOTA: i64 = 1_000;

/// What the runner needs of a Pod, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub restart_policy: RestartPolicy,
    pub grace_seconds: i64,
    pub containers: Vec<ContainerSpec>,
    /// Container ports with a hostPort: the runtime hands them to the CNI chain's portmap.
    pub port_mappings: Vec<cri::PortMapping>,
    /// dnsPolicy and dnsConfig: the sandbox's resolv.conf ([`super::dns`]).
    pub dns: super::dns::PodDns,
    /// The pod's volumes ([`super::volumes`]).
    pub volumes: Vec<VolumeSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    /// As the Pod says it.
    pub image: String,
    /// As the runtime resolves it.
    pub image_ref: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub resources: cri::LinuxContainerResources,
    pub liveness: Option<ProbeSpec>,
    pub readiness: Option<ProbeSpec>,
    pub mounts: Vec<MountSpec>,
    pub devices: Vec<DeviceSpec>,
}

impl PodSpec {
    /// Checks `pod`; an error lists every bad field.
    pub fn from_pod(pod: &Pod) -> Result<Self, Invalid> {
        let mut errors = Vec::new();
        let meta = &pod.metadata;
        let name = meta.name.clone().unwrap_or_default();
        if name.is_empty() {
            errors.push(FieldError::required("metadata.name"));
        }
        let namespace = meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let uid = meta.uid.clone().unwrap_or_default();
        if uid.is_empty() {
            errors.push(FieldError::required("metadata.uid"));
        } else if !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            errors.push(FieldError::invalid(
                "metadata.uid",
                &uid,
                "may hold only letters, digits and '-'",
            ));
        }
        let default = Default::default();
        let spec = pod.spec.as_ref().unwrap_or(&default);
        let restart_policy = match spec.restart_policy.as_deref() {
            None | Some("Always") => RestartPolicy::Always,
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            Some(other) => {
                errors.push(FieldError::not_supported(
                    "spec.restartPolicy",
                    other,
                    &["Always", "OnFailure", "Never"],
                ));
                RestartPolicy::Always
            }
        };
        let grace_seconds = spec.termination_grace_period_seconds.unwrap_or(30);
        if grace_seconds < 0 {
            errors.push(FieldError::invalid(
                "spec.terminationGracePeriodSeconds",
                grace_seconds.to_string(),
                "must be greater than or equal to 0",
            ));
        }
        if spec.containers.is_empty() {
            errors.push(FieldError::required("spec.containers"));
        }
        if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
            errors.push(FieldError::forbidden(
                "spec.initContainers",
                "init containers are not supported by this runner yet",
            ));
        }
        let volumes = super::volumes::parse(spec, &mut errors);
        let mount_rules = super::mounts::mount_rules(spec);
        let mut names = BTreeSet::new();
        let mut containers = Vec::new();
        let mut port_mappings = Vec::new();
        let mut host_ports = BTreeSet::new();
        for (i, c) in spec.containers.iter().enumerate() {
            let path = format!("spec.containers[{i}]");
            for (j, port) in c.ports.iter().flatten().enumerate() {
                let field = format!("{path}.ports[{j}]");
                if !(1..=65535).contains(&port.container_port) {
                    errors.push(FieldError::invalid(
                        format!("{field}.containerPort"),
                        port.container_port,
                        "must be between 1 and 65535, inclusive",
                    ));
                }
                let protocol = match port.protocol.as_deref() {
                    None | Some("TCP") => cri::Protocol::Tcp,
                    Some("UDP") => cri::Protocol::Udp,
                    Some("SCTP") => cri::Protocol::Sctp,
                    Some(other) => {
                        errors.push(FieldError::not_supported(
                            format!("{field}.protocol"),
                            other,
                            &["TCP", "UDP", "SCTP"],
                        ));
                        cri::Protocol::Tcp
                    }
                };
                let Some(host_port) = port.host_port.filter(|p| *p != 0) else {
                    continue;
                };
                if !(1..=65535).contains(&host_port) {
                    errors.push(FieldError::invalid(
                        format!("{field}.hostPort"),
                        host_port,
                        "must be between 1 and 65535, inclusive",
                    ));
                } else if !host_ports.insert((host_port, protocol as i32)) {
                    errors.push(FieldError::duplicate(
                        format!("{field}.hostPort"),
                        host_port,
                    ));
                }
                port_mappings.push(cri::PortMapping {
                    protocol: protocol as i32,
                    container_port: port.container_port,
                    host_port,
                    host_ip: port.host_ip.clone().unwrap_or_default(),
                });
            }
            if !names.insert(c.name.clone()) {
                errors.push(FieldError::duplicate(format!("{path}.name"), &c.name));
            }
            if let Some(container) = container_spec(c, &path, spec, &mount_rules, &mut errors) {
                containers.push(container);
            }
        }
        let dns = super::dns::PodDns::from_spec(spec, &mut errors);
        if errors.is_empty() {
            Ok(Self {
                namespace,
                name,
                uid,
                restart_policy,
                grace_seconds,
                containers,
                port_mappings,
                dns,
                volumes,
            })
        } else {
            Err(Invalid { errors })
        }
    }

    /// The directory (under the runner's log root) the pod's container logs go to, kubelet's
    /// `<namespace>_<name>_<uid>`.
    pub fn log_directory(&self, root: &Path) -> PathBuf {
        root.join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
    }

    /// The pod's cgroup under `parent` (cgroupfs paths: one per v1 hierarchy).
    pub fn cgroup_parent(&self, parent: &str) -> String {
        format!("{}/pod{}", parent.trim_end_matches('/'), self.uid)
    }

    pub fn sandbox_config(
        &self,
        attempt: u32,
        log_root: &Path,
        cgroup_parent: &str,
    ) -> cri::PodSandboxConfig {
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "slipway".to_owned()),
            (LABEL_POD_UID.to_owned(), self.uid.clone()),
            (LABEL_POD_NAME.to_owned(), self.name.clone()),
            (LABEL_POD_NAMESPACE.to_owned(), self.namespace.clone()),
        ]);
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt,
            }),
            hostname: self.name.chars().take(63).collect(),
            log_directory: self.log_directory(log_root).display().to_string(),
            port_mappings: self.port_mappings.clone(),
            labels,
            annotations: HashMap::from([(
                ANNOTATION_GRACE.to_owned(),
                self.grace_seconds.to_string(),
            )]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent(cgroup_parent),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The container's CRI config; its volume mounts bind the directories in `volumes` (each
    /// volume's by name, as [`super::volumes::Volumes::set_up`] made them).
    pub fn container_config(
        &self,
        c: &ContainerSpec,
        attempt: u32,
        volumes: &HashMap<String, PathBuf>,
    ) -> cri::ContainerConfig {
        let mounts = c
            .mounts
            .iter()
            .filter_map(|m| {
                let dir = volumes.get(&m.volume)?;
                Some(cri::Mount {
                    container_path: m.path.clone(),
                    host_path: if m.sub_path.is_empty() {
                        dir.display().to_string()
                    } else {
                        dir.join(&m.sub_path).display().to_string()
                    },
                    readonly: m.read_only,
                    ..Default::default()
                })
            })
            .collect();
        // A raw block volume: the device the CSI plugin bound onto the volume's target file.
        let devices = c
            .devices
            .iter()
            .filter_map(|d| {
                Some(cri::Device {
                    container_path: d.path.clone(),
                    host_path: volumes.get(&d.volume)?.display().to_string(),
                    permissions: "rwm".into(),
                })
            })
            .collect();
        cri::ContainerConfig {
            mounts,
            devices,
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt,
            }),
            image: Some(cri::ImageSpec {
                image: c.image_ref.clone(),
                user_specified_image: c.image.clone(),
                ..Default::default()
            }),
            command: c.command.clone(),
            args: c.args.clone(),
            working_dir: c.working_dir.clone(),
            envs: c
                .env
                .iter()
                .map(|(key, value)| cri::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            labels: HashMap::from([
                (LABEL_MANAGED.to_owned(), "slipway".to_owned()),
                (LABEL_POD_UID.to_owned(), self.uid.clone()),
                (LABEL_CONTAINER_NAME.to_owned(), c.name.clone()),
                (LABEL_CONTAINER_HASH.to_owned(), c.hash()),
            ]),
            log_path: format!("{}/{attempt}.log", c.name),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(c.resources.clone()),
                security_context: None,
            }),
            ..Default::default()
        }
    }
}

impl ContainerSpec {
    /// A digest of what the container is made from (image, command, args, env, working dir,
    /// resources): the first 16 hex digits of a SHA-256, stable across agent versions.
    pub fn hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let r = &self.resources;
        let mut canonical = serde_json::json!([
            self.image_ref,
            self.command,
            self.args,
            self.env,
            self.working_dir,
            [
                r.cpu_shares,
                r.cpu_quota,
                r.cpu_period,
                r.memory_limit_in_bytes
            ],
        ]);
        // Mounts count only when there are some: containers made before volumes existed keep
        // their hash across an agent upgrade.
        if !self.mounts.is_empty()
            && let Some(list) = canonical.as_array_mut()
        {
            list.push(serde_json::json!(self.mounts));
        }
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

fn container_spec(
    c: &Container,
    path: &str,
    pod_spec: &k8s_openapi::api::core::v1::PodSpec,
    volumes: &HashMap<String, bool>,
    errors: &mut Vec<FieldError>,
) -> Option<ContainerSpec> {
    let before = errors.len();
    if c.name.is_empty() {
        errors.push(FieldError::required(format!("{path}.name")));
    } else if c.name.len() > 63
        || !c
            .name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
        || c.name.starts_with('-')
        || c.name.ends_with('-')
    {
        errors.push(FieldError::invalid(
            format!("{path}.name"),
            &c.name,
            "must be a DNS label (RFC 1123)",
        ));
    }
    let image = c.image.clone().unwrap_or_default();
    let image_ref = if image.is_empty() {
        errors.push(FieldError::required(format!("{path}.image")));
        String::new()
    } else {
        match normalize(&image) {
            Ok(r) => r,
            Err(e) => {
                errors.push(FieldError::invalid(
                    format!("{path}.image"),
                    &image,
                    e.to_string(),
                ));
                String::new()
            }
        }
    };
    let mut env = Vec::new();
    for (j, var) in c.env.iter().flatten().enumerate() {
        if var.name.is_empty() || var.name.contains('=') {
            errors.push(FieldError::invalid(
                format!("{path}.env[{j}].name"),
                &var.name,
                "must be a non-empty name without '='",
            ));
        }
        if var.value_from.is_some() {
            errors.push(FieldError::forbidden(
                format!("{path}.env[{j}].valueFrom"),
                "is not supported by this runner yet",
            ));
        }
        env.push((var.name.clone(), var.value.clone().unwrap_or_default()));
    }
    let resources = resources(c, path, errors);
    let liveness = c
        .liveness_probe
        .as_ref()
        .and_then(|p| ProbeSpec::from_probe(p, c, &format!("{path}.livenessProbe"), true, errors));
    let readiness = c.readiness_probe.as_ref().and_then(|p| {
        ProbeSpec::from_probe(p, c, &format!("{path}.readinessProbe"), false, errors)
    });
    if c.startup_probe.is_some() {
        errors.push(FieldError::forbidden(
            format!("{path}.startupProbe"),
            "is not supported by this runner yet",
        ));
    }
    let mounts = super::mounts::parse_mounts(c, path, volumes, errors);
    let devices = super::mounts::parse_devices(c, path, pod_spec, &mounts, errors);
    (errors.len() == before).then(|| ContainerSpec {
        name: c.name.clone(),
        image,
        image_ref,
        command: c.command.clone().unwrap_or_default(),
        args: c.args.clone().unwrap_or_default(),
        env,
        working_dir: c.working_dir.clone().unwrap_or_default(),
        resources: resources.unwrap_or_default(),
        liveness,
        readiness,
        mounts,
        devices,
    })
}

/// Cgroup limits from requests and limits: shares from the CPU request (the limit when no
/// request is given, as the API server defaults it), CFS quota from the CPU limit, the memory
/// limit in bytes.
fn resources(
    c: &Container,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<cri::LinuxContainerResources> {
    let default = Default::default();
    let r = c.resources.as_ref().unwrap_or(&default);
    let mut get =
        |kind: &str, name: &str, map: Option<&std::collections::BTreeMap<String, Quantity>>| {
            let q = map?.get(name)?;
            let field = format!("{path}.resources.{kind}.{name}");
            let parsed = if name == "cpu" {
                parse_milli(&q.0)
            } else {
                // Bytes, rounded up as the API server does.
                parse_milli(&q.0).map(|m| if m >= 0 { (m + 999) / 1000 } else { m / 1000 })
            };
            match parsed {
                Some(v) if v >= 0 => Some(v),
                Some(_) => {
                    errors.push(FieldError::invalid(
                        &field,
                        &q.0,
                        "must be greater than or equal to 0",
                    ));
                    None
                }
                None => {
                    errors.push(FieldError::invalid(&field, &q.0, "is not a quantity"));
                    None
                }
            }
        };
    let cpu_limit = get("limits", "cpu", r.limits.as_ref());
    let cpu_request = get("requests", "cpu", r.requests.as_ref()).or(cpu_limit);
    let memory_limit = get("limits", "memory", r.limits.as_ref());
    let memory_request = get("requests", "memory", r.requests.as_ref());
    for (name, request, limit) in [
        ("cpu", cpu_request, cpu_limit),
        ("memory", memory_request, memory_limit),
    ] {
        if let (Some(req), Some(lim)) = (request, limit)
            && req > lim
        {
            errors.push(FieldError::invalid(
                format!("{path}.resources.requests.{name}"),
                req.to_string(),
                format!("must be less than or equal to {name} limit"),
            ));
        }
    }
    let shares = cpu_request.map_or(MIN_SHARES, |m| (m * 1024 / 1000).max(MIN_SHARES));
    let mut out = cri::LinuxContainerResources {
        cpu_shares: shares,
        ..Default::default()
    };
    if let Some(limit) = cpu_limit {
        out.cpu_period = CPU_PERIOD;
        out.cpu_quota = (limit * CPU_PERIOD / 1000).max(MIN_QUOTA);
    }
    if let Some(bytes) = memory_limit {
        out.memory_limit_in_bytes = bytes;
    }
    Some(out)
}

/// A Kubernetes quantity (`100m`, `0.5`, `2`, `64Mi`, `1G`, `1e3`) in thousandths of its unit,
/// rounded up; `None` when it is not a quantity.
pub fn parse_milli(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number == "-" || number == "+" {
        return None;
    }
    let negative = number.starts_with('-');
    let digits = number.trim_start_matches(['-', '+']);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // value = (int.frac) * multiplier, kept as an exact rational: mantissa / 10^frac_len.
    let mantissa: i128 = format!("{int}{frac}").parse().ok()?;
    let scale = 10i128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let (num, den): (i128, i128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "k" => (1_000_000, 1),
        "M" => (1_000_000_000, 1),
        "G" => (1_000_000_000_000, 1),
        "T" => (1_000_000_000_000_000, 1),
        "Ki" => (1024 * 1000, 1),
        "Mi" => (1024i128.pow(2) * 1000, 1),
        "Gi" => (1024i128.pow(3) * 1000, 1),
        "Ti" => (1024i128.pow(4) * 1000, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().ok()?;
            if exp >= 0 {
                (1000 * 10i128.checked_pow(u32::try_from(exp).ok()?)?, 1)
            } else {
                (1000, 10i128.checked_pow(exp.unsigned_abs())?)
            }
        }
        _ => return None,
    };
    let total = mantissa.checked_mul(num)?;
    let den = scale.checked_mul(den)?;
    let value = (total + den - 1) / den;
    let value = i64::try_from(value).ok()?;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_milli("100m"), Some(100));
        assert_eq!(parse_milli("0.5"), Some(500));
        assert_eq!(parse_milli("2"), Some(2000));
        assert_eq!(parse_milli("64Mi"), Some(64 * 1024 * 1024 * 1000));
        assert_eq!(parse_milli("1G"), Some(1_000_000_000_000));
        assert_eq!(parse_milli("1e3"), Some(1_000_000));
        assert_eq!(parse_milli("-1"), Some(-1000));
        for bad in ["", "abc", "1Qi", "1.2.3", "-"] {
            assert_eq!(parse_milli(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_pod_becomes_sandbox_and_container_configs_with_cgroup_limits() {
        let p = pod(json!({
            "metadata": {"name": "web", "namespace": "apps", "uid": "u-1"},
            "spec": {"restartPolicy": "OnFailure", "terminationGracePeriodSeconds": 5,
              "containers": [{"name": "main", "image": "busybox", "command": ["httpd"],
                "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 53, "protocol": "UDP"}],
                "args": ["-f"], "workingDir": "/www", "env": [{"name": "A", "value": "b"}],
                "resources": {"requests": {"cpu": "250m", "memory": "32Mi"},
                              "limits": {"cpu": "500m", "memory": "64Mi"}}}]}
        }));
        let spec = PodSpec::from_pod(&p).unwrap();
        assert_eq!(spec.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(spec.grace_seconds, 5);
        let c = &spec.containers[0];
        assert_eq!(c.image_ref, "docker.io/library/busybox:latest");
        assert_eq!(c.resources.cpu_shares, 256);
        assert_eq!(c.resources.cpu_quota, 50_000);
        assert_eq!(c.resources.cpu_period, 100_000);
        assert_eq!(c.resources.memory_limit_in_bytes, 64 << 20);
        let sandbox = spec.sandbox_config(0, Path::new("/logs"), "/slipway/h1");
        assert_eq!(sandbox.log_directory, "/logs/apps_web_u-1");
        assert_eq!(sandbox.linux.unwrap().cgroup_parent, "/slipway/h1/podu-1");
        assert_eq!(sandbox.labels[LABEL_POD_UID], "u-1");
        assert_eq!(sandbox.annotations[ANNOTATION_GRACE], "5");
        assert_eq!(
            sandbox.port_mappings,
            [cri::PortMapping {
                protocol: cri::Protocol::Tcp as i32,
                container_port: 80,
                host_port: 8080,
                host_ip: String::new(),
            }]
        );
        let config = spec.container_config(c, 3, &HashMap::new());
        assert_eq!(config.command, ["httpd"]);
        assert_eq!(config.args, ["-f"]);
        assert_eq!(config.working_dir, "/www");
        assert_eq!(config.envs[0].key, "A");
        assert_eq!(config.log_path, "main/3.log");
        assert_eq!(config.labels[LABEL_CONTAINER_HASH], c.hash());
        let mut other = c.clone();
        other.image_ref = "docker.io/library/busybox:2".into();
        assert_ne!(other.hash(), c.hash());
        assert_eq!(c.clone().hash(), c.hash());
        assert_eq!(config.metadata.unwrap().attempt, 3);
        // No resources at all: best effort, minimum shares and no limits.
        let p = pod(json!({"metadata": {"name": "x", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}));
        let spec = PodSpec::from_pod(&p).unwrap();
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.restart_policy, RestartPolicy::Always);
        let r = &spec.containers[0].resources;
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.memory_limit_in_bytes),
            (2, 0, 0)
        );
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let p = pod(json!({
            "metadata": {"name": "web"},
            "spec": {"restartPolicy": "Sometimes", "containers": [
                {"name": "a", "image": "busybox",
                 "ports": [{"containerPort": 0, "hostPort": 70000, "protocol": "ICMP"}],
                 "resources": {"limits": {"cpu": "-1", "memory": "lots"}}},
                {"name": "a", "image": ""},
                {"name": "Bad_Name", "image": "busybox",
                 "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}]}
        }));
        let errors: Vec<String> = PodSpec::from_pod(&p)
            .unwrap_err()
            .errors
            .iter()
            .map(ToString::to_string)
            .collect();
        let text = errors.join("\n");
        for field in [
            "metadata.uid",
            "spec.restartPolicy",
            "spec.containers[0].resources.limits.cpu",
            "spec.containers[0].resources.limits.memory",
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[0].ports[0].hostPort",
            "spec.containers[0].ports[0].protocol",
            "spec.containers[1].name",
            "spec.containers[1].image",
            "spec.containers[2].name",
            "spec.containers[2].resources.requests.cpu",
        ] {
            assert!(text.contains(field), "{field} missing from\n{text}");
        }
    }
}
