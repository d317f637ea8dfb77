//! Crash safety of async runs: `kill -9` of the server while 200 async runs are queued or
//! running, a restart on the same data dir, and every accepted run ends SUCCEEDED, none lost,
//! none running twice at once (checked from a log the function appends to).

mod support;

use std::collections::HashMap;

use dispatch_core::RunStatus;
use support::*;

#[test]
fn sigkill_during_200_async_runs_loses_nothing() {
    // The handler logs its start and end to a host file, which is how this test proves that
    // no run ran twice at once: sandboxed code cannot write to the host (DESIGN §9), so this
    // server runs user code unsandboxed (on loopback, as allowed). Crash safety is the same.
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &["--isolation", "none"]);
    let work = s.dir.path().to_path_buf();
    let log = work.join("tick.log");
    let manifest = tick_function(&work, &log, 20, "");
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
    eventually("40 runs to complete", || {
        (tick_ends(&log) >= 40).then_some(())
    });
    let dir = s.kill9();
    let done_before = tick_ends(&log);
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
    let ended = attempts_never_overlap(&std::fs::read_to_string(&log).unwrap());
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

/// An event matching ten subscriptions is stored with its ten deliveries in one transaction:
/// `kill -9` while events are posted, a restart, and every event that was stored (each one
/// answered 202 among them) has exactly ten runs — never a subset, never one twice.
#[test]
fn sigkill_during_fan_out_stores_all_ten_deliveries_or_none() {
    let s = ServerProc::start();
    let work = s.dir.path().to_path_buf();
    std::fs::write(
        work.join("fan.py"),
        "def handle(context, payload):\n    return payload\n",
    )
    .unwrap();
    let mut manifest = String::from(
        "apiVersion: dispatch.dev/v1\nkind: Image\nmetadata: {name: py}\nspec: {baseImage: python3}\n---\n\
         apiVersion: dispatch.dev/v1\nkind: Function\nmetadata: {name: fan}\nspec: {image: py, sourcePath: fan.py}\n",
    );
    for i in 0..10 {
        manifest.push_str(&format!(
            "---\napiVersion: dispatch.dev/v1\nkind: Subscription\nmetadata: {{name: s{i}}}\n\
             spec: {{eventType: order.created, function: fan}}\n"
        ));
    }
    std::fs::write(work.join("fan.yaml"), manifest).unwrap();
    s.ok(&["apply", "-f", work.join("fan.yaml").to_str().unwrap()]);
    eventually("fan to be READY", || {
        (s.json(&["get", "function", "fan", "-o", "json"])["status"]["phase"] == "READY")
            .then_some(())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    // Four producers post until the server is gone.
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (client, accepted) = (s.client(), accepted.clone());
            rt.spawn(async move {
                for i in 0.. {
                    let id = format!("p{p}-{i}");
                    let event = serde_json::json!({"specversion": "1.0", "id": id,
                        "source": "/shop", "type": "order.created", "data": {"id": id}});
                    match client.emit(&event).await {
                        Ok(_) => accepted.lock().unwrap().push(id),
                        Err(e) if e.status().is_some() => panic!("event {id}: {e}"),
                        Err(_) => return, // the server is gone
                    }
                }
            })
        })
        .collect();
    eventually("60 events accepted", || {
        (accepted.lock().unwrap().len() >= 60).then_some(())
    });
    let dir = s.kill9();
    for p in producers {
        rt.block_on(p).unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let s = ServerProc::start_in(dir);
    let client = s.client();
    let stored: Vec<String> = rt
        .block_on(client.list_events(None, false, 10_000))
        .unwrap()
        .iter()
        .map(|e| {
            let n = e["matched"].as_array().unwrap().len();
            let id = e["event"]["id"].as_str().unwrap().to_string();
            assert_eq!(n, 10, "event {id} was stored with {n} deliveries");
            id
        })
        .collect();
    for id in &accepted {
        assert!(stored.contains(id), "accepted event {id} was lost");
    }
    let q = dispatch_client::RunQuery {
        function: Some("fan".into()),
        limit: Some(10_000),
        ..Default::default()
    };
    let expected = stored.len() * 10;
    let runs = eventually("ten finished runs per stored event", || {
        let runs = rt.block_on(client.list_runs(&q)).unwrap();
        (runs.len() >= expected && runs.iter().all(|r| r.status.is_final())).then_some(runs)
    });
    let mut per_event: HashMap<String, usize> = HashMap::new();
    for r in &runs {
        assert_eq!(r.status, RunStatus::Succeeded, "{:?}", r.error);
        let id = r.event.as_ref().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        *per_event.entry(id).or_default() += 1;
    }
    assert_eq!(per_event.len(), stored.len());
    assert!(
        per_event.values().all(|n| *n == 10),
        "ten runs per event: {per_event:?}"
    );
    eprintln!(
        "{} events accepted before the kill, {} stored, {} runs",
        accepted.len(),
        stored.len(),
        runs.len()
    );
}
