//! The steady mixed load of `cargo xtask bench chaos` and `soak`, and what both read off the
//! mesh while it runs.
//!
//! The load: from the client pod on node-1, HTTP/1.1, gRPC and raw TCP at a fixed rate over
//! keep-alive connections to the server on node-1 (same node) and on node-2 (across nodes),
//! and HTTP with a new connection per request both ways: eight `weft-loadgen run` streams,
//! each cutting its window into intervals so that failures and latency can be lined up with
//! what happened meanwhile.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{Mode, Protocol, RESPONSE_BYTES};
use crate::cluster;

/// The client pod of the load (on node-1).
pub const CLIENT: &str = "bench-weft/client";
/// Connections of each stream.
const CONNS: usize = 2;
/// Seconds of load before a stream's window opens.
pub const WARMUP_S: f64 = 5.0;

/// One `weft-loadgen run` of the mixed load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    pub cross_node: bool,
    pub protocol: Protocol,
    /// A new connection per request instead of keep-alive.
    pub new_conn: bool,
    pub rate: u64,
}

impl Stream {
    /// The eight streams sharing `total` requests a second (the remainder goes to the first).
    pub fn mixed(total: u64) -> Vec<Stream> {
        let mut streams = Vec::new();
        for cross_node in [false, true] {
            for protocol in [Protocol::Http, Protocol::Grpc, Protocol::Tcp] {
                streams.push((cross_node, protocol, false));
            }
            streams.push((cross_node, Protocol::Http, true));
        }
        let each = total / streams.len() as u64;
        let extra = total - each * streams.len() as u64;
        streams
            .into_iter()
            .enumerate()
            .map(|(i, (cross_node, protocol, new_conn))| Stream {
                cross_node,
                protocol,
                new_conn,
                rate: each + if i == 0 { extra } else { 0 },
            })
            .collect()
    }

    /// `same-node-http`, `cross-node-http-new-conn`, ...
    pub fn name(&self) -> String {
        format!(
            "{}-{}{}",
            if self.cross_node {
                "cross-node"
            } else {
                "same-node"
            },
            self.protocol.name(),
            if self.new_conn { "-new-conn" } else { "" }
        )
    }

    fn addr(&self) -> Result<String> {
        let service = if self.cross_node { "remote" } else { "local" };
        let vip = cluster::cluster_ip(&format!("{}/{service}", Mode::Weft.namespace()))?;
        Ok(format!("{vip}:{}", self.protocol.port()))
    }

    /// Starts the stream in the client pod for `seconds` (after [`WARMUP_S`]), cut into
    /// intervals of `interval_s`.
    pub fn start(&self, loadgen: &Path, seconds: f64, interval_s: f64) -> Result<Running> {
        let mut argv: Vec<String> = [
            loadgen.display().to_string(),
            "run".into(),
            self.addr()?,
            "--protocol".into(),
            self.protocol.name().into(),
            "--rate".into(),
            self.rate.to_string(),
            "--conns".into(),
            CONNS.to_string(),
            "--duration-s".into(),
            seconds.to_string(),
            "--warmup-s".into(),
            WARMUP_S.to_string(),
            "--response-bytes".into(),
            RESPONSE_BYTES.to_string(),
            "--interval-s".into(),
            interval_s.to_string(),
        ]
        .into();
        if self.new_conn {
            argv.push("--new-conn".into());
        }
        let child = cluster::command(CLIENT, &argv)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the load generator for {}", self.name()))?;
        Ok(Running {
            stream: self.clone(),
            child: Some(child),
        })
    }
}

/// A stream's load generator while it runs.
pub struct Running {
    stream: Stream,
    /// Taken by [`Running::finish`]; killed on drop otherwise.
    child: Option<Child>,
}

impl Running {
    /// Waits for the stream's end and reads its report.
    pub fn finish(mut self) -> Result<(Stream, StreamReport)> {
        let name = self.stream.name();
        let child = self
            .child
            .take()
            .context("the load generator was waited for")?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for the load generator of {name}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A stream that had no request answered exits non-zero after its report: the report
        // is what counts.
        let report = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| {
                format!(
                    "the load generator of {name} printed no report ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
        let report: StreamReport = serde_json::from_str(report)
            .with_context(|| format!("the load generator of {name} printed {report:?}"))?;
        Ok((self.stream.clone(), report))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only when the run fails half-way: `finish` has taken the child otherwise.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a stream's `weft-loadgen run --interval-s` reports (the fields read here).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct StreamReport {
    pub requests: u64,
    pub errors: u64,
    #[serde(default)]
    pub first_error: Option<String>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub window_start_unix_ms: u64,
    pub intervals: Vec<Interval>,
}

/// One interval of a stream's window.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Interval {
    pub t_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub p99_us: f64,
    #[serde(default)]
    pub first_error: Option<String>,
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// What the mesh holds on one node at one moment: the resources a leak would grow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeSnapshot {
    pub node: String,
    /// mesh-node processes (one, unless a predecessor failed to exit).
    pub processes: usize,
    /// Their open file descriptors.
    pub fds: usize,
    /// Their resident memory.
    pub rss_kib: u64,
    /// Established TCP sockets in the node's network namespace (the node proxy's).
    pub sockets: usize,
    /// Connection-tracking entries of the node's network namespace (`None`: the kernel keeps
    /// no table there).
    pub conntrack: Option<usize>,
}

impl NodeSnapshot {
    pub fn take(node: &str) -> Result<Self> {
        let pids = cluster::pids(&format!("node/{node}"))?;
        let fds = pids
            .iter()
            .filter_map(|pid| fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map(Iterator::count)
            .sum();
        let rss_kib = pids.iter().filter_map(|pid| super::rss_kib(*pid)).sum();
        let target = format!("node/{node}");
        let run = |argv: &[&str]| -> Result<String> {
            let argv: Vec<String> = argv.iter().map(|a| (*a).to_string()).collect();
            let out = cluster::exec(&target, &argv)?;
            if !out.status.success() {
                bail!(
                    "{argv:?} in {target}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let sockets = run(&["ss", "-Htn", "state", "established"])?
            .lines()
            .count();
        let conntrack = run(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
            .ok()
            .and_then(|count| count.trim().parse().ok());
        Ok(Self {
            node: node.into(),
            processes: pids.len(),
            fds,
            rss_kib,
            sockets,
            conntrack,
        })
    }
}

/// The pinned eBPF objects of the cluster's nodes (maps, links, programs).
pub fn pins() -> usize {
    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => count(&e.path()),
                    _ => 1,
                })
                .sum()
        })
    }
    count(Path::new(cluster::BPFFS_ROOT))
}

/// tcpdump writing what matches a filter to a file, from inside a pod or a network
/// namespace; stopped (and counted) by [`Capture::packets`], stopped on drop.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

/// How long tcpdump may take to start listening.
const CAPTURE_START: Duration = Duration::from_secs(10);

impl Capture {
    /// Starts `tcpdump -i any` with `filter`, run by `command` (which places it), into
    /// `file`.
    pub fn start(mut command: Command, file: PathBuf, filter: &str) -> Result<Self> {
        // `--immediate-mode` and `-U`: packets reach the file as they come.
        command
            .args([
                "-i",
                "any",
                "-nn",
                "--immediate-mode",
                "-U",
                "-s",
                "128",
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .context("starting tcpdump (cargo xtask setup installs it)")?;
        let stderr = child.stderr.take().context("tcpdump's stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut capture = Self { child, file };
        let deadline = Instant::now() + CAPTURE_START;
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(line) => said.push(line),
                Err(_) => {
                    capture.stop();
                    bail!("tcpdump did not start listening: {}", said.join("; "));
                }
            }
        }
    }

    /// The same capture, from a node's network namespace (`ip netns exec NS tcpdump`).
    pub fn in_netns(netns: &str, file: PathBuf, filter: &str) -> Result<Self> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns, "tcpdump"]);
        Self::start(command, file, filter)
    }

    /// The same capture, from inside a pod (its network namespace and cgroup).
    pub fn in_pod(pod: &str, file: PathBuf, filter: &str) -> Result<Self> {
        Self::start(
            cluster::command(pod, &["tcpdump".to_string()])?,
            file,
            filter,
        )
    }

    /// Stops the capture and counts the packets it wrote.
    pub fn packets(mut self) -> Result<usize> {
        self.stop();
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .context("reading a capture back with tcpdump")?;
        if !out.status.success() {
            bail!(
                "tcpdump -r {}: {}",
                self.file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    fn stop(&mut self) {
        // SIGINT: tcpdump flushes its file and exits.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A line chart of `series` (name, (x, y) points) as an SVG fragment of `width` × `height` at
/// (`left`, `top`), its y axis from 0 to the largest y.
pub fn line_chart(
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    (left, top, width, height): (f64, f64, f64, f64),
) -> String {
    const COLOURS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points
        .clone()
        .map(|p| p.0)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let y_max = points.map(|p| p.1).fold(0.0_f64, f64::max).max(1e-9) * 1.1;
    let (plot_left, plot_top) = (left + 60.0, top + 24.0);
    let (plot_w, plot_h) = (width - 80.0, height - 60.0);
    let x = |v: f64| plot_left + v / x_max * plot_w;
    let y = |v: f64| plot_top + plot_h - v / y_max * plot_h;
    let mut svg = format!(
        "<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>\n\
         <rect x=\"{plot_left}\" y=\"{plot_top}\" width=\"{plot_w}\" height=\"{plot_h}\" \
         fill=\"none\" stroke=\"#999\"/>\n",
        top + 14.0,
        escape(title)
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>\n",
            plot_left - 4.0,
            y(v) + 3.0,
            short(v)
        ));
        let t = x_max * f64::from(i) / 4.0;
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\n",
            x(t),
            plot_top + plot_h + 14.0,
            short(t)
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\n",
        plot_left + plot_w / 2.0,
        plot_top + plot_h + 28.0,
        escape(x_label)
    ));
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"{colour}\">{}</text>\n",
            path.join(" "),
            plot_left + 6.0 + (i % 4) as f64 * plot_w / 4.0,
            plot_top + 12.0 + (i / 4) as f64 * 12.0,
            escape(name)
        ));
    }
    svg
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The least-squares slope of `points` (x, y), y per unit of x; `None` with fewer than two
/// distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if points.len() < 2 || sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    Some(sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixed_load_shares_the_rate() {
        let streams = Stream::mixed(1000);
        let names: Vec<String> = streams.iter().map(Stream::name).collect();
        assert_eq!(
            names,
            [
                "same-node-http",
                "same-node-grpc",
                "same-node-tcp",
                "same-node-http-new-conn",
                "cross-node-http",
                "cross-node-grpc",
                "cross-node-tcp",
                "cross-node-http-new-conn",
            ]
        );
        assert_eq!(streams.iter().map(|s| s.rate).sum::<u64>(), 1000);
        assert_eq!(streams[0].rate, 125);
        assert_eq!(Stream::mixed(403)[0].rate, 53);
    }

    #[test]
    fn slopes() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some(2.0));
        assert_eq!(slope(&[(0.0, 4.0), (1.0, 4.0)]), Some(0.0));
        assert_eq!(slope(&[(1.0, 4.0)]), None);
        assert_eq!(slope(&[(1.0, 4.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn a_chart_draws_every_series() {
        let svg = line_chart(
            "RSS <MiB>",
            "minutes",
            &[
                ("node-1".into(), vec![(0.0, 10.0), (1.0, 12.0)]),
                ("node-2".into(), vec![(0.0, 11.0), (1.0, 11.5)]),
            ],
            (0.0, 0.0, 600.0, 200.0),
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("RSS &lt;MiB&gt;"));
        assert!(svg.contains(">node-2</text>"));
    }
}
