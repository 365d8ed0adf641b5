//! Route tables: which rule of which VirtualService, HTTPRoute or GRPCRoute handles a request
//! to a Service.
//!
//! [`RouteIndex::build`] compiles the routing configuration of one snapshot into a
//! [`ServiceRoutes`] per Service that some route names; [`ServiceRoutes::select`] then answers
//! per request without allocating. Everything that depends only on configuration (host
//! resolution, backend lookup, precedence order, regexes) is settled at build time; what
//! depends on the client (its namespace, for `exportTo` and consumer routes) is a short scan
//! over the few candidates of the Service.
//!
//! Istio (`VirtualService`) semantics:
//! - A VirtualService applies when it is bound to the mesh (`gateways` empty or naming `mesh`)
//!   and one of its `hosts` names the Service: a short name (in the VirtualService's
//!   namespace), `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local`, or a wildcard
//!   (`*.ns.svc.cluster.local`, `*`) matched against the FQDN. Hosts that are not Services
//!   (ServiceEntry hosts, external names) are ignored here.
//! - Several VirtualServices for one Service: the most specific host wins (an exact host before
//!   wildcards, longer wildcard suffixes first, as Envoy picks virtual hosts); then the one in
//!   the client's namespace, then the one in the Service's namespace, then the smallest
//!   `namespace/name`. Istio uses one VirtualService per host for sidecars; it does not merge.
//! - `exportTo` empty or `*`: visible to every client; `.`: to clients in the VirtualService's
//!   namespace; a namespace: to clients there. A client whose pod is unknown sees only
//!   VirtualServices exported everywhere.
//! - Rules are tried in order; a rule without `match` matches everything; matches are OR-ed,
//!   the fields of one match AND-ed. As Istio does when it builds a sidecar's routes, matches
//!   whose `port`, `sourceLabels`, `sourceNamespace` or `gateways` exclude this client and port
//!   are dropped first: when no rule is left the request is [`Selection::Unrouted`] (Istio then
//!   uses the Service's default route); when rules are left but none matches it is
//!   [`Selection::NoMatch`] (Envoy's 404 NR).
//! - The uri is matched on the path as received, without the query string and without
//!   normalisation; query parameters are compared undecoded, the first occurrence counting.
//!   A header sent several times is matched on its values joined with `,`, as Envoy does.
//!   `withoutHeaders` entries hold when the header match fails (an absent header included).
//! - `rewrite.uri` replaces the matched prefix: the `prefix` of a prefix match, `/` for a rule
//!   or match without uri condition (Istio routes those with a `/` prefix match), the whole
//!   path after an exact or regex match — Envoy's `prefix_rewrite`. `uriRegexRewrite` replaces
//!   every hit; RE2's `\1` in the substitution refers to a capture group.
//! - Retries: `None` when the rule sets none (the caller applies [`RetryPlan::istio_default`]);
//!   `attempts: 0` disables them; `attempts > 0` without `retryOn` uses Istio's default
//!   conditions; status codes in `retryOn` imply `retriable-status-codes`.
//! - A timeout of 0 disables the timeout and is reported as `None` (Istio's default too).
//! - A single destination receives all requests whatever its weight.
//! - TCP rules: the first rule whose match holds (port, source labels and namespace, gateways,
//!   destination subnets checked against the Service's ClusterIP; a headless Service never
//!   satisfies a subnet condition). No rule matching means the connection is unrouted.
//!
//! Gateway API (`HTTPRoute`, `GRPCRoute`, attached to Services as GAMMA specifies):
//! - A route attaches through a `parentRef` of kind `Service` (group `""` or `core`), in the
//!   parentRef's namespace or else the route's; `port` (or `sectionName`, a Service port name)
//!   restricts it to that port. Routes whose parents are all Gateways are ignored; `hostnames`
//!   are ignored for Service parents.
//! - Producer routes (in the Service's namespace) serve every client; consumer routes (in
//!   another namespace) serve only clients of that namespace and replace the producer routes
//!   for them whenever one of them applies to the dialled port.
//! - Precedence across all matches of all applicable rules: GRPCRoute matches first (longest
//!   exact service, then method, then most headers), then HTTPRoute matches: exact path, then
//!   longest prefix, then regex (longest pattern first, as Istio sorts), then a method match,
//!   most header matches, most query matches. Remaining ties go to the smaller
//!   `namespace/name` (the model has no creation timestamp to find the oldest route), then to
//!   rule and match order.
//! - `PathPrefix` is element-wise (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`);
//!   `ReplacePrefixMatch` follows the Gateway API table (`/foo` → `/xyz`: `/foo/bar` →
//!   `/xyz/bar`, `/foo` → `/xyz`). A rule without backendRefs nor redirect answers 500; a
//!   backendRef that is not a known Service has no `service` (the caller answers 503 NC).
//!   Cross-namespace backendRefs are allowed (the model has no ReferenceGrant).
//! - `timeouts.request` is the rule's timeout; `timeouts.backendRequest` becomes the per-try
//!   timeout of Istio's default retry plan (Istio's translation keeps its default retries).
//! - A redirect without `port` uses the scheme's well-known port when `scheme` is set, else the
//!   request's port (from `Host`, else the dialled one); the default status is 302 (Istio's is
//!   301). Backend filters other than header
//!   modifiers are ignored.
//!
//! Where both kinds name a Service, a VirtualService visible to the client wins; Gateway API
//! routes are consulted only when it leaves the request unrouted.

use std::{
    cmp::Reverse,
    collections::{hash_map::Entry, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use http::{
    header,
    request::Parts,
    uri::{Authority, PathAndQuery},
    HeaderMap, HeaderName, HeaderValue, Response, Uri, Version,
};

use crate::model::{
    traffic::{
        BackendObjectRef, BackendRef, Destination, Fault, GrpcMethodMatch, GrpcRoute,
        GrpcRouteMatch, Header, HeaderOps, HttpAction, HttpMatch, HttpRoute, HttpRouteMatch,
        IpBlock, L4Match, NamedMatch, ParentRef, PathMatch, PathModifier, RedirectPort, Retries,
        RetryOn, RetryPolicy, RouteFilter, StringMatch, TcpRule, VirtualService, MESH_GATEWAY,
    },
    Labels, ObjectKey, Pod, Service, Snapshot,
};

/// The DNS domain of the cluster, as in `name.ns.svc.cluster.local`.
const CLUSTER_DOMAIN: &str = "cluster.local";

/// The per-Service route tables of one snapshot.
#[derive(Debug, Default)]
pub struct RouteIndex {
    services: HashMap<ObjectKey, Arc<ServiceRoutes>>,
}

/// What a client sent, as far as routing is concerned.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a http::Method,
    /// Path and query as received.
    pub uri: &'a http::Uri,
    /// `:authority` or `Host`, possibly with a port.
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The Service port the client dialled.
    pub port: u16,
    /// The client pod, if known.
    pub source: Option<&'a Pod>,
}

#[derive(Clone, Copy, Debug)]
pub enum Selection<'a> {
    /// No VirtualService / HTTPRoute / GRPCRoute applies to this service+port for this client:
    /// the request goes to the dialled Service as without a mesh.
    Unrouted,
    /// Routes apply but no rule matched: Envoy answers 404 with flag NR.
    NoMatch,
    Rule(Selected<'a>),
}

/// The rule that handles a request, with what its rewrite and redirect need.
#[derive(Clone, Copy, Debug)]
pub struct Selected<'a> {
    pub rule: &'a Rule,
    /// The prefix the request matched by, when it matched by prefix (`/` for an Istio rule
    /// without uri condition); `None` after an exact, regex or gRPC method match.
    pub matched_prefix: Option<&'a str>,
    /// The Service port the client dialled.
    pub port: u16,
}

/// The routes of one Service.
#[derive(Debug)]
pub struct ServiceRoutes {
    service: ObjectKey,
    cluster_ip: Option<Ipv4Addr>,
    /// Most specific host first, then by key.
    virtual_services: Vec<Candidate>,
    producer: GammaTable,
    /// Consumer routes by the namespace they live (and apply) in.
    consumers: HashMap<Arc<str>, GammaTable>,
}

/// One compiled HTTP rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// For logs: `VirtualService bookinfo/reviews http[1]`, `HTTPRoute ns/name rules[0]`.
    pub name: Arc<str>,
    pub action: RuleAction,
    /// `None`: no route timeout.
    pub timeout: Option<Duration>,
    /// `None`: not configured (the caller applies [`RetryPlan::istio_default`]).
    pub retries: Option<RetryPlan>,
    pub fault: Option<Fault>,
    pub mirrors: Arc<[MirrorTarget]>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<RuleRewrite>,
    /// The rule came from a GRPCRoute.
    pub grpc: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RuleAction {
    Forward(Arc<[Backend]>),
    Redirect(RedirectAction),
    Respond { status: u16, body: Option<Arc<str>> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `None`: the host is not a known Service (the caller answers 503 NC).
    pub service: Option<ObjectKey>,
    /// As written, for logs.
    pub host: Arc<str>,
    /// `None`: the dialled port.
    pub port: Option<u16>,
    pub subset: Option<Arc<str>>,
    /// Relative weight; 0 is never picked.
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MirrorTarget {
    pub service: Option<ObjectKey>,
    pub host: Arc<str>,
    pub port: Option<u16>,
    pub subset: Option<Arc<str>>,
    /// Share of requests mirrored, 0-100.
    pub percentage: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPlan {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub policies: RetryPolicies,
    /// Status codes retried under `retriable-status-codes`.
    pub statuses: Arc<[u16]>,
}

/// A set of [`RetryPolicy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryPolicies(u32);

#[derive(Clone, Debug, PartialEq)]
pub struct RedirectAction {
    pub scheme: Option<Arc<str>>,
    pub host: Option<Arc<str>>,
    /// `None`: keep the request's port unless the host or the scheme changes.
    pub port: Option<RedirectPort>,
    pub path: Option<PathRewrite>,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RuleRewrite {
    pub path: Option<PathRewrite>,
    /// New `Host` / `:authority`.
    pub authority: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathRewrite {
    /// Replaces the whole path.
    Full(Arc<str>),
    /// Istio `rewrite.uri`: replaces the matched prefix, or the whole path.
    MatchedPrefix(Arc<str>),
    /// Gateway API `ReplacePrefixMatch`: element-wise.
    PrefixElements(Arc<str>),
    /// Every hit of `pattern` replaced by `substitution` (Rust `regex` syntax).
    Regex {
        pattern: crate::model::traffic::Pattern,
        substitution: Arc<str>,
    },
}

/// The TCP rule that handles a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRoute {
    pub name: Arc<str>,
    pub backends: Arc<[Backend]>,
}

#[derive(Debug)]
struct Candidate {
    /// `usize::MAX` for an exact host, the suffix length for a wildcard.
    specificity: usize,
    vs: Arc<CompiledVs>,
}

#[derive(Debug)]
struct CompiledVs {
    key: ObjectKey,
    export_to: Arc<[Arc<str>]>,
    http: Box<[HttpEntry]>,
    tcp: Box<[TcpEntry]>,
}

#[derive(Debug)]
struct HttpEntry {
    matches: Box<[Conditions]>,
    rule: Rule,
}

#[derive(Debug)]
struct TcpEntry {
    matches: Box<[L4Match]>,
    route: TcpRoute,
}

#[derive(Debug, Default)]
struct GammaTable {
    entries: Vec<GammaEntry>,
}

#[derive(Debug)]
struct GammaEntry {
    /// Empty: every port.
    ports: Box<[u16]>,
    conditions: Conditions,
    rule: Arc<Rule>,
}

/// The conditions of one match, compiled.
#[derive(Clone, Debug)]
struct Conditions {
    path: PathCondition,
    scheme: Option<StringMatch>,
    method: Option<StringMatch>,
    authority: Option<StringMatch>,
    headers: Box<[HeaderCondition]>,
    without_headers: Box<[HeaderCondition]>,
    query: Box<[NamedMatch]>,
    port: Option<u16>,
    source_labels: Labels,
    source_namespace: Option<Arc<str>>,
    /// False when the match names gateways but not `mesh`.
    mesh: bool,
}

#[derive(Clone, Debug)]
enum PathCondition {
    Any,
    Exact {
        value: Arc<str>,
        ignore_case: bool,
    },
    Prefix {
        value: Arc<str>,
        ignore_case: bool,
    },
    Regex(crate::model::traffic::Pattern),
    /// Gateway API `PathPrefix`, trailing `/` removed.
    Elements(Arc<str>),
    Grpc(GrpcMethodMatch),
}

#[derive(Clone, Debug)]
struct HeaderCondition {
    name: HeaderKey,
    value: Option<StringMatch>,
}

/// Where a header condition reads its value; pseudo-headers come from the request head.
#[derive(Clone, Debug)]
enum HeaderKey {
    Authority,
    Method,
    Path,
    Scheme,
    Name(HeaderName),
    /// Not a valid name: never present.
    Invalid,
}

/// The order in which Gateway API matches are tried (smaller first).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// 0: GRPCRoute, 1: HTTPRoute.
    kind: u8,
    ranks: [usize; 5],
    route: ObjectKey,
    rule: usize,
    index: usize,
}

/// Gateway API rule, compiled once per route and shared by every Service it attaches to.
struct CompiledGammaRule {
    rule: Arc<Rule>,
    matches: Vec<(Conditions, Precedence)>,
}

impl RouteIndex {
    /// Built once per snapshot; cost O(routes), nothing per Service without routes.
    pub fn build(snapshot: &Snapshot) -> Self {
        let mut builders: HashMap<ObjectKey, Builder> = HashMap::new();
        let mut fqdns: Option<Vec<(String, &Arc<Service>)>> = None;

        for vs in snapshot.virtual_services.values() {
            if !vs.applies_to_mesh() {
                continue;
            }
            let compiled = Arc::new(CompiledVs::new(vs, snapshot));
            for host in vs.hosts.iter() {
                if let Some(suffix) = host.strip_prefix('*') {
                    let fqdns = fqdns.get_or_insert_with(|| {
                        snapshot
                            .services
                            .values()
                            .map(|s| (fqdn(&s.key), s))
                            .collect()
                    });
                    for (name, service) in fqdns.iter() {
                        // `*.a.b` matches `x.a.b`; a bare `*` matches everything.
                        if suffix.is_empty() || (suffix.starts_with('.') && name.ends_with(suffix))
                        {
                            builder(&mut builders, service).add_vs(suffix.len(), &compiled);
                        }
                    }
                } else if let Some(service) = resolve_host(snapshot, host, &vs.key.namespace) {
                    builder(&mut builders, service).add_vs(usize::MAX, &compiled);
                }
            }
        }

        for route in snapshot.http_routes.values() {
            let targets = service_parents(snapshot, &route.key, &route.parent_refs);
            if targets.is_empty() {
                continue;
            }
            let rules = compile_http_route(route, snapshot);
            for (service, ports) in targets {
                builder(&mut builders, service).add_gamma(&route.key, &ports, &rules);
            }
        }
        for route in snapshot.grpc_routes.values() {
            let targets = service_parents(snapshot, &route.key, &route.parent_refs);
            if targets.is_empty() {
                continue;
            }
            let rules = compile_grpc_route(route, snapshot);
            for (service, ports) in targets {
                builder(&mut builders, service).add_gamma(&route.key, &ports, &rules);
            }
        }

        Self {
            services: builders
                .into_iter()
                .map(|(key, b)| (key, Arc::new(b.finish())))
                .collect(),
        }
    }

    pub fn get(&self, service: &ObjectKey) -> Option<&Arc<ServiceRoutes>> {
        self.services.get(service)
    }

    /// TCP routes (VirtualService `spec.tcp`) for a service; used by the L4 path.
    pub fn tcp(&self, service: &ObjectKey, port: u16, source: Option<&Pod>) -> Option<&TcpRoute> {
        self.services.get(service)?.tcp(port, source)
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

impl ServiceRoutes {
    pub fn service(&self) -> &ObjectKey {
        &self.service
    }

    pub fn select<'a>(&'a self, request: &RequestInfo<'_>) -> Selection<'a> {
        let client = request.source.map(|p| &*p.key.namespace);
        if let Some(vs) = self.virtual_service(client, |vs| !vs.http.is_empty()) {
            match vs.select(request) {
                Selection::Unrouted => {}
                selection => return selection,
            }
        }
        if let Some(table) = client
            .filter(|ns| *ns != &*self.service.namespace)
            .and_then(|ns| self.consumers.get(ns))
        {
            match table.select(request) {
                Selection::Unrouted => {}
                selection => return selection,
            }
        }
        self.producer.select(request)
    }

    /// The TCP rule for a connection to `port`, if a VirtualService routes it.
    pub fn tcp(&self, port: u16, source: Option<&Pod>) -> Option<&TcpRoute> {
        let client = source.map(|p| &*p.key.namespace);
        let vs = self.virtual_service(client, |vs| !vs.tcp.is_empty())?;
        vs.tcp
            .iter()
            .find(|e| {
                e.matches.is_empty()
                    || e.matches
                        .iter()
                        .any(|m| l4_matches(m, port, source, self.cluster_ip))
            })
            .map(|e| &e.route)
    }

    /// The VirtualService this client sees for the Service, among those `wanted`.
    fn virtual_service(
        &self,
        client: Option<&str>,
        wanted: impl Fn(&CompiledVs) -> bool,
    ) -> Option<&CompiledVs> {
        let mut best: Option<(usize, u8, &CompiledVs)> = None;
        for candidate in &self.virtual_services {
            if best.is_some_and(|(s, _, _)| s > candidate.specificity) {
                break;
            }
            let vs = &*candidate.vs;
            if !wanted(vs) || !vs.visible_to(client) {
                continue;
            }
            let preference = if Some(&*vs.key.namespace) == client {
                0
            } else if vs.key.namespace == self.service.namespace {
                1
            } else {
                2
            };
            if best.is_none_or(|(_, p, _)| preference < p) {
                best = Some((candidate.specificity, preference, vs));
            }
        }
        best.map(|(_, _, vs)| vs)
    }
}

impl CompiledVs {
    fn new(vs: &VirtualService, snapshot: &Snapshot) -> Self {
        let http = vs
            .http
            .iter()
            .enumerate()
            .map(|(i, rule)| HttpEntry {
                matches: rule.matches.iter().map(Conditions::istio).collect(),
                rule: istio_rule(vs, i, rule, snapshot),
            })
            .collect();
        let tcp = vs
            .tcp
            .iter()
            .enumerate()
            .map(|(i, rule)| TcpEntry {
                matches: rule.matches.iter().cloned().collect(),
                route: tcp_route(vs, i, rule, snapshot),
            })
            .collect();
        Self {
            key: vs.key.clone(),
            export_to: vs.export_to.clone(),
            http,
            tcp,
        }
    }

    fn visible_to(&self, client: Option<&str>) -> bool {
        if self.export_to.is_empty() || self.export_to.iter().any(|e| &**e == "*") {
            return true;
        }
        let Some(client) = client else { return false };
        self.export_to
            .iter()
            .any(|e| &**e == client || (&**e == "." && client == &*self.key.namespace))
    }

    fn select<'a>(&'a self, request: &RequestInfo<'_>) -> Selection<'a> {
        let mut applicable = false;
        for entry in self.http.iter() {
            if entry.matches.is_empty() {
                return Selection::Rule(Selected {
                    rule: &entry.rule,
                    matched_prefix: Some("/"),
                    port: request.port,
                });
            }
            for conditions in entry.matches.iter() {
                if !conditions.applies(request) {
                    continue;
                }
                applicable = true;
                if let Some(matched_prefix) = conditions.matches(request) {
                    return Selection::Rule(Selected {
                        rule: &entry.rule,
                        matched_prefix,
                        port: request.port,
                    });
                }
            }
        }
        if applicable {
            Selection::NoMatch
        } else {
            Selection::Unrouted
        }
    }
}

impl GammaTable {
    fn select<'a>(&'a self, request: &RequestInfo<'_>) -> Selection<'a> {
        let mut applicable = false;
        for entry in &self.entries {
            if !entry.ports.is_empty() && !entry.ports.contains(&request.port) {
                continue;
            }
            applicable = true;
            if let Some(matched_prefix) = entry.conditions.matches(request) {
                return Selection::Rule(Selected {
                    rule: &entry.rule,
                    matched_prefix,
                    port: request.port,
                });
            }
        }
        if applicable {
            Selection::NoMatch
        } else {
            Selection::Unrouted
        }
    }
}

impl Conditions {
    fn any() -> Self {
        Self {
            path: PathCondition::Any,
            scheme: None,
            method: None,
            authority: None,
            headers: Box::default(),
            without_headers: Box::default(),
            query: Box::default(),
            port: None,
            source_labels: Labels::new(),
            source_namespace: None,
            mesh: true,
        }
    }

    fn istio(m: &HttpMatch) -> Self {
        let path = match &m.uri {
            None => PathCondition::Any,
            Some(StringMatch::Exact(value)) => PathCondition::Exact {
                value: value.clone(),
                ignore_case: m.ignore_uri_case,
            },
            Some(StringMatch::Prefix(value)) => PathCondition::Prefix {
                value: value.clone(),
                ignore_case: m.ignore_uri_case,
            },
            Some(StringMatch::Regex(p)) => PathCondition::Regex(p.clone()),
        };
        Self {
            path,
            scheme: m.scheme.clone(),
            method: m.method.clone(),
            authority: m.authority.clone(),
            headers: header_conditions(&m.headers),
            without_headers: header_conditions(&m.without_headers),
            query: m.query_params.iter().cloned().collect(),
            port: m.port,
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
            mesh: m.gateways.is_empty() || m.gateways.iter().any(|g| &**g == MESH_GATEWAY),
        }
    }

    fn http_route(m: &HttpRouteMatch) -> Self {
        let path = match &m.path {
            PathMatch::Exact(value) => PathCondition::Exact {
                value: value.clone(),
                ignore_case: false,
            },
            PathMatch::Prefix(value) => PathCondition::Elements(value.trim_end_matches('/').into()),
            PathMatch::Regex(p) => PathCondition::Regex(p.clone()),
        };
        Self {
            path,
            method: m.method.clone().map(StringMatch::Exact),
            headers: header_conditions(&m.headers),
            query: m.query_params.iter().cloned().collect(),
            ..Self::any()
        }
    }

    fn grpc_route(m: &GrpcRouteMatch) -> Self {
        Self {
            path: m
                .method
                .clone()
                .map_or(PathCondition::Any, PathCondition::Grpc),
            headers: header_conditions(&m.headers),
            ..Self::any()
        }
    }

    /// Whether the match concerns this client and port at all.
    fn applies(&self, request: &RequestInfo<'_>) -> bool {
        self.mesh
            && self.port.is_none_or(|p| p == request.port)
            && source_matches(&self.source_labels, &self.source_namespace, request.source)
    }

    /// `Some(matched prefix)` when the request matches.
    fn matches<'a>(&'a self, request: &RequestInfo<'_>) -> Option<Option<&'a str>> {
        let prefix = self.path.matches(request.uri.path())?;
        let holds = self
            .method
            .as_ref()
            .is_none_or(|m| m.matches(request.method.as_str()))
            && self
                .scheme
                .as_ref()
                .is_none_or(|m| m.matches(scheme(request.uri)))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(request.authority))
            && self.headers.iter().all(|h| h.holds(request))
            && !self.without_headers.iter().any(|h| h.holds(request))
            && self
                .query
                .iter()
                .all(|q| query_holds(q, request.uri.query()));
        holds.then_some(prefix)
    }
}

impl PathCondition {
    fn matches<'a>(&'a self, path: &str) -> Option<Option<&'a str>> {
        match self {
            PathCondition::Any => Some(Some("/")),
            PathCondition::Exact { value, ignore_case } => {
                let hit = if *ignore_case {
                    path.eq_ignore_ascii_case(value)
                } else {
                    path == &**value
                };
                hit.then_some(None)
            }
            PathCondition::Prefix { value, ignore_case } => {
                let hit = if *ignore_case {
                    path.len() >= value.len()
                        && path.as_bytes()[..value.len()].eq_ignore_ascii_case(value.as_bytes())
                } else {
                    path.starts_with(&**value)
                };
                hit.then_some(Some(value))
            }
            PathCondition::Regex(p) => p.is_match(path).then_some(None),
            PathCondition::Elements(value) => {
                let hit = path.starts_with(&**value)
                    && (path.len() == value.len() || path.as_bytes()[value.len()] == b'/');
                hit.then_some(Some(value))
            }
            PathCondition::Grpc(m) => grpc_method_matches(m, path).then_some(None),
        }
    }
}

fn grpc_method_matches(m: &GrpcMethodMatch, path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    match m {
        GrpcMethodMatch::Exact {
            service: s,
            method: m,
        } => s.as_deref().is_none_or(|s| s == service) && m.as_deref().is_none_or(|m| m == method),
        GrpcMethodMatch::Regex {
            service: s,
            method: m,
        } => {
            s.as_ref().is_none_or(|s| s.is_match(service))
                && m.as_ref().is_none_or(|m| m.is_match(method))
        }
    }
}

impl HeaderCondition {
    /// Whether the header is present and its value matches.
    fn holds(&self, request: &RequestInfo<'_>) -> bool {
        let check = |value: &str| self.value.as_ref().is_none_or(|m| m.matches(value));
        match &self.name {
            HeaderKey::Authority => check(request.authority),
            HeaderKey::Method => check(request.method.as_str()),
            HeaderKey::Path => check(
                request
                    .uri
                    .path_and_query()
                    .map_or(request.uri.path(), PathAndQuery::as_str),
            ),
            HeaderKey::Scheme => check(scheme(request.uri)),
            HeaderKey::Invalid => false,
            HeaderKey::Name(name) => {
                let mut values = request.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => false,
                    (Some(_), _) if self.value.is_none() => true,
                    (Some(one), None) => std::str::from_utf8(one.as_bytes()).is_ok_and(check),
                    (Some(first), Some(second)) => {
                        // Rare enough that joining is worth no special structure.
                        let mut joined = Vec::with_capacity(first.len() + second.len() + 1);
                        for (i, v) in [first, second].into_iter().chain(values).enumerate() {
                            if i > 0 {
                                joined.push(b',');
                            }
                            joined.extend_from_slice(v.as_bytes());
                        }
                        std::str::from_utf8(&joined).is_ok_and(check)
                    }
                }
            }
        }
    }
}

fn header_conditions(matches: &[NamedMatch]) -> Box<[HeaderCondition]> {
    matches
        .iter()
        .map(|m| HeaderCondition {
            name: match &*m.name {
                ":authority" | "host" => HeaderKey::Authority,
                ":method" => HeaderKey::Method,
                ":path" => HeaderKey::Path,
                ":scheme" => HeaderKey::Scheme,
                name => HeaderName::from_bytes(name.as_bytes())
                    .map_or(HeaderKey::Invalid, HeaderKey::Name),
            },
            value: m.value.clone(),
        })
        .collect()
}

fn query_holds(m: &NamedMatch, query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    let value = query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(name, _)| *name == &*m.name)
        .map(|(_, value)| value);
    match (value, &m.value) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(value), Some(sm)) => sm.matches(value),
    }
}

fn scheme(uri: &Uri) -> &str {
    uri.scheme_str().unwrap_or("http")
}

fn source_matches(labels: &Labels, namespace: &Option<Arc<str>>, source: Option<&Pod>) -> bool {
    if labels.is_empty() && namespace.is_none() {
        return true;
    }
    let Some(pod) = source else { return false };
    labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        && namespace.as_ref().is_none_or(|ns| *ns == pod.key.namespace)
}

fn l4_matches(m: &L4Match, port: u16, source: Option<&Pod>, cluster_ip: Option<Ipv4Addr>) -> bool {
    (m.gateways.is_empty() || m.gateways.iter().any(|g| &**g == MESH_GATEWAY))
        && m.port.is_none_or(|p| p == port)
        && source_matches(&m.source_labels, &m.source_namespace, source)
        && (m.destination_subnets.is_empty()
            || cluster_ip.is_some_and(|ip| {
                m.destination_subnets
                    .iter()
                    .any(|b: &IpBlock| b.contains(IpAddr::V4(ip)))
            }))
}

impl Rule {
    /// `roll` uniform in 0..u32::MAX (the caller draws it). Weighted pick; a single backend gets
    /// everything; all-zero weights pick none.
    pub fn pick(&self, roll: u32) -> Option<&Backend> {
        match &self.action {
            RuleAction::Forward(backends) => pick(backends, roll),
            _ => None,
        }
    }
}

impl TcpRoute {
    pub fn pick(&self, roll: u32) -> Option<&Backend> {
        pick(&self.backends, roll)
    }
}

fn pick(backends: &[Backend], roll: u32) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    // Scales the roll into 0..total without bias beyond 2^-32.
    let mut point = (u64::from(roll) * total) >> 32;
    for backend in backends {
        let weight = u64::from(backend.weight);
        if point < weight {
            return Some(backend);
        }
        point -= weight;
    }
    None
}

impl RetryPlan {
    /// What Istio applies to a route without `retries`: 2 retries on connect failures, refused
    /// streams, gRPC unavailable/cancelled and 503.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            policies: RetryPolicies::istio_default(),
            statuses: Arc::from([503u16]),
        }
    }

    fn from_istio(r: &Retries) -> Self {
        let per_try_timeout = r.per_try_timeout.filter(|d| !d.is_zero());
        if r.attempts == 0 {
            return Self {
                attempts: 0,
                per_try_timeout,
                policies: RetryPolicies::default(),
                statuses: Arc::from([]),
            };
        }
        if r.retry_on.is_empty() {
            return Self {
                attempts: r.attempts,
                per_try_timeout,
                ..Self::istio_default()
            };
        }
        let mut policies = RetryPolicies::default();
        let mut statuses = Vec::new();
        for on in r.retry_on.iter() {
            match *on {
                RetryOn::Policy(p) => policies.insert(p),
                RetryOn::Status(s) => statuses.push(s),
            }
        }
        if !statuses.is_empty() {
            policies.insert(RetryPolicy::RetriableStatusCodes);
        }
        Self {
            attempts: r.attempts,
            per_try_timeout,
            policies,
            statuses: statuses.into(),
        }
    }

    /// Whether a response with this status is retried (`5xx`, `gateway-error`,
    /// `retriable-4xx`, `retriable-status-codes`).
    pub fn retries_status(&self, status: u16) -> bool {
        (self.on(RetryPolicy::FiveXx) && (500..=599).contains(&status))
            || (self.on(RetryPolicy::GatewayError) && matches!(status, 502..=504))
            || (self.on(RetryPolicy::Retriable4xx) && status == 409)
            || (self.on(RetryPolicy::RetriableStatusCodes) && self.statuses.contains(&status))
    }

    pub fn on(&self, p: RetryPolicy) -> bool {
        self.policies.contains(p)
    }
}

impl RetryPolicies {
    pub fn istio_default() -> Self {
        let mut set = Self::default();
        for p in [
            RetryPolicy::ConnectFailure,
            RetryPolicy::RefusedStream,
            RetryPolicy::Unavailable,
            RetryPolicy::Cancelled,
            RetryPolicy::RetriableStatusCodes,
        ] {
            set.insert(p);
        }
        set
    }

    pub fn insert(&mut self, p: RetryPolicy) {
        self.0 |= 1 << p as u32;
    }

    pub fn contains(self, p: RetryPolicy) -> bool {
        self.0 & (1 << p as u32) != 0
    }
}

impl Selected<'_> {
    /// Applies the rule's rewrite (uri prefix / full path / regex, authority) to the request
    /// head. The query string is kept.
    pub fn rewrite(&self, parts: &mut Parts) {
        let Some(rewrite) = &self.rule.rewrite else {
            return;
        };
        if let Some(path) = &rewrite.path {
            let new = self.new_path(path, parts.uri.path());
            set_path(&mut parts.uri, &new);
        }
        if let Some(authority) = &rewrite.authority {
            set_authority(parts, authority);
        }
    }

    /// The response of a Redirect action (status + Location), built from the request head.
    pub fn redirect(&self, parts: &Parts) -> Option<Response<()>> {
        let RuleAction::Redirect(redirect) = &self.rule.action else {
            return None;
        };
        let (request_host, request_port) = split_host_port(request_authority(parts));
        let scheme = redirect
            .scheme
            .as_deref()
            .unwrap_or_else(|| scheme(&parts.uri));
        let host = redirect.host.as_deref().unwrap_or(request_host);
        let port = match redirect.port {
            Some(RedirectPort::Number(n)) => Some(n),
            Some(RedirectPort::FromProtocolDefault) => None,
            Some(RedirectPort::FromRequestPort) => Some(request_port.unwrap_or(self.port)),
            None if redirect.host.is_none() && redirect.scheme.is_none() => request_port,
            None => None,
        };
        let path = match &redirect.path {
            Some(rewrite) => self.new_path(rewrite, parts.uri.path()),
            None => parts.uri.path().to_owned(),
        };
        let mut location = format!("{scheme}://{host}");
        let default_port = match scheme {
            "https" => 443,
            _ => 80,
        };
        if let Some(port) = port.filter(|p| *p != default_port) {
            let _ = write!(location, ":{port}");
        }
        location.push_str(&path);
        if let Some(query) = parts.uri.query().filter(|_| !path.contains('?')) {
            location.push('?');
            location.push_str(query);
        }
        Response::builder()
            .status(redirect.status)
            .header(header::LOCATION, location)
            .body(())
            .ok()
    }

    fn new_path(&self, rewrite: &PathRewrite, path: &str) -> String {
        let new = match (rewrite, self.matched_prefix) {
            (PathRewrite::Full(p), _) | (PathRewrite::MatchedPrefix(p), None) => p.to_string(),
            (PathRewrite::MatchedPrefix(p), Some(prefix)) => {
                format!("{p}{}", path.get(prefix.len()..).unwrap_or_default())
            }
            (PathRewrite::PrefixElements(p), None) => p.to_string(),
            (PathRewrite::PrefixElements(p), Some(prefix)) => {
                let rest = path.get(prefix.len()..).unwrap_or_default();
                format!("{}{rest}", p.trim_end_matches('/'))
            }
            (
                PathRewrite::Regex {
                    pattern,
                    substitution,
                },
                _,
            ) => pattern
                .search()
                .replace_all(path, &**substitution)
                .into_owned(),
        };
        if new.is_empty() {
            "/".to_owned()
        } else {
            new
        }
    }
}

fn request_authority(parts: &Parts) -> &str {
    parts
        .uri
        .authority()
        .map(Authority::as_str)
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default()
}

/// `host:port`, `[v6]:port` or a bare host.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let split = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => Some(i),
        _ => None,
    };
    match split {
        Some(i) if authority.starts_with('[') || !authority[..i].contains(':') => {
            match authority[i + 1..].parse() {
                Ok(port) => (&authority[..i], Some(port)),
                Err(_) => (authority, None),
            }
        }
        _ => (authority, None),
    }
}

fn set_path(uri: &mut Uri, path: &str) {
    let path_and_query = match uri.query() {
        Some(query) if !path.contains('?') => format!("{path}?{query}"),
        _ => path.to_owned(),
    };
    let Ok(path_and_query) = PathAndQuery::try_from(path_and_query) else {
        return;
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(new) = Uri::from_parts(parts) {
        *uri = new;
    }
}

/// HTTP/1 carries the authority in `Host`; HTTP/2 in the URI (`:authority`), and in `Host` only
/// if the client sent one.
fn set_authority(parts: &mut Parts, authority: &str) {
    if let Ok(value) = HeaderValue::from_str(authority) {
        if parts.version < Version::HTTP_2 || parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, value);
        }
    }
    if parts.uri.authority().is_some() {
        if let Ok(authority) = Authority::try_from(authority) {
            let mut uri = parts.uri.clone().into_parts();
            uri.authority = Some(authority);
            if let Ok(new) = Uri::from_parts(uri) {
                parts.uri = new;
            }
        }
    }
}

/// Applies set/add/remove to a header map (invalid header names/values are skipped; validation
/// already rejected them). `:authority` stands for `Host`.
pub fn apply_header_ops(ops: &HeaderOps, headers: &mut HeaderMap) {
    let parse = |h: &Header| {
        let name = if &*h.name == ":authority" {
            header::HOST
        } else {
            HeaderName::from_bytes(h.name.as_bytes()).ok()?
        };
        Some((name, HeaderValue::from_str(&h.value).ok()?))
    };
    for (name, value) in ops.set.iter().filter_map(parse) {
        headers.insert(name, value);
    }
    for (name, value) in ops.add.iter().filter_map(parse) {
        headers.append(name, value);
    }
    for name in ops.remove.iter() {
        headers.remove(&**name);
    }
}

// ---------------------------------------------------------------------------------------------
// Building

struct Builder {
    service: Arc<Service>,
    virtual_services: Vec<Candidate>,
    producer: Vec<(Precedence, GammaEntry)>,
    consumers: HashMap<Arc<str>, Vec<(Precedence, GammaEntry)>>,
}

fn builder<'b>(
    builders: &'b mut HashMap<ObjectKey, Builder>,
    service: &Arc<Service>,
) -> &'b mut Builder {
    match builders.entry(service.key.clone()) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(Builder {
            service: service.clone(),
            virtual_services: Vec::new(),
            producer: Vec::new(),
            consumers: HashMap::new(),
        }),
    }
}

impl Builder {
    fn add_vs(&mut self, specificity: usize, vs: &Arc<CompiledVs>) {
        match self
            .virtual_services
            .iter_mut()
            .find(|c| Arc::ptr_eq(&c.vs, vs))
        {
            Some(c) => c.specificity = c.specificity.max(specificity),
            None => self.virtual_services.push(Candidate {
                specificity,
                vs: vs.clone(),
            }),
        }
    }

    fn add_gamma(&mut self, route: &ObjectKey, ports: &[u16], rules: &[CompiledGammaRule]) {
        let table = if route.namespace == self.service.key.namespace {
            &mut self.producer
        } else {
            self.consumers.entry(route.namespace.clone()).or_default()
        };
        for rule in rules {
            for (conditions, precedence) in &rule.matches {
                table.push((
                    precedence.clone(),
                    GammaEntry {
                        ports: ports.into(),
                        conditions: conditions.clone(),
                        rule: rule.rule.clone(),
                    },
                ));
            }
        }
    }

    fn finish(mut self) -> ServiceRoutes {
        self.virtual_services.sort_by(|a, b| {
            (Reverse(a.specificity), &a.vs.key).cmp(&(Reverse(b.specificity), &b.vs.key))
        });
        let table = |mut entries: Vec<(Precedence, GammaEntry)>| {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            GammaTable {
                entries: entries.into_iter().map(|(_, e)| e).collect(),
            }
        };
        ServiceRoutes {
            service: self.service.key.clone(),
            cluster_ip: self.service.cluster_ip,
            virtual_services: self.virtual_services,
            producer: table(self.producer),
            consumers: self
                .consumers
                .into_iter()
                .map(|(ns, entries)| (ns, table(entries)))
                .collect(),
        }
    }
}

fn fqdn(key: &ObjectKey) -> String {
    format!("{}.{}.svc.{CLUSTER_DOMAIN}", key.name, key.namespace)
}

/// The Service a host names, relative to `namespace`: `name`, `name.ns`, `name.ns.svc`,
/// `name.ns.svc.cluster.local`.
fn resolve_host<'s>(
    snapshot: &'s Snapshot,
    host: &str,
    namespace: &Arc<str>,
) -> Option<&'s Arc<Service>> {
    let mut labels = host.split('.');
    let name = labels.next()?;
    let key = match labels.next() {
        None => ObjectKey {
            namespace: namespace.clone(),
            name: name.into(),
        },
        Some(ns) => {
            let rest = host.get(name.len() + ns.len() + 2..).unwrap_or_default();
            let known = rest.is_empty()
                || rest
                    .strip_prefix("svc")
                    .is_some_and(|r| r.is_empty() || r.strip_prefix('.') == Some(CLUSTER_DOMAIN));
            if !known {
                return None;
            }
            ObjectKey::new(ns, name)
        }
    };
    snapshot.services.get(&key)
}

fn resolve_destination(snapshot: &Snapshot, d: &Destination, namespace: &Arc<str>) -> Backend {
    Backend {
        service: resolve_host(snapshot, &d.host, namespace).map(|s| s.key.clone()),
        host: d.host.clone(),
        port: d.port,
        subset: d.subset.clone(),
        weight: 0,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
    }
}

fn istio_rule(
    vs: &VirtualService,
    index: usize,
    rule: &crate::model::traffic::HttpRule,
    snapshot: &Snapshot,
) -> Rule {
    let ns = &vs.key.namespace;
    let action = match &rule.action {
        HttpAction::Route(destinations) => {
            let single = destinations.len() == 1;
            RuleAction::Forward(
                destinations
                    .iter()
                    .map(|d| Backend {
                        weight: if single { d.weight.max(1) } else { d.weight },
                        request_headers: d.headers.request.clone(),
                        response_headers: d.headers.response.clone(),
                        ..resolve_destination(snapshot, &d.destination, ns)
                    })
                    .collect(),
            )
        }
        HttpAction::Redirect(r) => RuleAction::Redirect(RedirectAction {
            scheme: r.scheme.clone(),
            host: r.authority.clone(),
            port: r.port,
            path: r.uri.clone().map(PathRewrite::Full),
            status: r.code,
        }),
        HttpAction::DirectResponse(d) => RuleAction::Respond {
            status: d.status,
            body: d.body.clone(),
        },
    };
    // An authority set through headers is a rewrite: it must reach the URI of HTTP/2 requests.
    let mut request_headers = rule.headers.request.clone();
    let mut authority = rule.rewrite.as_ref().and_then(|r| r.authority.clone());
    let is_authority = |h: &Header| &*h.name == ":authority" || &*h.name == "host";
    if let Some(h) = request_headers
        .set
        .iter()
        .chain(request_headers.add.iter())
        .find(|h| is_authority(h))
    {
        authority.get_or_insert_with(|| h.value.clone());
        request_headers.set = request_headers
            .set
            .iter()
            .filter(|h| !is_authority(h))
            .cloned()
            .collect();
        request_headers.add = request_headers
            .add
            .iter()
            .filter(|h| !is_authority(h))
            .cloned()
            .collect();
    }
    let path = rule.rewrite.as_ref().and_then(|r| {
        r.uri.clone().map(PathRewrite::MatchedPrefix).or_else(|| {
            r.uri_regex.as_ref().map(|rr| PathRewrite::Regex {
                pattern: rr.pattern.clone(),
                substitution: rust_substitution(&rr.substitution).into(),
            })
        })
    });
    let rewrite =
        (path.is_some() || authority.is_some()).then_some(RuleRewrite { path, authority });
    Rule {
        name: format!("VirtualService {} http[{index}]", vs.key).into(),
        action,
        timeout: rule.timeout.filter(|d| !d.is_zero()),
        retries: rule.retries.as_ref().map(RetryPlan::from_istio),
        fault: rule.fault.clone(),
        mirrors: rule
            .mirrors
            .iter()
            .map(|m| MirrorTarget {
                service: resolve_host(snapshot, &m.destination.host, ns).map(|s| s.key.clone()),
                host: m.destination.host.clone(),
                port: m.destination.port,
                subset: m.destination.subset.clone(),
                percentage: m.percentage,
            })
            .collect(),
        request_headers,
        response_headers: rule.headers.response.clone(),
        rewrite,
        grpc: false,
    }
}

/// RE2 substitutions (`\1`, `\\`) as the `regex` crate writes them (`${1}`, `$$`).
fn rust_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    let _ = write!(out, "${{{d}}}");
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

fn tcp_route(vs: &VirtualService, index: usize, rule: &TcpRule, snapshot: &Snapshot) -> TcpRoute {
    let single = rule.route.len() == 1;
    TcpRoute {
        name: format!("VirtualService {} tcp[{index}]", vs.key).into(),
        backends: rule
            .route
            .iter()
            .map(|d| Backend {
                weight: if single { d.weight.max(1) } else { d.weight },
                ..resolve_destination(snapshot, &d.destination, &vs.key.namespace)
            })
            .collect(),
    }
}

fn is_service_parent(p: &ParentRef) -> bool {
    (p.group.is_empty() || &*p.group == "core") && &*p.kind == "Service"
}

/// The Services a route attaches to, each with the ports it is restricted to (empty: all).
fn service_parents<'s>(
    snapshot: &'s Snapshot,
    route: &ObjectKey,
    parents: &[ParentRef],
) -> Vec<(&'s Arc<Service>, Vec<u16>)> {
    // `None`: every port.
    let mut targets: Vec<(&Arc<Service>, Option<Vec<u16>>)> = Vec::new();
    for parent in parents.iter().filter(|p| is_service_parent(p)) {
        let key = ObjectKey {
            namespace: parent
                .namespace
                .clone()
                .unwrap_or_else(|| route.namespace.clone()),
            name: parent.name.clone(),
        };
        let Some(service) = snapshot.services.get(&key) else {
            continue;
        };
        let port = match (parent.port, &parent.section_name) {
            (Some(port), _) => Some(port),
            (None, Some(section)) => match service
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(&**section))
            {
                Some(p) => Some(p.port),
                None => continue,
            },
            (None, None) => None,
        };
        let at = match targets.iter().position(|(s, _)| s.key == key) {
            Some(at) => at,
            None => {
                targets.push((service, Some(Vec::new())));
                targets.len() - 1
            }
        };
        let slot = &mut targets[at].1;
        match (slot.as_mut(), port) {
            (Some(ports), Some(port)) => ports.push(port),
            // A parent without port opens every port.
            _ => *slot = None,
        }
    }
    targets
        .into_iter()
        .map(|(k, ports)| (k, ports.unwrap_or_default()))
        .collect()
}

fn gateway_backend(snapshot: &Snapshot, route: &ObjectKey, b: &BackendObjectRef) -> Backend {
    let namespace = b
        .namespace
        .clone()
        .unwrap_or_else(|| route.namespace.clone());
    let key = ObjectKey {
        namespace,
        name: b.name.clone(),
    };
    let is_service = (b.group.is_empty() || &*b.group == "core") && &*b.kind == "Service";
    let service = (is_service && snapshot.services.contains_key(&key)).then_some(key);
    Backend {
        host: service
            .as_ref()
            .map_or_else(|| b.name.clone(), |k| fqdn(k).into()),
        service,
        port: b.port,
        subset: None,
        weight: 0,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
    }
}

fn merge_ops(into: &mut HeaderOps, more: &HeaderOps) {
    let cat = |a: &Arc<[Header]>, b: &Arc<[Header]>| -> Arc<[Header]> {
        if a.is_empty() {
            b.clone()
        } else {
            a.iter().chain(b.iter()).cloned().collect()
        }
    };
    into.set = cat(&into.set, &more.set);
    into.add = cat(&into.add, &more.add);
    if into.remove.is_empty() {
        into.remove = more.remove.clone();
    } else {
        into.remove = into
            .remove
            .iter()
            .chain(more.remove.iter())
            .cloned()
            .collect();
    }
}

fn gateway_backends(snapshot: &Snapshot, route: &ObjectKey, refs: &[BackendRef]) -> Arc<[Backend]> {
    refs.iter()
        .map(|r| {
            let mut backend = gateway_backend(snapshot, route, &r.backend);
            backend.weight = r.weight;
            for filter in r.filters.iter() {
                match filter {
                    RouteFilter::RequestHeaderModifier(ops) => {
                        merge_ops(&mut backend.request_headers, ops)
                    }
                    RouteFilter::ResponseHeaderModifier(ops) => {
                        merge_ops(&mut backend.response_headers, ops)
                    }
                    _ => {}
                }
            }
            backend
        })
        .collect()
}

/// A Gateway API rule's filters and backends as a [`Rule`].
fn gateway_rule(
    name: String,
    route: &ObjectKey,
    filters: &[RouteFilter],
    backend_refs: &[BackendRef],
    snapshot: &Snapshot,
) -> Rule {
    let mut request_headers = HeaderOps::default();
    let mut response_headers = HeaderOps::default();
    let mut redirect = None;
    let mut rewrite = None;
    let mut mirrors = Vec::new();
    for filter in filters {
        match filter {
            RouteFilter::RequestHeaderModifier(ops) => merge_ops(&mut request_headers, ops),
            RouteFilter::ResponseHeaderModifier(ops) => merge_ops(&mut response_headers, ops),
            RouteFilter::RequestRedirect(r) => {
                redirect = Some(RedirectAction {
                    scheme: r.scheme.clone(),
                    host: r.hostname.clone(),
                    port: Some(match (r.port, &r.scheme) {
                        (Some(n), _) => RedirectPort::Number(n),
                        (None, Some(_)) => RedirectPort::FromProtocolDefault,
                        (None, None) => RedirectPort::FromRequestPort,
                    }),
                    path: r.path.as_ref().map(path_modifier),
                    status: r.status_code,
                })
            }
            RouteFilter::UrlRewrite(r) => {
                rewrite = Some(RuleRewrite {
                    path: r.path.as_ref().map(path_modifier),
                    authority: r.hostname.clone(),
                })
            }
            RouteFilter::RequestMirror(m) => {
                let backend = gateway_backend(snapshot, route, &m.backend);
                mirrors.push(MirrorTarget {
                    service: backend.service,
                    host: backend.host,
                    port: backend.port,
                    subset: None,
                    percentage: m.percent,
                });
            }
        }
    }
    let action = match redirect {
        Some(r) => RuleAction::Redirect(r),
        None if backend_refs.is_empty() => RuleAction::Respond {
            status: 500,
            body: None,
        },
        None => RuleAction::Forward(gateway_backends(snapshot, route, backend_refs)),
    };
    Rule {
        name: name.into(),
        action,
        timeout: None,
        retries: None,
        fault: None,
        mirrors: mirrors.into(),
        request_headers,
        response_headers,
        rewrite,
        grpc: false,
    }
}

fn path_modifier(m: &PathModifier) -> PathRewrite {
    match m {
        PathModifier::ReplaceFullPath(p) => PathRewrite::Full(p.clone()),
        PathModifier::ReplacePrefixMatch(p) => PathRewrite::PrefixElements(p.clone()),
    }
}

fn compile_http_route(route: &HttpRoute, snapshot: &Snapshot) -> Vec<CompiledGammaRule> {
    route
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut rule = gateway_rule(
                format!("HTTPRoute {} rules[{i}]", route.key),
                &route.key,
                &r.filters,
                &r.backend_refs,
                snapshot,
            );
            rule.timeout = r.timeouts.request.filter(|d| !d.is_zero());
            rule.retries = r
                .timeouts
                .backend_request
                .filter(|d| !d.is_zero())
                .map(|d| RetryPlan {
                    per_try_timeout: Some(d),
                    ..RetryPlan::istio_default()
                });
            let default = [HttpRouteMatch {
                path: PathMatch::Prefix("/".into()),
                headers: Arc::from([]),
                query_params: Arc::from([]),
                method: None,
            }];
            let matches: &[HttpRouteMatch] = if r.matches.is_empty() {
                &default
            } else {
                &r.matches
            };
            CompiledGammaRule {
                rule: Arc::new(rule),
                matches: matches
                    .iter()
                    .enumerate()
                    .map(|(j, m)| {
                        let (path_rank, path_len) = match &m.path {
                            PathMatch::Exact(v) => (0, v.len()),
                            PathMatch::Prefix(v) => (1, v.trim_end_matches('/').len()),
                            PathMatch::Regex(p) => (2, p.as_str().len()),
                        };
                        let precedence = Precedence {
                            kind: 1,
                            ranks: [
                                path_rank,
                                usize::MAX - path_len,
                                usize::from(m.method.is_none()),
                                usize::MAX - m.headers.len(),
                                usize::MAX - m.query_params.len(),
                            ],
                            route: route.key.clone(),
                            rule: i,
                            index: j,
                        };
                        (Conditions::http_route(m), precedence)
                    })
                    .collect(),
            }
        })
        .collect()
}

fn compile_grpc_route(route: &GrpcRoute, snapshot: &Snapshot) -> Vec<CompiledGammaRule> {
    route
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut rule = gateway_rule(
                format!("GRPCRoute {} rules[{i}]", route.key),
                &route.key,
                &r.filters,
                &r.backend_refs,
                snapshot,
            );
            rule.grpc = true;
            let precedence = |j: usize, m: Option<&GrpcRouteMatch>| {
                let (service, method) = match m.and_then(|m| m.method.as_ref()) {
                    Some(GrpcMethodMatch::Exact { service, method }) => (
                        service.as_ref().map_or(0, |s| s.len()),
                        method.as_ref().map_or(0, |s| s.len()),
                    ),
                    _ => (0, 0),
                };
                Precedence {
                    kind: 0,
                    ranks: [
                        usize::MAX - service,
                        usize::MAX - method,
                        usize::MAX - m.map_or(0, |m| m.headers.len()),
                        0,
                        0,
                    ],
                    route: route.key.clone(),
                    rule: i,
                    index: j,
                }
            };
            let matches = if r.matches.is_empty() {
                vec![(Conditions::any(), precedence(0, None))]
            } else {
                r.matches
                    .iter()
                    .enumerate()
                    .map(|(j, m)| (Conditions::grpc_route(m), precedence(j, Some(m))))
                    .collect()
            };
            CompiledGammaRule {
                rule: Arc::new(rule),
                matches,
            }
        })
        .collect()
}

/// Route selection on arbitrary input, nothing may panic: `fuzz/` feeds this function, and a
/// unit test replays its corpus. The bytes before the first NUL are resources (YAML, as the
/// file source reads them); the rest is a request head, `METHOD URI` then `Name: value` lines.
/// Every Service port is tried with every pod as the client; matched rules are applied
/// (rewrite, redirect, header changes, weighted pick).
pub fn fuzz_select(data: &[u8]) {
    let (config, request) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let objects: Vec<_> = crate::source::file::parse_documents("input.yaml", config)
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .collect();
    let mut snapshot = crate::source::assemble(&objects, None);
    snapshot.index();
    let index = RouteIndex::build(&snapshot);
    let Some(parts) = fuzz_request(request) else {
        return;
    };
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let roll = data
        .iter()
        .fold(0u32, |a, &b| a.rotate_left(5) ^ u32::from(b));
    let clients: Vec<Option<&Pod>> = std::iter::once(None)
        .chain(snapshot.pods.values().map(|p| Some(&**p)))
        .collect();
    for service in snapshot.services.values() {
        let Some(routes) = index.get(&service.key) else {
            continue;
        };
        for port in service.ports.iter().map(|p| p.port) {
            for &source in &clients {
                let _ = index.tcp(&service.key, port, source).map(|t| t.pick(roll));
                let request = RequestInfo {
                    method: &parts.method,
                    uri: &parts.uri,
                    authority,
                    headers: &parts.headers,
                    port,
                    source,
                };
                if let Selection::Rule(selected) = routes.select(&request) {
                    let mut rewritten = parts.clone();
                    selected.rewrite(&mut rewritten);
                    let _ = selected.redirect(&parts);
                    apply_header_ops(&selected.rule.request_headers, &mut rewritten.headers);
                    if let Some(backend) = selected.rule.pick(roll) {
                        apply_header_ops(&backend.request_headers, &mut rewritten.headers);
                    }
                }
            }
        }
    }
}

fn fuzz_request(head: &[u8]) -> Option<Parts> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, uri) = lines.next()?.split_once(' ')?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        builder = builder.header(name.trim(), value.trim());
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::{Method, Request};

    use super::*;
    use crate::source::{assemble, file::parse_documents};

    const BOOKINFO: &str = include_str!("../../../../examples/bookinfo/bookinfo.yaml");

    macro_rules! traffic {
        ($file:literal) => {
            include_str!(concat!("../../../../examples/bookinfo-traffic/", $file))
        };
    }

    /// Namespaces and Services besides Bookinfo's.
    const EXTRA: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: frontend}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: default}
spec: {selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v3, namespace: default}
spec: {selector: {app: reviews, version: v3}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: frontend}
spec: {ports: [{name: http, port: 80}, {name: admin, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.96.0.20, ports: [{name: mysql, port: 3306}, {name: admin, port: 33060}]}
"#;

    fn snapshot(docs: &[&str]) -> Snapshot {
        let mut objects = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            for (line, result) in parse_documents(&format!("doc{i}.yaml"), doc.as_bytes()) {
                match result {
                    Ok(object) => objects.push(object),
                    Err(e) => panic!("document {i}, line {line}: {e:?}"),
                }
            }
        }
        assemble(&objects, None)
    }

    fn build(docs: &[&str]) -> RouteIndex {
        let mut all = vec![BOOKINFO, EXTRA];
        all.extend_from_slice(docs);
        RouteIndex::build(&snapshot(&all))
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::new(ns, name)
    }

    fn pod(ns: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            key: key(ns, "client"),
            uid: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Labels::new(),
            node: None,
            ip: None,
            service_account: "default".into(),
            ports: vec![],
        }
    }

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn info<'a>(parts: &'a Parts, port: u16, source: Option<&'a Pod>) -> RequestInfo<'a> {
        RequestInfo {
            method: &parts.method,
            uri: &parts.uri,
            authority: parts
                .uri
                .authority()
                .map(Authority::as_str)
                .or_else(|| parts.headers.get(header::HOST)?.to_str().ok())
                .unwrap_or_default(),
            headers: &parts.headers,
            port,
            source,
        }
    }

    /// The rule's name, `unrouted` or `no match`.
    fn outcome(
        routes: Option<&Arc<ServiceRoutes>>,
        parts: &Parts,
        port: u16,
        source: Option<&Pod>,
    ) -> String {
        let Some(routes) = routes else {
            return "unrouted".into();
        };
        match routes.select(&info(parts, port, source)) {
            Selection::Unrouted => "unrouted".into(),
            Selection::NoMatch => "no match".into(),
            Selection::Rule(s) => s.rule.name.to_string(),
        }
    }

    fn selected<'a>(
        routes: &'a ServiceRoutes,
        parts: &Parts,
        port: u16,
        source: Option<&Pod>,
    ) -> Selected<'a> {
        match routes.select(&info(parts, port, source)) {
            Selection::Rule(s) => s,
            other => panic!("expected a rule, got {other:?}"),
        }
    }

    /// A deterministic stream of uniform rolls.
    fn rolls(n: usize) -> impl Iterator<Item = u32> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..n).map(move |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u32
        })
    }

    fn subset_shares(rule: &Rule) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for roll in rolls(10_000) {
            let name = rule.pick(roll).map_or("none".to_owned(), |b| {
                format!("{}:{}", b.host, b.subset.as_deref().unwrap_or("-"))
            });
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn bookinfo_jason_goes_to_reviews_v2() {
        let vs = traffic!("virtual-service-reviews-test-v2.yaml");
        let index = build(&[vs]);
        let productpage = pod("default", &[("app", "productpage"), ("version", "v1")]);
        let routes = index.get(&key("default", "reviews")).unwrap();

        let jason = head(
            "GET",
            "/reviews/0",
            &[("host", "reviews:9080"), ("end-user", "jason")],
        );
        let s = selected(routes, &jason, 9080, Some(&productpage));
        assert_eq!(&*s.rule.name, "VirtualService default/reviews http[0]");
        let backend = s.rule.pick(12345).unwrap();
        assert_eq!(backend.service, Some(key("default", "reviews")));
        assert_eq!(backend.subset.as_deref(), Some("v2"));
        assert_eq!(backend.port, None);

        for headers in [
            vec![],
            vec![("end-user", "Jason")],
            vec![("end-user", "jason2")],
        ] {
            let other = head("GET", "/reviews/0", &headers);
            let s = selected(routes, &other, 9080, Some(&productpage));
            assert_eq!(&*s.rule.name, "VirtualService default/reviews http[1]");
            assert_eq!(s.rule.pick(0).unwrap().subset.as_deref(), Some("v1"));
        }
        // Services no route names have no table at all.
        assert!(index.get(&key("default", "details")).is_none());
    }

    #[test]
    fn bookinfo_fault_rules_keep_their_faults() {
        let index = build(&[traffic!("virtual-service-ratings-test-delay.yaml")]);
        let routes = index.get(&key("default", "ratings")).unwrap();
        let jason = head("GET", "/ratings/0", &[("end-user", "jason")]);
        let s = selected(routes, &jason, 9080, None);
        let delay = s.rule.fault.as_ref().unwrap().delay.as_ref().unwrap();
        assert_eq!(delay.fixed_delay, Duration::from_secs(7));
        assert_eq!(delay.percentage, 100.0);
        assert!(
            s.rule.retries.is_none(),
            "unset retries leave Istio's default to the caller"
        );
        let plain = head("GET", "/ratings/0", &[]);
        assert!(selected(routes, &plain, 9080, None).rule.fault.is_none());
    }

    #[test]
    fn weights_split_traffic() {
        let index = build(&[traffic!("virtual-service-reviews-50-v3.yaml")]);
        let routes = index.get(&key("default", "reviews")).unwrap();
        let s = selected(routes, &head("GET", "/", &[]), 9080, None);
        let shares = subset_shares(s.rule);
        assert_eq!(shares.len(), 2, "{shares:?}");
        for share in shares.values() {
            assert!((4_700..=5_300).contains(share), "{shares:?}");
        }
        assert_eq!(s.rule.pick(0).unwrap().subset.as_deref(), Some("v1"));
        assert_eq!(s.rule.pick(u32::MAX).unwrap().subset.as_deref(), Some("v3"));

        // The Gateway API flavour of the same split, through Services per version.
        let gamma = build(&[traffic!("httproute-reviews-50-v3.yaml")]);
        let routes = gamma.get(&key("default", "reviews")).unwrap();
        let s = selected(routes, &head("GET", "/x", &[]), 9080, None);
        assert_eq!(&*s.rule.name, "HTTPRoute default/reviews rules[0]");
        let shares = subset_shares(s.rule);
        assert!(
            (4_700..=5_300).contains(&shares["reviews-v1.default.svc.cluster.local:-"]),
            "{shares:?}"
        );
        assert!(
            (4_700..=5_300).contains(&shares["reviews-v3.default.svc.cluster.local:-"]),
            "{shares:?}"
        );
        assert_eq!(
            s.rule.pick(1).unwrap().service,
            Some(key("default", "reviews-v1"))
        );
        assert_eq!(s.rule.pick(1).unwrap().port, Some(9080));
        // The route names port 9080 only.
        assert_eq!(
            outcome(Some(routes), &head("GET", "/x", &[]), 9081, None),
            "unrouted"
        );
    }

    #[test]
    fn single_and_zero_weights() {
        let index = build(&[
            traffic!("virtual-service-all-v1.yaml"),
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  http:
  - route:
    - {destination: {host: db, subset: a}, weight: 100}
    - {destination: {host: db, subset: b}, weight: 0}
"#,
        ]);
        for service in ["productpage", "reviews", "ratings", "details"] {
            let routes = index.get(&key("default", service)).unwrap();
            let s = selected(routes, &head("GET", "/", &[]), 9080, None);
            let shares = subset_shares(s.rule);
            assert_eq!(shares.len(), 1, "{service}: {shares:?}");
            assert_eq!(shares.values().next(), Some(&10_000));
        }
        let routes = index.get(&key("default", "db")).unwrap();
        let shares = subset_shares(selected(routes, &head("GET", "/", &[]), 3306, None).rule);
        assert_eq!(shares, BTreeMap::from([("db:a".to_owned(), 10_000)]));
    }

    fn vs(name: &str, ns: &str, extra: &str, http: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{extra}\n  http:\n{http}"
        )
    }

    fn route_to(host: &str) -> String {
        format!("  - route: [{{destination: {{host: {host}}}}}]\n")
    }

    #[test]
    fn hosts_name_services_in_every_form() {
        let index = build(&[
            &vs(
                "short",
                "default",
                "  hosts: [reviews]",
                &route_to("reviews"),
            ),
            &vs(
                "two",
                "other",
                "  hosts: [ratings.default]",
                &route_to("ratings"),
            ),
            &vs(
                "three",
                "other",
                "  hosts: [web.frontend.svc]",
                &route_to("web"),
            ),
            &vs(
                "fqdn",
                "frontend",
                "  hosts: [details.default.svc.cluster.local]",
                &route_to("details.default"),
            ),
            &vs(
                "wild",
                "other",
                "  hosts: ['*.default.svc.cluster.local']",
                &route_to("productpage.default.svc.cluster.local"),
            ),
            &vs(
                "external",
                "default",
                "  hosts: [www.example.com]",
                &route_to("www.example.com"),
            ),
        ]);
        let get = |ns, name| {
            outcome(
                index.get(&key(ns, name)),
                &head("GET", "/", &[]),
                9080,
                None,
            )
        };
        assert_eq!(
            get("default", "reviews"),
            "VirtualService default/short http[0]"
        );
        assert_eq!(
            get("default", "ratings"),
            "VirtualService other/two http[0]"
        );
        assert_eq!(get("frontend", "web"), "VirtualService other/three http[0]");
        assert_eq!(
            get("default", "details"),
            "VirtualService frontend/fqdn http[0]"
        );
        // The wildcard reaches every Service of `default` no exact host claims.
        assert_eq!(
            get("default", "productpage"),
            "VirtualService other/wild http[0]"
        );
        assert_eq!(get("default", "db"), "VirtualService other/wild http[0]");

        // Destinations resolve relative to the VirtualService's namespace.
        let routes = index.get(&key("default", "ratings")).unwrap();
        let s = selected(routes, &head("GET", "/", &[]), 9080, None);
        assert_eq!(
            s.rule.pick(0).unwrap().service,
            None,
            "`ratings` in `other` is no Service"
        );
        assert_eq!(&*s.rule.pick(0).unwrap().host, "ratings");
        let routes = index.get(&key("default", "details")).unwrap();
        let s = selected(routes, &head("GET", "/", &[]), 9080, None);
        assert_eq!(
            s.rule.pick(0).unwrap().service,
            Some(key("default", "details"))
        );
        // `default`'s seven Services and `frontend/web`; the external host attaches nowhere.
        assert_eq!(index.services.len(), 8);
    }

    #[test]
    fn export_to_and_namespace_preference() {
        let index = build(&[
            &vs(
                "private",
                "default",
                "  hosts: [reviews]\n  exportTo: ['.']",
                &route_to("reviews"),
            ),
            &vs(
                "mine",
                "frontend",
                "  hosts: [ratings.default.svc.cluster.local]\n  exportTo: ['.']",
                &route_to("ratings.default"),
            ),
            &vs(
                "producer",
                "default",
                "  hosts: [ratings]",
                &route_to("ratings"),
            ),
            &vs(
                "zzz",
                "other",
                "  hosts: [ratings.default]\n  exportTo: [frontend, other]",
                &route_to("ratings.default"),
            ),
        ]);
        let request = head("GET", "/", &[]);
        let reviews = index.get(&key("default", "reviews"));
        let local = pod("default", &[]);
        let frontend = pod("frontend", &[]);
        let other = pod("other", &[]);
        assert_eq!(
            outcome(reviews, &request, 9080, Some(&local)),
            "VirtualService default/private http[0]"
        );
        assert_eq!(
            outcome(reviews, &request, 9080, Some(&frontend)),
            "unrouted"
        );
        assert_eq!(outcome(reviews, &request, 9080, None), "unrouted");

        let ratings = index.get(&key("default", "ratings"));
        // The client's namespace first, then the Service's, then the smallest key.
        assert_eq!(
            outcome(ratings, &request, 9080, Some(&frontend)),
            "VirtualService frontend/mine http[0]"
        );
        assert_eq!(
            outcome(ratings, &request, 9080, Some(&local)),
            "VirtualService default/producer http[0]"
        );
        assert_eq!(
            outcome(ratings, &request, 9080, Some(&other)),
            "VirtualService other/zzz http[0]"
        );
        assert_eq!(
            outcome(ratings, &request, 9080, None),
            "VirtualService default/producer http[0]"
        );
    }

    #[test]
    fn exact_hosts_beat_wildcards() {
        let index = build(&[
            &vs(
                "wild",
                "default",
                "  hosts: ['*.default.svc.cluster.local']",
                &route_to("reviews"),
            ),
            &vs(
                "exact",
                "other",
                "  hosts: [reviews.default.svc.cluster.local]",
                &route_to("reviews.default"),
            ),
        ]);
        let request = head("GET", "/", &[]);
        let local = pod("default", &[]);
        assert_eq!(
            outcome(
                index.get(&key("default", "reviews")),
                &request,
                9080,
                Some(&local)
            ),
            "VirtualService other/exact http[0]"
        );
        assert_eq!(
            outcome(
                index.get(&key("default", "ratings")),
                &request,
                9080,
                Some(&local)
            ),
            "VirtualService default/wild http[0]"
        );
    }

    #[test]
    fn no_match_versus_unrouted() {
        let index = build(&[
            &vs("reviews", "default", "  hosts: [reviews]", "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews}}]\n"),
            &vs("ratings", "default", "  hosts: [ratings]", "  - match: [{port: 8080}]\n    route: [{destination: {host: ratings}}]\n  - match: [{sourceLabels: {app: admin}}, {gateways: [ingress]}]\n    route: [{destination: {host: ratings}}]\n"),
            &vs("gateway-only", "default", "  hosts: [details]\n  gateways: [ingress]", "  - route: [{destination: {host: details}}]\n"),
            &vs("tcp-only", "default", "  hosts: [db]", "")
                .replace("  http:\n", "  tcp:\n  - route: [{destination: {host: db}}]\n"),
        ]);
        let request = head("GET", "/", &[]);
        let client = pod("default", &[("app", "productpage")]);
        assert_eq!(
            outcome(
                index.get(&key("default", "reviews")),
                &request,
                9080,
                Some(&client)
            ),
            "no match"
        );
        // Every rule names another port or other clients: the VirtualService says nothing here.
        let ratings = index.get(&key("default", "ratings"));
        assert_eq!(outcome(ratings, &request, 9080, Some(&client)), "unrouted");
        assert_eq!(
            outcome(ratings, &request, 8080, Some(&client)),
            "VirtualService default/ratings http[0]"
        );
        let admin = pod("default", &[("app", "admin"), ("version", "v1")]);
        assert_eq!(
            outcome(ratings, &request, 9080, Some(&admin)),
            "VirtualService default/ratings http[1]"
        );
        assert!(index.get(&key("default", "details")).is_none());
        assert_eq!(
            outcome(
                index.get(&key("default", "db")),
                &request,
                3306,
                Some(&client)
            ),
            "unrouted"
        );
        assert!(RouteIndex::default()
            .get(&key("default", "reviews"))
            .is_none());
    }

    #[test]
    fn istio_match_fields() {
        let http = r#"  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /CaSe}, ignoreUriCase: true}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {regex: '/items/[0-9]+'}}]
    route: [{destination: {host: reviews}}]
  - match: [{method: {exact: DELETE}}]
    route: [{destination: {host: reviews}}]
  - match: [{authority: {prefix: reviews.default}}]
    route: [{destination: {host: reviews}}]
  - match: [{queryParams: {debug: {}, page: {regex: '[0-9]+'}}}]
    route: [{destination: {host: reviews}}]
  - match: [{headers: {x-a: {prefix: yes}}, withoutHeaders: {x-b: {}}}]
    route: [{destination: {host: reviews}}]
  - match: [{sourceNamespace: frontend, uri: {prefix: /ns}}]
    route: [{destination: {host: reviews}}]
  - match: [{scheme: {exact: https}}]
    route: [{destination: {host: reviews}}]
  - match: [{headers: {x-multi: {exact: 'a,b'}}}]
    route: [{destination: {host: reviews}}]
"#;
        let index = build(&[&vs("m", "default", "  hosts: [reviews]", http)]);
        let routes = index.get(&key("default", "reviews"));
        let client = pod("default", &[]);
        let frontend = pod("frontend", &[]);
        let rule = |n: usize| format!("VirtualService default/m http[{n}]");
        let check =
            |method: &str, uri: &str, headers: &[(&str, &str)], source: &Pod, want: &str| {
                assert_eq!(
                    outcome(routes, &head(method, uri, headers), 9080, Some(source)),
                    want,
                    "{method} {uri} {headers:?}"
                );
            };
        check("GET", "/exact", &[], &client, &rule(0));
        check("GET", "/exact?q=1", &[], &client, &rule(0));
        check("GET", "/exact/more", &[], &client, "no match");
        check("GET", "/case/x", &[], &client, &rule(1));
        check("GET", "/items/42", &[], &client, &rule(2));
        check("GET", "/items/42/x", &[], &client, "no match");
        check("DELETE", "/", &[], &client, &rule(3));
        check(
            "GET",
            "/",
            &[("host", "reviews.default:9080")],
            &client,
            &rule(4),
        );
        check("GET", "/?debug&page=3", &[], &client, &rule(5));
        check("GET", "/?page=3", &[], &client, "no match");
        check("GET", "/?debug=1&page=x", &[], &client, "no match");
        check("GET", "/", &[("x-a", "yes-please")], &client, &rule(6));
        check(
            "GET",
            "/",
            &[("x-a", "yes"), ("x-b", "")],
            &client,
            "no match",
        );
        check("GET", "/ns/1", &[], &frontend, &rule(7));
        check("GET", "/ns/1", &[], &client, "no match");
        check("GET", "https://reviews/", &[], &client, &rule(8));
        check(
            "GET",
            "/",
            &[("x-multi", "a"), ("x-multi", "b")],
            &client,
            &rule(9),
        );
        // Rules are tried in order: the exact match comes first whatever else holds.
        check("DELETE", "/exact", &[], &client, &rule(0));
    }

    #[test]
    fn istio_rewrites() {
        let http = r#"  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {exact: /old}}]
    rewrite: {uri: /new, authority: reviews.internal}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /service/}}]
    rewrite: {uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\2/instance/\1'}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /host}}]
    headers: {request: {set: {':authority': set.example}}}
    route: [{destination: {host: reviews}}]
  - rewrite: {uri: /root/}
    route: [{destination: {host: reviews}}]
"#;
        let index = build(&[&vs("rw", "default", "  hosts: [reviews]", http)]);
        let routes = index.get(&key("default", "reviews")).unwrap();
        let rewritten = |uri: &str, headers: &[(&str, &str)]| {
            let mut parts = head("GET", uri, headers);
            let s = selected(routes, &parts, 9080, None);
            s.rewrite(&mut parts);
            parts
        };
        assert_eq!(rewritten("/v1/items?x=1", &[]).uri, "/api/items?x=1");
        let parts = rewritten("/old", &[("host", "reviews:9080")]);
        assert_eq!(parts.uri, "/new");
        assert_eq!(parts.headers[header::HOST], "reviews.internal");
        assert_eq!(
            rewritten("/service/foo/v1/api", &[]).uri,
            "/v1/api/instance/foo"
        );
        // Without a uri condition Istio matches the prefix `/`, which the rewrite replaces.
        assert_eq!(rewritten("/other/x", &[]).uri, "/root/other/x");

        // An authority set as a header reaches the URI of HTTP/2 requests too.
        let mut h2 = head("GET", "http://reviews:9080/host/1", &[]);
        h2.version = Version::HTTP_2;
        let s = selected(routes, &h2, 9080, None);
        assert!(s.rule.request_headers.is_empty());
        s.rewrite(&mut h2);
        assert_eq!(h2.uri, "http://set.example/host/1");
        assert!(h2.headers.get(header::HOST).is_none());
        let h1 = rewritten("/host/1", &[("host", "reviews")]);
        assert_eq!(h1.headers[header::HOST], "set.example");
        assert_eq!(h1.uri, "/host/1");
    }

    #[test]
    fn istio_redirects_and_direct_responses() {
        let http = r#"  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /new}
  - match: [{uri: {exact: /away}}]
    redirect: {authority: example.com, redirectCode: 308}
  - match: [{uri: {exact: /secure}}]
    redirect: {scheme: https, derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {exact: /port}}]
    redirect: {port: 8443, uri: '/p?x=1'}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
"#;
        let index = build(&[&vs("rd", "default", "  hosts: [reviews]", http)]);
        let routes = index.get(&key("default", "reviews")).unwrap();
        let location = |uri: &str| {
            let parts = head("GET", uri, &[("host", "reviews:9080")]);
            let response = selected(routes, &parts, 9080, None)
                .redirect(&parts)
                .unwrap();
            (
                response.status().as_u16(),
                response.headers()[header::LOCATION]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            )
        };
        assert_eq!(
            location("/moved?q=1"),
            (301, "http://reviews:9080/new?q=1".to_owned())
        );
        assert_eq!(
            location("/away"),
            (308, "http://example.com/away".to_owned())
        );
        assert_eq!(
            location("/secure"),
            (301, "https://reviews:9080/secure".to_owned())
        );
        assert_eq!(
            location("/port?q=2"),
            (301, "http://reviews:8443/p?x=1".to_owned())
        );

        let parts = head("GET", "/teapot", &[]);
        let s = selected(routes, &parts, 9080, None);
        assert!(s.redirect(&parts).is_none());
        assert!(s.rule.pick(0).is_none());
        assert_eq!(
            s.rule.action,
            RuleAction::Respond {
                status: 418,
                body: Some("short and stout".into())
            }
        );
    }

    #[test]
    fn header_operations() {
        let http = r#"  - headers:
      request: {set: {x-set: one}, add: {x-add: two}, remove: [x-gone]}
      response: {set: {x-served-by: weft}}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
      headers: {request: {add: {x-subset: v1}}, response: {remove: [server]}}
    - destination: {host: reviews, subset: v2}
      weight: 10
"#;
        let index = build(&[&vs("h", "default", "  hosts: [reviews]", http)]);
        let routes = index.get(&key("default", "reviews")).unwrap();
        let parts = head("GET", "/", &[]);
        let s = selected(routes, &parts, 9080, None);
        let mut headers = HeaderMap::new();
        headers.insert("x-set", HeaderValue::from_static("old"));
        headers.append("x-set", HeaderValue::from_static("older"));
        headers.insert("x-add", HeaderValue::from_static("one"));
        headers.insert("x-gone", HeaderValue::from_static("bye"));
        apply_header_ops(&s.rule.request_headers, &mut headers);
        assert_eq!(headers.get_all("x-set").iter().collect::<Vec<_>>(), ["one"]);
        assert_eq!(
            headers.get_all("x-add").iter().collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert!(!headers.contains_key("x-gone"));
        assert_eq!(s.rule.response_headers.set[0].value.as_ref(), "weft");

        let v1 = s.rule.pick(0).unwrap();
        assert_eq!(v1.subset.as_deref(), Some("v1"));
        assert_eq!(&*v1.request_headers.add[0].name, "x-subset");
        assert_eq!(&*v1.response_headers.remove[0], "server");
        assert!(s.rule.pick(u32::MAX).unwrap().request_headers.is_empty());

        // Names and values the map cannot hold are skipped, `:authority` is `Host`.
        let ops = HeaderOps {
            set: Arc::from([
                Header {
                    name: ":authority".into(),
                    value: "a.example".into(),
                },
                Header {
                    name: "bad name".into(),
                    value: "x".into(),
                },
                Header {
                    name: "x-ok".into(),
                    value: "bad\nvalue".into(),
                },
            ]),
            ..HeaderOps::default()
        };
        let mut headers = HeaderMap::new();
        apply_header_ops(&ops, &mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[header::HOST], "a.example");
    }

    #[test]
    fn retries_timeouts_mirrors() {
        let http = r#"  - match: [{uri: {prefix: /default}}]
    retries: {attempts: 3, perTryTimeout: 2s}
    timeout: 10s
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /explicit}}]
    retries: {attempts: 1, retryOn: 'gateway-error,429'}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /off}}]
    retries: {attempts: 0}
    mirror: {host: ratings, port: {number: 9080}}
    mirrorPercentage: {value: 25.0}
    route: [{destination: {host: reviews}}]
"#;
        let index = build(&[&vs("r", "default", "  hosts: [reviews]", http)]);
        let routes = index.get(&key("default", "reviews")).unwrap();
        let rule = |uri: &str| selected(routes, &head("GET", uri, &[]), 9080, None).rule;

        let r = rule("/default");
        let plan = r.retries.as_ref().unwrap();
        assert_eq!(plan.attempts, 3);
        assert_eq!(plan.per_try_timeout, Some(Duration::from_secs(2)));
        for p in [
            RetryPolicy::ConnectFailure,
            RetryPolicy::RefusedStream,
            RetryPolicy::Unavailable,
            RetryPolicy::Cancelled,
            RetryPolicy::RetriableStatusCodes,
        ] {
            assert!(plan.on(p), "{p:?}");
        }
        assert!(!plan.on(RetryPolicy::FiveXx));
        assert!(plan.retries_status(503) && !plan.retries_status(500));
        assert_eq!(r.timeout, Some(Duration::from_secs(10)));

        let r = rule("/explicit");
        let plan = r.retries.as_ref().unwrap();
        assert!(plan.on(RetryPolicy::GatewayError) && plan.on(RetryPolicy::RetriableStatusCodes));
        assert!(!plan.on(RetryPolicy::ConnectFailure));
        assert!(plan.retries_status(429) && plan.retries_status(502) && !plan.retries_status(500));
        assert_eq!(r.timeout, None);

        let r = rule("/off");
        assert_eq!(r.retries.as_ref().unwrap().attempts, 0);
        assert_eq!(r.mirrors.len(), 1);
        assert_eq!(r.mirrors[0].service, Some(key("default", "ratings")));
        assert_eq!(r.mirrors[0].port, Some(9080));
        assert_eq!(r.mirrors[0].percentage, 25.0);

        let default = RetryPlan::istio_default();
        assert_eq!(default.attempts, 2);
        assert!(default.retries_status(503));
    }

    fn http_route(name: &str, ns: &str, parents: &str, rules: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: {parents}\n  rules:\n{rules}"
        )
    }

    const REVIEWS: &str = "[{group: '', kind: Service, name: reviews, namespace: default}]";

    fn rule_to(backend: &str, matches: &str) -> String {
        format!("  - matches: {matches}\n    backendRefs: [{{name: {backend}, namespace: default, port: 9080}}]\n")
    }

    #[test]
    fn gateway_precedence() {
        let index = build(&[
            &http_route("a", "default", REVIEWS, &[
                rule_to("reviews-v1", "[{path: {type: PathPrefix, value: /}}]"),
                rule_to("reviews-v1", "[{path: {type: PathPrefix, value: /api}}]"),
                rule_to("reviews-v1", "[{path: {type: PathPrefix, value: /api/v2/}}]"),
                rule_to("reviews-v1", "[{path: {type: Exact, value: /api}}]"),
            ].concat()),
            &http_route("b", "default", REVIEWS, &[
                rule_to("reviews-v3", "[{path: {type: PathPrefix, value: /api}, method: POST}]"),
                rule_to("reviews-v3", "[{path: {type: PathPrefix, value: /api}, method: POST, headers: [{name: x-a, value: '1'}]}]"),
                rule_to("reviews-v3", "[{path: {type: PathPrefix, value: /api}, queryParams: [{name: q, value: '1'}]}]"),
                rule_to("reviews-v3", "[{path: {type: RegularExpression, value: '/api/[0-9]+/detail'}}]"),
            ].concat()),
            // Ties with `a/rules[1]`: the smaller key wins.
            &http_route("c", "default", REVIEWS, &rule_to("reviews", "[{path: {type: PathPrefix, value: /api/}}]")),
        ]);
        let routes = index.get(&key("default", "reviews"));
        let check = |method: &str, uri: &str, headers: &[(&str, &str)], want: &str| {
            assert_eq!(
                outcome(routes, &head(method, uri, headers), 9080, None),
                want,
                "{method} {uri}"
            );
        };
        check("GET", "/api", &[], "HTTPRoute default/a rules[3]");
        check("GET", "/api/v2/x", &[], "HTTPRoute default/a rules[2]");
        check("GET", "/api/v2", &[], "HTTPRoute default/a rules[2]");
        check("GET", "/api/v2x", &[], "HTTPRoute default/a rules[1]");
        check("GET", "/api/x", &[], "HTTPRoute default/a rules[1]");
        check("POST", "/api/x", &[], "HTTPRoute default/b rules[0]");
        check(
            "POST",
            "/api/x",
            &[("x-a", "1")],
            "HTTPRoute default/b rules[1]",
        );
        check("GET", "/api/x?q=1", &[], "HTTPRoute default/b rules[2]");
        // A prefix match of any length beats a regular expression.
        check("GET", "/api/42/detail", &[], "HTTPRoute default/a rules[1]");
        check("GET", "/apix", &[], "HTTPRoute default/a rules[0]");
        check("GET", "/", &[], "HTTPRoute default/a rules[0]");
    }

    #[test]
    fn gateway_no_match_regex_and_backends() {
        let index = build(&[&http_route(
            "r",
            "default",
            REVIEWS,
            &[
                rule_to(
                    "reviews-v1",
                    "[{path: {type: RegularExpression, value: '/api/[0-9]+/detail'}}]",
                ),
                "  - matches: [{path: {type: Exact, value: /none}}]\n".to_owned(),
                rule_to("missing", "[{path: {type: Exact, value: /missing}}]"),
            ]
            .concat(),
        )]);
        let routes = index.get(&key("default", "reviews"));
        assert_eq!(
            outcome(routes, &head("GET", "/api/42/detail", &[]), 9080, None),
            "HTTPRoute default/r rules[0]"
        );
        assert_eq!(
            outcome(routes, &head("GET", "/api/42", &[]), 9080, None),
            "no match"
        );
        let routes = routes.unwrap();
        let s = selected(routes, &head("GET", "/none", &[]), 9080, None);
        assert_eq!(
            s.rule.action,
            RuleAction::Respond {
                status: 500,
                body: None
            }
        );
        let s = selected(routes, &head("GET", "/missing", &[]), 9080, None);
        let backend = s.rule.pick(7).unwrap();
        assert_eq!(backend.service, None);
        assert_eq!(&*backend.host, "missing");
    }

    #[test]
    fn consumer_routes_override_producer_routes() {
        let index = build(&[
            &http_route(
                "producer",
                "default",
                "[{kind: Service, group: '', name: reviews}]",
                &rule_to("reviews-v1", "[]"),
            ),
            &http_route(
                "consumer",
                "frontend",
                REVIEWS,
                &rule_to("reviews-v3", "[]"),
            ),
            &http_route(
                "admin",
                "other",
                "[{kind: Service, group: '', name: reviews, namespace: default, port: 8080}]",
                &rule_to("reviews-v3", "[]"),
            ),
        ]);
        let routes = index.get(&key("default", "reviews"));
        let request = head("GET", "/", &[]);
        assert_eq!(
            outcome(routes, &request, 9080, Some(&pod("frontend", &[]))),
            "HTTPRoute frontend/consumer rules[0]"
        );
        assert_eq!(
            outcome(routes, &request, 9080, Some(&pod("default", &[]))),
            "HTTPRoute default/producer rules[0]"
        );
        assert_eq!(
            outcome(routes, &request, 9080, None),
            "HTTPRoute default/producer rules[0]"
        );
        // `other` routes port 8080 only: on 9080 its clients get the producer's routes.
        let other = pod("other", &[]);
        assert_eq!(
            outcome(routes, &request, 9080, Some(&other)),
            "HTTPRoute default/producer rules[0]"
        );
        assert_eq!(
            outcome(routes, &request, 8080, Some(&other)),
            "HTTPRoute other/admin rules[0]"
        );
    }

    #[test]
    fn gateway_ports_sections_and_gateway_parents() {
        let index = build(&[
            &http_route(
                "by-section",
                "frontend",
                "[{kind: Service, group: '', name: web, sectionName: admin}]",
                &rule_to("reviews", "[]"),
            ),
            &http_route(
                "on-gateway",
                "default",
                "[{name: ingress}]",
                &rule_to("reviews", "[]"),
            ),
        ]);
        let routes = index.get(&key("frontend", "web"));
        let request = head("GET", "/", &[]);
        assert_eq!(
            outcome(routes, &request, 8080, None),
            "HTTPRoute frontend/by-section rules[0]"
        );
        assert_eq!(outcome(routes, &request, 80, None), "unrouted");
        assert_eq!(
            index.services.len(),
            1,
            "routes on Gateways attach to no Service"
        );
    }

    #[test]
    fn gateway_filters() {
        let rules = r#"  - matches: [{path: {type: PathPrefix, value: /foo}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /xyz}}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: '1'}], remove: [x-b]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-c, value: '2'}]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: ratings, port: 9080}, percent: 10}}
    backendRefs:
    - name: reviews-v1
      port: 9080
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-backend, value: v1}]}}]
    timeouts: {request: 5s, backendRequest: 2s}
  - matches: [{path: {type: PathPrefix, value: /empty}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
    timeouts: {request: 0s}
  - matches: [{path: {type: PathPrefix, value: /full/}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /tls}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
  - matches: [{path: {type: PathPrefix, value: /elsewhere}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /here}}}]
"#;
        let index = build(&[&http_route("f", "default", REVIEWS, rules)]);
        let routes = index.get(&key("default", "reviews")).unwrap();
        let rewritten = |uri: &str| {
            let mut parts = head("GET", uri, &[("host", "reviews:9080")]);
            selected(routes, &parts, 9080, None).rewrite(&mut parts);
            parts
        };
        // The Gateway API's ReplacePrefixMatch table.
        assert_eq!(rewritten("/foo/bar?x=1").uri, "/xyz/bar?x=1");
        assert_eq!(rewritten("/foo").uri, "/xyz");
        assert_eq!(rewritten("/foo/").uri, "/xyz/");
        assert_eq!(
            rewritten("/foo/bar").headers[header::HOST],
            "rewritten.example"
        );
        assert_eq!(rewritten("/empty/bar").uri, "/bar");
        assert_eq!(rewritten("/empty").uri, "/");
        assert_eq!(rewritten("/empty/").uri, "/");
        assert_eq!(rewritten("/full/a/b?k=v").uri, "/replaced?k=v");

        let s = selected(routes, &head("GET", "/foo", &[]), 9080, None);
        assert_eq!(&*s.rule.request_headers.set[0].name, "x-a");
        assert_eq!(&*s.rule.request_headers.remove[0], "x-b");
        assert_eq!(&*s.rule.response_headers.add[0].name, "x-c");
        assert_eq!(s.rule.mirrors[0].service, Some(key("default", "ratings")));
        assert_eq!(s.rule.mirrors[0].percentage, 10.0);
        assert_eq!(&*s.rule.pick(0).unwrap().request_headers.add[0].value, "v1");
        assert_eq!(s.rule.timeout, Some(Duration::from_secs(5)));
        let plan = s.rule.retries.as_ref().unwrap();
        assert_eq!(plan.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(plan.attempts, 2);
        assert!(!s.rule.grpc);
        let s = selected(routes, &head("GET", "/empty", &[]), 9080, None);
        assert_eq!(s.rule.timeout, None, "0s disables the timeout");

        let redirect = |uri: &str| {
            let parts = head("GET", uri, &[("host", "reviews:9080")]);
            let response = selected(routes, &parts, 9080, None)
                .redirect(&parts)
                .unwrap();
            (
                response.status().as_u16(),
                response.headers()[header::LOCATION]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            )
        };
        assert_eq!(
            redirect("/tls/x?y=1"),
            (302, "https://reviews/tls/x?y=1".to_owned())
        );
        assert_eq!(
            redirect("/elsewhere/a"),
            (301, "http://other.example:9080/here/a".to_owned())
        );
    }

    #[test]
    fn grpc_method_matches() {
        let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: ratings, port: 9080}]
  rules:
  - matches: [{method: {service: ratings.v1.Ratings}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{method: {service: ratings.v1.Ratings, method: Get}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{method: {type: RegularExpression, service: 'ratings\.v[0-9]+\.Admin', method: 'Re.*'}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{headers: [{name: x-canary, value: 'yes'}]}]
    backendRefs: [{name: reviews, port: 9080}]
"#;
        let index = build(&[route]);
        let routes = index.get(&key("default", "ratings"));
        let check = |path: &str, headers: &[(&str, &str)], want: &str| {
            assert_eq!(
                outcome(routes, &head("POST", path, headers), 9080, None),
                want,
                "{path}"
            );
        };
        check(
            "/ratings.v1.Ratings/Get",
            &[],
            "GRPCRoute default/g rules[1]",
        );
        check(
            "/ratings.v1.Ratings/List",
            &[],
            "GRPCRoute default/g rules[0]",
        );
        check(
            "/ratings.v2.Admin/Reset",
            &[],
            "GRPCRoute default/g rules[2]",
        );
        check("/ratings.v2.Admin/Delete", &[], "no match");
        check(
            "/other.Svc/Call",
            &[("x-canary", "yes")],
            "GRPCRoute default/g rules[3]",
        );
        check("/other.Svc/Call", &[], "no match");
        let s = selected(
            routes.unwrap(),
            &head("POST", "/ratings.v1.Ratings/Get", &[]),
            9080,
            None,
        );
        assert!(s.rule.grpc);
        assert_eq!(s.matched_prefix, None);
    }

    #[test]
    fn virtual_services_win_over_gateway_routes() {
        let index = build(&[
            &vs(
                "reviews",
                "default",
                "  hosts: [reviews]\n  exportTo: ['.']",
                &route_to("reviews"),
            ),
            &http_route("reviews", "default", REVIEWS, &rule_to("reviews-v3", "[]")),
        ]);
        let routes = index.get(&key("default", "reviews"));
        let request = head("GET", "/", &[]);
        assert_eq!(
            outcome(routes, &request, 9080, Some(&pod("default", &[]))),
            "VirtualService default/reviews http[0]"
        );
        // Where the VirtualService is not visible, the HTTPRoute serves.
        assert_eq!(
            outcome(routes, &request, 9080, Some(&pod("other", &[]))),
            "HTTPRoute default/reviews rules[0]"
        );
    }

    #[test]
    fn tcp_routes() {
        let tcp = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 3306, sourceLabels: {app: reviews}}]
    route:
    - {destination: {host: db, subset: primary}, weight: 80}
    - {destination: {host: db, subset: replica}, weight: 20}
  - match: [{port: 3306, destinationSubnets: [10.96.0.0/16]}]
    route: [{destination: {host: db, subset: replica, port: {number: 3307}}}]
  - match: [{port: 33060, destinationSubnets: [192.168.0.0/16]}]
    route: [{destination: {host: db, subset: never}}]
"#;
        let index = build(&[tcp]);
        let db = key("default", "db");
        let reviews = pod("default", &[("app", "reviews")]);
        let other = pod("default", &[("app", "ratings")]);

        let route = index.tcp(&db, 3306, Some(&reviews)).unwrap();
        assert_eq!(&*route.name, "VirtualService default/db tcp[0]");
        let mut primary = 0;
        for roll in rolls(10_000) {
            if route.pick(roll).unwrap().subset.as_deref() == Some("primary") {
                primary += 1;
            }
        }
        assert!((7_700..=8_300).contains(&primary), "{primary}");

        let route = index.tcp(&db, 3306, Some(&other)).unwrap();
        assert_eq!(&*route.name, "VirtualService default/db tcp[1]");
        assert_eq!(route.pick(0).unwrap().port, Some(3307));
        // The ClusterIP is outside the subnet: nothing routes port 33060.
        assert!(index.tcp(&db, 33060, Some(&other)).is_none());
        assert!(index.tcp(&key("default", "reviews"), 9080, None).is_none());
        // HTTP requests to a Service with TCP rules only are unrouted.
        assert_eq!(
            outcome(index.get(&db), &head("GET", "/", &[]), 3306, None),
            "unrouted"
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(split_host_port("a.example:80"), ("a.example", Some(80)));
        assert_eq!(split_host_port("a.example"), ("a.example", None));
        assert_eq!(split_host_port("[::1]:8080"), ("[::1]", Some(8080)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(rust_substitution(r"\2/x/\1$\\"), "${2}/x/${1}$$\\");
        assert!(pick(&[], 5).is_none());
    }

    /// Replays the route-matching fuzz corpus on the stable toolchain (see `fuzz/`).
    #[test]
    fn fuzz_corpus_replays_without_panicking() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_route");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).expect("the seed corpus of fuzz/ is present") {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            std::panic::catch_unwind(|| fuzz_select(&data))
                .unwrap_or_else(|_| panic!("{} panics", path.display()));
            seeds += 1;
        }
        assert!(seeds >= 4, "the seed corpus is missing");
    }
}
