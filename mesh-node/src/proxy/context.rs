//! What every connection of the proxy shares: its settings, the current [`View`] of the
//! configuration, the capture layer, metrics, and the upstream floor's long-lived state
//! (cluster health and budgets, connection pools).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::{
    copy::Lifetime,
    l7::body::RequestBody,
    overload::{MemoryBudget, Overload},
    sources::{SourceLimits, Sources},
    upstream::{cluster::Clusters, hbone::HbonePool, pool::Pools, Dialer},
    view::View,
};
use crate::{
    identity::manager::CertManager,
    metrics::{AuthzMetrics, HttpMetrics, Metrics, MtlsRefusals, TcpMetrics},
    model::{OriginalDst, Snapshot},
    telemetry::{Lines, Tracer},
};

/// How long a TCP connect (to a pod or to a peer node's proxy) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long open connections may finish after shutdown was requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer may take for the TLS handshake on the HBONE port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the proxy listens and how it reaches the rest of the mesh.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node: Arc<str>,
    /// Where open connections go to the next mesh-node, and come from the previous one.
    pub handovers: super::adopt::Handovers,
    /// Source address of connections to local pods (so they do not get captured again).
    pub proxy_ip: Ipv4Addr,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub tunnel_addr: SocketAddr,
    /// Port of the tunnel listener on the other nodes.
    pub peer_tunnel_port: u16,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// Sets `IP_TRANSPARENT` on the inbound listener, so connections the TC program assigns
    /// to it can answer from the pod's address (needs CAP_NET_ADMIN).
    pub inbound_transparent: bool,
    /// Runs as a sidecar inside one pod's network namespace: every upstream is dialled
    /// directly (the destination's own sidecar captures it inbound), never through a tunnel.
    pub sidecar: bool,
    /// Trust domain of the mesh's SPIFFE IDs.
    pub trust_domain: Arc<str>,
    /// Trust domains AuthorizationPolicy principals read as the mesh's (trust domain
    /// migration).
    pub trust_domain_aliases: Arc<[Arc<str>]>,
    /// The node's certificates: mTLS between nodes. Without them the proxy serves no tunnel
    /// and sends nothing to another node.
    pub certs: Option<Arc<CertManager>>,
    /// How long an HBONE client may take for its TLS handshake.
    pub handshake_timeout: Duration,
    /// Where DestinationRule `tls` files may be read from.
    pub tls_origination_dir: PathBuf,
    /// What an HTTP client may send.
    pub http: HttpLimits,
    /// TCP connections that move nothing either way for this long are closed (0: never);
    /// a DestinationRule's `tcp.idleTimeout` overrides it for its Service.
    pub tcp_idle_timeout: Duration,
    /// What one client address may hold.
    pub sources: SourceLimits,
    /// The memory the overload manager keeps the proxy under (`None`: no budget).
    pub memory: Option<MemoryBudget>,
}

/// Limits on what HTTP clients send, with Envoy's defaults. They are enforced where a request
/// enters the mesh (the source proxy, or the destination's for a client outside the mesh);
/// between node proxies they are raised by [`HttpLimits::MESH_MARGIN`], so a request accepted
/// by the first hop is never refused by the second for the headers the first one added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest request head, in bytes.
    pub max_head_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Longest time to receive an HTTP/1 request head, from its first byte.
    pub header_read_timeout: Duration,
    /// Longest time a client connection may have no request in flight (HTTP/1 and HTTP/2).
    pub idle_timeout: Duration,
    /// Streams one HTTP/2 client connection may have open at once.
    pub max_concurrent_streams: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: 60 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(30),
            // Istio's default (DestinationRule `http.idleTimeout`, Envoy's `idle_timeout`).
            idle_timeout: Duration::from_secs(3600),
            max_concurrent_streams: 1024,
        }
    }
}

impl HttpLimits {
    /// What the hop between node proxies allows beyond a client's limits: the headers and
    /// bytes the source proxy may add (request id, forwarding and rules' headers).
    pub const MESH_MARGIN: (usize, usize) = (100, 64 * 1024);

    /// The limits of a hop: a client's, or (`from_mesh`) a peer node proxy's.
    pub fn of_hop(self, from_mesh: bool) -> Self {
        if !from_mesh {
            return self;
        }
        Self {
            max_headers: self.max_headers + Self::MESH_MARGIN.0,
            max_head_bytes: self.max_head_bytes + Self::MESH_MARGIN.1,
            ..self
        }
    }
}

impl ProxyConfig {
    /// The standard ports on every address.
    pub fn new(node: &str, proxy_ip: Ipv4Addr) -> Self {
        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        Self {
            node: node.into(),
            proxy_ip,
            outbound_addr: any(mesh_common::OUTBOUND_PORT),
            inbound_addr: any(mesh_common::INBOUND_PORT),
            tunnel_addr: any(mesh_common::TUNNEL_PORT),
            peer_tunnel_port: mesh_common::TUNNEL_PORT,
            connect_timeout: CONNECT_TIMEOUT,
            drain_timeout: DRAIN_TIMEOUT,
            inbound_transparent: false,
            sidecar: false,
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.into(),
            trust_domain_aliases: Arc::from([]),
            certs: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            tls_origination_dir: crate::config::DEFAULT_TLS_ORIGINATION_DIR.into(),
            http: HttpLimits::default(),
            // Istio's default (DestinationRule `tcp.idleTimeout`).
            tcp_idle_timeout: Duration::from_secs(3600),
            sources: SourceLimits::default(),
            memory: None,
            handovers: super::adopt::Handovers::default(),
        }
    }

    /// The upstream floor's part of the settings.
    pub(super) fn dialer(&self) -> Dialer {
        Dialer {
            node: self.node.clone(),
            proxy_ip: self.proxy_ip,
            peer_tunnel_port: self.peer_tunnel_port,
            sidecar: self.sidecar,
            connect_timeout: self.connect_timeout,
            trust_domain: self.trust_domain.clone(),
            hbone: self
                .certs
                .as_ref()
                .map(|certs| Arc::new(HbonePool::new(certs.clone()))),
        }
    }
}

/// State shared by every connection.
pub(crate) struct Context {
    pub config: ProxyConfig,
    pub dialer: Dialer,
    pub view: ArcSwap<View>,
    pub original_dst: Arc<dyn OriginalDst>,
    pub metrics: TcpMetrics,
    pub http_metrics: HttpMetrics,
    pub refusals: MtlsRefusals,
    pub authz: AuthzMetrics,
    /// Where sampled requests' spans and OTLP access log records go.
    pub tracer: Tracer,
    /// Access log lines for the proxy's output.
    pub lines: Lines,
    /// Health and circuit-breaker state of every cluster, kept across snapshots.
    pub clusters: Clusters,
    /// Upstream HTTP connections of every cluster.
    pub pools: Pools<RequestBody>,
    pub applied: Arc<AtomicU64>,
    pub inbound_port: u16,
    /// What each client address holds, against [`ProxyConfig::sources`].
    pub sources: Arc<Sources>,
    /// Cancelled when the proxy stops accepting: connections end at their next boundary.
    pub draining: CancellationToken,
    /// Cancelled just before `draining` when the next mesh-node took the sockets: relays of
    /// two local sockets pause and go to it ([`super::adopt`]).
    pub handover: CancellationToken,
    /// Pods' sockets of paused HBONE streams, waiting for the source to resume them
    /// ([`super::resume`]).
    pub parked: Arc<super::resume::Parked>,
    /// A receiver of the proxy's drain while it runs: a task that must finish before the
    /// proxy's drain ends (a paused stream handing its socket on) holds a clone.
    pub drain: std::sync::Mutex<Option<tokio::sync::watch::Receiver<()>>>,
}

impl Context {
    /// A hold on the proxy's drain (`None` once it drains).
    pub(super) fn hold_drain(&self) -> Option<tokio::sync::watch::Receiver<()>> {
        self.drain.lock().ok().and_then(|d| d.clone())
    }
}

impl Context {
    /// How long TCP connections no cluster's rule speaks for may last (inbound).
    pub(super) fn tcp_lifetime(&self) -> Lifetime {
        Lifetime {
            idle_timeout: Some(self.config.tcp_idle_timeout).filter(|t| !t.is_zero()),
            max_duration: None,
        }
    }

    /// The shared state of a proxy serving `snapshot` first.
    pub fn new(
        config: ProxyConfig,
        snapshot: Arc<Snapshot>,
        original_dst: Arc<dyn OriginalDst>,
        metrics: &Metrics,
        applied: Arc<AtomicU64>,
        inbound_port: u16,
    ) -> Self {
        let clusters = Clusters::new(config.tls_origination_dir.clone());
        let overload = Overload::new(metrics.overload().clone());
        let sources = Sources::new(config.sources, metrics.source_refusals().clone(), overload);
        let view = View::new(snapshot, None, &clusters);
        Self {
            dialer: config.dialer(),
            config,
            view: ArcSwap::from_pointee(view),
            original_dst,
            metrics: metrics.tcp().clone(),
            http_metrics: metrics.http().clone(),
            refusals: metrics.refusals().clone(),
            authz: metrics.authz().clone(),
            tracer: Tracer::new(metrics.otlp().clone()),
            lines: Lines::start(metrics.otlp().clone()),

            clusters,
            pools: Pools::default(),
            applied,
            inbound_port,
            sources,
            draining: CancellationToken::new(),
            handover: CancellationToken::new(),
            parked: Arc::default(),
            drain: std::sync::Mutex::default(),
        }
    }

    /// Whether the proxy is draining: HTTP/1.1 responses say `Connection: close`, and the
    /// destination's relay hands each connection to the full path, which says it too.
    pub(super) fn draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub(super) fn overload(&self) -> &Arc<Overload> {
        self.sources.overload()
    }

    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }
}
