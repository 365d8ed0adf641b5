//! The local configuration source: a directory of Kubernetes YAML (or JSON), polled for changes.
//!
//! Every [`POLL_INTERVAL`] the source reads the directory; when the content hash of the files
//! (and of the `generation` file) changed, it translates the files that changed and publishes a
//! new snapshot. Writers replace files atomically (write a temporary file, then rename), so a
//! half-written file is never read; temporary names (hidden files, other extensions) are skipped.
//!
//! Documents are independent: a document that does not parse or fails validation is rejected
//! alone, with a log line naming the file, the resource and the field, and the last good
//! version of the resource stays in force. When a broken document cannot even be named, every
//! resource its file held before stays in force until the file is fixed.

use std::{
    collections::BTreeMap,
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::yaml::{self, Value};
use thiserror::Error;
use tracing::{info, warn};

use super::{
    ledger::{Ledger, Rejection, Results, SourceStatus},
    objects::{self, Object},
};
use crate::{metrics::Rejections, model::Store};

/// How often the directory is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Optional file holding the generation number tools wait for.
pub const GENERATION_FILE: &str = "generation";

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot read the configuration directory {dir}: {source} (check --config-dir)")]
    ReadDir { dir: PathBuf, source: io::Error },
}

/// Watches one directory and publishes its content through a [`Store`].
pub struct FileSource {
    dir: PathBuf,
    store: Store,
    status: Arc<SourceStatus>,
    rejections: Rejections,
    files: BTreeMap<String, FileState>,
    /// Resources per file; the first file in name order wins a resource defined twice.
    ledger: Box<Ledger<String>>,
    generation: Option<u64>,
    digest: Option<u64>,
    last_error: Option<String>,
}

/// What one file contributed, as of its last read (its resources are in the [`Ledger`]).
#[derive(Debug)]
struct FileState {
    hash: u64,
    rejected: Vec<Rejection>,
}

/// One file as read in a poll: `None` content when it could not be read this time.
struct Read {
    name: String,
    content: Option<Vec<u8>>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>, store: Store) -> Self {
        Self {
            dir: dir.into(),
            store,
            status: Arc::default(),
            rejections: Rejections::default(),
            files: BTreeMap::new(),
            ledger: Box::default(),
            generation: None,
            digest: None,
            last_error: None,
        }
    }

    /// Counts rejections in `weft_config_rejected_total{kind}`.
    pub fn with_rejections(mut self, rejections: Rejections) -> Self {
        self.rejections = rejections;
        self
    }

    pub fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Polls until `shutdown` completes. Call [`FileSource::poll`] once before, so a missing
    /// directory stops start-up instead of being retried.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticker.tick() => {}
            }
            match self.poll() {
                Ok(_) if self.last_error.take().is_some() => {
                    info!(dir = %self.dir.display(), "configuration directory readable again");
                }
                Ok(_) => {}
                Err(e) => {
                    let message = e.to_string();
                    if self.last_error.as_ref() != Some(&message) {
                        warn!("{message}; the current configuration stays in force");
                        self.last_error = Some(message);
                    }
                }
            }
        }
    }

    /// Reads the directory once and publishes a snapshot if anything changed (always on the
    /// first call). Returns the published version.
    pub fn poll(&mut self) -> Result<Option<u64>, SourceError> {
        // The generation is read before the resources: a writer updates it last, so any
        // generation seen here is never newer than the resources read after it.
        let generation_path = self.dir.join(GENERATION_FILE);
        let generation_raw = match std::fs::read(&generation_path) {
            Ok(raw) => Some(raw),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(path = %generation_path.display(), error = %e, "cannot read the generation file");
                None
            }
        };
        let reads = self.read_files()?;

        let mut digest = DefaultHasher::new();
        generation_raw.hash(&mut digest);
        for read in &reads {
            read.name.hash(&mut digest);
            read.content.hash(&mut digest);
        }
        let digest = digest.finish();
        if self.digest == Some(digest) {
            return Ok(None);
        }
        self.digest = Some(digest);
        self.generation = generation_raw.and_then(|raw| parse_generation(&generation_path, &raw));

        let mut old = std::mem::take(&mut self.files);
        let mut files = BTreeMap::new();
        for read in reads {
            let old_state = old.remove(&read.name);
            let state = match (read.content, old_state) {
                (Some(content), Some(old)) if old.hash == hash(&content) => old,
                (Some(content), _) => {
                    let applied = self.ledger.apply(
                        read.name.clone(),
                        results(&read.name, &content),
                        "unknown",
                    );
                    for (id, first) in &applied.shadowed {
                        warn!(
                            file = %read.name,
                            "{id} is also defined in {first}; the definition in {first} is used"
                        );
                    }
                    for rejection in &applied.rejected {
                        self.rejections.inc(&rejection.kind);
                        warn!(
                            file = %read.name,
                            kind = %rejection.kind,
                            resource = %rejection.name,
                            field = %rejection.field,
                            "{rejection}"
                        );
                    }
                    FileState {
                        hash: hash(&content),
                        rejected: applied.rejected,
                    }
                }
                // Unreadable this time: keep what the file held before.
                (None, Some(old)) => old,
                (None, None) => continue,
            };
            files.insert(read.name, state);
        }
        // What is left of the old files was deleted.
        for name in old.keys() {
            self.ledger.remove(name);
        }
        self.files = files;

        let rejected: Vec<Rejection> = self
            .files
            .values()
            .flat_map(|f| f.rejected.iter().cloned())
            .collect();
        let resources = self.ledger.resources();
        let rejected_count = rejected.len();
        self.status.set_rejected(rejected);

        self.ledger.set_generation(self.generation);
        let version = self.ledger.publish(&self.store);
        info!(
            version,
            generation = self.generation,
            resources,
            rejected = rejected_count,
            dir = %self.dir.display(),
            "configuration published"
        );
        Ok(Some(version))
    }

    fn read_files(&self) -> Result<Vec<Read>, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| SourceError::ReadDir {
            dir: self.dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SourceError::ReadDir {
                dir: self.dir.clone(),
                source,
            })?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            // Hidden files are editors' and writers' temporaries (and ConfigMap internals).
            let wanted = !name.starts_with('.')
                && Path::new(&name)
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e));
            if wanted {
                names.push(name);
            }
        }
        names.sort();

        let mut reads = Vec::with_capacity(names.len());
        for name in names {
            let path = self.dir.join(&name);
            // `metadata` follows symlinks, as mounted ConfigMaps use them.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() && m.len() > MAX_FILE_BYTES => {
                    warn!(path = %path.display(), bytes = m.len(), limit = MAX_FILE_BYTES, "configuration file too large to read; keeping its previous content");
                    reads.push(Read {
                        name,
                        content: None,
                    });
                    continue;
                }
                Ok(m) if m.is_file() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => {}
            }
            match std::fs::read(&path) {
                Ok(content) => reads.push(Read {
                    name,
                    content: Some(content),
                }),
                // Deleted between listing and reading.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read configuration file; keeping its previous content");
                    reads.push(Read {
                        name,
                        content: None,
                    });
                }
            }
        }
        Ok(reads)
    }
}

fn hash(content: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    content.hash(&mut h);
    h.finish()
}

fn parse_generation(path: &Path, raw: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(raw);
    match text.trim().parse() {
        Ok(g) => Some(g),
        Err(_) => {
            warn!(
                path = %path.display(),
                content = %text.trim(),
                "the generation file must hold a non-negative integer; ignoring it"
            );
            None
        }
    }
}

/// The largest document read: what Kubernetes stores in one object (etcd's default request
/// limit). Parsing builds a tree some 70 times the text's size, so a larger document is
/// rejected before it is parsed, not after it took the proxy's memory.
/// A JSON file is one document, and so is a `kind: List`: both are held to it too.
pub const MAX_DOCUMENT_BYTES: usize = 1536 * 1024;
/// The largest file read at all (its documents are then held to [`MAX_DOCUMENT_BYTES`]).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Translates one file, each result with where it was read (`name:line`).
fn results(name: &str, content: &[u8]) -> Results {
    parse_documents(name, content)
        .into_iter()
        .map(|(line, result)| (format!("{name}:{line}"), result))
        .collect()
}

/// Reads the resources of one file (`name` tells JSON from YAML). Every document is parsed and
/// translated on its own, so one broken document hides nothing else; each result comes with the
/// line it starts on (for a syntax error, the line of the error). Any bytes give an answer and
/// never a panic: `fuzz/` feeds this function arbitrary input.
pub fn parse_documents(
    name: &str,
    content: &[u8],
) -> Vec<(usize, Result<Object, objects::Invalid>)> {
    let unnamed = |field: &str, reason: String| objects::Invalid {
        kind: None,
        id: None,
        name: None,
        field: field.into(),
        reason,
        fallback: None,
    };
    let text = match std::str::from_utf8(content) {
        Ok(t) => t,
        Err(e) => return vec![(1, Err(unnamed("(file)", format!("not UTF-8 text: {e}"))))],
    };
    let is_json = name.ends_with(".json");
    let mut out = Vec::new();
    for (line, chunk) in split_documents(text, is_json) {
        if chunk.len() > MAX_DOCUMENT_BYTES {
            let reason = format!(
                "the document is {} bytes, over the {MAX_DOCUMENT_BYTES} bytes Kubernetes stores in one object: split it",
                chunk.len()
            );
            out.push((line, Err(unnamed("(document)", reason))));
            continue;
        }
        let parsed: Result<Value, (usize, String)> = if is_json {
            match serde_json::from_str::<serde_json::Value>(chunk) {
                Ok(v) => yaml::from_json(v).map_err(|e| (0, format!("JSON: {e}"))),
                Err(e) => Err((e.line(), format!("JSON syntax error: {e}"))),
            }
        } else {
            yaml::parse_document(chunk, line)
                .map_err(|(at, e)| (at, format!("YAML syntax error: {e}")))
        };
        match parsed {
            Ok(value) => out.extend(objects::translate(&value).into_iter().map(|r| (line, r))),
            Err((at, reason)) => out.push((
                line + at.saturating_sub(1),
                Err(unnamed("(document)", reason)),
            )),
        }
    }
    out
}

/// Splits multi-document YAML at `---` and `...` lines, so a syntax error stays inside its
/// document. A `---` or `...` at the start of a line always starts or ends a document in YAML,
/// even inside a block scalar, so no parsing is needed. Yields the 1-based line each document
/// starts on.
fn split_documents(text: &str, is_json: bool) -> Vec<(usize, &str)> {
    if is_json {
        return vec![(1, text)];
    }
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    let is_marker = |line: &str, marker: &str| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    };
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line, "---") && offset > start {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = index + 1;
        }
        offset += line.len();
        // `...` ends a document, and the next one may follow without a `---`.
        if is_marker(line, "...") {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = index + 2;
        }
    }
    if start < text.len() {
        docs.push((start_line, &text[start..]));
    }
    docs
}

#[cfg(test)]
mod tests {
    use std::{fs, net::Ipv4Addr};

    use tempfile::TempDir;

    use super::*;
    use crate::model::{ObjectKey, Snapshot};

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n  labels: {weft.io/mesh: enabled}\n";

    fn pod(name: &str, ip: &str, labels: &str, ports: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: bookinfo\n  labels: {labels}\n\
             spec:\n  nodeName: n1\n  containers:\n  - name: app\n    ports: {ports}\nstatus:\n  podIP: {ip}\n"
        )
    }

    fn service(name: &str, ip: &str, selector: &str, target: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bookinfo}}\n\
             spec:\n  clusterIP: {ip}\n  selector: {selector}\n  ports:\n  - {{name: http, port: 9080, targetPort: {target}}}\n"
        )
    }

    struct Fixture {
        dir: TempDir,
        store: Store,
        source: FileSource,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new();
            let source = FileSource::new(dir.path(), store.clone());
            Self { dir, store, source }
        }

        /// Writes like the tools do: a temporary file renamed over the target.
        fn write(&self, name: &str, content: &str) {
            let tmp = self.dir.path().join(format!(".{name}.tmp"));
            fs::write(&tmp, content).unwrap();
            fs::rename(&tmp, self.dir.path().join(name)).unwrap();
        }

        fn remove(&self, name: &str) {
            fs::remove_file(self.dir.path().join(name)).unwrap();
        }

        fn poll(&mut self) -> Option<u64> {
            self.source.poll().unwrap()
        }

        /// The source rejected one thing, read at `origin` (a prefix), for `reason`.
        fn assert_one_rejection(&self, origin: &str, reason: &str) {
            let rejected = self.source.status().rejected();
            assert_eq!(rejected.len(), 1, "{rejected:?}");
            assert!(
                rejected[0].reason.contains(reason) && rejected[0].origin.starts_with(origin),
                "{:?}",
                rejected[0]
            );
        }

        fn snapshot(&self) -> Arc<Snapshot> {
            self.store.current()
        }
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("bookinfo", name)
    }

    #[test]
    fn first_poll_publishes_even_an_empty_directory() {
        let mut f = Fixture::new();
        assert_eq!(f.poll(), Some(1));
        assert_eq!(f.poll(), None);
        assert!(f.snapshot().pods.is_empty());
    }

    #[test]
    fn missing_directory_is_an_error() {
        let mut source = FileSource::new("/nonexistent/weft-config", Store::new());
        let err = source.poll().unwrap_err();
        assert!(err.to_string().contains("--config-dir"), "{err}");
    }

    #[test]
    fn create_modify_delete() {
        let mut f = Fixture::new();
        f.write(
            "a.yaml",
            &format!(
                "{NAMESPACE}---\n{}",
                pod("p1", "10.244.1.5", "{app: a}", "[]")
            ),
        );
        assert_eq!(f.poll(), Some(1));
        let snap = f.snapshot();
        let p1 = &snap.pods[&key("p1")];
        assert_eq!(p1.ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert!(snap.is_meshed(p1));
        assert_eq!(
            snap.pod_by_ip(Ipv4Addr::new(10, 244, 1, 5)).unwrap().key,
            key("p1")
        );

        // Unchanged content: nothing published.
        f.write(
            "a.yaml",
            &format!(
                "{NAMESPACE}---\n{}",
                pod("p1", "10.244.1.5", "{app: a}", "[]")
            ),
        );
        assert_eq!(f.poll(), None);

        f.write(
            "a.yaml",
            &format!(
                "{NAMESPACE}---\n{}",
                pod("p1", "10.244.1.6", "{app: a}", "[]")
            ),
        );
        assert_eq!(f.poll(), Some(2));
        assert_eq!(
            f.snapshot().pods[&key("p1")].ip,
            Some(Ipv4Addr::new(10, 244, 1, 6))
        );

        f.write("b.yml", &pod("p2", "10.244.1.7", "{app: b}", "[]"));
        assert_eq!(f.poll(), Some(3));
        assert_eq!(f.snapshot().pods.len(), 2);

        f.remove("a.yaml");
        assert_eq!(f.poll(), Some(4));
        let snap = f.snapshot();
        assert_eq!(snap.pods.len(), 1);
        assert!(snap.namespaces.is_empty());
        assert!(snap.pod_by_ip(Ipv4Addr::new(10, 244, 1, 6)).is_none());
    }

    #[test]
    fn temporary_and_foreign_files_are_skipped() {
        let mut f = Fixture::new();
        fs::write(f.dir.path().join(".a.yaml.tmp"), "not: [valid").unwrap();
        fs::write(f.dir.path().join("a.yaml.tmp"), "not: [valid").unwrap();
        fs::write(f.dir.path().join("README.md"), "# hi").unwrap();
        fs::create_dir(f.dir.path().join("sub.yaml")).unwrap();
        f.poll();
        assert!(f.source.status().rejected().is_empty());
    }

    #[test]
    fn json_files_are_read() {
        let mut f = Fixture::new();
        f.write(
            "ns.json",
            r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bookinfo"}}"#,
        );
        f.poll();
        assert!(f.snapshot().namespaces.contains_key("bookinfo"));
    }

    #[test]
    fn invalid_document_is_rejected_alone_and_last_good_stays() {
        let mut f = Fixture::new();
        f.write(
            "a.yaml",
            &format!(
                "{}---\n{}",
                pod("p1", "10.244.1.5", "{app: a}", "[]"),
                pod("p2", "10.244.1.6", "{app: b}", "[]")
            ),
        );
        f.write("b.yaml", NAMESPACE);
        f.poll();

        // p1 becomes invalid, p2 changes, p3 is new and invalid, b.yaml is untouched.
        f.write(
            "a.yaml",
            &format!(
                "{}---\n{}---\n{}",
                pod("p1", "10.244.1.5", "{app: a}", "[{containerPort: 0}]"),
                pod("p2", "10.244.1.9", "{app: b}", "[]"),
                pod("p3", "10.244.1.300", "{app: c}", "[]"),
            ),
        );
        f.poll();
        let snap = f.snapshot();
        assert_eq!(snap.pods[&key("p1")].ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(snap.pods[&key("p2")].ip, Some(Ipv4Addr::new(10, 244, 1, 9)));
        assert!(!snap.pods.contains_key(&key("p3")));
        assert!(snap.namespaces.contains_key("bookinfo"));

        let rejected = f.source.status().rejected();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        let p1 = &rejected[0];
        assert_eq!(
            (p1.kind.as_str(), p1.name.as_str(), p1.field.as_str()),
            (
                "Pod",
                "bookinfo/p1",
                "spec.containers[0].ports[0].containerPort"
            )
        );
        assert!(p1.kept_last_good);
        assert_eq!(p1.origin, "a.yaml:1");
        let message = p1.to_string();
        assert!(
            message.contains("Pod bookinfo/p1 rejected: spec.containers[0].ports[0].containerPort"),
            "{message}"
        );
        let p3 = &rejected[1];
        assert_eq!(
            (p3.name.as_str(), p3.field.as_str()),
            ("bookinfo/p3", "status.podIP")
        );
        assert!(!p3.kept_last_good);
        assert_eq!(f.source.rejections.get("Pod"), 2);

        // A poll without changes neither re-counts nor re-logs.
        f.poll();
        assert_eq!(f.source.rejections.get("Pod"), 2);

        // Once fixed, the new version applies and the rejection is gone.
        f.write(
            "a.yaml",
            &format!(
                "{}---\n{}",
                pod("p1", "10.244.1.50", "{app: a}", "[]"),
                pod("p2", "10.244.1.9", "{app: b}", "[]")
            ),
        );
        f.poll();
        assert_eq!(
            f.snapshot().pods[&key("p1")].ip,
            Some(Ipv4Addr::new(10, 244, 1, 50))
        );
        assert!(f.source.status().rejected().is_empty());
    }

    #[test]
    fn finished_and_host_network_pods_own_no_address() {
        let mut f = Fixture::new();
        let running = pod("new", "10.244.1.7", "{app: a}", "[]");
        let finished = pod("aaa-old", "10.244.1.7", "{app: b}", "[]") + "  phase: Succeeded\n";
        let host = pod("agent", "172.31.0.11", "{app: c}", "[]")
            .replace("  nodeName: n1\n", "  nodeName: n1\n  hostNetwork: true\n");
        f.write("a.yaml", &[running, finished, host].join("---\n"));
        f.poll();
        let snap = f.snapshot();
        // The finished pod sorts first, yet the address is the running pod's.
        assert_eq!(
            snap.pod_by_ip(Ipv4Addr::new(10, 244, 1, 7))
                .map(|p| &*p.key.name),
            Some("new")
        );
        assert_eq!(snap.pods[&key("aaa-old")].ip, None);
        assert_eq!(snap.pods[&key("agent")].ip, None);
        assert!(snap.pod_by_ip(Ipv4Addr::new(172, 31, 0, 11)).is_none());
    }

    #[test]
    fn a_refused_new_authorization_policy_fails_closed() {
        use crate::model::policy::AuthzAction;
        let mut f = Fixture::new();
        let policy = |name: &str, annotations: &str, spec: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: {name}, namespace: foo{annotations}}}\nspec: {spec}\n"
            )
        };
        let jwt = "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}";
        f.write(
            "p.yaml",
            &[
                policy("deny-jwt", "", &format!("{{action: DENY, {jwt}")),
                policy(
                    "allow-jwt",
                    "",
                    &format!("{{selector: {{matchLabels: {{app: a}}}}, {jwt}"),
                ),
                policy(
                    "custom",
                    "",
                    "{action: CUSTOM, provider: {name: ext}, rules: [{}]}",
                ),
                policy("audit-jwt", "", &format!("{{action: AUDIT, {jwt}")),
                policy(
                    "dry-deny-jwt",
                    ", annotations: {istio.io/dry-run: 'true'}",
                    &format!("{{action: DENY, {jwt}"),
                ),
            ]
            .join("---\n"),
        );
        f.poll();
        let snap = f.snapshot();
        let in_force = |name: &str| {
            snap.authorization_policies
                .get(&ObjectKey::new("foo", name))
        };
        // A DENY Weft cannot honour denies everything; so does a CUSTOM (it exists to deny).
        for name in ["deny-jwt", "custom"] {
            let p = in_force(name).unwrap_or_else(|| panic!("{name} is not in force"));
            assert_eq!(p.action, AuthzAction::Deny, "{name}");
            assert_eq!(p.rules.len(), 1, "{name}: one rule that matches everything");
            assert_eq!(p.rules[0], Default::default(), "{name}");
        }
        // An ALLOW matches nothing, in its own scope.
        let allow = in_force("allow-jwt").expect("allow-jwt is in force");
        assert_eq!(allow.action, AuthzAction::Allow);
        assert!(allow.rules.is_empty());
        assert_eq!(
            allow
                .selector
                .as_ref()
                .and_then(|s| s.get("app"))
                .map(String::as_str),
            Some("a")
        );
        // AUDIT and dry-run policies decide nothing: nothing stands for them.
        assert!(in_force("audit-jwt").is_none());
        assert!(in_force("dry-deny-jwt").is_none());
        let rejected = f.source.status().rejected();
        assert_eq!(rejected.len(), 5, "{rejected:?}");
        let deny = rejected.iter().find(|r| r.name == "foo/deny-jwt").unwrap();
        assert!(deny.failed_closed && !deny.kept_last_good);
        assert!(deny.to_string().contains("failing closed"), "{deny}");

        // Still refused but for other workloads: the stand-in follows the new scope (a
        // stand-in is no last good version).
        f.write(
            "p.yaml",
            &policy(
                "allow-jwt",
                "",
                &format!("{{selector: {{matchLabels: {{app: b}}}}, {jwt}"),
            ),
        );
        f.poll();
        let snap = f.snapshot();
        let moved = &snap.authorization_policies[&ObjectKey::new("foo", "allow-jwt")];
        assert_eq!(
            moved
                .selector
                .as_ref()
                .and_then(|s| s.get("app"))
                .map(String::as_str),
            Some("b")
        );
        let rejected = f.source.status().rejected();
        assert!(rejected[0].failed_closed && !rejected[0].kept_last_good);

        // A policy that was good keeps its last good version when an update is refused.
        f.write(
            "p.yaml",
            &policy(
                "deny-jwt",
                "",
                "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
            ),
        );
        f.poll();
        f.write(
            "p.yaml",
            &policy("deny-jwt", "", &format!("{{action: DENY, {jwt}")),
        );
        f.poll();
        let snap = f.snapshot();
        let kept = &snap.authorization_policies[&ObjectKey::new("foo", "deny-jwt")];
        assert_eq!(&*kept.rules[0].to[0].paths[0].text, "/admin");
        let rejected = f.source.status().rejected();
        assert!(rejected[0].kept_last_good && !rejected[0].failed_closed);
    }

    #[test]
    fn syntax_error_keeps_the_files_last_good_resources() {
        let mut f = Fixture::new();
        f.write(
            "a.yaml",
            &format!(
                "{}---\n{}",
                pod("p1", "10.244.1.5", "{app: a}", "[]"),
                pod("p2", "10.244.1.6", "{app: b}", "[]")
            ),
        );
        f.write("b.yaml", NAMESPACE);
        f.poll();

        f.write(
            "a.yaml",
            &format!(
                "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: [p2\n",
                pod("p1", "10.244.1.7", "{app: a}", "[]")
            ),
        );
        f.write("b.yaml", &NAMESPACE.replace("enabled", "disabled"));
        f.poll();
        let snap = f.snapshot();
        assert_eq!(snap.pods[&key("p1")].ip, Some(Ipv4Addr::new(10, 244, 1, 7)));
        assert_eq!(snap.pods[&key("p2")].ip, Some(Ipv4Addr::new(10, 244, 1, 6)));
        assert!(!snap.namespaces["bookinfo"].mesh_enabled());
        f.assert_one_rejection("a.yaml:", "YAML syntax error");
    }

    #[test]
    fn a_document_larger_than_kubernetes_stores_is_rejected_before_parsing() {
        let mut f = Fixture::new();
        f.write("a.yaml", &pod("p1", "10.244.1.5", "{app: a}", "[]"));
        f.poll();
        let mut huge = String::from(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: huge, namespace: bookinfo}\nspec:\n  hosts: [huge.example.test]\n  http:\n",
        );
        let mut i = 0;
        while huge.len() <= MAX_DOCUMENT_BYTES {
            huge.push_str(&format!(
                "  - match: [{{uri: {{exact: /p{i}}}}}]\n    route: [{{destination: {{host: echo}}}}]\n"
            ));
            i += 1;
        }
        f.write(
            "a.yaml",
            &format!("{}---\n{huge}", pod("p1", "10.244.1.7", "{app: a}", "[]")),
        );
        f.poll();
        let snap = f.snapshot();
        assert_eq!(
            snap.pods[&key("p1")].ip,
            Some(Ipv4Addr::new(10, 244, 1, 7)),
            "the file's other documents apply"
        );
        assert!(snap.virtual_services.is_empty());
        f.assert_one_rejection(
            "a.yaml:",
            &format!("over the {MAX_DOCUMENT_BYTES} bytes Kubernetes stores in one object"),
        );
    }

    #[test]
    fn endpoints_derived_from_selector_with_named_target_port() {
        let mut f = Fixture::new();
        f.write(
            "a.yaml",
            &[
                pod(
                    "r1",
                    "10.244.1.5",
                    "{app: reviews, version: v1}",
                    "[{name: http, containerPort: 9081}]",
                ),
                pod(
                    "r2",
                    "10.244.1.4",
                    "{app: reviews, version: v2}",
                    "[{name: http, containerPort: 9082}]",
                ),
                // Matches the selector but does not declare the named port.
                pod("r3", "10.244.1.6", "{app: reviews, version: v3}", "[]"),
                // Declares the port but is not selected.
                pod(
                    "x",
                    "10.244.1.7",
                    "{app: other}",
                    "[{name: http, containerPort: 1}]",
                ),
                service("reviews", "10.96.0.12", "{app: reviews}", "http"),
                service("numeric", "10.96.0.13", "{app: reviews}", "9090"),
                service("manual", "10.96.0.14", "{}", "9090"),
            ]
            .join("---\n"),
        );
        f.poll();
        let snap = f.snapshot();
        let eps = snap.endpoints(&key("reviews"), 9080);
        let got: Vec<_> = eps.iter().map(|e| (e.ip.to_string(), e.port)).collect();
        assert_eq!(
            got,
            [
                ("10.244.1.4".to_string(), 9082),
                ("10.244.1.5".to_string(), 9081)
            ]
        );
        assert_eq!(eps[0].pod, Some(key("r2")));
        assert_eq!(eps[0].node.as_deref(), Some("n1"));
        assert!(eps.iter().all(|e| e.ready));

        let numeric: Vec<_> = snap
            .endpoints(&key("numeric"), 9080)
            .iter()
            .map(|e| e.port)
            .collect();
        assert_eq!(numeric, [9090, 9090, 9090]);
        assert!(snap.endpoints(&key("manual"), 9080).is_empty());
        assert_eq!(
            snap.service_by_ip(Ipv4Addr::new(10, 96, 0, 12))
                .unwrap()
                .key,
            key("reviews")
        );
    }

    #[test]
    fn endpoint_slices_take_precedence_over_the_selector() {
        let mut f = Fixture::new();
        f.write(
            "a.yaml",
            &[
                pod("r1", "10.244.1.5", "{app: reviews}", "[{name: http, containerPort: 9080}]"),
                service("reviews", "10.96.0.12", "{app: reviews}", "http"),
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: reviews-1, namespace: bookinfo, labels: {kubernetes.io/service-name: reviews}}\n\
                 addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n\
                 - {addresses: [10.244.2.8], nodeName: n2, targetRef: {kind: Pod, name: remote}}\n\
                 - {addresses: [10.244.1.5], targetRef: {kind: Pod, name: r1}}\n\
                 - {addresses: [10.244.2.9], conditions: {ready: false}}\n"
                    .to_string(),
            ]
            .join("---\n"),
        );
        f.poll();
        let snap = f.snapshot();
        let eps = snap.endpoints(&key("reviews"), 9080);
        let got: Vec<_> = eps
            .iter()
            .map(|e| {
                (
                    e.ip.to_string(),
                    e.port,
                    e.node.as_deref().map(str::to_owned),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("10.244.1.5".to_string(), 8080, Some("n1".to_string())),
                ("10.244.2.8".to_string(), 8080, Some("n2".to_string())),
            ]
        );
    }

    #[test]
    fn generation_file() {
        let mut f = Fixture::new();
        f.write(GENERATION_FILE, "3\n");
        f.poll();
        assert_eq!(f.snapshot().generation, Some(3));

        // A new generation alone publishes a snapshot.
        f.write(GENERATION_FILE, "4");
        assert_eq!(f.poll(), Some(2));
        assert_eq!(f.snapshot().generation, Some(4));

        f.write(GENERATION_FILE, "four");
        f.poll();
        assert_eq!(f.snapshot().generation, None);
    }

    #[test]
    fn split_keeps_line_numbers() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- # c\nc: 3\n----\n", false);
        let starts: Vec<_> = docs.iter().map(|(l, _)| *l).collect();
        assert_eq!(starts, [1, 2, 4]);
        assert_eq!(docs[2].1, "--- # c\nc: 3\n----\n");
        assert_eq!(split_documents("---\na: 1\n", false), [(1, "---\na: 1\n")]);
    }

    const REVIEWS_50_50: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
        metadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n\
        \x20   - {destination: {host: reviews, subset: v1}, weight: 50}\n\
        \x20   - {destination: {host: reviews, subset: v3}, weight: WEIGHT}\n";

    #[test]
    fn invalid_mesh_resource_is_rejected_alone_and_its_last_good_version_stays() {
        let mut f = Fixture::new();
        f.write("rules.yaml", &REVIEWS_50_50.replace("WEIGHT", "50"));
        f.poll();
        assert_eq!(f.snapshot().virtual_services.len(), 1);

        // A negative weight: the VirtualService is rejected, the Namespace beside it applies.
        f.write(
            "rules.yaml",
            &format!("{}---\n{NAMESPACE}", REVIEWS_50_50.replace("WEIGHT", "-10")),
        );
        f.poll();
        let snap = f.snapshot();
        assert!(snap.namespaces.contains_key("bookinfo"));
        let vs = &snap.virtual_services[&key("reviews")];
        let crate::model::traffic::HttpAction::Route(route) = &vs.http[0].action else {
            panic!("expected a route");
        };
        assert_eq!(route[1].weight, 50, "the last good version stays in force");

        let rejected = f.source.status().rejected();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        let r = &rejected[0];
        assert_eq!(
            (r.kind.as_str(), r.name.as_str(), r.field.as_str()),
            (
                "VirtualService",
                "bookinfo/reviews",
                "spec.http[0].route[1].weight"
            )
        );
        assert!(r.kept_last_good);
        let message = r.to_string();
        assert!(
            message.starts_with(
                "rules.yaml:1: VirtualService bookinfo/reviews rejected: spec.http[0].route[1].weight: "
            ) && message.ends_with("(the last good version stays in force)"),
            "{message}"
        );
        assert_eq!(f.source.rejections.get("VirtualService"), 1);

        // Fixed: the new weights apply.
        f.write("rules.yaml", &REVIEWS_50_50.replace("WEIGHT", "0"));
        f.poll();
        assert!(f.source.status().rejected().is_empty());
        let vs = &f.snapshot().virtual_services[&key("reviews")];
        let crate::model::traffic::HttpAction::Route(route) = &vs.http[0].action else {
            panic!("expected a route");
        };
        assert_eq!(route[1].weight, 0);
    }

    #[test]
    fn every_mesh_kind_reaches_the_snapshot() {
        let mut f = Fixture::new();
        f.write(
            "mesh.yaml",
            r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: bookinfo}
spec: {hosts: [api.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: bookinfo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bookinfo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec: {parentRefs: [{group: "", kind: Service, name: reviews}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings, namespace: bookinfo}
spec: {parentRefs: [{group: "", kind: Service, name: ratings}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ignored, namespace: bookinfo}
spec: {}
"#,
        );
        f.write("vs.yaml", &REVIEWS_50_50.replace("WEIGHT", "50"));
        f.poll();
        assert!(f.source.status().rejected().is_empty());
        let snap = f.snapshot();
        assert!(snap.destination_rules.contains_key(&key("reviews")));
        assert!(snap.service_entries.contains_key(&key("api")));
        assert!(snap
            .authorization_policies
            .contains_key(&key("allow-nothing")));
        assert!(snap.peer_authentications.contains_key(&key("default")));
        assert!(snap.http_routes.contains_key(&key("reviews")));
        assert!(snap.grpc_routes.contains_key(&key("ratings")));
        assert!(snap.virtual_services.contains_key(&key("reviews")));
    }

    /// Every file of a directory, with its content.
    fn files(dir: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut files: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    fs::read(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn bookinfo_traffic_examples_are_accepted() {
        let examples: Vec<_> = files("../examples/bookinfo-traffic")
            .into_iter()
            .filter(|(name, _)| name.ends_with(".yaml"))
            .collect();
        assert!(examples.len() >= 8, "{examples:?}");
        for (name, content) in examples {
            let results = parse_documents(&name, &content);
            assert!(!results.is_empty(), "{name} holds no resource");
            for (line, result) in results {
                let object = result.unwrap_or_else(|e| panic!("{name}:{line}: {e:?}"));
                assert!(
                    !matches!(
                        object,
                        Object::Namespace(_) | Object::Pod(_) | Object::Service(_)
                    ),
                    "{name}: traffic rules only"
                );
            }
        }
    }

    /// Replays the fuzzing corpus on the stable toolchain, so CI proves that no input found by
    /// `cargo fuzz` (fuzz/) panics, without running the fuzzer.
    #[test]
    fn fuzz_corpus_replays_without_panicking() {
        let corpus = files("../fuzz/corpus/yaml_to_model");
        assert!(corpus.len() >= 8, "the seed corpus is missing");
        for (name, content) in corpus {
            // The named seeds are valid resources, but for `invalid-*`; inputs the fuzzer adds
            // are named by their hash.
            let seed = name.ends_with(".yaml") || name.ends_with(".json");
            if seed && !name.starts_with("invalid") {
                for (line, result) in parse_documents(&name, &content) {
                    result.unwrap_or_else(|e| panic!("{name}:{line}: {e:?}"));
                }
            }
            for file_name in ["input.yaml", "input.json"] {
                let results = std::panic::catch_unwind(|| parse_documents(file_name, &content))
                    .unwrap_or_else(|_| panic!("{name} panics as {file_name}"));
                for (_, result) in results {
                    if let Err(invalid) = result {
                        assert!(
                            !invalid.field.is_empty() && !invalid.reason.is_empty(),
                            "{name}: {invalid:?}"
                        );
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn run_applies_changes_within_a_second() {
        let f = Fixture::new();
        let store = f.store.clone();
        let mut source = FileSource::new(f.dir.path(), store.clone());
        source.poll().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(source.run(async {
            let _ = stopped.await;
        }));

        let mut rx = store.subscribe();
        rx.borrow_and_update();
        f.write("a.yaml", NAMESPACE);
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .expect("the change is applied within a second")
            .unwrap();
        assert!(store.current().namespaces.contains_key("bookinfo"));

        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
