//! Access log lines as Istio's Telemetry API asks for them, written to each provider of the
//! workload that logs: on the node proxy's output (`envoyFileAccessLog`), or as an OTLP log
//! record (`envoyOtelAls`: a text format as the record's body, JSON labels as its
//! attributes). HTTP requests write theirs in [`super::l7`]; opaque TCP connections here
//! ([`tcp`]), one line per side when the connection closes, as Envoy's TCP proxy does.

use std::{
    borrow::Cow,
    net::{SocketAddr, SocketAddrV4},
    time::{Instant, SystemTime},
};

use serde_json::Value;

use super::{context::Context, copy::Transferred, view::View};
use crate::{
    metrics::{ClusterName, ResponseFlags, TcpLabels},
    model::{telemetry::ProviderKind, Pod},
    telemetry::{
        access_log::{Entry, Format},
        export::{Attribute, Log, Record},
    },
};

/// The most characters an OTLP record's body or attribute value keeps.
const MAX_VALUE: usize = 4096;

/// What the access log lines of a closed opaque TCP connection say.
pub(super) struct TcpConnection<'a> {
    pub start: Instant,
    /// The client's address.
    pub client: SocketAddr,
    /// The address it dialled (source side) or reached (destination side).
    pub local: Option<SocketAddrV4>,
    /// The endpoint the proxy connected to.
    pub upstream: Option<SocketAddrV4>,
    /// The cluster at the source side: `(port, subset, host)`.
    pub cluster: Option<(u16, Option<&'a str>, &'a str)>,
    /// Both principals, as the metrics know them.
    pub labels: &'a TcpLabels,
    pub transferred: Transferred,
    pub flags: ResponseFlags,
}

/// Writes the lines of a closed TCP connection: the caller's (`client`) where its workload
/// logs as a client, the destination pod's (`server`) where it logs as a server.
pub(super) fn tcp(
    ctx: &Context,
    client: Option<&Pod>,
    server: Option<&Pod>,
    conn: &TcpConnection<'_>,
) {
    let view = ctx.view();
    if !view.logs() {
        return;
    }
    let known = |label: &crate::metrics::Label| {
        Some(label.as_str())
            .filter(|p| *p != "unknown")
            .map(str::to_owned)
    };
    let (downstream, upstream) = (
        known(&conn.labels.source_principal),
        known(&conn.labels.destination_principal),
    );
    let duration = conn.start.elapsed();
    let entry = Entry {
        start_time: SystemTime::now()
            .checked_sub(duration)
            .unwrap_or(SystemTime::UNIX_EPOCH),
        method: "",
        path: "",
        authority: None,
        scheme: "",
        protocol: None,
        response_code: 0,
        response_flags: conn.flags,
        response_code_details: None,
        bytes_received: conn.transferred.to_upstream,
        bytes_sent: conn.transferred.to_downstream,
        duration,
        upstream_service_time: None,
        upstream_host: conn.upstream.map(SocketAddr::V4),
        upstream_cluster: conn
            .cluster
            .map(|(port, subset, host)| ClusterName::outbound(port, subset, host)),
        downstream_local_address: conn.local.map(SocketAddr::V4),
        downstream_remote_address: conn.client,
        route_name: None,
        request_id: None,
        downstream_peer: downstream.as_deref(),
        upstream_peer: upstream.as_deref(),
        request_headers: None,
        response_headers: None,
    };
    if let Some(pod) = client {
        if let Some(providers) = view.access_logs(pod, true) {
            emit(ctx, &view, &providers, pod, &entry);
        }
    }
    if let Some(pod) = server {
        if let Some(providers) = view.access_logs(pod, false) {
            let port = conn.upstream.or(conn.local).map_or(0, |a| a.port());
            let entry = Entry {
                upstream_cluster: Some(ClusterName::inbound(port)),
                ..entry
            };
            emit(ctx, &view, &providers, pod, &entry);
        }
    }
}

pub(super) fn emit(
    ctx: &Context,
    view: &View,
    providers: &[crate::model::telemetry::ExtensionProvider],
    pod: &Pod,
    entry: &Entry<'_>,
) {
    for provider in providers {
        match &provider.kind {
            ProviderKind::FileAccessLog { stderr, format } => {
                let mut line = format.line(entry);
                line.push('\n');
                ctx.lines.write(*stderr, line);
            }
            ProviderKind::OtelAccessLog {
                service,
                port,
                format,
            } => {
                let log = record(pod, format, entry);
                let addr = view.collector(service, *port);
                ctx.tracer.export((service, *port), addr, Record::Log(log));
            }
            _ => {}
        }
    }
}

/// The OTLP record of a line: a text format is the body, JSON labels the attributes.
fn record(pod: &Pod, format: &Format, entry: &Entry<'_>) -> Log {
    let (body, attributes) = match format {
        Format::Text(_) => (Some(format.line(entry)), Vec::new()),
        Format::Json(_) => {
            let attributes = format
                .fields(entry)
                .into_iter()
                .filter_map(|(key, value)| {
                    let value = match value {
                        // A command with no value (a TCP connection's method): no attribute.
                        Value::Null => return None,
                        Value::Number(n) => n
                            .as_i64()
                            .map_or_else(|| Attribute::Text(n.to_string()), Attribute::Int),
                        Value::String(s) => Attribute::Text(s),
                        other => Attribute::Text(other.to_string()),
                    };
                    Some((Cow::Owned(key), value))
                })
                .collect();
            (None, attributes)
        }
    };
    let mut log = Log {
        service: format!("{}.{}", pod.canonical_service(), pod.key.namespace).into(),
        time: entry.start_time,
        body,
        attributes,
    };
    // A request's headers make no record larger than this: the exporter's queue stays bounded.
    let texts = log
        .body
        .iter_mut()
        .chain(log.attributes.iter_mut().filter_map(|(_, v)| match v {
            Attribute::Text(t) => Some(t),
            Attribute::Int(_) => None,
        }));
    for text in texts {
        if let Some((at, _)) = text.char_indices().nth(MAX_VALUE) {
            text.truncate(at);
        }
    }
    log
}
