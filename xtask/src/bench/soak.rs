//! `cargo xtask bench soak`: the steady mixed load ([`steady`]) at 1000 requests/s for 30
//! minutes, nothing else happening; every 10 s the node proxies' RSS and open files and each
//! stream's p99 over those 10 s, reported as a chart and as slopes (per hour), which a leak
//! would make positive.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::{
    report,
    steady::{self, line_chart, slope, NodeSnapshot, Stream, StreamReport},
};
use crate::{is_root, workspace_root};

/// How a `cargo xtask bench soak` run is shaped.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    pub minutes: f64,
    /// Requests a second over all streams.
    pub rate: u64,
    /// Where the JSON goes (the chart and the Markdown table beside it).
    pub out: PathBuf,
}

impl SoakOptions {
    /// Thirty minutes at 1000 requests/s, into `bench/results/soak.json`.
    pub fn full() -> Self {
        Self {
            minutes: 30.0,
            rate: 1000,
            out: workspace_root().join("bench/results/soak.json"),
        }
    }

    /// Three minutes, into `target/bench/`.
    pub fn quick() -> Self {
        Self {
            minutes: 3.0,
            out: workspace_root().join("target/bench/soak-quick.json"),
            ..Self::full()
        }
    }
}

/// How often the proxies are read, and each stream's intervals.
const SAMPLE_EVERY_S: f64 = 10.0;
const NODES: [&str; 2] = ["node-1", "node-2"];

/// One reading of the node proxies.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds into the window.
    pub t_s: f64,
    pub nodes: Vec<NodeSnapshot>,
}

/// A node proxy over the run.
#[derive(Debug, Serialize)]
pub struct NodeTrend {
    pub node: String,
    pub rss_first_mib: f64,
    pub rss_last_mib: f64,
    pub rss_max_mib: f64,
    /// Least-squares slope of RSS, MB (10^6 bytes) per hour: over the whole run, and over its
    /// second half (after the allocator's arenas and the pools have filled).
    pub rss_mb_per_hour: Option<f64>,
    pub rss_mb_per_hour_second_half: Option<f64>,
    pub fds_first: usize,
    pub fds_last: usize,
    pub fds_max: usize,
    pub fds_per_hour: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct StreamTrend {
    pub name: String,
    pub rate: u64,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// The worst 10 s interval's p99.
    pub worst_p99_us: f64,
    /// Slope of the 10 s p99s, µs per hour.
    pub p99_us_per_hour: Option<f64>,
    pub p99_series: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub commit: String,
    pub machine: String,
    pub minutes: f64,
    pub rate: u64,
    pub nodes: Vec<NodeTrend>,
    pub streams: Vec<StreamTrend>,
    pub samples: Vec<Sample>,
}

/// Runs the soak and writes its JSON, chart and table.
pub fn soak(options: &SoakOptions) -> Result<()> {
    if !is_root() {
        bail!("the soak benchmark builds a virtual cluster and needs root");
    }
    if options.minutes.is_nan() || options.minutes * 60.0 < SAMPLE_EVERY_S {
        bail!("--minutes must cover at least one {SAMPLE_EVERY_S} s sample");
    }
    println!(
        "==> soak: {:.0} minutes of {} requests/s in {} streams, the node proxies read every {} s",
        options.minutes,
        options.rate,
        Stream::mixed(options.rate).len(),
        SAMPLE_EVERY_S
    );
    let (loadgen, cluster) = super::steady_cluster()?;
    let result = run(options, &loadgen);
    let down = cluster.down();
    let report = result?;
    down?;
    write(options, &report)
}

fn run(options: &SoakOptions, loadgen: &Path) -> Result<SoakReport> {
    let seconds = options.minutes * 60.0;
    let streams = Stream::mixed(options.rate);
    let running = streams
        .iter()
        .map(|s| s.start(loadgen, seconds, SAMPLE_EVERY_S))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now() + Duration::from_secs_f64(steady::WARMUP_S);
    let mut samples = Vec::new();
    for i in 0.. {
        let t_s = f64::from(i) * SAMPLE_EVERY_S;
        if t_s > seconds {
            break;
        }
        let due = start + Duration::from_secs_f64(t_s);
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let nodes = NODES
            .iter()
            .map(|n| NodeSnapshot::take(n))
            .collect::<Result<Vec<_>>>()?;
        let line: Vec<String> = nodes
            .iter()
            .map(|n| {
                format!(
                    "{} {:.1} MiB {} files",
                    n.node,
                    n.rss_kib as f64 / 1024.0,
                    n.fds
                )
            })
            .collect();
        println!("{:>6.0} s  {}", t_s, line.join("  "));
        samples.push(Sample { t_s, nodes });
    }
    let reports = running
        .into_iter()
        .map(steady::Running::finish)
        .collect::<Result<Vec<_>>>()?;
    Ok(SoakReport {
        commit: report::commit(),
        machine: report::machine(),
        minutes: options.minutes,
        rate: options.rate,
        nodes: NODES.iter().map(|n| node_trend(n, &samples)).collect(),
        streams: reports.iter().map(|(s, r)| stream_trend(s, r)).collect(),
        samples,
    })
}

fn node_trend(node: &str, samples: &[Sample]) -> NodeTrend {
    let of: Vec<(f64, &NodeSnapshot)> = samples
        .iter()
        .filter_map(|s| Some((s.t_s, s.nodes.iter().find(|n| n.node == node)?)))
        .collect();
    let hours = |t_s: f64| t_s / 3600.0;
    let rss: Vec<(f64, f64)> = of
        .iter()
        .map(|(t, n)| (hours(*t), n.rss_kib as f64 * 1024.0 / 1e6))
        .collect();
    let fds: Vec<(f64, f64)> = of.iter().map(|(t, n)| (hours(*t), n.fds as f64)).collect();
    let mib = |n: &NodeSnapshot| n.rss_kib as f64 / 1024.0;
    NodeTrend {
        node: node.into(),
        rss_first_mib: of.first().map_or(0.0, |(_, n)| mib(n)),
        rss_last_mib: of.last().map_or(0.0, |(_, n)| mib(n)),
        rss_max_mib: of.iter().map(|(_, n)| mib(n)).fold(0.0, f64::max),
        rss_mb_per_hour: slope(&rss),
        rss_mb_per_hour_second_half: slope(&rss[rss.len() / 2..]),
        fds_first: of.first().map_or(0, |(_, n)| n.fds),
        fds_last: of.last().map_or(0, |(_, n)| n.fds),
        fds_max: of.iter().map(|(_, n)| n.fds).max().unwrap_or(0),
        fds_per_hour: slope(&fds),
    }
}

fn stream_trend(stream: &Stream, report: &StreamReport) -> StreamTrend {
    let p99_series: Vec<(f64, f64)> = report
        .intervals
        .iter()
        .filter(|i| i.requests > 0)
        .map(|i| (i.t_s, i.p99_us))
        .collect();
    let per_hour: Vec<(f64, f64)> = p99_series.iter().map(|(t, p)| (t / 3600.0, *p)).collect();
    StreamTrend {
        name: stream.name(),
        rate: stream.rate,
        requests: report.requests,
        errors: report.errors,
        p50_us: report.p50_us,
        p99_us: report.p99_us,
        p999_us: report.p999_us,
        worst_p99_us: p99_series.iter().map(|p| p.1).fold(0.0, f64::max),
        p99_us_per_hour: slope(&per_hour),
        p99_series,
    }
}

fn write(options: &SoakOptions, report: &SoakReport) -> Result<()> {
    if let Some(parent) = options.out.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(&options.out, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", options.out.display()))?;
    let svg = options.out.with_extension("svg");
    fs::write(&svg, chart(report)).with_context(|| format!("writing {}", svg.display()))?;
    let md = options.out.with_extension("md");
    let table = markdown(report);
    fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("\n{table}");
    println!(
        "==> wrote {}, {} and {}",
        options.out.display(),
        svg.display(),
        md.display()
    );
    Ok(())
}

/// Three charts over the run's minutes: RSS and open files of each node proxy, and each
/// stream's p99 per 10 s.
pub fn chart(report: &SoakReport) -> String {
    let minutes = |t_s: f64| t_s / 60.0;
    let per_node = |value: fn(&NodeSnapshot) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        NODES
            .iter()
            .map(|node| {
                let points = report
                    .samples
                    .iter()
                    .filter_map(|s| {
                        let n = s.nodes.iter().find(|n| n.node == *node)?;
                        Some((minutes(s.t_s), value(n)))
                    })
                    .collect();
                ((*node).to_string(), points)
            })
            .collect()
    };
    let p99: Vec<(String, Vec<(f64, f64)>)> = report
        .streams
        .iter()
        .map(|s| {
            let points = s
                .p99_series
                .iter()
                .map(|(t, us)| (minutes(*t), us / 1000.0))
                .collect();
            (s.name.clone(), points)
        })
        .collect();
    let (width, height) = (900.0, 260.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" \
         font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        height * 3.0
    );
    svg.push_str(&line_chart(
        &format!(
            "Node proxy RSS, MiB (soak at {}, {} requests/s)",
            report.commit, report.rate
        ),
        "minutes",
        &per_node(|n| n.rss_kib as f64 / 1024.0),
        (0.0, 0.0, width, height),
    ));
    svg.push_str(&line_chart(
        "Node proxy open files",
        "minutes",
        &per_node(|n| n.fds as f64),
        (0.0, height, width, height),
    ));
    svg.push_str(&line_chart(
        "p99 per 10 s, ms",
        "minutes",
        &p99,
        (0.0, height * 2.0, width, height),
    ));
    svg.push_str("</svg>\n");
    svg
}

pub fn markdown(report: &SoakReport) -> String {
    let per_hour = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "–".to_string(), |v| format!("{v:+.digits$}"))
    };
    let mut md = format!(
        "Soak at `{}` on {}: {:.0} minutes of {} requests/s in {} streams, the node proxies \
         read every {SAMPLE_EVERY_S} s.\n\n\
         | node proxy | RSS MiB first → last (max) | RSS MB/hour | second half, MB/hour | \
         open files first → last (max) | files/hour |\n|---|---|---:|---:|---|---:|\n",
        report.commit,
        report.machine,
        report.minutes,
        report.rate,
        report.streams.len()
    );
    for n in &report.nodes {
        let _ = writeln!(
            md,
            "| {} | {:.1} → {:.1} ({:.1}) | {} | {} | {} → {} ({}) | {} |",
            n.node,
            n.rss_first_mib,
            n.rss_last_mib,
            n.rss_max_mib,
            per_hour(n.rss_mb_per_hour, 2),
            per_hour(n.rss_mb_per_hour_second_half, 2),
            n.fds_first,
            n.fds_last,
            n.fds_max,
            per_hour(n.fds_per_hour, 1)
        );
    }
    md.push_str(
        "\n| stream | req/s | requests | failed | p50 µs | p99 µs | p99.9 µs | worst 10 s p99 µs \
         | p99 µs/hour |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in &report.streams {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            s.name,
            s.rate,
            s.requests,
            s.errors,
            s.p50_us,
            s.p99_us,
            s.p999_us,
            s.worst_p99_us,
            per_hour(s.p99_us_per_hour, 0)
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, rss_kib: u64, fds: usize) -> Sample {
        Sample {
            t_s,
            nodes: NODES
                .iter()
                .map(|n| NodeSnapshot {
                    node: (*n).into(),
                    processes: 1,
                    fds,
                    rss_kib,
                    sockets: 4,
                    conntrack: Some(10),
                })
                .collect(),
        }
    }

    #[test]
    fn a_growing_proxy_shows_a_positive_slope() {
        // 1 MiB more every 10 minutes: 6 MiB (6.29 MB) an hour.
        let samples: Vec<Sample> = (0..=6_u32)
            .map(|i| sample(f64::from(i) * 600.0, 20_480 + 1024 * u64::from(i), 40))
            .collect();
        let trend = node_trend("node-2", &samples);
        let slope = trend.rss_mb_per_hour.unwrap();
        assert!((slope - 6.291_456).abs() < 1e-6, "{slope}");
        assert_eq!(trend.fds_per_hour, Some(0.0));
        assert_eq!((trend.rss_first_mib, trend.rss_last_mib), (20.0, 26.0));
        let report = SoakReport {
            commit: "abc".into(),
            machine: "test".into(),
            minutes: 60.0,
            rate: 1000,
            nodes: vec![trend],
            streams: Vec::new(),
            samples,
        };
        assert!(markdown(&report)
            .contains("| node-2 | 20.0 → 26.0 (26.0) | +6.29 | +6.29 | 40 → 40 (40) | +0.0 |"));
        let svg = chart(&report);
        assert_eq!(svg.matches("<polyline").count(), 4);
    }
}
