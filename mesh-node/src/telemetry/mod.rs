//! Distributed tracing: trace context on the wire ([`propagation`]) and spans exported over
//! OTLP ([`export`]), one exporter per collector the MeshConfig's providers name.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::metrics::SpanMetrics;

pub mod export;
pub mod propagation;

use export::{Exporter, Span};

/// The exporters of one proxy, by collector (`service`, `port` of an `opentelemetry`
/// provider), started when a first span is sent to each.
#[derive(Debug)]
pub struct Tracer {
    exporters: Mutex<HashMap<(Arc<str>, u16), Exporter>>,
    metrics: SpanMetrics,
}

impl Tracer {
    pub fn new(metrics: SpanMetrics) -> Self {
        Self {
            exporters: Mutex::default(),
            metrics,
        }
    }

    /// Queues `span` for the collector `host:port`, found at `addr` (`None`: `host` by the
    /// system's resolver). Never waits.
    pub fn export(&self, (host, port): (&Arc<str>, u16), addr: Option<SocketAddr>, span: Span) {
        let mut exporters = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        let exporter = exporters
            .entry((host.clone(), port))
            .or_insert_with(|| Exporter::start(host.clone(), port, self.metrics.clone()));
        exporter.aim(addr);
        exporter.export(span);
    }
}
