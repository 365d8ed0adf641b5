//! Configuration sources: they turn Kubernetes objects into the typed [`model`](crate::model)
//! and publish snapshots through the [`Store`](crate::model::Store).
//!
//! Translation ([`objects`]) and assembly ([`assemble`]) are shared by every source, so a
//! directory of YAML and a cluster produce the same model. A resource that fails validation is
//! rejected alone, with a [`Rejection`] naming the resource and the field; the last good version
//! of it stays in force.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::model::{
    AuthorizationPolicy, DestinationRule, Endpoint, GrpcRoute, HttpRoute, Namespace, Node,
    ObjectKey, PeerAuthentication, Pod, Protocol, Service, ServiceEndpoints, ServiceEntry,
    Snapshot, TargetPort, VirtualService,
};

pub mod file;
pub mod kube;
pub mod objects;
pub mod yaml;

mod gateway;
mod istio;
mod security;
mod validate;

pub use objects::EndpointSlice;

/// The kinds of Kubernetes objects the model is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    AuthorizationPolicy,
    PeerAuthentication,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    /// Namespaces and Nodes are cluster-scoped.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of one resource: kind plus `namespace/name` (empty namespace when cluster-scoped).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: Kind,
    pub key: ObjectKey,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.namespaced() {
            write!(f, "{} {}", self.kind, self.key)
        } else {
            write!(f, "{} {}", self.kind, self.key.name)
        }
    }
}

/// One translated object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    VirtualService(Arc<VirtualService>),
    DestinationRule(Arc<DestinationRule>),
    ServiceEntry(Arc<ServiceEntry>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    PeerAuthentication(Arc<PeerAuthentication>),
    HttpRoute(Arc<HttpRoute>),
    GrpcRoute(Arc<GrpcRoute>),
}

impl Object {
    pub fn id(&self) -> ResourceId {
        let (kind, key) = match self {
            Object::Namespace(n) => (Kind::Namespace, ObjectKey::new("", &n.name)),
            Object::Node(n) => (Kind::Node, ObjectKey::new("", &n.name)),
            Object::Pod(p) => (Kind::Pod, p.key.clone()),
            Object::Service(s) => (Kind::Service, s.key.clone()),
            Object::EndpointSlice(e) => (Kind::EndpointSlice, e.key.clone()),
            Object::VirtualService(v) => (Kind::VirtualService, v.key.clone()),
            Object::DestinationRule(d) => (Kind::DestinationRule, d.key.clone()),
            Object::ServiceEntry(s) => (Kind::ServiceEntry, s.key.clone()),
            Object::AuthorizationPolicy(a) => (Kind::AuthorizationPolicy, a.key.clone()),
            Object::PeerAuthentication(p) => (Kind::PeerAuthentication, p.key.clone()),
            Object::HttpRoute(r) => (Kind::HttpRoute, r.key.clone()),
            Object::GrpcRoute(r) => (Kind::GrpcRoute, r.key.clone()),
        };
        ResourceId { kind, key }
    }
}

/// Why a resource was not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Where the resource came from (`file.yaml:12` for the local source).
    pub origin: String,
    /// The object's kind as written (`Pod`, `Service`...), or `unknown`.
    pub kind: String,
    /// `namespace/name` (or `name` when cluster-scoped), or `unknown`.
    pub name: String,
    /// Path of the offending field (`spec.ports[0].targetPort`).
    pub field: String,
    pub reason: String,
    /// Whether an earlier version of the same resource is still applied.
    pub kept_last_good: bool,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {} rejected: {}: {}",
            self.origin, self.kind, self.name, self.field, self.reason
        )?;
        if self.kept_last_good {
            f.write_str(" (the last good version stays in force)")?;
        }
        Ok(())
    }
}

/// What a source reports besides the snapshot itself (for `/debug/config`).
#[derive(Debug, Default)]
pub struct SourceStatus {
    rejected: ArcSwap<Vec<Rejection>>,
}

impl SourceStatus {
    pub fn rejected(&self) -> Arc<Vec<Rejection>> {
        self.rejected.load_full()
    }

    pub fn set_rejected(&self, rejected: Vec<Rejection>) {
        self.rejected.store(Arc::new(rejected));
    }
}

/// Builds a snapshot from translated objects (duplicates must already be resolved).
///
/// Endpoints of a Service come from its EndpointSlices; a Service without any slice gets
/// endpoints derived from its selector over the pods that have an IP, with named target ports
/// resolved through the pods' container ports, like the Kubernetes endpoints controller does.
/// Only ready endpoints of TCP ports are kept.
pub fn assemble<'a>(
    objects: impl IntoIterator<Item = &'a Object>,
    generation: Option<u64>,
) -> Snapshot {
    let mut snapshot = Snapshot {
        generation,
        ..Snapshot::default()
    };
    let mut slices: HashMap<ObjectKey, Vec<&EndpointSlice>> = HashMap::new();
    for object in objects {
        match object {
            Object::Namespace(n) => {
                snapshot.namespaces.insert(n.name.clone(), n.clone());
            }
            Object::Node(n) => {
                snapshot.nodes.insert(n.name.clone(), n.clone());
            }
            Object::Pod(p) => {
                snapshot.pods.insert(p.key.clone(), Arc::new(p.clone()));
            }
            Object::Service(s) => {
                snapshot.services.insert(s.key.clone(), Arc::new(s.clone()));
            }
            Object::EndpointSlice(e) => {
                let service = ObjectKey {
                    namespace: e.key.namespace.clone(),
                    name: e.service.clone(),
                };
                slices.entry(service).or_default().push(e);
            }
            Object::VirtualService(v) => {
                snapshot.virtual_services.insert(v.key.clone(), v.clone());
            }
            Object::DestinationRule(d) => {
                snapshot.destination_rules.insert(d.key.clone(), d.clone());
            }
            Object::ServiceEntry(s) => {
                snapshot.service_entries.insert(s.key.clone(), s.clone());
            }
            Object::AuthorizationPolicy(a) => {
                snapshot
                    .authorization_policies
                    .insert(a.key.clone(), a.clone());
            }
            Object::PeerAuthentication(p) => {
                snapshot
                    .peer_authentications
                    .insert(p.key.clone(), p.clone());
            }
            Object::HttpRoute(r) => {
                snapshot.http_routes.insert(r.key.clone(), r.clone());
            }
            Object::GrpcRoute(r) => {
                snapshot.grpc_routes.insert(r.key.clone(), r.clone());
            }
        }
    }

    let mut endpoints = HashMap::with_capacity(snapshot.services.len());
    for (key, service) in &snapshot.services {
        let by_port = match slices.get(key) {
            Some(slices) => from_slices(service, slices, &snapshot),
            None => match &service.selector {
                Some(selector) => from_selector(service, selector, &snapshot),
                None => BTreeMap::new(),
            },
        };
        endpoints.insert(key.clone(), Arc::new(ServiceEndpoints { by_port }));
    }
    snapshot.endpoints = endpoints;
    snapshot.index();
    snapshot
}

fn from_slices(
    service: &Service,
    slices: &[&EndpointSlice],
    snapshot: &Snapshot,
) -> BTreeMap<u16, Vec<Endpoint>> {
    let mut by_port = BTreeMap::new();
    for port in service.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
        let mut list: Vec<Endpoint> = Vec::new();
        for slice in slices {
            // A slice port belongs to the service port of the same name.
            let Some(target) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == Protocol::Tcp)
            else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|e| e.ready) {
                let node = ep.node.clone().or_else(|| {
                    ep.pod
                        .as_ref()
                        .and_then(|k| snapshot.pods.get(k))
                        .and_then(|p| p.node.clone())
                });
                for &ip in &ep.addresses {
                    push_unique(
                        &mut list,
                        Endpoint {
                            ip,
                            port: target.port,
                            pod: ep.pod.clone(),
                            node: node.clone(),
                            ready: true,
                        },
                    );
                }
            }
        }
        sort(&mut list);
        by_port.insert(port.port, list);
    }
    by_port
}

fn from_selector(
    service: &Service,
    selector: &crate::model::Labels,
    snapshot: &Snapshot,
) -> BTreeMap<u16, Vec<Endpoint>> {
    let mut selected: Vec<(&Arc<Pod>, Ipv4Addr)> = snapshot
        .pods
        .values()
        .filter(|p| p.key.namespace == service.key.namespace)
        .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .filter_map(|p| p.ip.map(|ip| (p, ip)))
        .collect();
    selected.sort_by_key(|(_, ip)| *ip);

    let mut by_port = BTreeMap::new();
    for port in service.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
        let mut list = Vec::new();
        for (pod, ip) in &selected {
            let target = match &port.target_port {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => pod
                    .ports
                    .iter()
                    .find(|(n, _)| n.as_deref() == Some(&**name))
                    .map(|(_, p)| *p),
            };
            // A pod that does not declare a named target port is not an endpoint of it.
            let Some(target) = target else { continue };
            push_unique(
                &mut list,
                Endpoint {
                    ip: *ip,
                    port: target,
                    pod: Some(pod.key.clone()),
                    node: pod.node.clone(),
                    ready: true,
                },
            );
        }
        sort(&mut list);
        by_port.insert(port.port, list);
    }
    by_port
}

fn push_unique(list: &mut Vec<Endpoint>, endpoint: Endpoint) {
    if !list
        .iter()
        .any(|e| e.ip == endpoint.ip && e.port == endpoint.port)
    {
        list.push(endpoint);
    }
}

/// A stable order, so round robin walks endpoints the same way on every node.
fn sort(list: &mut [Endpoint]) {
    list.sort_by_key(|e| (e.ip, e.port));
}
