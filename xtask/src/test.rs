//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure.
//!
//! The end-to-end tests build real namespaces, cgroups and eBPF programs, so they need root;
//! without it this fails rather than skipping them silently.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{bpf_toolchain, cluster, cmd, is_root, workspace_root};

struct Step {
    name: &'static str,
    run: fn(&Path) -> Result<()>,
}

const STEPS: &[Step] = &[
    Step {
        name: "setup",
        run: |_| crate::setup(),
    },
    Step {
        name: "rustfmt",
        run: |root| cargo(root, &["fmt", "--all", "--", "--check"]),
    },
    Step {
        name: "clippy",
        // mesh-ebpf only builds for the BPF target; it has its own step.
        run: |root| {
            cargo(
                root,
                &[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "mesh-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        },
    },
    Step {
        name: "clippy (eBPF)",
        run: ebpf_clippy,
    },
    Step {
        name: "manifests",
        run: |_| crate::manifests::check_manifests(),
    },
    Step {
        name: "unit tests",
        run: unit_tests,
    },
    Step {
        name: "end-to-end tests",
        run: e2e_tests,
    },
    Step {
        name: "benchmark smoke (bench --quick; results not asserted)",
        run: |root| {
            let mut options = crate::bench::Options::quick();
            options.out = root.join("target/bench/ci-quick.json");
            crate::bench::data_plane(&options)
        },
    },
];

/// Runs every step; prints a header per step.
pub fn run() -> Result<()> {
    let root = workspace_root();
    for (i, step) in STEPS.iter().enumerate() {
        println!("\n==> [{}/{}] {}", i + 1, STEPS.len(), step.name);
        (step.run)(&root).with_context(|| format!("step `{}` failed", step.name))?;
    }
    println!("\n==> all {} steps passed", STEPS.len());
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    cmd::interactive(Command::new("cargo").args(args).current_dir(root))
}

fn ebpf_clippy(root: &Path) -> Result<()> {
    cmd::interactive(
        Command::new("cargo")
            .arg(format!("+{}", bpf_toolchain()))
            .args([
                "clippy",
                "-p",
                "mesh-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(root.join("mesh-ebpf"))
            // Flags meant for the host build must not reach the BPF target.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// Unit and in-process tests of every crate. The end-to-end targets are `test = false` in
/// xtask's manifest, so they run only in the next step.
fn unit_tests(root: &Path) -> Result<()> {
    cargo(root, &["test", "--workspace", "--exclude", "mesh-ebpf"])
}

fn e2e_tests(root: &Path) -> Result<()> {
    if !is_root() {
        bail!(
            "the end-to-end tests create network namespaces, cgroups and eBPF programs and \
             need root: run `sudo -E cargo xtask test`"
        );
    }
    cluster::binaries()?;
    // Each suite brings up and tears down its own cluster: the mesh mechanics first, then
    // L7 routing with real clients.
    for suite in ["e2e", "l7"] {
        cargo(
            root,
            &[
                "test",
                "-p",
                "xtask",
                "--test",
                suite,
                "--",
                "--test-threads=1",
            ],
        )?;
    }
    Ok(())
}
