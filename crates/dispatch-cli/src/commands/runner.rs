//! `dispatch runner`: the function server inside a function's container (DESIGN §8): Dispatch's
//! function-server contract on `$PORT` — `POST /` with `{"context", "payload"}` answers the
//! envelope, `GET /healthz` answers 200 once the handler is loaded — driving the same language
//! bootstrap through the same worker protocol and warm pool as the embedded server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use axum::response::IntoResponse as _;
use dispatch_core::{Language, ValidationError};
use dispatch_runtime::LocalBackend;
use dispatch_runtime::Pool;
use dispatch_runtime::backend::{BaseImageCheck, FunctionDeploy};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Serve one function over HTTP (the entrypoint of function images on Kubernetes)
#[derive(Debug, clap::Args)]
pub struct Runner {
    /// The function's source folder
    #[arg(long, env = "DISPATCH_FUNCTION_DIR", default_value = "/function")]
    pub function_dir: PathBuf,
    /// python3, nodejs or exec
    #[arg(long, env = "DISPATCH_LANGUAGE", value_parser = ["python3", "nodejs", "exec"])]
    pub language: String,
    /// module.function (Python), file.export (Node), program (exec); default: from the source
    #[arg(long, env = "DISPATCH_HANDLER")]
    pub handler: Option<String>,
    /// Interpreter (default python3 / node on PATH)
    #[arg(long, env = "DISPATCH_INTERPRETER")]
    pub interpreter: Option<String>,
    /// Port to listen on (all interfaces)
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Per-call timeout
    #[arg(long, env = "DISPATCH_TIMEOUT", default_value = "30s")]
    pub timeout: String,
    /// Folder holding the language bootstraps (a function image's /dispatch/runtimes); default:
    /// the ones built into this binary
    #[arg(long, env = "DISPATCH_RUNTIMES_DIR")]
    pub runtimes_dir: Option<PathBuf>,
    /// exec handlers: stream what the program writes to stdout as it comes (`spec.stream`)
    #[arg(long, env = "DISPATCH_STREAM")]
    pub stream: bool,
    /// Concurrent calls (workers)
    #[arg(long, env = "DISPATCH_MAX_WORKERS", default_value_t = 4)]
    pub max_workers: u32,
    /// Be one worker instead of a server: exec the language's bootstrap, which speaks the
    /// worker protocol on stdin (how the embedded server's container tier starts the workers of
    /// `spec.isolation: container` functions in this same image layout)
    #[arg(long)]
    pub worker: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Call {
    #[serde(default)]
    context: Option<Box<RawValue>>,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
}

impl Runner {
    pub async fn run(self) -> Result<ExitCode> {
        let language = Language::parse(&self.language).context("unknown language")?;
        let timeout = dispatch_core::duration::parse_duration(&self.timeout)
            .map_err(|e: ValidationError| anyhow::anyhow!("--timeout: {}", e.message))?;
        let scratch = tempfile::Builder::new()
            .prefix("dispatch-runner-")
            .tempdir()?;
        let backend = match &self.runtimes_dir {
            Some(dir) => LocalBackend::with_runtimes_dir(scratch.path(), dir.clone())?,
            None => LocalBackend::new(scratch.path())?,
        };
        let deploy = FunctionDeploy {
            namespace: "runner".into(),
            name: "function".into(),
            digest: "runner".into(),
            base: BaseImageCheck {
                image: String::new(),
                language,
                interpreter: self.interpreter.clone(),
            },
            archive: Arc::new(Vec::new()),
            image_build: None,
            dependencies: None,
            index_url: None,
            handler: self.handler.clone(),
            env: std::env::vars()
                .filter(|(k, _)| !k.starts_with("DISPATCH_"))
                .collect(),
            timeout,
            max_workers: self.max_workers.max(1),
            min_workers: 1,
            idle_timeout: Duration::from_secs(3600),
            preload: None,
            // The pod is the sandbox here (restricted securityContext, limits from the spec).
            limits: Default::default(),
            network: true,
            container: false,
            stream: self.stream,
            steps: Default::default(),
        };
        if self.worker {
            use std::os::unix::process::CommandExt as _;
            let (program, args) = backend
                .worker_command(&deploy, self.function_dir.clone())
                .with_context(|| {
                    format!(
                        "the function in {} does not load",
                        self.function_dir.display()
                    )
                })?;
            let err = std::process::Command::new(&program)
                .args(&args)
                .current_dir(&self.function_dir)
                .exec();
            anyhow::bail!("cannot start {}: {err}", program.display());
        }
        let pool = backend
            .pool_for_dir(&deploy, self.function_dir.clone())
            .await
            .with_context(|| {
                format!(
                    "the function in {} does not load",
                    self.function_dir.display()
                )
            })?;
        let app = router(pool, timeout);
        let addr = SocketAddr::from(([0, 0, 0, 0], self.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        crate::say(&format!(
            "dispatch runner: serving {} on {addr}",
            self.function_dir.display()
        ));
        axum::serve(listener, app)
            .with_graceful_shutdown(super::server::shutdown_signal())
            .await?;
        Ok(ExitCode::SUCCESS)
    }
}

/// The most a call's request may carry: the largest payload the server takes, and its context.
const MAX_CALL_BYTES: usize = dispatch_core::MAX_PAYLOAD_BYTES + 1024 * 1024;
/// The longest session a runner holds, whatever it is asked.
const MAX_SESSION: Duration = Duration::from_secs(24 * 3600);

fn router(pool: Arc<Pool>, timeout: Duration) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/",
            post(move |req: axum::extract::Request| {
                let pool = pool.clone();
                async move { answer(pool, timeout, req).await }
            }),
        )
}

/// One call: its JSON body answered with the envelope; or, asked by the Kubernetes backend's
/// headers, answered with frames (chunks, live lines, the end) — a session's body being
/// frames too (the call, then its messages as they come).
async fn answer(
    pool: Arc<Pool>,
    timeout: Duration,
    req: axum::extract::Request,
) -> axum::response::Response {
    use dispatch_runtime::stream;
    let (parts, body) = req.into_parts();
    let has = |h: &str| parts.headers.contains_key(h);
    let (session, streams, live) = (
        has(stream::SESSION_HEADER),
        has(stream::STREAM_HEADER),
        has(stream::LIVE_HEADER),
    );
    let bad = |msg: String| {
        let env = dispatch_core::Envelope::error(
            dispatch_core::ErrorObject::input(msg),
            Default::default(),
        );
        (axum::http::StatusCode::BAD_REQUEST, axum::Json(env)).into_response()
    };
    // A session's call is its body's first frame; the rest are its messages.
    let (first, inbox) = if session {
        match session_call(body).await {
            Ok(x) => (x.0, Some(x.1)),
            Err(e) => return bad(format!("a session's request: {e}")),
        }
    } else {
        match axum::body::to_bytes(body, MAX_CALL_BYTES).await {
            Ok(b) => (b, None),
            Err(e) => return bad(format!("the call's body: {e}")),
        }
    };
    let call: Call = match serde_json::from_slice(&first) {
        Ok(c) => c,
        Err(e) => {
            return bad(format!(
                "request is not {{\"context\", \"payload\"}} JSON: {e}"
            ));
        }
    };
    let ctx = call.context.unwrap_or_else(|| {
        RawValue::from_string("{}".into()).unwrap_or_else(|_| dispatch_core::envelope::null_raw())
    });
    let payload = call
        .payload
        .unwrap_or_else(dispatch_core::envelope::null_raw);
    // A session lasts as long as its connection may (the endpoint's maxDuration, which the
    // server sends as the session header's milliseconds), not the function's timeout.
    let session_ms = parts
        .headers
        .get(stream::SESSION_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let deadline = Instant::now()
        + match session_ms {
            Some(ms) => Duration::from_millis(ms).min(MAX_SESSION),
            None => timeout,
        };
    if session || streams || live {
        return framed(
            pool,
            ctx,
            payload,
            deadline,
            streams || session,
            live,
            inbox,
        );
    }
    let (env, timed_out) = match pool.call(&ctx, &payload, deadline).await {
        Ok(out) => (out.envelope, out.timed_out),
        Err(busy) => (
            dispatch_core::Envelope::error(
                dispatch_core::ErrorObject::system(busy.to_string()),
                Default::default(),
            ),
            false,
        ),
    };
    let mut resp = (axum::http::StatusCode::OK, axum::Json(env)).into_response();
    if timed_out {
        resp.headers_mut().insert(
            dispatch_runtime::pool::TIMED_OUT_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    resp
}

/// Reads a session request's first frame (the call), then hands the rest of its body on as
/// messages, 4 at most waiting, from a task of its own: the body's end (or a malformed frame)
/// ends the messages.
async fn session_call(
    body: axum::body::Body,
) -> Result<
    (
        bytes::Bytes,
        tokio::sync::mpsc::Receiver<dispatch_runtime::Inbound>,
    ),
    String,
> {
    use dispatch_runtime::stream;
    use futures_util::StreamExt as _;
    let mut data = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let first = loop {
        if let Some(f) = stream::take_raw_frame(&mut buf)? {
            break f.freeze();
        }
        match data.next().await {
            Some(Ok(b)) => buf.extend_from_slice(&b),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("it ended before the call's frame".into()),
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            match stream::take_session_frame(&mut buf) {
                Ok(Some(Some(m))) => {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(Some(None)) | Err(_) => return,
                Ok(None) => {}
            }
            match data.next().await {
                Some(Ok(b)) => buf.extend_from_slice(&b),
                _ => return,
            }
        }
    });
    Ok((first, rx))
}

/// A call the server asked for frames (the Kubernetes backend): the chunks as the handler
/// yields them (`streams`), the lines as it prints them (`live`), then how it ended. The call
/// runs in its own task; a server that goes away drops the body, and so the chunks' channel:
/// the worker is stopped, as at the gateway. Lines wait at most [`LIVE_LINES`] deep for a
/// slow reader; past that they are left to the answer (which has them all).
fn framed(
    pool: Arc<Pool>,
    ctx: Box<RawValue>,
    payload: Box<RawValue>,
    deadline: Instant,
    streams: bool,
    live: bool,
    inbox: Option<tokio::sync::mpsc::Receiver<dispatch_runtime::Inbound>>,
) -> axum::response::Response {
    use dispatch_runtime::stream::{self, RemoteEnd};
    use futures_util::StreamExt as _;
    const LIVE_LINES: usize = 256;
    // Without `live` the lines' sender goes with the closure never made: their stream is empty.
    let (lines_tx, lines_rx) = tokio::sync::mpsc::channel(LIVE_LINES);
    let logs = live.then(|| -> dispatch_runtime::stream::LogListener {
        Arc::new(move |l| {
            let _ = lines_tx.try_send(stream::log_frame(&l));
        })
    });
    let (mut sink, opened) = match logs {
        // Nobody reads chunks: they are the answer; the chunks' stream is empty.
        Some(logs) if !streams => (
            dispatch_runtime::Sink::logs_only(logs),
            tokio::sync::oneshot::channel().1,
        ),
        logs => {
            let (sink, opened) = dispatch_runtime::Sink::new(16);
            (
                match logs {
                    Some(logs) => sink.with_logs(logs),
                    None => sink,
                },
                opened,
            )
        }
    };
    if let Some(inbox) = inbox {
        sink = sink.with_inbox(inbox);
    }
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let end = match pool
            .call_streaming(&ctx, &payload, deadline, Some(&sink))
            .await
        {
            Ok(out) => RemoteEnd {
                envelope: out.envelope,
                timed_out: out.timed_out,
                cancelled: out.cancelled,
                stream: out.stream,
            },
            Err(busy) => RemoteEnd {
                envelope: dispatch_core::Envelope::error(
                    dispatch_core::ErrorObject::system(busy.to_string()),
                    Default::default(),
                ),
                timed_out: false,
                cancelled: false,
                stream: None,
            },
        };
        drop(sink);
        let _ = end_tx.send(end);
    });
    let lines = futures_util::stream::unfold(lines_rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    });
    let chunks = futures_util::stream::once(async move { opened.await.ok() })
        .filter_map(|rx| async move { rx })
        .flat_map(|rx| {
            futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|c| (stream::chunk_frame(&c), rx))
            })
        });
    let end = futures_util::stream::once(async move {
        let end = end_rx.await.ok()?;
        Some(stream::frame(&serde_json::to_vec(&end).ok()?))
    })
    .filter_map(|f| async move { f });
    // Chunks and lines as they come, both ending with the call; then its end.
    let body = futures_util::stream::select(chunks, lines)
        .chain(end)
        .map(Ok::<_, std::convert::Infallible>);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            stream::FRAMES_CONTENT_TYPE,
        )],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}
