//! Job executions over HTTP: dispatcher's `PUT|POST /execute/{ns}/{name}` (and
//! `/execute/{name}` for the default namespace), on the API and the gateway; and
//! `/v1/namespaces/{ns}/jobexecutions[/{uuid}[/logs]]` (DELETE = cancel).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_core::{JobExecution, Logs};

use super::{ListQuery, check_namespace};
use crate::error::{ApiError, body_rejection};
use crate::state::AppState;

pub const MAX_JOB_PAYLOAD: usize = dispatch_core::MAX_PAYLOAD_BYTES;

pub async fn execute(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    run(state, ns, name, &headers, body).await
}

pub async fn execute_default(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    run(
        state,
        dispatch_core::DEFAULT_NAMESPACE.to_string(),
        name,
        &headers,
        body,
    )
    .await
}

async fn run(
    state: Arc<AppState>,
    ns: String,
    name: String,
    headers: &axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    let body = body.map_err(|r| body_rejection(r, MAX_JOB_PAYLOAD))?;
    let payload = String::from_utf8(body.to_vec()).map_err(|_| {
        ApiError::bad_request("the payload must be UTF-8 text (it becomes {{ .Payload }})")
    })?;
    let job = crate::jobs::execute(
        &state,
        &ns,
        &name,
        payload,
        None,
        crate::invoke::traceparent(headers),
    )
    .await?;
    let body = serde_json::json!({
        "uuid": job.uuid,
        "name": job.name,
        "namespace": job.namespace,
        "status": job.status(),
    });
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "/v1/namespaces/{}/jobexecutions/{}",
        job.namespace, job.uuid
    )) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `POST …/jobexecutions`: a `JobExecution` resource (dispatcher's: `metadata.name`,
/// `spec.jobTemplateName`, `spec.payload`) starts its template as an execution of that name;
/// 201 with the execution as a resource, 409 when the name exists.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    let body = body.map_err(|r| body_rejection(r, MAX_JOB_PAYLOAD))?;
    let doc: serde_json::Value = crate::error::parse_json(&body, "the job execution")?;
    let x = dispatch_core::manifest::ExecutionDoc::from_value(&doc)?;
    if let Some(other) = x.namespace.as_deref().filter(|o| *o != ns) {
        return Err(ApiError::bad_request(format!(
            "metadata.namespace {other:?} does not match the namespace in the path {ns:?}"
        )));
    }
    let job = crate::jobs::execute(
        &state,
        &ns,
        &x.template,
        x.payload,
        Some(&x.name),
        crate::invoke::traceparent(&headers),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(job.to_resource())).into_response())
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<JobExecution>>, ApiError> {
    check_namespace(&ns)?;
    let limit = q.limit()?.unwrap_or(100);
    let template = q.template;
    Ok(Json(
        state
            .db(move |s| s.list_jobs(&ns, template.as_deref(), limit))
            .await?,
    ))
}

async fn find(state: &AppState, ns: String, uuid: String) -> Result<JobExecution, ApiError> {
    check_namespace(&ns)?;
    let (n, u) = (ns.clone(), uuid.clone());
    state.db(move |s| s.get_job(&n, &u)).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "job execution {uuid:?} not found in namespace {ns:?}"
        ))
    })
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path((ns, uuid)): Path<(String, String)>,
) -> Result<Json<JobExecution>, ApiError> {
    let mut job = find(&state, ns, uuid).await?;
    if let Some(live) = state.jobs.live_logs(&job.namespace, &job.uuid) {
        job.logs = live;
    }
    Ok(Json(job))
}

/// The logs so far (while it runs) or all of them.
pub async fn logs(
    State(state): State<Arc<AppState>>,
    Path((ns, uuid)): Path<(String, String)>,
) -> Result<Json<Logs>, ApiError> {
    if let Some(live) = state.jobs.live_logs(&ns, &uuid) {
        return Ok(Json(live));
    }
    Ok(Json(find(&state, ns, uuid).await?.logs))
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path((ns, uuid)): Path<(String, String)>,
) -> Result<Json<JobExecution>, ApiError> {
    check_namespace(&ns)?;
    Ok(Json(crate::jobs::cancel(&state, &ns, &uuid).await?))
}
