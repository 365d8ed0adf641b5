//! Spans and access log records out of the data path: a bounded queue the proxy's tasks push
//! to without waiting, and one task per collector that sends them in batches over OTLP/gRPC
//! (`opentelemetry.proto.collector.trace.v1.TraceService/Export` and
//! `...logs.v1.LogsService/Export`, on one connection).
//!
//! A request never waits for telemetry: when the queue is full (a slow or absent collector)
//! the record is dropped and counted (`weft_telemetry_dropped_total{reason="queue_full"}`); a batch
//! the collector refuses or cannot take within the timeout is dropped and counted too
//! (`reason="export_failed"`). Batches leave every second, or as soon as 512 records wait.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{logs_service_client::LogsServiceClient, ExportLogsServiceRequest},
        trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
    },
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
    trace::v1::{
        span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span as OtlpSpan, Status,
    },
};
use tokio::sync::mpsc;

use super::propagation::{SpanId, TraceId};
use crate::metrics::{OtlpDrop, OtlpMetrics, Signal};

/// Records waiting for a collector, at most.
pub const QUEUE: usize = 4096;
/// Records per export request, at most.
pub const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// One finished span of a proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// The workload the span speaks for (`service.name` of its resource): Istio's
    /// `canonical-service.namespace`.
    pub service: Arc<str>,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub tracestate: Option<String>,
    pub name: String,
    /// The source proxy's span is the client's, the destination's the server's.
    pub client: bool,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(Cow<'static, str>, Attribute)>,
    /// A 5xx answer, or no answer at all.
    pub error: bool,
}

/// One access log record: the text line as its body, or the JSON format's fields as
/// attributes (Envoy's OpenTelemetry access logger).
#[derive(Clone, Debug, PartialEq)]
pub struct Log {
    /// The workload the line speaks for, as a span's.
    pub service: Arc<str>,
    pub time: SystemTime,
    pub body: Option<String>,
    pub attributes: Vec<(Cow<'static, str>, Attribute)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Attribute {
    Text(String),
    Int(i64),
}

/// What an exporter sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Span(Span),
    Log(Log),
}

impl Record {
    fn signal(&self) -> Signal {
        match self {
            Record::Span(_) => Signal::Spans,
            Record::Log(_) => Signal::Logs,
        }
    }
}

/// Where a collector is: the address its Service resolves to now (`None`: the provider's
/// host name, looked up by the system's resolver).
pub type Target = Arc<Mutex<Option<SocketAddr>>>;

/// Where a proxy's records for one collector go.
#[derive(Clone, Debug)]
pub struct Exporter {
    queue: mpsc::Sender<Record>,
    target: Target,
    metrics: OtlpMetrics,
}

impl Exporter {
    /// Starts the task that exports to `host:port`, or to the address last set with
    /// [`Exporter::aim`]; the task ends when every `Exporter` is dropped.
    pub fn start(host: Arc<str>, port: u16, metrics: OtlpMetrics) -> Self {
        let (queue, records) = mpsc::channel(QUEUE);
        let target = Target::default();
        tokio::spawn(run(
            Collector {
                host,
                port,
                target: target.clone(),
            },
            records,
            metrics.clone(),
        ));
        Self {
            queue,
            target,
            metrics,
        }
    }

    /// Where the collector is now; the next batch goes there.
    pub fn aim(&self, addr: Option<SocketAddr>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// Queues a record; never waits.
    pub fn export(&self, record: Record) {
        let signal = record.signal();
        if self.queue.try_send(record).is_err() {
            self.metrics.dropped(signal, OtlpDrop::QueueFull, 1);
        }
    }
}

struct Collector {
    host: Arc<str>,
    port: u16,
    target: Target,
}

impl Collector {
    fn uri(&self) -> String {
        match *self.target.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(addr) => format!("http://{addr}"),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }
}

async fn run(collector: Collector, mut records: mpsc::Receiver<Record>, metrics: OtlpMetrics) {
    let mut client = None;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        let mut open = true;
        while batch.len() < BATCH {
            tokio::select! {
                record = records.recv() => match record {
                    Some(record) => batch.push(record),
                    None => {
                        open = false;
                        break;
                    }
                },
                () = &mut deadline => break,
            }
        }
        if !batch.is_empty() {
            let (mut spans, mut logs) = (Vec::new(), Vec::new());
            for record in batch.drain(..) {
                match record {
                    Record::Span(s) => spans.push(s),
                    Record::Log(l) => logs.push(l),
                }
            }
            let sender = Sender {
                collector: &collector,
                metrics: &metrics,
            };
            if !spans.is_empty() {
                let request = request(spans.into_iter());
                sender.send(&mut client, Signal::Spans, n(&request.resource_spans), |c| async move {
                    TraceServiceClient::new(c).export(request).await.map(drop)
                })
                .await;
            }
            if !logs.is_empty() {
                let request = logs_request(logs.into_iter());
                sender.send(&mut client, Signal::Logs, n(&request.resource_logs), |c| async move {
                    LogsServiceClient::new(c).export(request).await.map(drop)
                })
                .await;
            }
        }
        if !open {
            return;
        }
    }
}

/// How many records an OTLP request carries, for the counters.
fn n<T: Records>(resources: &[T]) -> u64 {
    resources.iter().map(Records::records).sum()
}

trait Records {
    fn records(&self) -> u64;
}

impl Records for ResourceSpans {
    fn records(&self) -> u64 {
        self.scope_spans.iter().map(|s| s.spans.len() as u64).sum()
    }
}

impl Records for ResourceLogs {
    fn records(&self) -> u64 {
        self.scope_logs
            .iter()
            .map(|s| s.log_records.len() as u64)
            .sum()
    }
}

/// A connected channel and the URI it was connected to.
type Client = (String, tonic::transport::Channel);

/// Sends requests to one collector and counts what became of their records.
struct Sender<'a> {
    collector: &'a Collector,
    metrics: &'a OtlpMetrics,
}

impl Sender<'_> {
    /// Sends one request of `records` records with `export` on the collector's channel
    /// (connected first when needed), and counts them sent or dropped.
    async fn send<F, Fut>(
        &self,
        client: &mut Option<Client>,
        signal: Signal,
        records: u64,
        export: F,
    ) where
        F: FnOnce(tonic::transport::Channel) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        let uri = self.collector.uri();
        if client
            .as_ref()
            .is_some_and(|(connected, _)| *connected != uri)
        {
            *client = None;
        }
        let result = tokio::time::timeout(EXPORT_TIMEOUT, async {
            if client.is_none() {
                let channel = tonic::transport::Endpoint::from_shared(uri.clone())?
                    .connect_timeout(EXPORT_TIMEOUT)
                    .connect()
                    .await?;
                *client = Some((uri.clone(), channel));
            }
            let (_, channel) = client.as_ref().expect("connected above");
            export(channel.clone()).await.map_err(anyhow::Error::from)?;
            Ok::<(), anyhow::Error>(())
        })
        .await;
        match result {
            Ok(Ok(())) => self.metrics.exported(signal, records),
            failed => {
                *client = None;
                self.metrics
                    .dropped(signal, OtlpDrop::ExportFailed, records);
                let error = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                };
                tracing::debug!(collector = %uri, ?signal, %error, "OTLP export failed");
            }
        }
    }
}

/// One OTLP logs request: the records grouped by the workload they speak for.
pub fn logs_request(logs: impl Iterator<Item = Log>) -> ExportLogsServiceRequest {
    let mut by_service: BTreeMap<Arc<str>, Vec<LogRecord>> = BTreeMap::new();
    for log in logs {
        by_service
            .entry(log.service.clone())
            .or_default()
            .push(LogRecord {
                time_unix_nano: nanos(log.time),
                observed_time_unix_nano: nanos(log.time),
                body: log.body.map(|b| AnyValue {
                    value: Some(any_value::Value::StringValue(b)),
                }),
                attributes: log.attributes.into_iter().map(key_value).collect(),
                ..LogRecord::default()
            });
    }
    ExportLogsServiceRequest {
        resource_logs: by_service
            .into_iter()
            .map(|(service, records)| ResourceLogs {
                resource: Some(resource(&service)),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope()),
                    log_records: records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

fn resource(service: &str) -> Resource {
    Resource {
        attributes: vec![text("service.name", service.to_owned())],
        ..Resource::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "weft".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    }
}

fn key_value((key, value): (Cow<'static, str>, Attribute)) -> KeyValue {
    match value {
        Attribute::Text(t) => text(&key, t),
        Attribute::Int(i) => KeyValue {
            key: key.into_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(i)),
            }),
            ..KeyValue::default()
        },
    }
}

/// One OTLP request: the spans grouped by the workload they speak for.
pub fn request(spans: impl Iterator<Item = Span>) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<Arc<str>, Vec<OtlpSpan>> = BTreeMap::new();
    for span in spans {
        by_service
            .entry(span.service.clone())
            .or_default()
            .push(otlp(span));
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| ResourceSpans {
                resource: Some(resource(&service)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

fn otlp(span: Span) -> OtlpSpan {
    OtlpSpan {
        trace_id: span.trace_id.0.to_vec(),
        span_id: span.span_id.0.to_vec(),
        trace_state: span.tracestate.unwrap_or_default(),
        parent_span_id: span.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        name: span.name,
        kind: if span.client {
            SpanKind::Client as i32
        } else {
            SpanKind::Server as i32
        },
        start_time_unix_nano: nanos(span.start),
        end_time_unix_nano: nanos(span.end),
        attributes: span.attributes.into_iter().map(key_value).collect(),
        status: Some(Status {
            code: if span.error {
                StatusCode::Error as i32
            } else {
                StatusCode::Unset as i32
            },
            ..Status::default()
        }),
        ..OtlpSpan::default()
    }
}

fn text(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..KeyValue::default()
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    use opentelemetry_proto::tonic::collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceResponse,
    };
    use tonic::{Request, Response};

    use super::*;

    /// A collector that keeps every request it gets.
    #[derive(Clone, Default)]
    struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0.lock().unwrap().push(request.into_inner());
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }

    fn span(service: &str, n: u8) -> Span {
        Span {
            service: service.into(),
            trace_id: TraceId([n; 16]),
            span_id: SpanId([n; 8]),
            parent: Some(SpanId([n + 1; 8])),
            tracestate: None,
            name: "reviews.default.svc.cluster.local:9080/*".into(),
            client: n.is_multiple_of(2),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![
                ("http.status_code".into(), Attribute::Int(200)),
                ("http.method".into(), Attribute::Text("GET".into())),
            ],
            error: false,
        }
    }

    /// A port nothing listens on (and the address it was on).
    fn free_addr() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn spans_reach_the_collector_in_batches_grouped_by_workload() {
        let collector = Collector::default();
        let addr = free_addr();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve(addr),
        );
        let metrics = OtlpMetrics::default();
        let exporter = Exporter::start("otel.observability".into(), addr.port(), metrics.clone());
        exporter.aim(Some(addr));
        for (service, n) in [
            ("productpage.default", 1),
            ("reviews.default", 2),
            ("productpage.default", 3),
        ] {
            exporter.export(Record::Span(span(service, n)));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while collector.0.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "no export arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let requests = collector.0.lock().unwrap().clone();
        assert_eq!(requests.len(), 1, "one batch");
        let resources = &requests[0].resource_spans;
        let services: Vec<String> = resources
            .iter()
            .map(
                |r| match &r.resource.as_ref().unwrap().attributes[0].value {
                    Some(AnyValue {
                        value: Some(any_value::Value::StringValue(s)),
                    }) => s.clone(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(services, ["productpage.default", "reviews.default"]);
        let first = &resources[0].scope_spans[0].spans;
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].trace_id, vec![1; 16]);
        assert_eq!(first[0].parent_span_id, vec![2; 8]);
        assert_eq!(first[0].kind, SpanKind::Server as i32);
        assert_eq!(first[0].start_time_unix_nano, 1_000_000_000);
        assert_eq!(
            resources[1].scope_spans[0].spans[0].kind,
            SpanKind::Client as i32
        );
        while metrics.get_exported(Signal::Spans) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_absent_collector_costs_dropped_spans_not_waiting() {
        let metrics = OtlpMetrics::default();
        let addr = free_addr();
        let exporter = Exporter::start("otel.observability".into(), addr.port(), metrics.clone());
        exporter.aim(Some(addr));
        // The queue takes QUEUE spans while the exporter waits; the rest are dropped at once.
        let started = std::time::Instant::now();
        for n in 0..(QUEUE + BATCH + 100) {
            exporter.export(Record::Span(span("reviews.default", (n % 200) as u8)));
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "export() waited"
        );
        assert!(metrics.get_dropped(Signal::Spans, OtlpDrop::QueueFull) >= 100);
        // Nothing listens: every batch sent fails and is counted.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while metrics.get_dropped(Signal::Spans, OtlpDrop::ExportFailed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no failed export counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metrics.get_exported(Signal::Spans), 0);
    }
}
