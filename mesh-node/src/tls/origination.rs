//! TLS the source proxy originates to a destination (DestinationRule `tls` `SIMPLE` or
//! `MUTUAL`), as an Istio sidecar does for a ServiceEntry host or a Service:
//!
//! - SNI: `sni` when set, else the destination's host (the ServiceEntry host, or the
//!   Service's `name.namespace.svc.cluster.local`) — Istio's automatic SNI for the host.
//! - The server is verified against `caCertificates` (a PEM file on the node), else the
//!   system's roots; revocation lists from `caCrl` are honoured. With `credentialName`, the
//!   CA, revocation lists and client certificate come from that Secret in the client's
//!   namespace instead (a CA may also be in a Secret named `<credentialName>-cacert`, as in
//!   Istio), and a CA is required: Istio verifies such a server only against the Secret's CA. Its name is checked against
//!   `subjectAltNames` (DNS or URI SANs, any one matching) when set, else against the SNI, as
//!   Istio's automatic SAN validation does. `insecureSkipVerify: true` skips both checks (the
//!   handshake's signature still has to verify).
//! - `MUTUAL` presents `clientCertificate` with `privateKey` (or the Secret's certificate and
//!   key).
//! - ALPN: `http/1.1` or `h2` for HTTP connections (what the pool speaks), none for TCP.
//!
//! Files and Secrets are read when the cluster is built (a configuration change), never per
//! connection; a changed Secret makes new clusters whose connections are pooled apart. The
//! system's roots are read once, at their first use.
//! Unlike HBONE (TLS 1.3 only), TLS 1.2 is offered too: external servers still speak it.

use std::{fmt, hash::Hash, path::Path, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::{certs_from_pem, key_from_pem, provider};
use crate::model::{
    traffic::{ClientTls, TlsMode},
    Map, ObjectKey, TlsSecret,
};

/// The application protocol a connection carries, for ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    None,
    Http1,
    Http2,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OriginationError {
    #[error("cannot read {field} {path}: {reason}")]
    File {
        field: &'static str,
        path: Arc<str>,
        reason: String,
    },
    #[error("{field} {path} is outside {dir}, the only directory TLS origination files are read from (--tls-origination-dir)")]
    OutsideDir {
        field: &'static str,
        path: Arc<str>,
        dir: String,
    },
    #[error("credentialName: Secret {0} does not exist or holds no PEM certificate, key or CA under Istio's keys (tls.crt, tls.key, ca.crt, ca.crl or cert, key, cacert, crl)")]
    NoSecret(ObjectKey),
    #[error("credentialName: Secret {secret} has no {what}")]
    SecretLacks {
        secret: ObjectKey,
        what: &'static str,
    },
    #[error("sni {0:?} is not a valid server name")]
    ServerName(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where the certificates, key and CAs of a rule's TLS come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Material {
    /// The files the settings name, on the node.
    Files,
    /// The Secret `credentialName` names, and the CA-only `<name>-cacert` Secret if any.
    Secret {
        secret: Arc<TlsSecret>,
        ca: Option<Arc<TlsSecret>>,
    },
}

impl Material {
    /// The material of `settings` for clients of `namespace`: its Secret, looked up only in
    /// the client's namespace (Istio: the namespace of the proxy using it), so no rule can make
    /// one tenant's traffic carry another's certificate; or its files.
    pub fn of(
        settings: &ClientTls,
        namespace: Option<&str>,
        secrets: &Map<ObjectKey, Arc<TlsSecret>>,
    ) -> Result<Self, OriginationError> {
        let Some(name) = &settings.credential_name else {
            return Ok(Material::Files);
        };
        let Some(namespace) = namespace else {
            return Err(OriginationError::Config(
                "credentialName: the client is no pod of the mesh, so it has no namespace to read the Secret from".into(),
            ));
        };
        let key = ObjectKey::new(namespace, name);
        let secret = secrets
            .get(&key)
            .cloned()
            .ok_or(OriginationError::NoSecret(key))?;
        let ca = secrets
            .get(&ObjectKey::new(namespace, &format!("{name}-cacert")))
            .cloned();
        Ok(Material::Secret { secret, ca })
    }

    /// The PEM text of one part, and where it came from (for errors).
    fn pem(
        &self,
        settings: &ClientTls,
        part: Part,
    ) -> Result<Option<(String, Source)>, OriginationError> {
        match self {
            Material::Files => {
                let (field, path) = match part {
                    Part::Cert => ("clientCertificate", &settings.client_certificate),
                    Part::Key => ("privateKey", &settings.private_key),
                    Part::Ca => ("caCertificates", &settings.ca_certificates),
                    Part::Crl => ("caCrl", &settings.ca_crl),
                };
                let Some(path) = path else { return Ok(None) };
                let text = read(field, path)?;
                Ok(Some((
                    text,
                    Source {
                        field,
                        origin: path.clone(),
                    },
                )))
            }
            Material::Secret { secret, ca } => {
                let of = |s: &TlsSecret| match part {
                    Part::Cert => s.cert.clone(),
                    Part::Key => s.private_key.clone(),
                    Part::Ca => s.ca.clone(),
                    Part::Crl => s.crl.clone(),
                };
                let found = of(secret).map(|pem| (pem, &secret.key)).or_else(|| {
                    let ca = ca
                        .as_ref()
                        .filter(|_| matches!(part, Part::Ca | Part::Crl))?;
                    of(ca).map(|pem| (pem, &ca.key))
                });
                Ok(found.map(|(pem, key)| {
                    (
                        pem.to_string(),
                        Source {
                            field: "credentialName",
                            origin: format!("Secret {key}").into(),
                        },
                    )
                }))
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Part {
    Cert,
    Key,
    Ca,
    Crl,
}

/// Where a piece of PEM was read from.
struct Source {
    field: &'static str,
    origin: Arc<str>,
}

impl Source {
    fn error(&self, e: impl fmt::Display) -> OriginationError {
        OriginationError::File {
            field: self.field,
            path: self.origin.clone(),
            reason: e.to_string(),
        }
    }
}

/// The TLS a cluster originates: one client configuration per ALPN, and the server name.
pub struct Origination {
    settings: ClientTls,
    material: Material,
    server_name: ServerName<'static>,
    configs: [Arc<ClientConfig>; 3],
}

impl fmt::Debug for Origination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origination")
            .field("mode", &self.settings.mode)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Two originations are the same when built from the same settings for the same server: a
/// pooled connection of one serves the other.
impl PartialEq for Origination {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
            && self.material == other.material
            && self.server_name == other.server_name
    }
}

impl Eq for Origination {}

impl Hash for Origination {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.settings.hash(state);
        self.material.hash(state);
        self.server_name.to_str().hash(state);
    }
}

impl Origination {
    /// Builds the TLS `settings` ask for towards `host` (the destination's hostname), from
    /// `material`. `None` for a mode that originates nothing (`DISABLE`, `ISTIO_MUTUAL`).
    pub fn new(
        settings: &ClientTls,
        host: &str,
        material: Material,
    ) -> Result<Option<Self>, OriginationError> {
        if !matches!(settings.mode, TlsMode::Simple | TlsMode::Mutual) {
            return Ok(None);
        }
        let sni = settings.sni.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(sni.to_string())
            .map_err(|_| OriginationError::ServerName(sni.into()))?;
        let verifier = verifier(settings, &material)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| OriginationError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let base = match settings.mode {
            TlsMode::Mutual => {
                let chain = material.pem(settings, Part::Cert)?;
                let key = material.pem(settings, Part::Key)?;
                let (Some((chain, chain_source)), Some((key, key_source))) = (chain, key) else {
                    return Err(match &material {
                        Material::Secret { secret, .. } => OriginationError::SecretLacks {
                            secret: secret.key.clone(),
                            what: "client certificate and key (tls.crt and tls.key, or cert and key) for MUTUAL",
                        },
                        Material::Files => OriginationError::Config(
                            "MUTUAL needs clientCertificate and privateKey".into(),
                        ),
                    });
                };
                let chain = certs_from_pem(&chain).map_err(|e| chain_source.error(e))?;
                let key = key_from_pem(&key).map_err(|e| key_source.error(e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| key_source.error(e))?
            }
            _ => builder.with_no_client_auth(),
        };
        let with = |alpn: &[&[u8]]| {
            let mut config = base.clone();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        };
        Ok(Some(Self {
            settings: settings.clone(),
            material,
            server_name,
            configs: [with(&[]), with(&[b"http/1.1"]), with(&[b"h2"])],
        }))
    }

    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// Runs the handshake over `io`.
    pub async fn connect<IO>(&self, io: IO, alpn: Alpn) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = match alpn {
            Alpn::None => &self.configs[0],
            Alpn::Http1 => &self.configs[1],
            Alpn::Http2 => &self.configs[2],
        };
        TlsConnector::from(config.clone())
            .connect(self.server_name.clone(), io)
            .await
    }
}

/// Refuses settings naming a file outside `dir` (after symbolic links are followed). A file
/// that does not exist is left for [`Origination::new`] to report.
pub fn check_files(settings: &ClientTls, dir: &Path) -> Result<(), OriginationError> {
    let allowed = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let files = [
        ("caCertificates", &settings.ca_certificates),
        ("clientCertificate", &settings.client_certificate),
        ("privateKey", &settings.private_key),
        ("caCrl", &settings.ca_crl),
    ];
    for (field, path) in files {
        let Some(path) = path else { continue };
        let resolved = Path::new(&**path).canonicalize();
        let inside = match &resolved {
            Ok(resolved) => resolved.starts_with(&allowed),
            // Not there (yet): judged by its name, `..` refused outright.
            Err(_) => {
                let p = Path::new(&**path);
                p.is_absolute()
                    && p.starts_with(dir)
                    && !p
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
            }
        };
        if !inside {
            return Err(OriginationError::OutsideDir {
                field,
                path: path.clone(),
                dir: dir.display().to_string(),
            });
        }
    }
    Ok(())
}

fn read(field: &'static str, path: &Arc<str>) -> Result<String, OriginationError> {
    std::fs::read_to_string(Path::new(&**path)).map_err(|e| OriginationError::File {
        field,
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// The system's CA certificates, read once: every cluster without `caCertificates` uses them.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

fn verifier(
    settings: &ClientTls,
    material: &Material,
) -> Result<Arc<dyn ServerCertVerifier>, OriginationError> {
    let algorithms = provider().signature_verification_algorithms;
    if settings.insecure_skip_verify {
        return Ok(Arc::new(SkipVerify { algorithms }));
    }
    let mut roots = RootCertStore::empty();
    match (material.pem(settings, Part::Ca)?, material) {
        (Some((pem, source)), _) => {
            let certs = certs_from_pem(&pem).map_err(|e| source.error(e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(source.error("no usable CA certificate"));
            }
        }
        (None, Material::Secret { secret, .. }) => {
            return Err(OriginationError::SecretLacks {
                secret: secret.key.clone(),
                what: "CA certificate (ca.crt or cacert, here or in a Secret named <credentialName>-cacert) to verify the server with",
            });
        }
        (None, Material::Files) => {
            roots.add_parsable_certificates(system_roots().iter().cloned());
            if roots.is_empty() {
                return Err(OriginationError::Config(
                    "the system has no CA certificates to verify the server with; set caCertificates".into(),
                ));
            }
        }
    }
    let mut builder = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider());
    if let Some((text, source)) = material.pem(settings, Part::Crl)? {
        use rustls::pki_types::pem::PemObject as _;
        let crls = CertificateRevocationListDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| source.error(e))?;
        builder = builder.with_crls(crls);
    }
    let inner = builder
        .build()
        .map_err(|e| OriginationError::Config(e.to_string()))?;
    Ok(Arc::new(SanVerifier {
        inner,
        subject_alt_names: settings.subject_alt_names.clone(),
    }))
}

/// The chain checked by webpki; the name against `subjectAltNames` when set, else the SNI.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    subject_alt_names: Arc<[Arc<str>]>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if self.subject_alt_names.is_empty() {
            return checked;
        }
        // webpki checks the name last: a name mismatch means the chain itself is good.
        match checked {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let presented = subject_alt_names(end_entity);
        if self
            .subject_alt_names
            .iter()
            .any(|wanted| presented.iter().any(|p| san_matches(p, wanted)))
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(SanMismatch {
                    expected: self
                        .subject_alt_names
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    presented,
                }))),
            ))
        }
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

#[derive(Debug, Error)]
#[error("server certificate names {presented:?}, none of subjectAltNames {expected:?}")]
pub struct SanMismatch {
    pub expected: Vec<String>,
    pub presented: Vec<String>,
}

/// The DNS and URI names of a certificate.
fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// A presented name against a wanted one: exact (DNS names case-insensitively), or a
/// presented DNS wildcard `*.example.com` covering one label.
fn san_matches(presented: &str, wanted: &str) -> bool {
    if presented.eq_ignore_ascii_case(wanted) {
        return true;
    }
    match (presented.strip_prefix("*."), wanted.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && rest.eq_ignore_ascii_case(suffix)
        }
        _ => false,
    }
}

/// `insecureSkipVerify`: any certificate, any name; only the handshake signature is checked.
#[derive(Debug)]
struct SkipVerify {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SkipVerify {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
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

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType,
        PKCS_ECDSA_P256_SHA256,
    };
    use rustls::{server::WebPkiClientVerifier, ServerConfig};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
        ca: CertifiedIssuer<'static, KeyPair>,
    }

    impl Pki {
        fn new() -> Self {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(
                rcgen::DnType::CommonName,
                format!("test CA {}", fastrand::u64(..)),
            );
            let ca = CertifiedIssuer::self_signed(
                params,
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            )
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            Self { dir, ca }
        }

        fn path(&self, name: &str) -> Arc<str> {
            self.dir.path().join(name).to_string_lossy().into()
        }

        /// A leaf for `names` (DNS, or URI when it has a scheme): (chain, key) DER.
        fn leaf(
            &self,
            names: &[&str],
        ) -> (
            Vec<CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
            String,
            String,
        ) {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = names
                .iter()
                .map(|n| match n.contains("://") {
                    true => SanType::URI((*n).try_into().unwrap()),
                    false => SanType::DnsName((*n).try_into().unwrap()),
                })
                .collect();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let key_pem = key.serialize_pem();
            (
                vec![cert.der().clone()],
                key_from_pem(&key_pem).unwrap(),
                cert.pem(),
                key_pem,
            )
        }
    }

    /// A TLS server that answers each connection with what it saw: `sni alpn client-cert?`.
    async fn server(pki: &Pki, names: &[&str], want_client: bool) -> SocketAddr {
        let (chain, key, _, _) = pki.leaf(names);
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if want_client {
            let mut roots = RootCertStore::empty();
            roots.add(pki.ca.der().clone()).unwrap();
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .unwrap(),
            )
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (_, conn) = tls.get_ref();
                    let seen = format!(
                        "{} {} {}",
                        conn.server_name().unwrap_or("-"),
                        conn.alpn_protocol()
                            .map_or("-".into(), |a| String::from_utf8_lossy(a).into_owned()),
                        conn.peer_certificates().map_or(0, |c| c.len()),
                    );
                    let _ = tls.write_all(seen.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    fn settings(pki: &Pki, mode: TlsMode) -> ClientTls {
        ClientTls {
            mode,
            sni: None,
            subject_alt_names: Arc::new([]),
            credential_name: None,
            client_certificate: None,
            private_key: None,
            ca_certificates: Some(pki.path("ca.pem")),
            ca_crl: None,
            insecure_skip_verify: false,
        }
    }

    async fn talk(
        origination: &Origination,
        addr: SocketAddr,
        alpn: Alpn,
    ) -> std::io::Result<String> {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = origination.connect(tcp, alpn).await?;
        let mut seen = String::new();
        tls.read_to_string(&mut seen).await?;
        Ok(seen)
    }

    #[tokio::test]
    async fn simple_sends_the_host_as_sni_and_verifies_the_server_against_the_ca() {
        let pki = Pki::new();
        let addr = server(&pki, &["api.example.test"], false).await;
        let tls = Origination::new(
            &settings(&pki, TlsMode::Simple),
            "api.example.test",
            Material::Files,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            talk(&tls, addr, Alpn::Http1).await.unwrap(),
            "api.example.test http/1.1 0"
        );
        assert_eq!(
            talk(&tls, addr, Alpn::None).await.unwrap(),
            "api.example.test - 0"
        );

        // `sni` replaces the host; the certificate must then be valid for it.
        let mut other = settings(&pki, TlsMode::Simple);
        other.sni = Some("other.example.test".into());
        let tls = Origination::new(&other, "api.example.test", Material::Files)
            .unwrap()
            .unwrap();
        let err = talk(&tls, addr, Alpn::Http2).await.unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");
    }

    #[tokio::test]
    async fn subject_alt_names_replace_the_name_check_and_a_wrong_one_fails() {
        let pki = Pki::new();
        let addr = server(
            &pki,
            &["*.example.test", "spiffe://example.test/ns/a/sa/b"],
            false,
        )
        .await;
        let mut wanted = settings(&pki, TlsMode::Simple);
        wanted.sni = Some("sni-only.invalid".into());
        for (sans, ok) in [
            (vec!["spiffe://example.test/ns/a/sa/b"], true),
            (vec!["nope.example.org", "db.example.test"], true),
            (vec!["db.other.test"], false),
            (vec!["a.b.example.test"], false),
        ] {
            wanted.subject_alt_names = sans.iter().map(|s| Arc::from(*s)).collect();
            let tls = Origination::new(&wanted, "api.example.test", Material::Files)
                .unwrap()
                .unwrap();
            let result = talk(&tls, addr, Alpn::Http1).await;
            assert_eq!(result.is_ok(), ok, "{sans:?}: {result:?}");
            if let Err(e) = result {
                assert!(e.to_string().contains("SanMismatch"), "{e}");
            }
        }
    }

    #[tokio::test]
    async fn an_unknown_ca_fails_unless_verification_is_skipped() {
        let pki = Pki::new();
        let stranger = Pki::new();
        let addr = server(&stranger, &["api.example.test"], false).await;
        let tls = Origination::new(
            &settings(&pki, TlsMode::Simple),
            "api.example.test",
            Material::Files,
        )
        .unwrap()
        .unwrap();
        let err = talk(&tls, addr, Alpn::Http1).await.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        let mut skip = settings(&pki, TlsMode::Simple);
        skip.insecure_skip_verify = true;
        let tls = Origination::new(&skip, "api.example.test", Material::Files)
            .unwrap()
            .unwrap();
        assert!(talk(&tls, addr, Alpn::Http1).await.is_ok());
    }

    #[tokio::test]
    async fn mutual_presents_the_client_certificate() {
        let pki = Pki::new();
        let addr = server(&pki, &["db.example.test"], true).await;
        let (_, _, cert_pem, key_pem) = pki.leaf(&["client.example.test"]);
        std::fs::write(pki.dir.path().join("client.pem"), cert_pem).unwrap();
        std::fs::write(pki.dir.path().join("client.key"), key_pem).unwrap();
        let mut mutual = settings(&pki, TlsMode::Mutual);
        mutual.client_certificate = Some(pki.path("client.pem"));
        mutual.private_key = Some(pki.path("client.key"));
        let tls = Origination::new(&mutual, "db.example.test", Material::Files)
            .unwrap()
            .unwrap();
        assert_eq!(
            talk(&tls, addr, Alpn::None).await.unwrap(),
            "db.example.test - 1"
        );

        // Without it the server refuses the handshake.
        let simple = Origination::new(
            &settings(&pki, TlsMode::Simple),
            "db.example.test",
            Material::Files,
        )
        .unwrap()
        .unwrap();
        assert!(talk(&simple, addr, Alpn::None).await.is_err());
    }

    fn secrets(list: &[TlsSecret]) -> Map<ObjectKey, Arc<TlsSecret>> {
        list.iter()
            .map(|s| (s.key.clone(), Arc::new(s.clone())))
            .collect()
    }

    fn secret(name: &str) -> TlsSecret {
        TlsSecret {
            key: ObjectKey::new("shop", name),
            cert: None,
            private_key: None,
            ca: None,
            crl: None,
        }
    }

    #[tokio::test]
    async fn credential_name_reads_the_secret_of_the_clients_namespace() {
        let pki = Pki::new();
        let addr = server(&pki, &["db.example.test"], true).await;
        let (_, _, cert_pem, key_pem) = pki.leaf(&["client.example.test"]);
        let mut mutual = settings(&pki, TlsMode::Mutual);
        mutual.ca_certificates = None;
        mutual.credential_name = Some("db-client".into());
        let full = TlsSecret {
            cert: Some(cert_pem.clone().into()),
            private_key: Some(key_pem.clone().into()),
            ca: Some(pki.ca.pem().into()),
            ..secret("db-client")
        };
        let in_force = secrets(std::slice::from_ref(&full));
        let material = Material::of(&mutual, Some("shop"), &in_force).unwrap();
        let tls = Origination::new(&mutual, "db.example.test", material)
            .unwrap()
            .unwrap();
        assert_eq!(
            talk(&tls, addr, Alpn::None).await.unwrap(),
            "db.example.test - 1"
        );

        // A client of another namespace finds nothing in its own, whatever rule applies.
        let err = Material::of(&mutual, Some("other"), &in_force).unwrap_err();
        assert_eq!(
            err,
            OriginationError::NoSecret(ObjectKey::new("other", "db-client"))
        );
        assert!(err
            .to_string()
            .contains("Secret other/db-client does not exist"));

        // The CA may come from `<name>-cacert`; a changed Secret is another origination.
        let split = secrets(&[
            TlsSecret {
                ca: None,
                ..full.clone()
            },
            TlsSecret {
                ca: Some(pki.ca.pem().into()),
                ..secret("db-client-cacert")
            },
        ]);
        let material = Material::of(&mutual, Some("shop"), &split).unwrap();
        let rotated = Origination::new(&mutual, "db.example.test", material)
            .unwrap()
            .unwrap();
        assert_ne!(rotated, tls);
        assert_eq!(
            talk(&rotated, addr, Alpn::None).await.unwrap(),
            "db.example.test - 1"
        );

        // A Secret without a CA, or MUTUAL without a key, is refused by name; the key
        // never appears in what is printed.
        for (lacking, what) in [
            (
                TlsSecret {
                    ca: None,
                    ..full.clone()
                },
                "no CA certificate",
            ),
            (
                TlsSecret {
                    private_key: None,
                    ..full.clone()
                },
                "no client certificate and key",
            ),
        ] {
            let material = Material::of(&mutual, Some("shop"), &secrets(&[lacking])).unwrap();
            let err = Origination::new(&mutual, "db.example.test", material).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("credentialName: Secret shop/db-client has {what}")),
                "{err}"
            );
        }
        let printed = format!(
            "{full:?} {:?}",
            Material::of(&mutual, Some("shop"), &in_force)
        );
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");

        // A key that is not one: the Secret is named.
        let broken = TlsSecret {
            private_key: Some(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
            ),
            ..full
        };
        let material = Material::of(&mutual, Some("shop"), &secrets(&[broken])).unwrap();
        let err = Origination::new(&mutual, "db.example.test", material).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read credentialName Secret shop/db-client"),
            "{err}"
        );
    }

    #[test]
    fn files_are_read_only_from_the_origination_directory() {
        let pki = Pki::new();
        let dir = pki.dir.path();
        let ok = settings(&pki, TlsMode::Simple);
        assert_eq!(check_files(&ok, dir), Ok(()));
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("key.pem"), "secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("key.pem"), dir.join("link.pem")).unwrap();
        let escape = |path: String| {
            let mut s = settings(&pki, TlsMode::Mutual);
            s.client_certificate = Some(pki.path("ca.pem"));
            s.private_key = Some(path.into());
            check_files(&s, dir)
        };
        for path in [
            "/etc/shadow".to_string(),
            outside.path().join("key.pem").display().to_string(),
            dir.join("link.pem").display().to_string(),
            dir.join("../escape/key.pem").display().to_string(),
            "relative.pem".to_string(),
        ] {
            let err = escape(path.clone()).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("privateKey {path} is outside")),
                "{err}"
            );
        }
        assert_eq!(
            escape(dir.join("not-yet.pem").display().to_string()),
            Ok(())
        );
    }

    #[test]
    fn unreadable_files_and_modes_without_origination() {
        let pki = Pki::new();
        let mut missing = settings(&pki, TlsMode::Simple);
        missing.ca_certificates = Some(
            PathBuf::from("/nonexistent/ca.pem")
                .to_string_lossy()
                .into(),
        );
        let err = Origination::new(&missing, "api.example.test", Material::Files).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read caCertificates /nonexistent/ca.pem"),
            "{err}"
        );
        for mode in [TlsMode::Disable, TlsMode::IstioMutual] {
            assert!(
                Origination::new(&settings(&pki, mode), "x.test", Material::Files)
                    .unwrap()
                    .is_none()
            );
        }
    }
}
