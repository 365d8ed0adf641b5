//! `cargo xtask cluster status`: nodes, pods and Services at a glance, with what is
//! running right now (read from the cgroups and the node proxies, not from the state file).

use std::fmt::Write as _;

use super::{cgroup, plan, ready, state::State};

pub fn render(state: &State) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "generation {}; configuration in {}, logs in {}",
        state.generation,
        super::state::config_dir().display(),
        super::state::log_dir().display()
    );

    let mut nodes = vec![row(["NODE", "ADDRESS", "POD CIDR", "MESH-NODE"])];
    for node in &state.nodes {
        let pids = cgroup::procs(&node.proxy_cgroup());
        let proxy = if !state.mesh {
            "not started (WEFT_CLUSTER_NO_MESH)".to_string()
        } else if pids.is_empty() {
            format!("not running (see {})", node.log().display())
        } else if ready::node_ready(node) {
            match ready::node_config(node).and_then(|c| c.generation) {
                Some(g) => format!("ready, generation {g}, pid {}", join(&pids)),
                None => format!("ready, pid {}", join(&pids)),
            }
        } else {
            format!("not ready, pid {}", join(&pids))
        };
        nodes.push(vec![
            node.name.clone(),
            node.address().to_string(),
            node.pod_cidr(),
            proxy,
        ]);
    }
    out.push('\n');
    out.push_str(&table(&nodes));

    let mut pods = vec![row(["POD", "NODE", "IP", "STATUS"])];
    for pod in state.pods.values() {
        let pids = cgroup::procs(&pod.cgroup());
        let status = if pids.is_empty() {
            format!("exited (see {})", pod.log().display())
        } else {
            format!("running, pid {}", join(&pids))
        };
        pods.push(vec![
            pod.key(),
            pod.node.clone(),
            pod.ip.to_string(),
            status,
        ]);
    }
    out.push('\n');
    out.push_str(&table(&pods));

    let mut services = vec![row(["SERVICE", "CLUSTER-IP", "PORT", "ENDPOINTS"])];
    for svc in plan::services(state) {
        let ip = svc
            .cluster_ip
            .map_or_else(|| "None".to_string(), |ip| ip.to_string());
        if svc.ports.is_empty() {
            services.push(vec![
                format!("{}/{}", svc.namespace, svc.name),
                ip.clone(),
                "-".into(),
                "-".into(),
            ]);
        }
        for port in &svc.ports {
            let name = port
                .name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let endpoints = if port.endpoints.is_empty() {
                "<none>".to_string()
            } else {
                port.endpoints
                    .iter()
                    .map(|(ip, p)| format!("{ip}:{p}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            services.push(vec![
                format!("{}/{}", svc.namespace, svc.name),
                ip.clone(),
                format!(
                    "{}/{}{name}",
                    port.port,
                    format!("{:?}", port.protocol).to_uppercase()
                ),
                endpoints,
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table(&services));
    out
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let rows = vec![
            row(["POD", "IP", "STATUS"]),
            row(["default/productpage-v1", "10.244.1.2", "running"]),
            row(["a/b", "10.244.2.10", "exited"]),
        ];
        assert_eq!(
            table(&rows),
            "POD                     IP           STATUS\n\
             default/productpage-v1  10.244.1.2   running\n\
             a/b                     10.244.2.10  exited\n"
        );
    }
}
