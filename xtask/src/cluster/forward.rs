//! Port forwards into the nodes' network namespaces, as `kubectl port-forward` reaches a
//! pod's port: a loopback port of the host whose connections are made again from inside a
//! node, to an address only the node can reach (its admin on `127.0.0.1:15020`).

use std::{
    fs::File,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

/// A forward that serves until dropped.
pub struct Forward {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Forward {
    /// Listens on a free loopback port of the host; each connection to it is made again to
    /// `target` from inside the network namespace `netns` (`/var/run/netns/<netns>`).
    pub fn start(netns: &str, target: SocketAddr) -> Result<Self> {
        let path = Path::new("/var/run/netns").join(netns);
        let netns =
            Arc::new(File::open(&path).with_context(|| format!("opening {}", path.display()))?);
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        thread::Builder::new()
            .name(format!("forward-{}", local.port()))
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let netns = netns.clone();
                            let _ =
                                thread::Builder::new().spawn(move || relay(client, &netns, target));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?;
        Ok(Self { local, stop })
    }

    /// The host address that reaches the target.
    pub fn local(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Connects to `target` from inside `netns` (this thread enters it) and copies both ways.
fn relay(client: TcpStream, netns: &File, target: SocketAddr) {
    let _ = client.set_nonblocking(false);
    let upstream = crate::sys::enter_netns(netns)
        .and_then(|()| TcpStream::connect_timeout(&target, Duration::from_secs(5)));
    let Ok(upstream) = upstream else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(mut client_read), Ok(mut upstream_write)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let up = thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(Shutdown::Write);
    });
    let (mut upstream_read, mut client_write) = (upstream, client);
    let _ = io::copy(&mut upstream_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Write);
    let _ = up.join();
}
