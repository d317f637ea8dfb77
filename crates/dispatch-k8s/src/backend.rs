//! [`KubernetesBackend`]: the server's `Backend` seam on Kubernetes (DESIGN §8). A function
//! deploy builds its image without a daemon and pushes it ([`crate::image`]), applies its
//! Deployment and Service (or Knative Service) by server-side apply, and waits until the new
//! pods are available; calls go to the function's Service, where `dispatch runner` answers
//! with the envelope. The API, the store and the controller are the embedded server's.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_core::{
    Envelope, ErrorObject, JobExecution, JobPhase, Language, Timings, ValidationError,
};
use dispatch_runtime::backend::{
    Backend, BaseImageCheck, BoxFuture, BuildError, FunctionDeploy, GcKeep, ImageBuild,
    InvokeError, JobEnd, Removed,
};
use dispatch_runtime::build::Progress;
use dispatch_runtime::jobrun::LiveLogs;
use dispatch_runtime::pool::CallOutcome;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use serde_json::value::RawValue;

use crate::image::{self, ImageError, ImageRequest};
use crate::oci::{Registry, RegistryOptions};
use crate::{FunctionImage, Workload};

/// (namespace, function) → the base URL of its runner.
pub type FunctionUrl = Arc<dyn Fn(&str, &str) -> String + Send + Sync>;

/// How functions reach the cluster and its registry.
#[derive(Clone)]
pub struct KubernetesOptions {
    /// Where function images are pushed: `registry/path` (the image is
    /// `<repository>/<namespace>/<function>:<digest hex>`).
    pub repository: String,
    pub registry: RegistryOptions,
    /// Knative `serving.knative.dev/v1` Services instead of Deployments and Services.
    pub knative: bool,
    /// The `dispatch` binary put in function images as their runner.
    pub runner: PathBuf,
    /// The dockerconfigjson Secret function pods pull their image with (it must exist in
    /// each function's namespace); none: the registry needs no credentials to pull.
    pub pull_secret: Option<String>,
    /// How long a deploy waits for the new pods to be available.
    pub ready_timeout: Duration,
    /// How often a deploy looks at the rollout.
    pub poll_interval: Duration,
    /// Leader election among the servers of this installation (who runs the cron
    /// scheduler); `None`: this server leads.
    pub lease: Option<crate::lease::LeaseConfig>,
    /// The URL of a function's runner: by default its Service in cluster DNS,
    /// `http://fn-<name>.<namespace>.svc` (Knative: `http://fn-<name>.<namespace>.svc`
    /// too, its cluster-local address).
    pub function_url: FunctionUrl,
    /// Job templates are custom resources ([`crate::store::CrStore`]): each Job is owned by
    /// its template's, so that deleting the template (even with kubectl) deletes its Jobs.
    pub job_owners: bool,
    /// Job logs are followed while the Job runs (otherwise read once at its end).
    pub live_logs: bool,
}

impl KubernetesOptions {
    pub fn new(repository: impl Into<String>, runner: PathBuf) -> KubernetesOptions {
        KubernetesOptions {
            repository: repository.into(),
            registry: RegistryOptions::default(),
            knative: false,
            pull_secret: None,
            runner,
            ready_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            lease: None,
            function_url: Arc::new(|ns, name| format!("http://fn-{name}.{ns}.svc")),
            job_owners: false,
            live_logs: true,
        }
    }
}

pub struct KubernetesBackend {
    client: kube::Client,
    registry: Registry,
    options: KubernetesOptions,
    http: reqwest::Client,
    /// (namespace, function) → the digest serving and its image.
    deployed: Mutex<HashMap<(String, String), (String, String)>>,
    /// The last failure of an image's build, by image digest.
    logs: Mutex<HashMap<String, String>>,
    leader: Option<tokio::sync::watch::Receiver<bool>>,
}

fn build_error(e: ImageError) -> BuildError {
    match e {
        ImageError::Build(b) => b,
        other => BuildError::Unsupported(other.to_string()),
    }
}

fn system_error(message: String) -> Envelope {
    Envelope::error(ErrorObject::system(message), Default::default())
}

fn kube_error(what: &str, e: kube::Error) -> BuildError {
    BuildError::Step {
        step: what.to_string(),
        detail: e.to_string(),
    }
}

impl KubernetesBackend {
    pub fn new(client: kube::Client, options: KubernetesOptions) -> Arc<KubernetesBackend> {
        let registry = Registry::new(options.registry.clone());
        let leader = options
            .lease
            .clone()
            .map(|cfg| crate::lease::spawn(client.clone(), cfg));
        Arc::new(KubernetesBackend {
            leader,
            client,
            registry,
            options,
            http: reqwest::Client::new(),
            deployed: Mutex::new(HashMap::new()),
            logs: Mutex::new(HashMap::new()),
        })
    }

    /// Connects with the in-cluster service account, else KUBECONFIG or ~/.kube/config.
    pub async fn connect(
        options: KubernetesOptions,
    ) -> Result<Arc<KubernetesBackend>, kube::Error> {
        Ok(Self::new(kube::Client::try_default().await?, options))
    }

    /// Waits until the function's Deployment has rolled out: the controller saw the latest
    /// spec and every replica is updated and available.
    async fn wait_ready(&self, ns: &str, name: &str) -> Result<(), BuildError> {
        use kube::api::Api;
        let api = Api::<Deployment>::namespaced(self.client.clone(), ns);
        let object = format!("fn-{name}");
        let deadline = Instant::now() + self.options.ready_timeout;
        loop {
            let d = api
                .get(&object)
                .await
                .map_err(|e| kube_error("reading the Deployment", e))?;
            if rolled_out(&d) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = d
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| c.status != "True")
                    .filter_map(|c| c.message)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(BuildError::Step {
                    step: "rollout".into(),
                    detail: format!(
                        "deployment {object} in {ns} was not available within {:?}{}",
                        self.options.ready_timeout,
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(": {why}")
                        }
                    ),
                });
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
    }
}

/// Whether a Deployment's latest generation is fully rolled out and serving.
pub fn rolled_out(d: &Deployment) -> bool {
    let Some(s) = &d.status else {
        return false;
    };
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && s.updated_replicas.unwrap_or(0) >= want
        && s.available_replicas.unwrap_or(0) >= want
        && s.replicas.unwrap_or(0) <= s.updated_replicas.unwrap_or(0)
}

impl Backend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn validate_image(&self, build: &ImageBuild) -> Result<(), ValidationError> {
        if build.system_dependencies > 0 {
            return Err(ValidationError::new(
                "system dependencies need a package manager run inside the image, which the \
                 Kubernetes backend's daemonless builds do not do yet: put them in the base \
                 image",
            ));
        }
        if build.base.language == Language::Exec && build.runtime_dependencies.is_some() {
            return Err(ValidationError::new(
                "exec images have no runtime dependencies to install",
            ));
        }
        Ok(())
    }

    fn check_base_image<'a>(
        &'a self,
        base: &'a BaseImageCheck,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            self.registry
                .base(&base.image)
                .await
                .map(|_| ())
                .map_err(|e| BuildError::Unsupported(e.to_string()))
        })
    }

    fn build_image<'a>(
        &'a self,
        digest: &'a str,
        build: &'a ImageBuild,
        progress: Progress,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            // What can fail for the whole image fails here: the base must be readable and
            // the dependencies must install for its platform. Functions reuse the install.
            let result = async {
                progress(&format!("reading base image {}", build.base.image));
                let base = self.registry.base(&build.base.image).await?;
                image::dependencies_layer(
                    &base,
                    build.base.language,
                    build.runtime_dependencies.as_deref(),
                    None,
                    build.index_url.as_deref(),
                    &|s: &str| progress(s),
                )
                .await?;
                Ok::<(), ImageError>(())
            }
            .await;
            match result {
                Ok(()) => {
                    self.logs.lock().remove(digest);
                    progress("dependencies installed for the image's platform");
                    Ok(())
                }
                Err(e) => {
                    self.logs.lock().insert(digest.to_string(), e.to_string());
                    Err(build_error(e))
                }
            }
        })
    }

    fn build_log<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move { self.logs.lock().get(digest).cloned() })
    }

    fn gc<'a>(&'a self, _keep: &'a GcKeep, _grace: Duration) -> BoxFuture<'a, Vec<Removed>> {
        // Images live in the registry; its own garbage collection removes unreferenced blobs.
        Box::pin(async { Vec::new() })
    }

    fn deploy_function(
        &self,
        d: FunctionDeploy,
    ) -> BoxFuture<'_, Result<Option<String>, BuildError>> {
        Box::pin(async move {
            let key = (d.namespace.clone(), d.name.clone());
            if let Some((digest, image)) = self.deployed.lock().get(&key)
                && *digest == d.digest
            {
                return Ok(Some(image.clone())); // already serving this build
            }
            let input = ImageRequest {
                // `<repository>/<namespace>/<function>`: one repository per function.
                name: format!("{}/{}", d.namespace, d.name),
                language: d.base.language,
                handler: d.handler.clone(),
                archive: d.archive.clone(),
                base: d.base.image.clone(),
                repository: self.options.repository.clone(),
                digest: d.digest.clone(),
                dependencies: d.dependencies.clone(),
                python_version: None,
                index_url: d.index_url.clone(),
                runner: self.options.runner.clone(),
            };
            let quiet = |_: &str| {};
            let built = image::build(&self.registry, &input, &quiet)
                .await
                .map_err(build_error)?;
            let workload = Workload {
                env: d.env.clone(),
                timeout: d.timeout,
                max_workers: d.max_workers,
                min_workers: d.min_workers,
                limits: d.limits,
                network: d.network,
            };
            let runnable = FunctionImage {
                reference: &built.pushed.reference,
                language: d.base.language,
                handler: &built.handler,
                digest: &d.digest,
                pull_secret: self.options.pull_secret.as_deref(),
            };
            if self.options.knative {
                crate::apply_knative(&self.client, &d.namespace, &d.name, &workload, &runnable)
                    .await
                    .map_err(|e| kube_error("applying the Knative Service", e))?;
            } else {
                crate::apply_function(&self.client, &d.namespace, &d.name, &workload, &runnable)
                    .await
                    .map_err(|e| kube_error("applying the Deployment and Service", e))?;
                self.wait_ready(&d.namespace, &d.name).await?;
            }
            self.deployed
                .lock()
                .insert(key, (d.digest.clone(), built.pushed.reference.clone()));
            Ok(Some(built.pushed.reference))
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
            if !self
                .deployed
                .lock()
                .contains_key(&(namespace.to_string(), name.to_string()))
            {
                return Err(InvokeError::NotDeployed {
                    namespace: namespace.into(),
                    name: name.into(),
                });
            }
            let url = (self.options.function_url)(namespace, name);
            let body = format!(
                r#"{{"context":{},"payload":{}}}"#,
                context.get(),
                payload.get()
            );
            let t0 = Instant::now();
            let sent = self
                .http
                .post(format!("{}/", url.trim_end_matches('/')))
                .header("content-type", "application/json")
                .body(body)
                .timeout(deadline.saturating_duration_since(t0))
                .send()
                .await;
            let mut timed_out = false;
            let envelope = match sent {
                Ok(r) => {
                    timed_out = r
                        .headers()
                        .contains_key(dispatch_runtime::pool::TIMED_OUT_HEADER);
                    match r.bytes().await {
                        Ok(b) => serde_json::from_slice::<Envelope>(&b).unwrap_or_else(|e| {
                            system_error(format!(
                                "function {name} answered something that is not an envelope: {e}"
                            ))
                        }),
                        Err(e) => {
                            system_error(format!("reading the answer of function {name}: {e}"))
                        }
                    }
                }
                Err(e) if e.is_timeout() => {
                    timed_out = true;
                    system_error(format!("function {name} did not answer within its timeout"))
                }
                Err(e) => system_error(format!("function {name} is not reachable at {url}: {e}")),
            };
            Ok(CallOutcome {
                envelope,
                cold: false,
                cold_start: None,
                timings: Timings {
                    exec_ms: t0.elapsed().as_millis() as u64,
                    ..Default::default()
                },
                timed_out,
            })
        })
    }

    fn remove_function<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.deployed
                .lock()
                .remove(&(namespace.to_string(), name.to_string()));
            let r = if self.options.knative {
                crate::delete_knative(&self.client, namespace, name).await
            } else {
                crate::delete_function(&self.client, namespace, name).await
            };
            if let Err(e) = r {
                tracing::warn!(function = name, namespace, "removing from Kubernetes: {e}");
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        // Functions keep running in the cluster: they belong to it, not to this process.
        Box::pin(async {})
    }

    fn run_job<'a>(
        &'a self,
        job: &'a JobExecution,
        logs: LiveLogs,
    ) -> Option<BoxFuture<'a, JobEnd>> {
        Some(Box::pin(self.job_to_end(job, logs)))
    }

    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.leader.clone()
    }
}

/// Deletes a Job (and its pods) when dropped armed: a cancelled execution stops in the cluster.
struct DeleteOnDrop {
    api: kube::Api<Job>,
    name: String,
    armed: bool,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (api, name) = (self.api.clone(), std::mem::take(&mut self.name));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = api
                    .delete(&name, &kube::api::DeleteParams::background())
                    .await
                {
                    tracing::warn!(job = %name, "deleting a cancelled Job: {e}");
                }
            });
        }
    }
}

fn job_failed(reason: String) -> JobEnd {
    JobEnd {
        phase: JobPhase::Failed,
        exit_code: None,
        reason,
        attempts: 0,
    }
}

/// A finished Job's phase, reason and attempts; `None` while it runs.
pub fn job_end(j: &Job) -> Option<JobEnd> {
    let status = j.status.as_ref()?;
    let attempts = (status.succeeded.unwrap_or(0) + status.failed.unwrap_or(0)).max(0) as u32;
    for c in status.conditions.iter().flatten() {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => {
                return Some(JobEnd {
                    phase: JobPhase::Completed,
                    exit_code: Some(0),
                    reason: String::new(),
                    attempts,
                });
            }
            "Failed" => {
                let reason = c.reason.clone().unwrap_or_else(|| "Failed".into());
                let message = c.message.clone().unwrap_or_default();
                return Some(JobEnd {
                    phase: JobPhase::Failed,
                    exit_code: None,
                    reason: if message.is_empty() {
                        reason
                    } else {
                        format!("{reason}: {message}")
                    },
                    attempts,
                });
            }
            _ => {}
        }
    }
    None
}

/// Appends one container's log lines to `logs.stdout` as they come, until the container ends.
async fn follow_container(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    pod: &str,
    container: &str,
    prefix: bool,
    logs: &LiveLogs,
) {
    use futures_util::{AsyncBufReadExt as _, StreamExt as _};
    let params = kube::api::LogParams {
        container: Some(container.to_string()),
        follow: true,
        limit_bytes: Some(JOB_LOG_BYTES),
        ..Default::default()
    };
    let reader = match pods.log_stream(pod, &params).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(pod, container, "following logs: {e}");
            return;
        }
    };
    let mut lines = std::pin::pin!(reader.lines());
    while let Some(Ok(line)) = lines.next().await {
        let line = if prefix {
            format!("[{container}] {line}")
        } else {
            line
        };
        logs.lock().stdout.push(line);
    }
}

/// Log bytes read per container of a finished job.
const JOB_LOG_BYTES: i64 = 1024 * 1024;

impl KubernetesBackend {
    /// The uid of the execution's JobTemplate custom resource (none when it cannot be read:
    /// the Job is then created without an owner).
    async fn template_uid(&self, exec: &JobExecution) -> Option<String> {
        let api = crate::store::resource_api(
            &self.client,
            &exec.namespace,
            dispatch_core::Kind::JobTemplate,
        );
        match api.get(&exec.name).await {
            Ok(t) => t.metadata.uid,
            Err(e) => {
                tracing::warn!(template = %exec.name, "reading the JobTemplate for the Job's owner: {e}");
                None
            }
        }
    }

    /// Creates the execution's Job (or follows it, when a restarted server finds it there),
    /// watches it to its end, then reads its last pod's exit code and logs.
    async fn job_to_end(&self, exec: &JobExecution, logs: LiveLogs) -> JobEnd {
        use kube::api::{Api, PostParams};
        let owner = if self.options.job_owners {
            self.template_uid(exec).await
        } else {
            None
        };
        let object = match crate::job(exec, owner.as_deref()) {
            Ok(j) => j,
            Err(e) => {
                return JobEnd {
                    phase: JobPhase::Invalid,
                    exit_code: None,
                    reason: format!("the rendered jobTemplate is not a batch/v1 Job spec: {e}"),
                    attempts: 0,
                };
            }
        };
        let name = object.metadata.name.clone().unwrap_or_default();
        let api = Api::<Job>::namespaced(self.client.clone(), &exec.namespace);
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {} // there already: follow it
            Err(e) => return job_failed(format!("creating Job {name}: {e}")),
        }
        let mut guard = DeleteOnDrop {
            api: api.clone(),
            name: name.clone(),
            armed: true,
        };
        let follow = self.follow_job(&api, &name, &mut guard);
        let mut end = if self.options.live_logs {
            let live = self.live_logs(&exec.namespace, &name, &logs);
            tokio::select! {
                end = follow => end,
                never = live => match never {},
            }
        } else {
            follow.await
        };
        guard.armed = false;
        match self.last_pod(&exec.namespace, &name).await {
            Ok(Some((pod, containers, exit))) => {
                if end.phase == JobPhase::Failed {
                    end.exit_code = exit;
                }
                // The last pod's whole log replaces what was followed (a follow may have
                // missed lines across reconnects).
                *logs.lock() = Default::default();
                self.pod_logs(&exec.namespace, &pod, &containers, &logs)
                    .await;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(job = %name, "reading the Job's pods: {e}"),
        }
        end
    }

    /// Follows Job `name` to its end: the Job as it is, then its changes by watch from that
    /// version; a watch that closes (server timeout, 410 Gone) starts over from a fresh read.
    async fn follow_job(
        &self,
        api: &kube::Api<Job>,
        name: &str,
        guard: &mut DeleteOnDrop,
    ) -> JobEnd {
        use futures_util::StreamExt as _;
        use kube::api::{WatchEvent, WatchParams};
        loop {
            let current = match api.get(name).await {
                Ok(j) => j,
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    guard.armed = false;
                    return job_failed(format!("Job {name} was deleted outside Dispatch"));
                }
                Err(e) => {
                    tracing::warn!(job = %name, "reading the Job: {e}");
                    tokio::time::sleep(self.options.poll_interval).await;
                    continue;
                }
            };
            if let Some(end) = job_end(&current) {
                return end;
            }
            let version = current.metadata.resource_version.unwrap_or_default();
            let params = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(290);
            let events = match api.watch(&params, &version).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(job = %name, "watching the Job: {e}");
                    tokio::time::sleep(self.options.poll_interval).await;
                    continue;
                }
            };
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(WatchEvent::Added(j) | WatchEvent::Modified(j)) => {
                        if let Some(end) = job_end(&j) {
                            return end;
                        }
                    }
                    Ok(WatchEvent::Deleted(_)) => {
                        guard.armed = false;
                        return job_failed(format!("Job {name} was deleted outside Dispatch"));
                    }
                    Ok(WatchEvent::Bookmark(_)) => {}
                    Ok(WatchEvent::Error(e)) => {
                        tracing::debug!(job = %name, "watch ended: {}", e.message);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(job = %name, "watching the Job: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Streams the logs of Job `job`'s pods into `logs` while it runs (`dispatch logs
    /// jobexecution --follow`): each new pod (an attempt) from its start, every container,
    /// line by line; a new attempt's lines replace the previous one's. Runs until dropped.
    async fn live_logs(&self, ns: &str, job: &str, logs: &LiveLogs) -> std::convert::Infallible {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, ListParams};
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        let mut followed = std::collections::HashSet::new();
        loop {
            let listed = pods
                .list(&ListParams::default().labels(&format!("job-name={job}")))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let next = listed
                .into_iter()
                .filter(|p| {
                    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                    matches!(phase, Some("Running" | "Succeeded" | "Failed"))
                        && !followed.contains(p.metadata.name.as_deref().unwrap_or_default())
                })
                .max_by(|a, b| {
                    a.metadata
                        .creation_timestamp
                        .cmp(&b.metadata.creation_timestamp)
                });
            let Some(pod) = next else {
                tokio::time::sleep(self.options.poll_interval).await;
                continue;
            };
            let name = pod.metadata.name.clone().unwrap_or_default();
            followed.insert(name.clone());
            *logs.lock() = Default::default();
            let containers: Vec<String> = pod
                .spec
                .map(|s| s.containers.into_iter().map(|c| c.name).collect())
                .unwrap_or_default();
            let prefix = containers.len() > 1;
            futures_util::future::join_all(
                containers
                    .iter()
                    .map(|c| follow_container(&pods, &name, c, prefix, logs)),
            )
            .await;
        }
    }

    /// The newest pod of Job `job`: its name, containers, and the first non-zero exit code.
    async fn last_pod(
        &self,
        ns: &str,
        job: &str,
    ) -> Result<Option<(String, Vec<String>, Option<i32>)>, kube::Error> {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, ListParams};
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await?;
        let Some(pod) = pods.items.into_iter().max_by(|a, b| {
            a.metadata
                .creation_timestamp
                .cmp(&b.metadata.creation_timestamp)
        }) else {
            return Ok(None);
        };
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default();
        let exit = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
            .find(|code| *code != 0);
        Ok(Some((
            pod.metadata.name.unwrap_or_default(),
            containers,
            exit,
        )))
    }

    /// Appends each container's log (stdout and stderr, as Kubernetes keeps them together)
    /// to `logs.stdout`, prefixed with the container's name when there are several.
    async fn pod_logs(&self, ns: &str, pod: &str, containers: &[String], logs: &LiveLogs) {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, LogParams};
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        for c in containers {
            let params = LogParams {
                container: Some(c.clone()),
                limit_bytes: Some(JOB_LOG_BYTES),
                ..Default::default()
            };
            match api.logs(pod, &params).await {
                Ok(text) => {
                    let mut l = logs.lock();
                    for line in text.lines() {
                        l.stdout.push(if containers.len() > 1 {
                            format!("[{c}] {line}")
                        } else {
                            line.to_string()
                        });
                    }
                }
                Err(e) => tracing::warn!(pod, container = %c, "reading logs: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "fn-hello", "generation": generation},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn rollout_is_done_when_the_latest_generation_is_available() {
        let done = serde_json::json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2});
        assert!(rolled_out(&deployment(3, done.clone())));
        assert!(!rolled_out(&deployment(4, done)), "spec not seen yet");
        for pending in [
            serde_json::json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}),
            serde_json::json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}),
            serde_json::json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2}),
        ] {
            assert!(!rolled_out(&deployment(3, pending.clone())), "{pending}");
        }
        assert!(!rolled_out(&deployment(1, serde_json::Value::Null)));
    }
}
