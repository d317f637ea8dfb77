//! What both SQL stores decide the same way, whatever their dialect: a created resource's
//! metadata, an update's rules (resource version, generation), and run ids as time bounds.

use dispatch_core::{Kind, Object};
use jiff::Timestamp;

use crate::{Result, RunFilter, StoreError};

pub(crate) fn not_found(kind: Kind, ns: &str, name: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

/// The stored resource version of an object (0 when it has none).
pub(crate) fn rv_of(obj: &Object) -> i64 {
    obj.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A new resource's metadata: its namespace, a uid, generation 1, timestamps, version 1.
pub(crate) fn created(object: &mut Object, ns: &str) {
    let now = Timestamp::now();
    let m = &mut object.metadata;
    m.namespace = Some(ns.to_string());
    m.uid = Some(ulid::Ulid::new().to_string().to_ascii_lowercase());
    m.generation = Some(1);
    m.created_at = Some(now);
    m.updated_at = Some(now);
    m.resource_version = Some("1".to_string());
}

/// `stored` with `object`'s labels and spec, as [`crate::ResourceStore::update`] says: the
/// versions must match when `object` names one, a changed spec bumps the generation; and
/// the version it is stored under.
pub(crate) fn updated(mut stored: Object, object: Object) -> Result<(Object, i64)> {
    let current = rv_of(&stored);
    if let Some(expected) = &object.metadata.resource_version
        && *expected != current.to_string()
    {
        return Err(StoreError::Conflict {
            kind: object.kind,
            name: object.metadata.name.clone(),
            expected: expected.clone(),
            actual: current.to_string(),
        });
    }
    if stored.spec != object.spec {
        stored.metadata.generation = Some(stored.metadata.generation.unwrap_or(0) + 1);
    }
    stored.spec = object.spec;
    stored.metadata.labels = object.metadata.labels;
    stored.metadata.updated_at = Some(Timestamp::now());
    stored.metadata.resource_version = Some((current + 1).to_string());
    Ok((stored, current + 1))
}

/// The smallest run id (a ULID) created at `t`: ids of runs created at or after `t` compare
/// greater or equal.
pub(crate) fn id_at(t: Timestamp) -> String {
    let ms = t.as_millisecond().max(0) as u64;
    ulid::Ulid::from_parts(ms, 0).to_string()
}

/// The run ids a listing keeps, as bounds: below `upper` (`after`, `until`), at or above
/// `lower` (`since`). Run ids are ULIDs, ordered by creation time.
pub(crate) fn id_bounds(filter: &RunFilter) -> (Option<String>, Option<String>) {
    let upper = match (&filter.after, filter.until.map(id_at)) {
        (Some(a), Some(u)) => Some(a.clone().min(u)),
        (a, u) => a.clone().or(u),
    };
    (upper, filter.since.map(id_at))
}
