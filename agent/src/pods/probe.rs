//! Liveness and readiness probes (core/v1 `Probe`: exec, tcpSocket, httpGet), kubelet's
//! semantics: a probe runs every `periodSeconds` once `initialDelaySeconds` have passed since the
//! container started, each run bounded by `timeoutSeconds`; `failureThreshold` failures in a
//! row flip it to failed, `successThreshold` successes to succeeded. Readiness starts failed,
//! liveness succeeded. The spec parsing and the counting are pure; the network probes run on a
//! thread of their own that enters the pods' network namespace when the runner is told one
//! (the agent itself runs in the host's).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use slipway_api::FieldError;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Exec(Vec<String>),
    Tcp { port: u16 },
    Http { port: u16, path: String },
}

/// A checked probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn seconds(
    value: Option<i32>,
    default: i32,
    min: i32,
    field: String,
    errors: &mut Vec<FieldError>,
) -> u32 {
    let v = value.unwrap_or(default);
    if v < min {
        errors.push(FieldError::invalid(
            field,
            v,
            format!("must be greater than or equal to {min}"),
        ));
        return u32::try_from(default).unwrap_or(1);
    }
    u32::try_from(v).unwrap_or(1)
}

/// The port a probe names: a number, or the name of one of the container's ports.
fn port(
    port: &IntOrString,
    container: &Container,
    field: String,
    errors: &mut Vec<FieldError>,
) -> u16 {
    let resolved = match port {
        IntOrString::Int(p) => u16::try_from(*p).ok().filter(|p| *p > 0),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    resolved.unwrap_or_else(|| {
        let shown = match port {
            IntOrString::Int(p) => p.to_string(),
            IntOrString::String(s) => s.clone(),
        };
        errors.push(FieldError::invalid(
            field,
            shown,
            "must be a port number (1-65535) or the name of a container port",
        ));
        0
    })
}

impl ProbeSpec {
    /// Checks `probe` of `container` at `field` (`spec.containers[0].livenessProbe`).
    pub fn from_probe(
        probe: &Probe,
        container: &Container,
        field: &str,
        liveness: bool,
        errors: &mut Vec<FieldError>,
    ) -> Option<Self> {
        let before = errors.len();
        let mut actions = Vec::new();
        if let Some(exec) = &probe.exec {
            let command = exec.command.clone().unwrap_or_default();
            if command.is_empty() {
                errors.push(FieldError::required(format!("{field}.exec.command")));
            }
            actions.push(Action::Exec(command));
        }
        if let Some(tcp) = &probe.tcp_socket {
            let port = port(
                &tcp.port,
                container,
                format!("{field}.tcpSocket.port"),
                errors,
            );
            actions.push(Action::Tcp { port });
        }
        if let Some(http) = &probe.http_get {
            let port = port(
                &http.port,
                container,
                format!("{field}.httpGet.port"),
                errors,
            );
            if http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                errors.push(FieldError::not_supported(
                    format!("{field}.httpGet.scheme"),
                    http.scheme.as_deref().unwrap_or_default(),
                    &["HTTP"],
                ));
            }
            let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errors.push(FieldError::invalid(
                    format!("{field}.httpGet.path"),
                    &path,
                    "must be an absolute path without spaces",
                ));
            }
            actions.push(Action::Http { port, path });
        }
        if probe.grpc.is_some() {
            errors.push(FieldError::forbidden(
                format!("{field}.grpc"),
                "is not supported by this runner yet",
            ));
        }
        if actions.len() != 1 && probe.grpc.is_none() {
            errors.push(FieldError::invalid(
                field.to_owned(),
                actions.len(),
                "must specify exactly one of exec, tcpSocket, httpGet",
            ));
        }
        let initial_delay = seconds(
            probe.initial_delay_seconds,
            0,
            0,
            format!("{field}.initialDelaySeconds"),
            errors,
        );
        let period = seconds(
            probe.period_seconds,
            10,
            1,
            format!("{field}.periodSeconds"),
            errors,
        );
        let timeout = seconds(
            probe.timeout_seconds,
            1,
            1,
            format!("{field}.timeoutSeconds"),
            errors,
        );
        let success_threshold = seconds(
            probe.success_threshold,
            1,
            1,
            format!("{field}.successThreshold"),
            errors,
        );
        if liveness && success_threshold != 1 {
            errors.push(FieldError::invalid(
                format!("{field}.successThreshold"),
                success_threshold,
                "must be 1 for liveness probes",
            ));
        }
        let failure_threshold = seconds(
            probe.failure_threshold,
            3,
            1,
            format!("{field}.failureThreshold"),
            errors,
        );
        (errors.len() == before).then(|| Self {
            action: actions.remove(0),
            initial_delay: Duration::from_secs(initial_delay.into()),
            period: Duration::from_secs(period.into()),
            timeout: Duration::from_secs(timeout.into()),
            success_threshold,
            failure_threshold,
        })
    }
}

/// One probe's counters for one container instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    last: Option<Instant>,
    successes: u32,
    failures: u32,
    /// The probe's verdict so far.
    pub ok: bool,
}

impl ProbeState {
    /// Readiness starts failed, liveness succeeded.
    pub fn new(initially_ok: bool) -> Self {
        Self {
            last: None,
            successes: 0,
            failures: 0,
            ok: initially_ok,
        }
    }

    /// Whether the probe is due at `now`, the container having run for `ran`.
    pub fn due(&self, spec: &ProbeSpec, ran: Duration, now: Instant) -> bool {
        ran >= spec.initial_delay
            && self
                .last
                .is_none_or(|l| now.duration_since(l) >= spec.period)
    }

    /// Counts a result; returns the verdict.
    pub fn record(&mut self, spec: &ProbeSpec, success: bool, now: Instant) -> bool {
        self.last = Some(now);
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= spec.success_threshold {
                self.ok = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= spec.failure_threshold {
                self.ok = false;
            }
        }
        self.ok
    }
}

/// A TCP connect (tcpSocket) or an HTTP GET answered 200-399 (httpGet) to `ip`, made from the
/// network namespace at `netns` (the caller's when `None`) within `timeout`.
pub async fn network_probe(
    netns: Option<&Path>,
    ip: IpAddr,
    action: &Action,
    timeout: Duration,
) -> bool {
    let (port, path) = match action {
        Action::Tcp { port } => (*port, None),
        Action::Http { port, path } => (*port, Some(path.clone())),
        Action::Exec(_) => return false,
    };
    let netns: Option<PathBuf> = netns.map(Path::to_owned);
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own: setns(2) moves only the calling thread, which then ends with the
    // probe (a pooled thread would stay in the namespace).
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<bool> {
            if let Some(netns) = netns {
                let file = std::fs::File::open(netns)?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            let addr = SocketAddr::new(ip, port);
            let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
            let Some(path) = path else {
                return Ok(true);
            };
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            write!(
                stream,
                "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.35\r\n\
                 Accept: */*\r\nConnection: close\r\n\r\n"
            )?;
            let mut head = [0u8; 32];
            let mut got = 0;
            while got < 12 {
                let n = stream.read(&mut head[got..])?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            Ok(http_ok(&head[..got]))
        })();
        let _ = tx.send(result.unwrap_or(false));
    });
    tokio::time::timeout(timeout + Duration::from_millis(200), rx)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(false)
}

/// Whether an HTTP status line says 200-399 (kubelet's success range).
fn http_ok(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let mut words = text.split_whitespace();
    let proto = words.next().unwrap_or_default();
    let code: u16 = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    proto.starts_with("HTTP/") && (200..400).contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn probes_parse_with_kubelet_defaults_and_named_ports() {
        let c = container(
            json!({"name": "c", "ports": [{"name": "web", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "web", "path": "/ready"}}}),
        );
        let mut errors = Vec::new();
        let p = ProbeSpec::from_probe(
            c.readiness_probe.as_ref().unwrap(),
            &c,
            "r",
            false,
            &mut errors,
        )
        .unwrap();
        assert_eq!(
            p.action,
            Action::Http {
                port: 8080,
                path: "/ready".into()
            }
        );
        assert_eq!(p.period, Duration::from_secs(10));
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert_eq!((p.success_threshold, p.failure_threshold), (1, 3));
        assert!(errors.is_empty());
    }

    #[test]
    fn bad_probes_name_their_fields() {
        let c = container(json!({"name": "c", "livenessProbe": {
            "tcpSocket": {"port": "nope"}, "exec": {"command": []},
            "periodSeconds": 0, "successThreshold": 2}}));
        let mut errors = Vec::new();
        let p = ProbeSpec::from_probe(
            c.liveness_probe.as_ref().unwrap(),
            &c,
            "l",
            true,
            &mut errors,
        );
        assert!(p.is_none());
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let text = text.join("\n");
        for field in [
            "l.exec.command",
            "l.tcpSocket.port",
            "l: ",
            "l.periodSeconds",
            "l.successThreshold",
        ] {
            assert!(text.contains(field), "{field} missing from\n{text}");
        }
    }

    #[test]
    fn thresholds_flip_the_verdict() {
        let spec = ProbeSpec {
            action: Action::Tcp { port: 1 },
            initial_delay: Duration::from_secs(5),
            period: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        };
        let t0 = Instant::now();
        let mut s = ProbeState::new(false);
        assert!(!s.due(&spec, Duration::from_secs(4), t0));
        assert!(s.due(&spec, Duration::from_secs(5), t0));
        assert!(!s.record(&spec, true, t0));
        assert!(!s.due(&spec, Duration::from_secs(6), t0 + Duration::from_secs(1)));
        assert!(s.record(&spec, true, t0 + Duration::from_secs(2)));
        assert!(s.record(&spec, false, t0 + Duration::from_secs(4)));
        assert!(s.record(&spec, false, t0 + Duration::from_secs(6)));
        assert!(!s.record(&spec, false, t0 + Duration::from_secs(8)));
        assert!(http_ok(b"HTTP/1.0 200 OK\r\n"));
        assert!(http_ok(b"HTTP/1.1 302 Found"));
        assert!(!http_ok(b"HTTP/1.0 404 Not Found"));
        assert!(!http_ok(b"garbage"));
    }
}
