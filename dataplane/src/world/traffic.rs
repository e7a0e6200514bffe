//! Traffic generators for tests and benchmarks: ping and iperf3, run inside namespaces, with
//! their output parsed into numbers.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;

use super::Netns;
use crate::DataplaneError;

/// The port iperf3 servers of the world listen on (each in its own namespace).
pub const IPERF3_PORT: u16 = 5201;

/// What `ping` reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingReport {
    pub transmitted: u64,
    pub received: u64,
    /// Mean round-trip time in milliseconds; `None` when nothing came back.
    pub rtt_avg_ms: Option<f64>,
}

/// Sends `count` echo requests from `from` to `to`, `interval` apart. Losses are reported, not
/// an error; a ping that could not run at all is.
pub fn ping(
    from: &Netns,
    to: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<PingReport, DataplaneError> {
    let count_arg = count.to_string();
    let interval_arg = format!("{:.3}", interval.as_secs_f64());
    let to_arg = to.to_string();
    let output = from.exec(&[
        "ping",
        "-n",
        "-q",
        "-c",
        &count_arg,
        "-i",
        &interval_arg,
        "-W",
        "1",
        &to_arg,
    ])?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_ping(&text).ok_or_else(|| DataplaneError::Parse {
        command: format!("ping {to}"),
        detail: format!("{text}{}", String::from_utf8_lossy(&output.stderr)),
    })
}

pub fn parse_ping(text: &str) -> Option<PingReport> {
    let summary = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = summary
        .split(',')
        .map(|part| part.split_whitespace().next()?.parse::<u64>().ok());
    let transmitted = numbers.next()??;
    let received = numbers.next()??;
    let rtt_avg_ms = text
        .lines()
        .find(|l| l.starts_with("rtt ") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok());
    Some(PingReport {
        transmitted,
        received,
        rtt_avg_ms,
    })
}

/// Waits until one echo request from `from` to `to` is answered (links can take a moment to come
/// up on a loaded machine); fails after `timeout`.
pub fn wait_reachable(from: &Netns, to: Ipv4Addr, timeout: Duration) -> Result<(), DataplaneError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if ping(from, to, 1, Duration::from_millis(200))?.received == 1 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(DataplaneError::Command {
                command: format!("ping {to} from {}", from.name()),
                detail: format!("no reply within {timeout:?}"),
            });
        }
    }
}

/// What an iperf3 TCP test measured.
#[derive(Debug, Clone, PartialEq)]
pub struct IperfReport {
    /// Throughput seen by the receiver, bits per second.
    pub received_bps: f64,
    /// Payload bytes the sender wrote (some may never have left its socket when the test ends).
    pub sent_bytes: u64,
    /// Payload bytes the receiver got.
    pub received_bytes: u64,
    /// Bytes the sender sent in each reporting interval ([`IPERF3_INTERVAL`]), in order: a
    /// stall shows as an interval at zero.
    pub interval_bytes: Vec<u64>,
}

/// iperf3's reporting interval (`-i`), in seconds.
pub const IPERF3_INTERVAL: &str = "0.25";

/// Runs one iperf3 TCP test of `duration` (rounded up to whole seconds, at least 1) from
/// `client` to a server started in `server`, listening on `server_ip`.
pub fn iperf3_tcp(
    client: &Netns,
    server: &Netns,
    server_ip: Ipv4Addr,
    duration: Duration,
) -> Result<IperfReport, DataplaneError> {
    let port = IPERF3_PORT.to_string();
    let bind = server_ip.to_string();
    let server_process = server.spawn(&["iperf3", "-s", "-1", "-p", &port, "-B", &bind])?;
    server.wait_tcp_listen(IPERF3_PORT, Duration::from_secs(5))?;
    // iperf3 takes whole seconds (a fractional -t can make 3.12 run forever), and `timeout`
    // bounds a client that hangs.
    let seconds = duration.as_secs_f64().ceil().max(1.0) as u64;
    let limit = (seconds + 15).to_string();
    let seconds = seconds.to_string();
    let text = client.run(&[
        "timeout",
        &limit,
        "iperf3",
        "-c",
        &bind,
        "-p",
        &port,
        "-t",
        &seconds,
        "-i",
        IPERF3_INTERVAL,
        "-J",
    ])?;
    server_process.wait()?;
    parse_iperf3(&text).ok_or_else(|| DataplaneError::Parse {
        command: format!("iperf3 -c {server_ip} -J"),
        detail: text.chars().take(500).collect(),
    })
}

pub fn parse_iperf3(text: &str) -> Option<IperfReport> {
    let json: Value = serde_json::from_str(text).ok()?;
    let end = &json["end"];
    Some(IperfReport {
        received_bps: end["sum_received"]["bits_per_second"].as_f64()?,
        sent_bytes: end["sum_sent"]["bytes"].as_u64()?,
        received_bytes: end["sum_received"]["bytes"].as_u64()?,
        interval_bytes: json["intervals"]
            .as_array()
            .map(|intervals| {
                intervals
                    .iter()
                    .filter_map(|i| i["sum"]["bytes"].as_u64())
                    .collect()
            })
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summaries() {
        let ok = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n--- 10.0.0.2 ping statistics ---\n\
                  5 packets transmitted, 4 received, 20% packet loss, time 41ms\n\
                  rtt min/avg/max/mdev = 0.031/0.045/0.070/0.014 ms\n";
        assert_eq!(
            parse_ping(ok),
            Some(PingReport {
                transmitted: 5,
                received: 4,
                rtt_avg_ms: Some(0.045)
            })
        );
        let lost = "--- 10.0.0.2 ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss, time 2ms\n";
        assert_eq!(
            parse_ping(lost),
            Some(PingReport {
                transmitted: 3,
                received: 0,
                rtt_avg_ms: None
            })
        );
        assert_eq!(parse_ping("connect: Network is unreachable"), None);
    }

    #[test]
    fn parses_iperf3_json() {
        let text = r#"{"intervals":[{"sum":{"bytes":600}},{"sum":{"bytes":400}}],
                       "end":{"sum_sent":{"bytes":1000,"bits_per_second":8000.0},
                       "sum_received":{"bytes":990,"bits_per_second":7920.5}}}"#;
        assert_eq!(
            parse_iperf3(text),
            Some(IperfReport {
                received_bps: 7920.5,
                sent_bytes: 1000,
                received_bytes: 990,
                interval_bytes: vec![600, 400],
            })
        );
        assert_eq!(parse_iperf3(r#"{"error":"unable to connect"}"#), None);
    }
}
