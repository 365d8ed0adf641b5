//! The node proxy in-process, on 127.0.0.x addresses (no root, no eBPF): a fake capture layer
//! answers the original destination, two proxies play two nodes, echo servers play pods.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use mesh_node::{
    identity::{manager::testing::TestCa, Identity},
    metrics::Metrics,
    model::{
        Endpoint, Namespace, Node, ObjectKey, OriginalDst, Pod, Protocol, Service,
        ServiceEndpoints, ServicePort, Snapshot, Store, TargetPort,
    },
    proxy::{
        hbone::{Caller, HbonePool},
        Addresses, Proxy, ProxyConfig, TunnelError,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

const PROXY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const NODE_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const PRODUCTPAGE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const REVIEWS_V1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
const REVIEWS_V2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 12);
const DETAILS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 13);
const RATINGS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 21);
const REVIEWS_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 9080);
const BROKEN_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 9080);
const TIMEOUT: Duration = Duration::from_secs(10);

/// The capture layer: client address → dialled address.
#[derive(Default)]
struct FakeOriginalDst(Mutex<HashMap<SocketAddrV4, SocketAddrV4>>);

impl OriginalDst for FakeOriginalDst {
    fn lookup(
        &self,
        _socket: std::os::fd::BorrowedFd<'_>,
        client: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        self.0.lock().unwrap().get(&client).copied()
    }
}

/// A pod's server: echoes every byte and closes its write side at end of stream.
struct Backend {
    addr: SocketAddrV4,
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Backend {
    async fn echo(ip: Ipv4Addr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (a, p) = (accepted.clone(), peers.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, peer) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                p.lock().unwrap().push(peer);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            peers,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn pod(name: &str, ip: Ipv4Addr, node: &str, app: &str, version: &str) -> Pod {
    Pod {
        key: ObjectKey::new("default", name),
        uid: None,
        labels: BTreeMap::from([
            ("app".to_string(), app.to_string()),
            ("version".to_string(), version.to_string()),
        ]),
        annotations: BTreeMap::new(),
        node: Some(node.into()),
        ip: Some(ip),
        service_account: format!("bookinfo-{app}").into(),
        ports: vec![],
        controller: None,
    }
}

fn service(name: &str, vip: SocketAddrV4, endpoints: Vec<Endpoint>) -> (Service, ServiceEndpoints) {
    (
        Service {
            key: ObjectKey::new("default", name),
            cluster_ip: Some(*vip.ip()),
            ports: vec![ServicePort {
                name: Some("tcp".into()),
                port: vip.port(),
                target_port: TargetPort::Name("tcp".into()),
                protocol: Protocol::Tcp,
                app_protocol: None,
            }],
            selector: None,
            entry: None,
        },
        ServiceEndpoints {
            by_port: BTreeMap::from([(vip.port(), endpoints)]),
        },
    )
}

fn endpoint(pod: &Pod, port: u16) -> Endpoint {
    Endpoint {
        ip: pod.ip.unwrap(),
        port,
        pod: Some(pod.key.clone()),
        node: pod.node.clone(),
        ready: true,
    }
}

struct NodeProxy {
    addresses: Addresses,
    metrics: Arc<Metrics>,
    applied: Arc<AtomicU64>,
}

impl NodeProxy {
    async fn start(
        node: &str,
        ip: Ipv4Addr,
        peer_tunnel_port: u16,
        store: &Store,
        original_dst: Arc<dyn OriginalDst>,
        ca: &TestCa,
        ttl: Duration,
    ) -> Self {
        let any = SocketAddr::from((ip, 0));
        let mut config = ProxyConfig::new(node, PROXY_IP);
        config.certs = Some(ca.certs_with_ttl(ttl));
        config.outbound_addr = any;
        config.inbound_addr = any;
        config.tunnel_addr = any;
        config.peer_tunnel_port = peer_tunnel_port;
        config.connect_timeout = Duration::from_secs(2);
        let metrics = Arc::new(Metrics::new());
        let applied = Arc::new(AtomicU64::new(0));
        let proxy = Proxy::bind(
            config,
            store.subscribe(),
            original_dst,
            &metrics,
            applied.clone(),
        )
        .await
        .expect("listeners bind on 127.0.0.x");
        let addresses = proxy.addresses();
        tokio::spawn(proxy.run(std::future::pending()));
        Self {
            addresses,
            metrics,
            applied,
        }
    }
}

/// Two nodes: A (productpage, reviews v1/v2, details) and B (ratings).
struct Mesh {
    ca: TestCa,
    store: Store,
    capture: Arc<FakeOriginalDst>,
    a: NodeProxy,
    b: NodeProxy,
    reviews_v1: Backend,
    reviews_v2: Backend,
    details: Backend,
    ratings: Backend,
}

impl Mesh {
    async fn start() -> Self {
        Self::start_with_ttl(Duration::from_secs(3600)).await
    }

    /// The mesh with workload certificates living `ttl`.
    async fn start_with_ttl(ttl: Duration) -> Self {
        let reviews_v1 = Backend::echo(REVIEWS_V1).await;
        let reviews_v2 = Backend::echo(REVIEWS_V2).await;
        let details = Backend::echo(DETAILS).await;
        let ratings = Backend::echo(RATINGS).await;

        let productpage_pod = pod(
            "productpage-v1-1",
            PRODUCTPAGE,
            "node-a",
            "productpage",
            "v1",
        );
        let v1 = pod("reviews-v1-1", REVIEWS_V1, "node-a", "reviews", "v1");
        let v2 = pod("reviews-v2-1", REVIEWS_V2, "node-a", "reviews", "v2");
        let details_pod = pod("details-v1-1", DETAILS, "node-a", "details", "v1");
        let ratings_pod = pod("ratings-v1-1", RATINGS, "node-b", "ratings", "v1");

        let mut snapshot = Snapshot::default();
        snapshot.namespaces.insert(
            "default".into(),
            Namespace {
                name: "default".into(),
                labels: BTreeMap::from([("weft.io/mesh".into(), "enabled".into())]),
            },
        );
        for (name, address) in [("node-a", NODE_A), ("node-b", NODE_B)] {
            snapshot.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    address,
                },
            );
        }
        for (svc, endpoints) in [
            service(
                "reviews",
                REVIEWS_VIP,
                vec![
                    endpoint(&v1, reviews_v1.addr.port()),
                    endpoint(&v2, reviews_v2.addr.port()),
                ],
            ),
            // An endpoint nothing listens on.
            service("broken", BROKEN_VIP, vec![endpoint(&details_pod, 1)]),
        ] {
            snapshot
                .endpoints
                .insert(svc.key.clone(), Arc::new(endpoints));
            snapshot.services.insert(svc.key.clone(), Arc::new(svc));
        }
        for p in [productpage_pod, v1, v2, details_pod, ratings_pod] {
            snapshot.pods.insert(p.key.clone(), Arc::new(p));
        }
        let store = Store::new();
        store.publish(snapshot);

        let capture = Arc::new(FakeOriginalDst::default());
        let ca = TestCa::new();
        let b = NodeProxy::start("node-b", NODE_B, 0, &store, capture.clone(), &ca, ttl).await;
        let a = NodeProxy::start(
            "node-a",
            NODE_A,
            b.addresses.tunnel.port(),
            &store,
            capture.clone(),
            &ca,
            ttl,
        )
        .await;
        Self {
            ca,
            store,
            capture,
            a,
            b,
            reviews_v1,
            reviews_v2,
            details,
            ratings,
        }
    }

    /// Connects from `client` to node A's outbound listener, as if `client` had dialled `dst`
    /// and been captured.
    async fn dial(&self, client: Ipv4Addr, dst: SocketAddrV4) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((client, 0))).unwrap();
        let SocketAddr::V4(local) = socket.local_addr().unwrap() else {
            unreachable!()
        };
        self.capture.0.lock().unwrap().insert(local, dst);
        socket.connect(self.a.addresses.outbound).await.unwrap()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(167).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

/// Writes `data`, closes the write side, and returns everything read until end of stream.
async fn exchange(mut stream: TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = stream.split();
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    let (_, n) = tokio::time::timeout(TIMEOUT, async { tokio::join!(write, read) })
        .await
        .expect("exchange finished in time");
    n.unwrap();
    got
}

/// Asserts the proxy closes `stream` (end of stream or reset) without forwarding a byte back.
async fn assert_refused(mut stream: TcpStream, data: &[u8]) {
    // The proxy may already have closed: writing can fail too.
    let _ = stream.write_all(data).await;
    let mut got = Vec::new();
    match tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut got))
        .await
        .expect("the proxy closes the connection")
    {
        Ok(_) => assert!(got.is_empty(), "unexpected bytes {got:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

/// Opens a connection through the proxy and waits for the first echo, so the proxy has
/// picked and connected its upstream before the next one is opened.
async fn open_echoing(mesh: &Mesh, dialled: SocketAddrV4) -> TcpStream {
    let mut stream = mesh.dial(PRODUCTPAGE, dialled).await;
    stream.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut byte))
        .await
        .expect("echo in time")
        .unwrap();
    stream
}

#[tokio::test]
async fn service_connections_are_balanced_by_least_request() {
    // Without a DestinationRule, connections go to the endpoint with the fewest open ones
    // (Istio's default LEAST_REQUEST): open connections spread evenly.
    let mesh = Mesh::start().await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(open_echoing(&mesh, REVIEWS_VIP).await);
    }
    assert_eq!(mesh.reviews_v1.accepted(), 2);
    assert_eq!(mesh.reviews_v2.accepted(), 2);
    // Local pods see the node proxy's address as their peer.
    for peer in mesh.reviews_v1.peers.lock().unwrap().iter() {
        assert_eq!(peer.ip(), PROXY_IP);
    }
    for (i, stream) in open.into_iter().enumerate() {
        let message = format!("ping {i}");
        assert_eq!(
            exchange(stream, message.as_bytes()).await,
            message.as_bytes()
        );
    }
}

#[tokio::test]
async fn mebibytes_are_copied_byte_exact() {
    let mesh = Mesh::start().await;
    let data = pattern(5 * 1024 * 1024 + 123, 3);
    let stream = mesh.dial(PRODUCTPAGE, REVIEWS_VIP).await;
    let got = exchange(stream, &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
}

#[tokio::test]
async fn half_close_is_propagated_both_ways() {
    let mesh = Mesh::start().await;

    // The server closes its side first, then keeps reading: the client must see end of
    // stream, and what it sends afterwards must still arrive.
    let listener = TcpListener::bind((DETAILS, 0)).await.unwrap();
    let SocketAddr::V4(server_addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"greeting").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        rest
    });

    let mut client = mesh.dial(PRODUCTPAGE, server_addr).await;
    let mut greeting = Vec::new();
    tokio::time::timeout(TIMEOUT, client.read_to_end(&mut greeting))
        .await
        .expect("the server's FIN reaches the client")
        .unwrap();
    assert_eq!(greeting, b"greeting");
    client.write_all(b"late words").await.unwrap();
    client.shutdown().await.unwrap();
    let rest = tokio::time::timeout(TIMEOUT, server)
        .await
        .expect("the client's FIN reaches the server")
        .unwrap();
    assert_eq!(rest, b"late words");
}

#[tokio::test]
async fn remote_pods_are_reached_through_the_peer_node_tunnel() {
    let mesh = Mesh::start().await;
    let data = pattern(1024 * 1024 + 7, 9);
    let stream = mesh.dial(PRODUCTPAGE, mesh.ratings.addr).await;
    assert!(exchange(stream, &data).await == data);
    assert_eq!(mesh.ratings.accepted(), 1);
    // Node B's proxy connected to its pod from the proxy address.
    assert_eq!(mesh.ratings.peers.lock().unwrap()[0].ip(), PROXY_IP);

    let source = mesh.a.metrics.encode();
    let line = format!(
        "istio_tcp_received_bytes_total{{reporter=\"source\",source_workload=\"productpage-v1-1\",\
         source_canonical_service=\"productpage\",source_canonical_revision=\"v1\",\
         source_workload_namespace=\"default\",\
         source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\",\
         source_app=\"productpage\",source_version=\"v1\",source_cluster=\"Kubernetes\",\
         destination_workload=\"ratings-v1-1\",destination_canonical_service=\"ratings\",\
         destination_canonical_revision=\"v1\",destination_workload_namespace=\"default\",\
         destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-ratings\",\
         destination_app=\"ratings\",destination_version=\"v1\",destination_service=\"unknown\",\
         destination_service_name=\"unknown\",destination_service_namespace=\"unknown\",\
         destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",response_flags=\"-\",\
         connection_security_policy=\"mutual_tls\"}} {}\n",
        data.len()
    );
    assert!(source.contains(&line), "missing {line} in\n{source}");

    // The destination side knows the caller from its certificate, and which pod of that
    // identity from the `forwarded` claim its certificate covers.
    let destination = mesh.b.metrics.encode();
    let line = "istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"productpage-v1-1\",\
                source_canonical_service=\"productpage\",source_canonical_revision=\"v1\",\
                source_workload_namespace=\"default\",\
                source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\",";
    assert!(
        destination.contains(line),
        "missing {line} in\n{destination}"
    );
    let sent = format!(
        "destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",response_flags=\"-\",\
         connection_security_policy=\"mutual_tls\"}} {}\n",
        data.len()
    );
    assert!(
        destination.lines().any(|l| l
            .starts_with("istio_tcp_sent_bytes_total{reporter=\"destination\"")
            && format!("{l}\n").ends_with(&sent)),
        "missing destination sent bytes in\n{destination}"
    );
}

#[tokio::test]
async fn certificate_renewal_breaks_no_connection() {
    // Certificates of 3 s are renewed about every 1.5 s (half their life).
    let mesh = Mesh::start_with_ttl(Duration::from_secs(3)).await;
    let mut open = mesh.dial(PRODUCTPAGE, mesh.ratings.addr).await;
    let started = tokio::time::Instant::now();
    let mut round = 0u8;
    // Over three lifetimes: the open connection keeps carrying bytes across the renewals, and
    // a new connection each round is served with whatever certificate is current.
    while started.elapsed() < Duration::from_secs(9) {
        round += 1;
        open.write_all(&[round]).await.unwrap();
        let mut byte = [0u8; 1];
        tokio::time::timeout(TIMEOUT, open.read_exact(&mut byte))
            .await
            .expect("the open connection still answers")
            .unwrap();
        assert_eq!(byte, [round]);
        let fresh = mesh.dial(PRODUCTPAGE, mesh.ratings.addr).await;
        let data = pattern(4096, round);
        assert!(exchange(fresh, &data).await == data, "round {round}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(round > 20, "only {round} rounds");
    // Every round's new connection reached the pod; the first one is still open.
    assert_eq!(mesh.ratings.accepted(), usize::from(round) + 1);
}

#[tokio::test]
async fn a_revoked_certificate_closes_its_connections_and_is_replaced() {
    let mesh = Mesh::start().await;
    let productpage = Identity::new("cluster.local", "default", "bookinfo-productpage");
    let mut open = mesh.dial(PRODUCTPAGE, mesh.ratings.addr).await;
    open.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    open.read_exact(&mut byte).await.unwrap();
    let issued = mesh.ca.issued(&productpage);
    assert!(mesh.ca.revoke(&productpage) >= 1);

    // Node B learns of the revocation (it polls every 100 ms here) and closes the connection
    // that presented the certificate, with the stream of the open connection on it.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(TIMEOUT, open.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stayed open");
    // Node A asked for a new certificate at once, and new connections work with it.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while mesh.ca.issued(&productpage) == issued {
        assert!(tokio::time::Instant::now() < deadline, "no new certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let data = pattern(4096, 3);
    let fresh = mesh.dial(PRODUCTPAGE, mesh.ratings.addr).await;
    assert!(exchange(fresh, &data).await == data);
    let refused = mesh.b.metrics.encode();
    assert!(
        refused.contains("weft_mtls_refused_total{reason=\"revoked\"} 1"),
        "{refused}"
    );
}

#[tokio::test]
async fn tunnel_refuses_targets_that_are_not_its_pods() {
    let mesh = Mesh::start().await;
    let SocketAddr::V4(peer) = mesh.b.addresses.tunnel else {
        unreachable!()
    };
    // A node proxy of the mesh, calling for productpage.
    let pool = HbonePool::new(mesh.ca.certs());
    let caller = Caller {
        identity: Identity::new("cluster.local", "default", "bookinfo-productpage"),
        ip: PRODUCTPAGE,
    };
    let err = pool
        .connect(&caller, None, peer, mesh.reviews_v1.addr, TIMEOUT, None)
        .await
        .unwrap_err();
    let TunnelError::Refused { status, reason, .. } = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(*status, 403);
    assert!(
        reason.contains("is not a meshed pod on node node-b"),
        "{reason}"
    );
    assert!(err.to_string().contains("refused the tunnel"), "{err}");
    assert_eq!(mesh.reviews_v1.accepted(), 0);

    // A pod of node B that listens nowhere: the peer answers 502 with the reason.
    let target = SocketAddrV4::new(RATINGS, 1);
    let err = pool
        .connect(&caller, None, peer, target, TIMEOUT, None)
        .await
        .unwrap_err();
    let TunnelError::Refused { status, reason, .. } = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(*status, 502);
    assert!(reason.contains("refused the connection"), "{reason}");
}

#[tokio::test]
async fn service_metrics_carry_istio_labels() {
    let mesh = Mesh::start().await;
    // Two connections open at once: least request sends one to each version.
    let first = open_echoing(&mesh, REVIEWS_VIP).await;
    let second = open_echoing(&mesh, REVIEWS_VIP).await;
    for stream in [first, second] {
        exchange(stream, b"ello").await;
    }
    let text = mesh.a.metrics.encode();
    // Both pods run on node A: its proxy reports each connection as the source's and as the
    // destination's side, each with both identities (the kernel vouches for them).
    for reporter in ["source", "destination"] {
        for (version, name, value) in [
            ("v1", "istio_tcp_connections_opened_total", 1),
            ("v1", "istio_tcp_connections_closed_total", 1),
            ("v1", "istio_tcp_received_bytes_total", 5),
            ("v2", "istio_tcp_sent_bytes_total", 5),
        ] {
            let line = format!(
                "{name}{{reporter=\"{reporter}\",source_workload=\"productpage-v1-1\",\
                 source_canonical_service=\"productpage\",source_canonical_revision=\"v1\",\
                 source_workload_namespace=\"default\",\
                 source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\",\
                 source_app=\"productpage\",source_version=\"v1\",\
                 source_cluster=\"Kubernetes\",destination_workload=\"reviews-{version}-1\",\
                 destination_canonical_service=\"reviews\",destination_canonical_revision=\"{version}\",\
                 destination_workload_namespace=\"default\",\
                 destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\",\
                 destination_app=\"reviews\",destination_version=\"{version}\",\
                 destination_service=\"reviews.default.svc.cluster.local\",destination_service_name=\"reviews\",\
                 destination_service_namespace=\"default\",destination_cluster=\"Kubernetes\",\
                 request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}} {value}\n"
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}

#[tokio::test]
async fn refused_upstream_closes_the_client_and_is_flagged() {
    let mesh = Mesh::start().await;
    let stream = mesh.dial(PRODUCTPAGE, BROKEN_VIP).await;
    assert_refused(stream, b"anyone?").await;
    let text = mesh.a.metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("destination_service_name=\"broken\"")
                && l.contains("response_flags=\"UF\"")),
        "no UF series in\n{text}"
    );
    assert_eq!(mesh.details.accepted(), 0);
}

#[tokio::test]
async fn uncaptured_and_looping_connections_are_closed() {
    let mesh = Mesh::start().await;
    // Nothing recorded for this client: the proxy cannot know where it wanted to go.
    let stream = TcpStream::connect(mesh.a.addresses.outbound).await.unwrap();
    assert_refused(stream, b"where am I").await;
    // Not steered by TC: the local address is the inbound listener itself.
    let stream = TcpStream::connect(mesh.a.addresses.inbound).await.unwrap();
    assert_refused(stream, b"loop").await;
    assert_eq!(mesh.reviews_v1.accepted() + mesh.reviews_v2.accepted(), 0);
}

#[tokio::test]
async fn new_snapshots_are_applied_and_reported() {
    let mesh = Mesh::start().await;
    assert_eq!(mesh.a.applied.load(Ordering::Acquire), 1);

    // Drop reviews-v2 from the service: every new connection goes to v1.
    let mut snapshot = (*mesh.store.current()).clone();
    let key = ObjectKey::new("default", "reviews");
    let mut endpoints = (*snapshot.endpoints[&key]).clone();
    endpoints
        .by_port
        .get_mut(&REVIEWS_VIP.port())
        .unwrap()
        .retain(|e| e.ip == REVIEWS_V1);
    snapshot.endpoints.insert(key, Arc::new(endpoints));
    let version = mesh.store.publish(snapshot);
    tokio::time::timeout(TIMEOUT, async {
        while mesh.a.applied.load(Ordering::Acquire) < version {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the proxy applies the new snapshot");

    for _ in 0..3 {
        let stream = mesh.dial(PRODUCTPAGE, REVIEWS_VIP).await;
        exchange(stream, b"x").await;
    }
    assert_eq!(mesh.reviews_v1.accepted(), 3);
    assert_eq!(mesh.reviews_v2.accepted(), 0);
    assert_eq!(mesh.b.applied.load(Ordering::Acquire), version);
}
