//! Restarts without a refused connection: a new mesh-node takes its predecessor's listening
//! sockets.
//!
//! Once its proxy serves, a node's mesh-node offers its five listening sockets (15001, 15006,
//! 15008, admin, health) on a Unix socket (`--handover-socket`, mode 0600 in a directory only
//! its owner may enter). The next mesh-node of the node — a DaemonSet rollout with `maxSurge`,
//! an upgrade, `cargo xtask cluster restart` — connects to it before binding anything:
//!
//! ```text
//! successor                                  predecessor
//!   weft-handover 1\n            ──▶
//!                                ◀──   {"version":1,"node":...,"sockets":[...]}\n + the sockets (SCM_RIGHTS)
//!   (starts, serves on them too)
//!   taken\n                      ──▶   stops accepting, drains its connections, exits
//! ```
//!
//! Each side checks the other with the kernel's word: the same user (`SO_PEERCRED`), and the
//! same network namespace (the successor sends a socket of its own with its request, the
//! predecessor its listening sockets, and each compares their `SO_NETNS_COOKIE` with its own);
//! the successor also checks the node name and that every socket is bound where it is
//! configured to listen. A root process of another pod that can reach the socket's directory
//! (a hostPath) and runs in the node's network namespace (`hostNetwork`) passes these checks:
//! such a process can already bind the node's ports whenever no mesh-node holds them. The sockets are the same kernel
//! objects in both processes, so a connection that arrives during the handover waits in the
//! listen backlog until one of them accepts it: none is refused, none reset. The successor
//! says `taken` only once it serves (its first configuration applied); until then both accept,
//! and a successor that dies half-way costs nothing. Connections the predecessor accepted
//! finish there (HTTP/1.1 clients are told `Connection: close`, HTTP/2 peers get `GOAWAY`).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{
            fs::{DirBuilderExt, MetadataExt, PermissionsExt},
            net::UnixStream,
        },
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::sys;

/// Version of the exchange; a successor and a predecessor of different builds must agree.
const VERSION: u32 = 1;
/// What a successor asks with.
const REQUEST: &[u8] = b"weft-handover 1\n";
/// What a successor confirms with, once it serves on the sockets.
const TAKEN: &[u8] = b"taken\n";
/// How long the request and the answer may take, all together.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a predecessor waits for its successor to serve; the successor gives up before
/// ([`READY_TIMEOUT`]), so that both never serve on their own.
const TAKE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a successor may take to be ready to serve before it gives up and exits.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest message either side reads.
const MAX_MESSAGE: usize = 1024;

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A failed exchange worth trying again: the predecessor was busy, or went away.
    #[error("handover from the previous mesh-node over {path}: {reason}")]
    Exchange { path: PathBuf, reason: String },
    /// The predecessor's sockets do not fit this mesh-node (another version of the exchange,
    /// other addresses): trying again changes nothing.
    #[error("handover from the previous mesh-node over {path}: {reason}")]
    Incompatible { path: PathBuf, reason: String },
    #[error("handover socket {path} is not this node's: {reason}")]
    NotOurs { path: PathBuf, reason: String },
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The listening sockets of a node's mesh-node, in the order they are handed over.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound: TcpListener,
    pub tunnel: TcpListener,
    pub admin: TcpListener,
    pub health: TcpListener,
}

/// The names of [`Listeners`]' sockets on the wire.
const NAMES: [&str; 5] = ["outbound", "inbound", "tunnel", "admin", "health"];

/// Where each listener is expected: a taken socket bound elsewhere is refused.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub tunnel: SocketAddr,
    pub admin: SocketAddr,
    pub health: SocketAddr,
}

impl Addresses {
    fn all(&self) -> [SocketAddr; 5] {
        [
            self.outbound,
            self.inbound,
            self.tunnel,
            self.admin,
            self.health,
        ]
    }
}

impl Listeners {
    fn all(&self) -> [&TcpListener; 5] {
        [
            &self.outbound,
            &self.inbound,
            &self.tunnel,
            &self.admin,
            &self.health,
        ]
    }

    /// Descriptors of the same sockets, for offering them to `node`'s next mesh-node later,
    /// while the originals serve.
    pub fn offer(&self, node: &str) -> io::Result<Offer> {
        let mut fds = Vec::with_capacity(NAMES.len());
        for listener in self.all() {
            fds.push(listener.as_fd().try_clone_to_owned()?);
        }
        Ok(Offer {
            node: node.to_owned(),
            fds,
        })
    }

    fn from_fds(fds: Vec<OwnedFd>, expected: &Addresses) -> Result<Self, String> {
        let mut taken = Vec::with_capacity(NAMES.len());
        for ((fd, name), addr) in fds.into_iter().zip(NAMES).zip(expected.all()) {
            let listener = TcpListener::from(fd);
            let bound = listener
                .local_addr()
                .map_err(|e| format!("socket {name} is not a TCP socket: {e}"))?;
            if bound != addr {
                return Err(format!(
                    "socket {name} listens on {bound}, this mesh-node is configured for {addr}"
                ));
            }
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("socket {name}: {e}"))?;
            taken.push(listener);
        }
        let [outbound, inbound, tunnel, admin, health] =
            <[TcpListener; 5]>::try_from(taken).map_err(|_| "too few sockets".to_string())?;
        Ok(Self {
            outbound,
            inbound,
            tunnel,
            admin,
            health,
        })
    }
}

/// The predecessor's duplicates of its listening sockets.
pub struct Offer {
    node: String,
    fds: Vec<OwnedFd>,
}

/// Sockets taken from the predecessor, which serves on until [`Confirmation::confirm`].
pub struct Taken {
    pub listeners: Listeners,
    pub confirmation: Confirmation,
}

/// The open exchange with the predecessor: saying `taken` ends its serving.
pub struct Confirmation {
    stream: UnixStream,
}

impl Confirmation {
    /// Tells the predecessor this mesh-node serves: it stops accepting and drains, and sends
    /// its open connections on the stream returned.
    pub fn confirm(mut self) -> io::Result<UnixStream> {
        self.stream.write_all(TAKEN)?;
        self.stream.set_read_timeout(None)?;
        Ok(self.stream)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Sockets {
    version: u32,
    /// The node the sockets serve: a mesh-node only takes its own node's.
    node: String,
    sockets: Vec<String>,
}

/// The inode of a network namespace (`/proc/<pid>/ns/net`).
fn netns_of(process: &str) -> io::Result<u64> {
    Ok(std::fs::metadata(format!("/proc/{process}/ns/net"))?.ino())
}

/// This process's effective user.
pub(crate) fn own_uid() -> io::Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// Whether the process at the other end of `socket` is of this process's user and, where
/// its process is visible here (not another pod's), of its network namespace, by the kernel's
/// account of it (not by anything it says).
fn peer_is_ours(socket: BorrowedFd<'_>) -> Result<(), String> {
    let (pid, uid) = sys::peer_credentials(socket).map_err(|e| format!("peer unknown: {e}"))?;
    let own = own_uid().map_err(|e| e.to_string())?;
    if uid != own {
        return Err(format!("a process of user {uid}, not {own}"));
    }
    let Some(pid) = pid else {
        // Another pod: the sockets themselves say where they live (see `take_over`).
        return Ok(());
    };
    match (netns_of(&pid.to_string()), netns_of("self")) {
        (Ok(theirs), Ok(ours)) if theirs == ours => Ok(()),
        (Ok(_), Ok(_)) => Err(format!("process {pid} runs in another network namespace")),
        (Err(e), _) | (_, Err(e)) => Err(format!("network namespace of process {pid}: {e}")),
    }
}

/// The network namespace cookie of this process (of a socket it makes).
fn own_netns_cookie() -> io::Result<u64> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sys::netns_cookie(probe.as_fd())
}

/// Reads exactly `buf` before `deadline`, whatever the peer's pace.
fn read_exact_by(mut stream: &UnixStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    Ok(())
}

/// Takes the listening sockets of the mesh-node serving on `path`. `None` when nobody
/// serves there (the first mesh-node of the node, or one that crashed): bind fresh ones.
pub fn take_over(
    path: &Path,
    node: &str,
    expected: &Addresses,
) -> Result<Option<Taken>, HandoverError> {
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::PermissionDenied
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(HandoverError::Socket {
                path: path.to_owned(),
                source,
            })
        }
    };
    let exchange = |reason: String| HandoverError::Exchange {
        path: path.to_owned(),
        reason,
    };
    let not_ours = |reason: String| HandoverError::NotOurs {
        path: path.to_owned(),
        reason,
    };
    peer_is_ours(stream.as_fd()).map_err(not_ours)?;
    let failed = |what: &'static str| move |e: io::Error| exchange(format!("{what}: {e}"));
    stream
        .set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(EXCHANGE_TIMEOUT)))
        .map_err(failed("setting timeouts"))?;
    // With the request, a socket of this process's network namespace: the predecessor gives
    // its sockets only to a process of its own namespace, by the kernel's account.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").map_err(failed("a namespace probe"))?;
    sys::send_fds(stream.as_fd(), REQUEST, &[probe.as_fd()])
        .map_err(failed("asking for the sockets"))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (mut n, fds) =
        sys::recv_fds(stream.as_fd(), &mut buf).map_err(failed("receiving the sockets"))?;
    // The descriptors come with the message's first bytes; the rest may follow apart.
    while n > 0 && n < buf.len() && buf[n - 1] != b'\n' {
        match stream
            .read(&mut buf[n..])
            .map_err(failed("receiving the sockets"))?
        {
            0 => break,
            more => n += more,
        }
    }
    if n == 0 {
        // The predecessor is stopping and has nothing left to give.
        return Ok(None);
    }
    let answer: Sockets = serde_json::from_slice(buf[..n].trim_ascii_end())
        .map_err(|e| exchange(format!("unreadable answer: {e}")))?;
    let incompatible = |reason: String| HandoverError::Incompatible {
        path: path.to_owned(),
        reason,
    };
    if answer.version != VERSION {
        return Err(incompatible(format!(
            "the previous mesh-node speaks handover version {}, this one {VERSION}",
            answer.version
        )));
    }
    if answer.node != node {
        return Err(not_ours(format!(
            "the mesh-node there serves node {}, this one {node}: give each node its own \
             --handover-socket",
            answer.node
        )));
    }
    if answer.sockets != NAMES || fds.len() != NAMES.len() {
        return Err(incompatible(format!(
            "expected sockets {NAMES:?}, got {:?} with {} descriptors",
            answer.sockets,
            fds.len()
        )));
    }
    // The sockets live in this process's network namespace, or they are not this node's.
    let ours = own_netns_cookie().map_err(failed("this process's network namespace"))?;
    for fd in &fds {
        if sys::netns_cookie(fd.as_fd()).ok() != Some(ours) {
            return Err(not_ours(
                "its sockets live in another network namespace".into(),
            ));
        }
    }
    let listeners = Listeners::from_fds(fds, expected).map_err(incompatible)?;
    Ok(Some(Taken {
        listeners,
        confirmation: Confirmation { stream },
    }))
}

/// Binds the handover socket at `path` (replacing a predecessor's), in a directory only this
/// process's user may enter, readable and writable by that user alone.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, HandoverError> {
    bind_private(path).map_err(|source| HandoverError::Socket {
        path: path.to_owned(),
        source,
    })
}

/// Binds a Unix socket at `path` (replacing what is there) in a directory only this process's
/// user may enter (one it owns is made so; a shared one is refused), mode 0600.
pub fn bind_private(path: &Path) -> io::Result<tokio::net::UnixListener> {
    let error = |source: io::Error| source;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(error)?;
        // The directory is this user's alone: one it owns is made so (kubelet makes a
        // hostPath 0755); a shared one (owned by another user, or writable by others, as
        // /tmp) is refused rather than changed.
        let meta = std::fs::metadata(dir).map_err(error)?;
        let refuse = |why: String| {
            error(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: {why}; give the handover socket a directory of its own",
                    dir.display()
                ),
            ))
        };
        if meta.uid() != own_uid().map_err(error)? {
            return Err(refuse(format!("belongs to user {}", meta.uid())));
        }
        if meta.mode() & 0o1022 != 0 {
            return Err(refuse("others may write to it".into()));
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    Ok(listener)
}

/// Serves the handover on `listener` until a successor has taken `offer` and says it serves.
/// Peers of another user or network namespace, and exchanges that fail, are turned away; the
/// offer stands. `handing_over` is set while a successor holds the sockets and has not said it
/// serves (this process then answers not ready, so that probes tell the two apart).
pub async fn offer(
    listener: tokio::net::UnixListener,
    offer: Offer,
    handing_over: &std::sync::atomic::AtomicBool,
) -> tokio::net::UnixStream {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncReadExt as _;

    let offer = std::sync::Arc::new(offer);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("accepting on the handover socket failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(why) = peer_is_ours(stream.as_fd()) {
            warn!("handover refused: {why}");
            continue;
        }
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let given = offer.clone();
        let sent = tokio::task::spawn_blocking(move || give(&stream, &given).map(|()| stream))
            .await
            .map_err(io::Error::other)
            .and_then(|sent| sent);
        let mut stream = match sent.and_then(|stream| {
            stream.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(stream)
        }) {
            Ok(stream) => stream,
            Err(e) => {
                warn!("handover to the next mesh-node failed, still serving: {e}");
                continue;
            }
        };
        // Both serve now, for as long as the successor starts; it says when it serves, or goes
        // away (then the offer stands).
        handing_over.store(true, Ordering::Release);
        let mut taken = [0u8; TAKEN.len()];
        match tokio::time::timeout(TAKE_TIMEOUT, stream.read_exact(&mut taken)).await {
            Ok(Ok(_)) if taken == TAKEN => {
                info!("the next mesh-node serves on the listening sockets");
                return stream;
            }
            Ok(Ok(_)) => warn!("the next mesh-node did not confirm; still serving"),
            Ok(Err(e)) => {
                warn!("the next mesh-node went away before it served ({e}); still serving");
            }
            // It gives up by then too (it is not ready: no configuration, no certificates).
            Err(_) => warn!(
                "the next mesh-node did not serve within {} s; still serving",
                TAKE_TIMEOUT.as_secs()
            ),
        }
        handing_over.store(false, Ordering::Release);
    }
}

/// The request and the sockets, on a blocking socket, within [`EXCHANGE_TIMEOUT`].
fn give(stream: &UnixStream, offer: &Offer) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut request = [0u8; REQUEST.len()];
    let (n, probe) = sys::recv_fds(stream.as_fd(), &mut request)?;
    read_exact_by(stream, &mut request[n..], deadline)?;
    if request != REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a handover request",
        ));
    }
    // The successor's probe socket says which network namespace it runs in: this one's, or
    // it is not this node's mesh-node (a process of another pod that reached the socket).
    let ours = own_netns_cookie()?;
    match probe.as_slice() {
        [probe] if sys::netns_cookie(probe.as_fd()).ok() == Some(ours) => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the peer is not of this network namespace",
            ))
        }
    }
    let answer = Sockets {
        version: VERSION,
        node: offer.node.clone(),
        sockets: NAMES.iter().map(|n| (*n).to_owned()).collect(),
    };
    let mut line = serde_json::to_vec(&answer).map_err(io::Error::other)?;
    line.push(b'\n');
    let fds: Vec<_> = offer.fds.iter().map(AsFd::as_fd).collect();
    sys::send_fds(stream.as_fd(), &line, &fds)
}

/// Binds the five listening sockets afresh (no predecessor to take them from).
pub fn bind_listeners(
    expected: &Addresses,
    inbound_transparent: bool,
) -> Result<Listeners, HandoverError> {
    let listen = |listener: &'static str, addr: SocketAddr, transparent: bool| {
        crate::proxy::listen_std(addr, transparent).map_err(|source| HandoverError::Bind {
            listener,
            addr,
            source,
        })
    };
    Ok(Listeners {
        outbound: listen("outbound capture", expected.outbound, false)?,
        inbound: listen("inbound capture", expected.inbound, inbound_transparent)?,
        tunnel: listen("node tunnel", expected.tunnel, false)?,
        admin: listen("admin", expected.admin, false)?,
        health: listen("health", expected.health, false)?,
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::*;

    fn loopback() -> Addresses {
        let any = "127.0.0.1:0".parse().unwrap();
        Addresses {
            outbound: any,
            inbound: any,
            tunnel: any,
            admin: any,
            health: any,
        }
    }

    /// What the listeners were bound to, as the successor expects them.
    fn bound(listeners: &Listeners) -> Addresses {
        let [outbound, inbound, tunnel, admin, health] =
            listeners.all().map(|l| l.local_addr().unwrap());
        Addresses {
            outbound,
            inbound,
            tunnel,
            admin,
            health,
        }
    }

    async fn take(
        path: &Path,
        node: &str,
        expected: Addresses,
    ) -> Result<Option<Taken>, HandoverError> {
        let (path, node) = (path.to_owned(), node.to_owned());
        tokio::task::spawn_blocking(move || take_over(&path, &node, &expected))
            .await
            .unwrap()
    }

    /// The predecessor's side, as a task; `offered.await` ends once a successor serves.
    fn offering(unix: tokio::net::UnixListener, given: Offer) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let handing_over = std::sync::atomic::AtomicBool::new(false);
            let _kept = offer(unix, given, &handing_over).await;
            assert!(handing_over.load(std::sync::atomic::Ordering::Acquire));
        })
    }

    /// Waits for the predecessor's side to end, failing instead of hanging.
    async fn ended(offered: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(10), offered)
            .await
            .expect("the offer ends once the successor serves")
            .unwrap();
    }

    /// This node's real successor still gets the sockets, says it serves, and the offer ends.
    async fn the_offer_still_stands(
        path: &Path,
        expected: Addresses,
        offered: tokio::task::JoinHandle<()>,
    ) {
        let taken = take(path, "node-1", expected)
            .await
            .unwrap()
            .expect("the offer stands");
        tokio::task::spawn_blocking(move || taken.confirmation.confirm().map(drop))
            .await
            .unwrap()
            .unwrap();
        ended(offered).await;
    }

    /// A peer that says anything, as far as it gets: `(bytes, descriptors)` received.
    fn poke(path: &Path, says: &[u8]) -> (usize, usize) {
        let mut stream = UnixStream::connect(path).unwrap();
        let _ = stream.write_all(says);
        let mut buf = [0u8; 64];
        match sys::recv_fds(stream.as_fd(), &mut buf) {
            Ok((n, fds)) => (n, fds.len()),
            // Closed with our bytes unread.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => (0, 0),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_successor_takes_every_listening_socket_and_the_predecessor_stops_once_it_serves() {
        let dir = tempfile_dir();
        let path = dir.join("sub/handover.sock");
        // As kubelet makes a hostPath: 0755.
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(dir.join("sub"))
            .unwrap();
        let listeners = bind_listeners(&loopback(), false).unwrap();
        let expected = bound(&listeners);
        let unix = bind(&path).unwrap();
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700, "the directory is its owner's alone");
        // A directory others may write to is refused, not changed.
        let shared = dir.join("shared");
        std::fs::DirBuilder::new()
            .mode(0o1777)
            .create(&shared)
            .unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let refused = bind(&shared.join("handover.sock")).expect_err("refused");
        assert!(
            refused.to_string().contains("others may write"),
            "{refused}"
        );
        assert_eq!(std::fs::metadata(&shared).unwrap().mode() & 0o7777, 0o1777);
        let offered = offering(unix, listeners.offer("node-1").unwrap());
        let taken = take(&path, "node-1", expected)
            .await
            .unwrap()
            .expect("the predecessor offers its sockets");
        // Until the successor confirms, the predecessor still offers (and serves).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!offered.is_finished());
        tokio::task::spawn_blocking(move || taken.confirmation.confirm().map(drop))
            .await
            .unwrap()
            .unwrap();
        ended(offered).await;
        // The predecessor closes its own: every socket still accepts, in the successor.
        drop(listeners);
        for (listener, addr) in taken.listeners.all().into_iter().zip(expected.all()) {
            assert_eq!(listener.local_addr().unwrap(), addr);
            let client = TcpStream::connect(addr).unwrap();
            listener.set_nonblocking(false).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn with_nobody_there_a_mesh_node_binds_its_own() {
        let dir = tempfile_dir();
        assert!(take_over(&dir.join("absent.sock"), "node-1", &loopback())
            .unwrap()
            .is_none());
        // A socket file left by a crashed predecessor: nobody accepts on it.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(take_over(&stale, "node-1", &loopback()).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_successor_that_goes_away_before_serving_leaves_the_offer_standing() {
        let dir = tempfile_dir();
        let path = dir.join("handover.sock");
        let listeners = bind_listeners(&loopback(), false).unwrap();
        let expected = bound(&listeners);
        let unix = bind(&path).unwrap();
        let offered = offering(unix, listeners.offer("node-1").unwrap());
        // Takes the sockets, then dies without confirming.
        drop(take(&path, "node-1", expected).await.unwrap().unwrap());
        the_offer_still_stands(&path, expected, offered).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_speaks_nonsense_or_serves_another_node_gets_nothing_and_the_offer_stands()
    {
        let dir = tempfile_dir();
        let path = dir.join("handover.sock");
        let listeners = bind_listeners(&loopback(), false).unwrap();
        let expected = bound(&listeners);
        let unix = bind(&path).unwrap();
        let offered = offering(unix, listeners.offer("node-1").unwrap());
        let got = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || poke(&path, b"give me everything\n"))
                .await
                .unwrap()
        };
        assert_eq!(got, (0, 0), "closed without a socket");
        // Another node's mesh-node (a shared --handover-socket path) takes nothing.
        let other = take(&path, "node-2", expected)
            .await
            .err()
            .expect("another node's sockets are refused");
        assert!(other.to_string().contains("serves node node-1"), "{other}");
        the_offer_still_stands(&path, expected, offered).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn sockets_bound_elsewhere_than_configured_are_refused() {
        let dir = tempfile_dir();
        let path = dir.join("handover.sock");
        let listeners = bind_listeners(&loopback(), false).unwrap();
        let expected = bound(&listeners);
        let mut elsewhere = expected;
        elsewhere
            .tunnel
            .set_port(expected.tunnel.port().wrapping_add(1));
        let unix = bind(&path).unwrap();
        let offered = offering(unix, listeners.offer("node-1").unwrap());
        let err = take(&path, "node-1", elsewhere)
            .await
            .err()
            .expect("a socket on another port is refused");
        assert!(
            err.to_string().contains("socket tunnel listens on"),
            "{err}"
        );
        the_offer_still_stands(&path, expected, offered).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A process of another network namespace (another pod, with the same user) that asks as
    /// a successor does gets no socket; the offer stands.
    #[tokio::test]
    async fn a_process_of_another_network_namespace_gets_nothing() {
        let dir = tempfile_dir();
        let path = dir.join("handover.sock");
        let listeners = bind_listeners(&loopback(), false).unwrap();
        let expected = bound(&listeners);
        let unix = bind(&path).unwrap();
        let offered = offering(unix, listeners.offer("node-1").unwrap());
        let got = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::spawn(move || {
                    sys::unshare_network().expect("a network namespace of its own needs root");
                    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    let stream = UnixStream::connect(&path).unwrap();
                    sys::send_fds(stream.as_fd(), REQUEST, &[probe.as_fd()]).unwrap();
                    let mut buf = [0u8; 64];
                    match sys::recv_fds(stream.as_fd(), &mut buf) {
                        Ok((n, fds)) => (n, fds.len()),
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => (0, 0),
                        Err(e) => panic!("{e}"),
                    }
                })
                .join()
                .unwrap()
            })
            .await
            .unwrap()
        };
        assert_eq!(got, (0, 0), "closed without a socket");
        the_offer_still_stands(&path, expected, offered).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Even where the directory and socket let it in, a process of another user gets no socket
    /// (needs root, to run the peer as `nobody`).
    #[tokio::test]
    async fn a_process_of_another_user_gets_nothing() {
        use std::os::unix::process::CommandExt as _;

        let dir = tempfile_dir();
        let path = dir.join("open/handover.sock");
        let listeners = bind_listeners(&loopback(), false).unwrap();
        let expected = bound(&listeners);
        let unix = bind(&path).unwrap();
        let open = path.parent().unwrap().to_owned();
        for (p, mode) in [(&dir, 0o755), (&open, 0o755), (&path, 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let offered = offering(unix, listeners.offer("node-1").unwrap());
        let script = "import socket, sys\n\
                      s = socket.socket(socket.AF_UNIX)\n\
                      s.connect(sys.argv[1])\n\
                      try:\n    \
                          s.sendall(b'weft-handover 1\\n')\n    \
                          data, fds, _, _ = socket.recv_fds(s, 1024, 16)\n    \
                          print(len(data), len(fds))\n\
                      except OSError:\n    \
                          print(0, 0)\n";
        let out = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("/usr/bin/python3")
                    .args(["-c", script])
                    .arg(&path)
                    .uid(65534)
                    .gid(65534)
                    .output()
                    .expect("running a process as nobody needs root")
            })
            .await
            .unwrap()
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0 0");
        // The offer stands for this node's next mesh-node.
        the_offer_still_stands(&path, expected, offered).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "weft-handover-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
