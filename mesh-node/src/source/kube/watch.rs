//! One kube-runtime watcher per resource, turning watch events into translated [`Update`]s.

use std::{
    fmt::Debug,
    hash::{BuildHasher, RandomState},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, ObjectReference, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        utils::{Backoff as BackoffPolicy, ResetTimerBackoff},
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Api, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{sync::mpsc, task::JoinSet};
use tracing::{debug, info, warn};

use super::{
    slim::{SlimNode, SlimPod},
    KubeConfig, Received, Slot, Update,
};
use crate::{
    model::policy::{MESH_CONFIG_MAP, ROOT_NAMESPACE},
    source::objects,
};

/// kubectl's copy of the whole object; it can be as large as the object itself.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Terminated pods keep their IP in `status.podIP` after it was handed to another pod.
const RUNNING_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Secrets that never hold TLS material for DestinationRules (Istio filters the same ones).
const TLS_SECRETS: &str = "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token";

/// What every watch task needs.
#[derive(Clone)]
pub(super) struct Ctx {
    pub client: kube::Client,
    pub config: Arc<KubeConfig>,
    pub tx: mpsc::UnboundedSender<Update>,
}

/// Exponential backoff with jitter between `min` and `max`; it starts over once a watch has
/// worked for `reset_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// kube-runtime's default policy: 0.8 s doubling up to 30 s, reset after 2 minutes.
    fn default() -> Self {
        Self {
            min: Duration::from_millis(800),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    pub(super) fn policy(self) -> ResetTimerBackoff<Exponential> {
        ResetTimerBackoff::new(Exponential::new(self), self.reset_after)
    }
}

/// The delays of [`Backoff`]. Jitter (each delay drawn from its upper half) keeps the nodes
/// of a cluster from reconnecting in lockstep after the API server restarts.
pub(super) struct Exponential {
    policy: Backoff,
    next: Duration,
    random: RandomState,
    draws: u64,
}

impl Exponential {
    fn new(policy: Backoff) -> Self {
        Self {
            policy,
            next: policy.min,
            random: RandomState::new(),
            draws: 0,
        }
    }
}

impl Iterator for Exponential {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        self.draws += 1;
        let fraction = (self.random.hash_one(self.draws) % 1000) as u32;
        Some(base / 2 + base / 2 * fraction / 1000)
    }
}

impl BackoffPolicy for Exponential {
    fn reset(&mut self) {
        self.next = self.policy.min;
    }
}

/// Starts the watches of the core kinds.
pub(super) fn spawn_core(ctx: &Ctx, tasks: &mut JoinSet<()>) {
    let node = &ctx.config.node;
    let client = &ctx.client;
    let base = watcher::Config::default().page_size(ctx.config.page_size);

    tasks.spawn(run(
        ctx.clone(),
        Slot::Namespaces,
        Api::<Namespace>::all(client.clone()),
        base.clone(),
        convert_full,
    ));
    tasks.spawn(run(
        ctx.clone(),
        Slot::Nodes,
        Api::<SlimNode>::all(client.clone()),
        base.clone(),
        |node: SlimNode| Some(convert(node.reference(), node.to_json())),
    ));
    tasks.spawn(run(
        ctx.clone(),
        Slot::LocalPods,
        Api::<Pod>::all(client.clone()),
        base.clone()
            .fields(&format!("spec.nodeName={node},{RUNNING_PODS}")),
        |pod: Pod| {
            // Host-network pods share the node's address; the mesh cannot capture them.
            let host_network = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            (!host_network).then(|| convert_full(pod)).flatten()
        },
    ));
    tasks.spawn(run(
        ctx.clone(),
        Slot::RemotePods,
        Api::<SlimPod>::all(client.clone()),
        base.clone()
            .fields(&format!("spec.nodeName!={node},{RUNNING_PODS}")),
        |pod: SlimPod| (!pod.host_network()).then(|| convert(pod.reference(), pod.to_json())),
    ));
    tasks.spawn(run(
        ctx.clone(),
        Slot::Services,
        Api::<Service>::all(client.clone()),
        base.clone(),
        convert_full,
    ));
    tasks.spawn(run(
        ctx.clone(),
        Slot::EndpointSlices,
        Api::<EndpointSlice>::all(client.clone()),
        base.clone(),
        convert_full,
    ));
    tasks.spawn(run(
        ctx.clone(),
        Slot::MeshConfig,
        Api::<ConfigMap>::namespaced(client.clone(), ROOT_NAMESPACE),
        base.clone()
            .fields(&format!("metadata.name={MESH_CONFIG_MAP}")),
        convert_full,
    ));
    tasks.spawn(run(
        ctx.clone(),
        Slot::Secrets,
        Api::<Secret>::all(client.clone()),
        base.fields(TLS_SECRETS),
        |mut secret: Secret| {
            // Only the keys TLS material is read from are translated (and so ever held).
            if let Some(data) = &mut secret.data {
                data.retain(|key, _| objects::is_tls_secret_key(key));
            }
            secret.string_data = None;
            let received = convert_full(secret)?;
            (!received.results.is_empty()).then_some(received)
        },
    ));
}

/// How a watch ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// The API server answered 404: the resource is not served (a CRD that was removed).
    NotServed,
    /// The aggregator is gone (shutdown).
    Closed,
}

/// Runs one watch of a core kind until the aggregator goes away.
pub(super) async fn run<K>(
    ctx: Ctx,
    slot: Slot,
    api: Api<K>,
    config: watcher::Config,
    convert: impl Fn(K) -> Option<Received>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let _ = watch(ctx, slot, api, config, convert).await;
}

/// Runs one watch until the aggregator goes away or, for a CRD, until the API server answers
/// 404 (the resource is not served); a core kind keeps retrying whatever the error.
pub(super) async fn watch<K>(
    ctx: Ctx,
    slot: Slot,
    api: Api<K>,
    config: watcher::Config,
    convert: impl Fn(K) -> Option<Received>,
) -> Ended
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let optional = matches!(slot, Slot::Crd(_));
    let stream = watcher(api, config)
        .backoff(ctx.config.backoff.policy())
        .modify(|object| {
            object.managed_fields_mut().clear();
            object.annotations_mut().remove(LAST_APPLIED);
        });
    let mut stream = std::pin::pin!(stream);
    let mut streak = Streak::new(slot, ctx.tx.clone());
    let mut listing: Option<Vec<Received>> = None;
    // A re-established watch says nothing until something changes; once no error has come
    // for two maximal backoff periods, the retry worked.
    let quiet = ctx.config.backoff.max * 2;
    loop {
        let event = if streak.failing {
            match tokio::time::timeout(quiet, stream.next()).await {
                Ok(event) => event,
                Err(_) => {
                    streak.recovered();
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        let Some(event) = event else { break };
        let update = match event {
            Ok(Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(Event::InitApply(object)) => {
                streak.recovered();
                if let Some(received) = convert(object) {
                    listing.get_or_insert_with(Vec::new).push(received);
                }
                continue;
            }
            Ok(Event::InitDone) => {
                streak.recovered();
                Update::Listed {
                    slot,
                    objects: listing.take().unwrap_or_default(),
                }
            }
            Ok(Event::Apply(object)) => {
                streak.recovered();
                let key = key(&object);
                match convert(object) {
                    Some(object) => Update::Applied {
                        slot,
                        object: Box::new(object),
                    },
                    // Filtered out now (e.g. it became a host-network pod): drop what was held.
                    None => Update::Deleted { slot, key },
                }
            }
            Ok(Event::Delete(object)) => {
                streak.recovered();
                Update::Deleted {
                    slot,
                    key: key(&object),
                }
            }
            Err(error) => {
                match status_code(&error) {
                    Some(404) if optional => return Ended::NotServed,
                    Some(410) => {
                        debug!(resource = %slot, "resource version expired (410 Gone): relisting");
                    }
                    code => streak.failed(&error, code),
                }
                continue;
            }
        };
        if ctx.tx.send(update).is_err() {
            return Ended::Closed;
        }
    }
    Ended::Closed
}

/// Logs the first error of a streak and the recovery, never each retry.
struct Streak {
    slot: Slot,
    tx: mpsc::UnboundedSender<Update>,
    failing: bool,
}

impl Streak {
    fn new(slot: Slot, tx: mpsc::UnboundedSender<Update>) -> Self {
        Self {
            slot,
            tx,
            failing: false,
        }
    }

    fn failed(&mut self, error: &watcher::Error, code: Option<u16>) {
        if self.failing {
            debug!(resource = %self.slot, %error, "watch still failing");
            return;
        }
        self.failing = true;
        let hint = match code {
            Some(401) => "unauthorized: is the ServiceAccount token mounted and valid?",
            Some(403) => {
                "forbidden: does the ClusterRole weft-mesh-node grant get, list and watch on it?"
            }
            Some(_) => "the API server refused the request",
            None => "cannot reach the API server",
        };
        warn!(
            resource = %self.slot,
            %error,
            "watch failed ({hint}); retrying with backoff, the current configuration stays in force"
        );
        let _ = self.tx.send(Update::Health {
            slot: self.slot,
            failing: Some(error.to_string()),
        });
    }

    fn recovered(&mut self) {
        if self.failing {
            self.failing = false;
            info!(resource = %self.slot, "watch recovered");
            let _ = self.tx.send(Update::Health {
                slot: self.slot,
                failing: None,
            });
        }
    }
}

/// The HTTP status behind a watcher error, if the API server answered.
pub(super) fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

fn key<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(namespace) if !namespace.is_empty() => format!("{namespace}/{name}"),
        _ => name.to_owned(),
    }
}

/// A typed object: it serializes its own `apiVersion` and `kind`.
pub(super) fn convert_full<K>(object: K) -> Option<Received>
where
    K: Resource<DynamicType = ()> + Serialize,
{
    let reference = reference(&object, K::api_version(&()).into(), K::kind(&()).into());
    let value = serde_json::to_value(&object).ok()?;
    Some(convert(reference, value))
}

pub(super) fn reference<K: Resource>(
    object: &K,
    api_version: String,
    kind: String,
) -> ObjectReference {
    let meta = object.meta();
    ObjectReference {
        api_version: Some(api_version),
        kind: Some(kind),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// Translates the JSON form of an object, as the file source translates a document.
pub(super) fn convert(reference: ObjectReference, value: serde_json::Value) -> Received {
    let name = reference.name.clone().unwrap_or_default();
    let key = match reference.namespace.as_deref() {
        Some(namespace) if !namespace.is_empty() => format!("{namespace}/{name}"),
        _ => name,
    };
    let results = match crate::source::yaml::from_json(value) {
        Ok(doc) => objects::translate(&doc),
        // JSON from the API server always converts; keep the branch total anyway.
        Err(error) => vec![Err(objects::Invalid {
            kind: reference.kind.clone(),
            id: None,
            name: Some(key.clone()),
            field: "(document)".into(),
            reason: format!("cannot convert the object: {error}"),
            fallback: None,
        })],
    };
    Received {
        key,
        resource_version: reference.resource_version.clone().unwrap_or_default(),
        reference,
        results,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut backoff = Exponential::new(Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(400),
            reset_after: Duration::from_secs(1),
        });
        let delays: Vec<_> = backoff.by_ref().take(5).collect();
        for (delay, base) in delays.iter().zip([100, 200, 400, 400, 400]) {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base / 2 && *delay <= base,
                "{delay:?} for {base:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next().unwrap() <= Duration::from_millis(100));
    }

    #[test]
    fn status_codes_of_watcher_errors() {
        let gone =
            kube::core::Status::failure("too old resource version", "Expired").with_code(410);
        assert_eq!(
            status_code(&watcher::Error::WatchError(Box::new(gone.clone()))),
            Some(410)
        );
        assert_eq!(
            status_code(&watcher::Error::InitialListFailed(kube::Error::Api(
                Box::new(gone.with_code(404))
            ))),
            Some(404)
        );
        assert_eq!(status_code(&watcher::Error::NoResourceVersion), None);
    }

    #[test]
    fn typed_objects_translate_like_documents() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "reviews", "namespace": "bookinfo", "uid": "u1", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {"clusterIP": "10.96.0.12", "ports": [{"name": "http", "port": 9080}]},
        }))
        .unwrap();
        let received = convert_full(service).unwrap();
        assert_eq!(received.key, "bookinfo/reviews");
        assert_eq!(received.resource_version, "7");
        assert_eq!(received.reference.kind.as_deref(), Some("Service"));
        let [Ok(crate::source::Object::Service(service))] = received.results.as_slice() else {
            panic!("expected one service: {:?}", received.results);
        };
        assert_eq!(service.cluster_ip, Some("10.96.0.12".parse().unwrap()));
    }
}
