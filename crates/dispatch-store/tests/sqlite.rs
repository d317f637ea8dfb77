//! The SQLite store on a real file in a temporary directory.

use dispatch_core::envelope::null_raw;
use dispatch_core::{Kind, Object, Phase, Run, RunStatus, Status, Trigger};
use dispatch_store::{RunFilter, SqliteStore, Store, StoreError};
use serde_json::json;

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("dispatch.db")).unwrap();
    (dir, s)
}

fn image(name: &str) -> Object {
    Object::new(
        Kind::Image,
        "default",
        name,
        json!({"baseImage": "python3"}),
    )
}

fn run(id: &str, function: &str, status: RunStatus) -> Run {
    let mut r = Run::new(
        id.into(),
        "default",
        function,
        Trigger::Exec,
        null_raw(),
        jiff::Timestamp::now(),
    );
    r.status = status;
    r.attempts = 1;
    if status.is_final() {
        r.finished_at = Some(jiff::Timestamp::now());
    }
    r
}

#[test]
fn active_runs_callbacks_purge_and_retention() {
    let (_d, s) = store();
    let mut cb = run("01D", "hello", RunStatus::Succeeded);
    cb.callback = Some(dispatch_core::Callback {
        url: "http://x".into(),
        state: dispatch_core::CallbackState::Pending,
        attempts: 0,
        last_error: None,
    });
    let mut old = run("01E", "old", RunStatus::Dead);
    old.finished_at = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 30));
    s.put_runs(&[
        run("01A", "hello", RunStatus::Queued),
        run("01B", "hello", RunStatus::Running),
        run("01C", "hello", RunStatus::Succeeded),
        cb,
        old,
    ])
    .unwrap();
    let ids = |v: Vec<Run>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(s.active_runs().unwrap()), ["01A", "01B"]);
    assert_eq!(ids(s.pending_callbacks().unwrap()), ["01D"]);
    // Retention: older than a week goes; then at most 1 finished run per function stays.
    let week_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 7);
    assert_eq!(s.prune_runs(week_ago, 1000).unwrap(), 1);
    assert_eq!(
        s.prune_runs(week_ago, 1).unwrap(),
        1,
        "01C is beyond the newest finished run of hello"
    );
    assert!(s.get_run("default", "01C").unwrap().is_none());
    assert!(s.get_run("default", "01D").unwrap().is_some());
    // Purge removes finished runs only.
    assert_eq!(s.purge_runs("default", Some("hello"), None).unwrap(), 1);
    assert_eq!(ids(s.active_runs().unwrap()), ["01A", "01B"]);
    assert_eq!(
        s.purge_runs("default", None, Some(RunStatus::Queued))
            .unwrap(),
        0
    );
}

#[test]
fn create_sets_metadata_and_rejects_duplicates() {
    let (_d, s) = store();
    let created = s.create(image("python3")).unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.metadata.resource_version.as_deref(), Some("1"));
    assert!(created.metadata.uid.is_some() && created.metadata.created_at.is_some());
    let err = s.create(image("python3")).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "image \"python3\" already exists in namespace \"default\""
    );
}

#[test]
fn update_bumps_generation_only_on_spec_change_and_checks_versions() {
    let (_d, s) = store();
    let created = s.create(image("a")).unwrap();
    let same = s.update(created.clone()).unwrap();
    assert_eq!(same.metadata.generation, Some(1));
    assert_eq!(same.metadata.resource_version.as_deref(), Some("2"));
    let mut changed = same.clone();
    changed.spec = json!({"baseImage": "nodejs"});
    let changed = s.update(changed).unwrap();
    assert_eq!(changed.metadata.generation, Some(2));
    // `created` carries resourceVersion 1, now stale.
    let err = s.update(created).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
}

#[test]
fn status_updates_keep_spec_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dispatch.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.create(image("a")).unwrap();
        let mut st = Status::phase(Phase::Ready);
        st.digest = Some("sha256:x".into());
        s.update_status("default", Kind::Image, "a", st).unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let got = s.get("default", Kind::Image, "a").unwrap().unwrap();
    assert_eq!(got.status.phase, Some(Phase::Ready));
    assert_eq!(got.spec, json!({"baseImage": "python3"}));
    assert_eq!(s.list(Some("default"), Kind::Image).unwrap().len(), 1);
    assert_eq!(s.list(Some("other"), Kind::Image).unwrap().len(), 0);
    assert_eq!(s.list(None, Kind::Function).unwrap().len(), 0);
}

#[test]
fn delete_returns_the_object_and_then_not_found() {
    let (_d, s) = store();
    s.create(image("a")).unwrap();
    assert_eq!(s.delete("default", Kind::Image, "a").unwrap().name(), "a");
    assert!(matches!(
        s.delete("default", Kind::Image, "a").unwrap_err(),
        StoreError::NotFound { .. }
    ));
}

#[test]
fn runs_filter_by_function_and_status_newest_first() {
    let (_d, s) = store();
    s.put_runs(&[
        run("01A", "hello", RunStatus::Succeeded),
        run("01B", "hello", RunStatus::Failed),
        run("01C", "other", RunStatus::Succeeded),
    ])
    .unwrap();
    let all = s.list_runs("default", &RunFilter::default()).unwrap();
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["01C", "01B", "01A"]
    );
    let hello = RunFilter {
        function: Some("hello".into()),
        ..Default::default()
    };
    assert_eq!(s.list_runs("default", &hello).unwrap().len(), 2);
    let failed = RunFilter {
        status: Some(RunStatus::Failed),
        ..Default::default()
    };
    assert_eq!(s.list_runs("default", &failed).unwrap()[0].id, "01B");
    assert!(s.get_run("default", "01A").unwrap().is_some());
    assert!(s.get_run("other-ns", "01A").unwrap().is_none());
    assert_eq!(s.delete_runs_of("default", "hello").unwrap(), 2);
    assert_eq!(
        s.list_runs("default", &RunFilter::default()).unwrap().len(),
        1
    );
}
