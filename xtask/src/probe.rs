//! Looking at a running virtual cluster from outside: node proxies' metrics, pod addresses and
//! requests made from inside pods. Shared by the demo and the end-to-end tests.

use std::collections::BTreeMap;

use anyhow::{anyhow, ensure, Context as _, Result};

use crate::cluster;

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Runs `cmd` in `target` and returns its stdout, failing with its stderr on a non-zero exit.
pub fn run(target: &str, cmd: &[&str]) -> Result<String> {
    let out = cluster::exec(target, &args(cmd))?;
    ensure!(
        out.status.success(),
        "{target}: `{}` failed: {}{}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prometheus text of a node proxy.
pub fn metrics(node: &str) -> Result<String> {
    run(
        &format!("node/{node}"),
        &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
    )
    .with_context(|| format!("reading node {node}'s metrics"))
}

/// Sum of the samples of metric `name` whose labels include every `label="value"` of `labels`.
pub fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // An empty f64 sum is -0.0; report a plain zero.
        .sum::<f64>()
        + 0.0
}

/// The node's `weft_ebpf_<name>_total` counters by `<name>`.
pub fn ebpf_counters(node: &str) -> Result<BTreeMap<String, f64>> {
    Ok(parse_ebpf_counters(&metrics(node)?))
}

fn parse_ebpf_counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.strip_prefix("weft_ebpf_")?.rsplit_once(' ')?;
            Some((
                name.trim_end_matches("_total").to_owned(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// `after[name] - before[name]`, missing counters counting as zero.
pub fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, name: &str) -> f64 {
    after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
}

/// The IPv4 address of a pod's `eth0`.
pub fn pod_ip(pod: &str) -> Result<String> {
    let text = run(pod, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{pod}: no IPv4 address on eth0: {text}"))
}

/// The address a name resolves to inside `pod` (its hosts file: cluster DNS).
pub fn resolve(pod: &str, name: &str) -> Result<String> {
    run(pod, &["getent", "hosts", name])?
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{name} does not resolve in {pod}"))
}

/// `curl` from inside `pod`; returns the HTTP status and the body parsed as JSON (or a string).
pub fn curl(pod: &str, url: &str, headers: &[(&str, &str)]) -> Result<(u16, serde_json::Value)> {
    let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let mut args = Vec::new();
    for h in &headers {
        args.extend(["-H", h.as_str()]);
    }
    args.push(url);
    let (status, body) = curl_text(pod, &args)?;
    let body = serde_json::from_str(&body).unwrap_or_else(|_| body.into());
    Ok((status, body))
}

/// `curl` from inside `pod` with `args` (options, then the URL), for one transfer of at most
/// 5 s; returns the HTTP status (0: no response) and the body.
pub fn curl_text(pod: &str, args: &[&str]) -> Result<(u16, String)> {
    let mut cmd = vec!["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}"];
    cmd.extend_from_slice(args);
    // curl exits non-zero for a transfer that got no response: that is a status 0 here.
    let out = cluster::exec(pod, &self::args(&cmd))?;
    let out = String::from_utf8_lossy(&out.stdout);
    let what = args.join(" ");
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    let status = code
        .trim()
        .parse()
        .with_context(|| format!("{pod}: curl {what}: bad status {code:?} in {out:?}"))?;
    Ok((status, body.to_owned()))
}

/// One HTTP exchange as curl saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// 0 when curl got no response (connection failed, timed out).
    pub status: u16,
    /// Response headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, or the text as a JSON string.
    pub body: serde_json::Value,
    /// Seconds from start to the end of the transfer.
    pub seconds: f64,
    /// New connections curl opened for this transfer (0 when it reused one).
    pub connects: u32,
}

impl Reply {
    /// The first value of response header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A string field of the JSON body (`""` when absent), e.g. `version`, `pod`.
    pub fn field(&self, name: &str) -> &str {
        self.body[name].as_str().unwrap_or_default()
    }
}

/// Separates the transfers of one curl run on stdout: `-w` writes it after each body.
const CURL_MARK: &str = "@@weft-curl@@";

/// Runs curl in `pod` with `args` (URLs, `-H`, `-X`, ...) and returns one [`Reply`] per
/// transfer. Sequential transfers of one run (several URLs, or a `[1-N]` glob) reuse one
/// keep-alive connection, so this is also a fast load generator. Failed transfers are
/// replies with status 0, not errors; the run is stopped after 5 minutes.
pub fn curl_replies(pod: &str, args: &[&str]) -> Result<Vec<Reply>> {
    let write_out = format!("\n{CURL_MARK} %{{http_code}} %{{time_total}} %{{num_connects}}\n");
    // A bound on the whole run, whatever the per-transfer limits in `args`: a proxy that
    // hangs must fail the caller, not stall it.
    let mut cmd = vec![
        "timeout",
        "300",
        "curl",
        "-s",
        "-D",
        "-",
        "-w",
        write_out.as_str(),
    ];
    cmd.extend_from_slice(args);
    let out = cluster::exec(pod, &self::args(&cmd))?;
    let replies = parse_curl(&String::from_utf8_lossy(&out.stdout));
    ensure!(
        !replies.is_empty(),
        "{pod}: `{}` printed no transfer: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(replies)
}

fn parse_curl(stdout: &str) -> Vec<Reply> {
    let mut replies = Vec::new();
    let mut rest = stdout;
    while let Some(at) = rest.find(CURL_MARK) {
        let (transfer, after) = rest.split_at(at);
        let (stats, next) = after[CURL_MARK.len()..]
            .split_once('\n')
            .unwrap_or((&after[CURL_MARK.len()..], ""));
        rest = next;
        let mut stats = stats.split_whitespace();
        let status = stats.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let seconds = stats.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
        let connects = stats.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        // `-D -` puts each header block (1xx ones too) before the body; the last is the
        // response's.
        let mut body = transfer.strip_suffix('\n').unwrap_or(transfer);
        let mut headers = Vec::new();
        while body.starts_with("HTTP/") {
            let (block, after) = body.split_once("\r\n\r\n").unwrap_or((body, ""));
            headers = block
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            body = after;
        }
        let body = serde_json::from_str(body).unwrap_or_else(|_| body.into());
        replies.push(Reply {
            status,
            headers,
            body,
            seconds,
            connects,
        });
    }
    replies
}

/// How many items fall under each key, e.g. replies by version or by status.
pub fn tally<T, K: Ord>(items: &[T], key: impl Fn(&T) -> K) -> BTreeMap<K, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(key(item)).or_default() += 1;
    }
    counts
}

/// What h2load reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct H2Load {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// Responses by status class: 2xx, 3xx, 4xx, 5xx.
    pub classes: [u64; 4],
}

/// Runs `h2load` (nghttp2) in `pod` with `args`, e.g. `-n 2000 -c 4 -m 10 http://svc:81/`
/// (h2c with prior knowledge) or `--h1 ...` (HTTP/1.1).
pub fn h2load(pod: &str, args: &[&str]) -> Result<H2Load> {
    // h2load waits forever for a stream a proxy never answers.
    let mut cmd = vec!["timeout", "300", "h2load"];
    cmd.extend_from_slice(args);
    let text = run(pod, &cmd)?;
    parse_h2load(&text).with_context(|| format!("{pod}: unexpected h2load output:\n{text}"))
}

fn parse_h2load(text: &str) -> Result<H2Load> {
    // "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, 0 timeout"
    // "status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx"
    let numbers = |prefix: &str| -> Result<BTreeMap<String, u64>> {
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .ok_or_else(|| anyhow!("no `{prefix}` line"))?;
        line.split(',')
            .map(|item| {
                let (n, what) = item
                    .trim()
                    .split_once(' ')
                    .ok_or_else(|| anyhow!("bad item {item:?}"))?;
                Ok((what.to_owned(), n.parse()?))
            })
            .collect()
    };
    let requests = numbers("requests:")?;
    let codes = numbers("status codes:")?;
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    Ok(H2Load {
        total: get(&requests, "total"),
        succeeded: get(&requests, "succeeded"),
        failed: get(&requests, "failed"),
        errored: get(&requests, "errored"),
        timeout: get(&requests, "timeout"),
        classes: [
            get(&codes, "2xx"),
            get(&codes, "3xx"),
            get(&codes, "4xx"),
            get(&codes, "5xx"),
        ],
    })
}

/// One gRPC call as the grpcio client saw it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct GrpcReply {
    /// The status code's name: `OK`, `UNAVAILABLE`...
    pub code: String,
    #[serde(default)]
    pub reply: String,
    #[serde(default)]
    pub details: String,
}

/// `count` unary calls of `weft.demo.Echo/<method>` from inside `pod` with grpcio (the
/// Python client `cargo xtask setup` installs), over one channel, with `metadata`.
pub fn grpc_calls(
    pod: &str,
    target: &str,
    method: &str,
    count: u32,
    metadata: &[(&str, &str)],
) -> Result<Vec<GrpcReply>> {
    let python = crate::setup::test_python();
    let script = crate::workspace_root().join("xtask/assets/grpc_client.py");
    let (python, script, count) = (
        python.display().to_string(),
        script.display().to_string(),
        count.to_string(),
    );
    let metadata: Vec<String> = metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut cmd = vec![python.as_str(), script.as_str(), target, method];
    cmd.extend(["--count", count.as_str()]);
    for m in &metadata {
        cmd.extend(["--metadata", m.as_str()]);
    }
    run(pod, &cmd)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("grpc client printed {l:?}")))
        .collect()
}

/// What a virtual cluster can leave on the machine (namespaces, cgroups, pins, run
/// files), for the end-to-end suites' last check after `cluster down`.
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name == "weft-fabric" || name.starts_with("wn-") || name.starts_with("wp-") {
                left.push(format!("netns {name}"));
            }
        }
    }
    for path in [cluster::CGROUP_ROOT, cluster::BPFFS_ROOT, cluster::RUN_DIR] {
        if std::path::Path::new(path).exists() {
            left.push(path.to_owned());
        }
    }
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("wp-") || name.starts_with("wn-") {
            left.push(format!("/etc/netns/{name}"));
        }
    }
    left
}

/// An OTLP collector for the virtual cluster: namespace `observability` (outside the mesh), a
/// pod on `node` running `xtask/assets/observability/otlp_receiver.py` (grpcio and
/// `opentelemetry-proto` from the test Python of `cargo xtask setup`) that writes what it
/// receives to its log, and the Service `otel-collector.observability:4317`.
pub fn otlp_collector_yaml(node: &str) -> String {
    let python = crate::setup::test_python().display().to_string();
    let receiver = crate::workspace_root()
        .join("xtask/assets/observability/otlp_receiver.py")
        .display()
        .to_string();
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: observability}}
---
apiVersion: v1
kind: Pod
metadata: {{name: otel-collector, namespace: observability, labels: {{app: otel-collector}}}}
spec:
  nodeName: {node}
  containers: [{{name: main, command: ["{python}", "{receiver}", "4317", /dev/stdout], ports: [{{containerPort: 4317}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: otel-collector, namespace: observability}}
spec:
  selector: {{app: otel-collector}}
  ports: [{{name: grpc-otlp, port: 4317}}]
"#
    )
}

/// Until the collector of [`otlp_collector_yaml`] serves.
pub fn wait_for_collector() -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let log = cluster::log_path("observability/otel-collector")?;
    while !std::fs::read_to_string(&log)?.contains("listening") {
        ensure!(
            std::time::Instant::now() < deadline,
            "the OTLP collector did not start: {}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}

/// One span as the collector of [`otlp_collector_yaml`] received it.
#[derive(Debug, Clone)]
pub struct OtlpSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent: String,
    pub kind: String,
    pub name: String,
    /// `service.name`: the workload the span speaks for (`canonical-service.namespace`).
    pub service: String,
    pub attributes: serde_json::Value,
}

impl OtlpSpan {
    /// An attribute as text (numbers printed); empty when absent.
    pub fn attribute(&self, key: &str) -> String {
        match &self.attributes[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        }
    }

    /// A source proxy's span (else a destination proxy's).
    pub fn client(&self) -> bool {
        self.kind == "SPAN_KIND_CLIENT"
    }
}

/// Every span the collector received so far.
pub fn otlp_spans() -> Result<Vec<OtlpSpan>> {
    let log = std::fs::read_to_string(cluster::log_path("observability/otel-collector")?)?;
    let mut spans = Vec::new();
    for line in log.lines().filter(|l| l.starts_with("{\"trace_id\"")) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("span {line:?}"))?;
        let text = |key: &str| v[key].as_str().unwrap_or_default().to_owned();
        spans.push(OtlpSpan {
            trace_id: text("trace_id"),
            span_id: text("span_id"),
            parent: text("parent_span_id"),
            kind: text("kind"),
            name: text("name"),
            service: text("service"),
            attributes: v["attributes"].clone(),
        });
    }
    Ok(spans)
}

/// The spans of one trace as a tree, one line per span, children indented under their parent.
pub fn trace_tree(spans: &[OtlpSpan]) -> Vec<String> {
    fn walk(spans: &[OtlpSpan], span: &OtlpSpan, depth: usize, out: &mut Vec<String>) {
        out.push(format!(
            "{}{} {} {} {} ({})",
            "  ".repeat(depth),
            if span.client() { "client" } else { "server" },
            span.service,
            span.name,
            span.attribute("http.status_code"),
            span.attribute("node_id"),
        ));
        for child in spans.iter().filter(|s| s.parent == span.span_id) {
            walk(spans, child, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for root in spans.iter().filter(|s| !ids.contains(&s.parent.as_str())) {
        walk(spans, root, 0, &mut out);
    }
    out
}

/// Merges the resources of `yaml` into the running cluster (`cluster apply`).
pub fn apply_yaml(yaml: &str) -> Result<()> {
    through_file(yaml, cluster::apply)
}

/// Removes the resources named in `yaml` from the running cluster (`cluster delete`).
pub fn delete_yaml(yaml: &str) -> Result<()> {
    through_file(yaml, cluster::delete)
}

/// Writes `yaml` to a file of a fresh temporary directory for `how`, then removes it.
fn through_file(yaml: &str, how: fn(&std::path::Path) -> Result<()>) -> Result<()> {
    let dir = temp_dir("change")?;
    let path = dir.join("change.yaml");
    let result = std::fs::write(&path, yaml)
        .map_err(Into::into)
        .and_then(|()| how(&path));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A fresh directory under the system's temporary directory, named after `what`.
pub fn temp_dir(what: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "weft-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Brings up a cluster of the resources in `yaml` (an earlier cluster is removed first).
pub fn up_with(yaml: &str) -> Result<()> {
    cluster::down().context("cleaning up an earlier cluster")?;
    let dir = temp_dir("suite")?;
    std::fs::write(dir.join("cluster.yaml"), yaml)?;
    let result = cluster::up(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// One end-to-end case: a name and what it checks.
pub type Case = (&'static str, fn() -> Result<()>);

/// Runs an end-to-end suite the way both suites do: `up` brings the cluster up, the cases run
/// in order (a first non-flag argument filters them by name), each printed ok/FAILED with its
/// time; the cluster is torn down whatever happened, then nothing may be left behind. Exits
/// the process with the outcome, as a `harness = false` test does.
pub fn run_suite(suite: &str, up: impl FnOnce() -> Result<()>, cases: &[Case]) -> ! {
    if !crate::is_root() {
        eprintln!("{suite}: these tests need root (network namespaces, cgroups, eBPF); run `sudo cargo xtask test`");
        println!("{suite}: 0 passed, 1 failed");
        std::process::exit(1);
    }
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let (mut passed, mut failed) = (0, 0);
    match up() {
        Err(e) => {
            println!("test cluster_up ... FAILED\n    {e:#}");
            failed += 1;
        }
        Ok(()) => {
            for (name, case) in cases {
                if filter.as_deref().is_some_and(|f| !name.contains(f)) {
                    continue;
                }
                let start = std::time::Instant::now();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")));
                match result {
                    Ok(()) => {
                        println!("test {name} ... ok ({:.1?})", start.elapsed());
                        passed += 1;
                    }
                    Err(e) => {
                        println!("test {name} ... FAILED\n    {e:#}");
                        failed += 1;
                    }
                }
            }
        }
    }
    if failed > 0 {
        if let Ok(status) = cluster::status() {
            println!("{status}");
        }
    }
    if let Err(e) = cluster::down() {
        println!("cluster down failed: {e:#}");
    }
    let left = leftovers();
    if left.is_empty() {
        println!("test nothing_left_behind ... ok");
        passed += 1;
    } else {
        println!("test nothing_left_behind ... FAILED\n    left: {left:?}");
        failed += 1;
    }
    println!("{suite}: {passed} passed, {failed} failed");
    std::process::exit(i32::from(failed > 0));
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP istio_tcp_connections_opened_total x
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",destination_service="a"} 3
istio_tcp_connections_opened_total{reporter="destination",destination_service="a"} 2
istio_tcp_connections_opened_total_extra{reporter="source"} 100
weft_ebpf_captured_total 7
weft_ebpf_fast_path_bytes_total 1024
"#;

    #[test]
    fn sums_matching_samples_only() {
        let m = "istio_tcp_connections_opened_total";
        assert_eq!(sample_sum(TEXT, m, &[]), 5.0);
        assert_eq!(sample_sum(TEXT, m, &[("reporter", "source")]), 3.0);
        assert_eq!(sample_sum(TEXT, m, &[("reporter", "x")]), 0.0);
    }

    #[test]
    fn reads_ebpf_counters() {
        let c = parse_ebpf_counters(TEXT);
        assert_eq!(c.get("captured"), Some(&7.0));
        assert_eq!(c.get("fast_path_bytes"), Some(&1024.0));
        assert_eq!(delta(&BTreeMap::new(), &c, "captured"), 7.0);
    }
    #[test]
    fn parses_curl_transfers_with_headers_and_bodies() {
        let out = "HTTP/1.1 200 OK\r\nX-Weft-Version: v1\r\ncontent-type: application/json\r\n\r\n\
                   {\"version\":\"v1\"}\n\n@@weft-curl@@ 200 0.002 1\n\
                   HTTP/1.1 301 Moved Permanently\r\nlocation: http://echo/new\r\n\r\n\n@@weft-curl@@ 301 0.001 0\n\
                   \n@@weft-curl@@ 000 3.000 0\n";
        let replies = parse_curl(out);
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0].status, 200);
        assert_eq!(replies[0].field("version"), "v1");
        assert_eq!(replies[0].header("x-weft-version"), Some("v1"));
        assert_eq!(replies[0].connects, 1);
        assert_eq!(replies[1].header("location"), Some("http://echo/new"));
        assert_eq!((replies[2].status, replies[2].seconds), (0, 3.0));
        assert_eq!(tally(&replies, |r| r.status)[&200], 1);
    }

    #[test]
    fn parses_h2load_summary() {
        let text = "finished in 1.2s, 1000 req/s\n\
                    requests: 2000 total, 2000 started, 2000 done, 1990 succeeded, 10 failed, 10 errored, 0 timeout\n\
                    status codes: 1990 2xx, 0 3xx, 0 4xx, 10 5xx\n";
        let report = parse_h2load(text).expect("parses");
        assert_eq!(report.total, 2000);
        assert_eq!(
            (report.succeeded, report.failed, report.errored),
            (1990, 10, 10)
        );
        assert_eq!(report.classes, [1990, 0, 0, 10]);
        assert!(parse_h2load("nothing").is_err());
    }
}
