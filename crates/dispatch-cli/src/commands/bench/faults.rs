//! `dispatch bench faults`: the fault matrix (issue 28). Each row starts a `dispatch server`
//! process of its own, puts work in flight, injects one fault — a worker, a zygote or the
//! server killed with SIGKILL, a full disk, a read-only data dir, a corrupted blob, an
//! idle-connection flood, an async flood, a burst past the worker budget — and records what
//! the caller saw, what was recovered and whether anything accepted was lost.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_core::{Kind, Object};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;

use super::accepted::{self, Accepted};
use super::process::{ServerProcess, children, cmdline, descendants, parent};

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
            let row = match row(name, &self.isolation).await {
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

async fn row(name: &'static str, isolation: &str) -> Result<Row> {
    let iso = ["--isolation", isolation];
    match name {
        "worker-kill" => worker_kill(&iso).await,
        "zygote-kill" => zygote_kill(&iso).await,
        "server-kill" => server_kill(&iso).await,
        "disk-full" => disk_full(&iso).await,
        "read-only" => read_only(&iso).await,
        "corrupt-blob" => corrupt_blob(&iso).await,
        "clock-jump" => clock_jump(&iso).await,
        "idle-flood" => idle_flood(&iso).await,
        "async-flood" => async_flood(&iso).await,
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

async fn worker_kill(iso: &[&str]) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let s = ServerProcess::start(dir.path(), iso).await?;
    s.deploy(
        "py",
        "slow",
        SLOW,
        json!({"retry": {"maxAttempts": 3, "backoff": {"initial": "100ms", "max": "1s"}}}),
    )
    .await?;
    // Sync: the caller waits on a 3 s call whose worker is killed.
    let url = format!("http://{}/slow", s.gateway);
    let http = reqwest::Client::new();
    let call = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.post(&url).json(&json!({"seconds": 3})).send().await?;
            let status = r.status().as_u16();
            anyhow::Ok((status, r.text().await?))
        }
    });
    let w = until(Duration::from_secs(20), "no worker started", || {
        one_worker(s.pid)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill9(w);
    let (status, body) = call.await??;
    let error_type = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["type"].as_str().map(str::to_string))
        .unwrap_or_default();
    let again = http.post(&url).json(&json!({})).send().await?.status();
    // Async: the run's worker is killed mid-run; the run is retried.
    let run = s
        .client
        .exec_async("slow", &input(json!({"seconds": 2})), None)
        .await?;
    let id = run["id"].as_str().context("no run id")?.to_string();
    let w = until(
        Duration::from_secs(20),
        "no worker for the async run",
        || one_worker(s.pid).filter(|p| Some(*p) != Some(w)),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill9(w);
    let o = accepted::settle(&s.client, vec![Accepted::run(&id)], Duration::from_secs(60)).await;
    let attempts = s.client.get_run(&id).await.map(|r| r.attempts).unwrap_or(0);
    Ok(passed(
        "worker-kill",
        format!("sync: {status} {error_type}; async: 202"),
        format!(
            "next sync call {}; the async run {} on attempt {attempts}",
            again.as_u16(),
            if o.succeeded == 1 {
                "SUCCEEDED"
            } else {
                "did not succeed"
            }
        ),
        o.lost + o.failed,
    ))
}

async fn zygote_kill(iso: &[&str]) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let s = ServerProcess::start(dir.path(), iso).await?;
    s.deploy_hello("py", "hello", json!({})).await?;
    s.deploy_hello("py", "hello2", json!({})).await?;
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let (http, url) = (http.clone(), format!("http://{}/{path}", s.gateway));
        async move { anyhow::Ok(http.get(&url).send().await?.status().as_u16()) }
    };
    get("hello").await?;
    let z = until(Duration::from_secs(20), "no zygote", || {
        zygotes(s.pid).first().copied()
    })
    .await?;
    kill9(z);
    until(Duration::from_secs(10), "the zygote did not die", || {
        (!zygotes(s.pid).contains(&z)).then_some(())
    })
    .await?;
    let warm = get("hello").await?;
    let cold = get("hello2").await?;
    let again = zygotes(s.pid);
    Ok(Row {
        fault: "zygote-kill",
        result: if warm == 200 && cold == 200 && !again.is_empty() {
            "passed"
        } else {
            "failed"
        },
        caller_saw: format!("warm call {warm}; cold start of another function {cold}"),
        recovered: format!(
            "{} (the next cold start started a zygote again)",
            if again.is_empty() {
                "no zygote"
            } else {
                "a new zygote"
            }
        ),
        lost: 0,
    })
}

async fn server_kill(iso: &[&str]) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let mut s = ServerProcess::start(dir.path(), iso).await?;
    s.deploy(
        "py",
        "tick",
        SLOW,
        json!({"retry": {"maxAttempts": 5, "backoff": {"initial": "100ms", "max": "1s"}}}),
    )
    .await?;
    s.client
        .create(&Object::new(
            Kind::JobTemplate,
            "default",
            "nap",
            json!({"jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "0.5"]}]}}}}}),
        ))
        .await?;
    let mut work = Vec::new();
    for i in 0..200 {
        let r = s
            .client
            .exec_async("tick", &input(json!({"i": i})), None)
            .await?;
        work.push(Accepted::run(r["id"].as_str().context("no run id")?));
    }
    for _ in 0..10 {
        let r = s.client.execute("nap", Vec::new()).await?;
        work.push(Accepted::job(r["uuid"].as_str().context("no uuid")?));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.kill9().await?;
    let refused = s.client.ready().await;
    let t = Instant::now();
    s.restart().await?;
    let back = t.elapsed();
    let o = accepted::settle(&s.client, work, Duration::from_secs(120)).await;
    let mut row = passed(
        "server-kill",
        format!(
            "{} while down; the API back {:.1} s after the restart began",
            if refused {
                "answers (?)"
            } else {
                "connection refused"
            },
            back.as_secs_f64()
        ),
        format!(
            "{} of {} accepted (200 async runs, 10 jobs) succeeded, {} failed",
            o.succeeded, o.accepted, o.failed
        ),
        o.lost,
    );
    if o.failed > 0 {
        row.result = "failed";
        row.recovered += &format!(": {}", o.failures.join("; "));
    }
    Ok(row)
}

/// Mounts a tmpfs of `size` at a new temporary dir (root only), unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .context("mounting a tmpfs (needs root)")?;
        Ok(Tmpfs { dir })
    }

    fn remount(&self, read_only: bool) -> Result<()> {
        let mut flags = nix::mount::MsFlags::MS_REMOUNT;
        if read_only {
            flags |= nix::mount::MsFlags::MS_RDONLY;
        }
        nix::mount::mount(
            None::<&str>,
            self.dir.path(),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .context("remounting the tmpfs")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn skipped(fault: &'static str, why: String) -> Row {
    Row {
        fault,
        result: "skipped",
        caller_saw: why,
        recovered: String::new(),
        lost: 0,
    }
}

/// The status and the error message of a failed client call.
fn refusal(e: &dispatch_client::ClientError) -> String {
    let msg = e.to_string();
    let msg = msg.lines().next().unwrap_or_default();
    match e.status() {
        Some(s) => format!(
            "{} ({})",
            s.as_u16(),
            msg.chars().take(140).collect::<String>()
        ),
        None => msg.chars().take(140).collect(),
    }
}

async fn disk_full(iso: &[&str]) -> Result<Row> {
    let fs = match Tmpfs::mount("48m") {
        Ok(fs) => fs,
        Err(e) => return Ok(skipped("disk-full", format!("{e:#}"))),
    };
    let data = fs.dir.path().join("data");
    let mut flags = iso.to_vec();
    flags.extend(["--min-free-disk", "16Mi"]);
    let s = ServerProcess::start(&data, &flags).await?;
    s.deploy("py", "slow", SLOW, json!({})).await?;
    let big = input(json!({"seconds": 0, "pad": "x".repeat(256 * 1024)}));
    let mut work = Vec::new();
    let mut first_refusal = None;
    for _ in 0..400 {
        match s.client.exec_async("slow", &big, None).await {
            Ok(r) => work.push(Accepted::run(r["id"].as_str().context("no run id")?)),
            Err(e) => {
                first_refusal = Some(refusal(&e));
                break;
            }
        }
    }
    let ready = s.client.ready().await;
    let sync = status_of(&format!("http://{}/slow", s.gateway)).await;
    let accepted_n = work.len();
    let o = accepted::settle(&s.client, work, Duration::from_secs(120)).await;
    // Room again: the finished runs' records are purged.
    let purged = s.client.purge_runs(Some("slow"), None).await;
    let after = s.client.exec_async("slow", &big, None).await;
    let mut row = passed(
        "disk-full",
        format!(
            "{accepted_n} async calls of 256 KiB accepted, then {}; /readyz {}; a sync call {sync}",
            first_refusal.unwrap_or_else(|| "no refusal (the disk never filled)".into()),
            if ready { "ready" } else { "NOT ready" }
        ),
        format!(
            "{} of {} accepted succeeded, {} failed; after purging run records: {}",
            o.succeeded,
            o.accepted,
            o.failed,
            match (&purged, &after) {
                (Ok(_), Ok(_)) => "accepted again".to_string(),
                (Err(e), _) | (_, Err(e)) => format!("still refused: {}", refusal(e)),
            }
        ),
        o.lost,
    );
    if o.failed > 0 || purged.is_err() || after.is_err() {
        row.result = "failed";
    }
    Ok(row)
}

async fn read_only(iso: &[&str]) -> Result<Row> {
    let fs = match Tmpfs::mount("256m") {
        Ok(fs) => fs,
        Err(e) => return Ok(skipped("read-only", format!("{e:#}"))),
    };
    let data = fs.dir.path().join("data");
    let mut s = ServerProcess::start(&data, iso).await?;
    s.deploy("py", "slow", SLOW, json!({})).await?;
    let mut work = Vec::new();
    for _ in 0..20 {
        let r = s.client.exec_async("slow", &input(json!({})), None).await?;
        work.push(Accepted::run(r["id"].as_str().context("no run id")?));
    }
    // The kernel refuses to make a file system read-only while files on it are open for
    // writing (EBUSY), so the server is stopped first, with runs queued or running.
    s.kill9().await?;
    fs.remount(true)?;
    let refused = match s.restart().await {
        Ok(()) => "started (?)".to_string(),
        Err(e) => format!("{e:#}")
            .lines()
            .find(|l| l.to_lowercase().contains("read-only"))
            .map(|l| {
                l.replace(&data.display().to_string(), "<data dir>")
                    .rsplit(": ")
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ← ")
            })
            .unwrap_or_else(|| "exited".into())
            .trim()
            .chars()
            .take(160)
            .collect(),
    };
    let refused_start = !refused.starts_with("started");
    fs.remount(false)?;
    s.restart().await?;
    let o = accepted::settle(&s.client, work, Duration::from_secs(120)).await;
    let mut row = passed(
        "read-only",
        format!("a server started on a read-only data dir exits: {refused}"),
        format!(
            "writable again, the server starts: {} of {} accepted runs succeeded, {} failed",
            o.succeeded, o.accepted, o.failed
        ),
        o.lost,
    );
    if !refused_start || o.failed > 0 {
        row.result = "failed";
    }
    Ok(row)
}

async fn corrupt_blob(iso: &[&str]) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let mut s = ServerProcess::start(dir.path(), iso).await?;
    s.deploy_hello("py", "hello", json!({})).await?;
    let f = s.client.get(Kind::Function, "hello").await?;
    let source = f.spec["source"].as_str().context("no source")?.to_string();
    let blob = dispatch_store::BlobStore::open(dir.path().join("blobs"))?.path(&source);
    let mut bytes = std::fs::read(&blob).context("reading the blob")?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let call = |s: &ServerProcess| {
        let url = format!("http://{}/hello", s.gateway);
        async move { status_of(&url).await }
    };
    // A restart reads every function's source again.
    s.restart().await?;
    let settled =
        super::super::wait_settled(&s.client, Kind::Function, "hello", Duration::from_secs(60))
            .await?;
    let phase = settled.phase().map(|p| p.to_string()).unwrap_or_default();
    let after_restart = call(&s).await;
    // A change that names the same source.
    let mut f2 = s.client.get(Kind::Function, "hello").await?;
    f2.spec["env"] = json!({"CHANGED": "1"});
    let update = match s.client.update(&f2).await {
        Ok(_) => "accepted".to_string(),
        Err(e) => refusal(&e),
    };
    // Recovery: the same source uploaded again repairs the blob.
    let src = tempfile::tempdir()?;
    let file = src.path().join("hello.py");
    std::fs::write(&file, super::HELLO_PY)?;
    crate::commands::upload(&s.client, "default", "hello", &file).await?;
    let mut f3 = s.client.get(Kind::Function, "hello").await?;
    f3.spec["env"] = json!({"CHANGED": "2"});
    s.client.update(&f3).await?;
    let fixed = super::wait_ready(&s.client, "hello").await;
    s.restart().await?;
    let fixed_after_restart = super::wait_ready(&s.client, "hello").await;
    // Just after a start a function is redeployed: calls get 503 + Retry-After meanwhile.
    let t = Instant::now();
    let mut after = call(&s).await;
    while after == 503 && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = call(&s).await;
    }
    let redeploy = t.elapsed().as_secs_f64();
    let detected = phase == "ERROR" && settled.status.reason.contains("corrupt");
    Ok(Row {
        fault: "corrupt-blob",
        result: if detected
            && update.contains("corrupt")
            && fixed.is_ok()
            && fixed_after_restart.is_ok()
            && after == 200
        {
            "passed"
        } else {
            "failed"
        },
        caller_saw: format!(
            "after a restart the function is {phase} ({}), a call {after_restart}; an update naming that source: {update}",
            settled.status.reason.chars().take(100).collect::<String>()
        ),
        recovered: format!(
            "the same source uploaded again repairs the blob: {}; after a restart a call {after} (503 + Retry-After for {redeploy:.1} s while it redeploys)",
            if fixed.is_ok() && fixed_after_restart.is_ok() {
                "READY"
            } else {
                "not READY"
            }
        ),
        lost: 0,
    })
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

async fn idle_flood(iso: &[&str]) -> Result<Row> {
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
        result: if worst < 100.0 && after == 200 && during.1 < 1000.0 && during.0 != "200" {
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

async fn async_flood(iso: &[&str]) -> Result<Row> {
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
    if worst >= 100.0 || !other.is_empty() || o.failed > 0 || refused == 0 {
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
