//! The Kubernetes source against kube-rs's mock service: a small in-memory API server behind
//! `tower_test::mock::pair`, no real cluster. It serves lists with `continue` pages, watches
//! as long-lived streams, API discovery of the mesh CRD groups, and accepts Events; tests
//! mutate it (recorded or silently, to lose events), expire watches (410 Gone) and take it
//! down, and assert the snapshots the source publishes.

use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use kube::client::Body;
use mesh_node::{
    model::{ObjectKey, Snapshot, Store},
    source::kube::{Backoff, KubeConfig, KubeSource, WatchReport, WatchState},
};
use serde_json::{json, Value};
use tokio::sync::oneshot;

type Chunk = Result<Frame<Bytes>, io::Error>;
type ResponseBody = StreamBody<mpsc::UnboundedReceiver<Chunk>>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<ResponseBody>>;

const NAMESPACES: &str = "/api/v1/namespaces";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const SECRETS: &str = "/api/v1/secrets";
const CONFIG_MAPS: &str = "/api/v1/namespaces/istio-system/configmaps";

// ------------------------------------------------------------------------------------------
// The fake API server
// ------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct FakeApi {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    resource_version: u64,
    /// Watches from an older resource version get `410 Gone`.
    compacted: u64,
    collections: BTreeMap<String, Collection>,
    /// Served CRD groups: group → version → (plural, kind).
    groups: BTreeMap<String, BTreeMap<String, Vec<(String, String)>>>,
    watches: Vec<OpenWatch>,
    down: bool,
    refused: usize,
    requests: Vec<String>,
    events: Vec<Value>,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    /// `(resourceVersion, type, object)` of every recorded change.
    history: Vec<(u64, &'static str, Value)>,
}

struct OpenWatch {
    collection: String,
    selector: Option<String>,
    tx: mpsc::UnboundedSender<Chunk>,
}

impl FakeApi {
    fn new() -> Self {
        let api = Self::default();
        for path in [
            NAMESPACES,
            NODES,
            PODS,
            SERVICES,
            SLICES,
            SECRETS,
            CONFIG_MAPS,
        ] {
            api.lock()
                .collections
                .insert(path.into(), Collection::default());
        }
        api
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Serves a CRD kind in `group/version`.
    fn serve_crd(&self, group: &str, version: &str, plural: &str, kind: &str) {
        let mut inner = self.lock();
        inner
            .groups
            .entry(group.into())
            .or_default()
            .entry(version.into())
            .or_default()
            .push((plural.into(), kind.into()));
        inner
            .collections
            .entry(format!("/apis/{group}/{version}/{plural}"))
            .or_default();
    }

    /// Creates or replaces an object, notifying watches.
    fn apply(&self, collection: &str, object: Value) {
        self.change(collection, object, true);
    }

    /// Changes an object without any watch hearing of it (an event lost while disconnected).
    fn apply_silently(&self, collection: &str, object: Value) {
        self.change(collection, object, false);
    }

    fn change(&self, collection: &str, mut object: Value, record: bool) {
        let mut inner = self.lock();
        inner.resource_version += 1;
        let rv = inner.resource_version;
        let key = key_of(&object);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}", key.replace('/', "-")));
        }
        let coll = inner.collections.get_mut(collection).expect("collection");
        let old = coll.objects.insert(key, object.clone());
        if record {
            let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
            coll.history.push((rv, kind, object.clone()));
            inner.notify(collection, old.as_ref(), Some(&object));
        }
    }

    fn delete(&self, collection: &str, key: &str) {
        self.remove(collection, key, true);
    }

    fn delete_silently(&self, collection: &str, key: &str) {
        self.remove(collection, key, false);
    }

    fn remove(&self, collection: &str, key: &str, record: bool) {
        let mut inner = self.lock();
        inner.resource_version += 1;
        let rv = inner.resource_version;
        let coll = inner.collections.get_mut(collection).expect("collection");
        let mut old = coll.objects.remove(key).expect("object to delete");
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        if record {
            coll.history.push((rv, "DELETED", old.clone()));
            inner.notify(collection, Some(&old), None);
        }
    }

    /// Compacts history: open watches and watches from older versions get `410 Gone`.
    fn expire(&self) {
        let mut inner = self.lock();
        inner.compacted = inner.resource_version;
        for coll in inner.collections.values_mut() {
            coll.history.clear();
        }
        for watch in inner.watches.drain(..) {
            let _ = watch.tx.unbounded_send(Ok(Frame::data(gone_line())));
        }
    }

    /// Breaks every open connection and refuses new ones.
    fn go_down(&self) {
        let mut inner = self.lock();
        inner.down = true;
        for watch in inner.watches.drain(..) {
            let _ = watch.tx.unbounded_send(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            )));
        }
    }

    fn come_back(&self) {
        self.lock().down = false;
    }

    fn refused(&self) -> usize {
        self.lock().refused
    }

    fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// Answers requests until the client goes away.
    async fn serve(self, mut handle: Handle) {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await.unwrap_or_default();
            let uri = parts.uri.to_string();
            let mut inner = self.lock();
            inner
                .requests
                .push(format!("{} {}", parts.method, decode(&uri)));
            if inner.down {
                inner.refused += 1;
                send.send_error(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "connection refused",
                ));
                continue;
            }
            let response = inner.answer(&parts.method, &uri, &body);
            send.send_response(response);
        }
    }
}

impl Inner {
    fn answer(&mut self, method: &http::Method, uri: &str, body: &[u8]) -> Response<ResponseBody> {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let query: BTreeMap<String, String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (decode(k), decode(v)))
            .collect();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();

        if method == http::Method::POST && path.ends_with("/events") {
            let event: Value = serde_json::from_slice(body).unwrap();
            self.events.push(event.clone());
            return reply(StatusCode::CREATED, &event);
        }
        if method == http::Method::PATCH && path.contains("/events/") {
            let patch: Value = serde_json::from_slice(body).unwrap();
            self.events.push(patch.clone());
            return reply(StatusCode::OK, &patch);
        }
        // Discovery of a group (`/apis/<group>`) and of a group version.
        if segments.len() == 2 && segments[0] == "apis" {
            return match self.groups.get(segments[1]) {
                Some(versions) => {
                    let versions: Vec<Value> = versions
                        .keys()
                        .map(|v| json!({"groupVersion": format!("{}/{v}", segments[1]), "version": v}))
                        .collect();
                    reply(
                        StatusCode::OK,
                        &json!({"kind": "APIGroup", "apiVersion": "v1", "name": segments[1],
                                "versions": versions, "preferredVersion": versions[0]}),
                    )
                }
                None => not_found(),
            };
        }
        if segments.len() == 3 && segments[0] == "apis" && self.groups.contains_key(segments[1]) {
            let Some(resources) = self.groups[segments[1]].get(segments[2]) else {
                return not_found();
            };
            let resources: Vec<Value> = resources
                .iter()
                .map(|(plural, kind)| {
                    json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind,
                           "verbs": ["get", "list", "watch"]})
                })
                .collect();
            return reply(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": format!("{}/{}", segments[1], segments[2]),
                        "resources": resources}),
            );
        }
        if !self.collections.contains_key(path) {
            return not_found();
        }
        let selector = query.get("fieldSelector").cloned();
        if query.get("watch").map(String::as_str) == Some("true") {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::unbounded();
            if from < self.compacted {
                let _ = tx.unbounded_send(Ok(Frame::data(gone_line())));
                return Response::new(StreamBody::new(rx));
            }
            for (rv, kind, object) in &self.collections[path].history {
                if *rv > from && matches(selector.as_deref(), object) {
                    let _ = tx.unbounded_send(Ok(Frame::data(event_line(kind, object))));
                }
            }
            self.watches.push(OpenWatch {
                collection: path.into(),
                selector,
                tx,
            });
            return Response::new(StreamBody::new(rx));
        }
        // A list, paged by `limit`; the continue token is the offset of the next page.
        let items: Vec<Value> = self.collections[path]
            .objects
            .values()
            .filter(|o| matches(selector.as_deref(), o))
            .map(|o| {
                // Like the API server, list items come without their type.
                let mut o = o.clone();
                let map = o.as_object_mut().unwrap();
                map.remove("apiVersion");
                map.remove("kind");
                o
            })
            .collect();
        let offset: usize = query
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let end = offset.saturating_add(limit).min(items.len());
        let continue_token = if end < items.len() {
            end.to_string()
        } else {
            String::new()
        };
        reply(
            StatusCode::OK,
            &json!({
                "kind": "List", "apiVersion": "v1",
                "metadata": {"resourceVersion": self.resource_version.to_string(), "continue": continue_token},
                "items": items[offset..end],
            }),
        )
    }

    fn notify(&mut self, collection: &str, old: Option<&Value>, new: Option<&Value>) {
        self.watches.retain(|watch| {
            if watch.collection != collection {
                return true;
            }
            let was = old.is_some_and(|o| matches(watch.selector.as_deref(), o));
            let is = new.is_some_and(|n| matches(watch.selector.as_deref(), n));
            let line = match (was, is, new) {
                (false, true, Some(new)) => event_line("ADDED", new),
                (true, true, Some(new)) => event_line("MODIFIED", new),
                // Leaving the selector is a deletion for this watch.
                (true, false, _) => event_line("DELETED", new.or(old).unwrap()),
                _ => return true,
            };
            watch.tx.unbounded_send(Ok(Frame::data(line))).is_ok()
        });
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::unbounded();
    let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(
        serde_json::to_vec(body).unwrap(),
    ))));
    let mut response = Response::new(StreamBody::new(rx));
    *response.status_mut() = status;
    response
}

fn not_found() -> Response<ResponseBody> {
    reply(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the server could not find the requested resource",
                "reason": "NotFound", "details": {}, "code": 404}),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    line.into()
}

fn gone_line() -> Bytes {
    event_line(
        "ERROR",
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}),
    )
}

fn key_of(object: &Value) -> String {
    let name = object["metadata"]["name"].as_str().unwrap();
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.into(),
    }
}

/// A field selector of `path=value` / `path!=value` terms.
fn matches(selector: Option<&str>, object: &Value) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (path, value, equal) = match term.split_once("!=") {
            Some((p, v)) => (p, v, false),
            None => {
                let (p, v) = term.split_once('=').unwrap();
                (p, v, true)
            }
        };
        let actual = path
            .split('.')
            .fold(object, |o, k| &o[k])
            .as_str()
            .unwrap_or("");
        (actual == value) == equal
    })
}

/// Percent-decoding of a query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

// ------------------------------------------------------------------------------------------
// Objects as the API server returns them
// ------------------------------------------------------------------------------------------

fn managed_fields() -> Value {
    json!([{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}])
}

fn namespace(name: &str, meshed: bool) -> Value {
    let labels = if meshed {
        json!({"weft.io/mesh": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels, "managedFields": managed_fields()}})
}

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}],
                      "images": [{"names": ["registry/some-image:1"], "sizeBytes": 1000}]}})
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels,
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                        "managedFields": managed_fields()},
           "spec": {"nodeName": node, "serviceAccountName": format!("{namespace}-{}", labels["app"].as_str().unwrap_or("x")),
                    "containers": [{"name": "app", "image": "app:1", "ports": [{"name": "http", "containerPort": 9080}]}]},
           "status": {"phase": "Running", "podIP": ip, "hostIP": "172.18.0.2"}})
}

fn service(namespace: &str, name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": namespace, "managedFields": managed_fields()},
           "spec": {"clusterIP": ip, "selector": {"app": name},
                    "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}]}})
}

/// An EndpointSlice of `service`; endpoints are `(ip, node, pod)`.
fn slice(namespace: &str, service: &str, port: u16, endpoints: &[(&str, &str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node, pod)| {
            json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node,
                   "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abcde"), "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn virtual_service(namespace: &str, name: &str, api_version: &str) -> Value {
    json!({"apiVersion": api_version, "kind": "VirtualService",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}})
}

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

struct Running {
    api: FakeApi,
    store: Store,
    source_status: Arc<mesh_node::source::SourceStatus>,
    watches: Arc<arc_swap::ArcSwap<Vec<WatchReport>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn config() -> KubeConfig {
    let mut config = KubeConfig::new("n1");
    config.backoff = Backoff {
        min: Duration::from_millis(10),
        // A watch counts as recovered after twice this without an error: wide enough that a
        // busy test machine does not end an outage's streak early.
        max: Duration::from_millis(100),
        reset_after: Duration::from_secs(5),
    };
    config.crd_recheck = Duration::from_millis(200);
    config
}

fn start(api: &FakeApi, config: KubeConfig) -> Running {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
    tokio::spawn(api.clone().serve(handle));
    let client = kube::Client::new(service, "default");
    let store = Store::new();
    let source = KubeSource::new(client, config, store.clone());
    let source_status = source.status();
    let watches = source.watches();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(source.run(async {
        let _ = stopped.await;
    }));
    Running {
        api: api.clone(),
        store,
        source_status,
        watches,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Running {
    /// Waits (at most 10 s) for a snapshot satisfying `done`.
    async fn wait_for(&self, what: &str, done: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let mut rx = self.store.subscribe();
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let snapshot = rx.borrow_and_update().clone();
                if snapshot.version > 0 && done(&snapshot) {
                    return snapshot;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        match result {
            Ok(snapshot) => snapshot,
            Err(_) => panic!(
                "timed out waiting for {what}; watches: {:#?}; last requests: {:#?}",
                self.watches.load(),
                self.api
                    .requests()
                    .iter()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
            ),
        }
    }

    fn watch(&self, resource: &str) -> WatchReport {
        self.watches
            .load()
            .iter()
            .find(|w| w.resource == resource)
            .cloned()
            .unwrap_or_else(|| panic!("no watch {resource}"))
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task.take().unwrap())
            .await
            .expect("the source stops on shutdown")
            .unwrap();
    }
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name)
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The cluster most tests start from: a meshed and a plain namespace, two nodes, pods on
/// both, `reviews` with an EndpointSlice.
fn bookinfo() -> FakeApi {
    let api = FakeApi::new();
    api.apply(NAMESPACES, namespace("bookinfo", true));
    api.apply(NAMESPACES, namespace("legacy", false));
    api.apply(NODES, node("n1", "172.18.0.2"));
    api.apply(NODES, node("n2", "172.18.0.3"));
    api.apply(
        PODS,
        pod(
            "bookinfo",
            "productpage-0",
            "n1",
            "10.244.1.5",
            json!({"app": "productpage"}),
        ),
    );
    api.apply(
        PODS,
        pod(
            "bookinfo",
            "reviews-v1-0",
            "n1",
            "10.244.1.6",
            json!({"app": "reviews", "version": "v1"}),
        ),
    );
    api.apply(
        PODS,
        pod(
            "bookinfo",
            "reviews-v2-0",
            "n2",
            "10.244.2.6",
            json!({"app": "reviews", "version": "v2"}),
        ),
    );
    let mut host = pod(
        "kube-system",
        "kube-proxy-n1",
        "n1",
        "172.18.0.2",
        json!({"app": "kube-proxy"}),
    );
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(PODS, host);
    let mut done = pod(
        "legacy",
        "job-0",
        "n2",
        "10.244.2.99",
        json!({"app": "job"}),
    );
    done["status"]["phase"] = json!("Succeeded");
    api.apply(PODS, done);
    api.apply(SERVICES, service("bookinfo", "reviews", "10.96.0.12"));
    api.apply(
        SLICES,
        slice(
            "bookinfo",
            "reviews",
            9081,
            &[
                ("10.244.1.6", "n1", "reviews-v1-0"),
                ("10.244.2.6", "n2", "reviews-v2-0"),
            ],
        ),
    );
    api
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn initial_list_is_translated_into_the_model() {
    let api = bookinfo();
    let running = start(&api, config());
    let snap = running.wait_for("the first snapshot", |_| true).await;

    // One snapshot for the whole initial list, published once every watch listed.
    assert_eq!(snap.version, 1);
    assert!(snap.namespaces["bookinfo"].mesh_enabled());
    assert!(!snap.namespaces["legacy"].mesh_enabled());
    assert_eq!(snap.nodes["n2"].address, ip("172.18.0.3"));

    // This node's pod, decoded in full, and a remote pod, decoded slim: same model.
    let productpage = &snap.pods[&key("bookinfo", "productpage-0")];
    assert_eq!(productpage.ip, Some(ip("10.244.1.5")));
    assert_eq!(productpage.node.as_deref(), Some("n1"));
    assert!(snap.is_meshed(productpage));
    let remote = &snap.pods[&key("bookinfo", "reviews-v2-0")];
    assert_eq!(remote.ip, Some(ip("10.244.2.6")));
    assert_eq!(remote.node.as_deref(), Some("n2"));
    assert_eq!(&*remote.service_account, "bookinfo-reviews");
    assert_eq!(remote.labels["version"], "v2");
    assert!(snap.is_meshed(remote));
    assert_eq!(
        snap.pod_by_ip(ip("10.244.2.6")).unwrap().key,
        key("bookinfo", "reviews-v2-0")
    );
    // Host-network and terminated pods are not workloads of the mesh.
    assert!(!snap.pods.contains_key(&key("kube-system", "kube-proxy-n1")));
    assert!(!snap.pods.contains_key(&key("legacy", "job-0")));
    assert_eq!(snap.pods.len(), 3);

    // The Service's endpoints come from its EndpointSlice (port 9081, not the selector's 9080).
    let reviews = key("bookinfo", "reviews");
    assert_eq!(snap.service_by_ip(ip("10.96.0.12")).unwrap().key, reviews);
    let endpoints: Vec<_> = snap
        .endpoints(&reviews, 9080)
        .iter()
        .map(|e| (e.ip, e.port, e.node.as_deref().map(str::to_owned)))
        .collect();
    assert_eq!(
        endpoints,
        [
            (ip("10.244.1.6"), 9081, Some("n1".into())),
            (ip("10.244.2.6"), 9081, Some("n2".into())),
        ]
    );

    // Node-scoped pod watches; no CRD group is served, so all mesh kinds are ignored.
    let requests = running.api.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains(
                "fieldSelector=spec.nodeName=n1,status.phase!=Succeeded,status.phase!=Failed"
            )),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName!=n1,")),
        "{requests:#?}"
    );
    assert_eq!(running.watch("v1 Service").state, WatchState::Synced);
    assert_eq!(running.watch("v1 Pod (other nodes)").objects, 1);
    assert_eq!(
        running.watch("networking.istio.io/* VirtualService").state,
        WatchState::NotInstalled
    );
    assert!(running.source_status.rejected().is_empty());
    running.stop().await;
}

#[tokio::test]
async fn watch_events_are_batched_into_a_new_snapshot() {
    let api = bookinfo();
    let mut config = config();
    // Wide enough that the three changes below always land in one batch.
    config.debounce = Duration::from_millis(300);
    let running = start(&api, config);
    let first = running.wait_for("the first snapshot", |_| true).await;

    // Add a Service, opt a pod out, delete the slice of `reviews`: one new snapshot.
    api.apply(SERVICES, service("bookinfo", "details", "10.96.0.13"));
    let mut opted_out = pod(
        "bookinfo",
        "productpage-0",
        "n1",
        "10.244.1.5",
        json!({"app": "productpage", "weft.io/mesh": "disabled"}),
    );
    opted_out["metadata"]["uid"] = json!("uid-bookinfo-productpage-0");
    api.apply(PODS, opted_out);
    api.delete(SLICES, "bookinfo/reviews-abcde");

    let snap = running
        .wait_for("the three changes", |s| s.version > first.version)
        .await;
    assert_eq!(snap.version, first.version + 1, "one batch, one snapshot");
    assert_eq!(
        snap.service_by_ip(ip("10.96.0.13")).unwrap().key,
        key("bookinfo", "details")
    );
    assert!(!snap.is_meshed(&snap.pods[&key("bookinfo", "productpage-0")]));
    // Without its slice, `reviews` falls back to its selector (target port 9080).
    let endpoints: Vec<_> = snap
        .endpoints(&key("bookinfo", "reviews"), 9080)
        .iter()
        .map(|e| (e.ip, e.port))
        .collect();
    assert_eq!(
        endpoints,
        [(ip("10.244.1.6"), 9080), (ip("10.244.2.6"), 9080)]
    );

    // Deleting a pod and a namespace.
    api.delete(PODS, "bookinfo/reviews-v2-0");
    api.delete(NAMESPACES, "legacy");
    let snap = running
        .wait_for("the deletions", |s| !s.namespaces.contains_key("legacy"))
        .await;
    assert!(!snap.pods.contains_key(&key("bookinfo", "reviews-v2-0")));
    assert!(snap.pod_by_ip(ip("10.244.2.6")).is_none());
    running.stop().await;
}

/// A Secret as the API server serves it (`data` in base64).
fn secret(namespace: &str, name: &str, kind: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine as _;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(v);
            ((*k).to_string(), json!(encoded))
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": kind,
           "metadata": {"name": name, "namespace": namespace, "managedFields": managed_fields()},
           "data": data})
}

#[tokio::test]
async fn secrets_hold_only_tls_material_and_follow_changes() {
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
    let api = bookinfo();
    let tls = |ca: &str| {
        secret(
            "shop",
            "db-client",
            "kubernetes.io/tls",
            &[
                ("tls.crt", CERT),
                ("tls.key", KEY),
                ("ca.crt", ca),
                ("password", "hunter2"),
            ],
        )
    };
    api.apply(SECRETS, tls(CERT));
    // The snapshot holds the Secrets a DestinationRule names.
    api.serve_crd(
        "networking.istio.io",
        "v1",
        "destinationrules",
        "DestinationRule",
    );
    api.apply(
        "/apis/networking.istio.io/v1/destinationrules",
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": "db", "namespace": "shop"},
               "spec": {"host": "db.example.test",
                        "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "db-client"}}}}),
    );
    // Helm releases and ServiceAccount tokens are never listed; other Secrets are not held.
    api.apply(
        SECRETS,
        secret("shop", "release", "helm.sh/release.v1", &[("cert", CERT)]),
    );
    api.apply(
        SECRETS,
        secret(
            "shop",
            "app",
            "Opaque",
            &[("key", "sk-live-123"), ("token", KEY)],
        ),
    );
    let running = start(&api, config());
    let snap = running
        .wait_for("the Secret", |s| !s.secrets.is_empty())
        .await;
    assert_eq!(
        snap.secrets.keys().cloned().collect::<Vec<_>>(),
        [key("shop", "db-client")]
    );
    let held = &snap.secrets[&key("shop", "db-client")];
    assert_eq!(
        (
            held.cert.as_deref(),
            held.private_key.as_deref(),
            held.ca.as_deref()
        ),
        (Some(CERT), Some(KEY), Some(CERT))
    );
    let requests = running.api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/secrets?")
                && r.contains("type!=helm.sh/release.v1")
                && r.contains("type!=kubernetes.io/service-account-token")),
        "{requests:#?}"
    );
    assert_eq!(running.watch("v1 Secret (TLS material)").objects, 1);

    // Rotated in place, then emptied of TLS material: the model follows.
    api.apply(
        SECRETS,
        tls("-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n"),
    );
    running
        .wait_for("the rotated CA", |s| {
            s.secrets
                .get(&key("shop", "db-client"))
                .is_some_and(|s| s.ca.as_deref().is_some_and(|ca| ca.contains("NEW")))
        })
        .await;
    api.apply(
        SECRETS,
        secret("shop", "db-client", "Opaque", &[("password", "x")]),
    );
    running
        .wait_for("the emptied Secret", |s| s.secrets.is_empty())
        .await;
    running.stop().await;
}

fn config_map(name: &str, mesh: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "istio-system", "managedFields": managed_fields()},
           "data": {"mesh": mesh}})
}

#[tokio::test]
async fn mesh_config_trust_domain_aliases_follow_the_istio_config_map() {
    let api = bookinfo();
    api.apply(
        CONFIG_MAPS,
        config_map(
            "istio",
            "accessLogFile: /dev/stdout\ntrustDomainAliases: [old-td, legacy.example]\n",
        ),
    );
    api.apply(
        CONFIG_MAPS,
        config_map("other", "trustDomainAliases: [evil]\n"),
    );
    let running = start(&api, config());
    let aliases = |s: &Snapshot| -> Vec<String> {
        s.mesh_config
            .trust_domain_aliases
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let snap = running
        .wait_for("the MeshConfig", |s| {
            !s.mesh_config.trust_domain_aliases.is_empty()
        })
        .await;
    assert_eq!(aliases(&snap), ["old-td", "legacy.example"]);
    let requests = running.api.requests();
    assert!(
        requests.iter().any(
            |r| r.starts_with("GET /api/v1/namespaces/istio-system/configmaps?")
                && r.contains("metadata.name=istio")
        ),
        "only the istio ConfigMap is asked for: {requests:#?}"
    );

    // A bad alias is rejected; the last good version stays.
    api.apply(
        CONFIG_MAPS,
        config_map("istio", "trustDomainAliases: [\"a/b\"]\n"),
    );
    eventually("the rejection", || {
        running
            .source_status
            .rejected()
            .iter()
            .any(|r| r.field == "data.mesh.trustDomainAliases[0]")
    })
    .await;
    assert_eq!(
        aliases(&running.store.current()),
        ["old-td", "legacy.example"]
    );

    // Changed, then deleted: the model follows.
    api.apply(
        CONFIG_MAPS,
        config_map("istio", "trustDomainAliases: [new-td]\n"),
    );
    running
        .wait_for("the new alias", |s| aliases(s) == ["new-td"])
        .await;
    api.delete(CONFIG_MAPS, "istio-system/istio");
    running
        .wait_for("no MeshConfig", |s| {
            s.mesh_config.trust_domain_aliases.is_empty()
        })
        .await;
    running.stop().await;
}

#[tokio::test]
async fn gone_410_relists_and_drops_what_was_deleted_meanwhile() {
    let api = bookinfo();
    api.apply(SERVICES, service("bookinfo", "ratings", "10.96.0.14"));
    let running = start(&api, config());
    running
        .wait_for("the first snapshot", |s| s.services.len() == 2)
        .await;
    let lists_before = count(&api.requests(), |r| is_list(r, SERVICES));

    // Changes the watch never hears of, then the history is compacted: 410 Gone.
    api.delete_silently(SERVICES, "bookinfo/ratings");
    api.apply_silently(SERVICES, service("bookinfo", "details", "10.96.0.13"));
    api.delete_silently(PODS, "bookinfo/reviews-v2-0");
    api.expire();

    let snap = running
        .wait_for("the relist", |s| {
            s.services.contains_key(&key("bookinfo", "details"))
                && !s.pods.contains_key(&key("bookinfo", "reviews-v2-0"))
        })
        .await;
    assert!(!snap.services.contains_key(&key("bookinfo", "ratings")));
    assert!(snap.service_by_ip(ip("10.96.0.14")).is_none());
    assert!(snap.services.contains_key(&key("bookinfo", "reviews")));
    assert!(count(&api.requests(), |r| is_list(r, SERVICES)) > lists_before);
    assert_eq!(running.watch("v1 Service").state, WatchState::Synced);
    running.stop().await;
}

#[tokio::test]
async fn api_server_outage_then_resume() {
    let logs = Logs::capture();
    let api = bookinfo();
    let running = start(&api, config());
    let first = running.wait_for("the first snapshot", |_| true).await;

    api.go_down();
    let refused = api.refused();
    // Many retries (with backoff) while it is down...
    eventually("retries", || api.refused() >= refused + 30).await;
    assert!(matches!(
        running.watch("v1 Service").state,
        WatchState::Failing(_)
    ));
    // ...and the configuration stays in force meanwhile.
    assert_eq!(running.store.current().version, first.version);
    assert_eq!(running.store.current().services.len(), 1);

    // Recorded while down: the resumed watch delivers it.
    api.apply(SERVICES, service("bookinfo", "details", "10.96.0.13"));
    api.come_back();
    let snap = running
        .wait_for("the change made during the outage", |s| {
            s.services.contains_key(&key("bookinfo", "details"))
        })
        .await;
    assert!(snap.services.contains_key(&key("bookinfo", "reviews")));
    eventually("every watch recovered", || {
        running
            .watches
            .load()
            .iter()
            .all(|w| !matches!(w.state, WatchState::Failing(_)))
    })
    .await;

    // One warning per watch for the whole outage, and one recovery line.
    let text = logs.text();
    let failed = text
        .lines()
        .filter(|l| l.contains("watch failed") && l.contains("resource=v1 Service"))
        .count();
    let recovered = text
        .lines()
        .filter(|l| l.contains("watch recovered") && l.contains("resource=v1 Service"))
        .count();
    assert_eq!(failed, 1, "{text}");
    assert_eq!(recovered, 1, "{text}");
    running.stop().await;
}

#[tokio::test]
async fn large_list_is_paged_and_translated_completely() {
    let api = bookinfo();
    for i in 0..5_000u32 {
        let ip = format!("10.96.{}.{}", 100 + i / 250, 1 + i % 250);
        api.apply_silently(SERVICES, service("bulk", &format!("svc-{i:04}"), &ip));
    }
    let running = start(&api, config());
    let snap = running
        .wait_for("5,001 services", |s| s.services.len() == 5_001)
        .await;
    assert_eq!(snap.version, 1, "published once, after the last page");
    assert_eq!(
        snap.service_by_ip(ip("10.96.100.1")).unwrap().key,
        key("bulk", "svc-0000")
    );
    assert_eq!(
        snap.service_by_ip(ip("10.96.119.250")).unwrap().key,
        key("bulk", "svc-4999")
    );
    assert!(snap.services[&key("bulk", "svc-2500")].ports[0].port == 9080);
    let pages: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| is_list(r, SERVICES))
        .collect();
    assert_eq!(pages.len(), 11, "{pages:#?}");
    assert!(pages[0].contains("limit=500") && !pages[0].contains("continue="));
    for (i, page) in pages.iter().enumerate().skip(1) {
        assert!(page.contains(&format!("continue={}", i * 500)), "{page}");
    }
    running.stop().await;
}

#[tokio::test]
async fn missing_crds_are_ignored_while_the_others_apply() {
    let api = bookinfo();
    api.serve_crd(
        "networking.istio.io",
        "v1",
        "virtualservices",
        "VirtualService",
    );
    api.serve_crd(
        "networking.istio.io",
        "v1",
        "destinationrules",
        "DestinationRule",
    );
    api.serve_crd(
        "networking.istio.io",
        "v1",
        "serviceentries",
        "ServiceEntry",
    );
    api.serve_crd(
        "networking.istio.io",
        "v1alpha3",
        "virtualservices",
        "VirtualService",
    );
    // An older Istio: security served as v1beta1 only.
    api.serve_crd(
        "security.istio.io",
        "v1beta1",
        "authorizationpolicies",
        "AuthorizationPolicy",
    );
    api.serve_crd(
        "security.istio.io",
        "v1beta1",
        "peerauthentications",
        "PeerAuthentication",
    );
    api.apply(
        "/apis/networking.istio.io/v1/virtualservices",
        virtual_service("bookinfo", "reviews", "networking.istio.io/v1"),
    );
    api.apply(
        "/apis/security.istio.io/v1beta1/authorizationpolicies",
        json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "deny-all", "namespace": "bookinfo"}, "spec": {}}),
    );
    // Gateway API is not installed at all.
    let logs = Logs::capture();
    let running = start(&api, config());
    let snap = running.wait_for("the first snapshot", |_| true).await;

    // The core objects apply although two CRDs are missing.
    assert!(snap.is_meshed(&snap.pods[&key("bookinfo", "productpage-0")]));
    assert_eq!(snap.endpoints(&key("bookinfo", "reviews"), 9080).len(), 2);
    let vs = running.watch("networking.istio.io/* VirtualService");
    assert_eq!((vs.state, vs.objects), (WatchState::Synced, 1));
    let ap = running.watch("security.istio.io/* AuthorizationPolicy");
    assert_eq!((ap.state, ap.objects), (WatchState::Synced, 1));
    let route = running.watch("gateway.networking.k8s.io/* HTTPRoute");
    assert_eq!(route.state, WatchState::NotInstalled);
    let requests = api.requests();
    // v1 preferred over v1alpha3; v1beta1 when that is all there is.
    assert!(requests
        .iter()
        .any(|r| r.starts_with("GET /apis/networking.istio.io/v1/virtualservices?")));
    assert!(!requests
        .iter()
        .any(|r| r.starts_with("GET /apis/networking.istio.io/v1alpha3/virtualservices?")));
    assert!(requests
        .iter()
        .any(|r| r.starts_with("GET /apis/security.istio.io/v1beta1/authorizationpolicies?")));
    assert!(!requests.iter().any(|r| r.contains("/httproutes")));
    assert!(running.source_status.rejected().is_empty());
    // Translated like the same YAML from a directory (v1beta1 read as the same schema).
    assert!(snap
        .virtual_services
        .contains_key(&key("bookinfo", "reviews")));
    assert!(snap
        .authorization_policies
        .contains_key(&key("bookinfo", "deny-all")));
    assert!(snap.http_routes.is_empty());

    // Installed later: picked up without a restart, and logged as missing only once.
    api.serve_crd("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute");
    api.apply(
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "reviews", "namespace": "bookinfo"},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}]}}),
    );
    eventually("HTTPRoute watched", || {
        running.watch("gateway.networking.k8s.io/* HTTPRoute")
            == WatchReport {
                resource: "gateway.networking.k8s.io/* HTTPRoute".into(),
                state: WatchState::Synced,
                objects: 1,
            }
    })
    .await;
    assert_eq!(
        running.watch("gateway.networking.k8s.io/* GRPCRoute").state,
        WatchState::NotInstalled
    );
    let snap = running
        .wait_for("the HTTPRoute in the model", |s| {
            s.http_routes.contains_key(&key("bookinfo", "reviews"))
        })
        .await;
    assert!(snap
        .virtual_services
        .contains_key(&key("bookinfo", "reviews")));
    let text = logs.text();
    let missing = text
        .lines()
        .filter(|l| l.contains("CRD not installed") && l.contains("GRPCRoute"))
        .count();
    assert_eq!(missing, 1, "{text}");
    running.stop().await;
}

#[tokio::test]
async fn rejected_resource_gets_an_event_and_keeps_its_last_good_version() {
    let api = FakeApi::new();
    api.apply(NAMESPACES, namespace("bookinfo", true));
    // Only this node exists, so it is the one that reports.
    api.apply(NODES, node("n1", "172.18.0.2"));
    let mut bad = service("bookinfo", "reviews", "10.96.0.12");
    bad["spec"]["ports"][0]["targetPort"] = json!(-3);
    api.apply(SERVICES, bad.clone());
    api.apply(SERVICES, service("bookinfo", "ratings", "10.96.0.14"));
    let running = start(&api, config());
    let snap = running.wait_for("the first snapshot", |_| true).await;

    // Rejected alone: the other Service applies.
    assert!(!snap.services.contains_key(&key("bookinfo", "reviews")));
    assert!(snap.services.contains_key(&key("bookinfo", "ratings")));
    let rejected = running.source_status.rejected();
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (
            rejected[0].kind.as_str(),
            rejected[0].name.as_str(),
            rejected[0].field.as_str()
        ),
        ("Service", "bookinfo/reviews", "spec.ports[0].targetPort")
    );
    eventually("the Event", || !api.events().is_empty()).await;
    let event = &api.events()[0];
    assert_eq!(event["reason"], "Rejected");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reportingController"], "weft.io/mesh-node");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["name"], "reviews");
    assert_eq!(event["regarding"]["namespace"], "bookinfo");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("spec.ports[0].targetPort: expected a port number"),
        "{note}"
    );

    // Fixed: applies. Broken again: the fixed version stays in force.
    api.apply(SERVICES, service("bookinfo", "reviews", "10.96.0.12"));
    running
        .wait_for("the fixed Service", |s| {
            s.services.contains_key(&key("bookinfo", "reviews"))
        })
        .await;
    assert!(running.source_status.rejected().is_empty());
    let mut broken = service("bookinfo", "reviews", "10.96.0.99");
    broken["spec"]["ports"][0]["port"] = json!(70_000);
    api.apply(SERVICES, broken);
    eventually("the second rejection", || {
        running.source_status.rejected().len() == 1
    })
    .await;
    let snap = running.store.current();
    assert_eq!(
        snap.services[&key("bookinfo", "reviews")].cluster_ip,
        Some(ip("10.96.0.12"))
    );
    assert!(running.source_status.rejected()[0].kept_last_good);
    eventually("the second Event", || api.events().len() == 2).await;
    assert!(api.events()[1]["note"]
        .as_str()
        .unwrap()
        .ends_with("(the last good version stays in force)"));
    running.stop().await;
}

#[tokio::test]
async fn nothing_is_published_before_every_watch_listed() {
    let api = bookinfo();
    api.go_down();
    let running = start(&api, config());
    eventually("retries", || api.refused() >= 10).await;
    assert_eq!(running.store.current().version, 0);
    api.come_back();
    let snap = running.wait_for("the first snapshot", |_| true).await;
    assert_eq!(snap.version, 1);
    assert_eq!(snap.pods.len(), 3);
    running.stop().await;
}

fn is_list(request: &str, collection: &str) -> bool {
    request.starts_with(&format!("GET {collection}?")) && !request.contains("watch=true")
}

fn count(requests: &[String], f: impl Fn(&str) -> bool) -> usize {
    requests.iter().filter(|r| f(r)).count()
}

/// Log lines of the test's own thread (`#[tokio::test]` runs every task on it).
struct Logs {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    fn capture() -> Self {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info,kube_runtime=error")
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            buffer,
            _guard: guard,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
