//! The virtual cluster: Kubernetes-shaped nodes and pods on one Linux machine.
//!
//! Each node is a network namespace (`wn-<node>`) on a shared bridge (`weft-fabric`),
//! running its own `mesh-node`; each pod is a network namespace (`wp-...`) behind a veth into
//! its node, and a cgroup under the node's cgroup subtree. Services get ClusterIPs that
//! nftables rules in every node translate (kube-proxy), and names through per-pod hosts
//! files. Every mesh-node reads the same effective configuration from
//! `/run/weft-cluster/config/`, as it would read the API server.
//!
//! Changes follow one order so that a meshed pod never runs before its node enforces the
//! mesh: network and cgroups first, then the configuration, then wait until every node
//! reports the new generation, and only then start new pods.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

mod ca;
mod cgroup;
mod cni;
mod config;
mod down;
mod forward;
mod launch;
mod net;
mod nft;
mod plan;
mod proc;
mod ready;
mod sidecar;
mod state;
mod status;

use plan::Diff;
use proc::Placement;
use state::{NodeInfo, PodInfo, State};

pub use net::FABRIC_NETNS;
pub use sidecar::{ANNOTATION as SIDECAR_ANNOTATION, PROXY_UID as SIDECAR_UID};
pub use state::{BPFFS_ROOT, CGROUP_ROOT, RUN_DIR};

/// Set to `1` to run the cluster without mesh-node (plain networking and kube-proxy only).
pub const NO_MESH_ENV: &str = "WEFT_CLUSTER_NO_MESH";
/// Cargo profile the binaries are built with (`debug` by default, or `release`, or any
/// custom profile).
pub const PROFILE_ENV: &str = "WEFT_PROFILE";
/// A `mesh-node` binary the nodes run instead of the workspace's build.
pub const MESH_NODE_ENV: &str = "WEFT_MESH_NODE";
/// Overrides `RUST_LOG` of the node proxies and Weft sidecars (mesh-node's own default when
/// unset: `info`, access logs off, as Istio ships).
pub const NODE_LOG_ENV: &str = "WEFT_CLUSTER_NODE_LOG";

/// Lifetime of the workload certificates the node proxies ask for (`--workload-cert-ttl`, 24 h
/// when unset): short ones let tests watch renewals and root rotations happen.
pub const CERT_TTL_ENV: &str = "WEFT_CLUSTER_CERT_TTL";

/// Sets the `RUST_LOG` of a mesh-node process: [`NODE_LOG_ENV`] if set, else none at all, so
/// that the cluster measures and shows what a default install does.
pub fn node_log_env(cmd: &mut Command) -> &mut Command {
    match std::env::var_os(NODE_LOG_ENV) {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    }
}

/// The workspace binaries the cluster runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binaries {
    pub mesh_node: PathBuf,
    pub weft_demo: PathBuf,
    /// The chained CNI plugin the cluster's runtime calls for every pod.
    #[serde(default)]
    pub weft_cni: PathBuf,
}

/// Builds `mesh-node` and `weft-demo` (`cargo build -p mesh-node --bins`, profile from
/// `WEFT_PROFILE`) and returns their paths.
pub fn binaries() -> Result<Binaries> {
    let (profile_args, dir) = profile();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::cmd::interactive(
        Command::new(cargo)
            .args(["build", "-p", "mesh-node", "--bins"])
            .args(&profile_args)
            .current_dir(crate::workspace_root()),
    )
    .context("building mesh-node and weft-demo")?;
    let mut bins = binary_paths(&dir);
    with_other_mesh_node(&mut bins);
    for path in [&bins.mesh_node, &bins.weft_demo, &bins.weft_cni] {
        if !path.is_file() {
            bail!("the build did not produce {}", path.display());
        }
    }
    Ok(bins)
}

/// Another build of the node, when [`MESH_NODE_ENV`] names one (an upgrade to try, a baseline
/// to measure against).
fn with_other_mesh_node(bins: &mut Binaries) {
    if let Some(other) = std::env::var_os(MESH_NODE_ENV) {
        bins.mesh_node = PathBuf::from(other);
    }
}

/// A build of mesh-node other than the one the cluster runs, to upgrade to: the release
/// build when the cluster runs another profile, else the debug build (built if needed).
pub fn other_build() -> Result<PathBuf> {
    let (_, dir) = profile();
    let (args, other): (&[&str], &str) = if dir == "release" {
        (&[], "debug")
    } else {
        (&["--release"], "release")
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::cmd::interactive(
        Command::new(cargo)
            .args(["build", "-p", "mesh-node", "--bin", "mesh-node"])
            .args(args)
            .current_dir(crate::workspace_root()),
    )
    .with_context(|| format!("building mesh-node ({other})"))?;
    let path = binary_paths(other).mesh_node;
    if !path.is_file() {
        bail!("the build did not produce {}", path.display());
    }
    Ok(path)
}

fn profile() -> (Vec<String>, String) {
    match std::env::var(PROFILE_ENV).as_deref() {
        Err(_) | Ok("" | "debug" | "dev") => (Vec::new(), "debug".into()),
        Ok("release") => (vec!["--release".into()], "release".into()),
        Ok(other) => (vec!["--profile".into(), other.into()], other.into()),
    }
}

/// Where the binaries of a profile are, built or not.
fn binary_paths(profile_dir: &str) -> Binaries {
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| root.join(t))
        .unwrap_or_else(|| root.join("target"))
        .join(profile_dir);
    Binaries {
        mesh_node: target.join("mesh-node"),
        weft_demo: target.join("weft-demo"),
        weft_cni: target.join("weft-cni"),
    }
}

fn mesh_enabled() -> bool {
    !matches!(
        std::env::var(NO_MESH_ENV).as_deref(),
        Ok("1" | "true" | "yes")
    )
}

fn require_root() -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the virtual cluster needs root (network namespaces, cgroups, eBPF): run with sudo -E"
        );
    }
    Ok(())
}

fn preflight() -> Result<()> {
    require_root()?;
    crate::setup::check_cgroup2()?;
    crate::setup::ensure_bpffs_quiet()
}

fn load_state() -> Result<State> {
    State::load()?.context("no virtual cluster is up (cargo xtask cluster up DIR)")
}

/// Creates the cluster described by the YAML in `dir` (a file works too) and returns when
/// every node proxy and every pod is ready.
pub fn up(dir: &Path) -> Result<()> {
    preflight()?;
    if leftovers()? {
        bail!(
            "a virtual cluster is already up, or an earlier one left namespaces or cgroups \
             behind: run `cargo xtask cluster down` first"
        );
    }
    let mut resources = Vec::new();
    config::merge(&mut resources, config::load(dir)?)?;
    let (mut state, diff) = plan::plan(&State::empty(mesh_enabled()), resources)?;
    ensure_binaries(&mut state, &diff)?;

    for dir in [state::config_dir(), state::log_dir()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    cgroup::create(Path::new(CGROUP_ROOT))?;
    net::create_fabric()?;
    converge(&mut state, &diff).map_err(|e| {
        anyhow::anyhow!("{e:#}\n(the cluster is partly up: `cargo xtask cluster down` removes it)")
    })
}

/// Anything a cluster leaves on the machine: its state, its cgroups, its fabric.
fn leftovers() -> Result<bool> {
    Ok(Path::new(RUN_DIR).join("state.json").exists()
        || Path::new(CGROUP_ROOT).exists()
        || net::list_netns()?.iter().any(|n| n == FABRIC_NETNS))
}

/// Merges the resources of a file or directory into the cluster (by kind/namespace/name),
/// like `kubectl apply`.
pub fn apply(path: &Path) -> Result<()> {
    preflight()?;
    let prev = load_state()?;
    let mut resources = prev.resources.clone();
    config::merge(&mut resources, config::load(path)?)?;
    change(&prev, resources)
}

/// Removes the resources named in a file or directory, like `kubectl delete -f`.
pub fn delete(path: &Path) -> Result<()> {
    preflight()?;
    let prev = load_state()?;
    let mut resources = prev.resources.clone();
    let gone = config::load(path)?;
    if config::remove(&mut resources, &gone)? == 0 {
        eprintln!("note: none of the resources in {} exist", path.display());
    }
    change(&prev, resources)
}

fn change(prev: &State, resources: Vec<serde_json::Value>) -> Result<()> {
    let (mut state, diff) = plan::plan(prev, resources)?;
    ensure_binaries(&mut state, &diff)?;
    converge(&mut state, &diff)
}

/// Builds the binaries once if anything about to start needs them.
fn ensure_binaries(state: &mut State, diff: &Diff) -> Result<()> {
    if state.binaries.is_some() {
        return Ok(());
    }
    let needed = (state.mesh && !diff.new_nodes.is_empty())
        || diff.added.iter().any(|p| {
            resource_of(state, p).is_some_and(|obj| {
                launch::needs_binaries(obj)
                    || matches!(sidecar::kind(obj), Ok(Some(sidecar::Kind::Weft)))
            })
        });
    if needed {
        state.binaries = Some(binaries()?);
    }
    Ok(())
}

fn resource_of<'a>(state: &'a State, pod: &PodInfo) -> Option<&'a serde_json::Value> {
    state.resources.iter().find(|o| {
        config::kind_of(o) == "Pod"
            && config::namespace_of(o) == pod.namespace
            && config::str_at(o, "/metadata/name") == Some(pod.name.as_str())
    })
}

/// Brings the machine from the previous state to `state`, in the order that keeps meshed
/// pods from ever running unenforced.
fn converge(state: &mut State, diff: &Diff) -> Result<()> {
    // Recorded first, so that `down` knows every node and pod even if this fails half-way.
    state.save()?;
    for pod in &diff.removed {
        teardown_pod(state, pod).with_context(|| format!("removing pod {}", pod.key()))?;
        eprintln!("pod {}: removed", pod.key());
    }
    for node in &diff.new_nodes {
        // cgroups before the namespace: they are how `down` recognises our nodes.
        cgroup::create(&node.proxy_cgroup())?;
        cgroup::create(&node.cgroup().join("pods"))?;
        net::create_node(node).with_context(|| format!("creating node {}", node.name))?;
    }
    if !diff.new_nodes.is_empty() {
        net::route_between_nodes(&state.nodes)?;
    }
    for pod in &diff.added {
        let node = state.node(&pod.node).context("pod on an unknown node")?;
        cgroup::create(&pod.cgroup())?;
        net::create_pod(pod, node).with_context(|| format!("creating pod {}", pod.key()))?;
    }
    sync_services(state)?;

    state.generation += 1;
    write_config(state)?;
    state.save()?;

    if state.mesh {
        let bins = state.binaries.clone().context("mesh-node was not built")?;
        if !diff.new_nodes.is_empty() {
            ca::start(&bins, &state.nodes)?;
        }
        for node in &diff.new_nodes {
            ca::enroll(node)?;
            start_proxy(node, &bins)?;
        }
        for node in &state.nodes {
            if state.stopped.contains(&node.name) {
                eprintln!(
                    "node {}: mesh-node stopped; its new meshed pods wait for it",
                    node.name
                );
                continue;
            }
            ready::wait_node(node, state.generation)?;
            if diff.new_nodes.contains(node) {
                eprintln!("node {}: mesh-node ready", node.name);
            }
        }
    }

    // Each pod on its own, as kubelets do: one whose network waits (its node's mesh-node is
    // stopped) holds up no other.
    let started: Vec<Result<()>> = std::thread::scope(|scope| {
        let starting: Vec<_> = diff
            .added
            .iter()
            .map(|pod| {
                let state = &*state;
                scope.spawn(move || {
                    start_pod(state, pod)?;
                    ready::wait_pod(pod)?;
                    eprintln!("pod {}: ready ({}, {})", pod.key(), pod.ip, pod.node);
                    Ok(())
                })
            })
            .collect();
        starting
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("starting a pod panicked")))
            })
            .collect()
    });
    started.into_iter().collect()
}

/// Runs `weft-cni ADD` for `pod` as the runtime would, but with the network namespace of pod
/// `netns_of`: what a runtime that paired them wrongly would ask.
pub fn cni_add_with_netns_of(pod: &str, netns_of: &str) -> Result<Output> {
    let state = load_state()?;
    let mut info = state
        .pods
        .get(pod)
        .with_context(|| format!("no pod {pod}"))?
        .clone();
    info.netns = state
        .pods
        .get(netns_of)
        .with_context(|| format!("no pod {netns_of}"))?
        .netns
        .clone();
    let node = state.node(&info.node).context("pod on an unknown node")?;
    let bins = state.binaries.as_ref().context("not built")?;
    cni::call(&bins.weft_cni, "ADD", &info, node)
}

fn teardown_pod(state: &State, pod: &PodInfo) -> Result<()> {
    cgroup::kill(&pod.cgroup())?;
    if let (true, Some(bins), Some(node)) = (state.mesh, &state.binaries, state.node(&pod.node)) {
        // As a runtime does when a pod goes; DEL never fails.
        let _ = cni::call(&bins.weft_cni, "DEL", pod, node);
    }
    if net::list_netns()?.contains(&pod.netns) {
        net::delete_netns(&pod.netns)?;
    } else {
        net::remove_etc_netns(&pod.netns)?;
    }
    cgroup::remove_tree(&pod.cgroup())
}

/// kube-proxy rules in every node and hosts files in every pod, from the current Services.
fn sync_services(state: &State) -> Result<()> {
    let views = plan::services(state);
    for node in &state.nodes {
        let local: Vec<Ipv4Addr> = state
            .pods
            .values()
            .filter(|p| p.node == node.name)
            .map(|p| p.ip)
            .collect();
        nft::apply(&node.netns(), &nft::render(&views, &local))?;
    }
    let names: Vec<net::ServiceName<'_>> = views
        .iter()
        .filter_map(|v| {
            Some(net::ServiceName {
                namespace: &v.namespace,
                name: &v.name,
                ip: v.cluster_ip?,
            })
        })
        .collect();
    for pod in state.pods.values() {
        net::write_hosts(&pod.netns, &net::render_hosts(pod, &names))?;
    }
    Ok(())
}

/// The effective configuration, then the generation: a node that reports the new
/// generation has the new configuration files available.
fn write_config(state: &State) -> Result<()> {
    let dir = state::config_dir();
    state::write_atomic(
        &dir.join("cluster.yaml"),
        config::render_effective(state)?.as_bytes(),
    )?;
    state::write_atomic(
        &dir.join("generation"),
        format!("{}\n", state.generation).as_bytes(),
    )
}

fn start_proxy(node: &NodeInfo, bins: &Binaries) -> Result<u32> {
    let mut cmd = Command::new(&bins.mesh_node);
    cmd.arg("run")
        .args(["--node", &node.name])
        .arg("--handover-socket")
        .arg(handover_socket(node))
        .arg("--cni-socket")
        .arg(node.cni_socket())
        .arg("--config-dir")
        .arg(state::config_dir())
        .arg("--cgroup")
        .arg(node.cgroup())
        .args(["--proxy-ip", &node.gateway().to_string()])
        .args(["--uplink", "eth0"])
        .arg("--tls-origination-dir")
        .arg(tls_origination_dir())
        .args(ca::node_args(node));
    if let Ok(ttl) = std::env::var(CERT_TTL_ENV) {
        cmd.args(["--workload-cert-ttl", &ttl]);
    }
    node_log_env(&mut cmd);
    let limit = memory_limit()?;
    let memory_v1 = cgroup::limit_proxy_memory(Path::new(CGROUP_ROOT), &node.cgroup(), limit)?;
    // Directly into the namespace: `ip netns exec` would remount /sys and hide bpffs and
    // the cgroup filesystem from mesh-node.
    let mut placement = Placement::new().cgroup(&node.proxy_cgroup())?;
    if let Some(dir) = memory_v1 {
        placement = placement.cgroup(&dir)?;
    }
    placement.netns(&node.netns())?.detached().install(&mut cmd);
    proc::spawn_logged(&mut cmd, &node.log())
        .with_context(|| format!("starting mesh-node of {}", node.name))
}

/// Where a node's mesh-node offers its listening sockets to the next one: one per node, as
/// the nodes share this machine's filesystem.
fn handover_socket(node: &NodeInfo) -> PathBuf {
    Path::new(RUN_DIR)
        .join("handover")
        .join(&node.name)
        .join("handover.sock")
}

/// The environment variable that sets the node proxies' memory limit (bytes, or `Mi`/`Gi`),
/// for tests that want the overload manager to act at a smaller load.
pub const PROXY_MEMORY_ENV: &str = "WEFT_CLUSTER_PROXY_MEMORY";

fn memory_limit() -> Result<u64> {
    let Ok(text) = std::env::var(PROXY_MEMORY_ENV) else {
        return Ok(cgroup::PROXY_MEMORY_LIMIT);
    };
    let (digits, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let shift = match unit {
        "" => 0,
        "Mi" => 20,
        "Gi" => 30,
        _ => bail!("{PROXY_MEMORY_ENV}={text}: write bytes, or a number with Mi or Gi"),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{PROXY_MEMORY_ENV}={text}: not a size"))?;
    match n.checked_mul(1 << shift) {
        Some(bytes) if bytes >= 16 << 20 => Ok(bytes),
        _ => bail!("{PROXY_MEMORY_ENV}={text}: a node proxy needs at least 16Mi"),
    }
}

/// Where the node proxies read DestinationRule `tls` files from (`--tls-origination-dir`):
/// a test or a user of the virtual cluster puts the CAs and keys of external services there.
pub fn tls_origination_dir() -> PathBuf {
    Path::new(RUN_DIR).join("tls-origination")
}

fn start_pod(state: &State, pod: &PodInfo) -> Result<()> {
    let obj = resource_of(state, pod).context("pod without its resource")?;
    let node = state.node(&pod.node).context("pod on an unknown node")?;
    // As a container runtime: the network plugins before any container, retried while they
    // say "try again later" (the node's mesh-node is not there to enroll a meshed pod).
    if let (true, Some(bins)) = (state.mesh, &state.binaries) {
        cni::add(&bins.weft_cni, pod, node)?;
    }
    if let Some(kind) = sidecar::kind(obj)? {
        sidecar::start(state, pod, obj, node, kind)?;
    }
    for container in launch::containers(obj, pod, node, state.binaries.as_ref())? {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.netns])
            .args(&container.argv)
            .envs(container.env.iter().map(|(k, v)| (k, v)));
        // The cgroup first: after `ip netns exec` remounts /sys it is out of reach.
        Placement::new()
            .cgroup(&pod.cgroup())?
            .detached()
            .install(&mut cmd);
        proc::spawn_logged(&mut cmd, &pod.log()).with_context(|| {
            format!(
                "starting container {} of {}",
                container.container,
                pod.key()
            )
        })?;
    }
    Ok(())
}

/// Stops the mesh-node of `node` (SIGKILL, as a crash would: eBPF programs stay attached).
pub fn stop_node(node: &str) -> Result<()> {
    require_root()?;
    let state = load_state()?;
    let node = state
        .node(node)
        .with_context(|| format!("no node {node}"))?
        .clone();
    let mut state = state;
    state.stopped.insert(node.name.clone());
    state.save()?;
    cgroup::kill(&node.proxy_cgroup())
}

/// Starts the mesh-node of `node` again and waits until it is ready on the current
/// configuration.
pub fn start_node(node: &str) -> Result<()> {
    require_root()?;
    let state = load_state()?;
    let node = state
        .node(node)
        .with_context(|| format!("no node {node}"))?;
    if !state.mesh {
        bail!("the cluster runs without mesh-node ({NO_MESH_ENV})");
    }
    if cgroup::populated(&node.proxy_cgroup()) {
        bail!("mesh-node of {} is running", node.name);
    }
    let bins = state.binaries.as_ref().context("mesh-node was not built")?;
    start_proxy(node, bins)?;
    ready::wait_node(node, state.generation)?;
    let name = node.name.clone();
    let mut state = state;
    state.stopped.remove(&name);
    state.save()
}

/// How [`restart_node`] replaces a node's mesh-node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// As a DaemonSet rollout with `maxSurge`: the new process takes the listening sockets
    /// over, the old one drains and exits.
    Handover,
    /// A crash: SIGKILL, then a new process.
    Kill,
    /// A container restart without a surge: SIGTERM (the process drains and exits with no
    /// successor to take its sockets), then a new process.
    Term,
}

/// How long an old mesh-node may take to drain and exit after a handover (its drain timeout
/// is 5 s).
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// Replaces the mesh-node of `node` with a new process of the binary named by
/// [`MESH_NODE_ENV`] (an upgrade) or else the cluster's, and waits until the old one is gone
/// and the new one ready on the current configuration.
pub fn restart_node(node: &str, how: Restart) -> Result<()> {
    require_root()?;
    let state = load_state()?;
    let node = state
        .node(node)
        .with_context(|| format!("no node {node}"))?;
    if !state.mesh {
        bail!("the cluster runs without mesh-node ({NO_MESH_ENV})");
    }
    let mut bins = state.binaries.clone().context("mesh-node was not built")?;
    with_other_mesh_node(&mut bins);
    if !bins.mesh_node.is_file() {
        bail!("no mesh-node at {}", bins.mesh_node.display());
    }
    let old = cgroup::procs(&node.proxy_cgroup());
    match how {
        Restart::Handover => {}
        Restart::Kill => cgroup::kill(&node.proxy_cgroup())?,
        Restart::Term => terminate(node, &old)?,
    }
    let new = start_proxy(node, &bins)?;
    eprintln!(
        "node {}: mesh-node {new} started ({}){}",
        node.name,
        bins.mesh_node.display(),
        match how {
            Restart::Handover => format!(", taking over from {old:?}"),
            Restart::Kill => format!(" after killing {old:?}"),
            Restart::Term => format!(" after {old:?} exited on SIGTERM"),
        }
    );
    let deadline = Instant::now() + DRAIN_WAIT;
    while old.iter().any(|pid| alive(*pid)) {
        if !alive(new) {
            bail!(
                "the new mesh-node of {} exited; the end of {}:\n{}",
                node.name,
                node.log().display(),
                proc::tail(&node.log(), 40)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the old mesh-node of {} ({old:?}) still runs {} s after the new one started; \
                 the end of {}:\n{}",
                node.name,
                DRAIN_WAIT.as_secs(),
                node.log().display(),
                proc::tail(&node.log(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    proc::reap();
    ready::wait_node(node, state.generation)?;
    eprintln!("node {}: mesh-node {new} ready", node.name);
    // A node that was stopped runs again: changes wait for it from now on.
    let name = node.name.clone();
    let mut state = state;
    if state.stopped.remove(&name) {
        state.save()?;
    }
    Ok(())
}

/// Sends SIGTERM to `pids` (the mesh-node of `node`) and waits until they exited.
fn terminate(node: &NodeInfo, pids: &[u32]) -> Result<()> {
    for pid in pids {
        // Gone meanwhile is fine: the wait below is what matters.
        let _ = crate::cmd::run(Command::new("kill").args(["-TERM", &pid.to_string()]));
    }
    let deadline = Instant::now() + DRAIN_WAIT;
    while pids.iter().any(|pid| alive(*pid)) {
        if Instant::now() > deadline {
            bail!(
                "the mesh-node of {} ({pids:?}) still runs {} s after SIGTERM; the end of {}:\n{}",
                node.name,
                DRAIN_WAIT.as_secs(),
                node.log().display(),
                proc::tail(&node.log(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    proc::reap();
    Ok(())
}

/// Kills the mesh CA (SIGKILL), leaves it down for `down_for`, and starts it again on its
/// state directory (the same root): what the nodes see when istiod is rescheduled.
pub fn restart_ca(down_for: Duration) -> Result<()> {
    require_root()?;
    let state = load_state()?;
    if !state.mesh {
        bail!("the cluster runs without mesh-node ({NO_MESH_ENV})");
    }
    let bins = state.binaries.as_ref().context("mesh-node was not built")?;
    cgroup::kill(&ca::cgroup())?;
    std::thread::sleep(down_for);
    ca::start(bins, &state.nodes)
}

/// The directory of YAML every node's mesh-node (and the CA) reads: a file written there
/// (atomically, see [`write_atomic`]) is configuration beside the cluster's own.
pub fn config_dir() -> PathBuf {
    state::config_dir()
}

/// Replaces `path` whole (a temporary file, then a rename), so a reader never sees half of it.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    state::write_atomic(path, contents)
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// The processes of `ns/pod` (its containers and sidecar) or of `node/NAME` (its mesh-node).
pub fn pids(target: &str) -> Result<Vec<u32>> {
    let state = load_state()?;
    let dir = match Target::parse(target)? {
        Target::Node(name) => state
            .node(name)
            .with_context(|| format!("no node {name}"))?
            .proxy_cgroup(),
        Target::Pod(key) => state
            .pods
            .get(key)
            .with_context(|| format!("no pod {key}"))?
            .cgroup(),
    };
    Ok(cgroup::procs(&dir))
}

/// What the kernel counts of a node proxy's memory, in the group that limits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyMemory {
    pub limit: u64,
    /// The group's highest usage so far.
    pub peak: u64,
    /// Processes the kernel's OOM killer killed in the group.
    pub oom_kills: u64,
}

/// The memory group of `node`'s mesh-node (`None`: the machine has no memory controller).
pub fn proxy_memory(node: &str) -> Result<Option<ProxyMemory>> {
    let state = load_state()?;
    let node = state
        .node(node)
        .with_context(|| format!("no node {node}"))?;
    Ok(cgroup::proxy_memory(&node.proxy_cgroup(), &node.name))
}

/// A pod's address (`ns/pod`).
pub fn pod_ip(pod: &str) -> Result<Ipv4Addr> {
    let state = load_state()?;
    Ok(state
        .pods
        .get(pod)
        .with_context(|| format!("no pod {pod}"))?
        .ip)
}

/// A Service's ClusterIP (`ns/name`).
pub fn cluster_ip(service: &str) -> Result<Ipv4Addr> {
    let state = load_state()?;
    state
        .services
        .get(service)
        .copied()
        .with_context(|| format!("no Service {service} with a ClusterIP"))
}

/// The log file of `ns/pod` or `node/NAME`.
pub fn log_path(target: &str) -> Result<PathBuf> {
    let state = load_state()?;
    match Target::parse(target)? {
        Target::Node(name) => Ok(state
            .node(name)
            .with_context(|| format!("no node {name}"))?
            .log()),
        Target::Pod(key) => Ok(state
            .pods
            .get(key)
            .with_context(|| format!("no pod {key}"))?
            .log()),
    }
}

enum Target<'a> {
    Node(&'a str),
    Pod(&'a str),
}

impl<'a> Target<'a> {
    fn parse(target: &'a str) -> Result<Self> {
        if let Some(node) = target.strip_prefix("node/") {
            return Ok(Self::Node(node));
        }
        match target.split_once('/') {
            Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                Ok(Self::Pod(target))
            }
            _ => bail!("target {target:?} is neither `namespace/pod` nor `node/NAME`"),
        }
    }
}

/// The command `cmd` placed in a pod (its cgroup, then `ip netns exec` into its namespace
/// so that its hosts file applies) or in a node's namespace.
fn exec_command(target: &str, cmd: &[String]) -> Result<Command> {
    require_root()?;
    let (program, args) = cmd.split_first().context("no command to run")?;
    let state = load_state()?;
    let bins = state.binaries.as_ref();
    let program = launch::resolve(program, bins)?;
    match Target::parse(target)? {
        Target::Node(name) => {
            let node = state
                .node(name)
                .with_context(|| format!("no node {name}"))?;
            let mut command = Command::new(program);
            command.args(args);
            Placement::new().netns(&node.netns())?.install(&mut command);
            Ok(command)
        }
        Target::Pod(key) => {
            let pod = state
                .pods
                .get(key)
                .with_context(|| format!("no pod {key}"))?;
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", &pod.netns])
                .arg(program)
                .args(args);
            if let Some(path) = launch::path_with(bins) {
                command.env("PATH", path);
            }
            Placement::new()
                .cgroup(&pod.cgroup())?
                .install(&mut command);
            Ok(command)
        }
    }
}

/// The command `cmd` placed in `ns/pod` or `node/NAME`, for a caller that sets its standard
/// streams itself.
pub fn command(target: &str, cmd: &[String]) -> Result<Command> {
    exec_command(target, cmd)
}

/// Runs `cmd` in `ns/pod` or `node/NAME` and collects its output.
pub fn exec(target: &str, cmd: &[String]) -> Result<Output> {
    let mut command = exec_command(target, cmd)?;
    command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?} in {target}"))
}

/// Starts `cmd` in `ns/pod` or `node/NAME` with its standard streams piped, for a command
/// the caller talks to while it runs; closing its stdin is the caller's way to end it.
pub fn spawn(target: &str, cmd: &[String]) -> Result<Child> {
    exec_command(target, cmd)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?} in {target}"))
}

/// Runs `cmd` in `ns/pod` or `node/NAME` with this terminal and returns its exit code
/// (128 + signal number when a signal ended it, as shells report it).
pub fn exec_status(target: &str, cmd: &[String]) -> Result<i32> {
    use std::os::unix::process::ExitStatusExt as _;
    let status = exec_command(target, cmd)?
        .status()
        .with_context(|| format!("running {cmd:?} in {target}"))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// `meshctl ARGS` against every node proxy of the cluster: each node's admin
/// (`127.0.0.1:15020` inside the node, which answers only there) is forwarded to a loopback
/// port of the host, as `kubectl port-forward` would, and meshctl is given those as
/// `--admin`. The forwards end with the command.
pub fn meshctl_command(args: &[String]) -> Result<(Command, Vec<forward::Forward>)> {
    require_root()?;
    let state = load_state()?;
    let bins = state
        .binaries
        .as_ref()
        .context("the cluster was started without the workspace binaries")?;
    let meshctl = bins.weft_demo.with_file_name("meshctl");
    if !meshctl.exists() {
        bail!(
            "{} is not built (cargo build -p mesh-node --bins)",
            meshctl.display()
        );
    }
    let admin: SocketAddr = ([127, 0, 0, 1], 15020).into();
    let forwards = state
        .nodes
        .iter()
        .map(|node| forward::Forward::start(&node.netns(), admin))
        .collect::<Result<Vec<_>>>()?;
    let admins: Vec<String> = forwards.iter().map(|f| f.local().to_string()).collect();
    let mut command = Command::new(meshctl);
    command.arg("--admin").arg(admins.join(",")).args(args);
    Ok((command, forwards))
}

/// Runs `meshctl ARGS` against the cluster with this terminal; returns its exit code.
pub fn meshctl(args: &[String]) -> Result<i32> {
    let (mut command, _forwards) = meshctl_command(args)?;
    let status = command.status().context("running meshctl")?;
    Ok(status.code().unwrap_or(1))
}

/// Runs `meshctl ARGS` against the cluster and collects its output.
pub fn meshctl_output(args: &[String]) -> Result<Output> {
    let (mut command, _forwards) = meshctl_command(args)?;
    command
        .stdin(Stdio::null())
        .output()
        .context("running meshctl")
}

/// A human-readable table of nodes, pods and Services.
pub fn status() -> Result<String> {
    match State::load()? {
        Some(state) => Ok(status::render(&state)),
        None => Ok("no virtual cluster is up\n".into()),
    }
}

/// Removes everything the cluster created, also after a crash or without a state file;
/// does nothing when nothing is there.
pub fn down() -> Result<()> {
    require_root()?;
    down::down()
}
