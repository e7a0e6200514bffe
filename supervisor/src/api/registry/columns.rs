//! The Table cells of the served kinds: how `kubectl get` shows each column, computed from the
//! stored object as kube-apiserver's printers do.

use serde_json::Value;

use super::{Column, col, jp, s};

pub(super) fn service_ports(v: &Value) -> Value {
    let ports: Vec<String> = jp(v, "spec.ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let port = p.get("port").map(ToString::to_string).unwrap_or_default();
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort") {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Value::String(if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    })
}

pub(super) fn service_external(v: &Value) -> Value {
    let ingress: Vec<String> = jp(v, "status.loadBalancer.ingress")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| i.get("ip").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if !ingress.is_empty() {
        return Value::String(ingress.join(","));
    }
    match jp(v, "spec.type").and_then(Value::as_str) {
        Some("LoadBalancer") => Value::String("<pending>".into()),
        Some("ExternalName") => s(v, "spec.externalName"),
        _ => Value::String("<none>".into()),
    }
}

/// `k=v,...` of the label map at `path`, or `<none>`.
fn label_map(v: &Value, path: &str) -> Value {
    let sel: Vec<String> = jp(v, path)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    Value::String(if sel.is_empty() {
        "<none>".into()
    } else {
        sel.join(",")
    })
}

pub(super) fn selector(v: &Value) -> Value {
    label_map(v, "spec.selector")
}

pub(super) fn endpoints(v: &Value) -> Value {
    let mut out = Vec::new();
    for subset in v
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<String> = subset
            .get("ports")
            .and_then(Value::as_array)
            .map(|p| {
                p.iter()
                    .filter_map(|p| p.get("port"))
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for a in subset
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = a.get("ip").and_then(Value::as_str).unwrap_or_default();
            if ports.is_empty() {
                out.push(ip.to_string());
            }
            out.extend(ports.iter().map(|p| format!("{ip}:{p}")));
        }
    }
    Value::String(if out.is_empty() {
        "<none>".into()
    } else {
        out.join(",")
    })
}

pub(super) fn pod_ready(v: &Value) -> Value {
    let total = jp(v, "spec.containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = jp(v, "status.containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |c| {
            c.iter()
                .filter(|c| c.get("ready") == Some(&Value::Bool(true)))
                .count()
        });
    Value::String(format!("{ready}/{total}"))
}

pub(crate) fn phase_or_pending(v: &Value) -> Value {
    match jp(v, "status.phase").and_then(Value::as_str) {
        Some(p) => Value::String(p.into()),
        None => Value::String("Pending".into()),
    }
}

pub(crate) fn access_modes(v: &Value) -> Value {
    let modes: Vec<&str> = jp(v, "spec.accessModes")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(Value::as_str)
                .map(|m| match m {
                    "ReadWriteOnce" => "RWO",
                    "ReadOnlyMany" => "ROX",
                    "ReadWriteMany" => "RWX",
                    "ReadWriteOncePod" => "RWOP",
                    other => other,
                })
                .collect()
        })
        .unwrap_or_default();
    Value::String(modes.join(","))
}

pub(super) fn event_object(v: &Value) -> Value {
    let kind = jp(v, "involvedObject.kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_lowercase();
    let name = jp(v, "involvedObject.name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Value::String(format!("{kind}/{name}"))
}

pub(super) fn event_last_seen(v: &Value) -> Value {
    let t = jp(v, "lastTimestamp")
        .or_else(|| jp(v, "eventTime"))
        .and_then(Value::as_str);
    Value::String(crate::api::meta::human_age(t))
}

pub(super) fn pod_selector(v: &Value) -> Value {
    label_map(v, "spec.podSelector.matchLabels")
}

pub(super) fn subjects(kind: &str, v: &Value) -> Value {
    let names: Vec<&str> = v
        .get("subjects")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter(|s| s.get("kind").and_then(Value::as_str) == Some(kind))
                .filter_map(|s| s.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    Value::String(names.join(", "))
}

pub(super) fn role(v: &Value) -> Value {
    Value::String(format!(
        "{}/{}",
        jp(v, "roleRef.kind")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        jp(v, "roleRef.name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    ))
}

pub(super) fn workers(v: &Value) -> Value {
    let n: u64 = jp(v, "spec.topology.nodePools")
        .and_then(Value::as_array)
        .map(|p| {
            p.iter()
                .filter_map(|p| p.get("replicas").and_then(Value::as_u64))
                .sum()
        })
        .unwrap_or(0);
    Value::from(n)
}

pub(super) fn zone_hosts(v: &Value) -> Value {
    Value::from(
        jp(v, "spec.hosts")
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
    )
}

/// The `status` of the condition of type `type_` (`True`, `False`, `Unknown`), if present.
pub(super) fn condition<'a>(v: &'a Value, type_: &str) -> Option<&'a str> {
    jp(v, "status.conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
        .and_then(|c| c.get("status").and_then(Value::as_str))
}

/// A Node's STATUS as kubectl shows it: `Ready`, `NotReady` or `Unknown`, plus
/// `SchedulingDisabled` when cordoned.
pub(super) fn node_status(v: &Value) -> Value {
    let mut out = match condition(v, "Ready") {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if jp(v, "spec.unschedulable") == Some(&Value::Bool(true)) {
        out.push_str(",SchedulingDisabled");
    }
    Value::String(out)
}

/// A Node's ROLES: the `node-role.kubernetes.io/<role>` labels.
pub(super) fn node_roles(v: &Value) -> Value {
    let roles: Vec<&str> = jp(v, "metadata.labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .filter(|r| !r.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Value::String(if roles.is_empty() {
        "<none>".into()
    } else {
        roles.join(",")
    })
}

/// A Node's first address of type `type_`.
pub(super) fn node_address(v: &Value, type_: &str) -> Value {
    jp(v, "status.addresses")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|a| a.get("type").and_then(Value::as_str) == Some(type_))
        })
        .and_then(|a| a.get("address").and_then(Value::as_str))
        .map_or_else(
            || Value::String("<none>".into()),
            |a| Value::String(a.into()),
        )
}

/// A Host's cluster as `namespace/name`.
pub(super) fn host_cluster(v: &Value) -> Value {
    match (
        jp(v, "spec.cluster.namespace").and_then(Value::as_str),
        jp(v, "spec.cluster.name").and_then(Value::as_str),
    ) {
        (Some(ns), Some(name)) => Value::String(format!("{ns}/{name}")),
        _ => Value::String("<none>".into()),
    }
}

/// An integer status field, 0 when unset (as kubectl prints it).
pub(super) fn count(v: &Value, path: &str) -> Value {
    Value::from(jp(v, path).and_then(Value::as_i64).unwrap_or(0))
}

pub(super) fn int_col(
    name: &'static str,
    description: &'static str,
    cell: fn(&Value) -> Value,
) -> Column {
    Column {
        type_: "integer",
        ..col(name, description, cell)
    }
}

pub(super) fn wide(
    name: &'static str,
    description: &'static str,
    cell: fn(&Value) -> Value,
) -> Column {
    Column {
        priority: 1,
        ..col(name, description, cell)
    }
}

/// A workload template's containers' names or images, comma-separated.
pub(super) fn template_containers(v: &Value, field: &str) -> Value {
    let list: Vec<&str> = jp(v, "spec.template.spec.containers")
        .and_then(Value::as_array)
        .map(|c| {
            c.iter()
                .filter_map(|c| c.get(field).and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    Value::String(list.join(","))
}

/// A label selector as `k=v,k in (a,b)`.
pub(super) fn label_selector(v: &Value) -> Value {
    let mut parts: Vec<String> = jp(v, "spec.selector.matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    for e in jp(v, "spec.selector.matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        parts.push(match e.get("operator").and_then(Value::as_str) {
            Some("In") => format!("{key} in ({})", values.join(",")),
            Some("NotIn") => format!("{key} notin ({})", values.join(",")),
            Some("DoesNotExist") => format!("!{key}"),
            _ => key.to_string(),
        });
    }
    Value::String(if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    })
}

/// An EndpointSlice's ports, as kubectl prints them.
pub(super) fn slice_ports(v: &Value) -> Value {
    let ports: Vec<String> = v
        .get("ports")
        .and_then(Value::as_array)
        .map(|p| {
            p.iter()
                .filter_map(|p| p.get("port").map(ToString::to_string))
                .collect()
        })
        .unwrap_or_default();
    Value::String(if ports.is_empty() {
        "<unset>".into()
    } else {
        ports.join(",")
    })
}

/// An EndpointSlice's addresses, as kubectl prints them (at most three, then `+ N more...`).
pub(super) fn slice_endpoints(v: &Value) -> Value {
    let addrs: Vec<&str> = v
        .get("endpoints")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter_map(|e| e.get("addresses").and_then(Value::as_array))
                .flatten()
                .filter_map(Value::as_str)
                .collect()
        })
        .unwrap_or_default();
    Value::String(match addrs.len() {
        0 => "<unset>".into(),
        n if n > 3 => format!("{} + {} more...", addrs[..3].join(","), n - 3),
        _ => addrs.join(","),
    })
}

pub(super) fn map_len(v: &Value, field: &str) -> usize {
    v.get(field)
        .and_then(Value::as_object)
        .map_or(0, |m| m.len())
}
