//! The node proxy: listeners for captured outbound connections (15001), captured inbound
//! connections (15006) and the node-to-node tunnel (15008, HBONE: HTTP/2 CONNECT over mTLS).
//!
//! The modules form layers whose imports only point down:
//!
//! ```text
//! listeners        mod (accept loops, config follower), outbound (15001), inbound (15006, 15008)
//!    │
//! protocols        tcp (opaque TCP), l7 (HTTP/1.1, HTTP/2, gRPC), authz (AuthorizationPolicy),
//!                  detect, copy
//!    │
//! configuration    context (shared state), view (a snapshot compiled), route (route tables), error
//!    │
//! upstream         connect, dial (direct or HBONE), hbone, cluster (balancing, limits,
//!                  outlier detection), pool (HTTP connections)
//! ```
//!
//! Each connection reads the current configuration once, from a [`View`](view::View) swapped
//! in whenever the [`Store`](crate::model::Store) publishes a snapshot: one atomic load, no
//! lock. Views are compiled by a task of their own on the blocking pool, so accepting and
//! serving never wait for a configuration change.

use std::{
    collections::HashSet,
    future::Future,
    net::{SocketAddr, SocketAddrV4},
    os::fd::BorrowedFd,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{self, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{futures::OwnedNotified, watch},
};
use tracing::{debug, info, warn};

use self::{
    context::Context,
    overload::Overload,
    sources::{SourceConnection, Sources},
    view::View,
};
use crate::{
    identity::Identity,
    metrics::{Metrics, OverloadClose},
    model::{OriginalDst, Snapshot},
};

mod access_log;
mod adopt;
mod authz;
mod context;
pub mod copy;
mod detect;
mod error;
mod inbound;
pub mod inspect;
pub mod l7;
mod outbound;
pub mod overload;
mod resume;
pub mod route;
mod sources;
mod tcp;
pub mod upstream;
mod view;

pub use adopt::{Handovers, Successor};
pub use context::{HttpLimits, ProxyConfig, CONNECT_TIMEOUT, DRAIN_TIMEOUT};
pub use copy::{CopyError, Transferred};
pub use error::ProxyError;
pub use overload::{MemoryBudget, MemoryMeter};
pub use sources::SourceLimits;
pub use upstream::{hbone, hbone::TunnelError, ConnectError, ConnectErrorKind, Role};

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

/// The bound listeners, ready to [`run`](Proxy::run).
pub struct Proxy {
    outbound: TcpListener,
    inbound: TcpListener,
    tunnel: TcpListener,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    ctx: Arc<Context>,
}

impl Proxy {
    /// Binds the three listeners and applies the current snapshot of `snapshots`. The version
    /// of each snapshot the proxy starts using is stored into `applied`.
    pub async fn bind(
        config: ProxyConfig,
        snapshots: watch::Receiver<Arc<Snapshot>>,
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
        Self::start(
            config,
            [outbound, inbound, tunnel],
            snapshots,
            original_dst,
            metrics,
            applied,
        )
    }

    /// As [`bind`](Self::bind), on listening sockets bound before (taken over from the
    /// previous mesh-node of the node). Must be called on the runtime that will serve them.
    pub fn on(
        config: ProxyConfig,
        listeners: Bound,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        original_dst: Arc<dyn OriginalDst>,
        metrics: &Metrics,
        applied: Arc<AtomicU64>,
    ) -> Result<Self, ProxyError> {
        let register = |listener: std::net::TcpListener| {
            listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
                .map_err(ProxyError::Socket)
        };
        Self::start(
            config,
            [
                register(listeners.outbound)?,
                register(listeners.inbound)?,
                register(listeners.tunnel)?,
            ],
            snapshots,
            original_dst,
            metrics,
            applied,
        )
    }

    fn start(
        config: ProxyConfig,
        [outbound, inbound, tunnel]: [TcpListener; 3],
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        original_dst: Arc<dyn OriginalDst>,
        metrics: &Metrics,
        applied: Arc<AtomicU64>,
    ) -> Result<Self, ProxyError> {
        let inbound_port = inbound.local_addr().map_err(ProxyError::Socket)?.port();
        let snapshot = snapshots.borrow_and_update().clone();
        applied.store(snapshot.version, Ordering::Release);
        if let Some(certs) = &config.certs {
            certs.retain(local_identities(&config, &snapshot));
        }
        let ctx = Arc::new(Context::new(
            config,
            snapshot,
            original_dst,
            metrics,
            applied,
            inbound_port,
        ));
        if let Some(budget) = ctx.config.memory.clone() {
            overload::monitor(ctx.sources.overload(), &ctx.sources, budget);
        }
        Ok(Self {
            outbound,
            inbound,
            tunnel,
            snapshots,
            ctx,
        })
    }

    /// What `meshctl` reads of this proxy through the node admin.
    pub fn inspector(&self) -> inspect::Inspector {
        inspect::Inspector::live(self.ctx.clone())
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
            ctx,
        } = self;
        info!(
            outbound = %addresses.outbound,
            inbound = %addresses.inbound,
            tunnel = %addresses.tunnel,
            node = %ctx.config.node,
            "proxy listening"
        );
        // Every connection task holds a receiver; the sender sees when all are gone.
        let (drain_tx, drain_rx) = watch::channel(());
        if let Ok(mut drain) = ctx.drain.lock() {
            *drain = Some(drain_rx.clone());
        }
        let follower = tokio::spawn(follow(ctx.clone(), snapshots));
        // The previous mesh-node's open connections, once this one serves.
        let adopting = tokio::spawn({
            let (ctx, drain) = (ctx.clone(), drain_rx.clone());
            async move { ctx.config.handovers.adopt(ctx.clone(), drain).await }
        });
        // The accept loops are tasks of the data runtime's workers, not of the thread that
        // runs this future: a connection is then accepted and served on the worker whose
        // I/O driver saw it, without waking another thread first.
        let loops = [
            tokio::spawn(accept_loop(
                outbound,
                drain_rx.clone(),
                ctx.sources.clone(),
                {
                    let ctx = ctx.clone();
                    move |stream, peer, held| outbound::serve(ctx.clone(), stream, peer, held)
                },
            )),
            tokio::spawn(accept_loop(
                inbound,
                drain_rx.clone(),
                ctx.sources.clone(),
                {
                    let ctx = ctx.clone();
                    move |stream, peer, held| {
                        held_by(held, inbound::serve_captured(ctx.clone(), stream, peer))
                    }
                },
            )),
            tokio::spawn(accept_loop(
                tunnel,
                drain_rx.clone(),
                ctx.sources.clone(),
                {
                    let ctx = ctx.clone();
                    move |stream, peer, held| {
                        held_by(held, inbound::serve_tunnel(ctx.clone(), stream, peer))
                    }
                },
            )),
        ];
        shutdown.await;
        // Stop accepting: the listeners close with their loops (in this process: after a
        // handover the next mesh-node accepts on the same sockets).
        for accepting in loops {
            accepting.abort();
            let _ = accepting.await;
        }
        // With a successor serving, relays of two local sockets go to it first.
        let successor = ctx.config.handovers.successor.get().cloned();
        if successor.is_some() {
            ctx.handover.cancel();
        }
        ctx.draining.cancel();
        follower.abort();
        adopting.abort();
        drop(drain_rx);
        if let Ok(mut drain) = ctx.drain.lock() {
            drain.take();
        }
        let open = drain_tx.receiver_count();
        if open > 0 {
            info!(open, timeout = ?ctx.config.drain_timeout, "proxy stopped accepting; draining connections");
        }
        if tokio::time::timeout(ctx.config.drain_timeout, drain_tx.closed())
            .await
            .is_err()
        {
            warn!(
                open = drain_tx.receiver_count(),
                "connections still open after the drain timeout are closed"
            );
        }
        // Pods' sockets still waiting for their source to resume them go on to the next
        // mesh-node (or are reset).
        resume::hand_over_parked(&ctx, successor.as_ref()).await;
        if let Some(successor) = successor {
            successor.done().await;
        }
    }
}

/// Listening sockets bound before the proxy starts: see [`Proxy::on`].
pub struct Bound {
    pub outbound: std::net::TcpListener,
    pub inbound: std::net::TcpListener,
    pub tunnel: std::net::TcpListener,
}

/// Listen backlog: bursts of new connections must not be dropped while workers are busy (or,
/// during a handover, while the next mesh-node starts accepting).
const BACKLOG: u32 = 1024;

fn listen(
    listener: &'static str,
    addr: SocketAddr,
    transparent: bool,
) -> Result<TcpListener, ProxyError> {
    listen_on(addr, transparent).map_err(|e| match e {
        Listen::Transparent(source) => ProxyError::Transparent { addr, source },
        Listen::Socket(source) => ProxyError::Bind {
            listener,
            addr,
            source,
        },
    })
}

/// A listening socket as the proxy binds its own, for another runtime or process: `SO_REUSEADDR`,
/// `IP_TRANSPARENT` if asked, the proxy's backlog. Must be called on a runtime.
pub fn listen_std(addr: SocketAddr, transparent: bool) -> std::io::Result<std::net::TcpListener> {
    match listen_on(addr, transparent) {
        Ok(listener) => listener.into_std(),
        Err(Listen::Transparent(e) | Listen::Socket(e)) => Err(e),
    }
}

enum Listen {
    Transparent(std::io::Error),
    Socket(std::io::Error),
}

fn listen_on(addr: SocketAddr, transparent: bool) -> Result<TcpListener, Listen> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(Listen::Socket)?;
    // A restarted proxy must get its ports back while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(Listen::Socket)?;
    if transparent {
        crate::sys::set_ip_transparent(&socket).map_err(Listen::Transparent)?;
    }
    socket.bind(addr).map_err(Listen::Socket)?;
    socket.listen(BACKLOG).map_err(Listen::Socket)
}

pin_project! {
    /// A connection's work, until it ends or the overload manager cuts its client's
    /// connections, dropping it then, whatever it holds. (A struct, not an `async fn`: an
    /// `async fn` would hold `work` twice, as its argument and as the future it awaits.)
    pub(super) struct UnlessCut<F> {
        #[pin]
        work: F,
        #[pin]
        cut: OwnedNotified,
        overload: Arc<Overload>,
    }
}

impl<F: Future<Output = ()>> Future for UnlessCut<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.work.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if this.cut.poll(cx).is_ready() {
            this.overload.metrics().closed(OverloadClose::Heaviest);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Runs `work` (a connection) until it ends or the overload manager cuts its client's
/// connections (`cut`).
fn unless_cut<F: Future<Output = ()>>(
    overload: Arc<Overload>,
    cut: OwnedNotified,
    work: F,
) -> UnlessCut<F> {
    UnlessCut {
        work,
        cut,
        overload,
    }
}

pin_project! {
    /// A future that keeps `held` until it ends.
    struct Holding<F, H> {
        #[pin]
        work: F,
        held: H,
    }
}

impl<F: Future<Output = ()>, H> Future for Holding<F, H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<()> {
        self.project().work.poll(cx)
    }
}

/// Serves a connection that holds its client address's slot until it ends.
fn held_by<F: Future<Output = ()>>(
    held: SourceConnection,
    connection: F,
) -> Holding<F, SourceConnection> {
    Holding {
        work: connection,
        held,
    }
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    drain: watch::Receiver<()>,
    sources: Arc<Sources>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, SourceConnection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // A client address at its cap, or refused while the proxy sheds load: closed
                // at once (and counted).
                let Ok(held) = sources.connect(peer.ip()) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let cut = held.cut_signal();
                let connection = serve(stream, peer, held);
                // Every connection task holds a receiver of `drain` until it ends.
                let connection = Holding {
                    work: connection,
                    held: drain.clone(),
                };
                tokio::spawn(unless_cut(sources.overload().clone(), cut, connection));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The identities of the meshed pods of this node: the certificates to hold before their
/// first connection.
fn local_identities(config: &ProxyConfig, snapshot: &Snapshot) -> HashSet<Identity> {
    snapshot
        .pods
        .values()
        .filter(|p| p.node.as_deref() == Some(&*config.node) && snapshot.is_meshed(p))
        .map(|p| Identity::new(&config.trust_domain, &p.key.namespace, &p.service_account))
        .collect()
}

/// Compiles a view for every published snapshot, off the data path, and swaps it in. A burst
/// of snapshots compiles only the latest.
async fn follow(ctx: Arc<Context>, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        let version = snapshot.version;
        let compile = {
            let ctx = ctx.clone();
            move || {
                let previous = ctx.view.load();
                let pods_changed = !previous.snapshot.pods.ptr_eq(&snapshot.pods)
                    || !previous.snapshot.namespaces.ptr_eq(&snapshot.namespaces);
                if let (Some(certs), true) = (&ctx.config.certs, pods_changed) {
                    certs.retain(local_identities(&ctx.config, &snapshot));
                }
                View::new(snapshot, Some(&previous), &ctx.clusters)
            }
        };
        let view = match tokio::task::spawn_blocking(compile).await {
            Ok(view) => view,
            Err(e) => {
                // A panic compiling one snapshot must not stop the proxy: keep the last view.
                warn!(version, "compiling the configuration failed: {e}");
                continue;
            }
        };
        ctx.view.store(Arc::new(view));
        ctx.applied.store(version, Ordering::Release);
        debug!(version, "proxy applied configuration");
    }
}
