//! Garbage collection (`POST /v1/gc`, `dispatch gc`, and hourly): removes source blobs, image
//! builds and function builds that no resource references any more. Never one in use: what
//! resources name (spec.source, status.digest), what serves calls now, what is building now,
//! and anything touched within the grace period (a source uploaded for a function that is
//! about to be created) are kept.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dispatch_core::Kind;
use dispatch_runtime::{GcKeep, Removed};
use serde::Serialize;

use crate::state::AppState;
use crate::state::StateError;

/// Grace of the periodic collection.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Pulled images unused this long go in the periodic collection (a pull costs more than a
/// build of a source blob; `dispatch gc --grace` applies its grace to them too).
pub const PULLED_IMAGE_GRACE: Duration = Duration::from_secs(24 * 3600);
const PERIOD: Duration = Duration::from_secs(3600);

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub removed: Vec<Removed>,
    pub freed_bytes: u64,
}

pub async fn collect(
    state: &AppState,
    grace: Duration,
    image_grace: Duration,
) -> Result<GcReport, StateError> {
    let (functions, images, templates) = state
        .res(|s| {
            Ok((
                s.list(None, Kind::Function)?,
                s.list(None, Kind::Image)?,
                s.list(None, Kind::JobTemplate)?,
            ))
        })
        .await?;
    let mut keep = GcKeep::default();
    let mut sources = HashSet::new();
    for f in &functions {
        if let Some(src) = f
            .typed_spec::<dispatch_core::FunctionSpec>()
            .ok()
            .and_then(|s| s.source)
        {
            sources.insert(src);
        }
        if let Some(d) = &f.status.digest {
            keep.functions.insert(d.clone());
        }
    }
    keep.functions.extend(state.deployed_digests());
    // What a rollback returns to: every kept version's source and build.
    let names: Vec<(String, String)> = functions
        .iter()
        .map(|f| (f.namespace().to_string(), f.name().to_string()))
        .collect();
    let versions = state
        .db(move |s| {
            let mut all = Vec::new();
            for (ns, name) in &names {
                all.extend(s.list_versions(ns, name)?);
            }
            Ok(all)
        })
        .await?;
    for v in versions {
        if let Some(src) = v.spec["source"].as_str() {
            sources.insert(src.to_string());
        }
        keep.functions.insert(v.digest);
    }
    for i in &images {
        if let Some(d) = &i.status.digest {
            keep.images.insert(d.clone());
        }
    }
    let mut removed = state.backend.gc(&keep, grace).await;
    if let Some(tier) = state.config.containers.clone() {
        // Images that templates name as written (a rendered name is unknown until it runs).
        let named: HashSet<String> = templates
            .iter()
            .filter_map(|t| t.typed_spec::<dispatch_core::jobs::JobTemplateSpec>().ok())
            .flat_map(|t| {
                let containers = t.job_template["spec"]["template"]["spec"]["containers"].clone();
                containers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["image"].as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect();
        let pulled = tokio::task::spawn_blocking(move || tier.images.gc(image_grace, &named))
            .await
            .map_err(|e| StateError::internal("collecting pulled images", e))?;
        match pulled {
            Ok(p) => removed.extend(p.into_iter().map(|c| Removed {
                what: c.what,
                digest: c.digest,
                bytes: c.bytes,
            })),
            Err(e) => tracing::warn!("collecting pulled images: {e}"),
        }
    }
    let blobs = state.blobs.clone();
    let store = state.stores.records.clone();
    let blob_removed = tokio::task::spawn_blocking(move || {
        let now = SystemTime::now();
        let mut out = Vec::new();
        // The store's copies (servers sharing it), stored before the grace period.
        let before =
            jiff::Timestamp::now() - jiff::SignedDuration::try_from(grace).unwrap_or_default();
        for digest in store.list_blobs(before)? {
            if !sources.contains(&digest) {
                store.delete_blob(&digest)?;
            }
        }
        for b in blobs.list()? {
            let old = now.duration_since(b.modified).is_ok_and(|age| age >= grace);
            if old && !sources.contains(&b.digest) {
                blobs.remove(&b.digest)?;
                out.push(Removed {
                    what: "source-blob",
                    digest: b.digest,
                    bytes: b.bytes,
                });
            }
        }
        Ok::<_, dispatch_store::StoreError>(out)
    })
    .await
    .map_err(|e| StateError::internal("collecting garbage", e))??;
    removed.extend(blob_removed);
    let freed_bytes = removed.iter().map(|r| r.bytes).sum();
    if !removed.is_empty() {
        tracing::info!(count = removed.len(), freed_bytes, "garbage collected");
    }
    Ok(GcReport {
        removed,
        freed_bytes,
    })
}

/// Collects every hour with the default grace, until aborted.
pub fn spawn_periodic(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PERIOD);
        tick.tick().await; // not at start-up: the controller is redeploying
        loop {
            tick.tick().await;
            if let Err(e) = collect(&state, DEFAULT_GRACE, PULLED_IMAGE_GRACE).await {
                tracing::warn!("garbage collection failed: {e}");
            }
        }
    })
}
