//! VIP announcement (MetalLB's layer-2 mode): the datapath answers ARP requests and Neighbor
//! Solicitations for the VIPs in `lb_vips`, and the announcer sends gratuitous ARP (IPv4) or
//! unsolicited Neighbor Advertisements (IPv6) when it takes a VIP over, so that neighbours
//! update their caches at once. Whether this host may announce at all is a
//! [`Lease`]: today a static one; with leader election (supervisor integration) a lease that
//! can be lost, whereupon [`Announcer::sync`] withdraws every VIP.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tracing::info;

use crate::LbError;
use crate::maps::LbMaps;

/// The right to announce VIPs from this host.
pub trait Lease: Debug + Send + Sync {
    /// Whether this host holds `vip`'s lease now.
    fn holds(&self, vip: IpAddr) -> bool;
}

/// A lease that is always held: one LB host, no failover.
#[derive(Debug, Clone, Copy, Default)]
pub struct StaticLease;

impl Lease for StaticLease {
    fn holds(&self, _vip: IpAddr) -> bool {
        true
    }
}

/// Keeps `lb_vips` equal to the VIPs this host should answer for.
#[derive(Debug)]
pub struct Announcer {
    lease: Arc<dyn Lease>,
    announced: BTreeSet<IpAddr>,
}

impl Announcer {
    pub fn new(lease: Arc<dyn Lease>) -> Self {
        Self {
            lease,
            announced: BTreeSet::new(),
        }
    }

    /// Announces those of `wanted` whose lease this host holds and withdraws the rest. Returns
    /// the VIPs newly taken over: the caller announces them ([`announcement_frame`]).
    pub fn sync(
        &mut self,
        maps: &mut dyn LbMaps,
        wanted: &BTreeSet<IpAddr>,
    ) -> Result<Vec<IpAddr>, LbError> {
        let wanted: BTreeSet<IpAddr> = wanted
            .iter()
            .copied()
            .filter(|vip| self.lease.holds(*vip))
            .collect();
        let wanted = &wanted;
        for vip in self
            .announced
            .difference(wanted)
            .copied()
            .collect::<Vec<_>>()
        {
            maps.remove_vip(vip)?;
            self.announced.remove(&vip);
            info!(%vip, "VIP withdrawn");
        }
        let mut taken = Vec::new();
        for vip in wanted
            .difference(&self.announced)
            .copied()
            .collect::<Vec<_>>()
        {
            maps.add_vip(vip)?;
            self.announced.insert(vip);
            info!(%vip, "VIP announced");
            taken.push(vip);
        }
        Ok(taken)
    }

    /// The VIPs announced now.
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }
}

/// A gratuitous ARP request (RFC 5227 section 3, "ARP Announcement"): sender and target
/// protocol address both `vip`, sent to the broadcast address from `mac`.
pub fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&vip.octets());
    // Target hardware address stays zero.
    f[38..42].copy_from_slice(&vip.octets());
    f
}

/// The frame that tells the link `vip` is at `mac`: a gratuitous ARP for IPv4, an unsolicited
/// Neighbor Advertisement for IPv6.
pub fn announcement_frame(mac: [u8; 6], vip: IpAddr) -> Vec<u8> {
    match vip {
        IpAddr::V4(v4) => garp_frame(mac, v4).to_vec(),
        IpAddr::V6(v6) => unsolicited_na_frame(mac, v6).to_vec(),
    }
}

/// An unsolicited Neighbor Advertisement (RFC 4861 7.2.6): from `vip` to all-nodes (ff02::1,
/// 33:33:00:00:00:01), hop limit 255, Solicited clear and Override set so that every cache
/// holding `vip` takes `mac` (RFC 4861 7.2.5), with `mac` as target link-layer address.
pub fn unsolicited_na_frame(mac: [u8; 6], vip: Ipv6Addr) -> [u8; 86] {
    const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut f = [0u8; 86];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    // IPv6: version 6, payload 32 bytes of ICMPv6 (58), hop limit 255.
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&vip.octets());
    f[38..54].copy_from_slice(&ALL_NODES.octets());
    // Neighbor Advertisement: type 136, code 0, checksum (below), flags O.
    f[54] = 136;
    f[58] = 0x20;
    f[62..78].copy_from_slice(&vip.octets());
    // Target link-layer address option: type 2, length 1 (8 bytes).
    f[78] = 2;
    f[79] = 1;
    f[80..86].copy_from_slice(&mac);
    let checksum = icmpv6_checksum(vip, ALL_NODES, &f[54..86]);
    f[56..58].copy_from_slice(&checksum.to_be_bytes());
    f
}

/// The ICMPv6 checksum of `message` (its checksum field zero) from `src` to `dst`: the
/// one's-complement sum over the pseudo-header and the message (RFC 4443 2.3, RFC 8200 8.1).
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            sum += u64::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&len.to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv6Packet, Icmpv6Repr, Ipv6Packet,
        NdiscNeighborFlags, NdiscRepr,
    };

    use super::*;

    #[test]
    fn unsolicited_na_is_valid_with_override_and_target_lladdr() {
        let mac = [2, 0, 0, 0, 0, 7];
        let vip: Ipv6Addr = "fd99:100::1".parse().expect("vip");
        let f = unsolicited_na_frame(mac, vip);
        let eth = EthernetFrame::new_checked(&f[..]).expect("ethernet");
        assert_eq!(eth.dst_addr(), EthernetAddress([0x33, 0x33, 0, 0, 0, 1]));
        assert_eq!(eth.src_addr(), EthernetAddress(mac));
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv6);
        let ip = Ipv6Packet::new_checked(eth.payload()).expect("ipv6");
        assert_eq!(ip.hop_limit(), 255, "RFC 4861 7.1.2");
        assert_eq!(ip.src_addr(), vip);
        assert_eq!(
            ip.dst_addr(),
            "ff02::1".parse::<Ipv6Addr>().expect("all-nodes")
        );
        assert_eq!(usize::from(ip.payload_len()), ip.payload().len());
        let icmp = Icmpv6Packet::new_checked(ip.payload()).expect("icmpv6");
        assert!(
            icmp.verify_checksum(&vip, &ip.dst_addr()),
            "ICMPv6 checksum"
        );
        let repr =
            Icmpv6Repr::parse(&vip, &ip.dst_addr(), &icmp, &Default::default()).expect("parse");
        assert_eq!(
            repr,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::OVERRIDE,
                target_addr: vip,
                lladdr: Some(EthernetAddress(mac).into()),
            })
        );
        assert_eq!(announcement_frame(mac, IpAddr::V6(vip)), f.to_vec());
    }

    #[test]
    fn icmpv6_checksum_matches_a_known_packet() {
        // An Echo Request (type 128, id 1, seq 1, no data) from ::1 to ::1; the sum of the
        // pseudo-header and message is 0x0002 + 0x0008 + 0x003a + 0x8000 + 0x0001 + 0x0001.
        let lo = Ipv6Addr::LOCALHOST;
        let message = [128, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(icmpv6_checksum(lo, lo, &message), !0x8046);
    }

    #[test]
    fn garp_frame_is_an_arp_announcement() {
        let mac = [2, 0, 0, 0, 0, 7];
        let f = garp_frame(mac, Ipv4Addr::new(10, 99, 100, 1));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[10, 99, 100, 1]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 99, 100, 1]);
        assert_eq!(
            announcement_frame(mac, IpAddr::V4(Ipv4Addr::new(10, 99, 100, 1))),
            f.to_vec()
        );
    }
}
