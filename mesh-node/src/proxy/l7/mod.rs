//! L7 handling of captured connections: HTTP/1.1, HTTP/2 (h2c) and gRPC.
//!
//! A connection whose Service port speaks HTTP (declared or sniffed) is served by hyper; each
//! request is routed on its own, as Envoy does for a sidecar:
//!
//! ```text
//! request ─► route (VirtualService / HTTPRoute / GRPCRoute) ─► fault delay/abort
//!         ─► redirect / direct response, or rewrite + header changes + weighted backend
//!         ─► cluster (service, port, subset): DestinationRule policy, load balancer,
//!            outlier ejection ─► pool (circuit breakers) ─► attempt, retried per policy
//!            within the per-try and route timeouts ─► response header changes ─► client
//! ```
//!
//! Every request reads the configuration once, so a new VirtualService applies to the next
//! request, including on connections already open; requests in flight finish on the rules they
//! started with. Failures are answered as Envoy answers them, with its response flags in the
//! access log and in `istio_requests_total`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderName, HeaderValue},
    request::Parts,
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use self::body::{Finish, RequestBody, ResponseBody, Tape};
use super::{
    context::Context,
    detect::Declared,
    error::ProxyError,
    route::{self, apply_header_ops, Backend, RequestInfo, RetryPlan, RuleAction, Selection},
    upstream::{
        cluster::{self, Cluster, ClusterKey, ClusterPolicy, Outcome, Pick},
        pool::{self, ClusterPool, ConnKey, Dial, PoolError, Proto},
    },
    view::View,
};
use crate::{
    metrics::{
        access_log, access_log_enabled, AccessEntry, ClusterName, Reporter, RequestLabels,
        RequestOutcome, ResponseFlags, ServiceLabels, Workload,
    },
    model::{
        traffic::{AbortError, RetryPolicy},
        ObjectKey, Pod, Service,
    },
};

pub mod body;

type InFlight = pool::InFlight<RequestBody>;

/// Envoy's base interval between retries; each retry waits a random time up to
/// `25 ms × 2^(retry-1)`, capped at ten times the base.
const RETRY_BASE: Duration = Duration::from_millis(25);

/// Istio's retry policy for routes that set none: two retries on connection failures,
/// refused streams and gRPC `UNAVAILABLE`/`CANCELLED`, and HTTP 503.
fn default_retries() -> RetryPlan {
    RetryPlan::istio_default()
}

/// One downstream connection and what its requests share.
pub(super) struct Conn {
    ctx: Arc<Context>,
    client: SocketAddrV4,
    /// The Service the client dialled, and the port.
    service: ObjectKey,
    port: u16,
    declared: Declared,
    source: Option<Arc<Pod>>,
    /// Set on the destination side: the local pod every request goes to.
    inbound: Option<Inbound>,
    clusters: Mutex<ClusterCache>,
    /// Metric labels by destination pod and service: building them hashes every label.
    labels: Mutex<HashMap<LabelKey, RequestLabels>>,
}

/// The local pod of a destination-side connection.
struct Inbound {
    target: SocketAddrV4,
    pod: Option<Arc<Pod>>,
    service: Option<ObjectKey>,
    /// Envoy's `inbound|<port>||`: its own pool and counters, apart from the outbound
    /// clusters; looked up once per connection.
    pool: Arc<ClusterPool<RequestBody>>,
    state: Arc<cluster::ClusterState>,
}

/// Destination pod, destination service, gRPC.
type LabelKey = (Option<ObjectKey>, Option<ObjectKey>, bool);

#[derive(Default)]
struct ClusterCache {
    version: u64,
    clusters: HashMap<ClusterKey, Arc<Resolved>>,
}

/// A cluster of the current snapshot with its proxy-wide pool.
struct Resolved {
    cluster: Arc<Cluster>,
    pool: Arc<ClusterPool<RequestBody>>,
}

impl Conn {
    pub(super) fn outbound(
        ctx: Arc<Context>,
        client: SocketAddrV4,
        service: ObjectKey,
        port: u16,
        declared: Declared,
        source: Option<Arc<Pod>>,
    ) -> Self {
        Self {
            ctx,
            client,
            service,
            port,
            declared,
            source,
            inbound: None,
            clusters: Mutex::default(),
            labels: Mutex::default(),
        }
    }

    /// The destination side of a connection for `target`, a pod of this node, from `source`.
    pub(super) fn inbound(
        ctx: Arc<Context>,
        client: SocketAddrV4,
        target: SocketAddrV4,
        service: Option<ObjectKey>,
        declared: Declared,
        source: Option<Arc<Pod>>,
        pod: Option<Arc<Pod>>,
    ) -> Self {
        let service_key = service.clone().unwrap_or_else(|| ObjectKey::new("", ""));
        let cluster = ClusterKey::new(ObjectKey::new("", "inbound"), target.port(), None);
        let pool = ctx.pools.cluster(&cluster);
        let state = ctx.clusters.state(&cluster);
        let mut conn = Self::outbound(ctx, client, service_key, target.port(), declared, source);
        conn.inbound = Some(Inbound {
            target,
            pod,
            service,
            pool,
            state,
        });
        conn
    }

    /// The pooled connection that reaches a picked endpoint: directly on this node, through
    /// the peer node's tunnel otherwise, on behalf of this connection's client pod.
    fn conn_key(&self, view: &View, pick: &Pick, proto: Proto) -> Result<ConnKey, ProxyError> {
        let via = self
            .ctx
            .dialer
            .via(&view.snapshot, pick.addr, pick.node.as_ref())?;
        Ok(ConnKey {
            target: pick.addr,
            via,
            proto,
            source: self.source.as_ref().map(|p| p.key.clone()),
        })
    }

    /// How this connection's requests reach a cluster's endpoints.
    fn dial<'a>(&'a self, policy: &ClusterPolicy) -> Dial<'a> {
        Dial {
            dialer: &self.ctx.dialer,
            timeout: policy.connect_timeout,
        }
    }

    fn labels(
        &self,
        pod: Option<&Arc<Pod>>,
        service: Option<&Arc<Service>>,
        grpc: bool,
    ) -> RequestLabels {
        let key = (
            pod.map(|p| p.key.clone()),
            service.map(|s| s.key.clone()),
            grpc,
        );
        let mut labels = self.labels.lock().expect("label cache poisoned");
        if let Some(l) = labels.get(&key) {
            return l.clone();
        }
        let l = RequestLabels::new(
            if self.inbound.is_some() {
                Reporter::Destination
            } else {
                Reporter::Source
            },
            Workload::of_option(self.source.as_deref()),
            Workload::of_option(pod.map(|p| &**p)),
            ServiceLabels::of_option(service.map(|s| &**s)),
            grpc,
        );
        // A long-lived connection to a large service sees many pods; keep the cache small.
        if labels.len() >= 64 {
            labels.clear();
        }
        labels.insert(key, l.clone());
        l
    }

    /// The cluster `key` names in `view`, built once per connection and snapshot.
    fn cluster(
        &self,
        view: &View,
        key: ClusterKey,
    ) -> Result<Arc<Resolved>, cluster::ClusterError> {
        let mut cache = self.clusters.lock().expect("cluster cache poisoned");
        if cache.version != view.snapshot.version {
            cache.version = view.snapshot.version;
            cache.clusters.clear();
        }
        if let Some(resolved) = cache.clusters.get(&key) {
            return Ok(resolved.clone());
        }
        let namespace = self.source.as_ref().map(|p| &p.key.namespace);
        let cluster = view.cluster(&self.ctx.clusters, &key, namespace)?;
        let pool = self.ctx.pools.cluster(&key);
        let resolved = Arc::new(Resolved { cluster, pool });
        cache.clusters.insert(key, resolved.clone());
        Ok(resolved)
    }
}

/// Serves HTTP on `io` until the client closes it.
pub(super) async fn serve<S>(conn: Conn, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let service = service_fn(move |request| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, request).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(1024);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        debug!("downstream HTTP connection ended: {e}");
    }
}

/// What is reported when a response ended.
pub(super) struct Report {
    conn: Arc<Conn>,
    start: Instant,
    method: Method,
    uri: Uri,
    authority: Arc<str>,
    version: Version,
    request_id: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    grpc: bool,
    status: u16,
    /// `grpc-status` sent in the response headers (a trailers-only answer).
    grpc_status: Option<u32>,
    flags: ResponseFlags,
    route: Option<Arc<str>>,
    upstream: Option<SocketAddrV4>,
    cluster: Option<ClusterKey>,
    destination: Option<Arc<Pod>>,
    service: Option<Arc<Service>>,
    tape: Option<Arc<Tape>>,
    /// Held until the response body ended: circuit-breaker slots, the pooled connection,
    /// the endpoint's in-flight count.
    hold: Option<InFlight>,
    pick: Option<Pick>,
    recorded: bool,
}

impl Finish for Report {
    fn finish(mut self, end: body::BodyEnd) {
        self.record(end);
    }
}

impl Drop for Report {
    /// The client went away before the response started: Envoy reports code 0 with `DC`.
    fn drop(&mut self) {
        if !self.recorded {
            self.status = 0;
            self.record(body::BodyEnd {
                cancelled: true,
                ..Default::default()
            });
        }
    }
}

impl Report {
    fn record(&mut self, end: body::BodyEnd) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let mut flags = self.flags;
        if end.cancelled {
            flags |= ResponseFlags::DC;
        }
        if end.timed_out {
            flags |= ResponseFlags::UT;
        } else if end.upstream_error {
            flags |= ResponseFlags::UR;
        }
        let labels = self
            .conn
            .labels(self.destination.as_ref(), self.service.as_ref(), self.grpc);
        let duration = self.start.elapsed();
        let grpc_status = end.grpc_status.or(self.grpc_status);
        let request_bytes = self.tape.as_ref().map_or(0, |t| t.bytes());
        self.conn.ctx.http_metrics.record(
            &labels,
            &RequestOutcome {
                response_code: self.status,
                grpc_status,
                flags,
                duration,
                request_bytes,
                response_bytes: end.bytes,
            },
        );
        if access_log_enabled() {
            access_log(&AccessEntry {
                method: self.method.as_str(),
                path: self.uri.path_and_query().map_or("/", |p| p.as_str()),
                protocol: self.version,
                response_code: self.status,
                response_flags: flags,
                bytes_received: request_bytes,
                bytes_sent: end.bytes,
                duration,
                upstream_host: self.upstream.map(SocketAddr::V4),
                upstream_cluster: self.cluster.as_ref().map(|k| {
                    ClusterName::outbound(k.port, k.subset.as_deref(), labels.destination_service())
                }),
                route_name: self.route.as_deref(),
                authority: Some(&self.authority),
                x_forwarded_for: None,
                user_agent: self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
                request_id: self.request_id.as_ref().and_then(|v| v.to_str().ok()),
                downstream_remote_address: SocketAddr::V4(self.conn.client),
            });
        }
        // Frees the circuit-breaker slots, the pooled connection and the in-flight count.
        self.hold.take();
        self.pick.take();
    }
}

type Reply = Response<ResponseBody<Report>>;

async fn handle(conn: Arc<Conn>, request: Request<Incoming>) -> Reply {
    let start = Instant::now();
    let view = conn.ctx.view();
    let (mut parts, body) = request.into_parts();
    let authority = authority_of(&parts);
    let grpc = is_grpc(&parts.headers);
    let dialled_service = view.snapshot.services.get(&conn.service).cloned();
    let mut report = Report {
        conn: conn.clone(),
        start,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        authority: authority.clone(),
        version: parts.version,
        request_id: None,
        user_agent: parts.headers.get(header::USER_AGENT).cloned(),
        grpc,
        status: 0,
        grpc_status: None,
        flags: ResponseFlags::NONE,
        route: None,
        upstream: None,
        cluster: None,
        destination: None,
        service: dialled_service.clone(),
        tape: None,
        hold: None,
        pick: None,
        recorded: false,
    };
    if !parts.headers.contains_key(REQUEST_ID) {
        parts.headers.insert(
            REQUEST_ID,
            HeaderValue::from_str(&request_id()).expect("hex is a valid header value"),
        );
    }
    report.request_id = parts.headers.get(REQUEST_ID).cloned();
    if let Some(inbound) = &conn.inbound {
        return forward_inbound(report, &view, inbound, parts, body).await;
    }

    let selection = match view.routes.get(&conn.service) {
        Some(routes) => routes.select(&RequestInfo {
            method: &parts.method,
            uri: &parts.uri,
            authority: &authority,
            headers: &parts.headers,
            port: conn.port,
            source: conn.source.as_deref(),
        }),
        None => Selection::Unrouted,
    };
    let default_backend;
    let (rule, backend) = match &selection {
        Selection::NoMatch => {
            return local_reply(
                report,
                StatusCode::NOT_FOUND,
                ResponseFlags::NR,
                "route not found",
            );
        }
        Selection::Unrouted => {
            default_backend = Backend {
                service: Some(conn.service.clone()),
                host: conn.service.name.clone(),
                port: Some(conn.port),
                subset: None,
                weight: 1,
                request_headers: Default::default(),
                response_headers: Default::default(),
            };
            (None, &default_backend)
        }
        Selection::Rule(selected) => {
            let rule = selected.rule;
            report.route = Some(rule.name.clone());
            if let Some(fault) = &rule.fault {
                if let Some(delay) = &fault.delay {
                    if chance(delay.percentage) {
                        report.flags |= ResponseFlags::DI;
                        tokio::time::sleep(delay.fixed_delay).await;
                    }
                }
                if let Some(abort) = &fault.abort {
                    if chance(abort.percentage) {
                        return fault_abort(report, abort.error);
                    }
                }
            }
            match &rule.action {
                RuleAction::Redirect(_) => {
                    let redirect = selected
                        .redirect(&parts)
                        .expect("a redirect rule builds a redirect");
                    let (head, ()) = redirect.into_parts();
                    return local_response(
                        report,
                        head.status,
                        head.headers,
                        Bytes::new(),
                        ResponseFlags::NONE,
                    );
                }
                RuleAction::Respond { status, body } => {
                    let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                    let body = body
                        .as_ref()
                        .map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
                    return local_response(
                        report,
                        status,
                        HeaderMap::new(),
                        body,
                        ResponseFlags::NONE,
                    );
                }
                RuleAction::Forward(_) => {}
            }
            let Some(backend) = rule.pick(fastrand::u32(..)) else {
                return local_failure(report, NO_HEALTHY_UPSTREAM);
            };
            selected.rewrite(&mut parts);
            apply_header_ops(&rule.request_headers, &mut parts.headers);
            apply_header_ops(&backend.request_headers, &mut parts.headers);
            (Some(rule), backend)
        }
    };

    let Some(service_key) = backend.service.clone() else {
        return local_reply(
            report,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NC,
            "no cluster for the destination host",
        );
    };
    let Some(service) = view.snapshot.services.get(&service_key).cloned() else {
        return local_reply(
            report,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NC,
            "no cluster for the destination host",
        );
    };
    let port = backend
        .port
        .or_else(|| service_port(&service, conn.port))
        .unwrap_or(conn.port);
    report.service = Some(service.clone());
    let key = ClusterKey {
        service: service_key,
        port,
        subset: backend.subset.clone(),
    };
    report.cluster = Some(key.clone());
    let resolved = match conn.cluster(&view, key) {
        Ok(r) => r,
        Err(e) => {
            debug!("{e}");
            return local_reply(
                report,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::NC,
                "no cluster for the destination",
            );
        }
    };
    let response_ops = rule.map(|r| (&r.response_headers, &backend.response_headers));

    if is_upgrade(&parts) {
        let upgrade = hyper::upgrade::on(Request::from_parts(parts.clone(), ()));
        return forward_upgrade(report, &view, &resolved, parts, body, upgrade).await;
    }

    let proto = upstream_protocol(conn.declared, &parts, grpc, &resolved.cluster);
    prepare_head(&mut parts, &authority, proto);
    let (first_body, tape) = RequestBody::record(body);
    report.tape = tape.clone();
    let retries = rule.and_then(|r| r.retries.clone());
    let explicit_retries = retries.is_some();
    let plan = retries.unwrap_or_else(default_retries);
    let attempt = Attempts {
        view: &view,
        resolved: &resolved,
        plan: &plan,
        // Without a policy the user asked for, only requests that are safe to repeat are.
        idempotent_only: !explicit_retries,
        per_try_timeout: plan.per_try_timeout,
        proto,
    };
    let timeout = rule.and_then(|r| r.timeout);
    let mirrors = rule.map(|r| r.mirrors.clone());
    // Envoy's route timeout runs until the response is complete, body included.
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let outcome = match deadline {
        Some(deadline) => match tokio::time::timeout_at(
            deadline,
            attempt.run(&mut report, &parts, first_body, tape.as_deref()),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err((
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlags::UT,
                "upstream request timeout",
            )),
        },
        None => {
            attempt
                .run(&mut report, &parts, first_body, tape.as_deref())
                .await
        }
    };
    if let Some(mirrors) = mirrors {
        if !mirrors.is_empty() {
            mirror(&conn, &view, &mirrors, &parts, tape.as_deref());
        }
    }
    match outcome {
        Ok((mut response, (hold, pick))) => {
            report.status = response.status().as_u16();
            report.grpc_status = body::grpc_status(response.headers());
            report.hold = Some(hold);
            report.pick = Some(pick);
            strip_hop_by_hop(response.headers_mut());
            if let Some((rule_ops, backend_ops)) = response_ops {
                apply_header_ops(rule_ops, response.headers_mut());
                apply_header_ops(backend_ops, response.headers_mut());
            }
            let (mut head, upstream_body) = response.into_parts();
            head.version = report.version;
            let body = ResponseBody::upstream(upstream_body, report).with_deadline(deadline);
            Response::from_parts(head, body)
        }
        Err(failure) => local_failure(report, failure),
    }
}

/// The attempts of one request: pick an endpoint, send, decide whether to retry.
struct Attempts<'a> {
    view: &'a View,
    resolved: &'a Resolved,
    plan: &'a RetryPlan,
    idempotent_only: bool,
    per_try_timeout: Option<Duration>,
    proto: Proto,
}

type Failure = (StatusCode, ResponseFlags, &'static str);

const NO_HEALTHY_UPSTREAM: Failure = (
    StatusCode::SERVICE_UNAVAILABLE,
    ResponseFlags::UH,
    "no healthy upstream",
);

impl Attempts<'_> {
    async fn run(
        &self,
        report: &mut Report,
        parts: &Parts,
        first_body: RequestBody,
        tape: Option<&Tape>,
    ) -> Result<(Response<Incoming>, (InFlight, Pick)), Failure> {
        let conn = report.conn.clone();
        let cluster = &self.resolved.cluster;
        let hash = cluster.request_hash(&parts.headers, &parts.uri, *conn.client.ip());
        let idempotent = is_idempotent(&parts.method);
        let mut body = Some(first_body);
        let mut avoid = None;
        let mut retries_left = self.plan.attempts;
        let mut retried = false;
        let mut retry_slot;
        loop {
            let Some(pick) = cluster.pick(hash, avoid, Instant::now()) else {
                return Err(NO_HEALTHY_UPSTREAM);
            };
            let key = match conn.conn_key(self.view, &pick, self.proto) {
                Ok(key) => key,
                Err(e) => {
                    info!("{e}");
                    return Err(NO_HEALTHY_UPSTREAM);
                }
            };
            report.upstream = Some(pick.addr);
            report.destination = pick.pod.clone();
            let request_body = match body.take() {
                Some(b) => b,
                None => match replay(tape) {
                    Some(b) => b,
                    None => unreachable!("a retry is only started with a replayable body"),
                },
            };
            let request = Request::from_parts(parts.clone(), request_body);
            let send = self.resolved.pool.send(
                cluster.state(),
                cluster.policy(),
                &key,
                conn.dial(cluster.policy()),
                request,
            );
            let result = match self.per_try_timeout {
                Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ()),
                None => Ok(send.await),
            };
            let now = Instant::now();
            // What went wrong, whether the policy retries it, and how it is answered if not.
            let (retry_on, failure): (bool, Failure) = match result {
                Ok(Ok((response, in_flight))) => {
                    let status = response.status().as_u16();
                    let grpc_status = body::grpc_status(response.headers());
                    let outcome = if status >= 500 {
                        Outcome::Status(status)
                    } else {
                        Outcome::Success
                    };
                    if cluster.report(&pick, outcome, now) {
                        info!(endpoint = %pick.addr, cluster = %cluster.key(), "outlier detection ejected an endpoint");
                    }
                    let retriable = self.plan.retries_status(status)
                        || grpc_status.is_some_and(|s| self.retries_grpc(s));
                    if !retriable || retries_left == 0 || !self.may_repeat(idempotent, tape, false)
                    {
                        if retriable && retried {
                            report.flags |= ResponseFlags::URX;
                        }
                        return Ok((response, (in_flight, pick)));
                    }
                    drop(response);
                    (
                        true,
                        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::NONE, ""),
                    )
                }
                Ok(Err(PoolError::Overflow(limit))) => {
                    debug!(cluster = %cluster.key(), "circuit breaker open: {limit}");
                    return Err((StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UO, "upstream connect error or disconnect/reset before headers. reset reason: overflow"));
                }
                Ok(Err(e)) if e.before_request() => {
                    debug!("{e}");
                    cluster.report(&pick, Outcome::ConnectFailure, now);
                    (
                        self.plan.on(RetryPolicy::ConnectFailure)
                            || self.plan.on(RetryPolicy::ResetBeforeRequest)
                            || self.plan.on(RetryPolicy::FiveXx)
                            || self.plan.on(RetryPolicy::GatewayError),
                        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UF, "upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
                    )
                }
                Ok(Err(e)) => {
                    debug!("{e}");
                    cluster.report(&pick, Outcome::Reset, now);
                    (
                        self.plan.on(RetryPolicy::Reset) || self.plan.on(RetryPolicy::FiveXx),
                        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UR, "upstream connect error or disconnect/reset before headers. reset reason: remote reset"),
                    )
                }
                Err(()) => {
                    cluster.report(&pick, Outcome::Timeout, now);
                    (
                        self.plan.on(RetryPolicy::FiveXx)
                            || self.plan.on(RetryPolicy::GatewayError),
                        (
                            StatusCode::GATEWAY_TIMEOUT,
                            ResponseFlags::UT,
                            "upstream request timeout",
                        ),
                    )
                }
            };
            let before_request = failure.1 == ResponseFlags::UF;
            // `maxRetries` bounds the retries in flight in the cluster: the slot is held until
            // the next attempt ends.
            retry_slot =
                (retry_on && retries_left > 0 && self.may_repeat(idempotent, tape, before_request))
                    .then(|| cluster.state().try_retry(&cluster.policy().limits))
                    .flatten();
            if retry_slot.is_none() {
                let (status, mut flags, text) = failure;
                if retried && retry_on {
                    flags |= ResponseFlags::URX;
                }
                if status == StatusCode::SERVICE_UNAVAILABLE && flags == ResponseFlags::NONE {
                    unreachable!("a response is returned above when it is not retried");
                }
                return Err((status, flags, text));
            }
            retries_left -= 1;
            retried = true;
            avoid = Some(pick.addr);
            drop(pick);
            tokio::time::sleep(backoff(self.plan.attempts - retries_left)).await;
        }
    }

    /// Whether the request may be sent again: its body must be replayable, and without a
    /// retry policy the user configured, only idempotent requests (or requests that never
    /// reached the upstream) are repeated.
    fn may_repeat(&self, idempotent: bool, tape: Option<&Tape>, before_request: bool) -> bool {
        let replayable = tape.is_none_or(|t| t.replay().is_some());
        replayable && (before_request || idempotent || !self.idempotent_only)
    }

    fn retries_grpc(&self, status: u32) -> bool {
        let policy = match status {
            1 => RetryPolicy::Cancelled,
            4 => RetryPolicy::DeadlineExceeded,
            8 => RetryPolicy::ResourceExhausted,
            13 => RetryPolicy::Internal,
            14 => RetryPolicy::Unavailable,
            _ => return false,
        };
        self.plan.on(policy)
    }
}

fn replay(tape: Option<&Tape>) -> Option<RequestBody> {
    match tape {
        None => Some(RequestBody::Empty),
        Some(t) => t.replay(),
    }
}

/// Envoy's jittered exponential back-off before retry number `n` (1-based).
fn backoff(n: u32) -> Duration {
    let ceiling = RETRY_BASE
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(RETRY_BASE * 10);
    ceiling.mul_f64(fastrand::f64())
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Sends a copy of the request to each mirror, without waiting for or reporting the answer.
fn mirror(
    conn: &Arc<Conn>,
    view: &View,
    mirrors: &[route::MirrorTarget],
    parts: &Parts,
    tape: Option<&Tape>,
) {
    for target in mirrors {
        if !chance(target.percentage) {
            continue;
        }
        let (Some(service_key), Some(body)) = (target.service.clone(), replay(tape)) else {
            continue;
        };
        let Some(service) = view.snapshot.services.get(&service_key) else {
            continue;
        };
        let port = target
            .port
            .or_else(|| service_port(service, conn.port))
            .unwrap_or(conn.port);
        let key = ClusterKey {
            service: service_key,
            port,
            subset: target.subset.clone(),
        };
        let Ok(resolved) = conn.cluster(view, key) else {
            continue;
        };
        let Some(pick) = resolved.cluster.pick(None, None, Instant::now()) else {
            continue;
        };

        let mut head = parts.clone();
        // Istio marks mirrored requests by suffixing the host with `-shadow`.
        if let Some(host) = head.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            if let Ok(shadow) = HeaderValue::from_str(&shadow_host(host)) {
                head.headers.insert(header::HOST, shadow);
            }
        }
        if let Some(authority) = head.uri.authority().map(|a| shadow_host(a.as_str())) {
            let mut uri = head.uri.clone().into_parts();
            uri.authority = authority.parse().ok();
            if let Ok(u) = Uri::from_parts(uri) {
                head.uri = u;
            }
        }
        let proto = if head.version == Version::HTTP_2 {
            Proto::Http2
        } else {
            Proto::Http1
        };
        let Ok(key) = conn.conn_key(view, &pick, proto) else {
            continue;
        };
        let conn = conn.clone();
        tokio::spawn(async move {
            let cluster = &resolved.cluster;
            let sent = resolved
                .pool
                .send(
                    cluster.state(),
                    cluster.policy(),
                    &key,
                    conn.dial(cluster.policy()),
                    Request::from_parts(head, body),
                )
                .await;
            if let Ok((response, _in_flight)) = sent {
                // Drain the answer so the connection can be reused.
                use http_body_util::BodyExt as _;
                let _ = response.into_body().collect().await;
            }
            drop(pick);
        });
    }
}

fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

/// The destination side: every request goes to the local pod, on a pooled connection from
/// the proxy address, and is reported with `reporter="destination"`. Routing, retries and
/// faults happened on the source side.
async fn forward_inbound(
    mut report: Report,
    view: &View,
    inbound: &Inbound,
    mut parts: Parts,
    body: Incoming,
) -> Reply {
    let conn = report.conn.clone();
    report.destination = inbound.pod.clone();
    report.service = inbound
        .service
        .as_ref()
        .and_then(|k| view.snapshot.services.get(k))
        .cloned();
    report.upstream = Some(inbound.target);
    let key = ConnKey {
        target: inbound.target,
        via: conn.ctx.dialer.local(),
        proto: Proto::Http1,
        source: None,
    };
    if is_upgrade(&parts) {
        let upgrade = hyper::upgrade::on(Request::from_parts(parts.clone(), ()));
        return send_upgrade(report, key, parts, body, upgrade, None).await;
    }
    let grpc = report.grpc;
    let proto = match conn.declared {
        Declared::Http2 => Proto::Http2,
        _ if grpc || parts.version == Version::HTTP_2 => Proto::Http2,
        _ => Proto::Http1,
    };
    let key = ConnKey { proto, ..key };
    let authority = report.authority.clone();
    prepare_head(&mut parts, &authority, proto);
    let (request_body, tape) = RequestBody::record(body);
    report.tape = tape;
    let policy = ClusterPolicy::default();
    let sent = inbound
        .pool
        .send(
            &inbound.state,
            &policy,
            &key,
            conn.dial(&policy),
            Request::from_parts(parts, request_body),
        )
        .await;
    match sent {
        Ok((response, hold)) => {
            report.status = response.status().as_u16();
            report.grpc_status = body::grpc_status(response.headers());
            report.hold = Some(hold);
            let (mut head, upstream_body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            head.version = report.version;
            Response::from_parts(head, ResponseBody::upstream(upstream_body, report))
        }
        Err(e) => {
            debug!("{e}");
            let (status, flags, text) = if e.before_request() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlags::UF,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlags::UR,
                    "upstream connect error or disconnect/reset before headers. reset reason: remote reset",
                )
            };
            local_reply(report, status, flags, text)
        }
    }
}

/// A request that switches protocols (WebSocket): sent alone on a fresh connection; after
/// `101` both sides are joined byte for byte.
async fn forward_upgrade(
    mut report: Report,
    view: &View,
    resolved: &Resolved,
    parts: Parts,
    body: Incoming,
    downstream: hyper::upgrade::OnUpgrade,
) -> Reply {
    let conn = report.conn.clone();
    let cluster = &resolved.cluster;
    let hash = cluster.request_hash(&parts.headers, &parts.uri, *conn.client.ip());
    let Some(pick) = cluster.pick(hash, None, Instant::now()) else {
        return local_failure(report, NO_HEALTHY_UPSTREAM);
    };
    let Ok(key) = conn.conn_key(view, &pick, Proto::Http1) else {
        return local_failure(report, NO_HEALTHY_UPSTREAM);
    };
    report.upstream = Some(pick.addr);
    report.destination = pick.pod.clone();
    send_upgrade(report, key, parts, body, downstream, Some(pick)).await
}

/// Sends an upgrade request on its own connection and, after `101`, joins both sides.
async fn send_upgrade(
    mut report: Report,
    key: ConnKey,
    mut parts: Parts,
    body: Incoming,
    downstream: hyper::upgrade::OnUpgrade,
    pick: Option<Pick>,
) -> Reply {
    let conn = report.conn.clone();
    let mut sender = match pool::upgrade_connection(&key, conn.dial(&ClusterPolicy::default()))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            debug!("{e}");
            return local_reply(report, StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UF, "upstream connect error or disconnect/reset before headers. reset reason: connection failure");
        }
    };
    // Origin form: the upgrade goes to an HTTP/1.1 server.
    if let Some(pq) = parts.uri.path_and_query() {
        parts.uri = Uri::from(pq.clone());
    }
    let (request_body, tape) = RequestBody::record(body);
    report.tape = tape;
    let mut response = match sender
        .send_request(Request::from_parts(parts, request_body))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            debug!("upgrade request failed: {e}");
            return local_reply(
                report,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::UR,
                "upstream reset before headers",
            );
        }
    };
    report.status = response.status().as_u16();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
                debug!("protocol upgrade did not complete");
                return;
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            if let Err(e) = super::copy::bidirectional(&mut down, &mut up, &()).await {
                debug!("upgraded connection ended: {e}");
            }
            drop(pick);
        });
    }
    let (head, upstream_body) = response.into_parts();
    Response::from_parts(head, ResponseBody::upstream(upstream_body, report))
}

fn is_upgrade(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && parts
            .headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// HTTP/2 upstream for gRPC and for ports that declare HTTP/2; a sniffed connection keeps
/// the client's protocol; `http` ports talk HTTP/1.1 upstream unless the DestinationRule
/// asks for the upgrade (Istio's `h2UpgradePolicy`).
fn upstream_protocol(declared: Declared, parts: &Parts, grpc: bool, cluster: &Cluster) -> Proto {
    let h2 = match declared {
        Declared::Http2 => true,
        Declared::Http => grpc || cluster.policy().h2_upgrade,
        Declared::Unknown | Declared::Opaque => grpc || parts.version == Version::HTTP_2,
    };
    if h2 {
        Proto::Http2
    } else {
        Proto::Http1
    }
}

/// Rewrites the request head for the upstream protocol: origin form and `Host` for HTTP/1.1,
/// absolute form (`:scheme`, `:authority`) for HTTP/2; drops hop-by-hop headers.
fn prepare_head(parts: &mut Parts, authority: &str, proto: Proto) {
    strip_hop_by_hop(&mut parts.headers);
    // A rewrite may have changed the authority: the URI or Host now says which.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| authority.to_owned());
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match proto {
        Proto::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::from(path);
            if let Ok(host) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, host);
            }
        }
        Proto::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority.as_str())
                .path_and_query(path)
                .build()
            {
                parts.uri = uri;
            }
        }
    }
    parts
        .headers
        .insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(listed) = headers.get(header::CONNECTION).cloned() {
        if let Ok(listed) = listed.to_str() {
            for name in listed.split(',') {
                let name = name.trim();
                if !name.eq_ignore_ascii_case("upgrade") {
                    headers.remove(name);
                }
            }
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// `:authority` for HTTP/2, else the `Host` header.
fn authority_of(parts: &Parts) -> Arc<str> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
        .into()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The port of `service` a route without a port means: the dialled one if the service has
/// it, else the service's only port.
fn service_port(service: &Service, dialled: u16) -> Option<u16> {
    if service.ports.iter().any(|p| p.port == dialled) {
        Some(dialled)
    } else if service.ports.len() == 1 {
        Some(service.ports[0].port)
    } else {
        None
    }
}

/// True with probability `percentage` (0-100).
fn chance(percentage: f64) -> bool {
    percentage >= 100.0 || (percentage > 0.0 && fastrand::f64() * 100.0 < percentage)
}

fn request_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    // The layout of a random UUID (version 4, variant 1), as Envoy generates them.
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn fault_abort(mut report: Report, error: AbortError) -> Reply {
    report.flags |= ResponseFlags::FI;
    match error {
        AbortError::HttpStatus(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let flags = report.flags;
            local_reply(report, status, flags, "fault filter abort")
        }
        AbortError::GrpcStatus(code) => {
            let flags = report.flags;
            grpc_reply(report, u32::from(code), "fault filter abort", flags)
        }
    }
}

fn local_failure(report: Report, (status, flags, text): Failure) -> Reply {
    local_reply(report, status, flags, text)
}

/// A reply the proxy makes itself; gRPC clients get it as a gRPC status (Envoy's mapping of
/// HTTP statuses to gRPC codes).
fn local_reply(
    report: Report,
    status: StatusCode,
    flags: ResponseFlags,
    text: &'static str,
) -> Reply {
    if report.grpc {
        return grpc_reply(report, http_to_grpc(status), text, flags);
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    local_response(
        report,
        status,
        headers,
        Bytes::from_static(text.as_bytes()),
        flags,
    )
}

fn grpc_reply(report: Report, code: u32, message: &'static str, flags: ResponseFlags) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    local_response(report, StatusCode::OK, headers, Bytes::new(), flags)
}

fn local_response(
    mut report: Report,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    flags: ResponseFlags,
) -> Reply {
    report.status = status.as_u16();
    report.flags |= flags;
    if report.grpc {
        report.grpc_status = body::grpc_status(&headers);
    }
    let mut response = Response::new(ResponseBody::local(body, report));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn http_to_grpc(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}
