//! End-to-end tests on the virtual cluster: real network namespaces, veths, cgroups, eBPF
//! programs in the running kernel, node proxies and pods exchanging real TCP.
//!
//! One cluster serves every case (bringing it up is the slow part); cases run in order, each
//! reporting ok/FAILED, and the cluster is torn down at the end whatever happened, after which
//! the last case checks that nothing was left behind. Needs root: without it the suite fails
//! loudly instead of skipping.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use xtask::{
    cluster,
    probe::{self, delta as counter_delta, ebpf_counters, metrics, pod_ip, resolve, sample_sum},
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: late}
---
apiVersion: v1
kind: Pod
metadata: {name: peer-1, namespace: mesh, labels: {app: peer-1}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [weft-demo, peer, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: mesh, labels: {app: echo-1}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [weft-demo, echo, --port, "7000"], ports: [{containerPort: 7000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2, namespace: mesh, labels: {app: echo-2}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, echo, --port, "7000"], ports: [{containerPort: 7000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: mesh, labels: {app: client-1}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: optout-1, namespace: mesh, labels: {app: optout-1, weft.io/mesh: disabled}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-p, namespace: plain, labels: {app: client-p}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-l, namespace: late, labels: {app: client-l}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: peer-2, namespace: mesh, labels: {app: peer-2}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, peer, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: peer-p, namespace: plain, labels: {app: peer-p}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, peer, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-p2, namespace: plain, labels: {app: client-p2}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Service
metadata: {name: peer-1, namespace: mesh}
spec: {selector: {app: peer-1}, ports: [{name: tcp-peer, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: peer-2, namespace: mesh}
spec: {selector: {app: peer-2}, ports: [{name: tcp-peer, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-1, namespace: mesh}
spec: {selector: {app: echo-1}, ports: [{name: tcp-echo, port: 7000}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-2, namespace: mesh}
spec: {selector: {app: echo-2}, ports: [{name: tcp-echo, port: 7000}]}
---
apiVersion: v1
kind: Service
metadata: {name: peer-p, namespace: plain}
spec: {selector: {app: peer-p}, ports: [{name: tcp-peer, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: mesh, labels: {app: web-1}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [weft-demo, http, --port, "8000"], ports: [{containerPort: 8000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: mesh, labels: {app: web-2}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, http, --port, "8000"], ports: [{containerPort: 8000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web-1, namespace: mesh}
spec: {selector: {app: web-1}, ports: [{name: http, port: 80, targetPort: 8000}, {name: grpc, port: 9090, targetPort: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-2, namespace: mesh}
spec: {selector: {app: web-2}, ports: [{name: http, port: 80, targetPort: 8000}, {name: grpc, port: 9090, targetPort: 8000}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: side}
---
apiVersion: v1
kind: Pod
metadata: {name: client-s, namespace: side, labels: {app: client-s, security.istio.io/tlsMode: istio}, annotations: {weft.io/bench-sidecar: weft}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: peer-s, namespace: side, labels: {app: peer-s, security.istio.io/tlsMode: istio}, annotations: {weft.io/bench-sidecar: weft}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, peer, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: peer-s, namespace: side}
spec: {selector: {app: peer-s}, ports: [{name: tcp-peer, port: 80, targetPort: 8080}]}
"#;

const LATE_MESHED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: late, labels: {weft.io/mesh: enabled}}
"#;

const LATE_UNMESHED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: late}
"#;

const CLIENT_L_OPTED_OUT: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client-l, namespace: late, labels: {app: client-l, weft.io/mesh: disabled}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
"#;

/// What `weft-demo dial` printed.
#[derive(Debug)]
struct Dial {
    /// getpeername() of the client socket.
    peername: String,
    /// The client address as the server saw it (ip only).
    server_saw: String,
}

fn dial(pod: &str, addr: &str) -> Result<Dial> {
    let out = cluster::exec(
        pod,
        &args(&["weft-demo", "dial", addr, "--timeout-ms", "2000"]),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{pod}: dial {addr} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{pod}: dial {addr}: no `{name}` in output: {stdout}"))
    };
    let said = field("said=")?;
    let server_saw = said
        .strip_prefix("peer=")
        .and_then(|a| a.rsplit_once(':'))
        .map(|(ip, _)| ip.to_owned())
        .ok_or_else(|| anyhow!("{pod}: unexpected server answer {said:?}"))?;
    Ok(Dial {
        peername: field("peername=")?,
        server_saw,
    })
}

fn dial_fails(pod: &str, addr: &str) -> Result<String> {
    let out = cluster::exec(
        pod,
        &args(&["weft-demo", "dial", addr, "--timeout-ms", "1500"]),
    )?;
    ensure!(
        !out.status.success(),
        "{pod}: dial {addr} unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    probe::temp_dir("e2e")
}

const PROXY_1: &str = "10.244.1.1";
const PROXY_2: &str = "10.244.2.1";

fn meshed_pod_reaches_service_vip_through_its_node_proxy() -> Result<()> {
    let vip = resolve("mesh/client-1", "peer-1.mesh")?;
    let before = metrics("node-1")?;
    let dial = dial("mesh/client-1", "peer-1:80")?;
    ensure!(
        dial.peername == format!("{vip}:80"),
        "getpeername shows {} instead of the VIP {vip}:80",
        dial.peername
    );
    ensure!(
        dial.server_saw == PROXY_1,
        "server saw {} instead of node-1's proxy {PROXY_1}",
        dial.server_saw
    );
    let after = metrics("node-1")?;
    let labels = [
        ("reporter", "source"),
        ("destination_service", "peer-1.mesh.svc.cluster.local"),
        ("source_workload", "client-1"),
    ];
    let opened = sample_sum(&after, "istio_tcp_connections_opened_total", &labels)
        - sample_sum(&before, "istio_tcp_connections_opened_total", &labels);
    ensure!(
        opened >= 1.0,
        "node-1 proxy did not count the connection: {opened}"
    );
    Ok(())
}

fn cross_node_goes_through_both_node_proxies() -> Result<()> {
    let (b1, b2) = (metrics("node-1")?, metrics("node-2")?);
    let dial = dial("mesh/client-1", "peer-2:80")?;
    ensure!(
        dial.server_saw == PROXY_2,
        "server on node-2 saw {} instead of node-2's proxy {PROXY_2}",
        dial.server_saw
    );
    let (a1, a2) = (metrics("node-1")?, metrics("node-2")?);
    let src = [
        ("reporter", "source"),
        ("destination_service", "peer-2.mesh.svc.cluster.local"),
    ];
    let dst = [
        ("reporter", "destination"),
        ("destination_workload", "peer-2"),
    ];
    let m = "istio_tcp_connections_opened_total";
    ensure!(
        sample_sum(&a1, m, &src) - sample_sum(&b1, m, &src) >= 1.0,
        "node-1 proxy did not report the outbound connection"
    );
    ensure!(
        sample_sum(&a2, m, &dst) - sample_sum(&b2, m, &dst) >= 1.0,
        "node-2 proxy did not report the inbound connection"
    );
    Ok(())
}

fn unlabelled_namespace_is_untouched() -> Result<()> {
    let client_ip = pod_ip("plain/client-p")?;
    let before = ebpf_counters("node-1")?;
    for _ in 0..5 {
        let dial = dial("plain/client-p", "peer-p:80")?;
        ensure!(
            dial.server_saw == client_ip,
            "unmeshed traffic was proxied: server saw {}, client is {client_ip}",
            dial.server_saw
        );
    }
    let after = ebpf_counters("node-1")?;
    ensure!(
        counter_delta(&before, &after, "captured") == 0.0,
        "captures happened for an unlabelled namespace: {before:?} -> {after:?}"
    );
    ensure!(
        counter_delta(&before, &after, "skipped_not_meshed") >= 5.0,
        "connect() of unmeshed pods not seen by the program"
    );
    Ok(())
}

/// The benchmark's sidecar mode: nftables redirection into `mesh-node sidecar` in both pods,
/// original destinations from `SO_ORIGINAL_DST`, HBONE mTLS between the two sidecars with the
/// pods' own identities (both are labelled as injected), and no eBPF capture (the namespace is
/// not meshed).
fn sidecar_mode_carries_traffic_through_both_sidecars() -> Result<()> {
    let vip = resolve("side/client-s", "peer-s.side")?;
    let server_ip = pod_ip("side/peer-s")?;
    let sidecar_metrics = |pod: &str| {
        probe::run(pod, &["curl", "-sf", "http://127.0.0.1:15020/metrics"])
            .with_context(|| format!("reading the metrics of {pod}'s sidecar"))
    };
    let (client_before, server_before) = (
        sidecar_metrics("side/client-s")?,
        sidecar_metrics("side/peer-s")?,
    );
    let ebpf_before = ebpf_counters("node-1")?;
    let dial = dial("side/client-s", "peer-s:80")?;
    ensure!(
        dial.peername == format!("{vip}:80"),
        "getpeername shows {} instead of the VIP {vip}:80",
        dial.peername
    );
    // The server's sidecar connects to it from the pod's own address.
    ensure!(
        dial.server_saw == server_ip,
        "server saw {} instead of its own sidecar ({server_ip})",
        dial.server_saw
    );
    let m = "istio_tcp_connections_opened_total";
    let src = [
        ("reporter", "source"),
        ("destination_service", "peer-s.side.svc.cluster.local"),
    ];
    let client_after = sidecar_metrics("side/client-s")?;
    ensure!(
        sample_sum(&client_after, m, &src) - sample_sum(&client_before, m, &src) >= 1.0,
        "the client's sidecar did not report the outbound connection"
    );
    let dst = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/side/sa/default",
        ),
    ];
    let server_after = sidecar_metrics("side/peer-s")?;
    ensure!(
        sample_sum(&server_after, m, &dst) - sample_sum(&server_before, m, &dst) >= 1.0,
        "the server's sidecar did not report the inbound connection as mTLS from the client's identity"
    );
    let ebpf_after = ebpf_counters("node-1")?;
    ensure!(
        counter_delta(&ebpf_before, &ebpf_after, "captured") == 0.0,
        "the eBPF capture took sidecar traffic: {ebpf_before:?} -> {ebpf_after:?}"
    );
    Ok(())
}

/// Polls `dial` until `ok` holds, for at most `limit` after `start`.
fn eventually(
    start: Instant,
    limit: Duration,
    what: &str,
    mut ok: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    loop {
        if ok()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn labelling_at_runtime_captures_and_releases() -> Result<()> {
    let client_ip = pod_ip("late/client-l")?;
    ensure!(dial("late/client-l", "peer-p.plain:80")?.server_saw == client_ip);

    let start = Instant::now();
    probe::apply_yaml(LATE_MESHED)?;
    let took = eventually(
        start,
        Duration::from_secs(1),
        "capture after labelling",
        || Ok(dial("late/client-l", "peer-p.plain:80")?.server_saw != client_ip),
    )?;
    println!("    namespace labelled: captured after {took:?}");

    let start = Instant::now();
    probe::apply_yaml(CLIENT_L_OPTED_OUT)?;
    let took = eventually(
        start,
        Duration::from_secs(1),
        "release after pod opt-out",
        || Ok(dial("late/client-l", "peer-p.plain:80")?.server_saw == client_ip),
    )?;
    println!("    pod opted out: released after {took:?}");

    let optout_ip = pod_ip("mesh/optout-1")?;
    ensure!(
        dial("mesh/optout-1", "peer-p.plain:80")?.server_saw == optout_ip,
        "a pod labelled weft.io/mesh=disabled was captured"
    );

    probe::apply_yaml(LATE_UNMESHED)?;
    ensure!(
        dial("late/client-l", "peer-p.plain:80")?.server_saw == client_ip,
        "unlabelled namespace still captured"
    );
    Ok(())
}

fn fast_path_is_used_and_byte_exact() -> Result<()> {
    let before = ebpf_counters("node-1")?;
    let out = cluster::exec(
        "mesh/client-1",
        &args(&[
            "weft-demo",
            "blast",
            "echo-1:7000",
            "--conns",
            "64",
            "--bytes",
            "16777216",
        ]),
    )?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "blast failed: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("    {}", report.trim());
    let after = ebpf_counters("node-1")?;
    let bytes = counter_delta(&before, &after, "fast_path_bytes");
    let redirects = counter_delta(&before, &after, "fast_path_redirects");
    ensure!(
        redirects > 0.0,
        "no fast-path redirects: {before:?} -> {after:?}"
    );
    ensure!(
        bytes >= 64.0 * 16_777_216.0,
        "fast path carried only {bytes} bytes of the 1 GiB sent each way"
    );
    Ok(())
}

fn plaintext_to_meshed_pod_is_captured_inbound() -> Result<()> {
    let before = ebpf_counters("node-1")?;
    let m_before = metrics("node-1")?;
    // Same node (enters through the client's own interface) and from node-2 (through eth0).
    for client in ["plain/client-p", "plain/client-p2"] {
        let dial = dial(client, "peer-1.mesh:80")?;
        ensure!(
            dial.server_saw == PROXY_1,
            "{client} reached peer-1 directly ({}), not through 15006",
            dial.server_saw
        );
    }
    let after = ebpf_counters("node-1")?;
    ensure!(
        counter_delta(&before, &after, "inbound_captured") >= 2.0,
        "inbound captures not counted: {before:?} -> {after:?}"
    );
    let m_after = metrics("node-1")?;
    let labels = [
        ("reporter", "destination"),
        ("destination_workload", "peer-1"),
    ];
    let m = "istio_tcp_connections_opened_total";
    ensure!(
        sample_sum(&m_after, m, &labels) - sample_sum(&m_before, m, &labels) >= 2.0,
        "inbound connections not reported by node-1's proxy"
    );
    Ok(())
}

/// HTTP status and body of a GET from a pod (0: no answer).
fn curl(pod: &str, url: &str) -> Result<(u16, String)> {
    probe::curl_text(pod, &[url])
}

fn admin_port_gives_pods_only_metrics() -> Result<()> {
    // A pod of any tenant, meshed or not, reaching the node's address: Prometheus's view, and
    // nothing of the mesh's inventory.
    for pod in ["mesh/client-1", "plain/client-p"] {
        for node in ["172.31.0.11", "172.31.0.12"] {
            let (status, body) = curl(pod, &format!("http://{node}:15020/metrics"))?;
            ensure!(
                status == 200 && body.contains("weft_config_version"),
                "{pod}: /metrics of {node} answered {status}"
            );
            for path in [
                "/debug/config",
                "/",
                "/debug/config?x=1",
                "//debug/config",
                "/debug/status",
                "/debug/routes",
                "/debug/clusters",
                "/debug/endpoints",
                "/debug/policies",
                "/debug/explain?from=mesh/client-1&url=http://peer-1/",
            ] {
                let (status, body) = curl(pod, &format!("http://{node}:15020{path}"))?;
                ensure!(
                    status == 403 && !body.contains("serviceAccount"),
                    "{pod}: {path} of {node} answered {status}: {body}"
                );
            }
        }
    }
    // On the node's loopback the full admin answers (what the cluster's tools use).
    let config = probe::run(
        "node/node-1",
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://127.0.0.1:15020/debug/config",
        ],
    )?;
    ensure!(
        config.contains("\"resources\""),
        "the node's loopback did not get /debug/config: {config}"
    );
    Ok(())
}

/// kubelet's probes are answered while a node parses and compiles large resources (32,000
/// routes, seconds of work): the health server has a thread of its own.
fn health_is_served_while_a_large_resource_is_applied() -> Result<()> {
    // Four VirtualServices of 8,000 routes (Weft accepts up to 10,000 per resource).
    let mut yaml = String::new();
    for k in 0..4 {
        yaml += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: large-{k}, namespace: mesh}}\nspec:\n  hosts: [large-{k}.example.test]\n  http:\n"
        );
        for i in 0..8_000 {
            yaml += &format!(
                "  - match: [{{uri: {{exact: /p{i}}}}}]\n    route: [{{destination: {{host: peer-1}}}}]\n"
            );
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = probe::run(
                    "node/node-1",
                    &[
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "1",
                        "http://127.0.0.1:15021/healthz",
                    ],
                );
                match out {
                    Ok(code) if code.trim() == "200" => answered += 1,
                    other => failed.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (answered, failed)
        })
    };
    let started = Instant::now();
    let applied = probe::apply_yaml(&yaml);
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failed) = poller.join().map_err(|_| anyhow!("the poller panicked"))?;
    let dir = tempfile_dir()?;
    let path = dir.join("large.yaml");
    fs::write(&path, &yaml)?;
    let removed = cluster::delete(&path);
    let _ = fs::remove_dir_all(&dir);
    applied?;
    removed?;
    println!(
        "    applied in {took:.1?}; /healthz answered {answered} times, failed {}",
        failed.len()
    );
    ensure!(
        failed.is_empty() && answered > 0,
        "/healthz did not answer while the resource was applied: {failed:?}"
    );
    Ok(())
}

fn proxy_down_fails_closed_and_recovers() -> Result<()> {
    cluster::stop_node("node-1")?;
    let err = dial_fails("mesh/client-1", "peer-1:80")?;
    println!("    meshed client with proxy down: {}", err.trim());
    dial_fails("plain/client-p", "peer-1.mesh:80")?;
    // Unmeshed traffic is not affected by the proxy's absence.
    let client_ip = pod_ip("plain/client-p")?;
    ensure!(dial("plain/client-p", "peer-p:80")?.server_saw == client_ip);

    cluster::start_node("node-1")?;
    ensure!(dial("mesh/client-1", "peer-1:80")?.server_saw == PROXY_1);
    ensure!(dial("mesh/client-1", "peer-2:80")?.server_saw == PROXY_2);
    ensure!(dial("plain/client-p", "peer-1.mesh:80")?.server_saw == PROXY_1);
    Ok(())
}

/// A steady client, as applications would call: for each target, one process opening a new
/// HTTP/1.1 connection per request and one keeping a connection alive (Python's `http.client`,
/// which reconnects only when a response says `Connection: close`), and one gRPC channel
/// (grpcio: one HTTP/2 connection, replaced when its server sends GOAWAY), each at 200
/// requests/s. Prints `ready` once every stream has answers, runs until its stdin closes, then
/// prints one JSON object: per stream the answers, the failures and the longest gap between two
/// answers.
const STEADY_CLIENT: &str = r#"
import http.client, json, multiprocessing, os, sys, time

os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
RATE = 200

def run(name, host, kind, stop, out):
    s = {"ok": 0, "failed": [], "gap_ms": 0.0}
    conn = call = None
    if kind == "grpc":
        import grpc
        channel = grpc.insecure_channel(host, options=[("grpc.enable_http_proxy", 0)])
        call = channel.unary_unary("/weft.demo.Echo/Hello")
    last = None
    announced = False
    due = time.monotonic()
    while not stop.is_set():
        try:
            if kind == "grpc":
                call(b"hi", timeout=5)
            else:
                if conn is None:
                    conn = http.client.HTTPConnection(host, timeout=5)
                conn.request("GET", "/status/200",
                             headers={} if kind == "keep-alive" else {"Connection": "close"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
                if kind != "keep-alive":
                    conn.close()
                    conn = None
            s["ok"] += 1
            now = time.monotonic()
            if last is not None:
                s["gap_ms"] = max(s["gap_ms"], (now - last) * 1000)
            last = now
        except Exception as e:
            s["failed"].append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}")
            if conn is not None:
                conn.close()
            conn = None
        if s["ok"] == 20 and not announced:
            announced = True
            out.put((name, None))
        due += 1 / RATE
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            due = time.monotonic()
    out.put((name, s))

if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    stop, out = multiprocessing.Event(), multiprocessing.Queue()
    streams = []
    for host in sys.argv[1:]:
        for kind in ("new connection per request", "keep-alive", "grpc"):
            target = host.replace(":80", ":9090") if kind == "grpc" else host
            name = f"{target} {kind}"
            p = multiprocessing.Process(target=run, args=(name, target, kind, stop, out),
                                        daemon=True)
            p.start()
            streams.append(p)
    for _ in streams:
        out.get(timeout=60)
    print("ready", flush=True)
    sys.stdin.read()
    stop.set()
    report = dict(out.get(timeout=60) for _ in streams)
    print(json.dumps(report), flush=True)
"#;

/// Restarts every node's mesh-node in turn (a handover each), then upgrades both to another
/// build, while a client sends 200 requests/s per stream (HTTP/1.1 with a new connection per
/// request, HTTP/1.1 keep-alive, gRPC) to a pod of its own node and one of the other node: not
/// one request may fail.
fn restarts_and_upgrades_fail_no_request() -> Result<()> {
    use std::io::{BufRead as _, BufReader, Read as _};

    let upgrade = cluster::other_build()?;
    let python = xtask::setup::test_python().display().to_string();
    let mut client = cluster::spawn(
        "mesh/client-1",
        &args(&[python.as_str(), "-c", STEADY_CLIENT, "web-1:80", "web-2:80"]),
    )?;
    let mut stdout = BufReader::new(client.stdout.take().context("client stdout")?);
    // Read apart, so that a chatty client cannot block on a full pipe.
    let mut stderr = client.stderr.take().context("client stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let steps = (|| -> Result<Vec<String>> {
        ensure!(line.trim() == "ready", "the client did not start: {line:?}");
        let mut done = Vec::new();
        let mut restart = |node: &str, binary: Option<&std::path::Path>| -> Result<()> {
            std::thread::sleep(Duration::from_secs(1));
            let before = cluster::pids(&format!("node/{node}"))?;
            hand_over(node, binary)?;
            let after = cluster::pids(&format!("node/{node}"))?;
            ensure!(
                after.len() == 1 && !before.contains(&after[0]),
                "{node}: mesh-node {before:?} was not replaced: now {after:?}"
            );
            let exe = fs::read_link(format!("/proc/{}/exe", after[0]))?;
            done.push(format!(
                "{node}: {before:?} -> {after:?} ({})",
                exe.display()
            ));
            Ok(())
        };
        restart("node-1", None)?;
        restart("node-2", None)?;
        restart("node-1", Some(&upgrade))?;
        restart("node-2", Some(&upgrade))?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(done)
    })();
    drop(client.stdin.take());
    let mut report = String::new();
    stdout.read_to_string(&mut report)?;
    let _ = client.wait();
    let errors = errors.join().unwrap_or_default();
    let steps = steps.with_context(|| format!("the client's errors: {errors}"))?;
    for step in &steps {
        println!("    restarted {step}");
    }
    let streams: serde_json::Value = serde_json::from_str(report.trim())
        .with_context(|| format!("the client's report: {report:?}; its errors: {errors}"))?;
    let streams = streams.as_object().context("streams")?;
    ensure!(streams.len() == 6, "expected six streams: {streams:?}");
    let mut failures = Vec::new();
    for (name, s) in streams {
        let ok = s["ok"].as_u64().unwrap_or(0);
        let failed = s["failed"].as_array().cloned().unwrap_or_default();
        println!(
            "    {name}: {ok} answered, {} failed, longest gap {:.0} ms",
            failed.len(),
            s["gap_ms"].as_f64().unwrap_or(0.0)
        );
        // 200/s through at least the 5 s of pauses around the restarts.
        if ok < 500 || !failed.is_empty() {
            failures.push(format!("{name}: {ok} answered, failed: {failed:?}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "requests failed across restarts: {failures:#?}"
    );
    // Each node's log holds every mesh-node it ran: two restarts each, two takeovers.
    for node in ["node-1", "node-2"] {
        let log = fs::read_to_string(cluster::log_path(&format!("node/{node}"))?)?;
        let takeovers = log
            .matches("took the listening sockets over from the previous mesh-node")
            .count();
        ensure!(
            takeovers >= 2,
            "{node}'s mesh-nodes took the sockets over {takeovers} times, not at each restart"
        );
    }
    Ok(())
}

/// An echo conversation on one TCP connection, as a database client's: every 10 ms a chunk of
/// numbered bytes goes out and must come back exactly. Prints `ready` after the first round
/// trips, runs until stdin closes, then one JSON line: bytes echoed, and the first error or
/// mismatch.
const ECHO_CONVERSATION: &str = r#"
import json, socket, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
if sys.argv[2:] == ["websocket"]:
    # The conversation runs over the connection a WebSocket upgrade leaves.
    s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
              "Upgrade: websocket\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        more = s.recv(1)
        if not more:
            raise SystemExit(f"closed before the upgrade: {head!r}")
        head += more
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise SystemExit(f"the upgrade was answered {head!r}")
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
echoed, error, n = 0, None, 0
while not stop.is_set() and error is None:
    chunk = bytes((n * 7 + i) % 251 for i in range(1000 + n % 500))
    n += 1
    try:
        s.sendall(chunk)
        got = b""
        while len(got) < len(chunk):
            more = s.recv(len(chunk) - len(got))
            if not more:
                raise ConnectionError("closed by the other end")
            got += more
        if got != chunk:
            error = f"round {n}: {len(chunk)} bytes sent, different bytes back"
        echoed += len(chunk)
    except Exception as e:
        error = f"round {n}: {type(e).__name__}: {e}"
    if n == 20:
        print("ready", flush=True)
    time.sleep(0.01)
print(json.dumps({"echoed": echoed, "rounds": n, "error": error}), flush=True)
"#;

/// Replaces `node`'s mesh-node with a handover: by the cluster's build, or by `build` (an
/// upgrade).
fn hand_over(node: &str, build: Option<&std::path::Path>) -> Result<()> {
    match build {
        Some(b) => std::env::set_var(cluster::MESH_NODE_ENV, b),
        None => std::env::remove_var(cluster::MESH_NODE_ENV),
    }
    let restarted = cluster::restart_node(node, cluster::Restart::Handover);
    std::env::remove_var(cluster::MESH_NODE_ENV);
    restarted
}

/// A TCP connection between two pods of one node stays open, byte for byte, while that node's
/// mesh-node is restarted twice: the relay's two sockets go to the next mesh-node.
fn an_open_connection_survives_restarts_of_its_node() -> Result<()> {
    let restarts = [("node-1", None), ("node-1", None)];
    echo_through_restarts(&["echo-1:7000"], &restarts)
}

/// A WebSocket connection between two pods of one node (the node proxy serves the upgrade as
/// HTTP, then joins both sides) stays open, byte for byte, while that node's mesh-node is
/// restarted and upgraded to another build: its two sockets go to the next mesh-node.
fn an_upgraded_connection_survives_restarts_of_its_node() -> Result<()> {
    let other = cluster::other_build()?;
    let restarts = [("node-1", None), ("node-1", Some(other.as_path()))];
    echo_through_restarts(&["web-1:80", "websocket"], &restarts)
}

/// A TCP connection from a pod of node-1 to one of node-2 stays open, byte for byte, while
/// each node's mesh-node is restarted, and then upgraded to another build: the two node
/// proxies pause the HBONE stream between them and the source resumes it on a new one.
fn an_open_connection_across_nodes_survives_restarts_of_both_nodes() -> Result<()> {
    let other = cluster::other_build()?;
    let restarts = [
        ("node-1", None),
        ("node-2", None),
        ("node-2", Some(other.as_path())),
        ("node-1", Some(other.as_path())),
    ];
    echo_through_restarts(&["echo-2:7000"], &restarts)
}

/// The echo conversation from client-1 to a server (`conversation`: its address, and
/// `websocket` to upgrade first) through the restarts (each node's mesh-node replaced by the
/// cluster's build, or by the build given: an upgrade), a second apart.
fn echo_through_restarts(
    conversation: &[&str],
    restarts: &[(&str, Option<&std::path::Path>)],
) -> Result<()> {
    use std::io::{BufRead as _, BufReader, Read as _};

    let server = conversation[0];
    let mut argv = vec!["python3", "-c", ECHO_CONVERSATION];
    argv.extend_from_slice(conversation);
    let mut client = cluster::spawn("mesh/client-1", &args(&argv))?;
    let mut stdout = BufReader::new(client.stdout.take().context("client stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let restarted = (|| -> Result<()> {
        ensure!(
            line.trim() == "ready",
            "the conversation did not start: {line:?}"
        );
        for (node, build) in restarts {
            std::thread::sleep(Duration::from_secs(1));
            hand_over(node, *build)?;
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    })();
    drop(client.stdin.take());
    let mut report = String::new();
    stdout.read_to_string(&mut report)?;
    let mut errors = String::new();
    if let Some(mut e) = client.stderr.take() {
        let _ = e.read_to_string(&mut errors);
    }
    let _ = client.wait();
    restarted?;
    let report: serde_json::Value = serde_json::from_str(report.trim())
        .with_context(|| format!("the conversation's report: {report:?}; errors: {errors}"))?;
    let nodes: Vec<&str> = restarts.iter().map(|(node, _)| *node).collect();
    println!(
        "    {} bytes echoed over {} rounds with {server} through restarts of {}",
        report["echoed"],
        report["rounds"],
        nodes.join(", ")
    );
    ensure!(
        report["error"].is_null(),
        "the connection did not survive: {}",
        report["error"]
    );
    Ok(())
}

/// Two pods created on node-2 while its mesh-node is stopped: one of a meshed namespace, one
/// of an unmeshed one.
const PODS_WHILE_STOPPED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: new-m, namespace: mesh, labels: {app: new-m}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: new-p, namespace: plain, labels: {app: new-p}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [sleep, infinity]}]
"#;

/// The container runtime calls weft-cni for every pod: with its node's mesh-node stopped, a
/// pod of a meshed namespace does not start (so it cannot connect anywhere) while one of an
/// unmeshed namespace does; once mesh-node is back the first starts, meshed, with no restart
/// by hand. A runtime that pairs a pod with another pod's network namespace is refused.
fn pods_wait_for_their_node_to_enroll_them() -> Result<()> {
    let dir = tempfile_dir()?;
    let path = dir.join("pods.yaml");
    fs::write(&path, PODS_WHILE_STOPPED)?;
    cluster::stop_node("node-2")?;
    let applying = std::thread::spawn({
        let path = path.clone();
        move || cluster::apply(&path)
    });
    let checked = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster::pids("plain/new-p").unwrap_or_default().is_empty() {
            ensure!(
                Instant::now() < deadline,
                "the unmeshed namespace's pod did not start while node-2's mesh-node was stopped"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(3));
        ensure!(
            cluster::pids("mesh/new-m")?.is_empty(),
            "a meshed pod started while its node's mesh-node was stopped"
        );
        println!("    node-2 stopped: plain/new-p runs, mesh/new-m waits for its network");
        Ok(())
    })();
    let started = cluster::start_node("node-2");
    let applied = applying
        .join()
        .map_err(|_| anyhow!("applying the pods panicked"))?;
    checked?;
    started?;
    applied?;
    ensure!(
        !cluster::pids("mesh/new-m")?.is_empty(),
        "mesh/new-m did not start"
    );
    // Meshed: its connection across nodes reaches peer-1 from node-1's proxy.
    let dial = dial("mesh/new-m", "peer-1:80")?;
    ensure!(
        dial.server_saw == PROXY_1,
        "mesh/new-m is not meshed: peer-1 saw {}",
        dial.server_saw
    );
    println!("    node-2 back: mesh/new-m started, meshed (peer-1 saw {PROXY_1})");
    // The wrong network namespace for the pod's address.
    let out = cluster::cni_add_with_netns_of("mesh/new-m", "plain/client-p2")?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && answer.contains("\"code\":100"),
        "weft-cni accepted another pod's network namespace: {answer}"
    );
    println!("    paired with another pod's network namespace: refused");
    cluster::delete(&path)?;
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// A crashed mesh-node (SIGKILL) is replaced, and traffic flows again.
fn a_killed_node_proxy_is_replaced() -> Result<()> {
    cluster::restart_node("node-1", cluster::Restart::Kill)?;
    ensure!(dial("mesh/client-1", "peer-1:80")?.server_saw == PROXY_1);
    ensure!(dial("mesh/client-1", "peer-2:80")?.server_saw == PROXY_2);
    Ok(())
}

fn main() {
    let cases: &[probe::Case] = &[
        (
            "meshed_pod_reaches_service_vip_through_its_node_proxy",
            meshed_pod_reaches_service_vip_through_its_node_proxy,
        ),
        (
            "cross_node_goes_through_both_node_proxies",
            cross_node_goes_through_both_node_proxies,
        ),
        (
            "unlabelled_namespace_is_untouched",
            unlabelled_namespace_is_untouched,
        ),
        (
            "labelling_at_runtime_captures_and_releases",
            labelling_at_runtime_captures_and_releases,
        ),
        (
            "fast_path_is_used_and_byte_exact",
            fast_path_is_used_and_byte_exact,
        ),
        (
            "plaintext_to_meshed_pod_is_captured_inbound",
            plaintext_to_meshed_pod_is_captured_inbound,
        ),
        (
            "sidecar_mode_carries_traffic_through_both_sidecars",
            sidecar_mode_carries_traffic_through_both_sidecars,
        ),
        (
            "admin_port_gives_pods_only_metrics",
            admin_port_gives_pods_only_metrics,
        ),
        (
            "health_is_served_while_a_large_resource_is_applied",
            health_is_served_while_a_large_resource_is_applied,
        ),
        (
            "proxy_down_fails_closed_and_recovers",
            proxy_down_fails_closed_and_recovers,
        ),
        (
            "restarts_and_upgrades_fail_no_request",
            restarts_and_upgrades_fail_no_request,
        ),
        (
            "an_open_connection_survives_restarts_of_its_node",
            an_open_connection_survives_restarts_of_its_node,
        ),
        (
            "an_upgraded_connection_survives_restarts_of_its_node",
            an_upgraded_connection_survives_restarts_of_its_node,
        ),
        (
            "an_open_connection_across_nodes_survives_restarts_of_both_nodes",
            an_open_connection_across_nodes_survives_restarts_of_both_nodes,
        ),
        (
            "a_killed_node_proxy_is_replaced",
            a_killed_node_proxy_is_replaced,
        ),
        (
            "pods_wait_for_their_node_to_enroll_them",
            pods_wait_for_their_node_to_enroll_them,
        ),
    ];
    probe::run_suite("e2e", || probe::up_with(CLUSTER), cases)
}
