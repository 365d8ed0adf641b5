//! `weft-cni`: the chained CNI plugin that enrolls each pod with its node's mesh-node before
//! the pod runs (see `mesh_node::cni`).

use std::{io::Read as _, process::ExitCode};

use mesh_node::cni;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("install") {
        return install(&args[1..]);
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        println!(r#"{{"cniVersion":"1.0.0","code":5,"msg":"cannot read stdin","details":"{e}"}}"#);
        return ExitCode::FAILURE;
    }
    let out = cni::run(&cni::Call::from_env(), &stdin, &cni::ask_agent);
    print!("{}", out.stdout);
    ExitCode::from(u8::try_from(out.exit).unwrap_or(1))
}

/// `weft-cni install --bin-dir DIR --conf-dir DIR [--agent-socket PATH]`.
fn install(args: &[String]) -> ExitCode {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(std::path::PathBuf::from)
    };
    let (Some(bin_dir), Some(conf_dir)) = (value("--bin-dir"), value("--conf-dir")) else {
        eprintln!("usage: weft-cni install --bin-dir DIR --conf-dir DIR [--agent-socket PATH]");
        return ExitCode::FAILURE;
    };
    let socket = value("--agent-socket").unwrap_or_else(|| cni::DEFAULT_AGENT_SOCKET.into());
    match cni::install(&bin_dir, &conf_dir, &socket) {
        Ok(list) => {
            println!(
                "weft-cni installed in {} and chained in {}",
                bin_dir.display(),
                list.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-cni install: {e}");
            ExitCode::FAILURE
        }
    }
}
