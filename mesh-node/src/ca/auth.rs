//! Who is calling the mesh CA, and which identities it may obtain.
//!
//! Keys never leave a node, so the node proxy asks the CA for the certificates of the pods on
//! its node; a stolen node token must then be worth no more than that node's pods. Hence the
//! rule, as istiod applies it to ztunnel: a caller always may obtain its own identity; a node
//! proxy may also obtain ("impersonate") the identity of a service account that at least one
//! pod scheduled on its node runs as, checked afresh on each request; nobody else may obtain
//! anything. The rule is written once ([`authorize`]); what differs between local mode and
//! Kubernetes is only how a token becomes a caller and how the pods of a node are found, the
//! two methods of [`NodeAuth`].

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::api::{Api, ListParams, PostParams};
use thiserror::Error;

use super::authority::{self, AuthorityError};
use crate::{identity::Identity, model::Store};

/// Key of `user.extra` in which bound service account tokens name their node (Kubernetes 1.30+).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// Key of `user.extra` naming the pod a bound token was issued for.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// Key of `user.extra` carrying that pod's uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

#[derive(Debug, Error)]
pub enum AuthError {
    /// No caller could be established from the token (gRPC `Unauthenticated`).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not obtain the identity (gRPC `PermissionDenied`).
    #[error("{0}")]
    Denied(String),
    /// The answer depends on something that failed (gRPC `Unavailable`: retry later).
    #[error("{what}: {detail}")]
    Unavailable { what: String, detail: String },
}

impl AuthError {
    pub fn status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Self::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            Self::Denied(_) => tonic::Status::permission_denied(message),
            Self::Unavailable { .. } => tonic::Status::unavailable(message),
        }
    }
}

/// A Kubernetes service account, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's own identity.
    pub identity: Identity,
    /// The node it runs on, when known (always, for a node proxy).
    pub node: Option<String>,
    /// Whether it is a node proxy, which may obtain the identities of its node's pods.
    pub node_proxy: bool,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.node, self.node_proxy) {
            (Some(node), true) => write!(f, "node {node}"),
            _ => write!(f, "{}", self.identity),
        }
    }
}

/// How callers are authenticated and a node's pods found: local files or the Kubernetes API.
pub trait NodeAuth: Send + Sync + 'static {
    /// The caller holding `token` (an `authorization: Bearer` token).
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>>;

    /// Whether at least one pod of `service_account` is scheduled on `node` now.
    fn runs_on<'a>(
        &'a self,
        node: &'a str,
        service_account: &'a ServiceAccount,
    ) -> BoxFuture<'a, Result<bool, AuthError>>;
}

/// Decides whether `caller` may obtain `requested` from a CA of `trust_domain`.
pub async fn authorize(
    auth: &dyn NodeAuth,
    trust_domain: &str,
    caller: &Caller,
    requested: &Identity,
) -> Result<(), AuthError> {
    if *requested == caller.identity {
        return Ok(());
    }
    let deny = |why: String| {
        Err(AuthError::Denied(format!(
            "{caller} may not obtain {requested}: {why}"
        )))
    };
    let node = match (&caller.node, caller.node_proxy) {
        (Some(node), true) => node,
        _ => return deny("only node proxies may obtain an identity other than their own".into()),
    };
    if requested.trust_domain() != trust_domain {
        return deny(format!(
            "this CA signs identities of trust domain {trust_domain} only"
        ));
    }
    let service_account = ServiceAccount::new(requested.namespace(), requested.service_account());
    if auth.runs_on(node, &service_account).await? {
        Ok(())
    } else {
        deny(format!(
            "no pod of service account {service_account} is scheduled on {node}"
        ))
    }
}

/// Compares secrets in time that depends on their length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

// ------------------------------------------------------------------------------------------
// Local mode
// ------------------------------------------------------------------------------------------

/// Local mode (the virtual cluster): each node holds a token, one file per node in the CA's
/// token directory named after the node; every node proxy has the same identity; the pods of a
/// node come from the configuration directory the nodes read (a [`Store`] fed by a
/// `FileSource`).
pub struct LocalAuth {
    tokens_dir: PathBuf,
    /// `(node, token)` as last read, and the directory's modification time then: a node
    /// added, replaced or removed (files are replaced by rename) changes it.
    tokens: Mutex<(Vec<NodeToken>, Option<std::time::SystemTime>)>,
    node_identity: Identity,
    store: Store,
}

impl LocalAuth {
    /// Reads the token directory once (a wrong directory stops start-up).
    pub fn new(
        tokens_dir: impl Into<PathBuf>,
        node_identity: Identity,
        store: Store,
    ) -> Result<Self, AuthError> {
        let tokens_dir = tokens_dir.into();
        let modified = modified(&tokens_dir);
        let tokens = read_tokens(&tokens_dir)?;
        if tokens.is_empty() {
            tracing::warn!(dir = %tokens_dir.display(), "no node tokens yet: no node can obtain a certificate until one is written");
        }
        Ok(Self {
            tokens_dir,
            tokens: Mutex::new((tokens, modified)),
            node_identity,
            store,
        })
    }

    /// Creates (or replaces) `node`'s token in `dir`: 32 random bytes, hex, readable by the
    /// owner only. Returns the token.
    pub fn write_token(dir: &Path, node: &str) -> Result<String, AuthorityError> {
        let mut bytes = [0u8; 32];
        authority::random_bytes(&mut bytes)?;
        let token = authority::hex(&bytes);
        std::fs::create_dir_all(dir).map_err(|source| AuthorityError::Write {
            path: dir.into(),
            source,
        })?;
        authority::write_atomically(&dir.join(node), token.as_bytes(), 0o600)?;
        Ok(token)
    }

    fn find(&self, token: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        // Every token is compared, so the time taken does not tell which node matched.
        let mut found = None;
        for (node, expected) in tokens.0.iter() {
            if constant_time_eq(expected.as_bytes(), token.as_bytes()) {
                found = Some(node.clone());
            }
        }
        found
    }
}

/// `(node, token)`.
type NodeToken = (String, String);

fn modified(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

/// The tokens of a directory: `(file name, trimmed content)`, skipping hidden (temporary)
/// files and empty tokens.
fn read_tokens(dir: &Path) -> Result<Vec<(String, String)>, AuthError> {
    let unavailable = |e: std::io::Error| AuthError::Unavailable {
        what: format!("reading the node tokens in {}", dir.display()),
        detail: format!("{e} (check --node-tokens)"),
    };
    let mut tokens = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unavailable)? {
        let entry = entry.map_err(unavailable)?;
        let Ok(node) = entry.file_name().into_string() else {
            continue;
        };
        if node.starts_with('.') || !entry.file_type().map_err(unavailable)?.is_file() {
            continue;
        }
        let token = match std::fs::read_to_string(entry.path()) {
            Ok(token) => token.trim().to_owned(),
            // Removed between listing and reading.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(unavailable(e)),
        };
        if !token.is_empty() {
            tokens.push((node, token));
        }
    }
    Ok(tokens)
}

impl NodeAuth for LocalAuth {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let caller = |node| Caller {
                identity: self.node_identity.clone(),
                node: Some(node),
                node_proxy: true,
            };
            // Nodes may have been added, their tokens replaced or removed since the last read:
            // a removed token stops working at once.
            let now = modified(&self.tokens_dir);
            let stale = self.tokens.lock().unwrap_or_else(|e| e.into_inner()).1 != now;
            if stale || now.is_none() {
                let tokens = read_tokens(&self.tokens_dir)?;
                *self.tokens.lock().unwrap_or_else(|e| e.into_inner()) = (tokens, now);
            }
            match self.find(token) {
                Some(node) => Ok(caller(node)),
                None => Err(AuthError::Unauthenticated(
                    "the bearer token is no node's: check the node's --ca-token-file against the CA's --node-tokens directory".into(),
                )),
            }
        })
    }

    fn runs_on<'a>(
        &'a self,
        node: &'a str,
        service_account: &'a ServiceAccount,
    ) -> BoxFuture<'a, Result<bool, AuthError>> {
        Box::pin(async move {
            let snapshot = self.store.current();
            Ok(snapshot.pods.values().any(|pod| {
                pod.node.as_deref() == Some(node)
                    && *pod.key.namespace == *service_account.namespace
                    && *pod.service_account == *service_account.name
            }))
        })
    }
}

// ------------------------------------------------------------------------------------------
// Kubernetes mode
// ------------------------------------------------------------------------------------------

/// Kubernetes mode: tokens are checked with a `TokenReview`; a bound token names its node
/// (Kubernetes 1.30+) or its pod, whose node is looked up; the pods of a node are listed with
/// a `spec.nodeName` field selector on each request.
pub struct KubeAuth {
    client: kube::Client,
    trust_domain: String,
    /// Audiences the tokens must be bound to; empty: the API server's own.
    audiences: Vec<String>,
    node_proxies: Vec<ServiceAccount>,
}

impl KubeAuth {
    pub fn new(
        client: kube::Client,
        trust_domain: impl Into<String>,
        audiences: Vec<String>,
        node_proxies: Vec<ServiceAccount>,
    ) -> Self {
        Self {
            client,
            trust_domain: trust_domain.into(),
            audiences: audiences.into_iter().filter(|a| !a.is_empty()).collect(),
            node_proxies,
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable {
                what: "TokenReview".into(),
                detail: format!(
                    "{e} (may the CA's service account create tokenreviews.authentication.k8s.io?)"
                ),
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".into());
            return Err(AuthError::Unauthenticated(format!(
                "the API server did not accept the token: {why} (is it a service account token for audience {}?)",
                if self.audiences.is_empty() {
                    "of the API server".into()
                } else {
                    self.audiences.join(", ")
                }
            )));
        }
        // An authenticator that ignores audiences (a webhook, OIDC) may accept any token of
        // the cluster: Kubernetes asks callers that set audiences to check the answer's.
        if !self.audiences.is_empty() {
            let granted = status.audiences.unwrap_or_default();
            if !granted.iter().any(|a| self.audiences.contains(a)) {
                return Err(AuthError::Unauthenticated(format!(
                    "the token is not bound to audience {} (it was accepted for {granted:?}): node proxies use a projected token for the CA",
                    self.audiences.join(", ")
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, name)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(AuthError::Unauthenticated(format!(
                "{username:?} is not a service account: only service accounts obtain certificates"
            )));
        };
        let service_account = ServiceAccount::new(namespace, name);
        let identity: Identity = format!("spiffe://{}/ns/{namespace}/sa/{name}", self.trust_domain)
            .parse()
            .map_err(|e| AuthError::Unauthenticated(format!("{e}")))?;
        let node_proxy = self.node_proxies.contains(&service_account);
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
        };
        let mut node = first(EXTRA_NODE_NAME).cloned();
        if node.is_none() && node_proxy {
            let Some(pod_name) = first(EXTRA_POD_NAME) else {
                return Err(AuthError::Unauthenticated(format!(
                    "the token of {service_account} names neither a node nor a pod: node proxies must send a bound token (a projected serviceAccountToken volume)"
                )));
            };
            node = Some(
                self.node_of_pod(&service_account, pod_name, first(EXTRA_POD_UID))
                    .await?,
            );
        }
        Ok(Caller {
            identity,
            node,
            node_proxy,
        })
    }

    /// The node of the pod a bound token was issued for.
    async fn node_of_pod(
        &self,
        service_account: &ServiceAccount,
        pod_name: &str,
        pod_uid: Option<&String>,
    ) -> Result<String, AuthError> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), &service_account.namespace)
            .get_opt(pod_name)
            .await
            .map_err(|e| AuthError::Unavailable {
                what: format!("reading pod {}/{pod_name}", service_account.namespace),
                detail: format!("{e} (may the CA's service account get pods?)"),
            })?;
        let gone = || {
            AuthError::Unauthenticated(format!(
                "the token of {service_account} was issued for pod {}/{pod_name}, which no longer exists",
                service_account.namespace
            ))
        };
        let pod = pod.ok_or_else(gone)?;
        if pod_uid.is_some() && pod.metadata.uid.as_ref() != pod_uid {
            return Err(gone());
        }
        pod.spec.and_then(|spec| spec.node_name).ok_or_else(|| {
            AuthError::Unauthenticated(format!(
                "pod {}/{pod_name} of the token is not scheduled on a node",
                service_account.namespace
            ))
        })
    }
}

impl NodeAuth for KubeAuth {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(self.review(token))
    }

    fn runs_on<'a>(
        &'a self,
        node: &'a str,
        service_account: &'a ServiceAccount,
    ) -> BoxFuture<'a, Result<bool, AuthError>> {
        Box::pin(async move {
            let pods = Api::<Pod>::namespaced(self.client.clone(), &service_account.namespace)
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .map_err(|e| AuthError::Unavailable {
                    what: format!("listing the pods of {node}"),
                    detail: format!("{e} (may the CA's service account list pods?)"),
                })?;
            Ok(pods.items.iter().any(|pod| {
                let spec = pod.spec.as_ref();
                let account = spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default");
                let finished = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
                account == service_account.name
                    && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                    && !finished
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{ObjectKey, Pod as ModelPod, Snapshot};

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    fn pod(namespace: &str, name: &str, sa: &str, node: &str) -> ModelPod {
        ModelPod {
            key: ObjectKey {
                namespace: namespace.into(),
                name: name.into(),
            },
            uid: None,
            labels: Default::default(),
            annotations: Default::default(),
            node: Some(node.into()),
            ip: None,
            service_account: sa.into(),
            ports: Vec::new(),
            controller: None,
        }
    }

    fn local(pods: Vec<ModelPod>) -> (tempfile::TempDir, LocalAuth, String) {
        let dir = tempfile::tempdir().unwrap();
        let token = LocalAuth::write_token(dir.path(), "node-1").unwrap();
        LocalAuth::write_token(dir.path(), "node-2").unwrap();
        let store = Store::new();
        let mut snapshot = Snapshot::default();
        for p in pods {
            snapshot.pods.insert(p.key.clone(), Arc::new(p));
        }
        store.publish(snapshot);
        let auth = LocalAuth::new(
            dir.path(),
            id("spiffe://cluster.local/ns/weft-system/sa/mesh-node"),
            store,
        )
        .unwrap();
        (dir, auth, token)
    }

    #[tokio::test]
    async fn local_tokens_name_their_node() {
        let (dir, auth, token) = local(Vec::new());
        assert_eq!(token.len(), 64);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("node-1"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let caller = auth.authenticate(&token).await.unwrap();
        assert_eq!(caller.node.as_deref(), Some("node-1"));
        assert!(caller.node_proxy);
        assert_eq!(caller.to_string(), "node node-1");

        let err = auth.authenticate("nope").await.unwrap_err();
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err}");

        // A node added while the CA runs is found.
        let token3 = LocalAuth::write_token(dir.path(), "node-3").unwrap();
        let caller = auth.authenticate(&token3).await.unwrap();
        assert_eq!(caller.node.as_deref(), Some("node-3"));
        // A node removed is refused at once.
        std::fs::remove_file(dir.path().join("node-3")).unwrap();
        let err = auth.authenticate(&token3).await.unwrap_err();
        assert!(matches!(err, AuthError::Unauthenticated(_)), "{err}");
    }

    #[tokio::test]
    async fn a_node_obtains_its_pods_identities_only() {
        let (_dir, auth, token) = local(vec![
            pod("bookinfo", "reviews-1", "reviews", "node-1"),
            pod("bookinfo", "ratings-1", "ratings", "node-2"),
        ]);
        let caller = auth.authenticate(&token).await.unwrap();
        let td = "cluster.local";
        authorize(&auth, td, &caller, &caller.identity.clone())
            .await
            .unwrap();
        authorize(
            &auth,
            td,
            &caller,
            &id("spiffe://cluster.local/ns/bookinfo/sa/reviews"),
        )
        .await
        .unwrap();
        let err = authorize(
            &auth,
            td,
            &caller,
            &id("spiffe://cluster.local/ns/bookinfo/sa/ratings"),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "node node-1 may not obtain spiffe://cluster.local/ns/bookinfo/sa/ratings: no pod of service account bookinfo/ratings is scheduled on node-1"
        );
        assert_eq!(err.status().code(), tonic::Code::PermissionDenied);
        // Same service account name in another namespace is another identity.
        let err = authorize(
            &auth,
            td,
            &caller,
            &id("spiffe://cluster.local/ns/other/sa/reviews"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AuthError::Denied(_)));
        let err = authorize(
            &auth,
            td,
            &caller,
            &id("spiffe://other.domain/ns/bookinfo/sa/reviews"),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("trust domain cluster.local"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn only_node_proxies_impersonate() {
        let (_dir, auth, _) = local(vec![pod("bookinfo", "reviews-1", "reviews", "node-1")]);
        let caller = Caller {
            identity: id("spiffe://cluster.local/ns/bookinfo/sa/productpage"),
            node: Some("node-1".into()),
            node_proxy: false,
        };
        authorize(&auth, "cluster.local", &caller, &caller.identity.clone())
            .await
            .unwrap();
        let err = authorize(
            &auth,
            "cluster.local",
            &caller,
            &id("spiffe://cluster.local/ns/bookinfo/sa/reviews"),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().starts_with(
            "spiffe://cluster.local/ns/bookinfo/sa/productpage may not obtain spiffe://cluster.local/ns/bookinfo/sa/reviews: only node proxies"
        ), "{err}");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
