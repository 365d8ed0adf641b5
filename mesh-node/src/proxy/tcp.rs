//! Opaque TCP: where a connection goes, and the bytes both ways.
//!
//! A connection to a Service port is balanced by the same cluster an HTTP request to that port
//! would use: a VirtualService `tcp` route picks a weighted destination (service, port,
//! subset), then the DestinationRule's load balancer picks the endpoint (a source-IP hash is the
//! only consistent hash a TCP connection has), `connectionPool.tcp.maxConnections` caps the
//! connections open to the cluster (HTTP connections included, as Envoy's circuit breakers do),
//! `connectTimeout` bounds the connect, and connect failures feed outlier detection. A pod
//! address is dialled as is; anything else is dialled unchanged. Envoy's TCP proxy makes one
//! connect attempt, and so does this.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Instant,
};

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    access_log,
    context::Context,
    copy::{self, Lifetime, Transferred},
    error::ProxyError,
    route::Backend,
    upstream::{
        cluster::{Cluster, ClusterKey, Guard, Outcome, Pick},
        hbone::Caller,
        Stream, Via,
    },
    view::View,
};
use crate::{
    metrics::{ConnectionMetrics, Reporter, ResponseFlags, ServiceLabels, TcpLabels, Workload},
    model::{Pod, Protocol, Service, Snapshot},
    tls::origination::Alpn,
};

/// What the access log line of a TCP connection reports.
#[derive(Debug, Default)]
pub(super) struct Log {
    pub dialled: Option<SocketAddrV4>,
    pub target: Option<SocketAddrV4>,
    pub via: Option<Via>,
    /// What the Telemetry API's lines need, once the connection is set up, while some
    /// workload logs.
    pub access: Option<Box<Access>>,
}

/// Who logs an opaque connection, and what their lines say of it.
#[derive(Debug)]
pub(super) struct Access {
    /// The calling pod (its client line).
    pub client: Option<Arc<Pod>>,
    /// The destination pod, where this proxy is its destination proxy too (its server line).
    pub server: Option<Arc<Pod>>,
    pub labels: TcpLabels,
    /// The source side's cluster: port, subset, host.
    pub cluster: Option<(u16, Option<Arc<str>>, String)>,
}

impl Log {
    /// Writes the Telemetry API's lines of the connection, which ended with `result`.
    pub fn write<T>(
        &self,
        ctx: &Context,
        start: Instant,
        client: SocketAddr,
        result: &Result<T, ProxyError>,
        transferred: impl FnOnce(&T) -> Option<Transferred>,
    ) {
        let Some(access) = &self.access else {
            return;
        };
        let (transferred, flags, reached) = match result {
            Ok(t) => match transferred(t) {
                Some(t) => (t, ResponseFlags::NONE, true),
                None => return,
            },
            Err(ProxyError::Copy(e)) => (e.transferred, ResponseFlags::NONE, true),
            // Decided by the destination's policies: its proxy saw it.
            Err(ProxyError::Denied { .. }) => (Transferred::default(), ResponseFlags::NONE, true),
            Err(_) => (Transferred::default(), ResponseFlags::UF, false),
        };
        let conn = access_log::TcpConnection {
            start,
            client,
            local: self.dialled,
            upstream: self.target,
            cluster: access
                .cluster
                .as_ref()
                .map(|(port, subset, host)| (*port, subset.as_deref(), host.as_str())),
            labels: &access.labels,
            transferred,
            flags,
        };
        // The destination saw only a connection that reached it.
        let server = access.server.as_deref().filter(|_| reached);
        access_log::tcp(ctx, access.client.as_deref(), server, &conn);
    }
}

/// The endpoint an outbound connection goes to, with what it holds while it is open.
#[derive(Debug)]
pub(super) struct Target {
    pub addr: SocketAddrV4,
    pub via: Via,
    /// The pod behind the address, when known.
    pub pod: Option<Arc<Pod>>,
    /// The Service whose cluster was used (the route's destination, else the dialled one).
    pub service: Option<Arc<Service>>,
    balanced: Option<Balanced>,
}

impl Target {
    /// The subset of the cluster the connection was balanced by, if any.
    pub fn subset(&self) -> Option<&Arc<str>> {
        self.balanced.as_ref()?.cluster.key().subset.as_ref()
    }

    /// How long the connection may last: the cluster's `tcp.idleTimeout` (0: none), else the
    /// proxy's, and its `tcp.maxConnectionDuration`.
    pub fn lifetime(&self, ctx: &Context) -> Lifetime {
        let policy = self.balanced.as_ref().map(|b| b.cluster.policy());
        Lifetime {
            idle_timeout: policy
                .and_then(|p| p.tcp_idle_timeout)
                .or(Some(ctx.config.tcp_idle_timeout))
                .filter(|t| !t.is_zero()),
            max_duration: policy.and_then(|p| p.max_connection_duration),
        }
    }
}

/// An endpoint picked from a cluster: counted as active (least request) and holding a slot of
/// the cluster's connection budget until the connection closes.
#[derive(Debug)]
struct Balanced {
    cluster: Arc<Cluster>,
    pick: Pick,
    _slot: Guard,
}

/// Why no target could be chosen, with the flag Envoy reports.
pub(super) struct Unroutable {
    pub error: ProxyError,
    pub flags: ResponseFlags,
    pub service: Option<Arc<Service>>,
}

/// Where a VirtualService `tcp` route's `backend` takes a connection to port `dialled`: its
/// Service, port and subset; `None` when it names no known Service (the dialled Service is then
/// in charge).
pub(super) fn routed(
    snapshot: &Snapshot,
    backend: &Backend,
    dialled: u16,
) -> Option<(Arc<Service>, u16, Option<Arc<str>>)> {
    let service = snapshot.services.get(backend.service.as_ref()?)?;
    let port = backend.port.unwrap_or(dialled);
    Some((service.clone(), port, backend.subset.clone()))
}

/// Picks the target of a connection from `client` that dialled `dialled` (`service` if that
/// is a Service address).
pub(super) fn choose(
    ctx: &Context,
    view: &View,
    client: SocketAddrV4,
    dialled: SocketAddrV4,
    service: Option<&Arc<Service>>,
    source: Option<&Arc<Pod>>,
) -> Result<Target, Unroutable> {
    let snapshot = &view.snapshot;
    let Some(dialled_service) = service else {
        let pod = snapshot.pod_by_ip(*dialled.ip()).cloned();
        let node = pod.as_ref().and_then(|p| p.node.clone());
        let via = ctx
            .dialer
            .via(snapshot, dialled, node.as_ref(), pod.as_deref())
            .map_err(|e| Unroutable {
                error: e.into(),
                flags: ResponseFlags::UH,
                service: None,
            })?;
        return Ok(Target {
            addr: dialled,
            via,
            pod,
            service: None,
            balanced: None,
        });
    };
    // A VirtualService `tcp` route sends the connection to one of its weighted destinations;
    // one naming no known Service leaves the dialled one in charge.
    let routed = view
        .routes
        .tcp(&dialled_service.key, dialled.port(), source.map(|p| &**p))
        .and_then(|r| r.pick(fastrand::u32(..)))
        .and_then(|backend| routed(snapshot, backend, dialled.port()));
    let (service, port, subset) = match routed {
        Some(routed) => routed,
        None => {
            let declared = dialled_service
                .ports
                .iter()
                .any(|p| p.port == dialled.port() && p.protocol == Protocol::Tcp);
            if !declared {
                return Err(Unroutable {
                    error: ProxyError::NoServicePort {
                        service: dialled_service.key.clone(),
                        port: dialled.port(),
                        dialled,
                    },
                    flags: ResponseFlags::UH,
                    service: Some(dialled_service.clone()),
                });
            }
            (dialled_service.clone(), dialled.port(), None)
        }
    };
    let fail = |error: ProxyError, flags| Unroutable {
        error,
        flags,
        service: Some(service.clone()),
    };
    let no_endpoint = || ProxyError::NoEndpoint {
        service: service.key.clone(),
        port,
    };
    let key = ClusterKey::new(service.key.clone(), port, subset);
    let namespace = source.map(|p| &p.key.namespace);
    let cluster = view
        .cluster(&ctx.clusters, &key, namespace)
        .map_err(|e| fail(ProxyError::Cluster(e), ResponseFlags::UH))?;
    let hash = cluster.connection_hash(*client.ip());
    let pick = cluster
        .pick_for(Some(dialled), hash, None, Instant::now())
        .ok_or_else(|| fail(no_endpoint(), ResponseFlags::UH))?;
    let slot = cluster
        .state()
        .try_connection(&cluster.policy().limits)
        .ok_or_else(|| {
            fail(
                ProxyError::Overflow {
                    service: service.key.clone(),
                    port,
                    client,
                },
                ResponseFlags::UO,
            )
        })?;
    let via = ctx
        .dialer
        .via(snapshot, pick.addr, pick.node.as_ref(), pick.pod.as_deref())
        .map_err(|e| fail(e.into(), ResponseFlags::UH))?;
    Ok(Target {
        addr: pick.addr,
        via,
        pod: pick.pod.clone(),
        service: Some(service.clone()),
        balanced: Some(Balanced {
            cluster,
            pick,
            _slot: slot,
        }),
    })
}

impl Target {
    /// Connects to the target on behalf of `caller`, within the cluster's `connectTimeout`;
    /// the outcome counts for outlier detection.
    pub async fn connect(
        &self,
        ctx: &Context,
        caller: Option<&Caller>,
    ) -> Result<Stream, ProxyError> {
        let timeout = self
            .balanced
            .as_ref()
            .and_then(|b| b.cluster.policy().connect_timeout);
        let tls = self
            .balanced
            .as_ref()
            .and_then(|b| b.cluster.origination())
            .map(|o| (&**o, Alpn::None));
        let result = ctx
            .dialer
            .open_with(self.addr, self.via, caller, timeout, tls)
            .await;
        if let Some(b) = &self.balanced {
            let outcome = match &result {
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::ConnectFailure,
            };
            if b.cluster.report(&b.pick, outcome, Instant::now()) {
                tracing::info!(endpoint = %self.addr, cluster = %b.cluster.key(), "outlier detection ejected an endpoint");
            }
        }
        Ok(result?)
    }
}

/// Copies bytes both ways between `downstream` and `upstream`, counted as one connection in
/// `conn` (its series, from [`TcpMetrics::connection`](crate::metrics::TcpMetrics::connection):
/// a caller that drops its labels then holds only the series while bytes flow), until both
/// ends close or its `lifetime` ends.
pub(super) async fn relay<D, U>(
    ctx: &Context,
    downstream: &mut D,
    upstream: &mut U,
    conn: ConnectionMetrics,
    lifetime: Lifetime,
) -> Result<Transferred, ProxyError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    conn.opened();
    let result =
        copy::bidirectional_with(downstream, upstream, &conn, lifetime, Some(ctx.overload())).await;
    conn.closed();
    Ok(result?)
}

/// How a relay that may be handed over ended.
pub(super) enum Relayed {
    Done(Transferred),
    /// Paused for the next mesh-node: the connection is not closed, and not counted closed.
    Paused(copy::Paused),
}

/// [`relay`], paused between two reads once the next mesh-node took the sockets (see
/// [`super::adopt`]), and starting with the bytes `held` to write (an adopted connection's).
pub(super) async fn relay_pausable<D, U>(
    ctx: &Context,
    downstream: &mut D,
    upstream: &mut U,
    conn: ConnectionMetrics,
    lifetime: Lifetime,
    held: copy::Paused,
) -> Result<Relayed, ProxyError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    conn.opened();
    let copied = copy::bidirectional_pausable(
        downstream,
        upstream,
        &conn,
        lifetime,
        Some(ctx.overload()),
        &ctx.handover,
        held,
    )
    .await?;
    Ok(match copied {
        copy::Copied::Done(transferred) => {
            conn.closed();
            Relayed::Done(transferred)
        }
        copy::Copied::Paused(paused) => Relayed::Paused(paused),
    })
}

/// Counts a connection that never reached its upstream, with Envoy's flag for why.
pub(super) fn record_failure(ctx: &Context, labels: &TcpLabels, flags: ResponseFlags) {
    let conn = ctx
        .metrics
        .connection(&labels.clone().with_response_flags(flags));
    conn.opened();
    conn.closed();
}

/// Labels of a connection as the source side reports it.
pub(super) fn source_labels(
    source: Option<&Pod>,
    destination: Option<&Pod>,
    service: Option<&Service>,
) -> TcpLabels {
    TcpLabels::new(
        Reporter::Source,
        Workload::of_option(source),
        Workload::of_option(destination),
        ServiceLabels::of_option(service),
    )
}

/// The IPv4 form of an accepted connection's address.
pub(super) fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}
