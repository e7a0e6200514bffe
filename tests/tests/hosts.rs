//! The supervisor provisions hosts: `slipway supervisor --host-provider netns` turns Host objects
//! into network-namespace hosts whose agents join it (`slipway join` with a bootstrap token bound
//! to the host, through the provider's uplink), register, renew their Lease and go Ready. Killed
//! with kill -9 while a host is being made, the restarted supervisor converges without making a
//! host twice; a deleted Host leaves nothing; bad Hosts are refused with the field named.
//! Privileged (root, netns, cgroups): run by scripts/test.sh.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use serde_json::{Value, json};
use slipway_hosts::HostProvider as _;
use slipway_hosts::netns::{NetnsConfig, NetnsProvider};

fn slipway_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("slipway"))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} is missing: run with `cargo test --workspace`",
        path.display()
    );
    path
}

fn gvk(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("slipway.dev", "v1alpha1", kind),
        plural,
    )
}

/// A supervisor provisioning netns hosts with a prefix of its own, over a temporary data dir;
/// on drop (panics too) it is killed and everything with its prefix is torn down.
struct World {
    dir: tempfile::TempDir,
    prefix: String,
    uplink: String,
    port: u16,
    child: Option<Child>,
}

impl World {
    fn new() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let id = hasher.finish() as u32 & 0xff_ffff;
        let dir = tempfile::Builder::new()
            .prefix("slipway-e2e-hosts-")
            .tempdir()
            .expect("dir");
        // A port that is free now, kept across restarts (joined hosts' kubeconfigs name it).
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut w = Self {
            dir,
            prefix: format!("slipway-e{id:06x}-"),
            uplink: format!("slwu{id:06x}"),
            port,
            child: None,
        };
        w.start();
        w
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("supervisor.log"))
            .expect("log");
        let mut child = Command::new(slipway_binary())
            .args(["supervisor", "--data-dir"])
            .arg(self.dir.path().join("sup"))
            .args(["--listen", &format!("0.0.0.0:{}", self.port)])
            .args(["--host-provider", "netns", "--zones", "za,zb"])
            .args([
                "--underlay",
                "10.123.0.0/16",
                "--netns-prefix",
                &self.prefix,
            ])
            .args(["--uplink-device", &self.uplink])
            .args([
                "--host-lease-interval",
                "250ms",
                "--host-lease-duration",
                "1s",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn supervisor");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("supervisor output");
        self.child = Some(child);
        assert!(
            line.contains("https://"),
            "supervisor did not start: {line:?}\n{}",
            self.log()
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("supervisor.log")).unwrap_or_default()
    }

    fn provider(&self) -> NetnsProvider {
        let mut config = NetnsConfig::new(
            &self.prefix,
            self.dir.path().join("sup/hosts/state"),
            &["za", "zb"],
        );
        config.underlay = "10.123.0.0/16".parse().expect("cidr");
        config.uplink_device = Some(self.uplink.clone());
        NetnsProvider::new(config).expect("provider")
    }

    async fn client(&self) -> kube::Client {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(self.dir.path().join("sup/admin.kubeconfig"))
                .expect("kubeconfig"),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("config");
        kube::Client::try_from(config).expect("client")
    }

    /// Everything with the world's prefix the kernel still has.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for dir in [
            "/run/netns",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/unified",
            "/sys/fs/bpf",
        ] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
        if Path::new("/sys/class/net").join(&self.uplink).exists() {
            found.push(format!("link {}", self.uplink));
        }
        found
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill9();
        let provider = self.provider();
        let _ = slipway_dataplane::underlay::block_on(provider.teardown());
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition<'a>(host: &'a DynamicObject, kind: &str) -> Option<&'a Value> {
    host.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

async fn ready(hosts: &Api<DynamicObject>, name: &str) -> Option<DynamicObject> {
    let h = hosts.get_opt(name).await.ok()??;
    (condition(&h, "Ready")?["status"] == "True" && h.data["status"]["phase"] == "Running")
        .then_some(h)
}

async fn create_host(hosts: &Api<DynamicObject>, name: &str, zone: &str, class: &str) {
    let mut h = DynamicObject::new(name, &gvk("Host", "hosts"));
    h.data = json!({"spec": {"zone": zone, "hostClass": class, "provider": "netns"}});
    hosts
        .create(&PostParams::default(), &h)
        .await
        .expect("create Host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups; run with --ignored"]
async fn hosts_are_provisioned_join_go_ready_survive_a_supervisor_kill_and_leave_nothing() {
    let mut world = World::new();
    let client = world.client().await;
    for (kind, plural, name, spec) in [
        ("Zone", "zones", "za", json!({})),
        ("Zone", "zones", "zb", json!({})),
        (
            "HostClass",
            "hostclasses",
            "small",
            json!({"cpus": 1, "memory": "256Mi"}),
        ),
    ] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &gvk(kind, plural));
        let mut o = DynamicObject::new(name, &gvk(kind, plural));
        o.data = json!({"spec": spec});
        api.create(&PostParams::default(), &o).await.expect(name);
    }
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    let started = Instant::now();
    create_host(&hosts, "h1", "za", "small").await;
    create_host(&hosts, "h2", "zb", "small").await;
    for (name, subnet) in [("h1", "10.123.0."), ("h2", "10.123.1.")] {
        let h = wait_for(&format!("{name} Ready"), Duration::from_secs(30), || {
            ready(&hosts, name)
        })
        .await;
        let address = h.data["status"]["address"].as_str().unwrap_or_default();
        assert!(address.starts_with(subnet), "{name} at {address}");
        assert!(
            h.metadata
                .finalizers
                .iter()
                .flatten()
                .any(|f| f == "slipway.dev/host-provider"),
            "{name} carries the provider's finalizer"
        );
        assert_eq!(
            condition(&h, "Provisioned").map(|c| c["status"].clone()),
            Some(json!("True"))
        );
    }
    eprintln!(
        "2 hosts Ready {:?} after their Hosts were created",
        started.elapsed()
    );
    let provider = world.provider();
    let status = provider.status("h1").await.expect("h1 status");
    assert!(!status.pids.is_empty(), "h1's agent runs in its cgroups");

    // kill -9 the supervisor right after a Host is created, then restart it: the host is made
    // once, and the hosts made before keep (or regain) their Lease.
    create_host(&hosts, "h3", "za", "small").await;
    world.kill9();
    world.start();
    let client = world.client().await;
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    for name in ["h1", "h2", "h3"] {
        wait_for(
            &format!("{name} Ready after the restart"),
            Duration::from_secs(30),
            || ready(&hosts, name),
        )
        .await;
    }
    let made: Vec<String> = provider
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|h| h.spec.name)
        .collect();
    assert_eq!(made, ["h1", "h2", "h3"], "every Host made once");

    // Bad Hosts: refused with the field named, nothing made.
    create_host(&hosts, "bad-class", "za", "nope").await;
    create_host(&hosts, "bad-zone", "zc", "small").await;
    for (name, needle) in [("bad-class", "spec.hostClass"), ("bad-zone", "zone")] {
        let h = wait_for(
            &format!("{name} refused"),
            Duration::from_secs(10),
            || async {
                let h = hosts.get_opt(name).await.ok()??;
                (condition(&h, "Provisioned")?["status"] == "False").then_some(h)
            },
        )
        .await;
        let message = condition(&h, "Provisioned")
            .map(|c| c["message"].to_string())
            .unwrap_or_default();
        assert!(message.contains(needle), "{name}: {message}");
    }
    let made: Vec<String> = provider
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|h| h.spec.name)
        .collect();
    assert_eq!(made, ["h1", "h2", "h3"], "nothing made for bad Hosts");

    // Delete: the Host goes once its host is torn down, with its bootstrap token.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "slipway-system");
    for name in ["h1", "h2", "h3", "bad-class", "bad-zone"] {
        hosts
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    wait_for("every Host gone", Duration::from_secs(30), || async {
        hosts
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    let tokens = secrets
        .list(&ListParams::default().labels("slipway.dev/host"))
        .await
        .expect("secrets");
    assert!(
        tokens.items.is_empty(),
        "bootstrap tokens left: {:?}",
        tokens.items.len()
    );
    assert!(provider.list().await.expect("list").is_empty());
    assert_eq!(world.leftovers(), Vec::<String>::new(), "{}", world.log());
}
