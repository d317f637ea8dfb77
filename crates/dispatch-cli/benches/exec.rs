//! Warm sync exec of the hello function: the bare worker round trip (the floor), via the API
//! (`POST …/functions/hello/runs`) and via the gateway (`GET /hello`), sequential over
//! loopback with keep-alive; then concurrent throughput through the API.
//!
//! `cargo bench -p dispatch-cli --bench exec` (DISPATCH_BENCH_N sets the iterations, default
//! 3000). Prints p50/p99/mean and req/s, and the platform's p50 overhead over the bare call
//! (DESIGN §10 target: ≤ 150 µs).

mod support;

use std::time::{Duration, Instant};

use dispatch_client::pack;
use dispatch_core::{Kind, Object};
use serde_json::json;
use serde_json::value::RawValue;

const HELLO_PY: &str = include_str!("../../../examples/python3/hello.py");

struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let pick = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    let total: Duration = v.iter().sum();
    Stats {
        p50: pick(0.50),
        p99: pick(0.99),
        mean: total / v.len() as u32,
    }
}

fn report(name: &str, s: &Stats) {
    println!(
        "{name:<28} p50 {:>7.1} µs   p99 {:>7.1} µs   mean {:>7.1} µs   {:>7.0} req/s (sequential)",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.mean.as_secs_f64() * 1e6,
        1.0 / s.mean.as_secs_f64()
    );
}

async fn measure<F, Fut>(n: usize, mut f: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..n / 10 {
        f().await; // warm-up
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed());
    }
    stats(v)
}

fn main() {
    let n = support::iterations(3000);
    let support::Bench {
        server_rt,
        client_rt,
        dir,
        server,
        client,
        local,
    } = support::start(Default::default());
    let gateway = format!("http://{}", server.gateway_addr);

    client_rt.block_on(async {
        client
            .create(&Object::new(
                Kind::Image,
                "default",
                "py",
                json!({"baseImage": "python3"}),
            ))
            .await
            .unwrap();
        let file = dir.path().join("hello.py");
        std::fs::write(&file, HELLO_PY).unwrap();
        let source = client
            .upload_source("default", "hello", pack::pack_path(&file).unwrap())
            .await
            .unwrap();
        client
            .create(&Object::new(
                Kind::Function,
                "default",
                "hello",
                json!({"image": "py", "source": source}),
            ))
            .await
            .unwrap();
        client
            .create(&Object::new(
                Kind::Endpoint,
                "default",
                "hello",
                json!({"function": "hello", "methods": ["GET"], "paths": ["/hello"]}),
            ))
            .await
            .unwrap();
        dispatch_cli::commands::bench::wait_ready(&client, "hello")
            .await
            .unwrap();
    });

    println!("warm sync exec of examples/python3/hello.py, {n} calls each, loopback\n");
    // 1. The floor: one worker of the same build, called directly over its socket pair
    // (what `dispatch bench` measures as its floor).
    let pool = local.pool("default", "hello").unwrap();
    let bare = client_rt
        .block_on(dispatch_cli::commands::bench::bare_worker(&pool, n))
        .unwrap();
    println!(
        "{:<28} p50 {:>7.1} µs   p99 {:>7.1} µs   {:>18.0} req/s (sequential)",
        "bare worker round trip", bare.p50_us, bare.p99_us, bare.rps
    );

    // 2. Through the API: HTTP + routing + pool + run record.
    let input = RawValue::from_string(r#"{"name":"bench"}"#.into()).unwrap();
    let via_api = client_rt.block_on(measure(n, || async {
        let r = client.exec("hello", &input).await.unwrap();
        assert!(r.envelope.context.error.is_none());
    }));
    report("API  POST …/hello/runs", &via_api);

    // 3. Through the gateway.
    let http = reqwest::Client::new();
    let url = format!("{gateway}/hello?name=bench");
    let via_gw = client_rt.block_on(measure(n, || async {
        let r = http.get(&url).send().await.unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
    }));
    report("gateway GET /hello", &via_gw);

    // 4. Concurrent throughput via the API (maxWorkers 4, 8 callers).
    let total = n * 2;
    let t = Instant::now();
    client_rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                let input = RawValue::from_string(r#"{"name":"bench"}"#.into()).unwrap();
                for _ in 0..total / 8 {
                    c.exec("hello", &input).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let el = t.elapsed();
    println!(
        "{:<28} {:>7.0} req/s ({total} calls, 8 concurrent callers, maxWorkers 4)",
        "API concurrent",
        total as f64 / el.as_secs_f64()
    );

    let over = |s: &Stats| s.p50.as_secs_f64() * 1e6 - bare.p50_us;
    println!(
        "\nplatform overhead at p50: API {:+.1} µs, gateway {:+.1} µs (target ≤ 150 µs)",
        over(&via_api),
        over(&via_gw)
    );
    server_rt.block_on(server.stop()).unwrap();
}
