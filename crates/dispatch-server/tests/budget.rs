//! The server-wide worker budget with real Python workers: past it the least recently used
//! idle worker of another function is stopped; with every worker busy a cold start waits
//! within its call's timeout, then gets 429 naming the bound; the server keeps answering.

mod support;

use dispatch_core::{Kind, Phase};
use serde_json::json;
use support::*;

const BLOCKS: &str = "import select\ndef handle(context, payload):\n    if payload.get('block'):\n        select.select([], [], [])\n    return 'ok'\n";

fn budget(t: &TestServer) -> dispatch_runtime::budget::BudgetUse {
    use dispatch_runtime::Backend as _;
    t.local.worker_budget().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_fit_the_budget_by_evicting_idle_ones_then_refusing() {
    let t = start().await;
    // Before any function exists: pools take the budget when they are made.
    t.local.set_worker_budget(2, 64 << 30);
    let c = &t.client;
    images(c).await;
    // a gives up on a worker well before b's and c's blocked calls end (at their timeouts).
    for (f, timeout) in [("a", "1s"), ("b", "5s"), ("c", "5s")] {
        create_function(c, f, "py", "f.py", BLOCKS, json!({"timeout": timeout}))
            .await
            .unwrap();
        assert_eq!(
            settled(c, Kind::Function, f).await.phase(),
            Some(Phase::Ready)
        );
    }
    // Every function answers, two workers at most: a cold start past the budget stops the
    // idle worker used longest ago (of another function).
    for f in ["a", "b", "c", "a"] {
        let r = c.exec(f, &raw(json!({}))).await.unwrap();
        assert!(
            r.envelope.context.error.is_none(),
            "{f}: {:?}",
            r.envelope.context.error
        );
        let u = budget(&t);
        assert!(u.workers <= 2, "{u:?}");
    }
    let u = budget(&t);
    assert_eq!((u.workers, u.max_workers, u.idle), (2, 2, 2), "{u:?}");
    // Workers are the OOM killer's first choice, not the server.
    let pid = t.local.pool("default", "a").unwrap().idle_pids()[0];
    let score = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(score.trim(), "500", "worker {pid}");
    assert!(
        u.evictions >= 2,
        "c evicted a's worker, then a evicted b's: {u:?}"
    );
    // Two workers busy (b and c block), nothing idle: a's cold start waits within its
    // timeout, then is refused with 429 and the bound named; nothing crashed.
    let block = raw(json!({"block": true}));
    let (bc, cc) = (c.clone(), c.clone());
    let (b1, b2) = (block.clone(), block.clone());
    let busy_b = tokio::spawn(async move { bc.exec("b", &b1).await });
    let busy_c = tokio::spawn(async move { cc.exec("c", &b2).await });
    eventually("b and c to hold both workers, busy", || async {
        let u = budget(&t);
        (u.workers == 2 && t.local.idle_workers() == 0).then_some(())
    })
    .await;
    // /metrics says so too.
    let m = metrics(&t).await;
    for line in [
        "dispatch_workers_by_state{state=\"idle\"} 0",
        "dispatch_workers_by_state{state=\"busy\"} 2",
    ] {
        assert!(m.lines().any(|l| l == line), "no {line} in\n{m}");
    }
    let e = c.exec("a", &raw(json!({}))).await.unwrap_err();
    assert_eq!(e.status().unwrap().as_u16(), 429, "{e}");
    assert!(e.to_string().contains("--max-workers-total"), "{e}");
    assert_eq!(budget(&t).refusals, 1);
    // The blocked calls end at their timeout; then a runs again.
    for h in [busy_b, busy_c] {
        let r = h.await.unwrap().unwrap();
        assert!(
            r.envelope
                .context
                .error
                .unwrap()
                .message
                .contains("timed out")
        );
    }
    let r = c.exec("a", &raw(json!({}))).await.unwrap();
    assert!(r.envelope.context.error.is_none());
    let text = metrics(&t).await;
    for line in [
        "dispatch_workers_max 2",
        "dispatch_worker_budget_refusals_total 1",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    t.stop().await;
}
