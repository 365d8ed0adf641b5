//! `serve`: answers every request with a 1 KB response, on a raw-TCP port, an HTTP/1.1 port
//! and a gRPC (HTTP/2 cleartext) port; counts bulk transfers on a fourth port and echoes bytes
//! on a fifth.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{
    bulk, echo, grpc,
    protocol::{Framing, Protocol},
    sys,
};

/// Open files the server asks for: every connection of a 10,000-connection `hold` at once,
/// with room to spare (the limit it gets is printed).
const OPEN_FILES: u64 = 65_536;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port of the raw-TCP request/response server.
    #[arg(long, default_value_t = 7000)]
    pub tcp_port: u16,
    /// Port of the HTTP/1.1 server.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Port of the gRPC server (HTTP/2 cleartext).
    #[arg(long, default_value_t = 9090)]
    pub grpc_port: u16,
    /// Port receiving bulk transfers (`weft-loadgen bulk`).
    #[arg(long, default_value_t = 7001)]
    pub bulk_port: u16,
    /// Port echoing every byte (`weft-loadgen echo`).
    #[arg(long, default_value_t = 7002)]
    pub echo_port: u16,
    /// Bytes of each response body.
    #[arg(long, default_value_t = 1024)]
    pub response_bytes: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

pub fn run(args: Args) -> Result<()> {
    let open_files = sys::raise_open_files(OPEN_FILES).context("raising RLIMIT_NOFILE")?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(async {
            let tcp = bind(args.tcp_port).await?;
            let http = bind(args.http_port).await?;
            let grpc = bind(args.grpc_port).await?;
            let bulk = bind(args.bulk_port).await?;
            let echo = bind(args.echo_port).await?;
            eprintln!(
                "weft-loadgen: serving {} byte responses on tcp {}, http {} and grpc {}; bulk \
                 on {}, echo on {}; up to {open_files} open files",
                args.response_bytes,
                tcp.local_addr()?,
                http.local_addr()?,
                grpc.local_addr()?,
                bulk.local_addr()?,
                echo.local_addr()?
            );
            let body = args.response_bytes;
            tokio::select! {
                r = serve(tcp, Protocol::Tcp, body) => r,
                r = serve(http, Protocol::Http, body) => r,
                r = serve(grpc, Protocol::Grpc, body) => r,
                r = bulk::serve(bulk) => r,
                r = echo::serve(echo) => r,
                r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT"),
            }
        })
}

async fn bind(port: u16) -> Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .await
        .with_context(|| format!("cannot listen on port {port}"))
}

/// Accepts connections on `listener` forever.
pub async fn serve(listener: TcpListener, protocol: Protocol, body: usize) -> Result<()> {
    let Some(framing) = protocol.framing() else {
        return grpc::serve(listener, body).await;
    };
    let response: std::sync::Arc<[u8]> = framing.response(body).into();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("weft-loadgen: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let response = response.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, framing, &response).await {
                eprintln!("weft-loadgen: connection ended: {e:#}");
            }
        });
    }
}

async fn connection(mut stream: TcpStream, framing: Framing, response: &[u8]) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let (count, used) = framing.split_requests(&buf)?;
        if count == 0 {
            continue;
        }
        buf.drain(..used);
        out.clear();
        for _ in 0..count {
            out.extend_from_slice(response);
        }
        stream.write_all(&out).await?;
    }
}
