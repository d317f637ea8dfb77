//! Durable async enqueue (`POST …/runs?wait=false`: committed before the 202) and end-to-end
//! async throughput of the hello function.
//!
//! `cargo bench -p dispatch-cli --bench async` (DISPATCH_BENCH_N: enqueues, default 10000;
//! DISPATCH_BENCH_DATABASE=postgres://… for the PostgreSQL store, an empty database).
//! Enqueues go to a function that cannot run (its runs park), so the number is the queue's
//! own cost; 8 concurrent callers over loopback HTTP (DISPATCH_BENCH_CALLERS). Target: ≥ 5,000 enqueues/s,
//! p99 ≤ 5 ms on 2 cores.

mod support;

use std::time::{Duration, Instant};

use dispatch_client::{Client, RunQuery, pack};
use dispatch_core::{Kind, Object, Phase};
use dispatch_server::Options;
use serde_json::json;
use serde_json::value::RawValue;

const HELLO_PY: &str = include_str!("../../../examples/python3/hello.py");

use support::pct_ms as pct;

async fn function(c: &Client, dir: &std::path::Path, name: &str, image: &str) {
    let file = dir.join("hello.py");
    std::fs::write(&file, HELLO_PY).unwrap();
    let source = c
        .upload_source("default", name, pack::pack_path(&file).unwrap())
        .await
        .unwrap();
    c.create(&Object::new(
        Kind::Function,
        "default",
        name,
        json!({"image": image, "source": source}),
    ))
    .await
    .unwrap();
}

async fn settled(c: &Client, name: &str) -> Phase {
    loop {
        let p = c.get(Kind::Function, name).await.unwrap().phase();
        if matches!(p, Some(Phase::Ready | Phase::Error)) {
            return p.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    let n = support::iterations(10_000);
    let support::Bench {
        server_rt,
        client_rt,
        dir,
        server,
        client: c,
        ..
    } = support::start(Options {
        max_queue_depth: 10_000_000,
        max_queued_per_function: 10_000_000,
        max_queued_bytes: u64::MAX,
        ..Options::default()
    });

    client_rt.block_on(async {
        c.create(&Object::new(Kind::Image, "default", "py", json!({"baseImage": "python3"}))).await.unwrap();
        c.create(&Object::new(Kind::BaseImage, "default", "nowhere", json!({"image": "x", "language": "python3", "interpreter": "/nonexistent/python3"})))
            .await
            .unwrap();
        c.create(&Object::new(Kind::Image, "default", "parked", json!({"baseImage": "nowhere"}))).await.unwrap();
        function(&c, dir.path(), "hello", "py").await;
        function(&c, dir.path(), "parked", "parked").await;
        assert_eq!(settled(&c, "hello").await, Phase::Ready);
        assert_eq!(settled(&c, "parked").await, Phase::Error);

        // 1. Durable enqueue, 16 concurrent callers.
        let callers: usize = std::env::var("DISPATCH_BENCH_CALLERS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let input = RawValue::from_string(r#"{"name":"bench"}"#.into()).unwrap();
                let mut lat = Vec::with_capacity(n / callers);
                for _ in 0..n / callers {
                    let t = Instant::now();
                    c.exec_async("parked", &input, None).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let el = t.elapsed();
        println!(
            "durable enqueue ({} runs, {callers} concurrent callers): {:.0} enqueues/s  p50 {:.2} ms  p99 {:.2} ms  (target >= 5000/s, p99 <= 5 ms)",
            lat.len(),
            lat.len() as f64 / el.as_secs_f64(),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        );

        // 2. End to end: enqueue and run the hello function (maxWorkers 4).
        let m = (n / 5).max(100);
        let t = Instant::now();
        let input = RawValue::from_string(r#"{"name":"bench"}"#.into()).unwrap();
        for _ in 0..m {
            c.exec_async("hello", &input, None).await.unwrap();
        }
        loop {
            let q = RunQuery { function: Some("hello".into()), status: Some("succeeded".into()), limit: Some(m), ..Default::default() };
            if c.list_runs(&q).await.unwrap().len() >= m {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let el = t.elapsed();
        println!("end-to-end async hello ({m} runs, enqueue to all SUCCEEDED): {:.0} runs/s", m as f64 / el.as_secs_f64());
    });
    server_rt.block_on(server.stop()).unwrap();
}
