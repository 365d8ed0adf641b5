//! Requests that switch protocols (WebSocket and other `Upgrade`s): sent alone on a fresh
//! connection; after `101 Switching Protocols` both sides are joined byte for byte.

use super::*;
use crate::{
    metrics::OverloadClose,
    proxy::copy::{self, Lifetime},
};

/// A request that switches protocols (WebSocket): sent alone on a fresh connection; after
/// `101` both sides are joined byte for byte.
pub(super) async fn forward_upgrade(
    mut report: Report,
    view: &View,
    resolved: &Resolved,
    parts: Parts,
    body: Incoming,
    downstream: hyper::upgrade::OnUpgrade,
) -> Reply {
    let conn = report.conn.clone();
    let cluster = &resolved.cluster;
    let hash = cluster.request_hash(&parts.headers, &parts.uri, *conn.client.ip());
    let Some(pick) = conn.pick(cluster, hash, None) else {
        return local_failure(report, NO_HEALTHY_UPSTREAM);
    };
    let Ok(key) = conn.conn_key(view, cluster, &pick, Proto::Http1) else {
        return local_failure(report, NO_HEALTHY_UPSTREAM);
    };
    report.upstream = Some(pick.addr);
    report.destination = pick.pod.clone();
    if let Err(denied) = conn.authorize_local(view, pick.addr, &parts) {
        return denied_reply(report, denied);
    }
    send_upgrade(report, key, parts, body, downstream, Some(pick)).await
}

/// Sends an upgrade request on its own connection and, after `101`, joins both sides.
pub(super) async fn send_upgrade(
    mut report: Report,
    key: ConnKey,
    mut parts: Parts,
    body: Incoming,
    downstream: hyper::upgrade::OnUpgrade,
    pick: Option<Pick>,
) -> Reply {
    let conn = report.conn.clone();
    let mut sender = match pool::upgrade_connection(&key, conn.dial(&ClusterPolicy::default()))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            debug!("{e}");
            return local_reply(report, StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UF, "upstream connect error or disconnect/reset before headers. reset reason: connection failure");
        }
    };
    conn.set_forwarded_client_cert(
        &mut parts.headers,
        pick.as_ref().and_then(|p| p.pod.as_deref()),
    );
    // Origin form: the upgrade goes to an HTTP/1.1 server, with the host that routes and
    // policies saw (an absolute form's authority wins over `Host`, as in `prepare_head`).
    if let Some(authority) = parts.uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
    }
    if let Some(pq) = parts.uri.path_and_query() {
        parts.uri = Uri::from(pq.clone());
    }
    let (request_body, tape) = RequestBody::record(body);
    report.tape = tape;
    let mut response = match sender
        .send_request(Request::from_parts(parts, request_body))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            debug!("upgrade request failed: {e}");
            return local_reply(
                report,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::UR,
                "upstream reset before headers",
            );
        }
    };
    report.status = response.status().as_u16();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        // The tunnel keeps the downstream connection's slot of its client address, and is
        // cut with its connections by the overload manager.
        let held = conn.clone();
        let cut = conn.held.as_ref().map(SourceConnection::cut_signal);
        tokio::spawn(async move {
            let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
                debug!("protocol upgrade did not complete");
                return;
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            let copied = copy::bidirectional_with(
                &mut down,
                &mut up,
                &(),
                Lifetime::default(),
                Some(held.ctx.overload()),
            );
            let cut = async move {
                match cut {
                    Some(cut) => cut.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                copied = copied => if let Err(e) = copied {
                    debug!("upgraded connection ended: {e}");
                },
                () = cut => held.ctx.overload().metrics().closed(OverloadClose::Heaviest),
            }
            drop(pick);
            drop(held);
        });
    }
    let (head, upstream_body) = response.into_parts();
    Response::from_parts(head, ResponseBody::upstream(upstream_body, report))
}

/// Removes an HTTP/1.1 upgrade to cleartext HTTP/2 (`Upgrade: h2c` with `HTTP2-Settings`), as
/// Envoy does: passed on, it would turn the connection into a pipe no rule or policy sees. The
/// request goes on as plain HTTP/1.1; other upgrades (WebSocket) are left alone.
pub(super) fn strip_h2c_upgrade(headers: &mut HeaderMap) {
    // Read as bytes: a value with a byte outside ASCII must not hide an `h2c` token.
    let h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(b"h2c")));
    if !h2c {
        headers.remove(HTTP2_SETTINGS);
        return;
    }
    headers.remove(header::UPGRADE);
    headers.remove(HTTP2_SETTINGS);
    let kept: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::CONNECTION);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(header::CONNECTION, value);
        }
    }
}

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
}

pub(super) fn is_upgrade(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(b"upgrade")))
}

/// Whether an upgrade asks for WebSocket, the one upgrade Istio's proxies accept (Envoy's
/// `upgrade_configs`); any other is refused before routing, so no stream the mesh cannot read
/// as HTTP passes its routes and policies.
pub(super) fn is_websocket(parts: &Parts) -> bool {
    let mut upgrades = parts.headers.get_all(header::UPGRADE).iter();
    matches!(
        (upgrades.next(), upgrades.next()),
        (Some(value), None) if value.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_h2c_upgrade_is_removed_and_other_upgrades_kept() {
        let strip = |headers: &[(&str, &str)]| {
            let mut parts = head(Version::HTTP_11, headers);
            strip_h2c_upgrade(&mut parts.headers);
            let mut left: Vec<_> = parts
                .headers
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect();
            left.sort();
            left
        };
        assert_eq!(
            strip(&[
                ("connection", "Upgrade, HTTP2-Settings, keep-alive"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
                ("x-kept", "1"),
            ]),
            ["connection: keep-alive", "x-kept: 1"]
        );
        assert_eq!(
            strip(&[("connection", "upgrade"), ("upgrade", "websocket")]),
            ["connection: upgrade", "upgrade: websocket"]
        );
        // A stray HTTP2-Settings never reaches a backend.
        assert_eq!(strip(&[("http2-settings", "AAA")]), Vec::<String>::new());

        // A byte outside ASCII in the value does not hide the token.
        let mut parts = head(Version::HTTP_11, &[("connection", "upgrade")]);
        parts.headers.insert(
            header::UPGRADE,
            HeaderValue::from_bytes(b"h2c, x\xff").unwrap(),
        );
        strip_h2c_upgrade(&mut parts.headers);
        assert!(!parts.headers.contains_key(header::UPGRADE));
    }

    fn head(version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().version(version).uri("/chat");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn an_upgrade_needs_upgrade_and_connection_upgrade_on_http1() {
        let websocket = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert!(is_upgrade(&head(Version::HTTP_11, &websocket)));
        assert!(
            !is_upgrade(&head(Version::HTTP_2, &websocket)),
            "HTTP/2 has no Upgrade"
        );
        assert!(!is_upgrade(&head(
            Version::HTTP_11,
            &[("upgrade", "websocket")]
        )));
        assert!(!is_upgrade(&head(
            Version::HTTP_11,
            &[("connection", "upgrade")]
        )));
        assert!(!is_upgrade(&head(Version::HTTP_11, &[])));
    }

    #[test]
    fn only_websocket_upgrades_are_accepted() {
        let upgrade = |value: &[&str]| {
            let mut headers = vec![("connection", "upgrade")];
            headers.extend(value.iter().map(|v| ("upgrade", *v)));
            is_websocket(&head(Version::HTTP_11, &headers))
        };
        assert!(upgrade(&["websocket"]));
        assert!(upgrade(&["WebSocket"]));
        assert!(!upgrade(&["tcp"]));
        assert!(!upgrade(&["websocket, tcp"]));
        assert!(
            !upgrade(&["websocket", "tcp"]),
            "a second value is no websocket"
        );
    }
}
