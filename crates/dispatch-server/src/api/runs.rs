//! Source upload, sync exec and run records.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_core::{Kind, Run, RunStatus, Trigger, names::validate_name};
use dispatch_runtime::source;
use dispatch_store::RunFilter;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ListQuery, MAX_EXEC_BODY, MAX_SOURCE_BYTES, check_namespace, json_answer};
use crate::error::{ApiError, body_rejection, parse_json};
use crate::invoke::{self, Invocation};
use crate::queue;
use crate::state::AppState;

/// Stores a function's source archive (tar.gz) after checking it unpacks safely; answers its
/// digest, which `spec.source` then names.
pub async fn upload_source(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    state.require_namespace(&ns)?;
    validate_name("function", &name)?;
    let body = body.map_err(|r| body_rejection(r, MAX_SOURCE_BYTES))?;
    state.disk_admits("uploads", body.len() as u64).await?;
    let blobs = state.blobs.clone();
    let store = state.stores.records.clone();
    let (digest, files) = tokio::task::spawn_blocking(move || {
        let files = source::inspect(&body)
            .map_err(|e| ApiError::bad_request(format!("source archive is not valid: {e}")))?;
        let digest = blobs
            .put(&body)
            .map_err(|e| ApiError::internal("storing a source archive", &e))?;
        // Servers sharing the store deploy from its copy.
        store
            .put_blob(&digest, &body)
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

/// `GET …/functions/{name}/source`: the files of the source the function's spec names
/// (`spec.source`), as the console's function page lists them.
pub async fn source_files(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    let Some(f) = state.get(&ns, Kind::Function, &name).await? else {
        return Err(super::resources::not_found(&ns, Kind::Function, &name));
    };
    let spec = f.typed_spec::<dispatch_core::FunctionSpec>()?;
    let Some(digest) = spec.source else {
        return Err(ApiError::not_found(format!(
            "function {ns}/{name} has no source archive (spec.source is empty): it runs its image's own handler"
        )));
    };
    let Some(archive) = state
        .blob(&digest)
        .await
        .map_err(|e| ApiError::internal("reading a source archive", &e))?
    else {
        return Err(ApiError::not_found(format!(
            "the source archive {digest} of function {ns}/{name} is not stored: upload it again (`dispatch update function {name} PATH`)"
        )));
    };
    let files = tokio::task::spawn_blocking(move || source::inspect(&archive))
        .await
        .map_err(|e| ApiError::internal("reading a source archive", &e))?
        .map_err(|e| ApiError::internal("reading a source archive", &e))?;
    Ok(Json(serde_json::json!({"digest": digest, "files": files})))
}

#[derive(Deserialize)]
pub struct StatsQuery {
    /// Only this function.
    #[serde(default)]
    function: Option<String>,
}

/// `GET …/stats`: the last hour of the namespace's functions, minute by minute (calls,
/// errors, cold starts, p50/p99), from this server's own counts — the console's charts.
pub async fn stats(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<crate::stats::NamespaceHour>, ApiError> {
    check_namespace(&ns)?;
    state.require_namespace(&ns)?;
    if let Some(f) = &q.function {
        validate_name("function", f)?;
    }
    let now = state.queue.clock.unix_minute();
    Ok(Json(state.metrics.namespace_hour(
        &ns,
        q.function.as_deref(),
        now,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExecBody {
    #[serde(default)]
    input: Option<Box<RawValue>>,
    /// Async runs: where to POST the final run record (overrides spec.callbackUrl).
    #[serde(default)]
    callback_url: Option<String>,
}

#[derive(Deserialize)]
pub struct ExecQuery {
    #[serde(default)]
    wait: Option<bool>,
    /// Stream a streaming handler's chunks as they come (server-sent events); `Accept:
    /// text/event-stream` says the same.
    #[serde(default)]
    stream: Option<bool>,
}

/// `GET …/functions/{name}/queue`: its async runs accepted and not final, its bound, and the
/// calls refused with 429 since the server started (by bound).
pub async fn function_queue(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<queue::FunctionQueue>, ApiError> {
    check_namespace(&ns)?;
    let Some(f) = state.get(&ns, Kind::Function, &name).await? else {
        return Err(super::resources::not_found(&ns, Kind::Function, &name));
    };
    let max = f
        .typed_spec::<dispatch_core::FunctionSpec>()?
        .max_queued
        .map(|n| n as usize);
    Ok(Json(state.queue.function_queue(&(ns, name), max)))
}

/// `GET …/functions/{name}/logs?follow=true`: the lines every call of the function prints
/// from now on — sync gateway and API calls, WebSocket messages, async, event and cron runs —
/// as they are printed, one JSON object per line (`{"run","stream","line"}`), until the
/// caller goes away. A follower that falls more than 256 lines behind gets
/// `{"lagged": N}` (the lines it missed; the runs' records keep them) and goes on.
pub async fn function_logs(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    if !q.follow {
        return Err(ApiError::bad_request(format!(
            "a function's lines are followed as they are printed: add ?follow=true \
             (dispatch logs function {name} --follow); a run's logs are at …/runs/ID/logs"
        )));
    }
    if state.get(&ns, Kind::Function, &name).await?.is_none() {
        return Err(super::resources::not_found(&ns, Kind::Function, &name));
    }
    let follower = state.live_logs.follow_function(&ns, &name);
    let lines = futures_util::stream::unfold(follower, |mut f| async move {
        let mut v = match f.next().await? {
            Ok(line) => serde_json::to_vec(&line).ok()?,
            Err(missed) => serde_json::to_vec(&serde_json::json!({ "lagged": missed })).ok()?,
        };
        v.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(v)), f))
    });
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/x-ndjson"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// `POST …/functions/{name}/runs` with `{"input": …}`: runs the function and answers its
/// envelope, with the run id in `X-Dispatch-Run-Id`.
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<ExecQuery>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_namespace(&ns)?;
    let body = body.map_err(|r| body_rejection(r, MAX_EXEC_BODY))?;
    let (payload, callback_url) = if body.iter().all(u8::is_ascii_whitespace) {
        (dispatch_core::envelope::null_raw(), None)
    } else {
        let b: ExecBody = parse_json(&body, "exec request (expected {\"input\": …})")?;
        (
            b.input.unwrap_or_else(dispatch_core::envelope::null_raw),
            b.callback_url,
        )
    };
    if let Some(url) = &callback_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(ApiError::bad_request(format!(
            "callbackUrl {url:?} must be an http:// or https:// URL"
        )));
    }
    if q.wait == Some(false) {
        if payload.get().len() > dispatch_core::MAX_PAYLOAD_BYTES {
            return Err(invoke::CallError::PayloadTooLarge.into());
        }
        let inv = Invocation::new(&ns, &name, payload, Trigger::Exec)
            .callback(callback_url)
            .affinity(crate::versions::affinity_of(&headers))
            .traced(&headers);
        let run = queue::enqueue(&state, inv).await?;
        return Ok(accepted(&run));
    }
    if callback_url.is_some() {
        return Err(ApiError::bad_request(
            "callbackUrl is for async runs: add ?wait=false",
        ));
    }
    let inv = Invocation::new(&ns, &name, payload, Trigger::Exec)
        .affinity(crate::versions::affinity_of(&headers))
        .traced(&headers);
    if q.stream == Some(true) || crate::stream::wants_sse(&headers) {
        // A token holder sees the whole error, as in the envelope.
        let ending =
            crate::stream::ending(|e, run_id, _| serde_json::json!({"error": e, "runId": run_id}));
        let whole = |outcome: Result<invoke::Answer, invoke::CallError>| match outcome {
            Ok(a) => envelope_answer(&a),
            Err(e) => ApiError::from(e).into_response(),
        };
        return Ok(crate::stream::answer(
            state.clone(),
            inv,
            crate::stream::Format::Sse,
            whole,
            ending,
        )
        .await);
    }
    let answer = invoke::execute(&state, inv).await?;
    Ok(envelope_answer(&answer))
}

/// 200 with the envelope, its run id in `X-Dispatch-Run-Id`.
fn envelope_answer(answer: &invoke::Answer) -> Response {
    match serde_json::to_string(&answer.envelope) {
        Ok(body) => json_answer(StatusCode::OK, body, &answer.run_id),
        Err(e) => ApiError::internal("encoding an envelope", &e).into_response(),
    }
}

/// 202 with the run's id and where to watch it.
pub fn accepted(run: &Run) -> Response {
    let mut body = serde_json::json!({
        "id": run.id,
        "namespace": run.namespace,
        "function": run.function,
        "status": run.status,
    });
    // The server that holds it, when several share the store.
    if let Some(r) = &run.replica {
        body["replica"] = r.as_str().into();
    }
    let mut resp = (StatusCode::ACCEPTED, Json(body)).into_response();
    let h = resp.headers_mut();
    if let Ok(v) =
        HeaderValue::from_str(&format!("/v1/namespaces/{}/runs/{}", run.namespace, run.id))
    {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&run.id) {
        h.insert("x-dispatch-run-id", v);
    }
    resp
}

/// `DELETE …/runs/{id}`: cancel.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<Run>, ApiError> {
    check_namespace(&ns)?;
    Ok(Json(queue::cancel(&state, &ns, &id).await?))
}

/// `POST …/runs/{id}/redrive`: re-queue a DEAD run.
pub async fn redrive_one(
    State(state): State<Arc<AppState>>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<Run>, ApiError> {
    let run = find_run(&state, ns, id).await?;
    Ok(Json(queue::redrive(&state, run).await?))
}

/// `POST …/runs/redrive?function=F`: re-queue every DEAD run (of a function).
pub async fn redrive_all(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    let filter = RunFilter {
        function: q.function,
        status: Some(RunStatus::Dead),
        limit: Some(100_000),
        ..Default::default()
    };
    let dead = state.list_runs(&ns, filter).await?;
    let mut ids = Vec::new();
    for run in dead {
        ids.push(queue::redrive(&state, run).await?.id);
    }
    Ok(Json(serde_json::json!({"redriven": ids.len(), "ids": ids})))
}

/// `DELETE …/runs?function=&status=`: delete finished runs (never queued or running ones).
pub async fn purge(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_namespace(&ns)?;
    let status = parse_status(q.status.as_deref())?;
    if status.is_some_and(|s| !s.is_final()) {
        return Err(ApiError::bad_request(
            "only finished runs are purged: cancel queued or running runs first",
        ));
    }
    let function = q.function;
    state.recorder.flush().await;
    let n = state.purge_runs(&ns, function, status).await?;
    Ok(Json(serde_json::json!({"deleted": n})))
}

fn parse_status(s: Option<&str>) -> Result<Option<RunStatus>, ApiError> {
    match s {
        None => Ok(None),
        Some(s) => RunStatus::parse(s).map(Some).ok_or_else(|| {
            let all: Vec<String> = RunStatus::ALL
                .iter()
                .map(|s| s.as_str().to_ascii_lowercase())
                .collect();
            ApiError::bad_request(format!(
                "unknown run status {s:?}: use one of {}",
                all.join(", ")
            ))
        }),
    }
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Run>>, ApiError> {
    check_namespace(&ns)?;
    let status = parse_status(q.status.as_deref())?;
    let limit = q.limit()?;
    if let Some(a) = &q.after
        && ulid::Ulid::from_string(a).is_err()
    {
        return Err(ApiError::bad_request(format!(
            "after {a:?} is not a run id: pass the id of the last run of the previous page"
        )));
    }
    let filter = RunFilter {
        since: q
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: q
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        function: q.function,
        status,
        limit,
        after: q.after,
    };
    state.recorder.flush().await;
    Ok(Json(state.list_runs(&ns, filter).await?))
}

/// A time of `?since=` / `?until=`: RFC 3339 (`2026-12-05T10:00:00Z`) or a duration ago
/// (`90s`, `15m`, `2h`, `7d`).
fn parse_time(name: &str, s: &str) -> Result<jiff::Timestamp, ApiError> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    dispatch_core::duration::parse_duration(s)
        .ok()
        .and_then(|d| jiff::SignedDuration::try_from(d).ok())
        .and_then(|d| jiff::Timestamp::now().checked_sub(d).ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} {s:?} is neither a time (2026-12-05T10:00:00Z) nor a duration ago (15m, 2h, 7d)"
            ))
        })
}

async fn find_run(state: &AppState, ns: String, id: String) -> Result<Run, ApiError> {
    check_namespace(&ns)?;
    if let Some(r) = state.get_run(&ns, &id).await? {
        return Ok(r);
    }
    // It may still be on its way to the store.
    state.recorder.flush().await;
    state
        .get_run(&ns, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {id:?} not found in namespace {ns:?}")))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<Run>, ApiError> {
    find_run(&state, ns, id).await.map(Json)
}

#[derive(serde::Deserialize)]
pub struct LogsQuery {
    /// Stream the lines of the attempt running here as they are printed (NDJSON).
    #[serde(default)]
    follow: bool,
}

/// The run's logs (its last attempt's); with `?follow=true`, the lines of the attempt
/// running on this server as they are printed, one JSON object per line
/// (`{"stream","line"}`: the lines so far, then each new one), ending when the attempt ends —
/// or at once when none runs here (the record has the logs then). A follower that cannot
/// have every line (it came after the first 256, or fell behind) gets `{"lagged": true}` last
/// and reads the rest from the record.
pub async fn logs(
    State(state): State<Arc<AppState>>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let run = find_run(&state, ns, id).await?;
    if !q.follow {
        return Ok(Json(run.logs).into_response());
    }
    let nl = |mut v: Vec<u8>| {
        v.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(v))
    };
    let lagged = move || nl(br#"{"lagged":true}"#.to_vec());
    use crate::live::Following;
    let (so_far, next) = match state.live_logs.follow(&run.id) {
        Following::NotHere => (Vec::new(), None),
        Following::TooLate => (vec![lagged()], None),
        Following::Lines(lines, rx) => (
            lines
                .iter()
                .filter_map(|l| serde_json::to_vec(l).ok().map(nl))
                .collect(),
            Some(rx),
        ),
    };
    let next = futures_util::stream::unfold(next, move |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Ok(l) => Some((nl(serde_json::to_vec(&l).ok()?), Some(rx))),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some((lagged(), None)),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    let body = futures_util::StreamExt::chain(futures_util::stream::iter(so_far), next);
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/x-ndjson"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}
