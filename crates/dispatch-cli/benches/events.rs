//! Event ingest → run start latency (a subscribed hello function) and events per second.
//!
//! `cargo bench -p dispatch-cli --bench events` (DISPATCH_BENCH_N, default 300).
//! Target: ingest → run start p50 ≤ 5 ms.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dispatch_client::pack;
use dispatch_core::{Kind, Object, Phase};
use dispatch_server::Options;
use serde_json::json;

const HELLO_PY: &str = include_str!("../../../examples/python3/hello.py");

use support::pct;

fn main() {
    let n = support::iterations(300);
    let support::Bench {
        server_rt,
        client_rt,
        dir,
        server,
        client: c,
        ..
    } = support::start(Options {
        max_queue_depth: 10_000_000,
        ..Options::default()
    });
    client_rt.block_on(async {
        c.create(&Object::new(Kind::Image, "default", "py", json!({"baseImage": "python3"}))).await.unwrap();
        let file = dir.path().join("hello.py");
        std::fs::write(&file, HELLO_PY).unwrap();
        let source = c.upload_source("default", "hello", pack::pack_path(&file).unwrap()).await.unwrap();
        c.create(&Object::new(Kind::Function, "default", "hello", json!({"image": "py", "source": source}))).await.unwrap();
        while c.get(Kind::Function, "hello").await.unwrap().phase() != Some(Phase::Ready) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.create(&Object::new(Kind::Subscription, "default", "orders", json!({"eventType": "order.created", "function": "hello"})))
            .await
            .unwrap();

        // 1. Ingest → run start, one event at a time.
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let t0 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as f64 / 1e3;
            let ev = json!({"specversion": "1.0", "id": format!("l{i}"), "source": "/bench", "type": "order.created", "data": {"name": "bench"}});
            let r = c.emit(&ev).await.unwrap();
            let id = r["matched"][0]["runId"].as_str().unwrap().to_string();
            let run = loop {
                let run = c.get_run(&id).await.unwrap();
                if run.status.is_final() {
                    break run;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let started = run.started_at.unwrap().as_microsecond() as f64 / 1e3;
            lat.push(started - t0);
        }
        println!(
            "event ingest -> run start ({n} events, one at a time): p50 {:.2} ms  p99 {:.2} ms  (target p50 <= 5 ms)",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        );

        // 2. Ingest throughput: unmatched events (stored), then matched ones (stored + a durable run each).
        for (label, ty) in [("unmatched", "user.signup"), ("matched", "order.created")] {
            let m = n * 4;
            let t = Instant::now();
            for i in 0..m {
                let ev = json!({"specversion": "1.0", "id": format!("{label}{i}"), "source": "/bench", "type": ty, "data": {}});
                c.emit(&ev).await.unwrap();
            }
            println!("ingest, {label}: {:.0} events/s ({m} sequential POSTs)", m as f64 / t.elapsed().as_secs_f64());
        }
    });
    server_rt.block_on(server.stop()).unwrap();
}
