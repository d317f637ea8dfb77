//! [`LocalBackend`]: the embedded [`Backend`] — functions run as local worker processes (a
//! warm pool per function, zygotes and spares for cold starts, the sandbox around each), builds
//! are directories under the data dir.

use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dispatch_core::{Language, ValidationError};
use serde_json::value::RawValue;

use crate::backend::{
    Backend, BaseImageCheck, BoxFuture, BuildError, DeployedFunction, FunctionDeploy,
    FunctionHandle, GcKeep, ImageBuild, InvokeError, Removed,
};
use crate::budget::{BudgetUse, DEFAULT_MAX_WORKERS_TOTAL, WorkerBudget, default_memory_budget};
use crate::build::{ImageBuilder, Progress};
use crate::handler;
use crate::pool::{CallOutcome, Launcher, Pool, PoolConfig};
use crate::sandbox::Sandboxes;
use crate::source::{self};
use crate::worker::WorkerSpec;
use crate::zygote::{Spares, Zygote};

const PYTHON_BOOTSTRAP: &str = include_str!("../../../../runtimes/python/bootstrap.py");
const NODE_BOOTSTRAP: &str = include_str!("../../../../runtimes/node/bootstrap.js");

/// The bootstrap a language's workers run: its file name in a runtimes folder and its text
/// (none for exec handlers, which speak the protocol themselves).
pub fn bootstrap(language: Language) -> Option<(&'static str, &'static str)> {
    match language {
        Language::Python3 => Some(("bootstrap.py", PYTHON_BOOTSTRAP)),
        Language::Nodejs => Some(("bootstrap.js", NODE_BOOTSTRAP)),
        Language::Exec => None,
    }
}

/// Namespace → function name → pool. Nested maps so that a lookup borrows `&str` keys.
type Pools = HashMap<String, HashMap<String, Arc<Pool>>>;
/// Per function (namespace, name), the pool its last deploy replaced.
type Retired = Arc<Mutex<HashMap<(String, String), Arc<Pool>>>>;

/// A zygote serves one interpreter (an image's venv) with one preload list.
type ZygoteKey = (PathBuf, Option<Vec<String>>);
/// Spares serve one interpreter with one NODE_PATH (an image's node_modules).
type SparesKey = (PathBuf, Option<String>);

mod launch;
pub use launch::{CONTAINER_FUNCTION_DIR, CONTAINER_RUNNER, CONTAINER_RUNTIMES_DIR};

/// Calls of one function that may wait for a busy function's workers, by default.
pub const DEFAULT_MAX_WAITING_CALLS: usize = 256;

pub struct LocalBackend {
    runtimes_dir: PathBuf,
    functions_dir: PathBuf,
    images: ImageBuilder,
    pools: RwLock<Pools>,
    /// Calls of one function that may wait for a worker (per pool created from now on).
    max_queue: AtomicUsize,
    /// Python zygotes by (interpreter, preload list).
    zygotes: Mutex<HashMap<ZygoteKey, Arc<Zygote>>>,
    /// Node spares by (interpreter, NODE_PATH).
    spares: Mutex<HashMap<SparesKey, Arc<Spares>>>,
    /// Zygotes and spares on (the default) or off (every cold start spawns).
    fast_start: AtomicBool,
    /// Function digests whose handler was seen to load.
    validated: Mutex<HashSet<String>>,
    /// Sandboxes for every process of user code (DESIGN §9); `None`: `--isolation none`.
    sandboxes: RwLock<Option<Arc<Sandboxes>>>,
    /// Sandboxed Python zygotes, one per function (each sees only its function's code).
    function_zygotes: Mutex<HashMap<(String, String), Arc<Zygote>>>,
    /// Sandboxed Node spares, one set per function.
    function_spares: Mutex<HashMap<(String, String), Arc<Spares>>>,
    /// How many workers, and how much of their memory, all functions may hold at once.
    budget: RwLock<Arc<WorkerBudget>>,
    /// The container tier (`spec.isolation: container`); `None`: no OCI runtime here.
    containers: RwLock<Option<Arc<crate::container::Containers>>>,
    /// Per function, the pool its newest deploy replaced, kept warm for [`RETIRED_GRACE`] so
    /// that a rollback to that build serves at once (issue 23); closed after.
    retired: Retired,
    /// How long a retired pool stays warm ([`RETIRED_GRACE`]; tests shorten it).
    retired_grace: Mutex<Duration>,
}

/// How long the pool a deploy replaced stays warm for a rollback.
pub const RETIRED_GRACE: Duration = Duration::from_secs(60);

impl LocalBackend {
    /// Writes the bootstraps under `data_dir/runtimes` and prepares `data_dir/builds`.
    pub fn new(data_dir: &Path) -> std::io::Result<Arc<Self>> {
        let runtimes_dir = data_dir.join("runtimes");
        std::fs::create_dir_all(&runtimes_dir)?;
        for (file, text) in [Language::Python3, Language::Nodejs]
            .into_iter()
            .filter_map(bootstrap)
        {
            let path = runtimes_dir.join(file);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
                std::fs::write(&path, text)?;
            }
        }
        Self::with_runtimes_dir(data_dir, runtimes_dir)
    }

    /// Like [`LocalBackend::new`], with the bootstraps read from `runtimes_dir` as they are
    /// (a function image's `/dispatch/runtimes`, which may be read-only).
    pub fn with_runtimes_dir(data_dir: &Path, runtimes_dir: PathBuf) -> std::io::Result<Arc<Self>> {
        let functions_dir = data_dir.join("builds").join("functions");
        let images_dir = data_dir.join("builds").join("images");
        std::fs::create_dir_all(&functions_dir)?;
        std::fs::create_dir_all(&images_dir)?;
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Arc::new(LocalBackend {
            runtimes_dir,
            functions_dir,
            images: ImageBuilder::new(images_dir, parallel),
            pools: RwLock::new(HashMap::new()),
            max_queue: AtomicUsize::new(DEFAULT_MAX_WAITING_CALLS),
            zygotes: Mutex::new(HashMap::new()),
            spares: Mutex::new(HashMap::new()),
            fast_start: AtomicBool::new(true),
            validated: Mutex::new(HashSet::new()),
            sandboxes: RwLock::new(None),
            function_zygotes: Mutex::new(HashMap::new()),
            function_spares: Mutex::new(HashMap::new()),
            budget: RwLock::new(WorkerBudget::new(
                DEFAULT_MAX_WORKERS_TOTAL,
                default_memory_budget(),
            )),
            containers: RwLock::new(None),
            retired: Arc::default(),
            retired_grace: Mutex::new(RETIRED_GRACE),
        }))
    }

    /// The worker budget of pools created from now on (`--max-workers-total`,
    /// `--worker-memory-budget`; set at start, before any function is deployed).
    pub fn set_worker_budget(&self, max_workers: usize, max_memory: u64) {
        *self.budget.write() = WorkerBudget::new(max_workers, max_memory);
    }

    /// Idle workers of every function now.
    pub fn idle_workers(&self) -> usize {
        self.all_pools().iter().map(|p| p.idle_count()).sum()
    }

    fn budget(&self) -> Arc<WorkerBudget> {
        self.budget.read().clone()
    }

    /// Calls of one function allowed to wait for a worker when all its workers are busy;
    /// past it a call is refused ([`crate::pool::PoolError::Busy`], HTTP 429). Pools created from now on.
    pub fn set_max_waiting_calls(&self, n: usize) {
        self.max_queue.store(n, Ordering::Relaxed);
    }

    /// Turns zygotes (Python) and spare generic workers (Node) on or off for pools created
    /// from now on; off, every cold start spawns a new interpreter (benchmarks compare both).
    pub fn set_fast_start(&self, on: bool) {
        self.fast_start.store(on, Ordering::Relaxed);
    }

    /// The zygotes started so far (tests and benchmarks).
    pub fn zygotes(&self) -> Vec<Arc<Zygote>> {
        let mut all: Vec<Arc<Zygote>> = self.zygotes.lock().values().cloned().collect();
        all.extend(self.function_zygotes.lock().values().cloned());
        all
    }

    /// Runs every process of user code from now on in sandboxes of `s` (`None`: on the host,
    /// as the server). Functions deployed before keep how they were started.
    pub fn set_sandboxes(&self, s: Option<Arc<Sandboxes>>) {
        self.images.set_sandboxes(s.clone());
        *self.sandboxes.write() = s;
    }

    /// Runs functions with `spec.isolation: container` with `c` from now on.
    pub fn set_containers(&self, c: Option<Arc<crate::container::Containers>>) {
        *self.containers.write() = c;
    }

    pub(crate) fn containers(&self) -> Option<Arc<crate::container::Containers>> {
        self.containers.read().clone()
    }

    /// The sandboxes in use, if any.
    pub fn sandboxes(&self) -> Option<Arc<Sandboxes>> {
        self.sandboxes.read().clone()
    }

    /// A pool for `d`, its workers per `spec`; its first worker is started (and so the
    /// handler proved to load) by the caller.
    fn new_pool(&self, d: &FunctionDeploy, spec: WorkerSpec) -> Arc<Pool> {
        let budget = self.budget();
        let pool = Arc::new(Pool::new(
            PoolConfig {
                language: d.base.language,
                launcher: self.launcher(d, &spec),
                worker: spec,
                timeout: d.timeout,
                max_workers: d.max_workers,
                min_workers: d.min_workers,
                idle_timeout: d.idle_timeout,
                max_queue: self.max_queue.load(Ordering::Relaxed),
                budget: Some(budget.clone()),
            },
            d.digest.clone(),
        ));
        budget.register(&pool);
        pool
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

    fn pools_read(&self) -> parking_lot::RwLockReadGuard<'_, Pools> {
        self.pools.read()
    }

    fn pools_write(&self) -> parking_lot::RwLockWriteGuard<'_, Pools> {
        self.pools.write()
    }

    /// Serving pools and retired ones (their idle workers are reaped as any).
    fn all_pools(&self) -> Vec<Arc<Pool>> {
        let mut all: Vec<Arc<Pool>> = self
            .pools_read()
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        all.extend(self.retired.lock().values().cloned());
        all
    }

    /// Keeps `old` (just replaced) warm for [`RETIRED_GRACE`], closing the pool retired
    /// before it for this function; closed when the grace ends unless a deploy took it back.
    fn retire(&self, key: (String, String), old: Arc<Pool>) {
        if let Some(before) = self.retired.lock().insert(key.clone(), old.clone()) {
            before.close();
        }
        let retired = Arc::downgrade(&self.retired);
        let grace = *self.retired_grace.lock();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(retired) = retired.upgrade() else {
                return;
            };
            let mut r = retired.lock();
            if r.get(&key).is_some_and(|p| Arc::ptr_eq(p, &old)) {
                r.remove(&key);
                old.close();
            }
        });
    }

    /// Puts `pool` in as the one serving `namespace/name` and retires the one it replaces.
    fn serve(&self, namespace: &str, name: &str, pool: Arc<Pool>) {
        let old = self
            .pools_write()
            .entry(namespace.to_string())
            .or_default()
            .insert(name.to_string(), pool.clone());
        if let Some(old) = old.filter(|o| !Arc::ptr_eq(o, &pool)) {
            self.retire((namespace.to_string(), name.to_string()), old);
        }
    }

    /// Dependency installs run so far (reused builds are not counted).
    pub fn dependency_installs(&self) -> u64 {
        self.images.installs()
    }

    /// How long the pool a deploy replaced stays warm for a rollback (default
    /// [`RETIRED_GRACE`]).
    pub fn set_retired_grace(&self, grace: Duration) {
        *self.retired_grace.lock() = grace;
    }

    /// The pool a function's last deploy replaced, while it is kept warm.
    pub fn retired_pool(&self, namespace: &str, name: &str) -> Option<Arc<Pool>> {
        self.retired
            .lock()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The pool serving a function now, if deployed.
    pub fn pool(&self, namespace: &str, name: &str) -> Option<Arc<Pool>> {
        self.pools_read().get(namespace)?.get(name).cloned()
    }
}

/// A pool is the handle of the build it serves.
impl DeployedFunction for Pool {
    fn invoke<'a>(
        &'a self,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        Box::pin(async move { Ok(self.call(context, payload, deadline).await?) })
    }

    fn invoke_streaming<'a>(
        &'a self,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
        sink: &'a crate::stream::Sink,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        Box::pin(async move {
            Ok(self
                .call_streaming(context, payload, deadline, Some(sink))
                .await?)
        })
    }
}

/// Removes entries of `dir` (`<hex>` folders and their `<hex>.log`) whose hex is neither
/// kept nor busy and which were not modified within `grace`.
fn sweep(
    dir: &Path,
    what: &'static str,
    keep: &HashSet<String>,
    busy: &HashSet<String>,
    grace: Duration,
) -> Vec<Removed> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    let now = std::time::SystemTime::now();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let hex = name.strip_suffix(".log").unwrap_or(&name).to_string();
        if hex.len() != 64
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
            || keep.contains(&hex)
            || busy.contains(&hex)
        {
            continue;
        }
        let recent = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_none_or(|age| age < grace);
        if recent {
            continue;
        }
        let path = e.path();
        let bytes = dir_size(&path);
        let res = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match res {
            Ok(()) if !name.ends_with(".log") => removed.push(Removed {
                what,
                digest: format!("sha256:{hex}"),
                bytes,
            }),
            Ok(()) => {}
            Err(err) => tracing::warn!("gc: failed to remove {}: {err}", path.display()),
        }
    }
    removed
}

/// Bytes under `path` (a file or a tree; symlinks not followed).
pub fn dir_size(path: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !m.is_dir() {
        return m.len();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

/// The files of an unpacked source folder, as an archive would list them.
fn list_files(dir: &Path) -> std::io::Result<Vec<source::SourceFile>> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(root: &Path, dir: &Path, out: &mut Vec<source::SourceFile>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p)?;
            if meta.is_dir() {
                walk(root, &p, out)?;
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(source::SourceFile {
                    path: rel.display().to_string(),
                    executable: meta.permissions().mode() & 0o111 != 0,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

impl LocalBackend {
    /// A pool serving a function from an unpacked source folder, its handler checked and
    /// loaded by a first worker (`dispatch runner` in a function's container image).
    pub async fn pool_for_dir(
        &self,
        d: &FunctionDeploy,
        dir: PathBuf,
    ) -> Result<Arc<Pool>, BuildError> {
        let files = list_files(&dir)
            .map_err(|e| BuildError::Io(format!("cannot read {}: {e}", dir.display())))?;
        let resolved = handler::resolve(d.base.language, d.handler.as_deref(), &files)?;
        let spec = self.worker_spec(d, dir, resolved.args)?;
        let pool = self.new_pool(d, spec);
        if d.base.language != Language::Exec {
            let w = pool.start_worker().await?;
            pool.put_idle(w);
        }
        Ok(pool)
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn worker_budget(&self) -> Option<BudgetUse> {
        Some(self.budget().usage())
    }

    fn validate_image(&self, build: &ImageBuild) -> Result<(), ValidationError> {
        if build.system_dependencies > 0 {
            return Err(ValidationError::new(
                "system dependencies need the kubernetes backend (dispatch server --backend kubernetes); the embedded backend runs functions on this host's packages",
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

    fn build_image<'a>(
        &'a self,
        digest: &'a str,
        build: &'a ImageBuild,
        progress: Progress,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            self.validate_image(build)
                .map_err(|e| BuildError::Unsupported(e.message))?;
            progress("checking the interpreter");
            self.check_base_image(&build.base).await?;
            let Some(manifest) = &build.runtime_dependencies else {
                return Ok(());
            };
            let interpreter = Self::interpreter(&build.base)?;
            self.images
                .build(digest, build, manifest, interpreter.as_deref(), &progress)
                .await
        })
    }

    fn build_log<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move { self.images.log(digest) })
    }

    fn gc<'a>(&'a self, keep: &'a GcKeep, grace: Duration) -> BoxFuture<'a, Vec<Removed>> {
        Box::pin(async move {
            let live: HashSet<String> = self
                .all_pools()
                .iter()
                .map(|p| dispatch_core::digest::hex_part(p.digest()).to_string())
                .collect();
            let hexes = |set: &HashSet<String>| -> HashSet<String> {
                set.iter()
                    .map(|d| dispatch_core::digest::hex_part(d).to_string())
                    .collect()
            };
            let keep_images = hexes(&keep.images);
            let mut keep_functions = hexes(&keep.functions);
            keep_functions.extend(live);
            let images_dir = self.images.dir().to_path_buf();
            let functions_dir = self.functions_dir.clone();
            let busy: HashSet<String> = self.images.building();
            tokio::task::spawn_blocking(move || {
                let mut removed = sweep(&images_dir, "image-build", &keep_images, &busy, grace);
                removed.extend(sweep(
                    &functions_dir,
                    "function-build",
                    &keep_functions,
                    &HashSet::new(),
                    grace,
                ));
                removed
            })
            .await
            .unwrap_or_default()
        })
    }

    fn deploy_function(
        &self,
        d: FunctionDeploy,
    ) -> BoxFuture<'_, Result<FunctionHandle, BuildError>> {
        Box::pin(async move {
            if let Some(current) = self.pool(&d.namespace, &d.name)
                && current.digest() == d.digest
            {
                return Ok(current as FunctionHandle); // already serving this build
            }
            // The build this function served before its last deploy, still warm (a rollback):
            // back at once, with its workers.
            let key = (d.namespace.clone(), d.name.clone());
            // A version deployed beside the function (`hello@3`) takes the function's replaced
            // pool too when it is that build: an alias on the version before a deploy stays warm.
            let function = dispatch_core::versions::split_deploy_name(&d.name).0;
            let back = {
                let mut r = self.retired.lock();
                [key.clone(), (d.namespace.clone(), function.to_string())]
                    .into_iter()
                    .find(|k| r.get(k).is_some_and(|p| p.digest() == d.digest))
                    .and_then(|k| r.remove(&k))
            };
            if let Some(pool) = back {
                self.restore_launcher(&key, &pool);
                self.serve(&d.namespace, &d.name, pool.clone());
                return Ok(pool as FunctionHandle);
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
            let spec = if d.container {
                self.container_spec(&d, dir, &resolved.handler).await?
            } else {
                self.worker_spec(&d, dir, resolved.args)?
            };
            let pool = self.new_pool(&d, spec);
            if d.base.language != Language::Exec && !self.validated.lock().contains(&d.digest) {
                // Validation: the handler must import and be callable. The worker that proved
                // it stays as the first warm worker. A build of the same digest (the same
                // code, image and settings under another name) loaded already: no need.
                let w = pool.start_worker().await?;
                pool.put_idle(w);
                self.validated.lock().insert(d.digest.clone());
            }
            self.serve(&d.namespace, &d.name, pool.clone());
            if let Err(e) = pool.warm().await {
                tracing::warn!(function = %d.name, "failed to start minWorkers: {e}");
            }
            Ok(pool as FunctionHandle)
        })
    }

    fn function(&self, namespace: &str, name: &str) -> Option<FunctionHandle> {
        self.pool(namespace, name).map(|p| p as FunctionHandle)
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
            let key = (namespace.to_string(), name.to_string());
            if let Some(p) = self.retired.lock().remove(&key) {
                p.close();
            }
            self.function_zygotes.lock().remove(&key);
            if let Some(s) = self.function_spares.lock().remove(&key) {
                s.stop();
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
            let retired: Vec<Arc<Pool>> = self.retired.lock().drain().map(|(_, p)| p).collect();
            for p in all.into_iter().chain(retired) {
                p.close();
            }
            let mut zygotes: Vec<Arc<Zygote>> =
                self.zygotes.lock().drain().map(|(_, z)| z).collect();
            zygotes.extend(self.function_zygotes.lock().drain().map(|(_, z)| z));
            for z in zygotes {
                z.stop().await;
            }
            for (_, s) in self.spares.lock().drain() {
                s.stop();
            }
            for (_, s) in self.function_spares.lock().drain() {
                s.stop();
            }
            // Containers outlive the processes that ran them: delete every one of this
            // server's (workers let go above, job containers) before it exits.
            if let Some(c) = self.containers() {
                let _ = tokio::task::spawn_blocking(move || c.engine.reap_all()).await;
            }
        })
    }
}
