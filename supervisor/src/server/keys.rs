//! Store key layout: `/registry/{group|core}/{plural}/[{namespace}/]{name}`.

use crate::api::registry::ResourceType;

fn group(rt: &ResourceType) -> &str {
    if rt.group.is_empty() {
        "core"
    } else {
        rt.group
    }
}

/// The key prefix of a collection (a namespace's objects, or all of them).
pub fn prefix(rt: &ResourceType, namespace: Option<&str>) -> String {
    match (rt.namespaced, namespace) {
        (true, Some(ns)) => format!("/registry/{}/{}/{ns}/", group(rt), rt.plural),
        _ => format!("/registry/{}/{}/", group(rt), rt.plural),
    }
}

/// The key of one object.
pub fn object(rt: &ResourceType, namespace: Option<&str>, name: &str) -> String {
    format!("{}{name}", prefix(rt, namespace))
}
