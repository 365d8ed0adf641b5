//! Distributed tracing: trace context on the wire ([`propagation`]) and spans exported over
//! OTLP ([`export`]) with access log records ([`access_log`] formats), one exporter per
//! collector the MeshConfig's providers name.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::metrics::{OtlpDrop, OtlpMetrics, Signal};

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

/// Access log lines on the node proxy's output, written by a thread of their own: a request
/// never waits for a slow reader of the output; when 4,096 lines wait, more are dropped and
/// counted.
#[derive(Debug)]
pub struct Lines {
    queue: std::sync::mpsc::SyncSender<(bool, String)>,
    metrics: OtlpMetrics,
}

impl Lines {
    pub fn start(metrics: OtlpMetrics) -> Self {
        let (queue, lines) = std::sync::mpsc::sync_channel::<(bool, String)>(export::QUEUE);
        let counted = metrics.clone();
        // Without a thread no line is written; the proxy serves on (and says so once).
        let started = std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || {
                use std::io::Write as _;
                for (stderr, line) in lines {
                    let written = if stderr {
                        std::io::stderr().lock().write_all(line.as_bytes())
                    } else {
                        std::io::stdout().lock().write_all(line.as_bytes())
                    };
                    match written {
                        Ok(()) => counted.exported(Signal::Lines, 1),
                        Err(_) => counted.dropped(Signal::Lines, OtlpDrop::ExportFailed, 1),
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no thread for access log lines: they are dropped");
        }
        Self { queue, metrics }
    }

    /// Queues `line` (with its newline) for stdout, or stderr; never waits.
    pub fn write(&self, stderr: bool, line: String) {
        if self.queue.try_send((stderr, line)).is_err() {
            self.metrics.dropped(Signal::Lines, OtlpDrop::QueueFull, 1);
        }
    }
}
