//! `meshctl analyze`: what a node proxy would make of a set of YAML files, without a cluster.
//!
//! Every document goes through the proxy's own translation and validation
//! ([`parse_documents`]): what it would reject is an error here, with the same field and reason.
//! The documents it would accept are assembled into a snapshot, as a node would assemble them,
//! and checked for what Istio's `istioctl analyze` warns about: a route to a host that is no
//! Service or ServiceEntry, or to a subset no DestinationRule defines (IST0101), two
//! VirtualServices for one host (IST0109), a DestinationRule subset that selects no pod
//! (IST0173), a Gateway API route whose parent Service does not exist (IST0101), a Telemetry
//! that names a provider MeshConfig does not define (IST0101), and a resource defined twice.

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    model::{
        telemetry::{ProviderKind, ENVOY_PROVIDER},
        traffic::HttpAction,
        ObjectKey, Snapshot,
    },
    source::{assemble::Assembler, file::parse_documents, objects::ResourceId},
};

/// How bad a finding is: errors are what a node proxy rejects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
}

/// One finding, as `istioctl analyze` prints it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub level: Level,
    /// Istio's message code where Istio has one (`IST0101`...), else Weft's.
    pub code: &'static str,
    /// `Kind namespace/name`, when the document could be named.
    pub resource: Option<String>,
    /// `file:line` of the document.
    pub origin: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Error => "Error",
            Level::Warning => "Warning",
        };
        write!(f, "{level} [{}]", self.code)?;
        match &self.resource {
            Some(resource) => write!(f, " ({resource} {})", self.origin)?,
            None => write!(f, " ({})", self.origin)?,
        }
        write!(f, " {}", self.message)
    }
}

/// The most a file may hold: a larger one is not read (Kubernetes keeps 1.5 MiB per object).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The YAML and JSON files under `paths` (files as given, directories walked without following
/// links to directories), in name order.
pub fn files(paths: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
        entries.sort_by_key(fs::DirEntry::path);
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type()?.is_dir() {
                walk(&path, out)?;
            } else if ["yaml", "yml", "json"]
                .iter()
                .any(|e| path.extension().is_some_and(|x| x == *e))
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for path in paths {
        if fs::metadata(path)?.is_dir() {
            walk(path, &mut out)?;
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

/// The content of `file`: a regular file (a link to one too) of at most [`MAX_FILE_BYTES`].
pub fn read(file: &Path) -> io::Result<Vec<u8>> {
    let meta = fs::metadata(file)?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(io::Error::other(format!(
            "{} bytes, over the {MAX_FILE_BYTES} meshctl reads",
            meta.len()
        )));
    }
    fs::read(file)
}

/// Analyzes `files` (name, content) as one configuration.
pub fn analyze(files: &[(String, Vec<u8>)]) -> Vec<Finding> {
    let Loaded {
        snapshot,
        mut findings,
        origins,
    } = load(files);
    let origin = |kind, key: &ObjectKey| -> (Option<String>, String) {
        let id = ResourceId {
            kind,
            key: key.clone(),
        };
        let origin = origins.get(&id).cloned().unwrap_or_default();
        (Some(id.to_string()), origin)
    };
    let mut warn = |(resource, origin): (Option<String>, String), code, message: String| {
        findings.push(Finding {
            level: Level::Warning,
            code,
            resource,
            origin,
            message,
        })
    };
    use crate::source::objects::Kind;

    // VirtualServices: hosts, subsets, and hosts claimed twice.
    let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for vs in snapshot.virtual_services.values() {
        let ns = &vs.key.namespace;
        if vs.applies_to_mesh() {
            for host in vs.hosts.iter() {
                by_host
                    .entry(fqdn(host, ns))
                    .or_default()
                    .push(vs.key.to_string());
            }
        }
        let destinations = vs
            .http
            .iter()
            .flat_map(|rule| match &rule.action {
                HttpAction::Route(routes) => routes.iter().map(|r| &r.destination).collect(),
                _ => Vec::new(),
            })
            .chain(
                vs.tcp
                    .iter()
                    .flat_map(|rule| rule.route.iter().map(|r| &r.destination)),
            );
        for destination in destinations {
            let Some(host) = resolve(&snapshot, &destination.host, ns) else {
                warn(
                    origin(Kind::VirtualService, &vs.key),
                    "IST0101",
                    format!(
                        "Referenced host not found: {:?} (no Service or ServiceEntry)",
                        &*destination.host
                    ),
                );
                continue;
            };
            if let Some(subset) = &destination.subset {
                let defined = snapshot.destination_rules.values().any(|dr| {
                    covers(&fqdn(&dr.host, &dr.key.namespace), &host) && dr.subset(subset).is_some()
                });
                if !defined {
                    warn(
                        origin(Kind::VirtualService, &vs.key),
                        "IST0101",
                        format!(
                            "Referenced host+subset in destinationrule not found: \"{}+{subset}\"",
                            destination.host
                        ),
                    );
                }
            }
        }
    }
    for (host, services) in &by_host {
        if services.len() > 1 {
            for name in services {
                let key = name.split_once('/').map(|(ns, n)| ObjectKey::new(ns, n));
                if let Some(key) = key {
                    warn(
                        origin(Kind::VirtualService, &key),
                        "IST0109",
                        format!(
                            "The VirtualServices {} associated with mesh define the same host {host:?}",
                            services.join(", ")
                        ),
                    );
                }
            }
        }
    }
    // DestinationRules: subsets that select no pod of their Service (when pods were given:
    // manifests of Deployments hold none).
    let pods_given = !snapshot.pods.is_empty();
    for dr in snapshot.destination_rules.values().filter(|_| pods_given) {
        let host = fqdn(&dr.host, &dr.key.namespace);
        let Some(service) = snapshot
            .services
            .values()
            .find(|s| s.entry.is_none() && s.hostname() == host)
        else {
            continue;
        };
        let Some(selector) = &service.selector else {
            continue;
        };
        for subset in dr.subsets.iter() {
            let selects = snapshot.pods.values().any(|pod| {
                pod.key.namespace == service.key.namespace
                    && selector
                        .iter()
                        .chain(subset.labels.iter())
                        .all(|(k, v)| pod.labels.get(k) == Some(v))
            });
            if !selects {
                warn(
                    origin(Kind::DestinationRule, &dr.key),
                    "IST0173",
                    format!(
                        "The Subset {} defined in the DestinationRule does not select any pods",
                        subset.name
                    ),
                );
            }
        }
    }
    // Gateway API routes attached to Services that do not exist.
    let routes = snapshot
        .http_routes
        .values()
        .map(|r| {
            (
                Kind::HttpRoute,
                &r.key,
                r.service_parents().collect::<Vec<_>>(),
            )
        })
        .chain(
            snapshot
                .grpc_routes
                .values()
                .map(|r| (Kind::GrpcRoute, &r.key, r.service_parents().collect())),
        );
    for (kind, key, parents) in routes {
        for parent in parents {
            let ns = parent.namespace.as_deref().unwrap_or(&key.namespace);
            let service = ObjectKey::new(ns, &parent.name);
            if !snapshot.services.contains_key(&service) {
                warn(
                    origin(kind, key),
                    "IST0101",
                    format!("Referenced parent Service not found: \"{service}\""),
                );
            }
        }
    }
    // Telemetries naming providers MeshConfig does not define, or of kinds Weft cannot serve.
    let providers = &snapshot.mesh_config.extension_providers;
    for telemetry in snapshot.telemetries.values() {
        let tracing = telemetry
            .tracing
            .iter()
            .flat_map(|t| t.providers.iter().flat_map(|p| p.iter()))
            .map(|n| (n, "tracing"));
        let logging = telemetry
            .access_logging
            .iter()
            .flat_map(|a| a.providers.iter().flat_map(|p| p.iter()))
            .map(|n| (n, "access log"));
        for (name, signal) in tracing.chain(logging) {
            let found = providers.iter().find(|p| p.name == *name);
            let message = match found {
                None if signal == "access log" && **name == *ENVOY_PROVIDER => continue,
                None => format!("Referenced {signal} provider not found in MeshConfig: {name:?}"),
                Some(p) => match (&p.kind, signal) {
                    (ProviderKind::OpenTelemetry { .. }, "tracing")
                    | (
                        ProviderKind::OtelAccessLog { .. } | ProviderKind::FileAccessLog { .. },
                        "access log",
                    ) => continue,
                    (kind, _) => format!(
                        "{signal} provider {name:?} is of a kind Weft does not send {signal} to ({}): its workloads get none",
                        kind.name()
                    ),
                },
            };
            warn(origin(Kind::Telemetry, &telemetry.key), "IST0101", message);
        }
    }
    findings.sort_by(|a, b| (a.level, &a.origin).cmp(&(b.level, &b.origin)));
    findings
}

/// `host` as written in namespace `ns`, fully qualified the way Istio reads a Service's name.
fn fqdn(host: &str, ns: &str) -> String {
    if host.contains('*') || host.ends_with(".cluster.local") {
        return host.to_owned();
    }
    if let Some(short) = host.strip_suffix(".svc") {
        return format!("{short}.svc.cluster.local");
    }
    match host.split('.').count() {
        1 => format!("{host}.{ns}.svc.cluster.local"),
        2 => format!("{host}.svc.cluster.local"),
        _ => host.to_owned(),
    }
}

/// The host a route's `host` names in namespace `ns`: a ServiceEntry host as written, else a
/// Service's name; `None` when neither answers to it.
fn resolve(snapshot: &Snapshot, host: &str, ns: &str) -> Option<String> {
    let names: Vec<String> = snapshot.services.values().map(|s| s.hostname()).collect();
    let known = |candidate: &str| names.iter().any(|name| covers(name, candidate));
    if known(host) {
        return Some(host.to_owned());
    }
    let qualified = fqdn(host, ns);
    known(&qualified).then_some(qualified)
}

/// Whether `pattern` (a host, or `*.suffix`) answers to `host`.
fn covers(pattern: &str, host: &str) -> bool {
    pattern == host
        || pattern
            .strip_prefix('*')
            .is_some_and(|suffix| host.ends_with(suffix))
}

/// A configuration read from files as a node reads it.
pub struct Loaded {
    /// What a node would assemble from the documents it accepts.
    pub snapshot: Snapshot,
    /// The documents it would reject, and the ones defined twice.
    pub findings: Vec<Finding>,
    /// Where each accepted resource was read (`file:line`).
    pub origins: BTreeMap<ResourceId, String>,
}

/// Reads `files` (name, content) as one configuration, as the file source does.
pub fn load(files: &[(String, Vec<u8>)]) -> Loaded {
    let mut findings = Vec::new();
    let mut assembler = Assembler::new();
    let mut origins: BTreeMap<ResourceId, String> = BTreeMap::new();
    for (name, content) in files {
        for (line, result) in parse_documents(name, content) {
            let origin = format!("{name}:{line}");
            match result {
                Ok(object) => {
                    let id = object.id();
                    if let Some(first) = origins.get(&id) {
                        findings.push(Finding {
                            level: Level::Warning,
                            code: "WEFT0002",
                            resource: Some(id.to_string()),
                            origin,
                            message: format!(
                                "defined again: a node uses the first definition ({first})"
                            ),
                        });
                        continue;
                    }
                    origins.insert(id, origin);
                    assembler.upsert(&object);
                }
                Err(invalid) => findings.push(Finding {
                    level: Level::Error,
                    code: "IST0106",
                    resource: invalid.id.as_ref().map(ToString::to_string).or_else(|| {
                        Some(format!(
                            "{} {}",
                            invalid.kind.as_deref().unwrap_or("unknown"),
                            invalid.name.as_deref().unwrap_or("(unnamed)")
                        ))
                    }),
                    origin,
                    message: format!("rejected by Weft: {}: {}", invalid.field, invalid.reason),
                }),
            }
        }
    }
    Loaded {
        snapshot: assembler.snapshot(),
        findings,
        origins,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}
spec:
  nodeName: node-1
  containers: [{name: main}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v9, labels: {version: v9}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v2}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-again, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - route:
    - destination: {host: nowhere}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: ghosts, port: 9080}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: tracing, namespace: shop}
spec:
  tracing: [{providers: [{name: jaeger}]}]
  accessLogging: [{providers: [{name: envoy}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: shop}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: egress, namespace: shop}
spec:
  hosts: [httpbin.org]
  http:
  - route:
    - destination: {host: httpbin.org}
      weight: 50
    - destination: {host: reviews.shop.svc, subset: v1}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    timeout: forever
"#;

    #[test]
    fn rejections_are_errors_and_istioctls_warnings_are_found() {
        let findings = analyze(&[("shop.yaml".to_owned(), CONFIG.as_bytes().to_vec())]);
        let lines: Vec<String> = findings.iter().map(ToString::to_string).collect();
        let has = |level: Level, code: &str, resource: &str, text: &str| {
            findings.iter().any(|f| {
                f.level == level
                    && f.code == code
                    && f.resource.as_deref() == Some(resource)
                    && f.message.contains(text)
            })
        };
        assert!(
            has(
                Level::Error,
                "IST0106",
                "VirtualService shop/broken",
                "spec.http[0].timeout"
            ),
            "{lines:#?}"
        );
        assert!(
            has(
                Level::Warning,
                "IST0101",
                "VirtualService shop/reviews",
                "\"reviews+v2\""
            ),
            "{lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("reviews+v1")),
            "{lines:#?}"
        );
        assert!(
            has(
                Level::Warning,
                "IST0101",
                "VirtualService shop/reviews-again",
                "\"nowhere\""
            ),
            "{lines:#?}"
        );
        assert!(
            has(
                Level::Warning,
                "IST0109",
                "VirtualService shop/reviews",
                "same host"
            ),
            "{lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("shop/broken,")),
            "a rejected VirtualService claims no host: {lines:#?}"
        );
        assert!(
            has(
                Level::Warning,
                "IST0173",
                "DestinationRule shop/reviews",
                "Subset v9"
            ),
            "{lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("Subset v1 ")),
            "{lines:#?}"
        );
        assert!(
            has(
                Level::Warning,
                "IST0101",
                "HTTPRoute shop/orphan",
                "\"shop/ghosts\""
            ),
            "{lines:#?}"
        );
        assert!(
            has(
                Level::Warning,
                "IST0101",
                "Telemetry shop/tracing",
                "\"jaeger\""
            ),
            "{lines:#?}"
        );
        // A ServiceEntry host and `name.namespace.svc` resolve.
        assert!(
            !lines.iter().any(|l| l.contains("shop/egress")),
            "{lines:#?}"
        );
        // The built-in `envoy` access log provider needs no MeshConfig.
        assert!(!lines.iter().any(|l| l.contains("\"envoy\"")), "{lines:#?}");
        assert_eq!(
            findings.iter().filter(|f| f.level == Level::Error).count(),
            1,
            "{lines:#?}"
        );
        assert!(lines[0].starts_with("Error [IST0106] (VirtualService shop/broken shop.yaml:"));
    }

    #[test]
    fn a_clean_configuration_has_no_finding() {
        let clean = CONFIG
            .split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")
            .next()
            .unwrap();
        assert_eq!(
            analyze(&[("clean.yaml".to_owned(), clean.as_bytes().to_vec())]),
            vec![]
        );
    }
}
