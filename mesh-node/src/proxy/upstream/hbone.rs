//! HBONE, the node-to-node hop: HTTP/2 `CONNECT` streams over mutual TLS 1.3 on port 15008,
//! as Istio's ztunnel speaks it.
//!
//! ```text
//! TLS 1.3, ALPN h2, client certificate = the calling pod's SPIFFE ID, server = a node proxy
//!   HEADERS  :method CONNECT  :authority 10.244.2.3:9080  forwarded: for=10.244.1.5
//!   HEADERS  :status 200        then DATA frames carry the application's bytes both ways
//! ```
//!
//! The client side ([`HbonePool`]) keeps TLS connections per (calling identity, peer node)
//! and opens a stream per proxied connection, up to [`MAX_STREAMS`] on one TLS connection
//! before it opens another. The server side lives with the listeners (`inbound.rs`); this
//! module gives it the parsing of what a peer sends ([`target_of`], [`forwarded_for`]) and the
//! answers ([`refuse`], [`accept`]). Both ends use the `h2` crate directly: a stream is an
//! [`H2Io`], with no task or channel of its own.
//!
//! Who calls is the certificate's identity, never a header. The `forwarded` header only says
//! which pod of that identity (for telemetry); the destination believes it only if that pod
//! has the certificate's service account and runs on the node the connection comes from.

use std::{
    collections::HashMap,
    future::poll_fn,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes};
use h2::{client::SendRequest, server::SendResponse, Ping, Reason, RecvStream, SendStream};
use hyper::{header::HeaderValue, Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::connect::{connect_tcp, ConnectError, Role};
use crate::identity::{
    manager::{CertError, CertManager, Issued},
    Identity,
};

/// Streams on one TLS connection before the pool opens another (ztunnel's default).
pub const MAX_STREAMS: usize = 100;
/// HTTP/2 windows: large enough that one stream fills a fast link without waiting for
/// window updates (one bandwidth-delay product of a 10 Gbit/s link at 3 ms per stream).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 256 * 1024;
/// Idle TLS connections are kept this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// While streams are open, a connection is PINGed this often, and closed when the peer does
/// not answer within [`PING_TIMEOUT`] (a peer node that vanished without a FIN).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest header block taken from a peer (hyper's default).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Bytes a stream may have queued for sending (hyper's client default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Largest refusal body read from a peer.
const MAX_REASON: usize = 1024;
/// The header naming which pod of the certificate's identity opened the stream (RFC 7239).
pub const FORWARDED: &str = "forwarded";
/// A request header: the source can pause and resume the stream (a Weft node proxy).
pub const RESUMABLE: &str = "weft-resumable";
/// A request header: the stream carries on the paused one this token names.
pub const RESUME: &str = "weft-resume";
/// A response header: the token that resumes the stream after a pause.
pub const RESUME_TOKEN: &str = "weft-resume-token";

/// A resume token as this module writes them: 32 lowercase hexadecimal digits (128 random
/// bits).
pub fn valid_token(token: &str) -> bool {
    token.len() == 32
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A new resume token.
pub fn new_token() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source");
    let mut token = String::with_capacity(32);
    for b in bytes {
        token.push(char::from(HEX[usize::from(b >> 4)]));
        token.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    token
}

/// Whether a `CONNECT` says its source can pause and resume it.
pub fn offers_resume<B>(request: &Request<B>) -> bool {
    request.headers().get(RESUMABLE).is_some_and(|v| v == "1")
}

/// The token of the paused stream a `CONNECT` carries on, if it carries one on; an error for
/// a token this module did not write.
pub fn resume_token<B>(request: &Request<B>) -> Result<Option<&str>, String> {
    let Some(value) = request.headers().get(RESUME) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(token) if valid_token(token) => Ok(Some(token)),
        _ => Err(format!("{RESUME}: not a resume token")),
    }
}

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("no certificate to present to peer node proxy {peer}: {source}")]
    Certificate {
        peer: SocketAddrV4,
        #[source]
        source: CertError,
    },
    #[error("TLS handshake with peer node proxy {peer} failed: {source} (is it a Weft node proxy of this mesh, and do both trust the same root?)")]
    Tls {
        peer: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("HTTP/2 with peer node proxy {peer} failed: {source}")]
    Http2 {
        peer: SocketAddrV4,
        #[source]
        source: h2::Error,
    },
    #[error("peer node proxy {peer} refused the tunnel to {target}: {status}{}", reason_suffix(.reason))]
    Refused {
        peer: SocketAddrV4,
        target: SocketAddrV4,
        status: u16,
        reason: String,
    },
    #[error("peer node proxy {peer} did not answer the tunnel request for {target} within {timeout:?}: is mesh-node running on that node?")]
    ResponseTimeout {
        peer: SocketAddrV4,
        target: SocketAddrV4,
        timeout: Duration,
    },
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

/// Why a server refuses a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    /// The target is not a pod of this node.
    Forbidden,
    /// The target refused the connection or could not be reached.
    BadGateway,
    /// The target did not answer in time.
    GatewayTimeout,
    /// The node proxy sheds load (its overload manager).
    Unavailable,
    /// No paused stream to resume under the token given (or not for this caller).
    Gone,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::Forbidden => StatusCode::FORBIDDEN,
            Refusal::BadGateway => StatusCode::BAD_GATEWAY,
            Refusal::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Gone => StatusCode::GONE,
        }
    }

    /// The answer to a refused `CONNECT`: the status and a one-line reason.
    pub fn response(self, reason: &str) -> Response<Bytes> {
        let reason = reason.replace(['\r', '\n'], " ");
        let mut response = Response::new(Bytes::from(reason));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        response
    }
}

/// Answers a `CONNECT` with `refusal`, its body the one-line `reason`.
pub fn refuse(respond: &mut SendResponse<Bytes>, refusal: Refusal, reason: &str) {
    let (head, body) = refusal.response(reason).into_parts();
    if let Ok(mut send) = respond.send_response(Response::from_parts(head, ()), false) {
        let _ = send.send_data(body, true);
    }
}

/// Answers a `CONNECT` with `200`: the stream is the client's byte stream from now on.
/// `None` when the client reset it meanwhile.
pub fn accept(respond: SendResponse<Bytes>, request: Request<RecvStream>) -> Option<H2Io> {
    accept_with(respond, request, None)
}

/// [`accept`], giving the client `token` to resume the stream with after a pause.
pub fn accept_with(
    mut respond: SendResponse<Bytes>,
    request: Request<RecvStream>,
    token: Option<&str>,
) -> Option<H2Io> {
    let mut response = Response::new(());
    if let Some(token) = token.and_then(|t| HeaderValue::from_str(t).ok()) {
        response.headers_mut().insert(RESUME_TOKEN, token);
    }
    let send = respond.send_response(response, false).ok()?;
    Some(H2Io::new(send, request.into_body()))
}

/// The pod a `CONNECT` asks for: its `:authority`, an IPv4 address and port.
pub fn target_of<B>(request: &Request<B>) -> Result<SocketAddrV4, String> {
    if request.method() != Method::CONNECT {
        return Err(format!("expected CONNECT, got {}", request.method()));
    }
    let authority = request
        .uri()
        .authority()
        .ok_or_else(|| "CONNECT without :authority".to_string())?;
    parse_target(authority.as_str())
}

fn parse_target(authority: &str) -> Result<SocketAddrV4, String> {
    authority
        .parse::<SocketAddrV4>()
        .ok()
        .filter(|t| t.port() != 0)
        .ok_or_else(|| format!("target {authority:?} is not an IPv4 address and port"))
}

/// The pod address a peer claims in `forwarded: for=<ip>`, if any and well-formed.
pub fn forwarded_for<B>(request: &Request<B>) -> Option<Ipv4Addr> {
    let value = request.headers().get(FORWARDED)?.to_str().ok()?;
    parse_forwarded(value)
}

fn parse_forwarded(value: &str) -> Option<Ipv4Addr> {
    // One element, as this module writes it; anything richer is not a claim we act on.
    value
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.eq_ignore_ascii_case("for"))
        .and_then(|(_, ip)| ip.trim_matches('"').parse().ok())
}

/// The tunnel's parsers of peer input on arbitrary bytes: nothing may panic, and a target that
/// parses prints back to itself. `fuzz/` feeds this function; a unit test replays its corpus.
pub fn fuzz_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (authority, forwarded) = text.split_once('\n').unwrap_or((&text, ""));
    if let Ok(target) = parse_target(authority) {
        assert_eq!(parse_target(&target.to_string()), Ok(target));
    }
    if let Some(ip) = parse_forwarded(forwarded) {
        assert_eq!(parse_forwarded(&format!("for={ip}")), Some(ip));
    }
}

/// Who opens a stream: the pod's identity (its certificate) and address (`forwarded`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    pub identity: Identity,
    pub ip: Ipv4Addr,
}

/// Pooled HBONE connections of the node proxy, per (calling identity, peer node).
pub struct HbonePool {
    certs: Arc<CertManager>,
    conns: Mutex<HashMap<(Identity, SocketAddrV4), Arc<Conns>>>,
}

/// The connections of one (identity, peer); callers of one key wait for each other.
type Conns = tokio::sync::Mutex<Vec<Conn>>;

/// One TLS connection, the certificate it was opened with, and the streams open on it.
#[derive(Clone)]
struct Conn {
    sender: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    issued: Arc<Issued>,
    /// Set once the connection takes no new streams: it ended, or it can open no more.
    retired: Arc<AtomicBool>,
}

impl HbonePool {
    pub fn new(certs: Arc<CertManager>) -> Self {
        Self {
            certs,
            conns: Mutex::default(),
        }
    }

    pub fn certs(&self) -> &Arc<CertManager> {
        &self.certs
    }

    /// Opens a stream to `target` through the node proxy at `peer`, on behalf of `caller`;
    /// with `resume`, one that carries on the paused stream that token names (its peer parked
    /// it, or took it from its predecessor). `timeout` bounds getting a connection and,
    /// separately, the peer's answer. The stream says it can be paused and resumed
    /// ([`crate::proxy::resume`]); a Weft peer that relays it as opaque TCP answers with a
    /// token for that.
    pub async fn connect(
        &self,
        caller: &Caller,
        source: Option<Ipv4Addr>,
        peer: SocketAddrV4,
        target: SocketAddrV4,
        timeout: Duration,
        resume: Option<&str>,
    ) -> Result<HboneStream, TunnelError> {
        let request = || {
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .version(hyper::Version::HTTP_2)
                .header(FORWARDED, format!("for={}", caller.ip))
                .header(RESUMABLE, "1");
            if let Some(token) = resume {
                request = request.header(RESUME, token);
            }
            request
                .body(())
                .expect("a CONNECT request from valid parts")
        };
        let http2 = |source| TunnelError::Http2 { peer, source };
        let too_late = |_| TunnelError::ResponseTimeout {
            peer,
            target,
            timeout,
        };
        let mut retried = false;
        loop {
            let conn = self.conn(&caller.identity, source, peer, timeout).await?;
            let guard = StreamGuard::new(conn.streams.clone());
            let deadline = tokio::time::Instant::now() + timeout;
            let opening = async {
                let mut sender = conn.sender.clone().ready().await?;
                let (response, send) = sender.send_request(request(), false)?;
                Ok::<_, h2::Error>((response.await?, send))
            };
            let (response, send) = match tokio::time::timeout_at(deadline, opening)
                .await
                .map_err(too_late)?
            {
                Ok(opened) => opened,
                // The connection opens no more streams (its peer sent GOAWAY, or its stream
                // ids ran out): it takes no new ones, and this one is asked for once more on
                // another. Its open streams go on.
                Err(e) if !e.is_reset() || e.is_go_away() => {
                    conn.retired.store(true, Ordering::Relaxed);
                    if std::mem::replace(&mut retried, true) {
                        return Err(http2(e));
                    }
                    continue;
                }
                Err(e) => return Err(http2(e)),
            };
            let status = response.status();
            let token = response
                .headers()
                .get(RESUME_TOKEN)
                .and_then(|v| v.to_str().ok())
                .filter(|t| valid_token(t))
                .map(str::to_owned);
            let recv = response.into_body();
            if status != StatusCode::OK {
                let reading = refused(peer, target, status, recv);
                return Err(tokio::time::timeout_at(deadline, reading)
                    .await
                    .map_err(too_late)?);
            }
            return Ok(HboneStream {
                io: H2Io::new(send, recv),
                token,
                _guard: guard,
            });
        }
    }

    /// A connection to `peer` for `identity` with room for one more stream, opened if needed.
    async fn conn(
        &self,
        identity: &Identity,
        source: Option<Ipv4Addr>,
        peer: SocketAddrV4,
        timeout: Duration,
    ) -> Result<Conn, TunnelError> {
        let entry = self
            .conns
            .lock()
            .expect("HBONE pool poisoned")
            .entry((identity.clone(), peer))
            .or_default()
            .clone();
        let issued = self
            .certs
            .issued(identity)
            .await
            .map_err(|source| TunnelError::Certificate { peer, source })?;
        // Callers of one key wait for each other, so a burst opens one connection, not many.
        let mut conns = entry.lock().await;
        // Connections opened with a certificate since renewed (or of a rotated root) take no
        // new streams; their open streams finish on them.
        conns.retain(|c| !c.retired.load(Ordering::Relaxed) && Arc::ptr_eq(&c.issued, &issued));
        if let Some(conn) = conns
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < MAX_STREAMS)
        {
            return Ok(conn.clone());
        }
        let conn = tokio::time::timeout(timeout, self.open(issued, source, peer, timeout))
            .await
            .map_err(|_| {
                TunnelError::Connect(ConnectError {
                    role: Role::PeerProxy,
                    target: peer,
                    kind: super::ConnectErrorKind::Timeout(timeout),
                    source: None,
                })
            })??;
        conns.push(conn.clone());
        Ok(conn)
    }

    async fn open(
        &self,
        issued: Arc<Issued>,
        source: Option<Ipv4Addr>,
        peer: SocketAddrV4,
        timeout: Duration,
    ) -> Result<Conn, TunnelError> {
        let tcp = connect_tcp(peer, source, timeout, Role::PeerProxy).await?;
        let name = ServerName::IpAddress((*peer.ip()).into());
        let tls = TlsConnector::from(issued.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| TunnelError::Tls { peer, source })?;
        let server_serial = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| crate::tls::serial_of(leaf).ok());
        let mut revoked = self.certs.revoked();
        let (sender, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_max_send_streams(MAX_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(tls)
            .await
            .map_err(|source| TunnelError::Http2 { peer, source })?;
        let streams = Arc::new(AtomicUsize::new(0));
        let retired = Arc::new(AtomicBool::new(false));
        let (open, ended) = (streams.clone(), retired.clone());
        let mut pings = connection
            .ping_pong()
            .expect("a new connection's PING handle");
        tokio::spawn(async move {
            // Closes the connection once it has carried no stream for IDLE_TIMEOUT, or when a
            // PING sent while streams are open goes unanswered.
            let mut idle_since = tokio::time::Instant::now();
            let mut last_ping = tokio::time::Instant::now();
            // When the PING in flight must be answered by.
            let mut pong_due: Option<tokio::time::Instant> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    result = &mut connection => {
                        if let Err(e) = result {
                            debug!(%peer, "HBONE connection ended: {e}");
                        }
                        break;
                    }
                    // The peer's certificate revoked: this connection and its streams end.
                    Ok(()) = revoked.changed() => {
                        if server_serial.as_ref().is_some_and(|s| revoked.borrow().contains(s)) {
                            tracing::warn!(%peer, "the peer node proxy's certificate was revoked: closing the connection");
                            break;
                        }
                    }
                    pong = poll_fn(|cx| pings.poll_pong(cx)), if pong_due.is_some() => {
                        if pong.is_err() {
                            break;
                        }
                        pong_due = None;
                    }
                    () = tokio::time::sleep_until(pong_due.unwrap_or_else(tokio::time::Instant::now)), if pong_due.is_some() => {
                        tracing::warn!(%peer, "the peer node proxy did not answer a PING within {PING_TIMEOUT:?}: closing the connection");
                        break;
                    }
                    now = tick.tick() => {
                        if open.load(Ordering::Relaxed) > 0 {
                            idle_since = now;
                            if pong_due.is_none() && now - last_ping >= PING_INTERVAL {
                                last_ping = now;
                                if pings.send_ping(Ping::opaque()).is_ok() {
                                    pong_due = Some(now + PING_TIMEOUT);
                                }
                            }
                        } else if now - idle_since > IDLE_TIMEOUT {
                            debug!(%peer, "closing idle HBONE connection");
                            break;
                        }
                    }
                }
            }
            ended.store(true, Ordering::Relaxed);
        });
        Ok(Conn {
            sender,
            streams,
            issued,
            retired,
        })
    }
}

async fn refused(
    peer: SocketAddrV4,
    target: SocketAddrV4,
    status: StatusCode,
    mut body: RecvStream,
) -> TunnelError {
    let mut reason = Vec::new();
    while reason.len() < MAX_REASON {
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                reason.extend_from_slice(&chunk[..chunk.len().min(MAX_REASON - reason.len())]);
            }
            Some(Err(_)) => {
                reason.clear();
                break;
            }
            None => break,
        }
    }
    TunnelError::Refused {
        peer,
        target,
        status: status.as_u16(),
        reason: String::from_utf8_lossy(&reason).trim().to_owned(),
    }
}

/// Counts a stream as open on its connection until dropped.
#[derive(Debug)]
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(streams: Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::Relaxed);
        Self(streams)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The byte stream of one HBONE stream.
#[derive(Debug)]
pub struct HboneStream {
    io: H2Io,
    /// The peer's token for resuming the stream after a pause, when it offered one.
    token: Option<String>,
    _guard: StreamGuard,
}

impl HboneStream {
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn io(&mut self) -> &mut H2Io {
        &mut self.io
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An HTTP/2 stream as a byte stream: DATA frames read and written in place, with the
/// stream's flow control as back-pressure, `END_STREAM` as end of file (and a shutdown sends
/// it). A `RST_STREAM` reads as hyper's upgraded streams read it: `NO_ERROR` or `CANCEL` as end
/// of file, `STREAM_CLOSED` as a broken pipe, any other code as an error. No task or channel
/// of its own: the connection's task sends what is written.
///
/// A stream between two Weft node proxies may also be paused ([`crate::proxy::resume`]): its
/// `END_STREAM` then comes with a `weft-paused` trailer, which does not read as end of file:
/// it cancels the token given to [`H2Io::on_peer_pause`] and reads nothing more.
#[derive(Debug)]
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not read yet.
    buf: Bytes,
    /// `END_STREAM` sent.
    ended: bool,
    /// Bytes written to the stream, and received from it (read or in `buf`).
    sent: u64,
    received: u64,
    /// Cancelled when the peer pauses the stream.
    peer_pause: Option<tokio_util::sync::CancellationToken>,
    /// What the peer said it had sent when it paused.
    peer_sent: Option<u64>,
    /// Reads give no window back: while a pause is answered, what the peer may still send is
    /// bounded by the window it has.
    hold_window: bool,
}

/// The trailer that pauses a stream, its value the bytes its sender wrote on the stream.
pub const PAUSED: &str = "weft-paused";

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
            ended: false,
            sent: 0,
            received: 0,
            peer_pause: None,
            peer_sent: None,
            hold_window: false,
        }
    }

    /// From now on a pause of the peer cancels `token` (reads then stay pending) instead of
    /// reading as end of file.
    pub fn on_peer_pause(&mut self, token: tokio_util::sync::CancellationToken) {
        self.peer_pause = Some(token);
    }

    /// Whether the peer paused the stream, and how many bytes it said it had sent on it.
    pub fn peer_paused(&self) -> Option<u64> {
        self.peer_sent
    }

    /// Received from the peer and not read yet (what the reader stopped short of).
    pub fn take_unread(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Every byte the peer sent has arrived: its count matches what it said it sent.
    pub fn complete(&self) -> bool {
        self.peer_sent == Some(self.received)
    }

    /// Pauses the stream: `END_STREAM` with the `weft-paused` trailer, which tells the peer how
    /// many bytes were written on it. Nothing is written after.
    pub fn pause(&mut self) -> io::Result<()> {
        if self.ended {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the stream was already ended",
            ));
        }
        self.ended = true;
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert(PAUSED, HeaderValue::from(self.sent));
        self.send.send_trailers(trailers).map_err(h2_io_error)
    }

    /// Reads what the peer still sends until it pauses too, within `timeout`: the bytes, in
    /// order, after any not read yet, at most the stream's window (no window is given back).
    /// An error when it ends the stream another way, or does not pause in time, or when its
    /// count does not match what arrived.
    pub async fn until_peer_paused(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        let token = tokio_util::sync::CancellationToken::new();
        self.on_peer_pause(token.clone());
        self.hold_window = true;
        let mut rest = self.take_unread().to_vec();
        let reading = async {
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                // The pause cancels the token while the read stays pending: checked after it.
                let read = poll_fn(|cx| {
                    let mut buf = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut *self).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(buf.filled().len()))),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending if token.is_cancelled() => Poll::Ready(Ok(None)),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await?;
                match read {
                    None => return Ok::<_, io::Error>(()),
                    Some(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer ended the stream instead of pausing it",
                        ))
                    }
                    Some(n) => rest.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(timeout, reading)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer did not pause"))??;
        if !self.complete() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the peer paused after {:?} bytes, {} arrived",
                    self.peer_sent, self.received
                ),
            ));
        }
        Ok(rest)
    }

    /// At the end of the peer's data: whether it paused (`Pending`, the token cancelled) or
    /// ended the stream (`Ready`, end of file).
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.peer_sent.is_some() {
            return Poll::Pending;
        }
        let Some(token) = self.peer_pause.clone() else {
            return Poll::Ready(Ok(()));
        };
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => {
                let sent = trailers
                    .get(PAUSED)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                match sent {
                    Some(sent) => {
                        self.peer_sent = Some(sent);
                        token.cancel();
                        Poll::Pending
                    }
                    None => Poll::Ready(Ok(())),
                }
            }
            Ok(None) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_io_error(e))),
        }
    }
}

/// An `h2` error as an I/O error, as hyper's upgraded streams report them.
fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("an I/O error");
    }
    io::Error::other(e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            if self.peer_sent.is_some() {
                return Poll::Pending;
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    self.received += data.len() as u64;
                    self.buf = data;
                }
                // The peer stopped sending without END_STREAM: the end of its bytes.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) if e.reason() == Some(Reason::STREAM_CLOSED) => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => return self.poll_end(cx),
            }
        }
        let n = self.buf.len().min(buf.remaining());
        buf.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        if !self.hold_window {
            let _ = self.recv.flow_control().release_capacity(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => {
                    // No longer sending: the peer reset the stream, or it was ended.
                    let e = match ready!(self.send.poll_reset(cx)) {
                        Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                            io::ErrorKind::BrokenPipe.into()
                        }
                        Ok(reason) => h2_io_error(reason.into()),
                        Err(e) => h2_io_error(e),
                    };
                    return Poll::Ready(Err(e));
                }
            }
        }
        let n = self.send.capacity().min(data.len());
        self.send
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(h2_io_error)?;
        self.sent += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what was sent as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            // Sending only fails once the stream is reset: nobody is left to tell.
            if let Err(e) = self.send.send_data(Bytes::new(), true) {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::manager::testing::TestCa;

    #[test]
    fn parses_targets_and_forwarded_claims() {
        assert_eq!(
            parse_target("10.244.2.3:9080"),
            Ok("10.244.2.3:9080".parse().unwrap())
        );
        for bad in ["reviews:9080", "[fd00::1]:80", "10.0.0.1", "10.0.0.1:0", ""] {
            assert!(parse_target(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_forwarded("for=10.244.1.5"),
            Some(Ipv4Addr::new(10, 244, 1, 5))
        );
        assert_eq!(
            parse_forwarded("proto=https; For=\"10.244.1.5\""),
            Some(Ipv4Addr::new(10, 244, 1, 5))
        );
        assert_eq!(parse_forwarded("for=unknown"), None);
        assert_eq!(parse_forwarded("for=\"[2001:db8::1]\""), None);
    }

    #[test]
    fn refusals_carry_their_status_and_a_one_line_reason() {
        let response = Refusal::Forbidden.response("10.0.0.9:80 is not\r\na pod");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }

    /// A peer that answers every CONNECT with 200 and echoes nothing; after its first stream
    /// it sends GOAWAY (as a draining server does) and keeps the connection open. Counts the
    /// TLS connections it accepted.
    async fn draining_peer(ca: &TestCa) -> (SocketAddrV4, Arc<AtomicUsize>) {
        let certs = ca.certs();
        let own = certs.issued(certs.own_identity()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let acceptor = tokio_rustls::TlsAcceptor::from(own.server.clone());
                tokio::spawn(async move {
                    let tls = acceptor.accept(tcp).await.unwrap();
                    let mut conn = h2::server::handshake(tls).await.unwrap();
                    let mut streams = Vec::new();
                    while let Some(Ok((request, mut respond))) = conn.accept().await {
                        let send = respond.send_response(Response::new(()), false).unwrap();
                        streams.push((request, send));
                        if streams.len() == 1 {
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_connection_its_peer_drains_takes_no_new_streams() {
        let ca = TestCa::new();
        let (peer, accepted) = draining_peer(&ca).await;
        let pool = HbonePool::new(ca.certs());
        let caller = Caller {
            identity: Identity::new("cluster.local", "bookinfo", "default"),
            ip: Ipv4Addr::new(10, 244, 1, 5),
        };
        let target = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 9), 9080);
        let timeout = Duration::from_secs(5);
        let first = pool
            .connect(&caller, None, peer, target, timeout, None)
            .await;
        let mut streams = vec![first.expect("the first stream opens")];
        // Until the GOAWAY reaches the client, new streams may still go to the first
        // connection; from then on each one must still open, on a second connection.
        for _ in 0..50 {
            if accepted.load(Ordering::Relaxed) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let next = pool
                .connect(&caller, None, peer, target, timeout, None)
                .await;
            streams.push(next.expect("a stream opens after the peer's GOAWAY"));
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 2, "a second connection");
        drop(streams);
    }

    /// Two ends of one CONNECT stream over an in-memory HTTP/2 connection: the client's and
    /// the server's, the server offering `token`.
    async fn stream_pair(token: Option<&str>) -> (H2Io, H2Io, Option<String>) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
        let token = token.map(str::to_owned);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (request, respond) = conn.accept().await.unwrap().unwrap();
            let _ = accepted_tx.send(accept_with(respond, request, token.as_deref()).unwrap());
            // Drives the connection.
            while conn.accept().await.is_some() {}
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.244.2.9:5432")
            .header(RESUMABLE, "1")
            .body(())
            .unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let server = accepted_rx.await.unwrap();
        let response = response.await.unwrap();
        let offered = response
            .headers()
            .get(RESUME_TOKEN)
            .map(|v| v.to_str().unwrap().to_owned());
        (H2Io::new(send, response.into_body()), server, offered)
    }

    async fn read_some(io: &mut H2Io) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn a_paused_stream_reads_as_paused_not_ended_and_both_sides_account_for_every_byte() {
        use tokio::io::AsyncWriteExt as _;
        let token = new_token();
        assert!(valid_token(&token));
        let (mut client, mut server, offered) = stream_pair(Some(&token)).await;
        assert_eq!(offered.as_deref(), Some(token.as_str()));
        let paused = tokio_util::sync::CancellationToken::new();
        server.on_peer_pause(paused.clone());
        client.write_all(b"hello").await.unwrap();
        assert_eq!(read_some(&mut server).await, b"hello");
        // The client pauses: the server's reads stay pending, the token says why.
        client.write_all(b" again").await.unwrap();
        client.pause().unwrap();
        let mut got = Vec::new();
        loop {
            let mut buf = [0u8; 64];
            tokio::select! {
                biased;
                () = paused.cancelled() => break,
                n = tokio::io::AsyncReadExt::read(&mut server, &mut buf) => {
                    let n = n.unwrap();
                    assert!(n > 0, "a pause must not read as the end of the stream");
                    got.extend_from_slice(&buf[..n]);
                }
            }
        }
        assert_eq!(got, b" again");
        assert_eq!(server.peer_paused(), Some(11));
        assert!(server.complete());
        // The server answers with what it still had to send, then its own pause.
        server.write_all(b"world").await.unwrap();
        server.pause().unwrap();
        let rest = client
            .until_peer_paused(Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(rest, b"world");
        assert_eq!(client.peer_paused(), Some(5));
        // Nothing is written after a pause.
        assert!(client.pause().is_err());
    }

    #[tokio::test]
    async fn a_stream_ended_instead_of_paused_reads_as_its_end() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, mut server, offered) = stream_pair(None).await;
        assert_eq!(offered, None);
        let paused = tokio_util::sync::CancellationToken::new();
        server.on_peer_pause(paused.clone());
        client.write_all(b"bye").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_some(&mut server).await, b"bye");
        assert_eq!(read_some(&mut server).await, b"");
        assert!(!paused.is_cancelled());
        assert_eq!(server.peer_paused(), None);
        // Waiting for a pause that never comes is an error, not a hang.
        server.shutdown().await.unwrap();
        let err = client
            .until_peer_paused(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn resume_tokens_are_128_bits_of_lowercase_hex() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(valid_token(&a) && valid_token(&b));
        for bad in [
            "",
            "0123",
            &a.to_uppercase(),
            &format!("{a}0"),
            "g".repeat(32).as_str(),
        ] {
            assert!(!valid_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_connect_resumes_only_with_a_token_of_ours() {
        let connect = |resume: Option<&str>| {
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri("10.244.2.9:5432")
                .header(RESUMABLE, "1");
            if let Some(token) = resume {
                request = request.header(RESUME, token);
            }
            request.body(()).unwrap()
        };
        let token = new_token();
        assert!(offers_resume(&connect(None)));
        assert_eq!(resume_token(&connect(None)), Ok(None));
        assert_eq!(
            resume_token(&connect(Some(&token))),
            Ok(Some(token.as_str()))
        );
        for bad in ["", "../../etc", &token[..31], &token.to_uppercase()] {
            let err = resume_token(&connect(Some(bad))).unwrap_err();
            assert!(err.contains(RESUME), "{err}");
        }
    }

    /// Replays the tunnel fuzz corpus on the stable toolchain (see `fuzz/`).
    #[test]
    fn fuzz_corpus_replays_without_panicking() {
        crate::replay_corpus("hbone_request", fuzz_request);
    }
}
