//! What each client address (a pod, or a client outside the mesh) holds of the node proxy:
//! its open connections and its HTTP requests in flight, each capped, so one pod cannot take
//! the proxy every pod of its node depends on. A connection over the cap is closed as soon as
//! it is accepted; a request over the cap is answered `503` with flag `UO`. Both are counted
//! in `weft_source_limit_refused_total{limit}`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tracing::debug;

use crate::metrics::{SourceLimit, SourceRefusals};

/// The caps, per client address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// HTTP requests in flight at once, over all its connections.
    pub max_requests: usize,
}

impl Default for SourceLimits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_requests: 4_096,
        }
    }
}

/// Every client address with something open.
#[derive(Debug)]
pub(super) struct Sources {
    limits: SourceLimits,
    table: Mutex<HashMap<IpAddr, Arc<Held>>>,
    refused: SourceRefusals,
}

/// What one address holds.
#[derive(Debug, Default)]
struct Held {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

impl Sources {
    pub(super) fn new(limits: SourceLimits, refused: SourceRefusals) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::default(),
            refused,
        })
    }

    /// Admits one more connection from `ip`, or `None` (counted) when it holds its cap.
    pub(super) fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<SourceConnection> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let held = table.entry(ip).or_default().clone();
        if held.connections.load(Ordering::Relaxed) >= self.limits.max_connections {
            drop(table);
            self.refused.inc(SourceLimit::Connections);
            debug!(%ip, limit = self.limits.max_connections, "connection refused: the source holds its cap");
            return None;
        }
        held.connections.fetch_add(1, Ordering::Relaxed);
        Some(SourceConnection {
            sources: self.clone(),
            ip,
            held,
        })
    }

    /// Forgets `ip` once it holds nothing.
    fn release(&self, ip: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = table.get(&ip) {
            if held.connections.load(Ordering::Relaxed) == 0
                && held.requests.load(Ordering::Relaxed) == 0
            {
                table.remove(&ip);
            }
        }
    }

    /// Addresses with something open (for tests and diagnostics).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

/// One open connection of a client address; its requests are counted through it.
#[derive(Debug)]
pub(super) struct SourceConnection {
    sources: Arc<Sources>,
    ip: IpAddr,
    held: Arc<Held>,
}

impl SourceConnection {
    /// Admits one more request in flight, or `None` (counted) when the address holds its cap.
    pub(super) fn request(&self) -> Option<SourceRequest> {
        let max = self.sources.limits.max_requests;
        let admitted = self
            .held
            .requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.sources.refused.inc(SourceLimit::Requests);
            debug!(ip = %self.ip, limit = max, "request refused: the source holds its cap");
            return None;
        }
        Some(SourceRequest {
            sources: self.sources.clone(),
            ip: self.ip,
            held: self.held.clone(),
        })
    }
}

impl Drop for SourceConnection {
    fn drop(&mut self) {
        if self.held.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.sources.release(self.ip);
        }
    }
}

/// One request in flight of a client address.
#[derive(Debug)]
pub(super) struct SourceRequest {
    sources: Arc<Sources>,
    ip: IpAddr,
    held: Arc<Held>,
}

impl Drop for SourceRequest {
    fn drop(&mut self) {
        if self.held.requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.sources.release(self.ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_address_and_release_with_the_guards() {
        let refused = SourceRefusals::default();
        let sources = Sources::new(
            SourceLimits {
                max_connections: 2,
                max_requests: 3,
            },
            refused.clone(),
        );
        let a: IpAddr = "10.244.1.5".parse().unwrap();
        let b: IpAddr = "10.244.1.6".parse().unwrap();
        let first = sources.connect(a).unwrap();
        let second = sources.connect(a).unwrap();
        assert!(sources.connect(a).is_none(), "a third connection from a");
        // Another pod is not held back by the first.
        let other = sources.connect(b).unwrap();
        assert_eq!(refused.get(SourceLimit::Connections), 1);

        // Requests count over all of a's connections.
        let requests: Vec<_> = [&first, &second, &first]
            .iter()
            .map(|c| c.request().unwrap())
            .collect();
        assert!(second.request().is_none());
        assert!(other.request().is_some(), "b has its own budget");
        assert_eq!(refused.get(SourceLimit::Requests), 1);
        drop(requests);
        assert!(first.request().is_some());

        drop((first, second));
        assert!(sources.connect(a).is_some());
        drop(other);
        assert_eq!(
            sources.len(),
            0,
            "nothing is kept for addresses that hold nothing"
        );
    }
}
