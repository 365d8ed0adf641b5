//! Trace context on the wire: W3C Trace Context (`traceparent`, `tracestate`) and Zipkin's
//! B3, in its multi-header (`x-b3-*`) and single-header (`b3`) forms.
//!
//! A request is continued when it carries a valid context (`traceparent` first, then `b3`,
//! then `x-b3-traceid`), else it starts a trace. What the caller decided about sampling is
//! kept (W3C's `sampled` flag, B3's `1`, `0`, `d` or `x-b3-flags: 1`); a context without a
//! decision is sampled at the configured rate, as Envoy does. The proxy's span becomes the
//! parent of the next hop: `traceparent` and the B3 headers are written with its span id, and
//! `tracestate` goes on unchanged. Malformed headers are ignored, never repaired: the request
//! then starts a trace of its own, as a W3C participant must.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A 16-byte trace id; never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                return Self(id);
            }
        }
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id = fastrand::u64(..).to_be_bytes();
            if id != [0; 8] {
                return Self(id);
            }
        }
    }
}

/// Where an incoming context came from: the next hop gets the same headers, and W3C's too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The context a request arrived with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: TraceId,
    /// The caller's span: the parent of this proxy's.
    pub parent: SpanId,
    /// `Some` when the caller decided.
    pub sampled: Option<bool>,
    pub tracestate: Option<HeaderValue>,
    pub format: Format,
}

/// The context of this proxy's span, written on the request it forwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub tracestate: Option<HeaderValue>,
    /// The formats the request carried (W3C is always written).
    pub format: Option<Format>,
}

impl SpanContext {
    /// This proxy's span for a request with `headers`: a child of the caller's context, or the
    /// root of a new trace sampled with probability `rate` (0.0 to 1.0) when the caller did
    /// not decide.
    pub fn for_request(headers: &HeaderMap, rate: f64) -> Self {
        let incoming = extract(headers);
        let decided = match &incoming {
            Some(incoming) => incoming.sampled,
            // B3 may carry a decision alone (`b3: 0`, `x-b3-sampled: 1`): a new trace keeps it.
            None => b3_decision(headers),
        };
        let sampled = match decided {
            Some(decided) => decided,
            None => rate > 0.0 && fastrand::f64() < rate,
        };
        match incoming {
            Some(incoming) => Self {
                trace_id: incoming.trace_id,
                span_id: SpanId::random(),
                parent: Some(incoming.parent),
                sampled,
                tracestate: incoming.tracestate,
                format: Some(incoming.format),
            },
            None => Self {
                trace_id: TraceId::random(),
                span_id: SpanId::random(),
                parent: None,
                sampled,
                tracestate: None,
                format: None,
            },
        }
    }

    /// Writes this span as the parent of the next hop: `traceparent` (and `tracestate` as it
    /// came), and every B3 form the request arrived with, so no stale context goes on.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let single = self.format == Some(Format::B3Single) || headers.contains_key(B3);
        let multi = self.format == Some(Format::B3Multi)
            || [
                B3_TRACE_ID,
                B3_SPAN_ID,
                B3_PARENT_SPAN_ID,
                B3_SAMPLED,
                B3_FLAGS,
            ]
            .iter()
            .any(|h| headers.contains_key(h));
        let flags = if self.sampled { "01" } else { "00" };
        let traceparent = format!(
            "00-{}-{}-{flags}",
            hex(&self.trace_id.0),
            hex(&self.span_id.0)
        );
        headers.insert(TRACEPARENT, value(traceparent));
        match &self.tracestate {
            Some(state) => {
                headers.insert(TRACESTATE, state.clone());
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
        let sampled = if self.sampled { "1" } else { "0" };
        if single {
            let b3 = format!(
                "{}-{}-{sampled}",
                hex(&self.trace_id.0),
                hex(&self.span_id.0)
            );
            headers.insert(B3, value(b3));
        }
        if multi {
            headers.insert(B3_TRACE_ID, value(hex(&self.trace_id.0)));
            headers.insert(B3_SPAN_ID, value(hex(&self.span_id.0)));
            match self.parent {
                Some(parent) => {
                    headers.insert(B3_PARENT_SPAN_ID, value(hex(&parent.0)));
                }
                None => {
                    headers.remove(B3_PARENT_SPAN_ID);
                }
            }
            headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
            headers.remove(B3_FLAGS);
        }
    }
}

/// A B3 sampling decision sent without a context: `b3: 0|1|d`, or `x-b3-sampled` (or
/// `x-b3-flags: 1`) without ids.
fn b3_decision(headers: &HeaderMap) -> Option<bool> {
    if let Some(b3) = headers.get(B3) {
        return match b3.as_bytes() {
            b"0" => Some(false),
            b"1" | b"d" => Some(true),
            _ => None,
        };
    }
    if headers.get(B3_FLAGS).is_some_and(|f| f == "1") {
        return Some(true);
    }
    match headers.get(B3_SAMPLED).map(HeaderValue::as_bytes) {
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        _ => None,
    }
}

/// The context `headers` carry, if one is valid.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    if let Some(value) = headers.get(TRACEPARENT) {
        // An invalid traceparent means a new trace, whatever else the request carries.
        let (trace_id, parent, sampled) = traceparent(value.to_str().ok()?)?;
        let tracestate = headers.get(TRACESTATE).cloned();
        return Some(Incoming {
            trace_id,
            parent,
            sampled: Some(sampled),
            tracestate,
            format: Format::W3c,
        });
    }
    if let Some(value) = headers.get(B3) {
        return b3_single(value.to_str().ok()?);
    }
    let trace_id = trace_id(headers.get(B3_TRACE_ID)?.to_str().ok()?)?;
    let parent = span_id(headers.get(B3_SPAN_ID)?.to_str().ok()?)?;
    let debug = headers.get(B3_FLAGS).is_some_and(|f| f == "1");
    let sampled = match headers.get(B3_SAMPLED).map(HeaderValue::as_bytes) {
        _ if debug => Some(true),
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        None => None,
        Some(_) => return None,
    };
    Some(Incoming {
        trace_id,
        parent,
        sampled,
        tracestate: None,
        format: Format::B3Multi,
    })
}

/// `version-traceid-parentid-flags` (W3C Trace Context level 1, section 3.2): version 00
/// exactly so; a later version may add fields after the flags, never change these four.
fn traceparent(value: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let (trace, parent, flags) = (fields.next()?, fields.next()?, fields.next()?);
    let rest = fields.next();
    if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && rest.is_some() {
        return None;
    }
    if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    if ![trace, parent, flags].into_iter().all(is_lower_hex) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id(trace)?, span_id(parent)?, flags & 1 == 1))
}

/// `{TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`; a header with only a sampling
/// state starts a trace with that decision, which this proxy makes itself (`None`).
fn b3_single(value: &str) -> Option<Incoming> {
    let mut fields = value.trim().split('-');
    let trace = trace_id(fields.next()?)?;
    let parent = span_id(fields.next()?)?;
    let sampled = match fields.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    if let Some(parent_of_parent) = fields.next() {
        span_id(parent_of_parent)?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Incoming {
        trace_id: trace,
        parent,
        sampled,
        tracestate: None,
        format: Format::B3Single,
    })
}

/// 32 hex digits, or 16 (B3's 64-bit ids, left-padded with zeros); not all zeros.
fn trace_id(text: &str) -> Option<TraceId> {
    let mut id = [0u8; 16];
    match text.len() {
        32 => decode(text, &mut id)?,
        16 => decode(text, &mut id[8..])?,
        _ => return None,
    }
    (id != [0; 16]).then_some(TraceId(id))
}

fn span_id(text: &str) -> Option<SpanId> {
    let mut id = [0u8; 8];
    if text.len() != 16 {
        return None;
    }
    decode(text, &mut id)?;
    (id != [0; 8]).then_some(SpanId(id))
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hex digits (either case for B3, which does not say; W3C's are checked lower case by the
/// callers that must) into `out`.
fn decode(text: &str, out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 || !text.is_ascii() {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(text, "{b:02x}");
    }
    text
}

fn value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    #[test]
    fn w3c_context_is_continued_with_a_new_span() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let span = SpanContext::for_request(&h, 0.0);
        assert_eq!(hex(&span.trace_id.0), TRACE);
        assert_eq!(span.parent.map(|p| hex(&p.0)).as_deref(), Some(PARENT));
        assert!(span.sampled, "the caller's decision wins over a 0% rate");
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        let traceparent = out["traceparent"].to_str().unwrap();
        assert!(traceparent.starts_with(&format!("00-{TRACE}-")));
        assert!(traceparent.ends_with("-01"));
        assert_ne!(
            &traceparent[36..52],
            PARENT,
            "the next hop's parent is our span"
        );
        assert_eq!(out["tracestate"], "congo=t61rcWkgMzE");
    }

    #[test]
    fn unsampled_callers_stay_unsampled() {
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))]);
        assert!(!SpanContext::for_request(&h, 1.0).sampled);
    }

    #[test]
    fn invalid_traceparents_start_a_new_trace() {
        for bad in [
            format!("00-{}-{PARENT}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{PARENT}-01"),
            format!("00-{TRACE}-{PARENT}-01-extra"),
            format!("00-{}-{PARENT}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{PARENT}"),
            "garbage".to_owned(),
        ] {
            let h = headers(&[
                ("traceparent", &bad),
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", PARENT),
            ]);
            assert_eq!(extract(&h), None, "{bad}");
        }
        // A later version may add fields.
        let h = headers(&[("traceparent", &format!("01-{TRACE}-{PARENT}-01-what-ever"))]);
        assert!(extract(&h).is_some());
    }

    #[test]
    fn b3_single_and_multi_are_read_and_written_back() {
        let single = headers(&[("b3", &format!("{TRACE}-{PARENT}-d-{PARENT}"))]);
        let incoming = extract(&single).unwrap();
        assert_eq!(incoming.format, Format::B3Single);
        assert_eq!(incoming.sampled, Some(true));
        let span = SpanContext::for_request(&single, 0.0);
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        let b3 = out["b3"].to_str().unwrap();
        assert!(b3.starts_with(TRACE) && b3.ends_with("-1"), "{b3}");
        assert!(out.contains_key("traceparent"));

        // 64-bit trace ids are left-padded; no sampling header: the rate decides.
        let multi = headers(&[("x-b3-traceid", PARENT), ("x-b3-spanid", PARENT)]);
        let incoming = extract(&multi).unwrap();
        assert_eq!(
            hex(&incoming.trace_id.0),
            format!("{}{PARENT}", "0".repeat(16))
        );
        assert_eq!(incoming.sampled, None);
        assert!(SpanContext::for_request(&multi, 1.0).sampled);
        assert!(!SpanContext::for_request(&multi, 0.0).sampled);
        let span = SpanContext::for_request(&multi, 1.0);
        let mut out = headers(&[("x-b3-flags", "1")]);
        span.inject(&mut out);
        assert_eq!(out["x-b3-parentspanid"], PARENT);
        assert_eq!(out["x-b3-sampled"], "1");
        assert!(!out.contains_key("x-b3-flags"));
        let debug = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(extract(&debug).unwrap().sampled, Some(true));
    }

    #[test]
    fn a_b3_decision_without_ids_is_kept_and_stale_b3_is_rewritten() {
        assert!(!SpanContext::for_request(&headers(&[("b3", "0")]), 1.0).sampled);
        assert!(SpanContext::for_request(&headers(&[("b3", "d")]), 0.0).sampled);
        assert!(!SpanContext::for_request(&headers(&[("x-b3-sampled", "0")]), 1.0).sampled);
        // traceparent wins, and the B3 headers the request also had follow it.
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("x-b3-traceid", "0123456789abcdef0123456789abcdef"),
            ("x-b3-spanid", "0123456789abcdef"),
            ("b3", "0123456789abcdef0123456789abcdef-0123456789abcdef-0"),
        ]);
        let span = SpanContext::for_request(&h, 0.0);
        span.inject(&mut h);
        assert_eq!(h["x-b3-traceid"], TRACE);
        assert_eq!(h["x-b3-spanid"], hex(&span.span_id.0));
        assert_eq!(h["x-b3-parentspanid"], PARENT);
        assert!(h["b3"].to_str().unwrap().starts_with(TRACE));
    }

    #[test]
    fn new_traces_are_sampled_at_the_rate() {
        let none = HeaderMap::new();
        let sampled = (0..10_000)
            .filter(|_| SpanContext::for_request(&none, 0.01).sampled)
            .count();
        // 1% of 10,000: 100 expected; 40 and 180 are over six standard deviations away.
        assert!((40..180).contains(&sampled), "{sampled}");
        let root = SpanContext::for_request(&none, 1.0);
        assert_eq!(root.parent, None);
        let mut out = headers(&[("tracestate", "stale=1")]);
        root.inject(&mut out);
        assert!(!out.contains_key("tracestate"));
        assert!(!out.contains_key("b3") && !out.contains_key("x-b3-traceid"));
    }
}
