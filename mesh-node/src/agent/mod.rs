//! The node agent: loads Weft's eBPF programs, attaches them to the node's cgroup subtree and
//! pod interfaces, and keeps their maps in step with the model.
//!
//! Programs, links and maps are pinned under `<bpffs-root>/<node>/`, so the data path keeps
//! enforcing the mesh while `mesh-node` restarts: meshed pods' new connections are refused until
//! the proxy listens again (fail closed), and a restarted agent takes the pinned maps over.

pub mod cni;
mod ebpf;
mod route;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Arc},
};

use tokio::sync::watch;

pub use self::ebpf::cleanup;
use crate::{
    metrics::EbpfCounters,
    model::{OriginalDst, Snapshot},
};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    /// The cgroup v2 subtree whose sockets are subject to capture.
    pub cgroup_root: PathBuf,
    /// Where pins live, one directory per node (`/sys/fs/bpf/weft`).
    pub bpffs_root: PathBuf,
    /// The address pods reach the node proxy on.
    pub proxy_ip: Ipv4Addr,
    /// Interfaces (besides pod interfaces) where traffic for local pods arrives.
    pub uplinks: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "cannot open cgroup {path}: {source} (is cgroup v2 mounted and does the directory exist?)"
    )]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use bpffs at {path}: {source} (mount it: `mount -t bpf bpf /sys/fs/bpf`)")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0} (are we root on a kernel with BPF support?)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("node networking for inbound capture: {0}")]
    Route(String),
}

/// A loaded and attached data path, ready to be synced.
pub struct Agent {
    cfg: AgentConfig,
    data_path: ebpf::DataPath,
}

impl Agent {
    /// Loads, attaches and pins the programs. Blocking; call it before serving.
    pub fn load(cfg: AgentConfig) -> Result<Self, AgentError> {
        route::prepare_inbound().map_err(AgentError::Route)?;
        let data_path = ebpf::DataPath::load(&cfg)?;
        Ok(Self { cfg, data_path })
    }

    /// The programs attached, as `meshctl status` lists them: the links pinned under the
    /// node's bpffs directory (cgroup hooks, `sock_ops`, each interface's classifiers) and the
    /// socket map's `sk_msg` verdict.
    pub fn programs(&self) -> Arc<dyn Fn() -> Vec<String> + Send + Sync> {
        let links = self.data_path.links_dir().to_path_buf();
        Arc::new(move || ebpf::pinned_links(&links))
    }

    pub fn original_dst(&self) -> Arc<dyn OriginalDst> {
        self.data_path.original_dst()
    }

    pub fn counters(&self) -> Arc<dyn EbpfCounters> {
        self.data_path.counters()
    }

    /// Applies every snapshot to the maps and the interface attachments, and re-checks pod
    /// cgroups and interfaces every second (they can appear after the pod object).
    /// Enrollments from the container runtime ([`cni`]) are applied at once, and answered
    /// once the maps hold them.
    pub async fn run(
        self,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        applied: Arc<AtomicU64>,
        mut enrollments: tokio::sync::mpsc::Receiver<cni::Enroll>,
    ) {
        let Self { cfg, data_path } = self;
        let mut sync = ebpf::Sync::new(cfg, data_path);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            sync.apply(&snapshot, &applied);
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tick.tick() => {}
                Some(request) = enrollments.recv() => match request {
                    cni::Enroll::Add(enrollment) => {
                        sync.enroll(enrollment.key.clone(), enrollment.ip, enrollment.uid);
                        let snapshot = snapshots.borrow().clone();
                        sync.apply(&snapshot, &applied);
                        let _ = enrollment.reply.send(sync.enrolled(&enrollment.key));
                    }
                    cni::Enroll::Remove(key) => sync.forget(&key),
                },
            }
        }
    }
}

/// The directory holding a node's pins.
fn node_dir(bpffs_root: &Path, node: &str) -> PathBuf {
    bpffs_root.join(node)
}
