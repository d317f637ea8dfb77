//! Job executions as `batch/v1` Jobs: created with the template as owner, followed (pod
//! logs streamed into the execution's live logs), their end read from the Job's status,
//! deleted when cancelled.

use dispatch_core::{JobExecution, JobPhase};
use dispatch_runtime::backend::JobEnd;
use dispatch_runtime::jobrun::LiveLogs;
use k8s_openapi::api::batch::v1::Job;

use super::*;

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
    pub(super) async fn job_to_end(&self, exec: &JobExecution, logs: LiveLogs) -> JobEnd {
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
