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
//! connections, and a new connection plus a 1-byte echo.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize};

use crate::{cluster, cmd, is_root, workspace_root};

mod churn;
mod report;
mod scale;

pub use churn::churn;
pub use scale::scale;

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
}

impl Options {
    /// The full benchmark: three runs of 60 s windows, into `bench/results/latest.json`.
    pub fn full() -> Self {
        Self {
            quick: false,
            runs: 3,
            out: workspace_root().join("bench/results/latest.json"),
            scenarios: Scenario::ALL.to_vec(),
        }
    }

    /// The quick one: one run of 10 s windows, 256 MiB bulk transfers and 1000 echoes, into
    /// `target/bench/`, without `same-node-grpc` to stay under five minutes (the full run has
    /// it).
    pub fn quick() -> Self {
        Self {
            quick: true,
            runs: 1,
            out: workspace_root().join("target/bench/quick.json"),
            scenarios: Scenario::ALL
                .into_iter()
                .filter(|s| s.cross_node || s.workload != Workload::Requests(Protocol::Grpc))
                .collect(),
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 64-byte requests answered with 1 KB: at a fixed rate, then closed loop.
    Requests(Protocol),
    /// ztunnel's throughput benchmark: the run's bulk bytes one way, shared by `conns`
    /// connections (port `tcp-bulk`).
    Bulk { conns: usize },
    /// ztunnel's connections benchmark: a new connection, 1 byte there and back, close; one
    /// after the other (port `tcp-echo`).
    ConnectEcho,
}

impl Workload {
    /// The scenario name's second half.
    pub fn name(self) -> String {
        match self {
            Workload::Requests(protocol) => protocol.name().into(),
            Workload::Bulk { conns } => format!("bulk-{conns}"),
            Workload::ConnectEcho => "connect-echo".into(),
        }
    }

    fn port(self) -> u16 {
        match self {
            Workload::Requests(protocol) => protocol.port(),
            Workload::Bulk { .. } => BULK_PORT,
            Workload::ConnectEcho => ECHO_PORT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub cross_node: bool,
    pub workload: Workload,
}

impl Scenario {
    pub const ALL: [Scenario; 10] = [
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
#[derive(Clone, Debug, Deserialize)]
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
#[derive(Clone, Debug, Deserialize)]
pub struct BulkReport {
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_s: f64,
}

/// One `weft-loadgen echo` report (the fields the benchmark reads).
#[derive(Clone, Debug, Deserialize)]
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

/// One (mode, scenario) measurement of one run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub mode: Mode,
    pub scenario: Scenario,
    pub measured: Measured,
}

/// What one measurement found, by workload.
#[derive(Clone, Debug)]
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
        }
    }
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

    let cluster = Cluster::up(&manifest)?;
    let samples = measure_all(options.runs, scenarios, timing, &loadgen);
    let down = cluster.down();
    let samples = samples?;
    down?;

    let machine = report::machine();
    let commit = report::commit();
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

/// The cluster of the benchmark: per mode a namespace with a client and two servers.
pub fn manifest_yaml(loadgen: &Path) -> String {
    let loadgen = loadgen.display();
    let mut yaml =
        String::from("# The data-plane benchmark's cluster, written by `cargo xtask bench`.\n");
    for mode in Mode::ALL {
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
) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let total = runs * Mode::ALL.len() * scenarios.len();
    for run in 0..runs {
        for &scenario in scenarios {
            // A different mode goes first in every run.
            let mut modes = Mode::ALL;
            modes.rotate_left(run % Mode::ALL.len());
            for mode in modes {
                let sample = measure(mode, scenario, timing, loadgen)
                    .with_context(|| format!("run {}: {mode} {}", run + 1, scenario.name()))?;
                println!(
                    "[{:>2}/{total}] run {} {:<23} {:<15} {}",
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

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
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
            ]
        );
        assert_eq!(Options::full().scenarios(), Scenario::ALL);
        let quick: Vec<String> = Options::quick()
            .scenarios()
            .iter()
            .map(|s| s.name())
            .collect();
        assert!(!quick.contains(&"same-node-grpc".to_string()));
        assert_eq!(quick.len(), 9);
        let mut grpc = Options::quick();
        grpc.only(&["same-node-grpc".into(), "cross-node-grpc".into()])
            .unwrap();
        assert_eq!(grpc.scenarios(), [Scenario::ALL[2], Scenario::ALL[5]]);
        let err = grpc.only(&["same-node-udp".into()]).unwrap_err();
        assert!(err.to_string().contains("cross-node-connect-echo"), "{err}");
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
    fn estimates_cover_every_workload() {
        let quick = Options::quick().timing();
        assert!(quick.seconds(Workload::Bulk { conns: 1 }) > 0.5);
        assert!(quick.seconds(Workload::ConnectEcho) > 0.5);
        assert_eq!(quick.seconds(Workload::Requests(Protocol::Tcp)), 12.25);
    }
}
