//! The volume reconciler's decisions, without I/O: which block store a claim goes to, the
//! size to make, which hosts an export allows, and whether an attachment may be honoured.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use slipway_api::volumes::{NO_CLIENT, ZONE_ANNOTATION, ZONE_TOPOLOGY_KEY, host_nbd_client};

/// Volumes are sized in whole 4 KiB blocks (the filesystem block size).
pub const ALIGN: u64 = 4096;

/// One block store the supervisor drives: its zone, its control socket, and where hosts reach
/// its NBD exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStoreRef {
    /// The zone it serves.
    pub zone: String,
    /// Its control socket (on this machine).
    pub control: std::path::PathBuf,
    /// Where hosts reach its exports: `tcp:HOST:PORT`.
    pub nbd: String,
}

impl std::str::FromStr for BlockStoreRef {
    type Err = String;

    /// `ZONE=CONTROL_SOCKET,NBD_ADDRESS`, e.g. `zone-a=/run/bs-a.sock,tcp:10.100.0.2:10809`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (zone, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected ZONE=CONTROL_SOCKET,NBD_ADDRESS"))?;
        let (control, nbd) = rest
            .split_once(',')
            .ok_or_else(|| format!("{s:?}: expected ZONE=CONTROL_SOCKET,NBD_ADDRESS"))?;
        if zone.is_empty() {
            return Err(format!("{s:?}: the zone is empty"));
        }
        if !std::path::Path::new(control).is_absolute() {
            return Err(format!(
                "{s:?}: the control socket {control:?} is not absolute"
            ));
        }
        if !nbd.starts_with("tcp:") && !nbd.starts_with("unix:") {
            return Err(format!(
                "{s:?}: the NBD address {nbd:?} is not tcp:HOST:PORT"
            ));
        }
        Ok(Self {
            zone: zone.to_owned(),
            control: control.into(),
            nbd: nbd.to_owned(),
        })
    }
}

/// The block store volume (and PV) name of a supervisor claim: `pvc-<uid>`, as upstream
/// names dynamically provisioned volumes; unique across namespaces.
pub fn volume_name(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

/// `bytes` rounded up to whole [`ALIGN`] blocks.
pub fn aligned(bytes: f64) -> Option<u64> {
    if !bytes.is_finite() || bytes <= 0.0 || bytes > 9.0e18 {
        return None;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked positive and below u64::MAX above"
    )]
    let b = bytes.ceil() as u64;
    Some(b.div_ceil(ALIGN) * ALIGN)
}

/// The zone a claim's volume goes to: the claim's `slipway.dev/zone` annotation, else the
/// first zone its StorageClass's `allowedTopologies` allows, else the first zone with a block
/// store. `Err` names the field that asks for a zone without a block store.
pub fn zone_for(
    annotations: Option<&BTreeMap<String, String>>,
    class_topologies: Option<&[Value]>,
    zones: &BTreeSet<String>,
) -> Result<String, String> {
    if let Some(z) = annotations.and_then(|a| a.get(ZONE_ANNOTATION)) {
        return if zones.contains(z) {
            Ok(z.clone())
        } else {
            Err(format!(
                "metadata.annotations[{ZONE_ANNOTATION}]: zone {z:?} has no block store (zones with one: {zones:?})"
            ))
        };
    }
    let allowed: Vec<String> = class_topologies
        .unwrap_or_default()
        .iter()
        .flat_map(|t| {
            t.get("matchLabelExpressions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter(|e| e.get("key").and_then(Value::as_str) == Some(ZONE_TOPOLOGY_KEY))
        .flat_map(|e| {
            e.get("values")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    if !allowed.is_empty() {
        return allowed
            .iter()
            .find(|z| zones.contains(*z))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "StorageClass allowedTopologies: zones {allowed:?} have no block store (zones with one: {zones:?})"
                )
            });
    }
    zones
        .iter()
        .next()
        .cloned()
        .ok_or_else(|| "no block store is configured".to_owned())
}

/// An export's allow-list: the client names of the hosts it is attached to, sorted, or
/// [`NO_CLIENT`] when none (an empty list would allow any client).
pub fn allow_list<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let set: BTreeSet<String> = hosts.into_iter().map(host_nbd_client).collect();
    if set.is_empty() {
        vec![NO_CLIENT.to_owned()]
    } else {
        set.into_iter().collect()
    }
}

/// What a Host is, as far as an attachment cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Its zone.
    pub zone: String,
    /// The namespace of the Cluster it serves, if any.
    pub cluster_namespace: Option<String>,
}

/// Whether a host may have a volume of namespace `ns` in zone `zone` attached; `Err` says why
/// not, naming the field.
pub fn may_attach(
    ns: &str,
    host_name: &str,
    host: Option<&HostFacts>,
    zone: &str,
) -> Result<(), String> {
    let Some(h) = host else {
        return Err(format!("spec.host: Host {host_name:?} not found"));
    };
    if h.cluster_namespace.as_deref() != Some(ns) {
        return Err(format!(
            "spec.host: Host {host_name:?} serves no Cluster of namespace {ns:?}"
        ));
    }
    if h.zone != zone {
        return Err(format!(
            "spec.host: Host {host_name:?} is in zone {:?}, the volume in zone {zone:?} ({ZONE_TOPOLOGY_KEY})",
            h.zone
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn zones(z: &[&str]) -> BTreeSet<String> {
        z.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn zones_come_from_the_annotation_then_the_class_then_the_first_store() {
        let all = zones(&["a", "b"]);
        let ann = BTreeMap::from([(ZONE_ANNOTATION.to_owned(), "b".to_owned())]);
        assert_eq!(zone_for(Some(&ann), None, &all), Ok("b".into()));
        let bad = BTreeMap::from([(ZONE_ANNOTATION.to_owned(), "z".to_owned())]);
        let err = zone_for(Some(&bad), None, &all).expect_err("unknown zone");
        assert!(
            err.contains("slipway.dev/zone") && err.contains("\"z\""),
            "{err}"
        );
        let topo = [json!({"matchLabelExpressions": [
            {"key": ZONE_TOPOLOGY_KEY, "values": ["c", "b"]}]})];
        assert_eq!(zone_for(None, Some(&topo), &all), Ok("b".into()));
        let topo = [json!({"matchLabelExpressions": [
            {"key": ZONE_TOPOLOGY_KEY, "values": ["c"]}]})];
        assert!(zone_for(None, Some(&topo), &all).is_err());
        assert_eq!(zone_for(None, None, &all), Ok("a".into()));
        assert!(zone_for(None, None, &BTreeSet::new()).is_err());
    }

    #[test]
    fn sizes_round_up_to_blocks() {
        assert_eq!(aligned(1.0), Some(4096));
        assert_eq!(aligned(1073741824.0), Some(1 << 30));
        assert_eq!(aligned(0.0), None);
        assert_eq!(aligned(f64::NAN), None);
    }

    #[test]
    fn an_unattached_export_allows_nobody() {
        assert_eq!(allow_list([]), vec![NO_CLIENT.to_owned()]);
        assert_eq!(
            allow_list(["h2", "h1", "h2"]),
            vec![host_nbd_client("h1"), host_nbd_client("h2")]
        );
    }

    #[test]
    fn attachments_need_a_host_of_the_namespace_in_the_volume_zone() {
        let h = HostFacts {
            zone: "a".into(),
            cluster_namespace: Some("team".into()),
        };
        assert_eq!(may_attach("team", "h", Some(&h), "a"), Ok(()));
        let e = may_attach("other", "h", Some(&h), "a").expect_err("namespace");
        assert!(
            e.contains("serves no Cluster of namespace \"other\""),
            "{e}"
        );
        let e = may_attach("team", "h", Some(&h), "b").expect_err("zone");
        assert!(e.contains("zone \"a\"") && e.contains("zone \"b\""), "{e}");
        assert!(may_attach("team", "h", None, "a").is_err());
    }

    #[test]
    fn block_store_flags_parse() {
        let r: BlockStoreRef = "zone-a=/run/bs.sock,tcp:10.0.0.2:10809"
            .parse()
            .expect("parses");
        assert_eq!(r.zone, "zone-a");
        assert_eq!(r.nbd, "tcp:10.0.0.2:10809");
        assert!("zone-a=rel.sock,tcp:x:1".parse::<BlockStoreRef>().is_err());
        assert!("zone-a".parse::<BlockStoreRef>().is_err());
    }
}
