//! `meshctl` as an operator runs it: the binary, its output and its exit codes. `analyze`, and
//! `explain` and `config dump` offline (`--config-dir`); the virtual cluster's suites run them
//! against live node proxies.

use std::process::Command;

fn meshctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("running meshctl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `meshctl explain` offline, on the configuration in `config`.
fn explain(config: &str, from: &str, url: &str, more: &[&str]) -> (i32, String) {
    let args = ["explain", "--config-dir", config, "--from", from, url];
    meshctl(&[&args[..], more].concat())
}

#[test]
fn the_examples_analyze_clean_and_a_broken_file_fails() {
    let (code, out) = meshctl(&["analyze", "examples/bookinfo"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No validation issues found"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - timeout: forever\n    route: [{destination: {host: reviews}}]\n",
    )
    .unwrap();
    let path = dir.path().display().to_string();
    let (code, out) = meshctl(&["analyze", &path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("Error [IST0106] (VirtualService default/reviews ")
            && out.contains("broken.yaml:1) rejected by Weft: spec.http[0].timeout"),
        "{out}"
    );
    let (code, out) = meshctl(&["analyze", "--json", &path]);
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["findings"][0]["level"], "Error");
    assert_eq!(
        json["findings"][0]["resource"],
        "VirtualService default/reviews"
    );

    let (code, out) = meshctl(&["analyze", "/nonexistent/weft"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot read /nonexistent/weft"), "{out}");
}

/// Bookinfo with the request-routing task's rules and its AuthorizationPolicies, in a directory.
fn bookinfo(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    for file in [
        "bookinfo/bookinfo.yaml",
        "bookinfo-traffic/destination-rule-all.yaml",
        "bookinfo-traffic/virtual-service-reviews-test-v2.yaml",
        "demo/authz-bookinfo.yaml",
        "demo/clients.yaml",
    ]
    .iter()
    .chain(extra)
    {
        let name = file.replace('/', "-");
        std::fs::copy(format!("{root}/{file}"), dir.path().join(name)).unwrap();
    }
    dir
}

#[test]
fn explain_offline_follows_jasons_request_to_reviews_v2() {
    let dir = bookinfo(&[]);
    let config = dir.path().display().to_string();
    let (code, out) = explain(
        &config,
        "default/productpage-v1",
        "http://reviews:9080/reviews/0",
        &["-H", "end-user: jason", "--json"],
    );
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        json["source"]["identity"],
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    );
    assert_eq!(
        json["outcome"],
        "rule VirtualService default/reviews http[0]"
    );
    assert_eq!(json["routes"]["rules"][0]["reason"], "matched");
    let backend = &json["backends"][0];
    assert_eq!(
        backend["cluster"],
        "outbound|9080|v2|reviews.default.svc.cluster.local"
    );
    assert_eq!(backend["weight"], "100");
    assert!(
        backend["policy"][0] == "DestinationRule default/reviews",
        "{backend}"
    );
    // Only v2's pod, on the other node, over HBONE; the files give it no address yet.
    let endpoints = backend["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "{backend}");
    assert_eq!(endpoints[0]["pod"], "default/reviews-v2");
    assert!(
        endpoints[0]["path"]
            .as_str()
            .unwrap()
            .contains("HBONE (mTLS, port 15008) to node-2"),
        "{backend}"
    );
    assert_eq!(
        endpoints[0]["authorization"],
        "allowed by ALLOW policy default/reviews-viewer"
    );

    // Without the header the first rule fails on it, and v1 serves.
    let (code, out) = explain(
        &config,
        "default/productpage-v1",
        "http://reviews:9080/reviews/0",
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("- VirtualService default/reviews http[0] [header end-user exact \"jason\"]: header end-user exact \"jason\": absent"),
        "{out}"
    );
    assert!(
        out.contains("Backend:     outbound|9080|v1|reviews.default.svc.cluster.local (100%)"),
        "{out}"
    );

    // The sleep pod may not call reviews: the policy that decides is named.
    let (code, out) = explain(
        &config,
        "default/sleep",
        "http://reviews.default:9080/reviews/0",
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("authorization: denied (403): ALLOW policies apply and none matches"),
        "{out}"
    );

    // An unmeshed client's traffic is not captured at all.
    let (code, out) = explain(
        &config,
        "legacy/client",
        "http://reviews.default:9080/",
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Outcome:     not captured: namespace legacy is not in the mesh"),
        "{out}"
    );
}

#[test]
fn explain_refuses_what_it_cannot_answer() {
    let dir = bookinfo(&[]);
    let config = dir.path().display().to_string();
    for (from, url, header, error) in [
        (
            "productpage-v1",
            "http://reviews:9080/",
            "a: b",
            "--from must be NAMESPACE/POD",
        ),
        (
            "default/nobody",
            "http://reviews:9080/",
            "a: b",
            "no pod default/nobody",
        ),
        (
            "default/sleep",
            "https://reviews:9080/",
            "a: b",
            "only http://",
        ),
        (
            "default/sleep",
            "reviews:9080/",
            "a: b",
            "is not an http:// URL",
        ),
        (
            "default/sleep",
            "http://reviews:9080/",
            "no colon",
            "header \"no colon\"",
        ),
    ] {
        let (code, out) = explain(&config, from, url, &["-H", header]);
        assert_eq!(code, 2, "{out}");
        assert!(
            out.starts_with("meshctl: ") && out.contains(error),
            "{error}: {out}"
        );
    }
}

#[test]
fn config_dump_offline_lists_routes_clusters_and_policies() {
    let dir = bookinfo(&[]);
    let config = dir.path().display().to_string();
    let (code, out) = meshctl(&["config", "dump", "--config-dir", &config, "--json"]);
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let routes = json["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "{out}");
    assert_eq!(routes[0]["host"], "reviews.default.svc.cluster.local");
    assert_eq!(
        routes[0]["rules"][0]["requires"],
        "header end-user exact \"jason\""
    );
    assert_eq!(routes[0]["rules"][0]["action"], "route reviews v2 (100%)");
    let clusters: Vec<&str> = json["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["cluster"].as_str())
        .collect();
    for name in [
        "outbound|9080||reviews.default.svc.cluster.local",
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080|v3|reviews.default.svc.cluster.local",
    ] {
        assert!(clusters.contains(&name), "{name}: {clusters:?}");
    }
    let policies = json["policies"].as_array().unwrap();
    let reviews = policies
        .iter()
        .find(|p| p["pod"] == "default/reviews-v2")
        .unwrap();
    assert_eq!(reviews["mtls"], "PERMISSIVE");
    let names: Vec<&str> = reviews["authorizationPolicies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .collect();
    assert_eq!(names, ["default/allow-nothing", "default/reviews-viewer"]);

    let (code, out) = meshctl(&["config", "dump", "routes", "--config-dir", &config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("SERVICE "), "{out}");
    assert!(
        out.contains("VirtualService default/reviews http[1]"),
        "{out}"
    );

    // `status` and `--node` read running proxies only.
    let (code, out) = meshctl(&["status", "--config-dir", &config]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = meshctl(&[
        "config",
        "dump",
        "--node",
        "node-1",
        "--config-dir",
        &config,
    ]);
    assert_eq!(code, 2, "{out}");
    // Nothing answers on this address: a clear error, not a hang.
    let (code, out) = meshctl(&["status", "--admin", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cannot reach the node admin at 127.0.0.1:1"),
        "{out}"
    );
}

#[test]
fn explain_sees_the_request_as_the_proxy_does() {
    let dir = bookinfo(&[]);
    std::fs::write(
        dir.path().join("details.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: details, namespace: default}\nspec:\n  hosts: [details]\n  http:\n  - match: [{uri: {prefix: /public}}]\n    route: [{destination: {host: details}}]\n  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new}\n  - route: [{destination: {host: details}}]\n    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n",
    )
    .unwrap();
    let config = dir.path().display().to_string();
    let explain = |url: &str| {
        let (code, out) = explain(&config, "default/productpage-v1", url, &["--json"]);
        assert_eq!(code, 0, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    // The path is normalized before it is routed: `..` cannot climb out of /public.
    let climbed = explain("http://details:9080/public/%2e%2e/admin");
    assert_eq!(
        climbed["routes"]["rules"][0]["reason"],
        "uri prefix \"/public\": the path is \"/admin\""
    );
    assert_eq!(
        climbed["outcome"],
        "rule VirtualService default/details http[2]: the fault aborts every request before it leaves"
    );
    // A redirect keeps the request's host and port.
    let moved = explain("http://details:9080/old/page");
    assert_eq!(
        moved["outcome"],
        "rule VirtualService default/details http[1] answers a redirect to http://details:9080/new"
    );
    // A port the Service does not declare: refused, as the proxy refuses it.
    let closed = explain("http://details:9999/");
    assert_eq!(
        closed["outcome"],
        "refused (UH): default/details declares no TCP port 9999 and no tcp rule takes it"
    );
}

#[test]
fn control_characters_in_a_configuration_do_not_reach_the_terminal() {
    let dir = bookinfo(&[]);
    std::fs::write(
        dir.path().join("evil.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: details, namespace: default}\nspec:\n  hosts: [details]\n  http:\n  - redirect: {authority: \"x\\e]52;c;cHduZWQ=\\a\\nauthorization: allowed\"}\n",
    )
    .unwrap();
    let config = dir.path().display().to_string();
    let (code, out) = meshctl(&["config", "dump", "routes", "--config-dir", &config]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("redirect 301 x\\u{1b}]52;c;cHduZWQ=\\u{7}\\u{a}authorization: allowed"),
        "{out}"
    );
    assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
    assert!(
        !out.lines().any(|l| l.starts_with("authorization")),
        "{out}"
    );
}
