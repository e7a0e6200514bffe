//! LB IPAM: VIPs handed out from the configured pools, IPv4 and IPv6. A service gets the
//! address it asks for (`loadBalancerIP`) or the first free one of its family; services may
//! share an address on disjoint (protocol, port) sets; an address returns to its pool when its
//! last service goes. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::LbError;
use crate::config::{IpFamily, LbConfig, Protocol};

/// A (protocol, port) a service occupies on its VIP.
pub type PortKey = (Protocol, u16);

/// The pools and who holds which address.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    pools: Vec<(String, IpNetwork)>,
    /// VIP -> service -> its ports on that VIP.
    owners: BTreeMap<IpAddr, BTreeMap<String, BTreeSet<PortKey>>>,
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
    pub fn pool_of(&self, ip: IpAddr) -> Option<&str> {
        self.pools
            .iter()
            .find(|(_, net)| net.contains(ip))
            .map(|(name, _)| name.as_str())
    }

    /// Gives `service` an address of `family` for `ports`: `requested` if it is in a pool and
    /// its other users (if any) hold none of `ports`, else the first address of that family
    /// nobody holds. A service that already holds an address keeps it if it still may.
    pub fn allocate(
        &mut self,
        service: &str,
        family: IpFamily,
        requested: Option<IpAddr>,
        ports: &BTreeSet<PortKey>,
    ) -> Result<IpAddr, LbError> {
        let current = self.address_of(service);
        let vip = match (requested, current) {
            (Some(ip), _) => {
                if self.pool_of(ip).is_none() {
                    return Err(LbError::NotInPool(ip));
                }
                self.check_ports(ip, service, ports)?;
                ip
            }
            (None, Some(ip))
                if IpFamily::of(ip) == family && self.check_ports(ip, service, ports).is_ok() =>
            {
                ip
            }
            (None, _) => self
                .first_free(family)
                .ok_or(LbError::PoolExhausted(family))?,
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
    pub fn release(&mut self, service: &str) -> Option<IpAddr> {
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
    pub fn address_of(&self, service: &str) -> Option<IpAddr> {
        self.owners
            .iter()
            .find(|(_, users)| users.contains_key(service))
            .map(|(ip, _)| *ip)
    }

    /// Addresses in use.
    pub fn allocated(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.owners.keys().copied()
    }

    /// (pool name, CIDR, addresses in use, usable addresses) of every pool; the size
    /// saturates at `usize::MAX` (an IPv6 /64 holds 2^64 - 1).
    pub fn usage(&self) -> Vec<(String, IpNetwork, usize, usize)> {
        self.pools
            .iter()
            .map(|(name, net)| {
                let used = self.owners.keys().filter(|ip| net.contains(**ip)).count();
                (name.clone(), *net, used, usable_count(*net))
            })
            .collect()
    }

    fn check_ports(
        &self,
        ip: IpAddr,
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

    /// The first address of `family` nobody holds. The search walks a pool from its start and
    /// stops at the first free address, so an IPv6 /64 costs no more than the addresses
    /// already held (at most `LB_MAX_VIPS` of them are).
    fn first_free(&self, family: IpFamily) -> Option<IpAddr> {
        self.pools
            .iter()
            .filter(|(_, net)| IpFamily::of_net(*net) == family)
            .flat_map(|(_, net)| usable(*net))
            .find(|ip| !self.owners.contains_key(ip))
    }
}

/// A pool's addresses: IPv4 without the network and broadcast addresses of pools larger than
/// /31; IPv6 without the Subnet-Router anycast address (all-zero host part, RFC 4291 2.6.1)
/// of pools larger than /127.
fn usable(net: IpNetwork) -> impl Iterator<Item = IpAddr> {
    let (network, broadcast, ends) = match net {
        IpNetwork::V4(n) => (
            IpAddr::V4(n.network()),
            Some(IpAddr::V4(n.broadcast())),
            n.prefix() < 31,
        ),
        IpNetwork::V6(n) => (IpAddr::V6(n.network()), None, n.prefix() < 127),
    };
    net.iter()
        .filter(move |ip| !ends || (*ip != network && Some(*ip) != broadcast))
}

/// How many addresses [`usable`] yields, saturating at `usize::MAX`.
fn usable_count(net: IpNetwork) -> usize {
    let (bits, reserved) = match net {
        IpNetwork::V4(n) => (
            32 - u32::from(n.prefix()),
            if n.prefix() < 31 { 2 } else { 0 },
        ),
        IpNetwork::V6(n) => (128 - u32::from(n.prefix()), u128::from(n.prefix() < 127)),
    };
    let all = 1u128.checked_shl(bits).unwrap_or(u128::MAX);
    usize::try_from(all - reserved).unwrap_or(usize::MAX)
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

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    const V4: IpFamily = IpFamily::Ipv4;
    const V6: IpFamily = IpFamily::Ipv6;

    #[test]
    fn hands_out_the_first_free_address_and_takes_it_back() {
        let mut p = pools("10.99.100.0/30");
        let web = ports(&[(Protocol::Tcp, 80)]);
        assert_eq!(
            p.allocate("a/web", V4, None, &web).expect("a"),
            ip("10.99.100.1")
        );
        assert_eq!(
            p.allocate("b/web", V4, None, &web).expect("b"),
            ip("10.99.100.2")
        );
        assert!(matches!(
            p.allocate("c/web", V4, None, &web),
            Err(LbError::PoolExhausted(IpFamily::Ipv4))
        ));
        assert_eq!(p.release("a/web"), Some(ip("10.99.100.1")));
        assert_eq!(
            p.allocate("c/web", V4, None, &web).expect("c"),
            ip("10.99.100.1")
        );
        // Applying a service again keeps its address.
        assert_eq!(
            p.allocate("b/web", V4, None, &web).expect("b"),
            ip("10.99.100.2")
        );
    }

    #[test]
    fn honours_requests_and_shares_on_disjoint_ports() {
        let mut p = pools("10.99.100.0/24");
        let vip = ip("10.99.100.50");
        let web = ports(&[(Protocol::Tcp, 80)]);
        let dns = ports(&[(Protocol::Udp, 53), (Protocol::Tcp, 53)]);
        assert_eq!(p.allocate("a/web", V4, Some(vip), &web).expect("web"), vip);
        assert_eq!(p.allocate("a/dns", V4, Some(vip), &dns).expect("dns"), vip);
        let err = p
            .allocate("b/web", V4, Some(vip), &ports(&[(Protocol::Tcp, 80)]))
            .expect_err("port 80 is taken");
        assert!(err.to_string().contains("a/web on 80/TCP"), "{err}");
        // Same port number, other protocol: disjoint.
        p.allocate("b/udp80", V4, Some(vip), &ports(&[(Protocol::Udp, 80)]))
            .expect("udp 80");
        assert!(matches!(
            p.allocate("x/y", V4, Some(ip("10.1.1.1")), &web),
            Err(LbError::NotInPool(_))
        ));
        // Shared: the address returns to the pool with its last user only.
        assert_eq!(p.release("a/web"), None);
        assert_eq!(p.release("a/dns"), None);
        assert_eq!(p.release("b/udp80"), Some(vip));
        assert_eq!(p.allocated().count(), 0);
        // The first free address skips the network address.
        assert_eq!(
            p.allocate("c/d", V4, None, &web).expect("c"),
            ip("10.99.100.1")
        );
    }

    #[test]
    fn usage_counts_addresses() {
        let mut p = pools("10.99.100.0/27");
        p.allocate("a/b", V4, None, &ports(&[(Protocol::Tcp, 1)]))
            .expect("a");
        let usage = p.usage();
        assert_eq!(usage.len(), 1);
        assert_eq!((usage[0].2, usage[0].3), (1, 30));
    }

    fn dual() -> Pools {
        Pools::from_config(&LbConfig::new(
            "eth0",
            vec![
                PoolConfig {
                    name: "v4".into(),
                    cidr: "10.99.100.0/30".into(),
                },
                PoolConfig {
                    name: "v6".into(),
                    cidr: "fd99:100::/126".into(),
                },
            ],
        ))
        .expect("pools")
    }

    #[test]
    fn ipv6_pools_hand_out_addresses_of_their_family_only() {
        let mut p = dual();
        let web = ports(&[(Protocol::Tcp, 80)]);
        // The Subnet-Router anycast address (fd99:100::) is skipped.
        assert_eq!(
            p.allocate("a/web", V6, None, &web).expect("a"),
            ip("fd99:100::1")
        );
        assert_eq!(
            p.allocate("b/web", V4, None, &web).expect("b"),
            ip("10.99.100.1"),
            "an IPv4 service gets an IPv4 address beside it"
        );
        assert_eq!(
            p.allocate("c/web", V6, None, &web).expect("c"),
            ip("fd99:100::2")
        );
        assert_eq!(
            p.allocate("d/web", V6, None, &web).expect("d"),
            ip("fd99:100::3")
        );
        let err = p
            .allocate("e/web", V6, None, &web)
            .expect_err("a /126 holds three");
        assert!(
            matches!(err, LbError::PoolExhausted(IpFamily::Ipv6)),
            "{err}"
        );
        assert!(err.to_string().contains("IPv6"), "{err}");
        assert_eq!(p.release("c/web"), Some(ip("fd99:100::2")));
        assert_eq!(
            p.allocate("e/web", V6, None, &web).expect("e"),
            ip("fd99:100::2"),
            "released, then re-allocated"
        );
        // A service that changes family gets a new address and frees the old one.
        assert_eq!(
            p.allocate("a/web", V4, None, &web).expect("a as v4"),
            ip("10.99.100.2")
        );
        assert_eq!(p.address_of("a/web"), Some(ip("10.99.100.2")));
        assert_eq!(
            p.allocate("f/web", V6, None, &web).expect("f"),
            ip("fd99:100::1")
        );
    }

    #[test]
    fn ipv6_requests_and_sharing_follow_the_ipv4_rules() {
        let mut p = dual();
        let vip = ip("fd99:100::3");
        let web = ports(&[(Protocol::Tcp, 80)]);
        let dns = ports(&[(Protocol::Udp, 53)]);
        assert_eq!(p.allocate("a/web", V6, Some(vip), &web).expect("web"), vip);
        assert_eq!(p.allocate("a/dns", V6, Some(vip), &dns).expect("dns"), vip);
        let err = p.allocate("b/web", V6, Some(vip), &web).expect_err("taken");
        assert!(
            err.to_string()
                .contains("address fd99:100::3 is used by service a/web on 80/TCP"),
            "{err}"
        );
        assert!(matches!(
            p.allocate("x/y", V6, Some(ip("fd99:200::1")), &web),
            Err(LbError::NotInPool(_))
        ));
        assert_eq!(p.pool_of(vip), Some("v6"));
        assert_eq!(p.pool_of(ip("10.99.100.1")), Some("v4"));
        assert_eq!(p.release("a/web"), None);
        assert_eq!(p.release("a/dns"), Some(vip));
    }

    #[test]
    fn ipv6_usage_counts_without_walking_the_pool() {
        let mut p = Pools::from_config(&LbConfig::new(
            "eth0",
            vec![
                PoolConfig {
                    name: "small".into(),
                    cidr: "fd99:100::/120".into(),
                },
                PoolConfig {
                    name: "huge".into(),
                    cidr: "fd99:200::/64".into(),
                },
                PoolConfig {
                    name: "pair".into(),
                    cidr: "fd99:300::/127".into(),
                },
            ],
        ))
        .expect("pools");
        p.allocate("a/b", V6, None, &ports(&[(Protocol::Tcp, 1)]))
            .expect("a");
        p.allocate(
            "c/d",
            V6,
            Some(ip("fd99:200::7")),
            &ports(&[(Protocol::Tcp, 1)]),
        )
        .expect("c");
        let usage: Vec<(usize, usize)> = p.usage().iter().map(|u| (u.2, u.3)).collect();
        assert_eq!(
            usage,
            [(1, 255), (1, usize::MAX), (0, 2)],
            "a /64 has 2^64 - 1 usable addresses: saturated; a /127 keeps both"
        );
    }
}
