//! `cargo xtask cluster down`: removes everything the virtual cluster made, and only that.
//!
//! Works from what is on the machine rather than from the state file (which may be gone or
//! corrupt after a crash): processes by cgroup, namespaces and directories by our name
//! prefixes. Every step runs even if an earlier one failed; the errors are reported together.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, Context as _, Result};

use super::{
    cgroup, net,
    state::{State, BPFFS_ROOT, CGROUP_ROOT, RUN_DIR},
};
use crate::cmd;

pub fn down() -> Result<()> {
    // A corrupt state file must not stop the teardown.
    let state = State::load().ok().flatten();
    let mut errors = Vec::new();
    let mut step = |result: Result<()>| {
        if let Err(e) = result {
            errors.push(e);
        }
    };

    // Processes first: nothing may hold on to what follows.
    step(cgroup::kill(Path::new(CGROUP_ROOT)));

    let nodes = our_nodes(state.as_ref());
    let pod_netns: BTreeSet<String> = state
        .iter()
        .flat_map(|s| s.pods.values().map(|p| p.netns.clone()))
        .collect();
    let ours = |netns: &str| is_ours(netns, &nodes, &pod_netns);
    step(cleanup_bpf(state.as_ref(), &nodes));

    for ns in net::list_netns().unwrap_or_default() {
        if ours(&ns) {
            step(net::delete_netns(&ns));
        }
    }
    step(remove_etc_netns(&ours));
    step(cgroup::remove_tree(Path::new(CGROUP_ROOT)));
    step(cgroup::remove_tree(Path::new(cgroup::MEMORY_V1_ROOT)));
    step(remove_dir_all(Path::new(RUN_DIR)));

    match errors.len() {
        0 => Ok(()),
        _ => Err(anyhow!(
            "the cluster is down, but some of it could not be removed:\n{}",
            errors
                .iter()
                .map(|e| format!("  - {e:#}"))
                .collect::<Vec<_>>()
                .join("\n")
        )),
    }
}

/// Node names the cluster made: from the state file and from the node cgroups (created
/// before anything else of a node, so they survive a crash at any point). Namespaces
/// that merely share our prefixes, and pins under /sys/fs/bpf/weft of a mesh-node someone
/// runs by hand, are left alone.
fn our_nodes(state: Option<&State>) -> BTreeSet<String> {
    let mut nodes: BTreeSet<String> = state
        .map(|s| s.nodes.iter().map(|n| n.name.clone()).collect())
        .unwrap_or_default();
    if let Ok(entries) = fs::read_dir(CGROUP_ROOT) {
        nodes.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    nodes
}

/// The fabric, the namespaces of our nodes and of their pods.
fn is_ours(netns: &str, nodes: &BTreeSet<String>, pod_netns: &BTreeSet<String>) -> bool {
    netns == net::FABRIC_NETNS
        || pod_netns.contains(netns)
        || nodes.iter().any(|node| {
            netns == net::node_netns(node)
                || netns.starts_with(&format!("{}{node}-", net::POD_NETNS_PREFIX))
        })
}

/// Detaches and unpins the eBPF programs of our nodes with `mesh-node cleanup`; without
/// the binary (or if it fails) the pins are removed directly, which detaches the links too.
fn cleanup_bpf(state: Option<&State>, nodes: &BTreeSet<String>) -> Result<()> {
    let mesh_node: PathBuf = state
        .and_then(|s| s.binaries.as_ref())
        .map(|b| b.mesh_node.clone())
        .unwrap_or_else(|| super::binary_paths(&super::profile().1).mesh_node);
    let mut errors = Vec::new();
    for node in nodes {
        let pins = Path::new(BPFFS_ROOT).join(node);
        if !pins.exists() {
            continue;
        }
        if mesh_node.is_file() {
            let cleaned = cmd::run(Command::new(&mesh_node).args([
                "cleanup",
                "--node",
                node,
                "--bpffs-root",
                BPFFS_ROOT,
            ]));
            match cleaned {
                Ok(()) if !pins.exists() => continue,
                Ok(()) => {}
                Err(e) => eprintln!("warning: {e:#}; removing {} directly", pins.display()),
            }
        }
        if let Err(e) = remove_dir_all(&pins) {
            errors.push(format!("{e:#}"));
        }
    }
    // The root is shared by every node: remove it only once it is empty.
    let _ = fs::remove_dir(BPFFS_ROOT);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}

/// `/etc/netns/<our namespace>` directories, also those whose namespace is already gone.
fn remove_etc_netns(ours: &dyn Fn(&str) -> bool) -> Result<()> {
    let entries = match fs::read_dir("/etc/netns") {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context("listing /etc/netns"),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ours(&name) {
            net::remove_etc_netns(&name)?;
        }
    }
    // The hosts files created /etc/netns; leave it only if something else uses it.
    let _ = fs::remove_dir("/etc/netns");
    Ok(())
}

fn remove_dir_all(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespaces_of_our_nodes_are_removed() {
        let nodes = BTreeSet::from(["node-1".to_string()]);
        let pods = BTreeSet::from(["wp-long-hashed-1234".to_string()]);
        for ours in [
            "weft-fabric",
            "wn-node-1",
            "wp-node-1-default-x",
            "wp-long-hashed-1234",
        ] {
            assert!(is_ours(ours, &nodes, &pods), "{ours}");
        }
        for theirs in [
            "wn-node-12",
            "wn-s",
            "wp-s-c",
            "wp-node-12-default-x",
            "weft-smoke",
        ] {
            assert!(!is_ours(theirs, &nodes, &pods), "{theirs}");
        }
    }
}
