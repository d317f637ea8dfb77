//! What every handler shares: the store, the blob store, the backend, the controller's queue,
//! the gateway's route table, the run recorder, and what is deployed now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dispatch_core::{Kind, Object};
use dispatch_runtime::Backend;
use dispatch_store::{BlobStore, Store, StoreError};

use crate::controller::{Controller, Key};
use crate::error::ApiError;
use crate::recorder::Recorder;
use crate::routes::Routes;

/// A function that serves calls now (the controller deployed it).
#[derive(Debug, Clone)]
pub struct Deployed {
    pub digest: String,
    pub timeout: Duration,
}

/// Namespace → function → deployment. Nested so that lookups borrow `&str`.
type DeployedMap = HashMap<String, HashMap<String, Arc<Deployed>>>;

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub blobs: BlobStore,
    pub backend: Arc<dyn Backend>,
    pub recorder: Recorder,
    controller: Controller,
    /// Swapped whole on every endpoint change; readers clone the `Arc` (no lock across await).
    routes: RwLock<Arc<Routes>>,
    deployed: RwLock<DeployedMap>,
    ready: AtomicBool,
}

impl AppState {
    /// Builds the state, starts the recorder and the controller, loads the route table and
    /// hands every stored resource to the controller (so that a restart redeploys).
    pub async fn start(
        store: Arc<dyn Store>,
        blobs: BlobStore,
        backend: Arc<dyn Backend>,
    ) -> Arc<Self> {
        let recorder = Recorder::start(store.clone());
        let (controller, queue) = Controller::channel();
        let state = Arc::new(AppState {
            store,
            blobs,
            backend,
            recorder,
            controller,
            routes: RwLock::new(Arc::new(Routes::default())),
            deployed: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
        });
        state.controller.spawn(state.clone(), queue);
        if let Err(e) = state.rebuild_routes().await {
            tracing::error!("failed to load endpoints: {}", e.message);
        }
        let store = state.store.clone();
        let all = tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            for kind in Kind::ALL {
                for o in store.list(None, kind)? {
                    keys.push(Key::of(&o));
                }
            }
            Ok::<_, StoreError>(keys)
        })
        .await;
        match all {
            Ok(Ok(keys)) => keys.into_iter().for_each(|k| state.enqueue(k)),
            Ok(Err(e)) => tracing::error!("failed to list stored resources: {e}"),
            Err(e) => tracing::error!("failed to list stored resources: {e}"),
        }
        state.ready.store(true, Ordering::Release);
        state
    }

    /// Runs a blocking store call on the blocking pool.
    pub async fn db<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(r) => r.map_err(ApiError::from),
            Err(e) => Err(ApiError::internal("running a store call", &e)),
        }
    }

    /// One stored resource (built-in base images included).
    pub async fn get(&self, ns: &str, kind: Kind, name: &str) -> Result<Option<Object>, ApiError> {
        if kind == Kind::BaseImage
            && let Some(b) = crate::api::builtin_base_image(ns, name)
        {
            return Ok(Some(b));
        }
        let (ns, name) = (ns.to_string(), name.to_string());
        self.db(move |s| s.get(&ns, kind, &name)).await
    }

    pub fn enqueue(&self, key: Key) {
        self.controller.enqueue(key);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads the gateway's route table from the stored endpoints.
    pub async fn rebuild_routes(&self) -> Result<(), ApiError> {
        let endpoints = self.db(|s| s.list(None, Kind::Endpoint)).await?;
        let table = Arc::new(Routes::build(&endpoints));
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = table;
        Ok(())
    }

    pub fn deployed(&self, ns: &str, name: &str) -> Option<Arc<Deployed>> {
        self.deployed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ns)?
            .get(name)
            .cloned()
    }

    /// Digests of every function build serving calls now.
    pub fn deployed_digests(&self) -> Vec<String> {
        self.deployed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|m| m.values().map(|d| d.digest.clone()))
            .collect()
    }

    pub fn set_deployed(&self, ns: &str, name: &str, d: Option<Deployed>) {
        let mut map = self.deployed.write().unwrap_or_else(|p| p.into_inner());
        match d {
            Some(d) => {
                map.entry(ns.to_string())
                    .or_default()
                    .insert(name.to_string(), Arc::new(d));
            }
            None => {
                if let Some(m) = map.get_mut(ns) {
                    m.remove(name);
                }
            }
        }
    }

    /// Stops the controller, kills every worker and flushes run records.
    pub async fn stop(&self) {
        self.controller.stop();
        self.backend.shutdown().await;
        self.recorder.flush().await;
    }
}
