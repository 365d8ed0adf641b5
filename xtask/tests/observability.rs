//! End-to-end tests of what Weft shows: traces and access logs, `meshctl` against the running
//! node proxies, and Istio's Grafana dashboards (Mesh, Service, Workload) and Kiali's service
//! graph, unchanged, on the metrics of the node proxies.
//!
//! A real Prometheus (Debian's `prometheus`) scrapes both node proxies of a virtual cluster
//! running Bookinfo while a meshed client of another namespace, an unmeshed client and the
//! pods themselves make HTTP, gRPC and TCP calls (meshed and not, to a Service without
//! endpoints, to a Service outside the mesh). Then every panel query of the three dashboards
//! and every graph query of Kiali (`xtask/assets/observability/istio-queries.json`, quoted from
//! the upstream commits it names) is evaluated as Grafana and Kiali send it, for the views a
//! user would open (`dashboards.py` fills the variables in as Grafana does). Each query must
//! answer with plausible values for at least one view, or be one of [`EXPECTED_EMPTY`], each
//! with the reason it cannot have data; every series Kiali's graph reads must carry the labels
//! without which Kiali drops it. Needs root: without it the suite fails loudly.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use xtask::{
    cluster,
    probe::{self, OtlpSpan},
    workspace_root,
};

/// Bookinfo (`examples/bookinfo/bookinfo.yaml`) is added in front of this.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: traffic, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: traffic, labels: {app: client}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-client, namespace: legacy, labels: {app: legacy-client}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-http, namespace: legacy, labels: {app: legacy-http}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, http, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy-http, namespace: legacy}
spec:
  selector: {app: legacy-http}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-echo, namespace: legacy, labels: {app: legacy-echo}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, echo, --port, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy-echo, namespace: legacy}
spec:
  selector: {app: legacy-echo}
  ports: [{name: tcp, port: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: grpc-echo, namespace: default, labels: {app: grpc-echo, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: grpc-echo
  containers: [{name: main, command: [weft-demo, http, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-echo, namespace: default}
spec:
  selector: {app: grpc-echo}
  ports: [{name: grpc, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo, namespace: default, labels: {app: tcp-echo, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: tcp-echo
  containers: [{name: main, command: [weft-demo, echo, --port, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: default}
spec:
  selector: {app: tcp-echo}
  ports: [{name: tcp, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: nowhere, namespace: default}
spec:
  selector: {app: nowhere}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: tracer, namespace: traffic, labels: {app: tracer}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]

---
# Istio's way to trace: a provider in MeshConfig, chosen by the mesh's Telemetry. The mesh
# starts no trace (0 %) but continues those its callers sampled; the tracer pod's requests are
# all traced (its own Telemetry).
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: otel
      opentelemetry: {service: otel-collector.observability.svc.cluster.local, port: 4317}
    - name: otel-als
      envoyOtelAls:
        service: observability/otel-collector.observability.svc.cluster.local
        port: 4317
        logFormat:
          labels:
            method: "%REQ(:METHOD)%"
            path: "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
            code: "%RESPONSE_CODE%"
            user: "%REQ(END-USER)%"
            upstream: "%UPSTREAM_CLUSTER%"
            received: "%BYTES_RECEIVED%"
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 0
    customTags:
      cluster: {literal: {value: virtual}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: tracer, namespace: traffic}
spec:
  selector: {matchLabels: {app: tracer}}
  tracing:
  - randomSamplingPercentage: 100
  # Its own calls, in Istio's default text format on its node proxy's output.
  accessLogging:
  - match: {mode: CLIENT}
    providers: [{name: envoy}]
---
# Access logs as Istio's Telemetry API turns them on: Bookinfo's namespace logs over OTLP,
# except details, whose workload Telemetry turns them off.
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: logs, namespace: default}
spec:
  accessLogging:
  - providers: [{name: otel-als}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: details-quiet, namespace: default}
spec:
  selector: {matchLabels: {app: details}}
  accessLogging:
  - disabled: true
"#;

/// Where Prometheus listens, inside the cluster's fabric namespace (where the nodes' admin
/// ports are reachable).
const PROMETHEUS: &str = "127.0.0.1:19090";
const SCRAPE_INTERVAL: Duration = Duration::from_secs(5);

/// Queries that cannot have data on this cluster, and why. Anything else must answer.
const EXPECTED_EMPTY: &[(&str, &str)] = &[
    (
        "kiali: namespace graph, gRPC messages, 0) incoming unserviced (source-reported)",
        "a gRPC call to a Service without endpoints is answered by the source proxy: no message \
         is ever sent on, in Istio either",
    ),
    (
        "kiali: namespace graph, TCP bytes, 0) incoming unserviced (source-reported)",
        "a TCP connection to a Service without endpoints is closed unopened: no byte flows",
    ),
    (
        "kiali: aggregate (operation) node graph, HTTP/gRPC requests",
        "`request_operation` is the label of Istio's optional request classification filter, \
         not of its standard metrics; Weft does not classify requests",
    ),
    (
        "kiali: aggregateNode appender (node graph)",
        "`request_operation`, as above",
    ),
    (
        "kiali: securityPolicy appender, part 2, ztunnel TCP sent bytes (source-reported)",
        "selects series of the scrape target labelled `app=\"ztunnel\"`: there is no ztunnel",
    ),
    (
        "kiali: securityPolicy appender, part 2, ztunnel TCP received bytes (source-reported)",
        "as above",
    ),
];

fn cluster_yaml() -> Result<String> {
    let bookinfo = workspace_root().join("examples/bookinfo/bookinfo.yaml");
    let bookinfo =
        fs::read_to_string(&bookinfo).with_context(|| format!("reading {}", bookinfo.display()))?;
    let collector = probe::otlp_collector_yaml("node-2");
    Ok(format!("{bookinfo}\n---{CLUSTER}---\n{collector}"))
}

/// A Prometheus server, stopped and its data removed when dropped.
struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start() -> Result<Self> {
        let dir = probe::temp_dir("prometheus")?;
        let mut targets = Vec::new();
        for node in ["node-1", "node-2"] {
            targets.push(format!("'{}:15020'", node_address(node)?));
        }
        let config = format!(
            "global: {{scrape_interval: {}s, evaluation_interval: {}s}}\n\
             scrape_configs:\n\
             - job_name: weft-node\n  static_configs: [{{targets: [{}]}}]\n",
            SCRAPE_INTERVAL.as_secs(),
            SCRAPE_INTERVAL.as_secs(),
            targets.join(", ")
        );
        fs::write(dir.join("prometheus.yml"), config)?;
        let log = fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", cluster::FABRIC_NETNS, "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus (from `cargo xtask setup`)")?;
        let prometheus = Self { child, dir };
        prometheus.wait_for_targets()?;
        Ok(prometheus)
    }

    /// Until both node proxies were scraped successfully.
    fn wait_for_targets(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.query("sum(up)").unwrap_or_default();
            if up == "2" {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
                bail!("Prometheus did not scrape both node proxies within 30 s (up = {up:?}); its log:\n{log}");
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// The value of an instant query with one result, as printed by Prometheus.
    fn query(&self, promql: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", cluster::FABRIC_NETNS, "curl", "-sf"])
            .arg(format!("http://{PROMETHEUS}/api/v1/query"))
            .args(["--data-urlencode", &format!("query={promql}")])
            .output()?;
        ensure!(out.status.success(), "querying Prometheus failed");
        let body: Value = serde_json::from_slice(&out.stdout)?;
        Ok(body["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A node's address on the fabric.
fn node_address(node: &str) -> Result<String> {
    let out = probe::run(
        &format!("node/{node}"),
        &["ip", "-4", "-o", "addr", "show", "eth0"],
    )?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .with_context(|| format!("no address on {node}'s eth0: {out}"))
}

/// One round of every kind of call the dashboards and the graph show.
fn traffic_round() -> Result<()> {
    let python = xtask::setup::test_python().display().to_string();
    let grpc = workspace_root()
        .join("xtask/assets/grpc_client.py")
        .display()
        .to_string();
    let curl = |pod: &str, url: &str| -> Result<u16> { Ok(probe::curl_text(pod, &[url])?.0) };
    // Meshed, across namespaces: productpage calls details, reviews and (v2, v3) ratings;
    // enough calls that every version of reviews has some between two scrapes.
    for _ in 0..10 {
        let status = curl(
            "traffic/client",
            "http://productpage.default:9080/productpage",
        )?;
        ensure!(status == 200, "productpage answered {status}");
    }
    // Outside the mesh, plaintext into it: reported with an `unknown` source.
    let status = curl(
        "legacy/legacy-client",
        "http://productpage.default:9080/productpage",
    )?;
    ensure!(
        status == 200,
        "productpage answered the unmeshed client {status}"
    );
    // From the mesh to a Service outside it, and to one without endpoints (503 UH).
    let status = curl("traffic/client", "http://legacy-http.legacy:8080/get")?;
    ensure!(status == 200, "legacy-http answered {status}");
    let status = curl("traffic/client", "http://nowhere.default/")?;
    ensure!(
        status == 503,
        "a Service without endpoints answered {status}"
    );
    // gRPC across nodes.
    let replies = probe::run(
        "traffic/client",
        &[
            &python,
            &grpc,
            "grpc-echo.default:8080",
            "Hello",
            "--count",
            "5",
        ],
    )?;
    ensure!(
        replies.lines().count() == 5 && replies.lines().all(|l| l.contains("\"OK\"")),
        "gRPC calls failed: {replies}"
    );
    // TCP, a few hundred KB each way: across nodes in the mesh, from outside the mesh into
    // it (plaintext), and from the mesh to a server outside it.
    for (pod, echo) in [
        ("traffic/client", "tcp-echo.default:9000"),
        ("legacy/legacy-client", "tcp-echo.default:9000"),
        ("traffic/client", "legacy-echo.legacy:9000"),
    ] {
        let args = [
            "weft-demo",
            "blast",
            echo,
            "--conns",
            "2",
            "--bytes",
            "200000",
        ];
        let blast = probe::run(pod, &args)?;
        ensure!(
            blast.contains("\"ok\":true"),
            "TCP echo from {pod} to {echo} failed: {blast}"
        );
    }
    Ok(())
}

/// What a user would open: each dashboard with the variable choices of the pages that matter,
/// Kiali's graph of each namespace and of single nodes.
fn views() -> Value {
    let service = |s: &str, qrep: &str| json!({"service": s, "qrep": qrep});
    let workload =
        |ns: &str, w: &str, qrep: &str| json!({"namespace": ns, "workload": w, "qrep": qrep});
    let mut services = Vec::new();
    let mut workloads = Vec::new();
    for qrep in ["destination", "source"] {
        for s in [
            "productpage.default.svc.cluster.local",
            "reviews.default.svc.cluster.local",
            "grpc-echo.default.svc.cluster.local",
            "tcp-echo.default.svc.cluster.local",
            "legacy-http.legacy.svc.cluster.local",
        ] {
            services.push(service(s, qrep));
        }
        for (ns, w) in [
            ("default", "productpage-v1"),
            ("default", "reviews-v2"),
            ("default", "grpc-echo"),
            ("default", "tcp-echo"),
            ("traffic", "client"),
        ] {
            workloads.push(workload(ns, w, qrep));
        }
    }
    let graph = |namespace: &str, workload: &str, app: &str, version: &str, service: &str| {
        json!({"namespace": namespace, "workload": workload, "app": app, "version": version,
               "service": service, "cluster": "Kubernetes"})
    };
    json!({
        "Istio Service Dashboard": services,
        "Istio Workload Dashboard": workloads,
        "kiali": [
            graph("default", "productpage-v1", "productpage", "v1", "productpage"),
            graph("default", "reviews-v2", "reviews", "v2", "reviews"),
            graph("default", "grpc-echo", "grpc-echo", "v1", "grpc-echo"),
            graph("default", "tcp-echo", "tcp-echo", "v1", "tcp-echo"),
            graph("default", "unknown", "unknown", "unknown", "nowhere"),
            graph("traffic", "client", "client", "latest", "client"),
        ],
    })
}

/// One evaluated query of `dashboards.py`.
struct Answer {
    name: String,
    series: u64,
    problems: Vec<String>,
}

fn evaluate(dir: &std::path::Path) -> Result<(Vec<Answer>, Value)> {
    let views_file = dir.join("views.json");
    fs::write(&views_file, views().to_string())?;
    let assets = workspace_root().join("xtask/assets/observability");
    let out = Command::new("ip")
        .args(["netns", "exec", cluster::FABRIC_NETNS, "python3"])
        .arg(assets.join("dashboards.py"))
        .arg(format!("http://{PROMETHEUS}"))
        .arg(assets.join("istio-queries.json"))
        .arg(&views_file)
        .output()
        .context("running dashboards.py")?;
    ensure!(
        out.status.success(),
        "dashboards.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut answers = Vec::new();
    let mut variables = Value::Null;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("printed {line:?}"))?;
        if let Some(vars) = v.get("variables") {
            variables = vars.clone();
            continue;
        }
        answers.push(Answer {
            name: format!(
                "{}: {}",
                v["kind"].as_str().unwrap_or(""),
                v["name"].as_str().unwrap_or("")
            ),
            series: v["series"].as_u64().unwrap_or(0),
            problems: v["problems"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{} ({}): {}",
                        v["name"].as_str().unwrap_or(""),
                        v["view"],
                        p.as_str().unwrap_or("")
                    )
                })
                .collect(),
        });
    }
    Ok((answers, variables))
}

fn dashboards_and_kiali_read_weft_metrics() -> Result<()> {
    let prometheus = Prometheus::start()?;
    // Traffic flows while the queries run, as on a live dashboard (`irate` reads the last two
    // scrapes); `rate(...[1m])` sees several scrapes of every kind of call first.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<()> {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                traffic_round()?;
                thread::sleep(Duration::from_secs(1));
            }
            Ok(())
        })
    };
    thread::sleep(Duration::from_secs(45));
    let evaluated = evaluate(&prometheus.dir);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic
        .join()
        .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))?
        .context("making traffic")?;
    let (answers, variables) = evaluated?;

    // What the dashboards rest on, asked directly: between two pods of one node
    // (productpage-v1 and reviews-v1 run on node-1) the destination's report, with both
    // identities; a caller outside the mesh reported as `unknown`, never by its pod's name.
    let same_node = prometheus.query(
        "sum(istio_requests_total{reporter=\"destination\",source_workload=\"productpage-v1\",\
         destination_workload=\"reviews-v1\",connection_security_policy=\"mutual_tls\",\
         source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"})",
    )?;
    ensure!(
        same_node.parse::<f64>().is_ok_and(|n| n > 0.0),
        "no destination report of productpage-v1 -> reviews-v1 (one node): {same_node:?}"
    );
    let unmeshed = prometheus.query(
        "sum(istio_requests_total{reporter=\"destination\",source_workload=\"unknown\",\
         source_workload_namespace=\"unknown\",destination_workload=\"productpage-v1\",\
         connection_security_policy=\"none\"})",
    )?;
    ensure!(
        unmeshed.parse::<f64>().is_ok_and(|n| n > 0.0),
        "the unmeshed client's calls are not reported with an unknown source: {unmeshed:?}"
    );
    let named =
        prometheus.query("count(istio_requests_total{source_workload=\"legacy-client\"})")?;
    ensure!(
        named.is_empty(),
        "a caller outside the mesh was named: {named:?}"
    );

    let problems: Vec<&String> = answers.iter().flat_map(|a| &a.problems).collect();
    let mut with_data: BTreeMap<&str, bool> = BTreeMap::new();
    for answer in &answers {
        *with_data.entry(answer.name.as_str()).or_default() |= answer.series > 0;
    }
    let expected_empty: BTreeSet<&str> = EXPECTED_EMPTY.iter().map(|(name, _)| *name).collect();
    let empty: Vec<&str> = with_data
        .iter()
        .filter(|(name, data)| !**data && !expected_empty.contains(*name))
        .map(|(name, _)| *name)
        .collect();
    let stale: Vec<&str> = with_data
        .iter()
        .filter(|(name, data)| **data && expected_empty.contains(*name))
        .map(|(name, _)| *name)
        .collect();
    let unknown: Vec<&str> = expected_empty
        .iter()
        .filter(|name| !with_data.contains_key(*name))
        .copied()
        .collect();
    ensure!(
        unknown.is_empty(),
        "EXPECTED_EMPTY names queries that were not evaluated:\n{}",
        join(&unknown)
    );
    let answered = with_data.values().filter(|d| **d).count();
    println!(
        "    {answered} of {} queries answered; {} expected empty",
        with_data.len(),
        expected_empty.len()
    );
    // What the dashboards' pickers offer: v1, v2 and v3 of reviews are three workloads.
    let workloads = &variables["Istio Workload Dashboard"]["workload"];
    for w in [
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "productpage-v1",
        "client",
    ] {
        ensure!(
            workloads
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == w)),
            "the Workload dashboard does not offer {w}: {workloads}"
        );
    }
    let services = &variables["Istio Service Dashboard"]["service"];
    ensure!(
        services
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "reviews.default.svc.cluster.local")),
        "the Service dashboard does not offer reviews.default.svc.cluster.local: {services}"
    );
    ensure!(
        problems.is_empty(),
        "implausible answers:\n{}",
        join(&problems)
    );
    ensure!(empty.is_empty(), "queries without data:\n{}", join(&empty));
    ensure!(
        stale.is_empty(),
        "queries listed as empty answered (update EXPECTED_EMPTY):\n{}",
        join(&stale)
    );
    Ok(())
}

/// The spans of `trace_id`, once the proxies' exporters had the time to send them.
fn spans_of(trace_id: &str) -> Result<Vec<OtlpSpan>> {
    // Exporters send every second; a span of each side of each hop is expected.
    thread::sleep(Duration::from_secs(3));
    Ok(probe::otlp_spans()?
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect())
}

/// A random id of `bytes` bytes, in hex.
fn random_hex(bytes: usize) -> String {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bookinfo page loads make one trace each, as with Istio's proxies: the source proxy of each
/// call makes a client span, the destination proxy a server span, each the parent of the
/// next, across both nodes, exported over OTLP/gRPC to a real receiver (the Python
/// `opentelemetry-proto` messages on grpcio). The mesh's Telemetry starts no trace (0 %),
/// the tracer pod's starts every one (100 %); a caller's sampled context (W3C or B3) is
/// continued and an unsampled one stays unsampled.
fn bookinfo_page_loads_make_one_trace() -> Result<()> {
    probe::wait_for_collector()?;
    // Started by the tracer's proxy. reviews v1 does not call ratings: load until a page
    // went through v2 or v3.
    let mut found = None;
    for _ in 0..12 {
        let id = format!("trace-{}", random_hex(8));
        let (status, _) = probe::curl_text(
            "traffic/tracer",
            &[
                "-H",
                &format!("x-request-id: {id}"),
                "http://productpage.default:9080/productpage",
            ],
        )?;
        ensure!(status == 200, "productpage answered {status}");
        thread::sleep(Duration::from_millis(1500));
        let spans = probe::otlp_spans()?;
        let Some(root) = spans.iter().find(|s| {
            s.client() && s.service == "tracer.traffic" && s.attribute("guid:x-request-id") == id
        }) else {
            continue;
        };
        let trace: Vec<OtlpSpan> = spans
            .iter()
            .filter(|s| s.trace_id == root.trace_id)
            .cloned()
            .collect();
        if trace.iter().any(|s| s.service == "ratings.default") {
            found = Some((root.clone(), trace));
            break;
        }
    }
    let (root, spans) = found.context(
        "no trace of a page load from traffic/tracer that reached ratings (through reviews v2 \
         or v3) arrived at the OTLP receiver",
    )?;
    let whole = spans_of(&root.trace_id)?;
    // Spans of the slower hops may have come after the ones that found the trace.
    let spans = if whole.len() > spans.len() {
        whole
    } else {
        spans
    };
    for line in probe::trace_tree(&spans) {
        println!("    {line}");
    }
    ensure!(
        root.parent.is_empty() && root.service == "tracer.traffic",
        "the trace does not start at the tracer's proxy: {root:?}"
    );
    // The chain a page load makes: tracer -> productpage -> reviews -> ratings, each call a
    // client span at its source and a server span at its destination.
    let mut parent = root.clone();
    for (from, to) in [
        ("tracer.traffic", "productpage"),
        ("productpage.default", "reviews"),
        ("reviews.default", "ratings"),
    ] {
        let client = if parent.client() {
            parent.clone()
        } else {
            spans
                .iter()
                .find(|s| {
                    s.client()
                        && s.service == from
                        && s.parent == parent.span_id
                        && s.name
                            .starts_with(&format!("{to}.default.svc.cluster.local:"))
                })
                .cloned()
                .with_context(|| {
                    format!(
                        "no client span of {from} -> {to} whose parent is {}",
                        parent.span_id
                    )
                })?
        };
        ensure!(
            client.service == from && client.name.starts_with(&format!("{to}.default.svc")),
            "unexpected client span: {client:?}"
        );
        let servers: Vec<&OtlpSpan> = spans
            .iter()
            .filter(|s| !s.client() && s.parent == client.span_id)
            .collect();
        ensure!(
            servers.len() == 1,
            "{} server spans of {from} -> {to} under {}: {servers:?}",
            servers.len(),
            client.span_id
        );
        let server = servers[0].clone();
        ensure!(
            server.service == format!("{to}.default")
                && server.attribute("http.status_code") == "200"
                && server.attribute("istio.namespace") == "default"
                && server.attribute("istio.canonical_service") == to
                && server
                    .attribute("upstream_cluster")
                    .starts_with("inbound|9080"),
            "unexpected server span of {to}: {server:?}"
        );
        ensure!(
            client.attribute("upstream_cluster")
                == format!("outbound|9080||{to}.default.svc.cluster.local")
                && client.attribute("http.method") == "GET"
                && client.attribute("cluster") == "virtual",
            "unexpected client span of {from} -> {to}: {client:?}"
        );
        parent = server;
    }
    let nodes: BTreeSet<String> = spans.iter().map(|s| s.attribute("node_id")).collect();
    ensure!(
        nodes.contains("node-1") && nodes.contains("node-2"),
        "the trace does not cross both nodes: {nodes:?}"
    );
    let principals = spans
        .iter()
        .filter(|s| !s.client() && s.service == "ratings.default")
        .all(|s| {
            s.attribute("istio.source_principal")
                == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        });
    ensure!(
        principals,
        "ratings' server span does not name reviews' identity"
    );

    // A caller's sampled W3C context is continued under its trace id, its span the parent.
    let (trace_id, parent_id) = (random_hex(16), random_hex(8));
    let (status, _) = probe::curl_text(
        "traffic/client",
        &[
            "-H",
            &format!("traceparent: 00-{trace_id}-{parent_id}-01"),
            "http://productpage.default:9080/productpage",
        ],
    )?;
    ensure!(status == 200, "productpage answered {status}");
    let continued = spans_of(&trace_id)?;
    let first = continued
        .iter()
        .find(|s| s.client() && s.service == "client.traffic")
        .with_context(|| {
            format!("the caller's sampled trace {trace_id} was not continued: {continued:?}")
        })?;
    ensure!(
        first.parent == parent_id,
        "the first span's parent is {}, not the caller's {parent_id}",
        first.parent
    );
    ensure!(
        continued
            .iter()
            .any(|s| s.service == "details.default" && !s.client()),
        "the continued trace does not reach details: {continued:?}"
    );
    // B3 (multi-header) too.
    let (b3_trace, b3_parent) = (random_hex(16), random_hex(8));
    let (status, _) = probe::curl_text(
        "traffic/client",
        &[
            "-H",
            &format!("x-b3-traceid: {b3_trace}"),
            "-H",
            &format!("x-b3-spanid: {b3_parent}"),
            "-H",
            "x-b3-sampled: 1",
            "http://productpage.default:9080/productpage",
        ],
    )?;
    ensure!(status == 200, "productpage answered {status}");
    let b3 = spans_of(&b3_trace)?;
    let first = b3
        .iter()
        .filter(|s| s.client() && s.service == "client.traffic")
        .collect::<Vec<_>>();
    ensure!(
        first.len() == 1 && first[0].parent == b3_parent,
        "the caller's B3 context was not continued under its span: {b3:?}"
    );
    ensure!(
        b3.iter()
            .any(|s| !s.client() && s.parent == first[0].span_id),
        "productpage's server span is not the B3 caller's child: {b3:?}"
    );
    // Unsampled by the caller (from the pod whose requests are all sampled otherwise), or by
    // the mesh's 0 %: no span at all.
    let unsampled = random_hex(16);
    let (status, _) = probe::curl_text(
        "traffic/tracer",
        &[
            "-H",
            &format!("traceparent: 00-{unsampled}-{}-00", random_hex(8)),
            "http://productpage.default:9080/productpage",
        ],
    )?;
    ensure!(status == 200, "productpage answered {status}");
    ensure!(
        spans_of(&unsampled)?.is_empty(),
        "spans were sent for a trace its caller did not sample"
    );
    let before = probe::otlp_spans()?.len();
    for _ in 0..5 {
        probe::curl_text(
            "traffic/client",
            &["http://productpage.default:9080/productpage"],
        )?;
    }
    thread::sleep(Duration::from_secs(3));
    let after = probe::otlp_spans()?;
    let started = after[before..]
        .iter()
        .filter(|s| s.service == "client.traffic" && s.parent.is_empty())
        .count();
    ensure!(
        started == 0,
        "the mesh's 0 % sampling started {started} traces of the client's requests"
    );
    // Every node counted what it sent.
    for node in ["node-1", "node-2"] {
        let metrics = probe::metrics(node)?;
        let exported = probe::sample_sum(
            &metrics,
            "weft_telemetry_sent_total",
            &[("signal", "spans")],
        );
        ensure!(exported > 0.0, "{node} reports no exported span");
        let dropped = probe::sample_sum(&metrics, "weft_telemetry_dropped_total", &[]);
        ensure!(
            dropped == 0.0,
            "{node} dropped {dropped} spans or log records"
        );
    }
    Ok(())
}

/// Every access log record the collector received so far: (service, body, attributes).
fn received_logs() -> Result<Vec<(String, Value)>> {
    let log = fs::read_to_string(cluster::log_path("observability/otel-collector")?)?;
    let mut records = Vec::new();
    for line in log.lines().filter(|l| l.starts_with("{\"log\"")) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("record {line:?}"))?;
        records.push((
            v["service"].as_str().unwrap_or_default().to_owned(),
            v["attributes"].clone(),
        ));
    }
    Ok(records)
}

/// Access logs as Istio's Telemetry API turns them on: Bookinfo's namespace sends each
/// request's line, on each side, in the provider's JSON labels to an OTLP logs collector
/// (`envoyOtelAls`), except details (its workload Telemetry turns them off); the tracer pod
/// writes its own calls in Istio's default text format on its node proxy's output (the built-in
/// `envoy` provider); the client pod, whose namespace asks for nothing, logs nothing. An
/// opaque TCP connection gets a line per side too.
fn telemetry_api_access_logs() -> Result<()> {
    let user = format!("user-{}", random_hex(4));
    for pod in ["traffic/client", "traffic/tracer"] {
        let (status, _) = probe::curl_text(
            pod,
            &[
                "-H",
                &format!("end-user: {user}"),
                "http://productpage.default:9080/productpage",
            ],
        )?;
        ensure!(status == 200, "productpage answered {status}");
    }
    thread::sleep(Duration::from_secs(3));
    let records: Vec<(String, Value)> = received_logs()?
        .into_iter()
        .filter(|(_, a)| a["user"] == user.as_str())
        .collect();
    for (service, attributes) in &records {
        println!("    {service:<20} {attributes}");
    }
    let sides = |service: &str, upstream: &str| {
        records
            .iter()
            .filter(|(s, a)| {
                s == service
                    && a["upstream"]
                        .as_str()
                        .is_some_and(|u| u.starts_with(upstream))
            })
            .count()
    };
    // Two page loads: productpage's server line for each, and its client line of each call
    // to reviews (reviews' server lines follow, then its calls to ratings through v2 or v3).
    ensure!(
        sides("productpage.default", "inbound|9080") == 2,
        "productpage's server lines: {records:#?}"
    );
    ensure!(
        sides("productpage.default", "outbound|9080||reviews") == 2,
        "productpage's client lines to reviews: {records:#?}"
    );
    ensure!(
        sides("reviews.default", "inbound|9080") == 2,
        "reviews' server lines: {records:#?}"
    );
    let first = &records[0].1;
    ensure!(
        first["method"] == "GET" && first["code"] == 200,
        "a line without its labels' values: {first}"
    );
    ensure!(
        records.iter().all(|(s, _)| s != "details.default"),
        "details logged although its Telemetry turns access logs off"
    );
    ensure!(
        records.iter().all(|(s, _)| s.ends_with(".default")),
        "a workload outside Bookinfo's namespace sent lines: {records:#?}"
    );
    // The tracer's calls, in Istio's default text format, by node-1's proxy.
    let node = fs::read_to_string(cluster::log_path("node/node-1")?)?;
    let lines: Vec<&str> = node
        .lines()
        .filter(|l| {
            l.starts_with('[') && l.contains("\"GET /productpage HTTP/1.1\" 200 - via_upstream")
        })
        .collect();
    ensure!(
        !lines.is_empty(),
        "node-1's proxy wrote no text line of the tracer's call"
    );
    println!("    node-1: {}", lines[lines.len() - 1]);
    ensure!(
        lines
            .iter()
            .all(|l| l.contains("outbound|9080||productpage.default.svc.cluster.local")),
        "a text line of another call: {lines:#?}"
    );
    let metrics = probe::metrics("node-1")?;
    let sent = probe::sample_sum(&metrics, "weft_telemetry_sent_total", &[("signal", "logs")]);
    ensure!(sent > 0.0, "node-1 counts no exported access log record");

    // An opaque TCP connection across nodes: one line per side when it closes, as Envoy's TCP
    // proxy writes them — the tracer's in text on node-1, tcp-echo's over OTLP from node-2.
    let bytes = 54_321;
    probe::run(
        "traffic/tracer",
        &[
            "weft-demo",
            "blast",
            "tcp-echo.default:9000",
            "--conns",
            "1",
            "--bytes",
            &bytes.to_string(),
        ],
    )?;
    // Lines are written when the connection closes and exported in batches each second:
    // waited for, up to 10 s.
    let text = format!("\"- - -\" 0 - - - \"-\" {bytes} {bytes} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (server, node) = loop {
        let server: Vec<Value> = received_logs()?
            .into_iter()
            .filter(|(s, a)| s == "tcp-echo.default" && a["received"] == bytes)
            .map(|(_, a)| a)
            .collect();
        let node = fs::read_to_string(cluster::log_path("node/node-1")?)?;
        if (!server.is_empty() && node.contains(&text)) || Instant::now() > deadline {
            break (server, node);
        }
        thread::sleep(Duration::from_millis(250));
    };
    ensure!(
        server.len() == 1
            && server[0]["upstream"]
                .as_str()
                .is_some_and(|u| u.starts_with("inbound|9000"))
            && server[0]["code"] == 0
            && server[0]["method"].is_null(),
        "tcp-echo's server lines of the connection: {server:#?}"
    );
    let tcp: Vec<&str> = node
        .lines()
        .filter(|l| l.starts_with('[') && l.contains(&text))
        .collect();
    ensure!(
        tcp.len() == 1 && tcp[0].contains(" outbound|9000||tcp-echo.default.svc.cluster.local "),
        "node-1's text lines of the tracer's TCP connection: {tcp:#?}"
    );
    println!("    node-1: {}", tcp[0]);
    Ok(())
}

fn join(items: &[impl AsRef<str>]) -> String {
    items
        .iter()
        .map(|i| format!("      {}", i.as_ref()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `meshctl ARGS --json` against the cluster's node proxies.
fn meshctl(args: &[&str]) -> Result<Value> {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push("--json".into());
    let out = cluster::meshctl_output(&args)?;
    ensure!(
        out.status.success(),
        "meshctl {} exited with {}: {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("meshctl --json printed no JSON")
}

/// meshctl against the running node proxies: `status` sees both nodes, their programs and
/// certificates; `config dump` lists what node-1's proxy runs; `explain` follows jason's
/// request to reviews v2, and the real requests go where it said.
fn meshctl_reads_the_node_proxies() -> Result<()> {
    let status = meshctl(&["status"])?;
    let nodes = status["nodes"].as_array().context("no nodes")?;
    ensure!(
        nodes.len() == 2,
        "status lists {} nodes: {status}",
        nodes.len()
    );
    for node in nodes {
        let name = node["node"].as_str().unwrap_or("?");
        ensure!(node["ready"] == true, "{name} is not ready: {node}");
        let config = &node["config"];
        ensure!(
            config["proxy"] == config["version"] && config["ebpf"] == config["version"],
            "{name} has not applied its configuration everywhere: {config}"
        );
        let programs: Vec<&str> = node["programs"]
            .as_array()
            .context("no programs listed")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for program in ["weft_connect4", "weft_sock_ops", "tc-in-eth0"] {
            ensure!(
                programs.contains(&program),
                "{name}: {program} not among the attached programs {programs:?}"
            );
        }
        let own = node["certificates"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["node"] == true))
            .with_context(|| format!("{name} lists no certificate of its own: {node}"))?;
        ensure!(
            own["identity"] == "spiffe://cluster.local/ns/weft-system/sa/mesh-node"
                && own["expiresInSeconds"].as_u64().unwrap_or(0) > 3600,
            "{name}'s own certificate: {own}"
        );
    }
    ensure!(
        status["notReached"] == json!([]),
        "nodes not reached: {status}"
    );

    let dir = probe::temp_dir("meshctl")?;
    let traffic = workspace_root().join("examples/bookinfo-traffic");
    for file in [
        "destination-rule-all.yaml",
        "virtual-service-reviews-test-v2.yaml",
    ] {
        fs::copy(traffic.join(file), dir.join(file))?;
    }
    cluster::apply(&dir)?;
    let checked = (|| -> Result<()> {
        // Both proxies serve the rules once their applied versions caught up.
        let deadline = Instant::now() + Duration::from_secs(20);
        let dump = loop {
            let dump = meshctl(&["config", "dump", "--node", "node-1"])?;
            let routed = dump["routes"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|s| s["host"] == "reviews.default.svc.cluster.local")
            });
            if routed {
                break dump;
            }
            ensure!(
                Instant::now() < deadline,
                "node-1 does not list the reviews routes: {dump}"
            );
            thread::sleep(Duration::from_millis(500));
        };
        let reviews = dump["routes"]
            .as_array()
            .and_then(|r| {
                r.iter()
                    .find(|s| s["host"] == "reviews.default.svc.cluster.local")
            })
            .context("no reviews routes")?;
        ensure!(
            reviews["rules"][0]["requires"] == "header end-user exact \"jason\""
                && reviews["rules"][0]["action"] == "route reviews v2 (100%)",
            "node-1's reviews routes: {reviews}"
        );
        let endpoints = dump["endpoints"].as_array().context("no endpoints")?;
        ensure!(
            endpoints.iter().any(|e| e["pod"] == "default/reviews-v2"
                && e["node"] == "node-2"
                && e["status"] == "HEALTHY"),
            "node-1 lists no healthy reviews-v2 endpoint on node-2: {endpoints:?}"
        );
        let clusters = dump["clusters"].as_array().context("no clusters")?;
        ensure!(
            clusters.iter().any(|c| c["cluster"]
                == "outbound|9080|v2|reviews.default.svc.cluster.local"
                && c["destinationRule"] == "default/reviews"
                && c["endpoints"] == 1),
            "node-1 lists no reviews v2 cluster with one endpoint: {clusters:?}"
        );

        let explained = meshctl(&xtask::demo::EXPLAIN_JASON)?;
        ensure!(
            explained["outcome"] == "rule VirtualService default/reviews http[0]",
            "explain: {explained}"
        );
        let backend = &explained["backends"][0];
        ensure!(
            backend["cluster"] == "outbound|9080|v2|reviews.default.svc.cluster.local",
            "explain: {explained}"
        );
        let endpoint = &backend["endpoints"][0];
        let address = endpoint["address"].as_str().unwrap_or_default();
        ensure!(
            endpoint["pod"] == "default/reviews-v2"
                && address.ends_with(":9080")
                && endpoint["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("HBONE (mTLS, port 15008) to node-2")),
            "explain's endpoint: {endpoint}"
        );
        // The requests themselves go where explain said: v2, for jason only.
        for (header, version) in [("end-user: jason", "v2"), ("end-user: bob", "v1")] {
            for _ in 0..5 {
                let (status, body) = probe::curl_text(
                    "default/productpage-v1",
                    &["-H", header, "http://reviews:9080/reviews/0"],
                )?;
                let body: Value = serde_json::from_str(&body).unwrap_or_default();
                ensure!(
                    status == 200 && body["version"] == version,
                    "{header}: reviews answered {status} from {}",
                    body["version"]
                );
            }
        }
        Ok(())
    })();
    let deleted = cluster::delete(&dir);
    let _ = fs::remove_dir_all(&dir);
    checked?;
    deleted
}

fn prerequisites() -> Result<()> {
    for tool in ["prometheus", "curl", "python3"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        ensure!(found, "{tool} is missing: run `cargo xtask setup`");
    }
    Ok(())
}

fn main() {
    let cases: &[probe::Case] = &[
        (
            "bookinfo_page_loads_make_one_trace",
            bookinfo_page_loads_make_one_trace,
        ),
        ("telemetry_api_access_logs", telemetry_api_access_logs),
        (
            "meshctl_reads_the_node_proxies",
            meshctl_reads_the_node_proxies,
        ),
        (
            "dashboards_and_kiali_read_weft_metrics",
            dashboards_and_kiali_read_weft_metrics,
        ),
    ];
    probe::run_suite(
        "observability",
        || {
            prerequisites()?;
            probe::up_with(&cluster_yaml()?)
        },
        cases,
    )
}
