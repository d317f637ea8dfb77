//! Crash safety of async runs: `kill -9` of the server while 200 async runs are queued or
//! running, a restart on the same data dir, and every accepted run ends SUCCEEDED, none lost,
//! none running twice at once (checked from a log the function appends to).

mod support;

use std::collections::HashMap;

use dispatch_core::RunStatus;
use support::*;

const TICK: &str = r#"
import os, select

def handle(context, payload):
    fd = os.open(os.environ["LOG_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("start %s %d\n" % (context["runId"], os.getpid())).encode())
    select.select([], [], [], 0.02)  # 20 ms of work, so that the kill lands mid-run
    os.write(fd, ("end %s %d\n" % (context["runId"], os.getpid())).encode())
    os.close(fd)
    return {"ok": True}
"#;

fn ends(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("end "))
        .count()
}

#[test]
fn sigkill_during_200_async_runs_loses_nothing() {
    // The handler logs its start and end to a host file, which is how this test proves that
    // no run ran twice at once: sandboxed code cannot write to the host (DESIGN §9), so this
    // server runs user code unsandboxed (on loopback, as allowed). Crash safety is the same.
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &["--isolation", "none"]);
    let work = s.dir.path().to_path_buf();
    let log = work.join("tick.log");
    std::fs::write(work.join("tick.py"), TICK).unwrap();
    let manifest = work.join("tick.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"apiVersion: dispatch.dev/v1
kind: Image
metadata: {{name: py}}
spec: {{baseImage: python3}}
---
apiVersion: dispatch.dev/v1
kind: Function
metadata: {{name: tick}}
spec:
  image: py
  sourcePath: tick.py
  env: {{LOG_FILE: "{}"}}
  retry: {{maxAttempts: 5, backoff: {{initial: 100ms, max: 1s}}}}
"#,
            log.display()
        ),
    )
    .unwrap();
    s.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    eventually("tick to be READY", || {
        (s.json(&["get", "function", "tick", "-o", "json"])["status"]["phase"] == "READY")
            .then_some(())
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = s.client();
    let input = serde_json::value::to_raw_value(&serde_json::json!({})).unwrap();
    let accepted: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..200 {
            let a = client.exec_async("tick", &input, None).await.unwrap();
            ids.push(a["id"].as_str().unwrap().to_string());
        }
        ids
    });

    // Kill the server in the middle of the backlog.
    eventually("40 runs to complete", || (ends(&log) >= 40).then_some(()));
    let dir = s.kill9();
    let done_before = ends(&log);
    assert!(
        done_before < 200,
        "the kill came too late to test anything ({done_before} done)"
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"restart\n"))
        .unwrap();

    let s = ServerProc::start_with(dir, &["--isolation", "none"]);
    let client = s.client();
    let q = dispatch_client::RunQuery {
        function: Some("tick".into()),
        limit: Some(1000),
        ..Default::default()
    };
    let runs = eventually("all 200 runs to finish", || {
        let runs = rt.block_on(client.list_runs(&q)).unwrap();
        (runs.len() == 200 && runs.iter().all(|r| r.status.is_final())).then_some(runs)
    });
    let by_id: HashMap<&str, &dispatch_core::Run> =
        runs.iter().map(|r| (r.id.as_str(), r)).collect();
    for id in &accepted {
        let r = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("accepted run {id} was lost"));
        assert_eq!(
            r.status,
            RunStatus::Succeeded,
            "{id}: {:?}",
            r.attempt_errors
        );
    }
    let interrupted = runs.iter().filter(|r| !r.attempt_errors.is_empty()).count();

    // No run ran twice at once. An attempt cut by the kill may still write its end after
    // the restart marker (its worker noticed the server's death within 100 ms), but only if no
    // new attempt of that run had started by then.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut open: HashMap<String, String> = HashMap::new();
    // Attempts in flight at the kill: id -> (pid, superseded by a new attempt).
    let mut orphans: HashMap<String, (String, bool)> = HashMap::new();
    let mut ended: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["restart"] => {
                orphans.extend(open.drain().map(|(id, pid)| (id, (pid, false))));
            }
            ["start", id, pid] => {
                if let Some(other) = open.insert(id.to_string(), pid.to_string()) {
                    panic!("run {id} started in worker {pid} while still running in {other}");
                }
                if let Some(o) = orphans.get_mut(*id) {
                    o.1 = true;
                }
            }
            ["end", id, pid] => {
                if open.get(*id).map(String::as_str) == Some(*pid) {
                    open.remove(*id);
                } else {
                    match orphans.remove(*id) {
                        Some((opid, false)) if opid == *pid => {}
                        other => panic!(
                            "run {id} ended in worker {pid} while another attempt ran ({other:?})"
                        ),
                    }
                }
                *ended.entry(id.to_string()).or_default() += 1;
            }
            other => panic!("unexpected log line {other:?}"),
        }
    }
    for id in &accepted {
        assert!(
            ended.contains_key(id),
            "run {id} never completed an attempt"
        );
    }
    eprintln!(
        "{done_before} done before the kill, {interrupted} interrupted and retried, 200 SUCCEEDED"
    );
}
