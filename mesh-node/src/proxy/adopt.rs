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
    net::{SocketAddr, SocketAddrV4},
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

use super::{context::Context, copy::Paused, tcp};
use crate::sys;

/// The largest message: two carried buffers of the largest read, base64, and the rest.
const MAX_MESSAGE: usize = 1024 * 1024;
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
    Done,
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
        let (down, up) = (downstream.into_std()?, upstream.into_std()?);
        let successor = self.clone();
        tokio::task::spawn_blocking(move || {
            let framed = frame(&message)?;
            let stream = successor
                .stream
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?;
            sys::send_fds(stream.as_fd(), &framed, &[down.as_fd(), up.as_fd()])
            // Our descriptors close here; the successor's carry the connection.
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
            Ok(other) => warn!("unexpected message from the previous mesh-node: {other:?}"),
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
    let decode = |text: &str| STANDARD.decode(text).unwrap_or_default();
    // Its client's slot, as for any connection it accepts (an adopted connection is kept
    // even over the cap: it was admitted before).
    let _held = ctx.sources.connect(SocketAddr::V4(handed.client).ip()).ok();
    // The carried bytes are the copy's own to write, both ways at once: writing one way
    // first could wait for a peer that waits for the other.
    let held = Paused {
        to_upstream: decode(&handed.to_upstream),
        to_downstream: decode(&handed.to_downstream),
        ..Paused::default()
    };
    let labels = {
        let view = ctx.view();
        let snapshot = &view.snapshot;
        let source = snapshot.pod_by_ip(*handed.client.ip());
        let destination = snapshot.pod_by_ip(*handed.target.ip());
        let service = snapshot.service_by_ip(*handed.dialled.ip());
        tcp::source_labels(
            source.map(|p| &**p),
            destination.map(|p| &**p),
            service.map(|s| &**s),
        )
    };
    let relayed =
        tcp::relay_pausable(ctx, &mut down, &mut up, &labels, ctx.tcp_lifetime(), held).await?;
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
