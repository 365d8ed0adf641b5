//! `weft-demo`: the demo application and network test tools of Weft.
//!
//! One binary so that every pod of the virtual cluster, the demo and the end-to-end tests run
//! the same tested code:
//! - `serve`: a Bookinfo-style HTTP service (productpage, details, reviews v1/v2/v3, ratings);
//! - `http`: an httpbin-like server (HTTP/1.1, h2c, gRPC) with failure and delay knobs;
//! - `echo`, `peer`: TCP servers (byte echo; "who connected to me");
//! - `dial`, `blast`, `get`: clients that print what they saw, for assertions.
//!
//! Every response and report names the TCP peer as the far end saw it, so tests can prove
//! which hop actually connected. The binary uses no part of the mesh-node library.

mod blast;
mod bookinfo;
mod client;
mod dial;
mod get;
mod grpc;
mod httpbin;
mod net;
mod pattern;
mod serve;
mod tcp;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "weft-demo",
    version,
    about = "Weft demo application (Bookinfo roles) and network test tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one Bookinfo role over HTTP/1.1 (productpage, details, reviews, ratings).
    Serve(serve::Args),
    /// httpbin-like server: HTTP/1.1, h2c and gRPC (weft.demo.Echo) on one port, with
    /// failure, delay and upgrade knobs for L7 tests.
    Http(httpbin::Args),
    /// TCP echo server: echoes every byte until EOF, then closes its write side.
    Echo(tcp::EchoArgs),
    /// TCP server that tells each client its address: `peer=<ip>:<port>`.
    Peer(tcp::PeerArgs),
    /// Connect to ADDR and print `peername=`, `local=` and `said=<first line received>`.
    Dial(dial::Args),
    /// Stream verified pseudo-random bytes through many connections to an echo server.
    Blast(blast::Args),
    /// Send GET requests over one keep-alive HTTP/1.1 connection, one JSON line per response.
    Get(get::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weft-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => until_signalled(serve::run(args)).await,
        Command::Http(args) => until_signalled(httpbin::run(args)).await,
        Command::Echo(args) => until_signalled(tcp::run_echo(args)).await,
        Command::Peer(args) => until_signalled(tcp::run_peer(args)).await,
        Command::Dial(args) => dial::run(args).await,
        Command::Blast(args) => blast::run(args).await,
        Command::Get(args) => get::run(args).await,
    }
}

/// Runs a server until it fails or the process is asked to stop; stopping is a clean exit
/// because pods of the virtual cluster are torn down with SIGTERM.
async fn until_signalled(
    server: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::select! {
        result = server => result,
        signal = stop_signal() => {
            tracing::info!("stopping on {}", signal?);
            Ok(())
        }
    }
}

async fn stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Logs go to stderr so that stdout carries only what clients print for assertions.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_accepts_its_documented_flags() {
        let cli = Cli::try_parse_from([
            "weft-demo",
            "serve",
            "--service",
            "reviews",
            "--version",
            "v2",
            "--port",
            "9081",
            "--upstream",
            "ratings=http://127.0.0.1:9082",
        ])
        .expect("valid command line");
        assert!(matches!(cli.command, Command::Serve(_)));
    }

    #[test]
    fn http_accepts_its_documented_flags() {
        let cli = Cli::try_parse_from([
            "weft-demo",
            "http",
            "--port",
            "8080",
            "--version",
            "v2",
            "--fail-every",
            "3",
            "--fail-status",
            "500",
            "--delay-ms",
            "10",
            "--grpc-fail-every",
            "2",
        ])
        .expect("valid command line");
        assert!(matches!(cli.command, Command::Http(_)));
        assert!(Cli::try_parse_from(["weft-demo", "http", "--fail-status", "42"]).is_err());
    }

    #[test]
    fn client_commands_parse_with_defaults() {
        for argv in [
            &["weft-demo", "echo", "--port", "7"][..],
            &["weft-demo", "peer", "--port", "8"],
            &["weft-demo", "dial", "peer:8", "--timeout-ms", "500"],
            &[
                "weft-demo",
                "blast",
                "echo:7",
                "--conns",
                "2",
                "--bytes",
                "10",
            ],
            &[
                "weft-demo",
                "get",
                "http://productpage:9080/productpage",
                "--header",
                "end-user:jason",
                "--count",
                "3",
            ],
        ] {
            Cli::try_parse_from(argv).unwrap_or_else(|err| panic!("{argv:?}: {err}"));
        }
    }

    #[test]
    fn unknown_role_is_rejected() {
        assert!(Cli::try_parse_from(["weft-demo", "serve", "--service", "billing"]).is_err());
    }
}
