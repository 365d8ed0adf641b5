//! The destination side: connections for pods of this node, either steered to the inbound
//! listener (15006) by the TC program, or arriving through the tunnel (15008) from another
//! node's proxy. Both connect to the pod from the proxy address, so the pod sees the node
//! proxy as its peer and the connection is not captured again.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    connect_tcp, copy,
    detect::{self, Declared, Rewind, Sniffed, SNIFF_TIMEOUT},
    l7,
    tunnel::{IncomingTunnel, Refusal},
    v4, ConnectErrorKind, Inner, ProxyError, Role, Transferred, ACCESS_LOG, TUNNEL_REQUEST_TIMEOUT,
};
use crate::{
    metrics::{Reporter, ResponseFlags, ServiceLabels, TcpLabels, Workload},
    model::{ObjectKey, Pod, Service, Snapshot},
};

/// A connection steered to 15006: its local address is the pod address the client dialled.
pub(super) async fn serve_captured(inner: Arc<Inner>, downstream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    let mut target = None;
    let result = captured(&inner, downstream, client, &mut target).await;
    log("inbound", client, target, start, result);
}

/// A connection on 15008: a tunnel request from another node's proxy.
pub(super) async fn serve_tunnel(inner: Arc<Inner>, stream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    let mut target = None;
    let result = tunnel(&inner, stream, &mut target).await;
    log("tunnel", client, target, start, result);
}

fn log(
    direction: &'static str,
    client: SocketAddr,
    target: Option<SocketAddrV4>,
    start: Instant,
    result: Result<Transferred, ProxyError>,
) {
    let upstream = target.map(|t| t.to_string()).unwrap_or_default();
    let duration_ms = start.elapsed().as_millis() as u64;
    match result {
        Ok(t) => debug!(
            target: ACCESS_LOG,
            direction, %client, %upstream,
            received = t.to_upstream,
            sent = t.to_downstream,
            duration_ms,
            "connection closed"
        ),
        Err(ProxyError::Copy(e)) if e.is_reset() => debug!(
            target: ACCESS_LOG,
            direction, %client, %upstream,
            received = e.transferred.to_upstream,
            sent = e.transferred.to_downstream,
            duration_ms,
            "connection reset: {e}"
        ),
        Err(e) => {
            warn!(direction, %client, %upstream, duration_ms, "{direction} connection failed: {e}")
        }
    }
}

async fn captured(
    inner: &Arc<Inner>,
    downstream: TcpStream,
    client: SocketAddr,
    log_target: &mut Option<SocketAddrV4>,
) -> Result<Transferred, ProxyError> {
    let local = downstream.local_addr().map_err(ProxyError::Socket)?;
    let target = if local.port() == inner.inbound_port {
        // Redirected to the listener's own address (a sidecar's REDIRECT rule): the capture
        // layer knows where the client was going. Without it, dialling `local` would loop.
        v4(client)
            .and_then(|c| inner.original_dst.lookup(downstream.as_fd(), c))
            .ok_or(ProxyError::InboundLoop { client, local })?
    } else {
        v4(local).ok_or(ProxyError::NotIpv4 { client: local })?
    };
    *log_target = Some(target);

    let view = inner.view();
    let source = v4(client).and_then(|c| view.snapshot.pod_by_ip(*c.ip()).cloned());
    let labels = destination_labels(&view.snapshot, source.as_deref(), target);
    let http = Http::of(&view.snapshot, target);
    drop(view);
    let Some(mut downstream) = http
        .serve(inner, downstream, client, target, source)
        .await?
    else {
        return Ok(Transferred::default());
    };

    let mut upstream = match connect_tcp(
        target,
        Some(inner.config.proxy_ip),
        inner.config.connect_timeout,
        Role::Upstream,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            record_failure(inner, labels);
            return Err(e.into());
        }
    };
    let conn = inner.metrics.connection(&labels);
    conn.opened();
    let result = copy::bidirectional(&mut downstream, &mut upstream, &conn).await;
    conn.closed();
    Ok(result?)
}

async fn tunnel(
    inner: &Arc<Inner>,
    stream: TcpStream,
    log_target: &mut Option<SocketAddrV4>,
) -> Result<Transferred, ProxyError> {
    let incoming = IncomingTunnel::read(stream, TUNNEL_REQUEST_TIMEOUT).await?;
    let target = incoming.target;
    *log_target = Some(target);

    let view = inner.view();
    let snapshot = &view.snapshot;
    let node = &inner.config.node;
    // Only pods of this node: the tunnel must not become an open relay.
    let local_pod = snapshot
        .pod_by_ip(*target.ip())
        .filter(|p| p.node.as_deref() == Some(&**node));
    if local_pod.is_none() {
        let error = ProxyError::NotLocalPod {
            client: incoming.client(),
            target,
            node: node.clone(),
        };
        incoming
            .refuse(
                Refusal::Forbidden,
                &format!("{target} is not a pod on node {node}"),
            )
            .await;
        return Err(error);
    }
    let source = incoming
        .source
        .as_ref()
        .and_then(|k| snapshot.pods.get(k))
        .cloned();
    let labels = destination_labels(snapshot, source.as_deref(), target);
    let http = Http::of(snapshot, target);
    drop(view);

    if matches!(
        http.declared,
        Some(Declared::Http | Declared::Http2 | Declared::Unknown)
    ) {
        // The pool dials the pod per request: accept the tunnel first.
        let client = incoming.client();
        let downstream = incoming.accept().await?;
        let Some(mut downstream) = http
            .serve(inner, downstream, client, target, source)
            .await?
        else {
            return Ok(Transferred::default());
        };
        // Sniffed as something else than HTTP.
        let mut upstream = connect_tcp(
            target,
            Some(inner.config.proxy_ip),
            inner.config.connect_timeout,
            Role::Upstream,
        )
        .await
        .inspect_err(|_| record_failure(inner, labels.clone()))?;
        let conn = inner.metrics.connection(&labels);
        conn.opened();
        let result = copy::bidirectional(&mut downstream, &mut upstream, &conn).await;
        conn.closed();
        return Ok(result?);
    }
    let mut upstream = match connect_tcp(
        target,
        Some(inner.config.proxy_ip),
        inner.config.connect_timeout,
        Role::Upstream,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let refusal = match e.kind {
                ConnectErrorKind::Timeout(_) => Refusal::GatewayTimeout,
                _ => Refusal::BadGateway,
            };
            incoming.refuse(refusal, &e.to_string()).await;
            record_failure(inner, labels);
            return Err(e.into());
        }
    };
    let mut downstream = incoming.accept().await?;
    let conn = inner.metrics.connection(&labels);
    conn.opened();
    let result = copy::bidirectional(&mut downstream, &mut upstream, &conn).await;
    conn.closed();
    Ok(result?)
}

/// Whether a pod port speaks HTTP, by the Service port it backs.
struct Http {
    service: Option<ObjectKey>,
    /// `None`: not a port of a known Service; proxied as TCP.
    declared: Option<Declared>,
    pod: Option<Arc<Pod>>,
}

impl Http {
    fn of(snapshot: &Snapshot, target: SocketAddrV4) -> Self {
        let pod = snapshot.pod_by_ip(*target.ip()).cloned();
        let service = pod.as_ref().and_then(|p| service_of(snapshot, p, target));
        let declared = service.and_then(|s| {
            let endpoints = snapshot.endpoints.get(&s.key)?;
            let (port, _) = endpoints.by_port.iter().find(|(_, e)| {
                e.iter()
                    .any(|e| e.ip == *target.ip() && e.port == target.port())
            })?;
            s.ports.iter().find(|p| p.port == *port).map(Declared::of)
        });
        Self {
            service: service.map(|s| s.key.clone()),
            declared,
            pod,
        }
    }

    /// Serves the connection as HTTP when its port speaks it (declared, or sniffed when
    /// undeclared); otherwise hands back the stream, with any sniffed bytes, for TCP.
    async fn serve<S>(
        self,
        inner: &Arc<Inner>,
        mut downstream: S,
        client: SocketAddr,
        target: SocketAddrV4,
        source: Option<Arc<Pod>>,
    ) -> Result<Option<Rewind<S>>, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(declared) = self.declared else {
            return Ok(Some(Rewind::new(Bytes::new(), downstream)));
        };
        let mut sniffed = Bytes::new();
        let http = match declared {
            Declared::Http | Declared::Http2 => true,
            Declared::Opaque => false,
            Declared::Unknown => {
                let (verdict, bytes) = detect::sniff(&mut downstream, SNIFF_TIMEOUT)
                    .await
                    .map_err(ProxyError::Socket)?;
                sniffed = bytes;
                verdict != Sniffed::Opaque
            }
        };
        let downstream = Rewind::new(sniffed, downstream);
        if !http {
            return Ok(Some(downstream));
        }
        let client = v4(client).ok_or(ProxyError::NotIpv4 { client })?;
        let conn = l7::Conn::inbound(
            inner.clone(),
            client,
            target,
            self.service,
            declared,
            source,
            self.pod,
        );
        l7::serve(conn, downstream).await;
        Ok(None)
    }
}

fn record_failure(inner: &Inner, labels: TcpLabels) {
    let conn = inner
        .metrics
        .connection(&labels.with_response_flags(ResponseFlags::UF));
    conn.opened();
    conn.closed();
}

fn destination_labels(
    snapshot: &Snapshot,
    source: Option<&Pod>,
    target: SocketAddrV4,
) -> TcpLabels {
    let pod = snapshot.pod_by_ip(*target.ip());
    let service = pod.and_then(|p| service_of(snapshot, p, target));
    TcpLabels::new(
        Reporter::Destination,
        Workload::of_option(source),
        Workload::of_option(pod.map(|p| &**p)),
        ServiceLabels::of_option(service.map(|s| &**s)),
    )
}

/// The service `target` (an address of `pod`) is an endpoint of; the first by name when
/// several are.
fn service_of<'a>(
    snapshot: &'a Snapshot,
    pod: &Pod,
    target: SocketAddrV4,
) -> Option<&'a Arc<Service>> {
    snapshot
        .services
        .iter()
        .filter(|(key, _)| key.namespace == pod.key.namespace)
        .filter(|(key, _)| {
            snapshot.endpoints.get(*key).is_some_and(|e| {
                e.by_port
                    .values()
                    .flatten()
                    .any(|e| e.ip == *target.ip() && e.port == target.port())
            })
        })
        .min_by(|a, b| a.0.cmp(b.0))
        .map(|(_, s)| s)
}
