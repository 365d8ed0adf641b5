//! What every origin of a source holds (a file, a watched Kubernetes object), and the one rule
//! both sources follow when an origin changes: **reject a resource alone and keep its last
//! good version**.
//!
//! An origin yields translation results. Accepted objects replace what the origin held; a
//! rejected resource keeps the version the origin held before (or, for a resource new to the
//! origin, the version in force from another origin), and its [`Rejection`] says so; a failure
//! that cannot even be named (a syntax error) keeps everything the origin held before, since
//! the broken part may have held any of it. When several origins hold the same resource, the
//! first origin in order wins. Every change is passed on to the [`Assembler`] as it happens, so
//! a change costs what it touches.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    sync::Arc,
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tracing::debug;

use super::{
    assemble::Assembler,
    objects::{Invalid, Object, ResourceId},
};
use crate::model::{Snapshot, Store};

/// Why a resource was not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Where the resource came from (`file.yaml:12` for the local source).
    pub origin: String,
    /// The object's kind as written (`Pod`, `Service`...), or `unknown`.
    pub kind: String,
    /// `namespace/name` (or `name` when cluster-scoped), or `unknown`.
    pub name: String,
    /// Path of the offending field (`spec.ports[0].targetPort`).
    pub field: String,
    pub reason: String,
    /// Whether an earlier version of the same resource is still applied.
    pub kept_last_good: bool,
    /// Whether, with no earlier version, a fail-closed stand-in is in force instead (a
    /// refused AuthorizationPolicy).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed_closed: bool,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {} rejected: {}: {}",
            self.origin, self.kind, self.name, self.field, self.reason
        )?;
        if self.kept_last_good {
            f.write_str(" (the last good version stays in force)")?;
        } else if self.failed_closed {
            f.write_str(" (failing closed until fixed: a DENY denies everything its workloads receive, an ALLOW allows nothing)")?;
        }
        Ok(())
    }
}

/// What a source reports besides the snapshot itself (for `/debug/config`).
#[derive(Debug, Default)]
pub struct SourceStatus {
    rejected: ArcSwap<Vec<Rejection>>,
}

impl SourceStatus {
    pub fn rejected(&self) -> Arc<Vec<Rejection>> {
        self.rejected.load_full()
    }

    pub fn set_rejected(&self, rejected: Vec<Rejection>) {
        self.rejected.store(Arc::new(rejected));
    }
}

/// Translation results of one origin, each with where it was read (`file.yaml:12`).
pub type Results = Vec<(String, Result<Object, Invalid>)>;

/// The resources of every origin, resolved to one per resource, and the snapshot they make.
#[derive(Debug)]
pub struct Ledger<O> {
    held: HashMap<O, HashMap<ResourceId, Object>>,
    /// Origins holding each resource, in order: the first one is in force.
    owners: HashMap<ResourceId, BTreeSet<O>>,
    /// Resources an origin holds as a fail-closed stand-in ([`Invalid::fallback`]): never a
    /// last good version.
    stand_ins: HashSet<(O, ResourceId)>,
    assembler: Assembler,
}

impl<O> Default for Ledger<O> {
    fn default() -> Self {
        Self {
            held: HashMap::new(),
            owners: HashMap::new(),
            stand_ins: HashSet::new(),
            assembler: Assembler::new(),
        }
    }
}

/// What [`Ledger::apply`] did with one origin's results.
#[derive(Debug, Default)]
pub struct Applied<O> {
    pub rejected: Vec<Rejection>,
    /// Resources of the origin that an earlier origin also holds (and wins).
    pub shadowed: Vec<(ResourceId, O)>,
}

impl<O: Ord + std::hash::Hash + Clone> Ledger<O> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces what `origin` holds by its new translation `results`, keeping the last good
    /// version of every rejected resource. `unknown_name` names a rejected resource whose
    /// document does not say its name.
    pub fn apply(&mut self, origin: O, results: Results, unknown_name: &str) -> Applied<O> {
        let old = self.held.remove(&origin).unwrap_or_default();
        let old_stand_ins: HashSet<ResourceId> = old
            .keys()
            .filter(|id| self.stand_ins.remove(&(origin.clone(), (*id).clone())))
            .cloned()
            .collect();
        let mut new: HashMap<ResourceId, Object> = HashMap::with_capacity(results.len());
        let mut rejected = Vec::new();
        let mut unnamed_failure = false;
        for (at, result) in results {
            match result {
                Ok(object) => {
                    // The first definition in one origin wins, as across origins.
                    new.entry(object.id()).or_insert(object);
                }
                Err(invalid) => {
                    // A stand-in is no last good version: the refused resource's own scope
                    // and action decide the next one.
                    let last_good = invalid
                        .id
                        .as_ref()
                        .and_then(|id| {
                            old.get(id)
                                .filter(|_| !old_stand_ins.contains(id))
                                .or_else(|| self.good_in_force(id))
                        })
                        .cloned();
                    unnamed_failure |= invalid.id.is_none();
                    let kept_last_good = last_good.is_some();
                    let in_force = last_good.or(invalid.fallback);
                    rejected.push(Rejection {
                        origin: at,
                        kind: invalid.kind.unwrap_or_else(|| "unknown".into()),
                        name: invalid.name.unwrap_or_else(|| unknown_name.into()),
                        field: invalid.field,
                        reason: invalid.reason,
                        kept_last_good,
                        failed_closed: !kept_last_good && in_force.is_some(),
                    });
                    if let Some(object) = in_force {
                        if !kept_last_good {
                            self.stand_ins.insert((origin.clone(), object.id()));
                        }
                        new.entry(object.id()).or_insert(object);
                    }
                }
            }
        }
        if unnamed_failure {
            for (id, object) in &old {
                if !new.contains_key(id) {
                    debug!(resource = %id, "keeping the last good version");
                    new.insert(id.clone(), object.clone());
                    if old_stand_ins.contains(id) {
                        self.stand_ins.insert((origin.clone(), id.clone()));
                    }
                }
            }
        }

        let mut affected: Vec<ResourceId> = Vec::new();
        for id in old.keys().filter(|id| !new.contains_key(*id)) {
            if let Some(owners) = self.owners.get_mut(id) {
                owners.remove(&origin);
                if owners.is_empty() {
                    self.owners.remove(id);
                }
            }
            affected.push(id.clone());
        }
        let mut shadowed = Vec::new();
        for (id, object) in &new {
            let owners = self.owners.entry(id.clone()).or_default();
            owners.insert(origin.clone());
            let first = owners.first().cloned();
            match first {
                Some(first) if first != origin => shadowed.push((id.clone(), first)),
                _ if old.get(id) != Some(object) => affected.push(id.clone()),
                _ => {}
            }
        }
        self.held.insert(origin, new);
        for id in &affected {
            self.settle(id);
        }
        Applied { rejected, shadowed }
    }

    /// Forgets an origin (a deleted file or object); returns whether it held anything.
    pub fn remove(&mut self, origin: &O) -> bool {
        let Some(old) = self.held.remove(origin) else {
            return false;
        };
        self.stand_ins.retain(|(o, _)| o != origin);
        for id in old.keys() {
            if let Some(owners) = self.owners.get_mut(id) {
                owners.remove(origin);
                if owners.is_empty() {
                    self.owners.remove(id);
                }
            }
            self.settle(id);
        }
        true
    }

    /// Forgets every origin `keep` says no to.
    pub fn retain(&mut self, mut keep: impl FnMut(&O) -> bool) {
        let gone: Vec<O> = self.held.keys().filter(|o| !keep(o)).cloned().collect();
        for origin in gone {
            self.remove(&origin);
        }
    }

    /// The version of a resource in force.
    pub fn in_force(&self, id: &ResourceId) -> Option<&Object> {
        let first = self.owners.get(id)?.first()?;
        self.held.get(first)?.get(id)
    }

    /// The version of a resource in force, unless it is a fail-closed stand-in.
    fn good_in_force(&self, id: &ResourceId) -> Option<&Object> {
        let first = self.owners.get(id)?.first()?;
        if self.stand_ins.contains(&(first.clone(), id.clone())) {
            return None;
        }
        self.held.get(first)?.get(id)
    }

    /// How many resources are in force.
    pub fn resources(&self) -> usize {
        self.owners.len()
    }

    pub fn set_generation(&mut self, generation: Option<u64>) {
        self.assembler.set_generation(generation);
    }

    /// The snapshot of everything in force (see [`Assembler::snapshot`]).
    pub fn snapshot(&mut self) -> Snapshot {
        self.assembler.snapshot()
    }

    pub fn publish(&mut self, store: &Store) -> u64 {
        self.assembler.publish(store)
    }

    /// Hands the resource's version in force (if any) to the assembler.
    fn settle(&mut self, id: &ResourceId) {
        let first = self.owners.get(id).and_then(|o| o.first());
        match first.and_then(|o| self.held.get(o)).and_then(|h| h.get(id)) {
            Some(object) => self.assembler.upsert(object),
            None => self.assembler.delete(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        model::{Namespace, ObjectKey},
        source::objects::Kind,
    };

    fn namespace(name: &str, mesh: &str) -> Object {
        Object::Namespace(Namespace {
            name: name.into(),
            labels: [("weft.io/mesh".to_string(), mesh.to_string())].into(),
        })
    }

    fn id(name: &str) -> ResourceId {
        ResourceId {
            kind: Kind::Namespace,
            key: ObjectKey::new("", name),
        }
    }

    fn invalid(name: Option<&str>) -> Invalid {
        Invalid {
            kind: name.map(|_| "Namespace".into()),
            id: name.map(id),
            name: name.map(Into::into),
            field: "metadata.labels".into(),
            reason: "broken".into(),
            fallback: None,
        }
    }

    fn ok(object: Object) -> (String, Result<Object, Invalid>) {
        ("a.yaml:1".into(), Ok(object))
    }

    fn err(name: Option<&str>) -> (String, Result<Object, Invalid>) {
        ("a.yaml:5".into(), Err(invalid(name)))
    }

    fn mesh(ledger: &mut Ledger<u32>, name: &str) -> Option<String> {
        ledger
            .snapshot()
            .namespaces
            .get(name)
            .map(|n| n.labels["weft.io/mesh"].clone())
    }

    #[test]
    fn rejected_resource_keeps_its_last_good_version_until_fixed() {
        let mut ledger = Ledger::new();
        ledger.apply(1, vec![ok(namespace("a", "enabled"))], "unknown");
        let applied = ledger.apply(1, vec![err(Some("a"))], "unknown");
        assert_eq!(mesh(&mut ledger, "a").as_deref(), Some("enabled"));
        let rejection = &applied.rejected[0];
        assert!(rejection.kept_last_good);
        assert_eq!(
            (rejection.origin.as_str(), rejection.name.as_str()),
            ("a.yaml:5", "a")
        );

        let applied = ledger.apply(1, vec![ok(namespace("a", "disabled"))], "unknown");
        assert!(applied.rejected.is_empty());
        assert_eq!(mesh(&mut ledger, "a").as_deref(), Some("disabled"));
    }

    #[test]
    fn rejected_new_resource_is_not_applied() {
        let mut ledger = Ledger::new();
        let applied = ledger.apply(1, vec![err(Some("a"))], "unknown");
        assert!(!applied.rejected[0].kept_last_good);
        assert_eq!(mesh(&mut ledger, "a"), None);
        assert_eq!(ledger.resources(), 0);
    }

    #[test]
    fn unnamed_failure_keeps_everything_the_origin_held() {
        let mut ledger = Ledger::new();
        ledger.apply(
            1,
            vec![ok(namespace("a", "enabled")), ok(namespace("b", "enabled"))],
            "unknown",
        );
        let applied = ledger.apply(1, vec![ok(namespace("a", "disabled")), err(None)], "obj");
        assert_eq!(applied.rejected[0].name, "obj");
        assert_eq!(applied.rejected[0].kind, "unknown");
        assert_eq!(mesh(&mut ledger, "a").as_deref(), Some("disabled"));
        assert_eq!(mesh(&mut ledger, "b").as_deref(), Some("enabled"));

        // Fixed without b: b goes away.
        ledger.apply(1, vec![ok(namespace("a", "disabled"))], "unknown");
        assert_eq!(mesh(&mut ledger, "b"), None);
    }

    #[test]
    fn a_resource_moving_between_origins_keeps_its_version_in_force() {
        let mut ledger = Ledger::new();
        ledger.apply(1, vec![ok(namespace("a", "enabled"))], "unknown");
        // The resource is added, broken, to a second origin: the version in force stays.
        let applied = ledger.apply(2, vec![err(Some("a"))], "unknown");
        assert!(applied.rejected[0].kept_last_good);
        ledger.remove(&1);
        assert_eq!(mesh(&mut ledger, "a").as_deref(), Some("enabled"));
    }

    #[test]
    fn first_origin_wins_and_the_next_takes_over() {
        let mut ledger = Ledger::new();
        ledger.apply(2, vec![ok(namespace("a", "disabled"))], "unknown");
        let applied = ledger.apply(1, vec![ok(namespace("a", "enabled"))], "unknown");
        assert!(applied.shadowed.is_empty());
        let applied = ledger.apply(2, vec![ok(namespace("a", "other"))], "unknown");
        assert_eq!(applied.shadowed, [(id("a"), 1)]);
        assert_eq!(mesh(&mut ledger, "a").as_deref(), Some("enabled"));
        assert_eq!(ledger.resources(), 1);

        assert!(ledger.remove(&1));
        assert_eq!(mesh(&mut ledger, "a").as_deref(), Some("other"));
        ledger.retain(|_| false);
        assert_eq!(mesh(&mut ledger, "a"), None);
        assert!(!ledger.remove(&2));
    }

    #[test]
    fn unchanged_resources_keep_their_arc() {
        let mut ledger = Ledger::new();
        let pod = |ip: [u8; 4]| {
            Object::Pod(crate::model::Pod {
                key: ObjectKey::new("ns", "p"),
                uid: None,
                labels: Default::default(),
                annotations: Default::default(),
                node: None,
                ip: Some(ip.into()),
                service_account: "default".into(),
                ports: vec![],
                controller: None,
            })
        };
        ledger.apply(1, vec![ok(pod([10, 0, 0, 1]))], "unknown");
        let before = ledger.snapshot();
        // Translated again, equal: the snapshot keeps the same Arc.
        ledger.apply(1, vec![ok(pod([10, 0, 0, 1]))], "unknown");
        let same = ledger.snapshot();
        let key = ObjectKey::new("ns", "p");
        assert!(Arc::ptr_eq(&before.pods[&key], &same.pods[&key]));
        ledger.apply(1, vec![ok(pod([10, 0, 0, 2]))], "unknown");
        let moved = ledger.snapshot();
        assert!(!Arc::ptr_eq(&before.pods[&key], &moved.pods[&key]));
        assert_eq!(moved.pod_by_ip([10, 0, 0, 2].into()).unwrap().key, key);
        assert!(moved.pod_by_ip([10, 0, 0, 1].into()).is_none());
    }
}
