//! Value checks shared by the Istio and Gateway API translations, each mirroring the upstream
//! rule it is named after, so a resource the upstream control plane rejects is rejected here
//! with a comparable reason. Every check returns the reason as text; the caller names the field.
//!
//! Sources: Istio `pkg/config/validation` (`validation.go`, `virtualservice.go`,
//! `agent/validation.go`), `pkg/config/labels`, `pkg/config/security`; the Gateway API
//! `apis/v1` kubebuilder and CEL markers (`shared_types.go`, `httproute_types.go`,
//! `grpcroute_types.go`).

use std::{sync::LazyLock, time::Duration};

use crate::model::{
    traffic::{IpBlock, Pattern, RetryOn, RetryPolicy},
    Labels,
};

/// Istio refuses longer expressions: Envoy bounds the RE2 program size and length is the proxy
/// for it (`validateStringRegexp`).
pub const MAX_REGEX_LEN: usize = 1024;

/// A Go `time.ParseDuration` string (`1.5s`, `300ms`, `2m`, `1h30m`, `0`), as Istio's durations
/// are written. Negative durations are refused.
pub fn go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (write it like 1.5s, 300ms, 2m or 1h)");
    if text.starts_with('-') {
        return Err(format!("{text:?}: a duration must not be negative"));
    }
    let mut s = text.strip_prefix('+').unwrap_or(text);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    // Go's limit: the nanoseconds of a duration fit an i64.
    const MAX_NANOS: u128 = i64::MAX as u128;
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int, rest) = s.split_at(int_len);
        let (frac, rest) = match rest.strip_prefix('.') {
            Some(r) => r.split_at(r.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", rest),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (unit, rest) = rest.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(format!("{text:?}: missing unit (ns, us, ms, s, m or h)")),
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use ns, us, ms, s, m or h)"
                ))
            }
        };
        let overflow = || format!("{text:?}: duration too large");
        let mut value: u128 = 0;
        for digit in int.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(digit - b'0')))
                .filter(|v| *v <= MAX_NANOS)
                .ok_or_else(overflow)?;
        }
        let mut nanos = value.checked_mul(scale).ok_or_else(overflow)?;
        // Like Go, digits beyond what the unit can resolve are dropped.
        let frac = &frac[..frac.len().min(20)];
        if !frac.is_empty() {
            let digits: u128 = frac.parse().map_err(|_| bad())?;
            nanos += digits * scale / 10u128.pow(frac.len() as u32);
        }
        total = total
            .checked_add(nanos)
            .filter(|t| *t <= MAX_NANOS)
            .ok_or_else(overflow)?;
        s = rest;
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Istio's `ValidateDuration`: at least 1ms, whole milliseconds.
pub fn istio_duration(text: &str) -> Result<Duration, String> {
    let d = go_duration(text)?;
    if d < Duration::from_millis(1) {
        return Err(format!("{text:?}: a duration must be at least 1ms"));
    }
    if d.as_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "{text:?}: only durations to ms precision are supported"
        ));
    }
    Ok(d)
}

/// A Gateway API `Duration` (GEP-2257): `^([0-9]{1,5}(h|m|s|ms)){1,4}$`, no fractions.
pub fn gateway_duration(text: &str) -> Result<Duration, String> {
    static SHAPE: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$").expect("a valid expression")
    });
    if !SHAPE.is_match(text) {
        return Err(format!(
            "{text:?} is not a Gateway API duration (up to 4 parts of at most 5 digits with h, m, s or ms, like 10s or 1m30s)"
        ));
    }
    go_duration(text)
}

/// A percentage as Istio's `Percent` holds it: 0.0, or 0.0001 to 100.0 (`validatePercentage`).
pub fn fractional_percent(value: f64) -> Result<f64, String> {
    if value.is_nan() || !(0.0..=100.0).contains(&value) || (value > 0.0 && value < 0.0001) {
        return Err(format!(
            "percentage {value} is neither 0.0, nor in range [0.0001, 100.0]"
        ));
    }
    Ok(value)
}

/// RFC 1123 label as Istio checks it (`labels.IsDNS1123Label`: letters of either case).
pub fn istio_dns_label(s: &str) -> bool {
    label_shape(s, true)
}

/// RFC 1123 label as Kubernetes checks it (lower case): namespaces and Gateway API names.
pub fn k8s_dns_label(s: &str) -> bool {
    label_shape(s, false)
}

fn label_shape(s: &str, upper: bool) -> bool {
    let ok =
        |b: u8| b.is_ascii_digit() || b.is_ascii_lowercase() || (upper && b.is_ascii_uppercase());
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= 63 && ok(first) && ok(last) && bytes.iter().all(|&b| ok(b) || b == b'-')
        }
        _ => false,
    }
}

/// RFC 1123 subdomain in lower case (Gateway API `PreciseHostname`, `SectionName`, `Group`).
pub fn k8s_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(k8s_dns_label)
}

/// Istio's `ValidateDNS1123Labels`: every label valid, the last may be empty (`istio.io.`), the
/// top-level domain not all digits.
fn istio_dns_labels(domain: &str) -> Result<(), String> {
    let labels: Vec<&str> = domain.split('.').collect();
    let tld = labels[labels.len() - 1];
    if !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {tld:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in labels.iter().enumerate() {
        if i == labels.len() - 1 && label.is_empty() {
            break;
        }
        if !istio_dns_label(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

fn domain_preconditions(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    if domain.len() > 255 {
        return Err(format!("domain name {domain:?} too long (max 255)"));
    }
    Ok(())
}

/// Istio's `ValidateFQDN`.
pub fn fqdn(domain: &str) -> Result<(), String> {
    domain_preconditions(domain)?;
    istio_dns_labels(domain)
}

/// Istio's `ValidateWildcardDomain`: a host, or a host whose first label is `*`, `*foo` or
/// `*-foo`.
pub fn wildcard_domain(domain: &str) -> Result<(), String> {
    domain_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (domain, None),
    };
    let first_ok = first == "*" || {
        let label = first
            .strip_prefix("*-")
            .or_else(|| first.strip_prefix('*'))
            .unwrap_or(first);
        first.len() <= 63 && istio_dns_label(label)
    };
    if !first_ok {
        return Err(format!(
            "domain name {domain:?} invalid (label {first:?} invalid)"
        ));
    }
    match rest {
        Some(rest) => istio_dns_labels(rest),
        None => Ok(()),
    }
}

/// Istio's `host.Name.Matches`: whether two hosts overlap (`*.com` covers `foo.com`).
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    let wild = |h: &str| h.starts_with('*');
    match (wild(a), wild(b)) {
        (false, false) => a == b,
        (true, false) => b.ends_with(&a[1..]),
        (false, true) => a.ends_with(&b[1..]),
        (true, true) => a[1..].ends_with(&b[1..]) || b[1..].ends_with(&a[1..]),
    }
}

/// Istio's `ValidateIPSubnet`: an address or a CIDR block.
pub fn ip_or_cidr(s: &str) -> Result<IpBlock, String> {
    s.parse()
}

/// Istio's `labels.Instance.Validate`: Kubernetes label keys (optional DNS prefix and `/`) and
/// values. Returns the offending key.
pub fn labels(labels: &Labels) -> Result<(), (String, String)> {
    for (key, value) in labels {
        if let Err(reason) = label_key(key) {
            return Err((key.clone(), reason));
        }
        if !value.is_empty() && !qualified_name(value) {
            return Err((key.clone(), format!("invalid tag value: {value:?}")));
        }
    }
    Ok(())
}

fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.len() > 253 || !prefix.split('.').all(istio_dns_label) {
            return Err(format!("invalid tag key: {key:?}"));
        }
    }
    if !qualified_name(name) {
        return Err(format!("invalid tag key: {key:?}"));
    }
    if name.len() > 63 {
        return Err(format!("invalid tag key: {key:?} (name is too long)"));
    }
    Ok(())
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn qualified_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// Istio's `validateWorkloadSelector`: no empty key, no wildcard.
pub fn workload_selector(labels: &Labels) -> Result<(), (String, String)> {
    for (key, value) in labels {
        if key.is_empty() {
            return Err((key.clone(), "empty key is not supported in selector".into()));
        }
        if key.contains('*') || value.contains('*') {
            return Err((
                key.clone(),
                format!("wildcard is not supported in selector: \"{key}={value}\""),
            ));
        }
    }
    Ok(())
}

/// The header names Istio accepts in matches (`^[-_A-Za-z0-9]+$`, `ValidateHTTPHeaderName`).
pub fn istio_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!("header name {name:?} is not a valid header name"));
    }
    Ok(())
}

/// An RFC 7230 `token`, the Gateway API `HeaderName` (1-256 characters).
pub fn http_token(name: &str) -> Result<(), String> {
    let tchar = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            )
    };
    if name.is_empty() || name.len() > 256 || !name.bytes().all(tchar) {
        return Err(format!(
            "{name:?} is not a valid header name (an RFC 7230 token of 1-256 characters)"
        ));
    }
    Ok(())
}

/// Istio's `ValidateHTTPHeaderValue`: no control characters but tab, and Envoy's `%VARIABLE%`
/// syntax closed (`%%` is a literal percent).
pub fn header_value(value: &str) -> Result<(), String> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(format!(
            "header value {value:?} contains a control character"
        ));
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if bytes.get(i + 1) == Some(&b'%') {
                i += 2;
                continue;
            }
            match bytes[i + 1..].iter().position(|&b| b == b'%') {
                Some(end) => i += end + 2,
                None => {
                    return Err(format!(
                        "header value {value:?}: unterminated variable expression (write %% for a literal %)"
                    ))
                }
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// A regular expression as Istio accepts it: non-empty, at most 1024 characters, compiling
/// (RE2 syntax; the `regex` crate implements the same dialect).
pub fn pattern(source: &str) -> Result<Pattern, String> {
    if source.is_empty() {
        return Err("regex string match should not be empty".into());
    }
    if source.len() > MAX_REGEX_LEN {
        return Err(format!(
            "regex is too large, max length allowed is {MAX_REGEX_LEN}"
        ));
    }
    Pattern::new(source).map_err(|e| {
        format!(
            "{source:?} is not a valid regular expression (RE2 syntax): {}",
            e.to_string().lines().last().unwrap_or_default()
        )
    })
}

/// Istio's `validateHTTPRetry` for `retryOn`: comma-separated Envoy policies or HTTP status
/// codes Go's `net/http` knows, without spaces.
pub fn retry_on(list: &str) -> Result<Vec<RetryOn>, String> {
    list.split(',')
        .map(|item| {
            if let Some(policy) = RetryPolicy::parse(item) {
                return Ok(RetryOn::Policy(policy));
            }
            match item.parse::<u16>() {
                Ok(code) if item.bytes().all(|b| b.is_ascii_digit()) && known_status(code) => {
                    Ok(RetryOn::Status(code))
                }
                _ => Err(format!(
                    "{item:?} is not a valid retryOn policy (one of {}, or an HTTP status code; separate them with commas, no spaces)",
                    RetryPolicy::ALL.map(RetryPolicy::as_str).join(", ")
                )),
            }
        })
        .collect()
}

/// The status codes Go's `http.StatusText` names.
fn known_status(code: u16) -> bool {
    matches!(code,
        100..=103 | 200..=208 | 226 | 300..=305 | 307 | 308 | 400..=418 | 421..=426 | 428 | 429
        | 431 | 451 | 500..=508 | 510 | 511)
}

/// Istio's `validateExportTo` (`.`, `*`, `~` for ServiceEntries only, or namespaces).
pub fn export_to(namespace: &str, entries: &[&str], service_entry: bool) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for &entry in entries {
        let key = if entry == "." { namespace } else { entry };
        if seen.contains(&key) {
            return Err(if key != entry {
                format!("duplicate entries in exportTo: . and current namespace {namespace}")
            } else {
                format!("duplicate entries in exportTo for entry {entry}")
            });
        }
        match key {
            "*" => {}
            "~" if service_entry => {}
            "~" => {
                return Err(
                    "exportTo ~ (none) is not allowed for Istio configuration objects".into(),
                )
            }
            _ if istio_dns_label(key) => {}
            _ => {
                return Err(format!(
                    "{entry:?}: only ., *, or a valid DNS 1123 label is allowed as exportTo entry"
                ))
            }
        }
        seen.push(key);
    }
    if entries.len() > 1 && seen.contains(&"*") {
        return Err(
            "cannot have both public (*) and non-public exportTo values for a resource".into(),
        );
    }
    if entries.len() > 1 && seen.contains(&"~") {
        return Err("cannot export service entry to no one (~) and someone".into());
    }
    Ok(())
}

/// Istio's `validateGatewayNames`: `namespace/name`, a legacy FQDN, or `mesh`.
pub fn gateway_name(name: &str) -> Result<(), String> {
    match name.split_once('/') {
        None => fqdn(name),
        Some((ns, gw)) => {
            if ns.is_empty() || gw.is_empty() {
                return Err("config namespace and gateway name cannot be empty".into());
            }
            if !istio_dns_label(ns) {
                return Err(format!("invalid value for namespace: {ns:?}"));
            }
            if !istio_dns_label(gw) {
                return Err(format!("invalid value for gateway name: {gw:?}"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        for (text, expected) in [
            ("0", Duration::ZERO),
            ("7s", Duration::from_secs(7)),
            ("1.5s", Duration::from_millis(1500)),
            ("300ms", Duration::from_millis(300)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("+2s", Duration::from_secs(2)),
            ("10us", Duration::from_micros(10)),
            ("10\u{b5}s", Duration::from_micros(10)),
            ("3ns", Duration::from_nanos(3)),
            ("1.0000000000000000000001s", Duration::from_secs(1)),
        ] {
            assert_eq!(go_duration(text), Ok(expected), "{text}");
        }
        for text in [
            "",
            "-1s",
            "-0",
            "1",
            "s",
            ".s",
            "1x",
            "1 s",
            "1s ",
            "1.5.5s",
            "abc",
            "9999999999999999999h",
            "2562048h",
        ] {
            assert!(go_duration(text).is_err(), "{text}");
        }
        assert!(go_duration("-5s").unwrap_err().contains("negative"));
    }

    #[test]
    fn istio_and_gateway_durations() {
        assert_eq!(istio_duration("7s"), Ok(Duration::from_secs(7)));
        assert!(istio_duration("0s").unwrap_err().contains("at least 1ms"));
        assert!(istio_duration("1500us")
            .unwrap_err()
            .contains("ms precision"));
        assert_eq!(gateway_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(gateway_duration("0s"), Ok(Duration::ZERO));
        for text in ["1.5s", "100000s", "1h1m1s1ms1s", "10", "-1s", "1us"] {
            assert!(gateway_duration(text).is_err(), "{text}");
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(fractional_percent(0.0), Ok(0.0));
        assert_eq!(fractional_percent(100.0), Ok(100.0));
        for bad in [-1.0, 100.5, 0.00001, f64::NAN] {
            assert!(fractional_percent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domains() {
        for ok in [
            "reviews",
            "reviews.bookinfo.svc.cluster.local",
            "*.example.com",
            "*",
            "*-foo.com",
            "istio.io.",
        ] {
            assert_eq!(wildcard_domain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "foo.*.com", "-foo", "foo_bar.com", "10.0.0.1", "a..b"] {
            assert!(wildcard_domain(bad).is_err(), "{bad}");
        }
        assert!(fqdn("*.example.com").is_err());
        assert!(hosts_overlap("*.com", "foo.com"));
        assert!(hosts_overlap("*", "*.com"));
        assert!(!hosts_overlap("*.foo.com", "foo.com"));
        assert!(!hosts_overlap("a.com", "b.com"));
    }

    #[test]
    fn label_rules() {
        let ok: Labels = [
            ("app", "reviews"),
            ("example.com/tier", "a.b_c-d"),
            ("empty", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(labels(&ok), Ok(()));
        for (k, v) in [("-app", "x"), ("app", "-x"), ("a/b/c", "x"), ("", "x")] {
            let bad: Labels = [(k.to_owned(), v.to_owned())].into_iter().collect();
            assert!(labels(&bad).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn header_names_and_values() {
        assert!(istio_header_name("end-user").is_ok());
        assert!(istio_header_name("x.y").is_err());
        assert!(http_token("X-Custom.Header~").is_ok());
        assert!(http_token(":path").is_err());
        assert!(http_token("a b").is_err());
        for ok in [
            "foo",
            "%HOSTNAME%",
            "100%%",
            "prefix %HOSTNAME% suffix",
            "tab\there",
        ] {
            assert_eq!(header_value(ok), Ok(()), "{ok}");
        }
        for bad in ["abc%123", "%START_TIME%%", "line\nbreak"] {
            assert!(header_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_conditions() {
        assert_eq!(
            retry_on("5xx,gateway-error,503").unwrap(),
            [
                RetryOn::Policy(RetryPolicy::FiveXx),
                RetryOn::Policy(RetryPolicy::GatewayError),
                RetryOn::Status(503)
            ]
        );
        for bad in ["5xx, reset", "599", "+503", "bogus", ""] {
            assert!(retry_on(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn export_to_rules() {
        assert!(export_to("ns", &[".", "other"], false).is_ok());
        assert!(export_to("ns", &[".", "ns"], false).is_err());
        assert!(export_to("ns", &["*", "other"], false).is_err());
        assert!(export_to("ns", &["~"], false).is_err());
        assert!(export_to("ns", &["~"], true).is_ok());
        assert!(export_to("ns", &["Not_A_Label"], false).is_err());
    }

    #[test]
    fn regexes() {
        assert!(pattern("^/api/.*$").is_ok());
        assert!(pattern("(")
            .unwrap_err()
            .contains("not a valid regular expression"));
        assert!(pattern("").is_err());
        assert!(pattern(&"a".repeat(1025)).unwrap_err().contains("1024"));
    }
}
