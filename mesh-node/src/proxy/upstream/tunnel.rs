//! The node-to-node tunnel on port 15008.
//!
//! A client asks the proxy of the destination node for a connection to a pod there with an
//! HTTP/1.1 `CONNECT`; after `200 OK` the connection carries the application's bytes both ways.
//! The tunnel is plain TCP for now: mTLS HBONE (HTTP/2 CONNECT with the source pod's SPIFFE
//! certificate) replaces this module, keeping its interface: [`connect`] on the client side,
//! [`IncomingTunnel`] on the server side, and [`TunnelStream`] for the bytes.
//!
//! ```text
//! CONNECT 10.244.2.3:9080 HTTP/1.1\r\nHost: 10.244.2.3:9080\r\nweft-source: ns/pod\r\n\r\n
//! HTTP/1.1 200 OK\r\n\r\n
//! ```

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use super::connect::{connect_tcp, ConnectError, Role};
use crate::model::ObjectKey;

/// Header carrying the `namespace/name` of the pod that opened the connection.
pub const SOURCE_HEADER: &str = "weft-source";
/// Largest request or response head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest error body read from a refusing peer.
const MAX_REASON: usize = 1024;

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
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
    #[error("peer node proxy {peer} sent an invalid tunnel response: {detail}")]
    BadResponse { peer: SocketAddrV4, detail: String },
    #[error("tunnel I/O with peer node proxy {peer} failed: {source}")]
    Io {
        peer: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("invalid tunnel request from {client}: {detail}")]
    BadRequest { client: SocketAddr, detail: String },
    #[error("tunnel client {client} sent no complete request within {timeout:?}")]
    RequestTimeout {
        client: SocketAddr,
        timeout: Duration,
    },
    #[error("tunnel I/O with client {client} failed: {source}")]
    ClientIo {
        client: SocketAddr,
        #[source]
        source: io::Error,
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
}

impl Refusal {
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::BadRequest => (400, "Bad Request"),
            Refusal::Forbidden => (403, "Forbidden"),
            Refusal::BadGateway => (502, "Bad Gateway"),
            Refusal::GatewayTimeout => (504, "Gateway Timeout"),
        }
    }
}

/// Opens a tunnel through the proxy at `peer` to `target`, on behalf of the `source` pod.
/// `timeout` bounds the TCP connect and, separately, the wait for the peer's answer.
pub async fn connect(
    peer: SocketAddrV4,
    target: SocketAddrV4,
    source: Option<&ObjectKey>,
    timeout: Duration,
) -> Result<TunnelStream, TunnelError> {
    let mut io = connect_tcp(peer, None, timeout, Role::PeerProxy).await?;
    let io_err = move |source| TunnelError::Io { peer, source };

    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(source) = source {
        head.push_str(&format!("{SOURCE_HEADER}: {source}\r\n"));
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes()).await.map_err(io_err)?;

    let read = async move {
        let (head, rest) = read_head(&mut io).await.map_err(|e| match e {
            HeadError::Io(e) => io_err(e),
            HeadError::Closed => TunnelError::BadResponse {
                peer,
                detail: "connection closed before a response".into(),
            },
            HeadError::TooLarge => TunnelError::BadResponse {
                peer,
                detail: format!("response head larger than {MAX_HEAD} bytes"),
            },
        })?;
        let response =
            parse_response(&head).map_err(|detail| TunnelError::BadResponse { peer, detail })?;
        if response.status == 200 {
            return Ok(TunnelStream::new(io, rest));
        }
        // Read the short explanation the peer sends with a refusal.
        let mut body = rest;
        let want = response.content_length.unwrap_or(0).min(MAX_REASON);
        while body.len() < want {
            let mut chunk = [0u8; 256];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        body.truncate(want);
        Err(TunnelError::Refused {
            peer,
            target,
            status: response.status,
            reason: String::from_utf8_lossy(&body).trim().to_owned(),
        })
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(TunnelError::ResponseTimeout {
            peer,
            target,
            timeout,
        }),
    }
}

/// A tunnel request read by the server, not yet answered.
#[derive(Debug)]
pub struct IncomingTunnel {
    io: TcpStream,
    client: SocketAddr,
    /// Bytes the client sent after the request head.
    early: Vec<u8>,
    pub target: SocketAddrV4,
    pub source: Option<ObjectKey>,
}

impl IncomingTunnel {
    /// Reads the request head from a connection accepted on the tunnel port. A malformed
    /// request is answered with `400` here.
    pub async fn read(mut io: TcpStream, timeout: Duration) -> Result<Self, TunnelError> {
        let client = io.peer_addr().map_err(|source| TunnelError::ClientIo {
            client: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let head = match tokio::time::timeout(timeout, read_head(&mut io)).await {
            Err(_) => return Err(TunnelError::RequestTimeout { client, timeout }),
            Ok(Err(HeadError::Io(source))) => return Err(TunnelError::ClientIo { client, source }),
            Ok(Err(HeadError::Closed)) => {
                return Err(TunnelError::BadRequest {
                    client,
                    detail: "connection closed before a complete request".into(),
                })
            }
            Ok(Err(HeadError::TooLarge)) => {
                Err(format!("request head larger than {MAX_HEAD} bytes"))
            }
            Ok(Ok((head, early))) => parse_request(&head).map(|r| (r, early)),
        };
        match head {
            Ok(((target, source), early)) => Ok(Self {
                io,
                client,
                early,
                target,
                source,
            }),
            Err(detail) => {
                let _ = write_refusal(&mut io, Refusal::BadRequest, &detail).await;
                Err(TunnelError::BadRequest { client, detail })
            }
        }
    }

    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// Answers with an error status and a one-line reason, then closes.
    pub async fn refuse(mut self, refusal: Refusal, reason: &str) {
        let _ = write_refusal(&mut self.io, refusal, reason).await;
    }

    /// Answers `200 OK`; from then on the stream carries the application's bytes.
    pub async fn accept(mut self) -> Result<TunnelStream, TunnelError> {
        let client = self.client;
        self.io
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .map_err(|source| TunnelError::ClientIo { client, source })?;
        Ok(TunnelStream::new(self.io, self.early))
    }
}

async fn write_refusal(io: &mut TcpStream, refusal: Refusal, reason: &str) -> io::Result<()> {
    let (code, phrase) = refusal.status();
    let reason = reason.replace(['\r', '\n'], " ");
    let response = format!(
        "HTTP/1.1 {code} {phrase}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}",
        reason.len()
    );
    io.write_all(response.as_bytes()).await?;
    io.shutdown().await
}

/// The byte stream of an established tunnel. Bytes that arrived together with the handshake
/// are returned first.
#[derive(Debug)]
pub struct TunnelStream {
    io: TcpStream,
    early: Vec<u8>,
    early_pos: usize,
}

impl TunnelStream {
    fn new(io: TcpStream, early: Vec<u8>) -> Self {
        Self {
            io,
            early,
            early_pos: 0,
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.early_pos < this.early.len() {
            let n = (this.early.len() - this.early_pos).min(buf.remaining());
            buf.put_slice(&this.early[this.early_pos..this.early_pos + n]);
            this.early_pos += n;
            if this.early_pos == this.early.len() {
                this.early = Vec::new();
                this.early_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
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

enum HeadError {
    Io(io::Error),
    Closed,
    TooLarge,
}

/// Reads up to and including the blank line ending an HTTP/1.1 head; returns the head and
/// whatever was read after it.
async fn read_head(io: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(256);
    let mut searched: usize = 0;
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(256);
        let n = io.read_buf(&mut buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let from = searched.saturating_sub(3);
        if let Some(at) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at + 4;
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        searched = buf.len();
    }
}

struct Response {
    status: u16,
    content_length: Option<usize>,
}

fn parse_response(head: &[u8]) -> Result<Response, String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, status) = (parts.next(), parts.next());
    if version != Some("HTTP/1.1") {
        return Err(format!("unexpected status line {status_line:?}"));
    }
    let status = status
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected status line {status_line:?}"))?;
    let content_length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok());
    Ok(Response {
        status,
        content_length,
    })
}

fn parse_request(head: &[u8]) -> Result<(SocketAddrV4, Option<ObjectKey>), String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, authority, version) = (parts.next(), parts.next(), parts.next());
    if method != Some("CONNECT") || version != Some("HTTP/1.1") || parts.next().is_some() {
        return Err(format!(
            "expected \"CONNECT <ip>:<port> HTTP/1.1\", got {request_line:?}"
        ));
    }
    let authority = authority.unwrap_or_default();
    let target = authority
        .parse()
        .map_err(|_| format!("target {authority:?} is not an IPv4 address and port"))?;
    let mut source = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        if name.trim().eq_ignore_ascii_case(SOURCE_HEADER) {
            let value = value.trim();
            source = match value.split_once('/') {
                Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                    Some(ObjectKey::new(ns, pod))
                }
                _ => {
                    return Err(format!(
                        "{SOURCE_HEADER} {value:?} is not <namespace>/<pod>"
                    ))
                }
            };
        }
    }
    Ok((target, source))
}

/// The tunnel's head parsers on arbitrary bytes: nothing may panic, and a request that parses
/// says the same once written back the way [`connect`] writes it. `fuzz/` feeds this function;
/// a unit test replays its corpus.
pub fn fuzz_head(data: &[u8]) {
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(data.len(), |at| at + 4);
    let head = &data[..end];
    if let Ok((target, source)) = parse_request(head) {
        let mut again = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(source) = &source {
            again.push_str(&format!("{SOURCE_HEADER}: {source}\r\n"));
        }
        again.push_str("\r\n");
        assert_eq!(parse_request(again.as_bytes()), Ok((target, source)));
    }
    let _ = parse_response(head);
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn bind() -> (TcpListener, SocketAddrV4) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        (listener, addr)
    }

    #[tokio::test]
    async fn bytes_sent_with_the_handshake_are_not_lost() {
        let (listener, addr) = bind().await;
        let target: SocketAddrV4 = "10.244.2.3:9080".parse().unwrap();
        let server = tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let incoming = IncomingTunnel::read(io, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(incoming.target, "10.244.2.3:9080".parse().unwrap());
            assert_eq!(incoming.source, Some(ObjectKey::new("ns", "client")));
            let mut stream = incoming.accept().await.unwrap();
            // A server-first protocol: the greeting may share a segment with the 200.
            stream.write_all(b"greeting").await.unwrap();
            let mut early = [0u8; 5];
            stream.read_exact(&mut early).await.unwrap();
            early
        });

        let source = ObjectKey::new("ns", "client");
        let mut stream = connect(addr, target, Some(&source), Duration::from_secs(5))
            .await
            .unwrap();
        stream.write_all(b"early").await.unwrap();
        let mut greeting = [0u8; 8];
        stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"greeting");
        assert_eq!(&server.await.unwrap(), b"early");
    }

    #[tokio::test]
    async fn data_after_the_head_reaches_the_stream() {
        let (listener, addr) = bind().await;
        let client = tokio::spawn(async move {
            let mut io = TcpStream::connect(addr).await.unwrap();
            io.write_all(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\nfirst bytes")
                .await
                .unwrap();
            let mut answer = [0u8; 19];
            io.read_exact(&mut answer).await.unwrap();
            answer
        });
        let (io, _) = listener.accept().await.unwrap();
        let incoming = IncomingTunnel::read(io, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(incoming.source, None);
        let mut stream = incoming.accept().await.unwrap();
        let mut got = [0u8; 11];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"first bytes");
        assert_eq!(&client.await.unwrap(), b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[tokio::test]
    async fn malformed_requests_get_400_and_slow_peers_time_out() {
        let (listener, addr) = bind().await;
        let client = tokio::spawn(async move {
            let mut io = TcpStream::connect(addr).await.unwrap();
            io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut answer = String::new();
            io.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let (io, _) = listener.accept().await.unwrap();
        let err = IncomingTunnel::read(io, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, TunnelError::BadRequest { .. }), "{err}");
        let answer = client.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(answer.ends_with("got \"GET / HTTP/1.1\""), "{answer}");

        // A peer that accepts but never answers.
        let (silent, addr) = bind().await;
        let target = "10.0.0.1:80".parse().unwrap();
        let err = connect(addr, target, None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, TunnelError::ResponseTimeout { .. }), "{err}");
        drop(silent);
    }

    /// Replays the tunnel fuzz corpus on the stable toolchain (see `fuzz/`).
    #[test]
    fn fuzz_corpus_replays_without_panicking() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tunnel_head");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).expect("the seed corpus of fuzz/ is present") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            fuzz_head(&data);
            seeds += 1;
        }
        assert!(seeds >= 6, "the seed corpus is missing");
    }

    #[test]
    fn parses_requests() {
        let (target, source) = parse_request(
            b"CONNECT 10.244.2.3:9080 HTTP/1.1\r\nHost: 10.244.2.3:9080\r\nWeft-Source: bookinfo/productpage-v1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(target, "10.244.2.3:9080".parse().unwrap());
        assert_eq!(source, Some(ObjectKey::new("bookinfo", "productpage-v1")));

        let (_, source) =
            parse_request(b"CONNECT 10.244.2.3:1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(source, None);

        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"CONNECT reviews:9080 HTTP/1.1\r\n\r\n",
            b"CONNECT [fd00::1]:80 HTTP/1.1\r\n\r\n",
            b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nweft-source: nope\r\n\r\n",
            b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nbroken\r\n\r\n",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parses_responses() {
        let ok = parse_response(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!((ok.status, ok.content_length), (200, None));
        let refused =
            parse_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!((refused.status, refused.content_length), (403, Some(12)));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
