//! Compiles NetworkPolicies into the datapath's tables ([`PolicyTables`]): identities for
//! addresses, flags for selected endpoints, and rule entries keyed by (endpoint, direction,
//! peer identity, protocol, port prefix), so that the datapath decides a connection with a fixed
//! number of lookups however many rules there are. [`Compiled::explain`] answers from the same
//! tables with the datapath's lookup order.
//!
//! Identities. Every ipBlock of every policy is a "block"; the prefixes named by blocks (their
//! CIDRs and exceptions) partition the address space so that all addresses whose longest
//! matching prefix is the same belong to the same blocks. An identity is the set of blocks an
//! address belongs to, plus, for a pod's address, the pod's namespace, labels and named ports
//! (pods alike in all of these are indistinguishable to every rule). Identity numbers are hashes
//! of that content, so an unrelated change does not renumber everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use slipway_dataplane::abi::policy::{
    Direction, F_EGRESS, F_INGRESS, IDENTITY_ANY, IDENTITY_WORLD,
};
use slipway_dataplane::policy::{PolicyTables, RuleEntry};

use super::eval::Endpoint;
use super::types::{
    IntOrString, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, PolicyExt, Rule,
    port_protocol, selector_matches,
};

/// A namespace as policy sees it (`PUT /v1/namespaces`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A pod anywhere in the cluster (`PUT /v1/pods`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: String,
    pub container_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".to_owned()
}

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod as the reference evaluator sees it.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            ip: self.ip,
            labels: self.labels.clone(),
            named_ports: self
                .ports
                .iter()
                .map(|p| (p.name.clone(), (p.protocol.clone(), p.container_port)))
                .collect(),
        }
    }
}

/// Checks a namespace list; errors name the entry and field.
pub fn validate_namespaces(namespaces: &[Namespace]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, ns) in namespaces.iter().enumerate() {
        if ns.name.is_empty() {
            errors.push(format!("[{i}].name: must not be empty"));
        } else if !seen.insert(&ns.name) {
            errors.push(format!("[{i}].name: {:?} is listed twice", ns.name));
        }
    }
    errors
}

/// Checks a pod list; errors name the entry and field.
pub fn validate_pods(pods: &[Pod]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut names = BTreeSet::new();
    let mut ips = BTreeMap::new();
    for (i, pod) in pods.iter().enumerate() {
        if pod.namespace.is_empty() {
            errors.push(format!("[{i}].namespace: must not be empty"));
        }
        if pod.name.is_empty() {
            errors.push(format!("[{i}].name: must not be empty"));
        }
        if !names.insert(pod.key()) {
            errors.push(format!("[{i}].name: {} is listed twice", pod.key()));
        }
        if let Some(other) = ips.insert(pod.ip, pod.key()) {
            errors.push(format!("[{i}].ip: {} is also {other}'s", pod.ip));
        }
        for (j, port) in pod.ports.iter().enumerate() {
            if port.name.is_empty() || port.name.len() > 15 {
                errors.push(format!(
                    "[{i}].ports[{j}].name: {:?} is not a port name (1-15 characters)",
                    port.name
                ));
            }
            if port.container_port == 0 {
                errors.push(format!("[{i}].ports[{j}].containerPort: must be 1-65535"));
            }
            if protocol_number(&port.protocol).is_none() {
                errors.push(format!(
                    "[{i}].ports[{j}].protocol: {:?} is not TCP, UDP or SCTP",
                    port.protocol
                ));
            }
        }
    }
    errors
}

/// Checks a policy list: every policy's own fields, and names unique.
pub fn validate_policies(policies: &[NetworkPolicy]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, policy) in policies.iter().enumerate() {
        let name = policy.key();
        for e in policy.validate() {
            errors.push(format!("[{i}] ({name}): {e}"));
        }
        if !seen.insert(name.clone()) {
            errors.push(format!("[{i}] ({name}): metadata.name: listed twice"));
        }
    }
    errors
}

pub fn protocol_number(protocol: &str) -> Option<u8> {
    match protocol {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

pub fn protocol_name(number: u8) -> Option<&'static str> {
    match number {
        6 => Some("TCP"),
        17 => Some("UDP"),
        132 => Some("SCTP"),
        _ => None,
    }
}

/// What a rule id stands for: rule `index` of `direction` in policy `policy` (namespace/name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
}

impl RuleRef {
    /// `ingress[0]`, as the policy's spec names it.
    pub fn field(&self) -> String {
        format!("{}[{}]", self.direction.as_str(), self.index)
    }
}

/// The compiled state of the whole cluster.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// Tables for every pod of the cluster (a node installs the part for its pods).
    pub tables: PolicyTables,
    /// Rule ids: id n is `rules[n - 1]`.
    pub rules: Vec<RuleRef>,
    /// The policies that select each pod, per direction.
    pub selected_by: BTreeMap<(Ipv4Addr, Direction), Vec<String>>,
    /// Rule entries per endpoint and direction: what it costs in the map.
    pub entries: BTreeMap<(Ipv4Addr, Direction), usize>,
}

/// One end's verdict on a connection, as the datapath reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndVerdict {
    /// The end is no pod of this cluster, or no policy selects it in this direction.
    Open,
    /// Allowed by rule id `rule`.
    Allow { rule: u32 },
    /// Isolated and no rule allows.
    Deny,
    /// The endpoint's rules overflowed the map: it fails closed.
    FailClosed,
}

impl EndVerdict {
    pub fn allows(&self) -> bool {
        matches!(self, EndVerdict::Open | EndVerdict::Allow { .. })
    }
}

/// Both ends' verdicts on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub egress: EndVerdict,
    pub ingress: EndVerdict,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// A named port as identities hold it: (name, protocol, number).
type NamedPort = (String, String, u16);

/// What identifies a pod to policy: namespace, labels, named ports.
type PodKey = (String, Vec<(String, String)>, Vec<NamedPort>);

/// An identity's content (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct IdentityKey {
    /// For a pod: namespace, labels, named ports.
    pod: Option<PodKey>,
    /// The blocks the address belongs to.
    blocks: Vec<usize>,
}

/// An ipBlock, with its exceptions parsed.
struct Block {
    cidr: Ipv4Network,
    except: Vec<Ipv4Network>,
}

impl Block {
    fn contains_prefix(&self, p: Ipv4Network) -> bool {
        let inside =
            |outer: &Ipv4Network| outer.prefix() <= p.prefix() && outer.contains(p.network());
        inside(&self.cidr) && !self.except.iter().any(inside)
    }
}

/// Compiles `policies` over `pods` and `namespaces`. Input is assumed valid (see the
/// `validate_*` functions); what cannot be parsed is skipped.
///
/// Three phases: the ipBlocks of every rule ([`Blocks`]), the identities of every prefix and pod
/// ([`Identities`], which fill the ipcache), then the endpoint flags and rule entries of every
/// policy ([`RuleWriter`]).
pub fn compile(namespaces: &[Namespace], pods: &[Pod], policies: &[NetworkPolicy]) -> Compiled {
    let blocks = Blocks::collect(policies);
    let identities = Identities::assign(&blocks, pods);
    let mut writer = RuleWriter {
        ns_labels: namespaces
            .iter()
            .map(|n| (n.name.as_str(), &n.labels))
            .collect(),
        blocks: &blocks,
        identities: &identities,
        tables: identities.ipcache(pods),
        compiled: Compiled::default(),
    };
    for (pi, policy) in policies.iter().enumerate() {
        writer.policy(pi, policy, pods);
    }
    writer.finish()
}

/// Where a peer sits in the input: (policy, direction, rule, peer).
type PeerPosition = (usize, Direction, usize, usize);

/// Phase 1: every ipBlock peer of every rule, and the prefixes they name.
struct Blocks {
    blocks: Vec<Block>,
    /// The block of each ipBlock peer.
    block_of: HashMap<PeerPosition, usize>,
    /// Blocks by CIDR, to find those containing a prefix by walking its ancestors.
    by_cidr: HashMap<(Ipv4Addr, u8), Vec<usize>>,
    /// Every prefix a block names (its CIDR and its exceptions).
    prefixes: BTreeSet<(Ipv4Addr, u8)>,
    /// The prefix lengths blocks use: a prefix's containing blocks can only have these.
    lengths: BTreeSet<u8>,
}

impl Blocks {
    fn collect(policies: &[NetworkPolicy]) -> Self {
        let mut blocks: Vec<Block> = Vec::new();
        let mut block_of = HashMap::new();
        for (pi, policy) in policies.iter().enumerate() {
            for (direction, rules) in rules_of(policy) {
                for (ri, rule) in rules.iter().enumerate() {
                    for (peer_i, peer) in rule.peers().iter().enumerate() {
                        let Some(ip_block) = &peer.ip_block else {
                            continue;
                        };
                        let Ok(cidr) = ip_block.cidr.parse::<Ipv4Network>() else {
                            continue;
                        };
                        let except = ip_block
                            .except
                            .iter()
                            .flatten()
                            .filter_map(|e| e.parse::<Ipv4Network>().ok())
                            .collect();
                        block_of.insert((pi, direction, ri, peer_i), blocks.len());
                        blocks.push(Block {
                            cidr: normalize(cidr),
                            except,
                        });
                    }
                }
            }
        }
        let mut by_cidr: HashMap<(Ipv4Addr, u8), Vec<usize>> = HashMap::new();
        let mut prefixes = BTreeSet::new();
        for (id, block) in blocks.iter().enumerate() {
            let cidr = (block.cidr.network(), block.cidr.prefix());
            by_cidr.entry(cidr).or_default().push(id);
            prefixes.insert(cidr);
            for e in &block.except {
                let e = normalize(*e);
                prefixes.insert((e.network(), e.prefix()));
            }
        }
        let lengths = blocks.iter().map(|b| b.cidr.prefix()).collect();
        Self {
            blocks,
            block_of,
            by_cidr,
            prefixes,
            lengths,
        }
    }

    /// The blocks prefix `p` belongs to, sorted.
    fn membership(&self, p: Ipv4Network) -> Vec<usize> {
        let mut ids: Vec<usize> = self
            .lengths
            .range(..=p.prefix())
            .filter_map(|&len| {
                let ancestor = normalize(Ipv4Network::new(p.network(), len).ok()?);
                self.by_cidr.get(&(ancestor.network(), len))
            })
            .flatten()
            .copied()
            .filter(|id| self.blocks[*id].contains_prefix(p))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Phase 2: the identity of every prefix and of every pod, numbered.
struct Identities {
    numbers: HashMap<IdentityKey, u32>,
    /// Each block prefix with its identity key.
    prefix_keys: Vec<((Ipv4Addr, u8), IdentityKey)>,
    /// Each pod's identity key, in the order of the pods.
    pod_keys: Vec<IdentityKey>,
    /// The identities each block holds (for ipBlock peers).
    block_identities: Vec<BTreeSet<u32>>,
    /// The pod identities (for selector peers and egress named ports).
    pod_identities: BTreeMap<u32, IdentityKey>,
}

impl Identities {
    fn assign(blocks: &Blocks, pods: &[Pod]) -> Self {
        let prefix_keys: Vec<((Ipv4Addr, u8), IdentityKey)> = blocks
            .prefixes
            .iter()
            .filter_map(|&(ip, len)| {
                let net = Ipv4Network::new(ip, len).ok()?;
                let key = IdentityKey {
                    pod: None,
                    blocks: blocks.membership(net),
                };
                Some(((ip, len), key))
            })
            .collect();
        let pod_keys: Vec<IdentityKey> = pods
            .iter()
            .map(|pod| {
                let mut ports = pod.ports_as_keys();
                ports.sort();
                IdentityKey {
                    pod: Some((
                        pod.namespace.clone(),
                        pod.labels.clone().into_iter().collect(),
                        ports,
                    )),
                    blocks: blocks.membership(Ipv4Network::from(pod.ip)),
                }
            })
            .collect();
        let keys: BTreeSet<IdentityKey> = prefix_keys
            .iter()
            .map(|(_, k)| k.clone())
            .chain(pod_keys.iter().cloned())
            .collect();
        let numbers = number_identities(&keys);
        let mut block_identities = vec![BTreeSet::new(); blocks.blocks.len()];
        for key in &keys {
            for b in &key.blocks {
                block_identities[*b].insert(numbers[key]);
            }
        }
        let pod_identities = keys
            .into_iter()
            .filter(|k| k.pod.is_some())
            .map(|k| (numbers[&k], k))
            .collect();
        Self {
            numbers,
            prefix_keys,
            pod_keys,
            block_identities,
            pod_identities,
        }
    }

    /// Tables holding the ipcache: every block prefix and every pod address to its identity.
    fn ipcache(&self, pods: &[Pod]) -> PolicyTables {
        let mut tables = PolicyTables::default();
        for ((ip, len), key) in &self.prefix_keys {
            tables.ipcache.insert((*ip, *len), self.numbers[key]);
        }
        for (pod, key) in pods.iter().zip(&self.pod_keys) {
            tables.ipcache.insert((pod.ip, 32), self.numbers[key]);
        }
        tables
    }
}

/// Phase 3: endpoint flags, rule ids and rule entries, policy by policy.
struct RuleWriter<'a> {
    ns_labels: HashMap<&'a str, &'a BTreeMap<String, String>>,
    blocks: &'a Blocks,
    identities: &'a Identities,
    tables: PolicyTables,
    compiled: Compiled,
}

impl RuleWriter<'_> {
    fn policy(&mut self, pi: usize, policy: &NetworkPolicy, pods: &[Pod]) {
        let policy_name = policy.key();
        let (ingress, egress) = policy.governs();
        let selected: Vec<&Pod> = pods
            .iter()
            .filter(|p| policy.selects(&p.namespace, &p.labels))
            .collect();
        for (direction, rules) in rules_of(policy) {
            let governs = match direction {
                Direction::Ingress => ingress,
                Direction::Egress => egress,
            };
            if !governs {
                continue;
            }
            for pod in &selected {
                *self.tables.endpoints.entry(pod.ip).or_default() |= match direction {
                    Direction::Ingress => F_INGRESS,
                    Direction::Egress => F_EGRESS,
                };
                self.compiled
                    .selected_by
                    .entry((pod.ip, direction))
                    .or_default()
                    .push(policy_name.clone());
            }
            for (ri, rule) in rules.iter().enumerate() {
                self.compiled.rules.push(RuleRef {
                    policy: policy_name.clone(),
                    direction,
                    index: ri,
                });
                let rule_id = u32::try_from(self.compiled.rules.len()).unwrap_or(u32::MAX);
                let peers = self.peers(pi, policy, direction, ri, *rule);
                for pod in &selected {
                    self.rule_entries(pod, direction, *rule, peers.as_ref(), rule_id);
                }
            }
        }
    }

    /// The identities of a rule's peers; `None`: any peer.
    fn peers(
        &self,
        pi: usize,
        policy: &NetworkPolicy,
        direction: Direction,
        ri: usize,
        rule: &dyn Rule,
    ) -> Option<BTreeSet<u32>> {
        if rule.peers().is_empty() {
            return None;
        }
        let mut ids = BTreeSet::new();
        for (peer_i, peer) in rule.peers().iter().enumerate() {
            if peer.ip_block.is_some() {
                if let Some(b) = self.blocks.block_of.get(&(pi, direction, ri, peer_i)) {
                    ids.extend(&self.identities.block_identities[*b]);
                }
                continue;
            }
            ids.extend(
                self.identities
                    .pod_identities
                    .iter()
                    .filter_map(|(id, key)| {
                        let (ns, labels, _) = key.pod.as_ref()?;
                        selector_peer_matches(peer, policy.namespace(), ns, labels, &self.ns_labels)
                            .then_some(*id)
                    }),
            );
        }
        Some(ids)
    }

    /// The entries rule `rule_id` puts in the map for endpoint `pod`.
    fn rule_entries(
        &mut self,
        pod: &Pod,
        direction: Direction,
        rule: &dyn Rule,
        peers: Option<&BTreeSet<u32>>,
        rule_id: u32,
    ) {
        let rules = &mut self.tables.rules;
        let mut add = |identity: u32, proto: u8, port: u16, bits: u8| {
            let entry = RuleEntry {
                ep: pod.ip,
                direction,
                identity,
                proto,
                port,
                port_bits: bits,
            };
            rules.entry(entry).or_insert(rule_id);
        };
        let identities: Vec<u32> = match peers {
            None => vec![IDENTITY_ANY],
            Some(ids) => ids.iter().copied().collect(),
        };
        if rule.ports().is_empty() {
            for id in &identities {
                add(*id, 0, 0, 0);
            }
            return;
        }
        for port in rule.ports() {
            let Some(proto) = protocol_number(port_protocol(port)) else {
                continue;
            };
            match &port.port {
                None => identities.iter().for_each(|id| add(*id, proto, 0, 0)),
                Some(IntOrString::Int(first)) => {
                    let last = port.end_port.unwrap_or(*first);
                    let (Ok(first), Ok(last)) = (u32::try_from(*first), u32::try_from(last)) else {
                        continue;
                    };
                    for (value, bits) in port_prefixes(first, last) {
                        identities
                            .iter()
                            .for_each(|id| add(*id, proto, value, bits));
                    }
                }
                Some(IntOrString::String(name)) => match direction {
                    // The destination is the selected pod itself.
                    Direction::Ingress => {
                        if let Some(number) = named_port(&pod.ports_as_keys(), name, port) {
                            identities.iter().for_each(|id| add(*id, proto, number, 16));
                        }
                    }
                    // The destination is the peer: resolve per identity (pods only).
                    Direction::Egress => {
                        for (id, key) in &self.identities.pod_identities {
                            if peers.is_some_and(|p| !p.contains(id)) {
                                continue;
                            }
                            let Some((_, _, ports)) = &key.pod else {
                                continue;
                            };
                            if let Some(number) = named_port(ports, name, port) {
                                add(*id, proto, number, 16);
                            }
                        }
                    }
                },
            }
        }
    }

    /// Counts the entries of each endpoint and direction, and hands the result over.
    fn finish(mut self) -> Compiled {
        for rule in self.tables.rules.keys() {
            *self
                .compiled
                .entries
                .entry((rule.ep, rule.direction))
                .or_default() += 1;
        }
        self.compiled.tables = self.tables;
        self.compiled
    }
}

impl Pod {
    fn ports_as_keys(&self) -> Vec<NamedPort> {
        self.ports
            .iter()
            .map(|p| (p.name.clone(), p.protocol.clone(), p.container_port))
            .collect()
    }
}

fn named_port(ports: &[NamedPort], name: &str, rule: &NetworkPolicyPort) -> Option<u16> {
    ports
        .iter()
        .find(|(n, proto, _)| n == name && proto == port_protocol(rule))
        .map(|(_, _, number)| *number)
}

fn selector_peer_matches(
    peer: &NetworkPolicyPeer,
    policy_ns: &str,
    pod_ns: &str,
    pod_labels: &[(String, String)],
    ns_labels: &HashMap<&str, &BTreeMap<String, String>>,
) -> bool {
    let empty = BTreeMap::new();
    let ns_ok = match &peer.namespace_selector {
        Some(selector) => {
            selector_matches(selector, ns_labels.get(pod_ns).copied().unwrap_or(&empty))
        }
        None => pod_ns == policy_ns,
    };
    ns_ok
        && peer
            .pod_selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &pod_labels.iter().cloned().collect()))
}

fn rules_of(policy: &NetworkPolicy) -> [(Direction, Vec<&dyn Rule>); 2] {
    [
        (Direction::Ingress, policy.ingress()),
        (Direction::Egress, policy.egress()),
    ]
}

/// The network of `net` with host bits cleared (`10.0.0.7/24` -> `10.0.0.0/24`).
fn normalize(net: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net)
}

/// Numbers identities by a hash of their content (stable across unrelated changes), avoiding
/// 0 (ANY), 1 (WORLD) and collisions, in a deterministic order.
fn number_identities(keys: &BTreeSet<IdentityKey>) -> HashMap<IdentityKey, u32> {
    use std::hash::{Hash, Hasher};
    let mut taken: BTreeSet<u32> = BTreeSet::from([IDENTITY_ANY, IDENTITY_WORLD]);
    let mut numbers = HashMap::new();
    for key in keys {
        let mut hasher = Fnv1a::default();
        key.hash(&mut hasher);
        let mut n = hasher.finish() as u32;
        while taken.contains(&n) {
            n = n.wrapping_add(1);
        }
        taken.insert(n);
        numbers.insert(key.clone(), n);
    }
    numbers
}

/// FNV-1a (32 bits): a fixed hash, the same in every process and version, unlike the
/// standard library's randomly keyed one.
struct Fnv1a(u32);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0x811c_9dc5)
    }
}

impl std::hash::Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
    }

    fn finish(&self) -> u64 {
        u64::from(self.0)
    }
}

/// Splits the port range `first..=last` into prefixes: (value, bits matched out of 16).
pub fn port_prefixes(first: u32, last: u32) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (first.min(65535), last.min(65535));
    while lo <= hi {
        // The largest aligned block starting at lo that ends within hi.
        let mut size = 1u32;
        while size < 65536 && lo % (size * 2) == 0 && lo + size * 2 - 1 <= hi {
            size *= 2;
        }
        let bits = 16 - size.trailing_zeros();
        out.push((lo as u16, bits as u8));
        lo += size;
    }
    out
}

impl Compiled {
    /// The part of the tables a node with pods `local` installs: all identities, and the
    /// flags and rules of its own endpoints.
    pub fn tables_for(&self, local: &BTreeSet<Ipv4Addr>) -> PolicyTables {
        PolicyTables {
            ipcache: self.tables.ipcache.clone(),
            endpoints: self
                .tables
                .endpoints
                .iter()
                .filter(|(ip, _)| local.contains(ip))
                .map(|(ip, f)| (*ip, *f))
                .collect(),
            rules: self
                .tables
                .rules
                .iter()
                .filter(|(r, _)| local.contains(&r.ep))
                .map(|(r, id)| (*r, *id))
                .collect(),
        }
    }

    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.rules.get((id as usize).checked_sub(1)?)
    }

    /// Decides `src` -> `dst`:`port`/`proto` from `tables` exactly as the datapath does.
    pub fn explain(
        tables: &PolicyTables,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Explanation {
        Explanation {
            egress: end_verdict(tables, src, dst, Direction::Egress, port, proto),
            ingress: end_verdict(tables, dst, src, Direction::Ingress, port, proto),
        }
    }
}

/// The identity of `ip`: its longest matching prefix's, or WORLD.
pub fn identity_of(tables: &PolicyTables, ip: Ipv4Addr) -> u32 {
    (0..=32u8)
        .rev()
        .find_map(|len| {
            let net = Ipv4Network::new(ip, len).ok()?;
            tables.ipcache.get(&(net.network(), len)).copied()
        })
        .unwrap_or(IDENTITY_WORLD)
}

fn end_verdict(
    tables: &PolicyTables,
    ep: Ipv4Addr,
    peer: Ipv4Addr,
    direction: Direction,
    port: u16,
    proto: u8,
) -> EndVerdict {
    let Some(flags) = tables.endpoints.get(&ep) else {
        return EndVerdict::Open;
    };
    if flags & direction.fail_closed_flag() != 0 {
        return EndVerdict::FailClosed;
    }
    if flags & direction.isolated_flag() == 0 {
        return EndVerdict::Open;
    }
    let identity = identity_of(tables, peer);
    [identity, IDENTITY_ANY]
        .into_iter()
        .find_map(|identity| lpm_rule(tables, ep, direction, identity, proto, port))
        .map_or(EndVerdict::Deny, |rule| EndVerdict::Allow { rule })
}

/// The LPM lookup of `policy_rules`: the most specific entry matching, if any.
fn lpm_rule(
    tables: &PolicyTables,
    ep: Ipv4Addr,
    direction: Direction,
    identity: u32,
    proto: u8,
    port: u16,
) -> Option<u32> {
    let entry = |proto: u8, port: u16, port_bits: u8| RuleEntry {
        ep,
        direction,
        identity,
        proto,
        port,
        port_bits,
    };
    (1..=16u8)
        .rev()
        .map(|bits| {
            entry(
                proto,
                port & !(u16::MAX.checked_shr(u32::from(bits)).unwrap_or(0)),
                bits,
            )
        })
        .chain([entry(proto, 0, 0), entry(0, 0, 0)])
        .find_map(|e| tables.rules.get(&e).copied())
}

#[cfg(test)]
mod tests;
