//! A cluster's DestinationRule, resolved: which rules apply to a host for a client namespace,
//! merged Istio's way, and the load balancer, limits, outlier detection and subset they set.

use super::*;

/// How a cluster balances requests over its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Lb {
    RoundRobin,
    /// Power of two random choices by requests in flight (Istio's default).
    #[default]
    LeastRequest,
    Random,
    /// Consistent hashing on the key [`Cluster::request_hash`] extracts.
    Hash(HashKey),
}

/// Which endpoints of the service a cluster keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SubsetMatch {
    /// No subset asked for: every endpoint.
    #[default]
    All,
    /// Endpoints whose pod carries all these labels.
    Labels(Arc<Labels>),
    /// The key names a subset that the applicable rule (if any) does not define.
    Undefined,
}

/// The DestinationRule policy of one cluster, as one client namespace sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterPolicy {
    pub lb: Lb,
    pub limits: Limits,
    pub outlier: Option<Outlier>,
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout`, else `tcp.idleTimeout`.
    pub idle_timeout: Option<Duration>,
    /// `tcp.idleTimeout`: TCP connections through the cluster (0: none).
    pub tcp_idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    pub max_concurrent_streams: Option<u32>,
    /// `http.h2UpgradePolicy: UPGRADE`.
    pub h2_upgrade: bool,
    /// `http.useClientProtocol`.
    pub use_client_protocol: bool,
    /// The endpoints the subset of the key selects, resolved with the policy so that
    /// [`Cluster::build`] need not look the rule up again.
    pub subset: SubsetMatch,
    /// The rule the policy comes from (the first by name when several are merged).
    pub rule: Option<ObjectKey>,
    /// TLS the source proxy originates to the endpoints (`SIMPLE`, `MUTUAL`).
    pub tls: Option<ClientTls>,
    /// The namespace of the clients the policy is for (`credentialName` Secrets are theirs).
    pub client_namespace: Option<Arc<str>>,
}

/// Why a cluster cannot be built. The configuration has to change before a retry can help; the
/// caller answers 503.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ClusterError {
    #[error("subset {subset:?} of service {service} is not defined: {}", subset_hint(.rule))]
    UnknownSubset {
        service: ObjectKey,
        subset: Arc<str>,
        /// The rule that applies to the client, if any.
        rule: Option<ObjectKey>,
    },
    #[error("DestinationRule {} asks port {port} of {service} for TLS that cannot be set up: {reason}", .rule.as_ref().map_or_else(|| "(none)".to_string(), ToString::to_string))]
    Tls {
        service: ObjectKey,
        port: u16,
        rule: Option<ObjectKey>,
        reason: Box<OriginationError>,
    },
}

pub(super) fn subset_hint(rule: &Option<ObjectKey>) -> String {
    match rule {
        Some(rule) => format!(
            "DestinationRule {rule} has no subset of that name; check the subset names of the rule and of the route"
        ),
        None => "no DestinationRule for the service is visible from the client's namespace; check the rule's host and exportTo".into(),
    }
}

/// The DestinationRule policy for `key` as a client in `client_namespace` sees it (`None`: a
/// client outside any namespace, which sees only rules exported to every namespace). See the
/// module docs for the lookup order. Costs O(destination rules): call it when a cluster is
/// built for a snapshot, not per request.
pub fn policy_for(
    snapshot: &Snapshot,
    key: &ClusterKey,
    client_namespace: Option<&str>,
) -> ClusterPolicy {
    let rules = applicable_rules(snapshot, &key.service, client_namespace);
    let mut effective = Effective::default();
    if let Some(top) = rules.iter().find_map(|r| r.traffic_policy.as_ref()) {
        effective.apply(top, key.port);
    }
    let subset = match &key.subset {
        None => SubsetMatch::All,
        Some(name) => match rules.iter().find_map(|r| r.subset(name)) {
            Some(subset) => {
                if let Some(policy) = &subset.traffic_policy {
                    effective.apply(policy, key.port);
                }
                SubsetMatch::Labels(Arc::new(subset.labels.clone()))
            }
            None => SubsetMatch::Undefined,
        },
    };
    ClusterPolicy {
        subset,
        rule: rules.first().map(|r| r.key.clone()),
        client_namespace: client_namespace.map(Arc::from),
        ..effective.policy()
    }
}

/// The subsets the DestinationRules that apply to `service` for clients of `client` define,
/// each once, in the order they are found.
pub fn subsets_for(
    snapshot: &Snapshot,
    service: &ObjectKey,
    client: Option<&str>,
) -> Vec<Arc<str>> {
    let mut seen = HashSet::new();
    applicable_rules(snapshot, service, client)
        .into_iter()
        .flat_map(|rule| rule.subsets.iter())
        .filter(|subset| seen.insert(subset.name.clone()))
        .map(|subset| subset.name.clone())
        .collect()
}

/// The rules that apply, merged Istio's way: same namespace, same host, ordered by name.
pub(super) fn applicable_rules<'a>(
    snapshot: &'a Snapshot,
    service: &ObjectKey,
    client: Option<&str>,
) -> Vec<&'a DestinationRule> {
    // A ServiceEntry host is its own name.
    let entry = snapshot
        .services
        .get(service)
        .is_some_and(|s| s.entry.is_some());
    let fqdn = match entry {
        true => service.name.to_string(),
        false => format!("{}.{}.{SERVICE_DOMAIN}", service.name, service.namespace),
    };
    let target = Target {
        service,
        fqdn: &fqdn,
        entry,
    };
    let select = |namespace: &str,
                  eligible: &dyn Fn(&DestinationRule) -> bool,
                  visible: &dyn Fn(&DestinationRule) -> bool| {
        let candidates = || {
            snapshot
                .destination_rules
                .values()
                .map(|r| &**r)
                .filter(|r| {
                    r.workload_selector.is_none() && *r.key.namespace == *namespace && eligible(r)
                })
        };
        let Some(best) = candidates().filter_map(|r| r.host_match(&target)).max() else {
            return Vec::new();
        };
        let mut chosen: Vec<&DestinationRule> = candidates()
            .filter(|r| r.host_match(&target) == Some(best) && visible(r))
            .collect();
        chosen.sort_by(|a, b| a.key.name.cmp(&b.key.name));
        chosen
    };

    if let Some(client) = client {
        let local = if client == ROOT_NAMESPACE {
            select(client, &|r| r.private_only(), &|_| true)
        } else {
            select(client, &|r| r.visible_in_own_namespace(), &|_| true)
        };
        if !local.is_empty() {
            return local;
        }
    }
    let exported = |r: &DestinationRule| !r.private_only();
    let visible = |r: &DestinationRule| r.exported_to(client);
    let found = select(&service.namespace, &exported, &visible);
    if !found.is_empty() {
        return found;
    }
    select(ROOT_NAMESPACE, &exported, &visible)
}

/// The service a rule's host is matched against.
pub(super) struct Target<'a> {
    pub(super) service: &'a ObjectKey,
    pub(super) fqdn: &'a str,
    /// A ServiceEntry host: a rule names it by the very host.
    pub(super) entry: bool,
}

/// How well a rule's host matches a service: any exact match beats any wildcard, a longer
/// wildcard beats a shorter one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Specificity {
    Wildcard(usize),
    Exact,
}

/// Helpers on the model's DestinationRule that only cluster selection needs.
pub(super) trait RuleExt {
    fn host_match(&self, target: &Target<'_>) -> Option<Specificity>;
    /// In the index of the rule's own namespace (Istio's `namespaceLocal`).
    fn visible_in_own_namespace(&self) -> bool;
    /// Exported to its own namespace only.
    fn private_only(&self) -> bool;
    fn exported_to(&self, client: Option<&str>) -> bool;
}

impl RuleExt for DestinationRule {
    fn host_match(&self, target: &Target<'_>) -> Option<Specificity> {
        let host = &*self.host;
        if let Some(suffix) = host.strip_prefix('*') {
            // `*.example.com` covers every name under `example.com`, at any depth; `*` all.
            return target
                .fqdn
                .ends_with(suffix)
                .then_some(Specificity::Wildcard(host.len()));
        }
        if target.entry {
            return (host == target.fqdn).then_some(Specificity::Exact);
        }
        let (name, namespace) = match host.split_once('.') {
            None => (host, &*self.key.namespace),
            Some((name, rest)) => {
                let namespace = rest
                    .strip_suffix(".svc.cluster.local")
                    .or_else(|| rest.strip_suffix(".svc"))
                    .unwrap_or(rest);
                if namespace.contains('.') {
                    return None;
                }
                (name, namespace)
            }
        };
        (name == &*target.service.name && namespace == &*target.service.namespace)
            .then_some(Specificity::Exact)
    }

    fn visible_in_own_namespace(&self) -> bool {
        self.export_to.is_empty()
            || self
                .export_to
                .iter()
                .any(|e| matches!(&**e, "*" | ".") || *e == self.key.namespace)
    }

    fn private_only(&self) -> bool {
        matches!(&*self.export_to, [only] if &**only == "." || *only == self.key.namespace)
    }

    fn exported_to(&self, client: Option<&str>) -> bool {
        self.export_to.is_empty()
            || self
                .export_to
                .iter()
                .any(|e| &**e == "*" || Some(&**e) == client)
    }
}

/// The policy fields in force while the levels of a rule are applied.
#[derive(Clone, Copy, Default)]
pub(super) struct Effective<'a> {
    pub(super) load_balancer: Option<&'a LoadBalancer>,
    pub(super) connection_pool: Option<&'a ConnectionPool>,
    pub(super) outlier_detection: Option<&'a OutlierDetection>,
    pub(super) tls: Option<&'a ClientTls>,
}

impl<'a> Effective<'a> {
    /// One level of Istio's `MergeTrafficPolicy`.
    pub(super) fn apply(&mut self, policy: &'a TrafficPolicy, port: u16) {
        if let Some(lb) = &policy.load_balancer {
            self.load_balancer = Some(lb);
        }
        if let Some(pool) = &policy.connection_pool {
            self.connection_pool = Some(pool);
        }
        if let Some(outlier) = &policy.outlier_detection {
            self.outlier_detection = Some(outlier);
        }
        if let Some(tls) = &policy.tls {
            self.tls = Some(tls);
        }
        if let Some(level) = policy.port_level_settings.iter().find(|p| p.port == port) {
            *self = Effective {
                load_balancer: level.load_balancer.as_ref(),
                connection_pool: level.connection_pool.as_ref(),
                outlier_detection: level.outlier_detection.as_ref(),
                tls: level.tls.as_ref(),
            };
        }
    }

    pub(super) fn policy(self) -> ClusterPolicy {
        let lb = match self.load_balancer.and_then(|lb| lb.policy.as_ref()) {
            None => Lb::LeastRequest,
            Some(LbPolicy::Simple(simple)) => match simple {
                SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest => {
                    Lb::LeastRequest
                }
                SimpleLb::Random => Lb::Random,
                SimpleLb::RoundRobin | SimpleLb::Passthrough => Lb::RoundRobin,
            },
            Some(LbPolicy::ConsistentHash(hash)) => Lb::Hash(hash.key.clone()),
        };
        let tcp = self.connection_pool.and_then(|p| p.tcp.as_ref());
        let http = self.connection_pool.and_then(|p| p.http.as_ref());
        let limit = |value: Option<u32>| positive(value).unwrap_or(u32::MAX);
        ClusterPolicy {
            lb,
            limits: Limits {
                max_connections: limit(tcp.and_then(|t| t.max_connections)),
                max_pending: limit(http.and_then(|h| h.http1_max_pending_requests)),
                max_requests: limit(http.and_then(|h| h.http2_max_requests)),
                max_retries: limit(http.and_then(|h| h.max_retries)),
            },
            outlier: self.outlier_detection.map(Outlier::from),
            connect_timeout: tcp.and_then(|t| t.connect_timeout),
            idle_timeout: http
                .and_then(|h| h.idle_timeout)
                .or_else(|| tcp.and_then(|t| t.idle_timeout)),
            tcp_idle_timeout: tcp.and_then(|t| t.idle_timeout),
            max_connection_duration: tcp.and_then(|t| t.max_connection_duration),
            max_requests_per_connection: positive(http.and_then(|h| h.max_requests_per_connection)),
            max_concurrent_streams: positive(http.and_then(|h| h.max_concurrent_streams)),
            h2_upgrade: http.and_then(|h| h.h2_upgrade_policy) == Some(H2UpgradePolicy::Upgrade),
            use_client_protocol: http.is_some_and(|h| h.use_client_protocol),
            subset: SubsetMatch::All,
            rule: None,
            client_namespace: None,
            tls: self
                .tls
                .filter(|t| matches!(t.mode, TlsMode::Simple | TlsMode::Mutual))
                .cloned(),
        }
    }
}

/// Istio treats a count of 0 as unset.
pub(super) fn positive(value: Option<u32>) -> Option<u32> {
    value.filter(|n| *n > 0)
}

/// Helpers on the model's Pod for selecting endpoints by their pods' labels.
pub trait PodExt {
    fn carries(&self, labels: &Labels) -> bool;
}

impl PodExt for Pod {
    fn carries(&self, labels: &Labels) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}
