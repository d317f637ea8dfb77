//! Accepted means delivered, with real workers: a function whose queue is full
//! makes event deliveries wait (pending, in order) instead of dropping them; past the
//! namespace's high-water mark producers get 429 and nothing is stored; pending deliveries
//! survive a restart; a delivery whose TTL ends first is dead, listed and redelivered; an
//! event matching ten subscriptions yields ten runs, never a subset.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use dispatch_core::RunStatus;
use dispatch_core::events::DeliveryState;
use dispatch_server::Options;
use serde_json::json;
use support::*;

/// Waits at the test's [`Gate`] when the payload names one (`{"gate": PORT}`), then returns
/// the event's id: the function's pace is the test's, not a clock's.
const SLOW: &str = r#"
import socket
def handle(context, payload):
    gate = (payload or {}).get("gate")
    if gate:
        with socket.create_connection(("127.0.0.1", gate)) as s:
            s.recv(1)
    return context["event"]["id"]
"#;

/// A gate functions wait at: a listener that holds every connection until [`Gate::open`],
/// and closes them (and any later one) from then on.
struct Gate {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    async fn closed() -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let _ = rx.wait_for(|open| *open).await;
                    drop(conn);
                });
            }
        });
        Gate { port, open }
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    /// The payload that makes a run wait here.
    fn payload(&self) -> serde_json::Value {
        json!({"gate": self.port})
    }
}

async fn slow_function(c: &dispatch_client::Client, name: &str, max_queued: u32) {
    let spec = json!({"maxQueued": max_queued, "concurrency": {"maxWorkers": 1}});
    ready_function(c, name, SLOW, spec).await;
}

/// Posts one structured event; its status and body.
async fn post(t: &TestServer, id: &str, data: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/namespaces/default/events", t.api()))
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": id, "source": "/shop",
                   "type": "order.created", "data": data})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").is_some();
    let mut v: serde_json::Value = r.json().await.unwrap();
    if status == 429 {
        assert!(retry_after, "a 429 says when to retry: {v}");
        v["retryAfter"] = json!(true);
    }
    (status, v)
}

/// Event id → the runs of `function` it started, once `expected` runs exist and all are
/// final.
async fn runs_by_event(
    c: &dispatch_client::Client,
    function: &str,
    expected: usize,
) -> HashMap<String, Vec<dispatch_core::Run>> {
    let runs = eventually(&format!("{expected} final runs of {function}"), || async {
        let runs = c
            .list_runs(&dispatch_client::RunQuery {
                function: Some(function.into()),
                limit: Some(10_000),
                ..Default::default()
            })
            .await
            .unwrap();
        (runs.len() >= expected && runs.iter().all(|r| r.status.is_final())).then_some(runs)
    })
    .await;
    let mut by: HashMap<String, Vec<dispatch_core::Run>> = HashMap::new();
    for r in runs {
        let id = r.event.as_ref().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        by.entry(id).or_default().push(r);
    }
    by
}

/// A queue of 2 and a slow function: events past it wait as pending deliveries and are
/// queued as room frees, in arrival order; past 8 pending the producer gets 429 and nothing
/// is stored. Every 202 ends in exactly one run; no 429 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_delivered_and_the_rest_get_429() {
    let t = start_with(
        tempfile::tempdir().unwrap(),
        Options {
            max_pending_deliveries: 8,
            ..no_auth()
        },
    )
    .await;
    let c = &t.client;
    images(c).await;
    slow_function(c, "slow", 2).await;
    subscribe(c, "orders", "order.*", "slow").await;
    // Runs wait at a closed gate, so the queue stays full while events arrive.
    let gate = Gate::closed().await;
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for i in 0..30 {
        let id = format!("e{i:02}");
        let (status, v) = post(&t, &id, gate.payload()).await;
        match status {
            202 => accepted.push((id, v)),
            429 => refused.push((id, v)),
            s => panic!("event {id}: {s} {v}"),
        }
    }
    assert!(
        accepted.len() >= 10 && !refused.is_empty(),
        "2 queued + 8 pending at least, then 429: {} accepted, {} refused",
        accepted.len(),
        refused.len()
    );
    let pending: Vec<_> = accepted
        .iter()
        .filter(|(_, v)| v["matched"][0]["state"] == "pending")
        .collect();
    assert!(!pending.is_empty(), "some deliveries waited");
    let e = &refused[0].1["error"];
    assert_eq!(e["code"], "DeliveriesPending", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("--max-pending-deliveries"),
        "{e}"
    );
    let stats = c.subscription_deliveries("orders").await.unwrap();
    assert!(stats.pending > 0 || stats.queued > 0, "{stats:?}");
    let metrics = metrics(&t).await;
    assert!(
        metrics.contains("dispatch_events_refused_total{namespace=\"default\"}"),
        "{metrics}"
    );

    // Every accepted event ends in one run; no refused one is stored or run.
    gate.open();
    let by = runs_by_event(c, "slow", accepted.len()).await;
    assert_eq!(by.len(), accepted.len());
    for (id, _) in &accepted {
        let runs = &by[id];
        assert_eq!(runs.len(), 1, "event {id}: {runs:?}");
        assert_eq!(runs[0].status, RunStatus::Succeeded, "{:?}", runs[0]);
    }
    for (id, _) in &refused {
        assert!(!by.contains_key(id), "refused event {id} ran");
    }
    // Queued in arrival order: the runs' ids (ULIDs: creation order) follow the events'.
    let mut order: Vec<(String, String)> = by
        .iter()
        .map(|(e, runs)| (runs[0].id.clone(), e.clone()))
        .collect();
    order.sort();
    let events: Vec<String> = order.into_iter().map(|(_, e)| e).collect();
    let mut sorted = events.clone();
    sorted.sort();
    assert_eq!(events, sorted, "runs queued in the events' order");
    let all = c.list_events(None, false, 1000).await.unwrap();
    assert_eq!(all.len(), accepted.len(), "refused events are not stored");
    assert!(c.list_events(None, true, 1000).await.unwrap().is_empty());
    let stats = c.subscription_deliveries("orders").await.unwrap();
    assert_eq!((stats.pending, stats.dead), (0, 0), "{stats:?}");
    assert_eq!(stats.queued, accepted.len() as u64);
    t.stop().await;
}

/// Pending deliveries are stored: a restart queues them. An event matching ten subscriptions
/// is stored with ten deliveries (some queued, some pending) and yields ten runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_a_restart_and_fan_out_is_whole() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    slow_function(c, "fan", 3).await;
    for i in 0..10 {
        subscribe(c, &format!("s{i}"), "order.*", "fan").await;
    }
    let gate = Gate::closed().await;
    let (status, v) = post(&t, "wide", gate.payload()).await;
    assert_eq!(status, 202, "{v}");
    let states: Vec<&str> = v["matched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 10);
    assert_eq!(
        states.iter().filter(|s| **s == "queued").count(),
        3,
        "maxQueued 3: {states:?}"
    );
    // Stopped while the runs wait at the gate: most deliveries are still pending.
    let dir = t.stop().await;
    gate.open();
    let t = start_in(dir).await;
    let c = &t.client;
    let by = runs_by_event(c, "fan", 10).await;
    let runs = &by["wide"];
    assert_eq!(runs.len(), 10, "one run per subscription: {runs:?}");
    let e = &c.list_events(None, false, 10).await.unwrap()[0];
    let subs: BTreeMap<&str, &str> = e["matched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["subscription"].as_str().unwrap(),
                d["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(subs.len(), 10);
    assert!(subs.values().all(|s| *s == "queued"), "{subs:?}");
    t.stop().await;
}

/// A delivery whose TTL ends while its function's queue is full is dead: listed with the
/// reason, counted, and pending again on `redeliver` (by event and by subscription).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_deliveries_are_listed_and_redelivered() {
    let t = start_with(
        tempfile::tempdir().unwrap(),
        Options {
            event_ttl: Duration::from_millis(300),
            ..no_auth()
        },
    )
    .await;
    let c = &t.client;
    images(c).await;
    slow_function(c, "gate", 1).await;
    subscribe(c, "orders", "order.*", "gate").await;
    // The first takes the queue's one place and holds it (a gate never opened: the cancel
    // below ends it); the next two wait, then die.
    let gate = Gate::closed().await;
    let (_, first) = post(&t, "hold", gate.payload()).await;
    let hold = first["matched"][0]["runId"].as_str().unwrap().to_string();
    for id in ["late-1", "late-2"] {
        let (status, v) = post(&t, id, json!({})).await;
        assert_eq!(
            (status, v["matched"][0]["state"].as_str()),
            (202, Some("pending"))
        );
    }
    let dead = eventually("two dead deliveries", || async {
        let s = c.subscription_deliveries("orders").await.unwrap();
        (s.dead == 2).then_some(s)
    })
    .await;
    assert_eq!(dead.pending, 0);
    let undelivered = c.list_events(None, true, 10).await.unwrap();
    assert_eq!(undelivered.len(), 2);
    for e in &undelivered {
        let d: dispatch_core::events::Delivery =
            serde_json::from_value(e["matched"][0].clone()).unwrap();
        assert_eq!(d.state, DeliveryState::Dead);
        assert!(
            d.error.as_deref().unwrap().contains("TTL"),
            "the reason is kept: {d:?}"
        );
    }
    let metrics = metrics(&t).await;
    assert!(
        metrics.contains(
            "dispatch_event_deliveries_dead{namespace=\"default\",subscription=\"orders\"} 2"
        ),
        "{metrics}"
    );
    // Room again; one event redelivered, then the rest of the subscription.
    c.cancel_run(&hold).await.unwrap();
    let err = c.redeliver_event("no-such", None).await.unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 404);
    let r = c.redeliver_event("late-1", Some("/shop")).await.unwrap();
    assert_eq!(r["redelivered"], 1);
    let by = runs_by_event(c, "gate", 2).await;
    assert_eq!(by["late-1"][0].status, RunStatus::Succeeded);
    let r = c.redeliver_subscription("orders").await.unwrap();
    assert_eq!(r["redelivered"], 1);
    let by = runs_by_event(c, "gate", 3).await;
    assert_eq!(by["late-2"][0].status, RunStatus::Succeeded);
    assert!(c.list_events(None, true, 10).await.unwrap().is_empty());
    let s = c.subscription_deliveries("orders").await.unwrap();
    assert_eq!((s.pending, s.dead, s.queued), (0, 0, 3), "{s:?}");
    t.stop().await;
}

/// A batch (`application/cloudevents-batch+json`) with a bad event stores none of it; one
/// refused part-way by back-pressure says which events were accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_refused_whole_for_bad_input_and_says_where_back_pressure_cut_it() {
    let t = start_with(
        tempfile::tempdir().unwrap(),
        Options {
            max_pending_deliveries: 1,
            ..no_auth()
        },
    )
    .await;
    let c = &t.client;
    images(c).await;
    slow_function(c, "batch", 1).await;
    subscribe(c, "orders", "order.*", "batch").await;
    let post_batch = |events: serde_json::Value| {
        let url = format!("{}/v1/namespaces/default/events", t.api());
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/cloudevents-batch+json")
                .body(events.to_string())
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let event = |id: &str, data: serde_json::Value| json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "order.created", "data": data});
    let (status, v) = post_batch(json!([
        event("ok-1", json!({})),
        {"specversion": "1.0", "id": "bad", "type": "order.created"}
    ]))
    .await;
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("event 1") && msg.contains("nothing was stored"),
        "{msg}"
    );
    assert!(c.list_events(None, false, 10).await.unwrap().is_empty());
    // One queued (it holds the queue's place), one pending (the high-water mark), then 429.
    let gate = Gate::closed().await;
    let (status, v) = post_batch(json!([
        event("b0", gate.payload()),
        event("b1", json!({})),
        event("b2", json!({})),
        event("b3", json!({})),
    ]))
    .await;
    assert_eq!(status, 429, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("events 0..2 of the batch were accepted (ids b0, b1)"),
        "{msg}"
    );
    let stored: Vec<String> = c
        .list_events(None, false, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stored.len(), 2, "{stored:?}");
    t.stop().await;
}
