//! Keeps the maps and interface attachments in step with the model, writing only differences.
//!
//! The sync keeps the snapshot the maps reflect and, per object, the entries it contributed.
//! A new snapshot is diffed against that base ([`Map::diff`](crate::model::Map) skips what the
//! two share), so only the Services, pods and namespaces that changed are looked at, and only
//! the map keys they touch are written. Local pods are looked at on every pass as well: their
//! cgroups and interfaces can appear after the pod object (the agent re-applies every second).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    hash::Hash,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    Pod as BpfPod,
};
use imbl::ordmap::DiffItem;
use mesh_common::dest_kind;
use tracing::{debug, info, warn};

use super::{DataPath, TcHook};
use crate::{
    agent::{route, AgentConfig},
    model::{ObjectKey, Pod, Service, Snapshot, CGROUP_ANNOTATION},
};

/// Values wanted for each key, counted per contributing object; the largest value wins (a
/// meshed pod's address over a Service VIP that happens to equal it).
#[derive(Debug)]
struct Counted<K, V> {
    wanted: BTreeMap<K, BTreeMap<V, u32>>,
    /// Keys whose wanted value may have changed since the last write.
    touched: BTreeSet<K>,
}

impl<K, V> Default for Counted<K, V> {
    fn default() -> Self {
        Self {
            wanted: BTreeMap::new(),
            touched: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone, V: Ord + Copy> Counted<K, V> {
    fn add(&mut self, key: K, value: V) {
        *self
            .wanted
            .entry(key.clone())
            .or_default()
            .entry(value)
            .or_default() += 1;
        self.touched.insert(key);
    }

    fn remove(&mut self, key: &K, value: V) {
        let Some(values) = self.wanted.get_mut(key) else {
            return;
        };
        if let Some(count) = values.get_mut(&value) {
            *count -= 1;
            if *count == 0 {
                values.remove(&value);
            }
        }
        if values.is_empty() {
            self.wanted.remove(key);
        }
        self.touched.insert(key.clone());
    }

    fn get(&self, key: &K) -> Option<V> {
        self.wanted
            .get(key)
            .and_then(|values| values.last_key_value())
            .map(|(v, _)| *v)
    }

    /// What the maps should hold, in full (for tests and logs).
    #[cfg(test)]
    fn effective(&self) -> BTreeMap<K, V> {
        self.wanted
            .keys()
            .filter_map(|k| self.get(k).map(|v| (k.clone(), v)))
            .collect()
    }
}

/// The map entries one pod contributes.
#[derive(Debug, Default)]
struct PodEntries {
    mesh_dest: Option<u32>,
    local_meshed: Option<u32>,
    classifiers: Vec<(TcHook, String)>,
    cgroups: Vec<u64>,
}

/// What the maps should hold for the base snapshot, kept per object.
#[derive(Debug, Default)]
struct Desired {
    meshed_cgroups: Counted<u64, u32>,
    mesh_dests: Counted<u32, u32>,
    local_meshed_pods: Counted<u32, u32>,
    classifiers: Counted<(TcHook, String), ()>,
    pods: HashMap<ObjectKey, PodEntries>,
    /// Pods of this node.
    local: BTreeSet<ObjectKey>,
    /// The addresses of ServiceEntry endpoints.
    entry_ips: BTreeSet<u32>,
}

impl Desired {
    fn new(cfg: &AgentConfig) -> Self {
        let mut d = Self::default();
        for iface in &cfg.uplinks {
            d.classifiers.add((TcHook::Ingress, iface.clone()), ());
        }
        d
    }

    /// Moves from what `old` wants to what `new` wants, looking only at what differs (and at
    /// local pods). `interface_of` names the local interface a pod address is routed through.
    fn update(
        &mut self,
        cfg: &AgentConfig,
        old: &Snapshot,
        new: &Snapshot,
        interface_of: &impl Fn(Ipv4Addr) -> Option<String>,
    ) {
        for item in old.services.diff(&new.services) {
            match item {
                DiffItem::Add(_, s) => self.service(s, true),
                DiffItem::Update {
                    old: (_, before),
                    new: (_, after),
                } => {
                    self.service(before, false);
                    self.service(after, true);
                }
                DiffItem::Remove(_, s) => self.service(s, false),
            }
        }
        let mut pods = self.local.clone();
        for item in old.pods.diff(&new.pods) {
            let key = match item {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
                DiffItem::Update { new: (k, _), .. } => k,
            };
            pods.insert(key.clone());
        }
        // A namespace joining or leaving the mesh changes all its pods.
        for item in old.namespaces.diff(&new.namespaces) {
            let namespace = match item {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
                DiffItem::Update { new: (k, _), .. } => k,
            };
            pods.extend(
                new.pods
                    .range(ObjectKey::new(namespace, "")..)
                    .take_while(|(k, _)| k.namespace == *namespace)
                    .map(|(k, _)| k.clone()),
            );
        }
        for key in pods {
            self.pod(cfg, new, &key, interface_of);
        }
        // Clients dial the addresses a ServiceEntry host resolves to: they are captured like
        // ClusterIPs. Entries are few; their addresses are recomputed whole.
        let entry_ips = entry_endpoint_ips(new);
        for ip in self.entry_ips.difference(&entry_ips) {
            self.mesh_dests.remove(ip, dest_kind::ENTRY);
        }
        for ip in entry_ips.difference(&self.entry_ips) {
            self.mesh_dests.add(*ip, dest_kind::ENTRY);
        }
        self.entry_ips = entry_ips;
    }

    fn service(&mut self, service: &Service, add: bool) {
        if let Some(ip) = service.cluster_ip {
            if add {
                self.mesh_dests.add(ip_key(ip), dest_kind::SERVICE);
            } else {
                self.mesh_dests.remove(&ip_key(ip), dest_kind::SERVICE);
            }
        }
    }

    /// Replaces what pod `key` contributes by what it contributes in `snapshot`.
    fn pod(
        &mut self,
        cfg: &AgentConfig,
        snapshot: &Snapshot,
        key: &ObjectKey,
        interface_of: &impl Fn(Ipv4Addr) -> Option<String>,
    ) {
        if let Some(old) = self.pods.remove(key) {
            if let Some(ip) = old.mesh_dest {
                self.mesh_dests.remove(&ip, dest_kind::POD);
            }
            if let Some(ip) = old.local_meshed {
                self.local_meshed_pods.remove(&ip, 1);
            }
            for c in &old.classifiers {
                self.classifiers.remove(c, ());
            }
            for id in &old.cgroups {
                self.meshed_cgroups.remove(id, 1);
            }
        }
        self.local.remove(key);
        let Some(pod) = snapshot.pods.get(key) else {
            return;
        };
        let entries = pod_entries(cfg, snapshot, pod, interface_of);
        if pod.node.as_deref() == Some(cfg.node.as_str()) {
            self.local.insert(key.clone());
        }
        if let Some(ip) = entries.mesh_dest {
            self.mesh_dests.add(ip, dest_kind::POD);
        }
        if let Some(ip) = entries.local_meshed {
            self.local_meshed_pods.add(ip, 1);
        }
        for c in &entries.classifiers {
            self.classifiers.add(c.clone(), ());
        }
        for id in &entries.cgroups {
            self.meshed_cgroups.add(*id, 1);
        }
        self.pods.insert(key.clone(), entries);
    }
}

/// `snapshot` with the enrolled pods it has no address for, or does not have yet (a pod of
/// node `node` whose labels are not known: meshed as its namespace is). Enrollments the
/// snapshot has caught up with (the same address) are dropped.
fn with_enrolled(
    enrolled: &mut BTreeMap<ObjectKey, (Ipv4Addr, Option<Arc<str>>)>,
    node: &str,
    snapshot: &Arc<Snapshot>,
) -> Arc<Snapshot> {
    enrolled.retain(|key, (ip, _)| snapshot.pods.get(key).is_none_or(|p| p.ip != Some(*ip)));
    let missing: Vec<_> = enrolled
        .iter()
        .filter(|(key, _)| snapshot.pods.get(*key).is_none_or(|p| p.ip.is_none()))
        .collect();
    if missing.is_empty() {
        return snapshot.clone();
    }
    let mut patched = (**snapshot).clone();
    for (key, (ip, uid)) in missing {
        let mut pod = match snapshot.pods.get(key) {
            Some(known) => (**known).clone(),
            None => Pod {
                key: key.clone(),
                uid: uid.clone(),
                labels: Default::default(),
                annotations: Default::default(),
                node: Some(node.into()),
                ip: None,
                service_account: "default".into(),
                ports: Vec::new(),
                controller: None,
            },
        };
        pod.ip = Some(*ip);
        patched.pods.insert(key.clone(), Arc::new(pod));
        patched.pods_by_ip.insert(*ip, key.clone());
    }
    Arc::new(patched)
}

/// The addresses and endpoint addresses of every ServiceEntry host.
fn entry_endpoint_ips(snapshot: &Snapshot) -> BTreeSet<u32> {
    let mut ips = BTreeSet::new();
    for entry in snapshot.service_entries.values() {
        for host in entry.hosts.iter() {
            let key = ObjectKey::new(&entry.key.namespace, host);
            let Some(own) = snapshot.services.get(&key).and_then(|s| s.entry.as_ref()) else {
                continue;
            };
            ips.extend(own.addresses.iter().map(|ip| ip_key(*ip)));
            if let Some(endpoints) = snapshot.endpoints.get(&key) {
                ips.extend(endpoints.by_port.values().flatten().map(|e| ip_key(e.ip)));
            }
        }
    }
    ips
}

fn pod_entries(
    cfg: &AgentConfig,
    snapshot: &Snapshot,
    pod: &Pod,
    interface_of: &impl Fn(Ipv4Addr) -> Option<String>,
) -> PodEntries {
    let mut e = PodEntries::default();
    let meshed = snapshot.is_meshed(pod);
    if let (true, Some(ip)) = (meshed, pod.ip) {
        e.mesh_dest = Some(ip_key(ip));
    }
    if pod.node.as_deref() != Some(cfg.node.as_str()) {
        return e;
    }
    if let Some(ip) = pod.ip {
        if meshed {
            e.local_meshed = Some(ip_key(ip));
        }
        // Unmeshed local clients reach meshed pods through their own interface, so every
        // local pod interface gets the inbound classifiers.
        if let Some(iface) = interface_of(ip) {
            e.classifiers.push((TcHook::Ingress, iface.clone()));
            e.classifiers.push((TcHook::Egress, iface));
        }
    }
    if meshed {
        e.cgroups = pod_cgroup_ids(&cfg.cgroup_root, pod);
    }
    e
}

/// What the maps and attachments hold, as this sync wrote them (or found them pinned).
#[derive(Debug, Default)]
struct Written {
    meshed_cgroups: BTreeMap<u64, u32>,
    mesh_dests: BTreeMap<u32, u32>,
    local_meshed_pods: BTreeMap<u32, u32>,
    classifiers: BTreeSet<(TcHook, String)>,
}

pub struct Sync {
    cfg: AgentConfig,
    data_path: DataPath,
    /// The snapshot the maps reflect; `None` before the first pass and after a failed write,
    /// when the next pass starts over from what the pinned maps hold.
    base: Option<Arc<Snapshot>>,
    desired: Desired,
    written: Written,
    /// Pods the container runtime enrolled (`weft-cni ADD`) with the address it gave them,
    /// before the Kubernetes API has that address (kubelet writes it into the pod's status
    /// only once the network is set up): meshed with it until the snapshot has one.
    enrolled: BTreeMap<ObjectKey, (Ipv4Addr, Option<Arc<str>>)>,
}

fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl Sync {
    pub fn new(cfg: AgentConfig, data_path: DataPath) -> Self {
        Self {
            cfg,
            data_path,
            base: None,
            desired: Desired::default(),
            written: Written::default(),
            enrolled: BTreeMap::new(),
        }
    }

    /// Meshes pod `key` with address `ip` from now on, whatever the snapshot says of its
    /// address (until it says one).
    pub fn enroll(&mut self, key: ObjectKey, ip: Ipv4Addr, uid: Option<Arc<str>>) {
        self.enrolled.insert(key, (ip, uid));
    }

    pub fn forget(&mut self, key: &ObjectKey) {
        self.enrolled.remove(key);
    }

    /// Whether the maps mesh pod `key` (as the last pass wrote them): its address steered to
    /// the proxy, and its cgroup captured.
    pub fn enrolled(&self, key: &ObjectKey) -> Result<(), String> {
        let Some(entries) = self.desired.pods.get(key) else {
            return Err(format!("pod {key} is not in the maps yet"));
        };
        if entries.local_meshed.is_none() {
            return Err(format!("pod {key} has no address in the maps yet"));
        }
        if entries.cgroups.is_empty() {
            return Err(format!("the cgroup of pod {key} is not found yet"));
        }
        if self.base.is_none() {
            return Err("the last write to the maps failed".into());
        }
        Ok(())
    }

    pub fn apply(&mut self, snapshot: &Arc<Snapshot>, applied_version: &AtomicU64) {
        let snapshot = &with_enrolled(&mut self.enrolled, &self.cfg.node, snapshot);
        let (base, from_scratch) = match self.base.take() {
            Some(base) => (base, false),
            None => {
                self.written = self.take_over();
                self.desired = Desired::new(&self.cfg);
                (Arc::new(Snapshot::default()), true)
            }
        };
        if !Arc::ptr_eq(&base, snapshot) || !self.desired.local.is_empty() {
            self.desired
                .update(&self.cfg, &base, snapshot, &route::interface_for);
        }

        let dp = &mut self.data_path;
        let (d, w) = (&mut self.desired, &mut self.written);
        let mut writes = Writes::default();
        write(
            &mut dp.meshed_cgroups,
            &mut w.meshed_cgroups,
            &mut d.meshed_cgroups,
            from_scratch,
            &mut writes,
        );
        write(
            &mut dp.mesh_dests,
            &mut w.mesh_dests,
            &mut d.mesh_dests,
            from_scratch,
            &mut writes,
        );
        write(
            &mut dp.local_meshed_pods,
            &mut w.local_meshed_pods,
            &mut d.local_meshed_pods,
            from_scratch,
            &mut writes,
        );
        let mut hooks = std::mem::take(&mut d.classifiers.touched);
        if from_scratch {
            hooks.extend(w.classifiers.iter().cloned());
        }
        for hook in hooks {
            let wanted = d.classifiers.get(&hook).is_some();
            let (tc, iface) = &hook;
            if wanted && !w.classifiers.contains(&hook) {
                match dp.attach_tc(*tc, iface) {
                    Ok(()) => {
                        w.classifiers.insert(hook);
                        writes.changed += 1;
                    }
                    Err(e) => {
                        warn!(iface, hook = ?tc, "attaching inbound capture: {e}");
                        writes.errors += 1;
                    }
                }
            } else if !wanted && w.classifiers.remove(&hook) {
                dp.detach_tc(*tc, iface);
                writes.changed += 1;
            }
        }
        if writes.changed > 0 || writes.errors > 0 {
            info!(
                version = snapshot.version,
                changed = writes.changed,
                meshed_cgroups = w.meshed_cgroups.len(),
                mesh_destinations = w.mesh_dests.len(),
                local_meshed_pods = w.local_meshed_pods.len(),
                classifiers = w.classifiers.len(),
                errors = writes.errors,
                "eBPF maps synced"
            );
        }
        if writes.errors > 0 {
            // Start over from the pinned maps on the next tick instead of recording the failed
            // entries as applied.
            return;
        }
        self.base = Some(snapshot.clone());
        applied_version.store(snapshot.version, Ordering::Release);
    }

    /// What an earlier agent left in the pinned maps: the base the first diff is taken from.
    fn take_over(&self) -> Written {
        let dp = &self.data_path;
        Written {
            meshed_cgroups: entries(&dp.meshed_cgroups),
            mesh_dests: entries(&dp.mesh_dests),
            local_meshed_pods: entries(&dp.local_meshed_pods),
            classifiers: dp.pinned_tc().into_iter().collect(),
        }
    }
}

fn entries<K: BpfPod + Ord, V: BpfPod>(map: &BpfHashMap<MapData, K, V>) -> BTreeMap<K, V> {
    map.iter().filter_map(Result::ok).collect()
}

#[derive(Default)]
struct Writes {
    changed: usize,
    errors: usize,
}

/// Writes the keys whose wanted value changed (every key when `all`) and removes the ones no
/// longer wanted.
fn write<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    written: &mut BTreeMap<K, V>,
    desired: &mut Counted<K, V>,
    all: bool,
    writes: &mut Writes,
) where
    K: BpfPod + Ord + Hash + std::fmt::Debug,
    V: BpfPod + Ord + Copy,
{
    let mut keys = std::mem::take(&mut desired.touched);
    if all {
        keys.extend(written.keys().copied());
    }
    for k in keys {
        match (desired.get(&k), written.get(&k).copied()) {
            (Some(v), current) if current != Some(v) => match map.insert(k, v, 0) {
                Ok(()) => {
                    written.insert(k, v);
                    writes.changed += 1;
                }
                Err(e) => {
                    warn!(key = ?k, "map insert: {e}");
                    writes.errors += 1;
                }
            },
            (None, Some(_)) => {
                if let Err(e) = map.remove(&k) {
                    debug!(key = ?k, "map remove: {e}");
                }
                written.remove(&k);
                writes.changed += 1;
            }
            _ => {}
        }
    }
}

/// cgroup ids of the pod's cgroup and every cgroup below it (containers).
fn pod_cgroup_ids(root: &Path, pod: &Pod) -> Vec<u64> {
    let Some(dir) = pod_cgroup_dir(root, pod) else {
        debug!(pod = %pod.key, "pod cgroup not found yet");
        return Vec::new();
    };
    let mut ids = Vec::new();
    let mut stack = vec![dir];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        // On cgroup v2 the cgroup id is the inode number of its directory.
        ids.push(meta.ino());
        stack.extend(
            fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    ids
}

/// The pod's cgroup: the path the virtual cluster annotates, or the directory named after the
/// pod UID below the node's subtree (kubelet's `pod<uid>` layout, `-` or `_` separated).
fn pod_cgroup_dir(root: &Path, pod: &Pod) -> Option<PathBuf> {
    if let Some(path) = pod.annotations.get(CGROUP_ANNOTATION) {
        let path = PathBuf::from(path);
        return path.is_dir().then_some(path);
    }
    let uid = pod.uid.as_deref()?;
    let underscored = uid.replace('-', "_");
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.contains(uid) || name.contains(&underscored) {
                return Some(entry.path());
            }
            if depth < 4 {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use super::*;
    use crate::model::{Labels, Namespace, ObjectKey, Service};

    fn pod(ns: &str, name: &str, node: &str, ip: [u8; 4], labels: &[(&str, &str)]) -> Pod {
        Pod {
            key: ObjectKey::new(ns, name),
            uid: Some(format!("uid-{name}").into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Labels::new(),
            node: Some(node.into()),
            ip: Some(Ipv4Addr::from(ip)),
            service_account: "default".into(),
            ports: vec![],
            controller: None,
        }
    }

    fn snapshot(cgroups: &Path) -> Snapshot {
        let mut s = Snapshot::default();
        for (ns, enabled) in [("mesh", true), ("plain", false)] {
            let mut labels = Labels::new();
            if enabled {
                labels.insert("weft.io/mesh".into(), "enabled".into());
            }
            s.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels,
                },
            );
        }
        let pods = [
            pod("mesh", "a", "n1", [10, 244, 1, 2], &[]),
            pod("mesh", "b", "n2", [10, 244, 2, 2], &[]),
            pod(
                "mesh",
                "out",
                "n1",
                [10, 244, 1, 3],
                &[("weft.io/mesh", "disabled")],
            ),
            pod("plain", "c", "n1", [10, 244, 1, 4], &[]),
        ];
        for p in pods {
            fs::create_dir_all(
                cgroups
                    .join(format!("pod{}", p.uid.as_deref().unwrap()))
                    .join("ctr"),
            )
            .unwrap();
            s.pods.insert(p.key.clone(), Arc::new(p));
        }
        s.services.insert(
            ObjectKey::new("mesh", "svc"),
            Arc::new(Service {
                key: ObjectKey::new("mesh", "svc"),
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
                ports: vec![],
                selector: None,
                entry: None,
            }),
        );
        s.index();
        s
    }

    /// A pod the runtime enrolled before the API has its address (or the pod at all) is
    /// meshed with the runtime's address; once the snapshot has it, the snapshot decides.
    #[test]
    fn an_enrolled_pod_is_meshed_before_its_status_has_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let mut base = snapshot(dir.path());
        // Known without an address (kubelet has not written it), and not known at all.
        let mut pending = pod("mesh", "new", "n1", [0, 0, 0, 0], &[]);
        pending.ip = None;
        fs::create_dir_all(dir.path().join("poduid-new")).unwrap();
        base.pods.insert(pending.key.clone(), Arc::new(pending));
        fs::create_dir_all(dir.path().join("poduid-unseen")).unwrap();
        let base = Arc::new(base);
        let mut enrolled = BTreeMap::from([
            (
                ObjectKey::new("mesh", "new"),
                (Ipv4Addr::new(10, 244, 1, 9), None),
            ),
            (
                ObjectKey::new("mesh", "unseen"),
                (Ipv4Addr::new(10, 244, 1, 10), Some(Arc::from("uid-unseen"))),
            ),
        ]);
        let patched = with_enrolled(&mut enrolled, "n1", &base);
        let d = from_scratch(&cfg, &patched);
        let local = d.local_meshed_pods.effective();
        for ip in [[10, 244, 1, 9], [10, 244, 1, 10]] {
            assert!(
                local.contains_key(&ip_key(Ipv4Addr::from(ip))),
                "{ip:?}: {local:?}"
            );
        }
        assert!(!d.pods[&ObjectKey::new("mesh", "unseen")].cgroups.is_empty());
        // The snapshot catches up with the same address: the enrollment is done with.
        let mut caught_up = (*patched).clone();
        caught_up.pods.remove(&ObjectKey::new("mesh", "unseen"));
        let caught_up = Arc::new(caught_up);
        with_enrolled(&mut enrolled, "n1", &caught_up);
        assert_eq!(
            enrolled.len(),
            1,
            "only the one the snapshot lacks stays: {enrolled:?}"
        );
        // Untouched when nothing is enrolled.
        enrolled.clear();
        assert!(Arc::ptr_eq(
            &with_enrolled(&mut enrolled, "n1", &base),
            &base
        ));
    }

    #[test]
    fn desired_state_follows_labels_and_node() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let d = from_scratch(&cfg, &snapshot(dir.path()));

        let key = |a, b, c, e| ip_key(Ipv4Addr::new(a, b, c, e));
        // Service VIPs and meshed pods anywhere are mesh destinations; opted-out and unmeshed
        // pods are not.
        assert_eq!(
            d.mesh_dests.effective(),
            BTreeMap::from([
                (key(10, 96, 0, 10), dest_kind::SERVICE),
                (key(10, 244, 1, 2), dest_kind::POD),
                (key(10, 244, 2, 2), dest_kind::POD),
            ])
        );
        // Only the meshed pod of this node is captured inbound...
        assert_eq!(
            d.local_meshed_pods
                .effective()
                .into_keys()
                .collect::<Vec<_>>(),
            vec![key(10, 244, 1, 2)]
        );
        // ...and only its cgroup and its container cgroup are meshed.
        let pod_dir = dir.path().join("poduid-a");
        let expected: BTreeSet<u64> = [pod_dir.clone(), pod_dir.join("ctr")]
            .iter()
            .map(|p| fs::metadata(p).unwrap().ino())
            .collect();
        assert_eq!(
            d.meshed_cgroups
                .effective()
                .into_keys()
                .collect::<BTreeSet<_>>(),
            expected
        );
        let classifiers = d.classifiers.effective();
        assert!(classifiers.contains_key(&(TcHook::Ingress, "eth0".to_owned())));
        assert!(!classifiers.contains_key(&(TcHook::Egress, "eth0".to_owned())));
        assert!(classifiers.contains_key(&(TcHook::Egress, "veth-2".to_owned())));
    }

    fn config(cgroups: &Path) -> AgentConfig {
        AgentConfig {
            node: "n1".into(),
            cgroup_root: cgroups.into(),
            bpffs_root: "/nonexistent".into(),
            proxy_ip: Ipv4Addr::new(10, 244, 1, 1),
            uplinks: vec!["eth0".into()],
        }
    }

    fn veth(ip: Ipv4Addr) -> Option<String> {
        Some(format!("veth-{}", ip.octets()[3]))
    }

    fn from_scratch(cfg: &AgentConfig, snapshot: &Snapshot) -> Desired {
        let mut d = Desired::new(cfg);
        d.update(cfg, &Snapshot::default(), snapshot, &veth);
        d
    }

    type Effective = (
        BTreeMap<u64, u32>,
        BTreeMap<u32, u32>,
        BTreeMap<u32, u32>,
        BTreeMap<(TcHook, String), ()>,
    );

    fn effective(d: &Desired) -> Effective {
        (
            d.meshed_cgroups.effective(),
            d.mesh_dests.effective(),
            d.local_meshed_pods.effective(),
            d.classifiers.effective(),
        )
    }

    #[test]
    fn changes_applied_one_by_one_give_the_state_computed_from_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let first = snapshot(dir.path());
        let mut d = from_scratch(&cfg, &first);

        // The plain namespace joins the mesh, a local meshed pod goes away, a remote pod
        // moves, the Service changes its VIP and a second Service shares a pod's address.
        let mut next = first.clone();
        next.namespaces.insert(
            "plain".into(),
            Namespace {
                name: "plain".into(),
                labels: [("weft.io/mesh".to_string(), "enabled".to_string())].into(),
            },
        );
        next.pods.remove(&ObjectKey::new("mesh", "a"));
        next.pods.insert(
            ObjectKey::new("mesh", "b"),
            Arc::new(pod("mesh", "b", "n2", [10, 244, 2, 9], &[])),
        );
        let svc = |name: &str, ip: [u8; 4]| {
            Arc::new(Service {
                key: ObjectKey::new("mesh", name),
                cluster_ip: Some(Ipv4Addr::from(ip)),
                ports: vec![],
                selector: None,
                entry: None,
            })
        };
        next.services
            .insert(ObjectKey::new("mesh", "svc"), svc("svc", [10, 96, 0, 11]));
        next.services
            .insert(ObjectKey::new("mesh", "odd"), svc("odd", [10, 244, 2, 9]));
        d.update(&cfg, &first, &next, &veth);
        assert_eq!(effective(&d), effective(&from_scratch(&cfg, &next)));
        let key = ip_key(Ipv4Addr::new(10, 244, 2, 9));
        assert_eq!(d.mesh_dests.get(&key), Some(dest_kind::POD));
        assert!(d
            .mesh_dests
            .get(&ip_key(Ipv4Addr::new(10, 96, 0, 10)))
            .is_none());

        // And back: the pod moves away, the address is the Service's alone.
        let mut last = next.clone();
        last.pods.remove(&ObjectKey::new("mesh", "b"));
        d.update(&cfg, &next, &last, &veth);
        assert_eq!(effective(&d), effective(&from_scratch(&cfg, &last)));
        assert_eq!(d.mesh_dests.get(&key), Some(dest_kind::SERVICE));
    }

    #[test]
    fn annotation_names_the_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pod("mesh", "a", "n1", [10, 244, 1, 2], &[]);
        let explicit = dir.path().join("pods").join("mesh_a");
        fs::create_dir_all(&explicit).unwrap();
        p.annotations
            .insert(CGROUP_ANNOTATION.into(), explicit.display().to_string());
        assert_eq!(pod_cgroup_dir(dir.path(), &p), Some(explicit));
        p.annotations.insert(
            CGROUP_ANNOTATION.into(),
            dir.path().join("missing").display().to_string(),
        );
        assert_eq!(pod_cgroup_dir(dir.path(), &p), None);
    }
}
