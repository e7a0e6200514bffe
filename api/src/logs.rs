//! Container logs on the wire: core/v1 `PodLogOptions` as the query parameters both ends speak
//! (the API server's `pods/{name}/log` and the host agent's kubelet endpoint
//! `/containerLogs/{namespace}/{pod}/{container}`), checked once here, and the identity the API
//! server presents to the agents.

use k8s_openapi::jiff::Timestamp;

use crate::FieldError;

/// The subject (CN) of the client certificate the API server presents to a host agent's
/// kubelet endpoint; the agent serves logs to no one else. It carries no group, so the same
/// certificate presented to the API server itself grants nothing.
pub const KUBELET_CLIENT_USER: &str = "slipway:apiserver-kubelet-client";

/// The kubelet port, as Kubernetes defaults it.
pub const DEFAULT_KUBELET_PORT: u16 = 10250;

/// What part of a container's log is asked for (core/v1 `PodLogOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// `container`: which container (the API server's parameter; the kubelet's is in the path).
    pub container: Option<String>,
    /// `follow`: keep streaming as the container writes.
    pub follow: bool,
    /// `previous`: the previous instance's log (after a restart).
    pub previous: bool,
    /// `timestamps`: prefix each line with the runtime's RFC 3339 timestamp.
    pub timestamps: bool,
    /// `tailLines`: only the last this many lines.
    pub tail_lines: Option<u64>,
    /// `limitBytes`: stop after this many bytes.
    pub limit_bytes: Option<u64>,
    /// `sinceSeconds`: only lines written in the last this many seconds.
    pub since_seconds: Option<u64>,
    /// `sinceTime`: only lines written at or after this time.
    pub since_time: Option<Timestamp>,
}

fn boolean(name: &str, value: &str, errs: &mut Vec<FieldError>) -> bool {
    match value {
        "true" | "1" | "" => true,
        "false" | "0" => false,
        other => {
            errs.push(FieldError::invalid(name, other, "must be true or false"));
            false
        }
    }
}

fn count(name: &str, value: &str, min: u64, errs: &mut Vec<FieldError>) -> Option<u64> {
    match value.parse::<i64>() {
        Ok(n) if u64::try_from(n).is_ok_and(|n| n >= min) => u64::try_from(n).ok(),
        Ok(n) => {
            let detail = if min == 0 {
                "must be greater than or equal to 0"
            } else {
                "must be greater than 0"
            };
            errs.push(FieldError::invalid(name, n, detail));
            None
        }
        Err(_) => {
            errs.push(FieldError::invalid(name, value, "must be an integer"));
            None
        }
    }
}

impl LogOptions {
    /// The options of decoded query pairs; every bad parameter is named at once. Parameters
    /// that are not log options are ignored, as Kubernetes' query conversion does.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut o = Self::default();
        for (key, value) in pairs {
            match key {
                "container" if !value.is_empty() => o.container = Some(value.to_owned()),
                "follow" => o.follow = boolean(key, value, &mut errs),
                "previous" => o.previous = boolean(key, value, &mut errs),
                "timestamps" => o.timestamps = boolean(key, value, &mut errs),
                "tailLines" => o.tail_lines = count(key, value, 0, &mut errs),
                "limitBytes" => o.limit_bytes = count(key, value, 1, &mut errs),
                "sinceSeconds" => o.since_seconds = count(key, value, 1, &mut errs),
                "sinceTime" => match value.parse::<Timestamp>() {
                    Ok(t) => o.since_time = Some(t),
                    Err(_) => {
                        errs.push(FieldError::invalid(key, value, "must be an RFC 3339 time"))
                    }
                },
                _ => {}
            }
        }
        if o.since_seconds.is_some() && o.since_time.is_some() {
            errs.push(FieldError::forbidden(
                "sinceTime",
                "at most one of sinceTime or sinceSeconds may be specified",
            ));
        }
        if errs.is_empty() { Ok(o) } else { Err(errs) }
    }

    /// The options of a raw query string (`follow=true&tailLines=3`), percent-decoded.
    pub fn from_query(query: &str) -> Result<Self, Vec<FieldError>> {
        let pairs: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(p), String::new()),
            })
            .collect();
        Self::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// The query string of these options for the kubelet endpoint (the container is in its
    /// path); empty when every option is at its default.
    pub fn kubelet_query(&self) -> String {
        let mut parts = Vec::new();
        for (name, on) in [
            ("follow", self.follow),
            ("previous", self.previous),
            ("timestamps", self.timestamps),
        ] {
            if on {
                parts.push(format!("{name}=true"));
            }
        }
        for (name, value) in [
            ("tailLines", self.tail_lines),
            ("limitBytes", self.limit_bytes),
            ("sinceSeconds", self.since_seconds),
        ] {
            if let Some(v) = value {
                parts.push(format!("{name}={v}"));
            }
        }
        if let Some(t) = self.since_time {
            // RFC 3339 in UTC: no `+` to escape.
            parts.push(format!("sinceTime={t}"));
        }
        parts.join("&")
    }

    /// The earliest time a line may carry, at `now`.
    pub fn since(&self, now: Timestamp) -> Option<Timestamp> {
        match (self.since_time, self.since_seconds) {
            (Some(t), _) => Some(t),
            (None, Some(s)) => {
                let span = k8s_openapi::jiff::SignedDuration::from_secs(
                    i64::try_from(s).unwrap_or(i64::MAX),
                );
                Some(now.checked_sub(span).unwrap_or(Timestamp::MIN))
            }
            (None, None) => None,
        }
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Percent-decodes a query component (`+` is a space).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_queries_parse_and_round_trip() {
        let o = LogOptions::from_query(
            "container=main&follow=true&tailLines=3&timestamps=true&limitBytes=100&sinceTime=2026-01-02T03%3A04%3A05Z",
        )
        .expect("valid");
        assert_eq!(o.container.as_deref(), Some("main"));
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(3), Some(100)));
        assert_eq!(
            o.kubelet_query(),
            "follow=true&timestamps=true&tailLines=3&limitBytes=100&sinceTime=2026-01-02T03:04:05Z"
        );
        let back = LogOptions::from_query(&o.kubelet_query()).expect("round trip");
        assert_eq!(
            back,
            LogOptions {
                container: None,
                ..o
            }
        );
        assert_eq!(LogOptions::default().kubelet_query(), "");
    }

    #[test]
    fn every_bad_parameter_is_named() {
        let errs = LogOptions::from_query(
            "follow=maybe&tailLines=-1&limitBytes=0&sinceSeconds=x&sinceTime=yesterday",
        )
        .expect_err("invalid");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "follow",
                "tailLines",
                "limitBytes",
                "sinceSeconds",
                "sinceTime"
            ]
        );
        let errs = LogOptions::from_query("sinceSeconds=5&sinceTime=2026-01-02T03:04:05Z")
            .expect_err("both");
        assert!(errs[0].to_string().contains("at most one"), "{}", errs[0]);
    }

    #[test]
    fn since_seconds_counts_back_from_now() {
        let now: Timestamp = "2026-01-02T03:04:05Z".parse().expect("time");
        let o = LogOptions::from_query("sinceSeconds=5").expect("valid");
        assert_eq!(
            o.since(now),
            Some("2026-01-02T03:04:00Z".parse().expect("time"))
        );
        assert_eq!(LogOptions::default().since(now), None);
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("a%3Ab+c"), "a:b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
