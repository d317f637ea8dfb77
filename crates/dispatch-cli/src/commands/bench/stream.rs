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
    /// One 1-byte TCP round trip over loopback between the same client and an echo task on
    /// the server's runtime, each after 5 ms idle as the streamed calls' requests: the floor
    /// under `ttfb_added` on this machine (a gateway is one such hop more than the bare
    /// worker, whatever it does).
    pub loopback_rtt_p50_us: f64,
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
    let echo = echo_server().await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-stream".into())
        .spawn(move || {
            let out = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        let floor = round_trips(echo, samples).await?;
                        Ok((floor, through_gateway(addr, samples, mib).await?))
                    })
                });
            let _ = tx.send(out);
        })?;
    let (mut floor, (mut gateway, bytes, took)) = rx.await.context("the stream thread died")??;

    let (b50, b99) = (pct(&mut bare, 0.5), pct(&mut bare, 0.99));
    let (g50, g99) = (pct(&mut gateway, 0.5), pct(&mut gateway, 0.99));
    Ok(Streaming {
        samples,
        ttfb_bare_p50_us: b50,
        ttfb_bare_p99_us: b99,
        ttfb_gateway_p50_us: g50,
        ttfb_gateway_p99_us: g99,
        ttfb_added_p50_us: g50 - b50,
        loopback_rtt_p50_us: pct(&mut floor, 0.5),
        throughput_mib_s: bytes as f64 / (1024.0 * 1024.0) / took,
        throughput_mib: mib,
    })
}

/// A task on this (the server's) runtime that echoes what one connection sends.
async fn echo_server() -> Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        let _ = conn.set_nodelay(true);
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = conn.read(&mut buf).await {
            if conn.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    Ok(addr)
}

/// `samples` 1-byte round trips (µs) to the echo at `addr`, each after 5 ms idle (the
/// streamed handler's pause between its chunks, which idles the machine before each request).
async fn round_trips(addr: std::net::SocketAddr, samples: usize) -> Result<Vec<f64>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    let mut out = Vec::with_capacity(samples);
    let mut byte = [0u8; 1];
    for _ in 0..samples {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t0 = Instant::now();
        conn.write_all(b"x").await?;
        conn.read_exact(&mut byte).await?;
        out.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
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

/// Opens `n` WebSocket connections (raw upgrade requests, asyncio, in its own process so
/// that only the server's side counts in this process's memory), says `ready N`, and holds
/// them until its stdin closes.
const WS_CLIENTS_PY: &str = r#"import asyncio, sys
host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
REQ = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
       % (path, host, port)).encode()
async def one():
    r, w = await asyncio.open_connection(host, port)
    w.write(REQ)
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit("not upgraded: %r" % head[:300])
    return r, w
async def main():
    held = []
    while len(held) < n:
        held += await asyncio.gather(*(one() for _ in range(min(200, n - len(held)))))
    print("ready", len(held), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"#;

#[derive(Debug, Serialize)]
pub struct IdleWebSockets {
    pub connections: usize,
    /// This process's RSS (the server; the clients are another process) before and with
    /// them open.
    pub rss_before_kib: u64,
    pub rss_open_kib: u64,
    pub bytes_per_connection: f64,
    /// Opening them all (upgrade requests, 200 at a time).
    pub open_seconds: f64,
}

fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `n` idle WebSocket connections held by the gateway: the server's memory per connection.
pub async fn idle_websockets(s: &Setup, n: usize) -> Result<IdleWebSockets> {
    s.client
        .create(&Object::new(
            Kind::Endpoint,
            "default",
            "ws-idle",
            json!({"function": "hello", "paths": ["/ws-idle"], "protocol": "websocket"}),
        ))
        .await?;
    let probe = format!("http://{}/ws-idle", s.gateway);
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    // Routed when a plain GET is told to upgrade.
    while http.get(&probe).send().await?.status() != 426 {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "the WebSocket endpoint was not routed"
        );
        tokio::task::yield_now().await;
    }
    let before = own_rss_kib();
    let started = Instant::now();
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", WS_CLIENTS_PY])
        .arg(s.gateway.ip().to_string())
        .arg(s.gateway.port().to_string())
        .args(["/ws-idle", &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("python3 for the WebSocket clients")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        child.stdout.take().context("the clients' stdout")?,
    ));
    let said = lines.next_line().await?.unwrap_or_default();
    anyhow::ensure!(
        said == format!("ready {n}"),
        "the WebSocket clients did not all connect ({said:?})"
    );
    let open_seconds = started.elapsed().as_secs_f64();
    let open = own_rss_kib();
    drop(child.stdin.take());
    let _ = child.wait().await;
    Ok(IdleWebSockets {
        connections: n,
        rss_before_kib: before,
        rss_open_kib: open,
        bytes_per_connection: (open.saturating_sub(before) * 1024) as f64 / n as f64,
        open_seconds,
    })
}
