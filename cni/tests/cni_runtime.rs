//! The README's conflist under a real container runtime: Debian's podman 4.3, whose CNI library
//! (1.1.x) checks the conflist's version against every plugin of the chain (Slipway, then
//! portmap) and parses their results. A container on that network gets an address of the host
//! block, and removing it (CNI DEL through the runtime) leaves nothing behind.
//! Privileged (root, BPF, netns, podman): run by scripts/test.sh.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Cluster, Leftovers};
use serde_json::Value;

/// The conflist of the README's "Installing the CNI on a node".
fn readme_conflist() -> Value {
    let readme = include_str!("../../README.md");
    let marker = "<<'CONF'\n";
    let start = readme.find(marker).expect("the README writes a conflist") + marker.len();
    let end = readme[start..]
        .find("\nCONF\n")
        .expect("the README's conflist ends");
    serde_json::from_str(&readme[start..start + end]).expect("the README's conflist is JSON")
}

/// A podman of its own: storage, run and temporary state, network configuration and plugin
/// directories under `dir`; its containers are removed on drop.
struct Podman {
    dir: PathBuf,
    netns: slipway_dataplane::world::Netns,
}

impl Podman {
    fn new(dir: &Path, netns: &slipway_dataplane::world::Netns, cni_path: &Path) -> Self {
        let net_d = dir.join("net.d");
        std::fs::create_dir_all(&net_d).expect("net.d");
        std::fs::create_dir_all(dir.join("tmp")).expect("tmp");
        // runc, not crun: crun refuses hybrid cgroup layouts like this machine's.
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{net_d}\"\n\
             cni_plugin_dirs = [\"{cni}\", \"/usr/lib/cni\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             events_logfile_path = \"{dir}/events.log\"\ntmp_dir = \"{dir}/tmp\"\n\
             runtime = \"runc\"\n",
            net_d = net_d.display(),
            cni = cni_path.display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("containers.conf");
        Self {
            dir: dir.to_owned(),
            netns: netns.clone(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let root = self.dir.join("root");
        let runroot = self.dir.join("runroot");
        let mut argv = vec![
            "podman",
            "--root",
            root.to_str().expect("utf-8"),
            "--runroot",
            runroot.to_str().expect("utf-8"),
            "--storage-driver",
            "vfs",
        ];
        argv.extend_from_slice(args);
        let mut cmd = self.netns.command(&argv);
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        cmd
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .command(&["rm", "--all", "--force", "--time", "0"])
            .output();
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + podman; run scripts/test.sh"
)]
fn the_readme_conflist_works_under_podman() {
    let cluster = Cluster::new(1, "vxlan");
    let node = cluster.node(1);
    let podman = Podman::new(&cluster.dir.join("podman"), &node.netns, &cluster.cni_path);
    let mut conflist = readme_conflist();
    // The test's agent keeps its state in its own data dir, as the README's key table says.
    conflist["plugins"][0]["dataDir"] = Value::String(node.data_dir.display().to_string());
    let network = conflist["name"].as_str().expect("name").to_owned();
    std::fs::write(
        podman.dir.join("net.d/10-slipway.conflist"),
        conflist.to_string(),
    )
    .expect("conflist");
    let rootfs = cluster.dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
    std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox"))
        .expect("busybox (Debian package busybox-static)");

    let out = podman
        .command(&[
            "run",
            "--rm",
            // Within this process's hard limits: podman's defaults for root (2^20 open files,
            // 4M processes) may be above them, and crun then fails to set them.
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=512:512",
            "--network",
            &network,
            "--rootfs",
            rootfs.to_str().expect("utf-8"),
            "/bin/busybox",
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "eth0",
        ])
        .output()
        .expect("podman (Debian package podman)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman run on the README's network: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let block: ipnetwork::Ipv4Network = node.block.parse().expect("block");
    let address = stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .unwrap_or_else(|| panic!("no IPv4 address on eth0: {stdout}"));
    assert!(block.contains(address), "{address} is outside {block}");
    assert_eq!(
        cluster.leftovers(1),
        Leftovers::default(),
        "podman's removal (CNI DEL) left something"
    );
}
