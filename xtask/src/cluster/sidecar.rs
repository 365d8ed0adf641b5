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
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::{
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
pub fn start(state: &State, pod: &PodInfo, node: &NodeInfo, kind: Kind) -> Result<()> {
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
            cmd.arg(mesh_node)
                .args(["sidecar", "--node", &node.name])
                .arg("--config-dir")
                .arg(state::config_dir())
                .args(["--pod-ip", &pod.ip.to_string()]);
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

/// Ports HAProxy treats as HTTP: Service ports (and numeric target ports) named `http` or
/// `http-*`, or with `appProtocol: http` (Istio's protocol selection).
pub fn http_ports(state: &State) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for svc in state.resources.iter().filter(|o| kind_of(o) == "Service") {
        for port in svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = str_at(port, "/name").unwrap_or_default();
            let http = name == "http"
                || name.starts_with("http-")
                || str_at(port, "/appProtocol").is_some_and(|p| p.eq_ignore_ascii_case("http"));
            if !http {
                continue;
            }
            ports.extend(port.get("port").and_then(as_port));
            ports.extend(port.get("targetPort").and_then(as_port));
        }
    }
    ports
}

/// HAProxy as an Istio-style sidecar: one listener per direction, HTTP or TCP by the original
/// destination port, every server the connection's original destination (`0.0.0.0`).
pub fn haproxy_config(pod: &PodInfo, http_ports: &BTreeSet<u16>) -> String {
    let ports = if http_ports.is_empty() {
        // A port no connection has, so the rule stays valid.
        "0".to_string()
    } else {
        http_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
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
         \tuse_backend outbound_http if {{ dst_port {ports} }}\n\
         \tdefault_backend outbound_tcp\n\
         backend outbound_tcp\n\
         \tmode tcp\n\
         \tserver original 0.0.0.0:0\n\
         backend outbound_http\n\
         \tmode http\n\
         \tserver original 0.0.0.0:0\n\
         frontend inbound\n\
         \tbind 0.0.0.0:15006\n\
         \tmode tcp\n\
         \tuse_backend inbound_http if {{ dst_port {ports} }}\n\
         \tdefault_backend inbound_tcp\n\
         backend inbound_tcp\n\
         \tmode tcp\n\
         \tsource {ip}\n\
         \tserver original 0.0.0.0:0\n\
         backend inbound_http\n\
         \tmode http\n\
         \tsource {ip}\n\
         \tserver original 0.0.0.0:0\n",
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
        ]}})];
        assert_eq!(http_ports(&state), BTreeSet::from([80, 8080, 81, 82]));
        let config = haproxy_config(&pod(), &http_ports(&state));
        assert!(config.contains("use_backend outbound_http if { dst_port 80 81 82 8080 }"));
        assert!(config.contains("\tsource 10.244.1.4\n"));
        let empty = haproxy_config(&pod(), &BTreeSet::new());
        assert!(empty.contains("dst_port 0 }"));
    }
}
