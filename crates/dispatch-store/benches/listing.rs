//! Listing run history with millions of rows: the newest 100 failed runs of one
//! function, the newest 100 of a namespace, and a page further on with `after`, on a SQLite
//! file holding DISPATCH_BENCH_RUNS runs (default 3,000,000: 20 functions, 1 % failed).
//!
//! `cargo bench -p dispatch-store --bench listing`. Target: < 50 ms p99 for the failed runs.

use std::time::Instant;

use dispatch_core::{Run, RunStatus, Trigger};
use dispatch_store::{RecordStore, RunFilter, SqliteStore};

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn main() {
    let n: usize = std::env::var("DISPATCH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000_000);
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("dispatch.db")).unwrap();
    let input = serde_json::value::to_raw_value(&serde_json::json!({"name": "bench"})).unwrap();
    let start_ms = jiff::Timestamp::now().as_millisecond() as u64 - n as u64;
    let t = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let id = ulid::Ulid::from_parts(start_ms + i as u64, i as u128).to_string();
        let mut r = Run::new(
            id,
            "default",
            &format!("f{}", i % 20),
            Trigger::Exec,
            input.clone(),
            jiff::Timestamp::now(),
        );
        r.status = if i % 100 == 7 {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
        r.finished_at = Some(jiff::Timestamp::now());
        batch.push(r);
        if batch.len() == 1000 {
            s.put_runs(&batch).unwrap();
            batch.clear();
        }
    }
    s.put_runs(&batch).unwrap();
    let load = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(dir.path().join("dispatch.db")).map_or(0, |m| m.len());
    println!(
        "{n} runs stored in {load:.1} s ({:.1} µs a run), database {:.0} MiB",
        load * 1e6 / n as f64,
        bytes as f64 / 1048576.0
    );
    let measure = |name: &str, f: &RunFilter| {
        let mut ms = Vec::new();
        let mut got = 0;
        for _ in 0..200 {
            let t = Instant::now();
            got = s.list_runs("default", f).unwrap().len();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{name:<52} {got:>4} runs  p50 {:>7.2} ms  p99 {:>7.2} ms",
            pct(&mut ms, 0.5),
            pct(&mut ms, 0.99)
        );
    };
    let limit = Some(100);
    measure(
        "newest 100 failed runs of one function",
        &RunFilter {
            function: Some("f7".into()),
            status: Some(RunStatus::Failed),
            limit,
            ..Default::default()
        },
    );
    measure(
        "newest 100 runs of the namespace",
        &RunFilter {
            limit,
            ..Default::default()
        },
    );
    measure(
        "newest 100 failed runs of the namespace",
        &RunFilter {
            status: Some(RunStatus::Failed),
            limit,
            ..Default::default()
        },
    );
    measure(
        "newest 100 succeeded runs of one function",
        &RunFilter {
            function: Some("f7".into()),
            status: Some(RunStatus::Succeeded),
            limit,
            ..Default::default()
        },
    );
    let middle = ulid::Ulid::from_parts(start_ms + n as u64 / 2, 0).to_string();
    measure(
        "a page of one function half-way back (--after)",
        &RunFilter {
            function: Some("f3".into()),
            after: Some(middle),
            limit,
            ..Default::default()
        },
    );
    // One run by id (`dispatch get run ID`): the newest, one half-way back, the oldest.
    for (name, i) in [("newest", n - 1), ("half-way back", n / 2), ("oldest", 0)] {
        let id = ulid::Ulid::from_parts(start_ms + i as u64, i as u128).to_string();
        let mut ms = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            assert!(s.get_run("default", &id).unwrap().is_some());
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{:<52}    1 run   p50 {:>7.2} ms  p99 {:>7.2} ms",
            format!("get one run by id, the {name}"),
            pct(&mut ms, 0.5),
            pct(&mut ms, 0.99)
        );
    }
}
