//! resolv.conf as the stub resolver reads it (resolv.conf(5)): the host's nameservers are the
//! upstreams of names outside the cluster domain, and its search list and options are what a
//! pod with dnsPolicy `Default` gets, as kubelet reads them. Pure: the caller reads the file.

use std::net::{IpAddr, SocketAddr};

/// The parts of a resolv.conf that matter here, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses `text`; lines it does not understand are skipped, as the stub resolver skips them.
    /// A later `search` (or `domain`) line replaces an earlier one, as in glibc.
    pub fn parse(text: &str) -> Self {
        let mut conf = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // An IPv6 link-local address may carry a zone (`fe80::1%eth0`): not routable
                    // from a pod, so it is skipped like any unparsable address.
                    if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                        conf.nameservers.push(ip);
                    }
                }
                Some("search" | "domain") => {
                    conf.searches = words
                        .map(|w| w.trim_end_matches('.').to_owned())
                        .filter(|w| !w.is_empty())
                        .collect();
                }
                Some("options") => conf.options.extend(words.map(str::to_owned)),
                _ => {}
            }
        }
        conf
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &std::path::Path) -> std::io::Result<Self> {
        std::fs::read_to_string(path).map(|text| Self::parse(&text))
    }

    /// The nameservers as DNS server addresses (port 53).
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.nameservers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_searches_and_options_are_read_as_the_stub_resolver_does() {
        let conf = ResolvConf::parse(
            "# generated\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n\
             domain old.example\nsearch corp.example. lab.example ; comment\n\
             options ndots:2\noptions edns0 timeout:1\nnameserver ::1\nsortlist 10.0.0.0\n",
        );
        assert_eq!(
            conf.nameservers,
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(conf.searches, ["corp.example", "lab.example"]);
        assert_eq!(conf.options, ["ndots:2", "edns0", "timeout:1"]);
        assert_eq!(
            conf.upstreams(),
            [
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
    }
}
