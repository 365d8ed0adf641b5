//! `weft-loadgen`: the load generator and 1 KB response server of Weft's data-plane
//! benchmark (`cargo xtask bench`).
//!
//! - `serve`: a raw-TCP port, an HTTP/1.1 port and a gRPC port answering each request with
//!   1 KB, a bulk port that counts what it receives, and a 1-byte echo port;
//! - `run ADDR`: fixed-rate load with latency from each request's intended send time (no
//!   coordinated omission), or closed-loop saturation with `--rate 0`; one JSON line out;
//! - `bulk ADDR` and `echo ADDR`: ztunnel's two benchmarks, bulk throughput one way over N
//!   connections and a new connection plus a 1-byte echo; one JSON line out;
//! - `hold ADDR`: N connections opened, echoed once and held idle, so that what an idle
//!   connection costs the mesh can be measured; a JSON line when open and one when closed.

mod bulk;
mod client;
mod echo;
mod grpc;
mod hold;
mod protocol;
mod server;
mod timeline;
// The only module allowed `unsafe` (the workspace denies it elsewhere).
#[allow(
    unsafe_code,
    reason = "the timer slack of the load generator's threads, its open-file limit"
)]
mod sys;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "weft-loadgen",
    version,
    about = "Load generator and response server of Weft's data-plane benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer every request with a fixed-size response (raw TCP, HTTP/1.1 and gRPC).
    Serve(server::Args),
    /// Send load to a server and print one JSON report.
    Run(client::Args),
    /// Send bytes one way to a server's bulk port and print the throughput (JSON).
    Bulk(bulk::Args),
    /// Connect, echo one byte and close, again and again; print the latencies (JSON).
    Echo(echo::Args),
    /// Open connections, echo one byte on each, hold them idle, close; print when open and
    /// when closed (JSON).
    Hold(hold::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => server::run(args),
        Command::Run(args) => client::run(args),
        Command::Bulk(args) => bulk::run(args),
        Command::Echo(args) => echo::run(args),
        Command::Hold(args) => hold::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use clap::CommandFactory as _;

    use super::*;
    use crate::protocol::Protocol;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Both methods against the server on loopback, every protocol.
    #[test]
    fn load_against_the_server_on_loopback() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        for protocol in [Protocol::Tcp, Protocol::Http, Protocol::Grpc] {
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr: SocketAddr = listener.local_addr().unwrap();
            runtime.spawn(server::serve(listener, protocol, 1024));
            for rate in [400, 0] {
                let args = client::Args {
                    addr: addr.to_string(),
                    protocol,
                    rate,
                    conns: 4,
                    duration_s: 0.5,
                    warmup_s: 0.1,
                    response_bytes: 1024,
                    threads: 1,
                    interval_s: None,
                    new_conn: false,
                };
                client::run(args).unwrap();
            }
            // Cut into intervals, a connection per request: every request answered, in the
            // interval it was due in.
            let report = client::measure(&client::Args {
                addr: addr.to_string(),
                protocol,
                rate: 200,
                conns: 2,
                duration_s: 0.5,
                warmup_s: 0.1,
                response_bytes: 1024,
                threads: 1,
                interval_s: Some(0.25),
                new_conn: true,
            })
            .unwrap();
            let intervals = report.intervals.unwrap();
            assert_eq!(intervals.len(), 2, "{intervals:?}");
            assert_eq!(intervals.iter().map(|i| i.requests).sum::<u64>(), 100);
            assert!(intervals.iter().all(|i| i.errors == 0 && i.p99_us > 0.0));
            assert!(report.window_start_unix_ms.unwrap() > 1_700_000_000_000);
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
    }

    /// Bulk over one and several connections, the echo and the hold, against the server on
    /// loopback.
    #[test]
    fn bulk_and_echo_against_the_server_on_loopback() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let bind = || {
            runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap()
        };
        let (bulk_listener, echo_listener) = (bind(), bind());
        let bulk_addr = bulk_listener.local_addr().unwrap().to_string();
        let echo_addr = echo_listener.local_addr().unwrap().to_string();
        runtime.spawn(bulk::serve(bulk_listener));
        runtime.spawn(echo::serve(echo_listener));
        for conns in [1, 3] {
            bulk::run(bulk::Args {
                addr: bulk_addr.clone(),
                bytes: 3 << 20,
                conns,
            })
            .unwrap();
        }
        echo::run(echo::Args {
            addr: echo_addr.clone(),
            count: 20,
            warmup: 5,
        })
        .unwrap();
        hold::run(hold::Args {
            addr: echo_addr,
            conns: 50,
            seconds: 0.2,
            until_eof: false,
            parallel: 4,
        })
        .unwrap();
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}
