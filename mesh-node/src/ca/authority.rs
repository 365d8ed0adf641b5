//! The mesh CA's signing key and certificates, and what it signs with them.
//!
//! The signing CA comes from Istio's `cacerts` directory shape (a mounted Secret: `ca-cert.pem`,
//! `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`), so a mesh already using a plugged-in Istio
//! CA keeps its roots; or, in local mode, from a state directory where the first start writes a
//! self-signed root that later starts load again (a restarted CA must not invalidate every
//! certificate of the mesh). The trust bundle is a list of roots, so that root rotation can
//! add a second root while certificates of the first are still in use.
//!
//! A workload certificate is issued only for a CSR whose self-signature verifies (the caller
//! holds the key it asks a certificate for) and whose only name is the SPIFFE ID asked for:
//! nothing the caller writes into the CSR besides its public key reaches the certificate.

use std::{
    fs,
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, CertificateSigningRequestDer};
use thiserror::Error;
use x509_parser::{
    certificate::X509Certificate, certification_request::X509CertificationRequest,
    extensions::ParsedExtension, prelude::FromDer as _, time::ASN1Time,
};

use crate::identity::Identity;

/// Files of Istio's `cacerts` shape (and of the local state directory).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Longest workload certificate lifetime unless configured otherwise (Istio's
/// `MAX_WORKLOAD_CERT_TTL`).
pub const MAX_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of a generated root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this much in the past, so a peer whose clock is a little behind accepts
/// them at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Lifetime of the CA's own serving certificate (issued again at each start).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long a revocation list is valid; the CA publishes a new one well before.
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The shortest life a certificate is issued with.
pub const MIN_ISSUED_LIFE: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum AuthorityError {
    #[error("cannot read {path}: {source} ({hint})")]
    Read {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot write {path}: {source} (is the state directory writable?)")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{dir} holds {present} but not {missing}: restore {missing}, or empty the directory to start a new root (every node must then trust it)")]
    Incomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("cannot create a certificate: {0}")]
    Generate(rcgen::Error),
    #[error("no random numbers from the system: {0}")]
    Random(String),
    #[error("the certificate signing request is not a PEM `CERTIFICATE REQUEST`: {0}")]
    CsrPem(String),
    #[error("the certificate signing request does not parse: {0}")]
    CsrParse(String),
    #[error("the signature of the certificate signing request does not verify ({0}): it must be signed with the key it carries")]
    CsrSignature(String),
    #[error("the certificate signing request must name exactly {expected} (one URI subject alternative name); it names {found}")]
    CsrNames { expected: String, found: String },
    #[error("the public key of the certificate signing request cannot be used: {0} (use ECDSA P-256/P-384, Ed25519 or RSA)")]
    CsrKey(String),
    #[error("the signing CA certificate expires in {left_secs}s, too soon to issue anything useful: rotate the signing CA (cacerts)")]
    SigningExpired { left_secs: i64 },
}

impl AuthorityError {
    /// Whether the request was at fault (a bad CSR), not the CA.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            Self::CsrPem(_)
                | Self::CsrParse(_)
                | Self::CsrSignature(_)
                | Self::CsrNames { .. }
                | Self::CsrKey(_)
        )
    }
}

/// A certificate issued by [`Authority::sign`].
#[derive(Clone, Debug)]
pub struct Issued {
    /// PEMs: the leaf, the signing CA when it is an intermediate, ..., the root last.
    pub chain: Vec<String>,
    /// Serial number, hex.
    pub serial: String,
    pub not_after: SystemTime,
}

/// The signing CA: its key, its certificate and those above it, and the trust bundle.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then each certificate above it, the root last (PEM).
    chain: Vec<String>,
    /// The trust bundle (PEM), the root of `chain` among them.
    roots: Vec<String>,
    /// End of the signing certificate's validity (Unix seconds): nothing issued outlives it.
    signing_not_after: i64,
    max_ttl: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Authority")
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads a directory of Istio's `cacerts` shape. `cert-chain.pem` may be missing when
    /// `ca-cert.pem` is the root itself.
    pub fn from_cacerts(dir: &Path) -> Result<Self, AuthorityError> {
        const HINT: &str = "check --cacerts-dir: it must hold Istio's cacerts files";
        let key = read(&dir.join(CA_KEY_FILE), HINT)?;
        let cert = read(&dir.join(CA_CERT_FILE), HINT)?;
        let chain = read_optional(&dir.join(CERT_CHAIN_FILE), HINT)?.unwrap_or_default();
        let roots = read(&dir.join(ROOT_CERT_FILE), HINT)?;
        Self::from_pems(dir, &key, &cert, &chain, &roots)
    }

    /// Local mode: loads the root kept in `dir`, or generates one there on first start.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, AuthorityError> {
        const HINT: &str = "check --state-dir";
        let root_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (
            read_optional(&root_path, HINT)?,
            read_optional(&key_path, HINT)?,
        ) {
            (Some(roots), Some(key)) => {
                let cert =
                    read_optional(&dir.join(CA_CERT_FILE), HINT)?.unwrap_or_else(|| roots.clone());
                let chain = read_optional(&dir.join(CERT_CHAIN_FILE), HINT)?.unwrap_or_default();
                Self::from_pems(dir, &key, &cert, &chain, &roots)
            }
            (Some(_), None) => Err(AuthorityError::Incomplete {
                dir: dir.into(),
                present: ROOT_CERT_FILE,
                missing: CA_KEY_FILE,
            }),
            (None, _) => {
                let (cert, key) = generate_root(trust_domain)?;
                fs::create_dir_all(dir).map_err(|source| AuthorityError::Write {
                    path: dir.into(),
                    source,
                })?;
                // The root file goes last: its presence means the directory is complete.
                write_atomically(&key_path, key.as_bytes(), 0o600)?;
                write_atomically(&dir.join(CA_CERT_FILE), cert.as_bytes(), 0o644)?;
                write_atomically(&root_path, cert.as_bytes(), 0o644)?;
                tracing::info!(dir = %dir.display(), %trust_domain, "generated a new root CA");
                Self::from_pems(dir, &key, &cert, "", &cert)
            }
        }
    }

    /// Builds the authority from PEM texts (`dir` only names them in errors): the signing key,
    /// its certificate, the certificates above it (Istio's `cert-chain.pem`, which may start
    /// with the signing certificate and may end with the root) and the trust bundle.
    pub fn from_pems(
        dir: &Path,
        key_pem: &str,
        cert_pem: &str,
        chain_pem: &str,
        roots_pem: &str,
    ) -> Result<Self, AuthorityError> {
        let invalid = |file: &str, reason: String| AuthorityError::Invalid {
            path: dir.join(file),
            reason,
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| invalid(CA_KEY_FILE, format!("not a private key: {e}")))?;
        let roots = certificates(roots_pem).map_err(|e| invalid(ROOT_CERT_FILE, e))?;
        if roots.is_empty() {
            return Err(invalid(ROOT_CERT_FILE, "holds no certificate".into()));
        }
        let signing = certificates(cert_pem)
            .map_err(|e| invalid(CA_CERT_FILE, e))?
            .into_iter()
            .next()
            .ok_or_else(|| invalid(CA_CERT_FILE, "holds no certificate".into()))?;
        let above = certificates(chain_pem).map_err(|e| invalid(CERT_CHAIN_FILE, e))?;

        let parsed = parse_certificate(&signing.1).map_err(|e| invalid(CA_CERT_FILE, e))?;
        if !parsed.is_ca() {
            return Err(invalid(
                CA_CERT_FILE,
                "is not a CA certificate (basicConstraints CA:TRUE)".into(),
            ));
        }
        if parsed.tbs_certificate.subject_pki.raw
            != rcgen::PublicKeyData::subject_public_key_info(&key)
        {
            return Err(invalid(
                CA_KEY_FILE,
                format!("is not the key of the certificate in {CA_CERT_FILE}"),
            ));
        }
        let signing_not_after = parsed.validity().not_after.timestamp();

        // The signing certificate, then what is above it, then its root if the chain left it
        // out; each link must verify against the next.
        let mut chain = vec![signing.clone()];
        chain.extend(above.into_iter().filter(|(_, der)| *der != signing.1));
        let last = &chain[chain.len() - 1];
        if !roots.iter().any(|(_, der)| *der == last.1) {
            let last_parsed =
                parse_certificate(&last.1).map_err(|e| invalid(CERT_CHAIN_FILE, e))?;
            let root = roots
                .iter()
                .find(|(_, der)| {
                    parse_certificate(der).is_ok_and(|root| {
                        last_parsed
                            .verify_signature(Some(root.public_key()))
                            .is_ok()
                    })
                })
                .ok_or_else(|| {
                    invalid(
                        ROOT_CERT_FILE,
                        format!(
                            "holds no root that signed {}",
                            if chain.len() == 1 {
                                CA_CERT_FILE
                            } else {
                                CERT_CHAIN_FILE
                            }
                        ),
                    )
                })?;
            chain.push(root.clone());
        }
        for pair in chain.windows(2) {
            let child = parse_certificate(&pair[0].1).map_err(|e| invalid(CERT_CHAIN_FILE, e))?;
            let parent = parse_certificate(&pair[1].1).map_err(|e| invalid(CERT_CHAIN_FILE, e))?;
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|e| {
                    invalid(
                        CERT_CHAIN_FILE,
                        format!(
                            "{} is not signed by {} ({e}): the chain must go from {CA_CERT_FILE} up to the root",
                            child.subject(),
                            parent.subject()
                        ),
                    )
                })?;
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(signing.1.clone()), key)
            .map_err(|e| invalid(CA_CERT_FILE, format!("cannot sign with it: {e}")))?;
        Ok(Self {
            issuer,
            chain: chain.into_iter().map(|(pem, _)| pem).collect(),
            roots: roots.into_iter().map(|(pem, _)| pem).collect(),
            signing_not_after,
            max_ttl: MAX_WORKLOAD_CERT_TTL,
        })
    }

    /// Caps the lifetime of workload certificates.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl;
        self
    }

    /// The trust bundle, one PEM per root.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The trust bundle as one PEM text (the content of `root-cert.pem`).
    pub fn root_bundle(&self) -> String {
        self.roots.concat()
    }

    /// The signing certificate and those above it, the root last (PEM).
    pub fn chain(&self) -> &[String] {
        &self.chain
    }

    /// The certificate revocation list of the signing CA (DER): `revoked` serial numbers,
    /// valid for [`CRL_VALIDITY`], numbered `number` (a CRL replaces those of lower numbers).
    pub fn revocation_list(
        &self,
        revoked: &[Vec<u8>],
        number: u64,
    ) -> Result<Vec<u8>, AuthorityError> {
        let now = unix_now();
        let this_update = to_asn1(now.saturating_sub(CLOCK_SKEW.as_secs() as i64))?.to_datetime();
        let params = CertificateRevocationListParams {
            this_update,
            next_update: to_asn1(now.saturating_add(CRL_VALIDITY.as_secs() as i64))?.to_datetime(),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: this_update,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(AuthorityError::Generate)?;
        Ok(crl.der().to_vec())
    }

    /// Writes the trust bundle to `dir/root-cert.pem`, where the virtual cluster hands it to
    /// the nodes.
    pub fn write_root_bundle(&self, dir: &Path) -> Result<PathBuf, AuthorityError> {
        fs::create_dir_all(dir).map_err(|source| AuthorityError::Write {
            path: dir.into(),
            source,
        })?;
        let path = dir.join(ROOT_CERT_FILE);
        write_atomically(&path, self.root_bundle().as_bytes(), 0o644)?;
        Ok(path)
    }

    /// Issues a workload certificate for `identity` to the holder of the key of `csr_pem`,
    /// valid for `ttl` (at most the configured maximum, and never beyond the signing CA).
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Issued, AuthorityError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| AuthorityError::CsrPem(e.to_string()))?;
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| AuthorityError::CsrParse(e.to_string()))?;
        csr.verify_signature()
            .map_err(|e| AuthorityError::CsrSignature(e.to_string()))?;

        let expected = identity.to_string();
        let names = requested_names(&csr)?;
        if names.len() != 1 || names[0] != expected {
            return Err(AuthorityError::CsrNames {
                expected,
                found: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        }
        let public_key =
            SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| AuthorityError::CsrKey(e.to_string()))?;

        let mut params = CertificateParams::default();
        // No subject: the SPIFFE ID is the name (the SAN is then critical, as RFC 5280 asks).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(expected.as_str()).map_err(|e| AuthorityError::CsrNames {
                expected: expected.clone(),
                found: e.to_string(),
            })?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let (not_before, not_after) = self.validity(ttl.min(self.max_ttl))?;
        params.not_before = to_asn1(not_before)?.to_datetime();
        params.not_after = to_asn1(not_after)?.to_datetime();
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(AuthorityError::Generate)?;

        // As istiod answers: the leaf, the certificates between it and the root, and last the
        // whole root bundle (several roots during a rotation), so the node learns what to trust.
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        chain.push(cert.pem());
        chain.extend(self.chain[..self.chain.len() - 1].iter().cloned());
        chain.push(self.root_bundle());
        Ok(Issued {
            chain,
            serial: hex(&serial),
            not_after: UNIX_EPOCH + Duration::from_secs(not_after.max(0).unsigned_abs()),
        })
    }

    /// A serving certificate for the CA itself, with a fresh key: the certificate chain
    /// without the root, and the key (PEM).
    pub fn serving_certificate(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<(String, String), AuthorityError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().map_or("weft-ca", String::as_str),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Weft");
        for name in dns_names {
            let name = Ia5String::try_from(name.as_str()).map_err(|e| AuthorityError::Invalid {
                path: PathBuf::from("--server-name"),
                reason: format!("{name:?}: {e}"),
            })?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let (not_before, not_after) = self.validity(SERVING_CERT_TTL)?;
        params.not_before = to_asn1(not_before)?.to_datetime();
        params.not_after = to_asn1(not_after)?.to_datetime();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(AuthorityError::Generate)?;
        let mut chain = cert.pem();
        // Intermediates, not the root: the client has that.
        for pem in &self.chain[..self.chain.len() - 1] {
            chain.push_str(pem);
        }
        Ok((chain, key.serialize_pem()))
    }

    /// `(not_before, not_after)` in Unix seconds for a certificate living `ttl` from now, never
    /// beyond the signing certificate; refused when that leaves less than [`MIN_ISSUED_LIFE`]
    /// (a certificate already expired, or about to, would only make its holder ask again).
    fn validity(&self, ttl: Duration) -> Result<(i64, i64), AuthorityError> {
        let now = unix_now();
        let left_secs = self.signing_not_after.saturating_sub(now);
        if left_secs < MIN_ISSUED_LIFE.as_secs() as i64 {
            return Err(AuthorityError::SigningExpired { left_secs });
        }
        let not_before = now.saturating_sub(CLOCK_SKEW.as_secs() as i64);
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let not_after = now.saturating_add(ttl).min(self.signing_not_after);
        Ok((not_before, not_after))
    }
}

/// Every subject alternative name of a CSR, as text (URIs as they are, other kinds
/// prefixed with their kind), refusing extensions that do not parse.
fn requested_names(csr: &X509CertificationRequest<'_>) -> Result<Vec<String>, AuthorityError> {
    let mut names = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    names.push(match name {
                        x509_parser::extensions::GeneralName::URI(uri) => (*uri).to_owned(),
                        other => other.to_string(),
                    });
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(AuthorityError::CsrParse(format!(
                    "a requested extension does not parse: {error}"
                )));
            }
            _ => {}
        }
    }
    Ok(names)
}

/// A new self-signed root: `(certificate PEM, key PEM)`.
pub fn generate_root(trust_domain: &str) -> Result<(String, String), AuthorityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Weft root CA for {trust_domain}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    let now = unix_now();
    params.not_before = to_asn1(now - CLOCK_SKEW.as_secs() as i64)?.to_datetime();
    params.not_after = to_asn1(now + ROOT_TTL.as_secs() as i64)?.to_datetime();
    let cert = params.self_signed(&key).map_err(AuthorityError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The certificates of a PEM text, each as its own PEM text and its DER.
fn certificates(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            return Err("a certificate has no END line".into());
        };
        let block = &rest[start..start + len + END.len()];
        let der = CertificateDer::from_pem_slice(block.as_bytes())
            .map_err(|e| format!("a certificate is not valid PEM: {e}"))?;
        parse_certificate(&der)?;
        out.push((format!("{block}\n"), der.to_vec()));
        rest = &rest[start + len + END.len()..];
    }
    Ok(out)
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| format!("a certificate does not parse: {e}"))
}

fn read(path: &Path, hint: &'static str) -> Result<String, AuthorityError> {
    fs::read_to_string(path).map_err(|source| AuthorityError::Read {
        path: path.into(),
        source,
        hint,
    })
}

fn read_optional(path: &Path, hint: &'static str) -> Result<Option<String>, AuthorityError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuthorityError::Read {
            path: path.into(),
            source,
            hint,
        }),
    }
}

/// Writes a file so that readers see the old or the new content, never a part: a temporary
/// file beside it, synced, then renamed over it.
pub(crate) fn write_atomically(
    path: &Path,
    content: &[u8],
    mode: u32,
) -> Result<(), AuthorityError> {
    let error = |source| AuthorityError::Write {
        path: path.into(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` is filtered by the umask at creation; the key must not be readable by others
        // whatever the umask says.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(content)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(error)
}

/// Fills `buf` from the system's secure random source.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), AuthorityError> {
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|e| AuthorityError::Random(format!("{e:?}")))
}

/// 16 random bytes, positive and without a leading zero byte (a DER INTEGER as written).
fn random_serial() -> Result<[u8; 16], AuthorityError> {
    let mut serial = [0u8; 16];
    random_bytes(&mut serial)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// A serial number as the CA logs it and `revoked` files list it: bytes of the DER integer
/// without leading zeros.
pub fn serial_bytes(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim().trim_start_matches("0x").replace(':', "");
    if hex.is_empty() || hex.len() > 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hex = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect::<Option<_>>()?;
    Some(trim_serial(&bytes).to_vec())
}

/// A serial number without the leading zero bytes a DER integer may carry.
pub fn trim_serial(serial: &[u8]) -> &[u8] {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    &serial[start..]
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn to_asn1(unix: i64) -> Result<ASN1Time, AuthorityError> {
    ASN1Time::from_timestamp(unix)
        .map_err(|e| AuthorityError::Generate(rcgen::Error::X509(format!("time {unix}: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertifiedIssuer;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    /// A CSR for `names` (URIs), signed by a fresh key.
    fn csr(names: &[&str]) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        csr_with(&key, names)
    }

    fn csr_with(key: &KeyPair, names: &[&str]) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.strip_prefix("dns:") {
                Some(dns) => SanType::DnsName(Ia5String::try_from(dns).unwrap()),
                None => SanType::URI(Ia5String::try_from(*n).unwrap()),
            })
            .collect();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn parse_pem(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn generates_a_root_and_keeps_it_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("ca");
        let first = Authority::load_or_generate(&state, "cluster.local").unwrap();
        assert_eq!(first.roots().len(), 1);
        assert_eq!(first.chain(), first.roots());
        let key_mode = fs::metadata(state.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600, "the CA key is readable by others");
        for file in [ROOT_CERT_FILE, CA_CERT_FILE] {
            assert_eq!(
                fs::read_to_string(state.join(file)).unwrap(),
                first.roots()[0]
            );
        }
        let root = parse_pem(&first.roots()[0]);
        let (_, parsed) = x509_parser::parse_x509_certificate(&root).unwrap();
        assert!(parsed.is_ca());
        let subject = parsed.subject().to_string();
        assert!(
            subject.contains("Weft") && subject.contains("cluster.local"),
            "{subject}"
        );
        let years = (parsed.validity().not_after.timestamp() - unix_now()) / (365 * 24 * 3600);
        assert!((9..=10).contains(&years), "root valid for {years} years");

        let second = Authority::load_or_generate(&state, "cluster.local").unwrap();
        assert_eq!(
            second.roots(),
            first.roots(),
            "a restart generated a new root"
        );
        // What the restarted CA issues verifies against the first root.
        let issued = second
            .sign(
                &csr(&["spiffe://cluster.local/ns/a/sa/b"]),
                &id("spiffe://cluster.local/ns/a/sa/b"),
                Duration::from_secs(3600),
            )
            .unwrap();
        let leaf = parse_pem(&issued.chain[0]);
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        leaf.verify_signature(Some(parsed.public_key())).unwrap();
        assert_eq!(issued.chain.len(), 2);
        assert_eq!(issued.chain[1], first.roots()[0]);

        // No temporary file is left behind.
        let mut names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE]);
    }

    #[test]
    fn a_root_without_its_key_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_generate(dir.path(), "cluster.local").unwrap();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = Authority::load_or_generate(dir.path(), "cluster.local").unwrap_err();
        assert!(matches!(err, AuthorityError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
    }

    /// Writes an Istio `cacerts` directory: a root and an intermediate signed by it;
    /// returns (root PEM, intermediate PEM).
    fn write_cacerts(dir: &Path, chain_has_root: bool) -> (String, String) {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root_params = CertificateParams::default();
        root_params
            .distinguished_name
            .push(DnType::CommonName, "test root");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = CertifiedIssuer::self_signed(root_params, root_key).unwrap();

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let ca_key_pem = ca_key.serialize_pem();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test intermediate");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::signed_by(ca_params, ca_key, &root).unwrap();

        fs::write(dir.join(CA_KEY_FILE), ca_key_pem).unwrap();
        fs::write(dir.join(CA_CERT_FILE), ca.pem()).unwrap();
        let chain = if chain_has_root {
            format!("{}{}", ca.pem(), root.pem())
        } else {
            ca.pem()
        };
        fs::write(dir.join(CERT_CHAIN_FILE), chain).unwrap();
        fs::write(dir.join(ROOT_CERT_FILE), root.pem()).unwrap();
        (root.pem(), ca.pem())
    }

    #[test]
    fn loads_istio_cacerts_and_answers_leaf_intermediate_root() {
        for chain_has_root in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (root, intermediate) = write_cacerts(dir.path(), chain_has_root);
            let authority = Authority::from_cacerts(dir.path()).unwrap();
            assert_eq!(authority.roots().len(), 1);
            assert_eq!(parse_pem(&authority.roots()[0]), parse_pem(&root));

            let identity = id("spiffe://cluster.local/ns/bookinfo/sa/reviews");
            let issued = authority
                .sign(
                    &csr(&[&identity.to_string()]),
                    &identity,
                    Duration::from_secs(3600),
                )
                .unwrap();
            assert_eq!(issued.chain.len(), 3, "leaf, intermediate, root");
            assert_eq!(parse_pem(&issued.chain[1]), parse_pem(&intermediate));
            assert_eq!(parse_pem(&issued.chain[2]), parse_pem(&root));
            let leaf_der = parse_pem(&issued.chain[0]);
            let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
            let ca_der = parse_pem(&intermediate);
            let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
            leaf.verify_signature(Some(ca.public_key())).unwrap();
            assert_eq!(leaf.issuer(), ca.subject());

            // The serving certificate carries the intermediate, not the root.
            let (serving, _key) = authority
                .serving_certificate(&["weft-ca".into()], &["127.0.0.1".parse().unwrap()])
                .unwrap();
            let blocks = certificates(&serving).unwrap();
            assert_eq!(blocks.len(), 2);
            assert_eq!(blocks[1].1, parse_pem(&intermediate));
        }
    }

    #[test]
    fn refuses_a_key_that_is_not_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(dir.path(), true);
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), other.serialize_pem()).unwrap();
        let err = Authority::from_cacerts(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("is not the key of the certificate"),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_root_that_did_not_sign_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(dir.path(), false);
        let other = tempfile::tempdir().unwrap();
        let (other_root, _) = write_cacerts(other.path(), false);
        fs::write(dir.path().join(ROOT_CERT_FILE), other_root).unwrap();
        let err = Authority::from_cacerts(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("holds no root that signed"),
            "{err}"
        );
    }

    #[test]
    fn issues_exactly_the_identity_for_client_and_server_use() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_generate(dir.path(), "cluster.local")
            .unwrap()
            .with_max_ttl(Duration::from_secs(48 * 3600));
        let identity = id("spiffe://cluster.local/ns/bookinfo/sa/productpage");
        let ttl = Duration::from_secs(3 * 3600);
        let issued = authority
            .sign(&csr(&[&identity.to_string()]), &identity, ttl)
            .unwrap();
        let der = parse_pem(&issued.chain[0]);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();

        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "an empty subject needs a critical SAN");
        let names: Vec<_> = san
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, [format!("URI({identity})")]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        assert!(!cert.is_ca());
        assert_eq!(hex(cert.raw_serial()), issued.serial);

        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        let now = unix_now();
        assert!(
            (now - 70..=now - 50).contains(&not_before),
            "starts a minute early"
        );
        let lifetime = not_after - now;
        assert!(
            (3 * 3600 - 10..=3 * 3600).contains(&lifetime),
            "lives {lifetime}s"
        );
        assert_eq!(
            issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
            not_after
        );

        // A longer request is capped at the maximum.
        let issued = authority
            .sign(
                &csr(&[&identity.to_string()]),
                &identity,
                Duration::from_secs(365 * 24 * 3600),
            )
            .unwrap();
        let der = parse_pem(&issued.chain[0]);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let lifetime = cert.validity().not_after.timestamp() - unix_now();
        assert!(
            (48 * 3600 - 10..=48 * 3600).contains(&lifetime),
            "lives {lifetime}s"
        );

        // Serials differ.
        let again = authority
            .sign(&csr(&[&identity.to_string()]), &identity, ttl)
            .unwrap();
        assert_ne!(again.serial, issued.serial);
    }

    #[test]
    fn refuses_csrs_it_must_not_sign() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_generate(dir.path(), "cluster.local").unwrap();
        let identity = id("spiffe://cluster.local/ns/a/sa/b");
        let ttl = Duration::from_secs(3600);
        let refuse = |csr: &str| {
            let err = authority.sign(csr, &identity, ttl).unwrap_err();
            assert!(err.is_bad_request(), "{err}");
            err.to_string()
        };

        let other = refuse(&csr(&["spiffe://cluster.local/ns/a/sa/other"]));
        assert!(
            other.contains("spiffe://cluster.local/ns/a/sa/b")
                && other.contains("it names spiffe://cluster.local/ns/a/sa/other"),
            "{other}"
        );
        let extra = refuse(&csr(&[&identity.to_string(), "dns:evil.example.com"]));
        assert!(extra.contains("evil.example.com"), "{extra}");
        let twice = refuse(&csr(&[
            &identity.to_string(),
            "spiffe://cluster.local/ns/x/sa/y",
        ]));
        assert!(
            twice.contains("spiffe://cluster.local/ns/x/sa/y"),
            "{twice}"
        );
        let none = refuse(&csr(&[]));
        assert!(none.contains("it names none"), "{none}");

        let garbage = refuse("not a certificate request");
        assert!(garbage.contains("not a PEM"), "{garbage}");
        let not_der = refuse(
            "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n",
        );
        assert!(not_der.contains("does not parse"), "{not_der}");

        // A CSR whose signature was made over other content: flip a byte of the signature.
        let good = csr(&[&identity.to_string()]);
        let der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
        let bad_signature = refuse(&tampered);
        assert!(bad_signature.contains("signature"), "{bad_signature}");
        // The same CSR untampered is signed.
        authority.sign(&good, &identity, ttl).unwrap();
    }

    /// Minimal PEM writer for tampered test inputs.
    fn pem_encode(label: &str, der: &[u8]) -> String {
        const TABLE: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let lines: Vec<_> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }
}
