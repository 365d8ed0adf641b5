//! Clusters, as Envoy has them for an Istio sidecar: the endpoints behind one (service, port,
//! subset), the DestinationRule policy that applies to them, load balancing, outlier detection
//! and circuit-breaker counters.
//!
//! A [`Cluster`] is built from one snapshot and holds only what that snapshot says. What has to
//! survive a configuration change (endpoint health, the round-robin position, circuit-breaker
//! counters) lives in a [`ClusterState`] that the proxy-wide [`Clusters`] registry hands out by
//! [`ClusterKey`]. Picking an endpoint and reporting its outcome read and write atomics only; a
//! lock is taken when a cluster is built and when an endpoint is about to be ejected.
//!
//! # Which DestinationRule applies ([`policy_for`])
//!
//! Istio's lookup (`PushContext.destinationRule`), with `istio-system` as the root namespace:
//! 1. rules in the client's namespace that are visible there (`exportTo` empty, `*`, `.` or the
//!    namespace itself); a client in the root namespace only sees its private rules here;
//! 2. rules in the service's namespace exported to the client (`exportTo` empty, `*` or the
//!    client's namespace; rules exported only to their own namespace are private);
//! 3. rules in the root namespace exported to the client.
//!
//! Within a namespace the most specific host wins: the service itself over any wildcard, a
//! longer wildcard (`*.bookinfo.svc.cluster.local`) over a shorter one (`*.local`, `*`). If the
//! most specific rule is not exported to the client the step finds nothing (as in Istio; it
//! does not fall back to a less specific rule). Several rules for the same host in one namespace
//! are merged like Istio does: subsets are concatenated (the first of a name wins) and the first
//! top-level traffic policy is used; "first" is by name, since the model does not keep creation
//! times (Istio orders by creation time, then name).
//!
//! A rule's host is resolved relative to the rule's namespace: `reviews` in `bookinfo` means
//! `reviews.bookinfo.svc.cluster.local`. Unlike Istio, which takes any host with a dot as fully
//! qualified, `reviews.bookinfo` and `reviews.bookinfo.svc` also name that service: Kubernetes
//! DNS resolves them to it, and a rule that silently applies to nothing helps no one.
//!
//! Rules with a `workloadSelector` are ignored: they apply to the selected workloads' own
//! sidecars, and a node proxy serving many workloads cannot apply them per client yet.
//!
//! The policy of a cluster is Istio's `MergeTrafficPolicy`: the top-level policy, each of its
//! fields (`loadBalancer`, `connectionPool`, `outlierDetection`) replaced by the subset's when the
//! subset sets it; at each level a `portLevelSettings` entry for the service port replaces all
//! of those fields, unset ones included (Istio: port-level policies do not inherit). `tls`
//! merges the same way; `SIMPLE` and `MUTUAL` become the cluster's TLS origination
//! ([`crate::tls::origination`]), `ISTIO_MUTUAL` is the HBONE hop every cross-node connection
//! takes anyway, `DISABLE` changes nothing.
//!
//! # Defaults and mappings
//!
//! - Load balancing: `LEAST_REQUEST` unless set (Istio's default); `LEAST_CONN` and `UNSPECIFIED`
//!   mean the same. `PASSTHROUGH` (Envoy's original-destination cluster) is served round robin:
//!   the client dialled the service address, so there is no original endpoint to keep.
//!   `warmupDurationSecs` and `minimumRingSize` are ignored.
//! - Circuit breakers: every limit is 2³²-1 unless set, as Istio configures Envoy; a limit
//!   written as 0 counts as unset, as in Istio. `tcp.maxConnections` limits connections,
//!   `http.http1MaxPendingRequests` requests waiting for a connection, `http.http2MaxRequests`
//!   requests in flight, `http.maxRetries` retries in flight.
//! - `http.idleTimeout` overrides `tcp.idleTimeout`; `h2UpgradePolicy: DEFAULT` follows the mesh
//!   default, which is not to upgrade.
//! - Outlier detection runs only when the policy has an `outlierDetection` block, with Envoy's
//!   defaults for what it leaves unset: 5 consecutive 5xx (0 disables), consecutive gateway
//!   errors off unless set, interval 10s, base ejection time 30s, maximum ejection time 300s (or
//!   the base time when longer), at most 10% of the endpoints ejected, `minHealthPercent` 0.
//!
//! # Load balancing
//!
//! Round robin rotates a counter kept in the [`ClusterState`]; least request takes the less
//! loaded of two distinct random endpoints (Envoy's power of two choices) by requests in flight,
//! counted while a [`Pick`] lives; random is uniform. Consistent hashing uses rendezvous
//! hashing: every endpoint scores each key and the highest score wins, so a key stays on its
//! endpoint and only the keys of an endpoint that leaves move. It costs O(endpoints) per pick,
//! which is fine at the sizes of a mesh service. A request without the hash key (header, cookie
//! or query parameter absent) is balanced at random, like Envoy; a missing cookie is not
//! generated.
//!
//! # Outlier detection
//!
//! Envoy's consecutive-error detectors, on the outcomes the caller [reports](Cluster::report).
//! Unless `splitExternalLocalOriginErrors` is set, local failures count as Envoy maps them: a
//! connect failure or a reset as a 503, a timeout as a 504. The 5xx detector counts every 5xx,
//! the gateway detector 502, 503 and 504 (another 5xx resets it); any other response resets
//! both. With the split, local failures count only towards `consecutiveLocalOriginFailures`
//! (Envoy's default 5 when unset). Reaching a threshold ejects the endpoint at once for
//! `baseEjectionTime × n`, n being Envoy's backoff multiplier: one more for each ejection, one
//! less for each `interval` spent healthy since the last readmission, the time capped at the
//! maximum ejection time. An ejection is refused when it would take the ejected share of the
//! cluster above `maxEjectionPercent`, except that one endpoint may always be ejected
//! ([`Outlier::always_eject_one`]). Readmission is lazy: an endpoint is eligible again as soon
//! as its ejection time has passed, without waiting for the next `interval` tick. When fewer
//! than `minHealthPercent` of the endpoints are healthy, picks ignore ejections (Envoy's panic
//! threshold) while the bookkeeping goes on.

use std::{
    cell::Cell,
    collections::{hash_map::RandomState, HashMap, HashSet},
    fmt,
    hash::{BuildHasher, Hasher},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use thiserror::Error;

mod limits;
mod outlier;
mod policy;

pub use self::{limits::*, outlier::*, policy::*};

use crate::model::{
    traffic::{
        ClientTls, ConnectionPool, DestinationRule, H2UpgradePolicy, HashKey, LbPolicy,
        LoadBalancer, OutlierDetection, Resolution, SimpleLb, TlsMode, TrafficPolicy,
    },
    Endpoint, Labels, ObjectKey, Pod, Snapshot,
};
use crate::tls::origination::{Material, Origination, OriginationError};

/// Istio's default `meshConfig.rootNamespace`: rules there apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The cluster domain of every Service hostname (`name.namespace.svc.cluster.local`).
const SERVICE_DOMAIN: &str = "svc.cluster.local";

/// Envoy's `max_ejection_time` when unset.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// A registry entry unused this long, and held by no cluster, is forgotten.
const IDLE_STATE: Duration = Duration::from_secs(600);
/// How often the registry looks for idle entries.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// What a cluster is: the endpoints of one service port, narrowed to a subset.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub service: ObjectKey,
    /// The service port (not the endpoints' target port).
    pub port: u16,
    /// A DestinationRule subset name.
    pub subset: Option<Arc<str>>,
}

impl ClusterKey {
    pub fn new(service: ObjectKey, port: u16, subset: Option<Arc<str>>) -> Self {
        Self {
            service,
            port,
            subset,
        }
    }
}

impl fmt::Display for ClusterKey {
    /// Envoy's cluster name as Istio writes it: `outbound|9080|v1|reviews.bookinfo.svc.cluster.local`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbound|{}|{}|{}.{}.{SERVICE_DOMAIN}",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            self.service.name,
            self.service.namespace
        )
    }
}

/// The endpoints of one cluster for one snapshot.
#[derive(Debug)]
pub struct Cluster {
    key: ClusterKey,
    policy: ClusterPolicy,
    state: Arc<ClusterState>,
    members: Box<[Member]>,
    /// A ServiceEntry host with resolution `NONE`: requests go where the client dialled
    /// (Envoy's original-destination cluster).
    passthrough: bool,
    /// TLS originated to the endpoints (DestinationRule `SIMPLE`/`MUTUAL`).
    origination: Option<Arc<Origination>>,
}

#[derive(Debug)]
struct Member {
    addr: SocketAddrV4,
    pod: Option<Arc<Pod>>,
    node: Option<Arc<str>>,
    health: Arc<EndpointHealth>,
    /// The endpoint's side of the rendezvous hash.
    hash: u64,
}

/// The endpoint chosen for one request. Dropping it ends the request for least-request
/// balancing.
#[derive(Debug)]
pub struct Pick {
    pub addr: SocketAddrV4,
    pub pod: Option<Arc<Pod>>,
    /// The node the endpoint runs on, from the endpoint or else its pod.
    pub node: Option<Arc<str>>,
    pub health: Arc<EndpointHealth>,
    _active: ActiveRequest,
}

/// Counts one request in flight on an endpoint until dropped.
#[derive(Debug)]
struct ActiveRequest(Arc<EndpointHealth>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint of a cluster, for operators.
#[derive(Clone, Copy, Debug)]
pub struct EndpointView<'c> {
    pub addr: SocketAddrV4,
    pub pod: Option<&'c Arc<Pod>>,
    pub node: Option<&'c str>,
    /// Outlier detection keeps it out of the balancing for now.
    pub ejected: bool,
}

/// How a request to an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// A response with this status (any status; below 500 counts as a success).
    Status(u16),
    ConnectFailure,
    /// The connection or stream was reset before a response.
    Reset,
    Timeout,
}

impl Cluster {
    /// Builds the cluster of `key` from `snapshot`: the ready endpoints of the service port,
    /// narrowed to the subset. `policy` comes from [`policy_for`] for the same key; `state` from
    /// [`Clusters::state`]. Fails when the key names a subset the policy could not resolve.
    pub fn build(
        snapshot: &Snapshot,
        key: ClusterKey,
        policy: ClusterPolicy,
        state: Arc<ClusterState>,
    ) -> Result<Self, ClusterError> {
        let labels = match (&key.subset, &policy.subset) {
            (None, _) => None,
            (Some(_), SubsetMatch::Labels(labels)) => Some(labels.clone()),
            (Some(subset), SubsetMatch::All | SubsetMatch::Undefined) => {
                return Err(ClusterError::UnknownSubset {
                    service: key.service.clone(),
                    subset: subset.clone(),
                    rule: policy.rule.clone(),
                })
            }
        };
        let endpoints = snapshot.endpoints(&key.service, key.port);
        let mut members = Vec::with_capacity(endpoints.len());
        // EndpointSlices may list an address twice; it is one endpoint.
        let mut seen = HashSet::with_capacity(endpoints.len());
        {
            let mut health = state.health();
            for endpoint in endpoints.iter().filter(|e| e.ready) {
                let addr = SocketAddrV4::new(endpoint.ip, endpoint.port);
                let pod = endpoint_pod(snapshot, endpoint).cloned();
                if let Some(labels) = &labels {
                    if !labels.is_empty() && !pod.as_ref().is_some_and(|p| p.carries(labels)) {
                        continue;
                    }
                }
                if !seen.insert(addr) {
                    continue;
                }
                let node = endpoint
                    .node
                    .clone()
                    .or_else(|| pod.as_ref().and_then(|p| p.node.clone()));
                let health = health
                    .entry(addr)
                    .or_insert_with(|| Arc::new(EndpointHealth::new(addr, state.epoch)))
                    .clone();
                members.push(Member {
                    addr,
                    pod,
                    node,
                    health,
                    hash: mix((u64::from(u32::from(*addr.ip())) << 16) | u64::from(addr.port())),
                });
            }
            // Health no cluster refers to any more belongs to endpoints that are gone.
            health.retain(|_, h| Arc::strong_count(h) > 1);
        }
        let service = snapshot.services.get(&key.service);
        let passthrough = service.is_some_and(|s| {
            s.selector.is_none()
                && s.entry
                    .as_ref()
                    .is_some_and(|e| e.resolution == Resolution::None)
        });
        let origination = match &policy.tls {
            Some(tls) => {
                let host = service.map_or_else(
                    || {
                        format!(
                            "{}.{}.{SERVICE_DOMAIN}",
                            key.service.name, key.service.namespace
                        )
                    },
                    |s| s.hostname(),
                );
                // A Secret is the client's, as in Istio (the namespace of the proxy that uses
                // it): a rule exported to other namespaces never lends them its own.
                Material::of(tls, policy.client_namespace.as_deref(), &snapshot.secrets)
                    .and_then(|material| Origination::new(tls, &host, material))
                    .map_err(|reason| ClusterError::Tls {
                        service: key.service.clone(),
                        port: key.port,
                        rule: policy.rule.clone(),
                        reason: Box::new(reason),
                    })?
                    .map(Arc::new)
            }
            None => None,
        };
        Ok(Self {
            key,
            policy,
            state,
            members: members.into_boxed_slice(),
            passthrough,
            origination,
        })
    }

    /// The TLS this cluster originates, if any.
    pub fn origination(&self) -> Option<&Arc<Origination>> {
        self.origination.as_ref()
    }

    /// The endpoint of a request on a connection to `dialled`: one of the cluster's, or the
    /// dialled address itself for an original-destination cluster.
    pub fn pick_for(
        &self,
        dialled: Option<SocketAddrV4>,
        hash: Option<u64>,
        avoid: Option<SocketAddrV4>,
        now: Instant,
    ) -> Option<Pick> {
        match dialled {
            Some(addr) if self.passthrough => {
                let health = Arc::new(EndpointHealth::new(addr, self.state.epoch));
                health.active.fetch_add(1, Ordering::Relaxed);
                Some(Pick {
                    addr,
                    pod: None,
                    node: None,
                    health: health.clone(),
                    _active: ActiveRequest(health),
                })
            }
            _ => self.pick(hash, avoid, now),
        }
    }

    /// Whether requests go where the client dialled.
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// The consistent-hash key of a TCP connection: only a source-IP hash applies to TCP
    /// (Envoy's TCP proxy hashes on nothing else); other hash policies pick at random.
    pub fn connection_hash(&self, source: Ipv4Addr) -> Option<u64> {
        match &self.policy.lb {
            Lb::Hash(HashKey::UseSourceIp) => Some(hash_bytes(&source.octets())),
            _ => None,
        }
    }

    pub fn policy(&self) -> &ClusterPolicy {
        &self.policy
    }

    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    /// Number of ready endpoints (after subset filtering), ejected ones included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The endpoints' addresses, in snapshot order.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddrV4> + '_ {
        self.members.iter().map(|m| m.addr)
    }

    /// The endpoints, in snapshot order, as `meshctl` shows them.
    pub fn endpoints(&self, now: Instant) -> Vec<EndpointView<'_>> {
        let now = self.state.offset(now);
        self.members
            .iter()
            .map(|m| EndpointView {
                addr: m.addr,
                pod: m.pod.as_ref(),
                node: m.node.as_deref(),
                ejected: m.health.ejected_at(now),
            })
            .collect()
    }

    /// Picks a ready endpoint that is not ejected, by the policy. `hash` is the request's
    /// consistent-hash key ([`Cluster::request_hash`]); without one a hash policy picks at
    /// random. `avoid` (the endpoint a retry follows) is picked only when nothing else is
    /// available. `None`: no endpoint is available (Envoy's `UH`).
    pub fn pick(
        &self,
        hash: Option<u64>,
        avoid: Option<SocketAddrV4>,
        now: Instant,
    ) -> Option<Pick> {
        if self.members.is_empty() {
            return None;
        }
        let now = self.state.offset(now);
        // Ejections are rare: while none is in force, the per-endpoint checks are skipped.
        let ejections =
            self.state.ejections_end.load(Ordering::Acquire) > now && !self.panicking(now);
        let usable = |i: usize| !ejections || !self.members[i].health.ejected_at(now);
        let index = match avoid {
            Some(avoid) => self
                .choose(hash, &|i| usable(i) && self.members[i].addr != avoid)
                .or_else(|| self.choose(hash, &usable)),
            None => self.choose(hash, &usable),
        }?;
        let member = &self.members[index];
        member.health.active.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            addr: member.addr,
            pod: member.pod.clone(),
            node: member.node.clone(),
            health: member.health.clone(),
            _active: ActiveRequest(member.health.clone()),
        })
    }

    /// Envoy's panic threshold: too few healthy endpoints to honour ejections.
    fn panicking(&self, now: u64) -> bool {
        let min = self
            .policy
            .outlier
            .as_ref()
            .map_or(0, |o| o.min_health_percent);
        if min == 0 {
            return false;
        }
        let healthy = self
            .members
            .iter()
            .filter(|m| !m.health.ejected_at(now))
            .count();
        (healthy as u64) * 100 < u64::from(min) * self.members.len() as u64
    }

    fn choose(&self, hash: Option<u64>, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.members.len();
        match (&self.policy.lb, hash) {
            (Lb::RoundRobin, _) => {
                let start = self.state.next.fetch_add(1, Ordering::Relaxed);
                scan_from(start % n, n, ok)
            }
            (Lb::LeastRequest, _) => {
                let first = random_member(n, ok)?;
                let second = (0..3)
                    .map(|_| random_below(n))
                    .find(|&i| i != first && ok(i))
                    .or_else(|| scan_from(random_below(n), n, &|i| i != first && ok(i)));
                let load = |i: usize| self.members[i].health.active_requests();
                Some(match second {
                    Some(second) if load(second) < load(first) => second,
                    _ => first,
                })
            }
            (Lb::Hash(_), Some(key)) => self
                .members
                .iter()
                .enumerate()
                .filter(|(i, _)| ok(*i))
                .max_by_key(|(_, m)| mix(key ^ m.hash))
                .map(|(i, _)| i),
            (Lb::Random | Lb::Hash(_), _) => random_member(n, ok),
        }
    }

    /// The consistent-hash key of a request under a hash policy: the header value, the cookie
    /// value (from the `Cookie` headers), the query parameter value (as written, not decoded) or
    /// the source address. `None` without a hash policy or when the request lacks the key.
    pub fn request_hash(
        &self,
        headers: &http::HeaderMap,
        uri: &http::Uri,
        source: Ipv4Addr,
    ) -> Option<u64> {
        let Lb::Hash(key) = &self.policy.lb else {
            return None;
        };
        let value = match key {
            HashKey::HttpHeaderName(name) => headers.get(&**name)?.as_bytes(),
            HashKey::HttpCookie { name, .. } => cookie(headers, name)?,
            HashKey::HttpQueryParameterName(name) => query_parameter(uri, name)?,
            HashKey::UseSourceIp => return Some(hash_bytes(&source.octets())),
        };
        Some(hash_bytes(value))
    }

    /// Outlier accounting for a request sent to `pick`. Returns true when this outcome ejected
    /// the endpoint (worth a log line). Does nothing without outlier detection.
    pub fn report(&self, pick: &Pick, outcome: Outcome, now: Instant) -> bool {
        let Some(outlier) = &self.policy.outlier else {
            return false;
        };
        let health = &pick.health;
        let now = self.state.offset(now);
        // Outcomes of requests sent before the ejection would count against the endpoint when
        // it comes back; Envoy resets the counters on readmission to the same effect.
        if health.ejected_at(now) {
            return false;
        }
        match health.record(outcome, outlier) {
            Some(detector) => self.eject(health, detector, outlier, now),
            None => false,
        }
    }

    fn eject(
        &self,
        health: &EndpointHealth,
        detector: Detector,
        outlier: &Outlier,
        now: u64,
    ) -> bool {
        let _ejecting = lock(&self.state.ejecting);
        if health.ejected_at(now) {
            return false;
        }
        // Reset whether or not the ejection happens, so another bout of errors is needed.
        health.counter(detector).store(0, Ordering::Relaxed);
        let total = self.members.len().max(1) as u64;
        let ejected = self
            .members
            .iter()
            .filter(|m| m.health.ejected_at(now))
            .count() as u64;
        let allowed = (ejected + 1) * 100 <= u64::from(outlier.max_ejection_percent) * total
            || (outlier.always_eject_one && ejected == 0);
        if !allowed {
            return false;
        }
        let last_until = health.ejected_until.load(Ordering::Acquire);
        let mut backoff = health.backoff.load(Ordering::Relaxed);
        let interval = nanos(outlier.interval);
        if last_until != 0 && interval > 0 {
            let healthy_intervals = now.saturating_sub(last_until) / interval;
            backoff = backoff.saturating_sub(u32::try_from(healthy_intervals).unwrap_or(u32::MAX));
        }
        let base = outlier.base_ejection_time;
        let max = outlier.max_ejection_time;
        if base.saturating_mul(backoff) < max.saturating_add(base) {
            backoff += 1;
        }
        let until = now
            .saturating_add(nanos(base.saturating_mul(backoff).min(max)))
            .max(1);
        health.backoff.store(backoff, Ordering::Relaxed);
        for detector in [Detector::FiveXx, Detector::Gateway, Detector::LocalOrigin] {
            health.counter(detector).store(0, Ordering::Relaxed);
        }
        health.ejected_until.store(until, Ordering::Release);
        self.state.ejections_end.fetch_max(until, Ordering::AcqRel);
        true
    }
}

/// The pod behind `endpoint`: the one its EndpointSlice names, else the pod with its address.
pub fn endpoint_pod<'s>(snapshot: &'s Snapshot, endpoint: &Endpoint) -> Option<&'s Arc<Pod>> {
    endpoint
        .pod
        .as_ref()
        .and_then(|k| snapshot.pods.get(k))
        .or_else(|| snapshot.pod_by_ip(endpoint.ip))
}

/// A panic while a lock was held leaves plain data behind; carrying on is safe.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn offset(epoch: Instant, now: Instant) -> u64 {
    nanos(now.saturating_duration_since(epoch))
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let eq = pair.iter().position(|b| *b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

fn query_parameter<'u>(uri: &'u http::Uri, name: &str) -> Option<&'u [u8]> {
    uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value.as_bytes())
    })
}

/// FNV-1a, finished by [`mix`] so that similar values spread.
fn hash_bytes(bytes: &[u8]) -> u64 {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    mix(hash)
}

/// MurmurHash3's 64-bit finalizer.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Xorshift64, one generator per thread, seeded from the standard library's random keys:
/// load balancing needs speed, not unpredictability.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().build_hasher().finish() | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

/// Uniform in `0..n` (Lemire's multiply-shift), for `n > 0`.
fn random_below(n: usize) -> usize {
    ((u128::from(random()) * n as u128) >> 64) as usize
}

/// A random index accepted by `ok`. A few draws find one unless most are refused; then a scan
/// from a random start does.
fn random_member(n: usize, ok: &impl Fn(usize) -> bool) -> Option<usize> {
    (0..3)
        .map(|_| random_below(n))
        .find(|&i| ok(i))
        .or_else(|| scan_from(random_below(n), n, ok))
}

fn scan_from(start: usize, n: usize, ok: &impl Fn(usize) -> bool) -> Option<usize> {
    (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        model::{Endpoint, ServiceEndpoints},
        source::{file::parse_documents, Object},
    };

    const PORT: u16 = 9080;

    fn reviews() -> ObjectKey {
        ObjectKey::new("bookinfo", "reviews")
    }

    fn key(port: u16, subset: Option<&str>) -> ClusterKey {
        ClusterKey::new(reviews(), port, subset.map(Arc::from))
    }

    /// A DestinationRule document; `spec` in YAML flow style.
    fn dr(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }

    /// Pods `reviews-<i>` of bookinfo/reviews at 10.0.0.<last>, labelled `version`, each an
    /// endpoint of port 9080 (target 9080).
    fn snapshot_with(pods: &[(&str, u8)], rules: &[String]) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut endpoints = Vec::new();
        for (i, (version, last)) in pods.iter().enumerate() {
            let pod = Pod {
                key: ObjectKey::new("bookinfo", &format!("reviews-{i}")),
                uid: None,
                labels: Labels::from([
                    ("app".into(), "reviews".into()),
                    ("version".into(), (*version).into()),
                ]),
                annotations: Labels::new(),
                node: Some("n1".into()),
                ip: Some([10, 0, 0, *last].into()),
                service_account: "default".into(),
                ports: vec![],
                controller: None,
            };
            endpoints.push(Endpoint {
                ip: [10, 0, 0, *last].into(),
                port: PORT,
                pod: Some(pod.key.clone()),
                node: None,
                ready: true,
            });
            snapshot.pods.insert(pod.key.clone(), Arc::new(pod));
        }
        snapshot.endpoints.insert(
            reviews(),
            Arc::new(ServiceEndpoints {
                by_port: BTreeMap::from([(PORT, endpoints)]),
            }),
        );
        for (_, object) in parse_documents("rules.yaml", rules.join("---\n").as_bytes()) {
            match object {
                Ok(Object::DestinationRule(rule)) => {
                    snapshot.destination_rules.insert(rule.key.clone(), rule);
                }
                other => panic!("not a DestinationRule: {other:?}"),
            }
        }
        snapshot.index();
        snapshot
    }

    /// v1 at .1 and .2, v2 at .3, v3 at .4.
    fn snapshot(rules: &[String]) -> Snapshot {
        snapshot_with(&[("v1", 1), ("v1", 2), ("v2", 3), ("v3", 4)], rules)
    }

    /// The rules' part of the policy for a client of `client` (which the policy records).
    fn policy(snapshot: &Snapshot, subset: Option<&str>, client: Option<&str>) -> ClusterPolicy {
        let policy = policy_for(snapshot, &key(PORT, subset), client);
        assert_eq!(policy.client_namespace.as_deref(), client);
        ClusterPolicy {
            client_namespace: None,
            ..policy
        }
    }

    fn build(snapshot: &Snapshot, subset: Option<&str>) -> Cluster {
        let policy = policy(snapshot, subset, Some("bookinfo"));
        Cluster::build(
            snapshot,
            key(PORT, subset),
            policy,
            Arc::new(ClusterState::new()),
        )
        .unwrap()
    }

    fn addr(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new([10, 0, 0, last].into(), PORT)
    }

    fn lb(simple: &str) -> String {
        format!("{{loadBalancer: {{simple: {simple}}}}}")
    }

    /// One pick per endpoint, in order (the cluster must balance round robin).
    fn one_each(cluster: &Cluster, now: Instant) -> Vec<Pick> {
        let mut picks: Vec<Pick> = (0..cluster.len())
            .map(|_| cluster.pick(None, None, now).unwrap())
            .collect();
        picks.sort_by_key(|p| p.addr);
        picks
    }

    #[test]
    fn rules_are_found_by_short_name_name_dot_namespace_and_fqdn() {
        for host in [
            "reviews",
            "reviews.bookinfo",
            "reviews.bookinfo.svc",
            "reviews.bookinfo.svc.cluster.local",
        ] {
            let spec = format!("{{host: {host}, trafficPolicy: {}}}", lb("ROUND_ROBIN"));
            let s = snapshot(&[dr("bookinfo", "r", &spec)]);
            for client in [Some("bookinfo"), Some("frontend"), None] {
                let p = policy(&s, None, client);
                assert_eq!(p.lb, Lb::RoundRobin, "{host} from {client:?}");
                assert_eq!(p.rule, Some(ObjectKey::new("bookinfo", "r")));
            }
        }
        // A short name is relative to the rule's namespace.
        let s = snapshot(&[
            dr(
                "other",
                "r",
                &format!("{{host: reviews, trafficPolicy: {}}}", lb("RANDOM")),
            ),
            dr(
                "bookinfo",
                "ratings",
                &format!("{{host: ratings, trafficPolicy: {}}}", lb("RANDOM")),
            ),
        ]);
        assert_eq!(policy(&s, None, Some("other")), ClusterPolicy::default());
        assert_eq!(policy(&s, None, Some("bookinfo")), ClusterPolicy::default());
    }

    #[test]
    fn the_most_specific_host_wins() {
        let rule = |name: &str, host: &str, lb: String| {
            dr(
                "bookinfo",
                name,
                &format!("{{host: '{host}', trafficPolicy: {lb}}}"),
            )
        };
        let all = rule("all", "*", lb("ROUND_ROBIN"));
        let local = rule("local", "*.local", lb("ROUND_ROBIN"));
        let ns = rule("ns", "*.bookinfo.svc.cluster.local", lb("RANDOM"));
        let exact = rule(
            "exact",
            "reviews",
            "{loadBalancer: {consistentHash: {useSourceIp: true}}}".into(),
        );
        let s = snapshot(&[all.clone(), local.clone(), ns.clone()]);
        assert_eq!(policy(&s, None, Some("bookinfo")).lb, Lb::Random);
        let s = snapshot(&[all.clone(), local, ns, exact]);
        assert_eq!(
            policy(&s, None, Some("bookinfo")).lb,
            Lb::Hash(HashKey::UseSourceIp)
        );
        let s = snapshot(&[all]);
        assert_eq!(policy(&s, None, Some("bookinfo")).lb, Lb::RoundRobin);
    }

    #[test]
    fn rules_for_one_host_in_one_namespace_merge() {
        let a = dr(
            "bookinfo",
            "a",
            "{host: reviews, subsets: [{name: v1, labels: {version: v1}}]}",
        );
        let b = dr(
            "bookinfo",
            "b",
            &format!(
                "{{host: reviews.bookinfo.svc.cluster.local, trafficPolicy: {}, subsets: \
                 [{{name: v1, labels: {{version: v2}}}}, {{name: v2, labels: {{version: v2}}}}]}}",
                lb("RANDOM")
            ),
        );
        let s = snapshot(&[b, a]);
        let p = policy(&s, Some("v1"), Some("bookinfo"));
        assert_eq!(p.lb, Lb::Random);
        assert_eq!(p.rule, Some(ObjectKey::new("bookinfo", "a")));
        let v1 = Labels::from([("version".into(), "v1".into())]);
        assert_eq!(p.subset, SubsetMatch::Labels(Arc::new(v1)));
        let p = policy(&s, Some("v2"), Some("bookinfo"));
        assert!(matches!(p.subset, SubsetMatch::Labels(_)), "{p:?}");
    }

    #[test]
    fn export_to_and_lookup_order() {
        let rule = |ns: &str, name: &str, host: &str, export: &str, lb: &str| {
            dr(
                ns,
                name,
                &format!(
                    "{{host: '{host}', exportTo: {export}, trafficPolicy: {}}}",
                    self::lb(lb)
                ),
            )
        };
        // Private to the service's namespace.
        let s = snapshot(&[rule("bookinfo", "r", "reviews", "['.']", "RANDOM")]);
        assert_eq!(policy(&s, None, Some("bookinfo")).lb, Lb::Random);
        assert_eq!(policy(&s, None, Some("frontend")).lb, Lb::LeastRequest);
        assert_eq!(policy(&s, None, None).lb, Lb::LeastRequest);

        // Exported to one namespace.
        let s = snapshot(&[rule("bookinfo", "r", "reviews", "[frontend]", "RANDOM")]);
        assert_eq!(policy(&s, None, Some("frontend")).lb, Lb::Random);
        assert_eq!(policy(&s, None, Some("other")).lb, Lb::LeastRequest);
        assert_eq!(policy(&s, None, Some("bookinfo")).lb, Lb::LeastRequest);

        // The client's namespace comes first; a third namespace's rules apply to no one else.
        let s = snapshot(&[
            rule("bookinfo", "r", "reviews", "['*']", "RANDOM"),
            rule(
                "frontend",
                "mine",
                "reviews.bookinfo.svc.cluster.local",
                "['.']",
                "ROUND_ROBIN",
            ),
        ]);
        assert_eq!(policy(&s, None, Some("frontend")).lb, Lb::RoundRobin);
        assert_eq!(policy(&s, None, Some("bookinfo")).lb, Lb::Random);
        assert_eq!(policy(&s, None, Some("other")).lb, Lb::Random);

        // The root namespace comes last.
        let root = rule(ROOT_NAMESPACE, "mesh", "*.local", "['*']", "ROUND_ROBIN");
        let s = snapshot(std::slice::from_ref(&root));
        assert_eq!(policy(&s, None, Some("other")).lb, Lb::RoundRobin);
        assert_eq!(policy(&s, None, None).lb, Lb::RoundRobin);
        let s = snapshot(&[root, rule("bookinfo", "r", "reviews", "[]", "RANDOM")]);
        assert_eq!(policy(&s, None, Some("other")).lb, Lb::Random);

        // The most specific rule is not exported to the client: no fallback in that namespace.
        let s = snapshot(&[
            rule("bookinfo", "exact", "reviews", "[frontend]", "RANDOM"),
            rule(
                "bookinfo",
                "wide",
                "*.bookinfo.svc.cluster.local",
                "['*']",
                "ROUND_ROBIN",
            ),
        ]);
        assert_eq!(policy(&s, None, Some("frontend")).lb, Lb::Random);
        assert_eq!(policy(&s, None, Some("other")).lb, Lb::LeastRequest);
    }

    #[test]
    fn workload_selector_rules_are_ignored() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            &format!(
                "{{host: reviews, workloadSelector: {{matchLabels: {{app: productpage}}}}, \
                 trafficPolicy: {}}}",
                lb("RANDOM")
            ),
        )]);
        assert_eq!(policy(&s, None, Some("bookinfo")), ClusterPolicy::default());
    }

    #[test]
    fn subset_policy_overrides_the_top_level_field_by_field() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            "{host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}, \
             connectionPool: {tcp: {maxConnections: 10}}, \
             outlierDetection: {consecutive5xxErrors: 3}}, subsets: [\
             {name: v1, labels: {version: v1}}, \
             {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}, \
             {name: v3, labels: {version: v3}, trafficPolicy: {connectionPool: {http: {maxRetries: 2}}}}]}",
        )]);
        let v1 = policy(&s, Some("v1"), Some("bookinfo"));
        assert_eq!(v1.lb, Lb::Random);
        assert_eq!(v1.limits.max_connections, 10);

        let v2 = policy(&s, Some("v2"), Some("bookinfo"));
        assert_eq!(v2.lb, Lb::RoundRobin);
        assert_eq!(v2.limits.max_connections, 10);
        assert_eq!(v2.outlier.as_ref().unwrap().consecutive_5xx, Some(3));

        // A connection pool replaces the inherited one as a whole.
        let v3 = policy(&s, Some("v3"), Some("bookinfo"));
        assert_eq!(v3.lb, Lb::Random);
        assert_eq!(v3.limits.max_connections, u32::MAX);
        assert_eq!(v3.limits.max_retries, 2);
        assert!(v3.outlier.is_some());
    }

    #[test]
    fn port_level_settings_replace_the_policy_of_their_port() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            "{host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}, \
             connectionPool: {tcp: {maxConnections: 10}}, portLevelSettings: [\
             {port: {number: 9080}, loadBalancer: {simple: ROUND_ROBIN}}]}, subsets: [\
             {name: v1, labels: {version: v1}, trafficPolicy: {outlierDetection: {}, \
             portLevelSettings: [{port: {number: 9080}, connectionPool: {tcp: {maxConnections: 5}}}]}}]}",
        )]);
        let here = policy(&s, None, Some("bookinfo"));
        assert_eq!(here.lb, Lb::RoundRobin);
        assert_eq!(here.limits.max_connections, u32::MAX, "not inherited");

        let elsewhere = policy_for(&s, &key(9081, None), Some("bookinfo"));
        assert_eq!(elsewhere.lb, Lb::Random);
        assert_eq!(elsewhere.limits.max_connections, 10);

        let v1 = policy(&s, Some("v1"), Some("bookinfo"));
        assert_eq!(v1.lb, Lb::LeastRequest);
        assert_eq!(v1.limits.max_connections, 5);
        assert_eq!(v1.outlier, None);
        let v1_elsewhere = policy_for(&s, &key(9081, Some("v1")), Some("bookinfo"));
        assert_eq!(v1_elsewhere.lb, Lb::Random);
        assert_eq!(v1_elsewhere.outlier, Some(Outlier::default()));
    }

    #[test]
    fn connection_pool_settings_map_to_limits_and_timeouts() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            "{host: reviews, trafficPolicy: {connectionPool: {\
             tcp: {maxConnections: 100, connectTimeout: 30ms, idleTimeout: 5m, maxConnectionDuration: 1h}, \
             http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 7, \
             maxRetries: 3, idleTimeout: 1m, h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 50}}}}",
        )]);
        let p = policy(&s, None, Some("bookinfo"));
        assert_eq!(
            p.limits,
            Limits {
                max_connections: 100,
                max_pending: 10,
                max_requests: 1000,
                max_retries: 3
            }
        );
        assert_eq!(p.connect_timeout, Some(Duration::from_millis(30)));
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(p.max_connection_duration, Some(Duration::from_secs(3600)));
        assert_eq!(p.max_requests_per_connection, Some(7));
        assert_eq!(p.max_concurrent_streams, Some(50));
        assert!(p.h2_upgrade);

        // Zero means unset; the TCP idle timeout applies when HTTP sets none.
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            "{host: reviews, trafficPolicy: {connectionPool: {\
             tcp: {maxConnections: 0, idleTimeout: 5m}, \
             http: {http2MaxRequests: 0, maxRetries: 0, maxRequestsPerConnection: 0, h2UpgradePolicy: DEFAULT}}}}",
        )]);
        let p = policy(&s, None, Some("bookinfo"));
        assert_eq!(p.limits, Limits::UNLIMITED);
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(p.max_requests_per_connection, None);
        assert!(!p.h2_upgrade);
        assert_eq!(ClusterPolicy::default().limits, Limits::UNLIMITED);
        assert_eq!(ClusterPolicy::default().lb, Lb::LeastRequest);
    }

    #[test]
    fn outlier_defaults_follow_envoy() {
        let d = Outlier::default();
        assert_eq!(d.consecutive_5xx, Some(5));
        assert_eq!(d.consecutive_gateway, None);
        assert_eq!(d.consecutive_local_origin, None);
        assert_eq!(d.interval, Duration::from_secs(10));
        assert_eq!(d.base_ejection_time, Duration::from_secs(30));
        assert_eq!(d.max_ejection_time, Duration::from_secs(300));
        assert_eq!(d.max_ejection_percent, 10);
        assert_eq!(d.min_health_percent, 0);

        let o = Outlier::from(&OutlierDetection {
            consecutive_5xx_errors: Some(0),
            consecutive_gateway_errors: Some(3),
            split_external_local_origin_errors: true,
            base_ejection_time: Some(Duration::from_secs(900)),
            max_ejection_percent: Some(0),
            ..Default::default()
        });
        assert_eq!(o.consecutive_5xx, None);
        assert_eq!(o.consecutive_gateway, Some(3));
        assert_eq!(o.consecutive_local_origin, Some(5));
        assert_eq!(o.max_ejection_time, Duration::from_secs(900));
        assert_eq!(o.max_ejection_percent, 10);
    }

    #[test]
    fn subsets_select_ready_endpoints_by_pod_labels() {
        let rule = dr(
            "bookinfo",
            "r",
            "{host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: any}]}",
        );
        let mut s = snapshot(&[rule]);
        // Not ready, a duplicate, and an address without a pod.
        let mut extra = Arc::unwrap_or_clone(s.endpoints[&reviews()].clone());
        let list = extra.by_port.get_mut(&PORT).unwrap();
        let mut not_ready = list[0].clone();
        not_ready.ip = [10, 0, 0, 9].into();
        not_ready.pod = None;
        not_ready.ready = false;
        let duplicate = list[1].clone();
        let mut podless = list[0].clone();
        podless.ip = [10, 0, 0, 8].into();
        podless.pod = None;
        list.extend([not_ready, duplicate, podless]);
        s.endpoints.insert(reviews(), Arc::new(extra));

        let all = build(&s, None);
        assert_eq!(
            all.addresses().collect::<Vec<_>>(),
            [addr(1), addr(2), addr(3), addr(4), addr(8)]
        );
        let v1 = build(&s, Some("v1"));
        assert_eq!(v1.addresses().collect::<Vec<_>>(), [addr(1), addr(2)]);
        assert_eq!(v1.len(), 2);
        let pick = v1.pick(None, None, Instant::now()).unwrap();
        assert_eq!(&*pick.pod.as_ref().unwrap().labels["version"], "v1");
        assert_eq!(pick.node.as_deref(), Some("n1"), "from the pod");
        assert_eq!(build(&s, Some("any")).len(), 5);

        let err = Cluster::build(
            &s,
            key(PORT, Some("v9")),
            policy(&s, Some("v9"), Some("bookinfo")),
            Arc::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ClusterError::UnknownSubset { .. }));
        let message = err.to_string();
        assert!(
            message.contains("\"v9\"") && message.contains("DestinationRule bookinfo/r"),
            "{message}"
        );

        let bare = snapshot(&[]);
        let err = Cluster::build(
            &bare,
            key(PORT, Some("v1")),
            policy(&bare, Some("v1"), Some("bookinfo")),
            Arc::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("exportTo"), "{err}");
    }

    #[test]
    fn round_robin_is_even_and_continues_across_snapshots() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            &format!("{{host: reviews, trafficPolicy: {}}}", lb("ROUND_ROBIN")),
        )]);
        let cluster = build(&s, None);
        let now = Instant::now();
        let mut counts = HashMap::new();
        let mut last = None;
        for _ in 0..400 {
            let pick = cluster.pick(None, None, now).unwrap();
            assert_ne!(Some(pick.addr), last, "rotates");
            last = Some(pick.addr);
            *counts.entry(pick.addr).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(counts.values().all(|c| *c == 100), "{counts:?}");

        let order: Vec<_> = (0..4)
            .map(|_| cluster.pick(None, None, now).unwrap().addr)
            .collect();
        let rebuilt = Cluster::build(
            &s,
            cluster.key().clone(),
            cluster.policy().clone(),
            cluster.state().clone(),
        )
        .unwrap();
        assert_eq!(rebuilt.pick(None, None, now).unwrap().addr, order[0]);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            "{host: reviews, subsets: [{name: v1, labels: {version: v1}}]}",
        )]);
        let cluster = build(&s, Some("v1"));
        assert_eq!(cluster.policy().lb, Lb::LeastRequest);
        let now = Instant::now();
        let busy = cluster.pick(None, None, now).unwrap();
        assert_eq!(busy.health.active_requests(), 1);
        for _ in 0..50 {
            let pick = cluster.pick(None, None, now).unwrap();
            assert_ne!(pick.addr, busy.addr);
        }
        let health = busy.health.clone();
        drop(busy);
        assert_eq!(health.active_requests(), 0);
    }

    #[test]
    fn random_covers_every_endpoint() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            &format!("{{host: reviews, trafficPolicy: {}}}", lb("RANDOM")),
        )]);
        let cluster = build(&s, None);
        let now = Instant::now();
        let mut counts = HashMap::new();
        for _ in 0..400 {
            *counts
                .entry(cluster.pick(None, None, now).unwrap().addr)
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(counts.values().all(|c| *c >= 40), "{counts:?}");
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_only_the_keys_of_a_removed_endpoint() {
        let rule = dr(
            "bookinfo",
            "r",
            "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}}",
        );
        let pods: Vec<(&str, u8)> = (1..=10).map(|i| ("v1", i)).collect();
        let before = build(&snapshot_with(&pods, std::slice::from_ref(&rule)), None);
        let after = build(&snapshot_with(&pods[1..], &[rule]), None);
        let now = Instant::now();
        let keys: Vec<u64> = (0..2000u32).map(|i| hash_bytes(&i.to_be_bytes())).collect();
        let place = |cluster: &Cluster, key: u64| cluster.pick(Some(key), None, now).unwrap().addr;
        let mut on_removed = 0;
        for &key in &keys {
            let first = place(&before, key);
            assert_eq!(place(&before, key), first, "stable");
            if first == addr(1) {
                on_removed += 1;
                assert_ne!(place(&after, key), addr(1));
            } else {
                assert_eq!(
                    place(&after, key),
                    first,
                    "only the removed endpoint's keys move"
                );
            }
        }
        assert!(
            (100..=300).contains(&on_removed),
            "{on_removed} of 2000 keys"
        );
        assert!(before.pick(None, None, now).is_some(), "no key: random");
    }

    #[test]
    fn request_hash_reads_header_cookie_query_and_source() {
        let cluster = |hash: &str| {
            let spec = format!(
                "{{host: reviews, trafficPolicy: {{loadBalancer: {{consistentHash: {hash}}}}}}}"
            );
            build(&snapshot(&[dr("bookinfo", "r", &spec)]), None)
        };
        let source: Ipv4Addr = [10, 1, 0, 1].into();
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (k, v) in pairs {
                map.append(*k, http::HeaderValue::from_static(v));
            }
            map
        };
        let none = headers(&[]);

        let by_header = cluster("{httpHeaderName: X-User}");
        let a = by_header.request_hash(&headers(&[("x-user", "alice")]), &uri("/"), source);
        let b = by_header.request_hash(&headers(&[("x-user", "bob")]), &uri("/"), source);
        assert!(a.is_some() && a != b);
        assert_eq!(
            by_header.request_hash(
                &headers(&[("x-user", "alice")]),
                &uri("/x"),
                [1, 2, 3, 4].into()
            ),
            a
        );
        assert_eq!(by_header.request_hash(&none, &uri("/"), source), None);

        let by_cookie = cluster("{httpCookie: {name: session, ttl: 0s}}");
        let c = by_cookie.request_hash(
            &headers(&[("cookie", "a=1"), ("cookie", "b=2; session=alice; c=3")]),
            &uri("/"),
            source,
        );
        assert_eq!(c, a, "the value is hashed, wherever it came from");
        assert_eq!(
            by_cookie.request_hash(&headers(&[("cookie", "sessionx=1")]), &uri("/"), source),
            None
        );

        let by_query = cluster("{httpQueryParameterName: user}");
        assert_eq!(
            by_query.request_hash(&none, &uri("/p?x=1&user=alice"), source),
            a
        );
        assert_eq!(
            by_query.request_hash(&none, &uri("/p?users=alice"), source),
            None
        );
        assert_eq!(by_query.request_hash(&none, &uri("/p"), source), None);

        let by_source = cluster("{useSourceIp: true}");
        let s1 = by_source.request_hash(&none, &uri("/"), source);
        assert!(s1.is_some());
        assert_ne!(
            by_source.request_hash(&none, &uri("/"), [10, 1, 0, 2].into()),
            s1
        );

        let plain = build(&snapshot(&[]), None);
        assert_eq!(
            plain.request_hash(&headers(&[("x-user", "a")]), &uri("/"), source),
            None
        );
    }

    fn outlier_cluster(outlier: &str, subset: Option<&str>) -> Cluster {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            &format!(
                "{{host: reviews, trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}, \
                 outlierDetection: {outlier}}}, subsets: [{{name: v1, labels: {{version: v1}}}}]}}"
            ),
        )]);
        build(&s, subset)
    }

    fn picked(cluster: &Cluster, now: Instant) -> HashSet<SocketAddrV4> {
        (0..20)
            .filter_map(|_| cluster.pick(None, None, now).map(|p| p.addr))
            .collect()
    }

    #[test]
    fn consecutive_5xx_eject_then_readmit_with_backoff() {
        let cluster = outlier_cluster(
            "{consecutive5xxErrors: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}",
            Some("v1"),
        );
        let t0 = Instant::now();
        let target = one_each(&cluster, t0).remove(0);
        let fail = |at| cluster.report(&target, Outcome::Status(503), at);

        // A success in between starts the count again.
        assert!(!fail(t0));
        assert!(!fail(t0));
        assert!(!cluster.report(&target, Outcome::Status(404), t0));
        assert!(!fail(t0));
        assert!(!fail(t0));
        assert!(fail(t0), "third consecutive 5xx ejects");
        assert!(target.health.is_ejected(t0));
        assert_eq!(
            target.health.ejected_until(t0),
            Some(t0 + Duration::from_secs(30))
        );
        assert!(!picked(&cluster, t0 + Duration::from_secs(29)).contains(&target.addr));
        assert!(!fail(t0 + Duration::from_secs(1)), "ignored while ejected");

        let back = t0 + Duration::from_secs(30);
        assert!(!target.health.is_ejected(back));
        assert!(picked(&cluster, back).contains(&target.addr), "readmitted");

        // Ejected again soon after: twice the base time.
        let t1 = back + Duration::from_secs(1);
        assert!(!fail(t1));
        assert!(!fail(t1));
        assert!(fail(t1));
        assert!(!picked(&cluster, t1 + Duration::from_secs(59)).contains(&target.addr));
        assert!(picked(&cluster, t1 + Duration::from_secs(60)).contains(&target.addr));

        // Healthy for two intervals (10s each): the multiplier drops from 2 to 0, then 1.
        let t2 = t1 + Duration::from_secs(80);
        for _ in 0..3 {
            cluster.report(&target, Outcome::Status(500), t2);
        }
        assert_eq!(
            target.health.ejected_until(t2),
            Some(t2 + Duration::from_secs(30))
        );
    }

    #[test]
    fn gateway_errors_and_local_failures() {
        let cluster = outlier_cluster(
            "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, maxEjectionPercent: 100}",
            None,
        );
        let now = Instant::now();
        let target = one_each(&cluster, now).remove(0);
        assert!(!cluster.report(&target, Outcome::Status(502), now));
        assert!(
            !cluster.report(&target, Outcome::Status(500), now),
            "resets"
        );
        assert!(!cluster.report(&target, Outcome::Timeout, now));
        assert!(
            cluster.report(&target, Outcome::ConnectFailure, now),
            "local failures count"
        );

        // Split: local failures have their own counter, and HTTP errors do not feed it.
        let cluster = outlier_cluster(
            "{consecutive5xxErrors: 3, splitExternalLocalOriginErrors: true, \
             consecutiveLocalOriginFailures: 2, maxEjectionPercent: 100}",
            None,
        );
        let target = one_each(&cluster, now).remove(0);
        assert!(!cluster.report(&target, Outcome::Reset, now));
        assert!(
            !cluster.report(&target, Outcome::Status(503), now),
            "resets"
        );
        assert!(!cluster.report(&target, Outcome::Reset, now));
        assert!(!cluster.report(&target, Outcome::Status(503), now));
        assert!(
            cluster.report(&target, Outcome::Status(503), now),
            "5xx count on their own"
        );
        let other = one_each(&cluster, now).remove(1);
        assert!(!cluster.report(&other, Outcome::Timeout, now));
        assert!(cluster.report(&other, Outcome::ConnectFailure, now));

        // Without outlier detection nothing is counted.
        let plain = build(&snapshot(&[]), None);
        let pick = plain.pick(None, None, now).unwrap();
        assert!((0..10).all(|_| !plain.report(&pick, Outcome::Status(503), now)));
    }

    #[test]
    fn max_ejection_percent_allows_at_least_one() {
        let now = Instant::now();
        let cluster = outlier_cluster("{consecutive5xxErrors: 1, maxEjectionPercent: 50}", None);
        let picks = one_each(&cluster, now);
        assert!(cluster.report(&picks[0], Outcome::Status(503), now));
        assert!(cluster.report(&picks[1], Outcome::Status(503), now));
        assert!(
            !cluster.report(&picks[2], Outcome::Status(503), now),
            "75% > 50%"
        );
        assert_eq!(picked(&cluster, now), HashSet::from([addr(3), addr(4)]));

        // Default 10% of 4 endpoints: one may always go, no more.
        let cluster = outlier_cluster("{consecutive5xxErrors: 1}", None);
        let picks = one_each(&cluster, now);
        assert!(cluster.report(&picks[0], Outcome::Status(503), now));
        assert!(!cluster.report(&picks[1], Outcome::Status(503), now));

        // The last endpoint of a cluster may go too: nothing is left to pick (UH).
        let cluster = outlier_cluster(
            "{consecutive5xxErrors: 1, maxEjectionPercent: 100}",
            Some("v1"),
        );
        let picks = one_each(&cluster, now);
        for pick in &picks {
            assert!(cluster.report(pick, Outcome::Status(503), now));
        }
        assert!(cluster.pick(None, None, now).is_none());
    }

    #[test]
    fn below_min_health_percent_ejections_are_ignored() {
        let now = Instant::now();
        let cluster = outlier_cluster(
            "{consecutive5xxErrors: 1, maxEjectionPercent: 100, minHealthPercent: 60}",
            Some("v1"),
        );
        let picks = one_each(&cluster, now);
        assert!(cluster.report(&picks[0], Outcome::Status(503), now));
        assert_eq!(picked(&cluster, now).len(), 2, "50% healthy < 60%: panic");

        let cluster = outlier_cluster(
            "{consecutive5xxErrors: 1, maxEjectionPercent: 100}",
            Some("v1"),
        );
        let picks = one_each(&cluster, now);
        assert!(cluster.report(&picks[0], Outcome::Status(503), now));
        assert_eq!(picked(&cluster, now), HashSet::from([picks[1].addr]));
    }

    #[test]
    fn a_retry_avoids_the_previous_endpoint_when_it_can() {
        let s = snapshot(&[dr(
            "bookinfo",
            "r",
            &format!(
                "{{host: reviews, trafficPolicy: {}, subsets: [{{name: v1, labels: {{version: v1}}}}, \
                 {{name: v2, labels: {{version: v2}}}}]}}",
                lb("RANDOM")
            ),
        )]);
        let now = Instant::now();
        let v1 = build(&s, Some("v1"));
        for _ in 0..50 {
            assert_eq!(v1.pick(None, Some(addr(1)), now).unwrap().addr, addr(2));
        }
        let v2 = build(&s, Some("v2"));
        assert_eq!(v2.pick(None, Some(addr(3)), now).unwrap().addr, addr(3));
        let empty = Cluster::build(
            &s,
            ClusterKey::new(reviews(), 9999, None),
            ClusterPolicy::default(),
            Arc::default(),
        )
        .unwrap();
        assert!(empty.is_empty());
        assert!(empty.pick(None, None, now).is_none());
    }

    #[test]
    fn circuit_breakers_overflow_and_release_on_drop() {
        fn send_and_static<T: Send + Sync + 'static>(_: &T) {}
        let state = ClusterState::new();
        let limits = Limits {
            max_connections: 1,
            max_pending: 1,
            max_requests: 2,
            max_retries: 0,
        };
        let first = state.try_request(&limits).unwrap();
        send_and_static(&first);
        let second = state.try_request(&limits).unwrap();
        assert!(state.try_request(&limits).is_none(), "overflow");
        assert_eq!(state.requests(), 2);
        drop(first);
        assert_eq!(state.requests(), 1);
        let third = state.try_request(&limits).unwrap();
        assert_eq!(third.budget(), Budget::Request);

        let connection = state.try_connection(&limits).unwrap();
        assert!(state.try_connection(&limits).is_none());
        let pending = state.try_pending(&limits).unwrap();
        assert!(state.try_pending(&limits).is_none());
        assert!(state.try_retry(&limits).is_none());
        assert_eq!((state.connections(), state.pending()), (1, 1));
        drop((second, third, connection, pending));
        assert_eq!(
            (
                state.connections(),
                state.pending(),
                state.requests(),
                state.retries()
            ),
            (0, 0, 0, 0)
        );
        assert!(state.try_retry(&Limits::UNLIMITED).is_some());
    }

    #[test]
    fn the_registry_keeps_state_across_snapshots() {
        let clusters = Clusters::default();
        let v1 = key(PORT, Some("v1"));
        let state = clusters.state(&v1);
        assert!(Arc::ptr_eq(&state, &clusters.state(&v1)));
        assert!(!Arc::ptr_eq(&state, &clusters.state(&key(PORT, None))));
        assert_eq!(clusters.len(), 2);

        let rule = dr(
            "bookinfo",
            "r",
            "{host: reviews, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, \
             outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 50}}, \
             subsets: [{name: v1, labels: {version: v1}}]}",
        );
        let s = snapshot(std::slice::from_ref(&rule));
        let build = |s: &Snapshot| {
            Cluster::build(
                s,
                v1.clone(),
                policy(s, Some("v1"), None),
                clusters.state(&v1),
            )
            .unwrap()
        };
        let now = Instant::now();
        let first = build(&s);
        let pick = one_each(&first, now).remove(0);
        assert!(first.report(&pick, Outcome::Status(503), now));
        let ejected = pick.addr;
        drop((pick, first));

        // A new snapshot, the same endpoints: still ejected.
        let second = build(&snapshot(&[rule]));
        assert!(!picked(&second, now).contains(&ejected));
        assert_eq!(picked(&second, now).len(), 1);
    }

    #[test]
    fn cluster_keys_print_as_envoy_cluster_names() {
        assert_eq!(
            key(9080, Some("v1")).to_string(),
            "outbound|9080|v1|reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(
            key(80, None).to_string(),
            "outbound|80||reviews.bookinfo.svc.cluster.local"
        );
    }
}
