//! `meshctl`: Weft's tool for operators.
//!
//! - `status`, `config dump` and `explain` read node proxies through their admin API
//!   (`--admin HOST:PORT`, `127.0.0.1:15020` by default: on a node, or through a port
//!   forward), or, for `config dump` and `explain`, a directory of YAML with no cluster at
//!   all (`--config-dir`), compiled as a node proxy compiles it.
//! - `analyze` checks files as a node proxy would read them (see `mesh_node::analyze`).
//!
//! Every command takes `--json`.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_node::{
    analyze::{self, Level},
    proxy::inspect::{Explanation, Inspector, Question},
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Weft's tool for operators")]
struct Cli {
    /// A node proxy's admin address (`HOST:PORT`), once per node; also `MESHCTL_ADMIN`
    /// (comma-separated). The admin answers on the node's loopback only: run meshctl on the
    /// node, or through a port forward (`kubectl port-forward`, `cargo xtask cluster meshctl`).
    #[arg(long, global = true, value_delimiter = ',', env = "MESHCTL_ADMIN")]
    admin: Vec<String>,
    /// Read the configuration from this directory of YAML instead of a node (`config dump`,
    /// `explain`).
    #[arg(long, global = true)]
    config_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every node proxy: readiness, the configuration version each part applied, the eBPF
    /// programs attached, certificates, and the counters that say something is wrong.
    Status,
    /// What a node proxy runs.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Why a request from a pod goes where it goes: the route and rule that match (and why
    /// the others do not), the weighted backends, subsets and endpoints, timeouts, retries,
    /// faults, and what each destination's AuthorizationPolicies decide.
    Explain {
        /// The client pod, `NAMESPACE/POD`.
        #[arg(long)]
        from: String,
        /// `http://HOST[:PORT]/PATH`, the host as the pod writes it.
        url: String,
        /// A request header, `Name: value` (repeat for more).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The request method.
        #[arg(short = 'X', long = "request", default_value = "GET")]
        method: String,
    },
    /// Checks YAML files as a node proxy reads them: what it would reject is an error (the
    /// same validation, field and reason), what `istioctl analyze` warns about a warning.
    /// Exits 1 when there is an error, 2 when a file cannot be read.
    Analyze {
        /// Files, or directories (walked) of `.yaml`, `.yml` and `.json` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// The routes, clusters, endpoints and policies a node proxy runs, as `istioctl
    /// proxy-config` shows Envoy's.
    Dump {
        /// One section (all when omitted).
        section: Option<Section>,
        /// The node whose proxy to read (one of the `--admin` addresses); the first by default.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Routes,
    Clusters,
    Endpoints,
    Policies,
}

impl Section {
    const ALL: [Section; 4] = [
        Section::Routes,
        Section::Clusters,
        Section::Endpoints,
        Section::Policies,
    ];

    fn name(self) -> &'static str {
        match self {
            Section::Routes => "routes",
            Section::Clusters => "clusters",
            Section::Endpoints => "endpoints",
            Section::Policies => "policies",
        }
    }
}

/// Where the answers come from.
enum Target {
    Nodes(Vec<String>),
    Offline(Inspector),
}

fn main() -> ExitCode {
    mesh_node::sys::default_sigpipe();
    let cli = Cli::parse();
    let json = cli.json;
    let result = match cli.command {
        Command::Analyze { paths } => return analyze_files(&paths, json),
        command => target(cli.admin, cli.config_dir.as_deref()).and_then(|target| match command {
            Command::Status => status(&target, json),
            Command::Config {
                command: ConfigCommand::Dump { section, node },
            } => dump(&target, section, node.as_deref(), json),
            Command::Explain {
                from,
                url,
                headers,
                method,
            } => explain(
                &target,
                &Question {
                    from,
                    url,
                    method: Some(method),
                    headers,
                },
                json,
            ),
            Command::Analyze { .. } => unreachable!("handled above"),
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(2)
        }
    }
}

fn target(admin: Vec<String>, config_dir: Option<&Path>) -> Result<Target, String> {
    if let Some(dir) = config_dir {
        let files = analyze::files(&[dir.to_path_buf()])
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let mut contents = Vec::new();
        for file in &files {
            let content =
                analyze::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            contents.push((file.display().to_string(), content));
        }
        let loaded = analyze::load(&contents);
        for finding in loaded.findings.iter().filter(|f| f.level == Level::Error) {
            eprintln!("meshctl: skipped, as a node would: {finding}");
        }
        return Ok(Target::Offline(Inspector::offline(loaded.snapshot)));
    }
    let admin = if admin.is_empty() {
        vec!["127.0.0.1:15020".to_owned()]
    } else {
        admin
    };
    Ok(Target::Nodes(admin))
}

/// The most meshctl reads of one answer.
const MAX_RESPONSE: u64 = 256 << 20;

/// Escapes the control characters of every string in `value`: names and values in a
/// configuration are a tenant's to write, and must not drive the operator's terminal (colours,
/// titles, clipboard) nor forge lines of the output.
fn sanitize(value: &mut Value) {
    match value {
        Value::String(s) if s.chars().any(char::is_control) => {
            *s = s
                .chars()
                .map(|c| match c {
                    c if c.is_control() => c.escape_unicode().to_string(),
                    c => c.to_string(),
                })
                .collect();
        }
        Value::Array(items) => items.iter_mut().for_each(sanitize),
        Value::Object(map) => map.values_mut().for_each(sanitize),
        _ => {}
    }
}

/// `GET path` from a node admin: the JSON it answers, or its error.
fn get(admin: &str, path: &str) -> Result<Value, String> {
    let fail = |e: std::io::Error| format!("cannot reach the node admin at {admin}: {e}");
    let addr = std::net::ToSocketAddrs::to_socket_addrs(admin)
        .map_err(fail)?
        .next()
        .ok_or_else(|| format!("{admin} is no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(fail)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .map_err(fail)?;
    if response.len() as u64 >= MAX_RESPONSE {
        return Err(format!(
            "{admin}{path}: the answer is larger than {MAX_RESPONSE} bytes"
        ));
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{admin} answered no HTTP response"))?;
    let status = head.get(9..12).unwrap_or("");
    if status != "200" {
        return Err(format!("{admin}{path}: {status}: {}", body.trim()));
    }
    serde_json::from_str(body).map_err(|e| format!("{admin}{path}: not JSON: {e}"))
}

fn status(target: &Target, json: bool) -> Result<ExitCode, String> {
    let Target::Nodes(admins) = target else {
        return Err("status reads running node proxies: give --admin, not --config-dir".into());
    };
    let mut nodes = Vec::new();
    let mut healthy = true;
    for admin in admins {
        match get(admin, "/debug/status") {
            Ok(mut status) => {
                healthy &= status["ready"] == true;
                status["admin"] = json!(admin);
                nodes.push(status);
            }
            Err(e) => {
                healthy = false;
                nodes.push(json!({"admin": admin, "error": e}));
            }
        }
    }
    // Nodes of the mesh that no address given answers for.
    let reached: Vec<&str> = nodes.iter().filter_map(|n| n["node"].as_str()).collect();
    let mut missing: Vec<String> = nodes
        .iter()
        .filter_map(|n| n["meshNodes"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .filter(|n| !reached.contains(n))
        .map(str::to_owned)
        .collect();
    missing.sort();
    missing.dedup();
    if json {
        println!("{:#}", json!({"nodes": nodes, "notReached": missing}));
    } else {
        nodes.iter_mut().for_each(sanitize);
        print_status(&nodes, &missing);
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_status(nodes: &[Value], missing: &[String]) {
    println!(
        "{:<10} {:<6} {:<25} {:<9} {:<14} {:<8} TROUBLE",
        "NODE", "READY", "CONFIG (SNAP/PROXY/EBPF)", "PROGRAMS", "CERTIFICATES", "UPTIME"
    );
    for node in nodes {
        if let Some(error) = node["error"].as_str() {
            println!("{:<10} {error}", node["admin"].as_str().unwrap_or("?"));
            continue;
        }
        let config = &node["config"];
        let programs = node["programs"]
            .as_array()
            .map_or("none".to_owned(), |p| p.len().to_string());
        let certificates = node["certificates"].as_array().map_or_else(
            || "no mesh CA".to_owned(),
            |list| {
                let soonest = list
                    .iter()
                    .filter_map(|c| c["expiresInSeconds"].as_u64())
                    .min();
                match soonest {
                    Some(s) => format!("{} (≥{})", list.len(), span(s)),
                    None => format!("{} pending", list.len()),
                }
            },
        );
        let trouble = node["trouble"].as_array().map_or(0, Vec::len);
        println!(
            "{:<10} {:<6} {:<25} {:<9} {:<14} {:<8} {}",
            node["node"].as_str().unwrap_or("?"),
            if node["ready"] == true { "yes" } else { "NO" },
            format!(
                "{}/{}/{}",
                config["version"], config["proxy"], config["ebpf"]
            ),
            programs,
            certificates,
            span(node["uptimeSeconds"].as_u64().unwrap_or(0)),
            if trouble == 0 {
                "-".to_owned()
            } else {
                format!("{trouble} counter(s)")
            }
        );
    }
    for node in nodes.iter().filter(|n| n["error"].is_null()) {
        let name = node["node"].as_str().unwrap_or("?");
        if let Some(reason) = node["notReady"].as_str() {
            println!("{name}: {reason}");
        }
        for rejected in node["config"]["rejected"].as_array().into_iter().flatten() {
            println!("{name}: rejected {}", rejected.as_str().unwrap_or(""));
        }
        for t in node["trouble"].as_array().into_iter().flatten() {
            let value = t["value"].as_f64().unwrap_or(0.0);
            println!("{name}: {} = {value}", t["metric"].as_str().unwrap_or(""));
        }
        for c in node["certificates"].as_array().into_iter().flatten() {
            let identity = c["identity"].as_str().unwrap_or("?");
            let state = match (c["expiresInSeconds"].as_u64(), c["pending"].as_str()) {
                (Some(s), _) => format!("expires in {}", span(s)),
                (None, Some(reason)) => format!("pending: {reason}"),
                (None, None) => "?".to_owned(),
            };
            let own = if c["node"] == true {
                " (the node's)"
            } else {
                ""
            };
            println!("{name}: certificate {identity}{own}: {state}");
        }
        if let Some(programs) = node["programs"].as_array() {
            let names: Vec<_> = programs.iter().filter_map(Value::as_str).collect();
            println!("{name}: programs: {}", names.join(", "));
        }
    }
    for node in missing {
        println!("{node}: not reached (no --admin address answers for it)");
    }
}

/// `3d4h`, `5h2m`, `12m`, `40s`.
fn span(seconds: u64) -> String {
    let (d, h, m) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// The admin address of `node` (asked of each), or the first.
fn admin_of<'a>(admins: &'a [String], node: Option<&str>) -> Result<&'a str, String> {
    let Some(node) = node else {
        return Ok(&admins[0]);
    };
    for admin in admins {
        if get(admin, "/debug/status").is_ok_and(|s| s["node"] == node) {
            return Ok(admin);
        }
    }
    Err(format!("no --admin address answers for node {node}"))
}

fn dump(
    target: &Target,
    section: Option<Section>,
    node: Option<&str>,
    json: bool,
) -> Result<ExitCode, String> {
    let sections = section.map_or(Section::ALL.to_vec(), |s| vec![s]);
    let mut out = Vec::new();
    for section in sections {
        let value = match target {
            Target::Offline(inspector) => {
                if node.is_some() {
                    return Err("--node reads a running proxy: not with --config-dir".into());
                }
                match section {
                    Section::Routes => inspector.routes(),
                    Section::Clusters => inspector.clusters(),
                    Section::Endpoints => inspector.endpoints(),
                    Section::Policies => inspector.policies(),
                }
            }
            Target::Nodes(admins) => get(
                admin_of(admins, node)?,
                &format!("/debug/{}", section.name()),
            )?,
        };
        out.push((section.name(), value));
    }
    if json {
        let object: serde_json::Map<String, Value> =
            out.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        println!("{:#}", Value::Object(object));
        return Ok(ExitCode::SUCCESS);
    }
    out.iter_mut().for_each(|(_, v)| sanitize(v));
    let rows = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    for (name, value) in &out {
        match *name {
            "routes" => {
                println!(
                    "{:<44} {:<50} {:<24} {:<40} ACTION",
                    "SERVICE", "RULE", "CLIENTS", "MATCH"
                );
                for service in rows(value) {
                    for rule in rows(&service["rules"]) {
                        println!(
                            "{:<44} {:<50} {:<24} {:<40} {}",
                            s(&service["host"]),
                            s(&rule["name"]),
                            s(&rule["clients"]),
                            s(&rule["requires"]),
                            s(&rule["action"])
                        );
                    }
                }
            }
            "clusters" => {
                println!(
                    "{:<58} {:<30} {:<28} {:<9} POLICY",
                    "CLUSTER", "PROTOCOL", "DESTINATION RULE", "ENDPOINTS"
                );
                for c in rows(value) {
                    let policy: Vec<String> = rows(&c["policy"]).iter().skip(1).map(s).collect();
                    println!(
                        "{:<58} {:<30} {:<28} {:<9} {}",
                        s(&c["cluster"]),
                        s(&c["protocol"]),
                        s(&c["destinationRule"]),
                        s(&c["endpoints"]),
                        c["error"]
                            .as_str()
                            .map_or_else(|| policy.join("; "), |e| format!("ERROR: {e}"))
                    );
                }
            }
            "endpoints" => {
                println!(
                    "{:<22} {:<8} {:<58} {:<30} NODE",
                    "ENDPOINT", "STATUS", "CLUSTER", "POD"
                );
                for e in rows(value) {
                    println!(
                        "{:<22} {:<8} {:<58} {:<30} {}",
                        s(&e["endpoint"]),
                        s(&e["status"]),
                        s(&e["cluster"]),
                        s(&e["pod"]),
                        s(&e["node"])
                    );
                }
            }
            _ => {
                println!(
                    "{:<36} {:<7} {:<11} AUTHORIZATION POLICIES",
                    "POD", "MESHED", "MTLS"
                );
                for p in rows(value) {
                    let policies: Vec<String> = rows(&p["authorizationPolicies"])
                        .iter()
                        .map(|a| {
                            format!(
                                "{} {}{}",
                                s(&a["action"]),
                                s(&a["policy"]),
                                if a["dryRun"] == true {
                                    " (dry run)"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect();
                    println!(
                        "{:<36} {:<7} {:<11} {}",
                        s(&p["pod"]),
                        s(&p["meshed"]),
                        s(&p["mtls"]),
                        if policies.is_empty() {
                            "-".to_owned()
                        } else {
                            policies.join(", ")
                        }
                    );
                }
            }
        }
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn explain(target: &Target, question: &Question, json: bool) -> Result<ExitCode, String> {
    let explanation: Explanation = match target {
        Target::Offline(inspector) => inspector.explain(question).map_err(|e| e.to_string())?,
        Target::Nodes(admins) => {
            let ask = |admin: &str| -> Result<Explanation, String> {
                let query = form_query(question);
                let value = get(admin, &format!("/debug/explain?{query}"))?;
                serde_json::from_value(value).map_err(|e| format!("{admin}: {e}"))
            };
            let first = ask(&admins[0])?;
            // The source pod's own node proxy is the one that serves its requests.
            match first.source.node.as_deref() {
                Some(node) if admins.len() > 1 => match admin_of(admins, Some(node)) {
                    Ok(admin) if admin != admins[0] => ask(admin)?,
                    _ => first,
                },
                _ => first,
            }
        }
    };
    let mut value = json!(explanation);
    if json {
        println!("{value:#}");
    } else {
        sanitize(&mut value);
        let explanation: Explanation = serde_json::from_value(value).map_err(|e| e.to_string())?;
        print!("{explanation}");
    }
    Ok(ExitCode::SUCCESS)
}

fn form_query(question: &Question) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("from", &question.from);
    query.append_pair("url", &question.url);
    if let Some(method) = &question.method {
        query.append_pair("method", method);
    }
    for header in &question.headers {
        query.append_pair("header", header);
    }
    query.finish()
}

fn analyze_files(paths: &[PathBuf], json: bool) -> ExitCode {
    let files = match analyze::files(paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("meshctl: cannot read {}: {e}", show(paths));
            return ExitCode::from(2);
        }
    };
    let mut contents = Vec::new();
    for file in &files {
        match analyze::read(file) {
            Ok(content) => contents.push((file.display().to_string(), content)),
            Err(e) => {
                eprintln!("meshctl: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        }
    }
    let findings = analyze::analyze(&contents);
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    if json {
        let out = serde_json::json!({
            "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "findings": findings,
        });
        println!("{out:#}");
    } else if findings.is_empty() {
        println!(
            "No validation issues found when analyzing {} file(s).",
            files.len()
        );
    } else {
        for finding in &findings {
            println!("{finding}");
        }
    }
    if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn show(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
