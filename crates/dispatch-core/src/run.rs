//! Run records: what one function invocation leaves behind (DESIGN §3, "Records").

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::envelope::{ErrorObject, Logs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Timeout,
    Cancelled,
    Dead,
}

impl RunStatus {
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Timeout,
        RunStatus::Cancelled,
        RunStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "QUEUED",
            RunStatus::Running => "RUNNING",
            RunStatus::Succeeded => "SUCCEEDED",
            RunStatus::Failed => "FAILED",
            RunStatus::Timeout => "TIMEOUT",
            RunStatus::Cancelled => "CANCELLED",
            RunStatus::Dead => "DEAD",
        }
    }

    /// A final state: nothing will change this run again (but a redrive of a DEAD one).
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    /// Case-insensitive (`--status dead`).
    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Exec,
    Endpoint,
    Event,
    Cron,
    Retry,
}

impl Trigger {
    /// Its name as the API writes it (`exec`, `endpoint`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Exec => "exec",
            Trigger::Endpoint => "endpoint",
            Trigger::Event => "event",
            Trigger::Cron => "cron",
            Trigger::Retry => "retry",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// Time spent waiting for a worker.
    pub queued_ms: u64,
    /// Time spent starting a worker (0 when warm).
    pub cold_start_ms: u64,
    /// Time the handler ran, as the host saw it.
    pub exec_ms: u64,
}

/// How a cold worker came to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartMethod {
    /// A new interpreter process (exec-language handlers, or when no zygote can serve).
    #[default]
    Spawn,
    /// Forked from the image's zygote (Python).
    Fork,
    /// A pre-spawned generic worker of the image, given the function (Node).
    Specialize,
}

impl StartMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            StartMethod::Spawn => "spawn",
            StartMethod::Fork => "fork",
            StartMethod::Specialize => "specialize",
        }
    }
}

/// Where a cold start's time went, in fractional milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdStart {
    pub method: StartMethod,
    /// Until the new process could load the handler: spawn + interpreter start, a fork, or
    /// taking a pre-spawned worker.
    pub spawn_ms: f64,
    /// Loading the handler (its imports), as the worker measured it.
    pub import_ms: f64,
    /// The first call on the new worker.
    pub first_call_ms: f64,
    /// All of it: from asking for a worker to the first answer.
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub id: String,
    pub namespace: String,
    pub function: String,
    pub status: RunStatus,
    pub trigger: Trigger,
    pub input: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Box<RawValue>>,
    #[serde(default)]
    pub logs: Logs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorObject>,
    pub attempts: u32,
    pub cold: bool,
    /// The cold start this run paid for, split into its steps (absent when warm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<ColdStart>,
    #[serde(default)]
    pub timings: Timings,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Digest of the function build that ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The function's version whose build served it (`dispatch get versions`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// A streamed answer (the handler yielded chunks): how much, and how soon the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamStats>,
    /// Async runs that named a version (`hello@3`, or the one an alias chose when the run was
    /// accepted): every attempt runs that version. Absent: the function's current build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_version: Option<u32>,
    /// Accepted for later (`?wait=false`): queued, retried, dead-lettered, cancellable.
    #[serde(default, rename = "async", skip_serializing_if = "std::ops::Not::not")]
    pub is_async: bool,
    /// The W3C trace it belongs to and the server's span for it (`context.trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::Trace>,
    /// The error of every failed attempt, oldest first (a DEAD run keeps them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_errors: Vec<AttemptError>,
    /// When a QUEUED run may start (after a retry's backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// When a DEAD run was re-queued (`dispatch runs redrive`): its age counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redriven_at: Option<Timestamp>,
    /// Event runs: the CloudEvent without its data (`context.event`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    /// Async gateway runs: the request as the gateway saw it (`context.httpContext`; the
    /// `authorization`, `cookie` and `proxy-authorization` headers are never in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_context: Option<serde_json::Value>,
    /// Delivery of the final record to a callback URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// The server that owns this async run while it is active, when several servers share
    /// one store (PostgreSQL): it alone runs and writes it, until its lease ends and another
    /// server takes the run over. `None` with one server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// What a streamed call sent (issue 22): its output in the record is the concatenation of the
/// chunks, up to [`STREAM_RECORD_BYTES`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamStats {
    pub chunks: u64,
    pub bytes: u64,
    /// From the call's start (a worker taken) to its first chunk.
    pub first_byte_ms: f64,
    /// The record keeps the first [`STREAM_RECORD_BYTES`] only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// How much of a streamed answer its run record keeps.
pub const STREAM_RECORD_BYTES: usize = 64 * 1024;

impl Run {
    /// A QUEUED run with no attempt yet; callers set what they know.
    pub fn new(
        id: String,
        namespace: &str,
        function: &str,
        trigger: Trigger,
        input: Box<RawValue>,
        created_at: Timestamp,
    ) -> Run {
        Run {
            id,
            namespace: namespace.to_string(),
            function: function.to_string(),
            status: RunStatus::Queued,
            trigger,
            input,
            output: None,
            logs: Logs::default(),
            error: None,
            attempts: 0,
            cold: false,
            cold_start: None,
            timings: Timings::default(),
            created_at,
            started_at: None,
            finished_at: None,
            digest: None,
            version: None,
            pinned_version: None,
            stream: None,
            is_async: false,
            trace: None,
            attempt_errors: Vec::new(),
            next_attempt_at: None,
            redriven_at: None,
            event: None,
            http_context: None,
            callback: None,
            replica: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptError {
    pub attempt: u32,
    pub error: ErrorObject,
    pub at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CallbackState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Callback {
    pub url: String,
    pub state: CallbackState,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A new run id: a ULID, monotonic within this process (ids generated in the same
/// millisecond still sort in creation order, so "newest first" is exact).
pub fn new_run_id() -> String {
    static GENERATOR: parking_lot::Mutex<Option<ulid::Generator>> = parking_lot::Mutex::new(None);
    let mut g = GENERATOR.lock();
    g.get_or_insert_with(ulid::Generator::new)
        .generate()
        .unwrap_or_else(|_| ulid::Ulid::new())
        .to_string()
}

/// Async calls of one function refused by each admission bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refused {
    pub function_full: u64,
    pub namespace_full: u64,
    pub namespace_bytes_full: u64,
    /// Sync calls refused: every worker busy and the function's wait bound full
    /// (`--max-waiting-calls`).
    pub workers_busy: u64,
}

impl Refused {
    /// (metric label, count) of each bound.
    pub fn by_bound(&self) -> [(&'static str, u64); 4] {
        [
            ("function", self.function_full),
            ("namespace", self.namespace_full),
            ("namespace_bytes", self.namespace_bytes_full),
            ("workers_busy", self.workers_busy),
        ]
    }
}

/// What the queue holds of one function now, and what it refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionQueue {
    /// Async runs accepted and not final (waiting or running).
    pub queued: usize,
    pub running: u32,
    /// Its bound (`spec.maxQueued`, else the server's `--max-queued-per-function`).
    pub max_queued: usize,
    pub refused: Refused,
}
