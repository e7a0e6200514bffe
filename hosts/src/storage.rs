//! Storage hosts: per zone, a netns host whose one process is a block store
//! (`slipway blockstore`) serving NBD over TLS on the host's underlay address, with a serving
//! certificate from the supervisor's CA for that address and the CA as the client CA (hosts
//! prove their names with their join certificates). Its data and control socket live outside
//! the host's data dir (`<root>/<zone>/`), so the supervisor on this machine reaches the control
//! socket, and a block store restarted — or a host made again — finds its volumes.
//!
//! The block store is a supervised child: [`StorageHosts::run`] checks each zone's control
//! socket every [`PERIOD`] and starts the block store again inside the host when it does not
//! answer. A block store refuses to start on a live socket, so two supervisors never run two.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::netns::NetnsProvider;
use crate::{HostProvider, HostSpec};

/// How often the block stores are checked.
pub const PERIOD: Duration = Duration::from_secs(2);

/// The NBD port block stores listen on (IANA's for NBD).
pub const NBD_PORT: u16 = 10809;

/// Issues a serving certificate for the given names (IP addresses): (cert PEM, key PEM).
pub type IssueServer = Arc<dyn Fn(&[String]) -> anyhow::Result<(String, String)> + Send + Sync>;

/// How storage hosts are made.
#[derive(Clone)]
pub struct StorageSettings {
    /// The block store command up to its flags: `[slipway, blockstore]`.
    pub command: Vec<String>,
    /// Where each zone's block store keeps its data, certificates and control socket
    /// (`<root>/<zone>/`), and where storage hosts' data dirs go (`<root>/hosts/`).
    pub root: PathBuf,
    /// The CA that signs the hosts' client certificates (the supervisor's).
    pub client_ca: PathBuf,
    /// Signs the block store's serving certificate.
    pub issue_server: IssueServer,
    /// CPU limit of a storage host, thousandths of a CPU.
    pub cpu_millis: u64,
    /// Memory limit of a storage host, bytes.
    pub memory_bytes: u64,
}

impl std::fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSettings")
            .field("command", &self.command)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// One zone's block store as the supervisor reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneStore {
    /// The zone.
    pub zone: String,
    /// Its control socket, on this machine.
    pub control: PathBuf,
    /// Where hosts reach its exports: `tcp:ADDRESS:PORT`.
    pub nbd: String,
}

/// The storage hosts of a netns provider's zones.
#[derive(Debug)]
pub struct StorageHosts {
    provider: Arc<NetnsProvider>,
    settings: StorageSettings,
}

/// The storage host of `zone`.
pub fn host_name(zone: &str) -> String {
    format!("storage-{zone}")
}

/// Whether something answers on the Unix socket at `path`.
fn answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

impl StorageHosts {
    /// Storage hosts made by `provider`.
    pub fn new(provider: Arc<NetnsProvider>, settings: StorageSettings) -> Self {
        Self { provider, settings }
    }

    fn zone_dir(&self, zone: &str) -> PathBuf {
        self.settings.root.join(zone)
    }

    /// Makes the zone's storage host and starts its block store, unless both are there;
    /// returns how the supervisor reaches it.
    pub async fn ensure(&self, zone: &str) -> anyhow::Result<ZoneStore> {
        let spec = HostSpec {
            name: host_name(zone),
            zone: zone.to_owned(),
            cpu_millis: self.settings.cpu_millis,
            memory_bytes: self.settings.memory_bytes,
            data_root: self.settings.root.join("hosts"),
            // Its process is started here, once its address is known (the certificate names it).
            agent: Vec::new(),
        };
        let handle = self
            .provider
            .create(&spec)
            .await
            .with_context(|| format!("storage host of zone {zone}"))?;
        let dir = self.zone_dir(zone);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let control = dir.join("control.sock");
        let store = ZoneStore {
            zone: zone.to_owned(),
            control: control.clone(),
            nbd: format!("tcp:{}:{NBD_PORT}", handle.address),
        };
        if answers(&control) {
            return Ok(store);
        }
        // The serving certificate names the address (the NBD client checks it); made again when
        // the host got another address.
        let names = vec![handle.address.to_string()];
        let names_file = dir.join("tls.names");
        if std::fs::read_to_string(&names_file).ok().as_deref() != Some(names[0].as_str()) {
            let (cert, key) = (self.settings.issue_server)(&names)?;
            crate::reconciler::write_private(&dir.join("tls.key"), &key)?;
            std::fs::write(dir.join("tls.crt"), cert)?;
            std::fs::write(&names_file, &names[0])?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("blockstore.log"))?;
        let mut command = Command::new(&self.settings.command[0]);
        command
            .args(&self.settings.command[1..])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--control")
            .arg(&control)
            .arg("--listen")
            .arg(format!("{}:{NBD_PORT}", handle.address))
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .arg("--tls-client-ca")
            .arg(&self.settings.client_ca)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = slipway_dataplane::cgroup::spawn_in(
            &mut command,
            &slipway_dataplane::netns::path(&handle.netns),
            &self.provider.layout().procs_files(&handle.netns),
        )
        .with_context(|| format!("starting the block store of zone {zone}"))?;
        let pid = child.id();
        let name = spec.name.clone();
        std::thread::spawn(move || match child.wait() {
            Ok(status) => info!(host = %name, pid, %status, "block store exited"),
            Err(error) => warn!(host = %name, pid, %error, "could not reap the block store"),
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answers(&control) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the block store of zone {zone} did not open {} within 20s; see {}",
                control.display(),
                dir.join("blockstore.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(zone, host = %spec.name, pid, nbd = %store.nbd, "block store serving");
        Ok(store)
    }

    /// Keeps every zone's block store running until the task is dropped.
    pub async fn run(self, zones: Vec<String>) {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for zone in &zones {
                if let Err(e) = self.ensure(zone).await {
                    warn!(zone = %zone, error = %format!("{e:#}"), "storage host");
                }
            }
        }
    }
}
