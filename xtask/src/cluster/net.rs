//! The virtual cluster's network: a bridge in the `weft-fabric` namespace joins the nodes'
//! uplinks; each pod is a namespace behind a veth into its node's namespace.
//!
//! Pods get a /32 and a default route via their node's gateway (on-link), so every packet
//! of a pod, also to a pod on the same node, crosses the node's namespace where the mesh's
//! TC programs and the kube-proxy rules see it. Every command runs with `ip -n`, so the
//! machine's own namespace is never touched.

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::{
    plan::SERVICE_CIDR,
    state::{NodeInfo, PodInfo},
};
use crate::cmd;

pub const FABRIC_NETNS: &str = "weft-fabric";
pub const NODE_NETNS_PREFIX: &str = "wn-";
pub const POD_NETNS_PREFIX: &str = "wp-";
const FABRIC_BRIDGE: &str = "br0";
/// Longest pod namespace name kept readable; longer ones are shortened with a hash.
const MAX_NETNS_NAME: usize = 64;

pub fn node_netns(node: &str) -> String {
    format!("{NODE_NETNS_PREFIX}{node}")
}

/// `wp-<node>-<ns>-<name>`, or a prefix of it plus a hash when that would be unwieldy.
pub fn pod_netns(node: &str, namespace: &str, name: &str) -> String {
    let full = format!("{POD_NETNS_PREFIX}{node}-{namespace}-{name}");
    if full.len() <= MAX_NETNS_NAME {
        return full;
    }
    let hash = format!("{:08x}", fnv1a(full.as_bytes()) as u32);
    let keep = MAX_NETNS_NAME - hash.len() - 1;
    format!("{}-{hash}", &full[..keep])
}

/// Host-side veth name, `wv<8 hex>` (10 characters, within IFNAMSIZ). `salt` moves a pod
/// off a name another pod already has.
pub fn veth_name(namespace: &str, name: &str, salt: u32) -> String {
    let mut input = format!("{namespace}/{name}");
    if salt > 0 {
        input.push_str(&format!("#{salt}"));
    }
    format!("wv{:08x}", fnv1a(input.as_bytes()) as u32)
}

/// FNV-1a: stable across builds and machines (names derived from it outlive the process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `/etc/netns/<netns>/hosts`, which `ip netns exec` bind-mounts over /etc/hosts.
pub fn hosts_path(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns).join("hosts")
}

/// A Service as the hosts files name it.
pub struct ServiceName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub ip: Ipv4Addr,
}

/// The hosts file of one pod: itself, then every Service as `svc.ns`, `svc.ns.svc` and
/// `svc.ns.svc.cluster.local`, plus the short `svc` for its own namespace (what the search
/// path of a Kubernetes pod's resolv.conf gives).
pub fn render_hosts(pod: &PodInfo, services: &[ServiceName<'_>]) -> String {
    let mut text = String::from(
        "# Written by `cargo xtask cluster`; rewritten on every change.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    text.push_str(&format!("{}\t{}\n", pod.ip, pod.name));
    for svc in services {
        let (ns, name) = (svc.namespace, svc.name);
        text.push_str(&format!(
            "{}\t{name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}",
            svc.ip
        ));
        if ns == pod.namespace {
            text.push_str(&format!(" {name}"));
        }
        text.push('\n');
    }
    text
}

/// Writes a pod's hosts file in place rather than by rename: `ip netns exec` bind-mounts
/// the file's inode, so a running pod only sees new Services if the inode stays the same.
pub fn write_hosts(netns: &str, contents: &str) -> Result<()> {
    let path = hosts_path(netns);
    let dir = path.parent().expect("hosts path has a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::run(Command::new("ip").args(args))
}

fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    cmd::run(Command::new("ip").args(["-n", netns]).args(args))
}

/// Sets sysctls inside a namespace (procfs follows the caller's network namespace).
fn sysctl_in(netns: &str, settings: &[&str]) -> Result<()> {
    cmd::run(
        Command::new("ip")
            .args(["netns", "exec", netns, "sysctl", "-qw"])
            .args(settings),
    )
}

/// Names of all network namespaces `ip netns` knows.
pub fn list_netns() -> Result<Vec<String>> {
    let out = cmd::output(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

pub fn create_fabric() -> Result<()> {
    ip(&["netns", "add", FABRIC_NETNS])?;
    ip_in(FABRIC_NETNS, &["link", "set", "lo", "up"])?;
    ip_in(
        FABRIC_NETNS,
        &["link", "add", FABRIC_BRIDGE, "type", "bridge"],
    )?;
    ip_in(FABRIC_NETNS, &["link", "set", FABRIC_BRIDGE, "up"])
}

/// A node namespace with `eth0` on the fabric bridge, forwarding on and reverse-path
/// filtering off (pod traffic arrives on one veth and leaves by another, and the mesh
/// answers for addresses that are not on the receiving interface).
pub fn create_node(node: &NodeInfo) -> Result<()> {
    let netns = node.netns();
    ip(&["netns", "add", &netns])?;
    // Before any interface exists, so that each one inherits `default`.
    sysctl_in(
        &netns,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ],
    )?;
    ip_in(&netns, &["link", "set", "lo", "up"])?;
    let fabric_side = format!("wf{}", node.index);
    ip_in(
        FABRIC_NETNS,
        &[
            "link",
            "add",
            &fabric_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ],
    )?;
    ip_in(
        FABRIC_NETNS,
        &["link", "set", &fabric_side, "master", FABRIC_BRIDGE, "up"],
    )?;
    ip_in(
        &netns,
        &[
            "addr",
            "add",
            &format!("{}/24", node.address()),
            "dev",
            "eth0",
        ],
    )?;
    ip_in(&netns, &["link", "set", "eth0", "up"])?;
    // ClusterIPs are local to every node, as kube-proxy's dummy interface makes them: the
    // node's own connections to a Service then find a route (and get translated by the
    // nat output chain), and a Service without endpoints is refused by the input chain
    // instead of being dropped for want of a route.
    ip_in(
        &netns,
        &[
            "route",
            "add",
            "local",
            SERVICE_CIDR,
            "dev",
            "lo",
            "src",
            &node.address().to_string(),
        ],
    )
}

/// Routes every node's pod CIDR to its owner's uplink address, on every other node
/// (`replace`, so it can run again whenever a node joins).
pub fn route_between_nodes(nodes: &[NodeInfo]) -> Result<()> {
    for from in nodes {
        for to in nodes.iter().filter(|n| n.index != from.index) {
            ip_in(
                &from.netns(),
                &[
                    "route",
                    "replace",
                    &to.pod_cidr(),
                    "via",
                    &to.address().to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
        }
    }
    Ok(())
}

/// A pod namespace with `eth0` (its /32) paired with `pod.veth` in the node's namespace,
/// which carries the gateway address and the route back to the pod.
pub fn create_pod(pod: &PodInfo, node: &NodeInfo) -> Result<()> {
    let node_ns = node.netns();
    let gateway = node.gateway().to_string();
    ip(&["netns", "add", &pod.netns])?;
    ip_in(&pod.netns, &["link", "set", "lo", "up"])?;
    ip_in(
        &node_ns,
        &[
            "link", "add", &pod.veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
        ],
    )?;
    ip_in(
        &node_ns,
        &["addr", "add", &format!("{gateway}/32"), "dev", &pod.veth],
    )?;
    ip_in(&node_ns, &["link", "set", &pod.veth, "up"])?;
    ip_in(
        &node_ns,
        &[
            "route",
            "replace",
            &format!("{}/32", pod.ip),
            "dev",
            &pod.veth,
            "src",
            &gateway,
        ],
    )?;
    ip_in(
        &pod.netns,
        &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
    )?;
    ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
    ip_in(
        &pod.netns,
        &[
            "route", "add", "default", "via", &gateway, "dev", "eth0", "onlink",
        ],
    )
}

/// Deletes a namespace (its veths go with it) and its `/etc/netns` directory.
pub fn delete_netns(netns: &str) -> Result<()> {
    ip(&["netns", "delete", netns])?;
    remove_etc_netns(netns)
}

pub fn remove_etc_netns(netns: &str) -> Result<()> {
    let dir = Path::new("/etc/netns").join(netns);
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, name: &str) -> PodInfo {
        PodInfo {
            namespace: namespace.into(),
            name: name.into(),
            node: "node-1".into(),
            ip: Ipv4Addr::new(10, 244, 1, 2),
            netns: pod_netns("node-1", namespace, name),
            veth: veth_name(namespace, name, 0),
            uid: String::new(),
            spec_hash: String::new(),
            ports: vec![],
        }
    }

    #[test]
    fn veth_names_fit_ifnamsiz_and_are_stable() {
        let a = veth_name("default", "productpage-v1", 0);
        assert_eq!(a.len(), 10);
        assert!(a.len() <= 15, "IFNAMSIZ - 1");
        assert!(a.starts_with("wv"));
        assert_eq!(a, veth_name("default", "productpage-v1", 0));
        assert_ne!(a, veth_name("default", "productpage-v1", 1));
        assert_ne!(a, veth_name("default", "productpage-v2", 0));
        // Separator in the hash input: `a/bc` and `ab/c` differ.
        assert_ne!(veth_name("a", "bc", 0), veth_name("ab", "c", 0));
    }

    #[test]
    fn known_fnv1a_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn long_pod_netns_names_are_hashed() {
        assert_eq!(
            pod_netns("node-1", "default", "reviews-v1"),
            "wp-node-1-default-reviews-v1"
        );
        let long = "a".repeat(63);
        let a = pod_netns("node-1", "default", &long);
        let b = pod_netns("node-1", "default", &format!("{}b", &long[1..]));
        assert_eq!(a.len(), MAX_NETNS_NAME);
        assert!(a.starts_with("wp-node-1-default-"));
        assert_ne!(a, b);
    }

    #[test]
    fn hosts_file_names_services_short_only_in_own_namespace() {
        let services = [
            ServiceName {
                namespace: "default",
                name: "reviews",
                ip: Ipv4Addr::new(10, 96, 0, 10),
            },
            ServiceName {
                namespace: "shop",
                name: "cart",
                ip: Ipv4Addr::new(10, 96, 0, 11),
            },
        ];
        let text = render_hosts(&pod("default", "productpage-v1"), &services);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"127.0.0.1\tlocalhost"));
        assert!(lines.contains(&"10.244.1.2\tproductpage-v1"));
        assert!(lines.contains(
            &"10.96.0.10\treviews.default.svc.cluster.local reviews.default.svc reviews.default reviews"
        ));
        assert!(lines.contains(&"10.96.0.11\tcart.shop.svc.cluster.local cart.shop.svc cart.shop"));

        let other = render_hosts(&pod("shop", "x"), &services);
        assert!(other.contains("cart.shop cart\n"));
        assert!(other.contains("reviews.default\n"));
    }
}
