//! `echo`: what a new connection costs, ztunnel's `connections` benchmark over the network.
//! One after the other: connect, send one byte, read it back, close. The latency of each runs
//! from before `connect` to the byte read back (the close, which the client does not wait
//! for, is left out, as in ztunnel's). The first `--warmup` connections are not recorded.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::client::latency_histogram;

/// How long a connect or the echo may take before the connection counts as failed.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The byte sent and expected back.
const BYTE: u8 = b'e';

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server `host:port` (its echo port).
    pub addr: String,
    /// Connections measured.
    #[arg(long, default_value_t = 2000)]
    pub count: u64,
    /// Connections made first and not recorded.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
}

/// What `echo` prints, one JSON object.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Connections measured (echoed).
    pub connections: u64,
    /// Connections made in all, warm-up and failures included.
    pub total_connections: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Report {
    fn new(
        histogram: &Histogram<u64>,
        total: u64,
        errors: u64,
        first_error: Option<String>,
    ) -> Self {
        let us = |ns: f64| (ns / 100.0).round() / 10.0;
        let at = |q: f64| us(histogram.value_at_quantile(q) as f64);
        Self {
            connections: histogram.len(),
            total_connections: total,
            errors,
            first_error,
            mean_us: us(histogram.mean()),
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: us(histogram.max() as f64),
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let addr = args
        .addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} has no address", args.addr))?;
    let mut histogram = latency_histogram();
    let (mut total, mut errors, mut first_error) = (0u64, 0u64, None);
    let mut warm = 0;
    while histogram.len() < args.count {
        total += 1;
        match echo(addr) {
            Ok(_) if warm < args.warmup => warm += 1,
            Ok(latency) => {
                let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
                histogram.saturating_record(ns);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
                // As many failures as successes wanted: the path is broken, not slow.
                if errors > args.count.max(10) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let report = Report::new(&histogram, total, errors, first_error);
    println!("{}", serde_json::to_string(&report)?);
    if report.connections == 0 {
        bail!(
            "no connection was echoed: {}",
            report.first_error.as_deref().unwrap_or("no error seen")
        );
    }
    Ok(())
}

/// One connection: connect, one byte there and back; the socket closes when dropped.
fn echo(addr: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(&[BYTE]).context("sending the byte")?;
    let mut back = [0u8; 1];
    stream
        .read_exact(&mut back)
        .context("reading the byte back")?;
    let latency = start.elapsed();
    if back[0] != BYTE {
        bail!("the server echoed {:?}, not {:?}", back[0], BYTE);
    }
    Ok(latency)
}

/// Accepts echo connections on `listener` forever: every byte read is written back.
pub async fn serve(listener: TcpListener) -> Result<()> {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("weft-loadgen: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_in_microseconds() {
        let mut histogram = latency_histogram();
        for us in 1..=1000u64 {
            histogram.record(us * 1000).unwrap();
        }
        let report = Report::new(&histogram, 1100, 2, Some("refused".into()));
        assert_eq!(report.connections, 1000);
        assert_eq!(report.total_connections, 1100);
        assert!((report.mean_us - 500.5).abs() < 1.0, "{}", report.mean_us);
        assert!((report.p50_us - 500.0).abs() < 1.0, "{}", report.p50_us);
        assert!((report.p99_us - 990.0).abs() < 1.0, "{}", report.p99_us);
    }
}
