//! Streamed answers (issue 22): the time to the first chunk added by the platform over the
//! bare worker, and the throughput of 64 KiB chunks through the gateway.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dispatch_core::{Kind, Object};
use dispatch_runtime::worker::Worker;
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::{Setup, pct, pool, wait_ready};

/// A generator: one small chunk then another 5 ms later (time to first byte), or `n` chunks
/// of 64 KiB (throughput).
const STREAM_PY: &str = r#"import time
def handle(context, payload):
    n = (payload or {}).get("n")
    if n:
        chunk = "x" * 65536
        for _ in range(n):
            yield chunk
        return
    yield "first"
    time.sleep(0.005)
    yield "second"
"#;

#[derive(Debug, Serialize)]
pub struct Streaming {
    pub samples: usize,
    /// From the request to the first chunk: the worker alone, and through the gateway.
    pub ttfb_bare_p50_us: f64,
    pub ttfb_bare_p99_us: f64,
    pub ttfb_gateway_p50_us: f64,
    pub ttfb_gateway_p99_us: f64,
    /// What the gateway adds to the first chunk, at p50.
    pub ttfb_added_p50_us: f64,
    /// 64 KiB chunks read through the gateway by one client, MiB/s.
    pub throughput_mib_s: f64,
    pub throughput_mib: u64,
}

pub async fn streaming(s: &Setup, samples: usize, mib: u64) -> Result<Streaming> {
    let file = s._dir.path().join("stream.py");
    std::fs::write(&file, STREAM_PY)?;
    let src = super::super::upload(&s.client, "default", "stream", &file).await?;
    s.client
        .create(&Object::new(
            Kind::Function,
            "default",
            "stream",
            json!({"image": "py", "source": src, "handler": "stream.handle", "timeout": "120s"}),
        ))
        .await?;
    wait_ready(&s.client, "stream").await?;
    s.client
        .create(&Object::new(
            Kind::Endpoint,
            "default",
            "stream",
            json!({"function": "stream", "methods": ["POST"], "paths": ["/stream"]}),
        ))
        .await?;

    // The bare worker: a request on its socket, a sink, the first chunk out of it.
    let spec = pool(&s.local, "stream")?.config().worker.clone();
    let mut w = Worker::start(&spec, Duration::from_secs(10)).await?;
    let ctx = RawValue::from_string(r#"{"function":"stream","namespace":"default"}"#.into())?;
    let payload = RawValue::from_string("{}".into())?;
    let mut bare = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let (sink, opened) = dispatch_runtime::Sink::new(16);
        let t0 = Instant::now();
        let first = async {
            let mut rx = opened.await.ok()?;
            rx.recv().await?;
            let at = t0.elapsed();
            while rx.recv().await.is_some() {}
            Some(at)
        };
        let (wr, c, p) = (&mut w, &*ctx, &*payload);
        let caller = async move {
            let r = wr
                .call(
                    c,
                    p,
                    Duration::from_secs(10),
                    Duration::from_secs(10),
                    Some(&sink),
                )
                .await;
            drop(sink);
            r
        };
        let (answer, at) = tokio::join!(caller, first);
        answer.map_err(|e| anyhow::anyhow!("bare streamed call failed: {}", e.error.message))?;
        let at = at.context("the bare worker streamed nothing")?;
        if i >= samples / 10 {
            bare.push(at.as_secs_f64() * 1e6);
        }
    }

    // Through the gateway: one keep-alive connection (hyper, nodelay) on a thread and runtime
    // of its own, as the warm loads.
    let addr = s.gateway;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-stream".into())
        .spawn(move || {
            let out = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(through_gateway(addr, samples, mib)));
            let _ = tx.send(out);
        })?;
    let (mut gateway, bytes, took) = rx.await.context("the stream thread died")??;

    let (b50, b99) = (pct(&mut bare, 0.5), pct(&mut bare, 0.99));
    let (g50, g99) = (pct(&mut gateway, 0.5), pct(&mut gateway, 0.99));
    Ok(Streaming {
        samples,
        ttfb_bare_p50_us: b50,
        ttfb_bare_p99_us: b99,
        ttfb_gateway_p50_us: g50,
        ttfb_gateway_p99_us: g99,
        ttfb_added_p50_us: g50 - b50,
        throughput_mib_s: bytes as f64 / (1024.0 * 1024.0) / took,
        throughput_mib: mib,
    })
}

/// Times to the first chunk (µs) of `samples` streamed calls, then the bytes and seconds of one
/// call streaming `mib` MiB of 64 KiB chunks.
async fn through_gateway(
    addr: std::net::SocketAddr,
    samples: usize,
    mib: u64,
) -> Result<(Vec<f64>, u64, f64)> {
    use http_body_util::{BodyExt as _, Full};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = |body: String| {
        hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri("/stream")
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .expect("a request of constant parts")
    };
    let mut firsts = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        send.ready().await?;
        let t0 = Instant::now();
        let resp = send.send_request(request("{}".into())).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "the streamed call failed: {}",
            resp.status()
        );
        let mut body = resp.into_body();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            if frame?.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
                first = Some(t0.elapsed());
            }
        }
        let first = first.context("the gateway streamed nothing")?;
        if i >= samples / 10 {
            firsts.push(first.as_secs_f64() * 1e6);
        }
    }
    let n = mib * 16; // 64 KiB chunks
    send.ready().await?;
    let t0 = Instant::now();
    let resp = send
        .send_request(request(json!({ "n": n }).to_string()))
        .await?;
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            bytes += d.len() as u64;
        }
    }
    let took = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        bytes == n * 65536,
        "the stream ended after {bytes} of {} bytes",
        n * 65536
    );
    Ok((firsts, bytes, took))
}
