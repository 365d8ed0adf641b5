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
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
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

use self::{
    body::{Finish, RequestBody, ResponseBody, Tape},
    deadline::{Deadlines, Held, Requests},
};
use super::{
    authz::{self, Denied, Peer},
    context::{Context, HttpLimits},
    detect::Declared,
    error::ProxyError,
    route::{self, apply_header_ops, Backend, RequestInfo, RetryPlan, RuleAction, Selection},
    sources::{Refused, SourceConnection},
    upstream::{
        cluster::{self, Cluster, ClusterKey, ClusterPolicy, Outcome, Pick},
        hbone::Caller,
        pool::{self, ClusterPool, ConnKey, Dial, PoolError, Proto},
    },
    view::View,
};
use crate::{
    identity::Identity,
    metrics::{
        access_log, access_log_enabled, AccessEntry, ClusterName, OverloadRefusal, Reporter,
        RequestLabels, RequestOutcome, ResponseFlags, ServiceLabels, Workload,
    },
    model::{
        authz::{normalize_path, Http},
        traffic::{AbortError, RetryPolicy},
        ObjectKey, Pod, Service,
    },
    tls::Authenticated,
};

mod access;
pub mod body;
mod deadline;
mod mirror;
mod relay;
mod request;
pub(crate) use self::request::{normalize_request_path, service_port};
mod retry;
mod trace;
mod upgrade;

use self::{
    mirror::mirror,
    request::{chance, denied_reply, handle, local_failure, local_reply, refused_reply},
    retry::{
        default_retries, replay, Attempts, Failure, DOWNSTREAM_PROTOCOL_ERROR, NO_HEALTHY_UPSTREAM,
    },
    trace::Trace,
    upgrade::{forward_upgrade, is_upgrade, is_websocket, send_upgrade, strip_h2c_upgrade},
};

type InFlight = pool::InFlight;
type UpstreamBody = pool::UpstreamBody<RequestBody>;

/// One downstream connection and what its requests share.
pub(super) struct Conn {
    ctx: Arc<Context>,
    client: SocketAddrV4,
    /// The Service the client dialled, and the port.
    service: ObjectKey,
    port: u16,
    /// The address the client dialled, where an original-destination cluster sends requests.
    dialled: Option<SocketAddrV4>,
    declared: Declared,
    source: Option<Arc<Pod>>,
    /// The client pod as the far node sees it (its certificate), for pooled connections.
    caller: Option<Caller>,
    /// The last `x-forwarded-client-cert` written for a pod of this node, by the pod's
    /// namespace and service account: requests to one service reuse it.
    local_xfcc: Mutex<Option<LocalXfcc>>,
    /// Set on the destination side: the local pod every request goes to.
    inbound: Option<Inbound>,
    clusters: Mutex<ClusterCache>,
    /// Metric labels by destination pod and service: building them hashes every label.
    labels: Mutex<HashMap<LabelKey, Reports>>,
    /// The client address's slot, whose requests in flight are capped (source side).
    held: Option<SourceConnection>,
    /// The client as the policies of a pod of this node see it (source side: the kernel
    /// vouches for the pod behind the address), found on first use.
    local_peer: OnceLock<Peer>,
    /// The client's socket (its descriptor, owned by the connection being served), when the
    /// connection is a plain TCP one: an upgraded connection hands it to the next mesh-node.
    client_socket: Option<RawFd>,
}

/// What the destination side knows of a connection before it serves it.
pub(super) struct Destination {
    /// The pod's address and port.
    pub target: SocketAddrV4,
    /// The Service whose port the target backs.
    pub service: Option<ObjectKey>,
    pub declared: Declared,
    pub pod: Option<Arc<Pod>>,
    /// The peer node's proxy authenticated the caller with mTLS (HBONE).
    pub peer: Option<Arc<Authenticated>>,
}

/// The local pod of a destination-side connection.
struct Inbound {
    target: SocketAddrV4,
    pod: Option<Arc<Pod>>,
    service: Option<ObjectKey>,
    /// The peer's mTLS identity and the pod's own, when the connection came through HBONE.
    mtls: Option<(Arc<Authenticated>, Identity)>,
    /// `x-forwarded-client-cert` for the pod, built once per connection.
    forwarded_client_cert: Option<HeaderValue>,
    /// The caller as the pod's AuthorizationPolicies see it.
    peer: Peer,
    /// Envoy's `inbound|<port>||`: its own pool and counters, apart from the outbound
    /// clusters; looked up once per connection.
    pool: Arc<ClusterPool<RequestBody>>,
    state: Arc<cluster::ClusterState>,
}

/// A pod's namespace and service account, and the `x-forwarded-client-cert` for it.
type LocalXfcc = (Arc<str>, Arc<str>, HeaderValue);

/// Envoy's header naming the client certificate the proxy authenticated.
const FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";

/// Destination pod, destination service, gRPC.
type LabelKey = (Option<ObjectKey>, Option<ObjectKey>, bool);

/// The labels a request is reported under by this proxy, and by the destination's side when
/// that is this proxy too.
#[derive(Clone)]
struct Reports(RequestLabels, Option<RequestLabels>);

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
    /// What a client of this connection may send: the hop from a peer node proxy allows for
    /// what the source proxy added.
    fn limits(&self) -> HttpLimits {
        let from_mesh = self.inbound.as_ref().is_some_and(|i| i.mtls.is_some());
        self.ctx.config.http.of_hop(from_mesh)
    }

    pub(super) fn outbound(
        ctx: Arc<Context>,
        client: SocketAddrV4,
        service: ObjectKey,
        port: u16,
        declared: Declared,
        source: Option<Arc<Pod>>,
    ) -> Self {
        let caller = source.as_deref().and_then(|p| ctx.dialer.caller(p));
        Self {
            ctx,
            client,
            service,
            port,
            dialled: None,
            declared,
            source,
            caller,
            local_xfcc: Mutex::default(),
            inbound: None,
            clusters: Mutex::default(),
            labels: Mutex::default(),
            held: None,
            local_peer: OnceLock::new(),
            client_socket: None,
        }
    }

    /// The destination side of a connection for a pod of this node, from `source`.
    pub(super) fn inbound(
        ctx: Arc<Context>,
        client: SocketAddrV4,
        source: Option<Arc<Pod>>,
        destination: Destination,
    ) -> Self {
        let Destination {
            target,
            service,
            declared,
            pod,
            peer,
        } = destination;
        let service_key = service.clone().unwrap_or_else(|| ObjectKey::new("", ""));
        let mtls = peer.zip(pod.as_deref().map(|p| ctx.dialer.identity(p)));
        let forwarded_client_cert = mtls
            .as_ref()
            .and_then(|(peer, own)| HeaderValue::from_str(&peer.forwarded_client_cert(own)).ok());
        // Through HBONE the caller is the pod the peer claimed, when its certificate covers
        // it, else the peer node; the identity is the certificate's. Plaintext: an address.
        let caller_ip = source
            .as_ref()
            .and_then(|p| p.ip)
            .map_or(IpAddr::V4(*client.ip()), IpAddr::V4);
        let peer = match &mtls {
            Some((auth, _)) => Peer::authenticated(&auth.identity, caller_ip),
            None => Peer::plaintext(IpAddr::V4(*client.ip())),
        };
        let cluster = ClusterKey::new(ObjectKey::new("", "inbound"), target.port(), None);
        let pool = ctx.pools.cluster(&cluster);
        let state = ctx.clusters.state(&cluster);
        let mut conn = Self::outbound(ctx, client, service_key, target.port(), declared, source);
        conn.inbound = Some(Inbound {
            target,
            pod,
            service,
            mtls,
            forwarded_client_cert,
            peer,
            pool,
            state,
        });
        conn
    }

    /// Caps the requests in flight of this connection's client address with the others' of
    /// that address (outbound connections).
    pub(super) fn held_by(mut self, held: SourceConnection) -> Self {
        self.held = Some(held);
        self
    }

    /// Sets the client's socket: the descriptor of the plain TCP connection this `Conn`
    /// serves (which its upgraded connections hold, so it stays open while they do).
    pub(super) fn client_socket(mut self, socket: RawFd) -> Self {
        self.client_socket = Some(socket);
        self
    }

    /// Sets the address the client dialled (outbound connections).
    pub(super) fn dialled(mut self, dialled: SocketAddrV4) -> Self {
        self.dialled = Some(dialled);
        self
    }

    /// The endpoint of `cluster` for a request on this connection (see [`Cluster::pick_for`]).
    fn pick(
        &self,
        cluster: &Cluster,
        hash: Option<u64>,
        avoid: Option<SocketAddrV4>,
    ) -> Option<Pick> {
        cluster.pick_for(self.dialled, hash, avoid, Instant::now())
    }

    /// The pooled connection that reaches a picked endpoint: directly on this node, through
    /// the peer node's tunnel otherwise, on behalf of this connection's client pod.
    fn conn_key(
        &self,
        view: &View,
        cluster: &Cluster,
        pick: &Pick,
        proto: Proto,
    ) -> Result<ConnKey, ProxyError> {
        let via = self.ctx.dialer.via(
            &view.snapshot,
            pick.addr,
            pick.node.as_ref(),
            pick.pod.as_deref(),
        )?;
        Ok(ConnKey {
            target: pick.addr,
            via,
            proto,
            caller: self.caller.clone(),
            tls: cluster.origination().cloned(),
        })
    }

    /// Sets `x-forwarded-client-cert` on a request about to leave for `pod` (Envoy's
    /// `SANITIZE_SET`): whatever the client wrote is dropped, and the caller is named where
    /// the proxy knows it — on the destination side the peer it authenticated with mTLS; on the
    /// source side, for a pod of this node, the calling pod, whom the kernel vouches for (its
    /// address on this node's own interface), with no `Hash` since no certificate was
    /// presented. Across nodes the destination's proxy sets it. Every path that sends a
    /// request upstream (routed, retried, mirrored, upgraded, destination side) calls this.
    fn set_forwarded_client_cert(&self, headers: &mut HeaderMap, pod: Option<&Pod>) {
        headers.remove(FORWARDED_CLIENT_CERT);
        if let Some(inbound) = &self.inbound {
            if let Some(value) = &inbound.forwarded_client_cert {
                headers.insert(FORWARDED_CLIENT_CERT, value.clone());
            }
            return;
        }
        let dialer = &self.ctx.dialer;
        let (Some(caller), Some(pod)) = (&self.caller, pod) else {
            return;
        };
        if dialer.sidecar || dialer.hbone.is_none() || pod.node.as_deref() != Some(&*dialer.node) {
            return;
        }
        let mut cached = self.local_xfcc.lock().expect("xfcc cache poisoned");
        let fresh = !matches!(&*cached, Some((ns, sa, _))
            if *ns == pod.key.namespace && *sa == pod.service_account);
        if fresh {
            let value = format!("By={};URI={}", dialer.identity(pod), caller.identity);
            *cached = HeaderValue::from_str(&value)
                .ok()
                .map(|v| (pod.key.namespace.clone(), pod.service_account.clone(), v));
        }
        if let Some((_, _, value)) = &*cached {
            headers.insert(FORWARDED_CLIENT_CERT, value.clone());
        }
    }

    /// Decides a request this proxy sends to `addr` itself, the address of a meshed pod of
    /// this node, against that pod's AuthorizationPolicies, as its caller: no other proxy sees
    /// the request. Any other destination decides at its own node's proxy. The pod is the one
    /// that owns the address, whatever an endpoint's `targetRef` claims.
    fn authorize_local(
        &self,
        view: &View,
        addr: SocketAddrV4,
        parts: &Parts,
    ) -> Result<(), Denied> {
        let Some(pod) = view
            .snapshot
            .pod_by_ip(*addr.ip())
            .filter(|p| authz::at_source(&self.ctx, &view.snapshot, p))
        else {
            return Ok(());
        };
        let peer = self.local_peer.get_or_init(|| match &self.caller {
            Some(caller) => Peer::authenticated(&caller.identity, IpAddr::V4(caller.ip)),
            None => Peer::plaintext(IpAddr::V4(*self.client.ip())),
        });
        let target = authz::Target {
            pod,
            addr,
            sni: None,
        };
        authz::check(
            &self.ctx,
            view,
            target,
            peer,
            Some(request::http_attributes(parts)),
        )
    }

    /// Whether requests to `pod` go through HBONE (see [`Dialer::tunnels_to`]).
    fn crosses_nodes(&self, pod: &Pod) -> bool {
        self.ctx.dialer.tunnels_to(&self.ctx.view().snapshot, pod)
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
        self.reports(pod, service, grpc).0
    }

    /// The labels requests to `pod` through `service` are reported under and, for a pod this
    /// proxy serves as the destination too (two pods of one node), the labels the destination
    /// reports them under: Istio reports every request at both ends.
    fn reports(
        &self,
        pod: Option<&Arc<Pod>>,
        service: Option<&Arc<Service>>,
        grpc: bool,
    ) -> Reports {
        let key = (
            pod.map(|p| p.key.clone()),
            service.map(|s| s.key.clone()),
            grpc,
        );
        let mut labels = self.labels.lock().expect("label cache poisoned");
        if let Some(l) = labels.get(&key) {
            return l.clone();
        }
        let local = self.inbound.is_none()
            && pod.is_some_and(|p| self.ctx.dialer.serves(&self.ctx.view().snapshot, p));
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
        // Through HBONE both ends are known by their certificates: on the destination side
        // from the handshake, on the source side for pods of other nodes. Between two pods of
        // this node the kernel vouches for both (the caller's cgroup, the pod's address).
        let l = match (&self.inbound, pod) {
            (Some(inbound), _) => match &inbound.mtls {
                Some((peer, own)) => l.mutual_tls(&peer.identity, own),
                None => l,
            },
            // Without a mesh CA nothing is mTLS, not even the kernel's word on one node.
            (None, Some(pod))
                if (local && self.ctx.dialer.hbone.is_some()) || self.crosses_nodes(pod) =>
            {
                match &self.caller {
                    Some(caller) => l.mutual_tls(&caller.identity, &self.ctx.dialer.identity(pod)),
                    None => l,
                }
            }
            (None, _) => l,
        };
        let reports = Reports(l.clone(), local.then(|| l.destination_report()));
        // A long-lived connection to a large service sees many pods; keep the cache small.
        if labels.len() >= 64 {
            labels.clear();
        }
        labels.insert(key, reports.clone());
        reports
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

/// Serves a destination-side connection to a pod's HTTP port: one from another node's proxy
/// is relayed as bytes while its requests need nothing more (see [`relay`]); anything else is
/// served as [`serve`] does.
pub(super) async fn serve_inbound<S>(conn: Conn, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tunnel = conn.inbound.as_ref().is_some_and(|i| i.mtls.is_some());
    if conn.declared == Declared::Http && tunnel {
        relay::relay(conn, io).await;
    } else {
        serve(conn, io).await;
    }
}

/// Serves HTTP on `io` until the client closes it.
pub(super) async fn serve<S>(conn: Conn, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.limits();
    let conn = Arc::new(conn);
    let draining = conn.ctx.draining.clone();
    // Whether the client speaks HTTP/2 (known at its first request), and a wake-up for an
    // HTTP/2 request that arrives once the proxy drains.
    let http2 = Arc::new(AtomicBool::new(false));
    let http2_draining = Arc::new(tokio::sync::Notify::new());
    let in_flight = Arc::new(Requests::default());
    let io = Deadlines::new(
        io,
        in_flight.clone(),
        limits.header_read_timeout,
        limits.idle_timeout,
        conn.ctx.sources.overload().clone(),
    );
    let (seen_http2, goaway) = (http2.clone(), http2_draining.clone());
    let service = service_fn(move |request| {
        let conn = conn.clone();
        let busy = in_flight.start();
        let requests = in_flight.clone();
        if request.version() == Version::HTTP_2 {
            seen_http2.store(true, Ordering::Relaxed);
            if conn.ctx.draining() {
                goaway.notify_one();
            }
        }
        async move {
            // Under memory pressure, and once the proxy drains, HTTP/1 connections are not
            // kept for a next request: the client takes it elsewhere (after a restart, to the
            // next mesh-node).
            let close = request.version() < Version::HTTP_2
                && (!conn.ctx.overload().keep_alive() || conn.ctx.draining());
            let close_on = |mut reply: Reply| {
                if close && reply.status() != StatusCode::SWITCHING_PROTOCOLS {
                    reply
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                reply
            };
            // Requests of one client address over its cap, or refused while the proxy sheds
            // load, are answered before any work.
            let admitted = match &conn.held {
                Some(held) => held.request().map(Some),
                None if !conn.ctx.overload().admits_new() => {
                    conn.ctx
                        .overload()
                        .metrics()
                        .refused(OverloadRefusal::Requests);
                    Err(Refused::Overload)
                }
                None => Ok(None),
            };
            let slot = match admitted {
                Ok(slot) => slot,
                Err(refused) => {
                    let reply = close_on(refused_reply(conn, request, refused));
                    return Ok(reply.map(|body| Held::new(body, busy, None)));
                }
            };
            let reply = handle(conn, request).await;
            if reply.status() == StatusCode::SWITCHING_PROTOCOLS {
                requests.upgraded();
            }
            Ok::<_, Infallible>(close_on(reply).map(|body| Held::new(body, busy, slot)))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // `Deadlines` times heads and idleness; hyper's timer would close idle keep-alive
        // connections as early as slow heads.
        .header_read_timeout(None)
        // What hyper buffers of a head, and the headers it parses, stay near the limits
        // (over them, hyper answers 431 itself); `handle` counts exactly.
        .max_buf_size((limits.max_head_bytes + 4096).max(8192))
        // Bodies are queued, never copied into one buffer: over an HBONE stream (which takes
        // no vectored writes) hyper would otherwise copy them into a buffer that grows to
        // `max_buf_size` and stays that large for as long as the connection is kept.
        .writev(true)
        .max_headers(limits.max_headers + 1);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(limits.max_concurrent_streams)
        // HTTP/2 counts 32 bytes more per header than the head itself holds (RFC 9113
        // 6.5.2): with that allowance it refuses nothing `handle` would accept.
        .max_header_list_size(
            u32::try_from(limits.max_head_bytes + 32 * limits.max_headers).unwrap_or(u32::MAX),
        );
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    // Once the proxy drains, an HTTP/2 client gets GOAWAY and finishes its streams here (one
    // not known to be HTTP/2 yet gets it at its first request). An HTTP/1 connection is closed
    // after its next response (which says so), never while the client may be sending a
    // request on it; one that stays idle ends with the drain.
    let (mut drain_seen, mut goaway_sent) = (false, false);
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            () = draining.cancelled(), if !drain_seen => {
                drain_seen = true;
                if http2.load(Ordering::Relaxed) {
                    connection.as_mut().graceful_shutdown();
                    goaway_sent = true;
                }
            }
            () = http2_draining.notified(), if drain_seen && !goaway_sent => {
                connection.as_mut().graceful_shutdown();
                goaway_sent = true;
            }
        }
    };
    if let Err(e) = ended {
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
    /// Why the proxy answered itself, where a flag does not say it (Envoy's
    /// `%RESPONSE_CODE_DETAILS%`): the policy that denied the request.
    details: Option<String>,
    route: Option<Arc<str>>,
    upstream: Option<SocketAddrV4>,
    cluster: Option<ClusterKey>,
    destination: Option<Arc<Pod>>,
    service: Option<Arc<Service>>,
    tape: Option<Arc<Tape>>,
    /// Held until the response body ended: the request's circuit-breaker slot and the
    /// endpoint's in-flight count (the pooled connection is the response body's).
    hold: Option<InFlight>,
    pick: Option<Pick>,
    recorded: bool,
    /// The destination's side saw the request: its pod answered, or its policies (decided
    /// here for a pod of this node) refused it.
    seen_by_destination: bool,
    /// When the attempt whose answer the client gets was sent: the destination's duration
    /// starts there (a fault's delay, earlier attempts and back-off are the source's).
    attempt_start: Option<Instant>,
    /// From the attempt's start to the upstream's response head (Envoy's
    /// `x-envoy-upstream-service-time`).
    upstream_time: Option<Duration>,
    /// The spans this proxy makes of the request, when a side's workload traces.
    trace: Option<Box<Trace>>,
    /// The request's and the response's headers, kept where a Telemetry may log them.
    request_headers: Option<Box<HeaderMap>>,
    response_headers: Option<Box<HeaderMap>>,
    /// The headers of the attempt to a pod of this node that logs its requests, as sent.
    attempt_headers: Option<Box<HeaderMap>>,
}

impl Finish for Report {
    fn finish(mut self, end: body::BodyEnd) {
        self.record(end);
    }

    fn grpc(&self) -> bool {
        self.grpc
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
    /// Keeps the response's headers where a Telemetry may log them.
    fn saw_response(&mut self, headers: &HeaderMap) {
        if self.request_headers.is_some() {
            self.response_headers = Some(Box::new(headers.clone()));
        }
    }

    /// An attempt that reached `pod` but whose answer is not the one the client gets (it was
    /// retried, or failed once sent): reported as the destination's proxy would report it,
    /// when that is this proxy.
    fn attempt_at_destination(
        &self,
        pod: Option<&Arc<Pod>>,
        (response_code, grpc_status): (u16, Option<u32>),
        flags: ResponseFlags,
        started: Instant,
    ) {
        let Reports(_, Some(destination)) =
            self.conn.reports(pod, self.service.as_ref(), self.grpc)
        else {
            return;
        };
        let outcome = RequestOutcome {
            response_code,
            grpc_status,
            flags,
            duration: started.elapsed(),
            request_bytes: self.tape.as_ref().map_or(0, |t| t.bytes()),
            ..RequestOutcome::default()
        };
        self.conn.ctx.http_metrics.record(&destination, &outcome);
    }

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
        let Reports(labels, destination) =
            self.conn
                .reports(self.destination.as_ref(), self.service.as_ref(), self.grpc);
        let duration = self.start.elapsed();
        let grpc_status = end.grpc_status.or(self.grpc_status);
        let request_bytes = self.tape.as_ref().map_or(0, |t| t.bytes());
        let outcome = RequestOutcome {
            response_code: self.status,
            grpc_status,
            flags,
            duration,
            request_bytes,
            response_bytes: end.bytes,
            request_messages: self.tape.as_ref().map_or(0, |t| t.messages()),
            response_messages: end.messages,
        };
        self.conn.ctx.http_metrics.record(&labels, &outcome);
        let seen = self.seen_by_destination || self.conn.inbound.is_some();
        if let Some(trace) = self.trace.take() {
            trace.finish(self, &labels, &outcome, seen);
        }
        if self.request_headers.is_some() {
            access::write(self, &labels, &outcome, seen);
        }
        if let Some(destination) = destination.filter(|_| self.seen_by_destination) {
            let outcome = RequestOutcome {
                flags: at_destination(flags),
                duration: self.attempt_start.map_or(duration, |s| s.elapsed()),
                ..outcome
            };
            self.conn.ctx.http_metrics.record(&destination, &outcome);
        }
        if access_log_enabled() {
            access_log(&AccessEntry {
                method: self.method.as_str(),
                path: self.uri.path_and_query().map_or("/", |p| p.as_str()),
                protocol: self.version,
                response_code: self.status,
                response_flags: flags,
                response_code_details: self.details.as_deref(),
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
                downstream_peer: labels.principals().0,
                upstream_peer: labels.principals().1,
            });
        }
        // Frees the circuit-breaker slots, the pooled connection and the in-flight count.
        self.hold.take();
        self.pick.take();
    }
}

type Reply = Response<ResponseBody<Report>>;

/// The flags the destination's side would report for a request whose response came from its
/// pod: what the source did before sending (a delay) is not seen there, a response cut short by
/// the source (its timeout, its client leaving) is a downstream disconnect, an upstream reset
/// is the pod's.
fn at_destination(flags: ResponseFlags) -> ResponseFlags {
    let mut seen = ResponseFlags::NONE;
    if flags.contains(ResponseFlags::UT) || flags.contains(ResponseFlags::DC) {
        seen |= ResponseFlags::DC;
    }
    if flags.contains(ResponseFlags::UR) {
        seen |= ResponseFlags::UR;
    }
    seen
}
