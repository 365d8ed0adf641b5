//! Configuration sources: they turn Kubernetes objects into the typed [`model`](crate::model)
//! and publish snapshots through the [`Store`](crate::model::Store).
//!
//! Translation ([`objects`]), the [`Ledger`] of what each origin holds and the incremental
//! [`Assembler`] are shared by every source, so a directory of YAML and a cluster produce the
//! same model. A resource that fails validation is rejected alone, with a [`Rejection`] naming
//! the resource and the field; the last good version of it stays in force ([`ledger`]).

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::model::{
    AuthorizationPolicy, DestinationRule, GrpcRoute, HttpRoute, Namespace, Node, ObjectKey,
    PeerAuthentication, Pod, Service, ServiceEntry, VirtualService,
};

pub mod assemble;
pub mod file;
pub mod kube;
pub mod ledger;
pub mod objects;

mod gateway;
mod istio;
mod security;
mod validate;

pub use assemble::{assemble, Assembler};
pub use ledger::Ledger;
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
