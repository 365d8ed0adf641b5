//! Translation of Kubernetes objects, as parsed YAML or JSON, into the model.
//!
//! Every accessor knows the path of the field it reads, so a rejection can say exactly what to
//! fix (`spec.ports[1].targetPort: expected a port number (1-65535) or a port name`). Only the
//! fields Weft uses are read; everything else is ignored, as the API server would keep it.

use std::{net::Ipv4Addr, sync::Arc};

use super::yaml::{Mapping, Value};
use super::{gateway, istio, security, Kind, Object};
use crate::model::{
    Labels, Namespace, Node, ObjectKey, Pod, Protocol, Service, ServicePort, TargetPort,
    CGROUP_ANNOTATION,
};

/// Label of an EndpointSlice naming the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A `discovery.k8s.io/v1` EndpointSlice (IPv4 only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// Name of the Service (same namespace) the slice belongs to.
    pub service: Arc<str>,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Matches the name of the Service port (`None` for an unnamed port).
    pub name: Option<Arc<str>>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
    pub node: Option<Arc<str>>,
    pub pod: Option<ObjectKey>,
}

/// `networking.istio.io` and `security.istio.io` versions, one schema for all.
const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub kind: Option<String>,
    pub id: Option<super::ResourceId>,
    /// `namespace/name`, or `name`, as written in the document.
    pub name: Option<String>,
    pub field: String,
    pub reason: String,
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
        Kind::Namespace => namespace(&fields).map(|n| Some(Object::Namespace(n))),
        Kind::Node => node(&fields).map(|n| Some(Object::Node(n))),
        Kind::Pod => pod(&fields).map(|p| Some(Object::Pod(p))),
        Kind::Service => service(&fields).map(|s| Some(Object::Service(s))),
        Kind::EndpointSlice => endpoint_slice(&fields).map(|s| s.map(Object::EndpointSlice)),
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
    };
    match result {
        Ok(object) => out.extend(object.map(Ok)),
        Err(e) => out.push(Err(invalid(Some(kind), id, name, e))),
    }
}

/// The identity of a document, read leniently so even a broken document can be named.
fn identity(fields: &Fields<'_>, kind: Kind) -> (Option<super::ResourceId>, Option<String>) {
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
            Some(super::ResourceId {
                kind,
                key: ObjectKey::new(namespace, name),
            }),
            Some(format!("{namespace}/{name}")),
        )
    } else {
        (
            Some(super::ResourceId {
                kind,
                key: ObjectKey::new("", name),
            }),
            Some(name.to_owned()),
        )
    }
}

fn invalid(
    kind: Option<&str>,
    id: Option<super::ResourceId>,
    name: Option<String>,
    e: FieldError,
) -> Invalid {
    Invalid {
        kind: kind.map(str::to_owned),
        id,
        name,
        field: e.field,
        reason: e.reason,
    }
}

pub(super) struct Metadata {
    pub(super) namespace: Arc<str>,
    pub(super) name: Arc<str>,
    uid: Option<Arc<str>>,
    labels: Labels,
    annotations: Labels,
}

pub(super) fn metadata(fields: &Fields<'_>, namespaced: bool) -> Result<Metadata, FieldError> {
    let meta = fields.required_obj("metadata")?;
    let name = meta.required_str("name")?;
    if name.is_empty() || name.contains('/') {
        return Err(meta.error("name", "must be a non-empty name without '/'"));
    }
    let namespace = if namespaced {
        match meta.str("namespace")? {
            Some("") | None => "default",
            Some(ns) if ns.contains('/') => {
                return Err(meta.error("namespace", "must be a name without '/'"))
            }
            Some(ns) => ns,
        }
    } else {
        ""
    };
    Ok(Metadata {
        namespace: namespace.into(),
        name: name.into(),
        uid: meta.str("uid")?.filter(|u| !u.is_empty()).map(Into::into),
        labels: meta.labels("labels")?,
        annotations: meta.labels("annotations")?,
    })
}

fn namespace(fields: &Fields<'_>) -> Result<Namespace, FieldError> {
    let meta = metadata(fields, false)?;
    Ok(Namespace {
        name: meta.name,
        labels: meta.labels,
    })
}

fn node(fields: &Fields<'_>) -> Result<Node, FieldError> {
    let meta = metadata(fields, false)?;
    let status = fields.obj("status")?;
    let mut address = None;
    if let Some(status) = &status {
        for entry in status.list("addresses")? {
            if entry.str("type")? == Some("InternalIP") {
                if let Some(ip) = entry.ipv4("address")? {
                    address = Some(ip);
                    break;
                }
            }
        }
    }
    let address = address.ok_or_else(|| FieldError {
        field: fields.path("status.addresses"),
        reason: "no InternalIP address: other nodes could not reach this node's tunnel port".into(),
    })?;
    Ok(Node {
        name: meta.name,
        address,
    })
}

fn pod(fields: &Fields<'_>) -> Result<Pod, FieldError> {
    let meta = metadata(fields, true)?;
    if let Some(path) = meta.annotations.get(CGROUP_ANNOTATION) {
        if !path.starts_with('/') {
            return Err(FieldError {
                field: fields.path(&format!("metadata.annotations.{CGROUP_ANNOTATION}")),
                reason: format!("must be an absolute cgroup path, found {path:?}"),
            });
        }
    }
    let spec = fields.obj("spec")?;
    let mut node = None;
    let mut service_account: Arc<str> = "default".into();
    let mut ports = Vec::new();
    if let Some(spec) = &spec {
        node = spec
            .str("nodeName")?
            .filter(|n| !n.is_empty())
            .map(Into::into);
        // `serviceAccount` is the deprecated spelling; Kubernetes still fills it in.
        if let Some(sa) = spec
            .str("serviceAccountName")?
            .or(spec.str("serviceAccount")?)
            .filter(|s| !s.is_empty())
        {
            service_account = sa.into();
        }
        for container in spec.list("containers")? {
            for port in container.list("ports")? {
                let number = port.required_port("containerPort")?;
                let name = port.str("name")?.filter(|n| !n.is_empty()).map(Into::into);
                ports.push((name, number));
            }
        }
    }
    let ip = match fields.obj("status")? {
        Some(status) => status.ipv4("podIP")?,
        None => None,
    };
    Ok(Pod {
        key: ObjectKey {
            namespace: meta.namespace,
            name: meta.name,
        },
        uid: meta.uid,
        labels: meta.labels,
        annotations: meta.annotations,
        node,
        ip,
        service_account,
        ports,
    })
}

fn service(fields: &Fields<'_>) -> Result<Service, FieldError> {
    let meta = metadata(fields, true)?;
    let spec = fields.obj("spec")?;
    let mut cluster_ip = None;
    let mut selector = None;
    let mut ports: Vec<ServicePort> = Vec::new();
    if let Some(spec) = &spec {
        cluster_ip = match spec.str("clusterIP")? {
            // Headless services have no virtual IP to capture.
            None | Some("") | Some("None") => None,
            Some(_) => spec.ipv4("clusterIP")?,
        };
        let labels = spec.labels("selector")?;
        // An empty selector selects nothing (Kubernetes leaves such endpoints to the user).
        selector = (!labels.is_empty()).then_some(labels);
        for (i, port) in spec.list("ports")?.into_iter().enumerate() {
            let number = port.required_port("port")?;
            let protocol = port.protocol("protocol")?;
            let target_port = match port.get("targetPort") {
                None => TargetPort::Number(number),
                Some(value) => target_port(value).ok_or_else(|| {
                    port.error(
                        "targetPort",
                        format!(
                            "expected a port number (1-65535) or a port name, found {}",
                            show(value)
                        ),
                    )
                })?,
            };
            if ports
                .iter()
                .any(|p| p.port == number && p.protocol == protocol)
            {
                return Err(FieldError {
                    field: spec.path(&format!("ports[{i}].port")),
                    reason: format!("port {number} is listed twice"),
                });
            }
            ports.push(ServicePort {
                name: port.str("name")?.filter(|n| !n.is_empty()).map(Into::into),
                port: number,
                target_port,
                protocol,
                app_protocol: port
                    .str("appProtocol")?
                    .filter(|a| !a.is_empty())
                    .map(Into::into),
            });
        }
    }
    Ok(Service {
        key: ObjectKey {
            namespace: meta.namespace,
            name: meta.name,
        },
        cluster_ip,
        ports,
        selector,
    })
}

fn target_port(value: &Value) -> Option<TargetPort> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
            .map(TargetPort::Number),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0)
            .map(TargetPort::Number),
        Value::String(s) if !s.is_empty() => Some(TargetPort::Name(s.as_str().into())),
        _ => None,
    }
}

/// `Ok(None)` for slices of other address families, which the model does not carry.
fn endpoint_slice(fields: &Fields<'_>) -> Result<Option<EndpointSlice>, FieldError> {
    let meta = metadata(fields, true)?;
    match fields.str("addressType")? {
        None | Some("IPv4") => {}
        Some(_) => return Ok(None),
    }
    let service = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| FieldError {
            field: fields.path(&format!("metadata.labels.{SERVICE_NAME_LABEL}")),
            reason: "required: it names the Service the slice belongs to".into(),
        })?;
    let mut ports = Vec::new();
    for port in fields.list("ports")? {
        // A port without number means "all ports" and only matters to headless services.
        let Some(number) = port.port("port")? else {
            continue;
        };
        ports.push(SlicePort {
            name: port.str("name")?.filter(|n| !n.is_empty()).map(Into::into),
            port: number,
            protocol: port.protocol("protocol")?,
        });
    }
    let mut endpoints = Vec::new();
    for endpoint in fields.list("endpoints")? {
        let mut addresses = Vec::new();
        for (path, address) in endpoint.str_list("addresses")? {
            let ip = address.parse().map_err(|_| FieldError {
                field: path,
                reason: format!("expected an IPv4 address, found {address:?}"),
            })?;
            addresses.push(ip);
        }
        // Kubernetes: an unknown readiness is to be interpreted as ready.
        let ready = match endpoint.obj("conditions")? {
            Some(conditions) => conditions.bool("ready")?.unwrap_or(true),
            None => true,
        };
        let pod = match endpoint.obj("targetRef")? {
            Some(target) if target.str("kind")? == Some("Pod") => {
                let name = target.required_str("name")?;
                let namespace = target
                    .str("namespace")?
                    .filter(|n| !n.is_empty())
                    .unwrap_or(&meta.namespace);
                Some(ObjectKey::new(namespace, name))
            }
            _ => None,
        };
        endpoints.push(SliceEndpoint {
            addresses,
            ready,
            node: endpoint
                .str("nodeName")?
                .filter(|n| !n.is_empty())
                .map(Into::into),
            pod,
        });
    }
    Ok(Some(EndpointSlice {
        key: ObjectKey {
            namespace: meta.namespace,
            name: meta.name,
        },
        service: service.as_str().into(),
        ports,
        endpoints,
    }))
}

/// A field that failed validation: its full path and what is wrong with it.
#[derive(Debug)]
pub(super) struct FieldError {
    pub(super) field: String,
    pub(super) reason: String,
}

/// A mapping together with its path from the document root.
pub(super) struct Fields<'a> {
    pub(super) map: &'a Mapping,
    pub(super) value: &'a Value,
    pub(super) path: String,
}

impl<'a> Fields<'a> {
    pub(super) fn root(value: &'a Value, prefix: &str) -> Result<Self, FieldError> {
        let path = prefix.trim_end_matches('.').to_owned();
        match value {
            Value::Mapping(map) => Ok(Self { map, value, path }),
            other => Err(FieldError {
                field: if path.is_empty() {
                    "(document)".into()
                } else {
                    path
                },
                reason: format!("expected a mapping, found {}", show(other)),
            }),
        }
    }

    pub(super) fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(super) fn error(&self, key: &str, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: self.path(key),
            reason: reason.into(),
        }
    }

    /// `null` counts as absent, as in the Kubernetes API.
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn str(&self, key: &str) -> Result<Option<&'a str>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(self.error(key, format!("expected a string, found {}", show(other))))
            }
        }
    }

    pub(super) fn required_str(&self, key: &str) -> Result<&'a str, FieldError> {
        self.str(key)?.ok_or_else(|| self.error(key, "required"))
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(
                key,
                format!("expected true or false, found {}", show(other)),
            )),
        }
    }

    pub(super) fn obj(&self, key: &str) -> Result<Option<Fields<'a>>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(value @ Value::Mapping(map)) => Ok(Some(Fields {
                map,
                value,
                path: self.path(key),
            })),
            Some(other) => {
                Err(self.error(key, format!("expected a mapping, found {}", show(other))))
            }
        }
    }

    pub(super) fn required_obj(&self, key: &str) -> Result<Fields<'a>, FieldError> {
        self.obj(key)?.ok_or_else(|| self.error(key, "required"))
    }

    pub(super) fn seq(&self, key: &str) -> Result<&'a [Value], FieldError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Sequence(items)) => Ok(items),
            Some(other) => Err(self.error(key, format!("expected a list, found {}", show(other)))),
        }
    }

    /// A list of mappings.
    pub(super) fn list(&self, key: &str) -> Result<Vec<Fields<'a>>, FieldError> {
        self.seq(key)?
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let path = self.path(&format!("{key}[{i}]"));
                match item {
                    Value::Mapping(map) => Ok(Fields {
                        map,
                        value: item,
                        path,
                    }),
                    other => Err(FieldError {
                        field: path,
                        reason: format!("expected a mapping, found {}", show(other)),
                    }),
                }
            })
            .collect()
    }

    /// A list of strings, each with its path.
    pub(super) fn str_list(&self, key: &str) -> Result<Vec<(String, &'a str)>, FieldError> {
        self.seq(key)?
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let path = self.path(&format!("{key}[{i}]"));
                match item {
                    Value::String(s) => Ok((path, s.as_str())),
                    other => Err(FieldError {
                        field: path,
                        reason: format!("expected a string, found {}", show(other)),
                    }),
                }
            })
            .collect()
    }

    pub(super) fn port(&self, key: &str) -> Result<Option<u16>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                .map(Some)
                .ok_or_else(|| {
                    self.error(
                        key,
                        format!("expected a port number (1-65535), found {}", show(value)),
                    )
                }),
        }
    }

    pub(super) fn required_port(&self, key: &str) -> Result<u16, FieldError> {
        self.port(key)?.ok_or_else(|| self.error(key, "required"))
    }

    pub(super) fn ipv4(&self, key: &str) -> Result<Option<Ipv4Addr>, FieldError> {
        match self.str(key)? {
            None | Some("") => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| {
                self.error(
                    key,
                    format!("expected an IPv4 address, found {s:?} (only IPv4 is supported)"),
                )
            }),
        }
    }

    pub(super) fn protocol(&self, key: &str) -> Result<Protocol, FieldError> {
        match self.str(key)? {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => {
                Err(self.error(key, format!("expected TCP, UDP or SCTP, found {other:?}")))
            }
        }
    }

    /// A map of string keys to string values (labels, annotations, selectors).
    pub(super) fn labels(&self, key: &str) -> Result<Labels, FieldError> {
        let Some(value) = self.get(key) else {
            return Ok(Labels::new());
        };
        let Value::Mapping(map) = value else {
            return Err(self.error(key, format!("expected a mapping, found {}", show(value))));
        };
        let mut labels = Labels::new();
        for (k, v) in map {
            let Value::String(k) = k else {
                return Err(self.error(key, format!("keys must be strings, found {}", show(k))));
            };
            match v {
                Value::String(v) => {
                    labels.insert(k.clone(), v.clone());
                }
                // Kubernetes stores an empty value for `key:` with nothing after it.
                Value::Null => {
                    labels.insert(k.clone(), String::new());
                }
                other => {
                    return Err(self.error(
                        &format!("{key}.{k}"),
                        format!("values must be strings (quote it), found {}", show(other)),
                    ))
                }
            }
        }
        Ok(labels)
    }

    /// Whether the key is present (and not null).
    pub(super) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// An integer from 0 to `max`. YAML integers only, as the CRD schemas declare them.
    pub(super) fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .filter(|n| *n <= max)
                .map(Some)
                .ok_or_else(|| {
                    self.error(
                        key,
                        format!("expected an integer from 0 to {max}, found {}", show(value)),
                    )
                }),
        }
    }

    /// A number, with or without a fraction.
    pub(super) fn number(&self, key: &str) -> Result<Option<f64>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => {
                Err(self.error(key, format!("expected a number, found {}", show(other))))
            }
        }
    }

    /// A mapping from names to mappings, in the order written
    /// (`headers: {end-user: {exact: jason}}`).
    pub(super) fn obj_map(&self, key: &str) -> Result<Vec<(&'a str, Fields<'a>)>, FieldError> {
        self.map_entries(key)?
            .into_iter()
            .map(|(name, path, value)| match value {
                Value::Mapping(map) => Ok((name, Fields { map, value, path })),
                other => Err(FieldError {
                    field: path,
                    reason: format!("expected a mapping, found {}", show(other)),
                }),
            })
            .collect()
    }

    /// A mapping from names to strings, in the order written (`set: {x-version: v2}`).
    pub(super) fn str_map(&self, key: &str) -> Result<Vec<(&'a str, &'a str)>, FieldError> {
        self.map_entries(key)?
            .into_iter()
            .map(|(name, path, value)| match value {
                Value::String(s) => Ok((name, s.as_str())),
                other => Err(FieldError {
                    field: path,
                    reason: format!("expected a string (quote it), found {}", show(other)),
                }),
            })
            .collect()
    }

    /// The entries of a mapping with string keys: name, path, value.
    fn map_entries(&self, key: &str) -> Result<Vec<(&'a str, String, &'a Value)>, FieldError> {
        let Some(value) = self.get(key) else {
            return Ok(Vec::new());
        };
        let Value::Mapping(map) = value else {
            return Err(self.error(key, format!("expected a mapping, found {}", show(value))));
        };
        map.iter()
            .map(|(k, v)| match k {
                Value::String(name) => Ok((name.as_str(), self.path(&format!("{key}.{name}")), v)),
                other => {
                    Err(self.error(key, format!("keys must be strings, found {}", show(other))))
                }
            })
            .collect()
    }
}

impl std::fmt::Debug for Fields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fields")
            .field("path", &self.path)
            .field("value", &self.value)
            .finish()
    }
}

/// A short rendering of a value for error messages.
pub(super) fn show(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
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
    use super::*;

    fn one(yaml: &str) -> Result<Object, Box<Invalid>> {
        let value: Value = crate::source::yaml::parse(yaml).unwrap();
        let mut out = translate(&value);
        assert_eq!(out.len(), 1, "{out:?}");
        out.remove(0).map_err(Box::new)
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
        assert_eq!(pod.workload(), "reviews");
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
