//! `dispatch bench history`: sustained sync calls that each leave a run record,
//! with a trickle of async calls, against a `dispatch server` process with a small history
//! budget — so that retention works all the time. Reports what a caller sees while it does
//! (gateway req/s against a function with `history: none`, async enqueue p50/p99/max) and
//! what the server holds (database + WAL against the budget, RSS), sampled every few seconds.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::process::ServerProcess;
use super::{Load, Request, load, pct};

/// Sustained sync calls with run records under a small history budget, and async calls meanwhile
#[derive(Debug, Clone, clap::Args)]
#[command(
    long_about = "Starts a `dispatch server` process of its own with --run-history-budget \
BUDGET and two copies of the hello function behind gateway endpoints: one records every call \
(history: all), one none (history: none). Loads the first from CONCURRENCY keep-alive \
connections for DURATION while an async call is made RATE times a second and the database + WAL \
size and the server's RSS are sampled; then loads the second for the same time. Reports both \
throughputs, the async enqueue latency (p50, p99, max) while retention works, and the largest \
database + WAL against the budget.\n\nExample: dispatch bench history --duration 5m --budget 256Mi"
)]
pub struct History {
    /// How long each of the two loads runs
    #[arg(long, default_value = "60s")]
    pub duration: String,
    /// Keep-alive connections of each load
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// The server's --run-history-budget
    #[arg(long, default_value = "64Mi")]
    pub budget: String,
    /// Async calls a second during the first load
    #[arg(long, default_value_t = 20)]
    pub async_rate: u32,
    /// How often the database and the server are sampled
    #[arg(long, default_value = "10s")]
    pub sample: String,
    /// Isolation of the server's workers
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "none"])]
    pub isolation: String,
    /// A further flag for the server process, repeatable (e.g. --server-flag=--runs-per-function=100000000
    /// to see what pruning by count costs)
    #[arg(long = "server-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub server_flags: Vec<String>,
    /// Output format: table or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(Debug, Serialize)]
pub struct HistorySample {
    pub seconds: f64,
    pub db_and_wal_bytes: u64,
    pub rss_kib: u64,
}

#[derive(Debug, Serialize)]
pub struct HistoryReport {
    pub budget_bytes: u64,
    pub recorded: Load,
    pub unrecorded: Load,
    /// Recorded req/s over unrecorded req/s.
    pub throughput_ratio: f64,
    /// The server's CPU time (all its threads; not the workers', nor the load's) per call
    /// of each load, warm-up included: what recording costs, steadier than req/s on a
    /// shared machine.
    pub recorded_server_cpu_us_per_call: f64,
    pub unrecorded_server_cpu_us_per_call: f64,
    pub async_calls: usize,
    pub async_errors: usize,
    pub enqueue_p50_ms: f64,
    pub enqueue_p99_ms: f64,
    pub enqueue_max_ms: f64,
    /// The same async calls during the load of the function without history: what the
    /// load alone costs them.
    pub enqueue_p99_ms_without_history: f64,
    pub samples: Vec<HistorySample>,
    pub max_db_and_wal_bytes: u64,
    /// The largest database + WAL over the budget.
    pub max_over_budget: f64,
}

impl History {
    pub async fn run(self) -> Result<ExitCode> {
        let duration = dispatch_core::duration::parse_duration(&self.duration)
            .map_err(|e| anyhow::anyhow!("--duration: {}", e.message))?;
        let every = dispatch_core::duration::parse_duration(&self.sample)
            .map_err(|e| anyhow::anyhow!("--sample: {}", e.message))?;
        let budget = dispatch_core::quantity::parse_bytes(&self.budget)
            .map_err(|e| anyhow::anyhow!("--budget: {e}"))?;
        if self.concurrency == 0 || self.concurrency > 1024 {
            bail!("--concurrency: between 1 and 1024");
        }
        if every < Duration::from_secs(1) || duration < Duration::from_secs(1) || budget == 0 {
            bail!("--duration and --sample: at least 1s; --budget: more than 0");
        }
        let json = self.output == "json";
        let say = |s: &str| {
            if !json {
                eprintln!("{s}");
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("dispatch-history-")
            .tempdir()?;
        let budget_flag = budget.to_string();
        let mut flags = vec![
            "--isolation",
            &self.isolation,
            "--run-history-budget",
            &budget_flag,
        ];
        flags.extend(self.server_flags.iter().map(String::as_str));
        let s = ServerProcess::start(dir.path(), &flags).await?;
        s.deploy_hello("py", "hello", json!({})).await?;
        s.deploy_hello("py", "quiet", json!({"history": "none"}))
            .await?;
        let s = Arc::new(s);

        say(&format!(
            "history: all — {} connections for {:?}, {} async calls/s, budget {}…",
            self.concurrency, duration, self.async_rate, self.budget
        ));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let sampler = {
            let (s, samples) = (s.clone(), samples.clone());
            tokio::spawn(async move {
                loop {
                    let (db, _) = s.disk();
                    samples.lock().unwrap().push(HistorySample {
                        seconds: started.elapsed().as_secs_f64(),
                        db_and_wal_bytes: db,
                        rss_kib: s.sample().rss_kib,
                    });
                    tokio::time::sleep(every).await;
                }
            })
        };
        let trickle = spawn_trickle(&s, self.async_rate, duration);
        let cpu = s.cpu_seconds();
        let recorded = load(
            "gateway",
            Request::get(s.gateway, "/hello?name=history"),
            self.concurrency,
            duration,
        )
        .await?;
        let recorded_cpu = per_call(s.cpu_seconds() - cpu, &recorded);
        let (mut enqueue, async_errors) = trickle.await??;
        say("history: none — the same load, the same async calls…");
        let trickle = spawn_trickle(&s, self.async_rate, duration);
        let cpu = s.cpu_seconds();
        let unrecorded = load(
            "gateway",
            Request::get(s.gateway, "/quiet?name=history"),
            self.concurrency,
            duration,
        )
        .await?;
        let unrecorded_cpu = per_call(s.cpu_seconds() - cpu, &unrecorded);
        let (mut enqueue_quiet, _) = trickle.await??;
        sampler.abort();
        let samples = std::mem::take(&mut *samples.lock().unwrap());
        let max_db = samples
            .iter()
            .map(|x| x.db_and_wal_bytes)
            .max()
            .unwrap_or(0);
        let report = HistoryReport {
            budget_bytes: budget,
            throughput_ratio: recorded.rps / unrecorded.rps.max(1e-9),
            recorded_server_cpu_us_per_call: recorded_cpu,
            unrecorded_server_cpu_us_per_call: unrecorded_cpu,
            recorded,
            unrecorded,
            async_calls: enqueue.len(),
            async_errors,
            enqueue_p50_ms: pct(&mut enqueue, 0.5),
            enqueue_p99_ms: pct(&mut enqueue, 0.99),
            enqueue_max_ms: enqueue.iter().copied().fold(0.0, f64::max),
            enqueue_p99_ms_without_history: pct(&mut enqueue_quiet, 0.99),
            max_db_and_wal_bytes: max_db,
            max_over_budget: max_db as f64 / budget as f64,
            samples,
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print(&report);
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Microseconds of `cpu` seconds per request of a load, its warm-up included.
fn per_call(cpu: f64, l: &Load) -> f64 {
    cpu * 1e6 / (l.requests + l.warmup_requests).max(1) as f64
}

/// Async calls to hello, `rate` a second, for the load's warm-up and `duration`: their
/// latencies in ms and the failures.
fn spawn_trickle(
    s: &ServerProcess,
    rate: u32,
    duration: Duration,
) -> tokio::task::JoinHandle<Result<(Vec<f64>, usize)>> {
    let (client, rate) = (s.client.clone(), rate.max(1));
    let length = duration + duration / 5;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        let (mut ms, mut errors) = (Vec::new(), 0);
        let end = Instant::now() + length;
        let input = RawValue::from_string(r#"{"name":"trickle"}"#.into())?;
        while Instant::now() < end {
            tick.tick().await;
            let t = Instant::now();
            match client.exec_async("hello", &input, None).await {
                Ok(_) => ms.push(t.elapsed().as_secs_f64() * 1e3),
                Err(_) => errors += 1,
            }
        }
        anyhow::Ok((ms, errors))
    })
}

fn print(r: &HistoryReport) {
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("{:>7} {:>14} {:>9}", "t s", "db+WAL MiB", "RSS MiB");
    for x in &r.samples {
        println!(
            "{:>7.0} {:>14.1} {:>9.1}",
            x.seconds,
            mib(x.db_and_wal_bytes),
            x.rss_kib as f64 / 1024.0
        );
    }
    println!(
        "\ngateway, history: all   {:>8.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  ({} calls, {} errors)",
        r.recorded.rps,
        r.recorded.p50_us,
        r.recorded.p99_us,
        r.recorded.requests,
        r.recorded.errors
    );
    println!(
        "gateway, history: none  {:>8.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  ({} calls, {} errors)",
        r.unrecorded.rps,
        r.unrecorded.p50_us,
        r.unrecorded.p99_us,
        r.unrecorded.requests,
        r.unrecorded.errors
    );
    println!(
        "recording every call costs {:.1} % of the throughput",
        (1.0 - r.throughput_ratio) * 100.0
    );
    println!(
        "server CPU per call: {:.1} µs recorded, {:.1} µs not ({:+.1} %)",
        r.recorded_server_cpu_us_per_call,
        r.unrecorded_server_cpu_us_per_call,
        (r.recorded_server_cpu_us_per_call / r.unrecorded_server_cpu_us_per_call.max(1e-9) - 1.0)
            * 100.0
    );
    println!(
        "async enqueue while retention works: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} calls, {} errors)",
        r.enqueue_p50_ms, r.enqueue_p99_ms, r.enqueue_max_ms, r.async_calls, r.async_errors
    );
    println!(
        "  (the same async calls during the load without history: p99 {:.2} ms)",
        r.enqueue_p99_ms_without_history
    );
    println!(
        "database + WAL at most {:.1} MiB = {:.2} × the budget of {:.1} MiB",
        mib(r.max_db_and_wal_bytes),
        r.max_over_budget,
        mib(r.budget_bytes)
    );
}
