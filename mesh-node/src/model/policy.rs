//! Security policies as users write them: `security.istio.io` `AuthorizationPolicy` and
//! `PeerAuthentication` (v1 and v1beta1 share the schema).
//!
//! Semantics follow Istio: for a workload, CUSTOM policies are checked first, then DENY, then
//! ALLOW; once any ALLOW policy selects a workload, requests no ALLOW rule matches are denied.
//! A policy without `selector` or `targetRefs` applies to every workload of its namespace (of
//! the whole mesh in the root namespace).

use std::{collections::BTreeMap, sync::Arc};

use super::{traffic::IpBlock, Labels, ObjectKey};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub key: ObjectKey,
    /// `None`: every workload of the namespace.
    pub selector: Option<Labels>,
    pub target_refs: Arc<[PolicyTargetRef]>,
    pub action: AuthzAction,
    /// The external authorizer of a CUSTOM policy.
    pub provider: Option<Arc<str>>,
    /// A request matches the policy when any rule matches. No rules: an ALLOW policy matches
    /// nothing (so it denies everything); `rules: [{}]` matches every request.
    pub rules: Arc<[AuthzRule]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl AuthzAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
            AuthzAction::Custom => "CUSTOM",
        }
    }
}

/// `group`/`kind`/`name` of a resource a policy attaches to instead of a selector (a Service or
/// a ServiceEntry; Gateways for ingress).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTargetRef {
    pub group: Arc<str>,
    pub kind: Arc<str>,
    pub name: Arc<str>,
}

/// A rule matches when every listed part matches: any `from`, any `to`, all `when`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzRule {
    pub from: Arc<[Source]>,
    pub to: Arc<[Operation]>,
    pub when: Arc<[Condition]>,
}

/// Who sends the request. Values support Istio's `*`, `prefix*` and `*suffix` forms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// SPIFFE identities without the scheme (`cluster.local/ns/default/sa/productpage`).
    pub principals: Arc<[Arc<str>]>,
    pub not_principals: Arc<[Arc<str>]>,
    /// `issuer/subject` of an authenticated JWT.
    pub request_principals: Arc<[Arc<str>]>,
    pub not_request_principals: Arc<[Arc<str>]>,
    pub namespaces: Arc<[Arc<str>]>,
    pub not_namespaces: Arc<[Arc<str>]>,
    /// The peer address of the connection.
    pub ip_blocks: Arc<[IpBlock]>,
    pub not_ip_blocks: Arc<[IpBlock]>,
    /// The original client address (`X-Forwarded-For`, PROXY protocol).
    pub remote_ip_blocks: Arc<[IpBlock]>,
    pub not_remote_ip_blocks: Arc<[IpBlock]>,
}

/// What the request asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Arc<[Arc<str>]>,
    pub not_hosts: Arc<[Arc<str>]>,
    pub ports: Arc<[u16]>,
    pub not_ports: Arc<[u16]>,
    pub methods: Arc<[Arc<str>]>,
    pub not_methods: Arc<[Arc<str>]>,
    pub paths: Arc<[Arc<str>]>,
    pub not_paths: Arc<[Arc<str>]>,
}

/// `key` is one of Istio's attributes (`request.headers[x-token]`, `source.ip`...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub key: Arc<str>,
    pub values: Arc<[Arc<str>]>,
    pub not_values: Arc<[Arc<str>]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub key: ObjectKey,
    /// `None`: the namespace (or, in the root namespace, the mesh).
    pub selector: Option<Labels>,
    /// `Unset` inherits from the enclosing scope.
    pub mtls: MtlsMode,
    /// Per workload port; only allowed with a selector.
    pub port_level_mtls: BTreeMap<u16, MtlsMode>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}
