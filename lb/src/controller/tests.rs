use std::sync::{Arc, Mutex};

use slipway_dataplane::abi::CounterValue;
use std::net::{Ipv4Addr, Ipv6Addr};

use slipway_dataplane::abi::lb::{LbAddr, LbConfig as ConfigValue, LbFlow, LbReason, LbStats};

use super::*;
use crate::announce::StaticLease;
use crate::config::{BackendSpec, LbConfig, PoolConfig};

/// The maps in memory, counting ring writes.
#[derive(Debug, Default)]
struct Fake {
    services: BTreeMap<(LbAddr, u16, u8), LbService>,
    backends: BTreeMap<u32, LbBackend>,
    rings: BTreeMap<u32, Vec<u32>>,
    ring_writes: usize,
    ranges: BTreeSet<(u32, IpNetwork)>,
    vips: BTreeSet<IpAddr>,
    flows: Vec<(LbFlowKey, LbFlow)>,
    removed_flows: Vec<LbFlowKey>,
    service_stats: BTreeMap<u32, LbStats>,
    backend_stats: BTreeMap<u32, LbStats>,
}

impl LbMaps for Fake {
    fn set_config(&mut self, _: ConfigValue) -> Result<(), LbError> {
        Ok(())
    }
    fn set_service(&mut self, key: LbServiceKey, value: LbService) -> Result<(), LbError> {
        self.services.insert((key.vip, key.port, key.proto), value);
        Ok(())
    }
    fn remove_service(&mut self, key: &LbServiceKey) -> Result<(), LbError> {
        self.services.remove(&(key.vip, key.port, key.proto));
        Ok(())
    }
    fn set_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), LbError> {
        self.backends.insert(id, backend);
        Ok(())
    }
    fn write_ring(&mut self, id: u32, slots: &[(u32, u32)]) -> Result<(), LbError> {
        let ring = self
            .rings
            .entry(id)
            .or_insert_with(|| vec![0; MAGLEV_SIZE as usize]);
        for (slot, backend) in slots {
            ring[*slot as usize] = *backend;
        }
        self.ring_writes += slots.len();
        Ok(())
    }
    fn add_source_range(&mut self, id: u32, net: IpNetwork) -> Result<(), LbError> {
        self.ranges.insert((id, net));
        Ok(())
    }
    fn remove_source_range(&mut self, id: u32, net: IpNetwork) -> Result<(), LbError> {
        self.ranges.remove(&(id, net));
        Ok(())
    }
    fn add_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        self.vips.insert(vip);
        Ok(())
    }
    fn remove_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        self.vips.remove(&vip);
        Ok(())
    }
    fn flows(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, LbError> {
        Ok(self.flows.clone())
    }
    fn remove_flow(&mut self, forward: &LbFlowKey, _: &LbFlowKey) -> Result<(), LbError> {
        self.removed_flows.push(*forward);
        Ok(())
    }
    fn backend_stats(&self, id: u32) -> Result<LbStats, LbError> {
        Ok(self.backend_stats.get(&id).copied().unwrap_or_default())
    }
    fn service_stats(&self, id: u32) -> Result<LbStats, LbError> {
        Ok(self.service_stats.get(&id).copied().unwrap_or_default())
    }
    fn counters(&self) -> Result<BTreeMap<LbReason, CounterValue>, LbError> {
        Ok(BTreeMap::new())
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<(), LbError> {
        self.service_stats.remove(&id);
        Ok(())
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), LbError> {
        self.backend_stats.remove(&id);
        Ok(())
    }
    fn service_keys(&self) -> Result<Vec<LbServiceKey>, LbError> {
        Ok(self
            .services
            .keys()
            .map(|(vip, port, proto)| LbServiceKey {
                vip: *vip,
                port: *port,
                proto: *proto,
                pad: 0,
            })
            .collect())
    }
    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, LbError> {
        Ok(self.ranges.iter().copied().collect())
    }
    fn backend_ids(&self) -> Result<Vec<u32>, LbError> {
        Ok(self
            .backends
            .iter()
            .filter(|(_, b)| **b != LbBackend::default())
            .map(|(id, _)| *id)
            .collect())
    }
    fn vips(&self) -> Result<Vec<IpAddr>, LbError> {
        Ok(self.vips.iter().copied().collect())
    }
    fn map_usage(&self) -> Result<Vec<crate::maps::MapUsage>, LbError> {
        Ok(Vec::new())
    }
}

fn controller() -> (Controller, Arc<Mutex<Fake>>) {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let pools = Pools::from_config(&LbConfig::new(
        "eth0",
        vec![
            PoolConfig {
                name: "p".into(),
                cidr: "10.99.100.0/24".into(),
            },
            PoolConfig {
                name: "p6".into(),
                cidr: "fd99:100::/120".into(),
            },
        ],
    ))
    .expect("pools");
    let c = Controller::new(
        Box::new(fake.clone()),
        pools,
        Announcer::new(Arc::new(StaticLease)),
    );
    (c, fake)
}

fn spec(backends: &[(u8, u32)]) -> ServiceSpec {
    let mut spec = ServiceSpec::tcp("default", "web", 80, &[]);
    spec.ports[0].target_port = 8080;
    spec.load_balancer_source_ranges = vec!["10.0.0.0/8".into()];
    spec.backends = backends
        .iter()
        .map(|(last, weight)| BackendSpec {
            ip: Ipv4Addr::new(10, 99, 0, *last).into(),
            weight: *weight,
            node_local: false,
        })
        .collect();
    spec
}

/// A client's TCP flow to the test service's VIP, port 80.
fn client_flow() -> LbFlowKey {
    LbFlowKey {
        src: Ipv4Addr::new(10, 99, 0, 1).into(),
        dst: Ipv4Addr::new(10, 99, 100, 1).into(),
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        pad: [0; 3],
    }
}

/// An open flow to backend `backend_id` of service 0, last seen at `last_seen_ns`.
fn open_flow(backend_id: u32, last_seen_ns: u64) -> LbFlow {
    LbFlow {
        backend_id,
        service_id: 0,
        nat_ip: LbAddr::NONE,
        nat_port: 0,
        state: FLOW_OPEN,
        pad: 0,
        pad2: 0,
        last_seen_ns,
    }
}

fn fake(f: &Arc<Mutex<Fake>>) -> std::sync::MutexGuard<'_, Fake> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn only_changed_slots_are_written_and_backend_ids_stay() {
    let (mut c, f) = controller();
    let applied = c.apply(spec(&[(3, 1), (4, 1), (5, 1)])).expect("apply");
    assert_eq!(applied.vip, IpAddr::V4(Ipv4Addr::new(10, 99, 100, 1)));
    assert_eq!(applied.taken_over, vec![applied.vip]);
    let (writes, ids) = {
        let f = fake(&f);
        (f.ring_writes, f.backends.clone())
    };
    assert_eq!(writes, MAGLEV_SIZE as usize, "a new ring is written whole");
    assert_eq!(ids.len(), 3);

    // Applying the same spec again writes nothing.
    c.apply(spec(&[(3, 1), (4, 1), (5, 1)])).expect("again");
    assert_eq!(fake(&f).ring_writes, writes);

    // A fourth backend takes about a quarter of the ring: only those slots are written,
    // and the existing backends keep their ids.
    let applied = c
        .apply(spec(&[(3, 1), (4, 1), (5, 1), (6, 1)]))
        .expect("add");
    assert!(
        applied.taken_over.is_empty(),
        "the VIP was announced already"
    );
    let f = fake(&f);
    let written = f.ring_writes - writes;
    let quarter = MAGLEV_SIZE as usize / 4;
    assert!(
        written >= quarter && written <= quarter + MAGLEV_SIZE as usize / 100,
        "{written}"
    );
    for (id, backend) in &ids {
        assert_eq!(f.backends.get(id), Some(backend));
    }
    let ring = &f.rings[&0];
    assert!(
        ring.iter()
            .all(|id| *id != 0 && f.backends.contains_key(id))
    );
    assert!(f.ranges.contains(&(0, "10.0.0.0/8".parse().expect("net"))));
    let service = f.services.values().next().expect("service");
    assert_eq!(service.flags, SERVICE_F_SOURCE_RANGES);
}

#[test]
fn drained_backends_keep_their_id_but_leave_the_ring_and_time_out() {
    let (mut c, f) = controller();
    let mut s = spec(&[(3, 1), (4, 0)]);
    s.drain_timeout_secs = Some(5);
    c.apply(s).expect("apply");
    let drained = LbBackend::new(Ipv4Addr::new(10, 99, 0, 4).into(), 8080);
    let id = {
        let f = fake(&f);
        let id = *f
            .backends
            .iter()
            .find(|(_, b)| **b == drained)
            .expect("id")
            .0;
        assert!(
            !f.rings[&0].contains(&id),
            "no slot for the drained backend"
        );
        id
    };
    let key = client_flow();
    fake(&f).flows.push((key, open_flow(id, 0)));
    c.tick(Instant::now()).expect("tick");
    assert!(fake(&f).removed_flows.is_empty(), "within the timeout");
    c.tick(Instant::now() + Duration::from_secs(6))
        .expect("tick");
    assert_eq!(fake(&f).removed_flows, vec![key], "ended at the timeout");
}

#[test]
fn unhealthy_backends_leave_the_ring_and_deleting_releases_everything() {
    let (mut c, f) = controller();
    let mut s = spec(&[(3, 1), (4, 1)]);
    s.health_check = Some(HealthCheckSpec {
        interval_ms: 100,
        timeout_ms: 50,
        rise: 1,
        fall: 2,
        port: None,
        http_path: None,
    });
    c.apply(s).expect("apply");
    assert_eq!(c.health_targets().len(), 2);
    assert_eq!(c.health_targets()[0].addr.port(), 8080);
    let down = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 4));
    assert_eq!(
        c.observe_health("default/web", down, false).expect("probe"),
        None
    );
    assert_eq!(
        c.observe_health("default/web", down, false).expect("probe"),
        Some(false)
    );
    {
        let f = fake(&f);
        let ids: BTreeSet<u32> = f.rings[&0].iter().copied().collect();
        assert_eq!(ids.len(), 1, "one backend left in the ring");
    }
    assert_eq!(
        c.observe_health("default/web", down, true).expect("probe"),
        Some(true)
    );
    assert_eq!(
        fake(&f).rings[&0]
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .len(),
        2
    );

    c.delete("default", "web").expect("delete");
    let f = fake(&f);
    assert!(f.services.is_empty() && f.vips.is_empty() && f.ranges.is_empty());
    assert!(f.backends.values().all(|b| *b == LbBackend::default()));
    assert!(matches!(
        c.delete("default", "web"),
        Err(LbError::NotFound(_))
    ));
}

#[test]
fn an_ipv6_service_gets_an_ipv6_vip_backends_and_ranges() {
    let (mut c, f) = controller();
    let b6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, last));
    let mut s = spec(&[]);
    s.backends = [3, 4, 5]
        .into_iter()
        .map(|last| BackendSpec {
            ip: b6(last),
            weight: 1,
            node_local: false,
        })
        .collect();
    s.load_balancer_source_ranges = vec!["fd99::/64".into()];
    let applied = c.apply(s.clone()).expect("apply");
    let vip: IpAddr = "fd99:100::1".parse().expect("vip");
    assert_eq!(applied.vip, vip, "the family follows the backends");
    assert_eq!(applied.taken_over, vec![vip]);
    {
        let f = fake(&f);
        let (key, service) = f.services.iter().next().expect("service");
        assert_eq!(key.0, LbAddr::from(vip));
        assert_eq!(service.flags, SERVICE_F_SOURCE_RANGES);
        let ips: BTreeSet<IpAddr> = f.backends.values().map(|b| b.ip.ip()).collect();
        assert_eq!(ips, [b6(3), b6(4), b6(5)].into_iter().collect());
        assert!(f.ranges.contains(&(0, "fd99::/64".parse().expect("net"))));
        assert!(f.vips.contains(&vip));
    }
    let targets = {
        let mut s = s.clone();
        s.health_check = Some(HealthCheckSpec {
            interval_ms: 100,
            timeout_ms: 50,
            rise: 1,
            fall: 1,
            port: None,
            http_path: None,
        });
        c.apply(s).expect("with checks");
        c.health_targets()
    };
    assert_eq!(
        targets[0].addr,
        SocketAddr::new(b6(3), 8080),
        "health checks probe the IPv6 backends"
    );

    // An IPv4 service beside it takes an IPv4 address; the status shows both.
    let mut v4 = spec(&[(3, 1)]);
    v4.name = "web4".into();
    assert_eq!(
        c.apply(v4).expect("v4").vip,
        IpAddr::V4(Ipv4Addr::new(10, 99, 100, 1))
    );
    let status = c.status(0).expect("status");
    assert_eq!(status.announced.len(), 2);
    assert!(status.services.iter().any(|s| s.vip == vip));
    assert_eq!(status.pools[1].used, 1);

    // A backend of the other family is rejected naming its field, and nothing changes.
    let mut mixed = s.clone();
    mixed.backends[1].ip = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 4));
    let err = c.apply(mixed).expect_err("mixed families");
    assert!(
        err.to_string()
            .contains("backends[1].ip: Invalid value: 10.99.0.4 is IPv4, the service is IPv6"),
        "{err}"
    );
    c.delete("default", "web").expect("delete");
    assert!(!fake(&f).vips.contains(&vip), "withdrawn");
}

fn backend_id_of(f: &Fake, ip: u8) -> Option<u32> {
    let wanted = LbBackend::new(Ipv4Addr::new(10, 99, 0, ip).into(), 8080);
    f.backends
        .iter()
        .find(|(_, b)| (b.ip, b.port) == (wanted.ip, wanted.port))
        .map(|(id, _)| *id)
}

#[test]
fn a_removed_backend_keeps_its_flows_until_they_end() {
    let (mut c, f) = controller();
    c.apply(spec(&[(3, 1), (4, 1), (5, 1)])).expect("apply");
    let id = backend_id_of(&fake(&f), 5).expect("backend 5");
    let key = client_flow();
    fake(&f).flows.push((key, open_flow(id, monotonic_ns())));
    assert_eq!(fake(&f).backends[&id].flags, BACKEND_F_ACTIVE);
    c.apply(spec(&[(3, 1), (4, 1)])).expect("remove 5");
    {
        let f = fake(&f);
        assert_eq!(backend_id_of(&f, 5), Some(id), "its flow keeps its backend");
        assert_eq!(f.backends[&id].flags, 0, "session affinity leaves it too");
        assert!(!f.rings[&0].contains(&id), "no new flows for it");
    }
    let row = |c: &Controller| {
        c.status(monotonic_ns()).expect("status").services[0]
            .backends
            .iter()
            .find(|b| b.ip == IpAddr::V4(Ipv4Addr::new(10, 99, 0, 5)))
            .map(|b| (b.state, b.active_flows))
    };
    assert_eq!(row(&c), Some((BackendState::Draining, 1)));
    let now = Instant::now();
    c.tick(now).expect("tick");
    assert_eq!(backend_id_of(&fake(&f), 5), Some(id), "still open");

    fake(&f).flows[0].1.state = slipway_dataplane::abi::lb::FLOW_CLOSING;
    c.tick(now + DRAIN_SCAN).expect("tick");
    assert_eq!(
        backend_id_of(&fake(&f), 5),
        None,
        "released once its flow ended"
    );
    assert_eq!(fake(&f).backends.get(&id), Some(&LbBackend::default()));
    assert_eq!(row(&c), None);
}

#[test]
fn a_restarted_controller_keeps_services_vips_and_ids_and_sweeps_the_rest() {
    let scratch = crate::state::tests::ScratchDir::new("restore");
    let dir = scratch.0.clone();
    let (c, f) = controller();
    let pools = c.book.pools.clone();
    drop(c);
    let restore = |f: &Arc<Mutex<Fake>>| {
        Controller::restore(
            Box::new(f.clone()),
            pools.clone(),
            Announcer::new(Arc::new(StaticLease)),
            Limits::default(),
            StateFile::new(&dir),
        )
        .expect("restore")
    };
    let (mut c, taken) = restore(&f);
    assert!(taken.is_empty());
    let mut web = spec(&[(3, 1), (4, 1), (5, 0)]);
    c.apply(web.clone()).expect("web");
    let mut api = spec(&[(6, 1)]);
    api.name = "api".into();
    c.delete("default", "web").expect("delete");
    let api_vip = c.apply(api).expect("api").vip;
    web.name = "web2".into();
    let web_vip = c.apply(web).expect("web2").vip;
    let (services, backends, vips) = {
        let f = fake(&f);
        (f.services.clone(), f.backends.clone(), f.vips.clone())
    };
    // What a crash between saving and writing leaves: entries nobody saved.
    {
        let mut f = fake(&f);
        let stale: IpAddr = Ipv4Addr::new(10, 99, 100, 77).into();
        f.services.insert(
            (stale.into(), 80u16.to_be(), 6),
            LbService {
                id: 9,
                flags: 0,
                affinity_timeout_s: 0,
                pad: 0,
            },
        );
        f.vips.insert(stale);
        f.backends.insert(99, LbBackend::new(stale, 80));
        f.ranges.insert((9, "10.0.0.0/8".parse().expect("net")));
    }
    let api_id = fake(&f)
        .services
        .iter()
        .find(|(k, _)| k.0 == LbAddr::from(api_vip))
        .map(|(_, v)| v.id)
        .expect("api's service id");
    let counted = LbStats {
        packets: 7,
        bytes: 700,
        flows: 1,
    };
    fake(&f).service_stats.insert(api_id, counted);
    drop(c); // killed: nothing runs on the way out

    let (mut c, taken) = restore(&f);
    assert_eq!(
        taken.into_iter().collect::<BTreeSet<_>>(),
        [api_vip, web_vip].into_iter().collect(),
        "announced again"
    );
    {
        let f = fake(&f);
        assert_eq!(
            f.services, services,
            "same keys and service ids; the stale one swept"
        );
        let set = |b: &BTreeMap<u32, LbBackend>| {
            b.iter()
                .filter(|(_, b)| **b != LbBackend::default())
                .map(|(id, b)| (*id, *b))
                .collect::<Vec<_>>()
        };
        assert_eq!(set(&f.backends), set(&backends), "same backend ids");
        assert_eq!(f.vips, vips);
        assert!(!f.ranges.iter().any(|(id, _)| *id == 9));
    }
    let status = c.status(0).expect("status");
    let names: Vec<&str> = status.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/api", "default/web2"]);
    assert_eq!(
        status.services[0].ports[0].packets, counted.packets,
        "counters survive a restart"
    );
    let mut new = spec(&[(7, 1)]);
    new.name = "new".into();
    let vip = c.apply(new).expect("new").vip;
    assert!(vip != api_vip && vip != web_vip, "{vip} was live");
    c.delete("default", "api")
        .expect("an old service is deleted");
    assert!(!fake(&f).vips.contains(&api_vip));
}

#[test]
fn a_removed_backend_that_fails_its_health_check_is_released() {
    let (mut c, f) = controller();
    let mut s = spec(&[(3, 1), (4, 1)]);
    s.health_check = Some(HealthCheckSpec {
        interval_ms: 100,
        timeout_ms: 50,
        rise: 1,
        fall: 2,
        port: None,
        http_path: None,
    });
    c.apply(s.clone()).expect("apply");
    let id = backend_id_of(&fake(&f), 4).expect("backend 4");
    fake(&f)
        .flows
        .push((client_flow(), open_flow(id, monotonic_ns())));
    s.backends.truncate(1);
    c.apply(s).expect("remove 4");
    let four = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 4));
    assert!(
        c.health_targets().iter().any(|t| t.ip == four),
        "a draining backend is still checked"
    );
    assert_eq!(backend_id_of(&fake(&f), 4), Some(id), "its flow keeps it");
    for _ in 0..2 {
        c.observe_health("default/web", four, false).expect("probe");
    }
    assert_eq!(backend_id_of(&fake(&f), 4), None, "dead: released");
    assert!(
        c.health_targets().iter().all(|t| t.ip != four),
        "and no longer checked"
    );
}

#[test]
fn a_service_beyond_the_sized_maps_is_refused_naming_the_flag_and_changes_nothing() {
    let (c, f) = controller();
    let pools = c.book.pools.clone();
    drop(c);
    let mut c = Controller::with_limits(
        Box::new(f.clone()),
        pools,
        Announcer::new(Arc::new(StaticLease)),
        Limits {
            services: 2,
            backends: 16,
        },
    );
    for name in ["a", "b"] {
        let mut s = spec(&[(3, 1)]);
        s.name = name.into();
        c.apply(s).expect("within the limit");
    }
    let before = fake(&f).services.len();
    let mut third = spec(&[(3, 1)]);
    third.name = "c".into();
    let err = c.apply(third).expect_err("a third service port");
    assert!(err.to_string().contains("--max-services"), "{err}");
    assert_eq!(fake(&f).services.len(), before);
    let status = c.status(0).expect("status");
    assert_eq!(status.services.len(), 2);
    assert_eq!(
        status.pools[0].used, 2,
        "no VIP taken for the refused service"
    );
}
