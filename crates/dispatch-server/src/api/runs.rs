//! Source upload, sync exec and run records.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_core::{Logs, Run, RunStatus, Trigger, names::validate_name};
use dispatch_runtime::source;
use dispatch_store::RunFilter;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{MAX_EXEC_BODY, MAX_SOURCE_BYTES, check_namespace};
use crate::error::{ApiError, body_rejection, parse_json};
use crate::invoke::{self, Call};
use crate::state::AppState;

/// Stores a function's source archive (tar.gz) after checking it unpacks safely; answers its
/// digest, which `spec.source` then names.
pub async fn upload_source(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    validate_name("function", &name)?;
    let body = body.map_err(|r| body_rejection(r, MAX_SOURCE_BYTES))?;
    let blobs = state.blobs.clone();
    let (digest, files) = tokio::task::spawn_blocking(move || {
        let files = source::inspect(&body)
            .map_err(|e| ApiError::bad_request(format!("source archive is not valid: {e}")))?;
        let digest = blobs
            .put(&body)
            .map_err(|e| ApiError::internal("storing a source archive", &e))?;
        Ok::<_, ApiError>((digest, files))
    })
    .await
    .map_err(|e| ApiError::internal("storing a source archive", &e))??;
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"digest": digest, "files": paths})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    #[serde(default)]
    input: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
pub struct ExecQuery {
    #[serde(default)]
    wait: Option<bool>,
}

/// `POST …/functions/{name}/runs` with `{"input": …}`: runs the function and answers its
/// envelope, with the run id in `X-Dispatch-Run-Id`.
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<ExecQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    if q.wait == Some(false) {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "async runs (?wait=false) are not available in this server version: call without it",
        ));
    }
    let body = body.map_err(|r| body_rejection(r, MAX_EXEC_BODY))?;
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        dispatch_core::envelope::null_raw()
    } else {
        let b: ExecBody = parse_json(&body, "exec request (expected {\"input\": …})")?;
        b.input.unwrap_or_else(dispatch_core::envelope::null_raw)
    };
    let call = Call {
        namespace: ns,
        function: name,
        payload,
        http: None,
        trigger: Trigger::Exec,
    };
    let answer = invoke::execute(&state, call).await?;
    let body = serde_json::to_string(&answer.envelope)
        .map_err(|e| ApiError::internal("encoding an envelope", &e))?;
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&answer.run_id) {
        h.insert("x-dispatch-run-id", v);
    }
    Ok(resp)
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Run>>, ApiError> {
    check_namespace(&ns)?;
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            let all: Vec<String> = RunStatus::ALL
                .iter()
                .map(|s| s.as_str().to_ascii_lowercase())
                .collect();
            ApiError::bad_request(format!(
                "unknown run status {s:?}: use one of {}",
                all.join(", ")
            ))
        })?),
    };
    let limit = match q.get("limit") {
        None => None,
        Some(l) => Some(
            l.parse::<usize>()
                .ok()
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("limit {l:?} is not a number from 1 to 10000"))
                })?,
        ),
    };
    let filter = RunFilter {
        function: q.get("function").cloned(),
        status,
        limit,
    };
    state.recorder.flush().await;
    Ok(Json(state.db(move |s| s.list_runs(&ns, &filter)).await?))
}

async fn find_run(state: &AppState, ns: String, id: String) -> Result<Run, ApiError> {
    check_namespace(&ns)?;
    let lookup = |ns: String, id: String| state.db(move |s| s.get_run(&ns, &id));
    if let Some(r) = lookup(ns.clone(), id.clone()).await? {
        return Ok(r);
    }
    // It may still be on its way to the store.
    state.recorder.flush().await;
    lookup(ns.clone(), id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {id:?} not found in namespace {ns:?}")))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<Run>, ApiError> {
    find_run(&state, ns, id).await.map(Json)
}

pub async fn logs(
    State(state): State<Arc<AppState>>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<Logs>, ApiError> {
    find_run(&state, ns, id).await.map(|r| Json(r.logs))
}
