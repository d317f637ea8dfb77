//! One function call, shared by the API (`POST …/runs`), the gateway, events, cron and the
//! async queue: an [`Invocation`] says what to call with what; [`execute`] runs it now (the
//! synchronous path: it also hands the run record to the recorder, off the hot path, and
//! answers the envelope), `queue::enqueue` accepts it for later. Either way the handler gets
//! the same context, built by [`call_deployed`].

use std::time::{Duration, Instant};

use dispatch_core::{Envelope, Kind, MAX_PAYLOAD_BYTES, Phase, Run, RunStatus, Trigger};
use dispatch_runtime::{CallOutcome, InvokeError};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::state::{AppState, Deployed, StateError};

/// Why a function is not called now.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Its workers and their wait bound are all taken; retry in a moment.
    #[error("{0}")]
    Busy(String),
    #[error(
        "payload is larger than the limit of {} MiB",
        MAX_PAYLOAD_BYTES / (1024 * 1024)
    )]
    PayloadTooLarge,
    #[error("function {function:?} not found in namespace {namespace:?}")]
    NotFound { namespace: String, function: String },
    #[error("function {function:?} failed to build: {reason}")]
    BuildFailed { function: String, reason: String },
    /// Still building (or deploying): retry when it is READY.
    #[error(
        "function {function:?} is not ready yet ({phase}{why}): retry when `dispatch get \
         function {function}` shows READY"
    )]
    NotReady {
        function: String,
        phase: String,
        why: String,
    },
    /// A version or an alias it names is not there, or cannot be served.
    #[error(transparent)]
    Version(#[from] crate::versions::VersionError),
    /// The function reference itself is not valid (`hello@`).
    #[error(transparent)]
    Invalid(dispatch_core::ValidationError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// One call of a function, whoever asks for it and whenever it runs.
pub struct Invocation {
    pub namespace: String,
    pub function: String,
    pub payload: Box<RawValue>,
    pub trigger: Trigger,
    /// The gateway's request description (`context.httpContext`).
    pub http: Option<serde_json::Value>,
    /// The CloudEvent without its data (`context.event`).
    pub event: Option<serde_json::Value>,
    /// Async only: where the final record is POSTed (before the function's `callbackUrl`).
    pub callback: Option<String>,
    /// Keeps a caller on one version of an alias (`X-Dispatch-Affinity`, a cookie).
    pub affinity: Option<String>,
    /// Sync only: where a streaming handler's chunks go as it yields them.
    pub stream: Option<dispatch_runtime::Sink>,
    /// Sync only: the run's id, when the caller must know it before the call ends (a
    /// streamed answer names it in its headers).
    pub run_id: Option<String>,
    /// A WebSocket endpoint's connection (`context.connection`).
    pub connection: Option<serde_json::Value>,
    /// Sync only: how long the call may take instead of the function's timeout (a
    /// WebSocket session lasts as long as its connection may).
    pub timeout: Option<Duration>,
    /// The W3C trace it joins (none: a new one is started for it).
    pub trace: Option<dispatch_core::trace::Trace>,
}

/// A request's W3C `traceparent` header, as sent (`trace::parse` says whether it is valid).
pub fn traceparent(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get("traceparent").and_then(|v| v.to_str().ok())
}

impl Invocation {
    pub fn new(namespace: &str, function: &str, payload: Box<RawValue>, trigger: Trigger) -> Self {
        Invocation {
            namespace: namespace.to_string(),
            function: function.to_string(),
            payload,
            trigger,
            http: None,
            event: None,
            callback: None,
            affinity: None,
            stream: None,
            run_id: None,
            connection: None,
            timeout: None,
            trace: None,
        }
    }

    /// Joins the trace of the caller's `traceparent` header (a span of the server's under
    /// the caller's), or starts one when it has none or an invalid one.
    pub fn traced(mut self, headers: &axum::http::HeaderMap) -> Self {
        self.trace = Some(dispatch_core::trace::Trace::child_of(traceparent(headers)));
        self
    }

    pub fn trace(mut self, trace: dispatch_core::trace::Trace) -> Self {
        self.trace = Some(trace);
        self
    }

    pub fn connection(mut self, connection: serde_json::Value) -> Self {
        self.connection = Some(connection);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn stream(mut self, sink: dispatch_runtime::Sink) -> Self {
        self.stream = Some(sink);
        self
    }

    pub fn affinity(mut self, key: Option<String>) -> Self {
        self.affinity = key;
        self
    }

    pub fn http(mut self, http: serde_json::Value) -> Self {
        self.http = Some(http);
        self
    }

    /// A CloudEvent's call: in the trace its `traceparent` extension names (CloudEvents'
    /// distributed tracing extension), else a new one; each delivery a span of its own.
    pub fn event(mut self, event: serde_json::Value) -> Self {
        let tp = event.get("traceparent").and_then(serde_json::Value::as_str);
        self.trace = Some(dispatch_core::trace::Trace::child_of(tp));
        self.event = Some(event);
        self
    }

    pub fn callback(mut self, url: Option<String>) -> Self {
        self.callback = url;
        self
    }
}

pub struct Answer {
    pub run_id: String,
    pub envelope: Envelope,
    pub status: RunStatus,
}

/// The context every handler receives (DESIGN §4 names).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Context<'a> {
    function: &'a str,
    namespace: &'a str,
    run_id: &'a str,
    deadline: String,
    secrets: &'a serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_context: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<dispatch_core::trace::TraceContext<'a>>,
}

/// What a call carries besides its run: the gateway's request, a WebSocket connection, a
/// timeout of its own, where its chunks go.
#[derive(Default, Clone, Copy)]
pub struct Extras<'a> {
    pub http: Option<&'a serde_json::Value>,
    pub connection: Option<&'a serde_json::Value>,
    pub timeout: Option<Duration>,
    pub sink: Option<&'a dispatch_runtime::Sink>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Calls a deployed function once: builds the context (deadline from its timeout) and hands
/// it to the deployment's handle (no lookup by name).
pub async fn call_deployed(
    deployed: &Deployed,
    run: &Run,
    extras: Extras<'_>,
) -> Result<CallOutcome, InvokeError> {
    let timeout = extras.timeout.unwrap_or(deployed.timeout);
    let now = jiff::Timestamp::now();
    let deadline = now
        .checked_add(jiff::SignedDuration::from_millis(ms(timeout)))
        .unwrap_or(now);
    let ctx = Context {
        function: &run.function,
        namespace: &run.namespace,
        run_id: &run.id,
        deadline: deadline.to_string(),
        secrets: &deployed.secrets,
        http_context: extras.http,
        attempt: run.is_async.then_some(run.attempts),
        event: run.event.as_ref(),
        connection: extras.connection,
        trace: run.trace.as_ref().map(dispatch_core::trace::Trace::context),
    };
    // Serializing a struct of strings and a JSON value cannot fail.
    let ctx = serde_json::value::to_raw_value(&ctx)
        .unwrap_or_else(|_| dispatch_core::envelope::null_raw());
    let deadline = Instant::now() + timeout;
    match extras.sink {
        None => deployed.handle.invoke(&ctx, &run.input, deadline).await,
        Some(s) => {
            s.set_idle_timeout(deployed.stream_idle);
            deployed
                .handle
                .invoke_streaming(&ctx, &run.input, deadline, s)
                .await
        }
    }
}

/// The final status of one attempt: the backend says whether it ran out of time.
pub fn status_of(outcome: &CallOutcome) -> RunStatus {
    match &outcome.envelope.context.error {
        None => RunStatus::Succeeded,
        Some(_) if outcome.cancelled => RunStatus::Cancelled,
        Some(_) if outcome.timed_out => RunStatus::Timeout,
        Some(_) => RunStatus::Failed,
    }
}

/// The secret values of a deployment (what redaction looks for).
pub(crate) fn secret_values(deployed: &Deployed) -> Vec<String> {
    deployed
        .secrets
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// Removes secret values from what a call printed and from its error.
fn redact_envelope(env: &mut Envelope, deployed: &Deployed) {
    if deployed.secrets.is_empty() {
        return;
    }
    let values = secret_values(deployed);
    let r = |s: &str| crate::secrets::redact(s, &values);
    for l in env
        .context
        .logs
        .stdout
        .iter_mut()
        .chain(env.context.logs.stderr.iter_mut())
    {
        *l = r(l);
    }
    if let Some(e) = &mut env.context.error {
        e.message = r(&e.message);
        for l in &mut e.stacktrace {
            *l = r(l);
        }
    }
}

/// Redacts secret values from an attempt's envelope (logs, error) in place, then copies the
/// outcome into its run record (logs capped, output redacted too). Redacting the envelope
/// first means every later reader — the caller's response, retry bookkeeping — sees only the
/// redacted text, and the work is done once. Counts the attempt, which `took` this long, in
/// the metrics.
pub fn apply_outcome(
    run: &mut Run,
    outcome: &mut CallOutcome,
    deployed: &Deployed,
    state: &AppState,
    took: Duration,
) {
    let max_log_bytes = state.config.max_log_bytes;
    redact_envelope(&mut outcome.envelope, deployed);
    run.status = status_of(outcome);
    let env = &outcome.envelope;
    run.output = env.context.error.is_none().then(|| env.payload.clone());
    run.logs = env.context.logs.clone();
    run.logs.cap(max_log_bytes);
    run.error = env.context.error.clone();
    run.cold = outcome.cold;
    run.cold_start = outcome.cold_start;
    state.metrics.record(run.status, run.cold_start.as_ref());
    deployed.metrics.record(
        run.status,
        env.context.error.as_ref().map(|e| e.kind),
        outcome.cold,
        took,
        state.queue.clock.unix_minute(),
    );
    run.timings = outcome.timings;
    run.stream = outcome.stream;
    run.digest = Some(deployed.digest.clone());
    run.version = deployed.version;
    if let Some(e) = state.otlp.get() {
        crate::otlp::call_spans(e, run, took);
    }
    if let Some(out) = &run.output
        && !deployed.secrets.is_empty()
    {
        let text = crate::secrets::redact(out.get(), &secret_values(deployed));
        if text != out.get() {
            // Redaction can break JSON (a value inside a number); then keep it as a string.
            run.output = Some(
                serde_json::value::RawValue::from_string(text.clone()).unwrap_or_else(|_| {
                    serde_json::value::to_raw_value(&text)
                        .unwrap_or_else(|_| dispatch_core::envelope::null_raw())
                }),
            );
        }
    }
}

/// Runs an invocation now. Its sync record keeps no `httpContext` (history stays small); the
/// handler gets it all the same.
pub async fn execute(state: &AppState, mut call: Invocation) -> Result<Answer, CallError> {
    if call.payload.get().len() > MAX_PAYLOAD_BYTES {
        return Err(CallError::PayloadTooLarge);
    }
    let (deployed, function) = crate::versions::resolve(
        state,
        &call.namespace,
        &call.function,
        call.affinity.as_deref(),
    )
    .await?;
    let created = jiff::Timestamp::now();
    let mut run = Run::new(
        call.run_id
            .take()
            .unwrap_or_else(dispatch_core::run::new_run_id),
        &call.namespace,
        &function,
        call.trigger,
        call.payload,
        created,
    );
    run.attempts = 1;
    run.event = call.event;
    run.trace = Some(
        call.trace
            .take()
            .unwrap_or_else(|| dispatch_core::trace::Trace::child_of(None)),
    );
    // Someone follows the function (`dispatch logs function NAME -f`): its lines go to them
    // as they are printed.
    let mut sink = call.stream.take();
    if let Some(l) = state
        .live_logs
        .for_call(&run.id, (&run.namespace, &run.function), || {
            secret_values(&deployed)
        })
    {
        sink = Some(match sink {
            Some(s) => s.with_logs(l),
            None => dispatch_runtime::Sink::logs_only(l),
        });
    }
    let extras = Extras {
        http: call.http.as_ref(),
        connection: call.connection.as_ref(),
        timeout: call.timeout,
        sink: sink.as_ref(),
    };
    let started = Instant::now();
    let outcome = match call_deployed(&deployed, &run, extras).await {
        Ok(o) => o,
        Err(InvokeError::NotDeployed { .. }) => {
            return Err(not_ready(state, &run.namespace, &run.function).await);
        }
        Err(InvokeError::Busy(e)) => {
            state.queue.count_busy(&run.namespace, &run.function);
            return Err(CallError::Busy(e.to_string()));
        }
    };
    let mut outcome = outcome;
    apply_outcome(&mut run, &mut outcome, &deployed, state, started.elapsed());
    let envelope = outcome.envelope;
    run.started_at = created
        .checked_add(jiff::SignedDuration::from_millis(
            i64::try_from(outcome.timings.queued_ms).unwrap_or(0),
        ))
        .ok();
    run.finished_at = Some(jiff::Timestamp::now());
    let (run_id, status) = (run.id.clone(), run.status);
    // spec.history: metrics counted the call already (apply_outcome); the record is optional.
    if deployed.history.records(run.error.is_some(), &run.id) {
        state.recorder.record(run).await;
    }
    Ok(Answer {
        run_id,
        envelope,
        status,
    })
}

/// Why a function cannot take calls: unknown (404), failed (409) or still building (503).
pub async fn not_ready(state: &AppState, ns: &str, name: &str) -> CallError {
    match state.get(ns, Kind::Function, name).await {
        Err(e) => e.into(),
        Ok(None) => CallError::NotFound {
            namespace: ns.to_string(),
            function: name.to_string(),
        },
        Ok(Some(f)) if f.phase() == Some(Phase::Error) => CallError::BuildFailed {
            function: name.to_string(),
            reason: f.status.reason.clone(),
        },
        // Stored READY, yet not deployed here: this server is deploying it (just after its
        // start, or another server's change); the status is from before.
        Ok(Some(f)) if f.phase() == Some(Phase::Ready) => CallError::NotReady {
            function: name.to_string(),
            phase: "being deployed on this server".into(),
            why: ", its stored READY is from before".into(),
        },
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
            CallError::NotReady {
                function: name.to_string(),
                phase,
                why,
            }
        }
    }
}
