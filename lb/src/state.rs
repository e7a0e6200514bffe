//! The controller's state on disk, so that a restarted daemon knows every service the pinned
//! datapath still serves: each service with its VIP and the ids its ports and backends have in
//! the maps. The controller writes it before it touches the maps (as the CNI agent records an
//! allocation before it programs it), by an atomic replace: a crash at any line leaves either
//! the old file or the new one, never a torn one, and never maps the file does not know of.

use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LbError;
use crate::config::{Protocol, ServiceSpec};

/// The file's name in the state directory.
pub const STATE_FILE: &str = "lb-state.json";
/// Format version of [`SavedState`]; a file of another version is refused.
const VERSION: u32 = 1;

/// Everything the controller needs to take over the maps it left.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SavedState {
    pub version: u32,
    pub services: Vec<SavedService>,
    pub backends: Vec<SavedBackend>,
    /// Where the round-robin backend id allocation goes on.
    pub next_backend: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SavedService {
    pub spec: ServiceSpec,
    pub vip: IpAddr,
    pub ports: Vec<SavedPort>,
}

/// A service port and its service id (`lb_services` value, ring and counters index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SavedPort {
    pub protocol: Protocol,
    pub port: u16,
    pub id: u32,
}

/// A backend id: of one backend address of one service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SavedBackend {
    pub service_id: u32,
    pub addr: SocketAddr,
    pub id: u32,
    /// Left its service but still carries flows.
    #[serde(default)]
    pub draining: bool,
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

fn io(call: &'static str) -> impl FnOnce(std::io::Error) -> LbError {
    move |source| LbError::Syscall { call, source }
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(STATE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; none if nothing was ever saved here.
    pub fn load(&self) -> Result<Option<SavedState>, LbError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read LB state file")(e)),
        };
        let bad = |problem: String| LbError::Invalid {
            what: "LB state file",
            errors: vec![slipway_api::FieldError::new(
                self.path.display().to_string(),
                slipway_api::FieldReason::Invalid,
                problem,
            )],
        };
        let state: SavedState = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if state.version != VERSION {
            return Err(bad(format!(
                "version {} (this LB reads {VERSION})",
                state.version
            )));
        }
        Ok(Some(state))
    }

    /// Replaces the file with `state`, atomically and durably: written to a temporary file,
    /// synced, renamed over the old one, and the directory synced.
    pub fn save(&self, state: &SavedState) -> Result<(), LbError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io("create LB state directory"))?;
        let mut state = state.clone();
        state.version = VERSION;
        let json = serde_json::to_vec_pretty(&state)
            .map_err(|e| LbError::Api(format!("encoding LB state: {e}")))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = fs::File::create(&tmp).map_err(io("create LB state file"))?;
        file.write_all(&json).map_err(io("write LB state file"))?;
        file.sync_all().map_err(io("fsync LB state file"))?;
        fs::rename(&tmp, &self.path).map_err(io("rename LB state file"))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync LB state directory"))
    }
}

/// Removes the state file in `dir` (what `slipway lb teardown` does); returns what it removed.
pub fn remove(dir: &Path) -> Result<Vec<PathBuf>, LbError> {
    let path = StateFile::new(dir).path;
    match fs::remove_file(&path) {
        Ok(()) => Ok(vec![path]),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io("remove LB state file")(e)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scratch directory of this test, removed on drop (on panic too).
    pub(crate) struct ScratchDir(pub(crate) PathBuf);

    impl ScratchDir {
        pub(crate) fn new(label: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "slipway-lb-{label}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn saves_atomically_and_loads_back_and_refuses_other_versions() {
        let scratch = ScratchDir::new("state");
        let dir = scratch.0.clone();
        let file = StateFile::new(&dir);
        assert_eq!(file.load().expect("load"), None, "nothing saved yet");
        let spec: ServiceSpec = serde_json::from_str(
            r#"{"namespace":"default","name":"web","ports":[{"port":80}],
                "backends":[{"ip":"10.99.0.3"}]}"#,
        )
        .expect("spec");
        let state = SavedState {
            version: VERSION,
            services: vec![SavedService {
                spec,
                vip: "10.99.100.1".parse().expect("ip"),
                ports: vec![SavedPort {
                    protocol: Protocol::Tcp,
                    port: 80,
                    id: 3,
                }],
            }],
            backends: vec![SavedBackend {
                service_id: 3,
                addr: "10.99.0.3:80".parse().expect("addr"),
                id: 7,
                draining: false,
            }],
            next_backend: 8,
        };
        file.save(&state).expect("save");
        assert_eq!(file.load().expect("load"), Some(state.clone()));
        assert!(
            !file.path().with_extension("json.tmp").exists(),
            "the temporary file was renamed"
        );

        let text = fs::read_to_string(file.path())
            .expect("read")
            .replace("\"version\": 1", "\"version\": 99");
        fs::write(file.path(), text).expect("write");
        let err = file.load().expect_err("another version");
        assert!(err.to_string().contains("version 99"), "{err}");

        assert_eq!(remove(&dir).expect("remove"), vec![file.path().to_owned()]);
        assert_eq!(file.load().expect("load"), None);
    }
}
