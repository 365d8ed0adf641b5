//! Snapshot assembly, incremental: the [`Assembler`] keeps the assembled state between changes
//! and applies each batch of upserts and deletes to it, so a change costs what it touches.
//!
//! Endpoints of a Service come from its EndpointSlices; a Service without any slice gets
//! endpoints derived from its selector over the pods that have an IP, with named target ports
//! resolved through the pods' container ports, like the Kubernetes endpoints controller does.
//! Only ready endpoints of TCP ports are kept. A batch marks the Services whose endpoints it may
//! change (their Service, their slices, a pod a slice names or a selector picks) and
//! [`Assembler::snapshot`] recomputes those alone. Whatever comes out equal to what the
//! snapshot held keeps its `Arc`, so consumers can tell what changed with `Arc::ptr_eq`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use super::objects::{EndpointSlice, Kind, Object, ResourceId};
use crate::model::{
    selects, Endpoint, EntryHost, Map, ObjectKey, Pod, Protocol, Service, ServiceEndpoints,
    ServiceEntry, ServicePort, Snapshot, Store, TargetPort, TlsSecret,
};

/// The assembled state, kept between batches.
#[derive(Debug, Default)]
pub struct Assembler {
    snapshot: Snapshot,
    /// Slices per Service, ordered by slice name so duplicates always resolve alike.
    slices: HashMap<ObjectKey, BTreeMap<Arc<str>, EndpointSlice>>,
    /// The Service each slice belongs to (a slice can be relabelled to another).
    slice_service: HashMap<ObjectKey, ObjectKey>,
    /// Services whose slices name a pod (the pod's node fills in a missing `nodeName`).
    pod_refs: HashMap<ObjectKey, HashSet<ObjectKey>>,
    /// Services with a selector and no slice, per namespace: their endpoints follow pods.
    selected: HashMap<Arc<str>, BTreeSet<ObjectKey>>,
    /// Every holder of an address, so deleting one of two pods sharing an IP (a terminating
    /// pod and its successor) leaves the index on the other.
    pod_ips: HashMap<Ipv4Addr, BTreeSet<ObjectKey>>,
    service_ips: HashMap<Ipv4Addr, BTreeSet<ObjectKey>>,
    /// Services whose endpoints the current batch may have changed.
    dirty: HashSet<ObjectKey>,
    /// The Service of each ServiceEntry host (`namespace/host`), per entry declaring it: the
    /// smallest entry key wins a host two entries of a namespace declare.
    entry_hosts: HashMap<ObjectKey, BTreeMap<ObjectKey, Service>>,
    /// The hosts each entry declares.
    entry_keys: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// Every Secret with TLS material; the snapshot holds only those a DestinationRule names
    /// (`credentialName`, or its `-cacert` companion), in any namespace.
    tls_secrets: BTreeMap<ObjectKey, Arc<TlsSecret>>,
    /// The Secret names the DestinationRules ask for.
    secret_names: HashSet<String>,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_generation(&mut self, generation: Option<u64>) {
        self.snapshot.generation = generation;
    }

    /// Adds or replaces one object.
    pub fn upsert(&mut self, object: &Object) {
        let s = &mut self.snapshot;
        match object {
            Object::Namespace(n) => replace(&mut s.namespaces, n.name.clone(), n),
            Object::Node(n) => replace(&mut s.nodes, n.name.clone(), n),
            Object::Pod(p) => self.set_pod(&p.key, Some(p)),
            Object::Service(svc) => self.set_service(&svc.key, Some(svc)),
            Object::EndpointSlice(e) => self.set_slice(&e.key, Some(e)),
            Object::VirtualService(v) => replace_arc(&mut s.virtual_services, &v.key, v),
            Object::DestinationRule(d) => {
                replace_arc(&mut s.destination_rules, &d.key, d);
                self.refresh_secrets();
            }
            Object::ServiceEntry(e) => {
                replace_arc(&mut s.service_entries, &e.key, e);
                self.set_entry(&e.key, Some(e));
            }
            Object::AuthorizationPolicy(a) => replace_arc(&mut s.authorization_policies, &a.key, a),
            Object::PeerAuthentication(p) => replace_arc(&mut s.peer_authentications, &p.key, p),
            Object::HttpRoute(r) => replace_arc(&mut s.http_routes, &r.key, r),
            Object::GrpcRoute(r) => replace_arc(&mut s.grpc_routes, &r.key, r),
            Object::Secret(secret) => {
                self.tls_secrets.insert(secret.key.clone(), secret.clone());
                self.secret_changed(&secret.key);
            }
            Object::MeshConfig(mesh) => s.mesh_config = mesh.clone(),
            Object::Telemetry(t) => replace_arc(&mut s.telemetries, &t.key, t),
        }
    }

    /// Removes one object (nothing happens if it is not there).
    pub fn delete(&mut self, id: &ResourceId) {
        let s = &mut self.snapshot;
        let key = &id.key;
        match id.kind {
            Kind::Namespace => {
                s.namespaces.remove(&*key.name);
            }
            Kind::Node => {
                s.nodes.remove(&*key.name);
            }
            Kind::Pod => self.set_pod(key, None),
            Kind::Service => self.set_service(key, None),
            Kind::EndpointSlice => self.set_slice(key, None),
            Kind::VirtualService => {
                s.virtual_services.remove(key);
            }
            Kind::DestinationRule => {
                s.destination_rules.remove(key);
                self.refresh_secrets();
            }
            Kind::ServiceEntry => {
                s.service_entries.remove(key);
                self.set_entry(key, None);
            }
            Kind::AuthorizationPolicy => {
                s.authorization_policies.remove(key);
            }
            Kind::PeerAuthentication => {
                s.peer_authentications.remove(key);
            }
            Kind::HttpRoute => {
                s.http_routes.remove(key);
            }
            Kind::GrpcRoute => {
                s.grpc_routes.remove(key);
            }
            Kind::Secret => {
                self.tls_secrets.remove(key);
                self.secret_changed(key);
            }
            Kind::MeshConfig => s.mesh_config = Arc::default(),
            Kind::Telemetry => {
                s.telemetries.remove(key);
            }
        }
    }

    /// Ends the batch: recomputes the endpoints it touched and hands out the snapshot (a copy
    /// that shares every map with the assembler's state, so O(1)), indexes current.
    pub fn snapshot(&mut self) -> Snapshot {
        for key in std::mem::take(&mut self.dirty) {
            self.recompute(&key);
        }
        self.snapshot.clone()
    }

    /// Ends the batch and publishes it.
    pub fn publish(&mut self, store: &Store) -> u64 {
        let snapshot = self.snapshot();
        store.publish_indexed(snapshot)
    }

    /// Puts in the snapshot the Secrets some DestinationRule names, and only those: the
    /// Secrets of other applications stay out of the data path (and their changes rebuild
    /// nothing).
    fn refresh_secrets(&mut self) {
        let names: HashSet<String> = self
            .snapshot
            .destination_rules
            .values()
            .flat_map(|r| r.credential_names())
            .flat_map(|n| [n.to_string(), format!("{n}-cacert")])
            .collect();
        if names == self.secret_names {
            return;
        }
        self.secret_names = names;
        let names = &self.secret_names;
        let s = &mut self.snapshot;
        let gone: Vec<ObjectKey> = s
            .secrets
            .keys()
            .filter(|k| !names.contains(&*k.name) || !self.tls_secrets.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            s.secrets.remove(&key);
        }
        for (key, secret) in &self.tls_secrets {
            if names.contains(&*key.name) {
                replace_arc(&mut s.secrets, key, secret);
            }
        }
    }

    /// One Secret changed: in the snapshot if a rule names it.
    fn secret_changed(&mut self, key: &ObjectKey) {
        let s = &mut self.snapshot;
        match self.tls_secrets.get(key) {
            Some(secret) if self.secret_names.contains(&*key.name) => {
                replace_arc(&mut s.secrets, key, secret)
            }
            _ => {
                s.secrets.remove(key);
            }
        }
    }

    fn set_pod(&mut self, key: &ObjectKey, new: Option<&Pod>) {
        let old = self.snapshot.pods.get(key).cloned();
        if old.as_deref() == new {
            return;
        }
        match new {
            Some(pod) => {
                self.snapshot
                    .pods
                    .insert(key.clone(), Arc::new(pod.clone()));
            }
            None => {
                self.snapshot.pods.remove(key);
            }
        }
        let (old_ip, new_ip) = (old.as_ref().and_then(|p| p.ip), new.and_then(|p| p.ip));
        if old_ip != new_ip {
            if let Some(ip) = old_ip {
                unindex(&mut self.pod_ips, &mut self.snapshot.pods_by_ip, ip, key);
            }
            if let Some(ip) = new_ip {
                index(&mut self.pod_ips, &mut self.snapshot.pods_by_ip, ip, key);
            }
        }
        if let Some(services) = self.pod_refs.get(key) {
            self.dirty.extend(services.iter().cloned());
        }
        if let Some(services) = self.selected.get(&key.namespace) {
            for service in services {
                let Some(selector) = self
                    .snapshot
                    .services
                    .get(service)
                    .and_then(|s| s.selector.as_ref())
                else {
                    continue;
                };
                let picks = |p: &Pod| selects(selector, &p.labels);
                if old.as_deref().is_some_and(picks) || new.is_some_and(picks) {
                    self.dirty.insert(service.clone());
                }
            }
        }
    }

    fn set_service(&mut self, key: &ObjectKey, new: Option<&Service>) {
        let old = self.snapshot.services.get(key).cloned();
        if old.as_deref() == new {
            return;
        }
        match new {
            Some(service) => {
                self.snapshot
                    .services
                    .insert(key.clone(), Arc::new(service.clone()));
            }
            None => {
                self.snapshot.services.remove(key);
            }
        }
        let (old_ip, new_ip) = (
            old.as_ref().and_then(|s| s.cluster_ip),
            new.and_then(|s| s.cluster_ip),
        );
        if old_ip != new_ip {
            if let Some(ip) = old_ip {
                unindex(
                    &mut self.service_ips,
                    &mut self.snapshot.services_by_ip,
                    ip,
                    key,
                );
            }
            if let Some(ip) = new_ip {
                index(
                    &mut self.service_ips,
                    &mut self.snapshot.services_by_ip,
                    ip,
                    key,
                );
            }
        }
        self.refresh_selected(key);
        self.dirty.insert(key.clone());
    }

    /// Replaces the hosts entry `key` declares by those of `new`.
    fn set_entry(&mut self, key: &ObjectKey, new: Option<&ServiceEntry>) {
        let mut touched: BTreeSet<ObjectKey> = self
            .entry_keys
            .remove(key)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for host in &touched {
            if let Some(by_entry) = self.entry_hosts.get_mut(host) {
                by_entry.remove(key);
                if by_entry.is_empty() {
                    self.entry_hosts.remove(host);
                }
            }
        }
        let services = new.map(entry_services).unwrap_or_default();
        if !services.is_empty() {
            self.entry_keys.insert(
                key.clone(),
                services.iter().map(|s| s.key.clone()).collect(),
            );
        }
        for service in services {
            touched.insert(service.key.clone());
            self.entry_hosts
                .entry(service.key.clone())
                .or_default()
                .insert(key.clone(), service);
        }
        for host in touched {
            // A Service of the cluster under the same key (a host without a dot) stays.
            if self
                .snapshot
                .services
                .get(&host)
                .is_some_and(|s| s.entry.is_none())
            {
                continue;
            }
            let winner = self
                .entry_hosts
                .get(&host)
                .and_then(|by_entry| by_entry.values().next())
                .cloned();
            self.set_service(&host, winner.as_ref());
        }
    }

    fn set_slice(&mut self, key: &ObjectKey, new: Option<&EndpointSlice>) {
        if let Some(service) = self.slice_service.remove(key) {
            let slices = self.slices.get_mut(&service);
            let old = slices.and_then(|s| s.remove(&key.name));
            if let Some(old) = &old {
                if Some(old) == new {
                    // Unchanged: put it back as it was.
                    self.slices
                        .entry(service.clone())
                        .or_default()
                        .insert(key.name.clone(), old.clone());
                    self.slice_service.insert(key.clone(), service);
                    return;
                }
                for pod in old.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                    if let Some(refs) = self.pod_refs.get_mut(pod) {
                        refs.remove(&service);
                        if refs.is_empty() {
                            self.pod_refs.remove(pod);
                        }
                    }
                }
            }
            if self.slices.get(&service).is_some_and(BTreeMap::is_empty) {
                self.slices.remove(&service);
            }
            self.refresh_selected(&service);
            self.dirty.insert(service);
        }
        if let Some(slice) = new {
            let service = ObjectKey {
                namespace: key.namespace.clone(),
                name: slice.service.clone(),
            };
            for pod in slice.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                self.pod_refs
                    .entry(pod.clone())
                    .or_default()
                    .insert(service.clone());
            }
            self.slices
                .entry(service.clone())
                .or_default()
                .insert(key.name.clone(), slice.clone());
            self.slice_service.insert(key.clone(), service.clone());
            self.refresh_selected(&service);
            self.dirty.insert(service);
        }
    }

    /// Whether the Service's endpoints follow its selector (it has one and no slice).
    fn refresh_selected(&mut self, key: &ObjectKey) {
        let by_selector = !self.slices.contains_key(key)
            && self
                .snapshot
                .services
                .get(key)
                .is_some_and(|s| s.selector.is_some());
        if by_selector {
            self.selected
                .entry(key.namespace.clone())
                .or_default()
                .insert(key.clone());
        } else if let Some(set) = self.selected.get_mut(&key.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.selected.remove(&key.namespace);
            }
        }
    }

    fn recompute(&mut self, key: &ObjectKey) {
        let Some(service) = self.snapshot.services.get(key).cloned() else {
            self.snapshot.endpoints.remove(key);
            return;
        };
        let by_port = match (self.slices.get(key), &service.selector) {
            // Names of DNS entries are resolved when the snapshot is published.
            _ if service.entry.is_some() && service.selector.is_none() => service
                .entry
                .as_ref()
                .map(|e| e.endpoints_by_port(&key.name, &Map::new()))
                .unwrap_or_default(),
            (Some(slices), _) => from_slices(&service, slices.values(), &self.snapshot.pods),
            (None, Some(_)) => from_selector(&service, &self.snapshot.pods),
            (None, None) => BTreeMap::new(),
        };
        let unchanged = self
            .snapshot
            .endpoints
            .get(key)
            .is_some_and(|e| e.by_port == by_port);
        if !unchanged {
            self.snapshot
                .endpoints
                .insert(key.clone(), Arc::new(ServiceEndpoints { by_port }));
        }
    }
}

/// The Service of each host of `entry` (Istio's one service per host). Its addresses are not
/// a ClusterIP: they never take a Service's address over.
fn entry_services(entry: &ServiceEntry) -> Vec<Service> {
    let addresses = entry
        .addresses
        .iter()
        .filter_map(|block| match block.addr {
            IpAddr::V4(ip) if block.prefix_len == 32 => Some(ip),
            _ => None,
        })
        .collect();
    let ports: Vec<ServicePort> = entry
        .ports
        .iter()
        .map(|p| ServicePort {
            name: Some(p.name.clone()),
            port: p.number,
            target_port: TargetPort::Number(p.target_port.unwrap_or(p.number)),
            protocol: Protocol::Tcp,
            app_protocol: p.protocol.as_ref().map(|p| p.to_ascii_lowercase().into()),
        })
        .collect();
    let host = Arc::new(EntryHost {
        entry: entry.key.clone(),
        resolution: entry.resolution,
        location: entry.location,
        endpoints: entry.endpoints.clone(),
        addresses,
        export_to: entry.export_to.clone(),
        ports: entry
            .ports
            .iter()
            .map(|p| (p.number, p.name.clone(), p.target_port.unwrap_or(p.number)))
            .collect(),
    });
    entry
        .hosts
        .iter()
        .map(|h| Service {
            key: ObjectKey::new(&entry.key.namespace, h),
            cluster_ip: None,
            ports: ports.clone(),
            // A `workloadSelector` picks pods as a Service selector does.
            selector: entry.workload_selector.clone(),
            entry: Some(host.clone()),
        })
        .collect()
}

/// Builds a snapshot from translated objects in one batch (duplicates must already be resolved).
pub fn assemble<'a>(
    objects: impl IntoIterator<Item = &'a Object>,
    generation: Option<u64>,
) -> Snapshot {
    let mut assembler = Assembler::new();
    assembler.set_generation(generation);
    for object in objects {
        assembler.upsert(object);
    }
    assembler.snapshot()
}

fn replace<K: Ord + Clone, V: Clone + PartialEq>(map: &mut Map<K, V>, key: K, value: &V) {
    if map.get(&key) != Some(value) {
        map.insert(key, value.clone());
    }
}

/// Inserts `value` unless an equal one is there, whose `Arc` then stays.
fn replace_arc<T: PartialEq>(map: &mut Map<ObjectKey, Arc<T>>, key: &ObjectKey, value: &Arc<T>) {
    let same = map
        .get(key)
        .is_some_and(|old| Arc::ptr_eq(old, value) || **old == **value);
    if !same {
        map.insert(key.clone(), value.clone());
    }
}

/// The index names the smallest key holding the address.
fn index(
    holders: &mut HashMap<Ipv4Addr, BTreeSet<ObjectKey>>,
    by_ip: &mut Map<Ipv4Addr, ObjectKey>,
    ip: Ipv4Addr,
    key: &ObjectKey,
) {
    let set = holders.entry(ip).or_default();
    set.insert(key.clone());
    if let Some(first) = set.first() {
        if by_ip.get(&ip) != Some(first) {
            by_ip.insert(ip, first.clone());
        }
    }
}

fn unindex(
    holders: &mut HashMap<Ipv4Addr, BTreeSet<ObjectKey>>,
    by_ip: &mut Map<Ipv4Addr, ObjectKey>,
    ip: Ipv4Addr,
    key: &ObjectKey,
) {
    let Some(set) = holders.get_mut(&ip) else {
        return;
    };
    set.remove(key);
    match set.first() {
        Some(first) => {
            if by_ip.get(&ip) != Some(first) {
                by_ip.insert(ip, first.clone());
            }
        }
        None => {
            holders.remove(&ip);
            by_ip.remove(&ip);
        }
    }
}

fn from_slices<'a>(
    service: &Service,
    slices: impl Iterator<Item = &'a EndpointSlice> + Clone,
    pods: &Map<ObjectKey, Arc<Pod>>,
) -> BTreeMap<u16, Vec<Endpoint>> {
    let mut by_port = BTreeMap::new();
    for port in service.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
        let mut list: Vec<Endpoint> = Vec::new();
        for slice in slices.clone() {
            // A slice port belongs to the service port of the same name.
            let Some(target) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == Protocol::Tcp)
            else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|e| e.ready) {
                let node = ep.node.clone().or_else(|| {
                    ep.pod
                        .as_ref()
                        .and_then(|k| pods.get(k))
                        .and_then(|p| p.node.clone())
                });
                for &ip in &ep.addresses {
                    push_unique(
                        &mut list,
                        Endpoint {
                            ip,
                            port: target.port,
                            pod: ep.pod.clone(),
                            node: node.clone(),
                            ready: true,
                        },
                    );
                }
            }
        }
        sort(&mut list);
        by_port.insert(port.port, list);
    }
    by_port
}

fn from_selector(
    service: &Service,
    pods: &Map<ObjectKey, Arc<Pod>>,
) -> BTreeMap<u16, Vec<Endpoint>> {
    let mut selected: Vec<(&Arc<Pod>, Ipv4Addr)> = service
        .selected(pods)
        .filter_map(|p| p.ip.map(|ip| (p, ip)))
        .collect();
    selected.sort_by_key(|(_, ip)| *ip);

    let mut by_port = BTreeMap::new();
    for port in service.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
        let mut list = Vec::new();
        for (pod, ip) in &selected {
            // A pod that does not declare a named target port is not an endpoint of it.
            let Some(target) = port.target_on(pod) else {
                continue;
            };
            push_unique(
                &mut list,
                Endpoint {
                    ip: *ip,
                    port: target,
                    pod: Some(pod.key.clone()),
                    node: pod.node.clone(),
                    ready: true,
                },
            );
        }
        sort(&mut list);
        by_port.insert(port.port, list);
    }
    by_port
}

fn push_unique(list: &mut Vec<Endpoint>, endpoint: Endpoint) {
    if !list
        .iter()
        .any(|e| e.ip == endpoint.ip && e.port == endpoint.port)
    {
        list.push(endpoint);
    }
}

/// A stable order, so round robin walks endpoints the same way on every node.
fn sort(list: &mut [Endpoint]) {
    list.sort_by_key(|e| (e.ip, e.port));
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::{
        model::{Labels, Namespace, ServicePort},
        source::objects::{SliceEndpoint, SlicePort},
    };

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(name: &str, ip: u8, app: &str, node: &str) -> Object {
        Object::Pod(Pod {
            key: key(name),
            uid: None,
            labels: labels(&[("app", app)]),
            annotations: Labels::new(),
            node: Some(node.into()),
            ip: Some(Ipv4Addr::new(10, 244, 0, ip)),
            service_account: "default".into(),
            ports: vec![(Some("http".into()), 8080)],
            controller: None,
        })
    }

    fn service(name: &str, ip: u8, app: Option<&str>) -> Object {
        Object::Service(Service {
            key: key(name),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, ip)),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: TargetPort::Name("http".into()),
                protocol: Protocol::Tcp,
                app_protocol: None,
            }],
            selector: app.map(|a| labels(&[("app", a)])),
            entry: None,
        })
    }

    fn slice(name: &str, service: &str, endpoints: &[(u8, Option<&str>)]) -> Object {
        Object::EndpointSlice(EndpointSlice {
            key: key(name),
            service: service.into(),
            ports: vec![SlicePort {
                name: Some("http".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            }],
            endpoints: endpoints
                .iter()
                .map(|(ip, pod)| SliceEndpoint {
                    addresses: vec![Ipv4Addr::new(10, 244, 0, *ip)],
                    ready: true,
                    node: None,
                    pod: pod.map(key),
                })
                .collect(),
        })
    }

    fn ips(snapshot: &Snapshot, service: &str) -> Vec<(u8, u16, Option<String>)> {
        snapshot
            .endpoints(&key(service), 80)
            .iter()
            .map(|e| (e.ip.octets()[3], e.port, e.node.as_deref().map(Into::into)))
            .collect()
    }

    fn entry(yaml: &str) -> Object {
        crate::source::objects::translate_one(yaml).expect("valid ServiceEntry")
    }

    #[test]
    fn service_entry_hosts_are_services_that_never_take_a_service_address() {
        let mut assembler = Assembler::new();
        assembler.upsert(&service("web", 10, Some("web")));
        assembler.upsert(&pod("db-1", 7, "db", "n1"));
        // Claims the ClusterIP of ns/web and a pod address, exported only to `ns`.
        let claims = entry(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: hijack, namespace: ns}\nspec: {hosts: [api.example.com, www.example.com], addresses: [10.96.0.10], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC, endpoints: [{address: 192.0.2.1}], exportTo: [.]}",
        );
        assembler.upsert(&claims);
        let selected = entry(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: ns}\nspec: {hosts: [db.internal], ports: [{number: 5432, name: tcp-pg, protocol: TCP, targetPort: 6432}], resolution: STATIC, location: MESH_INTERNAL, workloadSelector: {labels: {app: db}}}",
        );
        assembler.upsert(&selected);
        let snapshot = assembler.snapshot();

        let web = ObjectKey::new("ns", "web");
        assert_eq!(
            snapshot
                .service_by_ip(Ipv4Addr::new(10, 96, 0, 10))
                .map(|s| &s.key),
            Some(&web),
            "the Service keeps its ClusterIP"
        );
        let api = snapshot
            .services
            .get(&key("api.example.com"))
            .expect("one Service per host");
        assert_eq!(api.hostname(), "api.example.com");
        assert!(snapshot.services.contains_key(&key("www.example.com")));
        let dialled = |ip: [u8; 4]| SocketAddrV4::new(ip.into(), 80);
        for (addr, namespace, found) in [
            (dialled([10, 96, 0, 10]), Some("ns"), true),
            (dialled([192, 0, 2, 1]), Some("ns"), true),
            (dialled([192, 0, 2, 1]), Some("other"), false),
            (
                SocketAddrV4::new([192, 0, 2, 1].into(), 443),
                Some("ns"),
                false,
            ),
            (dialled([192, 0, 2, 2]), Some("ns"), false),
        ] {
            assert_eq!(
                snapshot.entry_for(addr, namespace).is_some(),
                found,
                "{addr} from {namespace:?}"
            );
        }
        // workloadSelector: the pods it selects, on the entry's target port.
        let pg: Vec<_> = snapshot
            .endpoints(&key("db.internal"), 5432)
            .iter()
            .map(|e| (e.ip, e.port, e.pod.clone()))
            .collect();
        assert_eq!(
            pg,
            [(Ipv4Addr::new(10, 244, 0, 7), 6432, Some(key("db-1")))]
        );

        assembler.delete(&claims.id());
        let snapshot = assembler.snapshot();
        assert!(!snapshot.services.contains_key(&key("api.example.com")));
        assert!(snapshot.endpoints.get(&key("api.example.com")).is_none());
        assert!(snapshot.services.contains_key(&key("db.internal")));
    }

    /// Applies `changes` one batch at a time and checks each result against a snapshot
    /// assembled from scratch out of the same objects.
    #[test]
    fn only_secrets_a_destination_rule_names_reach_the_snapshot() {
        let secret = |name: &str| {
            Object::Secret(Arc::new(TlsSecret {
                key: ObjectKey::new("shop", name),
                cert: None,
                private_key: None,
                ca: Some("-----BEGIN CERTIFICATE-----".into()),
                crl: None,
            }))
        };
        let rule = |credential: &str| {
            let yaml = format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: shop}}\nspec:\n  host: api.example.test\n  trafficPolicy: {{portLevelSettings: [{{port: {{number: 443}}, tls: {{mode: SIMPLE, credentialName: {credential}}}}}]}}\n");
            crate::source::objects::translate_one(&yaml).unwrap()
        };
        let mut assembler = Assembler::new();
        for name in ["api-client", "api-client-cacert", "ingress-cert"] {
            assembler.upsert(&secret(name));
        }
        let names = |a: &mut Assembler| {
            a.snapshot()
                .secrets
                .keys()
                .map(|k| k.name.to_string())
                .collect::<Vec<_>>()
        };
        assert!(names(&mut assembler).is_empty(), "no rule names any");
        assembler.upsert(&rule("api-client"));
        assert_eq!(names(&mut assembler), ["api-client", "api-client-cacert"]);
        // A Secret arriving after its rule, and a rule naming another one.
        assembler.upsert(&rule("late"));
        assert!(names(&mut assembler).is_empty());
        assembler.upsert(&secret("late"));
        assert_eq!(names(&mut assembler), ["late"]);
        assembler.delete(&ResourceId {
            kind: Kind::Secret,
            key: ObjectKey::new("shop", "late"),
        });
        assert!(names(&mut assembler).is_empty());
    }

    #[test]
    fn every_batch_gives_what_assembly_from_scratch_gives() {
        let namespace = Object::Namespace(Namespace {
            name: "ns".into(),
            labels: Labels::new(),
        });
        let batches: Vec<Vec<Object>> = vec![
            vec![
                namespace,
                pod("a", 1, "web", "n1"),
                pod("b", 2, "web", "n2"),
                pod("c", 3, "db", "n1"),
                service("web", 1, Some("web")),
                service("db", 2, Some("db")),
            ],
            // A slice appears for db: it takes precedence over the selector.
            vec![slice("db-1", "db", &[(3, Some("c")), (9, None)])],
            // A pod is relabelled into web; c moves node (db's endpoint follows it).
            vec![pod("c", 3, "web", "n2")],
            // The slice is relabelled to web; db falls back to its selector (no pod left).
            vec![slice("db-1", "web", &[(3, Some("c"))])],
            // A second pod takes the address of a (a terminating pod and its successor).
            vec![pod("a2", 1, "other", "n1")],
        ];
        let mut assembler = Assembler::new();
        let mut all: BTreeMap<ResourceId, Object> = BTreeMap::new();
        for batch in &batches {
            for object in batch {
                assembler.upsert(object);
                all.insert(object.id(), object.clone());
            }
            let incremental = assembler.snapshot();
            let full = assemble(all.values(), None);
            assert_eq!(incremental.endpoints, full.endpoints);
            assert_eq!(incremental.pods_by_ip, full.pods_by_ip);
            assert_eq!(incremental.services_by_ip, full.services_by_ip);
        }
        let snapshot = assembler.snapshot();
        assert_eq!(ips(&snapshot, "web"), [(3, 9090, Some("n2".into()))]);
        assert!(ips(&snapshot, "db").is_empty());
        assert_eq!(
            snapshot
                .pod_by_ip(Ipv4Addr::new(10, 244, 0, 1))
                .unwrap()
                .key,
            key("a")
        );

        // Deletes, one at a time.
        for id in [
            pod("a", 1, "", "").id(),
            slice("db-1", "", &[]).id(),
            service("db", 2, None).id(),
        ] {
            assembler.delete(&id);
            all.remove(&id);
            let incremental = assembler.snapshot();
            let full = assemble(all.values(), None);
            assert_eq!(incremental.endpoints, full.endpoints);
            assert_eq!(incremental.pods_by_ip, full.pods_by_ip);
            assert_eq!(incremental.services_by_ip, full.services_by_ip);
        }
        let snapshot = assembler.snapshot();
        assert_eq!(
            snapshot
                .pod_by_ip(Ipv4Addr::new(10, 244, 0, 1))
                .unwrap()
                .key,
            key("a2")
        );
        assert!(snapshot
            .service_by_ip(Ipv4Addr::new(10, 96, 0, 2))
            .is_none());
        // Selector-derived again: c and b are web pods (with the named target port).
        assert_eq!(
            ips(&snapshot, "web"),
            [(2, 8080, Some("n2".into())), (3, 8080, Some("n2".into()))]
        );
    }

    #[test]
    fn a_change_replaces_only_what_it_touches() {
        let mut assembler = Assembler::new();
        for object in [
            service("web", 1, None),
            service("db", 2, None),
            slice("web-1", "web", &[(1, None)]),
            slice("db-1", "db", &[(2, None)]),
        ] {
            assembler.upsert(&object);
        }
        let before = assembler.snapshot();
        assembler.upsert(&slice("web-1", "web", &[(5, None)]));
        // The same object again changes nothing.
        assembler.upsert(&service("db", 2, None));
        let after = assembler.snapshot();
        assert!(!Arc::ptr_eq(
            &before.endpoints[&key("web")],
            &after.endpoints[&key("web")]
        ));
        assert!(Arc::ptr_eq(
            &before.endpoints[&key("db")],
            &after.endpoints[&key("db")]
        ));
        for name in ["web", "db"] {
            assert!(Arc::ptr_eq(
                &before.services[&key(name)],
                &after.services[&key(name)]
            ));
        }
        assert_eq!(ips(&after, "web"), [(5, 9090, None)]);
    }
}
