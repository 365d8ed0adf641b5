//! The gRPC side of `weft-demo http`: service `weft.demo.Echo` with the unary methods `Hello`
//! and `Slow`.
//!
//! Messages are raw bytes, not protobuf, so any client that can send bytes in a gRPC frame
//! calls it without generated code (grpcio: `channel.unary_unary("/weft.demo.Echo/Hello")`
//! with no serializers). The reply is `<version>:<pod>:<request bytes>`; the status travels
//! in trailers, as on a real gRPC server, so a proxy that drops or rewrites trailers shows.

use bytes::{BufMut as _, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::httpbin::{stream_body, Body};

/// Fully qualified name of the service.
pub const SERVICE: &str = "weft.demo.Echo";

/// Bytes before each message: a compressed flag and a big-endian length.
const PREFIX_LEN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Answers at once.
    Hello,
    /// Answers after the `delay-ms` request metadata (default [`SLOW_DEFAULT_MS`]), for
    /// timeouts and for telling methods apart by latency.
    Slow,
}

/// How long `Slow` waits when the caller gives no `delay-ms`.
pub const SLOW_DEFAULT_MS: u64 = 300;

/// The gRPC status codes this server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    InvalidArgument = 3,
    Unimplemented = 12,
    Unavailable = 14,
}

/// Why a request body is not exactly one uncompressed gRPC message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message shorter than the 5-byte gRPC prefix")]
    Truncated,
    #[error("compressed messages are not supported")]
    Compressed,
    #[error("prefix announces {announced} bytes, {got} follow")]
    Length { announced: usize, got: usize },
}

/// Whether a request is gRPC (its content type; `application/grpc+proto` and the like too).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The method a request path names, `None` for anything else on this port.
pub fn method(path: &str) -> Option<Method> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if service != SERVICE {
        return None;
    }
    match method {
        "Hello" => Some(Method::Hello),
        "Slow" => Some(Method::Slow),
        _ => None,
    }
}

/// The one message of a unary request body.
pub fn decode(body: &[u8]) -> Result<&[u8], FrameError> {
    let (prefix, message) = body
        .split_at_checked(PREFIX_LEN)
        .ok_or(FrameError::Truncated)?;
    if prefix[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let announced = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if announced != message.len() {
        return Err(FrameError::Length {
            announced,
            got: message.len(),
        });
    }
    Ok(message)
}

/// `message` behind its length prefix.
pub fn encode(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(PREFIX_LEN + message.len());
    frame.put_u8(0);
    // Replies are built from request bytes, which the body limit keeps far below 4 GiB.
    frame.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    frame.put_slice(message);
    frame.freeze()
}

/// The reply of `Hello` and `Slow`.
pub fn reply(version: &str, pod: &str, request: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(version.len() + pod.len() + request.len() + 2);
    out.extend_from_slice(version.as_bytes());
    out.push(b':');
    out.extend_from_slice(pod.as_bytes());
    out.push(b':');
    out.extend_from_slice(request);
    out
}

/// A gRPC response: HTTP 200, the message if any, then `grpc-status` (and `grpc-message`)
/// in trailers. `extra` headers go out with the response headers.
pub fn response(
    message: Option<Vec<u8>>,
    code: Code,
    details: &str,
    extra: HeaderMap,
) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code as u16));
    if !details.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&percent_encode(details)) {
            trailers.insert("grpc-message", value);
        }
    }
    let mut response = Response::new(stream_body(message.map(|m| encode(&m)), trailers));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.extend(extra);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` as is.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frame = encode(b"hi");
        assert_eq!(&frame[..], b"\0\0\0\0\x02hi");
        assert_eq!(decode(&frame), Ok(&b"hi"[..]));
        assert_eq!(decode(&encode(b"")), Ok(&b""[..]));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(decode(b"\0\0\0"), Err(FrameError::Truncated));
        assert_eq!(decode(b"\x01\0\0\0\x01a"), Err(FrameError::Compressed));
        assert_eq!(
            decode(b"\0\0\0\0\x05ab"),
            Err(FrameError::Length {
                announced: 5,
                got: 2
            })
        );
    }

    #[test]
    fn methods_are_found_by_path() {
        assert_eq!(method("/weft.demo.Echo/Hello"), Some(Method::Hello));
        assert_eq!(method("/weft.demo.Echo/Slow"), Some(Method::Slow));
        assert_eq!(method("/weft.demo.Echo/Other"), None);
        assert_eq!(method("/other.Echo/Hello"), None);
        assert_eq!(method("/"), None);
    }

    #[test]
    fn content_type_marks_grpc() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc(&headers));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&headers));
    }

    #[test]
    fn reply_names_version_and_pod() {
        assert_eq!(reply("v2", "echo-v2", b"x"), b"v2:echo-v2:x");
    }

    #[test]
    fn details_are_percent_encoded() {
        assert_eq!(percent_encode("50% ok"), "50%25 ok");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
