//! End-to-end tests of the node proxy's L7 routing, with third-party clients in a meshed pod:
//! curl (HTTP/1.1), h2load (h2c), grpcio (gRPC). The servers are `weft-demo http` pods on both
//! nodes of a virtual cluster (`examples/l7/workloads.yaml`), and every rule a case applies is
//! a file of `examples/l7/`, so what is tested is what a user can apply.
//!
//! The assertions are what Istio users rely on: who answered (the JSON echo names the pod and
//! version), status codes, timings, and the proxy's `istio_requests_total` with its
//! `response_code` and `response_flags` labels, read from the client's node (`reporter=
//! "source"`). Proportions are measured over enough requests to make the bounds safe.
//!
//! Same harness as `e2e.rs`: one cluster for every case, cases in order, each ok/FAILED, the
//! cluster torn down whatever happened, then a check that nothing was left behind. Needs root
//! and the tools of `cargo xtask setup`; without them it fails loudly instead of skipping.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use xtask::{
    cluster,
    probe::{self, curl_replies, grpc_calls, h2load, metrics, pod_ip, sample_sum, tally, Reply},
    workspace_root,
};

/// The pod every request starts from, and its node, whose proxy reports as the source.
const CLIENT: &str = "l7/client";
const CLIENT_NODE: &str = "node-1";

/// Node proxies' addresses: servers see the proxy of their own node as the peer.
fn proxy_of(pod: &str) -> &'static str {
    match pod {
        "echo-v1" | "od-1" => "10.244.1.1",
        _ => "10.244.2.1",
    }
}

fn example(file: &str) -> PathBuf {
    workspace_root().join("examples/l7").join(file)
}

/// `kubectl apply -f examples/l7/<file>`; returns once every node proxy applied it.
fn apply(file: &str) -> Result<()> {
    cluster::apply(&example(file)).with_context(|| format!("applying {file}"))
}

/// `kubectl delete -f examples/l7/<file>`.
fn remove(file: &str) -> Result<()> {
    cluster::delete(&example(file)).with_context(|| format!("deleting {file}"))
}

/// `n` requests from the client over one curl run (one keep-alive connection), `extra`
/// being curl arguments such as `-H` or `-X`.
fn requests(n: usize, url: &str, extra: &[&str]) -> Result<Vec<Reply>> {
    let url = match n {
        1 => url.to_owned(),
        // curl's URL globbing: one transfer per number, in order, on one connection.
        _ if url.contains('?') => format!("{url}&n=[1-{n}]"),
        _ => format!("{url}?n=[1-{n}]"),
    };
    let mut args = vec!["--max-time", "15"];
    args.extend_from_slice(extra);
    args.push(&url);
    let replies = curl_replies(CLIENT, &args)?;
    ensure!(
        replies.len() == n,
        "curl made {} transfers instead of {n}",
        replies.len()
    );
    Ok(replies)
}

fn with_header(name: &str, value: &str) -> String {
    format!("{name}: {value}")
}

fn versions(replies: &[Reply]) -> BTreeMap<String, usize> {
    tally(replies, |r| r.field("version").to_owned())
}

fn pods(replies: &[Reply]) -> BTreeMap<String, usize> {
    tally(replies, |r| r.field("pod").to_owned())
}

fn statuses(replies: &[Reply]) -> BTreeMap<u16, usize> {
    tally(replies, |r| r.status)
}

fn share(count: usize, total: usize) -> f64 {
    100.0 * count as f64 / total.max(1) as f64
}

fn all_ok(replies: &[Reply]) -> Result<()> {
    ensure!(
        replies.iter().all(|r| r.status == 200),
        "not every answer was 200: {:?}",
        statuses(replies)
    );
    Ok(())
}

/// `istio_requests_total` of the client's node proxy (`reporter="source"`) for requests to
/// Service `service` of namespace l7, restricted to `labels`.
fn requests_total(service: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let destination = format!("{service}.l7.svc.cluster.local");
    let mut all = vec![
        ("reporter", "source"),
        ("destination_service", destination.as_str()),
    ];
    all.extend_from_slice(labels);
    Ok(sample_sum(
        &metrics(CLIENT_NODE)?,
        "istio_requests_total",
        &all,
    ))
}

/// By how much `requests_total(service, labels)` grows while `action` runs.
fn counted<T>(
    service: &str,
    labels: &[(&str, &str)],
    action: impl FnOnce() -> Result<T>,
) -> Result<(T, f64)> {
    let before = requests_total(service, labels)?;
    let result = action()?;
    Ok((result, requests_total(service, labels)? - before))
}

/// HTTP/1.1 keep-alive through the mesh: curl opens one connection, the proxy routes each
/// request on its own (both pods answer over that one connection, which an L4 proxy cannot
/// do), each server sees its node's proxy as the peer, and every request is counted.
fn http1_keep_alive_balances_each_request() -> Result<()> {
    let (replies, counted) = counted("echo", &[("response_code", "200")], || {
        requests(20, "http://echo/get", &[])
    })?;
    all_ok(&replies)?;
    let connections: u32 = replies.iter().map(|r| r.connects).sum();
    println!(
        "    20 requests on {connections} connection(s): {:?}",
        pods(&replies)
    );
    ensure!(connections == 1, "curl opened {connections} connections");
    ensure!(
        pods(&replies).len() == 2,
        "one connection reached only {:?}: requests are not balanced one by one",
        pods(&replies)
    );
    for r in &replies {
        let peer = r.field("peer");
        let expected = proxy_of(r.field("pod"));
        ensure!(
            peer.split(':').next() == Some(expected),
            "{} saw {peer} instead of its node proxy {expected}",
            r.field("pod")
        );
        ensure!(
            r.field("protocol") == "HTTP/1.1",
            "an `http` port is HTTP/1.1 upstream, the server saw {}",
            r.field("protocol")
        );
    }
    ensure!(
        counted >= 20.0,
        "istio_requests_total{{response_code=\"200\"}} grew by {counted}"
    );
    Ok(())
}

/// A port with neither name nor appProtocol: the proxy recognises HTTP by sniffing and
/// treats it as HTTP (requests counted one by one).
fn sniffed_port_is_handled_as_http() -> Result<()> {
    let (replies, counted) = counted("echo-sniffed", &[("response_code", "200")], || {
        requests(5, "http://echo-sniffed/get", &[])
    })?;
    all_ok(&replies)?;
    println!("    5 requests, istio_requests_total +{counted}");
    ensure!(
        counted >= 5.0,
        "sniffed HTTP requests not counted: +{counted}"
    );
    Ok(())
}

/// `Connection: upgrade` passes through the L7 proxy: 101, then raw bytes both ways.
fn upgrade_passes_through() -> Result<()> {
    const SCRIPT: &str = r#"
import socket, sys
s = socket.create_connection(("echo", 80), timeout=5)
s.sendall(b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(1)
    if not chunk:
        break
    head += chunk
print(head.split(b"\r\n")[0].decode())
def echo(message):
    s.sendall(message)
    got = b""
    while len(got) < len(message):
        chunk = s.recv(64)
        if not chunk:
            break
        got += chunk
    return got.decode()
print(echo(b"raw bytes after the upgrade"))
# Past the suite's 3 s header-read timeout: a tunnel is no slow request head.
import time
time.sleep(4)
print(echo(b"still open"))
"#;
    let python = xtask::setup::test_python().display().to_string();
    let out = probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT])?;
    let mut lines = out.lines();
    let (status, echo) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let later = lines.next().unwrap_or("");
    println!("    {status}; echoed {echo:?}, 4 s later {later:?}");
    ensure!(status.contains(" 101 "), "upgrade answered {status:?}");
    ensure!(echo == "raw bytes after the upgrade", "echo was {echo:?}");
    ensure!(
        later == "still open",
        "after 4 s the tunnel echoed {later:?}"
    );
    Ok(())
}

/// Across nodes the destination's proxy reports each request of a keep-alive connection
/// exactly, whatever its framing: Python's `http.client` sends a GET, a POST with a length, a
/// chunked POST, a HEAD and a request answered `204` over one connection to `echo-v2`
/// (node-2); each answer is whole, and node-2's `reporter="destination"` counters grow by
/// exactly those five requests and their body bytes.
fn destination_reports_every_framing_exactly() -> Result<()> {
    const SCRIPT: &str = r#"
import http.client, json
c = http.client.HTTPConnection("echo", 80, timeout=10)
def call(method, path, body=None, headers={}, chunked=False):
    c.request(method, path, body=body, headers=headers, encode_chunked=chunked)
    r = c.getresponse()
    data = r.read()
    sent = json.loads(data).get("body", "") if data and r.status == 200 else ""
    print(r.status, len(data), len(sent), r.getheader("x-weft-version"))
call("GET", "/get")
call("POST", "/post", body=b"a" * 1000)
call("POST", "/post", body=iter([b"b" * 500, b"c" * 700, b"d" * 300]), chunked=True,
     headers={"Transfer-Encoding": "chunked"})
call("HEAD", "/get")
call("GET", "/status/204")
"#;
    const NODE: &str = "node-2";
    let destination = [
        ("reporter", "destination"),
        ("destination_service", "echo.l7.svc.cluster.local"),
    ];
    let totals = || -> Result<[f64; 3]> {
        let text = metrics(NODE)?;
        Ok([
            sample_sum(&text, "istio_requests_total", &destination),
            sample_sum(&text, "istio_request_bytes_sum", &destination),
            sample_sum(&text, "istio_response_bytes_sum", &destination),
        ])
    };
    apply("virtual-service-echo-all-v2.yaml")?;
    let result = (|| {
        let before = totals()?;
        let python = xtask::setup::test_python().display().to_string();
        let out = probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT])?;
        let after = totals()?;
        let answers: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        println!("    status, body bytes, echoed request bytes, version: {answers:?}");
        ensure!(
            answers.len() == 5 && answers.iter().all(|a| a.len() == 4),
            "five answers expected, got {out:?}"
        );
        let column = |i: usize| answers.iter().map(|a| a[i]).collect::<Vec<_>>();
        ensure!(
            column(0) == ["200", "200", "200", "200", "204"],
            "statuses {:?}",
            column(0)
        );
        ensure!(
            column(2) == ["0", "1000", "1500", "0", "0"],
            "the server received request bodies of {:?} bytes",
            column(2)
        );
        ensure!(
            answers.iter().all(|a| a.get(3) == Some(&"v2")),
            "not all answered by echo-v2: {answers:?}"
        );
        let response_bytes: f64 = column(1)
            .iter()
            .map(|n| n.parse::<f64>().unwrap_or(0.0))
            .sum();
        let grown = [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
        ];
        println!("    node-2 destination report grew by {grown:?}");
        ensure!(
            grown[0] == 5.0,
            "{} requests reported instead of 5",
            grown[0]
        );
        ensure!(
            grown[1] == 2500.0,
            "{} request body bytes reported instead of 2500",
            grown[1]
        );
        ensure!(
            grown[2] == response_bytes,
            "{} response body bytes reported, the client read {response_bytes}",
            grown[2]
        );
        Ok(())
    })();
    remove("virtual-service-echo-all-v2.yaml")?;
    result
}

/// A client that gives up on a slow request across nodes cancels it at the destination too:
/// node-2 reports it at once as `0 DC` (Envoy's "downstream disconnected"), while the pod is
/// still working, rather than when the pod answers.
fn abandoned_requests_are_cancelled_at_the_destination() -> Result<()> {
    const NODE: &str = "node-2";
    let abandoned = [
        ("reporter", "destination"),
        ("destination_service", "echo.l7.svc.cluster.local"),
        ("response_code", "0"),
        ("response_flags", "DC"),
    ];
    apply("virtual-service-echo-all-v2.yaml")?;
    let result = (|| {
        let before = sample_sum(&metrics(NODE)?, "istio_requests_total", &abandoned);
        let started = Instant::now();
        // curl gives up after 1 s; the pod would answer after 4.
        let replies = curl_replies(CLIENT, &["--max-time", "1", "http://echo/delay/4000"]);
        ensure!(
            replies.is_err()
                || replies
                    .as_ref()
                    .is_ok_and(|r| r.iter().all(|r| r.status == 0)),
            "the slow request was answered: {replies:?}"
        );
        // Reported while the pod still works on it.
        let reported = loop {
            let now = sample_sum(&metrics(NODE)?, "istio_requests_total", &abandoned);
            if now > before || started.elapsed() > Duration::from_millis(3500) {
                break now - before;
            }
            thread::sleep(Duration::from_millis(100));
        };
        println!(
            "    0 DC reported by node-2 {:.1} s after the request: +{reported}",
            started.elapsed().as_secs_f64()
        );
        ensure!(
            reported == 1.0 && started.elapsed() < Duration::from_millis(3500),
            "node-2 did not report the abandoned request before the pod answered (+{reported})"
        );
        Ok(())
    })();
    remove("virtual-service-echo-all-v2.yaml")?;
    result
}

/// A meshed pod that dials `echo-v2` by its address reaches node-2's proxy as bytes in the
/// tunnel, and node-2 reads them as HTTP for the pod's `http` port. A chunked body whose
/// trailer section ends with a bare LF, followed by a request carrying a forged
/// `x-forwarded-client-cert`, must not become a second request the pod serves with that
/// identity: the pod never sees the forged certificate.
fn smuggled_requests_never_reach_the_pod() -> Result<()> {
    const SCRIPT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
s.sendall(b"POST /post HTTP/1.1\r\nHost: echo\r\nx-request-id: smuggle-1\r\n"
          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\n"
          b"GET /get HTTP/1.1\r\nHost: echo\r\nx-request-id: smuggle-2\r\n"
          b"x-forwarded-client-cert: By=spiffe://x;URI=spiffe://cluster.local/ns/prod/sa/admin\r\n\r\n")
got = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
except socket.timeout:
    print("TIMEOUT")
print(got.decode(errors="replace"))
"#;
    let ip = pod_ip("l7/echo-v2")?;
    let python = xtask::setup::test_python().display().to_string();
    let out = probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT, ip.as_str()])?;
    let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
    println!("    answers: {statuses:?}");
    ensure!(
        !out.contains("sa/admin"),
        "the pod served a request with the forged identity:\n{out}"
    );
    ensure!(!out.starts_with("TIMEOUT"), "the connection hung:\n{out}");
    ensure!(
        statuses
            .first()
            .is_some_and(|s| s.starts_with("HTTP/1.1 400")),
        "the malformed body was answered {statuses:?}"
    );
    Ok(())
}

/// h2c with prior knowledge: 2000 requests over 4 connections, 10 streams each, all 2xx;
/// an `http2` port keeps HTTP/2 to the server, an `http` port accepts h2c and speaks
/// HTTP/1.1 to it.
fn h2c_load_through_the_mesh() -> Result<()> {
    remove("virtual-service-echo-all-v1.yaml")?;
    let report = h2load(
        CLIENT,
        &["-n", "2000", "-c", "4", "-m", "10", "http://echo:81/get"],
    )?;
    println!("    h2load: {report:?}");
    ensure!(
        report.succeeded == 2000 && report.failed == 0 && report.errored == 0,
        "h2load: {report:?}"
    );
    ensure!(report.classes[0] == 2000, "not all 2xx: {report:?}");
    for (url, upstream) in [
        ("http://echo:81/get", "HTTP/2"),
        ("http://echo:80/get", "HTTP/1.1"),
    ] {
        let reply = requests(1, url, &["--http2-prior-knowledge"])?.remove(0);
        ensure!(reply.status == 200, "{url}: {}", reply.status);
        ensure!(
            reply.field("protocol") == upstream,
            "{url} over h2c reached the server as {} instead of {upstream}",
            reply.field("protocol")
        );
    }
    Ok(())
}

/// VirtualService weights 80/20 between subsets, over 2000 requests.
fn weights_split_requests_80_20() -> Result<()> {
    apply("virtual-service-echo-80-20.yaml")?;
    let replies = requests(2000, "http://echo/get", &[])?;
    all_ok(&replies)?;
    let v = versions(&replies);
    let v1 = share(v.get("v1").copied().unwrap_or(0), replies.len());
    println!("    {v:?}: v1 {v1:.1}%");
    ensure!(
        (77.0..=83.0).contains(&v1),
        "v1 got {v1:.1}%, expected 80 ± 3"
    );
    Ok(())
}

/// `end-user: jason` to v2, everyone else (another user too) to v1.
fn header_match_routes_jason_to_v2() -> Result<()> {
    apply("virtual-service-echo-jason-v2.yaml")?;
    let jason = with_header("end-user", "jason");
    for (who, extra, expected) in [
        ("jason", vec!["-H", jason.as_str()], "v2"),
        ("anonymous", vec![], "v1"),
        ("jasonx", vec!["-H", "end-user: jasonx"], "v1"),
    ] {
        let replies = requests(50, "http://echo/get", &extra)?;
        all_ok(&replies)?;
        let v = versions(&replies);
        println!("    {who}: {v:?}");
        ensure!(
            v.get(expected) == Some(&50),
            "{who} expected {expected} only, got {v:?}"
        );
    }
    Ok(())
}

/// A VirtualService whose only rule matches a header: other requests match no route and
/// get 404 with response flag NR.
fn unmatched_request_gets_404_nr() -> Result<()> {
    apply("virtual-service-echo-jason-only.yaml")?;
    let (replies, counted) = counted(
        "echo",
        &[("response_code", "404"), ("response_flags", "NR")],
        || requests(5, "http://echo/get", &[]),
    )?;
    println!("    no header: {:?}, NR +{counted}", statuses(&replies));
    ensure!(
        statuses(&replies).get(&404) == Some(&5),
        "{:?}",
        statuses(&replies)
    );
    ensure!(counted >= 5.0, "NR responses counted {counted}");
    let jason = requests(1, "http://echo/get", &["-H", "end-user: jason"])?.remove(0);
    ensure!(
        jason.status == 200 && jason.field("version") == "v2",
        "jason: {} {}",
        jason.status,
        jason.field("version")
    );
    Ok(())
}

/// URI prefix match with rewrite, redirect, and request/response header changes.
fn rewrite_redirect_and_header_changes() -> Result<()> {
    apply("virtual-service-echo-rewrite.yaml")?;
    let api = requests(
        1,
        "http://echo/api/items?q=1",
        &["-H", "x-secret: s3cret", "-H", "x-mesh: client"],
    )?
    .remove(0);
    let seen = &api.body["headers"];
    println!(
        "    /api/items?q=1 -> {} {}?{} on {}; request headers x-mesh={} x-added={} x-secret={}; response x-answered-by={:?} x-weft-pod={:?}",
        api.status,
        api.field("path"),
        api.field("query"),
        api.field("version"),
        seen["x-mesh"],
        seen["x-added"],
        seen["x-secret"],
        api.header("x-answered-by"),
        api.header("x-weft-pod"),
    );
    ensure!(api.status == 200, "/api/items answered {}", api.status);
    ensure!(
        api.field("path") == "/v1/items" && api.field("query") == "q=1",
        "rewrite: server saw {}?{}",
        api.field("path"),
        api.field("query")
    );
    ensure!(
        api.field("version") == "v1",
        "routed to {}",
        api.field("version")
    );
    ensure!(
        seen["x-mesh"] == "weft",
        "set: x-mesh is {}",
        seen["x-mesh"]
    );
    ensure!(
        seen["x-added"].as_str().is_some_and(|v| v.contains('1')),
        "add: x-added is {}",
        seen["x-added"]
    );
    ensure!(
        seen["x-secret"].is_null(),
        "remove: x-secret reached the server"
    );
    ensure!(
        api.header("x-answered-by") == Some("weft"),
        "response set: {:?}",
        api.headers
    );
    ensure!(
        api.header("x-weft-pod").is_none() && api.header("x-weft-version") == Some("v1"),
        "response remove: {:?}",
        api.headers
    );

    let old = requests(1, "http://echo/old/thing", &[])?.remove(0);
    println!(
        "    /old/thing -> {} Location {:?}",
        old.status,
        old.header("location")
    );
    ensure!(old.status == 301, "redirect answered {}", old.status);
    ensure!(
        old.header("location")
            .is_some_and(|l| l.ends_with("/new/place")),
        "Location: {:?}",
        old.header("location")
    );
    let other = requests(1, "http://echo/other", &[])?.remove(0);
    ensure!(
        other.field("version") == "v2" && other.field("path") == "/other",
        "default route: {} {}",
        other.field("version"),
        other.field("path")
    );
    Ok(())
}

/// A 3 s route timeout over a backend that takes 7 s: 504 after about 3 s, flag UT.
fn route_timeout_gives_504_ut() -> Result<()> {
    apply("virtual-service-echo-timeout.yaml")?;
    let (reply, counted) = counted(
        "echo",
        &[("response_code", "504"), ("response_flags", "UT")],
        || Ok(requests(1, "http://echo/delay/7000", &[])?.remove(0)),
    )?;
    println!(
        "    /delay/7000: {} after {:.2} s, UT +{counted}",
        reply.status, reply.seconds
    );
    ensure!(reply.status == 504, "answered {}", reply.status);
    ensure!(
        (2.5..=5.0).contains(&reply.seconds),
        "504 after {:.2} s, expected about 3",
        reply.seconds
    );
    ensure!(counted >= 1.0, "UT not counted");
    let fast = requests(1, "http://echo/delay/100", &[])?.remove(0);
    ensure!(
        fast.status == 200,
        "a request under the timeout got {}",
        fast.status
    );
    Ok(())
}

/// Abort fault on 50% of requests: 45–55% of 2000 get the fault's status, flag FI.
fn fault_abort_hits_half_the_requests() -> Result<()> {
    apply("virtual-service-echo-abort-50.yaml")?;
    let (replies, counted) = counted(
        "echo",
        &[("response_code", "500"), ("response_flags", "FI")],
        || requests(2000, "http://echo/get", &[]),
    )?;
    let s = statuses(&replies);
    let aborted = s.get(&500).copied().unwrap_or(0);
    let pct = share(aborted, replies.len());
    println!("    {s:?}: aborted {pct:.1}%, FI +{counted}");
    ensure!(
        (45.0..=55.0).contains(&pct),
        "aborted {pct:.1}%, expected 50 ± 5"
    );
    ensure!(
        aborted + s.get(&200).copied().unwrap_or(0) == replies.len(),
        "unexpected statuses {s:?}"
    );
    ensure!(
        (counted - aborted as f64).abs() <= 1.0 + aborted as f64 / 100.0,
        "FI counted {counted}, {aborted} aborted"
    );
    Ok(())
}

/// Delay fault on every request: each takes at least the 1 s delay, then succeeds; flag DI.
fn fault_delay_holds_every_request() -> Result<()> {
    apply("virtual-service-echo-delay-1s.yaml")?;
    let (replies, counted) = counted("echo", &[("response_flags", "DI")], || {
        requests(3, "http://echo/get", &[])
    })?;
    all_ok(&replies)?;
    let times: Vec<String> = replies
        .iter()
        .map(|r| format!("{:.2}", r.seconds))
        .collect();
    println!("    3 requests took {times:?} s, DI +{counted}");
    ensure!(
        replies.iter().all(|r| r.seconds >= 0.95),
        "a request was not delayed: {times:?}"
    );
    ensure!(counted >= 3.0, "DI counted {counted}");
    Ok(())
}

/// `flaky` answers 503 to one request in three. Istio's default policy retries 503 for
/// GETs (we never retry non-idempotent requests with the default policy, so POSTs fail);
/// `attempts: 0` shows the failures; `attempts: 3, retryOn: 5xx` hides them for every method.
fn retries_hide_a_flaky_backend() -> Result<()> {
    let failed = |replies: &[Reply]| {
        share(
            replies.iter().filter(|r| r.status != 200).count(),
            replies.len(),
        )
    };
    let post = ["-X", "POST", "-d", "payload"];

    let get = requests(300, "http://flaky/get", &[])?;
    let posts = requests(300, "http://flaky/post", &post)?;
    println!(
        "    default policy: GET {:?}, POST {:?}",
        statuses(&get),
        statuses(&posts)
    );
    ensure!(
        failed(&get) == 0.0,
        "default policy: GETs failed: {:?}",
        statuses(&get)
    );
    ensure!(
        (28.0..=38.0).contains(&failed(&posts)),
        "default policy: POSTs must not be retried, {:.1}% failed",
        failed(&posts)
    );

    apply("virtual-service-flaky-no-retries.yaml")?;
    let get = requests(300, "http://flaky/get", &[])?;
    println!("    attempts 0: GET {:?}", statuses(&get));
    ensure!(
        (28.0..=38.0).contains(&failed(&get)),
        "without retries {:.1}% failed, expected about 33",
        failed(&get)
    );

    apply("virtual-service-flaky-retries.yaml")?;
    let get = requests(300, "http://flaky/get", &[])?;
    let posts = requests(300, "http://flaky/post", &post)?;
    println!(
        "    attempts 3 on 5xx: GET {:?}, POST {:?}",
        statuses(&get),
        statuses(&posts)
    );
    all_ok(&get).context("GETs with retries configured")?;
    all_ok(&posts).context("POSTs with retries configured")?;
    ensure!(
        posts.iter().all(|r| r.body["body"] == "payload"),
        "a retried POST lost its body"
    );
    Ok(())
}

/// A DestinationRule allowing one connection, one pending request and one request per
/// connection, under 8 concurrent clients: some 503 with flag UO, some 200.
fn circuit_breaker_rejects_with_uo() -> Result<()> {
    apply("destination-rule-cb.yaml")?;
    let (report, counted) = counted(
        "cb",
        &[("response_code", "503"), ("response_flags", "UO")],
        || {
            h2load(
                CLIENT,
                &["--h1", "-n", "80", "-c", "8", "http://cb/delay/200"],
            )
        },
    )?;
    println!("    h2load --h1 -c 8: {report:?}; UO +{counted}");
    ensure!(report.classes[0] > 0, "nothing got through: {report:?}");
    ensure!(report.classes[3] > 0, "nothing was rejected: {report:?}");
    ensure!(counted >= 1.0, "no 503 with flag UO counted");
    ensure!(
        counted <= report.classes[3] as f64,
        "more UO than 5xx: {counted} > {}",
        report.classes[3]
    );
    let after = requests(1, "http://cb/get", &[])?.remove(0);
    ensure!(after.status == 200, "after the load: {}", after.status);
    Ok(())
}

/// POSTs an admin action to a pod's own address from its node's namespace: outside the
/// mesh, so the action reaches exactly that pod.
fn admin(pod: &str, node: &str, action: &str) -> Result<()> {
    let ip = cluster::pod_ip(&format!("l7/{pod}"))?;
    probe::run(
        &format!("node/{node}"),
        &[
            "curl",
            "-sf",
            "-X",
            "POST",
            &format!("http://{ip}:8080/admin/{action}"),
        ],
    )?;
    Ok(())
}

/// Outlier detection: od-1 starts failing, is ejected after a few errors while od-2 takes
/// every request, and is sent traffic again once mended and its 5 s ejection is over.
fn outlier_detection_ejects_and_readmits() -> Result<()> {
    apply("destination-rule-od.yaml")?;
    let replies = requests(20, "http://od/get", &[])?;
    all_ok(&replies)?;
    ensure!(
        pods(&replies).len() == 2,
        "both endpoints should serve: {:?}",
        pods(&replies)
    );

    admin("od-1", "node-1", "fail?status=500")?;
    let broke = Instant::now();
    let mut errors = 0;
    let ejected = loop {
        let batch = requests(10, "http://od/get", &[])?;
        errors += batch.iter().filter(|r| r.status != 200).count();
        if batch
            .iter()
            .all(|r| r.status == 200 && r.field("pod") == "od-2")
        {
            break Instant::now();
        }
        if broke.elapsed() > Duration::from_secs(5) {
            bail!("od-1 not ejected after 5 s and {errors} errors");
        }
    };
    println!(
        "    od-1 failing: ejected after {errors} errors, {:.1?}",
        ejected - broke
    );
    ensure!(errors >= 1, "od-1 was ejected before it failed");
    let replies = requests(40, "http://od/get", &[])?;
    ensure!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.field("pod") == "od-2"),
        "while od-1 is ejected: {:?} {:?}",
        statuses(&replies),
        pods(&replies)
    );

    admin("od-1", "node-1", "recover")?;
    let readmitted = loop {
        let batch = requests(10, "http://od/get", &[])?;
        all_ok(&batch)?;
        if batch.iter().any(|r| r.field("pod") == "od-1") {
            break ejected.elapsed();
        }
        if ejected.elapsed() > Duration::from_secs(15) {
            bail!("od-1 still ejected 15 s after its ejection (base ejection time 5 s)");
        }
        thread::sleep(Duration::from_millis(200));
    };
    println!("    od-1 mended: receives traffic again {readmitted:.1?} after its ejection");
    ensure!(
        readmitted >= Duration::from_secs(4),
        "readmitted after {readmitted:.1?}, before the 5 s base ejection time"
    );
    Ok(())
}

/// Consistent hash on `x-user`: each user sticks to one pod, users spread over both.
fn consistent_hash_sticks_users_to_pods() -> Result<()> {
    apply("destination-rule-sticky.yaml")?;
    let mut placement = BTreeMap::new();
    for user in 0..12 {
        let header = with_header("x-user", &format!("user-{user}"));
        let replies = requests(50, "http://sticky/get", &["-H", &header])?;
        all_ok(&replies)?;
        let seen = pods(&replies);
        ensure!(seen.len() == 1, "user-{user} reached {seen:?}");
        placement.insert(user, seen.into_keys().next().unwrap_or_default());
    }
    let used: BTreeSet<&String> = placement.values().collect();
    println!("    12 users x 50 requests: {placement:?}");
    ensure!(used.len() == 2, "every user hashed to {used:?}");
    Ok(())
}

/// A client socket of the IPv6 family dialling an IPv4-mapped address, as gRPC's C core
/// (grpcio, grpc++), Java and others do for every IPv4 target, is captured like an IPv4 one.
fn dual_stack_socket_reaches_the_service() -> Result<()> {
    const SCRIPT: &str = r#"
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(("::ffff:" + socket.gethostbyname("echo"), 80))
s.sendall(b"GET /get HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
answer = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    answer += chunk
print(answer.split(b"\r\n")[0].decode())
"#;
    let python = xtask::setup::test_python().display().to_string();
    let out = cluster::exec(CLIENT, &[python, "-c".into(), SCRIPT.into()])?;
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    println!("    AF_INET6 socket to ::ffff:<echo>:80: {status:?}");
    ensure!(
        out.status.success() && status.contains(" 200 "),
        "answered {status:?}: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
    );
    Ok(())
}

/// GRPCRoute by method (Hello to echo-v1, Slow to echo-v2) with the grpcio client.
fn grpc_route_by_method() -> Result<()> {
    remove("virtual-service-echo-all-v1.yaml")?;
    apply("grpcroute-echo-by-method.yaml")?;
    for (method, count, prefix) in [("Hello", 20, "v1:echo-v1:"), ("Slow", 5, "v2:echo-v2:")] {
        let calls = grpc_calls(CLIENT, "echo:9090", method, count, &[("delay-ms", "10")])?;
        let codes = tally(&calls, |c| c.code.clone());
        println!(
            "    {method} x{count}: {codes:?}, e.g. {:?}",
            calls[0].reply
        );
        if let Some(wrong) = calls
            .iter()
            .find(|c| c.code != "OK" || !c.reply.starts_with(prefix))
        {
            bail!("{method}: expected OK from {prefix}, got {codes:?}, e.g. {wrong:?}");
        }
    }
    remove("grpcroute-echo-by-method.yaml")?;
    Ok(())
}

/// An abort fault with `grpcStatus: UNAVAILABLE` reaches the gRPC client as that code.
fn grpc_abort_maps_to_status() -> Result<()> {
    apply("virtual-service-echo-grpc-abort.yaml")?;
    let labels = [("response_flags", "FI"), ("grpc_response_status", "14")];
    let (calls, counted) = counted("echo", &labels, || {
        grpc_calls(CLIENT, "echo:9090", "Hello", 5, &[])
    })?;
    let codes = tally(&calls, |c| c.code.clone());
    println!("    {codes:?}, FI +{counted}");
    ensure!(
        codes.get("UNAVAILABLE") == Some(&5),
        "expected UNAVAILABLE x5, got {codes:?}, e.g. {:?}",
        calls.first()
    );
    ensure!(counted >= 5.0, "FI counted {counted}");
    let http = requests(1, "http://echo/get", &[])?.remove(0);
    ensure!(
        http.status == 200,
        "the http port is not aborted: {}",
        http.status
    );
    Ok(())
}

/// A VirtualService change reaches new requests within 1 s, and a request in flight (on
/// the old route) completes.
fn config_change_spares_requests_in_flight() -> Result<()> {
    apply("virtual-service-echo-all-v1.yaml")?;
    let in_flight = thread::spawn(|| requests(1, "http://echo/delay/2000", &[]));
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    apply("virtual-service-echo-all-v2.yaml")?;
    let applied = start.elapsed();
    let took = loop {
        let reply = requests(1, "http://echo/get", &[])?.remove(0);
        if reply.field("version") == "v2" {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(1) {
            bail!(
                "new requests still reach {} 1 s after the change",
                reply.field("version")
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let old = in_flight
        .join()
        .map_err(|_| anyhow!("in-flight request panicked"))??
        .remove(0);
    println!(
        "    applied in {applied:.0?}, new requests on v2 after {took:.0?}; in-flight: {} from {} after {:.2} s",
        old.status,
        old.field("version"),
        old.seconds
    );
    ensure!(
        old.status == 200 && old.field("version") == "v1" && old.seconds >= 2.0,
        "the in-flight request: {} from {} after {:.2} s",
        old.status,
        old.field("version"),
        old.seconds
    );
    Ok(())
}

/// TCP route weights 50/50 between two Services, per connection.
fn tcp_route_splits_connections() -> Result<()> {
    apply("virtual-service-echo-tcp-50-50.yaml")?;
    // `Connection: close` makes curl open a new connection for every transfer.
    let replies = requests(200, "http://echo:7070/get", &["-H", "Connection: close"])?;
    all_ok(&replies)?;
    let connections: u32 = replies.iter().map(|r| r.connects).sum();
    let v = versions(&replies);
    let v1 = share(v.get("v1").copied().unwrap_or(0), replies.len());
    println!("    {connections} connections: {v:?}, v1 {v1:.1}%");
    ensure!(connections >= 190, "only {connections} connections");
    ensure!(
        (40.0..=60.0).contains(&v1),
        "v1 got {v1:.1}%, expected 50 ± 10"
    );
    Ok(())
}

/// The tools the cases run, checked before anything is built.
/// Envoy's client limits, with real clients: 99 headers pass both hops across nodes, 101 or
/// a 61 KiB head get 431 from the first, `Upgrade: h2c` is removed (curl's `--http2` on an
/// `http://` URL), invalid chunked framing is the client's error (400 `DPE`), and a head that
/// trickles in is cut off (the suite starts the nodes with a 3 s header-read timeout) while the
/// proxy goes on serving.
fn client_limits_hold_across_nodes() -> Result<()> {
    let mut many = Vec::new();
    for n in 0..96 {
        many.push("-H".to_string());
        many.push(format!("x-many-{n}: v"));
    }
    let args: Vec<&str> = many.iter().map(String::as_str).collect();
    // curl adds Host, User-Agent and Accept: 99 headers.
    let replies = requests(1, "http://echo-v2/", &args)?;
    ensure!(
        replies[0].status == 200 && replies[0].field("pod") == "echo-v2",
        "99 headers across nodes answered {} by {:?}",
        replies[0].status,
        replies[0].field("pod")
    );
    let mut more = many.clone();
    more.extend(["-H".to_string(), "x-one-too-many: v".to_string()]);
    more.extend(["-H".to_string(), "x-two-too-many: v".to_string()]);
    let args: Vec<&str> = more.iter().map(String::as_str).collect();
    let (replies, counted_431) = counted("echo-v2", &[("response_code", "431")], || {
        requests(1, "http://echo-v2/", &args)
    })?;
    ensure!(
        replies[0].status == 431 && counted_431 == 1.0,
        "101 headers answered {} (431s counted by the source: {counted_431})",
        replies[0].status
    );
    let big = format!("x-big: {}", "a".repeat(61 * 1024));
    let replies = requests(1, "http://echo-v2/", &["-H", &big])?;
    ensure!(
        replies[0].status == 431,
        "a 61 KiB head answered {}",
        replies[0].status
    );

    let replies = requests(1, "http://echo-v2/", &["--http2", "-v"])?;
    let seen = &replies[0].body["headers"];
    ensure!(
        replies[0].status == 200
            && seen.get("upgrade").is_none()
            && seen.get("http2-settings").is_none(),
        "an h2c upgrade reached the server: {} {seen}",
        replies[0].status
    );

    const SCRIPT: &str = r#"
import socket, sys, time
def exchange(data, wait):
    s = socket.create_connection(("echo-v2", 80), timeout=wait)
    s.sendall(data)
    out = b""
    start = time.monotonic()
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    except socket.timeout:
        return "timeout", out
    return "%.1f" % (time.monotonic() - start), out
took, out = exchange(b"POST / HTTP/1.1\r\nHost: echo-v2\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nzz\r\n", 10)
print(out.split(b"\r\n")[0].decode())
took, out = exchange(b"GET / HTTP/1.1\r\nHost: ech", 20)
print(took, len(out))
"#;
    let python = xtask::setup::test_python().display().to_string();
    let (out, dpe) = counted(
        "echo-v2",
        &[("response_code", "400"), ("response_flags", "DPE")],
        || probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT]),
    )?;
    let mut lines = out.lines();
    let (chunked, slow) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    println!(
        "    invalid chunked: {chunked:?} (400 DPE counted: {dpe}); slow head closed after {slow}"
    );
    ensure!(
        chunked.contains(" 400 ") && dpe == 1.0,
        "invalid chunked framing answered {chunked:?}, 400 DPE counted {dpe} times"
    );
    let closed_after: f64 = slow
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| anyhow!("the slow head was never cut off: {slow:?}"))?;
    ensure!(
        (3.0..15.0).contains(&closed_after),
        "the slow head was cut off after {closed_after} s, not after the 3 s timeout"
    );
    // Still serving.
    all_ok(&requests(5, "http://echo/", &[])?)
}

/// A DestinationRule's `tcp.idleTimeout` closes a TCP connection that went silent (a plain
/// socket on echo-v2's `tcp` port), not one that keeps talking.
fn tcp_idle_timeout_closes_silent_connections() -> Result<()> {
    apply("destination-rule-echo-v2-tcp-idle.yaml")?;
    const SCRIPT: &str = r#"
import socket, time
def talk(s):
    s.sendall(b"GET /get HTTP/1.1\r\nHost: echo-v2\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    head, body = head.split(b"\r\n\r\n", 1)
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += s.recv(4096)
busy = socket.create_connection(("echo-v2", 7070), timeout=20)
silent = socket.create_connection(("echo-v2", 7070), timeout=20)
talk(busy)
talk(silent)
start = time.monotonic()
# busy talks every second for 4 s, past the 2 s timeout.
for _ in range(4):
    time.sleep(1)
    talk(busy)
silent.settimeout(20)
closed = silent.recv(1) == b""
print("%s %.1f" % (closed, time.monotonic() - start))
talk(busy)
print("busy ok")
"#;
    let python = xtask::setup::test_python().display().to_string();
    let out = probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT]);
    remove("destination-rule-echo-v2-tcp-idle.yaml")?;
    let out = out?;
    println!("    {}", out.trim().replace('\n', "; "));
    let mut lines = out.lines();
    let silent = lines.next().unwrap_or("");
    let (closed, after) = silent.split_once(' ').unwrap_or(("", ""));
    let after: f64 = after.parse().unwrap_or(f64::NAN);
    ensure!(
        closed == "True" && (1.5..10.0).contains(&after),
        "the silent connection: {silent:?} (closed, seconds after the last exchange)"
    );
    ensure!(
        lines.next() == Some("busy ok"),
        "the busy connection was closed: {out}"
    );
    Ok(())
}

/// One pod holds at most its share: the suite starts the nodes with 200 connections and 64
/// requests in flight per client address. The 201st connection is closed at once, HTTP or
/// opaque TCP, requests over 64 in flight get 503 `UO`; all are counted, and the pod is
/// served again afterwards.
fn one_pod_holds_at_most_its_share() -> Result<()> {
    const SCRIPT: &str = r#"
import socket, sys
port = int(sys.argv[1])
conns = [socket.create_connection(("echo", port), timeout=10) for _ in range(230)]
answered = closed = 0
for c in conns:
    try:
        c.sendall(b"GET /get HTTP/1.1\r\nHost: echo\r\n\r\n")
        data = c.recv(12)
        if data.startswith(b"HTTP/1.1 200"):
            answered += 1
        else:
            closed += 1
    except OSError:
        closed += 1
print(answered, closed)
"#;
    let python = xtask::setup::test_python().display().to_string();
    let refused = |limit: &str| -> Result<f64> {
        Ok(sample_sum(
            &metrics(CLIENT_NODE)?,
            "weft_source_limit_refused_total",
            &[("limit", limit)],
        ))
    };
    // Port 80 is HTTP; 7070 is opaque TCP (its echo answers the same request).
    for port in ["80", "7070"] {
        // The previous round's connections are closed: their count is given back.
        thread::sleep(Duration::from_secs(1));
        let before = refused("connections")?;
        let out = probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT, port])?;
        let counts: Vec<u32> = out
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let refused_connections = refused("connections")? - before;
        println!(
            "    230 connections to port {port}: {out:?} answered/closed; {refused_connections} refused at accept"
        );
        ensure!(
            counts == [200, 30] && refused_connections == 30.0,
            "port {port}: expected 200 answered and 30 closed, got {counts:?} ({refused_connections} counted)"
        );
    }

    let before = refused("requests")?;
    let report = h2load(
        CLIENT,
        &[
            "-n",
            "300",
            "-c",
            "1",
            "-m",
            "100",
            "http://echo:81/delay/300",
        ],
    )?;
    let refused_requests = refused("requests")? - before;
    println!("    100 streams in flight: {report:?}; {refused_requests} refused");
    ensure!(
        report.classes[0] > 0 && report.classes[3] > 0 && refused_requests > 0.0,
        "expected some 2xx and some 503 UO over 64 in flight: {report:?}"
    );
    ensure!(
        report.classes[0] + report.classes[3] == 300,
        "every request is answered 2xx or 503: {report:?}"
    );
    all_ok(&requests(5, "http://echo/", &[])?)
}

/// An HTTP/2 client is told the stream limit (100 in this suite) and the header list size in
/// the proxy's SETTINGS; one that ignores them and opens a 101st stream gets it refused
/// (`RST_STREAM` `REFUSED_STREAM`) while the other 100 are answered.
fn http2_stream_limit_is_announced_and_held() -> Result<()> {
    const SCRIPT: &str = r#"
import json, socket
import hpack
import hyperframe.frame as f
s = socket.create_connection(("echo", 81), timeout=10)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + f.SettingsFrame(0).serialize())
enc = hpack.Encoder()
frames = b""
for i in range(101):
    headers = [(":method", "GET"), (":scheme", "http"), (":path", "/delay/1000"), (":authority", "echo:81")]
    frames += f.HeadersFrame(1 + 2 * i, data=enc.encode(headers), flags=["END_HEADERS", "END_STREAM"]).serialize()
s.sendall(frames)
settings, resets, answered, data = None, {}, set(), b""
while len(answered) + len(resets) < 101:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
    while len(data) >= 9:
        frame, length = f.Frame.parse_frame_header(memoryview(data[:9]))
        if len(data) < 9 + length:
            break
        frame.parse_body(memoryview(data[9:9 + length]))
        data = data[9 + length:]
        if isinstance(frame, f.SettingsFrame) and "ACK" not in frame.flags:
            settings = dict(frame.settings)
        elif isinstance(frame, f.RstStreamFrame):
            resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, f.HeadersFrame):
            answered.add(frame.stream_id)
print(json.dumps({"settings": settings, "resets": resets, "answered": len(answered)}))
"#;
    let python = xtask::setup::test_python().display().to_string();
    let out = probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT])?;
    println!("    {}", out.trim());
    let seen: serde_json::Value =
        serde_json::from_str(out.trim()).context("the script's report")?;
    // SETTINGS_MAX_CONCURRENT_STREAMS is 3, SETTINGS_MAX_HEADER_LIST_SIZE 6.
    ensure!(
        seen["settings"]["3"] == 100,
        "stream limit announced: {seen}"
    );
    ensure!(
        seen["settings"]["6"] == 60 * 1024 + 32 * 100,
        "header list size announced (60 KiB and 32 bytes per header): {seen}"
    );
    // Stream 201 is the 101st; REFUSED_STREAM is 7. The first 100 are answered (200, or
    // 503 UO past this suite's 64 requests in flight per pod).
    ensure!(
        seen["resets"]["201"] == 7 && seen["answered"] == 100,
        "the 101st stream refused, the others answered: {seen}"
    );
    all_ok(&requests(3, "http://echo:81/", &[])?)
}

/// One pod's bulk load across nodes (190 connections that each move 900 kB and stay open)
/// against node-2 restarted with a small memory limit: the overload manager steps in, the
/// kernel never kills the proxy, what the proxy measures stays under its limit, and once the
/// load ends requests through node-2 succeed again. node-2 gets its usual limit back afterwards.
fn overload_keeps_a_node_proxy_under_its_memory_limit() -> Result<()> {
    const LIMIT: u64 = 112 << 20;
    const SCRIPT: &str = r#"
import socket
body = b"b" * 900_000
conns = []
for _ in range(190):
    s = socket.create_connection(("echo-v2", 7070), timeout=20)
    s.sendall(b"POST /anything HTTP/1.1\r\nHost: echo-v2\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert len(rest) == length, (len(rest), length)
    conns.append(s)
print(len(conns))
"#;
    let restart = |limit: Option<u64>| -> Result<()> {
        cluster::stop_node("node-2")?;
        match limit {
            Some(bytes) => std::env::set_var(cluster::PROXY_MEMORY_ENV, bytes.to_string()),
            None => std::env::remove_var(cluster::PROXY_MEMORY_ENV),
        }
        let started = cluster::start_node("node-2");
        std::env::remove_var(cluster::PROXY_MEMORY_ENV);
        started
    };
    let kills = |memory: Option<cluster::ProxyMemory>| memory.map_or(0, |m| m.oom_kills);
    let kills_before = kills(cluster::proxy_memory("node-2")?);
    restart(Some(LIMIT))?;
    let result = (|| -> Result<()> {
        let pids = cluster::pids("node/node-2")?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            thread::spawn(move || {
                let (mut highest, mut used) = (0.0f64, 0.0f64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(text) = metrics("node-2") {
                        highest = highest.max(sample_sum(&text, "weft_overload_level", &[]));
                        used = used.max(sample_sum(&text, "weft_memory_used_bytes", &[]));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                (highest, used)
            })
        };
        let python = xtask::setup::test_python().display().to_string();
        let moved = probe::run(CLIENT, &[python.as_str(), "-c", SCRIPT]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (highest, used) = sampler
            .join()
            .map_err(|_| anyhow!("the sampler panicked"))?;
        let memory = cluster::proxy_memory("node-2")?
            .context("this machine has no memory cgroup controller to limit the proxy with")?;
        let killed = memory.oom_kills - kills_before;
        println!(
            "    {} transfers; highest overload level {highest}; the proxy measured up to {} MiB, the kernel's peak {} MiB, of {} MiB; {killed} OOM kills",
            moved.as_deref().map(str::trim).unwrap_or("no"),
            used as u64 >> 20,
            memory.peak >> 20,
            memory.limit >> 20,
        );
        let moved = moved?;
        ensure!(moved.trim() == "190", "every transfer completed: {moved}");
        ensure!(
            memory.limit == LIMIT,
            "node-2 ran under {LIMIT} bytes: {memory:?}"
        );
        ensure!(
            killed == 0 && cluster::pids("node/node-2")? == pids,
            "the kernel killed node-2's proxy: {memory:?}"
        );
        ensure!(
            used > 0.0 && used < LIMIT as f64,
            "node-2 measured {used} bytes against its {LIMIT}"
        );
        ensure!(highest >= 1.0, "the overload manager never stepped in");
        // The load is over: node-2 serves again (once its memory is back down).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let replies = requests(5, "http://echo-v2/", &[])?;
            if statuses(&replies) == BTreeMap::from([(200, 5)]) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "node-2 still refuses after the load: {:?}",
                statuses(&replies)
            );
            thread::sleep(Duration::from_millis(500));
        }
    })();
    let restored = restart(None);
    result.and(restored)
}

fn prerequisites() -> Result<()> {
    for tool in ["curl", "h2load"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        ensure!(found, "{tool} is missing: run `cargo xtask setup`");
    }
    let python = xtask::setup::test_python();
    let grpc = std::process::Command::new(&python)
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    ensure!(
        grpc,
        "grpcio is missing from {}: run `cargo xtask setup`",
        python.display()
    );
    Ok(())
}

fn main() {
    let cases: &[probe::Case] = &[
        (
            "http1_keep_alive_balances_each_request",
            http1_keep_alive_balances_each_request,
        ),
        (
            "sniffed_port_is_handled_as_http",
            sniffed_port_is_handled_as_http,
        ),
        ("upgrade_passes_through", upgrade_passes_through),
        (
            "destination_reports_every_framing_exactly",
            destination_reports_every_framing_exactly,
        ),
        (
            "smuggled_requests_never_reach_the_pod",
            smuggled_requests_never_reach_the_pod,
        ),
        (
            "abandoned_requests_are_cancelled_at_the_destination",
            abandoned_requests_are_cancelled_at_the_destination,
        ),
        ("h2c_load_through_the_mesh", h2c_load_through_the_mesh),
        ("weights_split_requests_80_20", weights_split_requests_80_20),
        (
            "header_match_routes_jason_to_v2",
            header_match_routes_jason_to_v2,
        ),
        (
            "unmatched_request_gets_404_nr",
            unmatched_request_gets_404_nr,
        ),
        (
            "rewrite_redirect_and_header_changes",
            rewrite_redirect_and_header_changes,
        ),
        ("route_timeout_gives_504_ut", route_timeout_gives_504_ut),
        (
            "fault_abort_hits_half_the_requests",
            fault_abort_hits_half_the_requests,
        ),
        (
            "fault_delay_holds_every_request",
            fault_delay_holds_every_request,
        ),
        ("retries_hide_a_flaky_backend", retries_hide_a_flaky_backend),
        (
            "circuit_breaker_rejects_with_uo",
            circuit_breaker_rejects_with_uo,
        ),
        (
            "outlier_detection_ejects_and_readmits",
            outlier_detection_ejects_and_readmits,
        ),
        (
            "consistent_hash_sticks_users_to_pods",
            consistent_hash_sticks_users_to_pods,
        ),
        (
            "dual_stack_socket_reaches_the_service",
            dual_stack_socket_reaches_the_service,
        ),
        ("grpc_route_by_method", grpc_route_by_method),
        ("grpc_abort_maps_to_status", grpc_abort_maps_to_status),
        (
            "config_change_spares_requests_in_flight",
            config_change_spares_requests_in_flight,
        ),
        ("tcp_route_splits_connections", tcp_route_splits_connections),
        (
            "client_limits_hold_across_nodes",
            client_limits_hold_across_nodes,
        ),
        (
            "tcp_idle_timeout_closes_silent_connections",
            tcp_idle_timeout_closes_silent_connections,
        ),
        (
            "one_pod_holds_at_most_its_share",
            one_pod_holds_at_most_its_share,
        ),
        (
            "http2_stream_limit_is_announced_and_held",
            http2_stream_limit_is_announced_and_held,
        ),
        (
            "overload_keeps_a_node_proxy_under_its_memory_limit",
            overload_keeps_a_node_proxy_under_its_memory_limit,
        ),
    ];
    // The nodes inherit it (mesh-node's `--http-header-read-timeout`): the slow-head case
    // then takes seconds, not the default 30.
    std::env::set_var("WEFT_HTTP_HEADER_READ_TIMEOUT", "3s");
    // Per-pod caps small enough to reach (the defaults are 16,384 and 4,096), large enough for
    // every other case (h2load's 40 streams at most).
    std::env::set_var("WEFT_MAX_CONNECTIONS_PER_SOURCE", "200");
    std::env::set_var("WEFT_MAX_REQUESTS_PER_SOURCE", "64");
    // A stream limit a raw HTTP/2 client can pass (the default is 1,024).
    std::env::set_var("WEFT_HTTP2_MAX_CONCURRENT_STREAMS", "100");
    probe::run_suite(
        "l7",
        || {
            prerequisites().and_then(|()| {
                cluster::down().context("cleaning up an earlier cluster")?;
                cluster::up(&example("workloads.yaml"))?;
                apply("destination-rule-echo.yaml")
            })
        },
        cases,
    )
}
