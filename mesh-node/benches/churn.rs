//! Config churn: new-connection latency through the proxy while the configuration changes.
//!
//! The proxy runs as `mesh-node run` runs it: its listeners on a multi-thread data runtime with
//! two workers, fed by a [`Store`] that another thread publishes to, as the control runtime
//! does. The configuration is the control-plane scale one (10,000 Services × 10 endpoints, 1,000
//! VirtualServices with a header match, an 80/20 split, a timeout and retries, 2,000
//! AuthorizationPolicies) plus one `echo` Service whose endpoints are TCP echo servers on
//! 127.0.0.1. Every client connection "dialled" that Service (a plain `tcp-echo` port, so
//! there is no protocol sniffing): it writes a few bytes and reads them back.
//!
//! New connections arrive at a fixed rate, each latency measured from the time it was due to
//! start (so a stalled proxy cannot hide by slowing the client down) to the echo. Seconds
//! without changes (the baseline) alternate with seconds in which the configuration changes
//! ten times a second, alternating one Service's endpoints moving and one VirtualService's
//! weights changing; each connection counts in the window of the second it was due in. For
//! every change it also reports how long the proxy took to apply it (publish → the proxy's
//! `applied` version reaches it).
//!
//! Run with `cargo xtask bench churn` (or `cargo bench -p mesh-node --bench churn`). Everything
//! is on loopback; no root needed. Settings: WEFT_CHURN_SERVICES, WEFT_CHURN_ROUTES,
//! WEFT_CHURN_POLICIES, WEFT_CHURN_RATE (new connections per second), WEFT_CHURN_SECS (seconds
//! per window), WEFT_CHURN_CHANGES (changes per second), WEFT_CHURN_OUT (the JSON file; default
//! `target/bench/churn.json`).

use std::{
    collections::VecDeque,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use mesh_node::{
    metrics::Metrics,
    model::{ObjectKey, OriginalDst, Snapshot, Store},
    proxy::{Proxy, ProxyConfig},
    source::{assemble, objects::translate, Object},
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACE: &str = "scale";
/// The Service every client dials.
const ECHO_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 7000);
/// What each client writes and expects back.
const PAYLOAD: &[u8] = b"weft churn 0123";
/// How long one connection may take before it counts as failed.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Load before the measured windows: connections, views and allocator warm up.
const WARMUP: Duration = Duration::from_secs(2);
/// How often the lag watcher reads the proxy's applied version.
const WATCH_INTERVAL: Duration = Duration::from_micros(100);
/// How long the lag watcher waits, after the last change, for the proxy to apply it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

struct Settings {
    services: usize,
    routes: usize,
    policies: usize,
    rate: u64,
    window: Duration,
    changes_per_sec: u64,
    echo_servers: usize,
    out: PathBuf,
}

impl Settings {
    fn from_env() -> Self {
        fn env_or(name: &str, default: u64) -> u64 {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        }
        let out = std::env::var_os("WEFT_CHURN_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let package = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
                let workspace = package.parent().map(PathBuf::from).unwrap_or(package);
                workspace.join("target/bench/churn.json")
            });
        Self {
            services: env_or("WEFT_CHURN_SERVICES", 10_000) as usize,
            routes: env_or("WEFT_CHURN_ROUTES", 1_000) as usize,
            policies: env_or("WEFT_CHURN_POLICIES", 2_000) as usize,
            rate: env_or("WEFT_CHURN_RATE", 500).max(1),
            window: Duration::from_secs(env_or("WEFT_CHURN_SECS", 20).max(1)),
            changes_per_sec: env_or("WEFT_CHURN_CHANGES", 10).max(1),
            echo_servers: 4,
            out,
        }
    }
}

// The configuration: the only part that knows how snapshots are made.

fn service_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn endpoint_ip(service: usize, n: usize) -> String {
    let flat = service * 10 + n;
    format!(
        "10.{}.{}.{}",
        128 + flat / 65_000,
        (flat / 250) % 260 % 256,
        flat % 250 + 1
    )
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": NAMESPACE},
        "spec": {"clusterIP": service_ip(i), "selector": {"app": format!("svc-{i}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

/// The EndpointSlice of Service `i`; each `generation` moves its endpoints elsewhere.
fn slice(i: usize, generation: usize) -> Value {
    let endpoints: Vec<Value> = (0..10)
        .map(|n| {
            json!({
                "addresses": [endpoint_ip(i + generation, n)],
                "conditions": {"ready": true},
                "nodeName": if n % 2 == 0 { "node-1" } else { "node-2" },
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// VirtualService `i`: a header match, then a `v1_weight`/rest split with timeout and retries.
fn virtual_service(i: usize, v1_weight: u32) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": format!("route-{i}"), "namespace": NAMESPACE},
        "spec": {
            "hosts": [format!("svc-{i}")],
            "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": format!("svc-{i}"), "subset": "v2"}}]},
                {"route": [
                    {"destination": {"host": format!("svc-{i}"), "subset": "v1"}, "weight": v1_weight},
                    {"destination": {"host": format!("svc-{i}"), "subset": "v2"}, "weight": 100 - v1_weight}],
                 "timeout": "3s",
                 "retries": {"attempts": 3, "perTryTimeout": "1s", "retryOn": "5xx,connect-failure"}},
            ],
        },
    })
}

/// The echo Service: a plain TCP port, one EndpointSlice per echo server (they listen on
/// different ports), no pods behind them, so the proxy dials them directly.
fn echo_service(ports: &[u16]) -> Vec<Value> {
    let mut docs = vec![json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": NAMESPACE},
        "spec": {"clusterIP": ECHO_VIP.ip().to_string(),
                 "ports": [{"name": "tcp-echo", "port": ECHO_VIP.port(), "protocol": "TCP"}]},
    })];
    for (n, port) in ports.iter().enumerate() {
        docs.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("echo-{n}"), "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp-echo", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        }));
    }
    docs
}

fn documents(settings: &Settings, echo_ports: &[u16]) -> Vec<Value> {
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NAMESPACE, "labels": {"weft.io/mesh": "enabled"}}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.11"}]}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-2"},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.12"}]}}),
    ];
    for i in 0..settings.services {
        docs.push(service(i));
        docs.push(slice(i, 0));
    }
    for i in 0..settings.routes {
        docs.push(virtual_service(i, 80));
    }
    for i in 0..settings.policies {
        docs.push(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": format!("policy-{i}"), "namespace": NAMESPACE},
            "spec": {
                "selector": {"matchLabels": {"app": format!("svc-{}", i % settings.services.max(1))}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"principals": ["cluster.local/ns/scale/sa/client"]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
                }],
            },
        }));
    }
    docs.extend(echo_service(echo_ports));
    docs
}

fn objects(docs: &[Value]) -> Vec<Object> {
    docs.iter()
        .map(|d| mesh_node::source::yaml::from_json(d).expect("JSON converts to YAML"))
        .flat_map(|d| translate(&d))
        .map(|r| r.unwrap_or_else(|e| panic!("generated object rejected: {e:?}")))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// One Service's endpoints move to other addresses.
    Endpoints,
    /// One VirtualService's weights change.
    Route,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Endpoints => "endpoints",
            Change::Route => "route",
        }
    }
}

/// The configuration as the control plane holds it: the current snapshot, changed one
/// object at a time.
struct Config {
    current: Snapshot,
    services: usize,
    routes: usize,
}

impl Config {
    fn new(settings: &Settings, echo_ports: &[u16]) -> Self {
        let objects = objects(&documents(settings, echo_ports));
        Self {
            current: assemble(objects.iter(), None),
            services: settings.services,
            routes: settings.routes,
        }
    }

    /// Change number `n` (of its kind) applied to the current snapshot: the snapshot to publish.
    fn change(&mut self, change: Change, n: usize) -> Snapshot {
        match change {
            Change::Endpoints if self.services > 0 => {
                // Spread over the Services; each time to addresses it has not had before.
                let i = n.wrapping_mul(7_919) % self.services;
                let small = assemble(objects(&[service(i), slice(i, n + 1)]).iter(), None);
                let key = ObjectKey::new(NAMESPACE, &format!("svc-{i}"));
                let endpoints = small.endpoints.get(&key).expect("the slice has endpoints");
                self.current.endpoints.insert(key, endpoints.clone());
            }
            Change::Route if self.routes > 0 => {
                let i = n.wrapping_mul(7_919) % self.routes;
                let weight = 50 + (n % 50) as u32;
                for object in objects(&[virtual_service(i, weight)]) {
                    if let Object::VirtualService(v) = object {
                        self.current.virtual_services.insert(v.key.clone(), v);
                    }
                }
            }
            _ => {}
        }
        self.current.clone()
    }
}

// The data path under test and what it talks to.

/// The capture layer: every client dialled the echo Service.
struct DialledEcho;

impl OriginalDst for DialledEcho {
    fn lookup(
        &self,
        _socket: std::os::fd::BorrowedFd<'_>,
        _client: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        Some(ECHO_VIP)
    }
}

/// TCP echo servers on 127.0.0.1, the "pods" behind the echo Service.
fn start_echo_servers(runtime: &tokio::runtime::Runtime, count: usize) -> Vec<u16> {
    (0..count)
        .map(|_| {
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
                .expect("an echo server binds on loopback");
            let port = listener.local_addr().expect("bound").port();
            runtime.spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let (mut r, mut w) = stream.split();
                        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                            let _ = w.shutdown().await;
                        }
                    });
                }
            });
            port
        })
        .collect()
}

/// The proxy on its own data runtime (two workers), served from a thread of its own as
/// `mesh-node run` serves it from the main thread. Returns its outbound address, the thread
/// and the trigger that stops it.
fn start_proxy(
    store: &Store,
    applied: Arc<AtomicU64>,
) -> (
    SocketAddr,
    thread::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = mpsc::channel();
    let snapshots = store.subscribe();
    let handle = thread::Builder::new()
        .name("data-main".into())
        .spawn(move || {
            let data = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("weft-data")
                .enable_all()
                .build()
                .expect("the data runtime starts");
            let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            let mut config = ProxyConfig::new("node-1", Ipv4Addr::LOCALHOST);
            config.outbound_addr = loopback;
            config.inbound_addr = loopback;
            config.tunnel_addr = loopback;
            let metrics = Metrics::new();
            let proxy = data
                .block_on(Proxy::bind(
                    config,
                    snapshots,
                    Arc::new(DialledEcho),
                    &metrics,
                    applied,
                ))
                .expect("the proxy binds on loopback");
            addr_tx
                .send(proxy.addresses().outbound)
                .expect("main waits for the address");
            data.block_on(proxy.run(async {
                let _ = stop_rx.await;
            }));
        })
        .expect("the data thread starts");
    let addr = addr_rx.recv().expect("the proxy reports its address");
    (addr, handle, stop_tx)
}

// The load: new connections at a fixed rate.

/// One connection's outcome: when it was due, and its latency or why it failed.
struct Sample {
    due: Instant,
    result: Result<Duration, String>,
}

/// One new connection through the proxy: connect, write, read the echo back.
async fn exchange(proxy: SocketAddr) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(PAYLOAD)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut echoed = [0u8; PAYLOAD.len()];
    stream
        .read_exact(&mut echoed)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if echoed != PAYLOAD {
        return Err("the echo differs from what was sent".into());
    }
    Ok(())
}

/// Starts connection `k` at `start + k / rate` until `end`, each on the client runtime. A
/// thread of its own keeps the schedule, so a slow connection delays no other.
fn run_load(
    client: &tokio::runtime::Runtime,
    proxy: SocketAddr,
    rate: u64,
    start: Instant,
    end: Instant,
) -> Vec<Sample> {
    let (tx, rx) = mpsc::channel();
    let handle = client.handle().clone();
    let scheduler = thread::Builder::new()
        .name("load".into())
        .spawn(move || {
            let interval_ns = 1_000_000_000 / rate;
            let mut tasks = Vec::new();
            for k in 0.. {
                let due = start + Duration::from_nanos(interval_ns * k);
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                let tx = tx.clone();
                tasks.push(handle.spawn(async move {
                    let result = tokio::time::timeout(CONNECTION_TIMEOUT, exchange(proxy))
                        .await
                        .unwrap_or_else(|_| Err("timed out".into()))
                        .map(|()| due.elapsed());
                    let _ = tx.send(Sample { due, result });
                }));
            }
            tasks
        })
        .expect("the load thread starts");
    let tasks = scheduler.join().expect("the load thread does not panic");
    client.block_on(async {
        for task in tasks {
            let _ = task.await;
        }
    });
    rx.try_iter().collect()
}

// The configuration changes, and how long the proxy takes to apply each.

/// A published change waiting for the proxy.
struct Pending {
    version: u64,
    change: Change,
    published: Instant,
}

#[derive(Default)]
struct Lags {
    pending: VecDeque<Pending>,
    /// (kind, publish → applied)
    applied: Vec<(Change, Duration)>,
}

/// Reads the proxy's applied version every [`WATCH_INTERVAL`] and records, for each published
/// version, when the proxy reached it (or a later one: the proxy may skip versions).
fn watch_applied(
    applied: Arc<AtomicU64>,
    lags: Arc<Mutex<Lags>>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name("lag-watch".into())
        .spawn(move || {
            let mut stopped: Option<Instant> = None;
            loop {
                let version = applied.load(Ordering::Acquire);
                let now = Instant::now();
                let mut lags = lags.lock().expect("not poisoned");
                while lags.pending.front().is_some_and(|p| p.version <= version) {
                    let p = lags.pending.pop_front().expect("checked");
                    lags.applied.push((p.change, now - p.published));
                }
                if stop.load(Ordering::Acquire) {
                    let since = *stopped.get_or_insert(now);
                    if lags.pending.is_empty() || now - since > APPLY_TIMEOUT {
                        break;
                    }
                }
                drop(lags);
                thread::sleep(WATCH_INTERVAL);
            }
        })
        .expect("the lag watcher starts")
}

/// The measured time, cut into one-second slots that alternate between no changes (even
/// slots, the baseline) and changes (odd slots), so the slow drifts of a shared machine hit
/// both windows alike.
#[derive(Clone, Copy)]
struct Slots {
    from: Instant,
    count: u32,
}

impl Slots {
    const SLOT: Duration = Duration::from_secs(1);

    fn end(&self) -> Instant {
        self.from + Self::SLOT * self.count
    }

    /// Whether `t` falls in a slot with changes; `None` outside the measured time.
    fn churning(&self, t: Instant) -> Option<bool> {
        if t < self.from || t >= self.end() {
            return None;
        }
        let slot = (t - self.from).as_nanos() / Self::SLOT.as_nanos();
        Some(slot % 2 == 1)
    }
}

/// Publishes `changes_per_sec` changes a second during the churn slots, alternating the
/// kinds, on a thread of its own (the control runtime's place). Returns the time each
/// snapshot took to make and publish.
fn churn(
    mut config: Config,
    store: Store,
    lags: Arc<Mutex<Lags>>,
    changes_per_sec: u64,
    slots: Slots,
) -> thread::JoinHandle<Vec<Duration>> {
    thread::Builder::new()
        .name("weft-control".into())
        .spawn(move || {
            let interval_ns = 1_000_000_000 / changes_per_sec;
            let mut made = Vec::new();
            let mut k = 0u64;
            for tick in 0.. {
                let due = slots.from + Duration::from_nanos(interval_ns * tick);
                match slots.churning(due) {
                    None => break,
                    Some(false) => continue,
                    Some(true) => {}
                }
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                k += 1;
                let change = if k % 2 == 1 {
                    Change::Endpoints
                } else {
                    Change::Route
                };
                let begun = Instant::now();
                let snapshot = config.change(change, (k - 1) as usize / 2);
                let version = store.publish(snapshot);
                let published = Instant::now();
                made.push(published - begun);
                lags.lock()
                    .expect("not poisoned")
                    .pending
                    .push_back(Pending {
                        version,
                        change,
                        published,
                    });
            }
            made
        })
        .expect("the control thread starts")
}

// Figures.

/// Nearest-rank percentile of sorted `values`.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

struct Window {
    name: &'static str,
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

impl Window {
    /// The samples due in the slots with (`churning`) or without changes.
    fn of(name: &'static str, samples: &[Sample], slots: Slots, churning: bool) -> Self {
        let mut latencies = Vec::new();
        let mut failures = Vec::new();
        for s in samples
            .iter()
            .filter(|s| slots.churning(s.due) == Some(churning))
        {
            match &s.result {
                Ok(latency) => latencies.push(*latency),
                Err(e) => failures.push(e.clone()),
            }
        }
        latencies.sort();
        Self {
            name,
            latencies,
            failures,
        }
    }

    fn row(&self) -> String {
        let p = |q| ms(percentile(&self.latencies, q));
        format!(
            "| {:<8} | {:>11} | {:>6} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} |",
            self.name,
            self.latencies.len(),
            self.failures.len(),
            p(0.5),
            p(0.99),
            p(0.999),
            ms(self.latencies.last().copied().unwrap_or_default()),
        )
    }

    fn json(&self) -> Value {
        let p = |q| ms(percentile(&self.latencies, q));
        json!({
            "connections": self.latencies.len(),
            "failed": self.failures.len(),
            "first_failure": self.failures.first(),
            "p50_ms": p(0.5), "p99_ms": p(0.99), "p999_ms": p(0.999),
            "max_ms": ms(self.latencies.last().copied().unwrap_or_default()),
        })
    }
}

fn lag_figures(
    lags: &[(Change, Duration)],
    change: Change,
) -> (usize, Duration, Duration, Duration) {
    let mut of_kind: Vec<Duration> = lags
        .iter()
        .filter(|(c, _)| *c == change)
        .map(|(_, d)| *d)
        .collect();
    of_kind.sort();
    (
        of_kind.len(),
        percentile(&of_kind, 0.5),
        percentile(&of_kind, 0.99),
        of_kind.last().copied().unwrap_or_default(),
    )
}

fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    let settings = Settings::from_env();
    println!(
        "churn: {} Services x 10 endpoints, {} VirtualServices, {} AuthorizationPolicies; \
         {} new connections/s; {} s without changes and {} s with {} changes/s, \
         alternating every second",
        settings.services,
        settings.routes,
        settings.policies,
        settings.rate,
        settings.window.as_secs(),
        settings.window.as_secs(),
        settings.changes_per_sec
    );

    let pods = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("echo")
        .enable_all()
        .build()
        .expect("the echo runtime starts");
    let echo_ports = start_echo_servers(&pods, settings.echo_servers);

    let built = Instant::now();
    let config = Config::new(&settings, &echo_ports);
    let build_ms = ms(built.elapsed());
    let store = Store::new();
    let first = store.publish(config.current.clone());

    let applied = Arc::new(AtomicU64::new(0));
    let (proxy, data_thread, stop_proxy) = start_proxy(&store, applied.clone());
    while applied.load(Ordering::Acquire) < first {
        thread::sleep(Duration::from_millis(1));
    }

    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("client")
        .enable_all()
        .build()
        .expect("the client runtime starts");

    let start = Instant::now() + Duration::from_millis(50);
    let slots = Slots {
        from: start + WARMUP,
        count: 2 * settings.window.as_secs() as u32,
    };

    let lags = Arc::new(Mutex::new(Lags::default()));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = watch_applied(applied.clone(), lags.clone(), stop_watch.clone());
    let control = churn(
        config,
        store.clone(),
        lags.clone(),
        settings.changes_per_sec,
        slots,
    );
    let samples = run_load(&client, proxy, settings.rate, start, slots.end());
    let made = control.join().expect("the control thread does not panic");
    stop_watch.store(true, Ordering::Release);
    watcher.join().expect("the lag watcher does not panic");

    let _ = stop_proxy.send(());
    data_thread.join().expect("the data thread does not panic");
    drop(client);
    drop(pods);

    let windows = [
        Window::of("baseline", &samples, slots, false),
        Window::of("churn", &samples, slots, true),
    ];
    let lags = std::mem::take(&mut lags.lock().expect("not poisoned").applied);
    let mut made = made;
    made.sort();

    println!("snapshot built in {build_ms:.0} ms; each change made and published in {:.1} ms (median of {})",
        ms(percentile(&made, 0.5)), made.len());
    println!();
    println!("new connection (due → echo received), ms:");
    println!("| window   | connections | failed |      p50 |      p99 |    p99.9 |      max |");
    println!("|----------|-------------|--------|----------|----------|----------|----------|");
    for w in &windows {
        println!("{}", w.row());
    }
    for w in &windows {
        if let Some(first) = w.failures.first() {
            println!("{}: first failure: {first}", w.name);
        }
    }
    println!();
    println!("change applied by the proxy (publish → applied), ms:");
    println!("| change    | count |   median |      p99 |      max |");
    println!("|-----------|-------|----------|----------|----------|");
    let mut lag_json = serde_json::Map::new();
    for change in [Change::Endpoints, Change::Route] {
        let (count, median, p99, max) = lag_figures(&lags, change);
        println!(
            "| {:<9} | {:>5} | {:>8.3} | {:>8.3} | {:>8.3} |",
            change.name(),
            count,
            ms(median),
            ms(p99),
            ms(max)
        );
        lag_json.insert(
            change.name().into(),
            json!({"count": count, "median_ms": ms(median), "p99_ms": ms(p99), "max_ms": ms(max)}),
        );
    }

    let report = json!({
        "commit": commit(),
        "services": settings.services, "endpoints_per_service": 10,
        "routes": settings.routes, "policies": settings.policies,
        "connections_per_sec": settings.rate, "window_s": settings.window.as_secs(),
        "changes_per_sec": settings.changes_per_sec, "data_workers": 2,
        "snapshot_build_ms": build_ms,
        "change_make_publish_median_ms": ms(percentile(&made, 0.5)),
        "baseline": windows[0].json(),
        "churn": windows[1].json(),
        "applied_lag": lag_json,
    });
    if let Some(dir) = settings.out.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let text = serde_json::to_string_pretty(&report).expect("JSON serializes");
    match fs::write(&settings.out, text + "\n") {
        Ok(()) => println!("\nJSON: {}", settings.out.display()),
        Err(e) => eprintln!("churn: cannot write {}: {e}", settings.out.display()),
    }
}
