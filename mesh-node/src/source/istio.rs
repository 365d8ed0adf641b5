//! Translation of `networking.istio.io` resources (`VirtualService`, `DestinationRule`,
//! `ServiceEntry`) into the model, with Istio's validation (`pkg/config/validation`): a resource
//! istiod would refuse is refused here, with the path of the first offending field.
//!
//! Weft refuses a few things Istio accepts, rather than ignoring them and routing differently
//! from what the user wrote: delegate VirtualServices and `delegate` routes, TLS routes,
//! `directResponse` bodies given as bytes. Fields that do not change routing and that Weft does
//! not use yet (`corsPolicy` is kept as written; `localityLbSetting`, `tunnel`...) are accepted.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use super::yaml::Value;
use super::{
    fields::{
        any, at, check, checked_labels, ip_blocks, metadata, one_of, opt_str, show, strings,
        workload_selector, FieldError, Fields,
    },
    validate,
};
use crate::model::{
    traffic::{
        AbortError, ClientTls, ConnectionPool, ConsistentHash, Destination, DestinationRule,
        DirectResponse, Fault, FaultAbort, FaultDelay, H2UpgradePolicy, HashKey, Header, HeaderOps,
        HeaderRules, HttpAction, HttpDestination, HttpMatch, HttpPool, HttpRule, L4Match, LbPolicy,
        LoadBalancer, MeshLocation, Mirror, NamedMatch, OutlierDetection, PortTrafficPolicy,
        Redirect, RedirectPort, RegexRewrite, Resolution, Retries, Rewrite, RouteDestination,
        ServiceEntry, ServiceEntryPort, SimpleLb, StringMatch, Subset, TcpPool, TcpRule, TlsMode,
        TrafficPolicy, VirtualService, WorkloadEndpoint, GRPC_STATUS_CODES, MESH_GATEWAY,
    },
    ObjectKey,
};

type Result<T> = std::result::Result<T, FieldError>;

/// The largest value of Istio's `int32` fields.
const INT32_MAX: u64 = i32::MAX as u64;

fn opt_port(fields: &Fields<'_>, key: &str) -> Result<Option<u16>> {
    match fields.uint(key, u64::from(u32::MAX))? {
        None | Some(0) => Ok(None),
        Some(n) => check(
            fields,
            key,
            u16::try_from(n)
                .map(Some)
                .map_err(|_| format!("port number {n} must be in the range 1..65535")),
        ),
    }
}

fn istio_duration(fields: &Fields<'_>, key: &str) -> Result<Option<Duration>> {
    match fields.str(key)? {
        Some(text) => check(fields, key, validate::istio_duration(text)).map(Some),
        None => Ok(None),
    }
}

fn count(fields: &Fields<'_>, key: &str) -> Result<Option<u32>> {
    Ok(fields.uint(key, INT32_MAX)?.map(|n| n as u32))
}

fn export_to(fields: &Fields<'_>, namespace: &str, service_entry: bool) -> Result<Arc<[Arc<str>]>> {
    let list = strings(fields, "exportTo", any)?;
    let entries: Vec<&str> = list.iter().map(|s| &**s).collect();
    check(
        fields,
        "exportTo",
        validate::export_to(namespace, &entries, service_entry),
    )?;
    Ok(list)
}

fn key_of(namespace: &Arc<str>, name: &Arc<str>) -> ObjectKey {
    ObjectKey {
        namespace: namespace.clone(),
        name: name.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// VirtualService

/// Weft's bounds on one VirtualService, so that one resource cannot exhaust the node proxies
/// that every tenant shares (each route costs a few KiB in every proxy). Istio has none; these
/// are far above what hand-written and generated rules use.
const MAX_HOSTS: usize = 1_000;
const MAX_ROUTES: usize = 10_000;
const MAX_MATCHES: usize = 100;

/// Refuses a list of `len` items under `key` over `max`, naming the limit.
fn at_most(fields: &Fields<'_>, key: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(fields.error(
            key,
            format!("{len} items: Weft accepts at most {max} per VirtualService (a limit that keeps one resource from exhausting the node proxies)"),
        ));
    }
    Ok(())
}

pub(super) fn virtual_service(fields: &Fields<'_>) -> Result<VirtualService> {
    let meta = metadata(fields, true)?;
    let spec = fields.required_obj("spec")?;

    let gateways = strings(&spec, "gateways", validate::gateway_name)?;
    let for_gateway = !gateways.is_empty() && !gateways.iter().any(|g| &**g == MESH_GATEWAY);

    let hosts = spec.str_list("hosts")?;
    if hosts.is_empty() {
        return Err(spec.error(
            "hosts",
            "required (delegate VirtualServices, which have no hosts, are not supported)",
        ));
    }
    at_most(&spec, "hosts", hosts.len(), MAX_HOSTS)?;
    for (path, host) in &hosts {
        if let Err(reason) = validate::wildcard_domain(host) {
            if host.parse::<std::net::IpAddr>().is_err() {
                return at(path, Err(reason));
            }
        } else if !for_gateway && *host == "*" {
            return at(
                path,
                Err(
                    "wildcard host * is not allowed for virtual services bound to the mesh gateway"
                        .into(),
                ),
            );
        }
    }
    for (j, (path, b)) in hosts.iter().enumerate() {
        if let Some((_, a)) = hosts[..j]
            .iter()
            .find(|(_, a)| validate::hosts_overlap(a, b))
        {
            return at(
                path,
                Err(format!("duplicate hosts in virtual service: {a} & {b}")),
            );
        }
    }
    if spec.has("tls") {
        return Err(spec.error(
            "tls",
            "TLS routes are not supported by Weft yet (use tcp routes, or HTTP routes)",
        ));
    }
    let http = spec.list("http")?;
    let tcp = spec.list("tcp")?;
    at_most(&spec, "http", http.len(), MAX_ROUTES)?;
    at_most(&spec, "tcp", tcp.len(), MAX_ROUTES)?;
    if http.is_empty() && tcp.is_empty() {
        return Err(spec.error(
            "http",
            "http, tcp or tls must be provided in virtual service",
        ));
    }
    Ok(VirtualService {
        export_to: export_to(&spec, &meta.namespace, false)?,
        key: key_of(&meta.namespace, &meta.name),
        hosts: hosts.into_iter().map(|(_, h)| Arc::from(h)).collect(),
        gateways,
        http: http
            .iter()
            .map(|r| http_rule(r, for_gateway))
            .collect::<Result<_>>()?,
        tcp: tcp.iter().map(tcp_rule).collect::<Result<_>>()?,
    })
}

fn http_rule(rule: &Fields<'_>, for_gateway: bool) -> Result<HttpRule> {
    if rule.has("delegate") {
        return Err(rule.error(
            "delegate",
            "delegating routes to other VirtualServices is not supported",
        ));
    }
    let matches = rule.list("match")?;
    at_most(rule, "match", matches.len(), MAX_MATCHES)?;
    let matches = matches
        .iter()
        .map(|m| http_match(m, for_gateway))
        .collect::<Result<Arc<[_]>>>()?;

    let redirect = rule.obj("redirect")?;
    let direct = rule.obj("directResponse")?;
    let routes = rule.list("route")?;
    if redirect.is_some() || direct.is_some() {
        let what = if redirect.is_some() {
            "redirect"
        } else {
            "directResponse"
        };
        if !routes.is_empty() {
            return Err(rule.error(
                "route",
                format!("HTTP route cannot contain both route and {what}"),
            ));
        }
        if rule.has("fault") {
            return Err(rule.error(
                "fault",
                format!("HTTP route cannot contain both fault and {what}"),
            ));
        }
        if rule.has("rewrite") {
            return Err(rule.error(
                "rewrite",
                format!("HTTP route rule cannot contain both rewrite and {what}"),
            ));
        }
        if redirect.is_some() && direct.is_some() {
            return Err(rule.error(
                "directResponse",
                "HTTP route cannot contain both redirect and directResponse",
            ));
        }
    }
    let action = match (redirect, direct) {
        (Some(r), _) => HttpAction::Redirect(http_redirect(&r)?),
        (None, Some(d)) => HttpAction::DirectResponse(direct_response(&d)?),
        (None, None) if routes.is_empty() => {
            return Err(rule.error("route", "HTTP route or redirect is required"))
        }
        (None, None) => HttpAction::Route(http_destinations(rule, &routes)?),
    };

    let headers = header_rules(rule)?;
    let rewrite = match rule.obj("rewrite")? {
        Some(r) => Some(http_rewrite(&r)?),
        None => None,
    };
    authority_rewrite(rule, rewrite.as_ref(), &headers)?;
    let cors_policy = match rule.get("corsPolicy") {
        None => None,
        Some(value @ Value::Mapping(_)) => Some(Arc::new(value.clone())),
        Some(other) => {
            return Err(rule.error(
                "corsPolicy",
                format!("expected a mapping, found {}", show(other)),
            ))
        }
    };
    Ok(HttpRule {
        name: opt_str(rule, "name")?,
        matches,
        action,
        rewrite,
        headers,
        timeout: istio_duration(rule, "timeout")?,
        retries: match rule.obj("retries")? {
            Some(r) => Some(retries(&r)?),
            None => None,
        },
        fault: match rule.obj("fault")? {
            Some(f) => Some(fault(&f)?),
            None => None,
        },
        mirrors: mirrors(rule)?,
        cors_policy,
    })
}

fn http_match(m: &Fields<'_>, for_gateway: bool) -> Result<HttpMatch> {
    let named = |key: &str, header_names: bool| -> Result<Arc<[NamedMatch]>> {
        m.obj_map(key)?
            .into_iter()
            .map(|(name, sm)| {
                if header_names {
                    if name.starts_with("@request.auth.claims") {
                        if !for_gateway {
                            return Err(m.error(
                                &format!("{key}.{name}"),
                                "JWT claim based routing is only supported for gateways",
                            ));
                        }
                    } else {
                        check(
                            m,
                            &format!("{key}.{name}"),
                            validate::istio_header_name(name),
                        )?;
                    }
                }
                Ok(NamedMatch {
                    name: if header_names {
                        name.to_ascii_lowercase().into()
                    } else {
                        name.into()
                    },
                    value: string_match(&sm)?,
                })
            })
            .collect()
    };
    let source_namespace = opt_str(m, "sourceNamespace")?;
    if let Some(ns) = &source_namespace {
        if !validate::istio_dns_label(ns) {
            return Err(m.error(
                "sourceNamespace",
                format!("sourceNamespace match {ns} is invalid"),
            ));
        }
    }
    Ok(HttpMatch {
        name: opt_str(m, "name")?,
        uri: opt_string_match(m, "uri")?,
        scheme: opt_string_match(m, "scheme")?,
        method: opt_string_match(m, "method")?,
        authority: opt_string_match(m, "authority")?,
        headers: named("headers", true)?,
        without_headers: named("withoutHeaders", true)?,
        query_params: named("queryParams", false)?,
        port: opt_port(m, "port")?,
        source_labels: checked_labels(m, "sourceLabels", validate::labels)?,
        source_namespace,
        gateways: strings(m, "gateways", validate::gateway_name)?,
        ignore_uri_case: m.bool("ignoreUriCase")?.unwrap_or(false),
    })
}

fn opt_string_match(fields: &Fields<'_>, key: &str) -> Result<Option<StringMatch>> {
    match fields.obj(key)? {
        Some(sm) => string_match(&sm),
        None => Ok(None),
    }
}

/// Istio's `StringMatch` (a oneof): `None` for `{}`, which matches any value (for headers: the
/// header is present).
pub(super) fn string_match(sm: &Fields<'_>) -> Result<Option<StringMatch>> {
    let set: Vec<&str> = ["exact", "prefix", "regex"]
        .into_iter()
        .filter(|k| sm.has(k))
        .collect();
    if set.len() > 1 {
        return Err(sm.error(
            set[1],
            format!(
                "only one of exact, prefix or regex may be set, found {}",
                set.join(" and ")
            ),
        ));
    }
    Ok(match set.first().copied() {
        Some("exact") => Some(StringMatch::Exact(sm.required_str("exact")?.into())),
        Some("prefix") => Some(StringMatch::Prefix(sm.required_str("prefix")?.into())),
        Some(_) => Some(StringMatch::Regex(check(
            sm,
            "regex",
            validate::pattern(sm.required_str("regex")?),
        )?)),
        None => None,
    })
}

fn destination(d: &Fields<'_>) -> Result<Destination> {
    let host = d.required_str("host")?;
    if host == "*" {
        return Err(d.error("host", "invalid destination host *"));
    }
    check(d, "host", validate::wildcard_domain(host))?;
    let subset = opt_str(d, "subset")?;
    if let Some(subset) = &subset {
        if !validate::istio_dns_label(subset) {
            return Err(d.error("subset", format!("subset name is invalid: {subset}")));
        }
    }
    let port = match d.obj("port")? {
        Some(port) => Some(port.required_port("number")?),
        None => None,
    };
    Ok(Destination {
        host: host.into(),
        subset,
        port,
    })
}

/// A route's destination list, weights checked as Istio's `validateHTTPRouteDestinations` does:
/// non-negative and, with more than one destination, not all zero. Weights are relative (a
/// destination receives weight/sum); Istio no longer requires them to add up to 100.
fn weights(rule: &Fields<'_>, routes: &[Fields<'_>]) -> Result<Vec<u32>> {
    let mut total = 0u64;
    let mut weights = Vec::with_capacity(routes.len());
    for route in routes {
        let weight = route.uint("weight", INT32_MAX).map_err(|e| FieldError {
            reason: format!(
                "{} (weights are relative and must not be negative)",
                e.reason
            ),
            ..e
        })?;
        let weight = weight.unwrap_or(0) as u32;
        total += u64::from(weight);
        weights.push(weight);
    }
    if routes.len() > 1 && total == 0 {
        return Err(rule.error(
            "route",
            "total destination weight = 0: give at least one destination a weight",
        ));
    }
    Ok(weights)
}

fn http_destinations(rule: &Fields<'_>, routes: &[Fields<'_>]) -> Result<Arc<[HttpDestination]>> {
    let weights = weights(rule, routes)?;
    routes
        .iter()
        .zip(weights)
        .map(|(route, weight)| {
            Ok(HttpDestination {
                destination: destination(&route.required_obj("destination")?)?,
                weight,
                headers: header_rules(route)?,
            })
        })
        .collect()
}

/// `headers: {request: {set, add, remove}, response: {...}}` with Istio's name rules: requests
/// may set `:authority` / `host`, nothing may touch other `:` pseudo-headers or remove `host`.
fn header_rules(fields: &Fields<'_>) -> Result<HeaderRules> {
    let Some(headers) = fields.obj("headers")? else {
        return Ok(HeaderRules::default());
    };
    Ok(HeaderRules {
        request: match headers.obj("request")? {
            Some(ops) => header_ops(&ops, true)?,
            None => HeaderOps::default(),
        },
        response: match headers.obj("response")? {
            Some(ops) => header_ops(&ops, false)?,
            None => HeaderOps::default(),
        },
    })
}

fn is_authority(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

fn header_ops(ops: &Fields<'_>, request: bool) -> Result<HeaderOps> {
    let name_rule = |name: &str, setting: bool| -> std::result::Result<(), String> {
        if name.is_empty() {
            return Err("header name cannot be empty".into());
        }
        if setting && request && is_authority(name) {
            return Ok(());
        }
        if name.eq_ignore_ascii_case("host") {
            return Err(format!("invalid header {name:?}: cannot set Host header"));
        }
        if name.starts_with(':') {
            return Err(format!(
                "invalid header {name:?}: header cannot have \":\" prefix"
            ));
        }
        validate::http_token(name)
    };
    let pairs = |key: &str| -> Result<Arc<[Header]>> {
        ops.str_map(key)?
            .into_iter()
            .map(|(name, value)| {
                let path = format!("{key}.{name}");
                check(ops, &path, name_rule(name, true))?;
                check(ops, &path, validate::header_value(value))?;
                Ok(Header {
                    name: name.to_ascii_lowercase().into(),
                    value: value.into(),
                })
            })
            .collect()
    };
    Ok(HeaderOps {
        set: pairs("set")?,
        add: pairs("add")?,
        remove: ops
            .str_list("remove")?
            .into_iter()
            .map(|(path, name)| {
                at(&path, name_rule(name, false)).map(|()| Arc::from(name.to_ascii_lowercase()))
            })
            .collect::<Result<_>>()?,
    })
}

/// Istio's `validateAuthorityRewrite`: the authority is rewritten in one place only.
fn authority_rewrite(
    rule: &Fields<'_>,
    rewrite: Option<&Rewrite>,
    headers: &HeaderRules,
) -> Result<()> {
    let mut current = rewrite.and_then(|r| r.authority.clone());
    for (list, op) in [(&headers.request.set, "set"), (&headers.request.add, "add")] {
        for header in list.iter().filter(|h| is_authority(&h.name)) {
            if let Some(have) = &current {
                return Err(rule.error(
                    &format!("headers.request.{op}.{}", header.name),
                    format!(
                        "authority header cannot be set multiple times: have {have:?}, attempting to set {:?}",
                        header.value
                    ),
                ));
            }
            current = Some(header.value.clone());
        }
    }
    Ok(())
}

fn http_redirect(r: &Fields<'_>) -> Result<Redirect> {
    let port = match (opt_port(r, "port")?, r.str("derivePort")?) {
        (Some(_), Some(_)) => {
            return Err(r.error("derivePort", "only one of port or derivePort may be set"))
        }
        (Some(n), None) => Some(RedirectPort::Number(n)),
        (None, Some(_)) => one_of(
            r,
            "derivePort",
            &[
                ("FROM_PROTOCOL_DEFAULT", RedirectPort::FromProtocolDefault),
                ("FROM_REQUEST_PORT", RedirectPort::FromRequestPort),
            ],
        )?,
        (None, None) => None,
    };
    let scheme = opt_str(r, "scheme")?;
    let redirect = Redirect {
        uri: opt_str(r, "uri")?,
        authority: opt_str(r, "authority")?,
        port,
        code: match r.uint("redirectCode", u64::from(u32::MAX))? {
            None | Some(0) => 301,
            Some(code @ 300..=399) => code as u16,
            Some(code) => {
                return Err(r.error(
                    "redirectCode",
                    format!("{code} is not a valid redirect code, must be 3xx"),
                ))
            }
        },
        scheme,
    };
    if redirect.uri.is_none()
        && redirect.authority.is_none()
        && redirect.port.is_none()
        && redirect.scheme.is_none()
    {
        return Err(r.error(
            "uri",
            "redirect must specify URI, authority, scheme, or port",
        ));
    }
    if let Some(scheme) = &redirect.scheme {
        if !matches!(&**scheme, "http" | "https") {
            return Err(r.error(
                "scheme",
                "invalid redirect scheme, must be \"http\" or \"https\"",
            ));
        }
    }
    Ok(redirect)
}

fn direct_response(d: &Fields<'_>) -> Result<DirectResponse> {
    let status = d
        .required_port("status")
        .ok()
        .filter(|s| (200..=599).contains(s))
        .ok_or_else(|| {
            d.error(
                "status",
                format!(
                    "HTTP status {} is not in range 200-599",
                    d.get("status")
                        .map(show)
                        .unwrap_or_else(|| "(missing)".into())
                ),
            )
        })?;
    let body = match d.obj("body")? {
        None => None,
        Some(body) if body.has("bytes") => {
            return Err(body.error(
                "bytes",
                "a body given as bytes is not supported; use string",
            ))
        }
        Some(body) => {
            let text = body.str("string")?.unwrap_or_default();
            if text.len() > 1 << 20 {
                return Err(body.error("string", "large direct_responses may impact control plane performance, must be less than 1MB"));
            }
            Some(text.into())
        }
    };
    Ok(DirectResponse { status, body })
}

fn http_rewrite(r: &Fields<'_>) -> Result<Rewrite> {
    let uri = opt_str(r, "uri")?;
    let uri_regex = match r.obj("uriRegexRewrite")? {
        Some(rr) => {
            let pattern = rr.str("match")?.unwrap_or_default();
            let substitution = rr.str("rewrite")?.unwrap_or_default();
            if pattern.is_empty() || substitution.is_empty() {
                return Err(r.error(
                    "uriRegexRewrite",
                    "UriRegexRewrite requires both Rewrite and Match fields to be specified",
                ));
            }
            Some(RegexRewrite {
                pattern: check(&rr, "match", validate::pattern(pattern))?,
                substitution: substitution.into(),
            })
        }
        None => None,
    };
    let authority = opt_str(r, "authority")?;
    if uri.is_some() && uri_regex.is_some() {
        return Err(r.error(
            "uriRegexRewrite",
            "rewrite may only contain one of URI or UriRegexRewrite",
        ));
    }
    if uri.is_none() && uri_regex.is_none() && authority.is_none() {
        return Err(r.error(
            "uri",
            "rewrite must specify at least one of URI, UriRegexRewrite, or authority",
        ));
    }
    Ok(Rewrite {
        uri,
        uri_regex,
        authority,
    })
}

fn retries(r: &Fields<'_>) -> Result<Retries> {
    let attempts = r
        .uint("attempts", INT32_MAX)
        .map_err(|e| FieldError {
            reason: format!("{} (attempts cannot be negative)", e.reason),
            ..e
        })?
        .unwrap_or(0) as u32;
    let per_try_timeout = istio_duration(r, "perTryTimeout")?;
    let retry_on = match r.str("retryOn")? {
        Some(list) if !list.is_empty() => check(r, "retryOn", validate::retry_on(list))?,
        _ => Vec::new(),
    };
    let retry_remote_localities = r.bool("retryRemoteLocalities")?;
    if attempts == 0
        && (per_try_timeout.is_some() || !retry_on.is_empty() || retry_remote_localities.is_some())
    {
        return Err(r.error(
            "attempts",
            "http retry policy configured when attempts are set to 0 (disabled)",
        ));
    }
    Ok(Retries {
        attempts,
        per_try_timeout,
        retry_on: retry_on.into(),
        retry_remote_localities,
    })
}

/// `percentage: {value: 50.0}`, or the deprecated integer `percent`. Unset injects into no
/// request, as in Istio.
fn fault_percentage(f: &Fields<'_>) -> Result<f64> {
    if let Some(p) = f.obj("percentage")? {
        let value = p.number("value")?.unwrap_or(0.0);
        return check(&p, "value", validate::fractional_percent(value));
    }
    match f.uint("percent", 100)? {
        Some(p) => Ok(p as f64),
        None => Ok(0.0),
    }
}

fn fault(f: &Fields<'_>) -> Result<Fault> {
    let delay = match f.obj("delay")? {
        Some(d) => {
            if d.has("exponentialDelay") {
                return Err(d.error("exponentialDelay", "exponentialDelay not supported yet"));
            }
            let Some(fixed_delay) = istio_duration(&d, "fixedDelay")? else {
                return Err(d.error("fixedDelay", "required: the delay to inject, like 7s"));
            };
            Some(FaultDelay {
                fixed_delay,
                percentage: fault_percentage(&d)?,
            })
        }
        None => None,
    };
    let abort = match f.obj("abort")? {
        Some(a) => {
            let set: Vec<&str> = ["httpStatus", "grpcStatus", "http2Error"]
                .into_iter()
                .filter(|k| a.has(k))
                .collect();
            let error = match set.as_slice() {
                ["httpStatus"] => {
                    let status = a.uint("httpStatus", u64::from(u32::MAX)).ok().flatten();
                    match status {
                        Some(s @ 200..=599) => AbortError::HttpStatus(s as u16),
                        _ => {
                            return Err(a.error(
                                "httpStatus",
                                format!(
                                    "HTTP status {} is not in range 200-599",
                                    a.get("httpStatus").map(show).unwrap_or_default()
                                ),
                            ))
                        }
                    }
                }
                ["grpcStatus"] => {
                    let name = a.required_str("grpcStatus")?;
                    let code = GRPC_STATUS_CODES
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, c)| *c);
                    match code {
                        Some(code) => AbortError::GrpcStatus(code),
                        None => {
                            return Err(a.error(
                                "grpcStatus",
                                format!("gRPC status {name:?} is not supported; use a name such as NOT_FOUND or UNAVAILABLE"),
                            ))
                        }
                    }
                }
                [_] => {
                    return Err(a.error(
                        "http2Error",
                        "HTTP/2 abort fault injection not supported yet",
                    ))
                }
                [] => return Err(f.error("abort", "an abort needs httpStatus or grpcStatus")),
                [_, second, ..] => {
                    return Err(a.error(
                        second,
                        "only one of httpStatus, grpcStatus or http2Error may be set",
                    ))
                }
            };
            Some(FaultAbort {
                error,
                percentage: fault_percentage(&a)?,
            })
        }
        None => None,
    };
    if delay.is_none() && abort.is_none() {
        return Err(f.error(
            "delay",
            "HTTP fault injection must have an abort and/or a delay",
        ));
    }
    Ok(Fault { delay, abort })
}

fn mirror_percentage(f: &Fields<'_>, key: &str) -> Result<f64> {
    match f.obj(key)? {
        Some(p) => {
            let value = p.number("value")?.unwrap_or(0.0);
            if value.is_nan() || !(0.0..=100.0).contains(&value) {
                return Err(p.error(
                    "value",
                    format!("mirror percentage must be in range 0-100 (it has {value})"),
                ));
            }
            Ok(value)
        }
        None => Ok(100.0),
    }
}

fn mirrors(rule: &Fields<'_>) -> Result<Arc<[Mirror]>> {
    let list = rule.list("mirrors")?;
    let single = rule.obj("mirror")?;
    match single {
        Some(_) if !list.is_empty() => {
            Err(rule.error("mirrors", "`mirror` and `mirrors` cannot be used together"))
        }
        Some(mirror) => {
            let percentage = match rule.uint("mirrorPercent", 100)? {
                Some(p) if !rule.has("mirrorPercentage") => p as f64,
                _ => mirror_percentage(rule, "mirrorPercentage")?,
            };
            Ok(Arc::from([Mirror {
                destination: destination(&mirror)?,
                percentage,
            }]))
        }
        None => list
            .iter()
            .map(|m| {
                let Some(dest) = m.obj("destination")? else {
                    return Err(m.error("destination", "destination is required for mirrors"));
                };
                Ok(Mirror {
                    destination: destination(&dest)?,
                    percentage: mirror_percentage(m, "percentage")?,
                })
            })
            .collect(),
    }
}

fn tcp_rule(rule: &Fields<'_>) -> Result<TcpRule> {
    let matches = rule.list("match")?;
    at_most(rule, "match", matches.len(), MAX_MATCHES)?;
    let matches = matches
        .iter()
        .map(|m| {
            let source_namespace = opt_str(m, "sourceNamespace")?;
            if let Some(ns) = &source_namespace {
                if !validate::istio_dns_label(ns) {
                    return Err(m.error(
                        "sourceNamespace",
                        format!("sourceNamespace match {ns} is invalid"),
                    ));
                }
            }
            Ok(L4Match {
                destination_subnets: ip_blocks(m, "destinationSubnets")?,
                port: opt_port(m, "port")?,
                source_labels: checked_labels(m, "sourceLabels", validate::labels)?,
                source_namespace,
                gateways: strings(m, "gateways", validate::gateway_name)?,
            })
        })
        .collect::<Result<Arc<[_]>>>()?;
    let routes = rule.list("route")?;
    if routes.is_empty() {
        return Err(rule.error("route", "TCP route is required"));
    }
    let weights = weights(rule, &routes)?;
    Ok(TcpRule {
        matches,
        route: routes
            .iter()
            .zip(weights)
            .map(|(r, weight)| {
                Ok(RouteDestination {
                    destination: destination(&r.required_obj("destination")?)?,
                    weight,
                })
            })
            .collect::<Result<_>>()?,
    })
}

// ---------------------------------------------------------------------------------------------
// DestinationRule

pub(super) fn destination_rule(fields: &Fields<'_>) -> Result<DestinationRule> {
    let meta = metadata(fields, true)?;
    let spec = fields.required_obj("spec")?;
    let host = spec.required_str("host")?;
    check(&spec, "host", validate::wildcard_domain(host))?;
    let policy = match spec.obj("trafficPolicy")? {
        Some(tp) => Some(traffic_policy(&tp)?),
        None => None,
    };
    let mut subsets: Vec<Subset> = Vec::new();
    for subset in spec.list("subsets")? {
        let name = subset.str("name")?.unwrap_or_default();
        if name.is_empty() {
            return Err(subset.error("name", "subset name cannot be empty"));
        }
        if !validate::istio_dns_label(name) {
            return Err(subset.error("name", format!("subset name is invalid: {name}")));
        }
        if subsets.iter().any(|s| &*s.name == name) {
            return Err(subset.error("name", format!("duplicate subset names: {name}")));
        }
        subsets.push(Subset {
            name: name.into(),
            labels: checked_labels(&subset, "labels", validate::labels)?,
            traffic_policy: match subset.obj("trafficPolicy")? {
                Some(tp) => Some(traffic_policy(&tp)?),
                None => None,
            },
        });
    }
    let workload_selector = workload_selector(&spec, "workloadSelector")?;
    let export_to = export_to(&spec, &meta.namespace, false)?;
    if workload_selector.is_some()
        && export_to
            .iter()
            .any(|e| &**e != "." && **e != *meta.namespace)
    {
        return Err(spec.error(
            "exportTo",
            "destination rule with workload selector cannot have exportTo beyond current namespace",
        ));
    }
    Ok(DestinationRule {
        key: key_of(&meta.namespace, &meta.name),
        host: host.into(),
        traffic_policy: policy,
        subsets: subsets.into(),
        export_to,
        workload_selector,
    })
}

const POLICY_FIELDS: [&str; 7] = [
    "outlierDetection",
    "connectionPool",
    "loadBalancer",
    "tls",
    "portLevelSettings",
    "tunnel",
    "proxyProtocol",
];

fn traffic_policy(tp: &Fields<'_>) -> Result<TrafficPolicy> {
    if !POLICY_FIELDS.iter().any(|k| tp.has(k)) {
        return Err(FieldError {
            field: tp.path.clone(),
            reason: "traffic policy must have at least one field".into(),
        });
    }
    if tp.has("tunnel") && tp.has("proxyProtocol") {
        return Err(tp.error(
            "proxyProtocol",
            "tunnel and proxyProtocol must not be set together",
        ));
    }
    let port_level_settings = tp
        .list("portLevelSettings")?
        .iter()
        .map(|p| {
            let Some(port) = p.obj("port")? else {
                return Err(p.error("port", "portTrafficPolicy must have valid port"));
            };
            let port = port.required_port("number")?;
            if !["outlierDetection", "connectionPool", "loadBalancer", "tls"]
                .iter()
                .any(|k| p.has(k))
            {
                return Err(FieldError {
                    field: p.path.clone(),
                    reason: "port traffic policy must have at least one field".into(),
                });
            }
            Ok(PortTrafficPolicy {
                port,
                load_balancer: load_balancer(p)?,
                connection_pool: connection_pool(p)?,
                outlier_detection: outlier_detection(p)?,
                tls: client_tls(p)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(TrafficPolicy {
        load_balancer: load_balancer(tp)?,
        connection_pool: connection_pool(tp)?,
        outlier_detection: outlier_detection(tp)?,
        tls: client_tls(tp)?,
        port_level_settings,
    })
}

fn load_balancer(policy: &Fields<'_>) -> Result<Option<LoadBalancer>> {
    let Some(lb) = policy.obj("loadBalancer")? else {
        return Ok(None);
    };
    if lb.has("simple") && lb.has("consistentHash") {
        return Err(lb.error(
            "consistentHash",
            "only one of simple or consistentHash may be set",
        ));
    }
    let simple = one_of(
        &lb,
        "simple",
        &[
            ("UNSPECIFIED", SimpleLb::Unspecified),
            ("LEAST_CONN", SimpleLb::LeastConn),
            ("RANDOM", SimpleLb::Random),
            ("PASSTHROUGH", SimpleLb::Passthrough),
            ("ROUND_ROBIN", SimpleLb::RoundRobin),
            ("LEAST_REQUEST", SimpleLb::LeastRequest),
        ],
    )?;
    let policy = match (simple, lb.obj("consistentHash")?) {
        (Some(simple), _) => Some(LbPolicy::Simple(simple)),
        (None, Some(ch)) => Some(LbPolicy::ConsistentHash(consistent_hash(&ch)?)),
        (None, None) => None,
    };
    Ok(Some(LoadBalancer {
        policy,
        warmup_duration: istio_duration(&lb, "warmupDurationSecs")?,
    }))
}

fn consistent_hash(ch: &Fields<'_>) -> Result<ConsistentHash> {
    let mut keys = Vec::new();
    if let Some(name) = ch.str("httpHeaderName")? {
        check(ch, "httpHeaderName", validate::http_token(name))?;
        keys.push((
            "httpHeaderName",
            HashKey::HttpHeaderName(name.to_ascii_lowercase().into()),
        ));
    }
    if let Some(cookie) = ch.obj("httpCookie")? {
        let name = cookie.str("name")?.unwrap_or_default();
        if name.is_empty() {
            return Err(cookie.error("name", "name required for HttpCookie"));
        }
        let ttl = match cookie.str("ttl")? {
            Some(text) => Some(check(&cookie, "ttl", validate::go_duration(text))?),
            None => None,
        };
        keys.push((
            "httpCookie",
            HashKey::HttpCookie {
                name: name.into(),
                path: opt_str(&cookie, "path")?,
                ttl,
            },
        ));
    }
    if ch.bool("useSourceIp")? == Some(true) {
        keys.push(("useSourceIp", HashKey::UseSourceIp));
    }
    if let Some(name) = ch.str("httpQueryParameterName")? {
        if name.is_empty() {
            return Err(ch.error("httpQueryParameterName", "must not be empty"));
        }
        keys.push((
            "httpQueryParameterName",
            HashKey::HttpQueryParameterName(name.into()),
        ));
    }
    let minimum_ring_size = ch.uint("minimumRingSize", u64::MAX)?;
    if minimum_ring_size.is_some() && (ch.has("ringHash") || ch.has("maglev")) {
        return Err(ch.error(
            "minimumRingSize",
            "only one of MinimumRingSize or Maglev/Ringhash can be specified",
        ));
    }
    match keys.len() {
        0 => Err(FieldError {
            field: ch.path.clone(),
            reason: "consistentHash needs one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName".into(),
        }),
        1 => Ok(ConsistentHash {
            key: keys.remove(0).1,
            minimum_ring_size,
        }),
        _ => Err(ch.error(keys[1].0, format!("only one hash key may be set, found {} and {}", keys[0].0, keys[1].0))),
    }
}

fn connection_pool(policy: &Fields<'_>) -> Result<Option<ConnectionPool>> {
    let Some(pool) = policy.obj("connectionPool")? else {
        return Ok(None);
    };
    let tcp = match pool.obj("tcp")? {
        Some(tcp) => Some(TcpPool {
            max_connections: count(&tcp, "maxConnections")?,
            connect_timeout: istio_duration(&tcp, "connectTimeout")?,
            idle_timeout: istio_duration(&tcp, "idleTimeout")?,
            max_connection_duration: istio_duration(&tcp, "maxConnectionDuration")?,
        }),
        None => None,
    };
    let http = match pool.obj("http")? {
        Some(http) => {
            let h2_upgrade_policy = one_of(
                &http,
                "h2UpgradePolicy",
                &[
                    ("DEFAULT", H2UpgradePolicy::Default),
                    ("DO_NOT_UPGRADE", H2UpgradePolicy::DoNotUpgrade),
                    ("UPGRADE", H2UpgradePolicy::Upgrade),
                ],
            )?;
            let use_client_protocol = http.bool("useClientProtocol")?.unwrap_or(false);
            if h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade) && use_client_protocol {
                return Err(http.error(
                    "useClientProtocol",
                    "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
                ));
            }
            Some(HttpPool {
                http1_max_pending_requests: count(&http, "http1MaxPendingRequests")?,
                http2_max_requests: count(&http, "http2MaxRequests")?,
                max_requests_per_connection: count(&http, "maxRequestsPerConnection")?,
                max_retries: count(&http, "maxRetries")?,
                idle_timeout: istio_duration(&http, "idleTimeout")?,
                h2_upgrade_policy,
                use_client_protocol,
                max_concurrent_streams: count(&http, "maxConcurrentStreams")?,
            })
        }
        None => None,
    };
    if tcp.is_none() && http.is_none() {
        return Err(policy.error(
            "connectionPool",
            "connection pool must have at least one field",
        ));
    }
    Ok(Some(ConnectionPool { tcp, http }))
}

fn outlier_detection(policy: &Fields<'_>) -> Result<Option<OutlierDetection>> {
    let Some(od) = policy.obj("outlierDetection")? else {
        return Ok(None);
    };
    let percent = |key: &str| -> Result<Option<u32>> {
        match od.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .filter(|p| *p <= 100)
                .map(|p| Some(p as u32))
                .ok_or_else(|| {
                    od.error(
                        key,
                        format!("percentage {} is not in range 0..100", show(value)),
                    )
                }),
        }
    };
    let errors = |key: &str| -> Result<Option<u32>> {
        Ok(od.uint(key, u64::from(u32::MAX))?.map(|n| n as u32))
    };
    let detection = OutlierDetection {
        consecutive_5xx_errors: errors("consecutive5xxErrors")?,
        consecutive_gateway_errors: errors("consecutiveGatewayErrors")?,
        consecutive_local_origin_failures: errors("consecutiveLocalOriginFailures")?,
        split_external_local_origin_errors: od
            .bool("splitExternalLocalOriginErrors")?
            .unwrap_or(false),
        interval: istio_duration(&od, "interval")?,
        base_ejection_time: istio_duration(&od, "baseEjectionTime")?,
        max_ejection_percent: percent("maxEjectionPercent")?,
        min_health_percent: percent("minHealthPercent")?,
    };
    // The deprecated `consecutiveErrors` is an int32; Istio only warns about it.
    od.uint("consecutiveErrors", INT32_MAX)?;
    if !detection.split_external_local_origin_errors
        && detection.consecutive_local_origin_failures.unwrap_or(0) > 0
    {
        return Err(od.error(
            "consecutiveLocalOriginFailures",
            "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false",
        ));
    }
    Ok(Some(detection))
}

fn client_tls(policy: &Fields<'_>) -> Result<Option<ClientTls>> {
    let Some(tls) = policy.obj("tls")? else {
        return Ok(None);
    };
    let mode = one_of(
        &tls,
        "mode",
        &[
            ("DISABLE", TlsMode::Disable),
            ("SIMPLE", TlsMode::Simple),
            ("MUTUAL", TlsMode::Mutual),
            ("ISTIO_MUTUAL", TlsMode::IstioMutual),
        ],
    )?
    .unwrap_or(TlsMode::Disable);
    let credential_name = opt_str(&tls, "credentialName")?;
    if mode == TlsMode::Mutual && credential_name.is_none() {
        if opt_str(&tls, "clientCertificate")?.is_none() {
            return Err(tls.error(
                "clientCertificate",
                "client certificate required for mutual tls",
            ));
        }
        if opt_str(&tls, "privateKey")?.is_none() {
            return Err(tls.error("privateKey", "private key required for mutual tls"));
        }
    }
    if matches!(mode, TlsMode::Simple | TlsMode::Mutual) && credential_name.is_some() {
        for key in ["clientCertificate", "caCertificates", "privateKey", "caCrl"] {
            if opt_str(&tls, key)?.is_some() {
                return Err(tls.error(key, "cannot specify client certificates or CA certificate or CA CRL If credentialName is set"));
            }
        }
    }
    let ca_crl = opt_str(&tls, "caCrl")?;
    if mode == TlsMode::IstioMutual {
        for key in [
            "sni",
            "subjectAltNames",
            "insecureSkipVerify",
            "caCertificates",
            "caCrl",
            "clientCertificate",
            "privateKey",
            "credentialName",
        ] {
            if tls.get(key).is_some() {
                return Err(tls.error(
                    key,
                    "not supported with the mesh's mTLS: Weft's HBONE hop checks the node proxy's identity with the mesh CA, not the destination workload's",
                ));
            }
        }
    }
    let insecure_skip_verify = tls.bool("insecureSkipVerify")?.unwrap_or(false);
    Ok(Some(ClientTls {
        mode,
        sni: opt_str(&tls, "sni")?,
        subject_alt_names: strings(&tls, "subjectAltNames", any)?,
        client_certificate: opt_str(&tls, "clientCertificate")?,
        private_key: opt_str(&tls, "privateKey")?,
        ca_certificates: opt_str(&tls, "caCertificates")?,
        ca_crl,
        insecure_skip_verify,
        credential_name,
    }))
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry

/// Istio's protocol names (`protocol.Parse`, case-insensitive).
const PROTOCOLS: [&str; 12] = [
    "tcp",
    "udp",
    "grpc",
    "grpc-web",
    "http",
    "http_proxy",
    "http2",
    "https",
    "tls",
    "mongo",
    "redis",
    "mysql",
];

fn is_http_or_tls(protocol: Option<&str>) -> bool {
    protocol.is_some_and(|p| {
        [
            "http",
            "http2",
            "http_proxy",
            "grpc",
            "grpc-web",
            "https",
            "tls",
        ]
        .iter()
        .any(|h| p.eq_ignore_ascii_case(h))
    })
}

pub(super) fn service_entry(fields: &Fields<'_>) -> Result<ServiceEntry> {
    let meta = metadata(fields, true)?;
    let spec = fields.required_obj("spec")?;
    let hosts = strings(&spec, "hosts", |host| {
        if host == "*" {
            Err(format!("invalid host {host}"))
        } else {
            validate::wildcard_domain(host)
        }
    })?;
    if hosts.is_empty() {
        return Err(spec.error("hosts", "service entry must have at least one host"));
    }
    let resolution = one_of(
        &spec,
        "resolution",
        &[
            ("NONE", Resolution::None),
            ("STATIC", Resolution::Static),
            ("DNS", Resolution::Dns),
            ("DNS_ROUND_ROBIN", Resolution::DnsRoundRobin),
        ],
    )?
    .unwrap_or(Resolution::None);
    let addresses = ip_blocks(&spec, "addresses")?;
    let cidr = spec
        .str_list("addresses")?
        .iter()
        .any(|(_, a)| a.contains('/'));
    if cidr && !matches!(resolution, Resolution::None | Resolution::Static) {
        return Err(spec.error(
            "addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        ));
    }
    if let Some((i, block)) = addresses.iter().enumerate().find(|(_, b)| match b.addr {
        std::net::IpAddr::V4(ip) => crate::model::node_local(ip),
        std::net::IpAddr::V6(_) => false,
    }) {
        return Err(spec.error(
            &format!("addresses[{i}]"),
            format!(
                "{} is refused: it is the node's own (loopback or link-local)",
                block.addr
            ),
        ));
    }
    // The capture layer matches exact IPv4 destinations; a range or an IPv6 address would be
    // accepted and then not captured.
    if let Some((i, block)) = addresses
        .iter()
        .enumerate()
        .find(|(_, b)| !b.addr.is_ipv4() || b.prefix_len != 32)
    {
        return Err(spec.error(
            &format!("addresses[{i}]"),
            format!(
                "{}/{} is not supported by Weft: only single IPv4 addresses are captured; list the addresses one by one",
                block.addr, block.prefix_len
            ),
        ));
    }

    let mut ports: Vec<ServiceEntryPort> = Vec::new();
    for port in spec.list("ports")? {
        let number = port.required_port("number")?;
        let name = port.str("name")?.unwrap_or_default();
        if !validate::istio_dns_label(name) {
            return Err(port.error("name", format!("invalid port name: {name:?}")));
        }
        let protocol = opt_str(&port, "protocol")?;
        if let Some(p) = &protocol {
            if !PROTOCOLS.iter().any(|known| p.eq_ignore_ascii_case(known)) {
                return Err(port.error("protocol", format!("unsupported protocol: {p}")));
            }
        }
        if ports.iter().any(|p| &*p.name == name) {
            return Err(port.error(
                "name",
                format!("service entry port name {name:?} already defined"),
            ));
        }
        if ports.iter().any(|p| p.number == number) {
            return Err(port.error(
                "number",
                format!("service entry port {number} already defined"),
            ));
        }
        ports.push(ServiceEntryPort {
            number,
            protocol,
            name: name.into(),
            target_port: opt_port(&port, "targetPort")?,
        });
    }

    let workload_selector = workload_selector(&spec, "workloadSelector")?;
    let endpoint_list = spec.list("endpoints")?;
    if workload_selector.is_some() && spec.has("endpoints") {
        return Err(spec.error(
            "endpoints",
            "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
        ));
    }
    match resolution {
        Resolution::None if !endpoint_list.is_empty() => {
            return Err(spec.error(
                "endpoints",
                "no endpoints should be provided for resolution type none",
            ))
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            if endpoint_list.is_empty() {
                if let Some(i) = hosts.iter().position(|h| validate::fqdn(h).is_err()) {
                    return Err(spec.error(
                        &format!("hosts[{i}]"),
                        "hosts must be FQDN if no endpoints are provided for resolution mode DNS",
                    ));
                }
            }
            if resolution == Resolution::DnsRoundRobin && endpoint_list.len() > 1 {
                return Err(spec.error(
                    "endpoints",
                    "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
                ));
            }
        }
        _ => {}
    }
    let endpoints = endpoint_list
        .iter()
        .map(|e| workload_endpoint(e, resolution, &ports))
        .collect::<Result<_>>()?;
    if resolution != Resolution::None
        && hosts.len() > 1
        && ports.iter().any(|p| !is_http_or_tls(p.protocol.as_deref()))
    {
        return Err(spec.error(
            "hosts",
            "multiple hosts provided with non-HTTP, non-TLS ports",
        ));
    }
    Ok(ServiceEntry {
        export_to: export_to(&spec, &meta.namespace, true)?,
        key: key_of(&meta.namespace, &meta.name),
        hosts,
        addresses,
        ports: ports.into(),
        location: one_of(
            &spec,
            "location",
            &[
                ("MESH_EXTERNAL", MeshLocation::External),
                ("MESH_INTERNAL", MeshLocation::Internal),
            ],
        )?
        .unwrap_or(MeshLocation::External),
        resolution,
        endpoints,
        subject_alt_names: strings(&spec, "subjectAltNames", any)?,
        workload_selector,
    })
}

fn workload_endpoint(
    e: &Fields<'_>,
    resolution: Resolution,
    ports: &[ServiceEntryPort],
) -> Result<WorkloadEndpoint> {
    let address = e.str("address")?.unwrap_or_default();
    if let Some(path) = address.strip_prefix("unix://") {
        if !path.starts_with('/') && !path.starts_with('@') {
            return Err(e.error(
                "address",
                format!("{path} is not an absolute path to a file"),
            ));
        }
        return Err(e.error(
            "address",
            format!("{address} is not supported by Weft: a node proxy cannot reach a unix socket inside a workload"),
        ));
    } else if address.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(e.error(
            "address",
            format!("{address} is not supported by Weft: the data path is IPv4"),
        ));
    } else if address
        .parse::<std::net::Ipv4Addr>()
        .is_ok_and(crate::model::node_local)
    {
        return Err(e.error(
            "address",
            format!("{address} is refused: the node proxy would connect to it from the node's own network (its loopback, or a link-local metadata service)"),
        ));
    } else if address.is_empty() {
        if !e.has("network") {
            return Err(e.error("address", "address is required"));
        }
        return Err(e.error(
            "address",
            "an endpoint reached through another network's gateway is not supported by Weft; give its address",
        ));
    } else if address.parse::<std::net::IpAddr>().is_err() {
        if resolution == Resolution::Static {
            return Err(e.error(
                "address",
                format!("endpoint address {address:?} is not a valid IP address"),
            ));
        }
        if validate::fqdn(address).is_err() {
            return Err(e.error(
                "address",
                format!("endpoint address {address:?} is not a valid FQDN or an IP address"),
            ));
        }
    }
    let mut endpoint_ports = BTreeMap::new();
    if let Some(value) = e.get("ports") {
        let Value::Mapping(map) = value else {
            return Err(e.error(
                "ports",
                format!("expected a mapping, found {}", show(value)),
            ));
        };
        for (name, port) in map {
            let Value::String(name) = name else {
                return Err(e.error(
                    "ports",
                    format!("keys must be strings, found {}", show(name)),
                ));
            };
            let path = format!("ports.{name}");
            if !ports.iter().any(|p| &*p.name == name) {
                return Err(e.error(
                    &path,
                    format!("endpoint port {name} is not defined by the service entry"),
                ));
            }
            let number = port
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                .ok_or_else(|| {
                    e.error(
                        &path,
                        format!("port number {} must be in the range 1..65535", show(port)),
                    )
                })?;
            endpoint_ports.insert(Arc::from(name.as_str()), number);
        }
    }
    Ok(WorkloadEndpoint {
        address: address.into(),
        ports: endpoint_ports,
        labels: checked_labels(e, "labels", validate::labels)?,
        network: opt_str(e, "network")?,
        locality: opt_str(e, "locality")?,
        weight: e.uint("weight", u64::from(u32::MAX))?.map(|w| w as u32),
        service_account: opt_str(e, "serviceAccount")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{
        objects::{assert_rejected, translate_one},
        Object,
    };

    fn virtual_service(yaml: &str) -> Arc<VirtualService> {
        match translate_one(yaml) {
            Ok(Object::VirtualService(vs)) => vs,
            other => panic!("expected a VirtualService, got {other:?}"),
        }
    }

    fn destination_rule(yaml: &str) -> Arc<DestinationRule> {
        match translate_one(yaml) {
            Ok(Object::DestinationRule(dr)) => dr,
            other => panic!("expected a DestinationRule, got {other:?}"),
        }
    }

    fn service_entry(yaml: &str) -> Arc<ServiceEntry> {
        match translate_one(yaml) {
            Ok(Object::ServiceEntry(se)) => se,
            other => panic!("expected a ServiceEntry, got {other:?}"),
        }
    }

    fn exact(s: &str) -> Option<StringMatch> {
        Some(StringMatch::Exact(s.into()))
    }

    fn dest(host: &str, subset: &str) -> Destination {
        Destination {
            host: host.into(),
            subset: Some(subset.into()),
            port: None,
        }
    }

    const REVIEWS_TEST_V2: &str =
        include_str!("../../../examples/bookinfo-traffic/virtual-service-reviews-test-v2.yaml");

    #[test]
    fn bookinfo_jason_to_reviews_v2() {
        let vs = virtual_service(REVIEWS_TEST_V2);
        assert_eq!(vs.key, ObjectKey::new("default", "reviews"));
        assert_eq!(&*vs.hosts, [Arc::from("reviews")]);
        assert!(vs.applies_to_mesh());
        assert_eq!(vs.http.len(), 2);
        let jason = &vs.http[0];
        assert_eq!(jason.matches.len(), 1);
        assert_eq!(
            &*jason.matches[0].headers,
            [NamedMatch {
                name: "end-user".into(),
                value: exact("jason")
            }]
        );
        let HttpAction::Route(route) = &jason.action else {
            panic!("expected a route");
        };
        assert_eq!(route.len(), 1);
        assert_eq!(route[0].destination, dest("reviews", "v2"));
        let HttpAction::Route(fallback) = &vs.http[1].action else {
            panic!("expected a route");
        };
        assert!(vs.http[1].matches.is_empty());
        assert_eq!(fallback[0].destination, dest("reviews", "v1"));
    }

    #[test]
    fn bookinfo_ratings_delay_and_abort() {
        let delay = virtual_service(include_str!(
            "../../../examples/bookinfo-traffic/virtual-service-ratings-test-delay.yaml"
        ));
        let fault = delay.http[0].fault.as_ref().expect("a fault");
        assert_eq!(
            fault.delay,
            Some(FaultDelay {
                fixed_delay: Duration::from_secs(7),
                percentage: 100.0
            })
        );
        assert_eq!(fault.abort, None);
        assert_eq!(delay.http[1].fault, None);

        let abort = virtual_service(include_str!(
            "../../../examples/bookinfo-traffic/virtual-service-ratings-test-abort.yaml"
        ));
        let fault = abort.http[0].fault.as_ref().expect("a fault");
        assert_eq!(
            fault.abort,
            Some(FaultAbort {
                error: AbortError::HttpStatus(500),
                percentage: 100.0
            })
        );
    }

    #[test]
    fn bookinfo_weighted_reviews() {
        let vs = virtual_service(include_str!(
            "../../../examples/bookinfo-traffic/virtual-service-reviews-50-v3.yaml"
        ));
        let HttpAction::Route(route) = &vs.http[0].action else {
            panic!("expected a route");
        };
        let got: Vec<_> = route
            .iter()
            .map(|d| (d.destination.subset.as_deref().unwrap(), d.weight))
            .collect();
        assert_eq!(got, [("v1", 50), ("v3", 50)]);
    }

    #[test]
    fn istio_reference_virtual_service() {
        // The examples of Istio's VirtualService reference, in one resource.
        let vs = virtual_service(
            r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews-route
  namespace: bookinfo
spec:
  hosts:
  - reviews.prod.svc.cluster.local
  gateways: [mesh, istio-system/ingress]
  exportTo: [".", "istio-system"]
  http:
  - name: "reviews-v2-routes"
    match:
    - uri:
        prefix: "/wpcatalog"
      ignoreUriCase: true
    - uri:
        regex: "/consumer(catalog|list)"
      method:
        exact: GET
      headers:
        x-canary: {}
        X-Version:
          prefix: v2
      withoutHeaders:
        x-debug:
          exact: "1"
      queryParams:
        lang:
          exact: en
      port: 9080
      sourceLabels:
        app: productpage
      sourceNamespace: bookinfo
    rewrite:
      uri: "/newcatalog"
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v2
        port:
          number: 9080
      headers:
        request:
          add: {x-subset: v2}
    headers:
      request:
        set: {test: "true"}
      response:
        remove: [foo]
    timeout: 10s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream,503
    mirror:
      host: reviews.prod.svc.cluster.local
      subset: v3
    mirrorPercentage:
      value: 12.5
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
  - match:
    - uri:
        exact: /v1/getProductRatings
    redirect:
      uri: /v1/bookRatings
      authority: newratings.default.svc.cluster.local
  - name: "reviews-v1-route"
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v1
  tcp:
  - match:
    - port: 27017
      destinationSubnets: [10.1.0.0/16]
    route:
    - destination:
        host: mongo.backup.svc.cluster.local
        port:
          number: 5555
"#,
        );
        assert_eq!(vs.key, ObjectKey::new("bookinfo", "reviews-route"));
        assert!(vs.applies_to_mesh());
        assert_eq!(&*vs.export_to, [Arc::from("."), Arc::from("istio-system")]);
        let rule = &vs.http[0];
        assert_eq!(rule.name.as_deref(), Some("reviews-v2-routes"));
        assert_eq!(
            rule.matches[0].uri,
            Some(StringMatch::Prefix("/wpcatalog".into()))
        );
        assert!(rule.matches[0].ignore_uri_case);
        let second = &rule.matches[1];
        let Some(StringMatch::Regex(uri)) = &second.uri else {
            panic!("expected a regex");
        };
        assert!(uri.is_match("/consumerlist"));
        assert!(!uri.is_match("/consumerlist/2"));
        assert_eq!(second.method, exact("GET"));
        assert_eq!(
            &*second.headers,
            [
                NamedMatch {
                    name: "x-canary".into(),
                    value: None
                },
                NamedMatch {
                    name: "x-version".into(),
                    value: Some(StringMatch::Prefix("v2".into()))
                },
            ]
        );
        assert_eq!(second.without_headers[0].value, exact("1"));
        assert_eq!(second.query_params[0].name.as_ref(), "lang");
        assert_eq!(second.port, Some(9080));
        assert_eq!(second.source_labels["app"], "productpage");
        assert_eq!(second.source_namespace.as_deref(), Some("bookinfo"));
        assert_eq!(
            rule.rewrite.as_ref().unwrap().uri.as_deref(),
            Some("/newcatalog")
        );
        let HttpAction::Route(route) = &rule.action else {
            panic!("expected a route");
        };
        assert_eq!(route[0].destination.port, Some(9080));
        assert_eq!(&*route[0].headers.request.add[0].name, "x-subset");
        assert_eq!(&*rule.headers.request.set[0].value, "true");
        assert_eq!(&*rule.headers.response.remove, [Arc::from("foo")]);
        assert_eq!(rule.timeout, Some(Duration::from_secs(10)));
        let retries = rule.retries.as_ref().unwrap();
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(retries.retry_on.len(), 4);
        assert_eq!(
            retries.retry_on[3],
            crate::model::traffic::RetryOn::Status(503)
        );
        assert_eq!(
            &*rule.mirrors,
            [Mirror {
                destination: dest("reviews.prod.svc.cluster.local", "v3"),
                percentage: 12.5
            }]
        );
        assert!(rule.cors_policy.is_some());
        let HttpAction::Redirect(redirect) = &vs.http[1].action else {
            panic!("expected a redirect");
        };
        assert_eq!(redirect.uri.as_deref(), Some("/v1/bookRatings"));
        assert_eq!(redirect.code, 301);
        let tcp = &vs.tcp[0];
        assert_eq!(tcp.matches[0].port, Some(27017));
        assert_eq!(
            tcp.matches[0].destination_subnets[0].to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(tcp.route[0].destination.port, Some(5555));
    }

    #[test]
    fn gateway_only_rules_are_kept_but_do_not_apply_to_the_mesh() {
        let vs = virtual_service(
            "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: bookinfo}\n\
             spec: {hosts: ['*'], gateways: [bookinfo-gateway], http: [{route: [{destination: {host: productpage, port: {number: 9080}}}]}]}",
        );
        assert!(!vs.applies_to_mesh());
    }

    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n";

    fn vs_with(http: &str) -> String {
        format!("{VS}  http:\n{http}")
    }

    #[test]
    fn bad_virtual_service_fields_are_named() {
        let route2 = "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 50\n    - destination: {host: reviews, subset: v3}\n      weight: ";
        for (http, field, reason) in [
            (format!("{route2}-50\n"), "spec.http[0].route[1].weight", "must not be negative"),
            (format!("{route2}5000000000\n"), "spec.http[0].route[1].weight", "from 0 to 2147483647"),
            (
                "  - route:\n    - destination: {host: reviews, subset: v1}\n    - destination: {host: reviews, subset: v3}\n".into(),
                "spec.http[0].route",
                "total destination weight = 0",
            ),
            ("  - route: [{destination: {host: reviews}}]\n    timeout: 1x\n".into(), "spec.http[0].timeout", "unknown unit"),
            ("  - route: [{destination: {host: reviews}}]\n    timeout: -1s\n".into(), "spec.http[0].timeout", "negative"),
            ("  - route: [{destination: {host: reviews}}]\n    timeout: 0s\n".into(), "spec.http[0].timeout", "at least 1ms"),
            (
                "  - route: [{destination: {host: reviews}}]\n    fault: {delay: {fixedDelay: 7s, percentage: {value: 150}}}\n".into(),
                "spec.http[0].fault.delay.percentage.value",
                "[0.0001, 100.0]",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    fault: {delay: {fixedDelay: 7, percentage: {value: 10}}}\n".into(),
                "spec.http[0].fault.delay.fixedDelay",
                "expected a string",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    fault: {abort: {httpStatus: 700, percentage: {value: 10}}}\n".into(),
                "spec.http[0].fault.abort.httpStatus",
                "not in range 200-599",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    fault: {abort: {grpcStatus: BROKEN}}\n".into(),
                "spec.http[0].fault.abort.grpcStatus",
                "not supported",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    fault: {}\n".into(),
                "spec.http[0].fault.delay",
                "must have an abort and/or a delay",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 3, retryOn: '5xx,bogus'}\n".into(),
                "spec.http[0].retries.retryOn",
                "\"bogus\" is not a valid retryOn policy",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    retries: {perTryTimeout: 2s}\n".into(),
                "spec.http[0].retries.attempts",
                "attempts are set to 0",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    retries: {attempts: -1}\n".into(),
                "spec.http[0].retries.attempts",
                "cannot be negative",
            ),
            (
                "  - match: [{uri: {regex: '/api/(v1'}}]\n    route: [{destination: {host: reviews}}]\n".into(),
                "spec.http[0].match[0].uri.regex",
                "not a valid regular expression",
            ),
            (
                "  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: reviews}}]\n".into(),
                "spec.http[0].match[0].uri.prefix",
                "only one of exact, prefix or regex",
            ),
            (
                "  - match: [{headers: {'bad header': {exact: x}}}]\n    route: [{destination: {host: reviews}}]\n".into(),
                "spec.http[0].match[0].headers.bad header",
                "not a valid header name",
            ),
            (
                "  - match: [{headers: {end-user: null}}]\n    route: [{destination: {host: reviews}}]\n".into(),
                "spec.http[0].match[0].headers.end-user",
                "expected a mapping, found null",
            ),
            (
                "  - match: [{sourceLabels: {'-app': x}}]\n    route: [{destination: {host: reviews}}]\n".into(),
                "spec.http[0].match[0].sourceLabels.-app",
                "invalid tag key",
            ),
            (
                "  - match: [{port: 70000}]\n    route: [{destination: {host: reviews}}]\n".into(),
                "spec.http[0].match[0].port",
                "1..65535",
            ),
            (
                "  - route: [{destination: {host: reviews, port: {number: 0}}}]\n".into(),
                "spec.http[0].route[0].destination.port.number",
                "expected a port number (1-65535)",
            ),
            (
                "  - route: [{destination: {host: reviews, subset: V_1}}]\n".into(),
                "spec.http[0].route[0].destination.subset",
                "subset name is invalid",
            ),
            (
                "  - route: [{destination: {host: '*'}}]\n".into(),
                "spec.http[0].route[0].destination.host",
                "invalid destination host",
            ),
            (
                "  - route: [{destination: {subset: v1}}]\n".into(),
                "spec.http[0].route[0].destination.host",
                "required",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    redirect: {uri: /x}\n".into(),
                "spec.http[0].route",
                "both route and redirect",
            ),
            ("  - redirect: {uri: /x, redirectCode: 200}\n".into(), "spec.http[0].redirect.redirectCode", "must be 3xx"),
            ("  - redirect: {redirectCode: 302}\n".into(), "spec.http[0].redirect.uri", "must specify URI"),
            ("  - match: [{uri: {prefix: /}}]\n".into(), "spec.http[0].route", "HTTP route or redirect is required"),
            (
                "  - route: [{destination: {host: reviews}}]\n    rewrite: {}\n".into(),
                "spec.http[0].rewrite.uri",
                "must specify at least one",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    headers: {request: {set: {':path': /x}}}\n".into(),
                "spec.http[0].headers.request.set.:path",
                "cannot have \":\" prefix",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    headers: {request: {remove: [Host]}}\n".into(),
                "spec.http[0].headers.request.remove[0]",
                "cannot set Host header",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    headers: {response: {add: {x-a: 'abc%123'}}}\n".into(),
                "spec.http[0].headers.response.add.x-a",
                "unterminated variable",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    rewrite: {authority: a.example}\n    headers: {request: {set: {host: b.example}}}\n".into(),
                "spec.http[0].headers.request.set.host",
                "authority header cannot be set multiple times",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    mirror: {host: reviews}\n    mirrorPercentage: {value: 101}\n".into(),
                "spec.http[0].mirrorPercentage.value",
                "0-100",
            ),
            (
                "  - route: [{destination: {host: reviews}}]\n    delegate: {name: other}\n".into(),
                "spec.http[0].delegate",
                "not supported",
            ),
        ] {
            assert_rejected(&vs_with(&http), "VirtualService", "bookinfo/reviews", field, reason);
        }

        let meta = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\n";
        let http = "http: [{route: [{destination: {host: reviews}}]}]";
        for (spec, field, reason) in [
            (format!("spec: {{hosts: ['*'], {http}}}"), "spec.hosts[0]", "wildcard host * is not allowed"),
            (format!("spec: {{hosts: [reviews, reviews], {http}}}"), "spec.hosts[1]", "duplicate hosts"),
            (format!("spec: {{hosts: ['*.example.com', 'a.example.com'], {http}}}"), "spec.hosts[1]", "duplicate hosts"),
            (format!("spec: {{hosts: [bad_host], {http}}}"), "spec.hosts[0]", "invalid"),
            (format!("spec: {{{http}}}"), "spec.hosts", "required"),
            ("spec: {hosts: [reviews]}".into(), "spec.http", "http, tcp or tls must be provided"),
            ("spec: {hosts: [reviews], tls: [{match: [{sniHosts: [reviews]}]}]}".into(), "spec.tls", "not supported"),
            (format!("spec: {{hosts: [reviews], gateways: [a/b/c], {http}}}"), "spec.gateways[0]", "invalid value for gateway name"),
            (format!("spec: {{hosts: [reviews], exportTo: ['*', bookinfo], {http}}}"), "spec.exportTo", "cannot have both public"),
            (
                "spec: {hosts: [reviews], tcp: [{match: [{destinationSubnets: [10.0.0.0/33]}], route: [{destination: {host: reviews}}]}]}".into(),
                "spec.tcp[0].match[0].destinationSubnets[0]",
                "not a valid CIDR block",
            ),
            ("spec: {hosts: [reviews], tcp: [{match: [{port: 80}]}]}".into(), "spec.tcp[0].route", "TCP route is required"),
        ] {
            assert_rejected(&format!("{meta}{spec}"), "VirtualService", "bookinfo/reviews", field, reason);
        }
    }

    #[test]
    fn bookinfo_destination_rules() {
        let text = include_str!("../../../examples/bookinfo-traffic/destination-rule-all.yaml");
        let reviews = text
            .split("---\n")
            .find(|doc| doc.contains("name: reviews"))
            .unwrap();
        let dr = destination_rule(reviews);
        assert_eq!(dr.key, ObjectKey::new("default", "reviews"));
        assert_eq!(&*dr.host, "reviews");
        let names: Vec<_> = dr.subsets.iter().map(|s| &*s.name).collect();
        assert_eq!(names, ["v1", "v2", "v3"]);
        assert_eq!(dr.subset("v3").unwrap().labels["version"], "v3");
        assert_eq!(dr.traffic_policy, None);
    }

    #[test]
    fn istio_reference_destination_rule() {
        let dr = destination_rule(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bookinfo-ratings
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 1000
        maxRequestsPerConnection: 10
        maxRetries: 3
        idleTimeout: 1h
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 3
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 50
    tls:
      mode: ISTIO_MUTUAL
  subsets:
  - name: testversion
    labels:
      version: v3
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie:
            name: user
            ttl: 0s
      portLevelSettings:
      - port:
          number: 80
        loadBalancer:
          simple: ROUND_ROBIN
"#,
        );
        let tp = dr.traffic_policy.as_ref().unwrap();
        assert_eq!(
            tp.load_balancer.as_ref().unwrap().policy,
            Some(LbPolicy::Simple(SimpleLb::LeastRequest))
        );
        let pool = tp.connection_pool.as_ref().unwrap();
        let tcp = pool.tcp.as_ref().unwrap();
        assert_eq!(tcp.max_connections, Some(100));
        assert_eq!(tcp.connect_timeout, Some(Duration::from_millis(30)));
        let http = pool.http.as_ref().unwrap();
        assert_eq!(http.http1_max_pending_requests, Some(10));
        assert_eq!(http.http2_max_requests, Some(1000));
        assert_eq!(http.max_requests_per_connection, Some(10));
        assert_eq!(http.max_retries, Some(3));
        assert_eq!(http.idle_timeout, Some(Duration::from_secs(3600)));
        let od = tp.outlier_detection.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx_errors, Some(7));
        assert_eq!(od.consecutive_gateway_errors, Some(3));
        assert_eq!(od.interval, Some(Duration::from_secs(300)));
        assert_eq!(od.base_ejection_time, Some(Duration::from_secs(900)));
        assert_eq!(od.max_ejection_percent, Some(50));
        assert_eq!(tp.tls.as_ref().unwrap().mode, TlsMode::IstioMutual);
        let subset = dr.subset("testversion").unwrap();
        let sp = subset.traffic_policy.as_ref().unwrap();
        assert_eq!(
            sp.load_balancer.as_ref().unwrap().policy,
            Some(LbPolicy::ConsistentHash(ConsistentHash {
                key: HashKey::HttpCookie {
                    name: "user".into(),
                    path: None,
                    ttl: Some(Duration::ZERO)
                },
                minimum_ring_size: None,
            }))
        );
        assert_eq!(sp.port_level_settings[0].port, 80);
        assert_eq!(
            sp.port_level_settings[0]
                .load_balancer
                .as_ref()
                .unwrap()
                .policy,
            Some(LbPolicy::Simple(SimpleLb::RoundRobin))
        );
    }

    #[test]
    fn bad_destination_rule_fields_are_named() {
        let dr = |spec: &str| {
            format!("apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec: {spec}")
        };
        for (spec, field, reason) in [
            ("{host: reviews, trafficPolicy: {loadBalancer: {simple: ROUND-ROBIN}}}", "spec.trafficPolicy.loadBalancer.simple", "expected one of UNSPECIFIED"),
            ("{host: reviews, trafficPolicy: {loadBalancer: {simple: round_robin}}}", "spec.trafficPolicy.loadBalancer.simple", "found \"round_robin\""),
            ("{host: reviews, trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}}", "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "not in range 0..100"),
            ("{host: reviews, trafficPolicy: {outlierDetection: {interval: 10}}}", "spec.trafficPolicy.outlierDetection.interval", "expected a string"),
            ("{host: reviews, trafficPolicy: {outlierDetection: {interval: '10'}}}", "spec.trafficPolicy.outlierDetection.interval", "missing unit"),
            ("{host: reviews, trafficPolicy: {outlierDetection: {consecutive5xxErrors: -1}}}", "spec.trafficPolicy.outlierDetection.consecutive5xxErrors", "from 0 to"),
            ("{host: reviews, trafficPolicy: {outlierDetection: {consecutiveLocalOriginFailures: 3}}}", "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures", "split external local origin errors"),
            ("{host: reviews, trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}}", "spec.trafficPolicy.connectionPool.tcp.maxConnections", "from 0 to 2147483647"),
            ("{host: reviews, trafficPolicy: {connectionPool: {tcp: {connectTimeout: 1.5us}}}}", "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "at least 1ms"),
            ("{host: reviews, trafficPolicy: {connectionPool: {http: {idleTimeout: 1500us}}}}", "spec.trafficPolicy.connectionPool.http.idleTimeout", "ms precision"),
            ("{host: reviews, trafficPolicy: {connectionPool: {}}}", "spec.trafficPolicy.connectionPool", "at least one field"),
            ("{host: reviews, trafficPolicy: {}}", "spec.trafficPolicy", "traffic policy must have at least one field"),
            ("{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {ttl: 10s}}}}}", "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name", "name required for HttpCookie"),
            ("{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, useSourceIp: true}}}}", "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp", "only one hash key"),
            ("{host: reviews, trafficPolicy: {tls: {mode: STRICT}}}", "spec.trafficPolicy.tls.mode", "expected one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
            ("{host: reviews, trafficPolicy: {tls: {mode: MUTUAL}}}", "spec.trafficPolicy.tls.clientCertificate", "client certificate required"),
            ("{host: reviews, trafficPolicy: {tls: {mode: SIMPLE, credentialName: api-ca, caCertificates: /ca.pem}}}", "spec.trafficPolicy.tls.caCertificates", "If credentialName is set"),
            ("{host: reviews, trafficPolicy: {tls: {mode: ISTIO_MUTUAL, credentialName: api-ca}}}", "spec.trafficPolicy.tls.credentialName", "not supported with the mesh's mTLS"),
            ("{host: reviews, trafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem}}}", "spec.trafficPolicy.tls.privateKey", "private key required"),
            ("{host: reviews, trafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: maybe}}}", "spec.trafficPolicy.tls.insecureSkipVerify", "expected true or false"),
            ("{host: reviews, trafficPolicy: {tls: {mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/a/sa/b]}}}", "spec.trafficPolicy.tls.subjectAltNames", "not supported with the mesh's mTLS"),
            ("{host: reviews, trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: ISTIO_MUTUAL, caCertificates: /ca.pem}}]}}", "spec.trafficPolicy.portLevelSettings[0].tls.caCertificates", "not supported with the mesh's mTLS"),
            ("{host: reviews, trafficPolicy: {portLevelSettings: [{port: {number: 0}, tls: {mode: SIMPLE}}]}}", "spec.trafficPolicy.portLevelSettings[0].port.number", "expected a port number"),
            ("{host: reviews, trafficPolicy: {portLevelSettings: [{tls: {mode: SIMPLE}}]}}", "spec.trafficPolicy.portLevelSettings[0].port", "must have valid port"),
            ("{host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v1, labels: {version: v2}}]}", "spec.subsets[1].name", "duplicate subset names: v1"),
            ("{host: reviews, subsets: [{labels: {version: v1}}]}", "spec.subsets[0].name", "subset name cannot be empty"),
            ("{host: reviews, subsets: [{name: v1, labels: {version: '-v1'}}]}", "spec.subsets[0].labels.version", "invalid tag value"),
            ("{host: reviews, subsets: [{name: v1, trafficPolicy: {loadBalancer: {simple: FASTEST}}}]}", "spec.subsets[0].trafficPolicy.loadBalancer.simple", "expected one of"),
            ("{host: 'reviews..bookinfo'}", "spec.host", "invalid"),
            ("{subsets: []}", "spec.host", "required"),
        ] {
            assert_rejected(&dr(spec), "DestinationRule", "bookinfo/reviews", field, reason);
        }
    }

    #[test]
    fn service_entries_cannot_point_the_node_proxy_at_the_node_itself() {
        let entry = |endpoint: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: sneaky, namespace: shop}}\nspec:\n  hosts: [admin.example.test]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 15020}}]\n  resolution: STATIC\n  endpoints: [{{address: {endpoint}}}]\n")
        };
        for address in ["127.0.0.1", "0.0.0.0", "169.254.169.254"] {
            assert_rejected(
                &entry(address),
                "ServiceEntry",
                "shop/sneaky",
                "spec.endpoints[0].address",
                "is refused",
            );
        }
        let addresses = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: sneaky, namespace: shop}\nspec:\n  hosts: [admin.example.test]\n  addresses: [127.0.0.2]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: NONE\n";
        assert_rejected(
            addresses,
            "ServiceEntry",
            "shop/sneaky",
            "spec.addresses[0]",
            "is refused",
        );
    }

    #[test]
    fn a_virtual_service_is_bounded_and_the_rejection_names_the_limit() {
        let routes = |n: usize| {
            let mut yaml = String::from("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: big, namespace: shop}\nspec:\n  hosts: [reviews]\n  http:\n");
            for i in 0..n {
                yaml += &format!("  - match: [{{uri: {{exact: /p{i}}}}}]\n    route: [{{destination: {{host: reviews}}}}]\n");
            }
            yaml
        };
        let value = crate::source::yaml::parse(&routes(MAX_ROUTES)).unwrap();
        assert!(crate::source::objects::translate(&value)[0].is_ok());
        assert_rejected(
            &routes(MAX_ROUTES + 1),
            "VirtualService",
            "shop/big",
            "spec.http",
            "10001 items: Weft accepts at most 10000",
        );
        let matches: String = (0..=MAX_MATCHES)
            .map(|i| format!("{{uri: {{exact: /m{i}}}}}, "))
            .collect();
        let yaml = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: big, namespace: shop}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{matches}]\n    route: [{{destination: {{host: reviews}}}}]\n");
        assert_rejected(
            &yaml,
            "VirtualService",
            "shop/big",
            "spec.http[0].match",
            "101 items",
        );
    }

    #[test]
    fn istio_reference_service_entries() {
        let se = service_entry(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-https
spec:
  hosts:
  - api.dropboxapi.com
  - www.googleapis.com
  - api.facebook.com
  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: TLS
  resolution: DNS
"#,
        );
        assert_eq!(se.hosts.len(), 3);
        assert_eq!(se.location, MeshLocation::External);
        assert_eq!(se.resolution, Resolution::Dns);
        assert_eq!(se.ports[0].number, 443);
        assert_eq!(se.ports[0].protocol.as_deref(), Some("TLS"));

        let se = service_entry(
            r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: external-svc-mongocluster
spec:
  hosts:
  - mymongodb.somedomain
  addresses:
  - 192.192.192.192
  ports:
  - number: 27018
    name: mongodb
    protocol: MONGO
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 2.2.2.2
  - address: 3.3.3.3
    ports:
      mongodb: 27019
    labels:
      zone: a
"#,
        );
        assert_eq!(se.addresses[0].prefix_len, 32);
        assert_eq!(se.location, MeshLocation::Internal);
        assert_eq!(se.endpoints.len(), 2);
        assert_eq!(se.endpoints[1].ports[&Arc::from("mongodb")], 27019);
        assert_eq!(se.endpoints[1].labels["zone"], "a");
    }

    #[test]
    fn bad_service_entry_fields_are_named() {
        let se = |spec: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext, namespace: egress}}\nspec: {spec}")
        };
        for (spec, field, reason) in [
            ("{ports: [{number: 443, name: https}]}", "spec.hosts", "at least one host"),
            ("{hosts: ['*'], ports: [{number: 443, name: https}]}", "spec.hosts[0]", "invalid host *"),
            ("{hosts: [a.example], addresses: [10.0.0.0/40]}", "spec.addresses[0]", "not a valid CIDR block"),
            ("{hosts: [a.example], addresses: [10.0.0.0/8], resolution: DNS}", "spec.addresses", "CIDR addresses are allowed only for NONE/STATIC"),
            ("{hosts: [a.example], addresses: [10.0.0.1, 192.192.192.192/24], resolution: STATIC}", "spec.addresses[1]", "only single IPv4 addresses are captured"),
            ("{hosts: [a.example], addresses: ['2001:db8::1']}", "spec.addresses[0]", "only single IPv4 addresses are captured"),
            ("{hosts: [a.example], ports: [{number: 443, name: https, protocol: QUIC}]}", "spec.ports[0].protocol", "unsupported protocol: QUIC"),
            ("{hosts: [a.example], ports: [{number: 443}]}", "spec.ports[0].name", "invalid port name"),
            ("{hosts: [a.example], ports: [{number: 443, name: a}, {number: 443, name: b}]}", "spec.ports[1].number", "already defined"),
            ("{hosts: [a.example], ports: [{number: 99999, name: a}]}", "spec.ports[0].number", "expected a port number"),
            ("{hosts: [a.example], resolution: dns}", "spec.resolution", "expected one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"),
            ("{hosts: [a.example], location: EXTERNAL}", "spec.location", "expected one of MESH_EXTERNAL, MESH_INTERNAL"),
            ("{hosts: [a.example], resolution: STATIC, endpoints: [{address: db.example}]}", "spec.endpoints[0].address", "not a valid IP address"),
            ("{hosts: [a.example], resolution: NONE, endpoints: [{address: 10.0.0.1}]}", "spec.endpoints", "no endpoints should be provided"),
            ("{hosts: ['*.example.com'], resolution: DNS}", "spec.hosts[0]", "hosts must be FQDN"),
            ("{hosts: [a.example], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 10.0.0.1, ports: {grpc: 8080}}]}", "spec.endpoints[0].ports.grpc", "not defined by the service entry"),
            ("{hosts: [a.example, b.example], ports: [{number: 5432, name: pg, protocol: TCP}], resolution: DNS}", "spec.hosts", "multiple hosts provided with non-HTTP, non-TLS ports"),
        ] {
            assert_rejected(&se(spec), "ServiceEntry", "egress/ext", field, reason);
        }
    }
}
