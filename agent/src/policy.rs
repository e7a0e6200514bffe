//! The agent's side of NetworkPolicy on one node: the desired state (namespaces, pods,
//! policies of the whole cluster), compiling and installing it into the node's maps within a
//! capacity budget, `explain` from the installed state, and the verdict events the datapath
//! raises, named and counted.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, RwLock};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use slipway_dataplane::abi::policy::{Direction, Event, Verdict};
use slipway_dataplane::node::Pins;
use slipway_dataplane::policy::{AsyncPolicyEvents, PolicyMaps, PolicyTables};
use tokio::sync::{Mutex, broadcast};
use tracing::{error, info};

use slipway_api::meta::decode_strict;
use slipway_cni::policy::compile::{
    self, Compiled, EndVerdict, Explanation, Namespace, Pod, protocol_name, protocol_number,
};
use slipway_cni::policy::types::NetworkPolicy;

/// The cluster state policy needs, as the local API receives it (and as it is persisted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Desired {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub policies: Vec<NetworkPolicy>,
}

/// The lists of [`Desired`], by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Namespaces,
    Pods,
    Policies,
}

impl ListKind {
    pub const ALL: [ListKind; 3] = [ListKind::Namespaces, ListKind::Pods, ListKind::Policies];

    /// The API path segment and file stem: `namespaces`, `pods`, `networkpolicies`.
    pub fn name(self) -> &'static str {
        match self {
            ListKind::Namespaces => "namespaces",
            ListKind::Pods => "pods",
            ListKind::Policies => "networkpolicies",
        }
    }

    fn path(self, dir: &std::path::Path) -> PathBuf {
        dir.join(format!("{}.json", self.name()))
    }
}

/// One list of [`Desired`], as a PUT carries it.
#[derive(Debug, Clone)]
pub enum List {
    Namespaces(Vec<Namespace>),
    Pods(Vec<Pod>),
    Policies(Vec<NetworkPolicy>),
}

impl List {
    /// Parses a JSON list item by item: every item that does not fit the schema is named by its
    /// index and name (`networkpolicies[2] (default/web): unknown field ...`), all at once.
    pub fn parse(kind: ListKind, bytes: &[u8]) -> Result<Self, Vec<String>> {
        let items: Vec<serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|e| vec![format!("{}: not a JSON list: {e}", kind.name())])?;
        Ok(match kind {
            ListKind::Namespaces => List::Namespaces(parse_items(kind, items)?),
            ListKind::Pods => List::Pods(parse_items(kind, items)?),
            ListKind::Policies => List::Policies(parse_items(kind, items)?),
        })
    }

    pub fn kind(&self) -> ListKind {
        match self {
            List::Namespaces(_) => ListKind::Namespaces,
            List::Pods(_) => ListKind::Pods,
            List::Policies(_) => ListKind::Policies,
        }
    }

    /// Every bad field, named `<list>[i].field`.
    fn validate(&self) -> Vec<String> {
        let errors = match self {
            List::Namespaces(list) => compile::validate_namespaces(list),
            List::Pods(list) => compile::validate_pods(list),
            List::Policies(list) => compile::validate_policies(list),
        };
        let name = self.kind().name();
        errors.into_iter().map(|e| format!("{name}{e}")).collect()
    }

    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            List::Namespaces(list) => serde_json::to_vec(list),
            List::Pods(list) => serde_json::to_vec(list),
            List::Policies(list) => serde_json::to_vec(list),
        }
    }

    fn set(self, desired: &mut Desired) {
        match self {
            List::Namespaces(list) => desired.namespaces = list,
            List::Pods(list) => desired.pods = list,
            List::Policies(list) => desired.policies = list,
        }
    }
}

/// Each item of `items` as a `T`, or an error per item that is not one (a field `T` does not
/// know included).
fn parse_items<T: serde::de::DeserializeOwned + Serialize>(
    kind: ListKind,
    items: Vec<serde_json::Value>,
) -> Result<Vec<T>, Vec<String>> {
    let mut parsed = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let name = item_name(&item);
        match decode_strict(item) {
            Ok(value) => parsed.push(value),
            Err(e) => errors.push(format!("{}[{i}]{name}: {e}", kind.name())),
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// ` (namespace/name)` or ` (name)` of a list item, from its top level or its metadata, when it
/// has one.
fn item_name(item: &serde_json::Value) -> String {
    let meta = item.get("metadata").unwrap_or(item);
    let field = |key: &str| meta.get(key).and_then(serde_json::Value::as_str);
    match (field("namespace"), field("name")) {
        (Some(ns), Some(name)) => format!(" ({ns}/{name})"),
        (None, Some(name)) => format!(" ({name})"),
        _ => String::new(),
    }
}

/// One end of a flow, named when it is a known pod.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowEnd {
    pub ip: Ipv4Addr,
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

/// A verdict event, as `GET /v1/flows` streams it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flow {
    pub time: String,
    /// `allow` or `deny`.
    pub verdict: String,
    /// What decided: `rule`, `open` (this end is not isolated; the other end is), `no-rule`,
    /// `fail-closed`.
    pub reason: String,
    /// The end that decided: `egress` (the source) or `ingress` (the destination).
    pub direction: String,
    pub src: FlowEnd,
    pub dst: FlowEnd,
    pub sport: u16,
    pub dport: u16,
    pub protocol: String,
    /// The policy and rule that allowed.
    pub policy: Option<String>,
    pub rule: Option<String>,
    /// The policies isolating the deciding end in that direction.
    pub policies: Vec<String>,
}

/// Filters of `GET /v1/flows` and `slipway flows`.
#[derive(Debug, Clone, Default)]
pub struct FlowFilter {
    pub namespace: Option<String>,
    /// A pod name, or namespace/name.
    pub pod: Option<String>,
    pub verdict: Option<String>,
    pub port: Option<u16>,
}

impl FlowFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        let ends = [&flow.src, &flow.dst];
        self.namespace
            .as_ref()
            .is_none_or(|ns| ends.iter().any(|e| e.namespace.as_ref() == Some(ns)))
            && self.pod.as_ref().is_none_or(|pod| {
                ends.iter().any(|e| match (&e.namespace, &e.pod) {
                    (Some(ns), Some(name)) => pod == name || *pod == format!("{ns}/{name}"),
                    _ => false,
                })
            })
            && self.verdict.as_ref().is_none_or(|v| *v == flow.verdict)
            && self.port.is_none_or(|p| p == flow.dport)
    }
}

/// What the installed state is, for explain, naming events and status.
#[derive(Debug, Default)]
struct View {
    /// Rule ids and selections (its tables moved to `tables`).
    compiled: Compiled,
    /// The cluster-wide tables with this node's fail-closed endpoints as installed.
    tables: PolicyTables,
    pods: BTreeMap<Ipv4Addr, (String, String)>,
    generation: u32,
    fail_closed: BTreeSet<(Ipv4Addr, Direction)>,
    errors: Vec<String>,
}

/// The node's policy controller.
pub struct PolicyNode {
    host_block: Ipv4Network,
    budget: usize,
    /// Where the desired state's lists are persisted, one file each.
    dir: PathBuf,
    pins: Pins,
    desired: Mutex<(Desired, PolicyMaps)>,
    view: RwLock<Arc<View>>,
    events: broadcast::Sender<Arc<Flow>>,
    recent: StdMutex<VecDeque<Arc<Flow>>>,
    verdicts: StdMutex<BTreeMap<(String, &'static str, &'static str), u64>>,
}

impl std::fmt::Debug for PolicyNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyNode")
            .field("host_block", &self.host_block)
            .finish_non_exhaustive()
    }
}

/// Events kept for `GET /v1/flows` without `follow`.
const RECENT: usize = 4096;

/// An error the API reports: the status code and the messages.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub errors: Vec<String>,
}

impl PolicyNode {
    /// Opens the node's policy maps and installs the persisted state (or an empty one, which
    /// starts connection tracking, so that connections opened before a policy arrives keep
    /// their replies when it does).
    pub async fn start(
        pins: &Pins,
        host_block: Ipv4Network,
        budget: usize,
        dir: PathBuf,
    ) -> anyhow::Result<Arc<Self>> {
        let maps = PolicyMaps::open(pins)?;
        let mut desired = Desired::default();
        for kind in ListKind::ALL {
            let file = kind.path(&dir);
            let bytes = match std::fs::read(&file) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => anyhow::bail!("reading {}: {e}", file.display()),
            };
            let list = List::parse(kind, &bytes)
                .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.join("; ")))?;
            list.set(&mut desired);
        }
        let node = Arc::new(Self {
            host_block,
            budget,
            dir,
            pins: pins.clone(),
            desired: Mutex::new((Desired::default(), maps)),
            view: RwLock::new(Arc::new(View::default())),
            events: broadcast::channel(RECENT).0,
            recent: StdMutex::new(VecDeque::new()),
            verdicts: StdMutex::new(BTreeMap::new()),
        });
        let mut guard = node.desired.lock().await;
        guard.0 = desired;
        node.install(&mut guard)
            .map_err(|e| anyhow::anyhow!("installing policy state: {}", e.errors.join("; ")))?;
        drop(guard);
        Ok(node)
    }

    pub async fn desired(&self) -> Desired {
        self.desired.lock().await.0.clone()
    }

    /// Replaces one list of the desired state: validates it, persists it (`raw`, the request
    /// body it was parsed from, when given) and installs the result. Returns the generation
    /// now enforced. Nothing changes when validation fails.
    pub async fn replace(&self, list: List, raw: Option<&[u8]>) -> Result<u32, ApiError> {
        let errors = list.validate();
        if !errors.is_empty() {
            return Err(ApiError {
                status: 400,
                errors,
            });
        }
        let internal = |e: String| ApiError {
            status: 500,
            errors: vec![e],
        };
        let file = list.kind().path(&self.dir);
        let body = match raw {
            Some(raw) => raw.to_vec(),
            None => list.to_json().map_err(|e| internal(e.to_string()))?,
        };
        let mut guard = self.desired.lock().await;
        crate::run::write_atomically(&file, &body)
            .map_err(|e| internal(format!("persisting {}: {e}", file.display())))?;
        list.set(&mut guard.0);
        self.install(&mut guard)
    }

    /// Compiles the desired state and installs this node's part.
    fn install(&self, guard: &mut (Desired, PolicyMaps)) -> Result<u32, ApiError> {
        let internal = |e: String| ApiError {
            status: 500,
            errors: vec![e],
        };
        let next = &guard.0;
        let started = std::time::Instant::now();
        let compiled = compile::compile(&next.namespaces, &next.pods, &next.policies);
        let local: BTreeSet<Ipv4Addr> = next
            .pods
            .iter()
            .map(|p| p.ip)
            .filter(|ip| self.host_block.contains(*ip))
            .collect();
        let mut tables = compiled.tables_for(&local);
        let mut fail_closed = self.over_budget(&compiled, &local);
        fail_closed_in(&mut tables, &fail_closed);
        let report = guard
            .1
            .install(&tables)
            .map_err(|e| internal(e.to_string()))?;
        fail_closed.extend(report.failed.iter().copied());

        let pods: BTreeMap<Ipv4Addr, (String, String)> = next
            .pods
            .iter()
            .map(|p| (p.ip, (p.namespace.clone(), p.name.clone())))
            .collect();
        let name = |ip: &Ipv4Addr| pod_name(&pods, *ip);
        let errors: Vec<String> = fail_closed
            .iter()
            .map(|(ep, d)| {
                format!(
                    "{}: {} rules ({} map entries) do not fit the policy map (budget {} entries on this node): the endpoint fails closed in {}",
                    name(ep),
                    d.as_str(),
                    compiled.entries.get(&(*ep, *d)).copied().unwrap_or(0),
                    self.budget,
                    d.as_str()
                )
            })
            .collect();
        for e in &errors {
            error!("{e}");
        }
        // The cluster-wide tables are not needed past this point but in the view.
        let mut compiled = compiled;
        let mut view_tables = std::mem::take(&mut compiled.tables);
        fail_closed_in(&mut view_tables, &fail_closed);
        info!(
            generation = report.generation,
            policies = next.policies.len(),
            pods = next.pods.len(),
            local_rules = tables.rules.len(),
            writes = report.writes,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "policy installed"
        );
        let view = View {
            compiled,
            tables: view_tables,
            pods,
            generation: report.generation,
            fail_closed,
            errors,
        };
        if let Ok(mut slot) = self.view.write() {
            *slot = Arc::new(view);
        }
        Ok(report.generation)
    }

    /// Endpoint directions that do not fit the budget: the map entries of this node's
    /// endpoints are taken in address order, and a direction that would cross the budget fails
    /// closed (its entries are not written; smaller ones after it may still fit).
    fn over_budget(
        &self,
        compiled: &Compiled,
        local: &BTreeSet<Ipv4Addr>,
    ) -> BTreeSet<(Ipv4Addr, Direction)> {
        let mut used = 0usize;
        let mut failed = BTreeSet::new();
        for ((ep, direction), count) in &compiled.entries {
            if !local.contains(ep) {
                continue;
            }
            if used + count > self.budget {
                failed.insert((*ep, *direction));
            } else {
                used += count;
            }
        }
        failed
    }

    fn view(&self) -> Arc<View> {
        self.view.read().map(|v| Arc::clone(&v)).unwrap_or_default()
    }

    /// Resolves `ns/pod` or an IPv4 address.
    pub fn resolve(&self, what: &str) -> Option<Ipv4Addr> {
        if let Ok(ip) = what.parse() {
            return Some(ip);
        }
        let (ns, name) = what.split_once('/')?;
        self.view()
            .pods
            .iter()
            .find(|(_, (n, p))| n == ns && p == name)
            .map(|(ip, _)| *ip)
    }

    /// The verdict on `src` -> `dst`:`port`/`protocol` from the installed state, as JSON.
    pub fn explain(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        protocol: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let mut errors = Vec::new();
        let src_ip = self.resolve(src);
        let dst_ip = self.resolve(dst);
        if src_ip.is_none() {
            errors.push(format!(
                "src: {src:?} is no known pod (namespace/name) or IPv4 address"
            ));
        }
        if dst_ip.is_none() {
            errors.push(format!(
                "dst: {dst:?} is no known pod (namespace/name) or IPv4 address"
            ));
        }
        let proto = protocol_number(protocol);
        if proto.is_none() {
            errors.push(format!("protocol: {protocol:?} is not TCP, UDP or SCTP"));
        }
        if port == 0 {
            errors.push("port: must be 1-65535".to_owned());
        }
        let (Some(src_ip), Some(dst_ip), Some(proto), true) =
            (src_ip, dst_ip, proto, errors.is_empty())
        else {
            return Err(ApiError {
                status: 400,
                errors,
            });
        };
        let view = self.view();
        let explanation = Compiled::explain(&view.tables, src_ip, dst_ip, port, proto);
        Ok(explanation_json(&view, &explanation, src_ip, dst_ip))
    }

    /// Status for `GET /v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let view = self.view();
        let name = |ip: &Ipv4Addr| pod_name(&view.pods, *ip);
        serde_json::json!({
            "generation": view.generation,
            "failClosed": view.fail_closed.iter().map(|(ep, d)| format!("{} {}", name(ep), d.as_str())).collect::<Vec<_>>(),
            "errors": view.errors,
        })
    }

    /// Recent events matching `filter`, and a receiver of the ones to come.
    pub fn flows(&self, filter: &FlowFilter) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        let receiver = self.events.subscribe();
        let recent = self
            .recent
            .lock()
            .map(|r| r.iter().filter(|f| filter.matches(f)).cloned().collect())
            .unwrap_or_default();
        (recent, receiver)
    }

    /// Reads the datapath's events until the agent exits.
    pub async fn pump_events(self: Arc<Self>) -> anyhow::Result<()> {
        let mut events = AsyncPolicyEvents::open(&self.pins)?;
        loop {
            let batch = events.next_batch().await?;
            let view = self.view();
            for event in batch {
                if let Some(flow) = self.flow(&view, &event) {
                    self.publish(flow);
                }
            }
        }
    }

    fn flow(&self, view: &View, event: &Event) -> Option<Flow> {
        let verdict = Verdict::from_raw(event.verdict)?;
        let direction = Direction::from_raw(event.direction)?;
        let end = |ip: Ipv4Addr| {
            let named = view.pods.get(&ip);
            FlowEnd {
                ip,
                namespace: named.map(|(ns, _)| ns.clone()),
                pod: named.map(|(_, name)| name.clone()),
            }
        };
        let (src, dst) = (event.src(), event.dst());
        let ep = match direction {
            Direction::Egress => src,
            Direction::Ingress => dst,
        };
        let rule = view.compiled.rule(event.rule_id);
        let reason = match (verdict, rule) {
            (Verdict::Allow, Some(_)) => "rule",
            (Verdict::Allow, None) => "open",
            (Verdict::Deny, _) => "no-rule",
            (Verdict::DenyFailClosed, _) => "fail-closed",
        };
        Some(Flow {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            verdict: if verdict.allows() { "allow" } else { "deny" }.to_owned(),
            reason: reason.to_owned(),
            direction: direction.as_str().to_owned(),
            src: end(src),
            dst: end(dst),
            sport: u16::from_be(event.sport),
            dport: u16::from_be(event.dport),
            protocol: protocol_name(event.proto)
                .map_or_else(|| event.proto.to_string(), str::to_owned),
            policy: rule.map(|r| r.policy.clone()),
            rule: rule.map(|r| r.field()),
            policies: view
                .compiled
                .selected_by
                .get(&(ep, direction))
                .cloned()
                .unwrap_or_default(),
        })
    }

    fn publish(&self, flow: Flow) {
        let direction = if flow.direction == "egress" {
            "egress"
        } else {
            "ingress"
        };
        let verdict = if flow.verdict == "allow" {
            "allow"
        } else {
            "deny"
        };
        if let Ok(mut counts) = self.verdicts.lock() {
            // An allow counts for the policy whose rule allowed; a deny for every policy that
            // isolates the endpoint (they deny together).
            let policies: Vec<String> = match &flow.policy {
                Some(p) => vec![p.clone()],
                None => flow.policies.clone(),
            };
            for policy in policies {
                *counts.entry((policy, direction, verdict)).or_default() += 1;
            }
        }
        let flow = Arc::new(flow);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&flow));
        }
        // No subscriber is no error.
        let _ = self.events.send(flow);
    }

    /// Prometheus text of the policy metrics.
    pub fn render_metrics(&self) -> String {
        use prometheus_client::encoding::EncodeLabelSet;
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        use prometheus_client::registry::Registry;

        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Labels {
            policy: String,
            direction: &'static str,
            verdict: &'static str,
        }
        let verdicts = Family::<Labels, Counter>::default();
        if let Ok(counts) = self.verdicts.lock() {
            for ((policy, direction, verdict), n) in counts.iter() {
                verdicts
                    .get_or_create(&Labels {
                        policy: policy.clone(),
                        direction,
                        verdict,
                    })
                    .inc_by(*n);
            }
        }
        let view = self.view();
        let generation = Gauge::<i64>::default();
        generation.set(i64::from(view.generation));
        let failed = Gauge::<i64>::default();
        failed.set(i64::try_from(view.fail_closed.len()).unwrap_or(i64::MAX));
        let mut registry = Registry::with_prefix("slipway_policy");
        registry.register(
            "verdicts",
            "Policy verdicts the datapath reported (allowed connections, denied packets)",
            verdicts,
        );
        registry.register("generation", "The policy generation enforced", generation);
        registry.register(
            "fail_closed_endpoints",
            "Endpoint directions failing closed because their rules did not fit",
            failed,
        );
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            text.clear();
        }
        text
    }
}

/// `namespace/name` of the pod at `ip`, or the address when no pod has it.
fn pod_name(pods: &BTreeMap<Ipv4Addr, (String, String)>, ip: Ipv4Addr) -> String {
    pods.get(&ip)
        .map_or_else(|| ip.to_string(), |(ns, name)| format!("{ns}/{name}"))
}

/// Makes the endpoint directions in `failed` fail closed in `tables`: their rules go, the flag
/// comes.
fn fail_closed_in(tables: &mut PolicyTables, failed: &BTreeSet<(Ipv4Addr, Direction)>) {
    for (ep, direction) in failed {
        tables
            .rules
            .retain(|r, _| !(r.ep == *ep && r.direction == *direction));
        *tables.endpoints.entry(*ep).or_default() |= direction.fail_closed_flag();
    }
}

fn explanation_json(
    view: &View,
    explanation: &Explanation,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> serde_json::Value {
    let end = |verdict: &EndVerdict, ep: Ipv4Addr, direction: Direction| {
        let rule = match verdict {
            EndVerdict::Allow { rule } => view.compiled.rule(*rule),
            _ => None,
        };
        serde_json::json!({
            "verdict": match verdict {
                EndVerdict::Open => "open",
                EndVerdict::Allow { .. } => "allow",
                EndVerdict::Deny => "deny",
                EndVerdict::FailClosed => "fail-closed",
            },
            "policy": rule.map(|r| r.policy.clone()),
            "rule": rule.map(|r| r.field()),
            "policies": view.compiled.selected_by.get(&(ep, direction)).cloned().unwrap_or_default(),
            "identity": compile::identity_of(&view.tables, match direction {
                Direction::Egress => dst,
                Direction::Ingress => src,
            }),
        })
    };
    serde_json::json!({
        "allowed": explanation.allowed(),
        "generation": view.generation,
        "egress": end(&explanation.egress, src, Direction::Egress),
        "ingress": end(&explanation.ingress, dst, Direction::Ingress),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_item_is_named_by_index_and_name() {
        let body = br#"[
            {"metadata": {"name": "ok", "namespace": "a"}, "spec": {}},
            {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"podSelectr": {}}},
            {"metadata": {"name": "db"}, "spec": {"ingress": [{"form": []}]}}
        ]"#;
        let errors = List::parse(ListKind::Policies, body).expect_err("two bad items");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0]
                .starts_with("networkpolicies[1] (shop/web): unknown field \"spec.podSelectr\""),
            "{}",
            errors[0]
        );
        assert!(
            errors[1]
                .starts_with("networkpolicies[2] (db): unknown field \"spec.ingress[0].form\""),
            "{}",
            errors[1]
        );
        assert!(
            errors.iter().all(|e| !e.contains("column")),
            "positions of the rebuilt body mean nothing to the user: {errors:?}"
        );
        assert!(List::parse(ListKind::Policies, b"{}").is_err());
    }
}
