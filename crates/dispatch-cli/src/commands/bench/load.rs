//! The warm load generator: keep-alive HTTP/1.1 connections (hyper), one per concurrent
//! caller, on a thread of their own; req/s and latency percentiles.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::*;

#[derive(Clone)]
pub(super) struct Request {
    addr: SocketAddr,
    method: hyper::Method,
    path: String,
    body: Bytes,
}

impl Request {
    pub(super) fn get(addr: SocketAddr, path: &str) -> Request {
        Request {
            addr,
            method: hyper::Method::GET,
            path: path.into(),
            body: Bytes::new(),
        }
    }

    pub(super) fn post(addr: SocketAddr, path: &str, body: &'static str) -> Request {
        Request {
            addr,
            method: hyper::Method::POST,
            path: path.into(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    pub(super) fn build(&self) -> hyper::Request<Full<Bytes>> {
        let mut b = hyper::Request::builder()
            .method(self.method.clone())
            .uri(&self.path)
            .header(hyper::header::HOST, self.addr.to_string());
        if !self.body.is_empty() {
            b = b.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(self.body.clone()))
            .expect("a request of constant parts")
    }
}

/// `concurrency` keep-alive connections sending `req` back to back for `duration` (after a
/// warm-up), on a thread and runtime of their own.
pub(super) async fn load(
    via: &'static str,
    req: Request,
    concurrency: usize,
    duration: Duration,
) -> Result<Load> {
    let warmup = duration / 5;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-load".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let out = match rt {
                Ok(rt) => rt.block_on(async {
                    let (warm, _, _) = run_load(&req, concurrency, warmup).await?;
                    anyhow::Ok((warm.len(), run_load(&req, concurrency, duration).await?))
                }),
                Err(e) => Err(e.into()),
            };
            let _ = tx.send(out);
        })?;
    let (warmup_requests, (mut lat, error_statuses, el)) =
        rx.await.context("the load thread died")??;
    let errors = error_statuses.values().sum();
    let requests = lat.len();
    if requests == 0 {
        bail!("no request via {via} succeeded ({errors} errors)");
    }
    Ok(Load {
        via,
        concurrency,
        requests,
        errors,
        error_statuses,
        rps: requests as f64 / el,
        p50_us: pct(&mut lat, 0.50),
        p99_us: pct(&mut lat, 0.99),
        warmup_requests,
    })
}

/// Latencies (µs) of successful requests, the failed ones by status and the elapsed seconds.
pub(super) async fn run_load(
    req: &Request,
    concurrency: usize,
    duration: Duration,
) -> Result<(Vec<f64>, std::collections::BTreeMap<u16, usize>, f64)> {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let req = req.clone();
        tasks.spawn(async move {
            let stream = tokio::net::TcpStream::connect(req.addr).await?;
            stream.set_nodelay(true)?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(4096);
            let mut errors = std::collections::BTreeMap::<u16, usize>::new();
            while Instant::now() < end {
                let t = Instant::now();
                send.ready().await?;
                let resp = send.send_request(req.build()).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                if status.is_success() {
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                } else {
                    if errors.is_empty() {
                        tracing::warn!(%status, body = %String::from_utf8_lossy(&body), "a failed request");
                    }
                    *errors.entry(status.as_u16()).or_default() += 1;
                }
            }
            anyhow::Ok((lat, errors))
        });
    }
    let mut all = Vec::new();
    let mut errors = std::collections::BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (lat, e) = r??;
        all.extend(lat);
        for (status, n) in e {
            *errors.entry(status).or_default() += n;
        }
    }
    Ok((all, errors, start.elapsed().as_secs_f64()))
}
