//! End-to-end tests of who may write what: status only by the controllers' identity (audited
//! with the subresource), tenants without a binding see no namespaces or classes, client
//! certificates with bounded lifetimes, one admin identity across restarts, and owner-only
//! store and audit files. Raw HTTP with curl (kubectl 1.20 has no `--subresource`) and
//! Debian's kubectl.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use slipway_supervisor::cli::KubeconfigArgs;

use common::{Supervisor, TempDir};

const TOKENS: &str = "edit-tok,editor,1\nctl-tok,cluster-controller,2,\"system:slipway:controllers\"\nnobody-tok,nobody,3\n";

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b}
spec:
  limits: {cpu: "64"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: editors, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}
subjects: [{kind: User, name: editor}]
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata: {name: small}
spec: {cpus: 2, memory: 4Gi}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: csi.slipway.dev
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: team-a}
spec:
  type: LoadBalancer
  ports: [{port: 80}]
---
apiVersion: slipway.dev/v1alpha1
kind: Cluster
metadata: {name: x, namespace: team-a}
spec:
  topology:
    controlPlane: {replicas: 1, hostClass: small}
  settings:
    network:
      pods: {cidrBlocks: ["192.168.0.0/16"]}
      services: {cidrBlocks: ["10.96.0.0/16"]}
"#;

/// One HTTPS request with a bearer token; returns (code, body).
fn curl(
    sup: &Supervisor,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "-X", method, "-o", "-", "-w", "\n%{http_code}"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "Content-Type: application/merge-patch+json"]);
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    let out = cmd
        .arg(format!("https://{}{path}", sup.addr))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    eprintln!("{method} {path} as {token}: {code} {body}");
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn audit_lines(sup: &Supervisor) -> Vec<Value> {
    std::fs::read_to_string(sup.dir.join("audit.log"))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

fn start(dir: &TempDir) -> Supervisor {
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, TOKENS).expect("token file");
    let tokens = tokens.display().to_string();
    let sup = Supervisor::start(dir.path(), "redb", &["--token-file", &tokens]);
    let setup = sup.file("setup.yaml", SETUP);
    sup.kubectl(&["apply", "-f", &setup]).ok();
    sup
}

const CLUSTER_STATUS: &str = "/apis/slipway.dev/v1alpha1/namespaces/team-a/clusters/x/status";
const SERVICE_STATUS: &str = "/api/v1/namespaces/team-a/services/web/status";

#[test]
fn status_is_written_only_by_controllers() {
    let dir = TempDir::new("status");
    let sup = start(&dir);
    let forged = r#"{"status":{"phase":"Running","apiEndpoint":"https://6.6.6.6:6443"}}"#;
    let (code, body) = curl(&sup, "edit-tok", "PATCH", CLUSTER_STATUS, Some(forged));
    assert_eq!(code, 403, "{body}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(r#"cannot patch resource "clusters/status""#),
        "{msg}"
    );
    let lb = r#"{"status":{"loadBalancer":{"ingress":[{"ip":"8.8.8.8"}]}}}"#;
    let (code, body) = curl(&sup, "edit-tok", "PATCH", SERVICE_STATUS, Some(lb));
    assert_eq!(code, 403, "{body}");
    // PUT of the subresource too.
    let (_, svc) = curl(&sup, "ctl-tok", "GET", SERVICE_STATUS, None);
    let mut put = svc.clone();
    put["status"] = serde_json::json!({"loadBalancer": {"ingress": [{"ip": "8.8.8.8"}]}});
    let (code, _) = curl(
        &sup,
        "edit-tok",
        "PUT",
        SERVICE_STATUS,
        Some(&put.to_string()),
    );
    assert_eq!(code, 403);
    // Nor through the main resource, nor at create.
    let (code, _) = curl(
        &sup,
        "edit-tok",
        "PUT",
        "/api/v1/namespaces/team-a/services/web",
        Some(&put.to_string()),
    );
    assert_eq!(code, 200);
    let created = sup.kubectl_stdin(
        &["--token", "edit-tok", "create", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Service\nmetadata: {name: forged, namespace: team-a}\nspec:\n  type: LoadBalancer\n  ports: [{port: 80}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 8.8.8.8}]\n",
        ),
    );
    created.ok();
    let out = sup.kubectl(&["get", "svc", "-n", "team-a", "-o", "json"]);
    assert!(!out.ok().contains("8.8.8.8"), "{}", out.stdout);
    assert!(
        !sup.kubectl(&["get", "cluster", "x", "-n", "team-a", "-o", "json"])
            .ok()
            .contains("6.6.6.6")
    );

    // The controllers' identity writes status, and updates objects, but creates nothing.
    let (code, body) = curl(&sup, "ctl-tok", "PATCH", SERVICE_STATUS, Some(lb));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["status"]["loadBalancer"]["ingress"][0]["ip"],
        "8.8.8.8"
    );
    let (code, _) = curl(
        &sup,
        "ctl-tok",
        "POST",
        "/api/v1/namespaces/team-a/services",
        Some(&put.to_string()),
    );
    assert_eq!(code, 403);
    let (code, _) = curl(
        &sup,
        "ctl-tok",
        "PATCH",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/editors",
        Some(r#"{"subjects":[{"kind":"User","name":"cluster-controller"}]}"#),
    );
    assert_eq!(code, 403, "a controller rewrote a RoleBinding");

    let audit = audit_lines(&sup);
    let denied = audit
        .iter()
        .find(|l| l["user"] == "editor" && l["verb"] == "patch" && l["code"] == 403)
        .expect("denied status patch audited");
    assert_eq!(
        (denied["resource"].as_str(), denied["subresource"].as_str()),
        (Some("clusters"), Some("status")),
        "{denied}"
    );
    assert!(
        audit.iter().any(|l| l["user"] == "cluster-controller"
            && l["verb"] == "patch"
            && l["resource"] == "services"
            && l["subresource"] == "status"
            && l["code"] == 200),
        "{audit:?}"
    );
    // A main-resource write is audited without a subresource.
    assert!(audit.iter().any(|l| l["user"] == "editor"
        && l["verb"] == "update"
        && l["code"] == 200
        && l.get("subresource").is_none()));
}

#[test]
fn tenants_see_only_what_a_binding_grants() {
    let dir = TempDir::new("scope");
    let sup = start(&dir);
    for path in [
        "/api/v1/namespaces",
        "/api/v1/namespaces/team-b",
        "/apis/slipway.dev/v1alpha1/hostclasses",
        "/apis/storage.k8s.io/v1/storageclasses",
        "/apis/slipway.dev/v1alpha1/zones",
    ] {
        let (code, body) = curl(&sup, "nobody-tok", "GET", path, None);
        assert_eq!(code, 403, "nobody GET {path}: {body}");
    }
    // A binding in team-a grants team-a and the classes, not team-b nor the list of all.
    let (code, body) = curl(&sup, "edit-tok", "GET", "/api/v1/namespaces/team-a", None);
    assert_eq!(
        (code, body["metadata"]["name"].as_str()),
        (200, Some("team-a"))
    );
    assert_eq!(
        curl(&sup, "edit-tok", "GET", "/api/v1/namespaces/team-b", None).0,
        403
    );
    assert_eq!(
        curl(&sup, "edit-tok", "GET", "/api/v1/namespaces", None).0,
        403
    );
    let (code, body) = curl(
        &sup,
        "edit-tok",
        "GET",
        "/apis/slipway.dev/v1alpha1/hostclasses",
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(body["items"][0]["metadata"]["name"], "small");
    assert_eq!(
        curl(
            &sup,
            "edit-tok",
            "GET",
            "/apis/storage.k8s.io/v1/storageclasses",
            None
        )
        .0,
        200
    );
    let listed = sup.kubectl(&["--token", "nobody-tok", "get", "namespaces"]);
    assert!(listed.err().contains("forbidden"), "{}", listed.stderr);
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .expect("clock")
}

/// (notBefore, notAfter) of the client certificate in a kubeconfig, read by openssl.
fn cert_dates(kubeconfig: &Path) -> (u64, u64, String) {
    let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
    let b64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-certificate-data: "))
        .expect("client certificate in kubeconfig");
    let pem = slipway_supervisor::client::base64_decode(b64).expect("base64");
    let pem_path = kubeconfig.with_extension("crt");
    std::fs::write(&pem_path, &pem).expect("write pem");
    let date = |flag: &str| {
        let out = Command::new("openssl")
            .args(["x509", "-noout", flag, "-dateopt", "iso_8601", "-in"])
            .arg(&pem_path)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let iso = text
            .trim()
            .split_once('=')
            .expect("openssl date")
            .1
            .to_string();
        let out = Command::new("date")
            .args(["-u", "-d", &iso, "+%s"])
            .output()
            .expect("date");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .expect("epoch seconds")
    };
    (
        date("-startdate"),
        date("-enddate"),
        String::from_utf8_lossy(&pem).into_owned(),
    )
}

fn days(secs: u64) -> u64 {
    secs.div_ceil(24 * 3600)
}

#[test]
fn credentials_are_bounded_kept_and_files_private() {
    let dir = TempDir::new("creds");
    let mut sup = start(&dir);
    let (start_at, end, admin_pem) = cert_dates(&sup.kubeconfig());
    let t = now();
    assert!(
        start_at <= t && t - start_at < 2 * 3600,
        "notBefore {start_at}, now {t}"
    );
    assert_eq!(days(end - t), 365, "admin certificate ends {end}");

    // One admin identity: a restart keeps the certificate.
    sup.restart();
    let (_, _, again) = cert_dates(&sup.kubeconfig());
    assert_eq!(again, admin_pem, "a restart minted a new admin certificate");
    sup.kubectl(&["get", "namespaces"]).ok();

    // Users: 90 days by default, renewable with a chosen lifetime, never beyond a year.
    let user = dir.path().join("alice.kubeconfig");
    let args = |days: u32| KubeconfigArgs {
        data_dir: dir.path().to_path_buf(),
        user: Some("alice".into()),
        cluster: None,
        namespace: "default".into(),
        group: None,
        token: None,
        days,
        out: Some(user.clone()),
    };
    args(slipway_supervisor::tls::USER_DAYS)
        .run()
        .expect("kubeconfig");
    let (_, end, _) = cert_dates(&user);
    assert_eq!(days(end - now()), 90);
    args(30).run().expect("renewal");
    let (_, end, _) = cert_dates(&user);
    assert_eq!(days(end - now()), 30);
    let err = args(4000).run().expect_err("a 4000-day certificate");
    assert!(err.to_string().contains("--days"), "{err}");

    for file in ["store.redb", "audit.log", "pki/admin.key", "pki/ca.key"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} is {:o}", mode & 0o777);
    }
}
