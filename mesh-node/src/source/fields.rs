//! The field reader every translation stands on: each accessor knows the path of the field it
//! reads, so a rejection can say exactly what to fix (`spec.ports[1].targetPort: expected a
//! port number (1-65535) or a port name`), and the readers of values several translations share
//! (metadata, workload selectors, IP blocks, checked strings). It imports nothing of `source/`
//! but the value checks of [`validate`](super::validate).

use std::{net::Ipv4Addr, sync::Arc};

use super::yaml::{Mapping, Value};

use super::validate;
use crate::model::{traffic::IpBlock, Labels, Protocol};

/// A field that failed validation: its full path and what is wrong with it.
#[derive(Debug)]
pub(super) struct FieldError {
    pub(super) field: String,
    pub(super) reason: String,
}

/// A mapping together with its path from the document root.
pub(super) struct Fields<'a> {
    pub(super) map: &'a Mapping,
    pub(super) value: &'a Value,
    pub(super) path: String,
}

impl<'a> Fields<'a> {
    pub(super) fn root(value: &'a Value, prefix: &str) -> Result<Self, FieldError> {
        let path = prefix.trim_end_matches('.').to_owned();
        match value {
            Value::Mapping(map) => Ok(Self { map, value, path }),
            other => Err(FieldError {
                field: if path.is_empty() {
                    "(document)".into()
                } else {
                    path
                },
                reason: format!("expected a mapping, found {}", show(other)),
            }),
        }
    }

    pub(super) fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(super) fn error(&self, key: &str, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: self.path(key),
            reason: reason.into(),
        }
    }

    /// `null` counts as absent, as in the Kubernetes API.
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn str(&self, key: &str) -> Result<Option<&'a str>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(self.error(key, format!("expected a string, found {}", show(other))))
            }
        }
    }

    pub(super) fn required_str(&self, key: &str) -> Result<&'a str, FieldError> {
        self.str(key)?.ok_or_else(|| self.error(key, "required"))
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(
                key,
                format!("expected true or false, found {}", show(other)),
            )),
        }
    }

    pub(super) fn obj(&self, key: &str) -> Result<Option<Fields<'a>>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(value @ Value::Mapping(map)) => Ok(Some(Fields {
                map,
                value,
                path: self.path(key),
            })),
            Some(other) => {
                Err(self.error(key, format!("expected a mapping, found {}", show(other))))
            }
        }
    }

    pub(super) fn required_obj(&self, key: &str) -> Result<Fields<'a>, FieldError> {
        self.obj(key)?.ok_or_else(|| self.error(key, "required"))
    }

    pub(super) fn seq(&self, key: &str) -> Result<&'a [Value], FieldError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Sequence(items)) => Ok(items),
            Some(other) => Err(self.error(key, format!("expected a list, found {}", show(other)))),
        }
    }

    /// A list of mappings.
    pub(super) fn list(&self, key: &str) -> Result<Vec<Fields<'a>>, FieldError> {
        self.seq(key)?
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let path = self.path(&format!("{key}[{i}]"));
                match item {
                    Value::Mapping(map) => Ok(Fields {
                        map,
                        value: item,
                        path,
                    }),
                    other => Err(FieldError {
                        field: path,
                        reason: format!("expected a mapping, found {}", show(other)),
                    }),
                }
            })
            .collect()
    }

    /// A list of strings, each with its path.
    pub(super) fn str_list(&self, key: &str) -> Result<Vec<(String, &'a str)>, FieldError> {
        self.seq(key)?
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let path = self.path(&format!("{key}[{i}]"));
                match item {
                    Value::String(s) => Ok((path, s.as_str())),
                    other => Err(FieldError {
                        field: path,
                        reason: format!("expected a string, found {}", show(other)),
                    }),
                }
            })
            .collect()
    }

    pub(super) fn port(&self, key: &str) -> Result<Option<u16>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                .map(Some)
                .ok_or_else(|| {
                    self.error(
                        key,
                        format!("expected a port number (1-65535), found {}", show(value)),
                    )
                }),
        }
    }

    pub(super) fn required_port(&self, key: &str) -> Result<u16, FieldError> {
        self.port(key)?.ok_or_else(|| self.error(key, "required"))
    }

    pub(super) fn ipv4(&self, key: &str) -> Result<Option<Ipv4Addr>, FieldError> {
        match self.str(key)? {
            None | Some("") => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| {
                self.error(
                    key,
                    format!("expected an IPv4 address, found {s:?} (only IPv4 is supported)"),
                )
            }),
        }
    }

    pub(super) fn protocol(&self, key: &str) -> Result<Protocol, FieldError> {
        match self.str(key)? {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => {
                Err(self.error(key, format!("expected TCP, UDP or SCTP, found {other:?}")))
            }
        }
    }

    /// A map of string keys to string values (labels, annotations, selectors).
    pub(super) fn labels(&self, key: &str) -> Result<Labels, FieldError> {
        let Some(value) = self.get(key) else {
            return Ok(Labels::new());
        };
        let Value::Mapping(map) = value else {
            return Err(self.error(key, format!("expected a mapping, found {}", show(value))));
        };
        let mut labels = Labels::new();
        for (k, v) in map {
            let Value::String(k) = k else {
                return Err(self.error(key, format!("keys must be strings, found {}", show(k))));
            };
            match v {
                Value::String(v) => {
                    labels.insert(k.clone(), v.clone());
                }
                // Kubernetes stores an empty value for `key:` with nothing after it.
                Value::Null => {
                    labels.insert(k.clone(), String::new());
                }
                other => {
                    return Err(self.error(
                        &format!("{key}.{k}"),
                        format!("values must be strings (quote it), found {}", show(other)),
                    ))
                }
            }
        }
        Ok(labels)
    }

    /// Whether the key is present (and not null).
    pub(super) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// An integer from 0 to `max`. YAML integers only, as the CRD schemas declare them.
    pub(super) fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .filter(|n| *n <= max)
                .map(Some)
                .ok_or_else(|| {
                    self.error(
                        key,
                        format!("expected an integer from 0 to {max}, found {}", show(value)),
                    )
                }),
        }
    }

    /// A number, with or without a fraction.
    pub(super) fn number(&self, key: &str) -> Result<Option<f64>, FieldError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => {
                Err(self.error(key, format!("expected a number, found {}", show(other))))
            }
        }
    }

    /// A mapping from names to mappings, in the order written
    /// (`headers: {end-user: {exact: jason}}`).
    pub(super) fn obj_map(&self, key: &str) -> Result<Vec<(&'a str, Fields<'a>)>, FieldError> {
        self.map_entries(key)?
            .into_iter()
            .map(|(name, path, value)| match value {
                Value::Mapping(map) => Ok((name, Fields { map, value, path })),
                other => Err(FieldError {
                    field: path,
                    reason: format!("expected a mapping, found {}", show(other)),
                }),
            })
            .collect()
    }

    /// A mapping from names to strings, in the order written (`set: {x-version: v2}`).
    pub(super) fn str_map(&self, key: &str) -> Result<Vec<(&'a str, &'a str)>, FieldError> {
        self.map_entries(key)?
            .into_iter()
            .map(|(name, path, value)| match value {
                Value::String(s) => Ok((name, s.as_str())),
                other => Err(FieldError {
                    field: path,
                    reason: format!("expected a string (quote it), found {}", show(other)),
                }),
            })
            .collect()
    }

    /// The entries of a mapping with string keys: name, path, value.
    fn map_entries(&self, key: &str) -> Result<Vec<(&'a str, String, &'a Value)>, FieldError> {
        let Some(value) = self.get(key) else {
            return Ok(Vec::new());
        };
        let Value::Mapping(map) = value else {
            return Err(self.error(key, format!("expected a mapping, found {}", show(value))));
        };
        map.iter()
            .map(|(k, v)| match k {
                Value::String(name) => Ok((name.as_str(), self.path(&format!("{key}.{name}")), v)),
                other => {
                    Err(self.error(key, format!("keys must be strings, found {}", show(other))))
                }
            })
            .collect()
    }
}

impl std::fmt::Debug for Fields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fields")
            .field("path", &self.path)
            .field("value", &self.value)
            .finish()
    }
}

/// A short rendering of a value for error messages.
pub(super) fn show(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

pub(super) struct Metadata {
    pub(super) namespace: Arc<str>,
    pub(super) name: Arc<str>,
    pub(super) uid: Option<Arc<str>>,
    pub(super) labels: Labels,
    pub(super) annotations: Labels,
}

pub(super) fn metadata(fields: &Fields<'_>, namespaced: bool) -> Result<Metadata, FieldError> {
    let meta = fields.required_obj("metadata")?;
    let name = meta.required_str("name")?;
    if name.is_empty() || name.contains('/') {
        return Err(meta.error("name", "must be a non-empty name without '/'"));
    }
    let namespace = if namespaced {
        match meta.str("namespace")? {
            Some("") | None => "default",
            Some(ns) if ns.contains('/') => {
                return Err(meta.error("namespace", "must be a name without '/'"))
            }
            Some(ns) => ns,
        }
    } else {
        ""
    };
    Ok(Metadata {
        namespace: namespace.into(),
        name: name.into(),
        uid: meta.str("uid")?.filter(|u| !u.is_empty()).map(Into::into),
        labels: meta.labels("labels")?,
        annotations: meta.labels("annotations")?,
    })
}

/// A field read, or why it could not be.
type Checked<T> = Result<T, FieldError>;

/// Names `key` of `fields` as the culprit of a failed check.
pub(super) fn check<T>(fields: &Fields<'_>, key: &str, result: Result<T, String>) -> Checked<T> {
    result.map_err(|reason| fields.error(key, reason))
}

/// Names an already built path as the culprit of a failed check.
pub(super) fn at<T>(path: &str, result: Result<T, String>) -> Checked<T> {
    result.map_err(|reason| FieldError {
        field: path.to_owned(),
        reason,
    })
}

/// A list of strings, each checked by `rule`.
pub(super) fn strings(
    fields: &Fields<'_>,
    key: &str,
    rule: impl Fn(&str) -> Result<(), String>,
) -> Checked<Arc<[Arc<str>]>> {
    fields
        .str_list(key)?
        .into_iter()
        .map(|(path, s)| at(&path, rule(s)).map(|()| Arc::from(s)))
        .collect()
}

pub(super) fn any(_: &str) -> Result<(), String> {
    Ok(())
}

/// A string, `None` when absent or empty (proto3 does not tell the two apart).
pub(super) fn opt_str(fields: &Fields<'_>, key: &str) -> Checked<Option<Arc<str>>> {
    Ok(fields.str(key)?.filter(|s| !s.is_empty()).map(Arc::from))
}

/// One of a closed set of names, spelled exactly.
pub(super) fn one_of<T: Copy>(
    fields: &Fields<'_>,
    key: &str,
    choices: &[(&str, T)],
) -> Checked<Option<T>> {
    let Some(value) = fields.str(key)? else {
        return Ok(None);
    };
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| Some(*v))
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            fields.error(
                key,
                format!("expected one of {}, found {value:?}", names.join(", ")),
            )
        })
}

/// A label map checked by `rule`; a failure names the label key.
pub(super) fn checked_labels(
    fields: &Fields<'_>,
    key: &str,
    rule: fn(&Labels) -> Result<(), (String, String)>,
) -> Checked<Labels> {
    let labels = fields.labels(key)?;
    rule(&labels).map_err(|(label, reason)| fields.error(&format!("{key}.{label}"), reason))?;
    Ok(labels)
}

/// `selector: {matchLabels: {...}}` (`None` when absent).
pub(super) fn workload_selector(fields: &Fields<'_>, key: &str) -> Checked<Option<Labels>> {
    match fields.obj(key)? {
        Some(selector) => Ok(Some(checked_labels(
            &selector,
            "matchLabels",
            validate::workload_selector,
        )?)),
        None => Ok(None),
    }
}

/// A port number where 0 means unset, as in Istio's protos.
pub(super) fn ip_blocks(fields: &Fields<'_>, key: &str) -> Checked<Arc<[IpBlock]>> {
    fields
        .str_list(key)?
        .into_iter()
        .map(|(path, s)| at(&path, validate::ip_or_cidr(s)))
        .collect()
}
