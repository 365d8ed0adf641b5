//! What a selected rule does to the request: rewrites, redirects and header changes.

use super::*;

impl Selected<'_> {
    /// Applies the rule's rewrite (uri prefix / full path / regex, authority) to the request
    /// head. The query string is kept.
    pub fn rewrite(&self, parts: &mut Parts) {
        let Some(rewrite) = &self.rule.rewrite else {
            return;
        };
        if let Some(path) = &rewrite.path {
            let new = self.new_path(path, parts.uri.path());
            set_path(&mut parts.uri, &new);
        }
        if let Some(authority) = &rewrite.authority {
            set_authority(parts, authority);
        }
    }

    /// The response of a Redirect action (status + Location), built from the request head.
    pub fn redirect(&self, parts: &Parts) -> Option<Response<()>> {
        let RuleAction::Redirect(redirect) = &self.rule.action else {
            return None;
        };
        let (request_host, request_port) = split_host_port(request_authority(parts));
        let scheme = redirect
            .scheme
            .as_deref()
            .unwrap_or_else(|| scheme(&parts.uri));
        let host = redirect.host.as_deref().unwrap_or(request_host);
        let port = match redirect.port {
            Some(RedirectPort::Number(n)) => Some(n),
            Some(RedirectPort::FromProtocolDefault) => None,
            Some(RedirectPort::FromRequestPort) => Some(request_port.unwrap_or(self.port)),
            None if redirect.host.is_none() && redirect.scheme.is_none() => request_port,
            None => None,
        };
        let path = match &redirect.path {
            Some(rewrite) => self.new_path(rewrite, parts.uri.path()),
            None => parts.uri.path().to_owned(),
        };
        let mut location = format!("{scheme}://{host}");
        let default_port = match scheme {
            "https" => 443,
            _ => 80,
        };
        if let Some(port) = port.filter(|p| *p != default_port) {
            let _ = write!(location, ":{port}");
        }
        location.push_str(&path);
        if let Some(query) = parts.uri.query().filter(|_| !path.contains('?')) {
            location.push('?');
            location.push_str(query);
        }
        Response::builder()
            .status(redirect.status)
            .header(header::LOCATION, location)
            .body(())
            .ok()
    }

    pub(super) fn new_path(&self, rewrite: &PathRewrite, path: &str) -> String {
        let new = match (rewrite, self.matched_prefix) {
            (PathRewrite::Full(p), _) | (PathRewrite::MatchedPrefix(p), None) => p.to_string(),
            (PathRewrite::MatchedPrefix(p), Some(prefix)) => {
                format!("{p}{}", path.get(prefix.len()..).unwrap_or_default())
            }
            (PathRewrite::PrefixElements(p), None) => p.to_string(),
            (PathRewrite::PrefixElements(p), Some(prefix)) => {
                let rest = path.get(prefix.len()..).unwrap_or_default();
                format!("{}{rest}", p.trim_end_matches('/'))
            }
            (
                PathRewrite::Regex {
                    pattern,
                    substitution,
                },
                _,
            ) => pattern
                .search()
                .replace_all(path, &**substitution)
                .into_owned(),
        };
        if new.is_empty() {
            "/".to_owned()
        } else {
            new
        }
    }
}

pub fn request_authority(parts: &Parts) -> &str {
    parts
        .uri
        .authority()
        .map(Authority::as_str)
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default()
}

/// `host:port`, `[v6]:port` or a bare host.
pub(super) fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let split = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => Some(i),
        _ => None,
    };
    match split {
        Some(i) if authority.starts_with('[') || !authority[..i].contains(':') => {
            match authority[i + 1..].parse() {
                Ok(port) => (&authority[..i], Some(port)),
                Err(_) => (authority, None),
            }
        }
        _ => (authority, None),
    }
}

pub(super) fn set_path(uri: &mut Uri, path: &str) {
    let path_and_query = match uri.query() {
        Some(query) if !path.contains('?') => format!("{path}?{query}"),
        _ => path.to_owned(),
    };
    let Ok(path_and_query) = PathAndQuery::try_from(path_and_query) else {
        return;
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(new) = Uri::from_parts(parts) {
        *uri = new;
    }
}

/// HTTP/1 carries the authority in `Host`; HTTP/2 in the URI (`:authority`), and in `Host` only
/// if the client sent one.
pub(super) fn set_authority(parts: &mut Parts, authority: &str) {
    if let Ok(value) = HeaderValue::from_str(authority) {
        if parts.version < Version::HTTP_2 || parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, value);
        }
    }
    if parts.uri.authority().is_some() {
        if let Ok(authority) = Authority::try_from(authority) {
            let mut uri = parts.uri.clone().into_parts();
            uri.authority = Some(authority);
            if let Ok(new) = Uri::from_parts(uri) {
                parts.uri = new;
            }
        }
    }
}

/// Applies set/add/remove to a header map (invalid header names/values are skipped; validation
/// already rejected them). `:authority` stands for `Host`.
pub fn apply_header_ops(ops: &HeaderOps, headers: &mut HeaderMap) {
    let parse = |h: &Header| {
        let name = if &*h.name == ":authority" {
            header::HOST
        } else {
            HeaderName::from_bytes(h.name.as_bytes()).ok()?
        };
        Some((name, HeaderValue::from_str(&h.value).ok()?))
    };
    for (name, value) in ops.set.iter().filter_map(parse) {
        headers.insert(name, value);
    }
    for (name, value) in ops.add.iter().filter_map(parse) {
        headers.append(name, value);
    }
    for name in ops.remove.iter() {
        headers.remove(&**name);
    }
}
