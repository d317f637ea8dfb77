//! `dispatch bench soak`: mixed work at a steady rate for minutes against a `dispatch server`
//! process of its own, sampling what the server holds every few seconds — the way to see a
//! leak (memory, open files, threads, workers) or unbounded growth (the database) that a
//! short benchmark hides. Every accepted async run, event run and job is followed to its end:
//! nothing accepted may be lost.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use dispatch_core::{Kind, Object};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::accepted::{self, Accepted, Outcome};
use super::process::ServerProcess;

/// Mixed sync, async, event and job work at a steady rate for minutes, sampled every 10 s
#[derive(Debug, Clone, clap::Args)]
#[command(
    long_about = "Starts a `dispatch server` process of its own (temporary data dir, auth off, \
loopback) and sends it mixed work at a steady rate: half sync gateway calls of the hello \
example, 30 % async runs, 10 % CloudEvents matched by a subscription, 10 % job executions (`true`). \
Every --sample interval it prints the server's RSS, open files, threads, live workers, database \
and data-dir size, the operations done and the sync p99. At the end every accepted async run, \
event run and job is followed to its end; the exit code is 1 if any was lost or failed, or if \
the server died.\n\nExample: dispatch bench soak --minutes 30 --rate 200"
)]
pub struct Soak {
    /// How long the load runs, in minutes (fractions allowed: 0.5)
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Operations per second, all kinds together
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// How often the server is sampled
    #[arg(long, default_value = "10s")]
    pub sample: String,
    /// Isolation of the server's workers
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "none"])]
    pub isolation: String,
    /// A flag for the server (repeatable), e.g. --server-arg=--runs-per-function=1000
    #[arg(long = "server-arg", allow_hyphen_values = true, value_name = "FLAG")]
    pub server_args: Vec<String>,
    /// Output format: table or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    pub workers: u64,
    pub db_bytes: u64,
    pub data_dir_bytes: u64,
    /// Operations answered since the last sample, per second.
    pub ops_per_second: f64,
    pub errors: u64,
    pub sync_p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub minutes: f64,
    pub rate: u32,
    pub isolation: String,
    pub samples: Vec<Sample>,
    /// Operations sent, by kind, and answers by kind and status.
    pub sent: BTreeMap<&'static str, u64>,
    pub answers: BTreeMap<String, u64>,
    /// Ticks at which every caller slot was busy (the server fell behind the rate).
    pub behind: u64,
    pub outcome: Outcome,
    pub server_alive: bool,
}

#[derive(Default)]
struct Counters {
    sent: Mutex<BTreeMap<&'static str, u64>>,
    answers: Mutex<BTreeMap<String, u64>>,
    done: AtomicU64,
    errors: AtomicU64,
    sync_ms: Mutex<Vec<f64>>,
    accepted: Mutex<Vec<Accepted>>,
}

impl Counters {
    fn answer(&self, kind: &str, status: u16) {
        *self
            .answers
            .lock()
            .unwrap()
            .entry(format!("{kind} {status}"))
            .or_default() += 1;
        self.done.fetch_add(1, Ordering::Relaxed);
        if status >= 400 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

const KINDS: [&str; 10] = [
    "sync", "sync", "sync", "sync", "sync", "async", "async", "async", "event", "job",
];

impl Soak {
    pub async fn run(self) -> Result<ExitCode> {
        if !self.minutes.is_finite() || self.minutes <= 0.0 || self.minutes > 7.0 * 24.0 * 60.0 {
            bail!("--minutes: give a positive number of minutes (at most a week)");
        }
        if self.rate == 0 || self.rate > 100_000 {
            bail!("--rate: give operations per second between 1 and 100000");
        }
        let every = dispatch_core::duration::parse_duration(&self.sample)
            .map_err(|e| anyhow::anyhow!("--sample: {}", e.message))?;
        if every < Duration::from_secs(1) {
            bail!("--sample: at least 1s");
        }
        let json = self.output == "json";
        let say = |s: &str| {
            if !json {
                eprintln!("{s}");
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("dispatch-soak-")
            .tempdir()?;
        let mut flags = vec!["--isolation", self.isolation.as_str()];
        flags.extend(self.server_args.iter().map(String::as_str));
        say("starting dispatch server and deploying hello, a subscription and a job template…");
        let mut server = ServerProcess::start(dir.path(), &flags).await?;
        setup(&server).await?;
        let c = Arc::new(Counters::default());
        let length = Duration::from_secs_f64(self.minutes * 60.0);
        say(&format!(
            "{} ops/s for {:.1} min, a sample every {}…",
            self.rate, self.minutes, self.sample
        ));
        let started = Instant::now();
        let load = tokio::spawn(drive(server_view(&server), c.clone(), self.rate, length));

        let mut samples = Vec::new();
        let mut last_done = 0;
        let mut last_t = started;
        let mut last_errors = 0;
        if !json {
            println!(
                "{:>7} {:>9} {:>6} {:>7} {:>7} {:>9} {:>9} {:>8} {:>7} {:>9}",
                "t s",
                "RSS MiB",
                "fds",
                "threads",
                "workers",
                "db MiB",
                "dir MiB",
                "ops/s",
                "errors",
                "sync p99"
            );
        }
        let mut pending: Vec<Accepted> = Vec::new();
        let mut outcome = Outcome::default();
        loop {
            let finished = load.is_finished();
            tokio::time::sleep(if finished {
                Duration::ZERO
            } else {
                every.min(length.saturating_sub(started.elapsed()) + Duration::from_millis(10))
            })
            .await;
            let now = Instant::now();
            let done = c.done.load(Ordering::Relaxed);
            let errors = c.errors.load(Ordering::Relaxed);
            let mut lat = std::mem::take(&mut *c.sync_ms.lock().unwrap());
            let p = server.sample();
            let (db, all) = server.disk();
            let s = Sample {
                seconds: now.duration_since(started).as_secs_f64(),
                rss_kib: p.rss_kib,
                fds: p.fds,
                threads: p.threads,
                workers: server.metric("dispatch_workers ").await.unwrap_or(0.0) as u64,
                db_bytes: db,
                data_dir_bytes: all,
                ops_per_second: (done - last_done) as f64
                    / now.duration_since(last_t).as_secs_f64().max(1e-3),
                errors: errors - last_errors,
                sync_p99_ms: super::pct(&mut lat, 0.99),
            };
            // The load ended just after a sample: no second, near-empty one.
            let tail = finished
                && !samples.is_empty()
                && now.duration_since(last_t) < Duration::from_secs(1);
            (last_done, last_t, last_errors) = (done, now, errors);
            if !json && !tail {
                println!(
                    "{:>7.0} {:>9.1} {:>6} {:>7} {:>7} {:>9.1} {:>9.1} {:>8.0} {:>7} {:>7.1} ms",
                    s.seconds,
                    s.rss_kib as f64 / 1024.0,
                    s.fds,
                    s.threads,
                    s.workers,
                    s.db_bytes as f64 / 1048576.0,
                    s.data_dir_bytes as f64 / 1048576.0,
                    s.ops_per_second,
                    s.errors,
                    s.sync_p99_ms
                );
            }
            if !tail {
                samples.push(s);
            }
            // Follow what was accepted while the load runs, so that a run is seen before
            // retention could prune it.
            pending.append(&mut c.accepted.lock().unwrap());
            let (o, rest) = accepted::check(&server.client, pending, false).await;
            outcome.merge(o);
            pending = rest;
            if finished || !server.alive() {
                break;
            }
        }
        let behind = load.await??;
        say(&format!(
            "load done; following {} accepted runs and jobs to their end…",
            pending.len()
        ));
        outcome.merge(accepted::settle(&server.client, pending, Duration::from_secs(180)).await);
        let alive = server.alive() && server.client.ready().await;
        let report = SoakReport {
            minutes: self.minutes,
            rate: self.rate,
            isolation: self.isolation.clone(),
            samples,
            sent: c.sent.lock().unwrap().clone(),
            answers: c.answers.lock().unwrap().clone(),
            behind,
            outcome,
            server_alive: alive,
        };
        let ok = alive && report.outcome.lost == 0 && report.outcome.failed == 0;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_summary(&report);
            if !alive {
                println!("server log:\n{}", server.log_tail());
            }
        }
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// What the load needs of the server (the process itself stays with the sampler).
#[derive(Clone)]
struct View {
    client: dispatch_client::Client,
    http: reqwest::Client,
    gateway: String,
}

fn server_view(s: &ServerProcess) -> View {
    View {
        client: s.client.clone(),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a reqwest client"),
        gateway: format!("http://{}/hello?name=soak", s.gateway),
    }
}

async fn setup(s: &ServerProcess) -> Result<()> {
    s.deploy_hello(
        "py",
        "hello",
        json!({"retry": {"maxAttempts": 3, "backoff": {"initial": "100ms", "max": "1s"}}}),
    )
    .await?;
    let c = &s.client;
    c.create(&Object::new(
        Kind::Subscription,
        "default",
        "ticks",
        json!({"eventType": "soak.tick", "function": "hello"}),
    ))
    .await?;
    c.create(&Object::new(
        Kind::JobTemplate,
        "default",
        "noop",
        json!({"jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": ["true"]}]}}}}, "maxActive": 50,
            // Host processes: the soak measures the server, not image pulls.
            "runtime": "host"}),
    ))
    .await?;
    Ok(())
}

/// Sends `rate` operations a second for `length`, open loop: an operation starts on time
/// whether or not earlier ones have been answered, up to 512 in flight (past that a tick is
/// counted as "behind" and skipped). Returns the ticks skipped.
async fn drive(v: View, c: Arc<Counters>, rate: u32, length: Duration) -> Result<u64> {
    let slots = Arc::new(tokio::sync::Semaphore::new(512));
    let tick = Duration::from_millis(10);
    let per_tick = rate as f64 * tick.as_secs_f64();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let (mut owed, mut n, mut behind) = (0.0, 0u64, 0u64);
    let mut tasks = tokio::task::JoinSet::new();
    while start.elapsed() < length {
        interval.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                behind += 1;
                continue;
            };
            let kind = KINDS[(n % KINDS.len() as u64) as usize];
            n += 1;
            *c.sent.lock().unwrap().entry(kind).or_default() += 1;
            let (v, c) = (v.clone(), c.clone());
            tasks.spawn(async move {
                one(&v, &c, kind, n).await;
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(behind)
}

async fn one(v: &View, c: &Counters, kind: &'static str, n: u64) {
    let status_of = |e: &dispatch_client::ClientError| e.status().map_or(599, |s| s.as_u16());
    match kind {
        "sync" => {
            let t = Instant::now();
            let status = match v.http.get(&v.gateway).send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let _ = r.bytes().await;
                    s
                }
                Err(_) => 599,
            };
            c.sync_ms
                .lock()
                .unwrap()
                .push(t.elapsed().as_secs_f64() * 1e3);
            c.answer(kind, status);
        }
        "async" => {
            let input =
                RawValue::from_string(format!("{{\"name\":\"soak-{n}\"}}")).expect("valid JSON");
            match v.client.exec_async("hello", &input, None).await {
                Ok(r) => {
                    c.answer(kind, 202);
                    if let Some(id) = r["id"].as_str() {
                        c.accepted.lock().unwrap().push(Accepted::run(id));
                    }
                }
                Err(e) => c.answer(kind, status_of(&e)),
            }
        }
        "event" => {
            let ev = json!({"specversion": "1.0", "id": format!("soak-{n}"), "source": "/soak",
                "type": "soak.tick", "data": {"name": "soak"}});
            match v.client.emit(&ev).await {
                Ok(r) => {
                    c.answer(kind, 202);
                    for m in r["matched"].as_array().into_iter().flatten() {
                        if let Some(id) = m["runId"].as_str() {
                            c.accepted.lock().unwrap().push(Accepted::run(id));
                        }
                    }
                }
                Err(e) => c.answer(kind, status_of(&e)),
            }
        }
        _ => match v.client.execute("noop", Vec::new()).await {
            Ok(r) => {
                c.answer(kind, 202);
                if let Some(id) = r["uuid"].as_str() {
                    c.accepted.lock().unwrap().push(Accepted::job(id));
                }
            }
            Err(e) => c.answer(kind, status_of(&e)),
        },
    }
}

fn print_summary(r: &SoakReport) {
    let (first, last) = (r.samples.first(), r.samples.last());
    if let (Some(a), Some(b)) = (first, last) {
        println!(
            "\nover {:.0} s: RSS {:.1} → {:.1} MiB, fds {} → {}, threads {} → {}, workers {} → {}, db {:.1} → {:.1} MiB",
            b.seconds,
            a.rss_kib as f64 / 1024.0,
            b.rss_kib as f64 / 1024.0,
            a.fds,
            b.fds,
            a.threads,
            b.threads,
            a.workers,
            b.workers,
            a.db_bytes as f64 / 1048576.0,
            b.db_bytes as f64 / 1048576.0
        );
    }
    let sent: Vec<String> = r.sent.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let answers: Vec<String> = r.answers.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    println!(
        "sent: {}; behind the rate: {} ticks",
        sent.join(", "),
        r.behind
    );
    println!("answers: {}", answers.join(", "));
    let o = &r.outcome;
    println!(
        "accepted runs and jobs: {} — succeeded {}, failed {}, lost {}; server {}",
        o.accepted,
        o.succeeded,
        o.failed,
        o.lost,
        if r.server_alive { "alive" } else { "DEAD" }
    );
    for f in o.failures.iter().chain(&o.lost_ids) {
        println!("  {f}");
    }
}
