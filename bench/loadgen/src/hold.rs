//! `hold`: what an idle connection costs the mesh. Opens `--conns` connections to the server's
//! echo port, proves each one with a 1-byte echo, then keeps them all open and idle for
//! `--seconds` (or until standard input closes, with `--until-eof`: how `cargo xtask bench`
//! ends the hold once it has measured), and closes them.
//!
//! Two JSON lines: one when every connection is open (or failed), with `"phase":"open"`, so
//! that whoever measures knows when to; and one when they are closed, `"phase":"closed"`, which
//! also counts the connections the other side closed while they were held.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::sys;

/// How long a connect or the echo may take before the connection counts as failed.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The byte sent and expected back.
const BYTE: u8 = b'h';
/// Files the process needs besides the connections (standard streams, the runtime's).
const SPARE_FILES: u64 = 64;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server `host:port` (its echo port).
    pub addr: String,
    /// Connections opened and held.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// How long the connections stay open and idle once all are open, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Also close them as soon as standard input reaches its end.
    #[arg(long)]
    pub until_eof: bool,
    /// Threads opening connections at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
}

/// What `hold` prints, twice: when the connections are open, and when they are closed.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `open` (all connections opened or failed, now idle) or `closed`.
    pub phase: &'static str,
    /// Connections asked for.
    pub conns: usize,
    /// Connections open and echoed.
    pub established: usize,
    /// Connections asked for and not established (failed, or not tried once too many had
    /// failed).
    pub failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Seconds from the first connect to the last connection echoed.
    pub open_s: f64,
    /// Seconds the connections were held open and idle (0 in the `open` line).
    pub held_s: f64,
    /// Established connections the other side had closed (or reset) by the end of the hold.
    pub closed_early: usize,
    /// The process's limit of open files.
    pub open_files_limit: u64,
}

impl Report {
    fn print(&self) -> Result<()> {
        // One line each, flushed at once: the reader acts on the first before the second.
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(self)?)?;
        out.flush()?;
        Ok(())
    }
}

/// Connections opened so far, and the failures, shared by the opening threads.
#[derive(Default)]
struct Progress {
    next: AtomicUsize,
    failures: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// After this many failures no more connections are tried: the path is broken or full, and
/// each failure may cost a timeout.
fn failure_budget(conns: usize) -> u64 {
    (conns as u64 / 100).max(10)
}

pub fn run(args: Args) -> Result<()> {
    if args.conns == 0 {
        bail!("--conns must be at least 1");
    }
    if !(args.seconds >= 0.0 && args.seconds.is_finite()) {
        bail!("--seconds must be a duration in seconds");
    }
    let addr = args
        .addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} has no address", args.addr))?;
    let wanted = args.conns as u64 + SPARE_FILES;
    let open_files_limit = sys::raise_open_files(wanted).context("raising RLIMIT_NOFILE")?;
    if open_files_limit < wanted {
        bail!(
            "{} connections need {wanted} open files and the limit is {open_files_limit} \
             (hard limit; run as root or raise `ulimit -n`)",
            args.conns
        );
    }

    let start = Instant::now();
    let progress = Arc::new(Progress::default());
    let budget = failure_budget(args.conns);
    let threads: Vec<_> = (0..args.parallel.clamp(1, args.conns))
        .map(|i| {
            let progress = progress.clone();
            let conns = args.conns;
            std::thread::Builder::new()
                .name(format!("hold-{i}"))
                .spawn(move || open_share(addr, conns, budget, &progress))
                .context("starting an opening thread")
        })
        .collect::<Result<_>>()?;
    let mut streams = Vec::with_capacity(args.conns);
    for t in threads {
        streams.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("an opening thread panicked"))?,
        );
    }
    let open_s = start.elapsed().as_secs_f64();
    let first_error = progress.first_error.lock().map_or(None, |e| e.clone());
    let mut report = Report {
        phase: "open",
        conns: args.conns,
        established: streams.len(),
        failed: args.conns - streams.len(),
        first_error,
        open_s: round3(open_s),
        held_s: 0.0,
        closed_early: 0,
        open_files_limit,
    };
    report.print()?;

    let held = Instant::now();
    wait(Duration::from_secs_f64(args.seconds), args.until_eof);
    report.phase = "closed";
    report.held_s = round3(held.elapsed().as_secs_f64());
    report.closed_early = streams.iter().filter(|s| !still_open(s)).count();
    drop(streams);
    report.print()?;
    if report.established == 0 {
        bail!(
            "no connection was established: {}",
            report.first_error.as_deref().unwrap_or("no error seen")
        );
    }
    Ok(())
}

/// Opens connections until `conns` have been tried (by all threads together) or the failure
/// budget is spent; returns the ones established.
fn open_share(addr: SocketAddr, conns: usize, budget: u64, progress: &Progress) -> Vec<TcpStream> {
    let mut mine = Vec::new();
    while progress.failures.load(Ordering::Relaxed) < budget
        && progress.next.fetch_add(1, Ordering::Relaxed) < conns
    {
        match open(addr) {
            Ok(stream) => mine.push(stream),
            Err(e) => {
                progress.failures.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = progress.first_error.lock() {
                    first.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
    }
    mine
}

/// One connection, proven with one byte there and back.
fn open(addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(&[BYTE]).context("sending the byte")?;
    let mut back = [0u8; 1];
    stream
        .read_exact(&mut back)
        .context("reading the byte back")?;
    if back[0] != BYTE {
        bail!("the server echoed {:?}, not {:?}", back[0], BYTE);
    }
    Ok(stream)
}

/// Sleeps `seconds`, or less when `until_eof` and standard input ends first.
fn wait(seconds: Duration, until_eof: bool) {
    if !until_eof {
        std::thread::sleep(seconds);
        return;
    }
    let (tx, rx) = mpsc::channel();
    // Left behind blocked on a terminal when the time runs out first; the process ends soon.
    let _ = std::thread::Builder::new()
        .name("hold-stdin".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = tx.send(());
        });
    let _ = rx.recv_timeout(seconds);
}

/// Whether the other side has not closed or reset an idle connection: nothing to read yet.
fn still_open(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(stream.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_budget_grows_with_the_connections() {
        assert_eq!(failure_budget(1), 10);
        assert_eq!(failure_budget(1000), 10);
        assert_eq!(failure_budget(10_000), 100);
    }

    #[test]
    fn report_lines() {
        let report = Report {
            phase: "open",
            conns: 1000,
            established: 998,
            failed: 2,
            first_error: None,
            open_s: 0.5,
            held_s: 0.0,
            closed_early: 0,
            open_files_limit: 20_000,
        };
        let line = serde_json::to_string(&report).unwrap();
        assert!(line.starts_with(r#"{"phase":"open","conns":1000,"established":998,"failed":2,"#));
        assert!(!line.contains("first_error"), "{line}");
    }

    /// A connection the server closed is no longer open; one it keeps is.
    #[test]
    fn tells_closed_connections_from_open_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let kept = TcpStream::connect(addr).unwrap();
        let (_kept_server, _) = listener.accept().unwrap();
        let closed = TcpStream::connect(addr).unwrap();
        drop(listener.accept().unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while still_open(&closed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!still_open(&closed));
        assert!(still_open(&kept));
    }
}
