//! `slipway flows` and `slipway policy ...`: the agent's policy API from the command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use slipway_local::LocalClient;

use crate::policy::Flow;
use slipway_api::meta::unknown_fields;

const DEFAULT_SOCKET: &str = "/run/slipway/agent.sock";

/// `slipway flows`: verdict events of the node's datapath, optionally followed.
#[derive(Debug, Clone, clap::Args)]
pub struct FlowsArgs {
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Only flows with an end in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only flows with this pod at an end (name or namespace/name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only `allow` or `deny`.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub verdict: Option<String>,
    /// Only flows to this destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Keep streaming new events.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the events as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// `slipway policy ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCommand {
    /// The verdict on a connection and the rules responsible, from the state the datapath
    /// enforces. SRC and DST: namespace/pod or an IPv4 address; PORT/PROTO e.g. 80/TCP.
    Explain {
        src: String,
        dst: String,
        #[arg(value_name = "PORT/PROTO")]
        port: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Replace one list of the agent's policy state with a file's: JSON, or YAML with one or
    /// more documents, each an object, a list of them, or a `kind: List` (`kubectl get -o yaml`).
    Set {
        #[arg(value_parser = ["namespaces", "pods", "networkpolicies"])]
        kind: String,
        file: PathBuf,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print one list of the agent's policy state as JSON.
    Get {
        #[arg(value_parser = ["namespaces", "pods", "networkpolicies"])]
        kind: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let body = body.map(serde_json::to_vec).transpose()?;
    let answer = LocalClient::new(socket).request(method, path, body.as_deref())?;
    let (code, text) = (answer.status, answer.text());
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("agent answered {code}: {text}"))?;
    if !(200..300).contains(&code) {
        let errors = value["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_else(|| vec![text.clone()]);
        return Err(Refused { code, errors }.into());
    }
    Ok(value)
}

/// The agent refused a request.
#[derive(Debug, thiserror::Error)]
#[error("agent answered {code}:\n  {}", errors.join("\n  "))]
struct Refused {
    code: u16,
    errors: Vec<String>,
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl PolicyCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            PolicyCommand::Explain {
                src,
                dst,
                port,
                socket,
                json,
            } => {
                let (number, proto) = port
                    .split_once('/')
                    .map_or((port.as_str(), "TCP"), |(n, p)| (n, p));
                let number: u16 = number.parse().with_context(|| {
                    format!("PORT/PROTO: {port:?} does not start with a port number")
                })?;
                let path = format!(
                    "/v1/policy/explain?src={}&dst={}&port={number}&protocol={}",
                    encode(&src),
                    encode(&dst),
                    encode(&proto.to_uppercase())
                );
                let answer = call(&socket, "GET", &path, None)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&answer)?);
                } else {
                    print!("{}", render_explanation(&answer, &src, &dst, &port));
                }
                Ok(())
            }
            PolicyCommand::Set { kind, file, socket } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let items = read_items(&text).with_context(|| file.display().to_string())?;
                let answer = match call(
                    &socket,
                    "PUT",
                    &format!("/v1/{kind}"),
                    Some(&serde_json::Value::Array(items)),
                ) {
                    Ok(answer) => answer,
                    Err(e) => {
                        // A body that does not fit the schema: say where in the user's file.
                        let located = match e.downcast_ref::<Refused>() {
                            Some(refused) if refused.code == 400 => {
                                locate_misfits(&kind, &file.display().to_string(), &text)
                            }
                            _ => Vec::new(),
                        };
                        let e = e.context(format!("{kind} from {} refused", file.display()));
                        if located.is_empty() {
                            return Err(e);
                        }
                        anyhow::bail!("{e:#}\nin {}:\n{}", file.display(), located.join("\n"));
                    }
                };
                let generation = &answer["generation"];
                let failed: Vec<&str> = answer["failClosed"]
                    .as_array()
                    .map(|f| f.iter().filter_map(|v| v.as_str()).collect())
                    .unwrap_or_default();
                if !failed.is_empty() {
                    let why: Vec<&str> = answer["failClosedErrors"]
                        .as_array()
                        .map(|f| f.iter().filter_map(|v| v.as_str()).collect())
                        .unwrap_or_default();
                    anyhow::bail!(
                        "{kind} set and policy generation {generation} enforced, but {} endpoint \
                         direction(s) FAIL CLOSED (all their traffic in that direction is \
                         denied): {}\n  {}",
                        failed.len(),
                        failed.join(", "),
                        why.join("\n  ")
                    );
                }
                println!("{kind} set; policy generation {generation} enforced");
                Ok(())
            }
            PolicyCommand::Get { kind, socket } => {
                let answer = call(&socket, "GET", &format!("/v1/{kind}"), None)?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
                Ok(())
            }
        }
    }
}

/// The items of a policy state file: a JSON value, or every YAML document of the file; each a
/// list, a `kind: List` (or `...List`) with `items`, or one object. Empty documents count for
/// nothing.
pub fn read_items(text: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let documents: Vec<serde_json::Value> = match serde_json::from_str(text) {
        Ok(value) => vec![value],
        Err(_) => serde_saphyr::from_multiple(text)
            .map_err(|e| anyhow::anyhow!("not valid JSON or YAML: {e}"))?,
    };
    let mut items = Vec::new();
    for (d, document) in documents.into_iter().enumerate() {
        match document {
            serde_json::Value::Null => {}
            serde_json::Value::Array(list) => items.extend(list),
            serde_json::Value::Object(object) => {
                let kind = object.get("kind").and_then(serde_json::Value::as_str);
                if kind.is_some_and(|k| k.ends_with("List")) {
                    match object.get("items") {
                        Some(serde_json::Value::Array(list)) => items.extend(list.iter().cloned()),
                        Some(serde_json::Value::Null) | None => {}
                        Some(_) => anyhow::bail!("document {}: items: not a list", d + 1),
                    }
                } else {
                    items.push(serde_json::Value::Object(object));
                }
            }
            _ => anyhow::bail!(
                "document {}: neither an object, a list nor a kind: List",
                d + 1
            ),
        }
    }
    Ok(items)
}

/// Each document of a YAML (or JSON) text that holds something: its first line (0-based) and
/// its text. Documents start at `---` lines.
fn documents(text: &str) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = Vec::new();
    let mut current: Option<(u64, String)> = Some((0, String::new()));
    for (n, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") {
            out.extend(current.take());
            current = Some((n as u64, String::new()));
        }
        if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out.extend(current);
    out.retain(|(_, body)| {
        body.lines().any(|l| {
            let l = l.trim();
            !(l.is_empty() || l.starts_with('#') || l == "---" || l == "...")
        })
    });
    out
}

/// The items of a `kind: List` document.
#[derive(serde::Deserialize)]
struct ItemsOf<T> {
    #[serde(default = "Vec::new")]
    #[expect(
        dead_code,
        reason = "parsed only to check the items against the schema"
    )]
    items: Vec<T>,
}

/// Where the items of a state file do not fit the schema of `kind`: each document is parsed
/// again as what it holds (a list, a `kind: List` or one object), and its first misfit is
/// rendered at its line and column in `name`. Empty when none is found or the documents cannot
/// be told apart.
pub fn locate_misfits(kind: &str, name: &str, text: &str) -> Vec<String> {
    match kind {
        "networkpolicies" => misfits::<slipway_cni::policy::NetworkPolicy>(name, text),
        "pods" => misfits::<slipway_cni::policy::compile::Pod>(name, text),
        "namespaces" => misfits::<slipway_cni::policy::compile::Namespace>(name, text),
        _ => Vec::new(),
    }
}

fn misfits<T: serde::de::DeserializeOwned + serde::Serialize>(
    name: &str,
    text: &str,
) -> Vec<String> {
    let Ok(values) = serde_saphyr::from_multiple::<serde_json::Value>(text) else {
        return Vec::new();
    };
    let values: Vec<serde_json::Value> = values.into_iter().filter(|v| !v.is_null()).collect();
    let documents = documents(text);
    if documents.len() != values.len() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for ((offset, body), value) in documents.iter().zip(&values) {
        let is_list = value
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|k| k.ends_with("List"));
        let parsed = match value {
            serde_json::Value::Array(_) => serde_saphyr::from_str::<Vec<T>>(body).map(drop),
            _ if is_list => serde_saphyr::from_str::<ItemsOf<T>>(body).map(drop),
            _ => serde_saphyr::from_str::<T>(body).map(drop),
        };
        if let Err(e) = parsed {
            out.push(e.render_with_options(serde_saphyr::render_options! {
                line_offset: *offset,
                source_name: Some(name),
            }));
            continue;
        }
        // Fields the type skips without an error (k8s-openapi's types do), at the line of the
        // first key of that name.
        let items = match value {
            serde_json::Value::Array(items) => items.as_slice(),
            _ if is_list => value["items"].as_array().map_or(&[][..], Vec::as_slice),
            _ => std::slice::from_ref(value),
        };
        for item in items {
            let Ok(kept) =
                serde_json::from_value::<T>(item.clone()).and_then(|t| serde_json::to_value(&t))
            else {
                continue;
            };
            for field in unknown_fields(item, &kept) {
                let key = field.rsplit(['.', ']']).next().unwrap_or(&field);
                let line = body
                    .lines()
                    .position(|l| names_key(l, key))
                    .map_or(String::new(), |i| format!("{}:", *offset + i as u64 + 1));
                out.push(format!("{name}:{line} unknown field {field:?}"));
            }
        }
    }
    out
}

/// Whether a YAML line has the key `key` (block or flow style).
fn names_key(line: &str, key: &str) -> bool {
    line.match_indices(&format!("{key}:")).any(|(i, _)| {
        line[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'))
    })
}

/// The human form of an explain answer.
pub fn render_explanation(answer: &serde_json::Value, src: &str, dst: &str, port: &str) -> String {
    let verdict = if answer["allowed"].as_bool() == Some(true) {
        "ALLOWED"
    } else {
        "DENIED"
    };
    let mut out = format!("{src} -> {dst} {port}: {verdict}\n");
    for (end, who) in [("egress", src), ("ingress", dst)] {
        let e = &answer[end];
        let policies: Vec<&str> = e["policies"]
            .as_array()
            .map(|p| p.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let line = match e["verdict"].as_str().unwrap_or("?") {
            "open" => format!("open: no policy selects {who} for {end}"),
            "allow" => format!(
                "allowed by {} {} (of {})",
                e["policy"].as_str().unwrap_or("?"),
                e["rule"].as_str().unwrap_or("?"),
                policies.join(", ")
            ),
            "deny" => format!(
                "denied: {who} is isolated for {end} by {} and no rule allows",
                policies.join(", ")
            ),
            "fail-closed" => {
                format!("denied: {who}'s {end} rules overflowed the policy map (fails closed)")
            }
            other => other.to_owned(),
        };
        out.push_str(&format!("  {end:<8} {line}\n"));
    }
    out
}

impl FlowsArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let mut query = vec![format!("follow={}", self.follow)];
        for (key, value) in [
            ("namespace", self.namespace.as_deref()),
            ("pod", self.pod.as_deref()),
            ("verdict", self.verdict.as_deref()),
        ] {
            if let Some(v) = value {
                query.push(format!("{key}={}", encode(v)));
            }
        }
        if let Some(port) = self.port {
            query.push(format!("port={port}"));
        }
        let mut agent = LocalClient::new(&self.socket);
        if self.follow {
            agent = agent.without_timeout();
        }
        let (status, lines) = agent.stream_lines(&format!("/v1/flows?{}", query.join("&")))?;
        let stdout = std::io::stdout();
        for line in lines {
            let line = line?;
            if status != 200 {
                anyhow::bail!("agent answered {status}: {line}");
            }
            let mut out = stdout.lock();
            if self.json {
                writeln!(out, "{line}")?;
            } else if let Ok(flow) = serde_json::from_str::<Flow>(&line) {
                writeln!(out, "{}", render_flow(&flow))?;
            }
            out.flush()?;
        }
        Ok(())
    }
}

/// One flow as a line: time, verdict, deciding end, endpoints, port, what decided.
pub fn render_flow(flow: &Flow) -> String {
    let end = |e: &crate::policy::FlowEnd| match (&e.namespace, &e.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}({})", e.ip),
        _ => e.ip.to_string(),
    };
    let why = match (&flow.policy, &flow.rule) {
        (Some(p), Some(r)) => format!("{p} {r}"),
        _ if flow.reason == "fail-closed" => "fail-closed (policy map overflow)".to_owned(),
        _ if flow.reason == "open" => "not isolated".to_owned(),
        _ => format!("no rule of {}", flow.policies.join(", ")),
    };
    format!(
        "{} {:<5} {:<7} {}:{} -> {}:{} {} {}",
        flow.time,
        flow.verdict.to_uppercase(),
        flow.direction,
        end(&flow.src),
        flow.sport,
        end(&flow.dst),
        flow.dport,
        flow.protocol,
        why
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_may_be_multi_document_yaml_lists_or_kind_list() {
        let multi = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: a\n\
                     ---\n\
                     - metadata: {name: b}\n- metadata: {name: c}\n\
                     ---\n\
                     apiVersion: v1\nkind: List\nitems:\n- metadata: {name: d}\n\
                     ---\n";
        let items = read_items(multi).expect("multi-document YAML");
        let names: Vec<&str> = items
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let json = r#"{"kind": "NetworkPolicyList", "items": [{"metadata": {"name": "x"}}]}"#;
        assert_eq!(read_items(json).expect("JSON list kind").len(), 1);
        assert_eq!(read_items("[]").expect("empty").len(), 0);
        let err = read_items("- a\n---\n42\n").expect_err("a scalar document");
        assert!(err.to_string().contains("document 2"), "{err}");
    }

    #[test]
    fn misfits_are_located_in_the_users_file() {
        let text = "\
# policies
metadata: {name: one, namespace: x}
spec: {}
---
kind: List
items:
- metadata: {name: two, namespace: x}
  spec:
    podSelectr: {}
";
        let found = locate_misfits("networkpolicies", "my.yaml", text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("my.yaml:9:") && found[0].contains("podSelectr"),
            "{}",
            found[0]
        );
        let fine = "- metadata: {name: a}\n  spec: {}\n";
        assert!(locate_misfits("networkpolicies", "ok.yaml", fine).is_empty());
    }
}
