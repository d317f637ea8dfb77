//! Traces out: the server's spans as OTLP over HTTP/protobuf (`--otlp-endpoint`, or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). Each
//! call's span is the server's span of its W3C trace (`Run.trace`): the client's span is its
//! parent; its children are the wait for a worker, the cold start and the worker call; an
//! async run's acceptance is its span and each attempt a child of it; a job execution, a
//! build are spans too. Spans go through a bounded channel to one task that POSTs a batch
//! (at most [`BATCH`] spans, or what came within [`INTERVAL`]); a full channel drops the
//! span and counts it (`dispatch_trace_spans_dropped_total`): tracing never slows a call.
//! Off (no endpoint), nothing is made.
//!
//! The protobuf is written by hand (the nine messages of `ExportTraceServiceRequest` that a
//! span needs; field numbers from opentelemetry-proto `trace.proto`), which keeps gRPC and
//! the OpenTelemetry SDK out of the build; the test decodes it with the official Python
//! `opentelemetry-proto`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// Spans waiting to be sent, at most.
pub const QUEUE: usize = 4096;
/// Spans in one request, at most.
pub const BATCH: usize = 512;
/// A batch goes at least this often.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What kind of span (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Consumer = 5,
}

/// One attribute's value.
#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// The span failed: its message.
    pub error: Option<String>,
}

/// A trace id, a span id and its parent's, as OTLP's bytes.
pub type Ids = ([u8; 16], [u8; 8], Option<[u8; 8]>);

/// Hex ids of a [`dispatch_core::trace::Trace`] as OTLP's bytes.
pub fn ids(trace: &dispatch_core::trace::Trace) -> Option<Ids> {
    let t = hex::decode(&trace.trace_id).ok()?.try_into().ok()?;
    let s = hex::decode(&trace.span_id).ok()?.try_into().ok()?;
    let p = trace
        .parent_id
        .as_deref()
        .and_then(|p| hex::decode(p).ok()?.try_into().ok());
    Some((t, s, p))
}

/// A new span id (random, never zero).
pub fn new_span_id() -> [u8; 8] {
    ((ulid::Ulid::new().random() as u64).max(1)).to_be_bytes()
}

/// Nanoseconds since the epoch of a timestamp.
pub fn nanos(t: jiff::Timestamp) -> u64 {
    u64::try_from(t.as_nanosecond()).unwrap_or(0)
}

enum Msg {
    Span(Box<Span>),
    Flush(oneshot::Sender<()>),
}

pub struct Exporter {
    tx: mpsc::Sender<Msg>,
    dropped: AtomicU64,
    failed: AtomicU64,
    sent: AtomicU64,
}

impl Exporter {
    /// The exporter of `url` (the traces endpoint itself, `…/v1/traces`), its task started.
    pub fn start(url: String, http: reqwest::Client, service: String) -> std::sync::Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let e = std::sync::Arc::new(Exporter {
            tx,
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        tokio::spawn(run(std::sync::Arc::downgrade(&e), rx, url, http, service));
        e
    }

    /// Hands a span on; never waits (a full queue drops it).
    pub fn export(&self, span: Span) {
        if self.tx.try_send(Msg::Span(Box::new(span))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends what waits, within `within` (the server's stop): a collector that does not
    /// answer costs the stop at most that.
    pub async fn flush(&self, within: Duration) {
        let (ack, done) = oneshot::channel();
        let _ = tokio::time::timeout(within, async {
            if self.tx.send(Msg::Flush(ack)).await.is_ok() {
                let _ = done.await;
            }
        })
        .await;
    }

    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, v) in [
            (
                "dispatch_trace_spans_sent_total",
                "Spans exported over OTLP.",
                &self.sent,
            ),
            (
                "dispatch_trace_spans_dropped_total",
                "Spans dropped: the export queue was full.",
                &self.dropped,
            ),
            (
                "dispatch_trace_spans_failed_total",
                "Spans whose export request failed (not retried).",
                &self.failed,
            ),
        ] {
            crate::metrics::header(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
    }
}

async fn run(
    me: std::sync::Weak<Exporter>,
    mut rx: mpsc::Receiver<Msg>,
    url: String,
    http: reqwest::Client,
    service: String,
) {
    let mut batch: Vec<Span> = Vec::new();
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut failing = false;
    loop {
        let first = tokio::time::timeout(INTERVAL, rx.recv()).await;
        match first {
            Ok(None) => return,
            Ok(Some(Msg::Span(s))) => batch.push(*s),
            Ok(Some(Msg::Flush(a))) => acks.push(a),
            Err(_) => {}
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(Msg::Span(s)) => batch.push(*s),
                Ok(Msg::Flush(a)) => acks.push(a),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let body = encode(&batch, &service);
            let sent = http
                .post(&url)
                .header("content-type", "application/x-protobuf")
                .timeout(Duration::from_secs(10))
                .body(body)
                .send()
                .await;
            let ok = matches!(&sent, Ok(r) if r.status().is_success());
            if let Some(e) = me.upgrade() {
                let n = batch.len() as u64;
                if ok { &e.sent } else { &e.failed }.fetch_add(n, Ordering::Relaxed);
            }
            // Said once when exports start failing and once when they work again (a down
            // collector must not flood the server's log); the metric counts every span.
            if !ok && !failing {
                let why = match sent {
                    Ok(r) => format!("answered {}", r.status()),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    "OTLP export of {} spans to {url} failed: {why} (said once until it works again)",
                    batch.len()
                );
            } else if ok && failing {
                tracing::info!("OTLP export to {url} works again");
            }
            failing = !ok;
            batch.clear();
        }
        for a in acks.drain(..) {
            let _ = a.send(());
        }
    }
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    nanos(jiff::Timestamp::now())
}

/// What every span of a run says of it.
fn run_attributes(run: &dispatch_core::Run) -> Vec<(&'static str, Value)> {
    vec![
        ("dispatch.namespace", Value::Str(run.namespace.clone())),
        ("dispatch.function", Value::Str(run.function.clone())),
        ("dispatch.run_id", Value::Str(run.id.clone())),
    ]
}

/// The spans of one finished call (an attempt), from its run record: the call's — the
/// server's span of its trace for a sync call, a child of the acceptance's for an async
/// attempt — and under it the wait for a worker, the cold start and the worker call, from its
/// timings; `took` ended now.
pub fn call_spans(e: &Exporter, run: &dispatch_core::Run, took: Duration) {
    let Some(trace) = run.trace.as_ref().filter(|t| t.sampled) else {
        return;
    };
    let Some((trace_id, span_id, parent_id)) = ids(trace) else {
        return;
    };
    let end = now_ns();
    let start = end.saturating_sub(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    let (id, parent, name, kind) = if run.is_async {
        let n = format!("attempt {} {}", run.attempts, run.function);
        (new_span_id(), Some(span_id), n, Kind::Consumer)
    } else {
        (
            span_id,
            parent_id,
            format!("call {}", run.function),
            Kind::Server,
        )
    };
    let mut attributes = run_attributes(run);
    attributes.extend([
        ("dispatch.trigger", Value::Str(run.trigger.as_str().into())),
        ("dispatch.status", Value::Str(run.status.to_string())),
        ("dispatch.attempt", Value::Int(i64::from(run.attempts))),
        ("dispatch.cold", Value::Bool(run.cold_start.is_some())),
    ]);
    if let Some(v) = run.version {
        attributes.push(("dispatch.version", Value::Int(i64::from(v))));
    }
    e.export(Span {
        trace_id,
        span_id: id,
        parent_id: parent,
        name,
        kind,
        start_ns: start,
        end_ns: end,
        attributes,
        error: run.error.as_ref().map(|e| e.message.clone()),
    });
    // An async attempt's wait in the queue: from its acceptance (a retry: from when it was
    // due) to its start, under the acceptance.
    if run.is_async {
        let since = match run.next_attempt_at {
            Some(due) if run.attempts > 1 => Some(due),
            _ if run.attempts <= 1 => Some(run.created_at),
            _ => None,
        };
        if let Some(from) = since.map(nanos).filter(|f| *f < start) {
            e.export(Span {
                trace_id,
                span_id: new_span_id(),
                parent_id: Some(span_id),
                name: "queued".to_string(),
                kind: Kind::Internal,
                start_ns: from,
                end_ns: start,
                attributes: run_attributes(run),
                error: None,
            });
        }
    }
    let ms = |m: u64| m.saturating_mul(1_000_000);
    let child = |name: &str, from: u64, to: u64, attributes| Span {
        trace_id,
        span_id: new_span_id(),
        parent_id: Some(id),
        name: name.to_string(),
        kind: Kind::Internal,
        start_ns: from,
        end_ns: to.min(end),
        attributes,
        error: None,
    };
    let timings = &run.timings;
    let queued_end = start + ms(timings.queued_ms);
    if timings.queued_ms > 0 {
        e.export(child("wait for a worker", start, queued_end, Vec::new()));
    }
    if let Some(c) = &run.cold_start {
        let method = vec![(
            "dispatch.start_method",
            Value::Str(c.method.as_str().to_string()),
        )];
        let cold_ms = (c.total_ms * 1e6) as u64;
        e.export(child(
            "cold start",
            queued_end,
            queued_end + cold_ms,
            method,
        ));
    }
    e.export(child(
        "worker call",
        end.saturating_sub(ms(timings.exec_ms)),
        end,
        Vec::new(),
    ));
}

/// The span of an async run's acceptance (stored and queued) from `start_ns`: its attempts
/// are its children.
pub fn accept_span(e: &Exporter, run: &dispatch_core::Run, start_ns: u64) {
    if let Some(trace) = &run.trace {
        let name = format!("accept {}", run.function);
        trace_span(
            e,
            trace,
            name,
            Kind::Server,
            start_ns,
            run_attributes(run),
            None,
        );
    }
}

/// The server's span of an API request that is not a call (a call's span is its own):
/// handlers that pass the trace on (an event's ingest) read it from the request.
#[derive(Debug, Clone)]
pub struct RequestTrace(pub dispatch_core::trace::Trace);

/// Routes without a request span: probes and scrapes (noise), the console's files, and calls,
/// whose `call`/`accept` span is the request's.
fn spanless(route: &str) -> bool {
    matches!(
        route,
        "/" | "/healthz" | "/readyz" | "/metrics" | "/ui" | "/v1/openapi.json"
    ) || route.starts_with("/ui/")
        || route.starts_with("/execute/")
        || route == "/v1/namespaces/{ns}/functions/{name}/runs"
}

/// `router` (the API's) with a span per request, in the client's trace (`traceparent`) or a
/// new one: `GET /v1/namespaces/{ns}/functions` — the route template, never the names in it.
pub fn request_layer(router: axum::Router, e: std::sync::Arc<Exporter>) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(e, request_span))
}

async fn request_span(
    axum::extract::State(e): axum::extract::State<std::sync::Arc<Exporter>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string());
    let Some(route) = route.filter(|r| !spanless(r)) else {
        return next.run(req).await;
    };
    let trace = dispatch_core::trace::Trace::child_of(crate::invoke::traceparent(req.headers()));
    req.extensions_mut().insert(RequestTrace(trace.clone()));
    let method = req.method().to_string();
    let start = now_ns();
    let resp = next.run(req).await;
    let status = resp.status();
    let attributes = vec![
        ("http.request.method", Value::Str(method.clone())),
        ("http.route", Value::Str(route.clone())),
        (
            "http.response.status_code",
            Value::Int(i64::from(status.as_u16())),
        ),
    ];
    let error = status.is_server_error().then(|| {
        status
            .canonical_reason()
            .unwrap_or("server error")
            .to_string()
    });
    let name = format!("{method} {route}");
    trace_span(&e, &trace, name, Kind::Server, start, attributes, error);
    resp
}

/// The span of a job execution, from its start (or creation) to its end.
pub fn job_span(e: &Exporter, job: &dispatch_core::JobExecution) {
    use dispatch_core::JobPhase;
    let Some(trace) = &job.trace else {
        return;
    };
    let start = nanos(job.started_at.unwrap_or(job.created_at));
    let attributes = vec![
        ("dispatch.namespace", Value::Str(job.namespace.clone())),
        ("dispatch.jobtemplate", Value::Str(job.name.clone())),
        ("dispatch.execution", Value::Str(job.uuid.clone())),
        ("dispatch.phase", Value::Str(job.phase.to_string())),
        ("dispatch.attempts", Value::Int(i64::from(job.attempts))),
    ];
    let failed = matches!(job.phase, JobPhase::Failed | JobPhase::Invalid);
    let error = failed.then(|| job.reason.clone());
    let name = format!("job {}", job.name);
    trace_span(e, trace, name, Kind::Server, start, attributes, error);
}

/// A span of its own trace's server span over `[start, now]`: an async run's acceptance (its
/// attempts are its children), a job execution; `error` when it failed.
pub fn trace_span(
    e: &Exporter,
    trace: &dispatch_core::trace::Trace,
    name: String,
    kind: Kind,
    start_ns: u64,
    attributes: Vec<(&'static str, Value)>,
    error: Option<String>,
) {
    if !trace.sampled {
        return;
    }
    let Some((trace_id, span_id, parent_id)) = ids(trace) else {
        return;
    };
    e.export(Span {
        trace_id,
        span_id,
        parent_id,
        name,
        kind,
        start_ns,
        end_ns: now_ns(),
        attributes,
        error,
    });
}

/// A build's span (a trace of its own): `what` (image, function) named `name` in `ns`, which
/// took `took` until now; `error` when it failed.
pub fn build_span(
    e: &Exporter,
    what: &str,
    ns: &str,
    name: &str,
    took: Duration,
    error: Option<String>,
) {
    let trace = dispatch_core::trace::Trace::child_of(None);
    let start = now_ns().saturating_sub(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    let attributes = vec![
        ("dispatch.namespace", Value::Str(ns.to_string())),
        ("dispatch.build", Value::Str(what.to_string())),
        ("dispatch.name", Value::Str(name.to_string())),
    ];
    trace_span(
        e,
        &trace,
        format!("build {what} {name}"),
        Kind::Internal,
        start,
        attributes,
        error,
    );
}

// Protobuf wire format: varint 0, fixed64 1, length-delimited 2.
fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(buf: &mut Vec<u8>, field: u64, wire: u64) {
    varint(buf, (field << 3) | wire);
}

fn bytes(buf: &mut Vec<u8>, field: u64, data: &[u8]) {
    key(buf, field, 2);
    varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

fn message(buf: &mut Vec<u8>, field: u64, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    f(&mut inner);
    bytes(buf, field, &inner);
}

fn fixed64(buf: &mut Vec<u8>, field: u64, v: u64) {
    key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// `KeyValue { string key = 1; AnyValue value = 2 }`, `AnyValue { string_value = 1;
/// bool_value = 2; int_value = 3 }`.
fn attribute(buf: &mut Vec<u8>, field: u64, k: &str, v: &Value) {
    message(buf, field, |kv| {
        bytes(kv, 1, k.as_bytes());
        message(kv, 2, |any| match v {
            Value::Str(s) => bytes(any, 1, s.as_bytes()),
            Value::Bool(b) => {
                key(any, 2, 0);
                varint(any, u64::from(*b));
            }
            Value::Int(i) => {
                key(any, 3, 0);
                varint(any, *i as u64);
            }
        });
    });
}

/// `ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1 }` of `spans`, one
/// resource (`service.name`), one scope (`dispatch`).
pub fn encode(spans: &[Span], service: &str) -> Vec<u8> {
    let mut out = Vec::new();
    message(&mut out, 1, |rs| {
        // Resource { repeated KeyValue attributes = 1 }
        message(rs, 1, |r| {
            attribute(r, 1, "service.name", &Value::Str(service.to_string()));
        });
        // ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2 }
        message(rs, 2, |ss| {
            message(ss, 1, |scope| {
                bytes(scope, 1, b"dispatch");
                bytes(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for s in spans {
                message(ss, 2, |sp| span(sp, s));
            }
        });
    });
    out
}

/// `Span { trace_id = 1; span_id = 2; parent_span_id = 4; name = 5; kind = 6;
/// start_time_unix_nano = 7 (fixed64); end_time_unix_nano = 8 (fixed64); attributes = 9;
/// status = 15 }`, `Status { message = 2; code = 3 }` (1 OK, 2 ERROR).
fn span(buf: &mut Vec<u8>, s: &Span) {
    bytes(buf, 1, &s.trace_id);
    bytes(buf, 2, &s.span_id);
    if let Some(p) = &s.parent_id {
        bytes(buf, 4, p);
    }
    bytes(buf, 5, s.name.as_bytes());
    key(buf, 6, 0);
    varint(buf, s.kind as u64);
    fixed64(buf, 7, s.start_ns);
    fixed64(buf, 8, s.end_ns.max(s.start_ns));
    for (k, v) in &s.attributes {
        attribute(buf, 9, k, v);
    }
    message(buf, 15, |st| {
        if let Some(m) = &s.error {
            bytes(st, 2, m.as_bytes());
        }
        key(st, 3, 0);
        varint(st, if s.error.is_some() { 2 } else { 1 });
    });
}

/// The traces endpoint: `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` is a base (the
/// signal's path `/v1/traces` is added), `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` the URL itself
/// (the OpenTelemetry exporter conventions).
pub fn traces_url(base: Option<&str>, traces: Option<&str>) -> Option<String> {
    if let Some(t) = traces.filter(|t| !t.is_empty()) {
        return Some(t.to_string());
    }
    let b = base.filter(|b| !b.is_empty())?;
    Some(format!("{}/v1/traces", b.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_urls() {
        let mut b = Vec::new();
        varint(&mut b, 300);
        assert_eq!(b, [0xac, 0x02]);
        assert_eq!(
            traces_url(Some("http://c:4318/"), None).as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            traces_url(Some("http://c:4318"), Some("http://t/x")).as_deref(),
            Some("http://t/x")
        );
        assert_eq!(traces_url(Some(""), None), None);
    }
}
