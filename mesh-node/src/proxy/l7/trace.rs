//! The spans of one request, as Istio's proxies make them: a client span at the source
//! proxy and a server span at the destination proxy, each the parent of what follows it.
//!
//! ```text
//! caller ─traceparent(A)─► source proxy: client span B (parent A) ─traceparent(B)─►
//!        destination proxy: server span C (parent B) ─traceparent(C)─► pod
//! ```
//!
//! Between two pods of one node this proxy is both and makes both spans. Whether a workload's
//! requests are traced, how often and where the spans go is its Telemetry's (or MeshConfig's);
//! a side without tracing neither reads nor writes trace headers. The sampling decision a
//! request arrives with is kept; spans of unsampled requests are not made, but the context
//! still goes on so every hop of the trace agrees.

use std::{borrow::Cow, time::SystemTime};

use super::*;
use crate::{
    model::telemetry::{CustomTag, EffectiveTracing, ProviderKind},
    telemetry::{
        export::{Attribute, Record, Span},
        propagation::SpanContext,
    },
};

/// The spans this proxy makes for one request.
#[derive(Default)]
pub(super) struct Trace {
    /// The source side's span, when the caller's workload traces.
    client: Option<Side>,
    /// The destination side's span, when the pod's workload traces: this proxy serves the
    /// pod (a destination proxy, or both ends on one node).
    server: Option<Side>,
}

struct Side {
    context: SpanContext,
    tracing: Arc<EffectiveTracing>,
    /// The workload the span speaks for.
    pod: Arc<Pod>,
    start: SystemTime,
    /// The Telemetry's custom tags, read from the request as it arrived.
    tags: Vec<(Arc<str>, String)>,
}

impl Side {
    /// This side's span for a request with `headers`, which then name it as the next hop's
    /// parent.
    fn open(tracing: Arc<EffectiveTracing>, pod: &Arc<Pod>, headers: &mut HeaderMap) -> Self {
        let side = Self::read(tracing, pod, headers);
        side.context.inject(headers);
        side
    }

    /// The span for a request with `headers`, not yet written on them.
    fn read(tracing: Arc<EffectiveTracing>, pod: &Arc<Pod>, headers: &HeaderMap) -> Self {
        let context = SpanContext::for_request(headers, tracing.sampling);
        let tags = if context.sampled {
            custom_tags(&tracing.custom_tags, headers)
        } else {
            Vec::new()
        };
        Self {
            context,
            tracing,
            pod: pod.clone(),
            start: SystemTime::now(),
            tags,
        }
    }
}

impl Trace {
    /// The source side's span of a request from `source`, when its workload traces.
    pub(super) fn client(
        view: &View,
        source: Option<&Arc<Pod>>,
        headers: &mut HeaderMap,
    ) -> Option<Box<Self>> {
        let pod = source?;
        let tracing = view.tracing(pod, true)?;
        Some(Box::new(Self {
            client: Some(Side::open(tracing, pod, headers)),
            server: None,
        }))
    }

    /// The destination side's span of a request to `pod` at its destination proxy, when
    /// its workload traces.
    pub(super) fn server(
        view: &View,
        pod: &Arc<Pod>,
        headers: &mut HeaderMap,
    ) -> Option<Box<Self>> {
        let tracing = view.tracing(pod, false)?;
        Some(Box::new(Self {
            client: None,
            server: Some(Side::open(tracing, pod, headers)),
        }))
    }

    /// An attempt of a request this proxy sends to `pod` (its head as the source proxy made
    /// it: `headers`): when this proxy serves the pod as the destination too (a pod of this
    /// node), it opens the pod's span, once for all attempts to that pod; a span it opened for
    /// another pod is dropped. [`Trace::sent`] then writes it on the attempt.
    pub(super) fn attempt(
        trace: &mut Option<Box<Self>>,
        view: &View,
        conn: &Conn,
        pod: Option<&Arc<Pod>>,
        headers: &HeaderMap,
    ) {
        if !view.traces() {
            return;
        }
        let local = pod.filter(|p| conn.ctx.dialer.serves(&view.snapshot, p));
        let Some(pod) = local else {
            if let Some(trace) = trace {
                trace.server = None;
            }
            return;
        };
        if let Some(server) = trace.as_ref().and_then(|t| t.server.as_ref()) {
            if Arc::ptr_eq(&server.pod, pod) {
                return;
            }
        }
        match view.tracing(pod, false) {
            Some(tracing) => {
                trace.get_or_insert_default().server = Some(Side::read(tracing, pod, headers));
            }
            None => {
                if let Some(trace) = trace {
                    trace.server = None;
                }
            }
        }
    }

    /// Writes the span of a pod of this node ([`Trace::attempt`]) on the attempt sent to it.
    pub(super) fn sent(trace: Option<&Self>, headers: &mut HeaderMap) {
        if let Some(server) = trace.and_then(|t| t.server.as_ref()) {
            server.context.inject(headers);
        }
    }

    /// Whether any span of this request is sampled and reported.
    fn any(&self) -> bool {
        [&self.client, &self.server]
            .into_iter()
            .flatten()
            .any(|s| s.context.sampled)
    }

    /// Sends the spans of a finished request: the server's only when the destination's side
    /// saw it (`seen_by_destination`).
    pub(super) fn finish(
        self,
        report: &Report,
        labels: &RequestLabels,
        outcome: &RequestOutcome,
        seen_by_destination: bool,
    ) {
        if !self.any() {
            return;
        }
        let view = report.conn.ctx.view();
        let end = SystemTime::now();
        let sides = [(self.client, true), (self.server, false)];
        for (side, client) in sides {
            let Some(side) = side.filter(|s| s.context.sampled) else {
                continue;
            };
            if !client && !seen_by_destination {
                continue;
            }
            let span = span(report, labels, outcome, &side, client, end);
            for provider in &side.tracing.providers {
                if let ProviderKind::OpenTelemetry {
                    service,
                    port,
                    max_tag_length,
                } = &provider.kind
                {
                    let addr = view.collector(service, *port);
                    let span = cut(span.clone(), *max_tag_length);
                    report
                        .conn
                        .ctx
                        .tracer
                        .export((service, *port), addr, Record::Span(span));
                }
            }
        }
    }
}

/// `span` with every text attribute cut to `max` characters (the provider's `maxTagLength`,
/// Envoy's 256 by default): a request's URL or headers make no span larger than that.
fn cut(mut span: Span, max: usize) -> Span {
    if let Some((at, _)) = span.name.char_indices().nth(max) {
        span.name.truncate(at);
    }
    for (_, value) in &mut span.attributes {
        if let Attribute::Text(text) = value {
            if let Some((at, _)) = text.char_indices().nth(max) {
                text.truncate(at);
            }
        }
    }
    if span
        .tracestate
        .as_ref()
        .is_some_and(|t| t.len() > MAX_TRACESTATE)
    {
        span.tracestate = None;
    }
    span
}

/// W3C Trace Context's bound on what a participant must carry of `tracestate`.
const MAX_TRACESTATE: usize = 512;

/// The values of a Telemetry's custom tags: a literal, or a request header else its default;
/// a tag with neither is left out.
fn custom_tags(tags: &[(Arc<str>, CustomTag)], headers: &HeaderMap) -> Vec<(Arc<str>, String)> {
    tags.iter()
        .filter_map(|(name, tag)| {
            let value = match tag {
                CustomTag::Literal(value) => Some(value.to_string()),
                CustomTag::Header { name, default } => headers
                    .get(&**name)
                    .and_then(|v| v.to_str().ok())
                    .or(default.as_deref())
                    .map(str::to_owned),
            }?;
            Some((name.clone(), value))
        })
        .collect()
}

/// One side's span, with the attributes Envoy gives Istio's spans.
fn span(
    report: &Report,
    labels: &RequestLabels,
    outcome: &RequestOutcome,
    side: &Side,
    client: bool,
    end: SystemTime,
) -> Span {
    let pod = &side.pod;
    let canonical = pod.canonical_service();
    let host = labels.destination_service();
    let host = if host == "unknown" {
        &*report.authority
    } else {
        host
    };
    // The source names the Service port, the destination the pod's.
    let port = match client {
        true => report.cluster.as_ref().map_or(report.conn.port, |k| k.port),
        false => report.upstream.map_or(report.conn.port, |a| a.port()),
    };
    // What the destination saw of the flags, where this proxy is both ends.
    let flags = match client || report.conn.inbound.is_some() {
        true => outcome.flags,
        false => at_destination(outcome.flags),
    };
    let path = report.uri.path_and_query().map_or("/", |p| p.as_str());
    let text = |value: &str| Attribute::Text(value.to_owned());
    let mut attributes: Vec<(Cow<'static, str>, Attribute)> = Vec::with_capacity(24);
    let mut add =
        |key: &'static str, value: Attribute| attributes.push((Cow::Borrowed(key), value));
    add("istio.canonical_service", text(canonical));
    add("istio.canonical_revision", text(pod.canonical_revision()));
    add("istio.namespace", text(&pod.key.namespace));
    add("istio.mesh_id", text("cluster.local"));
    add("node_id", text(&report.conn.ctx.dialer.node));
    add("component", text("proxy"));
    add("http.method", text(report.method.as_str()));
    add(
        "http.url",
        Attribute::Text(format!("http://{}{path}", report.authority)),
    );
    add("http.protocol", text(&format!("{:?}", report.version)));
    add(
        "http.status_code",
        Attribute::Int(i64::from(outcome.response_code)),
    );
    add("response_flags", Attribute::Text(flags.to_string()));
    add("request_size", Attribute::Int(outcome.request_bytes as i64));
    add(
        "response_size",
        Attribute::Int(outcome.response_bytes as i64),
    );
    let cluster = match (client, &report.cluster) {
        (true, Some(k)) => {
            Some(ClusterName::outbound(k.port, k.subset.as_deref(), host).to_string())
        }
        (false, _) => Some(ClusterName::inbound(port).to_string()),
        (true, None) => None,
    };
    if let Some(cluster) = cluster {
        add("upstream_cluster", Attribute::Text(cluster.clone()));
        add("upstream_cluster.name", Attribute::Text(cluster));
    }
    if let Some(upstream) = report.upstream {
        add("upstream_address", Attribute::Text(upstream.to_string()));
    }
    add(
        "peer.address",
        Attribute::Text(report.conn.client.ip().to_string()),
    );
    if let Some(id) = report.request_id.as_ref().and_then(|v| v.to_str().ok()) {
        add("guid:x-request-id", text(id));
    }
    if let Some(agent) = report.user_agent.as_ref().and_then(|v| v.to_str().ok()) {
        add("user_agent", text(agent));
    }
    if let Some(grpc) = outcome.grpc_status {
        add("grpc.status_code", Attribute::Int(i64::from(grpc)));
    }
    let (source, destination) = labels.principals();
    if let Some(source) = source {
        add("istio.source_principal", text(source));
    }
    if let Some(destination) = destination {
        add("istio.destination_principal", text(destination));
    }
    let error = outcome.response_code == 0 || outcome.response_code >= 500;
    if error {
        add("error", text("true"));
    }
    for (name, value) in &side.tags {
        attributes.push((Cow::Owned(name.to_string()), Attribute::Text(value.clone())));
    }
    Span {
        service: format!("{canonical}.{}", pod.key.namespace).into(),
        trace_id: side.context.trace_id,
        span_id: side.context.span_id,
        parent: side.context.parent,
        tracestate: side
            .context
            .tracestate
            .as_ref()
            .and_then(|s| s.to_str().ok())
            .map(str::to_owned),
        name: format!("{host}:{port}/*"),
        client,
        start: side.start,
        end,
        attributes,
        error,
    }
}
