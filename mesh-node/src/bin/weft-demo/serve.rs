//! `serve`: one Bookinfo role over HTTP/1.1 with keep-alive.
//!
//! Upstream calls open a fresh connection each time, as Bookinfo's services do: an L4 mesh
//! balances connections, so reusing one would pin productpage to a single reviews version.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::ValueEnum as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::bookinfo::{self, CallPolicy, Identity, Role, Route};
use crate::client::{self, Url};
use crate::net;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bookinfo role to play.
    #[arg(long, value_enum)]
    service: Role,
    /// Version reported in every body; for reviews it also picks the stars: v1 none,
    /// v2 black, v3 red.
    #[arg(long, default_value = "v1")]
    version: String,
    /// TCP port to listen on (all addresses).
    #[arg(long, default_value_t = 9080)]
    port: u16,
    /// Base URL of an upstream, NAME one of details, reviews, ratings; repeatable.
    /// Default: http://NAME:9080.
    #[arg(long = "upstream", value_name = "NAME=URL", value_parser = parse_upstream)]
    upstreams: Vec<(Role, Url)>,
    /// One time budget for every upstream call, instead of Bookinfo's (productpage 3 s
    /// with reviews tried twice, reviews v2 10 s, reviews v3 2.5 s).
    #[arg(long, value_name = "MS")]
    upstream_timeout_ms: Option<u64>,
}

/// Everything a request handler needs; shared by all connections.
#[derive(Debug)]
pub struct Service {
    identity: Identity,
    stars: Option<&'static str>,
    details: Url,
    reviews: Url,
    ratings: Url,
    timeout_override: Option<Duration>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let service = Service::new(
        Identity {
            role: args.service,
            version: args.version,
            pod: pod_name(),
        },
        &args.upstreams,
        args.upstream_timeout_ms.map(Duration::from_millis),
    )?;
    let listener = net::listen(args.port).await?;
    tracing::info!(
        "{} {} (pod {}) listening on {}",
        service.identity.role.name(),
        service.identity.version,
        service.identity.pod,
        listener.local_addr()?
    );
    serve(listener, Arc::new(service)).await;
    Ok(())
}

/// Serves HTTP/1.1 on every accepted connection; never returns.
pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    loop {
        let (stream, peer) = net::accept(&listener).await;
        tokio::spawn(serve_connection(stream, peer, Arc::clone(&service)));
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, service: Arc<Service>) {
    let _ = stream.set_nodelay(true);
    let handler = service_fn(move |request| handle(Arc::clone(&service), peer, request));
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), handler)
        .await;
    if let Err(err) = result {
        tracing::debug!(%peer, "connection ended: {err}");
    }
}

async fn handle(
    service: Arc<Service>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let (parts, _body) = request.into_parts();
    let response = service
        .respond(peer, &parts.method, parts.uri.path(), &parts.headers)
        .await;
    tracing::info!(
        target: "access",
        method = %parts.method,
        path = %parts.uri,
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        %peer,
        request_id = header_or_dash(&parts.headers, "x-request-id"),
        end_user = header_or_dash(&parts.headers, "end-user"),
    );
    Ok(response)
}

fn header_or_dash<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-")
}

impl Service {
    pub fn new(
        identity: Identity,
        upstreams: &[(Role, Url)],
        timeout_override: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let stars = match identity.role {
            Role::Reviews => {
                bookinfo::stars_color(&identity.version).map_err(anyhow::Error::msg)?
            }
            _ => None,
        };
        let upstream = |role: Role| -> anyhow::Result<Url> {
            match upstreams.iter().rev().find(|(name, _)| *name == role) {
                Some((_, url)) => Ok(url.clone()),
                None => format!("http://{}:9080", role.name())
                    .parse()
                    .map_err(anyhow::Error::msg),
            }
        };
        Ok(Self {
            stars,
            details: upstream(Role::Details)?,
            reviews: upstream(Role::Reviews)?,
            ratings: upstream(Role::Ratings)?,
            identity,
            timeout_override,
        })
    }

    async fn respond(
        &self,
        peer: SocketAddr,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            let fields = json!({ "error": format!("method {method} not allowed") });
            let body = self.identity.body(peer, headers, fields);
            return json_response(StatusCode::METHOD_NOT_ALLOWED, &body);
        }
        let (status, fields) = match bookinfo::route(self.identity.role, path) {
            Ok(Route::Health) => return text_response(StatusCode::OK, "ok"),
            Ok(Route::ProductPage) => (
                StatusCode::OK,
                self.answer(bookinfo::PRODUCT_ID, headers).await,
            ),
            Ok(Route::Item(id)) => (StatusCode::OK, self.answer(id, headers).await),
            Err(err) => (err.status(), json!({ "error": err.message() })),
        };
        json_response(status, &self.identity.body(peer, headers, fields))
    }

    /// The role-specific fields for product `id`, calling upstreams where the role does.
    async fn answer(&self, id: u32, headers: &HeaderMap) -> Value {
        match self.identity.role {
            Role::Productpage => {
                let (details, reviews) = tokio::join!(
                    self.call(Role::Details, id, headers),
                    self.call(Role::Reviews, id, headers),
                );
                bookinfo::productpage(details, reviews)
            }
            Role::Details => bookinfo::details(id),
            Role::Ratings => bookinfo::ratings(id),
            Role::Reviews => {
                let rated = match self.stars {
                    Some(color) => Some((self.call(Role::Ratings, id, headers).await, color)),
                    None => None,
                };
                bookinfo::reviews(id, rated)
            }
        }
    }

    /// GETs `/<callee>/<id>` from the callee, retrying as Bookinfo does; what went wrong
    /// becomes the answer, so the caller still renders its page.
    async fn call(&self, callee: Role, id: u32, request: &HeaderMap) -> Value {
        let url = self
            .upstream(callee)
            .join(&format!("/{}/{id}", callee.name()));
        let headers = bookinfo::propagated(request);
        let policy = self.policy(callee);
        let mut failure = Value::Null;
        for attempt in 1..=policy.attempts.max(1) {
            match fetch(&url, &headers, policy.timeout).await {
                Ok(answer) => return answer,
                Err(error) => {
                    tracing::warn!(
                        attempt,
                        "{}",
                        error["error"].as_str().unwrap_or("upstream failed")
                    );
                    failure = error;
                }
            }
        }
        failure
    }

    fn upstream(&self, callee: Role) -> &Url {
        match callee {
            Role::Details => &self.details,
            Role::Reviews => &self.reviews,
            // Nobody calls productpage; ratings is the only other upstream.
            Role::Ratings | Role::Productpage => &self.ratings,
        }
    }

    fn policy(&self, callee: Role) -> CallPolicy {
        let mut policy = CallPolicy::of(self.identity.role, &self.identity.version, callee);
        if let Some(timeout) = self.timeout_override {
            policy.timeout = timeout;
        }
        policy
    }
}

/// One upstream exchange: the JSON answer, or the `{"error","status"}` that replaces it.
async fn fetch(url: &Url, headers: &HeaderMap, budget: Duration) -> Result<Value, Value> {
    let reply = client::get_once(url, headers, budget)
        .await
        .map_err(|err| {
            let status = if err.is_timeout() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            bookinfo::upstream_error(err.to_string(), status)
        })?;
    if !reply.status.is_success() {
        let message = format!("GET {url} returned {}", reply.status);
        return Err(bookinfo::upstream_error(message, reply.status));
    }
    serde_json::from_slice(&reply.body).map_err(|_| {
        let message = format!("GET {url} returned a body that is not JSON");
        bookinfo::upstream_error(message, StatusCode::BAD_GATEWAY)
    })
}

fn parse_upstream(spec: &str) -> Result<(Role, Url), String> {
    let (name, url) = spec
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=URL, got {spec:?}"))?;
    let role = Role::from_str(name, true)
        .ok()
        .filter(|role| *role != Role::Productpage)
        .ok_or_else(|| {
            format!("unknown upstream {name:?}: expected details, reviews or ratings")
        })?;
    Ok((role, url.parse()?))
}

/// The pod this process plays: `POD_NAME` (set by the virtual cluster, whose pods share
/// the host's UTS namespace), else the host name.
pub(crate) fn pod_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    response(status, "application/json", text.into())
}

fn text_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Connection;

    const BUDGET: Duration = Duration::from_secs(5);

    async fn start(role: Role, version: &str, upstreams: &[(Role, SocketAddr)]) -> SocketAddr {
        start_with_timeout(role, version, upstreams, None).await
    }

    async fn start_with_timeout(
        role: Role,
        version: &str,
        upstreams: &[(Role, SocketAddr)],
        timeout: Option<Duration>,
    ) -> SocketAddr {
        let upstreams: Vec<(Role, Url)> = upstreams
            .iter()
            .map(|(role, addr)| (*role, url(*addr, "")))
            .collect();
        let identity = Identity {
            role,
            version: version.into(),
            pod: format!("{}-{version}-pod", role.name()),
        };
        let service = Service::new(identity, &upstreams, timeout).expect("valid service");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(serve(listener, Arc::new(service)));
        addr
    }

    fn url(addr: SocketAddr, path: &str) -> Url {
        format!("http://{addr}{path}").parse().expect("valid URL")
    }

    async fn open(addr: SocketAddr, path: &str) -> Connection {
        Connection::open(&url(addr, path), BUDGET)
            .await
            .expect("connect")
    }

    async fn get_json(conn: &mut Connection, headers: &HeaderMap) -> (StatusCode, Value) {
        let reply = conn.get(headers).await.expect("response");
        let body = serde_json::from_slice(&reply.body).expect("JSON body");
        (reply.status, body)
    }

    /// A port where nothing listens.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("local addr")
    }

    /// A full Bookinfo with reviews at `reviews_version`; returns productpage's address.
    async fn bookinfo(reviews_version: &str) -> SocketAddr {
        let ratings = start(Role::Ratings, "v1", &[]).await;
        let details = start(Role::Details, "v1", &[]).await;
        let reviews = start(Role::Reviews, reviews_version, &[(Role::Ratings, ratings)]).await;
        start(
            Role::Productpage,
            "v1",
            &[(Role::Details, details), (Role::Reviews, reviews)],
        )
        .await
    }

    #[tokio::test]
    async fn health_answers_ok() {
        let addr = start(Role::Ratings, "v1", &[]).await;
        let reply = open(addr, "/health")
            .await
            .get(&HeaderMap::new())
            .await
            .expect("reply");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(&reply.body[..], b"ok");
    }

    #[tokio::test]
    async fn details_reports_item_and_the_connecting_peer() {
        let addr = start(Role::Details, "v1", &[]).await;
        let mut conn = open(addr, "/details/3").await;
        let (status, body) = get_json(&mut conn, &HeaderMap::new()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["service"], "details");
        assert_eq!(body["version"], "v1");
        assert_eq!(body["id"], 3);
        assert_eq!(body["peer"], conn.local_addr().to_string());
    }

    #[tokio::test]
    async fn connections_are_kept_alive() {
        let addr = start(Role::Ratings, "v1", &[]).await;
        let mut conn = open(addr, "/ratings/0").await;
        let (_, first) = get_json(&mut conn, &HeaderMap::new()).await;
        let (_, second) = get_json(&mut conn, &HeaderMap::new()).await;
        assert_eq!(first["peer"], second["peer"]);
        assert_eq!(first["ratings"], json!({ "Reviewer1": 5, "Reviewer2": 4 }));
    }

    #[tokio::test]
    async fn productpage_assembles_the_call_chain_and_propagates_headers() {
        let page = bookinfo("v2").await;
        let mut headers = HeaderMap::new();
        headers.insert("end-user", HeaderValue::from_static("jason"));
        headers.insert("x-request-id", HeaderValue::from_static("req-1"));
        headers.insert("authorization", HeaderValue::from_static("not propagated"));
        let mut conn = open(page, "/productpage").await;
        let (status, body) = get_json(&mut conn, &headers).await;

        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["service"], "productpage");
        assert_eq!(body["pod"], "productpage-v1-pod");
        assert_eq!(body["peer"], conn.local_addr().to_string());
        assert_eq!(body["details"]["service"], "details");
        assert_eq!(body["details"]["author"], "William Shakespeare");
        let reviews = &body["reviews"];
        assert_eq!(reviews["version"], "v2");
        assert_eq!(reviews["stars_color"], "black");
        assert_eq!(reviews["ratings"]["service"], "ratings");
        let expected = json!({ "end-user": "jason", "x-request-id": "req-1" });
        assert_eq!(reviews["request_headers"], expected);
        assert_eq!(reviews["ratings"]["request_headers"], expected);
    }

    #[tokio::test]
    async fn reviews_versions_differ_in_ratings_and_stars() {
        let ratings = start(Role::Ratings, "v1", &[]).await;
        for (version, color) in [("v1", None), ("v3", Some("red"))] {
            let reviews = start(Role::Reviews, version, &[(Role::Ratings, ratings)]).await;
            let (_, body) =
                get_json(&mut open(reviews, "/reviews/0").await, &HeaderMap::new()).await;
            assert_eq!(body["service"], "reviews");
            assert_eq!(body["version"], version);
            assert_eq!(body["stars_color"].as_str(), color, "{version}");
            assert_eq!(body.get("ratings").is_some(), color.is_some(), "{version}");
        }
    }

    #[tokio::test]
    async fn unreachable_upstreams_still_render_the_page() {
        let down = closed_port().await;
        let page = start(
            Role::Productpage,
            "v1",
            &[(Role::Details, down), (Role::Reviews, down)],
        )
        .await;
        let (status, body) = get_json(&mut open(page, "/").await, &HeaderMap::new()).await;
        assert_eq!(status, StatusCode::OK);
        for field in ["details", "reviews"] {
            assert_eq!(body[field]["status"], 502, "{field}");
            let error = body[field]["error"].as_str().unwrap_or_default();
            assert!(error.contains("Connection refused"), "{field}: {error}");
        }
    }

    #[tokio::test]
    async fn upstream_error_status_is_passed_on() {
        // details answers 404 for a path it does not serve: point productpage's "details"
        // at a ratings server.
        let ratings = start(Role::Ratings, "v1", &[]).await;
        let page = start(Role::Productpage, "v1", &[(Role::Details, ratings)]).await;
        let (_, body) = get_json(&mut open(page, "/productpage").await, &HeaderMap::new()).await;
        assert_eq!(body["details"]["status"], 404);
    }

    #[tokio::test]
    async fn silent_upstream_times_out_as_gateway_timeout() {
        // Accepted by the kernel backlog, never answered.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ratings = silent.local_addr().expect("addr");
        let reviews = start_with_timeout(
            Role::Reviews,
            "v2",
            &[(Role::Ratings, ratings)],
            Some(Duration::from_millis(100)),
        )
        .await;
        let (status, body) =
            get_json(&mut open(reviews, "/reviews/0").await, &HeaderMap::new()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["ratings"]["status"], 504);
        assert_eq!(body["stars_color"], "black");
        drop(silent);
    }

    #[tokio::test]
    async fn unknown_paths_bad_ids_and_methods_are_refused() {
        let addr = start(Role::Details, "v1", &[]).await;
        let (status, body) = get_json(&mut open(addr, "/nope").await, &HeaderMap::new()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["service"], "details");
        let (status, _) = get_json(&mut open(addr, "/details/x").await, &HeaderMap::new()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let service = Service::new(
            Identity {
                role: Role::Details,
                version: "v1".into(),
                pod: "p".into(),
            },
            &[],
            None,
        )
        .expect("service");
        let response = service
            .respond(peer, &Method::POST, "/details/0", &HeaderMap::new())
            .await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn defaults_point_at_bookinfo_service_names() {
        let identity = Identity {
            role: Role::Productpage,
            version: "v1".into(),
            pod: "p".into(),
        };
        let service = Service::new(identity, &[], None).expect("service");
        assert_eq!(service.details.to_string(), "http://details:9080/");
        assert_eq!(service.reviews.to_string(), "http://reviews:9080/");
        assert_eq!(service.ratings.to_string(), "http://ratings:9080/");
    }

    #[test]
    fn unknown_reviews_version_is_rejected() {
        let identity = Identity {
            role: Role::Reviews,
            version: "v9".into(),
            pod: "p".into(),
        };
        let err = Service::new(identity, &[], None).expect_err("v9 is not a reviews version");
        assert!(err.to_string().contains("v1 (no ratings)"), "{err}");
    }

    #[test]
    fn upstream_flag_is_name_equals_http_url() {
        let (role, url) = parse_upstream("ratings=http://10.96.0.12:9080").expect("valid");
        assert_eq!(role, Role::Ratings);
        assert_eq!(url.to_string(), "http://10.96.0.12:9080/");
        assert!(parse_upstream("ratings").is_err());
        assert!(parse_upstream("billing=http://x").is_err());
        assert!(parse_upstream("productpage=http://x").is_err());
        assert!(parse_upstream("details=ftp://x").is_err());
    }

    #[test]
    fn timeout_override_replaces_bookinfo_budgets() {
        let identity = Identity {
            role: Role::Productpage,
            version: "v1".into(),
            pod: "p".into(),
        };
        let service =
            Service::new(identity, &[], Some(Duration::from_millis(50))).expect("service");
        let policy = service.policy(Role::Reviews);
        assert_eq!(
            (policy.timeout, policy.attempts),
            (Duration::from_millis(50), 2)
        );
    }
}
