//! LB IPAM: VIPs handed out from the configured pools. A service gets the address it asks for
//! (`loadBalancerIP`) or the first free one; services may share an address on disjoint
//! (protocol, port) sets; an address returns to its pool when its last service goes. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::LbError;
use crate::config::{LbConfig, Protocol};

/// A (protocol, port) a service occupies on its VIP.
pub type PortKey = (Protocol, u16);

/// The pools and who holds which address.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    pools: Vec<(String, Ipv4Network)>,
    /// VIP -> service -> its ports on that VIP.
    owners: BTreeMap<Ipv4Addr, BTreeMap<String, BTreeSet<PortKey>>>,
}

impl Pools {
    /// The pools of a configuration that passed [`LbConfig::validate`].
    pub fn from_config(config: &LbConfig) -> Result<Self, LbError> {
        config.validate()?;
        let pools = config
            .pools
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.cidr.parse().ok()?)))
            .collect();
        Ok(Self {
            pools,
            owners: BTreeMap::new(),
        })
    }

    /// The pool holding `ip`, by name.
    pub fn pool_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.pools
            .iter()
            .find(|(_, net)| net.contains(ip))
            .map(|(name, _)| name.as_str())
    }

    /// Gives `service` an address for `ports`: `requested` if it is in a pool and its other
    /// users (if any) hold none of `ports`, else the first address nobody holds. A service
    /// that already holds an address keeps it if it still may.
    pub fn allocate(
        &mut self,
        service: &str,
        requested: Option<Ipv4Addr>,
        ports: &BTreeSet<PortKey>,
    ) -> Result<Ipv4Addr, LbError> {
        let current = self.address_of(service);
        let vip = match (requested, current) {
            (Some(ip), _) => {
                if self.pool_of(ip).is_none() {
                    return Err(LbError::NotInPool(ip));
                }
                self.check_ports(ip, service, ports)?;
                ip
            }
            (None, Some(ip)) if self.check_ports(ip, service, ports).is_ok() => ip,
            (None, _) => self.first_free().ok_or(LbError::PoolExhausted)?,
        };
        if current.is_some_and(|c| c != vip) {
            self.release(service);
        }
        self.owners
            .entry(vip)
            .or_default()
            .insert(service.to_owned(), ports.clone());
        Ok(vip)
    }

    /// Frees `service`'s address; returns it if no other service holds it any more (it is
    /// back in the pool).
    pub fn release(&mut self, service: &str) -> Option<Ipv4Addr> {
        let vip = self.address_of(service)?;
        let users = self.owners.get_mut(&vip)?;
        users.remove(service);
        if users.is_empty() {
            self.owners.remove(&vip);
            Some(vip)
        } else {
            None
        }
    }

    /// The address `service` holds.
    pub fn address_of(&self, service: &str) -> Option<Ipv4Addr> {
        self.owners
            .iter()
            .find(|(_, users)| users.contains_key(service))
            .map(|(ip, _)| *ip)
    }

    /// Addresses in use.
    pub fn allocated(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.owners.keys().copied()
    }

    /// (pool name, CIDR, addresses in use, usable addresses) of every pool.
    pub fn usage(&self) -> Vec<(String, Ipv4Network, usize, usize)> {
        self.pools
            .iter()
            .map(|(name, net)| {
                let used = self.owners.keys().filter(|ip| net.contains(**ip)).count();
                (name.clone(), *net, used, usable(net).count())
            })
            .collect()
    }

    fn check_ports(
        &self,
        ip: Ipv4Addr,
        service: &str,
        ports: &BTreeSet<PortKey>,
    ) -> Result<(), LbError> {
        for (owner, held) in self.owners.get(&ip).into_iter().flatten() {
            if owner == service {
                continue;
            }
            if let Some((proto, port)) = held.intersection(ports).next() {
                return Err(LbError::VipConflict {
                    vip: ip,
                    owner: owner.clone(),
                    port: format!("{port}/{}", proto.as_str()),
                });
            }
        }
        Ok(())
    }

    fn first_free(&self) -> Option<Ipv4Addr> {
        self.pools
            .iter()
            .flat_map(|(_, net)| usable(net))
            .find(|ip| !self.owners.contains_key(ip))
    }
}

/// A pool's addresses, without the network and broadcast addresses of pools larger than /31.
fn usable(net: &Ipv4Network) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let ends = net.prefix() < 31;
    net.iter()
        .filter(move |ip| !ends || (*ip != net.network() && *ip != net.broadcast()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolConfig;

    fn pools(cidr: &str) -> Pools {
        Pools::from_config(&LbConfig::new(
            "eth0",
            vec![PoolConfig {
                name: "ingress".into(),
                cidr: cidr.into(),
            }],
        ))
        .expect("pools")
    }

    fn ports(list: &[(Protocol, u16)]) -> BTreeSet<PortKey> {
        list.iter().copied().collect()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn hands_out_the_first_free_address_and_takes_it_back() {
        let mut p = pools("10.99.100.0/30");
        let web = ports(&[(Protocol::Tcp, 80)]);
        assert_eq!(
            p.allocate("a/web", None, &web).expect("a"),
            ip("10.99.100.1")
        );
        assert_eq!(
            p.allocate("b/web", None, &web).expect("b"),
            ip("10.99.100.2")
        );
        assert!(matches!(
            p.allocate("c/web", None, &web),
            Err(LbError::PoolExhausted)
        ));
        assert_eq!(p.release("a/web"), Some(ip("10.99.100.1")));
        assert_eq!(
            p.allocate("c/web", None, &web).expect("c"),
            ip("10.99.100.1")
        );
        // Applying a service again keeps its address.
        assert_eq!(
            p.allocate("b/web", None, &web).expect("b"),
            ip("10.99.100.2")
        );
    }

    #[test]
    fn honours_requests_and_shares_on_disjoint_ports() {
        let mut p = pools("10.99.100.0/24");
        let vip = ip("10.99.100.50");
        let web = ports(&[(Protocol::Tcp, 80)]);
        let dns = ports(&[(Protocol::Udp, 53), (Protocol::Tcp, 53)]);
        assert_eq!(p.allocate("a/web", Some(vip), &web).expect("web"), vip);
        assert_eq!(p.allocate("a/dns", Some(vip), &dns).expect("dns"), vip);
        let err = p
            .allocate("b/web", Some(vip), &ports(&[(Protocol::Tcp, 80)]))
            .expect_err("port 80 is taken");
        assert!(err.to_string().contains("a/web on 80/TCP"), "{err}");
        // Same port number, other protocol: disjoint.
        p.allocate("b/udp80", Some(vip), &ports(&[(Protocol::Udp, 80)]))
            .expect("udp 80");
        assert!(matches!(
            p.allocate("x/y", Some(ip("10.1.1.1")), &web),
            Err(LbError::NotInPool(_))
        ));
        // Shared: the address returns to the pool with its last user only.
        assert_eq!(p.release("a/web"), None);
        assert_eq!(p.release("a/dns"), None);
        assert_eq!(p.release("b/udp80"), Some(vip));
        assert_eq!(p.allocated().count(), 0);
        // The first free address skips the network address.
        assert_eq!(p.allocate("c/d", None, &web).expect("c"), ip("10.99.100.1"));
    }

    #[test]
    fn usage_counts_addresses() {
        let mut p = pools("10.99.100.0/27");
        p.allocate("a/b", None, &ports(&[(Protocol::Tcp, 1)]))
            .expect("a");
        let usage = p.usage();
        assert_eq!(usage.len(), 1);
        assert_eq!((usage[0].2, usage[0].3), (1, 30));
    }
}
