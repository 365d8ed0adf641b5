"""Offline validation of Kubernetes manifests (run by `cargo xtask`, see manifests.rs).

usage: python3 manifests.py KUBE_VERSIONS FILE...

- Built-in kinds: against the schemas bundled by kubernetes-validate, in strict mode (unknown
  fields are errors), for each Kubernetes version in the comma-separated KUBE_VERSIONS.
- Custom resources: against the openAPIV3Schema of their CRD among the given files, for the
  version named in their apiVersion, with fields the schema does not declare (and does not
  preserve) rejected, as the API server would prune them.
- CRDs: also checked for the structural-schema rules the API server enforces.
A document of a kind that has neither a bundled schema nor a CRD is an error.
"""

import sys

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError


def documents(path):
    with open(path) as f:
        for index, doc in enumerate(yaml.safe_load_all(f)):
            if doc is not None:
                yield index, doc


def to_json_schema(node, root=False):
    """An OpenAPI v3 schema of a CRD as JSON Schema, closed where Kubernetes would prune."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("allOf", "anyOf", "oneOf"):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if root:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def structural_errors(node, path):
    """The structural-schema rules: every node typed (unless int-or-string or preserving
    unknown fields), and no `additionalProperties` beside `properties`."""
    errors = []
    if not isinstance(node, dict):
        return [f"{path}: not a schema"]
    exempt = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if not node.get("type") and not exempt:
        errors.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{path}: both properties and additionalProperties")
    for name, child in (node.get("properties") or {}).items():
        errors += structural_errors(child, f"{path}.properties.{name}")
    if isinstance(node.get("items"), dict):
        errors += structural_errors(node["items"], f"{path}.items")
    if isinstance(node.get("additionalProperties"), dict):
        errors += structural_errors(node["additionalProperties"], f"{path}.additionalProperties")
    return errors


def main():
    versions = sys.argv[1].split(",")
    files = sys.argv[2:]
    docs = [(path, index, doc) for path in files for index, doc in documents(path)]

    crds = {}
    for _, _, doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
            spec = doc.get("spec", {})
            served = {
                v["name"]: v.get("schema", {}).get("openAPIV3Schema", {})
                for v in spec.get("versions", [])
                if v.get("served")
            }
            crds[(spec.get("group"), spec.get("names", {}).get("kind"))] = served

    failures = 0
    for path, index, doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            print(f"ERROR {path} document {index}: not a Kubernetes object (apiVersion and kind)")
            failures += 1
            continue
        kind = doc["kind"]
        name = (doc.get("metadata") or {}).get("name", "?")
        where = f"{path} document {index} ({kind} {name})"
        group, _, version = doc["apiVersion"].rpartition("/")
        problems = []
        if (group, kind) in crds:
            schema = crds[(group, kind)].get(version)
            if schema is None:
                problems.append(f"{doc['apiVersion']} is not a served version of its CRD")
            else:
                validator = jsonschema.Draft7Validator(to_json_schema(schema, root=True))
                for error in validator.iter_errors(doc):
                    field = ".".join(str(p) for p in error.absolute_path) or "(root)"
                    problems.append(f"{field}: {error.message}")
            checked = f"its CRD's schema ({version})"
        else:
            for v in versions:
                try:
                    kubernetes_validate.validate(doc, v, strict=True)
                except ValidationError as error:
                    field = ".".join(str(p) for p in error.path) or "(root)"
                    problems.append(f"Kubernetes {v}: {field}: {error.message}")
                except SchemaNotFoundError:
                    problems.append(f"Kubernetes {v} has no {doc['apiVersion']} {kind} and no CRD defines it")
            checked = "Kubernetes " + ", ".join(versions) + " (strict)"
        if kind == "CustomResourceDefinition":
            for v in doc.get("spec", {}).get("versions", []):
                schema = v.get("schema", {}).get("openAPIV3Schema")
                if schema is None:
                    problems.append(f"version {v.get('name')}: no openAPIV3Schema")
                else:
                    problems += [f"version {v.get('name')}: not structural: {e}"
                                 for e in structural_errors(schema, "openAPIV3Schema")]
        if problems:
            failures += 1
            for problem in problems:
                print(f"ERROR {where}: {problem}")
        else:
            print(f"ok    {where} against {checked}")

    print(f"{len(docs)} documents in {len(files)} files: {len(docs) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
