//! Whether a request or connection satisfies a compiled match: paths, headers, query
//! parameters, methods, gRPC methods, source pods and L4 conditions.

use super::*;

impl Conditions {
    pub(super) fn any() -> Self {
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

    pub(super) fn istio(m: &HttpMatch) -> Self {
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

    pub(super) fn http_route(m: &HttpRouteMatch) -> Self {
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

    pub(super) fn grpc_route(m: &GrpcRouteMatch) -> Self {
        Self {
            path: m
                .method
                .clone()
                .map_or(PathCondition::Any, PathCondition::Grpc),
            headers: header_conditions(&m.headers),
            ..Self::any()
        }
    }

    /// Whether the match concerns every client on every port (what the path index needs).
    pub(super) fn applies_to_all(&self) -> bool {
        self.mesh
            && self.port.is_none()
            && self.source_labels.is_empty()
            && self.source_namespace.is_none()
    }

    /// Whether the match concerns this client and port at all.
    pub(super) fn applies(&self, request: &RequestInfo<'_>) -> bool {
        self.mesh
            && self.port.is_none_or(|p| p == request.port)
            && source_matches(&self.source_labels, &self.source_namespace, request.source)
    }

    /// `Some(matched prefix)` when the request matches.
    pub(super) fn matches<'a>(&'a self, request: &RequestInfo<'_>) -> Option<Option<&'a str>> {
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
    pub(super) fn matches<'a>(&'a self, path: &str) -> Option<Option<&'a str>> {
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

pub(super) fn grpc_method_matches(m: &GrpcMethodMatch, path: &str) -> bool {
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
    pub(super) fn holds(&self, request: &RequestInfo<'_>) -> bool {
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

pub(super) fn header_conditions(matches: &[NamedMatch]) -> Box<[HeaderCondition]> {
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

pub(super) fn query_holds(m: &NamedMatch, query: Option<&str>) -> bool {
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

pub(super) fn scheme(uri: &Uri) -> &str {
    uri.scheme_str().unwrap_or("http")
}

pub(super) fn source_matches(
    labels: &Labels,
    namespace: &Option<Arc<str>>,
    source: Option<&Pod>,
) -> bool {
    if labels.is_empty() && namespace.is_none() {
        return true;
    }
    let Some(pod) = source else { return false };
    labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        && namespace.as_ref().is_none_or(|ns| *ns == pod.key.namespace)
}

pub(super) fn l4_matches(
    m: &L4Match,
    port: u16,
    source: Option<&Pod>,
    cluster_ip: Option<Ipv4Addr>,
) -> bool {
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
