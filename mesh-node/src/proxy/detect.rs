//! Which protocol a captured connection speaks.
//!
//! Istio's rules: the Service port's `appProtocol`, else its name (`<protocol>[-<suffix>]`)
//! declares the protocol; an undeclared port is sniffed — the proxy reads the client's first
//! bytes for a short while and recognises an HTTP/1.x request line or the HTTP/2 preface.
//! A client that stays silent (a server-first protocol such as MySQL or SMTP) or sends anything
//! else is proxied as opaque TCP. Sniffed bytes are replayed to whoever handles the connection.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::model::ServicePort;

/// How long a client of an undeclared port has to send its first bytes.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods that start an HTTP/1.x request line (RFC 9110 and WebDAV's common ones).
const METHODS: [&[u8]; 12] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PROPFIND ",
    b"MKCOL ",
    b"REPORT ",
];

/// The protocol a Service port declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    /// `http`: HTTP/1.1 or HTTP/2 from the client, HTTP/1.1 to the server.
    Http,
    /// `http2`, `grpc`, `grpc-web`: HTTP/2 to the server.
    Http2,
    /// `tcp`, `tls`, `https`, `mongo`, `mysql`, `redis`...: opaque bytes.
    Opaque,
    /// Nothing declared: sniff.
    Unknown,
}

impl Declared {
    /// What `port` declares, `appProtocol` first, then the port name.
    pub fn of(port: &ServicePort) -> Self {
        if let Some(app) = &port.app_protocol {
            // `kubernetes.io/h2c` and friends carry a domain prefix.
            let app = app.rsplit('/').next().unwrap_or(app);
            return Self::parse(app);
        }
        match &port.name {
            Some(name) => Self::parse(name.split('-').next().unwrap_or(name)),
            None => Declared::Unknown,
        }
    }

    fn parse(protocol: &str) -> Self {
        match protocol.to_ascii_lowercase().as_str() {
            "http" => Declared::Http,
            "http2" | "h2c" | "grpc" | "grpc-web" => Declared::Http2,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" | "sctp" | "ws"
            | "wss" => Declared::Opaque,
            _ => Declared::Unknown,
        }
    }
}

/// What the client's first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    Opaque,
}

/// Decides from `bytes` if possible; `None` means more bytes are needed.
pub fn classify(bytes: &[u8]) -> Option<Sniffed> {
    if bytes.is_empty() {
        return None;
    }
    let prefix_of = |candidate: &[u8]| {
        let n = bytes.len().min(candidate.len());
        bytes[..n] == candidate[..n]
    };
    if prefix_of(H2_PREFACE) {
        return (bytes.len() >= H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    let mut undecided = false;
    for method in METHODS {
        if prefix_of(method) {
            if bytes.len() >= method.len() {
                return Some(Sniffed::Http1);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Sniffed::Opaque)
    }
}

/// Reads from `io` until its first bytes tell the protocol, the client pauses for `timeout`, or
/// it closes. Returns the verdict and the bytes read, which the caller must replay.
pub async fn sniff<S>(io: &mut S, timeout: Duration) -> io::Result<(Sniffed, Bytes)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(verdict) = classify(&buf) {
            return Ok((verdict, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok((Sniffed::Opaque, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// What was not replayed yet, and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

/// The most a ClientHello may take before its server name is given up on (a record's
/// largest payload and its header).
const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

impl<S: AsyncRead + Unpin> Rewind<S> {
    /// The server name (SNI) of the TLS ClientHello the client starts with, read within
    /// `timeout`; what is read is kept to be replayed. `None` when the client sends something
    /// else, nothing in time, or a ClientHello without a name.
    pub async fn peek_sni(&mut self, timeout: Duration) -> Option<String> {
        let mut buf = BytesMut::from(&self.prefix[..]);
        let deadline = tokio::time::Instant::now() + timeout;
        let name = loop {
            match client_hello_name(&buf) {
                Hello::Name(name) => break Some(name),
                Hello::Not => break None,
                Hello::Partial if buf.len() >= MAX_CLIENT_HELLO => break None,
                Hello::Partial => {}
            }
            match tokio::time::timeout_at(deadline, self.inner.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break None,
            }
        };
        self.prefix = buf.freeze();
        name
    }
}

/// What the first bytes of a connection say of a TLS ClientHello.
enum Hello {
    Name(String),
    /// Not TLS, or a ClientHello without a server name.
    Not,
    /// Not all of it yet.
    Partial,
}

/// Parses the bytes read so far as a ClientHello (rustls reads it; nothing is answered).
fn client_hello_name(bytes: &[u8]) -> Hello {
    // A handshake record.
    match bytes.first() {
        None => return Hello::Partial,
        Some(0x16) => {}
        Some(_) => return Hello::Not,
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted
            .client_hello()
            .server_name()
            .map_or(Hello::Not, |name| Hello::Name(name.to_owned())),
        Ok(None) => Hello::Partial,
        Err(_) => Hello::Not,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::model::{Protocol, TargetPort};

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(Arc::from),
            port: 80,
            target_port: TargetPort::Number(80),
            protocol: Protocol::Tcp,
            app_protocol: app.map(Arc::from),
        }
    }

    /// The first flight of a TLS client for `name`, as it goes on the wire.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        hello
    }

    #[tokio::test]
    async fn a_tls_clients_server_name_is_read_and_its_bytes_replayed() {
        let hello = client_hello("db.example");
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        // The ClientHello arrives in two pieces.
        client.write_all(&hello[..10]).await.unwrap();
        let rest = hello[10..].to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&rest).await.unwrap();
            client.write_all(b"after").await.unwrap();
            drop(client);
        });
        let mut stream = Rewind::new(Bytes::new(), server);
        let name = stream.peek_sni(Duration::from_secs(5)).await;
        assert_eq!(name.as_deref(), Some("db.example"));
        let mut replayed = Vec::new();
        stream.read_to_end(&mut replayed).await.unwrap();
        assert_eq!(
            &replayed[..hello.len()],
            &hello[..],
            "the ClientHello is replayed"
        );
        assert_eq!(&replayed[hello.len()..], b"after");
    }

    #[tokio::test]
    async fn no_server_name_without_tls() {
        // Plaintext: answered at once, the bytes replayed.
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"SELECT 1;").await.unwrap();
        let mut stream = Rewind::new(Bytes::new(), server);
        assert_eq!(stream.peek_sni(Duration::from_secs(5)).await, None);
        drop(client);
        let mut replayed = Vec::new();
        stream.read_to_end(&mut replayed).await.unwrap();
        assert_eq!(replayed, b"SELECT 1;");
        // A silent client: nothing within the time given.
        let (_client, server) = tokio::io::duplex(1024);
        let mut silent = Rewind::new(Bytes::new(), server);
        assert_eq!(silent.peek_sni(Duration::from_millis(50)).await, None);
        // TLS with no server name (an IP address).
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let ip =
            rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
        let mut tls = rustls::ClientConnection::new(Arc::new(config), ip).unwrap();
        let mut hello = Vec::new();
        tls.write_tls(&mut hello).unwrap();
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(&hello).await.unwrap();
        let mut nameless = Rewind::new(Bytes::new(), server);
        assert_eq!(nameless.peek_sni(Duration::from_secs(5)).await, None);
    }

    #[test]
    fn ports_declare_by_app_protocol_then_name() {
        assert_eq!(Declared::of(&port(Some("http"), None)), Declared::Http);
        assert_eq!(Declared::of(&port(Some("http-web"), None)), Declared::Http);
        assert_eq!(Declared::of(&port(Some("grpc-api"), None)), Declared::Http2);
        assert_eq!(Declared::of(&port(Some("http2"), None)), Declared::Http2);
        assert_eq!(Declared::of(&port(Some("tcp-db"), None)), Declared::Opaque);
        assert_eq!(Declared::of(&port(Some("web"), None)), Declared::Unknown);
        assert_eq!(Declared::of(&port(None, None)), Declared::Unknown);
        assert_eq!(
            Declared::of(&port(Some("tcp"), Some("http"))),
            Declared::Http,
            "appProtocol wins over the name"
        );
        assert_eq!(
            Declared::of(&port(None, Some("kubernetes.io/h2c"))),
            Declared::Http2
        );
        assert_eq!(Declared::of(&port(None, Some("mysql"))), Declared::Opaque);
    }

    #[test]
    fn classifies_request_lines_and_the_preface() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"DELETE "), Some(Sniffed::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(b"GETX"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Sniffed::Opaque));
    }

    #[tokio::test]
    async fn sniffing_waits_for_split_bytes_and_replays_them() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(b"PO").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"ST /x HTTP/1.1\r\n").await.unwrap();
            client
        });
        let (verdict, prefix) = sniff(&mut server, Duration::from_secs(2)).await.unwrap();
        assert_eq!(verdict, Sniffed::Http1);
        let _client = writer.await.unwrap();
        let mut replay = Rewind::new(prefix, server);
        let mut line = [0u8; 16];
        replay.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"POST /x HTTP/1.1");
    }

    #[tokio::test]
    async fn silent_clients_are_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let (verdict, prefix) = sniff(&mut server, Duration::from_millis(50)).await.unwrap();
        assert_eq!(verdict, Sniffed::Opaque);
        assert!(prefix.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
