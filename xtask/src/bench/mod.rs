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

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

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

    /// The quick one: one run of 10 s windows, into `target/bench/`, without
    /// `same-node-grpc` to stay under five minutes (the full run has it).
    pub fn quick() -> Self {
        Self {
            quick: true,
            runs: 1,
            out: workspace_root().join("target/bench/quick.json"),
            scenarios: Scenario::ALL
                .into_iter()
                .filter(|s| s.cross_node || s.protocol != Protocol::Grpc)
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
            }
        } else {
            Timing {
                fixed_s: 60.0,
                fixed_warmup_s: 2.0,
                saturation_s: 10.0,
                saturation_warmup_s: 1.0,
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Timing {
    fixed_s: f64,
    fixed_warmup_s: f64,
    saturation_s: f64,
    saturation_warmup_s: f64,
}

/// The fixed rate and its connections (Istio's method), and the saturation connections.
pub const RATE: u64 = 1000;
pub const RATE_CONNS: usize = 4;
pub const SATURATION_CONNS: usize = 64;
pub const RESPONSE_BYTES: usize = 1024;
const TCP_PORT: u16 = 7000;
const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub cross_node: bool,
    pub protocol: Protocol,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::new(false, Protocol::Tcp),
        Scenario::new(false, Protocol::Http),
        Scenario::new(false, Protocol::Grpc),
        Scenario::new(true, Protocol::Tcp),
        Scenario::new(true, Protocol::Http),
        Scenario::new(true, Protocol::Grpc),
    ];

    const fn new(cross_node: bool, protocol: Protocol) -> Self {
        Self {
            cross_node,
            protocol,
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
            self.protocol.name()
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

/// One (mode, scenario) measurement of one run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub mode: Mode,
    pub scenario: Scenario,
    pub fixed: LoadReport,
    pub saturation: LoadReport,
    /// CPU seconds of the mode's mesh processes per 1,000 requests of the fixed-rate window.
    pub cpu_s_per_1k: f64,
    /// Peak RSS (VmHWM) of the largest mesh process during the fixed-rate window, MiB.
    pub rss_mb: f64,
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
        * (Mode::ALL.len() * scenarios.len()) as f64
        * (timing.fixed_s
            + timing.fixed_warmup_s
            + timing.saturation_s
            + timing.saturation_warmup_s
            + 1.0);
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
        let annotations = match mode.sidecar() {
            Some(kind) => format!(
                "\n  annotations:\n    {}: {kind}",
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
                 --grpc-port, \"{GRPC_PORT}\", --response-bytes, \"{RESPONSE_BYTES}\"]\n    \
                 ports:\n    - containerPort: {TCP_PORT}\n    - containerPort: {HTTP_PORT}\n    \
                 - containerPort: {GRPC_PORT}\n\
                 ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {service}\n  \
                 namespace: {ns}\nspec:\n  selector:\n    app: server-{service}\n  ports:\n  \
                 - name: tcp\n    port: {TCP_PORT}\n    targetPort: {TCP_PORT}\n  \
                 - name: http\n    port: {HTTP_PORT}\n    targetPort: {HTTP_PORT}\n    \
                 appProtocol: http\n  - name: grpc\n    port: {GRPC_PORT}\n    \
                 targetPort: {GRPC_PORT}\n    appProtocol: grpc\n"
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
                    "[{:>2}/{total}] run {} {:<16} {:<15} p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  sat {:>7.0} rps  cpu {:.3} s/1k  rss {:.1} MiB",
                    samples.len() + 1,
                    run + 1,
                    scenario.name(),
                    mode.name(),
                    sample.fixed.p50_us,
                    sample.fixed.p99_us,
                    sample.fixed.p999_us,
                    sample.saturation.rps,
                    sample.cpu_s_per_1k,
                    sample.rss_mb,
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
    let addr = format!("{vip}:{}", scenario.protocol.port());
    let client = format!("{ns}/client");
    let pids = mesh_pids(mode)?;
    for pid in &pids {
        reset_peak_rss(*pid);
    }
    let cpu_before = cpu_ticks(&pids);
    let fixed = load(
        &client,
        loadgen,
        &addr,
        scenario,
        RATE,
        RATE_CONNS,
        timing.fixed_s,
        timing.fixed_warmup_s,
    )?;
    let cpu = (cpu_ticks(&pids) - cpu_before) as f64 / clock_ticks();
    let rss_mb = pids
        .iter()
        .filter_map(|pid| peak_rss_kib(*pid))
        .max()
        .map_or(0.0, |kib| kib as f64 / 1024.0);
    let saturation = load(
        &client,
        loadgen,
        &addr,
        scenario,
        0,
        SATURATION_CONNS,
        timing.saturation_s,
        timing.saturation_warmup_s,
    )?;
    Ok(Sample {
        mode,
        scenario,
        cpu_s_per_1k: cpu / (fixed.total_requests.max(1) as f64 / 1000.0),
        rss_mb,
        fixed,
        saturation,
    })
}

#[allow(
    clippy::too_many_arguments,
    reason = "one measurement's settings, passed as they are read"
)]
fn load(
    client: &str,
    loadgen: &Path,
    addr: &str,
    scenario: Scenario,
    rate: u64,
    conns: usize,
    duration_s: f64,
    warmup_s: f64,
) -> Result<LoadReport> {
    let argv: Vec<String> = vec![
        loadgen.display().to_string(),
        "run".into(),
        addr.into(),
        "--protocol".into(),
        scenario.protocol.name().into(),
        "--rate".into(),
        rate.to_string(),
        "--conns".into(),
        conns.to_string(),
        "--duration-s".into(),
        duration_s.to_string(),
        "--warmup-s".into(),
        warmup_s.to_string(),
        "--response-bytes".into(),
        RESPONSE_BYTES.to_string(),
    ];
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
    let report: LoadReport = serde_json::from_str(stdout.trim())
        .with_context(|| format!("the load generator printed {stdout:?}"))?;
    if report.errors > 0 {
        eprintln!(
            "warning: {} failed request(s) towards {addr} from {client}: {}",
            report.errors,
            report.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(report)
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
                "cross-node-grpc"
            ]
        );
        assert_eq!(Options::full().scenarios(), Scenario::ALL);
        let quick: Vec<String> = Options::quick()
            .scenarios()
            .iter()
            .map(|s| s.name())
            .collect();
        assert!(!quick.contains(&"same-node-grpc".to_string()));
        assert_eq!(quick.len(), 5);
        let mut grpc = Options::quick();
        grpc.only(&["same-node-grpc".into(), "cross-node-grpc".into()])
            .unwrap();
        assert_eq!(grpc.scenarios(), [Scenario::ALL[2], Scenario::ALL[5]]);
        let err = grpc.only(&["same-node-udp".into()]).unwrap_err();
        assert!(err.to_string().contains("cross-node-grpc"), "{err}");
    }
}
