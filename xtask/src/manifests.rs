//! `cargo xtask manifests` (and a step of `cargo xtask test`): offline validation of the
//! Kubernetes manifests in `deploy/` and `examples/`.
//!
//! No API server can run here, so the manifests are checked against schemas: built-in kinds
//! with the schemas the PyPI package `kubernetes-validate` bundles (strict: unknown fields are
//! errors), custom resources with the `openAPIV3Schema` of their CRD, CRDs for the structural
//! rules (see `manifests.py`). The kustomization is rendered first, with `kubectl kustomize`
//! where kubectl is installed and otherwise with [`render`], which understands what
//! `deploy/` uses (`resources`, `labels`, `images`), and the rendered stream is validated too.
//!
//! The validator lives in a virtualenv under `target/`, installed by `cargo xtask setup`.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize as _;
use yaml_serde::{Mapping, Value};

use crate::{cmd, workspace_root};

/// The validator and its pinned version (its bundled schemas go up to Kubernetes 1.37).
pub const VALIDATOR: &str = "kubernetes-validate";
pub const VALIDATOR_VERSION: &str = "1.37.0";
/// Kubernetes versions every built-in object must be valid in: the oldest Weft's client
/// bindings target (k8s-openapi `v1_33`) and the newest the validator knows.
pub const KUBERNETES_VERSIONS: &[&str] = &["1.33", "1.37"];

const SCRIPT: &str = include_str!("manifests.py");

fn work_dir() -> PathBuf {
    workspace_root().join("target").join("xtask")
}

fn venv() -> PathBuf {
    work_dir().join("manifest-venv")
}

fn python() -> PathBuf {
    venv().join("bin").join("python3")
}

fn validator_installed() -> bool {
    Command::new(python())
        .args([
            "-c",
            "import kubernetes_validate.version as v; print(v.__version__)",
        ])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == VALIDATOR_VERSION
        })
}

/// Installs the validator in its virtualenv unless the pinned version is there (setup).
pub fn install_validator() -> Result<()> {
    let what = format!(
        "{VALIDATOR} {VALIDATOR_VERSION} (manifest checks) in {}",
        venv().display()
    );
    if validator_installed() {
        println!("ok: {what}");
        return Ok(());
    }
    println!("installing: {what}");
    if !python().exists() {
        fs::create_dir_all(work_dir())?;
        cmd::interactive(Command::new("python3").arg("-m").arg("venv").arg(venv()))
            .context("creating the virtualenv (Debian: apt-get install python3-venv)")?;
    }
    cmd::interactive(Command::new(python()).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("{VALIDATOR}=={VALIDATOR_VERSION}"),
    ]))
}

/// Validates every manifest file and the rendered kustomization; fails on the first
/// invalid document set, printing one line per document.
pub fn check_manifests() -> Result<()> {
    if !validator_installed() {
        bail!("{VALIDATOR} {VALIDATOR_VERSION} is not installed: run `cargo xtask setup`");
    }
    let root = workspace_root();
    let work = work_dir();
    fs::create_dir_all(&work)?;

    let deploy = root.join("deploy");
    let rendered = work.join("deploy-rendered.yaml");
    let (stream, how) = render_with_kubectl(&deploy)
        .map(|s| (s, "kubectl kustomize"))
        .or_else(|_| {
            render(&deploy)
                .map(|docs| (to_stream(&docs), "the built-in renderer"))
                .context("rendering deploy/kustomization.yaml")
        })?;
    fs::write(&rendered, stream)?;
    println!("rendered deploy/ with {how} into {}", rendered.display());

    let script = work.join("manifests.py");
    fs::write(&script, SCRIPT)?;
    let mut files = manifest_files(&root.join("deploy"))?;
    files.extend(manifest_files(&root.join("examples"))?);
    files.push(rendered);
    let relative: Vec<PathBuf> = files
        .iter()
        .map(|f| f.strip_prefix(&root).unwrap_or(f).to_path_buf())
        .collect();
    cmd::interactive(
        Command::new(python())
            .arg(&script)
            .arg(KUBERNETES_VERSIONS.join(","))
            .args(&relative)
            .current_dir(&root),
    )
    .context("invalid Kubernetes manifests (see the ERROR lines above)")
}

/// Every `.yaml`/`.yml` file under `dir`, sorted, except kustomizations (not objects).
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if is_manifest(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn is_manifest(path: &Path) -> bool {
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    yaml && !name.starts_with("kustomization.")
}

fn render_with_kubectl(dir: &Path) -> Result<String> {
    cmd::output(Command::new("kubectl").arg("kustomize").arg(dir))
}

/// Renders a kustomization: its `resources` (files, or directories with their own
/// kustomization), then its `labels` (added to every object's labels; selectors only with
/// `includeSelectors: true`, which is refused) and `images` (`newName`/`newTag`).
pub fn render(dir: &Path) -> Result<Vec<Value>> {
    let path = dir.join("kustomization.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let k: Value =
        yaml_serde::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for key in k.as_mapping().map(Mapping::keys).into_iter().flatten() {
        let key = key.as_str().unwrap_or_default();
        if !matches!(
            key,
            "apiVersion" | "kind" | "resources" | "labels" | "images"
        ) {
            bail!(
                "{}: `{key}` is not supported by the built-in renderer",
                path.display()
            );
        }
    }
    let mut objects = Vec::new();
    for resource in strings(&k["resources"]) {
        let target = dir.join(resource);
        if target.is_dir() {
            objects.extend(render(&target)?);
        } else {
            let text = fs::read_to_string(&target)
                .with_context(|| format!("reading {}", target.display()))?;
            for doc in yaml_serde::Deserializer::from_str(&text) {
                let value = Value::deserialize(doc)
                    .with_context(|| format!("parsing {}", target.display()))?;
                if !value.is_null() {
                    objects.push(value);
                }
            }
        }
    }
    for label_set in k["labels"].as_sequence().into_iter().flatten() {
        if label_set["includeSelectors"].as_bool() == Some(true) {
            bail!(
                "{}: labels with includeSelectors are not supported",
                path.display()
            );
        }
        for object in &mut objects {
            let metadata = mapping(object, "metadata");
            let labels = mapping(metadata, "labels");
            for (name, value) in label_set["pairs"].as_mapping().into_iter().flatten() {
                labels
                    .as_mapping_mut()
                    .expect("a mapping")
                    .insert(name.clone(), value.clone());
            }
        }
    }
    let images: BTreeMap<String, (Option<String>, Option<String>)> = k["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some((
                i["name"].as_str()?.to_owned(),
                (
                    i["newName"].as_str().map(str::to_owned),
                    i["newTag"].as_str().map(str::to_owned),
                ),
            ))
        })
        .collect();
    if !images.is_empty() {
        for object in &mut objects {
            set_images(object, &images);
        }
    }
    Ok(objects)
}

fn strings(value: &Value) -> impl Iterator<Item = &str> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// `value[key]`, created as an empty mapping when absent.
fn mapping<'a>(value: &'a mut Value, key: &str) -> &'a mut Value {
    let map = value.as_mapping_mut().expect("an object is a mapping");
    let key = Value::from(key);
    if !map.get(&key).is_some_and(Value::is_mapping) {
        map.insert(key.clone(), Value::Mapping(Mapping::new()));
    }
    map.get_mut(&key).expect("just inserted")
}

/// Rewrites `image:` of containers and init containers, wherever a pod spec sits.
fn set_images(value: &mut Value, images: &BTreeMap<String, (Option<String>, Option<String>)>) {
    match value {
        Value::Mapping(map) => {
            for (key, child) in map.iter_mut() {
                if key.as_str() == Some("image") {
                    if let Some(image) = child.as_str() {
                        let (name, tag) = image.split_once(':').unwrap_or((image, ""));
                        if let Some((new_name, new_tag)) = images.get(name) {
                            let name = new_name.as_deref().unwrap_or(name);
                            let tag = new_tag.as_deref().unwrap_or(tag);
                            *child = Value::from(if tag.is_empty() {
                                name.to_owned()
                            } else {
                                format!("{name}:{tag}")
                            });
                        }
                    }
                } else {
                    set_images(child, images);
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|i| set_images(i, images)),
        _ => {}
    }
}

fn to_stream(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| yaml_serde::to_string(o).expect("YAML values serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn identities(objects: &[Value]) -> BTreeSet<(String, String)> {
        objects
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or_default().to_owned(),
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn renders_the_deploy_kustomization() {
        let objects = render(&workspace_root().join("deploy")).unwrap();
        let ids = identities(&objects);
        for expected in [
            ("Namespace", "weft-system"),
            ("DaemonSet", "mesh-node"),
            ("Deployment", "weft-ca"),
            ("Service", "weft-ca"),
            ("ClusterRole", "weft-mesh-node"),
            (
                "CustomResourceDefinition",
                "virtualservices.networking.istio.io",
            ),
            (
                "CustomResourceDefinition",
                "httproutes.gateway.networking.k8s.io",
            ),
        ] {
            assert!(
                ids.contains(&(expected.0.into(), expected.1.into())),
                "{expected:?} missing from {ids:?}"
            );
        }
        let daemonset = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        assert_eq!(
            daemonset["metadata"]["labels"]["app.kubernetes.io/part-of"],
            "weft"
        );
        let spec = &daemonset["spec"]["template"]["spec"];
        assert_eq!(spec["containers"][0]["image"], "weft/mesh-node:dev");
        assert_eq!(spec["initContainers"][0]["image"], "weft/mesh-node:dev");
        // Selectors are left alone (they are immutable on a DaemonSet).
        assert!(daemonset["spec"]["selector"]["matchLabels"]
            .get("app.kubernetes.io/part-of")
            .is_none());
    }

    #[test]
    fn built_in_renderer_agrees_with_kubectl() {
        let deploy = workspace_root().join("deploy");
        let Ok(stream) = render_with_kubectl(&deploy) else {
            // kubectl is optional; the built-in renderer is what runs without it.
            return;
        };
        let kubectl: Vec<Value> = yaml_serde::Deserializer::from_str(&stream)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        let ours = render(&deploy).unwrap();
        assert_eq!(identities(&kubectl), identities(&ours));
        for object in &kubectl {
            let twin = ours
                .iter()
                .find(|o| {
                    o["kind"] == object["kind"]
                        && o["metadata"]["name"] == object["metadata"]["name"]
                })
                .unwrap();
            assert_eq!(twin, object, "{:?}", object["metadata"]["name"]);
        }
    }

    #[test]
    fn finds_manifests_but_not_kustomizations() {
        let files = manifest_files(&workspace_root().join("deploy")).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| {
                f.strip_prefix(workspace_root())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert!(
            names.contains(&"deploy/mesh/daemonset.yaml".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"deploy/crds/istio/networking.yaml".to_string()));
        assert!(!names.iter().any(|n| n.ends_with("kustomization.yaml")));
    }

    #[test]
    fn unsupported_kustomize_features_are_refused() {
        let dir = std::env::temp_dir().join(format!("weft-kustomize-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("kustomization.yaml"),
            "resources: []\nnamePrefix: x-\n",
        )
        .unwrap();
        let err = render(&dir).unwrap_err();
        assert!(err.to_string().contains("namePrefix"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
