//! What a node needs before its pods can run, done by the agent itself on a host it owns (what
//! the DaemonSet's init container and `ctr images import` do on users' nodes): the CNI conflist
//! and plugins containerd calls, and the images a host without a registry starts with.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnetwork::Ipv4Network;
use serde_json::json;
use tracing::info;

/// The conflist the agent installs, in `--cni-conf-dir`.
pub const CONFLIST: &str = "10-slipway.conflist";

/// Debian's reference CNI plugins (package containernetworking-plugins): portmap for the chain,
/// loopback for the sandbox's `lo`.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The agent's flags for preparing its node.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NodeSetupArgs {
    /// Install the CNI for the host's containerd: the conflist (Slipway's plugin chained with
    /// portmap, the agent's --pod-cidr and --data-dir) in --cni-conf-dir, and in --cni-bin-dir
    /// the plugin (`slipway-cni` beside this binary) as `slipway` with Debian's reference
    /// plugins. Off by default: on users' nodes the DaemonSet installs them.
    #[arg(long = "install-cni")]
    pub install_cni: bool,
    /// Import every image archive (`*.tar`, OCI or docker, as `slipway image import` takes
    /// them) in this directory into the host's containerd at start, before any pod runs.
    #[arg(long = "image-dir")]
    pub image_dir: Option<PathBuf>,
    /// The cgroup the pods run under (a path from each hierarchy's root, as runc's cgroupfs
    /// driver takes it). `own`: below the agent's own cgroup, `<own>/pods`, so a host's limits
    /// hold its pods and removing the host's cgroups stops them (the netns hosts' setting).
    /// Default: `/slipway-pods/<node>`.
    #[arg(long = "pod-cgroup-parent")]
    pub pod_cgroup_parent: Option<String>,
}

impl NodeSetupArgs {
    /// Both flags prepare the host's containerd: refused without one.
    pub fn check(&self, containerd: bool) -> anyhow::Result<()> {
        if containerd {
            return Ok(());
        }
        anyhow::ensure!(
            !self.install_cni,
            "--install-cni: needs --containerd-dir (the pod runtime it is for)"
        );
        anyhow::ensure!(
            self.image_dir.is_none(),
            "--image-dir: needs --containerd-dir (the pod runtime it is for)"
        );
        Ok(())
    }

    /// Installs the CNI (if asked) for a node of `pod_cidr` whose agent keeps its state in
    /// `data_dir`.
    pub fn install_cni(
        &self,
        pod_cidr: Ipv4Network,
        data_dir: &Path,
        conf_dir: &Path,
        bin_dir: &Path,
    ) -> anyhow::Result<()> {
        if !self.install_cni {
            return Ok(());
        }
        let plugin = std::env::current_exe()
            .context("the slipway binary")?
            .with_file_name("slipway-cni");
        anyhow::ensure!(
            plugin.exists(),
            "--install-cni: the plugin {} is missing (it ships beside slipway)",
            plugin.display()
        );
        std::fs::create_dir_all(bin_dir)
            .with_context(|| format!("--cni-bin-dir: creating {}", bin_dir.display()))?;
        let mut links = vec![("slipway".to_owned(), plugin)];
        for entry in std::fs::read_dir(REFERENCE_PLUGINS).with_context(|| {
            format!(
                "--install-cni: {REFERENCE_PLUGINS} (Debian package containernetworking-plugins)"
            )
        })? {
            let entry = entry?;
            links.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            ));
        }
        for (name, target) in links {
            let link = bin_dir.join(&name);
            if std::fs::read_link(&link).is_ok_and(|t| t == target) {
                continue;
            }
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "slipway",
            "plugins": [
                {"type": "slipway", "podCIDR": pod_cidr.to_string(),
                 "dataDir": data_dir.display().to_string(),
                 "capabilities": {"ips": true, "mac": true}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        crate::run::write_atomically(
            &conf_dir.join(CONFLIST),
            serde_json::to_string_pretty(&conflist)?.as_bytes(),
        )
        .with_context(|| {
            format!(
                "--cni-conf-dir: writing {}",
                conf_dir.join(CONFLIST).display()
            )
        })?;
        info!(conf = %conf_dir.join(CONFLIST).display(), bin = %bin_dir.display(), "CNI installed");
        Ok(())
    }

    /// Imports the archives of --image-dir into the containerd at `socket`; returns their names.
    pub fn import_images(&self, socket: &Path) -> anyhow::Result<Vec<String>> {
        let Some(dir) = &self.image_dir else {
            return Ok(Vec::new());
        };
        let mut archives: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("--image-dir: reading {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        archives.sort();
        let mut names = Vec::new();
        for archive in archives {
            let imported = crate::pods::image::import_archive(socket, &archive, None)
                .map_err(|e| anyhow::anyhow!(crate::pods::error_chain(&e)))
                .with_context(|| format!("--image-dir: importing {}", archive.display()))?;
            info!(archive = %archive.display(), images = ?imported, "image imported");
            names.extend(imported);
        }
        Ok(names)
    }
}

impl NodeSetupArgs {
    /// The cgroup the pods of `node` run under (see --pod-cgroup-parent).
    pub fn pod_cgroup_parent(&self, node: &str) -> anyhow::Result<String> {
        match self.pod_cgroup_parent.as_deref() {
            None => Ok(format!("/slipway-pods/{node}")),
            Some("own") => {
                let text = std::fs::read_to_string("/proc/self/cgroup")
                    .context("--pod-cgroup-parent own: reading /proc/self/cgroup")?;
                let own = own_cgroup(&text).context(
                    "--pod-cgroup-parent own: the agent runs in the root cgroup, which holds no pods",
                )?;
                Ok(format!("{}/pods", own.trim_end_matches('/')))
            }
            Some(path) if path.starts_with('/') && path.len() > 1 => Ok(path.to_owned()),
            Some(path) => anyhow::bail!(
                "--pod-cgroup-parent: {path:?} is neither `own` nor an absolute cgroup path"
            ),
        }
    }
}

/// The memory controller's path in `/proc/self/cgroup` (v1), or the unified one (v2); None for
/// the root.
fn own_cgroup(text: &str) -> Option<String> {
    let entries: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?, parts.next()?))
        })
        .collect();
    let memory = entries
        .iter()
        .find(|(controllers, _)| controllers.split(',').any(|c| c == "memory"));
    let path = match memory {
        Some((_, path)) => *path,
        None => entries.iter().find(|(c, _)| c.is_empty())?.1,
    };
    (path != "/" && !path.is_empty()).then(|| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::own_cgroup;

    #[test]
    fn the_agent_cgroup_is_read_from_v1_memory_or_v2() {
        let hybrid = "12:memory:/slipway-h1\n4:cpu,cpuacct:/slipway-h1\n0::/slipway-h1\n";
        assert_eq!(own_cgroup(hybrid).as_deref(), Some("/slipway-h1"));
        assert_eq!(
            own_cgroup("0::/system.slice/x.service\n").as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(own_cgroup("12:memory:/\n0::/\n"), None);
        assert_eq!(own_cgroup(""), None);
    }
}
