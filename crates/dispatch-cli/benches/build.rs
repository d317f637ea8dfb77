//! Time from `create function` to READY when the function's image is already built (pack,
//! upload, create, controller: unpack, start a worker that imports the handler, status), and
//! the cost of a no-op `dispatch apply` (the real binary, and the API calls it makes).
//!
//! `cargo bench -p dispatch-cli --bench build` (DISPATCH_BENCH_N: functions, default 40).
//! Needs PyPI once, for the image's dependency (six). Target: ≤ 300 ms p50 to READY.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dispatch_client::{Client, pack};
use dispatch_core::{Kind, Object, Phase};
use serde_json::json;

use support::pct_ms as pct;

async fn ready(c: &Client, kind: Kind, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let o = c.get(kind, name).await.unwrap();
        match o.phase() {
            Some(Phase::Ready) => return,
            Some(Phase::Error) => panic!("{name}: {}", o.status.reason),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{name} not ready");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn main() {
    let n = support::iterations(40);
    let support::Bench {
        server_rt,
        client_rt,
        dir,
        server,
        client: c,
        ..
    } = support::start(Default::default());
    let api = c.server().to_string();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python3-deps");
    let requirements = std::fs::read_to_string(examples.join("requirements.txt")).unwrap();

    client_rt.block_on(async {
        let t = Instant::now();
        c.create(&Object::new(
            Kind::Image,
            "default",
            "six",
            json!({"baseImage": "python3", "runtimeDependencies": {"manifest": requirements}}),
        ))
        .await
        .unwrap();
        ready(&c, Kind::Image, "six").await;
        println!("image with six (venv + pip install, one time): {:.0} ms", t.elapsed().as_secs_f64() * 1e3);

        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("f{i}");
            let file = dir.path().join(format!("{name}.py"));
            std::fs::write(&file, format!("import six\n\ndef handle(context, payload):\n    return {{'i': {i}, 'six': six.__version__}}\n")).unwrap();
            let t = Instant::now();
            let source = c.upload_source("default", &name, pack::pack_path(&file).unwrap()).await.unwrap();
            c.create(&Object::new(Kind::Function, "default", &name, json!({"image": "six", "source": source})))
                .await
                .unwrap();
            ready(&c, Kind::Function, &name).await;
            times.push(t.elapsed());
        }
        println!(
            "create function -> READY (image built), {n} functions: p50 {:.1} ms  p99 {:.1} ms  (target p50 <= 300 ms)",
            pct(&mut times, 0.5),
            pct(&mut times, 0.99)
        );
    });

    // No-op apply with the real binary (process start, config, pack + upload, GET + PUT per document).
    let manifest = examples.join("deps.yaml");
    let apply = || {
        Command::new(env!("CARGO_BIN_EXE_dispatch"))
            .args(["apply", "-f", manifest.to_str().unwrap()])
            .env("DISPATCH_SERVER", &api)
            .env("DISPATCH_CONFIG", dir.path().join("none.json"))
            .output()
            .unwrap()
    };
    let first = apply();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    client_rt.block_on(ready(&c, Kind::Function, "uses-six"));
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let out = apply();
        times.push(t.elapsed());
        assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
    }
    println!(
        "no-op `dispatch apply -f deps.yaml` (2 documents), {n} runs: p50 {:.1} ms  p99 {:.1} ms",
        pct(&mut times, 0.5),
        pct(&mut times, 0.99)
    );
    server_rt.block_on(server.stop()).unwrap();
}
