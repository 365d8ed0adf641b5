//! `cargo xtask bench churn`: new-connection latency through the proxy while the
//! configuration changes.

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::{cmd, setup, workspace_root};

/// Seconds per window of the quick run (the full one measures 20 s without changes, then 20 s
/// with them).
const QUICK_WINDOW_S: u64 = 5;

/// Config churn (`mesh-node/benches/churn.rs`): p50/p99/p99.9/max of new connections through
/// the proxy without and with 10 changes a second at 10,000 Services, and how long the proxy
/// takes to apply each change. The JSON goes to `out` (default `target/bench/churn.json`).
pub fn churn(quick: bool, out: Option<&Path>) -> Result<()> {
    setup()?;
    let mut bench = Command::new("cargo");
    bench
        .args(["bench", "-p", "mesh-node", "--bench", "churn"])
        .current_dir(workspace_root());
    if quick {
        bench.env("WEFT_CHURN_SECS", QUICK_WINDOW_S.to_string());
    }
    if let Some(out) = out {
        bench.env("WEFT_CHURN_OUT", out);
    }
    cmd::interactive(&mut bench)
}
