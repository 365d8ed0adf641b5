//! The access log lines Istio's Telemetry API asks for: one per request and side, as each of
//! Istio's proxies writes its own — the source proxy's line where the caller's workload logs
//! (`match.mode` `CLIENT`), the destination proxy's where the pod's does (`SERVER`; both by one
//! proxy between pods of one node). Each provider gets the line in its format: on the node
//! proxy's output (`envoyFileAccessLog`), or as an OTLP log record (`envoyOtelAls`: a text
//! format as the record's body, JSON labels as its attributes).

use std::time::SystemTime;

use super::*;
use crate::{proxy::access_log::emit, telemetry::access_log::Entry};

/// Writes the lines of a finished request; the server side's only when the destination saw
/// it (`seen_by_destination`).
pub(super) fn write(
    report: &Report,
    labels: &RequestLabels,
    outcome: &RequestOutcome,
    seen_by_destination: bool,
) {
    let conn = &report.conn;
    let view = conn.ctx.view();
    let client = match (&conn.inbound, &conn.source) {
        (None, Some(source)) => view.access_logs(source, true).map(|p| (p, source.clone())),
        _ => None,
    };
    let server_pod = match &conn.inbound {
        Some(inbound) => inbound.pod.clone(),
        None => report
            .destination
            .clone()
            .filter(|p| seen_by_destination && conn.ctx.dialer.serves(&view.snapshot, p)),
    };
    let server = server_pod.and_then(|pod| view.access_logs(&pod, false).map(|p| (p, pod)));
    if client.is_none() && server.is_none() {
        return;
    }
    let host = labels.destination_service();
    let host = if host == "unknown" {
        &*report.authority
    } else {
        host
    };
    let path = report.uri.path_and_query().map_or("/", |p| p.as_str());
    let (downstream, upstream) = labels.principals();
    let entry = Entry {
        start_time: SystemTime::now()
            .checked_sub(outcome.duration)
            .unwrap_or(SystemTime::UNIX_EPOCH),
        method: report.method.as_str(),
        path,
        authority: Some(&report.authority),
        scheme: "http",
        protocol: Some(report.version),
        response_code: outcome.response_code,
        response_flags: outcome.flags,
        // Envoy's word for an answer that came from the upstream.
        response_code_details: report
            .details
            .as_deref()
            .or(report.hold.is_some().then_some("via_upstream")),
        bytes_received: outcome.request_bytes,
        bytes_sent: outcome.response_bytes,
        duration: outcome.duration,
        upstream_service_time: report.upstream_time,
        upstream_host: report.upstream.map(SocketAddr::V4),
        upstream_cluster: report
            .cluster
            .as_ref()
            .map(|k| ClusterName::outbound(k.port, k.subset.as_deref(), host)),
        downstream_local_address: match &conn.inbound {
            Some(inbound) => Some(SocketAddr::V4(inbound.target)),
            None => conn.dialled.map(SocketAddr::V4),
        },
        downstream_remote_address: SocketAddr::V4(conn.client),
        route_name: report.route.as_deref(),
        request_id: report.request_id.as_ref().and_then(|v| v.to_str().ok()),
        downstream_peer: downstream,
        upstream_peer: upstream,
        request_headers: report.request_headers.as_deref(),
        response_headers: report.response_headers.as_deref(),
    };
    if let Some((providers, pod)) = client {
        emit(&report.conn.ctx, &view, &providers, &pod, &entry);
    }
    if let Some((providers, pod)) = server {
        // The destination's view: its own cluster, and only what it saw of the flags.
        let port = report.upstream.map_or(conn.port, |a| a.port());
        let entry = Entry {
            upstream_cluster: Some(ClusterName::inbound(port)),
            ..entry
        };
        // Between pods of one node: the attempt as the pod got it — the headers as sent (the
        // caller's route changed them), from when it was sent, no route of the caller's.
        let entry = match (&conn.inbound, report.attempt_start) {
            (Some(_), _) => entry,
            (None, started) => {
                let duration = started.map_or(outcome.duration, |s| s.elapsed());
                Entry {
                    start_time: SystemTime::now()
                        .checked_sub(duration)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                    duration,
                    response_flags: at_destination(outcome.flags),
                    route_name: None,
                    request_headers: report.attempt_headers.as_deref(),
                    ..entry
                }
            }
        };
        emit(&report.conn.ctx, &view, &providers, &pod, &entry);
    }
}
