//! Opaque TCP across nodes through a restart of either node proxy.
//!
//! Across nodes a connection has three legs: the client pod's socket at its node's proxy (the
//! source), an HBONE stream between the two node proxies, and the destination proxy's socket to
//! the server pod. A restart hands a node's local sockets to the next mesh-node
//! ([`super::adopt`]), but the HBONE stream (TLS and HTTP/2 state inside the process) cannot
//! follow. So the two proxies pause the stream between them, and the source opens a new one
//! that carries on:
//!
//! 1. A source that can resume says so in its `CONNECT` (`weft-resumable: 1`); a destination
//!    that relays the stream as opaque TCP answers with a token (`weft-resume-token`, 128
//!    random bits).
//! 2. The proxy that restarts pauses its relay between two reads, writes out what it holds
//!    and ends its side of the stream with a `weft-paused` trailer, the bytes it wrote on the
//!    stream. The other side pauses too (no more reads from its pod), writes out what it holds
//!    and answers with its own trailer. Each checks that what arrived is what the other says
//!    it sent: nothing is in flight any more, nothing is lost or doubled.
//! 3. The destination's pod socket waits, parked under the token: in the destination itself
//!    when the source restarts, in the destination's successor when the destination restarts
//!    (it goes over with the handover). The client's socket stays with the source, or goes to
//!    the source's successor.
//! 4. The source (or its successor) opens a new stream to the destination node with
//!    `weft-resume: <token>`. The destination gives it the parked socket only when it comes
//!    with the identity the stream was opened with, for the same target, and while policy
//!    still allows the connection; it answers with the token (a source that gets no token
//!    back reached a proxy that dialled the pod afresh, and writes nothing to it). Both
//!    relays carry on, the held bytes first.
//!
//! A stream that cannot be paused (the peer does not answer within [`PAUSE_ANSWER`], or the
//! counts differ) or resumed (nothing comes for a parked socket within [`PARK_TIMEOUT`]) is
//! closed with a reset on both sockets, never with a clean end the application would take for
//! its peer's.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    adopt::Successor,
    context::Context,
    copy::{self, Copied, Lifetime, Paused, Transferred},
    error::ProxyError,
    sources::SourceConnection,
    upstream::hbone::{Caller, H2Io, HboneStream, TunnelError},
};
use crate::{
    identity::Identity,
    metrics::{ConnectionMetrics, TcpLabels},
};

/// How long one side waits for the other to answer its pause.
pub const PAUSE_ANSWER: Duration = Duration::from_secs(2);
/// How long a parked pod socket waits for the stream that resumes it.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a source keeps trying to resume at the destination node.
const RESUME_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a resuming stream waits for its parked socket (still on its way from the
/// destination's predecessor).
const PARKED_WAIT: Duration = Duration::from_secs(5);
/// Parked sockets at most; over that, a paused stream is closed.
const MAX_PARKED: usize = 10_000;
/// Parked sockets of one source at most: one pod cannot take the node's whole table.
const MAX_PARKED_PER_SOURCE: usize = 1_000;
/// A destination that pauses a stream within [`QUICK_PAUSE`] of resuming it, more than
/// [`MAX_QUICK_PAUSES`] times in a row, is not followed any further.
const QUICK_PAUSE: Duration = Duration::from_secs(1);
const MAX_QUICK_PAUSES: u32 = 10;

/// Closes a socket with a reset: the application must not take the end for its peer's.
pub(super) fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// A pod socket waiting for the stream that resumes it.
#[derive(Debug)]
pub(super) struct ParkedConn {
    pub parking: Parking,
    pub pod: TcpStream,
    /// `to_upstream` for the pod, `to_downstream` for the stream.
    pub held: Paused,
}

impl ParkedConn {
    /// Closes the pod's socket with a reset, counting the connection closed.
    pub(super) fn close(self) {
        if let Some(metrics) = &self.parking.metrics {
            metrics.closed();
        }
        reset(self.pod);
    }
}

/// Why a resuming stream gets no parked socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NotParked {
    /// Parked for another caller or target (it stays, for its owner).
    Other,
    /// Nothing parked under the token arrived in time.
    Unknown,
    /// This mesh-node hands over: the next one has (or will have) the socket.
    HandingOver,
}

impl NotParked {
    pub(super) fn reason(self) -> &'static str {
        match self {
            NotParked::Other => "the paused stream belongs to another caller",
            NotParked::Unknown => "no paused stream has this token",
            NotParked::HandingOver => "this node proxy hands over: resume at the next one",
        }
    }
}

/// Parked pod sockets by token.
#[derive(Debug, Default)]
pub(crate) struct Parked {
    conns: Mutex<Table>,
    arrived: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Table {
    /// By token, with the number of its parking (only that parking's timer may close it).
    conns: HashMap<String, (u64, ParkedConn)>,
    by_source: HashMap<IpAddr, usize>,
    parkings: u64,
}

impl Table {
    fn remove(&mut self, token: &str) -> Option<(u64, ParkedConn)> {
        let removed = self.conns.remove(token)?;
        let source = removed.1.parking.source;
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
        Some(removed)
    }
}

impl Parked {
    /// Parks `conn` under `token` for [`PARK_TIMEOUT`]; then it is reset.
    pub(super) fn park(self: &Arc<Self>, conn: ParkedConn) {
        let token = conn.parking.token.clone();
        let parking = {
            let mut table = self.conns.lock().expect("parked sockets poisoned");
            let source = conn.parking.source;
            let of_source = table.by_source.get(&source).copied().unwrap_or(0);
            if table.conns.len() >= MAX_PARKED || of_source >= MAX_PARKED_PER_SOURCE {
                drop(table);
                warn!(target = %conn.parking.target, %source, "too many connections wait to be resumed ({MAX_PARKED} at most, {MAX_PARKED_PER_SOURCE} of one source): closing one more");
                conn.close();
                return;
            }
            table.parkings += 1;
            let parking = table.parkings;
            *table.by_source.entry(source).or_default() += 1;
            if let Some((_, replaced)) = table.conns.insert(token.clone(), (parking, conn)) {
                // Tokens are random: only a broken peer names one twice.
                drop(table);
                replaced.close();
            }
            parking
        };
        self.arrived.notify_waiters();
        let parked = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PARK_TIMEOUT).await;
            let expired = {
                let mut table = parked.conns.lock().expect("parked sockets poisoned");
                match table.conns.get(&token) {
                    Some((p, _)) if *p == parking => table.remove(&token),
                    _ => None,
                }
            };
            if let Some((_, conn)) = expired {
                let Parking {
                    target, identity, ..
                } = &conn.parking;
                warn!(%target, %identity, "a paused connection was not resumed within {PARK_TIMEOUT:?}: closed");
                conn.close();
            }
        });
    }

    /// The socket parked under `token` for `identity` and `target`, waiting up to
    /// [`PARKED_WAIT`] for it to arrive; not at all when this proxy hands over (`draining`):
    /// a socket on its way goes to the next mesh-node, not here.
    pub(super) async fn take(
        &self,
        token: &str,
        identity: &Identity,
        target: SocketAddrV4,
        draining: bool,
    ) -> Result<ParkedConn, NotParked> {
        let wait = if draining {
            Duration::ZERO
        } else {
            PARKED_WAIT
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut table = self.conns.lock().expect("parked sockets poisoned");
                match table.conns.get(token) {
                    Some((_, c))
                        if c.parking.identity == *identity && c.parking.target == target =>
                    {
                        return Ok(table.remove(token).expect("just seen").1);
                    }
                    // Left parked: its rightful owner may still come.
                    Some(_) => return Err(NotParked::Other),
                    None => {}
                }
            }
            if draining {
                return Err(NotParked::HandingOver);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Err(NotParked::Unknown);
            }
        }
    }

    /// Every parked socket: for the next mesh-node, or to close.
    pub(super) fn take_all(&self) -> Vec<ParkedConn> {
        let mut table = self.conns.lock().expect("parked sockets poisoned");
        table.by_source.clear();
        table.conns.drain().map(|(_, (_, conn))| conn).collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.lock().map_or(0, |t| t.conns.len())
    }
}

/// At the end of a drain: the sockets still parked go to the next mesh-node, which parks
/// them in turn; without one they are closed with a reset.
pub(super) async fn hand_over_parked(ctx: &Context, successor: Option<&Arc<Successor>>) {
    for conn in ctx.parked.take_all() {
        let Some(successor) = successor else {
            conn.close();
            continue;
        };
        if let Err(e) = successor
            .hand_over_parked(conn.parking, conn.held, conn.pod)
            .await
        {
            warn!("a parked connection could not go to the next mesh-node: {e}");
        }
    }
}

/// Where a resumable stream goes: what the source needs to open it again.
#[derive(Clone, Debug)]
pub(super) struct Route {
    pub caller: Caller,
    pub source: Option<Ipv4Addr>,
    /// The destination node's proxy.
    pub peer: SocketAddrV4,
    pub target: SocketAddrV4,
}

/// How a source's relay ended.
pub(super) enum SourceEnd {
    Done(Transferred),
    /// This mesh-node hands over: the next one takes the client's socket on, with what it
    /// carries, and resumes the stream with `token`.
    HandOver {
        paused: Paused,
        token: String,
    },
}

fn add(total: &mut Transferred, more: Transferred) {
    total.to_upstream += more.to_upstream;
    total.to_downstream += more.to_downstream;
}

/// The source's relay between the client (`downstream`) and an HBONE stream, paused and
/// resumed as the module says whenever either node proxy restarts; `held` first (an adopted
/// connection's).
pub(super) async fn relay_source<D>(
    ctx: &Arc<Context>,
    downstream: &mut D,
    mut upstream: HboneStream,
    conn: ConnectionMetrics,
    lifetime: Lifetime,
    route: &Route,
    mut held: Paused,
) -> Result<SourceEnd, ProxyError>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let failed = |reason: String| ProxyError::Resume {
        target: route.target,
        reason,
    };
    // Every stream that carries the connection on answers with the same token.
    let token = upstream
        .token()
        .map(str::to_owned)
        .ok_or_else(|| failed("the destination offered no token to resume with".into()))?;
    conn.opened();
    let mut total = Transferred::default();
    let mut quick_pauses = 0;
    loop {
        let leg = tokio::time::Instant::now();
        let pause = ctx.handover.child_token();
        upstream.io().on_peer_pause(pause.clone());
        // Awaited where it is made: a future kept in a local first takes its room twice.
        let relayed = relay_until_pause(
            ctx,
            downstream,
            &mut upstream,
            &conn,
            lifetime,
            &pause,
            held,
        )
        .await;
        let mut paused = match relayed? {
            Copied::Done(transferred) => {
                add(&mut total, transferred);
                return Ok(SourceEnd::Done(total));
            }
            Copied::Paused(paused) => paused,
        };
        add(&mut total, std::mem::take(&mut paused.transferred));
        paused
            .to_downstream
            .extend_from_slice(&upstream.io().take_unread());
        if upstream.io().peer_paused().is_some() {
            // The destination's node proxy restarts: answer, then carry on through its next
            // mesh-node, which has the pod's socket.
            if let Err(reason) = answer_pause(upstream.io()) {
                conn.closed();
                return Err(failed(reason));
            }
            drop(upstream);
            quick_pauses = if leg.elapsed() < QUICK_PAUSE {
                quick_pauses + 1
            } else {
                0
            };
            if quick_pauses > MAX_QUICK_PAUSES {
                conn.closed();
                return Err(failed(format!(
                    "the destination paused it {MAX_QUICK_PAUSES} times in a row, each within {QUICK_PAUSE:?}"
                )));
            }
            debug!(target = %route.target, "the destination's node proxy paused the stream: resuming");
            // Boxed, as every path a stream takes only at a restart: the task of every
            // connection across nodes is as large as its largest path.
            upstream = match Box::pin(reconnect(ctx, route, &token)).await {
                Ok(stream) => stream,
                Err(e) => {
                    conn.closed();
                    return Err(e);
                }
            };
            held = paused;
            continue;
        }
        // This node proxy hands over: tell the destination, take what it still sends, and
        // let the next mesh-node resume.
        let rest = match upstream.io().pause() {
            Ok(()) => Box::pin(upstream.io().until_peer_paused(PAUSE_ANSWER)).await,
            Err(e) => Err(e),
        };
        match rest {
            Ok(rest) => {
                paused.to_downstream.extend_from_slice(&rest);
                paused.transferred = total;
                return Ok(SourceEnd::HandOver {
                    paused,
                    token: token.clone(),
                });
            }
            Err(e) => {
                conn.closed();
                return Err(failed(format!("the destination did not pause: {e}")));
            }
        }
    }
}

/// The copy between `downstream` and `upstream` until it ends (the connection counted
/// closed) or pauses (still open: it goes on elsewhere).
async fn relay_until_pause<D, U>(
    ctx: &Context,
    downstream: &mut D,
    upstream: &mut U,
    conn: &ConnectionMetrics,
    lifetime: Lifetime,
    pause: &tokio_util::sync::CancellationToken,
    held: Paused,
) -> Result<Copied, ProxyError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let copied = copy::bidirectional_pausable(
        downstream,
        upstream,
        conn,
        lifetime,
        Some(ctx.overload()),
        pause,
        held,
    )
    .await;
    if !matches!(copied, Ok(Copied::Paused(_))) {
        conn.closed();
    }
    Ok(copied?)
}

/// Answers the peer's pause with ours, once every byte it says it sent has arrived.
fn answer_pause(stream: &mut H2Io) -> Result<(), String> {
    if !stream.complete() {
        return Err(format!(
            "the peer paused after {:?} bytes, not what arrived",
            stream.peer_paused()
        ));
    }
    stream.pause().map_err(|e| e.to_string())
}

/// A new stream to the destination node that carries on the paused one `token` names, tried
/// again while the destination's next mesh-node comes up.
pub(super) async fn reconnect(
    ctx: &Context,
    route: &Route,
    token: &str,
) -> Result<HboneStream, ProxyError> {
    let failed = |reason: String| ProxyError::Resume {
        target: route.target,
        reason,
    };
    let hbone = ctx
        .dialer
        .hbone
        .as_ref()
        .ok_or_else(|| failed("no mTLS to open a stream with".into()))?;
    let deadline = tokio::time::Instant::now() + RESUME_TIMEOUT;
    loop {
        let opened = hbone
            .connect(
                &route.caller,
                route.source,
                route.peer,
                route.target,
                ctx.dialer.connect_timeout,
                Some(token),
            )
            .await;
        match opened {
            Ok(stream) if stream.token() == Some(token) => return Ok(stream),
            // A peer that does not know the token opened a new connection to the pod: the
            // client's bytes must not go to it (dropped, the stream is reset).
            Ok(_) => {
                return Err(failed(
                    "the destination node opened a new connection instead of resuming".into(),
                ))
            }
            // The destination answered and will not resume: no point asking again. (A `503`
            // is a node proxy that hands over, or sheds load: the next try may land well.)
            Err(e @ TunnelError::Refused { status, .. }) if status != 503 => {
                return Err(failed(e.to_string()))
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(failed(format!("for {RESUME_TIMEOUT:?}: {e}")))
            }
            Err(e) => {
                debug!(target = %route.target, "resuming: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the destination needs to park or hand on a paused stream's pod socket.
#[derive(Debug)]
pub(super) struct Parking {
    pub token: String,
    pub identity: Identity,
    pub target: SocketAddrV4,
    /// The address whose connection it is (the calling pod, else its node).
    pub source: IpAddr,
    /// The source's connection slot, which the stream holds and its parked socket keeps: a
    /// source cannot park more than its cap of connections.
    pub slot: Option<SourceConnection>,
    /// The connection's series once this process counted it open: it is one connection
    /// until it closes, however many streams carry it.
    pub metrics: Option<ConnectionMetrics>,
}

/// The series a parked stream's connection counts under, or, for a new stream, the series of
/// `labels`, counted open.
pub(super) fn connection_of(
    ctx: &Context,
    parking: &mut Parking,
    labels: &TcpLabels,
) -> ConnectionMetrics {
    parking.metrics.take().unwrap_or_else(|| {
        let conn = ctx.metrics.connection(labels);
        conn.opened();
        conn
    })
}

/// The destination's relay between an HBONE stream (`downstream`) and the pod, paused as the
/// module says: parked here when the source restarts, handed to the next mesh-node when this
/// one does; `held` first (a resumed stream's).
///
/// It owns what it needs (`conn` resolved by [`connection_of`]): the task that runs it holds
/// nothing else of the stream's set-up, which an idle connection would keep for its lifetime.
pub(super) async fn relay_destination(
    ctx: Arc<Context>,
    mut downstream: H2Io,
    pod: TcpStream,
    conn: ConnectionMetrics,
    lifetime: Lifetime,
    mut parking: Parking,
    held: Paused,
) -> Result<Transferred, ProxyError> {
    let ctx = &ctx;
    let mut pod = pod;
    let pause = ctx.handover.child_token();
    downstream.on_peer_pause(pause.clone());
    let relayed = relay_until_pause(
        ctx,
        &mut downstream,
        &mut pod,
        &conn,
        lifetime,
        &pause,
        held,
    )
    .await;
    let mut paused = match relayed? {
        Copied::Done(transferred) => return Ok(transferred),
        Copied::Paused(paused) => paused,
    };
    let transferred = std::mem::take(&mut paused.transferred);
    paused
        .to_upstream
        .extend_from_slice(&downstream.take_unread());
    let failed = |reason: String| ProxyError::Resume {
        target: parking.target,
        reason,
    };
    if downstream.peer_paused().is_some() {
        // The source's node proxy restarts: answer, and park the pod's socket for the stream
        // its next mesh-node opens.
        if let Err(reason) = answer_pause(&mut downstream) {
            conn.closed();
            reset(pod);
            return Err(failed(reason));
        }
        debug!(target = %parking.target, "the source's node proxy paused the stream: parked");
        parking.metrics = Some(conn);
        ctx.parked.park(ParkedConn {
            parking,
            pod,
            held: paused,
        });
        return Ok(transferred);
    }
    // This node proxy hands over: tell the source, take what it still sends, and hand the
    // pod's socket to the next mesh-node, which parks it until the source resumes there.
    let rest = match downstream.pause() {
        Ok(()) => Box::pin(downstream.until_peer_paused(PAUSE_ANSWER)).await,
        Err(e) => Err(e),
    };
    let successor = ctx.config.handovers.successor.get().cloned();
    let (rest, successor) = match (rest, successor) {
        (Ok(rest), Some(successor)) => (rest, successor),
        (Err(e), _) => {
            conn.closed();
            reset(pod);
            return Err(failed(format!("the source did not pause: {e}")));
        }
        (Ok(_), None) => {
            conn.closed();
            reset(pod);
            return Err(failed("no next mesh-node to take the connection".into()));
        }
    };
    paused.to_upstream.extend_from_slice(&rest);
    conn.closed();
    Box::pin(successor.hand_over_parked(parking, paused, pod))
        .await
        .map_err(ProxyError::Socket)?;
    Ok(transferred)
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, net::Ipv4Addr};

    use super::*;

    const TARGET: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 9), 5432);
    const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7));

    fn owner() -> Identity {
        Identity::new("cluster.local", "shop", "db-client")
    }

    /// A pod socket parked under a new token for `owner()`, `TARGET` and `source`, and the
    /// pod's end of it.
    fn parked_conn(source: IpAddr, held: &[u8]) -> (ParkedConn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let conn = ParkedConn {
            parking: Parking {
                token: crate::proxy::upstream::hbone::new_token(),
                identity: owner(),
                target: TARGET,
                source,
                slot: None,
                metrics: None,
            },
            pod: TcpStream::from_std(server).unwrap(),
            held: Paused {
                to_upstream: held.to_vec(),
                ..Paused::default()
            },
        };
        (conn, client)
    }

    /// Whether the pod's end saw its connection reset (not ended cleanly, not left open).
    fn was_reset(pod: &mut std::net::TcpStream) -> bool {
        pod.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        matches!(pod.read(&mut [0u8; 16]), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }

    #[tokio::test]
    async fn a_parked_socket_goes_only_to_its_caller_and_target() {
        let parked = Arc::new(Parked::default());
        let other = Identity::new("cluster.local", "shop", "intruder");
        let (conn, _pod) = parked_conn(SOURCE, b"held");
        let token = conn.parking.token.clone();
        parked.park(conn);
        assert!(parked.take(&token, &other, TARGET, false).await.is_err());
        let elsewhere = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 10), 5432);
        assert!(parked
            .take(&token, &owner(), elsewhere, false)
            .await
            .is_err());
        // A proxy that hands over still gives out what it holds.
        let conn = parked.take(&token, &owner(), TARGET, true).await.unwrap();
        assert_eq!(conn.held.to_upstream, b"held");
        assert_eq!(parked.len(), 0);
        // Taken once; a proxy that hands over says so at once, instead of waiting for a
        // socket that goes to its successor.
        assert_eq!(
            parked.take(&token, &owner(), TARGET, true).await.err(),
            Some(NotParked::HandingOver)
        );
        tokio::time::pause();
        assert_eq!(
            parked.take(&token, &owner(), TARGET, false).await.err(),
            Some(NotParked::Unknown)
        );
    }

    #[tokio::test]
    async fn a_socket_parked_while_its_stream_waits_is_found() {
        let parked = Arc::new(Parked::default());
        let (conn, _pod) = parked_conn(SOURCE, b"");
        let token = conn.parking.token.clone();
        let waiting = {
            let parked = parked.clone();
            tokio::spawn(async move { parked.take(&token, &owner(), TARGET, false).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        parked.park(conn);
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn one_source_cannot_take_the_whole_table() {
        let parked = Arc::new(Parked::default());
        let mut pods = Vec::new();
        for _ in 0..MAX_PARKED_PER_SOURCE {
            let (conn, pod) = parked_conn(SOURCE, b"");
            parked.park(conn);
            pods.push(pod);
        }
        // One more of that source is reset; another source still parks.
        let (conn, mut refused) = parked_conn(SOURCE, b"");
        parked.park(conn);
        assert!(was_reset(&mut refused), "over its quota, a socket is reset");
        let other = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 8));
        let (conn, _pod) = parked_conn(other, b"");
        let token = conn.parking.token.clone();
        parked.park(conn);
        assert_eq!(parked.len(), MAX_PARKED_PER_SOURCE + 1);
        assert!(parked.take(&token, &owner(), TARGET, false).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_parked_again_waits_its_full_time_and_then_is_reset() {
        let parked = Arc::new(Parked::default());
        let (conn, mut pod) = parked_conn(SOURCE, b"");
        let token = conn.parking.token.clone();
        parked.park(conn);
        tokio::time::sleep(PARK_TIMEOUT / 2).await;
        // Resumed, then paused again: a new parking under the same token.
        let conn = parked.take(&token, &owner(), TARGET, false).await.unwrap();
        parked.park(conn);
        // The first parking's timer fires; the second parking stays.
        tokio::time::sleep(PARK_TIMEOUT * 3 / 4).await;
        assert_eq!(parked.len(), 1);
        tokio::time::sleep(PARK_TIMEOUT / 2).await;
        assert_eq!(parked.len(), 0, "not resumed in time: closed");
        tokio::task::spawn_blocking(move || assert!(was_reset(&mut pod)))
            .await
            .unwrap();
    }
}
