//! `AuthorizationPolicy` decisions with Istio's semantics, for one request (HTTP) or one
//! connection (TCP), from the attributes the destination's node proxy knows.
//!
//! - Which policies apply to a workload ([`applies_to`]): the root namespace's (mesh-wide, or
//!   matching workloads of every namespace with a selector), its namespace's without selector,
//!   those whose selector its labels match, and those whose `targetRefs` name a Service it
//!   backs.
//! - Order ([`decide`]): DENY first, then ALLOW; once any ALLOW policy applies, what no ALLOW
//!   rule matches is denied; no policy allows. AUDIT policies are reported, never decide.
//!   Policies with `istio.io/dry-run: "true"` are evaluated apart and only reported, the
//!   DENY and the ALLOW results apart as Istio does.
//! - A rule matches when any `from`, any `to` and every `when` match; in each, a listed field
//!   must match (its `not` form must not). Values take Istio's `*`, `*suffix` and `prefix*`
//!   forms, namespaces are globs; paths are normalized first and also take `{*}` (one
//!   segment) and `{**}` (any run) templates; hosts compare exactly, port included.
//! - On a connection without HTTP attributes (a TCP port), an ALLOW rule with an HTTP-only
//!   field matches nothing, and in a DENY or AUDIT rule the HTTP-only fields are left out (the
//!   rest must still match), as Istio builds its TCP filter.
//! - Principals are expanded as Istio's `ReplaceTrustDomainAliases` does: a five-segment
//!   principal in the mesh's trust domain, an alias or `cluster.local` stands for the same
//!   workload in every domain of the mesh (Istio's trust domain migration).

use std::{
    borrow::{Borrow, Cow},
    net::IpAddr,
};

use http::HeaderMap;

use super::{
    policy::{
        AuthorizationPolicy, AuthzAction, AuthzRule, Condition, Operation, PathPattern, Source,
    },
    traffic::IpBlock,
    Labels, ObjectKey, Pod, Snapshot,
};

/// What is known of a request (or, with `http: None`, of a connection) at its destination.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// The caller's SPIFFE ID without the scheme (`cluster.local/ns/foo/sa/bar`): from its
    /// certificate, or from the kernel on the same node. `None`: not in the mesh.
    pub principal: Option<&'a str>,
    /// The caller's namespace (from its identity).
    pub namespace: Option<&'a str>,
    /// The address of the connection's peer (the calling pod).
    pub source_ip: IpAddr,
    /// The original client's address (the same in the mesh).
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The TLS server name the client asked for, if any.
    pub sni: Option<&'a str>,
    pub http: Option<Http<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Clone, Copy, Debug)]
pub struct Http<'a> {
    /// `:authority` or `Host`.
    pub host: &'a str,
    pub method: &'a str,
    /// The request target as received; it is normalized ([`normalize_path`]) before it is
    /// matched.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The mesh's trust domain and its aliases.
#[derive(Clone, Copy, Debug)]
pub struct TrustDomains<'a> {
    pub local: &'a str,
    pub aliases: &'a [std::sync::Arc<str>],
}

/// What the policies of a workload decide about a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict<'p> {
    pub allowed: bool,
    /// The DENY policy that matched, or the ALLOW policy that did; `None` when no policy
    /// applies (allowed) or when ALLOW policies apply and none matched (denied).
    pub policy: Option<&'p ObjectKey>,
    /// AUDIT policies that matched.
    pub audited: Vec<&'p ObjectKey>,
    /// What the dry-run DENY policies would have decided, when any applies.
    pub dry_run_deny: Option<Shadow<'p>>,
    /// What the dry-run ALLOW policies would have decided, when any applies and no enforced
    /// DENY policy denied the request already (Istio reports the two apart).
    pub dry_run_allow: Option<Shadow<'p>>,
}

/// The decision some dry-run policies would have given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shadow<'p> {
    pub allowed: bool,
    /// The policy that would have decided (`None`: none matched).
    pub policy: Option<&'p ObjectKey>,
}

/// Whether `policy` applies to a workload of `namespace` with `labels`, backing `services`.
pub fn applies_to(
    policy: &AuthorizationPolicy,
    root_namespace: &str,
    namespace: &str,
    labels: &Labels,
    services: &[&ObjectKey],
) -> bool {
    let ns = &*policy.key.namespace;
    let root = ns == root_namespace;
    if ns != namespace && !root {
        return false;
    }
    if !policy.target_refs.is_empty() {
        return policy.target_refs.iter().any(|t| {
            t.group.is_empty()
                && &*t.kind == "Service"
                && services
                    .iter()
                    .any(|s| *s.namespace == *ns && s.name == t.name)
        });
    }
    match &policy.selector {
        None => true,
        Some(selector) => selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
    }
}

/// The policies of `snapshot` that apply to `pod`, in key order (a Service it backs is one
/// whose selector its labels match).
pub fn policies_for<'s>(
    snapshot: &'s Snapshot,
    pod: &Pod,
    root_namespace: &str,
) -> Vec<&'s AuthorizationPolicy> {
    let services: Vec<&ObjectKey> = snapshot
        .services
        .values()
        .filter(|s| {
            s.key.namespace == pod.key.namespace
                && s.selector.as_ref().is_some_and(|sel| {
                    !sel.is_empty() && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                })
        })
        .map(|s| &s.key)
        .collect();
    let mut policies: Vec<&AuthorizationPolicy> = snapshot
        .authorization_policies
        .values()
        .map(|p| &**p)
        .filter(|p| {
            applies_to(
                p,
                root_namespace,
                &pod.key.namespace,
                &pod.labels,
                &services,
            )
        })
        .collect();
    policies.sort_by(|a, b| a.key.cmp(&b.key));
    policies
}

/// Decides `request` against the policies that apply to its workload.
pub fn decide<'p, P: Borrow<AuthorizationPolicy>>(
    policies: &'p [P],
    request: &Attributes<'_>,
    trust: TrustDomains<'_>,
) -> Verdict<'p> {
    // Normalized once, for every rule that looks at the path.
    let path = request.http.map(|h| normalize_path(h.path));
    let request = &Attributes {
        http: request
            .http
            .zip(path.as_deref())
            .map(|(h, path)| Http { path, ..h }),
        ..*request
    };
    let all = || policies.iter().map(|p| p.borrow());
    let enforced = || all().filter(|p| !p.dry_run);
    let (allowed, policy) = decide_among(enforced, request, trust);
    let audited = enforced()
        .filter(|p| p.action == AuthzAction::Audit && matches(p, request, trust))
        .map(|p| &p.key)
        .collect();
    let shadow = |action| {
        let mut of = all().filter(|p| p.dry_run && p.action == action).peekable();
        of.peek()?;
        let matched = of.find(|p| matches(p, request, trust)).map(|p| &p.key);
        let allowed = (action == AuthzAction::Allow) == matched.is_some();
        Some(Shadow {
            allowed,
            policy: matched,
        })
    };
    let denied_by_deny = !allowed && policy.is_some();
    Verdict {
        allowed,
        policy,
        audited,
        dry_run_deny: shadow(AuthzAction::Deny),
        dry_run_allow: shadow(AuthzAction::Allow).filter(|_| !denied_by_deny),
    }
}

fn decide_among<'p, I: Iterator<Item = &'p AuthorizationPolicy>>(
    policies: impl Fn() -> I,
    request: &Attributes<'_>,
    trust: TrustDomains<'_>,
) -> (bool, Option<&'p ObjectKey>) {
    let of = |action| policies().filter(move |p| p.action == action);
    if let Some(deny) = of(AuthzAction::Deny).find(|p| matches(p, request, trust)) {
        return (false, Some(&deny.key));
    }
    let mut allows = of(AuthzAction::Allow).peekable();
    if allows.peek().is_none() {
        return (true, None);
    }
    match allows.find(|p| matches(p, request, trust)) {
        Some(allow) => (true, Some(&allow.key)),
        None => (false, None),
    }
}

/// Whether any rule of `policy` matches.
fn matches(
    policy: &AuthorizationPolicy,
    request: &Attributes<'_>,
    trust: TrustDomains<'_>,
) -> bool {
    policy
        .rules
        .iter()
        .any(|rule| rule_matches(rule, policy.action, request, trust))
}

fn rule_matches(
    rule: &AuthzRule,
    action: AuthzAction,
    request: &Attributes<'_>,
    trust: TrustDomains<'_>,
) -> bool {
    if request.http.is_none() && action == AuthzAction::Allow && has_http_only(rule) {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, request, trust)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, request)))
        && rule
            .when
            .iter()
            .all(|c| condition_matches(c, request, trust))
}

/// Whether a rule names something only an HTTP request has.
fn has_http_only(rule: &AuthzRule) -> bool {
    rule.to.iter().any(|o| {
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    }) || rule.when.iter().any(|c| is_http_only(&c.key))
        || rule
            .from
            .iter()
            .any(|s| !(s.request_principals.is_empty() && s.not_request_principals.is_empty()))
}

fn is_http_only(key: &str) -> bool {
    key.starts_with("request.")
}

/// A field's verdict: listed values must match (any), `not` values must not (none); an empty
/// list says nothing.
fn field<T>(listed: &[T], not: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (listed.is_empty() || listed.iter().any(&matches)) && !not.iter().any(matches)
}

fn source_matches(source: &Source, request: &Attributes<'_>, trust: TrustDomains<'_>) -> bool {
    let principal = |p: &std::sync::Arc<str>| {
        request
            .principal
            .is_some_and(|r| principal_matches(p, r, trust))
    };
    let namespace = |n: &std::sync::Arc<str>| request.namespace.is_some_and(|r| glob(n, r));
    field(&source.principals, &source.not_principals, principal)
        && field(&source.namespaces, &source.not_namespaces, namespace)
        && field(&source.ip_blocks, &source.not_ip_blocks, |b| {
            b.contains(request.source_ip)
        })
        && field(&source.remote_ip_blocks, &source.not_remote_ip_blocks, |b| {
            b.contains(request.remote_ip)
        })
        // Request principals come from JWTs, which Weft does not verify (validation refuses
        // them): nothing matches a listed one.
        && source.request_principals.is_empty()
}

fn operation_matches(operation: &Operation, request: &Attributes<'_>) -> bool {
    let port = field(&operation.ports, &operation.not_ports, |p| {
        *p == request.destination_port
    });
    let Some(http) = request.http else {
        // A DENY or AUDIT rule on a connection: its HTTP-only fields are left out.
        return port;
    };
    port && field(&operation.hosts, &operation.not_hosts, |h| {
        host_matches(h, http.host)
    }) && field(&operation.methods, &operation.not_methods, |m| {
        wild(m, http.method)
    }) && field(&operation.paths, &operation.not_paths, |p| {
        path_matches(p, http.path)
    })
}

fn condition_matches(
    condition: &Condition,
    request: &Attributes<'_>,
    trust: TrustDomains<'_>,
) -> bool {
    let key = &*condition.key;
    let value_matches = |v: &std::sync::Arc<str>| -> bool {
        if let Some(name) = key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
        {
            let Some(h) = request.http else {
                return false;
            };
            // Pseudo-headers are the request's own attributes; a header sent several times
            // is matched once, its values joined with `,` (as Envoy does, so a second value
            // cannot slip past a `notValues`).
            let joined = match name {
                ":authority" => Some(h.host.to_owned()),
                ":method" => Some(h.method.to_owned()),
                ":path" => Some(h.path.to_owned()),
                _ => {
                    let values: Vec<&str> = h
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|value| value.to_str().unwrap_or_default())
                        .collect();
                    (!values.is_empty()).then(|| values.join(","))
                }
            };
            return joined.is_some_and(|value| wild(v, &value));
        }
        match key {
            "source.ip" => ip_matches(v, request.source_ip),
            "remote.ip" => ip_matches(v, request.remote_ip),
            "destination.ip" => ip_matches(v, request.destination_ip),
            "destination.port" => v.parse() == Ok(request.destination_port),
            "source.namespace" => request.namespace.is_some_and(|n| glob(v, n)),
            "source.principal" => request
                .principal
                .is_some_and(|p| principal_matches(v, p, trust)),
            "connection.sni" => request.sni.is_some_and(|s| wild(v, s)),
            // Validation refuses every other key.
            _ => false,
        }
    };
    if request.http.is_none() && is_http_only(key) {
        // Only DENY and AUDIT rules get here on a connection: the condition is left out.
        return true;
    }
    field(&condition.values, &condition.not_values, value_matches)
}

/// Istio's string match: `*` (anything), `*suffix`, `prefix*` (a leading `*` is read first,
/// as Envoy's matchers do), or exact.
fn wild(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    pattern == value
}

/// A glob where every `*` stands for any run of characters (namespaces, as Istio matches them).
fn glob(pattern: &str, value: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = value.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// A principal pattern against an identity, both without the scheme, after Istio's
/// `ReplaceTrustDomainAliases`: a principal of five segments (`td/ns/x/sa/y`) whose trust
/// domain is the mesh's, an alias (either may hold a `*`) or `cluster.local` stands for the
/// same workload in every domain of the mesh; any other pattern stands for itself. Nothing is
/// allocated: each expanded form is matched as its two halves.
fn principal_matches(pattern: &str, principal: &str, trust: TrustDomains<'_>) -> bool {
    let Some((domain, rest)) = expandable(pattern, trust) else {
        return wild(pattern, principal);
    };
    let mut bundle = std::iter::once(trust.local).chain(trust.aliases.iter().map(|a| &**a));
    bundle.any(|d| match domain.strip_prefix('*') {
        // `*local/ns/...` stays as written for the domains it already matches.
        Some(suffix) if d.ends_with(suffix) => wild(pattern, principal),
        _ => wild_joined(d, rest, principal),
    })
}

/// The trust domain of a principal pattern Istio expands, and the rest (from its first `/`).
fn expandable<'a>(pattern: &'a str, trust: TrustDomains<'_>) -> Option<(&'a str, &'a str)> {
    if pattern.split('/').count() != 5 {
        return None;
    }
    let (domain, _) = pattern.split_once('/')?;
    if domain == "*" || domain.is_empty() {
        return None;
    }
    let mut bundle = std::iter::once(trust.local).chain(trust.aliases.iter().map(|a| &**a));
    let known = domain == "cluster.local" || bundle.any(|d| wild(domain, d) || wild(d, domain));
    known.then(|| (domain, &pattern[domain.len()..]))
}

/// [`wild`] with the pattern `head` + `tail`, where `tail` is not empty and starts with `/`.
fn wild_joined(head: &str, tail: &str, value: &str) -> bool {
    if let Some(head) = head.strip_prefix('*') {
        // A suffix: the value ends with `tail`, and before it with the rest of `head`.
        return value
            .strip_suffix(tail)
            .is_some_and(|before| before.ends_with(head));
    }
    let Some(after) = value.strip_prefix(head) else {
        return false;
    };
    match tail.strip_suffix('*') {
        Some(prefix) => after.starts_with(prefix),
        None => after == tail,
    }
}

/// Hosts compare without case and exactly, port included, as Istio does: write
/// `example.com:*` too to match a host with a port.
fn host_matches(pattern: &str, host: &str) -> bool {
    wild(&pattern.to_ascii_lowercase(), &host.to_ascii_lowercase())
}

fn ip_matches(value: &str, ip: IpAddr) -> bool {
    value
        .parse::<IpBlock>()
        .is_ok_and(|block| block.contains(ip))
}

/// The path policies see, as Istio's default (`BASE`) normalization gives it (Envoy's
/// `normalize_path`, RFC 3986 §6): the query and fragment dropped, percent-encoded unreserved
/// characters decoded (`%2e` is a `.`, `%61` an `a`) and other escapes upper-cased (`%2f` stays
/// an escape, never a `/`), a backslash read as `/`, and `.` and `..` segments resolved. The
/// request must be forwarded with this same path. Borrowed when there is nothing to change.
pub fn normalize_path(target: &str) -> Cow<'_, str> {
    let clean = target.starts_with('/')
        && !target
            .bytes()
            .any(|b| matches!(b, b'?' | b'#' | b'%' | b'\\'))
        && !target.contains("/.");
    if clean {
        return Cow::Borrowed(target);
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let path = decode_unreserved(path).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    Cow::Owned(if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    })
}

/// Decodes `%XX` escapes of unreserved characters (ALPHA, DIGIT, `-._~`) and upper-cases the
/// hex digits of the others; a `%` not followed by two hex digits stays as it is.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
        match escape.and_then(|hex| u8::from_str_radix(hex, 16).ok().map(|b| (hex, b))) {
            Some((_, byte)) if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) => {
                out.push(char::from(byte));
                i += 3;
            }
            Some((hex, _)) => {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
                i += 3;
            }
            None => {
                let next = path[i..].chars().next().unwrap_or_default();
                out.push(next);
                i += next.len_utf8().max(1);
            }
        }
    }
    out
}

/// A path pattern against a normalized path: its compiled template, or Istio's string forms.
fn path_matches(pattern: &PathPattern, path: &str) -> bool {
    match pattern.template() {
        Some(template) => template.is_match(path),
        None => wild(&pattern.text, path),
    }
}

/// Policy decisions on arbitrary input: `fuzz/` feeds this function and a unit test replays
/// its corpus. The bytes before the first NUL are resources (YAML, as the file source reads
/// them); the rest describe a request, one `name: value` per line (`principal`, `ip`,
/// `port`, `method`, `path`, `host`, `sni`, `header` as `name=value`; no `method`: a TCP
/// connection). Every policy read is applied, as if it selected the workload. Panics on a
/// panic, or on a verdict the policies cannot give (a denial naming an ALLOW policy, an
/// allowance naming a DENY one, an allowance by no policy while an ALLOW policy applies).
pub fn fuzz_decide(data: &[u8]) {
    let (config, request) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let policies: Vec<_> = crate::source::file::parse_documents("input.yaml", config)
        .into_iter()
        .filter_map(|(_, r)| match r {
            Ok(crate::source::objects::Object::AuthorizationPolicy(p)) => Some(p),
            _ => None,
        })
        .collect();
    let text = String::from_utf8_lossy(request);
    let mut headers = HeaderMap::new();
    let (mut principal, mut ip, mut port, mut sni) = (None, None, 80, None);
    let (mut method, mut path, mut host) = (None, "/", "");
    for line in text.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        match name {
            "principal" => principal = Some(value),
            "ip" => ip = value.parse().ok(),
            "port" => port = value.parse().unwrap_or(port),
            "method" => method = Some(value),
            "path" => path = value,
            "host" => host = value,
            "sni" => sni = Some(value),
            "header" => {
                if let Some((n, v)) = value.split_once('=') {
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::from_bytes(n.as_bytes()),
                        http::HeaderValue::from_str(v),
                    ) {
                        headers.append(n, v);
                    }
                }
            }
            _ => {}
        }
    }
    let source_ip = ip.unwrap_or(IpAddr::from([10, 244, 1, 7]));
    let request = Attributes {
        principal,
        namespace: principal.and_then(|p| p.split('/').nth(2)),
        source_ip,
        remote_ip: source_ip,
        destination_ip: IpAddr::from([10, 244, 2, 5]),
        destination_port: port,
        sni,
        http: method.map(|method| Http {
            host,
            method,
            path,
            headers: &headers,
        }),
    };
    let all: Vec<&AuthorizationPolicy> = policies.iter().map(|p| &**p).collect();
    let aliases = ["old-td".into()];
    let trust = TrustDomains {
        local: "cluster.local",
        aliases: &aliases,
    };
    let verdict = decide(&all, &request, trust);
    let action_of = |key: &ObjectKey| {
        all.iter()
            .find(|p| p.key == *key && !p.dry_run)
            .map(|p| p.action)
    };
    match (verdict.allowed, verdict.policy) {
        (false, Some(key)) => assert_eq!(action_of(key), Some(AuthzAction::Deny)),
        (true, Some(key)) => assert_eq!(action_of(key), Some(AuthzAction::Allow)),
        (true, None) => assert!(
            !all.iter()
                .any(|p| p.action == AuthzAction::Allow && !p.dry_run),
            "allowed by no policy while an ALLOW policy applies"
        ),
        (false, None) => assert!(all
            .iter()
            .any(|p| p.action == AuthzAction::Allow && !p.dry_run)),
    }
    let labels = Labels::default();
    for policy in &all {
        let _ = applies_to(policy, "istio-system", "foo", &labels, &[]);
    }
}

#[cfg(test)]
mod tests;
