//! Why the proxy could not serve a connection, worded for the operator.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use thiserror::Error;

use super::{
    copy::CopyError,
    upstream::{cluster::ClusterError, hbone::TunnelError, DialError},
};
use crate::{
    identity::{manager::CertError, Identity},
    model::ObjectKey,
};

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error(
        "cannot listen on {addr} for {listener}: {source} (is another process using the port?)"
    )]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set IP_TRANSPARENT on the inbound listener {addr}: {source} (mesh-node needs CAP_NET_ADMIN)")]
    Transparent {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("client {client} is not IPv4: Weft captures IPv4 only")]
    NotIpv4 { client: SocketAddr },
    #[error("no original destination is recorded for client {client}: the connection reached the outbound listener without being captured (was port 15001 dialled directly, or is eBPF capture off?)")]
    NoOriginalDst { client: SocketAddrV4 },
    #[error("service {service} has no TCP port {port} (dialled {dialled})")]
    NoServicePort {
        service: ObjectKey,
        port: u16,
        dialled: SocketAddrV4,
    },
    #[error("service {service} port {port} has no ready endpoint: check that its pods are running and selected (or its EndpointSlices)")]
    NoEndpoint { service: ObjectKey, port: u16 },
    #[error("service {service} port {port} is at its DestinationRule's connectionPool.tcp.maxConnections: connection from {client} closed (upstream overflow)")]
    Overflow {
        service: ObjectKey,
        port: u16,
        client: SocketAddrV4,
    },
    #[error("connection from {client} to the inbound listener itself ({local}): only connections steered to a pod are served there")]
    InboundLoop {
        client: SocketAddr,
        local: SocketAddr,
    },
    #[error("tunnel from {client} asks for {target}, which is not a meshed pod on node {node}")]
    NotLocalPod {
        client: SocketAddr,
        target: SocketAddrV4,
        node: Arc<str>,
    },
    #[error("this proxy has no mesh CA (--ca-addr), so it serves no tunnel")]
    NoMtls,
    #[error("this node proxy cannot serve HBONE: {0} (is the mesh CA reachable?)")]
    NoCertificate(#[source] CertError),
    #[error("HBONE client {client} did not complete the TLS handshake and HTTP/2 preface within {timeout:?}")]
    HandshakeTimeout {
        client: SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("TLS handshake with HBONE client {client} failed: {source} (plaintext, a certificate of another CA, or an expired one?)")]
    Handshake {
        client: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HBONE client {client} has no usable identity: {reason}")]
    NoPeerIdentity { client: SocketAddr, reason: String },
    #[error("HBONE client {client} presented {identity}, of a foreign trust domain")]
    ForeignTrustDomain {
        client: SocketAddr,
        identity: Identity,
    },
    #[error("HBONE client {client} ({identity}): its certificate was revoked by the mesh CA; the connection and its streams are closed")]
    Revoked {
        client: SocketAddr,
        identity: Identity,
    },
    #[error("HBONE with {client} failed: {source}")]
    Hbone {
        client: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("plaintext from {client} to {pod} port {port} refused: its PeerAuthentication is STRICT (clients must be meshed)")]
    PlaintextRefused {
        client: SocketAddr,
        pod: ObjectKey,
        port: u16,
    },
    #[error("connection from {client} to {pod} ({target}) denied by its AuthorizationPolicies: {detail}")]
    Denied {
        client: SocketAddr,
        pod: ObjectKey,
        target: SocketAddrV4,
        detail: String,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("cannot read the addresses of an accepted connection: {0}")]
    Socket(#[source] io::Error),
    #[error("the connection to {target} could not carry on across a node proxy restart: {reason}; closed with a reset")]
    Resume {
        target: SocketAddrV4,
        reason: String,
    },
}
