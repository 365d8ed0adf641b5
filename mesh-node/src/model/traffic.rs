//! Traffic rules as users write them: Istio `VirtualService`, `DestinationRule` and
//! `ServiceEntry` (`networking.istio.io`), Gateway API `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io`, attached to Services as GAMMA describes).
//!
//! Every value here was validated by a source, and upstream defaults are already applied where
//! upstream defines one (a Gateway API backend weight of 1, a redirect code of 301...), so the
//! data plane never re-parses or re-checks. `None` is kept where upstream leaves the choice to
//! the implementation (an unset timeout, an unset connection limit). Header names are stored in
//! lower case: HTTP header names are case-insensitive and the proxy compares them lowered.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr, sync::Arc, time::Duration};

use super::{Labels, ObjectKey};

/// The gateway name that binds Istio rules to the mesh (every sidecar, here every node proxy).
pub const MESH_GATEWAY: &str = "mesh";

/// Compiled programs above this size are refused, so one resource cannot exhaust memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A regular expression as written, compiled twice: anchored, for matches (Envoy and Istio match
/// the whole value with RE2 semantics), and unanchored, for rewrites that substitute every hit.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: Arc<str>,
    whole: regex::Regex,
    search: regex::Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let build = |pattern: &str| {
            regex::RegexBuilder::new(pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
        };
        // Compiled alone first: wrapped in `^(?:...)$`, an unbalanced `a)(b` would compile.
        let search = build(source)?;
        let whole = build(&format!("^(?:{source})$"))?;
        Ok(Self {
            source: source.into(),
            whole,
            search,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.whole.is_match(value)
    }

    /// The unanchored expression, for substitutions.
    pub fn search(&self) -> &regex::Regex {
        &self.search
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Istio's `StringMatch`; Gateway API `Exact` and `RegularExpression` matches map onto it too.
#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    Exact(Arc<str>),
    Prefix(Arc<str>),
    Regex(Pattern),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == &**s,
            StringMatch::Prefix(s) => value.starts_with(&**s),
            StringMatch::Regex(p) => p.is_match(value),
        }
    }
}

/// A header or query parameter condition. `value: None` means "present, whatever its value"
/// (Istio's empty match `{}`).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedMatch {
    pub name: Arc<str>,
    pub value: Option<StringMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: Arc<str>,
    pub value: Arc<str>,
}

/// Header changes applied in the order set, add, remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Arc<[Header]>,
    pub add: Arc<[Header]>,
    pub remove: Arc<[Arc<str>]>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Istio's `Headers`: changes to the request sent upstream and to the response sent back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

/// An address or CIDR block (`10.0.0.0/8`, `10.1.2.3` as a /32, `2001:db8::/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpBlock {
    type Err = String;

    /// Like Go's `netip.ParsePrefix` / `ParseAddr`, which Istio uses: a prefix may have host
    /// bits set (`10.1.2.3/8`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("{s:?} is not a valid CIDR block"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix_len = len
                    .parse::<u8>()
                    .ok()
                    .filter(|l| {
                        *l <= max && !len.starts_with('+') && (len == "0" || !len.starts_with('0'))
                    })
                    .ok_or_else(|| format!("{s:?} is not a valid CIDR block"))?;
                Ok(Self { addr, prefix_len })
            }
            None => {
                let addr: IpAddr = s.parse().map_err(|_| format!("{s:?} is not a valid IP"))?;
                let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
                Ok(Self { addr, prefix_len })
            }
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

// ---------------------------------------------------------------------------------------------
// Istio VirtualService

/// `networking.istio.io` `VirtualService` (v1, v1beta1 and v1alpha3 share the schema).
#[derive(Clone, Debug, PartialEq)]
pub struct VirtualService {
    pub key: ObjectKey,
    pub hosts: Arc<[Arc<str>]>,
    /// Empty means the mesh only; `mesh` among gateways means the mesh as well.
    pub gateways: Arc<[Arc<str>]>,
    pub export_to: Arc<[Arc<str>]>,
    pub http: Arc<[HttpRule]>,
    pub tcp: Arc<[TcpRule]>,
}

impl VirtualService {
    /// Whether the rules apply to traffic between workloads (the node proxies), not only to
    /// ingress gateways.
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| &**g == MESH_GATEWAY)
    }
}

/// One entry of `spec.http`: the first rule whose match succeeds handles the request.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRule {
    pub name: Option<Arc<str>>,
    /// Any one match selects the rule; empty matches everything.
    pub matches: Arc<[HttpMatch]>,
    pub action: HttpAction,
    pub rewrite: Option<Rewrite>,
    pub headers: HeaderRules,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    /// `mirror` + `mirrorPercentage`, or the `mirrors` list.
    pub mirrors: Arc<[Mirror]>,
    /// Kept as written; the proxy does not apply CORS yet.
    pub cors_policy: Option<Arc<yaml_serde::Value>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum HttpAction {
    /// Weighted destinations. A destination gets `weight / sum of weights` of the requests; a
    /// single destination gets all of them whatever its weight.
    Route(Arc<[HttpDestination]>),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

/// The conditions of one `match` entry, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpMatch {
    pub name: Option<Arc<str>>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Arc<[NamedMatch]>,
    pub without_headers: Arc<[NamedMatch]>,
    pub query_params: Arc<[NamedMatch]>,
    pub port: Option<u16>,
    pub source_labels: Labels,
    pub source_namespace: Option<Arc<str>>,
    pub gateways: Arc<[Arc<str>]>,
    /// Compare `uri` without case (exact and prefix matches).
    pub ignore_uri_case: bool,
}

/// Istio's `Destination`: a host (short name, FQDN or ServiceEntry host), optionally narrowed
/// to a DestinationRule subset and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub host: Arc<str>,
    pub subset: Option<Arc<str>>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpDestination {
    pub destination: Destination,
    /// As written (0 when unset).
    pub weight: u32,
    pub headers: HeaderRules,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub uri: Option<Arc<str>>,
    pub authority: Option<Arc<str>>,
    pub port: Option<RedirectPort>,
    /// `http` or `https`.
    pub scheme: Option<Arc<str>>,
    /// 301 unless set.
    pub code: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectPort {
    Number(u16),
    FromProtocolDefault,
    FromRequestPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectResponse {
    pub status: u16,
    pub body: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rewrite {
    /// Replaces the matched prefix, or the whole path after an exact match.
    pub uri: Option<Arc<str>>,
    pub uri_regex: Option<RegexRewrite>,
    pub authority: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RegexRewrite {
    pub pattern: Pattern,
    pub substitution: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retries {
    /// Retries after the first attempt; 0 disables retries.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Empty: the proxy's default conditions.
    pub retry_on: Arc<[RetryOn]>,
    pub retry_remote_localities: Option<bool>,
}

/// One condition of `retryOn`: an Envoy retry policy or an HTTP status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    Policy(RetryPolicy),
    Status(u16),
}

/// The policies Envoy understands in `x-envoy-retry-on` and `x-envoy-retry-grpc-on`, the set
/// Istio accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryPolicy {
    FiveXx,
    GatewayError,
    Reset,
    ResetBeforeRequest,
    ConnectFailure,
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    RetriableHeaders,
    EnvoyRateLimited,
    Http3PostConnectFailure,
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl RetryPolicy {
    pub const ALL: [RetryPolicy; 16] = [
        RetryPolicy::FiveXx,
        RetryPolicy::GatewayError,
        RetryPolicy::Reset,
        RetryPolicy::ResetBeforeRequest,
        RetryPolicy::ConnectFailure,
        RetryPolicy::Retriable4xx,
        RetryPolicy::RefusedStream,
        RetryPolicy::RetriableStatusCodes,
        RetryPolicy::RetriableHeaders,
        RetryPolicy::EnvoyRateLimited,
        RetryPolicy::Http3PostConnectFailure,
        RetryPolicy::Cancelled,
        RetryPolicy::DeadlineExceeded,
        RetryPolicy::Internal,
        RetryPolicy::ResourceExhausted,
        RetryPolicy::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryPolicy::FiveXx => "5xx",
            RetryPolicy::GatewayError => "gateway-error",
            RetryPolicy::Reset => "reset",
            RetryPolicy::ResetBeforeRequest => "reset-before-request",
            RetryPolicy::ConnectFailure => "connect-failure",
            RetryPolicy::Retriable4xx => "retriable-4xx",
            RetryPolicy::RefusedStream => "refused-stream",
            RetryPolicy::RetriableStatusCodes => "retriable-status-codes",
            RetryPolicy::RetriableHeaders => "retriable-headers",
            RetryPolicy::EnvoyRateLimited => "envoy-ratelimited",
            RetryPolicy::Http3PostConnectFailure => "http3-post-connect-failure",
            RetryPolicy::Cancelled => "cancelled",
            RetryPolicy::DeadlineExceeded => "deadline-exceeded",
            RetryPolicy::Internal => "internal",
            RetryPolicy::ResourceExhausted => "resource-exhausted",
            RetryPolicy::Unavailable => "unavailable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0-100. Istio injects into none when no percentage is given.
    pub percentage: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FaultAbort {
    pub error: AbortError,
    /// Share of requests aborted, 0-100. Istio aborts none when no percentage is given.
    pub percentage: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortError {
    HttpStatus(u16),
    /// A gRPC status code (`UNAVAILABLE` is 14).
    GrpcStatus(u8),
}

/// gRPC status names Istio accepts for `grpcStatus`, with their codes.
pub const GRPC_STATUS_CODES: [(&str, u8); 17] = [
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    pub destination: Destination,
    /// Share of requests mirrored, 0-100 (100 when unset).
    pub percentage: f64,
}

/// One entry of `spec.tcp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRule {
    /// Any one match selects the rule; empty matches every connection.
    pub matches: Arc<[L4Match]>,
    pub route: Arc<[RouteDestination]>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L4Match {
    pub destination_subnets: Arc<[IpBlock]>,
    pub port: Option<u16>,
    pub source_labels: Labels,
    pub source_namespace: Option<Arc<str>>,
    pub gateways: Arc<[Arc<str>]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: u32,
}

// ---------------------------------------------------------------------------------------------
// Istio DestinationRule

/// `networking.istio.io` `DestinationRule`.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRule {
    pub key: ObjectKey,
    pub host: Arc<str>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Arc<[Subset]>,
    pub export_to: Arc<[Arc<str>]>,
    pub workload_selector: Option<Labels>,
}

impl DestinationRule {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| &*s.name == name)
    }

    /// The `credentialName`s of the rule's TLS settings (every level: rule, ports, subsets).
    pub fn credential_names(&self) -> impl Iterator<Item = &Arc<str>> {
        let policies = self.traffic_policy.iter().chain(
            self.subsets
                .iter()
                .filter_map(|s| s.traffic_policy.as_ref()),
        );
        policies.flat_map(|p| {
            p.tls
                .iter()
                .chain(p.port_level_settings.iter().filter_map(|l| l.tls.as_ref()))
                .filter_map(|t| t.credential_name.as_ref())
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Subset {
    pub name: Arc<str>,
    /// Endpoints whose pod carries all these labels belong to the subset.
    pub labels: Labels,
    /// Overrides the rule's policy, field by field, for this subset.
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
    pub port_level_settings: Arc<[PortTrafficPolicy]>,
}

/// The settings of one destination port, overriding the policy they sit in.
#[derive(Clone, Debug, PartialEq)]
pub struct PortTrafficPolicy {
    pub port: u16,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancer {
    /// `None`: the proxy's default (Istio's is LEAST_REQUEST).
    pub policy: Option<LbPolicy>,
    pub warmup_duration: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    Simple(SimpleLb),
    ConsistentHash(ConsistentHash),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimpleLb {
    Unspecified,
    /// Deprecated spelling of `LEAST_REQUEST`.
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    HttpHeaderName(Arc<str>),
    HttpCookie {
        name: Arc<str>,
        path: Option<Arc<str>>,
        ttl: Option<Duration>,
    },
    UseSourceIp,
    HttpQueryParameterName(Arc<str>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpPool {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    pub use_client_protocol: bool,
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    /// 0-100.
    pub max_ejection_percent: Option<u32>,
    /// 0-100.
    pub min_health_percent: Option<u32>,
}

/// Istio's `ClientTLSSettings`. File paths are read on the node that originates TLS; a
/// `credential_name` names a [`TlsSecret`] in the client's namespace instead of the files.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientTls {
    pub mode: TlsMode,
    pub sni: Option<Arc<str>>,
    pub subject_alt_names: Arc<[Arc<str>]>,
    pub credential_name: Option<Arc<str>>,
    /// PEM file of the client certificate chain (`MUTUAL`).
    pub client_certificate: Option<Arc<str>>,
    /// PEM file of the client's private key (`MUTUAL`).
    pub private_key: Option<Arc<str>>,
    /// PEM file of the CAs that verify the server; `None`: the system's roots.
    pub ca_certificates: Option<Arc<str>>,
    /// PEM file of certificate revocation lists.
    pub ca_crl: Option<Arc<str>>,
    pub insecure_skip_verify: bool,
}

/// The TLS material of a Kubernetes Secret, for DestinationRule `credentialName`. Istio's two
/// shapes are read: a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`, `ca.crl`) and
/// a generic one (`cert`, `key`, `cacert`, `crl`). Only values that are PEM are kept, so a
/// Secret of some other application is never held.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TlsSecret {
    pub key: ObjectKey,
    /// Client certificate chain.
    pub cert: Option<Arc<str>>,
    /// Private key of `cert`; never printed.
    pub private_key: Option<Arc<str>>,
    /// CAs that verify the server.
    pub ca: Option<Arc<str>>,
    /// Certificate revocation lists.
    pub crl: Option<Arc<str>>,
}

impl fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSecret")
            .field("key", &self.key)
            .field("cert", &self.cert.is_some())
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("ca", &self.ca.is_some())
            .field("crl", &self.crl.is_some())
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

// ---------------------------------------------------------------------------------------------
// Istio ServiceEntry

/// `networking.istio.io` `ServiceEntry`: a service the registry does not know (an external API,
/// a VM), made addressable by host and, optionally, by addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub key: ObjectKey,
    pub hosts: Arc<[Arc<str>]>,
    pub addresses: Arc<[IpBlock]>,
    pub ports: Arc<[ServiceEntryPort]>,
    pub location: MeshLocation,
    pub resolution: Resolution,
    pub endpoints: Arc<[WorkloadEndpoint]>,
    pub export_to: Arc<[Arc<str>]>,
    pub subject_alt_names: Arc<[Arc<str>]>,
    pub workload_selector: Option<Labels>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntryPort {
    pub number: u16,
    /// As written (`HTTP`, `TCP`, `GRPC`...); `None` means detect.
    pub protocol: Option<Arc<str>>,
    pub name: Arc<str>,
    pub target_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshLocation {
    External,
    Internal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// An endpoint of a ServiceEntry (Istio's inline `WorkloadEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadEndpoint {
    /// An IP, a hostname (DNS resolution) or `unix://path`.
    pub address: Arc<str>,
    /// Service port name → endpoint port.
    pub ports: BTreeMap<Arc<str>, u16>,
    pub labels: Labels,
    pub network: Option<Arc<str>>,
    pub locality: Option<Arc<str>>,
    pub weight: Option<u32>,
    pub service_account: Option<Arc<str>>,
}

// ---------------------------------------------------------------------------------------------
// Gateway API

/// A Gateway API `parentRef`. Weft attaches routes to Services (GAMMA); references to Gateways
/// are kept so status and tools can show them, but the mesh does not serve them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// `gateway.networking.k8s.io` unless set; `""` is the core group.
    pub group: Arc<str>,
    /// `Gateway` unless set.
    pub kind: Arc<str>,
    /// `None`: the route's namespace.
    pub namespace: Option<Arc<str>>,
    pub name: Arc<str>,
    pub section_name: Option<Arc<str>>,
    pub port: Option<u16>,
}

impl ParentRef {
    /// A core `Service`: the route applies to traffic for that Service inside the mesh.
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && &*self.kind == "Service"
    }
}

/// `gateway.networking.k8s.io` `HTTPRoute` (v1, v1beta1, v1alpha2).
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    pub key: ObjectKey,
    pub parent_refs: Arc<[ParentRef]>,
    pub hostnames: Arc<[Arc<str>]>,
    pub rules: Arc<[HttpRouteRule]>,
}

impl HttpRoute {
    /// The Services the route attaches to (GAMMA).
    pub fn service_parents(&self) -> impl Iterator<Item = &ParentRef> {
        self.parent_refs.iter().filter(|p| p.is_service())
    }

    /// Whether some parent is not a Service (a Gateway): that part is not served by the mesh.
    pub fn has_non_mesh_parents(&self) -> bool {
        self.parent_refs.iter().any(|p| !p.is_service())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteRule {
    pub name: Option<Arc<str>>,
    /// Any one match selects the rule; never empty (the default is a `/` prefix match).
    pub matches: Arc<[HttpRouteMatch]>,
    pub filters: Arc<[RouteFilter]>,
    pub backend_refs: Arc<[BackendRef]>,
    pub timeouts: RouteTimeouts,
}

/// `Some(Duration::ZERO)` disables the timeout, as the Gateway API specifies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteTimeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteMatch {
    pub path: PathMatch,
    /// Exact or regular-expression header matches (names lower case, first of equal names).
    pub headers: Arc<[NamedMatch]>,
    pub query_params: Arc<[NamedMatch]>,
    pub method: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    Exact(Arc<str>),
    /// Element-wise prefix: `/abc` matches `/abc`, `/abc/` and `/abc/d`, not `/abcd`.
    Prefix(Arc<str>),
    Regex(Pattern),
}

#[derive(Clone, Debug, PartialEq)]
pub enum RouteFilter {
    RequestHeaderModifier(HeaderOps),
    ResponseHeaderModifier(HeaderOps),
    RequestRedirect(RequestRedirect),
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRedirect {
    pub scheme: Option<Arc<str>>,
    pub hostname: Option<Arc<str>>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 302 unless set.
    pub status_code: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlRewrite {
    pub hostname: Option<Arc<str>>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(Arc<str>),
    ReplacePrefixMatch(Arc<str>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct RequestMirror {
    pub backend: BackendObjectRef,
    /// Share of requests mirrored, 0-100, from `percent` or `fraction` (100 when neither).
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendObjectRef {
    /// `""` (core) unless set.
    pub group: Arc<str>,
    /// `Service` unless set.
    pub kind: Arc<str>,
    pub name: Arc<str>,
    /// `None`: the route's namespace.
    pub namespace: Option<Arc<str>>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendRef {
    pub backend: BackendObjectRef,
    /// Relative weight, 0-1000000 (1 when unset).
    pub weight: u32,
    pub filters: Arc<[RouteFilter]>,
}

/// `gateway.networking.k8s.io` `GRPCRoute` (v1, v1beta1, v1alpha2).
#[derive(Clone, Debug, PartialEq)]
pub struct GrpcRoute {
    pub key: ObjectKey,
    pub parent_refs: Arc<[ParentRef]>,
    pub hostnames: Arc<[Arc<str>]>,
    pub rules: Arc<[GrpcRouteRule]>,
}

impl GrpcRoute {
    pub fn service_parents(&self) -> impl Iterator<Item = &ParentRef> {
        self.parent_refs.iter().filter(|p| p.is_service())
    }

    pub fn has_non_mesh_parents(&self) -> bool {
        self.parent_refs.iter().any(|p| !p.is_service())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GrpcRouteRule {
    pub name: Option<Arc<str>>,
    /// Any one match selects the rule; empty matches every call.
    pub matches: Arc<[GrpcRouteMatch]>,
    /// Header modifiers and mirrors only (the Gateway API allows no redirect or rewrite here).
    pub filters: Arc<[RouteFilter]>,
    pub backend_refs: Arc<[BackendRef]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    pub headers: Arc<[NamedMatch]>,
}

/// Matches the `/service/method` path of a call; an absent part matches anything.
#[derive(Clone, Debug, PartialEq)]
pub enum GrpcMethodMatch {
    Exact {
        service: Option<Arc<str>>,
        method: Option<Arc<str>>,
    },
    Regex {
        service: Option<Pattern>,
        method: Option<Pattern>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_the_whole_value() {
        let p = Pattern::new("/api/v[0-9]+").unwrap();
        assert!(p.is_match("/api/v12"));
        assert!(!p.is_match("/api/v12/x"));
        assert!(p.search().is_match("/x/api/v1"));
        assert!(Pattern::new("a)(b").is_err());
    }

    #[test]
    fn ip_blocks() {
        let block: IpBlock = "10.1.2.3/8".parse().unwrap();
        assert!(block.contains("10.200.0.1".parse().unwrap()));
        assert!(!block.contains("11.0.0.1".parse().unwrap()));
        let host: IpBlock = "10.1.2.3".parse().unwrap();
        assert_eq!(host.prefix_len, 32);
        assert!(!host.contains("10.1.2.4".parse().unwrap()));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let v6: IpBlock = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/08",
            "x",
            "",
        ] {
            assert!(bad.parse::<IpBlock>().is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_policies_round_trip() {
        for p in RetryPolicy::ALL {
            assert_eq!(RetryPolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(RetryPolicy::parse("5XX"), None);
    }
}
