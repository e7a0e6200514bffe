//! `#[repr(C)]` mirrors of the NetworkPolicy types in `ebpf/include/abi.h` (the "NetworkPolicy"
//! section), used by `ebpf/include/policy.h` and [`crate::policy`].

use std::net::Ipv4Addr;

/// Capacity of `policy_rules`, both slots (`POLICY_MAX_RULES`).
pub const MAX_RULES: u32 = 262_144;
/// Capacity of `policy_ipcache`, both slots (`POLICY_MAX_IPCACHE`).
pub const MAX_IPCACHE: u32 = 131_072;
/// Default capacity of the `policy_ct` LRU (`POLICY_MAX_CT`).
pub const MAX_CT: u32 = 524_288;
/// Capacity of `policy_endpoints`, both slots (`POLICY_MAX_ENDPOINTS`).
pub const MAX_ENDPOINTS: u32 = 131_072;

/// `POLICY_IDENTITY_ANY`: in a rule key, any peer.
pub const IDENTITY_ANY: u32 = 0;
/// `POLICY_IDENTITY_WORLD`: an address no pod has and no ipBlock names.
pub const IDENTITY_WORLD: u32 = 1;

/// `POLICY_F_*`: an endpoint's flags.
pub const F_INGRESS: u32 = 0x1;
pub const F_EGRESS: u32 = 0x2;
pub const F_INGRESS_FAIL_CLOSED: u32 = 0x4;
pub const F_EGRESS_FAIL_CLOSED: u32 = 0x8;

/// Prefix lengths of a rule key: any protocol, any port of one protocol, and the base that the
/// number of matched port bits is added to (`POLICY_RULE_*`).
pub const RULE_ANY_PROTO: u32 = 96;
pub const RULE_ANY_PORT: u32 = 104;
pub const RULE_PORT_BASE: u32 = 112;

/// `enum policy_direction`, as seen from the endpoint a policy selects.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The flag saying an endpoint is isolated in this direction.
    pub fn isolated_flag(self) -> u32 {
        match self {
            Direction::Ingress => F_INGRESS,
            Direction::Egress => F_EGRESS,
        }
    }

    /// The flag saying an endpoint fails closed in this direction.
    pub fn fail_closed_flag(self) -> u32 {
        match self {
            Direction::Ingress => F_INGRESS_FAIL_CLOSED,
            Direction::Egress => F_EGRESS_FAIL_CLOSED,
        }
    }
}

/// `enum policy_verdict`: what a policy event reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Allow = 1,
    Deny = 2,
    DenyFailClosed = 3,
}

impl Verdict {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Verdict::Allow),
            2 => Some(Verdict::Deny),
            3 => Some(Verdict::DenyFailClosed),
            _ => None,
        }
    }

    pub fn allows(self) -> bool {
        self == Verdict::Allow
    }
}

/// The single entry of `policy_state` (`struct policy_state`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// 0: no policy installed; otherwise the slot read is `generation & 1`.
    pub generation: u32,
    pub pad: u32,
}

/// The data of a `policy_ipcache` LPM key (`struct policy_ipcache_data`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheData {
    pub slot: u8,
    pub pad: [u8; 3],
    /// IPv4 address in network byte order.
    pub ip4: u32,
}

impl IpcacheData {
    /// Bits of the prefix that cover the slot and padding, before the address.
    pub const SLOT_BITS: u32 = 32;

    pub fn new(slot: u8, ip: Ipv4Addr) -> Self {
        Self {
            slot,
            pad: [0; 3],
            ip4: u32::from_ne_bytes(ip.octets()),
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip4.to_ne_bytes())
    }
}

/// Value of `policy_ipcache` (`struct policy_identity`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub id: u32,
}

/// Key of `policy_endpoints` (`struct policy_endpoint_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv4 address in network byte order.
    pub ip4: u32,
    pub slot: u32,
}

impl EndpointKey {
    pub fn new(slot: u8, ip: Ipv4Addr) -> Self {
        Self {
            ip4: u32::from_ne_bytes(ip.octets()),
            slot: u32::from(slot),
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip4.to_ne_bytes())
    }
}

/// Value of `policy_endpoints` (`struct policy_endpoint`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointFlags {
    /// `F_*` bits.
    pub flags: u32,
}

/// The data of a `policy_rules` LPM key (`struct policy_rule_data`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleData {
    pub slot: u8,
    /// A [`Direction`] as its raw value.
    pub direction: u8,
    pub pad: [u8; 2],
    /// The endpoint's IPv4 address in network byte order.
    pub ep_ip4: u32,
    /// The peer identity, or [`IDENTITY_ANY`].
    pub identity: u32,
    pub proto: u8,
    pub pad2: u8,
    /// Port in network byte order.
    pub dport: u16,
}

/// Value of `policy_rules` (`struct policy_rule`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    pub rule_id: u32,
}

/// Value of `policy_ct` (`struct policy_ct`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub generation: u32,
    pub pad: u32,
}

/// A record of the `policy_events` ring buffer (`struct policy_event`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// bpf_ktime_get_ns(): CLOCK_MONOTONIC.
    pub time_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// A [`Direction`] as its raw value.
    pub direction: u8,
    /// A [`Verdict`] as its raw value.
    pub verdict: u8,
    pub pad: u8,
    pub rule_id: u32,
    pub generation: u32,
}

impl Event {
    /// Reads a record as the ring buffer hands it over; None when it is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: `Event` is `#[repr(C)]` plain integers without padding (checked against
        // BTF in the layout test), so any bytes of its size are a valid value; the length was
        // checked above and read_unaligned copes with any alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.saddr.to_ne_bytes())
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.daddr.to_ne_bytes())
    }
}

// SAFETY: each type is `#[repr(C)]`, made only of integers and byte arrays with no padding
// (checked against the BTF layout in `tests::layout_matches_btf`), so every bit pattern is a
// valid value and the kernel can read and write them as plain bytes.
unsafe impl aya::Pod for PolicyState {}
// SAFETY: as above.
unsafe impl aya::Pod for IpcacheData {}
// SAFETY: as above.
unsafe impl aya::Pod for Identity {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointKey {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointFlags {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleData {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleValue {}
// SAFETY: as above.
unsafe impl aya::Pod for CtEntry {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::layout::{Mirror, assert_matches, mirror};
    use crate::btf::Btf;
    use crate::objects;

    fn mirrors() -> Vec<Mirror> {
        vec![
            mirror!("policy_state", PolicyState, [generation, pad]),
            mirror!("policy_ipcache_data", IpcacheData, [slot, pad, ip4]),
            mirror!("policy_identity", Identity, [id]),
            mirror!("policy_endpoint_key", EndpointKey, [ip4, slot]),
            mirror!("policy_endpoint", EndpointFlags, [flags]),
            mirror!(
                "policy_rule_data",
                RuleData,
                [slot, direction, pad, ep_ip4, identity, proto, pad2, dport]
            ),
            mirror!("policy_rule", RuleValue, [rule_id]),
            mirror!("policy_ct", CtEntry, [generation, pad]),
            mirror!(
                "policy_event",
                Event,
                [
                    time_ns, saddr, daddr, sport, dport, proto, direction, verdict, pad, rule_id,
                    generation
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
    fn lpm_keys_are_a_prefix_length_then_the_data() {
        let btf = Btf::from_elf(objects::POD_VETH).expect("BTF");
        for (key, data_size) in [
            ("policy_ipcache_key", size_of::<IpcacheData>()),
            ("policy_rule_key", size_of::<RuleData>()),
        ] {
            let layout = btf.struct_layout(key).expect(key);
            assert_eq!(layout.size, 4 + data_size, "{key}");
            let names: Vec<&str> = layout.members.iter().map(|m| m.name.as_str()).collect();
            assert_eq!(names, ["prefixlen", "data"], "{key}");
        }
        // The rule key's always-matched part ends where the protocol starts.
        assert_eq!(
            RULE_ANY_PROTO as usize,
            8 * std::mem::offset_of!(RuleData, proto)
        );
        assert_eq!(
            RULE_PORT_BASE as usize,
            8 * std::mem::offset_of!(RuleData, dport)
        );
    }
}
