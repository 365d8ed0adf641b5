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

use std::{
    fs, io,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::proc;

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
