//! Job executions: latency from `PUT /execute` to the job's process running (the process
//! prints the wall-clock time it started, `date +%s%N`), and executions per second.
//!
//! `cargo bench -p dispatch-cli --bench jobs` (DISPATCH_BENCH_N, default 200).
//! Target: PUT → process running ≤ 20 ms p50.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dispatch_client::Client;
use dispatch_core::{JobPhase, Kind, Object};
use dispatch_server::Options;
use serde_json::json;

use support::pct;

async fn ended(c: &Client, uuid: &str) -> dispatch_core::JobExecution {
    loop {
        let j = c.get_job(uuid).await.unwrap();
        if j.phase.is_final() {
            assert_eq!(j.phase, JobPhase::Completed, "{}", j.reason);
            return j;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn main() {
    let n = support::iterations(200);
    let support::Bench {
        server_rt,
        client_rt,
        server,
        client: c,
        ..
    } = support::start(Options::default());
    let job = |cmd: serde_json::Value| {
        json!({"jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": cmd}]}}}}, "maxActive": 50,
            // The process tier (this bench measures the runner, not image pulls).
            "runtime": "host"})
    };
    client_rt.block_on(async {
        c.create(&Object::new(Kind::JobTemplate, "default", "clock", job(json!(["date", "+%s%N"])))).await.unwrap();
        c.create(&Object::new(Kind::JobTemplate, "default", "noop", job(json!(["true"])))).await.unwrap();

        let mut to_process = Vec::with_capacity(n);
        let mut to_started = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as f64;
            let v = c.execute("clock", b"x".to_vec()).await.unwrap();
            let j = ended(&c, v["uuid"].as_str().unwrap()).await;
            let ran: f64 = j.logs.stdout[0].trim().parse().unwrap();
            to_process.push((ran - t0) / 1e6);
            let started = j.started_at.unwrap().duration_since(j.created_at).as_secs_f64() * 1e3;
            to_started.push(started);
        }
        println!(
            "PUT /execute -> process running ({n} sequential): p50 {:.2} ms  p99 {:.2} ms  (target p50 <= 20 ms)",
            pct(&mut to_process, 0.5),
            pct(&mut to_process, 0.99)
        );
        println!(
            "  of which created -> Active (server side): p50 {:.2} ms  p99 {:.2} ms",
            pct(&mut to_started, 0.5),
            pct(&mut to_started, 0.99)
        );

        let m = n * 2;
        let t = Instant::now();
        let mut ids = Vec::with_capacity(m);
        for _ in 0..m {
            ids.push(c.execute("noop", Vec::new()).await.unwrap()["uuid"].as_str().unwrap().to_string());
        }
        for id in &ids {
            ended(&c, id).await;
        }
        println!("executions/s ({m} runs of `true`, maxActive 50): {:.0}", m as f64 / t.elapsed().as_secs_f64());
    });
    server_rt.block_on(server.stop()).unwrap();
}
