//! The datapath fed by a Kubernetes API (`--cluster-kubeconfig`): reflectors (kube-rs list+watch,
//! upstream kinds only, so any kube-apiserver will do) over Nodes, Services, EndpointSlices,
//! Namespaces, Pods and NetworkPolicies, and one level-triggered loop that, after every burst
//! of watch events, recomputes the agent's lists from what the stores hold ([`convert`]) and
//! applies each one that differs from what the agent has, through the same functions the local
//! API's PUTs used ([`crate::api::apply_hosts`], ...). A watch that fails is retried by its
//! watcher with back-off; the stores, and so the datapath, keep their last state meanwhile.

pub mod convert;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::api::{Reply, apply_hosts, apply_policy_list, apply_services};
use crate::hosts::validate_hosts;
use crate::policy::List;
use crate::run::Agent;
use crate::services::validate_services;
use convert::{Converted, admit};

/// How long the loop waits after an event for the rest of its burst, so a burst applies once.
pub const DEBOUNCE: Duration = Duration::from_millis(75);

/// How often the lists are recomputed when the API is quiet (a failed apply is retried then).
pub const RESYNC: Duration = Duration::from_secs(30);

/// The value of `--cluster-kubeconfig` that means the Pod's service account
/// (`kube::Config::incluster`: `KUBERNETES_SERVICE_HOST`/`_PORT` and the token and CA mounted at
/// `/var/run/secrets/kubernetes.io/serviceaccount`), as a DaemonSet runs the agent.
pub const IN_CLUSTER: &str = "in-cluster";

/// A client of the cluster API: from the kubeconfig at `source`, or [`IN_CLUSTER`].
pub async fn client(source: &Path) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let config = if source == Path::new(IN_CLUSTER) {
        kube::Config::incluster().context("--cluster-kubeconfig in-cluster")?
    } else {
        let kubeconfig = kube::config::Kubeconfig::read_from(source)
            .with_context(|| format!("--cluster-kubeconfig: reading {}", source.display()))?;
        kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .context("--cluster-kubeconfig")?
    };
    kube::Client::try_from(config).context("the cluster's client")
}

/// The lists the feed applies, as metric labels.
const LISTS: [&str; 5] = ["hosts", "services", "namespaces", "pods", "networkpolicies"];

/// What the feed is fed from, and its counters for `/metrics`.
#[derive(Debug)]
pub struct Feed {
    /// The `--cluster-kubeconfig` value, named in the local API's refusals.
    pub source: String,
    counters: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Applies by list and result (`ok` or `error`).
    applies: BTreeMap<(&'static str, &'static str), u64>,
    /// Objects in each store, by kind.
    seen: BTreeMap<&'static str, usize>,
    /// Objects left out of each list.
    skipped: BTreeMap<&'static str, usize>,
    /// The last failed apply's reply per list, so a failure that repeats is logged once.
    failing: BTreeMap<&'static str, String>,
}

impl Feed {
    pub fn new(source: &Path) -> Self {
        Self {
            source: source.display().to_string(),
            counters: Mutex::new(Counters::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        f(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Prometheus text of the feed's counters (prefix `slipway_feed`).
    pub fn render_metrics(&self) -> String {
        use prometheus_client::encoding::EncodeLabelSet;
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        use prometheus_client::registry::Registry;

        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Apply {
            list: &'static str,
            result: &'static str,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Kind {
            kind: &'static str,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct ListLabel {
            list: &'static str,
        }
        let applies = Family::<Apply, Counter>::default();
        let seen = Family::<Kind, Gauge<i64>>::default();
        let skipped = Family::<ListLabel, Gauge<i64>>::default();
        self.with(|c| {
            for list in LISTS {
                // Every list's series exists from the start, at 0.
                drop(applies.get_or_create(&Apply { list, result: "ok" }));
            }
            for ((list, result), n) in &c.applies {
                applies.get_or_create(&Apply { list, result }).inc_by(*n);
            }
            for (kind, n) in &c.seen {
                seen.get_or_create(&Kind { kind })
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            for (list, n) in &c.skipped {
                skipped
                    .get_or_create(&ListLabel { list })
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        });
        let mut registry = Registry::with_prefix("slipway_feed");
        registry.register(
            "applies",
            "Lists the cluster feed applied to the datapath, by list and result",
            applies,
        );
        registry.register(
            "objects",
            "Objects of each kind the cluster feed's reflectors hold",
            seen,
        );
        registry.register(
            "skipped_objects",
            "Objects the cluster feed left out of each list (logged with the reason)",
            skipped,
        );
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            text.clear();
        }
        text
    }
}

/// A reflector's store and whether its first list is in (an empty store before that is not
/// "no objects": nothing is applied until every store has listed).
struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    kind: &'static str,
    store: Store<K>,
    listed: Arc<AtomicBool>,
}

/// Starts a reflector over every `K` of the cluster on `tasks`; each event wakes `notify`.
fn watch<K>(
    client: &kube::Client,
    kind: &'static str,
    notify: &Arc<Notify>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Watched<K>
where
    K: Resource + Clone + Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let listed = Arc::new(AtomicBool::new(false));
    let (notify, flag) = (Arc::clone(notify), Arc::clone(&listed));
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        info!(kind, "watch recovered");
                        failing = false;
                    }
                    if matches!(event, watcher::Event::InitDone) {
                        flag.store(true, Ordering::Release);
                    }
                    notify.notify_one();
                }
                // Once per outage at warn: the watcher retries with back-off.
                Err(error) if !failing => {
                    warn!(kind, %error, "watching the cluster API failed; retrying, the datapath keeps its state");
                    failing = true;
                }
                Err(error) => debug!(kind, %error, "watch still failing"),
            }
        }
    });
    Watched {
        kind,
        store,
        listed,
    }
}

/// The stores the lists are computed from.
struct Stores {
    nodes: Watched<Node>,
    services: Watched<Service>,
    slices: Watched<EndpointSlice>,
    namespaces: Watched<Namespace>,
    pods: Watched<Pod>,
    policies: Watched<NetworkPolicy>,
}

impl Stores {
    fn listed(&self) -> bool {
        [
            &self.nodes.listed,
            &self.services.listed,
            &self.slices.listed,
            &self.namespaces.listed,
            &self.pods.listed,
            &self.policies.listed,
        ]
        .iter()
        .all(|f| f.load(Ordering::Acquire))
    }

    fn counts(&self) -> [(&'static str, usize); 6] {
        [
            (self.nodes.kind, self.nodes.store.len()),
            (self.services.kind, self.services.store.len()),
            (self.slices.kind, self.slices.store.len()),
            (self.namespaces.kind, self.namespaces.store.len()),
            (self.pods.kind, self.pods.store.len()),
            (self.policies.kind, self.policies.store.len()),
        ]
    }
}

/// The agent's one set of reflectors over the cluster API: the feed computes its lists from
/// them and the cluster DNS answers from their Services and EndpointSlices. They run until the
/// watch is dropped.
pub struct ClusterWatch {
    stores: Stores,
    notify: Arc<Notify>,
    _tasks: tokio::task::JoinSet<()>,
}

impl Debug for ClusterWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterWatch")
            .field("objects", &self.stores.counts())
            .finish_non_exhaustive()
    }
}

impl ClusterWatch {
    /// Starts a reflector per kind the agent follows. Must be called inside a tokio runtime.
    pub fn start(client: &kube::Client) -> Self {
        let notify = Arc::new(Notify::new());
        let mut tasks = tokio::task::JoinSet::new();
        let stores = Stores {
            nodes: watch(client, "nodes", &notify, &mut tasks),
            services: watch(client, "services", &notify, &mut tasks),
            slices: watch(client, "endpointslices", &notify, &mut tasks),
            namespaces: watch(client, "namespaces", &notify, &mut tasks),
            pods: watch(client, "pods", &notify, &mut tasks),
            policies: watch(client, "networkpolicies", &notify, &mut tasks),
        };
        Self {
            stores,
            notify,
            _tasks: tasks,
        }
    }

    /// Every Service of the cluster.
    pub fn services(&self) -> Store<Service> {
        self.stores.services.store.clone()
    }

    /// Every EndpointSlice of the cluster.
    pub fn endpoint_slices(&self) -> Store<EndpointSlice> {
        self.stores.slices.store.clone()
    }
}

/// Runs the feed for `agent` until the agent exits: `node` is this host's Node, whose own
/// block is not routed.
pub(crate) async fn run(
    agent: Arc<Agent>,
    feed: Arc<Feed>,
    cluster: ClusterWatch,
    node: Option<String>,
) -> anyhow::Result<()> {
    let ClusterWatch {
        stores,
        notify,
        _tasks,
    } = cluster;
    info!(source = %feed.source, node = ?node, "feeding the datapath from the cluster API");
    let mut reported = BTreeSet::new();
    let mut listed = false;
    loop {
        // An apply that failed is retried at the next event or resync.
        tokio::select! {
            () = notify.notified() => {}
            () = tokio::time::sleep(RESYNC) => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        feed.with(|c| c.seen.extend(stores.counts()));
        if !stores.listed() {
            continue;
        }
        if !listed {
            info!("every kind listed: the datapath follows the cluster API");
            listed = true;
        }
        reconcile(&agent, &feed, &stores, node.as_deref(), &mut reported).await;
    }
}

/// One pass: every list computed from the stores, and applied where it differs from the
/// agent's.
async fn reconcile(
    agent: &Agent,
    feed: &Feed,
    stores: &Stores,
    node: Option<&str>,
    reported: &mut BTreeSet<String>,
) {
    let cidr = agent.args.pod_cidr;
    let mut skipped: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();

    let mut hosts = convert::hosts(&stores.nodes.store.state(), node, cidr);
    admit(
        &mut hosts,
        |h| format!("Node {}", h.name),
        |list| validate_hosts(list, cidr).map_err(invalid_lines),
    );
    let hosts = take(&mut skipped, "hosts", hosts);
    if *agent.hosts.lock().await != hosts {
        record(feed, "hosts", apply_hosts(agent, hosts).await);
    }

    let mut services = convert::services(
        &stores.services.store.state(),
        &stores.slices.store.state(),
        cidr,
    );
    admit(
        &mut services,
        |s| format!("Service {}", s.name),
        |list| validate_services(list, cidr).map_err(invalid_lines),
    );
    let services = take(&mut skipped, "services", services);
    if agent.services.lock().await.0 != services {
        record(feed, "services", apply_services(agent, services).await);
    }

    use slipway_cni::policy::{PolicyExt as _, compile};
    let desired = agent.policy.desired().await;
    let mut namespaces = convert::namespaces(&stores.namespaces.store.state());
    admit(
        &mut namespaces,
        |n| format!("Namespace {}", n.name),
        |list| errors_or_ok(compile::validate_namespaces(list)),
    );
    let namespaces = take(&mut skipped, "namespaces", namespaces);
    if desired.namespaces != namespaces {
        let reply = apply_policy_list(agent, List::Namespaces(namespaces), None).await;
        record(feed, "namespaces", reply);
    }
    let mut pods = convert::pods(&stores.pods.store.state(), cidr);
    admit(
        &mut pods,
        |p| format!("Pod {}", p.key()),
        |list| errors_or_ok(compile::validate_pods(list)),
    );
    let pods = take(&mut skipped, "pods", pods);
    if desired.pods != pods {
        record(
            feed,
            "pods",
            apply_policy_list(agent, List::Pods(pods), None).await,
        );
    }
    let mut policies = convert::policies(&stores.policies.store.state());
    admit(
        &mut policies,
        |p| format!("NetworkPolicy {}", p.key()),
        |list| errors_or_ok(compile::validate_policies(list)),
    );
    let policies = take(&mut skipped, "networkpolicies", policies);
    if desired.policies != policies {
        let reply = apply_policy_list(agent, List::Policies(policies), None).await;
        record(feed, "networkpolicies", reply);
    }

    // Each reason is logged when it appears, not at every pass.
    let now: BTreeSet<String> = skipped.values().flatten().cloned().collect();
    for reason in now.difference(reported) {
        warn!(reason = %reason, "left out of the datapath");
    }
    *reported = now;
    feed.with(|c| {
        c.skipped = skipped.iter().map(|(k, v)| (*k, v.len())).collect();
    });
}

fn take<T>(
    skipped: &mut BTreeMap<&'static str, Vec<String>>,
    list: &'static str,
    converted: Converted<T>,
) -> Vec<T> {
    skipped.insert(list, converted.skipped);
    converted.items
}

fn invalid_lines(invalid: crate::Invalid) -> Vec<String> {
    invalid.errors.iter().map(ToString::to_string).collect()
}

fn errors_or_ok(errors: Vec<String>) -> Result<(), Vec<String>> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Counts an apply and logs it: the list as the API has it is now the datapath's, or the
/// reason it is not (retried at the next event or resync; a reason is logged at warn once).
fn record(feed: &Feed, list: &'static str, (status, body): Reply) {
    let reply = body.0.to_string();
    let result = if status.is_success() { "ok" } else { "error" };
    let repeated = feed.with(|c| {
        *c.applies.entry((list, result)).or_default() += 1;
        if status.is_success() {
            c.failing.remove(list);
            false
        } else {
            c.failing.insert(list, reply.clone()).as_ref() == Some(&reply)
        }
    });
    match (status.is_success(), repeated) {
        (true, _) => info!(list, %reply, "applied from the cluster API"),
        (false, false) => warn!(
            list,
            %status,
            %reply,
            "applying from the cluster API failed; the datapath keeps its previous state"
        ),
        (false, true) => {
            debug!(list, %status, %reply, "applying from the cluster API failed again")
        }
    }
}
