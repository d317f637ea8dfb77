//! Cron drivers with paused time and a fake backend (no fixed waits, no processes): fires on
//! schedule with zero warm workers, and missed fires after a simulated restart follow
//! `missedRuns`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dispatch_core::{Kind, Object};
use dispatch_server::clock::Clock;
use dispatch_server::controller::Key;
use dispatch_server::{AppState, Options};
use dispatch_store::{BlobStore, ResourceStore, SqliteStore};
use serde_json::json;
use support::fake::FakeBackend;
use support::{eventually_within, let_pass};

struct World {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    blobs: BlobStore,
    clock: Clock,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        World {
            store: Arc::new(SqliteStore::in_memory().unwrap()),
            blobs,
            clock: Clock::new(),
            _dir: dir,
        }
    }

    async fn start(&self) -> (Arc<AppState>, Arc<FakeBackend>) {
        self.start_with(FakeBackend::default()).await
    }

    async fn start_with(&self, backend: FakeBackend) -> (Arc<AppState>, Arc<FakeBackend>) {
        let backend = Arc::new(backend);
        let opts = Options {
            auth: false,
            clock: Some(self.clock),
            ..Options::default()
        };
        let state = dispatch_server::Server::builder()
            .stores(dispatch_server::Stores::single(self.store.clone()))
            .blobs(self.blobs.clone())
            .backend(backend.clone())
            .options(opts)
            .state()
            .await
            .unwrap();
        (state, backend)
    }

    /// Function `tick` (fake) and a cron driver running it.
    fn seed(&self, schedule: &str, missed: &str) {
        let source = self.blobs.put(b"unused by the fake").unwrap();
        for (kind, name, spec) in [
            (Kind::Image, "py", json!({"baseImage": "python3"})),
            (
                Kind::Function,
                "tick",
                json!({"image": "py", "source": source, "handler": "t.handle", "retry": {"maxAttempts": 1}}),
            ),
            (
                Kind::EventDriver,
                "clock",
                json!({"type": "cron", "schedule": schedule, "function": "tick", "missedRuns": missed}),
            ),
        ] {
            let mut o = Object::new(kind, "default", name, spec);
            o.validate().unwrap();
            self.store.create(o).unwrap();
        }
    }
}

async fn deployed(state: &AppState) {
    state.enqueue(Key::new("default", Kind::Image, "py"));
    let (every, limit) = (Duration::from_millis(10), Duration::from_secs(10));
    eventually_within("tick to be deployed", every, limit, || async {
        state.deployed("default", "tick").map(|_| ())
    })
    .await;
}

fn calls(b: &FakeBackend) -> usize {
    b.calls.lock().unwrap().len()
}

/// Lets the runtime run until `b` has `n` calls (or a virtual hour passes).
async fn until_calls(b: &FakeBackend, n: usize) {
    let (every, limit) = (Duration::from_millis(100), Duration::from_secs(3600));
    eventually_within(&format!("{n} calls"), every, limit, || async {
        (calls(b) >= n).then_some(())
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn fires_on_schedule() {
    let w = World::new();
    w.seed("@every 10s", "skip");
    let (state, backend) = w.start().await;
    deployed(&state).await;
    until_calls(&backend, 3).await;
    let at = backend.calls.lock().unwrap().clone();
    let gap = (at[2] - at[1]).as_secs_f64();
    assert!((9.0..=11.0).contains(&gap), "fires 10 s apart, got {gap}");
    // `get eventdriver` shows the next fire.
    let d = state
        .get("default", Kind::EventDriver, "clock")
        .await
        .unwrap()
        .unwrap();
    assert!(d.status.next_fire.is_some(), "{:?}", d.status);
    state.stop().await;
}

async fn downtime_with(missed: &str) -> usize {
    let w = World::new();
    w.seed("@every 1m", missed);
    let (state, backend) = w.start().await;
    deployed(&state).await;
    until_calls(&backend, 1).await;
    state.stop().await;
    // Down for a bit over five minutes: five fires missed.
    tokio::time::advance(Duration::from_secs(5 * 60 + 20)).await;
    let (state, backend) = w.start().await;
    deployed(&state).await;
    // Let start-up catch up, without reaching the next regular fire (40 s away).
    let_pass(Duration::from_secs(10)).await;
    let n = calls(&backend);
    state.stop().await;
    n
}

#[tokio::test(start_paused = true)]
async fn missed_runs_skip() {
    assert_eq!(downtime_with("skip").await, 0);
}

#[tokio::test(start_paused = true)]
async fn missed_runs_once() {
    assert_eq!(downtime_with("once").await, 1);
}

#[tokio::test(start_paused = true)]
async fn missed_runs_all() {
    assert_eq!(downtime_with("all").await, 5);
}

/// With several servers only the Lease holder fires: none while this one follows, fires
/// once it leads, none again once it loses the Lease.
#[tokio::test(start_paused = true)]
async fn only_the_leader_fires() {
    let w = World::new();
    w.seed("@every 10s", "skip");
    let (lead, leads) = tokio::sync::watch::channel(false);
    let (state, backend) = w
        .start_with(FakeBackend {
            leader: Some(leads),
            ..Default::default()
        })
        .await;
    deployed(&state).await;
    let_pass(Duration::from_secs(60)).await;
    assert_eq!(calls(&backend), 0, "a follower does not fire");
    lead.send_replace(true);
    until_calls(&backend, 2).await;
    lead.send_replace(false);
    // Let a fire already under way finish, then nothing more.
    let_pass(Duration::from_secs(1)).await;
    let n = calls(&backend);
    let_pass(Duration::from_secs(60)).await;
    assert_eq!(calls(&backend), n, "no fire after losing the lease");
    state.stop().await;
}
