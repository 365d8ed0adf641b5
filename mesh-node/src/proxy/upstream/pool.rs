//! Upstream HTTP connections, pooled per endpoint and limited per cluster.
//!
//! Envoy's circuit breakers, as DestinationRule `connectionPool` sets them: a request first
//! takes a slot of `http2MaxRequests` (all requests in flight), then a connection — an idle
//! HTTP/1.1 one, the shared HTTP/2 one, or a new one if `tcp.maxConnections` allows — or else
//! waits as one of at most `http1MaxPendingRequests` pending requests until a connection frees.
//! Whatever does not fit overflows: the caller answers 503 with flag `UO`.
//!
//! Connections are keyed by target address, protocol, the way there (direct or through the
//! peer node's tunnel) and the source pod, so the far end still learns who is calling. The
//! pools know nothing of the requests they carry: any body hyper can write ([`PoolBody`]).

use std::{
    collections::HashMap,
    error::Error as StdError,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    body::{Body, Incoming},
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::debug;

use super::{
    cluster::{ClusterKey, ClusterPolicy, ClusterState, Guard},
    dial::{DialError, Dialer, Stream, Via},
};
use crate::model::ObjectKey;

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
    Dial(#[from] DialError),
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

/// What a pooled connection can carry: any request body hyper can write.
pub trait PoolBody:
    Body<Data = Bytes, Error = Box<dyn StdError + Send + Sync>> + Send + Unpin + 'static
{
}

impl<T> PoolBody for T where
    T: Body<Data = Bytes, Error = Box<dyn StdError + Send + Sync>> + Send + Unpin + 'static
{
}

/// The pools of every cluster, keyed by cluster; the proxy keeps one.
pub struct Pools<B> {
    clusters: Mutex<HashMap<ClusterKey, Arc<ClusterPool<B>>>>,
}

impl<B> Default for Pools<B> {
    fn default() -> Self {
        Self {
            clusters: Mutex::default(),
        }
    }
}

impl<B: PoolBody> Pools<B> {
    /// The pool of `key`. Callers cache the result per downstream connection.
    pub fn cluster(&self, key: &ClusterKey) -> Arc<ClusterPool<B>> {
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
pub struct ClusterPool<B> {
    endpoints: Mutex<HashMap<ConnKey, Arc<Endpoint<B>>>>,
    /// Woken whenever a connection becomes idle or closes: pending requests try again.
    freed: Arc<Notify>,
}

impl<B> Default for ClusterPool<B> {
    fn default() -> Self {
        Self {
            endpoints: Mutex::default(),
            freed: Arc::default(),
        }
    }
}

struct Endpoint<B> {
    idle: Mutex<Vec<Idle<B>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<B>>>,
}

impl<B> Default for Endpoint<B> {
    fn default() -> Self {
        Self {
            idle: Mutex::default(),
            h2: tokio::sync::Mutex::default(),
        }
    }
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
    served: u32,
}

/// A request's hold on an HTTP/1.1 connection: back to the idle list when dropped (after the
/// response body ended), unless the connection served its `maxRequestsPerConnection`.
pub struct Lease<B> {
    sender: Option<http1::SendRequest<B>>,
    served: u32,
    endpoint: Arc<Endpoint<B>>,
    freed: Arc<Notify>,
    reusable: bool,
}

impl<B> Drop for Lease<B> {
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
pub struct InFlight<B> {
    _request: Guard,
    _lease: Option<Lease<B>>,
}

impl<B: PoolBody> ClusterPool<B> {
    fn is_empty(&self) -> bool {
        self.endpoints
            .lock()
            .expect("pool poisoned")
            .values()
            .all(|e| Arc::strong_count(e) == 1 && e.idle.lock().expect("poisoned").is_empty())
    }

    fn endpoint(&self, key: &ConnKey) -> Arc<Endpoint<B>> {
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
        dial: Dial<'_>,
        request: Request<B>,
    ) -> Result<(Response<Incoming>, InFlight<B>), PoolError> {
        let request_slot = state
            .try_request(&policy.limits)
            .ok_or(PoolError::Overflow("http2MaxRequests"))?;
        let endpoint = self.endpoint(key);
        match key.proto {
            Proto::Http1 => {
                self.send_http1(state, policy, key, dial, endpoint, request, request_slot)
                    .await
            }
            Proto::Http2 => {
                let mut sender = self
                    .http2_sender(state, policy, key, dial, &endpoint)
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

    #[allow(
        clippy::too_many_arguments,
        reason = "the pieces of one request, borrowed from its caller"
    )]
    async fn send_http1(
        &self,
        state: &Arc<ClusterState>,
        policy: &ClusterPolicy,
        key: &ConnKey,
        dial: Dial<'_>,
        endpoint: Arc<Endpoint<B>>,
        mut request: Request<B>,
        request_slot: Guard,
    ) -> Result<(Response<Incoming>, InFlight<B>), PoolError> {
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
                        let io = dial.open(key).await?;
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
        io: Stream,
        slot: Guard,
    ) -> Result<http1::SendRequest<B>, PoolError> {
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
        dial: Dial<'_>,
        endpoint: &Endpoint<B>,
    ) -> Result<http2::SendRequest<B>, PoolError> {
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
                    let io = dial.open(key).await?;
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

fn take_idle<B>(endpoint: &Endpoint<B>, idle_timeout: Duration) -> Option<Idle<B>> {
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

/// How a pool reaches its endpoints: the proxy's dialler and the cluster's `connectTimeout`.
#[derive(Clone, Copy, Debug)]
pub struct Dial<'a> {
    pub dialer: &'a Dialer,
    pub timeout: Option<Duration>,
}

impl Dial<'_> {
    async fn open(&self, key: &ConnKey) -> Result<Stream, PoolError> {
        Ok(self
            .dialer
            .open(key.target, key.via, key.source.as_ref(), self.timeout)
            .await?)
    }
}

/// Opens a dedicated HTTP/1.1 connection for a request that upgrades the protocol
/// (WebSocket): never pooled, it becomes a byte stream after `101 Switching Protocols`.
pub async fn upgrade_connection<B: PoolBody>(
    key: &ConnKey,
    dial: Dial<'_>,
) -> Result<http1::SendRequest<B>, PoolError> {
    let io = dial.open(key).await?;
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
