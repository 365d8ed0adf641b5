//! The dispatcher: translation of Kubernetes objects, as parsed YAML or JSON, into the model.
//! It reads a document's kind and hands it to the translator of that kind (`core`, `istio`,
//! `gateway`, `security`); only the fields Weft uses are read, everything else is ignored, as
//! the API server would keep it. It also names what translation yields: [`Kind`],
//! [`ResourceId`], [`Object`] and, for a rejected resource, [`Invalid`].

use std::{fmt, sync::Arc};

use super::yaml::Value;
use serde::Serialize;

pub use super::core::{
    is_tls_secret_key, EndpointSlice, SliceEndpoint, SlicePort, SERVICE_NAME_LABEL,
};
use super::{
    core,
    fields::{FieldError, Fields},
    gateway, istio, security, telemetry,
};
use crate::model::{
    policy::{MESH_CONFIG_MAP, ROOT_NAMESPACE},
    telemetry::Telemetry,
    AuthorizationPolicy, DestinationRule, GrpcRoute, HttpRoute, MeshConfig, Namespace, Node,
    ObjectKey, PeerAuthentication, Pod, Service, ServiceEntry, TlsSecret, VirtualService,
};

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
    Secret,
    /// Istio's `istio` ConfigMap of the root namespace.
    MeshConfig,
    Telemetry,
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
            Kind::Secret => "Secret",
            Kind::MeshConfig => "ConfigMap",
            Kind::Telemetry => "Telemetry",
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
    Secret(Arc<TlsSecret>),
    MeshConfig(Arc<MeshConfig>),
    Telemetry(Arc<Telemetry>),
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
            Object::Secret(s) => (Kind::Secret, s.key.clone()),
            Object::MeshConfig(_) => (
                Kind::MeshConfig,
                ObjectKey::new(ROOT_NAMESPACE, MESH_CONFIG_MAP),
            ),
            Object::Telemetry(t) => (Kind::Telemetry, t.key.clone()),
        };
        ResourceId { kind, key }
    }
}

/// `networking.istio.io` and `security.istio.io` versions, one schema for all.
const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// `telemetry.istio.io` versions, one schema for both.
const TELEMETRY_VERSIONS: [&str; 2] = ["v1", "v1alpha1"];
/// Gateway API route versions, one schema for all.
const GATEWAY_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha2"];

fn in_group(api_version: &str, group: &str, versions: &[&str]) -> bool {
    api_version
        .strip_prefix(group)
        .and_then(|v| v.strip_prefix('/'))
        .is_some_and(|v| versions.contains(&v))
}

/// A document that could not be translated: which resource (as far as it could be read) and
/// which field.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    pub kind: Option<String>,
    pub id: Option<ResourceId>,
    /// `namespace/name`, or `name`, as written in the document.
    pub name: Option<String>,
    pub field: String,
    pub reason: String,
    /// What stands in force instead when no earlier version does: a refused
    /// AuthorizationPolicy fails closed
    /// ([`security::refused_authorization_policy`]).
    pub fallback: Option<Object>,
}

/// Translates one document. `Ok(vec![])` for kinds Weft does not use (yet) and for empty
/// documents; a `v1 List` yields its items, each translated on its own.
pub fn translate(doc: &Value) -> Vec<Result<Object, Invalid>> {
    let mut out = Vec::new();
    translate_into(doc, "", &mut out);
    out
}

fn translate_into(doc: &Value, prefix: &str, out: &mut Vec<Result<Object, Invalid>>) {
    if doc.is_null() {
        return;
    }
    let fields = match Fields::root(doc, prefix) {
        Ok(f) => f,
        Err(e) => return out.push(Err(invalid(None, None, None, e))),
    };
    let kind = match fields.required_str("kind") {
        Ok(k) => k,
        Err(e) => return out.push(Err(invalid(None, None, None, e))),
    };
    let api_version = match fields.required_str("apiVersion") {
        Ok(v) => v,
        Err(e) => return out.push(Err(invalid(Some(kind), None, None, e))),
    };
    let known = match (api_version, kind) {
        ("v1", "List") => {
            match fields.list("items") {
                Ok(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        translate_into(item.value, &format!("{prefix}items[{i}]."), out);
                    }
                }
                Err(e) => out.push(Err(invalid(Some(kind), None, None, e))),
            }
            return;
        }
        ("v1", "Namespace") => Kind::Namespace,
        ("v1", "Node") => Kind::Node,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "Service") => Kind::Service,
        ("v1", "Secret") => Kind::Secret,
        // Of ConfigMaps only Istio's MeshConfig.
        ("v1", "ConfigMap") if is_mesh_config(&fields) => Kind::MeshConfig,
        ("discovery.k8s.io/v1" | "discovery.k8s.io/v1beta1", "EndpointSlice") => {
            Kind::EndpointSlice
        }
        (version, kind) if in_group(version, "networking.istio.io", &ISTIO_VERSIONS) => {
            match kind {
                "VirtualService" => Kind::VirtualService,
                "DestinationRule" => Kind::DestinationRule,
                "ServiceEntry" => Kind::ServiceEntry,
                _ => return,
            }
        }
        (version, kind) if in_group(version, "security.istio.io", &ISTIO_VERSIONS) => match kind {
            "AuthorizationPolicy" => Kind::AuthorizationPolicy,
            "PeerAuthentication" => Kind::PeerAuthentication,
            _ => return,
        },
        (version, "Telemetry") if in_group(version, "telemetry.istio.io", &TELEMETRY_VERSIONS) => {
            Kind::Telemetry
        }
        (version, kind) if in_group(version, "gateway.networking.k8s.io", &GATEWAY_VERSIONS) => {
            match kind {
                "HTTPRoute" => Kind::HttpRoute,
                "GRPCRoute" => Kind::GrpcRoute,
                _ => return,
            }
        }
        // Kinds Weft does not use: Gateways, Deployments, ConfigMaps...
        _ => return,
    };

    let (id, name) = identity(&fields, known);
    let result = match known {
        Kind::Namespace => core::namespace(&fields).map(|n| Some(Object::Namespace(n))),
        Kind::Node => core::node(&fields).map(|n| Some(Object::Node(n))),
        Kind::Pod => core::pod(&fields).map(|p| Some(Object::Pod(p))),
        Kind::Service => core::service(&fields).map(|s| Some(Object::Service(s))),
        Kind::EndpointSlice => core::endpoint_slice(&fields).map(|s| s.map(Object::EndpointSlice)),
        Kind::VirtualService => {
            istio::virtual_service(&fields).map(|v| Some(Object::VirtualService(Arc::new(v))))
        }
        Kind::DestinationRule => {
            istio::destination_rule(&fields).map(|d| Some(Object::DestinationRule(Arc::new(d))))
        }
        Kind::ServiceEntry => {
            istio::service_entry(&fields).map(|s| Some(Object::ServiceEntry(Arc::new(s))))
        }
        Kind::AuthorizationPolicy => security::authorization_policy(&fields)
            .map(|a| Some(Object::AuthorizationPolicy(Arc::new(a)))),
        Kind::PeerAuthentication => security::peer_authentication(&fields)
            .map(|p| Some(Object::PeerAuthentication(Arc::new(p)))),
        Kind::HttpRoute => {
            gateway::http_route(&fields).map(|r| Some(Object::HttpRoute(Arc::new(r))))
        }
        Kind::GrpcRoute => {
            gateway::grpc_route(&fields).map(|r| Some(Object::GrpcRoute(Arc::new(r))))
        }
        Kind::Secret => core::secret(&fields).map(|s| s.map(|s| Object::Secret(Arc::new(s)))),
        Kind::MeshConfig => {
            security::mesh_config(&fields).map(|m| Some(Object::MeshConfig(Arc::new(m))))
        }
        Kind::Telemetry => {
            telemetry::telemetry(&fields).map(|t| Some(Object::Telemetry(Arc::new(t))))
        }
    };
    match result {
        Ok(object) => out.extend(object.map(Ok)),
        Err(e) => {
            let mut invalid = invalid(Some(kind), id, name, e);
            if known == Kind::AuthorizationPolicy {
                invalid.fallback = security::refused_authorization_policy(&fields)
                    .map(|p| Object::AuthorizationPolicy(Arc::new(p)));
            }
            out.push(Err(invalid));
        }
    }
}

/// Whether a ConfigMap is Istio's MeshConfig: `istio` in the root namespace.
fn is_mesh_config(fields: &Fields<'_>) -> bool {
    let metadata = fields.obj("metadata").ok().flatten();
    let read = |key| metadata.as_ref().and_then(|m| m.str(key).ok().flatten());
    read("name") == Some(MESH_CONFIG_MAP) && read("namespace") == Some(ROOT_NAMESPACE)
}

/// The identity of a document, read leniently so even a broken document can be named.
fn identity(fields: &Fields<'_>, kind: Kind) -> (Option<ResourceId>, Option<String>) {
    let metadata = fields.obj("metadata").ok().flatten();
    let name = metadata
        .as_ref()
        .and_then(|m| m.str("name").ok().flatten())
        .filter(|n| !n.is_empty());
    let Some(name) = name else {
        return (None, None);
    };
    if kind.namespaced() {
        let namespace = metadata
            .as_ref()
            .and_then(|m| m.str("namespace").ok().flatten())
            .filter(|n| !n.is_empty())
            .unwrap_or("default");
        (
            Some(ResourceId {
                kind,
                key: ObjectKey::new(namespace, name),
            }),
            Some(format!("{namespace}/{name}")),
        )
    } else {
        (
            Some(ResourceId {
                kind,
                key: ObjectKey::new("", name),
            }),
            Some(name.to_owned()),
        )
    }
}

fn invalid(
    kind: Option<&str>,
    id: Option<ResourceId>,
    name: Option<String>,
    e: FieldError,
) -> Invalid {
    Invalid {
        kind: kind.map(str::to_owned),
        id,
        name,
        field: e.field,
        reason: e.reason,
        fallback: None,
    }
}

/// Translates a document that holds exactly one resource (for tests).
#[cfg(test)]
pub(super) fn translate_one(yaml: &str) -> Result<Object, Box<Invalid>> {
    let value: Value = crate::source::yaml::parse(yaml).expect("test YAML parses");
    let mut out = translate(&value);
    assert_eq!(out.len(), 1, "{out:?}");
    out.remove(0).map_err(Box::new)
}

/// Asserts a rejection names the kind, `namespace/name` and field, and says `reason` (for tests).
#[cfg(test)]
pub(super) fn assert_rejected(yaml: &str, kind: &str, name: &str, field: &str, reason: &str) {
    let err = translate_one(yaml).expect_err(yaml);
    assert_eq!(
        (err.kind.as_deref(), err.name.as_deref(), err.field.as_str()),
        (Some(kind), Some(name), field),
        "{yaml}\n{}",
        err.reason
    );
    assert!(
        err.reason.contains(reason),
        "{field}: {:?} lacks {reason:?}",
        err.reason
    );
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Protocol, TargetPort};

    fn one(yaml: &str) -> Result<Object, Box<Invalid>> {
        let value: Value = crate::source::yaml::parse(yaml).unwrap();
        let mut out = translate(&value);
        assert_eq!(out.len(), 1, "{out:?}");
        out.remove(0).map_err(Box::new)
    }

    #[test]
    fn only_istios_config_map_is_read_as_mesh_config() {
        let map = |namespace: &str, name: &str, mesh: &str| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
                 data:\n  mesh: |\n    {mesh}\n"
            )
        };
        let Object::MeshConfig(mesh) = one(&map(
            "istio-system",
            "istio",
            "trustDomainAliases: [old-td, '*.corp']",
        ))
        .unwrap() else {
            panic!()
        };
        let aliases: Vec<&str> = mesh.trust_domain_aliases.iter().map(|a| &**a).collect();
        assert_eq!(aliases, ["old-td", "*.corp"]);
        // Any other ConfigMap is not Weft's business.
        for (namespace, name) in [("default", "istio"), ("istio-system", "istio-sidecar")] {
            let value = crate::source::yaml::parse(&map(namespace, name, "{}")).unwrap();
            assert!(translate(&value).is_empty(), "{namespace}/{name}");
        }
        // No `mesh` key, or an empty one: defaults.
        let bare =
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n";
        assert!(
            matches!(one(bare), Ok(Object::MeshConfig(m)) if m.trust_domain_aliases.is_empty())
        );
        for (mesh, field) in [
            (
                "trustDomainAliases: [a/b]",
                "data.mesh.trustDomainAliases[0]",
            ),
            ("trustDomainAliases: old-td", "data.mesh.trustDomainAliases"),
            ("[unclosed", "data.mesh"),
        ] {
            let err = one(&map("istio-system", "istio", mesh)).unwrap_err();
            assert_eq!(err.field, field, "{mesh}: {}", err.reason);
        }
    }

    #[test]
    fn secrets_yield_only_their_pem_tls_material() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let pem = |label: &str| format!("-----BEGIN {label}-----\nMIIB\n-----END {label}-----\n");
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: db-client, namespace: shop}}\n\
             type: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n  cert: {}\n  \
             password: {}\nstringData:\n  ca.crt: |\n    -----BEGIN CERTIFICATE-----\n    \
             MIIC\n    -----END CERTIFICATE-----\n",
            b64(&pem("CERTIFICATE")),
            b64(&pem("PRIVATE KEY")),
            b64("not pem"),
            b64(&pem("PRIVATE KEY")),
        );
        let Object::Secret(secret) = one(&yaml).unwrap() else {
            panic!()
        };
        assert_eq!(secret.key, ObjectKey::new("shop", "db-client"));
        assert_eq!(secret.cert.as_deref(), Some(&*pem("CERTIFICATE")));
        assert_eq!(secret.private_key.as_deref(), Some(&*pem("PRIVATE KEY")));
        assert!(secret
            .ca
            .as_deref()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\nMIIC"));
        assert_eq!(secret.crl, None);

        // Istio's generic shape, and a Secret of another application (nothing kept).
        let generic = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: api-ca, namespace: shop}}\n\
             data: {{cacert: {}, crl: {}}}\n",
            b64(&pem("CERTIFICATE")),
            b64(&pem("X509 CRL"))
        );
        let Object::Secret(secret) = one(&generic).unwrap() else {
            panic!()
        };
        assert!(secret.ca.is_some() && secret.crl.is_some() && secret.cert.is_none());
        let other = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: app}}\ndata: {{key: {}, token: {}}}\n",
            b64("sk-live-123"),
            b64(&pem("PRIVATE KEY"))
        );
        let value: Value = crate::source::yaml::parse(&other).unwrap();
        assert!(translate(&value).is_empty());

        let bad = "apiVersion: v1\nkind: Secret\nmetadata: {name: db, namespace: shop}\ndata: {tls.crt: '%%%'}\n";
        let err = one(bad).unwrap_err();
        assert_eq!(err.field, "data.tls.crt");
        assert!(err.reason.starts_with("not base64"), "{}", err.reason);
        assert_eq!(err.name.as_deref(), Some("shop/db"));
    }

    #[test]
    fn pod_with_defaults() {
        let Object::Pod(pod) = one(r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-0
  uid: "1234"
  labels: {app: reviews, version: v1}
  annotations: {weft.io/cgroup-path: /sys/fs/cgroup/unified/weft-cluster/n1/pods/default_reviews}
spec:
  nodeName: n1
  containers:
  - name: app
    ports:
    - {name: http, containerPort: 9080}
    - containerPort: 9090
status:
  podIP: 10.244.1.5
"#)
        .expect("a valid pod") else {
            panic!("expected a pod");
        };
        assert_eq!(pod.key, ObjectKey::new("default", "reviews-v1-0"));
        assert_eq!(pod.service_account.as_ref(), "default");
        assert_eq!(pod.node.as_deref(), Some("n1"));
        assert_eq!(pod.ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(pod.ports, vec![(Some("http".into()), 9080), (None, 9090)]);
        assert_eq!(
            pod.workload(),
            "reviews-v1-0",
            "named by hand: its own workload"
        );
    }

    #[test]
    fn numeric_uid_is_rejected_with_its_field() {
        // A uid must be a string in the API; YAML reads an unquoted 1234 as a number.
        let err = one("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns, uid: 1234}\n")
            .unwrap_err();
        assert_eq!(err.field, "metadata.uid");
        assert_eq!(err.kind.as_deref(), Some("Pod"));
        assert_eq!(err.name.as_deref(), Some("ns/p"));
        assert!(err.reason.contains("expected a string"), "{}", err.reason);
    }

    #[test]
    fn service_ports_and_target_ports() {
        let Ok(Object::Service(svc)) = one(r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.12
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: http-alt, appProtocol: http}
  - {port: 9443}
  - {port: 53, protocol: UDP, targetPort: 5353}
"#)
        else {
            panic!("expected a service");
        };
        assert_eq!(svc.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 12)));
        assert_eq!(
            svc.ports[0].target_port,
            TargetPort::Name("http-alt".into())
        );
        assert_eq!(svc.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(svc.ports[1].target_port, TargetPort::Number(9443));
        assert_eq!(svc.ports[2].protocol, Protocol::Udp);
        assert_eq!(svc.ports[2].target_port, TargetPort::Number(5353));
        assert_eq!(svc.hostname(), "reviews.bookinfo.svc.cluster.local");
    }

    #[test]
    fn headless_service_has_no_cluster_ip() {
        let Ok(Object::Service(svc)) =
            one("apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None}\n")
        else {
            panic!("expected a service");
        };
        assert_eq!(svc.cluster_ip, None);
        assert_eq!(svc.selector, None);
    }

    #[test]
    fn bad_fields_are_named() {
        for (yaml, field, reason) in [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: -3}]}",
                "spec.ports[0].targetPort",
                "expected a port number (1-65535) or a port name, found -3",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}",
                "spec.ports[0].port",
                "expected a port number (1-65535), found 70000",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: fd00::1}",
                "spec.clusterIP",
                "expected an IPv4 address",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}, {port: 80}]}",
                "spec.ports[1].port",
                "port 80 is listed twice",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: http}]}]}",
                "spec.containers[0].ports[0].containerPort",
                "expected a port number",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {version: 2}}",
                "metadata.labels.version",
                "values must be strings (quote it), found 2",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.244.1}",
                "status.podIP",
                "expected an IPv4 address",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {namespace: ns}",
                "metadata.name",
                "required",
            ),
            (
                "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: Hostname, address: n1}]}",
                "status.addresses",
                "no InternalIP address",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4",
                "metadata.labels.kubernetes.io/service-name",
                "required",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, protocol: HTTP}]}",
                "spec.ports[0].protocol",
                "expected TCP, UDP or SCTP",
            ),
            ("kind: Pod\nmetadata: {name: p}", "apiVersion", "required"),
            ("- a\n- b\n", "(document)", "expected a mapping"),
        ] {
            let err = one(yaml).unwrap_err();
            assert_eq!(err.field, field, "{yaml}");
            assert!(err.reason.contains(reason), "{yaml}: {}", err.reason);
        }
    }

    #[test]
    fn node_address() {
        let Ok(Object::Node(node)) = one(r#"
apiVersion: v1
kind: Node
metadata: {name: n2}
status:
  addresses:
  - {type: Hostname, address: n2}
  - {type: InternalIP, address: 172.31.0.12}
"#)
        else {
            panic!("expected a node");
        };
        assert_eq!(node.address, Ipv4Addr::new(172, 31, 0, 12));
    }

    #[test]
    fn endpoint_slice() {
        let Ok(Object::EndpointSlice(slice)) = one(r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abc
  namespace: bookinfo
  labels: {kubernetes.io/service-name: reviews}
addressType: IPv4
ports:
- {name: http, port: 9080, protocol: TCP}
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
  nodeName: n1
  targetRef: {kind: Pod, name: reviews-v1-0}
- addresses: [10.244.2.5]
  conditions: {ready: false}
"#)
        else {
            panic!("expected a slice");
        };
        assert_eq!(slice.service.as_ref(), "reviews");
        assert_eq!(slice.ports[0].name.as_deref(), Some("http"));
        assert_eq!(
            slice.endpoints[0].pod,
            Some(ObjectKey::new("bookinfo", "reviews-v1-0"))
        );
        assert!(slice.endpoints[0].ready);
        assert!(!slice.endpoints[1].ready);
    }

    #[test]
    fn ipv6_slices_and_other_kinds_are_ignored() {
        for yaml in [
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, labels: {kubernetes.io/service-name: s}}\naddressType: IPv6",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}",
            // Mesh kinds Weft does not use, and mesh kinds of versions that do not exist.
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {servers: 3}",
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {name: t}",
            "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: vs}\nspec: {hosts: 3}",
            "apiVersion: networking.istio.io.evil/v1\nkind: VirtualService\nmetadata: {name: vs}",
        ] {
            let value: Value = crate::source::yaml::parse(yaml).unwrap();
            assert!(translate(&value).is_empty(), "{yaml}");
        }
        assert!(translate(&Value::Null).is_empty());
    }

    #[test]
    fn list_items_are_translated_one_by_one() {
        let value: Value = crate::source::yaml::parse(
            r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: {weft.io/mesh: enabled}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: {x: [1]}}}
"#,
        )
        .unwrap();
        let out = translate(&value);
        assert_eq!(out.len(), 2);
        let Ok(Object::Namespace(ns)) = &out[0] else {
            panic!("expected a namespace");
        };
        assert!(ns.mesh_enabled());
        let err = out[1].as_ref().unwrap_err();
        assert_eq!(err.field, "items[1].metadata.labels.x");
        assert_eq!(err.name.as_deref(), Some("b"));
    }
}
