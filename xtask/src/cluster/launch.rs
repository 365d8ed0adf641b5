//! How a pod's containers become processes. The image is ignored: each container runs its
//! `command` + `args` on this machine, with its `env` (Kubernetes' `$(VAR)` expansion and
//! the downward-API `fieldRef`s included) plus POD_NAME, POD_NAMESPACE, POD_IP and NODE_NAME.
//! `weft-demo` and `mesh-node` resolve to the binaries of this workspace.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::{
    config::str_at,
    plan::as_port,
    state::{NodeInfo, PodInfo},
    Binaries,
};

/// Commands that name a binary built from this workspace rather than one on PATH.
const BUILT: [&str; 2] = ["weft-demo", "mesh-node"];

/// One container, ready to start.
#[derive(Debug, PartialEq, Eq)]
pub struct Launch {
    pub container: String,
    pub argv: Vec<String>,
    /// Added to the environment xtask itself runs with.
    pub env: Vec<(String, String)>,
}

fn containers_of(pod: &Value) -> &[Value] {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn strings(v: Option<&Value>, what: &str) -> Result<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{what}: {i} is not a string"))
            })
            .collect(),
        Some(other) => bail!("{what}: {other} is not a list"),
    }
}

/// Fails on what the virtual cluster cannot run: no containers, a container without a
/// command (there is no image to take one from), unsupported `valueFrom`.
pub fn check(pod: &Value) -> Result<()> {
    let containers = containers_of(pod);
    if containers.is_empty() {
        bail!("spec.containers is empty");
    }
    for (i, c) in containers.iter().enumerate() {
        let what = format!("spec.containers[{i}]");
        if strings(c.get("command"), &format!("{what}.command"))?.is_empty() {
            bail!("{what}.command is required: images are not run, commands are");
        }
        strings(c.get("args"), &format!("{what}.args"))?;
        for e in c.get("env").and_then(Value::as_array).into_iter().flatten() {
            let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
            if let Some(from) = e.get("valueFrom") {
                let path = str_at(from, "/fieldRef/fieldPath").with_context(|| {
                    format!("{what}.env {name}: only valueFrom.fieldRef is supported")
                })?;
                check_field(path)
                    .with_context(|| format!("{what}.env {name}: fieldPath {path}"))?;
            }
        }
    }
    Ok(())
}

/// Declared TCP container ports, sorted: the pod counts as ready when each one listens.
pub fn tcp_ports(pod: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = containers_of(pod)
        .iter()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter(|p| {
            matches!(
                p.get("protocol").and_then(Value::as_str),
                None | Some("TCP")
            )
        })
        .filter_map(|p| p.get("containerPort").and_then(as_port))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The container port named `name`, for Services with a named `targetPort`.
pub fn named_port(pod: &Value, name: &str) -> Option<u16> {
    containers_of(pod)
        .iter()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| p.get("containerPort").and_then(as_port))
}

/// Whether any container runs a binary of this workspace (so it must be built first).
pub fn needs_binaries(pod: &Value) -> bool {
    containers_of(pod).iter().any(|c| {
        c.pointer("/command/0")
            .and_then(Value::as_str)
            .is_some_and(|cmd| BUILT.contains(&cmd))
    })
}

/// `argv[0]` with `weft-demo` / `mesh-node` replaced by the built binary.
pub fn resolve(program: &str, bins: Option<&Binaries>) -> Result<PathBuf> {
    Ok(match (program, bins) {
        ("weft-demo", Some(b)) => b.weft_demo.clone(),
        ("mesh-node", Some(b)) => b.mesh_node.clone(),
        (p, None) if BUILT.contains(&p) => {
            bail!("{p} is not built (the cluster was started without the workspace binaries)")
        }
        (p, _) => PathBuf::from(p),
    })
}

/// PATH with the directory of the built binaries first, so that shells and scripts inside
/// a pod find `weft-demo` too.
pub fn path_with(bins: Option<&Binaries>) -> Option<String> {
    let dir = bins?.weft_demo.parent()?.display().to_string();
    let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    Some(format!("{dir}:{rest}"))
}

/// Every container of `pod` (the object as the user wrote it) as a process to start.
pub fn containers(
    obj: &Value,
    pod: &PodInfo,
    node: &NodeInfo,
    bins: Option<&Binaries>,
) -> Result<Vec<Launch>> {
    let mut base = vec![
        ("POD_NAME".to_string(), pod.name.clone()),
        ("POD_NAMESPACE".to_string(), pod.namespace.clone()),
        ("POD_IP".to_string(), pod.ip.to_string()),
        ("NODE_NAME".to_string(), pod.node.clone()),
        ("HOSTNAME".to_string(), pod.name.clone()),
    ];
    if let Some(path) = path_with(bins) {
        base.push(("PATH".to_string(), path));
    }
    let mut launches = Vec::new();
    for (i, c) in containers_of(obj).iter().enumerate() {
        let container = c
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("container-{i}"));
        let mut env = base.clone();
        for e in c.get("env").and_then(Value::as_array).into_iter().flatten() {
            let Some(name) = e.get("name").and_then(Value::as_str) else {
                continue;
            };
            let value = match e.get("valueFrom") {
                Some(from) => {
                    let path = str_at(from, "/fieldRef/fieldPath").unwrap_or_default();
                    field_value(obj, pod, node, path)?
                }
                None => expand(
                    e.get("value").and_then(Value::as_str).unwrap_or_default(),
                    &env,
                ),
            };
            env.retain(|(k, _)| k != name);
            env.push((name.to_string(), value));
        }
        let mut argv = strings(c.get("command"), "command")?;
        argv.extend(strings(c.get("args"), "args")?);
        let argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
        let program = resolve(&argv[0], bins)?;
        let mut argv = argv;
        argv[0] = program.display().to_string();
        launches.push(Launch {
            container,
            argv,
            env,
        });
    }
    Ok(launches)
}

/// A downward-API field, checked at plan time (values such as the pod IP come later).
fn check_field(path: &str) -> Result<()> {
    match path {
        "metadata.name"
        | "metadata.namespace"
        | "metadata.uid"
        | "spec.nodeName"
        | "spec.serviceAccountName"
        | "status.podIP"
        | "status.hostIP" => Ok(()),
        p if label_ref(p).is_some() => Ok(()),
        _ => bail!(
            "unsupported; supported: metadata.name, metadata.namespace, metadata.uid, \
             metadata.labels['k'], metadata.annotations['k'], spec.nodeName, \
             spec.serviceAccountName, status.podIP, status.hostIP"
        ),
    }
}

fn field_value(obj: &Value, pod: &PodInfo, node: &NodeInfo, path: &str) -> Result<String> {
    Ok(match path {
        "metadata.name" => pod.name.clone(),
        "metadata.namespace" => pod.namespace.clone(),
        "metadata.uid" => pod.uid.clone(),
        "spec.nodeName" => pod.node.clone(),
        "spec.serviceAccountName" => str_at(obj, "/spec/serviceAccountName")
            .unwrap_or("default")
            .to_string(),
        "status.podIP" => pod.ip.to_string(),
        "status.hostIP" => node.address().to_string(),
        p => {
            let (map, key) = label_ref(p).with_context(|| format!("fieldPath {p}"))?;
            obj.pointer(&format!("/metadata/{map}"))
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        }
    })
}

/// `metadata.labels['k']` → ("labels", "k").
fn label_ref(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("metadata.")?;
    let (map, key) = rest.split_once("['")?;
    let key = key.strip_suffix("']")?;
    matches!(map, "labels" | "annotations").then_some((map, key))
}

/// Kubernetes' `$(VAR)` expansion: known variables are replaced, unknown references stay as
/// written, `$$` escapes a `$`.
fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use serde_json::json;

    use super::*;

    fn pod_info() -> PodInfo {
        PodInfo {
            namespace: "default".into(),
            name: "reviews-v1".into(),
            node: "node-1".into(),
            ip: Ipv4Addr::new(10, 244, 1, 3),
            netns: "wp-node-1-default-reviews-v1".into(),
            veth: "wv00000000".into(),
            uid: "u-1".into(),
            spec_hash: String::new(),
            ports: vec![],
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-1".into(),
            index: 1,
        }
    }

    fn bins() -> Binaries {
        Binaries {
            mesh_node: "/t/debug/mesh-node".into(),
            weft_demo: "/t/debug/weft-demo".into(),
            weft_cni: "/t/debug/weft-cni".into(),
        }
    }

    #[test]
    fn builds_argv_and_env() {
        let obj = json!({
            "kind": "Pod",
            "metadata": {"name": "reviews-v1", "labels": {"version": "v1"}},
            "spec": {"containers": [{
                "name": "app",
                "command": ["weft-demo", "serve"],
                "args": ["--version", "$(VERSION)", "--node=$(NODE_NAME)", "$$(KEEP)", "$(UNKNOWN)"],
                "env": [
                    {"name": "VERSION", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['version']"}}},
                    {"name": "ADDR", "value": "$(POD_IP):9080"},
                    {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                ],
                "ports": [{"containerPort": 9080}, {"containerPort": 53, "protocol": "UDP"}]
            }, {
                "name": "shell",
                "command": ["sh", "-c", "sleep 1"],
                "ports": [{"containerPort": 15000, "name": "admin"}]
            }]}
        });
        check(&obj).unwrap();
        assert!(needs_binaries(&obj));
        assert_eq!(tcp_ports(&obj), [9080, 15000]);
        assert_eq!(named_port(&obj, "admin"), Some(15000));
        let launches = containers(&obj, &pod_info(), &node(), Some(&bins())).unwrap();
        assert_eq!(launches.len(), 2);
        let app = &launches[0];
        assert_eq!(
            app.argv,
            [
                "/t/debug/weft-demo",
                "serve",
                "--version",
                "v1",
                "--node=node-1",
                "$(KEEP)",
                "$(UNKNOWN)"
            ]
        );
        let env = |k: &str| {
            app.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(env("POD_NAME"), Some("reviews-v1"));
        assert_eq!(env("POD_NAMESPACE"), Some("default"));
        assert_eq!(env("POD_IP"), Some("10.244.1.3"));
        assert_eq!(env("NODE_NAME"), Some("node-1"));
        assert_eq!(env("ADDR"), Some("10.244.1.3:9080"));
        assert_eq!(env("HOST"), Some("172.31.0.11"));
        assert!(env("PATH").unwrap().starts_with("/t/debug:"));
        assert_eq!(launches[1].argv, ["sh", "-c", "sleep 1"]);
    }

    #[test]
    fn rejects_what_cannot_run() {
        let no_command = json!({"spec": {"containers": [{"name": "a", "image": "nginx"}]}});
        assert!(check(&no_command)
            .unwrap_err()
            .to_string()
            .contains("command is required"));
        assert!(check(&json!({"spec": {}})).is_err());
        let secret = json!({"spec": {"containers": [{"command": ["x"], "env": [
            {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}});
        assert!(format!("{:#}", check(&secret).unwrap_err()).contains("fieldRef"));
    }

    #[test]
    fn built_commands_need_the_binaries() {
        assert_eq!(
            resolve("weft-demo", Some(&bins())).unwrap(),
            Path::new("/t/debug/weft-demo")
        );
        assert_eq!(resolve("curl", None).unwrap(), Path::new("curl"));
        assert!(resolve("mesh-node", None).is_err());
    }

    #[test]
    fn expansion_edge_cases() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("$(A)$(A)", &env), "11");
        assert_eq!(expand("$A $( $", &env), "$A $( $");
        assert_eq!(expand("$$(A)", &env), "$(A)");
    }
}
