//! `run`: the load. Two methods:
//!
//! - **Fixed rate** (open loop, wrk2's method): each connection has a schedule of intended send
//!   times (`rate / conns` per second, connections staggered). A request goes out at its
//!   intended time, or at once when the previous answer came late, and its latency is measured
//!   from the intended time, so a stall counts for every request it delayed (no coordinated
//!   omission). One OS thread per connection, blocking I/O (for gRPC: the thread's own
//!   single-threaded tokio runtime, entered only to make a call), a timer slack of 1 ns so
//!   that the generator's own wake-ups do not add ~50 µs to every sample.
//! - **Closed loop** (`--rate 0`): every connection sends its next request as soon as the
//!   previous answer arrived (gRPC too: one call in flight per HTTP/2 connection); the result is the throughput. Epoll-driven (tokio), so 64
//!   connections cost the generator two threads, not 64.
//!
//! Requests whose intended (or actual) send time falls in the warm-up are answered but not
//! recorded.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    grpc,
    protocol::{self, Framing, Protocol},
    sys,
    timeline::{self, Interval, Timeline},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server `host:port` (a name from /etc/hosts works).
    pub addr: String,
    /// Wire protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    pub protocol: Protocol,
    /// Requests per second over all connections; 0 runs closed loop (saturation).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Connections, each with one request in flight.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 60.0)]
    pub duration_s: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Expected bytes of each response body.
    #[arg(long, default_value_t = 1024)]
    pub response_bytes: usize,
    /// Worker threads of the closed loop.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Fixed rate only: also report the measured window cut into intervals of this many
    /// seconds (requests, failures and latency in each).
    #[arg(long)]
    pub interval_s: Option<f64>,
    /// Fixed rate only: a new connection for every request (its connect counts in the
    /// latency), as a client without keep-alive.
    #[arg(long)]
    pub new_conn: bool,
}

/// What `run` prints, one JSON object.
#[derive(Debug, Serialize)]
pub struct Report {
    pub protocol: Protocol,
    /// `fixed-rate` or `closed-loop`.
    pub method: &'static str,
    pub rate: u64,
    pub conns: usize,
    pub duration_s: f64,
    /// Requests answered in the measured window.
    pub requests: u64,
    /// Requests answered in all, warm-up included (what the mesh processed during the run).
    pub total_requests: u64,
    pub errors: u64,
    /// The first error, for the operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// With `--interval-s`: when the window opened (ms since the Unix epoch), and the window
    /// cut into intervals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intervals: Option<Vec<Interval>>,
}

/// Samples and counts of one connection (or of all, merged).
struct Tally {
    histogram: Histogram<u64>,
    requests: u64,
    total: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            histogram: latency_histogram(),
            requests: 0,
            total: 0,
            errors: 0,
            first_error: None,
        }
    }

    fn record(&mut self, latency: Duration, measured: bool) {
        self.total += 1;
        if measured {
            self.requests += 1;
            let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
            self.histogram.saturating_record(ns);
        }
    }

    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }

    fn merge(&mut self, other: Tally) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms of equal bounds");
        self.requests += other.requests;
        self.total += other.total;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn report(self, args: &Args, method: &'static str, measured: Duration) -> Report {
        let us = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1000.0;
        let rps = self.requests as f64 / measured.as_secs_f64().max(1e-9);
        Report {
            protocol: args.protocol,
            method,
            rate: args.rate,
            conns: args.conns,
            duration_s: measured.as_secs_f64(),
            requests: self.requests,
            total_requests: self.total,
            errors: self.errors,
            first_error: self.first_error,
            rps: (rps * 10.0).round() / 10.0,
            p50_us: round1(us(0.5)),
            p90_us: round1(us(0.9)),
            p99_us: round1(us(0.99)),
            p999_us: round1(us(0.999)),
            max_us: round1(self.histogram.max() as f64 / 1000.0),
            window_start_unix_ms: None,
            intervals: None,
        }
    }
}

/// Latencies in nanoseconds, 1 ns .. 100 s at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The load `args` describe, and its report.
pub fn measure(args: &Args) -> Result<Report> {
    if args.conns == 0 {
        bail!("--conns must be at least 1");
    }
    if args.rate == 0 && (args.interval_s.is_some() || args.new_conn) {
        bail!("--interval-s and --new-conn are for a fixed rate, not the closed loop (--rate 0)");
    }
    if args.interval_s.is_some_and(|s| s.is_nan() || s < 0.001) {
        bail!("--interval-s must be at least 0.001");
    }
    let addr = args
        .addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} has no address", args.addr))?;
    if args.rate == 0 {
        closed_loop(args, addr)
    } else {
        fixed_rate(args, addr)
    }
}

pub fn run(args: Args) -> Result<()> {
    let report = measure(&args)?;
    println!("{}", serde_json::to_string(&report)?);
    if report.requests == 0 {
        bail!(
            "no request was answered: {}",
            report.first_error.as_deref().unwrap_or("no error seen")
        );
    }
    Ok(())
}

/// The schedule of one connection: request `k` is due at `first + k * interval`.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    first: Instant,
    interval: Duration,
}

impl Schedule {
    /// Connection `index` of `conns` sharing `rate` requests per second, staggered evenly.
    fn new(start: Instant, rate: u64, conns: usize, index: usize) -> Self {
        let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
        let offset = interval.mul_f64(index as f64 / conns as f64);
        Self {
            first: start + offset,
            interval,
        }
    }

    fn due(&self, k: u64) -> Instant {
        self.first + Duration::from_nanos((self.interval.as_nanos() as u64).saturating_mul(k))
    }
}

fn fixed_rate(args: &Args, addr: SocketAddr) -> Result<Report> {
    let protocol = args.protocol;
    let body = args.response_bytes;
    // Connections first, so the schedule does not start with connects.
    let conns: Vec<Option<FixedConn>> = (0..args.conns)
        .map(|_| {
            if args.new_conn {
                Ok(None)
            } else {
                FixedConn::open(addr, protocol, body).map(Some)
            }
        })
        .collect::<Result<_>>()?;
    let start = Instant::now() + Duration::from_millis(10);
    let measure_from = start + Duration::from_secs_f64(args.warmup_s);
    let end = measure_from + Duration::from_secs_f64(args.duration_s);
    let timeline = args.interval_s.is_some();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let schedule = Schedule::new(start, args.rate, args.conns, i);
            let window = Window {
                measure_from,
                end,
                timeline,
            };
            std::thread::Builder::new()
                .name(format!("conn-{i}"))
                .spawn(move || fixed_rate_connection(conn, addr, protocol, body, schedule, window))
                .context("starting a connection thread")
        })
        .collect::<Result<_>>()?;
    let mut tally = Tally::new();
    let mut events = Timeline::default();
    for t in threads {
        let (conn_tally, conn_events) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a connection thread panicked"))?;
        tally.merge(conn_tally);
        events.merge(conn_events);
    }
    let mut report = tally.report(args, "fixed-rate", end - measure_from);
    if let Some(interval_s) = args.interval_s {
        report.window_start_unix_ms = Some(timeline::unix_ms(measure_from));
        report.intervals =
            Some(events.intervals(Duration::from_secs_f64(interval_s), end - measure_from));
    }
    Ok(report)
}

/// The measured part of a fixed-rate run, and whether its requests are kept by time.
#[derive(Clone, Copy, Debug)]
struct Window {
    measure_from: Instant,
    end: Instant,
    timeline: bool,
}

/// One connection's schedule. `conn` is `None` with `--new-conn`: every request then opens
/// its own connection.
fn fixed_rate_connection(
    mut conn: Option<FixedConn>,
    addr: SocketAddr,
    protocol: Protocol,
    body: usize,
    schedule: Schedule,
    window: Window,
) -> (Tally, Timeline) {
    sys::precise_sleeps();
    let new_conn = conn.is_none();
    let mut tally = Tally::new();
    let mut events = Timeline::default();
    for k in 0.. {
        let due = schedule.due(k);
        if due >= window.end {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let measured = due >= window.measure_from;
        let outcome = if new_conn {
            FixedConn::open(addr, protocol, body).and_then(|mut c| c.exchange(body).map(drop))
        } else {
            let open = match conn.take() {
                Some(c) => Ok(c),
                None => FixedConn::open(addr, protocol, body),
            };
            open.and_then(|mut c| {
                if !c.exchange(body)? {
                    conn = Some(c);
                }
                Ok(())
            })
        };
        match outcome {
            Ok(()) => {
                let latency = due.elapsed();
                tally.record(latency, measured);
                if measured && window.timeline {
                    events.answered(due - window.measure_from, latency);
                }
            }
            Err(e) => {
                if measured && window.timeline {
                    events.failed(due - window.measure_from, &e);
                }
                tally.error(&e);
                if !new_conn {
                    // A fresh connection for the next request (or, when none opens, at the
                    // next request's time); the schedule keeps running, so the time lost
                    // shows in the next requests' latency.
                    conn = FixedConn::open(addr, protocol, body).ok();
                    if conn.is_none() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }
    (tally, events)
}

/// One connection of the fixed-rate load, used by one thread: a blocking socket, or an HTTP/2
/// connection driven by a single-threaded runtime of its own between requests.
#[allow(
    clippy::large_enum_variant,
    reason = "one per connection thread, never moved on a hot path"
)]
enum FixedConn {
    Raw {
        stream: TcpStream,
        framing: Framing,
        request: Vec<u8>,
        buf: Vec<u8>,
    },
    Grpc {
        runtime: tokio::runtime::Runtime,
        channel: grpc::Channel,
        call: grpc::Call,
        addr: SocketAddr,
    },
}

impl FixedConn {
    fn open(addr: SocketAddr, protocol: Protocol, body: usize) -> Result<Self> {
        Ok(match protocol.framing() {
            Some(framing) => FixedConn::Raw {
                stream: connect(addr)?,
                framing,
                request: framing.request(),
                buf: Vec::with_capacity(body + 512),
            },
            None => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let channel = runtime.block_on(grpc::Channel::connect(addr))?;
                FixedConn::Grpc {
                    runtime,
                    channel,
                    call: grpc::Call::new(addr, body),
                    addr,
                }
            }
        })
    }

    /// One request, one complete response; whether the connection takes no more requests
    /// after it (the server said `Connection: close`, or its HTTP/2 connection closed), so
    /// that the next one goes on a new connection, as clients do.
    fn exchange(&mut self, body: usize) -> Result<bool> {
        match self {
            FixedConn::Raw {
                stream,
                framing,
                request,
                buf,
            } => exchange(stream, request, buf, *framing, body),
            FixedConn::Grpc {
                runtime,
                channel,
                call,
                addr,
            } => runtime
                .block_on(async {
                    tokio::time::timeout(RESPONSE_TIMEOUT, async {
                        // A connection closed since the last call (its server drained it): the
                        // call goes on a new one, as a gRPC client's channel does.
                        if channel.is_closed().await {
                            *channel = grpc::Channel::connect(*addr).await?;
                        }
                        channel.call(call).await
                    })
                    .await
                })
                .map_err(|_| no_response())?
                .map(|()| false),
        }
    }
}

/// How long a response may take before the request counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

fn no_response() -> anyhow::Error {
    anyhow::anyhow!("no response within {} s", RESPONSE_TIMEOUT.as_secs())
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
    Ok(stream)
}

/// One request, one complete response, on a blocking socket; whether the server closes the
/// connection after it (`Connection: close`).
fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
    framing: Framing,
    body: usize,
) -> Result<bool> {
    stream.write_all(request).context("sending a request")?;
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(n) = framing.response_len(buf, body)? {
            let closes = framing == Framing::Http && protocol::says_close(buf);
            buf.drain(..n);
            return Ok(closes);
        }
        let n = stream.read(&mut chunk).context("reading a response")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn closed_loop(args: &Args, addr: SocketAddr) -> Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let protocol = args.protocol;
    let body = args.response_bytes;
    let conns = args.conns;
    let (warmup, duration) = (args.warmup_s, args.duration_s);
    let tally = runtime.block_on(async move {
        let mut opened = Vec::with_capacity(conns);
        for _ in 0..conns {
            opened.push(LoopConn::open(addr, protocol, body).await?);
        }
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(warmup);
        let end = measure_from + Duration::from_secs_f64(duration);
        let tasks: Vec<_> = opened
            .into_iter()
            .map(|conn| {
                tokio::spawn(closed_loop_connection(
                    conn,
                    addr,
                    protocol,
                    body,
                    measure_from,
                    end,
                ))
            })
            .collect();
        let mut tally = Tally::new();
        for t in tasks {
            tally.merge(t.await.context("a connection task failed")?);
        }
        Ok::<_, anyhow::Error>((tally, end - measure_from))
    })?;
    let (tally, measured) = tally;
    Ok(tally.report(args, "closed-loop", measured))
}

async fn closed_loop_connection(
    mut conn: LoopConn,
    addr: SocketAddr,
    protocol: Protocol,
    body: usize,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally::new();
    loop {
        let sent = Instant::now();
        if sent >= end {
            return tally;
        }
        match tokio::time::timeout(RESPONSE_TIMEOUT, conn.exchange(body)).await {
            Ok(Ok(closes)) => {
                tally.record(sent.elapsed(), sent >= measure_from);
                if closes {
                    match LoopConn::open(addr, protocol, body).await {
                        Ok(c) => conn = c,
                        Err(e) => {
                            tally.error(&e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                tally.error(&e);
                match LoopConn::open(addr, protocol, body).await {
                    Ok(c) => conn = c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            Err(_) => {
                tally.error(&no_response());
                return tally;
            }
        }
    }
}

/// One connection of the closed loop, a task of the load generator's runtime.
enum LoopConn {
    Raw {
        stream: tokio::net::TcpStream,
        framing: Framing,
        request: Vec<u8>,
        buf: Vec<u8>,
        chunk: Vec<u8>,
    },
    Grpc {
        channel: grpc::Channel,
        call: grpc::Call,
        addr: SocketAddr,
    },
}

impl LoopConn {
    async fn open(addr: SocketAddr, protocol: Protocol, body: usize) -> Result<Self> {
        Ok(match protocol.framing() {
            Some(framing) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                stream.set_nodelay(true)?;
                LoopConn::Raw {
                    stream,
                    framing,
                    request: framing.request(),
                    buf: Vec::with_capacity(body + 512),
                    chunk: vec![0u8; 8192],
                }
            }
            None => LoopConn::Grpc {
                channel: grpc::Channel::connect(addr).await?,
                call: grpc::Call::new(addr, body),
                addr,
            },
        })
    }

    /// One request, one complete response; whether the connection takes no more requests
    /// after it.
    async fn exchange(&mut self, body: usize) -> Result<bool> {
        match self {
            LoopConn::Raw {
                stream,
                framing,
                request,
                buf,
                chunk,
            } => {
                stream
                    .write_all(request)
                    .await
                    .context("sending a request")?;
                loop {
                    if let Some(n) = framing.response_len(buf, body)? {
                        let closes = *framing == Framing::Http && protocol::says_close(buf);
                        buf.drain(..n);
                        return Ok(closes);
                    }
                    let n = stream.read(chunk).await.context("reading a response")?;
                    if n == 0 {
                        bail!("the server closed the connection");
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            LoopConn::Grpc {
                channel,
                call,
                addr,
            } => {
                if channel.is_closed().await {
                    *channel = grpc::Channel::connect(*addr).await?;
                }
                channel.call(call).await.map(|()| false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_spread_the_rate_over_the_connections() {
        let start = Instant::now();
        let schedules: Vec<Schedule> = (0..4).map(|i| Schedule::new(start, 1000, 4, i)).collect();
        for s in &schedules {
            assert_eq!(s.interval, Duration::from_millis(4));
            assert_eq!(s.due(250) - s.first, Duration::from_secs(1));
        }
        assert_eq!(schedules[1].first - start, Duration::from_millis(1));
        assert_eq!(schedules[3].first - start, Duration::from_millis(3));
    }

    #[test]
    fn percentiles_come_from_measured_requests_only() {
        let mut tally = Tally::new();
        tally.record(Duration::from_secs(1), false);
        for us in 1..=1000 {
            tally.record(Duration::from_micros(us), true);
        }
        let args = Args {
            addr: String::new(),
            protocol: Protocol::Tcp,
            rate: 1000,
            conns: 4,
            duration_s: 1.0,
            warmup_s: 0.0,
            response_bytes: 1024,
            threads: 1,
            interval_s: None,
            new_conn: false,
        };
        let report = tally.report(&args, "fixed-rate", Duration::from_secs(1));
        assert_eq!(report.requests, 1000);
        assert_eq!(report.total_requests, 1001);
        assert_eq!(report.rps, 1000.0);
        assert!((report.p50_us - 500.0).abs() < 1.0, "{}", report.p50_us);
        assert!((report.p99_us - 990.0).abs() < 1.0, "{}", report.p99_us);
        assert!(report.max_us < 1001.0);
    }
}
