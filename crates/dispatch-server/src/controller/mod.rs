//! The controller: turns stored resources into running functions (DESIGN §3 phases
//! INITIALIZED → CREATING → READY | ERROR, with the reason).
//!
//! Every create, update and delete enqueues the resource's [`Key`]; so does start-up, for every
//! stored resource (a restart redeploys everything and resumes what was CREATING). Keys are
//! reconciled concurrently but one key never twice at once: a key that changes while it is
//! being reconciled is reconciled again afterwards, so the last change always wins.
//! A base image that becomes ready re-enqueues its images; an image, its functions.

use std::collections::HashMap;
use std::sync::Arc;

use dispatch_core::{EndpointSpec, FunctionSpec, ImageSpec, Kind, Object, Phase, Status};
use dispatch_runtime::{FunctionDeploy, Progress, Steps};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::metrics::Build;
use crate::state::StateError;

/// Why a reconcile did not finish (it is retried with back-off). What is wrong with the
/// object itself goes into its status instead.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Invalid(#[from] dispatch_core::ValidationError),
    #[error(transparent)]
    State(#[from] StateError),
}
use crate::state::{AppState, Deployed};

mod images;
pub use images::{base_check, function_digest, image_plan};
use images::{image_base, reconcile_base_image, reconcile_image};

/// Which resource to reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub namespace: String,
    pub kind: Kind,
    pub name: String,
}

impl Key {
    pub fn new(namespace: &str, kind: Kind, name: &str) -> Key {
        Key {
            namespace: namespace.to_string(),
            kind,
            name: name.to_string(),
        }
    }

    pub fn of(o: &Object) -> Key {
        Key::new(o.namespace(), o.kind, o.name())
    }
}

pub struct Controller {
    tx: mpsc::UnboundedSender<Key>,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Controller {
    pub fn channel() -> (Controller, mpsc::UnboundedReceiver<Key>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Controller {
                tx,
                task: parking_lot::Mutex::new(None),
            },
            rx,
        )
    }

    pub fn spawn(&self, state: Arc<AppState>, rx: mpsc::UnboundedReceiver<Key>) {
        let task = tokio::spawn(run(state, rx));
        *self.task.lock() = Some(task);
    }

    pub fn enqueue(&self, key: Key) {
        // Fails only after stop(): nothing to reconcile then.
        let _ = self.tx.send(key);
    }

    /// Stops reconciling (builds in progress are dropped; start-up resumes them).
    pub fn stop(&self) {
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
    }
}

async fn run(state: Arc<AppState>, mut rx: mpsc::UnboundedReceiver<Key>) {
    // Key → "changed again while running".
    let mut running: HashMap<Key, bool> = HashMap::new();
    let mut tasks: JoinSet<Key> = JoinSet::new();
    loop {
        tokio::select! {
            key = rx.recv() => {
                let Some(key) = key else { break };
                if let Some(dirty) = running.get_mut(&key) {
                    *dirty = true;
                } else {
                    running.insert(key.clone(), false);
                    tasks.spawn(reconcile_key(state.clone(), key));
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok(key) = done else { continue };
                if running.remove(&key) == Some(true) {
                    running.insert(key.clone(), false);
                    tasks.spawn(reconcile_key(state.clone(), key));
                }
            }
        }
    }
}

async fn reconcile_key(state: Arc<AppState>, key: Key) -> Key {
    let res = match key.kind {
        Kind::BaseImage => reconcile_base_image(&state, &key).await,
        Kind::Image => reconcile_image(&state, &key).await,
        Kind::Function => reconcile_function(&state, &key).await,
        Kind::Endpoint => reconcile_endpoint(&state, &key).await,
        Kind::JobTemplate => reconcile_job_template(&state, &key).await,
        Kind::Secret => reconcile_secret(&state, &key).await,
        Kind::Subscription | Kind::EventDriver => reconcile_event_object(&state, &key).await,
        Kind::Alias => crate::versions::reconcile_alias(&state, &key).await,
    };
    if let Err(e) = res {
        tracing::error!(kind = %key.kind, name = %key.name, namespace = %key.namespace, "reconcile failed: {e}");
    }
    if key.kind == Kind::Function {
        state
            .warming
            .lock()
            .remove(&(key.namespace.clone(), key.name.clone()));
    }
    key
}

/// Writes a status unless it is already the stored one; a deleted object is not an error.
pub(crate) async fn set_status(
    state: &AppState,
    o: &Object,
    status: Status,
) -> Result<(), ReconcileError> {
    if o.status == status {
        return Ok(());
    }
    let (ns, kind, name) = (o.namespace().to_string(), o.kind, o.name().to_string());

    state
        .res(move |s| match s.update_status(&ns, kind, &name, status) {
            Ok(_) => Ok(()),
            Err(dispatch_store::StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        })
        .await?;
    Ok(())
}

pub(crate) fn status(
    phase: Phase,
    reason: impl Into<String>,
    digest: Option<String>,
    o: &Object,
) -> Status {
    Status {
        phase: Some(phase),
        reason: reason.into(),
        digest,
        observed_generation: o.metadata.generation,
        image: o.status.image.clone(),
        next_fire: o.status.next_fire,
    }
}

/// Runs `work`, making each step it reports through the [`Progress`] it is given the object's
/// CREATING reason (what `--wait` shows) when `report`; steps are applied in order and never
/// after `work` ends (its outcome sets the final status).
async fn with_steps<T, F>(
    state: &AppState,
    o: &Object,
    digest: Option<String>,
    report: bool,
    work: impl FnOnce(Progress) -> F,
) -> Result<T, ReconcileError>
where
    F: std::future::Future<Output = T>,
{
    let (tx, mut steps) = mpsc::unbounded_channel::<String>();
    let progress: Progress = Arc::new(move |step: &str| {
        let _ = tx.send(step.to_string());
    });
    let fut = work(progress);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            Some(step) = steps.recv() => {
                if report {
                    set_status(state, o, status(Phase::Creating, step, digest.clone(), o)).await?;
                }
            }
        }
    }
}

/// The status the controller writes for a subscription or an event driver: READY, except for
/// a broker driver, whose connection task alone writes its status (CONNECTED/ERROR and the
/// generation it runs, `brokers::set_state`). The controller once wrote the generation into
/// the status it had read; the API starts a driver before the controller runs, so a quick
/// CONNECTED written in between was replaced by the older status and the driver showed no
/// phase for good (the broker tests' rare "never CONNECTED").
fn event_object_status(o: &Object) -> Option<Status> {
    let broker = o.kind == Kind::EventDriver
        && o.typed_spec::<dispatch_core::events::EventDriverSpec>()
            .is_ok_and(|s| s.is_broker());
    (!broker).then(|| status(Phase::Ready, "", None, o))
}

/// Sets the phase to CREATING (keeping the old digest) unless the object is already there.
async fn mark_creating(state: &AppState, o: &Object, reason: &str) -> Result<(), ReconcileError> {
    let s = status(Phase::Creating, reason, o.status.digest.clone(), o);
    set_status(state, o, s).await
}

async fn dependents(
    state: &AppState,
    ns: &str,
    kind: Kind,
    of: Kind,
    name: &str,
) -> Result<(), ReconcileError> {
    let nsc = ns.to_string();
    for o in state.res(move |s| s.list(Some(&nsc), kind)).await? {
        if o.refers_to(of, name) {
            state.enqueue(Key::of(&o));
        }
    }
    Ok(())
}

/// A build of a new digest ended (`error`: how it failed): its duration in `/metrics` and, with
/// an OTLP endpoint, its span.
pub(crate) fn build_ended(
    state: &AppState,
    kind: Build,
    o: &Object,
    error: Option<String>,
    took: std::time::Duration,
) {
    state.metrics.build_done(kind, error.is_none(), took);
    if let Some(e) = state.otlp.get() {
        crate::otlp::build_span(e, kind.as_str(), o.namespace(), o.name(), took, error);
    }
}

/// A function's build ready to hand to the backend: what [`plan`] makes of a function object
/// (the function itself, or one of its versions).
pub(crate) struct Planned {
    pub deploy: FunctionDeploy,
    pub digest: String,
    pub spec: FunctionSpec,
    pub secrets: serde_json::Map<String, serde_json::Value>,
    pub timeout: std::time::Duration,
}

impl Planned {
    /// What the server keeps of the build once the backend serves it.
    pub fn deployed(
        self,
        handle: dispatch_runtime::FunctionHandle,
        version: Option<u32>,
    ) -> Deployed {
        let spec = &self.spec;
        Deployed {
            handle,
            secrets: Arc::new(self.secrets),
            digest: self.digest,
            version,
            timeout: self.timeout,
            max_workers: spec.max_workers(),
            retry: spec.retry().unwrap_or_default(),
            callback_url: spec.callback_url.clone(),
            max_queued: spec.max_queued.map(|n| n as usize),
            history: spec.history_policy(),
            stream_idle: spec.stream_idle_timeout().unwrap_or_default(),
            metrics: Default::default(),
        }
    }
}

/// Why a function cannot be planned now.
pub(crate) enum Unplanned {
    /// Its image is not READY yet.
    Waiting(String),
    /// Something it names is missing or failed: its ERROR reason.
    Failed(String),
}

/// Everything a function's deploy needs, read from the objects it names: image, base image,
/// secrets, source archive. `mark` makes the function CREATING when its digest changed.
pub(crate) async fn plan(
    state: &AppState,
    o: &Object,
    mark: bool,
) -> Result<Result<Planned, Unplanned>, ReconcileError> {
    let fail = |reason: String| Ok(Err(Unplanned::Failed(reason)));
    let spec: FunctionSpec = match o.typed_spec() {
        Ok(s) => s,
        Err(e) => return fail(e.message),
    };
    let Some(image) = state.get(o.namespace(), Kind::Image, &spec.image).await? else {
        return fail(format!(
            "image {:?} not found in namespace {:?}",
            spec.image,
            o.namespace()
        ));
    };
    match image.phase() {
        Some(Phase::Ready) => {}
        Some(Phase::Error) => {
            return fail(format!(
                "image {:?} failed: {}",
                image.name(),
                image.status.reason
            ));
        }
        _ => {
            let reason = format!("waiting for image {:?}", image.name());
            return Ok(Err(Unplanned::Waiting(reason)));
        }
    }
    let image_spec: ImageSpec = match image.typed_spec() {
        Ok(s) => s,
        Err(e) => return fail(e.message),
    };
    let (base_obj, base_spec) = match image_base(state, o.namespace(), &image_spec).await? {
        Ok(b) => b,
        Err(reason) => return fail(reason),
    };
    let build = match image_plan(&image_spec, &base_obj, &base_spec) {
        Ok((_, build)) => build,
        Err(e) => return fail(e.message),
    };
    let image_has_deps = build.runtime_dependencies.is_some();
    let d = function_digest(
        image.status.digest.as_deref().unwrap_or(""),
        &base_spec,
        &image_spec,
        &spec,
    );
    let changed = o.phase() != Some(Phase::Ready) || o.status.digest.as_deref() != Some(&d);
    if mark && changed {
        mark_creating(state, o, "building").await?;
    }
    let (timeout, idle_timeout) = match (spec.timeout(), spec.idle_timeout()) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return fail(e.message),
    };
    // Secrets: every one must exist and open; a missing one is an ERROR, never an empty value.
    let mut secrets = serde_json::Map::new();
    for name in &spec.secrets {
        let Some(sec) = state.get(o.namespace(), Kind::Secret, name).await? else {
            return fail(format!(
                "secret {name:?} not found in namespace {:?}: create it (dispatch create secret {name} …)",
                o.namespace()
            ));
        };
        match state.secrets.open_object(&sec) {
            Ok(data) => secrets.extend(
                data.into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v))),
            ),
            Err(e) => return fail(e.to_string()),
        }
    }
    // On a store other servers share, the image may be READY because another server built
    // it: this server's workers need the build here too (a complete one is reused at once).
    if image_has_deps && state.stores.records.shared() {
        let digest = image.status.digest.clone().unwrap_or_default();
        let progress: dispatch_runtime::Progress = Arc::new(|_: &str| {});
        if let Err(e) = state.backend.build_image(&digest, &build, progress).await {
            return fail(format!(
                "image {:?} failed on this server: {e}",
                image.name()
            ));
        }
    }
    let source = spec.source.clone().unwrap_or_default();
    let archive = match state.blob(&source).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            return fail(format!(
                "source archive {source} is not stored: upload the source again"
            ));
        }
        Err(e) => return fail(format!("source archive unreadable: {e}")),
    };
    let deploy = FunctionDeploy {
        namespace: o.namespace().to_string(),
        name: o.name().to_string(),
        digest: d.clone(),
        base: base_check(&base_spec),
        archive: Arc::new(archive),
        image_build: image_has_deps.then(|| image.status.digest.clone().unwrap_or_default()),
        dependencies: build.runtime_dependencies,
        index_url: build.index_url,
        handler: spec.handler.clone(),
        env: spec.env.clone(),
        timeout,
        max_workers: spec.max_workers(),
        min_workers: spec.min_workers(),
        idle_timeout,
        preload: image_spec.preload.clone(),
        limits: spec.resources.limits()?,
        network: spec.network != Some(dispatch_core::resource::NetworkMode::None),
        container: spec.isolation == Some(dispatch_core::resource::FunctionIsolation::Container),
        stream: spec.stream,
        steps: Steps::default(),
    };
    Ok(Ok(Planned {
        deploy,
        digest: d,
        spec,
        secrets,
        timeout,
    }))
}

async fn reconcile_function(state: &AppState, key: &Key) -> Result<(), ReconcileError> {
    let Some(o) = state.get(&key.namespace, Kind::Function, &key.name).await? else {
        crate::versions::forget_function(state, &key.namespace, &key.name).await;
        state.set_deployed(&key.namespace, &key.name, None);
        state
            .backend
            .remove_function(&key.namespace, &key.name)
            .await;
        return Ok(());
    };
    let planned = match plan(state, &o, true).await? {
        Ok(p) => p,
        Err(Unplanned::Failed(reason)) => {
            return set_status(state, &o, status(Phase::Error, reason, None, &o)).await;
        }
        Err(Unplanned::Waiting(reason)) => {
            let s = status(Phase::Initialized, reason, o.status.digest.clone(), &o);
            return set_status(state, &o, s).await;
        }
    };
    let d = planned.digest.clone();
    let changed = o.phase() != Some(Phase::Ready) || o.status.digest.as_deref() != Some(&d);
    // A container function's base image pull reports its layers as the CREATING reason.
    let deploy = planned.deploy.clone();
    let started = std::time::Instant::now();
    let deployed = with_steps(state, &o, o.status.digest.clone(), changed, |p| {
        state.backend.deploy_function(FunctionDeploy {
            steps: Steps::to(p),
            ..deploy
        })
    })
    .await?;
    if changed {
        let error = deployed.as_ref().err().map(|e| e.to_string());
        build_ended(state, Build::Function, &o, error, started.elapsed());
    }
    match deployed {
        Ok(handle) => {
            let image = handle.image().map(str::to_string);
            // A build with a new digest is the function's next version (issue 23); the same
            // build again (a restart, a rollback) keeps its number. Recorded before traffic
            // switches, so that every run it serves names it.
            let version = crate::versions::record(state, &o, &planned).await;
            state.set_deployed(
                o.namespace(),
                o.name(),
                Some(planned.deployed(handle, version)),
            );
            if let Some(v) = version {
                // Served as the function now: a deploy of that version beside it is not needed.
                crate::versions::undeploy(state, o.namespace(), o.name(), v).await;
            }
            let mut ready = status(Phase::Ready, "", Some(d), &o);
            ready.image = image;
            set_status(state, &o, ready).await
        }
        Err(e) => set_status(state, &o, status(Phase::Error, e.to_string(), None, &o)).await,
    }
}

async fn reconcile_endpoint(state: &AppState, key: &Key) -> Result<(), ReconcileError> {
    let o = state.get(&key.namespace, Kind::Endpoint, &key.name).await?;
    // Routes are set where a change is taken in (the API's write, a change made elsewhere,
    // the table built at start), in the order changes come. Setting them here too raced a
    // delete: a reconcile that read the endpoint just before it was deleted put its route back
    // after the delete removed it (seen twice in full runs: the deleted endpoint still routed).
    let Some(o) = o else {
        state.set_route(&key.namespace, &key.name, None);
        return Ok(());
    };
    let new = match o.typed_spec::<EndpointSpec>() {
        Ok(spec) => match state
            .get(o.namespace(), Kind::Function, &spec.function)
            .await?
        {
            Some(_) => status(Phase::Ready, "", None, &o),
            None => status(
                Phase::Error,
                format!(
                    "function {:?} not found in namespace {:?}",
                    spec.function,
                    o.namespace()
                ),
                None,
                &o,
            ),
        },
        Err(e) => status(Phase::Error, e.message, None, &o),
    };
    set_status(state, &o, new).await
}

/// Job templates need no build: valid (checked when stored) means READY; executions that
/// waited for the template start then.
async fn reconcile_job_template(state: &Arc<AppState>, key: &Key) -> Result<(), ReconcileError> {
    let Some(o) = state
        .get(&key.namespace, Kind::JobTemplate, &key.name)
        .await?
    else {
        return Ok(());
    };
    let new = match o
        .typed_spec::<dispatch_core::JobTemplateSpec>()
        .and_then(|s| s.validate())
    {
        Ok(()) => status(Phase::Ready, "", None, &o),
        Err(e) => status(Phase::Error, e.message, None, &o),
    };
    let ready = new.phase == Some(Phase::Ready);
    set_status(state, &o, new).await?;
    if ready {
        crate::jobs::template_ready(state, &key.namespace, &key.name).await;
    }
    Ok(())
}

/// Secrets need no build; a change re-reads them into the functions that use them.
async fn reconcile_secret(state: &AppState, key: &Key) -> Result<(), ReconcileError> {
    if let Some(o) = state.get(&key.namespace, Kind::Secret, &key.name).await? {
        set_status(state, &o, status(Phase::Ready, "", None, &o)).await?;
    }
    dependents(
        state,
        &key.namespace,
        Kind::Function,
        Kind::Secret,
        &key.name,
    )
    .await
}

/// Subscriptions and event drivers need no build: valid means READY; the event index and the
/// cron scheduler pick them up.
async fn reconcile_event_object(state: &AppState, key: &Key) -> Result<(), ReconcileError> {
    // The status first, the index (which wakes the brokers' supervisor and the cron
    // scheduler) after: the cron scheduler writes its next fire into a status this write
    // would otherwise replace with the one read before.
    if let Some(o) = state.get(&key.namespace, key.kind, &key.name).await?
        && let Some(st) = event_object_status(&o)
    {
        set_status(state, &o, st).await?;
    }
    crate::events::rebuild(state).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use dispatch_core::{Kind, Object, Phase};
    use serde_json::json;

    use super::event_object_status;

    /// The controller leaves a broker driver's status to its connection task: whatever it
    /// writes (even the generation alone) is a read-modify-write that can undo a CONNECTED.
    #[test]
    fn the_controller_never_writes_a_broker_drivers_status() {
        let mut mqtt = Object::new(
            Kind::EventDriver,
            "default",
            "bus",
            json!({"type": "mqtt", "function": "sink", "config": {"url": "mqtt://127.0.0.1:1883", "topic": "t"}}),
        );
        mqtt.validate().unwrap();
        assert_eq!(event_object_status(&mqtt), None);
        let mut cron = Object::new(
            Kind::EventDriver,
            "default",
            "tick",
            json!({"type": "cron", "schedule": "* * * * *", "function": "sink"}),
        );
        cron.validate().unwrap();
        let st = event_object_status(&cron).expect("a cron driver is READY");
        assert_eq!(st.phase, Some(Phase::Ready));
    }
}
