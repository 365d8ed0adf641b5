//! The destination side's HTTP/1.1 relay: one L7 hop across nodes, not two.
//!
//! A request that reaches a pod of this node through the tunnel (HBONE) on an HTTP port was
//! parsed, limited, normalized, routed and given its request id by the source node's proxy.
//! Here it only has to be reported (`reporter="destination"`), given the caller's
//! `x-forwarded-client-cert`, and decided where the pod has AuthorizationPolicies. Without
//! policies it is relayed to the pod with one parse of its head (httparse), which is written
//! again with the destination's headers; body and response are copied both ways at once while
//! their framing is followed (lengths; chunks, decoded and written again in canonical form,
//! extensions and trailers dropped; `HEAD`, `1xx`, `204`/`304`; close-delimited responses), so
//! each request is counted, and its code, sizes and duration reported, as the full path reports
//! them. There is no second HTTP codec, no pool and no task per request. The response goes to
//! the source node's proxy, whose HTTP client reads it as the full path's would be read.
//!
//! Whatever the full path would treat otherwise hands the connection, with every byte read and
//! nothing yet sent for that request, to the full path ([`serve`]) for good: a pod with
//! policies or whose requests are traced or logged by a Telemetry, HTTP/2, HTTP/1.0, an upgrade, `Expect`, `TE`, gRPC, a head over the limits, a
//! repeated `Host` or request id, a path normalization would change or with characters outside
//! RFC 3986's, framing or hop-by-hop headers the full path would refuse or strip, a client over
//! its cap, an overloaded or draining proxy, a pod that cannot be dialled. So this path changes what a
//! request costs, not what happens to it.

use std::{
    future::{poll_fn, Future as _},
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context as TaskContext, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::{io::AsyncWriteExt as _, time::Sleep};

use super::{
    deadline::{Busy, Deadlines},
    *,
};
use crate::proxy::{detect::Rewind, sources::SourceRequest, upstream::Stream};

/// The most headers a head may have here; a head with more goes to the full path.
const MAX_HEADERS: usize = 128;
/// What a read asks for at least.
const READ_SIZE: usize = 16 * 1024;
/// The largest response head taken from the pod.
const MAX_RESPONSE_HEAD: usize = 96 * 1024;
/// The most a body's chunk extensions, all together, or its trailers may take (hyper's
/// bound).
const MAX_CHUNK_EXTRA: usize = 16 * 1024;
/// How long a pod connection is kept without a request (the pool's default idle timeout).
const POD_IDLE: Duration = Duration::from_secs(300);
/// The full path's answers when the pod fails before its response head, and when the client
/// sends a body it cannot read.
const REMOTE_RESET: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: remote reset";
const DOWNSTREAM_PROTOCOL_ERROR: &str = "downstream protocol error";

/// Serves a destination-side HTTP/1.1 connection: relayed request by request while nothing
/// needs the full path, then handed to it.
pub(super) async fn relay<S>(conn: Conn, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.limits();
    let in_flight = Arc::new(Requests::default());
    let down = Deadlines::new(
        io,
        in_flight.clone(),
        limits.header_read_timeout,
        limits.idle_timeout,
        conn.ctx.sources.overload().clone(),
    );
    let mut relay = Relay {
        labels: None,
        conn,
        limits,
        down,
        in_flight,
        up: None,
        pod_idle: Box::pin(tokio::time::sleep(POD_IDLE)),
        dbuf: BytesMut::new(),
        scanned: 0,
        ubuf: BytesMut::new(),
        head: Vec::new(),
        request_body: BytesMut::new(),
        response_body: BytesMut::new(),
    };
    match relay.run().await {
        Ok(Next::Close) => {
            let _ = relay.down.shutdown().await;
        }
        Ok(Next::Fallback) => {
            let Relay {
                conn, down, dbuf, ..
            } = relay;
            serve(conn, Rewind::new(dbuf.freeze(), down.into_inner())).await;
        }
        Err(e) => debug!("destination HTTP relay ended: {e}"),
    }
}

enum Next {
    Close,
    /// The full path takes the connection from the request at the front of the buffer.
    Fallback,
}

struct Relay<S> {
    conn: Conn,
    limits: HttpLimits,
    down: Deadlines<S>,
    in_flight: Arc<Requests>,
    /// The pod, dialled at the first request and kept while both ends keep the connection
    /// (at most [`POD_IDLE`] without a request).
    up: Option<Stream>,
    pod_idle: Pin<Box<Sleep>>,
    /// Read from the client, not yet written to the pod.
    dbuf: BytesMut,
    /// How much of `dbuf` was searched for the end of a head.
    scanned: usize,
    /// Read from the pod, not yet written to the client.
    ubuf: BytesMut,
    /// The request head as it leaves for the pod.
    head: Vec<u8>,
    /// Chunked bodies as they leave, re-encoded.
    request_body: BytesMut,
    response_body: BytesMut,
    labels: Option<RequestLabels>,
}

/// What one relayed request needs to know of its head.
struct Plan {
    head_len: usize,
    body: Framing,
    /// `HEAD`: the response has no body whatever it says.
    head_method: bool,
    /// The client asked to close after this request.
    close: bool,
    /// For the access log, when it is on.
    logged: Option<Logged>,
}

struct Logged {
    method: String,
    path: String,
    authority: String,
    user_agent: Option<String>,
    request_id: String,
}

impl<S> Relay<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self) -> io::Result<Next> {
        loop {
            if !self.read_head().await? {
                return Ok(Next::Close);
            }
            let start = Instant::now();
            let Some(plan) = self.plan() else {
                return Ok(Next::Fallback);
            };
            let ctx = &self.conn.ctx;
            let Some(inbound) = &self.conn.inbound else {
                return Ok(Next::Fallback);
            };
            // The pod's policies decide every request on the full path, which also makes the
            // spans and access log lines its Telemetries ask for.
            let view = ctx.view();
            let pod = inbound.pod.as_ref().map(|p| {
                view.snapshot
                    .pods
                    .get(&p.key)
                    .cloned()
                    .unwrap_or_else(|| p.clone())
            });
            if pod.as_deref().is_some_and(|p| {
                view.policies(p).is_some()
                    || view.tracing(p, false).is_some()
                    || view.access_logs(p, false).is_some()
            }) {
                return Ok(Next::Fallback);
            }
            // Over its cap, or refused under load: the full path answers (and reports) it.
            // Draining: the full path answers it with `Connection: close`, so that the source
            // node's proxy takes its next request to this node's next mesh-node.
            let overload = ctx.overload();
            if !overload.keep_alive() || ctx.draining() {
                return Ok(Next::Fallback);
            }
            let slot = match &self.conn.held {
                Some(held) => match held.request() {
                    Ok(slot) => Some(slot),
                    Err(_) => return Ok(Next::Fallback),
                },
                None if !overload.admits_new() => return Ok(Next::Fallback),
                None => None,
            };
            // A pod connection kept from an earlier request must be quiet: bytes or an end of
            // stream now would be taken for this request's answer.
            if let Some(up) = self.up.as_mut() {
                let ubuf = &mut self.ubuf;
                ubuf.reserve(1);
                let stale = poll_fn(|cx| {
                    Poll::Ready(!poll_read_buf(Pin::new(&mut *up), cx, ubuf).is_pending())
                })
                .await;
                if stale {
                    self.up = None;
                    self.ubuf.clear();
                }
            }
            if self.up.is_none() {
                let dialer = &ctx.dialer;
                match dialer
                    .open(inbound.target, dialer.local(), None, None)
                    .await
                {
                    Ok(up) => self.up = Some(up),
                    // The full path dials again and answers the failure as it does.
                    Err(_) => return Ok(Next::Fallback),
                }
            }
            if self.labels.is_none() {
                let service = inbound
                    .service
                    .as_ref()
                    .and_then(|k| view.snapshot.services.get(k))
                    .cloned();
                self.labels = Some(self.conn.labels(pod.as_ref(), service.as_ref(), false));
            }
            drop(view);
            let busy = self.in_flight.start();
            if !self.exchange(plan, start, busy, slot).await {
                return Ok(Next::Close);
            }
            self.pod_idle
                .as_mut()
                .reset(tokio::time::Instant::now() + POD_IDLE);
        }
    }

    /// Reads until the buffer holds a whole request head. `false`: the client closed (or
    /// timed out) between requests. A pod that closes or speaks while no request is in flight,
    /// or stays idle for [`POD_IDLE`], is let go, and dialled again for the next request.
    async fn read_head(&mut self) -> io::Result<bool> {
        loop {
            // A head ends with an empty line; `plan` parses it, and hands anything malformed
            // or too large to the full path, which answers it.
            let ended = head_ended(&self.dbuf, self.scanned);
            self.scanned = self.dbuf.len();
            if ended || self.dbuf.len() > self.limits.max_head_bytes + 4096 {
                return Ok(true);
            }
            let Self {
                down,
                up,
                dbuf,
                ubuf,
                pod_idle,
                ..
            } = &mut *self;
            dbuf.reserve(READ_SIZE);
            let read = poll_fn(|cx| {
                if let Some(pod) = up.as_mut() {
                    ubuf.reserve(1);
                    let gone = !poll_read_buf(Pin::new(pod), cx, ubuf).is_pending()
                        || pod_idle.as_mut().poll(cx).is_ready();
                    if gone {
                        *up = None;
                        ubuf.clear();
                    }
                }
                poll_read_buf(Pin::new(&mut *down), cx, dbuf)
            })
            .await;
            match read {
                Ok(0) if self.dbuf.is_empty() => return Ok(false),
                // A head cut short: the full path reports it as it does.
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut && self.dbuf.is_empty() => {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Parses the head at the front of the buffer and, where the relay treats it exactly as
    /// the full path would, writes the head that leaves for the pod. `None`: the full path.
    fn plan(&mut self) -> Option<Plan> {
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let httparse::Status::Complete(head_len) = request
            .parse_with_uninit_headers(&self.dbuf, &mut headers)
            .ok()?
        else {
            return None;
        };
        if request.version != Some(1)
            || head_len > self.limits.max_head_bytes
            || request.headers.len() > self.limits.max_headers
        {
            return None;
        }
        let method = request.method?;
        let path = request.path?;
        // Origin form only, in RFC 3986's characters, and a path normalization would not
        // change.
        if method == "CONNECT" || !path.starts_with('/') || !path.bytes().all(uri_byte) {
            return None;
        }
        let bare = path.split_once('?').map_or(path, |(p, _)| p);
        if !matches!(normalize_path(bare), std::borrow::Cow::Borrowed(b) if b == bare) {
            return None;
        }
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        let mut host = None;
        let mut request_id = None;
        let mut user_agent = None;
        for h in request.headers.iter() {
            let (name, value) = (h.name, h.value);
            if name.eq_ignore_ascii_case("content-length") {
                if length.is_some() {
                    return None;
                }
                length = Some(decimal(value)?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if chunked || !value.eq_ignore_ascii_case(b"chunked") {
                    return None;
                }
                chunked = true;
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        return None;
                    }
                }
            } else if name.eq_ignore_ascii_case("host") {
                if host.replace(value).is_some() {
                    return None;
                }
            } else if name.eq_ignore_ascii_case("x-request-id") {
                if request_id.replace(value).is_some() {
                    return None;
                }
            } else if name.eq_ignore_ascii_case("user-agent") {
                user_agent = Some(value);
            } else if name.eq_ignore_ascii_case("content-type") {
                if value.starts_with(b"application/grpc") {
                    return None;
                }
            } else if [
                "upgrade",
                "http2-settings",
                "expect",
                "te",
                "trailer",
                "keep-alive",
                "proxy-connection",
                "proxy-authenticate",
                "proxy-authorization",
            ]
            .iter()
            .any(|hop| name.eq_ignore_ascii_case(hop))
            {
                return None;
            }
        }
        if length.is_some() && chunked {
            return None;
        }
        let host = host.filter(|h| h.iter().all(u8::is_ascii_graphic))?;
        let host = std::str::from_utf8(host).ok()?;
        let request_id = std::str::from_utf8(request_id?)
            .ok()
            .filter(|id| !id.is_empty())?;
        let body = match (length, chunked) {
            (_, true) => Framing::Chunked(Chunked::default()),
            (Some(0) | None, false) => Framing::Done,
            (Some(n), false) => Framing::Length(n),
        };
        let logged = access_log_enabled().then(|| Logged {
            method: method.to_owned(),
            path: path.to_owned(),
            authority: host.to_owned(),
            user_agent: user_agent.and_then(|v| std::str::from_utf8(v).ok().map(str::to_owned)),
            request_id: request_id.to_owned(),
        });

        // The head for the pod: the caller's certificate and the scheme are the
        // destination's to say, `Connection` is this hop's (as on the full path).
        let xfcc = self
            .conn
            .inbound
            .as_ref()
            .and_then(|i| i.forwarded_client_cert.as_ref());
        let head = &mut self.head;
        head.clear();
        head.extend_from_slice(method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for h in request.headers.iter() {
            if [FORWARDED_CLIENT_CERT, "x-forwarded-proto", "connection"]
                .iter()
                .any(|skip| h.name.eq_ignore_ascii_case(skip))
            {
                continue;
            }
            head.extend_from_slice(h.name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(h.value);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"x-forwarded-proto: http\r\n");
        if let Some(xfcc) = xfcc {
            head.extend_from_slice(FORWARDED_CLIENT_CERT.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(xfcc.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Some(Plan {
            head_len,
            body,
            head_method: method == "HEAD",
            close,
            logged,
        })
    }

    /// Relays one request and its response, and reports it. `false`: the connection ends with
    /// it.
    async fn exchange(
        &mut self,
        plan: Plan,
        start: Instant,
        busy: Busy,
        slot: Option<SourceRequest>,
    ) -> bool {
        self.dbuf.advance(plan.head_len);
        self.scanned = 0;
        self.request_body.clear();
        self.response_body.clear();
        let mut report = Pending {
            exchange: Exchange {
                head_sent: 0,
                request: plan.body,
                request_out: 0,
                request_done: false,
                response: Phase::Head,
                response_out: 0,
                head_method: plan.head_method,
                status: 0,
                final_head: false,
                responded: false,
                partial: false,
                close: plan.close,
                request_bytes: 0,
                response_bytes: 0,
            },
            ctx: self.conn.ctx.clone(),
            labels: self.labels.clone(),
            logged: plan.logged,
            client: self.conn.client,
            upstream: self.conn.inbound.as_ref().map(|i| i.target),
            start,
            recorded: false,
            _held: (busy, slot),
        };
        let exchange = &mut report.exchange;
        let Self {
            down,
            up,
            dbuf,
            ubuf,
            head,
            request_body,
            response_body,
            ..
        } = &mut *self;
        let pod = up.as_mut().expect("dialled before the exchange");
        let mut buffers = Buffers {
            dbuf,
            ubuf,
            head,
            request_body,
            response_body,
        };
        let result = poll_fn(|cx| exchange.poll(cx, down, pod, &mut buffers)).await;
        let mut flags = ResponseFlags::NONE;
        let (keep, answer) = match result {
            Ok(()) => (!exchange.close, None),
            Err(Failed::Client(e)) => {
                debug!("client left during a relayed request: {e}");
                flags |= ResponseFlags::DC;
                (false, None)
            }
            Err(Failed::ClientProtocol(what)) => {
                debug!("client sent a malformed body: {what}");
                flags |= ResponseFlags::DPE;
                (false, Some(("400 Bad Request", DOWNSTREAM_PROTOCOL_ERROR)))
            }
            Err(Failed::Pod(e)) => {
                debug!("pod failed a relayed request: {e}");
                flags |= ResponseFlags::UR;
                (false, Some(("503 Service Unavailable", REMOTE_RESET)))
            }
            Err(Failed::PodProtocol(what)) => {
                debug!("pod sent a malformed response: {what}");
                flags |= ResponseFlags::UR;
                (false, Some(("503 Service Unavailable", REMOTE_RESET)))
            }
        };
        // Nothing of a final answer went out: answer as the full path does.
        if let Some((status, text)) = answer.filter(|_| exchange.can_answer()) {
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{text}",
                text.len()
            );
            if self.down.write_all(reply.as_bytes()).await.is_ok() {
                exchange.responded = true;
                exchange.status = status[..3].parse().unwrap_or(0);
                exchange.response_bytes = text.len() as u64;
            } else {
                flags |= ResponseFlags::DC;
            }
        }
        if !keep {
            self.up = None;
        }
        report.record(flags);
        keep
    }
}

/// The buffers an exchange reads and writes.
struct Buffers<'a> {
    dbuf: &'a mut BytesMut,
    ubuf: &'a mut BytesMut,
    head: &'a [u8],
    request_body: &'a mut BytesMut,
    response_body: &'a mut BytesMut,
}

/// A request's report, made when it ends — or, should the connection be dropped first (the
/// overload manager cuts it), as a client that left (`0`, `DC`), as on the full path.
struct Pending {
    exchange: Exchange,
    ctx: Arc<Context>,
    labels: Option<RequestLabels>,
    logged: Option<Logged>,
    client: SocketAddrV4,
    upstream: Option<SocketAddrV4>,
    start: Instant,
    recorded: bool,
    /// The request's place among the connection's and its client's requests in flight.
    _held: (Busy, Option<SourceRequest>),
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(ResponseFlags::DC);
        }
    }
}

impl Pending {
    fn record(&mut self, flags: ResponseFlags) {
        self.recorded = true;
        let exchange = &self.exchange;
        let status = if exchange.responded {
            exchange.status
        } else {
            0
        };
        let (received, sent) = (exchange.request_bytes, exchange.response_bytes);
        let Some(labels) = &self.labels else {
            return;
        };
        let duration = self.start.elapsed();
        self.ctx.http_metrics.record(
            labels,
            &RequestOutcome {
                response_code: status,
                grpc_status: None,
                flags,
                duration,
                request_bytes: received,
                response_bytes: sent,
                request_messages: 0,
                response_messages: 0,
            },
        );
        let Some(logged) = &self.logged else {
            return;
        };
        access_log(&AccessEntry {
            method: &logged.method,
            path: &logged.path,
            protocol: Version::HTTP_11,
            response_code: status,
            response_flags: flags,
            response_code_details: None,
            bytes_received: received,
            bytes_sent: sent,
            duration,
            upstream_host: self.upstream.map(SocketAddr::V4),
            upstream_cluster: None,
            route_name: None,
            authority: Some(&logged.authority),
            x_forwarded_for: None,
            user_agent: logged.user_agent.as_deref(),
            request_id: Some(&logged.request_id),
            downstream_remote_address: SocketAddr::V4(self.client),
            downstream_peer: labels.principals().0,
            upstream_peer: labels.principals().1,
        });
    }
}

/// Which side failed an exchange, and how.
enum Failed {
    /// The client went away (read or write).
    Client(io::Error),
    /// The client's body cannot be read.
    ClientProtocol(&'static str),
    Pod(io::Error),
    PodProtocol(&'static str),
}

#[derive(Debug)]
enum Phase {
    Head,
    Body(Framing),
    Done,
}

/// One request and its response, both directions at once (a pod may answer before it has
/// read the whole body, or stream while it reads).
struct Exchange {
    head_sent: usize,
    request: Framing,
    /// Bytes at the front of the client's buffer that belong to the request, to be written.
    request_out: usize,
    /// The request is written, or given up because the pod stopped reading it.
    request_done: bool,
    response: Phase,
    /// Bytes at the front of the pod's buffer that belong to the response, to be written.
    response_out: usize,
    head_method: bool,
    status: u16,
    /// The bytes being written hold the final response head.
    final_head: bool,
    /// The final response head went to the client whole.
    responded: bool,
    /// Part of the bytes being written to the client went out.
    partial: bool,
    close: bool,
    request_bytes: u64,
    response_bytes: u64,
}

impl Exchange {
    /// Whether the client may still get an answer of the proxy's: nothing of a final head
    /// went out, nor half of an informational one (a whole one may precede it).
    fn can_answer(&self) -> bool {
        !self.responded && !self.partial
    }

    fn poll<D, U>(
        &mut self,
        cx: &mut TaskContext<'_>,
        down: &mut D,
        up: &mut U,
        buffers: &mut Buffers<'_>,
    ) -> Poll<Result<(), Failed>>
    where
        D: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let sent = match self.poll_request(cx, down, up, buffers) {
            Poll::Ready(Err(failed)) => return Poll::Ready(Err(failed)),
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        };
        // Sent whole, the client is still watched: one that leaves (or resets) while the pod
        // works cancels the request, as on the full path, and what it sends meanwhile waits
        // for its turn (a bounded amount).
        if sent.is_ready() && buffers.dbuf.len() < READ_SIZE {
            buffers.dbuf.reserve(READ_SIZE);
            match poll_read_buf(Pin::new(&mut *down), cx, buffers.dbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Failed::Client(io::ErrorKind::UnexpectedEof.into())))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Client(e))),
                Poll::Ready(Ok(_)) | Poll::Pending => {}
            }
        }
        let answered = match self.poll_response(cx, down, up, buffers) {
            Poll::Ready(Err(failed)) => return Poll::Ready(Err(failed)),
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        };
        match (sent, answered) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            (Poll::Pending, Poll::Ready(())) => {
                // Answered before the whole request was read: the connection cannot go on.
                self.close = true;
                Poll::Ready(Ok(()))
            }
            _ => Poll::Pending,
        }
    }

    /// Writes the head, then the body as its framing says, to the pod. A pod that stops
    /// reading is no failure yet: it may have answered.
    fn poll_request<D, U>(
        &mut self,
        cx: &mut TaskContext<'_>,
        down: &mut D,
        up: &mut U,
        buffers: &mut Buffers<'_>,
    ) -> Poll<Result<(), Failed>>
    where
        D: AsyncRead + Unpin,
        U: AsyncWrite + Unpin,
    {
        if self.request_done {
            return Poll::Ready(Ok(()));
        }
        let head = buffers.head;
        while self.head_sent < head.len() {
            match write(Pin::new(&mut *up), cx, &head[self.head_sent..]) {
                Poll::Ready(Ok(n)) => self.head_sent += n,
                Poll::Ready(Err(_)) => return self.stop_sending(),
                Poll::Pending => return Poll::Pending,
            }
        }
        let (dbuf, staged) = (&mut *buffers.dbuf, &mut *buffers.request_body);
        loop {
            let out = if self.request_out > 0 {
                &dbuf[..self.request_out]
            } else {
                &staged[..]
            };
            if !out.is_empty() {
                match write(Pin::new(&mut *up), cx, out) {
                    Poll::Ready(Ok(n)) if self.request_out > 0 => {
                        dbuf.advance(n);
                        self.request_out -= n;
                    }
                    Poll::Ready(Ok(n)) => staged.advance(n),
                    Poll::Ready(Err(_)) => return self.stop_sending(),
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if self.request.done() {
                return match Pin::new(&mut *up).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.request_done = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(_)) => self.stop_sending(),
                    Poll::Pending => Poll::Pending,
                };
            }
            if !dbuf.is_empty() {
                let (out, data) = self
                    .request
                    .take(dbuf, staged)
                    .map_err(Failed::ClientProtocol)?;
                self.request_bytes += data;
                self.request_out = out;
                continue;
            }
            dbuf.reserve(READ_SIZE);
            match poll_read_buf(Pin::new(&mut *down), cx, dbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Failed::Client(io::ErrorKind::UnexpectedEof.into())))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Client(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The pod stopped taking the request: what it answered (if anything) decides.
    fn stop_sending(&mut self) -> Poll<Result<(), Failed>> {
        self.request_done = true;
        self.close = true;
        Poll::Ready(Ok(()))
    }

    /// Reads the response from the pod, follows its framing, writes it to the client.
    fn poll_response<D, U>(
        &mut self,
        cx: &mut TaskContext<'_>,
        down: &mut D,
        up: &mut U,
        buffers: &mut Buffers<'_>,
    ) -> Poll<Result<(), Failed>>
    where
        D: AsyncWrite + Unpin,
        U: AsyncRead + Unpin,
    {
        let (ubuf, staged) = (&mut *buffers.ubuf, &mut *buffers.response_body);
        loop {
            let out = if self.response_out > 0 {
                &ubuf[..self.response_out]
            } else {
                &staged[..]
            };
            if !out.is_empty() {
                let whole = out.len();
                match write(Pin::new(&mut *down), cx, out) {
                    Poll::Ready(Ok(n)) => {
                        if self.response_out > 0 {
                            ubuf.advance(n);
                            self.response_out -= n;
                        } else {
                            staged.advance(n);
                        }
                        self.partial = n < whole;
                        if !self.partial && self.final_head {
                            self.final_head = false;
                            self.responded = true;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Client(e))),
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            match &mut self.response {
                Phase::Done => {
                    if !ubuf.is_empty() {
                        // More than the response: the connection cannot be trusted further.
                        self.close = true;
                    }
                    return match Pin::new(&mut *down).poll_flush(cx) {
                        Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(Failed::Client(e))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Phase::Head if !ubuf.is_empty() => {
                    if let Some(head) =
                        response_head(ubuf, self.head_method).map_err(Failed::PodProtocol)?
                    {
                        self.response_out = head.len;
                        self.close |= head.close;
                        if !head.informational {
                            self.final_head = true;
                            self.status = head.status;
                            self.response = match head.body {
                                Framing::Done => Phase::Done,
                                body => Phase::Body(body),
                            };
                        }
                        continue;
                    }
                    if ubuf.len() > MAX_RESPONSE_HEAD {
                        return Poll::Ready(Err(Failed::PodProtocol("response head too large")));
                    }
                }
                Phase::Body(body) if !ubuf.is_empty() => {
                    let (out, data) = body.take(ubuf, staged).map_err(Failed::PodProtocol)?;
                    self.response_bytes += data;
                    self.response_out = out;
                    if body.done() {
                        self.response = Phase::Done;
                    }
                    continue;
                }
                Phase::Head | Phase::Body(_) => {}
            }
            ubuf.reserve(READ_SIZE);
            match poll_read_buf(Pin::new(&mut *up), cx, ubuf) {
                Poll::Ready(Ok(0)) => match &self.response {
                    Phase::Body(Framing::UntilClose) => {
                        self.close = true;
                        self.response = Phase::Done;
                    }
                    _ => return Poll::Ready(Err(Failed::Pod(io::ErrorKind::UnexpectedEof.into()))),
                },
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Pod(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One write; a write of nothing is an error.
fn write<W: AsyncWrite>(
    w: Pin<&mut W>,
    cx: &mut TaskContext<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    match w.poll_write(cx, buf) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        other => other,
    }
}

/// A response head at the front of `buf`.
struct ResponseHead {
    len: usize,
    status: u16,
    /// `1xx` other than `101`: another head follows.
    informational: bool,
    body: Framing,
    close: bool,
}

/// Parses the response head at the front of `buf`; `None` while incomplete.
fn response_head(buf: &[u8], head_method: bool) -> Result<Option<ResponseHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("unparsable response head"),
    };
    let status = response.code.unwrap_or(0);
    if status == 101 {
        return Err("switching protocols without an upgrade");
    }
    let informational = (100..200).contains(&status);
    let mut close = response.version == Some(0);
    let mut length = None;
    let mut chunked = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = decimal(h.value).ok_or("bad content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length");
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding says whether the body is chunked.
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && response.version == Some(0) {
                    close = false;
                }
            }
        }
    }
    let body = if informational || head_method || status == 204 || status == 304 {
        Framing::Done
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked(Chunked::default()),
            (Some(false), _) => Framing::UntilClose,
            (None, Some(0)) => Framing::Done,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    Ok(Some(ResponseHead {
        len,
        status,
        informational,
        body,
        close,
    }))
}

/// Whether `buf` holds, past `from` (minus what a line end spans), the empty line that ends a
/// head: CRLF CRLF, or with bare LFs (httparse reads those as hyper does; the head leaves
/// rewritten with CRLFs).
fn head_ended(buf: &[u8], from: usize) -> bool {
    (from.saturating_sub(2)..buf.len()).any(|i| {
        buf[i] == b'\n'
            && match buf.get(i + 1) {
                Some(b'\n') => true,
                Some(b'\r') => buf.get(i + 2) == Some(&b'\n'),
                _ => false,
            }
    })
}

/// The characters of an origin-form request target (RFC 3986: unreserved, sub-delims, `:`,
/// `@`, `/`, `?`, `%`); anything else is left to the full path.
fn uri_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// A `Content-Length` value: digits only.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// How a message body ends.
#[derive(Debug)]
enum Framing {
    Done,
    Length(u64),
    Chunked(Chunked),
    /// A response without length: at the pod's end of stream.
    UntilClose,
}

impl Framing {
    fn done(&self) -> bool {
        matches!(self, Self::Done)
    }

    /// Takes the body's bytes at the front of `buf`: a length or close-delimited body says how
    /// many of them are to be written as they are; a chunked one is decoded off `buf` and
    /// written again into `staged`. Also returns the content bytes taken (framing aside);
    /// becomes [`Framing::Done`] at the body's end.
    fn take(
        &mut self,
        buf: &mut BytesMut,
        staged: &mut BytesMut,
    ) -> Result<(usize, u64), &'static str> {
        match self {
            Self::Done => Ok((0, 0)),
            Self::Length(left) => {
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *self = Self::Done;
                }
                Ok((n, n as u64))
            }
            Self::Chunked(chunked) => {
                let (used, data) = chunked.decode(buf, staged)?;
                buf.advance(used);
                if chunked.state == ChunkState::End {
                    *self = Self::Done;
                }
                Ok((0, data))
            }
            Self::UntilClose => Ok((buf.len(), buf.len() as u64)),
        }
    }
}

/// Where a chunked body is (RFC 9112 §7.1), read strictly: CRLF line ends only, no bytes
/// where the grammar has none.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    /// Bytes left in the current chunk's data; the size as it is read.
    size: u64,
    digits: u8,
    /// Bytes of the body's chunk extensions, then of its trailers, so far.
    extra: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Spaces or tabs after the size.
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    Trailer,
    TrailerLine,
    TrailerLf,
    EndLf,
    End,
}

impl Chunked {
    /// Reads the body's framing from `buf`, writes the chunks' content to `out` in canonical
    /// form (`SIZE CRLF data CRLF`, then `0 CRLF CRLF`; extensions and trailers, which the full
    /// path does not forward either, dropped). Returns the bytes of `buf` used and the content
    /// bytes among them.
    fn decode(&mut self, buf: &[u8], out: &mut BytesMut) -> Result<(usize, u64), &'static str> {
        use std::fmt::Write as _;
        let mut i = 0;
        let mut data = 0;
        while i < buf.len() && self.state != ChunkState::End {
            let b = buf[i];
            let white = b == b' ' || b == b'\t';
            self.state = match self.state {
                ChunkState::Size => match (b as char).to_digit(16) {
                    Some(d) => {
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or("chunk size too large")?;
                        self.digits = 1;
                        ChunkState::Size
                    }
                    None if self.digits == 0 => return Err("chunk size missing"),
                    None if b == b'\r' => ChunkState::SizeLf,
                    None if b == b';' => ChunkState::Extension,
                    None if white => ChunkState::SizeSpace,
                    None => return Err("bad chunk size"),
                },
                ChunkState::SizeSpace if white => ChunkState::SizeSpace,
                ChunkState::SizeSpace if b == b';' => ChunkState::Extension,
                ChunkState::SizeSpace if b == b'\r' => ChunkState::SizeLf,
                ChunkState::SizeSpace => return Err("bad chunk size"),
                ChunkState::Extension if b == b'\r' => ChunkState::SizeLf,
                ChunkState::Extension => {
                    self.extra += 1;
                    if (b.is_ascii_control() && b != b'\t') || self.extra > MAX_CHUNK_EXTRA {
                        return Err("bad chunk extension");
                    }
                    ChunkState::Extension
                }
                ChunkState::SizeLf if b == b'\n' => {
                    self.digits = 0;
                    if self.size == 0 {
                        self.extra = 0;
                        ChunkState::Trailer
                    } else {
                        let _ = write!(out, "{:x}\r\n", self.size);
                        ChunkState::Data
                    }
                }
                ChunkState::Data => {
                    let n = (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    out.extend_from_slice(&buf[i..i + n]);
                    self.size -= n as u64;
                    data += n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    ChunkState::Size
                }
                ChunkState::Trailer if b == b'\r' => ChunkState::EndLf,
                ChunkState::Trailer | ChunkState::TrailerLine
                    if b != b'\r' && (!b.is_ascii_control() || b == b'\t') =>
                {
                    self.extra += 1;
                    if self.extra > MAX_CHUNK_EXTRA {
                        return Err("trailers too large");
                    }
                    ChunkState::TrailerLine
                }
                ChunkState::TrailerLine if b == b'\r' => ChunkState::TrailerLf,
                ChunkState::TrailerLf if b == b'\n' => ChunkState::Trailer,
                ChunkState::EndLf if b == b'\n' => {
                    out.extend_from_slice(b"0\r\n\r\n");
                    ChunkState::End
                }
                _ => return Err("malformed chunked body"),
            };
            i += 1;
        }
        Ok((i, data))
    }
}

/// Reads into the spare capacity of `buf`.
fn poll_read_buf<R: AsyncRead + Unpin>(
    reader: Pin<&mut R>,
    cx: &mut TaskContext<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(reader, cx, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` to `framing` `step` bytes at a time as reads would; returns what was
    /// written (passed through or re-encoded), the content bytes, and what is left.
    fn relay(framing: &mut Framing, bytes: &[u8], step: usize) -> (Vec<u8>, u64, Vec<u8>) {
        let (mut buf, mut staged) = (BytesMut::new(), BytesMut::new());
        let (mut written, mut data) = (Vec::new(), 0);
        for piece in bytes.chunks(step) {
            buf.extend_from_slice(piece);
            while !framing.done() && !buf.is_empty() {
                let (out, d) = framing.take(&mut buf, &mut staged).expect("well-formed");
                written.extend_from_slice(&buf.split_to(out));
                written.extend_from_slice(&staged.split());
                data += d;
            }
        }
        (written, data, buf.to_vec())
    }

    #[test]
    fn a_chunked_body_is_written_again_canonically_and_ends_after_its_trailers() {
        let body = b"5;ext=1\r\nhello\r\n010 \r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\nGET / HTTP/1.1\r\n";
        for step in [1, 2, 3, 7, body.len()] {
            let mut framing = Framing::Chunked(Chunked::default());
            let (written, data, left) = relay(&mut framing, body, step);
            assert!(framing.done(), "step {step}");
            assert_eq!(
                String::from_utf8_lossy(&written),
                "5\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
                "step {step}"
            );
            assert_eq!(data, 21, "step {step}");
            assert_eq!(left, b"GET / HTTP/1.1\r\n", "step {step}");
        }
    }

    #[test]
    fn a_length_body_takes_exactly_its_length() {
        let mut framing = Framing::Length(5);
        let (written, data, left) = relay(&mut framing, b"helloGET", 3);
        assert_eq!(
            (&written[..], data, &left[..]),
            (&b"hello"[..], 5, &b"GET"[..])
        );
        assert!(framing.done());
    }

    /// Every lenient reading a pod might make differently is refused, bare LFs first: a
    /// trailer section ended by a bare LF would otherwise end the body early for some servers
    /// and late for this one, and what follows would be read as a request of its own.
    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5 zz\r\nhello",
            b"5\r\nhelloXY",
            b"5\r\nhello\n",
            b"0\r\n\nGET /admin HTTP/1.1\r\n\r\n",
            b"0\r\nx: 1\nGET /admin HTTP/1.1\r\n\r\n",
            b"0\r\nx: 1\r\r\n\r\n",
            b"5;a\x00b\r\nhello\r\n",
            b"10000000000000000\r\n",
        ] {
            let mut framing = Framing::Chunked(Chunked::default());
            let (mut buf, mut staged) = (BytesMut::from(bad), BytesMut::new());
            let mut failed = false;
            while !framing.done() && !buf.is_empty() && !failed {
                match framing.take(&mut buf, &mut staged) {
                    Ok((out, _)) => buf.advance(out),
                    Err(_) => failed = true,
                }
            }
            assert!(failed, "{:?} was accepted", String::from_utf8_lossy(bad));
        }
    }

    /// Extensions count for the whole body, as hyper counts them: many chunks each under the
    /// bound do not add up to more than it.
    #[test]
    fn chunk_extensions_are_bounded_for_the_whole_body() {
        let chunk = format!("1;{}\r\na\r\n", "x".repeat(MAX_CHUNK_EXTRA / 2));
        let mut framing = Framing::Chunked(Chunked::default());
        let (mut buf, mut staged) = (BytesMut::from(chunk.repeat(3).as_bytes()), BytesMut::new());
        assert!(framing.take(&mut buf, &mut staged).is_err());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let head = |raw: &str, head_method| match response_head(raw.as_bytes(), head_method) {
            Ok(Some(h)) => h,
            _ => panic!("{raw:?} should parse"),
        };
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false);
        assert!(matches!(h.body, Framing::Length(3)) && !h.close && h.status == 200);
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true);
        assert!(h.body.done());
        let h = head("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert!(h.body.done());
        let h = head("HTTP/1.1 100 Continue\r\n\r\n", false);
        assert!(h.informational && h.body.done());
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert!(matches!(h.body, Framing::Chunked(_)));
        let h = head("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(h.body, Framing::UntilClose));
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false);
        assert!(h.close);
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert!(h.close);
        assert!(response_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            false
        )
        .is_err());
        assert!(matches!(
            response_head(b"HTTP/1.1 200 OK\r\ncont", false),
            Ok(None)
        ));
    }

    #[test]
    fn a_head_ends_at_its_empty_line_however_it_arrives() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert!(head_ended(head, 0));
        assert!(!head_ended(&head[..head.len() - 1], 0));
        // Searched from where the last search stopped, a line end split over reads is found.
        for at in 0..head.len() {
            assert!(head_ended(head, at.min(head.len() - 1)), "from {at}");
        }
        assert!(head_ended(b"GET / HTTP/1.1\nhost: a\n\n", 0));
    }
}
