//! `dial`: one connection, reported the way tests assert on it:
//! `peername=` (what getpeername says — the mesh must keep the dialled address),
//! `local=`, then `said=` with the first line the server sent before EOF.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::net;

/// More than any test server says; the rest is read and dropped.
const KEEP_BYTES: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `host:port`; the host may be a name from /etc/hosts.
    addr: String,
    /// Budget for connecting, and again for reading until the server closes.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Send this text and a newline, then close the write side (for echo servers).
    #[arg(long)]
    send: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    dial(&args, &mut std::io::stdout()).await
}

/// Dials and writes the report lines to `out` as soon as each fact is known, so a failure
/// while reading still leaves the addresses on record.
async fn dial(args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut stream = net::connect(&args.addr, timeout).await?;
    writeln!(out, "peername={}", stream.peer_addr()?)?;
    writeln!(out, "local={}", stream.local_addr()?)?;
    if let Some(text) = &args.send {
        send_line(&mut stream, text).await.map_err(|err| {
            anyhow::anyhow!("send to {} failed: {}", args.addr, net::describe(&err))
        })?;
    }
    let received = tokio::time::timeout(timeout, read_to_eof(&mut stream))
        .await
        .with_context(|| format!("{} did not close within {} ms", args.addr, args.timeout_ms))?
        .map_err(|err| {
            anyhow::anyhow!("read from {} failed: {}", args.addr, net::describe(&err))
        })?;
    writeln!(out, "said={}", first_line(&received))?;
    Ok(())
}

async fn send_line(stream: &mut (impl AsyncWrite + Unpin), text: &str) -> std::io::Result<()> {
    stream.write_all(format!("{text}\n").as_bytes()).await?;
    stream.shutdown().await
}

/// Reads until EOF, keeping at most `KEEP_BYTES`.
async fn read_to_eof(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = KEEP_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

fn first_line(bytes: &[u8]) -> String {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(line).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn args(addr: String) -> Args {
        Args {
            addr,
            timeout_ms: 2000,
            send: None,
        }
    }

    async fn report(args: &Args) -> (anyhow::Result<()>, String) {
        let mut out = Vec::new();
        let result = dial(args, &mut out).await;
        (result, String::from_utf8(out).expect("utf-8 report"))
    }

    #[test]
    fn first_line_stops_at_newline_and_strips_cr() {
        assert_eq!(first_line(b"peer=1.2.3.4:5\r\nmore"), "peer=1.2.3.4:5");
        assert_eq!(first_line(b"no newline"), "no newline");
        assert_eq!(first_line(b""), "");
    }

    #[tokio::test]
    async fn reports_addresses_and_what_the_peer_server_said() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(crate::tcp::serve_peer(listener));

        let (result, out) = report(&args(addr.to_string())).await;
        result.expect("dial succeeds");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[0], format!("peername={addr}"));
        let local = lines[1].strip_prefix("local=").expect("local line");
        assert_eq!(lines[2], format!("said=peer={local}"));
    }

    #[tokio::test]
    async fn send_half_closes_so_echo_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(crate::tcp::serve_echo(listener));

        let mut args = args(addr.to_string());
        args.send = Some("hello".into());
        let (result, out) = report(&args).await;
        result.expect("dial succeeds");
        assert!(out.ends_with("said=hello\n"), "{out}");
    }

    #[tokio::test]
    async fn refused_connection_fails_with_a_clear_message() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let (result, out) = report(&args(format!("127.0.0.1:{port}"))).await;
        let err = result.expect_err("nothing listens");
        assert_eq!(
            format!("{err:#}"),
            format!("connect to 127.0.0.1:{port} failed: Connection refused")
        );
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn silent_server_times_out_after_addresses_are_printed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut args = args(addr.to_string());
        args.timeout_ms = 100;
        let (result, out) = report(&args).await;
        drop(listener);
        let err = result.expect_err("no EOF");
        assert!(
            err.to_string().contains("did not close within 100 ms"),
            "{err}"
        );
        assert!(out.starts_with(&format!("peername={addr}\n")), "{out}");
    }
}
