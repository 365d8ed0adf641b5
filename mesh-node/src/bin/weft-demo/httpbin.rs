//! `http`: an httpbin-like server for the L7 tests: HTTP/1.1, h2c (prior knowledge) and gRPC
//! on one port, so one Service port carries every protocol the node proxy routes.
//!
//! Every HTTP answer is a JSON echo of what arrived (`pod`, `version`, `method`, `path`,
//! `query`, `protocol`, `authority`, `headers`, `peer`, and `body` when there was one) and
//! carries the response headers `x-weft-pod` and `x-weft-version`, so a test sees which pod
//! served it, what the proxy changed on the way, and which hop connected. Paths:
//! - `/status/<code>` answers `<code>`; `/delay/<ms>` answers after `<ms>`;
//! - `/count` adds `count`, the requests this pod served so far (admin requests excluded);
//! - `/ws` with `Connection: upgrade` and `Upgrade: websocket` answers 101 and then echoes
//!   raw bytes. There is no WebSocket framing: it proves that a proxy passes an upgraded
//!   connection through, for which any byte echo will do;
//! - anything else is echoed.
//!
//! gRPC requests (`content-type: application/grpc...`) go to `weft.demo.Echo` (`grpc.rs`).
//!
//! `--fail-every N` answers every Nth request with `--fail-status` (gRPC calls: every Nth of
//! `--grpc-fail-every` with UNAVAILABLE); `--delay-ms` delays every answer. The same knobs
//! change at runtime, so a test can break one endpoint and mend it again (outlier
//! detection); call these on the pod's own address, not through a Service:
//! - `POST /admin/fail?status=503&every=1`: fail every `every`th HTTP request and gRPC call;
//! - `POST /admin/delay?ms=500`; `POST /admin/recover`: no failures, no delay;
//! - `GET /admin`: the current knobs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

use crate::grpc::{self, Code};
use crate::net;
use crate::serve::pod_name;

/// Response body of every answer: a JSON document, or gRPC frames with trailers.
pub type Body = BoxBody<Bytes, Infallible>;

/// Request bodies are echoed, so they are kept small.
const MAX_BODY: usize = 1 << 20;
/// Longest `/delay/<ms>` and `delay-ms`: a test that asks for more is wrong.
const MAX_DELAY: Duration = Duration::from_secs(60);

const POD_HEADER: HeaderName = HeaderName::from_static("x-weft-pod");
const VERSION_HEADER: HeaderName = HeaderName::from_static("x-weft-version");

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TCP port to listen on (all addresses): HTTP/1.1, h2c and gRPC.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Version reported in every answer (a Service subset's label in the tests).
    #[arg(long, default_value = "v1")]
    version: String,
    /// Answer every Nth HTTP request with --fail-status (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    fail_every: u64,
    /// Status of the failing answers.
    #[arg(long, default_value_t = 503, value_parser = parse_status)]
    fail_status: u16,
    /// Delay every answer (HTTP and gRPC) by this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// Answer every Nth gRPC call with UNAVAILABLE (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    grpc_fail_every: u64,
}

/// The failure and delay knobs: set from the command line, changed through `/admin`.
#[derive(Debug, Default)]
struct Knobs {
    fail_every: AtomicU64,
    fail_status: AtomicU16,
    grpc_fail_every: AtomicU64,
    delay_ms: AtomicU64,
}

/// What every connection shares.
#[derive(Debug)]
pub struct Server {
    version: String,
    pod: String,
    pod_header: HeaderValue,
    version_header: HeaderValue,
    knobs: Knobs,
    /// Requests served (HTTP and gRPC, admin excluded), for `/count`.
    served: AtomicU64,
    /// HTTP requests and gRPC calls, each counted for its own `fail every N`.
    http_requests: AtomicU64,
    grpc_calls: AtomicU64,
}

/// What a non-admin HTTP path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Echo,
    Count,
    Status(StatusCode),
    Delay(Duration),
    Invalid(String),
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = Server::new(&args, pod_name())?;
    let listener = net::listen(args.port).await?;
    tracing::info!(
        "http {} (pod {}) listening on {}: HTTP/1.1, h2c, gRPC {}",
        server.version,
        server.pod,
        listener.local_addr()?,
        grpc::SERVICE
    );
    serve(listener, Arc::new(server)).await;
    Ok(())
}

/// Serves every accepted connection; never returns.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    loop {
        let (stream, peer) = net::accept(&listener).await;
        tokio::spawn(serve_connection(stream, peer, Arc::clone(&server)));
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, server: Arc<Server>) {
    let _ = stream.set_nodelay(true);
    let handler = service_fn(move |request| handle(Arc::clone(&server), peer, request));
    // `auto` tells HTTP/2 prior knowledge from HTTP/1.1 by the connection preface.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Headers as a Go or Node server takes them (hyper's own default is 100): the mesh's
    // limits are what the tests exercise, with the headers the proxies add on top.
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .max_headers(1000);
    builder.http2().timer(TokioTimer::new());
    let result = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), handler)
        .await;
    if let Err(err) = result {
        tracing::debug!(%peer, "connection ended: {err}");
    }
}

async fn handle(
    server: Arc<Server>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let (method, uri, version) = (
        request.method().clone(),
        request.uri().clone(),
        request.version(),
    );
    let response = server.respond(peer, request).await;
    tracing::info!(
        target: "access",
        %method,
        path = %uri,
        protocol = protocol(version),
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        %peer,
    );
    Ok(response)
}

impl Server {
    pub fn new(args: &Args, pod: String) -> anyhow::Result<Self> {
        let knobs = Knobs::default();
        knobs.fail_every.store(args.fail_every, Ordering::Relaxed);
        knobs.fail_status.store(args.fail_status, Ordering::Relaxed);
        knobs
            .grpc_fail_every
            .store(args.grpc_fail_every, Ordering::Relaxed);
        knobs.delay_ms.store(args.delay_ms, Ordering::Relaxed);
        Ok(Self {
            pod_header: HeaderValue::from_str(&pod)
                .map_err(|_| anyhow::anyhow!("pod name {pod:?} is not a header value"))?,
            version_header: HeaderValue::from_str(&args.version)
                .map_err(|_| anyhow::anyhow!("version {:?} is not a header value", args.version))?,
            version: args.version.clone(),
            pod,
            knobs,
            served: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
            grpc_calls: AtomicU64::new(0),
        })
    }

    async fn respond(&self, peer: SocketAddr, mut request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        if path == "/admin" || path.starts_with("/admin/") {
            return self.admin(request.method(), path, request.uri().query());
        }
        if path == "/ws" && wants_websocket(&request) {
            return self.upgrade(&mut request);
        }
        let count = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        let delay = self.knobs.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay).min(MAX_DELAY)).await;
        }
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                let fields = json!({ "error": format!("reading the request body: {err}") });
                return self.echo(StatusCode::BAD_REQUEST, peer, &parts, &Bytes::new(), fields);
            }
        };
        if grpc::is_grpc(&parts.headers) {
            return self.grpc(&parts, &body).await;
        }
        self.http(peer, &parts, &body, count).await
    }

    async fn http(
        &self,
        peer: SocketAddr,
        parts: &Parts,
        body: &Bytes,
        count: u64,
    ) -> Response<Body> {
        let n = self.http_requests.fetch_add(1, Ordering::Relaxed) + 1;
        if nth(n, self.knobs.fail_every.load(Ordering::Relaxed)) {
            let status = StatusCode::from_u16(self.knobs.fail_status.load(Ordering::Relaxed))
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let fields = json!({ "error": "injected failure" });
            return self.echo(status, peer, parts, body, fields);
        }
        match route(parts.uri.path()) {
            Route::Echo => self.echo(StatusCode::OK, peer, parts, body, json!({})),
            Route::Count => self.echo(StatusCode::OK, peer, parts, body, json!({ "count": count })),
            Route::Status(status) => self.echo(status, peer, parts, body, json!({})),
            Route::Delay(delay) => {
                tokio::time::sleep(delay).await;
                self.echo(StatusCode::OK, peer, parts, body, json!({}))
            }
            Route::Invalid(error) => self.echo(
                StatusCode::BAD_REQUEST,
                peer,
                parts,
                body,
                json!({ "error": error }),
            ),
        }
    }

    async fn grpc(&self, parts: &Parts, body: &[u8]) -> Response<Body> {
        let n = self.grpc_calls.fetch_add(1, Ordering::Relaxed) + 1;
        let identity = self.identity_headers();
        let Some(method) = grpc::method(parts.uri.path()) else {
            let details = format!("{} has no method {}", grpc::SERVICE, parts.uri.path());
            return grpc::response(None, Code::Unimplemented, &details, identity);
        };
        let message = match grpc::decode(body) {
            Ok(message) => message,
            Err(err) => {
                return grpc::response(None, Code::InvalidArgument, &err.to_string(), identity)
            }
        };
        if method == grpc::Method::Slow {
            let ms = parts
                .headers
                .get("delay-ms")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(grpc::SLOW_DEFAULT_MS);
            tokio::time::sleep(Duration::from_millis(ms).min(MAX_DELAY)).await;
        }
        if nth(n, self.knobs.grpc_fail_every.load(Ordering::Relaxed)) {
            return grpc::response(None, Code::Unavailable, "injected failure", identity);
        }
        let reply = grpc::reply(&self.version, &self.pod, message);
        grpc::response(Some(reply), Code::Ok, "", identity)
    }

    /// Answers 101 and echoes the upgraded connection's bytes until the client closes.
    fn upgrade(&self, request: &mut Request<Incoming>) -> Response<Body> {
        let upgraded = hyper::upgrade::on(request);
        tokio::spawn(async move {
            let upgraded = match upgraded.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    tracing::debug!("upgrade failed: {err}");
                    return;
                }
            };
            let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
            if let Err(err) = tokio::io::copy(&mut reader, &mut writer).await {
                tracing::debug!("upgraded connection ended: {}", net::describe(&err));
            }
            let _ = writer.shutdown().await;
        });
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.extend(self.identity_headers());
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        response
    }

    fn admin(&self, method: &Method, path: &str, query: Option<&str>) -> Response<Body> {
        let knobs = &self.knobs;
        let result = match (method, path) {
            (&Method::GET, "/admin") => Ok(()),
            (&Method::POST, "/admin/fail") => {
                let status = match query_param(query, "status") {
                    Some(s) => parse_status(s),
                    None => Ok(knobs.fail_status.load(Ordering::Relaxed)),
                };
                let every = query_param(query, "every").map_or(Ok(1), |e| {
                    e.parse::<u64>()
                        .map_err(|_| format!("every must be a number, got {e:?}"))
                });
                status.and_then(|status| {
                    let every = every?;
                    knobs.fail_status.store(status, Ordering::Relaxed);
                    knobs.fail_every.store(every, Ordering::Relaxed);
                    knobs.grpc_fail_every.store(every, Ordering::Relaxed);
                    Ok(())
                })
            }
            (&Method::POST, "/admin/delay") => query_param(query, "ms")
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| knobs.delay_ms.store(ms, Ordering::Relaxed))
                .ok_or_else(|| "expected ?ms=<milliseconds>".to_owned()),
            (&Method::POST, "/admin/recover") => {
                knobs.fail_every.store(0, Ordering::Relaxed);
                knobs.grpc_fail_every.store(0, Ordering::Relaxed);
                knobs.delay_ms.store(0, Ordering::Relaxed);
                Ok(())
            }
            _ => {
                return self.json(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": format!("no admin action {method} {path}") }),
                )
            }
        };
        match result {
            Ok(()) => self.json(StatusCode::OK, &self.state()),
            Err(error) => self.json(StatusCode::BAD_REQUEST, &json!({ "error": error })),
        }
    }

    fn state(&self) -> Value {
        let knobs = &self.knobs;
        json!({
            "pod": self.pod,
            "version": self.version,
            "fail_every": knobs.fail_every.load(Ordering::Relaxed),
            "fail_status": knobs.fail_status.load(Ordering::Relaxed),
            "grpc_fail_every": knobs.grpc_fail_every.load(Ordering::Relaxed),
            "delay_ms": knobs.delay_ms.load(Ordering::Relaxed),
            "served": self.served.load(Ordering::Relaxed),
        })
    }

    fn echo(
        &self,
        status: StatusCode,
        peer: SocketAddr,
        parts: &Parts,
        body: &Bytes,
        fields: Value,
    ) -> Response<Body> {
        let headers: Map<String, Value> = parts
            .headers
            .keys()
            .map(|name| {
                let values: Vec<&str> = parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("<binary>"))
                    .collect();
                (name.as_str().to_owned(), values.join(", ").into())
            })
            .collect();
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get("host").and_then(|h| h.to_str().ok()))
            .unwrap_or_default();
        let mut echo = json!({
            "pod": self.pod,
            "version": self.version,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query().unwrap_or_default(),
            "protocol": protocol(parts.version),
            "authority": authority,
            "headers": headers,
            "peer": peer.to_string(),
        });
        if !body.is_empty() {
            echo["body"] = String::from_utf8_lossy(body).into();
        }
        if let (Value::Object(echo), Value::Object(fields)) = (&mut echo, fields) {
            echo.extend(fields);
        }
        self.json(status, &echo)
    }

    fn json(&self, status: StatusCode, body: &Value) -> Response<Body> {
        // Statuses that may not carry a body get none; the rest end with a newline, so
        // that curl output of many requests stays one answer per line.
        let text = if bodyless(status) {
            Bytes::new()
        } else {
            let mut text = body.to_string();
            text.push('\n');
            text.into()
        };
        let mut response = Response::new(Full::new(text).boxed());
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.extend(self.identity_headers());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }

    fn identity_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(POD_HEADER, self.pod_header.clone());
        headers.insert(VERSION_HEADER, self.version_header.clone());
        headers
    }
}

fn route(path: &str) -> Route {
    if path == "/count" {
        return Route::Count;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
            Some(code) => StatusCode::from_u16(code)
                .map(Route::Status)
                .unwrap_or_else(|_| Route::Invalid(format!("bad status {code}"))),
            None => Route::Invalid(format!("/status/<code> needs a code 200-599, got {code:?}")),
        };
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        return match ms.parse::<u64>() {
            Ok(ms) if Duration::from_millis(ms) <= MAX_DELAY => {
                Route::Delay(Duration::from_millis(ms))
            }
            _ => Route::Invalid(format!(
                "/delay/<ms> needs milliseconds up to {}, got {ms:?}",
                MAX_DELAY.as_millis()
            )),
        };
    }
    Route::Echo
}

/// Whether request number `n` (from 1) is one of every `every`th; `every` 0 is never.
fn nth(n: u64, every: u64) -> bool {
    every > 0 && n.is_multiple_of(every)
}

fn wants_websocket(request: &Request<Incoming>) -> bool {
    let has_token = |name, token: &str| {
        request.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    request.version() == Version::HTTP_11
        && has_token(CONNECTION, "upgrade")
        && has_token(UPGRADE, "websocket")
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

fn parse_status(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .ok_or_else(|| format!("status must be 200-599, got {text:?}"))
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

fn bodyless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

/// A body of at most one data frame followed by trailers (gRPC's status).
pub fn stream_body(data: Option<Bytes>, trailers: HeaderMap) -> Body {
    let frames = data
        .into_iter()
        .map(Frame::data)
        .chain(std::iter::once(Frame::trailers(trailers)))
        .map(Ok::<_, Infallible>);
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::client::conn::{http1, http2};
    use tokio::io::AsyncReadExt as _;

    fn args(fail_every: u64, grpc_fail_every: u64) -> Args {
        Args {
            port: 0,
            version: "v2".into(),
            fail_every,
            fail_status: 503,
            delay_ms: 0,
            grpc_fail_every,
        }
    }

    async fn start(args: Args) -> SocketAddr {
        let server = Server::new(&args, "echo-v2-pod".into()).expect("server");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, Arc::new(server)));
        addr
    }

    /// One HTTP/1.1 or h2c connection that sends requests one after another.
    enum Client {
        H1(http1::SendRequest<Full<Bytes>>),
        H2(http2::SendRequest<Full<Bytes>>),
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }
    }

    impl Client {
        async fn connect(addr: SocketAddr, h2: bool) -> Self {
            let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
            if h2 {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                tokio::spawn(conn);
                Self::H2(sender)
            } else {
                let (sender, conn) = http1::handshake(io).await.expect("h1 handshake");
                tokio::spawn(conn);
                Self::H1(sender)
            }
        }

        async fn send(&mut self, request: Request<Full<Bytes>>) -> Answer {
            let response = match self {
                Self::H1(sender) => sender.send_request(request).await,
                Self::H2(sender) => sender.send_request(request).await,
            }
            .expect("response");
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.expect("body");
            let trailers = collected.trailers().cloned();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            }
        }

        async fn request(&mut self, method: Method, path: &str) -> Answer {
            let request = Request::builder()
                .method(method)
                .uri(format!("http://test{path}"))
                .header("end-user", "jason")
                .body(Full::new(Bytes::new()))
                .expect("request");
            self.send(request).await
        }

        async fn get(&mut self, path: &str) -> Answer {
            self.request(Method::GET, path).await
        }

        async fn grpc(&mut self, method: &str, message: &[u8]) -> Answer {
            let request = Request::builder()
                .method(Method::POST)
                .uri(format!("http://test/{}/{method}", grpc::SERVICE))
                .header(CONTENT_TYPE, "application/grpc")
                .header("te", "trailers")
                .body(Full::new(grpc::encode(message)))
                .expect("request");
            self.send(request).await
        }
    }

    fn grpc_status(answer: &Answer) -> Option<&str> {
        answer.trailers.as_ref()?.get("grpc-status")?.to_str().ok()
    }

    #[tokio::test]
    async fn echoes_requests_over_http1_keep_alive() {
        let addr = start(args(0, 0)).await;
        let mut client = Client::connect(addr, false).await;
        let first = client.get("/anything?a=1").await;
        let second = client.get("/anything").await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(first.headers["x-weft-version"], "v2");
        assert_eq!(first.headers["x-weft-pod"], "echo-v2-pod");
        let body = first.json();
        assert_eq!(body["pod"], "echo-v2-pod");
        assert_eq!(body["version"], "v2");
        assert_eq!(body["method"], "GET");
        assert_eq!(body["path"], "/anything");
        assert_eq!(body["query"], "a=1");
        assert_eq!(body["protocol"], "HTTP/1.1");
        assert_eq!(body["headers"]["end-user"], "jason");
        assert_eq!(body["peer"], second.json()["peer"], "one connection");
    }

    #[tokio::test]
    async fn speaks_h2c_with_prior_knowledge_on_the_same_port() {
        let addr = start(args(0, 0)).await;
        let mut client = Client::connect(addr, true).await;
        let answer = client.get("/status/418").await;
        assert_eq!(answer.status, StatusCode::IM_A_TEAPOT);
        let body = answer.json();
        assert_eq!(body["protocol"], "HTTP/2");
        assert_eq!(body["authority"], "test");
    }

    #[tokio::test]
    async fn status_delay_and_count_paths() {
        let addr = start(args(0, 0)).await;
        let mut client = Client::connect(addr, false).await;
        assert_eq!(
            client.get("/status/abc").await.status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(client.get("/status/204").await.body.len(), 0);
        let started = Instant::now();
        assert_eq!(client.get("/delay/150").await.status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(client.get("/count").await.json()["count"], 4);
    }

    #[tokio::test]
    async fn fails_every_nth_request() {
        let addr = start(args(3, 0)).await;
        let mut client = Client::connect(addr, false).await;
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(client.get("/").await.status.as_u16());
        }
        assert_eq!(statuses, [200, 200, 503, 200, 200, 503]);
    }

    #[tokio::test]
    async fn admin_breaks_and_mends_the_pod_without_counting() {
        let addr = start(args(0, 0)).await;
        let mut client = Client::connect(addr, false).await;
        let set = client.request(Method::POST, "/admin/fail?status=500").await;
        assert_eq!(set.json()["fail_every"], 1);
        assert_eq!(
            client.get("/").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let mut h2 = Client::connect(addr, true).await;
        assert_eq!(grpc_status(&h2.grpc("Hello", b"x").await), Some("14"));
        client.request(Method::POST, "/admin/recover").await;
        assert_eq!(client.get("/count").await.json()["count"], 3);
        assert_eq!(
            client
                .request(Method::POST, "/admin/fail?status=42")
                .await
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            client.get("/admin/nope").await.status,
            StatusCode::NOT_FOUND
        );
        let set = client.request(Method::POST, "/admin/delay?ms=100").await;
        assert_eq!(set.json()["delay_ms"], 100);
        let started = Instant::now();
        client.get("/").await;
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn websocket_upgrade_echoes_raw_bytes() {
        let addr = start(args(0, 0)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n\
                  Upgrade: websocket\r\n\r\n",
            )
            .await
            .expect("write");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("read head"));
        }
        let head = String::from_utf8(head).expect("ascii");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        stream.write_all(b"raw bytes").await.expect("write");
        let mut echoed = [0; 9];
        stream.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"raw bytes");
    }

    #[tokio::test]
    async fn grpc_hello_answers_with_trailers() {
        let addr = start(args(0, 2)).await;
        let mut client = Client::connect(addr, true).await;
        let ok = client.grpc("Hello", b"hi").await;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.headers[CONTENT_TYPE], "application/grpc");
        assert_eq!(grpc::decode(&ok.body), Ok(&b"v2:echo-v2-pod:hi"[..]));
        assert_eq!(grpc_status(&ok), Some("0"));

        let failed = client.grpc("Hello", b"hi").await;
        assert_eq!(grpc_status(&failed), Some("14"));
        assert!(failed.body.is_empty());

        let unknown = client.grpc("Nope", b"hi").await;
        assert_eq!(grpc_status(&unknown), Some("12"));
    }

    #[tokio::test]
    async fn grpc_slow_waits_for_its_metadata() {
        let addr = start(args(0, 0)).await;
        let mut client = Client::connect(addr, true).await;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://test/{}/Slow", grpc::SERVICE))
            .header(CONTENT_TYPE, "application/grpc")
            .header("delay-ms", "120")
            .body(Full::new(grpc::encode(b"s")))
            .expect("request");
        let started = Instant::now();
        let answer = client.send(request).await;
        assert!(started.elapsed() >= Duration::from_millis(120));
        assert_eq!(grpc_status(&answer), Some("0"));
    }

    #[test]
    fn routes_and_helpers() {
        assert_eq!(route("/"), Route::Echo);
        assert_eq!(route("/count"), Route::Count);
        assert_eq!(
            route("/status/503"),
            Route::Status(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(matches!(route("/status/99"), Route::Invalid(_)));
        assert_eq!(route("/delay/20"), Route::Delay(Duration::from_millis(20)));
        assert!(matches!(route("/delay/600000"), Route::Invalid(_)));
        assert!(!nth(3, 0));
        assert!(nth(3, 3) && nth(6, 3) && !nth(4, 3));
        assert_eq!(query_param(Some("a=1&status=500"), "status"), Some("500"));
        assert_eq!(query_param(None, "status"), None);
    }
}
