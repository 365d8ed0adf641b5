//! Upstream HTTP connections, pooled per endpoint and limited per cluster.
//!
//! Envoy's circuit breakers, as DestinationRule `connectionPool` sets them: a request first
//! takes a slot of `http2MaxRequests` (all requests in flight), then a connection — an idle
//! HTTP/1.1 one, the shared HTTP/2 one, or a new one if `tcp.maxConnections` allows — or else
//! waits as one of at most `http1MaxPendingRequests` pending requests until a connection frees.
//! Whatever does not fit overflows: the caller answers 503 with flag `UO`.
//!
//! Connections are keyed by target address, protocol, the way there (direct or through the
//! peer node's tunnel) and the calling pod, whose certificate the far end sees. The
//! pools know nothing of the requests they carry: any body hyper can write ([`PoolBody`]).
//!
//! An HTTP/1.1 connection has no task of its own: the task of the request it carries runs
//! it ([`Driven`]), from the request's head to the response body's end, so a request and
//! its response pass from the client's connection to the upstream's without waking another
//! task (a request with a body to stream hands it to a task once the response's head is in).
//! Parked idle, it wakes the pool only if the server closes it or sends what nobody asked for.

use std::{
    collections::HashMap,
    error::Error as StdError,
    future::{poll_fn, Future as _},
    net::SocketAddrV4,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;
use tokio::{runtime::Handle, sync::Notify};
use tracing::debug;

use super::{
    cluster::{ClusterKey, ClusterPolicy, ClusterState, Guard},
    dial::{DialError, Dialer, Stream, Via},
    hbone::Caller,
};
use crate::tls::origination::{Alpn, Origination};

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
    pub caller: Option<Caller>,
    /// TLS the proxy originates on the connection.
    pub tls: Option<Arc<Origination>>,
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
    /// The upstream refused an HTTP/2 request without processing it: `REFUSED_STREAM`, or a
    /// stream its graceful `GOAWAY` left out (a draining server, RFC 9113 §8.7). Safe to send
    /// again, as if it had never been sent.
    #[error("upstream {target} refused the request unprocessed: {source}")]
    Refused {
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
    /// TLS origination failed (the certificate, the name, the handshake).
    pub fn is_tls(&self) -> bool {
        matches!(self, PoolError::Dial(DialError::Tls(_)))
    }

    /// Whether no byte of the request reached the upstream.
    pub fn before_request(&self) -> bool {
        !matches!(self, PoolError::Reset { .. } | PoolError::Refused { .. })
    }

    /// Whether the upstream refused the request unprocessed (see [`PoolError::Refused`]).
    pub fn refused(&self) -> bool {
        matches!(self, PoolError::Refused { .. })
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
pub struct Pools<B: PoolBody> {
    clusters: Mutex<HashMap<ClusterKey, Arc<ClusterPool<B>>>>,
}

impl<B: PoolBody> Default for Pools<B> {
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
pub struct ClusterPool<B: PoolBody> {
    endpoints: Mutex<HashMap<ConnKey, Arc<Endpoint<B>>>>,
    /// Woken whenever a connection becomes idle or closes: pending requests try again.
    freed: Arc<Notify>,
}

impl<B: PoolBody> Default for ClusterPool<B> {
    fn default() -> Self {
        Self {
            endpoints: Mutex::default(),
            freed: Arc::default(),
        }
    }
}

struct Endpoint<B: PoolBody> {
    idle: Mutex<Vec<Idle<B>>>,
    /// The shared HTTP/2 connection, numbered so that a request that found it gone away
    /// forgets that one and not a newer one.
    h2: tokio::sync::Mutex<Option<(u64, http2::SendRequest<B>)>>,
    /// The number of the next HTTP/2 connection.
    h2_opened: AtomicU64,
    /// What the idle connections wake: a task that runs them once (see [`Reaper`]).
    reaper: Waker,
    /// A reaping task is on its way.
    reaping: AtomicBool,
}

impl<B: PoolBody> Endpoint<B> {
    fn new() -> Arc<Self> {
        Arc::new_cyclic(|endpoint| Self {
            idle: Mutex::default(),
            h2: tokio::sync::Mutex::default(),
            h2_opened: AtomicU64::new(0),
            reaper: Waker::from(Arc::new(Reaper {
                endpoint: endpoint.clone(),
            })),
            reaping: AtomicBool::new(false),
        })
    }

    /// Runs every idle connection once, so the ones their server closed end and free their
    /// slot.
    fn reap(&self) {
        self.reaping.store(false, Ordering::Release);
        let mut cx = Context::from_waker(&self.reaper);
        self.idle
            .lock()
            .expect("idle list poisoned")
            .retain_mut(|idle| idle.connection.poll_open(&mut cx));
    }

    /// Takes back `connection` once its exchange is over: kept for the next request if it
    /// is `reusable`, else closed. An exchange still under way (the rest of a request body, or
    /// of a response the client did not read to its end, which hyper closes unless it is
    /// already buffered) is finished by a task first.
    fn release(self: &Arc<Self>, mut connection: Box<Driven<B>>, served: u32, reusable: bool) {
        if !connection.poll_open(&mut Context::from_waker(&self.reaper)) {
            return;
        }
        if connection.sender.is_ready() {
            if reusable {
                let freed = connection.freed.clone();
                self.idle.lock().expect("idle list poisoned").push(Idle {
                    connection,
                    since: Instant::now(),
                    served,
                });
                freed.notify_waiters();
            }
            return;
        }
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        let endpoint = self.clone();
        runtime.spawn(async move {
            let ready = poll_fn(|cx| {
                Poll::Ready(match connection.poll_open(cx) {
                    false => false,
                    true if connection.sender.is_ready() => true,
                    true => return Poll::Pending,
                })
            })
            .await;
            if ready {
                endpoint.release(connection, served, reusable);
            }
        });
    }
}

/// The waker of an endpoint's idle connections. An idle connection has nothing to wake for
/// but its server closing it (or sending what nobody asked for): a task then runs the idle
/// connections, and the ones that ended are dropped.
struct Reaper<B: PoolBody> {
    endpoint: Weak<Endpoint<B>>,
}

impl<B: PoolBody> Wake for Reaper<B> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(endpoint) = self.endpoint.upgrade() else {
            return;
        };
        if endpoint.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        match Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { endpoint.reap() })),
            Err(_) => endpoint.reaping.store(false, Ordering::Release),
        }
    }
}

type Http1Connection<B> = http1::Connection<TokioIo<Stream>, B>;

/// An HTTP/1.1 connection run by whoever holds it: the request it carries (through
/// [`UpstreamBody`]), a task finishing its exchange, or the idle list's [`Reaper`].
struct Driven<B: PoolBody> {
    sender: http1::SendRequest<B>,
    /// `None` once it ended.
    connection: Option<Http1Connection<B>>,
    /// The cluster's connection budget, given back when the connection ends.
    slot: Option<Guard>,
    freed: Arc<Notify>,
    target: SocketAddrV4,
}

impl<B: PoolBody> Driven<B> {
    /// Runs the connection as far as it goes now; whether it is still open.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(connection) = &mut self.connection else {
            return false;
        };
        let Poll::Ready(ended) = Pin::new(connection).poll(cx) else {
            return true;
        };
        if let Err(e) = ended {
            debug!(target = %self.target, "upstream connection ended: {e}");
        }
        self.close();
        false
    }

    fn close(&mut self) {
        self.connection = None;
        if self.slot.take().is_some() {
            self.freed.notify_waiters();
        }
    }
}

impl<B: PoolBody> Drop for Driven<B> {
    fn drop(&mut self) {
        self.close();
    }
}

struct Idle<B: PoolBody> {
    connection: Box<Driven<B>>,
    since: Instant,
    served: u32,
}

/// A request's hold on an HTTP/1.1 connection: back to the idle list when its response body
/// is dropped, unless the connection served its `maxRequestsPerConnection`.
struct Lease<B: PoolBody> {
    connection: Option<Box<Driven<B>>>,
    served: u32,
    endpoint: Arc<Endpoint<B>>,
    reusable: bool,
}

impl<B: PoolBody> Drop for Lease<B> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            self.endpoint
                .release(connection, self.served, self.reusable);
        }
    }
}

/// The body of an upstream response. Over HTTP/1.1 reading it runs the connection it comes
/// on, which goes back to the pool when the body is dropped.
pub struct UpstreamBody<B: PoolBody> {
    body: Incoming,
    lease: Option<Lease<B>>,
}

/// The body of a response on a connection the pool does not run: HTTP/2's, or a protocol
/// upgrade's.
impl<B: PoolBody> From<Incoming> for UpstreamBody<B> {
    fn from(body: Incoming) -> Self {
        Self { body, lease: None }
    }
}

impl<B: PoolBody> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(connection) = this.lease.as_mut().and_then(|l| l.connection.as_mut()) {
            connection.poll_open(cx);
        }
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a sent request holds until its response ended: its `http2MaxRequests` slot.
pub struct InFlight {
    _request: Guard,
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
        endpoints
            .entry(key.clone())
            .or_insert_with(Endpoint::new)
            .clone()
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
    ) -> Result<(Response<UpstreamBody<B>>, InFlight), PoolError> {
        let request_slot = state
            .try_request(&policy.limits)
            .ok_or(PoolError::Overflow("http2MaxRequests"))?;
        let in_flight = InFlight {
            _request: request_slot,
        };
        let endpoint = self.endpoint(key);
        match key.proto {
            Proto::Http1 => {
                let response = self
                    .send_http1(state, policy, key, dial, endpoint, request)
                    .await?;
                Ok((response, in_flight))
            }
            Proto::Http2 => {
                let mut request = request;
                // A connection whose server drains (GOAWAY) takes no new request: it goes on a
                // new connection, at most twice.
                for attempt in 0.. {
                    let (number, mut sender) = self
                        .http2_sender(state, policy, key, dial, &endpoint)
                        .await?;
                    let target = key.target;
                    match sender.try_send_request(request).await {
                        Ok(response) => return Ok((response.map(UpstreamBody::from), in_flight)),
                        Err(mut e) => match e.take_message() {
                            Some(unsent) => {
                                if attempt == 2 {
                                    // Never sent: as unprocessed as a refused stream.
                                    return Err(PoolError::Refused {
                                        target,
                                        source: e.into_error(),
                                    });
                                }
                                debug!(%target, "HTTP/2 connection gone away; sending on a new one");
                                let mut shared = endpoint.h2.lock().await;
                                if shared.as_ref().is_some_and(|(n, _)| *n == number) {
                                    *shared = None;
                                }
                                request = unsent;
                            }
                            None => {
                                let source = e.into_error();
                                return Err(if refused_unprocessed(&source) {
                                    PoolError::Refused { target, source }
                                } else {
                                    PoolError::Reset { target, source }
                                });
                            }
                        },
                    }
                }
                unreachable!("the loop returns")
            }
        }
    }

    async fn send_http1(
        &self,
        state: &Arc<ClusterState>,
        policy: &ClusterPolicy,
        key: &ConnKey,
        dial: Dial<'_>,
        endpoint: Arc<Endpoint<B>>,
        mut request: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, PoolError> {
        let idle_timeout = policy.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let mut pending = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();

            let (mut connection, served) = match take_idle(&endpoint, idle_timeout) {
                Some(Idle {
                    mut connection,
                    served,
                    ..
                }) => {
                    // From here on the connection wakes this task; one its server closed
                    // meanwhile ends here.
                    if !poll_fn(|cx| Poll::Ready(connection.poll_open(cx))).await {
                        continue;
                    }
                    (connection, served)
                }
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
            // A request body still to come may have to go on while the client is not reading
            // the response (its socket full): the connection then runs in a task of its own
            // once the response's head is in, as hyper runs it.
            let streaming = !request.body().is_end_stream();
            let mut response = pin!(connection.sender.try_send_request(request));
            let sent = poll_fn(|cx| {
                connection.poll_open(cx);
                response.as_mut().poll(cx)
            })
            .await;
            match sent {
                Ok(response) => {
                    let lease = if streaming {
                        endpoint.release(connection, served, reusable);
                        None
                    } else {
                        Some(Lease {
                            connection: Some(connection),
                            served,
                            endpoint,
                            reusable,
                        })
                    };
                    return Ok(response.map(|body| UpstreamBody { body, lease }));
                }
                Err(mut e) => match e.take_message() {
                    // The idle connection closed under us before the request was written:
                    // the classic keep-alive race, safe to try another connection.
                    Some(unsent) => {
                        debug!(target = %key.target, "pooled connection closed; retrying on another");
                        request = unsent;
                    }
                    None => {
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
    ) -> Result<Box<Driven<B>>, PoolError> {
        // Bodies queued, not flattened into a buffer kept at its largest (see `l7::serve`).
        let (sender, connection) = http1::Builder::new()
            .writev(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| PoolError::Handshake { target, source })?;
        Ok(Box::new(Driven {
            sender,
            connection: Some(connection),
            slot: Some(slot),
            freed: self.freed.clone(),
            target,
        }))
    }

    async fn http2_sender(
        &self,
        state: &Arc<ClusterState>,
        policy: &ClusterPolicy,
        key: &ConnKey,
        dial: Dial<'_>,
        endpoint: &Endpoint<B>,
    ) -> Result<(u64, http2::SendRequest<B>), PoolError> {
        let mut pending = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut shared = endpoint.h2.lock().await;
                if let Some((number, sender)) = shared.as_ref().filter(|(_, s)| !s.is_closed()) {
                    return Ok((*number, sender.clone()));
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
                    let number = endpoint.h2_opened.fetch_add(1, Ordering::Relaxed);
                    *shared = Some((number, sender.clone()));
                    return Ok((number, sender));
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

/// Whether an HTTP/2 request failed without the server processing it: `REFUSED_STREAM`, or a
/// graceful `GOAWAY` that left its stream out (a stream the server keeps is finished, not
/// failed, by a graceful `GOAWAY`).
fn refused_unprocessed(error: &hyper::Error) -> bool {
    let mut source = StdError::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = cause.source();
    }
    false
}

fn take_idle<B: PoolBody>(endpoint: &Endpoint<B>, idle_timeout: Duration) -> Option<Idle<B>> {
    let mut idle = endpoint.idle.lock().expect("idle list poisoned");
    // Most recently used first: it is the least likely to have been closed by the server.
    while let Some(candidate) = idle.pop() {
        if candidate.connection.connection.is_some() && candidate.since.elapsed() <= idle_timeout {
            return Some(candidate);
        }
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
        let alpn = match key.proto {
            Proto::Http1 => Alpn::Http1,
            Proto::Http2 => Alpn::Http2,
        };
        Ok(self
            .dialer
            .open_with(
                key.target,
                key.via,
                key.caller.as_ref(),
                self.timeout,
                key.tls.as_deref().map(|t| (t, alpn)),
            )
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
        .writev(true)
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

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        future::Future,
        net::{Ipv4Addr, SocketAddr},
        sync::atomic::{AtomicUsize, Ordering},
    };

    use http_body_util::{combinators::BoxBody, BodyExt as _, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::server::conn::auto;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
        sync::Barrier,
    };

    use super::*;
    use crate::{model::ObjectKey, proxy::upstream::cluster::Limits};

    type TestBody = BoxBody<Bytes, Box<dyn StdError + Send + Sync>>;
    /// What a request holds until it is over.
    type Held = (UpstreamBody<TestBody>, InFlight);
    type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// Bounds every await of a test, so a pool that never answers fails instead of hanging.
    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("the pool did not answer")
    }

    async fn bind() -> (TcpListener, SocketAddrV4) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        (listener, addr)
    }

    /// A hyper server (HTTP/1.1 and h2c) that answers each request with the number of the
    /// connection it arrived on ("connection 1", ...), after `handler` let it.
    async fn upstream<F, Fut>(handler: F) -> (SocketAddrV4, Arc<AtomicUsize>)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (listener, addr) = bind().await;
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let handler = handler.clone();
                let service = service_fn(move |request| {
                    let handler = handler.clone();
                    async move {
                        handler(request).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "connection {n}"
                        )))))
                    }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                });
            }
        });
        (addr, connections)
    }

    async fn answer_at_once(_: Request<Incoming>) {}

    fn dialer() -> Dialer {
        Dialer {
            node: "n1".into(),
            proxy_ip: Ipv4Addr::LOCALHOST,
            peer_tunnel_port: 15008,
            sidecar: false,
            connect_timeout: Duration::from_secs(5),
            trust_domain: "cluster.local".into(),
            hbone: None,
        }
    }

    fn key(target: SocketAddrV4, proto: Proto) -> ConnKey {
        ConnKey {
            target,
            via: Via::Direct { source: None },
            proto,
            caller: None,
            tls: None,
        }
    }

    fn get(proto: Proto) -> Request<TestBody> {
        // HTTP/2 requests carry the absolute form, as the L7 path prepares them.
        let uri = match proto {
            Proto::Http1 => "/",
            Proto::Http2 => "http://upstream/",
        };
        Request::builder()
            .uri(uri)
            .header(http::header::HOST, "upstream")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    fn limited(limits: Limits) -> ClusterPolicy {
        ClusterPolicy {
            limits,
            ..ClusterPolicy::default()
        }
    }

    /// What a test needs to send requests through one cluster pool.
    #[derive(Clone)]
    struct Client {
        pool: Arc<ClusterPool<TestBody>>,
        state: Arc<ClusterState>,
        policy: ClusterPolicy,
        dialer: Dialer,
    }

    impl Client {
        fn new(policy: ClusterPolicy) -> Self {
            Self {
                pool: Arc::default(),
                state: Arc::new(ClusterState::new()),
                policy,
                dialer: dialer(),
            }
        }

        /// Sends a GET and reads the response body to its end; the caller decides when the
        /// request is over by dropping what it holds (the body and the request's slot).
        async fn get(
            &self,
            target: SocketAddrV4,
            proto: Proto,
        ) -> Result<(String, Held), PoolError> {
            let dial = Dial {
                dialer: &self.dialer,
                timeout: None,
            };
            let (response, in_flight) = self
                .pool
                .send(
                    &self.state,
                    &self.policy,
                    &key(target, proto),
                    dial,
                    get(proto),
                )
                .await?;
            let mut body = response.into_body();
            let mut read = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    read.extend_from_slice(&data);
                }
            }
            Ok((String::from_utf8(read).unwrap(), (body, in_flight)))
        }

        async fn served_by(&self, target: SocketAddrV4, proto: Proto) -> String {
            within(self.get(target, proto)).await.unwrap().0
        }
    }

    /// Waits until `condition` holds: the test's way to know a request reached a state.
    async fn until(mut condition: impl FnMut() -> bool) {
        within(async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }

    /// An HTTP/2 server whose first connection goes away (GOAWAY, as a draining server
    /// does) once its first request arrived, and answers that request only when `release` is
    /// notified: the connection stays open, taking no new stream, meanwhile.
    async fn draining_upstream(release: Arc<Notify>) -> SocketAddrV4 {
        let (listener, addr) = bind().await;
        tokio::spawn(async move {
            for n in 1.. {
                let (io, _) = listener.accept().await.unwrap();
                let first = n == 1;
                let arrived = Arc::new(Notify::new());
                let service = service_fn({
                    let (arrived, release) = (arrived.clone(), release.clone());
                    move |_: Request<Incoming>| {
                        let (arrived, release) = (arrived.clone(), release.clone());
                        async move {
                            if first {
                                arrived.notify_one();
                                release.notified().await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                "connection {n}"
                            )))))
                        }
                    }
                });
                tokio::spawn(async move {
                    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), service);
                    tokio::pin!(connection);
                    if first {
                        tokio::select! {
                            _ = connection.as_mut() => return,
                            () = arrived.notified() => connection.as_mut().graceful_shutdown(),
                        }
                    }
                    let _ = connection.await;
                });
            }
        });
        addr
    }

    /// A request for a connection its server drains is sent on a new connection, not failed;
    /// the request the server kept is answered on the old one.
    #[tokio::test]
    async fn an_http2_request_after_the_servers_goaway_goes_on_a_new_connection() {
        let release = Arc::new(Notify::new());
        let addr = draining_upstream(release.clone()).await;
        let client = Client::new(ClusterPolicy::default());
        let first = tokio::spawn({
            let client = client.clone();
            async move {
                within(client.get(addr, Proto::Http2))
                    .await
                    .map(|(body, _)| body)
            }
        });
        // The first request arrived and the GOAWAY followed; the client reads it meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = within(client.get(addr, Proto::Http2))
            .await
            .map(|(body, _)| body);
        assert_eq!(
            second.expect("sent again on a new connection"),
            "connection 2"
        );
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), "connection 1");
    }

    #[tokio::test]
    async fn a_second_request_reuses_the_idle_http1_connection() {
        let (addr, connections) = upstream(answer_at_once).await;
        let client = Client::new(ClusterPolicy::default());
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 1");
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 1");
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 1");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert_eq!(
            client.state.connections(),
            1,
            "the idle connection stays open"
        );
        assert_eq!(client.state.requests(), 0);
    }

    #[tokio::test]
    async fn max_requests_per_connection_one_opens_a_connection_per_request() {
        let (addr, connections) = upstream(answer_at_once).await;
        let client = Client::new(ClusterPolicy {
            max_requests_per_connection: Some(1),
            ..ClusterPolicy::default()
        });
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 1");
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 2");
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 3");
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn max_requests_per_connection_two_serves_two_requests_per_connection() {
        let (addr, _) = upstream(answer_at_once).await;
        let client = Client::new(ClusterPolicy {
            max_requests_per_connection: Some(2),
            ..ClusterPolicy::default()
        });
        let served: Vec<String> = [
            client.served_by(addr, Proto::Http1).await,
            client.served_by(addr, Proto::Http1).await,
            client.served_by(addr, Proto::Http1).await,
            client.served_by(addr, Proto::Http1).await,
        ]
        .into();
        assert_eq!(
            served,
            [
                "connection 1",
                "connection 1",
                "connection 2",
                "connection 2"
            ]
        );
    }

    #[tokio::test]
    async fn an_idle_connection_past_the_idle_timeout_is_not_reused() {
        let (addr, connections) = upstream(answer_at_once).await;
        let client = Client::new(ClusterPolicy {
            idle_timeout: Some(Duration::from_millis(1)),
            ..ClusterPolicy::default()
        });
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 1");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 2");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_beyond_max_connections_waits_and_one_more_overflows() {
        let (addr, connections) = upstream(answer_at_once).await;
        let client = Client::new(limited(Limits {
            max_connections: 1,
            max_pending: 1,
            ..Limits::UNLIMITED
        }));
        // The first request holds the only connection until it is over.
        let (served, first) = within(client.get(addr, Proto::Http1)).await.unwrap();
        assert_eq!(served, "connection 1");

        let pending = tokio::spawn({
            let client = client.clone();
            async move { client.get(addr, Proto::Http1).await.map(|(s, _)| s) }
        });
        until(|| client.state.pending() == 1).await;

        let overflow = within(client.get(addr, Proto::Http1)).await.err().unwrap();
        assert!(
            matches!(overflow, PoolError::Overflow("http1MaxPendingRequests")),
            "{overflow}"
        );
        assert!(overflow.to_string().contains("http1MaxPendingRequests"));
        assert!(overflow.before_request());

        drop(first);
        let served = within(pending).await.unwrap().unwrap();
        assert_eq!(served, "connection 1", "served on the freed connection");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert_eq!(client.state.pending(), 0);
    }

    #[tokio::test]
    async fn requests_beyond_http2_max_requests_overflow_until_one_ends() {
        let (addr, _) = upstream(answer_at_once).await;
        let client = Client::new(limited(Limits {
            max_requests: 1,
            ..Limits::UNLIMITED
        }));
        let (_, first) = within(client.get(addr, Proto::Http1)).await.unwrap();
        let overflow = within(client.get(addr, Proto::Http1)).await.err().unwrap();
        assert!(
            matches!(overflow, PoolError::Overflow("http2MaxRequests")),
            "{overflow}"
        );
        drop(first);
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 1");
    }

    /// A handler that holds the first two requests until both arrived; later ones pass.
    fn first_two_together() -> impl Fn(Request<Incoming>) -> BoxFuture + Clone + Send + Sync {
        let barrier = Arc::new(Barrier::new(2));
        let seen = Arc::new(AtomicUsize::new(0));
        move |_| {
            let barrier = barrier.clone();
            let first_two = seen.fetch_add(1, Ordering::SeqCst) < 2;
            Box::pin(async move {
                if first_two {
                    barrier.wait().await;
                }
            })
        }
    }

    #[tokio::test]
    async fn http2_requests_in_flight_together_share_one_connection() {
        // The server answers only once both requests arrived: they must be in flight at once.
        let (addr, connections) = upstream(first_two_together()).await;
        let client = Client::new(ClusterPolicy::default());
        let (a, b) = within(async {
            tokio::join!(
                client.get(addr, Proto::Http2),
                client.get(addr, Proto::Http2)
            )
        })
        .await;
        assert_eq!(a.unwrap().0, "connection 1");
        assert_eq!(b.unwrap().0, "connection 1");
        assert_eq!(client.served_by(addr, Proto::Http2).await, "connection 1");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn http1_requests_in_flight_together_take_a_connection_each() {
        let (addr, connections) = upstream(first_two_together()).await;
        let client = Client::new(ClusterPolicy::default());
        let (a, b) = within(async {
            tokio::join!(
                client.get(addr, Proto::Http1),
                client.get(addr, Proto::Http1)
            )
        })
        .await;
        let mut served = [a.unwrap().0, b.unwrap().0];
        served.sort();
        assert_eq!(served, ["connection 1", "connection 2"]);
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    /// A server that answers one request per connection, keep-alive as far as the client can
    /// tell, then closes the connection.
    async fn closing_upstream() -> (SocketAddrV4, Arc<AtomicUsize>) {
        let (listener, addr) = bind().await;
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            loop {
                let (mut io, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    read_head(&mut io).await;
                    let body = format!("connection {n}");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    io.write_all(response.as_bytes()).await.unwrap();
                });
            }
        });
        (addr, connections)
    }

    async fn read_head(io: &mut TcpStream) {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = io.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before sending a request");
            head.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced() {
        let (addr, connections) = closing_upstream().await;
        let client = Client::new(ClusterPolicy::default());
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 1");
        // The pool learns of the close and frees the connection's slot.
        until(|| client.state.connections() == 0).await;
        assert_eq!(client.served_by(addr, Proto::Http1).await, "connection 2");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_left_unread_does_not_hold_up_the_next_request() {
        // Each answer is 4 MiB: far more than a socket holds, so the connection is mid-body
        // when the first request's holder lets it go.
        let (listener, addr) = bind().await;
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.unwrap();
                let service = service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; 4 << 20]))))
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                });
            }
        });
        let client = Client::new(ClusterPolicy::default());
        let dial = Dial {
            dialer: &client.dialer,
            timeout: None,
        };
        let key = key(addr, Proto::Http1);
        let send = || {
            client
                .pool
                .send(&client.state, &client.policy, &key, dial, get(Proto::Http1))
        };
        let (response, in_flight) = within(send()).await.unwrap();
        let mut body = response.into_body();
        let first = within(body.frame()).await.unwrap().unwrap();
        assert!(first.is_data());
        drop((body, in_flight));

        let (response, in_flight) = within(send()).await.unwrap();
        let read = within(response.into_body().collect()).await.unwrap();
        assert_eq!(read.to_bytes().len(), 4 << 20);
        drop(in_flight);
        // The first connection, left with most of its body unread, is closed (its slot
        // freed); the second waits idle for the next request.
        until(|| client.state.connections() == 1).await;
        assert_eq!(client.state.requests(), 0);
        let _third = within(send()).await.unwrap();
        assert_eq!(
            client.state.connections(),
            1,
            "the idle connection is reused"
        );
    }

    #[tokio::test]
    async fn a_large_request_body_is_written_while_the_request_waits_for_its_answer() {
        // The server answers with the length it read: the 4 MiB body, far more than the
        // sockets hold, must be written by the request's own task as the server reads it.
        let (listener, addr) = bind().await;
        tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let service = service_fn(|request: Request<Incoming>| async move {
                let read = request.into_body().collect().await.unwrap().to_bytes();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                    read.len().to_string(),
                ))))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service)
                .await;
        });
        let client = Client::new(ClusterPolicy::default());
        let body = Full::new(Bytes::from(vec![b'x'; 4 << 20]))
            .map_err(|never| match never {})
            .boxed();
        let request = Request::post("/")
            .header(http::header::HOST, "upstream")
            .body(body)
            .unwrap();
        let dial = Dial {
            dialer: &client.dialer,
            timeout: None,
        };
        let (response, _in_flight) = within(client.pool.send(
            &client.state,
            &client.policy,
            &key(addr, Proto::Http1),
            dial,
            request,
        ))
        .await
        .unwrap();
        let read = within(response.into_body().collect()).await.unwrap();
        assert_eq!(read.to_bytes(), (4 << 20).to_string());
    }

    #[tokio::test]
    async fn a_server_that_closes_after_reading_the_request_is_a_reset() {
        let (listener, addr) = bind().await;
        tokio::spawn(async move {
            let (mut io, _) = listener.accept().await.unwrap();
            read_head(&mut io).await;
        });
        let client = Client::new(ClusterPolicy::default());
        let error = within(client.get(addr, Proto::Http1)).await.err().unwrap();
        assert!(matches!(error, PoolError::Reset { .. }), "{error}");
        assert!(
            !error.before_request(),
            "the request reached the server: only a retry policy may repeat it"
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_dial_error_before_the_request() {
        let (listener, addr) = bind().await;
        drop(listener);
        let client = Client::new(ClusterPolicy::default());
        for proto in [Proto::Http1, Proto::Http2] {
            let error = within(client.get(addr, proto)).await.err().unwrap();
            assert!(matches!(error, PoolError::Dial(_)), "{error}");
            assert!(error.before_request());
            assert!(error.to_string().contains("refused"), "{error}");
        }
        // The failed connects hold no budget.
        assert_eq!(client.state.connections(), 0);
        assert_eq!(client.state.requests(), 0);
    }

    #[tokio::test]
    async fn pools_are_one_per_cluster() {
        let pools: Pools<TestBody> = Pools::default();
        let reviews = ClusterKey::new(ObjectKey::new("bookinfo", "reviews"), 9080, None);
        let ratings = ClusterKey::new(ObjectKey::new("bookinfo", "ratings"), 9080, None);
        assert!(Arc::ptr_eq(
            &pools.cluster(&reviews),
            &pools.cluster(&reviews)
        ));
        assert!(!Arc::ptr_eq(
            &pools.cluster(&reviews),
            &pools.cluster(&ratings)
        ));
    }
}
