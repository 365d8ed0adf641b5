//! What a node proxy runs, and why it handles a request as it does — for `meshctl`.
//!
//! An [`Inspector`] reads the proxy's live view (the node admin's `/debug/explain`,
//! `/debug/routes`, …) or a view compiled from a directory of YAML (`meshctl --config-dir`).
//! [`Inspector::explain`] walks a request down the path the proxy gives it — the source pod's
//! capture, the dialled Service and port, its protocol, the VirtualService or Gateway API rule
//! that matches (and why the others do not), the rule's faults, timeouts, retries and
//! rewrites, the weighted backends, each cluster's DestinationRule policy and endpoints, and
//! the AuthorizationPolicies of each destination pod — with the proxy's own route tables,
//! clusters and policy decision, so that what it says is what the proxy does.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use super::{
    context::Context,
    detect::Declared,
    route::{self, RequestInfo, RetryPlan, RouteTrace, Rule, RuleAction, Selection},
    upstream::cluster::{self, ClusterKey, Clusters, Lb, PodExt as _},
    view::View,
};
use crate::{
    identity::{Identity, DEFAULT_TRUST_DOMAIN},
    model::{
        authz::{self, Attributes, Http, TrustDomains},
        policy::ROOT_NAMESPACE,
        traffic::{AbortError, HeaderOps, Resolution},
        ObjectKey, Pod, Protocol, Service, Snapshot,
    },
};

/// The most clusters or endpoints one dump lists: each is built to be shown, and a tenant's
/// DestinationRule may define thousands of subsets.
const MAX_LISTED: usize = 10_000;

/// Reads a proxy's configuration: the one it serves, or one compiled from files.
#[derive(Clone)]
pub struct Inspector(Arc<Inner>);

enum Inner {
    Live(Arc<Context>),
    Offline { view: Arc<View>, clusters: Clusters },
}

/// What `explain` is asked about.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Question {
    /// The client pod, `namespace/name`.
    pub from: String,
    /// `http://host[:port]/path?query`; the host as the pod would write it (a Service's
    /// short or full name, a ServiceEntry host, or an address).
    pub url: String,
    /// `GET` unless set.
    pub method: Option<String>,
    /// `name: value` lines.
    pub headers: Vec<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("--from must be NAMESPACE/POD, not {0:?}")]
    From(String),
    #[error("no pod {0} in the mesh's configuration")]
    UnknownPod(String),
    #[error("{url:?} is not an http:// URL: {reason}")]
    Url { url: String, reason: String },
    #[error("{0:?} is not an HTTP method")]
    Method(String),
    #[error("header {0:?} is not of the form `Name: value`")]
    Header(String),
}

/// Why a request goes where it goes (`meshctl explain`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The client: pod, node, identity.
    pub source: Endpoint,
    /// `GET http://reviews:9080/reviews/0`, as asked.
    pub request: String,
    /// The dialled Service and port, and how its protocol was found.
    pub destination: Option<String>,
    /// The routes read, when the port speaks HTTP (or TCP rules).
    pub routes: Option<RouteTrace>,
    /// What happens, in one line.
    pub outcome: String,
    /// The matched rule's settings.
    pub rule: Vec<String>,
    /// Where the request can go.
    pub backends: Vec<BackendTrace>,
    /// Anything else worth knowing.
    pub notes: Vec<String>,
}

/// A pod, as the explanation names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub pod: String,
    pub node: Option<String>,
    pub identity: Option<String>,
}

/// One backend of the request: its cluster and endpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendTrace {
    /// `outbound|9080|v2|reviews.default.svc.cluster.local`.
    pub cluster: String,
    /// Share of requests, in percent.
    pub weight: String,
    /// DestinationRule, load balancer, circuit breakers, outlier detection, TLS.
    pub policy: Vec<String>,
    pub endpoints: Vec<EndpointTrace>,
    /// Why the cluster cannot serve (the proxy answers 503).
    pub error: Option<String>,
}

/// One endpoint a backend may pick, and what its node's proxy decides about the request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointTrace {
    pub address: String,
    pub pod: Option<String>,
    pub node: Option<String>,
    /// `same node: …` or `HBONE (mTLS) to node-2`.
    pub path: String,
    /// Outlier detection keeps it out for now.
    pub ejected: bool,
    /// What the destination pod's AuthorizationPolicies decide.
    pub authorization: String,
}

impl Inspector {
    pub(super) fn live(ctx: Arc<Context>) -> Self {
        Self(Arc::new(Inner::Live(ctx)))
    }

    /// An inspector of `snapshot` as any node proxy would compile it.
    pub fn offline(mut snapshot: Snapshot) -> Self {
        snapshot.index();
        let clusters = Clusters::new(crate::config::DEFAULT_TLS_ORIGINATION_DIR.into());
        let view = Arc::new(View::new(Arc::new(snapshot), None, &clusters));
        Self(Arc::new(Inner::Offline { view, clusters }))
    }

    fn parts(&self) -> (Arc<View>, &Clusters, Settings<'_>) {
        match &*self.0 {
            Inner::Live(ctx) => (
                ctx.view(),
                &ctx.clusters,
                Settings {
                    node: Some(&ctx.config.node),
                    trust_domain: &ctx.config.trust_domain,
                    aliases: &ctx.config.trust_domain_aliases,
                    sidecar: ctx.config.sidecar,
                    mtls: ctx.config.certs.is_some(),
                },
            ),
            Inner::Offline { view, clusters } => (
                view.clone(),
                clusters,
                Settings {
                    node: None,
                    trust_domain: DEFAULT_TRUST_DOMAIN,
                    aliases: &[],
                    sidecar: false,
                    // A cluster as deployed: with its mesh CA.
                    mtls: true,
                },
            ),
        }
    }

    /// The certificates the proxy holds for its own identity and its pods' (`None`: offline,
    /// or no mesh CA).
    pub fn certificates(&self) -> Option<Value> {
        let Inner::Live(ctx) = &*self.0 else {
            return None;
        };
        let certs = ctx.config.certs.as_ref()?;
        let own = certs.own_identity();
        let now = std::time::SystemTime::now();
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let list = certs
            .certificates()
            .into_iter()
            .map(|(identity, state)| {
                let mut entry = json!({
                    "identity": identity.to_string(),
                    "node": identity == *own,
                });
                match state {
                    Ok(issued) => {
                        let c = &issued.credential;
                        entry["notBefore"] = json!(unix(c.not_before));
                        entry["notAfter"] = json!(unix(c.not_after));
                        entry["expiresInSeconds"] =
                            json!(c.not_after.duration_since(now).map_or(0, |d| d.as_secs()));
                    }
                    Err(reason) => entry["pending"] = json!(reason),
                }
                entry
            })
            .collect();
        Some(Value::Array(list))
    }

    /// Why `question`'s request goes where it goes.
    pub fn explain(&self, question: &Question) -> Result<Explanation, ExplainError> {
        let (view, clusters, settings) = self.parts();
        Walk {
            view: &view,
            clusters,
            settings,
        }
        .explain(question)
    }

    /// `meshctl config dump routes`: every Service's rules, in the order they are tried.
    pub fn routes(&self) -> Value {
        let (view, _, _) = self.parts();
        let mut services: Vec<_> = view.routes.iter().collect();
        services.sort_by(|a, b| a.service().cmp(b.service()));
        Value::Array(
            services
                .into_iter()
                .map(|routes| {
                    let key = routes.service();
                    json!({
                        "service": key.to_string(),
                        "host": hostname(&view.snapshot, key),
                        "rules": routes.entries(),
                    })
                })
                .collect(),
        )
    }

    /// `meshctl config dump clusters`: every Service port, and each subset its
    /// DestinationRules define, with the policy a client in the Service's namespace gets.
    pub fn clusters(&self) -> Value {
        let (view, clusters, _) = self.parts();
        let snapshot = &view.snapshot;
        let mut out = Vec::new();
        for service in snapshot.services.values() {
            let namespace = service.key.namespace.clone();
            let subsets = cluster::subsets_for(snapshot, &service.key, Some(&namespace));
            for port in service.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                let subsets = std::iter::once(None).chain(subsets.iter().cloned().map(Some));
                for subset in subsets {
                    if out.len() >= MAX_LISTED {
                        out.push(
                            json!({"error": format!("the listing stops at {MAX_LISTED} clusters")}),
                        );
                        return Value::Array(out);
                    }
                    let key = ClusterKey::new(service.key.clone(), port.port, subset);
                    let mut entry = json!({
                        "cluster": key.to_string(),
                        "service": service.key.to_string(),
                        "port": port.port,
                        "subset": key.subset.as_deref(),
                        "protocol": protocol(port),
                    });
                    match view.inspect_cluster(clusters, &key, Some(&namespace)) {
                        Ok(built) => {
                            entry["destinationRule"] =
                                json!(built.policy().rule.as_ref().map(ToString::to_string));
                            entry["policy"] = json!(policy_lines(&built));
                            entry["endpoints"] = json!(built.len());
                        }
                        Err(e) => entry["error"] = json!(e.to_string()),
                    }
                    out.push(entry);
                }
            }
        }
        Value::Array(out)
    }

    /// `meshctl config dump endpoints`: the endpoints of every Service port (its cluster
    /// without subset), with the pods, nodes and outlier state behind them.
    pub fn endpoints(&self) -> Value {
        let (view, clusters, _) = self.parts();
        let snapshot = &view.snapshot;
        let now = Instant::now();
        let mut out = Vec::new();
        for service in snapshot.services.values() {
            let namespace = service.key.namespace.clone();
            for port in service.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                let key = ClusterKey::new(service.key.clone(), port.port, None);
                let Ok(built) = view.inspect_cluster(clusters, &key, Some(&namespace)) else {
                    continue;
                };
                if out.len() >= MAX_LISTED {
                    out.push(
                        json!({"error": format!("the listing stops at {MAX_LISTED} endpoints")}),
                    );
                    return Value::Array(out);
                }
                for e in built.endpoints(now) {
                    out.push(json!({
                        "endpoint": e.addr.to_string(),
                        "status": if e.ejected { "EJECTED" } else { "HEALTHY" },
                        "cluster": key.to_string(),
                        "pod": e.pod.map(|p| p.key.to_string()),
                        "node": e.node,
                    }));
                }
            }
        }
        Value::Array(out)
    }

    /// `meshctl config dump policies`: for each pod of the node (every pod offline), its
    /// mTLS mode and the AuthorizationPolicies that apply to it, by key (DENY policies decide
    /// first, then ALLOW).
    pub fn policies(&self) -> Value {
        let (view, _, settings) = self.parts();
        let snapshot = &view.snapshot;
        let mut out = Vec::new();
        for pod in snapshot.pods.values() {
            if settings
                .node
                .is_some_and(|node| pod.node.as_deref() != Some(node))
            {
                continue;
            }
            let meshed = snapshot.is_meshed(pod);
            let policies = authz::policies_for(snapshot, pod, ROOT_NAMESPACE);
            let mtls = |port| {
                if !meshed {
                    return "-";
                }
                crate::model::policy::mtls_mode(
                    &snapshot.peer_authentications,
                    &pod.key.namespace,
                    &pod.labels,
                    port,
                    ROOT_NAMESPACE,
                )
                .as_str()
            };
            out.push(json!({
                "pod": pod.key.to_string(),
                "meshed": meshed,
                "mtls": mtls(0),
                "portMtls": pod.ports.iter().map(|(_, port)| (port.to_string(), json!(mtls(*port)))).collect::<serde_json::Map<_, _>>(),
                "authorizationPolicies": policies.iter().map(|p| json!({
                    "policy": p.key.to_string(),
                    "action": p.action.as_str(),
                    "rules": p.rules.len(),
                    "dryRun": p.dry_run,
                })).collect::<Vec<_>>(),
            }));
        }
        Value::Array(out)
    }
}

/// What the explanation needs of the proxy's settings.
#[derive(Clone, Copy)]
struct Settings<'a> {
    /// The node the proxy serves (`None` offline: the source pod's).
    node: Option<&'a str>,
    trust_domain: &'a str,
    aliases: &'a [Arc<str>],
    sidecar: bool,
    /// The node has a mesh CA: connections across nodes are HBONE, and the kernel's word on
    /// a caller of the node counts as its identity.
    mtls: bool,
}

struct Walk<'a> {
    view: &'a View,
    clusters: &'a Clusters,
    settings: Settings<'a>,
}

/// The request as the pod sends it.
struct Asked {
    /// Method, path and query, headers with `Host`: what the proxy routes on.
    parts: http::request::Parts,
    /// The URL's host: a name the pod resolves, or an address.
    host: String,
    port: u16,
}

/// Where one backend takes the request or connection.
struct Chosen {
    backend: route::Backend,
    service: Option<Arc<Service>>,
    port: u16,
    /// What this backend's endpoints receive (an HTTP request), its header changes applied.
    sent: Option<http::request::Parts>,
}

impl Walk<'_> {
    fn explain(&self, question: &Question) -> Result<Explanation, ExplainError> {
        let snapshot = &self.view.snapshot;
        let (namespace, name) = question
            .from
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .ok_or_else(|| ExplainError::From(question.from.clone()))?;
        let source = snapshot
            .pods
            .get(&ObjectKey::new(namespace, name))
            .ok_or_else(|| ExplainError::UnknownPod(question.from.clone()))?;
        let asked = ask(question)?;
        let identity = Identity::new(
            self.settings.trust_domain,
            &source.key.namespace,
            &source.service_account,
        );
        let mut out = Explanation {
            source: Endpoint {
                pod: source.key.to_string(),
                node: source.node.as_deref().map(str::to_owned),
                identity: Some(identity.to_string()),
            },
            request: format!("{} {}", asked.parts.method, question.url),
            ..Explanation::default()
        };
        if let (Some(node), Some(pod_node)) = (self.settings.node, source.node.as_deref()) {
            if node != pod_node {
                out.notes.push(format!(
                    "the pod runs on {pod_node}: its node's proxy serves its requests; this is {node}'s view (its configuration, and its own outlier state)"
                ));
            }
        }
        if !snapshot.is_meshed(source) {
            out.outcome = if source.opted_out() {
                "not captured: the pod opts out of the mesh (weft.io/mesh=disabled); the request goes straight to the address it dials".to_owned()
            } else {
                format!("not captured: namespace {} is not in the mesh (label weft.io/mesh=enabled); the request goes straight to the address it dials", source.key.namespace)
            };
            return Ok(out);
        }

        let Some(service) = self.dialled(source, &asked, &mut out) else {
            return Ok(out);
        };
        let Some(port) = service
            .ports
            .iter()
            .find(|p| p.port == asked.port && p.protocol == Protocol::Tcp)
        else {
            // As the proxy: only a VirtualService `tcp` rule can take an undeclared port.
            self.tcp(source, &service, asked.port, false, &mut out);
            return Ok(out);
        };
        out.destination = Some(format!(
            "{} port {} ({}), {}",
            hostname(snapshot, &service.key),
            port.port,
            port.name.as_deref().unwrap_or("unnamed"),
            protocol(port)
        ));
        match Declared::of(port) {
            Declared::Http | Declared::Http2 => {}
            Declared::Unknown => out.notes.push(
                "the port declares no protocol: the proxy reads the first bytes, and an HTTP request is routed as explained here".to_owned(),
            ),
            Declared::Opaque => {
                self.tcp(source, &service, asked.port, true, &mut out);
                return Ok(out);
            }
        }
        self.http(source, &service, asked, &mut out);
        Ok(out)
    }

    /// The Service the proxy finds behind the address the pod dials for the URL's host, as
    /// `outbound::proxy` finds it: by that address.
    fn dialled(&self, source: &Pod, asked: &Asked, out: &mut Explanation) -> Option<Arc<Service>> {
        let snapshot = &self.view.snapshot;
        let namespace = &source.key.namespace;
        if let Ok(ip) = asked.host.parse::<Ipv4Addr>() {
            let addr = SocketAddrV4::new(ip, asked.port);
            if let Some(service) = snapshot.service_by_ip(ip) {
                return Some(service.clone());
            }
            if let Some(pod) = snapshot.pod_by_ip(ip) {
                out.outcome = format!(
                    "{addr} is pod {}'s address, not a Service's: no route applies; the proxy takes the connection to the pod as opaque TCP{}",
                    pod.key,
                    if snapshot.is_meshed(pod) { ", and the pod's policies decide it" } else { "" }
                );
                return None;
            }
            if let Some(entry) = snapshot.entry_for(addr, Some(namespace)) {
                return Some(entry.clone());
            }
            out.outcome = format!(
                "{addr} is no Service, pod or ServiceEntry address the mesh knows: the connection leaves as dialled (passthrough)"
            );
            return None;
        }
        let Some(service) = route::resolve_host(snapshot, &asked.host, namespace) else {
            out.outcome = format!(
                "{:?} names no Service (from namespace {namespace}) and no ServiceEntry host exported there: what it resolves to in DNS is reached as dialled (passthrough)",
                asked.host
            );
            return None;
        };
        match &service.entry {
            // Files rarely give Services their address: offline, Kubernetes is assumed to.
            None if service.cluster_ip.is_none() && self.settings.node.is_none() => {
                out.notes.push(format!(
                    "{} has no ClusterIP in the files: explained as Kubernetes assigns one (were it headless, `clusterIP: None`, no route would apply: the pod would dial its peers' addresses)",
                    service.key
                ));
                Some(service.clone())
            }
            None if service.cluster_ip.is_none() => {
                out.outcome = format!(
                    "{} is headless: DNS answers with its pods' addresses, so no route applies; the proxy takes each connection to the pod dialled as opaque TCP, and that pod's policies decide it",
                    service.key
                );
                None
            }
            None => Some(service.clone()),
            Some(entry) if entry.addresses.is_empty() && entry.resolution == Resolution::None => {
                out.outcome = format!(
                    "{:?} is a ServiceEntry host without addresses and with resolution NONE: the proxy cannot tell it from the address the pod's DNS gives, and the connection leaves as dialled (passthrough)",
                    asked.host
                );
                None
            }
            Some(_) => {
                out.notes.push(format!(
                    "{:?} is a ServiceEntry host: the proxy knows it by the address the pod's DNS answer gives, one of the entry's addresses or endpoints",
                    asked.host
                ));
                Some(service.clone())
            }
        }
    }

    /// An opaque connection, as `tcp::choose` takes it: a VirtualService `tcp` rule's
    /// backends, else the dialled Service's port (`declared`: the Service has that port).
    fn tcp(
        &self,
        source: &Pod,
        service: &Arc<Service>,
        port: u16,
        declared: bool,
        out: &mut Explanation,
    ) {
        let snapshot = &self.view.snapshot;
        if declared {
            out.notes.push(
                "the port is opaque TCP: HTTP rules do not apply, only a VirtualService's tcp rules"
                    .to_owned(),
            );
        }
        let dialled = || Chosen {
            backend: route::Backend::to(&service.key, port),
            service: Some(service.clone()),
            port,
            sent: None,
        };
        let chosen: Vec<Chosen> = match self.view.routes.tcp(&service.key, port, Some(source)) {
            Some(route) if route.backends.iter().any(|b| b.weight > 0) => {
                out.outcome = format!("tcp rule {}", route.name);
                route
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .map(|b| match super::tcp::routed(snapshot, b, port) {
                        Some((service, port, _)) => Chosen {
                            backend: b.clone(),
                            service: Some(service),
                            port,
                            sent: None,
                        },
                        // The dialled Service takes what names no known Service.
                        None => Chosen {
                            backend: b.clone(),
                            ..dialled()
                        },
                    })
                    .collect()
            }
            _ if !declared => {
                out.outcome = format!(
                    "refused (UH): {} declares no TCP port {port} and no tcp rule takes it",
                    service.key
                );
                return;
            }
            _ => {
                out.outcome = format!("no tcp rule: the connection goes to {}", service.key);
                vec![dialled()]
            }
        };
        self.backends(source, service, chosen, out);
    }

    fn http(&self, source: &Pod, service: &Arc<Service>, asked: Asked, out: &mut Explanation) {
        let Asked {
            mut parts, port, ..
        } = asked;
        // What policies match and what is routed and forwarded is the same path.
        super::l7::normalize_request_path(&mut parts);
        let authority = route::request_authority(&parts).to_owned();
        let request = RequestInfo {
            method: &parts.method,
            uri: &parts.uri,
            authority: &authority,
            headers: &parts.headers,
            port,
            source: Some(source),
        };
        let routes = self.view.routes.get(&service.key);
        let selection = routes.map_or(Selection::Unrouted, |r| r.select(&request));
        out.routes = routes.map(|r| r.explain(&request));
        let (backends, sent) = match selection {
            Selection::NoMatch => {
                out.outcome = "404 NR (route not found): routes apply to this client, none matches"
                    .to_owned();
                return;
            }
            Selection::Unrouted => {
                out.outcome = format!(
                    "no route applies: the request goes to {} itself",
                    hostname(&self.view.snapshot, &service.key)
                );
                out.rule.push(format!(
                    "retries: {} (Istio's default for a route without retries; only requests safe to repeat)",
                    retries(&RetryPlan::istio_default())
                ));
                (vec![route::Backend::to(&service.key, port)], parts)
            }
            Selection::Rule(selected) => {
                let rule = selected.rule;
                out.rule = rule_lines(rule);
                out.outcome = format!("rule {}", rule.name);
                if let Some(abort) = rule.fault.as_ref().and_then(|f| f.abort.as_ref()) {
                    if abort.percentage >= 100.0 {
                        out.outcome
                            .push_str(": the fault aborts every request before it leaves");
                        return;
                    }
                }
                match &rule.action {
                    RuleAction::Redirect(_) => {
                        let location = selected
                            .redirect(&parts)
                            .and_then(|r| r.headers().get(header::LOCATION).cloned());
                        out.outcome = format!(
                            "rule {} answers a redirect{}",
                            rule.name,
                            location
                                .and_then(|l| l.to_str().ok().map(|l| format!(" to {l}")))
                                .unwrap_or_default()
                        );
                        return;
                    }
                    RuleAction::Respond { status, .. } => {
                        out.outcome = format!("rule {} answers {status} itself", rule.name);
                        return;
                    }
                    RuleAction::Forward(backends) => {
                        if backends.iter().all(|b| b.weight == 0) {
                            out.outcome.push_str(": no backend to send it to (503 UH)");
                            return;
                        }
                        let path = parts.uri.clone();
                        selected.rewrite(&mut parts);
                        route::apply_header_ops(&rule.request_headers, &mut parts.headers);
                        if parts.uri != path {
                            out.rule.push(format!("path sent: {}", parts.uri));
                        }
                        let backends = backends.iter().filter(|b| b.weight > 0).cloned();
                        (backends.collect(), parts)
                    }
                }
            }
        };
        let snapshot = &self.view.snapshot;
        let chosen = backends
            .into_iter()
            .map(|backend| {
                let service = backend
                    .service
                    .as_ref()
                    .and_then(|key| snapshot.services.get(key))
                    .cloned();
                let port = match (&service, backend.port) {
                    (_, Some(port)) => port,
                    (Some(s), None) => super::l7::service_port(s, port).unwrap_or(port),
                    (None, None) => port,
                };
                let mut sent = sent.clone();
                route::apply_header_ops(&backend.request_headers, &mut sent.headers);
                Chosen {
                    backend,
                    service,
                    port,
                    sent: Some(sent),
                }
            })
            .collect();
        self.backends(source, service, chosen, out);
    }

    /// Each backend's cluster, policy and endpoints, and what the endpoints' policies decide.
    fn backends(
        &self,
        source: &Pod,
        dialled: &Service,
        chosen: Vec<Chosen>,
        out: &mut Explanation,
    ) {
        let snapshot = &self.view.snapshot;
        let total: u64 = chosen.iter().map(|c| u64::from(c.backend.weight)).sum();
        let now = Instant::now();
        for Chosen {
            backend,
            service,
            port,
            sent,
        } in chosen
        {
            let weight = route::share(backend.weight, total.max(1));
            let Some(service) = service else {
                out.backends.push(BackendTrace {
                    cluster: backend.host.to_string(),
                    weight,
                    error: Some(format!(
                        "{:?} is not a Service or ServiceEntry host: 503 NC (no cluster)",
                        backend.host
                    )),
                    ..BackendTrace::default()
                });
                continue;
            };
            let key = ClusterKey::new(service.key.clone(), port, backend.subset.clone());
            let mut trace = BackendTrace {
                cluster: key.to_string(),
                weight,
                ..BackendTrace::default()
            };
            if !backend.request_headers.is_empty() {
                trace.policy.push(format!(
                    "request headers: {}",
                    header_ops(&backend.request_headers)
                ));
            }
            let built = self
                .view
                .inspect_cluster(self.clusters, &key, Some(&source.key.namespace));
            let built = match built {
                Ok(built) => built,
                Err(e) => {
                    trace.error = Some(format!("503 NC: {e}"));
                    out.backends.push(trace);
                    continue;
                }
            };
            trace.policy.extend(policy_lines(&built));
            if built.is_passthrough() {
                trace.policy.push(
                    "resolution NONE: the connection goes to the address the pod dialled"
                        .to_owned(),
                );
            }
            let mut listed: HashSet<&ObjectKey> = HashSet::new();
            for e in built.endpoints(now) {
                // The pod that owns the address decides, whatever the endpoint claims.
                let owner = snapshot.pod_by_ip(*e.addr.ip()).map(|p| &**p);
                listed.extend(owner.map(|p| &p.key));
                trace.endpoints.push(EndpointTrace {
                    address: e.addr.to_string(),
                    pod: owner.or(e.pod.map(|p| &**p)).map(|p| p.key.to_string()),
                    node: e.node.map(str::to_owned),
                    path: self.path(source, owner, e.node),
                    ejected: e.ejected,
                    authorization: self.authorize(source, owner, e.addr, sent.as_ref()),
                });
            }
            // Pods the cluster selects that are no endpoint (yet): no address, not ready;
            // offline, every pod (files give pods no address).
            let subset = match &built.policy().subset {
                cluster::SubsetMatch::Labels(labels) => Some(labels.clone()),
                _ => None,
            };
            let service_port = service.ports.iter().find(|p| p.port == port);
            for pod in service.selected(&snapshot.pods) {
                if listed.contains(&pod.key) || subset.as_ref().is_some_and(|l| !pod.carries(l)) {
                    continue;
                }
                let Some(target) = service_port.and_then(|p| p.target_on(pod)) else {
                    continue;
                };
                let addr = SocketAddrV4::new(pod.ip.unwrap_or(Ipv4Addr::UNSPECIFIED), target);
                trace.endpoints.push(EndpointTrace {
                    address: "-".to_owned(),
                    pod: Some(pod.key.to_string()),
                    node: pod.node.as_deref().map(str::to_owned),
                    path: format!(
                        "no endpoint yet ({}); once ready: {}",
                        if pod.ip.is_none() {
                            "no address"
                        } else {
                            "not ready"
                        },
                        self.path(source, Some(pod), pod.node.as_deref())
                    ),
                    ejected: false,
                    authorization: self.authorize(source, Some(pod), addr, sent.as_ref()),
                });
            }
            if built.is_empty() && !built.is_passthrough() {
                trace.error = Some("no ready endpoint: 503 UH (no healthy upstream)".to_owned());
            }
            out.backends.push(trace);
        }
        if dialled.entry.is_some() && out.backends.iter().all(|b| b.endpoints.is_empty()) {
            out.notes
                .push("a ServiceEntry host: its endpoints are outside the mesh".to_owned());
        }
    }

    /// How the source proxy reaches an endpoint (`Dialer::via`).
    fn path(&self, source: &Pod, pod: Option<&Pod>, node: Option<&str>) -> String {
        let snapshot = &self.view.snapshot;
        let meshed = pod.is_some_and(|p| snapshot.is_meshed(p));
        match (node, source.node.as_deref()) {
            _ if self.settings.sidecar => "sidecar: to the destination's sidecar".to_owned(),
            (Some(to), Some(from)) if to == from => {
                if meshed {
                    "same node: this proxy connects to the pod and applies its policies".to_owned()
                } else {
                    "same node: to the pod, outside the mesh".to_owned()
                }
            }
            (Some(to), _) if meshed && !self.settings.mtls => format!(
                "none: the pod is on {to}, and without a mesh CA this proxy sends nothing to another node (503)"
            ),
            (Some(to), _) if meshed => {
                format!("HBONE (mTLS, port 15008) to {to}'s proxy, which delivers to the pod")
            }
            (Some(to), _) => format!("plaintext to {to}: the pod is not in the mesh"),
            (None, _) => "direct: an address outside the cluster's nodes".to_owned(),
        }
    }

    /// What the destination's AuthorizationPolicies decide about the request (`sent`) or
    /// connection (`None`), as `authz::check` decides at the pod's node.
    fn authorize(
        &self,
        source: &Pod,
        pod: Option<&Pod>,
        addr: SocketAddrV4,
        sent: Option<&http::request::Parts>,
    ) -> String {
        let snapshot = &self.view.snapshot;
        let Some(pod) = pod.filter(|p| snapshot.is_meshed(p)) else {
            return "not enforced: the destination is not in the mesh".to_owned();
        };
        // Read, not cached in the live view: inspecting changes nothing the proxy keeps.
        let policies = authz::policies_for(snapshot, pod, ROOT_NAMESPACE);
        if policies.is_empty() {
            return "allowed: no AuthorizationPolicy applies".to_owned();
        }
        // Without a mesh CA nothing is mTLS, not even the kernel's word on one node: the
        // caller is known by its address only.
        let principal = self.settings.mtls.then(|| {
            Identity::new(
                self.settings.trust_domain,
                &source.key.namespace,
                &source.service_account,
            )
            .principal()
        });
        let ip = IpAddr::V4(source.ip.unwrap_or(Ipv4Addr::UNSPECIFIED));
        let attributes = Attributes {
            principal: principal.as_deref(),
            namespace: self.settings.mtls.then_some(&*source.key.namespace),
            source_ip: ip,
            remote_ip: ip,
            destination_ip: IpAddr::V4(*addr.ip()),
            destination_port: addr.port(),
            sni: None,
            http: sent.map(|parts| Http {
                host: route::request_authority(parts),
                method: parts.method.as_str(),
                path: parts
                    .uri
                    .path_and_query()
                    .map_or(parts.uri.path(), |p| p.as_str()),
                headers: &parts.headers,
            }),
        };
        let aliases = super::authz::aliases(
            self.settings.aliases,
            &snapshot.mesh_config.trust_domain_aliases,
        );
        let trust = TrustDomains {
            local: self.settings.trust_domain,
            aliases: &aliases,
        };
        let verdict = authz::decide(&policies, &attributes, trust);
        let mut said = match (verdict.allowed, verdict.policy) {
            (true, Some(p)) => format!("allowed by ALLOW policy {p}"),
            (true, None) => "allowed: no policy that applies denies it".to_owned(),
            (false, Some(p)) => format!("denied (403) by DENY policy {p}"),
            (false, None) => "denied (403): ALLOW policies apply and none matches".to_owned(),
        };
        if !verdict.audited.is_empty() {
            let audited: Vec<_> = verdict.audited.iter().map(ToString::to_string).collect();
            said.push_str(&format!("; audited by {}", audited.join(", ")));
        }
        for shadow in [&verdict.dry_run_deny, &verdict.dry_run_allow]
            .into_iter()
            .flatten()
        {
            said.push_str(&format!(
                "; dry run: would be {}{}",
                if shadow.allowed { "allowed" } else { "denied" },
                shadow
                    .policy
                    .map(|p| format!(" by {p}"))
                    .unwrap_or_default()
            ));
        }
        said
    }
}

fn ask(question: &Question) -> Result<Asked, ExplainError> {
    let bad = |reason: &str| ExplainError::Url {
        url: question.url.clone(),
        reason: reason.to_owned(),
    };
    let uri: Uri = question
        .url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => {
            return Err(bad(
                "only http:// (a pod's TLS is opaque TCP to the mesh: explain it with http:// and the port)",
            ))
        }
        None => return Err(bad("it has no scheme (http://host/path)")),
    }
    let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
    let host = authority.host().to_owned();
    let port = authority.port_u16().unwrap_or(80);
    let method = match &question.method {
        Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| ExplainError::Method(m.clone()))?,
        None => Method::GET,
    };
    let mut headers = HeaderMap::new();
    for line in &question.headers {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ExplainError::Header(line.clone()))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| ExplainError::Header(line.clone()))?;
        let value =
            HeaderValue::from_str(value.trim()).map_err(|_| ExplainError::Header(line.clone()))?;
        headers.append(name, value);
    }
    // As curl sends it: the URL's authority, unless a header says otherwise.
    if !headers.contains_key(header::HOST) {
        let value = HeaderValue::from_str(authority.as_str()).map_err(|_| bad("its host"))?;
        headers.insert(header::HOST, value);
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut parts = http::Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .map_err(|e| bad(&e.to_string()))?
        .into_parts()
        .0;
    parts.headers = headers;
    Ok(Asked { parts, host, port })
}

fn hostname(snapshot: &Snapshot, key: &ObjectKey) -> String {
    snapshot
        .services
        .get(key)
        .map_or_else(|| key.to_string(), |s| s.hostname())
}

fn protocol(port: &crate::model::ServicePort) -> String {
    let from = match (&port.app_protocol, &port.name) {
        (Some(app), _) => format!("appProtocol {app}"),
        (None, Some(name)) => format!("port name {name}"),
        (None, None) => "undeclared".to_owned(),
    };
    let what = match Declared::of(port) {
        Declared::Http => "HTTP",
        Declared::Http2 => "HTTP/2",
        Declared::Unknown => "sniffed",
        Declared::Opaque => "opaque TCP",
    };
    format!("{what} ({from})")
}

/// The matched rule's timeout, retries, faults, mirrors, rewrites and header changes.
fn rule_lines(rule: &Rule) -> Vec<String> {
    let mut lines = vec![format!("action: {}", rule.summary())];
    lines.push(match rule.timeout {
        Some(t) => format!("timeout: {}", secs(t)),
        None => "timeout: none".to_owned(),
    });
    lines.push(match &rule.retries {
        Some(plan) => format!("retries: {}", retries(plan)),
        None => format!(
            "retries: {} (Istio's default; only requests safe to repeat)",
            retries(&RetryPlan::istio_default())
        ),
    });
    if let Some(fault) = &rule.fault {
        if let Some(delay) = &fault.delay {
            lines.push(format!(
                "fault: {} delay for {}% of requests",
                secs(delay.fixed_delay),
                delay.percentage
            ));
        }
        if let Some(abort) = &fault.abort {
            let error = match abort.error {
                AbortError::HttpStatus(s) => format!("HTTP {s}"),
                AbortError::GrpcStatus(s) => format!("gRPC status {s}"),
            };
            lines.push(format!(
                "fault: abort with {error} for {}% of requests",
                abort.percentage
            ));
        }
    }
    for m in rule.mirrors.iter() {
        lines.push(format!(
            "mirror: {}{} ({}% of requests)",
            m.host,
            m.subset
                .as_deref()
                .map(|s| format!(" {s}"))
                .unwrap_or_default(),
            m.percentage
        ));
    }
    if let Some(authority) = rule.rewrite.as_ref().and_then(|r| r.authority.as_ref()) {
        lines.push(format!("authority sent: {authority}"));
    }
    if !rule.request_headers.is_empty() {
        lines.push(format!(
            "request headers: {}",
            header_ops(&rule.request_headers)
        ));
    }
    if !rule.response_headers.is_empty() {
        lines.push(format!(
            "response headers: {}",
            header_ops(&rule.response_headers)
        ));
    }
    lines
}

fn retries(plan: &RetryPlan) -> String {
    if plan.attempts == 0 {
        return "none".to_owned();
    }
    let mut on: Vec<String> = crate::model::traffic::RetryPolicy::ALL
        .into_iter()
        .filter(|p| plan.on(*p))
        .map(|p| p.as_str().to_owned())
        .collect();
    on.extend(plan.statuses.iter().map(u16::to_string));
    let mut s = format!("{} retries on {}", plan.attempts, on.join(","));
    if let Some(t) = plan.per_try_timeout {
        s.push_str(&format!(", {} per try", secs(t)));
    }
    s
}

fn header_ops(ops: &HeaderOps) -> String {
    let mut parts = Vec::new();
    parts.extend(
        ops.set
            .iter()
            .map(|h| format!("set {}={}", h.name, h.value)),
    );
    parts.extend(
        ops.add
            .iter()
            .map(|h| format!("add {}={}", h.name, h.value)),
    );
    parts.extend(ops.remove.iter().map(|h| format!("remove {h}")));
    parts.join(", ")
}

fn policy_lines(built: &cluster::Cluster) -> Vec<String> {
    let policy = built.policy();
    let mut lines = vec![match &policy.rule {
        Some(rule) => format!("DestinationRule {rule}"),
        None => "no DestinationRule".to_owned(),
    }];
    lines.push(format!(
        "load balancer: {}",
        match &policy.lb {
            Lb::RoundRobin => "ROUND_ROBIN".to_owned(),
            Lb::LeastRequest => "LEAST_REQUEST".to_owned(),
            Lb::Random => "RANDOM".to_owned(),
            Lb::Hash(key) => format!("consistent hash on {key:?}"),
        }
    ));
    let limits = &policy.limits;
    let limit = |n: u32| {
        if n == u32::MAX {
            "∞".to_owned()
        } else {
            n.to_string()
        }
    };
    if [
        limits.max_connections,
        limits.max_pending,
        limits.max_requests,
        limits.max_retries,
    ]
    .iter()
    .any(|n| *n != u32::MAX)
    {
        lines.push(format!(
            "circuit breakers: {} connections, {} pending, {} requests, {} retries",
            limit(limits.max_connections),
            limit(limits.max_pending),
            limit(limits.max_requests),
            limit(limits.max_retries)
        ));
    }
    if let Some(outlier) = &policy.outlier {
        lines.push(format!(
            "outlier detection: {} consecutive 5xx, every {}, ejected for {}, at most {}%",
            outlier
                .consecutive_5xx
                .map_or_else(|| "off".to_owned(), |n| n.to_string()),
            secs(outlier.interval),
            secs(outlier.base_ejection_time),
            outlier.max_ejection_percent
        ));
    }
    if let Some(t) = policy.connect_timeout {
        lines.push(format!("connect timeout: {}", secs(t)));
    }
    if built.origination().is_some() {
        lines.push("TLS originated to the endpoints (DestinationRule tls)".to_owned());
    }
    lines
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Request:     {}", self.request)?;
        writeln!(
            f,
            "From:        {} on {} ({})",
            self.source.pod,
            self.source.node.as_deref().unwrap_or("no node"),
            self.source.identity.as_deref().unwrap_or("no identity")
        )?;
        if let Some(destination) = &self.destination {
            writeln!(f, "Destination: {destination}")?;
        }
        if let Some(routes) = &self.routes {
            if !routes.virtual_services.is_empty() {
                writeln!(f, "VirtualServices:")?;
                for vs in &routes.virtual_services {
                    let mark = if vs.chosen { "*" } else { "-" };
                    writeln!(f, "  {mark} {}: {}", vs.name, vs.reason)?;
                }
            }
            if !routes.rules.is_empty() {
                writeln!(f, "Rules tried:")?;
                for rule in &routes.rules {
                    let mark = if rule.chosen { "*" } else { "-" };
                    writeln!(
                        f,
                        "  {mark} {} [{}]: {}",
                        rule.name, rule.requires, rule.reason
                    )?;
                }
            }
        }
        writeln!(f, "Outcome:     {}", self.outcome)?;
        for line in &self.rule {
            writeln!(f, "  {line}")?;
        }
        for backend in &self.backends {
            writeln!(f, "Backend:     {} ({}%)", backend.cluster, backend.weight)?;
            for line in &backend.policy {
                writeln!(f, "  {line}")?;
            }
            if let Some(error) = &backend.error {
                writeln!(f, "  error: {error}")?;
            }
            for e in &backend.endpoints {
                writeln!(
                    f,
                    "  endpoint {} {} on {}{}",
                    e.address,
                    e.pod.as_deref().unwrap_or("(no pod)"),
                    e.node.as_deref().unwrap_or("?"),
                    if e.ejected { " [EJECTED]" } else { "" }
                )?;
                writeln!(f, "    path: {}", e.path)?;
                writeln!(f, "    authorization: {}", e.authorization)?;
            }
        }
        for note in &self.notes {
            writeln!(f, "Note:        {note}")?;
        }
        Ok(())
    }
}
