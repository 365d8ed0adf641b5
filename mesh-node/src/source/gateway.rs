//! Translation of Gateway API routes (`gateway.networking.k8s.io` `HTTPRoute` and `GRPCRoute`,
//! v1, v1beta1 and v1alpha2) with the validation the CRDs carry: the OpenAPI patterns, limits and
//! enums, and the CEL rules (`apis/v1/*_types.go`). Defaults the API server would fill in are
//! applied here (a `/` prefix match, backend weight 1, redirect code 302...).
//!
//! Filters the mesh cannot apply (`ExtensionRef`, `CORS`, `ExternalAuth`) make the route invalid
//! rather than being skipped, as the Gateway API asks of implementations.

use std::{sync::Arc, time::Duration};

use super::{
    fields::{at, check, metadata, opt_str, FieldError, Fields},
    validate,
};
use crate::model::{
    traffic::{
        BackendObjectRef, BackendRef, GrpcMethodMatch, GrpcRoute, GrpcRouteMatch, GrpcRouteRule,
        Header, HeaderOps, HttpRoute, HttpRouteMatch, HttpRouteRule, NamedMatch, ParentRef,
        PathMatch, PathModifier, RequestMirror, RequestRedirect, RouteFilter, RouteTimeouts,
        StringMatch, UrlRewrite,
    },
    ObjectKey,
};

type Result<T> = std::result::Result<T, FieldError>;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Which route a filter list belongs to: gRPC routes allow no redirect or rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Http,
    Grpc,
}

/// A list with the CRD's `MaxItems`.
fn bounded<'a>(fields: &Fields<'a>, key: &str, max: usize) -> Result<Vec<Fields<'a>>> {
    let list = fields.list(key)?;
    if list.len() > max {
        return Err(fields.error(
            key,
            format!("too many: {}: must have at most {max} items", list.len()),
        ));
    }
    Ok(list)
}

/// A string with the CRD's length bounds.
fn sized<'a>(fields: &Fields<'a>, key: &str, min: usize, max: usize) -> Result<Option<&'a str>> {
    match fields.str(key)? {
        Some(s) if s.len() < min || s.len() > max => Err(fields.error(
            key,
            format!("must be {min} to {max} characters long, found {}", s.len()),
        )),
        other => Ok(other),
    }
}

fn required_sized<'a>(fields: &Fields<'a>, key: &str, min: usize, max: usize) -> Result<&'a str> {
    sized(fields, key, min, max)?.ok_or_else(|| fields.error(key, "required"))
}

fn enum_str<'a>(
    fields: &Fields<'a>,
    key: &str,
    choices: &[&'a str],
    default: &'a str,
) -> Result<&'a str> {
    match fields.str(key)? {
        None => Ok(default),
        Some(v) => choices.iter().copied().find(|c| *c == v).ok_or_else(|| {
            fields.error(
                key,
                format!(
                    "unsupported value {v:?}: supported values: {}",
                    choices.join(", ")
                ),
            )
        }),
    }
}

fn gateway_hostname(s: &str) -> std::result::Result<(), String> {
    let host = s.strip_prefix("*.").unwrap_or(s);
    // The pattern lets an IPv4 address through; the API reference excludes IPs.
    if s.len() > 253 || !validate::k8s_subdomain(host) || s.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{s:?} is not a valid hostname (lower-case RFC 1123, optionally prefixed with *.; IPs are not allowed)"
        ));
    }
    Ok(())
}

fn precise_hostname(fields: &Fields<'_>, key: &str) -> Result<Option<Arc<str>>> {
    match fields.str(key)? {
        Some(h) if !validate::k8s_subdomain(h) || h.parse::<std::net::IpAddr>().is_ok() => {
            Err(fields.error(
                key,
                format!("{h:?} is not a valid hostname (lower-case RFC 1123, no wildcard, no IP)"),
            ))
        }
        other => Ok(other.map(Arc::from)),
    }
}

fn object_key(fields: &Fields<'_>) -> Result<ObjectKey> {
    let meta = metadata(fields, true)?;
    Ok(ObjectKey {
        namespace: meta.namespace,
        name: meta.name,
    })
}

fn parent_refs(spec: &Fields<'_>) -> Result<Arc<[ParentRef]>> {
    let list = bounded(spec, "parentRefs", 32)?;
    let mut refs: Vec<ParentRef> = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let group = p.str("group")?.unwrap_or(GATEWAY_GROUP);
        if !group.is_empty() && !validate::k8s_subdomain(group) {
            return Err(p.error("group", format!("{group:?} is not a valid API group")));
        }
        let kind = p.str("kind")?.unwrap_or("Gateway");
        let kind_ok = kind.len() <= 63
            && kind.starts_with(|c: char| c.is_ascii_alphabetic())
            && kind.ends_with(|c: char| c.is_ascii_alphanumeric())
            && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !kind_ok {
            return Err(p.error("kind", format!("{kind:?} is not a valid kind")));
        }
        let namespace = opt_str(p, "namespace")?;
        if let Some(ns) = &namespace {
            if !validate::k8s_dns_label(ns) {
                return Err(p.error("namespace", format!("{ns:?} is not a valid namespace name")));
            }
        }
        let section_name = opt_str(p, "sectionName")?;
        if let Some(section) = &section_name {
            if !validate::k8s_subdomain(section) {
                return Err(p.error(
                    "sectionName",
                    format!("{section:?} is not a valid section name"),
                ));
            }
        }
        let parent = ParentRef {
            group: group.into(),
            kind: kind.into(),
            namespace,
            name: required_sized(p, "name", 1, 253)?.into(),
            section_name,
            port: p.port("port")?,
        };
        // ParentRefs must be distinct: several references to one parent each name a section
        // or a port, and not the same one.
        for other in refs.iter().filter(|o| {
            o.group == parent.group
                && o.kind == parent.kind
                && o.name == parent.name
                && o.namespace == parent.namespace
        }) {
            let path = spec.path(&format!("parentRefs[{i}]"));
            let shape = |r: &ParentRef| (r.section_name.is_some(), r.port.is_some());
            if shape(other) != shape(&parent) {
                return at(&path, Err("sectionName or port must be specified when parentRefs includes 2 or more references to the same parent".into()));
            }
            if other.section_name == parent.section_name && other.port == parent.port {
                return at(&path, Err("sectionName or port must be unique when parentRefs includes 2 or more references to the same parent".into()));
            }
        }
        refs.push(parent);
    }
    Ok(refs.into())
}

fn hostnames(spec: &Fields<'_>) -> Result<Arc<[Arc<str>]>> {
    let list = spec.str_list("hostnames")?;
    if list.len() > 16 {
        return Err(spec.error(
            "hostnames",
            format!("too many: {}: must have at most 16 items", list.len()),
        ));
    }
    list.into_iter()
        .map(|(path, h)| at(&path, gateway_hostname(h)).map(|()| Arc::from(h)))
        .collect()
}

fn rule_name(rule: &Fields<'_>, seen: &mut Vec<Arc<str>>) -> Result<Option<Arc<str>>> {
    let name = opt_str(rule, "name")?;
    if let Some(name) = &name {
        if !validate::k8s_subdomain(name) {
            return Err(rule.error("name", format!("{name:?} is not a valid rule name")));
        }
        if seen.contains(name) {
            return Err(rule.error("name", "Rule name must be unique within the route"));
        }
        seen.push(name.clone());
    }
    Ok(name)
}

// ---------------------------------------------------------------------------------------------
// HTTPRoute

pub(super) fn http_route(fields: &Fields<'_>) -> Result<HttpRoute> {
    let key = object_key(fields)?;
    let spec = fields.required_obj("spec")?;
    let parent_refs = parent_refs(&spec)?;
    let hostnames = hostnames(&spec)?;
    let rules = if spec.has("rules") {
        let list = bounded(&spec, "rules", 16)?;
        if list.is_empty() {
            return Err(spec.error("rules", "should have at least 1 items"));
        }
        let mut names = Vec::new();
        let rules = list
            .iter()
            .map(|r| http_rule(r, &mut names))
            .collect::<Result<Vec<_>>>()?;
        let total: usize = rules.iter().map(|r| r.matches.len()).sum();
        if total > 128 {
            return Err(spec.error(
                "rules",
                "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route must be less than 128",
            ));
        }
        rules.into()
    } else {
        Arc::from([HttpRouteRule {
            name: None,
            matches: Arc::from([default_match()]),
            filters: Arc::from([]),
            backend_refs: Arc::from([]),
            timeouts: RouteTimeouts::default(),
        }])
    };
    Ok(HttpRoute {
        key,
        parent_refs,
        hostnames,
        rules,
    })
}

fn default_match() -> HttpRouteMatch {
    HttpRouteMatch {
        path: PathMatch::Prefix("/".into()),
        headers: Arc::from([]),
        query_params: Arc::from([]),
        method: None,
    }
}

fn http_rule(rule: &Fields<'_>, names: &mut Vec<Arc<str>>) -> Result<HttpRouteRule> {
    let name = rule_name(rule, names)?;
    // No matches, or an empty list: the default, a prefix match on `/` (every request).
    let list = bounded(rule, "matches", 64)?;
    let matches: Arc<[HttpRouteMatch]> = if list.is_empty() {
        Arc::from([default_match()])
    } else {
        list.iter().map(http_match).collect::<Result<_>>()?
    };
    let filter_list = bounded(rule, "filters", 16)?;
    let filters = filters(rule, "filters", &filter_list, Route::Http)?;
    let backend_list = bounded(rule, "backendRefs", 16)?;
    if !backend_list.is_empty()
        && filters
            .iter()
            .any(|f| matches!(f, RouteFilter::RequestRedirect(_)))
    {
        return Err(rule.error(
            "filters",
            "RequestRedirect filter must not be used together with backendRefs",
        ));
    }
    let backend_refs = backend_list
        .iter()
        .map(|b| backend_ref(b, Route::Http))
        .collect::<Result<Arc<[_]>>>()?;

    // ReplacePrefixMatch rewrites the part a PathPrefix match matched: exactly one such match.
    let prefix_modifier = |filters: &[RouteFilter]| {
        filters.iter().any(|f| match f {
            RouteFilter::RequestRedirect(r) => {
                matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_)))
            }
            RouteFilter::UrlRewrite(r) => {
                matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_)))
            }
            _ => false,
        })
    };
    let uses_prefix =
        prefix_modifier(&filters) || backend_refs.iter().any(|b| prefix_modifier(&b.filters));
    if uses_prefix && !(matches.len() == 1 && matches!(matches[0].path, PathMatch::Prefix(_))) {
        return Err(rule.error(
            "matches",
            "When using ReplacePrefixMatch in a RequestRedirect or URLRewrite filter, exactly one PathPrefix match must be specified",
        ));
    }

    let timeouts = match rule.obj("timeouts")? {
        Some(t) => {
            let duration = |key: &str| -> Result<Option<Duration>> {
                match t.str(key)? {
                    Some(text) => check(&t, key, validate::gateway_duration(text)).map(Some),
                    None => Ok(None),
                }
            };
            let timeouts = RouteTimeouts {
                request: duration("request")?,
                backend_request: duration("backendRequest")?,
            };
            if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request) {
                if !request.is_zero() && backend > request {
                    return Err(t.error(
                        "backendRequest",
                        "backendRequest timeout cannot be longer than request timeout",
                    ));
                }
            }
            timeouts
        }
        None => RouteTimeouts::default(),
    };
    Ok(HttpRouteRule {
        name,
        matches,
        filters,
        backend_refs,
        timeouts,
    })
}

fn http_match(m: &Fields<'_>) -> Result<HttpRouteMatch> {
    let path = match m.obj("path")? {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let kind = enum_str(
                &p,
                "type",
                &["Exact", "PathPrefix", "RegularExpression"],
                "PathPrefix",
            )?;
            let value = sized(&p, "value", 0, 1024)?.unwrap_or("/");
            match kind {
                "RegularExpression" => {
                    PathMatch::Regex(check(&p, "value", validate::pattern(value))?)
                }
                _ => {
                    check(&p, "value", plain_path(value))?;
                    if kind == "Exact" {
                        PathMatch::Exact(value.into())
                    } else {
                        PathMatch::Prefix(value.into())
                    }
                }
            }
        }
    };
    let method = match m.str("method")? {
        None => None,
        Some(method) if METHODS.contains(&method) => Some(method.into()),
        Some(method) => {
            return Err(m.error(
                "method",
                format!(
                    "unsupported value {method:?}: supported values: {}",
                    METHODS.join(", ")
                ),
            ))
        }
    };
    Ok(HttpRouteMatch {
        path,
        headers: value_matches(m, "headers", 4096, true)?,
        query_params: value_matches(m, "queryParams", 1024, false)?,
        method,
    })
}

/// The CEL rules on `Exact` and `PathPrefix` path values.
fn plain_path(value: &str) -> std::result::Result<(), String> {
    let suffix = "when type one of ['Exact', 'PathPrefix']";
    if !value.starts_with('/') {
        return Err(format!(
            "value must be an absolute path and start with '/' {suffix}"
        ));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return Err(format!("must not contain '{bad}' {suffix}"));
        }
    }
    for bad in ["/..", "/."] {
        if value.ends_with(bad) {
            return Err(format!("must not end with '{bad}' {suffix}"));
        }
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if !hex {
                return Err(format!("must only contain valid characters (matching ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{{2}})+$) {suffix}"));
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)) {
            return Err(format!("must only contain valid characters (matching ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{{2}})+$) {suffix}"));
        }
        i += 1;
    }
    Ok(())
}

/// Header or query parameter matches (`Exact` unless `RegularExpression`). Names are unique
/// (the list is a map keyed by name); for headers, of names equal but for case only the first
/// counts, as the Gateway API specifies.
fn value_matches(
    m: &Fields<'_>,
    key: &str,
    max_value: usize,
    header: bool,
) -> Result<Arc<[NamedMatch]>> {
    let list = bounded(m, key, 16)?;
    let mut out: Vec<NamedMatch> = Vec::with_capacity(list.len());
    let mut names: Vec<&str> = Vec::new();
    for h in &list {
        let name = h.required_str("name")?;
        check(h, "name", validate::http_token(name))?;
        if names.contains(&name) {
            return Err(h.error("name", format!("Duplicate value: {name:?}")));
        }
        names.push(name);
        let kind = enum_str(h, "type", &["Exact", "RegularExpression"], "Exact")?;
        let value = required_sized(h, "value", 1, max_value)?;
        let value = if kind == "Exact" {
            StringMatch::Exact(value.into())
        } else {
            StringMatch::Regex(check(h, "value", validate::pattern(value))?)
        };
        let name: Arc<str> = if header {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        };
        if out.iter().any(|o| o.name == name) {
            continue;
        }
        out.push(NamedMatch {
            name,
            value: Some(value),
        });
    }
    Ok(out.into())
}

/// A filter list with the CEL rules on repeats and combinations.
fn filters(
    parent: &Fields<'_>,
    key: &str,
    list: &[Fields<'_>],
    route: Route,
) -> Result<Arc<[RouteFilter]>> {
    let filters = list
        .iter()
        .map(|f| filter(f, route))
        .collect::<Result<Vec<_>>>()?;
    let count = |pred: fn(&RouteFilter) -> bool| filters.iter().filter(|f| pred(f)).count();
    let redirects = count(|f| matches!(f, RouteFilter::RequestRedirect(_)));
    let rewrites = count(|f| matches!(f, RouteFilter::UrlRewrite(_)));
    if redirects > 0 && rewrites > 0 {
        return Err(parent.error(key, "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both"));
    }
    for (n, what) in [
        (
            count(|f| matches!(f, RouteFilter::RequestHeaderModifier(_))),
            "RequestHeaderModifier",
        ),
        (
            count(|f| matches!(f, RouteFilter::ResponseHeaderModifier(_))),
            "ResponseHeaderModifier",
        ),
        (redirects, "RequestRedirect"),
        (rewrites, "URLRewrite"),
    ] {
        if n > 1 {
            return Err(parent.error(key, format!("{what} filter cannot be repeated")));
        }
    }
    Ok(filters.into())
}

fn filter(f: &Fields<'_>, route: Route) -> Result<RouteFilter> {
    const FIELDS: [(&str, &str); 8] = [
        ("RequestHeaderModifier", "requestHeaderModifier"),
        ("ResponseHeaderModifier", "responseHeaderModifier"),
        ("RequestMirror", "requestMirror"),
        ("RequestRedirect", "requestRedirect"),
        ("URLRewrite", "urlRewrite"),
        ("ExtensionRef", "extensionRef"),
        ("CORS", "cors"),
        ("ExternalAuth", "externalAuth"),
    ];
    let allowed: &[&str] = match route {
        Route::Http => &[
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestMirror",
            "RequestRedirect",
            "URLRewrite",
            "ExtensionRef",
            "CORS",
            "ExternalAuth",
        ],
        Route::Grpc => &[
            "ResponseHeaderModifier",
            "RequestHeaderModifier",
            "RequestMirror",
            "ExtensionRef",
        ],
    };
    let kind = f.required_str("type")?;
    if !allowed.contains(&kind) {
        return Err(f.error(
            "type",
            format!(
                "unsupported value {kind:?}: supported values: {}",
                allowed.join(", ")
            ),
        ));
    }
    for (other, field) in FIELDS {
        if other != kind && f.has(field) {
            return Err(f.error(
                field,
                format!("filter.{field} must be nil if the filter.type is not {other}"),
            ));
        }
    }
    let field = FIELDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, field)| *field)
        .unwrap_or_default();
    if matches!(kind, "ExtensionRef" | "CORS" | "ExternalAuth") {
        return Err(f.error(
            "type",
            format!("the {kind} filter is not supported by Weft"),
        ));
    }
    let Some(body) = f.obj(field)? else {
        return Err(f.error(
            field,
            format!("filter.{field} must be specified for {kind} filter.type"),
        ));
    };
    Ok(match kind {
        "RequestHeaderModifier" => RouteFilter::RequestHeaderModifier(header_filter(&body)?),
        "ResponseHeaderModifier" => RouteFilter::ResponseHeaderModifier(header_filter(&body)?),
        "RequestMirror" => RouteFilter::RequestMirror(mirror(&body)?),
        "RequestRedirect" => {
            let scheme = match body.str("scheme")? {
                None => None,
                Some(s @ ("http" | "https")) => Some(s.into()),
                Some(s) => {
                    return Err(body.error(
                        "scheme",
                        format!("unsupported value {s:?}: supported values: http, https"),
                    ))
                }
            };
            let status_code = match body.uint("statusCode", u64::from(u32::MAX)) {
                Ok(None) => 302,
                Ok(Some(code @ (301 | 302 | 303 | 307 | 308))) => code as u16,
                _ => {
                    return Err(body.error(
                        "statusCode",
                        "unsupported value: supported values: 301, 302, 303, 307, 308",
                    ))
                }
            };
            RouteFilter::RequestRedirect(RequestRedirect {
                scheme,
                hostname: precise_hostname(&body, "hostname")?,
                path: path_modifier(&body)?,
                port: body.port("port")?,
                status_code,
            })
        }
        _ => RouteFilter::UrlRewrite(UrlRewrite {
            hostname: precise_hostname(&body, "hostname")?,
            path: path_modifier(&body)?,
        }),
    })
}

fn header_filter(h: &Fields<'_>) -> Result<HeaderOps> {
    let pairs = |key: &str| -> Result<Arc<[Header]>> {
        let mut out: Vec<Header> = Vec::new();
        for entry in bounded(h, key, 16)? {
            let name = entry.required_str("name")?;
            check(&entry, "name", validate::http_token(name))?;
            let name: Arc<str> = name.to_ascii_lowercase().into();
            if out.iter().any(|o| o.name == name) {
                return Err(entry.error("name", format!("Duplicate value: {name:?}")));
            }
            out.push(Header {
                name,
                value: required_sized(&entry, "value", 1, 4096)?.into(),
            });
        }
        Ok(out.into())
    };
    let remove = h.str_list("remove")?;
    if remove.len() > 16 {
        return Err(h.error(
            "remove",
            format!("too many: {}: must have at most 16 items", remove.len()),
        ));
    }
    let mut removed: Vec<Arc<str>> = Vec::new();
    for (path, name) in remove {
        let name: Arc<str> = name.to_ascii_lowercase().into();
        if removed.contains(&name) {
            return at(&path, Err(format!("Duplicate value: {name:?}")));
        }
        removed.push(name);
    }
    Ok(HeaderOps {
        set: pairs("set")?,
        add: pairs("add")?,
        remove: removed.into(),
    })
}

fn path_modifier(body: &Fields<'_>) -> Result<Option<PathModifier>> {
    let Some(p) = body.obj("path")? else {
        return Ok(None);
    };
    let kind = p.required_str("type")?;
    let full = sized(&p, "replaceFullPath", 0, 1024)?;
    let prefix = sized(&p, "replacePrefixMatch", 0, 1024)?;
    match (kind, full, prefix) {
        ("ReplaceFullPath", Some(full), None) => Ok(Some(PathModifier::ReplaceFullPath(full.into()))),
        ("ReplacePrefixMatch", None, Some(prefix)) => Ok(Some(PathModifier::ReplacePrefixMatch(prefix.into()))),
        ("ReplaceFullPath", None, _) => Err(p.error("replaceFullPath", "replaceFullPath must be specified when type is set to 'ReplaceFullPath'")),
        ("ReplacePrefixMatch", _, None) => Err(p.error("replacePrefixMatch", "replacePrefixMatch must be specified when type is set to 'ReplacePrefixMatch'")),
        ("ReplaceFullPath", _, Some(_)) => Err(p.error("replacePrefixMatch", "type must be 'ReplacePrefixMatch' when replacePrefixMatch is set")),
        ("ReplacePrefixMatch", Some(_), _) => Err(p.error("replaceFullPath", "type must be 'ReplaceFullPath' when replaceFullPath is set")),
        (other, _, _) => Err(p.error("type", format!("unsupported value {other:?}: supported values: ReplaceFullPath, ReplacePrefixMatch"))),
    }
}

fn mirror(body: &Fields<'_>) -> Result<RequestMirror> {
    let backend = backend_object(&body.required_obj("backendRef")?)?;
    let percent = match (body.get("percent"), body.obj("fraction")?) {
        (Some(_), Some(_)) => {
            return Err(body.error(
                "fraction",
                "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter",
            ))
        }
        (Some(_), None) => body.uint("percent", 100)?.unwrap_or(100) as f64,
        (None, Some(fraction)) => {
            let numerator = fraction
                .uint("numerator", i32::MAX as u64)?
                .ok_or_else(|| fraction.error("numerator", "required"))?;
            let denominator = fraction
                .uint("denominator", i32::MAX as u64)?
                .unwrap_or(100);
            if denominator == 0 {
                return Err(fraction.error("denominator", "must be at least 1"));
            }
            if numerator > denominator {
                return Err(fraction.error(
                    "numerator",
                    "numerator must be less than or equal to denominator",
                ));
            }
            numerator as f64 * 100.0 / denominator as f64
        }
        (None, None) => 100.0,
    };
    Ok(RequestMirror { backend, percent })
}

fn backend_object(b: &Fields<'_>) -> Result<BackendObjectRef> {
    let group = b.str("group")?.unwrap_or("");
    if !group.is_empty() && !validate::k8s_subdomain(group) {
        return Err(b.error("group", format!("{group:?} is not a valid API group")));
    }
    let kind = sized(b, "kind", 1, 63)?.unwrap_or("Service");
    let namespace = opt_str(b, "namespace")?;
    if let Some(ns) = &namespace {
        if !validate::k8s_dns_label(ns) {
            return Err(b.error("namespace", format!("{ns:?} is not a valid namespace name")));
        }
    }
    let port = b.port("port")?;
    if group.is_empty() && kind == "Service" && port.is_none() {
        return Err(b.error("port", "Must have port for Service reference"));
    }
    Ok(BackendObjectRef {
        group: group.into(),
        kind: kind.into(),
        name: required_sized(b, "name", 1, 253)?.into(),
        namespace,
        port,
    })
}

fn backend_ref(b: &Fields<'_>, route: Route) -> Result<BackendRef> {
    let weight = b.uint("weight", 1_000_000)?.unwrap_or(1) as u32;
    let list = bounded(b, "filters", 16)?;
    Ok(BackendRef {
        backend: backend_object(b)?,
        weight,
        filters: filters(b, "filters", &list, route)?,
    })
}

// ---------------------------------------------------------------------------------------------
// GRPCRoute

pub(super) fn grpc_route(fields: &Fields<'_>) -> Result<GrpcRoute> {
    let key = object_key(fields)?;
    let spec = fields.required_obj("spec")?;
    let mut names = Vec::new();
    let rules = bounded(&spec, "rules", 16)?
        .iter()
        .map(|rule| {
            let name = rule_name(rule, &mut names)?;
            let matches = bounded(rule, "matches", 8)?
                .iter()
                .map(grpc_match)
                .collect::<Result<_>>()?;
            let list = bounded(rule, "filters", 16)?;
            Ok(GrpcRouteRule {
                name,
                matches,
                filters: filters(rule, "filters", &list, Route::Grpc)?,
                backend_refs: bounded(rule, "backendRefs", 16)?
                    .iter()
                    .map(|b| backend_ref(b, Route::Grpc))
                    .collect::<Result<_>>()?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(GrpcRoute {
        key,
        parent_refs: parent_refs(&spec)?,
        hostnames: hostnames(&spec)?,
        rules,
    })
}

fn grpc_match(m: &Fields<'_>) -> Result<GrpcRouteMatch> {
    let method = match m.obj("method")? {
        None => None,
        Some(mm) => {
            let kind = enum_str(&mm, "type", &["Exact", "RegularExpression"], "Exact")?;
            let service = sized(&mm, "service", 0, 1024)?;
            let method = sized(&mm, "method", 0, 1024)?;
            if service.is_none() && method.is_none() {
                return Err(mm.error(
                    "service",
                    "One or both of 'service' or 'method' must be specified",
                ));
            }
            Some(if kind == "Exact" {
                if let Some(s) = service {
                    check(&mm, "service", grpc_service(s))?;
                }
                if let Some(name) = method {
                    let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !ok {
                        return Err(mm.error("method", "method must only contain valid characters (matching ^[A-Za-z_][A-Za-z_0-9]*$)"));
                    }
                }
                GrpcMethodMatch::Exact {
                    service: service.map(Arc::from),
                    method: method.map(Arc::from),
                }
            } else {
                let compile = |key: &str, value: Option<&str>| match value {
                    Some(v) => check(&mm, key, validate::pattern(v)).map(Some),
                    None => Ok(None),
                };
                GrpcMethodMatch::Regex {
                    service: compile("service", service)?,
                    method: compile("method", method)?,
                }
            })
        }
    };
    Ok(GrpcRouteMatch {
        method,
        headers: value_matches(m, "headers", 4096, true)?,
    })
}

/// `^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$`
fn grpc_service(s: &str) -> std::result::Result<(), String> {
    let ok = s.strip_prefix('.').unwrap_or(s).split('.').all(|part| {
        part.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    });
    if ok {
        Ok(())
    } else {
        Err(r"service must only contain valid characters (matching ^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{
        objects::{assert_rejected, translate_one},
        Object,
    };

    fn http_route(yaml: &str) -> Arc<HttpRoute> {
        match translate_one(yaml) {
            Ok(Object::HttpRoute(r)) => r,
            other => panic!("expected an HTTPRoute, got {other:?}"),
        }
    }

    fn grpc_route(yaml: &str) -> Arc<GrpcRoute> {
        match translate_one(yaml) {
            Ok(Object::GrpcRoute(r)) => r,
            other => panic!("expected a GRPCRoute, got {other:?}"),
        }
    }

    #[test]
    fn gamma_weighted_backends() {
        // The GAMMA traffic-splitting example of the Gateway API documentation.
        let route = http_route(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: smiley-route
  namespace: faces
spec:
  parentRefs:
    - name: smiley
      kind: Service
      group: ""
      port: 80
  rules:
    - backendRefs:
        - name: smiley
          port: 80
          weight: 90
        - name: smiley2
          port: 80
          weight: 10
      timeouts:
        request: 10s
        backendRequest: 2s
"#,
        );
        assert_eq!(route.key, ObjectKey::new("faces", "smiley-route"));
        let parents: Vec<_> = route
            .service_parents()
            .map(|p| (&*p.name, p.port))
            .collect();
        assert_eq!(parents, [("smiley", Some(80))]);
        assert!(!route.has_non_mesh_parents());
        let rule = &route.rules[0];
        // No matches written: the API server's default, a prefix match on `/`.
        assert_eq!(rule.matches[0].path, PathMatch::Prefix("/".into()));
        let backends: Vec<_> = rule
            .backend_refs
            .iter()
            .map(|b| (&*b.backend.kind, &*b.backend.name, b.backend.port, b.weight))
            .collect();
        assert_eq!(
            backends,
            [
                ("Service", "smiley", Some(80), 90),
                ("Service", "smiley2", Some(80), 10)
            ]
        );
        assert_eq!(
            rule.timeouts,
            RouteTimeouts {
                request: Some(Duration::from_secs(10)),
                backend_request: Some(Duration::from_secs(2)),
            }
        );
    }

    #[test]
    fn bookinfo_gateway_api_example() {
        let route = http_route(include_str!(
            "../../../examples/bookinfo-traffic/httproute-reviews-50-v3.yaml"
        ));
        assert_eq!(route.rules[0].backend_refs.len(), 2);
        assert!(route.rules[0].backend_refs.iter().all(|b| b.weight == 50));
    }

    #[test]
    fn matches_and_filters_from_the_gateway_api_guides() {
        let route = http_route(
            r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: foo-route
spec:
  parentRefs:
  - name: example-gateway
  - name: foo-svc
    group: ""
    kind: Service
  hostnames:
  - "foo.example.com"
  - "*.example.org"
  rules:
  - name: login
    matches:
    - path:
        type: PathPrefix
        value: /login
      method: POST
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        add:
        - name: My-Header-Name
          value: my-header-value
        set:
        - name: x-env
          value: canary
        remove: ["X-Debug"]
    - type: RequestMirror
      requestMirror:
        backendRef:
          name: bar-svc
          port: 8080
        fraction:
          numerator: 1
          denominator: 4
    backendRefs:
    - name: foo-svc
      port: 8080
  - matches:
    - headers:
      - type: Exact
        name: env
        value: canary
      - type: RegularExpression
        name: x-version
        value: "v[0-9]+"
      queryParams:
      - name: lang
        value: en
    - path:
        type: RegularExpression
        value: "/api/v[12]/.*"
    backendRefs:
    - name: bar-svc-canary
      port: 8080
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier:
          set:
          - name: x-canary
            value: "true"
  - matches:
    - path:
        type: PathPrefix
        value: /cardamom
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: elsewhere.example
        path:
          type: ReplacePrefixMatch
          replacePrefixMatch: /fennel
    backendRefs:
    - name: example-svc
      port: 80
  - matches:
    - path:
        type: Exact
        value: /old
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: new.example.com
        statusCode: 301
"#,
        );
        assert_eq!(route.key, ObjectKey::new("default", "foo-route"));
        assert!(route.has_non_mesh_parents());
        assert_eq!(route.service_parents().count(), 1);
        assert_eq!(&*route.parent_refs[0].group, GATEWAY_GROUP);
        assert_eq!(&*route.parent_refs[0].kind, "Gateway");
        assert_eq!(route.hostnames.len(), 2);

        let login = &route.rules[0];
        assert_eq!(login.name.as_deref(), Some("login"));
        assert_eq!(login.matches[0].path, PathMatch::Prefix("/login".into()));
        assert_eq!(login.matches[0].method.as_deref(), Some("POST"));
        let RouteFilter::RequestHeaderModifier(ops) = &login.filters[0] else {
            panic!("expected a header modifier");
        };
        assert_eq!(&*ops.add[0].name, "my-header-name");
        assert_eq!(&*ops.set[0].value, "canary");
        assert_eq!(&*ops.remove, [Arc::from("x-debug")]);
        let RouteFilter::RequestMirror(mirror) = &login.filters[1] else {
            panic!("expected a mirror");
        };
        assert_eq!(&*mirror.backend.name, "bar-svc");
        assert_eq!(mirror.percent, 25.0);
        assert_eq!(login.backend_refs[0].weight, 1);

        let canary = &route.rules[1];
        let m = &canary.matches[0];
        assert_eq!(m.path, PathMatch::Prefix("/".into()));
        assert_eq!(
            m.headers[0].value,
            Some(StringMatch::Exact("canary".into()))
        );
        let Some(StringMatch::Regex(version)) = &m.headers[1].value else {
            panic!("expected a regex");
        };
        assert!(version.is_match("v12"));
        assert_eq!(&*m.query_params[0].name, "lang");
        let PathMatch::Regex(api) = &canary.matches[1].path else {
            panic!("expected a regex path");
        };
        assert!(api.is_match("/api/v2/users"));
        assert!(matches!(
            canary.backend_refs[0].filters[0],
            RouteFilter::ResponseHeaderModifier(_)
        ));

        let RouteFilter::UrlRewrite(rewrite) = &route.rules[2].filters[0] else {
            panic!("expected a rewrite");
        };
        assert_eq!(rewrite.hostname.as_deref(), Some("elsewhere.example"));
        assert_eq!(
            rewrite.path,
            Some(PathModifier::ReplacePrefixMatch("/fennel".into()))
        );

        let RouteFilter::RequestRedirect(redirect) = &route.rules[3].filters[0] else {
            panic!("expected a redirect");
        };
        assert_eq!(redirect.scheme.as_deref(), Some("https"));
        assert_eq!(redirect.status_code, 301);
        assert!(route.rules[3].backend_refs.is_empty());
    }

    #[test]
    fn routes_without_rules_get_the_default_rule() {
        let route = http_route("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec: {parentRefs: [{group: '', kind: Service, name: s}]}");
        assert_eq!(route.rules.len(), 1);
        assert_eq!(
            route.rules[0].matches[0].path,
            PathMatch::Prefix("/".into())
        );
        assert!(route.rules[0].backend_refs.is_empty());
    }

    #[test]
    fn bad_http_route_fields_are_named() {
        let hr = |spec: &str| {
            format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec: {spec}")
        };
        let parent = "parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]";
        for (rules, field, reason) in [
            ("[{backendRefs: [{name: v1, port: 9080}, {name: v3, port: 9080, weight: -1}]}]", "spec.rules[0].backendRefs[1].weight", "from 0 to 1000000"),
            ("[{backendRefs: [{name: v1, port: 9080, weight: 1000001}]}]", "spec.rules[0].backendRefs[0].weight", "from 0 to 1000000"),
            ("[{backendRefs: [{name: v1}]}]", "spec.rules[0].backendRefs[0].port", "Must have port for Service reference"),
            ("[{backendRefs: [{port: 80}]}]", "spec.rules[0].backendRefs[0].name", "required"),
            ("[{matches: [{path: {type: PathPrefix, value: login}}]}]", "spec.rules[0].matches[0].path.value", "must be an absolute path"),
            ("[{matches: [{path: {type: Exact, value: /a//b}}]}]", "spec.rules[0].matches[0].path.value", "must not contain '//'"),
            ("[{matches: [{path: {type: Exact, value: '/a b'}}]}]", "spec.rules[0].matches[0].path.value", "valid characters"),
            ("[{matches: [{path: {type: Prefix, value: /a}}]}]", "spec.rules[0].matches[0].path.type", "supported values: Exact, PathPrefix, RegularExpression"),
            ("[{matches: [{path: {type: RegularExpression, value: '/a(['}}]}]", "spec.rules[0].matches[0].path.value", "not a valid regular expression"),
            ("[{matches: [{method: FETCH}]}]", "spec.rules[0].matches[0].method", "supported values: GET"),
            ("[{matches: [{method: get}]}]", "spec.rules[0].matches[0].method", "unsupported value \"get\""),
            ("[{matches: [{headers: [{name: 'bad header', value: x}]}]}]", "spec.rules[0].matches[0].headers[0].name", "RFC 7230 token"),
            ("[{matches: [{headers: [{name: ':path', value: x}]}]}]", "spec.rules[0].matches[0].headers[0].name", "RFC 7230 token"),
            ("[{matches: [{headers: [{name: env, value: a}, {name: env, value: b}]}]}]", "spec.rules[0].matches[0].headers[1].name", "Duplicate value"),
            ("[{matches: [{headers: [{name: env, value: ''}]}]}]", "spec.rules[0].matches[0].headers[0].value", "must be 1 to 4096"),
            ("[{matches: [{queryParams: [{name: q, type: Prefix, value: x}]}]}]", "spec.rules[0].matches[0].queryParams[0].type", "supported values: Exact, RegularExpression"),
            ("[{timeouts: {request: 1.5s}}]", "spec.rules[0].timeouts.request", "not a Gateway API duration"),
            ("[{timeouts: {request: '-1s'}}]", "spec.rules[0].timeouts.request", "not a Gateway API duration"),
            ("[{timeouts: {request: 1s, backendRequest: 2s}}]", "spec.rules[0].timeouts.backendRequest", "cannot be longer than request timeout"),
            ("[{filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}], backendRefs: [{name: v1, port: 9080}]}]", "spec.rules[0].filters", "must not be used together with backendRefs"),
            ("[{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]}]", "spec.rules[0].filters[0].requestRedirect.statusCode", "301, 302, 303, 307, 308"),
            ("[{filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]}]", "spec.rules[0].filters[0].requestRedirect.scheme", "http, https"),
            ("[{filters: [{type: RequestRedirect, requestRedirect: {hostname: '*.example.com'}}]}]", "spec.rules[0].filters[0].requestRedirect.hostname", "not a valid hostname"),
            ("[{filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]}]", "spec.rules[0].filters", "not both"),
            ("[{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}]}]", "spec.rules[0].filters", "RequestHeaderModifier filter cannot be repeated"),
            ("[{filters: [{type: RequestHeaderModifier}]}]", "spec.rules[0].filters[0].requestHeaderModifier", "must be specified for RequestHeaderModifier"),
            ("[{filters: [{type: RequestHeaderModifier, responseHeaderModifier: {}}]}]", "spec.rules[0].filters[0].responseHeaderModifier", "must be nil if the filter.type is not ResponseHeaderModifier"),
            ("[{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: 'a:b', value: x}]}}]}]", "spec.rules[0].filters[0].requestHeaderModifier.set[0].name", "RFC 7230 token"),
            ("[{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: X-A, value: x}, {name: x-a, value: y}]}}]}]", "spec.rules[0].filters[0].requestHeaderModifier.add[1].name", "Duplicate value"),
            ("[{filters: [{type: CORS, cors: {allowOrigins: ['*']}}]}]", "spec.rules[0].filters[0].type", "not supported by Weft"),
            ("[{filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: F, name: f}}]}]", "spec.rules[0].filters[0].type", "not supported by Weft"),
            ("[{filters: [{type: Teleport}]}]", "spec.rules[0].filters[0].type", "unsupported value \"Teleport\""),
            ("[{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 50, fraction: {numerator: 1}}}]}]", "spec.rules[0].filters[0].requestMirror.fraction", "Only one of percent or fraction"),
            ("[{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, fraction: {numerator: 5, denominator: 4}}}]}]", "spec.rules[0].filters[0].requestMirror.fraction.numerator", "less than or equal to denominator"),
            ("[{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 101}}]}]", "spec.rules[0].filters[0].requestMirror.percent", "from 0 to 100"),
            ("[{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m}}}]}]", "spec.rules[0].filters[0].requestMirror.backendRef.port", "Must have port"),
            ("[{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]", "spec.rules[0].matches", "exactly one PathPrefix match"),
            ("[{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]}]", "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath", "must be specified when type is set to 'ReplaceFullPath'"),
            ("[{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /a, replacePrefixMatch: /b}}}]}]", "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch", "type must be 'ReplacePrefixMatch'"),
            ("[{name: a, backendRefs: []}, {name: a}]", "spec.rules[1].name", "must be unique"),
            ("[]", "spec.rules", "at least 1"),
        ] {
            assert_rejected(&hr(&format!("{{{parent}, rules: {rules}}}")), "HTTPRoute", "bookinfo/reviews", field, reason);
        }
        for (spec, field, reason) in [
            ("{parentRefs: [{kind: Service, group: '', name: reviews, port: 0}]}", "spec.parentRefs[0].port", "expected a port number"),
            ("{parentRefs: [{kind: Service, group: '', namespace: Bad_NS, name: reviews}]}", "spec.parentRefs[0].namespace", "not a valid namespace"),
            ("{parentRefs: [{kind: 'Ser vice', name: reviews}]}", "spec.parentRefs[0].kind", "not a valid kind"),
            ("{parentRefs: [{kind: Service, group: '', name: reviews}, {kind: Service, group: '', name: reviews}]}", "spec.parentRefs[1]", "sectionName or port must be"),
            ("{parentRefs: [{kind: Service, group: '', name: reviews, port: 80}, {kind: Service, group: '', name: reviews, port: 80}]}", "spec.parentRefs[1]", "must be unique"),
            ("{hostnames: [10.0.0.1]}", "spec.hostnames[0]", "not a valid hostname"),
            ("{hostnames: ['Foo.example.com']}", "spec.hostnames[0]", "not a valid hostname"),
        ] {
            assert_rejected(&hr(spec), "HTTPRoute", "bookinfo/reviews", field, reason);
        }
    }

    #[test]
    fn grpc_route_from_the_gateway_api_guide() {
        let route = grpc_route(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: foo-grpcroute
  namespace: grpc
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: foo-svc
    port: 50051
  hostnames:
  - "foo.example.com"
  rules:
  - matches:
    - method:
        service: com.example.User
        method: Login
    backendRefs:
    - name: foo-svc
      port: 50051
  - matches:
    - headers:
      - type: Exact
        name: magic
        value: foo
      method:
        service: com.Example.Login
        method: Login
    - method:
        type: RegularExpression
        service: "com\\.example\\..*"
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        add:
        - name: grpc-route
          value: "2"
    backendRefs:
    - name: foo-svc-v2
      port: 50051
      weight: 3
"#,
        );
        assert_eq!(route.key, ObjectKey::new("grpc", "foo-grpcroute"));
        assert_eq!(route.service_parents().count(), 1);
        assert_eq!(
            route.rules[0].matches[0].method,
            Some(GrpcMethodMatch::Exact {
                service: Some("com.example.User".into()),
                method: Some("Login".into())
            })
        );
        let second = &route.rules[1];
        assert_eq!(&*second.matches[0].headers[0].name, "magic");
        let Some(GrpcMethodMatch::Regex {
            service: Some(service),
            method: None,
        }) = &second.matches[1].method
        else {
            panic!("expected a regex method match");
        };
        assert!(service.is_match("com.example.Health"));
        assert!(matches!(
            second.filters[0],
            RouteFilter::RequestHeaderModifier(_)
        ));
        assert_eq!(second.backend_refs[0].weight, 3);
    }

    #[test]
    fn bad_grpc_route_fields_are_named() {
        let gr = |rules: &str| {
            format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: foo, namespace: grpc}}\nspec: {{parentRefs: [{{group: '', kind: Service, name: foo, port: 50051}}], rules: {rules}}}")
        };
        for (rules, field, reason) in [
            (
                "[{matches: [{method: {type: Exact}}]}]",
                "spec.rules[0].matches[0].method.service",
                "One or both of 'service' or 'method'",
            ),
            (
                "[{matches: [{method: {service: 'com/example'}}]}]",
                "spec.rules[0].matches[0].method.service",
                "valid characters",
            ),
            (
                "[{matches: [{method: {method: 'Log-in'}}]}]",
                "spec.rules[0].matches[0].method.method",
                "valid characters",
            ),
            (
                "[{matches: [{method: {type: RegularExpression, method: '(('}}]}]",
                "spec.rules[0].matches[0].method.method",
                "not a valid regular expression",
            ),
            (
                "[{matches: [{method: {type: Prefix, method: a}}]}]",
                "spec.rules[0].matches[0].method.type",
                "supported values: Exact, RegularExpression",
            ),
            (
                "[{filters: [{type: RequestRedirect, requestRedirect: {}}]}]",
                "spec.rules[0].filters[0].type",
                "supported values: ResponseHeaderModifier",
            ),
            (
                "[{filters: [{type: URLRewrite, urlRewrite: {}}]}]",
                "spec.rules[0].filters[0].type",
                "unsupported value \"URLRewrite\"",
            ),
            (
                "[{backendRefs: [{name: foo, port: 50051, weight: -3}]}]",
                "spec.rules[0].backendRefs[0].weight",
                "from 0 to 1000000",
            ),
            (
                "[{matches: [{}, {}, {}, {}, {}, {}, {}, {}, {}]}]",
                "spec.rules[0].matches",
                "at most 8 items",
            ),
        ] {
            assert_rejected(&gr(rules), "GRPCRoute", "grpc/foo", field, reason);
        }
    }
}
