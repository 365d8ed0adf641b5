//! One TCP connect, with a timeout and an optional source address, and its failure worded for
//! the operator.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};

/// Who the proxy was connecting to when a connect failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Upstream,
    PeerProxy,
}

/// A failed TCP connect, worded for the operator.
#[derive(Debug, Error)]
#[error("{}", self.describe())]
pub struct ConnectError {
    pub role: Role,
    pub target: SocketAddrV4,
    pub kind: ConnectErrorKind,
    #[source]
    pub source: Option<io::Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectErrorKind {
    Refused,
    Timeout(Duration),
    Unreachable,
    Bind(Ipv4Addr),
    Other,
}

impl ConnectError {
    fn describe(&self) -> String {
        let who = match self.role {
            Role::Upstream => format!("upstream {}", self.target),
            Role::PeerProxy => format!("peer node proxy {}", self.target),
        };
        let error = self
            .source
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        match (self.kind, self.role) {
            (ConnectErrorKind::Refused, Role::Upstream) => {
                format!("{who} refused the connection: is the server listening on that port?")
            }
            (ConnectErrorKind::Refused, Role::PeerProxy) => {
                format!("{who} refused the connection: is mesh-node running on that node?")
            }
            (ConnectErrorKind::Timeout(t), _) => format!(
                "{who} did not accept the connection within {t:?}: is it running, and is anything dropping the traffic on the way?"
            ),
            (ConnectErrorKind::Unreachable, _) => {
                format!("{who} is unreachable ({error}): check the routes of this node")
            }
            (ConnectErrorKind::Bind(ip), _) => format!(
                "cannot use {ip} as source address towards {who} ({error}): is --proxy-ip assigned to an interface of this node?"
            ),
            (ConnectErrorKind::Other, _) => format!("connecting to {who} failed: {error}"),
        }
    }

    /// Whether another attempt (or another endpoint) may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, ConnectErrorKind::Bind(_))
    }
}

/// Connects to `target`, from `source` if given, within `timeout`.
pub async fn connect_tcp(
    target: SocketAddrV4,
    source: Option<Ipv4Addr>,
    timeout: Duration,
    role: Role,
) -> Result<TcpStream, ConnectError> {
    let error = |kind, source| ConnectError {
        role,
        target,
        kind,
        source,
    };
    let socket = TcpSocket::new_v4().map_err(|e| error(ConnectErrorKind::Other, Some(e)))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::from((ip, 0)))
            .map_err(|e| error(ConnectErrorKind::Bind(ip), Some(e)))?;
    }
    let stream = match tokio::time::timeout(timeout, socket.connect(target.into())).await {
        Err(_) => return Err(error(ConnectErrorKind::Timeout(timeout), None)),
        Ok(Err(e)) => {
            let kind = match e.kind() {
                io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    ConnectErrorKind::Unreachable
                }
                io::ErrorKind::TimedOut => ConnectErrorKind::Timeout(timeout),
                _ => ConnectErrorKind::Other,
            };
            return Err(error(kind, Some(e)));
        }
        Ok(Ok(stream)) => stream,
    };
    // Small writes (requests, handshakes) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn refused_and_bind_failures_say_what_to_check() {
        // A port that was just free: nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let timeout = Duration::from_secs(1);
        let err = connect_tcp(target, None, timeout, Role::Upstream)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ConnectErrorKind::Refused);
        assert!(err.is_retryable());
        assert!(err.to_string().contains("is the server listening"), "{err}");
        let err = connect_tcp(target, None, timeout, Role::PeerProxy)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is mesh-node running"), "{err}");

        // An address no interface has cannot be a source address.
        let err = connect_tcp(
            target,
            Some(Ipv4Addr::new(192, 0, 2, 77)),
            timeout,
            Role::Upstream,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.kind,
            ConnectErrorKind::Bind(Ipv4Addr::new(192, 0, 2, 77))
        );
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("--proxy-ip"), "{err}");
    }

    #[tokio::test]
    async fn connects_without_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(target) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        let stream = connect_tcp(target, None, Duration::from_secs(1), Role::Upstream)
            .await
            .unwrap();
        assert!(stream.nodelay().unwrap());
    }
}
