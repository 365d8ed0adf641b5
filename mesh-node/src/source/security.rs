//! Translation of `security.istio.io` resources (`AuthorizationPolicy`, `PeerAuthentication`)
//! with Istio's validation (`ValidateAuthorizationPolicy`, `ValidatePeerAuthentication` and
//! `pkg/config/security`).

use std::{collections::BTreeMap, sync::Arc};

use super::yaml::{Mapping, Value};
use super::{
    fields::{at, ip_blocks, metadata, one_of, show, workload_selector, FieldError, Fields},
    validate,
};
use crate::model::{
    policy::{
        AuthorizationPolicy, AuthzAction, AuthzRule, Condition, MeshConfig, MtlsMode, Operation,
        PathPattern, PeerAuthentication, PolicyTargetRef, Source,
    },
    ObjectKey,
};

type Result<T> = std::result::Result<T, FieldError>;

/// The annotation that makes an AuthorizationPolicy a dry run.
const DRY_RUN: &str = "istio.io/dry-run";

/// Why request principals and `request.auth.*` conditions are refused.
const UNSUPPORTED_JWT: &str = "needs JWT authentication (RequestAuthentication), which Weft does not support yet: the policy is refused rather than enforced without it";

static NULL: Value = Value::Null;

const SOURCE_FIELDS: [&str; 10] = [
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

const OPERATION_FIELDS: [&str; 8] = [
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

pub(super) fn authorization_policy(fields: &Fields<'_>) -> Result<AuthorizationPolicy> {
    let meta = metadata(fields, true)?;
    let empty = Mapping::new();
    let spec = match fields.obj("spec")? {
        Some(spec) => spec,
        // No spec is `spec: {}`: an ALLOW policy without rules, which denies everything.
        None => Fields {
            map: &empty,
            value: &NULL,
            path: "spec".into(),
        },
    };

    let selector = workload_selector(&spec, "selector")?;
    let mut target_refs = Vec::new();
    if let Some(target) = spec.obj("targetRef")? {
        target_refs.push(target_ref(&target)?);
    }
    for target in spec.list("targetRefs")? {
        target_refs.push(target_ref(&target)?);
    }
    let kinds = [
        selector.is_some(),
        spec.has("targetRef"),
        !spec.seq("targetRefs")?.is_empty(),
    ];
    if kinds.iter().filter(|set| **set).count() > 1 {
        return Err(spec.error(
            "targetRefs",
            "only one of targetRefs or workloadSelector can be set",
        ));
    }

    let action = one_of(
        &spec,
        "action",
        &[
            ("ALLOW", AuthzAction::Allow),
            ("DENY", AuthzAction::Deny),
            ("AUDIT", AuthzAction::Audit),
            ("CUSTOM", AuthzAction::Custom),
        ],
    )?
    .unwrap_or(AuthzAction::Allow);
    let provider = match spec.obj("provider")? {
        Some(p) => Some(p.str("name")?.unwrap_or_default()),
        None => None,
    };
    let has_rules = !spec.seq("rules")?.is_empty();
    match action {
        AuthzAction::Custom if !has_rules => {
            return Err(spec.error(
                "rules",
                "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
            ))
        }
        AuthzAction::Custom if provider.is_none_or(str::is_empty) => {
            return Err(spec.error("provider.name", "`provider.name` must not be empty"))
        }
        AuthzAction::Deny if !has_rules => {
            return Err(spec.error(
                "rules",
                "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
            ))
        }
        AuthzAction::Allow | AuthzAction::Deny | AuthzAction::Audit if provider.is_some() => {
            return Err(spec.error(
                "provider",
                format!("`provider` must not be with non CUSTOM action, found {}", action.as_str()),
            ))
        }
        _ => {}
    }

    let rules = spec
        .list("rules")?
        .iter()
        .map(|rule| authz_rule(rule, action))
        .collect::<Result<_>>()?;
    if action == AuthzAction::Custom {
        return Err(spec.error(
            "action",
            "CUSTOM (external authorization) is not supported: Weft has no ext-authz provider, and the policy is refused rather than ignored",
        ));
    }
    // Istio's `validateDryRunAnnotation`: a boolean (CUSTOM, where Istio refuses it, is
    // refused above).
    let annotation = format!("metadata.annotations[{DRY_RUN}]");
    let dry_run = match meta.annotations.get(DRY_RUN).map(String::as_str) {
        None => false,
        Some("true" | "True" | "TRUE" | "1" | "t" | "T") if action == AuthzAction::Audit => {
            return at(
                &annotation,
                Err("dry-run is only supported with ALLOW and DENY actions".into()),
            )
        }
        Some("true" | "True" | "TRUE" | "1" | "t" | "T") => true,
        Some("false" | "False" | "FALSE" | "0" | "f" | "F") => false,
        Some(value) => {
            return at(
                &annotation,
                Err(format!("invalid (expected a boolean): {value:?}")),
            )
        }
    };
    Ok(AuthorizationPolicy {
        key: ObjectKey {
            namespace: meta.namespace,
            name: meta.name,
        },
        selector,
        target_refs: target_refs.into(),
        action,
        provider: provider.filter(|p| !p.is_empty()).map(Arc::from),
        rules,
        dry_run,
    })
}

/// What stands in force for an AuthorizationPolicy Weft refuses, when no earlier version of it
/// does. Like Istio with a policy it cannot honour, it fails closed: a DENY (or a CUSTOM, which
/// exists to deny) denies every request and connection of its workloads, an ALLOW matches
/// none (so what no other ALLOW policy allows is denied). AUDIT and dry-run policies decide
/// nothing, so nothing stands for them; nor when even the policy's scope (metadata,
/// selector, targetRefs) or action cannot be read.
pub(super) fn refused_authorization_policy(fields: &Fields<'_>) -> Option<AuthorizationPolicy> {
    let meta = metadata(fields, true).ok()?;
    // Only a valid `true` makes it a dry run; anything else fails closed.
    let dry_run = meta
        .annotations
        .get(DRY_RUN)
        .is_some_and(|v| matches!(v.as_str(), "true" | "True" | "TRUE" | "1" | "t" | "T"));
    let spec = fields.obj("spec").ok()??;
    let selector = workload_selector(&spec, "selector").ok()?;
    let mut target_refs = Vec::new();
    if let Some(target) = spec.obj("targetRef").ok()? {
        target_refs.push(target_ref(&target).ok()?);
    }
    for target in spec.list("targetRefs").ok()? {
        target_refs.push(target_ref(&target).ok()?);
    }
    let action = match spec.str("action").ok()?.unwrap_or("ALLOW") {
        "ALLOW" => AuthzAction::Allow,
        "DENY" | "CUSTOM" => AuthzAction::Deny,
        _ => return None,
    };
    if dry_run {
        return None;
    }
    let rules: Arc<[AuthzRule]> = match action {
        AuthzAction::Deny => Arc::from([AuthzRule::default()]),
        _ => Arc::from([]),
    };
    Some(AuthorizationPolicy {
        key: ObjectKey {
            namespace: meta.namespace,
            name: meta.name,
        },
        selector,
        target_refs: target_refs.into(),
        action,
        provider: None,
        rules,
        dry_run: false,
    })
}

/// Istio's `validatePolicyTargetReference`: a Service, a ServiceEntry or a Gateway of the
/// policy's own namespace.
fn target_ref(target: &Fields<'_>) -> Result<PolicyTargetRef> {
    let name = target.str("name")?.unwrap_or_default();
    if name.is_empty() {
        return Err(target.error("name", "targetRef name must be set"));
    }
    if target.str("namespace")?.is_some_and(|ns| !ns.is_empty()) {
        return Err(target.error(
            "namespace",
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        ));
    }
    let group = target.str("group")?.unwrap_or_default();
    let kind = target.str("kind")?.unwrap_or_default();
    let allowed = matches!(
        (group, kind),
        ("" | "core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | ("gateway.networking.k8s.io", "Gateway")
    );
    if !allowed {
        return Err(target.error(
            "kind",
            format!("targetRef must be to a Service, a ServiceEntry or a Gateway but was {group}/{kind}"),
        ));
    }
    // Istio enforces these at waypoints and gateways; Weft's node proxy is its pods' waypoint
    // for a Service, and has no gateway or ServiceEntry workloads to attach the others to.
    if kind != "Service" {
        return Err(target.error(
            "kind",
            format!("targetRef to a {kind} is not supported by Weft: only a Service (the policy applies to its pods)"),
        ));
    }
    Ok(PolicyTargetRef {
        // `core` is the core group's other name.
        group: "".into(),
        kind: kind.into(),
        name: name.into(),
    })
}

fn non_empty_values(fields: &Fields<'_>, key: &str) -> Result<Arc<[Arc<str>]>> {
    fields
        .str_list(key)?
        .into_iter()
        .map(|(path, s)| {
            if s.is_empty() {
                at(
                    &path,
                    Err(format!("empty value not allowed, found in {key}")),
                )
            } else {
                Ok(Arc::from(s))
            }
        })
        .collect()
}

fn ports(fields: &Fields<'_>, key: &str) -> Result<Arc<[u16]>> {
    fields
        .str_list(key)?
        .into_iter()
        .map(|(path, s)| {
            let port = s
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0 && s.bytes().all(|b| b.is_ascii_digit()));
            at(
                &path,
                port.ok_or_else(|| {
                    format!("bad port ({s}): expected a port number (1-65535) as a string")
                }),
            )
        })
        .collect()
}

/// Istio's `CheckValidPathTemplate`: in a path with a template, each `{*}` and one final
/// `{**}` stand for whole segments, and no other `{`, `}` or `*` appears.
fn path_template(path: &str) -> std::result::Result<(), String> {
    if !path.contains("{*}") && !path.contains("{**}") {
        return Ok(());
    }
    let mut match_any = false;
    for glob in path.trim_matches('/').split('/') {
        match glob {
            "{*}" if !match_any => {}
            "{**}" if !match_any => match_any = true,
            _ if glob.contains(['{', '}']) => {
                return Err(format!(
                    "{path:?}: invalid or unsupported path template: '{{' or '}}' beyond a supported template ({{**}} must be the last operator)"
                ))
            }
            _ if glob.contains('*') => {
                return Err(format!(
                    "{path:?}: invalid or unsupported path template: '*' beyond a supported template"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

fn authz_rule(rule: &Fields<'_>, action: AuthzAction) -> Result<AuthzRule> {
    let custom_unsupported = |fields: &Fields<'_>, key: &str| -> Result<()> {
        if action == AuthzAction::Custom && !fields.seq(key)?.is_empty() {
            return Err(fields.error(
                key,
                format!("{key} is currently not supported with CUSTOM action"),
            ));
        }
        Ok(())
    };
    if rule.has("from") && rule.seq("from")?.is_empty() {
        return Err(rule.error("from", "`from` must not be empty"));
    }
    let from = rule
        .list("from")?
        .iter()
        .map(|from| {
            let Some(source) = from.obj("source")? else {
                return Err(from.error("source", "`from.source` must not be nil"));
            };
            // Fields of newer Istio versions, not matched yet: refused by name rather than
            // dropped (a source naming only them would otherwise match everyone).
            for key in [
                "serviceAccounts",
                "notServiceAccounts",
                "trustDomains",
                "notTrustDomains",
            ] {
                if source.has(key) {
                    return Err(source.error(key, "not supported by Weft yet"));
                }
            }
            if !SOURCE_FIELDS
                .iter()
                .any(|k| !source.seq(k).map(<[Value]>::is_empty).unwrap_or(true))
            {
                return Err(FieldError {
                    field: source.path.clone(),
                    reason: "`from.source` must not be empty".into(),
                });
            }
            for key in [
                "namespaces",
                "notNamespaces",
                "principals",
                "notPrincipals",
                "requestPrincipals",
                "notRequestPrincipals",
            ] {
                custom_unsupported(&source, key)?;
            }
            for key in [
                "ipBlocks",
                "notIpBlocks",
                "remoteIpBlocks",
                "notRemoteIpBlocks",
            ] {
                for (path, s) in source.str_list(key)? {
                    if s.is_empty() {
                        return at(
                            &path,
                            Err(format!("empty value not allowed, found in {key}")),
                        );
                    }
                }
            }
            // Istio takes them from a JWT a RequestAuthentication verified; Weft verifies
            // none, so a rule naming them would never be what its author meant.
            for key in ["requestPrincipals", "notRequestPrincipals"] {
                if !source.seq(key)?.is_empty() {
                    return Err(source.error(key, UNSUPPORTED_JWT));
                }
            }
            Ok(Source {
                principals: non_empty_values(&source, "principals")?,
                not_principals: non_empty_values(&source, "notPrincipals")?,
                request_principals: non_empty_values(&source, "requestPrincipals")?,
                not_request_principals: non_empty_values(&source, "notRequestPrincipals")?,
                namespaces: non_empty_values(&source, "namespaces")?,
                not_namespaces: non_empty_values(&source, "notNamespaces")?,
                ip_blocks: ip_blocks(&source, "ipBlocks")?,
                not_ip_blocks: ip_blocks(&source, "notIpBlocks")?,
                remote_ip_blocks: ip_blocks(&source, "remoteIpBlocks")?,
                not_remote_ip_blocks: ip_blocks(&source, "notRemoteIpBlocks")?,
            })
        })
        .collect::<Result<_>>()?;

    if rule.has("to") && rule.seq("to")?.is_empty() {
        return Err(rule.error("to", "`to` must not be empty"));
    }
    let to = rule
        .list("to")?
        .iter()
        .map(|to| {
            let Some(op) = to.obj("operation")? else {
                return Err(to.error("operation", "`to.operation` must not be nil"));
            };
            if !OPERATION_FIELDS
                .iter()
                .any(|k| !op.seq(k).map(<[Value]>::is_empty).unwrap_or(true))
            {
                return Err(FieldError {
                    field: op.path.clone(),
                    reason: "`to.operation` must not be empty".into(),
                });
            }
            let paths = |key: &str| -> Result<Arc<[PathPattern]>> {
                let list = non_empty_values(&op, key)?;
                for (i, p) in list.iter().enumerate() {
                    at(&op.path(&format!("{key}[{i}]")), path_template(p))?;
                }
                Ok(list.iter().map(|p| PathPattern::new(p)).collect())
            };
            Ok(Operation {
                hosts: non_empty_values(&op, "hosts")?,
                not_hosts: non_empty_values(&op, "notHosts")?,
                ports: ports(&op, "ports")?,
                not_ports: ports(&op, "notPorts")?,
                methods: non_empty_values(&op, "methods")?,
                not_methods: non_empty_values(&op, "notMethods")?,
                paths: paths("paths")?,
                not_paths: paths("notPaths")?,
            })
        })
        .collect::<Result<_>>()?;

    let when = rule
        .list("when")?
        .iter()
        .map(|c| {
            let key = c.str("key")?.unwrap_or_default();
            if key.is_empty() {
                return Err(c.error("key", "`key` must not be empty"));
            }
            if action == AuthzAction::Custom
                && (key == "source.namespace"
                    || key == "source.principal"
                    || key.starts_with("request.auth."))
            {
                return Err(c.error(
                    "key",
                    format!("{key} is currently not supported with CUSTOM action"),
                ));
            }
            let values = c.str_list("values")?;
            let not_values = c.str_list("notValues")?;
            if values.is_empty() && not_values.is_empty() {
                return Err(c.error(
                    "values",
                    format!("at least one of `values` or `notValues` must be set for key {key}"),
                ));
            }
            let rule = check_key(key).map_err(|reason| c.error("key", reason))?;
            for (list, what) in [(&values, "value"), (&not_values, "notValue")] {
                for (path, value) in list.iter() {
                    if let Err(reason) = check_value(key, rule, value) {
                        return at(
                            path,
                            Err(format!("invalid `{what}` for `key` {key}: {reason}")),
                        );
                    }
                }
            }
            if key.starts_with("request.auth.") {
                return Err(c.error("key", format!("{key}: {UNSUPPORTED_JWT}")));
            }
            if key.starts_with("experimental.") {
                return Err(c.error(
                    "key",
                    format!("{key}: Envoy filter metadata, which Weft's proxy does not have"),
                ));
            }
            Ok(Condition {
                key: key.into(),
                values: values.into_iter().map(|(_, s)| Arc::from(s)).collect(),
                not_values: not_values.into_iter().map(|(_, s)| Arc::from(s)).collect(),
            })
        })
        .collect::<Result<_>>()?;

    Ok(AuthzRule { from, to, when })
}

/// What the values of a condition must be.
#[derive(Clone, Copy)]
enum ValueRule {
    Any,
    Ip,
    Port,
}

/// The key half of Istio's `security.ValidateAttribute`.
fn check_key(key: &str) -> std::result::Result<ValueRule, String> {
    let map_key = || match key.find('[') {
        Some(open) if key.ends_with(']') && open > 0 && open + 2 < key.len() => Ok(ValueRule::Any),
        _ => Err(format!("bad key ({key}): should have format a[b]")),
    };
    match key {
        _ if key.starts_with("request.headers") => map_key(),
        "source.ip" | "remote.ip" | "destination.ip" => Ok(ValueRule::Ip),
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(ValueRule::Any),
        _ if key.starts_with("request.auth.claims") => map_key(),
        "destination.port" => Ok(ValueRule::Port),
        _ if key.starts_with("experimental.envoy.filters.") => map_key(),
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        _ if key.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => Err(format!("unknown attribute: {key}")),
    }
}

/// The value half of Istio's `security.ValidateAttribute`.
fn check_value(key: &str, rule: ValueRule, value: &str) -> std::result::Result<(), String> {
    if value.is_empty() {
        return Err(format!("empty value not allowed, found in {key}"));
    }
    match rule {
        ValueRule::Any => Ok(()),
        ValueRule::Ip => validate::ip_or_cidr(value)
            .map(|_| ())
            .map_err(|_| format!("bad IP address or CIDR range ({value})")),
        ValueRule::Port => value
            .parse::<u16>()
            .map(|_| ())
            .map_err(|_| format!("bad port ({value})")),
    }
}

/// Istio's MeshConfig, from the `mesh` key (YAML) of the `istio` ConfigMap in the root
/// namespace. Weft reads `trustDomainAliases` and the telemetry settings
/// (`extensionProviders`, `defaultProviders`, `defaultConfig.tracing.sampling`); the mesh's own
/// `trustDomain` is the nodes' `--trust-domain` (their certificates carry it), and the other
/// settings are not used.
pub(super) fn mesh_config(fields: &Fields<'_>) -> Result<MeshConfig> {
    let data = fields.obj("data")?;
    let Some(text) = data.as_ref().map(|d| d.str("mesh")).transpose()?.flatten() else {
        return Ok(MeshConfig::default());
    };
    let value = super::yaml::parse(text)
        .map_err(|e| fields.error("data.mesh", format!("not valid YAML: {e}")))?;
    if value.is_null() {
        return Ok(MeshConfig::default());
    }
    let mesh = Fields::root(&value, "data.mesh")?;
    let mut aliases: Vec<Arc<str>> = Vec::new();
    for (path, alias) in mesh.str_list("trustDomainAliases")? {
        let valid = !alias.is_empty()
            && alias.len() <= 255
            && alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*'));
        if !valid {
            return Err(FieldError {
                field: path,
                reason: format!("{alias:?} is not a trust domain"),
            });
        }
        aliases.push(alias.into());
    }
    let mut extension_providers = super::telemetry::extension_providers(&mesh)?;
    let mut default_providers = super::telemetry::default_providers(&mesh)?;
    if let Some(envoy) = super::telemetry::access_log_file(&mesh)? {
        // The classic switch configures the built-in provider (unless one is defined under
        // its name) and turns it on for every workload.
        if !extension_providers.iter().any(|p| p.name == envoy.name) {
            extension_providers.push(envoy.clone());
        }
        if !default_providers.access_logging.contains(&envoy.name) {
            let mut names = default_providers.access_logging.to_vec();
            names.push(envoy.name);
            default_providers.access_logging = names.into();
        }
    }
    Ok(MeshConfig {
        trust_domain_aliases: aliases.into(),
        extension_providers: extension_providers.into(),
        default_providers,
        default_sampling: super::telemetry::default_sampling(&mesh)?,
    })
}

pub(super) fn peer_authentication(fields: &Fields<'_>) -> Result<PeerAuthentication> {
    let meta = metadata(fields, true)?;
    let empty = Mapping::new();
    let spec = match fields.obj("spec")? {
        Some(spec) => spec,
        None => Fields {
            map: &empty,
            value: &NULL,
            path: "spec".into(),
        },
    };
    let selector = workload_selector(&spec, "selector")?;
    let mode = |f: &Fields<'_>| -> Result<MtlsMode> {
        Ok(one_of(
            f,
            "mode",
            &[
                ("UNSET", MtlsMode::Unset),
                ("DISABLE", MtlsMode::Disable),
                ("PERMISSIVE", MtlsMode::Permissive),
                ("STRICT", MtlsMode::Strict),
            ],
        )?
        .unwrap_or_default())
    };
    let mtls = match spec.obj("mtls")? {
        Some(m) => mode(&m)?,
        None => MtlsMode::Unset,
    };

    let mut port_level_mtls = BTreeMap::new();
    if let Some(value) = spec.get("portLevelMtls") {
        let Value::Mapping(map) = value else {
            return Err(spec.error(
                "portLevelMtls",
                format!("expected a mapping, found {}", show(value)),
            ));
        };
        if map.is_empty() {
            return Err(spec.error(
                "portLevelMtls",
                "port level mTLS, if defined, must have at least one element",
            ));
        }
        if selector.as_ref().is_none_or(|s| s.is_empty()) {
            return Err(spec.error(
                "portLevelMtls",
                "mesh/namespace peer authentication cannot have port level mTLS",
            ));
        }
        for (port, settings) in map {
            let shown = match port {
                Value::String(s) => s.clone(),
                other => show(other),
            };
            let path = format!("portLevelMtls.{shown}");
            let number = match port {
                Value::Number(n) => n.as_u64(),
                Value::String(s) if s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
                _ => None,
            }
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| spec.error(&path, "port must be in range 1..65535"))?;
            let Value::Mapping(settings) = settings else {
                return Err(spec.error(
                    &path,
                    format!("expected a mapping, found {}", show(settings)),
                ));
            };
            let settings = Fields {
                map: settings,
                value: &NULL,
                path: spec.path(&path),
            };
            port_level_mtls.insert(number, mode(&settings)?);
        }
    }
    Ok(PeerAuthentication {
        key: ObjectKey {
            namespace: meta.namespace,
            name: meta.name,
        },
        selector,
        mtls,
        port_level_mtls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::traffic::IpBlock,
        source::{
            objects::{assert_rejected, translate_one},
            Object,
        },
    };

    fn policy(yaml: &str) -> Arc<AuthorizationPolicy> {
        match translate_one(yaml) {
            Ok(Object::AuthorizationPolicy(p)) => p,
            other => panic!("expected an AuthorizationPolicy, got {other:?}"),
        }
    }

    fn peer(yaml: &str) -> Arc<PeerAuthentication> {
        match translate_one(yaml) {
            Ok(Object::PeerAuthentication(p)) => p,
            other => panic!("expected a PeerAuthentication, got {other:?}"),
        }
    }

    #[test]
    fn istio_reference_authorization_policy() {
        let p = policy(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*", "/api/{*}/items"]
        ports: ["8080"]
    when:
    - key: request.headers[x-token]
      values: ["admin"]
  - from:
    - source:
        ipBlocks: ["10.1.0.0/16", "192.0.2.1"]
        notRemoteIpBlocks: ["203.0.113.0/24"]
    to:
    - operation:
        notPaths: ["/healthz"]
"#,
        );
        assert_eq!(p.key, ObjectKey::new("foo", "httpbin"));
        assert_eq!(p.action, AuthzAction::Allow);
        assert_eq!(p.selector.as_ref().unwrap()["app"], "httpbin");
        assert_eq!(p.rules.len(), 2);
        let rule = &p.rules[0];
        assert_eq!(
            &*rule.from[0].principals,
            [Arc::from("cluster.local/ns/default/sa/sleep")]
        );
        assert_eq!(&*rule.from[1].namespaces, [Arc::from("dev")]);
        assert_eq!(&*rule.to[0].methods, [Arc::from("GET")]);
        assert_eq!(&*rule.to[0].ports, [8080]);
        assert_eq!(&*rule.when[0].key, "request.headers[x-token]");
        let source = &p.rules[1].from[0];
        assert_eq!(
            &*source.ip_blocks,
            [
                "10.1.0.0/16".parse::<IpBlock>().unwrap(),
                "192.0.2.1/32".parse().unwrap()
            ]
        );
        assert_eq!(source.not_remote_ip_blocks.len(), 1);
        assert_eq!(&*p.rules[1].to[0].not_paths, [PathPattern::new("/healthz")]);
    }

    #[test]
    fn allow_nothing_allow_all_and_deny() {
        // Istio's documented patterns: `spec: {}` denies everything in the namespace,
        // `rules: [{}]` allows everything, DENY needs rules.
        let nothing = policy("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: foo}\nspec: {}");
        assert_eq!(nothing.action, AuthzAction::Allow);
        assert!(nothing.rules.is_empty());
        assert!(nothing.selector.is_none());

        let all = policy("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: foo}\nspec: {rules: [{}]}");
        assert_eq!(&*all.rules, [AuthzRule::default()]);

        let deny = policy(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-method-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to:
    - operation: {methods: ["GET"], paths: ["/get"]}
    when:
    - key: request.headers[x-token]
      notValues: ["admin"]
    - key: source.ip
      values: ["10.0.0.0/8"]
"#,
        );
        assert_eq!(deny.action, AuthzAction::Deny);
        assert_eq!(&*deny.rules[0].when[0].not_values, [Arc::from("admin")]);

        // What Weft cannot enforce is refused, naming the field, never ignored: external
        // authorization, and anything that needs a verified JWT.
        let ap = |spec: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext-authz, namespace: foo}}\nspec: {spec}")
        };
        for (spec, field, reason) in [
            ("{action: CUSTOM, provider: {name: my-ext-authz}, rules: [{to: [{operation: {paths: [/admin]}}]}]}", "spec.action", "CUSTOM (external authorization) is not supported"),
            ("{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}", "spec.rules[0].from[0].source.requestPrincipals", "needs JWT authentication"),
            ("{rules: [{from: [{source: {notRequestPrincipals: [a/b]}}]}]}", "spec.rules[0].from[0].source.notRequestPrincipals", "needs JWT authentication"),
            ("{rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "spec.rules[0].when[0].key", "needs JWT authentication"),
            ("{rules: [{when: [{key: 'experimental.envoy.filters.a[b]', values: [x]}]}]}", "spec.rules[0].when[0].key", "does not have"),
        ] {
            assert_rejected(&ap(spec), "AuthorizationPolicy", "foo/ext-authz", field, reason);
        }
    }

    #[test]
    fn the_dry_run_annotation_is_a_boolean_and_not_for_custom() {
        let ap = |annotation: &str, spec: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: httpbin, namespace: foo, annotations: {{istio.io/dry-run: '{annotation}'}}}}\nspec: {spec}")
        };
        assert!(policy(&ap("true", "{rules: [{}]}")).dry_run);
        assert!(!policy(&ap("false", "{rules: [{}]}")).dry_run);
        assert!(!policy("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: foo}\nspec: {}").dry_run);
        let field = "metadata.annotations[istio.io/dry-run]";
        assert_rejected(
            &ap("true", "{action: AUDIT, rules: [{}]}"),
            "AuthorizationPolicy",
            "foo/httpbin",
            field,
            "only supported with ALLOW and DENY",
        );
        assert_rejected(
            &ap("yes", "{rules: [{}]}"),
            "AuthorizationPolicy",
            "foo/httpbin",
            field,
            "expected a boolean",
        );
    }

    #[test]
    fn bad_authorization_policy_fields_are_named() {
        let ap = |spec: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: httpbin, namespace: foo}}\nspec: {spec}")
        };
        for (spec, field, reason) in [
            ("{action: REJECT}", "spec.action", "expected one of ALLOW, DENY, AUDIT, CUSTOM"),
            ("{action: allow}", "spec.action", "found \"allow\""),
            ("{action: DENY}", "spec.rules", "DENY action without `rules`"),
            ("{action: CUSTOM, rules: [{}]}", "spec.provider.name", "must not be empty"),
            ("{provider: {name: x}, rules: [{}]}", "spec.provider", "non CUSTOM action"),
            ("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}", "spec.rules[0].from[0].source.ipBlocks[0]", "not a valid CIDR block"),
            ("{rules: [{from: [{source: {remoteIpBlocks: [not-an-ip]}}]}]}", "spec.rules[0].from[0].source.remoteIpBlocks[0]", "not a valid IP"),
            ("{rules: [{from: [{source: {principals: ['']}}]}]}", "spec.rules[0].from[0].source.principals[0]", "empty value not allowed"),
            ("{rules: [{from: [{}]}]}", "spec.rules[0].from[0].source", "must not be nil"),
            ("{rules: [{from: [{source: {}}]}]}", "spec.rules[0].from[0].source", "must not be empty"),
            ("{rules: [{from: []}]}", "spec.rules[0].from", "must not be empty"),
            ("{rules: [{to: [{operation: {ports: [http]}}]}]}", "spec.rules[0].to[0].operation.ports[0]", "bad port (http)"),
            ("{rules: [{to: [{operation: {ports: [8080]}}]}]}", "spec.rules[0].to[0].operation.ports[0]", "expected a string"),
            ("{rules: [{to: [{operation: {notPorts: ['70000']}}]}]}", "spec.rules[0].to[0].operation.notPorts[0]", "bad port"),
            ("{rules: [{to: [{operation: {paths: ['/{name}/x{*}']}}]}]}", "spec.rules[0].to[0].operation.paths[0]", "unsupported path template"),
            ("{rules: [{to: [{operation: {paths: ['/{**}/foo/{*}']}}]}]}", "spec.rules[0].to[0].operation.paths[0]", "must be the last operator"),
            ("{rules: [{to: [{operation: {paths: ['/foo/{*}.txt']}}]}]}", "spec.rules[0].to[0].operation.paths[0]", "beyond a supported template"),
            ("{rules: [{to: [{operation: {paths: ['/foo/*/{*}']}}]}]}", "spec.rules[0].to[0].operation.paths[0]", "'*' beyond a supported template"),
            ("{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]}", "spec.targetRefs[0].kind", "not supported by Weft"),
            ("{rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}", "spec.rules[0].from[0].source.serviceAccounts", "not supported by Weft yet"),
            ("{rules: [{from: [{source: {namespaces: [foo], trustDomains: [td]}}]}]}", "spec.rules[0].from[0].source.trustDomains", "not supported by Weft yet"),
            ("{rules: [{to: [{operation: {}}]}]}", "spec.rules[0].to[0].operation", "must not be empty"),
            ("{rules: [{when: [{key: request.weather, values: [sunny]}]}]}", "spec.rules[0].when[0].key", "unknown attribute: request.weather"),
            ("{rules: [{when: [{key: source.ip, values: [10.0.0.1, 10.0.0.300]}]}]}", "spec.rules[0].when[0].values[1]", "bad IP address"),
            ("{rules: [{when: [{key: destination.port, notValues: [http]}]}]}", "spec.rules[0].when[0].notValues[0]", "bad port"),
            ("{rules: [{when: [{key: 'request.headers[]', values: [x]}]}]}", "spec.rules[0].when[0].key", "should have format a[b]"),
            ("{rules: [{when: [{key: destination.namespace, notValues: [x]}]}]}", "spec.rules[0].when[0].key", "replaced by the metadata.namespace"),
            ("{rules: [{when: [{key: source.ip}]}]}", "spec.rules[0].when[0].values", "at least one of `values` or `notValues`"),
            ("{rules: [{when: [{values: [x]}]}]}", "spec.rules[0].when[0].key", "must not be empty"),
            ("{action: CUSTOM, provider: {name: x}, rules: [{from: [{source: {principals: [a]}}]}]}", "spec.rules[0].from[0].source.principals", "not supported with CUSTOM"),
            ("{selector: {matchLabels: {app: '*'}}}", "spec.selector.matchLabels.app", "wildcard is not supported"),
            ("{selector: {matchLabels: {app: a}}, targetRef: {kind: Service, name: a}}", "spec.targetRefs", "only one of targetRefs or workloadSelector"),
            ("{targetRefs: [{kind: Deployment, name: a}]}", "spec.targetRefs[0].kind", "targetRef must be to a Service"),
            ("{targetRef: {kind: Service, name: a, namespace: other}}", "spec.targetRef.namespace", "cross namespace"),
        ] {
            assert_rejected(&ap(spec), "AuthorizationPolicy", "foo/httpbin", field, reason);
        }
    }

    #[test]
    fn istio_reference_peer_authentications() {
        let mesh = peer("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls:\n    mode: STRICT\n");
        assert_eq!(mesh.mtls, MtlsMode::Strict);
        assert!(mesh.selector.is_none());
        assert!(mesh.port_level_mtls.is_empty());

        let workload = peer(
            r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
    "9090":
      mode: PERMISSIVE
"#,
        );
        assert_eq!(workload.selector.as_ref().unwrap()["app"], "finance");
        assert_eq!(
            workload.port_level_mtls,
            [(8080, MtlsMode::Disable), (9090, MtlsMode::Permissive)]
                .into_iter()
                .collect()
        );

        let inherit = peer("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: foo}\nspec: {}");
        assert_eq!(inherit.mtls, MtlsMode::Unset);
    }

    #[test]
    fn bad_peer_authentication_fields_are_named() {
        let pa = |spec: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: finance, namespace: foo}}\nspec: {spec}")
        };
        for (spec, field, reason) in [
            (
                "{mtls: {mode: ON}}",
                "spec.mtls.mode",
                "expected one of UNSET, DISABLE, PERMISSIVE, STRICT",
            ),
            (
                "{mtls: {mode: strict}}",
                "spec.mtls.mode",
                "found \"strict\"",
            ),
            (
                "{portLevelMtls: {8080: {mode: DISABLE}}}",
                "spec.portLevelMtls",
                "cannot have port level mTLS",
            ),
            (
                "{selector: {matchLabels: {app: a}}, portLevelMtls: {}}",
                "spec.portLevelMtls",
                "at least one element",
            ),
            (
                "{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: DISABLE}}}",
                "spec.portLevelMtls.0",
                "1..65535",
            ),
            (
                "{selector: {matchLabels: {app: a}}, portLevelMtls: {http: {mode: DISABLE}}}",
                "spec.portLevelMtls.http",
                "1..65535",
            ),
            (
                "{selector: {matchLabels: {app: a}}, portLevelMtls: {8080: {mode: OFF}}}",
                "spec.portLevelMtls.8080.mode",
                "expected one of",
            ),
            (
                "{selector: {matchLabels: {'': a}}}",
                "spec.selector.matchLabels.",
                "empty key",
            ),
        ] {
            assert_rejected(
                &pa(spec),
                "PeerAuthentication",
                "foo/finance",
                field,
                reason,
            );
        }
    }
}
