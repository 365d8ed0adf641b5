//! Cases from Istio's authorization tasks (HTTP traffic, TCP traffic, explicit deny, trust
//! domain migration, dry run) and its reference, as decisions.

use std::{net::IpAddr, sync::Arc};

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::source::{file::parse_documents, objects::Object};

const ROOT: &str = "istio-system";
const TRUST: TrustDomains<'static> = TrustDomains {
    local: "cluster.local",
    aliases: &[],
};

fn policy(yaml: &str) -> Arc<AuthorizationPolicy> {
    let yaml = format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n{yaml}");
    match parse_documents("p.yaml", yaml.as_bytes()).pop() {
        Some((_, Ok(Object::AuthorizationPolicy(p)))) => p,
        other => panic!("expected an AuthorizationPolicy: {other:?}"),
    }
}

/// A request to `httpbin` (10.244.2.5:8000) from `sleep` of namespace `foo`.
struct Req {
    principal: Option<String>,
    source_ip: IpAddr,
    port: u16,
    http: Option<(String, String, String)>,
    headers: HeaderMap,
}

impl Req {
    fn from_sa(ns: &str, sa: &str) -> Self {
        Self {
            principal: Some(format!("cluster.local/ns/{ns}/sa/{sa}")),
            source_ip: "10.244.1.7".parse().unwrap(),
            port: 8000,
            http: Some(("httpbin.foo".into(), "GET".into(), "/ip".into())),
            headers: HeaderMap::new(),
        }
    }

    fn sleep() -> Self {
        Self::from_sa("foo", "sleep")
    }

    fn unmeshed() -> Self {
        Self {
            principal: None,
            ..Self::sleep()
        }
    }

    fn get(mut self, method: &str, path: &str) -> Self {
        let host = self.http.take().map_or("httpbin.foo".into(), |h| h.0);
        self.http = Some((host, method.into(), path.into()));
        self
    }

    fn host(mut self, host: &str) -> Self {
        if let Some(h) = &mut self.http {
            h.0 = host.into();
        }
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }

    fn tcp(mut self, port: u16) -> Self {
        self.http = None;
        self.port = port;
        self
    }

    fn at_ip(mut self, ip: &str) -> Self {
        self.source_ip = ip.parse().unwrap();
        self
    }

    fn attributes(&self) -> Attributes<'_> {
        let principal = self.principal.as_deref();
        Attributes {
            principal,
            namespace: principal.and_then(|p| p.split('/').nth(2)),
            source_ip: self.source_ip,
            remote_ip: self.source_ip,
            destination_ip: "10.244.2.5".parse().unwrap(),
            destination_port: self.port,
            sni: None,
            http: self.http.as_ref().map(|(host, method, path)| Http {
                host,
                method,
                path,
                headers: &self.headers,
            }),
        }
    }
}

fn verdict<'p>(policies: &'p [&'p AuthorizationPolicy], req: &Req) -> Verdict<'p> {
    decide(policies, &req.attributes(), TRUST)
}

fn allowed(policies: &[Arc<AuthorizationPolicy>], req: &Req) -> bool {
    let policies: Vec<&AuthorizationPolicy> = policies.iter().map(|p| &**p).collect();
    verdict(&policies, req).allowed
}

#[test]
fn without_policies_everything_is_allowed_and_allow_nothing_denies_everything() {
    assert!(allowed(&[], &Req::sleep()));
    assert!(allowed(&[], &Req::unmeshed()));
    let nothing = policy("metadata: {name: allow-nothing, namespace: foo}\nspec: {}");
    assert!(!allowed(std::slice::from_ref(&nothing), &Req::sleep()));
    let all = policy("metadata: {name: allow-all, namespace: foo}\nspec: {rules: [{}]}");
    assert!(
        allowed(&[nothing, all], &Req::sleep()),
        "one ALLOW matching is enough"
    );
}

#[test]
fn deny_wins_over_allow_and_names_the_policy() {
    let all = policy("metadata: {name: allow-all, namespace: foo}\nspec: {rules: [{}]}");
    let deny = policy(
        "metadata: {name: deny-admin, namespace: foo}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/admin*]}}]}]}",
    );
    let policies = [&*all, &*deny];
    let v = verdict(&policies, &Req::sleep().get("GET", "/admin/users?x=1"));
    assert!(!v.allowed);
    assert_eq!(v.policy, Some(&deny.key));
    let v = verdict(&policies, &Req::sleep());
    assert!(v.allowed);
    assert_eq!(v.policy, Some(&all.key));
}

#[test]
fn http_traffic_task_allow_get_from_productpage_identity() {
    // Istio's "HTTP Traffic" task: ratings may be read with GET by bookinfo-reviews only.
    let get_ratings = policy(
        r#"metadata: {name: get-ratings, namespace: foo}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/bookinfo-reviews"]}}]
    to: [{operation: {methods: ["GET"]}}]"#,
    );
    let p = [get_ratings];
    assert!(allowed(&p, &Req::from_sa("foo", "bookinfo-reviews")));
    assert!(!allowed(
        &p,
        &Req::from_sa("foo", "bookinfo-reviews").get("POST", "/ratings")
    ));
    assert!(!allowed(&p, &Req::from_sa("foo", "sleep")), "default deny");
    assert!(!allowed(&p, &Req::unmeshed()), "no principal, no match");
}

#[test]
fn principals_namespaces_and_their_wildcards_and_not_forms() {
    let with = |source: &str| {
        policy(&format!(
            "metadata: {{name: p, namespace: foo}}\nspec: {{rules: [{{from: [{{source: {source}}}]}}]}}"
        ))
    };
    let any = [with("{principals: ['*']}")];
    assert!(allowed(&any, &Req::sleep()));
    assert!(
        !allowed(&any, &Req::unmeshed()),
        "`*` is any authenticated caller"
    );
    let prefix = [with("{principals: ['cluster.local/ns/foo/*']}")];
    assert!(allowed(&prefix, &Req::sleep()));
    assert!(!allowed(&prefix, &Req::from_sa("bar", "sleep")));
    let suffix = [with("{principals: ['*/sa/sleep']}")];
    assert!(allowed(&suffix, &Req::from_sa("bar", "sleep")));
    assert!(!allowed(&suffix, &Req::from_sa("bar", "curl")));
    let glob = [with("{namespaces: ['team-*-prod']}")];
    assert!(allowed(&glob, &Req::from_sa("team-a-prod", "sleep")));
    assert!(!allowed(&glob, &Req::from_sa("team-a-dev", "sleep")));
    let namespace = [with("{namespaces: [foo]}")];
    assert!(allowed(&namespace, &Req::sleep()));
    assert!(!allowed(&namespace, &Req::from_sa("bar", "sleep")));
    let not_namespace = [with("{notNamespaces: [bar]}")];
    assert!(allowed(&not_namespace, &Req::sleep()));
    assert!(!allowed(&not_namespace, &Req::from_sa("bar", "sleep")));
    assert!(
        allowed(&not_namespace, &Req::unmeshed()),
        "an unknown namespace is not `bar`"
    );
    let not_principal = [with("{notPrincipals: ['cluster.local/ns/foo/sa/sleep']}")];
    assert!(!allowed(&not_principal, &Req::sleep()));
    assert!(allowed(&not_principal, &Req::from_sa("foo", "curl")));
}

#[test]
fn ip_blocks_allow_callers_outside_the_mesh() {
    let p = [policy(
        "metadata: {name: by-ip, namespace: foo}\nspec: {rules: [{from: [{source: {ipBlocks: [10.244.1.0/24], notIpBlocks: [10.244.1.9]}}]}]}",
    )];
    assert!(
        allowed(&p, &Req::unmeshed()),
        "an unmeshed caller by its address"
    );
    assert!(!allowed(&p, &Req::unmeshed().at_ip("10.244.1.9")));
    assert!(!allowed(&p, &Req::unmeshed().at_ip("10.244.3.4")));
    let remote = [policy(
        "metadata: {name: by-remote, namespace: foo}\nspec: {rules: [{from: [{source: {remoteIpBlocks: [10.244.1.7]}}]}]}",
    )];
    assert!(allowed(&remote, &Req::sleep()));
    assert!(!allowed(&remote, &Req::sleep().at_ip("10.244.1.8")));
}

#[test]
fn operations_hosts_ports_methods_paths_and_templates() {
    let with = |operation: &str| {
        [policy(&format!(
            "metadata: {{name: p, namespace: foo}}\nspec: {{rules: [{{to: [{{operation: {operation}}}]}}]}}"
        ))]
    };
    let hosts = with("{hosts: [HTTPBIN.foo, '*.example.com']}");
    assert!(allowed(&hosts, &Req::sleep()));
    assert!(
        !allowed(&hosts, &Req::sleep().host("httpbin.foo:8000")),
        "the port is part of the host, as in Istio"
    );
    let with_port = with("{hosts: [httpbin.foo, 'httpbin.foo:*']}");
    assert!(allowed(&with_port, &Req::sleep().host("httpbin.foo:8000")));
    assert!(allowed(&hosts, &Req::sleep().host("a.example.com")));
    assert!(!allowed(&hosts, &Req::sleep().host("other.foo")));
    let ports = with("{ports: ['8000']}");
    assert!(allowed(&ports, &Req::sleep()));
    assert!(!allowed(&ports, &Req::sleep().tcp(9000)));
    let not_methods = with("{notMethods: [DELETE]}");
    assert!(allowed(&not_methods, &Req::sleep()));
    assert!(!allowed(&not_methods, &Req::sleep().get("DELETE", "/ip")));
    let paths = with("{paths: [/headers, '/status/*', '*/json'], notPaths: [/status/500]}");
    for ok in ["/headers", "/status/200", "/x/json", "/headers?q=1"] {
        assert!(allowed(&paths, &Req::sleep().get("GET", ok)), "{ok}");
    }
    for no in ["/ip", "/status/500", "/headers/x"] {
        assert!(!allowed(&paths, &Req::sleep().get("GET", no)), "{no}");
    }
    let template = with("{paths: ['/store/{*}/items', '/files/{**}', '/foo/{*}/bar/{**}']}");
    assert!(allowed(
        &template,
        &Req::sleep().get("GET", "/store/a1/items")
    ));
    assert!(!allowed(
        &template,
        &Req::sleep().get("GET", "/store/a/b/items")
    ));
    assert!(allowed(&template, &Req::sleep().get("GET", "/files/a/b/c")));
    assert!(allowed(&template, &Req::sleep().get("GET", "/files/")));
    assert!(!allowed(&template, &Req::sleep().get("GET", "/files")));
    assert!(allowed(
        &template,
        &Req::sleep().get("GET", "/foo/buzz/bar/")
    ));
    // Paths are normalized before they are matched: dot segments cannot slip past a DENY.
    let deny_admin = [policy(
        "metadata: {name: deny-admin, namespace: foo}\nspec: {action: DENY, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}",
    )];
    for sneaky in ["/./admin", "/x/../admin/users", "/admin?x", "\\admin"] {
        assert!(
            !allowed(&deny_admin, &Req::sleep().get("GET", sneaky)),
            "{sneaky}"
        );
    }
    assert_eq!(normalize_path("/a/./b/../c/?q"), "/a/c/");
    assert_eq!(normalize_path("/../.."), "/");
    // Escapes of unreserved characters are decoded first: dot segments cannot hide in them.
    assert_eq!(normalize_path("/public/%2e%2E/admin"), "/admin");
    assert_eq!(normalize_path("/%61dmin"), "/admin");
    // Other escapes stay escapes (upper-cased): `%2F` is no `/`.
    assert_eq!(normalize_path("/a%2fb/%c3%A9"), "/a%2Fb/%C3%A9");
    assert_eq!(normalize_path("/100%/x%4"), "/100%/x%4");
    assert!(matches!(normalize_path("/plain/path"), Cow::Borrowed(_)));
}

#[test]
fn conditions_on_headers_and_connection_attributes() {
    let with = |when: &str| {
        [policy(&format!(
            "metadata: {{name: p, namespace: foo}}\nspec: {{rules: [{{when: [{when}]}}]}}"
        ))]
    };
    let header = with("{key: 'request.headers[version]', values: [v1, 'v2*']}");
    assert!(allowed(&header, &Req::sleep().header("version", "v2-beta")));
    assert!(!allowed(&header, &Req::sleep().header("version", "v3")));
    assert!(!allowed(&header, &Req::sleep()), "no header, no match");
    // A header sent twice is matched once, its values joined: a second value cannot slip
    // past the first.
    let token = with("{key: 'request.headers[x-token]', values: [admin]}");
    assert!(allowed(&token, &Req::sleep().header("x-token", "admin")));
    assert!(!allowed(
        &token,
        &Req::sleep()
            .header("x-token", "admin")
            .header("x-token", "other")
    ));
    let pseudo = with("{key: 'request.headers[:method]', values: [GET]}");
    assert!(allowed(&pseudo, &Req::sleep()));
    assert!(!allowed(&pseudo, &Req::sleep().get("PUT", "/ip")));
    let not_header = with("{key: 'request.headers[x-debug]', notValues: ['*']}");
    assert!(allowed(&not_header, &Req::sleep()));
    assert!(!allowed(&not_header, &Req::sleep().header("x-debug", "1")));
    let namespace = with("{key: source.namespace, values: [foo]}");
    assert!(allowed(&namespace, &Req::sleep()));
    assert!(!allowed(&namespace, &Req::from_sa("bar", "sleep")));
    let ip = with("{key: source.ip, values: [10.244.1.0/24]}");
    assert!(allowed(&ip, &Req::sleep()));
    assert!(!allowed(&ip, &Req::sleep().at_ip("10.244.2.9")));
    let port = with("{key: destination.port, notValues: ['9000']}");
    assert!(allowed(&port, &Req::sleep()));
    assert!(!allowed(&port, &Req::sleep().tcp(9000)));
    let principal = with("{key: source.principal, values: ['cluster.local/ns/foo/sa/sleep']}");
    assert!(allowed(&principal, &Req::sleep()));
    assert!(!allowed(&principal, &Req::unmeshed()));
}

#[test]
fn on_a_tcp_port_http_rules_allow_nothing_and_deny_by_their_other_fields() {
    // Istio's "TCP Traffic" task: an ALLOW rule with `methods` on a TCP port matches nothing.
    let allow_get = [policy(
        "metadata: {name: tcp-policy, namespace: foo}\nspec: {rules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]}",
    )];
    assert!(!allowed(&allow_get, &Req::sleep().tcp(9000)));
    let allow_port = [policy(
        "metadata: {name: tcp-policy, namespace: foo}\nspec: {rules: [{to: [{operation: {ports: ['9000', '9001']}}]}]}",
    )];
    assert!(allowed(&allow_port, &Req::sleep().tcp(9000)));
    assert!(!allowed(&allow_port, &Req::sleep().tcp(9002)));
    // A DENY rule leaves its HTTP fields out: it denies the port whatever the method.
    let deny_get = [policy(
        "metadata: {name: tcp-policy, namespace: foo}\nspec: {action: DENY, rules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]}",
    )];
    assert!(!allowed(&deny_get, &Req::sleep().tcp(9000)));
    assert!(allowed(&deny_get, &Req::sleep().tcp(9001)));
    // Its other fields still count: a rule for another caller denies nothing here.
    let deny_other = [policy(
        "metadata: {name: p, namespace: foo}\nspec: {action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], when: [{key: 'request.headers[x]', values: [y]}]}]}",
    )];
    assert!(allowed(&deny_other, &Req::sleep().tcp(9000)));
    assert!(!allowed(
        &deny_other,
        &Req::from_sa("bar", "sleep").tcp(9000)
    ));
}

#[test]
fn trust_domain_migration_matches_old_and_alias_domains() {
    // Istio's "Trust Domain Migration" task: the policy names the old trust domain.
    let p = policy(
        "metadata: {name: service-httpbin.default.svc.cluster.local, namespace: foo}\nspec: {rules: [{from: [{source: {principals: [old-td/ns/foo/sa/sleep]}}]}]}",
    );
    let policies = [&*p];
    let mut req = Req::sleep();
    req.principal = Some("new-td/ns/foo/sa/sleep".into());
    let without_alias = TrustDomains {
        local: "new-td",
        aliases: &[],
    };
    let with_alias = TrustDomains {
        local: "new-td",
        aliases: &[Arc::from("old-td")],
    };
    assert!(!decide(&policies, &req.attributes(), without_alias).allowed);
    assert!(decide(&policies, &req.attributes(), with_alias).allowed);
    // `cluster.local` in a policy stands for the mesh's trust domain.
    let local = policy(
        "metadata: {name: p, namespace: foo}\nspec: {rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]}",
    );
    assert!(decide(&[&*local], &req.attributes(), without_alias).allowed);
    // Istio's expansion rules: only five-segment principals are expanded, a wildcard domain
    // that matches a mesh domain is kept for the domains it matches and substituted for the
    // others, and `cluster.local` stands for the mesh's domains only.
    let matches =
        |pattern: &str, principal: &str, trust| principal_matches(pattern, principal, trust);
    let local_and_old = TrustDomains {
        local: "cluster.local",
        aliases: &[Arc::from("old-td")],
    };
    assert!(matches(
        "*-td/ns/foo/sa/sleep",
        "cluster.local/ns/foo/sa/sleep",
        local_and_old
    ));
    assert!(matches(
        "old*/ns/foo/sa/sleep",
        "new-td/ns/foo/sa/sleep",
        with_alias
    ));
    assert!(
        !matches("old-td/ns/foo/*", "new-td/ns/foo/sa/sleep", with_alias),
        "four segments"
    );
    assert!(
        !matches(
            "cluster.local/ns/foo/sa/sleep",
            "cluster.local/ns/foo/sa/sleep",
            with_alias
        ),
        "cluster.local is not one of this mesh's domains"
    );
    assert!(!matches(
        "other-td/ns/foo/sa/sleep",
        "new-td/ns/foo/sa/sleep",
        with_alias
    ));
    // Envoy reads a leading `*` first: `*ET*` ends with `ET*`.
    assert!(wild("*ET*", "GET*") && !wild("*ET*", "*ETX"));
    // Another namespace's identity is not matched, whatever the domain.
    req.principal = Some("new-td/ns/bar/sa/sleep".into());
    assert!(!decide(&policies, &req.attributes(), with_alias).allowed);
}

#[test]
fn dry_run_and_audit_policies_report_without_deciding() {
    let dry_deny = policy(
        "metadata: {name: deny-path-headers, namespace: foo, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/headers]}}]}]}",
    );
    let dry_allow = policy(
        "metadata: {name: allow-post, namespace: foo, annotations: {istio.io/dry-run: 'true'}}\nspec: {rules: [{to: [{operation: {methods: [POST]}}]}]}",
    );
    let audit =
        policy("metadata: {name: audit-all, namespace: foo}\nspec: {action: AUDIT, rules: [{}]}");
    let policies = [&*dry_deny, &*dry_allow, &*audit];
    let v = verdict(&policies, &Req::sleep().get("GET", "/headers"));
    assert!(v.allowed, "a dry run enforces nothing");
    assert_eq!(v.policy, None);
    assert_eq!(v.audited, [&audit.key]);
    // The two results are reported apart, as Istio does: the DENY one does not hide the other.
    let shadow = |allowed, policy| Some(Shadow { allowed, policy });
    assert_eq!(v.dry_run_deny, shadow(false, Some(&dry_deny.key)));
    assert_eq!(
        v.dry_run_allow,
        shadow(false, None),
        "no dry-run ALLOW matches a GET"
    );
    let v = verdict(&policies, &Req::sleep().get("POST", "/ip"));
    assert_eq!(v.dry_run_deny, shadow(true, None));
    assert_eq!(v.dry_run_allow, shadow(true, Some(&dry_allow.key)));
    // Without dry-run policies of an action nothing is reported for it, and the ALLOW result
    // is not computed for a request an enforced DENY refused.
    let deny =
        policy("metadata: {name: deny-all, namespace: foo}\nspec: {action: DENY, rules: [{}]}");
    let both = [&*deny, &*dry_allow];
    let v = verdict(&both, &Req::sleep().get("POST", "/ip"));
    assert!(!v.allowed);
    assert_eq!((v.dry_run_deny, v.dry_run_allow), (None, None));
}

#[test]
fn which_policies_apply_to_a_workload() {
    let labels: Labels = [("app".to_string(), "httpbin".to_string())].into();
    let httpbin = ObjectKey::new("foo", "httpbin");
    let applies = |yaml: &str, ns: &str| applies_to(&policy(yaml), ROOT, ns, &labels, &[&httpbin]);
    assert!(applies(
        "metadata: {name: p, namespace: foo}\nspec: {}",
        "foo"
    ));
    assert!(!applies(
        "metadata: {name: p, namespace: bar}\nspec: {}",
        "foo"
    ));
    assert!(
        applies(
            "metadata: {name: p, namespace: istio-system}\nspec: {}",
            "foo"
        ),
        "mesh-wide"
    );
    assert!(applies(
        "metadata: {name: p, namespace: istio-system}\nspec: {selector: {matchLabels: {app: httpbin}}}",
        "foo"
    ), "the root namespace's selector selects in every namespace");
    assert!(!applies(
        "metadata: {name: p, namespace: foo}\nspec: {selector: {matchLabels: {app: other}}}",
        "foo"
    ));
    assert!(applies("metadata: {name: p, namespace: foo}\nspec: {targetRefs: [{kind: Service, group: '', name: httpbin}]}", "foo"));
    assert!(applies("metadata: {name: p, namespace: foo}\nspec: {targetRefs: [{kind: Service, group: core, name: httpbin}]}", "foo"), "`core` is the core group");
    assert!(!applies("metadata: {name: p, namespace: foo}\nspec: {targetRefs: [{kind: Service, group: '', name: other}]}", "foo"));
}

/// Replays the decision fuzz corpus on the stable toolchain (see `fuzz/`).
#[test]
fn fuzz_corpus_replays_without_panicking() {
    crate::replay_corpus("authz_decide", fuzz_decide);
}
