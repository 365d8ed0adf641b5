//! `meshctl`: Weft's tool for operators. `meshctl analyze` checks a directory (or files) of
//! mesh YAML as a node proxy would read it, and warns about what `istioctl analyze` warns
//! about (see `mesh_node::analyze`).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mesh_node::analyze::{self, Level};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Weft's tool for operators")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks YAML files as a node proxy reads them: what it would reject is an error (the
    /// same validation, field and reason), what `istioctl analyze` warns about a warning.
    /// Exits 1 when there is an error, 2 when a file cannot be read.
    Analyze {
        /// Files, or directories (walked) of `.yaml`, `.yml` and `.json` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object: the files read and every finding.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Analyze { paths, json } => analyze_files(&paths, json),
    }
}

fn analyze_files(paths: &[PathBuf], json: bool) -> ExitCode {
    let files = match analyze::files(paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("meshctl: cannot read {}: {e}", show(paths));
            return ExitCode::from(2);
        }
    };
    let mut contents = Vec::new();
    for file in &files {
        match analyze::read(file) {
            Ok(content) => contents.push((file.display().to_string(), content)),
            Err(e) => {
                eprintln!("meshctl: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        }
    }
    let findings = analyze::analyze(&contents);
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    if json {
        let out = serde_json::json!({
            "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "findings": findings,
        });
        println!("{out:#}");
    } else if findings.is_empty() {
        println!(
            "No validation issues found when analyzing {} file(s).",
            files.len()
        );
    } else {
        for finding in &findings {
            println!("{finding}");
        }
    }
    if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn show(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
