//! Pod volumes, as kubelet's volume plugins make them: `emptyDir` (a directory, or a tmpfs for
//! `medium: Memory`), `configMap` and `secret` (their keys as files; a Secret's on a tmpfs,
//! never on disk), and `persistentVolumeClaim` (staged and published by the node's CSI plugin,
//! [`super::claims`]). Each volume is a directory under `<root>/<pod uid>/volumes/<plugin>/<name>`
//! that the runtime bind-mounts into the containers.
//!
//! ConfigMap and Secret files are written as kubelet's atomic writer does ([`super::atomic`]): the payload goes into
//! a fresh hidden directory `..<digest>`, the symlink `..data` is swapped to it in one rename,
//! and each visible entry is a symlink through `..data`. A container sees the old files or the
//! new ones, never a mix, and an updated ConfigMap reaches running pods at the next sync.
//!
//! Parsing is pure; [`Volumes`] does the file work. The caller fetches the ConfigMaps and
//! Secrets ([`references`], [`Objects`]): the runner watches no API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath, Pod, Secret};
use slipway_api::FieldError;

use super::claims::{ClaimVolume, CsiNode};

/// kubelet's default file mode for projected keys (0644).
const DEFAULT_MODE: u32 = 0o644;

/// A pod volume, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A scratch directory that lives as long as the pod; on a tmpfs of at most `size_limit`
    /// bytes with `memory`.
    EmptyDir {
        memory: bool,
        size_limit: Option<u64>,
    },
    ConfigMap(Projection),
    Secret(Projection),
    /// A PersistentVolumeClaim of the pod's namespace; `block` when the containers use it as
    /// a raw block device (`volumeDevices`) rather than a filesystem.
    Claim {
        name: String,
        read_only: bool,
        block: bool,
    },
}

/// The keys of a ConfigMap or Secret as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// The object's name (in the pod's namespace).
    pub name: String,
    /// Only these keys, at these paths (every key at its own name when empty).
    pub items: Vec<Item>,
    pub default_mode: u32,
    /// A missing object (or key) is no error: the volume is empty.
    pub optional: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub path: String,
    pub mode: Option<u32>,
}

impl Source {
    /// kubelet's plugin directory name.
    fn plugin(&self) -> &'static str {
        match self {
            Self::EmptyDir { .. } => "kubernetes.io~empty-dir",
            Self::ConfigMap(_) => "kubernetes.io~configmap",
            Self::Secret(_) => "kubernetes.io~secret",
            Self::Claim { .. } => super::claims::PLUGIN,
        }
    }
}

fn mode(value: Option<i32>, field: &str, errors: &mut Vec<FieldError>) -> Option<u32> {
    let v = value?;
    match u32::try_from(v) {
        Ok(m) if m <= 0o777 => Some(m),
        _ => {
            errors.push(FieldError::invalid(
                field,
                v,
                "must be a number between 0 and 0777 (octal), both inclusive",
            ));
            None
        }
    }
}

/// A relative path that stays inside its directory: no `..`, not absolute, not empty; kubelet
/// also refuses a first element starting with `..` (the writer's own names).
pub(super) fn check_relative(field: &str, path: &str, errors: &mut Vec<FieldError>) -> bool {
    let p = Path::new(path);
    let bad = if path.is_empty() {
        Some("must not be empty")
    } else if p.is_absolute() {
        Some("must be a relative path")
    } else if p.components().any(|c| c == Component::ParentDir) {
        Some("must not contain '..'")
    } else if path.starts_with("..") {
        Some("must not start with '..'")
    } else {
        None
    };
    if let Some(reason) = bad {
        errors.push(FieldError::invalid(field, path, reason));
    }
    bad.is_none()
}

fn items(list: Option<&Vec<KeyToPath>>, path: &str, errors: &mut Vec<FieldError>) -> Vec<Item> {
    let mut out = Vec::new();
    for (k, item) in list.into_iter().flatten().enumerate() {
        let field = format!("{path}.items[{k}]");
        if item.key.is_empty() {
            errors.push(FieldError::required(format!("{field}.key")));
        }
        check_relative(&format!("{field}.path"), &item.path, errors);
        out.push(Item {
            key: item.key.clone(),
            path: item.path.clone(),
            mode: mode(item.mode, &format!("{field}.mode"), errors),
        });
    }
    out
}

/// The pod's volumes; every bad field goes to `errors`.
pub fn parse(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    errors: &mut Vec<FieldError>,
) -> Vec<VolumeSpec> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let path = format!("spec.volumes[{i}]");
        let before = errors.len();
        slipway_api::meta::check_dns_label(&format!("{path}.name"), &v.name, errors);
        if !names.insert(v.name.clone()) {
            errors.push(FieldError::duplicate(format!("{path}.name"), &v.name));
        }
        let source = if let Some(e) = &v.empty_dir {
            let memory = match e.medium.as_deref() {
                None | Some("") => false,
                Some("Memory") => true,
                Some(other) => {
                    errors.push(FieldError::not_supported(
                        format!("{path}.emptyDir.medium"),
                        other,
                        &["", "Memory"],
                    ));
                    false
                }
            };
            let size_limit = e.size_limit.as_ref().and_then(|q| {
                match super::spec::parse_milli(&q.0).map(|m| (m + 999) / 1000) {
                    Some(bytes) if bytes > 0 => u64::try_from(bytes).ok(),
                    _ => {
                        errors.push(FieldError::invalid(
                            format!("{path}.emptyDir.sizeLimit"),
                            &q.0,
                            "must be a positive quantity",
                        ));
                        None
                    }
                }
            });
            Some(Source::EmptyDir { memory, size_limit })
        } else if let Some(c) = &v.config_map {
            if c.name.is_empty() {
                errors.push(FieldError::required(format!("{path}.configMap.name")));
            }
            Some(Source::ConfigMap(Projection {
                name: c.name.clone(),
                items: items(c.items.as_ref(), &format!("{path}.configMap"), errors),
                default_mode: mode(
                    c.default_mode,
                    &format!("{path}.configMap.defaultMode"),
                    errors,
                )
                .unwrap_or(DEFAULT_MODE),
                optional: c.optional.unwrap_or(false),
            }))
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            if name.is_empty() {
                errors.push(FieldError::required(format!("{path}.secret.secretName")));
            }
            Some(Source::Secret(Projection {
                name,
                items: items(s.items.as_ref(), &format!("{path}.secret"), errors),
                default_mode: mode(
                    s.default_mode,
                    &format!("{path}.secret.defaultMode"),
                    errors,
                )
                .unwrap_or(DEFAULT_MODE),
                optional: s.optional.unwrap_or(false),
            }))
        } else if let Some(c) = &v.persistent_volume_claim {
            if c.claim_name.is_empty() {
                errors.push(FieldError::required(format!(
                    "{path}.persistentVolumeClaim.claimName"
                )));
            }
            Some(Source::Claim {
                name: c.claim_name.clone(),
                read_only: c.read_only.unwrap_or(false),
                block: spec
                    .containers
                    .iter()
                    .flat_map(|c| c.volume_devices.iter().flatten())
                    .any(|d| d.name == v.name),
            })
        } else {
            errors.push(FieldError::forbidden(
                &path,
                "only emptyDir, configMap, secret and persistentVolumeClaim volumes are \
                 supported by this runner",
            ));
            None
        };
        if let (Some(source), true) = (source, errors.len() == before) {
            out.push(VolumeSpec {
                name: v.name.clone(),
                source,
            });
        }
    }
    out
}

/// Which kind of object a volume needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ConfigMap,
    Secret,
    /// A PersistentVolumeClaim, resolved by the caller to its volume on this node.
    Claim,
}

/// An object a pod's volumes need: (kind, namespace, name).
pub type Reference = (Kind, String, String);

/// The ConfigMaps, Secrets and claims `pods` mount, for the caller to fetch.
pub fn references<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<Reference> {
    let mut out: Vec<Reference> = pods
        .into_iter()
        .flat_map(|pod| {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            pod.spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .filter_map(move |v| {
                    if let Some(c) = &v.config_map {
                        Some((Kind::ConfigMap, ns.clone(), c.name.clone()))
                    } else if let Some(c) = &v.persistent_volume_claim {
                        Some((Kind::Claim, ns.clone(), c.claim_name.clone()))
                    } else {
                        v.secret.as_ref().and_then(|s| {
                            s.secret_name.clone().map(|n| (Kind::Secret, ns.clone(), n))
                        })
                    }
                })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The ConfigMaps' and Secrets' keys as the API had them; an object absent here was not
/// fetched, one mapped to `None` does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objects {
    objects: HashMap<Reference, Option<BTreeMap<String, Vec<u8>>>>,
    /// Each claim's volume on this node, or why it cannot be mounted yet.
    claims: HashMap<Reference, Result<ClaimVolume, String>>,
}

impl Objects {
    pub fn insert_config_map(&mut self, namespace: &str, name: &str, cm: Option<&ConfigMap>) {
        let data = cm.map(|cm| {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone())),
            );
            data
        });
        self.objects
            .insert((Kind::ConfigMap, namespace.into(), name.into()), data);
    }

    pub fn insert_secret(&mut self, namespace: &str, name: &str, secret: Option<&Secret>) {
        let data = secret.map(|s| {
            let mut data: BTreeMap<String, Vec<u8>> = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            data.extend(
                s.string_data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
            );
            data
        });
        self.objects
            .insert((Kind::Secret, namespace.into(), name.into()), data);
    }

    /// The volume of claim `name`, or why the pod waits for it (not bound, not attached).
    pub fn insert_claim(&mut self, namespace: &str, name: &str, v: Result<ClaimVolume, String>) {
        self.claims
            .insert((Kind::Claim, namespace.into(), name.into()), v);
    }

    /// Forgets every object not in `wanted`.
    pub fn retain(&mut self, wanted: &HashSet<Reference>) {
        self.objects.retain(|r, _| wanted.contains(r));
        self.claims.retain(|r, _| wanted.contains(r));
    }

    fn get(&self, r: &Reference) -> Option<&Option<BTreeMap<String, Vec<u8>>>> {
        self.objects.get(r)
    }
}

/// Why a pod's volumes cannot be set up yet (kubelet's FailedMount): the pod waits in
/// ContainerCreating with this message and the next sync tries again.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("MountVolume.SetUp failed for volume {volume:?}: {reason}")]
    Waiting { volume: String, reason: String },
    #[error("MountVolume.SetUp failed for volume {volume:?}: {what}")]
    Io {
        volume: String,
        what: String,
        #[source]
        source: io::Error,
    },
}

use super::atomic::{Files, write_atomically};

/// What `p` puts in its volume, or why it cannot yet.
fn project(
    kind: Kind,
    namespace: &str,
    p: &Projection,
    objects: &Objects,
) -> Result<Files, String> {
    let what = match kind {
        Kind::ConfigMap => "configmap",
        Kind::Secret => "secret",
        Kind::Claim => "persistentvolumeclaim",
    };
    let data = match objects.get(&(kind, namespace.into(), p.name.clone())) {
        Some(Some(data)) => data,
        Some(None) if p.optional => return Ok(Vec::new()),
        Some(None) => return Err(format!("{what} {:?} not found", p.name)),
        None => return Err(format!("{what} {:?} not fetched yet", p.name)),
    };
    if p.items.is_empty() {
        return Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), p.default_mode))
            .collect());
    }
    let mut files = Vec::new();
    for item in &p.items {
        match data.get(&item.key) {
            Some(v) => files.push((
                item.path.clone(),
                v.clone(),
                item.mode.unwrap_or(p.default_mode),
            )),
            None if p.optional => {}
            None => {
                return Err(format!(
                    "configuration key {:?} not found in {what} {:?}",
                    item.key, p.name
                ));
            }
        }
    }
    Ok(files)
}

/// Pod volume directories under one root, and the node's CSI plugin for claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volumes {
    root: PathBuf,
    csi: Option<CsiNode>,
}

impl Volumes {
    pub fn new(root: PathBuf, csi: Option<CsiNode>) -> Self {
        Self { root, csi }
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join(uid)
    }

    fn dir(&self, uid: &str, v: &VolumeSpec) -> PathBuf {
        self.pod_dir(uid)
            .join("volumes")
            .join(v.source.plugin())
            .join(&v.name)
    }

    /// Where each volume of the pod `uid` is (made or not).
    pub fn dirs(&self, uid: &str, volumes: &[VolumeSpec]) -> HashMap<String, PathBuf> {
        volumes
            .iter()
            .map(|v| {
                let dir = self.dir(uid, v);
                let path = match v.source {
                    Source::Claim { block, .. } => super::claims::target(&dir, block),
                    _ => dir,
                };
                (v.name.clone(), path)
            })
            .collect()
    }

    /// Makes (or brings up to date) every volume of the pod `uid` in `namespace`; returns each
    /// volume's directory by name.
    pub async fn set_up(
        &self,
        uid: &str,
        namespace: &str,
        volumes: &[VolumeSpec],
        objects: &Objects,
    ) -> Result<HashMap<String, PathBuf>, SetupError> {
        let mut dirs = HashMap::new();
        for v in volumes {
            let dir = self.dir(uid, v);
            let io = |what: &str| {
                let volume = v.name.clone();
                let what = what.to_owned();
                move |source| SetupError::Io {
                    volume,
                    what,
                    source,
                }
            };
            std::fs::create_dir_all(&dir).map_err(io("create its directory"))?;
            if let Source::Claim {
                name,
                read_only,
                block,
            } = &v.source
            {
                let waiting = |reason: String| SetupError::Waiting {
                    volume: v.name.clone(),
                    reason,
                };
                let claim = match objects
                    .claims
                    .get(&(Kind::Claim, namespace.into(), name.clone()))
                {
                    Some(Ok(claim)) => claim,
                    Some(Err(reason)) => return Err(waiting(reason.clone())),
                    None => {
                        return Err(waiting(format!(
                            "persistentvolumeclaim {name:?} not fetched yet"
                        )));
                    }
                };
                if claim.block != *block {
                    let (mode, used) = if claim.block {
                        ("Block", "a filesystem (volumeMounts)")
                    } else {
                        ("Filesystem", "a raw block device (volumeDevices)")
                    };
                    return Err(waiting(format!(
                        "persistentvolumeclaim {name:?} is bound to a volume of volumeMode \
                         {mode}; the pod uses it as {used}"
                    )));
                }
                let csi = self
                    .csi
                    .as_ref()
                    .ok_or_else(|| waiting("this node runs no CSI node plugin".into()))?;
                let target = csi
                    .publish(&dir, claim, *read_only)
                    .await
                    .map_err(|e| waiting(super::error_chain(&e)))?;
                dirs.insert(v.name.clone(), target);
                continue;
            }
            let tmpfs = match &v.source {
                Source::EmptyDir { memory, size_limit } => memory.then_some(*size_limit),
                Source::Secret(_) => Some(None),
                Source::ConfigMap(_) | Source::Claim { .. } => None,
            };
            if let Some(size) = tmpfs
                && !slipway_dataplane::mounts::is_mount_point(&dir).map_err(io("read mounts"))?
            {
                slipway_dataplane::mounts::mount_tmpfs(&dir, size, 0o777)
                    .map_err(|e| io("mount a tmpfs")(io::Error::other(e.to_string())))?;
            }
            let projected = match &v.source {
                Source::EmptyDir { .. } | Source::Claim { .. } => None,
                Source::ConfigMap(p) => Some(project(Kind::ConfigMap, namespace, p, objects)),
                Source::Secret(p) => Some(project(Kind::Secret, namespace, p, objects)),
            };
            match projected {
                None => {
                    // Anyone in the pod writes an emptyDir (kubelet makes it 0777).
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                        .map_err(io("set its mode"))?;
                }
                Some(Err(reason)) => {
                    return Err(SetupError::Waiting {
                        volume: v.name.clone(),
                        reason,
                    });
                }
                Some(Ok(files)) => {
                    write_atomically(&dir, &files).map_err(io("write its files"))?;
                }
            }
            dirs.insert(v.name.clone(), dir);
        }
        Ok(dirs)
    }

    /// Removes the volumes of every pod not in `keep`, then unstages the claims' volumes no
    /// pod left on the node publishes; returns the uids whose volumes went, and the first
    /// failure (the rest is tried again at the next sweep).
    pub async fn sweep(&self, keep: &HashSet<String>) -> (Vec<String>, Option<io::Error>) {
        let mut removed = Vec::new();
        let mut remaining = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&uid) {
                remaining.push(entry.path());
                continue;
            }
            match self.tear_down(&uid).await {
                Ok(()) => removed.push(uid),
                Err(e) => return (removed, Some(e)),
            }
        }
        if let Some(csi) = &self.csi {
            let in_use = super::claims::published_ids(remaining.iter().map(PathBuf::as_path));
            if let Err(e) = csi.unstage_unused(&in_use).await {
                return (removed, Some(io::Error::other(super::error_chain(&e))));
            }
        }
        (removed, None)
    }

    /// Removes the pod's volumes: its claims unpublished through the CSI plugin, then whatever
    /// else is mounted there (tmpfs), then the directories.
    pub async fn tear_down(&self, uid: &str) -> io::Result<()> {
        let dir = self.pod_dir(uid);
        let claims = dir.join("volumes").join(super::claims::PLUGIN);
        for entry in std::fs::read_dir(&claims).into_iter().flatten().flatten() {
            let Some(csi) = &self.csi else {
                if std::fs::exists(entry.path().join("vol_data.json"))? {
                    return Err(io::Error::other(format!(
                        "{} holds a published claim and this node runs no CSI node plugin",
                        entry.path().display()
                    )));
                }
                continue;
            };
            csi.unpublish(&entry.path())
                .await
                .map_err(|e| io::Error::other(super::error_chain(&e)))?;
        }
        slipway_dataplane::mounts::unmount_below(&dir)
            .map_err(|e| io::Error::other(e.to_string()))?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::mounts::parse_mounts;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("pod")
    }

    #[test]
    fn volumes_and_mounts_parse_and_every_bad_field_is_named() {
        let p = pod(json!({"spec": {
            "volumes": [
                {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
                {"name": "conf", "configMap": {"name": "web", "items": [{"key": "a", "path": "x/a", "mode": 0o600}]}},
                {"name": "token", "secret": {"secretName": "t", "defaultMode": 0o400, "optional": true}},
                {"name": "conf", "emptyDir": {}},
                {"name": "host", "hostPath": {"path": "/etc"}},
                {"name": "bad", "configMap": {"name": "c", "items": [{"key": "k", "path": "../up"}]}},
                {"name": "worse", "secret": {"defaultMode": 0o1777}},
            ],
            "containers": [{"name": "c", "volumeMounts": [
                {"name": "scratch", "mountPath": "/tmp"},
                {"name": "nope", "mountPath": "/x"},
                {"name": "conf", "mountPath": "relative"},
                {"name": "conf", "mountPath": "/tmp/"},
            ]}],
        }}));
        let spec = p.spec.as_ref().expect("spec");
        let mut errors = Vec::new();
        let volumes = parse(spec, &mut errors);
        assert_eq!(
            volumes[0],
            VolumeSpec {
                name: "scratch".into(),
                source: Source::EmptyDir {
                    memory: true,
                    size_limit: Some(64 << 20)
                }
            }
        );
        let Source::ConfigMap(conf) = &volumes[1].source else {
            panic!("{volumes:?}")
        };
        assert_eq!(conf.items[0].mode, Some(0o600));
        assert_eq!(conf.default_mode, DEFAULT_MODE);
        let Source::Secret(token) = &volumes[2].source else {
            panic!("{volumes:?}")
        };
        assert!(token.optional && token.default_mode == 0o400);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.volumes[3].name",
                "spec.volumes[4]",
                "spec.volumes[5].configMap.items[0].path",
                "spec.volumes[6].secret.secretName",
                "spec.volumes[6].secret.defaultMode",
            ],
            "{errors:?}"
        );
        let rules = HashMap::from([("scratch".to_owned(), false), ("conf".to_owned(), true)]);
        let mut errors = Vec::new();
        let mounts = parse_mounts(
            &spec.containers[0],
            "spec.containers[0]",
            &rules,
            &mut errors,
        );
        assert_eq!(mounts.len(), 4);
        // API data is mounted read-only whatever the mount says; a scratch dir as asked.
        assert!(!mounts[0].read_only && mounts[3].read_only);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.containers[0].volumeMounts[1].name",
                "spec.containers[0].volumeMounts[2].mountPath",
                "spec.containers[0].volumeMounts[3].mountPath",
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn projections_take_the_keys_they_name_and_wait_for_what_is_missing() {
        let mut objects = Objects::default();
        let cm: ConfigMap = serde_json::from_value(json!({
            "data": {"a": "1", "b": "2"}, "binaryData": {"bin": "AAE="},
        }))
        .expect("cm");
        objects.insert_config_map("ns", "web", Some(&cm));
        objects.insert_config_map("ns", "gone", None);
        let all = Projection {
            name: "web".into(),
            items: vec![],
            default_mode: 0o644,
            optional: false,
        };
        let files = project(Kind::ConfigMap, "ns", &all, &objects).expect("files");
        assert_eq!(
            files,
            vec![
                ("a".into(), b"1".to_vec(), 0o644),
                ("b".into(), b"2".to_vec(), 0o644),
                ("bin".into(), vec![0, 1], 0o644),
            ]
        );
        let one = Projection {
            items: vec![Item {
                key: "b".into(),
                path: "d/b.txt".into(),
                mode: Some(0o600),
            }],
            ..all.clone()
        };
        assert_eq!(
            project(Kind::ConfigMap, "ns", &one, &objects).expect("item"),
            vec![("d/b.txt".into(), b"2".to_vec(), 0o600)]
        );
        let missing_key = Projection {
            items: vec![Item {
                key: "zz".into(),
                path: "zz".into(),
                mode: None,
            }],
            ..all.clone()
        };
        let err = project(Kind::ConfigMap, "ns", &missing_key, &objects).expect_err("key");
        assert!(err.contains("\"zz\""), "{err}");
        let gone = Projection {
            name: "gone".into(),
            ..all.clone()
        };
        let err = project(Kind::ConfigMap, "ns", &gone, &objects).expect_err("gone");
        assert_eq!(err, "configmap \"gone\" not found");
        let optional = Projection {
            optional: true,
            ..gone
        };
        assert_eq!(
            project(Kind::ConfigMap, "ns", &optional, &objects).expect("optional"),
            vec![]
        );
        let other_ns = project(Kind::ConfigMap, "other", &all, &objects).expect_err("unfetched");
        assert!(other_ns.contains("not fetched"), "{other_ns}");
    }

    #[test]
    fn references_name_each_object_once() {
        let a = pod(
            json!({"metadata": {"namespace": "ns"}, "spec": {"containers": [], "volumes": [
                {"name": "c", "configMap": {"name": "web"}},
                {"name": "s", "secret": {"secretName": "tok"}},
                {"name": "e", "emptyDir": {}},
            ]}}),
        );
        let b = pod(
            json!({"metadata": {"namespace": "ns"}, "spec": {"containers": [], "volumes": [
                {"name": "c", "configMap": {"name": "web"}},
            ]}}),
        );
        assert_eq!(
            references([&a, &b]),
            vec![
                (Kind::ConfigMap, "ns".into(), "web".into()),
                (Kind::Secret, "ns".into(), "tok".into()),
            ]
        );
    }
}
