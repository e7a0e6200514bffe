//! `#[repr(C)]` mirrors of the map keys and values defined in `ebpf/include/abi.h`, the one
//! place the layout is defined. Shared and pod-veth types live here; each datapath's own types
//! in a submodule. Every mirror is listed with [`mirror!`] in a `layout_matches_btf` test that
//! checks its size and field offsets against the BTF clang emitted for the compiled objects.

pub mod lb;
pub mod policy;
pub mod services;

use std::net::Ipv4Addr;

/// Default capacity of the `routes` map (`SLIPWAY_MAX_ROUTES`).
pub const MAX_ROUTES: u32 = 16_384;
/// Default capacity of the NAT maps: `nat_flows`, `nat_reverse`, `stack_flows`
/// (`SLIPWAY_MAX_NAT_FLOWS`).
pub const MAX_NAT_FLOWS: u32 = 262_144;

/// A MAC address as the datapath stores it.
pub type Mac = [u8; 6];

/// Key of the `endpoints` map (`struct endpoint_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv4 address in network byte order.
    pub ip4: u32,
}

impl EndpointKey {
    pub fn new(ip: Ipv4Addr) -> Self {
        Self {
            ip4: u32::from_ne_bytes(ip.octets()),
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip4.to_ne_bytes())
    }
}

/// Value of the `endpoints` map (`struct endpoint_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host side of the pod's veth.
    pub ifindex: u32,
    /// The pod's eth0 MAC.
    pub pod_mac: Mac,
    /// The host-side veth MAC (the pod's gateway).
    pub host_mac: Mac,
}

/// `enum slipway_reason`: why a packet got its verdict.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    RedirectPeer = 1,
    PassNotIpv4 = 2,
    PassNoEndpoint = 3,
    DropMalformed = 4,
    RedirectVxlan = 5,
    RedirectNative = 6,
    DropNoRoute = 7,
    NodeportRequest = 8,
    NodeportReply = 9,
    DropNodeport = 10,
    DropPolicy = 11,
    ServiceRequest = 12,
    ServiceReply = 13,
    PassStackFlow = 14,
    DsrDecap = 15,
    DropDsr = 16,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::RedirectPeer,
        Reason::PassNotIpv4,
        Reason::PassNoEndpoint,
        Reason::DropMalformed,
        Reason::RedirectVxlan,
        Reason::RedirectNative,
        Reason::DropNoRoute,
        Reason::NodeportRequest,
        Reason::NodeportReply,
        Reason::DropNodeport,
        Reason::DropPolicy,
        Reason::ServiceRequest,
        Reason::ServiceReply,
        Reason::PassStackFlow,
        Reason::DsrDecap,
        Reason::DropDsr,
    ];

    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u32 == raw)
    }

    /// The label used in metrics and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RedirectPeer => "redirect_peer",
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNoEndpoint => "pass_no_endpoint",
            Reason::DropMalformed => "drop_malformed",
            Reason::RedirectVxlan => "redirect_vxlan",
            Reason::RedirectNative => "redirect_native",
            Reason::DropNoRoute => "drop_no_route",
            Reason::NodeportRequest => "nodeport_request",
            Reason::NodeportReply => "nodeport_reply",
            Reason::DropNodeport => "drop_nodeport",
            Reason::DropPolicy => "drop_policy",
            Reason::ServiceRequest => "service_request",
            Reason::ServiceReply => "service_reply",
            Reason::PassStackFlow => "pass_stack_flow",
            Reason::DsrDecap => "dsr_decap",
            Reason::DropDsr => "drop_dsr",
        }
    }

    /// Whether the packet was dropped.
    pub fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropMalformed
                | Reason::DropNoRoute
                | Reason::DropNodeport
                | Reason::DropPolicy
                | Reason::DropDsr
        )
    }
}

/// `enum slipway_map`: a table whose fill the datapath reports, the index of `map_fill` and
/// of the per-CPU `map_full`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapId {
    Counters = 0,
    PolicyCt = 1,
    NatFlows = 2,
    NatReverse = 3,
    StackFlows = 4,
}

impl MapId {
    pub const ALL: [MapId; 5] = [
        MapId::Counters,
        MapId::PolicyCt,
        MapId::NatFlows,
        MapId::NatReverse,
        MapId::StackFlows,
    ];

    /// The map's name: its pin name and the label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MapId::Counters => "counters",
            MapId::PolicyCt => "policy_ct",
            MapId::NatFlows => "nat_flows",
            MapId::NatReverse => "nat_reverse",
            MapId::StackFlows => "stack_flows",
        }
    }
}

/// Value of the `map_fill` array (`struct map_fill`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    /// Entries the programs inserted and did not delete, at most `capacity`.
    pub entries: i64,
    /// The table's max_entries; 0: not tracked.
    pub capacity: u32,
    pub pad: u32,
}

/// Key of the `stack_flows` LRU (`struct stack_flow_key`): a local pod's address and port of a
/// flow the host stack handled, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackFlowKey {
    pub ip4: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Key of the per-CPU `counters` map (`struct counter_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// The device the program ran on.
    pub ifindex_in: u32,
    /// The redirect target, 0 when not redirected.
    pub ifindex_out: u32,
    /// A [`Reason`] as its raw value.
    pub reason: u32,
}

/// Value of the per-CPU `counters` map (`struct counter_value`), one CPU's share or the sum.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for CounterValue {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// How packets reach another host's pods (`enum slipway_route_mode`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteMode {
    Vxlan = 1,
    Native = 2,
}

/// Value of the `routes` LPM trie (`struct route_info`). The key, `struct route_key`, is the
/// layout of aya's `lpm_trie::Key<u32>`: prefix length, then the address in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// The owning host's underlay address, network byte order.
    pub host_ip4: u32,
    /// A [`RouteMode`] as its raw value.
    pub mode: u32,
}

impl RouteInfo {
    pub fn new(host: Ipv4Addr, mode: RouteMode) -> Self {
        Self {
            host_ip4: u32::from_ne_bytes(host.octets()),
            mode: mode as u32,
        }
    }

    pub fn host(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.host_ip4.to_ne_bytes())
    }
}

/// The entry of the `node_config` array (`struct node_config`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub vxlan_ifindex: u32,
    pub underlay_ifindex: u32,
    pub vni: u32,
    /// The host's router address (first address of its pod block), network byte order.
    pub router_ip4: u32,
    /// The host's underlay address (network byte order) and the cluster's VXLAN port: VXLAN
    /// packets to them pass the underlay device's program at once (0: no VXLAN).
    pub underlay_ip4: u32,
    pub vxlan_port: u32,
}

/// Key of `nat_flows` and `nat_reverse` (`struct nat_tuple`): addresses and ports in network
/// byte order, as the packet carries them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatTuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// Value of `nat_flows` (`struct nat_forward`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatForward {
    pub backend_ip4: u32,
    pub backend_port: u16,
    pub snat: u8,
    pub pad: u8,
    pub snat_ip4: u32,
}

/// Value of `nat_reverse` (`struct nat_reply`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatReply {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

// SAFETY: each type is `#[repr(C)]`, made only of integers and byte arrays with no padding
// (checked against the BTF layout in `tests::layout_matches_btf`), so every bit pattern is a
// valid value and the kernel can read and write them as plain bytes.
unsafe impl aya::Pod for EndpointKey {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for CounterKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CounterValue {}
// SAFETY: as above.
unsafe impl aya::Pod for RouteInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for NodeConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for NatTuple {}
// SAFETY: as above.
unsafe impl aya::Pod for NatForward {}
// SAFETY: as above.
unsafe impl aya::Pod for NatReply {}
// SAFETY: as above.
unsafe impl aya::Pod for MapFill {}
// SAFETY: as above.
unsafe impl aya::Pod for StackFlowKey {}

#[cfg(test)]
pub(crate) mod layout {
    //! The layout check shared by the ABI modules' tests.

    use crate::btf::Btf;

    /// One mirrored struct: its C name, Rust size, and (field name, Rust offset) pairs.
    #[derive(Debug)]
    pub struct Mirror {
        pub c_name: &'static str,
        pub size: usize,
        pub fields: Vec<(&'static str, usize)>,
    }

    /// `mirror!("c_name", RustType, [field, ...])`: every field, in declaration order.
    macro_rules! mirror {
        ($c_name:literal, $ty:ty, [$($field:ident),* $(,)?]) => {
            $crate::abi::layout::Mirror {
                c_name: $c_name,
                size: ::std::mem::size_of::<$ty>(),
                fields: vec![$((stringify!($field), ::std::mem::offset_of!($ty, $field))),*],
            }
        };
    }
    pub(crate) use mirror;

    /// Asserts that each mirror has the size and the fields (names, offsets, order) that the
    /// object's BTF gives its C struct.
    pub fn assert_matches(object: &[u8], mirrors: &[Mirror]) {
        let btf = Btf::from_elf(object).expect("the compiled object carries BTF");
        for mirror in mirrors {
            let layout = btf
                .struct_layout(mirror.c_name)
                .unwrap_or_else(|| panic!("struct {} not in BTF", mirror.c_name));
            assert_eq!(layout.size, mirror.size, "size of struct {}", mirror.c_name);
            let c_fields: Vec<(&str, usize)> = layout
                .members
                .iter()
                .map(|m| (m.name.as_str(), m.offset_bits / 8))
                .collect();
            assert_eq!(
                c_fields, mirror.fields,
                "fields of struct {}",
                mirror.c_name
            );
            assert!(
                layout.members.iter().all(|m| m.offset_bits % 8 == 0),
                "struct {} has a bitfield",
                mirror.c_name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::layout::{Mirror, assert_matches, mirror};
    use crate::btf::Btf;
    use crate::objects;

    fn mirrors() -> Vec<Mirror> {
        vec![
            mirror!("endpoint_key", EndpointKey, [ip4]),
            mirror!("endpoint_info", EndpointInfo, [ifindex, pod_mac, host_mac]),
            mirror!("counter_key", CounterKey, [ifindex_in, ifindex_out, reason]),
            mirror!("counter_value", CounterValue, [packets, bytes]),
            mirror!("route_info", RouteInfo, [host_ip4, mode]),
            mirror!(
                "nat_tuple",
                NatTuple,
                [saddr, daddr, sport, dport, proto, pad]
            ),
            mirror!(
                "nat_forward",
                NatForward,
                [backend_ip4, backend_port, snat, pad, snat_ip4]
            ),
            mirror!("nat_reply", NatReply, [saddr, daddr, sport, dport]),
            mirror!("map_fill", MapFill, [entries, capacity, pad]),
            mirror!("stack_flow_key", StackFlowKey, [ip4, port, proto, pad]),
            mirror!(
                "node_config",
                NodeConfig,
                [
                    vxlan_ifindex,
                    underlay_ifindex,
                    vni,
                    router_ip4,
                    underlay_ip4,
                    vxlan_port
                ]
            ),
        ]
    }

    #[test]
    fn layout_matches_btf() {
        assert_matches(objects::POD_VETH, &mirrors());
        assert_matches(objects::HOST, &mirrors());
    }

    #[test]
    fn route_key_is_an_lpm_key_of_an_address() {
        let btf = Btf::from_elf(objects::POD_VETH).expect("BTF");
        let layout = btf.struct_layout("route_key").expect("route_key");
        assert_eq!(layout.size, size_of::<aya::maps::lpm_trie::Key<u32>>());
        let names: Vec<&str> = layout.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["prefixlen", "ip4"]);
    }

    #[test]
    fn route_modes_match_btf_enum() {
        let btf = Btf::from_elf(objects::POD_VETH).expect("BTF");
        let values = btf
            .enum_values("slipway_route_mode")
            .expect("enum slipway_route_mode");
        let expected: Vec<(String, i64)> = [RouteMode::Vxlan, RouteMode::Native]
            .iter()
            .map(|m| (format!("SLIPWAY_ROUTE_{m:?}").to_uppercase(), *m as i64))
            .collect();
        assert_eq!(values, expected);
    }

    #[test]
    fn reasons_match_btf_enum() {
        let btf = Btf::from_elf(objects::POD_VETH).expect("BTF");
        let values = btf
            .enum_values("slipway_reason")
            .expect("enum slipway_reason in BTF");
        let expected: Vec<(String, i64)> = Reason::ALL
            .iter()
            .map(|r| {
                (
                    format!("SLIPWAY_REASON_{}", r.as_str().to_uppercase()),
                    *r as i64,
                )
            })
            .collect();
        assert_eq!(values, expected);
    }

    #[test]
    fn map_ids_match_btf_enum() {
        for object in [objects::POD_VETH, objects::HOST] {
            let btf = Btf::from_elf(object).expect("BTF");
            let values = btf
                .enum_values("slipway_map")
                .expect("enum slipway_map in BTF");
            let expected: Vec<(String, i64)> = MapId::ALL
                .iter()
                .map(|m| {
                    (
                        format!("SLIPWAY_MAP_{}", m.as_str().to_uppercase()),
                        *m as i64,
                    )
                })
                .collect();
            assert_eq!(values, expected);
        }
    }

    #[test]
    fn endpoint_key_is_network_order() {
        let key = EndpointKey::new(Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(key.ip4.to_ne_bytes(), [10, 244, 1, 2]);
        assert_eq!(key.ip(), Ipv4Addr::new(10, 244, 1, 2));
    }
}
