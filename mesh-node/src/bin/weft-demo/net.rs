//! TCP plumbing shared by the servers and the clients: listening, accepting, dialling by name,
//! and error messages that read like the socket call that failed.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection could not be made; the message names the address and the call.
#[derive(Debug)]
pub enum ConnectError {
    Resolve { addr: String, source: io::Error },
    NoAddress { addr: String },
    Connect { addr: String, source: io::Error },
    Timeout { addr: String, after: Duration },
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resolve { addr, source } => {
                write!(f, "resolve {addr} failed: {}", describe(source))
            }
            Self::NoAddress { addr } => write!(f, "resolve {addr} failed: no addresses"),
            Self::Connect { addr, source } => {
                write!(f, "connect to {addr} failed: {}", describe(source))
            }
            Self::Timeout { addr, after } => {
                write!(
                    f,
                    "connect to {addr} timed out after {} ms",
                    after.as_millis()
                )
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// Listens on every IPv4 address of the (pod) network namespace.
pub async fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr} failed"))
}

/// Accepts the next connection; failures are logged and retried because one bad accept
/// must not take a long-running test server down.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(err) => {
                tracing::warn!("accept failed: {}", describe(&err));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Connects to `addr` (`host:port`, the host resolved by the system resolver, so
/// `/etc/hosts` names work), trying each resolved address in turn within `timeout`.
pub async fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let resolved =
            tokio::net::lookup_host(addr)
                .await
                .map_err(|source| ConnectError::Resolve {
                    addr: addr.to_owned(),
                    source,
                })?;
        let mut last = ConnectError::NoAddress {
            addr: addr.to_owned(),
        };
        for target in resolved {
            match TcpStream::connect(target).await {
                Ok(stream) => return Ok(stream),
                Err(source) => {
                    last = ConnectError::Connect {
                        addr: addr.to_owned(),
                        source,
                    }
                }
            }
        }
        Err(last)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addr: addr.to_owned(),
                after: timeout,
            })
        })
}

/// The error text without std's ` (os error N)` suffix: "Connection refused".
pub fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_drops_the_os_error_number() {
        let err = io::Error::from_raw_os_error(111);
        assert_eq!(describe(&err), "Connection refused");
        let custom = io::Error::other("no route");
        assert_eq!(describe(&custom), "no route");
    }

    #[tokio::test]
    async fn refused_connection_names_address_and_cause() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("ephemeral port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let err = connect(&addr, Duration::from_secs(2))
            .await
            .expect_err("nothing listens");
        assert_eq!(
            err.to_string(),
            format!("connect to {addr} failed: Connection refused")
        );
    }

    #[tokio::test]
    async fn names_resolve_through_the_system_resolver() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let stream = connect(&format!("localhost:{port}"), Duration::from_secs(2))
            .await
            .expect("localhost resolves via /etc/hosts");
        assert_eq!(stream.peer_addr().expect("peer").port(), port);
    }

    #[tokio::test]
    async fn address_without_port_is_a_resolve_error() {
        let err = connect("localhost", Duration::from_secs(2))
            .await
            .expect_err("no port");
        assert!(
            err.to_string().starts_with("resolve localhost failed"),
            "{err}"
        );
    }
}
