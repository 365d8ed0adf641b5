//! Sidecars for the benchmark's comparison with Istio's architecture: a pod annotated
//! `weft.io/bench-sidecar: weft` or `haproxy` gets, before its containers start, what Istio's
//! init container and injected proxy give it:
//!
//! - an nftables table `ip weft_sidecar` in the pod's namespace: TCP the pod sends is
//!   redirected to 15001 and TCP arriving on its interface to 15006, except the proxy's own
//!   traffic (uid 1337, Istio's), loopback, and the proxy's ports;
//! - the proxy, running as uid 1337 in the pod's cgroup and namespace: `mesh-node sidecar`
//!   (Weft's proxy without eBPF, original destination from `SO_ORIGINAL_DST`) or Debian's
//!   HAProxy (L7 for ports named `http*` or with `appProtocol: http`, L4 otherwise, always to
//!   the original destination).
//!
//! The node's mesh-node leaves such pods alone as long as their namespace is not meshed.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::{
    ca,
    config::{kind_of, str_at},
    nft,
    plan::as_port,
    proc::{self, Placement},
    state::{self, NodeInfo, PodInfo, State},
};
use crate::cmd;

/// Pod annotation asking for a sidecar.
pub const ANNOTATION: &str = "weft.io/bench-sidecar";
/// The sidecar's uid: its own connections are not redirected (Istio's 1337).
pub const PROXY_UID: u32 = 1337;
/// Ports of the proxy itself, never redirected inbound.
const PROXY_PORTS: &str = "15001, 15006, 15008, 15020, 15021";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `mesh-node sidecar`.
    Weft,
    /// HAProxy from Debian.
    Haproxy,
}

/// The sidecar a pod asks for, if any; an unknown value is an error.
pub fn kind(pod: &Value) -> Result<Option<Kind>> {
    let Some(value) = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION))
    else {
        return Ok(None);
    };
    match value.as_str() {
        Some("weft") => Ok(Some(Kind::Weft)),
        Some("haproxy") => Ok(Some(Kind::Haproxy)),
        _ => bail!("annotation {ANNOTATION}: {value} is neither \"weft\" nor \"haproxy\""),
    }
}

/// Installs the redirect rules in the pod's namespace, starts its sidecar and waits until it
/// listens; before the pod's containers start, as Istio's init container orders it.
pub fn start(
    state: &State,
    pod: &PodInfo,
    resource: &Value,
    node: &NodeInfo,
    kind: Kind,
) -> Result<()> {
    nft::apply(&pod.netns, &rules())
        .with_context(|| format!("redirect rules of the sidecar of {}", pod.key()))?;
    let bins = state.binaries.as_ref();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        &PROXY_UID.to_string(),
        "--regid",
        &PROXY_UID.to_string(),
        "--clear-groups",
        "--",
    ]);
    match kind {
        Kind::Weft => {
            let mesh_node = bins
                .map(|b| b.mesh_node.clone())
                .context("mesh-node is not built")?;
            let account = str_at(resource, "/spec/serviceAccountName").unwrap_or("default");
            cmd.arg(mesh_node)
                .args(["sidecar", "--node", &node.name])
                .arg("--config-dir")
                .arg(state::config_dir())
                .args(["--pod-ip", &pod.ip.to_string()])
                .args(["--service-account", &format!("{}/{account}", pod.namespace)])
                .arg("--tls-origination-dir")
                .arg(super::tls_origination_dir())
                .args(credentials(pod, node)?);
            if let Ok(ttl) = std::env::var(super::CERT_TTL_ENV) {
                cmd.args(["--workload-cert-ttl", &ttl]);
            }
            super::node_log_env(&mut cmd);
        }
        Kind::Haproxy => {
            let config = config_path(pod);
            fs::write(&config, haproxy_config(pod, &http_ports(state)))
                .with_context(|| format!("writing {}", config.display()))?;
            cmd::run(
                Command::new("haproxy")
                    .arg("-c")
                    .arg("-q")
                    .arg("-f")
                    .arg(&config),
            )
            .context("HAProxy refused its configuration (apt-get install haproxy)")?;
            cmd.args(["haproxy", "-db", "-f"]).arg(&config);
        }
    }
    // The proxy's uid may not enter the caller's directory (a checkout under a 0700 temporary
    // directory), and HAProxy returns to its start directory after reading its configuration.
    cmd.current_dir("/");
    // Into the cgroup and namespace as root, then setpriv drops to the proxy's uid.
    Placement::new()
        .cgroup(&pod.cgroup())?
        .netns(&pod.netns)?
        .detached()
        .install(&mut cmd);
    proc::spawn_logged(&mut cmd, &log(pod))
        .with_context(|| format!("starting the sidecar of {}", pod.key()))?;
    wait_listening(pod)
}

/// The sidecar's log file.
/// The CA flags of a Weft sidecar: its node's credential and the CA's root, copied where the
/// proxy's uid may read them (Istio's sidecars authenticate with their pod's token; the
/// virtual cluster's pods have none, and the CA accepts a node's token for its pods).
fn credentials(pod: &PodInfo, node: &NodeInfo) -> Result<Vec<String>> {
    let dir = Path::new(state::RUN_DIR).join("sidecars");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let token = dir.join(format!("{}_{}.token", pod.namespace, pod.name));
    // One copy per pod: sidecars start side by side, and rewriting a shared copy would let
    // one read it while another truncates it.
    let root = dir.join(format!("{}_{}.root-cert.pem", pod.namespace, pod.name));
    fs::copy(ca::token_file(node), &token).context("copying the node's CA token")?;
    fs::copy(ca::root_cert(), &root).context("copying the CA's root certificate")?;
    std::os::unix::fs::chown(&token, Some(PROXY_UID), Some(PROXY_UID))?;
    fs::set_permissions(&token, fs::Permissions::from_mode(0o400))?;
    let mut args = ca::node_args(node);
    for (flag, path) in [("--ca-root-cert", &root), ("--ca-token-file", &token)] {
        let at = args.iter().position(|a| a == flag).context("CA flags")?;
        args[at + 1] = path.display().to_string();
    }
    Ok(args)
}

pub fn log(pod: &PodInfo) -> PathBuf {
    state::log_dir().join(format!("{}_{}.sidecar.log", pod.namespace, pod.name))
}

fn config_path(pod: &PodInfo) -> PathBuf {
    state::log_dir().join(format!("{}_{}.haproxy.cfg", pod.namespace, pod.name))
}

/// Istio's redirection, in nftables: outbound TCP to 15001, inbound TCP to 15006.
pub fn rules() -> String {
    let uid = PROXY_UID;
    format!(
        "table ip weft_sidecar\n\
         delete table ip weft_sidecar\n\
         table ip weft_sidecar {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"lo\" return\n\
         \t\ttcp dport {{ {PROXY_PORTS} }} return\n\
         \t\tmeta l4proto tcp redirect to :15006\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta skuid {uid} return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         \t\tmeta l4proto tcp redirect to :15001\n\
         \t}}\n\
         }}\n"
    )
}

/// Ports HAProxy treats as HTTP: Service ports (and numeric target ports) whose protocol, by
/// `appProtocol` or by name (`http`, `http-*`; `grpc`, `http2`, `h2c`, ...), is HTTP.
pub fn http_ports(state: &State) -> HttpPorts {
    let mut ports = HttpPorts::default();
    for svc in state.resources.iter().filter(|o| kind_of(o) == "Service") {
        for port in svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            // As Istio reads them: `appProtocol` (maybe `kubernetes.io/h2c`), else the name's
            // prefix before `-`.
            let protocol = match str_at(port, "/appProtocol") {
                Some(app) => app.rsplit('/').next().unwrap_or(app),
                None => {
                    let name = str_at(port, "/name").unwrap_or_default();
                    name.split('-').next().unwrap_or(name)
                }
            };
            let set = match protocol.to_ascii_lowercase().as_str() {
                "http" => &mut ports.http1,
                "http2" | "h2c" | "grpc" | "grpc-web" => &mut ports.http2,
                _ => continue,
            };
            set.extend(port.get("port").and_then(as_port));
            set.extend(port.get("targetPort").and_then(as_port));
        }
    }
    ports
}

/// The ports a HAProxy sidecar serves in HTTP mode, by the protocol the server speaks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HttpPorts {
    pub http1: BTreeSet<u16>,
    /// HTTP/2 cleartext (gRPC): `proto h2` towards the server.
    pub http2: BTreeSet<u16>,
}

/// HAProxy as an Istio-style sidecar: one listener per direction, HTTP/1.1, HTTP/2 or TCP by
/// the original destination port, every server the connection's original destination
/// (`0.0.0.0`). HAProxy tells an HTTP/2 client from an HTTP/1.1 one by the preface. A
/// connection whose original destination is gone (its client closed it, and its conntrack
/// entry expired, while it waited in the backlog of a sidecar at `maxconn`) reads as addressed
/// to the listener itself: it is refused, not dialled back into the sidecar, where each such
/// loop held two of its slots until the benchmark's next run found none free.
pub fn haproxy_config(pod: &PodInfo, ports: &HttpPorts) -> String {
    let list = |set: &BTreeSet<u16>| {
        if set.is_empty() {
            // A port no connection has, so the rule stays valid.
            "0".to_string()
        } else {
            set.iter().map(u16::to_string).collect::<Vec<_>>().join(" ")
        }
    };
    let (http1, http2) = (list(&ports.http1), list(&ports.http2));
    let ip = pod.ip;
    format!(
        "# HAProxy sidecar of {key}, written by `cargo xtask cluster`.\n\
         global\n\
         \tnbthread 2\n\
         \tmaxconn 4096\n\
         defaults\n\
         \ttimeout connect 5s\n\
         \ttimeout client 300s\n\
         \ttimeout server 300s\n\
         \ttimeout http-keep-alive 300s\n\
         frontend outbound\n\
         \tbind 0.0.0.0:15001\n\
         \tmode tcp\n\
         \ttcp-request connection reject if {{ dst_port 15001 }}\n\
         \tuse_backend outbound_http if {{ dst_port {http1} }}\n\
         \tuse_backend outbound_h2 if {{ dst_port {http2} }}\n\
         \tdefault_backend outbound_tcp\n\
         backend outbound_tcp\n\
         \tmode tcp\n\
         \tserver original 0.0.0.0:0\n\
         backend outbound_http\n\
         \tmode http\n\
         \tserver original 0.0.0.0:0\n\
         backend outbound_h2\n\
         \tmode http\n\
         \tserver original 0.0.0.0:0 proto h2\n\
         frontend inbound\n\
         \tbind 0.0.0.0:15006\n\
         \tmode tcp\n\
         \ttcp-request connection reject if {{ dst_port 15006 }}\n\
         \tuse_backend inbound_http if {{ dst_port {http1} }}\n\
         \tuse_backend inbound_h2 if {{ dst_port {http2} }}\n\
         \tdefault_backend inbound_tcp\n\
         backend inbound_tcp\n\
         \tmode tcp\n\
         \tsource {ip}\n\
         \tserver original 0.0.0.0:0\n\
         backend inbound_http\n\
         \tmode http\n\
         \tsource {ip}\n\
         \tserver original 0.0.0.0:0\n\
         backend inbound_h2\n\
         \tmode http\n\
         \tsource {ip}\n\
         \tserver original 0.0.0.0:0 proto h2\n",
        key = pod.key(),
    )
}

/// Waits until both capture ports listen in the pod's namespace.
fn wait_listening(pod: &PodInfo) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let listening =
            cmd::output(Command::new("ip").args(["netns", "exec", &pod.netns, "ss", "-ltnH"]))
                .unwrap_or_default();
        let ready = [15001u16, 15006].iter().all(|p| {
            listening
                .lines()
                .filter_map(|l| l.split_whitespace().nth(3))
                .any(|local| local.ends_with(&format!(":{p}")))
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the sidecar of {} does not listen on 15001 and 15006 after {} s; the end of {}:\n{}",
                pod.key(),
                READY_TIMEOUT.as_secs(),
                log(pod).display(),
                proc::tail(&log(pod), 30)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;

    fn pod() -> PodInfo {
        PodInfo {
            namespace: "bench".into(),
            name: "client".into(),
            node: "node-1".into(),
            ip: Ipv4Addr::new(10, 244, 1, 4),
            netns: "wp-node-1-bench-client".into(),
            veth: "wv00000000".into(),
            uid: "u".into(),
            spec_hash: String::new(),
            ports: vec![],
        }
    }

    #[test]
    fn annotation_values() {
        let with = |v: Value| json!({"metadata": {"annotations": {ANNOTATION: v}}});
        assert_eq!(kind(&json!({"metadata": {}})).unwrap(), None);
        assert_eq!(kind(&with(json!("weft"))).unwrap(), Some(Kind::Weft));
        assert_eq!(kind(&with(json!("haproxy"))).unwrap(), Some(Kind::Haproxy));
        assert!(kind(&with(json!("envoy"))).is_err());
    }

    #[test]
    fn redirects_like_istio_and_exempts_the_proxy() {
        let rules = rules();
        assert!(rules.contains("meta skuid 1337 return\n"));
        assert!(rules.contains("meta l4proto tcp redirect to :15001\n"));
        assert!(rules.contains("meta l4proto tcp redirect to :15006\n"));
        assert!(rules.contains("tcp dport { 15001, 15006, 15008, 15020, 15021 } return"));
        assert_eq!(rules.matches('{').count(), rules.matches('}').count());
    }

    #[test]
    fn http_ports_follow_istio_port_naming() {
        let mut state = State::empty(true);
        state.resources = vec![json!({"kind": "Service", "spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "http-alt", "port": 81},
            {"name": "web", "port": 82, "appProtocol": "HTTP"},
            {"name": "tcp", "port": 7000, "targetPort": 7000},
            {"name": "https", "port": 443},
            {"name": "grpc-api", "port": 9090},
            {"name": "api", "port": 9091, "appProtocol": "kubernetes.io/h2c"},
            {"name": "http-but-tcp", "port": 83, "appProtocol": "tcp"},
        ]}})];
        let ports = http_ports(&state);
        assert_eq!(ports.http1, BTreeSet::from([80, 8080, 81, 82]));
        assert_eq!(ports.http2, BTreeSet::from([9090, 9091]));
        let config = haproxy_config(&pod(), &ports);
        assert!(config.contains("use_backend outbound_http if { dst_port 80 81 82 8080 }"));
        assert!(config.contains("use_backend inbound_h2 if { dst_port 9090 9091 }"));
        assert!(config.contains("backend inbound_h2\n\tmode http\n\tsource 10.244.1.4\n\tserver original 0.0.0.0:0 proto h2\n"));
        // Never dialled back into itself.
        assert!(config.contains(
            "frontend outbound\n\tbind 0.0.0.0:15001\n\tmode tcp\n\ttcp-request connection reject if { dst_port 15001 }\n"
        ));
        assert!(config.contains("tcp-request connection reject if { dst_port 15006 }"));
        let empty = haproxy_config(&pod(), &HttpPorts::default());
        assert!(empty.contains("dst_port 0 }"));
    }
}
