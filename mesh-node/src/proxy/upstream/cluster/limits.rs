//! Circuit-breaker budgets (connections, pending requests, requests, retries) and the
//! proxy-wide registry of cluster state that survives configuration changes.

use super::*;

/// Circuit-breaker limits (Envoy's thresholds of the default priority).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

impl Limits {
    /// What Istio configures when the DestinationRule sets nothing.
    pub const UNLIMITED: Limits = Limits {
        max_connections: u32::MAX,
        max_pending: u32::MAX,
        max_requests: u32::MAX,
        max_retries: u32::MAX,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::UNLIMITED
    }
}

/// The circuit-breaker budgets of [`ClusterState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Connection,
    Pending,
    Request,
    Retry,
}

#[derive(Debug, Default)]
pub(super) struct Budgets(pub(super) [AtomicU32; 4]);

impl Budgets {
    pub(super) fn counter(&self, budget: Budget) -> &AtomicU32 {
        &self.0[budget as usize]
    }
}

/// One unit of a circuit-breaker budget, released when dropped.
#[derive(Debug)]
#[must_use = "the budget is released as soon as the guard is dropped"]
pub struct Guard {
    pub(super) budgets: Arc<Budgets>,
    pub(super) budget: Budget,
}

impl Guard {
    pub fn budget(&self) -> Budget {
        self.budget
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.budgets
            .counter(self.budget)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a cluster keeps across snapshots: circuit-breaker counters (Envoy's connection, pending,
/// request and retry budgets), the round-robin position and endpoint health.
#[derive(Debug)]
pub struct ClusterState {
    pub(super) budgets: Arc<Budgets>,
    pub(super) next: AtomicUsize,
    /// Origin of the nanosecond timestamps kept in atomics.
    pub(super) epoch: Instant,
    /// When the last ejection in force ends (nanoseconds since `epoch`).
    pub(super) ejections_end: AtomicU64,
    pub(super) health: Mutex<HashMap<SocketAddrV4, Arc<EndpointHealth>>>,
    /// Serializes ejections, so the ejected share is counted right.
    pub(super) ejecting: Mutex<()>,
}

impl Default for ClusterState {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterState {
    pub fn new() -> Self {
        Self {
            budgets: Arc::default(),
            // Clusters built for the same service at once do not all start on one endpoint.
            next: AtomicUsize::new(random() as usize),
            epoch: Instant::now(),
            ejections_end: AtomicU64::new(0),
            health: Mutex::default(),
            ejecting: Mutex::default(),
        }
    }

    /// A request slot; `None` when `max_requests` are in flight (Envoy's `UO`).
    pub fn try_request(&self, limits: &Limits) -> Option<Guard> {
        self.acquire(Budget::Request, limits.max_requests)
    }

    /// A place in the queue for a connection; `None` when `max_pending` requests wait.
    pub fn try_pending(&self, limits: &Limits) -> Option<Guard> {
        self.acquire(Budget::Pending, limits.max_pending)
    }

    /// A connection slot; `None` when `max_connections` are open.
    pub fn try_connection(&self, limits: &Limits) -> Option<Guard> {
        self.acquire(Budget::Connection, limits.max_connections)
    }

    /// A retry slot; `None` when `max_retries` retries are in flight.
    pub fn try_retry(&self, limits: &Limits) -> Option<Guard> {
        self.acquire(Budget::Retry, limits.max_retries)
    }

    pub fn connections(&self) -> u32 {
        self.in_use(Budget::Connection)
    }

    pub fn pending(&self) -> u32 {
        self.in_use(Budget::Pending)
    }

    pub fn requests(&self) -> u32 {
        self.in_use(Budget::Request)
    }

    pub fn retries(&self) -> u32 {
        self.in_use(Budget::Retry)
    }

    pub(super) fn in_use(&self, budget: Budget) -> u32 {
        self.budgets.counter(budget).load(Ordering::Acquire)
    }

    pub(super) fn acquire(&self, budget: Budget, limit: u32) -> Option<Guard> {
        self.budgets
            .counter(budget)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Guard {
            budgets: self.budgets.clone(),
            budget,
        })
    }

    pub(super) fn offset(&self, now: Instant) -> u64 {
        offset(self.epoch, now)
    }

    pub(super) fn health(&self) -> MutexGuard<'_, HashMap<SocketAddrV4, Arc<EndpointHealth>>> {
        lock(&self.health)
    }
}

/// The proxy's [`ClusterState`]s by key, so health and counters survive configuration changes.
/// Looked up when a cluster is built, never per request.
#[derive(Debug)]
pub struct Clusters {
    pub(super) registry: Mutex<Registry>,
    /// Where DestinationRule `tls` files may be read from.
    pub(super) tls_files: std::path::PathBuf,
}

impl Default for Clusters {
    fn default() -> Self {
        Self::new(crate::config::DEFAULT_TLS_ORIGINATION_DIR.into())
    }
}

#[derive(Debug, Default)]
pub(super) struct Registry {
    pub(super) states: HashMap<ClusterKey, Entry>,
    pub(super) swept: Option<Instant>,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) state: Arc<ClusterState>,
    pub(super) used: Instant,
}

impl Clusters {
    /// A registry whose clusters read DestinationRule `tls` files from `tls_files` only.
    pub fn new(tls_files: std::path::PathBuf) -> Self {
        Self {
            registry: Mutex::default(),
            tls_files,
        }
    }

    /// Where DestinationRule `tls` files may be read from.
    pub fn tls_files(&self) -> &std::path::Path {
        &self.tls_files
    }

    /// The state of `key` the proxy keeps, if any, else a new one registered nowhere: for a
    /// cluster built only to be looked at (`meshctl`), which must neither register state nor
    /// keep the registry's alive.
    pub fn peek(&self, key: &ClusterKey) -> Arc<ClusterState> {
        lock(&self.registry)
            .states
            .get(key)
            .map_or_else(|| Arc::new(ClusterState::new()), |e| e.state.clone())
    }

    pub fn state(&self, key: &ClusterKey) -> Arc<ClusterState> {
        let now = Instant::now();
        let mut registry = lock(&self.registry);
        if registry
            .swept
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL)
        {
            registry.swept = Some(now);
            registry.states.retain(|_, e| {
                Arc::strong_count(&e.state) > 1
                    || now.saturating_duration_since(e.used) < IDLE_STATE
            });
        }
        if let Some(entry) = registry.states.get_mut(key) {
            entry.used = now;
            return entry.state.clone();
        }
        let state = Arc::new(ClusterState::new());
        registry.states.insert(
            key.clone(),
            Entry {
                state: state.clone(),
                used: now,
            },
        );
        state
    }

    pub fn len(&self) -> usize {
        lock(&self.registry).states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
