//! Secrets through kubectl: `stringData` is folded into `data` on write, keys that are not
//! config keys are refused naming the field, and the view role does not read them (as
//! Kubernetes' view role), while it reads the namespace's other objects.

mod common;

use std::process::Command;

use common::{Supervisor, TempDir, kubectl_path};
use slipway_supervisor::cli::KubeconfigArgs;

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-v}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewers, namespace: team-v}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: User, name: viewer}]
---
apiVersion: v1
kind: Secret
metadata: {name: s1, namespace: team-v}
stringData: {password: hunter2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: team-v}
spec:
  ports: [{port: 80}]
"#;

#[test]
fn secrets_fold_string_data_refuse_bad_keys_and_are_not_for_viewers() {
    let dir = TempDir::new("secrets");
    let sup = Supervisor::start(dir.path(), "redb", &[]);
    let setup = sup.file("setup.yaml", SETUP);
    sup.kubectl(&["apply", "-f", &setup]).ok();
    let s1: serde_json::Value = serde_json::from_str(
        sup.kubectl(&["get", "secret", "s1", "-n", "team-v", "-o", "json"])
            .ok(),
    )
    .expect("json");
    assert_eq!(s1["data"]["password"], "aHVudGVyMg==", "{s1}");
    assert!(s1.get("stringData").is_none(), "{s1}");
    assert_eq!(s1["type"], "Opaque");

    let bad = sup.file(
        "bad.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: bad, namespace: team-v}\nstringData: {\"a/b\": x}\n",
    );
    let out = sup.kubectl(&["apply", "-f", &bad]);
    assert!(out.err().contains("data[a/b]"), "{}", out.stderr);
    assert!(
        sup.kubectl(&["get", "secret", "bad", "-n", "team-v"])
            .err()
            .contains("NotFound")
    );

    let viewer = dir.path().join("viewer.kubeconfig");
    KubeconfigArgs {
        data_dir: dir.path().to_path_buf(),
        user: Some("viewer".into()),
        cluster: None,
        namespace: "default".into(),
        group: None,
        token: None,
        days: slipway_supervisor::tls::USER_DAYS,
        out: Some(viewer.clone()),
    }
    .run()
    .expect("viewer kubeconfig");
    let as_viewer = |args: &[&str]| {
        Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(&viewer)
            .args(args)
            .output()
            .expect("kubectl")
    };
    let secrets = as_viewer(&["get", "secrets", "-n", "team-v"]);
    let err = String::from_utf8_lossy(&secrets.stderr);
    assert!(
        !secrets.status.success() && err.contains("forbidden"),
        "{err}"
    );
    let services = as_viewer(&["get", "services", "-n", "team-v"]);
    assert!(
        services.status.success(),
        "{}",
        String::from_utf8_lossy(&services.stderr)
    );
}
