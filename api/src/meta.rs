//! Shared API machinery types: `ObjectMeta`, quantities, conditions, and the
//! field checks every kind reuses (DNS names, label keys, CIDRs).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FieldError;

/// `metav1.ObjectMeta`, the subset Slipway keeps (unknown metadata fields are refused).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Object name, unique per namespace and resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Prefix for a server-generated name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    /// Namespace of a namespaced object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Server-assigned unique id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Opaque version for optimistic concurrency and watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Sequence number of spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// RFC 3339 time deletion was requested (set while finalizers remain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    /// Grace period of a pending deletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_grace_period_seconds: Option<i64>,
    /// Labels for selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Finalizers that must be removed before the object goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalizers: Option<Vec<String>>,
    /// Owners of this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_references: Option<Vec<Value>>,
    /// Field ownership written by clients that use server-side apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_fields: Option<Vec<Value>>,
    /// Deprecated self link (accepted, never set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
}

/// A resource quantity (`2`, `500m`, `4Gi`), written as a string or a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    /// String form.
    Str(String),
    /// Bare number.
    Num(serde_json::Number),
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // No type: the OpenAPI encoder maps it to an arbitrary value, as kubectl's int-or-string.
        json_schema!({"description": "A quantity such as 2, 500m or 4Gi.", "x-slipway-quantity": true})
    }
}

impl Quantity {
    /// The value in base units (cores, bytes), or None when malformed.
    pub fn value(&self) -> Option<f64> {
        match self {
            Self::Num(n) => n.as_f64(),
            Self::Str(s) => parse_quantity(s),
        }
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::Num(n) => write!(f, "{n}"),
        }
    }
}

/// Parses a Kubernetes quantity string into base units.
pub fn parse_quantity(s: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let s = s.trim();
    let (num, mult) = SUFFIXES
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1.0));
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v * mult)
}

/// A `metav1.Condition`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Condition type (`Ready`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Checks an RFC 1123 DNS label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes).
pub fn check_dns_label(field: &str, v: &str, errs: &mut Vec<FieldError>) {
    if !is_dns_label(v) {
        errs.push(FieldError::invalid(
            field,
            format!("{v:?}"),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', start and end with an alphanumeric character, and be at most 63 characters",
        ));
    }
}

fn is_dns_label(v: &str) -> bool {
    v.len() <= 63 && is_subdomain_part(v)
}

/// One dot-separated part of a subdomain: a label without the 63-byte limit, as upstream's
/// IsDNS1123Subdomain checks it (only the whole is limited), so that names such as
/// `csi-<sha256 hex>` (upstream's VolumeAttachment names, 68 bytes) are valid.
fn is_subdomain_part(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}

/// Checks an RFC 1123 DNS subdomain (dot-separated labels, at most 253 bytes).
pub fn check_dns_subdomain(field: &str, v: &str, errs: &mut Vec<FieldError>) {
    if v.is_empty() || v.len() > 253 || !v.split('.').all(is_subdomain_part) {
        errs.push(FieldError::invalid(
            field,
            format!("{v:?}"),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    }
}

/// Checks label keys and values.
pub fn check_labels(field: &str, labels: &BTreeMap<String, String>, errs: &mut Vec<FieldError>) {
    let ok_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && s.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    for (k, v) in labels {
        let name = k.rsplit('/').next().unwrap_or(k);
        if !ok_name(name) {
            errs.push(FieldError::invalid(
                format!("{field}[{k}]"),
                format!("{k:?}"),
                "invalid label key",
            ));
        }
        if !v.is_empty() && !ok_name(v) {
            errs.push(FieldError::invalid(
                format!("{field}[{k}]"),
                format!("{v:?}"),
                "invalid label value",
            ));
        }
    }
}

/// A CIDR block: a network address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits zero).
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/16` or `fd00::/64`; the host bits must be zero.
    pub fn parse(v: &str) -> Result<Self, &'static str> {
        const MALFORMED: &str = "must be a valid CIDR such as 10.0.0.0/16";
        let (addr, prefix) = v.split_once('/').ok_or(MALFORMED)?;
        let addr: IpAddr = addr.parse().map_err(|_| MALFORMED)?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MALFORMED);
        }
        let prefix: u8 = prefix.parse().map_err(|_| MALFORMED)?;
        let (bits, max) = match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        if prefix > max {
            return Err(MALFORMED);
        }
        let host_mask = u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        if bits & host_mask != 0 {
            return Err("must be a network address (host bits zero)");
        }
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    /// Whether every address of `inner` is inside this block (same family, prefix at least as
    /// long, the same leading bits).
    pub fn contains(&self, inner: &Cidr) -> bool {
        let bits = |c: &Cidr| match c.addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, u32::from(c.prefix)),
            IpAddr::V6(a) => (u128::from(a), u32::from(c.prefix)),
        };
        if self.addr.is_ipv4() != inner.addr.is_ipv4() || inner.prefix < self.prefix {
            return false;
        }
        let ((outer, prefix), (inner, _)) = (bits(self), bits(inner));
        let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
        outer & mask == inner & mask
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Decodes `value` as a `T`, refusing every field `T` does not keep (`unknown field
/// "spec.podSelectr"`, all of them): k8s-openapi's types skip unknown fields, kube-apiserver's
/// strict decoding refuses them.
pub fn decode_strict<T: serde::de::DeserializeOwned + Serialize>(
    value: Value,
) -> Result<T, String> {
    let decoded: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let kept = serde_json::to_value(&decoded).map_err(|e| e.to_string())?;
    let unknown = unknown_fields(&value, &kept);
    if unknown.is_empty() {
        Ok(decoded)
    } else {
        let list: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        Err(list.join(", "))
    }
}

/// The paths of `sent` (`spec.ingress[0].form`) that `kept`, the same object decoded and encoded
/// again, lacks: the fields its type does not know (null values count as absent).
pub fn unknown_fields(sent: &Value, kept: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_unknown(sent, kept, "", &mut out);
    out
}

fn collect_unknown(sent: &Value, kept: &Value, path: &str, out: &mut Vec<String>) {
    match (sent, kept) {
        (Value::Object(s), Value::Object(k)) => {
            for (key, v) in s {
                if v.is_null() {
                    continue;
                }
                let p = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    Some(kv) => collect_unknown(v, kv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(s), Value::Array(k)) => {
            for (i, (sv, kv)) in s.iter().zip(k).enumerate() {
                collect_unknown(sv, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Checks a CIDR block (network address, host bits zero); returns it when valid.
pub fn check_cidr(field: &str, v: &str, errs: &mut Vec<FieldError>) -> Option<Cidr> {
    match Cidr::parse(v) {
        Ok(c) => Some(c),
        Err(why) => {
            errs.push(FieldError::invalid(field, format!("{v:?}"), why));
            None
        }
    }
}

/// Checks an IP address.
pub fn check_ip(field: &str, v: &str, errs: &mut Vec<FieldError>) -> Option<IpAddr> {
    match v.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(FieldError::invalid(
                field,
                format!("{v:?}"),
                "must be a valid IP address",
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_limit_the_whole_not_each_part() {
        let check = |v: &str| {
            let mut errs = Vec::new();
            check_dns_subdomain("metadata.name", v, &mut errs);
            errs.is_empty()
        };
        // Upstream's VolumeAttachment names: csi- and 64 hex digits, one 68-byte part.
        assert!(check(&format!("csi-{}", "a".repeat(64))));
        assert!(check("a.b-c.d"));
        assert!(!check(&"a".repeat(254)));
        assert!(!check("a..b") && !check("-a") && !check("A"));
        let mut errs = Vec::new();
        check_dns_label("spec.host", &"a".repeat(64), &mut errs);
        assert_eq!(errs.len(), 1, "labels keep their 63-byte limit");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("4Gi"), Some(4.0 * 1073741824.0));
        assert_eq!(parse_quantity("x"), None);
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            Cidr::parse("10.0.0.0/16").map(|c| c.to_string()),
            Ok("10.0.0.0/16".into())
        );
        assert!(Cidr::parse("fd00::/64").is_ok());
        assert!(Cidr::parse("0.0.0.0/0").is_ok());
        assert!(Cidr::parse("10.0.0.1/32").is_ok());
        let mut errs = Vec::new();
        for bad in [
            "10.0.0.1/16",
            "10.0.0.0/33",
            "10.0.0.0",
            "x/8",
            "10.0.0.0/+8",
            "fd00::1/64",
        ] {
            assert!(check_cidr("f", bad, &mut errs).is_none(), "{bad}");
        }
        assert_eq!(errs.len(), 6);
        assert!(
            errs[0].to_string().contains("host bits zero"),
            "{}",
            errs[0]
        );
        assert!(errs[1].to_string().contains("valid CIDR"), "{}", errs[1]);
    }
}

/// `conditions` (a JSON list, or null) with `condition` in place of the one of its `type`,
/// appended when there is none. A condition whose status did not change keeps its
/// `lastTransitionTime`. For kinds that take no strategic merge patch (Slipway's own): a
/// controller reads the object, sets its condition, and writes the list back.
pub fn set_condition(conditions: &Value, mut condition: Value) -> Value {
    let mut list = conditions.as_array().cloned().unwrap_or_default();
    match list.iter_mut().find(|c| c["type"] == condition["type"]) {
        Some(old) => {
            if old["status"] == condition["status"]
                && let Some(t) = old.get("lastTransitionTime").cloned()
            {
                condition["lastTransitionTime"] = t;
            }
            *old = condition;
        }
        None => list.push(condition),
    }
    Value::Array(list)
}

#[cfg(test)]
mod condition_tests {
    use serde_json::json;

    #[test]
    fn a_condition_replaces_its_type_and_keeps_the_others() {
        let list = json!([
            {"type": "Ready", "status": "True", "lastTransitionTime": "t0"},
            {"type": "Provisioned", "status": "True", "lastTransitionTime": "t0"},
        ]);
        let same = super::set_condition(
            &list,
            json!({"type": "Ready", "status": "True", "reason": "LeaseRenewed", "lastTransitionTime": "t1"}),
        );
        assert_eq!(
            same[0]["lastTransitionTime"], "t0",
            "no transition: time kept"
        );
        assert_eq!(same[0]["reason"], "LeaseRenewed");
        assert_eq!(same[1]["type"], "Provisioned");
        let flipped = super::set_condition(
            &same,
            json!({"type": "Ready", "status": "False", "lastTransitionTime": "t2"}),
        );
        assert_eq!(flipped[0]["lastTransitionTime"], "t2");
        assert_eq!(flipped.as_array().map(Vec::len), Some(2));
        let added = super::set_condition(&json!(null), json!({"type": "X", "status": "True"}));
        assert_eq!(added, json!([{"type": "X", "status": "True"}]));
    }
}
