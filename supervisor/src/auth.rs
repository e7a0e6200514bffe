//! Authentication (bearer tokens from a token file, client certificates from the supervisor's
//! CA) and authorization (per-namespace view / edit / owner from RoleBindings, plus
//! cluster-admin for the `system:masters` group).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::api::registry::{ResourceType, lookup};
use crate::error::ApiError;
use crate::store::{AnyStore, Store};

/// The group whose members are cluster administrators.
pub const MASTERS: &str = "system:masters";

/// The group of the supervisor's controllers: the only identities besides cluster-admin that
/// write status (`*/status`), the field controllers own. They read everything and update
/// objects (finalizers), but create and delete nothing and never touch RoleBindings.
pub const CONTROLLERS: &str = "system:slipway:controllers";

/// The group of host agents (`system:host:<name>`, certificates issued on join): each renews
/// its own Lease, writes its own Host's status, and reads Hosts, Zones and HostClasses.
pub const HOSTS: &str = "system:slipway:hosts";

/// The user name prefix of a host agent.
pub const HOST_USER_PREFIX: &str = "system:host:";

/// A host agent's client certificate, signed by `pki`: user `system:host:<host>` in [`HOSTS`]
/// for the API, and the host's NBD client name as a subject alternative name for block stores
/// (their export allow-lists); returns (certificate PEM, key PEM).
pub fn issue_host_identity(
    pki: &crate::tls::Pki,
    host: &str,
    days: u32,
) -> Result<(String, String), crate::tls::TlsError> {
    pki.issue_client_named(
        &format!("{HOST_USER_PREFIX}{host}"),
        Some(HOSTS),
        &[slipway_api::volumes::host_nbd_client(host)],
        days,
    )
}

/// The group of a workload cluster's nodes (`system:node:<name>`, certificates signed by the
/// cluster's CA, issued when their host joins): what the node authorizer lets a kubelet do.
pub const NODES: &str = "system:nodes";

/// The user name prefix of a node.
pub const NODE_USER_PREFIX: &str = "system:node:";

/// The group of workload clusters' links to their supervisor namespace
/// (`system:cluster:<namespace>:<cluster>`, certificates issued to the cluster's control plane
/// hosts when they join): what the cluster's cloud provider and paravirtual CSI controller do
/// in the supervisor, in that namespace only (see [`CLUSTER_LINK_RESOURCES`]).
pub const CLUSTERS: &str = "system:slipway:clusters";

/// The user name prefix of a workload cluster's link.
pub const CLUSTER_USER_PREFIX: &str = "system:cluster:";

/// What a workload cluster's link may touch in its own supervisor namespace: (group, plural,
/// subresource, verbs). Everything else, and every other namespace, is forbidden. The link
/// reads status its objects are given (a LoadBalancer's VIP, a claim's binding) but never
/// writes it: that belongs to the supervisor's reconcilers.
pub const CLUSTER_LINK_RESOURCES: &[(&str, &str, Option<&str>, &[&str])] = &[
    ("", "services", None, ALL_VERBS),
    ("", "services", Some("status"), READ_VERBS),
    // The cloud provider's mirrors' backends: the cluster's nodes at their node ports.
    ("discovery.k8s.io", "endpointslices", None, ALL_VERBS),
    ("", "persistentvolumeclaims", None, ALL_VERBS),
    ("", "persistentvolumeclaims", Some("status"), READ_VERBS),
    // The pvCSI controller's snapshots and its requests to attach volumes to its hosts.
    (
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        None,
        ALL_VERBS,
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        Some("status"),
        READ_VERBS,
    ),
    (
        slipway_api::slipway::GROUP,
        "hostvolumeattachments",
        None,
        ALL_VERBS,
    ),
    (
        slipway_api::slipway::GROUP,
        "hostvolumeattachments",
        Some("status"),
        READ_VERBS,
    ),
    (
        "",
        "events",
        None,
        &["get", "list", "watch", "create", "patch"],
    ),
];

const READ_VERBS: &[&str] = &["get", "list", "watch"];
const ALL_VERBS: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];

/// The group of callers holding a bootstrap token (kubeadm's format, `<id>.<secret>`, kept as a
/// Secret `bootstrap-token-<id>` in `slipway-system`): they may only join a host.
pub const BOOTSTRAPPERS: &str = "system:slipway:bootstrappers";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// User name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
}

impl UserInfo {
    /// Whether the user is a cluster administrator.
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS)
    }

    /// Whether the user is one of the supervisor's controllers.
    pub fn is_controller(&self) -> bool {
        self.groups.iter().any(|g| g == CONTROLLERS)
    }

    /// The node a kubelet speaks for, if the user is one.
    pub fn node(&self) -> Option<&str> {
        self.groups
            .iter()
            .any(|g| g == NODES)
            .then(|| self.name.strip_prefix(NODE_USER_PREFIX))
            .flatten()
    }

    /// The host a host agent speaks for, if the user is one.
    pub fn host(&self) -> Option<&str> {
        self.groups
            .iter()
            .any(|g| g == HOSTS)
            .then(|| self.name.strip_prefix(HOST_USER_PREFIX))
            .flatten()
    }

    /// The supervisor namespace and cluster a workload cluster's link speaks for, if the user
    /// is one.
    pub fn cluster_link(&self) -> Option<(&str, &str)> {
        self.groups
            .iter()
            .any(|g| g == CLUSTERS)
            .then(|| self.name.strip_prefix(CLUSTER_USER_PREFIX))
            .flatten()
            .and_then(|rest| rest.split_once(':'))
    }

    /// Whether the user authenticated with a bootstrap token.
    pub fn is_bootstrapper(&self) -> bool {
        self.groups.iter().any(|g| g == BOOTSTRAPPERS)
    }
}

/// Token file failures.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file could not be read.
    #[error("reading token file {0}")]
    Read(String, #[source] std::io::Error),
    /// A line is malformed.
    #[error("token file line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Maps bearer tokens to users.
#[derive(Debug, Default, Clone)]
pub struct Authenticator {
    tokens: HashMap<String, UserInfo>,
}

impl Authenticator {
    /// Loads a token file in kube-apiserver's format: `token,user,uid[,"group1,group2"]`
    /// (one per line; `#` comments and blank lines ignored).
    pub fn from_token_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuthError::Read(path.display().to_string(), e))?;
        Self::parse(&text)
    }

    /// Parses token file text.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, groups) = match line.split_once('"') {
                Some((h, g)) => (h.trim_end_matches(','), g.trim_end_matches('"')),
                None => (line, ""),
            };
            let fields: Vec<&str> = head.split(',').map(str::trim).collect();
            if fields.len() < 2 || fields[0].is_empty() || fields[1].is_empty() {
                return Err(AuthError::Parse {
                    line: i + 1,
                    message: "expected token,user,uid[,\"groups\"]".into(),
                });
            }
            let mut groups: Vec<String> = groups
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect();
            if fields.len() > 3 {
                groups.extend(
                    fields[3..]
                        .iter()
                        .filter(|g| !g.is_empty())
                        .map(|g| g.to_string()),
                );
            }
            tokens.insert(
                fields[0].to_string(),
                UserInfo {
                    name: fields[1].to_string(),
                    groups,
                },
            );
        }
        Ok(Self { tokens })
    }

    /// Identifies the caller: a valid bearer token, else a verified client certificate.
    /// Anonymous requests are refused (401).
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        cert_user: Option<&UserInfo>,
    ) -> Result<UserInfo, ApiError> {
        if let Some(h) = authorization {
            let token = h
                .strip_prefix("Bearer ")
                .map(str::trim)
                .ok_or(ApiError::Unauthorized)?;
            return self
                .tokens
                .get(token)
                .cloned()
                .ok_or(ApiError::Unauthorized);
        }
        cert_user.cloned().ok_or(ApiError::Unauthorized)
    }
}

/// Namespace roles, in increasing power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read everything but RoleBindings.
    View,
    /// View plus write everything but RoleBindings.
    Edit,
    /// Edit plus manage RoleBindings.
    Owner,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "view" => Some(Self::View),
            "edit" => Some(Self::Edit),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }

    fn allows(self, verb: &str, rt: &ResourceType) -> bool {
        let read = matches!(verb, "get" | "list" | "watch");
        let rbac = rt.group == "rbac.authorization.k8s.io";
        match self {
            // As Kubernetes' view role: Secrets are not for readers.
            Self::View => read && !rbac && !(rt.group.is_empty() && rt.plural == "secrets"),
            Self::Edit => !rbac,
            Self::Owner => true,
        }
    }
}

/// The strongest role `user` holds in `namespace`, from the namespace's RoleBindings.
pub async fn role_in(
    store: &AnyStore,
    user: &UserInfo,
    namespace: &str,
) -> Result<Option<Role>, ApiError> {
    strongest_role(store, user, Some(namespace)).await
}

/// The strongest role `user` holds in `namespace`, or in any namespace when None.
async fn strongest_role(
    store: &AnyStore,
    user: &UserInfo,
    namespace: Option<&str>,
) -> Result<Option<Role>, ApiError> {
    let Some(rb) = lookup("rbac.authorization.k8s.io", "v1", "rolebindings") else {
        return Ok(None);
    };
    let (items, _) = store
        .list(&crate::server::keys::prefix(rb, namespace))
        .await?;
    let mut best = None;
    for kv in items {
        let Ok(obj) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let bound = obj
            .get("subjects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|s| {
                let name = s.get("name").and_then(Value::as_str).unwrap_or_default();
                match s.get("kind").and_then(Value::as_str) {
                    Some("User") => name == user.name,
                    Some("Group") => user.groups.iter().any(|g| g == name),
                    _ => false,
                }
            });
        if bound {
            let role = obj
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .and_then(Role::parse);
            best = best.max(role);
        }
    }
    Ok(best)
}

/// Decides whether `user` may do `verb` on `rt` (its `subresource`, if any; the object
/// `name`, if one) in `namespace` (None = cluster scope or all namespaces). Enforced on every
/// verb, watch included.
pub async fn authorize(
    store: &AnyStore,
    user: &UserInfo,
    verb: &str,
    rt: &ResourceType,
    subresource: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<(), ApiError> {
    if user.is_admin() {
        return Ok(());
    }
    let forbidden = || ApiError::Forbidden {
        user: user.name.clone(),
        verb: verb.to_string(),
        resource: match subresource {
            Some(sub) => format!("{}/{sub}", rt.plural),
            None => rt.plural.to_string(),
        },
        group: rt.group.to_string(),
        namespace: namespace.map(String::from),
    };
    let read = matches!(verb, "get" | "list" | "watch");
    if user.is_controller() {
        let rbac = rt.group == "rbac.authorization.k8s.io";
        // Hosts are made and removed by the controllers (a Cluster's hosts, replacements), and
        // so are the bootstrap tokens the hosts they start join with, and the Events they
        // record; a removed host's Lease goes with it. The volume reconciler makes and
        // removes the PVs of the claims it provisions.
        let owned = (rt.group == slipway_api::slipway::GROUP && rt.plural == "hosts")
            || (rt.group.is_empty()
                && matches!(rt.plural, "secrets" | "events" | "persistentvolumes"))
            || (verb == "delete"
                && rt.group == "coordination.k8s.io"
                && rt.plural == "leases"
                && namespace == Some(slipway_api::slipway::HOST_LEASE_NAMESPACE));
        return if read
            || (matches!(verb, "update" | "patch") && !rbac)
            || (matches!(verb, "create" | "delete") && owned)
        {
            Ok(())
        } else {
            Err(forbidden())
        };
    }
    if let Some(host) = user.host() {
        return if host_may(host, verb, rt, subresource, namespace, name)
            || edge_may(store, host, verb, rt, subresource, namespace).await?
        {
            Ok(())
        } else {
            Err(forbidden())
        };
    }
    if let Some(node) = user.node() {
        let allowed = node_may(node, verb, rt, subresource, name)
            && match node_reference_kind(rt) {
                None => true,
                // What Pods mount, one object at a time, and only if a Pod bound to the
                // node uses it (kube-apiserver's Node authorizer).
                Some(kind) => match (verb, namespace, name) {
                    ("get", Some(ns), Some(name)) => node_uses(store, node, kind, ns, name).await?,
                    _ => false,
                },
            };
        return if allowed { Ok(()) } else { Err(forbidden()) };
    }
    if let Some((own, _)) = user.cluster_link() {
        return if cluster_may(own, verb, rt, subresource, namespace) {
            Ok(())
        } else {
            Err(forbidden())
        };
    }
    if user.is_bootstrapper() {
        // A bootstrap token only joins (see `server::join`); it reads and writes nothing.
        return Err(forbidden());
    }
    // Status belongs to the controllers: no namespace role writes it.
    if subresource == Some("status") && !read {
        return Err(forbidden());
    }
    match (rt.namespaced, namespace) {
        // Cluster-scoped kinds (namespaces, classes, zones) are readable by every user.
        // A tenant reads the namespaces it holds a role in, one by name (the list would show
        // other teams' limits), and the classes and zones once it holds any role at all.
        (false, _) if !read => Err(forbidden()),
        (false, _) if rt.group.is_empty() && rt.plural == "namespaces" => match name {
            Some(ns) if role_in(store, user, ns).await?.is_some() => Ok(()),
            _ => Err(forbidden()),
        },
        (false, _) => match strongest_role(store, user, None).await? {
            Some(_) => Ok(()),
            None => Err(forbidden()),
        },
        (true, None) => Err(forbidden()),
        (true, Some(ns)) => match role_in(store, user, ns).await? {
            Some(role) if role.allows(verb, rt) => Ok(()),
            _ => Err(forbidden()),
        },
    }
}

/// What an edge host (a Host of pool `edge`, no cluster) may do besides any host: read the
/// Services and EndpointSlices it serves VIPs for, and hold the VIPs' Leases in
/// `slipway-lb`. Asked only for those resources, so other hosts' requests cost no store read.
async fn edge_may(
    store: &AnyStore,
    host: &str,
    verb: &str,
    rt: &ResourceType,
    subresource: Option<&str>,
    namespace: Option<&str>,
) -> Result<bool, ApiError> {
    let read = matches!(verb, "get" | "list" | "watch");
    let wanted = match (rt.group, rt.plural) {
        ("", "services") | ("discovery.k8s.io", "endpointslices") => read && subresource.is_none(),
        ("coordination.k8s.io", "leases") => {
            namespace == Some(slipway_api::slipway::VIP_LEASE_NAMESPACE)
                && matches!(
                    verb,
                    "get" | "list" | "watch" | "create" | "update" | "patch" | "delete"
                )
        }
        _ => false,
    };
    if !wanted {
        return Ok(false);
    }
    let Some(hosts) = lookup(
        slipway_api::slipway::GROUP,
        slipway_api::slipway::VERSION,
        "hosts",
    ) else {
        return Ok(false);
    };
    let Some(kv) = store
        .get(&crate::server::keys::object(hosts, None, host))
        .await?
    else {
        return Ok(false);
    };
    let obj: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
    Ok(obj["spec"]["pool"] == slipway_api::slipway::EDGE_POOL && obj["spec"]["cluster"].is_null())
}

/// What a host agent may do (the node authorizer's idea, for Slipway's kinds): renew its own
/// Lease in `slipway-system`, write its own Host's status, read Hosts, Zones and HostClasses.
fn host_may(
    host: &str,
    verb: &str,
    rt: &ResourceType,
    subresource: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let read = matches!(verb, "get" | "list" | "watch");
    let own = name == Some(host);
    match (rt.group, rt.plural) {
        ("coordination.k8s.io", "leases") => {
            namespace == Some(slipway_api::slipway::HOST_LEASE_NAMESPACE)
                // A create names its object in the body; the Lease's holder is checked by
                // the host health controller, which reads only the Lease named after a Host.
                && (verb == "create" || (own && matches!(verb, "get" | "update" | "patch")))
        }
        (slipway_api::slipway::GROUP, "hosts") => {
            read || (own && subresource == Some("status") && matches!(verb, "update" | "patch"))
        }
        (slipway_api::slipway::GROUP, "zones" | "hostclasses") => read,
        _ => false,
    }
}

/// What a workload cluster's link may do: [`CLUSTER_LINK_RESOURCES`] in its own namespace.
fn cluster_may(
    own: &str,
    verb: &str,
    rt: &ResourceType,
    subresource: Option<&str>,
    namespace: Option<&str>,
) -> bool {
    namespace == Some(own)
        && CLUSTER_LINK_RESOURCES
            .iter()
            .any(|&(group, plural, sub, verbs)| {
                group == rt.group
                    && plural == rt.plural
                    && sub == subresource
                    && verbs.contains(&verb)
            })
}

/// What a node's agent may do in its workload cluster (kube-apiserver's Node authorizer and the
/// `system:node` role, coarser): read what the datapath, the pod runner and the DNS server
/// follow — Nodes, Pods, Services, Endpoints, EndpointSlices, Namespaces, NetworkPolicies — and
/// what Pods mount (ConfigMaps, Secrets, claims, their PersistentVolumes and
/// VolumeAttachments); write Pods' and its own Node's status; record Events. Secrets,
/// ConfigMaps and claims are narrowed further in [`authorize`]: one at a time, and only those a
/// Pod bound to the node uses.
fn node_may(
    node: &str,
    verb: &str,
    rt: &ResourceType,
    subresource: Option<&str>,
    name: Option<&str>,
) -> bool {
    let read = matches!(verb, "get" | "list" | "watch");
    let write_status = subresource == Some("status") && matches!(verb, "update" | "patch");
    match (rt.group, rt.plural) {
        ("", "pods") => read || write_status,
        ("", "nodes") => read || (write_status && name == Some(node)),
        ("", "events") => verb == "create" || verb == "patch",
        (
            "",
            "services"
            | "endpoints"
            | "namespaces"
            | "configmaps"
            | "secrets"
            | "persistentvolumeclaims",
        )
        | ("discovery.k8s.io", "endpointslices")
        | ("networking.k8s.io", "networkpolicies")
        // What mounting a Pod's claims takes: its volume, and the volume's attachment here.
        | ("", "persistentvolumes")
        | ("storage.k8s.io", "volumeattachments") => read && subresource.is_none(),
        _ => false,
    }
}

/// What a Pod names that a node may read only through that Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodReference {
    Secret,
    ConfigMap,
    Claim,
}

fn node_reference_kind(rt: &ResourceType) -> Option<PodReference> {
    match (rt.group, rt.plural) {
        ("", "secrets") => Some(PodReference::Secret),
        ("", "configmaps") => Some(PodReference::ConfigMap),
        ("", "persistentvolumeclaims") => Some(PodReference::Claim),
        _ => None,
    }
}

/// The names of `kind` that `pod` (its JSON) uses: volumes (projected ones too), env and
/// envFrom of every container, image pull secrets.
fn pod_references(pod: &Value, kind: PodReference) -> Vec<String> {
    fn list(v: &Value) -> &[Value] {
        v.as_array().map(Vec::as_slice).unwrap_or_default()
    }
    let spec = &pod["spec"];
    let mut out = Vec::new();
    let mut add = |v: &Value| {
        if let Some(n) = v.as_str().filter(|n| !n.is_empty()) {
            out.push(n.to_owned());
        }
    };
    for vol in list(&spec["volumes"]) {
        match kind {
            PodReference::Secret => add(&vol["secret"]["secretName"]),
            PodReference::ConfigMap => add(&vol["configMap"]["name"]),
            PodReference::Claim => add(&vol["persistentVolumeClaim"]["claimName"]),
        }
        for source in list(&vol["projected"]["sources"]) {
            match kind {
                PodReference::Secret => add(&source["secret"]["name"]),
                PodReference::ConfigMap => add(&source["configMap"]["name"]),
                PodReference::Claim => {}
            }
        }
    }
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(|k| list(&spec[k]));
    for c in containers {
        for env in list(&c["env"]) {
            match kind {
                PodReference::Secret => add(&env["valueFrom"]["secretKeyRef"]["name"]),
                PodReference::ConfigMap => add(&env["valueFrom"]["configMapKeyRef"]["name"]),
                PodReference::Claim => {}
            }
        }
        for from in list(&c["envFrom"]) {
            match kind {
                PodReference::Secret => add(&from["secretRef"]["name"]),
                PodReference::ConfigMap => add(&from["configMapRef"]["name"]),
                PodReference::Claim => {}
            }
        }
    }
    if kind == PodReference::Secret {
        for s in list(&spec["imagePullSecrets"]) {
            add(&s["name"]);
        }
    }
    out
}

/// Whether a Pod of `namespace` bound to `node` uses `kind` `name`.
async fn node_uses(
    store: &AnyStore,
    node: &str,
    kind: PodReference,
    namespace: &str,
    name: &str,
) -> Result<bool, ApiError> {
    let Some(pods) = lookup("", "v1", "pods") else {
        return Ok(false);
    };
    let (kvs, _) = store
        .list(&crate::server::keys::prefix(pods, Some(namespace)))
        .await?;
    Ok(kvs.iter().any(|kv| {
        let pod: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
        pod["spec"]["nodeName"] == node && pod_references(&pod, kind).iter().any(|n| n == name)
    }))
}

/// Whether `token` has the shape of a bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`); its id.
pub fn bootstrap_token_id(token: &str) -> Option<&str> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, 6) && ok(secret, 16)).then_some(id)
}

/// What a bootstrap token's Secret says, once checked against the presented token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// The token's id (the user is `system:bootstrap:<id>`).
    pub id: String,
    /// The one host the token may join, when it is bound to one (data key `host-name`).
    pub host: Option<String>,
}

/// Checks a bearer token against the bootstrap token Secrets: `Ok(None)` when it is not a
/// bootstrap token at all, `Err(Unauthorized)` when it looks like one but does not match, is
/// expired or not meant for authentication.
pub async fn bootstrap_token(
    store: &AnyStore,
    authorization: Option<&str>,
    now: i64,
) -> Result<Option<BootstrapToken>, ApiError> {
    let Some(token) = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return Ok(None);
    };
    let Some(id) = bootstrap_token_id(token) else {
        return Ok(None);
    };
    let Some(rt) = lookup("", "v1", "secrets") else {
        return Err(ApiError::Unauthorized);
    };
    let key = crate::server::keys::object(
        rt,
        Some(slipway_api::slipway::HOST_LEASE_NAMESPACE),
        &format!("bootstrap-token-{id}"),
    );
    let Some(stored) = store.get(&key).await.map_err(ApiError::from)? else {
        return Err(ApiError::Unauthorized);
    };
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_slice(&stored.value).map_err(|_| ApiError::Unauthorized)?;
    let field = |k: &str| -> Option<String> {
        let bytes = secret.data.as_ref()?.get(k)?;
        String::from_utf8(bytes.0.clone()).ok()
    };
    let expected = format!("{id}.{}", field("token-secret").unwrap_or_default());
    let usable = secret.type_.as_deref() == Some(BOOTSTRAP_TOKEN_TYPE)
        && field("token-id").as_deref() == Some(id)
        && field("usage-bootstrap-authentication").as_deref() == Some("true")
        && constant_time_eq(expected.as_bytes(), token.as_bytes());
    let expired = field("expiration")
        .map(|e| crate::api::meta::parse_rfc3339(&e).is_none_or(|t| t <= now))
        .unwrap_or(false);
    if !usable || expired {
        return Err(ApiError::Unauthorized);
    }
    Ok(Some(BootstrapToken {
        id: id.to_owned(),
        host: field(BOOTSTRAP_TOKEN_HOST),
    }))
}

/// The Secret type of a bootstrap token.
pub const BOOTSTRAP_TOKEN_TYPE: &str = "bootstrap.kubernetes.io/token";

/// The data key binding a bootstrap token to one host.
pub const BOOTSTRAP_TOKEN_HOST: &str = "host-name";

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_parses_groups() -> Result<(), AuthError> {
        let a = Authenticator::parse("# comment\nt1,alice,1,\"team-a,team-b\"\nt2,bob,2\n")?;
        let alice = a
            .authenticate(Some("Bearer t1"), None)
            .map_err(|e| AuthError::Parse {
                line: 0,
                message: e.to_string(),
            })?;
        assert_eq!(alice.groups, vec!["team-a", "team-b"]);
        assert!(a.authenticate(Some("Bearer nope"), None).is_err());
        assert!(a.authenticate(None, None).is_err());
        assert!(Authenticator::parse("justatoken\n").is_err());
        Ok(())
    }

    #[test]
    fn a_cluster_link_reaches_its_own_namespace_only() {
        let user = UserInfo {
            name: "system:cluster:team-a:web".into(),
            groups: vec![CLUSTERS.into()],
        };
        assert_eq!(user.cluster_link(), Some(("team-a", "web")));
        let rt = |group, version, plural| lookup(group, version, plural).expect("served");
        let services = rt("", "v1", "services");
        let may = |verb, rt, sub, ns| cluster_may("team-a", verb, rt, sub, ns);
        assert!(may("create", services, None, Some("team-a")));
        assert!(may("watch", services, Some("status"), Some("team-a")));
        assert!(!may("update", services, Some("status"), Some("team-a")));
        assert!(!may("create", services, None, Some("team-b")));
        assert!(!may("list", services, None, None));
        assert!(may(
            "delete",
            rt("", "v1", "persistentvolumeclaims"),
            None,
            Some("team-a")
        ));
        assert!(!may("get", rt("", "v1", "secrets"), None, Some("team-a")));
        assert!(!may("get", rt("", "v1", "pods"), None, Some("team-a")));
        // A name without the namespace part, or outside the group, is no link.
        let bare = UserInfo {
            name: "system:cluster:team-a".into(),
            groups: vec![CLUSTERS.into()],
        };
        assert_eq!(bare.cluster_link(), None);
        let outside = UserInfo {
            name: "system:cluster:team-a:web".into(),
            groups: vec![],
        };
        assert_eq!(outside.cluster_link(), None);
    }

    #[test]
    fn a_pod_names_what_its_node_may_read() {
        let pod = serde_json::json!({"spec": {
            "volumes": [
                {"name": "a", "secret": {"secretName": "vol-secret"}},
                {"name": "b", "configMap": {"name": "vol-cm"}},
                {"name": "c", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "d", "projected": {"sources": [
                    {"secret": {"name": "proj-secret"}}, {"configMap": {"name": "proj-cm"}}]}},
            ],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "init-secret"}}]}],
            "containers": [{"name": "c", "env": [
                {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "env-cm", "key": "k"}}},
                {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "k"}}},
                {"name": "Z", "value": "plain"},
            ]}],
            "imagePullSecrets": [{"name": "pull"}],
        }});
        let names = |kind| pod_references(&pod, kind);
        assert_eq!(
            names(PodReference::Secret),
            [
                "vol-secret",
                "proj-secret",
                "init-secret",
                "env-secret",
                "pull"
            ]
        );
        assert_eq!(
            names(PodReference::ConfigMap),
            ["vol-cm", "proj-cm", "env-cm"]
        );
        assert_eq!(names(PodReference::Claim), ["data"]);
        assert!(pod_references(&serde_json::json!({}), PodReference::Secret).is_empty());
        let rt = |plural| lookup("", "v1", plural).expect("served");
        assert_eq!(node_reference_kind(rt("pods")), None);
        assert_eq!(
            node_reference_kind(rt("secrets")),
            Some(PodReference::Secret)
        );
    }
}
