//! Open connections across a handover: a draining mesh-node hands its opaque TCP connections
//! between two local sockets to the mesh-node that took its listening sockets, which carries
//! them on.
//!
//! After `taken`, the handover socket stays open. At the drain, each relay of two plain TCP
//! sockets (a client of this node and a pod of this node) pauses between two reads
//! ([`super::copy::bidirectional_pausable`]), writes out what it holds (or carries what its writers
//! did not take within a second), and its two sockets go over with one message, its length
//! (4 bytes, big-endian) then JSON, the sockets attached to its first byte:
//!
//! ```text
//! {"kind":"tcp","direction":"outbound","client":"10.244.1.5:40112","dialled":"10.96.0.12:5432",
//!  "target":"10.244.1.9:5432","to_upstream":"<base64>","to_downstream":"<base64>"} + 2 fds
//! ```
//!
//! The kernel keeps what the sockets received and not read yet, and the `sk_msg` fast path
//! keeps redirecting between them (the sockets are the same). The successor's copy starts with
//! the carried bytes as its own held bytes. A `{"kind":"done"}` message ends the stream. A
//! stalled successor costs a connection, not the drain: every send has a deadline.

use std::{
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{
    context::Context,
    copy::Paused,
    resume::{self, ParkedConn, Parking, Route, SourceEnd},
    tcp,
    upstream::hbone::Caller,
};
use crate::{identity::Identity, metrics::TcpLabels, sys};

/// The largest message: the carried bytes (two buffers of the largest read, and what the peer
/// of a paused stream may still send: its window), base64, and the rest.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// How long one message may take to go out to a successor that reads slowly or not at all.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A message with its length before it.
fn frame(message: &Message) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(json.len()).map_err(io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&json);
    Ok(framed)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Message {
    Tcp(HandedTcp),
    /// A source's half of a paused HBONE stream: the client's socket ([`super::resume`]).
    Tunnel(HandedTunnel),
    /// A destination's half of a paused HBONE stream: the pod's socket, to park.
    Parked(HandedParked),
    Done,
}

/// The client's socket of a stream this node's proxy paused across nodes, and what the next
/// one needs to resume it.
#[derive(Debug, Serialize, Deserialize)]
struct HandedTunnel {
    client: SocketAddrV4,
    dialled: SocketAddrV4,
    target: SocketAddrV4,
    /// The destination node's proxy, and the address this node dials it from.
    peer: SocketAddrV4,
    source: Option<Ipv4Addr>,
    /// The calling pod: its identity (SPIFFE ID) and address.
    identity: String,
    caller_ip: Ipv4Addr,
    token: String,
    to_upstream: String,
    to_downstream: String,
}

/// The pod's socket of a stream paused across nodes, to park until its source resumes it.
#[derive(Debug, Serialize, Deserialize)]
struct HandedParked {
    target: SocketAddrV4,
    /// The address whose connection slot the stream held (the calling pod, else its node).
    source: IpAddr,
    identity: String,
    token: String,
    to_upstream: String,
    to_downstream: String,
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Tcp(_) => "tcp",
            Message::Tunnel(_) => "tunnel",
            Message::Parked(_) => "parked",
            Message::Done => "done",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct HandedTcp {
    direction: Direction,
    client: SocketAddrV4,
    dialled: SocketAddrV4,
    target: SocketAddrV4,
    to_upstream: String,
    to_downstream: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Direction {
    Outbound,
    Inbound,
}

/// Where a handover's two ends meet the proxy: set on the control side (which speaks the
/// handover), read by the proxy.
#[derive(Clone, Default)]
pub struct Handovers {
    /// The next mesh-node, once it serves on the sockets: where paused connections go.
    pub successor: Arc<std::sync::OnceLock<Arc<Successor>>>,
    /// The previous mesh-node's stream, once this one said it serves: where its connections
    /// come from.
    pub adoption: Arc<(Mutex<Option<UnixStream>>, tokio::sync::Notify)>,
}

impl std::fmt::Debug for Handovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handovers")
            .field("successor", &self.successor.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Handovers {
    /// Hands the previous mesh-node's stream to the proxy, which adopts what comes on it.
    pub fn adopt_from(&self, stream: UnixStream) {
        if let Ok(mut slot) = self.adoption.0.lock() {
            *slot = Some(stream);
        }
        self.adoption.1.notify_one();
    }

    /// Waits for the previous mesh-node's stream, then adopts its connections (forever
    /// pending without one). Each adopted connection holds a receiver of `drain`, as accepted
    /// ones do, so that this mesh-node's own drain waits for it (and hands it on again).
    pub(super) async fn adopt(&self, ctx: Arc<Context>, drain: tokio::sync::watch::Receiver<()>) {
        self.adoption.1.notified().await;
        let Some(stream) = self.adoption.0.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        let runtime = tokio::runtime::Handle::current();
        let _ = tokio::task::spawn_blocking(move || adopt(ctx, stream, runtime, drain)).await;
    }
}

/// The predecessor's end: where paused connections go.
pub struct Successor {
    stream: Mutex<UnixStream>,
}

impl Successor {
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Self {
            stream: Mutex::new(stream),
        })
    }

    /// Sends a paused connection: its two sockets, what it carried, where it goes.
    pub(super) async fn hand_over(
        self: &Arc<Self>,
        direction: Direction,
        addresses: (SocketAddrV4, SocketAddrV4, SocketAddrV4),
        paused: Paused,
        downstream: TcpStream,
        upstream: TcpStream,
    ) -> io::Result<()> {
        let (client, dialled, target) = addresses;
        let message = Message::Tcp(HandedTcp {
            direction,
            client,
            dialled,
            target,
            to_upstream: STANDARD.encode(&paused.to_upstream),
            to_downstream: STANDARD.encode(&paused.to_downstream),
        });
        let sockets = vec![downstream.into_std()?, upstream.into_std()?];
        self.send(message, sockets).await
    }

    /// Sends the client's socket of a paused HBONE stream.
    pub(super) async fn hand_over_tunnel(
        self: &Arc<Self>,
        addresses: (SocketAddrV4, SocketAddrV4),
        route: &Route,
        token: String,
        paused: Paused,
        downstream: TcpStream,
    ) -> io::Result<()> {
        let (client, dialled) = addresses;
        let message = Message::Tunnel(HandedTunnel {
            client,
            dialled,
            target: route.target,
            peer: route.peer,
            source: route.source,
            identity: route.caller.identity.to_string(),
            caller_ip: route.caller.ip,
            token,
            to_upstream: STANDARD.encode(&paused.to_upstream),
            to_downstream: STANDARD.encode(&paused.to_downstream),
        });
        self.send(message, vec![downstream.into_std()?]).await
    }

    /// Sends the pod's socket of a paused HBONE stream, for the successor to park.
    pub(super) async fn hand_over_parked(
        self: &Arc<Self>,
        parking: Parking,
        paused: Paused,
        pod: TcpStream,
    ) -> io::Result<()> {
        let message = Message::Parked(HandedParked {
            target: parking.target,
            source: parking.source,
            identity: parking.identity.to_string(),
            token: parking.token,
            to_upstream: STANDARD.encode(&paused.to_upstream),
            to_downstream: STANDARD.encode(&paused.to_downstream),
        });
        self.send(message, vec![pod.into_std()?]).await
    }

    /// One message with its sockets, off the runtime (the send may wait for its deadline).
    async fn send(
        self: &Arc<Self>,
        message: Message,
        fds: Vec<std::net::TcpStream>,
    ) -> io::Result<()> {
        let successor = self.clone();
        tokio::task::spawn_blocking(move || {
            let sent = frame(&message).and_then(|framed| {
                if framed.len() > MAX_MESSAGE {
                    return Err(io::Error::other(format!(
                        "a handed connection carries more than {MAX_MESSAGE} bytes"
                    )));
                }
                let stream = successor
                    .stream
                    .lock()
                    .map_err(|_| io::Error::other("poisoned"))?;
                let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                sys::send_fds(stream.as_fd(), &framed, &borrowed)
            });
            if sent.is_err() {
                // Not handed over: the connection ends with a reset, never with a clean end
                // the application would take for its peer's.
                for fd in &fds {
                    let _ = sys::set_zero_linger(fd);
                }
            }
            // Our descriptors close here; the successor's carry the connection.
            sent
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Tells the successor no more connections come (off the runtime: it may wait for the
    /// last send's deadline).
    pub async fn done(self: Arc<Self>) {
        let _ = tokio::task::spawn_blocking(move || {
            let stream = self
                .stream
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?;
            sys::send_fds(stream.as_fd(), &frame(&Message::Done)?, &[])
        })
        .await;
    }
}

/// The successor's end: reads handed connections until `done` (on a blocking thread) and
/// carries each on, on the data runtime.
fn adopt(
    ctx: Arc<Context>,
    mut stream: UnixStream,
    runtime: tokio::runtime::Handle,
    drain: tokio::sync::watch::Receiver<()>,
) {
    let mut adopted = 0usize;
    loop {
        let (buf, fds) = match read_message(&mut stream) {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(e) => {
                warn!("receiving connections from the previous mesh-node: {e}");
                break;
            }
        };
        match serde_json::from_slice::<Message>(&buf) {
            Ok(Message::Done) => break,
            Ok(Message::Tcp(handed)) if fds.len() == 2 => {
                let mut fds = fds.into_iter();
                let (down, up) = (fds.next(), fds.next());
                let (Some(down), Some(up)) = (down, up) else {
                    continue;
                };
                let (ctx, drain) = (ctx.clone(), drain.clone());
                runtime.spawn(async move {
                    if let Err(e) = resume(&ctx, handed, down.into(), up.into()).await {
                        debug!("an adopted connection ended: {e}");
                    }
                    drop(drain);
                });
                adopted += 1;
            }
            Ok(Message::Tunnel(handed)) if fds.len() == 1 => {
                let Some(client) = fds.into_iter().next() else {
                    continue;
                };
                let (ctx, drain) = (ctx.clone(), drain.clone());
                runtime.spawn(async move {
                    if let Err(e) = resume_tunnel(&ctx, handed, client.into()).await {
                        debug!("an adopted connection across nodes ended: {e}");
                    }
                    drop(drain);
                });
                adopted += 1;
            }
            Ok(Message::Parked(handed)) if fds.len() == 1 => {
                let Some(pod) = fds.into_iter().next() else {
                    continue;
                };
                let ctx = ctx.clone();
                runtime.spawn(async move {
                    if let Err(e) = park(&ctx, handed, pod.into()) {
                        warn!("a paused connection from the previous mesh-node could not be parked: {e}");
                    }
                });
                adopted += 1;
            }
            // Not its fields: they carry tokens and the application's bytes.
            Ok(other) => warn!(
                "unexpected message from the previous mesh-node: {} with {} sockets",
                other.kind(),
                fds.len()
            ),
            Err(e) => warn!("unreadable message from the previous mesh-node: {e}"),
        }
    }
    info!(adopted, "took the previous mesh-node's open connections on");
}

/// One framed message and the descriptors that came with it; `None` at the end of the stream.
/// The length alone is read first: the descriptors come with it, and nothing of the next
/// message (whose descriptors a plain read would drop) is read with this one.
fn read_message(stream: &mut UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut len = [0u8; 4];
    let (n, fds) = sys::recv_fds(stream.as_fd(), &mut len)?;
    if n == 0 {
        return Ok(None);
    }
    stream.read_exact(&mut len[n..])?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too large",
        ));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf)?;
    Ok(Some((buf, fds)))
}

/// Carries an adopted connection on: the carried bytes first, then the copy, counted under the
/// labels this proxy gives the connection's addresses.
async fn resume(
    ctx: &Arc<Context>,
    handed: HandedTcp,
    down: std::net::TcpStream,
    up: std::net::TcpStream,
) -> Result<(), super::ProxyError> {
    let socket = super::ProxyError::Socket;
    down.set_nonblocking(true).map_err(socket)?;
    up.set_nonblocking(true).map_err(socket)?;
    let mut down = TcpStream::from_std(down).map_err(socket)?;
    let mut up = TcpStream::from_std(up).map_err(socket)?;
    // Its client's slot, as for any connection it accepts (an adopted connection is kept
    // even over the cap: it was admitted before).
    let _held = ctx.sources.connect(SocketAddr::V4(handed.client).ip()).ok();
    // The carried bytes are the copy's own to write, both ways at once: writing one way
    // first could wait for a peer that waits for the other.
    let held = carried(&handed.to_upstream, &handed.to_downstream);
    let labels = source_labels(ctx, handed.client, handed.dialled, handed.target, None);
    let relayed = tcp::relay_pausable(
        ctx,
        &mut down,
        &mut up,
        ctx.metrics.connection(&labels),
        ctx.tcp_lifetime(),
        held,
    )
    .await?;
    // This mesh-node hands over in turn: the connection goes on to the next one.
    if let (tcp::Relayed::Paused(paused), Some(successor)) =
        (relayed, ctx.config.handovers.successor.get().cloned())
    {
        let addresses = (handed.client, handed.dialled, handed.target);
        successor
            .hand_over(handed.direction, addresses, paused, down, up)
            .await
            .map_err(socket)?;
    }
    Ok(())
}

/// Carries on the client's side of a stream the previous mesh-node paused: a new stream to
/// the destination node resumes it, then the relay goes on as at the source.
async fn resume_tunnel(
    ctx: &Arc<Context>,
    handed: HandedTunnel,
    client: std::net::TcpStream,
) -> Result<(), super::ProxyError> {
    let socket = super::ProxyError::Socket;
    client.set_nonblocking(true).map_err(socket)?;
    let mut down = TcpStream::from_std(client).map_err(socket)?;
    let identity: Identity = match handed.identity.parse() {
        Ok(identity) => identity,
        Err(e) => {
            resume::reset(down);
            return Err(super::ProxyError::Resume {
                target: handed.target,
                reason: format!(
                    "the previous mesh-node named the caller {:?}: {e}",
                    handed.identity
                ),
            });
        }
    };
    let route = Route {
        caller: Caller {
            identity,
            ip: handed.caller_ip,
        },
        source: handed.source,
        peer: handed.peer,
        target: handed.target,
    };
    let _held = ctx.sources.connect(SocketAddr::V4(handed.client).ip()).ok();
    let held = carried(&handed.to_upstream, &handed.to_downstream);
    let labels = source_labels(
        ctx,
        handed.client,
        handed.dialled,
        handed.target,
        Some(&route.caller.identity),
    );
    let upstream = match resume::reconnect(ctx, &route, &handed.token).await {
        Ok(upstream) => upstream,
        Err(e) => {
            resume::reset(down);
            return Err(e);
        }
    };
    let ended = resume::relay_source(
        ctx,
        &mut down,
        upstream,
        ctx.metrics.connection(&labels),
        ctx.tcp_lifetime(),
        &route,
        held,
    )
    .await;
    match ended {
        Ok(SourceEnd::Done(_)) => Ok(()),
        Ok(SourceEnd::HandOver { paused, token }) => {
            // This mesh-node hands over in turn.
            let Some(successor) = ctx.config.handovers.successor.get().cloned() else {
                resume::reset(down);
                return Ok(());
            };
            successor
                .hand_over_tunnel((handed.client, handed.dialled), &route, token, paused, down)
                .await
                .map_err(socket)
        }
        Err(e) => {
            resume::reset(down);
            Err(e)
        }
    }
}

/// Parks the pod's socket of a stream the previous mesh-node paused.
fn park(ctx: &Arc<Context>, handed: HandedParked, pod: std::net::TcpStream) -> io::Result<()> {
    let identity: Identity = match handed.identity.parse() {
        Ok(identity) => identity,
        Err(e) => {
            let _ = sys::set_zero_linger(&pod);
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{e}")));
        }
    };
    pod.set_nonblocking(true)?;
    let pod = TcpStream::from_std(pod)?;
    ctx.parked.park(ParkedConn {
        parking: Parking {
            token: handed.token,
            identity,
            target: handed.target,
            source: handed.source,
            // Kept even over the cap: the stream was admitted before.
            slot: ctx.sources.connect(handed.source).ok(),
            metrics: None,
        },
        pod,
        held: carried(&handed.to_upstream, &handed.to_downstream),
    });
    Ok(())
}

/// The bytes a handed connection carries, as the previous mesh-node wrote them (base64).
fn carried(to_upstream: &str, to_downstream: &str) -> Paused {
    let decode = |text: &str| STANDARD.decode(text).unwrap_or_default();
    Paused {
        to_upstream: decode(to_upstream),
        to_downstream: decode(to_downstream),
        ..Paused::default()
    }
}

/// The source's metric labels of a handed connection from `client` to `target` (dialled as
/// `dialled`); mutual TLS when it goes through a tunnel on behalf of `caller`.
fn source_labels(
    ctx: &Context,
    client: SocketAddrV4,
    dialled: SocketAddrV4,
    target: SocketAddrV4,
    caller: Option<&Identity>,
) -> TcpLabels {
    let view = ctx.view();
    let snapshot = &view.snapshot;
    let source = snapshot.pod_by_ip(*client.ip());
    let destination = snapshot.pod_by_ip(*target.ip());
    let service = snapshot.service_by_ip(*dialled.ip());
    let labels = tcp::source_labels(
        source.map(|p| &**p),
        destination.map(|p| &**p),
        service.map(|s| &**s),
    );
    match (caller, destination) {
        (Some(caller), Some(pod)) => labels.mutual_tls(caller, &ctx.dialer.identity(pod)),
        (None, Some(pod)) if ctx.dialer.serves(snapshot, pod) => {
            let caller = source
                .filter(|_| ctx.dialer.hbone.is_some())
                .map(|p| ctx.dialer.identity(p));
            labels.between_local_pods(caller.as_ref(), &ctx.dialer.identity(pod))
        }
        _ => labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages larger than the socket's buffer, one after another, each with its socket:
    /// each arrives whole, with its own.
    #[test]
    fn framed_messages_keep_their_bytes_and_their_descriptors() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let held = vec![7u8; 300 * 1024];
        let sender = std::thread::spawn(move || {
            for n in 0..3u16 {
                let message = Message::Tcp(HandedTcp {
                    direction: Direction::Outbound,
                    client: SocketAddrV4::new([10, 0, 0, 1].into(), n),
                    dialled: SocketAddrV4::new([10, 0, 0, 2].into(), 80),
                    target: SocketAddrV4::new([10, 0, 0, 3].into(), 80),
                    to_upstream: STANDARD.encode(&held),
                    to_downstream: String::new(),
                });
                let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                sys::send_fds(a.as_fd(), &frame(&message).unwrap(), &[probe.as_fd()]).unwrap();
            }
            sys::send_fds(a.as_fd(), &frame(&Message::Done).unwrap(), &[]).unwrap();
        });
        for n in 0..3u16 {
            let (buf, fds) = read_message(&mut b).unwrap().expect("a message");
            let Message::Tcp(handed) = serde_json::from_slice(&buf).unwrap() else {
                panic!("not a connection");
            };
            assert_eq!(handed.client.port(), n);
            assert_eq!(
                STANDARD.decode(handed.to_upstream).unwrap().len(),
                300 * 1024
            );
            assert_eq!(fds.len(), 1, "message {n} kept its socket");
        }
        let (buf, fds) = read_message(&mut b).unwrap().unwrap();
        assert!(matches!(
            serde_json::from_slice(&buf).unwrap(),
            Message::Done
        ));
        assert!(fds.is_empty());
        sender.join().unwrap();
        assert!(read_message(&mut b).unwrap().is_none());
    }
}
