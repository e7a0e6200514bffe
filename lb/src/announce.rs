//! VIP announcement (MetalLB's layer-2 mode): the datapath answers ARP requests for the VIPs
//! in `lb_vips`, and the announcer sends gratuitous ARP when it takes a VIP over, so that
//! neighbours update their caches at once. Whether this host may announce at all is a
//! [`Lease`]: today a static one; with leader election (supervisor integration) a lease that
//! can be lost, whereupon [`Announcer::sync`] withdraws every VIP.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::net::Ipv4Addr;
use std::sync::Arc;

use tracing::info;

use crate::LbError;
use crate::maps::LbMaps;

/// The right to announce VIPs from this host.
pub trait Lease: Debug + Send + Sync {
    /// Whether this host holds the lease now.
    fn held(&self) -> bool;
}

/// A lease that is always held: one LB host, no failover.
#[derive(Debug, Clone, Copy, Default)]
pub struct StaticLease;

impl Lease for StaticLease {
    fn held(&self) -> bool {
        true
    }
}

/// Keeps `lb_vips` equal to the VIPs this host should answer for.
#[derive(Debug)]
pub struct Announcer {
    lease: Arc<dyn Lease>,
    announced: BTreeSet<Ipv4Addr>,
}

impl Announcer {
    pub fn new(lease: Arc<dyn Lease>) -> Self {
        Self {
            lease,
            announced: BTreeSet::new(),
        }
    }

    /// Announces `wanted` (or nothing, without the lease) and withdraws the rest. Returns the
    /// VIPs newly taken over: the caller sends gratuitous ARP for them.
    pub fn sync(
        &mut self,
        maps: &mut dyn LbMaps,
        wanted: &BTreeSet<Ipv4Addr>,
    ) -> Result<Vec<Ipv4Addr>, LbError> {
        let empty = BTreeSet::new();
        let wanted = if self.lease.held() { wanted } else { &empty };
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
    pub fn announced(&self) -> &BTreeSet<Ipv4Addr> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
