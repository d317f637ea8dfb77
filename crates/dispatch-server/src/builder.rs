//! The composition root: [`ServerBuilder`] opens (or takes) the stores, the blobs and the
//! backend, builds the [`AppState`], wires start-up (controller, recoveries, background tasks)
//! and serves the API and the gateway. Every way of starting a server — `dispatch server`,
//! the Kubernetes mode, quickstart, benchmarks, tests — goes through it.
//!
//! Start-up order: stores → state (recorder, event writer) → controller → external-change
//! feed → route table → every stored resource handed to the controller → namespaces → tokens
//! → recoveries (queue, callbacks, jobs, events) → background tasks → ready → listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dispatch_core::Kind;
use dispatch_runtime::{Backend, LocalBackend};
use dispatch_store::{BlobStore, RecordStore, ResourceStore, SqliteStore, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::controller::Key;
use crate::queue::Queue;
use crate::state::{AppState, Options, Stores};
use crate::{Server, ServerError, api, gateway, gc, secrets, serve};

/// Wraps the SQL store of the data dir into the store of resources the server uses (the
/// Kubernetes mode: custom resources; the SQL store keeps namespaces' rows).
pub type ResourcesFactory = Box<
    dyn FnOnce(
            Arc<dyn ResourceStore>,
        ) -> futures_util::future::BoxFuture<
            'static,
            Result<Arc<dyn ResourceStore>, StoreError>,
        > + Send,
>;

enum Listen {
    Addr(SocketAddr),
    Bound(TcpListener),
}

/// How a server starts. With a data dir, whatever is not given is the embedded default:
/// `dispatch.db` (resources and records) and `history.db` (sync calls' history) in it, its
/// `blobs/`, local worker processes, its `secret.key`, `jobs/` and, with auth on, a first
/// admin token. Without one, stores, blobs and a backend must be given.
pub struct ServerBuilder {
    data_dir: Option<PathBuf>,
    api: Listen,
    gateway: Listen,
    options: Options,
    stores: Option<Stores>,
    /// Records (and resources, unless a factory keeps them elsewhere) in PostgreSQL instead
    /// of the data dir's SQLite files.
    database: Option<dispatch_store::PgOptions>,
    resources: Option<ResourcesFactory>,
    blobs: Option<BlobStore>,
    backend: Option<Arc<dyn Backend>>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            data_dir: None,
            api: Listen::Addr(([127, 0, 0, 1], 0).into()),
            gateway: Listen::Addr(([127, 0, 0, 1], 0).into()),
            options: Options::default(),
            stores: None,
            database: None,
            resources: None,
            blobs: None,
            backend: None,
        }
    }
}

impl Stores {
    /// The embedded stores of a data dir: `dispatch.db` and `history.db`.
    pub fn open(dir: &std::path::Path) -> Result<Stores, StoreError> {
        let main = Arc::new(SqliteStore::open(&dir.join("dispatch.db"))?);
        let history: Arc<dyn RecordStore> =
            Arc::new(SqliteStore::open_history(&dir.join("history.db"))?);
        Ok(Stores {
            resources: main.clone(),
            records: main,
            history,
        })
    }
}

impl ServerBuilder {
    /// Where the embedded parts live (see the type's docs).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Listen for the API on this address (default 127.0.0.1, a free port).
    pub fn api_addr(mut self, addr: SocketAddr) -> Self {
        self.api = Listen::Addr(addr);
        self
    }

    pub fn gateway_addr(mut self, addr: SocketAddr) -> Self {
        self.gateway = Listen::Addr(addr);
        self
    }

    /// Serve the API on a listener the caller bound.
    pub fn api_listener(mut self, l: TcpListener) -> Self {
        self.api = Listen::Bound(l);
        self
    }

    pub fn gateway_listener(mut self, l: TcpListener) -> Self {
        self.gateway = Listen::Bound(l);
        self
    }

    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    pub fn stores(mut self, stores: Stores) -> Self {
        self.stores = Some(stores);
        self
    }

    /// Keep records and resources in PostgreSQL (`dispatch server --database`) instead of
    /// the data dir's SQLite files; the data dir keeps the rest (blobs, builds, the key).
    pub fn database(mut self, options: dispatch_store::PgOptions) -> Self {
        self.database = Some(options);
        self
    }

    /// Keep resources elsewhere (see [`ResourcesFactory`]).
    pub fn resources(mut self, f: ResourcesFactory) -> Self {
        self.resources = Some(f);
        self
    }

    pub fn blobs(mut self, blobs: BlobStore) -> Self {
        self.blobs = Some(blobs);
        self
    }

    /// Run functions with this backend (default: local worker processes).
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Opens what is missing, binds both listeners, wires start-up and serves. Returns once
    /// the server accepts connections (`/readyz` answers 200 once every stored resource has
    /// been handed to the controller).
    pub async fn start(mut self) -> Result<Server, ServerError> {
        let api = std::mem::replace(&mut self.api, Listen::Addr(([127, 0, 0, 1], 0).into()));
        let gateway =
            std::mem::replace(&mut self.gateway, Listen::Addr(([127, 0, 0, 1], 0).into()));
        let admin_token_file = self.prepare().await?;
        let api = listen("api", api).await?;
        let gateway = listen("gateway", gateway).await?;
        let mut server = serve_state(self.build().await?, api, gateway);
        server.admin_token_file = admin_token_file;
        Ok(server)
    }

    /// The state, started (controller, recoveries, background tasks) but not served: for
    /// tests that drive the routers or the state themselves.
    pub async fn state(mut self) -> Result<Arc<AppState>, ServerError> {
        self.prepare().await?;
        self.build().await
    }

    /// Opens the embedded parts of the data dir that were not given; the first admin token
    /// (before serving: /readyz must not answer before its file exists).
    async fn prepare(&mut self) -> Result<Option<PathBuf>, ServerError> {
        let Some(dir) = self.data_dir.clone() else {
            return Ok(None);
        };
        crate::private_data_dir(&dir)?;
        let store_err = |source| ServerError::Store {
            path: dir.display().to_string(),
            source,
        };
        if self.stores.is_none() {
            let mut stores = match self.database.clone() {
                None => Stores::open(&dir).map_err(store_err)?,
                Some(db) => {
                    let at = redacted(&db.url);
                    let pg =
                        tokio::task::spawn_blocking(move || dispatch_store::PgStore::connect(&db))
                            .await
                            .map_err(|e| ServerError::Incomplete {
                                detail: format!("connecting to the database: {e}"),
                            })?
                            .map_err(|source| ServerError::Store { path: at, source })?;
                    Stores::single(Arc::new(pg))
                }
            };
            if let Some(resources) = self.resources.take() {
                stores.resources = resources(stores.resources).await.map_err(store_err)?;
            }
            self.stores = Some(stores);
        }
        if self.blobs.is_none() {
            self.blobs = Some(BlobStore::open(dir.join("blobs")).map_err(store_err)?);
        }
        if self.backend.is_none() {
            let o = &self.options;
            let local = LocalBackend::new(&dir).map_err(|source| ServerError::Runtime {
                path: dir.display().to_string(),
                source,
            })?;
            local.spawn_reaper();
            local.set_max_waiting_calls(o.max_waiting_calls);
            local.set_sandboxes(o.sandboxes.clone());
            local.set_containers(o.containers.clone());
            local.set_worker_budget(
                o.max_workers_total,
                o.worker_memory_budget
                    .unwrap_or_else(dispatch_runtime::budget::default_memory_budget),
            );
            self.backend = Some(local);
        }
        let o = &mut self.options;
        o.jobs_dir = dir.join("jobs");
        o.data_dir = Some(dir.clone());
        // `--secret-key-file` (servers sharing a database share one), else the data dir's.
        let key_file = o
            .secret_key_file
            .clone()
            .unwrap_or_else(|| dir.join("secret.key"));
        let sealer =
            secrets::SecretBox::load_or_create(Some(&key_file)).map_err(ServerError::SecretKey)?;
        if let Some(s) = self.stores.as_ref().filter(|s| s.records.shared()) {
            let (records, mine) = (s.records.clone(), sealer.fingerprint().to_string());
            let agreed = tokio::task::spawn_blocking(move || records.agree("secret-key", &mine))
                .await
                .map_err(|e| ServerError::Incomplete {
                    detail: format!("comparing secret keys: {e}"),
                })?
                .map_err(|source| ServerError::Store {
                    path: "the database".into(),
                    source,
                })?;
            if agreed != sealer.fingerprint() {
                return Err(ServerError::SecretKeyDiffers {
                    file: key_file.display().to_string(),
                });
            }
        }
        o.secret_key_file = Some(key_file);
        match (&self.stores, o.auth) {
            // Store calls block (PostgreSQL's client must not run on an async thread).
            (Some(s), true) => {
                let records = s.records.clone();
                tokio::task::spawn_blocking(move || {
                    crate::first_admin_token(records.as_ref(), &dir)
                })
                .await
                .map_err(|e| ServerError::AdminToken {
                    detail: e.to_string(),
                })?
            }
            _ => Ok(None),
        }
    }

    async fn build(self) -> Result<Arc<AppState>, ServerError> {
        let missing = |what: &str| ServerError::Incomplete {
            detail: format!("no {what}: give one, or a data dir"),
        };
        let stores = self.stores.ok_or_else(|| missing("stores"))?;
        let blobs = self.blobs.ok_or_else(|| missing("blob store"))?;
        let backend = self.backend.ok_or_else(|| missing("backend"))?;
        let (state, keys) = AppState::new(stores, blobs, backend, self.options);
        launch(&state, keys).await;
        Ok(state)
    }
}

async fn listen(what: &'static str, l: Listen) -> Result<TcpListener, ServerError> {
    match l {
        Listen::Bound(l) => Ok(l),
        Listen::Addr(addr) => TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { what, addr, source }),
    }
}

/// Start-up: the controller, the feed of external changes, the route table, every stored
/// resource handed to the controller (so that a restart redeploys), namespaces, tokens, the
/// recoveries, then the background tasks; ready at the end.
async fn launch(state: &Arc<AppState>, keys: tokio::sync::mpsc::UnboundedReceiver<Key>) {
    state.controller.spawn(state.clone(), keys);
    // Before the first list, so that nothing changed after it is missed (handled once
    // start-up is done).
    let (changes_tx, changes) = tokio::sync::mpsc::unbounded_channel();
    state
        .stores
        .resources
        .on_external_change(Box::new(move |c| {
            let _ = changes_tx.send(c);
        }));
    // Tokens and namespaces another server sharing the store changed (PostgreSQL).
    let (shared_tx, shared) = tokio::sync::mpsc::unbounded_channel();
    state.stores.records.on_shared_change(Box::new(move |c| {
        let _ = shared_tx.send(c);
    }));
    if let Err(e) = state.rebuild_routes().await {
        tracing::error!("failed to load endpoints: {e}");
    }
    let all = state
        .res(|s| {
            let mut keys = Vec::new();
            for kind in Kind::ALL {
                for o in s.list(None, kind)? {
                    keys.push(Key::of(&o));
                }
            }
            Ok(keys)
        })
        .await;
    match all {
        Ok(keys) => {
            state.warming.lock().extend(
                keys.iter()
                    .filter(|k| k.kind == Kind::Function)
                    .map(|k| (k.namespace.clone(), k.name.clone())),
            );
            keys.into_iter().for_each(|k| state.enqueue(k))
        }
        Err(e) => tracing::error!("failed to list stored resources: {e}"),
    }
    if let Err(e) = state.load_namespaces().await {
        tracing::error!("failed to load namespaces: {e}");
    }
    match state.db(|s| s.list_tokens()).await {
        Ok(all) => state.tokens.replace_all(all),
        Err(e) => tracing::error!("failed to load API tokens: {e}"),
    }
    // With one server: every active record; on a shared store: this server joins the
    // replicas and takes what nobody holds.
    let taken = crate::replicas::join(state).await;
    crate::replicas::adopt(state, taken).await;
    if let Err(e) = crate::events::rebuild(state).await {
        tracing::error!("failed to load subscriptions: {e}");
    }
    crate::events::recover(state).await;
    let mut tasks = vec![
        tokio::spawn(external_changes(state.clone(), changes)),
        tokio::spawn(shared_changes(state.clone(), shared)),
        Queue::spawn(state.clone()),
        Queue::spawn_expiry(state.clone()),
        crate::retention::spawn(state.clone()),
        crate::events::spawn_cron(state.clone(), state.cron_wake.clone()),
        crate::brokers::spawn_supervisor(state.clone(), state.broker_wake.clone()),
        crate::deliveries::spawn(state.clone()),
    ];
    tasks.extend(crate::replicas::spawn(state.clone()));
    // Job executions asked for as the backend's own objects (`JobExecution` custom resources).
    if let Some(requests) = state.backend.execution_requests() {
        tasks.push(tokio::spawn(crate::jobs::serve_requests(
            state.clone(),
            requests,
        )));
    }
    *state.tasks.lock() = tasks;
    state.ready.store(true, Ordering::Release);
}

/// Serves a started state on the two listeners.
fn serve_state(state: Arc<AppState>, api: TcpListener, gateway: TcpListener) -> Server {
    let gc_task = gc::spawn_periodic(state.clone());
    if let Some(url) = &state.config.otlp_traces_url {
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "dispatch".into());
        let _ = state.otlp.set(crate::otlp::Exporter::start(
            url.clone(),
            state.http.clone(),
            service,
        ));
        tracing::info!(%url, "spans are exported over OTLP/HTTP");
    }
    let (shutdown, rx) = watch::channel(false);
    let api_addr = api
        .local_addr()
        .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into());
    let gateway_addr = gateway
        .local_addr()
        .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into());
    let _ = state.gateway_addr.set(gateway_addr);
    let limits = state.config.edge.clone();
    let (open_files, hard) = serve::raise_open_files_limit();
    let oom_protected = serve::protect_from_oom_killer();
    let (gw_cap, api_cap) = limits.caps(open_files);
    let tls = state.config.tls.clone();
    let metrics = &state.metrics;
    let (mut api_router, mut gw_router) =
        (api::router(state.clone()), gateway::router(state.clone()));
    if let Some(e) = state.otlp.get() {
        api_router = crate::otlp::request_layer(api_router, e.clone());
    }
    if state.config.access_log {
        api_router = crate::access::layer(api_router, serve::Edge::Api);
        gw_router = crate::access::layer(gw_router, serve::Edge::Gateway);
    }
    let api_task = tokio::spawn(serve::serve(
        api,
        tls.clone(),
        api_router,
        serve::Edge::Api,
        api_cap,
        limits.clone(),
        metrics.edge(serve::Edge::Api),
        rx.clone(),
    ));
    let gw_task = tokio::spawn(serve::serve(
        gateway,
        tls,
        gw_router,
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

/// Resources changed outside this server (the store's watch), one at a time, in order.
/// Reads tokens or namespaces again when another server sharing the store changed them.
async fn shared_changes(
    state: Arc<AppState>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<dispatch_store::Shared>,
) {
    while let Some(change) = changes.recv().await {
        let res = match change {
            dispatch_store::Shared::Tokens => state
                .db(|s| s.list_tokens())
                .await
                .map(|all| state.tokens.replace_all(all)),
            dispatch_store::Shared::Namespaces => state.reload_namespaces().await,
            dispatch_store::Shared::Cancel {
                ref namespace,
                ref id,
            } => {
                let done = crate::queue::cancel_here(&state, namespace, id, None).await;
                tracing::info!(run = %id, cancelled = done.is_some(), "another server asked to cancel a run");
                Ok(())
            }
        };
        if let Err(e) = res {
            tracing::error!("failed to read {change:?} changed by another server: {e}");
        }
    }
}

async fn external_changes(
    state: Arc<AppState>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<dispatch_store::Changed>,
) {
    while let Some(change) = changes.recv().await {
        let what = format!("{} {:?}", change.kind.human(), change.name);
        if let Err(e) = crate::resources::changed_elsewhere(&state, change).await {
            tracing::error!("failed to take in a change to {what} made outside this server: {e}");
        }
    }
}

/// A database URL (or libpq's `key=value` form) as it may be shown: without its password.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url
            .split_whitespace()
            .map(|kv| match kv.split_once('=') {
                Some(("password", _)) => "password=***",
                _ => kv,
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let rest = match rest.split_once('@') {
        Some((who, host)) => {
            let user = who.split_once(':').map_or(who, |(u, _)| u);
            format!("{user}@{host}")
        }
        None => rest.to_string(),
    };
    // `?password=…` among the parameters too.
    let rest = match rest.split_once('?') {
        Some((base, query)) => {
            let query: Vec<&str> = query
                .split('&')
                .map(|kv| {
                    if kv.starts_with("password=") {
                        "password=***"
                    } else {
                        kv
                    }
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_urls_are_shown_without_their_password() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db:5432/dispatch",
                "postgres://app@db:5432/dispatch",
            ),
            (
                "postgres://db/dispatch?user=app&password=s3cret",
                "postgres://db/dispatch?user=app&password=***",
            ),
            (
                "host=db user=app password=s3cret dbname=d",
                "host=db user=app password=*** dbname=d",
            ),
            ("postgres://app@db/d", "postgres://app@db/d"),
        ] {
            assert_eq!(super::redacted(url), shown);
        }
    }
}
