//! The access log (`dispatch server --access-log`): one line per request on either port,
//! target `dispatch::access`, with the edge, method, route (the API's route template, e.g.
//! `/v1/namespaces/{ns}/runs/{id}`; on the gateway the path, never the query), status, the
//! milliseconds to the response's head (a streamed answer goes on after it), the run id a call
//! answered with and the W3C trace id the client sent in `traceparent`. Off by default: when
//! it is off the routers have no layer at all (the warm path pays nothing).

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::serve::Edge;

/// `router` with an access-log line for each request it answers.
pub fn layer(router: Router, edge: Edge) -> Router {
    router.layer(axum::middleware::from_fn_with_state(edge, log))
}

async fn log(State(edge): State<Edge>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = match req.extensions().get::<MatchedPath>() {
        Some(m) => m.as_str().to_string(),
        None => req.uri().path().to_string(),
    };
    let trace_id = crate::invoke::traceparent(req.headers())
        .and_then(dispatch_core::trace::parse)
        .map(|(trace, _, _)| trace.to_string());
    let resp = next.run(req).await;
    let run_id = resp
        .headers()
        .get("x-dispatch-run-id")
        .and_then(|v| v.to_str().ok());
    tracing::info!(
        target: "dispatch::access",
        edge = edge.as_str(),
        method = %method,
        route,
        status = resp.status().as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
        run_id,
        trace_id = trace_id.as_deref(),
        "request"
    );
    resp
}
