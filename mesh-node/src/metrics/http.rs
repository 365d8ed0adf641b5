//! Istio's HTTP request metrics: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes`.
//!
//! Every request looks up its series once, in one map shared by the four metrics, and a
//! collector renders that map at scrape time. The labels that stay the same for a connection
//! live behind an `Arc` with their hash computed once, so a lookup hashes four small values and
//! compares pointers, whatever the length of the workload names.
//!
//! Istio's sidecars keep Envoy's default histogram buckets for all four histograms (operators
//! may override them with `sidecar.istio.io/statsHistogramBuckets`); Weft uses the same ones so
//! that dashboards and alerts written for Istio read the same series.

use std::{
    collections::HashMap,
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{counter::Counter, histogram::Histogram, MetricType},
};

use super::{label, Label, Reporter, ResponseFlags, SecurityPolicy, ServiceLabels, Workload};
use crate::identity::Identity;

/// Envoy's default histogram buckets (milliseconds for durations, bytes for sizes), which
/// Istio keeps for its request histograms.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Value of `source_cluster` / `destination_cluster` (Istio's default cluster name).
const CLUSTER: &str = "Kubernetes";

/// The labels of a request that are known once the destination service is: built once per
/// (connection, destination) and cloned per request, which only bumps a reference count.
#[derive(Clone, Debug)]
pub struct RequestLabels {
    peers: Arc<Peers>,
    /// Hash of `peers`, from a hasher with fixed keys so equal labels hash equally.
    hash: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Peers {
    reporter: Reporter,
    source: Workload,
    destination: Workload,
    service: ServiceLabels,
    grpc: bool,
    connection_security_policy: SecurityPolicy,
}

impl RequestLabels {
    /// `grpc` selects `request_protocol="grpc"` (and a `grpc_response_status`) over `"http"`.
    pub fn new(
        reporter: Reporter,
        source: Workload,
        destination: Workload,
        service: ServiceLabels,
        grpc: bool,
    ) -> Self {
        let connection_security_policy = match reporter {
            Reporter::Source => SecurityPolicy::Unknown,
            Reporter::Destination => SecurityPolicy::None,
        };
        Self::of(Peers {
            reporter,
            source,
            destination,
            service,
            grpc,
            connection_security_policy,
        })
    }

    fn of(peers: Peers) -> Self {
        let mut hasher = DefaultHasher::new();
        peers.hash(&mut hasher);
        Self {
            hash: hasher.finish(),
            peers: Arc::new(peers),
        }
    }

    /// The same labels for a connection authenticated with mutual TLS: both principals known.
    pub fn mutual_tls(self, source: &Identity, destination: &Identity) -> Self {
        let mut peers = Arc::unwrap_or_clone(self.peers);
        peers.source.principal = source.to_string().into();
        peers.destination.principal = destination.to_string().into();
        peers.connection_security_policy = SecurityPolicy::MutualTls;
        Self::of(peers)
    }

    /// The labels the destination side reports the same requests under (a pod this proxy
    /// serves as the destination too): `reporter="destination"`, the policy `mutual_tls` where
    /// both ends are known, else `none`.
    pub fn destination_report(&self) -> Self {
        let mut peers = (*self.peers).clone();
        peers.reporter = Reporter::Destination;
        if peers.connection_security_policy != SecurityPolicy::MutualTls {
            peers.connection_security_policy = SecurityPolicy::None;
        }
        Self::of(peers)
    }

    pub fn is_grpc(&self) -> bool {
        self.peers.grpc
    }

    pub fn reporter(&self) -> Reporter {
        self.peers.reporter
    }

    /// The principals both ends were authenticated as (`None` where `unknown`): the source's,
    /// then the destination's.
    pub fn principals(&self) -> (Option<&str>, Option<&str>) {
        fn known(label: &Label) -> Option<&str> {
            Some(label.as_str()).filter(|p| *p != "unknown")
        }
        (
            known(&self.peers.source.principal),
            known(&self.peers.destination.principal),
        )
    }

    /// `destination_service`, the host in Istio's cluster name (see
    /// [`ClusterName`](super::ClusterName)).
    pub fn destination_service(&self) -> &str {
        self.peers.service.host.as_str()
    }
}

impl PartialEq for RequestLabels {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.peers, &other.peers) || self.peers == other.peers)
    }
}

impl Eq for RequestLabels {}

impl Hash for RequestLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// How one request ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestOutcome {
    /// Status sent to the client; 0 when no response was sent (Envoy's convention).
    pub response_code: u16,
    /// `grpc-status` of the response (trailers, or headers of a trailers-only response).
    /// When a gRPC response has none, the status is inferred from the HTTP status as Envoy does.
    pub grpc_status: Option<u32>,
    pub flags: ResponseFlags,
    /// From the first byte of the request to the last byte of the response.
    pub duration: Duration,
    /// Body bytes received from the client.
    pub request_bytes: u64,
    /// Body bytes sent to the client.
    pub response_bytes: u64,
    /// gRPC messages received from the client (gRPC requests only).
    pub request_messages: u64,
    /// gRPC messages sent to the client (gRPC requests only).
    pub response_messages: u64,
}

/// Istio's HTTP metrics.
#[derive(Clone, Default)]
pub struct HttpMetrics {
    series: Arc<RwLock<HashMap<SeriesKey, Series>>>,
}

impl fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpMetrics").finish_non_exhaustive()
    }
}

impl HttpMetrics {
    /// Counts one finished request. Takes a shared lock, or an exclusive one the first time a
    /// label combination is seen.
    pub fn record(&self, labels: &RequestLabels, outcome: &RequestOutcome) {
        let key = SeriesKey {
            labels: labels.clone(),
            response_code: outcome.response_code,
            grpc_status: grpc_status(labels.peers.grpc, outcome),
            flags: outcome.flags,
        };
        {
            let series = self.read();
            if let Some(series) = series.get(&key) {
                series.observe(outcome);
                return;
            }
        }
        let mut series = self.series.write().unwrap_or_else(PoisonError::into_inner);
        series
            .entry(key)
            .or_insert_with(Series::new)
            .observe(outcome);
    }

    /// Renders the four families at scrape time.
    pub(super) fn collector(&self) -> impl Collector {
        HttpCollector(self.clone())
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<SeriesKey, Series>> {
        // A panic while inserting cannot leave the map half-updated in a way that matters for
        // counters, so a poisoned lock is still used.
        self.series.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Envoy's `Grpc::Common::getGrpcStatus`: the response's status, else one inferred from the
/// HTTP status (gRPC's HTTP-to-gRPC mapping), else none when no response was sent.
fn grpc_status(grpc: bool, outcome: &RequestOutcome) -> Option<u32> {
    if !grpc {
        return None;
    }
    outcome.grpc_status.or(match outcome.response_code {
        0 => None,
        400 => Some(13),                   // INTERNAL
        401 => Some(16),                   // UNAUTHENTICATED
        403 => Some(7),                    // PERMISSION_DENIED
        404 => Some(12),                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => Some(14), // UNAVAILABLE
        _ => Some(2),                      // UNKNOWN
    })
}

/// One series of each of the four metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    labels: RequestLabels,
    response_code: u16,
    grpc_status: Option<u32>,
    flags: ResponseFlags,
}

impl EncodeLabelSet for SeriesKey {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> Result<(), fmt::Error> {
        let p = &*self.labels.peers;
        let e = &mut encoder;
        label(e, "reporter", &p.reporter)?;
        label(e, "source_workload", &p.source.workload)?;
        label(e, "source_canonical_service", &p.source.canonical_service)?;
        label(e, "source_canonical_revision", &p.source.canonical_revision)?;
        label(e, "source_workload_namespace", &p.source.namespace)?;
        label(e, "source_principal", &p.source.principal)?;
        label(e, "source_app", &p.source.app)?;
        label(e, "source_version", &p.source.version)?;
        label(e, "source_cluster", &CLUSTER)?;
        label(e, "destination_workload", &p.destination.workload)?;
        label(
            e,
            "destination_canonical_service",
            &p.destination.canonical_service,
        )?;
        label(
            e,
            "destination_canonical_revision",
            &p.destination.canonical_revision,
        )?;
        label(
            e,
            "destination_workload_namespace",
            &p.destination.namespace,
        )?;
        label(e, "destination_principal", &p.destination.principal)?;
        label(e, "destination_app", &p.destination.app)?;
        label(e, "destination_version", &p.destination.version)?;
        label(e, "destination_service", &p.service.host)?;
        label(e, "destination_service_name", &p.service.name)?;
        label(e, "destination_service_namespace", &p.service.namespace)?;
        label(e, "destination_cluster", &CLUSTER)?;
        let protocol = if p.grpc { "grpc" } else { "http" };
        label(e, "request_protocol", &protocol)?;
        label(e, "response_code", &self.response_code)?;
        // `Option`'s encoding is the empty string for `None`, Istio's value for plain HTTP.
        label(e, "grpc_response_status", &self.grpc_status)?;
        label(e, "response_flags", &self.flags)?;
        label(
            e,
            "connection_security_policy",
            &p.connection_security_policy,
        )
    }
}

#[derive(Debug)]
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    request_messages: Counter,
    response_messages: Counter,
}

impl Series {
    fn new() -> Self {
        Self {
            requests: Counter::default(),
            duration: Histogram::new(BUCKETS),
            request_bytes: Histogram::new(BUCKETS),
            response_bytes: Histogram::new(BUCKETS),
            request_messages: Counter::default(),
            response_messages: Counter::default(),
        }
    }

    fn observe(&self, outcome: &RequestOutcome) {
        self.requests.inc();
        self.duration
            .observe(outcome.duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(outcome.request_bytes as f64);
        self.response_bytes.observe(outcome.response_bytes as f64);
        self.request_messages.inc_by(outcome.request_messages);
        self.response_messages.inc_by(outcome.response_messages);
    }
}

/// One of the metrics, as read from each series.
struct Descriptor {
    name: &'static str,
    help: &'static str,
    metric_type: MetricType,
    metric: fn(&Series) -> &dyn EncodeMetric,
    /// Only gRPC series have it.
    grpc_only: bool,
}

const DESCRIPTORS: [Descriptor; 6] = [
    Descriptor {
        name: "istio_requests",
        help: "Requests, by source, destination and response",
        metric_type: MetricType::Counter,
        metric: |s| &s.requests,
        grpc_only: false,
    },
    Descriptor {
        name: "istio_request_duration_milliseconds",
        help: "Request duration, from the first request byte to the last response byte",
        metric_type: MetricType::Histogram,
        metric: |s| &s.duration,
        grpc_only: false,
    },
    Descriptor {
        name: "istio_request_bytes",
        help: "Request body sizes",
        metric_type: MetricType::Histogram,
        metric: |s| &s.request_bytes,
        grpc_only: false,
    },
    Descriptor {
        name: "istio_response_bytes",
        help: "Response body sizes",
        metric_type: MetricType::Histogram,
        metric: |s| &s.response_bytes,
        grpc_only: false,
    },
    Descriptor {
        name: "istio_request_messages",
        help: "gRPC messages received from clients (gRPC requests only)",
        metric_type: MetricType::Counter,
        metric: |s| &s.request_messages,
        grpc_only: true,
    },
    Descriptor {
        name: "istio_response_messages",
        help: "gRPC messages sent to clients (gRPC requests only)",
        metric_type: MetricType::Counter,
        metric: |s| &s.response_messages,
        grpc_only: true,
    },
];

#[derive(Debug)]
struct HttpCollector(HttpMetrics);

impl Collector for HttpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let series = self.0.read();
        for d in &DESCRIPTORS {
            let mut family = encoder.encode_descriptor(d.name, d.help, None, d.metric_type)?;
            for (key, s) in series.iter() {
                if d.grpc_only && !key.labels.peers.grpc {
                    continue;
                }
                (d.metric)(s).encode(family.encode_family(key)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Label, Metrics};

    fn workload(name: &str, app: &str, version: &str) -> Workload {
        Workload {
            workload: name.into(),
            canonical_service: app.into(),
            canonical_revision: version.into(),
            namespace: "bookinfo".into(),
            principal: "unknown".into(),
            app: app.into(),
            version: version.into(),
        }
    }

    fn labels(reporter: Reporter, grpc: bool) -> RequestLabels {
        RequestLabels::new(
            reporter,
            workload("productpage-v1", "productpage", "v1"),
            workload("reviews-v2", "reviews", "v2"),
            ServiceLabels {
                host: "reviews.bookinfo.svc.cluster.local".into(),
                name: "reviews".into(),
                namespace: Label::from("bookinfo"),
            },
            grpc,
        )
    }

    const SERIES: &str = concat!(
        "reporter=\"source\",source_workload=\"productpage-v1\",",
        "source_canonical_service=\"productpage\",source_canonical_revision=\"v1\",",
        "source_workload_namespace=\"bookinfo\",source_principal=\"unknown\",",
        "source_app=\"productpage\",source_version=\"v1\",source_cluster=\"Kubernetes\",",
        "destination_workload=\"reviews-v2\",destination_canonical_service=\"reviews\",",
        "destination_canonical_revision=\"v2\",destination_workload_namespace=\"bookinfo\",",
        "destination_principal=\"unknown\",destination_app=\"reviews\",",
        "destination_version=\"v2\",",
        "destination_service=\"reviews.bookinfo.svc.cluster.local\",",
        "destination_service_name=\"reviews\",destination_service_namespace=\"bookinfo\",",
        "destination_cluster=\"Kubernetes\",request_protocol=\"http\",response_code=\"200\",",
        "grpc_response_status=\"\",response_flags=\"-\",",
        "connection_security_policy=\"unknown\""
    );

    fn ok(millis: u64, request_bytes: u64, response_bytes: u64) -> RequestOutcome {
        RequestOutcome {
            response_code: 200,
            duration: Duration::from_millis(millis),
            request_bytes,
            response_bytes,
            ..Default::default()
        }
    }

    #[test]
    fn requests_carry_istio_labels_and_histograms() {
        let metrics = Metrics::new();
        let labels = labels(Reporter::Source, false);
        metrics.http().record(&labels, &ok(3, 0, 120));
        // Another connection with the same labels lands in the same series.
        let again = self::labels(Reporter::Source, false);
        metrics.http().record(&again, &ok(40, 10, 4000));

        let text = metrics.encode();
        for line in [
            format!("istio_requests_total{{{SERIES}}} 2\n"),
            format!("istio_request_duration_milliseconds_sum{{{SERIES}}} 43.0\n"),
            format!("istio_request_duration_milliseconds_count{{{SERIES}}} 2\n"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"1.0\",{SERIES}}} 0\n"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"5.0\",{SERIES}}} 1\n"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"50.0\",{SERIES}}} 2\n"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"3600000.0\",{SERIES}}} 2\n"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"+Inf\",{SERIES}}} 2\n"),
            format!("istio_request_bytes_bucket{{le=\"0.5\",{SERIES}}} 1\n"),
            format!("istio_request_bytes_sum{{{SERIES}}} 10.0\n"),
            format!("istio_response_bytes_bucket{{le=\"100.0\",{SERIES}}} 0\n"),
            format!("istio_response_bytes_bucket{{le=\"250.0\",{SERIES}}} 1\n"),
            format!("istio_response_bytes_bucket{{le=\"5000.0\",{SERIES}}} 2\n"),
            "# TYPE istio_requests counter\n".to_string(),
            "# TYPE istio_request_duration_milliseconds histogram\n".to_string(),
            "# TYPE istio_request_bytes histogram\n".to_string(),
            "# TYPE istio_response_bytes histogram\n".to_string(),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("istio_request_duration_milliseconds_bucket"))
            .count();
        assert_eq!(buckets, BUCKETS.len() + 1, "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn code_and_flags_split_series() {
        let metrics = Metrics::new();
        let labels = labels(Reporter::Destination, false);
        let overflow = RequestOutcome {
            response_code: 503,
            flags: ResponseFlags::UO,
            ..Default::default()
        };
        metrics.http().record(&labels, &ok(1, 0, 0));
        metrics.http().record(&labels, &overflow);
        metrics.http().record(&labels, &overflow);
        let text = metrics.encode();
        let series = |code: &str, flags: &str| {
            format!(
                "response_code=\"{code}\",grpc_response_status=\"\",\
                 response_flags=\"{flags}\",connection_security_policy=\"none\"}} "
            )
        };
        let count = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with("istio_requests_total{") && l.contains(needle))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(count(&series("200", "-")).as_deref(), Some("1"), "{text}");
        assert_eq!(count(&series("503", "UO")).as_deref(), Some("2"), "{text}");
        assert!(text.contains("reporter=\"destination\""));
    }

    #[test]
    fn grpc_status_is_reported_or_inferred() {
        let metrics = Metrics::new();
        let grpc = labels(Reporter::Source, true);
        let answered = RequestOutcome {
            grpc_status: Some(5),
            request_messages: 3,
            response_messages: 2,
            ..ok(1, 5, 7)
        };
        let unavailable = RequestOutcome {
            response_code: 503,
            flags: ResponseFlags::UH,
            ..Default::default()
        };
        let no_response = RequestOutcome {
            flags: ResponseFlags::DC,
            ..Default::default()
        };
        for outcome in [answered, unavailable, no_response] {
            metrics.http().record(&grpc, &outcome);
        }
        let text = metrics.encode();
        for labels in [
            "request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"5\",\
             response_flags=\"-\"",
            "request_protocol=\"grpc\",response_code=\"503\",grpc_response_status=\"14\",\
             response_flags=\"UH\"",
            "request_protocol=\"grpc\",response_code=\"0\",grpc_response_status=\"\",\
             response_flags=\"DC\"",
        ] {
            assert!(text.contains(labels), "missing {labels} in\n{text}");
        }
        let messages = |metric: &str| {
            text.lines()
                .find(|l| l.starts_with(metric) && l.contains("grpc_response_status=\"5\""))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            messages("istio_request_messages_total{").as_deref(),
            Some("3")
        );
        assert_eq!(
            messages("istio_response_messages_total{").as_deref(),
            Some("2")
        );
        // Plain HTTP series have no message counters.
        let http = Metrics::new();
        http.http()
            .record(&labels(Reporter::Source, false), &ok(1, 5, 7));
        assert!(
            !http.encode().contains("_messages_total{"),
            "{}",
            http.encode()
        );
    }

    #[test]
    fn labels_compare_by_content() {
        let a = labels(Reporter::Source, false);
        let b = labels(Reporter::Source, false);
        assert_eq!(a, b);
        assert_ne!(a, labels(Reporter::Destination, false));
        assert_ne!(a, labels(Reporter::Source, true));
    }
}
