//! The node proxy: L4 listeners for captured outbound connections (15001), captured inbound
//! connections (15006) and the node-to-node tunnel (15008).
//!
//! Each connection reads the current configuration once, from a [`View`] swapped in whenever
//! the [`Store`](crate::model::Store) publishes a snapshot: one atomic load, no lock. The view
//! also holds the per-service round-robin counters, carried over from view to view.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::BorrowedFd,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    metrics::{HttpMetrics, Metrics, TcpMetrics},
    model::{ObjectKey, OriginalDst, Snapshot},
};

pub mod copy;
mod detect;
mod inbound;
pub mod l7;
mod outbound;
pub mod tunnel;

pub use copy::{CopyError, Transferred};
pub use tunnel::TunnelError;

/// How long a TCP connect (to a pod or to a peer node's proxy) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a tunnel client may take to send its request.
const TUNNEL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may finish after shutdown was requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Log target of the per-connection access log lines.
pub const ACCESS_LOG: &str = "weft::access";

/// Where the proxy listens and how it reaches the rest of the mesh.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node: Arc<str>,
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
        }
    }
}

/// The addresses the listeners are bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub tunnel: SocketAddr,
}

/// An original destination source that knows nothing: the proxy without eBPF capture.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoOriginalDst;

impl OriginalDst for NoOriginalDst {
    fn lookup(&self, _socket: BorrowedFd<'_>, _client: SocketAddrV4) -> Option<SocketAddrV4> {
        None
    }
}

/// The original destination the kernel kept for a connection that an nftables/iptables
/// `REDIRECT` rule sent to a listener: how a sidecar proxy learns it (`mesh-node sidecar`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RedirectedOriginalDst;

impl OriginalDst for RedirectedOriginalDst {
    fn lookup(&self, socket: BorrowedFd<'_>, _client: SocketAddrV4) -> Option<SocketAddrV4> {
        crate::sys::original_dst(socket).ok()
    }
}

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error(
        "cannot listen on {addr} for {listener}: {source} (is another process using the port?)"
    )]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set IP_TRANSPARENT on the inbound listener {addr}: {source} (mesh-node needs CAP_NET_ADMIN)")]
    Transparent {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("client {client} is not IPv4: Weft captures IPv4 only")]
    NotIpv4 { client: SocketAddr },
    #[error("no original destination is recorded for client {client}: the connection reached the outbound listener without being captured (was port 15001 dialled directly, or is eBPF capture off?)")]
    NoOriginalDst { client: SocketAddrV4 },
    #[error("service {service} has no TCP port {port} (dialled {dialled})")]
    NoServicePort {
        service: ObjectKey,
        port: u16,
        dialled: SocketAddrV4,
    },
    #[error("service {service} port {port} has no ready endpoint: check that its pods are running and selected (or its EndpointSlices)")]
    NoEndpoint { service: ObjectKey, port: u16 },
    #[error("{target} runs on node {node}, whose address is unknown: the configuration needs that Node with an InternalIP")]
    UnknownNode {
        target: SocketAddrV4,
        node: Arc<str>,
    },
    #[error("connection from {client} to the inbound listener itself ({local}): only connections steered to a pod are served there")]
    InboundLoop {
        client: SocketAddr,
        local: SocketAddr,
    },
    #[error("tunnel from {client} asks for {target}, which is not a pod on node {node}")]
    NotLocalPod {
        client: SocketAddr,
        target: SocketAddrV4,
        node: Arc<str>,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("cannot read the addresses of an accepted connection: {0}")]
    Socket(#[source] io::Error),
}

/// Who the proxy was connecting to when a connect failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Upstream,
    PeerProxy,
}

/// A failed TCP connect, worded for the operator.
#[derive(Debug, Error)]
#[error("{}", self.describe())]
pub struct ConnectError {
    pub role: Role,
    pub target: SocketAddrV4,
    pub kind: ConnectErrorKind,
    #[source]
    pub source: Option<io::Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectErrorKind {
    Refused,
    Timeout(Duration),
    Unreachable,
    Bind(Ipv4Addr),
    Other,
}

impl ConnectError {
    fn describe(&self) -> String {
        let who = match self.role {
            Role::Upstream => format!("upstream {}", self.target),
            Role::PeerProxy => format!("peer node proxy {}", self.target),
        };
        let error = self
            .source
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        match (self.kind, self.role) {
            (ConnectErrorKind::Refused, Role::Upstream) => {
                format!("{who} refused the connection: is the server listening on that port?")
            }
            (ConnectErrorKind::Refused, Role::PeerProxy) => {
                format!("{who} refused the connection: is mesh-node running on that node?")
            }
            (ConnectErrorKind::Timeout(t), _) => format!(
                "{who} did not accept the connection within {t:?}: is it running, and is anything dropping the traffic on the way?"
            ),
            (ConnectErrorKind::Unreachable, _) => {
                format!("{who} is unreachable ({error}): check the routes of this node")
            }
            (ConnectErrorKind::Bind(ip), _) => format!(
                "cannot use {ip} as source address towards {who} ({error}): is --proxy-ip assigned to an interface of this node?"
            ),
            (ConnectErrorKind::Other, _) => format!("connecting to {who} failed: {error}"),
        }
    }

    /// Whether another attempt (or another endpoint) may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, ConnectErrorKind::Bind(_))
    }
}

/// Connects to `target`, from `source` if given, within `timeout`.
pub(crate) async fn connect_tcp(
    target: SocketAddrV4,
    source: Option<Ipv4Addr>,
    timeout: Duration,
    role: Role,
) -> Result<TcpStream, ConnectError> {
    let error = |kind, source| ConnectError {
        role,
        target,
        kind,
        source,
    };
    let socket = TcpSocket::new_v4().map_err(|e| error(ConnectErrorKind::Other, Some(e)))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::from((ip, 0)))
            .map_err(|e| error(ConnectErrorKind::Bind(ip), Some(e)))?;
    }
    let stream = match tokio::time::timeout(timeout, socket.connect(target.into())).await {
        Err(_) => return Err(error(ConnectErrorKind::Timeout(timeout), None)),
        Ok(Err(e)) => {
            let kind = match e.kind() {
                io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    ConnectErrorKind::Unreachable
                }
                io::ErrorKind::TimedOut => ConnectErrorKind::Timeout(timeout),
                _ => ConnectErrorKind::Other,
            };
            return Err(error(kind, Some(e)));
        }
        Ok(Ok(stream)) => stream,
    };
    // Small writes (requests, handshakes) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The configuration as one connection sees it.
pub(crate) struct View {
    pub snapshot: Arc<Snapshot>,
    /// HTTP and TCP routes of every Service that has any.
    pub routes: l7::routes::RouteIndex,
    balancers: HashMap<ObjectKey, Arc<AtomicUsize>>,
}

impl View {
    fn new(snapshot: Arc<Snapshot>, previous: Option<&View>) -> Self {
        let balancers = snapshot
            .services
            .keys()
            .map(|key| {
                let counter = previous
                    .and_then(|p| p.balancers.get(key).cloned())
                    .unwrap_or_default();
                (key.clone(), counter)
            })
            .collect();
        Self {
            routes: l7::routes::RouteIndex::build(&snapshot),
            snapshot,
            balancers,
        }
    }

    /// The next round-robin index of `service`.
    pub fn next_index(&self, service: &ObjectKey) -> usize {
        self.balancers
            .get(service)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed))
    }
}

/// State shared by every connection.
pub(crate) struct Inner {
    pub config: ProxyConfig,
    pub view: ArcSwap<View>,
    pub original_dst: Arc<dyn OriginalDst>,
    pub metrics: TcpMetrics,
    pub http_metrics: HttpMetrics,
    /// Health and circuit-breaker state of every cluster, kept across snapshots.
    pub clusters: l7::cluster::Clusters,
    /// Upstream HTTP connections of every cluster.
    pub pools: l7::pool::Pools,
    pub applied: Arc<AtomicU64>,
    pub inbound_port: u16,
}

impl Inner {
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }
}

/// The bound listeners, ready to [`run`](Proxy::run).
pub struct Proxy {
    outbound: TcpListener,
    inbound: TcpListener,
    tunnel: TcpListener,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    inner: Arc<Inner>,
}

impl Proxy {
    /// Binds the three listeners and applies the current snapshot of `snapshots`. The version
    /// of each snapshot the proxy starts using is stored into `applied`.
    pub async fn bind(
        config: ProxyConfig,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        original_dst: Arc<dyn OriginalDst>,
        metrics: &Metrics,
        applied: Arc<AtomicU64>,
    ) -> Result<Self, ProxyError> {
        let outbound = listen("outbound capture", config.outbound_addr, false)?;
        let inbound = listen(
            "inbound capture",
            config.inbound_addr,
            config.inbound_transparent,
        )?;
        let tunnel = listen("node tunnel", config.tunnel_addr, false)?;
        let inbound_port = inbound.local_addr().map_err(ProxyError::Socket)?.port();
        let snapshot = snapshots.borrow_and_update().clone();
        applied.store(snapshot.version, Ordering::Release);
        let inner = Arc::new(Inner {
            config,
            view: ArcSwap::from_pointee(View::new(snapshot, None)),
            original_dst,
            metrics: metrics.tcp().clone(),
            http_metrics: metrics.http().clone(),
            clusters: Default::default(),
            pools: Default::default(),
            applied,
            inbound_port,
        });
        Ok(Self {
            outbound,
            inbound,
            tunnel,
            snapshots,
            inner,
        })
    }

    pub fn addresses(&self) -> Addresses {
        let addr = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
        Addresses {
            outbound: addr(&self.outbound),
            inbound: addr(&self.inbound),
            tunnel: addr(&self.tunnel),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open connections
    /// finish for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let addresses = self.addresses();
        let Proxy {
            outbound,
            inbound,
            tunnel,
            snapshots,
            inner,
        } = self;
        info!(
            outbound = %addresses.outbound,
            inbound = %addresses.inbound,
            tunnel = %addresses.tunnel,
            node = %inner.config.node,
            "proxy listening"
        );
        // Every connection task holds a receiver; the sender sees when all are gone.
        let (drain_tx, drain_rx) = watch::channel(());
        tokio::select! {
            _ = shutdown => {}
            _ = follow(inner.clone(), snapshots) => {}
            _ = accept_loop(outbound, drain_rx.clone(), {
                let inner = inner.clone();
                move |stream, peer| outbound::serve(inner.clone(), stream, peer)
            }) => {}
            _ = accept_loop(inbound, drain_rx.clone(), {
                let inner = inner.clone();
                move |stream, peer| inbound::serve_captured(inner.clone(), stream, peer)
            }) => {}
            _ = accept_loop(tunnel, drain_rx.clone(), {
                let inner = inner.clone();
                move |stream, peer| inbound::serve_tunnel(inner.clone(), stream, peer)
            }) => {}
        }
        drop(drain_rx);
        let open = drain_tx.receiver_count();
        if open > 0 {
            info!(open, timeout = ?inner.config.drain_timeout, "proxy stopped accepting; draining connections");
        }
        if tokio::time::timeout(inner.config.drain_timeout, drain_tx.closed())
            .await
            .is_err()
        {
            warn!(
                open = drain_tx.receiver_count(),
                "connections still open after the drain timeout are closed"
            );
        }
    }
}

/// Listen backlog: bursts of new connections must not be dropped while workers are busy.
const BACKLOG: u32 = 1024;

fn listen(
    listener: &'static str,
    addr: SocketAddr,
    transparent: bool,
) -> Result<TcpListener, ProxyError> {
    let error = |source| ProxyError::Bind {
        listener,
        addr,
        source,
    };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(error)?;
    // A restarted proxy must get its ports back while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(error)?;
    if transparent {
        crate::sys::set_ip_transparent(&socket)
            .map_err(|source| ProxyError::Transparent { addr, source })?;
    }
    socket.bind(addr).map_err(error)?;
    socket.listen(BACKLOG).map_err(error)
}

async fn accept_loop<F, Fut>(listener: TcpListener, drain: watch::Receiver<()>, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let connection = serve(stream, peer);
                let drain = drain.clone();
                tokio::spawn(async move {
                    connection.await;
                    drop(drain);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Swaps in a new view for every published snapshot.
async fn follow(inner: Arc<Inner>, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        let version = snapshot.version;
        let view = View::new(snapshot, Some(&inner.view.load()));
        inner.view.store(Arc::new(view));
        inner.applied.store(version, Ordering::Release);
        debug!(version, "proxy applied configuration");
    }
    // The store is gone (only in tests); keep serving the last view.
    std::future::pending::<()>().await;
}

/// The IPv4 form of an accepted connection's address.
fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}
