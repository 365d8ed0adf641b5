//! The mesh CRDs: discovered per API group, watched as dynamic objects.
//!
//! Istio serves the same schema under several versions (`v1`, `v1beta1`, `v1alpha3`) and the
//! API server converts between them, so each kind is watched once, in the first version of
//! [`CrdKind::versions`] the cluster serves. A group or kind that is not installed is logged
//! once and ignored; the group is discovered again every `crd_recheck` until all its kinds
//! are watched, so installing Istio or Gateway API later needs no restart.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIGroup, APIResourceList};
use kube::{
    api::{ApiResource, DynamicObject, TypeMeta},
    runtime::{utils::Backoff as _, watcher},
    Api,
};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{
    watch::{self, Ctx, Ended},
    Slot, Update,
};

/// A custom resource kind Weft reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrdKind {
    pub group: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Accepted versions, preferred first.
    pub versions: &'static [&'static str],
}

const ISTIO_NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const ISTIO_SECURITY: &[&str] = &["v1", "v1beta1"];

/// Every mesh kind, in the order their watches are reported.
pub const CRD_KINDS: &[CrdKind] = &[
    CrdKind {
        group: "networking.istio.io",
        kind: "VirtualService",
        plural: "virtualservices",
        versions: ISTIO_NETWORKING,
    },
    CrdKind {
        group: "networking.istio.io",
        kind: "DestinationRule",
        plural: "destinationrules",
        versions: ISTIO_NETWORKING,
    },
    CrdKind {
        group: "networking.istio.io",
        kind: "ServiceEntry",
        plural: "serviceentries",
        versions: ISTIO_NETWORKING,
    },
    CrdKind {
        group: "security.istio.io",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        versions: ISTIO_SECURITY,
    },
    CrdKind {
        group: "security.istio.io",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        versions: ISTIO_SECURITY,
    },
    CrdKind {
        group: "telemetry.istio.io",
        kind: "Telemetry",
        plural: "telemetries",
        versions: &["v1", "v1alpha1"],
    },
    CrdKind {
        group: "gateway.networking.k8s.io",
        kind: "HTTPRoute",
        plural: "httproutes",
        versions: &["v1", "v1beta1"],
    },
    CrdKind {
        group: "gateway.networking.k8s.io",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        versions: &["v1", "v1alpha2"],
    },
];

/// Starts one discovery task per API group.
pub(super) fn spawn_groups(ctx: &Ctx, tasks: &mut JoinSet<()>) {
    let mut groups: Vec<&'static str> = CRD_KINDS.iter().map(|k| k.group).collect();
    groups.dedup();
    for group in groups {
        tasks.spawn(run_group(ctx.clone(), group));
    }
}

/// What discovery found of one group: served versions and, per version, the plurals.
#[derive(Debug, Default)]
struct Served {
    resources: HashMap<String, Vec<String>>,
}

impl Served {
    fn version_for(&self, kind: &CrdKind) -> Option<&'static str> {
        kind.versions.iter().copied().find(|v| {
            self.resources
                .get(*v)
                .is_some_and(|plurals| plurals.iter().any(|p| p == kind.plural))
        })
    }
}

async fn run_group(ctx: Ctx, group: &'static str) {
    let kinds: Vec<(Slot, &'static CrdKind)> = CRD_KINDS
        .iter()
        .enumerate()
        .filter(|(_, k)| k.group == group)
        .map(|(i, k)| (Slot::Crd(i), k))
        .collect();
    let mut watching: HashMap<Slot, &'static str> = HashMap::new();
    let mut reported_missing: HashMap<Slot, bool> = HashMap::new();
    let mut watches: JoinSet<(Slot, Ended)> = JoinSet::new();
    let mut backoff = ctx.config.backoff.policy();
    let mut failing = false;
    loop {
        let waiting: Vec<(Slot, &'static CrdKind)> = kinds
            .iter()
            .filter(|(slot, _)| !watching.contains_key(slot))
            .copied()
            .collect();
        let mut next = None;
        if !waiting.is_empty() {
            match discover(&ctx.client, group).await {
                Ok(served) => {
                    if failing {
                        info!(group, "discovery recovered");
                        failing = false;
                    }
                    backoff.reset();
                    for (slot, kind) in waiting {
                        match served.version_for(kind) {
                            Some(version) => {
                                info!(kind = kind.kind, api_version = %format!("{group}/{version}"), "watching mesh resources");
                                watching.insert(slot, version);
                                reported_missing.remove(&slot);
                                let ctx = ctx.clone();
                                watches.spawn(async move {
                                    (slot, watch_kind(ctx, slot, kind, version).await)
                                });
                            }
                            None => {
                                if reported_missing.insert(slot, true).is_none() {
                                    info!(
                                        kind = kind.kind,
                                        group,
                                        versions = ?kind.versions,
                                        "CRD not installed: {} resources are ignored until it is \
                                         (checked again every {:?})",
                                        kind.kind,
                                        ctx.config.crd_recheck
                                    );
                                }
                                if ctx.tx.send(Update::NotServed { slot }).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    if watching.len() < kinds.len() {
                        next = Some(ctx.config.crd_recheck);
                    }
                }
                Err(error) => {
                    if failing {
                        debug!(group, %error, "discovery still failing");
                    } else {
                        warn!(group, %error, "cannot discover the API group; retrying with backoff");
                        failing = true;
                    }
                    next = Some(backoff.next().unwrap_or(ctx.config.backoff.max));
                }
            }
        }
        let sleep = tokio::time::sleep(next.unwrap_or(std::time::Duration::from_secs(3600)));
        tokio::select! {
            _ = sleep, if next.is_some() => {}
            Some(ended) = watches.join_next(), if !watches.is_empty() => {
                match ended {
                    Ok((slot, Ended::NotServed)) => {
                        info!(resource = %slot, "no longer served (CRD removed?): its resources are dropped");
                        watching.remove(&slot);
                        if ctx.tx.send(Update::NotServed { slot }).is_err() {
                            return;
                        }
                    }
                    Ok((_, Ended::Closed)) | Err(_) => return,
                }
            }
            else => return,
        }
    }
}

/// `Ok` with what is served; a group the API server does not know is served empty.
async fn discover(client: &kube::Client, group: &str) -> Result<Served, kube::Error> {
    let request = http::Request::get(format!("/apis/{group}"))
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let api_group: APIGroup = match client.request(request).await {
        Ok(g) => g,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Served::default()),
        Err(e) => return Err(e),
    };
    let mut served = Served::default();
    for version in api_group.versions {
        let list: APIResourceList = match client
            .list_api_group_resources(&version.group_version)
            .await
        {
            Ok(list) => list,
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(e) => return Err(e),
        };
        served.resources.insert(
            version.version,
            list.resources.into_iter().map(|r| r.name).collect(),
        );
    }
    Ok(served)
}

async fn watch_kind(ctx: Ctx, slot: Slot, kind: &'static CrdKind, version: &str) -> Ended {
    let resource = ApiResource {
        group: kind.group.into(),
        version: version.into(),
        api_version: format!("{}/{version}", kind.group),
        kind: kind.kind.into(),
        plural: kind.plural.into(),
    };
    let api = Api::<DynamicObject>::all_with(ctx.client.clone(), &resource);
    let config = watcher::Config::default().page_size(ctx.config.page_size);
    let types = TypeMeta {
        api_version: resource.api_version.clone(),
        kind: resource.kind.clone(),
    };
    watch::watch(ctx, slot, api, config, move |mut object: DynamicObject| {
        // List items may come without their type; the translation dispatches on it.
        let types = object.types.get_or_insert_with(|| types.clone()).clone();
        let reference = watch::reference(&object, types.api_version, types.kind);
        let value = serde_json::to_value(&object).ok()?;
        Some(watch::convert(reference, value))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_served_version_that_has_the_kind() {
        let vs = &CRD_KINDS[0];
        let mut served = Served::default();
        assert_eq!(served.version_for(vs), None);
        served
            .resources
            .insert("v1alpha3".into(), vec!["virtualservices".into()]);
        served.resources.insert(
            "v1beta1".into(),
            vec!["virtualservices".into(), "gateways".into()],
        );
        served
            .resources
            .insert("v1".into(), vec!["gateways".into()]);
        assert_eq!(served.version_for(vs), Some("v1beta1"));
        assert_eq!(served.version_for(&CRD_KINDS[3]), None);
    }

    #[test]
    fn kinds_are_grouped() {
        let groups: Vec<_> = CRD_KINDS.iter().map(|k| k.group).collect();
        let mut deduped = groups.clone();
        deduped.dedup();
        let mut sorted = deduped.clone();
        sorted.sort();
        sorted.dedup();
        // `spawn_groups` relies on the kinds of a group being adjacent.
        assert_eq!(deduped.len(), sorted.len(), "{groups:?}");
    }
}
