//! `bulk`: throughput of bytes sent one way, ztunnel's `throughput` benchmark over the
//! network: `--bytes` shared by `--conns` connections opened (and warmed by a 1-byte
//! transfer) before the clock starts, each sending its share at once; the clock stops when the
//! server has acknowledged the last byte of every share, so the figure covers delivery, not
//! only the client's socket buffers.
//!
//! On the wire, per transfer: the client sends the length (`u64`, big-endian) and that many
//! bytes; the server reads them all, discarding, and answers with the count it read (`u64`,
//! big-endian). A connection carries transfers until the client closes it. No half-close:
//! every proxy carries it the same way, and so does one that would not forward a FIN.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// Bytes handed to each `write` (and read by the server at once): large enough that system
/// calls are not what is measured.
const CHUNK: usize = 1 << 20;
/// How long one transfer may stall before it counts as failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server `host:port` (its bulk port).
    pub addr: String,
    /// Bytes sent in all, shared evenly by the connections (ztunnel's method: 1 GiB over N
    /// connections is 1 GiB / N on each).
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
    /// Connections sending in parallel.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
}

/// What `bulk` prints, one JSON object.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Bytes sent and acknowledged, all connections together.
    pub bytes: u64,
    pub conns: usize,
    /// From the moment every connection was open and warm to the last acknowledgement.
    pub seconds: f64,
    /// `bytes × 8 / seconds / 10⁹`, as iperf and ztunnel count.
    pub gbit_s: f64,
}

impl Report {
    fn new(bytes: u64, conns: usize, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Self {
            bytes,
            conns,
            seconds: (seconds * 1e6).round() / 1e6,
            gbit_s: (bytes as f64 * 8.0 / seconds / 1e9 * 1000.0).round() / 1000.0,
        }
    }
}

/// The share of connection `index`: the remainder goes to the first ones.
fn share(bytes: u64, conns: usize, index: usize) -> u64 {
    let conns = conns as u64;
    bytes / conns + u64::from((index as u64) < bytes % conns)
}

pub fn run(args: Args) -> Result<()> {
    if args.conns == 0 {
        bail!("--conns must be at least 1");
    }
    if args.bytes < args.conns as u64 {
        bail!("--bytes must give every connection at least one byte");
    }
    let addr = args
        .addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} has no address", args.addr))?;
    // Every connection, plus this thread, which starts the clock once all are warm.
    let ready = Arc::new(Barrier::new(args.conns + 1));
    let threads: Vec<_> = (0..args.conns)
        .map(|i| {
            let ready = ready.clone();
            let bytes = share(args.bytes, args.conns, i);
            std::thread::Builder::new()
                .name(format!("bulk-{i}"))
                .spawn(move || connection(addr, bytes, &ready))
                .context("starting a connection thread")
        })
        .collect::<Result<_>>()?;
    ready.wait();
    let start = Instant::now();
    let mut last = start;
    let mut failure = None;
    for t in threads {
        match t
            .join()
            .map_err(|_| anyhow::anyhow!("a connection thread panicked"))?
        {
            Ok(done) => last = last.max(done),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let report = Report::new(args.bytes, args.conns, last - start);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One connection: open, warm, wait for the others, send `bytes`; when the server acknowledged
/// them. A connection that fails still reaches the barrier, so the others are not stranded.
fn connection(addr: SocketAddr, bytes: u64, ready: &Barrier) -> Result<Instant> {
    let warm = open(addr).and_then(|mut stream| {
        transfer(&mut stream, 1, &[0])?;
        Ok(stream)
    });
    ready.wait();
    let mut stream = warm?;
    let buf = vec![b'b'; CHUNK];
    transfer(&mut stream, bytes, &buf)?;
    Ok(Instant::now())
}

fn open(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    stream.set_write_timeout(Some(STALL_TIMEOUT))?;
    Ok(stream)
}

/// Sends `bytes` (from `buf`, repeated) and waits for the server's count of them.
fn transfer(stream: &mut TcpStream, bytes: u64, buf: &[u8]) -> Result<()> {
    stream
        .write_all(&bytes.to_be_bytes())
        .context("sending a transfer's length")?;
    let mut left = bytes;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("sending ({} of {bytes} bytes sent)", bytes - left))?;
        left -= n as u64;
    }
    let mut ack = [0u8; 8];
    stream
        .read_exact(&mut ack)
        .context("waiting for the server's acknowledgement")?;
    let counted = u64::from_be_bytes(ack);
    if counted != bytes {
        bail!("the server counted {counted} bytes of {bytes}");
    }
    Ok(())
}

/// Accepts bulk connections on `listener` forever.
pub async fn serve(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("weft-loadgen: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = receive(stream).await {
                eprintln!("weft-loadgen: bulk connection ended: {e:#}");
            }
        });
    }
}

/// Transfers until the client closes the connection between two of them.
async fn receive(mut stream: tokio::net::TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut len = [0u8; 8];
        match stream.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading a transfer's length"),
        }
        let bytes = u64::from_be_bytes(len);
        let mut left = bytes;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                bail!("the client closed after {} of {bytes} bytes", bytes - left);
            }
            left -= n as u64;
        }
        stream.write_all(&bytes.to_be_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        let gib = 1u64 << 30;
        assert_eq!(share(gib, 8, 0), gib / 8);
        assert_eq!((0..8).map(|i| share(gib, 8, i)).sum::<u64>(), gib);
        assert_eq!(
            (0..3).map(|i| share(10, 3, i)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
    }

    #[test]
    fn gigabits_as_iperf_counts_them() {
        let report = Report::new(1 << 30, 1, Duration::from_secs(1));
        assert_eq!(report.gbit_s, 8.59);
        assert_eq!(report.seconds, 1.0);
    }
}
