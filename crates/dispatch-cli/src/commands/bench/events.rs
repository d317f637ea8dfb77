//! `dispatch bench events`: CloudEvents ingest speed, end-to-end delivery, and
//! what a producer sees at 3× the rate the function keeps up with — 429s with Retry-After,
//! and not one accepted event undelivered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use dispatch_core::{Kind, Object};
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::json;

use super::process::ServerProcess;

/// CloudEvents ingest, delivery and overload on a server of its own
#[derive(Debug, Clone, clap::Args)]
#[command(
    long_about = "Starts a `dispatch server` process of its own (temporary data dir, auth off, \
loopback) with one subscription (order.created → a Python function that returns at once) and \
measures three phases. ingest: CONCURRENCY producers post structured CloudEvents back to back \
for DURATION (events/s accepted, p50/p99 of the 202). delivery: the time until every accepted \
event's run has finished (events/s end to end). overload: producers post at 3× that delivery \
rate for DURATION against a server whose namespace holds at most --pending-limit pending \
deliveries; the excess gets 429 with Retry-After. At the end every accepted event must have \
been queued and run (exit code 1 otherwise).\n\nExample: dispatch bench events --duration 10s"
)]
pub struct Events {
    /// How long each load phase runs
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Producers (keep-alive connections) of the ingest phase
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// The server's --max-pending-deliveries (small, so that the overload phase reaches it)
    #[arg(long, default_value_t = 2_000)]
    pub pending_limit: usize,
    /// Isolation of the server's workers
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "none"])]
    pub isolation: String,
    /// Output format: table or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub phase: &'static str,
    /// Events offered per second (overload: the target rate).
    pub offered_per_s: f64,
    pub accepted: u64,
    pub accepted_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Answers by status (202 accepted, 429 refused, …).
    pub statuses: BTreeMap<u16, u64>,
    /// Seconds from the first event until every accepted event's run finished.
    pub delivered_in_s: f64,
    pub delivered_per_s: f64,
    /// Accepted events whose run was never queued (must be 0).
    pub undelivered: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventsReport {
    pub concurrency: usize,
    pub pending_limit: usize,
    pub phases: Vec<Phase>,
}

const FAST: &str = "def handle(context, payload):\n    return payload\n";

impl Events {
    pub async fn run(self) -> Result<ExitCode> {
        let duration = dispatch_core::duration::parse_duration(&self.duration)
            .map_err(|e| anyhow::anyhow!("--duration: {}", e.message))?;
        if self.concurrency == 0 || self.pending_limit == 0 || duration.is_zero() {
            bail!("--concurrency, --pending-limit and --duration must be more than 0");
        }
        let json = self.output == "json";
        if !json {
            eprintln!("ingest: {} producers for {duration:?}…", self.concurrency);
        }
        // Ingest and delivery: pending deliveries unbounded in practice, so that the phase
        // measures the ingest path and not the back-pressure.
        let (s, _dir) = server(&self.isolation, 10_000_000).await?;
        let ids = Arc::new(AtomicU64::new(0));
        let ingest = measure(&s, &ids, self.concurrency, None, duration).await?;
        drop(s);
        let rate = ingest.delivered_per_s;
        let mut phases = vec![Phase {
            phase: "ingest",
            ..ingest
        }];
        if !json {
            eprintln!(
                "overload: {:.0} events/s (3× delivery) for {duration:?}…",
                rate * 3.0
            );
        }
        let (s, _dir) = server(&self.isolation, self.pending_limit).await?;
        let over = measure(&s, &ids, 64, Some(rate * 3.0), duration).await?;
        phases.push(Phase {
            phase: "overload 3×",
            ..over
        });
        let r = EventsReport {
            concurrency: self.concurrency,
            pending_limit: self.pending_limit,
            phases,
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print(&r);
        }
        Ok(if r.phases.iter().all(|p| p.undelivered == 0) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// A server of its own with `--max-pending-deliveries pending_limit`, the function and its
/// subscription.
async fn server(
    isolation: &str,
    pending_limit: usize,
) -> Result<(ServerProcess, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("dispatch-bench-events-")
        .tempdir()?;
    let limit = pending_limit.to_string();
    let s = ServerProcess::start(
        dir.path(),
        &["--isolation", isolation, "--max-pending-deliveries", &limit],
    )
    .await?;
    s.deploy("py", "ev", FAST, json!({})).await?;
    s.client
        .create(&Object::new(
            Kind::Subscription,
            "default",
            "orders",
            json!({"eventType": "order.created", "function": "ev"}),
        ))
        .await?;
    Ok((s, dir))
}

/// One phase: `connections` producers for `duration`, back to back (`rate` none) or together
/// at `rate` events/s; then waits until every accepted event's run finished.
async fn measure(
    s: &ServerProcess,
    ids: &Arc<AtomicU64>,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
) -> Result<Phase> {
    let queued =
        "dispatch_event_deliveries_queued_total{namespace=\"default\",subscription=\"orders\"}";
    let before = s.metric(queued).await.unwrap_or(0.0) as u64;
    let finished_before = finished(s).await;
    let start = Instant::now();
    let (mut lat, statuses) = post_events(s.api, ids.clone(), connections, rate, duration).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let accepted = statuses.get(&202).copied().unwrap_or(0);
    // Delivered: every accepted event queued, and that many more runs finished.
    let deadline = Instant::now() + Duration::from_secs(600);
    let undelivered = loop {
        let q = (s.metric(queued).await.unwrap_or(0.0) as u64).saturating_sub(before);
        let done = finished(s).await.saturating_sub(finished_before);
        let undelivered = accepted.saturating_sub(q);
        if (undelivered == 0 && done >= accepted) || Instant::now() > deadline {
            break undelivered;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let delivered_in_s = start.elapsed().as_secs_f64();
    Ok(Phase {
        phase: "",
        offered_per_s: rate.unwrap_or(0.0),
        accepted,
        accepted_per_s: accepted as f64 / elapsed,
        p50_ms: super::pct(&mut lat, 0.50) / 1e3,
        p99_ms: super::pct(&mut lat, 0.99) / 1e3,
        statuses,
        delivered_in_s,
        delivered_per_s: accepted as f64 / delivered_in_s,
        undelivered,
    })
}

/// Runs of every function finished (all statuses).
async fn finished(s: &ServerProcess) -> u64 {
    let mut n = 0.0;
    for status in ["SUCCEEDED", "FAILED", "DEAD"] {
        n += s
            .metric(&format!("dispatch_runs_total{{status=\"{status}\"}}"))
            .await
            .unwrap_or(0.0);
    }
    n as u64
}

/// Posts events with fresh ids; latencies (µs) of the 202s and every answer by status.
async fn post_events(
    addr: SocketAddr,
    ids: Arc<AtomicU64>,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
) -> Result<(Vec<f64>, BTreeMap<u16, u64>)> {
    let end = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let ids = ids.clone();
        // Open loop: each producer its share of the rate (a late answer delays its next).
        let every = rate.map(|r| Duration::from_secs_f64(connections as f64 / r.max(1.0)));
        tasks.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut tick = every.map(tokio::time::interval);
            let mut lat = Vec::with_capacity(4096);
            let mut statuses = BTreeMap::<u16, u64>::new();
            while Instant::now() < end {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let body = json!({"specversion": "1.0", "id": format!("b{id}"),
                    "source": "/bench", "type": "order.created", "data": {"n": id}})
                .to_string();
                let req = hyper::Request::builder()
                    .method(hyper::Method::POST)
                    .uri("/v1/namespaces/default/events")
                    .header(hyper::header::HOST, addr.to_string())
                    .header(hyper::header::CONTENT_TYPE, "application/cloudevents+json")
                    .body(Full::new(Bytes::from(body)))?;
                let t = Instant::now();
                send.ready().await?;
                let resp = send.send_request(req).await?;
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await?;
                if status == 202 {
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                *statuses.entry(status).or_default() += 1;
            }
            anyhow::Ok((lat, statuses))
        });
    }
    let mut lat = Vec::new();
    let mut statuses = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (l, s) = r??;
        lat.extend(l);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    Ok((lat, statuses))
}

fn print(r: &EventsReport) {
    println!(
        "| Phase | Offered/s | Accepted | Accepted/s | p50 ms | p99 ms | Answers | Delivered in s | Delivered/s | Undelivered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.phases {
        let answers = p
            .statuses
            .iter()
            .map(|(s, n)| format!("{n}×{s}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {answers} | {:.1} | {:.0} | {} |",
            p.phase,
            if p.offered_per_s > 0.0 {
                format!("{:.0}", p.offered_per_s)
            } else {
                format!("closed loop, c={}", r.concurrency)
            },
            p.accepted,
            p.accepted_per_s,
            p.p50_ms,
            p.p99_ms,
            p.delivered_in_s,
            p.delivered_per_s,
            p.undelivered
        );
    }
}
