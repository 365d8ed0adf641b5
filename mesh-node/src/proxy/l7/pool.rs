//! Upstream HTTP connections, pooled per endpoint and limited per cluster.
//!
//! Envoy's circuit breakers, as DestinationRule `connectionPool` sets them: a request first
//! takes a slot of `http2MaxRequests` (all requests in flight), then a connection — an idle
//! HTTP/1.1 one, the shared HTTP/2 one, or a new one if `tcp.maxConnections` allows — or else
//! waits as one of at most `http1MaxPendingRequests` pending requests until a connection frees.
//! Whatever does not fit overflows: the caller answers 503 with flag `UO`.
//!
//! Connections are keyed by target address, protocol, the way there (direct or through the
//! peer node's tunnel) and the source pod, so the far end still learns who is calling.

use std::{
    collections::HashMap,
    io,
    net::SocketAddrV4,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Notify,
};
use tracing::debug;

use super::{
    body::RequestBody,
    cluster::{ClusterKey, ClusterPolicy, ClusterState, Guard},
};
use crate::{
    model::ObjectKey,
    proxy::{connect_tcp, outbound::Via, tunnel, ConnectError, Role, TunnelError},
};

/// How long an unused connection is kept when the DestinationRule sets no idle timeout
/// (Istio's default is one hour; pods rarely keep idle connections that long).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Protocol spoken to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// One pooled connection's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub target: SocketAddrV4,
    pub via: Via,
    pub proto: Proto,
    pub source: Option<ObjectKey>,
}

#[derive(Debug, Error)]
pub enum PoolError {
    /// A circuit breaker is open (Envoy's `UO`).
    #[error("upstream overflow: the {0} limit of the DestinationRule's connectionPool is reached")]
    Overflow(&'static str),
    /// The connection could not be made (Envoy's `UF`).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("HTTP handshake with upstream {target} failed: {source}")]
    Handshake {
        target: SocketAddrV4,
        #[source]
        source: hyper::Error,
    },
    /// The request was sent (maybe in part) and the exchange failed (Envoy's `UR`/`UC`).
    #[error("upstream {target} reset the request: {source}")]
    Reset {
        target: SocketAddrV4,
        #[source]
        source: hyper::Error,
    },
}

impl PoolError {
    /// Whether no byte of the request reached the upstream.
    pub fn before_request(&self) -> bool {
        !matches!(self, PoolError::Reset { .. })
    }
}

/// The pools of every cluster, keyed by cluster; the proxy keeps one.
#[derive(Default)]
pub struct Pools {
    clusters: Mutex<HashMap<ClusterKey, Arc<ClusterPool>>>,
}

impl Pools {
    /// The pool of `key`. Callers cache the result per downstream connection.
    pub fn cluster(&self, key: &ClusterKey) -> Arc<ClusterPool> {
        let mut clusters = self.clusters.lock().expect("pool registry poisoned");
        if let Some(pool) = clusters.get(key) {
            return pool.clone();
        }
        // Drop pools of clusters that no longer hold connections, so the map stays small.
        if clusters.len() > 64 {
            clusters.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_empty());
        }
        let pool = Arc::new(ClusterPool::default());
        clusters.insert(key.clone(), pool.clone());
        pool
    }
}

/// The connections of one cluster.
#[derive(Default)]
pub struct ClusterPool {
    endpoints: Mutex<HashMap<ConnKey, Arc<Endpoint>>>,
    /// Woken whenever a connection becomes idle or closes: pending requests try again.
    freed: Arc<Notify>,
}

#[derive(Default)]
struct Endpoint {
    idle: Mutex<Vec<Idle>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
    served: u32,
}

/// A request's hold on an HTTP/1.1 connection: back to the idle list when dropped (after the
/// response body ended), unless the connection served its `maxRequestsPerConnection`.
pub struct Lease {
    sender: Option<http1::SendRequest<RequestBody>>,
    served: u32,
    endpoint: Arc<Endpoint>,
    freed: Arc<Notify>,
    reusable: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            if self.reusable && !sender.is_closed() {
                self.endpoint
                    .idle
                    .lock()
                    .expect("idle list poisoned")
                    .push(Idle {
                        sender,
                        since: Instant::now(),
                        served: self.served,
                    });
            }
            self.freed.notify_waiters();
        }
    }
}

/// What a sent request holds until its response body ends.
pub struct InFlight {
    _request: Guard,
    _lease: Option<Lease>,
}

impl ClusterPool {
    fn is_empty(&self) -> bool {
        self.endpoints
            .lock()
            .expect("pool poisoned")
            .values()
            .all(|e| Arc::strong_count(e) == 1 && e.idle.lock().expect("poisoned").is_empty())
    }

    fn endpoint(&self, key: &ConnKey) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.lock().expect("pool poisoned");
        endpoints.entry(key.clone()).or_default().clone()
    }

    /// Sends `request` to the connection `key` names, within the limits of `policy`.
    /// The response comes with what must live until its body ended.
    pub async fn send(
        &self,
        state: &Arc<ClusterState>,
        policy: &ClusterPolicy,
        key: &ConnKey,
        connect_timeout: Duration,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, InFlight), PoolError> {
        let request_slot = state
            .try_request(&policy.limits)
            .ok_or(PoolError::Overflow("http2MaxRequests"))?;
        let endpoint = self.endpoint(key);
        match key.proto {
            Proto::Http1 => {
                self.send_http1(
                    state,
                    policy,
                    key,
                    connect_timeout,
                    endpoint,
                    request,
                    request_slot,
                )
                .await
            }
            Proto::Http2 => {
                let mut sender = self
                    .http2_sender(state, policy, key, connect_timeout, &endpoint)
                    .await?;
                let response =
                    sender
                        .send_request(request)
                        .await
                        .map_err(|source| PoolError::Reset {
                            target: key.target,
                            source,
                        })?;
                Ok((
                    response,
                    InFlight {
                        _request: request_slot,
                        _lease: None,
                    },
                ))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_http1(
        &self,
        state: &Arc<ClusterState>,
        policy: &ClusterPolicy,
        key: &ConnKey,
        connect_timeout: Duration,
        endpoint: Arc<Endpoint>,
        mut request: Request<RequestBody>,
        request_slot: Guard,
    ) -> Result<(Response<Incoming>, InFlight), PoolError> {
        let idle_timeout = policy.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let mut pending = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();

            let (mut sender, served) = match take_idle(&endpoint, idle_timeout) {
                Some(idle) => (idle.sender, idle.served),
                None => match state.try_connection(&policy.limits) {
                    Some(slot) => {
                        let io = open(key, connect_timeout).await?;
                        (self.handshake_http1(key.target, io, slot).await?, 0)
                    }
                    None => {
                        if pending.is_none() {
                            pending = Some(
                                state
                                    .try_pending(&policy.limits)
                                    .ok_or(PoolError::Overflow("http1MaxPendingRequests"))?,
                            );
                        }
                        freed.await;
                        continue;
                    }
                },
            };
            drop(pending.take());
            let served = served + 1;
            let reusable = policy
                .max_requests_per_connection
                .is_none_or(|max| max == 0 || served < max);
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        sender: Some(sender),
                        served,
                        endpoint,
                        freed: self.freed.clone(),
                        reusable,
                    };
                    return Ok((
                        response,
                        InFlight {
                            _request: request_slot,
                            _lease: Some(lease),
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // The idle connection closed under us before the request was written:
                    // the classic keep-alive race, safe to try another connection.
                    Some(unsent) => {
                        debug!(target = %key.target, "pooled connection closed; retrying on another");
                        request = unsent;
                        self.freed.notify_waiters();
                    }
                    None => {
                        self.freed.notify_waiters();
                        return Err(PoolError::Reset {
                            target: key.target,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
    }

    async fn handshake_http1(
        &self,
        target: SocketAddrV4,
        io: Transport,
        slot: Guard,
    ) -> Result<http1::SendRequest<RequestBody>, PoolError> {
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| PoolError::Handshake { target, source })?;
        let freed = self.freed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%target, "upstream connection ended: {e}");
            }
            drop(slot);
            freed.notify_waiters();
        });
        Ok(sender)
    }

    async fn http2_sender(
        &self,
        state: &Arc<ClusterState>,
        policy: &ClusterPolicy,
        key: &ConnKey,
        connect_timeout: Duration,
        endpoint: &Endpoint,
    ) -> Result<http2::SendRequest<RequestBody>, PoolError> {
        let mut pending = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut shared = endpoint.h2.lock().await;
                if let Some(sender) = shared.as_ref().filter(|s| !s.is_closed()) {
                    return Ok(sender.clone());
                }
                if let Some(slot) = state.try_connection(&policy.limits) {
                    let io = open(key, connect_timeout).await?;
                    let mut builder = http2::Builder::new(TokioExecutor::new());
                    builder
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Duration::from_secs(30))
                        .adaptive_window(true);
                    let (sender, connection) =
                        builder
                            .handshake(TokioIo::new(io))
                            .await
                            .map_err(|source| PoolError::Handshake {
                                target: key.target,
                                source,
                            })?;
                    let freed = self.freed.clone();
                    let target = key.target;
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            debug!(%target, "upstream HTTP/2 connection ended: {e}");
                        }
                        drop(slot);
                        freed.notify_waiters();
                    });
                    *shared = Some(sender.clone());
                    return Ok(sender);
                }
            }
            if pending.is_none() {
                pending = Some(
                    state
                        .try_pending(&policy.limits)
                        .ok_or(PoolError::Overflow("http1MaxPendingRequests"))?,
                );
            }
            freed.await;
        }
    }
}

fn take_idle(endpoint: &Endpoint, idle_timeout: Duration) -> Option<Idle> {
    let mut idle = endpoint.idle.lock().expect("idle list poisoned");
    // Most recently used first: it is the least likely to have been closed by the server.
    while let Some(candidate) = idle.pop() {
        if candidate.sender.is_closed() || candidate.since.elapsed() > idle_timeout {
            continue;
        }
        if candidate.sender.is_ready() {
            return Some(candidate);
        }
        // Still finishing its previous exchange: not ours to wait for.
    }
    None
}

/// Opens a dedicated HTTP/1.1 connection for a request that upgrades the protocol
/// (WebSocket): never pooled, it becomes a byte stream after `101 Switching Protocols`.
pub async fn upgrade_connection(
    key: &ConnKey,
    connect_timeout: Duration,
) -> Result<http1::SendRequest<RequestBody>, PoolError> {
    let io = open(key, connect_timeout).await?;
    let target = key.target;
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| PoolError::Handshake { target, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(%target, "upgraded upstream connection ended: {e}");
        }
    });
    Ok(sender)
}

/// The byte stream to an upstream: a TCP connection or a tunnel through the peer node.
enum Transport {
    Tcp(TcpStream),
    Tunnel(tunnel::TunnelStream),
}

async fn open(key: &ConnKey, timeout: Duration) -> Result<Transport, PoolError> {
    Ok(match key.via {
        Via::Direct { source } => {
            Transport::Tcp(connect_tcp(key.target, source, timeout, Role::Upstream).await?)
        }
        Via::Tunnel { peer } => Transport::Tunnel(
            tunnel::connect(peer, key.target, key.source.as_ref(), timeout).await?,
        ),
    })
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
