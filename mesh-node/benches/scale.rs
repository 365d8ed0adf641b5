//! Control-plane scale: 10,000 Services × 10 endpoints, 1,000 routes, 2,000 policies.
//!
//! Reports the full translation time (YAML objects → typed objects → snapshot), the memory the
//! source and the snapshot hold, and, median of 20, the time one EndpointSlice change takes to
//! be published, to be seen by a real node proxy (compiled and served) and, when run as root,
//! to be applied to the eBPF maps by a real agent; and the time one VirtualService change takes
//! to be published and compiled by the proxy; and the time to select the last of 10,000 routes
//! of one VirtualService (exact paths, indexed; regexes, tried in order). Changes go through
//! the sources' path: the
//! [`Ledger`] of what each origin holds and the incremental assembler.
//! Run with `cargo xtask bench scale` (or `cargo bench -p mesh-node --bench scale`); sizes can
//! be changed with WEFT_SCALE_SERVICES, WEFT_SCALE_ROUTES, WEFT_SCALE_POLICIES.
//!
//! The agent part runs in a network namespace of its own, so the host's routing rules and
//! nftables are untouched, and removes its cgroup and pins when done.

use std::{
    collections::HashMap as StdMap,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::BorrowedFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mesh_node::{
    agent::{self, Agent, AgentConfig},
    metrics::Metrics,
    model::{OriginalDst, Snapshot, Store},
    proxy::{
        route::{RequestInfo, RouteIndex, Selection},
        Proxy, ProxyConfig,
    },
    source::{ledger::Results, objects::translate, yaml, Ledger, Object},
};
use serde_json::{json, Value};

// The benchmark's only unsafe code (the workspace denies it elsewhere).
#[allow(unsafe_code, reason = "a counting global allocator")]
mod sys {
    //! Counts the bytes currently allocated (and the peak), so footprints are measured, not
    //! guessed.

    use std::{
        alloc::{GlobalAlloc, Layout, System},
        sync::atomic::{AtomicUsize, Ordering},
    };

    pub static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
    pub static PEAK: AtomicUsize = AtomicUsize::new(0);

    struct Counting;

    // SAFETY: delegates every call to the system allocator unchanged and only adds bookkeeping.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let now = ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is System's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
            // SAFETY: `ptr` came from `alloc` above, that is from System, with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;
}

use sys::{ALLOCATED, PEAK};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "scale",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// VirtualService `route-i`: a header match, then a `weight`/`100 - weight` split.
fn route(i: usize, weight: u32) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": format!("route-{i}"), "namespace": "scale"},
        "spec": {
            "hosts": [format!("svc-{i}")],
            "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": format!("svc-{i}"), "subset": "v2"}}]},
                {"route": [
                    {"destination": {"host": format!("svc-{i}"), "subset": "v1"}, "weight": weight},
                    {"destination": {"host": format!("svc-{i}"), "subset": "v2"}, "weight": 100 - weight}],
                 "timeout": "3s",
                 "retries": {"attempts": 3, "perTryTimeout": "1s", "retryOn": "5xx,connect-failure"}},
            ],
        },
    })
}

fn documents(services: usize, routes: usize, policies: usize) -> Vec<Value> {
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "scale", "labels": {"weft.io/mesh": "enabled"}}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.11"}]}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-2"},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.12"}]}}),
    ];
    for i in 0..services {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "scale"},
            "spec": {"clusterIP": service_ip(i), "selector": {"app": format!("svc-{i}")},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }));
        docs.push(slice(i, 0));
    }
    for i in 0..routes {
        docs.push(route(i, 80));
    }
    for i in 0..policies {
        docs.push(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": format!("policy-{i}"), "namespace": "scale"},
            "spec": {
                "selector": {"matchLabels": {"app": format!("svc-{}", i % services.max(1))}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"principals": ["cluster.local/ns/scale/sa/client"]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
                }],
            },
        }));
    }
    docs
}

/// The documents as the sources hand them to translation (parsed YAML).
fn yaml(docs: &[Value]) -> Vec<yaml::Value> {
    docs.iter()
        .map(|d| yaml::from_json(d).expect("JSON converts to YAML"))
        .collect()
}

fn translate_all(docs: &[yaml::Value]) -> Vec<Object> {
    docs.iter()
        .flat_map(translate)
        .map(|r| r.unwrap_or_else(|e| panic!("generated object rejected: {e:?}")))
        .collect()
}

/// One document's translation, as a source hands it to its ledger.
fn results(doc: &Value) -> Results {
    let yaml = yaml::from_json(doc).expect("JSON converts to YAML");
    translate(&yaml)
        .into_iter()
        .map(|r| ("bench".to_owned(), r))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / 1048576.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct AgentRun {
    cgroup: PathBuf,
    bpffs: PathBuf,
}

impl AgentRun {
    const NODE: &'static str = "node-1";

    /// Moves the calling thread (and the threads it starts from now on) into a network
    /// namespace of its own and runs a real agent there, on a runtime of its own.
    fn start(
        store: &Store,
        applied: Arc<AtomicU64>,
    ) -> Result<(Self, tokio::runtime::Runtime), String> {
        mesh_node::sys::unshare_network().map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        let cgroup = PathBuf::from("/sys/fs/cgroup/unified/weft-scale-bench");
        let bpffs = PathBuf::from("/sys/fs/bpf/weft-scale-bench");
        fs::create_dir_all(&cgroup).map_err(|e| format!("{}: {e}", cgroup.display()))?;
        let run = Self { cgroup, bpffs };
        let agent = Agent::load(AgentConfig {
            node: Self::NODE.into(),
            cgroup_root: run.cgroup.clone(),
            bpffs_root: run.bpffs.clone(),
            proxy_ip: Ipv4Addr::new(10, 244, 1, 1),
            uplinks: Vec::new(),
        })
        .map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("agent")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let rx = store.subscribe();
        // No container runtime here: nothing enrolls pods.
        let (_enroll, enrollments) = tokio::sync::mpsc::channel(1);
        rt.spawn(agent.run(rx, applied, enrollments));
        Ok((run, rt))
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        if let Err(e) = agent::cleanup(&self.bpffs, Self::NODE) {
            eprintln!("cleanup of {}: {e}", self.bpffs.display());
        }
        let _ = fs::remove_dir(&self.bpffs);
        let _ = fs::remove_dir(&self.cgroup);
    }
}

/// A real node proxy on loopback, on a runtime of its own: it reports in `applied` the version
/// of each snapshot once it has compiled it and serves it.
fn start_proxy(store: &Store, applied: Arc<AtomicU64>) -> tokio::runtime::Runtime {
    struct NoCapture;
    impl OriginalDst for NoCapture {
        fn lookup(&self, _: BorrowedFd<'_>, _: SocketAddrV4) -> Option<SocketAddrV4> {
            None
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("proxy")
        .enable_all()
        .build()
        .expect("proxy runtime");
    let mut config = ProxyConfig::new(AgentRun::NODE, Ipv4Addr::new(10, 244, 1, 1));
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.outbound_addr = loopback;
    config.inbound_addr = loopback;
    config.tunnel_addr = loopback;
    let metrics = Metrics::new();
    let proxy = rt
        .block_on(Proxy::bind(
            config,
            store.subscribe(),
            Arc::new(NoCapture),
            &metrics,
            applied,
        ))
        .expect("the proxy binds on loopback");
    rt.spawn(proxy.run(std::future::pending()));
    rt
}

/// Waits until every consumer reaches `version`; returns, per consumer, the time since `since`
/// at which it got there (watched together, so one consumer's wait does not add to another's).
fn wait_all(applied: &[&AtomicU64], version: u64, since: Instant) -> Vec<Duration> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done: Vec<Option<Duration>> = vec![None; applied.len()];
    while done.iter().any(Option::is_none) {
        for (slot, a) in done.iter_mut().zip(applied) {
            if slot.is_none() && a.load(Ordering::Acquire) >= version {
                *slot = Some(since.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "version {version} not applied within 60 s"
        );
        std::thread::sleep(Duration::from_micros(20));
    }
    done.into_iter().flatten().collect()
}

/// What publishing would cost with `std` hash maps (a deep copy of every map per snapshot), and
/// what one lookup costs in each, the proxy's per-connection operation.
fn compare_maps(snapshot: &Snapshot) -> Value {
    let services: StdMap<_, _> = snapshot
        .services
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let endpoints: StdMap<_, _> = snapshot
        .endpoints
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let routes: StdMap<_, _> = snapshot
        .virtual_services
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let policies: StdMap<_, _> = snapshot
        .authorization_policies
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let start = Instant::now();
    let copy = (
        services.clone(),
        endpoints.clone(),
        routes.clone(),
        policies.clone(),
    );
    let std_clone = start.elapsed();
    drop(copy);
    let start = Instant::now();
    let copy = snapshot.clone();
    let persistent_clone = start.elapsed();
    drop(copy);

    let keys: Vec<_> = snapshot.services.keys().cloned().collect();
    let per_lookup = |lookup: &dyn Fn(&mesh_node::model::ObjectKey) -> bool| {
        let start = Instant::now();
        let mut found = 0;
        for _ in 0..10 {
            for k in &keys {
                found += usize::from(lookup(std::hint::black_box(k)));
            }
        }
        assert_eq!(found, keys.len() * 10);
        start.elapsed().as_secs_f64() * 1e9 / (keys.len() * 10).max(1) as f64
    };
    let std_ns = per_lookup(&|k| services.contains_key(k));
    let persistent_ns = per_lookup(&|k| snapshot.services.contains_key(k));
    json!({
        "std_hashmap_copy_ms": ms(std_clone), "persistent_copy_ms": ms(persistent_clone),
        "std_hashmap_lookup_ns": std_ns, "persistent_lookup_ns": persistent_ns,
    })
}

fn main() {
    let services = env_or("WEFT_SCALE_SERVICES", 10_000);
    let routes = env_or("WEFT_SCALE_ROUTES", 1_000);
    let policies = env_or("WEFT_SCALE_POLICIES", 2_000);
    println!("scale: {services} Services x 10 endpoints, {routes} VirtualServices, {policies} AuthorizationPolicies");

    let baseline = ALLOCATED.load(Ordering::Relaxed);
    let json_docs = documents(services, routes, policies);
    // The origin of an object: its index among the documents.
    let slice_origin = 3 + 2 * (services / 2) + 1;
    let route_origin = 3 + 2 * services + routes / 2;
    assert!(json_docs[slice_origin]["kind"] == "EndpointSlice");
    assert!(json_docs[route_origin]["kind"] == "VirtualService");
    let docs = yaml(&json_docs);
    let start = Instant::now();
    let objects = translate_all(&docs);
    let translate_ms = ms(start.elapsed());
    let objects_bytes = {
        let before = ALLOCATED.load(Ordering::Relaxed);
        let copy = translate_all(&docs);
        let bytes = ALLOCATED.load(Ordering::Relaxed).saturating_sub(before);
        drop(copy);
        bytes
    };
    drop(objects);

    // The whole configuration through the sources' path: one origin per object, as the
    // Kubernetes source holds them (the ledger keeps the objects and the assembled state).
    let mut ledger: Ledger<usize> = Ledger::new();
    let mut translated: Vec<Results> = docs
        .iter()
        .map(|d| {
            translate(d)
                .into_iter()
                .map(|r| ("bench".to_owned(), r))
                .collect()
        })
        .collect();
    drop(docs);
    drop(json_docs);
    // From here on the bench's own input documents are gone: the peak is Weft's.
    let input_peak = PEAK.swap(ALLOCATED.load(Ordering::Relaxed), Ordering::Relaxed);
    let start = Instant::now();
    for (origin, results) in translated.drain(..).enumerate() {
        ledger.apply(origin, results, "unknown");
    }
    let snapshot = ledger.snapshot();
    let assemble_ms = ms(start.elapsed());
    let ledger_bytes = ALLOCATED.load(Ordering::Relaxed).saturating_sub(baseline);
    let maps = compare_maps(&snapshot);
    drop(snapshot);

    let store = Store::new();
    let proxy_applied = Arc::new(AtomicU64::new(0));
    // Bound before the agent moves this thread into its own network namespace.
    let proxy_rt = start_proxy(&store, proxy_applied.clone());
    let ebpf_applied = Arc::new(AtomicU64::new(0));
    let agent = if mesh_node_is_root() {
        match AgentRun::start(&store, ebpf_applied.clone()) {
            Ok(agent) => Some(agent),
            Err(e) => {
                eprintln!("scale: eBPF sync not measured: {e}");
                None
            }
        }
    } else {
        eprintln!("scale: not root, the eBPF map sync is not measured");
        None
    };
    let consumers: Vec<&AtomicU64> = match agent {
        Some(_) => vec![&proxy_applied, &ebpf_applied],
        None => vec![&proxy_applied],
    };
    let first = Instant::now();
    let version = ledger.publish(&store);
    let times = wait_all(&consumers, version, first);
    let first_proxy_ms = ms(times[0]);
    let first_sync_ms = times.get(1).copied().map(ms);

    // One EndpointSlice changes: its endpoints move to other addresses.
    let mut slice_rounds = Vec::new();
    for round in 1..=20 {
        let changed = slice(services / 2, round);
        let start = Instant::now();
        ledger.apply(slice_origin, results(&changed), "unknown");
        let version = ledger.publish(&store);
        let published = start.elapsed();
        let times = wait_all(&consumers, version, start);
        slice_rounds.push((published, times[0], times.get(1).copied()));
    }
    // One VirtualService changes its split.
    let mut route_rounds = Vec::new();
    for round in 1..=20 {
        let changed = route(routes / 2, 80 - round);
        let start = Instant::now();
        ledger.apply(route_origin, results(&changed), "unknown");
        let version = ledger.publish(&store);
        let published = start.elapsed();
        let times = wait_all(&consumers, version, start);
        route_rounds.push((published, times[0], times.get(1).copied()));
    }
    let live_bytes = ALLOCATED.load(Ordering::Relaxed);
    let peak_bytes = PEAK.load(Ordering::Relaxed);

    let slice_publish = median(slice_rounds.iter().map(|r| ms(r.0)).collect());
    let slice_proxy = median(slice_rounds.iter().map(|r| ms(r.1)).collect());
    let slice_ebpf = agent
        .is_some()
        .then(|| median(slice_rounds.iter().filter_map(|r| r.2.map(ms)).collect()));
    let route_publish = median(route_rounds.iter().map(|r| ms(r.0)).collect());
    let route_compiled = median(route_rounds.iter().map(|r| ms(r.1)).collect());

    let fmt_opt = |v: Option<f64>| v.map_or("not measured".to_owned(), |v| format!("{v:.1} ms"));
    println!("full translation (objects):         {translate_ms:.0} ms");
    println!("first assembly (ledger + snapshot): {assemble_ms:.0} ms");
    println!(
        "typed objects (one copy):           {:.1} MiB",
        mib(objects_bytes)
    );
    println!(
        "ledger + assembled snapshot:        {:.1} MiB",
        mib(ledger_bytes)
    );
    println!("first snapshot compiled by the proxy: {first_proxy_ms:.1} ms");
    println!(
        "first eBPF map sync:                {}",
        fmt_opt(first_sync_ms)
    );
    println!(
        "one EndpointSlice change (median of {}):",
        slice_rounds.len()
    );
    println!("  translated + published:           {slice_publish:.2} ms");
    println!("  seen by the proxy:                {slice_proxy:.2} ms");
    println!(
        "  applied to the eBPF maps:         {}",
        fmt_opt(slice_ebpf)
    );
    println!(
        "one VirtualService change (median of {}):",
        route_rounds.len()
    );
    println!("  translated + published:           {route_publish:.2} ms");
    println!("  compiled by the proxy:            {route_compiled:.2} ms");
    println!(
        "memory live at the end (everything): {:.1} MiB, peak {:.1} MiB \
         (with the bench's input documents: {:.1} MiB)",
        mib(live_bytes),
        mib(peak_bytes),
        mib(input_peak)
    );
    println!("maps: {maps}");
    let matching = route_matching();
    println!("route selection (median): {matching}");
    println!(
        "{}",
        json!({
            "services": services, "endpoints_per_service": 10, "routes": routes, "policies": policies,
            "translate_ms": translate_ms, "assemble_ms": assemble_ms,
            "objects_mib": mib(objects_bytes), "ledger_and_snapshot_mib": mib(ledger_bytes),
            "first_proxy_compile_ms": first_proxy_ms, "first_ebpf_sync_ms": first_sync_ms,
            "slice_change_publish_ms": slice_publish, "slice_change_proxy_ms": slice_proxy,
            "slice_change_ebpf_ms": slice_ebpf,
            "route_change_publish_ms": route_publish, "route_change_compiled_ms": route_compiled,
            "live_mib": mib(live_bytes), "peak_mib": mib(peak_bytes),
            "peak_with_input_mib": mib(input_peak),
            "maps": maps,
            "route_matching": matching,
        })
    );
    drop(agent);
    drop(proxy_rt);
}

/// Nanoseconds to select the route of a request for the last of 10,000 routes of one
/// VirtualService, whose routes match exact paths (indexed) or regexes (tried in order), median
/// of 2,000 selections.
fn route_matching() -> Value {
    let measure = |uri: &dyn Fn(usize) -> Value| {
        let mut docs = vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "m"}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "big", "namespace": "m"},
                   "spec": {"clusterIP": "10.96.9.9", "ports": [{"name": "http", "port": 80}]}}),
        ];
        let http: Vec<Value> = (0..10_000)
            .map(|i| json!({"match": [{"uri": uri(i)}], "route": [{"destination": {"host": "big"}}]}))
            .collect();
        docs.push(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                         "metadata": {"name": "big", "namespace": "m"},
                         "spec": {"hosts": ["big"], "http": http}}),
        );
        let objects = translate_all(&yaml(&docs));
        let snapshot = mesh_node::source::assemble(&objects, None);
        let index = RouteIndex::build(&snapshot);
        let routes = index
            .get(&mesh_node::model::ObjectKey::new("m", "big"))
            .expect("routes of big");
        let parts = http::Request::get("http://big/p9999")
            .body(())
            .expect("a request")
            .into_parts()
            .0;
        let request = RequestInfo {
            method: &parts.method,
            uri: &parts.uri,
            authority: "big",
            headers: &parts.headers,
            port: 80,
            source: None,
        };
        let mut times: Vec<u128> = (0..2_000)
            .map(|_| {
                let start = Instant::now();
                let selected = routes.select(std::hint::black_box(&request));
                assert!(matches!(selected, Selection::Rule(_)));
                start.elapsed().as_nanos()
            })
            .collect();
        times.sort_unstable();
        times[times.len() / 2] as u64
    };
    let exact = measure(&|i| json!({"exact": format!("/p{i}")}));
    let regex = measure(&|i| json!({"regex": format!("/p{i}")}));
    json!({"last_of_10000_exact_ns": exact, "last_of_10000_regex_ns": regex})
}

fn mesh_node_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
