//! Function versions (issue 23, its first part): `GET …/functions/{name}/versions` lists them,
//! newest first; `POST …/functions/{name}/rollback` (`{"to": N}`, or nothing: the version
//! before the one serving) writes that version's spec back, and the controller deploys it —
//! a build the server still has (gc keeps what versions name), so it is READY at once.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use dispatch_core::versions::FunctionVersion;
use dispatch_core::{Kind, Object};
use serde::Deserialize;

use super::check_namespace;
use crate::auth::Principal;
use crate::error::{ApiError, parse_json};
use crate::state::AppState;
use axum::Extension;

async fn function(state: &AppState, ns: &str, name: &str) -> Result<Object, ApiError> {
    let f = state.get(ns, Kind::Function, name).await?;
    f.ok_or_else(|| super::resources::not_found(ns, Kind::Function, name))
}

async fn versions_of(
    state: &AppState,
    ns: &str,
    name: &str,
) -> Result<Vec<FunctionVersion>, ApiError> {
    Ok(crate::versions::versions_of(state, ns, name).await?)
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Vec<FunctionVersion>>, ApiError> {
    check_namespace(&ns)?;
    function(&state, &ns, &name).await?;
    Ok(Json(versions_of(&state, &ns, &name).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    to: Option<u32>,
    /// Also points this alias (all of its traffic) at the version, ending its promotion.
    alias: Option<String>,
}

pub async fn rollback(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    who: Option<Extension<Principal>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    let b: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        parse_json(
            &body,
            "rollback request (expected {\"to\": N, \"alias\": \"prod\"}, or nothing)",
        )?
    };
    let alias = match &b.alias {
        None => None,
        Some(a) => {
            let stored = dispatch_core::versions::alias_object_name(&name, a);
            let found = state.get(&ns, Kind::Alias, &stored).await?;
            Some(found.ok_or_else(|| {
                ApiError::not_found(format!(
                    "function {name:?} has no alias {a:?}: `dispatch get aliases` lists them"
                ))
            })?)
        }
    };
    // The controller's status writes move the function's resourceVersion too: a conflict
    // with one of them is read again and tried again (a few times); one with another spec
    // change (its generation moved) stands.
    let (mut first, mut tries, mut conflict) = (None, 0, None);
    let (target, stored) = loop {
        let f = function(&state, &ns, &name).await?;
        let generation = *first.get_or_insert(f.metadata.generation);
        if let Some(e) = conflict.take()
            && (f.metadata.generation != generation || tries >= 10)
        {
            return Err(e);
        }
        let target = target_of(&f, &versions_of(&state, &ns, &name).await?, b.to, &name)?;
        let mut back = f.clone();
        back.spec = target.spec.clone();
        super::resources::written_by(&mut back, who.as_deref());
        match super::resources::replace(&state, &ns, Kind::Function, &name, back, false).await {
            Ok(stored) => break (target, stored),
            Err(e) if e.status == axum::http::StatusCode::CONFLICT => {
                tries += 1;
                conflict = Some(e);
            }
            Err(e) => return Err(e),
        }
    };
    // The alias follows in the same call: all its traffic to the version, no promotion.
    let alias = match alias {
        None => None,
        Some(mut a) => {
            let mut spec: dispatch_core::versions::AliasSpec = a.typed_spec()?;
            spec.traffic = vec![dispatch_core::versions::TrafficTarget {
                version: target.version,
                percent: 100,
            }];
            spec.promotion = None;
            a.spec = serde_json::to_value(spec)
                .map_err(|e| ApiError::internal("encoding an alias", &e))?;
            super::resources::written_by(&mut a, who.as_deref());
            a.metadata.resource_version = None;
            let n = a.name().to_string();
            Some(super::resources::replace(&state, &ns, Kind::Alias, &n, a, false).await?)
        }
    };
    Ok(Json(serde_json::json!({
        "version": target.version,
        "digest": target.digest,
        "function": stored,
        "alias": alias,
    })))
}

/// The version a rollback goes to: `to`, else the newest one older than the version serving.
fn target_of(
    f: &Object,
    versions: &[FunctionVersion],
    to: Option<u32>,
    name: &str,
) -> Result<FunctionVersion, ApiError> {
    let serving = versions
        .iter()
        .find(|v| f.status.digest.as_deref() == Some(v.digest.as_str()))
        .map(|v| v.version);
    let found = match to {
        Some(n) => versions.iter().find(|v| v.version == n).ok_or_else(|| {
            ApiError::not_found(format!(
                "function {name:?} has no version {n}: `dispatch get versions {name}` lists the ones kept"
            ))
        })?,
        None => versions
            .iter()
            .find(|v| serving.is_none_or(|s| v.version < s))
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "function {name:?} has no version before {}: nothing to roll back to (`dispatch get versions {name}`)",
                    serving.map(|s| s.to_string()).unwrap_or_else(|| "this one".into())
                ))
            })?,
    };
    Ok(found.clone())
}
