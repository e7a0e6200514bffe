//! `?limit=` and `?continue=` on lists (kubectl `--chunk-size`, kube-rs reflectors): pages in
//! key order, and an opaque token that carries the list's resourceVersion and the last key
//! returned, so every page reports the first page's revision (a watch from it then misses no
//! change made while the pages were read).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::objects::meta_str;
use crate::error::ApiError;

/// One page of a list.
#[derive(Debug)]
pub struct Page {
    /// The page's objects.
    pub items: Vec<Value>,
    /// The resourceVersion the list reports.
    pub resource_version: u64,
    /// Token for the next page, when there is one.
    pub continue_token: Option<String>,
    /// Objects after this page, when there is a next page.
    pub remaining: Option<usize>,
}

fn sort_key(obj: &Value) -> String {
    format!(
        "{}/{}",
        meta_str(obj, "namespace").unwrap_or_default(),
        meta_str(obj, "name").unwrap_or_default()
    )
}

fn encode_token(rv: u64, start: &str) -> String {
    let raw = json!({"rv": rv, "start": start}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn bad_token() -> ApiError {
    ApiError::BadRequest("continue key is not valid: ask for a new list without continue".into())
}

fn decode_token(token: &str) -> Result<(u64, String), ApiError> {
    if !token.len().is_multiple_of(2) {
        return Err(bad_token());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad_token)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad_token())?;
    match (
        v.get("rv").and_then(Value::as_u64),
        v.get("start").and_then(Value::as_str),
    ) {
        (Some(rv), Some(start)) => Ok((rv, start.to_string())),
        _ => Err(bad_token()),
    }
}

/// Cuts one page out of a full, filtered list read at revision `rev`.
pub fn page(
    mut items: Vec<Value>,
    rev: u64,
    query: &HashMap<String, String>,
) -> Result<Page, ApiError> {
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(l) => l.parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!(
                "limit: invalid value {l:?}: must be a non-negative integer"
            ))
        })?,
    };
    let (resource_version, start) = match query.get("continue").map(String::as_str) {
        None | Some("") => (rev, None),
        Some(t) => {
            let (rv, start) = decode_token(t)?;
            (rv, Some(start))
        }
    };
    items.sort_by_cached_key(sort_key);
    if let Some(start) = &start {
        items.retain(|o| sort_key(o).as_str() > start.as_str());
    }
    if limit == 0 || items.len() <= limit {
        return Ok(Page {
            items,
            resource_version,
            continue_token: None,
            remaining: None,
        });
    }
    let rest = items.split_off(limit);
    let last = items.last().map(sort_key).unwrap_or_default();
    Ok(Page {
        items,
        resource_version,
        continue_token: Some(encode_token(resource_version, &last)),
        remaining: Some(rest.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| json!({"metadata": {"namespace": "a", "name": format!("o{i:03}")}}))
            .collect()
    }

    #[test]
    fn pages_cover_the_list_once_at_the_first_revision() -> Result<(), ApiError> {
        let mut q = HashMap::from([("limit".to_string(), "4".to_string())]);
        let mut seen = Vec::new();
        let mut rev = 7;
        loop {
            // Later pages are cut from a newer read; they still report the first revision.
            let p = page(objs(10), rev, &q)?;
            rev += 1;
            assert_eq!(p.resource_version, 7);
            assert!(p.items.len() <= 4);
            seen.extend(p.items.iter().map(sort_key));
            match p.continue_token {
                Some(t) => {
                    assert_eq!(p.remaining, Some(10 - seen.len()));
                    q.insert("continue".into(), t);
                }
                None => break,
            }
        }
        let all: Vec<String> = objs(10).iter().map(sort_key).collect();
        assert_eq!(seen, all);
        q.insert("continue".into(), "zz".into());
        assert!(page(objs(1), 1, &q).is_err());
        Ok(())
    }
}
