//! Label and field selectors (`?labelSelector=app=web,tier!=db`, `?fieldSelector=metadata.name=x`).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::api::registry::jp;
use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `?labelSelector=` query (a label selector in its string form).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelQuery(Vec<Term>);

fn split_terms(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn set_values(s: &str) -> Result<Vec<String>, ApiError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unable to parse requirement: expected (values) in {s:?}"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelQuery {
    /// Parses the Kubernetes label selector syntax.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for t in split_terms(s) {
            let term = if let Some(k) = t.strip_prefix('!') {
                Term::NotExists(k.trim().into())
            } else if let Some((k, v)) = t.split_once(" notin ") {
                Term::NotIn(k.trim().into(), set_values(v)?)
            } else if let Some((k, v)) = t.split_once(" in ") {
                Term::In(k.trim().into(), set_values(v)?)
            } else if let Some((k, v)) = t.split_once("!=") {
                Term::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                Term::Exists(t.clone())
            } else {
                return Err(ApiError::BadRequest(format!(
                    "unable to parse requirement: {t:?}"
                )));
            };
            terms.push(term);
        }
        Ok(Self(terms))
    }

    /// Whether the labels satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// A parsed field selector (`=`, `==`, `!=` on dotted paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldQuery(Vec<(String, bool, String)>);

impl FieldQuery {
    /// Parses a field selector.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for t in split_terms(s) {
            let (k, eq, v) = if let Some((k, v)) = t.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (k, true, v)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid field selector term {t:?}"
                )));
            };
            terms.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(Self(terms))
    }

    /// Whether the object satisfies every term (a missing field reads as "").
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let got = match jp(obj, path) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

/// The labels of an object.
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    jp(obj, "metadata.labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_and_field_selectors() -> Result<(), ApiError> {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".into(), "fe".into()),
        ]
        .into();
        assert!(LabelQuery::parse("app=web,tier in (fe, be),!gone")?.matches(&labels));
        assert!(!LabelQuery::parse("app!=web")?.matches(&labels));
        assert!(LabelQuery::parse("tier notin (db)")?.matches(&labels));
        assert!(!LabelQuery::parse("missing")?.matches(&labels));
        let obj =
            json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"type": "LoadBalancer"}});
        assert!(FieldQuery::parse("metadata.name=a,spec.type==LoadBalancer")?.matches(&obj));
        assert!(!FieldQuery::parse("metadata.namespace!=ns")?.matches(&obj));
        Ok(())
    }

    proptest::proptest! {
        // Query strings are remote input: parsing never panics, and what parses can be
        // evaluated.
        #[test]
        fn selectors_never_panic(s in ".{0,80}") {
            if let Ok(sel) = LabelQuery::parse(&s) {
                let _ = sel.matches(&BTreeMap::new());
            }
            if let Ok(sel) = FieldQuery::parse(&s) {
                let _ = sel.matches(&json!({"metadata": {"name": "x"}}));
            }
            let _ = crate::server::http::percent_decode(&s);
        }
    }
}
