//! `get`: GET requests over one keep-alive HTTP/1.1 connection, one JSON line per response
//! (`{"status":..,"body":..}`), for environments without curl.

use std::io::Write;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION};
use serde_json::{json, Value};

use crate::client::{Connection, Reply, Url};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `http://host[:port]/path`; the host may be a name from /etc/hosts.
    url: Url,
    /// Request header `Name:Value`; repeatable.
    #[arg(long = "header", short = 'H', value_name = "K:V", value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Number of requests, sent one after another.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Budget for connecting and for each response.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    get(&args, &mut std::io::stdout()).await
}

/// Any HTTP status is success here; only failing to get a response is an error.
async fn get(args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let headers: HeaderMap = args.headers.iter().cloned().collect();
    let mut conn = open(&args.url, timeout).await?;
    for sent in 1..=args.count {
        let reply = tokio::time::timeout(timeout, conn.get(&headers))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "GET {} got no answer within {} ms",
                    args.url,
                    args.timeout_ms
                )
            })??;
        writeln!(out, "{}", summary(&reply))?;
        if sent < args.count && closes(&reply) {
            // The server ended keep-alive; carry on over a new connection.
            conn = open(&args.url, timeout).await?;
        }
    }
    Ok(())
}

async fn open(url: &Url, timeout: Duration) -> anyhow::Result<Connection> {
    let conn = Connection::open(url, timeout).await?;
    tracing::debug!("connected to {url} from {}", conn.local_addr());
    Ok(conn)
}

fn summary(reply: &Reply) -> Value {
    let body = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.body).into_owned()));
    json!({ "status": reply.status.as_u16(), "body": body })
}

fn closes(reply: &Reply) -> bool {
    reply
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
        })
}

fn parse_header(spec: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = spec
        .split_once(':')
        .ok_or_else(|| format!("expected K:V, got {spec:?}"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("invalid header name {name:?}"))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("invalid value for header {name}"))?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bookinfo::{Identity, Role};
    use crate::serve::{serve, Service};
    use bytes::Bytes;
    use hyper::StatusCode;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    async fn ratings_server() -> SocketAddr {
        let identity = Identity {
            role: Role::Ratings,
            version: "v1".into(),
            pod: "ratings-pod".into(),
        };
        let service = Service::new(identity, &[], None).expect("service");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, Arc::new(service)));
        addr
    }

    fn args(url: String, count: u32) -> Args {
        Args {
            url: url.parse().expect("url"),
            headers: vec![parse_header("end-user: jason").expect("header")],
            count,
            timeout_ms: 2000,
        }
    }

    fn reply(status: StatusCode, body: &'static str) -> Reply {
        Reply {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn header_flag_splits_at_the_first_colon() {
        let (name, value) = parse_header("traceparent: 00-ab:cd").expect("valid");
        assert_eq!(name, "traceparent");
        assert_eq!(value, "00-ab:cd");
        assert!(parse_header("no-colon").is_err());
        assert!(parse_header("bad name:x").is_err());
    }

    #[test]
    fn body_is_json_when_it_parses_else_a_string() {
        assert_eq!(
            summary(&reply(StatusCode::OK, "{\"a\":1}")),
            json!({ "status": 200, "body": { "a": 1 } })
        );
        assert_eq!(
            summary(&reply(StatusCode::NOT_FOUND, "ok")),
            json!({ "status": 404, "body": "ok" })
        );
    }

    #[test]
    fn connection_close_is_recognised() {
        let mut closing = reply(StatusCode::OK, "");
        closing
            .headers
            .insert(CONNECTION, HeaderValue::from_static("keep-alive, Close"));
        assert!(closes(&closing));
        assert!(!closes(&reply(StatusCode::OK, "")));
    }

    #[tokio::test]
    async fn prints_one_line_per_response_over_one_connection() {
        let addr = ratings_server().await;
        let mut out = Vec::new();
        get(&args(format!("http://{addr}/ratings/0"), 3), &mut out)
            .await
            .expect("all answered");
        let lines: Vec<Value> = String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON line"))
            .collect();
        assert_eq!(lines.len(), 3);
        for line in &lines {
            assert_eq!(line["status"], 200);
            assert_eq!(line["body"]["service"], "ratings");
            assert_eq!(line["body"]["request_headers"]["end-user"], "jason");
            assert_eq!(line["body"]["peer"], lines[0]["body"]["peer"]);
        }
    }

    #[tokio::test]
    async fn http_errors_are_not_failures() {
        let addr = ratings_server().await;
        let mut out = Vec::new();
        get(&args(format!("http://{addr}/missing"), 1), &mut out)
            .await
            .expect("a 404 is still an answer");
        let line: Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(line["status"], 404);
        assert_eq!(line["body"]["error"], "not found");
    }

    #[tokio::test]
    async fn connection_errors_fail() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let err = get(
            &args(format!("http://127.0.0.1:{port}/"), 1),
            &mut Vec::new(),
        )
        .await
        .expect_err("nothing listens");
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }
}
