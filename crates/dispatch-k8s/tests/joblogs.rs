//! Job logs on Kubernetes are followed while the Job runs: a fake API server (answers by
//! path, streams the Job watch and the pod's `follow=true` log as the test feeds them) shows
//! each line in the execution's live logs as the pod prints it; at the end the pod's whole
//! log is what the execution keeps.

mod support;
use support::execution;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dispatch_runtime::backend::Backend;
use http_body_util::{BodyExt as _, StreamBody, combinators::UnsyncBoxBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn whole(v: &Value) -> http::Response<Body> {
    let bytes = match v {
        Value::String(s) => Bytes::from(s.clone()),
        v => Bytes::from(serde_json::to_vec(v).unwrap()),
    };
    http::Response::new(http_body_util::Full::new(bytes).boxed_unsync())
}

/// A body that streams what is sent on the channel, and ends when it is dropped.
fn streamed(rx: mpsc::UnboundedReceiver<String>) -> http::Response<Body> {
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(http_body::Frame::data(Bytes::from(chunk))), rx))
    });
    http::Response::new(StreamBody::new(frames).boxed_unsync())
}

fn job(status: Value) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "sample-758df7ad31", "namespace": "default", "resourceVersion": "7"},
        "status": status})
}

fn complete() -> Value {
    json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
}

#[derive(Default)]
struct Cluster {
    done: std::sync::atomic::AtomicBool,
    watch: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    log: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

impl Cluster {
    fn answer(&self, method: &str, path: &str, query: &str) -> http::Response<Body> {
        let done = self.done.load(std::sync::atomic::Ordering::SeqCst);
        let take = |m: &Mutex<Option<mpsc::UnboundedReceiver<String>>>| m.lock().unwrap().take();
        match (method, path) {
            ("POST", "/apis/batch/v1/namespaces/default/jobs") => whole(&job(json!({}))),
            ("GET", "/apis/batch/v1/namespaces/default/jobs") => match take(&self.watch) {
                Some(rx) => streamed(rx),
                None => whole(&json!("")),
            },
            ("GET", "/apis/batch/v1/namespaces/default/jobs/sample-758df7ad31") => {
                whole(&job(if done {
                    complete()
                } else {
                    json!({"active": 1})
                }))
            }
            ("GET", "/api/v1/namespaces/default/pods") => {
                let phase = if done { "Succeeded" } else { "Running" };
                whole(
                    &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                    {"metadata": {"name": "sample-758df7ad31-abcde", "creationTimestamp": "2026-11-23T10:00:05Z"},
                     "spec": {"containers": [{"name": "main"}]},
                     "status": {"phase": phase}}]}),
                )
            }
            ("GET", "/api/v1/namespaces/default/pods/sample-758df7ad31-abcde/log") => {
                if query.contains("follow=true") {
                    match take(&self.log) {
                        Some(rx) => streamed(rx),
                        None => whole(&json!("")),
                    }
                } else {
                    whole(&json!("one\ntwo\nthree\n"))
                }
            }
            _ => panic!("unexpected {method} {path}?{query}"),
        }
    }
}

/// Polls `cond` every 5 ms for at most 30 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tick.tick().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_logs_are_followed_while_the_job_runs() {
    let cluster = Arc::new(Cluster::default());
    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    *cluster.watch.lock().unwrap() = Some(watch_rx);
    *cluster.log.lock().unwrap() = Some(log_rx);
    let c = cluster.clone();
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let c = c.clone();
        async move {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let query = req.uri().query().unwrap_or_default().to_string();
            Ok::<_, Infallible>(c.answer(&method, &path, &query))
        }
    });
    let mut options = dispatch_k8s::backend::KubernetesOptions::new(
        "registry.local:5000/fns",
        std::path::PathBuf::from("/nonexistent/dispatch"),
    );
    options.poll_interval = Duration::from_millis(5);
    let backend =
        dispatch_k8s::backend::KubernetesBackend::new(kube::Client::new(svc, "default"), options);
    let logs = dispatch_runtime::jobrun::LiveLogs::default();
    let (b, l) = (backend.clone(), logs.clone());
    let run = tokio::spawn(async move {
        let exec = execution();
        b.run_job(&exec, l).unwrap().await
    });
    let stdout = || logs.lock().stdout.clone();

    log_tx.send("one\n".into()).unwrap();
    until("the first line", || stdout() == ["one"]).await;
    log_tx.send("two\n".into()).unwrap();
    until("the second line", || stdout() == ["one", "two"]).await;
    assert!(!run.is_finished(), "the Job still runs");

    cluster
        .done
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let event = json!({"type": "MODIFIED", "object": job(complete())});
    watch_tx.send(format!("{event}\n")).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends with its Job")
        .unwrap();
    assert_eq!(end.phase, dispatch_core::JobPhase::Completed, "{end:?}");
    assert_eq!(
        stdout(),
        ["one", "two", "three"],
        "the pod's whole log, read at the end"
    );
}
