//! Events end to end (real workers): structured, binary and batch CloudEvents, subscriptions
//! by exact type and prefix, `context.event`, unmatched and duplicate events, webhooks.

mod support;

use dispatch_core::{Kind, RunStatus};
use serde_json::json;
use support::*;

const ECHO: &str = r#"
def handle(context, payload):
    e = context["event"]
    print(e["type"], e["id"], e["source"])
    return {"payload": payload, "type": e["type"], "subject": e.get("subject")}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_reach_subscribed_functions() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "echo", ECHO, json!({})).await;
    subscribe(c, "orders", "order.*", "echo").await;
    c.create(&object(
        Kind::Subscription,
        "exact",
        json!({"eventType": "order.created", "function": "echo", "source": "/shop"}),
    ))
    .await
    .unwrap();
    let err = c
        .create(&object(
            Kind::Subscription,
            "ghost",
            json!({"eventType": "x", "function": "nope"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 422);

    let http = reqwest::Client::new();
    let url = format!("{}/v1/namespaces/default/events", t.api());
    // Structured: two subscriptions match (prefix, and exact with the same source).
    let r = http
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": "e1", "source": "/shop", "type": "order.created", "subject": "o-17", "data": {"total": 42}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["matched"].as_array().unwrap().len(), 2, "{v}");
    for d in v["matched"].as_array().unwrap() {
        let run = final_run(c, d["runId"].as_str().unwrap()).await;
        assert_eq!(run.status, RunStatus::Succeeded);
        let out: serde_json::Value = serde_json::from_str(run.output.unwrap().get()).unwrap();
        assert_eq!(
            out,
            json!({"payload": {"total": 42}, "type": "order.created", "subject": "o-17"})
        );
        assert_eq!(run.logs.stdout, ["order.created e1 /shop"]);
        assert_eq!(run.trigger, dispatch_core::Trigger::Event);
    }
    // The same source and id again: stored once, delivered once.
    let r = http
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "e1", "source": "/shop", "type": "order.created"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (
            v["duplicate"].as_bool(),
            v["matched"].as_array().unwrap().len()
        ),
        (Some(true), 0)
    );

    // Binary mode: attributes in ce-* headers, the body is the data.
    let r = http
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "e2")
        .header("ce-source", "/other")
        .header("ce-type", "order.paid")
        .header("content-type", "text/plain")
        .body("paid in full")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["matched"].as_array().unwrap().len(),
        1,
        "only the prefix subscription: {v}"
    );
    let run = final_run(c, v["matched"][0]["runId"].as_str().unwrap()).await;
    assert!(run.output.unwrap().get().contains("\"paid in full\""));
    // Binary mode without a content type (the official SDKs send JSON data so): JSON when
    // it parses, as CloudEvents' JSON format reads an absent datacontenttype; text that is
    // not JSON stays a string; bytes that are not text arrive base64-encoded.
    let cases: [(&str, Vec<u8>, Option<&str>, serde_json::Value); 3] = [
        (
            "e2-json",
            br#"{"total": 7}"#.to_vec(),
            None,
            json!({"total": 7}),
        ),
        (
            "e2-text",
            b"paid, thanks".to_vec(),
            None,
            json!("paid, thanks"),
        ),
        (
            "e2-bytes",
            vec![0xff, 0x00, 0xfe],
            Some("application/octet-stream"),
            json!("/wD+"),
        ),
    ];
    for (id, body, ct, want) in cases {
        let mut rb = http
            .post(&url)
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/other")
            .header("ce-type", "order.paid");
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        let r = rb.body(body).send().await.unwrap();
        assert_eq!(r.status(), 202, "{id}");
        let v: serde_json::Value = r.json().await.unwrap();
        let run = final_run(c, v["matched"][0]["runId"].as_str().unwrap()).await;
        let out: serde_json::Value = serde_json::from_str(run.output.unwrap().get()).unwrap();
        assert_eq!(out["payload"], want, "{id}");
    }

    // Unmatched: stored, reported with no deliveries; missing attributes: 400 naming them.
    let r = http
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "e3", "source": "/x", "type": "user.signup"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["matched"], json!([]));
    let r = http
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": "e4", "type": "t"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"source\" is required"),
        "{e}"
    );
    let r = http.post(&url).body("not an event").send().await.unwrap();
    assert_eq!(r.status(), 400);

    let listed: Vec<serde_json::Value> = http
        .get(format!("{url}?type=user.signup"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let all: Vec<serde_json::Value> = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(all.len(), 6);
    // A function with subscriptions cannot be deleted.
    let err = c.delete(Kind::Function, "echo").await.unwrap_err();
    assert!(err.to_string().contains("used by subscriptions"), "{err}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_drivers_turn_requests_into_events() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "echo", ECHO, json!({})).await;
    subscribe(c, "hooks", "github.push", "echo").await;
    c.create(&object(
        Kind::EventDriver,
        "github",
        json!({"type": "webhook", "path": "/hooks/github", "eventType": "github.push"}),
    ))
    .await
    .unwrap();
    let err = c
        .create(&object(
            Kind::EventDriver,
            "other",
            json!({"type": "webhook", "path": "/hooks/github", "eventType": "x"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 409);
    let r = reqwest::Client::new()
        .post(format!("{}/hooks/github", t.gateway))
        .json(&json!({"ref": "refs/heads/main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    let run = final_run(c, v["matched"][0]["runId"].as_str().unwrap()).await;
    let out: serde_json::Value = serde_json::from_str(run.output.unwrap().get()).unwrap();
    assert_eq!(out["payload"], json!({"ref": "refs/heads/main"}));
    assert_eq!(out["type"], "github.push");
    // Bad drivers: unknown type, bad cron, brokers not here yet.
    for (spec, expect) in [
        (
            json!({"type": "carrier-pigeon", "eventType": "x"}),
            "not known",
        ),
        (
            json!({"type": "cron", "schedule": "61 * * * *", "eventType": "x"}),
            "field 1 (minute)",
        ),
        (
            json!({"type": "cron", "schedule": "* * * * *"}),
            "exactly one",
        ),
    ] {
        let e = c
            .create(&object(Kind::EventDriver, "bad", spec))
            .await
            .unwrap_err();
        assert_eq!(e.status().unwrap().as_u16(), 400);
        assert!(e.to_string().contains(expect), "{e}");
    }
    t.stop().await;
}

/// A resource store whose first listing of subscriptions, once armed, reads and then waits
/// to be released: the index rebuild that made it holds a snapshot while others run.
struct Gate {
    inner: std::sync::Arc<dyn dispatch_store::ResourceStore>,
    armed: std::sync::atomic::AtomicBool,
    entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

struct Gated(std::sync::Arc<Gate>);

impl dispatch_store::ResourceStore for Gated {
    fn get(
        &self,
        ns: &str,
        kind: Kind,
        name: &str,
    ) -> dispatch_store::Result<Option<dispatch_core::Object>> {
        self.0.inner.get(ns, kind, name)
    }
    fn list(
        &self,
        ns: Option<&str>,
        kind: Kind,
    ) -> dispatch_store::Result<Vec<dispatch_core::Object>> {
        let out = self.0.inner.list(ns, kind);
        let gated = ns.is_none() && kind == Kind::Subscription;
        if gated
            && self
                .0
                .armed
                .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            if let Some(tx) = self.0.entered.lock().unwrap().take() {
                let _ = tx.send(());
            }
            let _ = self.0.release.lock().unwrap().recv();
        }
        out
    }
    fn create(&self, o: dispatch_core::Object) -> dispatch_store::Result<dispatch_core::Object> {
        self.0.inner.create(o)
    }
    fn update(&self, o: dispatch_core::Object) -> dispatch_store::Result<dispatch_core::Object> {
        self.0.inner.update(o)
    }
    fn update_status(
        &self,
        ns: &str,
        kind: Kind,
        name: &str,
        status: dispatch_core::Status,
    ) -> dispatch_store::Result<dispatch_core::Object> {
        self.0.inner.update_status(ns, kind, name, status)
    }
    fn delete(
        &self,
        ns: &str,
        kind: Kind,
        name: &str,
    ) -> dispatch_store::Result<dispatch_core::Object> {
        self.0.inner.delete(ns, kind, name)
    }
    fn put_namespace(&self, name: &str, created: jiff::Timestamp) -> dispatch_store::Result<bool> {
        self.0.inner.put_namespace(name, created)
    }
    fn list_namespaces(&self) -> dispatch_store::Result<Vec<dispatch_store::NamespaceRecord>> {
        self.0.inner.list_namespaces()
    }
    fn set_run_history_budget(
        &self,
        name: &str,
        budget: Option<u64>,
        created: jiff::Timestamp,
    ) -> dispatch_store::Result<()> {
        self.0.inner.set_run_history_budget(name, budget, created)
    }
    fn delete_namespace(&self, name: &str) -> dispatch_store::Result<bool> {
        self.0.inner.delete_namespace(name)
    }
}

/// Index rebuilds do not overtake each other: one that read the store before a new
/// subscription never replaces the index of one that read after it (the API's rebuild after a
/// write and the controller's after its reconcile once did, and an event missed a
/// subscription). The first rebuild is held between its read and its swap while the second
/// runs; the index must end up with both subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_rebuild_that_read_earlier_never_replaces_a_later_one() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let gate = std::sync::Arc::new(std::sync::OnceLock::<std::sync::Arc<Gate>>::new());
    let g = gate.clone();
    let t = start_wrapped(tempfile::tempdir().unwrap(), no_auth(), move |stores| {
        let inner = std::sync::Arc::new(Gate {
            inner: stores.resources.clone(),
            armed: false.into(),
            entered: std::sync::Mutex::new(Some(entered_tx)),
            release: std::sync::Mutex::new(release_rx),
        });
        let _ = g.set(inner.clone());
        dispatch_server::Stores {
            resources: std::sync::Arc::new(Gated(inner)),
            ..stores
        }
    })
    .await;
    let gate = gate.get().unwrap().clone();
    let state = t.server.as_ref().unwrap().state.clone();
    eventually("the server to be ready", || async {
        state.is_ready().then_some(())
    })
    .await;
    // Stored directly (no API write, so no rebuild of the server's own in between).
    let sub = |name: &str| {
        let mut o = object(
            Kind::Subscription,
            name,
            json!({"eventType": "order.*", "function": "f"}),
        );
        o.metadata.namespace = Some("default".into());
        o
    };
    gate.inner.create(sub("first")).unwrap();
    gate.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let st = state.clone();
    let early = tokio::spawn(async move { dispatch_server::events::rebuild(&st).await });
    tokio::task::spawn_blocking(move || {
        entered_rx.recv_timeout(std::time::Duration::from_secs(30))
    })
    .await
    .unwrap()
    .expect("the first rebuild reads the store");
    gate.inner.create(sub("second")).unwrap();
    let st = state.clone();
    let mut late = tokio::spawn(async move { dispatch_server::events::rebuild(&st).await });
    // Without the lock the late rebuild finishes here, and the early one then overwrites it;
    // with it, the late one waits (this bound only decides how long to give it).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut late).await;
    release_tx.send(()).unwrap();
    early.await.unwrap().unwrap();
    if !late.is_finished() {
        late.await.unwrap().unwrap();
    }
    let mut names: Vec<String> = state
        .event_index()
        .subscriptions
        .iter()
        .map(|(_, n, _)| n.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["first", "second"]);
    t.stop().await;
}
