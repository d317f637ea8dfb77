//! The embedded server: the control-plane API (`/v1/…`), the gateway that routes user HTTP
//! endpoints to functions, the controller that builds resources into running functions, and
//! the recorder that writes run records off the hot path.
//!
//! Start reading at [`ServerBuilder`] (how the pieces are wired), then [`api`] (the routes of
//! DESIGN §4), [`invoke`] (one function call, shared by the API and the gateway) and
//! [`controller`] (phases INITIALIZED → CREATING → READY | ERROR).

pub mod access;
mod admission;
pub mod api;
pub mod auth;
pub mod brokers;
mod builder;
mod builtins;
pub mod callbacks;
pub mod clock;
pub mod console;
pub mod controller;
pub mod deliveries;
pub mod disk;
mod error;
pub mod events;
pub mod gateway;
pub mod gc;
mod history;
pub mod invoke;
pub mod jobs;
pub mod live;
pub mod metrics;
mod options;
pub mod otlp;
pub mod queue;
pub mod recorder;
pub mod replicas;
mod resources;
pub mod retention;
pub mod routes;
pub mod secrets;
pub mod serve;
pub mod state;
mod state_error;
pub mod stats;
pub mod stream;
pub mod tls;
mod tokens;
pub mod versions;
pub mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use builder::{ResourcesFactory, ServerBuilder, redacted};
pub use error::ApiError;
pub use invoke::Invocation;
pub use state::{AppState, Options, Stores};

/// How long in-flight calls may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Config {
    /// SQLite database, blobs, builds and runtimes live here.
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub options: Options,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("failed to create the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the data dir {path} is writable by other users (mode {mode:o}): they could change \
         its database or a function's code; run `chmod 700 {path}` (or pick another --data-dir)"
    )]
    DataDirOpen { path: String, mode: u32 },
    #[error("failed to open the store in {path}")]
    Store {
        path: String,
        #[source]
        source: dispatch_store::StoreError,
    },
    #[error("failed to prepare the local runtimes in {path}")]
    Runtime {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to listen on {addr} ({what}): is another server running there? pick another address"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to load the key that seals secrets")]
    SecretKey(#[source] secrets::SecretError),
    #[error(
        "the key that seals secrets ({file}) is not the one the other servers sharing this \
         database use: give every server the same key file (--secret-key-file, e.g. from one \
         Kubernetes Secret), or the secrets one seals the others cannot open"
    )]
    SecretKeyDiffers { file: String },
    #[error("failed to create the first admin token: {detail}")]
    AdminToken { detail: String },
    #[error("cannot start the server: {detail}")]
    Incomplete { detail: String },
    #[error("the {what} listener failed")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A running server. Dropping it does not stop it: call [`Server::stop`].
pub struct Server {
    /// Where the first admin token was written, when this start created it.
    pub admin_token_file: Option<PathBuf>,
    pub api_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    gc_task: tokio::task::JoinHandle<()>,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    gateway: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// How a server starts: see [`ServerBuilder`].
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The first step of a shutdown: `/readyz` answers 503 from now on while everything else
    /// is still served, so that a load balancer (a Kubernetes Service) stops sending new
    /// requests before the listeners close ([`Server::stop`]).
    pub fn stop_taking_traffic(&self) {
        self.state
            .ready
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Graceful shutdown: stop accepting, let in-flight calls finish (bounded), stop the
    /// controller, kill every worker, flush run records.
    pub async fn stop(self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        self.state.live_logs.close();
        self.gc_task.abort();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let api = self.api.await;
            let gw = self.gateway.await;
            (api, gw)
        })
        .await;
        self.state.stop().await;
        // The last calls' spans go out before the process does.
        if let Some(e) = self.state.otlp.get() {
            e.flush(std::time::Duration::from_secs(5)).await;
        }
        match drained {
            Ok((api, gw)) => {
                for (what, res) in [("api", api), ("gateway", gw)] {
                    if let Ok(Err(source)) = res {
                        return Err(ServerError::Serve { what, source });
                    }
                }
            }
            Err(_) => tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}"),
        }
        Ok(())
    }
}

/// Runs a server until `shutdown` completes, then stops it gracefully.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let server = Server::builder()
        .data_dir(&config.data_dir)
        .api_addr(config.api_addr)
        .gateway_addr(config.gateway_addr)
        .options(config.options.clone())
        .start()
        .await?;
    shutdown.await;
    tracing::info!("shutting down: draining in-flight calls");
    server.stop().await
}

/// First start with auth on (no token exists yet): an admin token for every namespace,
/// written to `DATA_DIR/admin-token` (0600) for the operator and the acceptance scripts.
fn first_admin_token(
    store: &dyn dispatch_store::RecordStore,
    dir: &std::path::Path,
) -> Result<Option<PathBuf>, ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token_err = |detail: String| ServerError::AdminToken { detail };
    if !store
        .list_tokens()
        .map_err(|e| token_err(e.to_string()))?
        .is_empty()
    {
        return Ok(None);
    }
    let secret = auth::generate_token().map_err(|e| token_err(e.to_string()))?;
    let record = dispatch_core::auth::ApiToken {
        name: "admin".into(),
        role: dispatch_core::auth::Role::Admin,
        namespace: dispatch_core::auth::ALL_NAMESPACES.into(),
        hash: dispatch_core::auth::token_hash(&secret),
        created_at: jiff::Timestamp::now(),
        expires_at: None,
    };
    let path = dir.join("admin-token");
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .map_err(|source| ServerError::DataDir {
            path: path.display().to_string(),
            source,
        })?;
    store
        .put_token(&record)
        .map_err(|e| token_err(e.to_string()))?;
    Ok(Some(path))
}

/// The data dir holds every tenant's code, runs, tokens and the key of their secrets: created
/// 0700; refused when other users can write to it (they could swap the database or a
/// function's build), a warning when they can read it (PostgreSQL's rule for its data dir).
pub fn private_data_dir(dir: &std::path::Path) -> Result<(), ServerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| ServerError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(ServerError::DataDirOpen {
            path: dir.display().to_string(),
            mode,
        });
    }
    if mode & 0o044 != 0 {
        tracing::warn!(
            "other users can read the data dir {} (mode {mode:o}): run `chmod 700 {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}
