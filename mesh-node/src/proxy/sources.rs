//! What each client address (a pod, or a client outside the mesh) holds of the node proxy:
//! its open connections and its HTTP requests in flight, each capped, so one pod cannot take
//! the proxy every pod of its node depends on. A connection over the cap is closed as soon as
//! it is accepted; a request over the cap is answered `503` with flag `UO`. Both are counted
//! in `weft_source_limit_refused_total{limit}`. The [`Overload`] manager refuses through the
//! same doors: everyone's new connections and requests when memory is critical, and those of
//! the heaviest addresses while it sheds load (`503` with flag `OM`, counted in
//! `weft_overload_refused_total`); at the critical level the connections of those addresses are
//! cut, busy or not ([`SourceConnection::cut_signal`]). Behind a node proxy's HBONE port each
//! stream counts for the pod it comes from, not for the peer node's address.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::{futures::OwnedNotified, Notify};
use tracing::{debug, warn};

use super::overload::Overload;
use crate::metrics::{OverloadRefusal, SourceLimit, SourceRefusals};

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
pub(crate) struct Sources {
    limits: SourceLimits,
    table: Mutex<HashMap<IpAddr, Arc<Held>>>,
    refused: SourceRefusals,
    overload: Arc<Overload>,
}

/// What one address holds.
#[derive(Debug, Default)]
struct Held {
    connections: AtomicUsize,
    requests: AtomicUsize,
    /// Refused anything new by the overload manager.
    shed: AtomicBool,
    /// Told when the overload manager cuts the address's connections.
    cut: Arc<Notify>,
}

impl Held {
    /// How much of the proxy the address holds, to find the heaviest: a request in flight
    /// holds buffers on both sides, an open connection at least its own.
    fn weight(&self) -> usize {
        self.connections.load(Ordering::Relaxed) + 4 * self.requests.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.connections.load(Ordering::Relaxed) == 0
            && self.requests.load(Ordering::Relaxed) == 0
            && !self.shed.load(Ordering::Relaxed)
    }
}

/// Why something new was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The client address holds its cap (`UO`).
    Cap,
    /// The overload manager sheds load (`OM`).
    Overload,
}

impl Sources {
    pub(super) fn new(
        limits: SourceLimits,
        refused: SourceRefusals,
        overload: Arc<Overload>,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::default(),
            refused,
            overload,
        })
    }

    pub(super) fn overload(&self) -> &Arc<Overload> {
        &self.overload
    }

    /// Admits one more connection from `ip`, or says (and counts) why not.
    pub(super) fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<SourceConnection, Refused> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let held = table.entry(ip).or_default().clone();
        if self.overload.refuses(&held.shed) {
            drop(table);
            self.release(ip);
            self.overload
                .metrics()
                .refused(OverloadRefusal::Connections);
            debug!(%ip, "connection refused: the proxy sheds load");
            return Err(Refused::Overload);
        }
        if held.connections.load(Ordering::Relaxed) >= self.limits.max_connections {
            drop(table);
            self.refused.inc(SourceLimit::Connections);
            debug!(%ip, limit = self.limits.max_connections, "connection refused: the source holds its cap");
            return Err(Refused::Cap);
        }
        held.connections.fetch_add(1, Ordering::Relaxed);
        Ok(SourceConnection {
            sources: self.clone(),
            ip,
            held,
        })
    }

    /// Refuses anything new from the heaviest address not refused yet; whether there was one.
    pub(super) fn shed_heaviest(&self) -> bool {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some((ip, held)) = table
            .iter()
            .filter(|(_, held)| !held.shed.load(Ordering::Relaxed))
            .max_by_key(|(_, held)| held.weight())
            .map(|(ip, held)| (*ip, held.clone()))
        else {
            return false;
        };
        held.shed.store(true, Ordering::Relaxed);
        drop(table);
        warn!(
            %ip,
            connections = held.connections.load(Ordering::Relaxed),
            requests = held.requests.load(Ordering::Relaxed),
            "overload: refusing new connections and requests from the heaviest client"
        );
        true
    }

    /// Cuts every connection of the addresses refused so far (the critical level).
    pub(super) fn cut_shed(&self) {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for held in table.values().filter(|h| h.shed.load(Ordering::Relaxed)) {
            held.cut.notify_waiters();
        }
    }

    /// Takes new connections and requests from every address again.
    pub(super) fn forgive(&self) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for held in table.values() {
            held.shed.store(false, Ordering::Relaxed);
        }
        table.retain(|_, held| !held.is_empty());
    }

    /// Forgets `ip` once it holds nothing (and is not refused by the overload manager).
    fn release(&self, ip: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.get(&ip).is_some_and(|held| held.is_empty()) {
            table.remove(&ip);
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
    /// Completes when the overload manager cuts this address's connections: whoever serves
    /// the connection then drops it.
    pub(super) fn cut_signal(&self) -> OwnedNotified {
        self.held.cut.clone().notified_owned()
    }

    /// Admits one more request in flight, or says (and counts) why not.
    pub(super) fn request(&self) -> Result<SourceRequest, Refused> {
        let overload = &self.sources.overload;
        if overload.refuses(&self.held.shed) {
            overload.metrics().refused(OverloadRefusal::Requests);
            debug!(ip = %self.ip, "request refused: the proxy sheds load");
            return Err(Refused::Overload);
        }
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
            return Err(Refused::Cap);
        }
        Ok(SourceRequest {
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
    use crate::{metrics::OverloadMetrics, proxy::overload::Level};

    #[tokio::test]
    async fn the_overload_manager_refuses_the_heaviest_address_then_everyone() {
        let overload = Overload::new(OverloadMetrics::default());
        let sources = Sources::new(
            SourceLimits::default(),
            SourceRefusals::default(),
            overload.clone(),
        );
        let heavy: IpAddr = "10.244.1.5".parse().unwrap();
        let light: IpAddr = "10.244.1.6".parse().unwrap();
        let heavy_conns: Vec<_> = (0..6).map(|_| sources.connect(heavy).unwrap()).collect();
        let light_conn = sources.connect(light).unwrap();
        let _request = light_conn.request().unwrap();

        overload.force(Level::Shedding);
        assert!(sources.shed_heaviest());
        assert_eq!(sources.connect(heavy).err(), Some(Refused::Overload));
        assert_eq!(heavy_conns[0].request().err(), Some(Refused::Overload));
        assert!(
            sources.connect(light).is_ok(),
            "only the heaviest is refused"
        );
        assert!(light_conn.request().is_ok());
        // At the critical level the marked address's connections are cut, not the others'.
        let heavy_cut = heavy_conns[0].cut_signal();
        let light_cut = light_conn.cut_signal();
        tokio::pin!(heavy_cut, light_cut);
        sources.cut_shed();
        assert!(futures::poll!(heavy_cut.as_mut()).is_ready());
        assert!(futures::poll!(light_cut.as_mut()).is_pending());
        // The mark outlives the address's connections.
        drop(heavy_conns);
        assert_eq!(sources.connect(heavy).err(), Some(Refused::Overload));

        overload.force(Level::Critical);
        assert_eq!(sources.connect(light).err(), Some(Refused::Overload));
        assert_eq!(light_conn.request().err(), Some(Refused::Overload));
        let refused = |what| overload.metrics().refused_count(what);
        assert_eq!(refused(OverloadRefusal::Connections), 3);
        assert_eq!(refused(OverloadRefusal::Requests), 2);

        // Below shedding the marks no longer count, and are then cleared.
        overload.force(Level::Pressure);
        assert!(sources.connect(heavy).is_ok());
        sources.forgive();
        assert!(sources.connect(heavy).is_ok());
    }

    #[test]
    fn caps_hold_per_address_and_release_with_the_guards() {
        let refused = SourceRefusals::default();
        let sources = Sources::new(
            SourceLimits {
                max_connections: 2,
                max_requests: 3,
            },
            refused.clone(),
            Overload::new(OverloadMetrics::default()),
        );
        let a: IpAddr = "10.244.1.5".parse().unwrap();
        let b: IpAddr = "10.244.1.6".parse().unwrap();
        let first = sources.connect(a).unwrap();
        let second = sources.connect(a).unwrap();
        assert_eq!(
            sources.connect(a).err(),
            Some(Refused::Cap),
            "a third connection from a"
        );
        // Another pod is not held back by the first.
        let other = sources.connect(b).unwrap();
        assert_eq!(refused.get(SourceLimit::Connections), 1);

        // Requests count over all of a's connections.
        let requests: Vec<_> = [&first, &second, &first]
            .iter()
            .map(|c| c.request().unwrap())
            .collect();
        assert_eq!(second.request().err(), Some(Refused::Cap));
        assert!(other.request().is_ok(), "b has its own budget");
        assert_eq!(refused.get(SourceLimit::Requests), 1);
        drop(requests);
        assert!(first.request().is_ok());

        drop((first, second));
        assert!(sources.connect(a).is_ok());
        drop(other);
        assert_eq!(
            sources.len(),
            0,
            "nothing is kept for addresses that hold nothing"
        );
    }
}
