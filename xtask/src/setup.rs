//! `cargo xtask setup`: makes this machine able to build and run Weft, idempotently.
//!
//! Every item prints one line, `ok: ...` when it is already in place or `installing: ...`
//! before it is installed, so a second run is a quick all-`ok` check.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{bpf_toolchain, bpf_toolchain_components, cmd, is_root};

/// Debian packages: LLVM for bpf-linker, the tools the virtual cluster drives, load
/// generators (h2load is also the HTTP/2 client of the L7 tests, curl their HTTP/1.1 one),
/// tcpdump and openssl (the mTLS tests capture the node link and play TLS clients), HAProxy
/// (the third-party sidecar of the benchmark), Prometheus (the observability tests scrape the
/// node proxies and run Istio's dashboard queries), and Go and CMake (aws-lc's FIPS module,
/// built by the `fips` feature's tests).
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    "iptables",
    "curl",
    "tcpdump",
    "openssl",
    "nghttp2-client",
    "wrk",
    "haproxy",
    "prometheus",
    "golang-go",
    "cmake",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The dependency checker of `cargo xtask test` (licenses, bans, sources; see deny.toml).
/// 0.20.2 builds with rustc 1.88 and later.
const CARGO_DENY_VERSION: &str = "0.20.2";
/// The Python packages of the end-to-end tests' third-party clients, pinned like every tool
/// the tests assert with: (package, version, module to import). grpcio is the gRPC client of
/// the L7 tests (`xtask/assets/grpc_client.py`); h2 over Python's `ssl` is the independent
/// HBONE client of the mTLS tests (`xtask/assets/hbone_probe.py`), cryptography mints its
/// certificates (CA-issued, expired, self-signed, of a foreign CA). opentelemetry-proto's
/// generated messages and gRPC stubs make the tracing tests' OTLP collector
/// (`xtask/assets/observability/otlp_receiver.py`, served by grpcio); its module is
/// `opentelemetry.proto.version`, as `opentelemetry.proto` has no `__version__`. protobuf, its
/// runtime, is pinned too since opentelemetry-proto accepts any of 5.x to 7.x; it comes first
/// so that pip keeps it.
pub const PYTHON_PACKAGES: &[(&str, &str, &str)] = &[
    ("grpcio", "1.85.1", "grpc"),
    ("h2", "4.3.0", "h2"),
    ("cryptography", "46.0.3", "cryptography"),
    ("protobuf", "7.36.2", "google.protobuf"),
    (
        "opentelemetry-proto",
        "1.45.2",
        "opentelemetry.proto.version",
    ),
];
const BPFFS: &str = "/sys/fs/bpf";
pub(crate) const CGROUP2: &str = "/sys/fs/cgroup/unified";

/// Installs or checks every prerequisite; fails with a message naming what to fix.
pub fn setup() -> Result<()> {
    toolchain()?;
    packages()?;
    bpf_linker()?;
    cargo_deny()?;
    crate::manifests::install_validator()?;
    python_packages()?;
    ensure_bpffs()?;
    check_cgroup2()?;
    println!("ok: cgroup v2 at {CGROUP2}");
    if is_root() {
        println!("ok: running as root");
    } else {
        // Building and unit tests work unprivileged; say so now rather than at the first
        // `cluster up`.
        println!("note: not root: the virtual cluster and the end-to-end tests need root");
    }
    Ok(())
}

/// The nightly the eBPF programs build with, with the components its toolchain file lists
/// (`rust-src` for build-std, `clippy` for the eBPF lint step of `cargo xtask test`).
fn toolchain() -> Result<()> {
    let toolchain = bpf_toolchain();
    let components = bpf_toolchain_components();
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let what = format!("rust toolchain {toolchain} with {}", components.join(", "));
    if components
        .iter()
        .all(|c| installed.lines().any(|l| l.starts_with(c)))
    {
        println!("ok: {what}");
        return Ok(());
    }
    println!("installing: {what}");
    // `install` is idempotent and adds missing components to an installed toolchain.
    let mut install = Command::new("rustup");
    install.args(["toolchain", "install", toolchain, "--profile", "minimal"]);
    for component in components {
        install.args(["--component", component]);
    }
    cmd::interactive(&mut install)
}

fn packages() -> Result<()> {
    let mut missing = Vec::new();
    for package in PACKAGES {
        if package_installed(package) {
            println!("ok: {package}");
        } else {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}; installing them needs root: run `sudo -E cargo xtask setup`",
            missing.join(" ")
        );
    }
    for package in &missing {
        println!("installing: {package}");
    }
    // One `update` for the whole batch: the package lists of a fresh machine are empty.
    cmd::interactive(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::interactive(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The Python of the virtualenv under `target/` that `manifests` creates for the validator;
/// the L7 tests' gRPC client runs with it too, so setup manages one virtualenv, not two.
pub fn test_python() -> PathBuf {
    crate::workspace_root().join("target/xtask/manifest-venv/bin/python3")
}

fn python_packages() -> Result<()> {
    let python = test_python();
    for (package, version, module) in PYTHON_PACKAGES {
        let what = format!(
            "Python {package} {version} (end-to-end test client) in {}",
            python.display()
        );
        let installed = Command::new(&python)
            .args([
                "-c",
                &format!("import {module}; print({module}.__version__)"),
            ])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == *version
            });
        if installed {
            println!("ok: {what}");
            continue;
        }
        println!("installing: {what}");
        cmd::interactive(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("{package}=={version}"),
        ]))
        .with_context(|| {
            format!(
                "installing {package} (the virtualenv is created by the manifest validator step)"
            )
        })?;
    }
    Ok(())
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b" installed"))
}

fn bpf_linker() -> Result<()> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION}");
    let current = Command::new("bpf-linker").arg("--version").output();
    if current.is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    }) {
        println!("ok: {what}");
        return Ok(());
    }
    println!("installing: {what} (built against LLVM 22, a few minutes)");
    cmd::interactive(
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn cargo_deny() -> Result<()> {
    let what = format!("cargo-deny {CARGO_DENY_VERSION}");
    let current = Command::new("cargo").args(["deny", "--version"]).output();
    if current.is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).split_whitespace().last()
                == Some(CARGO_DENY_VERSION)
    }) {
        println!("ok: {what}");
        return Ok(());
    }
    println!("installing: {what} (built from source, a few minutes)");
    cmd::interactive(Command::new("cargo").args([
        "install",
        &format!("cargo-deny@{CARGO_DENY_VERSION}"),
        "--locked",
    ]))
}

/// Mounts bpffs at /sys/fs/bpf if it is not (fresh machines do not mount it); `mesh-node`
/// pins its programs and maps there.
fn ensure_bpffs() -> Result<()> {
    if mounted(BPFFS, "bpf")? {
        println!("ok: bpffs at {BPFFS}");
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at {BPFFS}; mounting it needs root: run `sudo -E cargo xtask setup`");
    }
    println!("installing: bpffs at {BPFFS}");
    mount_bpffs()
}

/// Quiet variant for the cluster commands, which need bpffs but print nothing about it.
pub(crate) fn ensure_bpffs_quiet() -> Result<()> {
    if mounted(BPFFS, "bpf")? {
        return Ok(());
    }
    mount_bpffs()
}

fn mount_bpffs() -> Result<()> {
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// The virtual cluster's cgroups live on the cgroup2 hierarchy at /sys/fs/cgroup/unified;
/// it is the machine's to provide, so this only checks.
pub(crate) fn check_cgroup2() -> Result<()> {
    if mounted(CGROUP2, "cgroup2")? {
        return Ok(());
    }
    bail!(
        "no cgroup v2 hierarchy at {CGROUP2}: mount one (`mkdir -p {CGROUP2} && \
         mount -t cgroup2 none {CGROUP2}`) or boot with systemd.unified_cgroup_hierarchy"
    )
}

fn mounted(mount_point: &str, fs_type: &str) -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts_contain(&mounts, Path::new(mount_point), fs_type))
}

fn mounts_contain(mounts: &str, mount_point: &Path, fs_type: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next().map(Path::new) == Some(mount_point) && fields.next() == Some(fs_type)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_by_point_and_type() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n\
                      bpf /sys/fs/bpf bpf rw 0 0\n";
        assert!(mounts_contain(mounts, Path::new("/sys/fs/bpf"), "bpf"));
        assert!(mounts_contain(
            mounts,
            Path::new("/sys/fs/cgroup/unified"),
            "cgroup2"
        ));
        assert!(!mounts_contain(
            mounts,
            Path::new("/sys/fs/cgroup"),
            "cgroup2"
        ));
        assert!(!mounts_contain(
            mounts,
            Path::new("/sys/fs/bpf/weft"),
            "bpf"
        ));
    }
}
