//! Plain TCP servers: `echo` (throughput and half-close tests) and `peer` (who reached me).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::net;

/// Large enough that the echo keeps up with `blast` without one syscall per few KiB.
const ECHO_BUFFER: usize = 64 * 1024;
/// How long `peer` waits for the client to close after answering.
const PEER_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// TCP port to listen on (all addresses).
    #[arg(long)]
    port: u16,
}

#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// TCP port to listen on (all addresses).
    #[arg(long)]
    port: u16,
}

pub async fn run_echo(args: EchoArgs) -> anyhow::Result<()> {
    let listener = net::listen(args.port).await?;
    tracing::info!("echo listening on {}", listener.local_addr()?);
    serve_echo(listener).await;
    Ok(())
}

pub async fn run_peer(args: PeerArgs) -> anyhow::Result<()> {
    let listener = net::listen(args.port).await?;
    tracing::info!("peer listening on {}", listener.local_addr()?);
    serve_peer(listener).await;
    Ok(())
}

/// Echoes on every accepted connection, each in its own task; never returns.
pub async fn serve_echo(listener: TcpListener) {
    loop {
        let (stream, peer) = net::accept(&listener).await;
        tokio::spawn(echo(stream, peer));
    }
}

/// Answers every accepted connection with its peer address; never returns.
pub async fn serve_peer(listener: TcpListener) {
    loop {
        let (stream, peer) = net::accept(&listener).await;
        tokio::spawn(tell_peer(stream, peer));
    }
}

async fn echo(mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::with_capacity(ECHO_BUFFER, reader);
    let result = async {
        let echoed = tokio::io::copy_buf(&mut reader, &mut writer).await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(echoed)
    }
    .await;
    match result {
        Ok(bytes) => tracing::info!(%peer, bytes, "echo connection done"),
        Err(err) => tracing::warn!(%peer, "echo connection failed: {}", net::describe(&err)),
    }
}

async fn tell_peer(mut stream: TcpStream, peer: SocketAddr) {
    let line = format!("peer={peer}\n");
    let result = async {
        stream.write_all(line.as_bytes()).await?;
        stream.shutdown().await?;
        drain(&mut stream).await;
        Ok::<_, std::io::Error>(())
    }
    .await;
    match result {
        Ok(()) => tracing::info!(%peer, "told peer its address"),
        Err(err) => tracing::warn!(%peer, "peer connection failed: {}", net::describe(&err)),
    }
}

/// Reads until the client closes (bounded), because closing a socket with unread input
/// sends a reset that can destroy the answer before the client has read it.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(PEER_LINGER, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start_echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(serve_echo(listener));
        addr
    }

    #[tokio::test]
    async fn echo_returns_every_byte_then_closes() {
        let addr = start_echo().await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"hello weft").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.expect("read to EOF");
        assert_eq!(back, b"hello weft");
    }

    #[tokio::test]
    async fn echo_serves_connections_concurrently() {
        let addr = start_echo().await;
        // Holding the first connection open must not block the second one.
        let mut idle = TcpStream::connect(addr).await.expect("connect idle");
        idle.write_all(b"x").await.expect("write idle");
        let mut busy = TcpStream::connect(addr).await.expect("connect busy");
        busy.write_all(b"ping").await.expect("write");
        busy.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        busy.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"ping");
    }

    #[tokio::test]
    async fn peer_reports_the_client_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(serve_peer(listener));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let local = stream.local_addr().expect("local addr");
        let mut said = String::new();
        stream.read_to_string(&mut said).await.expect("read");
        assert_eq!(said, format!("peer={local}\n"));
    }
}
