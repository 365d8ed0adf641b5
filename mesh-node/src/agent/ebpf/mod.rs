//! Loading, attaching and pinning the programs; map handles for the proxy and the metrics.

mod sync;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, SockHash},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSockAddr, SchedClassifier, SkMsg, SockOps, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{names, Counter, OrigDst, SockAddr4, SockKey};
use tracing::{info, warn};

pub use self::sync::Sync;
use super::{node_dir, AgentConfig, AgentError};
use crate::{metrics::EbpfCounters, model::OriginalDst};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// Maps that outlive the process (pinned, taken over by the next agent).
const PINNED_MAPS: [&str; 7] = [
    names::MESHED_CGROUPS,
    names::MESH_DESTS,
    names::LOCAL_MESHED_PODS,
    names::ORIG_DST_BY_COOKIE,
    names::ORIG_DST_BY_TUPLE,
    names::SOCK_HASH,
    names::COUNTERS,
];

const CGROUP_PROGRAMS: [&str; 4] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
];

/// cgroup programs are attached as BPF links, which always allow several programs per cgroup
/// (the kernel rejects the `ALLOW_MULTI` flag on links): old and new agents overlap on handover.
const CGROUP_LINK: CgroupAttachMode = CgroupAttachMode::Single;

/// The loaded object, its maps, and the classifier that gets attached per interface.
pub struct DataPath {
    ebpf: Ebpf,
    links_dir: PathBuf,
    orig_dst: Arc<TupleOrigDst>,
    counters: Arc<Counters>,
    meshed_cgroups: BpfHashMap<MapData, u64, u32>,
    mesh_dests: BpfHashMap<MapData, u32, u32>,
    local_meshed_pods: BpfHashMap<MapData, u32, u32>,
}

fn pin_err(path: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Pin {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> AgentError {
    move |source| AgentError::Map { map, source }
}

fn prog_err(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> AgentError {
    move |source| AgentError::Program { program, source }
}

impl DataPath {
    pub fn load(cfg: &AgentConfig) -> Result<Self, AgentError> {
        let dir = node_dir(&cfg.bpffs_root, &cfg.node);
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(|source| AgentError::Bpffs {
                path: d.clone(),
                source,
            })?;
        }
        let proxy_ip4 = u32::from_ne_bytes(cfg.proxy_ip.octets());
        let mut loader = EbpfLoader::new();
        loader.override_global(names::GLOBAL_PROXY_IP4, &proxy_ip4, true);
        let map_paths: Vec<(&str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|name| (*name, maps_dir.join(name)))
            .collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;

        let cgroup = fs::File::open(&cfg.cgroup_root).map_err(|source| AgentError::Cgroup {
            path: cfg.cgroup_root.clone(),
            source,
        })?;
        for name in CGROUP_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let id = prog.attach(&cgroup, CGROUP_LINK).map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            replace_pinned(&links_dir.join(name), link)?;
        }
        {
            let name = names::PROG_SOCK_OPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let id = prog.attach(&cgroup, CGROUP_LINK).map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            replace_pinned(&links_dir.join(name), link)?;
        }
        {
            let name = names::PROG_SK_MSG;
            let sock_hash_fd = {
                let map = ebpf
                    .map(names::SOCK_HASH)
                    .ok_or_else(|| missing_map(names::SOCK_HASH))?;
                let hash: SockHash<&MapData, SockKey> =
                    SockHash::try_from(map).map_err(map_err(names::SOCK_HASH))?;
                hash.fd().try_clone().map_err(|e| pin_err(&maps_dir, e))?
            };
            let prog: &mut SkMsg = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            // Attaching replaces the verdict program of the (pinned) socket hash. The attachment
            // belongs to the map, not to this process: keep it when we exit so sockets already
            // on the fast path stay on it.
            let id = prog.attach(&sock_hash_fd).map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            std::mem::forget(link);
        }
        for name in [names::PROG_TC_INBOUND, names::PROG_TC_TO_POD] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }

        let orig = take_map(&mut ebpf, names::ORIG_DST_BY_TUPLE)?;
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let data_path = Self {
            orig_dst: Arc::new(TupleOrigDst {
                map: BpfHashMap::try_from(orig).map_err(map_err(names::ORIG_DST_BY_TUPLE))?,
            }),
            counters: Arc::new(Counters {
                map: PerCpuArray::try_from(counters).map_err(map_err(names::COUNTERS))?,
            }),
            meshed_cgroups: hash_map(&mut ebpf, names::MESHED_CGROUPS)?,
            mesh_dests: hash_map(&mut ebpf, names::MESH_DESTS)?,
            local_meshed_pods: hash_map(&mut ebpf, names::LOCAL_MESHED_PODS)?,
            ebpf,
            links_dir,
        };
        info!(node = %cfg.node, cgroup = %cfg.cgroup_root.display(), pins = %dir.display(), "eBPF programs attached");
        Ok(data_path)
    }

    pub fn links_dir(&self) -> &Path {
        &self.links_dir
    }

    pub fn original_dst(&self) -> Arc<dyn OriginalDst> {
        self.orig_dst.clone()
    }

    pub fn counters(&self) -> Arc<dyn EbpfCounters> {
        self.counters.clone()
    }

    /// Attaches the classifier for `hook` to `iface` and pins the link as
    /// `links/tc-<in|out>-<iface>`, replacing a link pinned there before.
    fn attach_tc(&mut self, hook: TcHook, iface: &str) -> Result<(), AgentError> {
        let name = hook.program();
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let id = prog
            .attach(iface, hook.attach_type())
            .map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        replace_pinned(&self.tc_pin(hook, iface), link)
    }

    fn detach_tc(&self, hook: TcHook, iface: &str) {
        unpin_link(&self.tc_pin(hook, iface));
    }

    fn tc_pin(&self, hook: TcHook, iface: &str) -> PathBuf {
        self.links_dir.join(format!("{}{iface}", hook.pin_prefix()))
    }

    /// Classifiers pinned by this or an earlier agent.
    fn pinned_tc(&self) -> Vec<(TcHook, String)> {
        fs::read_dir(&self.links_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                [TcHook::Ingress, TcHook::Egress]
                    .into_iter()
                    .find_map(|hook| {
                        name.strip_prefix(hook.pin_prefix())
                            .map(|iface| (hook, iface.to_owned()))
                    })
            })
            .collect()
    }
}

/// Where a classifier runs: ingress of pod interfaces and uplinks (steering), or egress of pod
/// interfaces (catching Service traffic translated after ingress).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcHook {
    Ingress,
    Egress,
}

impl TcHook {
    fn program(self) -> &'static str {
        match self {
            TcHook::Ingress => names::PROG_TC_INBOUND,
            TcHook::Egress => names::PROG_TC_TO_POD,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            TcHook::Ingress => TcAttachType::Ingress,
            TcHook::Egress => TcAttachType::Egress,
        }
    }

    fn pin_prefix(self) -> &'static str {
        match self {
            TcHook::Ingress => "tc-in-",
            TcHook::Egress => "tc-out-",
        }
    }
}

fn missing_map(map: &'static str) -> AgentError {
    AgentError::Map {
        map,
        source: aya::maps::MapError::InvalidName { name: map.into() },
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, AgentError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(AgentError::Program {
            program: name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(prog_err(name))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, AgentError> {
    ebpf.take_map(name).ok_or_else(|| missing_map(name))
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, AgentError> {
    BpfHashMap::try_from(take_map(ebpf, name)?).map_err(map_err(name))
}

/// Pins `link` at `path`. A link pinned there by an earlier agent is detached only after the
/// new one is attached, so there is no instant without capture.
fn replace_pinned<L>(path: &Path, link: L) -> Result<(), AgentError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let link = FdLink::try_from(link).map_err(|e| pin_err(path, e))?;
    unpin_link(path);
    link.pin(path).map_err(|e| pin_err(path, e))?;
    Ok(())
}

/// Detaches and unpins the link pinned at `path`, if any.
fn unpin_link(path: &Path) {
    if !path.exists() {
        return;
    }
    match PinnedLink::from_pin(path) {
        Ok(old) => {
            if let Err(e) = old.unpin() {
                warn!(path = %path.display(), "unpinning link: {e}");
            }
        }
        Err(e) => {
            warn!(path = %path.display(), "opening pinned link: {e}; removing the pin");
            let _ = fs::remove_file(path);
        }
    }
}

/// Detaches every program of `node` and removes its pins (links and maps): `mesh-node cleanup`.
pub fn cleanup(bpffs_root: &Path, node: &str) -> Result<(), AgentError> {
    let dir = node_dir(bpffs_root, node);
    if !dir.exists() {
        return Ok(());
    }
    let links = dir.join("links");
    for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
        unpin_link(&entry.path());
    }
    let maps = dir.join("maps");
    for entry in fs::read_dir(&maps).into_iter().flatten().flatten() {
        fs::remove_file(entry.path()).map_err(|e| pin_err(&entry.path(), e))?;
    }
    for d in [&links, &maps, &dir] {
        if d.exists() {
            fs::remove_dir(d).map_err(|e| pin_err(d, e))?;
        }
    }
    if bpffs_root.exists() && fs::read_dir(bpffs_root).is_ok_and(|mut d| d.next().is_none()) {
        let _ = fs::remove_dir(bpffs_root);
    }
    info!(node, "eBPF programs detached and pins removed");
    Ok(())
}

/// The proxy's view of `ORIG_DST_BY_TUPLE`.
struct TupleOrigDst {
    map: BpfHashMap<MapData, SockAddr4, OrigDst>,
}

impl OriginalDst for TupleOrigDst {
    fn lookup(
        &self,
        _socket: std::os::fd::BorrowedFd<'_>,
        client: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        let key = SockAddr4 {
            ip4: u32::from_ne_bytes(client.ip().octets()),
            port: u32::from(client.port()),
        };
        let orig = self.map.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            Ipv4Addr::from(orig.ip4.to_ne_bytes()),
            orig.port,
        ))
    }
}

struct Counters {
    map: PerCpuArray<MapData, u64>,
}

impl EbpfCounters for Counters {
    fn read(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .map
                    .get(&(*c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }
}

/// The links pinned in `links` (sorted), and the socket map's verdict program, which belongs
/// to the map rather than to a pin.
pub fn pinned_links(links: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(links)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    names.push(format!("{} (on {})", names::PROG_SK_MSG, names::SOCK_HASH));
    names
}
