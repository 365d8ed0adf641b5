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
#[allow(
    unsafe_code,
    reason = "pre-exec hooks of the processes the virtual cluster starts"
)]
mod sys;
pub mod test;

pub use setup::setup;

/// `mesh-ebpf/rust-toolchain.toml`, the one place the eBPF toolchain is pinned (mesh-node's
/// build.rs reads it too).
const BPF_TOOLCHAIN_FILE: &str = include_str!("../../mesh-ebpf/rust-toolchain.toml");

/// The toolchain the eBPF programs build with: its LLVM major must match bpf-linker's.
pub fn bpf_toolchain() -> &'static str {
    toml_value(BPF_TOOLCHAIN_FILE, "channel")
        .expect("mesh-ebpf/rust-toolchain.toml names a channel")
}

/// The rustup components the eBPF toolchain needs (`rust-src` for build-std, `clippy`).
pub fn bpf_toolchain_components() -> Vec<&'static str> {
    let list = toml_value(BPF_TOOLCHAIN_FILE, "components").unwrap_or_default();
    list.trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().trim_matches('"'))
        .filter(|c| !c.is_empty())
        .collect()
}

/// The value of `key = value` in a TOML file of this repository, quotes removed (one key per
/// line is all the toolchain file needs, so no TOML parser is pulled in for it).
fn toml_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(key))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"'))
        .find(|value| !value.is_empty())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_of_a_toolchain_file() {
        let text = "# channel = \"commented\"\n[toolchain]\nchannel = \"nightly-2030-01-02\"\n\
                    components = [\"rust-src\", \"clippy\"]\n";
        assert_eq!(toml_value(text, "channel"), Some("nightly-2030-01-02"));
        assert_eq!(
            toml_value(text, "components"),
            Some("[\"rust-src\", \"clippy\"]")
        );
        assert_eq!(toml_value(text, "profile"), None);
    }

    #[test]
    fn the_pinned_toolchain_is_a_dated_nightly_with_what_the_ebpf_steps_need() {
        // A bare `nightly` would drift to an LLVM bpf-linker was not built against.
        let date = bpf_toolchain().strip_prefix("nightly-").unwrap();
        assert_eq!(date.split('-').count(), 3, "{date}");
        let components = bpf_toolchain_components();
        assert!(components.contains(&"rust-src"), "{components:?}");
        assert!(components.contains(&"clippy"), "{components:?}");
    }
}
