//! Why a Service's routes handle a request as they do, for `meshctl explain`: which
//! VirtualService the client sees and why the others are passed over, then each rule tried in
//! order with the condition that failed. The verdicts are the router's own
//! ([`ServiceRoutes::select`], [`Conditions::applies`], [`Conditions::matches`]); this module
//! only finds words for them.

use serde::{Deserialize, Serialize};

use super::*;

/// One route, or one rule of a route, as the router considered it for a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Considered {
    /// `VirtualService bookinfo/reviews`, `VirtualService bookinfo/reviews http[0]`,
    /// `HTTPRoute ns/name rules[1]`.
    pub name: String,
    /// What it asks of a request (`uri prefix "/api", header end-user exact "jason"`).
    pub requires: String,
    /// It handles the request (a route: the one the client sees; a rule: the one that matched).
    pub chosen: bool,
    /// Why it does not, or what made it win.
    pub reason: String,
}

/// How the routes of a Service were read for one request, in the order the router reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTrace {
    /// Every VirtualService naming the Service.
    pub virtual_services: Vec<Considered>,
    /// The rules tried, in order, up to the one that matched.
    pub rules: Vec<Considered>,
}

impl ServiceRoutes {
    /// Why [`select`](Self::select) answers what it does for `request`.
    pub fn explain(&self, request: &RequestInfo<'_>) -> RouteTrace {
        let client = request.source.map(|p| &*p.key.namespace);
        let mut trace = RouteTrace::default();
        let http = |vs: &CompiledVs| !vs.http.is_empty();
        let chosen = self.virtual_service(client, http);
        let chosen_specificity = chosen.and_then(|c| {
            self.virtual_services
                .iter()
                .find(|v| v.vs.key == c.key)
                .map(|v| v.specificity)
        });
        for candidate in &self.virtual_services {
            let vs = &*candidate.vs;
            let picked = chosen.is_some_and(|c| c.key == vs.key);
            let reason = if picked {
                "the VirtualService this client sees for the Service".to_owned()
            } else if !http(vs) {
                "no http rules (tcp only)".to_owned()
            } else if !vs.visible_to(client) {
                match client {
                    Some(ns) => format!("not exported to namespace {ns}"),
                    None => "not exported to every namespace, and the client is no pod of the mesh"
                        .to_owned(),
                }
            } else if chosen_specificity.is_some_and(|s| s > candidate.specificity) {
                "another VirtualService names the Service by a more specific host".to_owned()
            } else {
                let winner = chosen.map(|c| c.key.to_string()).unwrap_or_default();
                format!("{winner} is preferred: the client's namespace first, then the Service's, then by name")
            };
            trace.virtual_services.push(Considered {
                name: format!("VirtualService {}", vs.key),
                requires: match candidate.specificity {
                    usize::MAX => "a host naming the Service".to_owned(),
                    0 => "host *".to_owned(),
                    _ => "a wildcard host".to_owned(),
                },
                chosen: picked,
                reason,
            });
        }
        if let Some(vs) = chosen {
            if vs.explain(request, &mut trace.rules) {
                return trace;
            }
        }
        if let Some(table) = client
            .filter(|ns| *ns != &*self.service.namespace)
            .and_then(|ns| self.consumers.get(ns))
        {
            if table.explain(request, &mut trace.rules) {
                return trace;
            }
        }
        self.producer.explain(request, &mut trace.rules);
        trace
    }
}

impl CompiledVs {
    /// Adds the rules tried to `rules`; whether one matched or applied (so that the request
    /// does not fall through to the Gateway API routes).
    fn explain(&self, request: &RequestInfo<'_>, rules: &mut Vec<Considered>) -> bool {
        let mut applicable = false;
        for entry in self.http.iter() {
            if entry.matches.is_empty() {
                rules.push(Considered {
                    name: entry.rule.name.to_string(),
                    requires: "nothing (no match)".to_owned(),
                    chosen: true,
                    reason: "a rule without match takes every request".to_owned(),
                });
                return true;
            }
            for (m, conditions) in entry.matches.iter().enumerate() {
                let name = if entry.matches.len() > 1 {
                    format!("{} match[{m}]", entry.rule.name)
                } else {
                    entry.rule.name.to_string()
                };
                let (chosen, reason) = conditions.verdict(request);
                applicable |= conditions.applies(request);
                rules.push(Considered {
                    name,
                    requires: conditions.describe(),
                    chosen,
                    reason,
                });
                if chosen {
                    return true;
                }
            }
        }
        applicable
    }
}

impl GammaTable {
    fn explain(&self, request: &RequestInfo<'_>, rules: &mut Vec<Considered>) -> bool {
        let mut applicable = false;
        for entry in &self.entries {
            let mut requires = entry.conditions.describe();
            if !entry.ports.is_empty() {
                let ports: Vec<_> = entry.ports.iter().map(u16::to_string).collect();
                requires = format!("port {}, {requires}", ports.join(" or "));
            }
            if !entry.ports.is_empty() && !entry.ports.contains(&request.port) {
                rules.push(Considered {
                    name: entry.rule.name.to_string(),
                    requires,
                    chosen: false,
                    reason: format!(
                        "attached to another port (the request is to {})",
                        request.port
                    ),
                });
                continue;
            }
            applicable = true;
            let (chosen, reason) = entry.conditions.verdict(request);
            rules.push(Considered {
                name: entry.rule.name.to_string(),
                requires,
                chosen,
                reason,
            });
            if chosen {
                return true;
            }
        }
        applicable
    }
}

impl Conditions {
    /// Whether the request matches, and why (not).
    fn verdict(&self, request: &RequestInfo<'_>) -> (bool, String) {
        if !self.applies(request) {
            let why = self
                .inapplicable(request)
                .unwrap_or_else(|| "does not concern this client".to_owned());
            return (false, format!("not for this client: {why}"));
        }
        match self.matches(request) {
            Some(_) => (true, "matched".to_owned()),
            None => (
                false,
                self.unmet(request)
                    .unwrap_or_else(|| "does not match".to_owned()),
            ),
        }
    }

    /// What the match asks of a request.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        match &self.path {
            PathCondition::Any => {}
            path => parts.push(path.describe()),
        }
        if let Some(m) = &self.method {
            parts.push(format!("method {}", describe(m)));
        }
        if let Some(m) = &self.scheme {
            parts.push(format!("scheme {}", describe(m)));
        }
        if let Some(m) = &self.authority {
            parts.push(format!("authority {}", describe(m)));
        }
        for h in self.headers.iter() {
            parts.push(format!("header {}", h.describe()));
        }
        for h in self.without_headers.iter() {
            parts.push(format!("without header {}", h.describe()));
        }
        for q in self.query.iter() {
            parts.push(format!("query {}", named(&q.name, q.value.as_ref())));
        }
        if let Some(port) = self.port {
            parts.push(format!("port {port}"));
        }
        if let Some(ns) = &self.source_namespace {
            parts.push(format!("source namespace {ns}"));
        }
        if !self.source_labels.is_empty() {
            parts.push(format!("source labels {}", labels(&self.source_labels)));
        }
        if !self.mesh {
            parts.push("gateways (not mesh)".to_owned());
        }
        if parts.is_empty() {
            "any request".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// Why the match does not concern this client and port.
    fn inapplicable(&self, request: &RequestInfo<'_>) -> Option<String> {
        if !self.mesh {
            return Some("the match names gateways, not mesh".to_owned());
        }
        if let Some(port) = self.port.filter(|p| *p != request.port) {
            return Some(format!(
                "it is for port {port}, the request is to {}",
                request.port
            ));
        }
        let pod = request.source;
        if let Some(ns) = &self.source_namespace {
            if pod.is_none_or(|p| p.key.namespace != *ns) {
                let client = pod.map_or("no pod of the mesh", |p| &*p.key.namespace);
                return Some(format!(
                    "it is for clients in namespace {ns}, the client is in {client}"
                ));
            }
        }
        if !source_matches(&self.source_labels, &None, pod) {
            return Some(format!(
                "it is for clients labelled {}, the client is not",
                labels(&self.source_labels)
            ));
        }
        None
    }

    /// The first condition the request fails.
    fn unmet(&self, request: &RequestInfo<'_>) -> Option<String> {
        let path = request.uri.path();
        if self.path.matches(path).is_none() {
            return Some(format!("{}: the path is {path:?}", self.path.describe()));
        }
        let method = request.method.as_str();
        if let Some(m) = self.method.as_ref().filter(|m| !m.matches(method)) {
            return Some(format!("method {}: the method is {method}", describe(m)));
        }
        let scheme = scheme(request.uri);
        if let Some(m) = self.scheme.as_ref().filter(|m| !m.matches(scheme)) {
            return Some(format!("scheme {}: the scheme is {scheme}", describe(m)));
        }
        if let Some(m) = self
            .authority
            .as_ref()
            .filter(|m| !m.matches(request.authority))
        {
            return Some(format!(
                "authority {}: the authority is {:?}",
                describe(m),
                request.authority
            ));
        }
        if let Some(h) = self.headers.iter().find(|h| !h.holds(request)) {
            return Some(format!(
                "header {}: {}",
                h.describe(),
                h.actual(request)
                    .map_or_else(|| "absent".to_owned(), |v| format!("the value is {v:?}"))
            ));
        }
        if let Some(h) = self.without_headers.iter().find(|h| h.holds(request)) {
            return Some(format!(
                "without header {}: the request has it",
                h.describe()
            ));
        }
        if let Some(q) = self
            .query
            .iter()
            .find(|q| !query_holds(q, request.uri.query()))
        {
            return Some(format!(
                "query {}: not in the query {:?}",
                named(&q.name, q.value.as_ref()),
                request.uri.query().unwrap_or("")
            ));
        }
        None
    }
}

impl PathCondition {
    fn describe(&self) -> String {
        match self {
            PathCondition::Any => "any path".to_owned(),
            PathCondition::Exact { value, ignore_case } => {
                format!("uri exact {value:?}{}", case(*ignore_case))
            }
            PathCondition::Prefix { value, ignore_case } => {
                format!("uri prefix {value:?}{}", case(*ignore_case))
            }
            PathCondition::Regex(p) => format!("uri regex {:?}", p.as_str()),
            PathCondition::Elements(value) => format!(
                "path prefix {:?} (whole segments)",
                if value.is_empty() { "/" } else { value }
            ),
            PathCondition::Grpc(GrpcMethodMatch::Exact { service, method }) => format!(
                "gRPC method {}/{}",
                service.as_deref().unwrap_or("*"),
                method.as_deref().unwrap_or("*")
            ),
            PathCondition::Grpc(GrpcMethodMatch::Regex { service, method }) => format!(
                "gRPC method regex {}/{}",
                service.as_ref().map_or("*", |p| p.as_str()),
                method.as_ref().map_or("*", |p| p.as_str())
            ),
        }
    }
}

impl HeaderCondition {
    fn describe(&self) -> String {
        let name = match &self.name {
            HeaderKey::Authority => ":authority",
            HeaderKey::Method => ":method",
            HeaderKey::Path => ":path",
            HeaderKey::Scheme => ":scheme",
            HeaderKey::Name(name) => name.as_str(),
            HeaderKey::Invalid => "(invalid name)",
        };
        named(name, self.value.as_ref())
    }

    /// The value the condition reads, as it reads it (`None`: absent).
    fn actual(&self, request: &RequestInfo<'_>) -> Option<String> {
        match &self.name {
            HeaderKey::Authority => Some(request.authority.to_owned()),
            HeaderKey::Method => Some(request.method.to_string()),
            HeaderKey::Path => Some(request.uri.path().to_owned()),
            HeaderKey::Scheme => Some(scheme(request.uri).to_owned()),
            HeaderKey::Invalid => None,
            HeaderKey::Name(name) => {
                let values: Vec<_> = request
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                (!values.is_empty()).then(|| values.join(","))
            }
        }
    }
}

fn describe(m: &StringMatch) -> String {
    match m {
        StringMatch::Exact(v) => format!("exact {v:?}"),
        StringMatch::Prefix(v) => format!("prefix {v:?}"),
        StringMatch::Regex(p) => format!("regex {:?}", p.as_str()),
    }
}

fn named(name: &str, value: Option<&StringMatch>) -> String {
    match value {
        Some(m) => format!("{name} {}", describe(m)),
        None => format!("{name} present"),
    }
}

fn case(ignore: bool) -> &'static str {
    if ignore {
        " (any case)"
    } else {
        ""
    }
}

fn labels(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One rule of a Service's route table, as `meshctl config dump routes` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub name: String,
    /// Which clients it serves: `every client`, `clients in namespace X`, `not exported to …`.
    pub clients: String,
    pub requires: String,
    pub action: String,
}

impl ServiceRoutes {
    /// Every rule of the Service's tables: the VirtualServices (most specific host first;
    /// a client reads only the one it sees, see [`ServiceRoutes::explain`]), then the consumer
    /// and producer routes of the Gateway API, each table in the order it is tried.
    pub fn entries(&self) -> Vec<RouteEntry> {
        let mut out = Vec::new();
        for candidate in &self.virtual_services {
            let vs = &*candidate.vs;
            let clients = if vs.export_to.is_empty() || vs.export_to.iter().any(|e| &**e == "*") {
                "every client".to_owned()
            } else {
                let to: Vec<_> = vs
                    .export_to
                    .iter()
                    .map(|e| {
                        if &**e == "." {
                            &*vs.key.namespace
                        } else {
                            &**e
                        }
                    })
                    .collect();
                format!("clients in {}", to.join(", "))
            };
            for entry in vs.http.iter() {
                let requires = if entry.matches.is_empty() {
                    "any request".to_owned()
                } else {
                    let each: Vec<_> = entry.matches.iter().map(Conditions::describe).collect();
                    each.join(" | ")
                };
                out.push(RouteEntry {
                    name: entry.rule.name.to_string(),
                    clients: clients.clone(),
                    requires,
                    action: entry.rule.summary(),
                });
            }
            for entry in vs.tcp.iter() {
                let requires = if entry.matches.is_empty() {
                    "any connection".to_owned()
                } else {
                    let each: Vec<_> = entry.matches.iter().map(l4_describe).collect();
                    each.join(" | ")
                };
                out.push(RouteEntry {
                    name: entry.route.name.to_string(),
                    clients: clients.clone(),
                    requires,
                    action: format!("tcp: {}", backends(&entry.route.backends)),
                });
            }
        }
        let mut consumers: Vec<_> = self.consumers.iter().collect();
        consumers.sort_by(|a, b| a.0.cmp(b.0));
        for (namespace, table) in consumers {
            table.entries_into(&format!("clients in {namespace}"), &mut out);
        }
        self.producer.entries_into("every client", &mut out);
        out
    }
}

impl GammaTable {
    fn entries_into(&self, clients: &str, out: &mut Vec<RouteEntry>) {
        for entry in &self.entries {
            let mut requires = entry.conditions.describe();
            if !entry.ports.is_empty() {
                let ports: Vec<_> = entry.ports.iter().map(u16::to_string).collect();
                requires = format!("port {}, {requires}", ports.join(" or "));
            }
            out.push(RouteEntry {
                name: entry.rule.name.to_string(),
                clients: clients.to_owned(),
                requires,
                action: entry.rule.summary(),
            });
        }
    }
}

impl Rule {
    /// What the rule does, in a few words: `route reviews v2 (100%)`, `redirect 301`, …
    pub fn summary(&self) -> String {
        match &self.action {
            RuleAction::Forward(list) => format!("route {}", backends(list)),
            RuleAction::Redirect(r) => {
                let mut to = String::new();
                if let Some(scheme) = &r.scheme {
                    let _ = write!(to, "{scheme}://");
                }
                if let Some(host) = &r.host {
                    to.push_str(host);
                }
                if let Some(PathRewrite::Full(path)) = &r.path {
                    to.push_str(path);
                }
                format!("redirect {} {to}", r.status).trim_end().to_owned()
            }
            RuleAction::Respond { status, .. } => format!("respond {status}"),
        }
    }
}

/// `reviews v1 (75%), reviews v3 (25%)`.
pub fn backends(list: &[Backend]) -> String {
    let total: u64 = list.iter().map(|b| u64::from(b.weight)).sum();
    let each: Vec<_> = list
        .iter()
        .map(|b| {
            let mut s = b.host.to_string();
            if let Some(port) = b.port {
                let _ = write!(s, ":{port}");
            }
            if let Some(subset) = &b.subset {
                let _ = write!(s, " {subset}");
            }
            if total > 0 {
                let _ = write!(s, " ({}%)", share(b.weight, total));
            }
            s
        })
        .collect();
    if each.is_empty() {
        "no backend (503 UH)".to_owned()
    } else {
        each.join(", ")
    }
}

/// `weight` out of `total`, in percent, to one decimal where it is not whole.
pub fn share(weight: u32, total: u64) -> String {
    let percent = f64::from(weight) * 100.0 / total as f64;
    if percent.fract() == 0.0 {
        format!("{percent:.0}")
    } else {
        format!("{percent:.1}")
    }
}

fn l4_describe(m: &L4Match) -> String {
    let mut parts = Vec::new();
    if let Some(port) = m.port {
        parts.push(format!("port {port}"));
    }
    if let Some(ns) = &m.source_namespace {
        parts.push(format!("source namespace {ns}"));
    }
    if !m.source_labels.is_empty() {
        parts.push(format!("source labels {}", labels(&m.source_labels)));
    }
    if !m.destination_subnets.is_empty() {
        parts.push(format!(
            "{} destination subnet(s)",
            m.destination_subnets.len()
        ));
    }
    if parts.is_empty() {
        "any connection".to_owned()
    } else {
        parts.join(", ")
    }
}
