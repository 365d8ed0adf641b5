//! Builds the eBPF programs of `mesh-ebpf` so the binary can embed them.

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// The nightly whose LLVM major matches the installed bpf-linker (see DESIGN.md);
/// `cargo xtask setup` installs it. Override with `WEFT_BPF_TOOLCHAIN`.
const BPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=WEFT_BPF_TOOLCHAIN");
    let toolchain = std::env::var("WEFT_BPF_TOOLCHAIN").unwrap_or_else(|_| BPF_TOOLCHAIN.into());
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("mesh-ebpf manifest has no parent directory"))?;
    // The programs also compile the shared types; aya-build only watches the eBPF crate itself.
    let common = root_dir.parent().map(|p| p.join("mesh-common"));
    if let Some(common) = common {
        println!("cargo:rerun-if-changed={common}");
    }
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!("building the eBPF programs with {toolchain} failed: run `cargo xtask setup`")
    })
}
