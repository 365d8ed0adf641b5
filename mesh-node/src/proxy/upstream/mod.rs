//! The upstream floor of the proxy: everything between "send this to that cluster" and a byte
//! stream to an endpoint. It imports nothing of the proxy above it (listeners, TCP forwarding,
//! L7), so both directions and every protocol share one dialler, one load balancer and one
//! set of connection pools.
//!
//! - [`connect`]: one TCP connect with a timeout, its failures worded for the operator.
//! - [`hbone`]: the node-to-node hop, HTTP/2 CONNECT over mTLS (client half, and the parsing
//!   and answers of the server half).
//! - [`dial`]: the one place that decides between a direct connection and the tunnel.
//! - [`cluster`]: a Service port (and subset) with its DestinationRule: load balancing,
//!   circuit-breaker budgets, outlier detection; shared by TCP and HTTP.
//! - [`pool`]: pooled HTTP/1.1 and HTTP/2 connections per cluster, within its limits.

pub mod cluster;
pub mod connect;
pub mod dial;
pub mod hbone;
pub mod pool;

pub use connect::{connect_tcp, ConnectError, ConnectErrorKind, Role};
pub use dial::{DialError, Dialer, Stream, Via};
