//! Waiting until the cluster is usable: node proxies ready and running the latest
//! configuration, pods listening on their declared ports.

use std::{
    collections::BTreeSet,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    cgroup, proc,
    state::{NodeInfo, PodInfo},
};
use crate::cmd;

pub const NODE_TIMEOUT: Duration = Duration::from_secs(60);
pub const POD_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);
const LOG_LINES: usize = 30;

/// A command run inside a node's namespace through `ip netns exec` (a short-lived probe;
/// it does not matter that /sys is remounted for it).
fn in_netns(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]);
    cmd
}

/// Whether the node's `/ready` answers 200.
pub fn node_ready(node: &NodeInfo) -> bool {
    cmd::succeeds(in_netns(&node.netns(), "curl").args([
        "-sf",
        "--max-time",
        "1",
        "http://127.0.0.1:15021/ready",
    ]))
}

/// What a node's `/debug/config` says about the configuration it runs.
#[derive(Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Generation of the source files of the current snapshot.
    pub generation: Option<u64>,
    /// Version of the current snapshot, and the versions each consumer has applied.
    pub version: u64,
    pub proxy: u64,
    pub ebpf: u64,
}

impl NodeConfig {
    /// Whether the node runs `generation` in both consumers. Ready with eBPF at 0 means
    /// `--no-ebpf` (readiness otherwise requires an eBPF sync).
    fn applied(&self, generation: u64) -> bool {
        self.generation == Some(generation)
            && self.proxy >= self.version
            && (self.ebpf >= self.version || self.ebpf == 0)
    }
}

pub fn node_config(node: &NodeInfo) -> Option<NodeConfig> {
    let body = cmd::output(in_netns(&node.netns(), "curl").args([
        "-sf",
        "--max-time",
        "1",
        "http://127.0.0.1:15020/debug/config",
    ]))
    .ok()?;
    parse_config(&body)
}

fn parse_config(body: &str) -> Option<NodeConfig> {
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    let num = |pointer: &str| json.pointer(pointer).and_then(serde_json::Value::as_u64);
    Some(NodeConfig {
        generation: num("/generation"),
        version: num("/version")?,
        proxy: num("/applied/proxy").unwrap_or(0),
        ebpf: num("/applied/ebpf").unwrap_or(0),
    })
}

/// Waits until the node's proxy is ready and reports `generation`.
pub fn wait_node(node: &NodeInfo, generation: u64) -> Result<()> {
    let deadline = Instant::now() + NODE_TIMEOUT;
    let mut seen: Option<NodeConfig> = None;
    loop {
        if !cgroup::populated(&node.proxy_cgroup()) {
            bail!(
                "mesh-node of {} exited; the end of {}:\n{}",
                node.name,
                node.log().display(),
                proc::tail(&node.log(), LOG_LINES)
            );
        }
        let ready = node_ready(node);
        if ready {
            seen = node_config(node);
            if seen.as_ref().is_some_and(|c| c.applied(generation)) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let why = if ready {
                format!("it has not applied generation {generation}: {seen:?}")
            } else {
                "http://127.0.0.1:15021/ready never answered 200".to_string()
            };
            bail!(
                "mesh-node of {} not ready after {} s: {why}; the end of {}:\n{}",
                node.name,
                NODE_TIMEOUT.as_secs(),
                node.log().display(),
                proc::tail(&node.log(), LOG_LINES)
            );
        }
        thread::sleep(POLL);
    }
}

/// Waits until every declared TCP port of the pod listens in its namespace.
pub fn wait_pod(pod: &PodInfo) -> Result<()> {
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        if !cgroup::populated(&pod.cgroup()) {
            bail!(
                "pod {} exited; the end of {}:\n{}",
                pod.key(),
                pod.log().display(),
                proc::tail(&pod.log(), LOG_LINES)
            );
        }
        let listening = cmd::output(in_netns(&pod.netns, "ss").arg("-ltnH"))
            .map(|out| listening_ports(&out))
            .unwrap_or_default();
        let missing: Vec<u16> = pod
            .ports
            .iter()
            .copied()
            .filter(|p| !listening.contains(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "pod {} not listening on {missing:?} after {} s; the end of {}:\n{}",
                pod.key(),
                POD_TIMEOUT.as_secs(),
                pod.log().display(),
                proc::tail(&pod.log(), LOG_LINES)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Local ports of `ss -ltnH` output (`LISTEN 0 128 0.0.0.0:9080 0.0.0.0:*`, `[::]:80`,
/// `*:8080`, `127.0.0.1%lo:53`).
fn listening_ports(ss: &str) -> BTreeSet<u16> {
    ss.lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit_once(':'))
        .filter_map(|(_, port)| port.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_listeners() {
        let out = "LISTEN 0      128          0.0.0.0:9080       0.0.0.0:*\n\
                   LISTEN 0      4096            [::]:15021          [::]:*\n\
                   LISTEN 0      5                  *:8080             *:*\n\
                   LISTEN 0      10     127.0.0.1%lo:53         0.0.0.0:*\n";
        assert_eq!(
            listening_ports(out),
            BTreeSet::from([53, 8080, 9080, 15021])
        );
        assert!(listening_ports("").is_empty());
    }

    #[test]
    fn a_generation_counts_once_both_consumers_applied_it() {
        let config = |body: &str| parse_config(body).unwrap();
        let done = config(r#"{"version": 4, "generation": 7, "applied": {"proxy": 4, "ebpf": 4}}"#);
        assert!(done.applied(7));
        assert!(!done.applied(8));
        let ebpf_behind =
            config(r#"{"version": 4, "generation": 7, "applied": {"proxy": 4, "ebpf": 3}}"#);
        assert!(!ebpf_behind.applied(7));
        let proxy_behind =
            config(r#"{"version": 4, "generation": 7, "applied": {"proxy": 3, "ebpf": 4}}"#);
        assert!(!proxy_behind.applied(7));
        let no_ebpf =
            config(r#"{"version": 2, "generation": 7, "applied": {"proxy": 2, "ebpf": 0}}"#);
        assert!(no_ebpf.applied(7));
        assert_eq!(
            config(r#"{"version": 1, "generation": null}"#).generation,
            None
        );
        assert!(parse_config("not json").is_none());
    }
}
