//! The [`Backend`] seam (embedded | kubernetes) and its embedded implementation
//! [`LocalBackend`]: functions run as local worker processes, builds are directories under
//! the data dir.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dispatch_core::{Language, ValidationError};
use serde_json::value::RawValue;

use crate::handler;
use crate::pool::{CallOutcome, Pool, PoolConfig, PoolError};
use crate::source::{self, SourceError};
use crate::worker::{StartError, WorkerSpec};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a base image needs to run functions on this backend.
#[derive(Debug, Clone)]
pub struct BaseImageCheck {
    pub language: Language,
    /// Interpreter name or path (embedded mode); `None` = the language's default.
    pub interpreter: Option<String>,
}

/// One image to build: its base and its dependencies.
#[derive(Debug, Clone)]
pub struct ImageBuild {
    pub base: BaseImageCheck,
    pub runtime_dependencies: Option<String>,
    pub system_dependencies: usize,
}

/// One function build to deploy.
#[derive(Debug, Clone)]
pub struct FunctionDeploy {
    pub namespace: String,
    pub name: String,
    /// Function digest (image + source + handler + settings): the build's identity.
    pub digest: String,
    pub base: BaseImageCheck,
    pub archive: Arc<Vec<u8>>,
    pub handler: Option<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub timeout: Duration,
    pub max_workers: u32,
    pub min_workers: u32,
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "interpreter {name:?} was not found on the server's PATH: install it or set the base image's interpreter"
    )]
    InterpreterMissing { name: String },
    #[error("interpreter {name:?} does not run: {detail}")]
    InterpreterBroken { name: String, detail: String },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Handler(#[from] ValidationError),
    #[error("{0}")]
    Load(#[from] StartError),
    #[error("{0}")]
    Unsupported(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("function {name:?} is not deployed in namespace {namespace:?}")]
    NotDeployed { namespace: String, name: String },
    #[error(transparent)]
    Busy(#[from] PoolError),
}

/// Where functions are built and run. One concern: turning resources into something that
/// runs, and running it. The store, the API and the controller are the same for every backend.
pub trait Backend: Send + Sync + 'static {
    /// `embedded` or `kubernetes`.
    fn name(&self) -> &'static str;

    /// Refuses image specs this backend cannot build (a 400 at create time).
    fn validate_image(&self, build: &ImageBuild) -> Result<(), ValidationError>;

    /// Checks that a base image can run functions here.
    fn check_base_image<'a>(
        &'a self,
        base: &'a BaseImageCheck,
    ) -> BoxFuture<'a, Result<(), BuildError>>;

    /// Builds an image (its dependencies on top of its base).
    fn build_image<'a>(&'a self, build: &'a ImageBuild) -> BoxFuture<'a, Result<(), BuildError>>;

    /// Builds a function and switches its traffic to the new build once it is ready.
    fn deploy_function(&self, deploy: FunctionDeploy) -> BoxFuture<'_, Result<(), BuildError>>;

    /// Runs one call of a deployed function.
    fn invoke<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>>;

    /// Stops a function's workers (deleted function).
    fn remove_function<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, ()>;

    /// Stops every worker.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

const PYTHON_BOOTSTRAP: &str = include_str!("../../../runtimes/python/bootstrap.py");
const NODE_BOOTSTRAP: &str = include_str!("../../../runtimes/node/bootstrap.js");

/// Namespace → function name → pool. Nested maps so that a lookup borrows `&str` keys.
type Pools = HashMap<String, HashMap<String, Arc<Pool>>>;

pub struct LocalBackend {
    runtimes_dir: PathBuf,
    functions_dir: PathBuf,
    pools: RwLock<Pools>,
    max_queue: usize,
}

impl LocalBackend {
    /// Writes the bootstraps under `data_dir/runtimes` and prepares `data_dir/builds`.
    pub fn new(data_dir: &Path) -> std::io::Result<Arc<Self>> {
        let runtimes_dir = data_dir.join("runtimes");
        let functions_dir = data_dir.join("builds").join("functions");
        std::fs::create_dir_all(&runtimes_dir)?;
        std::fs::create_dir_all(&functions_dir)?;
        for (file, text) in [
            ("bootstrap.py", PYTHON_BOOTSTRAP),
            ("bootstrap.js", NODE_BOOTSTRAP),
        ] {
            let path = runtimes_dir.join(file);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
                std::fs::write(&path, text)?;
            }
        }
        Ok(Arc::new(LocalBackend {
            runtimes_dir,
            functions_dir,
            pools: RwLock::new(HashMap::new()),
            max_queue: 256,
        }))
    }

    /// Reaps idle workers every second until the returned task is aborted.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                let now = Instant::now();
                for pool in me.all_pools() {
                    pool.reap(now);
                }
            }
        })
    }

    fn pools_read(&self) -> std::sync::RwLockReadGuard<'_, Pools> {
        self.pools.read().unwrap_or_else(|p| p.into_inner())
    }

    fn pools_write(&self) -> std::sync::RwLockWriteGuard<'_, Pools> {
        self.pools.write().unwrap_or_else(|p| p.into_inner())
    }

    fn all_pools(&self) -> Vec<Arc<Pool>> {
        self.pools_read()
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// The pool serving a function now, if deployed.
    pub fn pool(&self, namespace: &str, name: &str) -> Option<Arc<Pool>> {
        self.pools_read().get(namespace)?.get(name).cloned()
    }

    fn interpreter(base: &BaseImageCheck) -> Result<Option<PathBuf>, BuildError> {
        let name = match (&base.interpreter, base.language.default_interpreter()) {
            (Some(i), _) => i.clone(),
            (None, Some(d)) => d.to_string(),
            (None, None) => return Ok(None),
        };
        find_program(&name)
            .map(Some)
            .ok_or(BuildError::InterpreterMissing { name })
    }

    fn worker_spec(
        &self,
        d: &FunctionDeploy,
        dir: PathBuf,
        args: Vec<String>,
    ) -> Result<WorkerSpec, BuildError> {
        let label = format!("{}/{}", d.namespace, d.name);
        let (program, prefix_args) = match d.base.language {
            Language::Python3 => (
                Self::interpreter(&d.base)?.unwrap_or_default(),
                vec![
                    "-u".into(),
                    self.runtimes_dir.join("bootstrap.py").display().to_string(),
                ],
            ),
            Language::Nodejs => (
                Self::interpreter(&d.base)?.unwrap_or_default(),
                vec![self.runtimes_dir.join("bootstrap.js").display().to_string()],
            ),
            Language::Exec => (dir.join(&args[0]), Vec::new()),
        };
        let handler_args = if d.base.language == Language::Exec {
            Vec::new()
        } else {
            args
        };
        Ok(WorkerSpec {
            program,
            prefix_args,
            dir,
            handler_args,
            env: d.env.clone(),
            label,
        })
    }
}

/// Looks `name` up on PATH (or takes it as a path when it has a `/`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn validate_image(&self, build: &ImageBuild) -> Result<(), ValidationError> {
        if build.system_dependencies > 0 {
            return Err(ValidationError::new(
                "system dependencies need the kubernetes backend (dispatch server --backend kubernetes); the embedded backend runs functions on this host's packages",
            ));
        }
        if build
            .runtime_dependencies
            .as_deref()
            .is_some_and(|m| !m.trim().is_empty())
        {
            return Err(ValidationError::new(
                "runtime dependencies (requirements.txt / package.json) are not built by this server version yet: create the image without them",
            ));
        }
        Ok(())
    }

    fn check_base_image<'a>(
        &'a self,
        base: &'a BaseImageCheck,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            let Some(program) = Self::interpreter(base)? else {
                return Ok(());
            };
            let name = program.display().to_string();
            let out = tokio::process::Command::new(&program)
                .arg("--version")
                .kill_on_drop(true)
                .output();
            match tokio::time::timeout(Duration::from_secs(30), out).await {
                Ok(Ok(o)) if o.status.success() => Ok(()),
                Ok(Ok(o)) => Err(BuildError::InterpreterBroken {
                    name,
                    detail: format!("--version exited with {}", o.status),
                }),
                Ok(Err(e)) => Err(BuildError::InterpreterBroken {
                    name,
                    detail: e.to_string(),
                }),
                Err(_) => Err(BuildError::InterpreterBroken {
                    name,
                    detail: "--version did not answer within 30s".into(),
                }),
            }
        })
    }

    fn build_image<'a>(&'a self, build: &'a ImageBuild) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            self.validate_image(build)
                .map_err(|e| BuildError::Unsupported(e.message))?;
            self.check_base_image(&build.base).await
        })
    }

    fn deploy_function(&self, d: FunctionDeploy) -> BoxFuture<'_, Result<(), BuildError>> {
        Box::pin(async move {
            if let Some(current) = self.pool(&d.namespace, &d.name)
                && current.digest() == d.digest
            {
                return Ok(()); // already serving this build
            }
            let dir = self
                .functions_dir
                .join(dispatch_core::digest::hex_part(&d.digest));
            let archive = d.archive.clone();
            let dir2 = dir.clone();
            // Unpacking is blocking file I/O.
            let files = tokio::task::spawn_blocking(move || {
                if dir2.is_dir() {
                    source::inspect(&archive)
                } else {
                    source::unpack(&archive, &dir2)
                }
            })
            .await
            .map_err(|e| BuildError::Unsupported(format!("unpack task failed: {e}")))??;
            let resolved = handler::resolve(d.base.language, d.handler.as_deref(), &files)?;
            let spec = self.worker_spec(&d, dir, resolved.args)?;
            let pool = Arc::new(Pool::new(
                PoolConfig {
                    language: d.base.language,
                    worker: spec,
                    timeout: d.timeout,
                    max_workers: d.max_workers,
                    min_workers: d.min_workers,
                    idle_timeout: d.idle_timeout,
                    max_queue: self.max_queue,
                },
                d.digest.clone(),
            ));
            if d.base.language != Language::Exec {
                // Validation: the handler must import and be callable. The worker that proved
                // it stays as the first warm worker.
                let w = pool.start_worker().await?;
                pool.put_idle(w);
            }
            let old = self
                .pools_write()
                .entry(d.namespace.clone())
                .or_default()
                .insert(d.name.clone(), pool.clone());
            if let Some(old) = old {
                old.close();
            }
            if let Err(e) = pool.warm().await {
                tracing::warn!(function = %d.name, "failed to start minWorkers: {e}");
            }
            Ok(())
        })
    }

    fn invoke<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        Box::pin(async move {
            let pool = self
                .pool(namespace, name)
                .ok_or_else(|| InvokeError::NotDeployed {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })?;
            Ok(pool.call(context, payload, deadline).await?)
        })
    }

    fn remove_function<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let removed = self
                .pools_write()
                .get_mut(namespace)
                .and_then(|m| m.remove(name));
            if let Some(p) = removed {
                p.close();
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let all: Vec<Arc<Pool>> = self
                .pools_write()
                .drain()
                .flat_map(|(_, m)| m.into_values())
                .collect();
            for p in all {
                p.close();
            }
        })
    }
}
