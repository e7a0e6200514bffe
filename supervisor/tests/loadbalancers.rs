//! The LoadBalancer reconciler against a real supervisor (in-process, its own redb store):
//! mirrored Services of a Cluster get VIPs from its ingress pool (lowest free, requested,
//! shared on distinct ports), a request outside the pool is refused naming the field, a
//! deleted Service's address is given again, the mirror takes none of the supervisor's node
//! ports, and a second reconciler (a restart) changes nothing. Standalone (MetalLB's role),
//! every LoadBalancer Service gets its VIP from a LoadBalancerPool.

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Namespace, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use slipway_supervisor::admission::AdmissionConfig;
use slipway_supervisor::controllers::loadbalancers::{
    CLUSTER_LABEL, CONDITION, LoadBalancerReconciler, Scope, status_ip,
};
use slipway_supervisor::server::limits::ConnectionLimits;
use slipway_supervisor::server::{Server, ServerConfig, StoreConfig};

const NS: &str = "team-lb";

async fn client_for(path: &std::path::Path) -> Client {
    let config = Kubeconfig::read_from(path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

fn mirror(name: &str, ports: &[(u16, &str)], extra: Value) -> Service {
    let ports: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(i, (port, proto))| {
            json!({"name": format!("p{i}"), "port": port, "protocol": proto,
                   "targetPort": 30000 + i})
        })
        .collect();
    let mut spec = json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                          "ports": ports});
    let mut metadata = json!({"name": name, "namespace": NS, "labels": {CLUSTER_LABEL: "c1"}});
    if let Some(e) = extra.get("spec").and_then(Value::as_object) {
        for (k, v) in e {
            spec[k] = v.clone();
        }
    }
    if let Some(a) = extra.get("annotations") {
        metadata["annotations"] = a.clone();
    }
    serde_json::from_value(json!({"metadata": metadata, "spec": spec})).expect("service")
}

/// Polls the Service until `f` accepts it.
async fn until(
    services: &Api<Service>,
    name: &str,
    what: &str,
    f: impl Fn(&Service) -> bool,
) -> Service {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(svc) = services.get(name).await
            && f(&svc)
        {
            return svc;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(svc: &Service) -> Option<(String, String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn ip(svc: &Service) -> String {
    status_ip(svc).map(|i| i.to_string()).unwrap_or_default()
}

/// A supervisor in process over `dir`; its controllers' kubeconfig and an admin client.
async fn api(dir: &common::TempDir) -> (std::path::PathBuf, Client) {
    let server = Server::bind(ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        store: StoreConfig::Redb,
        token_file: None,
        audit_log: None,
        watch_history: slipway_supervisor::store::redb::DEFAULT_HISTORY,
        admission: AdmissionConfig::default(),
        limits: ConnectionLimits::default(),
        advertise: Vec::new(),
    })
    .await
    .expect("server");
    let controllers = server.controllers_kubeconfig().to_owned();
    tokio::spawn(server.serve(std::future::pending()));
    let admin = client_for(&dir.path().join("admin.kubeconfig")).await;
    (controllers, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_services_get_vips_from_their_clusters_ingress_pool() {
    let dir = common::TempDir::new("lb");
    let (controllers, admin) = api(&dir).await;

    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).expect("ns"),
        )
        .await
        .expect("namespace");
    let dynamic = |kind: &str, plural: &str| {
        kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("slipway.dev", "v1alpha1", kind),
            plural,
        )
    };
    Api::<kube::api::DynamicObject>::all_with(admin.clone(), &dynamic("HostClass", "hostclasses"))
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "slipway.dev/v1alpha1", "kind": "HostClass",
                "metadata": {"name": "small"}, "spec": {"cpus": 1, "memory": "1Gi"},
            }))
            .expect("class"),
        )
        .await
        .expect("create class");
    let clusters: Api<kube::api::DynamicObject> = Api::namespaced_with(
        admin.clone(),
        NS,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("slipway.dev", "v1alpha1", "Cluster"),
            "clusters",
        ),
    );
    clusters
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "slipway.dev/v1alpha1", "kind": "Cluster",
                "metadata": {"name": "c1", "namespace": NS},
                "spec": {
                    "topology": {"controlPlane": {"replicas": 1, "hostClass": "small"}},
                    "settings": {"network": {
                        "pods": {"cidrBlocks": ["192.168.0.0/16"]},
                        "services": {"cidrBlocks": ["10.96.0.0/16"]},
                        "ingress": {"cidrBlocks": ["10.99.100.0/27"]},
                        "egress": {"cidrBlocks": ["10.99.200.0/27"]},
                    }},
                },
            }))
            .expect("cluster"),
        )
        .await
        .expect("create cluster");

    // The reconciler with the controllers' own identity, as `slipway supervisor` runs it.
    let reconciler = LoadBalancerReconciler::connect(&controllers)
        .await
        .expect("reconciler");
    let task = tokio::spawn(reconciler.run());

    let services: Api<Service> = Api::namespaced(admin.clone(), NS);
    let pp = PostParams::default();
    let created = services
        .create(&pp, &mirror("web", &[(80, "TCP")], json!({})))
        .await
        .expect("web");
    let ports = created
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    assert!(
        ports.iter().all(|p| p.node_port.is_none()),
        "allocateLoadBalancerNodePorts: false takes no supervisor node port: {ports:?}"
    );
    let web = until(&services, "web", "a VIP", |s| status_ip(s).is_some()).await;
    assert_eq!(ip(&web), "10.99.100.1", "the lowest free address");
    assert_eq!(
        condition(&web).map(|c| (c.0, c.1)),
        Some(("True".into(), "Allocated".into()))
    );

    services
        .create(
            &pp,
            &mirror(
                "asked",
                &[(80, "TCP")],
                json!({"spec": {"loadBalancerIP": "10.99.100.7"}}),
            ),
        )
        .await
        .expect("asked");
    let asked = until(&services, "asked", "a VIP", |s| status_ip(s).is_some()).await;
    assert_eq!(ip(&asked), "10.99.100.7", "spec.loadBalancerIP is honoured");

    services
        .create(
            &pp,
            &mirror(
                "outside",
                &[(80, "TCP")],
                json!({"spec": {"loadBalancerIP": "10.99.50.1"}}),
            ),
        )
        .await
        .expect("outside");
    let outside = until(&services, "outside", "a refusal", |s| {
        condition(s).is_some_and(|c| c.0 == "False")
    })
    .await;
    let (_, reason, message) = condition(&outside).expect("condition");
    assert_eq!(reason, "NotInPool");
    assert!(
        message.contains("spec.loadBalancerIP") && message.contains("10.99.100.0/27"),
        "the refusal names the field and the pool: {message}"
    );
    assert!(status_ip(&outside).is_none());

    // Shared: the same key, distinct ports.
    let shared = json!({"annotations": {"slipway.dev/allow-shared-ip": "k"}});
    services
        .create(&pp, &mirror("dns", &[(53, "UDP")], shared.clone()))
        .await
        .expect("dns");
    let dns = until(&services, "dns", "a VIP", |s| status_ip(s).is_some()).await;
    services
        .create(&pp, &mirror("http", &[(8080, "TCP")], shared.clone()))
        .await
        .expect("http");
    let http = until(&services, "http", "a VIP", |s| status_ip(s).is_some()).await;
    assert_eq!(ip(&dns), ip(&http), "a shared VIP on distinct ports");
    assert_ne!(ip(&dns), ip(&web));
    services
        .create(&pp, &mirror("clash", &[(8080, "TCP")], shared.clone()))
        .await
        .expect("clash");
    let clash = until(&services, "clash", "a VIP", |s| status_ip(s).is_some()).await;
    assert_ne!(ip(&clash), ip(&http), "the same port cannot share");

    // A restart: a fresh reconciler's pass writes nothing.
    let before: Vec<(String, Option<String>)> = services
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|s| (s.name_any(), s.resource_version()))
        .collect();
    LoadBalancerReconciler::connect(&controllers)
        .await
        .expect("second reconciler")
        .reconcile_all()
        .await
        .expect("pass");
    let after: Vec<(String, Option<String>)> = services
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|s| (s.name_any(), s.resource_version()))
        .collect();
    assert_eq!(before, after, "a converged pass writes nothing");

    // Delete: the address is free again.
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete web");
    services
        .create(&pp, &mirror("next", &[(443, "TCP")], json!({})))
        .await
        .expect("next");
    let next = until(&services, "next", "a VIP", |s| status_ip(s).is_some()).await;
    assert_eq!(ip(&next), "10.99.100.1", "web's address was released");

    let events: Vec<Event> = Api::<Event>::namespaced(admin.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items;
    let of = |name: &str, reason: &str| {
        events.iter().any(|e| {
            e.involved_object.name.as_deref() == Some(name) && e.reason.as_deref() == Some(reason)
        })
    };
    assert!(of("web", "IPAllocated"), "an Event for the allocation");
    assert!(
        of("outside", "AllocationFailed"),
        "an Event for the refusal"
    );
    let failed = events
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("outside"))
        .count();
    assert_eq!(failed, 1, "a refusal is recorded once, not every pass");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_services_get_vips_from_loadbalancerpools() {
    let dir = common::TempDir::new("lb-pools");
    let (_, admin) = api(&dir).await;
    let pools: Api<kube::api::DynamicObject> = Api::all_with(
        admin.clone(),
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("slipway.dev", "v1alpha1", "LoadBalancerPool"),
            "loadbalancerpools",
        ),
    );
    for (name, block) in [("a", "10.77.0.0/29"), ("b", "10.78.0.0/29")] {
        pools
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "slipway.dev/v1alpha1", "kind": "LoadBalancerPool",
                    "metadata": {"name": name}, "spec": {"addresses": [block]},
                }))
                .expect("pool"),
            )
            .await
            .expect("create pool");
    }
    tokio::spawn(LoadBalancerReconciler::with_scope(admin.clone(), Scope::Pools).run());
    let services: Api<Service> = Api::namespaced(admin.clone(), "default");
    let service = |name: &str, annotations: Value, spec: Value| -> Service {
        let mut s = json!({"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]});
        for (k, v) in spec.as_object().into_iter().flatten() {
            s[k] = v.clone();
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations}, "spec": s,
        }))
        .expect("service")
    };
    let create = |svc: Service| {
        let services = services.clone();
        async move {
            services
                .create(&PostParams::default(), &svc)
                .await
                .expect("create service")
        }
    };
    // No annotation: the first pool by name. An annotation: that pool.
    create(service("web", json!({}), json!({}))).await;
    let web = until(&services, "web", "a VIP", |s| status_ip(s).is_some()).await;
    assert!(ip(&web).starts_with("10.77.0."), "{}", ip(&web));
    let (status, reason, message) = condition(&web).expect("condition");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Allocated"));
    assert!(message.contains("LoadBalancerPool a"), "{message}");
    create(service(
        "api",
        json!({"slipway.dev/address-pool": "b"}),
        json!({}),
    ))
    .await;
    let api = until(&services, "api", "a VIP", |s| status_ip(s).is_some()).await;
    assert!(ip(&api).starts_with("10.78.0."), "{}", ip(&api));
    // A pool that does not exist, and an address outside the pool: refused, naming the field.
    create(service(
        "lost",
        json!({"slipway.dev/address-pool": "nope"}),
        json!({}),
    ))
    .await;
    let lost = until(&services, "lost", "a refusal", |s| condition(s).is_some()).await;
    let (status, reason, message) = condition(&lost).expect("condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "PoolNotFound")
    );
    assert!(
        message.contains("metadata.annotations[slipway.dev/address-pool]"),
        "{message}"
    );
    create(service(
        "outside",
        json!({}),
        json!({"loadBalancerIP": "10.99.0.1"}),
    ))
    .await;
    let outside = until(&services, "outside", "a refusal", |s| {
        condition(s).is_some()
    })
    .await;
    let (_, reason, message) = condition(&outside).expect("condition");
    assert_eq!(reason, "NotInPool");
    assert!(message.contains("spec.loadBalancerIP"), "{message}");
    assert!(status_ip(&outside).is_none());
    // A ClusterIP Service is none of its business.
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "plain"},
                "spec": {"ports": [{"port": 80}]}}))
            .expect("service"),
        )
        .await
        .expect("plain");
    // Deleted: its address is given again.
    let held = ip(&web);
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    create(service("next", json!({}), json!({}))).await;
    let next = until(&services, "next", "a VIP", |s| status_ip(s).is_some()).await;
    assert_eq!(
        ip(&next),
        held,
        "the released address is the lowest free again"
    );
    let plain = services.get("plain").await.expect("plain");
    assert!(status_ip(&plain).is_none() && condition(&plain).is_none());
}
