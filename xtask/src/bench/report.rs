//! What a benchmark run produces: medians with min and max over the runs, the targets of the
//! benchmark issue checked (reported, never asserted), the JSON, Markdown tables (one per kind
//! of workload) and an SVG chart of the request/response latency percentiles.

use std::{fmt::Write as _, fs, process::Command};

use serde_json::{json, Map, Value};

use super::{
    Mode, Options, Protocol, Sample, Scenario, Workload, GIB, MIB, RATE, RATE_CONNS,
    RESPONSE_BYTES, SATURATION_CONNS,
};
use crate::{cmd, workspace_root};

/// Median, min and max of one figure over the runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// The figures of one request/response (mode, scenario), in the order the JSON lists them.
/// `added_X` is X minus `none`'s X in the same run.
pub const REQUEST_FIGURES: [&str; 13] = [
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "added_p50_us",
    "added_p90_us",
    "added_p99_us",
    "rps",
    "cpu_s_per_1k",
    "rss_mb",
    "fixed_rps",
    "errors",
    "saturation_p99_us",
];

/// The figures of one bulk (mode, scenario). `ratio_to_none` is the throughput over `none`'s
/// in the same run.
pub const BULK_FIGURES: [&str; 4] = ["gbit_s", "ratio_to_none", "seconds", "cpu_s_per_gib"];

/// The figures of one connect + echo (mode, scenario). `ratio_to_none` is the mean over
/// `none`'s in the same run; `cpu_s_per_1k` is per 1,000 connections.
pub const ECHO_FIGURES: [&str; 8] = [
    "mean_us",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "ratio_to_none",
    "cpu_s_per_1k",
    "errors",
];

/// The figures of one idle (mode, scenario): the RSS of all the mode's mesh processes before
/// the connections opened and while they were held (MiB), what each established connection
/// added (KiB), that as a ratio to the best sidecar mode's of the same run, the largest single
/// process while held (MiB), how many processes, and the connections established and lost.
/// The RSS figures are null for `none`, which has no mesh processes.
pub const IDLE_FIGURES: [&str; 8] = [
    "rss_before_mb",
    "rss_held_mb",
    "kib_per_conn",
    "ratio_to_sidecar",
    "rss_largest_mb",
    "processes",
    "established",
    "errors",
];

/// Issue 13's bound on what an idle connection may cost, KiB (2 KB).
pub const IDLE_KIB_PER_CONN_BOUND: f64 = 2000.0 / 1024.0;

/// The figures of a workload, in the order the JSON lists them.
pub fn figures(workload: Workload) -> &'static [&'static str] {
    match workload {
        Workload::Requests(_) => &REQUEST_FIGURES,
        Workload::Bulk { .. } => &BULK_FIGURES,
        Workload::ConnectEcho => &ECHO_FIGURES,
        Workload::Idle { .. } => &IDLE_FIGURES,
    }
}

/// The figure `ratio_to_none` compares: what ztunnel's benchmark reports for the workload.
fn headline(workload: Workload) -> &'static str {
    match workload {
        Workload::Requests(_) => "rps",
        Workload::Bulk { .. } => "gbit_s",
        Workload::ConnectEcho => "mean_us",
        Workload::Idle { .. } => "kib_per_conn",
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub mode: Mode,
    pub scenario: Scenario,
    /// Same order as [`figures`] of the scenario's workload.
    pub stats: Vec<Stat>,
}

impl Row {
    /// A figure of the row's workload.
    pub fn get(&self, figure: &str) -> Stat {
        self.find(figure).expect("a figure of the row's workload")
    }

    /// A figure, `None` when the row's workload has no such figure.
    pub fn find(&self, figure: &str) -> Option<Stat> {
        let i = figures(self.scenario.workload)
            .iter()
            .position(|f| *f == figure)?;
        Some(self.stats[i])
    }
}

/// Per (mode, scenario), in the order of [`Scenario::ALL`] then [`Mode::ALL`]. Added latency
/// and ratios are taken run by run against `none` of the same run and scenario (against the
/// better of the two sidecar modes for `ratio_to_sidecar`), then summarised.
pub fn aggregate(samples: &[Sample], runs: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        let of = |mode: Mode| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.mode == mode && s.scenario == scenario)
                .collect()
        };
        let none = of(Mode::None);
        let best_sidecar = best_per_run(
            &[of(Mode::Sidecar), of(Mode::SidecarHaproxy)],
            headline(scenario.workload),
        );
        for mode in Mode::ALL {
            let mine = of(mode);
            if mine.is_empty() {
                continue;
            }
            debug_assert!(mine.len() <= runs);
            let raw = |s: &Sample, figure: &str| s.measured.figure(figure).unwrap_or(f64::NAN);
            let paired = |figure: &str, f: fn(f64, f64) -> f64| -> Vec<f64> {
                mine.iter()
                    .zip(&none)
                    .map(|(m, n)| f(raw(m, figure), raw(n, figure)))
                    .collect()
            };
            let stats = figures(scenario.workload)
                .iter()
                .map(|figure| {
                    let values: Vec<f64> = if let Some(base) = figure.strip_prefix("added_") {
                        paired(base, |m, n| m - n)
                    } else if *figure == "ratio_to_none" {
                        paired(headline(scenario.workload), |m, n| m / n)
                    } else if *figure == "ratio_to_sidecar" {
                        let figure = headline(scenario.workload);
                        mine.iter()
                            .zip(&best_sidecar)
                            .map(|(m, best)| {
                                // A sidecar that grew by nothing leaves no ratio to take.
                                if *best > 0.0 {
                                    raw(m, figure) / best
                                } else {
                                    f64::NAN
                                }
                            })
                            .collect()
                    } else {
                        mine.iter().map(|m| raw(m, figure)).collect()
                    };
                    Stat::of(&values)
                })
                .collect();
            rows.push(Row {
                mode,
                scenario,
                stats,
            });
        }
    }
    rows
}

/// Run by run, the lowest `figure` of the modes' samples (each list in run order; a mode
/// without a sample or figure in a run is left out of that run).
fn best_per_run(modes: &[Vec<&Sample>], figure: &str) -> Vec<f64> {
    let runs = modes.iter().map(Vec::len).max().unwrap_or(0);
    (0..runs)
        .map(|run| {
            modes
                .iter()
                .filter_map(|samples| samples.get(run)?.measured.figure(figure))
                .filter(|v| !v.is_nan())
                .fold(f64::NAN, f64::min)
        })
        .collect()
}

/// One target of the benchmark issue, as measured.
#[derive(Clone, Debug)]
pub struct Target {
    pub what: String,
    pub scenario: String,
    pub weft: f64,
    pub bound: f64,
    pub met: bool,
}

/// Weft against the aims of the benchmark issues: for requests, against the best sidecar mode
/// (Weft's proxy or HAProxy as sidecars, whichever did best at each figure) and gRPC against
/// HTTP/1.1; against no mesh (as ratios, like ztunnel's figures) for bulk and connect + echo;
/// against issue 13's 2 KB for an idle connection.
pub fn targets(rows: &[Row]) -> Vec<Target> {
    let find = |mode: Mode, scenario: Scenario| {
        rows.iter()
            .find(|r| r.mode == mode && r.scenario == scenario)
    };
    let mut out = Vec::new();
    for scenario in Scenario::ALL {
        let ratio = find(Mode::Weft, scenario).and_then(|w| w.find("ratio_to_none"));
        match (scenario.workload, ratio) {
            (Workload::Requests(_), _) => {}
            (Workload::Bulk { .. }, Some(ratio)) if scenario.cross_node => {
                out.push(Target {
                    what: "bulk throughput at least 0.45× no mesh (ratio)".into(),
                    scenario: scenario.name(),
                    weft: ratio.median,
                    bound: 0.45,
                    met: ratio.median >= 0.45,
                });
                continue;
            }
            (Workload::Idle { .. }, _) => {
                if let Some(weft) = find(Mode::Weft, scenario) {
                    let kib = weft.get("kib_per_conn").median;
                    out.push(Target {
                        what: "idle connection under 2 KB of mesh RSS (KiB per connection)".into(),
                        scenario: scenario.name(),
                        weft: kib,
                        bound: IDLE_KIB_PER_CONN_BOUND,
                        met: kib < IDLE_KIB_PER_CONN_BOUND,
                    });
                }
                continue;
            }
            (Workload::ConnectEcho, Some(ratio)) if scenario.cross_node => {
                out.push(Target {
                    what: "connect + echo at most 2.5× no mesh (ratio of means)".into(),
                    scenario: scenario.name(),
                    weft: ratio.median,
                    bound: 2.5,
                    met: ratio.median <= 2.5,
                });
                continue;
            }
            _ => continue,
        }
        let Some(weft) = find(Mode::Weft, scenario) else {
            continue;
        };
        let sidecars: Vec<&Row> = [Mode::Sidecar, Mode::SidecarHaproxy]
            .into_iter()
            .filter_map(|mode| find(mode, scenario))
            .collect();
        let name = scenario.name();
        // Each figure against the sidecar mode that did best at it in this run.
        let best = |figure: &str, higher_is_better: bool| -> Option<(f64, Mode)> {
            sidecars
                .iter()
                .map(|r| (r.get(figure).median, r.mode))
                .filter(|(v, _)| !v.is_nan())
                .reduce(|a, b| {
                    let b_better = if higher_is_better {
                        b.0 > a.0
                    } else {
                        b.0 < a.0
                    };
                    if b_better {
                        b
                    } else {
                        a
                    }
                })
        };
        if let Some((s, mode)) = best("added_p99_us", false) {
            let w = weft.get("added_p99_us").median;
            out.push(Target {
                what: format!("added p99 at most a quarter of the best sidecar's ({mode}, µs)"),
                scenario: name.clone(),
                weft: w,
                bound: s / 4.0,
                met: w <= s / 4.0,
            });
        }
        if let Some((s, mode)) = best("rps", true) {
            let w = weft.get("rps").median;
            out.push(Target {
                what: format!("saturation at least twice the best sidecar's ({mode}, requests/s)"),
                scenario: name.clone(),
                weft: w,
                bound: 2.0 * s,
                met: w >= 2.0 * s,
            });
        }
        if let Some((s, mode)) = best("cpu_s_per_1k", false) {
            let w = weft.get("cpu_s_per_1k").median;
            out.push(Target {
                what: format!("CPU per 1,000 requests at most half the best sidecar's ({mode}, s)"),
                scenario: name.clone(),
                weft: w,
                bound: s / 2.0,
                met: w <= s / 2.0,
            });
        }
        // A gRPC call costs no more than an HTTP/1.1 request of the same size, same placement.
        if scenario.workload == Workload::Requests(Protocol::Grpc) {
            let http = Scenario::new(scenario.cross_node, Workload::Requests(Protocol::Http));
            if let Some(http) = find(Mode::Weft, http) {
                let (w, h) = (
                    weft.get("cpu_s_per_1k").median,
                    http.get("cpu_s_per_1k").median,
                );
                out.push(Target {
                    what: "gRPC CPU per 1,000 calls at most HTTP/1.1's per 1,000 requests (s)"
                        .into(),
                    scenario: name.clone(),
                    weft: w,
                    bound: h,
                    met: w <= h,
                });
            }
        }
        if !scenario.cross_node && scenario.workload == Workload::Requests(Protocol::Tcp) {
            if let Some(none) = find(Mode::None, scenario) {
                for (figure, what) in [
                    ("p50_us", "p50 within 10% of no mesh (µs)"),
                    ("p99_us", "p99 within 10% of no mesh (µs)"),
                ] {
                    let (w, n) = (weft.get(figure).median, none.get(figure).median);
                    out.push(Target {
                        what: what.into(),
                        scenario: name.clone(),
                        weft: w,
                        bound: 1.1 * n,
                        met: w <= 1.1 * n,
                    });
                }
                let (w, n) = (weft.get("rps").median, none.get("rps").median);
                out.push(Target {
                    what: "saturation within 10% of no mesh (requests/s)".into(),
                    scenario: name.clone(),
                    weft: w,
                    bound: 0.9 * n,
                    met: w >= 0.9 * n,
                });
            }
        }
        let rss = weft.get("rss_mb").max;
        out.push(Target {
            what: "node proxy peak RSS under 20 MB at 1000 rps (MiB)".into(),
            scenario: name,
            weft: rss,
            bound: 20.0,
            met: rss < 20.0,
        });
    }
    out
}

fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        v.round()
    } else {
        (v * 1000.0).round() / 1000.0
    }
}

pub fn json(commit: &str, machine: &str, options: &Options, rows: &[Row]) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut obj = Map::new();
            obj.insert("mode".into(), json!(row.mode.name()));
            obj.insert("scenario".into(), json!(row.scenario.name()));
            let (mut min, mut max) = (Map::new(), Map::new());
            for (figure, stat) in figures(row.scenario.workload).iter().zip(&row.stats) {
                obj.insert((*figure).into(), json!(round(stat.median)));
                min.insert((*figure).into(), json!(round(stat.min)));
                max.insert((*figure).into(), json!(round(stat.max)));
            }
            obj.insert("min".into(), Value::Object(min));
            obj.insert("max".into(), Value::Object(max));
            Value::Object(obj)
        })
        .collect();
    let targets: Vec<Value> = targets(rows)
        .iter()
        .map(|t| {
            json!({"target": t.what, "scenario": t.scenario, "weft": round(t.weft),
                   "bound": round(t.bound), "met": t.met})
        })
        .collect();
    let timing = options.timing();
    json!({
        "commit": commit,
        "machine": machine,
        "runs": options.runs,
        "quick": options.quick,
        "method": {
            "fixed_rate_rps": RATE,
            "fixed_rate_conns": RATE_CONNS,
            "fixed_rate_s": timing.fixed_s,
            "saturation_conns": SATURATION_CONNS,
            "saturation_s": timing.saturation_s,
            "response_bytes": RESPONSE_BYTES,
            "latency": "from each request's intended send time (open loop)",
            "bulk_bytes": timing.bulk_bytes,
            "bulk": "bulk_bytes one way, shared evenly by the scenario's connections, opened and warmed first; timed to the server's acknowledgement of the last byte",
            "echo_connections": timing.echo_count,
            "echo_warmup_connections": timing.echo_warmup,
            "echo": "one connection after another: connect, 1 byte there and back, close; latency from connect to the byte back",
            "hold_s": timing.hold_s,
            "idle": "the scenario's connections opened 8 at a time, each proven with a 1-byte echo, then held idle for hold_s; RSS (VmRSS) of all the mode's mesh processes read before they open and at the end of hold_s; kib_per_conn is the increase over the established connections",
            "figures": "median of the runs; min and max alongside; added_* and ratio_to_none against none of the same run",
        },
        "results": results,
        "targets": targets,
    })
}

/// The rows of a run's JSON (as [`json`] wrote them), to render its tables and targets again.
pub fn rows_from_json(results: &Value) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for result in results.as_array().into_iter().flatten() {
        let field = |name: &str| {
            result[name]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("a result without {name}: {result}"))
        };
        let (mode, scenario) = (field("mode")?, field("scenario")?);
        let mode = Mode::ALL
            .into_iter()
            .find(|m| m.name() == mode)
            .ok_or_else(|| anyhow::anyhow!("no mode {mode:?}"))?;
        let scenario = Scenario::ALL
            .into_iter()
            .find(|s| s.name() == scenario)
            .ok_or_else(|| anyhow::anyhow!("no scenario {scenario:?}"))?;
        let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let stats = figures(scenario.workload)
            .iter()
            .map(|figure| Stat {
                median: number(&result[*figure]),
                min: number(&result["min"][*figure]),
                max: number(&result["max"][*figure]),
            })
            .collect();
        rows.push(Row {
            mode,
            scenario,
            stats,
        });
    }
    Ok(rows)
}

/// `2 vCPU (model), N GiB, Debian 12, Linux x.y`.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|o| {
            o.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} vCPU ({model}), {mem_gib:.0} GiB, {os}, Linux {}",
        kernel.trim()
    )
}

/// The commit the binaries were built from, `-dirty` when the tree has changes.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        cmd::output(Command::new("git").args(args).current_dir(workspace_root())).ok()
    };
    let hash = git(&["rev-parse", "--short=12", "HEAD"])
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.trim().is_empty());
    if dirty {
        format!("{hash}-dirty")
    } else {
        hash
    }
}

/// The results as Markdown: a table per kind of workload measured, then the targets.
pub fn markdown(rows: &[Row], commit: &str, machine: &str, options: &Options) -> String {
    let timing = options.timing();
    let of = |kind: fn(Workload) -> bool| -> Vec<&Row> {
        rows.iter().filter(|r| kind(r.scenario.workload)).collect()
    };
    let requests = of(|w| matches!(w, Workload::Requests(_)));
    let bulk = of(|w| matches!(w, Workload::Bulk { .. }));
    let echo = of(|w| w == Workload::ConnectEcho);
    let idle = of(|w| matches!(w, Workload::Idle { .. }));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Commit `{commit}`; {machine}. {} run(s), each figure the median (min–max in brackets).",
        options.runs
    );
    let range = |s: Stat, digits: usize| {
        if s.median.is_nan() {
            "–".to_string()
        } else if (s.max - s.min).abs() < f64::EPSILON {
            format!("{:.digits$}", s.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}–{:.digits$})",
                s.median, s.min, s.max
            )
        }
    };
    // A figure only meaningful with a mesh: a dash for `none`.
    let meshed = |row: &Row, figure: &str, digits: usize, spread: bool| {
        if row.mode == Mode::None {
            "–".to_string()
        } else if spread {
            range(row.get(figure), digits)
        } else {
            format!("{:.digits$}", row.get(figure).median)
        }
    };
    if !requests.is_empty() {
        let _ = writeln!(
            md,
            "\nRequests. Fixed rate: {RATE} requests/s over {RATE_CONNS} connections for {} s, \
             latency from each request's intended send time; saturation: closed loop over \
             {SATURATION_CONNS} connections for {} s; {RESPONSE_BYTES}-byte responses.\n",
            timing.fixed_s, timing.saturation_s
        );
        let _ = writeln!(
            md,
            "| scenario | mode | p50 µs | p90 µs | p99 µs | p99.9 µs | added p90 µs | added p99 µs | saturation req/s | CPU s / 1k req | peak RSS MiB |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in requests {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} |",
                row.scenario.name(),
                row.mode.name(),
                row.get("p50_us").median,
                row.get("p90_us").median,
                range(row.get("p99_us"), 0),
                row.get("p999_us").median,
                meshed(row, "added_p90_us", 0, true),
                meshed(row, "added_p99_us", 0, true),
                range(row.get("rps"), 0),
                meshed(row, "cpu_s_per_1k", 3, false),
                meshed(row, "rss_mb", 1, false),
            );
        }
    }
    if !bulk.is_empty() {
        let _ = writeln!(
            md,
            "\nBulk throughput (ztunnel's benchmark): {} one way, shared evenly by the \
             connections, opened and warmed first; timed to the server's acknowledgement of the \
             last byte. × no mesh is taken run by run.\n",
            size(timing.bulk_bytes)
        );
        let _ = writeln!(md, "| scenario | mode | Gbit/s | × no mesh | CPU s / GiB |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        for row in bulk {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                row.scenario.name(),
                row.mode.name(),
                range(row.get("gbit_s"), 2),
                meshed(row, "ratio_to_none", 2, true),
                meshed(row, "cpu_s_per_gib", 2, false),
            );
        }
    }
    if !echo.is_empty() {
        let _ = writeln!(
            md,
            "\nNew connection + 1-byte echo (ztunnel's benchmark): {} connections one after \
             the other (after {} not recorded), each connect, 1 byte there and back, close; \
             latency from connect to the byte back. × no mesh is of the means, run by run.\n",
            timing.echo_count, timing.echo_warmup
        );
        let _ = writeln!(
            md,
            "| scenario | mode | mean µs | p50 µs | p90 µs | p99 µs | × no mesh | CPU s / 1k conns |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for row in echo {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
                row.scenario.name(),
                row.mode.name(),
                range(row.get("mean_us"), 0),
                row.get("p50_us").median,
                row.get("p90_us").median,
                range(row.get("p99_us"), 0),
                meshed(row, "ratio_to_none", 2, true),
                meshed(row, "cpu_s_per_1k", 3, false),
            );
        }
    }
    if !idle.is_empty() {
        let _ = writeln!(
            md,
            "\nIdle connections: the scenario's connections opened, each proven with a 1-byte \
             echo, then held idle for {} s; resident memory (VmRSS) of all the mode's mesh \
             processes before they opened and at the end of the hold (Weft: both node proxies; \
             sidecar modes: the three sidecars). KiB / conn is the increase over the connections \
             established; × best sidecar is that over the better sidecar mode's, run by run.\n",
            timing.hold_s
        );
        let _ = writeln!(
            md,
            "| scenario | mode | connections | mesh RSS before MiB | mesh RSS held MiB | KiB / conn | × best sidecar | largest process MiB |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for row in idle {
            let held = format!(
                "{:.0} of {}",
                row.get("established").median,
                match row.scenario.workload {
                    Workload::Idle { conns } => conns,
                    _ => 0,
                }
            );
            if row.mode == Mode::None {
                let _ = writeln!(
                    md,
                    "| {} | none | {held} | no mesh processes | – | – | – | – |",
                    row.scenario.name(),
                );
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {held} | {:.1} | {:.1} | {} | {} | {:.1} |",
                row.scenario.name(),
                row.mode.name(),
                row.get("rss_before_mb").median,
                row.get("rss_held_mb").median,
                range(row.get("kib_per_conn"), 2),
                range(row.get("ratio_to_sidecar"), 2),
                row.get("rss_largest_mb").median,
            );
        }
    }
    let errors: f64 = rows
        .iter()
        .filter_map(|r| r.find("errors"))
        .map(|s| s.max)
        .sum();
    if errors > 0.0 {
        let _ = writeln!(
            md,
            "\nSome requests or connections failed (see the JSON's `errors`)."
        );
    }
    let _ = writeln!(md, "\nTargets (reported, not asserted):\n");
    let _ = writeln!(md, "| scenario | target | Weft | bound | met |");
    let _ = writeln!(md, "|---|---|---:|---:|---|");
    for t in targets(rows) {
        // Ratios need two decimals; requests/s and MiB read better with one.
        let digits = if t.bound.abs() < 10.0 { 2 } else { 1 };
        let _ = writeln!(
            md,
            "| {} | {} | {:.digits$} | {:.digits$} | {} |",
            t.scenario,
            t.what,
            t.weft,
            t.bound,
            if t.met { "yes" } else { "**no**" }
        );
    }
    md
}

/// `1 GiB`, `256 MiB`, or bytes.
fn size(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

const COLORS: [&str; 4] = ["#7f7f7f", "#d62728", "#ff7f0e", "#1f77b4"];

/// Latency percentiles per mode, one panel per request/response scenario (grouped bars, linear
/// axis).
pub fn chart_svg(rows: &[Row], commit: &str) -> String {
    const PANEL_W: f64 = 470.0;
    const PANEL_H: f64 = 300.0;
    const LEFT: f64 = 60.0;
    const TOP: f64 = 36.0;
    const BOTTOM: f64 = 40.0;
    let percentiles = [
        ("p50", "p50_us"),
        ("p90", "p90_us"),
        ("p99", "p99_us"),
        ("p99.9", "p999_us"),
    ];
    // Bulk and connect + echo have tables of their own, not percentiles at a fixed rate.
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| matches!(s.workload, Workload::Requests(_)))
        .filter(|s| rows.iter().any(|r| r.scenario == *s))
        .collect();
    let width = 2.0 * PANEL_W + 20.0;
    let height = scenarios.len().div_ceil(2) as f64 * PANEL_H + 70.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="18" font-size="14" font-weight="bold">Latency at {RATE} requests/s, {RESPONSE_BYTES}-byte responses (µs, lower is better; commit {commit})</text>"#
    );
    // Legend.
    for (i, mode) in Mode::ALL.iter().enumerate() {
        let x = 10.0 + i as f64 * 150.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            height - 22.0,
            COLORS[i],
            x + 16.0,
            height - 12.0,
            mode.name()
        );
    }
    for (p, scenario) in scenarios.iter().enumerate() {
        let ox = 10.0 + (p % 2) as f64 * (PANEL_W + 10.0);
        let oy = 28.0 + (p / 2) as f64 * PANEL_H;
        let plot_w = PANEL_W - LEFT - 10.0;
        let plot_h = PANEL_H - TOP - BOTTOM;
        let mine: Vec<&Row> = rows.iter().filter(|r| r.scenario == *scenario).collect();
        let top = mine
            .iter()
            .flat_map(|r| percentiles.iter().map(|(_, f)| r.get(f).median))
            .fold(1.0, f64::max);
        let (step, ymax) = nice_axis(top);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
            ox + LEFT,
            oy + 20.0,
            scenario.name()
        );
        let y_of = |v: f64| oy + TOP + plot_h * (1.0 - v / ymax);
        let mut tick = 0.0;
        while tick <= ymax + 1e-9 {
            let y = y_of(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                ox + LEFT,
                ox + LEFT + plot_w,
                ox + LEFT - 4.0,
                y + 4.0,
                tick
            );
            tick += step;
        }
        let group_w = plot_w / percentiles.len() as f64;
        let bar_w = (group_w - 16.0) / Mode::ALL.len() as f64;
        for (g, (label, figure)) in percentiles.iter().enumerate() {
            let gx = ox + LEFT + g as f64 * group_w + 8.0;
            for (m, mode) in Mode::ALL.iter().enumerate() {
                let Some(row) = mine.iter().find(|r| r.mode == *mode) else {
                    continue;
                };
                let v = row.get(figure).median;
                let y = y_of(v);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {} {label}: {v:.0} µs</title></rect>"#,
                    gx + m as f64 * bar_w,
                    bar_w - 1.0,
                    (oy + TOP + plot_h - y).max(0.0),
                    COLORS[m],
                    scenario.name(),
                    mode.name()
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                gx + (group_w - 16.0) / 2.0,
                oy + TOP + plot_h + 16.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#333"/>"##,
            ox + LEFT,
            oy + TOP + plot_h,
            ox + LEFT + plot_w,
            oy + TOP + plot_h
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A tick step of 1, 2 or 5 × 10^k giving about five ticks, and the axis top.
fn nice_axis(max: f64) -> (f64, f64) {
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    (step, (max / step).ceil() * step)
}

#[cfg(test)]
mod tests {
    use super::super::{BulkReport, EchoReport, HoldReport, LoadReport, Measured, Rss};
    use super::*;

    fn report(p: f64, rps: f64) -> LoadReport {
        LoadReport {
            requests: 1000,
            total_requests: 1100,
            errors: 0,
            first_error: None,
            rps,
            p50_us: p,
            p90_us: 2.0 * p,
            p99_us: 3.0 * p,
            p999_us: 4.0 * p,
        }
    }

    fn sample(mode: Mode, scenario: Scenario, p: f64, rps: f64) -> Sample {
        Sample {
            mode,
            scenario,
            measured: Measured::Requests {
                fixed: report(p, 1000.0),
                saturation: report(p, rps),
                cpu_s_per_1k: 0.1,
                rss_mb: 10.0,
            },
        }
    }

    fn bulk(mode: Mode, conns: usize, gbit_s: f64) -> Sample {
        Sample {
            mode,
            scenario: Scenario::new(true, Workload::Bulk { conns }),
            measured: Measured::Bulk {
                report: BulkReport {
                    bytes: 1 << 30,
                    seconds: 8.0 / gbit_s,
                    gbit_s,
                },
                cpu_s_per_gib: 0.5,
            },
        }
    }

    fn echo(mode: Mode, cross_node: bool, mean_us: f64) -> Sample {
        Sample {
            mode,
            scenario: Scenario::new(cross_node, Workload::ConnectEcho),
            measured: Measured::Echo {
                report: EchoReport {
                    total_connections: 2100,
                    errors: 0,
                    first_error: None,
                    mean_us,
                    p50_us: mean_us - 10.0,
                    p90_us: mean_us + 50.0,
                    p99_us: 2.0 * mean_us,
                    p999_us: 3.0 * mean_us,
                },
                cpu_s_per_1k: 0.2,
            },
        }
    }

    #[test]
    fn medians_and_ranges() {
        assert_eq!(
            Stat::of(&[3.0, 1.0, 2.0]),
            Stat {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(Stat::of(&[1.0, 2.0, 3.0, 10.0]).median, 2.5);
        assert_eq!(Stat::of(&[]), Stat::default());
    }

    #[test]
    fn added_latency_is_paired_run_by_run() {
        let s = Scenario::ALL[0];
        let samples = vec![
            sample(Mode::None, s, 100.0, 10_000.0),
            sample(Mode::Sidecar, s, 300.0, 4_000.0),
            sample(Mode::Weft, s, 105.0, 9_500.0),
            sample(Mode::None, s, 200.0, 10_000.0),
            sample(Mode::Sidecar, s, 400.0, 4_000.0),
            sample(Mode::Weft, s, 210.0, 9_500.0),
        ];
        let rows = aggregate(&samples, 2);
        assert_eq!(rows.len(), 3);
        let weft = rows.iter().find(|r| r.mode == Mode::Weft).unwrap();
        // p99 = 3 × p: added 15 in run 1, 30 in run 2.
        assert_eq!(weft.get("added_p99_us").min, 15.0);
        assert_eq!(weft.get("added_p99_us").max, 30.0);
        let none = rows.iter().find(|r| r.mode == Mode::None).unwrap();
        assert_eq!(none.get("added_p99_us").median, 0.0);

        let targets = targets(&rows);
        let met = |what: &str| {
            targets
                .iter()
                .find(|t| t.what.starts_with(what))
                .unwrap()
                .met
        };
        assert!(met("added p99"));
        assert!(met("saturation at least twice"));
        assert!(met("saturation within 10%"));
        assert!(met("node proxy peak RSS"));

        let options = Options::quick();
        let json = json("abc", "machine", &options, &rows);
        assert_eq!(json["results"][2]["mode"], "weft");
        assert_eq!(json["results"][2]["scenario"], "same-node-tcp");
        assert_eq!(json["results"][2]["min"]["added_p99_us"], 15.0);
        for key in [
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "added_p99_us",
            "rps",
            "cpu_s_per_1k",
            "rss_mb",
        ] {
            assert!(json["results"][0][key].is_number(), "{key}");
        }
        let md = markdown(&rows, "abc", "machine", &options);
        assert!(md.contains("| same-node-tcp | weft |"), "{md}");
        let svg = chart_svg(&rows, "abc");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    fn with_cpu(mut sample: Sample, cpu: f64) -> Sample {
        if let Measured::Requests { cpu_s_per_1k, .. } = &mut sample.measured {
            *cpu_s_per_1k = cpu;
        }
        sample
    }

    /// Requests are held against the sidecar mode that did best at each figure, and gRPC's
    /// CPU against HTTP/1.1's.
    #[test]
    fn request_targets_are_against_the_best_sidecar() {
        let http = Scenario::new(true, Workload::Requests(Protocol::Http));
        let grpc = Scenario::new(true, Workload::Requests(Protocol::Grpc));
        let samples = vec![
            sample(Mode::None, http, 100.0, 100_000.0),
            // Added p99 (3 × p over none's 300): 900, 600 and 150 µs.
            with_cpu(sample(Mode::Sidecar, http, 400.0, 10_000.0), 0.3),
            with_cpu(sample(Mode::SidecarHaproxy, http, 300.0, 20_000.0), 0.15),
            with_cpu(sample(Mode::Weft, http, 150.0, 30_000.0), 0.1),
            sample(Mode::None, grpc, 100.0, 50_000.0),
            with_cpu(sample(Mode::Weft, grpc, 150.0, 10_000.0), 0.2),
        ];
        let rows = aggregate(&samples, 1);
        let targets = targets(&rows);
        let target = |what: &str| {
            targets
                .iter()
                .find(|t| t.scenario == "cross-node-http" && t.what.starts_with(what))
                .unwrap_or_else(|| panic!("no target {what:?}: {targets:?}"))
        };
        let p99 = target("added p99");
        assert_eq!((p99.bound, p99.met), (150.0, true), "{p99:?}");
        assert!(p99.what.contains("sidecar-haproxy"), "{p99:?}");
        // Twice the Weft sidecars' would be met; twice HAProxy's is not.
        let saturation = target("saturation at least twice");
        assert_eq!((saturation.bound, saturation.met), (40_000.0, false));
        let cpu = target("CPU per 1,000 requests");
        assert_eq!((cpu.bound, cpu.met), (0.075, false));
        let grpc = targets
            .iter()
            .find(|t| t.scenario == "cross-node-grpc" && t.what.starts_with("gRPC CPU"))
            .unwrap();
        assert_eq!((grpc.weft, grpc.bound, grpc.met), (0.2, 0.1, false));
    }

    /// ztunnel's scenarios: ratios to `none` paired run by run, their own figures in the JSON,
    /// their own tables, their targets, and no panel in the latency chart.
    #[test]
    fn bulk_and_echo_are_ratios_to_no_mesh() {
        let samples = vec![
            // Run 1.
            bulk(Mode::None, 1, 16.0),
            bulk(Mode::Sidecar, 1, 4.0),
            bulk(Mode::Weft, 1, 8.0),
            bulk(Mode::None, 8, 20.0),
            bulk(Mode::Weft, 8, 8.0),
            echo(Mode::None, true, 200.0),
            echo(Mode::Weft, true, 600.0),
            echo(Mode::None, false, 100.0),
            echo(Mode::Weft, false, 150.0),
            // Run 2: a machine twice as slow; Weft's ratios differ from run 1's.
            bulk(Mode::None, 1, 8.0),
            bulk(Mode::Sidecar, 1, 2.0),
            bulk(Mode::Weft, 1, 2.4),
            bulk(Mode::None, 8, 10.0),
            bulk(Mode::Weft, 8, 6.0),
            echo(Mode::None, true, 400.0),
            echo(Mode::Weft, true, 800.0),
            echo(Mode::None, false, 200.0),
            echo(Mode::Weft, false, 300.0),
        ];
        let rows = aggregate(&samples, 2);
        let row = |mode: Mode, name: &str| {
            rows.iter()
                .find(|r| r.mode == mode && r.scenario.name() == name)
                .unwrap()
        };
        // Paired run by run: 8/16 and 2.4/8, not the ratio of the medians (5.2/12).
        let weft_bulk = row(Mode::Weft, "cross-node-bulk-1");
        assert_eq!(weft_bulk.get("ratio_to_none").min, 0.3);
        assert_eq!(weft_bulk.get("ratio_to_none").max, 0.5);
        assert!((weft_bulk.get("gbit_s").median - 5.2).abs() < 1e-9);
        assert_eq!(
            row(Mode::None, "cross-node-bulk-1")
                .get("ratio_to_none")
                .median,
            1.0
        );
        let ratio = row(Mode::Weft, "cross-node-bulk-8").get("ratio_to_none");
        assert!((ratio.median - 0.5).abs() < 1e-9, "{ratio:?}");
        let weft_echo = row(Mode::Weft, "cross-node-connect-echo");
        assert_eq!(weft_echo.get("ratio_to_none").median, 2.5);
        assert_eq!(weft_echo.get("mean_us").median, 700.0);
        assert_eq!(weft_echo.find("rss_mb"), None);
        assert_eq!(
            row(Mode::Weft, "same-node-connect-echo")
                .get("ratio_to_none")
                .median,
            1.5
        );

        let targets = targets(&rows);
        let target = |scenario: &str| {
            targets
                .iter()
                .find(|t| t.scenario == scenario)
                .unwrap_or_else(|| panic!("no target for {scenario}"))
        };
        assert!(!target("cross-node-bulk-1").met);
        assert!(target("cross-node-bulk-8").met);
        assert!(target("cross-node-connect-echo").met);
        assert!(targets
            .iter()
            .all(|t| t.scenario != "same-node-connect-echo"));

        let options = Options::quick();
        let json = json("abc", "machine", &options, &rows);
        let results = json["results"].as_array().unwrap();
        let weft = results
            .iter()
            .find(|r| r["mode"] == "weft" && r["scenario"] == "cross-node-bulk-1")
            .unwrap();
        assert_eq!(weft["gbit_s"], 5.2);
        assert_eq!(weft["min"]["ratio_to_none"], 0.3);
        assert!(weft.get("p99_us").is_none());
        let weft = results
            .iter()
            .find(|r| r["mode"] == "weft" && r["scenario"] == "cross-node-connect-echo")
            .unwrap();
        for key in ECHO_FIGURES {
            assert!(weft[key].is_number(), "{key}");
        }
        assert_eq!(json["method"]["bulk_bytes"], 256 * MIB);
        assert_eq!(json["method"]["echo_connections"], 1000);

        let md = markdown(&rows, "abc", "machine", &options);
        assert!(md.contains("256 MiB one way"), "{md}");
        assert!(
            md.contains("| scenario | mode | Gbit/s | × no mesh | CPU s / GiB |"),
            "{md}"
        );
        for line in [
            "| cross-node-bulk-1 | weft | 5.20 (2.40–8.00) | 0.40 (0.30–0.50) | 0.50 |",
            "| cross-node-bulk-1 | none | 12.00 (8.00–16.00) | – | – |",
            "| cross-node-connect-echo | weft | 700 (600–800) | 690 |",
            "| cross-node-bulk-1 | bulk throughput at least 0.45× no mesh (ratio) | 0.40 | 0.45 | **no** |",
            "| cross-node-connect-echo | connect + echo at most 2.5× no mesh (ratio of means) | 2.50 | 2.50 | yes |",
        ] {
            assert!(md.contains(line), "{line}\n{md}");
        }
        // No request/response table when no such scenario ran.
        assert!(!md.contains("saturation req/s"), "{md}");
        let svg = chart_svg(&rows, "abc");
        assert!(
            !svg.contains("bulk") && !svg.contains("connect-echo"),
            "{svg}"
        );
    }

    fn idle(mode: Mode, conns: usize, before_kib: u64, held_kib: u64) -> Sample {
        let processes = match mode {
            Mode::None => 0,
            Mode::Weft => 2,
            Mode::Sidecar | Mode::SidecarHaproxy => 3,
        };
        Sample {
            mode,
            scenario: Scenario::new(true, Workload::Idle { conns }),
            measured: Measured::Idle {
                report: HoldReport {
                    phase: "closed".into(),
                    conns,
                    established: conns,
                    failed: 0,
                    first_error: None,
                    open_s: 1.0,
                    held_s: 2.0,
                    closed_early: 0,
                },
                processes,
                before: Rss {
                    total_kib: before_kib,
                    largest_kib: before_kib / 2,
                },
                held: Rss {
                    total_kib: held_kib,
                    largest_kib: held_kib / 2,
                },
            },
        }
    }

    /// Idle connections: KiB per connection from the RSS increase, ratios to the better
    /// sidecar run by run, nothing for `none` but what it is, issue 13's target.
    #[test]
    fn idle_connections_per_connection_and_against_the_best_sidecar() {
        let samples = vec![
            // Run 1: sidecar 10 KiB/conn, HAProxy 20, Weft 1.5.
            idle(Mode::None, 1000, 0, 0),
            idle(Mode::Sidecar, 1000, 30_000, 40_000),
            idle(Mode::SidecarHaproxy, 1000, 20_000, 40_000),
            idle(Mode::Weft, 1000, 20_000, 21_500),
            // Run 2: HAProxy is the better sidecar (8 against 12), Weft 3.6.
            idle(Mode::None, 1000, 0, 0),
            idle(Mode::Sidecar, 1000, 30_000, 42_000),
            idle(Mode::SidecarHaproxy, 1000, 20_000, 28_000),
            idle(Mode::Weft, 1000, 20_000, 23_600),
        ];
        let rows = aggregate(&samples, 2);
        let row = |mode: Mode| rows.iter().find(|r| r.mode == mode).unwrap();
        let weft = row(Mode::Weft);
        assert_eq!(weft.get("kib_per_conn").min, 1.5);
        assert_eq!(weft.get("kib_per_conn").max, 3.6);
        // 1.5 / 10 in run 1, 3.6 / 8 in run 2.
        assert!((weft.get("ratio_to_sidecar").min - 0.15).abs() < 1e-9);
        assert!((weft.get("ratio_to_sidecar").max - 0.45).abs() < 1e-9);
        assert_eq!(weft.get("processes").median, 2.0);
        assert!(row(Mode::None).get("kib_per_conn").median.is_nan());

        let targets = targets(&rows);
        let target = targets
            .iter()
            .find(|t| t.scenario == "cross-node-idle-1000")
            .unwrap();
        assert!(!target.met, "{target:?}");
        assert!((target.bound - 1.953).abs() < 1e-3);

        let options = Options::quick();
        let json = json("abc", "machine", &options, &rows);
        let results = json["results"].as_array().unwrap();
        let of = |mode: &str| {
            results
                .iter()
                .find(|r| r["mode"] == mode && r["scenario"] == "cross-node-idle-1000")
                .unwrap()
        };
        for key in IDLE_FIGURES {
            assert!(of("weft")[key].is_number(), "{key}");
        }
        assert!(of("weft").get("p99_us").is_none());
        assert!(of("none")["kib_per_conn"].is_null());
        assert_eq!(of("none")["processes"], 0.0);
        assert_eq!(of("none")["established"], 1000.0);
        assert_eq!(json["method"]["hold_s"], 2.0);

        let md = markdown(&rows, "abc", "machine", &options);
        for line in [
            "held idle for 2 s",
            "| scenario | mode | connections | mesh RSS before MiB | mesh RSS held MiB | KiB / conn | × best sidecar | largest process MiB |",
            "| cross-node-idle-1000 | none | 1000 of 1000 | no mesh processes | – | – | – | – |",
            "| cross-node-idle-1000 | weft | 1000 of 1000 | 19.5 | 22.0 | 2.55 (1.50–3.60) | 0.30 (0.15–0.45) | 11.0 |",
            "| cross-node-idle-1000 | sidecar-haproxy | 1000 of 1000 | 19.5 | 33.2 | 14.00 (8.00–20.00) | 1.50 (1.00–2.00) | 16.6 |",
            "| cross-node-idle-1000 | idle connection under 2 KB of mesh RSS (KiB per connection) | 2.55 | 1.95 | **no** |",
        ] {
            assert!(md.contains(line), "{line}\n{md}");
        }
        assert!(!md.contains("failed"), "{md}");
    }

    #[test]
    fn sizes() {
        assert_eq!(size(GIB), "1 GiB");
        assert_eq!(size(256 * MIB), "256 MiB");
        assert_eq!(size(1000), "1000 bytes");
    }

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_axis(430.0), (100.0, 500.0));
        assert_eq!(nice_axis(48.0), (10.0, 50.0));
        assert_eq!(nice_axis(2600.0), (1000.0, 3000.0));
    }
}
