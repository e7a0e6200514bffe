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
/// `underlay`, replacing any earlier version of the table.
pub fn masquerade_ruleset(pod_cidr: Ipv4Network, underlay: &str) -> String {
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr {pod_cidr} ip daddr != {pod_cidr} oifname \"{underlay}\" masquerade\n\
           }}\n\
         }}\n"
    )
}

/// Installs (or replaces) the masquerade table in the current network namespace.
pub fn install_masquerade(pod_cidr: Ipv4Network, underlay: &str) -> Result<(), DataplaneError> {
    apply(&masquerade_ruleset(pod_cidr, underlay))
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
    fn the_masquerade_table_is_replaced_whole_and_spares_pod_to_pod_traffic() {
        let cidr: Ipv4Network = "10.244.0.0/16".parse().expect("cidr");
        let rules = masquerade_ruleset(cidr, "eth0");
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
    }
}
