//! Rows that break the data dir: a full disk and a read-only one (a tmpfs of their own), a
//! corrupted source blob.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dispatch_core::Kind;
use serde_json::json;

use crate::commands::bench::accepted::{self, Accepted};
use crate::commands::bench::process::ServerProcess;

use super::*;

/// Mounts a tmpfs of `size` at a new temporary dir (root only), unmounted on drop.
pub(super) struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub(super) fn mount(size: &str) -> Result<Tmpfs> {
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

    pub(super) fn remount(&self, read_only: bool) -> Result<()> {
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

pub(super) fn skipped(fault: &'static str, why: String) -> Row {
    Row {
        fault,
        result: "skipped",
        caller_saw: why,
        recovered: String::new(),
        lost: 0,
    }
}

/// The status and the error message of a failed client call.
pub(super) fn refusal(e: &dispatch_client::ClientError) -> String {
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

pub(super) async fn disk_full(iso: &[&str]) -> Result<Row> {
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

pub(super) async fn read_only(iso: &[&str]) -> Result<Row> {
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

pub(super) async fn corrupt_blob(iso: &[&str]) -> Result<Row> {
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
    // A restart reads every function's source again. Until the controller has reached this
    // function its stored status is the one from before the restart (READY), so the check
    // polls, with a deadline, for the status the redeploy writes.
    s.restart().await?;
    let t = Instant::now();
    let settled = loop {
        let o = s.client.get(Kind::Function, "hello").await?;
        if o.phase() == Some(dispatch_core::Phase::Error) || t.elapsed() > Duration::from_secs(30) {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
    std::fs::write(&file, crate::commands::bench::HELLO_PY)?;
    crate::commands::upload(&s.client, "default", "hello", &file).await?;
    let mut f3 = s.client.get(Kind::Function, "hello").await?;
    f3.spec["env"] = json!({"CHANGED": "2"});
    s.client.update(&f3).await?;
    let fixed = crate::commands::bench::wait_ready(&s.client, "hello").await;
    s.restart().await?;
    let fixed_after_restart = crate::commands::bench::wait_ready(&s.client, "hello").await;
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
