//! Scale: many registered functions and endpoints — registration and list time, route
//! lookup, and the RSS per function of a server process of its own.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_client::Client;
use dispatch_core::{Kind, Object};
use serde_json::json;

use super::*;

/// Registers `n` functions (the hello code, so one build) with an endpoint each.
pub(super) async fn scale(s: &Setup, n: usize) -> Result<Scale> {
    let state = &s.server.state;
    let lookup_ns = |path: &str| {
        let routes = state.routes();
        let iters = 100_000;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(routes.find(None, "GET", std::hint::black_box(path)));
        }
        t.elapsed().as_secs_f64() * 1e9 / iters as f64
    };
    let one = lookup_ns("/hello");
    let src = s
        .client
        .get(Kind::Function, "hello")
        .await?
        .spec
        .get("source")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .context("hello has no source")?;
    // Memory is measured after the allocator has seen a warm-up of the same work.
    let t = Instant::now();
    register(&s.client, 0..n, &src).await?;
    let last = format!("f{}", n - 1);
    let deadline = Instant::now() + Duration::from_secs(600);
    while (0..n).any(|i| s.local.pool("default", &format!("f{i}")).is_none()) {
        if Instant::now() > deadline {
            bail!("the {n} functions were not all deployed within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let register_seconds = t.elapsed().as_secs_f64();
    let mut lists = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let all = s.client.list(Kind::Function).await?;
        lists.push(t.elapsed().as_secs_f64() * 1e3);
        if all.len() < n {
            bail!("listed {} functions, expected at least {n}", all.len());
        }
    }
    let all = lookup_ns(&format!("/{last}"));
    let gw = load(
        "gateway",
        Request::get(s.gateway, &format!("/{last}?name=bench")),
        1,
        Duration::from_millis(500),
    )
    .await?;
    let (rss_before, rss_after) = server_rss(n).await?;
    Ok(Scale {
        functions: n,
        register_seconds,
        list_ms: pct(&mut lists, 0.5),
        route_lookup_ns_one: one,
        route_lookup_ns_all: all,
        gateway_p50_us_last: gw.p50_us,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_function_bytes: (rss_after.saturating_sub(rss_before) * 1024) as f64 / n as f64,
    })
}

/// Creates functions `f{i}` for `i` in `range` (all of source `src` on image `py`) with an
/// endpoint each, from 8 concurrent callers.
pub(super) async fn register(
    client: &Client,
    range: std::ops::Range<usize>,
    src: &str,
) -> Result<()> {
    let workers = 8;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let client = client.clone();
        let src = src.to_string();
        tasks.spawn(async move {
            for i in (range.start + w..range.end).step_by(workers) {
                let name = format!("f{i}");
                client
                    .create(&Object::new(
                        Kind::Function,
                        "default",
                        &name,
                        json!({"image": "py", "source": src}),
                    ))
                    .await?;
                client
                    .create(&Object::new(
                        Kind::Endpoint,
                        "default",
                        &name,
                        json!({"function": name, "methods": ["GET"], "paths": [format!("/{name}")]}),
                    ))
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// The server's RSS (KiB) before and after registering `n` functions with endpoints, on a
/// `dispatch server` process of its own: this process also runs the client and the load
/// generator, whose memory is not the server's.
pub(super) async fn server_rss(n: usize) -> Result<(u64, u64)> {
    let dir = tempfile::Builder::new()
        .prefix("dispatch-bench-rss-")
        .tempdir()?;
    let server = process::ServerProcess::start(dir.path(), &[]).await?;
    let client = server.client.clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    let wait = |what: String| {
        if Instant::now() > deadline {
            bail!("{what} within 10 minutes");
        }
        Ok(())
    };
    client
        .create(&Object::new(
            Kind::Image,
            "default",
            "py",
            json!({"baseImage": "python3"}),
        ))
        .await?;
    let src_dir = tempfile::tempdir()?;
    let py = src_dir.path().join("hello.py");
    std::fs::write(&py, HELLO_PY)?;
    let src = super::super::upload(&client, "default", "hello", &py).await?;
    // One function first, so that the image, the zygote and the allocator are warm.
    register(&client, 0..1, &src).await?;
    let ready = |client: Client, want: usize| async move {
        let all = client.list(Kind::Function).await?;
        anyhow::Ok(
            all.iter()
                .filter(|f| f.phase() == Some(dispatch_core::Phase::Ready))
                .count()
                >= want,
        )
    };
    while !ready(client.clone(), 1).await? {
        wait("the first function was not READY".into())?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = server.sample().rss_kib;
    register(&client, 1..n + 1, &src).await?;
    while !ready(client.clone(), n + 1).await? {
        wait(format!("the {n} functions were not all READY"))?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok((before, server.sample().rss_kib))
}
