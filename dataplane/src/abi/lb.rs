//! `#[repr(C)]` mirrors of the L4 load balancer's map keys and values (the "L4 load balancer"
//! section of `ebpf/include/abi.h`), checked against the BTF of `lb.o` and `lb_xdp.o`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Mac;

/// Default capacity of service ports, each owning one Maglev ring (`LB_MAX_SERVICES`); the
/// LB sizes its maps at load time.
pub const MAX_SERVICES: u32 = 4096;
/// Slots of one service's Maglev ring (`LB_MAGLEV_SIZE`), a prime.
pub const MAGLEV_SIZE: u32 = 65537;
/// Default capacity of backend ids; id 0 means "none" (`LB_MAX_BACKENDS`).
pub const MAX_BACKENDS: u32 = 65536;
/// Default connection-tracking entries (`LB_MAX_FLOWS`).
pub const MAX_FLOWS: u32 = 1_048_576;
/// Default announced addresses (`LB_MAX_VIPS`).
pub const MAX_VIPS: u32 = 4096;
/// Source-range entries over all services (`LB_MAX_SOURCE_RANGES`).
pub const MAX_SOURCE_RANGES: u32 = 16384;

/// `LB_SERVICE_F_LOCAL`: externalTrafficPolicy Local, no SNAT.
pub const SERVICE_F_LOCAL: u32 = 0x1;
/// `LB_SERVICE_F_SOURCE_RANGES`: the service has loadBalancerSourceRanges.
pub const SERVICE_F_SOURCE_RANGES: u32 = 0x2;
/// `LB_SERVICE_F_AFFINITY`: sessionAffinity ClientIP.
pub const SERVICE_F_AFFINITY: u32 = 0x4;
/// `LB_SERVICE_F_DSR`: direct server return, IP-in-IP to the backend (IPv4).
pub const SERVICE_F_DSR: u32 = 0x8;
/// `LB_BACKEND_F_ACTIVE`: the backend is in its service's ring.
pub const BACKEND_F_ACTIVE: u16 = 0x1;

/// `LB_FLOW_OPEN`.
pub const FLOW_OPEN: u8 = 0;
/// `LB_FLOW_CLOSING`: a FIN or RST went by.
pub const FLOW_CLOSING: u8 = 1;

/// An IPv4 address as the datapath stores it: network byte order in a `u32`.
pub fn be32(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address behind a network-order `u32`.
pub fn ip_of(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// An address of either family (`struct lb_addr`): the 16 bytes of an IPv6 address in network
/// order, an IPv4 address as IPv4-mapped IPv6 (`::ffff:a.b.c.d`). All zero means "none".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbAddr {
    /// Four network-order words, as `__be32 w[4]`.
    pub w: [u32; 4],
}

impl LbAddr {
    /// No address.
    pub const NONE: LbAddr = LbAddr { w: [0; 4] };

    /// The address's 16 bytes in network order.
    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.w) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    /// The address: IPv4 for an IPv4-mapped one, else IPv6.
    pub fn ip(&self) -> IpAddr {
        Ipv6Addr::from(self.octets()).to_canonical()
    }

    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }
}

impl From<IpAddr> for LbAddr {
    fn from(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let octets = v6.octets();
        let mut w = [0u32; 4];
        for (word, chunk) in w.iter_mut().zip(octets.chunks_exact(4)) {
            *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Self { w }
    }
}

impl From<Ipv4Addr> for LbAddr {
    fn from(ip: Ipv4Addr) -> Self {
        IpAddr::V4(ip).into()
    }
}

impl From<Ipv6Addr> for LbAddr {
    fn from(ip: Ipv6Addr) -> Self {
        IpAddr::V6(ip).into()
    }
}

/// A port in network byte order.
pub fn be16(port: u16) -> u16 {
    port.to_be()
}

/// Key of `lb_services` (`struct lb_service_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbServiceKey {
    pub vip: LbAddr,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

impl LbServiceKey {
    pub fn new(vip: IpAddr, port: u16, proto: u8) -> Self {
        Self {
            vip: vip.into(),
            port: be16(port),
            proto,
            pad: 0,
        }
    }
}

/// Value of `lb_services` (`struct lb_service`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbService {
    /// Ring index in `lb_maglev` and entry in `lb_service_stats`.
    pub id: u32,
    /// `SERVICE_F_*`.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout_s: u32,
    pub pad: u32,
}

/// Value of `lb_backends` (`struct lb_backend`); all zero means "no backend".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackend {
    pub ip: LbAddr,
    pub port: u16,
    /// `BACKEND_F_*`.
    pub flags: u16,
}

impl LbBackend {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            ip: ip.into(),
            port: be16(port),
            flags: 0,
        }
    }
}

/// Key of `lb_affinity` (`struct lb_affinity_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbAffinityKey {
    pub service_id: u32,
    pub client: LbAddr,
}

/// Value of `lb_affinity` (`struct lb_affinity`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinity {
    pub backend_id: u32,
    pub pad: u32,
    pub last_seen_ns: u64,
}

/// A 5-tuple, key of `lb_flows` and `lb_reverse` (`struct lb_flow_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbFlowKey {
    pub src: LbAddr,
    pub dst: LbAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// Value of `lb_flows` (`struct lb_flow`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbFlow {
    pub backend_id: u32,
    pub service_id: u32,
    pub nat_ip: LbAddr,
    pub nat_port: u16,
    /// `FLOW_OPEN` or `FLOW_CLOSING`.
    pub state: u8,
    pub pad: u8,
    pub pad2: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the flow's last packet.
    pub last_seen_ns: u64,
}

/// Value of `lb_reverse` (`struct lb_reverse`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbReverse {
    pub client: LbAddr,
    pub vip: LbAddr,
    pub client_port: u16,
    pub vip_port: u16,
    pub backend_id: u32,
    pub service_id: u32,
}

/// The data of an `lb_source_ranges` key (`struct lb_source_range`); the key itself
/// (`struct lb_source_range_key`) is aya's `lpm_trie::Key<LbSourceRange>`, whose prefix length
/// counts the 32 bits of `service_id` plus the client prefix (of the 128-bit address: an
/// IPv4 /n is the IPv4-mapped /(96 + n)).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbSourceRange {
    pub service_id: u32,
    pub ip: LbAddr,
}

/// Key of `lb_vips` (`struct lb_vip_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbVipKey {
    pub ip: LbAddr,
}

/// Value of `lb_vips` (`struct lb_vip`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbVip {
    pub flags: u32,
}

/// The one entry of `lb_config` (`struct lb_config`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Source address of SNATed IPv4 flows ([`LbAddr::NONE`]: such flows drop).
    pub snat_ip4: LbAddr,
    /// Source address of SNATed IPv6 flows ([`LbAddr::NONE`]: such flows drop).
    pub snat_ip6: LbAddr,
    /// Egress device of translated packets.
    pub ifindex: u32,
    /// MAC of the LB interface, the answer to ARP requests and NDP solicitations for VIPs.
    pub mac: Mac,
    pub pad: [u8; 2],
}

/// Per-CPU traffic of a backend or service (`struct lb_stats`), one CPU's share or the sum.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbStats {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

impl std::ops::AddAssign for LbStats {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.flows += other.flows;
    }
}

/// `enum lb_reason`: why the LB gave a packet its verdict (index of `lb_counters`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbReason {
    Forward = 1,
    Reply = 2,
    Pass = 3,
    DropNoBackend = 4,
    DropSourceRange = 5,
    DropMalformed = 6,
    ArpReply = 7,
    DropNoService = 8,
    DropNoPort = 9,
    DropNoRoute = 10,
    NdpReply = 11,
    FlowTableFull = 12,
    FlowUntracked = 13,
    Encap = 14,
}

impl LbReason {
    pub const ALL: [LbReason; 14] = [
        LbReason::Forward,
        LbReason::Reply,
        LbReason::Pass,
        LbReason::DropNoBackend,
        LbReason::DropSourceRange,
        LbReason::DropMalformed,
        LbReason::ArpReply,
        LbReason::DropNoService,
        LbReason::DropNoPort,
        LbReason::DropNoRoute,
        LbReason::NdpReply,
        LbReason::FlowTableFull,
        LbReason::FlowUntracked,
        LbReason::Encap,
    ];

    /// Entries of `lb_counters` (`LB_REASON_MAX`).
    pub const MAX: u32 = 15;

    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u32 == raw)
    }

    /// The label used in metrics and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            LbReason::Forward => "forward",
            LbReason::Reply => "reply",
            LbReason::Pass => "pass",
            LbReason::DropNoBackend => "drop_no_backend",
            LbReason::DropSourceRange => "drop_source_range",
            LbReason::DropMalformed => "drop_malformed",
            LbReason::ArpReply => "arp_reply",
            LbReason::DropNoService => "drop_no_service",
            LbReason::DropNoPort => "drop_no_port",
            LbReason::DropNoRoute => "drop_no_route",
            LbReason::NdpReply => "ndp_reply",
            LbReason::FlowTableFull => "flow_table_full",
            LbReason::FlowUntracked => "flow_untracked",
            LbReason::Encap => "encap",
        }
    }
}

// SAFETY: each type is `#[repr(C)]`, made only of integers and byte arrays with no implicit
// padding (checked against the BTF layout in `tests::layout_matches_btf`), so every bit pattern
// is a valid value and the kernel can read and write them as plain bytes.
unsafe impl aya::Pod for LbServiceKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LbService {}
// SAFETY: as above.
unsafe impl aya::Pod for LbBackend {}
// SAFETY: as above.
unsafe impl aya::Pod for LbFlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LbFlow {}
// SAFETY: as above.
unsafe impl aya::Pod for LbReverse {}
// SAFETY: as above.
unsafe impl aya::Pod for LbSourceRange {}
// SAFETY: as above.
unsafe impl aya::Pod for LbVipKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LbVip {}
// SAFETY: as above.
unsafe impl aya::Pod for LbConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for LbStats {}
// SAFETY: as above.
unsafe impl aya::Pod for LbAffinityKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LbAffinity {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::layout::{Mirror, assert_matches, mirror};
    use crate::btf::Btf;
    use crate::objects;

    fn mirrors() -> Vec<Mirror> {
        vec![
            mirror!("lb_addr", LbAddr, [w]),
            mirror!("lb_service_key", LbServiceKey, [vip, port, proto, pad]),
            mirror!(
                "lb_service",
                LbService,
                [id, flags, affinity_timeout_s, pad]
            ),
            mirror!("lb_backend", LbBackend, [ip, port, flags]),
            mirror!("lb_affinity_key", LbAffinityKey, [service_id, client]),
            mirror!("lb_affinity", LbAffinity, [backend_id, pad, last_seen_ns]),
            mirror!(
                "lb_flow_key",
                LbFlowKey,
                [src, dst, sport, dport, proto, pad]
            ),
            mirror!(
                "lb_flow",
                LbFlow,
                [
                    backend_id,
                    service_id,
                    nat_ip,
                    nat_port,
                    state,
                    pad,
                    pad2,
                    last_seen_ns
                ]
            ),
            mirror!(
                "lb_reverse",
                LbReverse,
                [client, vip, client_port, vip_port, backend_id, service_id]
            ),
            mirror!("lb_source_range", LbSourceRange, [service_id, ip]),
            mirror!("lb_vip_key", LbVipKey, [ip]),
            mirror!("lb_vip", LbVip, [flags]),
            mirror!(
                "lb_config",
                LbConfig,
                [snat_ip4, snat_ip6, ifindex, mac, pad]
            ),
            mirror!("lb_stats", LbStats, [packets, bytes, flows]),
        ]
    }

    #[test]
    fn layout_matches_btf() {
        assert_matches(objects::LB, &mirrors());
        assert_matches(objects::LB_XDP, &mirrors());
    }

    #[test]
    fn source_range_key_is_aya_lpm_key() {
        let btf = Btf::from_elf(objects::LB).expect("BTF");
        let key = btf
            .struct_layout("lb_source_range_key")
            .expect("lb_source_range_key");
        assert_eq!(
            key.size,
            size_of::<aya::maps::lpm_trie::Key<LbSourceRange>>()
        );
        let offsets: Vec<usize> = key.members.iter().map(|m| m.offset_bits / 8).collect();
        assert_eq!(offsets, [0, 4]);
        let data = btf
            .struct_layout("lb_source_range")
            .expect("lb_source_range");
        assert_eq!(data.size, size_of::<LbSourceRange>());
    }

    #[test]
    fn reasons_match_btf_enum() {
        let btf = Btf::from_elf(objects::LB).expect("BTF");
        let values = btf.enum_values("lb_reason").expect("enum lb_reason in BTF");
        let expected: Vec<(String, i64)> = LbReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("LB_REASON_{}", r.as_str().to_uppercase()),
                    *r as i64,
                )
            })
            .collect();
        assert_eq!(values, expected);
        assert!(LbReason::ALL.iter().all(|r| (*r as u32) < LbReason::MAX));
    }

    #[test]
    fn addresses_and_ports_are_network_order() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 99, 100, 1));
        let key = LbServiceKey::new(v4, 80, 6);
        assert_eq!(
            key.vip.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 99, 100, 1],
            "IPv4 is IPv4-mapped"
        );
        assert_eq!(key.vip.w[3], be32(Ipv4Addr::new(10, 99, 100, 1)));
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.vip.ip(), v4);

        let v6: IpAddr = "fd99:100::1".parse().expect("v6");
        let addr = LbAddr::from(v6);
        assert_eq!(addr.octets()[..2], [0xfd, 0x99]);
        assert_eq!(addr.octets()[15], 1);
        assert_eq!(addr.ip(), v6);
        assert_ne!(
            LbAddr::from(v4),
            LbAddr::from(Ipv4Addr::new(10, 99, 100, 2))
        );
        assert!(LbAddr::NONE.is_none() && !addr.is_none());
    }
}
