//! The Kubernetes calls against kube's tower-test mock API server: the requests (method, path,
//! field manager, body) are what a real API server would get.

mod support;
use support::execution;

use dispatch_core::{FunctionSpec, Language};
use dispatch_k8s::{FunctionImage, Workload, apply_function, delete_function, function_objects};
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::json;
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn spec() -> FunctionSpec {
    serde_json::from_value(json!({"image": "python3", "handler": "hello.handle", "source": format!("sha256:{}", "a".repeat(64))})).unwrap()
}

fn image() -> FunctionImage<'static> {
    FunctionImage {
        reference: "registry.local:5000/default/hello@sha256:0123",
        language: Language::Python3,
        handler: "hello.handle",
        digest: "sha256:abcd",
        pull_secret: None,
    }
}

fn not_found() -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// Answers the next request with `status` and `body`, returning what was asked.
async fn answer(
    handle: &mut Handle,
    status: u16,
    body: serde_json::Value,
) -> (Method, String, serde_json::Value) {
    let (req, send) = handle
        .next_request()
        .await
        .expect("the client made no request");
    let method = req.method().clone();
    let uri = req.uri().to_string();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let resp = Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    send.send_response(resp);
    (method, uri, sent)
}

#[tokio::test]
async fn apply_and_delete_a_function() {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (want_d, want_s) = function_objects("default", "hello", &Workload::of(&spec()), &image());
    let want_d = serde_json::to_value(want_d).unwrap();
    let want_s = serde_json::to_value(want_s).unwrap();
    let server = tokio::spawn(async move {
        let (m, uri, body) = answer(&mut handle, 200, want_d.clone()).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.starts_with("/apis/apps/v1/namespaces/default/deployments/fn-hello?"),
            "{uri}"
        );
        assert!(
            uri.contains("fieldManager=dispatch") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(body, want_d, "server-side apply sends the whole object");
        let (m, uri, body) = answer(&mut handle, 200, want_s.clone()).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.starts_with("/api/v1/namespaces/default/services/fn-hello?"),
            "{uri}"
        );
        assert_eq!(body, want_s);
        // Network allowed: a NetworkPolicy from before (spec.network: none) goes.
        let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
        assert!(
            m == Method::DELETE
                && uri.starts_with(
                    "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/fn-hello"
                ),
            "{uri}"
        );
        // A fixed pod count (maxWorkers 3 fits one pod): no autoscaler, one from before goes.
        let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
        assert!(
            m == Method::DELETE
                && uri.starts_with(
                    "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers/fn-hello"
                ),
            "{uri}"
        );
        // Delete: the Deployment is there, the Service already gone (404 is fine).
        let (m, uri, _) = answer(
            &mut handle,
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
        .await;
        assert_eq!(
            (
                m,
                uri.starts_with("/apis/apps/v1/namespaces/default/deployments/fn-hello")
            ),
            (Method::DELETE, true)
        );
        let (m, _, _) = answer(&mut handle, 404, not_found()).await;
        assert_eq!(m, Method::DELETE);
        let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
        assert!(
            m == Method::DELETE && uri.contains("/horizontalpodautoscalers/fn-hello"),
            "{uri}"
        );
        let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
        assert!(
            m == Method::DELETE && uri.contains("/networkpolicies/fn-hello"),
            "{uri}"
        );
    });
    apply_function(
        &client,
        "default",
        "hello",
        &Workload::of(&spec()),
        &image(),
    )
    .await
    .unwrap();
    delete_function(&client, "default", "hello").await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn api_errors_surface() {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let server = tokio::spawn(async move {
        answer(
            &mut handle,
            403,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                   "message": "deployments.apps is forbidden"}),
        )
        .await;
    });
    let err = apply_function(
        &client,
        "default",
        "hello",
        &Workload::of(&spec()),
        &image(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn job_executions_start_and_cancel_as_jobs() {
    let exec = execution();
    let want = serde_json::to_value(dispatch_k8s::job(&exec, Some("uid-1")).unwrap()).unwrap();
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let w = want.clone();
    let server = tokio::spawn(async move {
        let (m, uri, body) = answer(&mut handle, 201, w.clone()).await;
        assert_eq!(
            (
                m,
                uri.starts_with("/apis/batch/v1/namespaces/default/jobs?")
            ),
            (Method::POST, true),
            "{uri}"
        );
        assert_eq!(body, w);
        let (m, uri, body) = answer(
            &mut handle,
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
        .await;
        assert_eq!(m, Method::DELETE);
        assert!(
            uri.starts_with("/apis/batch/v1/namespaces/default/jobs/sample-758df7ad31"),
            "{uri}"
        );
        assert_eq!(
            body["propagationPolicy"], "Background",
            "cancel deletes the pods too"
        );
    });
    let job = dispatch_k8s::start_job(&client, &exec, Some("uid-1"))
        .await
        .unwrap();
    assert_eq!(job.metadata.name.as_deref(), Some("sample-758df7ad31"));
    dispatch_k8s::cancel_job(&client, "default", "sample-758df7ad31")
        .await
        .unwrap();
    server.await.unwrap();
}

fn k8s_backend(client: kube::Client) -> std::sync::Arc<dispatch_k8s::backend::KubernetesBackend> {
    let mut options = dispatch_k8s::backend::KubernetesOptions::new(
        "registry.local:5000/fns",
        std::path::PathBuf::from("/nonexistent/dispatch"),
    );
    options.poll_interval = std::time::Duration::from_millis(1);
    // The requests here are scripted in order: no log follower alongside.
    options.live_logs = false;
    dispatch_k8s::backend::KubernetesBackend::new(client, options)
}

fn job_status(status: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sample-758df7ad31", "namespace": "default", "resourceVersion": "7"}, "status": status})
}

fn pod_list(exit_code: i32) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        {"metadata": {"name": "sample-758df7ad31-old", "creationTimestamp": "2026-11-23T10:00:00Z"},
         "spec": {"containers": [{"name": "main"}]}},
        {"metadata": {"name": "sample-758df7ad31-abcde", "creationTimestamp": "2026-11-23T10:00:05Z"},
         "spec": {"containers": [{"name": "main"}]},
         "status": {"containerStatuses": [{"name": "main", "image": "alpine:3", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code}}}]}}
    ]})
}

/// Answers the next request with plain text (pod logs).
async fn answer_text(handle: &mut Handle, text: &str) -> String {
    let (req, send) = handle.next_request().await.expect("a request");
    let uri = req.uri().to_string();
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(text.as_bytes().to_vec()))
            .unwrap(),
    );
    uri
}

/// A job execution on the Kubernetes backend: a Job is created, polled to its end (which the
/// Job reaches by itself: retries and deadline are Kubernetes'), then the newest pod gives
/// the exit code and the logs.
#[tokio::test]
async fn the_kubernetes_backend_runs_job_executions_as_jobs() {
    use dispatch_core::JobPhase;
    use dispatch_runtime::backend::Backend;
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let backend = k8s_backend(kube::Client::new(svc, "default"));
    let exec = execution();
    let cluster = tokio::spawn(async move {
        // Completed.
        let (m, uri, body) = answer(&mut handle, 201, job_status(json!({}))).await;
        assert!(
            m == Method::POST && uri.starts_with("/apis/batch/v1/namespaces/default/jobs?"),
            "{uri}"
        );
        assert!(
            body["metadata"].get("ownerReferences").is_none(),
            "no owner: templates are not custom resources here (job_owners off)"
        );
        let (m, uri, _) = answer(&mut handle, 200, job_status(json!({"active": 1}))).await;
        assert!(
            m == Method::GET
                && uri.starts_with("/apis/batch/v1/namespaces/default/jobs/sample-758df7ad31"),
            "{uri}"
        );
        // Then a watch from that version: one change while it runs, then its end.
        let (req, send) = handle.next_request().await.expect("a watch");
        let uri = req.uri().to_string();
        assert!(
            uri.starts_with("/apis/batch/v1/namespaces/default/jobs?")
                && uri.contains("watch=true")
                && uri.contains("fieldSelector=metadata.name%3Dsample-758df7ad31")
                && uri.contains("resourceVersion=7"),
            "{uri}"
        );
        let events = [
            json!({"type": "MODIFIED", "object": job_status(json!({"active": 1}))}),
            json!({"type": "MODIFIED", "object": job_status(
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
            )}),
        ]
        .iter()
        .map(|e| format!("{e}\n"))
        .collect::<String>();
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(events.into_bytes()))
                .unwrap(),
        );
        let (_, uri, _) = answer(&mut handle, 200, pod_list(0)).await;
        assert!(
            uri.starts_with("/api/v1/namespaces/default/pods?")
                && uri.contains("labelSelector=job-name%3Dsample-758df7ad31"),
            "{uri}"
        );
        let uri = answer_text(&mut handle, "hi\nthere\n").await;
        assert!(
            uri.starts_with("/api/v1/namespaces/default/pods/sample-758df7ad31-abcde/log?")
                && uri.contains("container=main"),
            "{uri}"
        );

        // Failed after retries; a restarted server finds its Job there already (409).
        answer(&mut handle, 409, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"})).await;
        answer(&mut handle, 200, job_status(json!({"failed": 3, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}))).await;
        answer(&mut handle, 200, pod_list(3)).await;
        answer_text(&mut handle, "boom\n").await;

        // Cancelled: dropping the run (while it watches) deletes the Job with its pods.
        answer(&mut handle, 201, job_status(json!({}))).await;
        answer(&mut handle, 200, job_status(json!({"active": 1}))).await;
        let (watch, open_watch) = handle.next_request().await.expect("a watch");
        assert!(watch.uri().to_string().contains("watch=true"));
        let (delete, done) = handle.next_request().await.expect("the delete");
        drop(open_watch); // the watch never answered: the run was dropped while it waited
        assert_eq!(delete.method(), Method::DELETE);
        assert!(
            delete
                .uri()
                .to_string()
                .starts_with("/apis/batch/v1/namespaces/default/jobs/sample-758df7ad31"),
            "{}",
            delete.uri()
        );
        let body: serde_json::Value =
            serde_json::from_slice(&delete.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["propagationPolicy"], "Background");
        done.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(
                    serde_json::to_vec(
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                    )
                    .unwrap(),
                ))
                .unwrap(),
        );
    });

    let logs = dispatch_runtime::jobrun::LiveLogs::default();
    let end = backend.run_job(&exec, logs.clone()).unwrap().await;
    assert_eq!(
        (end.phase, end.exit_code, end.attempts),
        (JobPhase::Completed, Some(0), 1),
        "{end:?}"
    );
    assert_eq!(logs.lock().stdout, ["hi", "there"]);

    let logs = dispatch_runtime::jobrun::LiveLogs::default();
    let end = backend.run_job(&exec, logs.clone()).unwrap().await;
    assert_eq!(
        (end.phase, end.exit_code, end.attempts),
        (JobPhase::Failed, Some(3), 3),
        "{end:?}"
    );
    assert!(
        end.reason.starts_with("BackoffLimitExceeded: "),
        "{}",
        end.reason
    );
    assert_eq!(logs.lock().stdout, ["boom"]);

    let running = backend.run_job(&exec, Default::default()).unwrap();
    let mut running = Box::pin(running);
    // Let it create the Job and start watching, then cancel.
    for _ in 0..20 {
        assert!(futures_util::poll!(running.as_mut()).is_pending());
        tokio::task::yield_now().await;
    }
    drop(running);
    cluster.await.unwrap();
}

/// `--knative`: the function is one Knative Service, applied and deleted like the rest.
/// With templates as custom resources, a Job is owned by its template's: the backend reads
/// the template's uid first.
#[tokio::test]
async fn jobs_are_owned_by_their_template_resource() {
    use dispatch_runtime::backend::Backend;
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut options = dispatch_k8s::backend::KubernetesOptions::new(
        "registry.local:5000/fns",
        std::path::PathBuf::from("/nonexistent/dispatch"),
    );
    options.job_owners = true;
    options.live_logs = false;
    let backend =
        dispatch_k8s::backend::KubernetesBackend::new(kube::Client::new(svc, "default"), options);
    let exec = execution();
    let cluster = tokio::spawn(async move {
        let (m, uri, _) = answer(&mut handle, 200, json!({"apiVersion": "dispatch.dev/v1", "kind": "JobTemplate",
            "metadata": {"name": "sample", "namespace": "default", "uid": "tmpl-uid-7"}, "spec": {}})).await;
        assert_eq!(m, Method::GET);
        assert!(
            uri.starts_with("/apis/dispatch.dev/v1/namespaces/default/jobtemplates/sample"),
            "{uri}"
        );
        let done = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
        let (m, _, body) = answer(&mut handle, 201, job_status(done.clone())).await;
        assert_eq!(m, Method::POST);
        assert_eq!(
            body["metadata"]["ownerReferences"],
            json!([{"apiVersion": "dispatch.dev/v1", "kind": "JobTemplate", "name": "sample",
                "uid": "tmpl-uid-7", "controller": true, "blockOwnerDeletion": true}])
        );
        answer(&mut handle, 200, job_status(done)).await;
        answer(&mut handle, 200, pod_list(0)).await;
        answer_text(&mut handle, "owned\n").await;
    });
    let logs = dispatch_runtime::jobrun::LiveLogs::default();
    let end = backend.run_job(&exec, logs).unwrap().await;
    assert_eq!(end.phase, dispatch_core::JobPhase::Completed, "{end:?}");
    cluster.await.unwrap();
}

#[tokio::test]
async fn knative_services_are_applied_and_deleted() {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    // spec.network: none → a NetworkPolicy denying egress to the function's pods.
    let mut isolated = spec();
    isolated.network = Some(dispatch_core::resource::NetworkMode::None);
    let workload = Workload::of(&isolated);
    let want = dispatch_k8s::knative_service("default", "hello", &workload, &image());
    let policy = serde_json::to_value(dispatch_k8s::security::deny_egress(
        "default",
        "hello",
        want["metadata"]["labels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect(),
    ))
    .unwrap();
    let w = want.clone();
    let server = tokio::spawn(async move {
        let (m, uri, body) = answer(&mut handle, 200, w.clone()).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.starts_with("/apis/serving.knative.dev/v1/namespaces/default/services/fn-hello?")
                && uri.contains("fieldManager=dispatch"),
            "{uri}"
        );
        assert_eq!(body, w);
        let (m, uri, body) = answer(&mut handle, 200, policy.clone()).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.starts_with(
                "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/fn-hello?"
            ),
            "{uri}"
        );
        assert_eq!(body, policy);
        let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
        assert!(
            m == Method::DELETE
                && uri.starts_with(
                    "/apis/serving.knative.dev/v1/namespaces/default/services/fn-hello"
                ),
            "{uri}"
        );
        let (m, uri, _) = answer(
            &mut handle,
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
        .await;
        assert!(
            m == Method::DELETE && uri.contains("/networkpolicies/fn-hello"),
            "{uri}"
        );
    });
    dispatch_k8s::apply_knative(&client, "default", "hello", &workload, &image())
        .await
        .unwrap();
    dispatch_k8s::delete_knative(&client, "default", "hello")
        .await
        .expect("an absent Knative Service is already deleted");
    server.await.unwrap();
}

fn lease(holder: &str, renewed: &str, transitions: i32) -> serde_json::Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "dispatch-scheduler", "namespace": "dispatch", "resourceVersion": "41"},
        "spec": {"holderIdentity": holder, "renewTime": renewed, "acquireTime": renewed,
                 "leaseDurationSeconds": 15, "leaseTransitions": transitions}})
}

/// The cron scheduler's Lease: taken when free or expired, renewed when ours, left alone when
/// another server holds it; a lost race (409) is just "not the leader".
#[tokio::test]
async fn the_scheduler_lease_is_taken_renewed_and_respected() {
    use dispatch_k8s::lease::{LeaseConfig, step};
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let cfg = LeaseConfig::new("dispatch", "server-a");
    let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
    let path = "/apis/coordination.k8s.io/v1/namespaces/dispatch/leases";
    let cluster = tokio::spawn(async move {
        // 1. No Lease yet: created with us as holder.
        let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
        assert!(
            m == Method::GET && uri.starts_with(&format!("{path}/dispatch-scheduler")),
            "{uri}"
        );
        let (m, uri, body) = answer(
            &mut handle,
            201,
            lease("server-a", "2026-11-23T10:00:00Z", 0),
        )
        .await;
        assert!(m == Method::POST && uri.starts_with(path), "{uri}");
        assert_eq!(body["spec"]["holderIdentity"], "server-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        // 2. Ours: renewed, with the resourceVersion read (compare-and-swap).
        answer(
            &mut handle,
            200,
            lease("server-a", "2026-11-23T09:59:58Z", 0),
        )
        .await;
        let (m, _, body) = answer(
            &mut handle,
            200,
            lease("server-a", "2026-11-23T10:00:00Z", 0),
        )
        .await;
        assert_eq!(m, Method::PUT);
        assert_eq!(body["metadata"]["resourceVersion"], "41");
        assert_eq!(body["spec"]["renewTime"], "2026-11-23T10:00:00.000000Z");
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        // 3. Another server renewed 5 s ago: left alone (no write).
        answer(
            &mut handle,
            200,
            lease("server-b", "2026-11-23T09:59:55Z", 3),
        )
        .await;
        // 4. Another server stopped renewing 60 s ago: taken over.
        answer(
            &mut handle,
            200,
            lease("server-b", "2026-11-23T09:59:00Z", 3),
        )
        .await;
        let (m, _, body) = answer(
            &mut handle,
            200,
            lease("server-a", "2026-11-23T10:00:00Z", 4),
        )
        .await;
        assert_eq!(m, Method::PUT);
        assert_eq!(body["spec"]["holderIdentity"], "server-a");
        assert_eq!(body["spec"]["leaseTransitions"], 4);
        // 5. Expired, but another server took it first: 409, not the leader.
        answer(
            &mut handle,
            200,
            lease("server-b", "2026-11-23T09:59:00Z", 3),
        )
        .await;
        answer(&mut handle, 409, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"})).await;
    });
    assert!(step(&client, &cfg, now).await.unwrap(), "1: created");
    assert!(step(&client, &cfg, now).await.unwrap(), "2: renewed");
    assert!(
        !step(&client, &cfg, now).await.unwrap(),
        "3: held by another"
    );
    assert!(step(&client, &cfg, now).await.unwrap(), "4: taken over");
    assert!(!step(&client, &cfg, now).await.unwrap(), "5: lost the race");
    cluster.await.unwrap();
}

/// A version deployed beside the function's current build (`hello@3`, issue 23) is a
/// Deployment and a Service of its own (`fv-hello-3`), whose pods neither selects the
/// function's, nor the function's selector them.
#[tokio::test]
async fn a_version_beside_the_current_build_has_objects_of_its_own() {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (want_d, want_s) = function_objects("default", "hello@3", &Workload::of(&spec()), &image());
    let want_d = serde_json::to_value(want_d).unwrap();
    let want_s = serde_json::to_value(want_s).unwrap();
    let (main_d, _) = function_objects("default", "hello", &Workload::of(&spec()), &image());
    let main_d = serde_json::to_value(main_d).unwrap();
    let selects = |selector: &serde_json::Value, pod: &serde_json::Value| {
        selector["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| pod["metadata"]["labels"][k] == *v)
    };
    let pod = |d: &serde_json::Value| d["spec"]["template"].clone();
    assert!(selects(&want_d["spec"]["selector"], &pod(&want_d)));
    assert!(
        !selects(&main_d["spec"]["selector"], &pod(&want_d)),
        "{want_d}"
    );
    assert!(
        !selects(&want_d["spec"]["selector"], &pod(&main_d)),
        "{main_d}"
    );
    assert_eq!(
        pod(&want_d)["metadata"]["labels"]["dispatch.dev/version"],
        "3"
    );
    let server = tokio::spawn(async move {
        let (m, uri, body) = answer(&mut handle, 200, want_d.clone()).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.starts_with("/apis/apps/v1/namespaces/default/deployments/fv-hello-3?"),
            "{uri}"
        );
        assert_eq!(body, want_d);
        let (m, uri, body) = answer(&mut handle, 200, want_s.clone()).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.starts_with("/api/v1/namespaces/default/services/fv-hello-3?"),
            "{uri}"
        );
        assert_eq!(
            body["spec"]["selector"]["dispatch.dev/function"],
            "hello.v3"
        );
        for _ in 0..2 {
            let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
            assert!(m == Method::DELETE && uri.contains("/fv-hello-3"), "{uri}");
        }
        for _ in 0..4 {
            let (m, uri, _) = answer(&mut handle, 404, not_found()).await;
            assert!(m == Method::DELETE && uri.contains("/fv-hello-3"), "{uri}");
        }
    });
    apply_function(
        &client,
        "default",
        "hello@3",
        &Workload::of(&spec()),
        &image(),
    )
    .await
    .unwrap();
    delete_function(&client, "default", "hello@3")
        .await
        .unwrap();
    server.await.unwrap();
}
