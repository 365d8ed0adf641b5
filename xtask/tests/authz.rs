//! End-to-end tests of AuthorizationPolicy on the virtual cluster: an authorization matrix
//! from Istio's own tasks (HTTP traffic, TCP traffic, explicit deny, trust domain migration,
//! dry run), each case named, tried with curl, grpcio, Python's `http.client` and raw TCP
//! from every kind of caller: a meshed pod of the other node (mTLS), a meshed pod of the
//! server's node (the kernel's word), and a pod outside the mesh (plaintext, PERMISSIVE).
//!
//! One cluster serves every case; each case applies its policies, checks, and removes them
//! whatever happened. The nodes read `old-td` as an alias of their trust domain
//! (`WEFT_TRUST_DOMAIN_ALIASES`). Needs root: without it the suite fails loudly.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use serde_json::Value;
use xtask::{
    cluster,
    probe::{self, curl_text, grpc_calls, metrics, pod_ip, sample_sum},
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: httpbin
  containers: [{name: main, command: [weft-demo, http, --port, "8080"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo, namespace: foo, labels: {app: tcp-echo}}
spec:
  nodeName: node-2
  serviceAccountName: tcp-echo
  containers:
  - {name: a, command: [weft-demo, peer, --port, "9000"], ports: [{containerPort: 9000}]}
  - {name: b, command: [weft-demo, peer, --port, "9001"], ports: [{containerPort: 9001}]}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: foo, labels: {app: sleep}}
spec:
  nodeName: node-1
  serviceAccountName: sleep
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: sleep-local, namespace: foo, labels: {app: sleep-local}}
spec:
  nodeName: node-2
  serviceAccountName: sleep-local
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: bar, labels: {app: sleep}}
spec:
  nodeName: node-1
  serviceAccountName: sleep
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: legacy, labels: {app: sleep}}
spec:
  nodeName: node-1
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {app: httpbin}
  ports:
  - {name: http, port: 8000, targetPort: 8080}
  - {name: grpc, port: 9090, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: foo}
spec:
  selector: {app: tcp-echo}
  ports:
  - {name: tcp, port: 9000, targetPort: 9000}
  - {name: tcp-other, port: 9001, targetPort: 9001}
"#;

/// The callers: across nodes, on the server's node, in another namespace, outside the mesh.
const FOO: &str = "foo/sleep";
const LOCAL: &str = "foo/sleep-local";
const BAR: &str = "bar/sleep";
const LEGACY: &str = "legacy/sleep";

const HTTPBIN: &str = "http://httpbin.foo:8000";

/// `kind: AuthorizationPolicy` in `namespace` named `name`, with `spec` (flow YAML) and
/// `annotations` (flow YAML too, or empty).
fn policy(namespace: &str, name: &str, annotations: &str, spec: &str) -> String {
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!(", annotations: {annotations}")
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}{annotations}}}\nspec: {spec}\n"
    )
}

/// Applies `policies` (YAML documents), runs `check`, and removes them whatever happened.
fn with<T>(policies: &[String], check: impl FnOnce() -> Result<T>) -> Result<T> {
    let yaml = policies.join("---\n");
    probe::apply_yaml(&yaml)?;
    let result = check();
    let removed = probe::delete_yaml(&yaml);
    let value = result?;
    removed.map(|()| value)
}

/// The status of `method url` from `pod` (0: no response), and the body.
fn call(pod: &str, method: &str, url: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    // As sent: curl would resolve dot segments itself.
    let mut args = vec!["--path-as-is", "-X", method];
    for h in &headers {
        args.extend(["-H", h.as_str()]);
    }
    args.push(url);
    curl_text(pod, &args)
}

/// `method path` of httpbin from `pod` must answer `want`; a 403 must be Envoy's.
fn expect(pod: &str, method: &str, path: &str, headers: &[(&str, &str)], want: u16) -> Result<()> {
    let url = format!("{HTTPBIN}{path}");
    let (status, body) = call(pod, method, &url, headers)?;
    ensure!(
        status == want,
        "{pod}: {method} {url} {headers:?} answered {status}, expected {want}: {body}"
    );
    if want == 403 {
        ensure!(
            body == "RBAC: access denied",
            "{pod}: the 403 said {body:?}, not Envoy's `RBAC: access denied`"
        );
    }
    Ok(())
}

fn get(pod: &str, path: &str, want: u16) -> Result<()> {
    expect(pod, "GET", path, &[], want)
}

/// Whether a TCP connection from `pod` to `addr` reached the server: `weft-demo peer`
/// names the peer it saw; a denied connection is closed before it says anything.
fn tcp_reaches(pod: &str, addr: &str) -> Result<bool> {
    let cmd: Vec<String> = ["weft-demo", "dial", addr, "--timeout-ms", "2000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = cluster::exec(pod, &cmd)?;
    let said = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success() && said.contains("said=peer="))
}

fn expect_tcp(pod: &str, addr: &str, reaches: bool) -> Result<()> {
    let got = tcp_reaches(pod, addr)?;
    ensure!(
        got == reaches,
        "{pod}: TCP to {addr} {}, expected it {}",
        if got {
            "reached the server"
        } else {
            "was closed"
        },
        if reaches {
            "to reach it"
        } else {
            "to be closed"
        }
    );
    Ok(())
}

fn decisions(node: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(sample_sum(
        &metrics(node)?,
        "weft_authz_decisions_total",
        labels,
    ))
}

fn no_policy_allows_everything() -> Result<()> {
    for pod in [FOO, LOCAL, BAR, LEGACY] {
        get(pod, "/get", 200)?;
        expect(pod, "POST", "/post", &[], 200)?;
    }
    expect_tcp(FOO, "tcp-echo.foo:9000", true)
}

/// Istio's "allow-nothing": an ALLOW policy without rules denies every request and
/// connection of the namespace's workloads, from every caller.
fn allow_nothing_denies_every_caller() -> Result<()> {
    with(&[policy("foo", "allow-nothing", "", "{}")], || {
        for pod in [FOO, LOCAL, BAR, LEGACY] {
            get(pod, "/get", 403)?;
        }
        expect_tcp(FOO, "tcp-echo.foo:9000", false)?;
        expect_tcp(LOCAL, "tcp-echo.foo:9000", false)
    })
}

fn allow_by_principal() -> Result<()> {
    let allow = policy(
        "foo",
        "allow-sleep",
        "",
        "{selector: {matchLabels: {app: httpbin}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]}",
    );
    with(&[allow], || {
        get(FOO, "/get", 200)?;
        get(BAR, "/get", 403)?;
        // Same name, other namespace, other node: a distinct identity.
        get(LOCAL, "/get", 403)?;
        get(LEGACY, "/get", 403)
    })
}

fn allow_by_namespace() -> Result<()> {
    let allow = policy(
        "foo",
        "allow-bar",
        "",
        "{action: ALLOW, rules: [{from: [{source: {namespaces: [bar]}}]}]}",
    );
    with(&[allow], || {
        get(BAR, "/get", 200)?;
        get(FOO, "/get", 403)?;
        // Plaintext has no namespace: namespace rules cannot allow it.
        get(LEGACY, "/get", 403)
    })
}

fn allow_by_ip_block() -> Result<()> {
    let ip = pod_ip(BAR)?;
    let allow = policy(
        "foo",
        "allow-ip",
        "",
        &format!("{{action: ALLOW, rules: [{{from: [{{source: {{ipBlocks: ['{ip}/32']}}}}]}}]}}"),
    );
    with(&[allow], || {
        get(BAR, "/get", 200)?;
        get(FOO, "/get", 403)
    })
}

/// Istio's explicit deny task: a DENY on a path wins over an ALLOW of everything.
fn deny_by_path_wins_over_allow() -> Result<()> {
    let allow = policy("foo", "allow-all", "", "{action: ALLOW, rules: [{}]}");
    let deny = policy(
        "foo",
        "deny-ip",
        "",
        "{action: DENY, rules: [{to: [{operation: {paths: [/ip]}}]}]}",
    );
    with(&[allow, deny], || {
        get(FOO, "/get", 200)?;
        get(FOO, "/ip", 403)?;
        // Normalized before matching: `.` and `..` segments do not slip past.
        get(FOO, "/get/../ip", 403)?;
        get(FOO, "/get/%2E%2e/%69p", 403)?;
        get(LOCAL, "/ip", 403)
    })
}

fn allow_by_method() -> Result<()> {
    let allow = policy(
        "foo",
        "allow-get",
        "",
        "{action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}",
    );
    with(&[allow], || {
        expect(FOO, "GET", "/get", &[], 200)?;
        expect(FOO, "POST", "/post", &[], 403)?;
        expect(LOCAL, "DELETE", "/delete", &[], 403)
    })
}

/// Istio's explicit deny task: deny GET unless `x-token: admin`... here every request
/// whose `x-token` is not `admin`, a missing header included.
fn deny_by_header_not_values() -> Result<()> {
    let deny = policy(
        "foo",
        "deny-token",
        "",
        "{action: DENY, rules: [{when: [{key: 'request.headers[x-token]', notValues: [admin]}]}]}",
    );
    with(&[deny], || {
        expect(FOO, "GET", "/get", &[("x-token", "admin")], 200)?;
        expect(FOO, "GET", "/get", &[("x-token", "guest")], 403)?;
        expect(FOO, "GET", "/get", &[], 403)?;
        // A second value cannot hide behind the first.
        expect(
            FOO,
            "GET",
            "/get",
            &[("x-token", "admin"), ("x-token", "guest")],
            403,
        )
    })
}

fn allow_by_port() -> Result<()> {
    // Ports are the workload's (the target port), as Istio reads them.
    let allow = policy(
        "foo",
        "allow-8080",
        "",
        "{action: ALLOW, rules: [{to: [{operation: {ports: ['8080']}}]}]}",
    );
    with(&[allow], || get(FOO, "/get", 200))?;
    let only_9999 = policy(
        "foo",
        "allow-9999",
        "",
        "{action: ALLOW, rules: [{to: [{operation: {ports: ['9999']}}]}]}",
    );
    with(&[only_9999], || get(FOO, "/get", 403))
}

fn deny_not_principals() -> Result<()> {
    let deny = policy(
        "foo",
        "deny-others",
        "",
        "{action: DENY, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/foo/sa/sleep]}}]}]}",
    );
    with(&[deny], || {
        get(FOO, "/get", 200)?;
        get(BAR, "/get", 403)?;
        // No principal at all is "not" the listed one.
        get(LEGACY, "/get", 403)
    })
}

fn deny_not_namespaces() -> Result<()> {
    let deny = policy(
        "foo",
        "deny-outside-foo",
        "",
        "{action: DENY, rules: [{from: [{source: {notNamespaces: [foo]}}]}]}",
    );
    with(&[deny], || {
        get(FOO, "/get", 200)?;
        get(LOCAL, "/get", 200)?;
        get(BAR, "/get", 403)
    })
}

fn deny_not_ip_blocks() -> Result<()> {
    let ip = pod_ip(FOO)?;
    let deny = policy(
        "foo",
        "deny-other-ips",
        "",
        &format!("{{action: DENY, rules: [{{from: [{{source: {{notIpBlocks: ['{ip}/32']}}}}]}}]}}"),
    );
    with(&[deny], || {
        get(FOO, "/get", 200)?;
        get(BAR, "/get", 403)?;
        get(LEGACY, "/get", 403)
    })
}

fn allow_not_methods_and_not_paths() -> Result<()> {
    let allow = policy(
        "foo",
        "allow-most",
        "",
        "{action: ALLOW, rules: [{to: [{operation: {notMethods: [DELETE], notPaths: ['/status/*']}}]}]}",
    );
    with(&[allow], || {
        expect(FOO, "GET", "/get", &[], 200)?;
        expect(FOO, "DELETE", "/delete", &[], 403)?;
        expect(FOO, "GET", "/status/200", &[], 403)
    })
}

fn deny_not_hosts_and_not_ports() -> Result<()> {
    let deny = policy(
        "foo",
        "deny-other-hosts",
        "",
        "{action: DENY, rules: [{to: [{operation: {notHosts: ['httpbin.foo:8000'], notPorts: ['9999']}}]}]}",
    );
    with(&[deny], || {
        expect(FOO, "GET", "/get", &[], 200)?;
        expect(FOO, "GET", "/get", &[("host", "evil.example")], 403)
    })
}

/// Principals with Istio's wildcards: `*`, a prefix and a suffix.
fn wildcard_principals() -> Result<()> {
    let prefix = policy(
        "foo",
        "allow-foo-prefix",
        "",
        "{action: ALLOW, rules: [{from: [{source: {principals: ['cluster.local/ns/foo/*']}}]}]}",
    );
    with(&[prefix], || {
        get(FOO, "/get", 200)?;
        get(LOCAL, "/get", 200)?;
        get(BAR, "/get", 403)
    })?;
    let suffix = policy(
        "foo",
        "allow-sleep-suffix",
        "",
        "{action: ALLOW, rules: [{from: [{source: {principals: ['*/sa/sleep']}}]}]}",
    );
    with(&[suffix], || {
        get(FOO, "/get", 200)?;
        get(BAR, "/get", 200)?;
        get(LOCAL, "/get", 403)
    })?;
    // `*`: any authenticated caller, never plaintext.
    let any = policy(
        "foo",
        "allow-any-principal",
        "",
        "{action: ALLOW, rules: [{from: [{source: {principals: ['*']}}]}]}",
    );
    with(&[any], || {
        get(BAR, "/get", 200)?;
        get(LEGACY, "/get", 403)
    })
}

/// Istio's TCP traffic task: ALLOW by port on a TCP service.
fn tcp_allow_by_port() -> Result<()> {
    let allow = policy(
        "foo",
        "tcp-policy",
        "",
        "{selector: {matchLabels: {app: tcp-echo}}, action: ALLOW, rules: [{to: [{operation: {ports: ['9000']}}]}]}",
    );
    with(&[allow], || {
        expect_tcp(FOO, "tcp-echo.foo:9000", true)?;
        expect_tcp(FOO, "tcp-echo.foo:9001", false)?;
        expect_tcp(LOCAL, "tcp-echo.foo:9001", false)
    })
}

/// An ALLOW rule with an HTTP-only field on a TCP port matches nothing: every connection is
/// denied (Istio's TCP task, "methods" on a TCP port).
fn tcp_port_http_only_allow_denies() -> Result<()> {
    let allow = policy(
        "foo",
        "tcp-allow-get",
        "",
        "{selector: {matchLabels: {app: tcp-echo}}, action: ALLOW, rules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]}",
    );
    with(&[allow], || expect_tcp(FOO, "tcp-echo.foo:9000", false))
}

/// A DENY rule with an HTTP-only field on a TCP port is read without it: it denies every
/// connection its other fields match.
fn tcp_port_http_only_deny_denies_all() -> Result<()> {
    let deny = policy(
        "foo",
        "tcp-deny-get",
        "",
        "{selector: {matchLabels: {app: tcp-echo}}, action: DENY, rules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]}",
    );
    with(&[deny], || {
        expect_tcp(FOO, "tcp-echo.foo:9000", false)?;
        expect_tcp(FOO, "tcp-echo.foo:9001", true)
    })
}

/// A caller on the server's node is known by its pod (the kernel's word): its principal
/// allows it, and another's does not.
fn same_node_caller_by_principal() -> Result<()> {
    let allow = policy(
        "foo",
        "allow-local",
        "",
        "{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep-local]}}]}]}",
    );
    with(&[allow], || {
        get(LOCAL, "/get", 200)?;
        get(FOO, "/get", 403)?;
        expect_tcp(LOCAL, "tcp-echo.foo:9000", true)?;
        expect_tcp(FOO, "tcp-echo.foo:9000", false)
    })?;
    let deny = policy(
        "foo",
        "deny-local",
        "",
        "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep-local]}}]}]}",
    );
    with(&[deny], || {
        get(LOCAL, "/get", 403)?;
        get(FOO, "/get", 200)
    })
}

/// Plaintext from outside the mesh (PERMISSIVE): no principal, no namespace; only IP rules
/// can allow it.
fn unmeshed_caller_only_ip_rules_allow() -> Result<()> {
    let ip = pod_ip(LEGACY)?;
    let by_namespace = policy(
        "foo",
        "allow-legacy-ns",
        "",
        "{action: ALLOW, rules: [{from: [{source: {namespaces: [legacy]}}]}]}",
    );
    with(&[by_namespace], || {
        get(LEGACY, "/get", 403)?;
        expect_tcp(LEGACY, "tcp-echo.foo:9000", false)
    })?;
    let by_ip = policy(
        "foo",
        "allow-legacy-ip",
        "",
        &format!("{{action: ALLOW, rules: [{{from: [{{source: {{ipBlocks: ['{ip}/32']}}}}]}}]}}"),
    );
    with(&[by_ip], || {
        get(LEGACY, "/get", 200)?;
        expect_tcp(LEGACY, "tcp-echo.foo:9000", true)?;
        get(FOO, "/get", 403)
    })
}

/// `when` conditions on the connection and the caller.
fn when_conditions() -> Result<()> {
    let ip = pod_ip(FOO)?;
    let allow = policy(
        "foo",
        "allow-when",
        "",
        &format!(
            "{{action: ALLOW, rules: [{{when: [\
             {{key: source.ip, values: ['{ip}']}}, \
             {{key: source.namespace, values: [foo]}}, \
             {{key: source.principal, values: ['cluster.local/ns/foo/sa/sleep']}}, \
             {{key: destination.port, values: ['8080']}}, \
             {{key: 'request.headers[x-user]', notValues: [mallory]}}]}}]}}"
        ),
    );
    with(&[allow], || {
        expect(FOO, "GET", "/get", &[], 200)?;
        expect(FOO, "GET", "/get", &[("x-user", "mallory")], 403)?;
        expect(BAR, "GET", "/get", &[], 403)
    })
}

/// Whether a TCP client from `pod` that starts with a TLS ClientHello for `name` reaches
/// `weft-demo peer` on `addr` (it speaks first once connected; a denied client is closed).
fn tls_client_reaches(pod: &str, addr: &str, name: &str) -> Result<bool> {
    const SCRIPT: &str = r#"
import socket, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=sys.argv[2])
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(outgoing.read())
try:
    said = s.recv(100)
except OSError:
    said = b""
print("reached" if said.startswith(b"peer=") else "closed")
"#;
    let python = xtask::setup::test_python().display().to_string();
    let out = probe::run(pod, &[python.as_str(), "-c", SCRIPT, addr, name])?;
    Ok(out.trim() == "reached")
}

/// `connection.sni` on a TCP port: the server name of the client's TLS ClientHello.
fn tcp_connection_sni() -> Result<()> {
    let deny = policy(
        "foo",
        "deny-sni",
        "",
        "{selector: {matchLabels: {app: tcp-echo}}, action: DENY, rules: [{when: [{key: connection.sni, values: ['*.blocked.example']}]}]}",
    );
    with(&[deny], || {
        for pod in [FOO, LOCAL] {
            for (name, reaches) in [("db.blocked.example", false), ("db.ok.example", true)] {
                let got = tls_client_reaches(pod, "tcp-echo.foo:9000", name)?;
                ensure!(
                    got == reaches,
                    "{pod}: a ClientHello for {name} {}",
                    if got {
                        "reached the server"
                    } else {
                        "was closed"
                    }
                );
            }
            // A client that does not start with TLS has no server name: not denied.
            expect_tcp(pod, "tcp-echo.foo:9000", true)?;
        }
        Ok(())
    })
}

/// gRPC callers get `PERMISSION_DENIED`, as Envoy's RBAC filter answers them.
fn grpc_caller_gets_permission_denied() -> Result<()> {
    let deny = policy(
        "foo",
        "deny-hello",
        "",
        "{action: DENY, rules: [{to: [{operation: {paths: ['/weft.demo.Echo/Hello']}}]}]}",
    );
    with(&[deny], || {
        for pod in [FOO, LOCAL] {
            let calls = grpc_calls(pod, "httpbin.foo:9090", "Hello", 2, &[])?;
            ensure!(
                calls.iter().all(|c| c.code == "PERMISSION_DENIED"),
                "{pod}: Hello answered {calls:?}"
            );
            let slow = grpc_calls(pod, "httpbin.foo:9090", "Slow", 1, &[])?;
            ensure!(
                slow.iter().all(|c| c.code == "OK"),
                "{pod}: Slow (not denied) answered {slow:?}"
            );
        }
        Ok(())
    })
}

/// Scope: a selector that matches no workload does nothing; `targetRefs` to the Service
/// applies to the pods behind it; a policy of the root namespace applies mesh-wide.
fn scope_selector_target_refs_and_root() -> Result<()> {
    let elsewhere = policy(
        "foo",
        "deny-other-app",
        "",
        "{selector: {matchLabels: {app: nobody}}, action: DENY, rules: [{}]}",
    );
    with(&[elsewhere], || get(FOO, "/get", 200))?;
    let by_service = policy(
        "foo",
        "deny-via-service",
        "",
        "{targetRefs: [{kind: Service, group: '', name: httpbin}], action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}",
    );
    with(&[by_service], || {
        expect(FOO, "POST", "/post", &[], 403)?;
        expect(FOO, "GET", "/get", &[], 200)
    })?;
    let mesh_wide = policy(
        "istio-system",
        "deny-mesh-delete",
        "",
        "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}",
    );
    with(&[mesh_wide], || {
        expect(BAR, "DELETE", "/delete", &[], 403)?;
        expect(BAR, "GET", "/get", &[], 200)
    })
}

/// Istio's trust domain migration: the nodes' trust domain is `cluster.local` with alias
/// `old-td` (`--trust-domain-aliases`); a policy written for `old-td` still names the
/// workload, one for an unrelated domain does not; an alias in MeshConfig works alike.
fn trust_domain_alias_principal() -> Result<()> {
    let old = policy(
        "foo",
        "allow-old-td",
        "",
        "{action: ALLOW, rules: [{from: [{source: {principals: [old-td/ns/foo/sa/sleep]}}]}]}",
    );
    with(&[old], || {
        get(FOO, "/get", 200)?;
        get(BAR, "/get", 403)
    })?;
    let foreign = policy(
        "foo",
        "allow-foreign-td",
        "",
        "{action: ALLOW, rules: [{from: [{source: {principals: [other-td/ns/foo/sa/sleep]}}]}]}",
    );
    with(&[foreign], || get(FOO, "/get", 403))?;
    // Istio's way to declare an alias: MeshConfig `trustDomainAliases`, in the `istio`
    // ConfigMap of the root namespace; it applies without a restart, and goes with it.
    let mesh_config = "apiVersion: v1\nkind: ConfigMap\n\
                       metadata: {name: istio, namespace: istio-system}\n\
                       data:\n  mesh: |\n    trustDomainAliases: [mesh-td]\n"
        .to_owned();
    let by_mesh_alias = policy(
        "foo",
        "allow-mesh-td",
        "",
        "{action: ALLOW, rules: [{from: [{source: {principals: [mesh-td/ns/foo/sa/sleep]}}]}]}",
    );
    with(std::slice::from_ref(&by_mesh_alias), || {
        get(FOO, "/get", 403)
    })?;
    with(&[mesh_config, by_mesh_alias], || get(FOO, "/get", 200))
}

/// Istio's dry run: the policy denies nothing, and what it would have denied is counted.
fn dry_run_denies_nothing_but_counts() -> Result<()> {
    let dry = policy(
        "foo",
        "dry-deny-headers",
        "{istio.io/dry-run: 'true'}",
        "{action: DENY, rules: [{to: [{operation: {paths: [/headers]}}]}]}",
    );
    let labels = [
        ("action", "DENY"),
        ("policy", "foo/dry-deny-headers"),
        ("result", "dry_run_denied"),
    ];
    with(&[dry], || {
        let before = decisions("node-2", &labels)?;
        get(FOO, "/headers", 200)?;
        get(LOCAL, "/headers", 200)?;
        get(FOO, "/get", 200)?;
        let counted = decisions("node-2", &labels)? - before;
        ensure!(
            counted == 2.0,
            "the dry run counted {counted} would-be denials, expected 2"
        );
        Ok(())
    })
}

/// AUDIT policies decide nothing and are counted.
fn audit_counts_and_decides_nothing() -> Result<()> {
    let audit = policy(
        "foo",
        "audit-post",
        "",
        "{action: AUDIT, rules: [{to: [{operation: {methods: [POST]}}]}]}",
    );
    let labels = [
        ("action", "AUDIT"),
        ("policy", "foo/audit-post"),
        ("result", "audited"),
    ];
    with(&[audit], || {
        let before = decisions("node-2", &labels)?;
        expect(FOO, "POST", "/post", &[], 200)?;
        expect(FOO, "GET", "/get", &[], 200)?;
        let counted = decisions("node-2", &labels)? - before;
        ensure!(counted == 1.0, "AUDIT counted {counted}, expected 1");
        Ok(())
    })
}

/// A policy applied while a client keeps one HTTP/1.1 connection open decides its next
/// requests, within a second.
fn policy_change_applies_on_open_keep_alive_connection() -> Result<()> {
    const SCRIPT: &str = r#"
import http.client, json, sys, time
conn = http.client.HTTPConnection("httpbin.foo", 8000, timeout=5)
out = []
end = time.time() + float(sys.argv[1])
while time.time() < end:
    start = time.time()
    conn.request("GET", "/get")
    reply = conn.getresponse()
    reply.read()
    out.append({"at": start, "status": reply.status, "port": conn.sock.getsockname()[1]})
    time.sleep(0.1)
print(json.dumps(out))
"#;
    let deny = policy(
        "foo",
        "deny-get-now",
        "",
        "{action: DENY, rules: [{to: [{operation: {paths: [/get]}}]}]}",
    );
    let python = xtask::setup::test_python().display().to_string();
    let client = thread::spawn(move || probe::run(FOO, &[python.as_str(), "-c", SCRIPT, "6"]));
    thread::sleep(Duration::from_millis(1500));
    let applied_at = with(&[deny], || {
        let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        // Keep the policy while the client runs on.
        thread::sleep(Duration::from_secs(3));
        Ok(at)
    });
    let out = client
        .join()
        .map_err(|_| anyhow!("the client thread panicked"))??;
    let at = applied_at?;
    let replies: Vec<Value> =
        serde_json::from_str(out.trim()).with_context(|| format!("the client printed {out:?}"))?;
    let ports: std::collections::BTreeSet<u64> =
        replies.iter().filter_map(|r| r["port"].as_u64()).collect();
    ensure!(
        ports.len() == 1,
        "the client used {} connections, not one: {replies:?}",
        ports.len()
    );
    let status_of = |r: &Value| r["status"].as_u64().unwrap_or(0);
    let when = |r: &Value| r["at"].as_f64().unwrap_or(0.0);
    let before: Vec<u64> = replies
        .iter()
        .filter(|r| when(r) < at - 0.5)
        .map(status_of)
        .collect();
    let after: Vec<u64> = replies
        .iter()
        .filter(|r| when(r) > at + 1.0 && when(r) < at + 3.0)
        .map(status_of)
        .collect();
    println!("    one connection; before the policy {before:?}, from 1 s after it {after:?}");
    ensure!(
        !before.is_empty() && before.iter().all(|s| *s == 200),
        "before the policy: {before:?}"
    );
    ensure!(
        !after.is_empty() && after.iter().all(|s| *s == 403),
        "a second after the policy: {after:?}"
    );
    Ok(())
}

/// What operators see of a denial: 403 in `istio_requests_total` at the destination, the
/// policy in the access log's response code details and in `weft_authz_decisions_total`,
/// and the policies in force per workload in `/debug/config`.
fn operators_see_the_denying_policy() -> Result<()> {
    let deny = policy(
        "foo",
        "deny-status",
        "",
        "{action: DENY, rules: [{to: [{operation: {paths: ['/status/*']}}]}]}",
    );
    with(&[deny], || {
        let requests = |m: &str| {
            sample_sum(
                m,
                "istio_requests_total",
                &[
                    ("reporter", "destination"),
                    ("destination_workload", "httpbin"),
                    ("response_code", "403"),
                ],
            )
        };
        let decided = [
            ("action", "DENY"),
            ("policy", "foo/deny-status"),
            ("result", "denied"),
        ];
        let before = metrics("node-2")?;
        get(FOO, "/status/418", 403)?;
        let after = metrics("node-2")?;
        ensure!(
            requests(&after) - requests(&before) == 1.0,
            "istio_requests_total at the destination did not count one 403"
        );
        ensure!(
            sample_sum(&after, "weft_authz_decisions_total", &decided)
                - sample_sum(&before, "weft_authz_decisions_total", &decided)
                == 1.0,
            "weft_authz_decisions_total did not count the denial"
        );
        let log = Path::new(cluster::RUN_DIR).join("logs/node-node-2.log");
        let text =
            fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        ensure!(
            text.contains("rbac_access_denied_matched_policy[ns[foo]-policy[deny-status]]"),
            "node-2's access log does not name the denying policy"
        );
        let config = probe::run(
            "node/node-2",
            &["curl", "-sf", "http://127.0.0.1:15020/debug/config"],
        )?;
        let config: Value = serde_json::from_str(&config)?;
        let listed = config["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|o| o["kind"] == "Pod" && o["namespace"] == "foo" && o["name"] == "httpbin")
            .map(|p| p["authorizationPolicies"].to_string())
            .unwrap_or_default();
        ensure!(
            listed.contains("foo/deny-status"),
            "/debug/config does not list the policy for foo/httpbin: {listed}"
        );
        Ok(())
    })
}

fn main() {
    let cases: &[probe::Case] = &[
        ("no_policy_allows_everything", no_policy_allows_everything),
        (
            "allow_nothing_denies_every_caller",
            allow_nothing_denies_every_caller,
        ),
        ("allow_by_principal", allow_by_principal),
        ("allow_by_namespace", allow_by_namespace),
        ("allow_by_ip_block", allow_by_ip_block),
        ("deny_by_path_wins_over_allow", deny_by_path_wins_over_allow),
        ("allow_by_method", allow_by_method),
        ("deny_by_header_not_values", deny_by_header_not_values),
        ("allow_by_port", allow_by_port),
        ("deny_not_principals", deny_not_principals),
        ("deny_not_namespaces", deny_not_namespaces),
        ("deny_not_ip_blocks", deny_not_ip_blocks),
        (
            "allow_not_methods_and_not_paths",
            allow_not_methods_and_not_paths,
        ),
        ("deny_not_hosts_and_not_ports", deny_not_hosts_and_not_ports),
        ("wildcard_principals", wildcard_principals),
        ("tcp_allow_by_port", tcp_allow_by_port),
        (
            "tcp_port_http_only_allow_denies",
            tcp_port_http_only_allow_denies,
        ),
        (
            "tcp_port_http_only_deny_denies_all",
            tcp_port_http_only_deny_denies_all,
        ),
        (
            "same_node_caller_by_principal",
            same_node_caller_by_principal,
        ),
        (
            "unmeshed_caller_only_ip_rules_allow",
            unmeshed_caller_only_ip_rules_allow,
        ),
        ("when_conditions", when_conditions),
        ("tcp_connection_sni", tcp_connection_sni),
        (
            "grpc_caller_gets_permission_denied",
            grpc_caller_gets_permission_denied,
        ),
        (
            "scope_selector_target_refs_and_root",
            scope_selector_target_refs_and_root,
        ),
        ("trust_domain_alias_principal", trust_domain_alias_principal),
        (
            "dry_run_denies_nothing_but_counts",
            dry_run_denies_nothing_but_counts,
        ),
        (
            "audit_counts_and_decides_nothing",
            audit_counts_and_decides_nothing,
        ),
        (
            "policy_change_applies_on_open_keep_alive_connection",
            policy_change_applies_on_open_keep_alive_connection,
        ),
        (
            "operators_see_the_denying_policy",
            operators_see_the_denying_policy,
        ),
    ];
    // Read once by the nodes when they start.
    std::env::set_var("WEFT_TRUST_DOMAIN_ALIASES", "old-td");
    std::env::set_var(cluster::NODE_LOG_ENV, "info,weft::access=debug");
    probe::run_suite("authz", || probe::up_with(CLUSTER), cases)
}
