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
    let trace_id = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id)
        .map(str::to_string);
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

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), when it is one
/// (all-zero ids are invalid).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0')
        // Version 00 has exactly four parts; later versions may add more.
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn trace_ids_are_read_from_valid_traceparents_only() {
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{t}-00f067aa0ba902b7-01")), Some(t));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }
}
