//! What the LB sends and listens to beside its datapath: frames out of the LB interface
//! (gratuitous ARP, unsolicited Neighbor Advertisements) through the dataplane's `AF_PACKET`
//! seam, and memberships of the solicited-node multicast groups of IPv6 VIPs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, UdpSocket};

pub use slipway_dataplane::packet::send_frame;

use crate::LbError;

/// The solicited-node multicast address of `ip` (RFC 4291 2.7.1): `ff02::1:ffXX:XXXX` with the
/// address's low 24 bits. A Neighbor Solicitation for `ip` is sent there.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// Memberships of the solicited-node groups of the announced IPv6 VIPs on the LB interface.
/// A VIP is no address of the host, so the kernel has not joined its group: a NIC's multicast
/// filter would drop the Neighbor Solicitations for it before the datapath sees them, and an
/// MLD-snooping switch would not forward them to this port. Joining (which programs the NIC's
/// filter and sends MLD reports) is what lets the datapath answer them on real networks.
/// One socket per group holds the membership; dropping it leaves the group.
#[derive(Debug)]
pub struct SolicitedNodeGroups {
    ifindex: u32,
    joined: BTreeMap<Ipv6Addr, UdpSocket>,
}

impl SolicitedNodeGroups {
    /// No groups yet, on interface `ifindex` of the calling thread's network namespace.
    pub fn new(ifindex: u32) -> Self {
        Self {
            ifindex,
            joined: BTreeMap::new(),
        }
    }

    /// Joins the groups of the IPv6 addresses among `vips` and leaves the others.
    pub fn sync<'a>(&mut self, vips: impl IntoIterator<Item = &'a IpAddr>) -> Result<(), LbError> {
        let wanted: std::collections::BTreeSet<Ipv6Addr> = vips
            .into_iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(solicited_node(*v6)),
                IpAddr::V4(_) => None,
            })
            .collect();
        self.joined.retain(|group, _| wanted.contains(group));
        for group in wanted {
            if self.joined.contains_key(&group) {
                continue;
            }
            let socket =
                UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).map_err(|source| LbError::Syscall {
                    call: "socket(AF_INET6) for a multicast membership",
                    source,
                })?;
            socket
                .join_multicast_v6(&group, self.ifindex)
                .map_err(|source| LbError::Syscall {
                    call: "setsockopt(IPV6_JOIN_GROUP)",
                    source,
                })?;
            self.joined.insert(group, socket);
        }
        Ok(())
    }

    /// The groups joined now.
    pub fn joined(&self) -> impl Iterator<Item = &Ipv6Addr> {
        self.joined.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solicited_node_keeps_the_low_24_bits() {
        let vip: Ipv6Addr = "fd99:100::12:3456".parse().expect("vip");
        assert_eq!(
            solicited_node(vip),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().expect("group")
        );
    }

    #[test]
    fn joins_and_leaves_groups_on_the_loopback() {
        // The loopback takes memberships like any device (ifindex 1 in every namespace).
        let mut groups = SolicitedNodeGroups::new(1);
        let a: IpAddr = "fd99:100::1".parse().expect("ip");
        let b: IpAddr = "fd99:100::2".parse().expect("ip");
        let v4: IpAddr = "10.99.100.1".parse().expect("ip");
        groups.sync([&a, &b, &v4]).expect("join");
        let joined: Vec<String> = groups.joined().map(ToString::to_string).collect();
        assert_eq!(joined, ["ff02::1:ff00:1", "ff02::1:ff00:2"]);
        groups.sync([&b]).expect("leave one");
        let joined: Vec<String> = groups.joined().map(ToString::to_string).collect();
        assert_eq!(joined, ["ff02::1:ff00:2"]);
    }
}
