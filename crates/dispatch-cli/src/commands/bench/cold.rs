//! Cold starts after scale to zero, per start method, split into their steps; the idle warm
//! worker's memory (USS, RSS).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_runtime::pool::Launcher;
use serde_json::value::RawValue;

use super::*;

/// Scale `function` to zero, call it, and read the run's cold-start record; `samples` times.
pub(super) async fn cold_starts(
    s: &Setup,
    function: &str,
    method: &'static str,
    language: &'static str,
    samples: usize,
) -> Result<Cold> {
    let p = pool(&s.local, function)?;
    let input = RawValue::from_string(r#"{"name":"cold"}"#.into())?;
    let (mut e2e, mut total, mut spawn, mut import, mut first) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples.max(1) {
        p.reap(Instant::now() + Duration::from_secs(365 * 24 * 3600));
        if let Launcher::Spares(spares) = &p.config().launcher {
            // Steady state: a spare is waiting (started after the previous sample).
            let deadline = Instant::now() + Duration::from_secs(30);
            while spares.ready() == 0 {
                if Instant::now() > deadline {
                    bail!("no spare node worker became ready within 30s");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let t = Instant::now();
        let r = s.client.exec(function, &input).await?;
        let took = t.elapsed().as_secs_f64() * 1e3;
        if let Some(err) = r.envelope.context.error {
            bail!("cold call of {function} failed: {}", err.message);
        }
        let id = r.run_id.context("the API did not name the run")?;
        let run = s.client.get_run(&id).await?;
        let Some(c) = run.cold_start else {
            bail!("run {id} of {function} after scale to zero was not cold");
        };
        if c.method.as_str() != method {
            bail!(
                "{function} started a worker by {}, not {method}",
                c.method.as_str()
            );
        }
        e2e.push(took);
        total.push(c.total_ms);
        spawn.push(c.spawn_ms);
        import.push(c.import_ms);
        first.push(c.first_call_ms);
    }
    Ok(Cold {
        method,
        language,
        samples: e2e.len(),
        e2e_p50_ms: pct(&mut e2e, 0.5),
        e2e_p99_ms: pct(&mut e2e, 0.99),
        total_p50_ms: pct(&mut total, 0.5),
        total_p99_ms: pct(&mut total, 0.99),
        spawn_p50_ms: pct(&mut spawn, 0.5),
        import_p50_ms: pct(&mut import, 0.5),
        first_call_p50_ms: pct(&mut first, 0.5),
    })
}

/// One idle warm worker of `function`: its unique set size (private pages) and RSS.
pub(super) async fn idle_uss(s: &Setup, function: &str, worker: &'static str) -> Result<Uss> {
    let input = RawValue::from_string("null".into())?;
    s.client.exec(function, &input).await?;
    let p = pool(&s.local, function)?;
    let pid = *p
        .idle_pids()
        .last()
        .context("no idle worker after a call")?;
    let (uss_kib, rss_kib) = memory_of(pid)?;
    Ok(Uss {
        worker,
        uss_kib,
        rss_kib,
    })
}

/// (USS, RSS) in KiB from /proc/PID/smaps_rollup.
pub(super) fn memory_of(pid: i32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok((
        field("Private_Clean:") + field("Private_Dirty:"),
        field("Rss:"),
    ))
}
