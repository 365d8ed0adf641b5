//! Control-plane scale: 10,000 Services × 10 endpoints, 1,000 routes, 2,000 policies.
//!
//! Reports the full translation time (YAML objects → typed objects → snapshot), the memory the
//! snapshot holds, and the time one EndpointSlice change takes to reach the consumers: the proxy
//! (it reads the published snapshot) and, when run as root, the eBPF map sync of a real agent.
//! Run with `cargo xtask bench scale` (or `cargo bench -p mesh-node --bench scale`); sizes can
//! be changed with WEFT_SCALE_SERVICES, WEFT_SCALE_ROUTES, WEFT_SCALE_POLICIES.
//!
//! The agent part runs in a network namespace of its own, so the host's routing rules and
//! nftables are untouched, and removes its cgroup and pins when done.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mesh_node::{
    agent::{self, Agent, AgentConfig},
    model::Store,
    source::{assemble, objects::translate, yaml, Object},
};
use serde_json::{json, Value};

// The benchmark's only unsafe code (the workspace denies it elsewhere).
#[allow(unsafe_code, reason = "a counting global allocator")]
mod sys {
    //! A counting allocator, so the snapshot's footprint is measured, not guessed.

    use std::{
        alloc::{GlobalAlloc, Layout, System},
        sync::atomic::{AtomicUsize, Ordering},
    };

    static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

    /// Bytes currently allocated by the whole process.
    pub fn allocated() -> usize {
        ALLOCATED.load(Ordering::Relaxed)
    }

    struct Counting;

    // SAFETY: delegates every call to the system allocator unchanged and only adds bookkeeping.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
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
        docs.push(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": format!("route-{i}"), "namespace": "scale"},
            "spec": {
                "hosts": [format!("svc-{i}")],
                "http": [
                    {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                     "route": [{"destination": {"host": format!("svc-{i}"), "subset": "v2"}}]},
                    {"route": [
                        {"destination": {"host": format!("svc-{i}"), "subset": "v1"}, "weight": 80},
                        {"destination": {"host": format!("svc-{i}"), "subset": "v2"}, "weight": 20}],
                     "timeout": "3s",
                     "retries": {"attempts": 3, "perTryTimeout": "1s", "retryOn": "5xx,connect-failure"}},
                ],
            },
        }));
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct AgentRun {
    cgroup: PathBuf,
    bpffs: PathBuf,
}

impl AgentRun {
    const NODE: &'static str = "node-1";

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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let rx = store.subscribe();
        rt.spawn(agent.run(rx, applied));
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

/// Waits until `applied` reaches `version`, driving `rt`; returns the time it took.
fn wait_applied(
    rt: &tokio::runtime::Runtime,
    applied: &AtomicU64,
    version: u64,
    since: Instant,
) -> Duration {
    rt.block_on(async {
        while applied.load(Ordering::Acquire) < version {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    });
    since.elapsed()
}

fn main() {
    let services = env_or("WEFT_SCALE_SERVICES", 10_000);
    let routes = env_or("WEFT_SCALE_ROUTES", 1_000);
    let policies = env_or("WEFT_SCALE_POLICIES", 2_000);
    println!("scale: {services} Services x 10 endpoints, {routes} VirtualServices, {policies} AuthorizationPolicies");

    let docs = yaml(&documents(services, routes, policies));
    let start = Instant::now();
    let mut objects = translate_all(&docs);
    let translate_ms = ms(start.elapsed());
    let before = sys::allocated();
    let start = Instant::now();
    let snapshot = assemble(objects.iter(), None);
    let assemble_ms = ms(start.elapsed());
    let snapshot_bytes = sys::allocated().saturating_sub(before);
    let objects_bytes = {
        let before = sys::allocated();
        let copy = translate_all(&docs);
        let bytes = sys::allocated().saturating_sub(before);
        drop(copy);
        bytes
    };
    drop(docs);

    let store = Store::new();
    let applied = Arc::new(AtomicU64::new(0));
    let agent = if mesh_node_is_root() {
        match AgentRun::start(&store, applied.clone()) {
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
    let first = Instant::now();
    let version = store.publish(snapshot);
    let first_sync_ms = agent
        .as_ref()
        .map(|(_, rt)| ms(wait_applied(rt, &applied, version, first)));

    // One EndpointSlice changes: its endpoints move to other addresses.
    let mut proxy_rx = store.subscribe();
    proxy_rx.borrow_and_update();
    let mut rounds = Vec::new();
    for round in 1..=20 {
        let changed = slice(services / 2, round);
        let start = Instant::now();
        let replacement = translate_all(&yaml(std::slice::from_ref(&changed)));
        let target = objects
            .iter()
            .position(|o| matches!(o, Object::EndpointSlice(s) if *s.key.name == *format!("svc-{}-abcde", services / 2)))
            .expect("the changed slice exists");
        objects.splice(target..=target, replacement);
        let snapshot = assemble(objects.iter(), None);
        let version = store.publish(snapshot);
        let published = start.elapsed();
        let proxy = proxy_rx
            .has_changed()
            .map(|changed| changed.then(|| start.elapsed()))
            .ok()
            .flatten()
            .unwrap_or(published);
        proxy_rx.borrow_and_update();
        let ebpf = agent
            .as_ref()
            .map(|(_, rt)| wait_applied(rt, &applied, version, start));
        rounds.push((published, proxy, ebpf));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let change_publish = median(rounds.iter().map(|r| ms(r.0)).collect());
    let change_proxy = median(rounds.iter().map(|r| ms(r.1)).collect());
    let change_ebpf = agent
        .is_some()
        .then(|| median(rounds.iter().filter_map(|r| r.2.map(ms)).collect()));

    let fmt_opt = |v: Option<f64>| v.map_or("not measured".to_owned(), |v| format!("{v:.1} ms"));
    println!("full translation (objects):       {translate_ms:.0} ms");
    println!("snapshot assembly:                {assemble_ms:.0} ms");
    println!(
        "typed objects held by the source: {:.1} MiB",
        objects_bytes as f64 / 1048576.0
    );
    println!(
        "snapshot held by consumers:       {:.1} MiB",
        snapshot_bytes as f64 / 1048576.0
    );
    println!(
        "first eBPF map sync:              {}",
        fmt_opt(first_sync_ms)
    );
    println!("one EndpointSlice change (median of {}):", rounds.len());
    println!("  translated + published:         {change_publish:.1} ms");
    println!("  seen by the proxy:              {change_proxy:.1} ms");
    println!("  applied by the eBPF sync:       {}", fmt_opt(change_ebpf));
    println!(
        "{}",
        json!({
            "services": services, "endpoints_per_service": 10, "routes": routes, "policies": policies,
            "translate_ms": translate_ms, "assemble_ms": assemble_ms,
            "objects_mib": objects_bytes as f64 / 1048576.0,
            "snapshot_mib": snapshot_bytes as f64 / 1048576.0,
            "first_ebpf_sync_ms": first_sync_ms,
            "change_publish_ms": change_publish, "change_proxy_ms": change_proxy,
            "change_ebpf_ms": change_ebpf,
        })
    );
    drop(agent);
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
