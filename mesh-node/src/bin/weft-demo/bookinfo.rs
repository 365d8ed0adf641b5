//! The Bookinfo roles as plain data: which paths each role answers, what its bodies hold,
//! which request headers travel to upstreams, and how long each caller waits — the rules of
//! Istio's Bookinfo sample, so the classic routing, fault and timeout tasks behave as there.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName};
use hyper::StatusCode;
use serde_json::{json, Map, Value};

/// Request headers every role copies onto its upstream calls: the user (header-based
/// routing) and the W3C and B3 trace context.
pub const PROPAGATED_HEADERS: [&str; 11] = [
    "end-user",
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "cookie",
];

/// The product every page shows (Bookinfo has one book).
pub const PRODUCT_ID: u32 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    ProductPage,
    /// `/<role>/<id>` of details, reviews and ratings.
    Item(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    BadId(String),
}

/// How a caller treats one upstream: Bookinfo's productpage waits 3 s and tries reviews
/// twice; reviews v2 waits 10 s for ratings but v3 only 2.5 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    pub timeout: Duration,
    pub attempts: u32,
}

/// Who answers: put into every body so tests see which pod and version served them.
#[derive(Debug, Clone)]
pub struct Identity {
    pub role: Role,
    pub version: String,
    pub pod: String,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Productpage => "productpage",
            Self::Details => "details",
            Self::Reviews => "reviews",
            Self::Ratings => "ratings",
        }
    }
}

impl RouteError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::BadId(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::NotFound => "not found".to_owned(),
            Self::BadId(raw) => format!("product id must be a number, got {raw:?}"),
        }
    }
}

impl CallPolicy {
    pub fn of(caller: Role, version: &str, callee: Role) -> Self {
        let (millis, attempts) = match (caller, callee) {
            (Role::Productpage, Role::Reviews) => (3000, 2),
            (Role::Reviews, Role::Ratings) if version == "v3" => (2500, 1),
            (Role::Reviews, Role::Ratings) => (10_000, 1),
            _ => (3000, 1),
        };
        Self {
            timeout: Duration::from_millis(millis),
            attempts,
        }
    }
}

impl Identity {
    /// The body of a response: the role's `fields` plus who answered and whom it saw.
    pub fn body(&self, peer: SocketAddr, request: &HeaderMap, fields: Value) -> Value {
        let mut body = Map::new();
        body.insert("service".into(), self.role.name().into());
        body.insert("version".into(), self.version.as_str().into());
        body.insert("pod".into(), self.pod.as_str().into());
        body.insert("peer".into(), peer.to_string().into());
        // Who the mesh says is calling (Envoy's header, set by the node proxies).
        if let Some(cert) = request
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
        {
            body.insert("client_cert".into(), cert.into());
        }
        if let Some(received) = received_headers(request) {
            body.insert("request_headers".into(), received);
        }
        if let Value::Object(fields) = fields {
            body.extend(fields);
        }
        Value::Object(body)
    }
}

/// Maps a request path to what `role` serves there.
pub fn route(role: Role, path: &str) -> Result<Route, RouteError> {
    if path == "/health" {
        return Ok(Route::Health);
    }
    if role == Role::Productpage {
        return match path {
            "/" | "/productpage" => Ok(Route::ProductPage),
            _ => Err(RouteError::NotFound),
        };
    }
    let id = path
        .strip_prefix('/')
        .and_then(|rest| rest.strip_prefix(role.name()))
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|id| !id.contains('/'))
        .ok_or(RouteError::NotFound)?;
    id.parse()
        .map(Route::Item)
        .map_err(|_| RouteError::BadId(id.to_owned()))
}

/// The star colour reviews shows for `version`; v1 shows no ratings at all.
pub fn stars_color(version: &str) -> Result<Option<&'static str>, String> {
    match version {
        "v1" => Ok(None),
        "v2" => Ok(Some("black")),
        "v3" => Ok(Some("red")),
        other => Err(format!(
            "reviews has versions v1 (no ratings), v2 (black stars) and v3 (red stars), not {other:?}"
        )),
    }
}

/// The request headers that must be copied onto upstream calls, duplicates kept.
pub fn propagated(request: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in PROPAGATED_HEADERS {
        let name = HeaderName::from_static(name);
        for value in request.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The propagated headers this hop received, so tests can follow them down the call chain.
fn received_headers(request: &HeaderMap) -> Option<Value> {
    let received: Map<String, Value> = PROPAGATED_HEADERS
        .iter()
        .filter_map(|&name| {
            let values: Vec<&str> = request
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!values.is_empty()).then(|| (name.to_owned(), values.join(", ").into()))
        })
        .collect();
    (!received.is_empty()).then_some(Value::Object(received))
}

pub fn details(id: u32) -> Value {
    json!({
        "id": id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    })
}

pub fn ratings(id: u32) -> Value {
    json!({
        "id": id,
        "ratings": { "Reviewer1": 5, "Reviewer2": 4 },
    })
}

/// Reviews of `id`; v2/v3 pass what ratings answered (or the error standing in for it)
/// and their star colour.
pub fn reviews(id: u32, rated: Option<(Value, &str)>) -> Value {
    let mut fields = json!({
        "id": id,
        "reviews": [
            {
                "reviewer": "Reviewer1",
                "text": "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
            },
            {
                "reviewer": "Reviewer2",
                "text": "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
            },
        ],
    });
    if let (Some((ratings, color)), Value::Object(map)) = (rated, &mut fields) {
        map.insert("ratings".into(), ratings);
        map.insert("stars_color".into(), color.into());
    }
    fields
}

pub fn productpage(details: Value, reviews: Value) -> Value {
    json!({ "details": details, "reviews": reviews })
}

/// What stands in for an upstream answer that did not come (Bookinfo still renders the page).
pub fn upstream_error(message: impl Into<String>, status: StatusCode) -> Value {
    json!({ "error": message.into(), "status": status.as_u16() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn identity(role: Role, version: &str) -> Identity {
        Identity {
            role,
            version: version.into(),
            pod: "pod-1".into(),
        }
    }

    #[test]
    fn every_role_has_health() {
        for role in [
            Role::Productpage,
            Role::Details,
            Role::Reviews,
            Role::Ratings,
        ] {
            assert_eq!(route(role, "/health"), Ok(Route::Health));
        }
    }

    #[test]
    fn productpage_serves_root_and_productpage_only() {
        assert_eq!(route(Role::Productpage, "/"), Ok(Route::ProductPage));
        assert_eq!(
            route(Role::Productpage, "/productpage"),
            Ok(Route::ProductPage)
        );
        assert_eq!(
            route(Role::Productpage, "/details/0"),
            Err(RouteError::NotFound)
        );
    }

    #[test]
    fn item_roles_serve_their_own_prefix() {
        assert_eq!(route(Role::Details, "/details/0"), Ok(Route::Item(0)));
        assert_eq!(route(Role::Reviews, "/reviews/7"), Ok(Route::Item(7)));
        assert_eq!(route(Role::Ratings, "/ratings/3"), Ok(Route::Item(3)));
        assert_eq!(
            route(Role::Ratings, "/reviews/3"),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            route(Role::Details, "/detailsx/0"),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            route(Role::Details, "/details/0/x"),
            Err(RouteError::NotFound)
        );
        assert_eq!(route(Role::Details, "/"), Err(RouteError::NotFound));
    }

    #[test]
    fn non_numeric_id_is_a_bad_request() {
        let err = route(Role::Details, "/details/abc").expect_err("bad id");
        assert_eq!(err, RouteError::BadId("abc".into()));
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            route(Role::Details, "/details/"),
            Err(RouteError::BadId(String::new()))
        );
    }

    #[test]
    fn stars_follow_the_bookinfo_versions() {
        assert_eq!(stars_color("v1"), Ok(None));
        assert_eq!(stars_color("v2"), Ok(Some("black")));
        assert_eq!(stars_color("v3"), Ok(Some("red")));
        assert!(stars_color("v4").is_err());
    }

    #[test]
    fn call_policies_match_bookinfo() {
        let page_reviews = CallPolicy::of(Role::Productpage, "v1", Role::Reviews);
        assert_eq!(
            (page_reviews.timeout.as_millis(), page_reviews.attempts),
            (3000, 2)
        );
        let page_details = CallPolicy::of(Role::Productpage, "v1", Role::Details);
        assert_eq!(
            (page_details.timeout.as_millis(), page_details.attempts),
            (3000, 1)
        );
        assert_eq!(
            CallPolicy::of(Role::Reviews, "v2", Role::Ratings)
                .timeout
                .as_millis(),
            10_000
        );
        assert_eq!(
            CallPolicy::of(Role::Reviews, "v3", Role::Ratings)
                .timeout
                .as_millis(),
            2500
        );
    }

    #[test]
    fn body_holds_identity_peer_and_fields() {
        let peer: SocketAddr = "10.244.1.1:40000".parse().expect("addr");
        let body = identity(Role::Details, "v1").body(peer, &HeaderMap::new(), details(0));
        assert_eq!(body["service"], "details");
        assert_eq!(body["version"], "v1");
        assert_eq!(body["pod"], "pod-1");
        assert_eq!(body["peer"], "10.244.1.1:40000");
        assert_eq!(body["id"], 0);
        assert_eq!(body["author"], "William Shakespeare");
        assert_eq!(body["year"], 1595);
        assert!(body.get("request_headers").is_none());
        assert!(body.get("client_cert").is_none());

        let mut request = HeaderMap::new();
        let xfcc = "By=spiffe://cluster.local/ns/default/sa/details;URI=spiffe://cluster.local/ns/default/sa/productpage";
        request.insert("x-forwarded-client-cert", xfcc.parse().expect("header"));
        let body = identity(Role::Details, "v1").body(peer, &request, details(0));
        assert_eq!(body["client_cert"], xfcc);
    }

    #[test]
    fn ratings_body_lists_both_reviewers() {
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let body = identity(Role::Ratings, "v1").body(peer, &HeaderMap::new(), ratings(0));
        assert_eq!(body["service"], "ratings");
        assert_eq!(body["ratings"], json!({ "Reviewer1": 5, "Reviewer2": 4 }));
    }

    #[test]
    fn reviews_include_ratings_only_when_rated() {
        let plain = reviews(0, None);
        assert!(plain.get("ratings").is_none());
        assert!(plain.get("stars_color").is_none());
        let rated = reviews(0, Some((json!({ "x": 1 }), "red")));
        assert_eq!(rated["ratings"], json!({ "x": 1 }));
        assert_eq!(rated["stars_color"], "red");
        assert_eq!(rated["reviews"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn only_listed_headers_propagate_with_duplicates() {
        let mut request = HeaderMap::new();
        request.insert("end-user", HeaderValue::from_static("jason"));
        request.append("cookie", HeaderValue::from_static("a=1"));
        request.append("cookie", HeaderValue::from_static("b=2"));
        request.insert("authorization", HeaderValue::from_static("secret"));
        request.insert("x-b3-sampled", HeaderValue::from_static("1"));
        let out = propagated(&request);
        assert_eq!(out.len(), 4);
        assert_eq!(out["end-user"], "jason");
        assert_eq!(out.get_all("cookie").iter().count(), 2);
        assert!(out.get("authorization").is_none());

        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let body = identity(Role::Ratings, "v1").body(peer, &request, ratings(0));
        assert_eq!(
            body["request_headers"],
            json!({ "end-user": "jason", "cookie": "a=1, b=2", "x-b3-sampled": "1" })
        );
    }

    #[test]
    fn upstream_error_carries_message_and_status() {
        let value = upstream_error("boom", StatusCode::BAD_GATEWAY);
        assert_eq!(value, json!({ "error": "boom", "status": 502 }));
    }
}
