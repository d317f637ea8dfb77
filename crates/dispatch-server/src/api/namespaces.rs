//! Namespaces (Dispatch's organizations): `GET|POST /v1/namespaces`,
//! `GET|DELETE /v1/namespaces/{ns}` (`?cascade=true` deletes what is in it).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dispatch_core::{DEFAULT_NAMESPACE, Kind};
use serde::Deserialize;

use super::check_namespace;
use crate::auth::Principal;
use crate::error::{ApiError, parse_json};
use crate::state::AppState;

fn view(name: &str, created: Option<jiff::Timestamp>) -> serde_json::Value {
    serde_json::json!({"apiVersion": dispatch_core::API_VERSION, "kind": "Namespace",
        "metadata": {"name": name, "createdAt": created}})
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
) -> Json<Vec<serde_json::Value>> {
    let all = state.namespaces();
    Json(
        all.into_iter()
            .filter(|(n, _)| who.covers(n))
            .map(|(n, c)| view(&n, c))
            .collect(),
    )
}

#[derive(Deserialize)]
struct NewNamespace {
    name: String,
}

pub async fn create(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: NewNamespace = parse_json(&body, "namespace (expected {\"name\": …})")?;
    check_namespace(&req.name)?;
    if !state.create_namespace(&req.name).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("namespace {:?} already exists", req.name),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(view(&req.name, Some(state.queue.clock.now()))),
    )
        .into_response())
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    state.require_namespace(&ns)?;
    let created = state
        .namespaces()
        .into_iter()
        .find(|(n, _)| *n == ns)
        .and_then(|(_, c)| c);
    Ok(Json(view(&ns, created)))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    if ns == DEFAULT_NAMESPACE {
        return Err(ApiError::conflict(
            "the default namespace cannot be deleted",
        ));
    }
    state.require_namespace(&ns)?;
    let cascade = q.get("cascade").is_some_and(|v| v == "true");
    let nsc = ns.clone();
    let contents = state
        .db(move |s| {
            let mut found = Vec::new();
            for kind in Kind::ALL {
                for o in s.list(Some(&nsc), kind)? {
                    found.push((kind, o.metadata.name));
                }
            }
            Ok(found)
        })
        .await?;
    if !contents.is_empty() && !cascade {
        let names: Vec<String> = contents
            .iter()
            .take(10)
            .map(|(k, n)| format!("{}/{n}", k.cli_name()))
            .collect();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "NotEmpty",
            format!(
                "namespace {ns:?} is not empty ({} resources: {}{}): delete them, or pass --cascade",
                contents.len(),
                names.join(", "),
                if contents.len() > 10 { ", …" } else { "" }
            ),
        ));
    }
    // Stop what runs there before the records go.
    for (kind, name) in &contents {
        match kind {
            Kind::Function => {
                state.set_deployed(&ns, name, None);
                state.queue.forget_function(&ns, name);
                state.backend.remove_function(&ns, name).await;
            }
            Kind::JobTemplate => crate::jobs::forget_template(&state, &ns, name).await?,
            _ => {}
        }
    }
    state.recorder.flush().await;
    state.delete_namespace(&ns).await?;
    state.rebuild_routes().await?;
    Ok(Json(
        serde_json::json!({"deleted": ns, "resources": contents.len()}),
    ))
}
