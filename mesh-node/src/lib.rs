//! Weft's node binary: the agent that steers meshed pods' traffic with eBPF, and the node proxy.

pub mod admin;
pub mod agent;
pub mod app;
pub mod config;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod source;
pub mod sys;
