//! dispatcher's `JobExecution` custom resources (`dispatcher.ivan.vc/v1alpha1`): one watch
//! over every namespace hands each object to the server as an [`ExecutionRequest`] (a deleted
//! one too, and, after a relist, those that went while the watch was away); the server starts
//! the execution under the object's name and reports its changes, which one writer task
//! merges into the object's status, in order. Only the leader follows them (with several
//! servers, one starts each execution).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::manifest::ExecutionDoc;
use dispatch_core::{JobExecution, JobPhase};
use dispatch_runtime::backend::ExecutionRequest;
use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::{EXECUTION_GROUP, EXECUTION_VERSION};

/// Requests not yet taken by the server: the watch waits when this many are queued.
const QUEUED: usize = 256;

/// The `JobExecution` resource for kube's dynamic API.
pub fn execution_resource() -> ApiResource {
    ApiResource {
        group: EXECUTION_GROUP.into(),
        version: EXECUTION_VERSION.into(),
        api_version: format!("{EXECUTION_GROUP}/{EXECUTION_VERSION}"),
        kind: "JobExecution".into(),
        plural: "jobexecutions".into(),
    }
}

/// The status written to an execution's object: its phase, reason, attempts, exit code and
/// times, the Job it runs as (once started) and, once ended, a `Complete` or `Failed`
/// condition. Every key the status may lose is always present (`reason` is `""`), so a merge
/// patch of it replaces the whole status.
pub fn execution_status(job: &JobExecution) -> Value {
    let mut s = json!({
        "phase": job.phase.as_str(),
        "reason": job.reason,
        "attempts": job.attempts,
    });
    if let Some(code) = job.exit_code {
        s["exitCode"] = code.into();
    }
    if let Some(t) = job.started_at {
        s["startTime"] = t.to_string().into();
        s["job"] = json!({"apiVersion": "batch/v1", "kind": "Job",
            "namespace": job.namespace, "name": crate::job_name(job)});
    }
    if let Some(t) = job.finished_at {
        s["completionTime"] = t.to_string().into();
    }
    if job.phase.is_final() {
        let kind = if job.phase == JobPhase::Completed {
            "Complete"
        } else {
            "Failed"
        };
        let at = job.finished_at.unwrap_or(job.created_at).to_string();
        s["conditions"] = json!([{"type": kind, "status": "True", "reason": job.phase.as_str(),
            "message": job.reason, "lastTransitionTime": at}]);
    }
    s
}

type Key = (String, String);

/// The objects the watch has seen, each with the status it has (as read, or as last written).
#[derive(Default)]
pub(super) struct Executions {
    known: Mutex<HashMap<Key, Value>>,
    writer: Mutex<Option<mpsc::UnboundedSender<(Key, Value)>>>,
}

impl Executions {
    /// Starts the watch and the status writer; the requests come on the receiver.
    pub(super) fn start(
        self: &Arc<Self>,
        client: kube::Client,
        leader: Option<watch::Receiver<bool>>,
    ) -> mpsc::Receiver<ExecutionRequest> {
        let (tx, rx) = mpsc::channel(QUEUED);
        let (writes, written) = mpsc::unbounded_channel();
        *self.writer.lock() = Some(writes);
        tokio::spawn(write_statuses(client.clone(), written));
        tokio::spawn(follow(self.clone(), client, leader, tx));
        rx
    }

    /// An execution changed: its object's status is written, if it has an object and the
    /// status is not the one it has.
    pub(super) fn changed(&self, job: &JobExecution) {
        self.write(
            (job.namespace.clone(), job.uuid.clone()),
            execution_status(job),
        );
    }

    fn write(&self, key: Key, status: Value) {
        {
            let mut known = self.known.lock();
            let Some(has) = known.get_mut(&key) else {
                return;
            };
            if *has == status {
                return;
            }
            *has = status.clone();
        }
        if let Some(w) = &*self.writer.lock() {
            let _ = w.send((key, status));
        }
    }

    /// An object as the watch brings it: remembered, and handed to the server (one that does
    /// not read as an execution is marked `Invalid` with the reason). `false` when the server
    /// takes no more.
    async fn seen(&self, o: &DynamicObject, tx: &mpsc::Sender<ExecutionRequest>) -> bool {
        let (Some(ns), Some(name)) = (o.metadata.namespace.clone(), o.metadata.name.clone()) else {
            return true;
        };
        let value = serde_json::to_value(o).unwrap_or_default();
        let status = value.get("status").cloned().unwrap_or(Value::Null);
        let phase = status["phase"].as_str().map(str::to_string);
        let key = (ns.clone(), name);
        self.known.lock().insert(key.clone(), status);
        match ExecutionDoc::from_value(&value) {
            Ok(mut doc) => {
                doc.namespace = Some(ns);
                tx.send(ExecutionRequest::Start { doc, phase })
                    .await
                    .is_ok()
            }
            Err(e) => {
                self.write(
                    key,
                    json!({"phase": JobPhase::Invalid.as_str(), "reason": e.message, "attempts": 0}),
                );
                true
            }
        }
    }

    /// An object went: forgotten, and its execution stopped.
    async fn gone(&self, key: Key, tx: &mpsc::Sender<ExecutionRequest>) -> bool {
        self.known.lock().remove(&key);
        let (namespace, name) = key;
        tx.send(ExecutionRequest::Deleted { namespace, name })
            .await
            .is_ok()
    }
}

fn key_of(o: &DynamicObject) -> Option<Key> {
    Some((o.metadata.namespace.clone()?, o.metadata.name.clone()?))
}

/// The watch, while this server leads (always, without an election), until the server stops
/// taking requests. Errors are logged and retried with backoff (a missing CRD says how to
/// install it).
async fn follow(
    me: Arc<Executions>,
    client: kube::Client,
    mut leader: Option<watch::Receiver<bool>>,
    tx: mpsc::Sender<ExecutionRequest>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &execution_resource());
    loop {
        if let Some(l) = leader.as_mut()
            && l.wait_for(|leads| *leads).await.is_err()
        {
            return;
        }
        let stream = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
        futures_util::pin_mut!(stream);
        let mut listing: HashSet<Key> = HashSet::new();
        loop {
            let event = match leader.as_mut() {
                Some(l) => tokio::select! {
                    e = stream.next() => e,
                    _ = l.wait_for(|leads| !*leads) => break,
                },
                None => stream.next().await,
            };
            let Some(event) = event else { return };
            let open = match event {
                Ok(Event::Init) => {
                    listing.clear();
                    true
                }
                Ok(Event::InitApply(o)) => {
                    listing.extend(key_of(&o));
                    me.seen(&o, &tx).await
                }
                Ok(Event::InitDone) => {
                    let went: Vec<Key> = me
                        .known
                        .lock()
                        .keys()
                        .filter(|k| !listing.contains(*k))
                        .cloned()
                        .collect();
                    let mut open = true;
                    for k in went {
                        open &= me.gone(k, &tx).await;
                    }
                    open
                }
                Ok(Event::Apply(o)) => me.seen(&o, &tx).await,
                Ok(Event::Delete(o)) => match key_of(&o) {
                    Some(k) => me.gone(k, &tx).await,
                    None => true,
                },
                Err(e) => {
                    let hint = if e.to_string().contains("404") {
                        ": is the JobExecution CRD installed? (`dispatch k8s manifests | kubectl apply -f -`)"
                    } else {
                        ""
                    };
                    tracing::warn!("watching jobexecutions failed (retrying): {e}{hint}");
                    true
                }
            };
            if !open {
                return;
            }
        }
    }
}

/// Writes statuses in the order they come, as merge patches of the status subresource; an
/// object deleted meanwhile is skipped, a failed write tried three times.
async fn write_statuses(client: kube::Client, mut written: mpsc::UnboundedReceiver<(Key, Value)>) {
    let resource = execution_resource();
    while let Some(((ns, name), status)) = written.recv().await {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
        let patch = json!({"status": status});
        for attempt in 0..3u32 {
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 404 => break,
                Err(e) => {
                    tracing::warn!(execution = %name, namespace = %ns, "writing a JobExecution's status (attempt {}): {e}", attempt + 1);
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
            }
        }
    }
}
