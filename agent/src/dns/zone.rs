//! The cluster zone: what a name under the cluster domain means, given the Services (and
//! EndpointSlices) the agent sees. Pure: the stores are memory the reflectors fill.
//!
//! Names follow the Kubernetes DNS specification (kubernetes/dns `docs/specification.md`):
//! `<svc>.<ns>.svc.<zone>` (A/AAAA of a ClusterIP, of each ready endpoint of a headless
//! Service, a CNAME for an ExternalName Service), `<hostname>.<svc>.<ns>.svc.<zone>` (a headless
//! Service's endpoint by hostname, or by its address with dashes) and
//! `_<port>._<proto>.<svc>.<ns>.svc.<zone>` (SRV).

use std::net::IpAddr;
use std::str::FromStr as _;

use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The TTL of every answer: short, as Services and endpoints come and go.
pub const TTL: u32 = 5;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the zone says about one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The records of the answer section (NOERROR).
    Records(Vec<Record>),
    /// The name exists without records of the type asked (NOERROR, empty; the SOA goes in
    /// the authority section).
    NoData,
    /// The name does not exist (NXDOMAIN).
    NxDomain,
}

/// The cluster zone (`cluster.local.` by default).
#[derive(Debug, Clone)]
pub struct Zone {
    origin: Name,
    soa: Record,
}

impl Zone {
    /// The zone of `domain` (`cluster.local`, with or without the final dot).
    pub fn new(domain: &str) -> Result<Self, hickory_proto::ProtoError> {
        let mut origin = Name::from_str(domain)?.to_lowercase();
        origin.set_fqdn(true);
        if origin.is_root() {
            return Err("the cluster domain may not be the root".into());
        }
        let soa = SOA::new(
            origin.prepend_label("ns.dns")?,
            origin.prepend_label("hostmaster")?,
            1,
            7200,
            1800,
            86400,
            TTL,
        );
        let soa = Record::from_rdata(origin.clone(), TTL, RData::SOA(soa));
        Ok(Self { origin, soa })
    }

    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The zone's SOA record (the authority section of negative answers).
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// Whether `name` is inside the zone (case-insensitive).
    pub fn contains(&self, name: &Name) -> bool {
        self.origin.zone_of(&name.to_lowercase())
    }

    /// The answer to `qtype` for `name` (inside the zone); records are named `name`.
    pub fn answer(
        &self,
        name: &Name,
        qtype: RecordType,
        services: &[impl AsRef<Service>],
        slices: &[impl AsRef<EndpointSlice>],
    ) -> Answer {
        let lower = name.to_lowercase();
        let depth = usize::from(lower.num_labels()) - usize::from(self.origin.num_labels());
        let labels: Vec<String> = lower
            .iter()
            .take(depth)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let find = |svc: &str, ns: &str| {
            services.iter().map(AsRef::as_ref).find(|s| {
                s.metadata.name.as_deref() == Some(svc)
                    && s.metadata.namespace.as_deref() == Some(ns)
            })
        };
        let slices_of = |svc: &str, ns: &str| -> Vec<&EndpointSlice> {
            slices
                .iter()
                .map(AsRef::as_ref)
                .filter(|e| {
                    e.metadata.namespace.as_deref() == Some(ns)
                        && e.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            .map(String::as_str)
                            == Some(svc)
                })
                .collect()
        };
        match labels.as_slice() {
            [] if qtype == RecordType::SOA => Answer::Records(vec![self.soa.clone()]),
            [] | ["svc"] => Answer::NoData,
            [ns, "svc"] => {
                if services
                    .iter()
                    .any(|s| s.as_ref().metadata.namespace.as_deref() == Some(*ns))
                {
                    Answer::NoData
                } else {
                    Answer::NxDomain
                }
            }
            [svc, ns, "svc"] => match find(svc, ns) {
                None => Answer::NxDomain,
                Some(service) => service_answer(name, qtype, service, &slices_of(svc, ns), None),
            },
            [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
                match find(svc, ns) {
                    None => Answer::NxDomain,
                    Some(service) => {
                        let target = match self
                            .origin
                            .prepend_label("svc")
                            .and_then(|n| n.prepend_label(*ns)?.prepend_label(*svc))
                        {
                            Ok(target) => target,
                            Err(_) => return Answer::NxDomain,
                        };
                        srv_answer(
                            name,
                            qtype,
                            service,
                            &slices_of(svc, ns),
                            &port[1..],
                            &proto[1..],
                            &target,
                        )
                    }
                }
            }
            [host, svc, ns, "svc"] => match find(svc, ns) {
                Some(service) if headless(service) => {
                    service_answer(name, qtype, service, &slices_of(svc, ns), Some(host))
                }
                _ => Answer::NxDomain,
            },
            _ => Answer::NxDomain,
        }
    }
}

fn headless(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// A ready endpoint of a headless Service: its addresses, hostname and the slice's ports.
struct Ready<'a> {
    address: IpAddr,
    hostname: Option<&'a str>,
    slice: &'a EndpointSlice,
}

/// Ready endpoints (a missing `ready` condition means ready, as the API documents).
fn ready_endpoints<'a>(slices: &[&'a EndpointSlice]) -> Vec<Ready<'a>> {
    let mut out = Vec::new();
    for slice in slices {
        for endpoint in &slice.endpoints {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(address) = address.parse() {
                    out.push(Ready {
                        address,
                        hostname: endpoint.hostname.as_deref(),
                        slice,
                    });
                }
            }
        }
    }
    out.sort_by_key(|r| r.address);
    out.dedup_by_key(|r| r.address);
    out
}

/// An endpoint's name under its Service: its hostname, or its address with dashes.
fn endpoint_label(ready: &Ready<'_>) -> String {
    ready
        .hostname
        .map(str::to_lowercase)
        .unwrap_or_else(|| ready.address.to_string().replace(['.', ':'], "-"))
}

/// Address records of a Service (of one endpoint when `host` names it).
fn service_answer(
    name: &Name,
    qtype: RecordType,
    service: &Service,
    slices: &[&EndpointSlice],
    host: Option<&str>,
) -> Answer {
    let spec = service.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") && host.is_none() {
        let target = spec
            .external_name
            .as_deref()
            .and_then(|n| Name::from_str(n).ok());
        return match target {
            Some(mut target)
                if matches!(
                    qtype,
                    RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::ANY
                ) =>
            {
                target.set_fqdn(true);
                Answer::Records(vec![Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::CNAME(CNAME(target)),
                )])
            }
            _ => Answer::NoData,
        };
    }
    let addresses: Vec<IpAddr> = if headless(service) {
        let ready = ready_endpoints(slices);
        if let Some(host) = host {
            let mine: Vec<IpAddr> = ready
                .iter()
                .filter(|r| endpoint_label(r) == host)
                .map(|r| r.address)
                .collect();
            if mine.is_empty() {
                return Answer::NxDomain;
            }
            mine
        } else {
            ready.iter().map(|r| r.address).collect()
        }
    } else {
        let ips = spec
            .cluster_ips
            .clone()
            .filter(|ips| !ips.is_empty())
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default();
        ips.iter().filter_map(|ip| ip.parse().ok()).collect()
    };
    let records: Vec<Record> = addresses
        .into_iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(v4))),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(v6))),
            _ => None,
        })
        .map(|data| Record::from_rdata(name.clone(), TTL, data))
        .collect();
    if records.is_empty() {
        Answer::NoData
    } else {
        Answer::Records(records)
    }
}

/// SRV records of a named port: the Service's name and port for a ClusterIP Service, each
/// ready endpoint's name and the slice's port for a headless one.
fn srv_answer(
    name: &Name,
    qtype: RecordType,
    service: &Service,
    slices: &[&EndpointSlice],
    port: &str,
    proto: &str,
    target: &Name,
) -> Answer {
    let matches = |n: Option<&str>, p: Option<&str>| {
        n.unwrap_or_default().eq_ignore_ascii_case(port)
            && p.unwrap_or("TCP").eq_ignore_ascii_case(proto)
    };
    let spec = service.spec.clone().unwrap_or_default();
    let Some(service_port) = spec
        .ports
        .iter()
        .flatten()
        .find(|p| matches(p.name.as_deref(), p.protocol.as_deref()))
    else {
        return Answer::NxDomain;
    };
    if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
        return Answer::NoData;
    }
    let srv = |port: i32, target: Name| {
        let port = u16::try_from(port).ok()?;
        Some(Record::from_rdata(
            name.clone(),
            TTL,
            RData::SRV(SRV::new(0, 100, port, target)),
        ))
    };
    let records: Vec<Record> = if headless(service) {
        ready_endpoints(slices)
            .iter()
            .filter_map(|r| {
                let port = r
                    .slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| matches(p.name.as_deref(), p.protocol.as_deref()))?
                    .port?;
                srv(port, target.prepend_label(endpoint_label(r)).ok()?)
            })
            .collect()
    } else {
        srv(service_port.port, target.clone()).into_iter().collect()
    };
    if records.is_empty() {
        Answer::NoData
    } else {
        Answer::Records(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("service")
    }

    fn ask(zone: &Zone, name: &str, qtype: RecordType, services: &[Service]) -> Answer {
        let name = Name::from_str(name).expect("name");
        assert!(zone.contains(&name), "{name} is in the zone");
        let services: Vec<std::sync::Arc<Service>> =
            services.iter().cloned().map(std::sync::Arc::new).collect();
        zone.answer(
            &name,
            qtype,
            &services,
            &[] as &[std::sync::Arc<EndpointSlice>],
        )
    }

    #[test]
    fn dual_stack_external_name_and_apex_answers() {
        let zone = Zone::new("Cluster.Local").expect("zone");
        assert_eq!(zone.origin().to_string(), "cluster.local.");
        assert!(!zone.contains(&Name::from_str("example.org.").expect("name")));
        assert!(!zone.contains(&Name::from_str("local.").expect("name")));
        assert!(Zone::new(".").is_err());
        let services = [
            service(json!({"metadata": {"name": "both", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"]}})),
            service(json!({"metadata": {"name": "ext", "namespace": "ns"},
                "spec": {"type": "ExternalName", "externalName": "db.example.org"}})),
            service(json!({"metadata": {"name": "pending", "namespace": "ns"}, "spec": {}})),
        ];
        let Answer::Records(a) = ask(
            &zone,
            "both.ns.svc.cluster.local.",
            RecordType::AAAA,
            &services,
        ) else {
            panic!("AAAA of a dual-stack Service");
        };
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].data, RData::AAAA(AAAA("fd00::1".parse().expect("v6"))));
        let Answer::Records(any) = ask(
            &zone,
            "both.ns.svc.cluster.local.",
            RecordType::ANY,
            &services,
        ) else {
            panic!("ANY");
        };
        assert_eq!(any.len(), 2);
        let Answer::Records(cname) =
            ask(&zone, "ext.ns.svc.cluster.local.", RecordType::A, &services)
        else {
            panic!("CNAME of an ExternalName Service");
        };
        assert_eq!(
            cname[0].data,
            RData::CNAME(CNAME(Name::from_str("db.example.org.").expect("name")))
        );
        // No ClusterIP yet: the name exists, without addresses.
        assert_eq!(
            ask(
                &zone,
                "pending.ns.svc.cluster.local.",
                RecordType::A,
                &services
            ),
            Answer::NoData
        );
        // SRV on an address name, MX on a Service: NODATA; the apex has its SOA.
        assert_eq!(
            ask(
                &zone,
                "both.ns.svc.cluster.local.",
                RecordType::MX,
                &services
            ),
            Answer::NoData
        );
        assert_eq!(
            ask(&zone, "cluster.local.", RecordType::SOA, &services),
            Answer::Records(vec![zone.soa().clone()])
        );
        assert_eq!(
            ask(&zone, "svc.cluster.local.", RecordType::A, &services),
            Answer::NoData
        );
        assert_eq!(
            ask(&zone, "x.svc.cluster.local.", RecordType::A, &services),
            Answer::NxDomain
        );
        // An endpoint name under a ClusterIP Service does not exist.
        assert_eq!(
            ask(
                &zone,
                "a.both.ns.svc.cluster.local.",
                RecordType::A,
                &services
            ),
            Answer::NxDomain
        );
    }
}
