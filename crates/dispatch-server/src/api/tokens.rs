//! `/v1/tokens` (admin), `/v1/whoami`, `/v1/audit` (admin).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dispatch_core::auth::{ALL_NAMESPACES, ApiToken, AuditEntry, Role};
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::{ApiError, parse_json};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
    /// A namespace, or `*` for all.
    namespace: String,
    /// e.g. `30d`; none = never expires.
    #[serde(default)]
    expires: Option<String>,
}

pub async fn create(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: NewToken = parse_json(
        &body,
        "token request (expected {\"name\", \"role\", \"namespace\", \"expires\"?})",
    )?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::bad_request(format!(
            "role {:?} is not valid: use admin, developer or viewer",
            req.role
        ))
    })?;
    let expires = match &req.expires {
        Some(e) => Some(dispatch_core::duration::parse_duration(e)?),
        None => None,
    };
    let (token, record) = state
        .create_token(&req.name, role, &req.namespace, expires)
        .await?;
    let mut body = serde_json::to_value(record.public()).unwrap_or_default();
    body["token"] = token.into();
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Vec<ApiToken>>, ApiError> {
    let all = state.db(|s| s.list_tokens()).await?;
    Ok(Json(all.iter().map(ApiToken::public).collect()))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let n = name.clone();
    if !state.db(move |s| s.delete_token(&n)).await? {
        return Err(ApiError::not_found(format!("token {name:?} not found")));
    }
    state.tokens.remove(&name);
    Ok(Json(serde_json::json!({"deleted": name})))
}

pub async fn whoami(Extension(p): Extension<Principal>) -> Json<serde_json::Value> {
    let all = p.namespace == ALL_NAMESPACES;
    Json(
        serde_json::json!({"name": p.name, "role": p.role, "namespace": p.namespace, "allNamespaces": all}),
    )
}

pub async fn audit(
    State(state): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100usize)
        .min(10_000);
    Ok(Json(state.db(move |s| s.list_audit(limit)).await?))
}
