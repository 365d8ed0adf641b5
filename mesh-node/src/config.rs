//! Command line of the `mesh-node` binary. Every flag can also be set through a `WEFT_*`
//! environment variable, which is how the DaemonSet manifest configures it.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// Default pin directory of Weft's eBPF maps and links on bpffs.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/weft";

#[derive(Debug, Parser)]
#[command(
    name = "mesh-node",
    version,
    about = "Weft node agent and proxy: steers meshed pods' traffic with eBPF into a per-node proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the eBPF programs, then run the node proxy until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Detach and unpin every eBPF program and map of a node (after the node left the mesh).
    Cleanup(CleanupArgs),
    /// Run the same proxy as a sidecar inside one pod's network namespace, without eBPF:
    /// connections reach 15001 (outbound) and 15006 (inbound) through nftables/iptables
    /// `REDIRECT` rules, Istio-style; the original destination comes from `SO_ORIGINAL_DST`.
    /// The redirect rules must exempt the sidecar's own traffic (by uid or mark).
    Sidecar(SidecarArgs),
}

#[derive(Clone, Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["config_dir", "kubernetes"])))]
pub struct RunArgs {
    /// Name of this node, as in the Pods' `spec.nodeName` (in a DaemonSet, from the downward
    /// API: `--node=$(NODE_NAME)`).
    #[arg(long, env = "WEFT_NODE", value_name = "NAME")]
    pub node: String,

    /// Directory of Kubernetes YAML/JSON the configuration is read from (watched for changes).
    #[arg(long, env = "WEFT_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Read the configuration from the Kubernetes API server (in-cluster ServiceAccount, else
    /// KUBECONFIG or ~/.kube/config) instead of a directory.
    #[arg(long, env = "WEFT_KUBERNETES")]
    pub kubernetes: bool,

    /// cgroup v2 subtree of this node the cgroup programs attach to.
    #[arg(long, env = "WEFT_CGROUP", value_name = "PATH")]
    pub cgroup: PathBuf,

    /// Node-local address pods reach the proxy on (the pods' default gateway).
    #[arg(long, env = "WEFT_PROXY_IP", value_name = "IPV4")]
    pub proxy_ip: Ipv4Addr,

    /// bpffs directory the maps and links are pinned under (one subdirectory per node).
    #[arg(long, env = "WEFT_BPFFS_ROOT", value_name = "DIR", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,

    /// Uplink interface of the node (repeat the flag, or comma-separate in WEFT_UPLINK).
    #[arg(
        long = "uplink",
        env = "WEFT_UPLINK",
        value_name = "IFACE",
        value_delimiter = ','
    )]
    pub uplinks: Vec<String>,

    /// Run the proxy without loading eBPF programs (development only: nothing is captured,
    /// and readiness does not wait for the programs).
    #[arg(long, env = "WEFT_NO_EBPF")]
    pub no_ebpf: bool,

    #[command(flatten)]
    pub server: ServerArgs,
}

/// What the node proxy and the sidecar both serve, and how.
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    /// Listen address of the metrics and admin server.
    #[arg(
        long,
        env = "WEFT_ADMIN_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:15020"
    )]
    pub admin_addr: SocketAddr,

    /// Listen address of the health server (`/healthz`, `/ready`).
    #[arg(
        long,
        env = "WEFT_HEALTH_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:15021"
    )]
    pub health_addr: SocketAddr,

    /// Log output format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// Worker threads of the data-plane runtime (the proxy's connections).
    #[arg(long, env = "WEFT_DATA_WORKERS", value_name = "N", default_value_t = DEFAULT_DATA_WORKERS, value_parser = clap::value_parser!(u16).range(1..))]
    pub data_workers: u16,
}

/// Default worker threads of the data-plane runtime.
pub const DEFAULT_DATA_WORKERS: u16 = 2;

impl RunArgs {
    /// Where the configuration comes from (clap guarantees exactly one).
    pub fn source(&self) -> ConfigSource<'_> {
        match &self.config_dir {
            Some(dir) if !self.kubernetes => ConfigSource::Dir(dir),
            _ => ConfigSource::Kubernetes,
        }
    }
}

/// The configuration source of `mesh-node run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource<'a> {
    /// `--config-dir`: a directory of YAML (local mode, the virtual cluster).
    Dir(&'a Path),
    /// `--kubernetes`: watches of the API server.
    Kubernetes,
}

impl fmt::Display for ConfigSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Dir(dir) => write!(f, "directory {}", dir.display()),
            ConfigSource::Kubernetes => f.write_str("Kubernetes API"),
        }
    }
}

#[derive(Clone, Debug, Args)]
pub struct CleanupArgs {
    /// Name of the node whose programs and maps are removed.
    #[arg(long, env = "WEFT_NODE", value_name = "NAME")]
    pub node: String,

    /// bpffs directory the maps and links are pinned under.
    #[arg(long, env = "WEFT_BPFFS_ROOT", value_name = "DIR", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
}

#[derive(Clone, Debug, Args)]
pub struct SidecarArgs {
    /// Name of the node the pod runs on, as in the Pods' `spec.nodeName`.
    #[arg(long, env = "WEFT_NODE", value_name = "NAME")]
    pub node: String,

    /// Directory of Kubernetes YAML/JSON the configuration is read from (watched for changes).
    #[arg(long, env = "WEFT_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: PathBuf,

    /// The pod's address: source of the connections the sidecar makes to its own pod.
    #[arg(long, env = "WEFT_POD_IP", value_name = "IPV4")]
    pub pod_ip: Ipv4Addr,

    #[command(flatten)]
    pub server: ServerArgs,
}

impl SidecarArgs {
    /// The node proxy's arguments for the same proxy in a pod: no eBPF, no cgroup.
    pub fn into_run_args(self) -> RunArgs {
        RunArgs {
            node: self.node,
            config_dir: Some(self.config_dir),
            kubernetes: false,
            cgroup: PathBuf::new(),
            proxy_ip: self.pod_ip,
            bpffs_root: PathBuf::from(DEFAULT_BPFFS_ROOT),
            uplinks: Vec::new(),
            no_ebpf: true,
            server: self.server,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("mesh-node").chain(args.iter().copied()))
            .expect("valid command line")
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_with_defaults() {
        let cli = parse(&[
            "run",
            "--node",
            "n1",
            "--config-dir",
            "/etc/weft",
            "--cgroup",
            "/sys/fs/cgroup/unified/weft-cluster/n1",
            "--proxy-ip",
            "10.244.1.1",
        ]);
        let Command::Run(args) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args.node, "n1");
        assert_eq!(args.proxy_ip, Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(args.bpffs_root, PathBuf::from(DEFAULT_BPFFS_ROOT));
        assert!(args.uplinks.is_empty());
        assert!(!args.no_ebpf);
        assert_eq!(args.server.admin_addr, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(args.server.health_addr, "0.0.0.0:15021".parse().unwrap());
        assert_eq!(args.server.log_format, LogFormat::Plain);
        assert_eq!(args.server.data_workers, DEFAULT_DATA_WORKERS);
        assert_eq!(args.source(), ConfigSource::Dir(Path::new("/etc/weft")));
    }

    #[test]
    fn run_from_kubernetes() {
        let cli = parse(&[
            "run",
            "--node",
            "n1",
            "--kubernetes",
            "--cgroup",
            "/sys/fs/cgroup",
            "--proxy-ip",
            "172.18.0.2",
        ]);
        let Command::Run(args) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args.source(), ConfigSource::Kubernetes);
        assert_eq!(args.source().to_string(), "Kubernetes API");
    }

    #[test]
    fn exactly_one_source() {
        let base = [
            "mesh-node",
            "run",
            "--node",
            "n1",
            "--cgroup",
            "/g",
            "--proxy-ip",
            "10.0.0.1",
        ];
        let neither = Cli::try_parse_from(base).unwrap_err();
        assert_eq!(
            neither.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        let both =
            Cli::try_parse_from(
                base.iter()
                    .copied()
                    .chain(["--kubernetes", "--config-dir", "/c"]),
            )
            .unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn run_with_every_flag() {
        let cli = parse(&[
            "run",
            "--node",
            "n2",
            "--config-dir",
            "/c",
            "--cgroup",
            "/g",
            "--proxy-ip",
            "10.244.2.1",
            "--bpffs-root",
            "/b",
            "--uplink",
            "eth0",
            "--uplink",
            "eth1",
            "--no-ebpf",
            "--admin-addr",
            "127.0.0.1:1",
            "--health-addr",
            "127.0.0.1:2",
            "--log-format",
            "json",
            "--data-workers",
            "1",
        ]);
        let Command::Run(args) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args.uplinks, ["eth0", "eth1"]);
        assert!(args.no_ebpf);
        assert_eq!(args.bpffs_root, PathBuf::from("/b"));
        assert_eq!(args.server.log_format, LogFormat::Json);
        assert_eq!(args.server.data_workers, 1);
    }

    #[test]
    fn cleanup() {
        let Command::Cleanup(args) = parse(&["cleanup", "--node", "n3"]).command else {
            panic!("expected cleanup");
        };
        assert_eq!(args.node, "n3");
        assert_eq!(args.bpffs_root, PathBuf::from(DEFAULT_BPFFS_ROOT));
    }

    #[test]
    fn sidecar() {
        let Command::Sidecar(args) = parse(&[
            "sidecar",
            "--node",
            "n1",
            "--config-dir",
            "/c",
            "--pod-ip",
            "10.244.1.7",
        ])
        .command
        else {
            panic!("expected sidecar");
        };
        let run = args.into_run_args();
        assert!(run.no_ebpf);
        assert_eq!(run.proxy_ip, Ipv4Addr::new(10, 244, 1, 7));
        assert_eq!(run.source(), ConfigSource::Dir(Path::new("/c")));
        assert_eq!(run.server.admin_addr, "0.0.0.0:15020".parse().unwrap());
    }

    #[test]
    fn rejects_ipv6_proxy_ip() {
        let err = Cli::try_parse_from([
            "mesh-node",
            "run",
            "--node",
            "n1",
            "--config-dir",
            "/c",
            "--cgroup",
            "/g",
            "--proxy-ip",
            "fd00::1",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }
}
