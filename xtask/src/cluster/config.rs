//! Kubernetes YAML in and out: reading the user's files, merging them by kind/namespace/name
//! as `kubectl apply` would, and rendering the effective configuration every mesh-node reads
//! (the user's objects completed with what a real cluster's control plane would fill in).

use std::{collections::BTreeSet, fmt, fs, path::Path};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize as _;
use serde_json::{json, Map, Value};

use super::state::State;

/// Annotation telling mesh-node where a pod's cgroup is (in Kubernetes the agent derives it
/// from the pod UID instead).
pub const CGROUP_ANNOTATION: &str = "weft.io/cgroup-path";

/// Kinds without a namespace; every other kind defaults to `default`.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "GatewayClass",
];

/// What identifies a resource: a second object with the same key replaces the first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

pub fn key(obj: &Value) -> Result<Key> {
    let kind = str_at(obj, "/kind").context("document without `kind`")?;
    let name =
        str_at(obj, "/metadata/name").with_context(|| format!("{kind} without `metadata.name`"))?;
    let namespace = (!CLUSTER_SCOPED.contains(&kind)).then(|| namespace_of(obj).to_string());
    Ok(Key {
        kind: kind.to_string(),
        namespace,
        name: name.to_string(),
    })
}

/// `metadata.namespace`, defaulting to `default` like kubectl.
pub fn namespace_of(obj: &Value) -> &str {
    str_at(obj, "/metadata/namespace").unwrap_or("default")
}

pub fn str_at<'a>(obj: &'a Value, pointer: &str) -> Option<&'a str> {
    obj.pointer(pointer).and_then(Value::as_str)
}

pub fn kind_of(obj: &Value) -> &str {
    str_at(obj, "/kind").unwrap_or("")
}

/// Reads one file, or every `*.yaml`, `*.yml` and `*.json` file of a directory (not
/// recursively, in name order, like `kubectl apply -f DIR`).
pub fn load(path: &Path) -> Result<Vec<Value>> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
            let file = entry?.path();
            let ext = file.extension().and_then(|e| e.to_str());
            if file.is_file() && matches!(ext, Some("yaml" | "yml" | "json")) {
                files.push(file);
            }
        }
        files.sort();
        if files.is_empty() {
            bail!("{} holds no *.yaml, *.yml or *.json file", path.display());
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut docs = Vec::new();
    for file in files {
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        docs.extend(parse(&text, &file.display().to_string())?);
    }
    Ok(docs)
}

/// Parses multi-document YAML (JSON is YAML too); empty documents are skipped and `v1 List`
/// objects flattened. Every object needs a kind and a name; anything else is left for
/// mesh-node to judge, so a deliberately invalid resource still reaches it.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc)
            .with_context(|| format!("{origin}: document {} is not valid YAML", i + 1))?;
        let items = match value {
            Value::Null => continue,
            Value::Object(ref o) if o.get("kind").and_then(Value::as_str) == Some("List") => {
                match o.get("items") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                }
            }
            Value::Object(_) => vec![value],
            _ => bail!("{origin}: document {} is not an object", i + 1),
        };
        for item in items {
            key(&item).with_context(|| format!("{origin}: document {}", i + 1))?;
            docs.push(item);
        }
    }
    Ok(docs)
}

/// Adds `new` to `resources`: an object with the key of an existing one replaces it in place,
/// others are appended (order matters: it decides node numbering).
pub fn merge(resources: &mut Vec<Value>, new: Vec<Value>) -> Result<()> {
    for obj in new {
        let k = key(&obj)?;
        match position(resources, &k)? {
            Some(i) => resources[i] = obj,
            None => resources.push(obj),
        }
    }
    Ok(())
}

/// Removes every resource with the key of one of `gone`; returns how many were found.
pub fn remove(resources: &mut Vec<Value>, gone: &[Value]) -> Result<usize> {
    let keys = gone.iter().map(key).collect::<Result<BTreeSet<_>>>()?;
    let before = resources.len();
    let mut err = None;
    resources.retain(|obj| match key(obj) {
        Ok(k) => !keys.contains(&k),
        Err(e) => {
            err.get_or_insert(e);
            true
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    Ok(before - resources.len())
}

fn position(resources: &[Value], k: &Key) -> Result<Option<usize>> {
    for (i, obj) in resources.iter().enumerate() {
        if key(obj)? == *k {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// The configuration every mesh-node reads: Node objects for every node; Pods with
/// `spec.nodeName`, `status.podIP` and the cgroup annotation; Services with their ClusterIP;
/// Namespaces a real cluster would have (`default`, and any a resource lives in); everything
/// else as the user wrote it.
pub fn render_effective(state: &State) -> Result<String> {
    let mut out: Vec<Value> = Vec::new();
    let declared_namespaces: BTreeSet<&str> = state
        .resources
        .iter()
        .filter(|o| kind_of(o) == "Namespace")
        .filter_map(|o| str_at(o, "/metadata/name"))
        .collect();
    let mut used_namespaces = BTreeSet::from(["default"]);
    for obj in &state.resources {
        if !CLUSTER_SCOPED.contains(&kind_of(obj)) {
            used_namespaces.insert(namespace_of(obj));
        }
    }
    for ns in used_namespaces.difference(&declared_namespaces) {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }

    for node in &state.nodes {
        let user = state.resources.iter().find(|o| {
            kind_of(o) == "Node" && str_at(o, "/metadata/name") == Some(node.name.as_str())
        });
        let mut obj = user.cloned().unwrap_or_else(
            || json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}),
        );
        set(&mut obj, &["spec", "podCIDR"], json!(node.pod_cidr()));
        set(
            &mut obj,
            &["status", "addresses"],
            json!([
                {"type": "InternalIP", "address": node.address().to_string()},
                {"type": "Hostname", "address": node.name},
            ]),
        );
        out.push(obj);
    }

    for obj in &state.resources {
        let mut obj = obj.clone();
        match kind_of(&obj) {
            "Node" => continue,
            "Pod" => {
                let k = key(&obj)?;
                let ns = k.namespace.unwrap_or_default();
                let pod = state
                    .pods
                    .get(&super::state::pod_key(&ns, &k.name))
                    .with_context(|| format!("pod {ns}/{} has no allocation", k.name))?;
                let node = state.node(&pod.node).context("pod on an unknown node")?;
                set(&mut obj, &["metadata", "namespace"], json!(ns));
                if obj.pointer("/metadata/uid").is_none() {
                    set(&mut obj, &["metadata", "uid"], json!(pod.uid));
                }
                set(
                    &mut obj,
                    &["metadata", "annotations", CGROUP_ANNOTATION],
                    json!(pod.cgroup().display().to_string()),
                );
                set(&mut obj, &["spec", "nodeName"], json!(pod.node));
                set(
                    &mut obj,
                    &["status"],
                    json!({
                        "phase": "Running",
                        "hostIP": node.address().to_string(),
                        "podIP": pod.ip.to_string(),
                        "podIPs": [{"ip": pod.ip.to_string()}],
                    }),
                );
            }
            "Service" => {
                let k = key(&obj)?;
                let ns = k.namespace.unwrap_or_default();
                set(&mut obj, &["metadata", "namespace"], json!(ns));
                if let Some(ip) = state.services.get(&super::state::pod_key(&ns, &k.name)) {
                    set(&mut obj, &["spec", "clusterIP"], json!(ip.to_string()));
                    set(&mut obj, &["spec", "clusterIPs"], json!([ip.to_string()]));
                }
            }
            _ => {}
        }
        out.push(obj);
    }

    let mut text = String::new();
    for obj in out {
        text.push_str("---\n");
        text.push_str(&yaml_serde::to_string(&obj)?);
    }
    Ok(text)
}

/// Sets `obj[path...] = value`, creating (or replacing non-object) intermediate maps.
fn set(obj: &mut Value, path: &[&str], value: Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cur = obj;
    for part in parents {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        cur = cur
            .as_object_mut()
            .expect("just made an object")
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    cur.as_object_mut()
        .expect("just made an object")
        .insert(last.to_string(), value);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::cluster::state::{NodeInfo, PodInfo};

    const DOCS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {weft.io/mesh: enabled}
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: reviews-v1, labels: {app: reviews}}
  spec:
    nodeName: node-1
    containers: [{name: app, command: [weft-demo]}]
"#;

    #[test]
    fn parses_multi_documents_and_lists() {
        let docs = parse(DOCS, "test.yaml").unwrap();
        let keys: Vec<String> = docs.iter().map(|d| key(d).unwrap().to_string()).collect();
        assert_eq!(
            keys,
            [
                "Namespace default",
                "Service default/reviews",
                "Pod default/reviews-v1"
            ]
        );
    }

    #[test]
    fn rejects_documents_without_a_name() {
        let err = parse("kind: Pod\nmetadata: {}\n", "bad.yaml").unwrap_err();
        assert!(
            format!("{err:#}").contains("bad.yaml: document 1"),
            "{err:#}"
        );
        assert!(format!("{err:#}").contains("metadata.name"), "{err:#}");
    }

    #[test]
    fn merge_replaces_by_kind_namespace_and_name() {
        let mut resources = parse(DOCS, "a").unwrap();
        let update = parse(
            "kind: Service\nmetadata: {name: reviews, namespace: default}\nspec: {}\n---\n\
             kind: Service\nmetadata: {name: reviews, namespace: other}\n---\n\
             kind: ConfigMap\nmetadata: {name: reviews}\n",
            "b",
        )
        .unwrap();
        merge(&mut resources, update).unwrap();
        assert_eq!(resources.len(), 5);
        assert_eq!(resources[1]["spec"], json!({}), "replaced in place");
        assert_eq!(namespace_of(&resources[3]), "other");
        assert_eq!(kind_of(&resources[4]), "ConfigMap");
    }

    #[test]
    fn remove_matches_keys_only() {
        let mut resources = parse(DOCS, "a").unwrap();
        let gone = parse(
            "kind: Pod\nmetadata: {name: reviews-v1}\n---\nkind: Pod\nmetadata: {name: nope}\n",
            "b",
        )
        .unwrap();
        assert_eq!(remove(&mut resources, &gone).unwrap(), 1);
        assert_eq!(resources.len(), 2);
    }

    fn state() -> State {
        let mut state = State::empty(true);
        state.resources = parse(DOCS, "a").unwrap();
        state.resources.push(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "shop"}, "spec": {"hosts": ["reviews"]}
        }));
        state.nodes.push(NodeInfo {
            name: "node-1".into(),
            index: 1,
        });
        state.pods.insert(
            "default/reviews-v1".into(),
            PodInfo {
                namespace: "default".into(),
                name: "reviews-v1".into(),
                node: "node-1".into(),
                ip: Ipv4Addr::new(10, 244, 1, 2),
                netns: "wp-node-1-default-reviews-v1".into(),
                veth: "wv01234567".into(),
                uid: "uid-1".into(),
                spec_hash: "h".into(),
                ports: vec![],
            },
        );
        state
            .services
            .insert("default/reviews".into(), Ipv4Addr::new(10, 96, 0, 10));
        state
    }

    #[test]
    fn effective_config_completes_pods_services_and_nodes() {
        let text = render_effective(&state()).unwrap();
        let docs = parse(&text, "effective").unwrap();
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| kind_of(d) == kind && str_at(d, "/metadata/name") == Some(name))
                .unwrap_or_else(|| panic!("{kind} {name} missing in:\n{text}"))
        };
        let node = find("Node", "node-1");
        assert_eq!(node["status"]["addresses"][0]["type"], "InternalIP");
        assert_eq!(node["status"]["addresses"][0]["address"], "172.31.0.11");

        let pod = find("Pod", "reviews-v1");
        assert_eq!(pod["metadata"]["namespace"], "default");
        assert_eq!(pod["metadata"]["uid"], "uid-1");
        assert_eq!(pod["metadata"]["labels"]["app"], "reviews");
        assert_eq!(
            pod["metadata"]["annotations"][CGROUP_ANNOTATION],
            "/sys/fs/cgroup/unified/weft-cluster/node-1/pods/default_reviews-v1"
        );
        assert_eq!(pod["spec"]["nodeName"], "node-1");
        assert_eq!(pod["status"]["podIP"], "10.244.1.2");

        let svc = find("Service", "reviews");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(svc["spec"]["ports"][0]["port"], 9080);

        // Passed through untouched, and its namespace exists as in a real cluster.
        assert_eq!(
            find("VirtualService", "reviews")["spec"]["hosts"][0],
            "reviews"
        );
        assert!(find("Namespace", "shop")["metadata"]
            .get("labels")
            .is_none());
        assert_eq!(
            find("Namespace", "default")["metadata"]["labels"]["weft.io/mesh"],
            "enabled"
        );
        let namespaces = docs.iter().filter(|d| kind_of(d) == "Namespace").count();
        assert_eq!(namespaces, 2, "default is declared once, not twice");
    }
}
