//! The cluster's hosts as the local API takes them, their validation, the list a restart
//! restores, and the routes map kept in step with them.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use slipway_api::FieldError;
use slipway_cni::spec::Routing;
use slipway_dataplane::abi::{RouteInfo, RouteMode};
use slipway_dataplane::node::NodeMaps;

use crate::Invalid;
use crate::run::{Agent, desired_path};

/// A host of the cluster, as the local API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Host {
    pub name: String,
    /// Its address on the underlay.
    pub address: Ipv4Addr,
    /// Its block of the pod CIDR.
    pub pod_block: Ipv4Network,
}

/// Checks a host list against the cluster: every field named on failure.
pub fn validate_hosts(hosts: &[Host], pod_cidr: Ipv4Network) -> Result<(), Invalid> {
    let mut errors = Vec::new();
    let mut names = BTreeMap::new();
    for (i, host) in hosts.iter().enumerate() {
        if host.name.is_empty() {
            errors.push(FieldError::required(format!("hosts[{i}].name")));
        }
        if let Some(j) = names.insert(host.name.clone(), i) {
            errors.push(FieldError::duplicate(
                format!("hosts[{i}].name"),
                format!("{:?} is also hosts[{j}]", host.name),
            ));
        }
        if !(pod_cidr.contains(host.pod_block.network())
            && pod_cidr.prefix() <= host.pod_block.prefix())
        {
            errors.push(FieldError::invalid(
                format!("hosts[{i}].podBlock"),
                host.pod_block,
                format!("must be inside the pod CIDR {pod_cidr}"),
            ));
        }
        for (j, other) in hosts.iter().enumerate().take(i) {
            if other.pod_block.overlaps(host.pod_block) {
                errors.push(FieldError::invalid(
                    format!("hosts[{i}].podBlock"),
                    host.pod_block,
                    format!("overlaps hosts[{j}].podBlock {}", other.pod_block),
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid { errors })
    }
}

/// The host list a previous agent was given: the one it persisted, or (from versions that did
/// not persist it) one host per route of the pinned map, named by its address.
pub(crate) fn restore_hosts(data_dir: &Path, maps: &NodeMaps) -> anyhow::Result<Vec<Host>> {
    use anyhow::Context as _;
    let path = desired_path(data_dir, "hosts");
    match fs::read(&path) {
        Ok(body) => {
            return serde_json::from_slice(&body)
                .with_context(|| format!("{}: not a host list", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(maps
        .routes()?
        .into_iter()
        .filter_map(|((block, prefix), route)| {
            Some(Host {
                name: route.host().to_string(),
                address: route.host(),
                pod_block: Ipv4Network::new(block, prefix).ok()?,
            })
        })
        .collect())
}

pub(crate) fn sync_routes(
    agent: &Agent,
    hosts: &[Host],
) -> Result<(), slipway_dataplane::DataplaneError> {
    let mode = match Routing::from(agent.args.routing) {
        Routing::Vxlan => RouteMode::Vxlan,
        Routing::Native => RouteMode::Native,
    };
    let mut maps = NodeMaps::open(&agent.pins)?;
    let mut wanted = BTreeMap::new();
    for host in hosts.iter().filter(|h| h.pod_block != agent.host_block) {
        wanted.insert(
            (host.pod_block.network(), host.pod_block.prefix()),
            RouteInfo::new(host.address, mode),
        );
    }
    // A list that cannot fit is refused before anything is written.
    let capacity = maps.route_capacity()?;
    if wanted.len() > capacity as usize {
        return Err(slipway_dataplane::DataplaneError::TableFull {
            map: "routes",
            capacity,
        });
    }
    for ((block, prefix), info) in &wanted {
        maps.upsert_route(*block, *prefix, *info)?;
    }
    for key in maps.routes()?.into_keys() {
        if !wanted.contains_key(&key) {
            maps.remove_route(key.0, key.1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, block: &str) -> Host {
        Host {
            name: name.into(),
            address: Ipv4Addr::new(10, 99, 0, 1),
            pod_block: block.parse().expect("cidr"),
        }
    }

    #[test]
    fn host_lists_are_validated_field_by_field() {
        let cidr: Ipv4Network = "10.244.0.0/16".parse().expect("cidr");
        assert!(
            validate_hosts(
                &[host("a", "10.244.1.0/24"), host("b", "10.244.2.0/24")],
                cidr
            )
            .is_ok()
        );
        let invalid = validate_hosts(
            &[
                host("a", "10.244.1.0/24"),
                host("a", "10.244.1.128/25"),
                host("", "10.245.0.0/24"),
            ],
            cidr,
        )
        .expect_err("invalid");
        let text: Vec<String> = invalid.errors.iter().map(ToString::to_string).collect();
        let text = text.join("\n");
        assert!(text.contains("hosts[1].name"), "{text}");
        assert!(
            text.contains(
                "hosts[1].podBlock: Invalid value: 10.244.1.128/25: overlaps hosts[0].podBlock"
            ),
            "{text}"
        );
        assert!(
            text.contains("hosts[2].podBlock: Invalid value: 10.245.0.0/24: must be inside"),
            "{text}"
        );
        assert!(text.contains("hosts[2].name: Required value"), "{text}");
        // On the wire each error stays one line.
        let wire = serde_json::to_value(&invalid).expect("serializes");
        assert_eq!(wire["errors"][2], "hosts[2].name: Required value", "{wire}");
    }
}
