//! `cargo xtask bench`: the data-plane comparison of Weft with a sidecar mesh, the
//! control-plane scale benchmark (`cargo xtask bench scale`) and the config-churn one
//! (`cargo xtask bench churn`).
//!
//! One virtual cluster carries every mode at once, each in its own namespace: `none` (no
//! mesh), `sidecar` (Weft's proxy as an Istio-style sidecar in every pod), `sidecar-haproxy`
//! (HAProxy as the sidecar) and `weft` (eBPF capture and node proxies). Each namespace has a
//! client pod on node-1 and a server pod on node-1 (same-node) and node-2 (cross-node). Every
//! run goes through every scenario and, within it, every mode (in an order that rotates from
//! run to run), so slow drifts of the machine hit all modes alike.
//!
//! Besides the request/response scenarios, the two of ztunnel's own benchmark, so that Weft can
//! be set beside ztunnel as ratios to no mesh: bulk throughput one way over 1 and 8
//! connections, and a new connection plus a 1-byte echo. And what idle connections cost: the
//! RSS of the mesh processes before and while 1,000 (or 10,000) connections are held open.

use std::{
    fmt, fs,
    io::{BufRead as _, BufReader, Lines, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{cluster, cmd, is_root, workspace_root};

mod chaos;
mod churn;
mod report;
mod scale;
mod soak;
mod steady;

pub use chaos::{chaos, ChaosOptions};
pub use churn::churn;
pub use scale::scale;
pub use soak::{soak, SoakOptions};

/// How a `cargo xtask bench` run is shaped.
#[derive(Clone, Debug)]
pub struct Options {
    /// 10 s fixed-rate windows instead of 60 s, shorter saturation windows.
    pub quick: bool,
    /// Runs per (mode, scenario); every published figure is the median of them.
    pub runs: usize,
    /// Where the JSON goes (the chart and the Markdown table go beside it).
    pub out: PathBuf,
    /// The scenarios measured, in order.
    scenarios: Vec<Scenario>,
    /// Go on from the measurements a stopped run of the same commit left in the journal.
    pub resume: bool,
}

impl Options {
    /// The full benchmark: three runs of 60 s windows, into `bench/results/latest.json`.
    pub fn full() -> Self {
        Self {
            quick: false,
            runs: 3,
            out: workspace_root().join("bench/results/latest.json"),
            scenarios: Scenario::ALL.to_vec(),
            resume: false,
        }
    }

    /// The quick one: one run of 10 s windows, 256 MiB bulk transfers, 1000 echoes and 1,000
    /// connections held 2 s, into `target/bench/`, without `same-node-grpc` and the
    /// 10,000-connection hold to stay under five minutes (the full run has them).
    pub fn quick() -> Self {
        Self {
            quick: true,
            runs: 1,
            out: workspace_root().join("target/bench/quick.json"),
            scenarios: Scenario::ALL
                .into_iter()
                .filter(|s| match s.workload {
                    Workload::Requests(Protocol::Grpc) => s.cross_node,
                    Workload::Idle { conns } => conns <= QUICK_IDLE_CONNS,
                    _ => true,
                })
                .collect(),
            resume: false,
        }
    }

    /// The scenarios this run measures, in order.
    pub fn scenarios(&self) -> &[Scenario] {
        &self.scenarios
    }

    /// Measures only the scenarios `names` name (all of them, when empty), whether the quick
    /// run would leave them out or not.
    pub fn only(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let all: Vec<String> = Scenario::ALL.iter().map(|s| s.name()).collect();
        if let Some(unknown) = names.iter().find(|n| !all.contains(n)) {
            bail!(
                "no scenario {unknown:?}; the scenarios are {}",
                all.join(", ")
            );
        }
        self.scenarios = Scenario::ALL
            .into_iter()
            .filter(|s| names.contains(&s.name()))
            .collect();
        Ok(())
    }

    fn timing(&self) -> Timing {
        if self.quick {
            Timing {
                fixed_s: 10.0,
                fixed_warmup_s: 0.5,
                saturation_s: 1.5,
                saturation_warmup_s: 0.25,
                bulk_bytes: 256 * MIB,
                echo_count: 1000,
                echo_warmup: 50,
                hold_s: 2.0,
            }
        } else {
            Timing {
                fixed_s: 60.0,
                fixed_warmup_s: 2.0,
                saturation_s: 10.0,
                saturation_warmup_s: 1.0,
                bulk_bytes: GIB,
                echo_count: 2000,
                echo_warmup: 100,
                hold_s: 10.0,
            }
        }
    }
}

/// How long (or how much) each measurement of a run is.
#[derive(Clone, Copy, Debug)]
struct Timing {
    fixed_s: f64,
    fixed_warmup_s: f64,
    saturation_s: f64,
    saturation_warmup_s: f64,
    /// Bytes of one bulk measurement, shared by its connections.
    bulk_bytes: u64,
    /// Connections of one echo measurement, after `echo_warmup` unrecorded ones.
    echo_count: u64,
    echo_warmup: u64,
    /// How long the connections of an idle measurement stay open and idle before the mesh's
    /// RSS is read, seconds.
    hold_s: f64,
}

impl Timing {
    /// About how long one mode of `workload` takes, seconds (for the estimate printed first).
    fn seconds(&self, workload: Workload) -> f64 {
        match workload {
            Workload::Requests(_) => {
                self.fixed_s + self.fixed_warmup_s + self.saturation_s + self.saturation_warmup_s
            }
            // At 2 Gbit/s, slower than any mode has carried here.
            Workload::Bulk { .. } => self.bulk_bytes as f64 * 8.0 / 2e9,
            // At 1 ms a connection, about twice the slowest mode's time here.
            Workload::ConnectEcho => (self.echo_count + self.echo_warmup) as f64 / 1000.0,
            // Opened 8 at a time at about 1 ms each, then held.
            Workload::Idle { conns } => conns as f64 / 8000.0 + self.hold_s,
        }
    }
}

/// The fixed rate and its connections (Istio's method), and the saturation connections.
pub const RATE: u64 = 1000;
pub const RATE_CONNS: usize = 4;
pub const SATURATION_CONNS: usize = 64;
pub const RESPONSE_BYTES: usize = 1024;
const TCP_PORT: u16 = 7000;
const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const BULK_PORT: u16 = 7001;
const ECHO_PORT: u16 = 7002;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The largest idle measurement of the quick run.
const QUICK_IDLE_CONNS: usize = 1000;
/// How much longer than the idle window `hold` is told to hold: it is ended by closing its
/// stdin once the RSS is read, and holds no longer than this if that never comes.
const HOLD_SLACK_S: f64 = 60.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    None,
    Sidecar,
    SidecarHaproxy,
    Weft,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::None, Mode::Sidecar, Mode::SidecarHaproxy, Mode::Weft];

    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Sidecar => "sidecar",
            Mode::SidecarHaproxy => "sidecar-haproxy",
            Mode::Weft => "weft",
        }
    }

    fn namespace(self) -> String {
        format!("bench-{}", self.name())
    }

    fn sidecar(self) -> Option<&'static str> {
        match self {
            Mode::Sidecar => Some("weft"),
            Mode::SidecarHaproxy => Some("haproxy"),
            Mode::None | Mode::Weft => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a scenario's requests are, and the Service port (and its name) that carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// Raw TCP (port `tcp`): every proxy carries bytes.
    Tcp,
    /// HTTP/1.1 keep-alive (port `http`): every proxy parses every request.
    Http,
    /// Unary gRPC over HTTP/2 cleartext (port `grpc`): every proxy parses every stream.
    Grpc,
}

impl Protocol {
    /// The name of the Service port, and the load generator's `--protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }

    fn port(self) -> u16 {
        match self {
            Protocol::Tcp => TCP_PORT,
            Protocol::Http => HTTP_PORT,
            Protocol::Grpc => GRPC_PORT,
        }
    }
}

/// What a scenario's client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workload {
    /// 64-byte requests answered with 1 KB: at a fixed rate, then closed loop.
    Requests(Protocol),
    /// ztunnel's throughput benchmark: the run's bulk bytes one way, shared by `conns`
    /// connections (port `tcp-bulk`).
    Bulk { conns: usize },
    /// ztunnel's connections benchmark: a new connection, 1 byte there and back, close; one
    /// after the other (port `tcp-echo`).
    ConnectEcho,
    /// What idle connections cost the mesh: `conns` connections opened, echoed once and held
    /// open and idle (port `tcp-echo`); the mesh processes' RSS before and while held.
    Idle { conns: usize },
}

impl Workload {
    /// The scenario name's second half.
    pub fn name(self) -> String {
        match self {
            Workload::Requests(protocol) => protocol.name().into(),
            Workload::Bulk { conns } => format!("bulk-{conns}"),
            Workload::ConnectEcho => "connect-echo".into(),
            Workload::Idle { conns } => format!("idle-{conns}"),
        }
    }

    fn port(self) -> u16 {
        match self {
            Workload::Requests(protocol) => protocol.port(),
            Workload::Bulk { .. } => BULK_PORT,
            Workload::ConnectEcho | Workload::Idle { .. } => ECHO_PORT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    pub cross_node: bool,
    pub workload: Workload,
}

impl Scenario {
    pub const ALL: [Scenario; 12] = [
        Scenario::new(false, Workload::Requests(Protocol::Tcp)),
        Scenario::new(false, Workload::Requests(Protocol::Http)),
        Scenario::new(false, Workload::Requests(Protocol::Grpc)),
        Scenario::new(true, Workload::Requests(Protocol::Tcp)),
        Scenario::new(true, Workload::Requests(Protocol::Http)),
        Scenario::new(true, Workload::Requests(Protocol::Grpc)),
        // ztunnel's: across two node proxies, as its figures are.
        Scenario::new(true, Workload::Bulk { conns: 1 }),
        Scenario::new(true, Workload::Bulk { conns: 8 }),
        Scenario::new(false, Workload::ConnectEcho),
        Scenario::new(true, Workload::ConnectEcho),
        // Across nodes, where every connection through Weft is one HBONE stream between the
        // node proxies, pooled on their shared mTLS connections.
        Scenario::new(true, Workload::Idle { conns: 1000 }),
        Scenario::new(true, Workload::Idle { conns: 10_000 }),
    ];

    const fn new(cross_node: bool, workload: Workload) -> Self {
        Self {
            cross_node,
            workload,
        }
    }

    pub fn name(self) -> String {
        format!(
            "{}-{}",
            if self.cross_node {
                "cross-node"
            } else {
                "same-node"
            },
            self.workload.name()
        )
    }

    fn service(self) -> &'static str {
        if self.cross_node {
            "remote"
        } else {
            "local"
        }
    }
}

/// One load generator report (the fields the benchmark reads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadReport {
    pub requests: u64,
    pub total_requests: u64,
    pub errors: u64,
    #[serde(default)]
    pub first_error: Option<String>,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// One `weft-loadgen bulk` report (the fields the benchmark reads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BulkReport {
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_s: f64,
}

/// One `weft-loadgen echo` report (the fields the benchmark reads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EchoReport {
    pub total_connections: u64,
    pub errors: u64,
    #[serde(default)]
    pub first_error: Option<String>,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// One line of `weft-loadgen hold` (the fields the benchmark reads): once when the
/// connections are open (`phase` `open`), once when they are closed (`closed`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HoldReport {
    pub phase: String,
    pub conns: usize,
    pub established: usize,
    pub failed: usize,
    #[serde(default)]
    pub first_error: Option<String>,
    pub open_s: f64,
    pub held_s: f64,
    pub closed_early: usize,
}

/// RSS of the mesh processes, KiB, read twice in an idle measurement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rss {
    /// All of the mode's mesh processes together.
    pub total_kib: u64,
    /// The largest of them (for Weft, the larger node proxy).
    pub largest_kib: u64,
}

impl Rss {
    fn of(kib: impl IntoIterator<Item = u64>) -> Self {
        kib.into_iter().fold(Self::default(), |rss, kib| Self {
            total_kib: rss.total_kib + kib,
            largest_kib: rss.largest_kib.max(kib),
        })
    }
}

/// One (mode, scenario) measurement of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub mode: Mode,
    pub scenario: Scenario,
    pub measured: Measured,
}

/// What one measurement found, by workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Measured {
    Requests {
        fixed: LoadReport,
        saturation: LoadReport,
        /// CPU seconds of the mode's mesh processes per 1,000 requests of the fixed-rate
        /// window.
        cpu_s_per_1k: f64,
        /// Peak RSS (VmHWM) of the largest mesh process during the fixed-rate window, MiB.
        rss_mb: f64,
    },
    Bulk {
        report: BulkReport,
        /// CPU seconds of the mode's mesh processes per GiB carried.
        cpu_s_per_gib: f64,
    },
    Echo {
        report: EchoReport,
        /// CPU seconds of the mode's mesh processes per 1,000 connections.
        cpu_s_per_1k: f64,
    },
    Idle {
        /// `hold`'s report once it closed the connections.
        report: HoldReport,
        /// The mode's mesh processes (none for no mesh: no RSS figures then).
        processes: usize,
        /// Before the connections were opened.
        before: Rss,
        /// At the end of the idle window, every connection still open.
        held: Rss,
    },
}

impl Measured {
    /// A figure as measured, before any comparison with `none` (see `report::FIGURES`); `None`
    /// when this workload has no such figure.
    pub fn figure(&self, name: &str) -> Option<f64> {
        Some(match self {
            Measured::Requests {
                fixed,
                saturation,
                cpu_s_per_1k,
                rss_mb,
            } => match name {
                "p50_us" => fixed.p50_us,
                "p90_us" => fixed.p90_us,
                "p99_us" => fixed.p99_us,
                "p999_us" => fixed.p999_us,
                "rps" => saturation.rps,
                "cpu_s_per_1k" => *cpu_s_per_1k,
                "rss_mb" => *rss_mb,
                "fixed_rps" => fixed.rps,
                "errors" => (fixed.errors + saturation.errors) as f64,
                "saturation_p99_us" => saturation.p99_us,
                _ => return None,
            },
            Measured::Bulk {
                report,
                cpu_s_per_gib,
            } => match name {
                "gbit_s" => report.gbit_s,
                "seconds" => report.seconds,
                "cpu_s_per_gib" => *cpu_s_per_gib,
                _ => return None,
            },
            Measured::Echo {
                report,
                cpu_s_per_1k,
            } => match name {
                "mean_us" => report.mean_us,
                "p50_us" => report.p50_us,
                "p90_us" => report.p90_us,
                "p99_us" => report.p99_us,
                "p999_us" => report.p999_us,
                "cpu_s_per_1k" => *cpu_s_per_1k,
                "errors" => report.errors as f64,
                _ => return None,
            },
            Measured::Idle {
                report,
                processes,
                before,
                held,
            } => {
                let mib = |kib: u64| kib as f64 / 1024.0;
                let meshed = |v: f64| if *processes == 0 { f64::NAN } else { v };
                match name {
                    "established" => report.established as f64,
                    "errors" => (report.failed + report.closed_early) as f64,
                    "processes" => *processes as f64,
                    "rss_before_mb" => meshed(mib(before.total_kib)),
                    "rss_held_mb" => meshed(mib(held.total_kib)),
                    "rss_largest_mb" => meshed(mib(held.largest_kib)),
                    "kib_per_conn" => meshed(kib_per_conn(before, held, report.established)),
                    _ => return None,
                }
            }
        })
    }

    /// One line for the progress output.
    fn summary(&self) -> String {
        match self {
            Measured::Requests {
                fixed,
                saturation,
                cpu_s_per_1k,
                rss_mb,
            } => format!(
                "p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  sat {:>7.0} rps  cpu {cpu_s_per_1k:.3} s/1k  rss {rss_mb:.1} MiB",
                fixed.p50_us, fixed.p99_us, fixed.p999_us, saturation.rps,
            ),
            Measured::Bulk {
                report,
                cpu_s_per_gib,
            } => format!(
                "{:>6.2} Gbit/s  ({} MiB in {:.3} s)  cpu {cpu_s_per_gib:.3} s/GiB",
                report.gbit_s,
                report.bytes / MIB,
                report.seconds,
            ),
            Measured::Echo {
                report,
                cpu_s_per_1k,
            } => format!(
                "mean {:>7.1} µs  p50 {:>7.1} µs  p99 {:>7.1} µs  errors {}  cpu {cpu_s_per_1k:.3} s/1k conns",
                report.mean_us, report.p50_us, report.p99_us, report.errors,
            ),
            Measured::Idle {
                report,
                processes: 0,
                ..
            } => format!(
                "{} of {} conns open {:.1} s  no mesh processes",
                report.established, report.conns, report.held_s,
            ),
            Measured::Idle {
                report,
                processes,
                before,
                held,
            } => format!(
                "{} of {} conns open {:.1} s  rss of {processes} mesh procs {:.1} -> {:.1} MiB  {:.2} KiB/conn",
                report.established,
                report.conns,
                report.held_s,
                before.total_kib as f64 / 1024.0,
                held.total_kib as f64 / 1024.0,
                kib_per_conn(before, held, report.established),
            ),
        }
    }
}

/// What each established connection added to the mesh processes' RSS, KiB (negative when
/// the processes gave back more memory than the connections took).
fn kib_per_conn(before: &Rss, held: &Rss, established: usize) -> f64 {
    if established == 0 {
        return f64::NAN;
    }
    (held.total_kib as f64 - before.total_kib as f64) / established as f64
}

/// Runs the data-plane benchmark and writes its JSON, chart and table.
pub fn data_plane(options: &Options) -> Result<()> {
    if !is_root() {
        bail!("the benchmark builds a virtual cluster and needs root: run `sudo -E cargo xtask bench`");
    }
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::setup()?;
    let started = Instant::now();
    // Release builds only: debug builds would measure the compiler, not the data path.
    std::env::set_var(cluster::PROFILE_ENV, "release");
    let loadgen = build_loadgen()?;
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let manifest = dir.join("cluster.yaml");
    fs::write(&manifest, manifest_yaml(&loadgen))
        .with_context(|| format!("writing {}", manifest.display()))?;

    let timing = options.timing();
    let scenarios = options.scenarios();
    let estimate = options.runs as f64
        * Mode::ALL.len() as f64
        * scenarios
            .iter()
            .map(|s| timing.seconds(s.workload) + 1.0)
            .sum::<f64>();
    println!(
        "==> benchmark: {} run(s) x {} modes x {} scenarios, about {:.0} minutes of load",
        options.runs,
        Mode::ALL.len(),
        scenarios.len(),
        estimate / 60.0
    );

    let commit = report::commit();
    let mut journal = Journal::open(&dir.join("samples.jsonl"), &commit, options)?;
    let cluster = Cluster::up(&manifest)?;
    let samples = measure_all(options.runs, scenarios, timing, &loadgen, &mut journal);
    let down = cluster.down();
    let samples = samples?;
    down?;

    let machine = report::machine();
    let results = report::aggregate(&samples, options.runs);
    let json = report::json(&commit, &machine, options, &results);
    if let Some(parent) = options.out.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(&options.out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", options.out.display()))?;
    let svg = options.out.with_extension("svg");
    fs::write(&svg, report::chart_svg(&results, &commit))
        .with_context(|| format!("writing {}", svg.display()))?;
    let table = report::markdown(&results, &commit, &machine, options);
    let md = options.out.with_extension("md");
    fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("\n{table}");
    println!(
        "==> wrote {}, {} and {} in {:.0} s",
        options.out.display(),
        svg.display(),
        md.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Renders the Markdown table, the chart and the targets of a run's JSON again (after the
/// targets changed), keeping its figures, commit and machine.
pub fn render(json_path: &Path) -> Result<()> {
    let text = fs::read_to_string(json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json_path.display()))?;
    let rows = report::rows_from_json(&json["results"])?;
    let mut options = if json["quick"].as_bool().unwrap_or(false) {
        Options::quick()
    } else {
        Options::full()
    };
    options.runs = json["runs"].as_u64().unwrap_or(1) as usize;
    options.out = json_path.to_path_buf();
    let commit = json["commit"].as_str().unwrap_or("unknown").to_owned();
    let machine = json["machine"].as_str().unwrap_or("").to_owned();
    json["targets"] = report::json(&commit, &machine, &options, &rows)["targets"].take();
    fs::write(json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md = json_path.with_extension("md");
    fs::write(&md, report::markdown(&rows, &commit, &machine, &options))
        .with_context(|| format!("writing {}", md.display()))?;
    let svg = json_path.with_extension("svg");
    fs::write(&svg, report::chart_svg(&rows, &commit))
        .with_context(|| format!("writing {}", svg.display()))?;
    println!("==> rendered {} and {} again", md.display(), svg.display());
    Ok(())
}

/// `cargo build --release -p weft-loadgen`, and the binary's path.
fn build_loadgen() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    cmd::interactive(
        Command::new(cargo)
            .args(["build", "--release", "-p", "weft-loadgen"])
            .current_dir(workspace_root()),
    )
    .context("building the load generator")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| workspace_root().join(t))
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("release/weft-loadgen");
    if !path.is_file() {
        bail!("the build did not produce {}", path.display());
    }
    Ok(path)
}

/// The release build, and the cluster of `chaos` and `soak`: Weft's namespace of the
/// benchmark's cluster alone.
fn steady_cluster() -> Result<(PathBuf, Cluster)> {
    crate::setup()?;
    std::env::set_var(cluster::PROFILE_ENV, "release");
    let loadgen = build_loadgen()?;
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let manifest = dir.join("steady-cluster.yaml");
    fs::write(&manifest, manifest_yaml_for(&loadgen, &[Mode::Weft]))
        .with_context(|| format!("writing {}", manifest.display()))?;
    let cluster = Cluster::up(&manifest)?;
    Ok((loadgen, cluster))
}

/// The cluster of the benchmark: per mode a namespace with a client and two servers.
pub fn manifest_yaml(loadgen: &Path) -> String {
    manifest_yaml_for(loadgen, &Mode::ALL)
}

/// The benchmark's cluster for `modes` only.
fn manifest_yaml_for(loadgen: &Path, modes: &[Mode]) -> String {
    let loadgen = loadgen.display();
    let mut yaml =
        String::from("# The data-plane benchmark's cluster, written by `cargo xtask bench`.\n");
    for &mode in modes {
        let ns = mode.namespace();
        let label = if mode == Mode::Weft {
            "\n  labels:\n    weft.io/mesh: enabled"
        } else {
            ""
        };
        // Weft's sidecars speak HBONE mTLS to each other, as Istio's sidecars speak mTLS:
        // Istio's label of an injected pod tells a sidecar its peer has one. (HAProxy's
        // sidecars stay plaintext: HAProxy cannot get the mesh's certificates.)
        let tls_mode = match mode {
            Mode::Sidecar => "\n    security.istio.io/tlsMode: istio",
            _ => "",
        };
        let annotations = match mode.sidecar() {
            Some(kind) => format!(
                "{tls_mode}\n  annotations:\n    {}: {kind}",
                cluster::SIDECAR_ANNOTATION
            ),
            None => String::new(),
        };
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{label}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: {ns}\n  \
             labels:\n    app: client{annotations}\nspec:\n  nodeName: node-1\n  containers:\n  \
             - name: client\n    command: [sleep, infinity]\n"
        ));
        for (service, node) in [("local", "node-1"), ("remote", "node-2")] {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: server-{service}\n  \
                 namespace: {ns}\n  labels:\n    app: server-{service}{annotations}\nspec:\n  \
                 nodeName: {node}\n  containers:\n  - name: server\n    command: [{loadgen}, \
                 serve, --tcp-port, \"{TCP_PORT}\", --http-port, \"{HTTP_PORT}\", \
                 --grpc-port, \"{GRPC_PORT}\", --bulk-port, \"{BULK_PORT}\", --echo-port, \
                 \"{ECHO_PORT}\", --response-bytes, \"{RESPONSE_BYTES}\"]\n    \
                 ports:\n    - containerPort: {TCP_PORT}\n    - containerPort: {HTTP_PORT}\n    \
                 - containerPort: {GRPC_PORT}\n    - containerPort: {BULK_PORT}\n    \
                 - containerPort: {ECHO_PORT}\n\
                 ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {service}\n  \
                 namespace: {ns}\nspec:\n  selector:\n    app: server-{service}\n  ports:\n  \
                 - name: tcp\n    port: {TCP_PORT}\n    targetPort: {TCP_PORT}\n  \
                 - name: http\n    port: {HTTP_PORT}\n    targetPort: {HTTP_PORT}\n    \
                 appProtocol: http\n  - name: grpc\n    port: {GRPC_PORT}\n    \
                 targetPort: {GRPC_PORT}\n    appProtocol: grpc\n  \
                 - name: tcp-bulk\n    port: {BULK_PORT}\n    targetPort: {BULK_PORT}\n  \
                 - name: tcp-echo\n    port: {ECHO_PORT}\n    targetPort: {ECHO_PORT}\n"
            ));
        }
    }
    yaml
}

/// The virtual cluster for the duration of the benchmark: removed on every way out.
struct Cluster {
    up: bool,
}

impl Cluster {
    fn up(manifest: &Path) -> Result<Self> {
        let mut cluster = Self { up: true };
        if let Err(e) = cluster::up(manifest) {
            // `up` refuses to touch a cluster that was already there: leave that one alone.
            if e.to_string().contains("already up") {
                cluster.up = false;
            }
            return Err(e);
        }
        Ok(cluster)
    }

    fn down(mut self) -> Result<()> {
        self.up = false;
        cluster::down()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.up {
            if let Err(e) = cluster::down() {
                eprintln!("warning: removing the benchmark's cluster: {e:#}");
            }
        }
    }
}

fn measure_all(
    runs: usize,
    scenarios: &[Scenario],
    timing: Timing,
    loadgen: &Path,
    journal: &mut Journal,
) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let total = runs * Mode::ALL.len() * scenarios.len();
    for run in 0..runs {
        for &scenario in scenarios {
            // A different mode goes first in every run.
            let mut modes = Mode::ALL;
            modes.rotate_left(run % Mode::ALL.len());
            for mode in modes {
                let (sample, from) = match journal.taken(run, mode, scenario) {
                    Some(sample) => (sample, " (journal)"),
                    None => {
                        let sample =
                            measure(mode, scenario, timing, loadgen).with_context(|| {
                                format!("run {}: {mode} {}", run + 1, scenario.name())
                            })?;
                        journal.record(run, &sample)?;
                        (sample, "")
                    }
                };
                println!(
                    "[{:>2}/{total}] run {} {:<23} {:<15} {}{from}",
                    samples.len() + 1,
                    run + 1,
                    scenario.name(),
                    mode.name(),
                    sample.measured.summary(),
                );
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

/// Every measurement as it is taken, one JSON line each (`target/bench/samples.jsonl`): a run
/// that stopped (a failure, an interrupt) goes on from there with `--resume`, at the same
/// commit and with the same windows, measuring only what the journal does not hold.
struct Journal {
    file: fs::File,
    commit: String,
    quick: bool,
    taken: Vec<JournalEntry>,
}

#[derive(Serialize, Deserialize)]
struct JournalEntry {
    commit: String,
    quick: bool,
    run: usize,
    sample: Sample,
}

impl Journal {
    /// A new journal at `path`, or with `options.resume` the one there, whose measurements
    /// must be of `commit` and of the same windows.
    fn open(path: &Path, commit: &str, options: &Options) -> Result<Self> {
        let mut taken = Vec::new();
        if options.resume {
            if commit.ends_with("-dirty") {
                bail!("--resume needs a committed tree: the journal names commits, not changes");
            }
            let text = fs::read_to_string(path)
                .with_context(|| format!("--resume: reading {}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let entry: JournalEntry = serde_json::from_str(line)
                    .with_context(|| format!("{} line {}", path.display(), n + 1))?;
                if entry.commit != commit || entry.quick != options.quick {
                    bail!(
                        "--resume: {} holds measurements of commit {} ({} windows), this is {commit} ({} windows)",
                        path.display(),
                        entry.commit,
                        if entry.quick { "quick" } else { "full" },
                        if options.quick { "quick" } else { "full" },
                    );
                }
                taken.push(entry);
            }
            println!(
                "==> resuming: {} measurement(s) from {}",
                taken.len(),
                path.display()
            );
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !options.resume {
            file.set_len(0)
                .with_context(|| format!("emptying {}", path.display()))?;
        }
        Ok(Self {
            file,
            commit: commit.to_owned(),
            quick: options.quick,
            taken,
        })
    }

    /// The measurement of `run` for `mode` and `scenario`, when the journal has it.
    fn taken(&self, run: usize, mode: Mode, scenario: Scenario) -> Option<Sample> {
        self.taken
            .iter()
            .find(|e| e.run == run && e.sample.mode == mode && e.sample.scenario == scenario)
            .map(|e| e.sample.clone())
    }

    fn record(&mut self, run: usize, sample: &Sample) -> Result<()> {
        let entry = JournalEntry {
            commit: self.commit.clone(),
            quick: self.quick,
            run,
            sample: sample.clone(),
        };
        let line = serde_json::to_string(&entry)? + "\n";
        self.file
            .write_all(line.as_bytes())
            .context("writing the benchmark's journal")
    }
}

fn measure(mode: Mode, scenario: Scenario, timing: Timing, loadgen: &Path) -> Result<Sample> {
    let ns = mode.namespace();
    let vip = cluster::cluster_ip(&format!("{ns}/{}", scenario.service()))?;
    let addr = format!("{vip}:{}", scenario.workload.port());
    let client = format!("{ns}/client");
    let pids = mesh_pids(mode)?;
    let loadgen = loadgen.display().to_string();
    let measured = match scenario.workload {
        Workload::Requests(protocol) => {
            for pid in &pids {
                reset_peak_rss(*pid);
            }
            let cpu_before = cpu_ticks(&pids);
            let fixed = load(
                &client,
                &loadgen,
                &addr,
                protocol,
                RATE,
                RATE_CONNS,
                timing.fixed_s,
                timing.fixed_warmup_s,
            )?;
            let cpu = cpu_seconds_since(&pids, cpu_before);
            let rss_mb = pids
                .iter()
                .filter_map(|pid| peak_rss_kib(*pid))
                .max()
                .map_or(0.0, |kib| kib as f64 / 1024.0);
            let saturation = load(
                &client,
                &loadgen,
                &addr,
                protocol,
                0,
                SATURATION_CONNS,
                timing.saturation_s,
                timing.saturation_warmup_s,
            )?;
            Measured::Requests {
                cpu_s_per_1k: cpu / (fixed.total_requests.max(1) as f64 / 1000.0),
                rss_mb,
                fixed,
                saturation,
            }
        }
        Workload::Bulk { conns } => {
            let cpu_before = cpu_ticks(&pids);
            let report: BulkReport = run_loadgen(
                &client,
                &[
                    &loadgen,
                    "bulk",
                    &addr,
                    "--bytes",
                    &timing.bulk_bytes.to_string(),
                    "--conns",
                    &conns.to_string(),
                ],
            )?;
            let cpu = cpu_seconds_since(&pids, cpu_before);
            Measured::Bulk {
                cpu_s_per_gib: cpu / (report.bytes.max(1) as f64 / GIB as f64),
                report,
            }
        }
        Workload::ConnectEcho => {
            let cpu_before = cpu_ticks(&pids);
            let report: EchoReport = run_loadgen(
                &client,
                &[
                    &loadgen,
                    "echo",
                    &addr,
                    "--count",
                    &timing.echo_count.to_string(),
                    "--warmup",
                    &timing.echo_warmup.to_string(),
                ],
            )?;
            let cpu = cpu_seconds_since(&pids, cpu_before);
            if report.errors > 0 {
                eprintln!(
                    "warning: {} failed connection(s) towards {addr} from {client}: {}",
                    report.errors,
                    report.first_error.as_deref().unwrap_or("?")
                );
            }
            Measured::Echo {
                cpu_s_per_1k: cpu / (report.total_connections.max(1) as f64 / 1000.0),
                report,
            }
        }
        Workload::Idle { conns } => {
            let before = Rss::of(pids.iter().filter_map(|pid| rss_kib(*pid)));
            let (report, held) = hold(&client, &loadgen, &addr, conns, timing.hold_s, || {
                Rss::of(pids.iter().filter_map(|pid| rss_kib(*pid)))
            })?;
            if report.failed + report.closed_early > 0 {
                eprintln!(
                    "warning: {} of {conns} connection(s) towards {addr} from {client} failed, \
                     {} closed while idle: {}",
                    report.failed,
                    report.closed_early,
                    report.first_error.as_deref().unwrap_or("?")
                );
            }
            Measured::Idle {
                report,
                processes: pids.len(),
                before,
                held,
            }
        }
    };
    Ok(Sample {
        mode,
        scenario,
        measured,
    })
}

#[allow(
    clippy::too_many_arguments,
    reason = "one measurement's settings, passed as they are read"
)]
fn load(
    client: &str,
    loadgen: &str,
    addr: &str,
    protocol: Protocol,
    rate: u64,
    conns: usize,
    duration_s: f64,
    warmup_s: f64,
) -> Result<LoadReport> {
    let report: LoadReport = run_loadgen(
        client,
        &[
            loadgen,
            "run",
            addr,
            "--protocol",
            protocol.name(),
            "--rate",
            &rate.to_string(),
            "--conns",
            &conns.to_string(),
            "--duration-s",
            &duration_s.to_string(),
            "--warmup-s",
            &warmup_s.to_string(),
            "--response-bytes",
            &RESPONSE_BYTES.to_string(),
        ],
    )?;
    if report.errors > 0 {
        eprintln!(
            "warning: {} failed request(s) towards {addr} from {client}: {}",
            report.errors,
            report.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(report)
}

/// `weft-loadgen hold` in the client pod: once it says every connection is open, waits
/// `hold_s` with them idle, reads `measure`, then closes its stdin, which ends the hold.
fn hold<T>(
    client: &str,
    loadgen: &str,
    addr: &str,
    conns: usize,
    hold_s: f64,
    measure: impl FnOnce() -> T,
) -> Result<(HoldReport, T)> {
    let argv: Vec<String> = [
        loadgen,
        "hold",
        addr,
        "--conns",
        &conns.to_string(),
        "--seconds",
        &(hold_s + HOLD_SLACK_S).to_string(),
        "--until-eof",
    ]
    .iter()
    .map(|a| (*a).to_string())
    .collect();
    let mut child = cluster::spawn(client, &argv)?;
    let stdout = child.stdout.take().context("the load generator's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let open = hold_line(&mut lines, &mut child, "open")?;
    if open.established == 0 {
        // Nothing is held: the path is broken. Report it (every connection failed) and go on
        // with the other modes rather than lose the run.
        drop(child.stdin.take());
        let closed = hold_line(&mut lines, &mut child, "closed")?;
        let _ = child.wait();
        return Ok((closed, measure()));
    }
    std::thread::sleep(Duration::from_secs_f64(hold_s));
    let measured = measure();
    drop(child.stdin.take());
    let closed = hold_line(&mut lines, &mut child, "closed")?;
    let status = child.wait().context("waiting for the load generator")?;
    if !status.success() {
        bail!("the load generator failed ({status}) after {closed:?}");
    }
    wait_drained(client);
    Ok((closed, measured))
}

/// How long the pods of a mode may take to close what a hold left open.
const DRAIN_WAIT: Duration = Duration::from_secs(180);

/// Waits until the client and remote server pods of `client`'s namespace hold no more than a
/// closed loop's connections to or from the echo port the holds use, in any state but
/// `TIME-WAIT` (half-closed ones included): a sidecar still working through thousands of held
/// connections (HAProxy at its `maxconn`, accepting the rest only as slots free) would fail
/// the next scenario's requests. (Other connections may stay: pooled upstream connections,
/// Weft's sidecars' HBONE connections of a hundred streams each, for minutes.)
fn wait_drained(client: &str) {
    let namespace = client.split('/').next().unwrap_or_default();
    let pods = [client.to_owned(), format!("{namespace}/server-remote")];
    let established = |pod: &str| {
        let filter = format!("( sport = :{ECHO_PORT} or dport = :{ECHO_PORT} )");
        let argv = [
            "ss",
            "-Htn",
            "state",
            "connected",
            "exclude",
            "time-wait",
            &filter,
        ]
        .map(String::from);
        cluster::exec(pod, &argv)
            .map(|out| String::from_utf8_lossy(&out.stdout).lines().count())
            .unwrap_or(0)
    };
    let started = Instant::now();
    loop {
        let open: usize = pods.iter().map(|p| established(p)).sum();
        if open <= SATURATION_CONNS {
            break;
        }
        if started.elapsed() > DRAIN_WAIT {
            eprintln!(
                "warning: {open} connections still open in {namespace} {} s after a hold",
                DRAIN_WAIT.as_secs()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if started.elapsed() > Duration::from_secs(2) {
        eprintln!(
            "note: {namespace} took {:.0} s to close the connections of a hold",
            started.elapsed().as_secs_f64()
        );
    }
}

/// The next line `hold` prints, which must be of `phase`; when there is none, why.
fn hold_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    child: &mut Child,
    phase: &str,
) -> Result<HoldReport> {
    let line = match lines.next() {
        Some(line) => line.context("reading the load generator's output")?,
        None => {
            let status = child.wait().context("waiting for the load generator")?;
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            bail!(
                "the load generator ended ({status}) before its {phase:?} line: {}",
                stderr.trim()
            );
        }
    };
    parse_hold_line(&line, phase)
}

fn parse_hold_line(line: &str, phase: &str) -> Result<HoldReport> {
    let report: HoldReport = serde_json::from_str(line.trim())
        .with_context(|| format!("the load generator printed {line:?}"))?;
    if report.phase != phase {
        bail!(
            "the load generator printed a {:?} line, not {phase:?}: {line}",
            report.phase
        );
    }
    Ok(report)
}

/// Runs the load generator in the client pod and reads the one JSON report it prints.
fn run_loadgen<T: DeserializeOwned>(client: &str, argv: &[&str]) -> Result<T> {
    let argv: Vec<String> = argv.iter().map(|a| (*a).to_string()).collect();
    let out = cluster::exec(client, &argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the load generator failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        );
    }
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("the load generator printed {stdout:?}"))
}

/// The processes whose cost the mode adds: both node proxies for Weft, every sidecar of the
/// mode's pods for the sidecar modes, none for no mesh.
fn mesh_pids(mode: Mode) -> Result<Vec<u32>> {
    Ok(match mode {
        Mode::None => Vec::new(),
        Mode::Weft => {
            let mut pids = cluster::pids("node/node-1")?;
            pids.extend(cluster::pids("node/node-2")?);
            pids
        }
        Mode::Sidecar | Mode::SidecarHaproxy => {
            let ns = mode.namespace();
            let mut pids = Vec::new();
            for pod in ["client", "server-local", "server-remote"] {
                pids.extend(
                    cluster::pids(&format!("{ns}/{pod}"))?
                        .into_iter()
                        .filter(|pid| {
                            matches!(
                                fs::read_to_string(format!("/proc/{pid}/comm")).as_deref(),
                                Ok("mesh-node\n" | "haproxy\n")
                            )
                        }),
                );
            }
            if pids.is_empty() {
                bail!("no sidecar process found in namespace {ns}");
            }
            pids
        }
    })
}

/// utime + stime of every process, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| stat_cpu_ticks(&stat))
        .sum()
}

/// CPU seconds the processes spent since `before` (from [`cpu_ticks`]).
fn cpu_seconds_since(pids: &[u32], before: u64) -> f64 {
    cpu_ticks(pids).saturating_sub(before) as f64 / clock_ticks()
}

/// Fields 14 and 15 of `/proc/<pid>/stat`, counted after the `)` that ends the command name
/// (which may contain spaces).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    cmd::output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resets VmHWM to the current RSS (`clear_refs` value 5), so the peak is the window's.
fn reset_peak_rss(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Peak RSS since the last reset (VmHWM), KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmHWM:",
    )
}

/// RSS now (VmRSS), KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmRSS:",
    )
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_past_odd_command_names() {
        let stat = "1234 (weft data) S 1 1234 1234 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 3 0 100 1000000 300 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(200));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn manifest_has_every_mode() {
        let yaml = manifest_yaml(Path::new("/t/weft-loadgen"));
        let docs: Vec<yaml_serde::Value> = yaml_serde::Deserializer::from_str(&yaml)
            .map(yaml_serde::Value::deserialize)
            .collect::<Result<_, _>>()
            .unwrap();
        // Per mode: namespace, client, 2 × (server, Service).
        assert_eq!(docs.len(), Mode::ALL.len() * 6);
        assert!(yaml.contains("name: bench-weft\n  labels:\n    weft.io/mesh: enabled"));
        assert_eq!(yaml.matches("weft.io/bench-sidecar: haproxy").count(), 3);
        assert_eq!(yaml.matches("weft.io/bench-sidecar: weft").count(), 3);
        assert!(yaml.contains("command: [/t/weft-loadgen, serve,"));
        assert!(yaml.contains(
            "- name: grpc\n    port: 9090\n    targetPort: 9090\n    appProtocol: grpc\n"
        ));
        // ztunnel's scenarios: TCP by Istio's port naming, for every proxy.
        assert!(yaml.contains("- name: tcp-bulk\n    port: 7001\n    targetPort: 7001\n"));
        assert!(yaml.contains("- name: tcp-echo\n    port: 7002\n    targetPort: 7002\n"));
        assert!(yaml.contains("--bulk-port, \"7001\", --echo-port, \"7002\""));
    }

    #[test]
    fn scenario_names() {
        let names: Vec<String> = Scenario::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "same-node-tcp",
                "same-node-http",
                "same-node-grpc",
                "cross-node-tcp",
                "cross-node-http",
                "cross-node-grpc",
                "cross-node-bulk-1",
                "cross-node-bulk-8",
                "same-node-connect-echo",
                "cross-node-connect-echo",
                "cross-node-idle-1000",
                "cross-node-idle-10000",
            ]
        );
        assert_eq!(Options::full().scenarios(), Scenario::ALL);
        let quick: Vec<String> = Options::quick()
            .scenarios()
            .iter()
            .map(|s| s.name())
            .collect();
        assert!(!quick.contains(&"same-node-grpc".to_string()));
        assert!(quick.contains(&"cross-node-idle-1000".to_string()));
        assert!(!quick.contains(&"cross-node-idle-10000".to_string()));
        assert_eq!(quick.len(), 10);
        let mut grpc = Options::quick();
        grpc.only(&["same-node-grpc".into(), "cross-node-grpc".into()])
            .unwrap();
        assert_eq!(grpc.scenarios(), [Scenario::ALL[2], Scenario::ALL[5]]);
        let err = grpc.only(&["same-node-udp".into()]).unwrap_err();
        assert!(err.to_string().contains("cross-node-idle-10000"), "{err}");
        let mut idle = Options::quick();
        idle.only(&["cross-node-idle-10000".into()]).unwrap();
        assert_eq!(
            idle.scenarios(),
            [Scenario::new(true, Workload::Idle { conns: 10_000 })]
        );
        let mut ztunnel = Options::quick();
        ztunnel
            .only(&["cross-node-connect-echo".into(), "cross-node-bulk-8".into()])
            .unwrap();
        assert_eq!(
            ztunnel.scenarios(),
            [
                Scenario::new(true, Workload::Bulk { conns: 8 }),
                Scenario::new(true, Workload::ConnectEcho)
            ]
        );
    }

    #[test]
    fn loadgen_reports_parse() {
        let bulk: BulkReport =
            serde_json::from_str(r#"{"bytes":268435456,"conns":8,"seconds":0.5,"gbit_s":4.295}"#)
                .unwrap();
        assert_eq!(bulk.bytes, 256 * MIB);
        let echo: EchoReport = serde_json::from_str(
            r#"{"connections":1000,"total_connections":1050,"errors":0,"mean_us":250.1,
                "p50_us":240.0,"p90_us":300.0,"p99_us":500.0,"p999_us":900.0,"max_us":1200.0}"#,
        )
        .unwrap();
        assert_eq!(echo.first_error, None);
        let measured = Measured::Echo {
            report: echo,
            cpu_s_per_1k: 0.0,
        };
        assert_eq!(measured.figure("mean_us"), Some(250.1));
        assert_eq!(measured.figure("rps"), None);
        assert!(measured.summary().contains("mean   250.1 µs"));
        let measured = Measured::Bulk {
            report: bulk,
            cpu_s_per_gib: 1.0,
        };
        assert_eq!(measured.figure("gbit_s"), Some(4.295));
        assert!(measured.summary().contains("256 MiB"));
    }

    #[test]
    fn hold_lines_parse() {
        let open = parse_hold_line(
            r#"{"phase":"open","conns":1000,"established":999,"failed":1,
                "first_error":"connecting to 10.96.0.3:7002: timed out","open_s":0.8,
                "held_s":0.0,"closed_early":0,"open_files_limit":20000}"#,
            "open",
        )
        .unwrap();
        assert_eq!((open.established, open.failed), (999, 1));
        assert!(open.first_error.unwrap().contains("timed out"));
        let closed = parse_hold_line(
            r#"{"phase":"closed","conns":1000,"established":1000,"failed":0,"open_s":0.8,
                "held_s":2.001,"closed_early":3,"open_files_limit":20000}"#,
            "closed",
        )
        .unwrap();
        assert_eq!(closed.closed_early, 3);
        let err = parse_hold_line(r#"{"phase":"open","conns":1}"#, "open").unwrap_err();
        assert!(err.to_string().contains("printed"), "{err}");
        let err = parse_hold_line(
            r#"{"phase":"closed","conns":1,"established":1,"failed":0,"open_s":0.1,
                "held_s":0.1,"closed_early":0}"#,
            "open",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not \"open\""), "{err}");
    }

    #[test]
    fn reads_rss_fields() {
        let status =
            "Name:\tmesh-node\nVmPeak:\t  90000 kB\nVmHWM:\t   21000 kB\nVmRSS:\t   18500 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(18_500));
        assert_eq!(status_kib(status, "VmHWM:"), Some(21_000));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        assert_eq!(
            Rss::of([1000, 3000, 2000]),
            Rss {
                total_kib: 6000,
                largest_kib: 3000
            }
        );
    }

    #[test]
    fn idle_figures() {
        let report = parse_hold_line(
            r#"{"phase":"closed","conns":1000,"established":1000,"failed":0,"open_s":0.8,
                "held_s":2.0,"closed_early":0}"#,
            "closed",
        )
        .unwrap();
        let measured = Measured::Idle {
            report: report.clone(),
            processes: 2,
            before: Rss::of([10_240, 10_240]),
            held: Rss::of([11_264, 11_240]),
        };
        assert_eq!(measured.figure("rss_before_mb"), Some(20.0));
        assert_eq!(measured.figure("kib_per_conn"), Some(2.024));
        assert_eq!(measured.figure("rss_largest_mb"), Some(11.0));
        assert_eq!(measured.figure("errors"), Some(0.0));
        assert_eq!(measured.figure("rps"), None);
        assert!(
            measured
                .summary()
                .contains("20.0 -> 22.0 MiB  2.02 KiB/conn"),
            "{}",
            measured.summary()
        );
        // No mesh: no RSS to speak of, said so.
        let none = Measured::Idle {
            report,
            processes: 0,
            before: Rss::default(),
            held: Rss::default(),
        };
        assert!(none.figure("kib_per_conn").unwrap().is_nan());
        assert_eq!(none.figure("processes"), Some(0.0));
        assert!(none.summary().contains("no mesh processes"));
    }

    #[test]
    fn a_stopped_run_goes_on_from_its_journal_at_the_same_commit_only() {
        let dir = std::env::temp_dir().join(format!("weft-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("samples.jsonl");
        let bulk = Scenario::new(true, Workload::Bulk { conns: 1 });
        let sample = |gbit_s| Sample {
            mode: Mode::Weft,
            scenario: bulk,
            measured: Measured::Bulk {
                report: BulkReport {
                    bytes: GIB,
                    seconds: 1.0,
                    gbit_s,
                },
                cpu_s_per_gib: 0.5,
            },
        };
        let mut options = Options::full();
        let mut first = Journal::open(&path, "abc123", &options).unwrap();
        first.record(0, &sample(5.5)).unwrap();
        first.record(1, &sample(6.5)).unwrap();
        drop(first);

        options.resume = true;
        let resumed = Journal::open(&path, "abc123", &options).unwrap();
        let taken = |run| match resumed.taken(run, Mode::Weft, bulk).map(|s| s.measured) {
            Some(Measured::Bulk { report, .. }) => Some(report.gbit_s),
            _ => None,
        };
        assert_eq!((taken(0), taken(1), taken(2)), (Some(5.5), Some(6.5), None));
        assert!(resumed.taken(0, Mode::None, bulk).is_none());
        // Another commit's measurements, or a tree with changes, are not mixed in.
        let other = Journal::open(&path, "def456", &options).err().unwrap();
        assert!(other.to_string().contains("abc123"), "{other}");
        assert!(Journal::open(&path, "abc123-dirty", &options).is_err());
        // A new run starts the journal again.
        options.resume = false;
        drop(Journal::open(&path, "def456", &options).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn estimates_cover_every_workload() {
        let quick = Options::quick().timing();
        assert!(quick.seconds(Workload::Bulk { conns: 1 }) > 0.5);
        assert!(quick.seconds(Workload::ConnectEcho) > 0.5);
        assert!(quick.seconds(Workload::Idle { conns: 1000 }) < 5.0);
        assert_eq!(quick.seconds(Workload::Requests(Protocol::Tcp)), 12.25);
    }
}
