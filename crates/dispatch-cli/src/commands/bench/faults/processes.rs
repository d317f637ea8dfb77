//! Rows that kill a process with SIGKILL: a worker, a zygote, the server itself.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dispatch_core::{Kind, Object};
use serde_json::json;

use crate::commands::bench::accepted::{self, Accepted};
use crate::commands::bench::process::ServerProcess;

use super::*;

pub(super) async fn worker_kill(iso: &[&str]) -> Result<Row> {
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

pub(super) async fn zygote_kill(iso: &[&str]) -> Result<Row> {
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

pub(super) async fn server_kill(iso: &[&str]) -> Result<Row> {
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
                "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "0.5"]}]}}}},
                // Host processes: the matrix is about the server, not image pulls.
                "runtime": "host"}),
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
