//! Several servers on one PostgreSQL database (a real server, `dispatch_testkit::postgres`):
//! leases, taking over a server whose lease ended (once, by one server), the owner fence on
//! writes, a server started again under its own id, the election, pending deliveries claimed
//! once, shared source archives and settings. SQLite (one server) takes everything at start.

use std::time::Duration;

use dispatch_core::envelope::null_raw;
use dispatch_core::events::{Delivery, DeliveryState, StoredEvent};
use dispatch_core::{CallbackState, JobExecution, JobPhase, Run, RunStatus, Trigger};
use dispatch_store::{PgOptions, PgStore, RecordStore, SqliteStore, StoreError, TakeOver};

fn run(id: &str, status: RunStatus, owner: Option<&str>) -> Run {
    let mut r = Run::new(
        id.into(),
        "default",
        "hello",
        Trigger::Exec,
        null_raw(),
        jiff::Timestamp::now(),
    );
    r.is_async = true;
    r.status = status;
    r.replica = owner.map(str::to_string);
    if status.is_final() {
        r.finished_at = Some(jiff::Timestamp::now());
    }
    r
}

fn job(uuid: &str, owner: Option<&str>) -> JobExecution {
    JobExecution {
        uuid: uuid.into(),
        name: "tpl".into(),
        namespace: "default".into(),
        phase: JobPhase::Active,
        reason: String::new(),
        payload: "{}".into(),
        rendered: serde_json::Value::Null,
        images: vec![],
        runtime: dispatch_core::jobs::JobRuntime::Host,
        attempts: 1,
        exit_code: None,
        logs: Default::default(),
        created_at: jiff::Timestamp::now(),
        started_at: None,
        finished_at: None,
        expires_at: None,
        replica: owner.map(str::to_string),
        trace: None,
    }
}

fn ids(runs: &[Run]) -> Vec<&str> {
    runs.iter().map(|r| r.id.as_str()).collect()
}

/// A PostgreSQL server of its own with database `db`, and `n` stores on it (servers).
fn servers(db: &str, n: usize) -> (dispatch_testkit::postgres::Postgres, String, Vec<PgStore>) {
    let pg = dispatch_testkit::postgres::Postgres::start();
    let url = pg.create_database(db);
    let stores = (0..n)
        .map(|_| PgStore::connect(&PgOptions::new(&url)).unwrap())
        .collect();
    (pg, url, stores)
}

/// Polls `f` until it gives something, for at most 20 s.
fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    dispatch_testkit::eventually(what, Duration::from_secs(20), f)
}

#[test]
fn one_sqlite_server_takes_every_active_record_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("d.db")).unwrap();
    assert!(!s.shared());
    let mut cb = run("01C", RunStatus::Succeeded, None);
    cb.callback = Some(dispatch_core::Callback {
        url: "http://x".into(),
        state: CallbackState::Pending,
        attempts: 0,
        last_error: None,
    });
    s.put_runs(&[
        run("01A", RunStatus::Queued, None),
        run("01B", RunStatus::Running, None),
        cb,
    ])
    .unwrap();
    s.put_job(&job("j1", None)).unwrap();
    let t = s.take_over("", TakeOver::Start).unwrap();
    assert_eq!(ids(&t.runs), ["01A", "01B"]);
    assert_eq!(ids(&t.callbacks), ["01C"]);
    assert_eq!(t.jobs.len(), 1);
}

#[test]
fn a_server_whose_lease_ended_is_taken_over_once_and_fenced() {
    let (_pg, _url, s) = servers("replicas", 3);
    let [a, b, c]: [PgStore; 3] = s.try_into().ok().unwrap();
    assert!(a.shared());
    let long = Duration::from_secs(60);
    // Runs from before leases (no owner) are taken by the first server that asks, once.
    a.put_runs(&[run("00Z", RunStatus::Queued, None)]).unwrap();
    assert!(a.lease("a", Duration::from_millis(300), true).unwrap());
    assert!(b.lease("b", long, true).unwrap());
    assert!(c.lease("c", long, true).unwrap());
    assert!(
        b.take_over("b", TakeOver::Expired).unwrap().is_empty(),
        "a renewal looks only for servers whose lease ended"
    );
    let (tb, tc) = std::thread::scope(|s| {
        let tb = s.spawn(|| b.take_over("b", TakeOver::Orphans).unwrap());
        let tc = s.spawn(|| c.take_over("c", TakeOver::Orphans).unwrap());
        (tb.join().unwrap(), tc.join().unwrap())
    });
    let mut both = [ids(&tb.runs), ids(&tc.runs)].concat();
    both.sort();
    assert_eq!(both, ["00Z"], "taken once");

    // A's work: queued, running, a callback to send, an active job execution.
    let mut cb = run("01C", RunStatus::Succeeded, Some("a"));
    cb.callback = Some(dispatch_core::Callback {
        url: "http://x".into(),
        state: CallbackState::Pending,
        attempts: 0,
        last_error: None,
    });
    a.put_runs(&[
        run("01A", RunStatus::Queued, Some("a")),
        run("01B", RunStatus::Running, Some("a")),
        cb,
        run("01D", RunStatus::Queued, Some("b")),
    ])
    .unwrap();
    a.put_job(&job("j1", Some("a"))).unwrap();
    // While A's lease lasts, nobody takes its work.
    assert!(b.take_over("b", TakeOver::Expired).unwrap().is_empty());
    // A stops renewing; B and C both try: one of them takes all of it.
    let (tb, tc) = eventually("A's lease to end and its work to be taken", || {
        let (tb, tc) = std::thread::scope(|s| {
            let tb = s.spawn(|| b.take_over("b", TakeOver::Expired).unwrap());
            let tc = s.spawn(|| c.take_over("c", TakeOver::Expired).unwrap());
            (tb.join().unwrap(), tc.join().unwrap())
        });
        (!tb.is_empty() || !tc.is_empty()).then_some((tb, tc))
    });
    let (taker, t, other) = if tb.is_empty() {
        ("c", tc, tb)
    } else {
        ("b", tb, tc)
    };
    assert!(other.is_empty(), "taken by one server: {other:?}");
    assert_eq!(ids(&t.runs), ["01A", "01B"]);
    assert_eq!(ids(&t.callbacks), ["01C"]);
    assert_eq!(t.jobs.len(), 1);
    for r in t.runs.iter().chain(&t.callbacks) {
        assert_eq!(r.replica.as_deref(), Some(taker));
        assert_eq!(
            b.get_run("default", &r.id)
                .unwrap()
                .unwrap()
                .replica
                .as_deref(),
            Some(taker),
            "the stored record names its new owner"
        );
    }
    assert_eq!(t.jobs[0].replica.as_deref(), Some(taker));
    // Nothing is taken twice.
    assert!(b.take_over("b", TakeOver::Expired).unwrap().is_empty());
    assert!(c.take_over("c", TakeOver::Expired).unwrap().is_empty());
    // A wakes up: its lease is gone, and what it writes of the runs it held is refused.
    assert!(!a.lease("a", long, false).unwrap());
    a.put_runs(&[run("01A", RunStatus::Succeeded, Some("a"))])
        .unwrap();
    assert_eq!(
        b.get_run("default", "01A").unwrap().unwrap().status,
        RunStatus::Queued,
        "the old owner's write is fenced off"
    );
    let mut stale = job("j1", Some("a"));
    stale.phase = JobPhase::Failed;
    a.put_job(&stale).unwrap();
    assert_eq!(
        b.get_job("default", "j1").unwrap().unwrap().phase,
        JobPhase::Active
    );
    // A cancel asked through another server is found by the owner (even without the
    // notification), until the run is final.
    c.request_cancel("default", "01B").unwrap();
    assert_eq!(
        b.cancel_requests(taker).unwrap(),
        [("default".to_string(), "01B".to_string())]
    );
    assert!(b.cancel_requests("a").unwrap().is_empty());
    let mut cancelled = run("01B", RunStatus::Cancelled, Some(taker));
    cancelled.attempts = 1;
    b.put_runs(&[cancelled]).unwrap();
    assert!(b.cancel_requests(taker).unwrap().is_empty());
    // The owner writes; a finished run can be written by anyone (a redrive takes it).
    b.put_runs(&[run("01A", RunStatus::Dead, Some(taker))])
        .unwrap();
    a.put_runs(&[run("01A", RunStatus::Queued, Some("a2"))])
        .unwrap();
    assert_eq!(
        b.get_run("default", "01A")
            .unwrap()
            .unwrap()
            .replica
            .as_deref(),
        Some("a2")
    );
}

#[test]
fn a_server_started_again_under_its_id_takes_its_own_work_at_once() {
    let (_pg, url, mut s) = servers("again", 1);
    let a = s.remove(0);
    let long = Duration::from_secs(60);
    assert!(a.lease("a", long, true).unwrap());
    a.put_runs(&[run("01A", RunStatus::Running, Some("a"))])
        .unwrap();
    drop(a);
    let a = PgStore::connect(&PgOptions::new(&url)).unwrap();
    assert!(a.lease("a", long, true).unwrap());
    assert!(
        a.take_over("a", TakeOver::Orphans).unwrap().is_empty(),
        "its lease lasts"
    );
    assert_eq!(
        ids(&a.take_over("a", TakeOver::Start).unwrap().runs),
        ["01A"]
    );
    // A clean stop ends the lease at once: another server takes the work without waiting.
    let b = PgStore::connect(&PgOptions::new(&url)).unwrap();
    assert!(b.lease("b", long, true).unwrap());
    assert!(b.take_over("b", TakeOver::Expired).unwrap().is_empty());
    a.leave("a").unwrap();
    assert_eq!(
        ids(&b.take_over("b", TakeOver::Expired).unwrap().runs),
        ["01A"]
    );
}

#[test]
fn one_server_is_elected_and_another_when_it_goes() {
    let (_pg, _url, s) = servers("elect", 2);
    let [a, b]: [PgStore; 2] = s.try_into().ok().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(&str, bool)>();
    let ta = tx.clone();
    assert!(a.elect(Box::new(move |l| {
        let _ = ta.send(("a", l));
    })));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).unwrap(),
        ("a", true)
    );
    assert!(b.elect(Box::new(move |l| {
        let _ = tx.send(("b", l));
    })));
    // B does not lead while A does; once A's store is gone (its connection, and the lock with
    // it), B does.
    assert!(rx.recv_timeout(Duration::from_millis(2500)).is_err());
    drop(a);
    let got = eventually("B to lead", || {
        rx.recv_timeout(Duration::from_millis(100))
            .ok()
            .filter(|e| e.0 == "b")
    });
    assert_eq!(got, ("b", true));
}

#[test]
fn a_pending_delivery_is_delivered_by_one_server() {
    let (_pg, _url, s) = servers("deliveries", 2);
    let [a, b]: [PgStore; 2] = s.try_into().ok().unwrap();
    let now = jiff::Timestamp::now();
    let event = StoredEvent {
        namespace: "default".into(),
        event: serde_json::from_value(serde_json::json!({
            "specversion": "1.0", "id": "e1", "source": "/shop", "type": "order.created"
        }))
        .unwrap(),
        received_at: now,
        matched: vec![Delivery {
            subscription: "sub".into(),
            function: "hello".into(),
            state: DeliveryState::Pending,
            run_id: None,
            error: None,
            attempts: 0,
        }],
        expires_at: now + jiff::SignedDuration::from_hours(1),
        pending: false,
    };
    assert_eq!(a.ingest_events(&[(event, vec![])], false).unwrap(), [true]);
    let pa = a.pending_deliveries("default", "sub", 10).unwrap();
    let pb = b.pending_deliveries("default", "sub", 10).unwrap();
    assert_eq!((pa.len(), pb.len()), (1, 1));
    let ra = run("01A", RunStatus::Queued, Some("a"));
    let rb = run("01B", RunStatus::Queued, Some("b"));
    a.deliver(&[(pa[0].0.clone(), ra)]).unwrap();
    let e = b.deliver(&[(pb[0].0.clone(), rb)]).unwrap_err();
    assert!(matches!(e, StoreError::Taken(_)), "{e}");
    assert!(
        b.get_run("default", "01B").unwrap().is_none(),
        "nothing of it stored"
    );
    assert!(b.get_run("default", "01A").unwrap().is_some());
}

#[test]
fn source_archives_and_settings_are_shared() {
    let (_pg, _url, s) = servers("blobs", 2);
    let [a, b]: [PgStore; 2] = s.try_into().ok().unwrap();
    a.put_blob("sha256:aa", b"archive").unwrap();
    assert_eq!(
        b.get_blob("sha256:aa").unwrap().as_deref(),
        Some(&b"archive"[..])
    );
    assert_eq!(b.get_blob("sha256:bb").unwrap(), None);
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
    assert_eq!(b.list_blobs(later).unwrap(), ["sha256:aa"]);
    assert!(
        b.list_blobs(jiff::Timestamp::UNIX_EPOCH)
            .unwrap()
            .is_empty()
    );
    b.delete_blob("sha256:aa").unwrap();
    assert_eq!(a.get_blob("sha256:aa").unwrap(), None);
    assert_eq!(a.agree("key", "one").unwrap(), "one");
    assert_eq!(b.agree("key", "two").unwrap(), "one", "the first one stays");
}

/// `get` answers from memory while the store listens: what another server writes (a spec, a
/// status, a delete) reaches it through the notifications, and this server's own writes at
/// once.
#[test]
fn cached_resources_follow_every_servers_writes() {
    use dispatch_core::{Kind, Object, Phase, Status};
    use dispatch_store::ResourceStore;
    let (_pg, _url, s) = servers("cache", 2);
    let [a, b]: [PgStore; 2] = s.try_into().ok().unwrap();
    // The listener runs once a callback is registered (the server always registers one).
    a.on_external_change(Box::new(|_| {}));
    let image = || {
        Object::new(
            Kind::Image,
            "default",
            "py",
            serde_json::json!({"baseImage": "python3"}),
        )
    };
    // A's listener is up once it hears a write of B's.
    b.create(image()).unwrap();
    eventually("A to see B's image", || {
        a.get("default", Kind::Image, "py").unwrap()
    });
    let phase = |s: &PgStore| {
        s.get("default", Kind::Image, "py")
            .unwrap()
            .and_then(|o| o.phase())
    };
    for p in [Phase::Creating, Phase::Ready, Phase::Error] {
        let st = Status {
            phase: Some(p),
            ..Default::default()
        };
        b.update_status("default", Kind::Image, "py", st).unwrap();
        eventually("A to see B's status", || {
            (phase(&a) == Some(p)).then_some(())
        });
        assert_eq!(phase(&b), Some(p), "a server reads its own write at once");
    }
    let st = Status {
        phase: Some(Phase::Ready),
        ..Default::default()
    };
    a.update_status("default", Kind::Image, "py", st).unwrap();
    assert_eq!(phase(&a), Some(Phase::Ready));
    b.delete("default", Kind::Image, "py").unwrap();
    eventually("A to see the delete", || {
        a.get("default", Kind::Image, "py")
            .unwrap()
            .is_none()
            .then_some(())
    });
    b.create(image()).unwrap();
    eventually("A to see it again", || {
        a.get("default", Kind::Image, "py").unwrap()
    });
}

/// A change made after a store is opened and before its server registers for changes (the
/// server lists everything in between) is still reported: the store listens from its opening.
#[test]
fn a_change_between_opening_and_listening_is_not_missed() {
    use dispatch_core::{Kind, Object};
    use dispatch_store::ResourceStore;
    let (_pg, _url, s) = servers("early", 2);
    let [a, b]: [PgStore; 2] = s.try_into().ok().unwrap();
    b.create(Object::new(
        Kind::Image,
        "default",
        "early",
        serde_json::json!({"baseImage": "python3"}),
    ))
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    a.on_external_change(Box::new(move |c| {
        let _ = tx.send(c.name);
    }));
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the early change");
    assert_eq!(got, "early");
}

/// After a quiet while (longer than the listener's half-second wait), a change is still
/// heard: the listener once kept an elapsed timer and then neither waited nor read.
#[test]
fn a_change_after_a_quiet_while_is_heard() {
    use dispatch_core::{Kind, Object};
    use dispatch_store::ResourceStore;
    let (_pg, _url, s) = servers("quiet", 2);
    let [a, b]: [PgStore; 2] = s.try_into().ok().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    a.on_external_change(Box::new(move |c| {
        let _ = tx.send(c.name);
    }));
    for name in ["one", "two"] {
        // A quiet while, three times the listener's wait: nothing is told meanwhile.
        assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err());
        b.create(Object::new(
            Kind::Image,
            "default",
            name,
            serde_json::json!({"baseImage": "python3"}),
        ))
        .unwrap();
        let got = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the change");
        assert_eq!(got, name);
    }
}
