//! Outbound listener (15001): connections of meshed pods, captured by `cgroup/connect4`.
//!
//! The capture layer tells which address the client dialled. A Service ClusterIP is balanced
//! round robin over the ready endpoints of that service port; a pod IP is used as is; anything
//! else is dialled unchanged. An endpoint on this node is connected to directly, from the proxy
//! address so it is not captured again; an endpoint on another node is reached through that
//! node's proxy over the tunnel.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    connect_tcp, copy,
    detect::{self, Declared, Rewind, Sniffed, SNIFF_TIMEOUT},
    l7::{
        self,
        cluster::{self, Cluster, ClusterKey},
    },
    tunnel, v4, Inner, ProxyConfig, ProxyError, Role, Transferred, View, ACCESS_LOG,
};
use crate::{
    metrics::{Reporter, ResponseFlags, ServiceLabels, TcpLabels, Workload},
    model::{Pod, Protocol, Service, Snapshot},
};

/// How the proxy reaches the chosen target.
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

#[derive(Debug)]
pub(super) struct Route {
    pub target: SocketAddrV4,
    pub via: Via,
    /// The pod behind the target, when known.
    pub pod: Option<Arc<Pod>>,
}

/// Picks the target of a connection that dialled `dialled`.
pub(super) fn route(
    view: &View,
    config: &ProxyConfig,
    dialled: SocketAddrV4,
    service: Option<&Arc<Service>>,
) -> Result<Route, ProxyError> {
    let snapshot = &view.snapshot;
    let (target, pod, node) = match service {
        Some(service) => {
            let port = service
                .ports
                .iter()
                .find(|p| p.port == dialled.port() && p.protocol == Protocol::Tcp)
                .ok_or_else(|| ProxyError::NoServicePort {
                    service: service.key.clone(),
                    port: dialled.port(),
                    dialled,
                })?;
            let endpoints = snapshot.endpoints(&service.key, port.port);
            let ready = endpoints.iter().filter(|e| e.ready).count();
            if ready == 0 {
                return Err(ProxyError::NoEndpoint {
                    service: service.key.clone(),
                    port: port.port,
                });
            }
            let index = view.next_index(&service.key) % ready;
            let endpoint = endpoints
                .iter()
                .filter(|e| e.ready)
                .nth(index)
                .expect("index is below the number of ready endpoints");
            let pod = endpoint
                .pod
                .as_ref()
                .and_then(|k| snapshot.pods.get(k))
                .or_else(|| snapshot.pod_by_ip(endpoint.ip))
                .cloned();
            let node = endpoint
                .node
                .clone()
                .or_else(|| pod.as_ref().and_then(|p| p.node.clone()));
            (SocketAddrV4::new(endpoint.ip, endpoint.port), pod, node)
        }
        None => {
            let pod = snapshot.pod_by_ip(*dialled.ip()).cloned();
            let node = pod.as_ref().and_then(|p| p.node.clone());
            (dialled, pod, node)
        }
    };
    let via = via(snapshot, config, target, node.as_ref())?;
    Ok(Route { target, via, pod })
}

/// The endpoint of a TCP route's destination: `service` port `port`, narrowed to a
/// DestinationRule subset, balanced by the cluster's policy.
fn tcp_backend(
    inner: &Inner,
    view: &View,
    service: &Service,
    port: u16,
    subset: Option<Arc<str>>,
    source: Option<&Pod>,
) -> Result<Route, ProxyError> {
    let key = ClusterKey::new(service.key.clone(), port, subset);
    let snapshot = &view.snapshot;
    let policy = cluster::policy_for(snapshot, &key, source.map(|p| &*p.key.namespace));
    let state = inner.clusters.state(&key);
    let no_endpoint = || ProxyError::NoEndpoint {
        service: service.key.clone(),
        port,
    };
    let cluster = Cluster::build(snapshot, key, policy, state).map_err(|_| no_endpoint())?;
    let pick = cluster
        .pick(None, None, std::time::Instant::now())
        .ok_or_else(no_endpoint)?;
    let via = via(snapshot, &inner.config, pick.addr, pick.node.as_ref())?;
    Ok(Route {
        target: pick.addr,
        via,
        pod: pick.pod.clone(),
    })
}

/// How to reach `target`, a pod on `node` if known: directly when it is on this node (from
/// the proxy address, so it is not captured again) or not a pod at all, else through the
/// proxy of its node.
pub(super) fn via(
    snapshot: &Snapshot,
    config: &ProxyConfig,
    target: SocketAddrV4,
    node: Option<&Arc<str>>,
) -> Result<Via, ProxyError> {
    Ok(match node {
        // A sidecar dials the pod itself; the pod's own sidecar captures it inbound.
        _ if config.sidecar => Via::Direct { source: None },
        Some(node) if **node != *config.node => {
            let address = snapshot.nodes.get(node).map(|n| n.address).ok_or_else(|| {
                ProxyError::UnknownNode {
                    target,
                    node: node.clone(),
                }
            })?;
            Via::Tunnel {
                peer: SocketAddrV4::new(address, config.peer_tunnel_port),
            }
        }
        Some(_) => Via::Direct {
            source: Some(config.proxy_ip),
        },
        // Not a pod of the mesh: dialled like the client would have.
        None => Via::Direct { source: None },
    })
}

/// What the access log line reports.
#[derive(Default)]
struct Log {
    dialled: Option<SocketAddrV4>,
    target: Option<SocketAddrV4>,
    via: Option<Via>,
}

pub(super) async fn serve(inner: Arc<Inner>, downstream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    let mut log = Log::default();
    let result = proxy(&inner, downstream, client, &mut log).await;
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
        Err(e) => warn!(
            direction = "outbound",
            %client, %dialled, %upstream, %via,
            duration_ms,
            "outbound connection failed: {e}"
        ),
    }
}

enum Upstream {
    Direct(TcpStream),
    Tunnel(tunnel::TunnelStream),
}

/// How a connection was served.
enum Served {
    Tcp(Transferred),
    Http,
}

async fn proxy(
    inner: &Arc<Inner>,
    downstream: TcpStream,
    client: SocketAddr,
    log: &mut Log,
) -> Result<Served, ProxyError> {
    let client = v4(client).ok_or(ProxyError::NotIpv4 { client })?;
    let dialled = inner
        .original_dst
        .lookup(downstream.as_fd(), client)
        .ok_or(ProxyError::NoOriginalDst { client })?;
    log.dialled = Some(dialled);

    let view = inner.view();
    let snapshot = &view.snapshot;
    let source = snapshot.pod_by_ip(*client.ip()).cloned();
    let service = snapshot.service_by_ip(*dialled.ip()).cloned();

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
            let (verdict, bytes) = detect::sniff(&mut downstream, SNIFF_TIMEOUT)
                .await
                .map_err(ProxyError::Socket)?;
            sniffed = bytes;
            verdict != Sniffed::Opaque
        }
        Some(Declared::Opaque) | None => false,
    };
    let mut downstream = Rewind::new(sniffed, downstream);
    if let (true, Some(service), Some(declared)) = (http, &service, declared) {
        let conn = l7::Conn::new(
            inner.clone(),
            client,
            service.key.clone(),
            dialled.port(),
            declared,
            source,
        );
        drop(view);
        l7::serve(conn, downstream).await;
        return Ok(Served::Http);
    }

    let failed = |labels: TcpLabels, flags| {
        let conn = inner.metrics.connection(&labels.with_response_flags(flags));
        conn.opened();
        conn.closed();
    };

    // A VirtualService `tcp` route sends the connection to one of its weighted destinations.
    let tcp_route = service.as_ref().and_then(|s| {
        view.routes
            .tcp(&s.key, dialled.port(), source.as_deref())
            .and_then(|r| r.pick(fastrand::u32(..)))
    });
    let (service, routed) = match tcp_route {
        Some(backend) => {
            let target = backend
                .service
                .as_ref()
                .and_then(|k| snapshot.services.get(k))
                .cloned();
            let routed = target.as_ref().map(|t| {
                let port = backend.port.unwrap_or(dialled.port());
                tcp_backend(
                    inner,
                    &view,
                    t,
                    port,
                    backend.subset.clone(),
                    source.as_deref(),
                )
            });
            (target.or(service), routed)
        }
        None => (service, None),
    };
    let labels = |pod: Option<&Pod>| {
        TcpLabels::new(
            Reporter::Source,
            Workload::of_option(source.as_deref()),
            Workload::of_option(pod),
            ServiceLabels::of_option(service.as_deref()),
        )
    };
    let routed = routed.unwrap_or_else(|| route(&view, &inner.config, dialled, service.as_ref()));
    let route = match routed {
        Ok(route) => route,
        Err(e) => {
            if service.is_some() {
                failed(labels(None), ResponseFlags::UH);
            }
            return Err(e);
        }
    };
    log.target = Some(route.target);
    log.via = Some(route.via);
    let labels = labels(route.pod.as_deref());

    let timeout = inner.config.connect_timeout;
    let upstream = match route.via {
        Via::Direct { source } => connect_tcp(route.target, source, timeout, Role::Upstream)
            .await
            .map(Upstream::Direct)
            .map_err(ProxyError::from),
        Via::Tunnel { peer } => {
            let source_key = source.as_ref().map(|p| &p.key);
            tunnel::connect(peer, route.target, source_key, timeout)
                .await
                .map(Upstream::Tunnel)
                .map_err(ProxyError::from)
        }
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            failed(labels, ResponseFlags::UF);
            return Err(e);
        }
    };
    // The snapshot is not needed while bytes flow; do not keep it alive for hours.
    drop(view);

    let conn = inner.metrics.connection(&labels);
    conn.opened();
    let result = match &mut upstream {
        Upstream::Direct(s) => copy::bidirectional(&mut downstream, s, &conn).await,
        Upstream::Tunnel(s) => copy::bidirectional(&mut downstream, s, &conn).await,
    };
    conn.closed();
    Ok(Served::Tcp(result?))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{
        Endpoint, Node, ObjectKey, ServiceEndpoints, ServicePort, Snapshot, TargetPort,
    };

    fn pod(name: &str, ip: [u8; 4], node: &str) -> Pod {
        Pod {
            key: ObjectKey::new("default", name),
            uid: None,
            labels: Default::default(),
            annotations: Default::default(),
            node: Some(node.into()),
            ip: Some(ip.into()),
            service_account: "default".into(),
            ports: vec![],
        }
    }

    fn endpoint(p: &Pod, port: u16) -> Endpoint {
        Endpoint {
            ip: p.ip.unwrap(),
            port,
            pod: Some(p.key.clone()),
            node: p.node.clone(),
            ready: true,
        }
    }

    fn fixture(endpoints: Vec<Endpoint>) -> (View, ProxyConfig, Arc<Service>) {
        let mut snapshot = Snapshot::default();
        for p in [
            pod("local", [10, 244, 1, 5], "n1"),
            pod("remote", [10, 244, 2, 5], "n2"),
            pod("lost", [10, 244, 3, 5], "n3"),
        ] {
            snapshot.pods.insert(p.key.clone(), Arc::new(p));
        }
        snapshot.nodes.insert(
            "n2".into(),
            Node {
                name: "n2".into(),
                address: [172, 31, 0, 12].into(),
            },
        );
        let service = Arc::new(Service {
            key: ObjectKey::new("default", "svc"),
            cluster_ip: Some([10, 96, 0, 10].into()),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: TargetPort::Number(8080),
                protocol: Protocol::Tcp,
                app_protocol: None,
            }],
            selector: None,
        });
        snapshot
            .services
            .insert(service.key.clone(), service.clone());
        snapshot.endpoints.insert(
            service.key.clone(),
            Arc::new(ServiceEndpoints {
                by_port: BTreeMap::from([(80, endpoints)]),
            }),
        );
        snapshot.index();
        let view = View::new(Arc::new(snapshot), None);
        let mut config = ProxyConfig::new("n1", [10, 244, 1, 1].into());
        config.peer_tunnel_port = 15008;
        (view, config, service)
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn service_round_robin_local_and_remote() {
        let local = pod("local", [10, 244, 1, 5], "n1");
        let remote = pod("remote", [10, 244, 2, 5], "n2");
        let mut not_ready = endpoint(&remote, 9999);
        not_ready.ready = false;
        let (view, config, service) = fixture(vec![
            endpoint(&local, 8080),
            not_ready,
            endpoint(&remote, 8080),
        ]);
        let dialled = addr("10.96.0.10:80");
        let picks: Vec<_> = (0..4)
            .map(|_| route(&view, &config, dialled, Some(&service)).unwrap())
            .collect();
        assert_eq!(picks[0].target, addr("10.244.1.5:8080"));
        assert_eq!(
            picks[0].via,
            Via::Direct {
                source: Some([10, 244, 1, 1].into())
            }
        );
        assert_eq!(picks[0].pod.as_ref().unwrap().key.name.as_ref(), "local");
        assert_eq!(picks[1].target, addr("10.244.2.5:8080"));
        assert_eq!(
            picks[1].via,
            Via::Tunnel {
                peer: addr("172.31.0.12:15008")
            }
        );
        assert_eq!(picks[2].target, picks[0].target);
        assert_eq!(picks[3].target, picks[1].target);
    }

    #[test]
    fn round_robin_state_survives_a_new_view() {
        let local = pod("local", [10, 244, 1, 5], "n1");
        let remote = pod("remote", [10, 244, 2, 5], "n2");
        let (view, config, service) = fixture(vec![endpoint(&local, 1), endpoint(&remote, 2)]);
        let dialled = addr("10.96.0.10:80");
        assert_eq!(
            route(&view, &config, dialled, Some(&service))
                .unwrap()
                .target
                .port(),
            1
        );
        let next = View::new(view.snapshot.clone(), Some(&view));
        assert_eq!(
            route(&next, &config, dialled, Some(&service))
                .unwrap()
                .target
                .port(),
            2
        );
    }

    #[test]
    fn pods_and_other_addresses() {
        let (view, config, _) = fixture(vec![]);
        let r = route(&view, &config, addr("10.244.2.5:9080"), None).unwrap();
        assert_eq!(r.target, addr("10.244.2.5:9080"));
        assert!(matches!(r.via, Via::Tunnel { .. }));

        let r = route(&view, &config, addr("10.244.1.5:9080"), None).unwrap();
        assert_eq!(
            r.via,
            Via::Direct {
                source: Some(config.proxy_ip)
            }
        );

        let r = route(&view, &config, addr("192.0.2.1:443"), None).unwrap();
        assert_eq!(r.target, addr("192.0.2.1:443"));
        assert_eq!(r.via, Via::Direct { source: None });
        assert!(r.pod.is_none());
    }

    #[test]
    fn sidecars_dial_every_target_directly() {
        let local = pod("local", [10, 244, 1, 5], "n1");
        let remote = pod("remote", [10, 244, 2, 5], "n2");
        let (view, mut config, service) =
            fixture(vec![endpoint(&local, 8080), endpoint(&remote, 8080)]);
        config.sidecar = true;
        let dialled = addr("10.96.0.10:80");
        let first = route(&view, &config, dialled, Some(&service)).unwrap();
        let second = route(&view, &config, dialled, Some(&service)).unwrap();
        assert_eq!(first.target, addr("10.244.1.5:8080"));
        assert_eq!(second.target, addr("10.244.2.5:8080"));
        for r in [first, second] {
            assert_eq!(r.via, Via::Direct { source: None });
        }
    }

    #[test]
    fn failures_explain_themselves() {
        let (view, config, service) = fixture(vec![]);
        let err = route(&view, &config, addr("10.96.0.10:80"), Some(&service)).unwrap_err();
        assert!(
            matches!(err, ProxyError::NoEndpoint { port: 80, .. }),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("service default/svc port 80 has no ready endpoint"));

        let err = route(&view, &config, addr("10.96.0.10:81"), Some(&service)).unwrap_err();
        assert!(
            matches!(err, ProxyError::NoServicePort { port: 81, .. }),
            "{err}"
        );

        let err = route(&view, &config, addr("10.244.3.5:80"), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("node n3, whose address is unknown"),
            "{err}"
        );
    }
}
