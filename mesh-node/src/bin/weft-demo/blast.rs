//! `blast`: many parallel connections to an echo server, each streaming its own seeded
//! pseudo-random bytes while reading the echo back, verified byte for byte. Proves a data
//! path neither drops, duplicates, reorders nor mixes bytes between connections, and
//! measures its throughput.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::net;
use crate::pattern::{first_difference, Pattern};

/// Write and read size: big enough for full-speed loopback, small enough for 64 parallel
/// connections.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Echo server `host:port`; the host may be a name from /etc/hosts.
    addr: String,
    /// Parallel connections.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Bytes each connection sends (and expects back).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    bytes: u64,
    /// Budget for each connection, connect and whole transfer included.
    #[arg(long, default_value_t = 120_000)]
    timeout_ms: u64,
}

/// The printed summary; `gbit_s` counts payload of successful connections, one direction.
#[derive(Debug, Serialize)]
pub struct Report {
    conns: usize,
    bytes_each_way: u64,
    ok: bool,
    failed: Vec<Failure>,
    elapsed_ms: u64,
    gbit_s: f64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Failure {
    conn: usize,
    error: String,
    /// First byte offset that differs (content mismatch) or where the echo stopped (short).
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let report = blast(&args.addr, args.conns, args.bytes, timeout).await;
    println!("{}", serde_json::to_string(&report)?);
    if report.ok {
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} connections to {} failed",
            report.failed.len(),
            report.conns,
            args.addr
        )
    }
}

pub async fn blast(addr: &str, conns: usize, bytes: u64, timeout: Duration) -> Report {
    let addr: Arc<str> = addr.into();
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|conn| {
            let addr = Arc::clone(&addr);
            tokio::spawn(async move {
                tokio::time::timeout(timeout, one_connection(&addr, conn, bytes, timeout))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::new(
                            conn,
                            format!("not done within {} ms", timeout.as_millis()),
                        ))
                    })
            })
        })
        .collect();
    let mut failed = Vec::new();
    for (conn, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => failed.push(failure),
            Err(err) => failed.push(Failure::new(conn, format!("task failed: {err}"))),
        }
    }
    let elapsed = started.elapsed();
    let succeeded = conns - failed.len();
    Report {
        conns,
        bytes_each_way: bytes,
        ok: failed.is_empty(),
        failed,
        elapsed_ms: elapsed.as_millis() as u64,
        gbit_s: gbit_per_s(succeeded as u64 * bytes, elapsed),
    }
}

async fn one_connection(
    addr: &str,
    conn: usize,
    bytes: u64,
    timeout: Duration,
) -> Result<(), Failure> {
    let stream = net::connect(addr, timeout)
        .await
        .map_err(|err| Failure::new(conn, err.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let seed = conn as u64;
    let io_failure = |what: &str, err: std::io::Error| {
        Failure::new(conn, format!("{what} failed: {}", net::describe(&err)))
    };
    let send = async {
        send_stream(writer, seed, bytes)
            .await
            .map_err(|err| io_failure("write", err))
    };
    let verify = async {
        match verify_stream(reader, seed).await {
            Ok(verdict) => verdict.into_result(conn, bytes),
            Err(err) => Err(io_failure("read", err)),
        }
    };
    tokio::try_join!(send, verify).map(|_| ())
}

/// Writes `bytes` bytes of the seeded stream, then closes the write side.
async fn send_stream(
    mut writer: impl AsyncWrite + Unpin,
    seed: u64,
    bytes: u64,
) -> std::io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        pattern.fill(&mut buf[..n]);
        writer.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    writer.shutdown().await
}

/// What came back, compared with the seeded stream.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    received: u64,
    first_mismatch: Option<u64>,
}

/// Reads to EOF, comparing every byte with the seeded stream.
async fn verify_stream(mut reader: impl AsyncRead + Unpin, seed: u64) -> std::io::Result<Verdict> {
    let mut expected = Pattern::new(seed);
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut verdict = Verdict {
        received: 0,
        first_mismatch: None,
    };
    loop {
        let n = reader.read(&mut got).await?;
        if n == 0 {
            return Ok(verdict);
        }
        expected.fill(&mut want[..n]);
        if verdict.first_mismatch.is_none() {
            verdict.first_mismatch =
                first_difference(&got[..n], &want[..n]).map(|at| verdict.received + at as u64);
        }
        verdict.received += n as u64;
    }
}

impl Verdict {
    fn into_result(self, conn: usize, bytes: u64) -> Result<(), Failure> {
        let Self {
            received,
            first_mismatch,
        } = self;
        match first_mismatch {
            Some(offset) if offset < bytes => Err(Failure {
                conn,
                error: "echoed bytes differ from those sent".into(),
                offset: Some(offset),
            }),
            _ if received < bytes => Err(Failure {
                conn,
                error: format!("echo ended after {received} of {bytes} bytes"),
                offset: Some(received),
            }),
            _ if received > bytes => Err(Failure {
                conn,
                error: format!("echo sent {received} bytes, {bytes} expected"),
                offset: Some(bytes),
            }),
            _ => Ok(()),
        }
    }
}

impl Failure {
    fn new(conn: usize, error: String) -> Self {
        Self {
            conn,
            error,
            offset: None,
        }
    }
}

fn gbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs == 0.0 {
        return 0.0;
    }
    let gbit = bytes as f64 * 8.0 / secs / 1e9;
    (gbit * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::{TcpListener, TcpStream};

    const BUDGET: Duration = Duration::from_secs(30);

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(crate::tcp::serve_echo(listener));
        addr
    }

    /// An "echo" that applies `mangle` to everything it sends back.
    async fn mangling_server(mangle: fn(Vec<u8>) -> Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                tokio::spawn(mangle_one(stream, mangle));
            }
        });
        addr
    }

    async fn mangle_one(mut stream: TcpStream, mangle: fn(Vec<u8>) -> Vec<u8>) {
        let mut all = Vec::new();
        if stream.read_to_end(&mut all).await.is_ok() {
            let _ = stream.write_all(&mangle(all)).await;
            let _ = stream.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clean_echo_passes_every_connection() {
        let addr = echo_server().await;
        let report = blast(&addr.to_string(), 8, 1 << 20, BUDGET).await;
        assert!(report.ok, "{report:?}");
        assert!(report.failed.is_empty());
        assert_eq!(report.conns, 8);
        assert_eq!(report.bytes_each_way, 1 << 20);
        assert!(report.gbit_s > 0.0);
    }

    #[tokio::test]
    async fn odd_sizes_and_zero_bytes_pass() {
        let addr = echo_server().await;
        for bytes in [0, 1, 7, CHUNK as u64 + 3] {
            let report = blast(&addr.to_string(), 2, bytes, BUDGET).await;
            assert!(report.ok, "{bytes} bytes: {report:?}");
        }
    }

    #[tokio::test]
    async fn corrupted_byte_is_reported_with_its_offset() {
        let addr = mangling_server(|mut data| {
            if let Some(byte) = data.get_mut(1000) {
                *byte ^= 0xff;
            }
            data
        })
        .await;
        let report = blast(&addr.to_string(), 3, 4096, BUDGET).await;
        assert!(!report.ok);
        assert_eq!(report.failed.len(), 3);
        for (conn, failure) in report.failed.iter().enumerate() {
            assert_eq!(failure.conn, conn);
            assert_eq!(failure.offset, Some(1000), "{failure:?}");
        }
    }

    #[tokio::test]
    async fn truncated_echo_is_reported_as_short() {
        let addr = mangling_server(|mut data| {
            data.truncate(100);
            data
        })
        .await;
        let report = blast(&addr.to_string(), 1, 4096, BUDGET).await;
        assert_eq!(
            report.failed,
            vec![Failure {
                conn: 0,
                error: "echo ended after 100 of 4096 bytes".into(),
                offset: Some(100),
            }]
        );
    }

    #[tokio::test]
    async fn swapped_streams_are_caught() {
        // A path that mixed up connections would echo another connection's bytes.
        let mut other = vec![0u8; 64];
        Pattern::new(1).fill(&mut other);
        let verdict = verify_stream(&other[..], 0).await.expect("read");
        assert!(verdict.into_result(0, 64).is_err());
    }

    #[tokio::test]
    async fn refused_connections_are_listed() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let report = blast(&format!("127.0.0.1:{port}"), 2, 10, BUDGET).await;
        assert!(!report.ok);
        assert_eq!(report.failed.len(), 2);
        assert!(
            report.failed[0].error.contains("Connection refused"),
            "{report:?}"
        );
    }

    #[test]
    fn report_serialises_as_one_json_line_without_absent_offsets() {
        let report = Report {
            conns: 2,
            bytes_each_way: 10,
            ok: false,
            failed: vec![Failure::new(1, "boom".into())],
            elapsed_ms: 5,
            gbit_s: 0.5,
        };
        let line = serde_json::to_string(&report).expect("serialise");
        assert_eq!(
            line,
            r#"{"conns":2,"bytes_each_way":10,"ok":false,"failed":[{"conn":1,"error":"boom"}],"elapsed_ms":5,"gbit_s":0.5}"#
        );
    }

    #[test]
    fn throughput_is_payload_bits_per_second() {
        assert_eq!(gbit_per_s(1_000_000_000, Duration::from_secs(8)), 1.0);
        assert_eq!(gbit_per_s(1, Duration::ZERO), 0.0);
    }
}
