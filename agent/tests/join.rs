//! `slipway join` against a real supervisor, as a static machine runs it: a bootstrap token (a
//! Secret in `slipway-system`, kubeadm's format) buys the host its own identity; the host's
//! Host is made (provider `static`), goes Running and Ready on its Lease; the identity can do
//! what a host does and nothing more; a restarted join keeps its kubeconfig; wrong tokens,
//! tokens bound to another host and unknown zones are refused, named and audited. Needs no
//! privileges (the heartbeat alone runs).

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Supervisor, slipway_binary, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::json;

const TOKEN: &str = "abcdef.0123456789abcdef";
const BOUND_TOKEN: &str = "bound1.0123456789abcdef";

fn gvk(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("slipway.dev", "v1alpha1", kind),
        plural,
    )
}

async fn seed(client: &kube::Client) {
    let zones: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Zone", "zones"));
    let mut zone = DynamicObject::new("zone-a", &gvk("Zone", "zones"));
    zone.data = json!({"spec": {}});
    zones
        .create(&PostParams::default(), &zone)
        .await
        .expect("zone");
    let classes: Api<DynamicObject> =
        Api::all_with(client.clone(), &gvk("HostClass", "hostclasses"));
    let mut class = DynamicObject::new("small", &gvk("HostClass", "hostclasses"));
    class.data = json!({"spec": {"cpus": 1, "memory": "1Gi"}});
    classes
        .create(&PostParams::default(), &class)
        .await
        .expect("class");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "slipway-system");
    for (token, host) in [(TOKEN, None), (BOUND_TOKEN, Some("other"))] {
        let (id, secret) = token.split_once('.').expect("token");
        let mut data = json!({
            "token-id": id,
            "token-secret": secret,
            "usage-bootstrap-authentication": "true",
            "expiration": "2099-01-01T00:00:00Z",
        });
        if let Some(h) = host {
            data["host-name"] = json!(h);
        }
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("bootstrap-token-{id}")},
            "type": "bootstrap.kubernetes.io/token",
            "stringData": data,
        }))
        .expect("secret");
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("token secret");
    }
}

fn join_command(sup: &Supervisor, dir: &Path, host: &str, zone: &str, token: &str) -> Command {
    let token_file = dir.join(format!("{host}.token"));
    std::fs::write(&token_file, token).expect("token file");
    let mut cmd = Command::new(slipway_binary());
    cmd.args(["join", "--supervisor", &sup.url, "--token-file"])
        .arg(&token_file)
        .arg("--ca-file")
        .arg(sup.ca())
        .arg("--host-data-dir")
        .arg(dir.join(host))
        .args(["--host-name", host, "--zone", zone, "--host-class", "small"])
        .args(["--lease-interval", "200ms", "--lease-duration", "1s"]);
    cmd
}

fn refused(mut cmd: Command) -> Output {
    let out = cmd.output().expect("run slipway join");
    assert!(!out.status.success(), "the join was accepted: {out:?}");
    out
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_static_host_joins_with_a_bootstrap_token_and_gets_a_host_identity() {
    let sup = Supervisor::start("join");
    let admin = sup.admin().await;
    seed(&admin).await;
    let dir = sup.dir.join("hosts");
    std::fs::create_dir_all(&dir).expect("hosts dir");
    let hosts: Api<DynamicObject> = Api::all_with(admin.clone(), &gvk("Host", "hosts"));

    let mut join = Kill(
        join_command(&sup, &dir, "static-1", "zone-a", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn join"),
    );
    let host = wait_for("Host static-1 Ready", Duration::from_secs(20), || async {
        let h = hosts.get_opt("static-1").await.ok()??;
        let ready = h.data["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (ready && h.data["status"]["phase"] == "Running").then_some(h)
    })
    .await;
    assert_eq!(host.data["spec"]["provider"], "static");
    assert_eq!(host.data["spec"]["zone"], "zone-a");
    assert_eq!(host.data["spec"]["hostClass"], "small");
    assert_eq!(host.data["status"]["address"], "127.0.0.1");
    let kubeconfig = dir.join("static-1").join("supervisor.kubeconfig");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kubeconfig)
            .expect("kubeconfig")
            .permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the host's kubeconfig is its owner's alone"
    );

    // The host's identity does what a host does, and nothing more.
    let as_host = Supervisor::client_for(&kubeconfig).await;
    let own_hosts: Api<DynamicObject> = Api::all_with(as_host.clone(), &gvk("Host", "hosts"));
    own_hosts.get("static-1").await.expect("a host reads Hosts");
    let secrets: Api<Secret> = Api::namespaced(as_host.clone(), "slipway-system");
    match secrets.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("a host listed Secrets: {other:?}"),
    }
    let mut other = DynamicObject::new("static-x", &gvk("Host", "hosts"));
    other.data = json!({"spec": {"zone": "zone-a", "hostClass": "small", "provider": "static"}});
    hosts
        .create(&PostParams::default(), &other)
        .await
        .expect("admin makes static-x");
    match own_hosts
        .patch_status(
            "static-x",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("a host wrote another host's status: {other:?}"),
    }
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "slipway-system");
    let renewed = |lease: Lease| {
        serde_json::to_value(lease.spec).ok()?["renewTime"]
            .as_str()
            .map(str::to_owned)
    };
    let before = renewed(leases.get("static-1").await.expect("lease")).expect("renewTime");

    // kill -9, then a restart with a token that no longer works: the kubeconfig it was given
    // is kept, so it needs none, and the Lease is renewed again.
    drop(join);
    join = Kill(
        join_command(&sup, &dir, "static-1", "zone-a", "zzzzzz.zzzzzzzzzzzzzzzz")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn join again"),
    );
    wait_for(
        "the Lease renewed after the restart",
        Duration::from_secs(10),
        || async {
            let now = renewed(leases.get("static-1").await.ok()?)?;
            (now > before).then_some(())
        },
    )
    .await;
    drop(join);

    // Refusals: each names what is wrong, and nothing is made.
    let out = refused(join_command(
        &sup,
        &dir,
        "static-2",
        "zone-a",
        "zzzzzz.zzzzzzzzzzzzzzzz",
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");
    let out = refused(join_command(&sup, &dir, "static-3", "zone-a", BOUND_TOKEN));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("joins host \\\"other\\\" only") || err.contains("joins host \"other\" only"),
        "{err}"
    );
    let out = refused(join_command(&sup, &dir, "static-4", "zone-nope", TOKEN));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.zone") && err.contains("Zone not found"),
        "{err}"
    );
    for h in ["static-2", "static-3", "static-4"] {
        assert!(
            hosts.get_opt(h).await.expect("get").is_none(),
            "{h} was made"
        );
        assert!(
            !dir.join(h).join("supervisor.kubeconfig").exists(),
            "{h} got a kubeconfig"
        );
    }
    let audit = std::fs::read_to_string(sup.dir.join("audit.log")).expect("audit log");
    let joins: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["resource"] == "hostjoins")
        .collect();
    assert!(
        joins
            .iter()
            .any(|r| r["code"] == 401 && r["user"] == "system:anonymous"),
        "the wrong token's join is audited: {joins:?}"
    );
    assert!(
        joins
            .iter()
            .any(|r| r["code"] == 201 && r["user"] == "system:bootstrap:abcdef"),
        "the accepted join is audited: {joins:?}"
    );
}
