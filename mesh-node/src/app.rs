//! Wiring of `mesh-node run`, `mesh-node sidecar` and `mesh-node cleanup`.
//!
//! | thread / runtime                        | runs                                            |
//! |-----------------------------------------|-------------------------------------------------|
//! | `weft-control`, current-thread runtime  | config source, eBPF sync, signals |
//! | `weft-admin`, current-thread runtime    | admin and health servers |
//! | `weft-data` workers (half the CPUs, 1 to 4; `--data-workers`) | proxy listeners 15001, 15006, 15008 and their connections |
//!
//! The two halves meet only in the [`Store`] (snapshots) and a few atomics (applied versions,
//! readiness). The configuration comes from a directory (`--config-dir`) or from the
//! Kubernetes API (`--kubernetes`); either way the eBPF sync starts from the first complete
//! snapshot, never from the empty one the store starts with. On SIGTERM or SIGINT the proxy
//! stops accepting and drains; the eBPF programs stay attached and pinned, so meshed pods fail
//! closed until `mesh-node` is back.
//!
//! A node's mesh-node first asks the one serving before it (if any) for its listening sockets
//! ([`handover`]), and offers its own the same way once it serves: the one that gave them away
//! drains and exits (or waits for SIGTERM, `--after-handover=wait`), and no connection is
//! refused in between.

use std::{
    future::Future,
    io::{self, IsTerminal},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::{
    admin::{self, AdminError, AdminState, Readiness},
    agent::{self, Agent, AgentConfig, AgentError},
    config::{
        AfterHandover, CleanupArgs, ConfigSource, IdentityArgs, LogFormat, RunArgs, SidecarArgs,
    },
    handover,
    identity::{
        client::{CaClient, CaClientConfig, CaClientError},
        manager::{CertConfig, CertManager},
        Identity,
    },
    metrics::Metrics,
    model::{OriginalDst, Store},
    proxy::{
        inspect::Inspector, Bound, HttpLimits, MemoryBudget, NoOriginalDst, Proxy, ProxyConfig,
        ProxyError, RedirectedOriginalDst, SourceLimits,
    },
    source::{
        dns,
        file::{FileSource, SourceError},
        kube::{self as kube_source, KubeConfig, KubeError, KubeSource},
    },
};

#[derive(Debug, Error)]
pub enum AppError {
    #[error("eBPF data path: {0}")]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Handover(#[from] handover::HandoverError),
    #[error("cannot start the {runtime} runtime: {source}")]
    Runtime {
        runtime: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the control thread panicked")]
    ControlPanicked,
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    CaClient(#[from] CaClientError),
    #[error("cannot read the mesh CA's root certificate {path}: {source} (check --ca-root-cert)")]
    CaRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Default log filter. kube-runtime's watcher logs some errors (403) at every retry; the
/// Kubernetes source logs each streak of errors once instead. Access logs are off, as in
/// Istio's default profile.
const DEFAULT_LOG_FILTER: &str = "info,kube_runtime::watcher=error,weft::access=off";

/// Logs to stderr; `RUST_LOG` overrides the default `info` level. Access logs: one line per
/// HTTP request with `RUST_LOG=info,weft::access=info`, plus one per TCP connection with
/// `weft::access=debug`.
pub fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal());
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Where the proxy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One per node, fed by the eBPF capture (unless `--no-ebpf`).
    Node,
    /// Inside one pod's network namespace, fed by `REDIRECT` rules.
    Sidecar,
}

/// `mesh-node run`: returns after a graceful shutdown, or with the error that stopped it.
pub fn run(args: RunArgs) -> Result<(), AppError> {
    serve(args, Mode::Node)
}

/// `mesh-node sidecar`: the same proxy in a pod, for comparing the two architectures.
pub fn run_sidecar(args: SidecarArgs) -> Result<(), AppError> {
    serve(args.into_run_args(), Mode::Sidecar)
}

fn serve(args: RunArgs, mode: Mode) -> Result<(), AppError> {
    info!(
        node = %args.node,
        proxy_ip = %args.proxy_ip,
        source = %args.source(),
        ebpf = !args.no_ebpf,
        ?mode,
        fips = crate::tls::provider().fips(),
        "starting mesh-node"
    );
    // A missing Kubernetes configuration stops start-up before anything is attached.
    let chosen = match args.source() {
        ConfigSource::Kubernetes => Chosen::Kube(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| AppError::Runtime {
                    runtime: "start-up",
                    source,
                })?
                .block_on(kube_source::infer_config())?,
        )),
        ConfigSource::Dir(dir) => Chosen::Dir(dir.to_path_buf()),
    };
    let store = Store::new();
    let readiness = Arc::new(Readiness::new(!args.no_ebpf));

    let agent = if mode == Mode::Sidecar {
        None
    } else if args.no_ebpf {
        warn!("--no-ebpf: nothing is captured; the proxy only serves connections made to it");
        None
    } else {
        let agent = Agent::load(AgentConfig {
            node: args.node.clone(),
            cgroup_root: args.cgroup.clone(),
            bpffs_root: args.bpffs_root.clone(),
            proxy_ip: args.proxy_ip,
            uplinks: args.uplinks.clone(),
        })?;
        readiness.ebpf_attached.store(true, Ordering::Release);
        info!(cgroup = %args.cgroup.display(), "eBPF programs attached");
        Some(agent)
    };
    let original_dst: Arc<dyn OriginalDst> = match (&agent, mode) {
        (Some(agent), _) => agent.original_dst(),
        (None, Mode::Sidecar) => Arc::new(RedirectedOriginalDst),
        (None, Mode::Node) => Arc::new(NoOriginalDst),
    };

    let mut metrics = Metrics::new().with_config(
        store.clone(),
        [
            ("proxy", readiness.proxy_applied_version.clone()),
            ("ebpf", readiness.ebpf_applied_version.clone()),
        ],
    );
    if let Some(agent) = &agent {
        metrics = metrics.with_ebpf(agent.counters());
    }
    let metrics = Arc::new(metrics);

    let source = match chosen {
        Chosen::Dir(dir) => {
            // The first configuration is read before anything serves: a wrong --config-dir
            // stops start-up here instead of producing an empty mesh.
            let mut source =
                FileSource::new(dir, store.clone()).with_rejections(metrics.rejections().clone());
            source.poll()?;
            Source::File(source)
        }
        // The client is built on the control runtime, which drives its connections.
        Chosen::Kube(config) => Source::Kube(config, KubeConfig::new(args.node.clone())),
    };

    let (shutdown_tx, _) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    let handed_over = Arc::new(AtomicBool::new(false));

    let data = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(
            args.server
                .data_workers
                .unwrap_or_else(crate::config::default_data_workers),
        ))
        .thread_name("weft-data")
        .enable_all()
        .build()
        .map_err(|source| AppError::Runtime {
            runtime: "data",
            source,
        })?;
    let mut config = ProxyConfig::new(&args.node, args.proxy_ip);
    // Steered inbound connections keep the pod's address as local address.
    config.inbound_transparent = !args.no_ebpf;
    let handovers = config.handovers.clone();
    // A node's mesh-node takes the listening sockets of the one before it, if one serves.
    let handover_socket = args
        .handover_socket
        .as_ref()
        .filter(|p| !p.as_os_str().is_empty());
    let (listeners, handover) = match (handover_socket, mode) {
        (Some(path), Mode::Node) => {
            let addresses = handover::Addresses {
                outbound: config.outbound_addr,
                inbound: config.inbound_addr,
                tunnel: config.tunnel_addr,
                admin: args.server.admin_addr,
                health: args.server.health_addr,
            };
            let (listeners, confirmation) = data.block_on(listeners_of_node(
                path,
                &args.node,
                &addresses,
                config.inbound_transparent,
            ))?;
            let offer = listeners
                .offer(&args.node)
                .map_err(|source| AppError::Runtime {
                    runtime: "handover",
                    source,
                })?;
            (
                Some(listeners),
                Some(Handover {
                    path: path.clone(),
                    offer,
                    confirmation,
                }),
            )
        }
        _ => (None, None),
    };
    let taken_over = handover.as_ref().is_some_and(|h| h.confirmation.is_some());
    // A SIGTERM that arrives while a handed-over mesh-node drains is still seen after it.
    let terminated = (args.after_handover == AfterHandover::Wait && mode == Mode::Node)
        .then(watch_termination)
        .transpose()?;
    let (proxy_listeners, admin_listeners) = match listeners {
        Some(l) => (
            Some(Bound {
                outbound: l.outbound,
                inbound: l.inbound,
                tunnel: l.tunnel,
            }),
            Some((l.admin, l.health)),
        ),
        None => (None, None),
    };

    let inspector: Arc<OnceLock<Inspector>> = Arc::default();
    let control = {
        let control = Control {
            source,
            agent,
            admin_addr: args.server.admin_addr,
            health_addr: args.server.health_addr,
            listeners: admin_listeners,
            cni_socket: args
                .cni_socket
                .clone()
                .filter(|p| !p.as_os_str().is_empty() && mode == Mode::Node),
            handover,
            handovers,
            handed_over: handed_over.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            shutdown: shutdown_tx.clone(),
            inspector: inspector.clone(),
            node: args.node.clone(),
        };
        std::thread::Builder::new()
            .name("weft-control".into())
            .spawn(move || control.run())
            .map_err(|source| AppError::Runtime {
                runtime: "control",
                source,
            })?
    };

    let data_result = {
        data.block_on(async {
            config.sidecar = mode == Mode::Sidecar;
            config.trust_domain = args.identity.trust_domain.as_str().into();
            config.trust_domain_aliases = args
                .identity
                .trust_domain_aliases
                .iter()
                .filter(|a| !a.is_empty())
                .map(|a| a.as_str().into())
                .collect();
            config.tls_origination_dir = args.server.tls_origination_dir.clone();
            config.http = HttpLimits {
                max_head_bytes: args.server.max_request_headers_kb as usize * 1024,
                max_headers: args.server.max_request_headers as usize,
                header_read_timeout: args.server.http_header_read_timeout,
                idle_timeout: args.server.http_idle_timeout,
                max_concurrent_streams: args.server.http2_max_concurrent_streams,
            };
            config.tcp_idle_timeout = args.server.tcp_idle_timeout;
            config.sources = SourceLimits {
                max_connections: args.server.max_connections_per_source as usize,
                max_requests: args.server.max_requests_per_source as usize,
            };
            config.memory = MemoryBudget::detect(args.server.memory_limit);
            if config.memory.is_none() {
                info!("overload manager off: no --memory-limit and no cgroup memory limit");
            }
            config.certs = certificates(&args.identity, &metrics)?;
            if config.certs.is_none() && mode == Mode::Node {
                warn!("no --ca-addr: no mTLS, so nothing is sent to pods of other nodes and the HBONE port serves nothing");
            }
            let applied = readiness.proxy_applied_version.clone();
            if taken_over {
                // The previous mesh-node serves until this one has a configuration to serve
                // with (from Kubernetes, the first complete list).
                let mut snapshots = store.subscribe();
                tokio::select! {
                    _ = snapshots.wait_for(|s| s.version > 0) => {}
                    () = shutdown_signal(shutdown_tx.subscribe()) => return Ok(()),
                }
            }
            let proxy = match proxy_listeners {
                Some(listeners) => Proxy::on(
                    config,
                    listeners,
                    store.subscribe(),
                    original_dst,
                    &metrics,
                    applied,
                )?,
                None => {
                    Proxy::bind(config, store.subscribe(), original_dst, &metrics, applied).await?
                }
            };
            let _ = inspector.set(proxy.inspector());
            readiness.proxy_listening.store(true, Ordering::Release);
            proxy.run(shutdown_signal(shutdown_tx.subscribe())).await;
            readiness.proxy_listening.store(false, Ordering::Release);
            Ok::<_, AppError>(())
        })
    };
    // Connections still open after the drain are closed with the runtime.
    data.shutdown_timeout(Duration::from_secs(1));
    // Whatever ended the data plane ends the control plane too.
    shutdown_tx.send_replace(true);
    let control_result = control.join().map_err(|_| AppError::ControlPanicked)?;
    data_result?;
    control_result?;
    if handed_over.load(Ordering::Acquire) {
        info!("drained after handing the node over to the next mesh-node");
        if let Some(terminated) = terminated {
            info!("waiting for SIGTERM (--after-handover=wait)");
            let _ = terminated.recv();
        }
        return Ok(());
    }
    if args.no_ebpf || mode == Mode::Sidecar {
        info!("mesh-node stopped");
    } else {
        info!("mesh-node stopped; the eBPF programs stay attached, so meshed pods fail closed until it is back");
    }
    Ok(())
}

/// A thread that reports the first SIGTERM or SIGINT, whenever it comes: a mesh-node that
/// handed its node over stays until its pod is deleted, so that its container is not
/// restarted (and takes the node back).
fn watch_termination() -> Result<std::sync::mpsc::Receiver<()>, AppError> {
    let error = |source| AppError::Runtime {
        runtime: "termination",
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(error)?;
    let (terminated, rx) = std::sync::mpsc::channel();
    let (mut sigterm, mut sigint) = runtime.block_on(async {
        Ok::<_, AppError>((
            signal(tokio::signal::unix::SignalKind::terminate(), "SIGTERM")?,
            signal(tokio::signal::unix::SignalKind::interrupt(), "SIGINT")?,
        ))
    })?;
    std::thread::Builder::new()
        .name("weft-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = sigterm.recv() => {}
                    _ = sigint.recv() => {}
                }
            });
            let _ = terminated.send(());
        })
        .map_err(error)?;
    Ok(rx)
}

/// `mesh-node ca`: the mesh CA, on a small runtime of its own (it signs a few certificates
/// per pod start, nothing on the data path), until SIGTERM or SIGINT.
pub fn run_ca(args: crate::config::CaArgs) -> Result<(), AppError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weft-ca")
        .enable_all()
        .build()
        .map_err(|source| AppError::Runtime {
            runtime: "mesh CA",
            source,
        })?;
    runtime.block_on(async {
        let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate(), "SIGTERM")?;
        let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt(), "SIGINT")?;
        let server = crate::ca::CaServer::bind(args.into()).await?;
        server
            .run(async {
                tokio::select! {
                    _ = sigterm.recv() => info!("SIGTERM received: shutting down"),
                    _ = sigint.recv() => info!("SIGINT received: shutting down"),
                }
            })
            .await?;
        Ok(())
    })
}

/// How long a connection waits for the first certificate of its pod's identity.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(5);
/// How often the mesh CA's revocation list is fetched.
const REVOCATION_POLL: Duration = Duration::from_secs(5);
/// Deadline of one request to the mesh CA.
const CA_TIMEOUT: Duration = Duration::from_secs(5);

/// The node's certificate manager, fetching from the mesh CA of `--ca-addr`; `None` without
/// one. Must run on the data runtime, which then runs the renewals.
fn certificates(
    args: &IdentityArgs,
    metrics: &Metrics,
) -> Result<Option<Arc<CertManager>>, AppError> {
    let Some(address) = &args.ca_addr else {
        return Ok(None);
    };
    let root_cert_pem = match &args.ca_root_cert {
        Some(path) => std::fs::read_to_string(path).map_err(|source| AppError::CaRoot {
            path: path.clone(),
            source,
        })?,
        None => {
            return Err(AppError::CaRoot {
                path: "(none)".into(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "--ca-addr needs --ca-root-cert to verify the CA",
                ),
            })
        }
    };
    let client = CaClient::new(CaClientConfig {
        address: address.clone(),
        root_cert_pem,
        server_name: args.ca_server_name.clone(),
        token_file: args.ca_token_file.clone(),
        timeout: CA_TIMEOUT,
    })?;
    info!(ca = %address, trust_domain = %args.trust_domain, "workload certificates come from the mesh CA");
    let node = Identity::new(
        &args.trust_domain,
        crate::ca::DEFAULT_NODE_PROXY.0,
        crate::ca::DEFAULT_NODE_PROXY.1,
    );
    Ok(Some(CertManager::new(
        Arc::new(client),
        CertConfig {
            // The DaemonSet's service account: what a node proxy presents on its HBONE port and
            // expects of its peers. A sidecar presents its pod's, and its peers are workloads.
            own: match &args.workload {
                Some((namespace, account)) => Identity::new(&args.trust_domain, namespace, account),
                None => node.clone(),
            },
            peer: args.workload.is_none().then(|| node.clone()),
            workload: args.workload.is_some(),
            ttl: args.workload_cert_ttl,
            wait: CERTIFICATE_WAIT,
            revocation_poll: REVOCATION_POLL,
            metrics: metrics.certificates().clone(),
        },
    )))
}

/// `mesh-node cleanup`: detaches and unpins everything of a node.
pub fn cleanup(args: CleanupArgs) -> Result<(), AppError> {
    agent::cleanup(&args.bpffs_root, &args.node)?;
    info!(node = %args.node, bpffs_root = %args.bpffs_root.display(), "eBPF programs and maps removed");
    Ok(())
}

/// Completes once shutdown was requested (or nobody can request it any more).
pub async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The configuration source chosen on the command line.
enum Chosen {
    Dir(PathBuf),
    Kube(Box<kube::Config>),
}

/// The configuration source as handed to the control thread: a directory already read once,
/// or what the Kubernetes client is built from on that thread.
enum Source {
    File(FileSource),
    Kube(Box<kube::Config>, KubeConfig),
}

/// The configuration source on the control runtime.
enum Running {
    File(FileSource),
    Kube(KubeSource),
}

/// Everything that runs on the control thread.
struct Control {
    source: Source,
    agent: Option<Agent>,
    admin_addr: SocketAddr,
    health_addr: SocketAddr,
    /// Admin and health sockets bound before (or taken from the previous mesh-node).
    listeners: Option<(std::net::TcpListener, std::net::TcpListener)>,
    /// Where the container runtime's `weft-cni` enrolls new pods.
    cni_socket: Option<PathBuf>,
    /// Where to offer the listening sockets to the next mesh-node, and their duplicates.
    handover: Option<Handover>,
    /// Where open connections go to, or come from, across a handover.
    handovers: crate::proxy::Handovers,
    /// Set once the next mesh-node took the sockets.
    handed_over: Arc<AtomicBool>,
    store: Store,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: Arc<watch::Sender<bool>>,
    /// The proxy, for `meshctl` through the admin, once it serves.
    inspector: Arc<OnceLock<Inspector>>,
    node: String,
}

impl Control {
    fn run(self) -> Result<(), AppError> {
        let shutdown = self.shutdown.clone();
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| AppError::Runtime {
                runtime: "control",
                source,
            })
            .and_then(|rt| rt.block_on(self.serve()));
        // The error itself is reported by `run`, once the data plane has stopped too.
        shutdown.send_replace(true);
        result
    }

    async fn serve(self) -> Result<(), AppError> {
        let Control {
            source,
            agent,
            admin_addr,
            health_addr,
            listeners,
            cni_socket,
            handover,
            handovers,
            handed_over,
            store,
            metrics,
            readiness,
            shutdown,
            inspector,
            node,
        } = self;
        let stop = || shutdown_signal(shutdown.subscribe());
        let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate(), "SIGTERM")?;
        let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt(), "SIGINT")?;

        let (admin_listener, health) = match listeners {
            Some((admin_listener, health)) => (admin_listener, health),
            None => (
                admin::bind("admin", admin_addr)
                    .await?
                    .into_std()
                    .map_err(runtime_error)?,
                admin::bind("health", health_addr)
                    .await?
                    .into_std()
                    .map_err(runtime_error)?,
            ),
        };
        let source = match source {
            Source::File(source) => Running::File(source),
            Source::Kube(client, config) => Running::Kube(
                KubeSource::new(kube_source::client(*client)?, config, store.clone())
                    .with_rejections(metrics.rejections().clone()),
            ),
        };
        let programs = agent.as_ref().map(Agent::programs);
        let state = Arc::new(AdminState {
            store: store.clone(),
            metrics,
            proxy: inspector,
            programs,
            node,
            started: Instant::now(),
            inspecting: Arc::new(tokio::sync::Semaphore::new(1)),
            readiness: readiness.clone(),
            source: match &source {
                Running::File(source) => source.status(),
                Running::Kube(source) => source.status(),
            },
        });
        tokio::spawn(trim_heap_every(HEAP_TRIM_PERIOD, stop()));
        serve_admin_apart(health, admin_listener, readiness.clone(), state, &shutdown)?;
        if let Some(handover) = handover {
            tokio::spawn(offer_handover(
                handover,
                handovers,
                readiness.clone(),
                shutdown.clone(),
                handed_over,
            ));
        }
        tokio::spawn(dns::run(store.clone(), stop()));
        match source {
            Running::File(source) => tokio::spawn(source.run(stop())),
            Running::Kube(source) => {
                info!("waiting for the first complete list from the Kubernetes API");
                tokio::spawn(source.run(stop()))
            }
        };

        // The container runtime enrolls new pods through the agent (its sync meshes them).
        let (enroll, enrollments) = tokio::sync::mpsc::channel(64);
        if let (Some(path), true) = (&cni_socket, agent.is_some()) {
            match handover::bind_private(path).and_then(|l| handover::own_uid().map(|uid| (l, uid)))
            {
                Ok((listener, uid)) => {
                    let server = Arc::new(agent::cni::CniServer {
                        store: store.clone(),
                        readiness: readiness.clone(),
                        enroll,
                        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                    });
                    info!(path = %path.display(), "enrolling new pods for the container runtime (weft-cni)");
                    tokio::spawn(server.clone().keep_namespaces());
                    tokio::spawn(server.serve(listener, uid));
                }
                Err(e) => warn!(path = %path.display(), "weft-cni cannot reach this agent: {e}"),
            }
        }
        let sync = async {
            match agent {
                Some(agent) => {
                    // Syncing the store's initial, empty snapshot would unmesh every pod of a
                    // restarted node until the first list arrives.
                    let mut snapshots = store.subscribe();
                    if snapshots.wait_for(|s| s.version > 0).await.is_err() {
                        return;
                    }
                    agent
                        .run(
                            snapshots,
                            readiness.ebpf_applied_version.clone(),
                            enrollments,
                        )
                        .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received: shutting down"),
            _ = sigint.recv() => info!("SIGINT received: shutting down"),
            _ = stop() => {}
            _ = sync => error!("the eBPF map sync stopped: shutting down"),
        }
        shutdown.send_replace(true);
        Ok(())
    }
}

/// Serves health and admin each on a thread of its own (`weft-health`, `weft-admin`): parsing
/// a large resource or a burst of watch events keeps the control thread busy for seconds, and
/// kubelet's probes must not wait for it, nor for whoever keeps the admin port busy (any pod
/// reaches its `/metrics`).
fn serve_admin_apart(
    health: std::net::TcpListener,
    admin_listener: std::net::TcpListener,
    readiness: Arc<Readiness>,
    state: Arc<AdminState>,
    shutdown: &watch::Sender<bool>,
) -> Result<(), AppError> {
    let register = |listener: std::net::TcpListener| {
        listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
    };
    let apart = |name: &str, serve: Box<dyn FnOnce() -> BoxedServer + Send>| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(runtime_error)?;
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || runtime.block_on(serve()))
            .map_err(runtime_error)
            .map(drop)
    };
    let stop = shutdown.subscribe();
    apart(
        "weft-health",
        Box::new(move || {
            Box::pin(async move {
                match register(health) {
                    Ok(health) => {
                        admin::serve_health(health, readiness, shutdown_signal(stop)).await
                    }
                    Err(e) => error!("the health listener could not be moved to its thread: {e}"),
                }
            })
        }),
    )?;
    let stop = shutdown.subscribe();
    apart(
        "weft-admin",
        Box::new(move || {
            Box::pin(async move {
                match register(admin_listener) {
                    Ok(listener) => {
                        admin::serve_admin(listener, state, shutdown_signal(stop)).await
                    }
                    Err(e) => error!("the admin listener could not be moved to its thread: {e}"),
                }
            })
        }),
    )
}

/// A server's future, run on a thread of its own.
type BoxedServer = std::pin::Pin<Box<dyn Future<Output = ()>>>;

fn runtime_error(source: io::Error) -> AppError {
    AppError::Runtime {
        runtime: "admin",
        source,
    }
}

/// How long a new mesh-node tries to get its ports while another one holds them without
/// offering them yet (it is still starting).
const PORTS_WAIT: Duration = Duration::from_secs(10);

/// A node's mesh-node's part in handovers: where it offers its sockets, their duplicates, and
/// the confirmation it owes the mesh-node it took them from, if any.
struct Handover {
    path: PathBuf,
    offer: handover::Offer,
    confirmation: Option<handover::Confirmation>,
}

/// The listening sockets of a node's mesh-node: taken from the one serving before it on
/// `path` (with the confirmation it waits for), else bound afresh.
async fn listeners_of_node(
    path: &Path,
    node: &str,
    addresses: &handover::Addresses,
    inbound_transparent: bool,
) -> Result<(handover::Listeners, Option<handover::Confirmation>), AppError> {
    let deadline = tokio::time::Instant::now() + PORTS_WAIT;
    loop {
        match handover::take_over(path, node, addresses) {
            Ok(Some(taken)) => {
                info!(path = %path.display(), "took the listening sockets over from the previous mesh-node");
                return Ok((taken.listeners, Some(taken.confirmation)));
            }
            Ok(None) => {}
            // A predecessor too busy to answer in time, or one that failed half-way: its
            // offer stands, ask again.
            Err(e @ handover::HandoverError::Exchange { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                warn!("{e}; asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        match handover::bind_listeners(addresses, inbound_transparent) {
            Ok(bound) => return Ok((bound, None)),
            Err(handover::HandoverError::Bind { source, .. })
                if source.kind() == io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Once the proxy serves (its first configuration applied), tells the mesh-node it took the
/// sockets from, which then drains, and offers them to the node's next mesh-node; when one
/// serves on them, this one stops accepting and drains.
async fn offer_handover(
    handover: Handover,
    handovers: crate::proxy::Handovers,
    readiness: Arc<Readiness>,
    shutdown: Arc<watch::Sender<bool>>,
    handed_over: Arc<AtomicBool>,
) {
    let Handover {
        path,
        offer,
        confirmation,
    } = handover;
    let stop = shutdown_signal(shutdown.subscribe());
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    // A successor not ready in time gives up (its predecessor takes its offer back later).
    let ready_by = tokio::time::Instant::now() + handover::READY_TIMEOUT;
    while !readiness.proxy_listening.load(Ordering::Acquire) || readiness.check().is_err() {
        if confirmation.is_some() && tokio::time::Instant::now() > ready_by {
            error!(
                "not ready {} s after taking the listening sockets over ({}): exiting, the \
                 previous mesh-node serves on",
                handover::READY_TIMEOUT.as_secs(),
                readiness.check().err().unwrap_or_default()
            );
            shutdown.send_replace(true);
            return;
        }
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
    }
    if let Some(confirmation) = confirmation {
        match tokio::task::spawn_blocking(move || confirmation.confirm()).await {
            Ok(Ok(stream)) => {
                info!("serving: the previous mesh-node drains");
                handovers.adopt_from(stream);
            }
            // It is gone (it crashed, or was told to stop): it serves no more, and this one
            // holds the sockets. (It takes an offer back only after `READY_TIMEOUT`, by when
            // this one has given up.)
            Ok(Err(e)) => {
                warn!("the previous mesh-node is gone before it heard this one serves: {e}")
            }
            Err(e) => warn!("the previous mesh-node is gone before it heard this one serves: {e}"),
        }
    }
    let listener = match handover::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            warn!("no handover will be offered to the next mesh-node: {e}");
            return;
        }
    };
    info!(path = %path.display(), "offering the listening sockets to the next mesh-node");
    tokio::select! {
        () = &mut stop => {}
        successor = handover::offer(listener, offer, &readiness.handing_over) => {
            info!("the next mesh-node serves: draining");
            match successor.into_std().and_then(crate::proxy::Successor::new) {
                Ok(successor) => {
                    let _ = handovers.successor.set(Arc::new(successor));
                }
                Err(e) => warn!("open connections cannot go to the next mesh-node: {e}"),
            }
            handed_over.store(true, Ordering::Release);
            shutdown.send_replace(true);
        }
    }
}

/// How often freed heap memory goes back to the kernel.
const HEAP_TRIM_PERIOD: Duration = Duration::from_secs(10);

/// Keeps the proxy's RSS at what its connections use now, not at the peak of the last burst.
async fn trim_heap_every(period: Duration, stop: impl Future<Output = ()>) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => crate::sys::trim_heap(),
        }
    }
}

fn signal(
    kind: tokio::signal::unix::SignalKind,
    name: &'static str,
) -> Result<tokio::signal::unix::Signal, AppError> {
    tokio::signal::unix::signal(kind).map_err(|source| AppError::Signal {
        signal: name,
        source,
    })
}
