//! Builds the eBPF programs of `mesh-ebpf` so the binary can embed them, and generates the
//! tonic client and server of Istio's certificate service from a Rust description of it (the
//! messages are written by hand in `src/ca/proto.rs`): no `protoc` is needed to build.

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Where the eBPF toolchain is pinned, relative to the `mesh-ebpf` crate: the nightly whose
/// LLVM major matches the installed bpf-linker; `cargo xtask setup` installs it.
/// Override with `WEFT_BPF_TOOLCHAIN`.
const TOOLCHAIN_FILE: &str = "rust-toolchain.toml";

fn main() -> anyhow::Result<()> {
    certificate_service();
    println!("cargo:rerun-if-env-changed=WEFT_BPF_TOOLCHAIN");
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
    let toolchain = match std::env::var("WEFT_BPF_TOOLCHAIN") {
        Ok(toolchain) => toolchain,
        Err(_) => pinned_toolchain(&root_dir.join(TOOLCHAIN_FILE))?,
    };
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

/// The `channel` of a rust-toolchain.toml (a file of this repository: one `key = "value"`
/// per line is all this reads).
fn pinned_toolchain(path: &cargo_metadata::camino::Utf8Path) -> anyhow::Result<String> {
    println!("cargo:rerun-if-changed={path}");
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .find(|value| !value.is_empty())
        .ok_or_else(|| anyhow!("{path} names no `channel`"))
}

/// `istio.v1.auth.IstioCertificateService` (istio/api `security/v1alpha1/ca.proto`): one unary
/// `CreateCertificate`. Written to `$OUT_DIR/istio.v1.auth.IstioCertificateService.rs`, which
/// `src/ca/proto.rs` includes beside the message types the paths below name.
fn certificate_service() {
    let service = tonic_build::manual::Service::builder()
        .name("IstioCertificateService")
        .package("istio.v1.auth")
        .method(
            tonic_build::manual::Method::builder()
                .name("create_certificate")
                .route_name("CreateCertificate")
                .input_type("super::IstioCertificateRequest")
                .output_type("super::IstioCertificateResponse")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    // Weft's own addition beside Istio's API: the CA's revocation list, which node proxies
    // poll so a revoked certificate is refused at handshake and its connections closed.
    let revocations = tonic_build::manual::Service::builder()
        .name("Revocations")
        .package("weft.ca.v1")
        .method(
            tonic_build::manual::Method::builder()
                .name("list")
                .route_name("List")
                .input_type("super::RevocationListRequest")
                .output_type("super::RevocationListResponse")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().compile(&[service, revocations]);
}
