//! `cargo xtask demo`: Bookinfo on the virtual cluster.

use anyhow::Result;

use crate::{cluster, workspace_root};

/// Brings up `examples/bookinfo`, prints the cluster's status and takes it down again
/// (also when bringing it up failed half-way).
pub fn run() -> Result<()> {
    let example = workspace_root().join("examples/bookinfo");
    let shown = cluster::up(&example).and_then(|()| cluster::status().map(|s| print!("{s}")));
    let down = cluster::down();
    shown.and(down)
}
