//! Kubernetes Events on rejected resources, so `kubectl describe` shows why Weft ignored one.
//!
//! Every node watches the same Services and mesh resources and rejects them alike; if each
//! emitted the Event, a 1,000-node cluster would write 1,000 of them per mistake. So one node
//! speaks for the cluster: the one that wins a rendezvous hash of the resource's UID over the
//! known node names (every node computes the same winner). Pods are reported by the node they
//! run on, the only one that reads them in full.

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::debug;

use super::Slot;
use crate::source::ledger::Rejection;

/// `reason` of the Events (machine-readable; the note says what is wrong).
pub const REASON: &str = "Rejected";
/// `reportingController` of the Events.
pub const CONTROLLER: &str = "weft.io/mesh-node";
/// The API limits an Event's note to 1 KiB.
const NOTE_LIMIT: usize = 1024;

pub(super) struct Emitter {
    recorder: Recorder,
    node: String,
}

impl Emitter {
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance: Some(node.into()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            node: node.into(),
        }
    }

    /// Whether this node reports rejections of `reference`.
    pub fn responsible<'a>(
        &self,
        slot: Slot,
        reference: &ObjectReference,
        nodes: impl Iterator<Item = &'a str> + Clone,
    ) -> bool {
        match slot {
            Slot::LocalPods => true,
            Slot::RemotePods => false,
            _ => {
                let id = reference
                    .uid
                    .as_deref()
                    .or(reference.name.as_deref())
                    .unwrap_or_default();
                // Before the Nodes are listed, or if this node's object is unknown, nobody
                // else is sure to speak: this node does.
                if !nodes.clone().any(|n| n == self.node) {
                    return true;
                }
                winner(id, nodes) == Some(self.node.as_str())
            }
        }
    }

    /// Posts a Warning Event on the resource, in the background (the API server may be slow
    /// or away; the rejection is logged either way).
    pub fn rejected(&self, reference: &ObjectReference, rejection: &Rejection) {
        let mut note = format!("{}: {}", rejection.field, rejection.reason);
        if rejection.kept_last_good {
            note.push_str(" (the last good version stays in force)");
        } else if rejection.failed_closed {
            note.push_str(" (failing closed until fixed)");
        }
        if note.len() > NOTE_LIMIT {
            let mut end = NOTE_LIMIT - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let event = Event {
            type_: EventType::Warning,
            reason: REASON.into(),
            note: Some(note),
            action: "Translate".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let reference = reference.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                debug!(%error, resource = ?reference.name, "cannot post the rejection Event");
            }
        });
    }
}

/// Rendezvous (highest random weight) hashing: the node with the highest hash of
/// `(node, id)`.
fn winner<'a>(id: &str, nodes: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    nodes.max_by_key(|node| {
        let mut h = DefaultHasher::new();
        node.hash(&mut h);
        id.hash(&mut h);
        (h.finish(), *node)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_winner_per_resource_spread_over_nodes() {
        let nodes = ["n1", "n2", "n3", "n4"];
        let mut wins = std::collections::HashMap::new();
        for i in 0..400 {
            let id = format!("uid-{i}");
            let a = winner(&id, nodes.iter().copied()).unwrap();
            // Independent of the order nodes are listed in.
            let b = winner(&id, nodes.iter().rev().copied()).unwrap();
            assert_eq!(a, b);
            *wins.entry(a).or_insert(0) += 1;
        }
        assert_eq!(wins.len(), 4, "{wins:?}");
        assert!(wins.values().all(|w| *w > 50), "{wins:?}");
        assert_eq!(winner("x", std::iter::empty()), None);
    }
}
