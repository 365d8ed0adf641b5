//! One access log line per HTTP request, with the fields of Istio's default JSON access log
//! (Envoy's `%START_TIME%`, `%REQ(:METHOD)%`, `%RESPONSE_FLAGS%`... under the same names).
//!
//! Lines go to the `weft::access` target at `info`. The default filter turns the target off, as
//! Istio ships with access logs off; `RUST_LOG=info,weft::access=info` turns them on and
//! `--log-format json` prints one JSON
//! object per request with these fields at the top level, as Istio's
//! `accessLogEncoding: JSON` does. Values that are unknown print `-`, as in Envoy's text format.
//! Per-connection TCP lines share the target at `debug`.

use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::{info, Level};

use super::ResponseFlags;

/// Log target of the access log: one line per request (`info`), one per TCP connection
/// (`debug`).
pub const ACCESS_LOG: &str = "weft::access";

/// What is logged of one request. Borrowed from the request so building it copies nothing.
/// `start_time` is the time of logging minus `duration`: log when the response ends.
#[derive(Clone, Copy, Debug)]
pub struct AccessEntry<'a> {
    pub method: &'a str,
    /// The path as the client sent it, before any rewrite (Envoy's
    /// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`).
    pub path: &'a str,
    pub protocol: http::Version,
    /// 0 when no response was sent.
    pub response_code: u16,
    pub response_flags: ResponseFlags,
    /// Why the proxy answered itself where no flag says it (Envoy's
    /// `%RESPONSE_CODE_DETAILS%`), e.g. `rbac_access_denied_matched_policy[ns[foo]-policy[deny]]`.
    pub response_code_details: Option<&'a str>,
    /// Body bytes from the client.
    pub bytes_received: u64,
    /// Body bytes to the client.
    pub bytes_sent: u64,
    /// From the first request byte to the last response byte.
    pub duration: Duration,
    /// The endpoint of the last attempt.
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<ClusterName<'a>>,
    /// The matched route's name (Envoy's `%ROUTE_NAME%`).
    pub route_name: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub x_forwarded_for: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub downstream_remote_address: SocketAddr,
    /// The client's SPIFFE ID, where the request crossed nodes over mTLS (Envoy's
    /// `%DOWNSTREAM_PEER_URI_SAN%`).
    pub downstream_peer: Option<&'a str>,
    /// The server's SPIFFE ID, likewise (Envoy's `%UPSTREAM_PEER_URI_SAN%`).
    pub upstream_peer: Option<&'a str>,
}

/// Istio's cluster name: `outbound|9080|v2|reviews.default.svc.cluster.local`, or
/// `inbound|9080||` for the local workload. Rendered when the line is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterName<'a> {
    direction: &'static str,
    port: u16,
    subset: &'a str,
    host: &'a str,
}

impl<'a> ClusterName<'a> {
    /// `subset` is the DestinationRule subset, if the route picked one.
    pub fn outbound(port: u16, subset: Option<&'a str>, host: &'a str) -> Self {
        Self {
            direction: "outbound",
            port,
            subset: subset.unwrap_or_default(),
            host,
        }
    }

    pub fn inbound(port: u16) -> Self {
        Self {
            direction: "inbound",
            port,
            subset: "",
            host: "",
        }
    }
}

impl fmt::Display for ClusterName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            direction,
            port,
            subset,
            host,
        } = self;
        write!(f, "{direction}|{port}|{subset}|{host}")
    }
}

/// Whether a line would be written: lets callers skip gathering headers for nothing.
pub fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_LOG, Level::INFO)
}

/// Writes `entry`'s line.
pub fn access_log(entry: &AccessEntry<'_>) {
    let start_time = SystemTime::now()
        .checked_sub(entry.duration)
        .unwrap_or(UNIX_EPOCH);
    info!(
        target: ACCESS_LOG,
        start_time = %StartTime(start_time),
        method = entry.method,
        path = entry.path,
        protocol = protocol(entry.protocol),
        response_code = entry.response_code,
        response_flags = %entry.response_flags,
        response_code_details = or_dash(entry.response_code_details),
        bytes_received = entry.bytes_received,
        bytes_sent = entry.bytes_sent,
        duration = u64::try_from(entry.duration.as_millis()).unwrap_or(u64::MAX),
        upstream_host = %OrDash(entry.upstream_host),
        upstream_cluster = %OrDash(entry.upstream_cluster),
        route_name = or_dash(entry.route_name),
        authority = or_dash(entry.authority),
        x_forwarded_for = or_dash(entry.x_forwarded_for),
        user_agent = or_dash(entry.user_agent),
        request_id = or_dash(entry.request_id),
        downstream_remote_address = %entry.downstream_remote_address,
        downstream_peer_uri_san = or_dash(entry.downstream_peer),
        upstream_peer_uri_san = or_dash(entry.upstream_peer),
        "request"
    );
}

/// Envoy's `%PROTOCOL%`.
pub(crate) fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

fn or_dash(value: Option<&str>) -> &str {
    value.unwrap_or("-")
}

struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Envoy's `%START_TIME%`: RFC 3339 in UTC with milliseconds, `2024-05-01T12:00:00.123Z`.
pub(crate) struct StartTime(pub SystemTime);

impl fmt::Display for StartTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A clock before 1970 is a broken clock; the epoch is as good a value as any.
        let since_epoch = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since_epoch.as_secs();
        let (year, month, day) = civil_from_days(secs / 86_400);
        let of_day = secs % 86_400;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60,
            since_epoch.subsec_millis()
        )
    }
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Self;

        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    #[test]
    fn start_time_is_rfc3339_utc_with_millis() {
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_007);
        assert_eq!(StartTime(t).to_string(), "2024-02-29T23:59:59.007Z");
        assert_eq!(
            StartTime(UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(StartTime(t).to_string(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn cluster_names_follow_istio() {
        let host = "reviews.default.svc.cluster.local";
        assert_eq!(
            ClusterName::outbound(9080, Some("v2"), host).to_string(),
            "outbound|9080|v2|reviews.default.svc.cluster.local"
        );
        assert_eq!(
            ClusterName::outbound(9080, None, host).to_string(),
            "outbound|9080||reviews.default.svc.cluster.local"
        );
        assert_eq!(ClusterName::inbound(9080).to_string(), "inbound|9080||");
    }

    #[test]
    fn json_line_carries_envoy_fields() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(capture.clone())
            .finish();
        let entry = AccessEntry {
            method: "GET",
            path: "/reviews/0",
            protocol: http::Version::HTTP_11,
            response_code: 503,
            response_flags: ResponseFlags::DI | ResponseFlags::FI,
            response_code_details: None,
            bytes_received: 0,
            bytes_sent: 18,
            duration: Duration::from_micros(5_400),
            upstream_host: None,
            upstream_cluster: Some(ClusterName::outbound(9080, Some("v2"), "reviews.default")),
            route_name: Some("default"),
            authority: Some("reviews:9080"),
            x_forwarded_for: None,
            user_agent: Some("curl/8.5.0"),
            request_id: Some("4f1a"),
            downstream_remote_address: "10.244.1.5:40000".parse().unwrap(),
            downstream_peer: Some("spiffe://cluster.local/ns/default/sa/productpage"),
            upstream_peer: None,
        };
        tracing::subscriber::with_default(subscriber, || {
            assert!(access_log_enabled());
            access_log(&entry);
        });
        let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        for (field, value) in [
            ("target", "weft::access"),
            ("method", "GET"),
            ("path", "/reviews/0"),
            ("protocol", "HTTP/1.1"),
            ("response_flags", "DI,FI"),
            ("upstream_host", "-"),
            ("upstream_cluster", "outbound|9080|v2|reviews.default"),
            ("route_name", "default"),
            ("authority", "reviews:9080"),
            ("x_forwarded_for", "-"),
            ("user_agent", "curl/8.5.0"),
            ("request_id", "4f1a"),
            ("downstream_remote_address", "10.244.1.5:40000"),
            (
                "downstream_peer_uri_san",
                "spiffe://cluster.local/ns/default/sa/productpage",
            ),
            ("upstream_peer_uri_san", "-"),
        ] {
            assert_eq!(line[field], value, "{field} in {out}");
        }
        let start = line["start_time"].as_str().unwrap();
        assert!(start.len() == 24 && start.ends_with('Z'), "{start}");
        for (field, value) in [
            ("response_code", 503),
            ("bytes_received", 0),
            ("bytes_sent", 18),
            ("duration", 5),
        ] {
            assert_eq!(line[field], value, "{field} in {out}");
        }
    }
}
