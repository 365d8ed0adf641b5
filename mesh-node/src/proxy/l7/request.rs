//! One request on the source side, from route selection to the response head, and on the
//! destination side; the replies the proxy makes itself.

use super::*;

pub(super) async fn handle(conn: Arc<Conn>, request: Request<Incoming>) -> Reply {
    let start = Instant::now();
    let view = conn.ctx.view();
    let (mut parts, body) = request.into_parts();
    let dialled_service = view.snapshot.services.get(&conn.service).cloned();
    let mut report = Report::new(conn.clone(), &parts, dialled_service.clone(), start);
    if view.logs() {
        report.request_headers = Some(Box::new(parts.headers.clone()));
    }
    let authority = report.authority.clone();
    let grpc = report.grpc;
    // hyper bounds what it buffers; the limits themselves are counted here, the same way
    // for HTTP/1 and HTTP/2.
    let limits = conn.limits();
    if parts.headers.len() > limits.max_headers || head_size(&parts) > limits.max_head_bytes {
        return local_reply(
            report,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ResponseFlags::NONE,
            "request headers too large",
        );
    }
    strip_h2c_upgrade(&mut parts.headers);
    if is_upgrade(&parts) && !is_websocket(&parts) {
        report.details = Some("upgrade_failed".to_owned());
        return local_reply(
            report,
            StatusCode::FORBIDDEN,
            ResponseFlags::NONE,
            "upgrade not allowed",
        );
    }
    // What policies match and what is routed and forwarded is the same path.
    normalize_request_path(&mut parts);
    if !parts.headers.contains_key(REQUEST_ID) {
        parts.headers.insert(
            REQUEST_ID,
            HeaderValue::from_str(&request_id()).expect("hex is a valid header value"),
        );
    }
    report.request_id = parts.headers.get(REQUEST_ID).cloned();
    if let (Some(kept), Some(id)) = (&mut report.request_headers, &report.request_id) {
        kept.insert(REQUEST_ID, id.clone());
    }
    if let Some(inbound) = &conn.inbound {
        if let Some(pod) = &inbound.pod {
            report.trace = Trace::server(&view, pod, &mut parts.headers);
        }
        return forward_inbound(report, &view, inbound, parts, body).await;
    }
    report.trace = Trace::client(&view, conn.source.as_ref(), &mut parts.headers);

    let selection = match view.routes.get(&conn.service) {
        Some(routes) => routes.select(&RequestInfo {
            method: &parts.method,
            uri: &parts.uri,
            authority: &authority,
            headers: &parts.headers,
            port: conn.port,
            source: conn.source.as_deref(),
        }),
        None => Selection::Unrouted,
    };
    let default_backend;
    let (rule, backend) = match &selection {
        Selection::NoMatch => {
            return local_reply(
                report,
                StatusCode::NOT_FOUND,
                ResponseFlags::NR,
                "route not found",
            );
        }
        Selection::Unrouted => {
            default_backend = Backend::to(&conn.service, conn.port);
            (None, &default_backend)
        }
        Selection::Rule(selected) => {
            let rule = selected.rule;
            report.route = Some(rule.name.clone());
            if let Some(fault) = &rule.fault {
                if let Some(delay) = &fault.delay {
                    if chance(delay.percentage) {
                        report.flags |= ResponseFlags::DI;
                        tokio::time::sleep(delay.fixed_delay).await;
                    }
                }
                if let Some(abort) = &fault.abort {
                    if chance(abort.percentage) {
                        return fault_abort(report, abort.error);
                    }
                }
            }
            match &rule.action {
                RuleAction::Redirect(_) => {
                    let redirect = selected
                        .redirect(&parts)
                        .expect("a redirect rule builds a redirect");
                    let (head, ()) = redirect.into_parts();
                    return local_response(
                        report,
                        head.status,
                        head.headers,
                        Bytes::new(),
                        ResponseFlags::NONE,
                    );
                }
                RuleAction::Respond { status, body } => {
                    let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                    let body = body
                        .as_ref()
                        .map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
                    return local_response(
                        report,
                        status,
                        HeaderMap::new(),
                        body,
                        ResponseFlags::NONE,
                    );
                }
                RuleAction::Forward(_) => {}
            }
            let Some(backend) = rule.pick(fastrand::u32(..)) else {
                return local_failure(report, NO_HEALTHY_UPSTREAM);
            };
            selected.rewrite(&mut parts);
            apply_header_ops(&rule.request_headers, &mut parts.headers);
            apply_header_ops(&backend.request_headers, &mut parts.headers);
            (Some(rule), backend)
        }
    };

    let Some(service_key) = backend.service.clone() else {
        return local_reply(
            report,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NC,
            "no cluster for the destination host",
        );
    };
    let Some(service) = view.snapshot.services.get(&service_key).cloned() else {
        return local_reply(
            report,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NC,
            "no cluster for the destination host",
        );
    };
    let port = backend
        .port
        .or_else(|| service_port(&service, conn.port))
        .unwrap_or(conn.port);
    report.service = Some(service.clone());
    let key = ClusterKey {
        service: service_key,
        port,
        subset: backend.subset.clone(),
    };
    report.cluster = Some(key.clone());
    let resolved = match conn.cluster(&view, key) {
        Ok(r) => r,
        Err(e) => {
            debug!("{e}");
            return local_reply(
                report,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::NC,
                "no cluster for the destination",
            );
        }
    };
    let response_ops = rule.map(|r| (&r.response_headers, &backend.response_headers));

    if is_upgrade(&parts) {
        let upgrade = hyper::upgrade::on(Request::from_parts(parts.clone(), ()));
        return forward_upgrade(report, &view, &resolved, parts, body, upgrade).await;
    }

    let proto = upstream_protocol(conn.declared, &parts, grpc, &resolved.cluster);
    prepare_head(&mut parts, &authority, proto);
    let (first_body, tape) = RequestBody::record(body, grpc);
    report.tape = tape.clone();
    let retries = rule.and_then(|r| r.retries.clone());
    let explicit_retries = retries.is_some();
    let plan = retries.unwrap_or_else(default_retries);
    let attempt = Attempts {
        view: &view,
        resolved: &resolved,
        plan: &plan,
        // Without a policy the user asked for, only requests that are safe to repeat are.
        idempotent_only: !explicit_retries,
        per_try_timeout: plan.per_try_timeout,
        proto,
    };
    let timeout = rule.and_then(|r| r.timeout);
    let mirrors = rule.map(|r| r.mirrors.clone());
    // Envoy's route timeout runs until the response is complete, body included.
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let outcome = match deadline {
        Some(deadline) => match tokio::time::timeout_at(
            deadline,
            attempt.run(&mut report, &parts, first_body, tape.as_deref()),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err((
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlags::UT,
                "upstream request timeout",
            )),
        },
        None => {
            attempt
                .run(&mut report, &parts, first_body, tape.as_deref())
                .await
        }
    };
    if let Some(mirrors) = mirrors {
        if !mirrors.is_empty() {
            mirror(&conn, &view, &mirrors, &parts, tape.as_deref());
        }
    }
    match outcome {
        Ok((mut response, (hold, pick))) => {
            report.status = response.status().as_u16();
            report.seen_by_destination = true;
            report.grpc_status = body::grpc_status(response.headers());
            report.hold = Some(hold);
            report.pick = Some(pick);
            strip_hop_by_hop(response.headers_mut());
            if let Some((rule_ops, backend_ops)) = response_ops {
                apply_header_ops(rule_ops, response.headers_mut());
                apply_header_ops(backend_ops, response.headers_mut());
            }
            let (mut head, upstream_body) = response.into_parts();
            head.version = report.version;
            report.saw_response(&head.headers);
            let body = ResponseBody::upstream(upstream_body, report).with_deadline(deadline);
            Response::from_parts(head, body)
        }
        Err(failure) => local_failure(report, failure),
    }
}

/// The destination side: every request goes to the local pod, on a pooled connection from
/// the proxy address, and is reported with `reporter="destination"`. Routing, retries and
/// faults happened on the source side.
pub(super) async fn forward_inbound(
    mut report: Report,
    view: &View,
    inbound: &Inbound,
    mut parts: Parts,
    body: Incoming,
) -> Reply {
    let conn = report.conn.clone();
    report.destination = inbound.pod.clone();
    report.service = inbound
        .service
        .as_ref()
        .and_then(|k| view.snapshot.services.get(k))
        .cloned();
    report.upstream = Some(inbound.target);
    if let Some(pod) = &inbound.pod {
        let target = authz::Target {
            pod,
            addr: inbound.target,
            sni: None,
        };
        let http = http_attributes(&parts);
        if let Err(denied) = authz::check(&conn.ctx, view, target, &inbound.peer, Some(http)) {
            return denied_reply(report, denied);
        }
    }
    let key = ConnKey {
        target: inbound.target,
        via: conn.ctx.dialer.local(),
        proto: Proto::Http1,
        caller: None,
        tls: None,
    };
    if is_upgrade(&parts) {
        let upgrade = hyper::upgrade::on(Request::from_parts(parts.clone(), ()));
        return send_upgrade(report, key, parts, body, upgrade, None).await;
    }
    let grpc = report.grpc;
    let proto = match conn.declared {
        Declared::Http2 => Proto::Http2,
        _ if grpc || parts.version == Version::HTTP_2 => Proto::Http2,
        _ => Proto::Http1,
    };
    let key = ConnKey { proto, ..key };
    let authority = report.authority.clone();
    prepare_head(&mut parts, &authority, proto);
    conn.set_forwarded_client_cert(&mut parts.headers, None);
    let (request_body, tape) = RequestBody::record(body, grpc);
    report.tape = tape;
    let policy = ClusterPolicy::default();
    let sent = inbound
        .pool
        .send(
            &inbound.state,
            &policy,
            &key,
            conn.dial(&policy),
            Request::from_parts(parts, request_body),
        )
        .await;
    match sent {
        Ok((response, hold)) => {
            report.status = response.status().as_u16();
            report.grpc_status = body::grpc_status(response.headers());
            report.hold = Some(hold);
            let (mut head, upstream_body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            head.version = report.version;
            report.saw_response(&head.headers);
            Response::from_parts(head, ResponseBody::upstream(upstream_body, report))
        }
        Err(e) => {
            debug!("{e}");
            let client_failed = report.tape.as_deref().is_some_and(Tape::downstream_failed);
            let (status, flags, text) = if client_failed {
                DOWNSTREAM_PROTOCOL_ERROR
            } else if e.before_request() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlags::UF,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlags::UR,
                    "upstream connect error or disconnect/reset before headers. reset reason: remote reset",
                )
            };
            local_reply(report, status, flags, text)
        }
    }
}

/// The answer to a request the destination's AuthorizationPolicies denied, as Envoy's RBAC
/// filter gives it: `403 RBAC: access denied` (gRPC: `PERMISSION_DENIED`), the policy in the
/// access log's response code details.
pub(super) fn denied_reply(mut report: Report, denied: Denied) -> Reply {
    report.details = Some(denied.detail);
    local_reply(
        report,
        StatusCode::FORBIDDEN,
        ResponseFlags::NONE,
        authz::DENIED_BODY,
    )
}

/// What AuthorizationPolicies see of a request.
pub(super) fn http_attributes(parts: &Parts) -> Http<'_> {
    Http {
        host: host_of(parts),
        method: parts.method.as_str(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        headers: &parts.headers,
    }
}

/// `:authority` for HTTP/2, else the `Host` header.
fn host_of(parts: &Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// Normalizes the request's path as Istio's default (`BASE`) does before anything matches
/// it ([`normalize_path`]: escapes of unreserved characters decoded, backslashes read as `/`,
/// `.` and `..` segments resolved); the query stays. Routes, policies and the upstream all see
/// the normalized path, so `/public/%2e%2e/admin` cannot match one rule and reach another.
pub(crate) fn normalize_request_path(parts: &mut Parts) {
    let path = parts.uri.path();
    let normalized = normalize_path(path);
    if matches!(normalized, std::borrow::Cow::Borrowed(_)) || normalized == path {
        return;
    }
    let with_query = match parts.uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized.into_owned(),
    };
    let Ok(path_and_query) = with_query.parse() else {
        return;
    };
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = Some(path_and_query);
    if let Ok(uri) = Uri::from_parts(uri) {
        parts.uri = uri;
    }
}

/// HTTP/2 upstream for gRPC and for ports that declare HTTP/2; a sniffed connection keeps
/// the client's protocol; `http` ports talk HTTP/1.1 upstream unless the DestinationRule
/// asks for the upgrade (Istio's `h2UpgradePolicy`).
pub(super) fn upstream_protocol(
    declared: Declared,
    parts: &Parts,
    grpc: bool,
    cluster: &Cluster,
) -> Proto {
    let h2 = match declared {
        Declared::Http2 => true,
        Declared::Http => grpc || cluster.policy().h2_upgrade,
        Declared::Unknown | Declared::Opaque => grpc || parts.version == Version::HTTP_2,
    };
    if h2 {
        Proto::Http2
    } else {
        Proto::Http1
    }
}

/// Rewrites the request head for the upstream protocol: origin form and `Host` for HTTP/1.1,
/// absolute form (`:scheme`, `:authority`) for HTTP/2; drops hop-by-hop headers.
pub(super) fn prepare_head(parts: &mut Parts, authority: &str, proto: Proto) {
    strip_hop_by_hop(&mut parts.headers);
    // A rewrite may have changed the authority: the URI or Host now says which.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| authority.to_owned());
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match proto {
        Proto::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::from(path);
            if let Ok(host) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, host);
            }
        }
        Proto::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority.as_str())
                .path_and_query(path)
                .build()
            {
                parts.uri = uri;
            }
        }
    }
    parts
        .headers
        .insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
}

/// The answer to a request refused before any work, reported like any other local reply:
/// `503 UO` when its client address has no slot left, `503 OM` when the overload manager sheds
/// load.
pub(super) fn refused_reply(
    conn: Arc<Conn>,
    request: Request<Incoming>,
    refused: Refused,
) -> Reply {
    let (parts, _) = request.into_parts();
    let view = conn.ctx.view();
    let service = view.snapshot.services.get(&conn.service).cloned();
    let mut report = Report::new(conn, &parts, service, Instant::now());
    if view.logs() {
        report.request_headers = Some(Box::new(parts.headers));
    }
    let (flags, body) = match refused {
        Refused::Cap => (
            ResponseFlags::UO,
            "too many requests in flight from this client",
        ),
        Refused::Overload => (ResponseFlags::OM, "node proxy overloaded"),
    };
    local_reply(report, StatusCode::SERVICE_UNAVAILABLE, flags, body)
}

impl Report {
    /// The report of a request as received, before anything is decided about it.
    fn new(conn: Arc<Conn>, parts: &Parts, service: Option<Arc<Service>>, start: Instant) -> Self {
        Self {
            conn,
            start,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            authority: authority_of(parts),
            version: parts.version,
            request_id: None,
            user_agent: parts.headers.get(header::USER_AGENT).cloned(),
            grpc: is_grpc(&parts.headers),
            status: 0,
            grpc_status: None,
            flags: ResponseFlags::NONE,
            details: None,
            route: None,
            upstream: None,
            cluster: None,
            destination: None,
            service,
            tape: None,
            hold: None,
            pick: None,
            recorded: false,
            seen_by_destination: false,
            attempt_start: None,
            upstream_time: None,
            trace: None,
            request_headers: None,
            response_headers: None,
            attempt_headers: None,
        }
    }
}

/// The size of a request head as Envoy counts it against `max_request_headers_kb`: the
/// request line's parts and every header's name and value.
fn head_size(parts: &Parts) -> usize {
    let uri = &parts.uri;
    let line = parts.method.as_str().len()
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum::<usize>()
        + line
}

pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(super) const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(listed) = headers.get(header::CONNECTION).cloned() {
        if let Ok(listed) = listed.to_str() {
            for name in listed.split(',') {
                let name = name.trim();
                if !name.eq_ignore_ascii_case("upgrade") {
                    headers.remove(name);
                }
            }
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// `:authority` for HTTP/2, else the `Host` header.
pub(super) fn authority_of(parts: &Parts) -> Arc<str> {
    host_of(parts).into()
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The port of `service` a route without a port means: the dialled one if the service has
/// it, else the service's only port.
pub(crate) fn service_port(service: &Service, dialled: u16) -> Option<u16> {
    if service.ports.iter().any(|p| p.port == dialled) {
        Some(dialled)
    } else if service.ports.len() == 1 {
        Some(service.ports[0].port)
    } else {
        None
    }
}

/// True with probability `percentage` (0-100).
pub(super) fn chance(percentage: f64) -> bool {
    percentage >= 100.0 || (percentage > 0.0 && fastrand::f64() * 100.0 < percentage)
}

pub(super) fn request_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    // The layout of a random UUID (version 4, variant 1), as Envoy generates them.
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

pub(super) fn fault_abort(mut report: Report, error: AbortError) -> Reply {
    report.flags |= ResponseFlags::FI;
    match error {
        AbortError::HttpStatus(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let flags = report.flags;
            local_reply(report, status, flags, "fault filter abort")
        }
        AbortError::GrpcStatus(code) => {
            let flags = report.flags;
            grpc_reply(report, u32::from(code), "fault filter abort", flags)
        }
    }
}

pub(super) fn local_failure(report: Report, (status, flags, text): Failure) -> Reply {
    local_reply(report, status, flags, text)
}

/// A reply the proxy makes itself; gRPC clients get it as a gRPC status (Envoy's mapping of
/// HTTP statuses to gRPC codes).
pub(super) fn local_reply(
    report: Report,
    status: StatusCode,
    flags: ResponseFlags,
    text: &'static str,
) -> Reply {
    if report.grpc {
        return grpc_reply(report, http_to_grpc(status), text, flags);
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    local_response(
        report,
        status,
        headers,
        Bytes::from_static(text.as_bytes()),
        flags,
    )
}

pub(super) fn grpc_reply(
    report: Report,
    code: u32,
    message: &'static str,
    flags: ResponseFlags,
) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    local_response(report, StatusCode::OK, headers, Bytes::new(), flags)
}

pub(super) fn local_response(
    mut report: Report,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    flags: ResponseFlags,
) -> Reply {
    report.status = status.as_u16();
    report.flags |= flags;
    if report.grpc {
        report.grpc_status = body::grpc_status(&headers);
    }
    report.saw_response(&headers);
    let mut response = Response::new(ResponseBody::local(body, report));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

pub(super) fn http_to_grpc(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http_body_util::BodyExt as _;

    use super::*;
    use crate::{
        metrics::Metrics,
        model::{Protocol, ServicePort, Snapshot, TargetPort},
        proxy::{context::ProxyConfig, upstream::cluster::ClusterState, NoOriginalDst},
    };

    fn head(version: Version, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().version(version).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        names
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut parts = head(
            Version::HTTP_11,
            "/",
            &[
                ("connection", "keep-alive, x-hop"),
                ("keep-alive", "timeout=5"),
                ("x-hop", "1"),
                ("proxy-connection", "keep-alive"),
                ("transfer-encoding", "chunked"),
                ("proxy-authenticate", "Basic"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("te", "trailers"),
                ("end-user", "jason"),
                ("authorization", "Bearer token"),
            ],
        );
        strip_hop_by_hop(&mut parts.headers);
        assert_eq!(names(&parts.headers), ["authorization", "end-user", "te"]);
        assert_eq!(parts.headers["te"], "trailers", "gRPC needs `te: trailers`");

        let mut other_te = head(Version::HTTP_11, "/", &[("te", "gzip, trailers")]);
        strip_hop_by_hop(&mut other_te.headers);
        assert!(
            other_te.headers.get("te").is_none(),
            "only `te: trailers` may be forwarded"
        );
    }

    #[test]
    fn paths_are_normalized_before_routes_and_policies_see_them() {
        let normalized = |version, uri: &str| {
            let mut parts = head(version, uri, &[]);
            normalize_request_path(&mut parts);
            parts.uri.to_string()
        };
        assert_eq!(
            normalized(Version::HTTP_11, "/public/../admin?x=1"),
            "/admin?x=1"
        );
        assert_eq!(normalized(Version::HTTP_11, "/a/./b/"), "/a/b/");
        assert_eq!(normalized(Version::HTTP_11, "/a\\..\\admin"), "/admin");
        assert_eq!(normalized(Version::HTTP_11, "/../.."), "/");
        assert_eq!(
            normalized(Version::HTTP_11, "/public/%2e%2E/admin?q=%2e"),
            "/admin?q=%2e"
        );
        assert_eq!(
            normalized(Version::HTTP_11, "/plain?q=/../"),
            "/plain?q=/../"
        );
        // HTTP/2's absolute form keeps its scheme and authority.
        assert_eq!(
            normalized(Version::HTTP_2, "http://echo:80/x/../y"),
            "http://echo:80/y"
        );
    }

    #[test]
    fn http1_heads_get_origin_form_and_a_host() {
        // An HTTP/2 client's request to an HTTP/1.1 server.
        let mut parts = head(
            Version::HTTP_2,
            "http://reviews:9080/reviews/1?full=true",
            &[("connection", "close"), ("end-user", "jason")],
        );
        prepare_head(&mut parts, "ignored", Proto::Http1);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.uri, "/reviews/1?full=true");
        assert_eq!(parts.headers["host"], "reviews:9080");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
        assert_eq!(parts.headers["end-user"], "jason");
        assert!(parts.headers.get("connection").is_none());
    }

    #[test]
    fn http2_heads_get_absolute_form_without_host() {
        let mut parts = head(
            Version::HTTP_11,
            "/ratings/0",
            &[("host", "ratings:9080"), ("te", "trailers")],
        );
        prepare_head(&mut parts, "ignored", Proto::Http2);
        assert_eq!(parts.version, Version::HTTP_2);
        assert_eq!(parts.uri, "http://ratings:9080/ratings/0");
        assert!(parts.headers.get("host").is_none());
        assert_eq!(parts.headers["te"], "trailers");
    }

    #[test]
    fn prepared_heads_keep_a_rewritten_authority_and_fall_back_to_the_dialled_one() {
        // A rewrite changed the Host: the upstream sees the new one.
        let mut rewritten = head(Version::HTTP_11, "/", &[("host", "ratings.prod")]);
        prepare_head(&mut rewritten, "reviews:9080", Proto::Http1);
        assert_eq!(rewritten.headers["host"], "ratings.prod");
        // An HTTP/1.0 client without Host: the authority the request arrived with.
        let mut bare = head(Version::HTTP_10, "/", &[]);
        prepare_head(&mut bare, "reviews:9080", Proto::Http2);
        assert_eq!(bare.uri, "http://reviews:9080/");
    }

    #[test]
    fn the_authority_is_the_uri_authority_else_the_host_header() {
        let h2 = head(
            Version::HTTP_2,
            "http://reviews:9080/",
            &[("host", "other")],
        );
        assert_eq!(&*authority_of(&h2), "reviews:9080");
        let h1 = head(Version::HTTP_11, "/", &[("host", "details:9080")]);
        assert_eq!(&*authority_of(&h1), "details:9080");
        assert_eq!(&*authority_of(&head(Version::HTTP_10, "/", &[])), "");
    }

    #[test]
    fn request_ids_look_like_random_v4_uuids() {
        let ids: Vec<String> = (0..200).map(|_| request_id()).collect();
        for id in &ids {
            let groups: Vec<&str> = id.split('-').collect();
            let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
            assert!(
                id.chars()
                    .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{id}"
            );
            assert!(groups[2].starts_with('4'), "version 4: {id}");
            assert!(
                matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
                "RFC 4122 variant: {id}"
            );
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "ids repeat");
    }

    #[test]
    fn grpc_is_recognised_by_its_content_type() {
        let grpc = |content_type: &str| {
            is_grpc(&head(Version::HTTP_2, "/", &[("content-type", content_type)]).headers)
        };
        assert!(grpc("application/grpc"));
        assert!(grpc("application/grpc+proto"));
        assert!(grpc("application/grpc-web"));
        assert!(!grpc("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn http_statuses_map_to_grpc_codes_as_envoy_documents() {
        let code = |status: u16| http_to_grpc(StatusCode::from_u16(status).unwrap());
        assert_eq!(code(400), 13, "INTERNAL");
        assert_eq!(code(401), 16, "UNAUTHENTICATED");
        assert_eq!(code(403), 7, "PERMISSION_DENIED");
        assert_eq!(code(404), 12, "UNIMPLEMENTED");
        for status in [429, 502, 503, 504] {
            assert_eq!(code(status), 14, "{status} is UNAVAILABLE");
        }
        for status in [200, 405, 500, 501] {
            assert_eq!(code(status), 2, "{status} is UNKNOWN");
        }
    }

    fn port(name: &str, number: u16) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port: number,
            target_port: TargetPort::Number(number),
            protocol: Protocol::Tcp,
            app_protocol: None,
        }
    }

    fn service(ports: Vec<ServicePort>) -> Service {
        Service {
            key: ObjectKey::new("bookinfo", "reviews"),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            ports,
            selector: None,
            entry: None,
        }
    }

    #[test]
    fn a_route_without_port_means_the_dialled_port_or_the_only_one() {
        let two = service(vec![port("http", 9080), port("grpc", 9090)]);
        assert_eq!(service_port(&two, 9090), Some(9090));
        assert_eq!(service_port(&two, 80), None, "ambiguous");
        let one = service(vec![port("http", 9080)]);
        assert_eq!(service_port(&one, 80), Some(9080));
        assert_eq!(service_port(&one, 9080), Some(9080));
    }

    #[test]
    fn chance_follows_the_percentage() {
        assert!((0..1000).all(|_| chance(100.0)));
        assert!((0..1000).all(|_| !chance(0.0)));
        let hits = (0..1000).filter(|_| chance(50.0)).count();
        // Both outcomes occur (the odds of either never occurring are 2^-1000).
        assert!(hits > 0 && hits < 1000, "{hits}");
    }

    fn cluster(h2_upgrade: bool) -> Cluster {
        let key = ClusterKey::new(ObjectKey::new("bookinfo", "reviews"), 9080, None);
        let policy = ClusterPolicy {
            h2_upgrade,
            ..ClusterPolicy::default()
        };
        Cluster::build(
            &Snapshot::default(),
            key,
            policy,
            Arc::new(ClusterState::new()),
        )
        .unwrap()
    }

    #[test]
    fn the_upstream_protocol_follows_the_declared_port_and_h2_upgrade_policy() {
        let h1 = head(Version::HTTP_11, "/", &[]);
        let h2 = head(Version::HTTP_2, "http://reviews/", &[]);
        let plain = cluster(false);
        let upgrade = cluster(true);
        let proto = |declared, parts: &Parts, grpc, cluster: &Cluster| {
            upstream_protocol(declared, parts, grpc, cluster)
        };
        // `http2`/`grpc` ports: HTTP/2 whatever the client spoke.
        assert_eq!(proto(Declared::Http2, &h1, false, &plain), Proto::Http2);
        // `http` ports: HTTP/1.1 unless gRPC or `h2UpgradePolicy: UPGRADE`.
        assert_eq!(proto(Declared::Http, &h2, false, &plain), Proto::Http1);
        assert_eq!(proto(Declared::Http, &h2, true, &plain), Proto::Http2);
        assert_eq!(proto(Declared::Http, &h1, false, &upgrade), Proto::Http2);
        // Sniffed ports keep the client's protocol.
        for declared in [Declared::Unknown, Declared::Opaque] {
            assert_eq!(proto(declared, &h1, false, &plain), Proto::Http1);
            assert_eq!(proto(declared, &h2, false, &plain), Proto::Http2);
            assert_eq!(proto(declared, &h1, true, &plain), Proto::Http2);
        }
    }

    /// A source-side connection of a proxy with an empty configuration, and its metrics.
    fn conn() -> (Arc<Conn>, Metrics) {
        let metrics = Metrics::new();
        let ctx = Arc::new(Context::new(
            ProxyConfig::new("n1", Ipv4Addr::LOCALHOST),
            Arc::new(Snapshot::default()),
            Arc::new(NoOriginalDst),
            &metrics,
            Default::default(),
            15006,
        ));
        let conn = Conn::outbound(
            ctx,
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40000),
            ObjectKey::new("bookinfo", "reviews"),
            9080,
            Declared::Http,
            None,
        );
        (Arc::new(conn), metrics)
    }

    fn report(conn: &Arc<Conn>, grpc: bool) -> Report {
        let mut request = Request::builder().uri("http://reviews:9080/reviews/1");
        if grpc {
            request = request.header(header::CONTENT_TYPE, "application/grpc");
        }
        let (parts, ()) = request.body(()).unwrap().into_parts();
        Report::new(conn.clone(), &parts, None, Instant::now())
    }

    /// The `istio_requests_total` series recorded so far.
    fn requests_total(metrics: &Metrics) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .map(str::to_owned)
            .collect()
    }

    async fn read(reply: Reply) -> (StatusCode, HeaderMap, Bytes) {
        let (head, body) = reply.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (head.status, head.headers, body)
    }

    #[tokio::test]
    async fn a_local_reply_is_plain_text_and_reported_with_its_flag() {
        let (conn, metrics) = conn();
        let reply = local_reply(
            report(&conn, false),
            StatusCode::NOT_FOUND,
            ResponseFlags::NR,
            "route not found",
        );
        let (status, headers, body) = read(reply).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(body, "route not found");
        let series = requests_total(&metrics);
        assert_eq!(series.len(), 1, "{series:?}");
        assert!(series[0].contains("response_code=\"404\""), "{}", series[0]);
        assert!(series[0].contains("response_flags=\"NR\""), "{}", series[0]);
        assert!(series[0].ends_with(" 1"), "{}", series[0]);
    }

    #[tokio::test]
    async fn a_local_reply_to_grpc_is_a_grpc_status() {
        let (conn, metrics) = conn();
        let reply = local_failure(report(&conn, true), NO_HEALTHY_UPSTREAM);
        let (status, headers, body) = read(reply).await;
        // gRPC clients read the status from the headers of a 200 (a trailers-only answer).
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["grpc-status"], "14", "503 is UNAVAILABLE");
        assert_eq!(headers["grpc-message"], "no healthy upstream");
        assert!(body.is_empty());
        let series = requests_total(&metrics);
        assert!(
            series[0].contains("grpc_response_status=\"14\""),
            "{}",
            series[0]
        );
        assert!(series[0].contains("response_flags=\"UH\""), "{}", series[0]);
    }

    #[tokio::test]
    async fn a_fault_abort_answers_the_configured_status_with_flag_fi() {
        let (conn, metrics) = conn();
        let (status, _, body) = read(fault_abort(
            report(&conn, false),
            AbortError::HttpStatus(418),
        ))
        .await;
        assert_eq!(status.as_u16(), 418);
        assert_eq!(body, "fault filter abort");
        let (status, headers, _) =
            read(fault_abort(report(&conn, true), AbortError::GrpcStatus(8))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["grpc-status"], "8");
        let series = requests_total(&metrics);
        assert_eq!(series.len(), 2, "{series:?}");
        assert!(
            series.iter().all(|s| s.contains("response_flags=\"FI\"")),
            "{series:?}"
        );
    }

    #[tokio::test]
    async fn a_request_the_client_abandons_before_the_answer_is_code_0_dc() {
        let (conn, metrics) = conn();
        drop(report(&conn, false));
        let series = requests_total(&metrics);
        assert_eq!(series.len(), 1, "{series:?}");
        assert!(series[0].contains("response_code=\"0\""), "{}", series[0]);
        assert!(series[0].contains("response_flags=\"DC\""), "{}", series[0]);
    }
}
