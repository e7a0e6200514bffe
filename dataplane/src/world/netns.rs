//! A handle on one named network namespace of a test world: run `ip` against it, run commands
//! inside it, start background processes that die with their guard.

use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::DataplaneError;
use crate::link::parse_mac;

/// A network namespace known by name (see [`crate::netns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

/// A link's index, MAC address and MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A link's 64-bit packet and byte counters, as the kernel keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// A process started inside a namespace; killed and reaped on drop.
#[derive(Debug)]
pub struct Process {
    /// `None` once [`Process::wait`] has taken it.
    child: Option<Child>,
    what: String,
}

impl Netns {
    pub fn named(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`; fails with ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String, DataplaneError> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `argv` inside the namespace and returns its output, whatever its exit status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output, DataplaneError> {
        self.command(argv)
            .output()
            .map_err(|e| DataplaneError::Command {
                command: argv.join(" "),
                detail: e.to_string(),
            })
    }

    /// Runs `argv` inside the namespace; fails unless it exits 0. Returns its stdout.
    pub fn run(&self, argv: &[&str]) -> Result<String, DataplaneError> {
        checked(&argv.join(" "), self.exec(argv)?)
    }

    /// Starts `argv` inside the namespace in the background.
    pub fn spawn(&self, argv: &[&str]) -> Result<Process, DataplaneError> {
        let child = self
            .command(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| DataplaneError::Command {
                command: argv.join(" "),
                detail: e.to_string(),
            })?;
        Ok(Process {
            child: Some(child),
            what: argv.join(" "),
        })
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<(), DataplaneError> {
        let mut argv = vec!["sysctl", "-q", "-w"];
        argv.extend_from_slice(settings);
        self.run(&argv).map(drop)
    }

    /// The index and MAC of link `ifname`.
    pub fn link(&self, ifname: &str) -> Result<LinkInfo, DataplaneError> {
        let link = self.link_json(&["-j", "link", "show", "dev", ifname])?;
        let ifindex = link["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok());
        let mac = link["address"].as_str().and_then(parse_mac);
        let mtu = link["mtu"].as_u64().and_then(|m| u32::try_from(m).ok());
        match (ifindex, mac, mtu) {
            (Some(ifindex), Some(mac), Some(mtu)) => Ok(LinkInfo { ifindex, mac, mtu }),
            _ => Err(parse_error(
                &format!("ip link show dev {ifname}"),
                "no ifindex, address or mtu",
            )),
        }
    }

    /// The counters of link `ifname`.
    pub fn link_stats(&self, ifname: &str) -> Result<LinkStats, DataplaneError> {
        let link = self.link_json(&["-j", "-s", "link", "show", "dev", ifname])?;
        let stats = &link["stats64"];
        let get = |dir: &str, what: &str| {
            stats[dir][what].as_u64().ok_or_else(|| {
                parse_error(
                    &format!("ip -s link show dev {ifname}"),
                    &format!("no {dir}.{what}"),
                )
            })
        };
        Ok(LinkStats {
            rx_packets: get("rx", "packets")?,
            rx_bytes: get("rx", "bytes")?,
            tx_packets: get("tx", "packets")?,
            tx_bytes: get("tx", "bytes")?,
        })
    }

    /// Waits until something listens on TCP `port` inside the namespace.
    pub fn wait_tcp_listen(&self, port: u16, timeout: Duration) -> Result<(), DataplaneError> {
        let deadline = Instant::now() + timeout;
        let filter = format!("sport = :{port}");
        loop {
            let out = self.run(&["ss", "-H", "-l", "-t", "-n", &filter])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DataplaneError::Command {
                    command: format!("wait for tcp listener on :{port} in {}", self.name),
                    detail: format!("nothing listened within {timeout:?}"),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills every process inside the namespace (SIGKILL).
    pub fn kill_all(&self) {
        for pid in crate::netns::pids(&self.name) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// `argv` as a command that runs inside the namespace, for callers that set its
    /// environment or stdin. It enters only the network namespace (nsenter), unlike
    /// `ip netns exec`, which also remounts /sys and so hides bpffs at /sys/fs/bpf: processes
    /// here share the pinned datapath with the rest of the machine, as on a real host.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!(
                "--net={}",
                crate::netns::path(&self.name).display()
            ))
            .arg("--")
            .args(argv);
        command
    }

    fn link_json(&self, args: &[&str]) -> Result<Value, DataplaneError> {
        let what = args.join(" ");
        let text = self.ip(args)?;
        let mut links: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| parse_error(&what, &e.to_string()))?;
        if links.len() != 1 {
            return Err(parse_error(
                &what,
                &format!("{} links, expected 1", links.len()),
            ));
        }
        Ok(links.remove(0))
    }
}

impl Process {
    /// Waits for the process to exit by itself and returns its output; fails unless it exits 0.
    pub fn wait(mut self) -> Result<String, DataplaneError> {
        let Some(child) = self.child.take() else {
            return Ok(String::new());
        };
        let output = child
            .wait_with_output()
            .map_err(|e| DataplaneError::Command {
                command: self.what.clone(),
                detail: e.to_string(),
            })?;
        checked(&self.what, output)
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `program args` in the caller's namespace; fails unless it exits 0. Returns stdout.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, DataplaneError> {
    let command = format!("{program} {}", args.join(" "));
    let output =
        Command::new(program)
            .args(args)
            .output()
            .map_err(|e| DataplaneError::Command {
                command: command.clone(),
                detail: e.to_string(),
            })?;
    checked(&command, output)
}

fn checked(command: &str, output: Output) -> Result<String, DataplaneError> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(DataplaneError::Command {
            command: command.to_owned(),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

fn parse_error(command: &str, detail: &str) -> DataplaneError {
    DataplaneError::Parse {
        command: command.to_owned(),
        detail: detail.to_owned(),
    }
}
