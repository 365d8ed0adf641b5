//! The destination side: connections for pods of this node, either steered to the inbound
//! listener (15006) by the TC program, or arriving through the tunnel (15008) from another
//! node's proxy. Both connect to the pod from the proxy address, so the pod sees the node
//! proxy as its peer and the connection is not captured again.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    context::Context,
    copy::Transferred,
    detect::{self, Declared, Rewind, Sniffed, SNIFF_TIMEOUT},
    error::ProxyError,
    l7,
    tcp::{self, v4},
    upstream::{
        tunnel::{IncomingTunnel, Refusal},
        ConnectErrorKind, Stream,
    },
};
use crate::{
    metrics::{Reporter, ResponseFlags, ServiceLabels, TcpLabels, Workload, ACCESS_LOG},
    model::{ObjectKey, Pod, Service, Snapshot},
};

/// How long a tunnel client may take to send its request.
const TUNNEL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection steered to 15006: its local address is the pod address the client dialled.
pub(super) async fn serve_captured(ctx: Arc<Context>, downstream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    let mut target = None;
    let result = captured(&ctx, downstream, client, &mut target).await;
    log("inbound", client, target, start, result);
}

/// A connection on 15008: a tunnel request from another node's proxy.
pub(super) async fn serve_tunnel(ctx: Arc<Context>, stream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    let mut target = None;
    let result = tunnel(&ctx, stream, &mut target).await;
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
    ctx: &Arc<Context>,
    downstream: TcpStream,
    client: SocketAddr,
    log_target: &mut Option<SocketAddrV4>,
) -> Result<Transferred, ProxyError> {
    let local = downstream.local_addr().map_err(ProxyError::Socket)?;
    let target = if local.port() == ctx.inbound_port {
        // Redirected to the listener's own address (a sidecar's REDIRECT rule): the capture
        // layer knows where the client was going. Without it, dialling `local` would loop.
        v4(client)
            .and_then(|c| ctx.original_dst.lookup(downstream.as_fd(), c))
            .ok_or(ProxyError::InboundLoop { client, local })?
    } else {
        v4(local).ok_or(ProxyError::NotIpv4 { client: local })?
    };
    *log_target = Some(target);

    let view = ctx.view();
    let source = v4(client).and_then(|c| view.snapshot.pod_by_ip(*c.ip()).cloned());
    let labels = destination_labels(&view.snapshot, source.as_deref(), target);
    let http = Http::of(&view.snapshot, target);
    drop(view);
    let Some(mut downstream) = http.serve(ctx, downstream, client, target, source).await? else {
        return Ok(Transferred::default());
    };
    let mut upstream = connect_pod(ctx, target, &labels).await?;
    tcp::relay(ctx, &mut downstream, &mut upstream, &labels).await
}

/// Connects to `target`, a pod of this node, from the proxy address; a failure is counted.
async fn connect_pod(
    ctx: &Context,
    target: SocketAddrV4,
    labels: &TcpLabels,
) -> Result<Stream, ProxyError> {
    ctx.dialer
        .open(target, ctx.dialer.local(), None, None)
        .await
        .map_err(|e| {
            tcp::record_failure(ctx, labels, ResponseFlags::UF);
            e.into()
        })
}

async fn tunnel(
    ctx: &Arc<Context>,
    stream: TcpStream,
    log_target: &mut Option<SocketAddrV4>,
) -> Result<Transferred, ProxyError> {
    let incoming = IncomingTunnel::read(stream, TUNNEL_REQUEST_TIMEOUT).await?;
    let target = incoming.target;
    *log_target = Some(target);

    let view = ctx.view();
    let snapshot = &view.snapshot;
    let node = &ctx.config.node;
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
        let Some(mut downstream) = http.serve(ctx, downstream, client, target, source).await?
        else {
            return Ok(Transferred::default());
        };
        // Sniffed as something else than HTTP.
        let mut upstream = connect_pod(ctx, target, &labels).await?;
        return tcp::relay(ctx, &mut downstream, &mut upstream, &labels).await;
    }
    // Opaque TCP: connect first, so a refusal can tell the source proxy why.
    let mut upstream = match connect_pod(ctx, target, &labels).await {
        Ok(s) => s,
        Err(e) => {
            let timed_out = matches!(
                &e,
                ProxyError::Dial(d) if d.connect_error().is_some_and(|c| matches!(c.kind, ConnectErrorKind::Timeout(_)))
            );
            let refusal = if timed_out {
                Refusal::GatewayTimeout
            } else {
                Refusal::BadGateway
            };
            incoming.refuse(refusal, &e.to_string()).await;
            return Err(e);
        }
    };
    let mut downstream = incoming.accept().await?;
    tcp::relay(ctx, &mut downstream, &mut upstream, &labels).await
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
        ctx: &Arc<Context>,
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
            ctx.clone(),
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
