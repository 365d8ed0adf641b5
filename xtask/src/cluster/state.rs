//! What the virtual cluster consists of, persisted in `/run/weft-cluster/state.json` so that
//! every `cargo xtask cluster ...` invocation (and the tests) sees the same cluster.
//!
//! The state is a convenience, not the only record: `down` also finds everything by name
//! prefix, so a lost or corrupt state file never leaves namespaces or cgroups behind.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{net, Binaries};

pub const RUN_DIR: &str = "/run/weft-cluster";
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/weft-cluster";
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/weft";

pub fn config_dir() -> PathBuf {
    Path::new(RUN_DIR).join("config")
}

pub fn log_dir() -> PathBuf {
    Path::new(RUN_DIR).join("logs")
}

fn state_file() -> PathBuf {
    Path::new(RUN_DIR).join("state.json")
}

/// One node: a network namespace with an uplink on the fabric bridge and its own mesh-node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// 1-based, in order of first appearance; fixes every address of the node.
    pub index: u8,
}

impl NodeInfo {
    /// The node's uplink address on the fabric (`eth0`), 172.31.0.(10+i).
    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, 0, 10 + self.index)
    }

    /// The pods' default gateway and the node proxy's address, 10.244.i.1.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 1)
    }

    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    pub fn netns(&self) -> String {
        net::node_netns(&self.name)
    }

    /// The subtree mesh-node attaches its cgroup programs to.
    pub fn cgroup(&self) -> PathBuf {
        Path::new(CGROUP_ROOT).join(&self.name)
    }

    pub fn proxy_cgroup(&self) -> PathBuf {
        self.cgroup().join("proxy")
    }

    pub fn log(&self) -> PathBuf {
        log_dir().join(format!("node-{}.log", self.name))
    }

    /// Where its mesh-node answers the container runtime's `weft-cni` (one per node, as the
    /// nodes share this machine's filesystem).
    pub fn cni_socket(&self) -> PathBuf {
        Path::new(RUN_DIR)
            .join("cni")
            .join(&self.name)
            .join("cni.sock")
    }
}

/// One pod: a network namespace behind a veth into its node, and a cgroup under the node's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// Host-side veth in the node's namespace.
    pub veth: String,
    pub uid: String,
    /// Hash of the pod's spec: a pod is recreated only when this changes, so label and
    /// annotation edits never restart it.
    pub spec_hash: String,
    /// TCP container ports; the pod is ready when each one listens.
    pub ports: Vec<u16>,
}

impl PodInfo {
    pub fn key(&self) -> String {
        pod_key(&self.namespace, &self.name)
    }

    pub fn cgroup(&self) -> PathBuf {
        Path::new(CGROUP_ROOT)
            .join(&self.node)
            .join("pods")
            .join(format!("{}_{}", self.namespace, self.name))
    }

    pub fn log(&self) -> PathBuf {
        log_dir().join(format!("{}_{}.log", self.namespace, self.name))
    }
}

pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Written to `config/generation` with every configuration change.
    pub generation: u64,
    /// Whether nodes run mesh-node (off with `WEFT_CLUSTER_NO_MESH=1`).
    pub mesh: bool,
    pub binaries: Option<Binaries>,
    /// The resources as the user wrote them, merged by kind/namespace/name.
    pub resources: Vec<Value>,
    pub nodes: Vec<NodeInfo>,
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, PodInfo>,
    /// Allocated ClusterIPs, keyed by `namespace/name`.
    pub services: BTreeMap<String, Ipv4Addr>,
    /// Nodes whose mesh-node was stopped on purpose (`stop_node`): changes do not wait for
    /// them, and their new meshed pods wait for them.
    #[serde(default)]
    pub stopped: std::collections::BTreeSet<String>,
}

impl State {
    pub fn empty(mesh: bool) -> Self {
        Self {
            mesh,
            ..Self::default()
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The persisted state, `None` when no cluster is up.
    pub fn load() -> Result<Option<Self>> {
        let path = state_file();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).map(Some).with_context(|| {
            format!(
                "{} is corrupt: run `cargo xtask cluster down` and start again",
                path.display()
            )
        })
    }

    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_atomic(&state_file(), text.as_bytes())
    }
}

/// Replaces `path` whole (temporary file + rename) so readers, mesh-node's config poller in
/// particular, never see half a file. The temporary name ends in `.tmp`, which the poller
/// ignores.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().context("path without a directory")?;
    let name = path.file_name().context("path without a file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_follow_the_index() {
        let node = NodeInfo {
            name: "node-2".into(),
            index: 2,
        };
        assert_eq!(node.address(), Ipv4Addr::new(172, 31, 0, 12));
        assert_eq!(node.gateway(), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(node.pod_cidr(), "10.244.2.0/24");
        assert_eq!(node.netns(), "wn-node-2");
        assert_eq!(
            node.proxy_cgroup(),
            Path::new("/sys/fs/cgroup/unified/weft-cluster/node-2/proxy")
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut state = State::empty(true);
        state.generation = 3;
        state.nodes.push(NodeInfo {
            name: "node-1".into(),
            index: 1,
        });
        state
            .services
            .insert("default/reviews".into(), Ipv4Addr::new(10, 96, 0, 10));
        state
            .resources
            .push(serde_json::json!({"kind": "Namespace"}));
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), state);
    }
}
