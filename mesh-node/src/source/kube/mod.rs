//! The Kubernetes configuration source: kube-rs watchers feeding the same translation and
//! assembly as the local directory, so a cluster and a directory of YAML give the same model.
//!
//! | watch                              | scope                                             | decoded as |
//! |------------------------------------|---------------------------------------------------|------------|
//! | Namespaces, Services, EndpointSlices | cluster                                         | full object |
//! | Pods on this node                  | `spec.nodeName=<node>`, not terminated            | full object |
//! | Pods on other nodes                | `spec.nodeName!=<node>`, not terminated           | slim (`slim.rs`): name, labels, IP, node, service account, ports |
//! | Nodes                              | cluster                                           | slim: name, addresses |
//! | Secrets (not Helm releases or ServiceAccount tokens) | cluster                         | only the keys TLS material is read from; kept only if PEM |
//! | ConfigMap `istio` (MeshConfig)     | the root namespace, `metadata.name=istio`         | full object |
//! | mesh CRDs (Istio, Gateway API)     | cluster, the first served of the versions Weft reads | dynamic object |
//!
//! Every object is stripped of `managedFields`, converted to JSON and translated by
//! [`objects::translate`](super::objects::translate) the moment it arrives (outside any shared
//! state); the aggregator hands each changed object to the [`Ledger`] (which keeps the last good
//! version of rejected resources and the assembled snapshot in step) and publishes one snapshot
//! per batch ([`KubeConfig::debounce`]). Nothing is published
//! before every watch has completed its first list, so consumers never see a half-listed
//! cluster (the eBPF sync would unmesh pods it has not heard of yet).
//!
//! Watches recover on their own: kube-runtime's watcher relists after `410 Gone` and resumes
//! after the API server comes back, with exponential backoff. Each watch logs the first error
//! of a streak and the recovery, never every retry. A CRD that is not installed is logged once
//! and ignored (its group is discovered again every [`KubeConfig::crd_recheck`]); it does not
//! hold back the first snapshot.
//!
//! A rejected resource is reported like in the file source (log line, `/debug/config`,
//! `weft_config_rejected_total`) and as a Kubernetes Event on the resource, emitted by one node
//! only (`events.rs`).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    future::Future,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::ObjectReference;
use serde::Serialize;
use thiserror::Error;
use tokio::{sync::mpsc, task::JoinSet, time::Instant};
use tracing::{info, warn};

use super::{
    ledger::{Ledger, Rejection, SourceStatus},
    objects::{Invalid, Object},
};
use crate::{metrics::Rejections, model::Store};

mod crd;
mod events;
mod slim;
mod watch;

pub use crd::{CrdKind, CRD_KINDS};
pub use watch::Backoff;

/// Batching window: changes arriving within it are published as one snapshot.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes configuration: {0} (in a pod, mount the ServiceAccount token; elsewhere \
         set KUBECONFIG or use --config-dir)"
    )]
    Config(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Reads the in-cluster configuration (ServiceAccount token and `KUBERNETES_SERVICE_HOST`), or
/// else `KUBECONFIG` / `~/.kube/config`.
pub async fn infer_config() -> Result<kube::Config, KubeError> {
    kube::Config::infer().await.map_err(KubeError::Config)
}

/// Builds a client; must run inside the tokio runtime that will use it.
pub fn client(config: kube::Config) -> Result<kube::Client, KubeError> {
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// Settings of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    /// See [`DEBOUNCE`].
    pub debounce: Duration,
    /// Retry policy of watches and discovery.
    pub backoff: Backoff,
    /// Objects per list page (the API server hands out `continue` tokens beyond it).
    pub page_size: u32,
    /// How often a group of mesh CRDs that is not (fully) installed is discovered again.
    pub crd_recheck: Duration,
    /// Emit Kubernetes Events on rejected resources.
    pub events: bool,
}

impl KubeConfig {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            debounce: DEBOUNCE,
            backoff: Backoff::default(),
            page_size: 500,
            crd_recheck: Duration::from_secs(60),
            events: true,
        }
    }
}

/// What one watch holds, for `/debug/config` and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WatchReport {
    pub resource: String,
    pub state: WatchState,
    /// Objects currently held (accepted, rejected or of kinds the model does not use yet).
    pub objects: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum WatchState {
    /// The first list has not completed yet.
    Listing,
    /// Listed and watching.
    Synced,
    /// The resource is not served by the API server (CRD not installed): ignored.
    NotInstalled,
    /// The last request failed; retrying with backoff (the message is the first error).
    Failing(String),
}

/// Watches the API server and publishes snapshots through a [`Store`].
pub struct KubeSource {
    client: kube::Client,
    config: KubeConfig,
    store: Store,
    status: Arc<SourceStatus>,
    watches: Arc<ArcSwap<Vec<WatchReport>>>,
    rejections: Rejections,
}

impl KubeSource {
    pub fn new(client: kube::Client, config: KubeConfig, store: Store) -> Self {
        let watches = Slot::all()
            .map(|slot| WatchReport {
                resource: slot.to_string(),
                state: WatchState::Listing,
                objects: 0,
            })
            .collect();
        Self {
            client,
            config,
            store,
            status: Arc::default(),
            watches: Arc::new(ArcSwap::from_pointee(watches)),
            rejections: Rejections::default(),
        }
    }

    /// Counts rejections in `weft_config_rejected_total{kind}`.
    pub fn with_rejections(mut self, rejections: Rejections) -> Self {
        self.rejections = rejections;
        self
    }

    pub fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    /// The state of every watch, updated as they change.
    pub fn watches(&self) -> Arc<ArcSwap<Vec<WatchReport>>> {
        self.watches.clone()
    }

    /// Watches until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ctx = watch::Ctx {
            client: self.client.clone(),
            config: Arc::new(self.config.clone()),
            tx,
        };
        let mut tasks = JoinSet::new();
        watch::spawn_core(&ctx, &mut tasks);
        crd::spawn_groups(&ctx, &mut tasks);
        drop(ctx);

        let emitter = self
            .config
            .events
            .then(|| events::Emitter::new(self.client.clone(), &self.config.node));
        let mut state = Aggregator::new(self, emitter);
        tokio::pin!(shutdown);
        let mut deadline: Option<Instant> = None;
        loop {
            let wake = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = &mut shutdown => break,
                update = rx.recv() => {
                    let Some(update) = update else { break };
                    if state.apply(update) && deadline.is_none() {
                        deadline = Some(Instant::now() + state.source.config.debounce);
                    }
                    state.report();
                }
                _ = tokio::time::sleep_until(wake), if deadline.is_some() => {
                    deadline = None;
                    state.publish();
                }
            }
        }
        tasks.abort_all();
    }
}

/// One watch of the source: the seven core ones, then one per mesh CRD kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Slot {
    Namespaces,
    Nodes,
    /// Pods of this node come before the other nodes' pods, so that a pod seen by both
    /// watches while it is being scheduled resolves to its full version.
    LocalPods,
    RemotePods,
    Services,
    EndpointSlices,
    /// Secrets holding TLS material (DestinationRule `credentialName`).
    Secrets,
    /// Istio's MeshConfig: the `istio` ConfigMap of the root namespace.
    MeshConfig,
    Crd(usize),
}

impl Slot {
    const CORE: [Slot; 8] = [
        Slot::Namespaces,
        Slot::Nodes,
        Slot::LocalPods,
        Slot::RemotePods,
        Slot::Services,
        Slot::EndpointSlices,
        Slot::Secrets,
        Slot::MeshConfig,
    ];

    fn all() -> impl Iterator<Item = Slot> {
        Self::CORE
            .into_iter()
            .chain((0..CRD_KINDS.len()).map(Slot::Crd))
    }

    fn index(self) -> usize {
        match self {
            Slot::Crd(i) => Self::CORE.len() + i,
            core => Self::CORE.iter().position(|s| *s == core).unwrap_or(0),
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Namespaces => f.write_str("v1 Namespace"),
            Slot::Nodes => f.write_str("v1 Node"),
            Slot::LocalPods => f.write_str("v1 Pod (this node)"),
            Slot::RemotePods => f.write_str("v1 Pod (other nodes)"),
            Slot::Services => f.write_str("v1 Service"),
            Slot::EndpointSlices => f.write_str("discovery.k8s.io/v1 EndpointSlice"),
            Slot::Secrets => f.write_str("v1 Secret (TLS material)"),
            Slot::MeshConfig => f.write_str("v1 ConfigMap istio-system/istio (MeshConfig)"),
            Slot::Crd(i) => write!(f, "{}/* {}", CRD_KINDS[*i].group, CRD_KINDS[*i].kind),
        }
    }
}

/// One object as received from a watch, already translated.
#[derive(Debug)]
pub(crate) struct Received {
    /// `namespace/name`, or `name` when cluster-scoped.
    pub key: String,
    pub reference: ObjectReference,
    pub resource_version: String,
    pub results: Vec<Result<Object, Invalid>>,
}

/// What watch tasks tell the aggregator.
#[derive(Debug)]
pub(crate) enum Update {
    /// A complete list (the first one, or a relist): replaces what the watch held.
    Listed {
        slot: Slot,
        objects: Vec<Received>,
    },
    Applied {
        slot: Slot,
        object: Box<Received>,
    },
    Deleted {
        slot: Slot,
        key: String,
    },
    /// The resource is not served: the watch holds nothing and does not hold back publishing.
    NotServed {
        slot: Slot,
    },
    /// A watch started failing (`Some(first error)`) or recovered (`None`).
    Health {
        slot: Slot,
        failing: Option<String>,
    },
}

/// One object as held by the aggregator (what it yields is in the [`Ledger`]).
struct Held {
    reference: ObjectReference,
    resource_version: String,
}

#[derive(Default)]
struct SlotState {
    objects: HashMap<String, Held>,
    /// Listed at least once, or known not to be served.
    settled: bool,
    served: bool,
    failing: Option<String>,
}

/// Where a resource came from: one object of one watch. The order (watch, then name) decides
/// which of two watches yielding the same resource wins.
type Origin = (Slot, String);

struct Aggregator {
    source: KubeSource,
    emitter: Option<events::Emitter>,
    slots: Vec<SlotState>,
    ledger: Ledger<Origin>,
    /// Current rejections of each object that has any.
    rejected: BTreeMap<Origin, Vec<Rejection>>,
    dirty: bool,
}

impl Aggregator {
    fn new(source: KubeSource, emitter: Option<events::Emitter>) -> Self {
        Self {
            source,
            emitter,
            slots: Slot::all().map(|_| SlotState::default()).collect(),
            ledger: Ledger::new(),
            rejected: BTreeMap::new(),
            dirty: false,
        }
    }

    /// Applies one update; returns whether a snapshot should be (re)published.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Listed { slot, objects } => {
                let mut old = std::mem::take(&mut self.slots[slot.index()].objects);
                let mut held = HashMap::with_capacity(objects.len());
                for received in objects {
                    let previous = old.remove(&received.key);
                    let key = received.key.clone();
                    held.insert(key, self.resolve(slot, received, previous));
                }
                for key in old.into_keys() {
                    self.forget((slot, key));
                }
                let state = &mut self.slots[slot.index()];
                state.objects = held;
                state.settled = true;
                state.served = true;
            }
            Update::Applied { slot, object } => {
                let previous = self.slots[slot.index()].objects.remove(&object.key);
                let key = object.key.clone();
                let held = self.resolve(slot, *object, previous);
                self.slots[slot.index()].objects.insert(key, held);
            }
            Update::Deleted { slot, key } => {
                if self.slots[slot.index()].objects.remove(&key).is_none() {
                    return false;
                }
                self.forget((slot, key));
            }
            Update::NotServed { slot } => {
                let state = &mut self.slots[slot.index()];
                let changed = !state.objects.is_empty() || !state.settled || state.served;
                let old = std::mem::take(&mut state.objects);
                state.settled = true;
                state.served = false;
                for key in old.into_keys() {
                    self.forget((slot, key));
                }
                if !changed {
                    return false;
                }
            }
            Update::Health { slot, failing } => {
                self.slots[slot.index()].failing = failing;
                return false;
            }
        }
        self.dirty = true;
        true
    }

    fn forget(&mut self, origin: Origin) {
        self.rejected.remove(&origin);
        self.ledger.remove(&origin);
    }

    /// Translates one received object into what is held, keeping the last good version of
    /// whatever is rejected; reports new rejections.
    fn resolve(&mut self, slot: Slot, received: Received, previous: Option<Held>) -> Held {
        if let Some(previous) = previous {
            // A relist hands back unchanged objects: keep them as they are (and do not
            // report their rejections again).
            if previous.resource_version == received.resource_version
                && !received.resource_version.is_empty()
            {
                return previous;
            }
        }
        self.translate(slot, received)
    }

    fn translate(&mut self, slot: Slot, received: Received) -> Held {
        let origin = format!("kubernetes (resourceVersion {})", received.resource_version);
        let results = received
            .results
            .into_iter()
            .map(|result| (origin.clone(), result))
            .collect();
        let key: Origin = (slot, received.key);
        let applied = self.ledger.apply(key.clone(), results, &key.1);
        let held = Held {
            reference: received.reference,
            resource_version: received.resource_version,
        };
        for rejection in &applied.rejected {
            self.source.rejections.inc(&rejection.kind);
            warn!(
                kind = %rejection.kind,
                resource = %rejection.name,
                field = %rejection.field,
                "{rejection}"
            );
            if let Some(emitter) = &self.emitter {
                if emitter.responsible(slot, &held.reference, self.node_names()) {
                    emitter.rejected(&held.reference, rejection);
                }
            }
        }
        if applied.rejected.is_empty() {
            self.rejected.remove(&key);
        } else {
            self.rejected.insert(key, applied.rejected);
        }
        held
    }

    fn node_names(&self) -> impl Iterator<Item = &str> + Clone {
        self.slots[Slot::Nodes.index()]
            .objects
            .values()
            .filter_map(|h| h.reference.name.as_deref())
    }

    fn settled(&self) -> bool {
        self.slots.iter().all(|s| s.settled)
    }

    fn publish(&mut self) {
        if !self.dirty || !self.settled() {
            return;
        }
        self.dirty = false;
        let rejected: Vec<Rejection> = self.rejected.values().flatten().cloned().collect();
        let resources = self.ledger.resources();
        let rejected_count = rejected.len();
        self.source.status.set_rejected(rejected);
        let version = self.ledger.publish(&self.source.store);
        info!(
            version,
            resources,
            rejected = rejected_count,
            "configuration published from the Kubernetes API"
        );
    }

    fn report(&self) {
        let reports = Slot::all()
            .zip(&self.slots)
            .map(|(slot, state)| WatchReport {
                resource: slot.to_string(),
                state: match (&state.failing, state.settled, state.served) {
                    (Some(error), _, _) => WatchState::Failing(error.clone()),
                    (None, false, _) => WatchState::Listing,
                    (None, true, true) => WatchState::Synced,
                    (None, true, false) => WatchState::NotInstalled,
                },
                objects: state.objects.len(),
            })
            .collect();
        self.source.watches.store(Arc::new(reports));
    }
}
