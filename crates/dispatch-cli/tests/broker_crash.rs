//! At-least-once broker drivers across `kill -9`: a stream of messages, the
//! server killed in the middle of it (more messages arrive while it is down), a restart on
//! the same data dir — and every message ends in exactly one run: each message has a stable
//! event id (JetStream: the stream sequence; Kafka: the offset; MQTT: a number the driver
//! stores before offering it, given again to the broker's redelivery of that message), so the
//! message stored but not yet acknowledged at the kill is dropped as a duplicate.

mod support;

use std::collections::BTreeMap;

use dispatch_testkit::brokers;
use std::time::Duration;

use support::*;

const MESSAGES: i64 = 300;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    JetStream,
    Mqtt,
    Kafka,
}

/// Starts the broker for `kind` (its stream or topic made), returns it and the driver's
/// `type` and config.
async fn start_broker(
    kind: Kind,
    port: u16,
    store: &std::path::Path,
) -> (brokers::Broker, &'static str, serde_json::Value) {
    match kind {
        Kind::JetStream => {
            let b = brokers::nats(port, Some(store)).await;
            let url = format!("nats://127.0.0.1:{port}");
            let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
            js.create_stream(async_nats::jetstream::stream::Config {
                name: "ORDERS".into(),
                subjects: vec!["orders.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
            (
                b,
                "nats",
                serde_json::json!({"url": url, "subject": "orders.>", "stream": "ORDERS"}),
            )
        }
        Kind::Mqtt => (
            brokers::mosquitto(port).await,
            "mqtt",
            serde_json::json!({"url": format!("mqtt://127.0.0.1:{port}"), "topic": "orders/#"}),
        ),
        Kind::Kafka => (
            brokers::tansu(port, "orders").await,
            "kafka",
            serde_json::json!({"brokers": format!("127.0.0.1:{port}"), "topic": "orders"}),
        ),
    }
}

/// Publishes messages `{"i": from..to}` to the broker, each one confirmed by it.
async fn publish(kind: Kind, port: u16, from: i64, to: i64) {
    let body = |i: i64| format!(r#"{{"i": {i}}}"#);
    match kind {
        Kind::JetStream => {
            let url = format!("nats://127.0.0.1:{port}");
            let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
            for i in from..to {
                js.publish("orders.created", body(i).into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
        Kind::Mqtt => {
            let mut opts = rumqttc::MqttOptions::new(format!("producer-{from}"), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 512);
            for i in from..to {
                client
                    .publish("orders/created", rumqttc::QoS::AtLeastOnce, false, body(i))
                    .await
                    .unwrap();
            }
            // Every publish confirmed by the broker (PUBACK) before this returns.
            let mut acked = 0;
            while acked < to - from {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                    eventloop.poll().await.unwrap()
                {
                    acked += 1;
                }
            }
        }
        Kind::Kafka => brokers::produce(port, "orders", (from..to).map(body)).await,
    }
}

/// The `i` of every succeeded run of `sink`, with how many runs each had.
fn runs_by_i(s: &ServerProc, rt: &tokio::runtime::Runtime) -> BTreeMap<i64, usize> {
    let q = dispatch_client::RunQuery {
        function: Some("sink".into()),
        status: Some("succeeded".into()),
        limit: Some(10_000),
        ..Default::default()
    };
    let runs = rt.block_on(s.client().list_runs(&q)).unwrap_or_default();
    let mut by = BTreeMap::new();
    for r in runs {
        let v: serde_json::Value = serde_json::from_str(r.input.get()).unwrap();
        *by.entry(v["i"].as_i64().unwrap()).or_default() += 1;
    }
    by
}

fn kill9_mid_stream(kind: Kind) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = brokers::free_port();
    let store = tempfile::tempdir().unwrap();
    let (_broker, driver_type, config) = rt.block_on(start_broker(kind, port, store.path()));
    let s = ServerProc::start();
    let work = s.dir.path();
    std::fs::write(
        work.join("sink.py"),
        "def handle(context, payload):\n    return payload\n",
    )
    .unwrap();
    let manifest = work.join("bus.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: dispatch.dev/v1\nkind: Image\nmetadata: {{name: py}}\nspec: {{baseImage: python3}}\n---\n\
             apiVersion: dispatch.dev/v1\nkind: Function\nmetadata: {{name: sink}}\nspec: {{image: py, sourcePath: sink.py}}\n---\n\
             apiVersion: dispatch.dev/v1\nkind: EventDriver\nmetadata: {{name: bus}}\n\
             spec: {{type: {driver_type}, function: sink, config: {config}}}\n"
        ),
    )
    .unwrap();
    s.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    // A timeout says what was seen last (it once timed out in a loaded full run, silently).
    let seen = std::cell::RefCell::new(String::new());
    let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually("sink READY and the driver CONNECTED", || {
            let f = s.json(&["get", "function", "sink", "-o", "json"])["status"].clone();
            let d = s.json(&["get", "eventdriver", "bus", "-o", "json"])["status"].clone();
            *seen.borrow_mut() = format!("function {f}, driver {d}");
            (f["phase"] == "READY" && d["phase"] == "CONNECTED").then_some(())
        })
    }));
    if ready.is_err() {
        panic!(
            "timed out waiting for sink READY and the driver CONNECTED: last {}",
            seen.borrow()
        );
    }
    // The stream; the server is killed once a sixth of it has run.
    let producer = rt.spawn(publish(kind, port, 0, MESSAGES));
    eventually("50 runs before the kill", || {
        (runs_by_i(&s, &rt).len() >= 50).then_some(())
    });
    let dir = s.kill9();
    rt.block_on(producer).unwrap();
    let before = dir.path().to_path_buf();
    let s = ServerProc::start_in(dir);
    assert_eq!(s.dir.path(), before);
    let last = std::cell::RefCell::new(BTreeMap::new());
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually("a run for every message", || {
            let by = runs_by_i(&s, &rt);
            *last.borrow_mut() = by.clone();
            (by.len() == MESSAGES as usize).then_some(by)
        })
    }));
    let by = found.unwrap_or_else(|_| {
        let seen = last.borrow();
        let missing: Vec<i64> = (0..MESSAGES).filter(|i| !seen.contains_key(i)).collect();
        panic!(
            "{kind:?}: {} of {MESSAGES} messages ran; missing {missing:?}; driver {}",
            seen.len(),
            s.json(&["get", "eventdriver", "bus", "-o", "json"])["status"]
        )
    });
    assert_eq!(
        by.keys().copied().collect::<Vec<_>>(),
        (0..MESSAGES).collect::<Vec<_>>()
    );
    let twice: Vec<i64> = by
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, _)| *i)
        .collect();
    eprintln!("{kind:?}: {MESSAGES} messages, each ran; twice: {twice:?}");
    assert!(twice.is_empty(), "{kind:?}: ran twice: {twice:?}");
}

#[test]
fn jetstream_loses_nothing_across_kill_9() {
    kill9_mid_stream(Kind::JetStream);
}

#[test]
fn mqtt_loses_nothing_across_kill_9() {
    kill9_mid_stream(Kind::Mqtt);
}

#[test]
fn kafka_loses_nothing_across_kill_9() {
    kill9_mid_stream(Kind::Kafka);
}
