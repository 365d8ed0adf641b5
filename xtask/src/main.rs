//! `cargo xtask`: Weft's development tasks.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Weft's development tasks: machine setup, the virtual cluster, tests, demo, benchmarks",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install or check the toolchains, Debian packages, bpf-linker, cargo-deny, bpffs and cgroup v2
    /// (idempotent; one line per item).
    Setup,
    /// Run a virtual Kubernetes cluster on this machine (root).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// fmt, clippy (also eBPF), cargo deny, manifests, unit tests, then the end-to-end tests
    /// (root).
    Test,
    /// Only the static checks of `test`: fmt, clippy (also eBPF), cargo deny.
    Lint,
    /// Validate the Kubernetes manifests of deploy/ and examples/ offline.
    Manifests,
    /// Bookinfo on the virtual cluster.
    Demo,
    /// The data-plane benchmark (no mesh, sidecar, HAProxy sidecar, Weft; root), `scale`
    /// (control plane at 10,000 Services), `churn` (new connections while the configuration
    /// changes 10 times a second; no root), `chaos` (mixed load while node proxies and the CA
    /// are restarted and killed; root) or `soak` (mixed load for 30 minutes; root).
    Bench {
        /// `scale`, `churn`, `chaos` or `soak`; nothing for the data-plane benchmark; `render`
        /// to write a run's table, chart and targets again from its JSON (--out, default
        /// bench/results/latest.json).
        #[arg(value_parser = ["scale", "churn", "chaos", "soak", "render"])]
        name: Option<String>,
        /// 10 s windows and one run (under 5 minutes), into target/bench/quick.json; with
        /// `churn`: 5 s windows.
        #[arg(long)]
        quick: bool,
        /// Runs per mode and scenario (default: 3, or 1 with --quick).
        #[arg(long)]
        runs: Option<usize>,
        /// Where the JSON goes; the chart (.svg) and table (.md) go beside it (default:
        /// bench/results/latest.json, or target/bench/quick.json with --quick; with `churn`:
        /// target/bench/churn.json, and no chart or table).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only this scenario (repeatable), e.g. `cross-node-grpc` or `cross-node-bulk-8`.
        #[arg(long = "scenario", value_name = "NAME")]
        scenarios: Vec<String>,
        /// `chaos` and `soak`: minutes of load (default 10 and 30; 2 and 3 with --quick).
        #[arg(long)]
        minutes: Option<f64>,
        /// Go on with a data-plane run that stopped: what target/bench/samples.jsonl holds of
        /// this commit is kept, the rest measured.
        #[arg(long)]
        resume: bool,
    },
}

#[derive(Subcommand)]
#[command(after_help = "\
Environment:
  WEFT_CLUSTER_NO_MESH=1     run nodes without mesh-node (plain networking and kube-proxy)
  WEFT_PROFILE=release       cargo profile of mesh-node and weft-demo (default: debug)
  WEFT_CLUSTER_NODE_LOG=...  RUST_LOG of the node proxies and Weft sidecars (default:
                             mesh-node's: info, access logs off)
  WEFT_CLUSTER_PROXY_MEMORY=256Mi
                             memory limit of each node proxy, enforced by the kernel
                             (default: the DaemonSet's 512Mi)

State, effective configuration and logs are under /run/weft-cluster.")]
enum ClusterCommand {
    /// Create the cluster described by the Kubernetes YAML in DIR and wait until every
    /// node proxy and pod is ready.
    Up {
        /// Directory (or file) of Kubernetes YAML
        dir: PathBuf,
    },
    /// Create or update resources from a file or directory (like kubectl apply -f).
    Apply { path: PathBuf },
    /// Delete the resources named in a file or directory (like kubectl delete -f).
    Delete { path: PathBuf },
    /// Run a command in a pod (`namespace/pod`: its cgroup and network namespace) or a node
    /// (`node/NAME`: its network namespace); exits with the command's exit code.
    Exec {
        /// `namespace/pod` or `node/NAME`
        target: String,
        /// The command and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print the log of a pod (`namespace/pod`) or node proxy (`node/NAME`).
    Logs {
        /// `namespace/pod` or `node/NAME`
        target: String,
    },
    /// Replace a node's mesh-node as a DaemonSet rollout does (`node/NAME`): a new process
    /// takes the listening sockets while the old one drains and exits. The new process runs
    /// the binary named by WEFT_MESH_NODE if set (an upgrade), else the cluster's. `ca`
    /// kills the mesh CA and starts it again.
    Restart {
        /// `node/NAME` or `ca`
        target: String,
        /// Kill the running mesh-node first (SIGKILL: a crash), then start a new one.
        #[arg(long, conflicts_with = "term")]
        kill: bool,
        /// Stop the running mesh-node with SIGTERM and wait until it exited, then start a new
        /// one (a container restart with no successor waiting).
        #[arg(long)]
        term: bool,
    },
    /// Run meshctl against the cluster's node proxies (their admin ports, forwarded from
    /// inside each node): `cargo xtask cluster meshctl -- status`.
    Meshctl {
        /// meshctl's arguments, after `--`
        #[arg(last = true, required = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Show nodes, pods and Services.
    Status,
    /// Remove everything the cluster created (also after a crash).
    Down,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use xtask::cluster;
    match cli.command {
        Task::Setup => xtask::setup()?,
        Task::Cluster { command } => match command {
            ClusterCommand::Up { dir } => {
                cluster::up(&dir)?;
                print!("{}", cluster::status()?);
            }
            ClusterCommand::Apply { path } => cluster::apply(&path)?,
            ClusterCommand::Restart { target, kill, term } => {
                if target == "ca" {
                    if term {
                        anyhow::bail!("the mesh CA has no SIGTERM restart: `restart ca` kills it");
                    }
                    cluster::restart_ca(std::time::Duration::ZERO)?;
                    return Ok(ExitCode::SUCCESS);
                }
                let Some(node) = target.strip_prefix("node/") else {
                    anyhow::bail!("restart takes node/NAME or ca, not {target:?}");
                };
                let how = match (kill, term) {
                    (true, _) => cluster::Restart::Kill,
                    (_, true) => cluster::Restart::Term,
                    _ => cluster::Restart::Handover,
                };
                cluster::restart_node(node, how)?;
            }
            ClusterCommand::Delete { path } => cluster::delete(&path)?,
            ClusterCommand::Exec { target, command } => {
                let code = cluster::exec_status(&target, &command)?;
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            ClusterCommand::Logs { target } => {
                let path = cluster::log_path(&target)?;
                let log = std::fs::read(&path)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                use std::io::Write as _;
                std::io::stdout().write_all(&log)?;
            }
            ClusterCommand::Meshctl { args } => {
                let code = cluster::meshctl(&args)?;
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            ClusterCommand::Status => print!("{}", cluster::status()?),
            ClusterCommand::Down => cluster::down()?,
        },
        Task::Test => xtask::test::run()?,
        Task::Lint => xtask::test::lint()?,
        Task::Manifests => xtask::manifests::check_manifests()?,
        Task::Demo => {
            xtask::setup()?;
            xtask::demo::run()?;
        }
        Task::Bench {
            name,
            quick,
            runs,
            out,
            scenarios,
            minutes,
            resume,
        } => match name.as_deref() {
            _ if minutes.is_some() && !matches!(name.as_deref(), Some("chaos" | "soak")) => {
                anyhow::bail!("--minutes is for `bench chaos` and `bench soak`");
            }
            Some(_) if resume => anyhow::bail!("--resume is for the data-plane benchmark"),
            Some(kind @ ("chaos" | "soak")) => {
                if runs.is_some() || !scenarios.is_empty() {
                    anyhow::bail!("`bench {kind}` takes --quick, --minutes and --out only");
                }
                let out = out.map(|o| std::env::current_dir().map(|d| d.join(o)));
                let out = out.transpose()?;
                if kind == "chaos" {
                    let mut options = if quick {
                        xtask::bench::ChaosOptions::quick()
                    } else {
                        xtask::bench::ChaosOptions::full()
                    };
                    options.minutes = minutes.unwrap_or(options.minutes);
                    options.out = out.unwrap_or(options.out);
                    xtask::bench::chaos(&options)?;
                } else {
                    let mut options = if quick {
                        xtask::bench::SoakOptions::quick()
                    } else {
                        xtask::bench::SoakOptions::full()
                    };
                    options.minutes = minutes.unwrap_or(options.minutes);
                    options.out = out.unwrap_or(options.out);
                    xtask::bench::soak(&options)?;
                }
            }
            Some("scale") => xtask::bench::scale()?,
            Some("render") => {
                let json = match out {
                    Some(out) => std::env::current_dir()?.join(out),
                    None => xtask::workspace_root().join("bench/results/latest.json"),
                };
                xtask::bench::render(&json)?;
            }
            Some("churn") => {
                if runs.is_some() || !scenarios.is_empty() {
                    anyhow::bail!("`bench churn` takes --quick and --out only");
                }
                let out = out.map(|o| std::env::current_dir().map(|d| d.join(o)));
                xtask::bench::churn(quick, out.transpose()?.as_deref())?;
            }
            _ => {
                let mut options = if quick {
                    xtask::bench::Options::quick()
                } else {
                    xtask::bench::Options::full()
                };
                if let Some(runs) = runs {
                    options.runs = runs;
                }
                if let Some(out) = out {
                    options.out = std::env::current_dir()?.join(out);
                }
                options.only(&scenarios)?;
                options.resume = resume;
                xtask::bench::data_plane(&options)?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
