//! The embedded server: the control-plane API (`/v1/…`), the gateway that routes user HTTP
//! endpoints to functions, the controller that builds resources into running functions, and
//! the recorder that writes run records off the hot path.
//!
//! Start reading at [`Server::start`] (how the pieces are wired), then [`api`] (the routes of
//! DESIGN §4), [`invoke`] (one function call, shared by the API and the gateway) and
//! [`controller`] (phases INITIALIZED → CREATING → READY | ERROR).

pub mod api;
pub mod auth;
pub mod brokers;
pub mod callbacks;
pub mod clock;
pub mod controller;
pub mod deliveries;
pub mod disk;
mod error;
pub mod events;
pub mod gateway;
pub mod gc;
pub mod invoke;
pub mod jobs;
pub mod metrics;
pub mod queue;
pub mod recorder;
pub mod retention;
pub mod routes;
pub mod secrets;
pub mod serve;
pub mod state;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dispatch_runtime::{Backend, LocalBackend};
use dispatch_store::{BlobStore, SqliteStore, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::ApiError;
pub use state::{AppState, Options};

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
    #[error("failed to create the first admin token: {detail}")]
    AdminToken { detail: String },
    #[error("the {what} listener failed")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Wraps the SQL store of the data dir into the store the server uses (resources kept
/// elsewhere, runs in SQL).
pub type ResourceStore = Box<
    dyn FnOnce(
            Arc<dyn Store>,
        ) -> futures_util::future::BoxFuture<
            'static,
            Result<Arc<dyn Store>, dispatch_store::StoreError>,
        > + Send,
>;

/// What [`Server::start_with`] uses instead of the embedded parts.
#[derive(Default)]
pub struct Parts {
    /// Runs functions (none: local worker processes).
    pub backend: Option<Arc<dyn Backend>>,
    /// Keeps resources (none: the SQL store itself).
    pub resources: Option<ResourceStore>,
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
    /// Opens the store in `config.data_dir`, binds both listeners, starts the controller and
    /// serves. Returns once the server accepts connections (`/readyz` answers 200 as soon as
    /// every stored resource has been handed to the controller).
    pub async fn start(config: &Config) -> Result<Server, ServerError> {
        Self::start_with(config, Parts::default()).await
    }

    /// Like [`Server::start`], with the given parts in place of the embedded ones (the
    /// Kubernetes mode: functions run by its backend, resources kept as custom resources);
    /// the SQL store, the blobs and the jobs stay in the data dir.
    pub async fn start_with(config: &Config, parts: Parts) -> Result<Server, ServerError> {
        let dir = &config.data_dir;
        private_data_dir(dir)?;
        let store_err = |source| ServerError::Store {
            path: dir.display().to_string(),
            source,
        };
        let mut store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.join("dispatch.db")).map_err(store_err)?);
        if let Some(resources) = parts.resources {
            store = resources(store).await.map_err(store_err)?;
        }
        let blobs = BlobStore::open(dir.join("blobs")).map_err(store_err)?;
        let backend: Arc<dyn Backend> = match parts.backend {
            Some(b) => b,
            None => {
                let local = LocalBackend::new(dir).map_err(|source| ServerError::Runtime {
                    path: dir.display().to_string(),
                    source,
                })?;
                local.spawn_reaper();
                local.set_max_waiting_calls(config.options.max_waiting_calls);
                local.set_sandboxes(config.options.sandboxes.clone());
                local.set_worker_budget(
                    config.options.max_workers_total,
                    config
                        .options
                        .worker_memory_budget
                        .unwrap_or_else(dispatch_runtime::budget::default_memory_budget),
                );
                local
            }
        };
        let api = bind("api", config.api_addr).await?;
        let gateway = bind("gateway", config.gateway_addr).await?;
        let mut options = config.options.clone();
        options.jobs_dir = dir.join("jobs");
        options.data_dir = Some(dir.clone());
        let key_file = dir.join("secret.key");
        secrets::SecretBox::load_or_create(Some(&key_file)).map_err(ServerError::SecretKey)?;
        options.secret_key_file = Some(key_file);
        // Before serving: /readyz must not answer before the token file exists.
        let admin_token_file = if options.auth {
            first_admin_token(store.as_ref(), dir)?
        } else {
            None
        };
        let mut server = Self::serve_with(store, blobs, backend, api, gateway, options).await;
        server.admin_token_file = admin_token_file;
        Ok(server)
    }

    /// Serves on listeners the caller bound, with the given parts (tests inject their own).
    pub async fn serve(
        store: Arc<dyn Store>,
        blobs: BlobStore,
        backend: Arc<dyn Backend>,
        api: TcpListener,
        gateway: TcpListener,
    ) -> Server {
        Self::serve_with(store, blobs, backend, api, gateway, Options::default()).await
    }

    pub async fn serve_with(
        store: Arc<dyn Store>,
        blobs: BlobStore,
        backend: Arc<dyn Backend>,
        api: TcpListener,
        gateway: TcpListener,
        options: Options,
    ) -> Server {
        let state = AppState::start_with(store, blobs, backend, options).await;
        let gc_task = gc::spawn_periodic(state.clone());
        let (shutdown, rx) = watch::channel(false);
        let api_addr = api
            .local_addr()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into());
        let gateway_addr = gateway
            .local_addr()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into());
        let limits = state.config.edge.clone();
        let (open_files, hard) = serve::raise_open_files_limit();
        let oom_protected = serve::protect_from_oom_killer();
        let (gw_cap, api_cap) = limits.caps(open_files);
        let tls = state.config.tls.clone();
        let metrics = &state.metrics;
        let api_task = tokio::spawn(serve::serve(
            api,
            tls.clone(),
            api::router(state.clone()),
            serve::Edge::Api,
            api_cap,
            limits.clone(),
            metrics.edge(serve::Edge::Api),
            rx.clone(),
        ));
        let gw_task = tokio::spawn(serve::serve(
            gateway,
            tls,
            gateway::router(state.clone()),
            serve::Edge::Gateway,
            gw_cap,
            limits,
            metrics.edge(serve::Edge::Gateway),
            rx,
        ));
        tracing::info!(%api_addr, %gateway_addr, backend = state.backend.name(), "dispatch server ready");
        tracing::info!(
            open_files,
            open_files_hard = hard,
            gateway_connections = gw_cap,
            api_connections = api_cap,
            oom_protected,
            "connection caps (open-files limit raised to its hard limit); oom_protected: the \
             server's OOM score is below its workers'"
        );
        Server {
            admin_token_file: None,
            api_addr,
            gateway_addr,
            state,
            shutdown,
            gc_task,
            api: api_task,
            gateway: gw_task,
        }
    }

    /// Graceful shutdown: stop accepting, let in-flight calls finish (bounded), stop the
    /// controller, kill every worker, flush run records.
    pub async fn stop(self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        self.gc_task.abort();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let api = self.api.await;
            let gw = self.gateway.await;
            (api, gw)
        })
        .await;
        self.state.stop().await;
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
    let server = Server::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: draining in-flight calls");
    server.stop().await
}

/// First start with auth on (no token exists yet): an admin token for every namespace,
/// written to `DATA_DIR/admin-token` (0600) for the operator and the acceptance scripts.
fn first_admin_token(
    store: &dyn Store,
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
    let secret = auth::generate_token().map_err(|e| token_err(e.message))?;
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

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}
