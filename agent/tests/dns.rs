//! The node's cluster DNS server on loopback: stores filled by hand (as the reflectors fill
//! them), queried with hickory's client over UDP and TCP; names outside the zone forwarded to a
//! fake upstream on loopback (never the internet); and the reflectors over a real API server
//! (`slipway supervisor`). Unprivileged.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_net::client::{Client, ClientHandle as _};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::Event;
use serde_json::json;
use slipway_agent::dns::{DnsConfig, DnsServer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

fn service(value: serde_json::Value) -> Service {
    serde_json::from_value(value).expect("service")
}

fn web() -> Service {
    service(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
}

/// A headless Service with two ready endpoints (one named by hostname) and one not ready.
fn db() -> (Service, EndpointSlice) {
    let svc = service(json!({
        "metadata": {"name": "db", "namespace": "apps"},
        "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
    }));
    let slice = serde_json::from_value(json!({
        "metadata": {"name": "db-abc", "namespace": "apps",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.6"]},
            {"addresses": ["10.244.2.7"], "conditions": {"ready": false}},
        ]
    }))
    .expect("slice");
    (svc, slice)
}

/// Stores listed once (ready), as a reflector leaves them after its first list.
fn listed<K>(writer: &mut Writer<K>, objects: Vec<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&Event::Init);
    for o in objects {
        writer.apply_watcher_event(&Event::InitApply(o));
    }
    writer.apply_watcher_event(&Event::InitDone);
}

/// A fake upstream nameserver: answers every A question with 192.0.2.7, or stays silent.
struct Upstream {
    addr: SocketAddr,
    asked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(silent: bool) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("upstream socket");
        let addr = socket.local_addr().expect("upstream addr");
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                if silent {
                    continue;
                }
                let Ok(question) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut answer =
                    Message::new(question.metadata.id, MessageType::Response, OpCode::Query);
                answer.metadata.recursion_available = true;
                answer.metadata.recursion_desired = question.metadata.recursion_desired;
                for q in &question.queries {
                    answer.add_query(q.clone());
                    answer.add_answer(Record::from_rdata(
                        q.name().clone(),
                        300,
                        RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
                    ));
                }
                let bytes = answer.to_vec().expect("encode");
                let _ = socket.send_to(&bytes, from).await;
            }
        });
        Self { addr, asked, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Fixture {
    server: DnsServer,
    services: Writer<Service>,
    _slices: Writer<EndpointSlice>,
}

async fn fixture(upstreams: Vec<SocketAddr>) -> Fixture {
    let (services_store, mut services) = reflector::store();
    let (slices_store, mut slices) = reflector::store();
    let (db, db_slice) = db();
    listed(&mut services, vec![web(), db]);
    listed(&mut slices, vec![db_slice]);
    let server = DnsServer::start(
        DnsConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            domain: "cluster.local".into(),
            upstreams,
            forward_timeout: Duration::from_millis(300),
        },
        services_store,
        Some(slices_store),
    )
    .await
    .expect("dns server");
    Fixture {
        server,
        services,
        _slices: slices,
    }
}

async fn udp_client(addr: SocketAddr) -> Client<TokioRuntimeProvider> {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::new())
        .with_timeout(Some(Duration::from_secs(5)))
        .build();
    let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(bg);
    client
}

async fn tcp_client(addr: SocketAddr) -> Client<TokioRuntimeProvider> {
    let (stream, handle) = TcpClientStream::new(
        addr,
        None,
        Some(Duration::from_secs(5)),
        TokioRuntimeProvider::new(),
    );
    let stream = stream.await.expect("tcp connect");
    let (client, bg) = Client::<TokioRuntimeProvider>::new(stream, handle);
    tokio::spawn(bg);
    client
}

async fn ask(client: &mut Client<TokioRuntimeProvider>, name: &str, qtype: RecordType) -> Message {
    let response = client
        .query(Name::from_str(name).expect("name"), DNSClass::IN, qtype)
        .await
        .unwrap_or_else(|e| panic!("{name} {qtype}: {e}"));
    (*response).clone()
}

fn addresses(m: &Message) -> Vec<String> {
    let mut out: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn srv(m: &Message) -> Vec<(u16, String)> {
    let mut out: Vec<(u16, String)> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_string())),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn cluster_ip_services_are_answered_over_udp_and_tcp() {
    let f = fixture(Vec::new()).await;
    let addr = f.server.local_addr();
    let mut udp = udp_client(addr).await;
    let mut tcp = tcp_client(addr).await;
    for client in [&mut udp, &mut tcp] {
        let m = ask(client, "web.default.svc.cluster.local.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative, "{m:?}");
        assert_eq!(addresses(&m), ["10.96.0.10"]);
        assert_eq!(m.answers[0].ttl, 5);
        // Names are case-insensitive.
        let m = ask(client, "WEB.Default.svc.Cluster.Local.", RecordType::A).await;
        assert_eq!(addresses(&m), ["10.96.0.10"]);
    }
    // A v4-only Service has no AAAA: NODATA (NOERROR, no answer, the zone's SOA).
    let m = ask(&mut udp, "web.default.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty(), "{m:?}");
    assert!(
        m.authorities
            .iter()
            .any(|r| r.record_type() == RecordType::SOA),
        "{m:?}"
    );
    // SRV of a named port.
    let m = ask(
        &mut udp,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(srv(&m), [(80, "web.default.svc.cluster.local.".to_owned())]);
    // Unknown names inside the zone: NXDOMAIN; a namespace with Services: NODATA.
    for name in [
        "nope.default.svc.cluster.local.",
        "web.other.svc.cluster.local.",
        "_nope._tcp.web.default.svc.cluster.local.",
        "a.b.c.d.e.f.cluster.local.",
        "web.default.pod.cluster.local.",
    ] {
        let m = ask(&mut udp, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty(), "{name}");
    }
    let m = ask(&mut udp, "default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let metrics = f.server.render_metrics();
    assert!(
        metrics.contains(r#"slipway_dns_queries_total{source="cluster",rcode="NXDOMAIN"} 5"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"slipway_dns_queries_total{source="cluster",rcode="NOERROR"} 7"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn headless_services_answer_their_ready_endpoints() {
    let f = fixture(Vec::new()).await;
    let mut udp = udp_client(f.server.local_addr()).await;
    let m = ask(&mut udp, "db.apps.svc.cluster.local.", RecordType::A).await;
    assert_eq!(addresses(&m), ["10.244.1.5", "10.244.2.6"]);
    // An endpoint by hostname, one without by its address with dashes.
    let m = ask(&mut udp, "db-0.db.apps.svc.cluster.local.", RecordType::A).await;
    assert_eq!(addresses(&m), ["10.244.1.5"]);
    let m = ask(
        &mut udp,
        "10-244-2-6.db.apps.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(addresses(&m), ["10.244.2.6"]);
    let m = ask(
        &mut udp,
        "10-244-2-7.db.apps.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // SRV: each ready endpoint by name, with the endpoints' port.
    let m = ask(
        &mut udp,
        "_pg._tcp.db.apps.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(
        srv(&m),
        [
            (15432, "10-244-2-6.db.apps.svc.cluster.local.".to_owned()),
            (15432, "db-0.db.apps.svc.cluster.local.".to_owned()),
        ]
    );
}

#[tokio::test]
async fn the_answers_follow_the_store() {
    let mut f = fixture(Vec::new()).await;
    let mut udp = udp_client(f.server.local_addr()).await;
    let name = "api.default.svc.cluster.local.";
    let m = ask(&mut udp, name, RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let api = service(json!({
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.20"}
    }));
    f.services.apply_watcher_event(&Event::Apply(api.clone()));
    let m = ask(&mut udp, name, RecordType::A).await;
    assert_eq!(addresses(&m), ["10.96.0.20"]);
    f.services.apply_watcher_event(&Event::Delete(api));
    let m = ask(&mut udp, name, RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn until_the_first_list_the_zone_answers_servfail() {
    let (services, _writer) = reflector::store::<Service>();
    let server = DnsServer::start(
        DnsConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            domain: "cluster.local".into(),
            upstreams: Vec::new(),
            forward_timeout: Duration::from_millis(100),
        },
        services,
        None,
    )
    .await
    .expect("dns server");
    let mut udp = udp_client(server.local_addr()).await;
    let m = ask(&mut udp, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn other_names_are_forwarded_and_a_silent_upstream_gets_servfail() {
    let upstream = Upstream::start(false).await;
    let f = fixture(vec![upstream.addr]).await;
    let mut udp = udp_client(f.server.local_addr()).await;
    let m = ask(&mut udp, "example.org.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&m), ["192.0.2.7"]);
    assert!(!m.metadata.authoritative);
    assert_eq!(upstream.asked.load(Ordering::SeqCst), 1);
    // Cluster names never leave the node.
    ask(&mut udp, "nope.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(upstream.asked.load(Ordering::SeqCst), 1);

    // A silent first upstream is skipped after its timeout; two silent ones: SERVFAIL.
    let silent = Upstream::start(true).await;
    let f = fixture(vec![silent.addr, upstream.addr]).await;
    let mut udp = udp_client(f.server.local_addr()).await;
    let m = ask(&mut udp, "example.net.", RecordType::A).await;
    assert_eq!(addresses(&m), ["192.0.2.7"]);
    assert_eq!(silent.asked.load(Ordering::SeqCst), 1);
    let silent2 = Upstream::start(true).await;
    let f = fixture(vec![silent.addr, silent2.addr]).await;
    let mut udp = udp_client(f.server.local_addr()).await;
    let started = Instant::now();
    let m = ask(&mut udp, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(silent2.asked.load(Ordering::SeqCst), 1);
    let metrics = f.server.render_metrics();
    assert!(
        metrics.contains(r#"slipway_dns_queries_total{source="forwarded",rcode="SERVFAIL"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn malformed_packets_do_not_kill_the_server() {
    let f = fixture(Vec::new()).await;
    let addr = f.server.local_addr();
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("socket");
    // Too short for a header; a header that promises a question the packet lacks; a question
    // whose name's label runs past the end; random bytes.
    let header_only = [0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    let mut bad_label = header_only.to_vec();
    bad_label.extend_from_slice(&[0x3f, b'a', b'b']);
    let garbage: Vec<u8> = (0..300u32).map(|i| (i * 131 % 251) as u8).collect();
    for packet in [&b"\x01\x02\x03"[..], &header_only, &bad_label, &garbage] {
        socket.send_to(packet, addr).await.expect("send");
    }
    // Over TCP: a length that promises more than comes, then the connection closes.
    let mut tcp = TcpStream::connect(addr).await.expect("tcp");
    tcp.write_all(&[0x00, 0x40, 0x12, 0x34])
        .await
        .expect("write");
    drop(tcp);
    // A FORMERR for the one with a readable header, and the server still answers.
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .expect("a FORMERR for the header-only query")
            .expect("recv");
        if let Ok(answer) = Message::from_vec(&buf[..n])
            && answer.metadata.id == 0x1234
        {
            assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
            break;
        }
    }
    let mut query = Message::new(0x4242, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(
        Name::from_str("web.default.svc.cluster.local.").expect("name"),
        RecordType::A,
    ));
    let bytes = query.to_vec().expect("encode");
    let mut tcp = TcpStream::connect(addr).await.expect("tcp");
    let len = u16::try_from(bytes.len()).expect("len");
    tcp.write_all(&len.to_be_bytes()).await.expect("write");
    tcp.write_all(&bytes).await.expect("write");
    let len = tcp.read_u16().await.expect("length");
    let mut buf = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut buf).await.expect("answer");
    let answer = Message::from_vec(&buf).expect("answer");
    assert_eq!(answer.metadata.id, 0x4242);
    assert_eq!(addresses(&answer), ["10.96.0.10"]);
    let mut udp = udp_client(addr).await;
    let m = ask(&mut udp, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(addresses(&m), ["10.96.0.10"]);
}

#[tokio::test]
async fn the_reflectors_feed_the_server_from_a_real_api() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, DeleteParams, PostParams};

    let sup = common::Supervisor::start("dns");
    let client = sup.admin().await;
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "apps"}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create the namespace");
    let services: Api<Service> = Api::namespaced(client.clone(), "apps");
    let web = services
        .create(
            &PostParams::default(),
            &service(json!({"metadata": {"name": "web", "namespace": "apps"},
                "spec": {"ports": [{"name": "http", "port": 80}]}})),
        )
        .await
        .expect("create web");
    let cluster_ip = web
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP allocated");
    let (db, slice) = db();
    let mut db = db;
    db.metadata.namespace = Some("apps".into());
    services
        .create(&PostParams::default(), &db)
        .await
        .expect("create db");
    let mut slice = slice;
    slice.metadata.namespace = Some("apps".into());
    Api::<EndpointSlice>::namespaced(client.clone(), "apps")
        .create(&PostParams::default(), &slice)
        .await
        .expect("create the EndpointSlice");

    let watch = slipway_agent::feed::ClusterWatch::start(&client);
    let (services_store, slices_store) = (watch.services(), watch.endpoint_slices());
    let server = DnsServer::start(
        DnsConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            domain: "cluster.local".into(),
            upstreams: Vec::new(),
            forward_timeout: Duration::from_millis(100),
        },
        services_store,
        Some(slices_store),
    )
    .await
    .expect("dns server");
    let udp = udp_client(server.local_addr()).await;
    let answer = |name: &'static str| {
        let mut udp = udp.clone();
        async move { ask(&mut udp, name, RecordType::A).await }
    };
    common::wait_for(
        "web's ClusterIP in DNS",
        Duration::from_secs(20),
        || async {
            let m = answer("web.apps.svc.cluster.local.").await;
            (addresses(&m) == [cluster_ip.clone()]).then_some(())
        },
    )
    .await;
    common::wait_for("db's endpoints in DNS", Duration::from_secs(20), || async {
        let m = answer("db.apps.svc.cluster.local.").await;
        (addresses(&m) == ["10.244.1.5", "10.244.2.6"]).then_some(())
    })
    .await;
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete web");
    common::wait_for("web gone from DNS", Duration::from_secs(20), || async {
        let m = answer("web.apps.svc.cluster.local.").await;
        (m.metadata.response_code == ResponseCode::NXDomain).then_some(())
    })
    .await;
    drop(watch);
}
