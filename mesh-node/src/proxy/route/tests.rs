use std::collections::BTreeMap;

use http::{Method, Request};

use super::{rewrite::split_host_port, *};
use crate::source::{assemble, file::parse_documents};

const BOOKINFO: &str = include_str!("../../../../examples/bookinfo/bookinfo.yaml");

macro_rules! traffic {
    ($file:literal) => {
        include_str!(concat!("../../../../examples/bookinfo-traffic/", $file))
    };
}

/// Namespaces and Services besides Bookinfo's.
const EXTRA: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: frontend}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: default}
spec: {selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v3, namespace: default}
spec: {selector: {app: reviews, version: v3}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: frontend}
spec: {ports: [{name: http, port: 80}, {name: admin, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.96.0.20, ports: [{name: mysql, port: 3306}, {name: admin, port: 33060}]}
"#;

fn snapshot(docs: &[&str]) -> Snapshot {
    let mut objects = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        for (line, result) in parse_documents(&format!("doc{i}.yaml"), doc.as_bytes()) {
            match result {
                Ok(object) => objects.push(object),
                Err(e) => panic!("document {i}, line {line}: {e:?}"),
            }
        }
    }
    assemble(&objects, None)
}

fn build(docs: &[&str]) -> RouteIndex {
    let mut all = vec![BOOKINFO, EXTRA];
    all.extend_from_slice(docs);
    RouteIndex::build(&snapshot(&all))
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

fn pod(ns: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        key: key(ns, "client"),
        uid: None,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        annotations: Labels::new(),
        node: None,
        ip: None,
        service_account: "default".into(),
        ports: vec![],
        controller: None,
    }
}

fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

fn info<'a>(parts: &'a Parts, port: u16, source: Option<&'a Pod>) -> RequestInfo<'a> {
    RequestInfo {
        method: &parts.method,
        uri: &parts.uri,
        authority: parts
            .uri
            .authority()
            .map(Authority::as_str)
            .or_else(|| parts.headers.get(header::HOST)?.to_str().ok())
            .unwrap_or_default(),
        headers: &parts.headers,
        port,
        source,
    }
}

/// The rule's name, `unrouted` or `no match`.
fn outcome(
    routes: Option<&Arc<ServiceRoutes>>,
    parts: &Parts,
    port: u16,
    source: Option<&Pod>,
) -> String {
    let Some(routes) = routes else {
        return "unrouted".into();
    };
    match routes.select(&info(parts, port, source)) {
        Selection::Unrouted => "unrouted".into(),
        Selection::NoMatch => "no match".into(),
        Selection::Rule(s) => s.rule.name.to_string(),
    }
}

fn selected<'a>(
    routes: &'a ServiceRoutes,
    parts: &Parts,
    port: u16,
    source: Option<&Pod>,
) -> Selected<'a> {
    match routes.select(&info(parts, port, source)) {
        Selection::Rule(s) => s,
        other => panic!("expected a rule, got {other:?}"),
    }
}

/// A deterministic stream of uniform rolls.
fn rolls(n: usize) -> impl Iterator<Item = u32> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..n).map(move |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 32) as u32
    })
}

fn subset_shares(rule: &Rule) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for roll in rolls(10_000) {
        let name = rule.pick(roll).map_or("none".to_owned(), |b| {
            format!("{}:{}", b.host, b.subset.as_deref().unwrap_or("-"))
        });
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[test]
fn bookinfo_jason_goes_to_reviews_v2() {
    let vs = traffic!("virtual-service-reviews-test-v2.yaml");
    let index = build(&[vs]);
    let productpage = pod("default", &[("app", "productpage"), ("version", "v1")]);
    let routes = index.get(&key("default", "reviews")).unwrap();

    let jason = head(
        "GET",
        "/reviews/0",
        &[("host", "reviews:9080"), ("end-user", "jason")],
    );
    let s = selected(routes, &jason, 9080, Some(&productpage));
    assert_eq!(&*s.rule.name, "VirtualService default/reviews http[0]");
    let backend = s.rule.pick(12345).unwrap();
    assert_eq!(backend.service, Some(key("default", "reviews")));
    assert_eq!(backend.subset.as_deref(), Some("v2"));
    assert_eq!(backend.port, None);

    for headers in [
        vec![],
        vec![("end-user", "Jason")],
        vec![("end-user", "jason2")],
    ] {
        let other = head("GET", "/reviews/0", &headers);
        let s = selected(routes, &other, 9080, Some(&productpage));
        assert_eq!(&*s.rule.name, "VirtualService default/reviews http[1]");
        assert_eq!(s.rule.pick(0).unwrap().subset.as_deref(), Some("v1"));
    }
    // Services no route names have no table at all.
    assert!(index.get(&key("default", "details")).is_none());
}

#[test]
fn bookinfo_fault_rules_keep_their_faults() {
    let index = build(&[traffic!("virtual-service-ratings-test-delay.yaml")]);
    let routes = index.get(&key("default", "ratings")).unwrap();
    let jason = head("GET", "/ratings/0", &[("end-user", "jason")]);
    let s = selected(routes, &jason, 9080, None);
    let delay = s.rule.fault.as_ref().unwrap().delay.as_ref().unwrap();
    assert_eq!(delay.fixed_delay, Duration::from_secs(7));
    assert_eq!(delay.percentage, 100.0);
    assert!(
        s.rule.retries.is_none(),
        "unset retries leave Istio's default to the caller"
    );
    let plain = head("GET", "/ratings/0", &[]);
    assert!(selected(routes, &plain, 9080, None).rule.fault.is_none());
}

#[test]
fn weights_split_traffic() {
    let index = build(&[traffic!("virtual-service-reviews-50-v3.yaml")]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let s = selected(routes, &head("GET", "/", &[]), 9080, None);
    let shares = subset_shares(s.rule);
    assert_eq!(shares.len(), 2, "{shares:?}");
    for share in shares.values() {
        assert!((4_700..=5_300).contains(share), "{shares:?}");
    }
    assert_eq!(s.rule.pick(0).unwrap().subset.as_deref(), Some("v1"));
    assert_eq!(s.rule.pick(u32::MAX).unwrap().subset.as_deref(), Some("v3"));

    // The Gateway API flavour of the same split, through Services per version.
    let gamma = build(&[traffic!("httproute-reviews-50-v3.yaml")]);
    let routes = gamma.get(&key("default", "reviews")).unwrap();
    let s = selected(routes, &head("GET", "/x", &[]), 9080, None);
    assert_eq!(&*s.rule.name, "HTTPRoute default/reviews rules[0]");
    let shares = subset_shares(s.rule);
    assert!(
        (4_700..=5_300).contains(&shares["reviews-v1.default.svc.cluster.local:-"]),
        "{shares:?}"
    );
    assert!(
        (4_700..=5_300).contains(&shares["reviews-v3.default.svc.cluster.local:-"]),
        "{shares:?}"
    );
    assert_eq!(
        s.rule.pick(1).unwrap().service,
        Some(key("default", "reviews-v1"))
    );
    assert_eq!(s.rule.pick(1).unwrap().port, Some(9080));
    // The route names port 9080 only.
    assert_eq!(
        outcome(Some(routes), &head("GET", "/x", &[]), 9081, None),
        "unrouted"
    );
}

#[test]
fn single_and_zero_weights() {
    let index = build(&[
        traffic!("virtual-service-all-v1.yaml"),
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  http:
  - route:
    - {destination: {host: db, subset: a}, weight: 100}
    - {destination: {host: db, subset: b}, weight: 0}
"#,
    ]);
    for service in ["productpage", "reviews", "ratings", "details"] {
        let routes = index.get(&key("default", service)).unwrap();
        let s = selected(routes, &head("GET", "/", &[]), 9080, None);
        let shares = subset_shares(s.rule);
        assert_eq!(shares.len(), 1, "{service}: {shares:?}");
        assert_eq!(shares.values().next(), Some(&10_000));
    }
    let routes = index.get(&key("default", "db")).unwrap();
    let shares = subset_shares(selected(routes, &head("GET", "/", &[]), 3306, None).rule);
    assert_eq!(shares, BTreeMap::from([("db:a".to_owned(), 10_000)]));
}

fn vs(name: &str, ns: &str, extra: &str, http: &str) -> String {
    format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{extra}\n  http:\n{http}"
        )
}

fn route_to(host: &str) -> String {
    format!("  - route: [{{destination: {{host: {host}}}}}]\n")
}

#[test]
fn hosts_name_services_in_every_form() {
    let index = build(&[
        &vs(
            "short",
            "default",
            "  hosts: [reviews]",
            &route_to("reviews"),
        ),
        &vs(
            "two",
            "other",
            "  hosts: [ratings.default]",
            &route_to("ratings"),
        ),
        &vs(
            "three",
            "other",
            "  hosts: [web.frontend.svc]",
            &route_to("web"),
        ),
        &vs(
            "fqdn",
            "frontend",
            "  hosts: [details.default.svc.cluster.local]",
            &route_to("details.default"),
        ),
        &vs(
            "wild",
            "other",
            "  hosts: ['*.default.svc.cluster.local']",
            &route_to("productpage.default.svc.cluster.local"),
        ),
        &vs(
            "external",
            "default",
            "  hosts: [www.example.com]",
            &route_to("www.example.com"),
        ),
    ]);
    let get = |ns, name| {
        outcome(
            index.get(&key(ns, name)),
            &head("GET", "/", &[]),
            9080,
            None,
        )
    };
    assert_eq!(
        get("default", "reviews"),
        "VirtualService default/short http[0]"
    );
    assert_eq!(
        get("default", "ratings"),
        "VirtualService other/two http[0]"
    );
    assert_eq!(get("frontend", "web"), "VirtualService other/three http[0]");
    assert_eq!(
        get("default", "details"),
        "VirtualService frontend/fqdn http[0]"
    );
    // The wildcard reaches every Service of `default` no exact host claims.
    assert_eq!(
        get("default", "productpage"),
        "VirtualService other/wild http[0]"
    );
    assert_eq!(get("default", "db"), "VirtualService other/wild http[0]");

    // Destinations resolve relative to the VirtualService's namespace.
    let routes = index.get(&key("default", "ratings")).unwrap();
    let s = selected(routes, &head("GET", "/", &[]), 9080, None);
    assert_eq!(
        s.rule.pick(0).unwrap().service,
        None,
        "`ratings` in `other` is no Service"
    );
    assert_eq!(&*s.rule.pick(0).unwrap().host, "ratings");
    let routes = index.get(&key("default", "details")).unwrap();
    let s = selected(routes, &head("GET", "/", &[]), 9080, None);
    assert_eq!(
        s.rule.pick(0).unwrap().service,
        Some(key("default", "details"))
    );
    // `default`'s seven Services and `frontend/web`; the external host attaches nowhere.
    assert_eq!(index.services.len(), 8);
}

#[test]
fn export_to_and_namespace_preference() {
    let index = build(&[
        &vs(
            "private",
            "default",
            "  hosts: [reviews]\n  exportTo: ['.']",
            &route_to("reviews"),
        ),
        &vs(
            "mine",
            "frontend",
            "  hosts: [ratings.default.svc.cluster.local]\n  exportTo: ['.']",
            &route_to("ratings.default"),
        ),
        &vs(
            "producer",
            "default",
            "  hosts: [ratings]",
            &route_to("ratings"),
        ),
        &vs(
            "zzz",
            "other",
            "  hosts: [ratings.default]\n  exportTo: [frontend, other]",
            &route_to("ratings.default"),
        ),
    ]);
    let request = head("GET", "/", &[]);
    let reviews = index.get(&key("default", "reviews"));
    let local = pod("default", &[]);
    let frontend = pod("frontend", &[]);
    let other = pod("other", &[]);
    assert_eq!(
        outcome(reviews, &request, 9080, Some(&local)),
        "VirtualService default/private http[0]"
    );
    assert_eq!(
        outcome(reviews, &request, 9080, Some(&frontend)),
        "unrouted"
    );
    assert_eq!(outcome(reviews, &request, 9080, None), "unrouted");

    let ratings = index.get(&key("default", "ratings"));
    // The client's namespace first, then the Service's, then the smallest key.
    assert_eq!(
        outcome(ratings, &request, 9080, Some(&frontend)),
        "VirtualService frontend/mine http[0]"
    );
    assert_eq!(
        outcome(ratings, &request, 9080, Some(&local)),
        "VirtualService default/producer http[0]"
    );
    assert_eq!(
        outcome(ratings, &request, 9080, Some(&other)),
        "VirtualService other/zzz http[0]"
    );
    assert_eq!(
        outcome(ratings, &request, 9080, None),
        "VirtualService default/producer http[0]"
    );
}

#[test]
fn exact_hosts_beat_wildcards() {
    let index = build(&[
        &vs(
            "wild",
            "default",
            "  hosts: ['*.default.svc.cluster.local']",
            &route_to("reviews"),
        ),
        &vs(
            "exact",
            "other",
            "  hosts: [reviews.default.svc.cluster.local]",
            &route_to("reviews.default"),
        ),
    ]);
    let request = head("GET", "/", &[]);
    let local = pod("default", &[]);
    assert_eq!(
        outcome(
            index.get(&key("default", "reviews")),
            &request,
            9080,
            Some(&local)
        ),
        "VirtualService other/exact http[0]"
    );
    assert_eq!(
        outcome(
            index.get(&key("default", "ratings")),
            &request,
            9080,
            Some(&local)
        ),
        "VirtualService default/wild http[0]"
    );
}

#[test]
fn no_match_versus_unrouted() {
    let index = build(&[
            &vs("reviews", "default", "  hosts: [reviews]", "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews}}]\n"),
            &vs("ratings", "default", "  hosts: [ratings]", "  - match: [{port: 8080}]\n    route: [{destination: {host: ratings}}]\n  - match: [{sourceLabels: {app: admin}}, {gateways: [ingress]}]\n    route: [{destination: {host: ratings}}]\n"),
            &vs("gateway-only", "default", "  hosts: [details]\n  gateways: [ingress]", "  - route: [{destination: {host: details}}]\n"),
            &vs("tcp-only", "default", "  hosts: [db]", "")
                .replace("  http:\n", "  tcp:\n  - route: [{destination: {host: db}}]\n"),
        ]);
    let request = head("GET", "/", &[]);
    let client = pod("default", &[("app", "productpage")]);
    assert_eq!(
        outcome(
            index.get(&key("default", "reviews")),
            &request,
            9080,
            Some(&client)
        ),
        "no match"
    );
    // Every rule names another port or other clients: the VirtualService says nothing here.
    let ratings = index.get(&key("default", "ratings"));
    assert_eq!(outcome(ratings, &request, 9080, Some(&client)), "unrouted");
    assert_eq!(
        outcome(ratings, &request, 8080, Some(&client)),
        "VirtualService default/ratings http[0]"
    );
    let admin = pod("default", &[("app", "admin"), ("version", "v1")]);
    assert_eq!(
        outcome(ratings, &request, 9080, Some(&admin)),
        "VirtualService default/ratings http[1]"
    );
    assert!(index.get(&key("default", "details")).is_none());
    assert_eq!(
        outcome(
            index.get(&key("default", "db")),
            &request,
            3306,
            Some(&client)
        ),
        "unrouted"
    );
    assert!(RouteIndex::default()
        .get(&key("default", "reviews"))
        .is_none());
}

#[test]
fn istio_match_fields() {
    let http = r#"  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /CaSe}, ignoreUriCase: true}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {regex: '/items/[0-9]+'}}]
    route: [{destination: {host: reviews}}]
  - match: [{method: {exact: DELETE}}]
    route: [{destination: {host: reviews}}]
  - match: [{authority: {prefix: reviews.default}}]
    route: [{destination: {host: reviews}}]
  - match: [{queryParams: {debug: {}, page: {regex: '[0-9]+'}}}]
    route: [{destination: {host: reviews}}]
  - match: [{headers: {x-a: {prefix: yes}}, withoutHeaders: {x-b: {}}}]
    route: [{destination: {host: reviews}}]
  - match: [{sourceNamespace: frontend, uri: {prefix: /ns}}]
    route: [{destination: {host: reviews}}]
  - match: [{scheme: {exact: https}}]
    route: [{destination: {host: reviews}}]
  - match: [{headers: {x-multi: {exact: 'a,b'}}}]
    route: [{destination: {host: reviews}}]
"#;
    let index = build(&[&vs("m", "default", "  hosts: [reviews]", http)]);
    let routes = index.get(&key("default", "reviews"));
    let client = pod("default", &[]);
    let frontend = pod("frontend", &[]);
    let rule = |n: usize| format!("VirtualService default/m http[{n}]");
    let check = |method: &str, uri: &str, headers: &[(&str, &str)], source: &Pod, want: &str| {
        assert_eq!(
            outcome(routes, &head(method, uri, headers), 9080, Some(source)),
            want,
            "{method} {uri} {headers:?}"
        );
    };
    check("GET", "/exact", &[], &client, &rule(0));
    check("GET", "/exact?q=1", &[], &client, &rule(0));
    check("GET", "/exact/more", &[], &client, "no match");
    check("GET", "/case/x", &[], &client, &rule(1));
    check("GET", "/items/42", &[], &client, &rule(2));
    check("GET", "/items/42/x", &[], &client, "no match");
    check("DELETE", "/", &[], &client, &rule(3));
    check(
        "GET",
        "/",
        &[("host", "reviews.default:9080")],
        &client,
        &rule(4),
    );
    check("GET", "/?debug&page=3", &[], &client, &rule(5));
    check("GET", "/?page=3", &[], &client, "no match");
    check("GET", "/?debug=1&page=x", &[], &client, "no match");
    check("GET", "/", &[("x-a", "yes-please")], &client, &rule(6));
    check(
        "GET",
        "/",
        &[("x-a", "yes"), ("x-b", "")],
        &client,
        "no match",
    );
    check("GET", "/ns/1", &[], &frontend, &rule(7));
    check("GET", "/ns/1", &[], &client, "no match");
    check("GET", "https://reviews/", &[], &client, &rule(8));
    check(
        "GET",
        "/",
        &[("x-multi", "a"), ("x-multi", "b")],
        &client,
        &rule(9),
    );
    // Rules are tried in order: the exact match comes first whatever else holds.
    check("DELETE", "/exact", &[], &client, &rule(0));
}

#[test]
fn istio_rewrites() {
    let http = r#"  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {exact: /old}}]
    rewrite: {uri: /new, authority: reviews.internal}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /service/}}]
    rewrite: {uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\2/instance/\1'}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /host}}]
    headers: {request: {set: {':authority': set.example}}}
    route: [{destination: {host: reviews}}]
  - rewrite: {uri: /root/}
    route: [{destination: {host: reviews}}]
"#;
    let index = build(&[&vs("rw", "default", "  hosts: [reviews]", http)]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let rewritten = |uri: &str, headers: &[(&str, &str)]| {
        let mut parts = head("GET", uri, headers);
        let s = selected(routes, &parts, 9080, None);
        s.rewrite(&mut parts);
        parts
    };
    assert_eq!(rewritten("/v1/items?x=1", &[]).uri, "/api/items?x=1");
    let parts = rewritten("/old", &[("host", "reviews:9080")]);
    assert_eq!(parts.uri, "/new");
    assert_eq!(parts.headers[header::HOST], "reviews.internal");
    assert_eq!(
        rewritten("/service/foo/v1/api", &[]).uri,
        "/v1/api/instance/foo"
    );
    // Without a uri condition Istio matches the prefix `/`, which the rewrite replaces.
    assert_eq!(rewritten("/other/x", &[]).uri, "/root/other/x");

    // An authority set as a header reaches the URI of HTTP/2 requests too.
    let mut h2 = head("GET", "http://reviews:9080/host/1", &[]);
    h2.version = Version::HTTP_2;
    let s = selected(routes, &h2, 9080, None);
    assert!(s.rule.request_headers.is_empty());
    s.rewrite(&mut h2);
    assert_eq!(h2.uri, "http://set.example/host/1");
    assert!(h2.headers.get(header::HOST).is_none());
    let h1 = rewritten("/host/1", &[("host", "reviews")]);
    assert_eq!(h1.headers[header::HOST], "set.example");
    assert_eq!(h1.uri, "/host/1");
}

#[test]
fn istio_redirects_and_direct_responses() {
    let http = r#"  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /new}
  - match: [{uri: {exact: /away}}]
    redirect: {authority: example.com, redirectCode: 308}
  - match: [{uri: {exact: /secure}}]
    redirect: {scheme: https, derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {exact: /port}}]
    redirect: {port: 8443, uri: '/p?x=1'}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
"#;
    let index = build(&[&vs("rd", "default", "  hosts: [reviews]", http)]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let location = |uri: &str| {
        let parts = head("GET", uri, &[("host", "reviews:9080")]);
        let response = selected(routes, &parts, 9080, None)
            .redirect(&parts)
            .unwrap();
        (
            response.status().as_u16(),
            response.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_owned(),
        )
    };
    assert_eq!(
        location("/moved?q=1"),
        (301, "http://reviews:9080/new?q=1".to_owned())
    );
    assert_eq!(
        location("/away"),
        (308, "http://example.com/away".to_owned())
    );
    assert_eq!(
        location("/secure"),
        (301, "https://reviews:9080/secure".to_owned())
    );
    assert_eq!(
        location("/port?q=2"),
        (301, "http://reviews:8443/p?x=1".to_owned())
    );

    let parts = head("GET", "/teapot", &[]);
    let s = selected(routes, &parts, 9080, None);
    assert!(s.redirect(&parts).is_none());
    assert!(s.rule.pick(0).is_none());
    assert_eq!(
        s.rule.action,
        RuleAction::Respond {
            status: 418,
            body: Some("short and stout".into())
        }
    );
}

#[test]
fn header_operations() {
    let http = r#"  - headers:
      request: {set: {x-set: one}, add: {x-add: two}, remove: [x-gone]}
      response: {set: {x-served-by: weft}}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
      headers: {request: {add: {x-subset: v1}}, response: {remove: [server]}}
    - destination: {host: reviews, subset: v2}
      weight: 10
"#;
    let index = build(&[&vs("h", "default", "  hosts: [reviews]", http)]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let parts = head("GET", "/", &[]);
    let s = selected(routes, &parts, 9080, None);
    let mut headers = HeaderMap::new();
    headers.insert("x-set", HeaderValue::from_static("old"));
    headers.append("x-set", HeaderValue::from_static("older"));
    headers.insert("x-add", HeaderValue::from_static("one"));
    headers.insert("x-gone", HeaderValue::from_static("bye"));
    apply_header_ops(&s.rule.request_headers, &mut headers);
    assert_eq!(headers.get_all("x-set").iter().collect::<Vec<_>>(), ["one"]);
    assert_eq!(
        headers.get_all("x-add").iter().collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert!(!headers.contains_key("x-gone"));
    assert_eq!(s.rule.response_headers.set[0].value.as_ref(), "weft");

    let v1 = s.rule.pick(0).unwrap();
    assert_eq!(v1.subset.as_deref(), Some("v1"));
    assert_eq!(&*v1.request_headers.add[0].name, "x-subset");
    assert_eq!(&*v1.response_headers.remove[0], "server");
    assert!(s.rule.pick(u32::MAX).unwrap().request_headers.is_empty());

    // Names and values the map cannot hold are skipped, `:authority` is `Host`.
    let ops = HeaderOps {
        set: Arc::from([
            Header {
                name: ":authority".into(),
                value: "a.example".into(),
            },
            Header {
                name: "bad name".into(),
                value: "x".into(),
            },
            Header {
                name: "x-ok".into(),
                value: "bad\nvalue".into(),
            },
        ]),
        ..HeaderOps::default()
    };
    let mut headers = HeaderMap::new();
    apply_header_ops(&ops, &mut headers);
    assert_eq!(headers.len(), 1);
    assert_eq!(headers[header::HOST], "a.example");
}

#[test]
fn retries_timeouts_mirrors() {
    let http = r#"  - match: [{uri: {prefix: /default}}]
    retries: {attempts: 3, perTryTimeout: 2s}
    timeout: 10s
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /explicit}}]
    retries: {attempts: 1, retryOn: 'gateway-error,429'}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /off}}]
    retries: {attempts: 0}
    mirror: {host: ratings, port: {number: 9080}}
    mirrorPercentage: {value: 25.0}
    route: [{destination: {host: reviews}}]
"#;
    let index = build(&[&vs("r", "default", "  hosts: [reviews]", http)]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let rule = |uri: &str| selected(routes, &head("GET", uri, &[]), 9080, None).rule;

    let r = rule("/default");
    let plan = r.retries.as_ref().unwrap();
    assert_eq!(plan.attempts, 3);
    assert_eq!(plan.per_try_timeout, Some(Duration::from_secs(2)));
    for p in [
        RetryPolicy::ConnectFailure,
        RetryPolicy::RefusedStream,
        RetryPolicy::Unavailable,
        RetryPolicy::Cancelled,
        RetryPolicy::RetriableStatusCodes,
    ] {
        assert!(plan.on(p), "{p:?}");
    }
    assert!(!plan.on(RetryPolicy::FiveXx));
    assert!(plan.retries_status(503) && !plan.retries_status(500));
    assert_eq!(r.timeout, Some(Duration::from_secs(10)));

    let r = rule("/explicit");
    let plan = r.retries.as_ref().unwrap();
    assert!(plan.on(RetryPolicy::GatewayError) && plan.on(RetryPolicy::RetriableStatusCodes));
    assert!(!plan.on(RetryPolicy::ConnectFailure));
    assert!(plan.retries_status(429) && plan.retries_status(502) && !plan.retries_status(500));
    assert_eq!(r.timeout, None);

    let r = rule("/off");
    assert_eq!(r.retries.as_ref().unwrap().attempts, 0);
    assert_eq!(r.mirrors.len(), 1);
    assert_eq!(r.mirrors[0].service, Some(key("default", "ratings")));
    assert_eq!(r.mirrors[0].port, Some(9080));
    assert_eq!(r.mirrors[0].percentage, 25.0);

    let default = RetryPlan::istio_default();
    assert_eq!(default.attempts, 2);
    assert!(default.retries_status(503));
}

fn http_route(name: &str, ns: &str, parents: &str, rules: &str) -> String {
    format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: {parents}\n  rules:\n{rules}"
        )
}

const REVIEWS: &str = "[{group: '', kind: Service, name: reviews, namespace: default}]";

fn rule_to(backend: &str, matches: &str) -> String {
    format!("  - matches: {matches}\n    backendRefs: [{{name: {backend}, namespace: default, port: 9080}}]\n")
}

#[test]
fn gateway_precedence() {
    let index = build(&[
            &http_route("a", "default", REVIEWS, &[
                rule_to("reviews-v1", "[{path: {type: PathPrefix, value: /}}]"),
                rule_to("reviews-v1", "[{path: {type: PathPrefix, value: /api}}]"),
                rule_to("reviews-v1", "[{path: {type: PathPrefix, value: /api/v2/}}]"),
                rule_to("reviews-v1", "[{path: {type: Exact, value: /api}}]"),
            ].concat()),
            &http_route("b", "default", REVIEWS, &[
                rule_to("reviews-v3", "[{path: {type: PathPrefix, value: /api}, method: POST}]"),
                rule_to("reviews-v3", "[{path: {type: PathPrefix, value: /api}, method: POST, headers: [{name: x-a, value: '1'}]}]"),
                rule_to("reviews-v3", "[{path: {type: PathPrefix, value: /api}, queryParams: [{name: q, value: '1'}]}]"),
                rule_to("reviews-v3", "[{path: {type: RegularExpression, value: '/api/[0-9]+/detail'}}]"),
            ].concat()),
            // Ties with `a/rules[1]`: the smaller key wins.
            &http_route("c", "default", REVIEWS, &rule_to("reviews", "[{path: {type: PathPrefix, value: /api/}}]")),
        ]);
    let routes = index.get(&key("default", "reviews"));
    let check = |method: &str, uri: &str, headers: &[(&str, &str)], want: &str| {
        assert_eq!(
            outcome(routes, &head(method, uri, headers), 9080, None),
            want,
            "{method} {uri}"
        );
    };
    check("GET", "/api", &[], "HTTPRoute default/a rules[3]");
    check("GET", "/api/v2/x", &[], "HTTPRoute default/a rules[2]");
    check("GET", "/api/v2", &[], "HTTPRoute default/a rules[2]");
    check("GET", "/api/v2x", &[], "HTTPRoute default/a rules[1]");
    check("GET", "/api/x", &[], "HTTPRoute default/a rules[1]");
    check("POST", "/api/x", &[], "HTTPRoute default/b rules[0]");
    check(
        "POST",
        "/api/x",
        &[("x-a", "1")],
        "HTTPRoute default/b rules[1]",
    );
    check("GET", "/api/x?q=1", &[], "HTTPRoute default/b rules[2]");
    // A prefix match of any length beats a regular expression.
    check("GET", "/api/42/detail", &[], "HTTPRoute default/a rules[1]");
    check("GET", "/apix", &[], "HTTPRoute default/a rules[0]");
    check("GET", "/", &[], "HTTPRoute default/a rules[0]");
}

#[test]
fn gateway_no_match_regex_and_backends() {
    let index = build(&[&http_route(
        "r",
        "default",
        REVIEWS,
        &[
            rule_to(
                "reviews-v1",
                "[{path: {type: RegularExpression, value: '/api/[0-9]+/detail'}}]",
            ),
            "  - matches: [{path: {type: Exact, value: /none}}]\n".to_owned(),
            rule_to("missing", "[{path: {type: Exact, value: /missing}}]"),
        ]
        .concat(),
    )]);
    let routes = index.get(&key("default", "reviews"));
    assert_eq!(
        outcome(routes, &head("GET", "/api/42/detail", &[]), 9080, None),
        "HTTPRoute default/r rules[0]"
    );
    assert_eq!(
        outcome(routes, &head("GET", "/api/42", &[]), 9080, None),
        "no match"
    );
    let routes = routes.unwrap();
    let s = selected(routes, &head("GET", "/none", &[]), 9080, None);
    assert_eq!(
        s.rule.action,
        RuleAction::Respond {
            status: 500,
            body: None
        }
    );
    let s = selected(routes, &head("GET", "/missing", &[]), 9080, None);
    let backend = s.rule.pick(7).unwrap();
    assert_eq!(backend.service, None);
    assert_eq!(&*backend.host, "missing");
}

#[test]
fn consumer_routes_override_producer_routes() {
    let index = build(&[
        &http_route(
            "producer",
            "default",
            "[{kind: Service, group: '', name: reviews}]",
            &rule_to("reviews-v1", "[]"),
        ),
        &http_route(
            "consumer",
            "frontend",
            REVIEWS,
            &rule_to("reviews-v3", "[]"),
        ),
        &http_route(
            "admin",
            "other",
            "[{kind: Service, group: '', name: reviews, namespace: default, port: 8080}]",
            &rule_to("reviews-v3", "[]"),
        ),
    ]);
    let routes = index.get(&key("default", "reviews"));
    let request = head("GET", "/", &[]);
    assert_eq!(
        outcome(routes, &request, 9080, Some(&pod("frontend", &[]))),
        "HTTPRoute frontend/consumer rules[0]"
    );
    assert_eq!(
        outcome(routes, &request, 9080, Some(&pod("default", &[]))),
        "HTTPRoute default/producer rules[0]"
    );
    assert_eq!(
        outcome(routes, &request, 9080, None),
        "HTTPRoute default/producer rules[0]"
    );
    // `other` routes port 8080 only: on 9080 its clients get the producer's routes.
    let other = pod("other", &[]);
    assert_eq!(
        outcome(routes, &request, 9080, Some(&other)),
        "HTTPRoute default/producer rules[0]"
    );
    assert_eq!(
        outcome(routes, &request, 8080, Some(&other)),
        "HTTPRoute other/admin rules[0]"
    );
}

#[test]
fn gateway_ports_sections_and_gateway_parents() {
    let index = build(&[
        &http_route(
            "by-section",
            "frontend",
            "[{kind: Service, group: '', name: web, sectionName: admin}]",
            &rule_to("reviews", "[]"),
        ),
        &http_route(
            "on-gateway",
            "default",
            "[{name: ingress}]",
            &rule_to("reviews", "[]"),
        ),
    ]);
    let routes = index.get(&key("frontend", "web"));
    let request = head("GET", "/", &[]);
    assert_eq!(
        outcome(routes, &request, 8080, None),
        "HTTPRoute frontend/by-section rules[0]"
    );
    assert_eq!(outcome(routes, &request, 80, None), "unrouted");
    assert_eq!(
        index.services.len(),
        1,
        "routes on Gateways attach to no Service"
    );
}

#[test]
fn gateway_filters() {
    let rules = r#"  - matches: [{path: {type: PathPrefix, value: /foo}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /xyz}}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: '1'}], remove: [x-b]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-c, value: '2'}]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: ratings, port: 9080}, percent: 10}}
    backendRefs:
    - name: reviews-v1
      port: 9080
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-backend, value: v1}]}}]
    timeouts: {request: 5s, backendRequest: 2s}
  - matches: [{path: {type: PathPrefix, value: /empty}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
    timeouts: {request: 0s}
  - matches: [{path: {type: PathPrefix, value: /full/}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /tls}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
  - matches: [{path: {type: PathPrefix, value: /elsewhere}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /here}}}]
"#;
    let index = build(&[&http_route("f", "default", REVIEWS, rules)]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let rewritten = |uri: &str| {
        let mut parts = head("GET", uri, &[("host", "reviews:9080")]);
        selected(routes, &parts, 9080, None).rewrite(&mut parts);
        parts
    };
    // The Gateway API's ReplacePrefixMatch table.
    assert_eq!(rewritten("/foo/bar?x=1").uri, "/xyz/bar?x=1");
    assert_eq!(rewritten("/foo").uri, "/xyz");
    assert_eq!(rewritten("/foo/").uri, "/xyz/");
    assert_eq!(
        rewritten("/foo/bar").headers[header::HOST],
        "rewritten.example"
    );
    assert_eq!(rewritten("/empty/bar").uri, "/bar");
    assert_eq!(rewritten("/empty").uri, "/");
    assert_eq!(rewritten("/empty/").uri, "/");
    assert_eq!(rewritten("/full/a/b?k=v").uri, "/replaced?k=v");

    let s = selected(routes, &head("GET", "/foo", &[]), 9080, None);
    assert_eq!(&*s.rule.request_headers.set[0].name, "x-a");
    assert_eq!(&*s.rule.request_headers.remove[0], "x-b");
    assert_eq!(&*s.rule.response_headers.add[0].name, "x-c");
    assert_eq!(s.rule.mirrors[0].service, Some(key("default", "ratings")));
    assert_eq!(s.rule.mirrors[0].percentage, 10.0);
    assert_eq!(&*s.rule.pick(0).unwrap().request_headers.add[0].value, "v1");
    assert_eq!(s.rule.timeout, Some(Duration::from_secs(5)));
    let plan = s.rule.retries.as_ref().unwrap();
    assert_eq!(plan.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(plan.attempts, 2);
    assert!(!s.rule.grpc);
    let s = selected(routes, &head("GET", "/empty", &[]), 9080, None);
    assert_eq!(s.rule.timeout, None, "0s disables the timeout");

    let redirect = |uri: &str| {
        let parts = head("GET", uri, &[("host", "reviews:9080")]);
        let response = selected(routes, &parts, 9080, None)
            .redirect(&parts)
            .unwrap();
        (
            response.status().as_u16(),
            response.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_owned(),
        )
    };
    assert_eq!(
        redirect("/tls/x?y=1"),
        (302, "https://reviews/tls/x?y=1".to_owned())
    );
    assert_eq!(
        redirect("/elsewhere/a"),
        (301, "http://other.example:9080/here/a".to_owned())
    );
}

#[test]
fn grpc_method_matches() {
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: ratings, port: 9080}]
  rules:
  - matches: [{method: {service: ratings.v1.Ratings}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{method: {service: ratings.v1.Ratings, method: Get}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{method: {type: RegularExpression, service: 'ratings\.v[0-9]+\.Admin', method: 'Re.*'}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{headers: [{name: x-canary, value: 'yes'}]}]
    backendRefs: [{name: reviews, port: 9080}]
"#;
    let index = build(&[route]);
    let routes = index.get(&key("default", "ratings"));
    let check = |path: &str, headers: &[(&str, &str)], want: &str| {
        assert_eq!(
            outcome(routes, &head("POST", path, headers), 9080, None),
            want,
            "{path}"
        );
    };
    check(
        "/ratings.v1.Ratings/Get",
        &[],
        "GRPCRoute default/g rules[1]",
    );
    check(
        "/ratings.v1.Ratings/List",
        &[],
        "GRPCRoute default/g rules[0]",
    );
    check(
        "/ratings.v2.Admin/Reset",
        &[],
        "GRPCRoute default/g rules[2]",
    );
    check("/ratings.v2.Admin/Delete", &[], "no match");
    check(
        "/other.Svc/Call",
        &[("x-canary", "yes")],
        "GRPCRoute default/g rules[3]",
    );
    check("/other.Svc/Call", &[], "no match");
    let s = selected(
        routes.unwrap(),
        &head("POST", "/ratings.v1.Ratings/Get", &[]),
        9080,
        None,
    );
    assert!(s.rule.grpc);
    assert_eq!(s.matched_prefix, None);
}

#[test]
fn virtual_services_win_over_gateway_routes() {
    let index = build(&[
        &vs(
            "reviews",
            "default",
            "  hosts: [reviews]\n  exportTo: ['.']",
            &route_to("reviews"),
        ),
        &http_route("reviews", "default", REVIEWS, &rule_to("reviews-v3", "[]")),
    ]);
    let routes = index.get(&key("default", "reviews"));
    let request = head("GET", "/", &[]);
    assert_eq!(
        outcome(routes, &request, 9080, Some(&pod("default", &[]))),
        "VirtualService default/reviews http[0]"
    );
    // Where the VirtualService is not visible, the HTTPRoute serves.
    assert_eq!(
        outcome(routes, &request, 9080, Some(&pod("other", &[]))),
        "HTTPRoute default/reviews rules[0]"
    );
}

#[test]
fn tcp_routes() {
    let tcp = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 3306, sourceLabels: {app: reviews}}]
    route:
    - {destination: {host: db, subset: primary}, weight: 80}
    - {destination: {host: db, subset: replica}, weight: 20}
  - match: [{port: 3306, destinationSubnets: [10.96.0.0/16]}]
    route: [{destination: {host: db, subset: replica, port: {number: 3307}}}]
  - match: [{port: 33060, destinationSubnets: [192.168.0.0/16]}]
    route: [{destination: {host: db, subset: never}}]
"#;
    let index = build(&[tcp]);
    let db = key("default", "db");
    let reviews = pod("default", &[("app", "reviews")]);
    let other = pod("default", &[("app", "ratings")]);

    let route = index.tcp(&db, 3306, Some(&reviews)).unwrap();
    assert_eq!(&*route.name, "VirtualService default/db tcp[0]");
    let mut primary = 0;
    for roll in rolls(10_000) {
        if route.pick(roll).unwrap().subset.as_deref() == Some("primary") {
            primary += 1;
        }
    }
    assert!((7_700..=8_300).contains(&primary), "{primary}");

    let route = index.tcp(&db, 3306, Some(&other)).unwrap();
    assert_eq!(&*route.name, "VirtualService default/db tcp[1]");
    assert_eq!(route.pick(0).unwrap().port, Some(3307));
    // The ClusterIP is outside the subnet: nothing routes port 33060.
    assert!(index.tcp(&db, 33060, Some(&other)).is_none());
    assert!(index.tcp(&key("default", "reviews"), 9080, None).is_none());
    // HTTP requests to a Service with TCP rules only are unrouted.
    assert_eq!(
        outcome(index.get(&db), &head("GET", "/", &[]), 3306, None),
        "unrouted"
    );
}

#[test]
fn helpers() {
    assert_eq!(split_host_port("a.example:80"), ("a.example", Some(80)));
    assert_eq!(split_host_port("a.example"), ("a.example", None));
    assert_eq!(split_host_port("[::1]:8080"), ("[::1]", Some(8080)));
    assert_eq!(split_host_port("[::1]"), ("[::1]", None));
    assert_eq!(rust_substitution(r"\2/x/\1$\\"), "${2}/x/${1}$$\\");
    assert!(pick(&[], 5).is_none());
}

/// Replays the route-matching fuzz corpus on the stable toolchain (see `fuzz/`).
#[test]
fn fuzz_corpus_replays_without_panicking() {
    crate::replay_corpus("http_route", fuzz_select);
}

#[test]
fn updating_compiles_only_the_routes_that_changed() {
    let reviews = traffic!("virtual-service-reviews-test-v2.yaml");
    let ratings = traffic!("virtual-service-ratings-test-delay.yaml");
    let first = snapshot(&[BOOKINFO, EXTRA, reviews, ratings]);
    let index = RouteIndex::build(&first);

    // The same snapshot but for a new reviews VirtualService: everyone goes to v3.
    let all_v3 = traffic!("virtual-service-reviews-v3.yaml");
    let changed = snapshot(&[BOOKINFO, EXTRA, all_v3]);
    let mut second = first.clone();
    let reviews_key = key("default", "reviews");
    second.virtual_services.insert(
        reviews_key.clone(),
        changed.virtual_services[&reviews_key].clone(),
    );
    let updated = RouteIndex::update(&second, Some(&index));

    let ratings_key = key("default", "ratings");
    assert!(
        Arc::ptr_eq(
            &index.compiled.virtual_services[&ratings_key].1,
            &updated.compiled.virtual_services[&ratings_key].1
        ),
        "the untouched VirtualService is not compiled again"
    );
    assert!(!Arc::ptr_eq(
        &index.compiled.virtual_services[&reviews_key].1,
        &updated.compiled.virtual_services[&reviews_key].1
    ));
    let jason = head("GET", "/reviews/0", &[("end-user", "jason")]);
    let routes = updated.get(&reviews_key).unwrap();
    let s = selected(routes, &jason, 9080, None);
    assert_eq!(s.rule.pick(0).unwrap().subset.as_deref(), Some("v3"));
    // The delay rule of ratings still applies, from its reused compiled form.
    let routes = updated.get(&ratings_key).unwrap();
    let s = selected(routes, &jason, 9080, None);
    assert!(s.rule.fault.as_ref().unwrap().delay.is_some());

    // A VirtualService that is gone takes its table with it.
    let mut third = second.clone();
    third.virtual_services.remove(&ratings_key);
    let updated = RouteIndex::update(&third, Some(&updated));
    assert!(updated.get(&ratings_key).is_none());
    assert!(!updated.compiled.virtual_services.contains_key(&ratings_key));
}

/// Istio's egress TLS origination task: the entry host is a service that VirtualServices and
/// DestinationRules name by the host, and its port 80 originates TLS to 443.
#[test]
fn service_entry_hosts_route_and_take_their_destination_rule() {
    use crate::proxy::upstream::cluster::{policy_for, ClusterKey};

    let example = include_str!("../../../../examples/egress/tls-origination.yaml");
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cnn, namespace: other}
spec:
  hosts: [edition.cnn.com]
  http:
  - match: [{uri: {prefix: /politics}}]
    route: [{destination: {host: edition.cnn.com, port: {number: 443}}}]
  - route: [{destination: {host: edition.cnn.com}}]
"#;
    let snapshot = snapshot(&[BOOKINFO, EXTRA, example, vs]);
    let cnn = ObjectKey::new("default", "edition.cnn.com");
    let service = snapshot
        .services
        .get(&cnn)
        .expect("the entry host is a service");
    assert_eq!(service.hostname(), "edition.cnn.com");

    let routes = RouteIndex::build(&snapshot);
    let table = routes
        .get(&cnn)
        .expect("the VirtualService names the entry host");
    let client = snapshot
        .pods
        .values()
        .next()
        .map(|p| Pod {
            key: ObjectKey::new("other", "client"),
            ..(**p).clone()
        })
        .unwrap();
    for (path, port) in [("/politics/today", Some(443)), ("/sport", None)] {
        let parts = Request::get(path).body(()).unwrap().into_parts().0;
        let s = selected(table, &parts, 80, Some(&client));
        let backend = s.rule.pick(0).expect("one backend");
        assert_eq!(backend.service.as_ref(), Some(&cnn), "{path}");
        assert_eq!(backend.port, port, "{path}");
    }

    // Port 80 originates TLS; 443 (already TLS from the client) does not.
    let policy = |port| {
        policy_for(
            &snapshot,
            &ClusterKey::new(cnn.clone(), port, None),
            Some("other"),
        )
    };
    assert_eq!(
        policy(80).tls.map(|t| t.mode),
        Some(crate::model::traffic::TlsMode::Simple)
    );
    assert_eq!(policy(443).tls, None);
}

#[test]
fn the_path_index_picks_what_trying_every_rule_picks() {
    for catch_all in [false, true] {
        let mut yaml = String::from(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: many, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n",
        );
        for i in 0..60 {
            let m = match i % 6 {
                0 => format!("[{{uri: {{exact: /p{}}}}}]", i % 7),
                1 => format!("[{{uri: {{prefix: /p{}}}}}]", i % 5),
                2 => format!(
                    "[{{uri: {{prefix: /p{}}}, headers: {{x-user: {{exact: jason}}}}}}]",
                    i % 4
                ),
                3 => format!("[{{uri: {{regex: '/p[0-9]+/{}'}}}}]", i % 3),
                4 => format!("[{{uri: {{exact: /p{}}}, port: 9080}}]", i % 7),
                _ => format!(
                    "[{{uri: {{prefix: /P{}}}, ignoreUriCase: true}}, {{method: {{exact: POST}}}}]",
                    i % 3
                ),
            };
            yaml += &format!(
                "  - name: r{i}\n    match: {m}\n    route: [{{destination: {{host: reviews}}}}]\n"
            );
        }
        if catch_all {
            yaml += "  - name: last\n    route: [{destination: {host: reviews}}]\n";
        }
        let snap = snapshot(&[BOOKINFO, &yaml]);
        let vs = &snap.virtual_services[&key("default", "many")];
        let compiled = CompiledVs::new(vs, &snap);
        let index = compiled.index.as_ref().expect("60 rules are indexed");
        let describe = |selection: Selection<'_>| match selection {
            Selection::Rule(s) => format!("{} {:?}", s.rule.name, s.matched_prefix),
            Selection::NoMatch => "no match".into(),
            Selection::Unrouted => "unrouted".into(),
        };
        let mut seen = std::collections::BTreeSet::new();
        for path in [
            "/", "/p0", "/p1", "/p12", "/p3/x", "/P2", "/p2", "/p10/1", "/q", "/p6", "/p4",
        ] {
            for method in ["GET", "POST"] {
                for headers in [&[][..], &[("x-user", "jason")][..]] {
                    for port in [9080, 80] {
                        let parts = head(method, &format!("http://reviews{path}"), headers);
                        let request = info(&parts, port, None);
                        let indexed = describe(compiled.select_indexed(index, &request));
                        let linear = describe(compiled.select_linear(&request));
                        assert_eq!(indexed, linear, "{method} {path} {headers:?} port {port}");
                        seen.insert(linear);
                    }
                }
            }
        }
        // The cases cover several rules, and both answers without one.
        assert!(seen.len() > 8, "{seen:?}");
        assert_eq!(seen.contains("no match"), !catch_all, "{seen:?}");
    }
}

#[test]
fn routes_that_would_take_a_service_past_its_match_limit_are_not_attached() {
    // 16 rules of 7 matches: 112 matches per HTTPRoute (a route may have fewer than 128),
    // so the 90th attached to `reviews` would pass 10,000.
    let routes: Vec<String> = (0..90)
        .map(|r| {
            let rules: String = (0..16)
                .map(|i| {
                    let matches: Vec<String> = (0..7)
                        .map(|m| format!("{{path: {{type: Exact, value: /r{r}/{i}/{m}}}}}"))
                        .collect();
                    rule_to("reviews-v1", &format!("[{}]", matches.join(", ")))
                })
                .collect();
            http_route(&format!("r{r:02}"), "default", REVIEWS, &rules)
        })
        .collect();
    let docs: Vec<&str> = routes.iter().map(String::as_str).collect();
    let index = build(&docs);
    let routes = index.get(&key("default", "reviews"));
    let route = |uri: &str| outcome(routes, &head("GET", uri, &[]), 9080, None);
    assert_eq!(route("/r0/0/0"), "HTTPRoute default/r00 rules[0]");
    assert_eq!(route("/r88/15/6"), "HTTPRoute default/r88 rules[15]");
    assert_eq!(
        route("/r89/0/0"),
        "no match",
        "the 90th route is not attached"
    );
    const { assert!(89 * 112 <= MAX_SERVICE_MATCHES && 90 * 112 > MAX_SERVICE_MATCHES) };
}

/// `(rule, chosen, reason)` of each rule `explain` lists.
fn explained(
    routes: &ServiceRoutes,
    parts: &Parts,
    port: u16,
    source: Option<&Pod>,
) -> Vec<(String, bool, String)> {
    let trace = routes.explain(&info(parts, port, source));
    // What the explanation says matched is what the router picks.
    let chosen: Vec<_> = trace.rules.iter().filter(|r| r.chosen).collect();
    match routes.select(&info(parts, port, source)) {
        Selection::Rule(s) => {
            assert_eq!(chosen.len(), 1, "{trace:?}");
            assert!(
                chosen[0].name == *s.rule.name
                    || chosen[0]
                        .name
                        .starts_with(&format!("{} match[", s.rule.name)),
                "{trace:?}"
            );
        }
        _ => assert!(chosen.is_empty(), "{trace:?}"),
    }
    trace
        .rules
        .into_iter()
        .map(|r| (r.name, r.chosen, r.reason))
        .collect()
}

#[test]
fn explain_names_the_condition_each_rule_fails() {
    let index = build(&[traffic!("virtual-service-reviews-test-v2.yaml")]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let client = pod("default", &[("app", "productpage")]);

    let jason = head("GET", "/reviews/0", &[("end-user", "jason")]);
    assert_eq!(
        explained(routes, &jason, 9080, Some(&client)),
        [(
            "VirtualService default/reviews http[0]".to_owned(),
            true,
            "matched".to_owned()
        )]
    );
    let bob = head("GET", "/reviews/0", &[("end-user", "bob")]);
    let anonymous = head("GET", "/reviews/0", &[]);
    for (parts, why) in [
        (
            &bob,
            "header end-user exact \"jason\": the value is \"bob\"",
        ),
        (&anonymous, "header end-user exact \"jason\": absent"),
    ] {
        assert_eq!(
            explained(routes, parts, 9080, Some(&client)),
            [
                (
                    "VirtualService default/reviews http[0]".to_owned(),
                    false,
                    why.to_owned()
                ),
                (
                    "VirtualService default/reviews http[1]".to_owned(),
                    true,
                    "a rule without match takes every request".to_owned()
                ),
            ]
        );
    }
}

#[test]
fn explain_says_why_other_virtual_services_are_passed_over() {
    let vs = |name: &str, ns: &str, host: &str, extra: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{hosts: ['{host}'], {extra} http: [{{match: [{{uri: {{prefix: /api}}}}, {{port: 8080}}, {{sourceLabels: {{app: productpage}}}}], route: [{{destination: {{host: reviews.default.svc.cluster.local}}}}]}}]}}")
    };
    let index = build(&[
        &vs("private", "default", "reviews", "exportTo: ['.'],"),
        &vs(
            "frontend",
            "frontend",
            "reviews.default.svc.cluster.local",
            "",
        ),
        &vs("wide", "default", "*.default.svc.cluster.local", ""),
    ]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let reasons = |client: &Pod| -> Vec<(String, bool, String)> {
        let parts = head("GET", "/other", &[]);
        routes
            .explain(&info(&parts, 9080, Some(client)))
            .virtual_services
            .into_iter()
            .map(|c| (c.name, c.chosen, c.reason))
            .collect()
    };
    let outsider = pod("frontend", &[]);
    assert_eq!(
        reasons(&outsider),
        [
            (
                "VirtualService default/private".to_owned(),
                false,
                "not exported to namespace frontend".to_owned()
            ),
            (
                "VirtualService frontend/frontend".to_owned(),
                true,
                "the VirtualService this client sees for the Service".to_owned()
            ),
            (
                "VirtualService default/wide".to_owned(),
                false,
                "another VirtualService names the Service by a more specific host".to_owned()
            ),
        ]
    );
    let insider = pod("default", &[]);
    let inside = reasons(&insider);
    assert!(inside[0].1, "{inside:?}");
    assert_eq!(
        inside[1].2,
        "default/private is preferred: the client's namespace first, then the Service's, then by name"
    );

    // Each match of the rule is explained on its own: the path, the port, the source.
    let parts = head("GET", "/other", &[]);
    assert_eq!(
        explained(routes, &parts, 9080, Some(&insider)),
        [
            (
                "VirtualService default/private http[0] match[0]".to_owned(),
                false,
                "uri prefix \"/api\": the path is \"/other\"".to_owned()
            ),
            (
                "VirtualService default/private http[0] match[1]".to_owned(),
                false,
                "not for this client: it is for port 8080, the request is to 9080".to_owned()
            ),
            (
                "VirtualService default/private http[0] match[2]".to_owned(),
                false,
                "not for this client: it is for clients labelled app=productpage, the client is not"
                    .to_owned()
            ),
        ]
    );
}

#[test]
fn explain_reads_gateway_api_routes_by_port() {
    let web = "[{group: '', kind: Service, name: web, namespace: frontend, port: 8080}]";
    let index = build(&[&http_route(
        "admin",
        "frontend",
        web,
        &rule_to("reviews", "[{path: {type: PathPrefix, value: /admin}}]"),
    )]);
    let routes = index.get(&key("frontend", "web")).unwrap();
    let parts = head("GET", "/admin/users", &[]);
    assert_eq!(
        explained(routes, &parts, 80, None),
        [(
            "HTTPRoute frontend/admin rules[0]".to_owned(),
            false,
            "attached to another port (the request is to 80)".to_owned()
        )]
    );
    assert_eq!(
        explained(routes, &parts, 8080, None),
        [(
            "HTTPRoute frontend/admin rules[0]".to_owned(),
            true,
            "matched".to_owned()
        )]
    );
    let entries = routes.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].requires,
        "port 8080, path prefix \"/admin\" (whole segments)"
    );
    assert_eq!(
        entries[0].action,
        "route reviews.default.svc.cluster.local:9080 (100%)"
    );
}

#[test]
fn explain_agrees_with_the_path_index_of_a_large_virtual_service() {
    // 40 exact paths and a header rule: past INDEX_FROM, `select` reads the index.
    let mut rules = String::new();
    for i in 0..40 {
        rules += &format!(
            "  - match: [{{uri: {{exact: /p{i}}}}}]\n    route: [{{destination: {{host: reviews, subset: v1}}}}]\n"
        );
    }
    rules += "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n";
    let vs = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{rules}");
    let index = build(&[&vs]);
    let routes = index.get(&key("default", "reviews")).unwrap();
    let client = pod("default", &[]);
    for (path, header, expected) in [
        (
            "/p17",
            None,
            Some("VirtualService default/reviews http[17]"),
        ),
        (
            "/p39",
            Some(("end-user", "jason")),
            Some("VirtualService default/reviews http[39]"),
        ),
        (
            "/other",
            Some(("end-user", "jason")),
            Some("VirtualService default/reviews http[40]"),
        ),
        ("/other", None, None),
    ] {
        let headers: Vec<(&str, &str)> = header.into_iter().collect();
        let parts = head("GET", path, &headers);
        let rules = explained(routes, &parts, 9080, Some(&client));
        let chosen: Vec<&str> = rules
            .iter()
            .filter(|(_, chosen, _)| *chosen)
            .map(|(name, _, _)| name.as_str())
            .collect();
        assert_eq!(chosen, expected.into_iter().collect::<Vec<_>>(), "{path}");
    }
}
