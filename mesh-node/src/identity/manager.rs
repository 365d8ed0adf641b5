//! The node proxy's certificates: one per identity of the pods on its node, plus its own.
//!
//! Each identity gets a task that makes a key (it never leaves this process), asks the CA to
//! sign it, publishes the result, and renews it half way through its life, retrying with
//! back-off while the CA cannot sign. A renewed certificate is used for new connections only:
//! open TLS connections were authenticated once and keep going. Identities whose last pod
//! left the node are forgotten; a connection asking for one that is not known yet waits for
//! its first certificate.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{pki_types::PrivateKeyDer, ClientConfig, ServerConfig};
use thiserror::Error;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{client::CaClientError, Identity};
use crate::{
    metrics::{CertificateMetrics, CertificateResult},
    tls::{revoked_serials, serial_of, Credential, Revoked, TlsError},
};

/// A chain of PEM certificates, leaf first, or why there is none.
pub type SignFuture =
    Pin<Box<dyn Future<Output = Result<Vec<String>, SignError>> + Send + 'static>>;

/// Why the CA gave no certificate, as an operator acts on it.
#[derive(Clone, Debug, Error)]
pub enum SignError {
    /// The CA answered no (a pod not on this node, a bad token, a bad request).
    #[error("{0}")]
    Refused(String),
    /// The CA could not be reached, or not verified.
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Failed(String),
}

impl SignError {
    fn result(&self) -> CertificateResult {
        match self {
            SignError::Refused(_) => CertificateResult::Refused,
            SignError::Unreachable(_) => CertificateResult::Unreachable,
            SignError::Failed(_) => CertificateResult::Failed,
        }
    }
}
/// DER revocation lists, or why there are none.
pub type CrlFuture = Pin<Box<dyn Future<Output = Result<Vec<Vec<u8>>, String>> + Send + 'static>>;

/// What signs certificate requests: the mesh CA through its gRPC API, or an in-process
/// authority in tests.
pub trait Signer: Send + Sync + 'static {
    /// Signs `csr_pem` for `identity` and returns the chain, leaf first and root last.
    /// `impersonate` says the node asks on behalf of a pod, not for itself.
    fn sign(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
        impersonate: bool,
    ) -> SignFuture;

    /// The CA's certificate revocation lists (DER). A CA without any publishes none.
    fn revocations(&self) -> CrlFuture {
        Box::pin(async { Ok(Vec::new()) })
    }
}

#[derive(Debug, Error, Clone)]
pub enum CertError {
    #[error("no certificate for {identity} yet: {reason}")]
    Unavailable { identity: Identity, reason: String },
    #[error("the certificate manager stopped")]
    Stopped,
}

/// A certificate ready to use, with the TLS configurations built from it once.
pub struct Issued {
    pub credential: Arc<Credential>,
    /// Presents this identity to a peer node proxy.
    pub client: Arc<ClientConfig>,
    /// Presents this identity to connecting node proxies (used for the node's own identity).
    pub server: Arc<ServerConfig>,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.credential.fmt(f)
    }
}

/// Settings of the certificate manager.
#[derive(Clone, Debug)]
pub struct CertConfig {
    /// The node proxy's own identity: its server certificate on the HBONE port.
    pub own: Identity,
    /// What a peer's server certificate must prove: the node proxies' identity, or `None`
    /// for any identity under the trust bundle (the benchmark's sidecars, whose peers are
    /// workloads).
    pub peer: Option<Identity>,
    /// The own identity is a workload's (a sidecar's), asked for with its node's credential
    /// on the pod's behalf, as a node proxy asks for its pods.
    pub workload: bool,
    /// Lifetime asked of the CA.
    pub ttl: Duration,
    /// How long a connection waits for the first certificate of an identity.
    pub wait: Duration,
    /// How often the CA's revocation list is fetched.
    pub revocation_poll: Duration,
    /// Where requests and expiries are counted.
    pub metrics: CertificateMetrics,
}

pub struct CertManager {
    signer: Arc<dyn Signer>,
    config: CertConfig,
    slots: Mutex<HashMap<Identity, Arc<Slot>>>,
    /// The serials the CA revoked, as last fetched.
    revoked: watch::Sender<Arc<HashSet<Vec<u8>>>>,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("own", &self.config.own.to_string())
            .finish_non_exhaustive()
    }
}

/// One identity's current certificate and the task that keeps it fresh.
struct Slot {
    issued: watch::Receiver<Option<Arc<Issued>>>,
    error: Arc<Mutex<Option<String>>>,
    /// Asks for a new certificate now (the current one was revoked).
    renew: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The shortest wait before a renewal.
const RENEW_FLOOR: Duration = Duration::from_secs(1);
/// Back-off between failed attempts: from 100 ms, doubling, at most 10 s.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

impl CertManager {
    /// Starts fetching the node's own certificate at once. Must be called within a tokio
    /// runtime, which then runs the renewal tasks.
    pub fn new(signer: Arc<dyn Signer>, config: CertConfig) -> Arc<Self> {
        let manager = Arc::new(Self {
            signer,
            config,
            slots: Mutex::default(),
            revoked: watch::Sender::new(Arc::default()),
        });
        manager.slot(&manager.config.own.clone());
        tokio::spawn(follow_revocations(Arc::downgrade(&manager)));
        manager
    }

    /// The serials the CA revoked: every handshake checks them, and open connections watch
    /// them.
    pub fn revoked(&self) -> Revoked {
        self.revoked.subscribe()
    }

    /// Takes a new revocation list: connections with revoked certificates are refused and
    /// closed from now on, and identities of this node whose certificate was revoked get a
    /// new one at once.
    fn apply_revocations(&self, revoked: HashSet<Vec<u8>>) {
        let revoked = Arc::new(revoked);
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .expect("slots poisoned")
            .values()
            .cloned()
            .collect();
        for slot in slots {
            let current = slot.issued.borrow().clone();
            let hit = current
                .and_then(|issued| serial_of(issued.credential.chain.first()?).ok())
                .is_some_and(|serial| revoked.contains(&serial));
            if hit {
                slot.renew.notify_one();
            }
        }
        self.revoked.send_replace(revoked);
    }

    pub fn own_identity(&self) -> &Identity {
        &self.config.own
    }

    /// The current certificate of `identity`, waiting for the first one if needed.
    pub async fn issued(&self, identity: &Identity) -> Result<Arc<Issued>, CertError> {
        let slot = self.slot(identity);
        let mut issued = slot.issued.clone();
        if let Some(current) = issued.borrow().clone() {
            return Ok(current);
        }
        let wait = tokio::time::timeout(self.config.wait, issued.wait_for(Option::is_some)).await;
        match wait {
            Ok(Ok(current)) => Ok(current.clone().expect("waited for Some")),
            Ok(Err(_)) => Err(CertError::Stopped),
            Err(_) => Err(CertError::Unavailable {
                identity: identity.clone(),
                reason: slot
                    .error
                    .lock()
                    .expect("error slot poisoned")
                    .clone()
                    .unwrap_or_else(|| {
                        format!("the CA did not answer within {:?}", self.config.wait)
                    }),
            }),
        }
    }

    /// The node's own certificate, if it has one yet.
    pub fn own_now(&self) -> Option<Arc<Issued>> {
        let slots = self.slots.lock().expect("slots poisoned");
        let issued = slots.get(&self.config.own)?.issued.borrow().clone();
        issued
    }

    /// Keeps certificates for exactly `wanted` (and the node's own): starts fetching the new
    /// ones before any connection needs them, forgets the others.
    pub fn retain(self: &Arc<Self>, wanted: HashSet<Identity>) {
        let missing: Vec<Identity> = {
            let mut slots = self.slots.lock().expect("slots poisoned");
            slots.retain(|identity, _| {
                let keep = *identity == self.config.own || wanted.contains(identity);
                if !keep {
                    self.config.metrics.forget(&identity.to_string());
                }
                keep
            });
            wanted
                .into_iter()
                .filter(|identity| !slots.contains_key(identity))
                .collect()
        };
        for identity in missing {
            self.slot(&identity);
        }
    }

    /// The identities with a slot, for status pages and tests.
    pub fn identities(&self) -> Vec<Identity> {
        let mut identities: Vec<_> = self
            .slots
            .lock()
            .expect("slots poisoned")
            .keys()
            .cloned()
            .collect();
        identities.sort();
        identities
    }

    /// Each identity with its current certificate, or why it has none yet (`meshctl status`).
    pub fn certificates(&self) -> Vec<(Identity, Result<Arc<Issued>, String>)> {
        let slots = self.slots.lock().expect("slots poisoned");
        let mut out: Vec<_> = slots
            .iter()
            .map(|(identity, slot)| {
                let issued = slot.issued.borrow().clone();
                let state = issued.ok_or_else(|| {
                    slot.error
                        .lock()
                        .expect("error slot poisoned")
                        .clone()
                        .unwrap_or_else(|| "asked of the CA".to_owned())
                });
                (identity.clone(), state)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn slot(&self, identity: &Identity) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("slots poisoned");
        if let Some(slot) = slots.get(identity) {
            return slot.clone();
        }
        let (tx, rx) = watch::channel(None);
        let error = Arc::new(Mutex::new(None));
        let renew = Arc::new(Notify::new());
        let task = tokio::spawn(keep_fresh(
            self.signer.clone(),
            identity.clone(),
            identity != &self.config.own || self.config.workload,
            Fresh {
                config: self.config.clone(),
                revoked: self.revoked(),
                renew: renew.clone(),
            },
            tx,
            error.clone(),
        ));
        let slot = Arc::new(Slot {
            issued: rx,
            error,
            renew,
            task,
        });
        slots.insert(identity.clone(), slot.clone());
        slot
    }
}

/// What an identity's task needs besides its identity.
struct Fresh {
    config: CertConfig,
    revoked: Revoked,
    renew: Arc<Notify>,
}

/// Fetches a certificate for `identity`, publishes it, sleeps until half its life (or until
/// it is revoked), repeats.
async fn keep_fresh(
    signer: Arc<dyn Signer>,
    identity: Identity,
    impersonate: bool,
    fresh: Fresh,
    tx: watch::Sender<Option<Arc<Issued>>>,
    error: Arc<Mutex<Option<String>>>,
) {
    let Fresh {
        config,
        revoked,
        renew,
    } = fresh;
    let mut retry = RETRY_FIRST;
    loop {
        match fetch(&*signer, &identity, impersonate, &config, &revoked).await {
            Ok(issued) => {
                config.metrics.request(CertificateResult::Issued);
                let expiry = issued
                    .credential
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                config.metrics.expires(&identity.to_string(), expiry);
                let renew_at = issued.credential.renew_at(SystemTime::now());
                info!(
                    identity = %identity,
                    expires = %humanize(issued.credential.not_after),
                    "workload certificate issued"
                );
                tx.send_replace(Some(Arc::new(issued)));
                *error.lock().expect("error slot poisoned") = None;
                retry = RETRY_FIRST;
                // Never a hot loop, whatever lifetime the CA granted.
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(RENEW_FLOOR);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = renew.notified() => {
                        warn!(identity = %identity, "this node's certificate was revoked: asking for a new one");
                    }
                }
            }
            Err(e) => {
                config.metrics.request(e.result());
                warn!(identity = %identity, retry_in = ?retry, "cannot obtain a certificate: {e}");
                *error.lock().expect("error slot poisoned") = Some(e.to_string());
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

async fn fetch(
    signer: &dyn Signer,
    identity: &Identity,
    impersonate: bool,
    config: &CertConfig,
    revoked: &Revoked,
) -> Result<Issued, SignError> {
    let failed = SignError::Failed;
    let (csr, key) =
        request(identity).map_err(|e| failed(format!("making the key failed: {e}")))?;
    let chain = signer.sign(identity, csr, config.ttl, impersonate).await?;
    let credential = Credential::from_chain(identity.clone(), &chain, key)
        .map_err(|e| failed(format!("the CA's answer is unusable: {e}")))?;
    let client = credential
        .client_config(config.peer.clone(), revoked.clone())
        .map_err(|e: TlsError| failed(e.to_string()))?;
    let server = credential
        .server_config(revoked.clone())
        .map_err(|e| failed(e.to_string()))?;
    Ok(Issued {
        credential: Arc::new(credential),
        client: Arc::new(client),
        server: Arc::new(server),
    })
}

/// Fetches the CA's revocation lists every `revocation_poll` while the manager lives, and
/// applies what changed. A list is believed only when signed by a CA the node trusts.
async fn follow_revocations(manager: Weak<CertManager>) {
    let mut last: Option<Vec<Vec<u8>>> = None;
    loop {
        let Some(this) = manager.upgrade() else {
            return;
        };
        let poll = this.config.revocation_poll;
        match this.signer.revocations().await {
            Ok(crls) if last.as_ref() != Some(&crls) => {
                // The issuers to check the lists with: the roots and chain of the node's own
                // certificate (the CA signs with the certificate that issued it).
                let issuers = this.own_now().map(|own| {
                    let credential = &own.credential;
                    let mut issuers = credential.bundle.roots().to_vec();
                    issuers.extend(credential.chain.iter().skip(1).cloned());
                    issuers
                });
                if let Some(issuers) = issuers {
                    let (revoked, errors) = revoked_serials(&crls, &issuers);
                    for e in errors {
                        warn!("{e}");
                    }
                    if *this.revoked.borrow() != Arc::new(revoked.clone()) {
                        info!(
                            revoked = revoked.len(),
                            "the mesh CA's revocation list changed"
                        );
                    }
                    this.apply_revocations(revoked);
                    last = Some(crls);
                }
            }
            Ok(_) => {}
            Err(e) => warn!("cannot fetch the mesh CA's revocation list: {e}"),
        }
        drop(this);
        tokio::time::sleep(poll).await;
    }
}

/// A fresh P-256 key and a CSR for `identity` signed with it.
pub fn request(identity: &Identity) -> Result<(String, PrivateKeyDer<'static>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        identity.to_string(),
    )?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((csr, der))
}

fn humanize(at: SystemTime) -> String {
    match at.duration_since(SystemTime::now()) {
        Ok(left) => format!("in {}s", left.as_secs()),
        Err(_) => "already".into(),
    }
}

/// Signs through the mesh CA's gRPC API.
impl Signer for super::client::CaClient {
    fn revocations(&self) -> CrlFuture {
        let client = self.clone();
        Box::pin(async move { client.revocation_lists().await.map_err(|e| e.to_string()) })
    }

    fn sign(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
        impersonate: bool,
    ) -> SignFuture {
        let client = self.clone();
        let identity = identity.clone();
        Box::pin(async move {
            client
                .sign(&identity, &csr_pem, ttl, impersonate)
                .await
                .map_err(|e| match e {
                    CaClientError::Refused { .. } => SignError::Refused(e.to_string()),
                    CaClientError::Unreachable { .. } => SignError::Unreachable(e.to_string()),
                    e => SignError::Failed(e.to_string()),
                })
        })
    }
}

/// An in-process CA with a fresh root, for tests of everything that needs certificates: it
/// signs what it is asked, remembers the serial of each certificate, and publishes a
/// revocation list of what a test revokes.
pub mod testing {
    use std::{
        path::Path,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::{CertConfig, CertManager, CrlFuture, SignError, SignFuture, Signer};
    use crate::{
        ca::authority::{generate_root, Authority},
        identity::{Identity, DEFAULT_TRUST_DOMAIN},
    };

    pub struct TestCa {
        signer: Arc<TestSigner>,
        /// The node proxies' identity.
        pub node: Identity,
    }

    struct TestSigner {
        authority: Authority,
        /// `(identity, serial)` of every certificate issued, oldest first.
        issued: Mutex<Vec<(Identity, Vec<u8>)>>,
        revoked: Mutex<Vec<Vec<u8>>>,
    }

    impl Signer for TestSigner {
        fn sign(
            &self,
            identity: &Identity,
            csr_pem: String,
            ttl: Duration,
            _impersonate: bool,
        ) -> SignFuture {
            let signed = self
                .authority
                .sign(&csr_pem, identity, ttl)
                .map(|issued| {
                    let serial = crate::ca::authority::serial_bytes(&issued.serial);
                    self.issued
                        .lock()
                        .expect("poisoned")
                        .push((identity.clone(), serial.unwrap_or_default()));
                    issued.chain
                })
                .map_err(|e| SignError::Refused(e.to_string()));
            Box::pin(async move { signed })
        }

        fn revocations(&self) -> CrlFuture {
            let revoked = self.revoked.lock().expect("poisoned").clone();
            let crl = self
                .authority
                .revocation_list(&revoked, revoked.len() as u64 + 1)
                .map(|crl| vec![crl])
                .map_err(|e| e.to_string());
            Box::pin(async move { crl })
        }
    }

    impl Default for TestCa {
        fn default() -> Self {
            Self::new()
        }
    }

    impl TestCa {
        pub fn new() -> Self {
            let (cert, key) = generate_root(DEFAULT_TRUST_DOMAIN).expect("a root CA is generated");
            let authority = Authority::from_pems(Path::new("memory"), &key, &cert, "", &cert)
                .expect("a generated root signs");
            Self {
                signer: Arc::new(TestSigner {
                    authority,
                    issued: Mutex::default(),
                    revoked: Mutex::default(),
                }),
                node: Identity::new(DEFAULT_TRUST_DOMAIN, "weft-system", "mesh-node"),
            }
        }

        /// A certificate manager of a node proxy signed by this CA (one-hour certificates).
        pub fn certs(&self) -> Arc<CertManager> {
            self.certs_with_ttl(Duration::from_secs(3600))
        }

        /// Certificates living `ttl`; the revocation list is fetched every 100 ms.
        pub fn certs_with_ttl(&self, ttl: Duration) -> Arc<CertManager> {
            CertManager::new(
                self.signer.clone(),
                CertConfig {
                    own: self.node.clone(),
                    peer: Some(self.node.clone()),
                    workload: false,
                    ttl,
                    wait: Duration::from_secs(5),
                    revocation_poll: Duration::from_millis(100),
                    metrics: Default::default(),
                },
            )
        }

        /// Revokes every certificate issued for `identity` so far; returns how many.
        pub fn revoke(&self, identity: &Identity) -> usize {
            let serials: Vec<Vec<u8>> = self
                .signer
                .issued
                .lock()
                .expect("poisoned")
                .iter()
                .filter(|(id, _)| id == identity)
                .map(|(_, serial)| serial.clone())
                .collect();
            let count = serials.len();
            self.signer
                .revoked
                .lock()
                .expect("poisoned")
                .extend(serials);
            count
        }

        /// How many certificates were issued for `identity`.
        pub fn issued(&self, identity: &Identity) -> usize {
            self.signer
                .issued
                .lock()
                .expect("poisoned")
                .iter()
                .filter(|(id, _)| id == identity)
                .count()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::TestCa, *};

    #[tokio::test]
    async fn certificates_are_renewed_at_half_life_and_forgotten_with_their_pods() {
        let ca = TestCa::new();
        let certs = ca.certs_with_ttl(Duration::from_secs(2));
        let pod = Identity::new("cluster.local", "bookinfo", "reviews");
        certs.retain([pod.clone()].into());
        let first = certs.issued(&pod).await.unwrap();
        assert_eq!(first.credential.identity, pod);
        // Half of two seconds later a new certificate is in force.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let second = certs.issued(&pod).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "not renewed");
        assert!(second.credential.not_after > first.credential.not_after);
        assert_eq!(certs.identities(), [pod.clone(), ca.node.clone()], "sorted");
        // The last pod of the identity left: only the node's own certificate is kept.
        certs.retain(HashSet::new());
        assert_eq!(certs.identities(), std::slice::from_ref(&ca.node));
    }

    #[tokio::test]
    async fn a_signer_that_refuses_names_its_reason_to_the_waiting_connection() {
        struct Refusing;
        impl Signer for Refusing {
            fn sign(
                &self,
                _identity: &Identity,
                _csr_pem: String,
                _ttl: Duration,
                _impersonate: bool,
            ) -> SignFuture {
                Box::pin(async { Err(SignError::Refused("node n1 may not obtain it".into())) })
            }
        }
        let own = Identity::new("cluster.local", "weft-system", "mesh-node");
        let metrics = CertificateMetrics::default();
        let certs = CertManager::new(
            Arc::new(Refusing),
            CertConfig {
                own: own.clone(),
                peer: Some(own.clone()),
                workload: false,
                ttl: Duration::from_secs(60),
                wait: Duration::from_millis(300),
                revocation_poll: Duration::from_secs(60),
                metrics: metrics.clone(),
            },
        );
        let err = certs.issued(&own).await.unwrap_err();
        assert!(
            metrics.requests(CertificateResult::Refused) >= 1,
            "refusals are counted"
        );
        assert!(
            err.to_string().contains("node n1 may not obtain it"),
            "{err}"
        );
    }
}
