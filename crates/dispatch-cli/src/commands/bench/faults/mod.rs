//! `dispatch bench faults`: the fault matrix. Each row starts a `dispatch server`
//! process of its own, puts work in flight, injects one fault — a worker, a zygote or the
//! server killed with SIGKILL, a full disk, a read-only data dir, a corrupted blob, an
//! idle-connection flood, an async flood, a burst past the worker budget — and records what
//! the caller saw, what was recovered and whether anything accepted was lost.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;

use super::accepted::{self, Accepted};
use super::process::{ServerProcess, children, cmdline, descendants, parent};

mod disk;
mod processes;

use disk::{corrupt_blob, disk_full, read_only, refusal, skipped};
use processes::{server_kill, worker_kill, zygote_kill};

const ROWS: [&str; 10] = [
    "worker-kill",
    "zygote-kill",
    "server-kill",
    "disk-full",
    "read-only",
    "corrupt-blob",
    "clock-jump",
    "idle-flood",
    "async-flood",
    "worker-burst",
];

/// Injects faults into a running server and records what callers see and what is recovered
#[derive(Debug, Clone, clap::Args)]
#[command(
    long_about = "Runs the fault matrix, each row on a `dispatch server` process of its own \
(temporary data dir, auth off, loopback): worker-kill (SIGKILL of a worker mid-call, sync and \
async), zygote-kill, server-kill (SIGKILL during 200 async runs and 10 jobs, then a restart), \
disk-full (a 48 MiB tmpfs data dir; needs root), read-only (the data dir remounted read-only \
mid-run; needs root), corrupt-blob (a function's stored source altered on disk), clock-jump (the server's \
wall clock moved 2 h ahead, then 3 h back, with libfaketime; skipped without it), idle-flood \
(more idle connections than the gateway's cap, /readyz timed throughout), async-flood (256 KiB \
async calls past a function's maxQueued, /readyz timed throughout) and worker-burst (more \
functions than the worker budget). A row passes when nothing accepted was lost and the server \
answered as documented; the exit code is 1 if a row failed.\n\nExample: dispatch bench faults \
--only server-kill,idle-flood"
)]
pub struct Faults {
    /// Rows to run (comma-separated); all by default
    #[arg(long, value_delimiter = ',', value_parser = ROWS)]
    pub only: Vec<String>,
    /// Isolation of the servers' workers
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "none"])]
    pub isolation: String,
    /// The longest /readyz may take during the idle and async floods for their rows to pass
    /// (the target for a release build; a debug build, as in the tests, needs more)
    #[arg(long, default_value = "100ms", value_parser = parse_bound)]
    pub readyz_bound: Duration,
    /// Output format: table or json
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub fault: &'static str,
    /// Passed, failed or skipped (a fault this machine cannot inject).
    pub result: &'static str,
    pub caller_saw: String,
    pub recovered: String,
    pub lost: usize,
}

impl Faults {
    pub async fn run(self) -> Result<ExitCode> {
        let json = self.output == "json";
        let mut rows = Vec::new();
        for name in ROWS {
            if !self.only.is_empty() && !self.only.iter().any(|o| o == name) {
                continue;
            }
            if !json {
                eprintln!("fault {name}…");
            }
            let t = Instant::now();
            let bound_ms = self.readyz_bound.as_secs_f64() * 1e3;
            let row = match row(name, &self.isolation, bound_ms).await {
                Ok(r) => r,
                Err(e) => Row {
                    fault: name,
                    result: "failed",
                    caller_saw: format!("{e:#}"),
                    recovered: String::new(),
                    lost: 0,
                },
            };
            if !json {
                eprintln!("  {} in {:.1} s", row.result, t.elapsed().as_secs_f64());
            }
            rows.push(row);
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            println!("| Fault | Result | What the caller saw | What was recovered | Lost |");
            println!("|---|---|---|---|---|");
            for r in &rows {
                println!(
                    "| {} | {} | {} | {} | {} |",
                    r.fault, r.result, r.caller_saw, r.recovered, r.lost
                );
            }
        }
        Ok(if rows.iter().any(|r| r.result == "failed") {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

fn parse_bound(s: &str) -> std::result::Result<Duration, String> {
    dispatch_core::duration::parse_duration(s).map_err(|e| e.message)
}

async fn row(name: &'static str, isolation: &str, readyz_bound_ms: f64) -> Result<Row> {
    let iso = ["--isolation", isolation];
    match name {
        "worker-kill" => worker_kill(&iso).await,
        "zygote-kill" => zygote_kill(&iso).await,
        "server-kill" => server_kill(&iso).await,
        "disk-full" => disk_full(&iso).await,
        "read-only" => read_only(&iso).await,
        "corrupt-blob" => corrupt_blob(&iso).await,
        "clock-jump" => clock_jump(&iso).await,
        "idle-flood" => idle_flood(&iso, readyz_bound_ms).await,
        "async-flood" => async_flood(&iso, readyz_bound_ms).await,
        _ => worker_burst(&iso).await,
    }
}

fn passed(fault: &'static str, caller_saw: String, recovered: String, lost: usize) -> Row {
    Row {
        fault,
        result: if lost == 0 { "passed" } else { "failed" },
        caller_saw,
        recovered,
        lost,
    }
}

const SLOW: &str = r#"
import time

def handle(context, payload):
    time.sleep(float((payload or {}).get("seconds", 0.02)))
    return {"ok": True}
"#;

fn input(v: serde_json::Value) -> Box<RawValue> {
    RawValue::from_string(v.to_string()).expect("valid JSON")
}

/// Polls `f` every 20 ms until it returns `Some`, for up to `within`.
async fn until<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server's zygotes: `--zygote` processes whose parent is not one (their forked workers
/// share the command line).
fn zygotes(server: u32) -> Vec<u32> {
    descendants(server)
        .into_iter()
        .filter(|p| cmdline(*p).contains("--zygote"))
        .filter(|p| parent(*p).is_none_or(|pp| !cmdline(pp).contains("--zygote")))
        .collect()
}

/// The one worker forked from the server's zygote (when there is exactly one).
fn one_worker(server: u32) -> Option<u32> {
    let ws: Vec<u32> = zygotes(server).into_iter().flat_map(children).collect();
    (ws.len() == 1).then(|| ws[0])
}

/// The status of a GET of `url` (599: no answer).
async fn status_of(url: &str) -> u16 {
    reqwest::Client::new()
        .get(url)
        .send()
        .await
        .map_or(599, |r| r.status().as_u16())
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

async fn clock_jump(iso: &[&str]) -> Result<Row> {
    if !std::path::Path::new(FAKETIME).exists() {
        return Ok(skipped(
            "clock-jump",
            format!("libfaketime is not installed ({FAKETIME}; apt-get install faketime)"),
        ));
    }
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("faketime");
    std::fs::write(&spec, "+0")?;
    let spec_s = spec.display().to_string();
    let data = dir.path().join("data");
    // Only the wall clock moves; timers run on the monotonic clock, as on a real machine
    // whose clock is stepped (NTP, an operator's `date -s`).
    let s = ServerProcess::start_env(
        &data,
        iso,
        &[
            ("LD_PRELOAD", FAKETIME),
            ("FAKETIME_TIMESTAMP_FILE", &spec_s),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .await?;
    s.deploy(
        "py",
        "slow",
        SLOW,
        json!({"retry": {"maxAttempts": 3, "backoff": {"initial": "200ms", "max": "1s"}}}),
    )
    .await?;
    let mut work = Vec::new();
    let accept = |n: usize| {
        let c = s.client.clone();
        async move {
            let mut ids = Vec::new();
            for _ in 0..n {
                let r = c
                    .exec_async("slow", &input(json!({"seconds": 0.2})), None)
                    .await?;
                ids.push(r["id"].as_str().context("no run id")?.to_string());
            }
            anyhow::Ok(ids)
        }
    };
    let mut ids = accept(5).await?;
    std::fs::write(&spec, "+2h")?;
    ids.extend(accept(5).await?);
    std::fs::write(&spec, "-1h")?;
    ids.extend(accept(5).await?);
    work.extend(ids.iter().map(Accepted::run));
    let o = accepted::settle(&s.client, work, Duration::from_secs(120)).await;
    // The runs' own timestamps, in the order they were accepted.
    let mut created = Vec::new();
    for id in &ids {
        created.push(s.client.get_run(id).await?.created_at);
    }
    let ordered = created.windows(2).all(|w| w[0] <= w[1]);
    let span = created
        .last()
        .zip(created.first())
        .map(|(b, a)| b.duration_since(*a).as_secs_f64())
        .unwrap_or(0.0);
    let mut row = passed(
        "clock-jump",
        format!(
            "15 async calls accepted across a +2 h and a −3 h step of the wall clock: all 202; their createdAt {} and span {span:.1} s",
            if ordered { "in order" } else { "OUT OF ORDER" }
        ),
        format!(
            "{} of {} succeeded, {} failed (the server reads the wall clock once at start and advances it by the monotonic clock)",
            o.succeeded, o.accepted, o.failed
        ),
        o.lost,
    );
    if !ordered || span > 60.0 || o.failed > 0 {
        row.result = "failed";
    }
    Ok(row)
}

/// `/readyz` on the API port every 20 ms while `flood` runs, and once after: the slowest
/// answer, in ms (a failed probe counts as 10 s).
async fn probe_while<T>(
    s: &ServerProcess,
    flood: impl std::future::Future<Output = T>,
) -> (T, f64) {
    let url = format!("http://{}/readyz", s.api);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a reqwest client");
    let once = || async {
        let t = Instant::now();
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => t.elapsed().as_secs_f64() * 1e3,
            _ => 10_000.0,
        }
    };
    let worst = std::cell::Cell::new(0.0f64);
    let probe = async {
        loop {
            worst.set(worst.get().max(once().await));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let out = tokio::select! {
        out = flood => out,
        _ = probe => unreachable!("the probe loops until the flood ends"),
    };
    let last = once().await;
    (out, worst.get().max(last))
}

async fn idle_flood(iso: &[&str], readyz_bound_ms: f64) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let mut flags = iso.to_vec();
    flags.extend(["--max-gateway-connections", "256", "--header-timeout", "3s"]);
    let s = ServerProcess::start(dir.path(), &flags).await?;
    s.deploy_hello("py", "hello", json!({})).await?;
    let gw = s.gateway;
    let flood = async move {
        let mut held = Vec::new();
        for _ in 0..400 {
            if let Ok(mut c) = tokio::net::TcpStream::connect(gw).await {
                let _ = c.write_all(b"GET /hello HTTP/1.1\r\n").await;
                held.push(c);
            }
        }
        // While they are held: a real caller.
        let t = Instant::now();
        let status = match reqwest::Client::new()
            .get(format!("http://{gw}/hello"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16().to_string(),
            Err(_) => "closed".to_string(),
        };
        let status = (status, t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_secs(4)).await;
        (held, status)
    };
    let ((held, during), worst) = probe_while(&s, flood).await;
    // Which of the idle connections has the server closed (header timeout, or at the cap)?
    let mut closed = 0;
    for mut c in held {
        let mut buf = [0u8; 512];
        match tokio::time::timeout(
            Duration::from_millis(50),
            tokio::io::AsyncReadExt::read(&mut c, &mut buf),
        )
        .await
        {
            Ok(Ok(_)) | Ok(Err(_)) => closed += 1,
            Err(_) => {}
        }
    }
    let after = status_of(&format!("http://{gw}/hello")).await;
    Ok(Row {
        fault: "idle-flood",
        // Refused at once: a 503, or — when the refused connections lingering to deliver
        // their 503 are at their bound (the flood's own) — closed at once.
        result: if worst < readyz_bound_ms && after == 200 && during.1 < 1000.0 && during.0 != "200"
        {
            "passed"
        } else {
            "failed"
        },
        caller_saw: format!(
            "400 idle connections against a cap of 256: a gateway call during the flood refused in {:.0} ms ({}); /readyz at worst {worst:.1} ms",
            during.1,
            if during.0 == "503" {
                "503"
            } else {
                "connection closed: the 503s lingering for the flood's own refusals were at their bound"
            }
        ),
        recovered: format!(
            "{closed} of 400 closed by the server within 4 s (503 at the cap, 3 s header timeout); then a call {after}"
        ),
        lost: 0,
    })
}

async fn async_flood(iso: &[&str], readyz_bound_ms: f64) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let s = ServerProcess::start(dir.path(), iso).await?;
    s.deploy("py", "slow", SLOW, json!({"maxQueued": 50}))
        .await?;
    let before = s.disk().1;
    let client = s.client.clone();
    let flood = async move {
        let big = std::sync::Arc::new(input(
            json!({"seconds": 0.02, "pad": "x".repeat(256 * 1024)}),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..32 {
            let (client, big) = (client.clone(), big.clone());
            tasks.spawn(async move {
                let mut out = (Vec::new(), 0usize, Vec::new());
                for _ in (w..400).step_by(32) {
                    match client.exec_async("slow", &big, None).await {
                        Ok(r) => out
                            .0
                            .push(Accepted::run(r["id"].as_str().unwrap_or_default())),
                        Err(e) if e.status().map(|s| s.as_u16()) == Some(429) => out.1 += 1,
                        Err(e) => out.2.push(refusal(&e)),
                    }
                }
                out
            });
        }
        let (mut work, mut refused, mut other) = (Vec::new(), 0, Vec::new());
        while let Some(r) = tasks.join_next().await {
            if let Ok((w, n, o)) = r {
                work.extend(w);
                refused += n;
                other.extend(o);
            }
        }
        (work, refused, other)
    };
    let ((work, refused, other), worst) = probe_while(&s, flood).await;
    let peak = s.disk().1;
    let accepted_n = work.len();
    let o = accepted::settle(&s.client, work, Duration::from_secs(120)).await;
    let mut row = passed(
        "async-flood",
        format!(
            "400 async calls of 256 KiB from 32 callers (maxQueued 50): {accepted_n} × 202, {refused} × 429{}; /readyz at worst {worst:.1} ms",
            if other.is_empty() {
                String::new()
            } else {
                format!(", other: {}", other.join("; "))
            }
        ),
        format!(
            "data dir {:.1} → {:.1} MiB; {} of {} accepted succeeded, {} failed",
            before as f64 / 1048576.0,
            peak as f64 / 1048576.0,
            o.succeeded,
            o.accepted,
            o.failed
        ),
        o.lost,
    );
    if worst >= readyz_bound_ms || !other.is_empty() || o.failed > 0 || refused == 0 {
        row.result = "failed";
    }
    Ok(row)
}

async fn worker_burst(iso: &[&str]) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let mut flags = iso.to_vec();
    flags.extend(["--max-workers-total", "4"]);
    let mut s = ServerProcess::start(dir.path(), &flags).await?;
    let r = super::burst::burst(&mut s, 12, 4, 12, 2).await?;
    let statuses: Vec<String> = r
        .statuses
        .iter()
        .map(|(k, n)| format!("{n} × {k}"))
        .collect();
    Ok(Row {
        fault: "worker-burst",
        result: if r.ok() { "passed" } else { "failed" },
        caller_saw: format!(
            "24 calls to 12 functions, budget 4 workers, 12 callers: {}",
            statuses.join(", ")
        ),
        recovered: format!(
            "most workers alive {} (budget 4); {} evictions; server {}",
            r.workers_max_seen,
            r.evictions,
            if r.server_alive { "alive" } else { "DEAD" }
        ),
        lost: 0,
    })
}
