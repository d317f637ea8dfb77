//! The [`Backend`] seam (embedded | kubernetes): what the server asks of whatever runs
//! functions and builds — check base images, build images, deploy, invoke, remove, collect
//! garbage, run jobs — and the types it speaks in. The embedded implementation is
//! `LocalBackend` (module `local`); the Kubernetes one is `dispatch_k8s::backend`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_core::{Language, ValidationError};
use serde_json::value::RawValue;

use crate::budget::BudgetUse;
use crate::pool::{CallOutcome, PoolError};
use crate::source::SourceError;
use crate::worker::StartError;

/// Reports the step a build is at ("installing dependencies with pip").
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// Where a function deploy reports its steps (pulling a base image, its layers), which the
/// server makes the CREATING reason that `--wait` shows; silent by default.
#[derive(Clone, Default)]
pub struct Steps(Option<Progress>);

impl Steps {
    pub fn to(progress: Progress) -> Self {
        Steps(Some(progress))
    }

    pub fn say(&self, step: &str) {
        if let Some(p) = &self.0 {
            p(step)
        }
    }
}

impl std::fmt::Debug for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Steps(reported)"
        } else {
            "Steps(silent)"
        })
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A deployed function as [`Backend::deploy_function`] hands it back: the server keeps it
/// with the deployment and calls it directly, without the backend looking the function up
/// again. A handle outlives a redeploy or removal harmlessly: the build it points at finishes
/// what it was given (embedded: a closed pool still serves, starting workers it then stops).
pub trait DeployedFunction: Send + Sync {
    /// Runs one call.
    fn invoke<'a>(
        &'a self,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>>;

    /// Runs one call whose handler may stream: the chunks it yields go to `sink` as they come
    /// (a bounded channel: a slow reader slows the handler; a dropped one stops the call).
    /// A backend that cannot stream answers whole (the default).
    fn invoke_streaming<'a>(
        &'a self,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
        sink: &'a crate::stream::Sink,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        let _ = sink;
        self.invoke(context, payload, deadline)
    }

    /// The image it runs when the backend built one (Kubernetes); `None` for local workers.
    fn image(&self) -> Option<&str> {
        None
    }
}

pub type FunctionHandle = Arc<dyn DeployedFunction>;

impl std::fmt::Debug for dyn DeployedFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployedFunction")
            .field("image", &self.image())
            .finish_non_exhaustive()
    }
}

/// What a base image needs to run functions on this backend.
#[derive(Debug, Clone)]
pub struct BaseImageCheck {
    /// The base image's OCI reference (the Kubernetes backend builds on it; the embedded one
    /// runs a local interpreter instead).
    pub image: String,
    pub language: Language,
    /// Interpreter name or path (embedded mode); `None` = the language's default.
    pub interpreter: Option<String>,
}

/// One image to build: its base and its dependencies.
#[derive(Debug, Clone)]
pub struct ImageBuild {
    pub base: BaseImageCheck,
    /// The dependency manifest in normal form (requirements.txt / package.json), if any.
    pub runtime_dependencies: Option<String>,
    /// pip `--index-url` / npm `--registry`.
    pub index_url: Option<String>,
    pub system_dependencies: usize,
}

/// What garbage collection must keep: digests still referenced by resources.
#[derive(Debug, Clone, Default)]
pub struct GcKeep {
    pub images: HashSet<String>,
    pub functions: HashSet<String>,
}

/// One thing garbage collection removed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Removed {
    pub what: &'static str,
    pub digest: String,
    pub bytes: u64,
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
    /// Digest of the image's dependency build (venv / node_modules), when it has one.
    pub image_build: Option<String>,
    /// The image's dependency manifest in normal form and its package index (the Kubernetes
    /// backend installs them into the function's image).
    pub dependencies: Option<String>,
    pub index_url: Option<String>,
    pub handler: Option<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub timeout: Duration,
    pub max_workers: u32,
    pub min_workers: u32,
    pub idle_timeout: Duration,
    /// Python modules the image's zygote imports before it forks workers (`None`: the
    /// image's installed dependencies).
    pub preload: Option<Vec<String>>,
    /// Limits of each worker (`spec.resources`).
    pub limits: dispatch_core::resource::Limits,
    /// Network allowed (`spec.network` other than `none`).
    pub network: bool,
    /// `spec.isolation: container`: workers run in the base image with an OCI runtime.
    pub container: bool,
    /// exec handlers (`spec.stream`): stdout is streamed as it is written.
    pub stream: bool,
    /// Where the deploy's steps are reported.
    pub steps: Steps,
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
    #[error("{step} failed: {detail}")]
    Step { step: String, detail: String },
    #[error("{0}")]
    Io(String),
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

    /// What the server-wide worker budget holds (none: the backend has no such budget).
    fn worker_budget(&self) -> Option<BudgetUse> {
        None
    }

    /// Refuses image specs this backend cannot build (a 400 at create time).
    fn validate_image(&self, build: &ImageBuild) -> Result<(), ValidationError>;

    /// Checks that a base image can run functions here.
    fn check_base_image<'a>(
        &'a self,
        base: &'a BaseImageCheck,
    ) -> BoxFuture<'a, Result<(), BuildError>>;

    /// Builds image `digest` (its dependencies on top of its base), or reuses the build of
    /// the same digest; reports steps through `progress`.
    fn build_image<'a>(
        &'a self,
        digest: &'a str,
        build: &'a ImageBuild,
        progress: Progress,
    ) -> BoxFuture<'a, Result<(), BuildError>>;

    /// The log of the last build of image `digest`, if there was one.
    fn build_log<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Option<String>>;

    /// Removes builds not in `keep` and not in use, untouched for at least `grace`.
    fn gc<'a>(&'a self, keep: &'a GcKeep, grace: Duration) -> BoxFuture<'a, Vec<Removed>>;

    /// Builds a function and switches its traffic to the new build once it is ready; returns
    /// the handle its calls go to.
    fn deploy_function(
        &self,
        deploy: FunctionDeploy,
    ) -> BoxFuture<'_, Result<FunctionHandle, BuildError>>;

    /// The function deployed now under this name, for callers that hold no handle.
    fn function(&self, namespace: &str, name: &str) -> Option<FunctionHandle>;

    /// Runs one call of the function deployed now under this name (a lookup, then
    /// [`DeployedFunction::invoke`]).
    fn invoke<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        Box::pin(async move {
            let f = self
                .function(namespace, name)
                .ok_or_else(|| InvokeError::NotDeployed {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })?;
            f.invoke(context, payload, deadline).await
        })
    }

    /// Stops a function's workers (deleted function).
    fn remove_function<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, ()>;

    /// Stops every worker.
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    /// Runs a job execution to its end with this backend's own job machinery (Kubernetes:
    /// a `batch/v1` Job, which does its retries and deadline itself), filling `logs`; `None`
    /// when the server runs jobs as local processes (embedded). Dropping the future stops the
    /// job (cancel).
    fn run_job<'a>(
        &'a self,
        _job: &'a dispatch_core::JobExecution,
        _logs: crate::jobrun::LiveLogs,
    ) -> Option<BoxFuture<'a, JobEnd>> {
        None
    }

    /// Whether this server leads its installation now, for work only one server may do (the
    /// cron scheduler); `None`: it is the only one (embedded).
    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }

    /// Job executions asked for as objects of the backend's own API (Kubernetes: dispatcher's
    /// `JobExecution` custom resources, created with `kubectl apply`): starts following them
    /// and hands each to the server, which starts it under its name. `None`: the backend has
    /// no such objects (embedded; the API's `POST …/jobexecutions` is the way there).
    fn execution_requests(&self) -> Option<tokio::sync::mpsc::Receiver<ExecutionRequest>> {
        None
    }

    /// An execution's record changed: the backend writes its status back to the object it
    /// was asked by, if it was asked by one (nothing otherwise). Must not block.
    fn execution_changed(&self, _job: &dispatch_core::JobExecution) {}
}

/// A job execution asked for through [`Backend::execution_requests`].
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutionRequest {
    /// Start this execution unless its namespace has one of this name. `phase` is the one its
    /// object reports: an object the server took before (any phase but `Invalid`, which waits
    /// for its template) is not started again when its record is gone (expired or deleted).
    Start {
        doc: dispatch_core::manifest::ExecutionDoc,
        phase: Option<String>,
    },
    /// The object was deleted: the execution stops if it still runs (its record stays).
    Deleted { namespace: String, name: String },
}

/// How a job execution ended on a backend that runs jobs itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    pub phase: dispatch_core::JobPhase,
    pub exit_code: Option<i32>,
    pub reason: String,
    /// Pod attempts (1 + retries).
    pub attempts: u32,
}
