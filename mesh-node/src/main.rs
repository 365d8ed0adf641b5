//! `mesh-node`: Weft's per-node agent and proxy (see `mesh-node --help`).

use clap::Parser;
use mesh_node::{
    app,
    config::{Cli, Command, LogFormat},
};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            app::init_tracing(args.server.log_format);
            app::run(args)
        }
        Command::Sidecar(args) => {
            app::init_tracing(args.server.log_format);
            app::run_sidecar(args)
        }
        Command::Cleanup(args) => {
            app::init_tracing(LogFormat::Plain);
            app::cleanup(args)
        }
        Command::Ca(args) => {
            app::init_tracing(args.log_format);
            app::run_ca(args)
        }
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
