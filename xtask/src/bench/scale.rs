//! `cargo xtask bench scale`: the control-plane scale benchmark.

use std::process::Command;

use anyhow::Result;

use crate::{cmd, setup, workspace_root};

/// Control-plane scale (`mesh-node/benches/scale.rs`): translation time, snapshot memory and
/// how fast one EndpointSlice change reaches the proxy and the eBPF maps.
pub fn scale() -> Result<()> {
    setup()?;
    cmd::interactive(
        Command::new("cargo")
            .args(["bench", "-p", "mesh-node", "--bench", "scale"])
            .current_dir(workspace_root()),
    )
}
