//! Command line of the `mesh-node` binary. Every flag can also be set through a `WEFT_*`
//! environment variable, which is how the DaemonSet manifest configures it.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::identity::DEFAULT_TRUST_DOMAIN;

/// Default pin directory of Weft's eBPF maps and links on bpffs.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/weft";
/// Where the node agent answers the `weft-cni` plugin.
pub const DEFAULT_CNI_SOCKET: &str = "/var/run/weft/cni.sock";
/// Where a node's mesh-node offers its listening sockets to the next one.
pub const DEFAULT_HANDOVER_SOCKET: &str = "/var/run/weft/handover.sock";

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
    /// Run the mesh CA: signs workload certificates for node proxies over Istio's certificate
    /// API (`istio.v1.auth.IstioCertificateService`, gRPC over TLS on 15012).
    Ca(CaArgs),
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

    /// Unix socket a running mesh-node of this node hands its listening sockets over on: a
    /// new mesh-node takes them from the one before it (a rollout), which then drains and
    /// exits; with nobody there, it binds its own. Its directory is made private to its user
    /// (a directory of another user, or one others may write to, is refused). Empty: none.
    #[arg(long, env = "WEFT_HANDOVER_SOCKET", value_name = "PATH", default_value = DEFAULT_HANDOVER_SOCKET)]
    pub handover_socket: Option<PathBuf>,

    /// Unix socket the `weft-cni` plugin enrolls new pods on (root's alone; its directory
    /// also gets `namespaces.json`, what the plugin decides with while the agent is down).
    /// Empty: none.
    #[arg(long, env = "WEFT_CNI_SOCKET", value_name = "PATH", default_value = DEFAULT_CNI_SOCKET)]
    pub cni_socket: Option<PathBuf>,

    /// What a mesh-node does once it handed its sockets over and drained: `exit`, or `wait`
    /// for SIGTERM (in a DaemonSet, whose kubelet would otherwise restart the container that
    /// exited before it deletes the old pod).
    #[arg(long, env = "WEFT_AFTER_HANDOVER", value_enum, default_value_t = AfterHandover::Exit)]
    pub after_handover: AfterHandover,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub identity: IdentityArgs,
}

/// See [`RunArgs::after_handover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AfterHandover {
    Exit,
    Wait,
}

/// Where the node proxy gets its workload certificates: the mesh CA and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct IdentityArgs {
    /// URL of the mesh CA (`mesh-node ca`), e.g. `https://10.0.0.1:15012`.
    #[arg(long, env = "WEFT_CA_ADDR", value_name = "URL")]
    pub ca_addr: Option<String>,

    /// PEM file of the root certificate(s) the mesh CA's serving certificate is verified
    /// against (the CA's `root-cert.pem`).
    #[arg(long, env = "WEFT_CA_ROOT_CERT", value_name = "FILE")]
    pub ca_root_cert: Option<PathBuf>,

    /// File holding the token this node authenticates to the mesh CA with (a projected
    /// ServiceAccount token in Kubernetes, the node's token file in the virtual cluster);
    /// re-read on every request.
    #[arg(long, env = "WEFT_CA_TOKEN_FILE", value_name = "FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// Name the mesh CA's serving certificate must carry (TLS server name).
    #[arg(long, env = "WEFT_CA_SERVER_NAME", value_name = "NAME", default_value = DEFAULT_CA_SERVER_NAME)]
    pub ca_server_name: String,

    /// Trust domain of the mesh's SPIFFE identities.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", value_name = "DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Trust domains that stand for this mesh's in AuthorizationPolicy principals (Istio's
    /// MeshConfig `trustDomainAliases`, for a trust domain migration), comma-separated.
    #[arg(
        long,
        env = "WEFT_TRUST_DOMAIN_ALIASES",
        value_name = "DOMAIN,...",
        value_delimiter = ','
    )]
    pub trust_domain_aliases: Vec<String>,

    /// Lifetime of the workload certificates requested from the CA (`24h`, `90m`, `1h30m`).
    #[arg(long, env = "WEFT_WORKLOAD_CERT_TTL", value_name = "DURATION", default_value = DEFAULT_WORKLOAD_CERT_TTL, value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,

    /// Set by `mesh-node sidecar --service-account`: the pod's identity (namespace, service
    /// account), which the sidecar presents instead of the node proxies'.
    #[arg(skip)]
    pub workload: Option<(String, String)>,
}

/// Default TLS server name of the mesh CA (its Service name).
pub const DEFAULT_CA_SERVER_NAME: &str = "weft-ca";
/// Default lifetime of workload certificates, as Istio's.
pub const DEFAULT_WORKLOAD_CERT_TTL: &str = "24h";
/// Default cap on the lifetime of workload certificates, as Istio's.
pub const DEFAULT_MAX_WORKLOAD_CERT_TTL: &str = "90d";

impl Default for IdentityArgs {
    /// The command line's defaults (no CA configured).
    fn default() -> Self {
        Self {
            ca_addr: None,
            ca_root_cert: None,
            ca_token_file: None,
            ca_server_name: DEFAULT_CA_SERVER_NAME.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            trust_domain_aliases: Vec::new(),
            workload_cert_ttl: Duration::from_secs(24 * 3600),
            workload: None,
        }
    }
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

    /// Worker threads of the data-plane runtime (the proxy's connections). Default: half
    /// the CPUs this process may run on (affinity and cgroup quota), between 1 and 4.
    #[arg(long, env = "WEFT_DATA_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub data_workers: Option<u16>,

    /// The only directory DestinationRule `tls` files (`caCertificates`, `clientCertificate`,
    /// `privateKey`, `caCrl`) are read from: a rule naming any other file is not applied, so a
    /// tenant's rule cannot make the node proxy use the node's own keys.
    #[arg(long, env = "WEFT_TLS_ORIGINATION_DIR", value_name = "DIR", default_value = DEFAULT_TLS_ORIGINATION_DIR)]
    pub tls_origination_dir: PathBuf,

    /// Largest request head a client may send, in KiB (Envoy's `max_request_headers_kb`):
    /// larger ones are answered 431.
    #[arg(long, env = "WEFT_MAX_REQUEST_HEADERS_KB", value_name = "KIB", default_value_t = 60, value_parser = clap::value_parser!(u32).range(8..=8192))]
    pub max_request_headers_kb: u32,

    /// Most request headers a client may send (Envoy's `max_headers_count`): more are
    /// answered 431.
    #[arg(long, env = "WEFT_MAX_REQUEST_HEADERS", value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub max_request_headers: u32,

    /// How long an HTTP/1 client may take to send a request head, from its first byte (or
    /// from the end of the previous response): a slower one is disconnected.
    #[arg(long, env = "WEFT_HTTP_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub http_header_read_timeout: Duration,

    /// How long a client's HTTP connection may go without a request in flight before it is
    /// closed (Istio's default: 1 hour).
    #[arg(long, env = "WEFT_HTTP_IDLE_TIMEOUT", value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,

    /// Streams one HTTP/2 client connection may have open at once (announced in SETTINGS;
    /// a client opening more gets them refused).
    #[arg(long, env = "WEFT_HTTP2_MAX_CONCURRENT_STREAMS", value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_concurrent_streams: u32,

    /// How long a TCP connection may move no byte either way before it is closed (Istio's
    /// default: 1 hour; 0s: never). A DestinationRule's `tcp.idleTimeout` overrides it.
    #[arg(long, env = "WEFT_TCP_IDLE_TIMEOUT", value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// Connections one client address (a pod, or a client outside the mesh) may hold open on
    /// each listener; more are closed at accept and counted.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_SOURCE", value_name = "N", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_source: u32,

    /// HTTP requests one pod may have in flight through its node proxy; more are answered 503
    /// with flag UO and counted.
    #[arg(long, env = "WEFT_MAX_REQUESTS_PER_SOURCE", value_name = "N", default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests_per_source: u32,

    /// The memory the overload manager keeps the proxy under (e.g. 512Mi, 1Gi, or bytes;
    /// 0: none), measured as the process's RSS. Without it, the limit of the proxy's cgroup
    /// (the container's `resources.limits.memory`) is kept, measured as the kubelet does.
    #[arg(long, env = "WEFT_MEMORY_LIMIT", value_name = "SIZE", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
}

/// Default of `--tls-origination-dir` (mount the Secrets of egress certificates there).
pub const DEFAULT_TLS_ORIGINATION_DIR: &str = "/etc/weft/tls-origination";

/// The data-plane runtime's worker threads when `--data-workers` is not given: half the CPUs
/// the process may use, between 1 and [`MAX_DEFAULT_DATA_WORKERS`]. A node proxy shares its
/// node's CPUs with the node's pods, and its requests hop between tasks (client connection,
/// upstream connection, tunnel): each hop from one worker to another is a thread wake-up.
/// On 2 vCPUs shared with the pods, one worker carried 30–45% more HTTP than two
/// (bench/RESULTS.md).
pub fn default_data_workers() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    u16::try_from(cpus / 2)
        .unwrap_or(u16::MAX)
        .clamp(1, MAX_DEFAULT_DATA_WORKERS)
}

/// The most worker threads the data-plane runtime gets by default.
pub const MAX_DEFAULT_DATA_WORKERS: u16 = 4;

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

    /// The pod's `NAMESPACE/SERVICE_ACCOUNT`: with `--ca-addr`, the sidecar presents this
    /// identity and speaks HBONE mTLS to the sidecars of pods labelled
    /// `security.istio.io/tlsMode: istio` (Istio's mark of an injected pod).
    #[arg(long, env = "WEFT_SERVICE_ACCOUNT", value_name = "NAMESPACE/NAME", value_parser = parse_service_account)]
    pub service_account: Option<(String, String)>,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub identity: IdentityArgs,
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
            // A pod's proxy restarts with its pod.
            handover_socket: None,
            cni_socket: None,
            after_handover: AfterHandover::Exit,
            server: self.server,
            identity: IdentityArgs {
                workload: self.service_account,
                ..self.identity
            },
        }
    }
}

#[derive(Clone, Debug, Args)]
#[command(group(ArgGroup::new("keys").required(true).multiple(true).args(["state_dir", "cacerts_dir"])))]
#[command(group(ArgGroup::new("callers").required(true).args(["config_dir", "kubernetes"])))]
pub struct CaArgs {
    /// Listen address of the gRPC (TLS) certificate service.
    #[arg(
        long,
        env = "WEFT_CA_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:15012"
    )]
    pub listen: SocketAddr,

    /// Trust domain of the identities this CA signs.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", value_name = "DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Directory of the CA's own state: without --cacerts-dir, the root CA kept across
    /// restarts (generated on first start: `root-cert.pem`, `ca-cert.pem`, `ca-key.pem`);
    /// either way the root bundle is written to `root-cert.pem` there for nodes to trust.
    #[arg(long, env = "WEFT_CA_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Directory in Istio's `cacerts` shape (a mounted Secret: `ca-cert.pem`, `ca-key.pem`,
    /// `cert-chain.pem`, `root-cert.pem`) holding the signing CA; takes precedence over the
    /// root in --state-dir.
    #[arg(long, env = "WEFT_CA_CACERTS_DIR", value_name = "DIR")]
    pub cacerts_dir: Option<PathBuf>,

    /// File of revoked certificates, one serial number per line in hex as the CA logs them
    /// (`#` starts a comment); watched, and published as a CRL the node proxies poll. Default:
    /// `revoked` in --state-dir.
    #[arg(long, env = "WEFT_CA_REVOKED", value_name = "FILE")]
    pub revoked: Option<PathBuf>,

    /// Local mode: directory of Kubernetes YAML (the nodes' --config-dir) telling which pods
    /// run on which node.
    #[arg(
        long,
        env = "WEFT_CONFIG_DIR",
        value_name = "DIR",
        requires = "node_tokens"
    )]
    pub config_dir: Option<PathBuf>,

    /// Local mode: directory of node tokens, one file per node named after it.
    #[arg(
        long,
        env = "WEFT_CA_NODE_TOKENS",
        value_name = "DIR",
        requires = "config_dir"
    )]
    pub node_tokens: Option<PathBuf>,

    /// Kubernetes mode: authenticate callers with TokenReview and find their node's pods
    /// through the API server (in-cluster ServiceAccount, else KUBECONFIG).
    #[arg(long, env = "WEFT_KUBERNETES")]
    pub kubernetes: bool,

    /// Audiences the callers' tokens must be bound to (repeat, or comma-separate); an empty
    /// value means the API server's own audience.
    #[arg(
        long = "token-audience",
        env = "WEFT_CA_TOKEN_AUDIENCES",
        value_name = "AUDIENCE",
        value_delimiter = ',',
        default_value = "weft-ca"
    )]
    pub token_audiences: Vec<String>,

    /// Service accounts (`namespace/name`) of node proxies, which may obtain the identities of
    /// the pods on their node (repeat, or comma-separate); in local mode the first is the
    /// identity of every node.
    #[arg(
        long = "node-proxy",
        env = "WEFT_CA_NODE_PROXIES",
        value_name = "NS/SA",
        value_delimiter = ',',
        default_value = "weft-system/mesh-node",
        value_parser = parse_service_account
    )]
    pub node_proxies: Vec<(String, String)>,

    /// DNS name of the CA's serving certificate (repeat, or comma-separate).
    #[arg(
        long = "server-name",
        env = "WEFT_CA_SERVER_NAMES",
        value_name = "NAME",
        value_delimiter = ',',
        default_values = ["weft-ca", "weft-ca.weft-system.svc", "localhost"]
    )]
    pub server_names: Vec<String>,

    /// IP address of the CA's serving certificate (repeat, or comma-separate).
    #[arg(
        long = "server-ip",
        env = "WEFT_CA_SERVER_IPS",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub server_ips: Vec<IpAddr>,

    /// Lifetime of a workload certificate when the request names none.
    #[arg(long, env = "WEFT_WORKLOAD_CERT_TTL", value_name = "DURATION", default_value = DEFAULT_WORKLOAD_CERT_TTL, value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,

    /// Longest lifetime of a workload certificate; longer requests are shortened to it.
    #[arg(long, env = "WEFT_CA_MAX_WORKLOAD_CERT_TTL", value_name = "DURATION", default_value = DEFAULT_MAX_WORKLOAD_CERT_TTL, value_parser = parse_duration)]
    pub max_workload_cert_ttl: Duration,

    /// Log output format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

/// Parses `namespace/name` of a service account.
fn parse_service_account(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.into(), sa.into()))
        }
        _ => Err(format!(
            "{s:?} is not a service account: write namespace/name, e.g. weft-system/mesh-node"
        )),
    }
}

/// Parses a duration as Go and Istio write them: one or more `<number><unit>` with the units
/// `d`, `h`, `m`, `s`, `ms` (`24h`, `90m`, `1h30m`, `30s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let error = || format!("{s:?} is not a duration: write e.g. 24h, 90m, 1h30m or 30s");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(error());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(error());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| error())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let millis_per_unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(error()),
        };
        rest = &rest[unit_len..];
        let part = number
            .checked_mul(millis_per_unit)
            .map(Duration::from_millis)
            .ok_or_else(error)?;
        total = total.checked_add(part).ok_or_else(error)?;
    }
    Ok(total)
}

/// Parses a size as Kubernetes writes memory: bytes, or with `Ki`, `Mi`, `Gi` (or `k`, `M`,
/// `G` for powers of ten).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let error = || format!("{s:?} is not a size: write e.g. 512Mi, 1Gi or 268435456");
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(error());
    }
    let number: u64 = s[..digits].parse().map_err(|_| error())?;
    let unit: u64 = match &s[digits..] {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(error()),
    };
    number.checked_mul(unit).ok_or_else(error)
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
    fn sizes_are_read_as_kubernetes_writes_them() {
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "Mi", "12MB", "-1", "1.5Gi", "99999999999999999999Gi"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("512Mi"), "{bad}: {err}");
        }
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
        assert_eq!(args.server.data_workers, None);
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
        assert_eq!(args.server.data_workers, Some(1));
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

        let Command::Sidecar(args) = parse(&[
            "sidecar",
            "--node",
            "n1",
            "--config-dir",
            "/c",
            "--pod-ip",
            "10.244.1.7",
            "--service-account",
            "bench/client",
            "--ca-addr",
            "https://10.0.0.2:15012",
        ])
        .command
        else {
            panic!("expected sidecar");
        };
        let run = args.into_run_args();
        assert_eq!(
            run.identity.workload,
            Some(("bench".to_string(), "client".to_string()))
        );
        assert_eq!(
            run.identity.ca_addr.as_deref(),
            Some("https://10.0.0.2:15012")
        );
    }

    #[test]
    fn identity_defaults_match_the_command_line() {
        let Command::Run(args) = parse(&[
            "run",
            "--node",
            "n1",
            "--config-dir",
            "/c",
            "--cgroup",
            "/g",
            "--proxy-ip",
            "10.0.0.1",
        ])
        .command
        else {
            panic!("expected run");
        };
        assert_eq!(args.identity, IdentityArgs::default());
        assert_eq!(args.identity.trust_domain, "cluster.local");
        assert_eq!(args.identity.ca_server_name, "weft-ca");
        assert_eq!(
            args.identity.workload_cert_ttl,
            Duration::from_secs(24 * 3600)
        );
        let Command::Sidecar(sidecar) = parse(&[
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
        assert_eq!(sidecar.into_run_args().identity, IdentityArgs::default());
    }

    #[test]
    fn run_with_a_mesh_ca() {
        let Command::Run(args) = parse(&[
            "run",
            "--node",
            "n1",
            "--config-dir",
            "/c",
            "--cgroup",
            "/g",
            "--proxy-ip",
            "10.0.0.1",
            "--ca-addr",
            "https://10.0.0.1:15012",
            "--ca-root-cert",
            "/ca/root-cert.pem",
            "--ca-token-file",
            "/ca/tokens/n1",
            "--ca-server-name",
            "ca.example",
            "--trust-domain",
            "example.org",
            "--workload-cert-ttl",
            "1h30m",
        ])
        .command
        else {
            panic!("expected run");
        };
        let id = args.identity;
        assert_eq!(id.ca_addr.as_deref(), Some("https://10.0.0.1:15012"));
        assert_eq!(id.ca_root_cert, Some(PathBuf::from("/ca/root-cert.pem")));
        assert_eq!(id.ca_token_file, Some(PathBuf::from("/ca/tokens/n1")));
        assert_eq!(id.ca_server_name, "ca.example");
        assert_eq!(id.trust_domain, "example.org");
        assert_eq!(id.workload_cert_ttl, Duration::from_secs(5400));
    }

    #[test]
    fn ca_local_with_defaults() {
        let Command::Ca(args) = parse(&[
            "ca",
            "--state-dir",
            "/s",
            "--config-dir",
            "/c",
            "--node-tokens",
            "/t",
        ])
        .command
        else {
            panic!("expected ca");
        };
        assert_eq!(args.listen, "0.0.0.0:15012".parse().unwrap());
        assert_eq!(args.trust_domain, "cluster.local");
        assert_eq!(args.state_dir, Some(PathBuf::from("/s")));
        assert_eq!(args.cacerts_dir, None);
        assert_eq!(args.config_dir, Some(PathBuf::from("/c")));
        assert_eq!(args.node_tokens, Some(PathBuf::from("/t")));
        assert!(!args.kubernetes);
        assert_eq!(args.token_audiences, ["weft-ca"]);
        assert_eq!(
            args.node_proxies,
            [("weft-system".to_owned(), "mesh-node".to_owned())]
        );
        assert_eq!(
            args.server_names,
            ["weft-ca", "weft-ca.weft-system.svc", "localhost"]
        );
        assert!(args.server_ips.is_empty());
        assert_eq!(args.workload_cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(
            args.max_workload_cert_ttl,
            Duration::from_secs(90 * 24 * 3600)
        );
    }

    #[test]
    fn ca_in_kubernetes_with_every_flag() {
        let Command::Ca(args) = parse(&[
            "ca",
            "--kubernetes",
            "--cacerts-dir",
            "/etc/cacerts",
            "--listen",
            "127.0.0.1:15012",
            "--trust-domain",
            "example.org",
            "--token-audience",
            "weft-ca,istio-ca",
            "--node-proxy",
            "weft-system/mesh-node",
            "--node-proxy",
            "istio-system/ztunnel",
            "--server-name",
            "ca.example",
            "--server-ip",
            "10.0.0.1",
            "--server-ip",
            "fd00::1",
            "--workload-cert-ttl",
            "12h",
            "--max-workload-cert-ttl",
            "30d",
            "--log-format",
            "json",
        ])
        .command
        else {
            panic!("expected ca");
        };
        assert!(args.kubernetes);
        assert_eq!(args.cacerts_dir, Some(PathBuf::from("/etc/cacerts")));
        assert_eq!(args.token_audiences, ["weft-ca", "istio-ca"]);
        assert_eq!(args.node_proxies.len(), 2);
        assert_eq!(args.node_proxies[1].1, "ztunnel");
        assert_eq!(args.server_names, ["ca.example"]);
        assert_eq!(args.server_ips.len(), 2);
        assert_eq!(args.workload_cert_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(
            args.max_workload_cert_ttl,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(args.log_format, LogFormat::Json);
    }

    #[test]
    fn ca_needs_keys_and_callers() {
        let err = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("mesh-node").chain(args.iter().copied()))
                .unwrap_err()
                .kind()
        };
        use clap::error::ErrorKind;
        // No keys.
        assert_eq!(
            err(&["ca", "--kubernetes"]),
            ErrorKind::MissingRequiredArgument
        );
        // No callers.
        assert_eq!(
            err(&["ca", "--state-dir", "/s"]),
            ErrorKind::MissingRequiredArgument
        );
        // Local mode needs the token directory.
        assert_eq!(
            err(&["ca", "--state-dir", "/s", "--config-dir", "/c"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&[
                "ca",
                "--state-dir",
                "/s",
                "--kubernetes",
                "--config-dir",
                "/c",
                "--node-tokens",
                "/t"
            ]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            err(&[
                "ca",
                "--state-dir",
                "/s",
                "--kubernetes",
                "--node-proxy",
                "nonamespace"
            ]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("24h", 86_400),
            ("90m", 5_400),
            ("30s", 30),
            ("1h30m", 5_400),
            ("90d", 90 * 86_400),
            ("1d2h3m4s", 93_784),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        for bad in [
            "",
            "h",
            "10",
            "1x",
            "1h30",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("24h"), "{bad}: {err}");
        }
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
