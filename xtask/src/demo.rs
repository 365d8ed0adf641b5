//! `cargo xtask demo`: Bookinfo on a two-node virtual cluster, traffic through the mesh within
//! and across nodes, a namespace outside the mesh, and that namespace opted in live.
//! Prints what each step did and what the node proxies and eBPF programs counted.

use std::{collections::BTreeMap, time::Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;

use crate::{
    cluster,
    probe::{self, curl, delta, ebpf_counters, pod_ip},
    workspace_root,
};

const NODES: [&str; 2] = ["node-1", "node-2"];

type Counters = BTreeMap<&'static str, BTreeMap<String, f64>>;

pub fn run() -> Result<()> {
    let root = workspace_root();
    let started = Instant::now();
    step("Start a two-node virtual cluster with Bookinfo (namespace default, label weft.io/mesh=enabled)");
    cluster::down().context("removing an earlier cluster")?;
    let result = cluster::up(&root.join("examples/bookinfo"))
        .and_then(|()| cluster::apply(&root.join("examples/demo/clients.yaml")))
        .and_then(|()| {
            println!("{}", cluster::status()?);
            tasks()
        });
    step("Clean up");
    cluster::down()?;
    println!("    removed namespaces, veths, cgroups, pins and processes");
    result?;
    println!("\nDemo finished in {:.0?}.", started.elapsed());
    Ok(())
}

fn tasks() -> Result<()> {
    step("A meshed client calls productpage 6 times (productpage → details, reviews → ratings)");
    let before = counters()?;
    let mut versions = BTreeMap::<String, usize>::new();
    let mut last = Value::Null;
    for _ in 0..6 {
        let (status, body) = curl(
            "default/sleep",
            "http://productpage:9080/productpage",
            &[("end-user", "jason")],
        )?;
        ensure!(status == 200, "productpage answered {status}: {body}");
        *versions
            .entry(text(field(&body, &["reviews", "version"])))
            .or_default() += 1;
        last = body;
    }
    let after = counters()?;
    println!("    HTTP 200 x6; reviews versions seen: {versions:?}");
    println!(
        "    productpage saw its client as {}; details (node-2) saw productpage as {}",
        who(&text(field(&last, &["peer"]))),
        who(&text(field(&last, &["details", "peer"]))),
    );
    println!("    connect4 captured the sockets on each node; sk_msg short-circuited pod <-> proxy bytes:");
    print_deltas(
        &before,
        &after,
        &["captured", "fast_path_redirects", "fast_path_bytes"],
    );
    for node in NODES {
        println!(
            "    {node} proxy: istio_tcp_connections_opened_total reporter=source {}, reporter=destination {}",
            tcp_opened(node, "source")?,
            tcp_opened(node, "destination")?
        );
    }

    step("The legacy namespace (no label) calls its own inventory service on node-2");
    let client_ip = pod_ip("legacy/client")?;
    let before = counters()?;
    let (_, body) = curl("legacy/client", "http://inventory:9080/details/0", &[])?;
    let after = counters()?;
    println!(
        "    inventory saw its client as {}; legacy/client is {client_ip}: untouched by Weft",
        who(&text(field(&body, &["peer"])))
    );
    print_deltas(&before, &after, &["captured", "skipped_not_meshed"]);

    step("The legacy client calls the meshed productpage: plaintext from outside the mesh");
    let before = counters()?;
    let (status, body) = curl(
        "legacy/client",
        "http://productpage.default:9080/productpage",
        &[],
    )?;
    let after = counters()?;
    println!(
        "    HTTP {status}; productpage saw its client as {}: TC steered the connection to 15006",
        who(&text(field(&body, &["peer"])))
    );
    print_deltas(&before, &after, &["inbound_captured"]);

    step("Opt the legacy namespace in (kubectl label namespace legacy weft.io/mesh=enabled)");
    let start = Instant::now();
    cluster::apply(&workspace_root().join("examples/demo/legacy-meshed.yaml"))?;
    let applied = start.elapsed();
    let before = counters()?;
    let (_, body) = curl("legacy/client", "http://inventory:9080/details/0", &[])?;
    let after = counters()?;
    println!(
        "    applied in {applied:.0?}; inventory now sees its client as {}; no pod restarted",
        who(&text(field(&body, &["peer"])))
    );
    print_deltas(&before, &after, &["captured", "inbound_captured"]);
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

/// Names the node proxy behind a peer address the demo application reported.
fn who(peer: &str) -> String {
    match peer.rsplit_once(':').map_or(peer, |(ip, _)| ip) {
        "10.244.1.1" => "node-1's proxy".to_owned(),
        "10.244.2.1" => "node-2's proxy".to_owned(),
        other => format!("{other} (directly, no proxy)"),
    }
}

fn counters() -> Result<Counters> {
    NODES.iter().map(|n| Ok((*n, ebpf_counters(n)?))).collect()
}

fn tcp_opened(node: &str, reporter: &str) -> Result<f64> {
    Ok(probe::sample_sum(
        &probe::metrics(node)?,
        "istio_tcp_connections_opened_total",
        &[("reporter", reporter)],
    ))
}

fn print_deltas(before: &Counters, after: &Counters, names: &[&str]) {
    for node in NODES {
        let line: Vec<String> = names
            .iter()
            .map(|n| format!("{n} +{}", delta(&before[node], &after[node], n)))
            .collect();
        println!("    {node} eBPF: {}", line.join(", "));
    }
}

fn field<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}
