//! Command-line types the `slipway` binary embeds: `slipway volume ...` and the daemon.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::config::ServeConfig;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::daemon::Daemon;

/// Default control socket of the block store daemon.
pub const DEFAULT_CONTROL: &str = "/run/slipway/blockstore.sock";

/// Where the daemon's control socket is.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Control socket of the block store daemon.
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
}

/// `slipway volume create|list|snapshot|clone|resize|delete`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a thin-provisioned volume.
    Create {
        /// Volume name (letters, digits, '.', '_', '-').
        name: String,
        /// Size, e.g. 1073741824, 512M, 10G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// List volumes and snapshots.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Take a read-only snapshot, exported as VOLUME@NAME.
    Snapshot {
        /// Volume to snapshot.
        volume: String,
        /// Snapshot name.
        name: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Create a writable clone of a snapshot.
    Clone {
        /// Snapshot, VOLUME@NAME.
        snapshot: String,
        /// New volume name.
        name: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Allow only these network clients (the DNS names their TLS certificates prove) to open
    /// a volume and its snapshots; no --client allows any.
    Authorize {
        /// Volume name.
        name: String,
        /// A client's name (repeat for several).
        #[arg(long = "client")]
        clients: Vec<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Grow a volume (online; new connections see the new size).
    Resize {
        /// Volume name.
        name: String,
        /// New size, e.g. 2G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Delete a volume (with its snapshots) or a snapshot.
    Delete {
        /// Volume or VOLUME@SNAPSHOT.
        name: String,
        /// Also delete clones that depend on it.
        #[arg(long)]
        cascade: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

/// Parses `4096`, `512K`, `64M`, `10G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit {c:?} (use K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl VolumeCommand {
    /// The control request this command sends, and the socket to send it to.
    pub fn request(&self) -> (ControlRequest, PathBuf) {
        match self {
            Self::Create {
                name,
                size,
                control,
            } => (
                ControlRequest::Create {
                    name: name.clone(),
                    size: *size,
                },
                control.control.clone(),
            ),
            Self::List { control, .. } => (ControlRequest::List {}, control.control.clone()),
            Self::Snapshot {
                volume,
                name,
                control,
            } => (
                ControlRequest::Snapshot {
                    volume: volume.clone(),
                    name: name.clone(),
                },
                control.control.clone(),
            ),
            Self::Clone {
                snapshot,
                name,
                control,
            } => (
                ControlRequest::Clone {
                    snapshot: snapshot.clone(),
                    name: name.clone(),
                },
                control.control.clone(),
            ),
            Self::Authorize {
                name,
                clients,
                control,
            } => (
                ControlRequest::Authorize {
                    name: name.clone(),
                    clients: clients.clone(),
                },
                control.control.clone(),
            ),
            Self::Resize {
                name,
                size,
                control,
            } => (
                ControlRequest::Resize {
                    name: name.clone(),
                    size: *size,
                },
                control.control.clone(),
            ),
            Self::Delete {
                name,
                cascade,
                control,
            } => (
                ControlRequest::Delete {
                    name: name.clone(),
                    cascade: *cascade,
                },
                control.control.clone(),
            ),
        }
    }

    /// Sends the request to the daemon and prints the result on stdout.
    pub fn run(self) -> anyhow::Result<()> {
        let (req, path) = self.request();
        let resp = control::call_blocking(&path, &req)
            .with_context(|| format!("{} failed", op_name(&req)))?;
        let json = matches!(self, Self::List { json: true, .. });
        print_response(&resp, json)
    }
}

fn op_name(req: &ControlRequest) -> &'static str {
    match req {
        ControlRequest::Create { .. } => "volume create",
        ControlRequest::List {} => "volume list",
        ControlRequest::Snapshot { .. } => "volume snapshot",
        ControlRequest::Clone { .. } => "volume clone",
        ControlRequest::Resize { .. } => "volume resize",
        ControlRequest::Authorize { .. } => "volume authorize",
        ControlRequest::Delete { .. } => "volume delete",
    }
}

fn print_response(resp: &ControlResponse, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &resp.volumes)?;
        writeln!(out)?;
        return Ok(());
    }
    for name in &resp.deleted {
        writeln!(out, "deleted {name}")?;
    }
    if !resp.volumes.is_empty() {
        writeln!(
            out,
            "{:<32} {:<9} {:>14} {:>14}  ORIGIN",
            "NAME", "KIND", "SIZE", "ALLOCATED"
        )?;
        for v in &resp.volumes {
            writeln!(
                out,
                "{:<32} {:<9} {:>14} {:>14}  {}",
                v.name,
                v.kind,
                v.size,
                v.allocated,
                v.origin.as_deref().unwrap_or("-")
            )?;
        }
    }
    Ok(())
}

/// The block store daemon (`slipway blockstore serve` or similar).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// JSON config file (`ServeConfig`); flags given on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// NBD over TCP, ADDR:PORT (port 0 picks a free port; see the ready line).
    #[arg(long)]
    pub listen: Option<String>,
    /// NBD over a Unix socket at PATH.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Control API socket.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Prometheus metrics endpoint, ADDR:PORT.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Extent (copy-on-write unit) size for a new data directory, in bytes.
    #[arg(long)]
    pub extent_size: Option<u64>,
    /// TLS on the TCP listener: the server's certificate chain (PEM); with --tls-key and
    /// --tls-client-ca, TCP clients must use STARTTLS with a client certificate.
    #[arg(long, requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_client_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs client certificates; their DNS names are what export
    /// allow-lists (`slipway volume authorize`) name.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServeArgs {
    /// The effective configuration (file, then flags).
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        let mut cfg = match &self.config {
            Some(path) => ServeConfig::from_file(path)?,
            None => ServeConfig {
                data_dir: self
                    .data_dir
                    .clone()
                    .context("--data-dir is required without --config")?,
                listen: None,
                unix: None,
                control: PathBuf::from(DEFAULT_CONTROL),
                metrics: None,
                extent_size: crate::format::DEFAULT_EXTENT_SIZE,
                tls: None,
            },
        };
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        if self.listen.is_some() {
            cfg.listen = self.listen.clone();
        }
        if self.unix.is_some() {
            cfg.unix = self.unix.clone();
        }
        if let Some(c) = &self.control {
            cfg.control = c.clone();
        }
        if self.metrics.is_some() {
            cfg.metrics = self.metrics.clone();
        }
        if let Some(e) = self.extent_size {
            cfg.extent_size = e;
        }
        if let (Some(cert), Some(key), Some(client_ca)) =
            (&self.tls_cert, &self.tls_key, &self.tls_client_ca)
        {
            cfg.tls = Some(crate::config::TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Runs the daemon until SIGINT or SIGTERM, then stops cleanly ([`Daemon::shutdown`]:
    /// everything acknowledged is flushed). Builds its own tokio runtime; prints one ready
    /// line on stdout once every listener is bound.
    pub fn run(self) -> anyhow::Result<()> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            // No colour codes in log files and journals.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
        let cfg = self.config()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        rt.block_on(async move {
            let daemon = Daemon::start(&cfg).await?;
            {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", daemon.ready_line())?;
                out.flush()?;
            }
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping: finishing requests in flight, then flushing every volume");
            let flushed = daemon
                .shutdown()
                .await
                .context("flushing the volumes on stop failed")?;
            tracing::info!(
                volumes = flushed,
                "stopped; every acknowledged write is durable"
            );
            anyhow::Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: VolumeCommand,
    }

    #[test]
    fn parses_volume_commands() {
        let cli = Cli::try_parse_from([
            "x",
            "create",
            "pvc-1",
            "--size",
            "64M",
            "--control",
            "/tmp/s",
        ])
        .expect("parse");
        let (req, path) = cli.cmd.request();
        assert_eq!(
            req,
            ControlRequest::Create {
                name: "pvc-1".into(),
                size: 64 << 20
            }
        );
        assert_eq!(path, PathBuf::from("/tmp/s"));
        let cli = Cli::try_parse_from(["x", "delete", "v@s", "--cascade"]).expect("parse");
        assert!(matches!(
            cli.cmd.request().0,
            ControlRequest::Delete { cascade: true, .. }
        ));
        assert!(Cli::try_parse_from(["x", "create", "v", "--size", "12Q"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
