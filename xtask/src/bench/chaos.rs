//! `cargo xtask bench chaos`: the steady mixed load ([`steady`]) for ten minutes while a
//! schedule replaces the node proxies (a rollout's handover, SIGTERM then a new process,
//! SIGKILL then a new process) and kills the mesh CA, and the configuration is rewritten ten
//! times a second. It reports the failed requests of each kind of fault, how long each took
//! to recover from, whether anything leaked (mesh-node processes, file descriptors, memory,
//! eBPF pins, sockets, conntrack entries), and whether any packet of the load bypassed the
//! proxies (tcpdump in the client pod and between the nodes).
//!
//! A benchmark, not a test: it reports what happened and judges nothing by time.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::{
    report,
    steady::{self, unix_ms, Capture, NodeSnapshot, Stream, StreamReport},
};
use crate::{cluster, is_root, probe, workspace_root};

/// How a `cargo xtask bench chaos` run is shaped.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// Minutes of load.
    pub minutes: f64,
    /// Requests a second over all streams.
    pub rate: u64,
    /// Seconds between two faults (and of calm before the first).
    pub every_s: f64,
    /// Where the JSON goes (the Markdown table beside it).
    pub out: PathBuf,
}

impl ChaosOptions {
    /// Ten minutes, a fault every 30 s, into `bench/results/chaos.json`.
    pub fn full() -> Self {
        Self {
            minutes: 10.0,
            rate: 400,
            every_s: 30.0,
            out: workspace_root().join("bench/results/chaos.json"),
        }
    }

    /// Two minutes, a fault every 12 s (each kind at least once), into `target/bench/`.
    pub fn quick() -> Self {
        Self {
            minutes: 2.0,
            every_s: 12.0,
            out: workspace_root().join("target/bench/chaos-quick.json"),
            ..Self::full()
        }
    }
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// A DaemonSet rollout with surge: a new mesh-node takes the sockets, the old drains.
    Handover,
    /// A container restart: SIGTERM, the process drains and exits, then a new one starts.
    Sigterm,
    /// A crash: SIGKILL, then a new one starts.
    Sigkill,
    /// The mesh CA killed, down for [`CA_DOWN`], started again.
    CaDown,
}

impl Fault {
    fn describe(self, target: &str) -> String {
        match self {
            Fault::Handover => format!("mesh-node handover ({target})"),
            Fault::Sigterm => format!("mesh-node SIGTERM, then started ({target})"),
            Fault::Sigkill => format!("mesh-node SIGKILL, then started ({target})"),
            Fault::CaDown => format!("CA killed, down {} s, started", CA_DOWN.as_secs()),
        }
    }
}

/// The faults in the order the schedule goes through them, again and again.
const FAULTS: [(Fault, &str); 7] = [
    (Fault::Handover, "node-1"),
    (Fault::Handover, "node-2"),
    (Fault::Sigterm, "node-1"),
    (Fault::Sigterm, "node-2"),
    (Fault::Sigkill, "node-1"),
    (Fault::Sigkill, "node-2"),
    (Fault::CaDown, "ca"),
];

/// How long the CA stays down.
const CA_DOWN: Duration = Duration::from_secs(5);
/// How often the configuration is rewritten.
const REWRITE_EVERY: Duration = Duration::from_millis(100);
/// One rewrite in this many also carries a resource with a bad field.
const INVALID_EVERY: u64 = 10;
/// The file the rewrites go to, in the cluster's configuration directory.
const CHURN_FILE: &str = "chaos.yaml";
/// How long the mesh may take to close what the load left before leaks are read.
const SETTLE: Duration = Duration::from_secs(15);
/// What, at the application's ports, would be a packet that bypassed the proxies: from the
/// client pod (its connections are redirected to the node proxy's 15001) and between the
/// nodes (the proxies speak HBONE on 15008).
const BYPASS_CLIENT: &str = "tcp and (dst port 7000 or dst port 8080 or dst port 9090)";
const BYPASS_FABRIC: &str = "tcp and (port 7000 or port 8080 or port 9090)";

/// One fault as injected.
#[derive(Clone, Debug, Serialize)]
pub struct Injected {
    pub fault: Fault,
    pub target: String,
    pub at_unix_ms: u64,
    /// Seconds until the restarted part was ready again (the old process gone, the new one
    /// ready on the current configuration; the CA serving).
    pub restart_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a run found.
#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub commit: String,
    pub machine: String,
    pub minutes: f64,
    pub rate: u64,
    /// When the streams' windows opened (the earliest), ms since the Unix epoch.
    pub window_start_unix_ms: u64,
    pub streams: Vec<StreamSummary>,
    pub faults: Vec<FaultSummary>,
    /// Requests failed before the first fault (the configuration rewrites already running).
    pub calm_failures: u64,
    pub calm_requests: u64,
    pub rewrites: u64,
    pub invalid_rewrites: u64,
    pub before: Leaks,
    pub after: Leaks,
    /// Packets at the application's ports from the client pod and between the nodes.
    pub bypass_client_packets: usize,
    pub bypass_fabric_packets: usize,
}

#[derive(Debug, Serialize)]
pub struct StreamSummary {
    pub name: String,
    pub rate: u64,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// One fault and the requests due from its injection to the next fault's.
#[derive(Debug, Serialize)]
pub struct FaultSummary {
    #[serde(flatten)]
    pub injected: Injected,
    pub requests: u64,
    /// Failed requests by stream (only the streams that had any).
    pub failures: BTreeMap<String, u64>,
    /// From the injection to the end of the last second with a failure (0: none failed).
    pub last_failure_s: f64,
    /// The first failure's message, for the operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// What the mesh holds, read before and after the run.
#[derive(Clone, Debug, Serialize)]
pub struct Leaks {
    pub nodes: Vec<NodeSnapshot>,
    pub pins: usize,
}

impl Leaks {
    fn take() -> Result<Self> {
        Ok(Self {
            nodes: ["node-1", "node-2"]
                .iter()
                .map(|n| NodeSnapshot::take(n))
                .collect::<Result<_>>()?,
            pins: steady::pins(),
        })
    }
}

/// Runs the chaos benchmark and writes its JSON and table.
pub fn chaos(options: &ChaosOptions) -> Result<()> {
    if !is_root() {
        bail!("the chaos benchmark builds a virtual cluster and needs root");
    }
    let schedule = schedule(options.minutes * 60.0, options.every_s);
    if schedule.is_empty() {
        bail!(
            "{} minutes leave no room for a fault (one every {} s, with as long a calm before \
             the first and as long a window after the last)",
            options.minutes,
            options.every_s
        );
    }
    println!(
        "==> chaos: {:.0} minutes of {} requests/s in {} streams, {} faults, the configuration \
         rewritten every {} ms",
        options.minutes,
        options.rate,
        Stream::mixed(options.rate).len(),
        schedule.len(),
        REWRITE_EVERY.as_millis()
    );
    let (loadgen, cluster) = super::steady_cluster()?;
    let result = run(options, &schedule, &loadgen);
    let _ = fs::remove_file(cluster::config_dir().join(CHURN_FILE));
    let down = cluster.down();
    let report = result?;
    down?;
    write(options, &report)
}

/// When each fault goes in, seconds into the window: after a calm `every_s`, every
/// `every_s`, the last one still with `every_s` of the window after it.
fn schedule(seconds: f64, every_s: f64) -> Vec<(f64, Fault, &'static str)> {
    (1..)
        .map(|i| f64::from(i) * every_s)
        .take_while(|at| *at <= seconds - every_s)
        .zip(FAULTS.iter().cycle())
        .map(|(at, (fault, target))| (at, *fault, *target))
        .collect()
}

fn run(
    options: &ChaosOptions,
    schedule: &[(f64, Fault, &'static str)],
    loadgen: &Path,
) -> Result<ChaosReport> {
    let seconds = options.minutes * 60.0;
    let streams = Stream::mixed(options.rate);
    // Every path once (pools, certificates), then what the mesh holds at rest.
    warm(&streams, loadgen)?;
    thread::sleep(SETTLE);
    let before = Leaks::take()?;
    let dir = probe::temp_dir("chaos")?;
    let fabric = Capture::in_netns("weft-fabric", dir.join("fabric.pcap"), BYPASS_FABRIC)?;
    let client = Capture::in_pod(steady::CLIENT, dir.join("client.pcap"), BYPASS_CLIENT)?;
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        thread::spawn(move || rewrite(&stop))
    };
    let running = streams
        .iter()
        .map(|s| s.start(loadgen, seconds, 1.0))
        .collect::<Result<Vec<_>>>();
    let injected = running.and_then(|running| {
        let start = Instant::now() + Duration::from_secs_f64(steady::WARMUP_S);
        let injected = inject(schedule, start)?;
        let reports = running
            .into_iter()
            .map(steady::Running::finish)
            .collect::<Result<Vec<_>>>()?;
        Ok((injected, reports))
    });
    stop.store(true, Ordering::Relaxed);
    let (rewrites, invalid_rewrites) = churn
        .join()
        .map_err(|_| anyhow::anyhow!("the configuration writer panicked"))??;
    let (injected, reports) = injected?;
    let _ = fs::remove_file(cluster::config_dir().join(CHURN_FILE));
    thread::sleep(SETTLE);
    let after = Leaks::take()?;
    let bypass_client_packets = client.packets()?;
    let bypass_fabric_packets = fabric.packets()?;
    let _ = fs::remove_dir_all(&dir);
    let (faults, calm_failures, calm_requests) = attribute(&injected, &reports);
    Ok(ChaosReport {
        commit: report::commit(),
        machine: report::machine(),
        minutes: options.minutes,
        rate: options.rate,
        window_start_unix_ms: reports
            .iter()
            .map(|(_, r)| r.window_start_unix_ms)
            .min()
            .unwrap_or_default(),
        streams: reports
            .into_iter()
            .map(|(stream, r)| StreamSummary {
                name: stream.name(),
                rate: stream.rate,
                requests: r.requests,
                errors: r.errors,
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                p999_us: r.p999_us,
                max_us: r.max_us,
                first_error: r.first_error,
            })
            .collect(),
        faults,
        calm_failures,
        calm_requests,
        rewrites,
        invalid_rewrites,
        before,
        after,
        bypass_client_packets,
        bypass_fabric_packets,
    })
}

/// A few seconds of every stream, so that pools and certificates exist before the mesh's
/// resources are first read.
fn warm(streams: &[Stream], loadgen: &Path) -> Result<()> {
    let running = streams
        .iter()
        .map(|s| s.start(loadgen, 3.0, 1.0))
        .collect::<Result<Vec<_>>>()?;
    for r in running {
        let (stream, report) = r.finish()?;
        if report.requests == 0 {
            bail!(
                "{} carried nothing before any fault: {}",
                stream.name(),
                report.first_error.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Injects the schedule's faults at their times (seconds after `start`; a fault that takes
/// longer than the gap delays the next).
fn inject(schedule: &[(f64, Fault, &'static str)], start: Instant) -> Result<Vec<Injected>> {
    let mut injected = Vec::new();
    for (i, (at, fault, target)) in schedule.iter().enumerate() {
        let due = start + Duration::from_secs_f64(*at);
        thread::sleep(due.saturating_duration_since(Instant::now()));
        println!(
            "[{:>2}/{}] {:>5.0} s  {}",
            i + 1,
            schedule.len(),
            at,
            fault.describe(target)
        );
        let at_unix_ms = unix_ms();
        let began = Instant::now();
        let result = match fault {
            Fault::Handover => cluster::restart_node(target, cluster::Restart::Handover),
            Fault::Sigterm => cluster::restart_node(target, cluster::Restart::Term),
            Fault::Sigkill => cluster::restart_node(target, cluster::Restart::Kill),
            Fault::CaDown => cluster::restart_ca(CA_DOWN),
        };
        let restart_s = began.elapsed().as_secs_f64();
        let error = match result {
            Ok(()) => None,
            Err(e) => {
                eprintln!("warning: {}: {e:#}", fault.describe(target));
                // Whatever state the part is in, the run goes on only with it running.
                recover(*fault, target)?;
                Some(format!("{e:#}"))
            }
        };
        injected.push(Injected {
            fault: *fault,
            target: (*target).into(),
            at_unix_ms,
            restart_s,
            error,
        });
    }
    Ok(injected)
}

/// Brings back a part whose restart failed: a new mesh-node after a kill, or the CA.
fn recover(fault: Fault, target: &str) -> Result<()> {
    match fault {
        Fault::CaDown => cluster::restart_ca(Duration::ZERO),
        _ => cluster::restart_node(target, cluster::Restart::Kill),
    }
    .with_context(|| format!("{target} did not come back; the run stops here"))
}

/// Rewrites [`CHURN_FILE`] every [`REWRITE_EVERY`] until `stop`; how many rewrites, and how
/// many of them carried a resource with a bad field.
fn rewrite(stop: &AtomicBool) -> Result<(u64, u64)> {
    let path = cluster::config_dir().join(CHURN_FILE);
    let (mut writes, mut invalid) = (0, 0);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let version = writes + 1;
        cluster::write_atomic(&path, churn_yaml(version).as_bytes())?;
        writes = version;
        if version.is_multiple_of(INVALID_EVERY) {
            invalid += 1;
        }
        next += REWRITE_EVERY;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok((writes, invalid))
}

/// Version `version` of the rewritten configuration: a VirtualService for the cross-node
/// Service whose header and timeout change every time, a DestinationRule for the same-node
/// one whose balancer alternates, and every [`INVALID_EVERY`]th time a VirtualService with a
/// bad field, which the nodes must reject alone.
fn churn_yaml(version: u64) -> String {
    let ns = super::Mode::Weft.namespace();
    let balancer = if version.is_multiple_of(2) {
        "ROUND_ROBIN"
    } else {
        "LEAST_REQUEST"
    };
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: chaos\n  \
         namespace: {ns}\nspec:\n  hosts: [remote.{ns}.svc.cluster.local]\n  http:\n  \
         - timeout: {}s\n    headers:\n      request:\n        set:\n          \
         x-chaos-version: \"{version}\"\n    route:\n    - destination:\n        \
         host: remote.{ns}.svc.cluster.local\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: chaos\n  \
         namespace: {ns}\nspec:\n  host: local.{ns}.svc.cluster.local\n  trafficPolicy:\n    \
         loadBalancer:\n      simple: {balancer}\n",
        10 + version % 5
    );
    if version.is_multiple_of(INVALID_EVERY) {
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
             name: chaos-invalid\n  namespace: {ns}\nspec:\n  hosts: [local.{ns}.svc.cluster.local]\n  \
             http:\n  - timeout: soon\n    route:\n    - destination:\n        \
             host: local.{ns}.svc.cluster.local\n"
        ));
    }
    yaml
}

/// Lines every stream's intervals up with the faults: an interval belongs to the last fault
/// injected before its end (or to the calm before the first). Returns the faults with their
/// failures, and the calm's failures and requests.
fn attribute(
    injected: &[Injected],
    reports: &[(Stream, StreamReport)],
) -> (Vec<FaultSummary>, u64, u64) {
    let mut faults: Vec<FaultSummary> = injected
        .iter()
        .map(|i| FaultSummary {
            injected: i.clone(),
            requests: 0,
            failures: BTreeMap::new(),
            last_failure_s: 0.0,
            first_error: None,
        })
        .collect();
    let (mut calm_failures, mut calm_requests) = (0, 0);
    for (stream, report) in reports {
        let mut intervals = report.intervals.iter().peekable();
        while let Some(interval) = intervals.next() {
            let start = report.window_start_unix_ms + (interval.t_s * 1000.0).round() as u64;
            let end = intervals.peek().map_or(start + 1000, |next| {
                report.window_start_unix_ms + (next.t_s * 1000.0).round() as u64
            });
            let due = interval.requests + interval.errors;
            match injected.iter().rposition(|i| i.at_unix_ms < end) {
                None => {
                    calm_failures += interval.errors;
                    calm_requests += due;
                }
                Some(f) => {
                    let fault = &mut faults[f];
                    fault.requests += due;
                    if interval.errors > 0 {
                        *fault.failures.entry(stream.name()).or_default() += interval.errors;
                        let after = end.saturating_sub(fault.injected.at_unix_ms) as f64 / 1000.0;
                        fault.last_failure_s = fault.last_failure_s.max(after);
                        if fault.first_error.is_none() {
                            fault.first_error.clone_from(&interval.first_error);
                        }
                    }
                }
            }
        }
    }
    (faults, calm_failures, calm_requests)
}

fn write(options: &ChaosOptions, report: &ChaosReport) -> Result<()> {
    if let Some(parent) = options.out.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(&options.out, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", options.out.display()))?;
    let md = options.out.with_extension("md");
    let table = markdown(report);
    fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("\n{table}");
    println!("==> wrote {} and {}", options.out.display(), md.display());
    if report.bypass_client_packets + report.bypass_fabric_packets > 0 {
        eprintln!(
            "warning: {} packet(s) from the client pod and {} between the nodes reached an \
             application port directly: the load bypassed the proxies",
            report.bypass_client_packets, report.bypass_fabric_packets
        );
    }
    Ok(())
}

/// The run as Markdown: faults by kind, then each fault, the streams, leaks and bypass.
pub fn markdown(report: &ChaosReport) -> String {
    let count = |n: Option<usize>| n.map_or_else(|| "–".to_string(), |n| n.to_string());
    let mut md = format!(
        "Chaos at `{}` on {}: {:.0} minutes of {} requests/s in {} streams, {} faults, the \
         configuration rewritten {} times ({} with an invalid resource).\n\n",
        report.commit,
        report.machine,
        report.minutes,
        report.rate,
        report.streams.len(),
        report.faults.len(),
        report.rewrites,
        report.invalid_rewrites
    );
    md.push_str(
        "| fault | times | ready again after, s (max) | requests due | failed | last failure \
         after, s (max) | failed in |\n|---|---:|---:|---:|---:|---:|---|\n",
    );
    let _ = writeln!(
        md,
        "| none (before the first fault; rewrites running) | – | – | {} | {} | – | – |",
        report.calm_requests, report.calm_failures
    );
    let mut kinds: BTreeMap<(Fault, &str), Vec<&FaultSummary>> = BTreeMap::new();
    for f in &report.faults {
        kinds
            .entry((f.injected.fault, f.injected.target.as_str()))
            .or_default()
            .push(f);
    }
    for ((fault, target), faults) in &kinds {
        let mut failed_in: BTreeMap<&str, u64> = BTreeMap::new();
        for f in faults {
            for (stream, n) in &f.failures {
                *failed_in.entry(stream).or_default() += n;
            }
        }
        let failed_in: Vec<String> = failed_in
            .iter()
            .map(|(stream, n)| format!("{stream} {n}"))
            .collect();
        let max = |v: fn(&FaultSummary) -> f64| faults.iter().map(|f| v(f)).fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {} | {} | {:.1} | {} |",
            fault.describe(target),
            faults.len(),
            max(|f| f.injected.restart_s),
            faults.iter().map(|f| f.requests).sum::<u64>(),
            faults
                .iter()
                .map(|f| f.failures.values().sum::<u64>())
                .sum::<u64>(),
            max(|f| f.last_failure_s),
            if failed_in.is_empty() {
                "–".to_string()
            } else {
                failed_in.join(", ")
            }
        );
    }
    let errors: Vec<String> = report
        .faults
        .iter()
        .filter_map(|f| {
            let why = f.first_error.as_deref()?;
            Some(format!(
                "- {} at {:.0} s: {why}",
                f.injected.fault.describe(&f.injected.target),
                f.injected
                    .at_unix_ms
                    .saturating_sub(report.window_start_unix_ms) as f64
                    / 1000.0
            ))
        })
        .collect();
    if !errors.is_empty() {
        md.push_str("\nFirst failure after each fault that had one:\n\n");
        md.push_str(&errors.join("\n"));
        md.push('\n');
    }
    let broken: Vec<String> = report
        .faults
        .iter()
        .filter_map(|f| {
            Some(format!(
                "- {}: {}",
                f.injected.fault.describe(&f.injected.target),
                f.injected.error.as_deref()?
            ))
        })
        .collect();
    if !broken.is_empty() {
        md.push_str("\nFaults the mesh did not come back from by itself:\n\n");
        md.push_str(&broken.join("\n"));
        md.push('\n');
    }
    md.push_str(
        "\n| stream | req/s | requests | failed | p50 µs | p99 µs | p99.9 µs | max µs |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in &report.streams {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s.name, s.rate, s.requests, s.errors, s.p50_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    md.push_str(
        "\n| after the run, against before | mesh-node processes | open files | RSS MiB | \
         established sockets | conntrack entries |\n|---|---|---|---|---|---|\n",
    );
    for (before, after) in report.before.nodes.iter().zip(&report.after.nodes) {
        let _ = writeln!(
            md,
            "| {} | {} → {} | {} → {} | {:.1} → {:.1} | {} → {} | {} → {} |",
            before.node,
            before.processes,
            after.processes,
            before.fds,
            after.fds,
            before.rss_kib as f64 / 1024.0,
            after.rss_kib as f64 / 1024.0,
            before.sockets,
            after.sockets,
            count(before.conntrack),
            count(after.conntrack)
        );
    }
    let _ = writeln!(
        md,
        "\neBPF pins: {} → {}. Packets at the application's ports, which only a bypass would \
         send: {} from the client pod, {} between the nodes.",
        report.before.pins,
        report.after.pins,
        report.bypass_client_packets,
        report.bypass_fabric_packets
    );
    md
}

#[cfg(test)]
mod tests {
    use serde::Deserialize as _;

    use super::*;
    use crate::bench::steady::Interval;

    #[test]
    fn the_schedule_goes_through_every_fault_with_calm_at_both_ends() {
        let full = schedule(600.0, 30.0);
        assert_eq!(full.len(), 19);
        assert_eq!(full[0], (30.0, Fault::Handover, "node-1"));
        assert_eq!(full[6], (210.0, Fault::CaDown, "ca"));
        assert_eq!(full[18].0, 570.0);
        let quick = schedule(120.0, 12.0);
        assert_eq!(quick.len(), 9);
        for (fault, target) in FAULTS {
            assert!(quick.iter().any(|(_, f, t)| (*f, *t) == (fault, target)));
        }
    }

    #[test]
    fn rewrites_change_every_time_and_sometimes_carry_a_bad_field() {
        let (one, two) = (churn_yaml(1), churn_yaml(2));
        assert_ne!(one, two);
        assert!(one.contains("x-chaos-version: \"1\""));
        assert!(one.contains("simple: LEAST_REQUEST") && two.contains("simple: ROUND_ROBIN"));
        assert!(!churn_yaml(9).contains("chaos-invalid"));
        assert!(churn_yaml(10).contains("name: chaos-invalid"));
        for version in [1, 10] {
            let yaml = churn_yaml(version);
            let docs: Vec<yaml_serde::Value> = yaml_serde::Deserializer::from_str(&yaml)
                .map(yaml_serde::Value::deserialize)
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(docs.len(), if version == 10 { 3 } else { 2 });
            assert_eq!(
                docs[0]["spec"]["http"][0]["route"][0]["destination"]["host"],
                "remote.bench-weft.svc.cluster.local"
            );
        }
    }

    fn stream_report(start_ms: u64, intervals: &[(u64, u64)]) -> StreamReport {
        StreamReport {
            requests: intervals.iter().map(|i| i.0).sum(),
            errors: intervals.iter().map(|i| i.1).sum(),
            first_error: None,
            p50_us: 100.0,
            p99_us: 200.0,
            p999_us: 300.0,
            max_us: 400.0,
            window_start_unix_ms: start_ms,
            intervals: intervals
                .iter()
                .enumerate()
                .map(|(t, (requests, errors))| Interval {
                    t_s: t as f64,
                    requests: *requests,
                    errors: *errors,
                    p99_us: 200.0,
                    first_error: (*errors > 0).then(|| format!("reset at {t}")),
                })
                .collect(),
        }
    }

    #[test]
    fn failures_go_to_the_fault_before_them() {
        let injected = |at_unix_ms| Injected {
            fault: Fault::Sigkill,
            target: "node-1".into(),
            at_unix_ms,
            restart_s: 1.5,
            error: None,
        };
        // Faults at 2.5 s and 5.0 s into the window.
        let faults = [injected(12_500), injected(15_000)];
        let streams = Stream::mixed(16);
        let reports = [
            (
                streams[0].clone(),
                stream_report(
                    10_000,
                    &[(10, 1), (10, 0), (5, 5), (8, 2), (10, 0), (0, 10), (10, 0)],
                ),
            ),
            (streams[6].clone(), stream_report(10_000, &[(10, 0); 7])),
        ];
        let (summaries, calm_failures, calm_requests) = attribute(&faults, &reports);
        // The first two seconds are calm (one failure, before any fault).
        assert_eq!((calm_failures, calm_requests), (1, 41));
        // Seconds 2..5 (ending at 3, 4, 5 s) belong to the first fault: 7 failures, the last
        // in the second that ended 1.5 s after it.
        assert_eq!(summaries[0].failures.get("same-node-http"), Some(&7));
        assert_eq!(summaries[0].requests, 30 + 30);
        assert_eq!(summaries[0].last_failure_s, 1.5);
        assert_eq!(summaries[0].first_error.as_deref(), Some("reset at 2"));
        // Seconds 5..7 go to the second: the failures of the second ending 1 s after it.
        assert_eq!(summaries[1].failures.get("same-node-http"), Some(&10));
        assert_eq!(summaries[1].last_failure_s, 1.0);
        assert!(!summaries[1].failures.contains_key("cross-node-tcp"));
        let md = markdown(&ChaosReport {
            commit: "abc".into(),
            machine: "test".into(),
            minutes: 1.0,
            rate: 16,
            window_start_unix_ms: 10_000,
            streams: Vec::new(),
            faults: summaries,
            calm_failures,
            calm_requests,
            rewrites: 10,
            invalid_rewrites: 1,
            before: Leaks {
                nodes: Vec::new(),
                pins: 4,
            },
            after: Leaks {
                nodes: Vec::new(),
                pins: 4,
            },
            bypass_client_packets: 0,
            bypass_fabric_packets: 0,
        });
        assert!(
            md.contains("| mesh-node SIGKILL, then started (node-1) | 2 | 1.5 | 100 | 17 | 1.5 | same-node-http 17 |"),
            "{md}"
        );
        assert!(md.contains("| none (before the first fault; rewrites running) | – | – | 41 | 1 |"));
        assert!(
            md.contains("- mesh-node SIGKILL, then started (node-1) at 2 s: reset at 2"),
            "{md}"
        );
    }
}
