//! A pod's resolv.conf as kubelet computes it (`pkg/kubelet/network/dns`), handed to the
//! runtime as CRI's `DNSConfig`: dnsPolicy `ClusterFirst` (the default) points the pod at the
//! node's cluster DNS with the Kubernetes search path and `ndots:5`; `Default` keeps the host's
//! resolv.conf; `None` takes only `spec.dnsConfig`, which the other policies merge in. Pure:
//! the caller reads the host's resolv.conf.

use std::net::IpAddr;

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{PodDNSConfig, PodSpec};
use slipway_api::FieldError;

use crate::dns::resolv::ResolvConf;

/// kubelet's limits (`pkg/apis/core/validation`: MaxDNSNameservers, MaxDNSSearchPaths).
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;

/// The node's cluster DNS, as the pod runner is configured with it (kubelet's `clusterDNS`
/// and `clusterDomain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDns {
    pub servers: Vec<IpAddr>,
    pub domain: String,
}

/// Where a pod's resolv.conf comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    ClusterFirst,
    Default,
    None,
}

/// A pod's DNS settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDns {
    pub policy: Policy,
    /// `spec.dnsConfig`: nameservers, searches, options (`name` or `name:value`).
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<(String, Option<String>)>,
}

impl PodDns {
    /// `spec.dnsPolicy` and `spec.dnsConfig`, every bad field pushed to `errors`.
    pub fn from_spec(spec: &PodSpec, errors: &mut Vec<FieldError>) -> Self {
        let host_network = spec.host_network == Some(true);
        let policy = match spec.dns_policy.as_deref() {
            // A host-network pod keeps the host's resolv.conf unless it asks for
            // ClusterFirstWithHostNet.
            None | Some("ClusterFirst") if host_network => Policy::Default,
            None | Some("ClusterFirst" | "ClusterFirstWithHostNet") => Policy::ClusterFirst,
            Some("Default") => Policy::Default,
            Some("None") => Policy::None,
            Some(other) => {
                errors.push(FieldError::not_supported(
                    "spec.dnsPolicy",
                    other,
                    &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
                ));
                Policy::ClusterFirst
            }
        };
        let default = PodDNSConfig::default();
        let config = spec.dns_config.as_ref().unwrap_or(&default);
        let nameservers = config.nameservers.clone().unwrap_or_default();
        if nameservers.len() > MAX_NAMESERVERS {
            errors.push(FieldError::invalid(
                "spec.dnsConfig.nameservers",
                nameservers.join(" "),
                format!("must not have more than {MAX_NAMESERVERS} nameservers"),
            ));
        }
        for (i, ns) in nameservers.iter().enumerate() {
            if ns.parse::<IpAddr>().is_err() {
                errors.push(FieldError::invalid(
                    format!("spec.dnsConfig.nameservers[{i}]"),
                    ns,
                    "must be a valid IP address",
                ));
            }
        }
        if policy == Policy::None && nameservers.is_empty() {
            errors.push(FieldError::required("spec.dnsConfig.nameservers"));
        }
        let searches = config.searches.clone().unwrap_or_default();
        if searches.len() > MAX_SEARCHES {
            errors.push(FieldError::invalid(
                "spec.dnsConfig.searches",
                searches.len().to_string(),
                format!("must not have more than {MAX_SEARCHES} search paths"),
            ));
        }
        for (i, search) in searches.iter().enumerate() {
            let name = search.trim_end_matches('.');
            if name.is_empty()
                || name.len() > 253
                || name.split('.').any(|l| {
                    l.is_empty()
                        || l.len() > 63
                        || !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
            {
                errors.push(FieldError::invalid(
                    format!("spec.dnsConfig.searches[{i}]"),
                    search,
                    "must be a DNS subdomain (RFC 1123)",
                ));
            }
        }
        let mut options = Vec::new();
        for (i, option) in config.options.iter().flatten().enumerate() {
            match option.name.as_deref().filter(|n| !n.is_empty()) {
                Some(name) => options.push((name.to_owned(), option.value.clone())),
                None => errors.push(FieldError::required(format!(
                    "spec.dnsConfig.options[{i}].name"
                ))),
            }
        }
        Self {
            policy,
            nameservers,
            searches: searches
                .iter()
                .map(|s| s.trim_end_matches('.').to_owned())
                .collect(),
            options,
        }
    }

    /// The sandbox's `DNSConfig`, or `None` to leave the runtime's default (a copy of the
    /// host's resolv.conf). `ClusterFirst` without a cluster DNS falls back to `Default`, as
    /// kubelet does. `host` is the host's resolv.conf, read only when it is needed.
    pub fn cri_config(
        &self,
        namespace: &str,
        cluster: Option<&ClusterDns>,
        host: impl FnOnce() -> ResolvConf,
    ) -> Option<cri::DnsConfig> {
        let policy = match (self.policy, cluster) {
            (Policy::ClusterFirst, None) => Policy::Default,
            (policy, _) => policy,
        };
        let custom =
            !self.nameservers.is_empty() || !self.searches.is_empty() || !self.options.is_empty();
        let mut base = match (policy, cluster) {
            (Policy::Default, _) if !custom => return None,
            (Policy::Default, _) => {
                let host = host();
                cri::DnsConfig {
                    servers: host.nameservers.iter().map(ToString::to_string).collect(),
                    searches: host.searches,
                    options: host.options,
                }
            }
            (Policy::ClusterFirst, Some(cluster)) => {
                let domain = cluster.domain.trim_end_matches('.');
                let mut searches = vec![
                    format!("{namespace}.svc.{domain}"),
                    format!("svc.{domain}"),
                    domain.to_owned(),
                ];
                searches.extend(host().searches);
                cri::DnsConfig {
                    servers: cluster.servers.iter().map(ToString::to_string).collect(),
                    searches,
                    options: vec!["ndots:5".to_owned()],
                }
            }
            (Policy::None | Policy::ClusterFirst, _) => cri::DnsConfig::default(),
        };
        base.servers.extend(self.nameservers.iter().cloned());
        base.searches.extend(self.searches.iter().cloned());
        dedup(&mut base.servers);
        dedup(&mut base.searches);
        base.servers.truncate(MAX_NAMESERVERS);
        base.searches.truncate(MAX_SEARCHES);
        // Pod options override the base's of the same name, in place; new ones are appended.
        for (name, value) in &self.options {
            let text = value
                .as_ref()
                .map_or_else(|| name.clone(), |v| format!("{name}:{v}"));
            match base
                .options
                .iter_mut()
                .find(|o| o.split(':').next() == Some(name.as_str()))
            {
                Some(existing) => *existing = text,
                None => base.options.push(text),
            }
        }
        Some(base)
    }
}

/// Drops repeats, keeping the first of each.
fn dedup(items: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    items.retain(|i| seen.insert(i.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> PodSpec {
        serde_json::from_value(value).expect("pod spec")
    }

    fn cluster() -> ClusterDns {
        ClusterDns {
            servers: vec!["10.244.1.1".parse().unwrap()],
            domain: "cluster.local".into(),
        }
    }

    fn host() -> ResolvConf {
        ResolvConf::parse("nameserver 192.0.2.53\nsearch corp.example\noptions timeout:2 edns0\n")
    }

    fn dns(value: serde_json::Value) -> PodDns {
        let mut errors = Vec::new();
        let dns = PodDns::from_spec(&spec(value), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        dns
    }

    #[test]
    fn cluster_first_points_at_the_cluster_dns_with_the_kubernetes_search_path() {
        let config = dns(json!({"containers": []}))
            .cri_config("apps", Some(&cluster()), host)
            .expect("a DNS config");
        assert_eq!(config.servers, ["10.244.1.1"]);
        assert_eq!(
            config.searches,
            [
                "apps.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ]
        );
        assert_eq!(config.options, ["ndots:5"]);
        // Without a cluster DNS it is Default: the runtime's copy of the host's file.
        assert_eq!(
            dns(json!({"containers": []})).cri_config("apps", None, host),
            None
        );
        // A host-network pod keeps the host's unless it asks for ClusterFirstWithHostNet.
        let host_net = dns(json!({"containers": [], "hostNetwork": true}));
        assert_eq!(host_net.policy, Policy::Default);
        assert_eq!(host_net.cri_config("apps", Some(&cluster()), host), None);
        let with = dns(json!({"containers": [], "hostNetwork": true,
                              "dnsPolicy": "ClusterFirstWithHostNet"}));
        assert_eq!(with.policy, Policy::ClusterFirst);
    }

    #[test]
    fn dns_config_is_merged_as_kubelet_merges_it() {
        let pod = dns(json!({"containers": [], "dnsConfig": {
            "nameservers": ["10.244.1.1", "192.0.2.9"],
            "searches": ["svc.cluster.local", "extra.example"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}));
        let config = pod
            .cri_config("default", Some(&cluster()), host)
            .expect("config");
        assert_eq!(config.servers, ["10.244.1.1", "192.0.2.9"]);
        assert_eq!(
            config.searches,
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "extra.example"
            ]
        );
        assert_eq!(config.options, ["ndots:2", "edns0"]);
        // Default with a dnsConfig: the host's file plus the pod's.
        let pod = dns(json!({"containers": [], "dnsPolicy": "Default",
            "dnsConfig": {"options": [{"name": "timeout", "value": "5"}]}}));
        let config = pod
            .cri_config("default", Some(&cluster()), host)
            .expect("config");
        assert_eq!(config.servers, ["192.0.2.53"]);
        assert_eq!(config.searches, ["corp.example"]);
        assert_eq!(config.options, ["timeout:5", "edns0"]);
        // None: the pod's settings alone; the host's file is not read.
        let pod = dns(json!({"containers": [], "dnsPolicy": "None",
            "dnsConfig": {"nameservers": ["192.0.2.1"], "searches": ["a.example."]}}));
        let config = pod
            .cri_config("default", Some(&cluster()), || panic!("host file read"))
            .expect("config");
        assert_eq!(config.servers, ["192.0.2.1"]);
        assert_eq!(config.searches, ["a.example"]);
        assert!(config.options.is_empty());
    }

    #[test]
    fn every_bad_dns_field_is_named() {
        let mut errors = Vec::new();
        PodDns::from_spec(
            &spec(
                json!({"containers": [], "dnsPolicy": "Sometimes", "dnsConfig": {
                "nameservers": ["1.1.1.1", "2.2.2.2", "3.3.3.3", "not-an-ip"],
                "searches": ["ok.example", "bad_label.example"],
                "options": [{"value": "1"}]}}),
            ),
            &mut errors,
        );
        let text = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        for field in [
            "spec.dnsPolicy",
            "spec.dnsConfig.nameservers:",
            "spec.dnsConfig.nameservers[3]",
            "spec.dnsConfig.searches[1]",
            "spec.dnsConfig.options[0].name",
        ] {
            assert!(text.contains(field), "{field} missing from\n{text}");
        }
        let mut errors = Vec::new();
        PodDns::from_spec(
            &spec(json!({"containers": [], "dnsPolicy": "None"})),
            &mut errors,
        );
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("spec.dnsConfig.nameservers")),
            "{errors:?}"
        );
    }
}
