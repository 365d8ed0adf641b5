//! Workload identity: SPIFFE IDs of service accounts, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`,
//! as Istio writes them.

use std::{fmt, str::FromStr, sync::Arc};

use thiserror::Error;

pub mod client;
pub mod manager;

/// The trust domain when none is configured, as in Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: one Kubernetes service account in one trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{uri:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
pub struct IdentityError {
    pub uri: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The principal AuthorizationPolicies name: the SPIFFE ID without its scheme,
    /// `<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let error = || IdentityError { uri: uri.into() };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(error)?;
        let mut parts = rest.split('/');
        let (Some(trust_domain), Some("ns"), Some(namespace), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(error());
        };
        // Trust domains are DNS-like names; namespaces and service accounts are DNS labels or
        // subdomains. Anything else (empty segments, `..`, percent-encoding) is refused.
        let name = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        // SPIFFE: trust domains are lowercase letters, digits, `.`, `-` and `_`.
        let domain = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
                })
        };
        if !domain(trust_domain) || !name(namespace) || !name(sa) {
            return Err(error());
        }
        Ok(Self::new(trust_domain, namespace, sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_istio_spiffe_ids() {
        let id: Identity = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "bookinfo");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
        );
        assert_eq!(
            Identity::new("cluster.local", "bookinfo", "bookinfo-productpage"),
            id
        );
    }

    #[test]
    fn refuses_what_is_not_a_service_account_id() {
        for bad in [
            "",
            "spiffe://",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a%2Fb/sa/c",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad:?} was accepted");
        }
    }
}
