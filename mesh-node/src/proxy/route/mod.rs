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
//!   (`*.ns.svc.cluster.local`, `*`) matched against the FQDN. A ServiceEntry host is named by
//!   the host itself (the entry in the VirtualService's namespace first, else one exported to
//!   it); other hosts are ignored here.
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

mod compile;
mod explain;
mod matching;
mod rewrite;

pub(crate) use self::compile::resolve_host;
pub use self::{
    compile::MAX_SERVICE_MATCHES,
    explain::{backends, share, Considered, RouteEntry, RouteTrace},
    rewrite::{apply_header_ops, request_authority},
};
use self::{compile::*, matching::*};
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
    /// What each route compiled to, for the next snapshot's tables.
    compiled: Compiled,
}

/// Each route's compiled form, keyed by the route and kept with the object it came from, so a
/// route that is the same object in the next snapshot is not compiled again.
#[derive(Debug, Default)]
struct Compiled {
    virtual_services: CompiledMap<VirtualService, CompiledVs>,
    http_routes: CompiledMap<HttpRoute, [CompiledGammaRule]>,
    grpc_routes: CompiledMap<GrpcRoute, [CompiledGammaRule]>,
}

/// Route key → (the route object, what it compiled to).
type CompiledMap<R, C> = HashMap<ObjectKey, (Arc<R>, Arc<C>)>;

impl Compiled {
    /// `key`'s compiled form: `previous`'s when it was compiled from this very object, else
    /// compiled now.
    fn get_or_compile<R, C: ?Sized>(
        map: &mut CompiledMap<R, C>,
        previous: Option<&CompiledMap<R, C>>,
        key: &ObjectKey,
        object: &Arc<R>,
        compile: impl FnOnce() -> Arc<C>,
    ) -> Arc<C> {
        let compiled = previous
            .and_then(|p| p.get(key))
            .filter(|(source, _)| Arc::ptr_eq(source, object))
            .map(|(_, compiled)| compiled.clone())
            .unwrap_or_else(compile);
        map.insert(key.clone(), (object.clone(), compiled.clone()));
        compiled
    }
}

/// What a client sent, as far as routing is concerned.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a http::Method,
    /// Path and query as received.
    pub uri: &'a Uri,
    /// `:authority` or `Host`, possibly with a port.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
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

impl Backend {
    /// The whole of `service`'s `port`: where a request or connection no route takes goes.
    pub fn to(service: &ObjectKey, port: u16) -> Self {
        Self {
            service: Some(service.clone()),
            host: service.name.clone(),
            port: Some(port),
            subset: None,
            weight: 1,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        }
    }
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
    /// For a VirtualService with many matches: where to look first.
    index: Option<PathIndex>,
}

/// Below this many match conditions a VirtualService is tried rule by rule: the index costs
/// more than it saves.
const INDEX_FROM: usize = 32;

/// One match condition of a VirtualService: `(rule, match)`, `match` [`CATCH_ALL`] for a rule
/// without matches. Ordered as Istio tries them.
type Position = (u32, u32);
const CATCH_ALL: u32 = u32::MAX;

/// The HTTP match conditions of a VirtualService by path, so a request tries only those whose
/// path can match it, in Istio's order: exact and prefix paths (case-sensitive, for every
/// client and port) by their value, every other condition in the rest list. The first
/// condition in order among the candidates that matches wins, as without the index.
#[derive(Debug, Default)]
struct PathIndex {
    exact: HashMap<Arc<str>, Vec<Position>>,
    prefix: HashMap<Arc<str>, Vec<Position>>,
    /// The lengths of the indexed prefixes, each once.
    prefix_lengths: Vec<usize>,
    rest: Vec<Position>,
    /// Some indexed condition concerns every request (so a request no rule matches is `NoMatch`).
    any_indexed: bool,
}

impl PathIndex {
    fn new(http: &[HttpEntry]) -> Self {
        let mut index = Self::default();
        for (e, entry) in http.iter().enumerate() {
            let e = e as u32;
            if entry.matches.is_empty() {
                index.rest.push((e, CATCH_ALL));
                continue;
            }
            for (m, conditions) in entry.matches.iter().enumerate() {
                let position = (e, m as u32);
                let key = conditions.applies_to_all().then_some(&conditions.path);
                match key {
                    Some(PathCondition::Exact {
                        value,
                        ignore_case: false,
                    }) => index.exact.entry(value.clone()).or_default().push(position),
                    Some(PathCondition::Prefix {
                        value,
                        ignore_case: false,
                    }) => {
                        index.prefix_lengths.push(value.len());
                        index
                            .prefix
                            .entry(value.clone())
                            .or_default()
                            .push(position);
                    }
                    _ => {
                        index.rest.push(position);
                        continue;
                    }
                }
                index.any_indexed = true;
            }
        }
        index.prefix_lengths.sort_unstable();
        index.prefix_lengths.dedup();
        index
    }

    /// The positions a request for `path` has to try, in order: the sorted lists that can
    /// match it, merged as they are read.
    fn candidates<'a>(&'a self, path: &str) -> impl Iterator<Item = Position> + 'a {
        let mut lists: Vec<&'a [Position]> = vec![&self.rest];
        if let Some(list) = self.exact.get(path) {
            lists.push(list);
        }
        for &len in &self.prefix_lengths {
            if len > path.len() {
                break;
            }
            if let Some(list) = path.get(..len).and_then(|p| self.prefix.get(p)) {
                lists.push(list);
            }
        }
        std::iter::from_fn(move || {
            let (i, _) = lists
                .iter()
                .enumerate()
                .filter_map(|(i, l)| l.first().map(|p| (i, *p)))
                .min_by_key(|(_, p)| *p)?;
            let (&next, rest) = lists[i].split_first()?;
            lists[i] = rest;
            Some(next)
        })
    }
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
#[derive(Debug)]
struct CompiledGammaRule {
    rule: Arc<Rule>,
    matches: Vec<(Conditions, Precedence)>,
}

impl RouteIndex {
    /// Built once per snapshot; cost O(routes), nothing per Service without routes.
    pub fn build(snapshot: &Snapshot) -> Self {
        Self::update(snapshot, None)
    }

    /// The tables of `snapshot`, reusing the compiled form of every route of `previous` that
    /// is the same object in `snapshot`. Only valid when the Services are the same objects in
    /// both snapshots (routes resolve their hosts and backends against them); then a change of
    /// one route compiles one route, and the tables are assembled from the compiled routes.
    pub fn update(snapshot: &Snapshot, previous: Option<&RouteIndex>) -> Self {
        let mut builders: HashMap<ObjectKey, Builder> = HashMap::new();
        let mut fqdns: Option<Vec<(String, &Arc<Service>)>> = None;
        let mut compiled = Compiled::default();
        let before = previous.map(|p| &p.compiled);

        for vs in snapshot.virtual_services.values() {
            if !vs.applies_to_mesh() {
                continue;
            }
            let compiled = Compiled::get_or_compile(
                &mut compiled.virtual_services,
                before.map(|b| &b.virtual_services),
                &vs.key,
                vs,
                || Arc::new(CompiledVs::new(vs, snapshot)),
            );
            for host in vs.hosts.iter() {
                if let Some(suffix) = host.strip_prefix('*') {
                    let fqdns = fqdns.get_or_insert_with(|| {
                        snapshot
                            .services
                            .values()
                            .map(|s| (s.hostname(), s))
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
            let rules = Compiled::get_or_compile(
                &mut compiled.http_routes,
                before.map(|b| &b.http_routes),
                &route.key,
                route,
                || compile_http_route(route, snapshot).into(),
            );
            for (service, ports) in targets {
                builder(&mut builders, service).add_gamma(&route.key, &ports, &rules);
            }
        }
        for route in snapshot.grpc_routes.values() {
            let targets = service_parents(snapshot, &route.key, &route.parent_refs);
            if targets.is_empty() {
                continue;
            }
            let rules = Compiled::get_or_compile(
                &mut compiled.grpc_routes,
                before.map(|b| &b.grpc_routes),
                &route.key,
                route,
                || compile_grpc_route(route, snapshot).into(),
            );
            for (service, ports) in targets {
                builder(&mut builders, service).add_gamma(&route.key, &ports, &rules);
            }
        }

        Self {
            services: builders
                .into_iter()
                .map(|(key, b)| (key, Arc::new(b.finish())))
                .collect(),
            compiled,
        }
    }

    /// Every Service that has routes, with them (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServiceRoutes>> {
        self.services.values()
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
        let http: Box<[HttpEntry]> = http;
        let conditions: usize = http.iter().map(|e| e.matches.len().max(1)).sum();
        let index = (conditions >= INDEX_FROM).then(|| PathIndex::new(&http));
        Self {
            key: vs.key.clone(),
            export_to: vs.export_to.clone(),
            http,
            tcp,
            index,
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
        match &self.index {
            Some(index) => self.select_indexed(index, request),
            None => self.select_linear(request),
        }
    }

    /// The first rule, in order, with a match that concerns the request and holds.
    fn select_linear<'a>(&'a self, request: &RequestInfo<'_>) -> Selection<'a> {
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

impl CompiledVs {
    /// [`CompiledVs::select`] through the path index: the same answer, trying only the
    /// conditions whose path can match.
    fn select_indexed<'a>(&'a self, index: &PathIndex, request: &RequestInfo<'_>) -> Selection<'a> {
        for (e, m) in index.candidates(request.uri.path()) {
            let entry = &self.http[e as usize];
            if m == CATCH_ALL {
                return Selection::Rule(Selected {
                    rule: &entry.rule,
                    matched_prefix: Some("/"),
                    port: request.port,
                });
            }
            let conditions = &entry.matches[m as usize];
            if !conditions.applies(request) {
                continue;
            }
            if let Some(matched_prefix) = conditions.matches(request) {
                return Selection::Rule(Selected {
                    rule: &entry.rule,
                    matched_prefix,
                    port: request.port,
                });
            }
        }
        let applicable = index.any_indexed
            || index.rest.iter().any(|&(e, m)| {
                m != CATCH_ALL && self.http[e as usize].matches[m as usize].applies(request)
            });
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
                let selection = routes.select(&request);
                // What `meshctl explain` says matched is what the router picks.
                let trace = routes.explain(&request);
                let chosen: Vec<_> = trace.rules.iter().filter(|r| r.chosen).collect();
                match selection {
                    Selection::Rule(s) => assert!(
                        chosen.len() == 1
                            && (chosen[0].name == *s.rule.name
                                || chosen[0]
                                    .name
                                    .starts_with(&format!("{} match[", s.rule.name))),
                        "explain chose {chosen:?}, the router {}",
                        s.rule.name
                    ),
                    _ => assert!(
                        chosen.is_empty(),
                        "explain chose {chosen:?}, the router none"
                    ),
                }
                if let Selection::Rule(selected) = selection {
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
mod tests;
