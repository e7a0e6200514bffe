//! Pod volumes through a real container runtime: emptyDir shared by a pod's containers (and
//! `medium: Memory` on a tmpfs), configMap and secret keys as files (read-only, the Secret's on
//! a tmpfs, modes as asked), an updated ConfigMap reaching the running container without a
//! restart, a pod whose ConfigMap does not exist waiting in ContainerCreating without a sandbox
//! until it does, and nothing left (no directory, no mount) when the pods go.
//! Privileged (root, BPF, netns, containerd): run by scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/pod_host.rs"]
mod pod_host;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus, Secret};
use pod_host::*;

fn config_map(data: &str) -> ConfigMap {
    serde_json::from_value(json!({"data": {"index.html": data, "other": "x"}})).expect("cm")
}

/// The reader container's log lines (CRI log format: the text after the stream and tag).
fn log_lines(host: &PodHost, pod: &Pod, container: &str) -> Vec<String> {
    let dir = host.dir.join("pods").join(format!(
        "default_{}_{}",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    ));
    let text = std::fs::read_to_string(dir.join(container).join("0.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_owned))
        .collect()
}

/// Syncs until the container's log has a line equal to `want`; fails at the deadline with the
/// lines it had.
fn await_line(host: &mut PodHost, pods: &[Pod], container: &str, want: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        host.sync(pods);
        let lines = log_lines(host, &pods[0], container);
        if lines.iter().any(|l| l == want) {
            return;
        }
        assert!(
            Instant::now() < end,
            "no line {want:?} from {container}; the last ones: {:?}",
            lines.iter().rev().take(3).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn mounts_below(dir: &Path) -> Vec<String> {
    slipway_dataplane::mounts::mounts()
        .expect("mounts")
        .into_iter()
        .filter(|m| m.target.starts_with(dir))
        .map(|m| format!("{} {}", m.fstype, m.target.display()))
        .collect()
}

fn restarts(status: &PodStatus) -> i32 {
    status
        .container_statuses
        .iter()
        .flatten()
        .map(|c| c.restart_count)
        .sum()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd + mounts; run scripts/test.sh"
)]
fn empty_dir_config_map_and_secret_volumes_reach_the_containers() {
    let mut host = PodHost::start(Backoff::default());
    host.objects
        .insert_config_map("default", "web-conf", Some(&config_map("v1")));
    let secret: Secret =
        serde_json::from_value(json!({"data": {"token": "czNjcmV0"}})).expect("secret");
    host.objects.insert_secret("default", "tok", Some(&secret));
    let reader = r#"while true; do
        echo "conf=$(cat /conf/index.html) keys=$(ls /conf | wc -l) secret=$(cat /secret/token) mode=$(stat -L -c %a /secret/token) note=$(cat /shared/note 2>/dev/null) mem=$(grep -c ' /mem tmpfs ' /proc/mounts) conf-ro=$(touch /conf/x 2>/dev/null && echo no || echo yes) shared-rw=$(touch /shared/y && echo yes)"
        sleep 0.2; done"#;
    let vols = pod(
        "vols",
        json!({
            "terminationGracePeriodSeconds": 1,
            "volumes": [
                {"name": "shared", "emptyDir": {}},
                {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
                {"name": "conf", "configMap": {"name": "web-conf", "items": [{"key": "index.html", "path": "index.html"}]}},
                {"name": "secret", "secret": {"secretName": "tok", "defaultMode": 0o400}},
            ],
            "containers": [
                {"name": "writer", "image": "busybox", "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "echo from-writer > /shared/note && exec sleep 3600"],
                 "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
                {"name": "reader", "image": "busybox", "imagePullPolicy": "Never",
                 "command": ["sh", "-c", reader],
                 "volumeMounts": [
                     {"name": "shared", "mountPath": "/shared"},
                     {"name": "mem", "mountPath": "/mem"},
                     {"name": "conf", "mountPath": "/conf"},
                     {"name": "secret", "mountPath": "/secret"},
                 ]},
            ],
        }),
    );
    let pods = vec![vols.clone()];
    host.wait(&pods, "vols", Duration::from_secs(60), |s| {
        s.phase.as_deref() == Some("Running")
    });
    await_line(
        &mut host,
        &pods,
        "reader",
        "conf=v1 keys=1 secret=s3cret mode=400 note=from-writer mem=1 conf-ro=yes shared-rw=yes",
    );
    // On the host: the Secret and the Memory emptyDir live on tmpfs, the others on disk.
    let root = host.dir.join("kubelet-pods").join(uid(&vols));
    let mounted = mounts_below(&root);
    assert_eq!(mounted.len(), 2, "{mounted:?}");
    for plugin in ["kubernetes.io~secret/secret", "kubernetes.io~empty-dir/mem"] {
        let dir = root.join("volumes").join(plugin);
        assert!(
            mounted.contains(&format!("tmpfs {}", dir.display())),
            "{plugin} on tmpfs: {mounted:?}"
        );
    }

    // An updated ConfigMap reaches the running container (through the `..data` swap), which
    // is not restarted for it.
    host.objects
        .insert_config_map("default", "web-conf", Some(&config_map("v2")));
    await_line(
        &mut host,
        &pods,
        "reader",
        "conf=v2 keys=1 secret=s3cret mode=400 note=from-writer mem=1 conf-ro=yes shared-rw=yes",
    );
    let status = host.wait(&pods, "vols", Duration::from_secs(10), |_| true);
    assert_eq!(restarts(&status), 0, "{status:?}");

    // A pod whose ConfigMap does not exist waits, with the reason, and gets no sandbox (no
    // address) until the ConfigMap is there.
    host.objects.insert_config_map("default", "later", None);
    let waiting = pod(
        "waits",
        json!({
            "volumes": [{"name": "c", "configMap": {"name": "later"}}],
            "containers": [{"name": "c", "image": "busybox", "imagePullPolicy": "Never",
                            "command": ["sleep", "3600"],
                            "volumeMounts": [{"name": "c", "mountPath": "/c"}]}],
        }),
    );
    let both = vec![vols.clone(), waiting.clone()];
    let status = host.wait(&both, "waits", Duration::from_secs(10), |s| {
        s.container_statuses.iter().flatten().any(|c| {
            c.state
                .as_ref()
                .and_then(|st| st.waiting.as_ref())
                .is_some_and(|w| w.reason.as_deref() == Some("ContainerCreating"))
        })
    });
    let message = status.container_statuses.as_ref().expect("statuses")[0]
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("configmap \"later\" not found") && message.contains("volume \"c\""),
        "{message}"
    );
    assert!(host.sandboxes(&uid(&waiting)).is_empty());
    host.objects
        .insert_config_map("default", "later", Some(&config_map("now")));
    host.wait(&both, "waits", Duration::from_secs(60), |s| {
        s.phase.as_deref() == Some("Running")
    });

    // The pods go: their volumes go with them, tmpfs mounts first.
    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let left: Vec<_> = std::fs::read_dir(host.dir.join("kubelet-pods"))
        .expect("volume root")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "volumes left: {left:?}");
    assert_eq!(
        mounts_below(&host.dir.join("kubelet-pods")),
        Vec::<String>::new()
    );
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}
