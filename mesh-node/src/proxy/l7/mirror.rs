//! Request mirroring (VirtualService `mirror`/`mirrors`, HTTPRoute `RequestMirror`): a copy
//! of the request to each mirror, whose answer nobody waits for.

use super::*;

/// Sends a copy of the request to each mirror, without waiting for or reporting the answer.
pub(super) fn mirror(
    conn: &Arc<Conn>,
    view: &View,
    mirrors: &[route::MirrorTarget],
    parts: &Parts,
    tape: Option<&Tape>,
) {
    for target in mirrors {
        if !chance(target.percentage) {
            continue;
        }
        let (Some(service_key), Some(body)) = (target.service.clone(), replay(tape)) else {
            continue;
        };
        let Some(service) = view.snapshot.services.get(&service_key) else {
            continue;
        };
        let port = target
            .port
            .or_else(|| service_port(service, conn.port))
            .unwrap_or(conn.port);
        let key = ClusterKey {
            service: service_key,
            port,
            subset: target.subset.clone(),
        };
        let Ok(resolved) = conn.cluster(view, key) else {
            continue;
        };
        let Some(pick) = resolved.cluster.pick(None, None, Instant::now()) else {
            continue;
        };

        let mut head = parts.clone();
        // Istio marks mirrored requests by suffixing the host with `-shadow`.
        if let Some(host) = head.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            if let Ok(shadow) = HeaderValue::from_str(&shadow_host(host)) {
                head.headers.insert(header::HOST, shadow);
            }
        }
        if let Some(authority) = head.uri.authority().map(|a| shadow_host(a.as_str())) {
            let mut uri = head.uri.clone().into_parts();
            uri.authority = authority.parse().ok();
            if let Ok(u) = Uri::from_parts(uri) {
                head.uri = u;
            }
        }
        let proto = if head.version == Version::HTTP_2 {
            Proto::Http2
        } else {
            Proto::Http1
        };
        let Ok(key) = conn.conn_key(view, &resolved.cluster, &pick, proto) else {
            continue;
        };
        // A pod of this node whose policies deny the copy does not get it.
        if conn.authorize_local(view, pick.addr, &head).is_err() {
            continue;
        }
        conn.set_forwarded_client_cert(&mut head.headers, pick.pod.as_deref());
        let conn = conn.clone();
        tokio::spawn(async move {
            let cluster = &resolved.cluster;
            let sent = resolved
                .pool
                .send(
                    cluster.state(),
                    cluster.policy(),
                    &key,
                    conn.dial(cluster.policy()),
                    Request::from_parts(head, body),
                )
                .await;
            if let Ok((response, _in_flight)) = sent {
                // Drain the answer so the connection can be reused.
                use http_body_util::BodyExt as _;
                let _ = response.into_body().collect().await;
            }
            drop(pick);
        });
    }
}

pub(super) fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_hosts_keep_the_port() {
        assert_eq!(shadow_host("reviews"), "reviews-shadow");
        assert_eq!(shadow_host("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(
            shadow_host("reviews.bookinfo.svc.cluster.local:9080"),
            "reviews.bookinfo.svc.cluster.local-shadow:9080"
        );
        assert_eq!(shadow_host("10.96.0.10:80"), "10.96.0.10-shadow:80");
    }
}
