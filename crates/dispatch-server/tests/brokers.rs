//! NATS, MQTT and Kafka drivers against real brokers (`nats-server`, `mosquitto` from Debian,
//! `tansu` from crates.io; .ci/run installs them): messages become events or runs, in order;
//! status CONNECTED/ERROR; the driver reconnects after the broker comes back; a JetStream
//! consumer and a Kafka partition resume where they were after a restart.

mod support;

use std::time::Duration;

use dispatch_testkit::brokers::{mosquitto, nats, produce, tansu};

use dispatch_core::{Kind, Phase, RunStatus};
use serde_json::json;
use support::*;

async fn driver_phase(
    c: &dispatch_client::Client,
    name: &str,
    phase: Phase,
) -> dispatch_core::Object {
    let last = std::sync::Mutex::new(None);
    let what = format!("driver {name} to be {phase}");
    // Shorter than `eventually`'s own deadline, so a failure shows the last status seen.
    let found = tokio::time::timeout(
        Duration::from_secs(45),
        eventually(&what, || async {
            let o = c.get(Kind::EventDriver, name).await.unwrap();
            *last.lock().unwrap() = Some(o.status.clone());
            (o.phase() == Some(phase)).then_some(o)
        }),
    )
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what}: last {:?}",
            last.lock().unwrap()
        )
    })
}

/// Succeeded runs of `function`, oldest first (waits for `n`).
async fn runs(c: &dispatch_client::Client, function: &str, n: usize) -> Vec<dispatch_core::Run> {
    eventually(&format!("{n} runs of {function}"), || async {
        let q = dispatch_client::RunQuery {
            function: Some(function.into()),
            limit: Some(1000),
            ..Default::default()
        };
        let mut all: Vec<_> = c
            .list_runs(&q)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .collect();
        all.reverse();
        (all.len() >= n).then_some(all)
    })
    .await
}

const ECHO: &str = "def handle(context, payload):\n    return {'payload': payload, 'type': context['event']['type']}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subjects_become_events_and_runs_in_order() {
    let port = free_port();
    let broker = nats(port, None).await;
    let t = start().await;
    let c = &t.client;
    images(c).await;
    create_function(c, "echo", "py", "echo.py", ECHO, json!({}))
        .await
        .unwrap();
    create_function(
        c,
        "ordered",
        "py",
        "ordered.py",
        ECHO,
        json!({"concurrency": {"maxWorkers": 1}}),
    )
    .await
    .unwrap();
    for f in ["echo", "ordered"] {
        assert_eq!(
            settled(c, Kind::Function, f).await.phase(),
            Some(Phase::Ready)
        );
    }
    let url = format!("nats://127.0.0.1:{port}");
    subscribe(c, "orders", "orders.*", "echo").await;
    c.create(&object(
        Kind::EventDriver,
        "bus",
        json!({"type": "nats", "config": {"url": url, "subject": "orders.>"}}),
    ))
    .await
    .unwrap();
    c.create(&object(
        Kind::EventDriver,
        "seq",
        json!({"type": "nats", "function": "ordered", "config": {"url": url, "subject": "seq"}}),
    ))
    .await
    .unwrap();
    driver_phase(c, "bus", Phase::Connected).await;
    driver_phase(c, "seq", Phase::Connected).await;

    let client = async_nats::connect(url.as_str()).await.unwrap();
    client
        .publish("orders.created", r#"{"n": 1}"#.into())
        .await
        .unwrap();
    for i in 0..5 {
        client
            .publish("seq", format!(r#"{{"i": {i}}}"#).into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let r = runs(c, "echo", 1).await;
    let out: serde_json::Value = serde_json::from_str(r[0].output.as_ref().unwrap().get()).unwrap();
    assert_eq!(
        out,
        json!({"payload": {"n": 1}, "type": "orders.created"}),
        "the subject is the event type"
    );
    // Runs are enqueued in the broker's order.
    let seq = runs(c, "ordered", 5).await;
    let order: Vec<i64> = seq
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(r.input.get()).unwrap()["i"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(order, [0, 1, 2, 3, 4]);

    // The broker goes away: ERROR with the reason; it comes back: CONNECTED, messages flow.
    drop(broker);
    let o = driver_phase(c, "bus", Phase::Error).await;
    assert!(!o.status.reason.is_empty());
    let _broker = nats(port, None).await;
    driver_phase(c, "bus", Phase::Connected).await;
    let client = async_nats::connect(url.as_str()).await.unwrap();
    // Published again every 10th poll (200 ms) until a run shows: the subscription may
    // still be on its way when CONNECTED is written.
    let polls = std::sync::atomic::AtomicU32::new(0);
    eventually("a run after the reconnect", || async {
        if polls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(10)
        {
            client
                .publish("orders.again", r#"{"n": 2}"#.into())
                .await
                .unwrap();
            client.flush().await.unwrap();
        }
        let q = dispatch_client::RunQuery {
            function: Some("echo".into()),
            ..Default::default()
        };
        let runs = c.list_runs(&q).await.unwrap();
        runs.iter()
            .any(|r| r.input.get().contains("2"))
            .then_some(())
    })
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_topics_become_runs() {
    let port = free_port();
    let _broker = mosquitto(port).await;
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "sensor", ECHO, json!({})).await;
    c.create(&object(
        Kind::EventDriver,
        "sensors",
        json!({"type": "mqtt", "function": "sensor", "config": {"url": format!("mqtt://127.0.0.1:{port}"), "topic": "sensors/#"}}),
    ))
    .await
    .unwrap();
    driver_phase(c, "sensors", Phase::Connected).await;
    // A change that leaves the spec alone (a label) is reconciled again: the status the
    // connection wrote stays, now for the new generation (it once turned READY for good).
    let mut o = c.get(Kind::EventDriver, "sensors").await.unwrap();
    o.metadata.labels.insert("room".into(), "kitchen".into());
    let generation = c.update(&o).await.unwrap().metadata.generation;
    eventually(
        "the relabelled driver to be observed, still CONNECTED",
        || async {
            let o = c.get(Kind::EventDriver, "sensors").await.unwrap();
            assert_ne!(
                o.phase(),
                Some(Phase::Ready),
                "a broker driver is CONNECTED or ERROR"
            );
            (o.status.observed_generation == generation && o.phase() == Some(Phase::Connected))
                .then_some(())
        },
    )
    .await;
    let mut opts = rumqttc::MqttOptions::new("dispatch-test-publisher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
        .publish(
            "sensors/kitchen/temp",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"celsius": 21.5}"#,
        )
        .await
        .unwrap();
    let r = runs(c, "sensor", 1).await;
    let out: serde_json::Value = serde_json::from_str(r[0].output.as_ref().unwrap().get()).unwrap();
    assert_eq!(out["payload"], json!({"celsius": 21.5}));
    assert_eq!(
        out["type"], "sensors.kitchen.temp",
        "the topic is the event type, slashes as dots"
    );
    // Bad configuration is refused at create.
    refused_driver(
        c,
        json!({"type": "mqtt", "config": {"url": "http://x", "topic": "a"}}),
        "mqtt://",
    )
    .await;
    t.stop().await;
}

/// A Kafka topic's records become runs in offset order; after a restart the driver resumes
/// at its stored offset (no record twice: the event id is topic-partition-offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_become_runs_in_order_and_resume_at_the_stored_offset() {
    let port = free_port();
    let _broker = tansu(port, "orders").await;
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(
        c,
        "ordered",
        ECHO,
        json!({"concurrency": {"maxWorkers": 1}}),
    )
    .await;
    produce(port, "orders", (0..3).map(|i| format!(r#"{{"i": {i}}}"#))).await;
    c.create(&object(
        Kind::EventDriver,
        "kafka",
        json!({"type": "kafka", "function": "ordered",
               "config": {"brokers": format!("127.0.0.1:{port}"), "topic": "orders"}}),
    ))
    .await
    .unwrap();
    driver_phase(c, "kafka", Phase::Connected).await;
    produce(port, "orders", (3..6).map(|i| format!(r#"{{"i": {i}}}"#))).await;
    let order = |runs: Vec<dispatch_core::Run>| -> Vec<i64> {
        runs.iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(r.input.get()).unwrap()["i"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    // From the earliest offset (records before the driver existed too), in order.
    assert_eq!(order(runs(c, "ordered", 6).await), [0, 1, 2, 3, 4, 5]);
    let dir = t.stop().await;
    let t = start_in(dir).await;
    let c = &t.client;
    driver_phase(c, "kafka", Phase::Connected).await;
    produce(port, "orders", [r#"{"i": 6}"#.to_string()]).await;
    let all = order(runs(c, "ordered", 7).await);
    assert_eq!(all, [0, 1, 2, 3, 4, 5, 6], "resumed at the stored offset");
    // Bad configuration is refused at create.
    refused_driver(
        c,
        json!({"type": "kafka", "config": {"brokers": "nowhere", "topic": "t"}}),
        "host:port",
    )
    .await;
    t.stop().await;
}

/// A JetStream durable consumer: messages become runs in stream order, including those
/// published while the server was stopped (the consumer resumes where its acks left it), and
/// a function whose queue is full holds the stream back instead of losing messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_messages_are_delivered_at_least_once_in_order() {
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let _broker = nats(port, Some(store.path())).await;
    let url = format!("nats://127.0.0.1:{port}");
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["js.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |from: i64, to: i64| {
        let js = js.clone();
        async move {
            for i in from..to {
                js.publish("js.order", format!(r#"{{"i": {i}}}"#).into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    };
    let t = start().await;
    let c = &t.client;
    images(c).await;
    // One queued run at a time: the rest of the stream waits in the broker (nak, delay).
    ready_function(
        c,
        "ordered",
        ECHO,
        json!({"concurrency": {"maxWorkers": 1}, "maxQueued": 1}),
    )
    .await;
    c.create(&object(
        Kind::EventDriver,
        "js",
        json!({"type": "nats", "function": "ordered",
               "config": {"url": url, "subject": "js.>", "stream": "ORDERS"}}),
    ))
    .await
    .unwrap();
    driver_phase(c, "js", Phase::Connected).await;
    publish(0, 8).await;
    let order = |runs: Vec<dispatch_core::Run>| -> Vec<i64> {
        runs.iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(r.input.get()).unwrap()["i"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(
        order(runs(c, "ordered", 8).await),
        (0..8).collect::<Vec<_>>()
    );
    let events = c.list_events(None, false, 100).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["event"]["id"].as_str() == Some("ORDERS-1")),
        "the event id is the stream sequence"
    );
    let dir = t.stop().await;
    publish(8, 11).await; // while no server consumes
    let t = start_in(dir).await;
    let c = &t.client;
    driver_phase(c, "js", Phase::Connected).await;
    assert_eq!(
        order(runs(c, "ordered", 11).await),
        (0..11).collect::<Vec<_>>(),
        "resumed after the last ack: nothing lost, nothing twice"
    );
    t.stop().await;
}

/// A driver with bad configuration is refused at create, saying `says`.
async fn refused_driver(c: &dispatch_client::Client, spec: serde_json::Value, says: &str) {
    let e = c
        .create(&object(Kind::EventDriver, "bad", spec))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(says), "{e}");
}

/// A Kafka driver whose broker is not there says so (ERROR with the reason) instead of
/// waiting with no status: rskafka's own retries are bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_driver_without_its_broker_says_error() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "ordered", ECHO, json!({})).await;
    c.create(&object(
        Kind::EventDriver,
        "nowhere",
        json!({"type": "kafka", "function": "ordered",
               "config": {"brokers": format!("127.0.0.1:{}", free_port()), "topic": "orders"}}),
    ))
    .await
    .unwrap();
    let o = driver_phase(c, "nowhere", Phase::Error).await;
    assert!(
        o.status.reason.contains("cannot connect to Kafka"),
        "{}",
        o.status.reason
    );
    t.stop().await;
}
