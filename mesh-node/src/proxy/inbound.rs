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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use arc_swap::ArcSwap;
    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        metrics::Metrics,
        model::{Endpoint, Protocol, ServiceEndpoints, ServicePort, TargetPort},
        proxy::{
            context::ProxyConfig,
            upstream::{cluster::Clusters, tunnel, tunnel::TunnelError},
            view::View,
            NoOriginalDst,
        },
    };

    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    fn pod(namespace: &str, name: &str, ip: Ipv4Addr, node: &str) -> Pod {
        Pod {
            key: ObjectKey::new(namespace, name),
            uid: None,
            labels: [
                (
                    "app".to_string(),
                    name.split('-').next().unwrap().to_string(),
                ),
                ("version".to_string(), "v1".to_string()),
            ]
            .into(),
            annotations: Default::default(),
            node: Some(node.into()),
            ip: Some(ip),
            service_account: "default".into(),
            ports: vec![],
        }
    }

    /// A Service port: (name, appProtocol, service port, target port).
    type Port<'a> = (Option<&'a str>, Option<&'a str>, u16, u16);

    /// Adds Service `namespace/name` whose ports all have `ip` as their endpoint.
    fn add_service(
        snapshot: &mut Snapshot,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        ports: &[Port<'_>],
    ) {
        let key = ObjectKey::new(namespace, name);
        let service = Service {
            key: key.clone(),
            cluster_ip: None,
            ports: ports
                .iter()
                .map(|(name, app, port, target)| ServicePort {
                    name: name.map(Into::into),
                    port: *port,
                    target_port: TargetPort::Number(*target),
                    protocol: Protocol::Tcp,
                    app_protocol: app.map(Into::into),
                })
                .collect(),
            selector: None,
        };
        let by_port = ports
            .iter()
            .map(|(_, _, port, target)| {
                let endpoint = Endpoint {
                    ip,
                    port: *target,
                    pod: None,
                    node: None,
                    ready: true,
                };
                (*port, vec![endpoint])
            })
            .collect::<BTreeMap<_, _>>();
        snapshot.services.insert(key.clone(), Arc::new(service));
        snapshot
            .endpoints
            .insert(key, Arc::new(ServiceEndpoints { by_port }));
    }

    fn add_pod(snapshot: &mut Snapshot, pod: Pod) {
        snapshot.pods.insert(pod.key.clone(), Arc::new(pod));
        snapshot.index();
    }

    /// bookinfo/reviews-v1 at [`POD_IP`], behind Service reviews with `ports`.
    fn reviews(ports: &[Port<'_>]) -> Snapshot {
        let mut snapshot = Snapshot::default();
        add_service(&mut snapshot, "bookinfo", "reviews", POD_IP, ports);
        add_pod(&mut snapshot, pod("bookinfo", "reviews-v1", POD_IP, "n1"));
        snapshot
    }

    fn at(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(POD_IP, port)
    }

    #[test]
    fn a_pod_port_speaks_what_the_service_port_it_backs_declares() {
        let snapshot = reviews(&[
            (Some("http"), None, 9080, 9080),
            // The service port, not the pod port, names the protocol.
            (Some("grpc-api"), None, 7070, 9090),
            (Some("tcp-admin"), None, 8000, 8000),
            (Some("tcp"), Some("kubernetes.io/h2c"), 8443, 8443),
            (None, None, 6000, 6000),
        ]);
        let declared = |port| Http::of(&snapshot, at(port)).declared;
        assert_eq!(declared(9080), Some(Declared::Http));
        assert_eq!(declared(9090), Some(Declared::Http2));
        assert_eq!(declared(8000), Some(Declared::Opaque));
        assert_eq!(
            declared(8443),
            Some(Declared::Http2),
            "appProtocol wins over the name"
        );
        assert_eq!(
            declared(6000),
            Some(Declared::Unknown),
            "undeclared: sniffed"
        );

        let http = Http::of(&snapshot, at(9080));
        assert_eq!(http.service, Some(ObjectKey::new("bookinfo", "reviews")));
        assert_eq!(
            http.pod.unwrap().key,
            ObjectKey::new("bookinfo", "reviews-v1")
        );
    }

    #[test]
    fn unknown_targets_are_tcp() {
        let snapshot = reviews(&[(Some("http"), None, 9080, 9080)]);
        // Not a pod of the configuration.
        let stranger = Http::of(
            &snapshot,
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 9, 9), 9080),
        );
        assert_eq!(stranger.declared, None);
        assert_eq!(stranger.service, None);
        assert!(stranger.pod.is_none());
        // A pod, on a port no Service exposes.
        let unexposed = Http::of(&snapshot, at(22));
        assert_eq!(unexposed.declared, None);
        assert_eq!(unexposed.service, None);
        assert!(unexposed.pod.is_some());
    }

    #[test]
    fn of_several_services_backed_by_the_target_the_first_by_name_applies() {
        // a-reviews declares HTTP, b-reviews TCP; both list the pod's port.
        let services = [("a-reviews", "http"), ("b-reviews", "tcp")];
        for order in [[0, 1], [1, 0]] {
            let mut snapshot = Snapshot::default();
            // Whichever is added first, the choice is by name.
            for i in order {
                let (name, protocol) = services[i];
                add_service(
                    &mut snapshot,
                    "bookinfo",
                    name,
                    POD_IP,
                    &[(Some(protocol), None, 80, 9080)],
                );
            }
            add_pod(&mut snapshot, pod("bookinfo", "reviews-v1", POD_IP, "n1"));
            let pod = snapshot.pod_by_ip(POD_IP).unwrap().clone();
            let service = service_of(&snapshot, &pod, at(9080)).unwrap();
            assert_eq!(service.key, ObjectKey::new("bookinfo", "a-reviews"));
            let http = Http::of(&snapshot, at(9080));
            assert_eq!(http.service, Some(ObjectKey::new("bookinfo", "a-reviews")));
            assert_eq!(http.declared, Some(Declared::Http), "a-reviews says http");
        }
    }

    #[test]
    fn services_of_other_namespaces_do_not_claim_a_pod() {
        let mut snapshot = Snapshot::default();
        // An EndpointSlice elsewhere that lists the pod's address.
        add_service(
            &mut snapshot,
            "other",
            "aaa",
            POD_IP,
            &[(Some("http"), None, 80, 9080)],
        );
        add_pod(&mut snapshot, pod("bookinfo", "reviews-v1", POD_IP, "n1"));
        let http = Http::of(&snapshot, at(9080));
        assert_eq!(http.service, None);
        assert_eq!(http.declared, None);
    }

    #[test]
    fn destination_labels_name_the_pod_its_service_and_the_caller() {
        let mut snapshot = reviews(&[(Some("http"), None, 9080, 9080)]);
        let caller = pod(
            "bookinfo",
            "productpage-v1",
            Ipv4Addr::new(10, 244, 1, 20),
            "n1",
        );
        add_pod(&mut snapshot, caller.clone());
        let labels = destination_labels(&snapshot, Some(&caller), at(9080));
        assert_eq!(labels.reporter, Reporter::Destination);
        assert_eq!(labels.destination_workload.as_str(), "reviews");
        assert_eq!(labels.destination_workload_namespace.as_str(), "bookinfo");
        assert_eq!(
            labels.destination_service.as_str(),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(labels.source_workload.as_str(), "productpage");

        let unknown = destination_labels(&snapshot, None, at(22));
        assert_eq!(unknown.destination_workload.as_str(), "reviews");
        assert_eq!(unknown.destination_service.as_str(), "unknown");
        assert_eq!(unknown.source_workload.as_str(), "unknown");
    }

    /// A proxy on node n1 whose configuration is `snapshot`.
    fn context(snapshot: Snapshot) -> Arc<Context> {
        let metrics = Metrics::new();
        let config = ProxyConfig::new("n1", Ipv4Addr::LOCALHOST);
        let clusters = Clusters::default();
        let view = View::new(Arc::new(snapshot), None, &clusters);
        Arc::new(Context {
            dialer: config.dialer(),
            config,
            view: ArcSwap::from_pointee(view),
            original_dst: Arc::new(NoOriginalDst),
            metrics: metrics.tcp().clone(),
            http_metrics: metrics.http().clone(),
            clusters,
            pools: Default::default(),
            applied: Default::default(),
            inbound_port: 15006,
        })
    }

    /// Asks the tunnel listener of `ctx` for `target`: what the client and the listener saw.
    async fn ask_tunnel(
        ctx: Arc<Context>,
        target: SocketAddrV4,
    ) -> (
        Result<tunnel::TunnelStream, TunnelError>,
        Result<Transferred, ProxyError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut logged = None;
            let result = tunnel(&ctx, stream, &mut logged).await;
            assert_eq!(logged, Some(target), "the target is logged");
            result
        });
        let source = ObjectKey::new("bookinfo", "productpage-v1");
        let client = tunnel::connect(addr, target, Some(&source), Duration::from_secs(5)).await;
        let server = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the tunnel listener answered")
            .unwrap();
        (client, server)
    }

    fn refused_with(client: &Result<tunnel::TunnelStream, TunnelError>) -> Option<u16> {
        match client {
            Err(TunnelError::Refused { status, .. }) => Some(*status),
            _ => None,
        }
    }

    #[tokio::test]
    async fn the_tunnel_refuses_targets_that_are_not_pods_of_this_node() {
        let mut snapshot = Snapshot::default();
        let remote = Ipv4Addr::new(10, 244, 2, 9);
        add_pod(&mut snapshot, pod("bookinfo", "ratings-v1", remote, "n2"));
        let ctx = context(snapshot);
        for target in [
            SocketAddrV4::new(remote, 9080),
            // Not a pod at all: the tunnel is no open relay.
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 443),
        ] {
            let (client, server) = ask_tunnel(ctx.clone(), target).await;
            assert_eq!(
                refused_with(&client),
                Some(403),
                "{target}: {:?}",
                client.err()
            );
            assert!(
                matches!(server, Err(ProxyError::NotLocalPod { target: t, .. }) if t == target),
                "{server:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_tunnel_refuses_an_opaque_port_nothing_listens_on_with_502() {
        // A port that was just free: nothing listens there.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut snapshot = Snapshot::default();
        add_service(
            &mut snapshot,
            "data",
            "db",
            Ipv4Addr::LOCALHOST,
            &[(Some("tcp-postgres"), None, 5432, closed)],
        );
        add_pod(
            &mut snapshot,
            pod("data", "db-0", Ipv4Addr::LOCALHOST, "n1"),
        );
        let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, closed);
        let (client, server) = ask_tunnel(context(snapshot), target).await;
        assert_eq!(refused_with(&client), Some(502), "{:?}", client.err());
        assert!(matches!(server, Err(ProxyError::Dial(_))), "{server:?}");
    }
}
