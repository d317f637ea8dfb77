//! Job executions (DESIGN §7, dispatcher's `PUT /execute/{ns}/{name}`): render the template
//! with the body as `.Payload`, record a JobExecution (Waiting), start it when its template
//! has fewer than `maxActive` running (else it waits, oldest first), run each attempt with
//! [`dispatch_runtime::jobrun::run_pod`], retry up to `backoffLimit`, kill at
//! `activeDeadlineSeconds`, record phase, exit code and logs at every change (readers see
//! changes at once, not on a poll interval), delete after `ttlSecondsAfterFinished`.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::jobs::{self, JobTemplateSpec, JobView, RenderData};
use dispatch_core::manifest::ExecutionDoc;
use dispatch_core::{JobExecution, JobPhase, Kind, Logs};
use dispatch_runtime::backend::ExecutionRequest;
use dispatch_runtime::jobrun::{ContainerRun, LiveLogs, PodOutcome, run_pod};
use tokio::task::AbortHandle;

use crate::state::{AppState, StateError};

/// Why a job execution is not started or changed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job template {name:?} not found in namespace {namespace:?}")]
    TemplateNotFound { namespace: String, name: String },
    /// The template does not render with this payload, or renders an invalid job.
    #[error("job template {name:?} {why}")]
    Render { name: String, why: String },
    #[error("job execution {uuid:?} not found in namespace {namespace:?}")]
    NotFound { namespace: String, uuid: String },
    #[error("job execution {uuid:?} already ended ({phase}): nothing to cancel")]
    Ended { uuid: String, phase: JobPhase },
    #[error("job execution {0:?} is ending now: nothing to cancel")]
    Ending(String),
    /// An execution of this name exists (executions do not change).
    #[error(
        "job execution {0:?} already exists: an execution does not change; start another \
         under a new name"
    )]
    Exists(String),
    #[error(transparent)]
    Invalid(#[from] dispatch_core::ValidationError),
    #[error(transparent)]
    State(#[from] StateError),
}

type TplKey = (String, String);

/// An execution in the scheduler: its namespace and id (ids may be names given in a
/// manifest, unique only within a namespace).
type ExecKey = (String, String);

fn exec_key(job: &JobExecution) -> ExecKey {
    (job.namespace.clone(), job.uuid.clone())
}

struct Active {
    key: TplKey,
    abort: AbortHandle,
    logs: LiveLogs,
}

#[derive(Default)]
struct Sched {
    /// Per template, the ids of its waiting executions, oldest first.
    waiting: HashMap<TplKey, VecDeque<String>>,
    active_per_tpl: HashMap<TplKey, u32>,
    active: HashMap<ExecKey, Active>,
}

pub struct Jobs {
    sched: Mutex<Sched>,
    /// Executions asked for by the backend's objects whose template does not exist yet, per
    /// template: they start when it is created (dispatcher's `Invalid`, retried).
    awaiting: Mutex<HashMap<TplKey, Vec<ExecutionDoc>>>,
    /// Scratch folders of executions without a workingDir: `data/jobs/<namespace>/<id>`.
    dir: PathBuf,
}

/// What `cancel` found.
enum Found {
    Waiting,
    Active(LiveLogs),
    No,
}

impl Jobs {
    /// Executions waiting for a slot and running now, on this server (`/metrics`).
    pub fn counts(&self) -> (usize, usize) {
        let s = self.sched.lock();
        (s.waiting.values().map(VecDeque::len).sum(), s.active.len())
    }

    pub fn new(dir: PathBuf) -> Jobs {
        Jobs {
            sched: Mutex::new(Sched::default()),
            awaiting: Mutex::default(),
            dir,
        }
    }

    // A std mutex: map operations only, never held across an await.
    fn sched(&self) -> parking_lot::MutexGuard<'_, Sched> {
        self.sched.lock()
    }

    /// An execution's scratch folder (made when it runs without a workingDir).
    fn scratch(&self, job: &JobExecution) -> PathBuf {
        self.dir.join(&job.namespace).join(&job.uuid)
    }

    /// Live logs of an active execution.
    pub fn live_logs(&self, ns: &str, uuid: &str) -> Option<Logs> {
        let s = self.sched();
        let a = s.active.get(&(ns.to_string(), uuid.to_string()))?;
        let l = a.logs.lock().clone();
        Some(l)
    }

    fn take(&self, job: &JobExecution) -> Found {
        let mut s = self.sched();
        if let Some(q) = s.waiting.get_mut(&template_key(job))
            && let Some(i) = q.iter().position(|u| *u == job.uuid)
        {
            q.remove(i);
            return Found::Waiting;
        }
        match s.active.remove(&exec_key(job)) {
            Some(a) => {
                a.abort.abort();
                if let Some(n) = s.active_per_tpl.get_mut(&a.key) {
                    *n = n.saturating_sub(1);
                }
                Found::Active(a.logs)
            }
            None => Found::No,
        }
    }

    /// Ends an active execution's slot; `false` if it was cancelled meanwhile.
    fn release(&self, job: &JobExecution) -> bool {
        let mut s = self.sched();
        match s.active.remove(&exec_key(job)) {
            Some(a) => {
                if let Some(n) = s.active_per_tpl.get_mut(&a.key) {
                    *n = n.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }
}

fn template_key(job: &JobExecution) -> TplKey {
    (job.namespace.clone(), job.name.clone())
}

fn now(state: &AppState) -> jiff::Timestamp {
    state.queue.clock.now()
}

/// Records a change of an execution, and has the backend write it back to the object that
/// asked for it (a `JobExecution` custom resource), if one did.
async fn save(state: &AppState, job: &JobExecution) -> Result<(), StateError> {
    let j = job.clone();
    state.db(move |s| s.put_job(&j)).await?;
    state.backend.execution_changed(job);
    Ok(())
}

/// The template and its runner view for an execution.
async fn template_of(state: &AppState, ns: &str, name: &str) -> Result<JobTemplateSpec, JobError> {
    let Some(t) = state.get(ns, Kind::JobTemplate, name).await? else {
        return Err(JobError::TemplateNotFound {
            namespace: ns.to_string(),
            name: name.to_string(),
        });
    };
    Ok(t.typed_spec()?)
}

/// `PUT /execute/{ns}/{name}`: renders, records (Waiting) and starts or queues an execution.
/// The execution is named `id` when given (a `JobExecution` resource's `metadata.name`;
/// refused when that name exists), else a fresh UUID.
pub async fn execute(
    state: &Arc<AppState>,
    ns: &str,
    name: &str,
    payload: String,
    id: Option<&str>,
    traceparent: Option<&str>,
) -> Result<JobExecution, JobError> {
    let spec = template_of(state, ns, name).await?;
    state
        .disk_admits("job executions", payload.len() as u64)
        .await?;
    let created = now(state);
    let uuid = id.map_or_else(jobs::new_uuid, str::to_string);
    let data = RenderData {
        payload: payload.clone(),
        name: name.to_string(),
        namespace: ns.to_string(),
        uuid: uuid.clone(),
        created,
    };
    let render_error = |why: String| JobError::Render {
        name: name.to_string(),
        why,
    };
    let rendered = jobs::render(&spec.job_template, &data)
        .map_err(|e| render_error(format!("did not render: {e}")))?;
    let view = spec
        .job_view(&rendered)
        .map_err(|e| render_error(format!("rendered an invalid job: {e}")))?;
    let job = JobExecution {
        uuid,
        name: name.to_string(),
        namespace: ns.to_string(),
        phase: JobPhase::Waiting,
        reason: String::new(),
        payload,
        images: view
            .template
            .spec
            .containers
            .iter()
            .filter_map(|c| c.image.clone())
            .collect(),
        rendered,
        trace: Some(dispatch_core::trace::Trace::child_of(traceparent)),
        runtime: spec.runtime.unwrap_or_default(),
        attempts: 0,
        exit_code: None,
        logs: Logs::default(),
        created_at: created,
        started_at: None,
        finished_at: None,
        expires_at: None,
        replica: state.replica.id(),
    };
    let j = job.clone();
    if !state.db(move |s| s.insert_job(&j)).await? {
        return Err(JobError::Exists(job.uuid));
    }
    let job = admit(state, job, spec.max_active()).await;
    state.backend.execution_changed(&job);
    Ok(job)
}

/// Starts `job` if its template has room, else queues it; returns the record as it stands.
async fn admit(state: &Arc<AppState>, mut job: JobExecution, max_active: u32) -> JobExecution {
    let key = template_key(&job);
    let start = {
        let mut s = state.jobs.sched();
        let n = s.active_per_tpl.get(&key).copied().unwrap_or(0);
        if n < max_active && s.waiting.get(&key).is_none_or(|q| q.is_empty()) {
            true
        } else {
            s.waiting
                .entry(key)
                .or_default()
                .push_back(job.uuid.clone());
            false
        }
    };
    if start {
        job.phase = JobPhase::Active;
        spawn(state, job.clone());
    }
    job
}

/// Claims a slot and runs the execution in its own task.
fn spawn(state: &Arc<AppState>, job: JobExecution) {
    let key = template_key(&job);
    let logs: LiveLogs = Arc::new(Mutex::new(Logs::default()));
    let mut s = state.jobs.sched();
    *s.active_per_tpl.entry(key.clone()).or_default() += 1;
    // Spawned under the lock, so that a cancel always finds the handle.
    let task = tokio::spawn(run(state.clone(), job.clone(), logs.clone()));
    s.active.insert(
        exec_key(&job),
        Active {
            key,
            abort: task.abort_handle(),
            logs,
        },
    );
}

/// Starts the oldest waiting execution of a template, if it has room now.
async fn next(state: &Arc<AppState>, key: &TplKey) {
    let Ok(spec) = template_of(state, &key.0, &key.1).await else {
        return;
    };
    loop {
        let uuid = {
            let mut s = state.jobs.sched();
            let n = s.active_per_tpl.get(key).copied().unwrap_or(0);
            if n >= spec.max_active() {
                return;
            }
            match s.waiting.get_mut(key).and_then(|q| q.pop_front()) {
                Some(u) => u,
                None => return,
            }
        };
        let (ns, u) = (key.0.clone(), uuid.clone());
        if let Ok(Some(job)) = state.db(move |s| s.get_job(&ns, &u)).await
            && job.phase == JobPhase::Waiting
        {
            spawn(state, job);
        }
    }
}

/// Pulls the images of the containers that run as OCI containers (the container tier), with
/// the pull's progress in the execution's logs; `None` for those that run on the host.
async fn pull_images(
    state: &AppState,
    job: &JobExecution,
    view: &JobView,
    logs: &LiveLogs,
) -> Result<Vec<Option<Arc<dispatch_runtime::container::Ready>>>, String> {
    let mut out = Vec::new();
    for c in &view.template.spec.containers {
        let image = match &c.image {
            Some(i) if job.runtime == jobs::JobRuntime::Container => i,
            _ => {
                out.push(None);
                continue;
            }
        };
        let Some(containers) = &state.config.containers else {
            return Err(format!(
                "container {} runs image {image}, and this server has no OCI runtime: install \
                 runc (Debian: apt-get install runc) and restart it, or set spec.runtime: host \
                 on the template to run the command on this host",
                c.name
            ));
        };
        let policy =
            dispatch_runtime::container::PullPolicy::of(c.image_pull_policy.as_deref(), image)
                .map_err(|e| format!("container {}: {e}", c.name))?;
        let note = |line: String| push_note(logs, &line);
        let ready = containers
            .images
            .ensure(image, policy, &note)
            .await
            .map_err(|e| format!("container {}: ErrImagePull: {e}", c.name))?;
        out.push(Some(Arc::new(ready)));
    }
    Ok(out)
}

fn containers(
    state: &AppState,
    job: &JobExecution,
    view: &JobView,
    images: Vec<Option<Arc<dispatch_runtime::container::Ready>>>,
) -> std::io::Result<Vec<ContainerRun>> {
    let scratch = state.jobs.scratch(job);
    let mut out = Vec::new();
    for (c, image) in view.template.spec.containers.iter().zip(images) {
        let mut env: Vec<(String, String)> = c
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        if let Some((k, v)) = job.trace_env()
            && !env.iter().any(|(n, _)| n == k)
        {
            env.push((k.to_string(), v));
        }
        if let (Some(ready), Some(tier)) = (image, &state.config.containers) {
            let (uid, gid) = dispatch_runtime::container::identity(
                state.config.sandboxes.as_deref(),
                &job.namespace,
            );
            let mut limits = dispatch_runtime::sandbox::Limits::job();
            let (memory, cpu) = c.limits().map_err(std::io::Error::other)?;
            if let Some(m) = memory {
                limits.memory = m;
            }
            limits.cpu_millis = cpu.or(limits.cpu_millis);
            out.push(ContainerRun {
                name: c.name.clone(),
                command: c.command.clone(),
                args: c.args.clone(),
                env: env.clone(),
                working_dir: PathBuf::from(c.working_dir.clone().unwrap_or_default()),
                jail: None,
                oci: Some(dispatch_runtime::jobrun::OciRun {
                    engine: tier.engine.clone(),
                    container: dispatch_runtime::container::Container {
                        rootfs: ready.rootfs.clone(),
                        image: ready.config.clone(),
                        command: c.command.clone(),
                        args: c.args.clone(),
                        env,
                        working_dir: c.working_dir.clone(),
                        uid,
                        gid,
                        limits,
                        network: true,
                        hostname: job.name.clone(),
                        binds: Vec::new(),
                    },
                    id: format!("{}-{}", job.uuid, c.name),
                    image: ready,
                }),
            });
            continue;
        }
        let working_dir = match &c.working_dir {
            Some(d) => PathBuf::from(d),
            None => {
                std::fs::create_dir_all(&scratch)?;
                scratch.clone()
            }
        };
        // Sandboxed (DESIGN §9), the command sees the system directories and its scratch
        // folder, mounted at its working directory; nothing else of the host.
        let jail = match &state.config.sandboxes {
            Some(s) => {
                std::fs::create_dir_all(&scratch)?;
                let jail = s.jail(
                    &job.namespace,
                    Vec::new(),
                    vec![(scratch.clone(), working_dir.clone())],
                    dispatch_runtime::sandbox::Limits::job(),
                    true,
                );
                jail.hand_over(&scratch)?;
                Some(Arc::new(jail))
            }
            None => None,
        };
        out.push(ContainerRun {
            name: c.name.clone(),
            command: c.command.clone(),
            args: c.args.clone(),
            env,
            working_dir,
            jail,
            oci: None,
        });
    }
    Ok(out)
}

/// One execution: attempts until success, `backoffLimit` or the deadline.
async fn run(state: Arc<AppState>, mut job: JobExecution, logs: LiveLogs) {
    let spec_view = serde_json::from_value::<JobTemplateSpec>(
        serde_json::json!({"jobTemplate": job.rendered, "runtime": job.runtime}),
    )
    .map_err(|e| e.to_string())
    .and_then(|s| s.job_view(&job.rendered).map_err(|e| e.message));
    let view = match spec_view {
        Ok(v) => v,
        Err(e) => {
            job.phase = JobPhase::Invalid;
            job.reason = e;
            return finish(&state, job, &logs, None).await;
        }
    };
    let backoff_limit = view.backoff_limit.unwrap_or(jobs::DEFAULT_BACKOFF_LIMIT);
    let deadline = view
        .active_deadline_seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let exec = job.clone();
    if let Some(running) = state.backend.run_job(&exec, logs.clone()) {
        // The backend's jobs do their own retries and deadline (Kubernetes Jobs).
        job.started_at.get_or_insert(now(&state));
        job.attempts += 1;
        job.phase = JobPhase::Active;
        if let Err(e) = save(&state, &job).await {
            tracing::error!("job {}: {e}", job.uuid);
        }
        let end = running.await;
        job.phase = end.phase;
        job.exit_code = end.exit_code;
        job.reason = end.reason;
        job.attempts = job.attempts.max(end.attempts);
        return finish(&state, job, &logs, view.ttl_seconds_after_finished).await;
    }
    let images = match pull_images(&state, &job, &view, &logs).await {
        Ok(i) => i,
        Err(e) => {
            job.phase = JobPhase::Failed;
            job.reason = e;
            return finish(&state, job, &logs, view.ttl_seconds_after_finished).await;
        }
    };
    let runs = match containers(&state, &job, &view, images) {
        Ok(c) => c,
        Err(e) => {
            job.phase = JobPhase::Failed;
            job.reason = format!("failed to prepare the working directory: {e}");
            return finish(&state, job, &logs, view.ttl_seconds_after_finished).await;
        }
    };
    job.started_at.get_or_insert(now(&state));
    loop {
        job.attempts += 1;
        job.phase = JobPhase::Active;
        if let Err(e) = save(&state, &job).await {
            tracing::error!("job {}: {e}", job.uuid);
        }
        let outcome = run_pod(&runs, deadline, &logs, state.config.max_log_bytes).await;
        match outcome {
            PodOutcome::Succeeded => {
                job.phase = JobPhase::Completed;
                job.exit_code = Some(0);
                job.reason.clear();
                break;
            }
            PodOutcome::DeadlineExceeded => {
                job.phase = JobPhase::Failed;
                job.reason = format!(
                    "DeadlineExceeded: the job ran longer than activeDeadlineSeconds ({}s) and was killed",
                    view.active_deadline_seconds.unwrap_or(0)
                );
                break;
            }
            PodOutcome::StartFailed { container, error } => {
                job.phase = JobPhase::Failed;
                job.reason = format!("container {container}: {error}");
                break;
            }
            PodOutcome::Failed {
                container,
                exit_code,
            } => {
                job.exit_code = Some(exit_code);
                if job.attempts > backoff_limit {
                    job.phase = JobPhase::Failed;
                    job.reason = format!(
                        "BackoffLimitExceeded: container {container} exited with {exit_code} on attempt {} (backoffLimit {backoff_limit})",
                        job.attempts
                    );
                    break;
                }
                job.reason = format!(
                    "attempt {} failed: container {container} exited with {exit_code}; retrying",
                    job.attempts
                );
                push_note(&logs, &job.reason);
            }
        }
    }
    finish(&state, job, &logs, view.ttl_seconds_after_finished).await;
}

fn push_note(logs: &LiveLogs, note: &str) {
    logs.lock().stderr.push(format!("[dispatch] {note}"));
}

/// An execution ended (finished or cancelled; `finished_at` set): counted, and its span
/// when spans are exported.
fn ended(state: &AppState, job: &JobExecution) {
    state.metrics.job_ended(job.phase);
    if let Some(e) = state.otlp.get() {
        crate::otlp::job_span(e, job);
    }
}

/// Records the end of an execution, frees its slot, starts the next waiting one.
async fn finish(state: &Arc<AppState>, mut job: JobExecution, logs: &LiveLogs, ttl: Option<u64>) {
    if !state.jobs.release(&job) {
        return; // cancelled: the canceller records it
    }
    let done = now(state);
    job.finished_at = Some(done);
    ended(state, &job);
    job.logs = logs.lock().clone();
    job.expires_at = ttl.and_then(|s| {
        done.checked_add(jiff::SignedDuration::from_secs(s as i64))
            .ok()
    });
    if let Err(e) = save(state, &job).await {
        tracing::error!("job {}: {e}", job.uuid);
    }
    let _ = std::fs::remove_dir_all(state.jobs.scratch(&job));
    if let Some(secs) = ttl {
        let st = state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let _ = st.db(|s| s.prune_jobs(jiff::Timestamp::now())).await;
        });
    }
    next(state, &template_key(&job)).await;
}

/// `DELETE …/jobexecutions/{uuid}`: a waiting one will not run; an active one is killed.
pub async fn cancel(state: &Arc<AppState>, ns: &str, uuid: &str) -> Result<JobExecution, JobError> {
    let (n, u) = (ns.to_string(), uuid.to_string());
    let Some(mut job) = state.db(move |s| s.get_job(&n, &u)).await? else {
        return Err(JobError::NotFound {
            namespace: ns.to_string(),
            uuid: uuid.to_string(),
        });
    };
    if job.phase.is_final() {
        return Err(JobError::Ended {
            uuid: uuid.to_string(),
            phase: job.phase,
        });
    }
    let found = state.jobs.take(&job);
    match found {
        Found::No => {
            return Err(JobError::Ending(uuid.to_string()));
        }
        Found::Waiting => {}
        Found::Active(logs) => {
            job.logs = logs.lock().clone();
            // Re-read: the attempt count may have moved on.
            let (n, u) = (ns.to_string(), uuid.to_string());
            if let Ok(Some(latest)) = state.db(move |s| s.get_job(&n, &u)).await {
                job.attempts = latest.attempts;
                job.started_at = latest.started_at;
            }
        }
    }
    job.phase = JobPhase::Cancelled;
    job.reason = "cancelled".into();
    job.finished_at = Some(now(state));
    save(state, &job).await?;
    ended(state, &job);
    let _ = std::fs::remove_dir_all(state.jobs.scratch(&job));
    next(state, &template_key(&job)).await;
    Ok(job)
}

/// Server stop: every active execution's processes are killed; the records stay Active and
/// the next start re-runs them (per `backoffLimit`).
pub fn stop_all(state: &AppState) {
    let mut s = state.jobs.sched();
    for (_, a) in s.active.drain() {
        a.abort.abort();
    }
    s.active_per_tpl.clear();
    s.waiting.clear();
}

/// Deleting a template stops its executions and deletes their records.
pub async fn forget_template(state: &Arc<AppState>, ns: &str, name: &str) -> Result<(), JobError> {
    let key = (ns.to_string(), name.to_string());
    {
        let mut s = state.jobs.sched();
        s.waiting.remove(&key);
        let ids: Vec<ExecKey> = s
            .active
            .iter()
            .filter(|(_, a)| a.key == key)
            .map(|(k, _)| k.clone())
            .collect();
        for u in ids {
            if let Some(a) = s.active.remove(&u) {
                a.abort.abort();
            }
        }
        s.active_per_tpl.remove(&key);
    }
    state.db(move |s| s.delete_jobs(&key.0, &key.1)).await?;
    Ok(())
}

/// Executions this server took charge of (start-up, or a server whose lease ended): Waiting
/// ones run again in order; Active ones were cut by the stop of the server that ran them and
/// are re-run if `backoffLimit` allows, else Failed.
pub async fn recover(state: &Arc<AppState>, jobs: Vec<JobExecution>) {
    let _ = state.db(|s| s.prune_jobs(jiff::Timestamp::now())).await;
    for mut job in jobs {
        let spec = match template_of(state, &job.namespace, &job.name).await {
            Ok(s) => s,
            Err(_) => {
                job.phase = JobPhase::Invalid;
                job.reason = "its job template no longer exists".into();
                job.finished_at = Some(now(state));
                let _ = save(state, &job).await;
                continue;
            }
        };
        if job.phase == JobPhase::Active {
            let limit = spec
                .job_view(&job.rendered)
                .ok()
                .and_then(|v| v.backoff_limit)
                .unwrap_or(jobs::DEFAULT_BACKOFF_LIMIT);
            if job.attempts > limit {
                job.phase = JobPhase::Failed;
                job.reason = "the server restarted while the job ran (backoffLimit reached)".into();
                job.finished_at = Some(now(state));
                let _ = save(state, &job).await;
                continue;
            }
            job.phase = JobPhase::Waiting;
            job.reason = format!(
                "the server restarted during attempt {}; running it again",
                job.attempts
            );
            let _ = save(state, &job).await;
        }
        admit(state, job, spec.max_active()).await;
    }
}

/// At most this many executions wait for their templates (beyond: `Invalid` at once).
pub const MAX_AWAITING: usize = 10_000;

/// Executions asked for by the backend's objects (Kubernetes: `JobExecution` custom
/// resources), in the order they come: each starts under its object's name, once. An object
/// seen again (a relist, its own status change) has its record's status written back; one the
/// server took before whose record is gone (expired) is not run again; a deleted one's
/// execution stops.
pub async fn serve_requests(
    state: Arc<AppState>,
    mut requests: tokio::sync::mpsc::Receiver<ExecutionRequest>,
) {
    while let Some(request) = requests.recv().await {
        match request {
            ExecutionRequest::Start { doc, phase } => {
                let ns = doc.namespace.clone().unwrap_or_default();
                let (n, u) = (ns.clone(), doc.name.clone());
                match state.db(move |s| s.get_job(&n, &u)).await {
                    Ok(Some(job)) => state.backend.execution_changed(&job),
                    Ok(None)
                        if phase
                            .as_deref()
                            .is_some_and(|p| !p.is_empty() && p != "Invalid") => {}
                    Ok(None) => start_requested(&state, doc).await,
                    Err(e) => {
                        tracing::error!(execution = %doc.name, namespace = %ns, "reading a job execution: {e}")
                    }
                }
            }
            ExecutionRequest::Deleted { namespace, name } => {
                for docs in state.jobs.awaiting.lock().values_mut() {
                    docs.retain(|d| {
                        !(d.name == name && d.namespace.as_deref() == Some(&namespace))
                    });
                }
                match cancel(&state, &namespace, &name).await {
                    Ok(_)
                    | Err(
                        JobError::NotFound { .. } | JobError::Ended { .. } | JobError::Ending(_),
                    ) => {}
                    Err(e) => {
                        tracing::error!(execution = %name, %namespace, "stopping a job execution whose object was deleted: {e}")
                    }
                }
            }
        }
    }
}

/// Starts an execution an object asked for; one whose template is missing waits for it.
async fn start_requested(state: &Arc<AppState>, doc: ExecutionDoc) {
    let ns = doc.namespace.clone().unwrap_or_default();
    let invalid = |reason: String| JobExecution {
        uuid: doc.name.clone(),
        name: doc.template.clone(),
        namespace: ns.clone(),
        phase: JobPhase::Invalid,
        reason,
        payload: doc.payload.clone(),
        rendered: serde_json::Value::Null,
        images: Vec::new(),
        runtime: jobs::JobRuntime::default(),
        attempts: 0,
        exit_code: None,
        logs: Logs::default(),
        created_at: now(state),
        started_at: None,
        finished_at: None,
        expires_at: None,
        replica: state.replica.id(),
        trace: None,
    };
    let key = (ns.clone(), doc.template.clone());
    let mut waited = false;
    loop {
        // An object asks for it (kubectl, the backend's watch): a trace of its own.
        let e = match execute(
            state,
            &ns,
            &doc.template,
            doc.payload.clone(),
            Some(&doc.name),
            None,
        )
        .await
        {
            Ok(_) => return,
            Err(e) => e,
        };
        match e {
            JobError::Exists(_) => {
                let (n, u) = (ns.clone(), doc.name.clone());
                if let Ok(Some(job)) = state.db(move |s| s.get_job(&n, &u)).await {
                    state.backend.execution_changed(&job);
                }
            }
            JobError::TemplateNotFound { .. } if !waited => {
                let queued = {
                    let mut awaiting = state.jobs.awaiting.lock();
                    let room = awaiting.values().map(Vec::len).sum::<usize>() < MAX_AWAITING;
                    if room {
                        awaiting.entry(key.clone()).or_default().push(doc.clone());
                    }
                    room
                };
                // The template may have been made (and reconciled) between the two steps.
                if queued
                    && state
                        .get(&ns, Kind::JobTemplate, &doc.template)
                        .await
                        .ok()
                        .flatten()
                        .is_some()
                {
                    if let Some(docs) = state.jobs.awaiting.lock().get_mut(&key) {
                        docs.retain(|d| d.name != doc.name);
                    }
                    waited = true;
                    continue;
                }
                let reason = if queued {
                    format!("{e}: it starts when the template is created")
                } else {
                    format!("{e} (and {MAX_AWAITING} executions wait for their templates already)")
                };
                state.backend.execution_changed(&invalid(reason));
            }
            e => state.backend.execution_changed(&invalid(e.to_string())),
        }
        return;
    }
}

/// A job template became ready: executions asked for before it existed start now.
pub async fn template_ready(state: &Arc<AppState>, ns: &str, name: &str) {
    let docs = state
        .jobs
        .awaiting
        .lock()
        .remove(&(ns.to_string(), name.to_string()))
        .unwrap_or_default();
    for doc in docs {
        start_requested(state, doc).await;
    }
}
