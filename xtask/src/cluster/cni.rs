//! The virtual cluster's container runtime calls the chained CNI plugin `weft-cni` for every
//! pod, as containerd or CRI-O would: `CNI_*` variables, the network configuration on stdin
//! with the interface plugin's result (`prevResult`: the pod's veth and address), `ADD` before
//! any container of the pod runs, `DEL` when it goes. A failed `ADD` that says "try again
//! later" (11) is retried, as kubelet does: the pod waits; it never starts without it.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::state::{NodeInfo, PodInfo};

/// How long a pod waits for its network before `cluster apply` gives up on it.
const ADD_WAIT: Duration = Duration::from_secs(180);
/// CNI's "try again later".
const TRY_AGAIN_LATER: u64 = 11;

/// Runs `weft-cni` with CNI command `command` for `pod`.
pub fn call(plugin: &Path, command: &str, pod: &PodInfo, node: &NodeInfo) -> Result<Output> {
    let netns = Path::new("/var/run/netns").join(&pod.netns);
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "weft-cluster",
        "type": "weft-cni",
        "agent_socket": node.cni_socket(),
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": netns}],
            "ips": [{"address": format!("{}/32", pod.ip), "gateway": node.gateway().to_string(), "interface": 0}],
        },
    });
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.uid
            ),
        )
        .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("the plugin's stdin")?
        .write_all(config.to_string().as_bytes())?;
    child.wait_with_output().context("waiting for weft-cni")
}

/// `ADD` for `pod`, again every second while the plugin says to try later.
pub fn add(plugin: &Path, pod: &PodInfo, node: &NodeInfo) -> Result<()> {
    let deadline = Instant::now() + ADD_WAIT;
    let mut told = false;
    loop {
        let out = call(plugin, "ADD", pod, node)?;
        if out.status.success() {
            if told {
                eprintln!("pod {}: network ready (weft-cni)", pod.key());
            }
            return Ok(());
        }
        let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let msg = error["msg"].as_str().unwrap_or_default();
        if error["code"].as_u64() != Some(TRY_AGAIN_LATER) {
            bail!(
                "pod {}: weft-cni ADD failed: {} ({}) {}",
                pod.key(),
                msg,
                error["details"].as_str().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !told {
            eprintln!("pod {}: waiting for its network: {msg}", pod.key());
            told = true;
        }
        if Instant::now() > deadline {
            bail!(
                "pod {}: weft-cni ADD still fails after {} s: {msg}",
                pod.key(),
                ADD_WAIT.as_secs()
            );
        }
        thread::sleep(Duration::from_secs(1));
    }
}
