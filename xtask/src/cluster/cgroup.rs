//! The virtual cluster's cgroup v2 tree:
//!
//! ```text
//! /sys/fs/cgroup/unified/weft-cluster/<node>/           mesh-node attaches here (--cgroup)
//! /sys/fs/cgroup/unified/weft-cluster/<node>/proxy      the node's mesh-node
//! /sys/fs/cgroup/unified/weft-cluster/<node>/pods/<ns>_<pod>
//! ```
//!
//! Every process the cluster starts lives in it, which is how `down` finds exactly those
//! processes (`cgroup.kill`) and nothing else.
//!
//! Each mesh-node runs under the memory limit the DaemonSet gives it ([`PROXY_MEMORY_LIMIT`]),
//! enforced by the kernel: in its `proxy` group when memory is a cgroup v2 controller here,
//! else in the same tree under cgroup v1's memory controller ([`MEMORY_V1_ROOT`]).

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::proc;

/// `resources.limits.memory` of the mesh-node container in `deploy/mesh/daemonset.yaml`.
pub const PROXY_MEMORY_LIMIT: u64 = 512 << 20;
/// The cluster's groups under cgroup v1's memory controller (when memory is not in v2).
pub const MEMORY_V1_ROOT: &str = "/sys/fs/cgroup/memory/weft-cluster";

/// Puts the memory limit on the mesh-node of the node whose group is `node` (under the cgroup
/// v2 tree root `root`): set on its `proxy` group (v2), or on a group of the memory
/// controller's own hierarchy (v1), returned for the process to join too. `None` when the
/// machine has neither (the proxies then run without a limit, which is said).
pub fn limit_proxy_memory(root: &Path, node: &Path, limit: u64) -> Result<Option<PathBuf>> {
    let name = node.file_name().context("a node group has a name")?;
    let unified = root
        .parent()
        .context("the cluster tree is not the cgroup root")?;
    let v2 = fs::read_to_string(unified.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
    if v2 {
        for dir in [unified, root, node] {
            fs::write(dir.join("cgroup.subtree_control"), "+memory").with_context(|| {
                format!("enabling the memory controller below {}", dir.display())
            })?;
        }
        let proxy = node.join("proxy");
        fs::write(proxy.join("memory.max"), limit.to_string())
            .with_context(|| format!("limiting the memory of {}", proxy.display()))?;
        return Ok(None);
    }
    let v1 = Path::new(MEMORY_V1_ROOT);
    if !v1
        .parent()
        .is_some_and(|p| p.join("memory.limit_in_bytes").exists())
    {
        eprintln!(
            "note: no memory cgroup controller on this machine: node proxies run without a memory limit"
        );
        return Ok(None);
    }
    let proxy = v1.join(name).join("proxy");
    create(&proxy)?;
    fs::write(proxy.join("memory.limit_in_bytes"), limit.to_string())
        .with_context(|| format!("limiting the memory of {}", proxy.display()))?;
    // The peak is the new process's from here (v2's groups start afresh with each node).
    let _ = fs::write(proxy.join("memory.max_usage_in_bytes"), "0");
    Ok(Some(proxy))
}

/// The limit, peak usage and OOM kills of the memory group of the mesh-node whose v2 group
/// is `proxy`: that group itself (v2), or its twin under [`MEMORY_V1_ROOT`].
pub fn proxy_memory(proxy: &Path, node: &str) -> Option<super::ProxyMemory> {
    let number = |dir: &Path, file: &str| -> Option<u64> {
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    };
    let oom_kills = |dir: &Path, file: &str| -> Option<u64> {
        fs::read_to_string(dir.join(file))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    };
    if let Some(limit) = number(proxy, "memory.max") {
        return Some(super::ProxyMemory {
            limit,
            peak: number(proxy, "memory.peak")?,
            oom_kills: oom_kills(proxy, "memory.events")?,
        });
    }
    let v1 = Path::new(MEMORY_V1_ROOT).join(node).join("proxy");
    Some(super::ProxyMemory {
        limit: number(&v1, "memory.limit_in_bytes")?,
        peak: number(&v1, "memory.max_usage_in_bytes")?,
        oom_kills: oom_kills(&v1, "memory.oom_control")?,
    })
}

pub fn create(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

/// Pids directly in `dir` (not in its descendants).
pub fn procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether any live process is in `dir` or below it.
pub fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// SIGKILLs every process in the subtree `dir` (`cgroup.kill`, so forks cannot escape) and
/// waits until they are gone.
pub fn kill(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if populated(dir) {
        fs::write(dir.join("cgroup.kill"), "1")
            .with_context(|| format!("killing the processes of {}", dir.display()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(dir) {
        if Instant::now() > deadline {
            bail!(
                "processes of {} survived SIGKILL for 10 s: {:?}",
                dir.display(),
                procs(dir)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    // Children of this process stay zombies (and hold their pid) until waited for.
    proc::reap();
    Ok(())
}

/// Removes `dir` and every cgroup below it, deepest first. Missing directories are fine.
pub fn remove_tree(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // A cgroup whose last process just exited can stay busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                proc::reap();
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
        }
    }
}
