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

use dispatch_core::{Envelope, ErrorObject, JobExecution, Language, ValidationError};
use dispatch_runtime::backend::{
    Backend, BaseImageCheck, BoxFuture, BuildError, DeployedFunction, FunctionDeploy,
    FunctionHandle, GcKeep, ImageBuild, InvokeError, JobEnd, Removed,
};
use dispatch_runtime::build::Progress;
use dispatch_runtime::jobrun::LiveLogs;
use dispatch_runtime::pool::CallOutcome;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::value::RawValue;

use crate::image::{self, ImageError, ImageRequest};
use crate::oci::{Registry, RegistryOptions};
use crate::{FunctionImage, Workload};

mod executions;
mod jobs;

pub use executions::{execution_resource, execution_status};
pub use jobs::job_end;

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
    /// dispatcher's `JobExecution` custom resources are followed: each starts an execution
    /// under its name, and gets its status written back (needs their CRD).
    pub executions: bool,
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
            function_url: Arc::new(|ns, name| {
                format!("http://{}.{ns}.svc", crate::object_name(name))
            }),
            job_owners: false,
            live_logs: true,
            executions: false,
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
    executions: Arc<executions::Executions>,
}

/// A function deployed as a Kubernetes Service: calls are POSTed to it.
struct RemoteFunction {
    http: reqwest::Client,
    name: String,
    /// Where calls are POSTed: the Service's URL (`KubernetesOptions::function_url`) with
    /// one trailing `/`, made once per deploy rather than per call.
    url: String,
    image: String,
}

/// The handle a deployed function's calls go through: POSTs to a `dispatch runner` at `url`
/// (the function's Service; public so that the runner's contract can be tested against a
/// runner on a local port).
pub fn remote_function(
    http: reqwest::Client,
    name: &str,
    url: &str,
    image: &str,
) -> FunctionHandle {
    Arc::new(RemoteFunction {
        http,
        name: name.to_string(),
        url: format!("{}/", url.trim_end_matches('/')),
        image: image.to_string(),
    })
}

/// A session's request body to the runner: the call's frame, then each message as the
/// connection brings it, then the end (the connection closed).
struct SessionBody {
    first: Option<bytes::Bytes>,
    inbox: Option<tokio::sync::mpsc::Receiver<dispatch_runtime::Inbound>>,
}

impl http_body::Body for SessionBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use dispatch_runtime::stream::session_frame;
        use std::task::Poll;
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(f))));
        }
        let Some(inbox) = self.inbox.as_mut() else {
            return Poll::Ready(None);
        };
        match inbox.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(m)) => {
                Poll::Ready(Some(Ok(http_body::Frame::data(session_frame(Some(m))))))
            }
            Poll::Ready(None) => {
                self.inbox = None;
                Poll::Ready(Some(Ok(http_body::Frame::data(session_frame(None)))))
            }
        }
    }
}

impl KubernetesBackend {
    fn handle(&self, namespace: &str, name: &str, image: String) -> FunctionHandle {
        let url = (self.options.function_url)(namespace, name);
        remote_function(self.http.clone(), name, &url, &image)
    }
}

impl DeployedFunction for RemoteFunction {
    fn image(&self) -> Option<&str> {
        Some(&self.image)
    }

    fn invoke_streaming<'a>(
        &'a self,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
        sink: &'a dispatch_runtime::Sink,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        Box::pin(async move { Ok(self.call_streaming(context, payload, deadline, sink).await) })
    }

    fn invoke<'a>(
        &'a self,
        context: &'a RawValue,
        payload: &'a RawValue,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        let (name, url) = (&self.name, &self.url);
        Box::pin(async move {
            let t0 = Instant::now();
            let left = deadline.saturating_duration_since(t0);
            let timeout =
                || system_error(format!("function {name} did not answer within its timeout"));
            if left.is_zero() {
                // No time left: not sent (the function would run for a caller that has gone).
                return Ok(CallOutcome {
                    timed_out: true,
                    ..CallOutcome::warm(timeout(), Duration::ZERO)
                });
            }
            let sent = self.request(context, payload, left).send().await;
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
                    timeout()
                }
                Err(e) => system_error(format!("function {name} is not reachable at {url}: {e}")),
            };
            Ok(CallOutcome {
                timed_out,
                ..CallOutcome::warm(envelope, t0.elapsed())
            })
        })
    }
}

impl RemoteFunction {
    /// A call POSTed to the runner: `{"context", "payload"}`, within `left`.
    fn request(
        &self,
        context: &RawValue,
        payload: &RawValue,
        left: std::time::Duration,
    ) -> reqwest::RequestBuilder {
        let body = format!(
            r#"{{"context":{},"payload":{}}}"#,
            context.get(),
            payload.get()
        );
        self.http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body)
            .timeout(left)
    }

    /// A call whose chunks come back as frames from the runner (`dispatch runner` answers
    /// so when asked by the stream header), each handed to `sink` as it arrives: reading the
    /// body no faster than the sink drains holds the runner's worker (back-pressure), and a
    /// sink whose reader went away ends the request, which stops the worker there.
    async fn call_streaming(
        &self,
        context: &RawValue,
        payload: &RawValue,
        deadline: Instant,
        sink: &dispatch_runtime::Sink,
    ) -> CallOutcome {
        use dispatch_runtime::stream::{self, RemoteFrame};
        let (name, url) = (&self.name, &self.url);
        let t0 = Instant::now();
        let left = deadline.saturating_duration_since(t0);
        let outcome = |envelope, timed_out, cancelled, stream| CallOutcome {
            timed_out,
            stream,
            cancelled,
            ..CallOutcome::warm(envelope, t0.elapsed())
        };
        let timeout = || system_error(format!("function {name} did not answer within its timeout"));
        if left.is_zero() {
            return outcome(timeout(), true, false, None);
        }
        // Chunks as frames when someone reads them, lines when someone follows them; a
        // session's messages go up the request's body as they come (the runner answers while
        // it is still being sent).
        let mut rb = self.request(context, payload, left);
        if sink.streams() {
            rb = rb.header(stream::STREAM_HEADER, "1");
        }
        if sink.wants_logs() {
            rb = rb.header(stream::LIVE_HEADER, "1");
        }
        if let Some(inbox) = sink.take_inbox() {
            let call = format!(
                r#"{{"context":{},"payload":{}}}"#,
                context.get(),
                payload.get()
            );
            rb = rb
                .header(stream::SESSION_HEADER, left.as_millis().to_string())
                .body(reqwest::Body::wrap(SessionBody {
                    first: Some(stream::frame(call.as_bytes())),
                    inbox: Some(inbox),
                }));
        }
        let sent = rb.send().await;
        let mut r = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return outcome(timeout(), true, false, None),
            Err(e) => {
                return outcome(
                    system_error(format!("function {name} is not reachable at {url}: {e}")),
                    false,
                    false,
                    None,
                );
            }
        };
        let mut buf = bytes::BytesMut::new();
        loop {
            match stream::take_frame(&mut buf) {
                Ok(Some(RemoteFrame::Chunk(c))) => {
                    if sink.send(c).await.is_err() {
                        let gone = dispatch_core::ErrorObject::system(
                            "the caller disconnected from the stream: the call was cancelled",
                        );
                        return outcome(
                            Envelope::error(gone, Default::default()),
                            false,
                            true,
                            None,
                        );
                    }
                    continue;
                }
                Ok(Some(RemoteFrame::Log(line))) => {
                    sink.log(line);
                    continue;
                }
                Ok(Some(RemoteFrame::End(end))) => {
                    return outcome(end.envelope, end.timed_out, end.cancelled, end.stream);
                }
                Ok(None) => {}
                Err(e) => {
                    return outcome(
                        system_error(format!("function {name} sent a malformed frame: {e}")),
                        false,
                        false,
                        None,
                    );
                }
            }
            match r.chunk().await {
                Ok(Some(b)) => buf.extend_from_slice(&b),
                Ok(None) => {
                    return outcome(
                        system_error(format!("function {name} ended its answer early")),
                        false,
                        false,
                        None,
                    );
                }
                Err(e) if e.is_timeout() => return outcome(timeout(), true, false, None),
                Err(e) => {
                    return outcome(
                        system_error(format!("reading the answer of function {name}: {e}")),
                        false,
                        false,
                        None,
                    );
                }
            }
        }
    }
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
            executions: Arc::default(),
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
        let object = crate::object_name(name);
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
    ) -> BoxFuture<'_, Result<FunctionHandle, BuildError>> {
        Box::pin(async move {
            let key = (d.namespace.clone(), d.name.clone());
            let serving = self
                .deployed
                .lock()
                .get(&key)
                .filter(|(digest, _)| *digest == d.digest)
                .map(|(_, image)| image.clone());
            if let Some(image) = serving {
                // Already serving this build.
                return Ok(self.handle(&d.namespace, &d.name, image));
            }
            let input = ImageRequest {
                // `<repository>/<namespace>/<function>`: one repository per function, its
                // versions (`hello@3`) in it too (their images differ by digest).
                name: format!(
                    "{}/{}",
                    d.namespace,
                    dispatch_core::versions::split_deploy_name(&d.name).0
                ),
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
                stream: d.stream,
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
            Ok(self.handle(&d.namespace, &d.name, built.pushed.reference))
        })
    }

    fn function(&self, namespace: &str, name: &str) -> Option<FunctionHandle> {
        let key = (namespace.to_string(), name.to_string());
        let image = self.deployed.lock().get(&key)?.1.clone();
        Some(self.handle(namespace, name, image))
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

    fn execution_requests(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<dispatch_runtime::backend::ExecutionRequest>> {
        self.options.executions.then(|| {
            self.executions
                .start(self.client.clone(), self.leader.clone())
        })
    }

    fn execution_changed(&self, job: &JobExecution) {
        self.executions.changed(job);
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
