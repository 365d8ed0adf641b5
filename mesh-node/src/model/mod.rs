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

pub mod authz;
pub mod policy;
pub mod telemetry;
pub mod traffic;

pub use policy::{AuthorizationPolicy, MeshConfig, PeerAuthentication};
pub use traffic::{DestinationRule, GrpcRoute, HttpRoute, ServiceEntry, TlsSecret, VirtualService};

/// Namespace label that opts a namespace into the mesh (`enabled`).
pub const MESH_LABEL: &str = "weft.io/mesh";
/// Pod annotation naming the pod's cgroup directory (set by the virtual cluster; in Kubernetes
/// the agent finds the cgroup from the pod UID instead).
pub const CGROUP_ANNOTATION: &str = "weft.io/cgroup-path";

pub type Labels = BTreeMap<String, String>;

/// The map type of a [`Snapshot`]: cloned in O(1), updated in O(log n), diffed in O(changes).
pub type Map<K, V> = imbl::OrdMap<K, V>;

/// Names of `DNS` ServiceEntries → their IPv4 addresses.
pub type Resolved = Map<Arc<str>, Arc<[Ipv4Addr]>>;

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
    /// The owner reference marked `controller`, of a pod whose name was generated
    /// (`metadata.generateName`): what Istio derives the workload name from.
    pub controller: Option<Controller>,
}

/// The controlling owner of a pod (`metadata.ownerReferences[]` with `controller: true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controller {
    pub kind: Arc<str>,
    pub name: Arc<str>,
}

/// Pod label naming its workload explicitly (Istio's `service.istio.io/workload-name`).
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

impl Pod {
    /// The workload name Istio reports (`source_workload`, `destination_workload`): the
    /// [`WORKLOAD_NAME_LABEL`], else the controller of a pod with a generated name (the
    /// Deployment of a ReplicaSet named after its pod template hash, the CronJob of a Job
    /// named `<cronjob>-<8 to 10 digits>`), else the pod's name.
    pub fn workload(&self) -> &str {
        if let Some(name) = self.labels.get(WORKLOAD_NAME_LABEL) {
            return name;
        }
        let Some(controller) = &self.controller else {
            return &self.key.name;
        };
        let name = &*controller.name;
        match &*controller.kind {
            "ReplicaSet" => ["pod-template-hash", "rollouts-pod-template-hash"]
                .iter()
                .filter_map(|label| self.labels.get(*label).filter(|h| !h.is_empty()))
                .find_map(|hash| name.strip_suffix(hash.as_str())?.strip_suffix('-'))
                .unwrap_or(name),
            "ReplicationController" => self
                .labels
                .get("deploymentconfig")
                .filter(|d| !d.is_empty())
                .map_or(name, String::as_str),
            "Job" => cron_job(name).unwrap_or(name),
            _ => name,
        }
    }

    /// Istio's canonical service (`*_canonical_service`): the
    /// `service.istio.io/canonical-name` label, else `app.kubernetes.io/name`, else `app`,
    /// else the workload name.
    pub fn canonical_service(&self) -> &str {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|label| self.labels.get(*label).filter(|v| !v.is_empty()))
        .map_or_else(|| self.workload(), String::as_str)
    }

    /// Istio's canonical revision (`*_canonical_revision`): the
    /// `service.istio.io/canonical-revision` label, else `app.kubernetes.io/version`, else
    /// `version`, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        [
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|label| self.labels.get(*label).filter(|v| !v.is_empty()))
        .map_or("latest", String::as_str)
    }

    pub fn version(&self) -> &str {
        self.labels
            .get("version")
            .map(String::as_str)
            .unwrap_or("unknown")
    }

    pub fn opted_out(&self) -> bool {
        self.labels.get(MESH_LABEL).map(String::as_str) == Some("disabled")
    }
}

/// The CronJob a Job was started by, from the Job's name: `<cronjob>-<8 to 10 digits>` (the
/// scheduled time in minutes), as Istio reads it.
fn cron_job(job: &str) -> Option<&str> {
    let (cron, stamp) = job.rsplit_once('-')?;
    let timestamp = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (timestamp && !cron.is_empty()).then_some(cron)
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
    /// Set for a host of a `ServiceEntry`, whose key is then `entry namespace/host`.
    pub entry: Option<Arc<EntryHost>>,
}

impl ServicePort {
    /// The port of `pod` this Service port reaches: its number, or the container port the pod
    /// names so; `None` when the pod declares no port of that name (it is no endpoint of it).
    pub fn target_on(&self, pod: &Pod) -> Option<u16> {
        match &self.target_port {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => pod
                .ports
                .iter()
                .find(|(n, _)| n.as_deref() == Some(&**name))
                .map(|(_, p)| *p),
        }
    }
}

/// Whether `labels` carry every label of `selector`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Service {
    /// The pods of `pods` the Service's selector selects, in key order (none without one).
    pub fn selected<'p>(
        &'p self,
        pods: &'p Map<ObjectKey, Arc<Pod>>,
    ) -> impl Iterator<Item = &'p Arc<Pod>> + 'p {
        // Pods are ordered by namespace first: the service's namespace is one range.
        let namespace = &self.key.namespace;
        let selector = self.selector.as_ref();
        pods.range(ObjectKey::new(namespace, "")..)
            .take_while(move |(k, _)| k.namespace == *namespace)
            .map(|(_, p)| p)
            .filter(move |p| selector.is_some_and(|s| selects(s, &p.labels)))
    }

    /// `name.namespace.svc.cluster.local`, as Istio's `destination_service` label; the host
    /// itself for a ServiceEntry host.
    pub fn hostname(&self) -> String {
        match &self.entry {
            Some(_) => self.key.name.to_string(),
            None => format!("{}.{}.svc.cluster.local", self.key.name, self.key.namespace),
        }
    }
}

/// What a host of a `ServiceEntry` brings beyond a Service: how its endpoints are found.
///
/// Each host of an entry is a Service of the model (Istio builds one service per host too),
/// keyed `namespace/host`, with the entry's ports; its endpoints are the entry's `endpoints`
/// (`STATIC`), the addresses its host or endpoint names resolve to (`DNS`,
/// `DNS_ROUND_ROBIN`), or none (`NONE`: connections go where the client dialled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHost {
    /// The `ServiceEntry` the host comes from.
    pub entry: ObjectKey,
    pub resolution: traffic::Resolution,
    pub location: traffic::MeshLocation,
    pub endpoints: Arc<[traffic::WorkloadEndpoint]>,
    /// The entry's `addresses`: what clients dial for it (never a Service's ClusterIP: a
    /// Kubernetes Service keeps its address whatever an entry claims).
    pub addresses: Arc<[Ipv4Addr]>,
    pub export_to: Arc<[Arc<str>]>,
    /// Port number → (port name, the endpoints' port unless an endpoint names its own).
    pub ports: Arc<[(u16, Arc<str>, u16)]>,
}

impl EntryHost {
    /// Visible to clients of `namespace` (`exportTo` empty or `*`, `.` for the entry's own
    /// namespace, or the namespace itself); `None` is a client outside the mesh.
    pub fn exported_to(&self, namespace: Option<&str>) -> bool {
        self.export_to.is_empty()
            || self.export_to.iter().any(|e| {
                &**e == "*"
                    || Some(&**e) == namespace
                    || (&**e == "." && Some(&*self.entry.namespace) == namespace)
            })
    }

    /// The names a resolver has to look up for this host (`DNS` resolutions only): the
    /// host itself when the entry lists no endpoints, else the endpoints that are names.
    pub fn dns_names<'a>(&'a self, host: &'a str) -> Vec<&'a str> {
        if !matches!(
            self.resolution,
            traffic::Resolution::Dns | traffic::Resolution::DnsRoundRobin
        ) {
            return Vec::new();
        }
        if self.endpoints.is_empty() {
            return vec![host];
        }
        self.endpoints
            .iter()
            .map(|e| &*e.address)
            .filter(|a| {
                !a.is_empty() && a.parse::<Ipv4Addr>().is_err() && !a.starts_with("unix://")
            })
            .collect()
    }

    /// The endpoints by service port, with names looked up in `resolved` (a name not there
    /// yet has no address). IPv6 and unix-socket endpoints are left out: the data path is
    /// IPv4.
    pub fn endpoints_by_port(
        &self,
        host: &str,
        resolved: &Resolved,
    ) -> BTreeMap<u16, Vec<Endpoint>> {
        let addresses = |name: &str| -> Vec<Ipv4Addr> {
            let mut found = match name.parse::<Ipv4Addr>() {
                Ok(ip) => vec![ip],
                Err(_) if self.resolution == traffic::Resolution::Static => Vec::new(),
                Err(_) => resolved.get(name).map(|a| a.to_vec()).unwrap_or_default(),
            };
            // A name resolving to the node's own loopback or to link-local addresses (a
            // cloud's metadata service) would have the node proxy connect there for a tenant.
            found.retain(|ip| !node_local(*ip));
            found
        };
        let mut by_port = BTreeMap::new();
        if self.resolution == traffic::Resolution::None {
            return by_port;
        }
        for (number, name, target) in self.ports.iter() {
            let mut list = Vec::new();
            if self.endpoints.is_empty() {
                for ip in addresses(host) {
                    list.push(Endpoint::external(ip, *target));
                }
            }
            for e in self.endpoints.iter() {
                let port = e.ports.get(name).copied().unwrap_or(*target);
                for ip in addresses(&e.address) {
                    list.push(Endpoint::external(ip, port));
                }
            }
            by_port.insert(*number, list);
        }
        by_port
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

impl Endpoint {
    /// An endpoint outside the cluster's pods (a ServiceEntry's).
    pub fn external(ip: Ipv4Addr, port: u16) -> Self {
        Self {
            ip,
            port,
            pod: None,
            node: None,
            ready: true,
        }
    }
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
    /// Secrets with TLS material, for DestinationRules' `credentialName`.
    pub secrets: Map<ObjectKey, Arc<TlsSecret>>,
    /// The mesh-wide settings of Istio's `istio` ConfigMap (root namespace, key `mesh`).
    pub mesh_config: Arc<MeshConfig>,
    /// `telemetry.istio.io` Telemetries: tracing and access logging by mesh, namespace and
    /// workload.
    pub telemetries: Map<ObjectKey, Arc<telemetry::Telemetry>>,
    /// Indexes by address: kept in step by the incremental assembler, rebuilt by
    /// [`Snapshot::index`] for snapshots filled by hand.
    pub pods_by_ip: Map<Ipv4Addr, ObjectKey>,
    pub services_by_ip: Map<Ipv4Addr, ObjectKey>,
    /// What the names of `DNS` ServiceEntries resolve to (IPv4), as the [`Store`]'s resolver
    /// last saw it; the endpoints of those entries' hosts follow it.
    pub resolved: Resolved,
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

    /// The Service of a ServiceEntry host as a client of `namespace` sees it: the entry of
    /// its own namespace, else the first (by namespace) exported to it.
    pub fn entry_service(&self, host: &str, namespace: Option<&str>) -> Option<&Arc<Service>> {
        let visible =
            |s: &&Arc<Service>| s.entry.as_ref().is_some_and(|e| e.exported_to(namespace));
        if let Some(own) = namespace.and_then(|ns| self.services.get(&ObjectKey::new(ns, host))) {
            if own.entry.is_some() {
                return Some(own);
            }
        }
        self.service_entries
            .values()
            .filter(|e| e.hosts.iter().any(|h| &**h == host))
            .filter_map(|e| self.services.get(&ObjectKey::new(&e.key.namespace, host)))
            .find(visible)
    }

    /// The ServiceEntry host a client of `namespace` reaches by dialling `addr`: an entry
    /// exported to that namespace, declaring the port, whose `addresses` or endpoints hold
    /// the address (first by entry key). O(entries). Addresses of Services and of meshed
    /// pods are never an entry's: the caller asks only for other addresses.
    pub fn entry_for(
        &self,
        addr: std::net::SocketAddrV4,
        namespace: Option<&str>,
    ) -> Option<&Arc<Service>> {
        self.service_entries
            .values()
            .flat_map(|e| e.hosts.iter().map(|h| ObjectKey::new(&e.key.namespace, h)))
            .filter_map(|key| self.services.get(&key))
            .find(|s| {
                let Some(entry) = &s.entry else {
                    return false;
                };
                entry.exported_to(namespace)
                    && s.ports.iter().any(|p| p.port == addr.port())
                    && (entry.addresses.contains(addr.ip())
                        || self
                            .endpoints(&s.key, addr.port())
                            .iter()
                            .any(|e| e.ip == *addr.ip()))
            })
    }

    /// Every name the `DNS` ServiceEntries need resolved.
    pub fn dns_names(&self) -> std::collections::BTreeSet<Arc<str>> {
        let mut names = std::collections::BTreeSet::new();
        for entry in self.service_entries.values() {
            for host in entry.hosts.iter() {
                let key = ObjectKey::new(&entry.key.namespace, host);
                if let Some(e) = self.services.get(&key).and_then(|s| s.entry.as_ref()) {
                    names.extend(e.dns_names(host).into_iter().map(Arc::from));
                }
            }
        }
        names
    }

    /// Replaces the endpoints of every `DNS` entry host by what `resolved` says, keeping the
    /// `Arc` of those that did not change. O(entries).
    fn apply_resolution(&mut self, resolved: Resolved, previous: &Snapshot) {
        self.resolved = resolved;
        let hosts: Vec<ObjectKey> = self
            .service_entries
            .values()
            .filter(|e| {
                matches!(
                    e.resolution,
                    traffic::Resolution::Dns | traffic::Resolution::DnsRoundRobin
                )
            })
            .flat_map(|e| e.hosts.iter().map(|h| ObjectKey::new(&e.key.namespace, h)))
            .collect();
        for key in hosts {
            let Some(entry) = self.services.get(&key).and_then(|s| s.entry.clone()) else {
                continue;
            };
            let by_port = entry.endpoints_by_port(&key.name, &self.resolved);
            let endpoints = match previous.endpoints.get(&key) {
                Some(e) if e.by_port == by_port => e.clone(),
                _ => Arc::new(ServiceEndpoints { by_port }),
            };
            self.endpoints.insert(key, endpoints);
        }
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
///
/// Two writers feed it: the configuration source ([`Store::publish`]) and the resolver of
/// `DNS` ServiceEntries ([`Store::set_resolved`]); every snapshot carries the latest of both.
#[derive(Clone)]
pub struct Store {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    /// Held while publishing, so the two writers do not undo each other.
    resolved: Arc<std::sync::Mutex<Resolved>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self {
            tx: Arc::new(tx),
            resolved: Arc::default(),
        }
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
        let resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.tx.borrow().clone();
        snapshot.apply_resolution(resolved.clone(), &previous);
        snapshot.version = previous.version + 1;
        let version = snapshot.version;
        self.tx.send_replace(Arc::new(snapshot));
        version
    }

    /// Publishes what the names of `DNS` ServiceEntries resolve to, when it changed: the
    /// current snapshot again, with those entries' endpoints following it.
    pub fn set_resolved(&self, addresses: Resolved) -> Option<u64> {
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if *resolved == addresses {
            return None;
        }
        *resolved = addresses.clone();
        let previous = self.tx.borrow().clone();
        let mut snapshot = (*previous).clone();
        snapshot.apply_resolution(addresses, &previous);
        snapshot.version = previous.version + 1;
        let version = snapshot.version;
        self.tx.send_replace(Arc::new(snapshot));
        Some(version)
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

/// Addresses a node proxy must never connect to on a tenant's behalf: its own loopback (where
/// the node's admin port answers), "this host", and link-local (a cloud's metadata service).
pub fn node_local(ip: Ipv4Addr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || ip.is_link_local()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)], controller: Option<(&str, &str)>) -> Pod {
        Pod {
            key: ObjectKey::new("bookinfo", name),
            uid: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Labels::new(),
            node: None,
            ip: None,
            service_account: "default".into(),
            ports: Vec::new(),
            controller: controller.map(|(kind, name)| Controller {
                kind: kind.into(),
                name: name.into(),
            }),
        }
    }

    #[test]
    fn workload_names_follow_istio() {
        let deployment = pod(
            "reviews-v2-6cb6ccd848-qs6vn",
            &[("app", "reviews"), ("pod-template-hash", "6cb6ccd848")],
            Some(("ReplicaSet", "reviews-v2-6cb6ccd848")),
        );
        assert_eq!(deployment.workload(), "reviews-v2");
        // A ReplicaSet of its own (no hash of a template in its name) is the workload.
        let replica_set = pod(
            "cache-x2x9k",
            &[("pod-template-hash", "abc")],
            Some(("ReplicaSet", "cache")),
        );
        assert_eq!(replica_set.workload(), "cache");
        let cron = pod(
            "backup-28735140-7xq2z",
            &[],
            Some(("Job", "backup-28735140")),
        );
        assert_eq!(cron.workload(), "backup");
        let job = pod("migrate-7xq2z", &[], Some(("Job", "migrate-1234567")));
        assert_eq!(
            job.workload(),
            "migrate-1234567",
            "7 digits: not a CronJob's"
        );
        let stateful = pod("db-0", &[], Some(("StatefulSet", "db")));
        assert_eq!(stateful.workload(), "db");
        let config = pod(
            "web-3-abcde",
            &[("deploymentconfig", "web")],
            Some(("ReplicationController", "web-3")),
        );
        assert_eq!(config.workload(), "web");
        // A pod named by hand (no controller kept: its name was not generated) is its own.
        assert_eq!(
            pod("reviews-v2", &[("app", "reviews")], None).workload(),
            "reviews-v2"
        );
        let labelled = pod(
            "reviews-v2-6cb6ccd848-qs6vn",
            &[("service.istio.io/workload-name", "reviews-canary")],
            Some(("ReplicaSet", "reviews-v2-6cb6ccd848")),
        );
        assert_eq!(labelled.workload(), "reviews-canary");
    }

    #[test]
    fn canonical_service_and_revision_follow_istio() {
        let bare = pod("ratings-v1", &[], None);
        assert_eq!(bare.canonical_service(), "ratings-v1", "the workload name");
        assert_eq!(bare.canonical_revision(), "latest");
        let app = pod("ratings-v1", &[("app", "ratings"), ("version", "v1")], None);
        assert_eq!(
            (app.canonical_service(), app.canonical_revision()),
            ("ratings", "v1")
        );
        let recommended = pod(
            "ratings-v1",
            &[
                ("app", "ratings"),
                ("version", "v1"),
                ("app.kubernetes.io/name", "ratings-api"),
                ("app.kubernetes.io/version", "1.2"),
            ],
            None,
        );
        assert_eq!(
            (
                recommended.canonical_service(),
                recommended.canonical_revision()
            ),
            ("ratings-api", "1.2")
        );
        let canonical = pod(
            "ratings-v1",
            &[
                ("app.kubernetes.io/name", "ratings-api"),
                ("service.istio.io/canonical-name", "ratings"),
                ("service.istio.io/canonical-revision", "stable"),
            ],
            None,
        );
        assert_eq!(
            (
                canonical.canonical_service(),
                canonical.canonical_revision()
            ),
            ("ratings", "stable")
        );
    }
}
