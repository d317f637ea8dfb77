//! Run history in a budget: the recording policies keep exactly what they say,
//! a byte budget holds under a burst, and an enqueue issued while a prune is in progress is
//! committed before that prune finishes (a prune is many short steps, not one statement).
//! Sync calls' records live in a file of their own (`history.db`), and every reader of
//! runs — get, list and its pages, cancel, purge, deleting a function or a namespace — sees
//! both files as one.

mod support;

use std::time::Duration;

use dispatch_core::{Kind, Phase, Run, RunStatus, Trigger};
use serde_json::json;
use support::*;

const MAYBE_FAIL: &str = r#"
def handle(context, payload):
    if payload.get("fail"):
        raise ValueError("asked to fail")
    return {"echo": payload.get("pad", "")[:8]}
"#;

fn quiet() -> dispatch_server::Options {
    dispatch_server::Options {
        // These tests drive retention themselves.
        retention_interval: Duration::from_secs(3600),
        ..no_auth()
    }
}

async fn deploy(c: &dispatch_client::Client, name: &str, spec: serde_json::Value) {
    create_function(c, name, "py", "h.py", MAYBE_FAIL, spec)
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, name).await.phase(),
        Some(Phase::Ready)
    );
}

async fn runs_of(c: &dispatch_client::Client, f: &str) -> Vec<Run> {
    c.list_runs(&dispatch_client::RunQuery {
        function: Some(f.into()),
        limit: Some(10_000),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_policies_keep_exactly_what_they_say() {
    let t = start_with(tempfile::tempdir().unwrap(), quiet()).await;
    let c = &t.client;
    images(c).await;
    deploy(c, "every", json!({})).await;
    deploy(c, "errs", json!({"history": "errors"})).await;
    deploy(c, "quiet", json!({"history": "none"})).await;
    deploy(
        c,
        "some",
        json!({"history": "sample", "historySampleRate": 0.5}),
    )
    .await;
    for f in ["every", "errs", "quiet", "some"] {
        for i in 0..40 {
            let _ = c.exec(f, &raw(json!({"i": i}))).await.unwrap();
        }
        for _ in 0..3 {
            let r = c.exec(f, &raw(json!({"fail": true}))).await.unwrap();
            assert!(r.envelope.context.error.is_some());
        }
        // Async runs are always recorded, whatever the policy.
        let a = c.exec_async(f, &raw(json!({})), None).await.unwrap();
        final_run(c, a["id"].as_str().unwrap()).await;
    }
    let count = |runs: &[Run], ok: bool| {
        runs.iter()
            .filter(|r| !r.is_async && (r.status == RunStatus::Succeeded) == ok)
            .count()
    };
    let every = runs_of(c, "every").await;
    assert_eq!((count(&every, true), count(&every, false)), (40, 3));
    let errs = runs_of(c, "errs").await;
    assert_eq!((count(&errs, true), count(&errs, false)), (0, 3));
    let quiet = runs_of(c, "quiet").await;
    assert_eq!((count(&quiet, true), count(&quiet, false)), (0, 0));
    let some = runs_of(c, "some").await;
    assert_eq!(count(&some, false), 3, "failures are always kept");
    assert!(
        (5..=35).contains(&count(&some, true)),
        "about half of 40: {}",
        count(&some, true)
    );
    for runs in [&every, &errs, &quiet, &some] {
        assert_eq!(runs.iter().filter(|r| r.is_async).count(), 1);
    }
    // Every call is counted in /metrics whatever the policy: 4 × (40 + 3 + 1).
    let m = metrics(&t).await;
    let total: f64 = m
        .lines()
        .filter(|l| l.starts_with("dispatch_runs_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 176.0, "{m}");
    // And per function, by status, error type and duration (the ValueError is the caller's
    // input), whatever its history policy keeps.
    let value = |m: &str, series: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{m}"))
    };
    for f in ["every", "quiet"] {
        let l = format!("namespace=\"default\",function=\"{f}\"");
        let calls = |s: &str| format!("dispatch_function_calls_total{{{l},status=\"{s}\"}}");
        assert_eq!(value(&m, &calls("SUCCEEDED")), 41.0);
        assert_eq!(value(&m, &calls("FAILED")), 3.0);
        assert_eq!(value(&m, &calls("TIMEOUT")), 0.0);
        let errors = |t: &str| format!("dispatch_function_errors_total{{{l},type=\"{t}\"}}");
        assert_eq!(value(&m, &errors("InputError")), 3.0);
        assert_eq!(value(&m, &errors("FunctionError")), 0.0);
        assert_eq!(
            value(
                &m,
                &format!("dispatch_function_duration_seconds_count{{{l}}}")
            ),
            44.0
        );
        assert_eq!(
            value(
                &m,
                &format!("dispatch_function_duration_seconds_bucket{{{l},le=\"+Inf\"}}")
            ),
            44.0
        );
        assert!(
            value(
                &m,
                &format!("dispatch_function_duration_seconds_sum{{{l}}}")
            ) > 0.0
        );
        // (deploys warm a worker up: a call may find none cold)
        assert!(value(&m, &format!("dispatch_function_cold_starts_total{{{l}}}")) >= 0.0);
    }
    // Builds: two images and four functions' deploys, all READY.
    let built = |kind: &str, outcome: &str| {
        value(
            &m,
            &format!(
                "dispatch_build_duration_seconds_count{{kind=\"{kind}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(built("image", "ready"), 2.0);
    assert!(built("function", "ready") >= 4.0, "{m}");
    assert_eq!(built("function", "error"), 0.0);
    // A deleted function's series go with it.
    c.delete(Kind::Function, "quiet").await.unwrap();
    let gone = eventually("the deleted function's series to go", || async {
        let m = reqwest::get(format!("{}/metrics", t.api()))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (!m.contains("function=\"quiet\"")).then_some(m)
    })
    .await;
    assert!(gone.contains("function=\"every\""), "{gone}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_holds_under_a_burst() {
    let budget = 96 * 1024;
    let t = start_with(
        tempfile::tempdir().unwrap(),
        dispatch_server::Options {
            run_history_budget: Some(budget),
            ..quiet()
        },
    )
    .await;
    let c = &t.client;
    images(c).await;
    deploy(c, "burst", json!({})).await;
    let pad = "x".repeat(1000);
    let mut last = String::new();
    for _ in 0..300 {
        last = c
            .exec("burst", &raw(json!({"pad": pad})))
            .await
            .unwrap()
            .run_id
            .unwrap();
    }
    let state = &t.server.as_ref().unwrap().state;
    let usage = || async {
        state
            .run_usage()
            .await
            .unwrap()
            .into_iter()
            .find(|u| u.namespace == "default")
            .unwrap_or_default()
    };
    state.recorder.flush().await;
    assert!(
        usage().await.bytes > 3 * budget,
        "the burst is over the budget"
    );
    let pruned = dispatch_server::retention::prune(state).await.unwrap();
    let u = usage().await;
    assert!(u.bytes <= budget, "{} bytes kept, budget {budget}", u.bytes);
    assert!(
        u.bytes > budget / 2,
        "no more went than needed: {}",
        u.bytes
    );
    assert_eq!(pruned + u.runs, 300);
    // The newest are the ones kept, and listing agrees with the usage count.
    assert_eq!(c.get_run(&last).await.unwrap().id, last);
    assert_eq!(runs_of(c, "burst").await.len() as u64, u.runs);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_during_a_prune_commits_before_the_prune_ends() {
    let t = start_with(
        tempfile::tempdir().unwrap(),
        dispatch_server::Options {
            runs_per_function: 10,
            ..quiet()
        },
    )
    .await;
    let c = &t.client;
    images(c).await;
    deploy(c, "work", json!({})).await;
    // 5000 finished runs of another function, stored directly.
    let state = &t.server.as_ref().unwrap().state;
    let old: Vec<Run> = (0..5000)
        .map(|_| {
            let mut r = Run::new(
                dispatch_core::run::new_run_id(),
                "default",
                "old",
                Trigger::Exec,
                raw(json!({})),
                jiff::Timestamp::now(),
            );
            r.status = RunStatus::Succeeded;
            r.finished_at = Some(jiff::Timestamp::now());
            r
        })
        .collect();
    state.db(move |s| s.put_runs(&old)).await.unwrap();
    // The prune is steps of at most BATCH rows; between two of them an enqueue commits.
    let batch = dispatch_server::retention::BATCH as u64;
    let first = dispatch_server::retention::step(state, dispatch_server::retention::BATCH)
        .await
        .unwrap();
    assert_eq!(first, batch, "one step deletes one batch, no more");
    let accepted = c.exec_async("work", &raw(json!({})), None).await.unwrap();
    let id = accepted["id"].as_str().unwrap();
    let committed = state
        .db({
            let id = id.to_string();
            move |s| s.get_run("default", &id)
        })
        .await
        .unwrap();
    assert!(committed.is_some(), "the 202 came after the commit");
    let mut rest = 0;
    loop {
        let n = dispatch_server::retention::step(state, dispatch_server::retention::BATCH)
            .await
            .unwrap();
        assert!(n <= batch);
        rest += n;
        if n < batch {
            break;
        }
    }
    assert!(rest > 0, "the prune was still going after the enqueue");
    assert_eq!(first + rest, 4990, "all but the newest 10 of `old`");
    assert_eq!(final_run(c, id).await.status, RunStatus::Succeeded);
    t.stop().await;
}

/// A namespace's own budget (`spec.runHistoryBudget`, set by a cluster admin) replaces the
/// server's for its run records only; bad budgets are refused before anything is stored; a
/// budget cleared falls back to the server's; budgets survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_budget_overrides_the_servers() {
    let options = || dispatch_server::Options {
        run_history_budget: None,
        ..quiet()
    };
    let t = start_with(tempfile::tempdir().unwrap(), options()).await;
    let c = &t.client;
    for (spec, why) in [
        (json!({"runHistoryBudget": "lots"}), "is not valid"),
        (
            json!({"runHistoryBudget": "1Ki"}),
            "below the least budget of 1Mi",
        ),
        (json!({"runHistoryBudget": true}), "not a size"),
        (json!({"runHistoryBudgt": "2Mi"}), "unknown field"),
    ] {
        let e = c.create_namespace("team-a", spec).await.unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
    assert!(
        c.get_namespace("team-a").await.is_err(),
        "a refused namespace is not created"
    );
    let created = c
        .create_namespace("team-a", json!({"runHistoryBudget": "1Mi"}))
        .await
        .unwrap();
    assert_eq!(created["spec"]["runHistoryBudget"], "1Mi");
    let a = dispatch_client::Client::new(&dispatch_client::Target {
        server: t.api(),
        token: None,
        namespace: "team-a".into(),
        insecure: false,
    })
    .unwrap();
    for cl in [c, &a] {
        images(cl).await;
        deploy(cl, "f", json!({})).await;
    }
    let pad = "x".repeat(20_000);
    for _ in 0..120 {
        for cl in [c, &a] {
            cl.exec("f", &raw(json!({"pad": pad}))).await.unwrap();
        }
    }
    let state = &t.server.as_ref().unwrap().state;
    let usage = |ns: &'static str| async move {
        state
            .run_usage()
            .await
            .unwrap()
            .into_iter()
            .find(|u| u.namespace == ns)
            .unwrap_or_default()
    };
    state.recorder.flush().await;
    let mib = 1 << 20;
    assert!(usage("team-a").await.bytes > 2 * mib, "the burst is over");
    dispatch_server::retention::prune(state).await.unwrap();
    let (ta, def) = (usage("team-a").await, usage("default").await);
    assert!(ta.bytes <= mib && ta.bytes > mib / 2, "team-a keeps {ta:?}");
    assert_eq!(def.runs, 120, "default has no budget: {def:?}");
    let shown = c.get_namespace("team-a").await.unwrap();
    let h = &shown["status"]["runHistory"];
    assert_eq!(h["bytes"], ta.bytes);
    assert_eq!(h["budget"], mib);
    assert_eq!(h["budgetFrom"], "namespace");

    // `default` gets a budget of its own; team-a's is cleared (the server has none).
    let d = c
        .patch_namespace("default", json!({"runHistoryBudget": "1Mi"}))
        .await
        .unwrap();
    assert_eq!(d["status"]["runHistory"]["budgetFrom"], "namespace");
    // A size without a round unit is shown exactly, not rounded.
    let odd = c
        .patch_namespace("team-a", json!({"runHistoryBudget": 1_500_000}))
        .await
        .unwrap();
    assert_eq!(odd["spec"]["runHistoryBudget"], "1500000");
    let cleared = c
        .patch_namespace("team-a", json!({"runHistoryBudget": null}))
        .await
        .unwrap();
    assert!(cleared["status"]["runHistory"]["budget"].is_null());
    assert_eq!(cleared["status"]["runHistory"]["budgetFrom"], "server");
    let e = c
        .patch_namespace("nowhere", json!({"runHistoryBudget": "2Mi"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    for _ in 0..60 {
        a.exec("f", &raw(json!({"pad": pad}))).await.unwrap();
    }
    state.recorder.flush().await;
    dispatch_server::retention::prune(state).await.unwrap();
    assert!(usage("default").await.bytes <= mib);
    assert!(
        usage("team-a").await.bytes > 2 * mib,
        "a cleared budget no longer prunes"
    );

    // Budgets are stored: a restart keeps them.
    let dir = t.stop().await;
    let t = start_with(dir, options()).await;
    let d = t.client.get_namespace("default").await.unwrap();
    assert_eq!(d["spec"]["runHistoryBudget"], "1Mi");
    let ta = t.client.get_namespace("team-a").await.unwrap();
    assert!(ta["spec"].get("runHistoryBudget").is_none(), "{ta}");
    assert!(ta["metadata"]["createdAt"].is_string());
    assert!(
        d["metadata"]["createdAt"].is_null(),
        "default is never created"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_history_has_its_own_file_and_readers_see_one_set() {
    let t = start_with(tempfile::tempdir().unwrap(), quiet()).await;
    let c = &t.client;
    assert!(t.dir.path().join("history.db").is_file());
    images(c).await;
    deploy(c, "f", json!({})).await;
    // Sync and async runs interleaved, so a merged list must order across both files.
    for i in 0..6 {
        if i % 2 == 0 {
            let a = c
                .exec_async("f", &raw(json!({"i": i})), None)
                .await
                .unwrap();
            final_run(c, a["id"].as_str().unwrap()).await;
        } else {
            c.exec("f", &raw(json!({"i": i}))).await.unwrap();
        }
    }
    let state = &t.server.as_ref().unwrap().state;
    state.recorder.flush().await;
    let stored = |history: bool| {
        let store = if history {
            state.stores.history.clone()
        } else {
            state.stores.records.clone()
        };
        let all = store
            .list_runs("default", &dispatch_store::RunFilter::default())
            .unwrap();
        assert!(all.iter().all(|r| r.is_async != history), "{all:?}");
        all.len()
    };
    assert_eq!(
        (stored(false), stored(true)),
        (3, 3),
        "async in dispatch.db, sync in history.db"
    );

    // One list, newest first, across both files; pages of two walk it without a gap.
    let all = runs_of(c, "f").await;
    let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(all.len(), 6);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let asyncs: Vec<bool> = all.iter().rev().map(|r| r.is_async).collect();
    assert_eq!(
        asyncs,
        [true, false, true, false, true, false],
        "creation order"
    );
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = c
            .list_runs(&dispatch_client::RunQuery {
                function: Some("f".into()),
                limit: Some(2),
                after: after.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        paged.extend(page.iter().map(|r| r.id.clone()));
    }
    assert_eq!(paged, ids);

    // A sync run is found by id, and cancelling it says why not.
    let sync_id = all.iter().find(|r| !r.is_async).unwrap().id.clone();
    assert_eq!(c.get_run(&sync_id).await.unwrap().id, sync_id);
    let e = c.cancel_run(&sync_id).await.unwrap_err();
    assert!(e.to_string().contains("already finished"), "{e}");

    // Usage counts both files; a purge reaches both.
    let usage = state.run_usage().await.unwrap();
    assert_eq!(usage.iter().map(|u| u.runs).sum::<u64>(), 6);
    let purged = c.purge_runs(Some("f"), Some("succeeded")).await.unwrap();
    assert_eq!(purged["deleted"], 6);
    assert!(runs_of(c, "f").await.is_empty());

    // Deleting a function, then a namespace, deletes their runs in both files.
    c.exec("f", &raw(json!({}))).await.unwrap();
    let a = c.exec_async("f", &raw(json!({})), None).await.unwrap();
    final_run(c, a["id"].as_str().unwrap()).await;
    c.delete(Kind::Function, "f").await.unwrap();
    state.recorder.flush().await;
    assert_eq!((stored(false), stored(true)), (0, 0));
    c.create_namespace("team-b", json!({})).await.unwrap();
    let b = dispatch_client::Client::new(&dispatch_client::Target {
        server: t.api(),
        token: None,
        namespace: "team-b".into(),
        insecure: false,
    })
    .unwrap();
    images(&b).await;
    deploy(&b, "g", json!({})).await;
    b.exec("g", &raw(json!({}))).await.unwrap();
    state.recorder.flush().await;
    let in_b = || {
        state
            .stores
            .history
            .list_runs("team-b", &Default::default())
            .unwrap()
    };
    assert_eq!(in_b().len(), 1);
    c.delete_namespace("team-b", true).await.unwrap();
    assert!(
        in_b().is_empty(),
        "a deleted namespace's history goes with it"
    );
    t.stop().await;
}
