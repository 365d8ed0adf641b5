//! The node proxy's HTTP routing in-process, on 127.0.N.x addresses (no root, no eBPF): the
//! configuration is YAML read by the file source, as a user writes it; a fake capture layer
//! answers the original destination; hyper servers play the pods; hyper clients play the
//! applications. The virtual-cluster tests (`xtask/tests/l7.rs`) repeat the important cases
//! with curl, h2load and a gRPC client over real capture.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_node::{
    identity::manager::testing::TestCa,
    metrics::Metrics,
    model::{OriginalDst, Store},
    proxy::{Proxy, ProxyConfig, SourceLimits},
    source::file::FileSource,
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket},
};

const PROXY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const POD_PORT: u16 = 18080;
const SERVICE_PORT: u16 = 9080;

/// The capture layer: client address → dialled address.
#[derive(Default)]
struct FakeOriginalDst(Mutex<HashMap<SocketAddrV4, SocketAddrV4>>);

impl OriginalDst for FakeOriginalDst {
    fn lookup(&self, _: std::os::fd::BorrowedFd<'_>, client: SocketAddrV4) -> Option<SocketAddrV4> {
        self.0.lock().unwrap().get(&client).copied()
    }
}

/// How a test pod answers.
#[derive(Default)]
struct Behaviour {
    /// Every Nth request answers 503.
    fail_every: AtomicU32,
    requests: AtomicU32,
}

/// A pod: an HTTP/1.1 + h2c server that says who it is and what it received.
struct Pod {
    behaviour: Arc<Behaviour>,
}

impl Pod {
    async fn start(ip: Ipv4Addr, name: &'static str, version: &'static str) -> Self {
        let listener = TcpListener::bind((ip, POD_PORT)).await.unwrap();
        let behaviour = Arc::new(Behaviour::default());
        let b = behaviour.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let b = b.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let b = b.clone();
                        async move { Ok::<_, Infallible>(answer(request, name, version, &b).await) }
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // The pods take more headers than a client may send: what the proxies
                    // add must not hit the pod's own limit.
                    builder.http1().max_headers(200);
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { behaviour }
    }

    fn requests(&self) -> u32 {
        self.behaviour.requests.load(Ordering::SeqCst)
    }
}

async fn answer(
    request: Request<Incoming>,
    name: &str,
    version: &str,
    behaviour: &Behaviour,
) -> Response<BoxBody<Bytes, Infallible>> {
    let n = behaviour.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut response = Response::new(Full::new(body).boxed());
    let headers = response.headers_mut();
    headers.insert("x-pod", name.parse().unwrap());
    headers.insert("x-version", version.parse().unwrap());
    headers.insert("x-seen-path", parts.uri.path().parse().unwrap());
    headers.insert(
        "x-seen-version",
        format!("{:?}", parts.version).parse().unwrap(),
    );
    let host = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get("host")
                .map(|h| h.to_str().unwrap().to_owned())
        })
        .unwrap_or_default();
    headers.insert("x-seen-host", host.parse().unwrap());
    for name in ["upgrade", "http2-settings"] {
        if let Some(value) = parts.headers.get(name) {
            headers.insert(
                http::HeaderName::from_bytes(format!("x-seen-{name}").as_bytes()).unwrap(),
                value.clone(),
            );
        }
    }
    if let Some(xfcc) = parts.headers.get("x-forwarded-client-cert") {
        headers.insert("x-seen-xfcc", xfcc.clone());
    }
    for (name, value) in &parts.headers {
        if name.as_str().starts_with("x-test-") {
            headers.insert(
                http::HeaderName::from_bytes(format!("x-seen-{name}").as_bytes()).unwrap(),
                value.clone(),
            );
        }
    }
    let every = behaviour.fail_every.load(Ordering::SeqCst);
    if every > 0 && n.is_multiple_of(every) {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(ms) = parts.uri.path().strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    {
        // A gRPC answer: the status comes in the trailers, after the message.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        trailers.insert("grpc-message", version.parse().unwrap());
        let frames = futures::stream::iter([
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(trailers)),
        ]);
        *response.body_mut() = StreamBody::new(frames).boxed();
    }
    if let Some(ms) = parts.uri.path().strip_prefix("/slowbody/") {
        // Headers now, the body later.
        let ms = ms.parse().unwrap_or(0);
        let late = futures::stream::once(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"late")))
        });
        *response.body_mut() = StreamBody::new(late).boxed();
    }
    response
}

/// One proxy ("node n1"), pods, Services and the YAML that configures them.
struct Mesh {
    net: u8,
    dir: TempDir,
    source: FileSource,
    capture: Arc<FakeOriginalDst>,
    outbound: SocketAddr,
    metrics: Arc<Metrics>,
    /// Node n2's proxy.
    remote_metrics: Arc<Metrics>,
    applied: Arc<AtomicU64>,
    store: Store,
    next_client: AtomicU32,
    pods: HashMap<&'static str, Pod>,
}

const BASE: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.io/mesh: enabled}}
---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: app}]}\nstatus: {podIP: 127.0.NET.100}\n";

impl Mesh {
    /// `pods`: (name, app, version, ip suffix); one Service per app, ClusterIP 10.NET.0.<n>.
    /// Pods with a suffix of 50 or more run on node n2, whose proxy listens on 127.0.NET.2.
    async fn start(net: u8, pods: &[(&'static str, &'static str, &'static str, u8)]) -> Self {
        Self::start_with_port(net, pods, "http").await
    }

    async fn start_with_port(
        net: u8,
        pods: &[(&'static str, &'static str, &'static str, u8)],
        port_name: &str,
    ) -> Self {
        Self::start_configured(net, pods, port_name, |_| {}).await
    }

    /// `start_with_port` with both proxies' configuration changed by `configure`.
    async fn start_configured(
        net: u8,
        pods: &[(&'static str, &'static str, &'static str, u8)],
        port_name: &str,
        configure: impl Fn(&mut ProxyConfig),
    ) -> Self {
        let mut yaml = BASE.replace("NET", &net.to_string());
        let mut started = HashMap::new();
        let mut apps: Vec<&str> = Vec::new();
        let tunnel_port = 25000 + u16::from(net);
        for n in 1..=2 {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: n{n}}}\nstatus: {{addresses: [{{type: InternalIP, address: 127.0.{net}.{n}}}]}}\n"
            );
        }
        for &(name, app, version, suffix) in pods {
            let ip = Ipv4Addr::new(127, 0, net, suffix);
            let node = if suffix >= 50 { "n2" } else { "n1" };
            started.insert(name, Pod::start(ip, name, version).await);
            yaml += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}, version: {version}}}}}\n\
                 spec: {{nodeName: {node}, serviceAccountName: {app}, containers: [{{name: app, ports: [{{containerPort: {POD_PORT}}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
            );
            if !apps.contains(&app) {
                apps.push(app);
            }
        }
        for (i, app) in apps.iter().enumerate() {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {app}, namespace: shop}}\n\
                 spec:\n  clusterIP: 10.{net}.0.{}\n  selector: {{app: {app}}}\n  ports: [{{name: {port_name}, port: {SERVICE_PORT}, targetPort: {POD_PORT}}}]\n",
                i + 1
            );
        }
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("base.yaml"), yaml).unwrap();
        let store = Store::new();
        let mut source = FileSource::new(dir.path(), store.clone());
        source.poll().unwrap();

        let capture = Arc::new(FakeOriginalDst::default());
        let applied = Arc::new(AtomicU64::new(0));
        let ca = TestCa::new();
        let mut outbound = None;
        let mut metrics = Vec::new();
        for n in 1..=2u8 {
            let ip = Ipv4Addr::new(127, 0, net, n);
            let mut config = ProxyConfig::new(&format!("n{n}"), PROXY_IP);
            let any = SocketAddr::from((ip, 0));
            config.outbound_addr = any;
            config.inbound_addr = any;
            config.tunnel_addr = SocketAddr::from((ip, tunnel_port));
            config.peer_tunnel_port = tunnel_port;
            config.connect_timeout = Duration::from_secs(2);
            config.certs = Some(ca.certs());
            // Short, for the slow-head case; every other client sends its heads at once.
            config.http.header_read_timeout = Duration::from_secs(2);
            configure(&mut config);
            let node_metrics = Arc::new(Metrics::new());
            // Applying is awaited on n1 only; n2 gets the same snapshots at the same time.
            let node_applied = if n == 1 {
                applied.clone()
            } else {
                Arc::default()
            };
            let proxy = Proxy::bind(
                config,
                store.subscribe(),
                capture.clone(),
                &node_metrics,
                node_applied,
            )
            .await
            .unwrap();
            outbound.get_or_insert(proxy.addresses().outbound);
            metrics.push(node_metrics);
            tokio::spawn(proxy.run(std::future::pending()));
        }
        let outbound = outbound.unwrap();
        let remote_metrics = metrics.pop().unwrap();
        let metrics = metrics.pop().unwrap();
        Self {
            net,
            dir,
            source,
            capture,
            outbound,
            metrics,
            remote_metrics,
            applied,
            store,
            next_client: AtomicU32::new(0),
            pods: started,
        }
    }

    /// Applies (or replaces) a YAML file of routing rules and waits until the proxy uses it.
    async fn apply(&mut self, name: &str, yaml: &str) {
        fs::write(self.dir.path().join(name), yaml).unwrap();
        let version = self
            .source
            .poll()
            .unwrap()
            .expect("the change is published");
        let rejected = self.source.status().rejected();
        assert!(rejected.is_empty(), "rejected: {rejected:?}");
        while self.applied.load(Ordering::Acquire) < version {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(self.store.current().version, version);
    }

    /// A keep-alive HTTP/1.1 connection from the client pod to `app`'s Service.
    async fn connect(&self, app_index: u8) -> Client {
        let stream = self.dial(app_index).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client::Http1(sender)
    }

    /// A prior-knowledge HTTP/2 connection (h2c) to `app`'s Service.
    async fn connect_h2(&self, app_index: u8) -> Client {
        let stream = self.dial(app_index).await;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        Client::Http2(sender)
    }

    async fn dial(&self, app_index: u8) -> tokio::net::TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((Ipv4Addr::new(127, 0, self.net, 100), 0)))
            .unwrap();
        let SocketAddr::V4(local) = socket.local_addr().unwrap() else {
            unreachable!()
        };
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, self.net, 0, app_index), SERVICE_PORT);
        self.capture.0.lock().unwrap().insert(local, vip);
        self.next_client.fetch_add(1, Ordering::Relaxed);
        socket.connect(self.outbound).await.unwrap()
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

enum Client {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

struct Answer {
    status: StatusCode,
    body: Bytes,
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
    elapsed: Duration,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

impl Client {
    async fn send(&mut self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send_body(method, path, headers, Bytes::new()).await
    }

    async fn send_body(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Answer {
        let started = Instant::now();
        let uri = match self {
            Client::Http1(_) => path.to_owned(),
            Client::Http2(_) => format!("http://shop.test{path}"),
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if matches!(self, Client::Http1(_)) {
            builder = builder.header("host", "shop.test");
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(body)).unwrap();
        let response = match self {
            Client::Http1(s) => s.send_request(request).await.unwrap(),
            Client::Http2(s) => s.send_request(request).await.unwrap(),
        };
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        Answer {
            body: collected.to_bytes(),
            status: parts.status,
            headers: parts.headers,
            trailers,
            elapsed: started.elapsed(),
        }
    }

    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send(Method::GET, path, headers).await
    }
}

/// How many answers came from each version.
async fn versions(
    client: &mut Client,
    n: usize,
    headers: &[(&str, &str)],
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let answer = client.get("/", headers).await;
        assert_eq!(answer.status, StatusCode::OK);
        *seen
            .entry(answer.header("x-version").to_owned())
            .or_default() += 1;
    }
    seen
}

fn count(metrics: &str, series: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && series.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const REVIEWS: &[(&str, &str, &str, u8)] = &[
    ("reviews-v1", "reviews", "v1", 11),
    ("reviews-v2", "reviews", "v2", 12),
    ("reviews-v3", "reviews", "v3", 13),
];

const SUBSETS: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}
spec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v3}}\n";

#[tokio::test]
async fn unrouted_requests_reach_every_endpoint_over_one_connection() {
    let mesh = Mesh::start(11, REVIEWS).await;
    let mut client = mesh.connect(1).await;
    let seen = versions(&mut client, 30, &[]).await;
    assert_eq!(
        seen.len(),
        3,
        "every version answers on one keep-alive connection: {seen:?}"
    );
    let answer = client.get("/", &[]).await;
    assert_eq!(answer.header("x-seen-host"), "shop.test");
    assert_eq!(answer.header("x-seen-version"), "HTTP/1.1");
    let metrics = mesh.metrics();
    assert_eq!(
        count(
            &metrics,
            &[
                "reporter=\"source\"",
                "response_code=\"200\"",
                "destination_service_name=\"reviews\"",
                "source_workload=\"client\""
            ]
        ),
        31.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn header_match_sends_jason_to_v2_and_everyone_else_to_v1() {
    let mut mesh = Mesh::start(12, REVIEWS).await;
    mesh.apply("dr.yaml", SUBSETS).await;
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}
spec:\n  hosts: [reviews]\n  http:\n  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]\n",
    )
    .await;
    let mut client = mesh.connect(1).await;
    assert_eq!(
        versions(&mut client, 20, &[("end-user", "jason")]).await,
        BTreeMap::from([("v2".into(), 20)])
    );
    assert_eq!(
        versions(&mut client, 20, &[]).await,
        BTreeMap::from([("v1".into(), 20)])
    );
    assert_eq!(
        versions(&mut client, 5, &[("end-user", "alice")]).await,
        BTreeMap::from([("v1".into(), 5)])
    );
}

#[tokio::test]
async fn weights_split_traffic_and_a_new_rule_applies_on_an_open_connection() {
    let mut mesh = Mesh::start(13, REVIEWS).await;
    mesh.apply("dr.yaml", SUBSETS).await;
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}
spec:\n  hosts: [reviews.shop.svc.cluster.local]\n  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 80}\n    - {destination: {host: reviews, subset: v3}, weight: 20}\n",
    )
    .await;
    let mut client = mesh.connect(1).await;
    let seen = versions(&mut client, 1000, &[]).await;
    let v1 = seen.get("v1").copied().unwrap_or(0) as f64 / 10.0;
    assert!((75.0..=85.0).contains(&v1), "80/20 split gave {seen:?}");
    assert_eq!(seen.get("v2"), None);

    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}
spec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v3}}]\n",
    )
    .await;
    assert_eq!(
        versions(&mut client, 10, &[]).await,
        BTreeMap::from([("v3".into(), 10)])
    );
}

#[tokio::test]
async fn faults_timeouts_and_unmatched_requests_answer_like_envoy() {
    let mut mesh = Mesh::start(14, &[("ratings-v1", "ratings", "v1", 11)]).await;
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: shop}
spec:\n  hosts: [ratings]\n  http:
  - match: [{headers: {end-user: {exact: jason}}}]\n    fault: {abort: {httpStatus: 500, percentage: {value: 100}}}\n    route: [{destination: {host: ratings}}]
  - match: [{headers: {end-user: {exact: slow}}}]\n    timeout: 300ms\n    fault: {delay: {fixedDelay: 500ms, percentage: {value: 100}}}\n    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /delay}}]\n    timeout: 200ms\n    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /ok}}]\n    route: [{destination: {host: ratings}}]\n",
    )
    .await;
    let mut client = mesh.connect(1).await;
    let abort = client.get("/ok", &[("end-user", "jason")]).await;
    assert_eq!(abort.status, StatusCode::INTERNAL_SERVER_ERROR);
    let slow = client.get("/ok", &[("end-user", "slow")]).await;
    // As in Envoy, the route timeout starts once the fault filter lets the request go.
    assert_eq!(slow.status, StatusCode::OK);
    assert!(
        slow.elapsed >= Duration::from_millis(500),
        "{:?}",
        slow.elapsed
    );
    let late = client.get("/delay/1000", &[]).await;
    assert_eq!(late.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        late.elapsed < Duration::from_millis(900),
        "{:?}",
        late.elapsed
    );
    let unmatched = client.get("/elsewhere", &[]).await;
    assert_eq!(unmatched.status, StatusCode::NOT_FOUND);
    let ok = client.get("/ok", &[]).await;
    assert_eq!(ok.status, StatusCode::OK);

    let metrics = mesh.metrics();
    for (code, flags) in [("500", "FI"), ("504", "UT"), ("404", "NR"), ("200", "-")] {
        assert!(
            count(
                &metrics,
                &[
                    &format!("response_code=\"{code}\""),
                    &format!("response_flags=\"{flags}\"")
                ]
            ) >= 1.0,
            "no {code} {flags} series in\n{metrics}"
        );
    }
    assert_eq!(
        count(
            &metrics,
            &["response_code=\"200\"", "response_flags=\"DI\""]
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn retries_hide_a_backend_failing_one_request_in_three() {
    let mut mesh = Mesh::start(15, &[("ratings-v1", "ratings", "v1", 11)]).await;
    mesh.pods["ratings-v1"]
        .behaviour
        .fail_every
        .store(3, Ordering::SeqCst);
    let mut client = mesh.connect(1).await;
    // Istio's default policy retries 503 for GET.
    let mut failed = 0;
    for _ in 0..30 {
        if client.get("/", &[]).await.status != StatusCode::OK {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "the default retry policy hides 503");
    // POST is not idempotent: without a policy asking for it, it is not repeated.
    let mut failed = 0;
    for _ in 0..30 {
        if client.send(Method::POST, "/", &[]).await.status != StatusCode::OK {
            failed += 1;
        }
    }
    assert!(
        (5..=15).contains(&failed),
        "one POST in three fails: {failed}"
    );
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: shop}
spec:\n  hosts: [ratings]\n  http:\n  - route: [{destination: {host: ratings}}]\n    retries: {attempts: 3, retryOn: 5xx}\n",
    )
    .await;
    // A policy the user configured repeats POSTs, body included.
    for i in 0..30 {
        let body = Bytes::from(format!("order {i}"));
        let answer = client.send_body(Method::POST, "/", &[], body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.body, body,
            "the retried request carried the same body"
        );
    }
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: shop}
spec:\n  hosts: [ratings]\n  http:\n  - route: [{destination: {host: ratings}}]\n    retries: {attempts: 0}\n",
    )
    .await;
    let before = mesh.pods["ratings-v1"].requests();
    let mut failed = 0;
    for _ in 0..30 {
        if client.get("/", &[]).await.status == StatusCode::SERVICE_UNAVAILABLE {
            failed += 1;
        }
    }
    assert_eq!(
        mesh.pods["ratings-v1"].requests() - before,
        30,
        "attempts: 0 disables retries"
    );
    assert_eq!(failed, 10);
}

#[tokio::test]
async fn a_circuit_breaker_overflows_with_503_uo() {
    let mut mesh = Mesh::start(16, &[("ratings-v1", "ratings", "v1", 11)]).await;
    mesh.apply(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings, namespace: shop}
spec:\n  host: ratings\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}\n",
    )
    .await;
    let mesh = Arc::new(mesh);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mesh = mesh.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = mesh.connect(1).await;
            client.get("/delay/300", &[]).await.status
        }));
    }
    let mut statuses = BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap().as_u16()).or_insert(0) += 1;
    }
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 1,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) >= 1,
        "{statuses:?}"
    );
    let metrics = mesh.metrics();
    assert!(
        count(
            &metrics,
            &["response_code=\"503\"", "response_flags=\"UO\""]
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn http2_clients_are_multiplexed_and_rewrites_redirects_and_headers_apply() {
    let mut mesh = Mesh::start(17, REVIEWS).await;
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}
spec:\n  hosts: [reviews]\n  http:
  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new}
  - match: [{uri: {prefix: /api/v1}}]\n    rewrite: {uri: /v2}\n    headers:\n      request: {set: {x-test-route: api}}\n      response: {add: {x-served-by: weft}}\n    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]\n",
    )
    .await;
    let mut client = mesh.connect_h2(1).await;
    let redirect = client.get("/old/page", &[]).await;
    assert_eq!(redirect.status, StatusCode::MOVED_PERMANENTLY);
    assert!(
        redirect.header("location").ends_with("/new"),
        "{:?}",
        redirect.headers
    );
    let rewritten = client.get("/api/v1/items", &[]).await;
    assert_eq!(rewritten.status, StatusCode::OK);
    assert_eq!(rewritten.header("x-seen-path"), "/v2/items");
    assert_eq!(rewritten.header("x-seen-x-test-route"), "api");
    assert_eq!(rewritten.header("x-served-by"), "weft");
    // An `http` port talks HTTP/1.1 to the pod whatever the client speaks.
    assert_eq!(rewritten.header("x-seen-version"), "HTTP/1.1");

    let Client::Http2(sender) = client else {
        unreachable!()
    };
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = Client::Http2(sender.clone());
        tasks.push(tokio::spawn(async move { c.get("/", &[]).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert!(mesh.pods.values().map(Pod::requests).sum::<u32>() >= 51);
}

#[tokio::test]
async fn consistent_hash_keeps_a_user_on_one_endpoint() {
    let mut mesh = Mesh::start(18, REVIEWS).await;
    mesh.apply(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}
spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n",
    )
    .await;
    let mut client = mesh.connect(1).await;
    let mut homes = BTreeMap::new();
    for user in ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"] {
        let seen = versions(&mut client, 10, &[("x-user", user)]).await;
        assert_eq!(seen.len(), 1, "{user} moved: {seen:?}");
        homes.insert(user, seen.into_keys().next().unwrap());
    }
    let distinct: std::collections::BTreeSet<_> = homes.values().collect();
    assert!(
        distinct.len() >= 2,
        "users spread over endpoints: {homes:?}"
    );
}

#[tokio::test]
async fn grpc_trailers_pass_through() {
    let mesh = Mesh::start(19, &[("ratings-v1", "ratings", "v1", 11)]).await;
    let mut client = mesh.connect_h2(1).await;
    // A client stream of three messages; the pod answers one.
    let messages = Bytes::from_static(b"\0\0\0\0\x02hi\0\0\0\0\x02hi\0\0\0\0\x02hi");
    let answer = client
        .send_body(
            Method::POST,
            "/weft.demo.Echo/Hello",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            messages,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("x-seen-version"),
        "HTTP/2.0",
        "gRPC goes upstream as HTTP/2"
    );
    let trailers = answer
        .trailers
        .expect("the pod's trailers reach the client");
    assert_eq!(trailers["grpc-status"], "5");
    assert_eq!(trailers["grpc-message"], "v1");
    let metrics = mesh.metrics();
    assert_eq!(
        count(
            &metrics,
            &[
                "reporter=\"source\"",
                "request_protocol=\"grpc\"",
                "response_code=\"200\"",
                "grpc_response_status=\"5\""
            ]
        ),
        1.0,
        "{metrics}"
    );
    // The pod runs on the client's node: its proxy reports the call as the destination's
    // side too, with both identities, as the proxies of a call across nodes do.
    assert_eq!(
        count(
            &metrics,
            &[
                "reporter=\"destination\"",
                "source_workload=\"client\"",
                "destination_workload=\"ratings-v1\"",
                "destination_canonical_service=\"ratings\"",
                "source_principal=\"spiffe://cluster.local/ns/shop/sa/default\"",
                "destination_principal=\"spiffe://cluster.local/ns/shop/sa/ratings\"",
                "connection_security_policy=\"mutual_tls\"",
                "request_protocol=\"grpc\"",
                "response_code=\"200\"",
                "grpc_response_status=\"5\""
            ]
        ),
        1.0,
        "{metrics}"
    );
    // Both reports count the messages each way.
    for reporter in ["source", "destination"] {
        for (metric, expected) in [
            ("istio_request_messages_total{", "3"),
            ("istio_response_messages_total{", "1"),
        ] {
            let line = metrics
                .lines()
                .find(|l| l.starts_with(metric) && l.contains(&format!("reporter=\"{reporter}\"")))
                .unwrap_or_else(|| panic!("no {metric} reported by the {reporter} in\n{metrics}"));
            assert_eq!(line.rsplit(' ').next(), Some(expected), "{line}");
        }
    }
}

#[tokio::test]
async fn tcp_routes_split_connections_by_weight() {
    let mut mesh = Mesh::start_with_port(
        20,
        &[
            ("blue-1", "blue", "blue", 11),
            ("green-1", "green", "green", 12),
        ],
        "tcp-web",
    )
    .await;
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}
spec:\n  hosts: [blue]\n  tcp:\n  - route:\n    - {destination: {host: blue}, weight: 50}\n    - {destination: {host: green}, weight: 50}\n",
    )
    .await;
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        // A new connection each time: TCP routes choose per connection.
        let mut client = mesh.connect(1).await;
        let answer = client.get("/", &[]).await;
        *seen
            .entry(answer.header("x-version").to_owned())
            .or_default() += 1;
    }
    let blue = seen.get("blue").copied().unwrap_or(0);
    assert!(
        (70..=130).contains(&blue),
        "50/50 over 200 connections gave {seen:?}"
    );
    assert_eq!(blue + seen.get("green").copied().unwrap_or(0), 200);
}

/// One HTTP/1.1 exchange on a fresh TCP connection to `app`'s Service, as raw bytes: the
/// version that answered, or `None` when the proxy closed the connection without an answer.
async fn raw_exchange(mesh: &Mesh, app_index: u8) -> Option<String> {
    let mut stream = mesh.dial(app_index).await;
    let _ = stream
        .write_all(b"GET / HTTP/1.1\r\nhost: shop.test\r\nconnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    read.await.expect("the connection ends in time").ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.lines()
        .find_map(|l| l.strip_prefix("x-version: "))
        .map(str::to_owned)
}

const TCP_RULE: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: blue, namespace: shop}\nspec:\n  host: blue\n  trafficPolicy:\n";

#[tokio::test]
async fn tcp_services_use_the_destination_rule_load_balancer() {
    let mut mesh = Mesh::start_with_port(
        23,
        &[("blue-1", "blue", "v1", 11), ("blue-2", "blue", "v2", 12)],
        "tcp-web",
    )
    .await;
    mesh.apply(
        "dr.yaml",
        &format!("{TCP_RULE}    loadBalancer: {{simple: ROUND_ROBIN}}\n"),
    )
    .await;
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(raw_exchange(&mesh, 1).await.expect("answered"));
    }
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "round robin alternates connections: {order:?}"
    );

    // A source-IP hash is the consistent hash a TCP connection has: one client, one pod.
    mesh.apply(
        "dr.yaml",
        &format!("{TCP_RULE}    loadBalancer: {{consistentHash: {{useSourceIp: true}}}}\n"),
    )
    .await;
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        *seen
            .entry(raw_exchange(&mesh, 1).await.expect("answered"))
            .or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        1,
        "every connection of one client sticks: {seen:?}"
    );
}

#[tokio::test]
async fn tcp_services_honour_max_connections_and_subsets() {
    let mut mesh = Mesh::start_with_port(
        24,
        &[("blue-1", "blue", "v1", 11), ("blue-2", "blue", "v2", 12)],
        "tcp-web",
    )
    .await;
    mesh.apply(
        "dr.yaml",
        &format!("{TCP_RULE}    connectionPool: {{tcp: {{maxConnections: 1}}}}\n"),
    )
    .await;
    let mut held = mesh.connect(1).await;
    assert_eq!(held.get("/", &[]).await.status, StatusCode::OK);
    // The cluster is at its limit: the next connection is closed unanswered, counted `UO`.
    assert_eq!(raw_exchange(&mesh, 1).await, None);
    assert!(
        mesh.metrics()
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("destination_service_name=\"blue\"")
                && l.contains("response_flags=\"UO\"")),
        "{}",
        mesh.metrics()
    );
    drop(held);
    // Once the held connection has closed, its slot is free again.
    let mut answered = None;
    for _ in 0..100 {
        answered = raw_exchange(&mesh, 1).await;
        if answered.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        answered.is_some(),
        "a connection is accepted after the slot freed"
    );

    // Subsets through a TCP route: every connection goes to v2.
    mesh.apply(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: blue, namespace: shop}
spec:\n  host: blue\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n",
    )
    .await;
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: blue, namespace: shop}
spec:\n  hosts: [blue]\n  tcp:\n  - route:\n    - destination: {host: blue, subset: v2}\n",
    )
    .await;
    for _ in 0..10 {
        assert_eq!(raw_exchange(&mesh, 1).await.as_deref(), Some("v2"));
    }
}

/// A pod that exists in the configuration but does not serve: nothing listens on its address.
fn silent_pod(net: u8, name: &str, app: &str, suffix: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}, version: {name}}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: app, ports: [{{containerPort: {POD_PORT}}}]}}]}}\nstatus: {{podIP: 127.0.{net}.{suffix}}}\n"
    )
}

#[tokio::test]
async fn tcp_connect_failures_eject_the_endpoint() {
    let net = 25;
    let mut mesh = Mesh::start_with_port(net, &[("blue-1", "blue", "v1", 11)], "tcp-web").await;
    mesh.apply("dead.yaml", &silent_pod(net, "blue-dead", "blue", 13))
        .await;
    mesh.apply(
        "dr.yaml",
        &format!(
            "{TCP_RULE}    loadBalancer: {{simple: ROUND_ROBIN}}\n    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}\n"
        ),
    )
    .await;
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(raw_exchange(&mesh, 1).await);
    }
    let failed = answers.iter().filter(|a| a.is_none()).count();
    assert_eq!(
        failed, 2,
        "two refused connects eject the dead endpoint: {answers:?}"
    );
    assert!(
        answers[4..].iter().all(|a| a.as_deref() == Some("v1")),
        "after the ejection every connection reaches the live pod: {answers:?}"
    );
}

#[tokio::test]
async fn tcp_connect_timeout_comes_from_the_destination_rule() {
    let net = 26;
    let mut mesh = Mesh::start_with_port(net, &[("blue-1", "blue", "v1", 11)], "tcp-web").await;
    // A server whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    let stuck = TcpSocket::new_v4().unwrap();
    stuck
        .bind(SocketAddr::from((Ipv4Addr::new(127, 0, net, 14), POD_PORT)))
        .unwrap();
    let stuck = stuck.listen(0).unwrap();
    let _queued = TcpSocket::new_v4()
        .unwrap()
        .connect(stuck.local_addr().unwrap())
        .await
        .unwrap();
    mesh.apply(
        "stuck.yaml",
        &format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: stuck, namespace: shop}}\n\
             spec:\n  clusterIP: 10.{net}.0.9\n  selector: {{app: stuck}}\n  ports: [{{name: tcp-web, port: {SERVICE_PORT}, targetPort: {POD_PORT}}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: stuck, namespace: shop}}\n\
             spec:\n  host: stuck\n  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: 300ms}}}}}}\n",
            silent_pod(net, "stuck-1", "stuck", 14)
        ),
    )
    .await;
    let started = Instant::now();
    assert_eq!(raw_exchange(&mesh, 9).await, None);
    let waited = started.elapsed();
    // The proxy's own connect timeout is 2 s; the rule's 300 ms applies.
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(1500),
        "gave up after {waited:?}"
    );
    assert!(
        mesh.metrics()
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("destination_service_name=\"stuck\"")
                && l.contains("response_flags=\"UF\"")),
        "{}",
        mesh.metrics()
    );
    drop(stuck);
}

#[tokio::test]
async fn requests_across_nodes_are_reported_by_both_proxies() {
    let mesh = Mesh::start(21, &[("ratings-remote", "ratings", "v1", 51)]).await;
    let mut client = mesh.connect(1).await;
    for _ in 0..5 {
        let answer = client.get("/", &[]).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pod"), "ratings-remote");
    }
    let mut h2 = mesh.connect_h2(1).await;
    assert_eq!(h2.get("/", &[]).await.status, StatusCode::OK);
    let series = [
        "response_code=\"200\"",
        "source_workload=\"client\"",
        "destination_workload=\"ratings-remote\"",
        "destination_service_name=\"ratings\"",
    ];
    let source = mesh.metrics();
    assert_eq!(
        count(&source, &[&series[..], &["reporter=\"source\""]].concat()),
        6.0,
        "{source}"
    );
    let destination = mesh.remote_metrics.encode();
    assert_eq!(
        count(
            &destination,
            &[&series[..], &["reporter=\"destination\""]].concat()
        ),
        6.0,
        "{destination}"
    );
    // Both ends know the other by its certificate.
    let principals = [
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/default\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/ratings\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    for (text, reporter) in [(&source, "source"), (&destination, "destination")] {
        let reporter = format!("reporter=\"{reporter}\"");
        assert_eq!(
            count(text, &[&series[..], &principals, &[&reporter]].concat()),
            6.0,
            "{text}"
        );
    }
}

#[tokio::test]
async fn the_server_sees_the_client_certificate_and_never_a_forged_one() {
    let mesh = Mesh::start(
        28,
        &[
            ("ratings-remote", "ratings", "v1", 51),
            ("reviews-local", "reviews", "v1", 11),
        ],
    )
    .await;
    let forged = [(
        "x-forwarded-client-cert",
        "By=spiffe://cluster.local/ns/shop/sa/ratings;URI=spiffe://cluster.local/ns/admin/sa/root",
    )];
    // Across nodes: set by the destination's proxy from the mTLS handshake.
    let answer = mesh.connect(1).await.get("/", &forged).await;
    assert_eq!(answer.header("x-pod"), "ratings-remote");
    let xfcc = answer.header("x-seen-xfcc");
    let rest = xfcc
        .strip_prefix("By=spiffe://cluster.local/ns/shop/sa/ratings;Hash=")
        .unwrap_or_else(|| panic!("{xfcc}"));
    let (hash, uri) = rest.split_once(';').unwrap();
    assert_eq!(hash.len(), 64, "a SHA-256 in hex: {xfcc}");
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{xfcc}");
    assert_eq!(
        uri,
        "Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/default"
    );
    // On the same node: set by the source's proxy, which knows the caller by its address.
    let answer = mesh.connect(2).await.get("/", &forged).await;
    assert_eq!(answer.header("x-pod"), "reviews-local");
    let local = "By=spiffe://cluster.local/ns/shop/sa/reviews;URI=spiffe://cluster.local/ns/shop/sa/default";
    assert_eq!(answer.header("x-seen-xfcc"), local);

    // Requests that ask to switch protocols take their own path: the same rule holds there.
    let upgrade = [
        forged[0],
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
    ];
    let answer = mesh.connect(1).await.get("/", &upgrade).await;
    assert_eq!(answer.header("x-pod"), "ratings-remote");
    assert!(
        answer
            .header("x-seen-xfcc")
            .ends_with(";URI=spiffe://cluster.local/ns/shop/sa/default"),
        "{}",
        answer.header("x-seen-xfcc")
    );
    let answer = mesh.connect(2).await.get("/", &upgrade).await;
    assert_eq!(answer.header("x-seen-xfcc"), local);
}

#[tokio::test]
async fn the_route_timeout_covers_the_response_body() {
    let mut mesh = Mesh::start(22, &[("ratings-v1", "ratings", "v1", 11)]).await;
    mesh.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: shop}
spec:\n  hosts: [ratings]\n  http:\n  - route: [{destination: {host: ratings}}]\n    timeout: 300ms\n",
    )
    .await;
    let Client::Http1(mut sender) = mesh.connect(1).await else {
        unreachable!()
    };
    let request = |path: &str| {
        Request::get(path)
            .header("host", "ratings")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // A body that arrives in time is whole.
    let response = sender.send_request(request("/slowbody/50")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"late");

    let started = Instant::now();
    let response = sender
        .send_request(request("/slowbody/2000"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "headers came in time");
    let body = response.into_body().collect().await;
    assert!(body.is_err(), "the body was cut off at the route timeout");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let metrics = mesh.metrics();
    assert_eq!(
        count(
            &metrics,
            &["response_code=\"200\"", "response_flags=\"UT\""]
        ),
        1.0,
        "{metrics}"
    );
}

/// Sends `request` as is on a new connection from the client pod and reads the answer until
/// the proxy closes the connection (or 10 s).
async fn raw_request(mesh: &Mesh, app_index: u8, request: &[u8]) -> String {
    let mut stream = mesh.dial(app_index).await;
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    let ended = read.await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        ended.is_ok(),
        "the proxy did not end the connection, after: {text}"
    );
    text
}

#[tokio::test]
async fn client_limits_hold_on_every_hop_and_bad_clients_get_4xx() {
    let mesh = Mesh::start(27, &[("ratings-remote", "ratings", "v1", 51)]).await;
    let mut client = mesh.connect(1).await;
    let header = |n: usize| (format!("x-many-{n}"), "v".to_string());
    // 99 headers with `host`: under the limit at the first hop, and still at the second hop
    // once the first added its own (request id, forwarding).
    let mut many: Vec<(String, String)> = (0..97).map(header).collect();
    many.push(("x-test-last".into(), "v".into()));
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (&**n, &**v)).collect();
    let answer = client.get("/", &many).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.header("x-pod"), "ratings-remote");
    assert_eq!(answer.header("x-seen-x-test-last"), "v");

    // One more than Envoy's 100, or a head over 60 KiB: 431 from the first hop.
    let mut head = String::from("GET / HTTP/1.1\r\nhost: ratings\r\nconnection: close\r\n");
    for n in 0..100 {
        head += &format!("x-many-{n}: v\r\n");
    }
    let answer = raw_request(&mesh, 1, format!("{head}\r\n").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: ratings\r\nconnection: close\r\nx-big: {}\r\n\r\n",
        "a".repeat(61 * 1024)
    );
    let answer = raw_request(&mesh, 1, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // An HTTP/2 client past the limits is refused too.
    let mut h2 = mesh.connect_h2(1).await;
    let too_many: Vec<(String, String)> = (0..101).map(header).collect();
    let too_many: Vec<(&str, &str)> = too_many.iter().map(|(n, v)| (&**n, &**v)).collect();
    assert_eq!(
        h2.get("/", &too_many).await.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    // Invalid chunked framing is the client's error: 400 DPE, not an upstream failure.
    let answer = raw_request(
        &mesh,
        1,
        b"POST / HTTP/1.1\r\nhost: ratings\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let metrics = mesh.metrics();
    assert_eq!(
        count(
            &metrics,
            &["response_code=\"400\"", "response_flags=\"DPE\""]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(&metrics, &["response_code=\"503\""]),
        0.0,
        "{metrics}"
    );

    // An upgrade to h2c is removed, as Envoy does: the request is served as HTTP/1.1 (curl's
    // `--http2` on an `http://` URL sends this; the connection stays HTTP/1.1).
    let mut stream = mesh.dial(1).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: ratings\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let read_head = async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap() == 1 {
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_head)
        .await
        .expect("an answer in time");
    let answer = String::from_utf8_lossy(&head).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-pod: ratings-remote"), "{answer}");
    assert!(!answer.contains("x-seen-upgrade"), "{answer}");
    assert!(!answer.contains("x-seen-http2-settings"), "{answer}");

    // A head that trickles in is cut off after the header-read timeout (2 s here), while
    // an idle keep-alive connection outlives it, and other clients are served meanwhile.
    let mut slow = mesh.dial(1).await;
    slow.write_all(b"GET / HTTP/1.1\r\nhost: ra").await.unwrap();
    let started = Instant::now();
    let mut idle = mesh.connect(1).await;
    assert_eq!(idle.get("/", &[]).await.status, StatusCode::OK);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow head was not cut off");
    assert!(started.elapsed() >= Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answer = idle.get("/", &[]).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the idle connection was closed"
    );
}

#[tokio::test]
async fn tcp_idle_timeout_comes_from_the_destination_rule() {
    let net = 29;
    let mut mesh = Mesh::start_with_port(
        net,
        &[("blue-1", "blue", "v1", 11), ("green-1", "green", "v1", 12)],
        "tcp-web",
    )
    .await;
    mesh.apply(
        "idle.yaml",
        &format!("{TCP_RULE}    connectionPool: {{tcp: {{idleTimeout: 1s}}}}\n"),
    )
    .await;
    // One exchange on each Service, then silence.
    let mut open = Vec::new();
    for app_index in [1, 2] {
        let mut stream = mesh.dial(app_index).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        open.push(stream);
    }
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), open[0].read_to_end(&mut rest)).await;
    let waited = started.elapsed();
    assert!(
        closed.is_ok(),
        "blue's connection outlived its 1 s idle timeout"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    // green has no rule: the proxy's default (an hour) keeps it open once the rest of the
    // answer is read.
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), open[1].read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(n)) if n > 0 => continue,
            ended => panic!("green's connection was closed: {ended:?}"),
        }
    }
}

#[tokio::test]
async fn one_pod_cannot_hold_more_than_its_share() {
    let mesh = Mesh::start_configured(30, &[("ratings-v1", "ratings", "v1", 11)], "http", |c| {
        c.sources = SourceLimits {
            max_connections: 3,
            max_requests: 2,
        };
    })
    .await;
    // Two requests whose bodies take long hold the pod's two slots, on two connections.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut client = mesh.connect(1).await;
        let pending = tokio::spawn(async move { client.get("/slowbody/3000", &[]).await });
        slow.push(pending);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The third connection is admitted; its request is refused while the two are in flight.
    let mut third = mesh.connect(1).await;
    let answer = third.get("/", &[]).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let metrics = mesh.metrics();
    assert_eq!(
        count(
            &metrics,
            &["response_code=\"503\"", "response_flags=\"UO\""]
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_source_limit_refused_total{limit=\"requests\"} 1"),
        "{metrics}"
    );
    // A fourth connection is closed at once.
    let mut fourth = mesh.dial(1).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(
        mesh.metrics()
            .contains("weft_source_limit_refused_total{limit=\"connections\"} 1"),
        "{}",
        mesh.metrics()
    );
    // Once the slow requests end, the pod's requests go through again.
    for pending in slow {
        assert_eq!(pending.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(third.get("/", &[]).await.status, StatusCode::OK);
}
