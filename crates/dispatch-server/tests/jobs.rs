//! Job templates and executions end to end: dispatcher's sample accepted verbatim, `PUT
//! /execute` on both ports, payloads byte for byte, render errors, backoff, deadline, cancel,
//! maxActive, restart, ttl.

mod support;

use std::time::{Duration, Instant};

use dispatch_core::manifest::parse_manifest;
use dispatch_core::{JobExecution, JobPhase, Kind, Phase};
use serde_json::json;
use support::*;

const SAMPLE: &str = include_str!("../../../examples/jobs/jobtemplate-sample.yaml");

fn template(
    name: &str,
    command: serde_json::Value,
    extra_job: serde_json::Value,
    max_active: Option<u32>,
) -> dispatch_core::Object {
    let mut job = json!({"template": {"spec": {"containers": [{"name": "main", "image": "alpine:3", "command": command,
        "env": [{"name": "PAYLOAD", "value": "{{ .Payload }}"}]}], "restartPolicy": "Never"}}, "backoffLimit": 0});
    if let (Some(j), Some(e)) = (job.as_object_mut(), extra_job.as_object()) {
        for (k, v) in e {
            j.insert(k.clone(), v.clone());
        }
    }
    // These tests are about the runner's mechanics: commands on the host (the sandboxed
    // process tier). The container tier runs images: crates/dispatch-cli/tests/containers.rs.
    let mut spec = json!({"jobTemplate": {"spec": job}, "runtime": "host"});
    if let Some(m) = max_active {
        spec["maxActive"] = m.into();
    }
    object(Kind::JobTemplate, name, spec)
}

async fn put(url: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .put(url)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn started(t: &TestServer, name: &str, body: &str) -> String {
    let r = put(&format!("{}/execute/default/{name}", t.gateway), body).await;
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    v["uuid"].as_str().unwrap().to_string()
}

async fn job(t: &TestServer, uuid: &str) -> JobExecution {
    let r = reqwest::get(format!(
        "{}/v1/namespaces/default/jobexecutions/{uuid}",
        t.api()
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "{uuid}");
    r.json().await.unwrap()
}

async fn ended(t: &TestServer, uuid: &str) -> JobExecution {
    eventually(&format!("job {uuid} to end"), || async {
        let j = job(t, uuid).await;
        j.phase.is_final().then_some(j)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_sample_runs_and_payloads_pass_through() {
    let t = start().await;
    let c = &t.client;
    // dispatcher's own manifest, with `runtime: host` (this in-process server has no OCI
    // runtime; the CLI test job_templates_from_the_cli runs it verbatim, in its image).
    let mut doc = parse_manifest(SAMPLE).unwrap().remove(0).object;
    assert_eq!(doc.api_version, "dispatcher.ivan.vc/v1alpha1");
    doc.spec["runtime"] = "host".into();
    c.create(&doc).await.unwrap();
    let tpl = settled(c, Kind::JobTemplate, "jobtemplate-sample").await;
    assert_eq!(tpl.phase(), Some(Phase::Ready));

    let r = put(
        &format!("{}/execute/default/jobtemplate-sample", t.gateway),
        "my test payload",
    )
    .await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (v["name"].as_str(), v["namespace"].as_str()),
        (Some("jobtemplate-sample"), Some("default"))
    );
    assert!(location.ends_with(v["uuid"].as_str().unwrap()));
    let j = ended(&t, v["uuid"].as_str().unwrap()).await;
    assert_eq!(
        (j.phase, j.exit_code, j.attempts),
        (JobPhase::Completed, Some(0), 1)
    );
    assert_eq!(j.logs.stdout, ["my test payload"]);
    assert_eq!(j.images, ["alpine:latest"]);

    // The API port and the default-namespace form, POST too.
    let r = reqwest::Client::new()
        .post(format!("{}/execute/jobtemplate-sample", t.api()))
        .body("via api")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        ended(&t, v["uuid"].as_str().unwrap()).await.logs.stdout,
        ["via api"]
    );

    // A hostile payload arrives byte for byte and injects nothing.
    c.create(&template(
        "printer",
        json!([
            "sh",
            "-c",
            "printf '%s' \"$PAYLOAD\"; echo; echo \"$EXTRA\""
        ]),
        json!({}),
        None,
    ))
    .await
    .unwrap();
    let nasty = "quotes ' \" and {{ .UUID }} }}\nnewline: yes\n- name: EXTRA\n  value: injected\n{\"env\": [1]} $(id) `id` \\n";
    let uuid = started(&t, "printer", nasty).await;
    let j = ended(&t, &uuid).await;
    assert_eq!(j.phase, JobPhase::Completed);
    assert_eq!(
        j.logs.stdout.join("\n"),
        format!("{nasty}\n"),
        "payload, then an empty EXTRA"
    );
    assert_eq!(
        j.rendered["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Errors: unknown template, render error, body too large, non-UTF-8.
    assert_eq!(
        put(&format!("{}/execute/default/nope", t.gateway), "x")
            .await
            .status(),
        404
    );
    c.create(&template(
        "broken",
        json!(["echo", "{{ .Missing }}"]),
        json!({}),
        None,
    ))
    .await
    .unwrap();
    let r = put(&format!("{}/execute/default/broken", t.gateway), "x").await;
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("containers[0].command[1]"),
        "{e}"
    );
    let big = "x".repeat(6 * 1024 * 1024 + 1);
    assert_eq!(
        put(&format!("{}/execute/default/printer", t.gateway), &big)
            .await
            .status(),
        413
    );
    let r = reqwest::Client::new()
        .put(format!("{}/execute/default/printer", t.gateway))
        .body(vec![0xff, 0xfe])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Invalid templates are refused at create with the field path.
    let err = c
        .create(&template(
            "bad",
            json!(["echo", "{{ .Payload"]),
            json!({}),
            None,
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("containers[0].command[1]"),
        "{err}"
    );
    let err = c
        .create(&template(
            "par",
            json!(["true"]),
            json!({"parallelism": 3}),
            None,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("parallelism"), "{err}");
    t.stop().await;
}

/// A `JobExecution` resource POSTed (dispatcher's shape) starts its template under its own
/// name: 201 with the execution as a resource; the name again is 409; a bad one is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_execution_resource_starts_under_its_name() {
    let t = start().await;
    let c = &t.client;
    c.create(&template(
        "echo",
        json!(["sh", "-c", "echo \"$PAYLOAD\""]),
        json!({}),
        None,
    ))
    .await
    .unwrap();
    settled(c, Kind::JobTemplate, "echo").await;
    let url = format!("{}/v1/namespaces/default/jobexecutions", t.api());
    let post = |body: serde_json::Value| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let resource = json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
        "metadata": {"name": "first"}, "spec": {"jobTemplateName": "echo", "payload": "hi"}});
    let r = post(resource.clone()).await;
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (
            v["kind"].as_str(),
            v["metadata"]["name"].as_str(),
            v["spec"]["jobTemplateName"].as_str()
        ),
        (Some("JobExecution"), Some("first"), Some("echo"))
    );
    let j = ended(&t, "first").await;
    assert_eq!(
        (j.phase, j.logs.stdout.join("")),
        (JobPhase::Completed, "hi".into())
    );
    let again = post(resource).await;
    assert_eq!(again.status(), 409);
    // Names are per namespace, as in Kubernetes: another tenant's "first" is its own
    // execution and leaves this one as it was.
    c.create_namespace("other", json!({})).await.unwrap();
    let mut theirs = template(
        "echo",
        json!(["sh", "-c", "echo \"$PAYLOAD\""]),
        json!({}),
        None,
    );
    theirs.metadata.namespace = Some("other".into());
    c.create(&theirs).await.unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/namespaces/other/jobexecutions", t.api()))
        .json(&json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": "first"}, "spec": {"jobTemplateName": "echo", "payload": "theirs"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let ours = job(&t, "first").await;
    assert_eq!(
        (ours.namespace.as_str(), ours.payload.as_str()),
        ("default", "hi")
    );
    // While an execution runs, its live logs are its namespace's only: the same name asked
    // in another namespace is not found.
    c.create(&template(
        "slow",
        json!(["sh", "-c", "echo \"$PAYLOAD\"; sleep 60"]),
        json!({}),
        None,
    ))
    .await
    .unwrap();
    let r = post(
        json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
        "metadata": {"name": "live"}, "spec": {"jobTemplateName": "slow", "payload": "ours only"}}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let logs_of = |ns: &str| format!("{}/v1/namespaces/{ns}/jobexecutions/live/logs", t.api());
    eventually("the live logs", || async {
        let r = reqwest::get(logs_of("default")).await.unwrap();
        let l: serde_json::Value = r.json().await.unwrap();
        (l["stdout"][0] == "ours only").then_some(())
    })
    .await;
    let r = reqwest::get(logs_of("other")).await.unwrap();
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    let r = reqwest::Client::new()
        .delete(format!(
            "{}/v1/namespaces/other/jobexecutions/live",
            t.api()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(job(&t, "live").await.phase, JobPhase::Active);
    let r = reqwest::Client::new()
        .delete(format!(
            "{}/v1/namespaces/default/jobexecutions/live",
            t.api()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Two requests for one new name at once: one execution, the other 409.
    let twin = json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
        "metadata": {"name": "twin"}, "spec": {"jobTemplateName": "echo", "payload": "x"}});
    let (a, b) = tokio::join!(post(twin.clone()), post(twin));
    let mut codes = [a.status().as_u16(), b.status().as_u16()];
    codes.sort();
    assert_eq!(codes, [201, 409]);
    for (bad, says) in [
        (
            json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": "x"}, "spec": {}}),
            "spec.jobTemplateName",
        ),
        (
            json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": "Bad Name"}, "spec": {"jobTemplateName": "echo"}}),
            "job execution",
        ),
        (
            json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": "y", "namespace": "other"}, "spec": {"jobTemplateName": "echo"}}),
            "does not match",
        ),
    ] {
        let r = post(bad).await;
        assert_eq!(r.status(), 400);
        let body: serde_json::Value = r.json().await.unwrap();
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(says), "{message}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_deadline_cancel_and_max_active() {
    let t = start().await;
    let c = &t.client;
    c.create(&template(
        "fails",
        json!(["sh", "-c", "echo try; exit 3"]),
        json!({"backoffLimit": 2}),
        None,
    ))
    .await
    .unwrap();
    let j = ended(&t, &started(&t, "fails", "").await).await;
    assert_eq!(
        (j.phase, j.attempts, j.exit_code),
        (JobPhase::Failed, 3, Some(3))
    );
    assert!(j.reason.starts_with("BackoffLimitExceeded"), "{}", j.reason);
    assert_eq!(j.logs.stdout, ["try", "try", "try"]);

    c.create(&template(
        "slow",
        json!(["tail", "-f", "/dev/null"]),
        json!({"activeDeadlineSeconds": 1}),
        None,
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    let j = ended(&t, &started(&t, "slow", "").await).await;
    assert_eq!(j.phase, JobPhase::Failed);
    assert!(j.reason.starts_with("DeadlineExceeded"), "{}", j.reason);
    assert!(t0.elapsed() < Duration::from_secs(10));

    c.create(&template(
        "one-at-a-time",
        json!(["sh", "-c", "echo start; exec tail -f /dev/null"]),
        json!({}),
        Some(1),
    ))
    .await
    .unwrap();
    let first = started(&t, "one-at-a-time", "1").await;
    let r = put(&format!("{}/execute/default/one-at-a-time", t.gateway), "2").await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], "Waiting", "maxActive 1 holds the second back");
    let second = v["uuid"].as_str().unwrap().to_string();
    // Logs are visible while it runs.
    eventually("live logs", || async {
        (!job(&t, &first).await.logs.stdout.is_empty()).then_some(())
    })
    .await;
    let m = metrics(&t).await;
    for line in [
        "dispatch_job_executions{phase=\"Waiting\"} 1",
        "dispatch_job_executions{phase=\"Active\"} 1",
        "dispatch_job_executions_ended_total{phase=\"Failed\"} 2",
        "dispatch_job_executions_ended_total{phase=\"Cancelled\"} 0",
    ] {
        assert!(m.lines().any(|l| l == line), "no {line} in\n{m}");
    }
    let http = reqwest::Client::new();
    let cancel = |uuid: String| {
        let http = http.clone();
        let api = t.api();
        async move {
            http.delete(format!("{api}/v1/namespaces/default/jobexecutions/{uuid}"))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(cancel(first.clone()).await.status(), 200);
    let j = job(&t, &first).await;
    assert_eq!(j.phase, JobPhase::Cancelled);
    assert_eq!(j.logs.stdout, ["start"]);
    // The waiting one starts as soon as the slot is free; cancel it too.
    eventually("the second to start", || async {
        (job(&t, &second).await.phase == JobPhase::Active).then_some(())
    })
    .await;
    assert_eq!(cancel(second.clone()).await.status(), 200);
    assert_eq!(cancel(second.clone()).await.status(), 409);
    let list: Vec<JobExecution> = reqwest::get(format!(
        "{}/v1/namespaces/default/jobexecutions?template=one-at-a-time",
        t.api()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|j| j.phase == JobPhase::Cancelled));
    let m = metrics(&t).await;
    for line in [
        "dispatch_job_executions{phase=\"Waiting\"} 0",
        "dispatch_job_executions{phase=\"Active\"} 0",
        "dispatch_job_executions_ended_total{phase=\"Cancelled\"} 2",
        "dispatch_job_executions_ended_total{phase=\"Completed\"} 0",
    ] {
        assert!(m.lines().any(|l| l == line), "no {line} in\n{m}");
    }
    // Deleting the template deletes its executions.
    c.delete(Kind::JobTemplate, "one-at-a-time").await.unwrap();
    let r = reqwest::get(format!(
        "{}/v1/namespaces/default/jobexecutions/{first}",
        t.api()
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reruns_active_and_runs_waiting_then_ttl_cleans_up() {
    let t = start().await;
    let c = &t.client;
    c.create(&template(
        "steady",
        json!([
            "sh",
            "-c",
            "timeout 1 tail -f /dev/null; echo \"done $PAYLOAD\""
        ]),
        json!({"ttlSecondsAfterFinished": 1, "backoffLimit": 1}),
        Some(1),
    ))
    .await
    .unwrap();
    let a = started(&t, "steady", "a").await;
    let b = started(&t, "steady", "b").await;
    assert_eq!(job(&t, &b).await.phase, JobPhase::Waiting);
    let dir = t.stop().await;
    let t = start_in(dir).await;
    let ja = ended(&t, &a).await;
    assert_eq!(
        (ja.phase, ja.attempts),
        (JobPhase::Completed, 2),
        "the cut attempt ran again"
    );
    assert!(
        ja.reason.is_empty() || ja.reason.contains("restart"),
        "{}",
        ja.reason
    );
    let jb = ended(&t, &b).await;
    assert_eq!(
        (jb.phase, jb.logs.stdout.as_slice()),
        (JobPhase::Completed, ["done b".to_string()].as_slice())
    );
    // ttlSecondsAfterFinished: 1 → the records go away.
    eventually("the execution to be cleaned up after its ttl", || async {
        let url = format!("{}/v1/namespaces/default/jobexecutions/{b}", t.api());
        (reqwest::get(url).await.unwrap().status() == 404).then_some(())
    })
    .await;
    t.stop().await;
}

/// Job executions asked for as a backend's objects (on Kubernetes, `JobExecution` custom
/// resources made with kubectl): each starts once under its object's name, its changes are
/// written back, one asked before its template exists waits for it (dispatcher's `Invalid`),
/// a relist does not run one again, and deleting the object stops its execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_asked_for_by_backend_objects() {
    use dispatch_core::manifest::ExecutionDoc;
    use dispatch_runtime::backend::ExecutionRequest;
    use dispatch_store::{RecordStore as _, ResourceStore as _, SqliteStore};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("dispatch.db")).unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let backend = Arc::new(support::fake::FakeBackend {
        requests: Mutex::new(Some(rx)),
        ..Default::default()
    });
    let state = dispatch_server::Server::builder()
        .stores(dispatch_server::Stores::single(store.clone()))
        .blobs(dispatch_store::BlobStore::open(dir.path().join("blobs")).unwrap())
        .backend(backend.clone())
        .options(dispatch_server::Options {
            auth: false,
            jobs_dir: dir.path().join("jobs"),
            ..Default::default()
        })
        .state()
        .await
        .unwrap();
    let start = |name: &str, template: &str, phase: Option<&str>| ExecutionRequest::Start {
        doc: ExecutionDoc {
            name: name.into(),
            namespace: Some("default".into()),
            template: template.into(),
            payload: format!("payload of {name}"),
            index: 1,
        },
        phase: phase.map(str::to_string),
    };
    let reported = || backend.reported.lock().unwrap().clone();
    let last = |name: &str, phase: JobPhase| {
        let found = reported()
            .into_iter()
            .rev()
            .find(|j| j.uuid == name)
            .filter(|j| j.phase == phase);
        async move { found }
    };
    let add_template = |name: &str, command: &str| {
        let o = template(name, json!(["sh", "-c", command]), json!({}), None);
        store.create(o).unwrap();
        state.enqueue(dispatch_server::controller::Key::new(
            "default",
            Kind::JobTemplate,
            name,
        ));
    };

    tx.send(start("nightly", "echo", None)).await.unwrap();
    let invalid = eventually("nightly to be Invalid", || {
        last("nightly", JobPhase::Invalid)
    })
    .await;
    assert!(
        invalid.reason.contains("not found")
            && invalid
                .reason
                .contains("starts when the template is created"),
        "{}",
        invalid.reason
    );
    add_template("echo", "echo \"$PAYLOAD\"");
    let done = eventually("nightly to complete", || {
        last("nightly", JobPhase::Completed)
    })
    .await;
    assert_eq!(done.logs.stdout, ["payload of nightly"]);
    assert!(
        reported()
            .iter()
            .any(|j| j.uuid == "nightly" && j.phase == JobPhase::Active),
        "every change is written back"
    );

    // Seen again (a relist, or its own status change): its record is written back, not run.
    let before = reported().len();
    tx.send(start("nightly", "echo", Some("Completed")))
        .await
        .unwrap();
    // Taken before, its record gone (expired): not run again. The marker after it shows the
    // request was handled.
    tx.send(start("expired", "echo", Some("Completed")))
        .await
        .unwrap();
    tx.send(start("marker", "echo", None)).await.unwrap();
    eventually("the marker to complete", || {
        last("marker", JobPhase::Completed)
    })
    .await;
    let again: Vec<JobExecution> = reported()[before..]
        .iter()
        .filter(|j| j.uuid == "nightly")
        .cloned()
        .collect();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].phase, again[0].attempts),
        (JobPhase::Completed, 1)
    );
    assert!(store.get_job("default", "expired").unwrap().is_none());
    assert!(!reported().iter().any(|j| j.uuid == "expired"));

    // Deleted while it runs: stopped.
    add_template("sleepy", "sleep 60");
    tx.send(start("long", "sleepy", None)).await.unwrap();
    eventually("long to run", || last("long", JobPhase::Active)).await;
    tx.send(ExecutionRequest::Deleted {
        namespace: "default".into(),
        name: "long".into(),
    })
    .await
    .unwrap();
    eventually("long to be cancelled", || last("long", JobPhase::Cancelled)).await;
    assert_eq!(
        store.get_job("default", "long").unwrap().unwrap().phase,
        JobPhase::Cancelled
    );
}
