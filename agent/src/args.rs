//! How `slipway agent` is started: its flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use slipway_dataplane::abi::policy::{MAX_CT, MAX_RULES};
use slipway_dataplane::abi::{MAX_NAT_FLOWS, MAX_ROUTES};
use slipway_dataplane::node::{self, MapSizes};

use slipway_cni::spec::Routing;

/// The VXLAN device the agent creates.
pub const VXLAN_DEVICE: &str = "slipway_vxlan";
/// IANA's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// How the agent is started.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The cluster's pod CIDR.
    #[arg(long = "pod-cidr")]
    pub pod_cidr: Ipv4Network,
    /// This host's block of the pod CIDR. Default, with --cluster-kubeconfig: its Node's
    /// `spec.podCIDR` (awaited until the cluster sets it), as a DaemonSet's agent on every node
    /// finds its own.
    #[arg(long = "host-block")]
    pub host_block: Option<Ipv4Network>,
    /// How pods on other hosts are reached.
    #[arg(long, value_enum, default_value = "vxlan")]
    pub routing: RoutingArg,
    /// The device that connects the hosts.
    #[arg(long, default_value = "eth0")]
    pub underlay_device: String,
    /// Pod MTU; the underlay's MTU minus the encapsulation when not set.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// VXLAN network identifier of the cluster.
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// bpffs directory of the node datapath.
    #[arg(long, default_value = node::DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    /// Where node state and IPAM live.
    #[arg(long, default_value = slipway_cni::plugin::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The local API's Unix socket.
    #[arg(long, default_value = "/run/slipway/agent.sock")]
    pub socket: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`), e.g. 127.0.0.1:9962.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// The cgroup v2 directory whose processes (pods and host daemons) get socket-level service
    /// translation; created if missing. Never the cgroup v2 root.
    #[arg(long, default_value = "/sys/fs/cgroup/unified/slipway")]
    pub cgroup: PathBuf,
    /// Policy rule map entries this node may use (the map holds two generations of this). An
    /// endpoint whose rules do not fit fails closed.
    #[arg(long = "policy-entries", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_RULES / 2)))]
    pub policy_entries: u32,
    /// Connections NetworkPolicy tracks (the `policy_ct` table). When it is full, each new
    /// connection evicts the least recently used one (logged, and counted in
    /// `slipway_datapath_table_full_inserts_total`).
    #[arg(long = "ct-entries", default_value_t = MAX_CT,
          value_parser = clap::value_parser!(u32).range(64..=crate::tables::TABLE_MAX))]
    pub ct_entries: u32,
    /// Flows translated per packet (NodePorts; ClusterIPs of pods outside --cgroup) and pods'
    /// flows through the host stack (hostPorts): the capacity of each of those tables.
    #[arg(long = "nat-entries", default_value_t = MAX_NAT_FLOWS,
          value_parser = clap::value_parser!(u32).range(64..=crate::tables::TABLE_MAX))]
    pub nat_entries: u32,
    /// Pod blocks of other hosts the routes table holds.
    #[arg(long = "route-entries", default_value_t = MAX_ROUTES,
          value_parser = clap::value_parser!(u32).range(1..=crate::tables::TABLE_MAX))]
    pub route_entries: u32,
    /// Registration with a supervisor (Host and Lease).
    #[command(flatten)]
    pub heartbeat: crate::heartbeat::HeartbeatArgs,
    /// The host's own containerd (the pod runtime).
    #[command(flatten)]
    pub containerd: crate::pods::containerd::ContainerdArgs,
    /// The cluster whose Pods bound to this node the agent runs (the slim kubelet).
    #[command(flatten)]
    pub kubelet: crate::pods::kubelet::KubeletArgs,
    /// The CNI and images the host's containerd starts with.
    #[command(flatten)]
    pub node_setup: crate::node_setup::NodeSetupArgs,
    /// Cluster DNS answered on this node (needs --cluster-kubeconfig).
    #[command(flatten)]
    pub dns: crate::dns::DnsArgs,
    /// The CSI node plugin the pods' PersistentVolumeClaims are mounted through.
    #[command(flatten)]
    pub csi: crate::csi_node::CsiNodeArgs,
}

impl AgentArgs {
    /// The table capacities the flags ask for.
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            conntrack: self.ct_entries,
            nat: self.nat_entries,
            routes: self.route_entries,
        }
    }
}

/// The NodePort range, as Kubernetes defaults it.
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutingArg {
    /// In VXLAN (UDP 4789) over the underlay: hosts only need to reach each other by IP.
    Vxlan,
    /// As they are, to the owning host's address on the underlay segment: hosts share it (L2).
    Native,
}

impl From<RoutingArg> for Routing {
    fn from(arg: RoutingArg) -> Self {
        match arg {
            RoutingArg::Vxlan => Routing::Vxlan,
            RoutingArg::Native => Routing::Native,
        }
    }
}
