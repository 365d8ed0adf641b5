//! End-to-end tests of zero trust on the virtual cluster: the mesh CA, HBONE mTLS between the
//! node proxies and PeerAuthentication, proved on the wire and tried as an attacker would —
//! from an unmeshed pod, with Python's `ssl` and `h2` and certificates minted by
//! `cryptography` (`xtask/assets/hbone_probe.py`), tcpdump on the node link, and a node
//! asking the CA for what is not its own.
//!
//! One cluster serves every case; it is torn down at the end whatever happened, after which
//! nothing may be left behind. Needs root: without it the suite fails loudly.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use serde_json::Value;
use xtask::{
    cluster,
    probe::{self, curl, metrics, pod_ip, sample_sum},
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
kind: Pod
metadata: {name: client, namespace: mesh, labels: {app: client}}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: mesh, labels: {app: web-1}}
spec:
  nodeName: node-1
  serviceAccountName: web
  containers: [{name: main, command: [weft-demo, http, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: mesh, labels: {app: web-2}}
spec:
  nodeName: node-2
  serviceAccountName: web-remote
  containers: [{name: main, command: [weft-demo, http, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: count-2, namespace: mesh, labels: {app: count-2}}
spec:
  nodeName: node-2
  serviceAccountName: web-remote
  containers:
  - name: main
    command: [python3, -c, "import socketserver\nclass Lines(socketserver.StreamRequestHandler):\n  def handle(self):\n    for n, line in enumerate(self.rfile, 1):\n      self.wfile.write(b'%d ' % n + line)\nsocketserver.ThreadingTCPServer.allow_reuse_address = True\nsocketserver.ThreadingTCPServer(('0.0.0.0', 7000), Lines).serve_forever()\n"]
    ports: [{containerPort: 7000}]
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain, labels: {app: outsider}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain-web, namespace: plain, labels: {app: plain-web}}
spec:
  nodeName: node-2
  containers: [{name: main, command: [weft-demo, http, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web-1, namespace: mesh}
spec: {selector: {app: web-1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-2, namespace: mesh}
spec: {selector: {app: web-2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: count-2, namespace: mesh}
spec: {selector: {app: count-2}, ports: [{name: tcp-count, port: 7000}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain-web, namespace: plain}
spec: {selector: {app: plain-web}, ports: [{name: http, port: 80, targetPort: 8080}]}
"#;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec: {mtls: {mode: STRICT}}
"#;

const WEB_1_PERMISSIVE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-1, namespace: mesh}
spec:
  selector: {matchLabels: {app: web-1}}
  mtls: {mode: PERMISSIVE}
"#;

const WEB_1_PORT_PERMISSIVE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-1, namespace: mesh}
spec:
  selector: {matchLabels: {app: web-1}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
"#;

const CLIENT: &str = "mesh/client";
const OUTSIDER: &str = "plain/outsider";
const NODE_2_HBONE: &str = "172.31.0.12:15008";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";
const NODE_ID: &str = "spiffe://cluster.local/ns/weft-system/sa/mesh-node";

fn ca_file(name: &str) -> String {
    Path::new(cluster::RUN_DIR)
        .join("ca")
        .join(name)
        .display()
        .to_string()
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("weft-{what}-{nanos}")
}

fn temp_dir() -> Result<PathBuf> {
    probe::temp_dir("mtls")
}

/// tcpdump on the fabric's ports (every node's uplink on the bridge), which every packet
/// between nodes crosses; stopped (and its file flushed) when dropped.
struct Capture {
    child: Child,
    file: PathBuf,
    dir: PathBuf,
}

impl Capture {
    fn start() -> Result<Self> {
        let dir = temp_dir()?;
        let file = dir.join("fabric.pcap");
        let log = dir.join("tcpdump.log");
        // `-i any`: frames switched between the bridge's ports never reach the bridge device
        // itself. `--immediate-mode`: packets reach the file as they come, not when a buffer
        // block fills, so nothing is lost when the capture stops.
        let child = Command::new("ip")
            .args(["netns", "exec", "weft-fabric", "tcpdump", "-i", "any"])
            .args(["--immediate-mode", "-U", "-s", "0"])
            .arg("-w")
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting tcpdump (cargo xtask setup installs it)")?;
        let capture = Self { child, file, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            ensure!(
                Instant::now() < deadline,
                "tcpdump did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(capture)
    }

    /// Stops the capture; returns the packets' bytes and what `read` makes of the file.
    fn finish<T>(mut self, read: impl FnOnce(&Path) -> Result<T>) -> Result<(Vec<u8>, T)> {
        self.stop();
        let bytes =
            fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))?;
        Ok((bytes, read(&self.file)?))
    }

    /// How many captured packets match a tcpdump filter.
    fn count(file: &Path, filter: &str) -> Result<usize> {
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(file)
            .arg(filter)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    fn stop(&mut self) {
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
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A header the echo server saw, by name.
fn seen_header(body: &Value, name: &str) -> Option<String> {
    let headers = body.get("headers")?;
    match headers.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Array(values) => values.first()?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn cross_node_traffic_is_mtls_on_the_wire() -> Result<()> {
    let capture = Capture::start()?;
    // The control: plaintext between two unmeshed pods of the two nodes is in the capture.
    let control = unique("plaintext");
    let (status, _) = curl(OUTSIDER, &format!("http://plain-web.plain/{control}"), &[])?;
    ensure!(status == 200, "unmeshed request answered {status}");
    let secret = unique("secret");
    let (status, body) = curl(
        CLIENT,
        &format!("http://web-2/{secret}"),
        &[("x-marker", &secret)],
    )?;
    ensure!(
        status == 200,
        "meshed request across nodes answered {status}"
    );
    let (packets, hbone) = capture.finish(|file| Capture::count(file, "tcp port 15008"))?;
    ensure!(
        contains(&packets, &control),
        "the capture ({} bytes) misses the unmeshed request: it would not see plaintext either",
        packets.len()
    );
    ensure!(
        !contains(&packets, &secret),
        "the meshed request crossed the node link in plaintext"
    );
    println!("    node link: {hbone} packets on 15008, the secret absent; the control found in plaintext");
    ensure!(hbone > 0, "no packet on the HBONE port");

    // The server sees who called, from the certificate.
    let xfcc = seen_header(&body, "x-forwarded-client-cert")
        .ok_or_else(|| anyhow!("no x-forwarded-client-cert reached the server: {body}"))?;
    println!("    x-forwarded-client-cert: {xfcc}");
    ensure!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/mesh/sa/web-remote;Hash=")
            && xfcc.ends_with(&format!(";Subject=\"\";URI={CLIENT_ID}")),
        "unexpected x-forwarded-client-cert {xfcc}"
    );
    // Both reporters name both principals.
    let destination = metrics("node-2")?;
    let labels = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_ID),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/mesh/sa/web-remote",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    ensure!(
        sample_sum(&destination, "istio_requests_total", &labels) >= 1.0,
        "node-2 did not report the request as mutual_tls with both principals"
    );
    Ok(())
}

/// The status curl got from the unmeshed pod; 0 when the connection was refused or closed.
fn outsider_status(url: &str) -> Result<u16> {
    let cmd: Vec<String> = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "5",
        "-w",
        "%{http_code}",
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = cluster::exec(OUTSIDER, &cmd)?;
    let code = String::from_utf8_lossy(&out.stdout);
    code.trim()
        .parse()
        .with_context(|| format!("curl {url} printed {code:?}"))
}

fn strict_refuses_plaintext_and_overrides_apply() -> Result<()> {
    ensure!(
        outsider_status("http://web-1.mesh/")? == 200,
        "PERMISSIVE (the default) must accept plaintext"
    );
    let refused = |m: &str| {
        sample_sum(
            m,
            "weft_mtls_refused_total",
            &[("reason", "plaintext_strict")],
        )
    };
    let before = refused(&metrics("node-1")?);
    probe::apply_yaml(STRICT)?;
    let status = outsider_status("http://web-1.mesh/")?;
    ensure!(status == 0, "STRICT answered plaintext with {status}");
    ensure!(
        refused(&metrics("node-1")?) > before,
        "the refusal was not counted"
    );
    // Meshed callers are unaffected, on the same node and across nodes.
    ensure!(curl(CLIENT, "http://web-1/", &[])?.0 == 200);
    ensure!(curl(CLIENT, "http://web-2/", &[])?.0 == 200);
    println!("    STRICT: plaintext from plain/outsider refused, meshed client served");

    probe::apply_yaml(WEB_1_PERMISSIVE)?;
    ensure!(
        outsider_status("http://web-1.mesh/")? == 200,
        "a workload PERMISSIVE policy overrides the namespace's STRICT"
    );
    probe::apply_yaml(WEB_1_PORT_PERMISSIVE)?;
    ensure!(
        outsider_status("http://web-1.mesh/")? == 200,
        "portLevelMtls PERMISSIVE on 8080 overrides the workload's STRICT"
    );
    println!("    workload selector and portLevelMtls overrides applied");
    probe::delete_yaml(WEB_1_PORT_PERMISSIVE)?;
    ensure!(
        outsider_status("http://web-1.mesh/")? == 0,
        "without the override the namespace's STRICT applies again"
    );
    probe::delete_yaml(STRICT)?;
    ensure!(outsider_status("http://web-1.mesh/")? == 200);
    Ok(())
}

/// Runs the independent HBONE client in `pod` and returns its JSON report.
fn probe(pod: &str, args: &[&str]) -> Result<Value> {
    let python = xtask::setup::test_python().display().to_string();
    let script = xtask::workspace_root()
        .join("xtask/assets/hbone_probe.py")
        .display()
        .to_string();
    let mut cmd = vec![python.as_str(), script.as_str()];
    cmd.extend_from_slice(args);
    let out = probe::run(pod, &cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("probe printed {out:?}"))
}

fn connect_as(cert: &str, target: &str, send: &str) -> Result<Value> {
    let (root, key) = (ca_file("root-cert.pem"), ca_file("ca-key.pem"));
    connect_with(&root, &key, &root, cert, target, send)
}

/// The independent client from the unmeshed pod to node-2's HBONE port, with a certificate
/// minted from `root` and `key` (as `cert` says), verifying node-2 against `trust`.
fn connect_with(
    root: &str,
    key: &str,
    trust: &str,
    cert: &str,
    target: &str,
    send: &str,
) -> Result<Value> {
    connect_to_node_2(
        target,
        &[
            "--root",
            root,
            "--ca-key",
            key,
            "--trust",
            trust,
            "--identity",
            CLIENT_ID,
            "--cert",
            cert,
            "--send",
            send,
        ],
    )
}

/// The independent client from the unmeshed pod to node-2's HBONE port, CONNECT `target`,
/// with the probe's options `args`.
fn connect_to_node_2(target: &str, args: &[&str]) -> Result<Value> {
    let mut argv = vec!["connect", NODE_2_HBONE, target];
    argv.extend_from_slice(args);
    probe(OUTSIDER, &argv)
}

fn hbone_port_speaks_only_mtls() -> Result<()> {
    let web_2 = format!("{}:8080", pod_ip("mesh/web-2")?);
    let refused = |reason: &str| -> Result<f64> {
        Ok(sample_sum(
            &metrics("node-2")?,
            "weft_mtls_refused_total",
            &[("reason", reason)],
        ))
    };
    // Each refusal is counted under the reason an operator acts on.
    let before = refused("plaintext")?;
    let plaintext = probe(OUTSIDER, &["plaintext", NODE_2_HBONE, &web_2])?;
    let reply = plaintext["reply"].as_str().unwrap_or_default();
    ensure!(
        !reply.contains(" 200"),
        "plaintext CONNECT was answered {reply:?}"
    );
    ensure!(refused("plaintext")? > before, "plaintext was not counted");
    for (cert, reason) in [
        ("none", "no_client_certificate"),
        ("self-signed", "unknown_ca"),
        ("expired", "expired"),
        ("foreign-ca", "unknown_ca"),
    ] {
        let before = refused(reason)?;
        let report = connect_as(cert, &web_2, "")?;
        println!("    {cert}: {report}");
        ensure!(
            report["status"].is_null(),
            "a client with a {cert} certificate got an answer: {report}"
        );
        ensure!(
            refused(reason)? > before,
            "a {cert} certificate was not counted as {reason}"
        );
    }

    // Signed by the mesh's own CA key, but for another trust domain: the chain is fine, the
    // identity is not.
    let identity = |m: &str| sample_sum(m, "weft_mtls_refused_total", &[("reason", "identity")]);
    let before = identity(&metrics("node-2")?);
    let (root, key) = (ca_file("root-cert.pem"), ca_file("ca-key.pem"));
    let foreign = connect_to_node_2(
        &web_2,
        &[
            "--root",
            &root,
            "--ca-key",
            &key,
            "--identity",
            "spiffe://evil.example/ns/mesh/sa/client",
        ],
    )?;
    println!("    foreign trust domain: {foreign}");
    ensure!(
        foreign["status"].is_null(),
        "a certificate of a foreign trust domain got an answer: {foreign}"
    );
    ensure!(
        identity(&metrics("node-2")?) > before,
        "the foreign trust domain was not counted as an identity refusal"
    );

    // A certificate the mesh CA issued: Python's h2 over ssl opens a stream to the pod.
    let request = "GET /through-hbone HTTP/1.1\r\nHost: web-2\r\nConnection: close\r\n\r\n";
    let report = connect_as("ca", &web_2, request)?;
    println!(
        "    CA-issued: status {}, server {}, ALPN {}",
        report["status"], report["server_identity"], report["alpn"]
    );
    ensure!(report["status"] == 200, "the stream was refused: {report}");
    ensure!(
        report["server_identity"] == NODE_ID,
        "the node proxy presented {}",
        report["server_identity"]
    );
    ensure!(report["alpn"] == "h2");
    let reply = report["reply"].as_str().unwrap_or_default();
    ensure!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("/through-hbone"),
        "the pod's answer did not come back: {reply:?}"
    );
    ensure!(
        reply.contains(&format!("URI={CLIENT_ID}")),
        "the pod did not learn the client's identity: {reply}"
    );
    // Valid certificate, but a target that is not a pod of node-2: no open relay.
    let elsewhere = format!("{}:8080", pod_ip("mesh/web-1")?);
    for target in [elsewhere.as_str(), "172.31.0.2:15012"] {
        let report = connect_as("ca", target, "")?;
        ensure!(
            report["status"] == 403,
            "CONNECT {target} answered {report}"
        );
    }
    Ok(())
}

/// Weft's stream resume (a node proxy's restart pauses an opaque stream across nodes, and the
/// source resumes it on a new one), spoken by the independent client: a paused connection to a
/// pod goes back only to the identity that opened it, with its state (the server numbers the
/// lines of each connection), and a token in a bad format, or one nobody was given, opens
/// nothing.
fn a_paused_stream_resumes_only_for_its_caller() -> Result<()> {
    let (root, key) = (ca_file("root-cert.pem"), ca_file("ca-key.pem"));
    let target = format!("{}:7000", pod_ip("mesh/count-2")?);
    let thief = "spiffe://cluster.local/ns/mesh/sa/web";
    let report = probe(
        OUTSIDER,
        &[
            "resume",
            NODE_2_HBONE,
            &target,
            "--root",
            &root,
            "--ca-key",
            &key,
            "--identity",
            CLIENT_ID,
            "--thief",
            thief,
        ],
    )?;
    println!("    {report}");
    ensure!(report["error"].is_null(), "the probe failed: {report}");
    let token = report["token"].as_str().unwrap_or_default();
    ensure!(
        token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "the offered token is not 128 bits of hex: {report}"
    );
    ensure!(report["first"] == "1 one\n", "{report}");
    // node-2 answered the pause with its own count: the six bytes it sent ("1 one\n").
    ensure!(report["paused"] == "6", "node-2's pause count: {report}");
    ensure!(
        report["thief"] == 410,
        "another identity was not refused the paused stream: {report}"
    );
    ensure!(report["malformed"] == 400, "{report}");
    ensure!(report["unknown"] == 410, "{report}");
    ensure!(
        report["resumed"] == 200 && report["echoed_token"] == token,
        "its caller could not resume the stream: {report}"
    );
    // The same connection to the pod: its second line.
    ensure!(
        report["second"] == "2 two\n",
        "the resumed stream is not the paused connection: {report}"
    );
    Ok(())
}

fn the_ca_gives_a_node_only_its_own_pods_identities() -> Result<()> {
    let ask = |identity: &str| -> Result<Value> {
        probe(
            "node/node-1",
            &[
                "csr",
                "--ca",
                "172.31.0.2:15012",
                "--root",
                &ca_file("root-cert.pem"),
                "--token-file",
                &ca_file("nodes/node-1"),
                "--identity",
                identity,
            ],
        )
    };
    let own = ask(CLIENT_ID)?;
    ensure!(
        own["code"] == "OK" && own["chain"].as_u64() >= Some(2),
        "node-1 was refused its own pod's identity: {own}"
    );
    let foreign = "spiffe://cluster.local/ns/mesh/sa/web-remote";
    let refused = ask(foreign)?;
    println!("    {}: {}", refused["code"], refused["details"]);
    ensure!(
        refused["code"] == "PERMISSION_DENIED",
        "node-1 obtained {foreign}: {refused}"
    );
    let details = refused["details"].as_str().unwrap_or_default();
    ensure!(
        details.contains(foreign) && details.contains("node-1"),
        "the refusal does not name the identity and the node: {details}"
    );
    Ok(())
}

fn a_revoked_certificate_is_refused() -> Result<()> {
    let web_2 = format!("{}:8080", pod_ip("mesh/web-2")?);
    let (root, key) = (ca_file("root-cert.pem"), ca_file("ca-key.pem"));
    // A certificate the CA's key signed, with a serial the test knows.
    let serial = format!("{:x}", 0x5eed_0000_u64 + u64::from(std::process::id()));
    let with_serial = || -> Result<Value> {
        let report = connect_to_node_2(
            &web_2,
            &[
                "--root",
                &root,
                "--ca-key",
                &key,
                "--identity",
                CLIENT_ID,
                "--serial",
                &serial,
            ],
        )?;
        Ok(report["status"].clone())
    };
    ensure!(
        with_serial()? == 200,
        "the certificate is refused before it is revoked"
    );
    let revoked = |m: &str| sample_sum(m, "weft_mtls_refused_total", &[("reason", "revoked")]);
    let before = revoked(&metrics("node-2")?);
    // The operator lists the serial; the CA publishes a new list within 2 s, nodes fetch it
    // every 5 s.
    let file = Path::new(cluster::RUN_DIR).join("ca/revoked");
    fs::write(&file, format!("# minted by the mTLS tests\n{serial}\n"))?;
    let start = Instant::now();
    loop {
        let status = with_serial()?;
        if status.is_null() {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the revoked certificate is still accepted after {:?}",
            start.elapsed()
        );
        thread::sleep(Duration::from_millis(500));
    }
    println!(
        "    revoked serial {serial}: refused at handshake after {:.1?}",
        start.elapsed()
    );
    ensure!(
        revoked(&metrics("node-2")?) > before,
        "the refusal was not counted"
    );
    // Other certificates of the same CA are still served.
    ensure!(connect_as("ca", &web_2, "")?["status"] == 200);
    fs::remove_file(&file)?;
    Ok(())
}

/// The lifetime of the cluster's workload certificates: renewed every 20 s, so the suite
/// sees renewals, and a root rotation takes effect within a minute.
const CERT_TTL: &str = "40s";
/// Long enough for every certificate issued before a change to have been renewed since.
const RENEWED: Duration = Duration::from_secs(25);

/// Replaces a file the way the CA should see it: whole, or not at all.
fn replace_file(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("rotating");
    fs::write(&tmp, content)?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn root_rotation_and_renewals_fail_no_request() -> Result<()> {
    let dir = temp_dir()?;
    let result = rotate(&dir);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// Istio's three steps of a root rotation, on the CA's files, under steady cross-node load:
/// (1) the bundle holds the old and the new root, (2) the new root signs, (3) the old root
/// leaves the bundle; each step given time for every certificate to be renewed.
fn rotate(dir: &Path) -> Result<()> {
    let (new_root, new_key) = (dir.join("new-root.pem"), dir.join("new-key.pem"));
    // The new root, made as an operator would make one.
    let openssl = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/O=cluster.local/CN=Weft rotated root",
        ])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&new_key)
        .arg("-out")
        .arg(&new_root)
        .output()?;
    ensure!(
        openssl.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&openssl.stderr)
    );
    let state = Path::new(cluster::RUN_DIR).join("ca");
    let old_root = fs::read_to_string(state.join("root-cert.pem"))?;
    let old_key = ca_file("ca-key.pem");
    let old_copy = dir.join("old-key.pem");
    fs::copy(&old_key, &old_copy)?;
    let both = dir.join("both.pem");
    fs::write(
        &both,
        format!("{old_root}{}", fs::read_to_string(&new_root)?),
    )?;
    let (old_root_file, old_key_file) = (dir.join("old-root.pem"), old_copy);
    fs::write(&old_root_file, &old_root)?;
    let path = |p: &Path| p.display().to_string();
    let web_2 = format!("{}:8080", pod_ip("mesh/web-2")?);
    let status_with = |root: &Path, key: &Path| -> Result<Value> {
        let report = connect_with(&path(root), &path(key), &path(&both), "ca", &web_2, "")?;
        Ok(report["status"].clone())
    };

    // Requests from node-1 to node-2 the whole time, each on a new connection.
    let load = thread::spawn(|| {
        let script = "end=$((SECONDS+95)); while [ $SECONDS -lt $end ]; do \
                      curl -s -o /dev/null -w '%{http_code}\\n' --max-time 5 http://web-2/; done";
        cluster::exec(CLIENT, &["bash".into(), "-c".into(), script.into()])
    });
    let started = Instant::now();

    ensure!(
        status_with(&new_root, &new_key)?.is_null(),
        "a certificate of the new root was accepted before the rotation"
    );
    // 1. Both roots trusted, the old one signs.
    replace_file(&state.join("root-cert.pem"), &fs::read_to_string(&both)?)?;
    thread::sleep(RENEWED);
    ensure!(
        status_with(&new_root, &new_key)? == 200
            && status_with(&old_root_file, &old_key_file)? == 200,
        "step 1: node-2 does not trust both roots"
    );
    println!("    step 1 (old + new roots trusted): node-2 accepts certificates of both roots");
    // 2. The new root signs (the key first: in between the files do not match and the CA
    //    keeps the old pair).
    replace_file(&state.join("ca-key.pem"), &fs::read_to_string(&new_key)?)?;
    replace_file(&state.join("ca-cert.pem"), &fs::read_to_string(&new_root)?)?;
    thread::sleep(RENEWED);
    let report = connect_with(
        &path(&new_root),
        &path(&new_key),
        &path(&both),
        "ca",
        &web_2,
        "",
    )?;
    ensure!(
        report["server_issuer"] == "Weft rotated root",
        "step 2: node-2 still presents a certificate of {}",
        report["server_issuer"]
    );
    println!("    step 2 (new root signs): node-2 presents a certificate of the new root");
    // 3. The old root leaves the bundle.
    replace_file(
        &state.join("root-cert.pem"),
        &fs::read_to_string(&new_root)?,
    )?;
    thread::sleep(RENEWED);
    ensure!(
        status_with(&old_root_file, &old_key_file)?.is_null(),
        "step 3: node-2 still accepts a certificate of the removed root"
    );
    ensure!(status_with(&new_root, &new_key)? == 200);
    println!("    step 3 (old root removed): node-2 refuses certificates of the old root");

    let out = load.join().map_err(|_| anyhow!("the load panicked"))??;
    let statuses = String::from_utf8_lossy(&out.stdout);
    let total = statuses.lines().count();
    let failed: Vec<&str> = statuses.lines().filter(|s| *s != "200").collect();
    println!(
        "    {total} requests node-1 -> node-2 over {:.0?}, certificates renewed every 20 s: {} failed",
        started.elapsed(),
        failed.len()
    );
    ensure!(total > 100, "the load made only {total} requests");
    ensure!(failed.is_empty(), "failed requests: {failed:?}");
    Ok(())
}

/// The host the TLS server pod stands for, outside the mesh.
const EXTERNAL_HOST: &str = "secure.example.test";

/// `curl` from the client pod to `http://secure.example.test{path}`, the name resolving to
/// `ip` as an external DNS would answer: (status, body).
fn curl_external(ip: &str, path: &str) -> Result<(u16, String)> {
    let resolve = format!("{EXTERNAL_HOST}:80:{ip}");
    let url = format!("http://{EXTERNAL_HOST}{path}");
    probe::curl_text(CLIENT, &["--resolve", &resolve, &url])
}

/// A tenant's ServiceEntry cannot turn the node proxy against its own node: an endpoint on
/// the node's loopback (where the full admin answers) is rejected, and a DNS host that
/// resolves there gets no endpoint. The client then reaches nothing, least of all the admin.
fn a_service_entry_cannot_reach_the_node_itself() -> Result<()> {
    const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: node-admin, namespace: mesh}
spec:
  hosts: [admin.evil.test]
  addresses: [240.0.0.10]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 15020}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: node-localhost, namespace: mesh}
spec:
  hosts: [localhost]
  addresses: [240.0.0.11]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 15020}]
  resolution: DNS
  location: MESH_EXTERNAL
"#;
    let rejected = || -> Result<f64> {
        Ok(sample_sum(
            &metrics("node-1")?,
            "weft_config_rejected_total",
            &[("kind", "ServiceEntry")],
        ))
    };
    let before = rejected()?;
    probe::apply_yaml(ENTRIES)?;
    let result = (|| -> Result<()> {
        ensure!(
            rejected()? - before == 1.0,
            "only the ServiceEntry with a loopback endpoint is rejected: {} rejections",
            rejected()? - before
        );
        // Give the agent a DNS round (every 5 s) for `localhost`.
        thread::sleep(Duration::from_secs(6));
        // The rejected entry's address leads nowhere (0: no answer); the DNS one has no
        // endpoint (503).
        for (address, host, want) in [
            ("240.0.0.10", "admin.evil.test", 0),
            ("240.0.0.11", "localhost", 503),
        ] {
            let resolve = format!("{host}:80:{address}");
            let url = format!("http://{host}/debug/config");
            let (status, body) = probe::curl_text(CLIENT, &["--resolve", &resolve, &url])?;
            println!("    {url} via {address}: {status}");
            ensure!(
                status == want && !body.contains("serviceAccount") && !body.contains("weft_"),
                "{url} answered {status} (expected {want}): {body}"
            );
        }
        Ok(())
    })();
    let removed = probe::delete_yaml(ENTRIES);
    result.and(removed)
}

fn tls_origination_to_a_service_entry() -> Result<()> {
    // A server outside the mesh (unmeshed namespace, other node) that speaks only TLS, with a
    // certificate from its own CA for the external name.
    // Where the node proxies may read origination files from.
    let ca = cluster::tls_origination_dir().join("tls-echo-ca.pem");
    let _ = fs::remove_file(&ca);
    // A client certificate the server trusts, for a Secret (it is not read by the nodes).
    let client = Path::new(cluster::RUN_DIR).join("tls-echo-client.json");
    let python = xtask::setup::test_python().display().to_string();
    let script = xtask::workspace_root().join("xtask/assets/tls_echo.py");
    let server = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: tls-echo, namespace: plain, labels: {{app: tls-echo}}}}
spec:
  nodeName: node-2
  containers: [{{name: main, command: ["{python}", "{}", --port, "8443", --name, {EXTERNAL_HOST}, --ca-out, "{}", --client-out, "{}"]}}]
"#,
        script.display(),
        ca.display(),
        client.display()
    );
    probe::apply_yaml(&server)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ca.exists() {
        ensure!(Instant::now() < deadline, "the TLS server did not start");
        thread::sleep(Duration::from_millis(100));
    }
    let ip = pod_ip("plain/tls-echo")?;
    // Istio's egress TLS origination task, with the server's CA instead of the system's roots:
    // plain HTTP on port 80 leaves the source proxy as TLS to 8443.
    let with_tls = |tls: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: mesh}}
spec:
  hosts: [{EXTERNAL_HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: mesh}}
spec:
  host: {EXTERNAL_HOST}
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{{tls}}}
"#
        )
    };
    let origination = |extra: &str| {
        with_tls(&format!(
            "mode: SIMPLE, caCertificates: \"{}\"{extra}",
            ca.display()
        ))
    };
    probe::apply_yaml(&origination(""))?;

    let capture = Capture::start()?;
    let secret = unique("origination");
    let (status, body) = curl_external(&ip, &format!("/{secret}"))?;
    ensure!(
        status == 200,
        "plain HTTP to the ServiceEntry host answered {status}: {body}"
    );
    let seen: Value =
        serde_json::from_str(&body).with_context(|| format!("server said {body:?}"))?;
    println!("    the server saw {seen}");
    ensure!(
        seen["sni"] == EXTERNAL_HOST && seen["path"] == format!("/{secret}"),
        "the server did not get the request over TLS with SNI {EXTERNAL_HOST}: {seen}"
    );
    let (packets, tls) = capture.finish(|file| Capture::count(file, "tcp port 8443"))?;
    ensure!(
        tls > 0,
        "no packet to the server's TLS port crossed the node link"
    );
    ensure!(
        !contains(&packets, &secret),
        "the request crossed the node link in plaintext"
    );
    let source = metrics("node-1")?;
    ensure!(
        sample_sum(
            &source,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service", EXTERNAL_HOST),
                ("response_code", "200"),
                // Outside the mesh: not mTLS, whatever TLS the proxy originated (a source
                // reporter says `unknown` then, as Istio's does).
                ("connection_security_policy", "unknown"),
            ]
        ) >= 1.0,
        "node-1 did not report the request to {EXTERNAL_HOST}"
    );

    // A name the certificate does not carry: the request fails, flagged as a connect failure
    // whose reason is TLS, and the server never sees it.
    probe::apply_yaml(&origination(", subjectAltNames: [wrong.example.test]"))?;
    let (status, body) = curl_external(&ip, "/wrong-san")?;
    println!("    with a wrong subjectAltNames: {status} {body:?}");
    ensure!(
        status == 503 && body.contains("TLS error"),
        "a certificate without the expected name answered {status}: {body}"
    );
    let source = metrics("node-1")?;
    // `URX` joins `UF`: Istio's default retries tried again before giving up.
    ensure!(
        source
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains(&format!("destination_service=\"{EXTERNAL_HOST}\""))
                && l.contains("response_code=\"503\"")
                && l.contains("response_flags=\"UF")),
        "node-1 did not count the failed origination as 503 UF: {}",
        source
            .lines()
            .filter(|l| l.starts_with("istio_requests_total") && l.contains(EXTERNAL_HOST))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A tenant's rule naming a file outside the directory the operator gave for them (here
    // the mesh CA's signing key) is not applied: the request fails, the node says why.
    let key = ca_file("ca-key.pem");
    probe::apply_yaml(&origination(&format!(", caCrl: \"{key}\"")))?;
    let (status, body) = curl_external(&ip, "/outside")?;
    ensure!(
        status == 503,
        "a rule naming {key} answered {status}: {body}"
    );
    let log = Path::new(cluster::RUN_DIR).join("logs/node-node-1.log");
    let said = fs::read_to_string(&log).unwrap_or_default();
    ensure!(
        said.contains(&format!("caCrl {key} is outside")),
        "node-1's log ({}) does not say why the rule was not applied",
        log.display()
    );

    // Istio's `credentialName`: the client certificate, its key and the CA come from a Secret
    // of the rule's namespace. Named before the Secret exists, the rule fails and the node
    // says why; once the Secret is applied, the server sees the client's certificate.
    let mutual = with_tls("mode: MUTUAL, credentialName: tls-echo-client");
    probe::apply_yaml(&mutual)?;
    let (status, body) = curl_external(&ip, "/no-secret")?;
    ensure!(
        status == 503,
        "a rule naming a missing Secret answered {status}: {body}"
    );
    let said = fs::read_to_string(&log).unwrap_or_default();
    ensure!(
        said.contains("Secret mesh/tls-echo-client does not exist"),
        "node-1's log ({}) does not name the missing Secret",
        log.display()
    );
    let material: Value = serde_json::from_str(&fs::read_to_string(&client)?)?;
    let secret = serde_json::to_string(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "tls-echo-client", "namespace": "mesh"},
        "stringData": {"tls.crt": material["cert"], "tls.key": material["key"], "ca.crt": material["ca"]},
    }))?;
    probe::apply_yaml(&secret)?;
    let (status, body) = curl_external(&ip, "/credential")?;
    ensure!(
        status == 200,
        "with the Secret applied, the request answered {status}: {body}"
    );
    let seen: Value =
        serde_json::from_str(&body).with_context(|| format!("server said {body:?}"))?;
    println!("    with credentialName, the server saw {seen}");
    ensure!(
        seen["client"] == "tls-echo-client" && seen["sni"] == EXTERNAL_HOST,
        "the server did not see the Secret's client certificate: {seen}"
    );
    let said = fs::read_to_string(&log).unwrap_or_default();
    ensure!(
        !said.contains("PRIVATE KEY"),
        "node-1's log shows a private key"
    );
    probe::delete_yaml(&secret)?;
    probe::delete_yaml(&mutual)?;
    probe::delete_yaml(&server)?;
    let _ = fs::remove_file(&client);
    Ok(())
}

fn main() {
    let cases: &[probe::Case] = &[
        (
            "cross_node_traffic_is_mtls_on_the_wire",
            cross_node_traffic_is_mtls_on_the_wire,
        ),
        (
            "strict_refuses_plaintext_and_overrides_apply",
            strict_refuses_plaintext_and_overrides_apply,
        ),
        ("hbone_port_speaks_only_mtls", hbone_port_speaks_only_mtls),
        (
            "a_paused_stream_resumes_only_for_its_caller",
            a_paused_stream_resumes_only_for_its_caller,
        ),
        (
            "a_service_entry_cannot_reach_the_node_itself",
            a_service_entry_cannot_reach_the_node_itself,
        ),
        (
            "tls_origination_to_a_service_entry",
            tls_origination_to_a_service_entry,
        ),
        (
            "the_ca_gives_a_node_only_its_own_pods_identities",
            the_ca_gives_a_node_only_its_own_pods_identities,
        ),
        (
            "a_revoked_certificate_is_refused",
            a_revoked_certificate_is_refused,
        ),
        // Last: it changes the CA's root for good.
        (
            "root_rotation_and_renewals_fail_no_request",
            root_rotation_and_renewals_fail_no_request,
        ),
    ];
    // Set before the cluster starts: its nodes read it once.
    std::env::set_var(cluster::CERT_TTL_ENV, CERT_TTL);
    probe::run_suite("mtls", || probe::up_with(CLUSTER), cases)
}
