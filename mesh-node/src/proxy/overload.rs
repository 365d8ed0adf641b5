//! The overload manager (Envoy's idea): the proxy knows the memory it must stay under — its
//! cgroup's limit, as Kubernetes sets it from the container's `resources.limits.memory`, or
//! `--memory-limit` — measures what it uses every [`SAMPLE_EVERY`], and gives way before the
//! kernel's OOM killer would cut off every pod of the node:
//!
//! | level | from | what the proxy does |
//! |---|---|---|
//! | pressure | 80 % | copy buffers stop growing and grown ones shrink as soon as they are empty; HTTP/1 responses close their connection (`Connection: close`) |
//! | shedding | 90 % | the heaviest client address (most connections and requests) gets no new connection and no new request (`503`, flag `OM`), another one each second while memory still grows |
//! | critical | 95 % | no new connection or request from anyone; the refused addresses' connections are cut, busy or not; others idle for [`SHED_IDLE`] (HTTP) or [`SHED_IDLE_TCP`] (TCP) are closed |
//!
//! A level is left once memory is 5 % below its threshold. Other clients' busy connections are
//! never cut: what they hold is what the budget is for.

use std::{
    fmt, fs,
    future::Future as _,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Arc, Weak,
    },
    task::Context,
    thread,
    time::Duration,
};

use tokio::{
    sync::{futures::OwnedNotified, Notify},
    time::Instant,
};
use tracing::{info, warn};

use super::sources::Sources;
use crate::metrics::{OverloadClose, OverloadMetrics};

/// How often memory is measured.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// An HTTP connection with no request in flight and no byte received for this long is closed
/// at the critical level (its client may retry on a new one).
pub const SHED_IDLE: Duration = Duration::from_secs(1);
/// An opaque TCP connection (a database pool, a subscriber) that moved nothing for this long
/// is closed at the critical level.
pub const SHED_IDLE_TCP: Duration = Duration::from_secs(10);
/// While shedding and memory still grows, the next heaviest client is refused this often.
const SHED_NEXT_AFTER: Duration = Duration::from_secs(1);
/// Failed measurements in a row after which the level goes back to normal.
const FAIL_OPEN_AFTER: u32 = 10;

/// Fractions of the budget where each level starts, and how far below it is left.
const THRESHOLDS: [(Level, f64); 3] = [
    (Level::Critical, 0.95),
    (Level::Shedding, 0.90),
    (Level::Pressure, 0.80),
];
const HYSTERESIS: f64 = 0.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Normal = 0,
    Pressure = 1,
    Shedding = 2,
    Critical = 3,
}

impl Level {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Normal,
            1 => Self::Pressure,
            2 => Self::Shedding,
            _ => Self::Critical,
        }
    }

    fn of(fraction: f64) -> Self {
        THRESHOLDS
            .iter()
            .find(|(_, at)| fraction >= *at)
            .map_or(Self::Normal, |(level, _)| *level)
    }

    /// The level at `fraction` of the budget, coming from `previous`: up at once, down only
    /// once memory is [`HYSTERESIS`] below the threshold of the level it leaves.
    fn next(previous: Self, fraction: f64) -> Self {
        let up = Self::of(fraction);
        if up >= previous {
            up
        } else {
            Self::of(fraction + HYSTERESIS).min(previous)
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Pressure => "pressure",
            Self::Shedding => "shedding",
            Self::Critical => "critical",
        })
    }
}

/// The proxy's memory state, read by every connection.
#[derive(Debug)]
pub struct Overload {
    level: AtomicU8,
    /// Told when connections should give memory back (entering pressure; every sample while
    /// critical).
    shed: Arc<Notify>,
    metrics: OverloadMetrics,
}

impl Overload {
    pub fn new(metrics: OverloadMetrics) -> Arc<Self> {
        Arc::new(Self {
            level: AtomicU8::new(Level::Normal as u8),
            shed: Arc::new(Notify::new()),
            metrics,
        })
    }

    pub fn level(&self) -> Level {
        Level::from_u8(self.level.load(Ordering::Relaxed))
    }

    /// Whether copy buffers may grow.
    pub fn may_grow(&self) -> bool {
        self.level() == Level::Normal
    }

    /// Whether HTTP/1 connections are kept alive after a response.
    pub fn keep_alive(&self) -> bool {
        self.level() == Level::Normal
    }

    /// Whether new connections and requests are taken at all.
    pub fn admits_new(&self) -> bool {
        self.level() < Level::Critical
    }

    /// Whether something new from an address is refused (`shed`: the address is marked).
    /// Marks count only while shedding: below it they are on their way out.
    pub(super) fn refuses(&self, shed: &AtomicBool) -> bool {
        let level = self.level();
        level == Level::Critical || (level == Level::Shedding && shed.load(Ordering::Relaxed))
    }

    /// Whether an idle connection should be closed now.
    pub fn sheds_idle(&self) -> bool {
        self.level() == Level::Critical
    }

    /// Completes when connections should give memory back.
    pub fn shed_signal(&self) -> OwnedNotified {
        self.shed.clone().notified_owned()
    }

    pub fn metrics(&self) -> &OverloadMetrics {
        &self.metrics
    }

    /// Records a measurement: the level it means, and the connections told.
    fn observe(&self, used: u64, budget: u64) -> (Level, Level) {
        let previous = self.level();
        let level = Level::next(previous, used as f64 / budget as f64);
        self.level.store(level as u8, Ordering::Relaxed);
        self.metrics.set_used(used, level as u8);
        if (level >= Level::Pressure && level > previous) || level == Level::Critical {
            self.shed.notify_waiters();
        }
        (previous, level)
    }

    /// Sets the level by hand (tests of what each level does).
    #[cfg(test)]
    pub fn force(&self, level: Level) {
        self.level.store(level as u8, Ordering::Relaxed);
        if level >= Level::Pressure {
            self.shed.notify_waiters();
        }
    }
}

/// A connection's ear for the overload manager: told when memory should be given back, and
/// whether the connection, idle since a given instant, is to close now.
pub struct ShedSignal {
    overload: Arc<Overload>,
    told: Pin<Box<OwnedNotified>>,
}

impl ShedSignal {
    pub fn new(overload: &Arc<Overload>) -> Self {
        Self {
            told: Box::pin(overload.shed_signal()),
            overload: overload.clone(),
        }
    }

    pub fn overload(&self) -> &Overload {
        &self.overload
    }

    /// Whether the manager spoke since the last poll (the next word wakes `cx`).
    pub fn poll_told(&mut self, cx: &mut Context<'_>) -> bool {
        let mut told = false;
        while self.told.as_mut().poll(cx).is_ready() {
            let next = self.overload.shed_signal();
            self.told.set(next);
            told = true;
        }
        told
    }

    /// Whether a connection idle since `since` is to close now, `after` being its idle
    /// threshold; counted when so.
    pub fn closes_idle(&self, since: Instant, after: Duration) -> bool {
        let close = self.overload.sheds_idle() && since.elapsed() >= after;
        if close {
            self.overload.metrics.closed(OverloadClose::Idle);
        }
        close
    }

    /// The error an idle connection it closes ends with.
    pub fn error() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "idle while the node proxy is short of memory",
        )
    }
}

/// What memory is measured against what limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    pub limit: u64,
    pub meter: MemoryMeter,
}

/// How the proxy's memory is measured: as the kernel counts it against the limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryMeter {
    /// A cgroup's working set (usage without inactive page cache, as the kubelet counts it).
    Cgroup { dir: PathBuf, v1: bool },
    /// The process's resident set.
    Rss,
}

impl MemoryMeter {
    pub fn read(&self) -> io::Result<u64> {
        match self {
            Self::Cgroup { dir, v1 } => {
                let (usage, inactive) = if *v1 {
                    ("memory.usage_in_bytes", "total_inactive_file")
                } else {
                    ("memory.current", "inactive_file")
                };
                let used = read_number(&dir.join(usage))?.unwrap_or(0);
                let stat = fs::read_to_string(dir.join("memory.stat"))?;
                let inactive = stat
                    .lines()
                    .find_map(|l| l.strip_prefix(inactive)?.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                Ok(used.saturating_sub(inactive))
            }
            Self::Rss => {
                let statm = fs::read_to_string("/proc/self/statm")?;
                let pages: u64 = statm
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| io::Error::other("unexpected /proc/self/statm"))?;
                Ok(pages * crate::sys::page_size())
            }
        }
    }
}

impl fmt::Display for MemoryMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cgroup { dir, v1: false } => write!(f, "cgroup {}", dir.display()),
            Self::Cgroup { dir, v1: true } => write!(f, "cgroup (v1) {}", dir.display()),
            Self::Rss => f.write_str("the process's resident set"),
        }
    }
}

/// A number from a cgroup file; `None` for `max` (v2) or a v1 "unlimited" (≥ 2^62).
fn read_number(path: &Path) -> io::Result<Option<u64>> {
    let text = fs::read_to_string(path)?;
    let text = text.trim();
    if text == "max" {
        return Ok(None);
    }
    let value: u64 = text
        .parse()
        .map_err(|_| io::Error::other(format!("{}: not a number: {text}", path.display())))?;
    Ok((value < 1 << 62).then_some(value))
}

impl MemoryBudget {
    /// `--memory-limit` when given (0: no budget; measured as the process's RSS), else the
    /// memory limit of the process's cgroup (v2, or v1's memory controller) or of its nearest
    /// limited ancestor; `None` when nothing limits the proxy.
    pub fn detect(flag: Option<u64>) -> Option<Self> {
        let budget = match flag {
            Some(limit) => (limit > 0).then_some(Self {
                limit,
                meter: MemoryMeter::Rss,
            }),
            None => {
                let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
                let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
                Self::of_cgroups(&cgroups, &mounts, Path::new("/"))
            }
        }?;
        if let Ok(used) = budget.meter.read() {
            if used as f64 >= budget.limit as f64 * THRESHOLDS[2].1 {
                warn!(
                    used_mib = used >> 20,
                    budget_mib = budget.limit >> 20,
                    "the memory budget is hardly above what the proxy uses at start: it will shed load at once"
                );
            }
        }
        Some(budget)
    }

    /// The budget given `/proc/self/cgroup` and `/proc/self/mountinfo`, files read under `root`:
    /// the smallest limit from the process's own group up to the top of the mount, measured
    /// in the group that sets it (what the kernel compares with that limit).
    fn of_cgroups(cgroups: &str, mountinfo: &str, root: &Path) -> Option<Self> {
        for line in cgroups.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let v1 = match controllers {
                "" => false,
                c if c.split(',').any(|c| c == "memory") => true,
                _ => continue,
            };
            let Some((mount_root, mount_point)) = mount_of(mountinfo, v1, Path::new(path)) else {
                continue;
            };
            let Ok(relative) = Path::new(path).strip_prefix(&mount_root) else {
                continue;
            };
            let top = root.join(mount_point.strip_prefix("/").unwrap_or(&mount_point));
            let file = if v1 {
                "memory.limit_in_bytes"
            } else {
                "memory.max"
            };
            let mut dir = top.join(relative);
            let mut smallest: Option<(u64, PathBuf)> = None;
            loop {
                if let Ok(Some(limit)) = read_number(&dir.join(file)) {
                    if limit > 0 && smallest.as_ref().is_none_or(|(l, _)| limit < *l) {
                        smallest = Some((limit, dir.clone()));
                    }
                }
                if dir == top || !dir.pop() || !dir.starts_with(&top) {
                    break;
                }
            }
            if let Some((limit, dir)) = smallest {
                return Some(Self {
                    limit,
                    meter: MemoryMeter::Cgroup { dir, v1 },
                });
            }
        }
        None
    }
}

/// The root and mount point of the cgroup2 mount (or of cgroup v1's memory controller) that
/// holds `path`: of several (a host's tree mounted in a container too), the one whose root is
/// the longest prefix of it. A root outside the cgroup namespace (`/..`) holds nothing.
fn mount_of(mountinfo: &str, v1: bool, path: &Path) -> Option<(PathBuf, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut fs = fs.split_whitespace();
            let fstype = fs.next()?;
            let options = fs.nth(1).unwrap_or("");
            let wanted = if v1 {
                fstype == "cgroup" && options.split(',').any(|o| o == "memory")
            } else {
                fstype == "cgroup2"
            };
            if !wanted {
                return None;
            }
            let mut fields = mount.split_whitespace();
            let root = unescape(fields.nth(3)?);
            let point = unescape(fields.next()?);
            (!root.starts_with("/..") && path.starts_with(&root))
                .then(|| (PathBuf::from(root), PathBuf::from(point)))
        })
        .max_by_key(|(root, _)| root.as_os_str().len())
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Measures memory every [`SAMPLE_EVERY`] on a thread of its own (never behind the data
/// path's work), until the proxy is gone.
pub(super) fn monitor(overload: &Arc<Overload>, sources: &Arc<Sources>, budget: MemoryBudget) {
    overload.metrics.set_budget(budget.limit);
    info!(
        budget_mib = budget.limit >> 20,
        meter = %budget.meter,
        "overload manager: the proxy keeps under its memory budget"
    );
    let overload = Arc::downgrade(overload);
    let sources = Arc::downgrade(sources);
    let spawned = thread::Builder::new()
        .name("weft-overload".into())
        .spawn(move || run(&overload, &sources, &budget));
    if let Err(e) = spawned {
        warn!(error = %e, "the overload manager could not start: no memory budget is kept");
    }
}

fn run(overload: &Weak<Overload>, sources: &Weak<Sources>, budget: &MemoryBudget) {
    let mut failing = 0u32;
    // When a client was last refused for being the heaviest, and memory then.
    // The thread's own clock (not tokio's, which tests may pause).
    use std::time::Instant;
    let mut shed: Option<(Instant, u64)> = None;
    let mut trimmed = Instant::now();
    loop {
        thread::sleep(SAMPLE_EVERY);
        let (Some(overload), Some(sources)) = (overload.upgrade(), sources.upgrade()) else {
            return;
        };
        let used = match budget.meter.read() {
            Ok(used) => {
                failing = 0;
                used
            }
            Err(e) => {
                failing += 1;
                if failing == 1 {
                    warn!(meter = %budget.meter, error = %e, "measuring memory failed; the last level stays for a second");
                }
                if failing == FAIL_OPEN_AFTER {
                    // Blind, the proxy must not refuse every pod of its node for good.
                    warn!(meter = %budget.meter, "memory cannot be measured: back to the normal level until it can");
                    overload.observe(0, budget.limit);
                    sources.forgive();
                    shed = None;
                }
                continue;
            }
        };
        let (previous, level) = overload.observe(used, budget.limit);
        if level != previous {
            let used_mib = used >> 20;
            let budget_mib = budget.limit >> 20;
            if level > previous {
                warn!(%level, used_mib, budget_mib, "overload: memory near the budget");
            } else {
                info!(%level, used_mib, budget_mib, "overload: memory back down");
            }
        }
        if level >= Level::Pressure && (level > previous || trimmed.elapsed() >= SHED_NEXT_AFTER) {
            // What connections gave back goes back to the kernel, not to the allocator's
            // free lists.
            crate::sys::trim_heap();
            trimmed = Instant::now();
        }
        if level >= Level::Shedding {
            let next = match shed {
                None => true,
                Some((at, then)) => at.elapsed() >= SHED_NEXT_AFTER && used > then,
            };
            if next && sources.shed_heaviest() {
                shed = Some((Instant::now(), used));
            }
            if level == Level::Critical {
                sources.cut_shed();
            }
        } else if shed.take().is_some() {
            sources.forgive();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_rise_at_once_and_fall_below_the_threshold_less_the_margin() {
        use Level::*;
        assert_eq!(Level::next(Normal, 0.5), Normal);
        assert_eq!(Level::next(Normal, 0.81), Pressure);
        assert_eq!(Level::next(Normal, 0.97), Critical);
        assert_eq!(Level::next(Critical, 0.92), Critical, "not yet 5 % below");
        assert_eq!(Level::next(Critical, 0.89), Shedding);
        assert_eq!(Level::next(Shedding, 0.86), Shedding);
        assert_eq!(Level::next(Shedding, 0.80), Pressure);
        assert_eq!(Level::next(Pressure, 0.76), Pressure);
        assert_eq!(Level::next(Pressure, 0.74), Normal);
        assert_eq!(Level::next(Pressure, 0.0), Normal);
    }

    #[test]
    fn a_budget_comes_from_the_nearest_limited_cgroup_v1_or_v2() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // v1: the memory controller mounted apart; the process's own group unlimited, its
        // parent limited.
        let v1 = root.join("sys/fs/cgroup/memory/pods/p1/proxy");
        fs::create_dir_all(&v1).unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        fs::write(
            v1.parent().unwrap().join("memory.limit_in_bytes"),
            "536870912\n",
        )
        .unwrap();
        let mounts = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw
33 25 0:29 / /sys/fs/cgroup/memory rw,relatime shared:8 - cgroup cgroup rw,memory
";
        let cgroups = "4:memory:/pods/p1/proxy\n1:cpu:/\n0::/\n";
        let budget = MemoryBudget::of_cgroups(cgroups, mounts, root).unwrap();
        assert_eq!(budget.limit, 512 << 20);
        assert_eq!(
            budget.meter,
            MemoryMeter::Cgroup {
                dir: v1.parent().unwrap().into(),
                v1: true
            },
            "measured where the limit is set"
        );

        // v2 (as in a container with its own cgroup namespace): memory.max of the group.
        let v2 = root.join("sys/fs/cgroup/unified/kubepods/pod1");
        fs::create_dir_all(&v2).unwrap();
        fs::write(v2.join("memory.max"), "268435456\n").unwrap();
        let budget = MemoryBudget::of_cgroups("0::/kubepods/pod1\n", mounts, root).unwrap();
        assert_eq!(budget.limit, 256 << 20);

        // A container's group without the memory files (controller not enabled for it):
        // its parent's limit holds.
        let container = v2.join("app");
        fs::create_dir_all(&container).unwrap();
        let budget = MemoryBudget::of_cgroups("0::/kubepods/pod1/app\n", mounts, root).unwrap();
        assert_eq!(budget.limit, 256 << 20);
        assert_eq!(
            budget.meter,
            MemoryMeter::Cgroup {
                dir: v2.clone(),
                v1: false
            }
        );

        // Nothing limited anywhere (or a limit of 0): no budget.
        fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(
            MemoryBudget::of_cgroups("0::/kubepods/pod1\n", mounts, root),
            None
        );
        fs::write(v2.join("memory.max"), "0\n").unwrap();
        assert_eq!(
            MemoryBudget::of_cgroups("0::/kubepods/pod1\n", mounts, root),
            None
        );
        // v2 without the memory controller: no budget from it.
        assert_eq!(MemoryBudget::of_cgroups("0::/\n", mounts, root), None);
    }

    #[test]
    fn in_a_container_the_mount_holding_the_group_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // The host's tree mounted in the container too (as the DaemonSet does), listed first:
        // seen from the container's cgroup namespace its root is outside (`/..`).
        let own = root.join("sys/fs/cgroup");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join("memory.max"), "536870912\n").unwrap();
        let mounts = "\
40 30 0:26 /../../.. /host/sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
41 30 0:26 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
";
        let budget = MemoryBudget::of_cgroups("0::/\n", mounts, root).unwrap();
        assert_eq!(budget.limit, 512 << 20);
        assert_eq!(
            budget.meter,
            MemoryMeter::Cgroup {
                dir: own,
                v1: false
            }
        );
        // Escaped characters in a mount point are decoded.
        let spaced = root.join("cg roup");
        fs::create_dir_all(&spaced).unwrap();
        fs::write(spaced.join("memory.max"), "1048576\n").unwrap();
        let mounts = "41 30 0:26 / /cg\\040roup rw - cgroup2 cgroup2 rw\n";
        let budget = MemoryBudget::of_cgroups("0::/\n", mounts, root).unwrap();
        assert_eq!(budget.limit, 1 << 20);
    }

    #[test]
    fn the_working_set_leaves_out_inactive_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("memory.current"), "1000000\n").unwrap();
        fs::write(
            dir.path().join("memory.stat"),
            "anon 600000\nfile 400000\nactive_file 100000\ninactive_file 300000\n",
        )
        .unwrap();
        let meter = MemoryMeter::Cgroup {
            dir: dir.path().into(),
            v1: false,
        };
        assert_eq!(meter.read().unwrap(), 700_000);
        assert!(MemoryMeter::Rss.read().unwrap() > 1 << 20);
    }

    #[test]
    fn a_flag_overrides_the_cgroup_and_zero_turns_the_budget_off() {
        assert_eq!(
            MemoryBudget::detect(Some(64 << 20)),
            Some(MemoryBudget {
                limit: 64 << 20,
                meter: MemoryMeter::Rss
            })
        );
        assert_eq!(MemoryBudget::detect(Some(0)), None);
    }

    #[tokio::test]
    async fn connections_are_told_when_pressure_starts_and_while_critical() {
        let overload = Overload::new(OverloadMetrics::default());
        let told = overload.shed_signal();
        tokio::pin!(told);
        assert!(futures::poll!(told.as_mut()).is_pending());
        assert_eq!(overload.observe(50, 100), (Level::Normal, Level::Normal));
        assert!(futures::poll!(told.as_mut()).is_pending());
        assert_eq!(overload.observe(85, 100), (Level::Normal, Level::Pressure));
        assert!(futures::poll!(told.as_mut()).is_ready());
        assert!(!overload.may_grow() && !overload.keep_alive() && overload.admits_new());

        let again = overload.shed_signal();
        tokio::pin!(again);
        assert!(futures::poll!(again.as_mut()).is_pending());
        overload.observe(84, 100);
        assert!(futures::poll!(again.as_mut()).is_pending(), "no news");
        overload.observe(96, 100);
        assert!(futures::poll!(again.as_mut()).is_ready());
        assert!(!overload.admits_new() && overload.sheds_idle());
    }
}
