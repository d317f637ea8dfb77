//! The control-plane API (default 127.0.0.1:8080, DESIGN §4): health, version, resource CRUD
//! under `/v1/namespaces/{ns}/{kind}`, source upload, sync exec and run records.

mod events;
pub mod jobs;
mod namespaces;
pub mod openapi;
pub(crate) mod resources;
mod runs;
mod tokens;
mod versions;

pub use runs::accepted;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use dispatch_core::API_VERSION;

use crate::error::ApiError;
use crate::state::AppState;

/// Largest source archive accepted (compressed).
pub const MAX_SOURCE_BYTES: usize = 64 * 1024 * 1024;
/// Exec bodies carry the payload plus a small wrapper.
const MAX_EXEC_BODY: usize = dispatch_core::MAX_PAYLOAD_BYTES + 64 * 1024;

/// The API's routes, and the path of each (the OpenAPI test holds the contract to them).
#[derive(Default)]
pub struct Routes {
    pub router: Router<Arc<AppState>>,
    pub paths: Vec<String>,
}

impl Routes {
    fn route(mut self, path: &str, methods: MethodRouter<Arc<AppState>>) -> Self {
        self.paths.push(path.to_string());
        self.router = self.router.route(path, methods);
        self
    }

    fn merge(mut self, other: Routes) -> Self {
        self.paths.extend(other.paths);
        self.router = self.router.merge(other.router);
        self
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    routes()
        .router
        .merge(crate::console::router())
        .fallback(|| async {
            ApiError::not_found("no such API route: see DESIGN §4 or `dispatch --help`")
        })
        .method_not_allowed_fallback(ApiError::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::api_guard,
        ))
        .with_state(state)
}

/// Every route of the API port.
pub fn routes() -> Routes {
    let ns = "/v1/namespaces/{ns}";
    Routes::default()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/version", get(version))
        .route("/v1/gc", post(gc))
        .route("/v1/pulled-images", get(pulled_images))
        .route(
            "/v1/namespaces",
            get(namespaces::list).post(namespaces::create),
        )
        .route(
            "/v1/namespaces/{ns}",
            get(namespaces::get_one)
                .patch(namespaces::patch)
                .delete(namespaces::delete),
        )
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{name}", axum::routing::delete(tokens::delete))
        .route("/v1/whoami", get(tokens::whoami))
        .route("/v1/audit", get(tokens::audit))
        .merge(execute_routes())
        .route(
            &format!("{ns}/jobexecutions"),
            get(jobs::list).post(jobs::create),
        )
        .route(
            &format!("{ns}/jobexecutions/{{uuid}}"),
            get(jobs::get_one).delete(jobs::cancel),
        )
        .route(
            &format!("{ns}/jobexecutions/{{uuid}}/logs"),
            get(jobs::logs),
        )
        .route(
            &format!("{ns}/images/{{name}}/logs"),
            get(resources::image_log),
        )
        .route(
            &format!("{ns}/events"),
            get(events::list)
                .post(events::ingest)
                .layer(DefaultBodyLimit::max(MAX_EXEC_BODY)),
        )
        .route(
            &format!("{ns}/events/{{id}}/redeliver"),
            post(events::redeliver_event),
        )
        .route(
            &format!("{ns}/subscriptions/{{name}}/redeliver"),
            post(events::redeliver_subscription),
        )
        .route(
            &format!("{ns}/subscriptions/{{name}}/deliveries"),
            get(events::subscription_deliveries),
        )
        .route(&format!("{ns}/stats"), get(runs::stats))
        .route(&format!("{ns}/runs"), get(runs::list).delete(runs::purge))
        .route(&format!("{ns}/runs/redrive"), post(runs::redrive_all))
        .route(
            &format!("{ns}/runs/{{id}}"),
            get(runs::get_one).delete(runs::cancel),
        )
        .route(
            &format!("{ns}/runs/{{id}}/redrive"),
            post(runs::redrive_one),
        )
        .route(&format!("{ns}/runs/{{id}}/logs"), get(runs::logs))
        .route(
            &format!("{ns}/functions/{{name}}/source"),
            get(runs::source_files)
                .post(runs::upload_source)
                .layer(DefaultBodyLimit::max(MAX_SOURCE_BYTES)),
        )
        .route(
            &format!("{ns}/functions/{{name}}/logs"),
            get(runs::function_logs),
        )
        .route(
            &format!("{ns}/functions/{{name}}/queue"),
            get(runs::function_queue),
        )
        .route(
            &format!("{ns}/functions/{{name}}/versions"),
            get(versions::list),
        )
        .route(
            &format!("{ns}/functions/{{name}}/rollback"),
            post(versions::rollback),
        )
        .route(
            &format!("{ns}/functions/{{name}}/runs"),
            post(runs::exec).layer(DefaultBodyLimit::max(MAX_EXEC_BODY)),
        )
        .route(
            &format!("{ns}/{{kind}}"),
            get(resources::list).post(resources::create),
        )
        .route(
            &format!("{ns}/{{kind}}/{{name}}"),
            get(resources::get_one)
                .put(resources::update)
                .patch(resources::patch)
                .delete(resources::delete),
        )
}

/// dispatcher's `PUT|POST /execute/{ns}/{name}` and `/execute/{name}`, on both ports.
pub fn execute_routes() -> Routes {
    let limit = DefaultBodyLimit::max(jobs::MAX_JOB_PAYLOAD);
    Routes::default()
        .route(
            "/execute/{ns}/{name}",
            axum::routing::put(jobs::execute)
                .post(jobs::execute)
                .layer(limit),
        )
        .route(
            "/execute/{name}",
            axum::routing::put(jobs::execute_default)
                .post(jobs::execute_default)
                .layer(limit),
        )
}

fn websocket_metrics(state: &AppState) -> String {
    let mut out = String::new();
    state.websockets.render(&mut out);
    out
}

/// Prometheus metrics (any token with a role may read them).
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render()
            + &websocket_metrics(&state)
            + &function_metrics(&state)
            + &budget_metrics(&state)
            + &disk_metrics(&state)
            + &state.deliveries.render_metrics(state.queue.clock.now())
            + &crate::replicas::render_metrics(&state)
            + &job_metrics(&state)
            + &trace_metrics(&state),
    )
}

fn job_metrics(state: &AppState) -> String {
    let mut out = String::new();
    let (waiting, active) = state.jobs.counts();
    state.metrics.render_jobs(&mut out, waiting, active);
    out
}

/// The span exporter's counts, when spans are exported.
fn trace_metrics(state: &AppState) -> String {
    let mut out = String::new();
    if let Some(e) = state.otlp.get() {
        e.render_metrics(&mut out);
    }
    out
}

/// The worker budget of the embedded backend: use, cap, evictions, refusals.
fn budget_metrics(state: &AppState) -> String {
    let Some(b) = state.backend.worker_budget() else {
        return String::new();
    };
    let rows: [(&str, &str, &str, u64); 6] = [
        (
            "dispatch_workers",
            "gauge",
            "Function workers alive (all functions).",
            b.workers as u64,
        ),
        (
            "dispatch_workers_max",
            "gauge",
            "The worker budget: workers alive at most (--max-workers-total).",
            b.max_workers as u64,
        ),
        (
            "dispatch_worker_memory_bytes",
            "gauge",
            "Memory of the workers alive, counted at their limits.",
            b.memory,
        ),
        (
            "dispatch_worker_memory_budget_bytes",
            "gauge",
            "The worker budget in memory (--worker-memory-budget).",
            b.max_memory,
        ),
        (
            "dispatch_worker_evictions_total",
            "counter",
            "Idle workers stopped to make room for another function's.",
            b.evictions,
        ),
        (
            "dispatch_worker_budget_refusals_total",
            "counter",
            "Cold starts refused (429): the budget was full and no worker idle.",
            b.refusals,
        ),
    ];
    let mut out: String = rows
        .iter()
        .map(|(name, kind, help, v)| {
            format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n")
        })
        .collect();
    let idle = b.idle.min(b.workers);
    out.push_str(&format!(
        "# HELP dispatch_workers_by_state Function workers alive, by state (busy: calling or starting).\n\
         # TYPE dispatch_workers_by_state gauge\n\
         dispatch_workers_by_state{{state=\"idle\"}} {idle}\n\
         dispatch_workers_by_state{{state=\"busy\"}} {}\n",
        b.workers - idle
    ));
    out
}

/// The data dir's free space, its reserve and the 507s given below it.
fn disk_metrics(state: &AppState) -> String {
    let Some(d) = &state.disk else {
        return String::new();
    };
    let Some(s) = d.space() else {
        return String::new();
    };
    let rows = [
        (
            "dispatch_data_dir_available_bytes",
            "gauge",
            "Free space of the data dir's file system.",
            s.available,
        ),
        (
            "dispatch_data_dir_reserve_bytes",
            "gauge",
            "Free space kept for accepted work (--min-free-disk): below it new work gets 507.",
            s.reserve,
        ),
        (
            "dispatch_disk_refusals_total",
            "counter",
            "Async runs, events, jobs and uploads refused with 507 (disk below its reserve).",
            d.refusals(),
        ),
    ];
    rows.iter()
        .map(|(name, kind, help, v)| {
            format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n")
        })
        .collect()
}

/// Queued async runs, the oldest's age and 429s per function (the queue keeps them).
fn function_metrics(state: &AppState) -> String {
    use crate::metrics::family;
    use std::fmt::Write as _;
    let rows = state.queue.per_function();
    let mut out = String::new();
    let labels =
        |r: &crate::queue::QueueLine| format!("namespace=\"{}\",function=\"{}\"", r.key.0, r.key.1);
    family(
        &mut out,
        "dispatch_function_queued",
        "gauge",
        "Async runs accepted and not final, by function.",
        &rows,
        |out, r| {
            let _ = writeln!(
                out,
                "dispatch_function_queued{{{}}} {}",
                labels(r),
                r.queued
            );
        },
    );
    family(
        &mut out,
        "dispatch_function_oldest_queued_age_seconds",
        "gauge",
        "How long the oldest async run of a function waiting to start has waited (since it was accepted or redriven).",
        &rows,
        |out, r| {
            let age = r.oldest_age_seconds;
            let _ = writeln!(
                out,
                "dispatch_function_oldest_queued_age_seconds{{{}}} {age}",
                labels(r)
            );
        },
    );
    family(
        &mut out,
        "dispatch_function_refused_total",
        "counter",
        "Calls answered 429, by function and the bound that was full.",
        &rows,
        |out, r| {
            for (bound, n) in r.refused.by_bound() {
                let l = labels(r);
                let _ = writeln!(
                    out,
                    "dispatch_function_refused_total{{{l},bound=\"{bound}\"}} {n}"
                );
            }
        },
    );
    out
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// The query string of the list handlers, parsed once (`?limit=&l=&function=…`); each list
/// reads the filters it takes and ignores the rest. `limit` and flags are checked here, so
/// every list refuses a bad one alike (400, our error shape).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    /// At most this many items, 1 to [`MAX_LIST_LIMIT`].
    pub limit: Option<String>,
    /// Label selector: `l=team=web,tier=api` (every pair must match).
    pub l: Option<String>,
    /// Events: of this type.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Events: only those with deliveries not done (`true`, `false`, or bare).
    pub undelivered: Option<String>,
    /// Job executions: of this template.
    pub template: Option<String>,
    /// Runs: of this function; in this status.
    pub function: Option<String>,
    pub status: Option<String>,
    /// Runs: after this run id (the last of the previous page); in this time range.
    pub after: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

/// The largest `?limit=` a list takes.
pub const MAX_LIST_LIMIT: usize = 10_000;

impl ListQuery {
    /// `?limit=` (none: `None`), refused unless a number from 1 to [`MAX_LIST_LIMIT`].
    pub fn limit(&self) -> Result<Option<usize>, ApiError> {
        let Some(l) = &self.limit else {
            return Ok(None);
        };
        l.parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit {l:?} is not a number from 1 to {MAX_LIST_LIMIT}: use ?limit=100"
                ))
            })
    }

    /// A flag such as `?undelivered`: absent or `false` is false; bare or `true` is true.
    pub fn flag(name: &str, value: Option<&str>) -> Result<bool, ApiError> {
        match value {
            None | Some("false") => Ok(false),
            Some("true") | Some("") => Ok(true),
            Some(v) => Err(ApiError::bad_request(format!(
                "{name}={v:?}: use true or false"
            ))),
        }
    }
}

#[derive(serde::Deserialize)]
struct GcQuery {
    /// Keep anything touched within this long (default 1h): `?grace=0s` collects everything
    /// unreferenced.
    grace: Option<String>,
}

async fn gc(
    State(state): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<GcQuery>,
) -> Result<axum::Json<crate::gc::GcReport>, ApiError> {
    let grace = match q.grace {
        Some(g) => dispatch_core::duration::parse_duration(&g)?,
        None => crate::gc::DEFAULT_GRACE,
    };
    Ok(axum::Json(crate::gc::collect(&state, grace, grace).await?))
}

/// The container tier's pulled images, newest use first (cluster admins: they are shared by
/// every namespace).
async fn pulled_images(
    State(state): State<Arc<AppState>>,
) -> axum::Json<Vec<dispatch_runtime::container::PulledImage>> {
    axum::Json(
        state
            .config
            .containers
            .as_ref()
            .map(|c| c.images.list())
            .unwrap_or_default(),
    )
}

async fn version(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "apiVersion": API_VERSION,
        "backend": state.backend.name(),
        // What the console links to: the gateway (its URL as clients reach it, else its
        // port on the console's host) and a trace viewer.
        "gatewayPort": state.gateway_addr.get().map(|a| a.port()),
        "gatewayUrl": state.config.gateway_url,
        "traceUrl": state.config.trace_url,
    }))
}

/// A call's answer: a JSON body and the id of its run (`X-Dispatch-Run-Id`).
pub(crate) fn json_answer(status: StatusCode, body: String, run_id: &str) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(run_id) {
        h.insert("x-dispatch-run-id", v);
    }
    resp
}

pub(crate) fn check_namespace(ns: &str) -> Result<(), ApiError> {
    dispatch_core::names::validate_name("namespace", ns).map_err(ApiError::from)
}
