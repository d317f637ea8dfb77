//! WebSocket endpoints (issue 22): `protocol: websocket` on an endpoint. The gateway holds
//! each connection (a `GET` with `Upgrade: websocket`) and either calls the function once
//! per message it receives, in order, sending back what it answers or yields
//! (`context.connection` = `{id, index}`), or, with `session: true`, calls it once for the
//! whole connection on one worker, its payload the stream of messages and its chunks the
//! messages sent back.
//!
//! What a connection may hold is bounded: each keeps its slot under the gateway's
//! connection cap for as long as it is open, a namespace holds at most
//! `--max-websockets-per-namespace` (429 past it), a connection silent both ways for the
//! endpoint's `idleTimeout` or open for its `maxDuration` is closed, messages are at most
//! the payload limit, and both directions go through bounded channels (a client that does
//! not read slows its handler; one that floods waits for it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use dispatch_core::{MAX_PAYLOAD_BYTES, Trigger, WebSocketSettings};
use dispatch_runtime::{Chunk, Inbound, Sink};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::invoke::{self, Answer, CallError, Invocation};
use crate::serve::ConnectionSlot;
use crate::state::AppState;

/// `--max-websockets-per-namespace`: open WebSocket connections one namespace may hold.
pub const DEFAULT_MAX_PER_NAMESPACE: usize = 1000;

/// Chunks waiting to go out to a client before the handler waits.
const CHANNEL_MESSAGES: usize = 16;

/// Messages from a client waiting for their calls before the client is read no further
/// (each may be up to the payload limit).
const INBOUND_MESSAGES: usize = 4;

/// After a session is ended by the server (idle, too long, shutting down), how long its
/// handler has to finish before its worker is stopped.
const SESSION_GRACE: Duration = Duration::from_secs(5);

/// The read buffer of a connection (tungstenite's default is 128 KiB; an idle connection
/// should cost little).
const READ_BUFFER: usize = 4096;

/// Open connections by namespace, and the counters `/metrics` shows.
#[derive(Default)]
pub struct WebSockets {
    open: parking_lot::Mutex<HashMap<String, usize>>,
    opened: AtomicU64,
    refused: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
}

/// One admitted connection: counted in its namespace until dropped.
struct Admitted {
    state: Arc<AppState>,
    namespace: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.state.websockets.open.lock();
        if let Some(n) = open.get_mut(&self.namespace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.namespace);
            }
        }
    }
}

impl WebSockets {
    fn admit(state: &Arc<AppState>, namespace: &str) -> Result<Admitted, ApiError> {
        let max = state.config.max_websockets_per_namespace;
        let ws = &state.websockets;
        let mut open = ws.open.lock();
        let n = open.entry(namespace.to_string()).or_default();
        if *n >= max {
            ws.refused.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyConnections",
                format!(
                    "namespace {namespace:?} holds its most WebSocket connections ({max}, \
                     --max-websockets-per-namespace): retry when some have closed"
                ),
            )
            .with_retry_after(5));
        }
        *n += 1;
        ws.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted {
            state: state.clone(),
            namespace: namespace.to_string(),
        })
    }

    /// The Prometheus lines of WebSocket connections.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP dispatch_websocket_connections_open Open WebSocket connections, by namespace.\n# TYPE dispatch_websocket_connections_open gauge"
        );
        let mut open: Vec<(String, usize)> = self
            .open
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        open.sort();
        for (ns, n) in open {
            let _ = writeln!(
                out,
                "dispatch_websocket_connections_open{{namespace=\"{ns}\"}} {n}"
            );
        }
        for (name, help, v) in [
            (
                "dispatch_websocket_connections_total",
                "WebSocket connections accepted.",
                &self.opened,
            ),
            (
                "dispatch_websocket_connections_refused_total",
                "WebSocket connections refused at a namespace's limit (429).",
                &self.refused,
            ),
            (
                "dispatch_websocket_messages_received_total",
                "WebSocket messages received from clients.",
                &self.received,
            ),
            (
                "dispatch_websocket_messages_sent_total",
                "WebSocket messages sent to clients.",
                &self.sent,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// What a connection calls, and with what.
struct Target {
    namespace: String,
    function: String,
    settings: WebSocketSettings,
    /// `context.httpContext` of every call (the upgrade request).
    http: serde_json::Value,
    affinity: Option<String>,
    id: String,
}

impl Target {
    /// A call's span, in the trace of the upgrade request's `traceparent` (else a new one).
    fn trace(&self) -> dispatch_core::trace::Trace {
        let tp = self.http["headers"]["traceparent"].as_str();
        dispatch_core::trace::Trace::child_of(tp)
    }
}

/// Answers an upgrade request to a WebSocket endpoint: refused (4xx, 503) before the
/// upgrade when the function cannot be called or the namespace is at its limit.
pub async fn upgrade(
    state: Arc<AppState>,
    mut parts: Parts,
    namespace: &str,
    function: &str,
    settings: WebSocketSettings,
    http: serde_json::Value,
) -> Response {
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(_) => {
            return ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "UpgradeRequired",
                "this endpoint takes WebSocket connections: connect with a WebSocket client \
                 (a GET with Connection: Upgrade, Upgrade: websocket)",
            )
            .into_response();
        }
    };
    let affinity = crate::versions::affinity_of(&parts.headers);
    // Refused now rather than after the upgrade: no such function, not ready, bad version.
    if let Err(e) = crate::versions::resolve(&state, namespace, function, affinity.as_deref()).await
    {
        return ApiError::from(e).into_response();
    }
    let admitted = match WebSockets::admit(&state, namespace) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let slot = parts.extensions.remove::<ConnectionSlot>();
    let target = Target {
        namespace: namespace.to_string(),
        function: function.to_string(),
        settings,
        http,
        affinity,
        id: ulid::Ulid::new().to_string(),
    };
    ws.max_message_size(MAX_PAYLOAD_BYTES)
        .max_frame_size(MAX_PAYLOAD_BYTES)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let stop = slot.as_ref().map(|s| s.shutdown.clone());
            hold(state, socket, target, stop).await;
            drop(admitted);
            drop(slot);
        })
}

/// Why the server closes a connection.
fn close(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}

/// Sends one message; a client that takes none for `within` (the endpoint's idle timeout) is
/// treated as gone, so that it cannot hold a handler (or this task) forever.
async fn send_within(out: &mut Out, m: Message, within: Duration) -> bool {
    matches!(tokio::time::timeout(within, out.send(m)).await, Ok(Ok(())))
}

/// Time since the connection opened of its last message either way, in ms.
type Activity = Arc<AtomicU64>;

fn touch(activity: &Activity, opened: Instant) {
    activity.store(opened.elapsed().as_millis() as u64, Ordering::Relaxed);
}

/// Ends when the connection has been silent both ways for `idle`.
async fn idle_for(activity: &Activity, opened: Instant, idle: Duration) {
    loop {
        let last = opened + Duration::from_millis(activity.load(Ordering::Relaxed));
        if last.elapsed() >= idle {
            return;
        }
        tokio::time::sleep_until((last + idle).into()).await;
    }
}

async fn shutting_down(stop: Option<tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(mut s) => {
            let _ = s.wait_for(|stop| *stop).await;
        }
        None => std::future::pending().await,
    }
}

/// Holds one connection until either side ends it.
async fn hold(
    state: Arc<AppState>,
    socket: WebSocket,
    target: Target,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) {
    let opened = Instant::now();
    let activity: Activity = Arc::default();
    let (mut out, mut inp) = socket.split();
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(INBOUND_MESSAGES);
    // The reading side: messages into the channel until the client closes (which drops the
    // sender: a session's handler sees its messages end).
    let reader = {
        let (state, activity) = (state.clone(), activity.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = inp.next().await {
                let m = match m {
                    Message::Text(t) => Inbound::Text(t.as_str().to_string()),
                    Message::Binary(b) => Inbound::Binary(b),
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                state.websockets.received.fetch_add(1, Ordering::Relaxed);
                touch(&activity, opened);
                if in_tx.send(m).await.is_err() {
                    break;
                }
            }
        })
    };
    let ending = if target.settings.session {
        let abort = reader.abort_handle();
        session(
            &state, &mut out, in_rx, &target, &activity, opened, stop, &abort,
        )
        .await
    } else {
        per_message(&state, &mut out, in_rx, &target, &activity, opened, stop).await
    };
    reader.abort();
    if let Some(m) = ending {
        let _ = send_within(&mut out, m, SESSION_GRACE).await;
    }
    let _ = tokio::time::timeout(SESSION_GRACE, out.close()).await;
}

type Out = futures_util::stream::SplitSink<WebSocket, Message>;

/// One call per message, in order; the close to send when the server ends the connection.
async fn per_message(
    state: &Arc<AppState>,
    out: &mut Out,
    mut in_rx: mpsc::Receiver<Inbound>,
    target: &Target,
    activity: &Activity,
    opened: Instant,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> Option<Message> {
    let settings = target.settings;
    let mut index = 0u64;
    // One for the connection: its timers are set once, not once per message.
    let ends = server_ends(stop, settings, activity, opened);
    tokio::pin!(ends);
    loop {
        let m = tokio::select! {
            m = &mut ends => return Some(m),
            m = in_rx.recv() => m,
        };
        let m = m?; // the client closed
        let payload = payload_of(m);
        let call = Invocation::new(
            &target.namespace,
            &target.function,
            payload,
            Trigger::Endpoint,
        )
        .http(target.http.clone())
        .connection(serde_json::json!({"id": target.id, "index": index}))
        .affinity(target.affinity.clone())
        .trace(target.trace());
        index += 1;
        let link = Link {
            out,
            activity,
            opened,
            within: settings.idle_timeout,
        };
        // Boxed: an idle connection holds a small future, not a call's whole state machine.
        let r = Box::pin(relay(state, call, None, link, std::future::pending())).await;
        if !answer(state, out, r, settings.idle_timeout).await {
            return None;
        }
    }
}

/// One call for the whole connection on one worker: its payload the messages, its chunks
/// the messages back. It ends when the handler returns (the client closing ends its
/// messages), or when the server ends it (idle, too long, shutting down).
#[allow(clippy::too_many_arguments)]
async fn session(
    state: &Arc<AppState>,
    out: &mut Out,
    in_rx: mpsc::Receiver<Inbound>,
    target: &Target,
    activity: &Activity,
    opened: Instant,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    reader: &tokio::task::AbortHandle,
) -> Option<Message> {
    let settings = target.settings;
    let call = Invocation::new(
        &target.namespace,
        &target.function,
        dispatch_core::envelope::null_raw(),
        Trigger::Endpoint,
    )
    .http(target.http.clone())
    .connection(serde_json::json!({"id": target.id, "session": true}))
    .affinity(target.affinity.clone())
    .trace(target.trace())
    .timeout(settings.max_duration + SESSION_GRACE);
    let end = server_ends(stop, settings, activity, opened);
    let link = Link {
        out,
        activity,
        opened,
        within: settings.idle_timeout,
    };
    let mut r = Box::pin(relay(state, call, Some((in_rx, reader)), link, end)).await;
    let ended = match &r.outcome {
        Some(Ok(a)) if a.envelope.context.error.is_none() => {
            close(1000, "the session ended".into())
        }
        _ => close(1011, "the session failed: see its run record".into()),
    };
    let ending = r.ending.take().unwrap_or(ended);
    answer(state, out, r, settings.idle_timeout)
        .await
        .then_some(ending)
}

/// How a relayed call went.
struct Relayed {
    /// Messages sent while it ran (its chunks).
    sent: u64,
    /// The client went away (a send failed): the call was stopped.
    gone: bool,
    /// `None` when the server ended a session whose handler did not return in time.
    outcome: Option<Result<Answer, CallError>>,
    /// Why the server ended a session.
    ending: Option<Message>,
}

/// Runs `call`, sending each chunk it yields as a message as it comes (a client that does
/// not read holds the handler). A session is fed from its inbox; when `end` resolves the
/// server ends it: its reader stops (the handler's messages end) and the handler has
/// [`SESSION_GRACE`] to return before it is stopped.
/// The client's side of a relayed call: where its messages go and how long one may wait.
struct Link<'a> {
    out: &'a mut Out,
    activity: &'a Activity,
    opened: Instant,
    within: Duration,
}

async fn relay(
    state: &Arc<AppState>,
    call: Invocation,
    session: Option<(mpsc::Receiver<Inbound>, &tokio::task::AbortHandle)>,
    mut link: Link<'_>,
    end: impl std::future::Future<Output = Message>,
) -> Relayed {
    let (sink, mut opening) = Sink::new(CHANNEL_MESSAGES);
    let (sink, reader) = match session {
        Some((inbox, reader)) => (sink.with_inbox(inbox), Some(reader)),
        None => (sink, None),
    };
    let exec = invoke::execute(state, call.stream(sink));
    tokio::pin!(exec, end);
    let mut r = Relayed {
        sent: 0,
        gone: false,
        outcome: None,
        ending: None,
    };
    let mut chunks: Option<mpsc::Receiver<Chunk>> = None;
    let mut waiting = true;
    let mut grace_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            o = &mut exec => {
                r.outcome = Some(o);
                break;
            }
            rx = &mut opening, if waiting => {
                waiting = false;
                chunks = rx.ok();
            }
            c = next(&mut chunks), if chunks.is_some() => match c {
                Some(c) => r.send(state, &mut link, c, &mut chunks).await,
                None => chunks = None,
            },
            m = &mut end, if r.ending.is_none() => {
                r.ending = Some(m);
                if let Some(reader) = reader {
                    reader.abort();
                }
                grace_at = tokio::time::Instant::now() + SESSION_GRACE;
            }
            () = tokio::time::sleep_until(grace_at), if r.ending.is_some() => break,
        }
    }
    // What it yielded last, still in the channel.
    if waiting {
        chunks = opening.try_recv().ok();
    }
    while let Some(c) = next_now(&mut chunks).await {
        r.send(state, &mut link, c, &mut chunks).await;
    }
    r
}

impl Relayed {
    /// Sends one chunk as a message; a client gone drops the chunks (the call stops).
    async fn send(
        &mut self,
        state: &AppState,
        link: &mut Link<'_>,
        c: Chunk,
        chunks: &mut Option<mpsc::Receiver<Chunk>>,
    ) {
        let m = if c.binary {
            Message::Binary(c.data)
        } else {
            Message::text(String::from_utf8_lossy(&c.data).into_owned())
        };
        if !send_within(link.out, m, link.within).await {
            self.gone = true;
            *chunks = None;
            return;
        }
        self.sent += 1;
        state.websockets.sent.fetch_add(1, Ordering::Relaxed);
        touch(link.activity, link.opened);
    }
}

async fn next(chunks: &mut Option<mpsc::Receiver<Chunk>>) -> Option<Chunk> {
    match chunks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next chunk of a call that has ended (its sender is gone: this never waits long).
async fn next_now(chunks: &mut Option<mpsc::Receiver<Chunk>>) -> Option<Chunk> {
    chunks.as_mut()?.recv().await
}

/// After a call: its answer as a message when it streamed nothing, and its error whatever
/// it streamed (the public error, as the gateway's HTTP callers see it). `false` when the
/// connection is gone.
async fn answer(state: &AppState, out: &mut Out, r: Relayed, within: Duration) -> bool {
    if r.gone {
        return false;
    }
    let m = match r.outcome {
        None => None,
        Some(Ok(a)) => match &a.envelope.context.error {
            Some(e) => {
                let timed_out = a.status == dispatch_core::RunStatus::Timeout;
                let public = crate::gateway::public_error(e, &a.run_id, timed_out);
                Some(Message::text(
                    serde_json::json!({ "error": public }).to_string(),
                ))
            }
            None if r.sent > 0 => None,
            None => match a.envelope.payload.get() {
                "null" => None,
                p if p.starts_with('"') => {
                    serde_json::from_str::<String>(p).ok().map(Message::text)
                }
                p => Some(Message::text(p.to_string())),
            },
        },
        Some(Err(e)) => {
            let e = ApiError::from(e);
            Some(Message::text(
                serde_json::json!({"error": {"type": e.code, "message": e.message}}).to_string(),
            ))
        }
    };
    match m {
        Some(m) => {
            let ok = send_within(out, m, within).await;
            if ok {
                state.websockets.sent.fetch_add(1, Ordering::Relaxed);
            }
            ok
        }
        None => true,
    }
}

/// When and why the server ends a connection: shutting down (1001), its `maxDuration` since
/// it opened, or its `idleTimeout` without a message either way (1000, naming the setting).
async fn server_ends(
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    s: WebSocketSettings,
    activity: &Activity,
    opened: Instant,
) -> Message {
    let show = dispatch_core::duration::format_duration;
    tokio::select! {
        () = shutting_down(stop) => close(1001, "the server is shutting down".into()),
        () = tokio::time::sleep_until((opened + s.max_duration).into()) => close(
            1000,
            format!("the connection lasted its maxDuration ({})", show(s.max_duration)),
        ),
        () = idle_for(activity, opened, s.idle_timeout) => close(
            1000,
            format!("no message either way for {} (idleTimeout)", show(s.idle_timeout)),
        ),
    }
}

/// A message as a call's payload: text that is JSON as that JSON, other text as a string,
/// binary as a base64 string.
fn payload_of(m: Inbound) -> Box<RawValue> {
    let text = match m {
        Inbound::Text(t) => {
            if crate::error::check_json(t.as_bytes(), "the message").is_ok()
                && let Ok(v) = RawValue::from_string(t.trim().to_string())
            {
                return v;
            }
            t
        }
        Inbound::Binary(b) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&b)
        }
    };
    serde_json::value::to_raw_value(&text).unwrap_or_else(|_| dispatch_core::envelope::null_raw())
}
