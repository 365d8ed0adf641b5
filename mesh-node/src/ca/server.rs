//! The gRPC side of the mesh CA: `CreateCertificate` requests in, authenticated, authorized,
//! signed and logged, one log line per issued or refused certificate.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    auth::{self, NodeAuth},
    authority::Authority,
    proto::{
        istio_certificate_service_server::IstioCertificateService, revocations_server::Revocations,
        IstioCertificateRequest, IstioCertificateResponse, RevocationListRequest,
        RevocationListResponse, IMPERSONATED_IDENTITY,
    },
};
use crate::identity::Identity;

/// The certificate service: the signing [`Authority`] behind a [`NodeAuth`].
#[derive(Clone)]
pub struct CaService {
    /// Swapped when the signing CA or the root bundle is rotated.
    authority: Arc<ArcSwap<Authority>>,
    auth: Arc<dyn NodeAuth>,
    trust_domain: Arc<str>,
    /// Lifetime of a certificate whose request names none.
    default_ttl: Duration,
}

impl CaService {
    pub fn new(
        authority: Arc<ArcSwap<Authority>>,
        auth: Arc<dyn NodeAuth>,
        trust_domain: &str,
        default_ttl: Duration,
    ) -> Self {
        Self {
            authority,
            auth,
            trust_domain: trust_domain.into(),
            default_ttl,
        }
    }

    /// Handles one request; the error is the gRPC status answered.
    async fn create(
        &self,
        token: Option<&str>,
        request: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let Some(token) = token else {
            warn!("certificate refused: no bearer token");
            return Err(Status::unauthenticated(
                "no bearer token: send `authorization: Bearer <token>` (mesh-node --ca-token-file)",
            ));
        };
        let caller = self.auth.authenticate(token).await.map_err(|e| {
            warn!(error = %e, "certificate refused: caller not authenticated");
            e.status()
        })?;
        let requested = match request.metadata_string(IMPERSONATED_IDENTITY) {
            Ok(None) => caller.identity.clone(),
            Ok(Some(uri)) => uri.parse::<Identity>().map_err(|e| {
                warn!(%caller, error = %e, "certificate refused: bad {IMPERSONATED_IDENTITY}");
                Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}"))
            })?,
            Err(_) => {
                warn!(%caller, "certificate refused: {IMPERSONATED_IDENTITY} is not a string");
                return Err(Status::invalid_argument(format!(
                    "{IMPERSONATED_IDENTITY} must be a string (a SPIFFE ID)"
                )));
            }
        };
        let node = caller.node.as_deref().unwrap_or("-");
        auth::authorize(self.auth.as_ref(), &self.trust_domain, &caller, &requested)
            .await
            .map_err(|e| {
                warn!(identity = %requested, node, caller = %caller.identity, reason = %e, "certificate refused");
                e.status()
            })?;
        let ttl = u64::try_from(request.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map_or(self.default_ttl, Duration::from_secs);
        let issued = self
            .authority
            .load()
            .sign(&request.csr, &requested, ttl)
            .map_err(|e| {
                warn!(identity = %requested, node, reason = %e, "certificate refused");
                if e.is_bad_request() {
                    Status::invalid_argument(e.to_string())
                } else {
                    Status::internal(format!("signing failed: {e}"))
                }
            })?;
        let expiry = time_of(issued.not_after);
        info!(identity = %requested, node, serial = %issued.serial, %expiry, "certificate issued");
        Ok(IstioCertificateResponse {
            cert_chain: issued.chain,
        })
    }
}

/// A `SystemTime` in the format of certificates (`Mar  1 12:00:00 2026 +00:00`).
fn time_of(t: std::time::SystemTime) -> x509_parser::time::ASN1Time {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .unwrap_or_else(|_| x509_parser::time::ASN1Time::now())
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        self.create(token, request.get_ref())
            .await
            .map(Response::new)
    }
}

/// `weft.ca.v1.Revocations`: the signing CA's revocation list, for any caller the CA
/// authenticates (node proxies poll it).
#[derive(Clone)]
pub struct RevocationService {
    auth: Arc<dyn NodeAuth>,
    /// DER, replaced when the revoked serials or the signing CA change.
    crls: Arc<ArcSwap<Vec<Vec<u8>>>>,
}

impl RevocationService {
    pub fn new(auth: Arc<dyn NodeAuth>, crls: Arc<ArcSwap<Vec<Vec<u8>>>>) -> Self {
        Self { auth, crls }
    }
}

#[tonic::async_trait]
impl Revocations for RevocationService {
    async fn list(
        &self,
        request: Request<RevocationListRequest>,
    ) -> Result<Response<RevocationListResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        self.auth
            .authenticate(token)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(RevocationListResponse {
            crls: self.crls.load().as_ref().clone(),
        }))
    }
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
