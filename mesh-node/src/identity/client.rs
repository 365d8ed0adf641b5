//! The node proxy's client of the mesh CA: sends a CSR, gets back a certificate chain.
//!
//! It speaks Istio's certificate API, so the CA may be `mesh-node ca` or istiod. The channel
//! is verified against the mesh's root (the CA's serving certificate is issued from it), and
//! each request carries the node's token, read from its file on every call because projected
//! service account tokens are rotated by the kubelet. Errors keep the gRPC code so the caller
//! can tell a refusal (do not retry as is) from an unreachable CA (retry with backoff).

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use rustls_pki_types::{pem::PemObject as _, CertificateDer};
use thiserror::Error;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
    Code,
};

use crate::{
    ca::proto::{
        istio_certificate_service_client::IstioCertificateServiceClient,
        revocations_client::RevocationsClient, IstioCertificateRequest, RevocationListRequest,
        IMPERSONATED_IDENTITY,
    },
    identity::Identity,
};

/// How to reach the mesh CA.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `https://host:port` of the CA.
    pub address: String,
    /// PEM of the root(s) the CA's serving certificate must chain to.
    pub root_cert_pem: String,
    /// Name the CA's serving certificate must carry.
    pub server_name: String,
    /// File holding the bearer token; none sends no token (a CA that needs none).
    pub token_file: Option<PathBuf>,
    /// Deadline of one request, connecting included.
    pub timeout: Duration,
}

#[derive(Debug, Error)]
pub enum CaClientError {
    #[error("mesh CA address {address:?}: {reason} (check --ca-addr)")]
    Address { address: String, reason: String },
    #[error("the mesh CA root certificate: {0} (check --ca-root-cert)")]
    RootCert(String),
    #[error("cannot read the mesh CA token {path}: {source} (check --ca-token-file)")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the mesh CA token in {path} is {reason} (check --ca-token-file)")]
    BadToken { path: PathBuf, reason: &'static str },
    #[error("mesh CA {address} unreachable: {detail}; {hint}")]
    Unreachable {
        address: String,
        code: Code,
        detail: String,
        hint: &'static str,
    },
    #[error("the mesh CA refused {identity}: {message}")]
    Refused {
        identity: String,
        code: Code,
        message: String,
    },
    #[error("the mesh CA failed to sign {identity}: {message} ({code:?})")]
    Failed {
        identity: String,
        code: Code,
        message: String,
    },
    #[error("the mesh CA answered no certificate for {identity}")]
    EmptyChain { identity: String },
}

impl CaClientError {
    /// The gRPC code of the CA's answer (`Unavailable`/`DeadlineExceeded` when it could not
    /// be reached), if the request got that far.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Unreachable { code, .. }
            | Self::Refused { code, .. }
            | Self::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the CA said no (the same request will be refused again), rather than failing.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

/// A client of the mesh CA. Clones share one HTTP/2 connection, made on first use.
#[derive(Clone)]
pub struct CaClient {
    endpoint: Endpoint,
    channel: Arc<OnceLock<Channel>>,
    address: Arc<str>,
    token_file: Option<Arc<std::path::Path>>,
}

impl CaClient {
    /// Checks the configuration; connects on first use (so the CA may start later).
    pub fn new(config: CaClientConfig) -> Result<Self, CaClientError> {
        let address_error = |reason: String| CaClientError::Address {
            address: config.address.clone(),
            reason,
        };
        if !config.address.starts_with("https://") {
            return Err(address_error(
                "must start with https:// (the mesh CA speaks TLS only)".into(),
            ));
        }
        let roots: Vec<_> = CertificateDer::pem_slice_iter(config.root_cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CaClientError::RootCert(format!("not PEM certificates: {e}")))?;
        if roots.is_empty() {
            return Err(CaClientError::RootCert("holds no certificate".into()));
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&config.root_cert_pem))
            .domain_name(config.server_name.clone());
        let endpoint = Endpoint::from_shared(config.address.clone())
            .map_err(|e| address_error(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| address_error(e.to_string()))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout);
        Ok(Self {
            endpoint,
            channel: Arc::default(),
            address: config.address.as_str().into(),
            token_file: config.token_file.map(Into::into),
        })
    }

    /// Signs `csr_pem` for `identity`, valid for `ttl`; with `impersonate`, asks for
    /// `identity` on behalf of a pod of this node (Istio's `ImpersonatedIdentity`), else as
    /// the caller's own identity. Returns the chain as the CA answered it: the leaf first, the
    /// root last.
    pub async fn sign(
        &self,
        identity: &Identity,
        csr_pem: &str,
        ttl: Duration,
        impersonate: bool,
    ) -> Result<Vec<String>, CaClientError> {
        let mut message = IstioCertificateRequest {
            csr: csr_pem.into(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        };
        if impersonate {
            message.set_metadata_string(IMPERSONATED_IDENTITY, &identity.to_string());
        }
        let request = self.authorized(message).await?;
        let response = IstioCertificateServiceClient::new(self.channel())
            .create_certificate(request)
            .await
            .map_err(|status| self.error(identity, &status))?;
        let chain = response.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(CaClientError::EmptyChain {
                identity: identity.to_string(),
            });
        }
        Ok(chain)
    }

    /// The CA's revocation lists (DER), Weft's `weft.ca.v1.Revocations/List`.
    pub async fn revocation_lists(&self) -> Result<Vec<Vec<u8>>, CaClientError> {
        let request = self.authorized(RevocationListRequest {}).await?;
        let response = RevocationsClient::new(self.channel())
            .list(request)
            .await
            .map_err(|status| CaClientError::Failed {
                identity: "(revocation list)".into(),
                code: status.code(),
                message: describe(&status),
            })?;
        Ok(response.into_inner().crls)
    }

    /// The channel, which spawns its worker on the runtime of its first use.
    fn channel(&self) -> Channel {
        self.channel
            .get_or_init(|| self.endpoint.connect_lazy())
            .clone()
    }

    /// `message` with the bearer token, read now (projected tokens rotate).
    async fn authorized<T>(&self, message: T) -> Result<tonic::Request<T>, CaClientError> {
        let mut request = tonic::Request::new(message);
        if let Some(path) = &self.token_file {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| CaClientError::Token {
                        path: path.to_path_buf(),
                        source,
                    })?;
            let bad = |reason| CaClientError::BadToken {
                path: path.to_path_buf(),
                reason,
            };
            let token = token.trim();
            if token.is_empty() {
                return Err(bad("empty"));
            }
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| bad("not a valid header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    fn error(&self, identity: &Identity, status: &tonic::Status) -> CaClientError {
        let code = status.code();
        // A status made on this side of the connection (connecting, TLS, HTTP/2) carries its
        // cause; one answered by the CA does not.
        let unreachable = match code {
            Code::DeadlineExceeded | Code::Cancelled => true,
            Code::Unavailable | Code::Unknown | Code::Internal => is_transport_error(status),
            _ => false,
        };
        if unreachable {
            let detail = describe(status);
            let hint = if detail.contains("certificate") || detail.contains("CertificateRequired") {
                "does --ca-root-cert hold the CA's root-cert.pem, and is --ca-server-name one of the CA's --server-name?"
            } else if code == Code::DeadlineExceeded || code == Code::Cancelled {
                "is mesh-node ca running, and overloaded?"
            } else {
                "is mesh-node ca running?"
            };
            return CaClientError::Unreachable {
                address: self.address.to_string(),
                code,
                detail,
                hint,
            };
        }
        match code {
            Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
                CaClientError::Refused {
                    identity: identity.to_string(),
                    code,
                    message: status.message().into(),
                }
            }
            _ => CaClientError::Failed {
                identity: identity.to_string(),
                code,
                message: describe(status),
            },
        }
    }
}

/// Whether the status stands for a failure to reach the server rather than its answer.
fn is_transport_error(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// The status message with its causes (a TLS or connection error names itself there).
fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if text.is_empty() {
        text = format!("{:?}", status.code());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: &str, root: &str) -> CaClientConfig {
        CaClientConfig {
            address: address.into(),
            root_cert_pem: root.into(),
            server_name: "weft-ca".into(),
            token_file: None,
            timeout: Duration::from_secs(1),
        }
    }

    fn root() -> String {
        let dir = tempfile::tempdir().unwrap();
        crate::ca::Authority::load_or_generate(dir.path(), "cluster.local")
            .unwrap()
            .root_bundle()
    }

    #[test]
    fn checks_its_configuration() {
        let root = root();
        let err = CaClient::new(config("http://127.0.0.1:15012", &root))
            .err()
            .unwrap();
        assert!(err.to_string().contains("https://"), "{err}");
        let err = CaClient::new(config("https://127.0.0.1:15012", "junk"))
            .err()
            .unwrap();
        assert!(matches!(err, CaClientError::RootCert(_)), "{err}");
        assert!(CaClient::new(config("https://127.0.0.1:15012", &root)).is_ok());
    }

    #[tokio::test]
    async fn an_absent_ca_is_unreachable() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("https://127.0.0.1:{port}");
        let client = CaClient::new(config(&address, &root())).unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let err = client
            .sign(&identity, "csr", Duration::from_secs(60), false)
            .await
            .unwrap_err();
        assert!(matches!(err, CaClientError::Unreachable { .. }), "{err:?}");
        assert_eq!(err.code(), Some(Code::Unavailable));
        assert!(!err.is_refusal());
        let text = err.to_string();
        assert!(
            text.contains(&address) && text.contains("is mesh-node ca running"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_missing_token_file_is_named() {
        let mut config = config("https://127.0.0.1:1", &root());
        config.token_file = Some("/nonexistent/weft-token".into());
        let client = CaClient::new(config).unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let err = client
            .sign(&identity, "csr", Duration::from_secs(60), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/weft-token"), "{err}");
        assert_eq!(err.code(), None);
    }
}
