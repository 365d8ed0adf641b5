//! The typed, immutable model every consumer reads.
//!
//! Sources (Kubernetes watchers, a directory of YAML) translate API objects into a [`Snapshot`];
//! the [`Store`] publishes each new snapshot with a version number; the proxy and the eBPF sync
//! read the latest one without taking a lock per request. Nothing here knows where the objects
//! came from or who consumes them.
//!
//! The maps of a snapshot are persistent ([`Map`], a B-tree with structural sharing): the next
//! snapshot is the previous one with a few entries replaced, so publishing costs what changed,
//! not what the cluster holds, and consumers compare two snapshots in the same time
//! ([`Map::diff`] skips the subtrees both share). Unchanged objects keep their `Arc`, so
//! `Arc::ptr_eq` tells a consumer what it may keep from the previous snapshot.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use tokio::sync::watch;

pub mod policy;
pub mod traffic;

pub use policy::{AuthorizationPolicy, PeerAuthentication};
pub use traffic::{DestinationRule, GrpcRoute, HttpRoute, ServiceEntry, VirtualService};

/// Namespace label that opts a namespace into the mesh (`enabled`).
pub const MESH_LABEL: &str = "weft.io/mesh";
/// Pod annotation naming the pod's cgroup directory (set by the virtual cluster; in Kubernetes
/// the agent finds the cgroup from the pod UID instead).
pub const CGROUP_ANNOTATION: &str = "weft.io/cgroup-path";

pub type Labels = BTreeMap<String, String>;

/// The map type of a [`Snapshot`]: cloned in O(1), updated in O(log n), diffed in O(changes).
pub type Map<K, V> = imbl::OrdMap<K, V>;

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: Arc<str>,
    pub labels: Labels,
}

impl Namespace {
    pub fn mesh_enabled(&self) -> bool {
        self.labels.get(MESH_LABEL).map(String::as_str) == Some("enabled")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: Arc<str>,
    /// The address other nodes reach this node's proxy on (tunnel port 15008).
    pub address: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjectKey,
    pub uid: Option<Arc<str>>,
    pub labels: Labels,
    pub annotations: Labels,
    pub node: Option<Arc<str>>,
    pub ip: Option<Ipv4Addr>,
    pub service_account: Arc<str>,
    /// Declared container ports (name, port).
    pub ports: Vec<(Option<Arc<str>>, u16)>,
}

impl Pod {
    /// The workload name Istio reports: the `app` label, else the pod name.
    pub fn workload(&self) -> &str {
        self.labels
            .get("app")
            .map(String::as_str)
            .unwrap_or(&self.key.name)
    }

    pub fn version(&self) -> &str {
        self.labels
            .get("version")
            .map(String::as_str)
            .unwrap_or("unknown")
    }

    fn opted_out(&self) -> bool {
        self.labels.get(MESH_LABEL).map(String::as_str) == Some("disabled")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(Arc<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<Arc<str>>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
    pub app_protocol: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `None` for a Service without selector (endpoints come from EndpointSlices only).
    pub selector: Option<Labels>,
}

impl Service {
    /// `name.namespace.svc.cluster.local`, as Istio's `destination_service` label.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.key.name, self.key.namespace)
    }
}

/// One address behind a service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The pod behind the address, when known.
    pub pod: Option<ObjectKey>,
    pub node: Option<Arc<str>>,
    pub ready: bool,
}

/// Endpoints of one Service, from its EndpointSlices (or derived from its selector).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceEndpoints {
    /// Keyed by service port number.
    pub by_port: BTreeMap<u16, Vec<Endpoint>>,
}

/// An immutable, versioned view of the whole configuration.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Incremented by the [`Store`] on every publish.
    pub version: u64,
    /// Generation marker of the source, if it has one (the local source reads it from a
    /// `generation` file so tools can wait for a change to be applied).
    pub generation: Option<u64>,
    pub namespaces: Map<Arc<str>, Namespace>,
    pub nodes: Map<Arc<str>, Node>,
    pub pods: Map<ObjectKey, Arc<Pod>>,
    pub services: Map<ObjectKey, Arc<Service>>,
    pub endpoints: Map<ObjectKey, Arc<ServiceEndpoints>>,
    pub virtual_services: Map<ObjectKey, Arc<VirtualService>>,
    pub destination_rules: Map<ObjectKey, Arc<DestinationRule>>,
    pub service_entries: Map<ObjectKey, Arc<ServiceEntry>>,
    pub authorization_policies: Map<ObjectKey, Arc<AuthorizationPolicy>>,
    pub peer_authentications: Map<ObjectKey, Arc<PeerAuthentication>>,
    /// Gateway API routes, including those whose parents are Gateways rather than Services.
    pub http_routes: Map<ObjectKey, Arc<HttpRoute>>,
    pub grpc_routes: Map<ObjectKey, Arc<GrpcRoute>>,
    /// Indexes by address: kept in step by the incremental assembler, rebuilt by
    /// [`Snapshot::index`] for snapshots filled by hand.
    pub pods_by_ip: Map<Ipv4Addr, ObjectKey>,
    pub services_by_ip: Map<Ipv4Addr, ObjectKey>,
}

impl Snapshot {
    /// Rebuilds the lookup indexes from the maps, for a snapshot filled by hand (the sources'
    /// assembler keeps them current as it goes). O(pods + services).
    pub fn index(&mut self) {
        // Where two objects share an address (a terminating pod and its successor), the
        // smallest key wins, as in the assembler.
        let mut pods_by_ip = Map::new();
        for (k, p) in &self.pods {
            if let Some(ip) = p.ip {
                pods_by_ip.entry(ip).or_insert_with(|| k.clone());
            }
        }
        let mut services_by_ip = Map::new();
        for (k, s) in &self.services {
            if let Some(ip) = s.cluster_ip {
                services_by_ip.entry(ip).or_insert_with(|| k.clone());
            }
        }
        self.pods_by_ip = pods_by_ip;
        self.services_by_ip = services_by_ip;
    }

    /// Whether a pod's traffic goes through the mesh: its namespace carries
    /// `weft.io/mesh=enabled` and the pod does not carry `weft.io/mesh=disabled`.
    pub fn is_meshed(&self, pod: &Pod) -> bool {
        !pod.opted_out()
            && self
                .namespaces
                .get(&pod.key.namespace)
                .is_some_and(Namespace::mesh_enabled)
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Pod>> {
        self.pods_by_ip.get(&ip).and_then(|k| self.pods.get(k))
    }

    pub fn service_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Service>> {
        self.services_by_ip
            .get(&ip)
            .and_then(|k| self.services.get(k))
    }

    /// Ready endpoints of `service` for service port `port`.
    pub fn endpoints(&self, service: &ObjectKey, port: u16) -> &[Endpoint] {
        self.endpoints
            .get(service)
            .and_then(|e| e.by_port.get(&port))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Publishes snapshots to every consumer. Cloning is cheap; readers never block writers.
#[derive(Clone)]
pub struct Store {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self { tx: Arc::new(tx) }
    }

    /// Stamps `snapshot` with the next version and makes it current, rebuilding its indexes
    /// first (for snapshots filled by hand; see [`Store::publish_indexed`]).
    pub fn publish(&self, mut snapshot: Snapshot) -> u64 {
        snapshot.index();
        self.publish_indexed(snapshot)
    }

    /// Like [`Store::publish`], for a snapshot whose indexes are current (the assembler's):
    /// O(1) whatever the size of the snapshot.
    pub fn publish_indexed(&self, mut snapshot: Snapshot) -> u64 {
        let version = self.tx.borrow().version + 1;
        snapshot.version = version;
        self.tx.send_replace(Arc::new(snapshot));
        version
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}

/// What the data path asks the capture layer: "the client at this address dialled what?".
/// `socket` is the accepted connection: the eBPF capture answers from a map keyed by `client`,
/// a sidecar's `REDIRECT` capture from the socket itself (`SO_ORIGINAL_DST`).
pub trait OriginalDst: Send + Sync + 'static {
    fn lookup(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
        client: std::net::SocketAddrV4,
    ) -> Option<std::net::SocketAddrV4>;
}
