//! Requests that switch protocols (WebSocket and other `Upgrade`s): sent alone on a fresh
//! connection; after `101 Switching Protocols` both sides are joined byte for byte, and when
//! both are plain TCP connections of this proxy a restart hands them to the next mesh-node.

use std::{
    pin::Pin,
    task::{Poll, Waker},
};

use hyper::upgrade::Upgraded;
use tokio::{io::ReadBuf, net::TcpStream};

use super::*;
use crate::{
    metrics::OverloadClose,
    proxy::{
        adopt::Direction,
        copy::{self, Copied, Lifetime, Paused},
        upstream::{Stream, Via},
    },
    sys,
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
        report.seen_by_destination = true;
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
    let (request_body, tape) = RequestBody::record(body, false);
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
    report.seen_by_destination = true;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        // The tunnel keeps the downstream connection's slot of its client address, and is
        // cut with its connections by the overload manager.
        let held = conn.clone();
        let cut = conn.held.as_ref().map(SourceConnection::cut_signal);
        let handover = Handover::of(&conn, &key);
        tokio::spawn(async move {
            let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
                debug!("protocol upgrade did not complete");
                return;
            };
            let joined = join(&held, TokioIo::new(down), TokioIo::new(up), handover);
            let cut = async move {
                match cut {
                    Some(cut) => cut.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = joined => if let Err(e) = joined {
                    debug!("upgraded connection ended: {e}");
                },
                () = cut => held.ctx.overload().metrics().closed(OverloadClose::Heaviest),
            }
            drop(pick);
            drop(held);
        });
    }
    let (head, upstream_body) = response.into_parts();
    report.saw_response(&head.headers);
    Response::from_parts(head, ResponseBody::upstream(upstream_body, report))
}

/// What the next mesh-node needs to carry on an upgraded connection whose two sides are plain
/// TCP connections of this proxy: a pod's connection to a pod of this node or outside the
/// mesh (one through a tunnel, or with TLS the proxy originates, ends with the drain).
struct Handover {
    /// The client's socket (owned by the upgraded connection).
    socket: RawFd,
    client: SocketAddrV4,
    dialled: SocketAddrV4,
    target: SocketAddrV4,
}

impl Handover {
    fn of(conn: &Conn, key: &ConnKey) -> Option<Self> {
        match (
            conn.client_socket,
            conn.dialled,
            &conn.inbound,
            key.via,
            &key.tls,
        ) {
            (Some(socket), Some(dialled), None, Via::Direct { .. }, None) => Some(Self {
                socket,
                client: conn.client,
                dialled,
                target: key.target,
            }),
            _ => None,
        }
    }
}

/// Joins the two sides of an upgraded connection until either ends; with `handover`, paused
/// between two reads when the proxy hands over, the sockets going to the next mesh-node with
/// what was read and not written yet, as an opaque connection's do ([`super::super::adopt`]).
async fn join(
    conn: &Conn,
    mut down: TokioIo<Upgraded>,
    mut up: TokioIo<Upgraded>,
    handover: Option<Handover>,
) -> Result<(), ProxyError> {
    let overload = Some(conn.ctx.overload());
    let Some(handover) = handover else {
        copy::bidirectional_with(&mut down, &mut up, &(), Lifetime::default(), overload).await?;
        return Ok(());
    };
    // The proxy's drain waits for the sockets to be handed on.
    let _drain = conn.ctx.hold_drain();
    // What hyper read past the heads is out of reach once the connection moves: taken now, so
    // that every byte not in the kernel is the copy's.
    let held = Paused {
        to_upstream: take_buffered(&mut down)?,
        to_downstream: take_buffered(&mut up)?,
        ..Paused::default()
    };
    let copied = copy::bidirectional_pausable(
        &mut down,
        &mut up,
        &(),
        Lifetime::default(),
        overload,
        &conn.ctx.handover,
        held,
    )
    .await?;
    let Copied::Paused(mut paused) = copied else {
        return Ok(());
    };
    let Some(successor) = conn.ctx.config.handovers.successor.get().cloned() else {
        return Ok(());
    };
    // Ours (hyper's downstream connection type is not named): a descriptor of the client's
    // socket, taken while the upgraded connection still holds it.
    let client = sys::dup_held(handover.socket).map_err(ProxyError::Socket)?;
    let other = |what: &str| ProxyError::Socket(std::io::Error::other(what.to_owned()));
    let parts = up
        .into_inner()
        .downcast::<TokioIo<Stream>>()
        .map_err(|_| other("an upgraded upstream of another type"))?;
    // Empty: an upgraded connection gives its buffer out first, and it was taken above.
    paused.to_downstream.extend_from_slice(&parts.read_buf);
    let Stream::Tcp(upstream) = parts.io.into_inner() else {
        return Err(other("an upgraded upstream that is no TCP connection"));
    };
    // Our descriptor of the client's socket closes; the copy above keeps the connection open.
    drop(down);
    let client =
        TcpStream::from_std(std::net::TcpStream::from(client)).map_err(ProxyError::Socket)?;
    successor
        .hand_over(
            Direction::Outbound,
            (handover.client, handover.dialled, handover.target),
            paused,
            client,
            upstream,
        )
        .await
        .map_err(ProxyError::Socket)
}

/// Largest amount `take_buffered` reads: more than hyper's read buffer holds.
const MAX_BUFFERED: usize = 1024 * 1024;

/// Everything `io` can give without waiting: first what hyper buffered past the head (an
/// upgraded connection returns it before anything of its socket), then what the socket has.
fn take_buffered(io: &mut TokioIo<Upgraded>) -> Result<Vec<u8>, ProxyError> {
    let mut taken = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut cx = std::task::Context::from_waker(Waker::noop());
    while taken.len() < MAX_BUFFERED {
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut *io).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => taken.extend_from_slice(buf.filled()),
            Poll::Ready(Err(e)) => return Err(ProxyError::Socket(e)),
            Poll::Pending => break,
        }
    }
    Ok(taken)
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

    /// What a client sends right behind its upgrade request, in the same write, is in hyper's
    /// buffer when the connection is upgraded: `take_buffered` gets it whole, in order, before
    /// what comes later from the socket, so nothing stays inside hyper when the sockets move.
    #[tokio::test]
    async fn bytes_behind_the_upgrade_head_are_taken_from_hyper_first() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (upgraded_tx, upgraded_rx) = tokio::sync::oneshot::channel();
        let upgraded_tx = Arc::new(Mutex::new(Some(upgraded_tx)));
        let service = service_fn(move |mut request: Request<Incoming>| {
            let upgraded_tx = upgraded_tx.clone();
            async move {
                let on = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    let upgraded = on.await.unwrap();
                    let tx = upgraded_tx.lock().unwrap().take().unwrap();
                    let _ = tx.send(upgraded);
                });
                let mut response = Response::new(http_body_util::Empty::<Bytes>::new());
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                response
                    .headers_mut()
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(server), service)
                .await;
        });
        client
            .write_all(
                b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nbehind the head",
            )
            .await
            .unwrap();
        let mut head = [0u8; 12];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
        let mut upgraded = TokioIo::new(upgraded_rx.await.unwrap());
        client.write_all(b", then more").await.unwrap();
        tokio::task::yield_now().await;
        let taken = take_buffered(&mut upgraded).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&taken),
            "behind the head, then more"
        );
        // Nothing left: the next read waits for the client.
        assert!(take_buffered(&mut upgraded).unwrap().is_empty());
    }

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
