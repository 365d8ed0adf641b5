//! Distributed tracing: trace context on the wire ([`propagation`]) and spans exported over
//! OTLP ([`export`]) with access log records ([`access_log`] formats), one exporter per
//! collector the MeshConfig's providers name.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::metrics::OtlpMetrics;

pub mod access_log;
pub mod export;
pub mod propagation;

use export::{Exporter, Record};

/// The exporters of one proxy, by collector (`service`, `port` of an `opentelemetry`
/// provider), started when a first span is sent to each.
#[derive(Debug)]
pub struct Tracer {
    exporters: Mutex<HashMap<(Arc<str>, u16), Exporter>>,
    metrics: OtlpMetrics,
}

impl Tracer {
    pub fn new(metrics: OtlpMetrics) -> Self {
        Self {
            exporters: Mutex::default(),
            metrics,
        }
    }

    /// Queues `record` for the collector `host:port`, found at `addr` (`None`: `host` by the
    /// system's resolver). Never waits.
    pub fn export(&self, (host, port): (&Arc<str>, u16), addr: Option<SocketAddr>, record: Record) {
        let mut exporters = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        let exporter = exporters
            .entry((host.clone(), port))
            .or_insert_with(|| Exporter::start(host.clone(), port, self.metrics.clone()));
        exporter.aim(addr);
        exporter.export(record);
    }
}
