//! Streamed answers (issue 22): a sync call whose handler yields chunks (a Python generator)
//! is answered as they come — chunked transfer encoding, or server-sent events — by the
//! gateway and by `POST …/runs?stream=true`. A handler that returns a value is answered whole,
//! as before.
//!
//! The chunks travel through a bounded channel from the worker's protocol socket to the
//! response body: a slow reader fills it, the worker's read loop waits, the socket fills and
//! the handler's next `yield` blocks (back-pressure; nothing buffers without bound). A reader
//! that goes away drops the channel: the worker is killed and the run recorded CANCELLED.
//! `spec.timeout` bounds the whole call. An error after the first byte ends the stream with
//! an `error` event (SSE) or an `x-dispatch-error` trailer (chunked), and is recorded.

use std::convert::Infallible;
use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dispatch_runtime::Chunk;
use futures_util::StreamExt as _;
use http_body::Frame;
use tokio::sync::mpsc;

use crate::invoke::{self, Answer, CallError, Invocation};
use crate::state::AppState;

/// Chunks in flight between a worker and a slow reader before the handler waits.
pub const CHANNEL_CHUNKS: usize = 16;

/// How a streamed answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The chunks as they are, chunked transfer encoding (`text/plain`).
    Chunked,
    /// `text/event-stream`: one `data:` event per chunk, then `end` (or `error`).
    Sse,
}

/// Whether the caller asked for server-sent events (`Accept: text/event-stream`).
pub fn wants_sse(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// What the end of a stream says of the call's outcome: `None` for success, else the error
/// object to show.
pub trait Ending:
    FnOnce(&Result<Answer, CallError>) -> Option<serde_json::Value> + Send + 'static
{
}
impl<F> Ending for F where
    F: FnOnce(&Result<Answer, CallError>) -> Option<serde_json::Value> + Send + 'static
{
}

/// The ending that shows a call's error as `show` makes it of the error, its run id and
/// whether it ran out of time; a call that could not run at all says why.
pub fn ending(
    show: impl FnOnce(&dispatch_core::ErrorObject, &str, bool) -> serde_json::Value + Send + 'static,
) -> impl Ending {
    move |outcome: &Result<Answer, CallError>| match outcome {
        Ok(a) => a
            .envelope
            .context
            .error
            .as_ref()
            .map(|e| show(e, &a.run_id, a.status == dispatch_core::RunStatus::Timeout)),
        Err(e) => Some(serde_json::json!({"error": {"message": e.to_string()}})),
    }
}

/// Runs `call` and answers: `whole` makes the response of a call that streamed nothing; one
/// that streams is answered as its chunks come, in `format`, ended by what `ending` says of
/// the call's outcome.
pub async fn answer(
    state: Arc<AppState>,
    call: Invocation,
    format: Format,
    whole: impl FnOnce(Result<Answer, CallError>) -> Response,
    ending: impl Ending,
) -> Response {
    let (sink, mut opened) = dispatch_runtime::Sink::new(CHANNEL_CHUNKS);
    let run_id = dispatch_core::run::new_run_id();
    let mut call = call.stream(sink);
    call.run_id = Some(run_id.clone());
    let mut done = Box::pin(async move { invoke::execute(&state, call).await });
    // The worker's read loop runs inside `done`: the sink opens during one of its polls, so
    // looking right after each poll answers at once (waiting on the oneshot would be a wake of
    // this very task, re-polled only after the scheduler's round: ~0.2 ms on the first byte).
    enum Step {
        Opened(mpsc::Receiver<Chunk>),
        Done(Result<Answer, CallError>),
    }
    let step = std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(outcome) = done.as_mut().poll(cx) {
            return std::task::Poll::Ready(Step::Done(outcome));
        }
        match opened.try_recv() {
            Ok(rx) => std::task::Poll::Ready(Step::Opened(rx)),
            Err(_) => std::task::Poll::Pending,
        }
    })
    .await;
    match step {
        Step::Opened(rx) => {
            // The call goes on by itself; the body reads its chunks, then its outcome.
            let (out_tx, out_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = out_tx.send(done.await);
            });
            let outcome = async move {
                out_rx.await.unwrap_or_else(|_| {
                    Err(CallError::State(crate::state::StateError::internal(
                        "a streamed call",
                        "its task ended without an outcome",
                    )))
                })
            };
            streamed(rx, outcome, format, &run_id, ending)
        }
        Step::Done(outcome) => match opened.try_recv() {
            // It streamed and ended in one poll (its chunks wait in the channel).
            Ok(rx) => streamed(
                rx,
                futures_util::future::ready(outcome),
                format,
                &run_id,
                ending,
            ),
            // The sink went with the call, never opened: it did not stream.
            Err(_) => whole(outcome),
        },
    }
}

fn streamed(
    rx: mpsc::Receiver<Chunk>,
    outcome: impl std::future::Future<Output = Result<Answer, CallError>> + Send + 'static,
    format: Format,
    run_id: &str,
    ending: impl Ending,
) -> Response {
    let chunks =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
            .map(move |c| Ok::<_, Infallible>(Frame::data(encode(format, c.data))));
    let id = run_id.to_string();
    let end = futures_util::stream::once(async move {
        let outcome = outcome.await;
        match (format, ending(&outcome)) {
            (Format::Sse, None) => Some(Frame::data(Bytes::from(format!(
                "event: end\ndata: {}\n\n",
                serde_json::json!({ "runId": id })
            )))),
            (Format::Sse, Some(e)) => Some(Frame::data(Bytes::from(format!(
                "event: error\ndata: {e}\n\n"
            )))),
            (Format::Chunked, None) => None,
            (Format::Chunked, Some(e)) => {
                let mut t = axum::http::HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(&e.to_string()) {
                    t.insert("x-dispatch-error", v);
                }
                Some(Frame::trailers(t))
            }
        }
    })
    .filter_map(|f| async move { f.map(Ok::<_, Infallible>) });
    let body = http_body_util::StreamBody::new(chunks.chain(end));
    let mut resp = (StatusCode::OK, axum::body::Body::new(body)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(match format {
            Format::Sse => "text/event-stream",
            Format::Chunked => "text/plain; charset=utf-8",
        }),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies (nginx) must not buffer it.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(run_id) {
        h.insert("x-dispatch-run-id", v);
    }
    resp
}

/// One chunk as the format writes it: as is, or a `data:` line per line of it.
fn encode(format: Format, chunk: Bytes) -> Bytes {
    match format {
        Format::Chunked => chunk,
        Format::Sse => {
            let text = String::from_utf8_lossy(&chunk);
            let mut out = String::with_capacity(text.len() + 16);
            for line in text.split('\n') {
                out.push_str("data: ");
                out.push_str(line.strip_suffix('\r').unwrap_or(line));
                out.push('\n');
            }
            out.push('\n');
            Bytes::from(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_writes_a_data_line_per_line() {
        assert_eq!(encode(Format::Sse, Bytes::from("a")), "data: a\n\n");
        assert_eq!(
            encode(Format::Sse, Bytes::from("a\nb")),
            "data: a\ndata: b\n\n"
        );
        assert_eq!(encode(Format::Chunked, Bytes::from("a\nb")), "a\nb");
    }
}
