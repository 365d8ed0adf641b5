//! The one place that reaches an upstream: directly (a pod of this node, or an address outside
//! the mesh) or through the proxy of the node the pod runs on. The TCP forwarder, the HTTP
//! pools and the destination side all dial through [`Dialer`].

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    connect::{connect_tcp, ConnectError, Role},
    tunnel::{self, TunnelError, TunnelStream},
};
use crate::model::{ObjectKey, Snapshot};

/// How the proxy reaches a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    /// A TCP connection, from `source` when the target is a pod of this node.
    Direct { source: Option<Ipv4Addr> },
    /// Through the proxy of the target's node.
    Tunnel { peer: SocketAddrV4 },
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Direct { .. } => f.write_str("direct"),
            Via::Tunnel { peer } => write!(f, "tunnel:{peer}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum DialError {
    #[error("{target} runs on node {node}, whose address is unknown: the configuration needs that Node with an InternalIP")]
    UnknownNode {
        target: SocketAddrV4,
        node: Arc<str>,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

impl DialError {
    /// The connect failure behind this error, if the connect itself failed.
    pub fn connect_error(&self) -> Option<&ConnectError> {
        match self {
            DialError::Connect(e) | DialError::Tunnel(TunnelError::Connect(e)) => Some(e),
            _ => None,
        }
    }
}

/// What the dialler needs to know of this proxy.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node: Arc<str>,
    /// Source address of connections to local pods (so they do not get captured again).
    pub proxy_ip: Ipv4Addr,
    /// Port of the tunnel listener on the other nodes.
    pub peer_tunnel_port: u16,
    /// A sidecar dials every target itself: the destination's own sidecar captures it inbound.
    pub sidecar: bool,
    /// Used when the cluster sets no `connectTimeout`.
    pub connect_timeout: Duration,
}

impl Dialer {
    /// How to reach `target`, a pod on `node` if known: directly when it is on this node (from
    /// the proxy address, so it is not captured again) or not a pod at all, else through the
    /// proxy of its node.
    pub fn via(
        &self,
        snapshot: &Snapshot,
        target: SocketAddrV4,
        node: Option<&Arc<str>>,
    ) -> Result<Via, DialError> {
        Ok(match node {
            _ if self.sidecar => Via::Direct { source: None },
            Some(node) if **node != *self.node => {
                let address = snapshot.nodes.get(node).map(|n| n.address).ok_or_else(|| {
                    DialError::UnknownNode {
                        target,
                        node: node.clone(),
                    }
                })?;
                Via::Tunnel {
                    peer: SocketAddrV4::new(address, self.peer_tunnel_port),
                }
            }
            Some(_) => Via::Direct {
                source: Some(self.proxy_ip),
            },
            // Not a pod of the mesh: dialled like the client would have.
            None => Via::Direct { source: None },
        })
    }

    /// The way to a pod of this node, from the destination side.
    pub fn local(&self) -> Via {
        Via::Direct {
            source: Some(self.proxy_ip),
        }
    }

    /// Opens a byte stream to `target` the way `via` says, on behalf of the `source` pod
    /// (the far node learns who is calling), within `timeout` (or the default).
    pub async fn open(
        &self,
        target: SocketAddrV4,
        via: Via,
        source: Option<&ObjectKey>,
        timeout: Option<Duration>,
    ) -> Result<Stream, DialError> {
        let timeout = timeout.unwrap_or(self.connect_timeout);
        Ok(match via {
            Via::Direct { source } => {
                Stream::Tcp(connect_tcp(target, source, timeout, Role::Upstream).await?)
            }
            Via::Tunnel { peer } => {
                Stream::Tunnel(tunnel::connect(peer, target, source, timeout).await?)
            }
        })
    }
}

/// The byte stream to an upstream: a TCP connection or a tunnel through the peer node.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tunnel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tunnel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
