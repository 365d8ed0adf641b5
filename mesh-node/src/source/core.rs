//! Translation of the core Kubernetes kinds the model uses: `Namespace`, `Node`, `Pod`,
//! `Service`, `Secret` (TLS material only) and `discovery.k8s.io/v1` `EndpointSlice`.

use std::{net::Ipv4Addr, sync::Arc};

use super::yaml::Value;

use super::fields::{metadata, show, FieldError, Fields};
use crate::model::{
    Controller, Namespace, Node, ObjectKey, Pod, Protocol, Service, ServicePort, TargetPort,
    TlsSecret, CGROUP_ANNOTATION,
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

pub(super) fn namespace(fields: &Fields<'_>) -> Result<Namespace, FieldError> {
    let meta = metadata(fields, false)?;
    Ok(Namespace {
        name: meta.name,
        labels: meta.labels,
    })
}

pub(super) fn node(fields: &Fields<'_>) -> Result<Node, FieldError> {
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

pub(super) fn pod(fields: &Fields<'_>) -> Result<Pod, FieldError> {
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
    let (ip, phase) = match fields.obj("status")? {
        Some(status) => (status.ipv4("podIP")?, status.str("phase")?),
        None => (None, None),
    };
    // A finished pod's address may already be another pod's, and a host-network pod's is its
    // node's: neither names the pod, nor decides whose policies and identity an address has.
    let host_network = match &spec {
        Some(spec) => spec.bool("hostNetwork")?.unwrap_or(false),
        None => false,
    };
    let finished = matches!(phase, Some("Succeeded" | "Failed"));
    let ip = ip.filter(|_| !finished && !host_network);
    let controller = controller(&fields.required_obj("metadata")?)?;
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
        controller,
    })
}

/// The controlling owner of a pod whose name was generated: Istio names the workload of such
/// a pod after it (see [`Pod::workload`]); a pod named by hand is its own workload.
fn controller(meta: &Fields<'_>) -> Result<Option<Controller>, FieldError> {
    if meta.str("generateName")?.is_none_or(str::is_empty) {
        return Ok(None);
    }
    for owner in meta.list("ownerReferences")? {
        if owner.bool("controller")? == Some(true) {
            return Ok(Some(Controller {
                kind: owner.required_str("kind")?.into(),
                name: owner.required_str("name")?.into(),
            }));
        }
    }
    Ok(None)
}

pub(super) fn service(fields: &Fields<'_>) -> Result<Service, FieldError> {
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
        entry: None,
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
pub(super) fn endpoint_slice(fields: &Fields<'_>) -> Result<Option<EndpointSlice>, FieldError> {
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

/// The keys of a Secret Istio reads TLS material from, in both of its shapes, by what they hold.
const SECRET_KEYS: [(&str, SecretPart); 8] = [
    ("tls.crt", SecretPart::Cert),
    ("cert", SecretPart::Cert),
    ("tls.key", SecretPart::Key),
    ("key", SecretPart::Key),
    ("ca.crt", SecretPart::Ca),
    ("cacert", SecretPart::Ca),
    ("ca.crl", SecretPart::Crl),
    ("crl", SecretPart::Crl),
];

/// Whether a Secret's key is one Istio reads TLS material from.
pub fn is_tls_secret_key(name: &str) -> bool {
    SECRET_KEYS.iter().any(|(key, _)| *key == name)
}

#[derive(Clone, Copy)]
enum SecretPart {
    Cert,
    Key,
    Ca,
    Crl,
}

/// A Secret's TLS material: the PEM values under Istio's keys (`data`, base64, or
/// `stringData`). `None` when it has none: most Secrets belong to other applications, and
/// their values are never kept.
pub(super) fn secret(fields: &Fields<'_>) -> Result<Option<TlsSecret>, FieldError> {
    use base64::Engine as _;
    let meta = metadata(fields, true)?;
    let mut secret = TlsSecret {
        key: ObjectKey {
            namespace: meta.namespace,
            name: meta.name,
        },
        cert: None,
        private_key: None,
        ca: None,
        crl: None,
    };
    let mut values = std::collections::HashMap::new();
    for (name, encoded) in fields.str_map("data")? {
        if !is_tls_secret_key(name) {
            continue;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| FieldError {
                field: fields.path(&format!("data.{name}")),
                reason: format!("not base64: {e}"),
            })?;
        if let Ok(text) = String::from_utf8(bytes) {
            values.insert(name, text);
        }
    }
    // `stringData` wins over `data`, as the API server merges them.
    for (name, value) in fields.str_map("stringData")? {
        values.insert(name, value.to_string());
    }
    let mut found = false;
    // Both shapes' keys given: the Kubernetes TLS shape's (first in the table) wins.
    for (name, part) in SECRET_KEYS.iter().rev() {
        let Some(pem) = values.remove(name).filter(|v| v.contains("-----BEGIN ")) else {
            continue;
        };
        let slot = match part {
            SecretPart::Cert => &mut secret.cert,
            SecretPart::Key => &mut secret.private_key,
            SecretPart::Ca => &mut secret.ca,
            SecretPart::Crl => &mut secret.crl,
        };
        *slot = Some(pem.into());
        found = true;
    }
    Ok(found.then_some(secret))
}
