//! Namespaces (Dispatch's organizations): `GET|POST /v1/namespaces`,
//! `GET|PATCH|DELETE /v1/namespaces/{ns}` (`?cascade=true` deletes what is in it). A
//! namespace's `spec.runHistoryBudget` overrides the server's `--run-history-budget` for its
//! run records (set by a cluster admin: it is a limit that protects the server); its status
//! shows what its run records take against the budget in force.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dispatch_core::DEFAULT_NAMESPACE;
use serde::Deserialize;

use super::check_namespace;
use crate::auth::Principal;
use crate::error::{ApiError, parse_json};
use crate::state::{AppState, NamespaceInfo};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSpec {
    /// A size (`256Mi`, or a number of bytes); `null` clears it (the server's default).
    #[serde(default)]
    run_history_budget: Option<serde_json::Value>,
}

/// The budget of a spec: `Ok(None)` when absent or null.
fn budget_of(spec: &NamespaceSpec) -> Result<Option<u64>, ApiError> {
    let bad = |why: String| {
        ApiError::bad_request(format!(
            "spec.runHistoryBudget {why}: write a size such as \"256Mi\" or \"2Gi\" (null: the server's --run-history-budget)"
        ))
    };
    let bytes = match &spec.run_history_budget {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => dispatch_core::quantity::parse_bytes(s)
            .map_err(|e| bad(format!("is not valid ({e})")))?,
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad(format!("{n} is not a number of bytes")))?,
        Some(other) => return Err(bad(format!("is {other}, not a size"))),
    };
    if bytes < MIN_BUDGET {
        return Err(bad(format!(
            "is {}, below the least budget of {}",
            dispatch_core::quantity::human_bytes(bytes),
            dispatch_core::quantity::human_bytes(MIN_BUDGET)
        )));
    }
    Ok(Some(bytes))
}

/// A budget smaller than one large run record would prune every record at once.
const MIN_BUDGET: u64 = 1 << 20;

fn view(
    state: &AppState,
    name: &str,
    info: &NamespaceInfo,
    usage: Option<&dispatch_store::RunUsage>,
) -> serde_json::Value {
    let mut spec = serde_json::Map::new();
    if let Some(b) = info.run_history_budget {
        // Exact: `256Mi`, or the number of bytes when no unit says it without rounding.
        let size = dispatch_core::quantity::human_bytes(b);
        let exact = if size.contains('.') || size.ends_with(" bytes") {
            b.to_string()
        } else {
            size
        };
        spec.insert("runHistoryBudget".into(), exact.into());
    }
    let budget = info.run_history_budget.or(state.config.run_history_budget);
    serde_json::json!({"apiVersion": dispatch_core::API_VERSION, "kind": "Namespace",
    "metadata": {"name": name, "createdAt": info.created},
    "spec": spec,
    "status": {"runHistory": {
        "runs": usage.map_or(0, |u| u.runs),
        "bytes": usage.map_or(0, |u| u.bytes),
        "budget": budget,
        "budgetFrom": if info.run_history_budget.is_some() { "namespace" } else { "server" },
    }}})
}

/// What every namespace's run records take.
async fn usage(state: &AppState) -> Result<Vec<dispatch_store::RunUsage>, ApiError> {
    Ok(state.run_usage().await?)
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let all = state.namespaces();
    let used = usage(&state).await?;
    Ok(Json(
        all.into_iter()
            .filter(|(n, _)| who.covers(n))
            .map(|(n, info)| view(&state, &n, &info, used.iter().find(|u| u.namespace == n)))
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNamespace {
    name: String,
    #[serde(default)]
    spec: NamespaceSpec,
}

pub async fn create(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: NewNamespace = parse_json(
        &body,
        "namespace (expected {\"name\": …, \"spec\": {\"runHistoryBudget\": \"256Mi\"}})",
    )?;
    check_namespace(&req.name)?;
    // Checked before anything is stored: bad input leaves no namespace behind.
    let budget = budget_of(&req.spec)?;
    if !state.create_namespace(&req.name).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("namespace {:?} already exists", req.name),
        ));
    }
    let info = match budget {
        Some(b) => state.set_run_history_budget(&req.name, Some(b)).await?,
        None => state.namespace(&req.name)?,
    };
    Ok((
        StatusCode::CREATED,
        Json(view(&state, &req.name, &info, None)),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespacePatch {
    spec: NamespaceSpec,
}

/// `PATCH /v1/namespaces/{ns}` `{"spec": {"runHistoryBudget": "2Gi" | null}}`.
pub async fn patch(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    state.require_namespace(&ns)?;
    let req: NamespacePatch = parse_json(
        &body,
        "namespace change (expected {\"spec\": {\"runHistoryBudget\": \"256Mi\" or null}})",
    )?;
    let budget = budget_of(&req.spec)?;
    let info = state.set_run_history_budget(&ns, budget).await?;
    // The new budget is applied by the next retention pass (within a second).
    shown(&state, &ns, &info).await
}

/// One namespace as the API shows it, with what its run records take now.
async fn shown(
    state: &AppState,
    ns: &str,
    info: &NamespaceInfo,
) -> Result<Json<serde_json::Value>, ApiError> {
    let used = usage(state).await?;
    Ok(Json(view(
        state,
        ns,
        info,
        used.iter().find(|u| u.namespace == ns),
    )))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    let info = state.namespace(&ns)?;
    shown(&state, &ns, &info).await
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
    let cascade = q.get("cascade").is_some_and(|v| v == "true");
    let removed = crate::resources::delete_namespace(&state, &ns, cascade).await?;
    Ok(Json(
        serde_json::json!({"deleted": ns, "resources": removed}),
    ))
}
