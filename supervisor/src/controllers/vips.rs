//! VIP allocation from a Cluster's ingress pool (`spec.settings.network.ingress.cidrBlocks`),
//! MetalLB's rules: a Service gets the address it asks for (`spec.loadBalancerIP`) if that is in
//! the pool and free for it, else keeps the one its status holds, else shares one with Services
//! of the same sharing key, else the lowest free one. An address is shared only by Services
//! that all carry the same [`SHARE_ANNOTATION`] value and hold no (protocol, port) in common.
//! Pure: the reconciler passes in what the Services' statuses hold.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// The annotation whose equal values let Services share a VIP on distinct ports (MetalLB's
/// `metallb.io/allow-shared-ip`).
pub const SHARE_ANNOTATION: &str = "slipway.dev/allow-shared-ip";

/// A (protocol, port) a Service occupies on its VIP.
pub type PortKey = (String, u16);

/// A Service holding (or asking for) an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `namespace/name`.
    pub service: String,
    /// Its [`SHARE_ANNOTATION`], if any (empty counts as none).
    pub share: Option<String>,
    pub ports: BTreeSet<PortKey>,
}

/// An address a Service holds now (from its status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub ip: IpAddr,
    pub claim: Claim,
}

/// Why a Service gets no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `spec.loadBalancerIP` is outside every block of the pool.
    NotInPool { ip: IpAddr, pool: Vec<IpNetwork> },
    /// The requested address is held by a Service it may not share with.
    InUse {
        ip: IpAddr,
        holder: String,
        why: String,
    },
    /// No block of the wanted family.
    NoFamily { family: &'static str },
    /// Every address of the pool is taken.
    Exhausted { pool: Vec<IpNetwork> },
}

impl Refusal {
    /// The field the refusal is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::NotInPool { .. } | Self::InUse { .. } => "spec.loadBalancerIP",
            Self::NoFamily { .. } => "spec.ipFamilies",
            Self::Exhausted { .. } => "spec.settings.network.ingress.cidrBlocks",
        }
    }

    /// The Event / condition reason (CamelCase).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotInPool { .. } => "NotInPool",
            Self::InUse { .. } => "AddressInUse",
            Self::NoFamily { .. } => "NoPoolOfFamily",
            Self::Exhausted { .. } => "PoolExhausted",
        }
    }
}

fn list(pool: &[IpNetwork]) -> String {
    pool.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInPool { ip, pool } => write!(
                f,
                "{}: Invalid value: \"{ip}\": not in the cluster's ingress pool ({})",
                self.field(),
                list(pool)
            ),
            Self::InUse { ip, holder, why } => write!(
                f,
                "{}: Invalid value: \"{ip}\": held by Service {holder} ({why})",
                self.field()
            ),
            Self::NoFamily { family } => write!(
                f,
                "{}: Unsupported value: {family}: the cluster's ingress pool has no {family} block",
                self.field()
            ),
            Self::Exhausted { pool } => write!(
                f,
                "{}: every address of {} is taken",
                self.field(),
                list(pool)
            ),
        }
    }
}

/// Why `claim` may not share `ip` with `other`, if it may not.
fn conflict(claim: &Claim, other: &Claim) -> Option<String> {
    match (&claim.share, &other.share) {
        (Some(a), Some(b)) if !a.is_empty() && a == b => claim
            .ports
            .intersection(&other.ports)
            .next()
            .map(|(proto, port)| format!("both use {port}/{proto}")),
        (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => {
            Some(format!("{SHARE_ANNOTATION} differs: {a:?} and {b:?}"))
        }
        _ => Some(format!("sharing needs the same {SHARE_ANNOTATION} on both")),
    }
}

/// Whether `claim` may take `ip` beside `held` (its own entry excluded); the first conflict.
fn check(ip: IpAddr, claim: &Claim, held: &[Held]) -> Result<(), Refusal> {
    for h in held
        .iter()
        .filter(|h| h.ip == ip && h.claim.service != claim.service)
    {
        if let Some(why) = conflict(claim, &h.claim) {
            return Err(Refusal::InUse {
                ip,
                holder: h.claim.service.clone(),
                why,
            });
        }
    }
    Ok(())
}

/// The usable addresses of `net`, lowest first: an IPv4 block of /30 or wider without its
/// network and broadcast addresses, an IPv6 block without its subnet-router anycast address.
fn addresses(net: IpNetwork) -> impl Iterator<Item = IpAddr> {
    let (lo, hi): (u128, u128) = match net {
        IpNetwork::V4(n) => {
            let base = u128::from(u32::from(n.network()));
            let size = 1u128 << (32 - u32::from(n.prefix()));
            if n.prefix() >= 31 {
                (base, base + size)
            } else {
                (base + 1, base + size - 1)
            }
        }
        IpNetwork::V6(n) => {
            let base = u128::from(n.network());
            let bits = 128 - u32::from(n.prefix());
            let size = if bits >= 128 {
                u128::MAX
            } else {
                1u128 << bits
            };
            (base + 1, base.saturating_add(size))
        }
    };
    let v4 = matches!(net, IpNetwork::V4(_));
    (lo..hi).map(move |a| {
        if v4 {
            #[allow(
                clippy::cast_possible_truncation,
                reason = "an IPv4 block's addresses fit in 32 bits"
            )]
            IpAddr::V4(std::net::Ipv4Addr::from(a as u32))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::from(a))
        }
    })
}

/// How many addresses [`assign`] looks at in one block before calling it full (an IPv6 /64
/// would otherwise be walked for ever).
const SCAN_LIMIT: usize = 1 << 16;

/// The address `claim` gets from `pool` given what `held` holds: see the module's rules.
/// `requested` is `spec.loadBalancerIP`, `current` what its status holds, `ipv6` the family it
/// wants when it asks for no address (`spec.ipFamilies[0]`).
pub fn assign(
    pool: &[IpNetwork],
    held: &[Held],
    claim: &Claim,
    requested: Option<IpAddr>,
    current: Option<IpAddr>,
    ipv6: bool,
) -> Result<IpAddr, Refusal> {
    let in_pool = |ip: IpAddr| pool.iter().any(|n| n.contains(ip));
    if let Some(ip) = requested {
        if !in_pool(ip) {
            return Err(Refusal::NotInPool {
                ip,
                pool: pool.to_vec(),
            });
        }
        check(ip, claim, held)?;
        return Ok(ip);
    }
    let family = |ip: &IpAddr| ip.is_ipv6() == ipv6;
    if let Some(ip) = current.filter(|ip| family(ip) && in_pool(*ip))
        && check(ip, claim, held).is_ok()
    {
        return Ok(ip);
    }
    let blocks: Vec<IpNetwork> = pool
        .iter()
        .copied()
        .filter(|n| n.is_ipv6() == ipv6)
        .collect();
    if blocks.is_empty() {
        return Err(Refusal::NoFamily {
            family: if ipv6 { "IPv6" } else { "IPv4" },
        });
    }
    if claim.share.as_deref().is_some_and(|s| !s.is_empty()) {
        let shared: BTreeSet<IpAddr> = held
            .iter()
            .filter(|h| h.claim.share == claim.share && h.claim.service != claim.service)
            .map(|h| h.ip)
            .filter(|ip| family(ip) && in_pool(*ip))
            .collect();
        if let Some(ip) = shared
            .into_iter()
            .find(|ip| check(*ip, claim, held).is_ok())
        {
            return Ok(ip);
        }
    }
    let taken: BTreeSet<IpAddr> = held
        .iter()
        .filter(|h| h.claim.service != claim.service)
        .map(|h| h.ip)
        .collect();
    blocks
        .iter()
        .flat_map(|n| addresses(*n).take(SCAN_LIMIT))
        .find(|ip| !taken.contains(ip))
        .ok_or(Refusal::Exhausted {
            pool: pool.to_vec(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn claim(service: &str, share: Option<&str>, ports: &[u16]) -> Claim {
        Claim {
            service: service.into(),
            share: share.map(String::from),
            ports: ports.iter().map(|p| ("TCP".to_owned(), *p)).collect(),
        }
    }
    fn held(at: &str, c: &Claim) -> Held {
        Held {
            ip: ip(at),
            claim: c.clone(),
        }
    }

    #[test]
    fn the_lowest_free_address_skipping_network_and_broadcast() {
        let pool = [net("10.99.100.0/30")];
        let a = claim("ns/a", None, &[80]);
        assert_eq!(
            assign(&pool, &[], &a, None, None, false),
            Ok(ip("10.99.100.1"))
        );
        let b = claim("ns/b", None, &[80]);
        let h = [held("10.99.100.1", &a)];
        assert_eq!(
            assign(&pool, &h, &b, None, None, false),
            Ok(ip("10.99.100.2"))
        );
        let c = claim("ns/c", None, &[80]);
        let h = [held("10.99.100.1", &a), held("10.99.100.2", &b)];
        assert!(
            matches!(
                assign(&pool, &h, &c, None, None, false),
                Err(Refusal::Exhausted { .. })
            ),
            "a /30 has two usable addresses"
        );
    }

    #[test]
    fn a_service_keeps_what_its_status_holds() {
        let pool = [net("10.99.100.0/27")];
        let a = claim("ns/a", None, &[80]);
        let h = [held("10.99.100.9", &a)];
        assert_eq!(
            assign(&pool, &h, &a, None, Some(ip("10.99.100.9")), false),
            Ok(ip("10.99.100.9")),
            "restart-safe: the status is the allocation"
        );
        // A status outside the (changed) pool is replaced.
        assert_eq!(
            assign(&pool, &[], &a, None, Some(ip("10.1.0.9")), false),
            Ok(ip("10.99.100.1"))
        );
    }

    #[test]
    fn a_requested_address_is_honoured_inside_the_pool_and_refused_outside_naming_the_field() {
        let pool = [net("10.99.100.0/27")];
        let a = claim("ns/a", None, &[80]);
        assert_eq!(
            assign(&pool, &[], &a, Some(ip("10.99.100.7")), None, false),
            Ok(ip("10.99.100.7"))
        );
        let refused = assign(&pool, &[], &a, Some(ip("10.99.200.7")), None, false);
        let Err(r) = refused else {
            panic!("outside the pool: {refused:?}")
        };
        assert_eq!(r.field(), "spec.loadBalancerIP");
        assert_eq!(r.reason(), "NotInPool");
        assert!(r.to_string().contains("10.99.100.0/27"), "{r}");
    }

    #[test]
    fn sharing_needs_the_same_key_and_distinct_ports() {
        let pool = [net("10.99.100.0/27")];
        let web = claim("ns/web", Some("k"), &[80]);
        let dns = claim("ns/dns", Some("k"), &[53]);
        let h = [held("10.99.100.1", &web)];
        assert_eq!(
            assign(&pool, &h, &dns, None, None, false),
            Ok(ip("10.99.100.1")),
            "same key, distinct ports: shared without asking for the address"
        );
        let clash = claim("ns/clash", Some("k"), &[80]);
        assert_eq!(
            assign(&pool, &h, &clash, None, None, false),
            Ok(ip("10.99.100.2")),
            "same key, same port: another address"
        );
        let r = assign(&pool, &h, &clash, Some(ip("10.99.100.1")), None, false);
        assert!(
            matches!(&r, Err(Refusal::InUse { holder, why, .. }) if holder == "ns/web" && why.contains("80/TCP")),
            "{r:?}"
        );
        let other = claim("ns/other", Some("j"), &[443]);
        assert!(matches!(
            assign(&pool, &h, &other, Some(ip("10.99.100.1")), None, false),
            Err(Refusal::InUse { .. })
        ));
        let none = claim("ns/none", None, &[443]);
        assert!(matches!(
            assign(&pool, &h, &none, Some(ip("10.99.100.1")), None, false),
            Err(Refusal::InUse { .. })
        ));
        assert_eq!(
            assign(&pool, &h, &none, None, None, false),
            Ok(ip("10.99.100.2")),
            "no key: never a shared address"
        );
    }

    #[test]
    fn families_follow_the_request() {
        let pool = [net("10.99.100.0/27"), net("fd99:100::/120")];
        let a = claim("ns/a", None, &[80]);
        assert_eq!(
            assign(&pool, &[], &a, None, None, true),
            Ok(ip("fd99:100::1"))
        );
        let only4 = [net("10.99.100.0/27")];
        assert!(matches!(
            assign(&only4, &[], &a, None, None, true),
            Err(Refusal::NoFamily { family: "IPv6" })
        ));
    }

    #[test]
    fn a_released_address_is_free_again() {
        let pool = [net("10.99.100.0/30")];
        let a = claim("ns/a", None, &[80]);
        let b = claim("ns/b", None, &[80]);
        // b held .2 and a .1; a is gone: its address is the lowest free one again.
        let h = [held("10.99.100.2", &b)];
        let c = claim("ns/c", None, &[80]);
        assert_eq!(
            assign(&pool, &h, &c, None, None, false),
            Ok(ip("10.99.100.1"))
        );
        let _ = a;
    }
}
