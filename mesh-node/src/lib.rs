//! Weft's node binary: the agent that steers meshed pods' traffic with eBPF, and the node proxy.

pub mod admin;
pub mod agent;
pub mod app;
pub mod ca;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod source;
// The only module of user space allowed `unsafe` (the workspace denies it elsewhere).
#[allow(
    unsafe_code,
    reason = "network namespaces and socket options through libc"
)]
pub mod sys;
pub mod tls;
