//! Admin (15020: `/metrics`, `/debug/*`) and health (15021: `/healthz`, `/ready`) servers.
//!
//! Each runs on a thread and runtime of its own, away from the data-plane threads and from
//! each other, and reads only atomics and the current snapshot, so a slow scraper holds up
//! neither connections nor kubelet's probes. Each server holds at most 64 connections, each
//! for at most a minute, with request heads of at most 16 KiB read within 10 s: any pod
//! reaches these ports on the node's address.
//!
//! The admin port answers `/metrics` (what Prometheus scrapes) on every address, and the rest
//! (`/debug/config`: every pod, label, service account and rule of the mesh; `/debug/status`,
//! `/debug/routes`, `/debug/clusters`, `/debug/endpoints`, `/debug/policies` and
//! `/debug/explain`, which `meshctl` reads) only to clients of the node's loopback: the
//! connection made to a loopback address from a loopback address, with a loopback name in
//! `Host` (a browser on the node cannot be turned against it by a name that resolves to
//! 127.0.0.1) — `127.0.0.1:15020` on the node, where operators and the node's own tools reach
//! it — as Istio keeps Envoy's admin port local. The kernel never delivers a packet from
//! another host or a pod's network namespace to the node's loopback; with `hostNetwork` (the
//! DaemonSet), the node's own processes and host-network pods share that loopback. The
//! `/debug/*` answers walk the whole configuration: they are computed off the admin's thread,
//! one at a time.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, info};

use crate::{
    metrics::{self, Metrics},
    model::{
        authz::policies_for, policy::ROOT_NAMESPACE, ObjectKey, Snapshot, TargetPort,
        CGROUP_ANNOTATION,
    },
    proxy::inspect::{Inspector, Question},
    source::SourceStatus,
};

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} for the {server} server: {source} (is another process using the port?)")]
    Bind {
        server: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What `/ready` waits for. Each part is set by the component it describes.
#[derive(Debug)]
pub struct Readiness {
    ebpf_required: bool,
    /// The eBPF programs are loaded and attached.
    pub ebpf_attached: AtomicBool,
    /// Snapshot version the eBPF map sync has applied.
    pub ebpf_applied_version: Arc<AtomicU64>,
    /// Snapshot version the proxy has applied.
    pub proxy_applied_version: Arc<AtomicU64>,
    /// The proxy's listeners are bound.
    pub proxy_listening: AtomicBool,
    /// The next mesh-node of the node holds the listening sockets too and is starting: this
    /// one answers not ready, so that probes (which reach either) tell the two apart.
    pub handing_over: AtomicBool,
}

impl Readiness {
    /// `ebpf_required` is false with `--no-ebpf`: readiness then waits for the proxy's own
    /// configuration instead of the eBPF sync.
    pub fn new(ebpf_required: bool) -> Self {
        Self {
            ebpf_required,
            ebpf_attached: AtomicBool::new(false),
            ebpf_applied_version: Arc::default(),
            proxy_applied_version: Arc::default(),
            proxy_listening: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
        }
    }

    pub fn ebpf_required(&self) -> bool {
        self.ebpf_required
    }

    /// `Err(reason)` while not ready.
    pub fn check(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if self.handing_over.load(Ordering::Acquire) {
            missing.push("the node is being handed over to the next mesh-node".to_owned());
        }
        if self.ebpf_required {
            if !self.ebpf_attached.load(Ordering::Acquire) {
                missing.push("the eBPF programs are not attached".to_owned());
            }
            if self.ebpf_applied_version.load(Ordering::Acquire) < 1 {
                missing.push("the eBPF sync has not applied a configuration yet".to_owned());
            }
        } else if self.proxy_applied_version.load(Ordering::Acquire) < 1 {
            missing.push("the proxy has not applied a configuration yet".to_owned());
        }
        if !self.proxy_listening.load(Ordering::Acquire) {
            missing.push("the proxy listeners are not bound".to_owned());
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not ready: {}", missing.join("; ")))
        }
    }
}

/// Everything the admin server reports.
pub struct AdminState {
    pub store: crate::model::Store,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub source: Arc<SourceStatus>,
    /// The node proxy, once it serves.
    pub proxy: Arc<OnceLock<Inspector>>,
    /// The eBPF programs attached (`None`: none are, `--no-ebpf` or a sidecar).
    pub programs: Option<Programs>,
    pub node: String,
    pub started: Instant,
    /// One inspection (`/debug/*`) at a time.
    pub inspecting: Arc<Semaphore>,
}

/// Lists the eBPF programs attached.
pub type Programs = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// The metrics `meshctl status` shows when they are not zero: what goes wrong.
const TROUBLE: [&str; 11] = [
    "weft_config_rejected_total",
    "weft_ebpf_errors_total",
    "weft_ebpf_inbound_no_listener_total",
    "weft_mtls_refused_total",
    "weft_certificate_requests_total",
    "weft_authz_decisions_total",
    "weft_source_limit_refused_total",
    "weft_overload_level",
    "weft_overload_refused_total",
    "weft_overload_closed_total",
    "weft_telemetry_dropped_total",
];

pub async fn bind(server: &'static str, addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind {
            server,
            addr,
            source,
        })
}

/// Serves `/metrics` and the operators' `/debug/*` until `shutdown` completes.
pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()>,
) {
    serve(
        "admin",
        listener,
        move |req, local| admin(&state, req, local),
        shutdown,
    )
    .await;
}

/// Serves `/healthz` and `/ready` until `shutdown` completes.
pub async fn serve_health(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    serve(
        "health",
        listener,
        move |req, _| Box::pin(std::future::ready(health(&readiness, req))),
        shutdown,
    )
    .await;
}

/// Connections one server holds at once; more are closed at accept. Prometheus, kubelet and
/// an operator need a few: whoever opens more (any pod reaches the node's address) must not
/// hold the thread's memory or the probes' turn.
const MAX_CONNECTIONS: usize = 64;
/// How long one connection may last, requests included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a request head may take to arrive.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a connection buffers of a request (a head is far smaller).
const MAX_BUFFER: usize = 16 * 1024;

/// How long a `/debug/*` request waits for the one before it.
const INSPECTION_WAIT: Duration = Duration::from_secs(30);

/// An answer, ready or on its way.
type Answer = BoxFuture<'static, Response<Full<Bytes>>>;

async fn serve<H>(
    server: &'static str,
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(&Request<Incoming>, Local) -> Answer + Send + Sync + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "{server} server listening");
    }
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "{server} server: accept failed");
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "{server} server: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        };
        let handler = handler.clone();
        // Made to the node's loopback, from it: not from a pod, nor from another host.
        let local = match stream.local_addr() {
            Ok(addr) if addr.ip().is_loopback() && peer.ip().is_loopback() => Local::Loopback,
            _ => Local::Other,
        };
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let answer = handler(&req, local);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_BUFFER)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "{server} server: connection error"),
                Err(_) => {
                    debug!(%peer, "{server} server: connection closed after {CONNECTION_LIFETIME:?}")
                }
                Ok(Ok(())) => {}
            }
        });
    }
}

/// The kind of address a connection was made to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    Loopback,
    Other,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.into())
}

fn response(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .expect("static response parts are valid")
}

fn only_get(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    (req.method() != Method::GET)
        .then(|| text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n"))
}

/// Whether the request names the node's loopback as its host (`127.0.0.1`, `[::1]`,
/// `localhost`, any port): a page a browser on the node loads from another name cannot read
/// `/debug/*` through a name that resolves to 127.0.0.1 (DNS rebinding).
fn loopback_host(req: &Request<Incoming>) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn now(response: Response<Full<Bytes>>) -> Answer {
    Box::pin(std::future::ready(response))
}

fn admin(state: &Arc<AdminState>, req: &Request<Incoming>, local: Local) -> Answer {
    if let Some(refused) = only_get(req) {
        return now(refused);
    }
    let path = req.uri().path();
    if matches!(path, "/metrics" | "/stats/prometheus") {
        return now(response(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            state.metrics.encode().into(),
        ));
    }
    if local == Local::Other || !loopback_host(req) {
        return now(text(
            StatusCode::FORBIDDEN,
            "only /metrics answers on this address; the rest of the admin answers on the node's loopback (127.0.0.1:15020), to its own clients\n",
        ));
    }
    let inspection = match path {
        "/debug/config" | "/debug/status" => None,
        "/debug/routes" | "/debug/clusters" | "/debug/endpoints" | "/debug/policies"
        | "/debug/explain" => match state.proxy.get() {
            Some(proxy) => Some(proxy.clone()),
            None => {
                return now(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the proxy does not serve yet\n",
                ))
            }
        },
        "/" => return now(text(StatusCode::OK, format!("Weft node admin: {PATHS}\n"))),
        _ => {
            return now(text(
                StatusCode::NOT_FOUND,
                format!("not found: try {PATHS}\n"),
            ))
        }
    };
    // The rest walks the whole configuration: off this thread (which answers `/metrics`),
    // one at a time.
    let (state, path) = (state.clone(), path.to_owned());
    let query = req.uri().query().unwrap_or("").to_owned();
    Box::pin(async move {
        let turn =
            tokio::time::timeout(INSPECTION_WAIT, state.inspecting.clone().acquire_owned()).await;
        let Ok(Ok(turn)) = turn else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "other inspections are running: try again\n",
            );
        };
        let work = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            match (path.as_str(), inspection) {
                ("/debug/config", _) => json_response(StatusCode::OK, &debug_config(&state)),
                ("/debug/status", _) => json_response(StatusCode::OK, &status(&state)),
                (_, None) => text(StatusCode::NOT_FOUND, "not found\n"),
                ("/debug/routes", Some(proxy)) => json_response(StatusCode::OK, &proxy.routes()),
                ("/debug/clusters", Some(proxy)) => {
                    json_response(StatusCode::OK, &proxy.clusters())
                }
                ("/debug/endpoints", Some(proxy)) => {
                    json_response(StatusCode::OK, &proxy.endpoints())
                }
                ("/debug/policies", Some(proxy)) => {
                    json_response(StatusCode::OK, &proxy.policies())
                }
                (_, Some(proxy)) => match proxy.explain(&question(&query)) {
                    Ok(explanation) => json_response(StatusCode::OK, &json!(explanation)),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
            }
        });
        work.await
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "the inspection failed\n"))
    })
}

const PATHS: &str = "/metrics /debug/config /debug/status /debug/routes /debug/clusters /debug/endpoints /debug/policies /debug/explain?from=NS/POD&url=URL[&method=M][&header=H]";

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    response(status, "application/json", body.into())
}

/// `/debug/explain`'s query: `from`, `url`, `method`, and `header` as often as needed.
fn question(query: &str) -> Question {
    let mut question = Question::default();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "from" => question.from = value.into_owned(),
            "url" => question.url = value.into_owned(),
            "method" => question.method = Some(value.into_owned()),
            "header" => question.headers.push(value.into_owned()),
            _ => {}
        }
    }
    question
}

/// `/debug/status`: the node, its readiness, the configuration each consumer applied, the
/// programs attached, the certificates held and the counters of trouble that are not zero.
pub fn status(state: &AdminState) -> Value {
    let snapshot = state.store.current();
    let ready = state.readiness.check();
    let rejected = state.source.rejected();
    let trouble = trouble(&state.metrics.encode());
    json!({
        "node": state.node,
        "meshNodes": snapshot.nodes.keys().map(ToString::to_string).collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "ready": ready.is_ok(),
        "notReady": ready.err(),
        "config": {
            "version": snapshot.version,
            "proxy": state.readiness.proxy_applied_version.load(Ordering::Acquire),
            "ebpf": state.readiness.ebpf_applied_version.load(Ordering::Acquire),
            "rejected": rejected.iter().map(|r| format!("{} {}: {}: {}", r.kind, r.name, r.field, r.reason)).collect::<Vec<_>>(),
        },
        "ebpfRequired": state.readiness.ebpf_required(),
        "programs": state.programs.as_ref().map(|list| list()),
        "certificates": state.proxy.get().and_then(Inspector::certificates),
        "trouble": trouble,
    })
}

fn health(readiness: &Readiness, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = only_get(req) {
        return refused;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" | "/healthz/ready" => match readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz or /ready\n"),
    }
}

/// `{"version", "generation", "applied": {"proxy", "ebpf"}, "resources": [{"kind", "namespace",
/// "name", "status": "accepted"|"rejected", "reason", ...}]}`. A rejected resource whose last good
/// version stays in force is listed once, as rejected, with `"inForce": "last good version"`.
pub fn debug_config(state: &AdminState) -> Value {
    let snapshot = state.store.current();
    let mut resources = resources(&snapshot);
    for entry in &mut resources {
        entry["status"] = json!("accepted");
    }
    merge_rejections(&mut resources, &state.source.rejected());
    json!({
        "version": snapshot.version,
        "generation": snapshot.generation,
        "applied": {
            "proxy": state.readiness.proxy_applied_version.load(Ordering::Acquire),
            "ebpf": state.readiness.ebpf_applied_version.load(Ordering::Acquire),
        },
        "resources": resources,
    })
}

/// The samples of [`TROUBLE`] metrics in `exposition` that are not zero, except outcomes that
/// are no trouble (certificates issued, requests allowed).
fn trouble(exposition: &str) -> Vec<Value> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            let value: f64 = value.parse().ok()?;
            let benign = ["issued", "allowed", "audited", "dry_run_allowed"]
                .iter()
                .any(|r| series.contains(&format!("result=\"{r}\"")));
            (TROUBLE.contains(&name) && value != 0.0 && !benign)
                .then(|| json!({"metric": series, "value": value}))
        })
        .collect()
}

fn merge_rejections(resources: &mut Vec<Value>, rejected: &[crate::source::Rejection]) {
    for r in rejected {
        let (namespace, name) = match r.name.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, r.name.as_str()),
        };
        let reason = format!("{}: {}", r.field, r.reason);
        let same = |e: &&mut Value| {
            e["kind"] == r.kind.as_str()
                && e["name"] == name
                && namespace.is_none_or(|ns| e["namespace"] == ns)
        };
        match resources.iter_mut().find(same) {
            Some(entry) => {
                entry["status"] = json!("rejected");
                entry["reason"] = json!(reason);
                entry["origin"] = json!(r.origin);
                entry["inForce"] = json!("last good version");
            }
            None => resources.push(json!({
                "kind": r.kind,
                "namespace": namespace,
                "name": name,
                "status": "rejected",
                "reason": reason,
                "origin": r.origin,
            })),
        }
    }
}

fn resources(snapshot: &Snapshot) -> Vec<Value> {
    let mut out = Vec::new();

    let mut namespaces: Vec<_> = snapshot.namespaces.values().collect();
    namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(namespaces.into_iter().map(|n| {
        json!({
            "kind": "Namespace",
            "name": &*n.name,
            "labels": n.labels,
            "meshEnabled": n.mesh_enabled(),
        })
    }));

    let mut nodes: Vec<_> = snapshot.nodes.values().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(
        nodes
            .into_iter()
            .map(|n| json!({ "kind": "Node", "name": &*n.name, "address": n.address.to_string() })),
    );

    let mut pods: Vec<_> = snapshot.pods.values().collect();
    pods.sort_by(|a, b| a.key.cmp(&b.key));
    out.extend(pods.into_iter().map(|p| {
        json!({
            "kind": "Pod",
            "namespace": &*p.key.namespace,
            "name": &*p.key.name,
            "uid": p.uid.as_deref(),
            "ip": p.ip.map(|ip| ip.to_string()),
            "node": p.node.as_deref(),
            "serviceAccount": &*p.service_account,
            "labels": p.labels,
            "cgroup": p.annotations.get(CGROUP_ANNOTATION),
            "meshed": snapshot.is_meshed(p),
            "authorizationPolicies": policies_for(snapshot, p, ROOT_NAMESPACE)
                .iter()
                .map(|ap| json!({
                    "policy": ap.key.to_string(),
                    "action": ap.action.as_str(),
                    "dryRun": ap.dry_run,
                }))
                .collect::<Vec<_>>(),
            "ports": p.ports.iter().map(|(name, port)| json!({
                "name": name.as_deref(),
                "containerPort": port,
            })).collect::<Vec<_>>(),
        })
    }));

    let mut services: Vec<_> = snapshot.services.values().collect();
    services.sort_by(|a, b| a.key.cmp(&b.key));
    out.extend(services.into_iter().map(|s| {
        let endpoints = snapshot.endpoints.get(&s.key);
        json!({
            "kind": "Service",
            "namespace": &*s.key.namespace,
            "name": &*s.key.name,
            "clusterIP": s.cluster_ip.map(|ip| ip.to_string()),
            "selector": s.selector,
            "ports": s.ports.iter().map(|p| json!({
                "name": p.name.as_deref(),
                "port": p.port,
                "targetPort": match &p.target_port {
                    TargetPort::Number(n) => json!(n),
                    TargetPort::Name(n) => json!(&**n),
                },
                "protocol": format!("{:?}", p.protocol).to_uppercase(),
                "appProtocol": p.app_protocol.as_deref(),
            })).collect::<Vec<_>>(),
            "endpoints": endpoints.map(|e| e.by_port.iter().map(|(port, list)| {
                (port.to_string(), Value::Array(list.iter().map(|e| json!({
                    "ip": e.ip.to_string(),
                    "port": e.port,
                    "pod": e.pod.as_ref().map(ToString::to_string),
                    "node": e.node.as_deref(),
                    "ready": e.ready,
                })).collect()))
            }).collect::<serde_json::Map<_, _>>()),
        })
    }));

    out.extend(mesh_config(snapshot));
    out
}

/// The traffic rules and policies in force, one line each (the full model is large).
fn mesh_config(snapshot: &Snapshot) -> Vec<Value> {
    fn entries<T>(
        kind: &str,
        map: &crate::model::Map<ObjectKey, Arc<T>>,
        summary: impl Fn(&T) -> Value,
    ) -> Vec<Value> {
        let mut keys: Vec<_> = map.keys().collect();
        keys.sort();
        keys.into_iter()
            .map(|key| {
                let mut entry = json!({
                    "kind": kind,
                    "namespace": &*key.namespace,
                    "name": &*key.name,
                });
                if let (Value::Object(entry), Value::Object(extra)) =
                    (&mut entry, summary(&map[key]))
                {
                    entry.extend(extra);
                }
                entry
            })
            .collect()
    }
    let strings = |list: &[Arc<str>]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut out = vec![json!({
        "kind": "MeshConfig",
        "trustDomainAliases": strings(&snapshot.mesh_config.trust_domain_aliases),
    })];
    out.extend(entries("VirtualService", &snapshot.virtual_services, |vs| {
        json!({"hosts": strings(&vs.hosts), "mesh": vs.applies_to_mesh(), "httpRules": vs.http.len(), "tcpRules": vs.tcp.len()})
    }));
    out.extend(entries("DestinationRule", &snapshot.destination_rules, |dr| {
        json!({"host": &*dr.host, "subsets": dr.subsets.iter().map(|s| s.name.to_string()).collect::<Vec<_>>()})
    }));
    out.extend(entries(
        "ServiceEntry",
        &snapshot.service_entries,
        |se| json!({"hosts": strings(&se.hosts)}),
    ));
    out.extend(entries(
        "AuthorizationPolicy",
        &snapshot.authorization_policies,
        |ap| json!({"action": ap.action.as_str(), "rules": ap.rules.len(), "dryRun": ap.dry_run}),
    ));
    out.extend(entries(
        "PeerAuthentication",
        &snapshot.peer_authentications,
        |pa| json!({"mtls": pa.mtls.as_str()}),
    ));
    let parents = |refs: &[crate::model::traffic::ParentRef]| {
        refs.iter()
            .map(|p| format!("{}/{}", p.kind, p.name))
            .collect::<Vec<_>>()
    };
    out.extend(entries(
        "HTTPRoute",
        &snapshot.http_routes,
        |r| json!({"parentRefs": parents(&r.parent_refs), "rules": r.rules.len()}),
    ));
    out.extend(entries(
        "GRPCRoute",
        &snapshot.grpc_routes,
        |r| json!({"parentRefs": parents(&r.parent_refs), "rules": r.rules.len()}),
    ));
    out
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        model::Store,
        source::{assemble, objects},
    };

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        ask(addr, "GET", path, "127.0.0.1:15020").await
    }

    async fn ask(addr: SocketAddr, method: &str, path: &str, host: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        // 0: closed without an answer.
        let status = response.get(9..12).map_or(0, |s| s.parse().unwrap());
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn readiness_reasons() {
        let r = Readiness::new(true);
        let reason = r.check().unwrap_err();
        assert!(
            reason.contains("eBPF programs are not attached"),
            "{reason}"
        );
        assert!(reason.contains("listeners are not bound"), "{reason}");
        r.ebpf_attached.store(true, Ordering::Release);
        r.proxy_listening.store(true, Ordering::Release);
        assert!(r.check().unwrap_err().contains("eBPF sync has not applied"));
        r.ebpf_applied_version.store(1, Ordering::Release);
        assert_eq!(r.check(), Ok(()));

        let r = Readiness::new(false);
        r.proxy_listening.store(true, Ordering::Release);
        assert!(r.check().unwrap_err().contains("proxy has not applied"));
        r.proxy_applied_version.store(3, Ordering::Release);
        assert_eq!(r.check(), Ok(()));
    }

    /// What `/debug/config` lists for the resources of a YAML `List`.
    fn listed(docs: &str) -> Vec<Value> {
        let value = crate::source::yaml::parse(docs).unwrap();
        let objects: Vec<_> = objects::translate(&value)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        resources(&assemble(&objects, None))
    }

    #[test]
    fn the_authorization_policies_in_force_are_listed_per_pod() {
        let docs = "apiVersion: v1\nkind: List\nitems:\n\
            - {apiVersion: v1, kind: Pod, metadata: {name: httpbin-1, namespace: foo, labels: {app: httpbin}}, spec: {nodeName: n1, containers: [{name: app}]}, status: {podIP: 10.244.1.5}}\n\
            - {apiVersion: v1, kind: Service, metadata: {name: web, namespace: foo}, spec: {clusterIP: 10.96.0.9, selector: {app: httpbin}, ports: [{port: 80}]}}\n\
            - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: mesh, namespace: istio-system}, spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}}\n\
            - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: by-service, namespace: foo, annotations: {istio.io/dry-run: 'true'}}, spec: {targetRefs: [{kind: Service, group: '', name: web}], rules: [{}]}}\n\
            - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: others, namespace: foo}, spec: {selector: {matchLabels: {app: other}}}}\n\
            - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: elsewhere, namespace: bar}, spec: {}}\n";
        let listed = listed(docs);
        let pod = listed.iter().find(|r| r["kind"] == "Pod").unwrap();
        assert_eq!(
            pod["authorizationPolicies"],
            json!([
                {"policy": "foo/by-service", "action": "ALLOW", "dryRun": true},
                {"policy": "istio-system/mesh", "action": "DENY", "dryRun": false},
            ])
        );
    }

    #[test]
    fn mesh_config_is_listed() {
        let docs = "apiVersion: v1\nkind: List\nitems:\n\
            - {apiVersion: networking.istio.io/v1, kind: VirtualService, metadata: {name: reviews, namespace: bookinfo}, spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v2}}]}]}}\n\
            - {apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: default, namespace: bookinfo}, spec: {mtls: {mode: STRICT}}}\n\
            - {apiVersion: v1, kind: ConfigMap, metadata: {name: istio, namespace: istio-system}, data: {mesh: 'trustDomainAliases: [old-td]'}}\n";
        let listed = listed(docs);
        assert_eq!(
            listed,
            [
                json!({"kind": "MeshConfig", "trustDomainAliases": ["old-td"]}),
                json!({"kind": "VirtualService", "namespace": "bookinfo", "name": "reviews",
                       "hosts": ["reviews"], "mesh": true, "httpRules": 1, "tcpRules": 0}),
                json!({"kind": "PeerAuthentication", "namespace": "bookinfo", "name": "default", "mtls": "STRICT"}),
            ]
        );
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let store = Store::new();
        let docs = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {weft.io/mesh: enabled}}";
        let value = crate::source::yaml::parse(docs).unwrap();
        let objects: Vec<_> = objects::translate(&value)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        store.publish(assemble(&objects, Some(7)));

        let readiness = Arc::new(Readiness::new(false));
        let proxy: Arc<OnceLock<Inspector>> = Arc::default();
        let state = Arc::new(AdminState {
            store: store.clone(),
            metrics: Arc::new(Metrics::new().with_config(
                store.clone(),
                [
                    ("proxy", readiness.proxy_applied_version.clone()),
                    ("ebpf", readiness.ebpf_applied_version.clone()),
                ],
            )),
            readiness: readiness.clone(),
            source: Arc::default(),
            proxy: proxy.clone(),
            programs: None,
            node: "node-1".into(),
            started: Instant::now(),
            inspecting: Arc::new(Semaphore::new(1)),
        });
        let admin_listener = bind("admin", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let health_listener = bind("health", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let health_addr = health_listener.local_addr().unwrap();
        tokio::spawn(serve_admin(admin_listener, state, std::future::pending()));
        tokio::spawn(serve_health(
            health_listener,
            readiness.clone(),
            std::future::pending(),
        ));

        assert_eq!(get(health_addr, "/healthz").await.0, 200);
        let (status, body) = get(health_addr, "/ready").await;
        assert_eq!(status, 503);
        assert!(body.contains("listeners are not bound"), "{body}");
        readiness.proxy_listening.store(true, Ordering::Release);
        readiness.proxy_applied_version.store(1, Ordering::Release);
        assert_eq!(get(health_addr, "/ready").await, (200, "ready\n".into()));

        let (status, body) = get(admin_addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("weft_config_version 1\n"), "{body}");
        assert!(
            body.contains("weft_config_applied_version{consumer=\"proxy\"} 1\n"),
            "{body}"
        );

        let (status, body) = get(admin_addr, "/debug/config").await;
        assert_eq!(status, 200);
        let config: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(config["version"], 1);
        assert_eq!(config["generation"], 7);
        assert_eq!(config["applied"], json!({"proxy": 1, "ebpf": 0}));
        assert_eq!(config["resources"][0]["kind"], "Namespace");
        assert_eq!(config["resources"][0]["meshEnabled"], true);
        assert_eq!(config["resources"][0]["status"], "accepted");

        assert_eq!(get(admin_addr, "/nope").await.0, 404);

        let (status, body) = get(admin_addr, "/debug/status").await;
        assert_eq!(status, 200);
        let status: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["node"], "node-1");
        assert_eq!(status["ready"], true);
        assert_eq!(status["config"]["proxy"], 1);
        assert_eq!(status["programs"], Value::Null);

        // Until the proxy serves, what it runs cannot be read.
        assert_eq!(get(admin_addr, "/debug/routes").await.0, 503);
        let _ = proxy.set(Inspector::offline((*store.current()).clone()));
        let (status, body) = get(admin_addr, "/debug/routes").await;
        assert_eq!((status, body.trim()), (200, "[]"));
        let (status, body) = get(
            admin_addr,
            "/debug/explain?from=demo%2Fweb&url=http%3A%2F%2Fweb%2F&header=end-user%3A+jason",
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (400, "no pod demo/web in the mesh's configuration\n")
        );
        let (status, body) = get(admin_addr, "/debug/explain?url=http://web/").await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("--from must be NAMESPACE/POD"), "{body}");

        // Another name for the loopback (DNS rebinding) gets /metrics only; so does a HEAD.
        for host in [
            "evil.example",
            "evil.example:15020",
            "127.0.0.1.evil.example",
        ] {
            assert_eq!(ask(admin_addr, "GET", "/debug/status", host).await.0, 403);
            assert_eq!(ask(admin_addr, "GET", "/metrics", host).await.0, 200);
        }
        for host in ["localhost:15020", "[::1]:15020", "127.0.0.1"] {
            assert_eq!(ask(admin_addr, "GET", "/debug/status", host).await.0, 200);
        }
        assert_eq!(
            ask(admin_addr, "HEAD", "/metrics", "127.0.0.1").await.0,
            405
        );
    }

    #[test]
    fn status_shows_counters_of_trouble_only() {
        let exposition = "# HELP weft_mtls_refused_total x\n\
            weft_mtls_refused_total{reason=\"plaintext\"} 3\n\
            weft_mtls_refused_total{reason=\"expired\"} 0\n\
            weft_authz_decisions_total{action=\"ALLOW\",policy=\"none\",result=\"denied\"} 1\n\
            weft_authz_decisions_total{action=\"ALLOW\",policy=\"ns/p\",result=\"allowed\"} 9\n\
            weft_certificate_requests_total{result=\"issued\"} 4\n\
            weft_overload_level 0\n\
            weft_config_version 7\n";
        assert_eq!(
            trouble(exposition),
            [
                json!({"metric": "weft_mtls_refused_total{reason=\"plaintext\"}", "value": 3.0}),
                json!({"metric": "weft_authz_decisions_total{action=\"ALLOW\",policy=\"none\",result=\"denied\"}", "value": 1.0}),
            ]
        );
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_accept() {
        let readiness = Arc::new(Readiness::new(false));
        let listener = bind("health", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_health(listener, readiness, std::future::pending()));
        // Connections that send nothing hold every slot.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, _) = get(addr, "/healthz").await;
        assert_eq!(status, 0, "a connection past the cap was served");
        // A slot given back serves the next client.
        held.pop();
        let deadline = Instant::now() + Duration::from_secs(5);
        while get(addr, "/healthz").await.0 != 200 {
            assert!(Instant::now() < deadline, "no slot came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn rejections_are_listed_with_their_reason() {
        let rejection = |name: &str, kept| crate::source::Rejection {
            origin: "rules.yaml:3".into(),
            kind: "VirtualService".into(),
            name: name.into(),
            field: "spec.http[0].route[1].weight".into(),
            reason: "must not be negative".into(),
            kept_last_good: kept,
            failed_closed: false,
        };
        let mut resources = vec![json!({
            "kind": "VirtualService", "namespace": "bookinfo", "name": "reviews", "status": "accepted",
        })];
        merge_rejections(
            &mut resources,
            &[
                rejection("bookinfo/reviews", true),
                rejection("bookinfo/ratings", false),
            ],
        );
        assert_eq!(resources[0]["status"], "rejected");
        assert_eq!(resources[0]["inForce"], "last good version");
        assert_eq!(
            resources[0]["reason"],
            "spec.http[0].route[1].weight: must not be negative"
        );
        assert_eq!(
            resources[1],
            json!({"kind": "VirtualService", "namespace": "bookinfo", "name": "ratings",
                   "status": "rejected", "origin": "rules.yaml:3",
                   "reason": "spec.http[0].route[1].weight: must not be negative"})
        );
    }
}
