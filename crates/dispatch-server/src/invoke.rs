//! One synchronous function call, shared by the API (`POST …/runs`) and the gateway:
//! look up the deployment, build the context, call the backend, hand the run record to the
//! recorder (off the hot path), answer the envelope.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use dispatch_core::{Envelope, Kind, MAX_PAYLOAD_BYTES, Phase, Run, RunStatus, Trigger};
use dispatch_runtime::InvokeError;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::state::AppState;

pub struct Call {
    pub namespace: String,
    pub function: String,
    pub payload: Box<RawValue>,
    /// The gateway's request description (`context.httpContext`).
    pub http: Option<serde_json::Value>,
    pub trigger: Trigger,
}

pub struct Answer {
    pub run_id: String,
    pub envelope: Envelope,
}

/// The context every handler receives (DESIGN §4 names).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Context<'a> {
    function: &'a str,
    namespace: &'a str,
    run_id: &'a str,
    deadline: String,
    secrets: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_context: Option<&'a serde_json::Value>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub async fn execute(state: &AppState, call: Call) -> Result<Answer, ApiError> {
    if call.payload.get().len() > MAX_PAYLOAD_BYTES {
        return Err(payload_too_large());
    }
    let Some(deployed) = state.deployed(&call.namespace, &call.function) else {
        return Err(not_ready(state, &call.namespace, &call.function).await);
    };
    let run_id = ulid::Ulid::new().to_string();
    let created = jiff::Timestamp::now();
    let deadline = created
        .checked_add(jiff::SignedDuration::from_millis(ms(deployed.timeout)))
        .unwrap_or(created);
    let ctx = Context {
        function: &call.function,
        namespace: &call.namespace,
        run_id: &run_id,
        deadline: deadline.to_string(),
        secrets: serde_json::Map::new(),
        http_context: call.http.as_ref(),
    };
    let ctx = serde_json::value::to_raw_value(&ctx)
        .map_err(|e| ApiError::internal("encoding the call context", &e))?;
    let started = Instant::now();
    let outcome = state
        .backend
        .invoke(
            &call.namespace,
            &call.function,
            &ctx,
            &call.payload,
            started + deployed.timeout,
        )
        .await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(InvokeError::NotDeployed { .. }) => {
            return Err(not_ready(state, &call.namespace, &call.function).await);
        }
        Err(InvokeError::Busy(e)) => {
            return Err(
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "Busy", e.to_string())
                    .with_retry_after(1),
            );
        }
    };
    let finished = jiff::Timestamp::now();
    let env = outcome.envelope;
    let status = match &env.context.error {
        None => RunStatus::Succeeded,
        Some(e) if e.message.starts_with("function timed out") => RunStatus::Timeout,
        Some(_) => RunStatus::Failed,
    };
    let run = Run {
        id: run_id.clone(),
        namespace: call.namespace,
        function: call.function,
        status,
        trigger: call.trigger,
        input: call.payload,
        output: env.context.error.is_none().then(|| env.payload.clone()),
        logs: env.context.logs.clone(),
        error: env.context.error.clone(),
        attempts: 1,
        cold: outcome.cold,
        timings: outcome.timings,
        created_at: created,
        started_at: created
            .checked_add(jiff::SignedDuration::from_millis(
                i64::try_from(outcome.timings.queued_ms).unwrap_or(0),
            ))
            .ok(),
        finished_at: Some(finished),
        digest: Some(deployed.digest.clone()),
    };
    state.recorder.record(run).await;
    Ok(Answer {
        run_id,
        envelope: env,
    })
}

pub fn payload_too_large() -> ApiError {
    ApiError::too_large(format!(
        "payload is larger than the limit of {} MiB",
        MAX_PAYLOAD_BYTES / (1024 * 1024)
    ))
}

/// Why a function cannot take calls: unknown (404), failed (409) or still building (503).
async fn not_ready(state: &AppState, ns: &str, name: &str) -> ApiError {
    match state.get(ns, Kind::Function, name).await {
        Err(e) => e,
        Ok(None) => ApiError::not_found(format!("function {name:?} not found in namespace {ns:?}")),
        Ok(Some(f)) if f.phase() == Some(Phase::Error) => ApiError::new(
            StatusCode::CONFLICT,
            "FunctionNotReady",
            format!("function {name:?} failed to build: {}", f.status.reason),
        ),
        Ok(Some(f)) => {
            let phase = f
                .phase()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "INITIALIZED".into());
            let why = if f.status.reason.is_empty() {
                String::new()
            } else {
                format!(", {}", f.status.reason)
            };
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "FunctionNotReady",
                format!("function {name:?} is not ready yet ({phase}{why}): retry when `dispatch get function {name}` shows READY"),
            )
            .with_retry_after(1)
        }
    }
}
