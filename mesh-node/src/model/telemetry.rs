//! Istio's Telemetry API (`telemetry.istio.io/v1` `Telemetry`) and MeshConfig's extension
//! providers: whether a workload's requests make spans and access log lines, how many, and
//! where they are sent.
//!
//! Istio's precedence: a Telemetry of the root namespace without selector configures the
//! mesh, one of a namespace without selector that namespace, one with a selector the pods it
//! selects; a narrower one overrides what it sets and inherits the rest (providers, sampling
//! percentage, span reporting, custom tags). Where several apply at one level the first by
//! name wins (Istio takes the oldest, which the model does not record). Without any, tracing
//! uses MeshConfig's `defaultProviders.tracing` at `defaultConfig.tracing.sampling` percent (1 %
//! unless set), and access logs MeshConfig's `defaultProviders.accessLogging` (none: off).

use std::sync::Arc;

use super::{Labels, ObjectKey};

/// A provider of MeshConfig's `extensionProviders`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtensionProvider {
    pub name: Arc<str>,
    pub kind: ProviderKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ProviderKind {
    /// `opentelemetry`: spans over OTLP/gRPC to `service:port`, attribute values cut to
    /// `max_tag_length` characters.
    OpenTelemetry {
        service: Arc<str>,
        port: u16,
        max_tag_length: usize,
    },
    /// `envoyOtelAls`: access log records over OTLP/gRPC to `service:port`.
    OtelAccessLog {
        service: Arc<str>,
        port: u16,
        format: LogFormat,
    },
    /// `envoyFileAccessLog`: access log lines on the proxy's output (`/dev/stdout` or
    /// `/dev/stderr`).
    FileAccessLog { stderr: bool, format: LogFormat },
    /// `prometheus`: the metrics every node proxy serves anyway.
    Prometheus,
    /// A kind Weft does not serve (`zipkin`, `datadog`, `envoyExtAuthzHttp`...): a Telemetry
    /// that names it is rejected, since it could not be honoured.
    Unsupported(Arc<str>),
}

impl ProviderKind {
    /// The kind as MeshConfig names it.
    pub fn name(&self) -> &str {
        match self {
            ProviderKind::OpenTelemetry { .. } => "opentelemetry",
            ProviderKind::OtelAccessLog { .. } => "envoyOtelAls",
            ProviderKind::FileAccessLog { .. } => "envoyFileAccessLog",
            ProviderKind::Prometheus => "prometheus",
            ProviderKind::Unsupported(kind) => kind,
        }
    }
}

/// How access log lines are written: a compiled Envoy format (text, or JSON labels).
pub type LogFormat = Arc<crate::telemetry::access_log::Format>;

/// The access log provider Istio's MeshConfig defines by default: lines of Istio's default
/// text format on the proxy's output (`meshConfig.accessLogFile` and its format and encoding
/// change it).
pub const ENVOY_PROVIDER: &str = "envoy";

/// MeshConfig's `defaultProviders`, by signal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DefaultProviders {
    pub tracing: Arc<[Arc<str>]>,
    pub access_logging: Arc<[Arc<str>]>,
}

/// Which side of a request a tracing or access logging entry applies to (`match.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Side {
    #[default]
    ClientAndServer,
    /// The source proxy's span or line.
    Client,
    /// The destination proxy's.
    Server,
}

impl Side {
    pub fn covers(self, client: bool) -> bool {
        match self {
            Side::ClientAndServer => true,
            Side::Client => client,
            Side::Server => !client,
        }
    }
}

/// A `telemetry.istio.io` Telemetry.
#[derive(Clone, Debug, PartialEq)]
pub struct Telemetry {
    pub key: ObjectKey,
    /// `None`: the namespace (or, in the root namespace, the mesh).
    pub selector: Option<Labels>,
    pub tracing: Option<Tracing>,
    pub access_logging: Arc<[AccessLogging]>,
}

/// A `tracing` entry: each field `None` where it inherits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tracing {
    pub side: Side,
    pub providers: Option<Arc<[Arc<str>]>>,
    /// 0.0 to 100.0.
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: Option<CustomTags>,
}

/// A span attribute a Telemetry adds.
#[derive(Clone, Debug, PartialEq)]
pub enum CustomTag {
    Literal(Arc<str>),
    /// A request header, or `default`.
    Header {
        name: Arc<str>,
        default: Option<Arc<str>>,
    },
}

/// An `accessLogging` entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AccessLogging {
    pub side: Side,
    pub providers: Option<Arc<[Arc<str>]>>,
    pub disabled: Option<bool>,
}

/// Tracing as it applies to one workload and side.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveTracing {
    pub providers: Vec<ExtensionProvider>,
    /// 0.0 to 1.0.
    pub sampling: f64,
    pub custom_tags: CustomTags,
}

/// Envoy's (and Istio's) default `maxTagLength`: span attribute values are cut to it.
pub const DEFAULT_MAX_TAG_LENGTH: usize = 256;

/// Istio's default sampling when neither MeshConfig nor a Telemetry sets one: 1 %.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

/// The Telemetries that apply to a pod of `namespace` with `labels`, widest first: the
/// mesh's, the namespace's, the workload's.
pub fn applicable<'a>(
    telemetries: impl Iterator<Item = &'a Telemetry> + Clone,
    root_namespace: &str,
    namespace: &str,
    labels: &Labels,
) -> Vec<&'a Telemetry> {
    let first = |f: &dyn Fn(&Telemetry) -> bool| telemetries.clone().find(|t| f(t));
    let selects = |t: &Telemetry| {
        t.selector
            .as_ref()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let unselected = |t: &Telemetry| t.selector.as_ref().is_none_or(|s| s.is_empty());
    [
        first(&|t| *t.key.namespace == *root_namespace && unselected(t)),
        first(&|t| {
            *t.key.namespace == *namespace && *namespace != *root_namespace && unselected(t)
        }),
        first(&|t| *t.key.namespace == *namespace && selects(t)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Span attributes a Telemetry adds, by name.
pub type CustomTags = Arc<[(Arc<str>, CustomTag)]>;

/// Tracing for one side (`client`: the source proxy's span) of a workload's requests, from
/// the applicable Telemetries (widest first) over MeshConfig's defaults. `Ok(None)`: no span;
/// `Err`: the providers chosen cannot be served (not in MeshConfig, or of a kind Weft does not
/// export spans to), said with the Telemetry that chose them.
pub fn tracing(
    applicable: &[&Telemetry],
    providers: &[ExtensionProvider],
    defaults: &DefaultProviders,
    mesh_sampling_percent: Option<f64>,
    client: bool,
) -> Result<Option<EffectiveTracing>, String> {
    let mut names = defaults.tracing.clone();
    let mut chosen_by = "MeshConfig defaultProviders.tracing".to_owned();
    let mut percent = mesh_sampling_percent.unwrap_or(DEFAULT_SAMPLING_PERCENT);
    let mut report = true;
    let mut tags: CustomTags = Arc::from([]);
    for telemetry in applicable {
        let Some(t) = telemetry.tracing.as_ref().filter(|t| t.side.covers(client)) else {
            continue;
        };
        if let Some(p) = &t.providers {
            names = p.clone();
            chosen_by = format!("Telemetry {}", telemetry.key);
        }
        if let Some(p) = t.random_sampling_percentage {
            percent = p;
        }
        if let Some(d) = t.disable_span_reporting {
            report = !d;
        }
        if let Some(c) = &t.custom_tags {
            tags = c.clone();
        }
    }
    let mut chosen = Vec::new();
    for name in names.iter() {
        match providers.iter().find(|p| p.name == *name) {
            Some(p) if matches!(p.kind, ProviderKind::OpenTelemetry { .. }) => chosen.push(p.clone()),
            Some(p) => {
                return Err(format!(
                    "{chosen_by}: tracing provider {name:?} is of a kind Weft does not send spans to ({}); only opentelemetry is",
                    p.kind.name()
                ))
            }
            None => {
                return Err(format!(
                    "{chosen_by}: tracing provider {name:?} is not in MeshConfig's extensionProviders"
                ))
            }
        }
    }
    // Istio turns the side's tracing off: no span, no header written.
    if !report {
        return Ok(None);
    }
    Ok((!chosen.is_empty()).then(|| EffectiveTracing {
        providers: chosen,
        sampling: (percent / 100.0).clamp(0.0, 1.0),
        custom_tags: tags,
    }))
}

/// The access log providers of one side of a workload's requests (`client`: the source
/// proxy's line), from the applicable Telemetries (widest first) over MeshConfig's defaults;
/// empty: no line. `Err`: some providers chosen cannot be served (said with who chose them);
/// the others still write.
pub fn access_logging(
    applicable: &[&Telemetry],
    providers: &[ExtensionProvider],
    defaults: &DefaultProviders,
    client: bool,
) -> Result<Vec<ExtensionProvider>, Skipped> {
    let mut names = defaults.access_logging.clone();
    let mut chosen_by = "MeshConfig defaultProviders.accessLogging".to_owned();
    let mut disabled = false;
    for telemetry in applicable {
        for entry in telemetry
            .access_logging
            .iter()
            .filter(|a| a.side.covers(client))
        {
            // Providers named by a narrower entry write unless it turns them off itself.
            if let Some(p) = &entry.providers {
                names = p.clone();
                chosen_by = format!("Telemetry {}", telemetry.key);
                disabled = false;
            }
            if let Some(d) = entry.disabled {
                disabled = d;
            }
        }
    }
    if disabled {
        return Ok(Vec::new());
    }
    // As Istio: a provider that cannot be served is skipped (and said), the others write.
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    for name in names.iter() {
        let provider = providers
            .iter()
            .find(|p| p.name == *name)
            .cloned()
            .or_else(|| (**name == *ENVOY_PROVIDER).then(envoy_provider));
        match provider {
            Some(p)
                if matches!(
                    p.kind,
                    ProviderKind::OtelAccessLog { .. } | ProviderKind::FileAccessLog { .. }
                ) =>
            {
                chosen.push(p)
            }
            Some(p) => skipped.push(format!(
                "access log provider {name:?} is of a kind Weft does not write access logs to ({}); envoyFileAccessLog and envoyOtelAls are",
                p.kind.name()
            )),
            None => skipped.push(format!(
                "access log provider {name:?} is not in MeshConfig's extensionProviders"
            )),
        }
    }
    if !skipped.is_empty() {
        return Err((chosen, format!("{chosen_by}: {}", skipped.join("; "))));
    }
    Ok(chosen)
}

/// The providers that can be served, and why the others cannot.
pub type Skipped = (Vec<ExtensionProvider>, String);

/// Istio's built-in `envoy` provider: Istio's default text format on the proxy's output.
pub fn envoy_provider() -> ExtensionProvider {
    ExtensionProvider {
        name: ENVOY_PROVIDER.into(),
        kind: ProviderKind::FileAccessLog {
            stderr: false,
            format: Arc::new(crate::telemetry::access_log::Format::istio_text()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn otel(name: &str) -> ExtensionProvider {
        ExtensionProvider {
            name: name.into(),
            kind: ProviderKind::OpenTelemetry {
                service: "otel-collector.observability.svc.cluster.local".into(),
                port: 4317,
                max_tag_length: DEFAULT_MAX_TAG_LENGTH,
            },
        }
    }

    fn telemetry(
        ns: &str,
        name: &str,
        selector: Option<&[(&str, &str)]>,
        tracing: Tracing,
    ) -> Telemetry {
        Telemetry {
            key: ObjectKey::new(ns, name),
            selector: selector.map(|s| {
                s.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            tracing: Some(tracing),
            access_logging: Arc::from([]),
        }
    }

    #[test]
    fn narrower_telemetries_override_what_they_set() {
        let providers = [otel("otel"), otel("other")];
        let mesh = telemetry(
            "istio-system",
            "mesh-default",
            None,
            Tracing {
                providers: Some(Arc::from([Arc::from("otel")])),
                random_sampling_percentage: Some(10.0),
                ..Tracing::default()
            },
        );
        let namespace = telemetry(
            "bookinfo",
            "ns",
            None,
            Tracing {
                random_sampling_percentage: Some(100.0),
                ..Tracing::default()
            },
        );
        let workload = telemetry(
            "bookinfo",
            "reviews",
            Some(&[("app", "reviews")]),
            Tracing {
                side: Side::Server,
                providers: Some(Arc::from([Arc::from("other")])),
                ..Tracing::default()
            },
        );
        let all = [mesh, namespace, workload];
        let labels: Labels = [("app".to_string(), "reviews".to_string())].into();
        let applied = applicable(all.iter(), "istio-system", "bookinfo", &labels);
        assert_eq!(applied.len(), 3);
        let defaults = DefaultProviders::default();
        let server = tracing(&applied, &providers, &defaults, None, false)
            .unwrap()
            .unwrap();
        assert_eq!(&*server.providers[0].name, "other");
        assert_eq!(server.sampling, 1.0, "the namespace's 100 %");
        let client = tracing(&applied, &providers, &defaults, None, true)
            .unwrap()
            .unwrap();
        assert_eq!(
            &*client.providers[0].name, "otel",
            "the workload entry is SERVER only"
        );
        // Another workload of the namespace: the mesh's provider at the namespace's rate.
        let other: Labels = [("app".to_string(), "ratings".to_string())].into();
        let applied = applicable(all.iter(), "istio-system", "bookinfo", &other);
        assert_eq!(applied.len(), 2);
        // No Telemetry, no default provider: no span.
        assert_eq!(tracing(&[], &providers, &defaults, None, true), Ok(None));
        let defaults = DefaultProviders {
            tracing: Arc::from([Arc::from("otel")]),
            ..DefaultProviders::default()
        };
        let mesh_default = tracing(&[], &providers, &defaults, None, true)
            .unwrap()
            .unwrap();
        assert_eq!(mesh_default.sampling, 0.01, "Istio's 1 %");
    }

    #[test]
    fn access_logs_follow_the_narrowest_entry_and_skip_what_cannot_be_served() {
        let als = ExtensionProvider {
            name: "als".into(),
            kind: ProviderKind::OtelAccessLog {
                service: "otel.observability".into(),
                port: 4317,
                format: Arc::new(crate::telemetry::access_log::Format::istio_text()),
            },
        };
        let logging = |ns: &str, name: &str, selector: bool, entry: AccessLogging| Telemetry {
            key: ObjectKey::new(ns, name),
            selector: selector.then(|| [("app".to_string(), "reviews".to_string())].into()),
            tracing: None,
            access_logging: Arc::from([entry]),
        };
        let names = |found: &[ExtensionProvider]| -> Vec<String> {
            found.iter().map(|p| p.name.to_string()).collect()
        };
        let namespace_off = logging(
            "bookinfo",
            "off",
            false,
            AccessLogging {
                disabled: Some(true),
                ..AccessLogging::default()
            },
        );
        let workload_on = logging(
            "bookinfo",
            "reviews",
            true,
            AccessLogging {
                providers: Some(Arc::from([Arc::from("als")])),
                ..AccessLogging::default()
            },
        );
        let defaults = DefaultProviders {
            access_logging: Arc::from([Arc::from("envoy")]),
            ..DefaultProviders::default()
        };
        let providers = [als];
        // The namespace turns the default off; the workload's own providers write.
        let applied = [&namespace_off, &workload_on];
        let found = access_logging(&applied, &providers, &defaults, false).unwrap();
        assert_eq!(names(&found), ["als"]);
        assert_eq!(
            access_logging(&[&namespace_off], &providers, &defaults, false),
            Ok(vec![])
        );
        // No Telemetry: MeshConfig's default, Istio's built-in `envoy`.
        let found = access_logging(&[], &providers, &defaults, true).unwrap();
        assert_eq!(names(&found), ["envoy"]);
        // A provider that cannot be served is skipped and said; the others write.
        let some_unknown = logging(
            "bookinfo",
            "two",
            false,
            AccessLogging {
                providers: Some(Arc::from([Arc::from("nope"), Arc::from("als")])),
                ..AccessLogging::default()
            },
        );
        let (found, reason) =
            access_logging(&[&some_unknown], &providers, &defaults, true).unwrap_err();
        assert_eq!(names(&found), ["als"]);
        assert!(
            reason.contains("\"nope\"") && reason.contains("Telemetry bookinfo/two"),
            "{reason}"
        );
    }
}
