//! nftables: the one place Slipway drives it. The node's egress masquerade is a table of its own,
//! replaced whole in one `nft -f` transaction (so a restart never leaves a moment without it).
//! nftables' netlink protocol has no maintained Rust crate here; `nft` (Debian package nftables)
//! speaks it for us.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnetwork::Ipv4Network;

use crate::DataplaneError;

/// The nftables table holding the node's masquerade rule.
pub const TABLE: &str = "slipway";

/// The ruleset that masquerades traffic from `pod_cidr` to outside it leaving through
/// `underlay`, replacing any earlier version of the table. With `vxlan_port`, the cluster's
/// VXLAN packets on `underlay` skip connection tracking (counted): they are the outer packets of
/// pod traffic, tracked by nothing that needs it, and each flow's source port would otherwise
/// take a conntrack entry of the host's.
pub fn masquerade_ruleset(
    pod_cidr: Ipv4Network,
    underlay: &str,
    vxlan_port: Option<u16>,
) -> String {
    let untracked = vxlan_port.map_or_else(String::new, |port| {
        format!(
            "  chain vxlan_untracked {{\n\
               type filter hook prerouting priority raw; policy accept;\n\
               iifname \"{underlay}\" udp dport {port} counter notrack\n\
             }}\n\
             chain vxlan_untracked_out {{\n\
               type filter hook output priority raw; policy accept;\n\
               oifname \"{underlay}\" udp dport {port} counter notrack\n\
             }}\n"
        )
    });
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr {pod_cidr} ip daddr != {pod_cidr} oifname \"{underlay}\" masquerade\n\
           }}\n\
         {untracked}\
         }}\n"
    )
}

/// Installs (or replaces) the masquerade table in the current network namespace.
pub fn install_masquerade(
    pod_cidr: Ipv4Network,
    underlay: &str,
    vxlan_port: Option<u16>,
) -> Result<(), DataplaneError> {
    apply(&masquerade_ruleset(pod_cidr, underlay, vxlan_port))
}

/// The nftables table holding VIP endpoints (a router's DNAT load balancing).
pub const ENDPOINTS_TABLE: &str = "slipway-endpoints";

/// A VIP's port and the backends (same port) that answer on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPort {
    pub vip: std::net::Ipv4Addr,
    pub port: u16,
    pub backends: Vec<std::net::Ipv4Addr>,
}

/// The ruleset of a router that spreads new TCP connections to each VIP port over its backends
/// (conntrack keeps a connection on its backend; a port without backends answers RST at
/// once), replacing any earlier version of the table. Connections DNATed for a client other
/// than `keep_source` are masqueraded, so replies come back through the router even from a
/// backend on the client's own segment (or the client itself).
pub fn endpoints_ruleset(ports: &[VipPort], keep_source: std::net::Ipv4Addr) -> String {
    let mut rules = String::new();
    for p in ports {
        let (vip, port) = (p.vip, p.port);
        if p.backends.is_empty() {
            rules.push_str(&format!(
                "    ip daddr {vip} tcp dport {port} reject with tcp reset\n"
            ));
            continue;
        }
        let map: Vec<String> = p
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{i} : {b}"))
            .collect();
        rules.push_str(&format!(
            "    ip daddr {vip} tcp dport {port} dnat to numgen random mod {} map {{ {} }}\n",
            p.backends.len(),
            map.join(", ")
        ));
    }
    format!(
        "table ip {ENDPOINTS_TABLE}\ndelete table ip {ENDPOINTS_TABLE}\n\
         table ip {ENDPOINTS_TABLE} {{\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
         {rules}\
           }}\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ct status dnat ip saddr != {keep_source} masquerade\n\
           }}\n\
         }}\n"
    )
}

/// Installs (or replaces) the endpoints table in the current network namespace.
pub fn install_endpoints(
    ports: &[VipPort],
    keep_source: std::net::Ipv4Addr,
) -> Result<(), DataplaneError> {
    apply(&endpoints_ruleset(ports, keep_source))
}

/// Applies a ruleset as one nftables transaction.
fn apply(ruleset: &str) -> Result<(), DataplaneError> {
    let failed = |detail: String| DataplaneError::Command {
        command: "nft -f -".into(),
        detail,
    };
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("{e} (is the Debian package nftables installed?)")))?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let output = nft.wait_with_output().map_err(|e| failed(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_spread_over_backends_and_refuse_without_any() {
        let vip: std::net::Ipv4Addr = "10.100.255.1".parse().expect("ip");
        let a: std::net::Ipv4Addr = "10.100.0.2".parse().expect("ip");
        let b: std::net::Ipv4Addr = "10.100.1.2".parse().expect("ip");
        let keep: std::net::Ipv4Addr = "10.100.255.253".parse().expect("ip");
        let rules = endpoints_ruleset(
            &[
                VipPort {
                    vip,
                    port: 6443,
                    backends: vec![a, b],
                },
                VipPort {
                    vip,
                    port: 2379,
                    backends: vec![],
                },
            ],
            keep,
        );
        assert!(
            rules.starts_with("table ip slipway-endpoints\ndelete table ip slipway-endpoints\n"),
            "{rules}"
        );
        assert!(
            rules.contains(
                "ip daddr 10.100.255.1 tcp dport 6443 dnat to numgen random mod 2 map { 0 : 10.100.0.2, 1 : 10.100.1.2 }"
            ),
            "{rules}"
        );
        assert!(
            rules.contains("ip daddr 10.100.255.1 tcp dport 2379 reject with tcp reset"),
            "{rules}"
        );
        assert!(
            rules.contains("ct status dnat ip saddr != 10.100.255.253 masquerade"),
            "{rules}"
        );
    }

    #[test]
    fn the_masquerade_table_is_replaced_whole_and_spares_pod_to_pod_traffic() {
        let cidr: Ipv4Network = "10.244.0.0/16".parse().expect("cidr");
        let rules = masquerade_ruleset(cidr, "eth0", None);
        assert!(
            rules.starts_with("table ip slipway\ndelete table ip slipway\n"),
            "{rules}"
        );
        assert!(
            rules.contains(
                "ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 oifname \"eth0\" masquerade"
            ),
            "{rules}"
        );
        assert!(!rules.contains("notrack"), "{rules}");
    }

    #[test]
    fn vxlan_on_the_underlay_skips_connection_tracking_both_ways() {
        let cidr: Ipv4Network = "10.244.0.0/16".parse().expect("cidr");
        let rules = masquerade_ruleset(cidr, "eth0", Some(4789));
        for rule in [
            "type filter hook prerouting priority raw; policy accept;",
            "iifname \"eth0\" udp dport 4789 counter notrack",
            "type filter hook output priority raw; policy accept;",
            "oifname \"eth0\" udp dport 4789 counter notrack",
            "masquerade",
        ] {
            assert!(rules.contains(rule), "{rule}: {rules}");
        }
    }
}
