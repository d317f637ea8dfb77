//! The server's limits and retention: the flags of `dispatch server` with their defaults.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;

/// `--run-history-budget`: run records kept per namespace, in bytes.
pub const DEFAULT_RUN_HISTORY_BUDGET: u64 = 1 << 30;

/// Limits and retention (flags of `dispatch server`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Logs kept per run record (stdout + stderr); the rest is cut with a marker.
    pub max_log_bytes: usize,
    /// Finished runs older than this are deleted.
    pub run_retention: Duration,
    /// Finished runs kept per function at most (newest first).
    pub runs_per_function: usize,
    /// Bytes of run records kept per namespace at most (oldest finished ones go first);
    /// none: no byte bound.
    pub run_history_budget: Option<u64>,
    /// How often retention looks for runs to prune when it has caught up (tests that drive
    /// `retention::step` themselves set it long).
    pub retention_interval: Duration,
    /// Async runs waiting per namespace before new ones get 429.
    pub max_queue_depth: usize,
    /// Async runs waiting per function (unless its spec.maxQueued says) before 429.
    pub max_queued_per_function: usize,
    /// Payload bytes of the async runs waiting per namespace before 429.
    pub max_queued_bytes: u64,
    /// Largest payload of an async run (below the sync limit: it is stored until it runs).
    pub max_async_payload: usize,
    /// Async runs running at once, all functions together.
    pub max_running: usize,
    /// On a store several servers share: how long this server's lease lasts unrenewed (it
    /// renews every quarter of it); another server takes its work over when it ends.
    pub replica_lease: std::time::Duration,
    /// Synchronous calls of one function allowed to wait for a worker when all of its
    /// `maxWorkers` are busy; past it a call is refused with 429. Applied by `Server::serve`
    /// to the embedded backend it creates (with `serve_with`, set it on the backend).
    pub max_waiting_calls: usize,
    /// Scratch folders of job executions (`<data dir>/jobs`).
    pub jobs_dir: std::path::PathBuf,
    /// One `dispatch::access` log line per request on both ports (`--access-log`).
    pub access_log: bool,
    /// Where spans go (OTLP/HTTP protobuf, the traces URL itself); none: no spans are made.
    pub otlp_traces_url: Option<String>,
    /// The gateway's address as its clients reach it (`--gateway-url`, e.g. behind an
    /// ingress): the console's endpoint links. None: the console's host, the gateway's port.
    pub gateway_url: Option<String>,
    /// A trace viewer's link with `{traceId}` in it (`--trace-url`, e.g.
    /// `http://jaeger:16686/trace/{traceId}`): the console links runs to their traces.
    pub trace_url: Option<String>,
    /// Require API tokens (off only with `--insecure-no-auth`).
    pub auth: bool,
    /// The key that seals secrets (`<data dir>/secret.key`); none = a key in memory only.
    pub secret_key_file: Option<std::path::PathBuf>,
    /// Serve both listeners over TLS (`--tls-cert`, `--tls-key`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The clock (tests share one across a simulated restart); none = the wall clock now.
    pub clock: Option<Clock>,
    /// Sandboxes for job commands (and, set on the embedded backend, functions and builds);
    /// none: `--isolation none`, user code runs as the server (DESIGN §9).
    pub sandboxes: Option<Arc<dispatch_runtime::sandbox::Sandboxes>>,
    /// The container tier (DESIGN §9): the image store and OCI runtime that job templates'
    /// images run with; none: no OCI runtime on this server (such jobs fail saying so).
    pub containers: Option<Arc<dispatch_runtime::container::Containers>>,
    /// Connection caps and timeouts of both listeners.
    pub edge: crate::serve::EdgeLimits,
    /// Function workers alive at once, all functions together (embedded backend).
    pub max_workers_total: usize,
    /// Memory of those workers together, counted at their limits (none: 3/4 of the RAM).
    pub worker_memory_budget: Option<u64>,
    /// The data dir, whose free space is watched (none: not watched; `Server::start` sets it).
    pub data_dir: Option<std::path::PathBuf>,
    /// Free space kept in reserve for work already accepted (`--min-free-disk`; none: 5 % of
    /// the file system, at most 1 GiB): below it new async runs, events, jobs and uploads
    /// get 507.
    pub min_free_disk: Option<u64>,
    /// How long an event is kept, and how long its pending deliveries are retried before
    /// they are dead (`--event-ttl`).
    pub event_ttl: Duration,
    /// Pending event deliveries per namespace past which new events get 429
    /// (`--max-pending-deliveries`).
    pub max_pending_deliveries: usize,
    /// How long a dead delivery (and its event) is kept for a redelivery
    /// (`--dead-delivery-retention`).
    pub dead_delivery_retention: Duration,
    /// Open WebSocket connections per namespace past which a new one gets 429
    /// (`--max-websockets-per-namespace`).
    pub max_websockets_per_namespace: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_log_bytes: 1024 * 1024,
            run_retention: Duration::from_secs(7 * 24 * 3600),
            runs_per_function: 10_000,
            run_history_budget: Some(DEFAULT_RUN_HISTORY_BUDGET),
            retention_interval: Duration::from_secs(1),
            max_queue_depth: 10_000,
            max_queued_per_function: 1_000,
            max_queued_bytes: 256 << 20,
            max_async_payload: 1 << 20,
            max_running: 64,
            replica_lease: std::time::Duration::from_secs(10),
            max_waiting_calls: dispatch_runtime::DEFAULT_MAX_WAITING_CALLS,
            jobs_dir: std::env::temp_dir().join("dispatch-jobs"),
            access_log: false,
            otlp_traces_url: None,
            gateway_url: None,
            trace_url: None,
            auth: true,
            secret_key_file: None,
            tls: None,
            clock: None,
            sandboxes: None,
            containers: None,
            edge: Default::default(),
            max_workers_total: dispatch_runtime::budget::DEFAULT_MAX_WORKERS_TOTAL,
            worker_memory_budget: None,
            data_dir: None,
            min_free_disk: None,
            event_ttl: Duration::from_secs(24 * 3600),
            max_pending_deliveries: 10_000,
            dead_delivery_retention: Duration::from_secs(7 * 24 * 3600),
            max_websockets_per_namespace: crate::websocket::DEFAULT_MAX_PER_NAMESPACE,
        }
    }
}
