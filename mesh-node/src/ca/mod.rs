//! The mesh CA (`mesh-node ca`): signs short-lived workload certificates for node proxies.
//!
//! It speaks Istio's certificate API (`istio.v1.auth.IstioCertificateService`, gRPC over TLS
//! on 15012) so that either side can be swapped for Istio's: a node proxy may use istiod as
//! its CA, and this CA answers what ztunnel asks. A node proxy authenticates with a bearer
//! token and obtains its pods' identities with Istio's `ImpersonatedIdentity` metadata; keys
//! stay on the nodes, only CSRs travel.
//!
//! - [`authority`]: the signing key and chain, from Istio's `cacerts` or a generated root.
//! - [`auth`]: callers (tokens) and who may obtain which identity, locally or in Kubernetes.
//! - [`server`]: the gRPC service over both.
//! - [`proto`]: the API's messages and generated client and server, shared with
//!   [`crate::identity::client`].
//!
//! The CA runs on one small tokio runtime of its own; in local mode a `FileSource` polls the
//! configuration directory beside the server, so a newly added pod's identity is obtainable
//! within a poll interval.

pub mod auth;
pub mod authority;
pub mod proto;
pub mod server;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::sync::watch;
use tonic::transport::{server::TcpIncoming, Server, ServerTlsConfig};
use tracing::{info, warn};

pub use auth::{AuthError, Caller, KubeAuth, LocalAuth, NodeAuth, ServiceAccount};
pub use authority::{Authority, AuthorityError, Issued};
pub use server::{CaService, RevocationService};

use crate::{
    config::CaArgs,
    identity::Identity,
    model::Store,
    source::file::{FileSource, SourceError},
};
use proto::{
    istio_certificate_service_server::IstioCertificateServiceServer,
    revocations_server::RevocationsServer,
};

#[derive(Debug, Error)]
pub enum CaError {
    #[error("mesh CA keys: {0}")]
    Authority(#[from] AuthorityError),
    #[error("mesh CA callers: {0}")]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("Kubernetes client for the mesh CA: {0} (in a pod, check its service account; outside, KUBECONFIG)")]
    Kube(String),
    #[error("{identity:?} is not a valid node proxy identity in trust domain {trust_domain}: check --node-proxy and --trust-domain")]
    NodeIdentity {
        identity: String,
        trust_domain: String,
    },
    #[error("cannot listen on {addr}: {source} (is another mesh CA running? change --listen)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("mesh CA TLS: {0}")]
    Tls(String),
    #[error("the mesh CA's gRPC server failed: {0}")]
    Serve(String),
}

/// Where the signing CA comes from.
#[derive(Clone, Debug)]
pub struct KeySource {
    /// Istio's `cacerts` directory; preferred when set.
    pub cacerts_dir: Option<PathBuf>,
    /// Local state: the generated root when there is no `cacerts_dir`, and where the root
    /// bundle is written either way.
    pub state_dir: Option<PathBuf>,
    /// Revoked serial numbers, one per line (hex); default `revoked` in `state_dir`.
    pub revoked: Option<PathBuf>,
}

impl KeySource {
    fn revoked_file(&self) -> Option<PathBuf> {
        self.revoked
            .clone()
            .or_else(|| self.state_dir.as_ref().map(|d| d.join(REVOKED_FILE)))
    }
}

/// The revoked serials beside the CA's state.
pub const REVOKED_FILE: &str = "revoked";

/// The serial numbers of a `revoked` file; a line that is not one is reported and skipped.
fn read_revoked(path: Option<&PathBuf>) -> Vec<Vec<u8>> {
    let Some(path) = path else {
        return Vec::new();
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty())
        .filter_map(|line| {
            let serial = authority::serial_bytes(line);
            if serial.is_none() {
                warn!(file = %path.display(), line, "not a serial number in hex: ignored");
            }
            serial
        })
        .collect()
}

/// How callers are authenticated and their nodes' pods found.
#[derive(Clone, Debug)]
pub enum CallerSource {
    /// Local mode: node tokens in files, pods from the nodes' configuration directory.
    Local {
        config_dir: PathBuf,
        node_tokens: PathBuf,
    },
    /// Kubernetes: TokenReview and pod lists; `audiences` the tokens must be bound to.
    Kubernetes { audiences: Vec<String> },
}

/// Settings of the mesh CA.
#[derive(Clone, Debug)]
pub struct CaSettings {
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub keys: KeySource,
    pub callers: CallerSource,
    /// Service accounts of node proxies; in local mode the first is every node's identity.
    pub node_proxies: Vec<ServiceAccount>,
    /// Names and addresses of the CA's serving certificate.
    pub server_names: Vec<String>,
    pub server_ips: Vec<IpAddr>,
    pub workload_cert_ttl: Duration,
    pub max_workload_cert_ttl: Duration,
}

impl From<CaArgs> for CaSettings {
    fn from(args: CaArgs) -> Self {
        let callers = match (args.config_dir, args.node_tokens) {
            (Some(config_dir), Some(node_tokens)) if !args.kubernetes => CallerSource::Local {
                config_dir,
                node_tokens,
            },
            _ => CallerSource::Kubernetes {
                audiences: args.token_audiences,
            },
        };
        Self {
            listen: args.listen,
            trust_domain: args.trust_domain,
            keys: KeySource {
                cacerts_dir: args.cacerts_dir,
                state_dir: args.state_dir,
                revoked: args.revoked,
            },
            callers,
            node_proxies: args
                .node_proxies
                .into_iter()
                .map(|(ns, sa)| ServiceAccount::new(ns, sa))
                .collect(),
            server_names: args.server_names,
            server_ips: args.server_ips,
            workload_cert_ttl: args.workload_cert_ttl,
            max_workload_cert_ttl: args.max_workload_cert_ttl,
        }
    }
}

/// A bound mesh CA, ready to serve.
pub struct CaServer {
    incoming: TcpIncoming,
    local_addr: SocketAddr,
    tls: ServerTlsConfig,
    service: CaService,
    revocations: RevocationService,
    authority: Arc<ArcSwap<Authority>>,
    /// The revocation list of the signing CA, as published.
    crls: Arc<ArcSwap<Vec<Vec<u8>>>>,
    /// Where the keys came from and what the files held when loaded, watched for a rotation
    /// (`None`: the authority was given by the caller).
    keys: Option<(CaSettings, u64)>,
    /// The configuration directory's poller (local mode), started by [`CaServer::run`].
    source: Option<FileSource>,
}

impl CaServer {
    /// Loads (or creates) the keys, sets up the callers' authentication and binds the
    /// listener. Must run inside the tokio runtime that will serve.
    pub async fn bind(settings: CaSettings) -> Result<Self, CaError> {
        crate::tls::install_default_provider();
        let authority = Arc::new(load_authority(&settings)?);
        // Taken now, not when serving starts: a change in between is then seen as one.
        let fingerprint = key_fingerprint(&settings.keys);
        let (auth, source): (Arc<dyn NodeAuth>, _) = match &settings.callers {
            CallerSource::Local {
                config_dir,
                node_tokens,
            } => {
                let store = Store::new();
                let mut source = FileSource::new(config_dir, store.clone());
                // A wrong --config-dir stops start-up here instead of refusing every pod.
                source.poll()?;
                let node = settings.node_proxies.first().cloned().unwrap_or_else(|| {
                    ServiceAccount::new(DEFAULT_NODE_PROXY.0, DEFAULT_NODE_PROXY.1)
                });
                let uri = format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    settings.trust_domain, node.namespace, node.name
                );
                let identity: Identity = uri.parse().map_err(|_| CaError::NodeIdentity {
                    identity: uri.clone(),
                    trust_domain: settings.trust_domain.clone(),
                })?;
                let auth = LocalAuth::new(node_tokens, identity, store)?;
                (Arc::new(auth), Some(source))
            }
            CallerSource::Kubernetes { audiences } => {
                let config = kube::Config::infer()
                    .await
                    .map_err(|e| CaError::Kube(e.to_string()))?;
                let client =
                    kube::Client::try_from(config).map_err(|e| CaError::Kube(e.to_string()))?;
                let auth = KubeAuth::new(
                    client,
                    settings.trust_domain.clone(),
                    audiences.clone(),
                    settings.node_proxies.clone(),
                );
                (Arc::new(auth), None)
            }
        };
        let mut server = Self::bind_with(&settings, authority, auth).await?;
        server.source = source;
        server.keys = Some((settings, fingerprint));
        Ok(server)
    }

    /// Binds with a given authority and authentication (tests, or a caller that builds its
    /// own Kubernetes client).
    pub async fn bind_with(
        settings: &CaSettings,
        authority: Arc<Authority>,
        auth: Arc<dyn NodeAuth>,
    ) -> Result<Self, CaError> {
        crate::tls::install_default_provider();
        let (chain, key) =
            authority.serving_certificate(&settings.server_names, &settings.server_ips)?;
        // A client that opens a connection and never finishes its handshake must not hold it.
        let tls = ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(chain, key))
            .timeout(HANDSHAKE_TIMEOUT);
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| CaError::Bind {
                addr: settings.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| CaError::Bind {
            addr: settings.listen,
            source,
        })?;
        let crl =
            authority.revocation_list(&read_revoked(settings.keys.revoked_file().as_ref()), 1)?;
        let crls = Arc::new(ArcSwap::from_pointee(vec![crl]));
        let authority = Arc::new(ArcSwap::new(authority));
        let service = CaService::new(
            authority.clone(),
            auth.clone(),
            &settings.trust_domain,
            settings.workload_cert_ttl,
        );
        Ok(Self {
            incoming: TcpIncoming::from(listener).with_nodelay(Some(true)),
            local_addr,
            tls,
            service,
            revocations: RevocationService::new(auth, crls.clone()),
            authority,
            crls,
            keys: None,
            source: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The signing CA now in force.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority.load_full()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), CaError> {
        let (stop_tx, stop_rx) = watch::channel(());
        if let Some(source) = self.source {
            let mut stop_rx = stop_rx.clone();
            tokio::spawn(source.run(async move {
                // Completes when the sender is dropped, i.e. when serving ended.
                while stop_rx.changed().await.is_ok() {}
            }));
        }
        if let Some((settings, loaded)) = self.keys {
            let mut stop_rx = stop_rx.clone();
            let published = Published {
                authority: self.authority.clone(),
                crls: self.crls.clone(),
            };
            tokio::spawn(watch_keys(settings, loaded, published, async move {
                while stop_rx.changed().await.is_ok() {}
            }));
        }
        drop(stop_rx);
        info!(addr = %self.local_addr, roots = self.authority.load().roots().len(), "mesh CA serving");
        let result = Server::builder()
            .timeout(REQUEST_TIMEOUT)
            .concurrency_limit_per_connection(STREAMS_PER_CONNECTION)
            .max_concurrent_streams(STREAMS_PER_CONNECTION as u32)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .tls_config(self.tls)
            .map_err(|e| CaError::Tls(e.to_string()))?
            .add_service(IstioCertificateServiceServer::new(self.service))
            .add_service(RevocationsServer::new(self.revocations))
            .serve_with_incoming_shutdown(self.incoming, shutdown)
            .await
            .map_err(|e| CaError::Serve(e.to_string()));
        drop(stop_tx);
        info!("mesh CA stopped");
        result
    }
}

/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one certificate request may take, TokenReview and pod list included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests one connection may have in flight (a node asks for a handful at a time).
const STREAMS_PER_CONNECTION: usize = 32;

/// The node proxy's service account unless configured otherwise.
pub const DEFAULT_NODE_PROXY: (&str, &str) = ("weft-system", "mesh-node");

/// What the CA publishes, replaced as its files change.
struct Published {
    authority: Arc<ArcSwap<Authority>>,
    crls: Arc<ArcSwap<Vec<Vec<u8>>>>,
}

/// How often a new revocation list is signed even when nothing changed (it is valid for a
/// day).
const CRL_REFRESH: Duration = Duration::from_secs(3600);

/// How often the key files are checked for a rotation.
const KEY_POLL: Duration = Duration::from_secs(2);

/// Reloads the signing CA when its files change: the three steps of a root rotation (a root
/// bundle with the old and the new root; then the new signing CA; then the bundle without the
/// old root) take effect for the next certificates, without a restart. A change that does not
/// load (half written, a key that does not match) keeps the authority in force and is retried.
async fn watch_keys(
    settings: CaSettings,
    loaded: u64,
    published: Published,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut seen = loaded;
    let mut tick = tokio::time::interval(KEY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let revoked_file = settings.keys.revoked_file();
    let mut revoked_seen = std::fs::read(revoked_file.as_ref().map_or(Path::new(""), |p| p)).ok();
    let mut crl_number = 1;
    let mut crl_issued = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        // The revocation list: again when the revoked serials change, and well before it
        // expires.
        let revoked_now = std::fs::read(revoked_file.as_ref().map_or(Path::new(""), |p| p)).ok();
        if revoked_now != revoked_seen || crl_issued.elapsed() > CRL_REFRESH {
            crl_number += 1;
            let revoked = read_revoked(revoked_file.as_ref());
            match published
                .authority
                .load()
                .revocation_list(&revoked, crl_number)
            {
                Ok(crl) => {
                    info!(
                        revoked = revoked.len(),
                        number = crl_number,
                        "published a revocation list"
                    );
                    published.crls.store(Arc::new(vec![crl]));
                    revoked_seen = revoked_now;
                    crl_issued = tokio::time::Instant::now();
                }
                Err(e) => warn!("cannot sign the revocation list: {e}"),
            }
        }
        let now = key_fingerprint(&settings.keys);
        if now == seen {
            continue;
        }
        // A state directory emptied meanwhile is a mistake to report, not a reason for a new
        // root that no node trusts.
        let root_gone = settings.keys.cacerts_dir.is_none()
            && settings
                .keys
                .state_dir
                .as_ref()
                .is_some_and(|d| !d.join(authority::ROOT_CERT_FILE).exists());
        if root_gone {
            warn!("the root of the state directory is gone: still signing with the one loaded");
            seen = now;
            continue;
        }
        match load_authority(&settings) {
            Ok(loaded) => {
                info!(
                    roots = loaded.roots().len(),
                    chain = loaded.chain().len(),
                    "the signing CA or root bundle changed: issuing with it from now on"
                );
                published.authority.store(Arc::new(loaded));
                seen = now;
                // The new signing CA signs the list from now on.
                revoked_seen = None;
            }
            Err(e) => warn!("the CA's key files changed but do not load (kept the previous): {e}"),
        }
    }
}

/// What the key files hold now, to tell a change.
fn key_fingerprint(keys: &KeySource) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    // The state directory only receives the bundle when cacerts is the source.
    if let Some(dir) = keys.cacerts_dir.as_ref().or(keys.state_dir.as_ref()) {
        for file in [
            authority::CA_CERT_FILE,
            authority::CA_KEY_FILE,
            authority::CERT_CHAIN_FILE,
            authority::ROOT_CERT_FILE,
        ] {
            std::fs::read(dir.join(file)).ok().hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// Loads the signing CA as the settings say, and writes the root bundle to the state
/// directory.
fn load_authority(settings: &CaSettings) -> Result<Authority, CaError> {
    let authority = match (&settings.keys.cacerts_dir, &settings.keys.state_dir) {
        (Some(cacerts), state) => {
            let authority = Authority::from_cacerts(cacerts)?;
            info!(dir = %cacerts.display(), chain = authority.chain().len(), "loaded the signing CA from cacerts");
            if let Some(state) = state {
                authority.write_root_bundle(state)?;
            }
            authority
        }
        (None, Some(state)) => {
            let authority = Authority::load_or_generate(state, &settings.trust_domain)?;
            info!(dir = %state.display(), "signing with the root CA of the state directory");
            authority
        }
        (None, None) => {
            return Err(CaError::Authority(AuthorityError::Invalid {
                path: PathBuf::from("--state-dir"),
                reason: "neither --state-dir nor --cacerts-dir is set".into(),
            }))
        }
    };
    Ok(authority.with_max_ttl(settings.max_workload_cert_ttl))
}

/// Runs the mesh CA until `shutdown` completes.
pub async fn serve(
    settings: CaSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CaError> {
    CaServer::bind(settings).await?.run(shutdown).await
}
