//! What travels on the wire: a fixed-size request and a 1 KB response, as raw TCP (L4: 64
//! bytes up, the body down), as HTTP/1.1 with keep-alive (L7: a `GET`, a `200` with
//! `content-length`), or as a unary gRPC call over HTTP/2 (see [`crate::grpc`]). The first two
//! are framed here, by hand, for both the server and the clients.

use anyhow::{bail, Context as _, Result};
use clap::ValueEnum;
use serde::Serialize;

/// Bytes of one raw-TCP request.
pub const TCP_REQUEST_BYTES: usize = 64;
/// The HTTP request every client sends.
pub const HTTP_REQUEST: &[u8] =
    b"GET /bench HTTP/1.1\r\nHost: bench\r\nUser-Agent: weft-loadgen\r\n\r\n";
/// Largest HTTP head accepted either way.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw TCP request/response (64 bytes up, the response body down).
    Tcp,
    /// HTTP/1.1 keep-alive `GET`, `200 OK` with `content-length`.
    Http,
    /// Unary gRPC calls over HTTP/2 cleartext (prior knowledge), one in flight per connection.
    Grpc,
}

impl Protocol {
    /// The hand-made framing of the protocol, `None` for gRPC (hyper speaks HTTP/2).
    pub fn framing(self) -> Option<Framing> {
        match self {
            Protocol::Tcp => Some(Framing::Tcp),
            Protocol::Http => Some(Framing::Http),
            Protocol::Grpc => None,
        }
    }
}

/// The protocols a plain socket loop speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Tcp,
    Http,
}

impl Framing {
    /// The bytes of one request.
    pub fn request(self) -> Vec<u8> {
        match self {
            Framing::Tcp => vec![b'q'; TCP_REQUEST_BYTES],
            Framing::Http => HTTP_REQUEST.to_vec(),
        }
    }

    /// The bytes of one response carrying `body` bytes.
    pub fn response(self, body: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..body).map(|i| b'a' + (i % 26) as u8).collect();
        match self {
            Framing::Tcp => payload,
            Framing::Http => {
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {body}\r\n\r\n"
                )
                .into_bytes();
                out.extend_from_slice(&payload);
                out
            }
        }
    }

    /// Server side: the number of complete requests at the start of `buf` and the bytes
    /// they take. HTTP requests are `GET`s: a request with a body is refused.
    pub fn split_requests(self, buf: &[u8]) -> Result<(usize, usize)> {
        match self {
            Framing::Tcp => {
                let n = buf.len() / TCP_REQUEST_BYTES;
                Ok((n, n * TCP_REQUEST_BYTES))
            }
            Framing::Http => {
                let (mut count, mut used) = (0, 0);
                while let Some(end) = head_end(&buf[used..]) {
                    let head = &buf[used..used + end];
                    if content_length(head)?.unwrap_or(0) != 0 {
                        bail!("requests with a body are not supported");
                    }
                    count += 1;
                    used += end;
                }
                if buf.len() - used > MAX_HEAD {
                    bail!("request head longer than {MAX_HEAD} bytes");
                }
                Ok((count, used))
            }
        }
    }

    /// Client side: the length of the complete response at the start of `buf`, `None` while
    /// it is incomplete. A response whose body is not `body` bytes is an error.
    pub fn response_len(self, buf: &[u8], body: usize) -> Result<Option<usize>> {
        match self {
            Framing::Tcp => Ok((buf.len() >= body).then_some(body)),
            Framing::Http => {
                let Some(end) = head_end(buf) else {
                    if buf.len() > MAX_HEAD {
                        bail!("response head longer than {MAX_HEAD} bytes");
                    }
                    return Ok(None);
                };
                let head = &buf[..end];
                let status = head
                    .split(|b| *b == b' ')
                    .nth(1)
                    .context("response without a status line")?;
                if status != b"200" {
                    bail!(
                        "response status {}: {}",
                        String::from_utf8_lossy(status),
                        String::from_utf8_lossy(head)
                            .lines()
                            .next()
                            .unwrap_or_default()
                    );
                }
                let length = content_length(head)?
                    .context("response without content-length (chunked is not supported)")?;
                if length != body {
                    bail!("response body of {length} bytes, expected {body}");
                }
                Ok((buf.len() >= end + length).then_some(end + length))
            }
        }
    }
}

/// Index just past the `\r\n\r\n` that ends an HTTP head.
/// Whether the response at the start of `buf` says `Connection: close`: the server closes the
/// connection after it, and a client sends its next request on a new one.
pub fn says_close(buf: &[u8]) -> bool {
    let Some(end) = head_end(buf) else {
        return false;
    };
    buf[..end].split(|b| *b == b'\n').any(|line| {
        line.iter().position(|b| *b == b':').is_some_and(|colon| {
            line[..colon].eq_ignore_ascii_case(b"connection")
                && line[colon + 1..]
                    .split(|b| *b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
        })
    })
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The `content-length` of an HTTP head, any letter case.
fn content_length(head: &[u8]) -> Result<Option<usize>> {
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"content-length") {
            let value = std::str::from_utf8(&line[colon + 1..])
                .context("content-length is not text")?
                .trim();
            return Ok(Some(value.parse().with_context(|| {
                format!("content-length {value:?} is not a number")
            })?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_close_is_seen_in_the_response_head_only() {
        let closing =
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: keep-alive, Close\r\n\r\nok";
        assert!(says_close(closing));
        let open = b"HTTP/1.1 200 OK\r\ncontent-length: 16\r\n\r\nconnection: close";
        assert!(!says_close(open));
        assert!(!says_close(b"HTTP/1.1 200 OK\r\nconnection: close"));
    }

    #[test]
    fn tcp_framing() {
        let p = Framing::Tcp;
        assert_eq!(p.request().len(), TCP_REQUEST_BYTES);
        assert_eq!(p.split_requests(&[0; 130]).unwrap(), (2, 128));
        assert_eq!(p.response(1024).len(), 1024);
        assert_eq!(p.response_len(&[0; 1000], 1024).unwrap(), None);
        assert_eq!(p.response_len(&[0; 1030], 1024).unwrap(), Some(1024));
    }

    #[test]
    fn http_requests_are_split_even_when_pipelined() {
        let p = Framing::Http;
        let mut buf = p.request();
        buf.extend_from_slice(&p.request());
        buf.extend_from_slice(b"GET / HT");
        assert_eq!(p.split_requests(&buf).unwrap(), (2, 2 * HTTP_REQUEST.len()));
        let with_body = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert!(p.split_requests(with_body).is_err());
    }

    #[test]
    fn http_responses_are_checked() {
        let p = Framing::Http;
        let response = p.response(1024);
        assert_eq!(
            p.response_len(&response, 1024).unwrap(),
            Some(response.len())
        );
        assert_eq!(p.response_len(&response[..100], 1024).unwrap(), None);
        // Header names in any case, as proxies may rewrite them.
        let upper = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(p.response_len(upper, 2).unwrap(), Some(upper.len()));
        let err = p
            .response_len(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", 2)
            .unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        assert!(p.response_len(upper, 3).is_err());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(p.response_len(chunked, 2).is_err());
    }
}
