//! Port forwards into the nodes' network namespaces, as `kubectl port-forward` reaches a
//! pod's port: a loopback port of the host whose connections are made again from inside a
//! node, to an address only the node can reach (its admin on `127.0.0.1:15020`). A forward
//! lives as long as the command it serves; while it does, it lets local clients of the host
//! reach that address.

use std::{
    fs::File,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context, Result};

/// Connections one forward relays at once; more are closed.
const MAX_CONNECTIONS: usize = 16;
/// How long a relayed connection may stay silent.
const IDLE: Duration = Duration::from_secs(60);

/// A forward that serves until dropped.
pub struct Forward {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    accepting: Option<JoinHandle<()>>,
}

impl Forward {
    /// Listens on a free loopback port of the host; each connection to it is made again to
    /// `target` from inside the network namespace `netns` (`/var/run/netns/<netns>`).
    pub fn start(netns: &str, target: SocketAddr) -> Result<Self> {
        let path = Path::new("/var/run/netns").join(netns);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stopping, netns) = (stop.clone(), (Arc::new(file), netns.to_owned()));
        let open = Arc::new(AtomicUsize::new(0));
        let accepting = thread::Builder::new()
            .name(format!("forward-{}", local.port()))
            .spawn(move || {
                for client in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    let client = match client {
                        Ok(client) => client,
                        Err(e) => {
                            eprintln!("forward to {target} in {}: accept failed: {e}", netns.1);
                            thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        open.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    let (netns, open) = (netns.clone(), open.clone());
                    let spawned = thread::Builder::new().spawn(move || {
                        if let Err(e) = relay(client, &netns.0, target) {
                            eprintln!("forward to {target} in {}: {e}", netns.1);
                        }
                        open.fetch_sub(1, Ordering::AcqRel);
                    });
                    if let Err(e) = spawned {
                        eprintln!("forward to {target}: no thread for a connection: {e}");
                    }
                }
            })?;
        Ok(Self {
            local,
            stop,
            accepting: Some(accepting),
        })
    }

    /// The host address that reaches the target.
    pub fn local(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accepting thread, which then sees `stop` and ends with its listener.
        let _ = TcpStream::connect(self.local);
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.join();
        }
    }
}

/// Connects to `target` from inside `netns` (this thread enters it) and copies both ways
/// until either side closes or stays silent for [`IDLE`].
fn relay(client: TcpStream, netns: &File, target: SocketAddr) -> io::Result<()> {
    crate::sys::enter_netns(netns)?;
    let upstream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    for stream in [&client, &upstream] {
        stream.set_read_timeout(Some(IDLE))?;
    }
    let (mut client_read, mut upstream_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(Shutdown::Write);
    });
    let (mut upstream_read, mut client_write) = (upstream, client);
    let _ = io::copy(&mut upstream_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}
