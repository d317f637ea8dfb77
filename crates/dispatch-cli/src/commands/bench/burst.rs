//! `dispatch bench burst`: more functions than the worker budget holds, called at once
//! (a fault-matrix row): every call is answered — 200, or a clean 429 naming the bound — the budget is
//! never exceeded, idle workers are evicted to make room, and the server stays up.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::json;

use super::process::ServerProcess;

/// Calls more functions than the worker budget holds, at once
#[derive(Debug, Clone, clap::Args)]
#[command(
    long_about = "Starts a `dispatch server` process of its own with --max-workers-total \
BUDGET, deploys FUNCTIONS functions (each with a gateway endpoint; the handler works 20 ms) and \
calls every function ROUNDS times from CONCURRENCY callers. Reports the answers by status, \
latency, the most workers seen alive, evictions and refusals from /metrics, and whether the \
server stayed up. Exit code 1 if any answer was neither 200 nor a 429/503 refusal, if the \
budget was exceeded or if the server died.\n\nExample: dispatch bench burst --functions 100 --budget 16"
)]
pub struct Burst {
    /// Functions deployed and called
    #[arg(long, default_value_t = 48)]
    pub functions: usize,
    /// The server's --max-workers-total
    #[arg(long, default_value_t = 16)]
    pub budget: usize,
    /// Concurrent callers
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Calls per function
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Isolation of the server's workers
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "none"])]
    pub isolation: String,
    /// Output format: table or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BurstReport {
    pub functions: usize,
    pub budget: usize,
    pub concurrency: usize,
    pub calls: usize,
    pub statuses: BTreeMap<u16, usize>,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub workers_max_seen: u64,
    pub evictions: u64,
    pub refusals: u64,
    pub server_alive: bool,
}

impl BurstReport {
    /// Every call answered 200 or refused cleanly, the budget kept, the server up.
    pub fn ok(&self) -> bool {
        self.server_alive
            && self.workers_max_seen <= self.budget as u64
            && self.statuses.keys().all(|s| matches!(s, 200 | 429 | 503))
    }
}

const WORK: &str = r#"
import time

def handle(context, payload):
    time.sleep(0.02)
    return {"ok": True}
"#;

impl Burst {
    pub async fn run(self) -> Result<ExitCode> {
        if self.functions == 0 || self.budget == 0 || self.concurrency == 0 || self.rounds == 0 {
            bail!("--functions, --budget, --concurrency and --rounds must be at least 1");
        }
        let json = self.output == "json";
        if !json {
            eprintln!(
                "deploying {} functions on a server with a budget of {} workers…",
                self.functions, self.budget
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("dispatch-burst-")
            .tempdir()?;
        let budget = self.budget.to_string();
        let mut server = ServerProcess::start(
            dir.path(),
            &[
                "--isolation",
                &self.isolation,
                "--max-workers-total",
                &budget,
            ],
        )
        .await?;
        let r = burst(
            &mut server,
            self.functions,
            self.budget,
            self.concurrency,
            self.rounds,
        )
        .await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print(&r);
        }
        Ok(if r.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// Deploys `functions` functions on `server` (started with a budget of `budget`) and calls
/// each `rounds` times from `concurrency` callers, sampling the live workers meanwhile.
pub async fn burst(
    server: &mut ServerProcess,
    functions: usize,
    budget: usize,
    concurrency: usize,
    rounds: usize,
) -> Result<BurstReport> {
    for i in 0..functions {
        server
            .deploy("py", &format!("b{i}"), WORK, json!({"timeout": "5s"}))
            .await?;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let urls: Vec<String> = (0..rounds)
        .flat_map(|_| (0..functions).map(|i| format!("http://{}/b{i}", server.gateway)))
        .collect();
    let calls = urls.len();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let urls = Arc::new(urls);
    let t = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, urls, next) = (http.clone(), urls.clone(), next.clone());
        callers.spawn(async move {
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(url) = urls.get(i) else {
                    return seen;
                };
                let t = Instant::now();
                let status = match http.get(url).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 599,
                };
                seen.push((status, t.elapsed().as_secs_f64() * 1e3));
            }
        });
    }
    let mut workers_max = 0u64;
    let mut statuses = BTreeMap::new();
    let mut ms = Vec::with_capacity(calls);
    let mut take = |seen: Vec<(u16, f64)>| {
        for (s, t) in seen {
            *statuses.entry(s).or_insert(0) += 1;
            ms.push(t);
        }
    };
    while !callers.is_empty() {
        if let Some(w) = server.metric("dispatch_workers ").await {
            workers_max = workers_max.max(w as u64);
        }
        while let Some(done) = callers.try_join_next() {
            take(done?);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(BurstReport {
        functions,
        budget,
        concurrency,
        calls,
        statuses,
        seconds,
        p50_ms: super::pct(&mut ms, 0.5),
        p99_ms: super::pct(&mut ms, 0.99),
        workers_max_seen: workers_max,
        evictions: server
            .metric("dispatch_worker_evictions_total")
            .await
            .unwrap_or(0.0) as u64,
        refusals: server
            .metric("dispatch_worker_budget_refusals_total")
            .await
            .unwrap_or(0.0) as u64,
        server_alive: server.alive() && server.client.ready().await,
    })
}

fn print(r: &BurstReport) {
    let statuses: Vec<String> = r
        .statuses
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!(
        "{} calls to {} functions (budget {} workers, {} callers) in {:.2} s: {}",
        r.calls,
        r.functions,
        r.budget,
        r.concurrency,
        r.seconds,
        statuses.join(", ")
    );
    println!(
        "latency p50 {:.1} ms, p99 {:.1} ms; most workers alive {}; evictions {}; refused at the budget {}; server {}",
        r.p50_ms,
        r.p99_ms,
        r.workers_max_seen,
        r.evictions,
        r.refusals,
        if r.server_alive { "alive" } else { "DEAD" }
    );
}
