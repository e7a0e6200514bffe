//! Watch: a chunked stream of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`
//! lines from a resourceVersion, with the initial state first when none is given.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use super::http::{self, Body};
use super::limits::WatchPermit;
use super::objects::present;
use super::{State, keys, table, verbs};
use crate::api::registry::ResourceType;
use crate::error::ApiError;
use crate::selector::{FieldQuery, LabelQuery, labels_of};
use crate::store::{EventKind, Store, StoreError};

/// How often a bookmark is sent on an idle watch that asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);
/// Longest a watch stays open when the client gives no timeoutSeconds.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Encoder {
    rt: &'static ResourceType,
    table: bool,
    accept: String,
    include: String,
    headers_sent: bool,
}

impl Encoder {
    fn line(&mut self, kind: &str, obj: Value) -> Bytes {
        let object = if self.table && kind != "ERROR" && kind != "BOOKMARK" {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let t = table::table(
                self.rt,
                &self.accept,
                std::slice::from_ref(&obj),
                &rv,
                &self.include,
                !self.headers_sent,
            );
            self.headers_sent = true;
            t
        } else {
            obj
        };
        let mut b =
            serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        b.push(b'\n');
        Bytes::from(b)
    }
}

fn expired(e: &ApiError) -> Value {
    e.to_status()
}

/// Serves a watch request.
pub async fn serve(
    permit: WatchPermit,
    state: &State,
    rt: &'static ResourceType,
    ns: Option<&str>,
    name: Option<&str>,
    query: &HashMap<String, String>,
    accept: &str,
) -> Result<Response, ApiError> {
    let mut q = query.clone();
    if let Some(n) = name {
        let extra = format!("metadata.name={n}");
        let fs = match q.get("fieldSelector") {
            Some(f) if !f.is_empty() => format!("{f},{extra}"),
            _ => extra,
        };
        q.insert("fieldSelector".into(), fs);
    }
    let labels = q
        .get("labelSelector")
        .map(|s| LabelQuery::parse(s))
        .transpose()?;
    let fields = q
        .get("fieldSelector")
        .map(|s| FieldQuery::parse(s))
        .transpose()?;
    let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let (initial, from) = if rv.is_empty() || rv == "0" {
        let (items, rev) = verbs::select(state, rt, ns, &q).await?;
        (items, rev)
    } else {
        let from = rv
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))?;
        (Vec::new(), from)
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let mut enc = Encoder {
        rt,
        table: table::wants_table(accept),
        accept: accept.to_string(),
        include: q
            .get("includeObject")
            .cloned()
            .unwrap_or_else(|| "Metadata".into()),
        headers_sent: false,
    };
    let (tx, body) = http::channel_body();
    let events = match state.store.watch(&keys::prefix(rt, ns), from).await {
        Ok(rx) => Some(rx),
        Err(StoreError::Compacted { requested, oldest }) => {
            let _ = tx.try_send(enc.line("ERROR", expired(&ApiError::Gone { requested, oldest })));
            None
        }
        Err(e) => return Err(e.into()),
    };
    let gauge = state.metrics.watches.clone();
    if let Some(mut rx) = events {
        gauge.inc();
        tokio::spawn(async move {
            // The user's watch slot is held for as long as the stream runs.
            let _permit = permit;
            let matches = |obj: &Value| {
                labels.as_ref().is_none_or(|l| l.matches(&labels_of(obj)))
                    && fields.as_ref().is_none_or(|f| f.matches(obj))
            };
            let mut last = from;
            for obj in initial {
                if tx.send(enc.line("ADDED", obj)).await.is_err() {
                    gauge.dec();
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(BOOKMARK_EVERY);
            tick.tick().await;
            loop {
                let line = tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(Ok(ev)) => {
                            last = ev.kv.revision;
                            let Ok(obj) = present(rt, &ev.kv) else { continue };
                            if !matches(&obj) {
                                continue;
                            }
                            let kind = match ev.kind {
                                EventKind::Put { created: true } => "ADDED",
                                EventKind::Put { created: false } => "MODIFIED",
                                EventKind::Delete => "DELETED",
                            };
                            enc.line(kind, obj)
                        }
                        Some(Err(e)) => {
                            let err = match e {
                                StoreError::Compacted { requested, oldest } => ApiError::Gone { requested, oldest },
                                StoreError::Lagged => ApiError::Gone { requested: last, oldest: last + 1 },
                                other => ApiError::from(other),
                            };
                            let _ = tx.send(enc.line("ERROR", expired(&err))).await;
                            break;
                        }
                        None => break,
                    },
                    _ = tick.tick(), if bookmarks => enc.line("BOOKMARK", json!({
                        "kind": rt.kind,
                        "apiVersion": rt.api_version(),
                        "metadata": {"resourceVersion": last.to_string()},
                    })),
                    () = &mut deadline => break,
                    () = tx.closed() => break,
                };
                if tx.send(line).await.is_err() {
                    break;
                }
            }
            gauge.dec();
        });
    }
    Ok(http::stream("application/json", body))
}

type Response = hyper::Response<Body>;
