//! Weft's development tasks, as a library the `cargo xtask` command line, the demo and the
//! end-to-end tests share.
//!
//! - [`setup`]: installs and checks what building and running Weft needs on this machine.
//! - [`cluster`]: the virtual cluster: nodes and pods as network namespaces and cgroups on one
//!   Linux machine, each node running its own `mesh-node`, kube-proxy emulated with nftables.
//! - [`test`]: formatting, clippy (eBPF too), unit tests and the privileged end-to-end tests.
//! - [`manifests`]: offline validation of the Kubernetes manifests (`deploy/`, `examples/`).
//! - [`demo`]: the Bookinfo walk-through.
//! - [`probe`]: looking at a running cluster from outside (metrics, requests from pods).

use std::path::{Path, PathBuf};

pub mod bench;
pub mod cluster;
mod cmd;
pub mod demo;
pub mod manifests;
pub mod probe;
pub mod setup;
// The only module allowed `unsafe` (the workspace denies it elsewhere).
#[allow(unsafe_code)]
mod sys;
pub mod test;

pub use setup::setup;

/// The toolchain the eBPF programs build with: its LLVM major must match bpf-linker's.
pub const BPF_TOOLCHAIN: &str = "nightly-2026-05-20";

/// Root of the Cargo workspace (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Whether this process runs as root (the virtual cluster needs CAP_NET_ADMIN, CAP_SYS_ADMIN
/// and CAP_BPF; a capability-by-capability check would tell the operator no more).
pub fn is_root() -> bool {
    // Read from /proc rather than calling geteuid(2), so that the only `unsafe` of xtask
    // stays the pre_exec hook in `sys`.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|euid| euid.parse::<u32>().ok())
        })
        == Some(0)
}
