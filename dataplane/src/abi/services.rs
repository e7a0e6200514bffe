//! `#[repr(C)]` mirrors of the socket-level service translation types in `ebpf/include/abi.h`
//! (the "Services" section), used by `ebpf/sock.c` and [`crate::services`].

use std::net::{Ipv4Addr, SocketAddrV4};

/// Capacity of `svc_services` (`SVC_MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 65536;
/// Capacity of `svc_slots` (`SVC_MAX_SLOTS`).
pub const MAX_SLOTS: u32 = 262_144;
/// Most backends one service may have (`SVC_MAX_BACKENDS`).
pub const MAX_BACKENDS: usize = 4096;
/// Capacity of the `svc_reverse` LRU map (`SVC_MAX_REVERSE`).
pub const MAX_REVERSE: u32 = 65536;

/// `IPPROTO_TCP` / `IPPROTO_UDP`: the protocols a service key can carry.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp = 6,
    Udp = 17,
}

impl Protocol {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Key of `svc_services` (`struct svc_key`): a ClusterIP or node IP, a port, a protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// IPv4 address in network byte order.
    pub ip4: u32,
    /// Port in network byte order.
    pub port: u16,
    /// A [`Protocol`] as its raw value.
    pub proto: u8,
    pub pad: u8,
}

/// Value of `svc_services` (`struct svc_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcInfo {
    /// Backends in the current revision; 0 refuses connects.
    pub count: u32,
    /// Revision whose `svc_slots` entries are the backend list.
    pub revision: u32,
}

/// Key of `svc_slots` (`struct svc_slot_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcSlotKey {
    pub ip4: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub revision: u32,
    pub slot: u32,
}

/// An address and port (`struct svc_addr`): a backend in `svc_slots`, a service address in
/// `svc_reverse`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcAddr {
    /// IPv4 address in network byte order.
    pub ip4: u32,
    /// Port in network byte order.
    pub port: u16,
    pub pad: u16,
}

/// Key of `svc_reverse` (`struct svc_reverse_key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcReverseKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    pub ip4: u32,
    pub port: u16,
    pub pad: u16,
}

/// `enum svc_event`: the index of a per-CPU `svc_counters` entry.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SvcEvent {
    ConnectTcp = 0,
    ConnectUdp = 1,
    SendmsgUdp = 2,
    RecvmsgUdp = 3,
    RefusedNoBackend = 4,
    RefusedRace = 5,
    Getpeername = 6,
    PacketTcp = 7,
    PacketUdp = 8,
}

impl SvcEvent {
    pub const ALL: [SvcEvent; 9] = [
        SvcEvent::ConnectTcp,
        SvcEvent::ConnectUdp,
        SvcEvent::SendmsgUdp,
        SvcEvent::RecvmsgUdp,
        SvcEvent::RefusedNoBackend,
        SvcEvent::RefusedRace,
        SvcEvent::Getpeername,
        SvcEvent::PacketTcp,
        SvcEvent::PacketUdp,
    ];

    /// The label used in metrics and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            SvcEvent::ConnectTcp => "connect_tcp",
            SvcEvent::ConnectUdp => "connect_udp",
            SvcEvent::SendmsgUdp => "sendmsg_udp",
            SvcEvent::RecvmsgUdp => "recvmsg_udp",
            SvcEvent::RefusedNoBackend => "refused_no_backend",
            SvcEvent::RefusedRace => "refused_race",
            SvcEvent::Getpeername => "getpeername",
            SvcEvent::PacketTcp => "packet_tcp",
            SvcEvent::PacketUdp => "packet_udp",
        }
    }
}

fn be_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn be_port(port: u16) -> u16 {
    port.to_be()
}

impl SvcKey {
    pub fn new(ip: Ipv4Addr, port: u16, proto: Protocol) -> Self {
        Self {
            ip4: be_ip(ip),
            port: be_port(port),
            proto: proto as u8,
            pad: 0,
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip4.to_ne_bytes())
    }

    /// The port in host byte order.
    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }

    /// The protocol, `None` for a raw value the datapath never writes.
    pub fn protocol(&self) -> Option<Protocol> {
        Protocol::from_raw(self.proto)
    }

    /// Slot `slot` of revision `revision` of this service's backend list.
    pub fn slot(&self, revision: u32, slot: u32) -> SvcSlotKey {
        SvcSlotKey {
            ip4: self.ip4,
            port: self.port,
            proto: self.proto,
            pad: 0,
            revision,
            slot,
        }
    }
}

impl SvcAddr {
    pub fn new(addr: SocketAddrV4) -> Self {
        Self {
            ip4: be_ip(*addr.ip()),
            port: be_port(addr.port()),
            pad: 0,
        }
    }

    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(self.ip4.to_ne_bytes()),
            u16::from_be(self.port),
        )
    }
}

// SAFETY: each type is `#[repr(C)]`, made only of integers with no padding (checked against
// the BTF layout in `tests::layout_matches_btf`), so every bit pattern is a valid value and the
// kernel can read and write them as plain bytes.
unsafe impl aya::Pod for SvcKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcSlotKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcAddr {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcReverseKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::layout::{Mirror, assert_matches, mirror};
    use crate::btf::Btf;
    use crate::objects;

    fn mirrors() -> Vec<Mirror> {
        vec![
            mirror!("svc_key", SvcKey, [ip4, port, proto, pad]),
            mirror!("svc_info", SvcInfo, [count, revision]),
            mirror!(
                "svc_slot_key",
                SvcSlotKey,
                [ip4, port, proto, pad, revision, slot]
            ),
            mirror!("svc_addr", SvcAddr, [ip4, port, pad]),
            mirror!("svc_reverse_key", SvcReverseKey, [cookie, ip4, port, pad]),
        ]
    }

    #[test]
    fn layout_matches_btf() {
        assert_matches(objects::SOCK, &mirrors());
    }

    #[test]
    fn events_match_btf_enum() {
        let btf = Btf::from_elf(objects::SOCK).expect("BTF");
        let values = btf.enum_values("svc_event").expect("enum svc_event in BTF");
        let expected: Vec<(String, i64)> = SvcEvent::ALL
            .iter()
            .map(|e| {
                (
                    format!("SVC_EVENT_{}", e.as_str().to_uppercase()),
                    *e as i64,
                )
            })
            .collect();
        assert_eq!(values, expected);
    }

    #[test]
    fn keys_are_network_order() {
        let key = SvcKey::new(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Udp);
        assert_eq!(key.ip4.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(
            (key.ip(), key.port(), key.protocol()),
            (Ipv4Addr::new(10, 96, 0, 10), 80, Some(Protocol::Udp))
        );
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080);
        assert_eq!(SvcAddr::new(addr).addr(), addr);
        let slot = key.slot(7, 2);
        assert_eq!((slot.ip4, slot.port, slot.proto), (key.ip4, key.port, 17));
    }
}
