//! The configuration as the data path reads it: a snapshot with everything compiled that
//! connections and requests need — route tables and clusters — built off the data path when a
//! snapshot is published, reusing what the change did not touch.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use super::{
    route::RouteIndex,
    upstream::cluster::{self, Cluster, ClusterError, ClusterKey, ClusterState, Clusters},
};
use tracing::warn;

use crate::model::{
    authz,
    policy::{AuthorizationPolicy, ROOT_NAMESPACE},
    telemetry::{self, EffectiveTracing, ExtensionProvider, ProviderKind, Telemetry},
    Map, ObjectKey, Pod, Snapshot,
};

/// A cluster as a client namespace sees it (`exportTo` makes rules namespace-dependent).
type ClusterSlot = (ClusterKey, Option<Arc<str>>);

/// One snapshot, compiled.
pub(crate) struct View {
    pub snapshot: Arc<Snapshot>,
    /// HTTP and TCP routes of every Service that has any.
    pub routes: Arc<RouteIndex>,
    /// Clusters connections asked for, built once per view (a cluster that cannot be built
    /// too: its error is logged once, not per request); carried into the next view when the
    /// change did not touch them.
    clusters: RwLock<HashMap<ClusterSlot, Built>>,
    /// The AuthorizationPolicies of each pod asked about, found once per view.
    policies: RwLock<HashMap<ObjectKey, PodPolicies>>,
    /// How each pod asked about traces its requests, as their client (`true`) and server.
    tracing: RwLock<HashMap<(ObjectKey, bool), PodTracing>>,
    /// Where each pod asked about logs its requests, as their client (`true`) and server.
    access_logs: RwLock<HashMap<(ObjectKey, bool), PodLogs>>,
    /// Whether any workload may be traced: MeshConfig has an `opentelemetry` provider.
    traces: bool,
    /// Whether any workload may log requests: a Telemetry's `accessLogging`, or MeshConfig's
    /// default access log providers.
    logs: bool,
}

/// What `cache` holds for `key`, computed (and kept) the first time.
fn once<K: std::hash::Hash + Eq, V: Clone>(
    cache: &RwLock<HashMap<K, V>>,
    key: K,
    compute: impl FnOnce() -> V,
) -> V {
    if let Some(found) = cache.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return found.clone();
    }
    let found = compute();
    let mut cache = cache.write().unwrap_or_else(|e| e.into_inner());
    cache.insert(key, found.clone());
    found
}

fn side(client: bool) -> &'static str {
    if client {
        "client"
    } else {
        "server"
    }
}

/// How a pod's requests are traced at one side (`None`: no span).
type PodTracing = Option<Arc<EffectiveTracing>>;

/// Where a pod's requests are logged at one side (`None`: nowhere).
pub(crate) type PodLogs = Option<Arc<[ExtensionProvider]>>;

/// The AuthorizationPolicies that apply to a pod, in key order.
pub(crate) type PodPolicies = Arc<[Arc<AuthorizationPolicy>]>;

/// A cluster, or why it could not be built and when that was found.
type Built = Result<Arc<Cluster>, (ClusterError, Instant)>;

/// What a connection asking for a cluster gets.
type Answer = Result<Arc<Cluster>, ClusterError>;

/// How long a cluster that could not be built answers with that error before it is tried
/// again: files named by a rule may appear on the node without any configuration change.
const RETRY_FAILED: Duration = Duration::from_secs(5);

impl View {
    /// Compiles `snapshot`. What `previous` compiled is reused where its inputs are the same
    /// objects (unchanged objects keep their `Arc` across snapshots): the route tables when no
    /// route or Service changed, each compiled route when only other routes changed, each
    /// cluster when neither its Service's endpoints, nor the DestinationRules, nor the pods
    /// behind its endpoints changed. Clusters in use are rebuilt here rather than by the next
    /// connection. A changed Service recompiles every route.
    pub fn new(snapshot: Arc<Snapshot>, previous: Option<&View>, states: &Clusters) -> Self {
        let routes = match previous {
            Some(p) if same_entries(&p.snapshot.services, &snapshot.services) => {
                if routes_unchanged(&p.snapshot, &snapshot) {
                    p.routes.clone()
                } else {
                    Arc::new(RouteIndex::update(&snapshot, Some(&p.routes)))
                }
            }
            _ => Arc::new(RouteIndex::build(&snapshot)),
        };
        let mut clusters = HashMap::new();
        if let Some(previous) = previous {
            let rules_unchanged = same_entries(
                &previous.snapshot.destination_rules,
                &snapshot.destination_rules,
            ) && same_entries(&previous.snapshot.secrets, &snapshot.secrets);
            let old = previous.clusters.read().unwrap_or_else(|e| e.into_inner());
            for ((key, namespace), cluster) in old.iter() {
                let endpoints_unchanged = match (
                    previous.snapshot.endpoints.get(&key.service),
                    snapshot.endpoints.get(&key.service),
                ) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                let unchanged = rules_unchanged
                    && endpoints_unchanged
                    && pods_unchanged(&previous.snapshot, &snapshot, key);
                let reused = if unchanged {
                    cluster.clone()
                } else {
                    let failed = cluster.as_ref().err();
                    build(&snapshot, states, key, namespace.as_deref(), failed)
                };
                clusters.insert((key.clone(), namespace.clone()), reused);
            }
        }
        let traces = snapshot
            .mesh_config
            .extension_providers
            .iter()
            .any(|p| matches!(p.kind, ProviderKind::OpenTelemetry { .. }));
        let logs = snapshot
            .telemetries
            .values()
            .any(|t| !t.access_logging.is_empty())
            || !snapshot
                .mesh_config
                .default_providers
                .access_logging
                .is_empty();
        Self {
            snapshot,
            routes,
            clusters: RwLock::new(clusters),
            policies: RwLock::default(),
            tracing: RwLock::default(),
            access_logs: RwLock::default(),
            traces,
            logs,
        }
    }

    /// The AuthorizationPolicies that apply to `pod` (`None`: none does).
    pub fn policies(&self, pod: &Pod) -> Option<PodPolicies> {
        if self.snapshot.authorization_policies.is_empty() {
            return None;
        }
        let cached = self
            .policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pod.key)
            .cloned();
        let policies = cached.unwrap_or_else(|| {
            let found: PodPolicies = authz::policies_for(&self.snapshot, pod, ROOT_NAMESPACE)
                .into_iter()
                .filter_map(|p| self.snapshot.authorization_policies.get(&p.key).cloned())
                .collect();
            let mut cache = self.policies.write().unwrap_or_else(|e| e.into_inner());
            cache.insert(pod.key.clone(), found.clone());
            found
        });
        (!policies.is_empty()).then_some(policies)
    }

    /// How `pod`'s requests are traced at its side (`client`: the source proxy's span, else
    /// the destination's), from the Telemetries and MeshConfig; `None`: no span. Found once
    /// per pod and view; `None` at once when MeshConfig names no tracing provider.
    pub fn tracing(&self, pod: &Pod, client: bool) -> Option<Arc<EffectiveTracing>> {
        if !self.traces {
            return None;
        }
        once(&self.tracing, (pod.key.clone(), client), || {
            let mesh = &self.snapshot.mesh_config;
            match telemetry::tracing(
                &self.telemetries_of(pod),
                &mesh.extension_providers,
                &mesh.default_providers,
                mesh.default_sampling,
                client,
            ) {
                Ok(found) => found.map(Arc::new),
                Err(reason) => {
                    // Said once per pod, side and view: the pod's requests make no span.
                    warn!(pod = %pod.key, side = side(client), "no spans: {reason}");
                    None
                }
            }
        })
    }

    /// Whether any workload's requests may be traced (a cheap check before [`View::tracing`]).
    pub fn traces(&self) -> bool {
        self.traces
    }

    /// Whether any workload's requests may be logged (a cheap check before
    /// [`View::access_logs`]).
    pub fn logs(&self) -> bool {
        self.logs
    }

    /// Where `pod`'s requests are logged at its side (`client`: the source proxy's line, else
    /// the destination's), from the Telemetries and MeshConfig; `None`: nowhere. Found once per
    /// pod and view.
    pub fn access_logs(&self, pod: &Pod, client: bool) -> PodLogs {
        if !self.logs {
            return None;
        }
        once(&self.access_logs, (pod.key.clone(), client), || {
            let mesh = &self.snapshot.mesh_config;
            let found = match telemetry::access_logging(
                &self.telemetries_of(pod),
                &mesh.extension_providers,
                &mesh.default_providers,
                client,
            ) {
                Ok(found) => found,
                Err((found, reason)) => {
                    warn!(pod = %pod.key, side = side(client), "access log provider skipped: {reason}");
                    found
                }
            };
            (!found.is_empty()).then(|| Arc::from(found))
        })
    }

    /// The Telemetries that apply to `pod`, widest first.
    fn telemetries_of(&self, pod: &Pod) -> Vec<&Telemetry> {
        let telemetries: Vec<&Telemetry> =
            self.snapshot.telemetries.values().map(|t| &**t).collect();
        telemetry::applicable(
            telemetries.iter().copied(),
            ROOT_NAMESPACE,
            &pod.key.namespace,
            &pod.labels,
        )
    }

    /// Where a collector named `host` (a Service's name, `name.namespace[.svc[.cluster.local]]`,
    /// optionally after `namespace/`, or an address) on `port` is: a ready endpoint of that Service port. `None`: not a Service
    /// of the cluster, left to the system's resolver.
    pub fn collector(&self, host: &str, port: u16) -> Option<SocketAddr> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Some(SocketAddr::new(ip, port));
        }
        // Istio also accepts `namespace/host`.
        let (namespace, host) = match host.split_once('/') {
            Some((namespace, host)) => (Some(namespace), host),
            None => (None, host),
        };
        let short = host
            .strip_suffix(".svc.cluster.local")
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        let (name, namespace) = match (short.split_once('.'), namespace) {
            (Some((name, ns)), _) => (name, ns),
            (None, Some(ns)) => (short, ns),
            (None, None) => return None,
        };
        let endpoints = self
            .snapshot
            .endpoints
            .get(&ObjectKey::new(namespace, name))?;
        let ready = endpoints.by_port.get(&port)?.iter().find(|e| e.ready)?;
        Some(SocketAddr::from((ready.ip, ready.port)))
    }

    /// The cluster `key` names, as a client in `namespace` sees it (`None`: a client that is
    /// no pod of the mesh). Built on first use in this view.
    pub fn cluster(
        &self,
        states: &Clusters,
        key: &ClusterKey,
        namespace: Option<&Arc<str>>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let slot = (key.clone(), namespace.cloned());
        let failed = match self.built(&slot) {
            Ok(Some(answer)) => return answer,
            Ok(None) => None,
            Err(failed) => Some(failed),
        };
        let built = build(
            &self.snapshot,
            states,
            key,
            namespace.map(|n| &**n),
            failed.as_ref(),
        );
        let mut clusters = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        let entry = clusters.entry(slot).or_insert(built.clone());
        if failed.is_some() {
            *entry = built;
        }
        entry.clone().map_err(|(error, _)| error)
    }
}

impl View {
    /// What this view built for `slot`: `Ok(Some)` the answer it stands by (a cluster, or an
    /// error found less than [`RETRY_FAILED`] ago), `Ok(None)` nothing yet, `Err` a failure
    /// old enough to try again.
    fn built(&self, slot: &ClusterSlot) -> Result<Option<Answer>, (ClusterError, Instant)> {
        match self
            .clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot)
        {
            Some(Ok(cluster)) => Ok(Some(Ok(cluster.clone()))),
            Some(Err((error, at))) if at.elapsed() < RETRY_FAILED => Ok(Some(Err(error.clone()))),
            Some(Err(failed)) => Err(failed.clone()),
            None => Ok(None),
        }
    }

    /// The cluster `key` names for a client in `namespace`, as [`View::cluster`] gives it
    /// (its error included), for an operator's eyes: one no connection asked for is built but
    /// neither kept nor registered, so that inspecting the configuration does not grow the
    /// view or the registry, nor make the next views rebuild clusters no one uses.
    pub fn inspect_cluster(
        &self,
        states: &Clusters,
        key: &ClusterKey,
        namespace: Option<&Arc<str>>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        if let Ok(Some(answer)) = self.built(&(key.clone(), namespace.cloned())) {
            return answer;
        }
        let namespace = namespace.map(|n| &**n);
        compile(&self.snapshot, states, key, namespace, states.peek(key)).map(Arc::new)
    }
}

/// The cluster `key` names for a client in `namespace`, with its DestinationRule's policy.
fn compile(
    snapshot: &Snapshot,
    states: &Clusters,
    key: &ClusterKey,
    namespace: Option<&str>,
    state: Arc<ClusterState>,
) -> Result<Cluster, ClusterError> {
    let policy = cluster::policy_for(snapshot, key, namespace);
    // A rule's files are read only from the directory the operator gave for them.
    if let Some(tls) = &policy.tls {
        crate::tls::origination::check_files(tls, states.tls_files()).map_err(|reason| {
            ClusterError::Tls {
                service: key.service.clone(),
                port: key.port,
                rule: policy.rule.clone(),
                reason: Box::new(reason),
            }
        })?;
    }
    Cluster::build(snapshot, key.clone(), policy, state)
}

fn build(
    snapshot: &Snapshot,
    states: &Clusters,
    key: &ClusterKey,
    namespace: Option<&str>,
    failed: Option<&(ClusterError, Instant)>,
) -> Built {
    let built = compile(snapshot, states, key, namespace, states.state(key)).map(Arc::new);
    built.map_err(|error| {
        // A rule's TLS the proxy may not or cannot set up: the operator has to see it, once.
        if matches!(error, ClusterError::Tls { .. }) && failed.is_none_or(|(f, _)| *f != error) {
            warn!("{error}");
        }
        (error, Instant::now())
    })
}

/// Whether the routes of `old` are all still there in `new`, as the same objects. With the
/// same Services (host resolution, ports, ClusterIPs), the route tables still hold.
fn routes_unchanged(old: &Snapshot, new: &Snapshot) -> bool {
    same_entries(&old.virtual_services, &new.virtual_services)
        && same_entries(&old.http_routes, &new.http_routes)
        && same_entries(&old.grpc_routes, &new.grpc_routes)
}

/// Whether every endpoint of the cluster's service port resolves to the same pod object in
/// both snapshots (subsets, nodes and metric labels come from the pods).
fn pods_unchanged(old: &Snapshot, new: &Snapshot, key: &ClusterKey) -> bool {
    new.endpoints(&key.service, key.port).iter().all(|e| {
        let pod = |s| cluster::endpoint_pod(s, e).map(Arc::as_ptr);
        pod(old) == pod(new)
    })
}

/// Both maps hold the very same objects under the same keys.
fn same_entries<K: Ord + Clone, V>(a: &Map<K, Arc<V>>, b: &Map<K, Arc<V>>) -> bool {
    // Persistent maps share their trees: an untouched kind is the same map, found in O(1).
    a.ptr_eq(b)
        || (a.len() == b.len()
            && a.iter()
                .all(|(k, v)| b.get(k).is_some_and(|w| Arc::ptr_eq(v, w))))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{
        Endpoint, ObjectKey, Pod, Protocol, Service, ServiceEndpoints, ServicePort, TargetPort,
    };

    fn pod(name: &str, ip: [u8; 4], version: &str) -> Arc<Pod> {
        Arc::new(Pod {
            key: ObjectKey::new("default", name),
            uid: None,
            labels: [("version".to_string(), version.to_string())].into(),
            annotations: Default::default(),
            node: Some("n1".into()),
            ip: Some(ip.into()),
            service_account: "default".into(),
            ports: vec![],
            controller: None,
        })
    }

    fn endpoints(pods: &[&Arc<Pod>]) -> Arc<ServiceEndpoints> {
        let list = pods
            .iter()
            .map(|p| Endpoint {
                ip: p.ip.unwrap(),
                port: 8080,
                pod: Some(p.key.clone()),
                node: p.node.clone(),
                ready: true,
            })
            .collect();
        Arc::new(ServiceEndpoints {
            by_port: BTreeMap::from([(80, list)]),
        })
    }

    fn snapshot(services: &[(&str, Arc<ServiceEndpoints>)], pods: &[&Arc<Pod>]) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for p in pods {
            snapshot.pods.insert(p.key.clone(), (*p).clone());
        }
        for (i, (name, eps)) in services.iter().enumerate() {
            let service = Arc::new(Service {
                key: ObjectKey::new("default", name),
                cluster_ip: Some([10, 96, 0, i as u8 + 1].into()),
                ports: vec![ServicePort {
                    name: Some("tcp".into()),
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    protocol: Protocol::Tcp,
                    app_protocol: None,
                }],
                selector: None,
                entry: None,
            });
            snapshot.services.insert(service.key.clone(), service);
            snapshot
                .endpoints
                .insert(ObjectKey::new("default", name), eps.clone());
        }
        snapshot.index();
        snapshot
    }

    fn key(name: &str) -> ClusterKey {
        ClusterKey::new(ObjectKey::new("default", name), 80, None)
    }

    #[test]
    fn an_endpoint_change_rebuilds_only_the_cluster_it_touches() {
        let states = Clusters::default();
        let (a1, a2, b1) = (
            pod("a1", [10, 244, 1, 1], "v1"),
            pod("a2", [10, 244, 1, 2], "v1"),
            pod("b1", [10, 244, 1, 3], "v1"),
        );
        let first = snapshot(
            &[("a", endpoints(&[&a1])), ("b", endpoints(&[&b1]))],
            &[&a1, &a2, &b1],
        );
        let first = View::new(Arc::new(first), None, &states);
        let a = first.cluster(&states, &key("a"), None).unwrap();
        let b = first.cluster(&states, &key("b"), None).unwrap();
        assert_eq!(a.len(), 1);

        // Service a gains an endpoint; everything else is the same object.
        let mut second = (*first.snapshot).clone();
        second
            .endpoints
            .insert(ObjectKey::new("default", "a"), endpoints(&[&a1, &a2]));
        let second = View::new(Arc::new(second), Some(&first), &states);
        assert!(
            Arc::ptr_eq(&first.routes, &second.routes),
            "no route or Service changed: the route tables are reused"
        );
        let b_again = second.cluster(&states, &key("b"), None).unwrap();
        assert!(Arc::ptr_eq(&b, &b_again), "b is untouched and reused");
        let a_again = second.cluster(&states, &key("a"), None).unwrap();
        assert!(!Arc::ptr_eq(&a, &a_again));
        assert_eq!(a_again.len(), 2, "a was rebuilt with its new endpoint");
        // Health and counters are per cluster key, not per build.
        assert!(Arc::ptr_eq(a.state(), a_again.state()));
    }

    #[test]
    fn a_pod_change_rebuilds_the_clusters_of_that_pod() {
        let states = Clusters::default();
        let a1 = pod("a1", [10, 244, 1, 1], "v1");
        let first = View::new(
            Arc::new(snapshot(&[("a", endpoints(&[&a1]))], &[&a1])),
            None,
            &states,
        );
        let a = first.cluster(&states, &key("a"), None).unwrap();
        // The same endpoints, but the pod behind them was relabelled (a subset may change).
        let mut second = (*first.snapshot).clone();
        let relabelled = pod("a1", [10, 244, 1, 1], "v2");
        second.pods.insert(relabelled.key.clone(), relabelled);
        let second = View::new(Arc::new(second), Some(&first), &states);
        let a_again = second.cluster(&states, &key("a"), None).unwrap();
        assert!(!Arc::ptr_eq(&a, &a_again));
        let pick = a_again.pick(None, None, Instant::now()).unwrap();
        assert_eq!(pick.pod.unwrap().version(), "v2");
    }

    #[test]
    fn a_service_change_recompiles_the_routes() {
        let states = Clusters::default();
        let a1 = pod("a1", [10, 244, 1, 1], "v1");
        let first = View::new(
            Arc::new(snapshot(&[("a", endpoints(&[&a1]))], &[&a1])),
            None,
            &states,
        );
        // The same Service, as a new object (its ports or ClusterIP may have changed).
        let mut second = (*first.snapshot).clone();
        let key = ObjectKey::new("default", "a");
        let service = Arc::new((*second.services[&key]).clone());
        second.services.insert(key, service);
        let second = View::new(Arc::new(second), Some(&first), &states);
        assert!(
            !Arc::ptr_eq(&first.routes, &second.routes),
            "a new Service object means new route tables"
        );
    }
}
