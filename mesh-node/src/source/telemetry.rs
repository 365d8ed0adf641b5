//! Translation of `telemetry.istio.io` `Telemetry` and of MeshConfig's telemetry fields
//! (`extensionProviders`, `defaultProviders`, `defaultConfig.tracing.sampling`), with Istio's
//! validation (`ValidateTelemetry`) and Weft's limits: what Weft cannot honour (a CEL filter,
//! metric overrides, a provider kind it does not export to, `targetRefs`) is rejected with the
//! field that asks for it, never ignored.

use std::sync::Arc;

use super::fields::{metadata, one_of, show, workload_selector, FieldError, Fields};
use crate::{
    model::{
        telemetry::{
            AccessLogging, CustomTag, DefaultProviders, ExtensionProvider, LogFormat, ProviderKind,
            Side, Telemetry, Tracing, DEFAULT_MAX_TAG_LENGTH, ENVOY_PROVIDER,
        },
        ObjectKey,
    },
    telemetry::access_log::{Format, Template},
};

type Result<T> = std::result::Result<T, FieldError>;

/// The keys a mapping may hold; any other is refused, naming it.
fn only(fields: &Fields<'_>, allowed: &[&str], why: &str) -> Result<()> {
    for key in fields.map.keys() {
        let name = key.as_str().unwrap_or_default();
        if !allowed.contains(&name) {
            return Err(fields.error(name, format!("not supported by Weft: {why}")));
        }
    }
    Ok(())
}

pub(super) fn telemetry(fields: &Fields<'_>) -> Result<Telemetry> {
    let meta = metadata(fields, true)?;
    let key = ObjectKey {
        namespace: meta.namespace,
        name: meta.name,
    };
    let Some(spec) = fields.obj("spec")? else {
        return Ok(Telemetry {
            key,
            selector: None,
            tracing: None,
            access_logging: Arc::from([]),
        });
    };
    if spec.has("targetRefs") || spec.has("targetRef") {
        let field = if spec.has("targetRefs") {
            "targetRefs"
        } else {
            "targetRef"
        };
        return Err(spec.error(
            field,
            "not supported by Weft: it has no waypoints or gateways; select the workloads with `selector`",
        ));
    }
    let selector = workload_selector(&spec, "selector")?;
    let traces = spec.list("tracing")?;
    if traces.len() > 1 {
        return Err(spec.error("tracing", "multiple tracing is not currently supported"));
    }
    let tracing = traces.first().map(tracing).transpose()?;
    let access_logging = spec
        .list("accessLogging")?
        .iter()
        .map(access_logging)
        .collect::<Result<Vec<_>>>()?;
    for entry in spec.list("metrics")? {
        metrics(&entry)?;
    }
    Ok(Telemetry {
        key,
        selector,
        tracing,
        access_logging: access_logging.into(),
    })
}

fn side(entry: &Fields<'_>) -> Result<Side> {
    let Some(matched) = entry.obj("match")? else {
        return Ok(Side::default());
    };
    Ok(one_of(
        &matched,
        "mode",
        &[
            ("CLIENT_AND_SERVER", Side::ClientAndServer),
            ("CLIENT", Side::Client),
            ("SERVER", Side::Server),
        ],
    )?
    .unwrap_or_default())
}

/// `providers: [{name: ...}]`; `None` when absent or empty (inherited, as in Istio).
fn providers(entry: &Fields<'_>) -> Result<Option<Arc<[Arc<str>]>>> {
    if !entry.has("providers") {
        return Ok(None);
    }
    let mut names = Vec::new();
    for provider in entry.list("providers")? {
        let name = provider.required_str("name")?;
        if name.is_empty() {
            return Err(provider.error("name", "must not be empty"));
        }
        names.push(Arc::from(name));
    }
    Ok((!names.is_empty()).then(|| names.into()))
}

fn tracing(entry: &Fields<'_>) -> Result<Tracing> {
    only(
        entry,
        &[
            "match",
            "providers",
            "randomSamplingPercentage",
            "disableSpanReporting",
            "customTags",
            "useRequestIdForTraceSampling",
            "enableIstioTags",
        ],
        "a tracing field Weft does not honour",
    )?;
    let providers = providers(entry)?;
    if providers.as_ref().is_some_and(|p| p.len() > 1) {
        return Err(entry.error("providers", "multiple providers is not currently supported"));
    }
    let random_sampling_percentage = match entry.number("randomSamplingPercentage")? {
        Some(p) if !(0.0..=100.0).contains(&p) => {
            return Err(entry.error(
                "randomSamplingPercentage",
                format!("must be in range [0.0, 100.0], found {p}"),
            ))
        }
        p => p,
    };
    // Weft's proxies always tag spans as Istio's do.
    if entry.bool("enableIstioTags")? == Some(false) {
        return Err(entry.error(
            "enableIstioTags",
            "false is not supported by Weft: its spans always carry Istio's attributes",
        ));
    }
    // A sampling decision travels with the trace context between Weft's proxies, so every
    // hop of a trace agrees whatever this says: true (Istio's default) and false are the same.
    entry.bool("useRequestIdForTraceSampling")?;
    let custom_tags = if entry.has("customTags") {
        let mut tags = Vec::new();
        for (name, tag) in entry.obj_map("customTags")? {
            tags.push((Arc::from(name), custom_tag(&tag)?));
        }
        Some(tags.into())
    } else {
        None
    };
    Ok(Tracing {
        side: side(entry)?,
        providers,
        random_sampling_percentage,
        disable_span_reporting: entry.bool("disableSpanReporting")?,
        custom_tags,
    })
}

fn custom_tag(tag: &Fields<'_>) -> Result<CustomTag> {
    let kinds: Vec<&str> = ["literal", "environment", "header"]
        .into_iter()
        .filter(|k| tag.has(k))
        .collect();
    if kinds.len() != 1 {
        return Err(FieldError {
            field: tag.path.clone(),
            reason: "exactly one of literal, environment or header must be set".into(),
        });
    }
    if kinds[0] == "environment" {
        return Err(tag.error(
            "environment",
            "not supported by Weft: one node proxy serves every workload of its node, so its environment is none of theirs (and not a tenant's to read); use literal or header",
        ));
    }
    let value = tag.required_obj(kinds[0])?;
    Ok(match kinds[0] {
        "literal" => CustomTag::Literal(value.required_str("value")?.into()),
        _ => {
            let name = value.required_str("name")?;
            if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err() {
                return Err(value.error("name", format!("{name:?} is not a header name")));
            }
            CustomTag::Header {
                name: name.to_ascii_lowercase().into(),
                default: value.str("defaultValue")?.map(Arc::from),
            }
        }
    })
}

fn access_logging(entry: &Fields<'_>) -> Result<AccessLogging> {
    if entry.has("filter") {
        return Err(entry.error(
            "filter",
            "not supported by Weft: it does not evaluate CEL expressions; the entry is refused rather than logging what the filter would drop",
        ));
    }
    only(
        entry,
        &["match", "providers", "disabled"],
        "an access logging field Weft does not honour",
    )?;
    Ok(AccessLogging {
        side: side(entry)?,
        providers: providers(entry)?,
        disabled: entry.bool("disabled")?,
    })
}

/// Only the metrics every node proxy serves: Prometheus, without overrides.
fn metrics(entry: &Fields<'_>) -> Result<()> {
    only(
        entry,
        &["providers"],
        "Weft's metrics are Istio's standard ones, without overrides or a reporting interval",
    )?;
    for (i, provider) in entry.list("providers")?.into_iter().enumerate() {
        let name = provider.required_str("name")?;
        if name != "prometheus" {
            return Err(entry.error(
                &format!("providers[{i}].name"),
                format!("{name:?}: Weft's metrics are served to Prometheus only"),
            ));
        }
    }
    Ok(())
}

/// MeshConfig's `extensionProviders`: kinds Weft serves are read strictly; others are kept
/// as unsupported, so that only a Telemetry that uses one is refused.
pub(super) fn extension_providers(mesh: &Fields<'_>) -> Result<Vec<ExtensionProvider>> {
    let mut providers: Vec<ExtensionProvider> = Vec::new();
    for entry in mesh.list("extensionProviders")? {
        let name = entry.required_str("name")?;
        if name.is_empty() {
            return Err(entry.error("name", "must not be empty"));
        }
        if providers.iter().any(|p| &*p.name == name) {
            return Err(entry.error("name", format!("duplicate provider name {name:?}")));
        }
        let kinds: Vec<&str> = entry
            .map
            .keys()
            .filter_map(|k| k.as_str())
            .filter(|k| *k != "name")
            .collect();
        let [kind] = kinds.as_slice() else {
            return Err(FieldError {
                field: entry.path.clone(),
                reason: format!("exactly one provider kind must be set, found {kinds:?}"),
            });
        };
        let kind = match *kind {
            "prometheus" => ProviderKind::Prometheus,
            "opentelemetry" | "envoyOtelAls" | "envoyFileAccessLog" => {
                let settings = entry.required_obj(kind)?;
                provider(kind, &settings)?
            }
            other => ProviderKind::Unsupported(other.into()),
        };
        providers.push(ExtensionProvider {
            name: name.into(),
            kind,
        });
    }
    Ok(providers)
}

/// The settings of a provider kind Weft serves.
fn provider(kind: &str, settings: &Fields<'_>) -> Result<ProviderKind> {
    Ok(match kind {
        "opentelemetry" => {
            only(
                settings,
                &["service", "port", "maxTagLength"],
                "Weft exports spans over OTLP/gRPC to service:port",
            )?;
            let (service, port) = endpoint(settings)?;
            let max_tag_length = match settings.number("maxTagLength")? {
                None => DEFAULT_MAX_TAG_LENGTH,
                Some(n) if (1.0..=65_536.0).contains(&n) && n.fract() == 0.0 => n as usize,
                Some(n) => {
                    return Err(settings.error(
                        "maxTagLength",
                        format!("{n}: must be a whole number from 1 to 65536"),
                    ))
                }
            };
            ProviderKind::OpenTelemetry {
                service,
                port,
                max_tag_length,
            }
        }
        "envoyOtelAls" => {
            only(
                settings,
                &["service", "port", "logFormat"],
                "Weft exports access logs over OTLP/gRPC to service:port",
            )?;
            let (service, port) = endpoint(settings)?;
            ProviderKind::OtelAccessLog {
                service,
                port,
                format: log_format(settings)?,
            }
        }
        "envoyFileAccessLog" => {
            only(
                settings,
                &["path", "logFormat"],
                "an access log file takes a path and a format",
            )?;
            let stderr = match settings.required_str("path")? {
                "/dev/stdout" => false,
                "/dev/stderr" => true,
                other => {
                    return Err(settings.error(
                        "path",
                        format!("{other:?}: a node proxy writes access logs to its own output only: /dev/stdout or /dev/stderr"),
                    ))
                }
            };
            ProviderKind::FileAccessLog {
                stderr,
                format: log_format(settings)?,
            }
        }
        _ => unreachable!("called for the kinds above"),
    })
}

fn endpoint(settings: &Fields<'_>) -> Result<(Arc<str>, u16)> {
    let service = settings.required_str("service")?;
    if service.is_empty() {
        return Err(settings.error("service", "must not be empty"));
    }
    let port = settings
        .port("port")?
        .ok_or_else(|| settings.error("port", "required"))?;
    Ok((service.into(), port))
}

/// `logFormat`: Envoy's format string (`text`), or JSON fields (`labels`); unset: Istio's
/// default text format. Compiled here, so a command Weft cannot fill in is refused.
fn log_format(settings: &Fields<'_>) -> Result<LogFormat> {
    let Some(format) = settings.obj("logFormat")? else {
        return Ok(Arc::new(Format::istio_text()));
    };
    only(
        &format,
        &["text", "labels"],
        "a log format is text or labels",
    )?;
    match (format.str("text")?, format.has("labels")) {
        (Some(_), true) => Err(format.error("labels", "only one of text or labels may be set")),
        (Some(text), false) => Template::compile(text)
            .map(|t| Arc::new(Format::Text(t)))
            .map_err(|e| format.error("text", e)),
        (None, true) => {
            let labels = format.obj("labels")?.expect("has labels");
            let mut fields = Vec::new();
            for (key, text) in format.str_map("labels")? {
                let template = Template::compile(text).map_err(|e| labels.error(key, e))?;
                fields.push((Arc::from(key), template));
            }
            Ok(Arc::new(Format::Json(fields.into())))
        }
        (None, false) => Ok(Arc::new(Format::istio_text())),
    }
}

/// MeshConfig's classic switch, `accessLogFile` (with `accessLogFormat` and
/// `accessLogEncoding`): when set, the built-in `envoy` provider writes there, and every
/// workload logs unless a Telemetry turns it off, as in Istio.
pub(super) fn access_log_file(mesh: &Fields<'_>) -> Result<Option<ExtensionProvider>> {
    let Some(path) = mesh.str("accessLogFile")?.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let stderr = match path {
        "/dev/stdout" => false,
        "/dev/stderr" => true,
        other => {
            return Err(mesh.error(
                "accessLogFile",
                format!("{other:?}: a node proxy writes access logs to its own output only: /dev/stdout or /dev/stderr"),
            ))
        }
    };
    let json = match mesh.str("accessLogEncoding")? {
        None | Some("TEXT") => false,
        Some("JSON") => true,
        Some(other) => {
            return Err(mesh.error(
                "accessLogEncoding",
                format!("{other:?}: must be TEXT or JSON"),
            ))
        }
    };
    let format = match (mesh.str("accessLogFormat")?.filter(|f| !f.is_empty()), json) {
        (None, false) => Format::istio_text(),
        (None, true) => Format::istio_json(),
        (Some(text), false) => {
            Format::Text(Template::compile(text).map_err(|e| mesh.error("accessLogFormat", e))?)
        }
        // Istio reads a JSON format as a JSON object of fields.
        (Some(text), true) => {
            let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| mesh.error("accessLogFormat", format!("not a JSON object: {e}")))?;
            let mut fields = Vec::new();
            for (key, value) in object {
                let serde_json::Value::String(text) = value else {
                    return Err(mesh.error(
                        "accessLogFormat",
                        format!("field {key:?}: each value must be a format string"),
                    ));
                };
                let template = Template::compile(&text)
                    .map_err(|e| mesh.error("accessLogFormat", format!("field {key:?}: {e}")))?;
                fields.push((Arc::from(key.as_str()), template));
            }
            Format::Json(fields.into())
        }
    };
    Ok(Some(ExtensionProvider {
        name: ENVOY_PROVIDER.into(),
        kind: ProviderKind::FileAccessLog {
            stderr,
            format: Arc::new(format),
        },
    }))
}

/// MeshConfig's `defaultProviders` (tracing and access logging; metrics are Prometheus's).
pub(super) fn default_providers(mesh: &Fields<'_>) -> Result<DefaultProviders> {
    let Some(defaults) = mesh.obj("defaultProviders")? else {
        return Ok(DefaultProviders::default());
    };
    let names = |key: &str| -> Result<Arc<[Arc<str>]>> {
        Ok(defaults
            .str_list(key)?
            .into_iter()
            .map(|(_, n)| Arc::from(n))
            .collect())
    };
    Ok(DefaultProviders {
        tracing: names("tracing")?,
        access_logging: names("accessLogging")?,
    })
}

/// `defaultConfig.tracing.sampling`, percent.
pub(super) fn default_sampling(mesh: &Fields<'_>) -> Result<Option<f64>> {
    let Some(config) = mesh.obj("defaultConfig")? else {
        return Ok(None);
    };
    let Some(tracing) = config.obj("tracing")? else {
        return Ok(None);
    };
    match tracing.number("sampling")? {
        Some(p) if !(0.0..=100.0).contains(&p) => Err(tracing.error(
            "sampling",
            format!(
                "must be in range [0.0, 100.0], found {}",
                show(&super::yaml::Value::from(p))
            ),
        )),
        // Istio reads 0 as unset (its default, 1 %).
        Some(0.0) => Ok(None),
        p => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::objects::{translate, Invalid, Object};

    fn one(yaml: &str) -> std::result::Result<Object, Box<Invalid>> {
        let value = crate::source::yaml::parse(yaml).unwrap();
        let mut out = translate(&value);
        assert_eq!(out.len(), 1, "{out:?}");
        out.remove(0).map_err(Box::new)
    }

    fn telemetry(spec: &str) -> std::result::Result<Arc<Telemetry>, Box<Invalid>> {
        let yaml = format!(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t, namespace: bookinfo}}\nspec:\n{spec}"
        );
        one(&yaml).map(|o| match o {
            Object::Telemetry(t) => t,
            other => panic!("expected a Telemetry, got {other:?}"),
        })
    }

    #[test]
    fn istio_telemetry_examples_are_read() {
        // From Istio's Telemetry API documentation.
        let t = telemetry(
            "  selector:\n    matchLabels: {app: reviews}\n  tracing:\n  - match: {mode: SERVER}\n    providers: [{name: otel}]\n    randomSamplingPercentage: 10.5\n    disableSpanReporting: false\n    customTags:\n      env: {header: {name: x-env, defaultValue: none}}\n      user: {header: {name: end-user}}\n      team: {literal: {value: books}}\n  accessLogging:\n  - providers: [{name: envoy}]\n    disabled: true\n  metrics:\n  - providers: [{name: prometheus}]\n",
        )
        .unwrap();
        assert_eq!(t.selector.as_ref().unwrap()["app"], "reviews");
        let tracing = t.tracing.as_ref().unwrap();
        // Istio's empty provider list inherits.
        let inherit = telemetry("  tracing:\n  - providers: []\n").unwrap();
        assert_eq!(inherit.tracing.as_ref().unwrap().providers, None);
        assert_eq!(tracing.side, Side::Server);
        assert_eq!(tracing.random_sampling_percentage, Some(10.5));
        assert_eq!(&*tracing.providers.as_ref().unwrap()[0], "otel");
        let tags = tracing.custom_tags.as_ref().unwrap();
        assert_eq!(tags.len(), 3);
        assert!(tags
            .iter()
            .any(|(n, t)| &**n == "team" && *t == CustomTag::Literal("books".into())));
        assert_eq!(t.access_logging[0].disabled, Some(true));
        // An empty spec is a Telemetry that changes nothing.
        assert_eq!(telemetry("  {}\n").unwrap().tracing, None);
    }

    #[test]
    fn what_weft_cannot_honour_is_refused_by_field() {
        for (spec, field, reason) in [
            (
                "  tracing:\n  - randomSamplingPercentage: 101\n",
                "spec.tracing[0].randomSamplingPercentage",
                "range",
            ),
            (
                "  tracing:\n  - providers: [{name: a}, {name: b}]\n",
                "spec.tracing[0].providers",
                "multiple",
            ),
            ("  tracing:\n  - {}\n  - {}\n", "spec.tracing", "multiple"),
            (
                "  tracing:\n  - match: {mode: SIDEWAYS}\n",
                "spec.tracing[0].match.mode",
                "SIDEWAYS",
            ),
            (
                "  tracing:\n  - customTags: {a: {literal: {value: x}, header: {name: y}}}\n",
                "spec.tracing[0].customTags.a",
                "exactly one",
            ),
            (
                "  tracing:\n  - customTags: {node: {environment: {name: NODE_NAME}}}\n",
                "spec.tracing[0].customTags.node.environment",
                "not supported",
            ),
            (
                "  tracing:\n  - enableIstioTags: false\n",
                "spec.tracing[0].enableIstioTags",
                "not supported",
            ),
            (
                "  accessLogging:\n  - filter: {expression: 'response.code >= 400'}\n",
                "spec.accessLogging[0].filter",
                "CEL",
            ),
            (
                "  metrics:\n  - overrides: [{tagOverrides: {}}]\n",
                "spec.metrics[0]",
                "overrides",
            ),
            (
                "  targetRefs: [{kind: Gateway, name: gw}]\n",
                "spec.targetRefs",
                "waypoints",
            ),
        ] {
            let err = telemetry(spec).expect_err(spec);
            assert!(
                err.field.starts_with(field) && err.reason.contains(reason),
                "{spec}: {} — {}",
                err.field,
                err.reason
            );
            assert_eq!(err.id.unwrap().to_string(), "Telemetry bookinfo/t");
        }
    }

    #[test]
    fn mesh_config_providers_and_defaults_are_read_strictly() {
        let mesh = |text: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n{}",
                text.lines().map(|l| format!("    {l}\n")).collect::<String>()
            );
            one(&yaml).map(|o| match o {
                Object::MeshConfig(m) => m,
                other => panic!("{other:?}"),
            })
        };
        let m = mesh(
            "extensionProviders:\n- name: otel\n  opentelemetry: {service: otel.obs.svc.cluster.local, port: 4317}\n- name: zipkin\n  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}\ndefaultProviders:\n  tracing: [otel]\ndefaultConfig:\n  tracing: {sampling: 25}\n",
        )
        .unwrap();
        assert_eq!(m.extension_providers.len(), 2);
        assert_eq!(
            m.extension_providers[0].kind,
            ProviderKind::OpenTelemetry {
                service: "otel.obs.svc.cluster.local".into(),
                port: 4317,
                max_tag_length: 256,
            }
        );
        assert_eq!(m.extension_providers[1].kind.name(), "zipkin");
        assert_eq!(&*m.default_providers.tracing[0], "otel");
        assert_eq!(m.default_sampling, Some(25.0));
        for (text, field) in [
            (
                "extensionProviders:\n- name: otel\n  opentelemetry: {service: x, port: 4317, http: {path: /v1/traces}}\n",
                "data.mesh.extensionProviders[0].opentelemetry.http",
            ),
            (
                "extensionProviders:\n- name: otel\n  opentelemetry: {port: 4317}\n",
                "data.mesh.extensionProviders[0].opentelemetry.service",
            ),
            (
                "extensionProviders:\n- name: a\n  prometheus: {}\n- name: a\n  prometheus: {}\n",
                "data.mesh.extensionProviders[1].name",
            ),
            (
                "defaultConfig:\n  tracing: {sampling: 300}\n",
                "data.mesh.defaultConfig.tracing.sampling",
            ),
        ] {
            let err = mesh(text).expect_err(text);
            assert_eq!(err.field, field, "{text}: {}", err.reason);
        }
    }
}
