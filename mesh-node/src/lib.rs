//! Weft's node binary: the agent that steers meshed pods' traffic with eBPF, and the node proxy.

pub mod admin;
pub mod agent;
pub mod analyze;
pub mod app;
pub mod ca;
pub mod cni;
pub mod config;
pub mod handover;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod source;
pub mod telemetry;
// The only module of user space allowed `unsafe` (the workspace denies it elsewhere).
#[allow(
    unsafe_code,
    reason = "network namespaces and socket options through libc"
)]
pub mod sys;
pub mod tls;

/// Replays the corpus of fuzz target `target` (`fuzz/corpus/<target>`) through `run` on the
/// stable toolchain, so CI proves that no input `cargo fuzz` found panics without running the
/// fuzzer. The corpus must hold at least its four seeds.
#[cfg(test)]
pub(crate) fn replay_corpus(target: &str, run: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).expect("the seed corpus of fuzz/ is present") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        std::panic::catch_unwind(|| run(&data))
            .unwrap_or_else(|_| panic!("{} panics", path.display()));
        inputs += 1;
    }
    assert!(inputs >= 4, "the seed corpus of {target} is missing");
}
