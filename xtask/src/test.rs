//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure.
//!
//! The end-to-end tests build real namespaces, cgroups and eBPF programs, so they need root;
//! without it this fails rather than skipping them silently.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{bpf_toolchain, cluster, cmd, is_root, workspace_root};

struct Step {
    name: &'static str,
    /// A static check (formatting, lints, dependencies): also run by `cargo xtask lint`.
    lint: bool,
    run: fn(&Path) -> Result<()>,
}

const STEPS: &[Step] = &[
    Step {
        name: "setup",
        lint: false,
        run: |_| crate::setup(),
    },
    Step {
        name: "rustfmt",
        lint: true,
        run: |root| cargo(root, &["fmt", "--all", "--", "--check"]),
    },
    Step {
        name: "clippy",
        lint: true,
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
            )?;
            // `--all-targets` leaves out the end-to-end suites (`test = false`).
            let mut args = vec!["clippy", "-p", "xtask"];
            for suite in SUITES {
                args.extend(["--test", suite]);
            }
            args.extend(["--", "-D", "warnings"]);
            cargo(root, &args)
        },
    },
    Step {
        name: "clippy (eBPF)",
        lint: true,
        run: ebpf_clippy,
    },
    Step {
        // Advisories are not checked: their database is fetched from GitHub (see deny.toml).
        name: "dependencies (cargo deny: licenses, bans, sources)",
        lint: true,
        run: |root| cargo(root, &["deny", "check", "licenses", "bans", "sources"]),
    },
    Step {
        name: "manifests",
        lint: false,
        run: |_| crate::manifests::check_manifests(),
    },
    Step {
        name: "unit tests",
        lint: false,
        run: unit_tests,
    },
    Step {
        name: "end-to-end tests",
        lint: false,
        run: e2e_tests,
    },
    Step {
        name: "benchmark smoke (bench --quick; results not asserted)",
        lint: false,
        run: |root| {
            let mut options = crate::bench::Options::quick();
            options.out = root.join("target/bench/ci-quick.json");
            crate::bench::data_plane(&options)
        },
    },
    Step {
        name: "chaos smoke (bench chaos, every fault once; results not asserted)",
        lint: false,
        run: |root| {
            let mut options = crate::bench::ChaosOptions::quick();
            // A fault every 9 s with 9 s of calm at both ends: each of the seven once.
            options.minutes = 1.2;
            options.every_s = 9.0;
            options.out = root.join("target/bench/ci-chaos.json");
            crate::bench::chaos(&options)
        },
    },
];

/// Runs every step; prints a header per step.
pub fn run() -> Result<()> {
    run_steps(&STEPS.iter().collect::<Vec<_>>())
}

/// `cargo xtask lint`: only the static checks (rustfmt, clippy for the host and for eBPF,
/// cargo deny), which need neither root nor a cluster.
pub fn lint() -> Result<()> {
    run_steps(&STEPS.iter().filter(|s| s.lint).collect::<Vec<_>>())
}

fn run_steps(steps: &[&Step]) -> Result<()> {
    let root = workspace_root();
    for (i, step) in steps.iter().enumerate() {
        println!("\n==> [{}/{}] {}", i + 1, steps.len(), step.name);
        (step.run)(&root).with_context(|| format!("step `{}` failed", step.name))?;
    }
    println!("\n==> all {} steps passed", steps.len());
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
    cargo(root, &["test", "--workspace", "--exclude", "mesh-ebpf"])?;
    // The FIPS build (`--features fips`: aws-lc's FIPS module, approved algorithms only) runs
    // the TLS, certificate and CA tests again, so the switch is known to work.
    println!(
        "==> unit tests of TLS, certificates and the CA with the FIPS module (--features fips)"
    );
    cargo(
        root,
        &[
            "test",
            "-p",
            "mesh-node",
            "--features",
            "fips",
            "--lib",
            "--",
            "tls::",
            "identity::",
            "ca::",
        ],
    )
}

/// The end-to-end suites, in the order they run.
const SUITES: [&str; 5] = ["e2e", "l7", "mtls", "authz", "observability"];

fn e2e_tests(root: &Path) -> Result<()> {
    if !is_root() {
        bail!(
            "the end-to-end tests create network namespaces, cgroups and eBPF programs and \
             need root: run `sudo -E cargo xtask test`"
        );
    }
    cluster::binaries()?;
    // Each suite brings up and tears down its own cluster: the mesh mechanics first, then
    // L7 routing with real clients, then zero trust (CA, HBONE mTLS, PeerAuthentication),
    // then authorization, then what Istio's dashboards and Kiali show.
    for suite in SUITES {
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
