//! Prometheus metrics: Istio's standard metrics and Weft's own data-plane metrics.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `istio_tcp_connections_opened_total` | counter | Istio's TCP labels | connections opened |
//! | `istio_tcp_connections_closed_total` | counter | Istio's TCP labels | connections closed |
//! | `istio_tcp_received_bytes_total` | counter | Istio's TCP labels | bytes client → server |
//! | `istio_tcp_sent_bytes_total` | counter | Istio's TCP labels | bytes server → client |
//! | `istio_requests_total` | counter | Istio's HTTP labels | requests |
//! | `istio_request_duration_milliseconds` | histogram | Istio's HTTP labels | first request byte → last response byte |
//! | `istio_request_bytes` | histogram | Istio's HTTP labels | request body sizes |
//! | `istio_response_bytes` | histogram | Istio's HTTP labels | response body sizes |
//! | `istio_build` | gauge | `component="proxy"`, `tag` (the version) | 1: the build serving |
//! | `weft_ebpf_<counter>_total` | counter | | decisions of the eBPF programs, summed over CPUs |
//! | `weft_config_version` | gauge | | newest configuration snapshot |
//! | `weft_config_applied_version` | gauge | `consumer` = `proxy`, `ebpf` | snapshot each consumer applied |
//! | `weft_config_rejected_total` | counter | `kind` | resources rejected (each time their file changed) |
//! | `weft_source_limit_refused_total` | counter | `limit` = `connections`, `requests` | connections closed at accept and requests answered `503 UO` because their client address held its cap |
//! | `weft_memory_budget_bytes` | gauge | | the memory the overload manager keeps the proxy under (its cgroup's limit, or `--memory-limit`; 0: none) |
//! | `weft_memory_used_bytes` | gauge | | the memory it measured last (the cgroup's working set, or the process's RSS) |
//! | `weft_overload_level` | gauge | | 0 normal, 1 pressure (buffers stop growing, HTTP/1 keep-alive off), 2 shedding (the heaviest client refused), 3 critical (every new connection and request refused, idle connections closed) |
//! | `weft_overload_refused_total` | counter | `what` = `connections`, `requests` | connections closed at accept and requests answered `503 OM` by the overload manager |
//! | `weft_overload_closed_total` | counter | `why` = `idle`, `heaviest` | connections it closed to give memory back: idle ones, and those of the clients it refused (at the critical level) |
//! | `weft_telemetry_sent_total` | counter | `signal` = `spans`, `logs`, `lines` | spans and access log records sent to OTLP collectors, access log lines written to the proxy's output |
//! | `weft_telemetry_dropped_total` | counter | `signal`, `reason` = `queue_full`, `export_failed` | dropped instead of sent: a queue was full (a slow or absent collector, or reader of the proxy's output), or the collector refused or did not take a batch in time |
//! | `weft_authz_decisions_total` | counter | `action` (`ALLOW`, `DENY`, `AUDIT`), `policy` (`namespace/name`, `none`), `result` (`allowed`, `denied`, `audited`, `dry_run_allowed`, `dry_run_denied`) | requests and connections to workloads with AuthorizationPolicies, by the policy that decided; AUDIT and dry-run policies counted apart |
//!
//! Istio's TCP labels: `reporter` (`source` on the client's node, `destination` on the
//! server's node), `source_*` / `destination_*` workload, namespace, principal, app, version
//! and cluster, `destination_service{,_name,_namespace}`, `request_protocol="tcp"`,
//! `response_flags` (`-`, `UF` when the upstream connect failed, `UH` when the service had no
//! ready endpoint) and `connection_security_policy` (`unknown` at the source, `none` at the
//! destination until mTLS). Principals stay `unknown` until peers authenticate with mTLS.
//! Bytes are counted as they are copied, so long-lived connections show up while open.
//!
//! Istio's HTTP labels are the TCP ones with `request_protocol` = `http` or `grpc`, plus
//! `response_code` (`0` when no response was sent) and `grpc_response_status` (empty for plain
//! HTTP); `response_flags` may then carry any of Envoy's flags ([`ResponseFlags`]). The
//! histograms use Istio's buckets ([`BUCKETS`]); [`access_log`] writes one line per request.
//!
//! The registry is built once at start-up and only read afterwards, so a scrape never blocks a
//! connection (a request whose label combination is new waits for a running scrape). Values that live elsewhere (eBPF per-CPU counters, the applied snapshot versions)
//! are read at scrape time by collectors instead of being copied into gauges periodically.

use std::{
    fmt::{self, Write as _},
    ops::{BitOr, BitOrAssign},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock,
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelSetEncoder,
        LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        MetricType,
    },
    registry::Registry,
};

use crate::{
    identity::Identity,
    model::{Pod, Service, Store},
};

pub(crate) mod access;
mod http;

pub use access::{access_log, access_log_enabled, AccessEntry, ClusterName, ACCESS_LOG};
pub use http::{HttpMetrics, RequestLabels, RequestOutcome, BUCKETS};

/// Counters kept by the eBPF programs, read at scrape time.
pub trait EbpfCounters: Send + Sync + 'static {
    /// `(Counter::name(), value summed over CPUs)` for every counter.
    fn read(&self) -> Vec<(&'static str, u64)>;
}

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Value of Istio's label when nothing is known.
static UNKNOWN: LazyLock<Label> = LazyLock::new(|| "unknown".into());
static CLUSTER: LazyLock<Label> = LazyLock::new(|| "Kubernetes".into());
static TCP: LazyLock<Label> = LazyLock::new(|| "tcp".into());

/// A label value shared between series: cloning it copies no bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(Arc<str>);

impl Label {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Label {
    fn from(value: &str) -> Self {
        Self(value.into())
    }
}

impl From<Arc<str>> for Label {
    fn from(value: Arc<str>) -> Self {
        Self(value)
    }
}

impl From<String> for Label {
    fn from(value: String) -> Self {
        Self(value.into())
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Which end of a connection reports a series (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The proxy on the client's node (outbound listener).
    Source,
    /// The proxy on the server's node (tunnel server, inbound listener).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Envoy's response flags (`%RESPONSE_FLAGS%`), Istio's `response_flags` label.
///
/// A set: a delayed then aborted request carries `DI,FI`. Bit `n` is Envoy's flag `1 << n`, and
/// the rendering lists the short codes in that order, joined by `,` (`-` when empty), as
/// Envoy's `ResponseFlagUtils::toShortString` did up to 1.29 (newer Envoys list flags in the
/// order they were set; dashboards match codes, not positions).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    /// Nothing to report (`-`).
    pub const NONE: Self = Self(0);
    /// Failed local health check.
    pub const LH: Self = Self(1 << 0);
    /// No healthy upstream: the cluster had no ready endpoint (503).
    pub const UH: Self = Self(1 << 1);
    /// Upstream request timeout (504).
    pub const UT: Self = Self(1 << 2);
    /// Local reset of the stream.
    pub const LR: Self = Self(1 << 3);
    /// Upstream remote reset of the stream.
    pub const UR: Self = Self(1 << 4);
    /// Upstream connection failure (503).
    pub const UF: Self = Self(1 << 5);
    /// Upstream connection terminated mid-request.
    pub const UC: Self = Self(1 << 6);
    /// Upstream overflow: a circuit breaker (connection pool limit) rejected the request (503).
    pub const UO: Self = Self(1 << 7);
    /// No route matched the request (404).
    pub const NR: Self = Self(1 << 8);
    /// The request was delayed by fault injection.
    pub const DI: Self = Self(1 << 9);
    /// The request was aborted by fault injection.
    pub const FI: Self = Self(1 << 10);
    /// Rate limited locally (429).
    pub const RL: Self = Self(1 << 11);
    /// Denied by an external authorization service.
    pub const UAEX: Self = Self(1 << 12);
    /// The rate limit service failed.
    pub const RLSE: Self = Self(1 << 13);
    /// The downstream connection closed before the response was complete.
    pub const DC: Self = Self(1 << 14);
    /// Retries exhausted: the retry limit was reached.
    pub const URX: Self = Self(1 << 15);
    /// Stream idle timeout.
    pub const SI: Self = Self(1 << 16);
    /// Invalid `x-envoy-*` request headers.
    pub const IH: Self = Self(1 << 17);
    /// Downstream protocol error.
    pub const DPE: Self = Self(1 << 18);
    /// Upstream max stream duration reached.
    pub const UMSDR: Self = Self(1 << 19);
    /// Response served from a cache.
    pub const RFCF: Self = Self(1 << 20);
    /// No filter configuration found.
    pub const NFCF: Self = Self(1 << 21);
    /// Maximum request duration exceeded.
    pub const DT: Self = Self(1 << 22);
    /// Upstream protocol error.
    pub const UPE: Self = Self(1 << 23);
    /// No cluster found for the route.
    pub const NC: Self = Self(1 << 24);
    /// Terminated by the overload manager.
    pub const OM: Self = Self(1 << 25);
    /// DNS resolution failed.
    pub const DF: Self = Self(1 << 26);
    /// Dropped by load shedding.
    pub const DO: Self = Self(1 << 27);

    /// Short codes indexed by bit.
    const CODES: [&'static str; 28] = [
        "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE",
        "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF",
        "DO",
    ];

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// The rendering without formatting when it is `-` or a single code, the common cases.
    pub fn as_static_str(self) -> Option<&'static str> {
        match self.0 {
            0 => Some("-"),
            bits if bits.is_power_of_two() => {
                Self::CODES.get(bits.trailing_zeros() as usize).copied()
            }
            _ => None,
        }
    }

    /// The short codes of the flags set, in Envoy's order.
    pub fn codes(self) -> impl Iterator<Item = &'static str> {
        Self::CODES
            .iter()
            .enumerate()
            .filter(move |(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, code)| *code)
    }
}

impl BitOr for ResponseFlags {
    type Output = Self;

    fn bitor(self, other: Self) -> Self {
        self.union(other)
    }
}

impl BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, other: Self) {
        self.insert(other);
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = self.as_static_str() {
            return f.write_str(s);
        }
        for (i, code) in self.codes().enumerate() {
            if i > 0 {
                f.write_char(',')?;
            }
            f.write_str(code)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({self})")
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        write!(encoder, "{self}")
    }
}

/// Istio's `connection_security_policy` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// Reported by the source: it cannot tell what the destination enforces.
    Unknown,
    /// Plaintext (reported by the destination).
    None,
    /// Mutual TLS.
    MutualTls,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let policy = match self {
            SecurityPolicy::Unknown => "unknown",
            SecurityPolicy::None => "none",
            SecurityPolicy::MutualTls => "mutual_tls",
        };
        EncodeLabelValue::encode(&policy, encoder)
    }
}

/// One end of a connection, as Istio's `source_*` / `destination_*` labels describe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub workload: Label,
    pub canonical_service: Label,
    pub canonical_revision: Label,
    pub namespace: Label,
    pub principal: Label,
    pub app: Label,
    pub version: Label,
}

impl Workload {
    /// An address that is not a known pod.
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.clone(),
            canonical_service: UNKNOWN.clone(),
            canonical_revision: UNKNOWN.clone(),
            namespace: UNKNOWN.clone(),
            principal: UNKNOWN.clone(),
            app: UNKNOWN.clone(),
            version: UNKNOWN.clone(),
        }
    }

    /// The labels of `pod`. Principals stay `unknown` until peers authenticate with mTLS.
    pub fn of(pod: &Pod) -> Self {
        Self {
            workload: pod.workload().into(),
            canonical_service: pod.canonical_service().into(),
            canonical_revision: pod.canonical_revision().into(),
            namespace: pod.key.namespace.clone().into(),
            principal: UNKNOWN.clone(),
            app: pod
                .labels
                .get("app")
                .map_or_else(|| UNKNOWN.clone(), |a| a.as_str().into()),
            version: pod.version().into(),
        }
    }

    pub fn of_option(pod: Option<&Pod>) -> Self {
        pod.map_or_else(Self::unknown, Self::of)
    }
}

/// Istio's `destination_service*` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    pub host: Label,
    pub name: Label,
    pub namespace: Label,
}

impl ServiceLabels {
    pub fn unknown() -> Self {
        Self {
            host: UNKNOWN.clone(),
            name: UNKNOWN.clone(),
            namespace: UNKNOWN.clone(),
        }
    }

    pub fn of(service: &Service) -> Self {
        Self {
            host: service.hostname().into(),
            name: service.key.name.clone().into(),
            namespace: service.key.namespace.clone().into(),
        }
    }

    pub fn of_option(service: Option<&Service>) -> Self {
        service.map_or_else(Self::unknown, Self::of)
    }
}

/// The label set of Istio's `istio_tcp_*` metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: Label,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_cluster: Label,
    pub destination_workload: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub destination_cluster: Label,
    pub request_protocol: Label,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
    /// Not a label: a source report whose destination pod this proxy serves too (two pods of
    /// one node), so the connection is also counted as the destination reports it.
    pub reported_by_destination: bool,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, mut encoder: LabelSetEncoder<'_>) -> Result<(), fmt::Error> {
        let e = &mut encoder;
        label(e, "reporter", &self.reporter)?;
        label(e, "source_workload", &self.source_workload)?;
        label(
            e,
            "source_canonical_service",
            &self.source_canonical_service,
        )?;
        label(
            e,
            "source_canonical_revision",
            &self.source_canonical_revision,
        )?;
        label(
            e,
            "source_workload_namespace",
            &self.source_workload_namespace,
        )?;
        label(e, "source_principal", &self.source_principal)?;
        label(e, "source_app", &self.source_app)?;
        label(e, "source_version", &self.source_version)?;
        label(e, "source_cluster", &self.source_cluster)?;
        label(e, "destination_workload", &self.destination_workload)?;
        label(
            e,
            "destination_canonical_service",
            &self.destination_canonical_service,
        )?;
        label(
            e,
            "destination_canonical_revision",
            &self.destination_canonical_revision,
        )?;
        label(
            e,
            "destination_workload_namespace",
            &self.destination_workload_namespace,
        )?;
        label(e, "destination_principal", &self.destination_principal)?;
        label(e, "destination_app", &self.destination_app)?;
        label(e, "destination_version", &self.destination_version)?;
        label(e, "destination_service", &self.destination_service)?;
        label(
            e,
            "destination_service_name",
            &self.destination_service_name,
        )?;
        label(
            e,
            "destination_service_namespace",
            &self.destination_service_namespace,
        )?;
        label(e, "destination_cluster", &self.destination_cluster)?;
        label(e, "request_protocol", &self.request_protocol)?;
        label(e, "response_flags", &self.response_flags)?;
        label(
            e,
            "connection_security_policy",
            &self.connection_security_policy,
        )
    }
}

/// Writes one label of a set.
pub(crate) fn label(
    encoder: &mut LabelSetEncoder<'_>,
    key: &str,
    value: &impl EncodeLabelValue,
) -> Result<(), fmt::Error> {
    let mut label = encoder.encode_label();
    let mut key_encoder = label.encode_label_key()?;
    key_encoder.write_str(key)?;
    let mut value_encoder = key_encoder.encode_label_value()?;
    value.encode(&mut value_encoder)?;
    value_encoder.finish()
}

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        source: Workload,
        destination: Workload,
        service: ServiceLabels,
    ) -> Self {
        let connection_security_policy = match reporter {
            Reporter::Source => SecurityPolicy::Unknown,
            Reporter::Destination => SecurityPolicy::None,
        };
        Self {
            reporter,
            source_workload: source.workload,
            source_canonical_service: source.canonical_service,
            source_canonical_revision: source.canonical_revision,
            source_workload_namespace: source.namespace,
            source_principal: source.principal,
            source_app: source.app,
            source_version: source.version,
            source_cluster: CLUSTER.clone(),
            destination_workload: destination.workload,
            destination_canonical_service: destination.canonical_service,
            destination_canonical_revision: destination.canonical_revision,
            destination_workload_namespace: destination.namespace,
            destination_principal: destination.principal,
            destination_app: destination.app,
            destination_version: destination.version,
            destination_service: service.host,
            destination_service_name: service.name,
            destination_service_namespace: service.namespace,
            destination_cluster: CLUSTER.clone(),
            request_protocol: TCP.clone(),
            response_flags: ResponseFlags::NONE,
            connection_security_policy,
            reported_by_destination: false,
        }
    }

    /// The same source report, for a connection to a pod this proxy serves as the destination
    /// too: counted under [`TcpLabels::destination_report`] as well. The kernel vouches for
    /// both ends (the caller's cgroup, the pod's address on this node), as certificates do
    /// across nodes: the principals are known and the policy is `mutual_tls`.
    pub fn between_local_pods(mut self, source: Option<&Identity>, destination: &Identity) -> Self {
        if let Some(source) = source {
            self = self.mutual_tls(source, destination);
        }
        self.reported_by_destination = true;
        self
    }

    /// The labels the destination side reports a source report's connection under.
    pub fn destination_report(&self) -> Self {
        Self {
            reporter: Reporter::Destination,
            connection_security_policy: match self.connection_security_policy {
                SecurityPolicy::MutualTls => SecurityPolicy::MutualTls,
                _ => SecurityPolicy::None,
            },
            reported_by_destination: false,
            ..self.clone()
        }
    }

    /// The same labels for a connection authenticated with mutual TLS: both principals known.
    pub fn mutual_tls(mut self, source: &Identity, destination: &Identity) -> Self {
        self.source_principal = source.to_string().into();
        self.destination_principal = destination.to_string().into();
        self.connection_security_policy = SecurityPolicy::MutualTls;
        self
    }

    pub fn with_response_flags(mut self, flags: ResponseFlags) -> Self {
        self.response_flags = flags;
        // A connection that never reached the pod was never seen by its side.
        self.reported_by_destination &= flags.is_empty();
        self
    }
}

/// Istio's TCP metrics.
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    /// Resolves the series of one connection once, so copying bytes only touches atomics.
    pub fn connection(&self, labels: &TcpLabels) -> ConnectionMetrics {
        let destination = labels
            .reported_by_destination
            .then(|| Box::new(self.series(&labels.destination_report())));
        // The flag is not a label: series are keyed without it, so that two label sets that
        // differ only by it are one series, never two with the same labels.
        let source = match labels.reported_by_destination {
            true => self.series(&TcpLabels {
                reported_by_destination: false,
                ..labels.clone()
            }),
            false => self.series(labels),
        };
        ConnectionMetrics {
            source,
            destination,
        }
    }

    fn series(&self, labels: &TcpLabels) -> TcpSeries {
        TcpSeries {
            opened: self.opened.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction) on TCP connections",
            self.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction) on TCP connections",
            self.received.clone(),
        );
    }
}

/// The pre-resolved series of one connection: as its reporter sees it, and as the
/// destination does when that is a pod of the same proxy.
#[derive(Clone, Debug)]
pub struct ConnectionMetrics {
    source: TcpSeries,
    destination: Option<Box<TcpSeries>>,
}

#[derive(Clone, Debug)]
struct TcpSeries {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl ConnectionMetrics {
    fn each(&self, f: impl Fn(&TcpSeries)) {
        f(&self.source);
        if let Some(destination) = &self.destination {
            f(destination);
        }
    }

    pub fn opened(&self) {
        self.each(|s| {
            s.opened.inc();
        });
    }

    pub fn closed(&self) {
        self.each(|s| {
            s.closed.inc();
        });
    }

    /// Bytes from the client towards the server.
    pub fn received(&self, bytes: u64) {
        self.each(|s| {
            s.received.inc_by(bytes);
        });
    }

    /// Bytes from the server back to the client.
    pub fn sent(&self, bytes: u64) {
        self.each(|s| {
            s.sent.inc_by(bytes);
        });
    }
}

/// `istio_build{component,tag}`, always 1: which build serves (dashboards list the versions
/// a mesh runs from it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// `weft_config_rejected_total{kind}`: resources the configuration sources rejected.
#[derive(Clone, Debug, Default)]
pub struct Rejections {
    family: Family<KindLabels, Counter>,
}

impl Rejections {
    pub fn inc(&self, kind: &str) {
        self.family
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn get(&self, kind: &str) -> u64 {
        self.family
            .get_or_create(&KindLabels { kind: kind.into() })
            .get()
    }
}

/// Why the proxy refused a connection or stream for want of (valid) mTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MtlsRefusal {
    /// Not TLS at all on the HBONE port.
    Plaintext,
    /// TLS without a client certificate.
    NoClientCertificate,
    /// A client certificate of a CA this node does not trust.
    UnknownCa,
    /// An expired (or not yet valid) client certificate.
    Expired,
    /// Any other failed handshake (a timeout, a protocol error...).
    Handshake,
    /// The peer's certificate carries no usable SPIFFE ID, or one of a foreign trust domain.
    Identity,
    /// A CONNECT for an address that is not a meshed pod of this node, or malformed.
    Target,
    /// Plaintext to a pod whose PeerAuthentication is STRICT.
    PlaintextStrict,
    /// This node has no certificate of its own (the mesh CA is unreachable).
    NoCertificate,
    /// A certificate the mesh CA revoked: refused at handshake, or its open connection closed.
    Revoked,
}

impl EncodeLabelValue for MtlsRefusal {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let reason = match self {
            MtlsRefusal::Plaintext => "plaintext",
            MtlsRefusal::NoClientCertificate => "no_client_certificate",
            MtlsRefusal::UnknownCa => "unknown_ca",
            MtlsRefusal::Expired => "expired",
            MtlsRefusal::Handshake => "handshake",
            MtlsRefusal::Identity => "identity",
            MtlsRefusal::Target => "target",
            MtlsRefusal::PlaintextStrict => "plaintext_strict",
            MtlsRefusal::NoCertificate => "no_certificate",
            MtlsRefusal::Revoked => "revoked",
        };
        EncodeLabelValue::encode(&reason, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: MtlsRefusal,
}

/// `weft_mtls_refused_total{reason}`: connections and HBONE streams refused for want of mTLS.
#[derive(Clone, Debug, Default)]
pub struct MtlsRefusals {
    family: Family<RefusalLabels, Counter>,
}

impl MtlsRefusals {
    pub fn inc(&self, reason: MtlsRefusal) {
        self.family.get_or_create(&RefusalLabels { reason }).inc();
    }

    pub fn get(&self, reason: MtlsRefusal) -> u64 {
        self.family.get_or_create(&RefusalLabels { reason }).get()
    }
}

/// A cap a client address holds (see `proxy::sources`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceLimit {
    Connections,
    Requests,
}

impl EncodeLabelValue for SourceLimit {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let limit = match self {
            SourceLimit::Connections => "connections",
            SourceLimit::Requests => "requests",
        };
        EncodeLabelValue::encode(&limit, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLimitLabels {
    limit: SourceLimit,
}

/// `weft_source_limit_refused_total{limit}`: what client addresses over their caps were refused.
#[derive(Clone, Debug, Default)]
pub struct SourceRefusals {
    family: Family<SourceLimitLabels, Counter>,
}

impl SourceRefusals {
    pub fn inc(&self, limit: SourceLimit) {
        self.family
            .get_or_create(&SourceLimitLabels { limit })
            .inc();
    }

    pub fn get(&self, limit: SourceLimit) -> u64 {
        self.family
            .get_or_create(&SourceLimitLabels { limit })
            .get()
    }
}

/// How a request for a workload certificate ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertificateResult {
    Issued,
    /// The CA answered no (a pod not on this node, a bad token...): see the node's log.
    Refused,
    /// The CA could not be reached (or its TLS identity not verified).
    Unreachable,
    /// Anything else: the CA failed, or its answer was unusable.
    Failed,
}

impl EncodeLabelValue for CertificateResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let result = match self {
            CertificateResult::Issued => "issued",
            CertificateResult::Refused => "refused",
            CertificateResult::Unreachable => "unreachable",
            CertificateResult::Failed => "failed",
        };
        EncodeLabelValue::encode(&result, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertificateResultLabels {
    result: CertificateResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// What telemetry is sent: spans and access log records over OTLP, access log lines on the
/// proxy's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    Spans,
    Logs,
    Lines,
}

impl EncodeLabelValue for Signal {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let signal = match self {
            Signal::Spans => "spans",
            Signal::Logs => "logs",
            Signal::Lines => "lines",
        };
        EncodeLabelValue::encode(&signal, encoder)
    }
}

/// Why a span, log record or line was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OtlpDrop {
    /// The queue was full: the collector (or the reader of the proxy's output) is slow or
    /// absent.
    QueueFull,
    /// The collector refused the batch, or could not be reached in time.
    ExportFailed,
}

impl EncodeLabelValue for OtlpDrop {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let reason = match self {
            OtlpDrop::QueueFull => "queue_full",
            OtlpDrop::ExportFailed => "export_failed",
        };
        EncodeLabelValue::encode(&reason, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SignalLabels {
    signal: Signal,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OtlpDropLabels {
    signal: Signal,
    reason: OtlpDrop,
}

/// `weft_telemetry_sent_total{signal}` and `weft_telemetry_dropped_total{signal, reason}`: what
/// became of the spans of sampled requests, of access log records sent over OTLP and of access
/// log lines written to the proxy's output.
#[derive(Clone, Debug, Default)]
pub struct OtlpMetrics {
    exported: Family<SignalLabels, Counter>,
    dropped: Family<OtlpDropLabels, Counter>,
}

impl OtlpMetrics {
    pub fn exported(&self, signal: Signal, n: u64) {
        self.exported
            .get_or_create(&SignalLabels { signal })
            .inc_by(n);
    }

    pub fn dropped(&self, signal: Signal, reason: OtlpDrop, n: u64) {
        self.dropped
            .get_or_create(&OtlpDropLabels { signal, reason })
            .inc_by(n);
    }

    pub fn get_exported(&self, signal: Signal) -> u64 {
        self.exported.get_or_create(&SignalLabels { signal }).get()
    }

    pub fn get_dropped(&self, signal: Signal, reason: OtlpDrop) -> u64 {
        self.dropped
            .get_or_create(&OtlpDropLabels { signal, reason })
            .get()
    }
}

/// `weft_certificate_requests_total{result}` and
/// `weft_certificate_expiry_timestamp_seconds{identity}`: the node's workload certificates.
#[derive(Clone, Debug, Default)]
pub struct CertificateMetrics {
    requests: Family<CertificateResultLabels, Counter>,
    expiry: Family<IdentityLabels, Gauge>,
}

impl CertificateMetrics {
    pub fn request(&self, result: CertificateResult) {
        self.requests
            .get_or_create(&CertificateResultLabels { result })
            .inc();
    }

    pub fn requests(&self, result: CertificateResult) -> u64 {
        self.requests
            .get_or_create(&CertificateResultLabels { result })
            .get()
    }

    /// The certificate in force for `identity` expires at `unix_seconds`.
    pub fn expires(&self, identity: &str, unix_seconds: i64) {
        self.expiry
            .get_or_create(&IdentityLabels {
                identity: identity.into(),
            })
            .set(unix_seconds);
    }

    /// This node holds no certificate for `identity` any more.
    pub fn forget(&self, identity: &str) {
        self.expiry.remove(&IdentityLabels {
            identity: identity.into(),
        });
    }
}

/// What the overload manager refused (see `proxy::overload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverloadRefusal {
    Connections,
    Requests,
}

impl EncodeLabelValue for OverloadRefusal {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let what = match self {
            OverloadRefusal::Connections => "connections",
            OverloadRefusal::Requests => "requests",
        };
        EncodeLabelValue::encode(&what, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OverloadLabels {
    what: OverloadRefusal,
}

/// Why the overload manager closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverloadClose {
    /// It moved nothing for a while.
    Idle,
    /// Its client address is one the manager refuses.
    Heaviest,
}

impl EncodeLabelValue for OverloadClose {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let why = match self {
            OverloadClose::Idle => "idle",
            OverloadClose::Heaviest => "heaviest",
        };
        EncodeLabelValue::encode(&why, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CloseLabels {
    why: OverloadClose,
}

/// The overload manager's gauges and counters.
#[derive(Clone, Debug, Default)]
pub struct OverloadMetrics {
    budget: Gauge,
    used: Gauge,
    level: Gauge,
    refused: Family<OverloadLabels, Counter>,
    closed: Family<CloseLabels, Counter>,
}

impl OverloadMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_memory_budget_bytes",
            "Memory the overload manager keeps the node proxy under (0: no budget)",
            self.budget.clone(),
        );
        registry.register(
            "weft_memory_used_bytes",
            "Memory the overload manager measured last",
            self.used.clone(),
        );
        registry.register(
            "weft_overload_level",
            "0 normal, 1 pressure, 2 shedding the heaviest client, 3 critical",
            self.level.clone(),
        );
        registry.register(
            "weft_overload_refused",
            "Connections and requests refused by the overload manager",
            self.refused.clone(),
        );
        registry.register(
            "weft_overload_closed",
            "Connections the overload manager closed to give memory back, by why",
            self.closed.clone(),
        );
    }

    pub fn set_budget(&self, bytes: u64) {
        self.budget.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn set_used(&self, bytes: u64, level: u8) {
        self.used.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.level.set(i64::from(level));
    }

    pub fn refused(&self, what: OverloadRefusal) {
        self.refused.get_or_create(&OverloadLabels { what }).inc();
    }

    pub fn refused_count(&self, what: OverloadRefusal) -> u64 {
        self.refused.get_or_create(&OverloadLabels { what }).get()
    }

    pub fn closed(&self, why: OverloadClose) {
        self.closed.get_or_create(&CloseLabels { why }).inc();
    }

    pub fn closed_count(&self, why: OverloadClose) -> u64 {
        self.closed.get_or_create(&CloseLabels { why }).get()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthzLabels {
    action: &'static str,
    policy: Label,
    result: &'static str,
}

/// What an authorization decision was, for `weft_authz_decisions_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthzResult {
    Allowed,
    Denied,
    /// An AUDIT policy matched.
    Audited,
    /// What dry-run policies would have decided.
    DryRunAllowed,
    DryRunDenied,
}

impl AuthzResult {
    fn as_str(self) -> &'static str {
        match self {
            AuthzResult::Allowed => "allowed",
            AuthzResult::Denied => "denied",
            AuthzResult::Audited => "audited",
            AuthzResult::DryRunAllowed => "dry_run_allowed",
            AuthzResult::DryRunDenied => "dry_run_denied",
        }
    }
}

/// `weft_authz_decisions_total{action, policy, result}`: requests and connections the
/// AuthorizationPolicies of their destination decided, by the policy that decided (`none`:
/// ALLOW policies applied and none matched, or DENY policies applied and none matched);
/// AUDIT and dry-run policies apart.
#[derive(Clone, Debug, Default)]
pub struct AuthzMetrics {
    family: Family<AuthzLabels, Counter>,
}

impl AuthzMetrics {
    /// Counts one decision of a policy (`None`: no policy of `action` matched).
    pub fn inc(&self, action: &'static str, policy: Option<&str>, result: AuthzResult) {
        self.family
            .get_or_create(&AuthzLabels {
                action,
                policy: policy.map_or_else(|| UNKNOWN_POLICY.clone(), Label::from),
                result: result.as_str(),
            })
            .inc();
    }

    pub fn get(&self, action: &'static str, policy: Option<&str>, result: AuthzResult) -> u64 {
        self.family
            .get_or_create(&AuthzLabels {
                action,
                policy: policy.map_or_else(|| UNKNOWN_POLICY.clone(), Label::from),
                result: result.as_str(),
            })
            .get()
    }
}

/// The `policy` label of a decision no policy made.
static UNKNOWN_POLICY: LazyLock<Label> = LazyLock::new(|| "none".into());

/// Every metric of a node. Built once; [`Metrics::encode`] renders a scrape.
pub struct Metrics {
    registry: Registry,
    tcp: TcpMetrics,
    http: HttpMetrics,
    rejections: Rejections,
    refusals: MtlsRefusals,
    source_refusals: SourceRefusals,
    overload: OverloadMetrics,
    certificates: CertificateMetrics,
    authz: AuthzMetrics,
    otlp: OtlpMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let http = HttpMetrics::default();
        registry.register_collector(Box::new(http.collector()));
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "proxy",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "istio_build",
            "The build of this node proxy (Istio's component and tag labels)",
            build,
        );
        let rejections = Rejections::default();
        registry.register(
            "weft_config_rejected",
            "Configuration resources rejected, by kind (the last good version stays in force)",
            rejections.family.clone(),
        );
        let refusals = MtlsRefusals::default();
        registry.register(
            "weft_mtls_refused",
            "Connections and HBONE streams refused for want of valid mTLS, by reason",
            refusals.family.clone(),
        );
        let source_refusals = SourceRefusals::default();
        registry.register(
            "weft_source_limit_refused",
            "Connections and requests refused because their client address held its cap, by cap",
            source_refusals.family.clone(),
        );
        let overload = OverloadMetrics::default();
        overload.register(&mut registry);
        let certificates = CertificateMetrics::default();
        registry.register(
            "weft_certificate_requests",
            "Workload certificate requests to the mesh CA, by result",
            certificates.requests.clone(),
        );
        registry.register(
            "weft_certificate_expiry_timestamp_seconds",
            "When the certificate this node holds for an identity expires (Unix seconds)",
            certificates.expiry.clone(),
        );
        let authz = AuthzMetrics::default();
        registry.register(
            "weft_authz_decisions",
            "Requests and connections decided by AuthorizationPolicies, by action, deciding policy and result (AUDIT and dry-run policies apart)",
            authz.family.clone(),
        );
        let otlp = OtlpMetrics::default();
        registry.register(
            "weft_telemetry_sent",
            "Spans and access log records sent to OTLP collectors, access log lines written to the proxy's output, by signal",
            otlp.exported.clone(),
        );
        registry.register(
            "weft_telemetry_dropped",
            "Spans, access log records and lines dropped instead of sent, by signal and reason (a request never waits for them)",
            otlp.dropped.clone(),
        );
        Self {
            registry,
            tcp,
            http,
            rejections,
            refusals,
            source_refusals,
            overload,
            certificates,
            authz,
            otlp,
        }
    }

    /// Adds `weft_config_version` (the store's current snapshot) and
    /// `weft_config_applied_version{consumer}` (what each consumer has applied).
    pub fn with_config(
        mut self,
        store: Store,
        applied: impl IntoIterator<Item = (&'static str, Arc<AtomicU64>)>,
    ) -> Self {
        self.registry.register_collector(Box::new(ConfigCollector {
            store,
            applied: applied.into_iter().collect(),
        }));
        self
    }

    /// Adds `weft_ebpf_<counter>_total`, read from the programs' per-CPU map at scrape time.
    pub fn with_ebpf(mut self, counters: Arc<dyn EbpfCounters>) -> Self {
        self.registry
            .register_collector(Box::new(EbpfCollector { counters }));
        self
    }

    pub fn tcp(&self) -> &TcpMetrics {
        &self.tcp
    }

    pub fn http(&self) -> &HttpMetrics {
        &self.http
    }

    pub fn rejections(&self) -> &Rejections {
        &self.rejections
    }

    pub fn refusals(&self) -> &MtlsRefusals {
        &self.refusals
    }

    pub fn source_refusals(&self) -> &SourceRefusals {
        &self.source_refusals
    }

    pub fn overload(&self) -> &OverloadMetrics {
        &self.overload
    }

    pub fn certificates(&self) -> &CertificateMetrics {
        &self.certificates
    }

    pub fn authz(&self) -> &AuthzMetrics {
        &self.authz
    }

    pub fn otlp(&self) -> &OtlpMetrics {
        &self.otlp
    }

    /// Renders every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; an error would be a bug in a collector.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

struct EbpfCollector {
    counters: Arc<dyn EbpfCounters>,
}

impl fmt::Debug for EbpfCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EbpfCollector").finish_non_exhaustive()
    }
}

impl Collector for EbpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        for (name, value) in self.counters.read() {
            let counter = ConstCounter::new(value);
            let metric_name = format!("weft_ebpf_{name}");
            let metric = encoder.encode_descriptor(
                &metric_name,
                &format!("eBPF programs' `{name}` counter, summed over CPUs"),
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct ConfigCollector {
    store: Store,
    applied: Vec<(&'static str, Arc<AtomicU64>)>,
}

impl fmt::Debug for ConfigCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigCollector").finish_non_exhaustive()
    }
}

impl Collector for ConfigCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let version = ConstGauge::new(self.store.current().version);
        let metric = encoder.encode_descriptor(
            "weft_config_version",
            "Version of the newest configuration snapshot",
            None,
            MetricType::Gauge,
        )?;
        version.encode(metric)?;

        let mut metric = encoder.encode_descriptor(
            "weft_config_applied_version",
            "Configuration snapshot version each consumer has applied",
            None,
            MetricType::Gauge,
        )?;
        for (consumer, applied) in &self.applied {
            let labels = [("consumer", *consumer)];
            let gauge = ConstGauge::new(applied.load(Ordering::Acquire));
            gauge.encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{ObjectKey, Snapshot};

    struct FakeCounters;

    impl EbpfCounters for FakeCounters {
        fn read(&self) -> Vec<(&'static str, u64)> {
            vec![("captured", 7), ("errors", 0)]
        }
    }

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            key: ObjectKey::new(ns, name),
            uid: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            annotations: Default::default(),
            node: None,
            ip: None,
            service_account: "default".into(),
            ports: vec![],
            controller: None,
        }
    }

    #[test]
    fn tcp_series_carry_istio_labels() {
        let metrics = Metrics::new();
        let source = pod(
            "bookinfo",
            "productpage-1",
            &[("app", "productpage"), ("version", "v1")],
        );
        let destination = pod(
            "bookinfo",
            "reviews-2",
            &[("app", "reviews"), ("version", "v2")],
        );
        let service = Service {
            key: ObjectKey::new("bookinfo", "reviews"),
            cluster_ip: None,
            ports: vec![],
            selector: None,
            entry: None,
        };
        let labels = TcpLabels::new(
            Reporter::Source,
            Workload::of(&source),
            Workload::of(&destination),
            ServiceLabels::of(&service),
        );
        let conn = metrics.tcp().connection(&labels);
        conn.opened();
        conn.received(10);
        conn.sent(32);
        conn.closed();

        let text = metrics.encode();
        let series = concat!(
            "{reporter=\"source\",source_workload=\"productpage-1\",",
            "source_canonical_service=\"productpage\",source_canonical_revision=\"v1\",",
            "source_workload_namespace=\"bookinfo\",source_principal=\"unknown\",",
            "source_app=\"productpage\",source_version=\"v1\",source_cluster=\"Kubernetes\",",
            "destination_workload=\"reviews-2\",destination_canonical_service=\"reviews\",",
            "destination_canonical_revision=\"v2\",destination_workload_namespace=\"bookinfo\",",
            "destination_principal=\"unknown\",destination_app=\"reviews\",",
            "destination_version=\"v2\",",
            "destination_service=\"reviews.bookinfo.svc.cluster.local\",",
            "destination_service_name=\"reviews\",destination_service_namespace=\"bookinfo\",",
            "destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",response_flags=\"-\",",
            "connection_security_policy=\"unknown\"}"
        );
        for (name, value) in [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_received_bytes_total", 10),
            ("istio_tcp_sent_bytes_total", 32),
        ] {
            let line = format!("{name}{series} {value}\n");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn unknown_peers_and_destination_policy() {
        let labels = TcpLabels::new(
            Reporter::Destination,
            Workload::unknown(),
            Workload::of_option(None),
            ServiceLabels::of_option(None),
        );
        let metrics = Metrics::new();
        metrics.tcp().connection(&labels).opened();
        let text = metrics.encode();
        assert!(text.contains(concat!(
            "reporter=\"destination\",source_workload=\"unknown\",",
            "source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\","
        )));
        assert!(text.contains("connection_security_policy=\"none\""));
    }

    #[test]
    fn response_flags_render_like_envoy() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(ResponseFlags::default(), ResponseFlags::NONE);
        assert_eq!(ResponseFlags::UO.to_string(), "UO");
        assert_eq!(ResponseFlags::UO.as_static_str(), Some("UO"));
        assert_eq!(ResponseFlags::DO.as_static_str(), Some("DO"));
        assert_eq!(ResponseFlags::NONE.as_static_str(), Some("-"));

        // Envoy's order, whatever the order of insertion.
        let mut flags = ResponseFlags::FI;
        flags.insert(ResponseFlags::DI);
        assert_eq!(flags.to_string(), "DI,FI");
        assert_eq!(flags.as_static_str(), None);
        let flags = ResponseFlags::URX | ResponseFlags::UF | ResponseFlags::UH;
        assert_eq!(flags.to_string(), "UH,UF,URX");
        assert_eq!(format!("{flags:?}"), "ResponseFlags(UH,UF,URX)");

        assert!(flags.contains(ResponseFlags::UF | ResponseFlags::URX));
        assert!(!flags.contains(ResponseFlags::UF | ResponseFlags::UT));
        assert!(flags.contains(ResponseFlags::NONE));
        assert!(!flags.is_empty());
        assert!(ResponseFlags::NONE.is_empty());
        assert_eq!(ResponseFlags::DC.bits(), 0x4000);
        assert_eq!(ResponseFlags::UPE.bits(), 0x80_0000);
    }

    #[test]
    fn tcp_flags_label() {
        let labels = TcpLabels::new(
            Reporter::Source,
            Workload::unknown(),
            Workload::unknown(),
            ServiceLabels::unknown(),
        )
        .with_response_flags(ResponseFlags::UF);
        let metrics = Metrics::new();
        metrics.tcp().connection(&labels).opened();
        assert!(metrics.encode().contains("response_flags=\"UF\""));
    }

    #[test]
    fn collectors_read_at_scrape_time() {
        let store = Store::new();
        let proxy = Arc::new(AtomicU64::new(0));
        let ebpf = Arc::new(AtomicU64::new(0));
        let metrics = Metrics::new()
            .with_config(
                store.clone(),
                [("proxy", proxy.clone()), ("ebpf", ebpf.clone())],
            )
            .with_ebpf(Arc::new(FakeCounters));
        metrics.rejections().inc("Pod");

        store.publish(Snapshot::default());
        store.publish(Snapshot::default());
        proxy.store(2, Ordering::Release);
        ebpf.store(1, Ordering::Release);

        let text = metrics.encode();
        for line in [
            "weft_config_version 2\n",
            "weft_config_applied_version{consumer=\"proxy\"} 2\n",
            "weft_config_applied_version{consumer=\"ebpf\"} 1\n",
            "weft_config_rejected_total{kind=\"Pod\"} 1\n",
            "weft_ebpf_captured_total 7\n",
            "weft_ebpf_errors_total 0\n",
            "# TYPE weft_ebpf_captured counter\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
