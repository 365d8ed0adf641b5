//! Keeps the maps and interface attachments in step with the model, writing only differences.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::Hash,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    Pod as BpfPod,
};
use mesh_common::dest_kind;
use tracing::{debug, info, warn};

use super::{DataPath, TcHook};
use crate::{
    agent::{route, AgentConfig},
    model::{Pod, Snapshot, CGROUP_ANNOTATION},
};

/// What the maps should hold for one snapshot.
#[derive(Debug, Default, PartialEq, Eq)]
struct Desired {
    meshed_cgroups: BTreeMap<u64, u32>,
    mesh_dests: BTreeMap<u32, u32>,
    local_meshed_pods: BTreeMap<u32, u32>,
    classifiers: BTreeSet<(TcHook, String)>,
}

pub struct Sync {
    cfg: AgentConfig,
    data_path: DataPath,
    applied: Option<Desired>,
}

fn ip_key(ip: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl Sync {
    pub fn new(cfg: AgentConfig, data_path: DataPath) -> Self {
        Self {
            cfg,
            data_path,
            applied: None,
        }
    }

    pub fn apply(&mut self, snapshot: &Snapshot, applied_version: &AtomicU64) {
        let desired = desired(&self.cfg, snapshot, route::interface_for);
        let mut current = match self.applied.take() {
            Some(current) => current,
            None => self.take_over(),
        };
        if current != desired {
            let dp = &mut self.data_path;
            let mut errors = 0;
            errors += diff(
                &mut dp.meshed_cgroups,
                &current.meshed_cgroups,
                &desired.meshed_cgroups,
            );
            errors += diff(&mut dp.mesh_dests, &current.mesh_dests, &desired.mesh_dests);
            errors += diff(
                &mut dp.local_meshed_pods,
                &current.local_meshed_pods,
                &desired.local_meshed_pods,
            );
            for (hook, iface) in desired.classifiers.difference(&current.classifiers) {
                if let Err(e) = dp.attach_tc(*hook, iface) {
                    warn!(iface, ?hook, "attaching inbound capture: {e}");
                    errors += 1;
                }
            }
            for (hook, iface) in current.classifiers.difference(&desired.classifiers) {
                dp.detach_tc(*hook, iface);
            }
            info!(
                version = snapshot.version,
                meshed_cgroups = desired.meshed_cgroups.len(),
                mesh_destinations = desired.mesh_dests.len(),
                local_meshed_pods = desired.local_meshed_pods.len(),
                classifiers = desired.classifiers.len(),
                errors,
                "eBPF maps synced"
            );
            current = desired;
            if errors > 0 {
                // Retry the failed entries on the next tick instead of recording them as applied.
                current.classifiers.clear();
                self.applied = None;
                return;
            }
        }
        self.applied = Some(current);
        applied_version.store(snapshot.version, Ordering::Release);
    }

    /// What an earlier agent left in the pinned maps: the base the first diff is taken from.
    fn take_over(&self) -> Desired {
        let dp = &self.data_path;
        Desired {
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

/// Writes the entries that changed and removes the ones that went away; returns the failures.
fn diff<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> usize
where
    K: BpfPod + Ord + Hash + std::fmt::Debug,
    V: BpfPod + PartialEq,
{
    let mut errors = 0;
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            if let Err(e) = map.insert(k, v, 0) {
                warn!(key = ?k, "map insert: {e}");
                errors += 1;
            }
        }
    }
    for k in current.keys().filter(|k| !desired.contains_key(*k)) {
        if let Err(e) = map.remove(k) {
            debug!(key = ?k, "map remove: {e}");
        }
    }
    errors
}

/// `interface_of` names the local interface a pod address is routed through.
fn desired(
    cfg: &AgentConfig,
    snapshot: &Snapshot,
    interface_of: impl Fn(std::net::Ipv4Addr) -> Option<String>,
) -> Desired {
    let mut d = Desired::default();
    for svc in snapshot.services.values() {
        if let Some(ip) = svc.cluster_ip {
            d.mesh_dests.insert(ip_key(ip), dest_kind::SERVICE);
        }
    }
    d.classifiers.extend(
        cfg.uplinks
            .iter()
            .map(|iface| (TcHook::Ingress, iface.clone())),
    );
    for pod in snapshot.pods.values() {
        let meshed = snapshot.is_meshed(pod);
        if let (true, Some(ip)) = (meshed, pod.ip) {
            d.mesh_dests.insert(ip_key(ip), dest_kind::POD);
        }
        if pod.node.as_deref() != Some(cfg.node.as_str()) {
            continue;
        }
        if let Some(ip) = pod.ip {
            if meshed {
                d.local_meshed_pods.insert(ip_key(ip), 1);
            }
            // Unmeshed local clients reach meshed pods through their own interface, so every
            // local pod interface gets the inbound classifiers.
            if let Some(iface) = interface_of(ip) {
                d.classifiers.insert((TcHook::Ingress, iface.clone()));
                d.classifiers.insert((TcHook::Egress, iface));
            }
        }
        if meshed {
            for id in pod_cgroup_ids(&cfg.cgroup_root, pod) {
                d.meshed_cgroups.insert(id, 1);
            }
        }
    }
    d
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
            }),
        );
        s.index();
        s
    }

    #[test]
    fn desired_state_follows_labels_and_node() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig {
            node: "n1".into(),
            cgroup_root: dir.path().into(),
            bpffs_root: "/nonexistent".into(),
            proxy_ip: Ipv4Addr::new(10, 244, 1, 1),
            uplinks: vec!["eth0".into()],
        };
        let d = desired(&cfg, &snapshot(dir.path()), |ip| {
            Some(format!("veth-{}", ip.octets()[3]))
        });

        let key = |a, b, c, e| ip_key(Ipv4Addr::new(a, b, c, e));
        // Service VIPs and meshed pods anywhere are mesh destinations; opted-out and unmeshed
        // pods are not.
        assert_eq!(
            d.mesh_dests,
            BTreeMap::from([
                (key(10, 96, 0, 10), dest_kind::SERVICE),
                (key(10, 244, 1, 2), dest_kind::POD),
                (key(10, 244, 2, 2), dest_kind::POD),
            ])
        );
        // Only the meshed pod of this node is captured inbound...
        assert_eq!(
            d.local_meshed_pods.keys().copied().collect::<Vec<_>>(),
            vec![key(10, 244, 1, 2)]
        );
        // ...and only its cgroup and its container cgroup are meshed.
        let pod_dir = dir.path().join("poduid-a");
        let expected: BTreeSet<u64> = [pod_dir.clone(), pod_dir.join("ctr")]
            .iter()
            .map(|p| fs::metadata(p).unwrap().ino())
            .collect();
        assert_eq!(
            d.meshed_cgroups.keys().copied().collect::<BTreeSet<_>>(),
            expected
        );
        assert!(d
            .classifiers
            .contains(&(TcHook::Ingress, "eth0".to_owned())));
        assert!(!d.classifiers.contains(&(TcHook::Egress, "eth0".to_owned())));
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
