//! Starting processes inside the virtual cluster: in a cgroup, a network namespace, or both.
//!
//! The placement happens between fork and exec (`pre_exec`), so a process is never seen
//! outside its cgroup or namespace, not even for its first instruction: mesh-node attaches
//! its programs to the node's cgroup and a pod must be under them from the start. The hook
//! itself, xtask's only `unsafe` code, is in `crate::sys`.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context as _, Result};

use crate::sys;

/// Where a new process goes. Files are opened before fork: the child may only make
/// async-signal-safe calls, so it must not allocate or open paths itself.
#[derive(Default)]
pub struct Placement {
    cgroup_procs: Vec<File>,
    netns: Option<File>,
    new_session: bool,
}

impl Placement {
    pub fn new() -> Self {
        Self::default()
    }

    /// Join the cgroup `dir` (before any namespace change: `ip netns exec` remounts /sys,
    /// after which the cgroup filesystem is out of sight). Called again, the groups of other
    /// hierarchies (cgroup v1 controllers) are joined too.
    pub fn cgroup(mut self, dir: &Path) -> Result<Self> {
        let path = dir.join("cgroup.procs");
        self.cgroup_procs.push(
            OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?,
        );
        Ok(self)
    }

    /// Enter the network namespace `/var/run/netns/<name>` with setns(2), keeping the mount
    /// namespace (and with it /sys/fs/bpf and the cgroup filesystem) as it is.
    pub fn netns(mut self, name: &str) -> Result<Self> {
        let path = Path::new("/var/run/netns").join(name);
        self.netns = Some(
            File::open(&path)
                .with_context(|| format!("opening {} (is the cluster up?)", path.display()))?,
        );
        Ok(self)
    }

    /// Start a new session, detached from the terminal: the process outlives xtask and
    /// Ctrl-C in the terminal must not reach it.
    pub fn detached(mut self) -> Self {
        self.new_session = true;
        self
    }

    pub fn install(self, cmd: &mut Command) {
        let Placement {
            cgroup_procs,
            netns,
            new_session,
        } = self;
        sys::place_before_exec(cmd, cgroup_procs, netns, new_session);
    }
}

/// Children started by this process: kept so they can be reaped after they are killed
/// (otherwise a long-lived caller such as the test harness collects zombies).
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Starts a long-running process with stdin closed and stdout/stderr appended to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<u32> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start `{}`", crate::cmd::describe(cmd)))?;
    let pid = child.id();
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child);
    Ok(pid)
}

/// Waits for every exited child started by [`spawn_logged`]; never blocks.
pub fn reap() {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain_mut(|child| matches!(child.try_wait(), Ok(None)));
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("({} does not exist)", path.display());
    };
    // The end is enough; node logs can grow large.
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        format!("({} is empty)", path.display())
    } else {
        tail
    }
}
