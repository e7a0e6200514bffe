use super::*;

fn fields(err: LbError) -> Vec<String> {
    match err {
        LbError::Invalid { errors, .. } => errors.into_iter().map(|e| e.field).collect(),
        other => panic!("not a validation error: {other}"),
    }
}

fn pools(cidrs: &[&str]) -> LbConfig {
    LbConfig::new(
        "eth0",
        cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| PoolConfig {
                name: format!("p{i}"),
                cidr: (*c).to_owned(),
            })
            .collect(),
    )
}

#[test]
fn a_pool_overlapping_the_egress_cidr_is_rejected() {
    let mut config = pools(&["10.99.100.0/24"]);
    config.validate().expect("valid alone");
    config.egress_cidrs = vec!["10.99.100.128/25".into()];
    let err = config.validate().expect_err("overlap");
    assert!(
        err.to_string()
            .contains("overlaps the egress CIDR 10.99.100.128/25"),
        "{err}"
    );
    assert_eq!(fields(err), ["pools[0].cidr"]);
}

#[test]
fn map_sizes_default_to_thousands_of_services_and_a_million_flows_and_are_checked() {
    let config: LbConfig = serde_json::from_str(
        r#"{"interface":"eth0","pools":[{"name":"p","cidr":"10.99.100.0/24"}]}"#,
    )
    .expect("parse");
    assert!(config.maps.services >= 4096 && config.maps.flows >= 1 << 20);
    config.validate().expect("defaults are valid");
    let mut bad = config.clone();
    bad.maps = MapSizes {
        services: 0,
        backends: 1,
        flows: 10,
    };
    assert_eq!(
        fields(bad.validate().expect_err("bad sizes")),
        ["maps.services", "maps.backends", "maps.flows"]
    );
    let sized: LbConfig = serde_json::from_str(
        r#"{"interface":"eth0","pools":[{"name":"p","cidr":"10.99.100.0/24"}],
            "maps":{"flows":4000000}}"#,
    )
    .expect("parse");
    assert_eq!(sized.maps.flows, 4_000_000);
    assert_eq!(
        sized.maps.services, config.maps.services,
        "the rest defaults"
    );
}

#[test]
fn session_affinity_follows_the_kubernetes_fields_and_limits() {
    let base = r#"{"namespace":"default","name":"web","ports":[{"port":80}],"backends":[]"#;
    let parse = |extra: &str| serde_json::from_str::<ServiceSpec>(&format!("{base}{extra}}}"));
    let none = parse("").expect("no affinity");
    assert_eq!(none.affinity_timeout_secs(), None);
    let client = parse(r#","sessionAffinity":"ClientIP""#).expect("ClientIP");
    client.validate().expect("valid");
    assert_eq!(
        client.affinity_timeout_secs(),
        Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
    );
    let timed = parse(
        r#","sessionAffinity":"ClientIP",
           "sessionAffinityConfig":{"clientIP":{"timeoutSeconds":30}}"#,
    )
    .expect("timeout");
    assert_eq!(timed.affinity_timeout_secs(), Some(30));
    assert!(parse(r#","sessionAffinity":"Cookie""#).is_err());
    let mut bad = timed.clone();
    if let Some(c) = bad
        .session_affinity_config
        .as_mut()
        .and_then(|c| c.client_ip.as_mut())
    {
        c.timeout_seconds = Some(0);
    }
    assert_eq!(
        fields(bad.validate().expect_err("0 s")),
        ["sessionAffinityConfig.clientIP.timeoutSeconds"]
    );
    bad.session_affinity = SessionAffinity::None;
    assert_eq!(
        fields(bad.validate().expect_err("config without affinity")),
        ["sessionAffinityConfig"]
    );
}

#[test]
fn a_pool_below_the_minimum_prefix_is_rejected() {
    let mut config = pools(&["10.99.100.0/28", "10.99.101.0/27"]);
    config.validate().expect("no minimum asked");
    config.min_pool_prefix = Some(27);
    let err = config.validate().expect_err("/28 < /27");
    assert!(
        err.to_string().contains("smaller than the /27 minimum"),
        "{err}"
    );
    assert_eq!(fields(err), ["pools[0].cidr"]);
}

#[test]
fn every_bad_field_is_reported_at_once() {
    let mut config = pools(&["10.0.0.0/33", "10.1.0.1/24", "10.2.0.0/16", "10.2.1.0/24"]);
    config.interface = String::new();
    config.egress_cidrs = vec!["nonsense".into()];
    assert_eq!(
        fields(config.validate().expect_err("bad")),
        [
            "interface",
            "egressCidrs[0]",
            "pools[0].cidr",
            "pools[1].cidr",
            "pools[3].cidr"
        ]
    );
}

#[test]
fn service_json_rejects_unknown_fields_and_validates() {
    let good = r#"{"namespace":"default","name":"web","ports":[{"port":80}],
        "backends":[{"ip":"10.99.0.3"},{"ip":"10.99.0.4","weight":2}],
        "healthCheck":{"intervalMs":200,"timeoutMs":100,"rise":1,"fall":2}}"#;
    let spec: ServiceSpec = serde_json::from_str(good).expect("parse");
    spec.validate().expect("valid");
    assert_eq!(spec.health_port(), Some(80));
    assert_eq!(spec.backends[0].weight, 1);
    assert_eq!(spec.external_traffic_policy, TrafficPolicy::Cluster);

    let unknown = good.replace("\"name\":\"web\"", "\"name\":\"web\",\"colour\":\"red\"");
    assert!(serde_json::from_str::<ServiceSpec>(&unknown).is_err());

    let mut bad = spec.clone();
    bad.name = "Web!".into();
    bad.ports.push(ServicePort {
        name: None,
        protocol: Protocol::Tcp,
        port: 80,
        target_port: 0,
    });
    bad.load_balancer_source_ranges = vec!["10.0.0.1/8".into(), "x".into()];
    bad.backends.push(BackendSpec {
        ip: "10.99.0.3".parse().expect("ip"),
        weight: 5000,
        node_local: false,
    });
    if let Some(check) = bad.health_check.as_mut() {
        check.fall = 0;
        check.http_path = Some("no-slash".into());
    }
    assert_eq!(
        fields(bad.validate().expect_err("bad")),
        [
            "name",
            "ports[1]",
            "loadBalancerSourceRanges[0]",
            "loadBalancerSourceRanges[1]",
            "backends[2].ip",
            "backends[2].weight",
            "healthCheck.fall",
            "healthCheck.httpPath"
        ]
    );
}

#[test]
fn ipv6_pools_are_checked_like_ipv4_ones_and_errors_name_the_field() {
    let mut config = pools(&[
        "fd99:100::/120",
        "fd99:101::1/120",
        "fd99:100::80/121",
        "fe80::/64",
        "ff05::/64",
        "::ffff:10.0.0.0/120",
        "fd99:zz::/64",
        "10.99.100.0/24",
    ]);
    config.egress_cidrs = vec!["fd99:100::/124".into(), "10.99.100.0/24".into()];
    let err = config.validate().expect_err("bad pools");
    let text = err.to_string();
    for needle in [
        "pools[0].cidr: Invalid value: fd99:100::/120 overlaps the egress CIDR fd99:100::/124",
        "pools[1].cidr: Invalid value: fd99:101::1/120 has host bits set (network is fd99:101::)",
        "pools[2].cidr: Invalid value: fd99:100::80/121 overlaps pools[0] (fd99:100::/120)",
        "pools[3].cidr: Invalid value: fe80::/64: link-local addresses (fe80::/10) cannot be VIPs",
        "pools[4].cidr: Invalid value: ff05::/64: multicast addresses cannot be VIPs",
        "pools[5].cidr: Invalid value: ::ffff:10.0.0.0/120: IPv4-mapped addresses (::ffff:0:0/96) are IPv4",
        "pools[6].cidr: Invalid value: \"fd99:zz::/64\"",
        "pools[7].cidr: Invalid value: 10.99.100.0/24 overlaps the egress CIDR 10.99.100.0/24",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert_eq!(
        fields(err),
        [
            "pools[0].cidr",
            "pools[1].cidr",
            "pools[2].cidr",
            "pools[3].cidr",
            "pools[4].cidr",
            "pools[5].cidr",
            "pools[6].cidr",
            "pools[7].cidr"
        ]
    );

    // Families never overlap each other; both kinds of pool side by side are fine.
    let mut config = pools(&["10.99.100.0/24", "fd99:100::/120"]);
    config.egress_cidrs = vec!["fd99:200::/64".into(), "10.99.0.0/24".into()];
    config.validate().expect("dual-stack pools");
}

#[test]
fn the_minimum_pool_size_holds_for_ipv6_as_an_address_count() {
    let mut config = pools(&["fd99:100::/123", "fd99:200::/124"]);
    config.min_pool_prefix = Some(27);
    let err = config.validate().expect_err("/124 holds 16 addresses");
    assert!(
        err.to_string()
            .contains("fd99:200::/124 is smaller than the /123 minimum (minPoolPrefix 27)"),
        "{err}"
    );
    assert_eq!(fields(err), ["pools[1].cidr"]);
}

fn spec6() -> ServiceSpec {
    serde_json::from_str(
        r#"{"namespace":"default","name":"web6","ports":[{"port":80}],
            "ipFamilies":["IPv6"],"loadBalancerIP":"fd99:100::7",
            "loadBalancerSourceRanges":["fd99::/64"],
            "backends":[{"ip":"fd99::3"},{"ip":"fd99::4","weight":2}]}"#,
    )
    .expect("parse")
}

#[test]
fn an_ipv6_service_validates_and_names_every_field_of_the_wrong_family() {
    let good = spec6();
    good.validate().expect("valid");
    assert_eq!(good.family(), IpFamily::Ipv6);
    assert_eq!(
        good.source_ranges(),
        ["fd99::/64".parse::<IpNetwork>().expect("net")]
    );
    let old_spelling = r#"{"namespace":"a","name":"b","ports":[{"port":80}],
        "loadBalancerIp":"fd99:100::7","backends":[]}"#;
    let old: ServiceSpec = serde_json::from_str(old_spelling).expect("loadBalancerIp");
    assert_eq!(old.load_balancer_ip, good.load_balancer_ip);
    assert!(
        serde_json::to_string(&old)
            .expect("json")
            .contains("\"loadBalancerIP\":\"fd99:100::7\""),
        "written as Kubernetes spells it"
    );
    let mut inferred = good.clone();
    inferred.ip_families.clear();
    inferred.load_balancer_ip = None;
    assert_eq!(inferred.family(), IpFamily::Ipv6, "from the backends");
    inferred.backends.clear();
    assert_eq!(inferred.family(), IpFamily::Ipv4, "the default");
    assert!(
        serde_json::from_str::<ServiceSpec>(
            &serde_json::to_string(&good)
                .expect("json")
                .replace("IPv6", "IPv7")
        )
        .is_err(),
        "an unknown family is a parse error"
    );

    let mut bad = good.clone();
    bad.ip_families = vec![IpFamily::Ipv6, IpFamily::Ipv4];
    bad.load_balancer_source_ranges = vec!["10.0.0.0/8".into(), "fd99::1/64".into()];
    bad.backends.push(BackendSpec {
        ip: "10.99.0.5".parse().expect("ip"),
        weight: 1,
        node_local: false,
    });
    bad.backends.push(BackendSpec {
        ip: "ff02::1".parse().expect("ip"),
        weight: 1,
        node_local: false,
    });
    let err = bad.validate().expect_err("bad");
    let text = err.to_string();
    for needle in [
        "ipFamilies: Invalid value: one family only",
        "loadBalancerSourceRanges[0]: Invalid value: 10.0.0.0/8 is IPv4, the service is IPv6",
        "loadBalancerSourceRanges[1]: Invalid value: fd99::1/64 has host bits set",
        "backends[2].ip: Invalid value: 10.99.0.5 is IPv4, the service is IPv6",
        "backends[3].ip: Invalid value: ff02::1 is no host",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert_eq!(
        fields(err),
        [
            "ipFamilies",
            "loadBalancerSourceRanges[0]",
            "loadBalancerSourceRanges[1]",
            "backends[2].ip",
            "backends[3].ip"
        ]
    );

    for (ip, problem) in [
        (
            "fe80::1",
            "fe80::1: link-local addresses (fe80::/10) cannot be VIPs",
        ),
        ("ff02::1", "ff02::1: multicast addresses cannot be VIPs"),
        ("::", ":: loopback and unspecified addresses cannot be VIPs"),
        (
            "::ffff:10.99.100.1",
            "IPv4-mapped addresses (::ffff:0:0/96) are IPv4",
        ),
        ("10.99.100.1", "10.99.100.1 is IPv4, the service is IPv6"),
    ] {
        let mut bad = good.clone();
        bad.load_balancer_ip = Some(ip.parse().expect("ip"));
        let err = bad.validate().expect_err(ip);
        assert!(err.to_string().contains(problem), "{ip}: {err}");
        assert_eq!(fields(err), ["loadBalancerIP"], "{ip}");
    }
}
