//! The YAML every resource goes through: documents of the file source, objects of the
//! Kubernetes source (JSON from the API server), and the tests. The parser behind it is chosen
//! here and only here; ARCHITECTURE.md ("Dependencies") says which one and why.

use serde::{de::Error as _, Serialize};

pub use yaml_serde::{Error, Mapping, Value};

/// Parses one YAML document and applies its merge keys (`<<: *defaults`), as Kubernetes does.
/// A syntax error carries the line and column it was found at (`Error::location`); an error in
/// a merge key carries none, since it is found after parsing.
pub fn parse(text: &str) -> Result<Value, Error> {
    let mut value = yaml_serde::from_str(text)?;
    merge(&mut value)?;
    Ok(value)
}

/// Parses one document of a file, the document starting on line `first_line` (1-based) of the
/// file. An error comes with the line within `text` the parser stopped at (0 when it cannot
/// say, as for a broken merge key) and a message whose line numbers count from the start of
/// the file, so they agree with the `file:line` the rejection is reported at.
pub fn parse_document(text: &str, first_line: usize) -> Result<Value, (usize, String)> {
    parse(text).map_err(|e| {
        let at = e.location().map_or(0, |l| l.line());
        (
            at,
            shift_lines(&e.to_string(), first_line.saturating_sub(1)),
        )
    })
}

/// The YAML form of a JSON value (an object of the Kubernetes API), for translation.
pub fn from_json(value: impl Serialize) -> Result<Value, Error> {
    yaml_serde::to_value(value)
}

/// Adds `offset` to every "line N" of a parser message.
fn shift_lines(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_string();
    }
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&n.saturating_add(offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Applies merge keys, innermost first, so a merged mapping's own `<<` is resolved before it is
/// merged. Keys written in a mapping win over merged ones, and of several merged mappings the
/// first wins (yaml.org/type/merge.html, as go-yaml reads it for kubectl).
fn merge(value: &mut Value) -> Result<(), Error> {
    match value {
        Value::Mapping(map) => {
            for v in map.values_mut() {
                merge(v)?;
            }
            let sources = match map.remove("<<") {
                None => return Ok(()),
                Some(Value::Mapping(source)) => vec![source],
                Some(Value::Sequence(items)) => items
                    .into_iter()
                    .map(|item| match item {
                        Value::Mapping(source) => Ok(source),
                        _ => Err(Error::custom(
                            "a merge key (<<) takes a mapping or a list of mappings",
                        )),
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(Error::custom(
                        "a merge key (<<) takes a mapping or a list of mappings",
                    ))
                }
            };
            for source in sources {
                for (k, v) in source {
                    map.entry(k).or_insert(v);
                }
            }
            Ok(())
        }
        Value::Sequence(items) => items.iter_mut().try_for_each(merge),
        Value::Tagged(tagged) => merge(&mut tagged.value),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> serde_json::Value {
        serde_json::to_value(parse(text).unwrap()).unwrap()
    }

    #[test]
    fn merge_keys_are_applied_with_explicit_keys_winning() {
        let value = doc("base: &b {timeout: 5s, retries: 3}\n\
             route:\n  <<: *b\n  retries: 1\n\
             both:\n  <<: [*b, {retries: 9, extra: x}]\n");
        assert_eq!(
            value["route"],
            serde_json::json!({"timeout": "5s", "retries": 1})
        );
        assert_eq!(
            value["both"],
            serde_json::json!({"timeout": "5s", "retries": 3, "extra": "x"})
        );
    }

    #[test]
    fn a_merged_mapping_brings_its_own_merges() {
        let value = doc("a: &a {x: 1}\nb: &b {<<: *a, y: 2}\nc: {<<: *b, z: 3}\n");
        assert_eq!(value["c"], serde_json::json!({"x": 1, "y": 2, "z": 3}));
    }

    #[test]
    fn a_merge_of_a_scalar_is_an_error() {
        let err = parse("a: {<<: 3}\n").unwrap_err();
        assert!(err.to_string().contains("merge key (<<)"), "{err}");
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let err = parse("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n namespace: b\n")
            .unwrap_err();
        let at = err.location().expect("a location");
        assert_eq!((at.line(), at.column()), (5, 2));
        assert!(err.to_string().contains("line 5 column 2"), "{err}");
    }

    #[test]
    fn scalars_follow_yaml_1_2() {
        // `on`/`yes` stay strings (YAML 1.2 core schema); only true/false are booleans.
        let value = doc("a: on\nb: yes\nc: true\nd: 0o17\ne: 017\nf: ~\n");
        assert_eq!(
            value,
            serde_json::json!({"a": "on", "b": "yes", "c": true, "d": 15, "e": "017", "f": null})
        );
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let err = parse("metadata:\n  name: a\n  name: b\n").unwrap_err();
        assert!(err.to_string().contains("duplicate entry"), "{err}");
    }

    #[test]
    fn the_file_source_reads_merge_keys() {
        let text = "apiVersion: v1\nkind: List\nitems:\n\
            - {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: &mesh {weft.io/mesh: enabled}}}\n\
            - {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: {<<: *mesh, team: x}}}\n";
        let objects: Vec<_> = super::super::file::parse_documents("ns.yaml", text.as_bytes())
            .into_iter()
            .map(|(_, r)| r.unwrap())
            .collect();
        let snapshot = super::super::assemble(&objects, None);
        assert!(snapshot.namespaces["b"].mesh_enabled());
    }

    #[test]
    fn the_file_source_reports_the_line_of_a_broken_document() {
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n";
        // Line 9: a syntax error in the third document; line 11 starts a broken merge.
        let text = format!("{ns}---\n{ns}  labels: {{x: [1}}\n---\nmetadata: {{<<: 3}}\n");
        let results = super::super::file::parse_documents("ns.yaml", text.as_bytes());
        let errors: Vec<_> = results
            .iter()
            .filter_map(|(line, r)| r.as_ref().err().map(|e| (*line, e.reason.as_str())))
            .collect();
        assert_eq!(errors.len(), 2, "{results:?}");
        assert_eq!(errors[0].0, 10, "{}", errors[0].1);
        assert!(
            errors[0].1.starts_with("YAML syntax error: "),
            "{}",
            errors[0].1
        );
        // The message counts lines from the start of the file too.
        assert!(
            errors[0].1.contains("at line 10 column 17"),
            "{}",
            errors[0].1
        );
        assert_eq!(errors[1].0, 11, "{}", errors[1].1);
        assert!(errors[1].1.contains("merge key (<<)"), "{}", errors[1].1);
    }

    #[test]
    fn the_file_source_reads_every_document_of_a_stream() {
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        // A leading `---`, an empty document, `...` with and without a `---` after it, a
        // trailing `---`: four Namespaces.
        let text = format!(
            "---\n{}---\n---\n{}...\n{}...\n---\n{}---\n",
            ns("a"),
            ns("b"),
            ns("c"),
            ns("d")
        );
        let results = super::super::file::parse_documents("ns.yaml", text.as_bytes());
        let lines: Vec<_> = results
            .iter()
            .map(|(line, r)| (*line, r.as_ref().map(|o| o.id().to_string())))
            .collect();
        assert_eq!(lines.len(), 4, "{results:?}");
        assert!(lines.iter().all(|(_, r)| r.is_ok()), "{results:?}");
        assert_eq!(
            lines.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            [1, 6, 11, 15]
        );
    }

    #[test]
    fn json_converts_without_merging() {
        let value = from_json(serde_json::json!({"<<": {"a": 1}})).unwrap();
        assert!(value.get("<<").is_some());
    }
}
