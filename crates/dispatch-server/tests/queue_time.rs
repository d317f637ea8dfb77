//! The async queue's timing with paused tokio time and a fake backend (no processes, no
//! fixed waits): exponential backoff with jitter between attempts, DEAD after maxAttempts, and
//! maxAge both for failing runs and for runs whose function never becomes ready; a deploy's
//! reported steps as the function's CREATING reason.

use std::sync::Arc;
use std::time::Duration;

use dispatch_core::envelope::null_raw;
use dispatch_core::{Kind, Object, Phase, Run, RunStatus, Trigger};
mod support;

use dispatch_server::controller::Key;
use dispatch_server::{AppState, Invocation, Options, queue};
use dispatch_store::{BlobStore, ResourceStore, SqliteStore};
use serde_json::json;
use support::eventually_within;
use support::fake::FakeBackend;

struct Fx {
    _dir: tempfile::TempDir,
    state: Arc<AppState>,
    backend: Arc<FakeBackend>,
}

/// A server state with function `f` (built-in python3 base, image `py`) and `retry`.
async fn fx(backend: FakeBackend, retry: serde_json::Value) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
    let source = blobs.put(b"not unpacked by the fake backend").unwrap();
    let backend = Arc::new(backend);
    let state = dispatch_server::Server::builder()
        .stores(dispatch_server::Stores::single(store.clone()))
        .blobs(blobs)
        .backend(backend.clone())
        .options(Options::default())
        .state()
        .await
        .unwrap();
    let mut image = Object::new(
        Kind::Image,
        "default",
        "py",
        json!({"baseImage": "python3"}),
    );
    image.validate().unwrap();
    let mut f = Object::new(
        Kind::Function,
        "default",
        "f",
        json!({"image": "py", "source": source, "handler": "f.handle", "retry": retry}),
    );
    f.validate().unwrap();
    store.create(image).unwrap();
    store.create(f).unwrap();
    state.enqueue(Key::new("default", Kind::Image, "py"));
    Fx {
        _dir: dir,
        state,
        backend,
    }
}

async fn wait_deployed(state: &AppState) {
    let (every, limit) = (Duration::from_millis(10), Duration::from_secs(10));
    eventually_within("function f to be deployed", every, limit, || async {
        state.deployed("default", "f").map(|_| ())
    })
    .await;
}

async fn final_run(state: &AppState, id: &str) -> Run {
    let (every, limit) = (Duration::from_millis(100), Duration::from_secs(10_000));
    eventually_within(&format!("run {id} to finish"), every, limit, || async {
        let (ns, i) = ("default".to_string(), id.to_string());
        let r = state
            .db(move |s| s.get_run(&ns, &i))
            .await
            .unwrap()
            .unwrap();
        r.status.is_final().then_some(r)
    })
    .await
}

fn secs(d: jiff::SignedDuration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_with_jitter_then_dead() {
    let retry =
        json!({"maxAttempts": 4, "backoff": {"initial": "10s", "max": "30s"}, "maxAge": "1h"});
    let f = fx(FakeBackend::default(), retry).await;
    wait_deployed(&f.state).await;
    let run = queue::enqueue(
        &f.state,
        Invocation::new("default", "f", null_raw(), Trigger::Exec),
    )
    .await
    .unwrap();
    let run = final_run(&f.state, &run.id).await;
    assert_eq!((run.status, run.attempts), (RunStatus::Dead, 4));
    assert_eq!(run.attempt_errors.len(), 4);
    assert!(run.attempt_errors.iter().all(|e| e.error.message == "boom"));
    // Attempt k+1 starts after initial·2^(k-1) capped at max, jittered into [half, full].
    let calls = f.backend.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 4);
    for (k, pair) in calls.windows(2).enumerate() {
        let base = (10.0 * f64::from(1u32 << k)).min(30.0);
        let gap = (pair[1] - pair[0]).as_secs_f64();
        assert!(
            gap >= base / 2.0 && gap <= base + 0.5,
            "gap {k}: {gap}s, expected within [{}, {base}]",
            base / 2.0
        );
    }
    // The records' timestamps follow the same clock.
    let gap = secs(
        run.attempt_errors[3]
            .at
            .duration_since(run.attempt_errors[2].at),
    );
    assert!((15.0..=30.5).contains(&gap), "{gap}");
}

#[tokio::test(start_paused = true)]
async fn max_age_stops_retries() {
    let retry =
        json!({"maxAttempts": 10, "backoff": {"initial": "20s", "max": "20s"}, "maxAge": "30s"});
    let f = fx(FakeBackend::default(), retry).await;
    wait_deployed(&f.state).await;
    let run = queue::enqueue(
        &f.state,
        Invocation::new("default", "f", null_raw(), Trigger::Exec),
    )
    .await
    .unwrap();
    let run = final_run(&f.state, &run.id).await;
    assert_eq!(run.status, RunStatus::Dead);
    assert!((2..=3).contains(&run.attempts), "{} attempts", run.attempts);
    let last = run.attempt_errors.last().unwrap().at;
    assert!(
        secs(last.duration_since(run.created_at)) <= 30.5,
        "no attempt starts past maxAge"
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_waits_for_its_function_until_max_age() {
    let retry = json!({"maxAge": "5s"});
    let f = fx(
        FakeBackend {
            deploy_fails: true,
            ..Default::default()
        },
        retry,
    )
    .await;
    let run = queue::enqueue(
        &f.state,
        Invocation::new("default", "f", null_raw(), Trigger::Exec),
    )
    .await
    .unwrap();
    let run = final_run(&f.state, &run.id).await;
    assert_eq!((run.status, run.attempts), (RunStatus::Dead, 0));
    assert!(run.error.unwrap().message.contains("retry.maxAge (5s)"));
    let waited = secs(run.finished_at.unwrap().duration_since(run.created_at));
    assert!((5.0..7.0).contains(&waited), "waited {waited}s");
    assert!(
        f.backend.calls.lock().unwrap().is_empty(),
        "a function that is not deployed is never called"
    );
}

/// A deploy's steps (a container function's base image pull, layer by layer) become the
/// function's CREATING reason while it deploys — what `dispatch create function --wait` shows —
/// and the outcome replaces them.
#[tokio::test(start_paused = true)]
async fn a_deploys_steps_are_its_creating_reason() {
    let go = Arc::new(tokio::sync::Notify::new());
    let step = "layer 2/3 sha256:abc: 12.0 MiB".to_string();
    let f = fx(
        FakeBackend {
            deploy_step: Some((step.clone(), go.clone())),
            ..Default::default()
        },
        json!({}),
    )
    .await;
    let function = || async {
        let o = f.state.get("default", Kind::Function, "f").await.unwrap();
        o.map(|o| (o.phase(), o.status.reason))
    };
    let (every, limit) = (Duration::from_millis(10), Duration::from_secs(10));
    eventually_within("the step as the reason", every, limit, || async {
        (function().await == Some((Some(Phase::Creating), step.clone()))).then_some(())
    })
    .await;
    go.notify_one();
    wait_deployed(&f.state).await;
    eventually_within("READY without the step", every, limit, || async {
        (function().await == Some((Some(Phase::Ready), String::new()))).then_some(())
    })
    .await;
}
