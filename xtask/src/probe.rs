//! Looking at a running virtual cluster from outside: node proxies' metrics, pod addresses and
//! requests made from inside pods. Shared by the demo and the end-to-end tests.

use std::collections::BTreeMap;

use anyhow::{anyhow, ensure, Context as _, Result};

use crate::cluster;

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Runs `cmd` in `target` and returns its stdout, failing with its stderr on a non-zero exit.
pub fn run(target: &str, cmd: &[&str]) -> Result<String> {
    let out = cluster::exec(target, &args(cmd))?;
    ensure!(
        out.status.success(),
        "{target}: `{}` failed: {}{}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prometheus text of a node proxy.
pub fn metrics(node: &str) -> Result<String> {
    run(
        &format!("node/{node}"),
        &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
    )
    .with_context(|| format!("reading node {node}'s metrics"))
}

/// Sum of the samples of metric `name` whose labels include every `label="value"` of `labels`.
pub fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // An empty f64 sum is -0.0; report a plain zero.
        .sum::<f64>()
        + 0.0
}

/// The node's `weft_ebpf_<name>_total` counters by `<name>`.
pub fn ebpf_counters(node: &str) -> Result<BTreeMap<String, f64>> {
    Ok(parse_ebpf_counters(&metrics(node)?))
}

fn parse_ebpf_counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.strip_prefix("weft_ebpf_")?.rsplit_once(' ')?;
            Some((
                name.trim_end_matches("_total").to_owned(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// `after[name] - before[name]`, missing counters counting as zero.
pub fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, name: &str) -> f64 {
    after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
}

/// The IPv4 address of a pod's `eth0`.
pub fn pod_ip(pod: &str) -> Result<String> {
    let text = run(pod, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{pod}: no IPv4 address on eth0: {text}"))
}

/// The address a name resolves to inside `pod` (its hosts file: cluster DNS).
pub fn resolve(pod: &str, name: &str) -> Result<String> {
    run(pod, &["getent", "hosts", name])?
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{name} does not resolve in {pod}"))
}

/// `curl` from inside `pod`; returns the HTTP status and the body parsed as JSON (or a string).
pub fn curl(pod: &str, url: &str, headers: &[(&str, &str)]) -> Result<(u16, serde_json::Value)> {
    let mut cmd = vec!["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}"];
    let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    for h in &headers {
        cmd.extend(["-H", h.as_str()]);
    }
    cmd.push(url);
    let out = run(pod, &cmd)?;
    let (body, code) = out
        .trim_end()
        .rsplit_once('\n')
        .ok_or_else(|| anyhow!("{pod}: curl {url}: no status line in {out:?}"))?;
    let status = code
        .trim()
        .parse()
        .with_context(|| format!("{pod}: curl {url}: bad status {code:?}"))?;
    let body = serde_json::from_str(body).unwrap_or_else(|_| body.into());
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP istio_tcp_connections_opened_total x
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",destination_service="a"} 3
istio_tcp_connections_opened_total{reporter="destination",destination_service="a"} 2
istio_tcp_connections_opened_total_extra{reporter="source"} 100
weft_ebpf_captured_total 7
weft_ebpf_fast_path_bytes_total 1024
"#;

    #[test]
    fn sums_matching_samples_only() {
        let m = "istio_tcp_connections_opened_total";
        assert_eq!(sample_sum(TEXT, m, &[]), 5.0);
        assert_eq!(sample_sum(TEXT, m, &[("reporter", "source")]), 3.0);
        assert_eq!(sample_sum(TEXT, m, &[("reporter", "x")]), 0.0);
    }

    #[test]
    fn reads_ebpf_counters() {
        let c = parse_ebpf_counters(TEXT);
        assert_eq!(c.get("captured"), Some(&7.0));
        assert_eq!(c.get("fast_path_bytes"), Some(&1024.0));
        assert_eq!(delta(&BTreeMap::new(), &c, "captured"), 7.0);
    }
}
