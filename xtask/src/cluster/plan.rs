//! From resources to a cluster: which nodes exist, where each pod runs and with which
//! address, which ClusterIP each Service has, and which endpoints kube-proxy balances over.
//!
//! Pure functions of the previous [`State`] and the new resources, so that every allocation
//! that still applies is kept: a pod that only changed labels keeps its namespace, address
//! and processes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::{
    config::{kind_of, namespace_of, str_at},
    launch, net,
    state::{pod_key, NodeInfo, PodInfo, State},
};

/// Highest node index: keeps 172.31.0.(10+i) and 10.244.i.0/24 valid.
const MAX_NODES: u8 = 240;
const DEFAULT_NODE: &str = "node-1";
/// First ClusterIP handed out (10.96.0.1-9 stay free, as in kubeadm clusters where
/// 10.96.0.1 is the API server and 10.96.0.10 the DNS service).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LAST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 255, 254);

/// What a change does to the running cluster.
#[derive(Debug, Default)]
pub struct Diff {
    pub new_nodes: Vec<NodeInfo>,
    /// Pods to stop and tear down: deleted ones, and old incarnations of changed ones.
    pub removed: Vec<PodInfo>,
    /// Pods to create and start (new ones and new incarnations).
    pub added: Vec<PodInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortView {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    /// (pod or endpoint address, target port).
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// A Service as kube-proxy and the hosts files see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// `None` for headless Services and ones whose clusterIP is not an IPv4 address.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<PortView>,
}

/// The state for `resources`, and what changes from `prev` to get there.
pub fn plan(prev: &State, resources: Vec<Value>) -> Result<(State, Diff)> {
    let mut next = State {
        generation: prev.generation,
        mesh: prev.mesh,
        binaries: prev.binaries.clone(),
        resources,
        nodes: prev.nodes.clone(),
        pods: BTreeMap::new(),
        services: BTreeMap::new(),
        stopped: prev.stopped.clone(),
    };
    let mut diff = Diff::default();

    // Nodes, in order of first appearance; existing ones keep their index.
    for obj in &next.resources {
        let name = match kind_of(obj) {
            "Node" => str_at(obj, "/metadata/name"),
            "Pod" => str_at(obj, "/spec/nodeName"),
            _ => None,
        };
        if let Some(name) = name {
            ensure_node(&mut next.nodes, &mut diff, name)?;
        }
    }

    // Pods: keep unchanged ones, plan the rest.
    let mut pending: Vec<(String, String, String, String, &Value)> = Vec::new();
    for obj in next.resources.iter().filter(|o| kind_of(o) == "Pod") {
        let namespace = namespace_of(obj).to_string();
        let name = str_at(obj, "/metadata/name")
            .unwrap_or_default()
            .to_string();
        check_name("namespace", &namespace)?;
        check_name("pod", &name)?;
        launch::check(obj).with_context(|| format!("pod {namespace}/{name}"))?;
        super::sidecar::kind(obj).with_context(|| format!("pod {namespace}/{name}"))?;
        let key = pod_key(&namespace, &name);
        if next.pods.contains_key(&key) || pending.iter().any(|(k, ..)| *k == key) {
            continue;
        }
        let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
        let spec_hash = format!("{:016x}", net::fnv1a(spec.to_string().as_bytes()));
        let old = prev.pods.get(&key);
        match old {
            Some(old) if old.spec_hash == spec_hash => {
                next.pods.insert(key, old.clone());
            }
            _ => pending.push((key, namespace, name, spec_hash, obj)),
        }
    }
    for (key, old) in &prev.pods {
        if next.pods.get(key) != Some(old) {
            diff.removed.push(old.clone());
        }
    }

    for (key, namespace, name, spec_hash, obj) in pending {
        let node = match str_at(obj, "/spec/nodeName") {
            Some(node) => node.to_string(),
            None => {
                if next.nodes.is_empty() {
                    ensure_node(&mut next.nodes, &mut diff, DEFAULT_NODE)?;
                }
                least_loaded(&next)
            }
        };
        let node_info = next.node(&node).expect("node ensured above").clone();
        let ip = allocate_pod_ip(&next, &node_info, prev.pods.get(&key))
            .with_context(|| format!("pod {key}"))?;
        let mut salt = 0;
        let veth = loop {
            let veth = net::veth_name(&namespace, &name, salt);
            if !next.pods.values().any(|p| p.veth == veth) {
                break veth;
            }
            salt += 1;
        };
        let uid = match str_at(obj, "/metadata/uid") {
            Some(uid) => uid.to_string(),
            None => make_uid(&format!("{key}/{spec_hash}/{}", prev.generation + 1)),
        };
        let pod = PodInfo {
            netns: net::pod_netns(&node, &namespace, &name),
            namespace,
            name,
            node,
            ip,
            veth,
            uid,
            spec_hash,
            ports: launch::tcp_ports(obj),
        };
        diff.added.push(pod.clone());
        next.pods.insert(key, pod);
    }

    allocate_cluster_ips(prev, &mut next)?;
    Ok((next, diff))
}

fn ensure_node(nodes: &mut Vec<NodeInfo>, diff: &mut Diff, name: &str) -> Result<()> {
    if nodes.iter().any(|n| n.name == name) {
        return Ok(());
    }
    check_name("node", name)?;
    let index = nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
    if index > MAX_NODES {
        bail!("more than {MAX_NODES} nodes");
    }
    let node = NodeInfo {
        name: name.to_string(),
        index,
    };
    nodes.push(node.clone());
    diff.new_nodes.push(node);
    Ok(())
}

/// Names become namespace names, cgroup directories and file names: only DNS labels
/// (as Kubernetes requires anyway), never `..` or `/`.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !ok {
        bail!("{what} name {name:?} is not a DNS-1123 name (a-z, 0-9, '-', '.')");
    }
    Ok(())
}

/// Pods without `spec.nodeName` go to the node with the fewest pods (lowest index on ties),
/// as a scheduler spreading replicas would.
fn least_loaded(state: &State) -> String {
    state
        .nodes
        .iter()
        .min_by_key(|n| {
            let pods = state.pods.values().filter(|p| p.node == n.name).count();
            (pods, n.index)
        })
        .map(|n| n.name.clone())
        .expect("at least one node")
}

/// The pod's previous address if it stays on the same node and the address is free, else
/// the lowest free one from 10.244.i.2.
fn allocate_pod_ip(state: &State, node: &NodeInfo, old: Option<&PodInfo>) -> Result<Ipv4Addr> {
    let used: BTreeSet<Ipv4Addr> = state
        .pods
        .values()
        .filter(|p| p.node == node.name)
        .map(|p| p.ip)
        .collect();
    if let Some(old) = old.filter(|o| o.node == node.name && !used.contains(&o.ip)) {
        return Ok(old.ip);
    }
    (2..=254)
        .map(|host| Ipv4Addr::new(10, 244, node.index, host))
        .find(|ip| !used.contains(ip))
        .with_context(|| format!("no free pod address left in {}", node.pod_cidr()))
}

/// An explicit `spec.clusterIP` is honoured; `None` means headless; everything else gets
/// its previous address or the lowest free one from 10.96.0.10.
fn allocate_cluster_ips(prev: &State, next: &mut State) -> Result<()> {
    let mut explicit = BTreeMap::new();
    let mut wanted = Vec::new();
    for obj in next.resources.iter().filter(|o| kind_of(o) == "Service") {
        let key = pod_key(
            namespace_of(obj),
            str_at(obj, "/metadata/name").unwrap_or_default(),
        );
        match str_at(obj, "/spec/clusterIP") {
            Some("None") => {}
            Some(ip) if ip.parse::<Ipv4Addr>().is_ok() => {
                explicit.insert(key, ip.parse::<Ipv4Addr>().expect("checked"));
            }
            // Invalid values stay in the object for mesh-node to reject; no VIP here.
            Some(ip) if !ip.is_empty() => {}
            _ => wanted.push(key),
        }
    }
    let mut used: BTreeSet<Ipv4Addr> = explicit.values().copied().collect();
    next.services = explicit;
    for key in wanted {
        let ip = match prev.services.get(&key) {
            Some(ip) if !used.contains(ip) => *ip,
            _ => (u32::from(FIRST_CLUSTER_IP)..=u32::from(LAST_CLUSTER_IP))
                .map(Ipv4Addr::from)
                .find(|ip| !used.contains(ip))
                .with_context(|| format!("no free ClusterIP left in {SERVICE_CIDR}"))?,
        };
        used.insert(ip);
        next.services.insert(key, ip);
    }
    Ok(())
}

/// A UUID-shaped identifier, stable for the same input.
fn make_uid(seed: &str) -> String {
    let a = net::fnv1a(seed.as_bytes());
    let b = net::fnv1a(format!("{seed}#").as_bytes());
    let hex = format!("{a:016x}{b:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Every Service with its ports and the endpoints kube-proxy balances over: from its
/// EndpointSlices when it has any (as kube-proxy does), else from its selector over the
/// pods with an address (named target ports resolved through the pods' container ports).
pub fn services(state: &State) -> Vec<ServiceView> {
    let pod_objects: BTreeMap<String, &Value> = state
        .resources
        .iter()
        .filter(|o| kind_of(o) == "Pod")
        .map(|o| {
            let name = str_at(o, "/metadata/name").unwrap_or_default();
            (pod_key(namespace_of(o), name), o)
        })
        .collect();
    let mut views = Vec::new();
    for obj in state.resources.iter().filter(|o| kind_of(o) == "Service") {
        let namespace = namespace_of(obj);
        let name = str_at(obj, "/metadata/name").unwrap_or_default();
        let slices: Vec<&Value> = state
            .resources
            .iter()
            .filter(|o| {
                kind_of(o) == "EndpointSlice"
                    && namespace_of(o) == namespace
                    && str_at(o, "/metadata/labels/kubernetes.io~1service-name") == Some(name)
            })
            .collect();
        let selector = obj
            .pointer("/spec/selector")
            .and_then(Value::as_object)
            .filter(|s| !s.is_empty());
        let mut ports = Vec::new();
        for sp in obj
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            // Lenient: a malformed port is mesh-node's to reject, not a reason to stop.
            let Some(port) = sp.get("port").and_then(as_port) else {
                continue;
            };
            let port_name = sp
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty());
            let protocol = match sp.get("protocol").and_then(Value::as_str) {
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                _ => Protocol::Tcp,
            };
            let endpoints = if !slices.is_empty() {
                slice_endpoints(&slices, port_name)
            } else if let Some(selector) = selector {
                state
                    .pods
                    .values()
                    .filter(|p| p.namespace == namespace)
                    .filter_map(|p| {
                        let pod = pod_objects.get(&p.key())?;
                        let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
                        let matches = selector
                            .iter()
                            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
                        if !matches {
                            return None;
                        }
                        let target = match sp.get("targetPort") {
                            None => port,
                            Some(Value::String(named)) => launch::named_port(pod, named)?,
                            Some(t) => as_port(t)?,
                        };
                        Some((p.ip, target))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            ports.push(PortView {
                name: port_name.map(str::to_string),
                port,
                protocol,
                endpoints,
            });
        }
        views.push(ServiceView {
            namespace: namespace.to_string(),
            name: name.to_string(),
            cluster_ip: state.services.get(&pod_key(namespace, name)).copied(),
            ports,
        });
    }
    views
}

fn slice_endpoints(slices: &[&Value], port_name: Option<&str>) -> Vec<(Ipv4Addr, u16)> {
    let mut endpoints = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| {
                p.get("name")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                    == port_name
            })
            .and_then(|p| p.get("port").and_then(as_port))
        else {
            continue;
        };
        for ep in slice
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if ep.pointer("/conditions/ready") == Some(&Value::Bool(false)) {
                continue;
            }
            for addr in ep
                .get("addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(ip) = addr.as_str().and_then(|a| a.parse().ok()) {
                    endpoints.push((ip, port));
                }
            }
        }
    }
    endpoints
}

pub fn as_port(v: &Value) -> Option<u16> {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cluster::config::parse;

    fn pod(name: &str, node: Option<&str>, app: &str) -> Value {
        let mut spec = json!({
            "containers": [{
                "name": "app",
                "command": ["weft-demo", "serve"],
                "ports": [{"name": "http", "containerPort": 9080}],
            }]
        });
        if let Some(node) = node {
            spec["nodeName"] = json!(node);
        }
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": {"app": app}}, "spec": spec})
    }

    fn service(name: &str, extra: Value) -> Value {
        let mut spec =
            json!({"selector": {"app": name}, "ports": [{"name": "http", "port": 9080}]});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
    }

    fn up(resources: Vec<Value>) -> State {
        plan(&State::empty(true), resources).unwrap().0
    }

    #[test]
    fn nodes_are_numbered_in_order_of_appearance() {
        let state = up(vec![
            pod("a", Some("node-2"), "a"),
            pod("b", Some("node-1"), "b"),
            pod("c", Some("node-2"), "c"),
        ]);
        let nodes: Vec<(&str, u8)> = state.nodes.iter().map(|n| (&*n.name, n.index)).collect();
        assert_eq!(nodes, [("node-2", 1), ("node-1", 2)]);
        assert_eq!(state.pods["default/a"].ip, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(state.pods["default/b"].ip, Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(state.pods["default/c"].ip, Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(state.pods["default/a"].netns, "wp-node-2-default-a");
    }

    #[test]
    fn unscheduled_pods_spread_over_nodes() {
        let state = up(vec![pod("a", None, "a"), pod("b", None, "b")]);
        assert_eq!(state.nodes.len(), 1, "a default node is made");
        assert_eq!(state.pods["default/b"].node, "node-1");

        let state = up(vec![
            pod("a", Some("node-1"), "a"),
            pod("b", Some("node-2"), "b"),
            pod("c", Some("node-1"), "c"),
            pod("d", None, "d"),
        ]);
        assert_eq!(state.pods["default/d"].node, "node-2");
    }

    #[test]
    fn label_changes_keep_pods_and_spec_changes_recreate_them() {
        let (first, diff) = plan(
            &State::empty(true),
            vec![pod("a", Some("node-1"), "a"), pod("b", Some("node-1"), "b")],
        )
        .unwrap();
        assert_eq!(diff.added.len(), 2);
        assert_eq!(diff.new_nodes.len(), 1);

        let mut relabelled = pod("a", Some("node-1"), "a");
        relabelled["metadata"]["labels"]["version"] = json!("v9");
        let mut changed = pod("b", Some("node-1"), "b");
        changed["spec"]["containers"][0]["args"] = json!(["--port", "1"]);
        let (second, diff) = plan(
            &first,
            vec![relabelled, changed, pod("c", Some("node-2"), "c")],
        )
        .unwrap();
        assert_eq!(second.pods["default/a"], first.pods["default/a"]);
        let removed: Vec<&str> = diff.removed.iter().map(|p| &*p.name).collect();
        let added: Vec<&str> = diff.added.iter().map(|p| &*p.name).collect();
        assert_eq!(removed, ["b"]);
        assert_eq!(added, ["b", "c"]);
        assert_eq!(second.pods["default/b"].ip, first.pods["default/b"].ip);
        assert_ne!(second.pods["default/b"].uid, first.pods["default/b"].uid);
        assert_eq!(diff.new_nodes.len(), 1);
        assert_eq!(second.node("node-2").unwrap().index, 2);

        let (third, diff) = plan(&second, vec![pod("c", Some("node-2"), "c")]).unwrap();
        assert_eq!(diff.removed.len(), 2);
        assert!(diff.added.is_empty());
        assert_eq!(
            third.nodes.len(),
            2,
            "nodes stay until the cluster goes down"
        );
    }

    #[test]
    fn freed_pod_addresses_are_reused_lowest_first() {
        let first = up(vec![
            pod("a", Some("node-1"), "a"),
            pod("b", Some("node-1"), "b"),
            pod("c", Some("node-1"), "c"),
        ]);
        let (second, _) = plan(
            &first,
            vec![
                pod("a", Some("node-1"), "a"),
                pod("c", Some("node-1"), "c"),
                pod("d", Some("node-1"), "d"),
            ],
        )
        .unwrap();
        assert_eq!(second.pods["default/c"].ip, Ipv4Addr::new(10, 244, 1, 4));
        assert_eq!(second.pods["default/d"].ip, Ipv4Addr::new(10, 244, 1, 3));
    }

    #[test]
    fn cluster_ips_are_stable_explicit_or_allocated() {
        let first = up(vec![
            service("a", json!({})),
            service("b", json!({"clusterIP": "10.96.0.10"})),
            service("c", json!({"clusterIP": "None"})),
            service("d", json!({"clusterIP": ""})),
        ]);
        assert_eq!(first.services["default/b"], Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(first.services["default/a"], Ipv4Addr::new(10, 96, 0, 11));
        assert_eq!(first.services["default/d"], Ipv4Addr::new(10, 96, 0, 12));
        assert!(!first.services.contains_key("default/c"));

        let (second, _) = plan(
            &first,
            vec![service("e", json!({})), service("a", json!({}))],
        )
        .unwrap();
        assert_eq!(second.services["default/a"], Ipv4Addr::new(10, 96, 0, 11));
        assert_eq!(second.services["default/e"], Ipv4Addr::new(10, 96, 0, 10));
    }

    #[test]
    fn endpoints_follow_selectors_and_named_target_ports() {
        let mut v2 = pod("reviews-v2", Some("node-2"), "reviews");
        v2["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(9081);
        let state = up(vec![
            pod("reviews-v1", Some("node-1"), "reviews"),
            v2,
            pod("ratings-v1", Some("node-1"), "ratings"),
            service(
                "reviews",
                json!({"ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
            ),
            service(
                "ratings",
                json!({"ports": [{"port": 9080, "targetPort": 9090, "protocol": "UDP"}]}),
            ),
            service("nothing", json!({})),
        ]);
        let views = services(&state);
        assert_eq!(views.len(), 3);
        assert_eq!(views[0].cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(
            views[0].ports,
            [PortView {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
                endpoints: vec![
                    (Ipv4Addr::new(10, 244, 1, 2), 9080),
                    (Ipv4Addr::new(10, 244, 2, 2), 9081)
                ],
            }]
        );
        assert_eq!(views[1].ports[0].protocol, Protocol::Udp);
        assert_eq!(
            views[1].ports[0].endpoints,
            [(Ipv4Addr::new(10, 244, 1, 3), 9090)]
        );
        assert!(views[2].ports[0].endpoints.is_empty());
    }

    #[test]
    fn endpoint_slices_override_selectors() {
        let docs = parse(
            r#"
kind: Service
metadata: {name: ext}
spec:
  selector: {app: ext}
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: other, port: 1}]
endpoints:
- addresses: [192.0.2.1]
- addresses: [192.0.2.2]
  conditions: {ready: false}
"#,
            "t",
        )
        .unwrap();
        let mut resources = docs;
        resources.push(pod("ext-pod", Some("node-1"), "ext"));
        let state = up(resources);
        assert_eq!(
            services(&state)[0].ports[0].endpoints,
            [(Ipv4Addr::new(192, 0, 2, 1), 8080)]
        );
    }

    #[test]
    fn rejects_unsafe_names() {
        let err = plan(&State::empty(true), vec![pod("../x", Some("node-1"), "a")]).unwrap_err();
        assert!(err.to_string().contains("DNS-1123"), "{err}");
        let err = plan(&State::empty(true), vec![pod("x", Some("Node_1"), "a")]).unwrap_err();
        assert!(err.to_string().contains("node name"), "{err}");
    }

    #[test]
    fn uids_look_like_uuids() {
        let uid = make_uid("default/a/0/1");
        assert_eq!(uid.len(), 36);
        assert_eq!(uid.matches('-').count(), 4);
        assert_eq!(uid, make_uid("default/a/0/1"));
    }
}
