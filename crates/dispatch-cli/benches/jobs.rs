//! Job executions: latency from `PUT /execute` to the job's process running (the process
//! prints the wall-clock time it started, `date +%s%N`), and executions per second.
//!
//! `cargo bench -p dispatch-cli --bench jobs` (DISPATCH_BENCH_N, default 200).
//! Target (issue 6): PUT → process running ≤ 20 ms p50.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dispatch_client::{Client, Target};
use dispatch_core::{JobPhase, Kind, Object};
use dispatch_runtime::LocalBackend;
use dispatch_server::{Options, Server};
use dispatch_store::{BlobStore, SqliteStore};
use serde_json::json;

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

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
    dispatch_client::install_crypto_provider();
    let n: usize = std::env::var("DISPATCH_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        jobs_dir: dir.path().join("jobs"),
        auth: false,
        ..Options::default()
    };
    let server = server_rt.block_on(async {
        let store = Arc::new(SqliteStore::open(&dir.path().join("dispatch.db")).unwrap());
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let local = LocalBackend::new(dir.path()).unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Server::serve_with(store, blobs, local, api, gw, options).await
    });
    let c = Client::new(&Target {
        server: format!("http://{}", server.api_addr),
        token: None,
        namespace: "default".into(),
        insecure: false,
    })
    .unwrap();
    let job = |cmd: serde_json::Value| {
        json!({"jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": cmd}]}}}}, "maxActive": 50})
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
