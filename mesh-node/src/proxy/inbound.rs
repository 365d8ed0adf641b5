//! The destination side: connections for pods of this node, either steered to the inbound
//! listener (15006) by the TC program (plaintext from outside the mesh, refused where a
//! PeerAuthentication says STRICT), or arriving over HBONE (15008) from another node's proxy:
//! mTLS, then one HTTP/2 CONNECT stream per connection, the caller known by its certificate.
//! Both connect to the pod from the proxy address, so the pod sees the node proxy as its peer
//! and the connection is not captured again.

use std::{
    future::{poll_fn, Future},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    pin::Pin,
    sync::Arc,
    task::{self, Poll},
    time::Instant,
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use hyper::Request;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    authz,
    context::Context,
    copy::{Paused, Transferred},
    detect::{self, Declared, Rewind, Sniffed, SNIFF_TIMEOUT},
    error::ProxyError,
    l7, resume,
    sources::{Refused, SourceConnection},
    tcp::{self, v4},
    unless_cut,
    upstream::{
        hbone::{self, Refusal},
        ConnectErrorKind, Stream,
    },
};
use crate::{
    metrics::{
        MtlsRefusal, Reporter, ResponseFlags, ServiceLabels, TcpLabels, Workload, ACCESS_LOG,
    },
    model::{
        policy::{mtls_mode, MtlsMode, ROOT_NAMESPACE},
        ObjectKey, Pod, Service, Snapshot,
    },
    tls::{self, Authenticated},
};

/// Concurrent CONNECT streams one peer connection may carry.
const HBONE_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Largest header block taken from a peer (hyper's default).
const HBONE_MAX_HEADER_LIST: u32 = 16 * 1024;

/// A connection steered to 15006: its local address is the pod address the client dialled.
pub(super) async fn serve_captured(ctx: Arc<Context>, downstream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    let mut access = tcp::Log::default();
    let result = captured(&ctx, downstream, client, &mut access).await;
    access.write(&ctx, start, client, &result, |t| Some(*t));
    log("inbound", client, access.target, start, result);
}

/// A connection on 15008: mTLS from another node's proxy, then HBONE streams, each one
/// connection to a pod of this node.
pub(super) async fn serve_tunnel(ctx: Arc<Context>, stream: TcpStream, client: SocketAddr) {
    if let Err(e) = hbone_connection(&ctx, stream, client).await {
        let reason = match &e {
            ProxyError::Handshake { source, .. } => Some(handshake_refusal(source)),
            ProxyError::HandshakeTimeout { .. } => Some(MtlsRefusal::Handshake),
            ProxyError::NoPeerIdentity { .. } | ProxyError::ForeignTrustDomain { .. } => {
                Some(MtlsRefusal::Identity)
            }
            ProxyError::NoMtls | ProxyError::NoCertificate(_) => Some(MtlsRefusal::NoCertificate),
            ProxyError::Revoked { .. } => Some(MtlsRefusal::Revoked),
            // The connection was served; it ended badly.
            _ => None,
        };
        match reason {
            Some(reason) => {
                ctx.refusals.inc(reason);
                warn!(direction = "tunnel", %client, "HBONE connection refused: {e}");
            }
            None => debug!(direction = "tunnel", %client, "HBONE connection ended: {e}"),
        }
    }
}

fn log(
    direction: &'static str,
    client: SocketAddr,
    target: Option<SocketAddrV4>,
    start: Instant,
    result: Result<Transferred, ProxyError>,
) {
    let upstream = target.map(|t| t.to_string()).unwrap_or_default();
    let duration_ms = start.elapsed().as_millis() as u64;
    match result {
        Ok(t) => debug!(
            target: ACCESS_LOG,
            direction, %client, %upstream,
            received = t.to_upstream,
            sent = t.to_downstream,
            duration_ms,
            "connection closed"
        ),
        Err(ProxyError::Copy(e)) if e.is_reset() => debug!(
            target: ACCESS_LOG,
            direction, %client, %upstream,
            received = e.transferred.to_upstream,
            sent = e.transferred.to_downstream,
            duration_ms,
            "connection reset: {e}"
        ),
        Err(ProxyError::Denied { detail, .. }) => debug!(
            target: ACCESS_LOG,
            direction, %client, %upstream,
            connection_termination_details = %detail,
            duration_ms,
            "connection denied"
        ),
        Err(e) => {
            warn!(direction, %client, %upstream, duration_ms, "{direction} connection failed: {e}")
        }
    }
}

async fn captured(
    ctx: &Arc<Context>,
    downstream: TcpStream,
    client: SocketAddr,
    access: &mut tcp::Log,
) -> Result<Transferred, ProxyError> {
    let local = downstream.local_addr().map_err(ProxyError::Socket)?;
    let target = if local.port() == ctx.inbound_port {
        // Redirected to the listener's own address (a sidecar's REDIRECT rule): the capture
        // layer knows where the client was going. Without it, dialling `local` would loop.
        v4(client)
            .and_then(|c| ctx.original_dst.lookup(downstream.as_fd(), c))
            .ok_or(ProxyError::InboundLoop { client, local })?
    } else {
        v4(local).ok_or(ProxyError::NotIpv4 { client: local })?
    };
    access.target = Some(target);
    access.dialled = Some(target);

    let view = ctx.view();
    // Plaintext from outside the mesh: refused where a PeerAuthentication says STRICT. (The
    // benchmark's sidecar mode has no mTLS between sidecars: it does not enforce STRICT.)
    let enforced = !ctx.config.sidecar;
    if let Some(pod) = view.snapshot.pod_by_ip(*target.ip()).filter(|_| enforced) {
        let mode = mtls_mode(
            &view.snapshot.peer_authentications,
            &pod.key.namespace,
            &pod.labels,
            target.port(),
            ROOT_NAMESPACE,
        );
        if mode == MtlsMode::Strict {
            ctx.refusals.inc(MtlsRefusal::PlaintextStrict);
            return Err(ProxyError::PlaintextRefused {
                client,
                pod: pod.key.clone(),
                port: target.port(),
            });
        }
    }
    // A caller outside the mesh is `unknown`, as Istio reports a peer that exchanged no
    // metadata: nothing proves which workload an address of an unmeshed pod belongs to.
    let source = v4(client)
        .and_then(|c| view.snapshot.pod_by_ip(*c.ip()))
        .filter(|p| view.snapshot.is_meshed(p))
        .cloned();
    let labels = destination_labels(&view.snapshot, source.as_deref(), target);
    let http = Http::of(&view.snapshot, target);
    let pod = http.pod.clone();
    drop(view);
    // Steered here for a pod this configuration does not know (yet, or any more): whose
    // policies apply cannot be told, so nothing gets through (as ztunnel refuses unknown
    // workloads).
    if pod.is_none() && enforced {
        return Err(ProxyError::NotLocalPod {
            client,
            target,
            node: ctx.config.node.clone(),
        });
    }
    // Boxed, as every path here that only some connections take (see `outbound::proxy`).
    let caller = Caller {
        source,
        peer: None,
        held: &mut None,
    };
    let Some(mut downstream) =
        Box::pin(http.serve(ctx, downstream, client, target, caller)).await?
    else {
        return Ok(Transferred::default());
    };
    // Opaque TCP from here: the pod's server line, if it logs.
    access.access = server_access(ctx, pod.as_ref(), &labels);
    // Plaintext: only the client's address is known.
    let peer = authz::Peer::plaintext(client.ip());
    let sni = Box::pin(authz::sni_for(ctx, pod.as_ref(), &mut downstream)).await;
    authorize_connection(
        ctx,
        pod.as_ref(),
        target,
        &peer,
        client,
        sni.as_deref(),
        &labels,
    )?;
    let mut upstream = Box::pin(connect_pod(ctx, target, &labels)).await?;
    tcp::relay(
        ctx,
        &mut downstream,
        &mut upstream,
        ctx.metrics.connection(&labels),
        ctx.tcp_lifetime(),
    )
    .await
}

/// What the server line of an opaque connection to `pod` needs, while some workload logs.
fn server_access(
    ctx: &Context,
    pod: Option<&Arc<Pod>>,
    labels: &TcpLabels,
) -> Option<Box<tcp::Access>> {
    let pod = pod?;
    ctx.view().logs().then(|| {
        Box::new(tcp::Access {
            client: None,
            server: Some(pod.clone()),
            labels: labels.clone(),
            cluster: None,
        })
    })
}

/// A stream's lines in the Telemetry API's access logs and in the `weft::access` log.
fn finish(
    ctx: &Context,
    client: SocketAddr,
    target: SocketAddrV4,
    start: Instant,
    result: Result<Transferred, ProxyError>,
    access: Option<Box<tcp::Access>>,
) {
    let access = tcp::Log {
        dialled: Some(target),
        target: Some(target),
        via: None,
        access,
    };
    access.write(ctx, start, client, &result, |t| Some(*t));
    log("tunnel", client, Some(target), start, result);
}

/// Decides a TCP connection to `pod` against its AuthorizationPolicies, with the current
/// configuration, before the pod is dialled; a denied one is counted as opened and closed.
fn authorize_connection(
    ctx: &Context,
    pod: Option<&Arc<Pod>>,
    target: SocketAddrV4,
    peer: &authz::Peer,
    client: SocketAddr,
    sni: Option<&str>,
    labels: &TcpLabels,
) -> Result<(), ProxyError> {
    let Some(pod) = pod else {
        return Ok(());
    };
    let view = ctx.view();
    let target_of = authz::Target {
        pod,
        addr: target,
        sni,
    };
    authz::check(ctx, &view, target_of, peer, None).map_err(|denied| {
        tcp::record_failure(ctx, labels, ResponseFlags::NONE);
        ProxyError::Denied {
            client,
            pod: pod.key.clone(),
            target,
            detail: denied.detail,
        }
    })
}

/// Connects to `target`, a pod of this node, from the proxy address; a failure is counted.
async fn connect_pod(
    ctx: &Context,
    target: SocketAddrV4,
    labels: &TcpLabels,
) -> Result<Stream, ProxyError> {
    ctx.dialer
        .open(target, ctx.dialer.local(), None, None)
        .await
        .map_err(|e| {
            tcp::record_failure(ctx, labels, ResponseFlags::UF);
            e.into()
        })
}

/// What an operator should know of a failed handshake: plaintext, no certificate, a foreign
/// CA, an expired certificate, or something else.
fn handshake_refusal(error: &std::io::Error) -> MtlsRefusal {
    use rustls::{CertificateError, Error};
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::InvalidMessage(_) | Error::InappropriateMessage { .. }) => {
            MtlsRefusal::Plaintext
        }
        Some(Error::NoCertificatesPresented) => MtlsRefusal::NoClientCertificate,
        Some(Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => MtlsRefusal::UnknownCa,
        Some(Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        )) => MtlsRefusal::Expired,
        Some(Error::InvalidCertificate(CertificateError::Revoked)) => MtlsRefusal::Revoked,
        _ => MtlsRefusal::Handshake,
    }
}

/// The peer of an HBONE connection: who it is (certificate) and where it connects from.
#[derive(Debug)]
struct Peer {
    auth: Arc<Authenticated>,
    client: SocketAddr,
}

/// Terminates mTLS and serves the peer's CONNECT streams until it closes the connection.
async fn hbone_connection(
    ctx: &Arc<Context>,
    stream: TcpStream,
    client: SocketAddr,
) -> Result<(), ProxyError> {
    let certs = ctx.config.certs.as_ref().ok_or(ProxyError::NoMtls)?;
    // One deadline for everything before the peer is known: right after start the node's own
    // certificate may still be on its way, and a client must not hold a connection by
    // stalling its handshake.
    let timeout = ctx.config.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let handshake = async {
        let own = certs
            .issued(certs.own_identity())
            .await
            .map_err(ProxyError::NoCertificate)?;
        TlsAcceptor::from(own.server.clone())
            .accept(stream)
            .await
            .map_err(|source| ProxyError::Handshake { client, source })
    };
    let tls = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| ProxyError::HandshakeTimeout { client, timeout })??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(ProxyError::NoPeerIdentity {
            client,
            reason: "no client certificate".into(),
        })?;
    let no_identity = |e: tls::TlsError| ProxyError::NoPeerIdentity {
        client,
        reason: e.to_string(),
    };
    let auth = Authenticated::of(leaf).map_err(no_identity)?;
    let serial = tls::serial_of(leaf).map_err(no_identity)?;
    if auth.identity.trust_domain() != &*ctx.config.trust_domain {
        return Err(ProxyError::ForeignTrustDomain {
            client,
            identity: auth.identity,
        });
    }
    let peer = Arc::new(Peer {
        auth: Arc::new(auth),
        client,
    });
    let identity = peer.auth.identity.clone();
    let hbone = |source| ProxyError::Hbone { client, source };
    // The HTTP/2 preface within the same deadline: a peer that stalls gets no connection.
    let preface = h2::server::Builder::new()
        .initial_window_size(hbone::STREAM_WINDOW)
        .initial_connection_window_size(hbone::CONNECTION_WINDOW)
        .max_frame_size(hbone::MAX_FRAME)
        .max_concurrent_streams(HBONE_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(HBONE_MAX_HEADER_LIST)
        .handshake(tls);
    let mut connection = tokio::time::timeout_at(deadline, preface)
        .await
        .map_err(|_| ProxyError::HandshakeTimeout { client, timeout })?
        .map_err(hbone)?;
    // A certificate revoked while the connection is open ends it, and every stream on it.
    let mut revoked = certs.revoked();
    let mut watching = true;
    let mut goaway_sent = false;
    loop {
        tokio::select! {
            // The proxy drains: GOAWAY, so that the peer opens new streams on a new connection
            // (to this node's next mesh-node); the open streams finish here.
            () = ctx.draining.cancelled(), if !goaway_sent => {
                goaway_sent = true;
                connection.graceful_shutdown();
            }
            // Accepting also drives the connection: every stream's bytes move through it.
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    tokio::spawn(hbone_stream(ctx.clone(), peer.clone(), request, respond));
                }
                Some(Err(e)) => return Err(hbone(e)),
                // No more streams (after a GOAWAY): the open ones still move through the
                // connection until they end.
                None => {
                    return poll_fn(|cx| connection.poll_closed(cx))
                        .await
                        .map_err(hbone);
                }
            },
            changed = revoked.changed(), if watching => {
                // An error: the manager is gone, the proxy is stopping.
                watching = changed.is_ok();
                if watching && revoked.borrow().contains(&serial) {
                    return Err(ProxyError::Revoked { client, identity });
                }
            }
        }
    }
}

/// One CONNECT stream: checks the target, answers, then proxies the stream to the pod.
async fn hbone_stream(
    ctx: Arc<Context>,
    peer: Arc<Peer>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let client = peer.client;
    let target = match hbone::target_of(&request) {
        Ok(target) => target,
        Err(reason) => {
            warn!(direction = "tunnel", %client, identity = %peer.auth.identity, "bad HBONE request: {reason}");
            ctx.refusals.inc(MtlsRefusal::Target);
            return hbone::refuse(&mut respond, Refusal::BadRequest, &reason);
        }
    };
    match hbone::resume_token(&request) {
        Ok(None) => {}
        Ok(Some(token)) => {
            let token = token.to_owned();
            return Box::pin(resume_stream(ctx, peer, request, respond, target, token)).await;
        }
        Err(reason) => {
            warn!(direction = "tunnel", %client, identity = %peer.auth.identity, "bad HBONE request: {reason}");
            ctx.refusals.inc(MtlsRefusal::Target);
            return hbone::refuse(&mut respond, Refusal::BadRequest, &reason);
        }
    }
    let resumable = hbone::offers_resume(&request);
    let view = ctx.view();
    let snapshot = &view.snapshot;
    let node = &ctx.config.node;
    let sidecar = ctx.config.sidecar;
    let Some(pod) = local_pod(&ctx, snapshot, target) else {
        let error = ProxyError::NotLocalPod {
            client,
            target,
            node: node.clone(),
        };
        warn!(direction = "tunnel", identity = %peer.auth.identity, "{error}");
        ctx.refusals.inc(MtlsRefusal::Target);
        let reason = format!("{target} is not a meshed pod on node {node}");
        return hbone::refuse(&mut respond, Refusal::Forbidden, &reason);
    };
    let source = claimed_source(snapshot, &peer, hbone::forwarded_for(&request), sidecar);
    // A stream is a connection of the pod it comes from (of the peer node when unknown):
    // that pod's caps apply, and the overload manager refuses and cuts per pod, not per node.
    let from = source
        .as_ref()
        .and_then(|p| p.ip)
        .map_or(client.ip(), IpAddr::V4);
    let held = match ctx.sources.connect(from) {
        Ok(held) => held,
        Err(refused) => {
            let why = match refused {
                Refused::Cap => "too many connections from this client",
                Refused::Overload => "node proxy overloaded",
            };
            return hbone::refuse(&mut respond, Refusal::Unavailable, why);
        }
    };
    let cut = held.cut_signal();
    let labels = destination_labels(snapshot, source.as_deref(), target)
        .mutual_tls(&peer.auth.identity, &ctx.dialer.identity(&pod));
    let auth = Some(peer.auth.clone());
    let http = Http::of(snapshot, target);
    // The caller: the pod it claimed when its certificate covers it, else the peer node.
    let policy_peer = authz::Peer::authenticated(&peer.auth.identity, from);
    let start = Instant::now();

    // A policy on the TLS server name needs the client's first bytes: accept the stream first.
    let sni_first = authz::wants_sni(&view, &pod);
    drop(view);
    if sni_first
        || matches!(
            http.declared,
            Some(Declared::Http | Declared::Http2 | Declared::Unknown)
        )
    {
        // The pool dials the pod per request: accept the stream first.
        let Some(downstream) = hbone::accept(respond, request) else {
            return;
        };
        // A task of its own: this one, with the request's head, ends here.
        let overload = ctx.overload().clone();
        tokio::spawn(unless_cut(overload, cut, async move {
            let mut held = Some(held);
            let mut access = None;
            let result = async {
                let caller = Caller {
                    source,
                    peer: auth,
                    held: &mut held,
                };
                // Boxed: the relay below does not hold the HTTP path's state.
                let Some(mut downstream) =
                    Box::pin(http.serve(&ctx, downstream, client, target, caller)).await?
                else {
                    return Ok(Transferred::default());
                };
                // Sniffed as something else than HTTP (or opaque, accepted to read its SNI).
                access = server_access(&ctx, Some(&pod), &labels);
                let sni = Box::pin(authz::sni_for(&ctx, Some(&pod), &mut downstream)).await;
                authorize_connection(
                    &ctx,
                    Some(&pod),
                    target,
                    &policy_peer,
                    client,
                    sni.as_deref(),
                    &labels,
                )?;
                let mut upstream = Box::pin(connect_pod(&ctx, target, &labels)).await?;
                tcp::relay(
                    &ctx,
                    &mut downstream,
                    &mut upstream,
                    ctx.metrics.connection(&labels),
                    ctx.tcp_lifetime(),
                )
                .await
            }
            .await;
            finish(&ctx, client, target, start, result, access);
        }));
        return;
    }
    // Opaque TCP: decide and connect first, so a refusal can tell the source proxy why.
    let access = server_access(&ctx, Some(&pod), &labels);
    if let Err(e) = authorize_connection(
        &ctx,
        Some(&pod),
        target,
        &policy_peer,
        client,
        None,
        &labels,
    ) {
        finish(&ctx, client, target, start, Err(e), access);
        return hbone::refuse(&mut respond, Refusal::Forbidden, authz::DENIED_BODY);
    }
    // A stream the peer resets meanwhile needs no pod connection: stop dialling.
    let connecting = Box::pin(connect_pod(&ctx, target, &labels));
    let connected = tokio::select! {
        connected = connecting => connected,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(direction = "tunnel", %client, %target, "the peer reset the stream before it was answered");
            return;
        }
    };
    let upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            let timed_out = matches!(
                &e,
                ProxyError::Dial(d) if d.connect_error().is_some_and(|c| matches!(c.kind, ConnectErrorKind::Timeout(_)))
            );
            let refusal = if timed_out {
                Refusal::GatewayTimeout
            } else {
                Refusal::BadGateway
            };
            hbone::refuse(&mut respond, refusal, &e.to_string());
            finish(&ctx, client, target, start, Err(e), access);
            return;
        }
    };
    // A source that can resume the stream gets a token for it: a restart of either node
    // pauses the stream and carries it on ([`resume`]).
    let token = match (&upstream, resumable) {
        (Stream::Tcp(_), true) => Some(hbone::new_token()),
        _ => None,
    };
    let Some(mut downstream) = hbone::accept_with(respond, request, token.as_deref()) else {
        return;
    };
    let overload = ctx.overload().clone();
    let lifetime = ctx.tcp_lifetime();
    let end = End {
        client,
        target,
        start,
        access,
    };
    match (token, upstream) {
        (Some(token), Stream::Tcp(pod)) => {
            let mut parking = resume::Parking {
                token,
                identity: peer.auth.identity.clone(),
                target,
                source: from,
                slot: Some(held),
                metrics: None,
            };
            let conn = resume::connection_of(&ctx, &mut parking, &labels);
            // A stream that may pause hands its socket on before the proxy's drain ends.
            let drain = ctx.hold_drain();
            let relay = resume::relay_destination(
                ctx.clone(),
                downstream,
                pod,
                conn,
                lifetime,
                parking,
                Paused::default(),
            );
            tokio::spawn(unless_cut(overload, cut, end.after(ctx, drain, relay)));
        }
        (_, mut upstream) => {
            let conn = ctx.metrics.connection(&labels);
            tokio::spawn(unless_cut(overload, cut, async move {
                let relayed =
                    tcp::relay(&ctx, &mut downstream, &mut upstream, conn, lifetime).await;
                drop(held);
                end.write(&ctx, relayed);
            }));
        }
    }
}

/// How a stream to a pod ended, for its lines in the logs.
struct End {
    client: SocketAddr,
    target: SocketAddrV4,
    start: Instant,
    access: Option<Box<tcp::Access>>,
}

impl End {
    fn write(self, ctx: &Context, result: Result<Transferred, ProxyError>) {
        finish(
            ctx,
            self.client,
            self.target,
            self.start,
            result,
            self.access,
        );
    }

    /// `relay`, then how it ended written, holding the proxy's drain (`drain`) meanwhile:
    /// the task holds the relay and these few words, nothing else of the stream's set-up.
    fn after<F>(
        self,
        ctx: Arc<Context>,
        drain: Option<tokio::sync::watch::Receiver<()>>,
        relay: F,
    ) -> Logged<F> {
        Logged {
            relay,
            end: Some((self, ctx, drain)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A relay, and its lines in the logs once it ends. (A struct, not an `async fn`: an
    /// `async fn` would hold the relay twice, as its argument and as the future it awaits.)
    struct Logged<F> {
        #[pin]
        relay: F,
        end: Option<(End, Arc<Context>, Option<tokio::sync::watch::Receiver<()>>)>,
    }
}

impl<F: Future<Output = Result<Transferred, ProxyError>>> Future for Logged<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<()> {
        let this = self.project();
        let Poll::Ready(result) = this.relay.poll(cx) else {
            return Poll::Pending;
        };
        if let Some((end, ctx, drain)) = this.end.take() {
            drop(drain);
            end.write(&ctx, result);
        }
        Poll::Ready(())
    }
}

/// The pod at `target` when a stream may go to it: only meshed pods of this node (a sidecar:
/// its own pod). The tunnel must not become an open relay, neither to other addresses nor to
/// pods that never joined the mesh.
fn local_pod(ctx: &Context, snapshot: &Snapshot, target: SocketAddrV4) -> Option<Arc<Pod>> {
    let node = &ctx.config.node;
    snapshot
        .pod_by_ip(*target.ip())
        .filter(|p| match ctx.config.sidecar {
            true => p.ip == Some(ctx.dialer.proxy_ip),
            false => p.node.as_deref() == Some(&**node) && snapshot.is_meshed(p),
        })
        .cloned()
}

/// A stream that carries on a paused one: the pod's socket parked under `token` (here, or
/// handed over by the previous mesh-node), given only to the identity that opened the stream
/// and for the same target, and only while policy still allows the connection.
async fn resume_stream(
    ctx: Arc<Context>,
    peer: Arc<Peer>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    target: SocketAddrV4,
    token: String,
) {
    let client = peer.client;
    let identity = peer.auth.identity.clone();
    let start = Instant::now();
    // A source that gives up meanwhile (it resets the stream) must not take the socket: it
    // stays parked for the source's next try.
    let draining = ctx.draining.is_cancelled();
    let taken = tokio::select! {
        taken = ctx.parked.take(&token, &identity, target, draining) => taken,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let parked = match taken {
        Ok(parked) => parked,
        // A stream opened on this mesh-node's connection as it began to drain (before the
        // peer read its GOAWAY): the source tries again, and reaches the next one.
        Err(not @ resume::NotParked::HandingOver) => {
            debug!(direction = "tunnel", %client, %target, "{}", not.reason());
            return hbone::refuse(&mut respond, Refusal::Unavailable, not.reason());
        }
        Err(not) => {
            warn!(direction = "tunnel", %client, %identity, %target, "cannot resume a stream: {}", not.reason());
            ctx.refusals.inc(MtlsRefusal::Target);
            return hbone::refuse(&mut respond, Refusal::Gone, not.reason());
        }
    };
    // The caller is the one the stream was opened for, whatever this request claims.
    let from = parked.parking.source;
    let checked = {
        let view = ctx.view();
        let snapshot = &view.snapshot;
        let source = match from {
            IpAddr::V4(ip) => snapshot.pod_by_ip(ip),
            IpAddr::V6(_) => None,
        };
        local_pod(&ctx, snapshot, target).map(|pod| {
            let labels = destination_labels(snapshot, source.map(|p| &**p), target)
                .mutual_tls(&identity, &ctx.dialer.identity(&pod));
            (pod, labels)
        })
    };
    // The pod may have gone, or the policy changed, while the stream was paused: both are
    // decided again.
    let allowed = checked.filter(|(pod, labels)| {
        let policy_peer = authz::Peer::authenticated(&identity, from);
        let decided =
            authorize_connection(&ctx, Some(pod), target, &policy_peer, client, None, labels);
        decided
            .map_err(|e| log("tunnel", client, Some(target), start, Err(e)))
            .is_ok()
    });
    let Some((pod, labels)) = allowed else {
        parked.close();
        return hbone::refuse(&mut respond, Refusal::Forbidden, authz::DENIED_BODY);
    };
    let Some(downstream) = hbone::accept_with(respond, request, Some(&token)) else {
        ctx.parked.park(parked);
        return;
    };
    let overload = ctx.overload().clone();
    // The resumed part of the connection: the pod's server line says what it carried.
    let access = server_access(&ctx, Some(&pod), &labels);
    let resume::ParkedConn {
        mut parking,
        pod,
        held,
    } = parked;
    // Its source's slot, kept while parked (taken again, even over the cap, when the socket
    // came from the previous mesh-node: it was admitted before).
    parking.slot = parking.slot.or_else(|| ctx.sources.connect(from).ok());
    let cut = parking.slot.as_ref().map(SourceConnection::cut_signal);
    let conn = resume::connection_of(&ctx, &mut parking, &labels);
    let relay = resume::relay_destination(
        ctx.clone(),
        downstream,
        pod,
        conn,
        ctx.tcp_lifetime(),
        parking,
        held,
    );
    let end = End {
        client,
        target,
        start,
        access,
    };
    let relay = end.after(ctx.clone(), ctx.hold_drain(), relay);
    match cut {
        Some(cut) => tokio::spawn(unless_cut(overload, cut, relay)),
        None => tokio::spawn(relay),
    };
}

/// Who a connection to a pod comes from.
struct Caller<'a> {
    source: Option<Arc<Pod>>,
    /// Its identity, proved by mTLS (HBONE).
    peer: Option<Arc<Authenticated>>,
    /// Its slot in [`super::sources::Sources`], taken when the connection is served as HTTP
    /// (its requests then count there too).
    held: &'a mut Option<SourceConnection>,
}

/// The pod a peer says opened the stream, believed only when it is a pod of the
/// certificate's service account running on the node the connection comes from (between
/// sidecars: the pod the connection comes from).
fn claimed_source(
    snapshot: &Snapshot,
    peer: &Peer,
    claimed: Option<Ipv4Addr>,
    sidecar: bool,
) -> Option<Arc<Pod>> {
    let pod = snapshot.pod_by_ip(claimed?)?;
    let identity = &peer.auth.identity;
    let same_account = *pod.key.namespace == *identity.namespace()
        && *pod.service_account == *identity.service_account();
    let from_its_node = match sidecar {
        true => pod.ip.map(IpAddr::V4) == Some(peer.client.ip()),
        false => pod
            .node
            .as_ref()
            .and_then(|n| snapshot.nodes.get(n))
            .is_some_and(|n| IpAddr::V4(n.address) == peer.client.ip()),
    };
    if same_account && from_its_node {
        Some(pod.clone())
    } else {
        debug!(identity = %peer.auth.identity, claimed = %pod.key, "HBONE peer claims a pod its certificate does not cover; reported as unknown");
        None
    }
}

/// Whether a pod port speaks HTTP, by the Service port it backs.
struct Http {
    service: Option<ObjectKey>,
    /// `None`: not a port of a known Service; proxied as TCP.
    declared: Option<Declared>,
    pod: Option<Arc<Pod>>,
}

impl Http {
    fn of(snapshot: &Snapshot, target: SocketAddrV4) -> Self {
        let pod = snapshot.pod_by_ip(*target.ip()).cloned();
        let service = pod.as_ref().and_then(|p| service_of(snapshot, p, target));
        let declared = service.and_then(|s| {
            let endpoints = snapshot.endpoints.get(&s.key)?;
            let (port, _) = endpoints.by_port.iter().find(|(_, e)| {
                e.iter()
                    .any(|e| e.ip == *target.ip() && e.port == target.port())
            })?;
            s.ports.iter().find(|p| p.port == *port).map(Declared::of)
        });
        Self {
            service: service.map(|s| s.key.clone()),
            declared,
            pod,
        }
    }

    /// Serves the connection as HTTP when its port speaks it (declared, or sniffed when
    /// undeclared); otherwise hands back the stream, with any sniffed bytes, for TCP.
    async fn serve<S>(
        self,
        ctx: &Arc<Context>,
        mut downstream: S,
        client: SocketAddr,
        target: SocketAddrV4,
        caller: Caller<'_>,
    ) -> Result<Option<Rewind<S>>, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(declared) = self.declared else {
            return Ok(Some(Rewind::new(Bytes::new(), downstream)));
        };
        let mut sniffed = Bytes::new();
        let http = match declared {
            Declared::Http | Declared::Http2 => true,
            Declared::Opaque => false,
            Declared::Unknown => {
                let (verdict, bytes) = detect::sniff(&mut downstream, SNIFF_TIMEOUT)
                    .await
                    .map_err(ProxyError::Socket)?;
                sniffed = bytes;
                verdict != Sniffed::Opaque
            }
        };
        let downstream = Rewind::new(sniffed, downstream);
        if !http {
            return Ok(Some(downstream));
        }
        let client = v4(client).ok_or(ProxyError::NotIpv4 { client })?;
        let destination = l7::Destination {
            target,
            service: self.service,
            declared,
            pod: self.pod,
            peer: caller.peer,
        };
        let mut conn = l7::Conn::inbound(ctx.clone(), client, caller.source, destination);
        if let Some(held) = caller.held.take() {
            conn = conn.held_by(held);
        }
        l7::serve_inbound(conn, downstream).await;
        Ok(None)
    }
}

fn destination_labels(
    snapshot: &Snapshot,
    source: Option<&Pod>,
    target: SocketAddrV4,
) -> TcpLabels {
    let pod = snapshot.pod_by_ip(*target.ip());
    let service = pod.and_then(|p| service_of(snapshot, p, target));
    TcpLabels::new(
        Reporter::Destination,
        Workload::of_option(source),
        Workload::of_option(pod.map(|p| &**p)),
        ServiceLabels::of_option(service.map(|s| &**s)),
    )
}

/// The service `target` (an address of `pod`) is an endpoint of; the first by name when
/// several are.
fn service_of<'a>(
    snapshot: &'a Snapshot,
    pod: &Pod,
    target: SocketAddrV4,
) -> Option<&'a Arc<Service>> {
    snapshot
        .services
        .iter()
        .filter(|(key, _)| key.namespace == pod.key.namespace)
        .filter(|(key, _)| {
            snapshot.endpoints.get(*key).is_some_and(|e| {
                e.by_port
                    .values()
                    .flatten()
                    .any(|e| e.ip == *target.ip() && e.port == target.port())
            })
        })
        .min_by(|a, b| a.0.cmp(b.0))
        .map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        identity::{manager::testing::TestCa, Identity},
        metrics::Metrics,
        model::{Endpoint, Namespace, Protocol, ServiceEndpoints, ServicePort, TargetPort},
        proxy::{
            context::ProxyConfig,
            upstream::hbone::{Caller, HbonePool, HboneStream, TunnelError},
            NoOriginalDst,
        },
    };

    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    fn pod(namespace: &str, name: &str, ip: Ipv4Addr, node: &str) -> Pod {
        Pod {
            key: ObjectKey::new(namespace, name),
            uid: None,
            labels: [
                (
                    "app".to_string(),
                    name.split('-').next().unwrap().to_string(),
                ),
                ("version".to_string(), "v1".to_string()),
            ]
            .into(),
            annotations: Default::default(),
            node: Some(node.into()),
            ip: Some(ip),
            service_account: "default".into(),
            ports: vec![],
            controller: None,
        }
    }

    /// A Service port: (name, appProtocol, service port, target port).
    type Port<'a> = (Option<&'a str>, Option<&'a str>, u16, u16);

    /// Adds Service `namespace/name` whose ports all have `ip` as their endpoint.
    fn add_service(
        snapshot: &mut Snapshot,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        ports: &[Port<'_>],
    ) {
        let key = ObjectKey::new(namespace, name);
        let service = Service {
            key: key.clone(),
            cluster_ip: None,
            ports: ports
                .iter()
                .map(|(name, app, port, target)| ServicePort {
                    name: name.map(Into::into),
                    port: *port,
                    target_port: TargetPort::Number(*target),
                    protocol: Protocol::Tcp,
                    app_protocol: app.map(Into::into),
                })
                .collect(),
            selector: None,
            entry: None,
        };
        let by_port = ports
            .iter()
            .map(|(_, _, port, target)| {
                let endpoint = Endpoint {
                    ip,
                    port: *target,
                    pod: None,
                    node: None,
                    ready: true,
                };
                (*port, vec![endpoint])
            })
            .collect::<BTreeMap<_, _>>();
        snapshot.services.insert(key.clone(), Arc::new(service));
        snapshot
            .endpoints
            .insert(key, Arc::new(ServiceEndpoints { by_port }));
    }

    fn add_pod(snapshot: &mut Snapshot, pod: Pod) {
        snapshot.pods.insert(pod.key.clone(), Arc::new(pod));
        snapshot.index();
    }

    /// Labels `namespace` into the mesh.
    fn mesh(snapshot: &mut Snapshot, namespace: &str) {
        snapshot.namespaces.insert(
            namespace.into(),
            Namespace {
                name: namespace.into(),
                labels: [("weft.io/mesh".to_string(), "enabled".to_string())].into(),
            },
        );
    }

    /// bookinfo/reviews-v1 at [`POD_IP`], behind Service reviews with `ports`.
    fn reviews(ports: &[Port<'_>]) -> Snapshot {
        let mut snapshot = Snapshot::default();
        add_service(&mut snapshot, "bookinfo", "reviews", POD_IP, ports);
        add_pod(&mut snapshot, pod("bookinfo", "reviews-v1", POD_IP, "n1"));
        snapshot
    }

    fn at(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(POD_IP, port)
    }

    #[test]
    fn a_pod_port_speaks_what_the_service_port_it_backs_declares() {
        let snapshot = reviews(&[
            (Some("http"), None, 9080, 9080),
            // The service port, not the pod port, names the protocol.
            (Some("grpc-api"), None, 7070, 9090),
            (Some("tcp-admin"), None, 8000, 8000),
            (Some("tcp"), Some("kubernetes.io/h2c"), 8443, 8443),
            (None, None, 6000, 6000),
        ]);
        let declared = |port| Http::of(&snapshot, at(port)).declared;
        assert_eq!(declared(9080), Some(Declared::Http));
        assert_eq!(declared(9090), Some(Declared::Http2));
        assert_eq!(declared(8000), Some(Declared::Opaque));
        assert_eq!(
            declared(8443),
            Some(Declared::Http2),
            "appProtocol wins over the name"
        );
        assert_eq!(
            declared(6000),
            Some(Declared::Unknown),
            "undeclared: sniffed"
        );

        let http = Http::of(&snapshot, at(9080));
        assert_eq!(http.service, Some(ObjectKey::new("bookinfo", "reviews")));
        assert_eq!(
            http.pod.unwrap().key,
            ObjectKey::new("bookinfo", "reviews-v1")
        );
    }

    #[test]
    fn unknown_targets_are_tcp() {
        let snapshot = reviews(&[(Some("http"), None, 9080, 9080)]);
        // Not a pod of the configuration.
        let stranger = Http::of(
            &snapshot,
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 9, 9), 9080),
        );
        assert_eq!(stranger.declared, None);
        assert_eq!(stranger.service, None);
        assert!(stranger.pod.is_none());
        // A pod, on a port no Service exposes.
        let unexposed = Http::of(&snapshot, at(22));
        assert_eq!(unexposed.declared, None);
        assert_eq!(unexposed.service, None);
        assert!(unexposed.pod.is_some());
    }

    #[test]
    fn of_several_services_backed_by_the_target_the_first_by_name_applies() {
        // a-reviews declares HTTP, b-reviews TCP; both list the pod's port.
        let services = [("a-reviews", "http"), ("b-reviews", "tcp")];
        for order in [[0, 1], [1, 0]] {
            let mut snapshot = Snapshot::default();
            // Whichever is added first, the choice is by name.
            for i in order {
                let (name, protocol) = services[i];
                add_service(
                    &mut snapshot,
                    "bookinfo",
                    name,
                    POD_IP,
                    &[(Some(protocol), None, 80, 9080)],
                );
            }
            add_pod(&mut snapshot, pod("bookinfo", "reviews-v1", POD_IP, "n1"));
            let pod = snapshot.pod_by_ip(POD_IP).unwrap().clone();
            let service = service_of(&snapshot, &pod, at(9080)).unwrap();
            assert_eq!(service.key, ObjectKey::new("bookinfo", "a-reviews"));
            let http = Http::of(&snapshot, at(9080));
            assert_eq!(http.service, Some(ObjectKey::new("bookinfo", "a-reviews")));
            assert_eq!(http.declared, Some(Declared::Http), "a-reviews says http");
        }
    }

    #[test]
    fn services_of_other_namespaces_do_not_claim_a_pod() {
        let mut snapshot = Snapshot::default();
        // An EndpointSlice elsewhere that lists the pod's address.
        add_service(
            &mut snapshot,
            "other",
            "aaa",
            POD_IP,
            &[(Some("http"), None, 80, 9080)],
        );
        add_pod(&mut snapshot, pod("bookinfo", "reviews-v1", POD_IP, "n1"));
        let http = Http::of(&snapshot, at(9080));
        assert_eq!(http.service, None);
        assert_eq!(http.declared, None);
    }

    #[test]
    fn destination_labels_name_the_pod_its_service_and_the_caller() {
        let mut snapshot = reviews(&[(Some("http"), None, 9080, 9080)]);
        let caller = pod(
            "bookinfo",
            "productpage-v1",
            Ipv4Addr::new(10, 244, 1, 20),
            "n1",
        );
        add_pod(&mut snapshot, caller.clone());
        let labels = destination_labels(&snapshot, Some(&caller), at(9080));
        assert_eq!(labels.reporter, Reporter::Destination);
        assert_eq!(labels.destination_workload.as_str(), "reviews-v1");
        assert_eq!(labels.destination_canonical_service.as_str(), "reviews");
        assert_eq!(labels.destination_canonical_revision.as_str(), "v1");
        assert_eq!(labels.destination_workload_namespace.as_str(), "bookinfo");
        assert_eq!(
            labels.destination_service.as_str(),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(labels.source_workload.as_str(), "productpage-v1");
        assert_eq!(labels.source_canonical_service.as_str(), "productpage");

        let unknown = destination_labels(&snapshot, None, at(22));
        assert_eq!(unknown.destination_workload.as_str(), "reviews-v1");
        assert_eq!(unknown.destination_service.as_str(), "unknown");
        assert_eq!(unknown.source_workload.as_str(), "unknown");
    }

    /// A proxy on node n1 whose configuration is `snapshot`, with certificates of `ca`.
    fn context(snapshot: Snapshot, ca: &TestCa) -> Arc<Context> {
        let mut config = ProxyConfig::new("n1", Ipv4Addr::LOCALHOST);
        config.certs = Some(ca.certs());
        Arc::new(Context::new(
            config,
            Arc::new(snapshot),
            Arc::new(NoOriginalDst),
            &Metrics::new(),
            Default::default(),
            15006,
        ))
    }

    /// Asks the tunnel listener of `ctx` for `target` as a pod of bookinfo/default on another
    /// node: what the client and the listener saw.
    async fn ask_tunnel(
        ctx: Arc<Context>,
        ca: &TestCa,
        target: SocketAddrV4,
    ) -> Result<HboneStream, TunnelError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        tokio::spawn(async move {
            let (stream, client) = listener.accept().await.unwrap();
            let _ = hbone_connection(&ctx, stream, client).await;
        });
        let caller = Caller {
            identity: Identity::new("cluster.local", "bookinfo", "default"),
            ip: Ipv4Addr::new(10, 244, 2, 20),
        };
        let pool = HbonePool::new(ca.certs());
        tokio::time::timeout(
            Duration::from_secs(10),
            pool.connect(&caller, None, addr, target, Duration::from_secs(5), None),
        )
        .await
        .expect("the tunnel listener answered")
    }

    #[tokio::test]
    async fn a_peer_that_never_sends_the_http2_preface_is_dropped_at_the_handshake_deadline() {
        let ca = TestCa::new();
        let mut config = ProxyConfig::new("n1", Ipv4Addr::LOCALHOST);
        config.certs = Some(ca.certs());
        config.handshake_timeout = Duration::from_millis(300);
        let ctx = Arc::new(Context::new(
            config,
            Arc::new(Snapshot::default()),
            Arc::new(NoOriginalDst),
            &Metrics::new(),
            Default::default(),
            15006,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (stream, client) = listener.accept().await.unwrap();
            hbone_connection(&ctx, stream, client).await
        });
        // A meshed peer: a valid certificate, the TLS handshake done, then nothing.
        let identity = Identity::new("cluster.local", "bookinfo", "default");
        let issued = ca.certs().issued(&identity).await.unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let tls = tokio_rustls::TlsConnector::from(issued.client.clone())
            .connect(name, tcp)
            .await
            .expect("the TLS handshake completes");
        let ended = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the listener gave up on the silent peer")
            .unwrap();
        assert!(
            matches!(ended, Err(ProxyError::HandshakeTimeout { .. })),
            "{ended:?}"
        );
        // The peer was connected all along.
        drop(tls);
    }

    fn refused_with(client: &Result<HboneStream, TunnelError>) -> Option<u16> {
        match client {
            Err(TunnelError::Refused { status, .. }) => Some(*status),
            _ => None,
        }
    }

    #[tokio::test]
    async fn the_tunnel_refuses_targets_that_are_not_pods_of_this_node() {
        let mut snapshot = Snapshot::default();
        mesh(&mut snapshot, "bookinfo");
        let remote = Ipv4Addr::new(10, 244, 2, 9);
        add_pod(&mut snapshot, pod("bookinfo", "ratings-v1", remote, "n2"));
        // A pod of this node whose namespace never joined the mesh.
        let unmeshed = Ipv4Addr::new(10, 244, 1, 30);
        add_pod(&mut snapshot, pod("legacy", "db-0", unmeshed, "n1"));
        let ca = TestCa::new();
        let ctx = context(snapshot, &ca);
        for target in [
            SocketAddrV4::new(remote, 9080),
            // Not a pod at all: the tunnel is no open relay.
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 443),
            // Nor a way into pods outside the mesh.
            SocketAddrV4::new(unmeshed, 5432),
        ] {
            let client = ask_tunnel(ctx.clone(), &ca, target).await;
            assert_eq!(
                refused_with(&client),
                Some(403),
                "{target}: {:?}",
                client.err()
            );
        }
    }

    /// data/db-0, a meshed pod of this node at 127.0.0.1, behind Service db's opaque TCP
    /// port 5432 → `port`.
    fn database(port: u16) -> Snapshot {
        let mut snapshot = Snapshot::default();
        add_service(
            &mut snapshot,
            "data",
            "db",
            Ipv4Addr::LOCALHOST,
            &[(Some("tcp-postgres"), None, 5432, port)],
        );
        mesh(&mut snapshot, "data");
        add_pod(
            &mut snapshot,
            pod("data", "db-0", Ipv4Addr::LOCALHOST, "n1"),
        );
        snapshot
    }

    #[tokio::test]
    async fn the_tunnel_refuses_a_tcp_connection_the_pods_policies_deny() {
        use crate::model::policy::{AuthorizationPolicy, AuthzAction, AuthzRule, Source};
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = server.accept().await {
                drop(stream);
            }
        });
        let mut snapshot = database(port);
        let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let ca = TestCa::new();
        // The control: no policy, the stream is accepted.
        let open = ask_tunnel(context(snapshot.clone(), &ca), &ca, target).await;
        assert!(open.is_ok(), "{:?}", open.err());

        // Only bookinfo/admin may connect; the caller is bookinfo/default.
        let key = ObjectKey::new("data", "admins-only");
        let only_admin = AuthorizationPolicy {
            key: key.clone(),
            selector: None,
            target_refs: Arc::from([]),
            action: AuthzAction::Allow,
            provider: None,
            rules: Arc::from([AuthzRule {
                from: Arc::from([Source {
                    principals: Arc::from([Arc::from("cluster.local/ns/bookinfo/sa/admin")]),
                    ..Default::default()
                }]),
                ..Default::default()
            }]),
            dry_run: false,
        };
        snapshot
            .authorization_policies
            .insert(key, Arc::new(only_admin));
        let ctx = context(snapshot, &ca);
        let denied = ask_tunnel(ctx.clone(), &ca, target).await;
        assert_eq!(refused_with(&denied), Some(403), "{:?}", denied.err());
        let counted = ctx
            .authz
            .get("ALLOW", None, crate::metrics::AuthzResult::Denied);
        assert_eq!(counted, 1, "the denial is counted once");
    }

    #[tokio::test]
    async fn the_tunnel_refuses_an_opaque_port_nothing_listens_on_with_502() {
        // A port that was just free: nothing listens there.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let snapshot = database(closed);
        let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, closed);
        let ca = TestCa::new();
        let client = ask_tunnel(context(snapshot, &ca), &ca, target).await;
        assert_eq!(refused_with(&client), Some(502), "{:?}", client.err());
        let Err(TunnelError::Refused { reason, .. }) = client else {
            unreachable!()
        };
        assert!(reason.contains("refused the connection"), "{reason}");
    }
}
