//! Unary gRPC over HTTP/2 cleartext (prior knowledge), as a generated client and server
//! exchange it: `POST` [`PATH`] with `content-type: application/grpc` and a 64-byte message,
//! answered by one message of the response size and `grpc-status: 0` in the trailers. hyper
//! speaks the HTTP/2; this module only frames the messages and checks the answers.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use anyhow::{bail, Context as _, Result};
use bytes::{BufMut as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::{Body, Frame, Incoming},
    client::conn::http2,
    header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, TE},
    Method, Request, Response, Uri,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// The one method of the benchmark's service.
pub const PATH: &str = "/weft.bench.Bench/Get";
/// Bytes of each request message.
pub const REQUEST_BYTES: usize = 64;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// A length-prefixed gRPC message of `len` bytes: not compressed, big-endian length.
pub fn message(len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).expect("a message under 4 GiB"));
    out.extend((0..len).map(|i| b'a' + (i % 26) as u8));
    out.freeze()
}

/// The length of the single message `framed` holds.
fn message_len(framed: &[u8]) -> Result<usize> {
    let Some((prefix, rest)) = framed.split_first_chunk::<5>() else {
        bail!(
            "a gRPC message of {} bytes, shorter than its prefix",
            framed.len()
        );
    };
    if prefix[0] != 0 {
        bail!("a compressed gRPC message");
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if rest.len() != len {
        bail!(
            "a gRPC message of {} bytes whose prefix says {len}",
            rest.len()
        );
    }
    Ok(len)
}

/// Serves the benchmark's gRPC service on `listener` forever.
pub async fn serve(listener: TcpListener, body: usize) -> Result<()> {
    let answer = message(body);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("weft-loadgen: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = answer.clone();
                async move { Ok::<_, Infallible>(respond(request, answer).await) }
            });
            if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("weft-loadgen: gRPC connection ended: {e}");
            }
        });
    }
}

async fn respond(request: Request<Incoming>, answer: Bytes) -> Response<Unary> {
    let status = if request.uri().path() != PATH {
        "12" // UNIMPLEMENTED
    } else {
        match request.into_body().collect().await {
            Ok(body) => match message_len(&body.to_bytes()) {
                Ok(_) => "0",
                Err(_) => "3", // INVALID_ARGUMENT
            },
            Err(_) => "13", // INTERNAL
        }
    };
    let mut trailers = HeaderMap::new();
    trailers.insert(GRPC_STATUS, HeaderValue::from_static(status));
    Response::builder()
        .header(CONTENT_TYPE, "application/grpc")
        .body(Unary {
            message: (status == "0").then_some(answer),
            trailers: Some(trailers),
        })
        .expect("a valid response head")
}

/// A unary response body: the message, then the trailers.
struct Unary {
    message: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Unary {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(message) = this.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// The client side of one HTTP/2 connection.
pub struct Channel {
    sender: http2::SendRequest<Full<Bytes>>,
}

impl Channel {
    /// Connects and completes the HTTP/2 handshake; the connection is driven by a task of the
    /// current tokio runtime.
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/2 handshake with {addr}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { sender })
    }

    /// Whether the connection takes no more calls (the server closed it, or said `GOAWAY`):
    /// a gRPC client opens a new one for the next call, as this generator does.
    pub async fn is_closed(&mut self) -> bool {
        self.sender.is_closed() || self.sender.ready().await.is_err()
    }

    /// One call; an answer other than a `body`-byte message with `grpc-status: 0` is an error.
    pub async fn call(&mut self, call: &Call) -> Result<()> {
        self.sender.ready().await.context("the connection closed")?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(call.uri.clone())
            .header(CONTENT_TYPE, "application/grpc")
            .header(TE, "trailers")
            .body(Full::new(call.request.clone()))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("sending a call")?;
        if !response.status().is_success() {
            bail!("HTTP status {}", response.status());
        }
        // A trailers-only answer (an error a proxy made up) has its status in the head.
        check_status(response.headers())?;
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading a response")?;
        let trailers = body.trailers().cloned().unwrap_or_default();
        if !trailers.contains_key(GRPC_STATUS) {
            bail!("a response without grpc-status");
        }
        check_status(&trailers)?;
        let len = message_len(&body.to_bytes())?;
        if len != call.response_bytes {
            bail!(
                "a response message of {len} bytes, expected {}",
                call.response_bytes
            );
        }
        Ok(())
    }
}

fn check_status(headers: &HeaderMap) -> Result<()> {
    match headers.get(GRPC_STATUS).map(HeaderValue::as_bytes) {
        None | Some(b"0") => Ok(()),
        Some(status) => bail!(
            "grpc-status {} ({})",
            String::from_utf8_lossy(status),
            headers
                .get(GRPC_MESSAGE)
                .map(|m| String::from_utf8_lossy(m.as_bytes()))
                .unwrap_or_default()
        ),
    }
}

/// What every call of a run sends and expects.
#[derive(Clone)]
pub struct Call {
    uri: Uri,
    request: Bytes,
    response_bytes: usize,
}

impl Call {
    pub fn new(addr: SocketAddr, response_bytes: usize) -> Self {
        Self {
            uri: format!("http://{addr}{PATH}")
                .parse()
                .expect("an address makes a valid URI"),
            request: message(REQUEST_BYTES),
            response_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_length_prefixed() {
        let m = message(3);
        assert_eq!(&m[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(message_len(&m).unwrap(), 3);
        assert!(message_len(&m[..6]).is_err());
        assert!(message_len(&[1, 0, 0, 0, 0]).is_err());
        assert!(message_len(&[0, 0]).is_err());
    }

    #[tokio::test]
    async fn calls_are_checked() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, 1024));
        let mut channel = Channel::connect(addr).await.unwrap();
        channel.call(&Call::new(addr, 1024)).await.unwrap();
        let err = channel.call(&Call::new(addr, 10)).await.unwrap_err();
        assert!(err.to_string().contains("expected 10"), "{err}");
        let mut wrong = Call::new(addr, 1024);
        wrong.uri = format!("http://{addr}/other/Method").parse().unwrap();
        let err = channel.call(&wrong).await.unwrap_err();
        assert!(err.to_string().contains("grpc-status 12"), "{err}");
    }
}
