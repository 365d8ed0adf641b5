//! The resolver of `DNS` ServiceEntries: the names they need are looked up with the node's
//! resolver every [`REFRESH`] (Envoy's default `dns_refresh_rate`) and when the set of names
//! changes; what they resolve to reaches the model through [`Store::set_resolved`], so the
//! capture layer and the proxy follow it like any other change.
//!
//! Only IPv4 addresses are kept (the data path is IPv4). A lookup that fails or times out
//! keeps the name's last addresses, as Envoy keeps a host's last good resolution; a name no
//! entry needs any more is forgotten.

use std::{
    collections::BTreeSet,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use tracing::{debug, warn};

use crate::model::{Map, Resolved, Store};

/// How often every name is looked up again.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Resolves until `shutdown` completes.
pub async fn run(store: Store, shutdown: impl Future<Output = ()>) {
    let mut snapshots = store.subscribe();
    let mut ticker = tokio::time::interval(REFRESH);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resolved = Resolved::new();
    let mut names: BTreeSet<Arc<str>> = BTreeSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                // Our own publications change snapshots too: only new names matter here.
                if snapshots.borrow_and_update().dns_names() == names {
                    continue;
                }
            }
        }
        names = store.current().dns_names();
        resolved = refresh(&names, &resolved).await;
        if let Some(version) = store.set_resolved(resolved.clone()) {
            debug!(
                version,
                names = names.len(),
                "ServiceEntry names resolved anew"
            );
        }
    }
}

/// Looks every name up, keeping a name's previous addresses when its lookup fails.
async fn refresh(names: &BTreeSet<Arc<str>>, previous: &Resolved) -> Resolved {
    let mut next = Map::new();
    for name in names {
        match lookup(name).await {
            Ok(addresses) => {
                let keep = previous.get(name).filter(|p| ***p == *addresses);
                next.insert(
                    name.clone(),
                    keep.cloned().unwrap_or_else(|| addresses.into()),
                );
            }
            Err(e) => {
                warn!(name = %name, "cannot resolve the ServiceEntry name: {e}; its last addresses stay in use");
                if let Some(p) = previous.get(name) {
                    next.insert(name.clone(), p.clone());
                }
            }
        }
    }
    next
}

/// The IPv4 addresses of `name`, sorted and without duplicates.
pub async fn lookup(name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0)))
        .await
        .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let addresses: BTreeSet<Ipv4Addr> = found
        .filter_map(|a| match a.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
        .collect();
    if addresses.is_empty() {
        return Err("no IPv4 address".into());
    }
    Ok(addresses.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::assemble;

    fn entry(yaml: &str) -> crate::source::Object {
        crate::source::objects::translate_one(yaml).expect("valid ServiceEntry")
    }

    #[tokio::test]
    async fn names_resolve_through_the_node_resolver_and_failures_keep_the_last_addresses() {
        let names: BTreeSet<Arc<str>> = ["localhost".into(), "no-such-host.invalid".into()].into();
        let mut previous = Map::new();
        previous.insert(
            Arc::from("no-such-host.invalid"),
            Arc::from([Ipv4Addr::new(192, 0, 2, 7)]),
        );
        let resolved = refresh(&names, &previous).await;
        assert_eq!(
            resolved.get("localhost").map(|a| a.to_vec()),
            Some(vec![Ipv4Addr::LOCALHOST])
        );
        assert_eq!(
            resolved.get("no-such-host.invalid").map(|a| a.to_vec()),
            Some(vec![Ipv4Addr::new(192, 0, 2, 7)]),
            "a failed lookup keeps what the name resolved to before"
        );
        assert!(
            refresh(&["no-such-host.invalid".into()].into(), &Map::new())
                .await
                .is_empty()
        );
    }

    #[test]
    fn resolved_names_become_the_endpoints_of_dns_entries_and_only_theirs() {
        let store = Store::new();
        let objects = [
            entry(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: cnn, namespace: egress}\nspec: {hosts: [edition.cnn.com], ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}], resolution: DNS}",
            ),
            entry(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: egress}\nspec: {hosts: [db.example.com], ports: [{number: 5432, name: pg, protocol: TCP}], resolution: STATIC, endpoints: [{address: 10.9.0.1}, {address: 10.9.0.2, ports: {pg: 6432}}]}",
            ),
        ];
        store.publish_indexed(assemble(objects.iter(), None));
        let snapshot = store.current();
        assert_eq!(
            snapshot.dns_names(),
            ["edition.cnn.com".into()].into(),
            "only DNS entries need names resolved"
        );
        let cnn = crate::model::ObjectKey::new("egress", "edition.cnn.com");
        assert!(snapshot.endpoints(&cnn, 80).is_empty());
        let db = crate::model::ObjectKey::new("egress", "db.example.com");
        let ports: Vec<_> = snapshot
            .endpoints(&db, 5432)
            .iter()
            .map(|e| (e.ip, e.port))
            .collect();
        assert_eq!(
            ports,
            [
                (Ipv4Addr::new(10, 9, 0, 1), 5432),
                (Ipv4Addr::new(10, 9, 0, 2), 6432)
            ]
        );

        let mut resolved = Map::new();
        resolved.insert(
            Arc::from("edition.cnn.com"),
            Arc::from([
                Ipv4Addr::new(151, 101, 3, 5),
                Ipv4Addr::new(151, 101, 67, 5),
            ]),
        );
        let version = store.set_resolved(resolved.clone()).expect("published");
        let snapshot = store.current();
        assert_eq!(snapshot.version, version);
        let endpoints: Vec<_> = snapshot
            .endpoints(&cnn, 80)
            .iter()
            .map(|e| (e.ip, e.port))
            .collect();
        assert_eq!(
            endpoints,
            [
                (Ipv4Addr::new(151, 101, 3, 5), 443),
                (Ipv4Addr::new(151, 101, 67, 5), 443)
            ],
            "targetPort applies to resolved addresses"
        );
        assert_eq!(
            store.set_resolved(resolved),
            None,
            "nothing new, nothing published"
        );

        // The next configuration change keeps the resolution, and the same endpoints object.
        let before = snapshot.endpoints.get(&cnn).cloned().unwrap();
        store.publish_indexed(assemble(objects.iter(), None));
        let after = store.current().endpoints.get(&cnn).cloned().unwrap();
        assert!(Arc::ptr_eq(&before, &after));
    }
}
