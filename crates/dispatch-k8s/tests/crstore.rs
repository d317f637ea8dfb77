//! Resources as custom resources: `CrStore` against the in-memory API server of
//! `dispatch_k8s::testing` (watches stream; versions, conflicts and the status subresource
//! behave as an API server's), with run records in a real SQLite file.

use std::sync::Arc;
use std::time::Duration;

use dispatch_core::{Kind, Object, Phase, Status};
use dispatch_k8s::store::CrStore;
use dispatch_k8s::testing::FakeApi;
use dispatch_store::{Changed, ResourceStore, SqliteStore, StoreError};
use serde_json::json;
use tokio::sync::mpsc;

async fn start(api: &FakeApi, dir: &std::path::Path) -> Arc<CrStore> {
    let sql = Arc::new(SqliteStore::open(&dir.join("dispatch.db")).unwrap());
    Arc::new(CrStore::start(api.client(), sql).await.unwrap())
}

/// Runs blocking store calls where the server runs them: on the blocking pool.
async fn blocking<T: Send + 'static>(
    store: &Arc<CrStore>,
    f: impl FnOnce(&CrStore) -> T + Send + 'static,
) -> T {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&s)).await.unwrap()
}

fn listen(store: &CrStore) -> mpsc::UnboundedReceiver<Changed> {
    let (tx, rx) = mpsc::unbounded_channel();
    store.on_external_change(Box::new(move |c| {
        let _ = tx.send(c);
    }));
    rx
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Changed>) -> Changed {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a change within 30 s")
        .expect("the store is alive")
}

fn function(name: &str, code: &str) -> Object {
    let mut o = Object::new(
        Kind::Function,
        "default",
        name,
        json!({"image": "python", "source": {"inline": code}}),
    );
    o.metadata.labels.insert("team".into(), "a".into());
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_are_custom_resources_read_from_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let store = start(&api, dir.path()).await;

    let mut hello = function("hello", "v1");
    hello.status = Status::phase(Phase::Initialized);
    let created = blocking(&store, move |s| s.create(hello)).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.created_at.is_some());
    assert_eq!(
        created.status.phase,
        Some(Phase::Initialized),
        "{created:?}"
    );

    // What kubectl sees: a dispatch.dev/v1 Function with the spec, labels and status.
    let cr = api.object("functions", "default", "hello").unwrap();
    assert_eq!(cr["apiVersion"], "dispatch.dev/v1");
    assert_eq!(cr["kind"], "Function");
    assert_eq!(cr["spec"]["source"]["inline"], "v1");
    assert_eq!(cr["metadata"]["labels"]["team"], "a");
    assert_eq!(cr["status"]["phase"], "INITIALIZED");
    assert!(cr["metadata"]["annotations"]["dispatch.dev/updated-at"].is_string());
    serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(
        cr["metadata"].clone(),
    )
    .unwrap();

    // Reads come from the cache: no request reaches the API server.
    let before = api.requests().len();
    let got = blocking(&store, |s| s.get("default", Kind::Function, "hello"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, created);
    let listed = blocking(&store, |s| s.list(Some("default"), Kind::Function))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        blocking(&store, |s| s.list(Some("other"), Kind::Function))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(api.requests().len(), before, "{:?}", api.requests());

    let again = blocking(&store, |s| s.create(function("hello", "v1"))).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "{again:?}"
    );

    // A changed spec bumps the generation and keeps the status; a stale version conflicts.
    let mut v2 = created.clone();
    v2.spec["source"]["inline"] = json!("v2");
    let updated = blocking(&store, move |s| s.update(v2)).await.unwrap();
    assert_eq!(updated.metadata.generation, Some(2));
    assert_eq!(updated.status.phase, Some(Phase::Initialized));
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    let stale = created.clone();
    let conflict = blocking(&store, move |s| s.update(stale)).await;
    match conflict {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(Some(expected), created.metadata.resource_version);
            assert_eq!(Some(actual), updated.metadata.resource_version);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Without a version, an update replaces whatever is there.
    let mut blind = function("hello", "v3");
    blind.metadata.labels.clear();
    let v3 = blocking(&store, move |s| s.update(blind)).await.unwrap();
    assert_eq!(v3.metadata.generation, Some(3));
    assert!(v3.metadata.labels.is_empty());

    // The status goes through the status subresource: the spec stays.
    let ready = Status {
        phase: Some(Phase::Ready),
        digest: Some("abc".into()),
        observed_generation: Some(3),
        ..Status::default()
    };
    let r = ready.clone();
    let after = blocking(&store, move |s| {
        s.update_status("default", Kind::Function, "hello", r)
    })
    .await
    .unwrap();
    assert_eq!(after.status, ready);
    assert_eq!(after.metadata.generation, Some(3));
    assert_eq!(
        api.object("functions", "default", "hello").unwrap()["spec"]["source"]["inline"],
        "v3"
    );
    let missing = blocking(&store, |s| {
        s.update_status("default", Kind::Function, "nope", Status::default())
    })
    .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );

    // Delete answers the object; it is gone from the cache at once.
    let deleted = blocking(&store, |s| s.delete("default", Kind::Function, "hello"))
        .await
        .unwrap();
    assert_eq!(deleted.status, ready);
    assert!(
        blocking(&store, |s| s.get("default", Kind::Function, "hello"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(api.object("functions", "default", "hello").is_none());
    let twice = blocking(&store, |s| s.delete("default", Kind::Function, "hello")).await;
    assert!(
        matches!(twice, Err(StoreError::NotFound { .. })),
        "{twice:?}"
    );

    // A Dispatch namespace is a Kubernetes namespace; runs stay in SQL.
    let now = jiff::Timestamp::now();
    assert!(
        blocking(&store, move |s| s.put_namespace("team-a", now))
            .await
            .unwrap()
    );
    assert_eq!(api.namespaces(), ["team-a"]);
    let names: Vec<String> = blocking(&store, |s| s.list_namespaces())
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["team-a"]);
    let mut other = function("elsewhere", "x");
    other.metadata.namespace = Some("team-a".into());
    blocking(&store, move |s| s.create(other)).await.unwrap();
    assert!(
        blocking(&store, |s| s.delete_namespace("team-a"))
            .await
            .unwrap()
    );
    assert!(api.object("functions", "team-a", "elsewhere").is_none());

    // Called on a runtime worker thread too (not only from the blocking pool).
    let direct = store.create(function("direct", "x")).unwrap();
    assert_eq!(direct.metadata.generation, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_elsewhere_are_watched_and_told() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    // One object exists before the store starts: the first list has it.
    api.apply(json!({"apiVersion": "dispatch.dev/v1", "kind": "Endpoint",
        "metadata": {"name": "old", "namespace": "default"},
        "spec": {"function": "hello", "paths": ["/old"]}}));
    let store = start(&api, dir.path()).await;
    let mut changes = listen(&store);
    let old = blocking(&store, |s| s.get("default", Kind::Endpoint, "old"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.spec["paths"], json!(["/old"]));

    // This process's own writes are not told back to it...
    blocking(&store, |s| s.create(function("mine", "x")))
        .await
        .unwrap();
    blocking(&store, |s| {
        s.update_status(
            "default",
            Kind::Function,
            "mine",
            Status::phase(Phase::Ready),
        )
    })
    .await
    .unwrap();

    // ...what kubectl does is: a new object, a changed one, a deleted one, in order.
    api.apply(json!({"apiVersion": "dispatch.dev/v1", "kind": "Function",
        "metadata": {"name": "theirs", "namespace": "default"},
        "spec": {"image": "python", "source": {"inline": "1"}}}));
    let c = next(&mut changes).await;
    assert_eq!(
        c,
        Changed {
            kind: Kind::Function,
            namespace: "default".into(),
            name: "theirs".into(),
            deleted: false
        },
        "the own writes came first on the watch and were not told"
    );
    let theirs = blocking(&store, |s| s.get("default", Kind::Function, "theirs"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(theirs.spec["source"]["inline"], "1");

    api.apply(json!({"apiVersion": "dispatch.dev/v1", "kind": "Endpoint",
        "metadata": {"name": "old", "namespace": "default"},
        "spec": {"function": "hello", "paths": ["/new"]}}));
    let c = next(&mut changes).await;
    assert_eq!(
        (c.kind, c.name.as_str(), c.deleted),
        (Kind::Endpoint, "old", false)
    );
    let old = blocking(&store, |s| s.get("default", Kind::Endpoint, "old"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.spec["paths"], json!(["/new"]));
    assert_eq!(old.metadata.generation, Some(2));

    assert!(api.remove("functions", "default", "theirs"));
    let c = next(&mut changes).await;
    assert_eq!(
        (c.kind, c.name.as_str(), c.deleted),
        (Kind::Function, "theirs", true)
    );
    assert!(
        blocking(&store, |s| s.get("default", Kind::Function, "theirs"))
            .await
            .unwrap()
            .is_none()
    );

    // An own delete is not told either; the next external change proves the watch passed it.
    blocking(&store, |s| s.delete("default", Kind::Function, "mine"))
        .await
        .unwrap();
    api.remove("endpoints", "default", "old");
    let c = next(&mut changes).await;
    assert_eq!(
        (c.kind, c.name.as_str(), c.deleted),
        (Kind::Endpoint, "old", true)
    );
    assert!(changes.try_recv().is_err());
}

#[tokio::test]
async fn start_says_when_the_crds_are_missing() {
    let dir = tempfile::tempdir().unwrap();
    let sql = Arc::new(SqliteStore::open(&dir.path().join("dispatch.db")).unwrap());
    let svc = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": "NotFound", "message": "the server could not find the requested resource", "code": 404});
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .status(404)
                .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        )
    });
    let err = CrStore::start(kube::Client::new(svc, "default"), sql)
        .await
        .err()
        .expect("no CRDs, no store")
        .to_string();
    assert!(err.contains("list baseimages in the cluster"), "{err}");
    assert!(
        err.contains("dispatch k8s manifests | kubectl apply -f -"),
        "{err}"
    );
}

/// A watch that was cut off and whose version expired (410 Gone) lists again: what changed in
/// the gap is told — a new object, a changed one, a deleted one — and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_a_gap_tells_what_changed_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new();
    let endpoint = |name: &str, path: &str| {
        json!({"apiVersion": "dispatch.dev/v1", "kind": "Endpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"function": "hello", "paths": [path]}})
    };
    api.apply(endpoint("kept", "/kept"));
    api.apply(endpoint("changed", "/before"));
    api.apply(endpoint("gone", "/gone"));
    let store = start(&api, dir.path()).await;
    let mut changes = listen(&store);
    let lists = || {
        api.requests()
            .iter()
            .filter(|r| {
                r.starts_with("GET /apis/dispatch.dev/v1/endpoints?") && !r.contains("watch=")
            })
            .count()
    };
    let listed_before = lists();

    api.partition(|api| {
        api.apply(endpoint("new", "/new"));
        api.apply(endpoint("changed", "/after"));
        assert!(api.remove("endpoints", "default", "gone"));
    });
    let mut told = Vec::new();
    for _ in 0..3 {
        let c = next(&mut changes).await;
        told.push((c.name, c.deleted));
    }
    told.sort();
    assert_eq!(
        told,
        [
            ("changed".to_string(), false),
            ("gone".to_string(), true),
            ("new".to_string(), false)
        ]
    );
    let paths = |name: &'static str| {
        let s = store.clone();
        async move {
            blocking(&s, move |s| s.get("default", Kind::Endpoint, name))
                .await
                .unwrap()
                .map(|o| o.spec["paths"].clone())
        }
    };
    assert_eq!(paths("changed").await, Some(json!(["/after"])));
    assert_eq!(paths("gone").await, None);
    assert_eq!(paths("kept").await, Some(json!(["/kept"])));
    assert!(
        lists() > listed_before,
        "listed again: {:?}",
        api.requests()
    );
    // Nothing more: "kept" did not change.
    api.apply(endpoint("after", "/x"));
    assert_eq!(next(&mut changes).await.name, "after");
}

/// dispatcher's JobExecutions: each object is handed to the server once seen (with the phase
/// its status has), the server's report is merged into its status (only when it changes),
/// and a deleted one — also one deleted while the watch was cut off — is reported gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_execution_objects_are_followed_and_their_status_written() {
    use dispatch_runtime::Backend as _;
    use dispatch_runtime::backend::ExecutionRequest;
    let api = FakeApi::new();
    let mut options = dispatch_k8s::backend::KubernetesOptions::new("reg.local/fns", "/x".into());
    options.executions = true;
    let backend = dispatch_k8s::backend::KubernetesBackend::new(api.client(), options);
    let mut requests = backend.execution_requests().unwrap();
    let mut next_request = async || {
        tokio::time::timeout(Duration::from_secs(30), requests.recv())
            .await
            .expect("a request within 30 s")
            .expect("the watch is alive")
    };
    let cr = |name: &str| {
        json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"jobTemplateName": "echo", "payload": "hi"}})
    };
    api.apply(cr("one"));
    let ExecutionRequest::Start { doc, phase } = next_request().await else {
        panic!("a start")
    };
    assert_eq!(
        (
            doc.name.as_str(),
            doc.namespace.as_deref(),
            doc.template.as_str(),
            doc.payload.as_str(),
            phase
        ),
        ("one", Some("team"), "echo", "hi", None)
    );
    // The server reports the execution: its status is written, and the watch brings the
    // object back with it (handed over again, with its phase).
    let mut job = dispatch_core::JobExecution {
        uuid: "one".into(),
        name: "echo".into(),
        namespace: "team".into(),
        phase: dispatch_core::JobPhase::Active,
        reason: String::new(),
        payload: "hi".into(),
        rendered: json!(null),
        images: vec![],
        runtime: dispatch_core::jobs::JobRuntime::Host,
        attempts: 1,
        exit_code: None,
        logs: Default::default(),
        created_at: jiff::Timestamp::UNIX_EPOCH,
        started_at: Some(jiff::Timestamp::UNIX_EPOCH),
        finished_at: None,
        expires_at: None,
        replica: None,
        trace: None,
    };
    backend.execution_changed(&job);
    let ExecutionRequest::Start { phase, .. } = next_request().await else {
        panic!("a start")
    };
    assert_eq!(phase.as_deref(), Some("Active"));
    let status = &api.object("jobexecutions", "team", "one").unwrap()["status"];
    assert_eq!(
        status["job"]["name"],
        dispatch_k8s::job_name(&job),
        "{status}"
    );
    job.phase = dispatch_core::JobPhase::Completed;
    job.exit_code = Some(0);
    job.finished_at = Some(jiff::Timestamp::UNIX_EPOCH);
    backend.execution_changed(&job);
    // The same report again writes nothing.
    backend.execution_changed(&job);
    let ExecutionRequest::Start { phase, .. } = next_request().await else {
        panic!("a start")
    };
    assert_eq!(phase.as_deref(), Some("Completed"));
    let status = api.object("jobexecutions", "team", "one").unwrap()["status"].clone();
    assert_eq!(status["conditions"][0]["type"], "Complete", "{status}");
    assert_eq!(status["reason"], "", "{status}");
    let patches = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH") && r.contains("/jobexecutions/one/status"))
        .count();
    assert_eq!(patches, 2, "{:?}", api.requests());
    // An execution the API started (no object) writes nothing.
    job.uuid = "no-object".into();
    backend.execution_changed(&job);

    assert!(api.remove("jobexecutions", "team", "one"));
    assert_eq!(
        next_request().await,
        ExecutionRequest::Deleted {
            namespace: "team".into(),
            name: "one".into()
        }
    );
    // Deleted while the watch was cut off: the relist finds it gone.
    api.apply(cr("two"));
    assert!(
        matches!(next_request().await, ExecutionRequest::Start { doc, .. } if doc.name == "two")
    );
    api.partition(|api| assert!(api.remove("jobexecutions", "team", "two")));
    assert_eq!(
        next_request().await,
        ExecutionRequest::Deleted {
            namespace: "team".into(),
            name: "two".into()
        }
    );
    assert!(!api.requests().iter().any(|r| r.contains("no-object")));
}
