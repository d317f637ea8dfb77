//! A Dispatch object as a custom resource and back: names, labels, annotations (the update
//! time Kubernetes does not keep), spec and status.

use std::collections::BTreeMap;
use std::time::Duration;

use dispatch_core::{Kind, Metadata, Object, Status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind, TypeMeta};

use crate::GROUP;

/// The annotation that keeps a resource's `metadata.updatedAt` (Kubernetes has only the
/// creation time).
pub const UPDATED_AT: &str = "dispatch.dev/updated-at";

/// The annotation that keeps a resource's `metadata.updatedBy` (who last wrote its spec).
pub const UPDATED_BY: &str = "dispatch.dev/updated-by";

/// How long [`CrStore::start`] waits for the first list of every kind.
pub(super) const FIRST_SYNC: Duration = Duration::from_secs(60);

/// A conflicting write (409) is retried this many times when the caller did not ask for a
/// version (another writer changed the object in between).
pub(super) const RETRIES: usize = 5;

/// The API resource of a kind (`dispatch.dev/v1`, its plural).
pub fn api_resource(kind: Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1", kind.as_str()),
        kind.plural(),
    )
}

/// The API of one kind's custom resources in `ns`.
pub fn resource_api(client: &kube::Client, ns: &str, kind: Kind) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &api_resource(kind))
}

/// The custom resource of a Dispatch resource: metadata (name, namespace, labels, version;
/// `updatedAt` as an annotation), spec and status.
pub fn to_custom_resource(o: &Object) -> DynamicObject {
    let mut annotations = BTreeMap::new();
    if let Some(at) = o.metadata.updated_at {
        annotations.insert(UPDATED_AT.to_string(), at.to_string());
    }
    if let Some(who) = &o.metadata.updated_by {
        annotations.insert(UPDATED_BY.to_string(), who.clone());
    }
    DynamicObject {
        types: Some(TypeMeta {
            api_version: format!("{GROUP}/v1"),
            kind: o.kind.as_str().to_string(),
        }),
        metadata: ObjectMeta {
            name: Some(o.metadata.name.clone()),
            namespace: o.metadata.namespace.clone(),
            labels: (!o.metadata.labels.is_empty()).then(|| o.metadata.labels.clone()),
            annotations: (!annotations.is_empty()).then_some(annotations),
            resource_version: o.metadata.resource_version.clone(),
            ..Default::default()
        },
        data: serde_json::json!({
            "spec": o.spec,
            "status": o.status,
        }),
    }
}

/// The Dispatch resource of a custom resource. A status the server cannot read (written by
/// hand) reads as no status: the controller writes it again.
pub fn from_custom_resource(kind: Kind, cr: &DynamicObject) -> Object {
    let m = &cr.metadata;
    let created = m.creation_timestamp.as_ref().map(|t| t.0);
    let updated = m
        .annotations
        .as_ref()
        .and_then(|a| a.get(UPDATED_AT))
        .and_then(|v| v.parse().ok())
        .or(created);
    Object {
        api_version: dispatch_core::API_VERSION.to_string(),
        kind,
        metadata: Metadata {
            name: m.name.clone().unwrap_or_default(),
            namespace: m.namespace.clone(),
            labels: m.labels.clone().unwrap_or_default(),
            uid: m.uid.clone(),
            generation: m.generation,
            created_at: created,
            updated_at: updated,
            resource_version: m.resource_version.clone(),
            updated_by: m
                .annotations
                .as_ref()
                .and_then(|a| a.get(UPDATED_BY))
                .cloned(),
        },
        spec: cr
            .data
            .get("spec")
            .filter(|s| s.is_object())
            .cloned()
            .unwrap_or_else(|| serde_json::json!({})),
        status: cr
            .data
            .get("status")
            .and_then(|s| serde_json::from_value::<Status>(s.clone()).ok())
            .unwrap_or_default(),
    }
}

/// Versions are opaque to clients, but every API server numbers them; an unreadable one
/// counts as newer.
pub(super) fn version(o: &Object) -> Option<u64> {
    o.metadata.resource_version.as_deref()?.parse().ok()
}

pub(super) fn older(a: Option<u64>, than: Option<u64>) -> bool {
    matches!((a, than), (Some(a), Some(b)) if a < b)
}
