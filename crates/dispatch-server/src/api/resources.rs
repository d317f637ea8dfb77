//! Resource CRUD: `/v1/namespaces/{ns}/{kind}[/{name}]`. Every write is admitted first
//! (validated, references checked, defaults filled), so that bad input is a 4xx and stores
//! nothing; then stored; then handed to the controller.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dispatch_core::{Kind, Object};

use super::check_namespace;
use crate::admission::{BUILTIN_BASE_IMAGES, admit, builtin, builtin_base_image};
use crate::auth::Principal;
use crate::error::{ApiError, parse_json};
use crate::resources::{check_unused, forget, stored_changed};
use crate::state::AppState;
use axum::Extension;
use dispatch_core::auth::Role;

fn kind_of(kind: &str) -> Result<Kind, ApiError> {
    Kind::parse(kind).ok_or_else(|| {
        let all: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
        ApiError::not_found(format!(
            "unknown resource kind {kind:?}: use one of {}",
            all.join(", ")
        ))
    })
}

pub(super) fn not_found(ns: &str, kind: Kind, name: &str) -> ApiError {
    ApiError::not_found(format!(
        "{} {name:?} not found in namespace {ns:?}",
        kind.human()
    ))
}

/// `?l=team=web,tier=api`: every pair must match.
fn matches_labels(o: &Object, selector: Option<&str>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').filter(|p| !p.is_empty()).all(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        o.metadata.labels.get(k.trim()).map(String::as_str) == Some(v.trim())
    })
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Path((ns, kind)): Path<(String, String)>,
    Query(q): Query<super::ListQuery>,
) -> Result<Json<Vec<Object>>, ApiError> {
    check_namespace(&ns)?;
    let kind = kind_of(&kind)?;
    let nsc = ns.clone();
    let mut items = state.res(move |s| s.list(Some(&nsc), kind)).await?;
    if kind == Kind::BaseImage {
        items.extend(
            BUILTIN_BASE_IMAGES
                .iter()
                .filter_map(|n| builtin_base_image(&ns, n)),
        );
        items.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    items.retain(|o| matches_labels(o, q.l.as_deref()));
    for o in &mut items {
        hide_secret(o);
    }
    Ok(Json(items))
}

/// A secret as shown: its keys, never its ciphertext.
fn hide_secret(o: &mut Object) {
    if o.kind == Kind::Secret
        && let Some(m) = o.spec.as_object_mut()
    {
        m.remove("sealed");
    }
}

/// One resource. Secrets show their keys; `?reveal=true` (admins) adds the values.
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path((ns, kind, name)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Object>, ApiError> {
    check_namespace(&ns)?;
    let kind = kind_of(&kind)?;
    let mut o = state
        .get(&ns, kind, &name)
        .await?
        .ok_or_else(|| not_found(&ns, kind, &name))?;
    if kind == Kind::Secret && q.get("reveal").is_some_and(|v| v == "true") {
        if who.role < Role::Admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "revealing secret values needs an admin token; {:?} is {}",
                    who.name, who.role
                ),
            ));
        }
        let data = open_secret(&state, &o)?;
        o.spec = serde_json::json!({"keys": data.keys().collect::<Vec<_>>(), "data": data});
        return Ok(Json(o));
    }
    hide_secret(&mut o);
    Ok(Json(o))
}

/// The data of a stored secret.
pub fn open_secret(
    state: &AppState,
    o: &Object,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    state
        .secrets
        .open_object(o)
        .map_err(|e| ApiError::internal("opening a secret", &e))
}

/// The log of an image's dependency build (`dispatch logs image NAME`), as text.
pub async fn image_log(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    let image = state
        .get(&ns, Kind::Image, &name)
        .await?
        .ok_or_else(|| not_found(&ns, Kind::Image, &name))?;
    let log = match &image.status.digest {
        Some(d) => state.backend.build_log(d).await,
        None => None,
    };
    let Some(log) = log else {
        return Err(ApiError::not_found(format!(
            "image {name:?} has no build log: it has no dependencies to install, or its build has not started ({})",
            image
                .phase()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "INITIALIZED".into())
        )));
    };
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        log,
    )
        .into_response())
}

/// `?dryRun=true` on a create or an update: validated and normalized as it would be
/// stored, answered, and not stored (`dispatch diff`, `apply --dry-run`).
fn dry_run(q: &HashMap<String, String>) -> bool {
    q.get("dryRun").is_some_and(|v| v == "true" || v == "All")
}

/// Stamps who writes an object (`metadata.updatedBy`: the token's name; nothing when auth is
/// off): a function's versions say who made them.
pub(super) fn written_by(obj: &mut Object, who: Option<&Principal>) {
    obj.metadata.updated_by = who.filter(|p| p.name != "-").map(|p| p.name.clone());
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Path((ns, kind)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    who: Option<Extension<Principal>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    let kind = kind_of(&kind)?;
    let mut obj: Object = parse_json(&body, "resource")?;
    written_by(&mut obj, who.as_deref());
    let mut obj = admit(&state, &ns, kind, obj).await?;
    if dry_run(&q) {
        hide_secret(&mut obj);
        return Ok((StatusCode::CREATED, Json(obj)).into_response());
    }
    let stored = state.res(move |s| s.create(obj)).await?;
    stored_changed(&state, &stored).await?;
    Ok((StatusCode::CREATED, Json(stored)).into_response())
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    who: Option<Extension<Principal>>,
    body: Bytes,
) -> Result<Json<Object>, ApiError> {
    check_namespace(&ns)?;
    let kind = kind_of(&kind)?;
    let mut obj: Object = parse_json(&body, "resource")?;
    written_by(&mut obj, who.as_deref());
    replace(&state, &ns, kind, &name, obj, dry_run(&q))
        .await
        .map(Json)
}

/// JSON merge patch (RFC 7396) of the stored object, then the same path as PUT.
pub async fn patch(
    State(state): State<Arc<AppState>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
    who: Option<Extension<Principal>>,
    body: Bytes,
) -> Result<Json<Object>, ApiError> {
    check_namespace(&ns)?;
    let kind = kind_of(&kind)?;
    if kind == Kind::Secret {
        return Err(ApiError::bad_request(
            "secrets are replaced whole: PUT the secret with all its data (dispatch update secret)",
        ));
    }
    let patch: serde_json::Value = parse_json(&body, "patch")?;
    let current = state
        .get(&ns, kind, &name)
        .await?
        .ok_or_else(|| not_found(&ns, kind, &name))?;
    let mut doc =
        serde_json::to_value(&current).map_err(|e| ApiError::internal("encoding an object", &e))?;
    merge_patch(&mut doc, &patch);
    let mut obj: Object = serde_json::from_value(doc)
        .map_err(|e| ApiError::bad_request(format!("patched resource is not valid: {e}")))?;
    written_by(&mut obj, who.as_deref());
    replace(&state, &ns, kind, &name, obj, false)
        .await
        .map(Json)
}

fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Replaces a stored resource; a `dry_run` checks and normalizes it the same way, and
/// answers what would be stored without storing it.
pub(super) async fn replace(
    state: &Arc<AppState>,
    ns: &str,
    kind: Kind,
    name: &str,
    obj: Object,
    dry_run: bool,
) -> Result<Object, ApiError> {
    if obj.metadata.name != name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {:?} does not match the name in the path {name:?}",
            obj.metadata.name
        )));
    }
    if builtin_base_image(ns, name).is_some() && kind == Kind::BaseImage {
        return Err(builtin(name).into());
    }
    let mut obj = admit(state, ns, kind, obj).await?;
    if dry_run {
        state
            .get(ns, kind, name)
            .await?
            .ok_or_else(|| not_found(ns, kind, name))?;
        hide_secret(&mut obj);
        return Ok(obj);
    }
    let stored = state.res(move |s| s.update(obj)).await?;
    stored_changed(state, &stored).await?;
    Ok(stored)
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
) -> Result<Json<Object>, ApiError> {
    check_namespace(&ns)?;
    let kind = kind_of(&kind)?;
    if kind == Kind::BaseImage && builtin_base_image(&ns, &name).is_some() {
        return Err(builtin(&name).into());
    }
    // Anything that still names it (a function: endpoints, subscriptions, event drivers).
    check_unused(&state, &ns, kind, &name).await?;
    let (nsc, namec) = (ns.clone(), name.clone());
    let deleted = state.res(move |s| s.delete(&nsc, kind, &namec)).await?;
    forget(&state, &ns, kind, &name).await?;
    Ok(Json(deleted))
}
