//! Compiling VirtualService, HTTPRoute and GRPCRoute rules into the per-Service tables.

use super::*;

/// Most route matches one Service gathers from the HTTPRoutes and GRPCRoutes attached to it
/// (per namespace they live in), as a VirtualService may hold at most 10,000 routes: each
/// resource is bounded by its CRD, but any number of them may attach to one Service. HTTPRoutes
/// are attached first, then GRPCRoutes, each in order of namespace and name; one that would
/// take a table past the limit is not attached at all (and logged at each compile).
pub const MAX_SERVICE_MATCHES: usize = 10_000;

pub(super) struct Builder {
    service: Arc<Service>,
    virtual_services: Vec<Candidate>,
    producer: Vec<(Precedence, GammaEntry)>,
    consumers: HashMap<Arc<str>, Vec<(Precedence, GammaEntry)>>,
}

pub(super) fn builder<'b>(
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
    pub(super) fn add_vs(&mut self, specificity: usize, vs: &Arc<CompiledVs>) {
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

    pub(super) fn add_gamma(
        &mut self,
        route: &ObjectKey,
        ports: &[u16],
        rules: &[CompiledGammaRule],
    ) {
        let table = if route.namespace == self.service.key.namespace {
            &mut self.producer
        } else {
            self.consumers.entry(route.namespace.clone()).or_default()
        };
        let matches: usize = rules.iter().map(|r| r.matches.len()).sum();
        if table.len() + matches > MAX_SERVICE_MATCHES {
            tracing::warn!(
                route = %route,
                service = %self.service.key,
                matches,
                attached = table.len(),
                limit = MAX_SERVICE_MATCHES,
                "route not attached: the Service would have more than {MAX_SERVICE_MATCHES} route matches"
            );
            return;
        }
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

    pub(super) fn finish(mut self) -> ServiceRoutes {
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

pub(super) fn fqdn(key: &ObjectKey) -> String {
    format!("{}.{}.svc.{CLUSTER_DOMAIN}", key.name, key.namespace)
}

/// The Service a host names, relative to `namespace`: `name`, `name.ns`, `name.ns.svc`,
/// `name.ns.svc.cluster.local`, else a ServiceEntry host visible in `namespace`.
pub(crate) fn resolve_host<'s>(
    snapshot: &'s Snapshot,
    host: &str,
    namespace: &Arc<str>,
) -> Option<&'s Arc<Service>> {
    service_host(snapshot, host, namespace)
        .filter(|s| s.entry.is_none())
        .or_else(|| snapshot.entry_service(host, Some(namespace)))
}

fn service_host<'s>(
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

pub(super) fn resolve_destination(
    snapshot: &Snapshot,
    d: &Destination,
    namespace: &Arc<str>,
) -> Backend {
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

pub(super) fn istio_rule(
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
pub(super) fn rust_substitution(s: &str) -> String {
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

pub(super) fn tcp_route(
    vs: &VirtualService,
    index: usize,
    rule: &TcpRule,
    snapshot: &Snapshot,
) -> TcpRoute {
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

pub(super) fn is_service_parent(p: &ParentRef) -> bool {
    (p.group.is_empty() || &*p.group == "core") && &*p.kind == "Service"
}

/// The Services a route attaches to, each with the ports it is restricted to (empty: all).
pub(super) fn service_parents<'s>(
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

pub(super) fn gateway_backend(
    snapshot: &Snapshot,
    route: &ObjectKey,
    b: &BackendObjectRef,
) -> Backend {
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

pub(super) fn merge_ops(into: &mut HeaderOps, more: &HeaderOps) {
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

pub(super) fn gateway_backends(
    snapshot: &Snapshot,
    route: &ObjectKey,
    refs: &[BackendRef],
) -> Arc<[Backend]> {
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
pub(super) fn gateway_rule(
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

pub(super) fn path_modifier(m: &PathModifier) -> PathRewrite {
    match m {
        PathModifier::ReplaceFullPath(p) => PathRewrite::Full(p.clone()),
        PathModifier::ReplacePrefixMatch(p) => PathRewrite::PrefixElements(p.clone()),
    }
}

pub(super) fn compile_http_route(route: &HttpRoute, snapshot: &Snapshot) -> Vec<CompiledGammaRule> {
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

pub(super) fn compile_grpc_route(route: &GrpcRoute, snapshot: &Snapshot) -> Vec<CompiledGammaRule> {
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
