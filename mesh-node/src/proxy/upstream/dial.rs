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
    hbone::{Caller, HbonePool, HboneStream, TunnelError},
};
use tokio_rustls::client::TlsStream;

use crate::{
    identity::Identity,
    model::{Pod, Snapshot},
    tls::origination::{Alpn, Origination},
};

/// How the proxy reaches a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    /// A TCP connection, from `source` when the target is a pod of this node.
    Direct { source: Option<Ipv4Addr> },
    /// Through the proxy of the target's node (HBONE), from this node's address when known:
    /// the peer checks that a caller's pod runs on the node the connection comes from.
    Tunnel {
        peer: SocketAddrV4,
        source: Option<Ipv4Addr>,
    },
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Direct { .. } => f.write_str("direct"),
            Via::Tunnel { peer, .. } => write!(f, "tunnel:{peer}"),
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
    #[error("{target} runs on another node and this proxy has no mesh CA (--ca-addr): traffic between nodes is never sent without mTLS")]
    NoMtls { target: SocketAddrV4 },
    #[error("{target} runs on another node and the calling pod is unknown to the configuration: without its identity the connection cannot cross nodes")]
    UnknownCaller { target: SocketAddrV4 },
    #[error(transparent)]
    Tls(Box<TlsFailure>),
}

/// TLS the proxy originated did not come up (boxed: rare, and large).
#[derive(Debug, Error)]
#[error("TLS origination to {target} (server name {server_name}) failed: {source}")]
pub struct TlsFailure {
    pub target: SocketAddrV4,
    pub server_name: String,
    #[source]
    pub source: io::Error,
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
#[derive(Clone)]
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
    /// Trust domain of the callers' SPIFFE IDs.
    pub trust_domain: Arc<str>,
    /// Connections to the other nodes' proxies; without it nothing crosses nodes.
    pub hbone: Option<Arc<HbonePool>>,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer")
            .field("node", &self.node)
            .field("proxy_ip", &self.proxy_ip)
            .field("sidecar", &self.sidecar)
            .field("mtls", &self.hbone.is_some())
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// How to reach `target`, `pod` on `node` if known: directly when it is on this node (from
    /// the proxy address, so it is not captured again), or not a pod of the mesh (there is no
    /// peer to authenticate: it is dialled as the client would have, as Istio's ambient mode
    /// does), else through the proxy of its node.
    pub fn via(
        &self,
        snapshot: &Snapshot,
        target: SocketAddrV4,
        node: Option<&Arc<str>>,
        pod: Option<&Pod>,
    ) -> Result<Via, DialError> {
        let meshed = || pod.is_some_and(|p| snapshot.is_meshed(p));
        Ok(match node {
            // A sidecar tunnels to the sidecar of an injected pod, with mTLS when it has a CA.
            _ if self.sidecar => match pod.filter(|p| self.hbone.is_some() && injected(p)) {
                Some(_) => Via::Tunnel {
                    peer: SocketAddrV4::new(*target.ip(), self.peer_tunnel_port),
                    source: None,
                },
                None => Via::Direct { source: None },
            },
            Some(node) if **node != *self.node && !meshed() => Via::Direct { source: None },
            Some(node) if **node != *self.node => {
                let address = snapshot.nodes.get(node).map(|n| n.address).ok_or_else(|| {
                    DialError::UnknownNode {
                        target,
                        node: node.clone(),
                    }
                })?;
                Via::Tunnel {
                    peer: SocketAddrV4::new(address, self.peer_tunnel_port),
                    source: snapshot.nodes.get(&self.node).map(|n| n.address),
                }
            }
            Some(_) => Via::Direct {
                source: Some(self.proxy_ip),
            },
            // Not a pod of the mesh: dialled like the client would have.
            None => Via::Direct { source: None },
        })
    }

    /// Whether connections to `pod` go through HBONE: a meshed pod of another node, or for a
    /// sidecar an injected pod.
    pub fn tunnels_to(&self, snapshot: &Snapshot, pod: &Pod) -> bool {
        match self.sidecar {
            true => self.hbone.is_some() && injected(pod),
            false => {
                self.hbone.is_some()
                    && pod.node.as_deref().is_some_and(|n| *n != *self.node)
                    && snapshot.is_meshed(pod)
            }
        }
    }

    /// Whether this proxy is the destination side of connections to `pod` as well: a meshed
    /// pod of this node (a sidecar's destinations have sidecars of their own).
    pub fn serves(&self, snapshot: &Snapshot, pod: &Pod) -> bool {
        !self.sidecar
            && pod.node.as_deref().is_some_and(|n| *n == *self.node)
            && snapshot.is_meshed(pod)
    }

    /// The way to a pod of this node, from the destination side.
    pub fn local(&self) -> Via {
        Via::Direct {
            source: Some(self.proxy_ip),
        }
    }

    /// Who `pod` is when this proxy dials on its behalf: its service account's identity and
    /// its address. `None` for a pod without an address.
    pub fn caller(&self, pod: &Pod) -> Option<Caller> {
        Some(Caller {
            identity: self.identity(pod),
            ip: pod.ip?,
        })
    }

    /// The SPIFFE identity of `pod`: its service account's.
    pub fn identity(&self, pod: &Pod) -> Identity {
        Identity::new(&self.trust_domain, &pod.key.namespace, &pod.service_account)
    }

    /// Opens a byte stream to `target` the way `via` says, on behalf of `caller` (whose
    /// certificate the far node sees), within `timeout` (or the default).
    pub async fn open(
        &self,
        target: SocketAddrV4,
        via: Via,
        caller: Option<&Caller>,
        timeout: Option<Duration>,
    ) -> Result<Stream, DialError> {
        let timeout = timeout.unwrap_or(self.connect_timeout);
        Ok(match via {
            Via::Direct { source } => {
                Stream::Tcp(connect_tcp(target, source, timeout, Role::Upstream).await?)
            }
            Via::Tunnel { peer, source } => {
                let hbone = self.hbone.as_ref().ok_or(DialError::NoMtls { target })?;
                let caller = caller.ok_or(DialError::UnknownCaller { target })?;
                Stream::Tunnel(
                    hbone
                        .connect(caller, source, peer, target, timeout, None)
                        .await?,
                )
            }
        })
    }

    /// Like [`Dialer::open`], then originates `tls` over the stream when the cluster asks
    /// for it (DestinationRule `SIMPLE`/`MUTUAL`), the handshake within the same `timeout`.
    pub async fn open_with(
        &self,
        target: SocketAddrV4,
        via: Via,
        caller: Option<&Caller>,
        timeout: Option<Duration>,
        tls: Option<(&Origination, Alpn)>,
    ) -> Result<Stream, DialError> {
        let started = tokio::time::Instant::now();
        let stream = self.open(target, via, caller, timeout).await?;
        let Some((origination, alpn)) = tls else {
            return Ok(stream);
        };
        let left = timeout
            .unwrap_or(self.connect_timeout)
            .saturating_sub(started.elapsed());
        let failed = |source| {
            DialError::Tls(Box::new(TlsFailure {
                target,
                server_name: origination.server_name().to_str().into_owned(),
                source,
            }))
        };
        match tokio::time::timeout(left, origination.connect(stream, alpn)).await {
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(failed(io::Error::new(
                io::ErrorKind::TimedOut,
                "no TLS handshake within the connect timeout",
            ))),
        }
    }
}

/// Istio's label of a pod with an injected sidecar, whose endpoints speak mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

fn injected(pod: &Pod) -> bool {
    pod.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio")
}

/// The byte stream to an upstream: a TCP connection or an HBONE stream through the peer node,
/// possibly with TLS the proxy originates on top.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Tunnel(HboneStream),
    Tls(Box<TlsStream<Stream>>),
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
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
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
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
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
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tunnel(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tunnel(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{identity::manager::testing::TestCa, model::ObjectKey};

    fn pod(name: &str, ip: [u8; 4], node: &str, injected: bool) -> Pod {
        let mut labels = crate::model::Labels::new();
        if injected {
            labels.insert(TLS_MODE_LABEL.into(), "istio".into());
        }
        Pod {
            key: ObjectKey::new("side", name),
            uid: None,
            labels,
            annotations: Default::default(),
            node: Some(node.into()),
            ip: Some(ip.into()),
            service_account: "default".into(),
            ports: vec![],
            controller: None,
        }
    }

    #[tokio::test]
    async fn a_sidecar_tunnels_only_to_injected_pods_and_only_with_a_ca() {
        let ca = TestCa::new();
        let mut dialer = Dialer {
            node: "node-1".into(),
            proxy_ip: Ipv4Addr::new(10, 244, 1, 2),
            peer_tunnel_port: 15008,
            sidecar: true,
            connect_timeout: Duration::from_secs(1),
            trust_domain: "cluster.local".into(),
            hbone: Some(Arc::new(HbonePool::new(ca.certs()))),
        };
        let snapshot = Snapshot::default();
        let target = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 3), 8080);
        let injected = pod("peer", [10, 244, 2, 3], "node-2", true);
        let plain = pod("plain", [10, 244, 2, 3], "node-2", false);
        let node = Some(Arc::<str>::from("node-2"));
        assert_eq!(
            dialer
                .via(&snapshot, target, node.as_ref(), Some(&injected))
                .unwrap(),
            Via::Tunnel {
                peer: SocketAddrV4::new(*target.ip(), 15008),
                source: None
            },
            "the peer's own sidecar, on its HBONE port"
        );
        assert!(dialer.tunnels_to(&snapshot, &injected));
        for (pod, why) in [(Some(&plain), "not injected"), (None, "not a pod")] {
            assert_eq!(
                dialer.via(&snapshot, target, node.as_ref(), pod).unwrap(),
                Via::Direct { source: None },
                "{why}"
            );
        }
        dialer.hbone = None;
        assert_eq!(
            dialer
                .via(&snapshot, target, node.as_ref(), Some(&injected))
                .unwrap(),
            Via::Direct { source: None },
            "without a CA the sidecars speak plaintext"
        );
        assert!(!dialer.tunnels_to(&snapshot, &injected));
    }
}
