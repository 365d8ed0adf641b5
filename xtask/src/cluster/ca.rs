//! The virtual cluster's mesh CA: `mesh-node ca` as a process of its own, in the fabric's
//! namespace on the bridge address 172.31.0.2 (where every node reaches it, as nodes reach
//! istiod's Service), with its root kept under `/run/weft-cluster/ca/`.
//!
//! Each node gets a credential when it joins: a random token in `ca/nodes/<node>`, which the
//! CA maps to that node (as the API server maps a ServiceAccount token to its pod and node),
//! and which only that node's mesh-node is given. The CA reads the same effective
//! configuration as the nodes, so it knows which pods run where.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    cgroup, net, proc,
    state::{self, NodeInfo, CGROUP_ROOT, RUN_DIR},
    Binaries,
};

/// The CA's address on the fabric bridge.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
/// Istio's CA port.
pub const PORT: u16 = 15012;
/// The name in the CA's serving certificate that nodes check.
pub const SERVER_NAME: &str = "weft-ca";
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn dir() -> PathBuf {
    Path::new(RUN_DIR).join("ca")
}

pub fn root_cert() -> PathBuf {
    dir().join("root-cert.pem")
}

fn tokens_dir() -> PathBuf {
    dir().join("nodes")
}

pub fn token_file(node: &NodeInfo) -> PathBuf {
    tokens_dir().join(&node.name)
}

pub fn cgroup() -> PathBuf {
    Path::new(CGROUP_ROOT).join("ca")
}

fn log() -> PathBuf {
    state::log_dir().join("ca.log")
}

pub fn url() -> String {
    format!("https://{ADDRESS}:{PORT}")
}

/// Whether the CA process runs.
pub fn running() -> bool {
    cgroup::populated(&cgroup())
}

/// Starts the CA (once per cluster) and waits until it serves.
pub fn start(bins: &Binaries, nodes: &[NodeInfo]) -> Result<()> {
    // Pods reach the CA as they reach a Service of the cluster (the benchmark's sidecars ask
    // it for their certificates): the fabric routes each node's pod CIDR to the node.
    // `replace`, so it runs again whenever a node joins.
    let route = |node: &NodeInfo| {
        crate::cmd::run(Command::new("ip").args([
            "-n",
            net::FABRIC_NETNS,
            "route",
            "replace",
            &node.pod_cidr(),
            "via",
            &node.address().to_string(),
            "dev",
            "br0",
        ]))
    };
    if running() {
        return nodes.iter().try_for_each(route);
    }
    fs::create_dir_all(tokens_dir())
        .with_context(|| format!("creating {}", tokens_dir().display()))?;
    let cidr = format!("{ADDRESS}/24");
    // `replace`: a restarted CA finds its address already there.
    crate::cmd::run(Command::new("ip").args([
        "-n",
        net::FABRIC_NETNS,
        "addr",
        "replace",
        &cidr,
        "dev",
        "br0",
    ]))?;
    nodes.iter().try_for_each(route)?;
    cgroup::create(&cgroup())?;
    let mut cmd = Command::new(&bins.mesh_node);
    cmd.arg("ca")
        .args(["--listen", &SocketAddrV4::new(ADDRESS, PORT).to_string()])
        .arg("--state-dir")
        .arg(dir())
        .arg("--config-dir")
        .arg(state::config_dir())
        .arg("--node-tokens")
        .arg(tokens_dir())
        .args(["--server-name", SERVER_NAME])
        .args(["--server-ip", &ADDRESS.to_string()]);
    super::node_log_env(&mut cmd);
    proc::Placement::new()
        .cgroup(&cgroup())?
        .netns(net::FABRIC_NETNS)?
        .detached()
        .install(&mut cmd);
    proc::spawn_logged(&mut cmd, &log()).context("starting the mesh CA")?;
    wait_serving()?;
    eprintln!("mesh CA: serving on {}", url());
    Ok(())
}

/// Waits until the CA wrote its root and accepts connections (from the fabric namespace's
/// point of view, the machine cannot reach 172.31.0.2; the root file and the log tell).
fn wait_serving() -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if root_cert().exists() && serving() {
            return Ok(());
        }
        if !running() {
            bail!(
                "the mesh CA exited; the end of {}:\n{}",
                log().display(),
                proc::tail(&log(), 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the mesh CA did not serve within {START_TIMEOUT:?}; the end of {}:\n{}",
                log().display(),
                proc::tail(&log(), 30)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the CA's port accepts a connection inside the fabric namespace.
fn serving() -> bool {
    crate::cmd::succeeds(Command::new("ip").args([
        "netns",
        "exec",
        net::FABRIC_NETNS,
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{ADDRESS}/{PORT}"),
    ]))
}

/// Gives `node` its credential for the CA (kept if it has one: a restarted node keeps it).
pub fn enroll(node: &NodeInfo) -> Result<()> {
    let path = token_file(node);
    if path.exists() {
        return Ok(());
    }
    let mut token = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut token))
        .context("reading /dev/urandom")?;
    let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(hex.as_bytes())?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The flags that point a node's mesh-node at the CA.
pub fn node_args(node: &NodeInfo) -> Vec<String> {
    vec![
        "--ca-addr".into(),
        url(),
        "--ca-root-cert".into(),
        root_cert().display().to_string(),
        "--ca-token-file".into(),
        token_file(node).display().to_string(),
        "--ca-server-name".into(),
        SERVER_NAME.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_their_own_token_file_and_the_ca_flags() {
        let node = NodeInfo {
            name: "node-2".into(),
            index: 2,
        };
        assert_eq!(
            token_file(&node),
            Path::new("/run/weft-cluster/ca/nodes/node-2")
        );
        let args = node_args(&node);
        assert_eq!(
            args,
            [
                "--ca-addr",
                "https://172.31.0.2:15012",
                "--ca-root-cert",
                "/run/weft-cluster/ca/root-cert.pem",
                "--ca-token-file",
                "/run/weft-cluster/ca/nodes/node-2",
                "--ca-server-name",
                "weft-ca",
            ]
        );
    }
}
