//! The mesh CA in-process over real TLS on 127.0.0.1, with the node's real `CaClient`: local
//! mode with a configuration directory and node token files, and Kubernetes mode against a
//! fake API server behind kube's mock service (`tower_test::mock::pair`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    pin::pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use kube::client::Body;
use mesh_node::{
    ca::{
        Authority, CaServer, CaSettings, CallerSource, KeySource, KubeAuth, LocalAuth,
        ServiceAccount,
    },
    identity::{
        client::{CaClient, CaClientConfig, CaClientError},
        Identity,
    },
};
use rcgen::{
    string::Ia5String, CertificateParams, DistinguishedName, KeyPair, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::Code;

const NODE_PROXY: &str = "spiffe://cluster.local/ns/weft-system/sa/mesh-node";
const REVIEWS: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
const RATINGS: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings";
const DETAILS: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details";
const TTL: Duration = Duration::from_secs(3600);

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// A CSR for `identity`, with a fresh key.
fn csr(identity: &str) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(identity).unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The URI SANs of a PEM certificate.
fn uris(pem: &str) -> Vec<String> {
    let der = der(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => (*u).to_owned(),
            other => other.to_string(),
        })
        .collect()
}

fn settings(state: &Path, callers: CallerSource) -> CaSettings {
    CaSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        trust_domain: "cluster.local".into(),
        keys: KeySource {
            cacerts_dir: None,
            state_dir: Some(state.into()),
            revoked: None,
        },
        callers,
        node_proxies: vec![ServiceAccount::new("weft-system", "mesh-node")],
        server_names: vec!["weft-ca".into(), "localhost".into()],
        server_ips: vec!["127.0.0.1".parse().unwrap()],
        workload_cert_ttl: Duration::from_secs(24 * 3600),
        max_workload_cert_ttl: Duration::from_secs(90 * 24 * 3600),
    }
}

/// A CA serving until dropped.
struct Running {
    address: String,
    root: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn start(server: CaServer) -> Self {
        let address = format!("https://{}", server.local_addr());
        let root = server.authority().root_bundle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            address,
            root,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn client(&self, token_file: Option<PathBuf>) -> CaClient {
        self.client_trusting(&self.root, token_file)
    }

    fn client_trusting(&self, root: &str, token_file: Option<PathBuf>) -> CaClient {
        CaClient::new(CaClientConfig {
            address: self.address.clone(),
            root_cert_pem: root.into(),
            server_name: "weft-ca".into(),
            token_file,
            timeout: Duration::from_secs(10),
        })
        .unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("the CA stops on shutdown")
            .unwrap();
    }
}

async fn sign(
    client: &CaClient,
    identity: &str,
    impersonate: bool,
) -> Result<Vec<String>, CaClientError> {
    client
        .sign(&id(identity), &csr(identity), TTL, impersonate)
        .await
}

// ------------------------------------------------------------------------------------------
// Local mode
// ------------------------------------------------------------------------------------------

fn pod_yaml(name: &str, service_account: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: bookinfo\n  labels: {{app: {name}}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {service_account}\n  containers:\n  - name: app\nstatus:\n  podIP: {ip}\n"
    )
}

/// Writes a file as the virtual cluster does: a hidden temporary file, then a rename.
fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Local {
    _dir: TempDir,
    config: PathBuf,
    tokens: PathBuf,
    state: PathBuf,
    ca: Running,
}

async fn local() -> Local {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let tokens = dir.path().join("tokens");
    let state = dir.path().join("ca");
    std::fs::create_dir_all(&config).unwrap();
    write_atomically(
        &config.join("pods.yaml"),
        &[
            pod_yaml("reviews-v1", "bookinfo-reviews", "node-1", "10.244.1.5"),
            pod_yaml("ratings-v1", "bookinfo-ratings", "node-2", "10.244.2.5"),
            pod_yaml("ratings-v2", "bookinfo-ratings", "node-2", "10.244.2.6"),
        ]
        .join("---\n"),
    );
    LocalAuth::write_token(&tokens, "node-1").unwrap();
    LocalAuth::write_token(&tokens, "node-2").unwrap();
    let server = CaServer::bind(settings(
        &state,
        CallerSource::Local {
            config_dir: config.clone(),
            node_tokens: tokens.clone(),
        },
    ))
    .await
    .unwrap();
    Local {
        ca: Running::start(server).await,
        _dir: dir,
        config,
        tokens,
        state,
    }
}

#[tokio::test]
async fn a_node_obtains_its_own_and_its_pods_identities() {
    let local = local().await;
    // The root is where the virtual cluster hands it to the nodes.
    let root = std::fs::read_to_string(local.state.join("root-cert.pem")).unwrap();
    assert_eq!(root, local.ca.root);
    let client = local.ca.client(Some(local.tokens.join("node-1")));

    let chain = sign(&client, NODE_PROXY, false).await.unwrap();
    assert_eq!(chain.len(), 2, "leaf, root");
    assert_eq!(uris(&chain[0]), [NODE_PROXY]);
    assert_eq!(der(&chain[1]), der(&root), "the root comes last");

    let chain = sign(&client, REVIEWS, true).await.unwrap();
    assert_eq!(uris(&chain[0]), [REVIEWS]);
    let leaf = der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let root_der = der(&root);
    let (_, root_cert) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    leaf.verify_signature(Some(root_cert.public_key())).unwrap();
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(
        lifetime,
        TTL.as_secs() as i64 + 60,
        "the TTL asked, from a minute ago"
    );

    // Asking for one's own identity through the impersonation key works too.
    sign(&client, NODE_PROXY, true).await.unwrap();
    local.ca.stop().await;
}

#[tokio::test]
async fn a_node_is_refused_identities_of_other_nodes_pods() {
    let local = local().await;
    let client = local.ca.client(Some(local.tokens.join("node-1")));
    let err = sign(&client, RATINGS, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.is_refusal());
    assert_eq!(
        err.to_string(),
        format!("the mesh CA refused {RATINGS}: node node-1 may not obtain {RATINGS}: no pod of service account bookinfo/bookinfo-ratings is scheduled on node-1")
    );
    // node-2 runs them.
    let node2 = local.ca.client(Some(local.tokens.join("node-2")));
    sign(&node2, RATINGS, true).await.unwrap();
    // Without impersonation the request is for the node's own identity, which the CSR is not.
    let err = sign(&client, REVIEWS, false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains(NODE_PROXY), "{err}");
    local.ca.stop().await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_unauthenticated() {
    let local = local().await;
    let wrong = local.tokens.parent().unwrap().join("wrong-token");
    std::fs::write(&wrong, "00112233").unwrap();
    let err = sign(&local.ca.client(Some(wrong)), NODE_PROXY, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("--ca-token-file"), "{err}");

    let err = sign(&local.ca.client(None), NODE_PROXY, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("no bearer token"), "{err}");

    // A node whose token is written while the CA runs is known at once.
    LocalAuth::write_token(&local.tokens, "node-3").unwrap();
    sign(
        &local.ca.client(Some(local.tokens.join("node-3"))),
        NODE_PROXY,
        false,
    )
    .await
    .unwrap();
    local.ca.stop().await;
}

#[tokio::test]
async fn a_pod_added_to_the_config_is_authorized_soon() {
    let local = local().await;
    let client = local.ca.client(Some(local.tokens.join("node-1")));
    let err = sign(&client, DETAILS, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    write_atomically(
        &local.config.join("details.yaml"),
        &pod_yaml("details-v1", "bookinfo-details", "node-1", "10.244.1.9"),
    );
    let start = Instant::now();
    loop {
        match sign(&client, DETAILS, true).await {
            Ok(chain) => {
                assert_eq!(uris(&chain[0]), [DETAILS]);
                break;
            }
            Err(e) if e.code() == Some(Code::PermissionDenied) => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "still refused: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    local.ca.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_root_does_not_connect() {
    let local = local().await;
    let other = tempfile::tempdir().unwrap();
    let other_root = Authority::load_or_generate(other.path(), "cluster.local")
        .unwrap()
        .root_bundle();
    let client = local
        .ca
        .client_trusting(&other_root, Some(local.tokens.join("node-1")));
    let err = sign(&client, NODE_PROXY, false).await.unwrap_err();
    assert!(matches!(err, CaClientError::Unreachable { .. }), "{err:?}");
    assert!(!err.is_refusal());
    let text = err.to_string();
    assert!(text.contains(&local.ca.address), "{text}");
    assert!(
        text.contains("invalid peer certificate"),
        "names the TLS failure: {text}"
    );
    assert!(text.contains("--ca-root-cert"), "{text}");
    local.ca.stop().await;
}

#[tokio::test]
async fn a_restarted_ca_keeps_its_root() {
    let local = local().await;
    let first = local.ca.root.clone();
    local.ca.stop().await;
    let server = CaServer::bind(settings(
        &local.state,
        CallerSource::Local {
            config_dir: local.config.clone(),
            node_tokens: local.tokens.clone(),
        },
    ))
    .await
    .unwrap();
    let ca = Running::start(server).await;
    assert_eq!(ca.root, first);
    // A client holding the first root reaches the restarted CA.
    let client = ca.client_trusting(&first, Some(local.tokens.join("node-1")));
    sign(&client, NODE_PROXY, false).await.unwrap();
    ca.stop().await;
}

// ------------------------------------------------------------------------------------------
// Kubernetes mode
// ------------------------------------------------------------------------------------------

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A fake API server: TokenReviews answered from a table of tokens, pods listed by node.
#[derive(Clone, Default)]
struct FakeApi {
    /// token → TokenReview status.
    reviews: Arc<Mutex<BTreeMap<String, Value>>>,
    pods: Arc<Mutex<Vec<Value>>>,
    /// `(method, path and query, body)` of every request.
    requests: Arc<Mutex<Vec<(String, String, Value)>>>,
}

impl FakeApi {
    fn service_account_token(&self, token: &str, namespace: &str, name: &str, extra: Value) {
        self.reviews.lock().unwrap().insert(
            token.into(),
            json!({"authenticated": true, "audiences": ["weft-ca"],
                   "user": {"username": format!("system:serviceaccount:{namespace}:{name}"),
                            "uid": "u", "groups": ["system:serviceaccounts"], "extra": extra}}),
        );
    }

    fn pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        service_account: &str,
        node: &str,
        phase: &str,
    ) {
        self.pods.lock().unwrap().push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": "app"}]},
            "status": {"phase": phase}
        }));
    }

    fn requests(&self) -> Vec<(String, String, Value)> {
        self.requests.lock().unwrap().clone()
    }

    async fn serve(self, handle: Handle) {
        let mut handle = pin!(handle);
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            self.requests
                .lock()
                .unwrap()
                .push((method.clone(), uri.clone(), body.clone()));
            let (status, answer) = self.answer(&method, &uri, &body);
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(
                    Bytes::from(serde_json::to_vec(&answer).unwrap()).to_vec(),
                ))
                .unwrap();
            send.send_response(response);
        }
    }

    fn answer(&self, method: &str, uri: &str, body: &Value) -> (u16, Value) {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let status = self
                .reviews
                .lock()
                .unwrap()
                .get(token)
                .cloned()
                .unwrap_or_else(|| json!({"authenticated": false, "error": "token has expired"}));
            let mut review = body.clone();
            review["status"] = status;
            return (201, review);
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            ("GET", ["api", "v1", "namespaces", namespace, "pods"]) => {
                let node = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("fieldSelector="))
                    .map(|s| s.replace("%3D", "="))
                    .and_then(|s| s.strip_prefix("spec.nodeName=").map(str::to_owned));
                let items: Vec<Value> = self
                    .pods
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|p| p["metadata"]["namespace"] == *namespace)
                    .filter(|p| node.as_ref().is_none_or(|n| p["spec"]["nodeName"] == *n))
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            ("GET", ["api", "v1", "namespaces", namespace, "pods", name]) => {
                let pod = self
                    .pods
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|p| {
                        p["metadata"]["namespace"] == *namespace && p["metadata"]["name"] == *name
                    })
                    .cloned();
                match pod {
                    Some(pod) => (200, pod),
                    None => (
                        404,
                        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                         "reason": "NotFound", "code": 404, "message": "pods not found"}),
                    ),
                }
            }
            _ => (
                404,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                              "reason": "NotFound", "code": 404, "message": format!("{method} {uri}")}),
            ),
        }
    }
}

async fn kube_ca(api: &FakeApi) -> (TempDir, Running, TempDir) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(api.clone().serve(handle));
    let client = kube::Client::new(service, "default");
    let state = tempfile::tempdir().unwrap();
    let settings = settings(
        state.path(),
        CallerSource::Kubernetes {
            audiences: vec!["weft-ca".into()],
        },
    );
    let authority = Arc::new(Authority::load_or_generate(state.path(), "cluster.local").unwrap());
    let auth = KubeAuth::new(
        client,
        "cluster.local",
        vec!["weft-ca".into()],
        settings.node_proxies.clone(),
    );
    let server = CaServer::bind_with(&settings, authority, Arc::new(auth))
        .await
        .unwrap();
    let tokens = tempfile::tempdir().unwrap();
    (state, Running::start(server).await, tokens)
}

fn token_file(dir: &TempDir, token: &str) -> Option<PathBuf> {
    let path = dir.path().join(token);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    Some(path)
}

fn bookinfo(api: &FakeApi) {
    api.pod(
        "bookinfo",
        "reviews-v1",
        "r1",
        "bookinfo-reviews",
        "node-1",
        "Running",
    );
    api.pod(
        "bookinfo",
        "ratings-v1",
        "r2",
        "bookinfo-ratings",
        "node-1",
        "Succeeded",
    );
    api.pod(
        "bookinfo",
        "ratings-v2",
        "r3",
        "bookinfo-ratings",
        "node-2",
        "Running",
    );
    api.pod(
        "weft-system",
        "mesh-node-x",
        "uid-x",
        "mesh-node",
        "node-2",
        "Running",
    );
}

#[tokio::test]
async fn kubernetes_node_tokens_obtain_their_nodes_pods_identities() {
    let api = FakeApi::default();
    bookinfo(&api);
    api.service_account_token(
        "node-1-token",
        "weft-system",
        "mesh-node",
        json!({"authentication.kubernetes.io/node-name": ["node-1"],
               "authentication.kubernetes.io/pod-name": ["mesh-node-y"]}),
    );
    let (_state, ca, tokens) = kube_ca(&api).await;
    let client = ca.client(token_file(&tokens, "node-1-token"));

    let chain = sign(&client, REVIEWS, true).await.unwrap();
    assert_eq!(uris(&chain[0]), [REVIEWS]);
    let requests = api.requests();
    let (method, uri, body) = &requests[0];
    assert_eq!(method, "POST");
    assert!(
        uri.starts_with("/apis/authentication.k8s.io/v1/tokenreviews"),
        "{uri}"
    );
    assert_eq!(body["spec"]["token"], "node-1-token");
    assert_eq!(body["spec"]["audiences"], json!(["weft-ca"]));
    assert_eq!(requests[1].0, "GET");
    let (path, query) = requests[1].1.split_once('?').unwrap();
    assert_eq!(path, "/api/v1/namespaces/bookinfo/pods");
    // kube writes `?&fieldSelector=...`.
    let params: Vec<_> = query.split('&').filter(|p| !p.is_empty()).collect();
    assert_eq!(
        params,
        ["fieldSelector=spec.nodeName%3Dnode-1"],
        "pods are listed by node"
    );

    // The node's own identity needs no pod list.
    let before = api.requests().len();
    sign(&client, NODE_PROXY, false).await.unwrap();
    assert_eq!(api.requests().len(), before + 1, "one TokenReview only");

    // ratings runs on node-2 only (its node-1 pod has finished).
    let err = sign(&client, RATINGS, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "node node-1 may not obtain {RATINGS}: no pod of service account bookinfo/bookinfo-ratings is scheduled on node-1"
        )),
        "{err}"
    );
    ca.stop().await;
}

#[tokio::test]
async fn kubernetes_node_found_from_the_tokens_pod() {
    let api = FakeApi::default();
    bookinfo(&api);
    // An older API server: the bound token names its pod, not its node.
    api.service_account_token(
        "pod-token",
        "weft-system",
        "mesh-node",
        json!({"authentication.kubernetes.io/pod-name": ["mesh-node-x"],
               "authentication.kubernetes.io/pod-uid": ["uid-x"]}),
    );
    api.service_account_token(
        "stale-pod-token",
        "weft-system",
        "mesh-node",
        json!({"authentication.kubernetes.io/pod-name": ["mesh-node-x"],
               "authentication.kubernetes.io/pod-uid": ["uid-old"]}),
    );
    let (_state, ca, tokens) = kube_ca(&api).await;
    let client = ca.client(token_file(&tokens, "pod-token"));
    sign(&client, RATINGS, true).await.unwrap();
    assert!(api
        .requests()
        .iter()
        .any(|(m, uri, _)| m == "GET" && uri == "/api/v1/namespaces/weft-system/pods/mesh-node-x"));
    let err = sign(&client, REVIEWS, true).await.unwrap_err();
    assert!(err.to_string().contains("scheduled on node-2"), "{err}");

    let stale = ca.client(token_file(&tokens, "stale-pod-token"));
    let err = sign(&stale, RATINGS, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("no longer exists"), "{err}");
    ca.stop().await;
}

#[tokio::test]
async fn kubernetes_other_service_accounts_get_their_own_identity_only() {
    let api = FakeApi::default();
    bookinfo(&api);
    api.service_account_token(
        "reviews-token",
        "bookinfo",
        "bookinfo-reviews",
        json!({"authentication.kubernetes.io/node-name": ["node-1"]}),
    );
    let (_state, ca, tokens) = kube_ca(&api).await;
    let client = ca.client(token_file(&tokens, "reviews-token"));
    let chain = sign(&client, REVIEWS, false).await.unwrap();
    assert_eq!(uris(&chain[0]), [REVIEWS]);
    let err = sign(&client, RATINGS, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("only node proxies"), "{err}");
    ca.stop().await;
}

#[tokio::test]
async fn kubernetes_rejected_tokens_are_unauthenticated() {
    let api = FakeApi::default();
    let (_state, ca, tokens) = kube_ca(&api).await;
    let client = ca.client(token_file(&tokens, "expired-token"));
    let err = sign(&client, NODE_PROXY, false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("token has expired"), "{err}");
    assert_eq!(
        api.requests().len(),
        1,
        "no pod lookup for an unauthenticated caller"
    );
    ca.stop().await;
}

#[tokio::test]
async fn kubernetes_tokens_of_another_audience_are_unauthenticated() {
    let api = FakeApi::default();
    // An authenticator that accepted the token but not for the CA's audience (the pod's
    // default API-server token, say).
    api.reviews.lock().unwrap().insert(
        "api-server-token".into(),
        json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
               "user": {"username": "system:serviceaccount:weft-system:mesh-node",
                        "extra": {"authentication.kubernetes.io/node-name": ["node-1"]}}}),
    );
    let (_state, ca, tokens) = kube_ca(&api).await;
    let client = ca.client(token_file(&tokens, "api-server-token"));
    let err = sign(&client, NODE_PROXY, false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("audience weft-ca"), "{err}");
    ca.stop().await;
}

/// Every certificate of a PEM text, DER.
fn ders(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

/// Whether the certificate `leaf` (PEM) was signed by the key of `issuer` (PEM).
fn signed_by(leaf: &str, issuer: &str) -> bool {
    let (leaf, issuer) = (der(leaf), der(issuer));
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let (_, issuer) = x509_parser::parse_x509_certificate(&issuer).unwrap();
    leaf.verify_signature(Some(issuer.public_key())).is_ok()
}

/// Signs for the node's own identity until `done` holds of the chain, for up to 20 s (the CA
/// checks its key files every 2 s).
async fn signed_until(client: &CaClient, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let chain = sign(client, NODE_PROXY, false).await.unwrap();
        if done(&chain) {
            return chain;
        }
        assert!(
            Instant::now() < deadline,
            "the CA did not take the change: {chain:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_root_rotates_in_istios_three_steps_without_a_restart() {
    let local = local().await;
    let client = local.ca.client(Some(local.tokens.join("node-1")));
    let old = local.ca.root.clone();
    let (new_root, new_key) = mesh_node::ca::authority::generate_root("cluster.local").unwrap();
    let state = &local.state;

    // 1. Both roots trusted; the old one still signs.
    write_atomically(&state.join("root-cert.pem"), &format!("{old}{new_root}"));
    let chain = signed_until(&client, |c| ders(c.last().unwrap()).len() == 2).await;
    assert!(
        signed_by(&chain[0], &old),
        "the old root still signs in step 1"
    );
    assert_eq!(ders(chain.last().unwrap()), [der(&old), der(&new_root)]);

    // 2. The new root signs; both still trusted. The key goes first, then the certificate:
    //    in between the files do not match and the CA keeps signing with the old pair.
    write_atomically(&state.join("ca-key.pem"), &new_key);
    write_atomically(&state.join("ca-cert.pem"), &new_root);
    let chain = signed_until(&client, |c| signed_by(&c[0], &new_root)).await;
    assert_eq!(ders(chain.last().unwrap()).len(), 2, "both roots in step 2");

    // 3. The old root is gone from the bundle.
    write_atomically(&state.join("root-cert.pem"), &new_root);
    let chain = signed_until(&client, |c| ders(c.last().unwrap()).len() == 1).await;
    assert_eq!(ders(chain.last().unwrap()), [der(&new_root)]);
    assert!(signed_by(&chain[0], &new_root));

    // A change that does not load keeps the authority in force.
    write_atomically(&state.join("ca-key.pem"), "not a key");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let chain = sign(&client, NODE_PROXY, false).await.unwrap();
    assert!(signed_by(&chain[0], &new_root));
    local.ca.stop().await;
}

#[tokio::test]
async fn revoked_serials_are_published_as_a_signed_revocation_list() {
    let local = local().await;
    let client = local.ca.client(Some(local.tokens.join("node-1")));
    let chain = sign(&client, REVIEWS, true).await.unwrap();
    let leaf = der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let serial = mesh_node::ca::authority::trim_serial(leaf.raw_serial()).to_vec();
    let listed = |crls: &[Vec<u8>]| {
        let (_, crl) = x509_parser::parse_x509_crl(&crls[0]).unwrap();
        let root = der(&local.ca.root);
        let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
        assert!(
            crl.verify_signature(root.public_key()).is_ok(),
            "signed by the CA"
        );
        crl.iter_revoked_certificates()
            .map(|r| mesh_node::ca::authority::trim_serial(r.raw_serial()).to_vec())
            .collect::<Vec<_>>()
    };
    assert!(listed(&client.revocation_lists().await.unwrap()).is_empty());

    // The operator lists the serial the CA logged (hex), with a comment.
    let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    write_atomically(
        &local.state.join("revoked"),
        &format!("# key of reviews-v1 leaked\n{hex}\nnot-a-serial\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let revoked = listed(&client.revocation_lists().await.unwrap());
        if revoked == [serial.clone()] {
            break;
        }
        assert!(Instant::now() < deadline, "not published: {revoked:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Only callers the CA authenticates get it.
    let stranger = local.ca.client(None);
    assert!(stranger.revocation_lists().await.is_err());
    local.ca.stop().await;
}
