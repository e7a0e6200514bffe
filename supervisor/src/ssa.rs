//! Server-side apply's field ownership: `metadata.managedFields` records, per field manager,
//! the fields it set (FieldsV1). Applying a value another manager owns with a different value
//! is a conflict unless forced; forcing takes the field over; a field the applier stops
//! sending is removed when no one else owns it. Writes other than apply move the fields they
//! change to their manager's `Update` entry, as kube-apiserver does.
//!
//! Lists are owned whole (apply replaces them whole, see `patch`), so FieldsV1 here has only
//! `f:` keys; entries written by other servers with `k:`/`v:`/`i:` keys own their list whole.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A field: its names from the object's root.
pub type FieldPath = Vec<String>;
/// Fields owned by one manager.
pub type FieldSet = BTreeSet<FieldPath>;

/// One field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// The field, as `.spec.replicas`.
    pub field: String,
}

/// Server-set or identifying fields no manager owns.
fn ignored(parent: &[String], key: &str) -> bool {
    match parent {
        [] => matches!(key, "apiVersion" | "kind" | "status"),
        [m] if m == "metadata" => matches!(
            key,
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

fn walk(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                if c.is_null() || ignored(path, k) {
                    continue;
                }
                path.push(k.clone());
                walk(c, path, out);
                path.pop();
            }
        }
        _ => {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
}

/// The leaf fields an object or configuration sets.
pub fn fields_of(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The FieldsV1 form of a set (`{"f:spec": {"f:replicas": {}}}`).
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for name in path {
            let entry = cur
                .entry(format!("f:{name}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else { break };
            cur = next;
        }
    }
    Value::Object(root)
}

fn read_v1(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    let Some(m) = v.as_object().filter(|m| !m.is_empty()) else {
        if !path.is_empty() {
            out.insert(path.clone());
        }
        return;
    };
    for (k, c) in m {
        if let Some(name) = k.strip_prefix("f:") {
            path.push(name.to_string());
            read_v1(c, path, out);
            path.pop();
        } else if !path.is_empty() {
            // `.` (the field itself) or a list element key: the field is owned whole.
            out.insert(path.clone());
        }
    }
}

/// Parses FieldsV1.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    read_v1(v, &mut Vec::new(), &mut out);
    out
}

fn value_at<'a>(obj: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.iter().try_fold(obj, |cur, name| cur.get(name))
}

fn remove_at(obj: &mut Value, path: &FieldPath) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for name in parent {
        match cur.get_mut(name) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

fn overlaps(a: &FieldPath, b: &FieldPath) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn dotted(path: &FieldPath) -> String {
    path.iter().map(|n| format!(".{n}")).collect()
}

/// One `managedFields` entry, parsed.
#[derive(Debug)]
struct Entry {
    manager: String,
    operation: String,
    fields: FieldSet,
    raw: Value,
}

fn entries_of(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e
                .get("manager")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            operation: e
                .get("operation")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
            raw: e.clone(),
        })
        .collect()
}

fn store_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut raw = e.raw;
            if let Some(m) = raw.as_object_mut() {
                m.insert("fieldsType".into(), json!("FieldsV1"));
                m.insert("fieldsV1".into(), to_fields_v1(&e.fields));
            }
            raw
        })
        .collect();
    let value = if list.is_empty() {
        Value::Null
    } else {
        Value::Array(list)
    };
    crate::server::objects::set_meta(obj, "managedFields", value);
}

fn new_entry(
    manager: &str,
    operation: &str,
    api_version: &str,
    now: &str,
    fields: FieldSet,
) -> Entry {
    Entry {
        manager: manager.to_string(),
        operation: operation.to_string(),
        raw: json!({
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": now,
        }),
        fields,
    }
}

/// Applies `config` as `manager` onto `live` (the stored object, or `{}` when there is none).
/// Returns the merged object with its new `managedFields`, or the conflicts when not forced.
pub fn apply(
    live: &Value,
    config: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut entries = entries_of(live);
    let mine = fields_of(config);
    let differs = |p: &FieldPath| value_at(live, p) != value_at(config, p);
    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| e.manager != manager) {
        for p in mine.iter().filter(|p| differs(p)) {
            if e.fields.iter().any(|q| overlaps(p, q)) {
                let c = Conflict {
                    manager: e.manager.clone(),
                    field: dotted(p),
                };
                if !conflicts.contains(&c) {
                    conflicts.push(c);
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    // Forced: the fields change hands. Equal values stay shared.
    for e in entries.iter_mut().filter(|e| e.manager != manager) {
        e.fields
            .retain(|q| !mine.iter().any(|p| overlaps(p, q) && differs(p)));
    }
    let mut merged = live.clone();
    json_patch::merge(&mut merged, config);
    let previous: FieldSet = entries
        .iter()
        .filter(|e| e.manager == manager && e.operation == "Apply")
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for p in previous
        .iter()
        .filter(|p| !mine.iter().any(|m| overlaps(m, p)))
    {
        let owned_elsewhere = entries
            .iter()
            .filter(|e| e.manager != manager)
            .any(|e| e.fields.iter().any(|q| overlaps(p, q)));
        if !owned_elsewhere {
            remove_at(&mut merged, p);
        }
    }
    entries.retain(|e| !(e.manager == manager && e.operation == "Apply"));
    entries.push(new_entry(manager, "Apply", api_version, now, mine));
    store_entries(&mut merged, entries);
    Ok(merged)
}

/// Records a write other than apply by `manager`: the fields it changed leave the other
/// managers and join its `Update` entry. Objects nobody ever applied are left untracked.
pub fn record_update(old: &Value, new: &mut Value, manager: &str, api_version: &str, now: &str) {
    let mut entries = entries_of(old);
    if entries.is_empty() {
        crate::server::objects::set_meta(new, "managedFields", Value::Null);
        return;
    }
    let changed: FieldSet = fields_of(old)
        .union(&fields_of(new))
        .filter(|p| value_at(old, p) != value_at(new, p))
        .cloned()
        .collect();
    for e in entries.iter_mut() {
        if !(e.manager == manager && e.operation == "Update") {
            e.fields.retain(|q| !changed.iter().any(|p| overlaps(p, q)));
        }
    }
    let set: FieldSet = changed
        .into_iter()
        .filter(|p| value_at(new, p).is_some())
        .collect();
    match entries
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == "Update")
    {
        Some(e) => e.fields.extend(set),
        None => entries.push(new_entry(manager, "Update", api_version, now, set)),
    }
    store_entries(new, entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-01-01T00:00:00Z";

    fn apply_as(
        live: &Value,
        config: Value,
        manager: &str,
        force: bool,
    ) -> Result<Value, Vec<Conflict>> {
        apply(live, &config, manager, force, "v1", NOW)
    }

    #[test]
    fn second_manager_conflicts_until_forced() -> Result<(), Vec<Conflict>> {
        let a = apply_as(
            &json!({}),
            json!({"metadata": {"name": "x"}, "spec": {"replicas": 2, "image": "a"}}),
            "alice",
            false,
        )?;
        // Same value: shared, no conflict.
        let b = apply_as(
            &a,
            json!({"metadata": {"name": "x"}, "spec": {"image": "a"}}),
            "bob",
            false,
        )?;
        let err = apply_as(
            &b,
            json!({"metadata": {"name": "x"}, "spec": {"replicas": 5}}),
            "bob",
            false,
        )
        .expect_err("bob changing alice's replicas conflicts");
        assert_eq!(
            err,
            vec![Conflict {
                manager: "alice".into(),
                field: ".spec.replicas".into()
            }]
        );
        let forced = apply_as(
            &b,
            json!({"metadata": {"name": "x"}, "spec": {"replicas": 5}}),
            "bob",
            true,
        )?;
        assert_eq!(forced["spec"]["replicas"], 5);
        let alice = entries_of(&forced)
            .into_iter()
            .find(|e| e.manager == "alice")
            .map(|e| e.fields)
            .unwrap_or_default();
        assert!(!alice.contains(&vec!["spec".to_string(), "replicas".to_string()]));
        // bob stopped sending the image, but alice still owns it: it stays.
        assert_eq!(forced["spec"]["image"], "a");
        Ok(())
    }

    #[test]
    fn dropped_field_is_removed_and_updates_take_fields() -> Result<(), Vec<Conflict>> {
        let a = apply_as(
            &json!({}),
            json!({"metadata": {"labels": {"x": "1", "y": "2"}}}),
            "alice",
            false,
        )?;
        let a2 = apply_as(
            &a,
            json!({"metadata": {"labels": {"x": "1"}}}),
            "alice",
            false,
        )?;
        assert_eq!(a2["metadata"]["labels"], json!({"x": "1"}));
        let mut edited = a2.clone();
        edited["metadata"]["labels"]["x"] = json!("9");
        record_update(&a2, &mut edited, "kubectl-edit", "v1", NOW);
        // alice no longer owns x, so applying another x does not conflict with her...
        let e = apply_as(
            &edited,
            json!({"metadata": {"labels": {"x": "3"}}}),
            "carol",
            false,
        )
        .expect_err("...but it conflicts with the editor");
        assert_eq!(e[0].manager, "kubectl-edit");
        let v1 = to_fields_v1(&fields_of(&json!({"spec": {"a": {"b": 1}, "c": [1]}})));
        assert_eq!(v1, json!({"f:spec": {"f:a": {"f:b": {}}, "f:c": {}}}));
        assert_eq!(
            from_fields_v1(&v1),
            fields_of(&json!({"spec": {"a": {"b": 1}, "c": [1]}}))
        );
        Ok(())
    }
}
