//! Slim decodings of Pods on other nodes and of Nodes.
//!
//! Every node needs every pod's IP, labels, namespace, service account and node to know the
//! identity and locality of a peer, but nothing else of pods it does not host. The API server
//! cannot project fields: a metadata-only watch (`PartialObjectMetadata`) would drop exactly
//! the spec and status fields needed (`status.podIP`, `spec.nodeName`,
//! `spec.serviceAccountName`), so these watches receive full objects and decode only the
//! fields the model uses (serde skips the rest without allocating it): a few hundred bytes per
//! pod instead of tens of kilobytes of containers, volumes, conditions and managed fields.
//! Nodes are decoded the same way because their status lists every image they hold.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    api::core::v1::ObjectReference,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    ClusterResourceScope, NamespaceResourceScope,
};
use kube::Resource;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

/// `metadata` reduced to what the model and the watcher use (no annotations, no managed
/// fields; of the owner references only the controller's kind and name, which name the
/// workload a pod belongs to).
fn slim_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Slim {
        name: Option<String>,
        generate_name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        owner_references: Vec<Owner>,
    }
    #[derive(Deserialize)]
    struct Owner {
        kind: String,
        name: String,
        controller: Option<bool>,
    }
    let slim = Slim::deserialize(deserializer)?;
    let controller = slim
        .owner_references
        .into_iter()
        .find(|o| o.controller == Some(true))
        .map(|o| OwnerReference {
            kind: o.kind,
            name: o.name,
            controller: Some(true),
            ..OwnerReference::default()
        });
    Ok(ObjectMeta {
        name: slim.name,
        generate_name: slim.generate_name,
        namespace: slim.namespace,
        uid: slim.uid,
        resource_version: slim.resource_version,
        labels: slim.labels,
        owner_references: controller.map(|c| vec![c]),
        ..ObjectMeta::default()
    })
}

fn metadata_json(meta: &ObjectMeta) -> Value {
    let owners: Vec<Value> = meta
        .owner_references
        .iter()
        .flatten()
        .map(|o| json!({"kind": o.kind, "name": o.name, "controller": o.controller}))
        .collect();
    json!({
        "name": meta.name,
        "generateName": meta.generate_name,
        "namespace": meta.namespace,
        "uid": meta.uid,
        "resourceVersion": meta.resource_version,
        "labels": meta.labels.clone().unwrap_or_default(),
        "ownerReferences": owners,
    })
}

/// A Pod on another node.
#[derive(Clone, Debug, Deserialize)]
pub struct SlimPod {
    #[serde(deserialize_with = "slim_metadata")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct Container {
    /// Kept for Services whose endpoints are derived from their selector (named target
    /// ports), as in the file source.
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: Option<String>,
    container_port: i32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
}

impl SlimPod {
    pub fn host_network(&self) -> bool {
        self.spec.host_network.unwrap_or(false)
    }

    pub fn reference(&self) -> ObjectReference {
        super::watch::reference(self, "v1".into(), "Pod".into())
    }

    /// The Pod document the translation reads.
    pub fn to_json(&self) -> Value {
        let containers: Vec<Value> = self
            .spec
            .containers
            .iter()
            .map(|c| {
                let ports: Vec<Value> = c
                    .ports
                    .iter()
                    .map(|p| json!({"name": p.name, "containerPort": p.container_port}))
                    .collect();
                json!({ "ports": ports })
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata_json(&self.metadata),
            "spec": {
                "nodeName": self.spec.node_name,
                "serviceAccountName": self.spec.service_account_name,
                "containers": containers,
            },
            "status": { "podIP": self.status.pod_ip },
        })
    }
}

impl Resource for SlimPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Node: its name and addresses.
#[derive(Clone, Debug, Deserialize)]
pub struct SlimNode {
    #[serde(deserialize_with = "slim_metadata")]
    metadata: ObjectMeta,
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Clone, Debug, Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    type_: String,
    address: String,
}

impl SlimNode {
    pub fn reference(&self) -> ObjectReference {
        super::watch::reference(self, "v1".into(), "Node".into())
    }

    pub fn to_json(&self) -> Value {
        let addresses: Vec<Value> = self
            .status
            .addresses
            .iter()
            .map(|a| json!({"type": a.type_, "address": a.address}))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": metadata_json(&self.metadata),
            "status": { "addresses": addresses },
        })
    }
}

impl Resource for SlimNode {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{objects::translate, Object};

    #[test]
    fn slim_pod_keeps_what_identities_need() {
        let pod: SlimPod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "ratings-v1-5d8f7c9b4-x2x9k", "generateName": "ratings-v1-5d8f7c9b4-",
                "namespace": "bookinfo", "uid": "u-1",
                "resourceVersion": "42",
                "labels": {"app": "ratings", "pod-template-hash": "5d8f7c9b4"},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "u-3"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "ratings-v1-5d8f7c9b4",
                     "uid": "u-2", "controller": true, "blockOwnerDeletion": true},
                ],
                "annotations": {"big": "x".repeat(10_000)},
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            },
            "spec": {
                "nodeName": "n2", "serviceAccountName": "bookinfo-ratings",
                "containers": [{"name": "app", "image": "ratings:1", "ports": [{"name": "http", "containerPort": 9080}],
                                "env": [{"name": "A", "value": "b"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "status": {"podIP": "10.244.2.7", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        assert!(pod.metadata.annotations.is_none());
        assert!(pod.metadata.managed_fields.is_none());
        assert!(!pod.host_network());
        let doc = crate::source::yaml::from_json(pod.to_json()).unwrap();
        let translated = translate(&doc);
        let [Ok(Object::Pod(model))] = translated.as_slice() else {
            panic!("expected one pod");
        };
        assert_eq!(model.key.to_string(), "bookinfo/ratings-v1-5d8f7c9b4-x2x9k");
        assert_eq!(
            model.workload(),
            "ratings-v1",
            "the Deployment behind its ReplicaSet"
        );
        assert_eq!(model.ip, Some("10.244.2.7".parse().unwrap()));
        assert_eq!(model.node.as_deref(), Some("n2"));
        assert_eq!(&*model.service_account, "bookinfo-ratings");
        assert_eq!(model.labels["app"], "ratings");
        assert_eq!(model.uid.as_deref(), Some("u-1"));
        assert_eq!(model.ports, vec![(Some("http".into()), 9080)]);
    }

    #[test]
    fn pending_pod_without_ip_or_node() {
        let pod: SlimPod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Pending"},
        }))
        .unwrap();
        let doc = crate::source::yaml::from_json(pod.to_json()).unwrap();
        let translated = translate(&doc);
        let [Ok(Object::Pod(model))] = translated.as_slice() else {
            panic!("expected one pod");
        };
        assert_eq!(model.ip, None);
        assert_eq!(model.node, None);
        assert_eq!(&*model.service_account, "default");
    }

    #[test]
    fn slim_node_keeps_addresses() {
        let node: SlimNode = serde_json::from_value(json!({
            "metadata": {"name": "n2", "uid": "n-2", "resourceVersion": "9"},
            "status": {
                "addresses": [{"type": "Hostname", "address": "n2"}, {"type": "InternalIP", "address": "172.18.0.3"}],
                "images": [{"names": ["a"], "sizeBytes": 1}],
            },
        }))
        .unwrap();
        let doc = crate::source::yaml::from_json(node.to_json()).unwrap();
        let translated = translate(&doc);
        let [Ok(Object::Node(model))] = translated.as_slice() else {
            panic!("expected one node");
        };
        assert_eq!(
            model.address,
            "172.18.0.3".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(node.reference().name.as_deref(), Some("n2"));
    }
}
