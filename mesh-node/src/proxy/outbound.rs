//! Outbound listener (15001): connections of meshed pods, captured by `cgroup/connect4`.
//!
//! The capture layer tells which address the client dialled. A Service port that speaks HTTP
//! (declared, or sniffed when undeclared) is served by the L7 router, request by request;
//! anything else is opaque TCP, balanced by the Service's cluster ([`super::tcp`]).

use std::{
    future::Future,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd as _, AsRawFd as _},
    pin::Pin,
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use futures::FutureExt as _;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    adopt,
    authz::{self, Peer},
    context::Context,
    copy::{Lifetime, Paused, Transferred},
    detect::{self, Declared, Rewind, Sniffed, SNIFF_TIMEOUT},
    error::ProxyError,
    l7,
    resume::{self, Route, SourceEnd},
    sources::SourceConnection,
    tcp::{self, v4, Log},
    upstream::{hbone::HboneStream, Stream, Via},
};
use crate::{
    metrics::{ConnectionMetrics, ACCESS_LOG},
    model::Protocol,
};

pub(super) async fn serve(
    ctx: Arc<Context>,
    downstream: TcpStream,
    client: SocketAddr,
    held: SourceConnection,
) {
    let start = Instant::now();
    let mut log = Log::default();
    // The set-up ends with what carries the connection, which owns all it needs: the task
    // holds that alone while the connection lasts, not the set-up's state as well.
    let carry = Box::pin(proxy(&ctx, downstream, client, held, &mut log)).await;
    let result = match carry {
        Ok(carry) => carry.await,
        Err(e) => Err(e),
    };
    log.write(&ctx, start, client, &result, |served| match served {
        Served::Tcp(t) => Some(*t),
        // Every request was logged on its own.
        Served::Http => None,
    });
    let dialled = log.dialled.map(|d| d.to_string()).unwrap_or_default();
    let upstream = log.target.map(|t| t.to_string()).unwrap_or_default();
    let via = log.via.map(|v| v.to_string()).unwrap_or_default();
    let duration_ms = start.elapsed().as_millis() as u64;
    match result {
        // Every request was logged on its own.
        Ok(Served::Http) => {
            debug!(direction = "outbound", %client, %dialled, duration_ms, "HTTP connection closed")
        }
        Ok(Served::Tcp(t)) => debug!(
            target: ACCESS_LOG,
            direction = "outbound",
            %client, %dialled, %upstream, %via,
            received = t.to_upstream,
            sent = t.to_downstream,
            duration_ms,
            "connection closed"
        ),
        Err(ProxyError::Copy(e)) if e.is_reset() => debug!(
            target: ACCESS_LOG,
            direction = "outbound",
            %client, %dialled, %upstream, %via,
            received = e.transferred.to_upstream,
            sent = e.transferred.to_downstream,
            duration_ms,
            "connection reset: {e}"
        ),
        Err(ProxyError::Denied { detail, .. }) => debug!(
            target: ACCESS_LOG,
            direction = "outbound",
            %client, %dialled, %upstream, %via,
            connection_termination_details = %detail,
            duration_ms,
            "connection denied"
        ),
        Err(e) => warn!(
            direction = "outbound",
            %client, %dialled, %upstream, %via,
            duration_ms,
            "outbound connection failed: {e}"
        ),
    }
}

/// How a connection was served.
enum Served {
    Tcp(Transferred),
    Http,
}

/// What carries a connection once it is set up (its HTTP server or its relay), to its end.
type Carry = Pin<Box<dyn Future<Output = Result<Served, ProxyError>> + Send>>;

async fn proxy(
    ctx: &Arc<Context>,
    downstream: TcpStream,
    client: SocketAddr,
    held: SourceConnection,
    log: &mut Log,
) -> Result<Carry, ProxyError> {
    let client = v4(client).ok_or(ProxyError::NotIpv4 { client })?;
    let dialled = ctx
        .original_dst
        .lookup(downstream.as_fd(), client)
        .ok_or(ProxyError::NoOriginalDst { client })?;
    log.dialled = Some(dialled);

    let view = ctx.view();
    let snapshot = &view.snapshot;
    let source = snapshot.pod_by_ip(*client.ip()).cloned();
    // A Service's address, else (unless it is a meshed pod's) an address of a ServiceEntry
    // host the client's namespace sees.
    let service = snapshot
        .service_by_ip(*dialled.ip())
        .or_else(|| {
            let meshed = snapshot
                .pod_by_ip(*dialled.ip())
                .is_some_and(|p| snapshot.is_meshed(p));
            let namespace = source.as_ref().map(|p| &*p.key.namespace);
            (!meshed)
                .then(|| snapshot.entry_for(dialled, namespace))
                .flatten()
        })
        .cloned();

    let declared = service.as_ref().and_then(|s| {
        s.ports
            .iter()
            .find(|p| p.port == dialled.port() && p.protocol == Protocol::Tcp)
            .map(Declared::of)
    });
    let mut downstream = downstream;
    let mut sniffed = Bytes::new();
    let http = match declared {
        Some(Declared::Http | Declared::Http2) => true,
        Some(Declared::Unknown) => {
            let (verdict, bytes) = Box::pin(detect::sniff(&mut downstream, SNIFF_TIMEOUT))
                .await
                .map_err(ProxyError::Socket)?;
            sniffed = bytes;
            verdict != Sniffed::Opaque
        }
        Some(Declared::Opaque) | None => false,
    };
    let socket = downstream.as_raw_fd();
    let mut downstream = Rewind::new(sniffed, downstream);
    if let (true, Some(service), Some(declared)) = (http, &service, declared) {
        let conn = l7::Conn::outbound(
            ctx.clone(),
            client,
            service.key.clone(),
            dialled.port(),
            declared,
            source,
        )
        .dialled(dialled)
        .held_by(held)
        .client_socket(socket);
        drop(view);
        return Ok(Box::pin(
            l7::serve(conn, downstream).map(|()| Ok(Served::Http)),
        ));
    }

    let target = match tcp::choose(
        ctx,
        &view,
        client,
        dialled,
        service.as_ref(),
        source.as_ref(),
    ) {
        Ok(target) => target,
        Err(unroutable) => {
            if let Some(service) = &unroutable.service {
                let labels = tcp::source_labels(source.as_deref(), None, Some(service));
                tcp::record_failure(ctx, &labels, unroutable.flags);
            }
            return Err(unroutable.error);
        }
    };
    log.target = Some(target.addr);
    log.via = Some(target.via);
    let caller = source.as_deref().and_then(|p| ctx.dialer.caller(p));
    let mut labels = tcp::source_labels(
        source.as_deref(),
        target.pod.as_deref(),
        target.service.as_deref(),
    );
    // A meshed pod of this node: this proxy reports the connection as its destination too.
    let served = target
        .pod
        .clone()
        .filter(|p| ctx.dialer.serves(&view.snapshot, p));
    if let Some(pod) = served.as_deref() {
        // Without a mesh CA nothing is mTLS, not even the kernel's word on one node.
        let source = caller
            .as_ref()
            .filter(|_| ctx.dialer.hbone.is_some())
            .map(|c| &c.identity);
        labels = labels.between_local_pods(source, &ctx.dialer.identity(pod));
    }
    if view.logs() {
        log.access = Some(Box::new(tcp::Access {
            client: source.clone(),
            server: served,
            labels: labels.clone(),
            cluster: target
                .service
                .as_ref()
                .map(|s| (dialled.port(), target.subset().cloned(), s.hostname())),
        }));
    }
    // A meshed pod of this node: no other proxy sees the connection, its policies decide here.
    // The pod that owns the address, whatever an endpoint's `targetRef` claims.
    let owner = view.snapshot.pod_by_ip(*target.addr.ip()).cloned();
    if let Some(pod) = owner.filter(|p| authz::at_source(ctx, &view.snapshot, p)) {
        let peer = match &caller {
            Some(caller) => Peer::authenticated(&caller.identity, IpAddr::V4(caller.ip)),
            None => Peer::plaintext(IpAddr::V4(*client.ip())),
        };
        let sni = Box::pin(authz::sni_for(ctx, Some(&pod), &mut downstream)).await;
        let decided = authz::Target {
            pod: &pod,
            addr: target.addr,
            sni: sni.as_deref(),
        };
        if let Err(denied) = authz::check(ctx, &view, decided, &peer, None) {
            tcp::record_failure(ctx, &labels, crate::metrics::ResponseFlags::NONE);
            return Err(ProxyError::Denied {
                client: client.into(),
                pod: pod.key.clone(),
                target: target.addr,
                detail: denied.detail,
            });
        }
    }
    // The snapshot is not needed while bytes flow; do not keep it alive for hours.
    drop(view);
    // Across nodes the connection is HBONE: both ends are known by their certificates.
    if let (Via::Tunnel { .. }, Some(caller), Some(pod)) = (target.via, &caller, &target.pod) {
        labels = labels.mutual_tls(&caller.identity, &ctx.dialer.identity(pod));
        if let Some(access) = &mut log.access {
            access.labels = labels.clone();
        }
    }
    let upstream = match Box::pin(target.connect(ctx, caller.as_ref())).await {
        Ok(u) => u,
        Err(e) => {
            tcp::record_failure(ctx, &labels, crate::metrics::ResponseFlags::UF);
            return Err(e);
        }
    };
    let lifetime = target.lifetime(ctx);
    // The connection's series from here: its labels are not kept while bytes flow.
    let conn = ctx.metrics.connection(&labels);
    drop(labels);
    // Across nodes to a node proxy that can resume the stream: a restart of either node
    // pauses it and carries it on ([`resume`]).
    match (upstream, target.via, caller) {
        (Stream::Tunnel(tunnel), Via::Tunnel { peer, source }, Some(caller))
            if tunnel.token().is_some() =>
        {
            let route = Route {
                caller,
                source,
                peer,
                target: target.addr,
            };
            Ok(Box::pin(relay_across(
                ctx.clone(),
                downstream,
                tunnel,
                (conn, lifetime),
                route,
                (client, dialled),
                (target, held),
            )))
        }
        (upstream, ..) => Ok(Box::pin(relay(
            ctx.clone(),
            downstream,
            upstream,
            (conn, lifetime),
            (client, dialled),
            (target, held),
        ))),
    }
}

/// An opaque connection to a pod of this node, through the tunnel to a node proxy that cannot
/// resume it, or outside the mesh. A plain TCP upstream of this proxy (a pod of the node, or
/// outside the mesh) has its two sockets handed to the next mesh-node at a restart.
async fn relay(
    ctx: Arc<Context>,
    mut downstream: Rewind<TcpStream>,
    mut upstream: Stream,
    (conn, lifetime): (ConnectionMetrics, Lifetime),
    (client, dialled): (SocketAddrV4, SocketAddrV4),
    // Held until the end: the endpoint's active count and the cluster's connection slot, and
    // the client address's count of connections.
    (target, _held): (tcp::Target, SourceConnection),
) -> Result<Served, ProxyError> {
    if !matches!(upstream, Stream::Tcp(_)) {
        let transferred = tcp::relay(&ctx, &mut downstream, &mut upstream, conn, lifetime).await?;
        drop(target);
        return Ok(Served::Tcp(transferred));
    }
    let relayed = tcp::relay_pausable(
        &ctx,
        &mut downstream,
        &mut upstream,
        conn,
        lifetime,
        Paused::default(),
    )
    .await?;
    let mut paused = match relayed {
        tcp::Relayed::Done(transferred) => {
            drop(target);
            return Ok(Served::Tcp(transferred));
        }
        tcp::Relayed::Paused(paused) => paused,
    };
    let (Some(successor), Stream::Tcp(upstream)) =
        (ctx.config.handovers.successor.get().cloned(), upstream)
    else {
        return Ok(Served::Tcp(paused.transferred));
    };
    let (unread, downstream) = downstream.into_parts();
    // Held bytes first, then what the sniffer read and the copy did not.
    paused.to_upstream.extend_from_slice(&unread);
    let transferred = paused.transferred;
    // Boxed: only connections open at a restart take this path.
    Box::pin(successor.hand_over(
        adopt::Direction::Outbound,
        (client, dialled, target.addr),
        paused,
        downstream,
        upstream,
    ))
    .await
    .map_err(ProxyError::Socket)?;
    Ok(Served::Tcp(transferred))
}

/// An opaque connection across nodes whose stream the destination can resume: relayed until
/// it ends, or until this mesh-node hands over, when the client's socket goes to the next one.
async fn relay_across(
    ctx: Arc<Context>,
    mut downstream: Rewind<TcpStream>,
    tunnel: HboneStream,
    (conn, lifetime): (ConnectionMetrics, Lifetime),
    route: Route,
    addresses: (SocketAddrV4, SocketAddrV4),
    // Held until the end: the endpoint's active count and the cluster's connection slot, and
    // the client address's count of connections.
    _held: (tcp::Target, SourceConnection),
) -> Result<Served, ProxyError> {
    let ended = resume::relay_source(
        &ctx,
        &mut downstream,
        tunnel,
        conn,
        lifetime,
        &route,
        Paused::default(),
    )
    .await;
    let (mut paused, token) = match ended {
        Ok(SourceEnd::Done(transferred)) => return Ok(Served::Tcp(transferred)),
        Ok(SourceEnd::HandOver { paused, token }) => (paused, token),
        Err(e @ ProxyError::Resume { .. }) => {
            resume::reset(downstream.into_parts().1);
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let transferred = paused.transferred;
    let (unread, downstream) = downstream.into_parts();
    let Some(successor) = ctx.config.handovers.successor.get().cloned() else {
        resume::reset(downstream);
        return Ok(Served::Tcp(transferred));
    };
    // Held bytes first, then what the sniffer read and the copy did not.
    paused.to_upstream.extend_from_slice(&unread);
    successor
        .hand_over_tunnel(addresses, &route, token, paused, downstream)
        .await
        .map_err(ProxyError::Socket)?;
    Ok(Served::Tcp(transferred))
}
