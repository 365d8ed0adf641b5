//! TLS between node proxies: rustls configurations for workload certificates, checked against
//! the mesh's trust bundle, with the peer's SPIFFE ID as the only name that counts.
//!
//! Both directions are TLS 1.3 only, with ALPN `h2` (HBONE is HTTP/2). The crypto provider is
//! aws-lc-rs with the hybrid post-quantum key exchange X25519MLKEM768 offered first; classic
//! groups (X25519, P-256, P-384) are still accepted, so a peer without ML-KEM still connects.
//! Built with the `fips` feature, aws-lc-rs is its FIPS 140-3 module and rustls offers only
//! approved algorithms (X25519MLKEM768, P-256, P-384: no X25519 alone, no ChaCha20).
//!
//! Certificates carry no DNS names: a server is checked for the SPIFFE ID the client expects
//! (the node proxies' identity), a client's SPIFFE ID is read after the handshake and handed to
//! the destination's handling as the caller's identity.

use std::{
    collections::HashSet,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use thiserror::Error;
use tokio::sync::watch;

use crate::identity::Identity;

pub mod origination;

/// The serial numbers the mesh CA revoked (without leading zero bytes), as the node last
/// fetched them: consulted at every handshake, both ways, and by open connections.
pub type Revoked = watch::Receiver<Arc<HashSet<Vec<u8>>>>;

/// HBONE's ALPN: HTTP/2 over TLS, as Istio's ztunnel offers it.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate carries no SPIFFE ID (URI SAN spiffe://...)")]
    NoIdentity,
    #[error("certificate carries {0} SPIFFE IDs; a workload certificate has exactly one")]
    SeveralIdentities(usize),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("the trust bundle holds no usable root: {0}")]
    NoRoots(String),
    #[error("building the TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider of every mesh TLS connection: aws-lc-rs, post-quantum hybrid first (its
/// FIPS module, approved algorithms only, when built with the `fips` feature).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Makes aws-lc-rs rustls' process-wide provider, for libraries that build their own TLS
/// configuration (tonic, kube's client) when more than one provider is compiled in. Calling it
/// again, or after another part of the process did, is harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The roots every peer certificate must chain to. Several during a root rotation.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    ders: Arc<[CertificateDer<'static>]>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.ders.len())
            .finish()
    }
}

impl TrustBundle {
    pub fn from_der(ders: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for der in &ders {
            roots
                .add(der.clone())
                .map_err(|e| TlsError::NoRoots(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots("empty".into()));
        }
        Ok(Self {
            roots: Arc::new(roots),
            ders: ders.into(),
        })
    }

    pub fn from_pem(pems: &[impl AsRef<str>]) -> Result<Self, TlsError> {
        let mut ders = Vec::new();
        for pem in pems {
            ders.extend(certs_from_pem(pem.as_ref())?);
        }
        Self::from_der(ders)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }

    /// Whether both bundles hold the same roots.
    pub fn same_as(&self, other: &TrustBundle) -> bool {
        self.ders == other.ders
    }
}

/// A workload certificate with its key: what a node proxy presents for one identity.
pub struct Credential {
    pub identity: Identity,
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub bundle: TrustBundle,
}

// Never print the key.
impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// A credential from a CA's answer: the chain as Istio's certificate API returns it (the
    /// leaf first; the last entry is the root bundle, which may hold several roots during a
    /// root rotation) and the key the CSR was made with. The leaf must carry `identity`, chain
    /// to the bundle and be valid now.
    pub fn from_chain(
        identity: Identity,
        chain_pem: &[String],
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let Some((bundle_pem, certs_pem)) = chain_pem.split_last() else {
            return Err(TlsError::BadCertificate(
                "the CA answered no certificate".into(),
            ));
        };
        let mut chain = Vec::new();
        for pem in certs_pem {
            chain.extend(certs_from_pem(pem)?);
        }
        let bundle = TrustBundle::from_der(certs_from_pem(bundle_pem)?)?;
        let leaf = chain.first().ok_or_else(|| {
            TlsError::BadCertificate("the CA answered without a certificate before the root".into())
        })?;
        let found = identity_of(leaf)?;
        if found != identity {
            return Err(TlsError::BadCertificate(format!(
                "the CA issued {found}, not the requested {identity}"
            )));
        }
        let parsed = ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &bundle.roots,
            &chain[1..],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| {
            TlsError::BadCertificate(format!(
                "the issued certificate does not chain to the CA's root bundle, or is not valid now: {e}"
            ))
        })?;
        let (not_before, not_after) = validity(leaf)?;
        Ok(Self {
            identity,
            chain,
            key,
            not_before,
            not_after,
            bundle,
        })
    }

    /// When the certificate, received at `received`, should be replaced: half way through the
    /// life it had left then, as Istio does. (Its `not_before` is back-dated for clock skew, so
    /// it does not count.)
    pub fn renew_at(&self, received: SystemTime) -> SystemTime {
        let left = self.not_after.duration_since(received).unwrap_or_default();
        received + left / 2
    }

    /// A client configuration presenting this credential and accepting only a server that
    /// proves `server` (a node proxy's identity) under this credential's trust bundle, with a
    /// certificate not `revoked`.
    pub fn client_config(
        &self,
        server: Option<Identity>,
        revoked: Revoked,
    ) -> Result<ClientConfig, TlsError> {
        let provider = provider();
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.bundle.roots.clone(),
            expected: server,
            algorithms: provider.signature_verification_algorithms,
            revoked,
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Connections are pooled and long-lived; resumption would only save a handshake per
        // pool connection and keep session secrets around.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    /// A server configuration presenting this credential and requiring a client certificate
    /// under the trust bundle, not `revoked`.
    pub fn server_config(&self, revoked: Revoked) -> Result<ServerConfig, TlsError> {
        let provider = provider();
        let verifier = Arc::new(RevocationChecking {
            inner: WebPkiClientVerifier::builder_with_provider(
                self.bundle.roots.clone(),
                provider.clone(),
            )
            .build()?,
            revoked,
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }
}

/// A peer that proved its identity in an mTLS handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub identity: Identity,
    /// SHA-256 of its certificate (DER), as Envoy's `x-forwarded-client-cert` `Hash`.
    pub certificate_sha256: [u8; 32],
}

impl Authenticated {
    /// The identity and fingerprint of a peer's leaf certificate.
    pub fn of(leaf: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let identity = identity_of(leaf)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
        let mut certificate_sha256 = [0u8; 32];
        certificate_sha256.copy_from_slice(digest.as_ref());
        Ok(Self {
            identity,
            certificate_sha256,
        })
    }

    /// The `x-forwarded-client-cert` value Envoy sets for this peer on a request to a
    /// workload whose own identity is `by`.
    pub fn forwarded_client_cert(&self, by: &Identity) -> String {
        let hash = crate::ca::authority::hex(&self.certificate_sha256);
        format!("By={by};Hash={hash};Subject=\"\";URI={}", self.identity)
    }
}

/// The SPIFFE ID of a certificate: its one `spiffe://` URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(*uri)
            }
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(TlsError::NoIdentity),
        [uri] => Ok(uri.parse()?),
        more => Err(TlsError::SeveralIdentities(more.len())),
    }
}

fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        UNIX_EPOCH + Duration::from_secs(secs)
    };
    Ok((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

/// Every certificate of a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))
}

/// The private key of a PEM text.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

/// The serial number of a certificate, without leading zero bytes.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(crate::ca::authority::trim_serial(parsed.raw_serial()).to_vec())
}

/// The serials revoked by `crls` (DER) whose signature verifies with one of `issuers`; a list
/// no issuer signed is skipped and described in the second part.
pub fn revoked_serials(
    crls: &[Vec<u8>],
    issuers: &[CertificateDer<'_>],
) -> (HashSet<Vec<u8>>, Vec<String>) {
    let mut revoked = HashSet::new();
    let mut errors = Vec::new();
    let issuers: Vec<_> = issuers
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, c)| c))
        .collect();
    for der in crls {
        let crl = match x509_parser::parse_x509_crl(der) {
            Ok((_, crl)) => crl,
            Err(e) => {
                errors.push(format!("a revocation list does not parse: {e}"));
                continue;
            }
        };
        let signed = issuers.iter().any(|issuer| {
            issuer.subject() == crl.issuer() && crl.verify_signature(issuer.public_key()).is_ok()
        });
        if !signed {
            errors.push(format!(
                "the revocation list of {} is not signed by a CA this node trusts",
                crl.issuer()
            ));
            continue;
        }
        for entry in crl.iter_revoked_certificates() {
            revoked.insert(crate::ca::authority::trim_serial(entry.raw_serial()).to_vec());
        }
    }
    (revoked, errors)
}

fn refuse_revoked(revoked: &Revoked, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let serial = serial_of(cert).map_err(|e| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    })?;
    if revoked.borrow().contains(&serial) {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked,
        ));
    }
    Ok(())
}

/// The WebPKI client verifier, then the mesh CA's revocations.
#[derive(Debug)]
struct RevocationChecking {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revoked,
}

impl ClientCertVerifier for RevocationChecking {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        refuse_revoked(&self.revoked, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a server's chain against the trust bundle, its revocation, and its SPIFFE ID
/// against the one expected. Server names (DNS, IP) play no part: mesh certificates carry only
/// SPIFFE IDs.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    /// `None`: any SPIFFE ID under the roots.
    expected: Option<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
    revoked: Revoked,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        refuse_revoked(&self.revoked, end_entity)?;
        let found = identity_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if let Some(expected) = self.expected.as_ref().filter(|e| **e != found) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(IdentityMismatch {
                    expected: expected.clone(),
                    found,
                }))),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration allows TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug, Error)]
#[error("peer presented {found}, expected {expected}")]
pub struct IdentityMismatch {
    pub expected: Identity,
    pub found: Identity,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::NamedGroup;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::identity::manager::testing::TestCa;

    /// Two node proxies' configurations, as the certificate manager builds them.
    async fn pair() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let ca = TestCa::new();
        let certs = ca.certs();
        let caller = Identity::new("cluster.local", "bookinfo", "productpage");
        certs.retain([caller.clone()].into());
        let client = certs.issued(&caller).await.unwrap().client.clone();
        let server = certs.issued(&ca.node).await.unwrap().server.clone();
        (client, server)
    }

    #[tokio::test]
    async fn node_proxies_agree_on_tls13_with_post_quantum_key_exchange() {
        let (client, server) = pair().await;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(b)
                .await
                .unwrap();
            let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
            identity_of(&peer).unwrap()
        });
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, a)
            .await
            .unwrap();
        tls.write_all(b"x").await.unwrap();
        let (_, conn) = tls.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::X25519MLKEM768),
            "the hybrid post-quantum group is preferred"
        );
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            accept.await.unwrap().to_string(),
            "spiffe://cluster.local/ns/bookinfo/sa/productpage",
            "the server knows the caller by its certificate"
        );
    }

    #[test]
    fn the_provider_is_the_fips_module_exactly_when_built_so() {
        assert_eq!(provider().fips(), cfg!(feature = "fips"));
    }

    #[tokio::test]
    async fn classic_key_exchange_is_still_accepted() {
        let (_, server) = pair().await;
        // A client offering only a classic group, like one without ML-KEM (X25519 alone is
        // not a FIPS-approved group: P-256 then).
        let (group, group_name) = if cfg!(feature = "fips") {
            (
                rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
                NamedGroup::secp256r1,
            )
        } else {
            (
                rustls::crypto::aws_lc_rs::kx_group::X25519,
                NamedGroup::X25519,
            )
        };
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![group];
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            // No client certificate: refused, but only after the key exchange succeeded.
            tokio_rustls::TlsAcceptor::from(server).accept(b).await
        });
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let connected = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, a)
            .await;
        // In TLS 1.3 the client is done once the key exchange worked; the server then wants
        // the client certificate this client does not have.
        let connected = connected.expect("the server agreed to a classic group");
        assert_eq!(
            connected
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name()),
            Some(group_name)
        );
        let refused = accept.await.unwrap().unwrap_err().to_string();
        assert!(refused.contains("certificate"), "{refused}");
    }

    /// Accepts any server: only for seeing which key exchange a server agrees to.
    #[derive(Debug)]
    struct AcceptAnything;

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}
