//! Joining a host (`POST /apis/slipway.dev/v1alpha1/hostjoins`, a create-only kind that is never
//! stored, as `TokenReview` is): a machine holding a bootstrap token — kubeadm's format,
//! `<id>.<secret>`, kept as a Secret `bootstrap-token-<id>` in `slipway-system` — names the host
//! it is and its zone, and gets a kubeconfig with the host's own identity (`system:host:<name>`
//! in `system:slipway:hosts`, a client certificate signed by the supervisor's CA). The Host is
//! made if it does not exist (provider `static`); a host the supervisor provisioned joins with a
//! token bound to it. `slipway join` is the client, on real machines and inside the `netns`
//! provider's hosts alike.

use serde::Deserialize;
use serde_json::{Value, json};
use slipway_api::slipway::{GROUP, HOST_LEASE_NAMESPACE, HostProvider, VERSION};

use super::State;
use super::keys;
use super::objects::stamp_new;
use crate::api::meta::now_secs;
use crate::api::registry::{ResourceType, lookup};
use crate::auth::{
    CLUSTER_USER_PREFIX, CLUSTERS, HOST_USER_PREFIX, NODE_USER_PREFIX, NODES, UserInfo,
    bootstrap_token, issue_host_identity,
};
use crate::error::{ApiError, FieldError};
use crate::store::{Store, StoreError};
use crate::tls::{ADMIN_DAYS, Credential};

/// The resource plural the join is served under.
pub const PLURAL: &str = "hostjoins";

/// The kind.
pub const KIND: &str = "HostJoin";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JoinRequest {
    #[serde(default)]
    #[allow(dead_code, reason = "checked by serde's shape only")]
    api_version: Option<String>,
    #[serde(default)]
    #[allow(dead_code, reason = "checked by serde's shape only")]
    kind: Option<String>,
    #[serde(default)]
    #[allow(dead_code, reason = "a request carries no metadata that matters")]
    metadata: Option<Value>,
    spec: JoinSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JoinSpec {
    #[serde(default)]
    host_name: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    host_class: Option<String>,
}

fn rt(plural: &str) -> Result<&'static ResourceType, ApiError> {
    lookup(GROUP, VERSION, plural)
        .ok_or_else(|| ApiError::Internal(format!("{plural} are not served")))
}

async fn exists(state: &State, plural: &str, name: &str) -> Result<Option<Value>, ApiError> {
    let key = keys::object(rt(plural)?, None, name);
    match state.store.get(&key).await? {
        Some(o) => serde_json::from_slice(&o.value)
            .map(Some)
            .map_err(|e| ApiError::Internal(format!("stored {plural}/{name}: {e}"))),
        None => Ok(None),
    }
}

/// Joins the host the request names; the answer carries its kubeconfig. `authority` is the
/// `host:port` the caller reached the supervisor at, which its kubeconfig points to.
pub async fn join(
    state: &State,
    user: &UserInfo,
    authorization: Option<&str>,
    authority: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    let forbidden = || ApiError::Forbidden {
        user: user.name.clone(),
        verb: "create".into(),
        resource: PLURAL.into(),
        group: GROUP.into(),
        namespace: None,
    };
    // Who may join: a bootstrap token's holder, or a cluster administrator.
    let bound_host = if user.is_admin() {
        None
    } else if user.is_bootstrapper() {
        bootstrap_token(&state.store, authorization, now_secs())
            .await?
            .ok_or(ApiError::Unauthorized)?
            .host
    } else {
        return Err(forbidden());
    };
    let req: JoinRequest = serde_json::from_value(body.clone())
        .map_err(|e| ApiError::BadRequest(format!("HostJoin: {e}")))?;
    let spec = req.spec;
    let invalid = |causes: Vec<FieldError>| ApiError::Invalid {
        kind: KIND.into(),
        name: spec.host_name.clone(),
        causes,
    };
    let mut causes = Vec::new();
    if spec.host_name.is_empty() {
        causes.push(FieldError::required("spec.hostName"));
    } else {
        slipway_api::meta::check_dns_label("spec.hostName", &spec.host_name, &mut causes);
    }
    if spec.zone.is_empty() {
        causes.push(FieldError::required("spec.zone"));
    }
    if !causes.is_empty() {
        return Err(invalid(causes));
    }
    if let Some(bound) = &bound_host
        && bound != &spec.host_name
    {
        return Err(ApiError::AdmissionDenied {
            resource: PLURAL.into(),
            name: spec.host_name.clone(),
            message: format!("this bootstrap token joins host {bound:?} only"),
        });
    }
    if exists(state, "zones", &spec.zone).await?.is_none() {
        causes.push(FieldError::invalid(
            "spec.zone",
            format!("{:?}", spec.zone),
            "Zone not found",
        ));
    }
    if let Some(class) = &spec.host_class
        && exists(state, "hostclasses", class).await?.is_none()
    {
        causes.push(FieldError::invalid(
            "spec.hostClass",
            format!("{class:?}"),
            "HostClass not found",
        ));
    }
    let mut control_plane = None;
    let mut node = None;
    let mut edge = None;
    match exists(state, "hosts", &spec.host_name).await? {
        Some(host) => {
            // An edge host runs the load balancer fed from this API (its Services and
            // EndpointSlices), holding the VIPs' Leases in their namespace.
            if host["spec"]["pool"] == slipway_api::slipway::EDGE_POOL
                && host["spec"]["cluster"].is_null()
            {
                edge = Some(json!({
                    "leaseNamespace": slipway_api::slipway::VIP_LEASE_NAMESPACE,
                }));
            }
            // The cluster's CA and node credentials go only to a token made for this very
            // host (or an admin).
            if bound_host.is_some() || user.is_admin() {
                control_plane = control_plane_bootstrap(state, &host, authority).await?;
                node = node_bootstrap(state, &spec.host_name, &host).await?;
            }
            let zone = host.pointer("/spec/zone").and_then(Value::as_str);
            if zone != Some(spec.zone.as_str()) {
                causes.push(FieldError::invalid(
                    "spec.zone",
                    &spec.zone,
                    format!(
                        "host {:?} is in zone {:?}",
                        spec.host_name,
                        zone.unwrap_or_default()
                    ),
                ));
            }
            if !causes.is_empty() {
                return Err(invalid(causes));
            }
        }
        None => {
            let Some(class) = &spec.host_class else {
                causes.push(FieldError::new(
                    "spec.hostClass",
                    slipway_api::FieldReason::Required,
                    "a host that is not registered yet needs its HostClass",
                ));
                return Err(invalid(causes));
            };
            if !causes.is_empty() {
                return Err(invalid(causes));
            }
            create_static_host(state, &spec.host_name, &spec.zone, class).await?;
        }
    }
    let name = format!("{HOST_USER_PREFIX}{}", spec.host_name);
    let (cert_pem, key_pem) = issue_host_identity(&state.pki, &spec.host_name, ADMIN_DAYS)
        .map_err(|e| ApiError::Internal(format!("issuing the host's certificate: {e}")))?;
    let kubeconfig = state
        .pki
        .kubeconfig(
            authority,
            &name,
            &Credential::ClientCert { cert_pem, key_pem },
        )
        .map_err(|e| ApiError::Internal(format!("the host's kubeconfig: {e}")))?;
    tracing::info!(host = %spec.host_name, zone = %spec.zone, by = %user.name, "host joined");
    Ok(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "spec": {"hostName": spec.host_name, "zone": spec.zone, "hostClass": spec.host_class},
        "status": {
            "kubeconfig": kubeconfig,
            "leaseNamespace": HOST_LEASE_NAMESPACE,
            "controlPlane": control_plane,
            "node": node,
            "edge": edge,
        },
    }))
}

/// What a control plane host of a Cluster needs to serve the cluster's API (as Cluster API's
/// bootstrap data carries it): the cluster's CA, from its Secret `<cluster>-ca`, and the
/// cluster's link to its supervisor namespace (`supervisorLink`, a kubeconfig for
/// `system:cluster:<namespace>:<cluster>` at `authority`, for its cloud provider and
/// paravirtual CSI controller). None for other hosts; an error while the Secret is not made yet
/// (the join is retried).
async fn control_plane_bootstrap(
    state: &State,
    host: &Value,
    authority: &str,
) -> Result<Option<Value>, ApiError> {
    let spec = &host["spec"];
    if spec["pool"] != slipway_api::slipway::CONTROL_PLANE_POOL {
        return Ok(None);
    }
    let (Some(ns), Some(cluster)) = (
        spec["cluster"]["namespace"].as_str(),
        spec["cluster"]["name"].as_str(),
    ) else {
        return Ok(None);
    };
    let (ca_cert, ca_key) = cluster_ca(state, ns, cluster).await?;
    let network = cluster_network(state, ns, cluster).await?;
    let endpoint = network.spec.control_plane_endpoint.as_ref();
    // Three control plane hosts share a 3-member etcd, which members join through the
    // control plane endpoint (the first host may start it when nobody answers there).
    let etcd = if network.spec.topology.control_plane.replicas > 1 {
        let endpoint = endpoint.ok_or_else(|| {
            ApiError::Unavailable(format!(
                "cluster {ns}/{cluster} has no controlPlaneEndpoint yet"
            ))
        })?;
        let (cert, key) = secret_pair(
            state,
            ns,
            &crate::controllers::clusters::etcd_ca_secret(cluster),
        )
        .await?;
        // Members join one at a time (etcd takes one new member at a time): a control plane
        // host joins once those of lower index run.
        let replicas = network.spec.topology.control_plane.replicas;
        let names: Vec<String> = (0..replicas)
            .map(|i| {
                crate::controllers::clusters::host_name(
                    ns,
                    cluster,
                    slipway_api::slipway::CONTROL_PLANE_POOL,
                    i,
                )
            })
            .collect();
        let index = names
            .iter()
            .position(|n| host["metadata"]["name"] == n.as_str())
            .unwrap_or(0);
        Some(json!({
            "caCert": cert,
            "caKey": key,
            "joinAt": endpoint.host,
            "mayStart": index == 0 && !network.ran,
            "after": names[..index],
        }))
    } else {
        None
    };
    let link_user = format!("{CLUSTER_USER_PREFIX}{ns}:{cluster}");
    let (cert_pem, key_pem) = state
        .pki
        .issue_client(&link_user, Some(CLUSTERS), ADMIN_DAYS)
        .map_err(|e| ApiError::Internal(format!("issuing the cluster link's certificate: {e}")))?;
    let link = state
        .pki
        .kubeconfig(
            authority,
            &link_user,
            &Credential::ClientCert { cert_pem, key_pem },
        )
        .map_err(|e| ApiError::Internal(format!("the cluster link's kubeconfig: {e}")))?;
    Ok(Some(json!({
        "cluster": {"namespace": ns, "name": cluster},
        "supervisorLink": link,
        "serviceCidr": network.services,
        "caCert": ca_cert,
        "caKey": ca_key,
        "port": slipway_api::slipway::API_PORT,
        "endpoint": endpoint.map(|e| &e.host),
        "etcd": etcd,
    })))
}

/// The cluster's CA (certificate, key) from its Secret `<cluster>-ca`; unavailable while the
/// cluster reconciler has not made it.
async fn cluster_ca(state: &State, ns: &str, cluster: &str) -> Result<(String, String), ApiError> {
    secret_pair(state, ns, &crate::controllers::clusters::ca_secret(cluster)).await
}

/// A CA's certificate and key from Secret `ns/name`; unavailable while it is not made.
async fn secret_pair(state: &State, ns: &str, name: &str) -> Result<(String, String), ApiError> {
    let secrets = lookup("", "v1", "secrets")
        .ok_or_else(|| ApiError::Internal("secrets are not served".into()))?;
    let stored = state
        .store
        .get(&keys::object(secrets, Some(ns), name))
        .await?
        .ok_or_else(|| ApiError::Unavailable(format!("Secret {ns}/{name} is not made yet")))?;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_slice(&stored.value)
        .map_err(|e| ApiError::Internal(format!("Secret {ns}/{name}: {e}")))?;
    let text = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    Ok((text("tls.crt"), text("tls.key")))
}

/// A cluster's pod and service blocks.
struct ClusterNetwork {
    pods: Option<String>,
    services: Option<String>,
    /// The whole spec (default while the Cluster is not found).
    spec: slipway_api::slipway::ClusterSpec,
    /// Whether the Cluster ever ran (phase Running or later).
    ran: bool,
}

async fn cluster_network(
    state: &State,
    ns: &str,
    cluster: &str,
) -> Result<ClusterNetwork, ApiError> {
    let clusters = lookup(GROUP, VERSION, "clusters")
        .ok_or_else(|| ApiError::Internal("clusters are not served".into()))?;
    let object = match state
        .store
        .get(&keys::object(clusters, Some(ns), cluster))
        .await?
    {
        Some(c) => serde_json::from_slice::<Value>(&c.value).unwrap_or(Value::Null),
        None => Value::Null,
    };
    let block = |which: &str| {
        object
            .pointer(&format!("/spec/settings/network/{which}/cidrBlocks/0"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(ClusterNetwork {
        pods: block("pods"),
        services: block("services"),
        spec: serde_json::from_value(object["spec"].clone()).unwrap_or_default(),
        ran: !matches!(
            object.pointer("/status/phase").and_then(Value::as_str),
            None | Some("Provisioning")
        ),
    })
}

/// What a host of a Cluster needs to be one of its Nodes (kubeadm join's part): the cluster's
/// pod CIDR and the host's block of it, and a kubeconfig for the workload cluster's API with the
/// node's identity (`system:node:<host>` in `system:nodes`, signed by the cluster's CA).
/// Unavailable until the control plane has an address, so the join retries until then.
async fn node_bootstrap(
    state: &State,
    name: &str,
    host: &Value,
) -> Result<Option<Value>, ApiError> {
    let spec = &host["spec"];
    let (Some(ns), Some(cluster)) = (
        spec["cluster"]["namespace"].as_str(),
        spec["cluster"]["name"].as_str(),
    ) else {
        return Ok(None);
    };
    let Some(block) = spec["podCIDR"].as_str() else {
        return Ok(None);
    };
    let (ca_cert, ca_key) = cluster_ca(state, ns, cluster).await?;
    let network = cluster_network(state, ns, cluster).await?;
    let cp0 = crate::controllers::clusters::host_name(
        ns,
        cluster,
        slipway_api::slipway::CONTROL_PLANE_POOL,
        0,
    );
    let cp0_address = exists(state, "hosts", &cp0).await?.and_then(|h| {
        h.pointer("/status/address")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let authority = slipway_api::slipway::api_authority(&network.spec, cp0_address.as_deref())
        .ok_or_else(|| {
            ApiError::Unavailable(format!(
                "the control plane of cluster {ns}/{cluster} has no address yet"
            ))
        })?;
    let user = format!("{NODE_USER_PREFIX}{name}");
    let (cert_pem, key_pem) =
        crate::tls::issue_client_with(&ca_key, &user, Some(NODES), ADMIN_DAYS)
            .map_err(|e| ApiError::Internal(format!("issuing the node's certificate: {e}")))?;
    let kubeconfig = crate::tls::kubeconfig_text(
        ca_cert.as_bytes(),
        &authority,
        &user,
        &Credential::ClientCert { cert_pem, key_pem },
    );
    Ok(Some(json!({
        "cluster": {"namespace": ns, "name": cluster},
        "podCidr": network.pods,
        "serviceCidr": network.services,
        "hostBlock": block,
        "kubeconfig": kubeconfig,
    })))
}

/// Makes the Host of a machine that joined by itself (provider `static`), validated as a
/// create through the API would be.
async fn create_static_host(
    state: &State,
    name: &str,
    zone: &str,
    class: &str,
) -> Result<(), ApiError> {
    let hosts = rt("hosts")?;
    let body = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "Host",
        "metadata": {"name": name},
        "spec": {"zone": zone, "hostClass": class, "provider": HostProvider::Static.name()},
    });
    let (mut host, causes) = hosts.decode(body)?;
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            kind: "Host".into(),
            name: name.into(),
            causes,
        });
    }
    stamp_new(&mut host);
    let bytes = serde_json::to_vec(&host).map_err(|e| ApiError::Internal(e.to_string()))?;
    match state
        .store
        .create(&keys::object(hosts, None, name), bytes)
        .await
    {
        // Two joins of one new host at once: the other made it, with the same spec.
        Ok(_) | Err(StoreError::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
