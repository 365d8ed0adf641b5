//! A minimal HTTP/1.1 client: one TCP connection per `Connection`, so the caller decides when
//! connections are new (an L4 mesh balances per connection) and when they are reused.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, HOST, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use crate::net::{self, ConnectError};

const AGENT: &str = concat!("weft-demo/", env!("CARGO_PKG_VERSION"));

/// An `http://` URL split into what the socket, the Host header and the request line need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// As written in the URL, for the Host header.
    authority: String,
    /// `host:port` with the default port filled in.
    connect_to: String,
    path: String,
}

/// An open HTTP/1.1 connection.
pub struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    url: Url,
    local: SocketAddr,
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug)]
pub enum ClientError {
    Connect(ConnectError),
    Http { url: String, source: hyper::Error },
    Timeout { url: String, after: Duration },
    BadPath { path: String },
}

impl FromStr for Url {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|err| format!("invalid URL {url:?}: {err}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("invalid URL {url:?}: only http:// is supported"));
        }
        let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
            return Err(format!("invalid URL {url:?}: no host"));
        };
        let port = uri.port_u16().unwrap_or(80);
        Ok(Self {
            authority: authority.as_str().to_owned(),
            connect_to: format!("{host}:{port}"),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

impl Url {
    /// This URL with `path` appended to its path (a base URL's trailing `/` is not doubled).
    pub fn join(&self, path: &str) -> Self {
        let base = self.path.split('?').next().unwrap_or_default();
        Self {
            path: format!("{}{path}", base.trim_end_matches('/')),
            ..self.clone()
        }
    }
}

impl Connection {
    /// Connects to the URL's host; requests then go to its path.
    pub async fn open(url: &Url, connect_timeout: Duration) -> Result<Self, ClientError> {
        let stream = net::connect(&url.connect_to, connect_timeout)
            .await
            .map_err(ClientError::Connect)?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().map_err(|source| {
            ClientError::Connect(ConnectError::Connect {
                addr: url.connect_to.clone(),
                source,
            })
        })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::http(url, source))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!("client connection ended: {err}");
            }
        });
        Ok(Self {
            sender,
            url: url.clone(),
            local,
        })
    }

    /// Our side of the connection, as the server should report it as `peer` when nothing
    /// sits in between.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// GETs the connection's URL with `headers` (Host and User-Agent are set here).
    pub async fn get(&mut self, headers: &HeaderMap) -> Result<Reply, ClientError> {
        let request = self.request(headers)?;
        let url = &self.url;
        self.sender
            .ready()
            .await
            .map_err(|source| ClientError::http(url, source))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|source| ClientError::http(url, source))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|source| ClientError::http(url, source))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn request(&self, headers: &HeaderMap) -> Result<Request<Empty<Bytes>>, ClientError> {
        let bad_path = || ClientError::BadPath {
            path: self.url.path.clone(),
        };
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.url.path.parse().map_err(|_| bad_path())?;
        let request_headers = request.headers_mut();
        for (name, value) in headers {
            request_headers.append(name, value.clone());
        }
        let host = HeaderValue::from_str(&self.url.authority).map_err(|_| bad_path())?;
        request_headers.insert(HOST, host);
        request_headers.insert(USER_AGENT, HeaderValue::from_static(AGENT));
        Ok(request)
    }
}

/// One GET on a fresh connection, closed afterwards; `budget` covers connecting too.
pub async fn get_once(
    url: &Url,
    headers: &HeaderMap,
    budget: Duration,
) -> Result<Reply, ClientError> {
    let exchange = async { Connection::open(url, budget).await?.get(headers).await };
    tokio::time::timeout(budget, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                url: url.to_string(),
                after: budget,
            })
        })
}

impl ClientError {
    /// Whether the time budget ran out (rather than the upstream failing outright).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. } | Self::Connect(ConnectError::Timeout { .. })
        )
    }

    fn http(url: &Url, source: hyper::Error) -> Self {
        Self::Http {
            url: url.to_string(),
            source,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(err) => err.fmt(f),
            Self::Http { url, source } => write!(f, "GET {url} failed: {source}"),
            Self::Timeout { url, after } => {
                write!(f, "GET {url} got no answer within {} ms", after.as_millis())
            }
            Self::BadPath { path } => write!(f, "cannot send a request for path {path:?}"),
        }
    }
}

impl std::error::Error for ClientError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        text.parse().expect("valid URL")
    }

    #[test]
    fn url_fills_in_default_port_and_path() {
        let parsed = url("http://details");
        assert_eq!(parsed.connect_to, "details:80");
        assert_eq!(parsed.authority, "details");
        assert_eq!(parsed.path, "/");
    }

    #[test]
    fn url_keeps_port_path_and_query() {
        let parsed = url("http://productpage:9080/productpage?u=normal");
        assert_eq!(parsed.connect_to, "productpage:9080");
        assert_eq!(parsed.authority, "productpage:9080");
        assert_eq!(parsed.path, "/productpage?u=normal");
        assert_eq!(
            parsed.to_string(),
            "http://productpage:9080/productpage?u=normal"
        );
    }

    #[test]
    fn url_rejects_other_schemes_and_garbage() {
        assert!("https://details:9080".parse::<Url>().is_err());
        assert!("details:9080".parse::<Url>().is_err());
        assert!("http://".parse::<Url>().is_err());
    }

    #[test]
    fn join_appends_without_doubling_slashes() {
        assert_eq!(
            url("http://details:9080").join("/details/0").path,
            "/details/0"
        );
        assert_eq!(
            url("http://details:9080/").join("/details/0").path,
            "/details/0"
        );
        assert_eq!(
            url("http://gw/bookinfo/?x=1").join("/details/0").path,
            "/bookinfo/details/0"
        );
    }
}
