//! Async runs end to end with real workers: accepted (202) then run, retried, dead-lettered,
//! redriven, cancelled, called back; fairness across functions; limits.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatch_core::{ErrorType, Kind, Phase, Run, RunStatus};
use serde_json::json;
use support::*;

async fn until_status(c: &dispatch_client::Client, id: &str, status: RunStatus) -> Run {
    eventually(&format!("run {id} to be {status}"), || async {
        let r = c.get_run(id).await.unwrap();
        (r.status == status).then_some(r)
    })
    .await
}

fn id_of(accepted: &serde_json::Value) -> String {
    accepted["id"].as_str().unwrap().to_string()
}

/// A function that fails until its state file counts `fail_times` attempts.
const FLAKY: &str = r#"
import os
def handle(context, payload):
    path = os.path.join(os.environ["STATE_DIR"], context["runId"])
    n = int(open(path).read()) if os.path.exists(path) else 0
    open(path, "w").write(str(n + 1))
    if payload.get("bad"):
        raise ValueError("bad input")
    if n < payload.get("fail_times", 0):
        raise RuntimeError("flaky failure %d" % (n + 1))
    print("attempt", n + 1)
    return {"attempts": n + 1}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_runs_succeed_retry_die_and_redrive() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    // Attempts are counted in the function's own /tmp (shared by its workers): a sandboxed
    // function cannot write to the host (DESIGN §9).
    let retry = json!({"maxAttempts": 3, "backoff": {"initial": "100ms", "max": "200ms"}});
    create_function(
        c,
        "flaky",
        "py",
        "flaky.py",
        FLAKY,
        json!({"retry": retry, "env": {"STATE_DIR": "/tmp"}}),
    )
    .await
    .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "flaky").await.phase(),
        Some(Phase::Ready)
    );

    // Succeeds at once.
    let a = c.exec_async("flaky", &raw(json!({})), None).await.unwrap();
    assert_eq!(a["status"], "QUEUED");
    let r = final_run(c, &id_of(&a)).await;
    assert_eq!(
        (r.status, r.attempts, r.is_async),
        (RunStatus::Succeeded, 1, true)
    );
    assert_eq!(r.output.unwrap().get(), r#"{"attempts":1}"#);
    assert_eq!(r.logs.stdout, ["attempt 1"]);

    // Fails twice, then succeeds on the third attempt.
    let r = final_run(
        c,
        &id_of(
            &c.exec_async("flaky", &raw(json!({"fail_times": 2})), None)
                .await
                .unwrap(),
        ),
    )
    .await;
    assert_eq!((r.status, r.attempts), (RunStatus::Succeeded, 3));
    assert_eq!(r.attempt_errors.len(), 2);
    assert_eq!(r.attempt_errors[1].error.message, "flaky failure 2");

    // Exhausts its attempts: DEAD with every error kept; InputError is not retried.
    let dead_id = id_of(
        &c.exec_async("flaky", &raw(json!({"fail_times": 10})), None)
            .await
            .unwrap(),
    );
    let dead = final_run(c, &dead_id).await;
    assert_eq!(
        (dead.status, dead.attempts, dead.attempt_errors.len()),
        (RunStatus::Dead, 3, 3)
    );
    let r = final_run(
        c,
        &id_of(
            &c.exec_async("flaky", &raw(json!({"bad": true})), None)
                .await
                .unwrap(),
        ),
    )
    .await;
    assert_eq!((r.status, r.attempts), (RunStatus::Failed, 1));
    assert_eq!(r.error.unwrap().kind, ErrorType::InputError);
    let listed = c
        .list_runs(&dispatch_client::RunQuery {
            status: Some("dead".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [dead_id.as_str()]
    );

    // Redrive: attempts start again (3 more), earlier errors are kept.
    let again = c.redrive_run(&dead_id).await.unwrap();
    assert_eq!(again.status, RunStatus::Queued);
    let dead = final_run(c, &dead_id).await;
    assert_eq!(
        (dead.status, dead.attempt_errors.len()),
        (RunStatus::Dead, 6)
    );
    let err = c.redrive_run(&id_of(&a)).await.unwrap_err();
    assert_eq!(
        err.status().unwrap().as_u16(),
        409,
        "only dead runs are redriven"
    );
    assert_eq!(c.redrive_all(Some("flaky")).await.unwrap()["redriven"], 1);
    final_run(c, &dead_id).await;

    // Purge deletes finished runs.
    let purged = c.purge_runs(Some("flaky"), Some("dead")).await.unwrap();
    assert_eq!(purged["deleted"], 1);
    assert_eq!(
        c.get_run(&dead_id)
            .await
            .unwrap_err()
            .status()
            .unwrap()
            .as_u16(),
        404
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running_runs() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    // Busy for payload.block seconds (a select timeout), then done.
    let slow = "import select\ndef handle(context, payload):\n    select.select([], [], [], payload.get('block', 0))\n    return 'done'\n";
    create_function(
        c,
        "slow",
        "py",
        "slow.py",
        slow,
        json!({"concurrency": {"maxWorkers": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "slow").await.phase(),
        Some(Phase::Ready)
    );
    let running = id_of(
        &c.exec_async("slow", &raw(json!({"block": 30})), None)
            .await
            .unwrap(),
    );
    let queued = id_of(&c.exec_async("slow", &raw(json!({})), None).await.unwrap());
    until_status(c, &running, RunStatus::Running).await;
    assert_eq!(
        c.get_run(&queued).await.unwrap().status,
        RunStatus::Queued,
        "maxWorkers 1 holds it back"
    );

    let r = c.cancel_run(&queued).await.unwrap();
    assert_eq!(r.status, RunStatus::Cancelled);
    let started = Instant::now();
    let r = c.cancel_run(&running).await.unwrap();
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!(final_run(c, &running).await.status, RunStatus::Cancelled);
    assert_eq!(
        final_run(c, &queued).await.attempts,
        0,
        "a cancelled queued run never ran"
    );
    // The killed worker is replaced: the next run works at once.
    let next = final_run(
        c,
        &id_of(&c.exec_async("slow", &raw(json!({})), None).await.unwrap()),
    )
    .await;
    assert_eq!((next.status, next.cold), (RunStatus::Succeeded, true));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the 30 s attempt was killed"
    );
    let err = c.cancel_run(&next.id).await.unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 409);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_function_does_not_starve_others() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    let nap = "import select\ndef handle(context, payload):\n    select.select([], [], [], 0.02)\n    return 1\n";
    create_function(
        c,
        "hot",
        "py",
        "hot.py",
        nap,
        json!({"concurrency": {"maxWorkers": 1}}),
    )
    .await
    .unwrap();
    create_function(c, "cold", "py", "cold.py", nap, json!({}))
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "hot").await.phase(),
        Some(Phase::Ready)
    );
    assert_eq!(
        settled(c, Kind::Function, "cold").await.phase(),
        Some(Phase::Ready)
    );
    let mut hot = Vec::new();
    for _ in 0..60 {
        hot.push(id_of(
            &c.exec_async("hot", &raw(json!({})), None).await.unwrap(),
        ));
    }
    let other = id_of(&c.exec_async("cold", &raw(json!({})), None).await.unwrap());
    let done = final_run(c, &other).await;
    assert_eq!(done.status, RunStatus::Succeeded);
    // When the other function's run finished, most of the hot backlog was still waiting.
    let waiting = c
        .list_runs(&dispatch_client::RunQuery {
            function: Some("hot".into()),
            status: Some("queued".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    assert!(
        waiting > 30,
        "only {waiting} hot runs were still queued: the other function waited behind them"
    );
    for id in &hot {
        assert_eq!(final_run(c, id).await.status, RunStatus::Succeeded);
    }
    t.stop().await;
}

/// A callback receiver: answers 500 to the first POST, 200 after; keeps the bodies.
async fn receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                let mut v = g.lock().unwrap();
                v.push(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
                if v.len() == 1 {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cb", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_retried_until_delivered() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    create_function(c, "hello", "py", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "hello").await.phase(),
        Some(Phase::Ready)
    );
    let (url, got) = receiver().await;
    let id = id_of(
        &c.exec_async("hello", &raw(json!({"name": "cb"})), Some(&url))
            .await
            .unwrap(),
    );
    assert_eq!(final_run(c, &id).await.status, RunStatus::Succeeded);
    let cb = eventually("the callback to be delivered", || async {
        let cb = c.get_run(&id).await.unwrap().callback.unwrap();
        (cb.state == dispatch_core::CallbackState::Delivered).then_some(cb)
    })
    .await;
    assert_eq!(cb.attempts, 2);
    let bodies = got.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[1]["id"], id.as_str());
    assert_eq!(bodies[1]["status"], "SUCCEEDED");
    assert_eq!(bodies[1]["output"]["myField"], "Hello, cb from Nowhere");
    let err = c
        .exec_async("hello", &raw(json!({})), Some("ftp://nope"))
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 400);
    t.stop().await;
}

/// Admission is bounded per function (`spec.maxQueued`, no overshoot under concurrency), in
/// payload bytes per namespace and per payload; refusals store nothing and are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_bounded_per_function_and_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let options = dispatch_server::Options {
        max_queue_depth: 100,
        max_queued_bytes: 100 * 1024,
        max_async_payload: 40 * 1024,
        ..no_auth()
    };
    let t = start_with(dir, options).await;
    let c = &t.client;
    // Functions that cannot become READY: their runs wait, so the bounds fill.
    c.create(&object(
        Kind::BaseImage,
        "broken",
        json!({"image": "python:3", "language": "python3", "interpreter": "/nonexistent/python3"}),
    ))
    .await
    .unwrap();
    c.create(&object(
        Kind::Image,
        "broken",
        json!({"baseImage": "broken"}),
    ))
    .await
    .unwrap();
    let e = create_function(
        c,
        "zero",
        "broken",
        "hello.py",
        HELLO_PY,
        json!({"maxQueued": 0}),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("spec.maxQueued must be between 1"),
        "{e}"
    );
    for (name, extra) in [("a", json!({"maxQueued": 5})), ("b", json!({}))] {
        create_function(c, name, "broken", "hello.py", HELLO_PY, extra)
            .await
            .unwrap();
        settled(c, Kind::Function, name).await;
    }
    // 30 callers at once against a bound of 5: exactly 5 accepted.
    let one = raw(json!(1));
    let calls = (0..30).map(|_| c.exec_async("a", &one, None));
    let results = futures_util::future::join_all(calls).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(accepted, 5, "no overshoot");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.status().unwrap().as_u16(), 429);
        assert!(r.to_string().contains("spec.maxQueued"), "{r}");
    }
    let q = dispatch_client::RunQuery {
        function: Some("a".into()),
        ..Default::default()
    };
    assert_eq!(
        c.list_runs(&q).await.unwrap().len(),
        5,
        "refused calls stored nothing"
    );
    // Function b still has room: the bound is a's alone. Its payloads meet the byte bounds.
    let big = raw(json!("x".repeat(41 * 1024)));
    let e = c.exec_async("b", &big, None).await.unwrap_err();
    assert_eq!(e.status().unwrap().as_u16(), 413);
    assert!(e.to_string().contains("--max-async-payload"), "{e}");
    let chunk = raw(json!("x".repeat(30 * 1024)));
    for _ in 0..3 {
        c.exec_async("b", &chunk, None).await.unwrap();
    }
    let e = c.exec_async("b", &chunk, None).await.unwrap_err();
    assert_eq!(e.status().unwrap().as_u16(), 429);
    assert!(e.to_string().contains("--max-queued-bytes"), "{e}");
    // Seen: the function's queue and its refusals, in the API and in /metrics.
    let fq = c.function_queue("a").await.unwrap();
    assert_eq!(
        (fq.queued, fq.max_queued, fq.refused.function_full),
        (5, 5, 25)
    );
    let text = metrics(&t).await;
    for line in [
        "dispatch_function_queued{namespace=\"default\",function=\"a\"} 5",
        "dispatch_function_refused_total{namespace=\"default\",function=\"a\",bound=\"function\"} 25",
        "dispatch_function_refused_total{namespace=\"default\",function=\"b\",bound=\"namespace_bytes\"} 1",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    // Its runs wait (the function cannot start): the oldest has waited since it was accepted.
    let age: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "dispatch_function_oldest_queued_age_seconds{namespace=\"default\",function=\"a\"} ",
            )?
            .parse()
            .ok()
        })
        .unwrap_or_else(|| panic!("no oldest age of a in\n{text}"));
    assert!(age > 0.0 && age < 300.0, "{age}");
    // A cancelled run gives its slot and its bytes back.
    let runs = c.list_runs(&q).await.unwrap();
    c.cancel_run(&runs[0].id).await.unwrap();
    c.exec_async("a", &raw(json!(1)), None).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_limit_and_log_cap() {
    let dir = tempfile::tempdir().unwrap();
    let options = dispatch_server::Options {
        max_queue_depth: 2,
        max_log_bytes: 64,
        ..no_auth()
    };
    let t = start_with(dir, options).await;
    let c = &t.client;
    // A function that cannot become READY (its interpreter does not exist): its runs wait.
    c.create(&object(
        Kind::BaseImage,
        "broken",
        json!({"image": "python:3", "language": "python3", "interpreter": "/nonexistent/python3"}),
    ))
    .await
    .unwrap();
    c.create(&object(
        Kind::Image,
        "broken",
        json!({"baseImage": "broken"}),
    ))
    .await
    .unwrap();
    create_function(c, "stuck", "broken", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "stuck").await.phase(),
        Some(Phase::Error)
    );
    let first = id_of(&c.exec_async("stuck", &raw(json!({})), None).await.unwrap());
    c.exec_async("stuck", &raw(json!({})), None).await.unwrap();
    let e = c
        .exec_async("stuck", &raw(json!({})), None)
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().as_u16(), 429);
    assert!(
        e.to_string().contains("2 async runs queued or running"),
        "{e}"
    );
    assert_eq!(c.get_run(&first).await.unwrap().status, RunStatus::Queued);
    // Cancelling one frees a slot.
    let cancelled = c.cancel_run(&first).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    c.exec_async("stuck", &raw(json!({})), None).await.unwrap();
    // Deleting the function drops its waiting runs (and their records).
    c.delete(Kind::Function, "stuck").await.unwrap();
    assert!(c.list_runs(&Default::default()).await.unwrap().is_empty());

    images(c).await;
    let chatty = "def handle(context, payload):\n    for i in range(100):\n        print('line %d of chatter' % i)\n    return 1\n";
    create_function(c, "chatty", "py", "chatty.py", chatty, json!({}))
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "chatty").await.phase(),
        Some(Phase::Ready)
    );
    let r = final_run(
        c,
        &id_of(&c.exec_async("chatty", &raw(json!({})), None).await.unwrap()),
    )
    .await;
    assert_eq!(r.status, RunStatus::Succeeded);
    assert_eq!(
        r.logs.stdout.last().map(String::as_str),
        Some(dispatch_core::envelope::TRUNCATED_MARKER)
    );
    assert!(r.logs.stdout.len() < 10);
    // Sync runs' records are capped too (the caller's envelope is not).
    let sync = c.exec("chatty", &raw(json!({}))).await.unwrap();
    assert_eq!(sync.envelope.context.logs.stdout.len(), 100);
    let rec = c.get_run(&sync.run_id.unwrap()).await.unwrap();
    assert_eq!(
        rec.logs.stdout.last().map(String::as_str),
        Some(dispatch_core::envelope::TRUNCATED_MARKER)
    );
    assert_eq!(
        c.exec_async("ghost", &raw(json!({})), None)
            .await
            .unwrap_err()
            .status()
            .unwrap()
            .as_u16(),
        404
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_async_calls_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let options = dispatch_server::Options {
        runs_per_function: 2,
        // This test prunes itself (the background pass would race it).
        retention_interval: std::time::Duration::from_secs(3600),
        ..no_auth()
    };
    let t = start_with(dir, options).await;
    let c = &t.client;
    routed(c, "hello", HELLO_PY, "/hello").await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/hello", t.gateway))
        .header("x-dispatch-blocking", "false")
        .json(&json!({"name": "later"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.headers()["x-dispatch-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    let run = final_run(c, &id).await;
    assert_eq!(
        (run.status, run.trigger),
        (RunStatus::Succeeded, dispatch_core::Trigger::Endpoint)
    );
    assert_eq!(
        run.output.unwrap().get(),
        r#"{"myField":"Hello, later from Nowhere"}"#
    );

    // Retention keeps the newest `runs_per_function` finished runs of each function.
    for _ in 0..3 {
        c.exec("hello", &raw(json!({}))).await.unwrap();
    }
    let state = &t.server.as_ref().unwrap().state;
    state.recorder.flush().await;
    assert_eq!(dispatch_server::retention::prune(state).await.unwrap(), 2);
    let left = c.list_runs(&Default::default()).await.unwrap();
    assert_eq!(left.len(), 2);
    t.stop().await;
}

/// DESIGN §4: a gateway run gets `context.httpContext` whether it runs now or later; an
/// async one keeps it in its record (without the credential headers) until it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_gateway_runs_carry_the_http_context() {
    const ECHO_HTTP: &str = r#"
def handle(context, payload):
    return context.get("httpContext")
"#;
    let t = start_with(tempfile::tempdir().unwrap(), no_auth()).await;
    let c = &t.client;
    routed(c, "echo", ECHO_HTTP, "/orders/{id}").await;
    let http = reqwest::Client::new();
    let post = |blocking: bool| {
        http.post(format!("{}/orders/42?expand=items", t.gateway))
            .header(
                "x-dispatch-blocking",
                if blocking { "true" } else { "false" },
            )
            .header("x-request-id", "req-7")
            .header("authorization", "Bearer secret-of-the-caller")
            .json(&json!({"n": 1}))
            .send()
    };
    let sync: serde_json::Value = post(true).await.unwrap().json().await.unwrap();
    let r = post(false).await.unwrap();
    assert_eq!(r.status(), 202);
    let id = r.headers()["x-dispatch-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    let run = final_run(c, &id).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    let later: serde_json::Value = serde_json::from_str(run.output.unwrap().get()).unwrap();
    for ctx in [&sync, &later] {
        assert_eq!(ctx["method"], "POST", "{ctx}");
        assert_eq!(ctx["path"], "/orders/42");
        assert_eq!(ctx["query"], "expand=items");
        assert_eq!(ctx["params"]["id"], "42");
        assert_eq!(ctx["endpoint"], "echo");
        assert_eq!(ctx["headers"]["x-request-id"], "req-7");
        assert!(ctx["headers"].get("authorization").is_none(), "{ctx}");
    }
    assert_eq!(later["headers"]["x-dispatch-blocking"], "false");
    // The record keeps what the handler got, and no credentials.
    let stored = serde_json::to_string(&c.get_run(&id).await.unwrap()).unwrap();
    assert!(stored.contains("\"httpContext\""), "{stored}");
    assert!(!stored.contains("secret-of-the-caller"), "{stored}");
    t.stop().await;
}

/// Images, Python function `name` READY, and an endpoint `name` that routes POST `path` to it.
async fn routed(c: &dispatch_client::Client, name: &str, body: &str, path: &str) {
    images(c).await;
    ready_function(c, name, body, json!({})).await;
    c.create(&object(
        Kind::Endpoint,
        name,
        json!({"function": name, "methods": ["POST"], "paths": [path]}),
    ))
    .await
    .unwrap();
}
