//! AuthorizationPolicy enforcement, at the node proxy of the destination pod, for every
//! caller: a meshed pod of another node (its identity proved by mTLS, on the HBONE stream), a
//! meshed pod of this node (its identity vouched for by the kernel: the connection came from
//! its address on this node, captured by its cgroup's hooks) and a client outside the mesh
//! (plaintext on 15006: no principal and no namespace, so only IP rules can allow it).
//!
//! HTTP ports are decided per request, with the request's attributes, against the policies of
//! the view the request reads (a policy change applies to the next request of an open
//! connection); a denied request is answered `403 RBAC: access denied` (gRPC:
//! `PERMISSION_DENIED`). TCP ports are decided once per connection, before the pod is dialled;
//! a denied connection is closed. The decisions themselves are [`crate::model::authz`]'s.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, SocketAddrV4},
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::io::AsyncRead;
use tracing::{debug, info};

use super::{context::Context, detect::Rewind, view::View};
use crate::{
    identity::Identity,
    metrics::AuthzResult,
    model::{
        authz::{self, Attributes, Http, TrustDomains, Verdict},
        policy::{AuthorizationPolicy, AuthzAction},
        ObjectKey, Pod, Snapshot,
    },
};

/// Envoy's answer to a request its RBAC filter denied.
pub(super) const DENIED_BODY: &str = "RBAC: access denied";

/// Who calls, as the destination's proxy knows it.
#[derive(Debug)]
pub(super) struct Peer {
    /// `None`: plaintext.
    identity: Option<Identity>,
    /// `<trust domain>/ns/<namespace>/sa/<service account>`, written on first use (only
    /// workloads with policies need it).
    principal: OnceLock<Option<Box<str>>>,
    ip: IpAddr,
}

impl Peer {
    /// A caller whose identity is proved: by its certificate, or by the kernel on this node.
    pub fn authenticated(identity: &Identity, ip: IpAddr) -> Self {
        Self {
            identity: Some(identity.clone()),
            principal: OnceLock::new(),
            ip,
        }
    }

    /// A plaintext caller: only its address is known.
    pub fn plaintext(ip: IpAddr) -> Self {
        Self {
            identity: None,
            principal: OnceLock::new(),
            ip,
        }
    }

    fn principal(&self) -> Option<&str> {
        self.principal
            .get_or_init(|| {
                self.identity
                    .as_ref()
                    .map(|id| id.principal().into_boxed_str())
            })
            .as_deref()
    }

    fn namespace(&self) -> Option<&str> {
        self.identity.as_ref().map(Identity::namespace)
    }
}

/// What the destination knows of a request or connection besides its caller.
#[derive(Clone, Copy, Debug)]
pub(super) struct Target<'a> {
    pub pod: &'a Pod,
    pub addr: SocketAddrV4,
    /// The TLS server name the client sent, on a TCP connection that starts with TLS.
    pub sni: Option<&'a str>,
}

/// A denied request or connection: Envoy's `rbac_access_denied_matched_policy[...]`, naming
/// the DENY policy that matched, or `none` when ALLOW policies apply and none matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Denied {
    pub detail: String,
}

/// Decides a request (`http`) or a connection (`None`) to `target` from `peer` against the
/// policies of the pod in `view`, and reports the decision.
pub(super) fn check(
    ctx: &Context,
    view: &View,
    target: Target<'_>,
    peer: &Peer,
    http: Option<Http<'_>>,
) -> Result<(), Denied> {
    if view.snapshot.authorization_policies.is_empty() {
        return Ok(());
    }
    // The pod as this view knows it (a connection may have looked it up long ago).
    let pod = view
        .snapshot
        .pods
        .get(&target.pod.key)
        .map_or(target.pod, |p| &**p);
    let Some(policies) = view.policies(pod) else {
        return Ok(());
    };
    let target = Target { pod, ..target };
    let attributes = Attributes {
        principal: peer.principal(),
        namespace: peer.namespace(),
        source_ip: peer.ip,
        // In the mesh the connection's peer is the original client.
        remote_ip: peer.ip,
        destination_ip: IpAddr::V4(*target.addr.ip()),
        destination_port: target.addr.port(),
        sni: target.sni,
        http,
    };
    let aliases = aliases(
        &ctx.config.trust_domain_aliases,
        &view.snapshot.mesh_config.trust_domain_aliases,
    );
    let trust = TrustDomains {
        local: &ctx.config.trust_domain,
        aliases: &aliases,
    };
    let verdict = authz::decide(&policies, &attributes, trust);
    report(ctx, &policies, &verdict, target, peer, http);
    if verdict.allowed {
        return Ok(());
    }
    let matched = verdict
        .policy
        .map_or_else(|| "none".to_owned(), envoy_policy_id);
    Err(Denied {
        detail: format!("rbac_access_denied_matched_policy[{matched}]"),
    })
}

/// The aliases of `--trust-domain-aliases` (`flag`) and of MeshConfig's `trustDomainAliases`
/// (`mesh`).
pub(super) fn aliases<'a>(flag: &'a [Arc<str>], mesh: &'a [Arc<str>]) -> Cow<'a, [Arc<str>]> {
    match (flag.is_empty(), mesh.is_empty()) {
        (_, true) => Cow::Borrowed(flag),
        (true, false) => Cow::Borrowed(mesh),
        (false, false) => Cow::Owned([flag, mesh].concat()),
    }
}

/// Whether the source side enforces the policies of `pod`: a meshed pod of this node, which
/// this proxy dials directly (no destination proxy sees the request). A sidecar leaves it to
/// the destination's sidecar.
pub(super) fn at_source(ctx: &Context, snapshot: &Snapshot, pod: &Pod) -> bool {
    !ctx.config.sidecar && pod.node.as_deref() == Some(&*ctx.config.node) && snapshot.is_meshed(pod)
}

/// How long a TCP client has to send its TLS ClientHello, where a policy of its destination
/// tests `connection.sni` (a client that starts with something else is answered at once).
pub(super) const SNI_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a policy of `pod` tests `connection.sni`: only then is a TCP client's ClientHello
/// read before the connection is decided.
pub(super) fn wants_sni(view: &View, pod: &Pod) -> bool {
    view.policies(pod).is_some_and(|policies| {
        policies.iter().any(|p| {
            p.rules
                .iter()
                .any(|r| r.when.iter().any(|c| &*c.key == "connection.sni"))
        })
    })
}

/// The TLS server name a TCP client of `pod` starts with, read (and kept for replay) only
/// where one of the pod's policies tests it.
pub(super) async fn sni_for<S: AsyncRead + Unpin>(
    ctx: &Context,
    pod: Option<&Arc<Pod>>,
    downstream: &mut Rewind<S>,
) -> Option<String> {
    let pod = pod?;
    if !wants_sni(&ctx.view(), pod) {
        return None;
    }
    downstream.peek_sni(SNI_TIMEOUT).await
}

/// What a log line says of the request or connection decided.
struct RequestLine<'a>(Option<Http<'a>>);

impl fmt::Display for RequestLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => write!(f, "{} {}{}", h.method, h.host, h.path),
            None => f.write_str("connection"),
        }
    }
}

/// Istio's name for a policy in Envoy's RBAC configuration: `ns[foo]-policy[deny-admin]`.
fn envoy_policy_id(key: &ObjectKey) -> String {
    format!("ns[{}]-policy[{}]", key.namespace, key.name)
}

/// Counts the decision and logs what operators need to see: denials, what AUDIT policies
/// matched and what dry-run policies would have decided.
fn report(
    ctx: &Context,
    policies: &[Arc<AuthorizationPolicy>],
    verdict: &Verdict<'_>,
    target: Target<'_>,
    peer: &Peer,
    http: Option<Http<'_>>,
) {
    let metrics = &ctx.authz;
    let name = |key: Option<&ObjectKey>| key.map(ToString::to_string);
    let enforced = |action| policies.iter().any(|p| !p.dry_run && p.action == action);
    let request = RequestLine(http);
    let log = |what: &str, policy: Option<&ObjectKey>| {
        debug!(
            pod = %target.pod.key,
            principal = peer.principal().unwrap_or("-"),
            source = %peer.ip,
            %request,
            policy = policy.map_or_else(|| "none".to_owned(), ToString::to_string),
            "{what}"
        );
    };
    match (verdict.allowed, verdict.policy) {
        (false, Some(key)) => {
            metrics.inc("DENY", name(Some(key)).as_deref(), AuthzResult::Denied);
            log("authorization denied", Some(key));
        }
        (false, None) => {
            metrics.inc("ALLOW", None, AuthzResult::Denied);
            log("authorization denied: no ALLOW policy matched", None);
        }
        (true, Some(key)) => metrics.inc("ALLOW", name(Some(key)).as_deref(), AuthzResult::Allowed),
        (true, None) if enforced(AuthzAction::Deny) => {
            metrics.inc("DENY", None, AuthzResult::Allowed);
        }
        (true, None) => {}
    }
    for key in &verdict.audited {
        metrics.inc("AUDIT", name(Some(key)).as_deref(), AuthzResult::Audited);
        log("authorization audited", Some(key));
    }
    for (action, shadow) in [
        ("DENY", &verdict.dry_run_deny),
        ("ALLOW", &verdict.dry_run_allow),
    ] {
        let Some(shadow) = shadow else {
            continue;
        };
        let result = if shadow.allowed {
            AuthzResult::DryRunAllowed
        } else {
            AuthzResult::DryRunDenied
        };
        metrics.inc(action, name(shadow.policy).as_deref(), result);
        if !shadow.allowed {
            info!(
                pod = %target.pod.key,
                principal = peer.principal().unwrap_or("-"),
                source = %peer.ip,
                %request,
                policy = shadow.policy.map_or_else(|| "none".to_owned(), ToString::to_string),
                "dry run: {action} policies would have denied this"
            );
        }
    }
}
