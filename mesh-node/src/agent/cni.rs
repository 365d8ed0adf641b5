//! The node agent's side of `weft-cni` ([`crate::cni`]): the container runtime's requests, on a
//! Unix socket (`--cni-socket`) only root's processes reach.
//!
//! - `ADD`/`CHECK`: the pod's namespace and opt-out label from the current snapshot (waiting a
//!   little for a namespace or pod the Kubernetes watch has not delivered yet; a pod still
//!   unknown is meshed as its namespace is). For a meshed pod the network namespace it was given
//!   must hold the runtime's address, and the snapshot's address (if any) must be that one: a
//!   wrong pairing would send traffic under another pod's identity. Then the eBPF sync meshes
//!   it (with the runtime's address, before the pod's status has one) and the answer waits
//!   until the maps hold it.
//! - `DEL`: the enrollment is forgotten (the snapshot takes over, or removes the pod).
//! - `STATUS`: ready once the programs are attached and a configuration applied.
//!
//! The namespaces it last saw are written beside the socket (`namespaces.json`), for the
//! plugin to let pods of unmeshed namespaces through while the agent is down.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::{
    admin::Readiness,
    cni::{code, Command, Namespaces, Request, Response, NAMESPACES_FILE},
    model::{ObjectKey, Snapshot, Store},
};

/// How long a request waits for the watch to deliver the pod's namespace or pod.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// How long an enrollment may take (a sync pass).
const ENROLL_WAIT: Duration = Duration::from_secs(10);

/// A pod to mesh now, from its CNI ADD; the reply once the maps hold it.
pub struct Enrollment {
    pub key: ObjectKey,
    pub ip: Ipv4Addr,
    pub uid: Option<Arc<str>>,
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub enum Enroll {
    Add(Enrollment),
    Remove(ObjectKey),
}

pub struct CniServer {
    pub store: Store,
    pub readiness: Arc<Readiness>,
    pub enroll: mpsc::Sender<Enroll>,
    pub dir: PathBuf,
}

impl CniServer {
    /// Answers the runtime's requests on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, own_uid: u32) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == own_uid => {}
                _ => {
                    warn!("CNI request refused: not from this node's runtime user");
                    continue;
                }
            }
            tokio::spawn(self.clone().answer(stream));
        }
    }

    async fn answer(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(64 * 1024));
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
        let response = match read {
            Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
                Ok(request) => self.handle(request).await,
                Err(e) => Response::error(code::DECODE, "unreadable request", e.to_string()),
            },
            _ => return,
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        let _ = write.write_all(&out).await;
    }

    async fn handle(&self, request: Request) -> Response {
        let key = ObjectKey::new(&request.namespace, &request.pod);
        match request.command {
            Command::Status => {
                if self.readiness.check().is_ok() {
                    Response::enrolled(false)
                } else {
                    Response::error(code::NOT_AVAILABLE, "mesh-node is not ready", "")
                }
            }
            Command::Del => {
                let _ = self.enroll.send(Enroll::Remove(key)).await;
                Response::enrolled(false)
            }
            Command::Add | Command::Check => self.enroll_pod(key, &request).await,
        }
    }

    async fn enroll_pod(&self, key: ObjectKey, request: &Request) -> Response {
        let Some(&ip) = request.ips.first() else {
            return Response::error(code::INVALID_CONFIG, "no IPv4 address in prevResult", "");
        };
        let Some(snapshot) = self.wait_for(&key).await else {
            return Response::error(
                code::TRY_AGAIN_LATER,
                format!("namespace {} is not known to mesh-node yet", key.namespace),
                "",
            );
        };
        let meshed = match snapshot.pods.get(&key) {
            Some(pod) => snapshot.is_meshed(pod),
            // The watch has not delivered the pod: its labels are unknown, so its namespace
            // decides (an opted-out pod is unmeshed again once it arrives).
            None => snapshot
                .namespaces
                .get(&*key.namespace)
                .is_some_and(|n| n.mesh_enabled()),
        };
        if !meshed {
            return Response::enrolled(false);
        }
        if let Some(known) = snapshot.pods.get(&key).and_then(|p| p.ip) {
            if known != ip {
                return Response::error(
                    code::WRONG_ADDRESS,
                    format!("pod {key} has address {known}, the runtime gave {ip}"),
                    "",
                );
            }
        }
        let netns = PathBuf::from(&request.netns);
        let held = tokio::task::spawn_blocking(move || crate::sys::ipv4_addresses_in(&netns))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match held {
            Ok(addresses) if addresses.contains(&ip) => {}
            Ok(addresses) => {
                return Response::error(
                    code::WRONG_NETNS,
                    format!(
                        "network namespace {} holds {addresses:?}, not pod {key}'s address {ip}",
                        request.netns
                    ),
                    "",
                )
            }
            Err(e) => {
                return Response::error(
                    code::WRONG_NETNS,
                    format!("cannot read network namespace {}", request.netns),
                    e,
                )
            }
        }
        let (reply, answer) = oneshot::channel();
        let enrollment = Enrollment {
            key: key.clone(),
            ip,
            uid: request.uid.as_deref().map(Arc::from),
            reply,
        };
        if self.enroll.send(Enroll::Add(enrollment)).await.is_err() {
            return Response::error(code::TRY_AGAIN_LATER, "the eBPF sync is not running", "");
        }
        match tokio::time::timeout(ENROLL_WAIT, answer).await {
            Ok(Ok(Ok(()))) => {
                info!(pod = %key, %ip, "pod enrolled before its containers start");
                Response::enrolled(true)
            }
            Ok(Ok(Err(why))) => Response::error(code::TRY_AGAIN_LATER, why, ""),
            _ => Response::error(code::TRY_AGAIN_LATER, "enrolling took too long", ""),
        }
    }

    /// The current snapshot once it knows the pod's namespace (and, for a while, the pod).
    async fn wait_for(&self, key: &ObjectKey) -> Option<Arc<Snapshot>> {
        let mut snapshots = self.store.subscribe();
        let deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT;
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            let namespace = snapshot.namespaces.get(&*key.namespace);
            let has_namespace = namespace.is_some();
            // An unmeshed namespace decides alone: the pod's labels can only opt it out.
            if namespace.is_some_and(|n| !n.mesh_enabled()) || snapshot.pods.contains_key(key) {
                return Some(snapshot);
            }
            match tokio::time::timeout_at(deadline, snapshots.changed()).await {
                Ok(Ok(())) => {}
                _ => return has_namespace.then_some(snapshot),
            }
        }
    }

    /// Keeps `namespaces.json` current with every snapshot whose namespaces changed.
    pub async fn keep_namespaces(self: Arc<Self>) {
        let mut snapshots = self.store.subscribe();
        let mut written: Option<Arc<Snapshot>> = None;
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            if snapshot.version > 0
                && written
                    .as_ref()
                    .is_none_or(|w| !w.namespaces.ptr_eq(&snapshot.namespaces))
            {
                self.write_namespaces(&snapshot);
                written = Some(snapshot);
            }
            if snapshots.changed().await.is_err() {
                return;
            }
        }
    }

    /// Writes `namespaces.json` for when the agent is down.
    pub fn write_namespaces(&self, snapshot: &Snapshot) {
        let mut known = Namespaces::default();
        for (name, namespace) in &snapshot.namespaces {
            let set = if namespace.mesh_enabled() {
                &mut known.meshed
            } else {
                &mut known.unmeshed
            };
            set.insert(name.to_string());
        }
        let path = self.dir.join(NAMESPACES_FILE);
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&known)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            warn!(path = %path.display(), "cannot write the namespaces for weft-cni: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Labels, Namespace, Pod};

    use super::*;

    fn pod(ns: &str, name: &str, ip: Option<Ipv4Addr>) -> Pod {
        Pod {
            key: ObjectKey::new(ns, name),
            uid: None,
            labels: Labels::new(),
            annotations: Labels::new(),
            node: Some("n1".into()),
            ip,
            service_account: "default".into(),
            ports: vec![],
            controller: None,
        }
    }

    /// A server over a snapshot with a meshed namespace `mesh` (pod `known` at 10.1.1.1) and
    /// an unmeshed one `plain`; the eBPF sync's part is played by a task that answers every
    /// enrollment with `enrolled`.
    fn server(enrolled: Result<(), String>) -> (Arc<CniServer>, mpsc::Receiver<Ipv4Addr>) {
        let store = Store::new();
        let mut snapshot = Snapshot::default();
        for (name, meshed) in [("mesh", true), ("plain", false)] {
            let mut labels = Labels::new();
            if meshed {
                labels.insert("weft.io/mesh".into(), "enabled".into());
            }
            snapshot.namespaces.insert(
                name.into(),
                Namespace {
                    name: name.into(),
                    labels,
                },
            );
        }
        let known = pod("mesh", "known", Some(Ipv4Addr::new(10, 1, 1, 1)));
        snapshot.pods.insert(known.key.clone(), Arc::new(known));
        store.publish_indexed(snapshot);
        let (enroll, mut rx) = mpsc::channel(4);
        let (forward, seen) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                if let Enroll::Add(e) = request {
                    let _ = e.reply.send(enrolled.clone());
                    let _ = forward.send(e.ip).await;
                }
            }
        });
        let server = Arc::new(CniServer {
            store,
            readiness: Arc::new(Readiness::new(false)),
            enroll,
            dir: std::env::temp_dir(),
        });
        (server, seen)
    }

    fn request(ns: &str, name: &str, netns: &str, ip: [u8; 4]) -> Request {
        Request {
            command: Command::Add,
            container_id: "c".into(),
            netns: netns.into(),
            namespace: ns.into(),
            pod: name.into(),
            uid: None,
            ips: vec![Ipv4Addr::from(ip)],
        }
    }

    #[tokio::test]
    async fn a_meshed_pod_is_enrolled_once_its_namespace_holds_its_address() {
        let (server, mut seen) = server(Ok(()));
        // This process's namespace holds 127.0.0.1; a pod the watch has not delivered yet is
        // meshed as its namespace is.
        let answer = server
            .handle(request("mesh", "new", "/proc/self/ns/net", [127, 0, 0, 1]))
            .await;
        assert_eq!(answer, Response::enrolled(true));
        assert_eq!(seen.recv().await, Some(Ipv4Addr::LOCALHOST));
    }

    #[tokio::test]
    async fn wrong_pairings_are_refused_and_unmeshed_pods_go_through() {
        let (server, mut seen) = server(Ok(()));
        // The namespace does not hold the address.
        let answer = server
            .handle(request("mesh", "new", "/proc/self/ns/net", [10, 9, 9, 9]))
            .await;
        assert_eq!(answer.code, code::WRONG_NETNS, "{answer:?}");
        // The snapshot knows another address for the pod.
        let answer = server
            .handle(request(
                "mesh",
                "known",
                "/proc/self/ns/net",
                [127, 0, 0, 1],
            ))
            .await;
        assert_eq!(answer.code, code::WRONG_ADDRESS, "{answer:?}");
        // An unmeshed namespace: nothing to enroll, whatever the network namespace.
        let answer = server
            .handle(request("plain", "p", "/nonexistent", [10, 9, 9, 9]))
            .await;
        assert_eq!(answer, Response::enrolled(false));
        assert!(seen.try_recv().is_err(), "nothing was enrolled");
    }

    #[tokio::test]
    async fn a_pod_the_maps_do_not_hold_yet_is_tried_again_later() {
        let (server, _seen) = server(Err("the cgroup of pod mesh/new is not found yet".into()));
        let answer = server
            .handle(request("mesh", "new", "/proc/self/ns/net", [127, 0, 0, 1]))
            .await;
        assert_eq!(answer.code, code::TRY_AGAIN_LATER, "{answer:?}");
        assert!(answer.msg.contains("cgroup"), "{answer:?}");
    }
}
