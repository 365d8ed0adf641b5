//! Access log formats as Istio's providers write them: Envoy's format strings
//! (`%START_TIME%`, `%REQ(:METHOD)%`, `%RESPONSE_FLAGS%`...) for text lines, and JSON objects
//! whose fields are such strings (`logFormat.labels`). A format is compiled once, when the
//! MeshConfig is read: a command Weft does not know is refused there, with the field that
//! holds it, never written out as text.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName};
use serde_json::{Map, Value};

use crate::metrics::{access::StartTime, ClusterName, ResponseFlags};

/// Istio's default text format (`meshConfig.accessLogFormat` unset).
pub const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON fields (`accessLogEncoding: JSON` without a format).
pub const ISTIO_JSON: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
];

/// A compiled access log format.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// One line of text.
    Text(Template),
    /// One JSON object per line, a field per label.
    Json(Arc<[(Arc<str>, Template)]>),
}

/// A format string: text with commands.
#[derive(Clone, Debug, PartialEq)]
pub struct Template(Arc<[Piece]>);

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(Arc<str>),
    /// A command, its value cut to the length given (`%REQ(USER-AGENT):10%`).
    Command(Command, Option<usize>),
}

/// The commands Weft fills in, Envoy's names.
#[derive(Clone, Debug, PartialEq)]
enum Command {
    StartTime,
    Method,
    /// The path as the client sent it.
    Path,
    Authority,
    Scheme,
    /// A request header, else a second one (`%REQ(X?Y)%`).
    Request(HeaderName, Option<HeaderName>),
    /// A response header.
    Response(HeaderName),
    /// `%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%`: the upstream's time to its response head, in ms.
    UpstreamServiceTime,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    RequestedServerName,
    RouteName,
    DownstreamPeerUriSan,
    UpstreamPeerUriSan,
    RequestId,
}

impl Command {
    /// Commands whose value is a number: a JSON field that is exactly one is written as one
    /// (`x-envoy-upstream-service-time` is a header, text, as in Envoy).
    fn numeric(&self) -> bool {
        matches!(
            self,
            Command::ResponseCode | Command::BytesReceived | Command::BytesSent | Command::Duration
        )
    }
}

impl Template {
    /// Compiles Envoy's format string `text`; the error names the command it cannot honour.
    pub fn compile(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        while let Some(at) = rest.find('%') {
            literal.push_str(&rest[..at]);
            rest = &rest[at + 1..];
            // `%%` is a literal percent sign.
            if let Some(after) = rest.strip_prefix('%') {
                literal.push('%');
                rest = after;
                continue;
            }
            let end = rest.find('%').ok_or_else(|| {
                format!(
                    "unterminated command at {:?}",
                    &text[text.len() - rest.len() - 1..]
                )
            })?;
            let (spec, after) = (&rest[..end], &rest[end + 1..]);
            let (spec, max) = max_length(spec)?;
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal).into()));
            }
            pieces.push(Piece::Command(command(spec)?, max));
            rest = after;
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal.into()));
        }
        Ok(Self(pieces.into()))
    }

    fn render(&self, entry: &Entry<'_>, out: &mut String) {
        for piece in self.0.iter() {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Command(command, max) => {
                    let start = out.len();
                    value(command, entry, out);
                    if let Some(max) = max {
                        let cut = out[start..]
                            .char_indices()
                            .nth(*max)
                            .map(|(i, _)| start + i);
                        if let Some(cut) = cut {
                            out.truncate(cut);
                        }
                    }
                }
            }
        }
    }

    /// The JSON value of a field: a number where the field is exactly one numeric command
    /// with a value, null where it is one command without a value, else text.
    fn json(&self, entry: &Entry<'_>) -> Value {
        let mut text = String::new();
        self.render(entry, &mut text);
        if let [Piece::Command(command, _)] = &*self.0 {
            // A field that is one command without a value is null, as Envoy writes it.
            if text == "-" {
                return Value::Null;
            }
            if command.numeric() {
                if let Ok(n) = text.parse::<u64>() {
                    return Value::from(n);
                }
            }
        }
        Value::String(text)
    }
}

/// `REQ(USER-AGENT):10`: the command and the length its value is cut to.
fn max_length(spec: &str) -> Result<(&str, Option<usize>), String> {
    match spec.rsplit_once("):") {
        Some((command, n)) => {
            let n = n
                .parse::<usize>()
                .map_err(|_| format!("%{spec}%: the length after `:` must be a number"))?;
            Ok((&spec[..command.len() + 1], Some(n)))
        }
        None => Ok((spec, None)),
    }
}

fn header(name: &str, spec: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("%{spec}%: {name:?} is not a header name"))
}

fn command(spec: &str) -> Result<Command, String> {
    if let Some(args) = spec.strip_prefix("REQ(").and_then(|a| a.strip_suffix(')')) {
        let (first, second) = match args.split_once('?') {
            Some((a, b)) => (a, Some(b)),
            None => (args, None),
        };
        let upper_second = second.map(str::to_ascii_uppercase);
        return Ok(
            match (first.to_ascii_uppercase().as_str(), upper_second.as_deref()) {
                (":METHOD", None) => Command::Method,
                (":PATH", None) | ("X-ENVOY-ORIGINAL-PATH", Some(":PATH")) => Command::Path,
                (":AUTHORITY", None) | ("HOST", None) => Command::Authority,
                (":SCHEME", None) => Command::Scheme,
                ("X-REQUEST-ID", None) => Command::RequestId,
                (pseudo, _) if pseudo.starts_with(':') => {
                    return Err(format!(
                        "%{spec}%: {pseudo} is not a request pseudo-header Weft knows"
                    ))
                }
                _ => Command::Request(
                    header(first, spec)?,
                    second.map(|s| header(s, spec)).transpose()?,
                ),
            },
        );
    }
    if let Some(args) = spec.strip_prefix("RESP(").and_then(|a| a.strip_suffix(')')) {
        if args.contains('?') {
            return Err(format!("%{spec}%: one response header only"));
        }
        if args.eq_ignore_ascii_case("x-envoy-upstream-service-time") {
            return Ok(Command::UpstreamServiceTime);
        }
        return Ok(Command::Response(header(args, spec)?));
    }
    Ok(match spec {
        "START_TIME" => Command::StartTime,
        "PROTOCOL" => Command::Protocol,
        "RESPONSE_CODE" => Command::ResponseCode,
        "RESPONSE_FLAGS" => Command::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Command::ResponseCodeDetails,
        "CONNECTION_TERMINATION_DETAILS" => Command::ConnectionTerminationDetails,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Command::UpstreamTransportFailureReason,
        "BYTES_RECEIVED" => Command::BytesReceived,
        "BYTES_SENT" => Command::BytesSent,
        "DURATION" => Command::Duration,
        "UPSTREAM_HOST" => Command::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Command::UpstreamCluster,
        "UPSTREAM_LOCAL_ADDRESS" => Command::UpstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS" => Command::DownstreamLocalAddress,
        "DOWNSTREAM_REMOTE_ADDRESS" => Command::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Command::DownstreamRemoteAddressWithoutPort,
        "REQUESTED_SERVER_NAME" => Command::RequestedServerName,
        "ROUTE_NAME" => Command::RouteName,
        "DOWNSTREAM_PEER_URI_SAN" => Command::DownstreamPeerUriSan,
        "UPSTREAM_PEER_URI_SAN" => Command::UpstreamPeerUriSan,
        other => {
            return Err(format!(
                "%{other}%: not a command Weft fills in (it knows START_TIME, REQ(...), RESP(...), \
                 PROTOCOL, RESPONSE_CODE, RESPONSE_FLAGS, RESPONSE_CODE_DETAILS, BYTES_RECEIVED, \
                 BYTES_SENT, DURATION, UPSTREAM_HOST, UPSTREAM_CLUSTER(_RAW), UPSTREAM_LOCAL_ADDRESS, \
                 DOWNSTREAM_LOCAL_ADDRESS, DOWNSTREAM_REMOTE_ADDRESS(_WITHOUT_PORT), \
                 REQUESTED_SERVER_NAME, ROUTE_NAME, DOWNSTREAM_PEER_URI_SAN, UPSTREAM_PEER_URI_SAN, \
                 CONNECTION_TERMINATION_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON)"
            ))
        }
    })
}

/// What one request's access log line is made of. Borrowed from the request.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub start_time: std::time::SystemTime,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: Option<&'a str>,
    pub scheme: &'a str,
    /// `None`: an opaque TCP connection.
    pub protocol: Option<http::Version>,
    pub response_code: u16,
    pub response_flags: ResponseFlags,
    pub response_code_details: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_service_time: Option<Duration>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<ClusterName<'a>>,
    pub downstream_local_address: Option<SocketAddr>,
    pub downstream_remote_address: SocketAddr,
    pub route_name: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub downstream_peer: Option<&'a str>,
    pub upstream_peer: Option<&'a str>,
    /// The request's headers as it arrived (with its request id), and the response's.
    pub request_headers: Option<&'a HeaderMap>,
    pub response_headers: Option<&'a HeaderMap>,
}

fn value(command: &Command, e: &Entry<'_>, out: &mut String) {
    let text = |out: &mut String, v: Option<&str>| {
        out.push_str(v.filter(|v| !v.is_empty()).unwrap_or("-"))
    };
    let captured = |map: Option<&'_ HeaderMap>, name: &HeaderName| {
        map.and_then(|m| m.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    match command {
        Command::StartTime => {
            let _ = write!(out, "{}", StartTime(e.start_time));
        }
        Command::Method => text(out, Some(e.method)),
        Command::Path => text(out, Some(e.path)),
        Command::Authority => text(out, e.authority),
        Command::Scheme => text(out, Some(e.scheme)),
        Command::RequestId => text(out, e.request_id),
        Command::Request(first, second) => {
            let v = captured(e.request_headers, first)
                .or_else(|| second.as_ref().and_then(|s| captured(e.request_headers, s)));
            text(out, v.as_deref());
        }
        Command::Response(name) => text(out, captured(e.response_headers, name).as_deref()),
        Command::UpstreamServiceTime => match e.upstream_service_time {
            Some(t) => {
                let _ = write!(out, "{}", t.as_millis());
            }
            None => out.push('-'),
        },
        Command::Protocol => text(out, e.protocol.map(crate::metrics::access::protocol)),
        Command::ResponseCode => {
            let _ = write!(out, "{}", e.response_code);
        }
        Command::ResponseFlags => {
            let _ = write!(out, "{}", e.response_flags);
        }
        Command::ResponseCodeDetails => text(out, e.response_code_details),
        Command::ConnectionTerminationDetails | Command::UpstreamTransportFailureReason => {
            out.push('-')
        }
        Command::BytesReceived => {
            let _ = write!(out, "{}", e.bytes_received);
        }
        Command::BytesSent => {
            let _ = write!(out, "{}", e.bytes_sent);
        }
        Command::Duration => {
            let _ = write!(out, "{}", e.duration.as_millis());
        }
        Command::UpstreamHost => match e.upstream_host {
            Some(a) => {
                let _ = write!(out, "{a}");
            }
            None => out.push('-'),
        },
        Command::UpstreamCluster => match e.upstream_cluster {
            Some(c) => {
                let _ = write!(out, "{c}");
            }
            None => out.push('-'),
        },
        // The node proxy's own address towards the upstream is not kept per request.
        Command::UpstreamLocalAddress | Command::RequestedServerName => out.push('-'),
        Command::DownstreamLocalAddress => match e.downstream_local_address {
            Some(a) => {
                let _ = write!(out, "{a}");
            }
            None => out.push('-'),
        },
        Command::DownstreamRemoteAddress => {
            let _ = write!(out, "{}", e.downstream_remote_address);
        }
        Command::DownstreamRemoteAddressWithoutPort => {
            let _ = write!(out, "{}", e.downstream_remote_address.ip());
        }
        Command::RouteName => text(out, e.route_name),
        Command::DownstreamPeerUriSan => text(out, e.downstream_peer),
        Command::UpstreamPeerUriSan => text(out, e.upstream_peer),
    }
}

impl Format {
    /// Istio's default text format.
    pub fn istio_text() -> Self {
        Format::Text(Template::compile(ISTIO_TEXT).expect("Istio's default format compiles"))
    }

    /// Istio's default JSON format.
    pub fn istio_json() -> Self {
        let fields = ISTIO_JSON
            .iter()
            .map(|(k, v)| {
                (
                    Arc::from(*k),
                    Template::compile(v).expect("Istio's default JSON fields compile"),
                )
            })
            .collect();
        Format::Json(fields)
    }

    /// The line for `entry`, without its newline.
    pub fn line(&self, entry: &Entry<'_>) -> String {
        match self {
            Format::Text(template) => {
                let mut out = String::with_capacity(256);
                template.render(entry, &mut out);
                while out.ends_with('\n') {
                    out.pop();
                }
                out
            }
            Format::Json(_) => Value::Object(self.fields(entry)).to_string(),
        }
    }

    /// The JSON fields for `entry` (a text format is one field, `message`).
    pub fn fields(&self, entry: &Entry<'_>) -> Map<String, Value> {
        match self {
            Format::Text(_) => {
                let mut map = Map::new();
                map.insert("message".into(), Value::String(self.line(entry)));
                map
            }
            Format::Json(fields) => fields
                .iter()
                .map(|(k, t)| (k.to_string(), t.json(entry)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn entry<'a>(request: &'a HeaderMap, response: &'a HeaderMap) -> Entry<'a> {
        Entry {
            start_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            method: "GET",
            path: "/reviews/0?x=1",
            authority: Some("reviews:9080"),
            scheme: "http",
            protocol: Some(http::Version::HTTP_11),
            response_code: 503,
            response_flags: ResponseFlags::UF,
            response_code_details: None,
            bytes_received: 12,
            bytes_sent: 91,
            duration: Duration::from_millis(42),
            upstream_service_time: Some(Duration::from_millis(40)),
            upstream_host: Some("10.244.2.3:9080".parse().unwrap()),
            upstream_cluster: Some(ClusterName::outbound(
                9080,
                Some("v2"),
                "reviews.default.svc.cluster.local",
            )),
            downstream_local_address: Some("10.96.0.12:9080".parse().unwrap()),
            downstream_remote_address: "10.244.1.2:40000".parse().unwrap(),
            route_name: Some("reviews-v2"),
            request_id: Some("4f7e"),
            downstream_peer: None,
            upstream_peer: Some("spiffe://cluster.local/ns/default/sa/reviews"),
            request_headers: Some(request),
            response_headers: Some(response),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn istios_default_text_format_is_written_as_envoy_writes_it() {
        let (req, resp) = (
            headers(&[("user-agent", "curl/8"), ("x-request-id", "4f7e")]),
            headers(&[("content-type", "text/plain")]),
        );
        let line = Format::istio_text().line(&entry(&req, &resp));
        assert_eq!(
            line,
            "[2023-11-14T22:13:20.123Z] \"GET /reviews/0?x=1 HTTP/1.1\" 503 UF - - \"-\" 12 91 42 40 \
             \"-\" \"curl/8\" \"4f7e\" \"reviews:9080\" \"10.244.2.3:9080\" \
             outbound|9080|v2|reviews.default.svc.cluster.local - 10.96.0.12:9080 10.244.1.2:40000 - reviews-v2"
        );
    }

    #[test]
    fn json_labels_are_typed_and_headers_read_either_way() {
        let (req, resp) = (
            headers(&[("end-user", "jason")]),
            headers(&[("content-type", "text/plain")]),
        );
        let format = Format::Json(
            [
                ("code", "%RESPONSE_CODE%"),
                ("who", "%REQ(END-USER)%"),
                ("fallback", "%REQ(X-MISSING?END-USER)%"),
                ("type", "%RESP(content-type)%"),
                ("short", "%REQ(:AUTHORITY):7%"),
                ("mixed", "took %DURATION% ms, %%"),
                ("nothing", "%REQ(X-ABSENT)%"),
            ]
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Template::compile(v).unwrap()))
            .collect(),
        );
        let line: Value = serde_json::from_str(&format.line(&entry(&req, &resp))).unwrap();
        assert_eq!(line["code"], 503, "a lone numeric command is a number");
        assert_eq!(line["who"], "jason");
        assert_eq!(line["fallback"], "jason");
        assert_eq!(line["type"], "text/plain");
        assert_eq!(line["short"], "reviews");
        assert_eq!(line["mixed"], "took 42 ms, %");
        assert_eq!(
            line["nothing"],
            Value::Null,
            "a command without a value is null"
        );
    }

    #[test]
    fn what_weft_cannot_fill_in_is_refused() {
        for (text, reason) in [
            ("%START_TIME(%s)%", "START_TIME("),
            ("%FILTER_STATE(x)%", "FILTER_STATE"),
            ("%REQ(:FOO)%", ":FOO"),
            ("%RESPONSE_CODE", "unterminated"),
            ("%REQ(X):many%", "number"),
            ("%RESP(A?B)%", "one response header"),
        ] {
            let err = Template::compile(text).expect_err(text);
            assert!(err.contains(reason), "{text}: {err}");
        }
        assert!(Template::compile(ISTIO_TEXT).is_ok());
    }
}
