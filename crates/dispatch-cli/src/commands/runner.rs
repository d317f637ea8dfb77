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
        eprintln!(
            "dispatch runner: serving {} on {addr}",
            self.function_dir.display()
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(super::server::shutdown_signal())
            .await?;
        Ok(ExitCode::SUCCESS)
    }
}

fn router(pool: Arc<Pool>, timeout: Duration) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/",
            post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let pool = pool.clone();
                    async move {
                        let call: Call = match serde_json::from_slice(&body) {
                            Ok(c) => c,
                            Err(e) => {
                                let env = dispatch_core::Envelope::error(
                                    dispatch_core::ErrorObject::input(format!(
                                        "request is not {{\"context\", \"payload\"}} JSON: {e}"
                                    )),
                                    Default::default(),
                                );
                                return (axum::http::StatusCode::BAD_REQUEST, axum::Json(env))
                                    .into_response();
                            }
                        };
                        let ctx = call.context.unwrap_or_else(|| {
                            RawValue::from_string("{}".into())
                                .unwrap_or_else(|_| dispatch_core::envelope::null_raw())
                        });
                        let payload = call
                            .payload
                            .unwrap_or_else(dispatch_core::envelope::null_raw);
                        if headers.contains_key(dispatch_runtime::stream::STREAM_HEADER) {
                            return streamed(pool, ctx, payload, Instant::now() + timeout);
                        }
                        let (env, timed_out) =
                            match pool.call(&ctx, &payload, Instant::now() + timeout).await {
                                Ok(out) => (out.envelope, out.timed_out),
                                Err(busy) => (
                                    dispatch_core::Envelope::error(
                                        dispatch_core::ErrorObject::system(busy.to_string()),
                                        Default::default(),
                                    ),
                                    false,
                                ),
                            };
                        let mut resp =
                            (axum::http::StatusCode::OK, axum::Json(env)).into_response();
                        if timed_out {
                            resp.headers_mut().insert(
                                dispatch_runtime::pool::TIMED_OUT_HEADER,
                                axum::http::HeaderValue::from_static("true"),
                            );
                        }
                        resp
                    }
                },
            ),
        )
}

/// A call the server asked to stream (the Kubernetes backend): the chunks as frames as the
/// handler yields them, then how it ended. The call runs in its own task; a server that goes
/// away drops the body, and so the chunks' channel: the worker is stopped, as at the gateway.
fn streamed(
    pool: Arc<Pool>,
    ctx: Box<RawValue>,
    payload: Box<RawValue>,
    deadline: Instant,
) -> axum::response::Response {
    use dispatch_runtime::stream::{self, RemoteEnd};
    use futures_util::StreamExt as _;
    let (sink, opened) = dispatch_runtime::Sink::new(16);
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
    let body = chunks.chain(end).map(Ok::<_, std::convert::Infallible>);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            stream::FRAMES_CONTENT_TYPE,
        )],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}
