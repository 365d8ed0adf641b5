//! `cargo xtask demo`: Bookinfo on a two-node virtual cluster, traffic through the mesh within
//! and across nodes, a namespace outside the mesh, mutual TLS required (what the servers see,
//! plaintext refused), Istio's HTTP authorization task (allowed and denied requests, what the
//! node proxies counted), that namespace opted in live, then Istio's Bookinfo traffic-management
//! tasks with the rules of `examples/bookinfo-traffic/`, one page load's trace as an OTLP
//! collector received it, and `meshctl explain` of that request's hop to reviews.
//! Prints what each step did and what the node proxies and eBPF programs counted.

use std::{collections::BTreeMap, time::Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;

use crate::{
    cluster,
    probe::{self, curl, curl_replies, delta, ebpf_counters, pod_ip, tally, Reply},
    workspace_root,
};

const NODES: [&str; 2] = ["node-1", "node-2"];

type Counters = BTreeMap<&'static str, BTreeMap<String, f64>>;

pub fn run() -> Result<()> {
    let root = workspace_root();
    let started = Instant::now();
    step("Start a two-node virtual cluster with Bookinfo (namespace default, label weft.io/mesh=enabled)");
    cluster::down().context("removing an earlier cluster")?;
    let result = cluster::up(&root.join("examples/bookinfo"))
        .and_then(|()| cluster::apply(&root.join("examples/demo/clients.yaml")))
        .and_then(|()| {
            println!("{}", cluster::status()?);
            tasks()
        });
    step("Clean up");
    cluster::down()?;
    println!("    removed namespaces, veths, cgroups, pins and processes");
    result?;
    println!("\nDemo finished in {:.0?}.", started.elapsed());
    Ok(())
}

fn tasks() -> Result<()> {
    step("A meshed client calls productpage 6 times (productpage → details, reviews → ratings)");
    let before = counters()?;
    let mut versions = BTreeMap::<String, usize>::new();
    let mut last = Value::Null;
    for _ in 0..6 {
        let (status, body) = curl(
            "default/sleep",
            "http://productpage:9080/productpage",
            &[("end-user", "jason")],
        )?;
        ensure!(status == 200, "productpage answered {status}: {body}");
        *versions
            .entry(text(field(&body, &["reviews", "version"])))
            .or_default() += 1;
        last = body;
    }
    let after = counters()?;
    println!("    HTTP 200 x6; reviews versions seen: {versions:?}");
    println!(
        "    productpage saw its client as {}; details (node-2) saw productpage as {}",
        who(&text(field(&last, &["peer"]))),
        who(&text(field(&last, &["details", "peer"]))),
    );
    println!("    connect4 captured the sockets on each node; sk_msg short-circuited pod <-> proxy bytes:");
    print_deltas(
        &before,
        &after,
        &["captured", "fast_path_redirects", "fast_path_bytes"],
    );
    for node in NODES {
        println!(
            "    {node} proxy: istio_tcp_connections_opened_total reporter=source {}, reporter=destination {}",
            tcp_opened(node, "source")?,
            tcp_opened(node, "destination")?
        );
    }

    step("The legacy namespace (no label) calls its own inventory service on node-2");
    let client_ip = pod_ip("legacy/client")?;
    let before = counters()?;
    let (status, body) = curl("legacy/client", "http://inventory:9080/details/0", &[])?;
    ensure!(status == 200, "inventory answered {status}: {body}");
    let after = counters()?;
    println!(
        "    inventory saw its client as {}; legacy/client is {client_ip}: untouched by Weft",
        who(&text(field(&body, &["peer"])))
    );
    print_deltas(&before, &after, &["captured", "skipped_not_meshed"]);

    step("The legacy client calls the meshed productpage: plaintext from outside the mesh");
    let before = counters()?;
    let (status, body) = curl(
        "legacy/client",
        "http://productpage.default:9080/productpage",
        &[],
    )?;
    let after = counters()?;
    println!(
        "    HTTP {status}; productpage saw its client as {}: TC steered the connection to 15006",
        who(&text(field(&body, &["peer"])))
    );
    print_deltas(&before, &after, &["inbound_captured"]);
    mutual_tls()?;
    authorization()?;

    step("Opt the legacy namespace in (kubectl label namespace legacy weft.io/mesh=enabled)");
    let start = Instant::now();
    cluster::apply(&workspace_root().join("examples/demo/legacy-meshed.yaml"))?;
    let applied = start.elapsed();
    let before = counters()?;
    let (status, body) = curl("legacy/client", "http://inventory:9080/details/0", &[])?;
    ensure!(status == 200, "inventory answered {status}: {body}");
    let after = counters()?;
    println!(
        "    applied in {applied:.0?}; inventory now sees its client as {}; no pod restarted",
        who(&text(field(&body, &["peer"])))
    );
    print_deltas(&before, &after, &["captured", "inbound_captured"]);
    traffic_management()?;
    tracing()?;
    explain()
}

/// Istio's distributed tracing task: an OpenTelemetry collector, the provider in MeshConfig,
/// a Telemetry that traces every request; one page load becomes one trace.
fn tracing() -> Result<()> {
    step("Distributed tracing: an OTLP collector (observability/otel-collector), MeshConfig's provider and a Telemetry at 100 % (examples/demo/tracing.yaml), jason routed to reviews v2");
    probe::apply_yaml(&probe::otlp_collector_yaml("node-2"))?;
    cluster::apply(&workspace_root().join("examples/demo/tracing.yaml"))?;
    // The routes of the request-routing task again (jason to reviews v2, which calls ratings),
    // without the last task's delay and timeout.
    let routes = workspace_root().join("examples/bookinfo-traffic");
    for file in [
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-test-v2.yaml",
    ] {
        cluster::apply(&routes.join(file))?;
    }
    probe::wait_for_collector()?;
    let id = format!("demo-trace-{}", std::process::id());
    let (status, body) = curl(
        "default/sleep",
        "http://productpage:9080/productpage",
        &[("end-user", "jason"), ("x-request-id", &id)],
    )?;
    ensure!(status == 200, "productpage answered {status}: {body}");
    // The node proxies send their spans every second.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let trace = loop {
        let spans = probe::otlp_spans()?;
        let root = spans
            .iter()
            .find(|s| s.parent.is_empty() && s.attribute("guid:x-request-id") == id);
        if let Some(root) = root {
            let trace: Vec<_> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .cloned()
                .collect();
            // sleep -> productpage -> details, reviews -> ratings: two spans per call.
            if trace.len() >= 8 || Instant::now() > deadline {
                break trace;
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no trace of the page load reached the collector"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    println!(
        "    one page load as jason, trace {} ({} spans: client span at the caller's node proxy, server span at the pod's):",
        trace[0].trace_id,
        trace.len()
    );
    for line in probe::trace_tree(&trace) {
        println!("      {line}");
    }
    Ok(())
}

/// `meshctl explain` of the traced request's hop to reviews, from node-1's running proxy.
/// `meshctl explain` of jason's request from productpage to reviews, which Istio's
/// request-routing task sends to v2 (the observability suite asks the same).
pub const EXPLAIN_JASON: [&str; 6] = [
    "explain",
    "--from",
    "default/productpage-v1",
    "http://reviews:9080/reviews/0",
    "-H",
    "end-user: jason",
];

fn explain() -> Result<()> {
    let args = EXPLAIN_JASON;
    step(&format!(
        "Why jason's request goes to reviews v2: cargo xtask cluster meshctl -- {}",
        args.map(|a| if a.contains(' ') {
            format!("'{a}'")
        } else {
            a.to_owned()
        })
        .join(" ")
    ));
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = cluster::meshctl_output(&args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "meshctl explain failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("outbound|9080|v2|reviews.default.svc.cluster.local"),
        "meshctl explain did not route jason to reviews v2:\n{text}"
    );
    for line in text.lines() {
        println!("    {line}");
    }
    Ok(())
}

/// Istio's "require mTLS" task: STRICT in namespace default, what the servers see, and the
/// legacy client's plaintext refused; the policy is removed again afterwards.
fn mutual_tls() -> Result<()> {
    let policy = workspace_root().join("examples/demo/strict-mtls.yaml");
    step("Require mutual TLS in namespace default (PeerAuthentication STRICT, examples/demo/strict-mtls.yaml)");
    cluster::apply(&policy)?;
    let refused_before = mtls_refused("node-1")?;
    let (status, body) = curl("default/sleep", "http://productpage:9080/productpage", &[])?;
    ensure!(
        status == 200,
        "productpage answered {status} under STRICT: {body}"
    );
    println!("    meshed sleep -> productpage: HTTP {status}");
    println!(
        "    productpage (node-1) saw x-forwarded-client-cert {}\n      (same node: the kernel vouches for the caller, no TLS on the hop)",
        text(field(&body, &["client_cert"]))
    );
    println!(
        "    details (node-2) saw x-forwarded-client-cert {}\n      (across nodes: HBONE, TLS 1.3 mTLS with productpage's certificate)",
        text(field(&body, &["details", "client_cert"]))
    );
    let out = cluster::exec(
        "legacy/client",
        &[
            "curl".into(),
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            "--max-time".into(),
            "5".into(),
            "-w".into(),
            "%{http_code}".into(),
            "http://productpage.default:9080/productpage".into(),
        ],
    )?;
    let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        code == "000",
        "the legacy client's plaintext was answered {code} under STRICT"
    );
    println!(
        "    legacy/client (outside the mesh) -> productpage in plaintext: refused (curl exit {}); node-1 counted weft_mtls_refused_total{{reason=\"plaintext_strict\"}} +{}",
        out.status.code().unwrap_or(-1),
        mtls_refused("node-1")? - refused_before
    );
    cluster::delete(&policy)?;
    println!("    removed the policy again (PERMISSIVE, Istio's default)");
    Ok(())
}

/// Istio's HTTP traffic authorization task on Bookinfo: a request allowed, requests denied,
/// and what the operator sees; the policies are removed again afterwards.
fn authorization() -> Result<()> {
    let policies = workspace_root().join("examples/demo/authz-bookinfo.yaml");
    step("Authorize Bookinfo as Istio's HTTP traffic task does (examples/demo/authz-bookinfo.yaml): nothing allowed, then GET on each service from its one caller");
    cluster::apply(&policies)?;
    let (status, page) = curl("default/sleep", "http://productpage:9080/productpage", &[])?;
    let outcome = page_outcome(status, &page);
    ensure!(
        status == 200 && outcome == "complete",
        "productpage under the policies: {outcome}: {page}"
    );
    println!("    sleep GET productpage: HTTP {status}, page {outcome} (each call allowed by its callee's policy: on one node by the caller's node proxy, across nodes by the callee's, with the caller's mTLS identity)");
    let denied = [
        (
            "default/sleep",
            "POST",
            "http://productpage:9080/productpage",
            "only GET is allowed",
        ),
        (
            "default/sleep",
            "GET",
            "http://details:9080/details/0",
            "details admits productpage's identity only",
        ),
        (
            "legacy/client",
            "GET",
            "http://ratings.default:9080/ratings/0",
            "plaintext has no identity",
        ),
    ];
    for (from, method, url, why) in denied {
        let (status, body) = probe::curl_text(from, &["-X", method, url])?;
        ensure!(
            status == 403 && body == "RBAC: access denied",
            "{from} {method} {url} answered {status}: {body}"
        );
        println!("    {from} {method} {url}: HTTP {status} {body:?} ({why})");
    }
    for node in NODES {
        let text = probe::metrics(node)?;
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("weft_authz_decisions_total{"))
            .map(|l| format!("      {l}"))
            .collect();
        println!(
            "    {node} weft_authz_decisions_total:\n{}",
            lines.join("\n")
        );
    }
    cluster::delete(&policies)?;
    println!("    removed the policies again");
    Ok(())
}

fn mtls_refused(node: &str) -> Result<f64> {
    Ok(probe::sample_sum(
        &probe::metrics(node)?,
        "weft_mtls_refused_total",
        &[("reason", "plaintext_strict")],
    ))
}

/// Who calls productpage in a traffic-management step, and how many times.
#[derive(Clone, Copy)]
enum User {
    Anonymous(usize),
    Jason(usize),
}

/// One step of Istio's Bookinfo tasks: the files applied (in order), the calls made, and
/// what Istio's documentation says the user sees.
struct TrafficStep {
    title: &'static str,
    files: &'static [&'static str],
    calls: &'static [User],
    expected: &'static str,
}

/// Istio's request routing, fault injection, traffic shifting and request timeouts tasks.
const TRAFFIC_STEPS: &[TrafficStep] = &[
    TrafficStep {
        title: "Subsets of every service by its version label; no route yet",
        files: &["destination-rule-all.yaml"],
        calls: &[User::Anonymous(100)],
        expected: "reviews balanced over v1, v2 and v3",
    },
    TrafficStep {
        title: "Request routing: every service to v1",
        files: &["virtual-service-all-v1.yaml"],
        calls: &[User::Anonymous(100), User::Jason(100)],
        expected: "reviews v1 only, for everyone",
    },
    TrafficStep {
        title: "Request routing: jason to reviews v2, everyone else to v1",
        files: &["virtual-service-reviews-test-v2.yaml"],
        calls: &[User::Anonymous(100), User::Jason(100)],
        expected: "jason v2 (black stars), others v1",
    },
    TrafficStep {
        title: "Fault injection: a 7 s delay on ratings for jason",
        files: &["virtual-service-ratings-test-delay.yaml"],
        calls: &[User::Jason(2), User::Anonymous(20)],
        expected: "jason: reviews unavailable after about 6 s (productpage gives reviews \
                   3 s, twice; reviews v2 waits 10 s for ratings); others unaffected",
    },
    TrafficStep {
        title: "Fault injection: ratings aborts jason's calls with HTTP 500",
        files: &["virtual-service-ratings-test-abort.yaml"],
        calls: &[User::Jason(20), User::Anonymous(20)],
        expected: "jason: reviews v2 says ratings are unavailable (500); others unaffected",
    },
    TrafficStep {
        title: "Traffic shifting: back to v1, then reviews 50/50 between v1 and v3",
        files: &[
            "virtual-service-all-v1.yaml",
            "virtual-service-reviews-50-v3.yaml",
        ],
        calls: &[User::Anonymous(100)],
        expected: "reviews about half v1, half v3 (red stars)",
    },
    TrafficStep {
        title: "Traffic shifting: reviews 100% to v3",
        files: &["virtual-service-reviews-v3.yaml"],
        calls: &[User::Anonymous(100)],
        expected: "reviews v3 only",
    },
    TrafficStep {
        title: "Request timeouts: reviews to v2, a 2 s delay on every ratings call",
        files: &[
            "virtual-service-reviews-v2.yaml",
            "virtual-service-ratings-delay-2s.yaml",
        ],
        calls: &[User::Anonymous(3)],
        expected: "the page with ratings, after about 2 s",
    },
    TrafficStep {
        title: "Request timeouts: the same with a 0.5 s timeout on reviews",
        files: &["virtual-service-reviews-v2-timeout.yaml"],
        calls: &[User::Anonymous(3)],
        expected: "reviews unavailable (504) after about 1 s (0.5 s, tried twice)",
    },
];

fn traffic_management() -> Result<()> {
    let dir = workspace_root().join("examples/bookinfo-traffic");
    for (i, task) in TRAFFIC_STEPS.iter().enumerate() {
        step(&format!(
            "Traffic management {}/{}: {}",
            i + 1,
            TRAFFIC_STEPS.len(),
            task.title
        ));
        for file in task.files {
            let start = Instant::now();
            cluster::apply(&dir.join(file)).with_context(|| format!("applying {file}"))?;
            println!(
                "    applied examples/bookinfo-traffic/{file} ({:.0?})",
                start.elapsed()
            );
        }
        println!("    Istio's task shows: {}", task.expected);
        for user in task.calls {
            let (who, n, header) = match *user {
                User::Anonymous(n) => ("anonymous", n, None),
                User::Jason(n) => ("jason", n, Some("end-user: jason")),
            };
            let before = proxied()?;
            let start = Instant::now();
            let pages = productpage_calls(n, header)?;
            let per_call = start.elapsed() / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
            let counted = counted_since(&before, &proxied()?);
            println!(
                "    {who} x{n}: HTTP {:?}; reviews {:?}; page {:?}; {per_call:.2?} per call",
                tally(&pages, |r| r.status),
                tally(&pages, |r| r.body["reviews"]["version"]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned()),
                tally(&pages, |p| page_outcome(p.status, &p.body)),
            );
            println!("      proxies counted (code and flags): {counted}");
        }
    }
    Ok(())
}

/// `n` productpage calls from the meshed sleep pod over one keep-alive connection.
fn productpage_calls(n: usize, header: Option<&str>) -> Result<Vec<Reply>> {
    let url = format!("http://productpage:9080/productpage?call=[1-{n}]");
    let mut args = vec!["--max-time", "20"];
    if let Some(header) = header {
        args.extend(["-H", header]);
    }
    args.push(&url);
    curl_replies("default/sleep", &args)
}

/// Requests the node proxies reported as sources, by destination service and
/// `response_code response_flags`.
type Proxied = BTreeMap<(String, String), f64>;

fn proxied() -> Result<Proxied> {
    let mut counts = Proxied::new();
    for node in NODES {
        let text = probe::metrics(node)?;
        let samples = text.lines().filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("reporter=\"source\"")
        });
        for line in samples {
            let (Some(service), Some(code), Some(flags), Some(value)) = (
                label(line, "destination_service_name"),
                label(line, "response_code"),
                label(line, "response_flags"),
                line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                continue;
            };
            *counts
                .entry((service.to_owned(), format!("{code} {flags}")))
                .or_default() += value;
        }
    }
    Ok(counts)
}

/// `reviews {"200 -": 100}, ratings {"500 FI": 20}`: what grew between two readings.
fn counted_since(before: &Proxied, after: &Proxied) -> String {
    let mut by_service = BTreeMap::<&str, BTreeMap<&str, f64>>::new();
    for ((service, outcome), value) in after {
        let grew = value
            - before
                .get(&(service.clone(), outcome.clone()))
                .unwrap_or(&0.0);
        if grew > 0.0 {
            by_service.entry(service).or_default().insert(outcome, grew);
        }
    }
    let parts: Vec<String> = by_service
        .iter()
        .map(|(service, outcomes)| format!("{service} {outcomes:?}"))
        .collect();
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The value of label `name` in a Prometheus sample line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    // Preceded by `{` or `,`, so that `code` does not find `response_code`.
    let start = [format!("{{{name}=\""), format!(",{name}=\"")]
        .iter()
        .find_map(|key| line.find(key.as_str()).map(|at| at + key.len()))?;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// What the page shows: everything, or which upstream it had to do without.
fn page_outcome(status: u16, page: &Value) -> String {
    let reviews = &page["reviews"];
    if !reviews["error"].is_null() {
        format!("reviews unavailable ({})", reviews["status"])
    } else if !reviews["ratings"]["error"].is_null() {
        format!("ratings unavailable ({})", reviews["ratings"]["status"])
    } else if status != 200 {
        format!("HTTP {status}")
    } else {
        "complete".to_owned()
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

/// Names the node proxy behind a peer address the demo application reported.
fn who(peer: &str) -> String {
    match peer.rsplit_once(':').map_or(peer, |(ip, _)| ip) {
        "10.244.1.1" => "node-1's proxy".to_owned(),
        "10.244.2.1" => "node-2's proxy".to_owned(),
        other => format!("{other} (directly, no proxy)"),
    }
}

fn counters() -> Result<Counters> {
    NODES.iter().map(|n| Ok((*n, ebpf_counters(n)?))).collect()
}

fn tcp_opened(node: &str, reporter: &str) -> Result<f64> {
    Ok(probe::sample_sum(
        &probe::metrics(node)?,
        "istio_tcp_connections_opened_total",
        &[("reporter", reporter)],
    ))
}

fn print_deltas(before: &Counters, after: &Counters, names: &[&str]) {
    for node in NODES {
        let line: Vec<String> = names
            .iter()
            .map(|n| format!("{n} +{}", delta(&before[node], &after[node], n)))
            .collect();
        println!("    {node} eBPF: {}", line.join(", "));
    }
}

fn field<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_whole() {
        let line = r#"istio_requests_total{reporter="source",grpc_response_code="x",response_code="503",response_flags="UO"} 4"#;
        assert_eq!(label(line, "response_code"), Some("503"));
        assert_eq!(label(line, "reporter"), Some("source"));
        assert_eq!(label(line, "code"), None);
    }

    #[test]
    fn counts_what_grew() {
        let key = |s: &str, o: &str| (s.to_owned(), o.to_owned());
        let before = Proxied::from([(key("reviews", "200 -"), 5.0)]);
        let after = Proxied::from([
            (key("reviews", "200 -"), 15.0),
            (key("ratings", "500 FI"), 2.0),
        ]);
        assert_eq!(
            counted_since(&before, &after),
            r#"ratings {"500 FI": 2.0}, reviews {"200 -": 10.0}"#
        );
        assert_eq!(counted_since(&after, &after), "nothing");
    }
}
