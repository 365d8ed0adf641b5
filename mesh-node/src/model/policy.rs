//! Security policies as users write them: `security.istio.io` `AuthorizationPolicy` and
//! `PeerAuthentication` (v1 and v1beta1 share the schema).
//!
//! Semantics follow Istio: for a workload, CUSTOM policies are checked first, then DENY, then
//! ALLOW; once any ALLOW policy selects a workload, requests no ALLOW rule matches are denied.
//! A policy without `selector` or `targetRefs` applies to every workload of its namespace (of
//! the whole mesh in the root namespace).

use std::{collections::BTreeMap, sync::Arc};

use super::{
    telemetry::{DefaultProviders, ExtensionProvider},
    traffic::IpBlock,
    Labels, Map, ObjectKey,
};

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
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
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
    pub paths: Arc<[PathPattern]>,
    pub not_paths: Arc<[PathPattern]>,
}

/// A path of an operation: Istio's string forms (`*`, `prefix*`, `*suffix`, exact), or a
/// template where `{*}` is one non-empty segment and `{**}` (the last operator) any run of
/// characters, `/` included. Templates are compiled once, when the policy is read.
#[derive(Clone, Debug)]
pub struct PathPattern {
    pub text: Arc<str>,
    template: Option<Arc<regex::Regex>>,
}

impl PathPattern {
    pub fn new(text: &str) -> Self {
        let template = (text.contains("{*}") || text.contains("{**}"))
            .then(|| template_regex(text))
            .flatten()
            .map(Arc::new);
        Self {
            text: text.into(),
            template,
        }
    }

    /// The compiled template, for a path with one.
    pub fn template(&self) -> Option<&regex::Regex> {
        self.template.as_deref()
    }
}

impl PartialEq for PathPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for PathPattern {}

fn template_regex(pattern: &str) -> Option<regex::Regex> {
    let mut expression = String::from("^");
    let mut rest = pattern;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("{**}") {
            expression.push_str(".*");
            rest = after;
        } else if let Some(after) = rest.strip_prefix("{*}") {
            expression.push_str("[^/]+");
            rest = after;
        } else {
            let next = rest.find('{').filter(|&i| i > 0).unwrap_or(rest.len());
            expression.push_str(&regex::escape(&rest[..next]));
            rest = &rest[next..];
        }
    }
    expression.push('$');
    regex::Regex::new(&expression).ok()
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

/// The settings of Istio's MeshConfig Weft uses, from the `mesh` key of the `istio` ConfigMap
/// in the root namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshConfig {
    /// `trustDomainAliases`: trust domains AuthorizationPolicy principals read as the mesh's
    /// (Istio's trust domain migration).
    pub trust_domain_aliases: Arc<[Arc<str>]>,
    /// `extensionProviders`: where spans and access logs may be sent.
    pub extension_providers: Arc<[ExtensionProvider]>,
    /// `defaultProviders`: the providers used where no Telemetry names one.
    pub default_providers: DefaultProviders,
    /// `defaultConfig.tracing.sampling`, percent.
    pub default_sampling: Option<f64>,
}

/// Name of the ConfigMap holding the MeshConfig, in the root namespace (Istio's).
pub const MESH_CONFIG_MAP: &str = "istio";

/// The namespace whose selector-less policies apply to the whole mesh, as Istio's default.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The mTLS mode PeerAuthentications give `pod` on its `port`, with Istio's precedence: a
/// workload policy (a selector with labels; its `portLevelMtls` first) over the namespace's
/// over the mesh's (root namespace; a selector without labels counts as none); `UNSET`
/// inherits from the next; among policies of one level the
/// first by name wins (Istio takes the oldest, which the model does not record); PERMISSIVE
/// when nothing decides.
pub fn mtls_mode(
    policies: &Map<ObjectKey, Arc<PeerAuthentication>>,
    namespace: &str,
    labels: &Labels,
    port: u16,
    root_namespace: &str,
) -> MtlsMode {
    let workload = policies
        .values()
        .filter(|p| *p.key.namespace == *namespace)
        .filter(|p| {
            p.selector
                .as_ref()
                .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
        })
        .min_by(|a, b| a.key.cmp(&b.key))
        .map(|p| match p.port_level_mtls.get(&port) {
            Some(mode) if *mode != MtlsMode::Unset => *mode,
            _ => p.mtls,
        });
    let namespace_wide = |ns: &str| {
        policies
            .values()
            // Istio: a selector without labels selects the whole namespace (or mesh).
            .filter(|p| *p.key.namespace == *ns && p.selector.as_ref().is_none_or(Labels::is_empty))
            .min_by(|a, b| a.key.cmp(&b.key))
            .map(|p| p.mtls)
    };
    [
        workload,
        namespace_wide(namespace),
        namespace_wide(root_namespace),
    ]
    .into_iter()
    .flatten()
    .find(|mode| *mode != MtlsMode::Unset)
    .unwrap_or(MtlsMode::Permissive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        namespace: &str,
        name: &str,
        selector: Option<&[(&str, &str)]>,
        mtls: MtlsMode,
        ports: &[(u16, MtlsMode)],
    ) -> PeerAuthentication {
        PeerAuthentication {
            key: ObjectKey::new(namespace, name),
            selector: selector.map(|s| {
                s.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            mtls,
            port_level_mtls: ports.iter().copied().collect(),
        }
    }

    fn labels(app: &str) -> Labels {
        [("app".to_string(), app.to_string())].into()
    }

    #[test]
    fn istio_precedence_workload_over_namespace_over_mesh() {
        use MtlsMode::*;
        let mode = |policies: &[PeerAuthentication], ns: &str, app: &str, port| {
            let policies = policies
                .iter()
                .map(|p| (p.key.clone(), Arc::new(p.clone())))
                .collect();
            mtls_mode(&policies, ns, &labels(app), port, ROOT_NAMESPACE)
        };
        // Nothing: PERMISSIVE, as Istio.
        assert_eq!(mode(&[], "foo", "a", 80), Permissive);

        let mesh = policy(ROOT_NAMESPACE, "default", None, Strict, &[]);
        let foo = policy("foo", "default", None, Permissive, &[]);
        let finance = policy(
            "foo",
            "finance",
            Some(&[("app", "finance")]),
            Unset,
            &[(8080, Disable), (9090, Unset)],
        );
        let all = [mesh.clone(), foo.clone(), finance.clone()];
        assert_eq!(
            mode(std::slice::from_ref(&mesh), "bar", "a", 80),
            Strict,
            "mesh-wide"
        );
        assert_eq!(mode(&all, "bar", "a", 80), Strict, "another namespace");
        assert_eq!(
            mode(&all, "foo", "a", 80),
            Permissive,
            "namespace over mesh"
        );
        assert_eq!(
            mode(&all, "foo", "finance", 8080),
            Disable,
            "port level of the workload"
        );
        assert_eq!(
            mode(&all, "foo", "finance", 9090),
            Permissive,
            "an UNSET port inherits the workload's, which inherits the namespace's"
        );
        assert_eq!(mode(&[mesh, finance], "foo", "finance", 80), Strict);
        // A selector in the root namespace applies to its own workloads only.
        let root_selected = policy(ROOT_NAMESPACE, "a", Some(&[("app", "a")]), Strict, &[]);
        assert_eq!(mode(&[root_selected], "foo", "a", 80), Permissive);
        // An empty selector is namespace-wide (mesh-wide in the root namespace), as in Istio.
        let empty = |ns: &str, mode| policy(ns, "empty", Some(&[]), mode, &[]);
        assert_eq!(
            mode(&[empty(ROOT_NAMESPACE, Strict)], "foo", "a", 80),
            Strict
        );
        assert_eq!(
            mode(
                &[
                    empty("foo", Permissive),
                    policy("foo", "strict", None, Strict, &[])
                ],
                "foo",
                "a",
                80
            ),
            Permissive,
            "two namespace-wide policies: the first by name"
        );
        // Of two namespace-wide policies the first by name decides.
        let b = policy("foo", "b", None, Strict, &[]);
        let a = policy("foo", "a", None, Disable, &[]);
        assert_eq!(mode(&[b, a], "foo", "x", 80), Disable);
    }
}
