use super::*;
use serde_json::json;

fn pod() -> &'static ResourceType {
    lookup("", "v1", "pods").expect("pods are served")
}

#[test]
fn pod_takes_upstream_fields_and_refuses_unknown_ones() {
    // What `kubectl run` sends.
    let (obj, errs) = pod()
        .decode(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "x", "creationTimestamp": null, "labels": {"run": "x"}},
            "spec": {"containers": [{"name": "x", "image": "busybox", "resources": {}}],
                     "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"},
            "status": {},
        }))
        .expect("kubectl run's Pod decodes");
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(obj["spec"]["dnsPolicy"], "ClusterFirst");
    let err = pod()
        .decode(json!({
            "metadata": {"name": "x", "bogus": 1},
            "spec": {"containers": [{"name": "x", "imagee": "busybox"}]},
        }))
        .expect_err("unknown fields are refused")
        .to_string();
    assert!(
        err.contains(r#"unknown field "metadata.bogus""#)
            && err.contains(r#"unknown field "spec.containers[0].imagee""#),
        "{err}"
    );
    let (_, errs) = pod()
        .decode(json!({"metadata": {"name": "x"},
            "spec": {"containers": [{"name": "x"}], "dnsPolicy": "Sometimes"}}))
        .expect("decodes");
    assert!(errs.iter().any(|e| e.field == "spec.dnsPolicy"), "{errs:?}");
    // A container needs an image; the pull policy is one of three.
    assert!(
        errs.iter().any(|e| e.field == "spec.containers[0].image"),
        "{errs:?}"
    );
    let (_, errs) = pod()
        .decode(json!({"metadata": {"name": "x"},
            "spec": {"containers": [{"name": "x", "image": "busybox", "imagePullPolicy": "Sometimes"}]}}))
        .expect("decodes");
    assert_eq!(fields(&errs), ["spec.containers[0].imagePullPolicy"]);
}

fn fields(errs: &[FieldError]) -> Vec<&str> {
    errs.iter().map(|e| e.field.as_str()).collect()
}

#[test]
fn service_is_the_upstream_type_with_defaults_and_checks() {
    let svc = lookup("", "v1", "services").expect("services are served");
    let (obj, errs) = svc
        .decode(json!({"metadata": {"name": "web"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}))
        .expect("decodes");
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(obj["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(obj["spec"]["ports"][0]["targetPort"], 80);
    assert_eq!(obj["spec"]["externalTrafficPolicy"], "Cluster");
    assert_eq!(obj["spec"]["sessionAffinity"], "None");
    let (_, errs) = svc
        .decode(json!({"metadata": {"name": "web"},
            "spec": {"ports": [{"port": 0, "protocol": "ICMP"}], "loadBalancerIP": "x",
                     "loadBalancerSourceRanges": ["10.0.0.1/8"]}}))
        .expect("decodes");
    assert_eq!(
        fields(&errs),
        [
            "spec.ports[0].port",
            "spec.ports[0].protocol",
            "spec.ports[0].targetPort",
            "spec.loadBalancerIP",
            "spec.loadBalancerIP",
            "spec.loadBalancerSourceRanges[0]",
        ]
    );
    let err = svc
        .decode(json!({"metadata": {"name": "web"}, "spec": {"bogus": 1}}))
        .expect_err("unknown fields are refused")
        .to_string();
    assert!(err.contains(r#"unknown field "spec.bogus""#), "{err}");
}

#[test]
fn network_policy_is_the_upstream_type_with_defaults_and_checks() {
    let np = lookup("networking.k8s.io", "v1", "networkpolicies").expect("served");
    let (obj, errs) = np
        .decode(json!({"metadata": {"name": "p"}, "spec": {
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}],
                        "ports": [{"port": 70000, "protocol": "ICMP"}]}]}}))
        .expect("decodes");
    assert_eq!(obj["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(obj["spec"]["podSelector"], json!({}));
    assert_eq!(
        fields(&errs),
        [
            "spec.egress[0].to[0].ipBlock.except[0]",
            "spec.egress[0].ports[0].port",
            "spec.egress[0].ports[0].protocol",
        ]
    );
    assert!(
        np.decode(json!({"metadata": {"name": "p"}, "spec": {"podSelectr": {}}}))
            .is_err(),
        "unknown fields are refused"
    );
}

#[test]
fn loadbalancerpools_are_served_validated_and_their_crd_for_other_clusters_keeps_up() {
    let rt = lookup("slipway.dev", "v1alpha1", "loadbalancerpools").expect("served");
    assert!(!rt.namespaced);
    let (_, errs) = rt
        .decode(json!({
            "apiVersion": "slipway.dev/v1alpha1", "kind": "LoadBalancerPool",
            "metadata": {"name": "p"},
            "spec": {"addresses": ["10.9.0.0/24", "10.9.0.128/25", "10.9.1.1/24"]},
        }))
        .expect("decodes");
    let errs: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        [
            r#"spec.addresses[1]: Invalid value: "10.9.0.128/25": overlaps spec.addresses[0]"#,
            r#"spec.addresses[2]: Invalid value: "10.9.1.1/24": must be a network address (host bits zero)"#,
        ]
    );
    let (_, errs) = rt
        .decode(
            json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "LoadBalancerPool",
                       "metadata": {"name": "p"}, "spec": {}}),
        )
        .expect("decodes");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].to_string(), "spec.addresses: Required value");
    // The CRD a cluster of another make needs names every field of the spec.
    let crd: Value =
        serde_saphyr::from_str(include_str!("../../../../deploy/loadbalancerpool-crd.yaml"))
            .expect("the CRD is YAML");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(crd["spec"]["names"]["plural"], rt.plural);
    let in_crd: Vec<&String> =
        version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            .as_object()
            .expect("spec properties")
            .keys()
            .collect();
    let spec =
        serde_json::to_value(slipway_api::slipway::LoadBalancerPoolSpec::default()).expect("json");
    let in_kind: Vec<&String> = spec.as_object().expect("object").keys().collect();
    assert_eq!(in_crd, in_kind);
}
