//! The store contract, on both stores: SQLite on a real file in a temporary directory, and
//! a real PostgreSQL (`dispatch_testkit::postgres`, one server for the run, a database per
//! check). What only one of them has (SQLite's query plans, page compaction, reopening a
//! file) is tested on it alone.

use dispatch_core::envelope::null_raw;
use dispatch_core::events::{Delivery, DeliveryState, StoredEvent};
use dispatch_core::{Kind, Object, Phase, Run, RunStatus, Status, Trigger};
use dispatch_store::{
    FunctionUsage, PgOptions, PgStore, RecordStore, Redeliver, ResourceStore, Retention, RunFilter,
    SqliteStore, Store, StoreError,
};
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

fn active_runs_callbacks_purge_and_retention<S: Store>(s: &S) {
    // Run ids are ULIDs: their time is the run's creation time (what age retention reads).
    let now = jiff::Timestamp::now().as_millisecond() as u64;
    let id =
        |days_ago: u64, n: u128| ulid::Ulid::from_parts(now - days_ago * 86_400_000, n).to_string();
    let (a, b, c, d, e) = (id(0, 1), id(0, 2), id(0, 3), id(0, 4), id(30, 5));
    let mut cb = run(&d, "hello", RunStatus::Succeeded);
    cb.callback = Some(dispatch_core::Callback {
        url: "http://x".into(),
        state: dispatch_core::CallbackState::Pending,
        attempts: 0,
        last_error: None,
    });
    s.put_runs(&[
        run(&a, "hello", RunStatus::Queued),
        run(&b, "hello", RunStatus::Running),
        run(&c, "hello", RunStatus::Succeeded),
        cb,
        run(&e, "old", RunStatus::Dead),
    ])
    .unwrap();
    let ids = |v: Vec<Run>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(s.active_runs().unwrap()), [a.clone(), b.clone()]);
    assert_eq!(
        ids(s.pending_callbacks().unwrap()),
        std::slice::from_ref(&d)
    );
    // Retention: created over a week ago goes; then at most 1 finished run per function stays.
    let week_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 7);
    let rules = |keep| Retention {
        created_before: week_ago,
        keep_per_function: keep,
        max_bytes_per_namespace: None,
        budgets: Default::default(),
        kept: Default::default(),
    };
    assert_eq!(s.prune_runs(&rules(1000), 100).unwrap(), 1);
    assert!(s.get_run("default", &e).unwrap().is_none());
    assert_eq!(
        s.prune_runs(&rules(1), 100).unwrap(),
        1,
        "c is beyond the newest finished run of hello"
    );
    assert!(s.get_run("default", &c).unwrap().is_none());
    assert!(s.get_run("default", &d).unwrap().is_some());
    // Purge removes finished runs only.
    assert_eq!(s.purge_runs("default", Some("hello"), None).unwrap(), 1);
    assert_eq!(ids(s.active_runs().unwrap()), [a, b]);
    assert_eq!(
        s.purge_runs("default", None, Some(RunStatus::Queued))
            .unwrap(),
        0
    );
}

fn create_sets_metadata_and_rejects_duplicates<S: Store>(s: &S) {
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

fn update_bumps_generation_only_on_spec_change_and_checks_versions<S: Store>(s: &S) {
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

fn delete_returns_the_object_and_then_not_found<S: Store>(s: &S) {
    s.create(image("a")).unwrap();
    assert_eq!(s.delete("default", Kind::Image, "a").unwrap().name(), "a");
    assert!(matches!(
        s.delete("default", Kind::Image, "a").unwrap_err(),
        StoreError::NotFound { .. }
    ));
}

fn runs_filter_by_function_and_status_newest_first<S: Store>(s: &S) {
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

/// A run of `function` created `ms` milliseconds after the epoch of the test, finished.
fn run_at(ms: u64, seq: u16, function: &str, status: RunStatus, pad: usize) -> Run {
    let id = ulid::Ulid::from_parts(1_700_000_000_000 + ms, seq as u128).to_string();
    let mut r = run(&id, function, status);
    r.input = serde_json::value::to_raw_value(&noise(pad, ms + seq as u64)).unwrap();
    r
}

/// `len` letters that do not compress (sync calls' history is stored compressed, and these
/// tests measure what records take on disk).
fn noise(len: usize, seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (b'a' + ((x >> 33) % 26) as u8) as char
        })
        .collect()
}

fn usage(s: &impl RecordStore) -> (u64, u64, u64) {
    let u = s.run_usage().unwrap();
    let d = u
        .iter()
        .find(|u| u.namespace == "default")
        .cloned()
        .unwrap_or_default();
    (d.runs, d.finished, d.bytes)
}

fn usage_is_kept_by_every_write_and_delete<S: Store>(s: &S) {
    // An async run: the only kind whose record is written again (its next states).
    let mut a = run_at(1, 0, "f", RunStatus::Queued, 10);
    a.finished_at = None;
    a.is_async = true;
    let b = run_at(2, 0, "f", RunStatus::Succeeded, 10);
    s.put_runs(&[a.clone(), b.clone()]).unwrap();
    let (runs, finished, bytes) = usage(s);
    assert_eq!((runs, finished), (2, 1));
    let stored = |r: &Run| serde_json::to_string(r).unwrap().len() as u64;
    assert_eq!(bytes, stored(&a) + stored(&b));
    // The queued run finishes with a bigger output: an update, not a second row.
    a.status = RunStatus::Succeeded;
    a.finished_at = Some(jiff::Timestamp::now());
    a.output = Some(serde_json::value::to_raw_value(&"y".repeat(100)).unwrap());
    s.put_runs(&[a.clone()]).unwrap();
    let (runs, finished, bytes) = usage(s);
    assert_eq!((runs, finished), (2, 2));
    assert_eq!(bytes, stored(&a) + stored(&b));
    assert_eq!(s.purge_runs("default", Some("f"), None).unwrap(), 2);
    assert_eq!(usage(s), (0, 0, 0));
}

fn retention_deletes_in_batches_by_age_count_and_bytes<S: Store>(s: &S) {
    // 50 finished runs of `a` (1 KiB inputs), 10 of `b`, 1 queued of `a`.
    let mut all: Vec<Run> = (0..50)
        .map(|i| run_at(10 + i, 0, "a", RunStatus::Succeeded, 1024))
        .collect();
    all.extend((0..10).map(|i| run_at(100 + i, 0, "b", RunStatus::Failed, 1024)));
    let mut queued = run_at(5, 0, "a", RunStatus::Queued, 1024);
    queued.finished_at = None;
    all.push(queued.clone());
    s.put_runs(&all).unwrap();
    // Before the runs' ids (2023): age keeps them all.
    let long_ago = jiff::Timestamp::from_millisecond(1_600_000_000_000).unwrap();
    // Count: `a` keeps its newest 20 finished; no step deletes more than its batch.
    let rules = Retention {
        created_before: long_ago,
        keep_per_function: 20,
        max_bytes_per_namespace: None,
        budgets: Default::default(),
        kept: Default::default(),
    };
    assert_eq!(s.prune_runs(&rules, 7).unwrap(), 7);
    let mut total = 7;
    loop {
        let n = s.prune_runs(&rules, 7).unwrap();
        assert!(n <= 7);
        total += n;
        if n < 7 {
            break;
        }
    }
    assert_eq!(total, 30);
    let kept = s
        .list_runs(
            "default",
            &RunFilter {
                function: Some("a".into()),
                limit: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(kept.len(), 21, "20 finished + the queued one");
    assert_eq!(kept[0].id, all[49].id, "the newest are kept");
    assert!(
        kept.iter().any(|r| r.id == queued.id),
        "active runs are never pruned"
    );
    // Shared bounds: another store holds 15 finished runs of `a` and 4 KiB of the namespace's
    // records, so `a` keeps 5 here; `b` (10 finished) stays within its 20.
    let per_fn = |f: &str| {
        s.function_usage()
            .unwrap()
            .into_iter()
            .find(|u| u.function == f)
            .unwrap()
    };
    assert_eq!((per_fn("a").finished, per_fn("b").finished), (20, 10));
    let elsewhere = [FunctionUsage {
        namespace: "default".into(),
        function: "a".into(),
        finished: 15,
        bytes: 4096,
    }];
    let shared = rules.less(&elsewhere);
    assert_eq!(
        (
            shared.keep_of("default", "a"),
            shared.keep_of("default", "b")
        ),
        (5, 20)
    );
    assert_eq!(
        Retention {
            max_bytes_per_namespace: Some(10_000),
            ..rules.clone()
        }
        .less(&elsewhere)
        .budget_of("default"),
        Some(10_000 - 4096)
    );
    while s.prune_runs(&shared, 7).unwrap() == 7 {}
    assert_eq!((per_fn("a").finished, per_fn("b").finished), (5, 10));
    assert_eq!(kept[0].id, all[49].id, "the newest of `a` is still there");
    assert!(s.get_run("default", &all[49].id).unwrap().is_some());
    // Bytes: a budget of ~10 records' worth leaves the newest finished that fit.
    let one = serde_json::to_string(&all[0]).unwrap().len() as u64;
    let rules = Retention {
        max_bytes_per_namespace: Some(one * 10),
        ..rules.clone()
    };
    while s.prune_runs(&rules, 5).unwrap() == 5 {}
    let (runs, _, bytes) = usage(s);
    assert!(bytes <= one * 10, "{bytes} > {}", one * 10);
    assert!(bytes > one * 8, "no more than needed went: {bytes}");
    assert!(s.get_run("default", &queued.id).unwrap().is_some());
    assert!(
        s.get_run("default", &all[59].id).unwrap().is_some(),
        "the newest stays"
    );
    assert_eq!(
        runs as usize,
        s.list_runs(
            "default",
            &RunFilter {
                limit: Some(1000),
                ..Default::default()
            }
        )
        .unwrap()
        .len()
    );
    // A namespace's own budget comes before the server's.
    let own = Retention {
        budgets: [("default".to_string(), one * 5)].into(),
        kept: Default::default(),
        ..rules.clone()
    };
    while s.prune_runs(&own, 5).unwrap() == 5 {}
    let (_, _, bytes) = usage(s);
    assert!(
        bytes <= one * 5,
        "the namespace's own budget: {bytes} > {}",
        one * 5
    );
    assert!(bytes > one * 3, "no more than needed went: {bytes}");
    // Age.
    let rules = Retention {
        created_before: jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
        keep_per_function: 1000,
        max_bytes_per_namespace: None,
        budgets: Default::default(),
        kept: Default::default(),
    };
    while s.prune_runs(&rules, 3).unwrap() == 3 {}
    assert_eq!(usage(s).0, 1, "only the queued run is left");
}

/// SQLite: after the retention above, freed pages go back to the file system, at most as
/// many as asked each time (PostgreSQL's autovacuum does this itself).
#[test]
fn pruned_pages_go_back_to_the_file_system() {
    let (_d, s) = store();
    retention_deletes_in_batches_by_age_count_and_bytes(&s);
    assert_eq!(s.compact(2).unwrap(), 2);
    let released = s.compact(u64::MAX).unwrap();
    assert!(released > 10, "the pruned runs' pages: {released}");
    assert_eq!(s.compact(u64::MAX).unwrap(), 0);
}

fn pagination_returns_every_run_once_and_windows_by_time<S: Store>(s: &S) {
    let statuses = [RunStatus::Succeeded, RunStatus::Failed];
    let mut all = Vec::new();
    for i in 0..95u64 {
        // Several runs per millisecond, two functions, two statuses.
        let f = if i % 3 == 0 { "x" } else { "y" };
        all.push(run_at(
            i / 4,
            (i % 4) as u16,
            f,
            statuses[(i % 2) as usize],
            1,
        ));
    }
    s.put_runs(&all).unwrap();
    let page = |after: Option<String>, f: &RunFilter| {
        s.list_runs(
            "default",
            &RunFilter {
                after,
                limit: Some(10),
                ..f.clone()
            },
        )
        .unwrap()
    };
    for filter in [
        RunFilter::default(),
        RunFilter {
            function: Some("y".into()),
            ..Default::default()
        },
        RunFilter {
            function: Some("x".into()),
            status: Some(RunStatus::Failed),
            ..Default::default()
        },
    ] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let p = page(after.clone(), &filter);
            if p.is_empty() {
                break;
            }
            after = p.last().map(|r| r.id.clone());
            seen.extend(p.into_iter().map(|r| r.id));
        }
        let mut want: Vec<String> = all
            .iter()
            .filter(|r| filter.function.as_ref().is_none_or(|f| &r.function == f))
            .filter(|r| filter.status.is_none_or(|st| r.status == st))
            .map(|r| r.id.clone())
            .collect();
        want.sort();
        want.reverse();
        assert_eq!(seen, want, "{filter:?}");
    }
    // A window of time: runs created in [5 ms, 10 ms).
    let t = |ms: u64| jiff::Timestamp::from_millisecond((1_700_000_000_000 + ms) as i64).unwrap();
    let w = s
        .list_runs(
            "default",
            &RunFilter {
                since: Some(t(5)),
                until: Some(t(10)),
                limit: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(w.len(), 20);
}

/// Sync calls' records written in batches whose ids interleave (a slow call is recorded
/// after quicker ones that started later): SQLite keeps each batch of a function as one
/// chunk, so chunks' id ranges overlap. Listing, look-ups, pagination, retention by count and
/// by age, and deletes still see each run once, in id order, beside rows (failed calls).
fn interleaved_batches_list_and_prune_in_id_order<S: Store>(s: &S) {
    let mut all = Vec::new();
    for batch in 0..6u64 {
        let mut b = Vec::new();
        for i in 0..20u64 {
            // Batch k holds runs k, k+6, k+12, ...: every batch spans nearly all the time.
            let n = batch + 6 * i;
            let status = if n % 10 == 9 {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            };
            let f = if n % 2 == 0 { "even" } else { "odd" };
            b.push(run_at(n, 0, f, status, 40));
        }
        s.put_runs(&b).unwrap();
        all.extend(b);
    }
    all.sort_by(|a, b| b.id.cmp(&a.id));
    let ids = |v: &[Run]| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let list = |f: RunFilter| s.list_runs("default", &f).unwrap();
    // Newest first, each once, across chunks and rows; pages of 7.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = list(RunFilter {
            after: after.clone(),
            limit: Some(7),
            ..Default::default()
        });
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| r.id.clone());
        seen.extend(ids(&page));
    }
    assert_eq!(seen, ids(&all));
    let odd: Vec<Run> = all
        .iter()
        .filter(|r| r.function == "odd")
        .cloned()
        .collect();
    assert_eq!(
        ids(&list(RunFilter {
            function: Some("odd".into()),
            limit: Some(13),
            ..Default::default()
        })),
        ids(&odd[..13])
    );
    let ok: Vec<Run> = all
        .iter()
        .filter(|r| r.status == RunStatus::Succeeded)
        .cloned()
        .collect();
    assert_eq!(
        ids(&list(RunFilter {
            status: Some(RunStatus::Succeeded),
            limit: Some(1000),
            ..Default::default()
        })),
        ids(&ok)
    );
    for r in &all {
        let got = s
            .get_run("default", &r.id)
            .unwrap()
            .expect("every run is found");
        assert_eq!(
            serde_json::to_string(&got).unwrap(),
            serde_json::to_string(r).unwrap()
        );
    }
    // Count: `odd` keeps exactly its newest 25, whichever chunks they are in; no step over
    // its batch.
    let rules = Retention {
        created_before: jiff::Timestamp::from_millisecond(1_600_000_000_000).unwrap(),
        keep_per_function: 1000,
        max_bytes_per_namespace: None,
        budgets: Default::default(),
        kept: [(("default".to_string(), "odd".to_string()), 25)].into(),
    };
    loop {
        let n = s.prune_runs(&rules, 4).unwrap();
        assert!(n <= 4);
        if n == 0 {
            break;
        }
    }
    let kept = list(RunFilter {
        function: Some("odd".into()),
        limit: Some(1000),
        ..Default::default()
    });
    assert_eq!(ids(&kept), ids(&odd[..25]));
    assert_eq!(
        list(RunFilter {
            function: Some("even".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .len(),
        60
    );
    // Age: everything created before run 50's time goes, runs 50.. stay.
    let rules = Retention {
        created_before: jiff::Timestamp::from_millisecond(1_700_000_000_050).unwrap(),
        ..rules
    };
    while s.prune_runs(&rules, 9).unwrap() > 0 {}
    let left = list(RunFilter {
        limit: Some(1000),
        ..Default::default()
    });
    let bound = ulid::Ulid::from_parts(1_700_000_000_050, 0).to_string();
    let want: Vec<Run> = all
        .iter()
        .filter(|r| r.id >= bound)
        .filter(|r| r.function == "even" || odd[..25].iter().any(|o| o.id == r.id))
        .cloned()
        .collect();
    assert_eq!(ids(&left), ids(&want));
    let u = usage(s);
    assert_eq!(u.0 as usize, want.len(), "usage counts what is left");
    assert_eq!(
        u.2,
        want.iter()
            .map(|r| serde_json::to_string(r).unwrap().len() as u64)
            .sum::<u64>(),
        "usage counts the records' bytes"
    );
    // A function's delete takes its chunks and rows.
    assert_eq!(
        s.delete_runs_of("default", "even").unwrap() as usize,
        want.iter().filter(|r| r.function == "even").count()
    );
    assert!(
        list(RunFilter {
            function: Some("even".into()),
            ..Default::default()
        })
        .is_empty()
    );
}

/// A batch whose calls started far apart (a 30-second call recorded beside quick ones): each
/// is found by id and listed once (SQLite cuts such a batch into chunks of a short span, and
/// looks an id up among the chunks that end shortly after it).
fn a_batch_spread_over_time_is_found_by_id<S: Store>(s: &S) {
    let mut batch: Vec<Run> = [0u64, 10, 30_000, 30_001, 90_000]
        .iter()
        .map(|&ms| run_at(ms, 0, "f", RunStatus::Succeeded, 8))
        .collect();
    // An id that is not a ULID (no time to read from it) in the same batch, sorting first.
    batch.insert(0, run("00-not-a-ulid", "f", RunStatus::Succeeded));
    s.put_runs(&batch).unwrap();
    for r in &batch {
        let got = s.get_run("default", &r.id).unwrap();
        assert_eq!(got.map(|g| g.id), Some(r.id.clone()));
    }
    let listed = s
        .list_runs(
            "default",
            &RunFilter {
                limit: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
    let mut want: Vec<String> = batch.iter().map(|r| r.id.clone()).collect();
    want.reverse();
    assert_eq!(listed.into_iter().map(|r| r.id).collect::<Vec<_>>(), want);
    assert!(
        s.get_run(
            "default",
            &ulid::Ulid::from_parts(1_700_000_000_020, 0).to_string()
        )
        .unwrap()
        .is_none()
    );
}

#[test]
fn listing_and_pruning_runs_use_an_index() {
    let (_d, s) = store();
    for filter in [
        RunFilter {
            function: Some("f".into()),
            ..Default::default()
        },
        RunFilter {
            status: Some(RunStatus::Failed),
            ..Default::default()
        },
        RunFilter {
            function: Some("f".into()),
            status: Some(RunStatus::Failed),
            after: Some("01K".into()),
            ..Default::default()
        },
    ] {
        let plan = s.list_runs_plan("default", &filter).unwrap().join("; ");
        assert!(
            plan.contains("USING INDEX") || plan.contains("USING COVERING INDEX"),
            "{filter:?}: {plan}"
        );
        assert!(
            !plan.contains("TEMP B-TREE"),
            "{filter:?} sorts in memory: {plan}"
        );
    }
    let plan = s
        .list_runs_plan(
            "default",
            &RunFilter {
                function: Some("f".into()),
                status: Some(RunStatus::Failed),
                ..Default::default()
            },
        )
        .unwrap()
        .join("; ");
    assert!(plan.contains("runs_by_function_status"), "{plan}");
    // All runs of a namespace.
    let plan = s
        .list_runs_plan("default", &RunFilter::default())
        .unwrap()
        .join("; ");
    assert!(
        plan.contains("runs_by_namespace") && !plan.contains("TEMP B-TREE"),
        "{plan}"
    );
    // Sync calls' history chunks: newest first by their largest id, of a function or of the
    // namespace, from an index and without a sort.
    let plan = s
        .list_runs_plan(
            "default",
            &RunFilter {
                function: Some("f".into()),
                after: Some("01K".into()),
                ..Default::default()
            },
        )
        .unwrap()
        .join("; ");
    assert!(plan.contains("run_chunks_newest_of_function"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    // Pruning by age, count and bytes reads an index in order (the primary key's range,
    // runs_by_function, runs_by_namespace, and the chunks' by their smallest id), never the
    // whole table or a sort.
    let plans = s.prune_plans().unwrap();
    assert_eq!(plans.len(), 6);
    for (plan, index) in plans.iter().zip([
        "sqlite_autoindex_runs_1",
        "runs_by_function",
        "runs_by_namespace",
        "run_chunks_by_age",
        "run_chunks_oldest_of_function",
        "run_chunks_oldest",
    ]) {
        assert!(plan.contains(index), "{plan}");
        assert!(
            !plan.contains("SCAN") && !plan.contains("TEMP B-TREE"),
            "{plan}"
        );
    }
}

/// `dispatch runs purge` is how an operator makes room on a full disk (the fault matrix's
/// disk-full row): the purged runs' space goes back to the file system at once, not into
/// SQLite's free pages and a write-ahead log grown by the purge itself.
#[test]
fn purging_runs_gives_their_space_back_to_the_file_system() {
    let (d, s) = store();
    let on_disk = || -> u64 {
        ["dispatch.db", "dispatch.db-wal"]
            .iter()
            .map(|f| std::fs::metadata(d.path().join(f)).map_or(0, |m| m.len()))
            .sum()
    };
    let runs: Vec<Run> = (0..40)
        .map(|i| run_at(i, 0, "big", RunStatus::Succeeded, 256 * 1024))
        .collect();
    for r in &runs {
        s.put_runs(std::slice::from_ref(r)).unwrap();
    }
    // The WAL reset first, so that what is measured is the records' space.
    s.purge_runs("default", Some("none"), None).unwrap();
    let full = on_disk();
    assert!(full > 10 << 20, "40 runs of 256 KiB: {full}");
    assert_eq!(s.purge_runs("default", Some("big"), None).unwrap(), 40);
    let after = on_disk();
    assert!(
        after < 2 << 20,
        "purged 40 runs of 256 KiB: {full} bytes on disk before, {after} after"
    );
}

fn event_with(id: &str, matched: Vec<dispatch_core::events::Delivery>) -> StoredEvent {
    let now = jiff::Timestamp::now();
    StoredEvent {
        namespace: "default".into(),
        event: serde_json::from_value(json!({
            "specversion": "1.0", "id": id, "source": "/shop", "type": "order.created"
        }))
        .unwrap(),
        received_at: now,
        matched,
        expires_at: now + jiff::SignedDuration::from_hours(1),
        pending: false,
    }
}

fn delivery(sub: &str, state: DeliveryState, run_id: Option<&str>) -> Delivery {
    Delivery {
        subscription: sub.into(),
        function: format!("f-{sub}"),
        state,
        run_id: run_id.map(str::to_string),
        error: None,
        attempts: 0,
    }
}

fn find(s: &impl RecordStore, id: &str) -> StoredEvent {
    s.list_events("default", None, false, 10)
        .unwrap()
        .into_iter()
        .find(|e| e.event.id == id)
        .unwrap()
}

/// An event, its queued runs and its pending deliveries are stored together or not at all;
/// a pending delivery is queued later (its run stored, its event updated), dies, and is
/// redelivered; events with a pending or dead delivery outlive their TTL.
fn events_are_stored_with_their_deliveries_and_runs_in_one_transaction<S: Store>(s: &S) {
    let r1 = run(&ulid::Ulid::new().to_string(), "f-a", RunStatus::Queued);
    let e = event_with(
        "e1",
        vec![
            delivery("a", DeliveryState::Queued, Some(&r1.id)),
            delivery("b", DeliveryState::Pending, None),
            delivery("c", DeliveryState::Pending, None),
        ],
    );
    assert_eq!(
        s.ingest_events(&[(e.clone(), vec![r1.clone()])], false)
            .unwrap(),
        [true]
    );
    assert!(s.get_run("default", &r1.id).unwrap().is_some());
    // A duplicate stores nothing: not its runs either.
    let r2 = run(&ulid::Ulid::new().to_string(), "f-a", RunStatus::Queued);
    let other = event_with("e2", vec![]);
    assert_eq!(
        s.ingest_events(&[(e.clone(), vec![r2.clone()]), (other, vec![])], false)
            .unwrap(),
        [false, true],
        "in one batch, the duplicate alone is dropped"
    );
    assert!(s.get_run("default", &r2.id).unwrap().is_none());
    let counts = s.delivery_counts().unwrap();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(
        counts
            .iter()
            .all(|c| c.count == 1 && c.state == DeliveryState::Pending)
    );
    let undelivered = s.list_events("default", None, true, 10).unwrap();
    assert_eq!(undelivered.len(), 1);
    let b = s.pending_deliveries("default", "b", 10).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].1.as_ref().unwrap().event.id, "e1", "with its event");
    let b: Vec<_> = b.into_iter().map(|(d, _)| d).collect();
    assert_eq!((b[0].index, b[0].function.as_str()), (1, "f-b"));
    // b is queued later.
    let rb = run(&ulid::Ulid::new().to_string(), "f-b", RunStatus::Queued);
    s.deliver(&[(b[0].clone(), rb.clone())]).unwrap();
    assert!(s.pending_deliveries("default", "b", 10).unwrap().is_empty());
    assert!(s.get_run("default", &rb.id).unwrap().is_some());
    let stored = &find(s, "e1");
    assert_eq!(stored.matched[1].state, DeliveryState::Queued);
    assert_eq!(stored.matched[1].run_id.as_deref(), Some(rb.id.as_str()));
    // c dies: kept, listed, and outlives the event's TTL until its own retention ends.
    let mut c = s
        .pending_deliveries("default", "c", 10)
        .unwrap()
        .remove(0)
        .0;
    c.state = DeliveryState::Dead;
    c.attempts = 7;
    c.last_error = Some("queue full".into());
    c.expires_at = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    s.update_delivery(&c).unwrap();
    let stored = &s.list_events("default", None, true, 10).unwrap()[0];
    assert_eq!(stored.matched[2].state, DeliveryState::Dead);
    assert_eq!(stored.matched[2].attempts, 7);
    assert_eq!(stored.matched[0], e.matched[0], "the others are untouched");
    let past_ttl = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(2);
    assert_eq!(
        s.prune_events(past_ttl).unwrap(),
        1,
        "e2 goes; a dead delivery keeps e1"
    );
    assert_eq!(find(s, "e1").event.id, "e1");
    // Redelivered: pending again, with a new TTL.
    assert_eq!(
        s.redeliver(
            "default",
            &Redeliver::Event {
                id: "e1".into(),
                source: None
            },
            past_ttl
        )
        .unwrap()
        .len(),
        1
    );
    let c: Vec<_> = s
        .pending_deliveries("default", "c", 10)
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!((c.len(), c[0].attempts), (1, 0));
    assert_eq!(find(s, "e1").matched[2].state, DeliveryState::Pending);
    // Queued: the event is delivered and goes at its TTL.
    let rc = run(&ulid::Ulid::new().to_string(), "f-c", RunStatus::Queued);
    s.deliver(&[(c[0].clone(), rc)]).unwrap();
    assert!(s.list_events("default", None, true, 10).unwrap().is_empty());
    assert_eq!(s.prune_events(past_ttl).unwrap(), 1);
    assert!(s.delivery_counts().unwrap().is_empty());
}

/// Job executions (keyed by namespace and id), tokens, the audit log, cron state, drivers'
/// cursors, namespaces and their budgets, and deleting a namespace's records.
fn records_of_every_kind<S: Store>(s: &S) {
    use dispatch_core::auth::{ApiToken, AuditEntry, Role};
    use dispatch_core::{JobExecution, JobPhase};
    let t0 = jiff::Timestamp::from_second(1_700_000_000).unwrap();
    let job = |ns: &str, id: &str, payload: &str| JobExecution {
        uuid: id.into(),
        name: "echo".into(),
        namespace: ns.into(),
        phase: JobPhase::Waiting,
        reason: String::new(),
        payload: payload.into(),
        rendered: serde_json::Value::Null,
        images: vec![],
        runtime: dispatch_core::jobs::JobRuntime::Host,
        attempts: 0,
        exit_code: None,
        logs: Default::default(),
        created_at: t0,
        started_at: None,
        finished_at: None,
        expires_at: None,
        replica: None,
        trace: None,
    };
    assert!(s.insert_job(&job("a", "nightly", "1")).unwrap());
    assert!(
        s.insert_job(&job("b", "nightly", "2")).unwrap(),
        "names are per namespace"
    );
    assert!(!s.insert_job(&job("a", "nightly", "3")).unwrap());
    let mut done = job("a", "nightly", "1");
    done.phase = JobPhase::Completed;
    done.expires_at = Some(t0);
    s.put_job(&done).unwrap();
    assert_eq!(s.get_job("b", "nightly").unwrap().unwrap().payload, "2");
    assert_eq!(s.active_jobs().unwrap().len(), 1);
    assert_eq!(s.list_jobs("a", Some("echo"), 10).unwrap().len(), 1);
    assert_eq!(s.prune_jobs(t0).unwrap(), 1);
    assert!(s.get_job("a", "nightly").unwrap().is_none());
    assert_eq!(s.delete_jobs("b", "echo").unwrap(), 1);

    let token = |name: &str, hash: &str| ApiToken {
        name: name.into(),
        role: Role::Admin,
        namespace: "*".into(),
        hash: hash.into(),
        created_at: t0,
        expires_at: None,
    };
    assert!(s.put_token(&token("ci", "sha256:1")).unwrap());
    assert!(
        !s.put_token(&token("ci", "sha256:2")).unwrap(),
        "the name is taken"
    );
    assert!(
        !s.put_token(&token("other", "sha256:1")).unwrap(),
        "the hash is taken"
    );
    assert_eq!(s.list_tokens().unwrap().len(), 1);
    assert!(s.delete_token("ci").unwrap());
    assert!(!s.delete_token("ci").unwrap());

    let entry = |path: &str| AuditEntry {
        at: t0,
        who: "-".into(),
        method: "POST".into(),
        path: path.into(),
        status: 201,
    };
    s.append_audit(&[entry("/1"), entry("/2")]).unwrap();
    s.append_audit(&[entry("/3")]).unwrap();
    let paths: Vec<String> = s
        .list_audit(2)
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(paths, ["/3", "/2"], "newest first");

    assert_eq!(s.cron_last_fire("a", "tick").unwrap(), None);
    s.set_cron_last_fire("a", "tick", Some(t0)).unwrap();
    s.set_cron_last_fire("a", "tick", Some(t0 + jiff::SignedDuration::from_secs(60)))
        .unwrap();
    assert_eq!(
        s.cron_last_fire("a", "tick").unwrap(),
        Some(t0 + jiff::SignedDuration::from_secs(60))
    );
    s.set_driver_cursor("a", "kafka", "t/0", 41).unwrap();
    s.set_driver_cursor("a", "kafka", "t/0", 42).unwrap();
    assert_eq!(s.driver_cursor("a", "kafka", "t/0").unwrap(), Some(42));
    s.forget_driver("a", "tick").unwrap();
    assert_eq!(s.cron_last_fire("a", "tick").unwrap(), None);
    assert_eq!(s.driver_cursor("a", "kafka", "t/0").unwrap(), Some(42));
    s.delete_records_of("a").unwrap();
    assert_eq!(s.driver_cursor("a", "kafka", "t/0").unwrap(), None);

    assert!(s.put_namespace("team", t0).unwrap());
    assert!(!s.put_namespace("team", t0).unwrap());
    s.set_run_history_budget("team", Some(1 << 20), t0).unwrap();
    s.set_run_history_budget("new", None, t0).unwrap();
    let ns = s.list_namespaces().unwrap();
    assert_eq!(
        ns.iter()
            .map(|n| (n.name.as_str(), n.run_history_budget))
            .collect::<Vec<_>>(),
        [("new", None), ("team", Some(1 << 20))]
    );
    s.create(Object::new(
        Kind::Image,
        "team",
        "py",
        json!({"baseImage": "python3"}),
    ))
    .unwrap();
    assert!(s.delete_namespace("team").unwrap());
    assert!(s.list(Some("team"), Kind::Image).unwrap().is_empty());
    assert!(!s.delete_namespace("team").unwrap());
}

/// Two states of one async run in one batch (the recorder may gather both): the last is
/// stored, counted once.
fn a_run_twice_in_one_batch_keeps_its_last_state<S: Store>(s: &S) {
    let mut queued = run_at(1, 0, "f", RunStatus::Queued, 10);
    queued.finished_at = None;
    queued.is_async = true;
    let mut done = queued.clone();
    done.status = RunStatus::Succeeded;
    done.finished_at = Some(jiff::Timestamp::now());
    s.put_runs(&[queued.clone(), done.clone()]).unwrap();
    let got = s.get_run("default", &done.id).unwrap().unwrap();
    assert_eq!(got.status, RunStatus::Succeeded);
    let stored = serde_json::to_string(&done).unwrap().len() as u64;
    assert_eq!(usage(s), (1, 1, stored));
    // And a batch that both updates it and adds another.
    let mut again = done.clone();
    again.output = Some(serde_json::value::to_raw_value(&"z".repeat(50)).unwrap());
    let other = run_at(2, 0, "f", RunStatus::Failed, 5);
    s.put_runs(&[again.clone(), other.clone()]).unwrap();
    let size = |r: &Run| serde_json::to_string(r).unwrap().len() as u64;
    assert_eq!(usage(s), (2, 2, size(&again) + size(&other)));
}

/// Function versions: numbered once per digest (the same build again keeps its number), the
/// newest `keep` kept, numbers never given twice, per function;
/// deleting a function's or a namespace's records deletes them.
fn versions_are_numbered_once_per_digest_and_pruned<S: Store>(s: &S) {
    use dispatch_core::versions::FunctionVersion;
    let v = |function: &str, digest: &str| FunctionVersion {
        namespace: "default".into(),
        function: function.into(),
        version: 0,
        digest: digest.into(),
        spec: json!({"image": "py", "source": digest}),
        generation: Some(1),
        created_at: jiff::Timestamp::now(),
        created_by: Some("ci".into()),
    };
    let record = |d: &str| s.record_version(&v("hello", d), 3, &[]).unwrap();
    assert_eq!(record("sha256:a"), 1);
    assert_eq!(record("sha256:b"), 2);
    assert_eq!(
        record("sha256:a"),
        1,
        "a build seen before keeps its number"
    );
    assert_eq!(record("sha256:c"), 3);
    assert_eq!(record("sha256:d"), 4);
    let listed = |f: &str| -> Vec<(u32, String)> {
        s.list_versions("default", f)
            .unwrap()
            .into_iter()
            .map(|v| (v.version, v.digest))
            .collect()
    };
    let want = |pairs: &[(u32, &str)]| -> Vec<(u32, String)> {
        pairs.iter().map(|(n, d)| (*n, d.to_string())).collect()
    };
    assert_eq!(
        listed("hello"),
        want(&[(4, "sha256:d"), (3, "sha256:c"), (2, "sha256:b")])
    );
    let newest = &s.list_versions("default", "hello").unwrap()[0];
    assert_eq!(
        (newest.spec["source"].as_str(), newest.generation),
        (Some("sha256:d"), Some(1))
    );
    // Version 2 deployed again (a rollback to it): its number, nothing removed or added.
    assert_eq!(record("sha256:b"), 2);
    assert_eq!(listed("hello").len(), 3);
    assert_eq!(record("sha256:e"), 5);
    assert_eq!(
        listed("hello"),
        want(&[(5, "sha256:e"), (4, "sha256:d"), (3, "sha256:c")])
    );
    // A build whose version was removed is a new version: numbers are not given again.
    assert_eq!(record("sha256:a"), 6);
    // A version an alias or an endpoint names (pinned) stays past the count.
    assert_eq!(
        s.record_version(&v("hello", "sha256:f"), 3, &[4]).unwrap(),
        7
    );
    assert_eq!(
        listed("hello"),
        want(&[
            (7, "sha256:f"),
            (6, "sha256:a"),
            (5, "sha256:e"),
            (4, "sha256:d")
        ])
    );
    assert_eq!(
        s.list_versions("default", "hello").unwrap()[0]
            .created_by
            .as_deref(),
        Some("ci")
    );
    assert_eq!(record("sha256:g"), 8);
    assert_eq!(listed("hello").len(), 3, "unpinned, version 4 goes");
    // Another function's versions are its own.
    assert_eq!(s.record_version(&v("bye", "sha256:a"), 3, &[]).unwrap(), 1);
    s.delete_versions_of("default", "hello").unwrap();
    assert!(listed("hello").is_empty());
    assert_eq!(record("sha256:z"), 1, "a function made again starts at 1");
    assert_eq!(listed("bye"), want(&[(1, "sha256:a")]));
    s.delete_records_of("default").unwrap();
    assert!(listed("bye").is_empty() && listed("hello").is_empty());
}

/// Each check of the contract, run on SQLite (a test each) and on PostgreSQL (one test: one
/// server, a fresh database per check).
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $check() {
                    let (_d, s) = super::store();
                    super::$check(&s);
                }
            )*
        }

        #[test]
        fn the_contract_on_postgres() {
            let pg = dispatch_testkit::postgres::Postgres::start();
            $(
                let url = pg.create_database(stringify!($check));
                let s = PgStore::connect(&PgOptions::new(url)).unwrap();
                $check(&s);
            )*
        }
    };
}

contract!(
    active_runs_callbacks_purge_and_retention,
    create_sets_metadata_and_rejects_duplicates,
    update_bumps_generation_only_on_spec_change_and_checks_versions,
    delete_returns_the_object_and_then_not_found,
    runs_filter_by_function_and_status_newest_first,
    usage_is_kept_by_every_write_and_delete,
    retention_deletes_in_batches_by_age_count_and_bytes,
    pagination_returns_every_run_once_and_windows_by_time,
    interleaved_batches_list_and_prune_in_id_order,
    a_batch_spread_over_time_is_found_by_id,
    events_are_stored_with_their_deliveries_and_runs_in_one_transaction,
    records_of_every_kind,
    a_run_twice_in_one_batch_keeps_its_last_state,
    versions_are_numbered_once_per_digest_and_pruned,
);

/// PostgreSQL: servers starting together on one database migrate it once; what is stored is
/// there for the next connection; a database migrated by a newer server, a wrong URL and a
/// server that does not answer are refused with what is wrong.
#[test]
fn postgres_migrates_once_and_says_what_is_wrong() {
    let pg = dispatch_testkit::postgres::Postgres::start();
    let url = pg.create_database("shared");
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::connect(&PgOptions::new(url)).map(|_| ()))
        })
        .collect();
    for s in starts {
        s.join().unwrap().unwrap();
    }
    {
        let s = PgStore::connect(&PgOptions::new(&url)).unwrap();
        s.create(image("a")).unwrap();
        let mut st = Status::phase(Phase::Ready);
        st.digest = Some("sha256:x".into());
        s.update_status("default", Kind::Image, "a", st).unwrap();
    }
    let s = PgStore::connect(&PgOptions::new(&url)).unwrap();
    let got = s.get("default", Kind::Image, "a").unwrap().unwrap();
    assert_eq!(
        (got.status.phase, got.spec),
        (Some(Phase::Ready), json!({"baseImage": "python3"}))
    );

    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.execute("UPDATE dispatch_schema SET version = 99", &[])
        .unwrap();
    let e = PgStore::connect(&PgOptions::new(&url)).err().unwrap();
    assert!(
        e.to_string().contains("made by a newer Dispatch server"),
        "{e}"
    );

    let e = PgStore::connect(&PgOptions::new("postgres://nope@127.0.0.1:notaport/x"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("database URL"), "{e}");
    let mut closed = PgOptions::new(format!(
        "postgres://postgres@127.0.0.1:{}/x",
        dispatch_testkit::free_port()
    ));
    closed.connect_timeout = std::time::Duration::from_secs(2);
    let e = PgStore::connect(&closed).err().unwrap();
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        chain.contains("connect") || chain.contains("refused"),
        "{chain}"
    );
}

/// `e` and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

/// PostgreSQL over TLS (rustls with ring): given the server's CA the store connects, and it
/// did use TLS (this server rejects plain connections); without the CA, `sslmode=require`
/// checks the certificate against the system's CAs and refuses it; a CA file that holds no
/// certificate is refused before connecting.
#[test]
fn postgres_over_tls_verifies_the_server() {
    let pg = dispatch_testkit::postgres::Postgres::start_tls();
    let url = pg.create_database("tls");
    let mut o = PgOptions::new(&url);
    o.ca_file = Some(pg.ca_file());
    let s = PgStore::connect(&o).unwrap();
    s.create(image("a")).unwrap();
    assert!(s.get("default", Kind::Image, "a").unwrap().is_some());

    let plain = PgStore::connect(&PgOptions::new(&url)).err().unwrap();
    assert!(chain(&plain).contains("no encryption"), "{}", chain(&plain));
    let unknown = PgStore::connect(&PgOptions::new(format!("{url}?sslmode=require")))
        .err()
        .unwrap();
    assert!(
        chain(&unknown).contains("certificate"),
        "{}",
        chain(&unknown)
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    let mut o = PgOptions::new(&url);
    o.ca_file = Some(empty.path().to_path_buf());
    let e = PgStore::connect(&o).err().unwrap();
    assert!(
        chain(&e).contains("holds no PEM certificate"),
        "{}",
        chain(&e)
    );
}

/// PostgreSQL: servers on one database tell each other what they changed. Another store's
/// writes of a resource's spec (not of its status), of tokens and of namespaces reach this
/// one's callbacks in order; its own writes do not; after its listening connection is cut,
/// it reports every resource changed and tokens and namespaces to read again.
#[test]
fn postgres_stores_tell_each_other_their_changes() {
    use dispatch_store::{Changed, Shared};
    use std::sync::mpsc;
    use std::time::Duration;
    let pg = dispatch_testkit::postgres::Postgres::start();
    let url = pg.create_database("shared");
    let a = PgStore::connect(&PgOptions::new(&url)).unwrap();
    let b = PgStore::connect(&PgOptions::new(&url)).unwrap();
    let (tx, changes) = mpsc::channel::<String>();
    let t2 = tx.clone();
    b.on_external_change(Box::new(move |c: Changed| {
        let _ = tx.send(format!(
            "{} {}/{}{}",
            c.kind.as_str(),
            c.namespace,
            c.name,
            if c.deleted { " deleted" } else { "" }
        ));
    }));
    b.on_shared_change(Box::new(move |s: Shared| {
        let _ = t2.send(format!("{s:?}"));
    }));
    // The listener is up once a marker written by `a` arrives: a token (dropped from the
    // expectations below).
    let next = || {
        changes
            .recv_timeout(Duration::from_secs(30))
            .expect("a change within 30 s")
    };
    let marker = |name: &str| dispatch_core::auth::ApiToken {
        name: name.into(),
        role: dispatch_core::auth::Role::Viewer,
        namespace: "*".into(),
        hash: format!("sha256:{name}"),
        created_at: jiff::Timestamp::now(),
        expires_at: None,
    };
    let mut up = false;
    for i in 0..300 {
        a.put_token(&marker(&format!("m{i}"))).unwrap();
        if changes.recv_timeout(Duration::from_millis(100)).is_ok() {
            up = true;
            break;
        }
    }
    assert!(up, "b's listener never heard a: {}", pg.log());
    // Notifications come in commit order: once a resource made after the markers is heard,
    // every marker's has been (and is dropped).
    a.create(image("sync")).unwrap();
    while next() != "Image default/sync" {}
    a.delete("default", Kind::Image, "sync").unwrap();
    assert_eq!(next(), "Image default/sync deleted");

    let created = a.create(image("web")).unwrap();
    let mut changed = created.clone();
    changed.spec = json!({"baseImage": "nodejs"});
    a.update(changed).unwrap();
    a.update_status("default", Kind::Image, "web", Status::phase(Phase::Ready))
        .unwrap();
    b.create(image("own")).unwrap();
    a.delete("default", Kind::Image, "web").unwrap();
    a.put_namespace("team", jiff::Timestamp::now()).unwrap();
    a.delete_token("m0").unwrap_or_default();
    let got: Vec<String> = (0..5).map(|_| next()).collect();
    assert_eq!(
        got,
        [
            "Image default/web",
            "Image default/web",
            "Image default/web deleted",
            "Namespaces",
            "Tokens"
        ],
        "a status write and b's own create are not told"
    );

    // b's listening connection is cut: it listens again and reports everything.
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let cut = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE query = 'LISTEN dispatch_changes'",
            &[],
        )
        .unwrap();
    assert_eq!(cut, 2, "each store listens from its opening");
    let mut after: Vec<String> = (0..3).map(|_| next()).collect();
    after.sort();
    assert_eq!(after, ["Image default/own", "Namespaces", "Tokens"]);
}
