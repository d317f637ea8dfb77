//! Three active servers on one PostgreSQL database (`--database`): each accepts async runs
//! and runs them; `kill -9` of one mid-backlog, and the others take its runs over after its
//! lease — every accepted run ends SUCCEEDED, none lost, none running twice at once (checked
//! from a log the function appends to), the killed server's runs finished by the others.

mod support;

use std::collections::HashMap;

use dispatch_core::RunStatus;
use support::*;

const RUNS: usize = 1000;

/// These tests each run two or three servers with real workers: one at a time, so that they
/// do not starve each other of this machine's two cores.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Servers on one fresh database of their own, with one key file (in `shared`) and `extra`
/// flags: the first with [`Cluster::first`], the others with [`Cluster::another`].
struct Cluster {
    _pg: dispatch_testkit::postgres::Postgres,
    url: String,
    shared: tempfile::TempDir,
    extra: Vec<String>,
}

impl Cluster {
    fn new(db: &str, extra: &[&str]) -> Cluster {
        let pg = dispatch_testkit::postgres::Postgres::start();
        let url = pg.create_database(db);
        Cluster {
            _pg: pg,
            url,
            shared: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|f| f.to_string()).collect(),
        }
    }

    fn flags(&self) -> Vec<String> {
        let key = self.shared.path().join("secret.key");
        let mut f = vec![
            "--database".to_string(),
            self.url.clone(),
            "--secret-key-file".into(),
            key.display().to_string(),
        ];
        f.extend(self.extra.iter().cloned());
        f
    }

    fn start(&self, dir: tempfile::TempDir) -> ServerProc {
        let flags = self.flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ServerProc::start_with(dir, &flags)
    }

    /// The first server: it writes the admin token.
    fn first(&self) -> ServerProc {
        self.start(tempfile::tempdir().unwrap())
    }

    /// Another server: its data dir holds the first one's admin token (tokens are shared;
    /// only a first start writes the file).
    fn another(&self, token: &str) -> ServerProc {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(data.join("admin-token"), token).unwrap();
        std::fs::set_permissions(
            data.join("admin-token"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        self.start(dir)
    }
}

#[test]
fn three_servers_share_the_queue_and_take_over_a_killed_one() {
    let _one = one_at_a_time();
    // Unsandboxed, so that the handler can write the host file that proves no run ran twice
    // at once (as in crash.rs).
    let cluster = Cluster::new(
        "replicas",
        &["--replica-lease", "2s", "--isolation", "none"],
    );
    let shared = &cluster.shared;
    let log = shared.path().join("tick.log");
    let a = cluster.first();
    let b = cluster.another(&a.token);
    let c = cluster.another(&a.token);

    // Created through one server: its source archive reaches the others through the store.
    let manifest = tick_function(shared.path(), &log, 50, "  concurrency: {maxWorkers: 2}\n");
    a.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    for s in [&a, &b, &c] {
        eventually("tick to answer on every server", || {
            let out = s
                .cli()
                .args(["exec", "tick", "--input", "{}"])
                .output()
                .unwrap();
            out.status.success().then_some(())
        });
    }
    std::fs::write(&log, "").unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clients = [a.client(), b.client(), c.client()];
    let input = serde_json::value::to_raw_value(&serde_json::json!({})).unwrap();
    // Accepted round-robin: (id, the server that owns it).
    let accepted: Vec<(String, String)> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..RUNS {
            let r = clients[i % 3]
                .exec_async("tick", &input, None)
                .await
                .unwrap();
            let owner = r["replica"].as_str().expect("a run names its server");
            ids.push((r["id"].as_str().unwrap().to_string(), owner.to_string()));
        }
        ids
    });
    let owner_of = |i: usize| accepted[i].1.clone();
    let killed = owner_of(2);
    assert!(
        owner_of(0) != owner_of(1) && owner_of(1) != killed && owner_of(0) != killed,
        "three servers, three ids"
    );

    eventually("50 runs to complete", || {
        (tick_ends(&log) >= 50).then_some(())
    });
    let _ = c.kill9();
    let done_before = tick_ends(&log);
    assert!(
        done_before < RUNS,
        "the kill came too late to test anything ({done_before} done)"
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"restart\n"))
        .unwrap();

    let q = dispatch_client::RunQuery {
        function: Some("tick".into()),
        limit: Some(5000),
        ..Default::default()
    };
    let runs = eventually("every accepted run to finish", || {
        let runs = rt.block_on(clients[0].list_runs(&q)).unwrap();
        let asyncs: Vec<_> = runs.into_iter().filter(|r| r.is_async).collect();
        (asyncs.len() == RUNS && asyncs.iter().all(|r| r.status.is_final())).then_some(asyncs)
    });
    let by_id: HashMap<&str, &dispatch_core::Run> =
        runs.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut taken = 0;
    for (id, owner) in &accepted {
        let r = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("accepted run {id} was lost"));
        assert_eq!(
            r.status,
            RunStatus::Succeeded,
            "{id}: {:?}",
            r.attempt_errors
        );
        // What the killed server had not finished, another one did (and owns now).
        if *owner == killed && r.replica.as_deref() != Some(killed.as_str()) {
            taken += 1;
        }
    }
    assert!(taken > 0, "none of the killed server's runs was taken over");
    // What the survivors say of it in /metrics: one of them took work over, one leads.
    let metric = |s: &ServerProc, name: &str| -> u64 {
        let auth = format!("Bearer {}", s.token);
        let (_, _, body) = http(s.api, "GET", "/metrics", &[("authorization", &auth)], "").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in /metrics"))
            .parse()
            .unwrap()
    };
    assert!(
        metric(&a, "dispatch_replica_taken_over_total")
            + metric(&b, "dispatch_replica_taken_over_total")
            >= taken as u64
    );
    eventually("one of the survivors to lead", || {
        (metric(&a, "dispatch_replica_leader") + metric(&b, "dispatch_replica_leader") == 1)
            .then_some(())
    });

    // No run ran twice at once (the check crash.rs makes).
    let ended = attempts_never_overlap(&std::fs::read_to_string(&log).unwrap());
    for (id, _) in &accepted {
        assert!(
            ended.contains_key(id),
            "run {id} never completed an attempt"
        );
    }
    let interrupted = runs.iter().filter(|r| !r.attempt_errors.is_empty()).count();
    eprintln!(
        "{done_before} done before the kill, {taken} of the killed server's runs finished by \
         the others, {interrupted} interrupted and retried, {RUNS} SUCCEEDED"
    );
}

/// A run is cancelled through any server (the one that runs it does it, told through the
/// store), a secret sealed by one opens on the other, and a server whose secret key differs
/// from the others' refuses to start.
#[test]
fn a_run_is_cancelled_through_another_server_and_keys_must_agree() {
    let _one = one_at_a_time();
    let cluster = Cluster::new("cancel", &[]);
    let shared = &cluster.shared;
    let a = cluster.first();
    let b = cluster.another(&a.token);
    let hang = shared.path().join("hang.py");
    std::fs::write(
        &hang,
        "import select\ndef handle(context, payload):\n    select.select([], [], [])\n",
    )
    .unwrap();
    a.ok(&["create", "image", "py", "python3", "--wait"]);
    a.ok(&[
        "create",
        "function",
        "hang",
        hang.to_str().unwrap(),
        "--image",
        "py",
        "--wait",
    ]);
    let accepted: serde_json::Value =
        serde_json::from_str(&a.ok(&["exec", "hang", "--async", "--input", "{}"])).unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    eventually("the run to be RUNNING on its server", || {
        (b.json(&["get", "run", &id, "-o", "json"])["status"]["phase"] == "RUNNING").then_some(())
    });
    assert_eq!(
        b.ok(&["cancel", "run", &id]),
        format!("run/{id} cancelled\n")
    );
    let run = a.json(&["get", "run", &id, "-o", "json"]);
    assert_eq!(run["status"]["phase"], "CANCELLED", "{run}");
    // A secret sealed by one server opens on the other (one key file).
    a.ok(&[
        "create",
        "secret",
        "db",
        "--from-literal",
        "password=s3cr3t-9",
    ]);
    let revealed = b.json(&["get", "secret", "db", "--reveal", "-o", "json"]);
    assert_eq!(revealed["spec"]["data"]["password"], "s3cr3t-9");

    let other_key = shared.path().join("other.key");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
        .args(["server", "--database", &cluster.url, "--secret-key-file"])
        .arg(&other_key)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--api-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not the one the other servers sharing this database use"),
        "{err}"
    );
}

/// A rolling restart of all three servers under load: each in turn gets SIGTERM (it answers
/// /readyz with 503 for its `--shutdown-delay` while still serving, then stops) and starts
/// again on its data dir, while sync calls go through a balancer that sends them only to
/// servers whose /readyz says 200 (as a Kubernetes Service does) and async runs are accepted
/// throughout. No sync call fails, and every accepted async run ends SUCCEEDED.
#[test]
fn a_rolling_restart_of_three_servers_fails_no_request() {
    let _one = one_at_a_time();
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let cluster = Cluster::new(
        "rolling",
        &["--replica-lease", "2s", "--shutdown-delay", "1s"],
    );
    let a = cluster.first();
    let token = a.token.clone();
    let b = cluster.another(&token);
    let c = cluster.another(&token);
    let hello = examples().join("python3/hello.py");
    a.ok(&["create", "image", "py", "python3", "--wait"]);
    a.ok(&[
        "create",
        "function",
        "hello",
        hello.to_str().unwrap(),
        "--image",
        "py",
        "--wait",
    ]);
    let mut servers = vec![a, b, c];
    for s in &servers {
        eventually("hello to answer on every server", || {
            let out = s
                .cli()
                .args(["exec", "hello", "--input", "{}"])
                .output()
                .unwrap();
            out.status.success().then_some(())
        });
    }

    // The balancer: the API ports of the servers whose /readyz answered 200 last (polled
    // every 50 ms, as a readiness probe would).
    let ports: Arc<Mutex<Vec<u16>>> = Arc::new(Mutex::new(servers.iter().map(|s| s.api).collect()));
    // The ready ports, and a condition the probe signals whenever it has looked again.
    let ready: Arc<(Mutex<Vec<u16>>, std::sync::Condvar)> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (ports, ready, stop) = (ports.clone(), ready.clone(), stop.clone());
        std::thread::spawn(move || {
            // The probe's period comes from a timer, as a kubelet's does.
            let timer = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let mut period = timer
                .block_on(async { tokio::time::interval(std::time::Duration::from_millis(50)) });
            while !stop.load(Ordering::Relaxed) {
                timer.block_on(period.tick());
                let now: Vec<u16> = ports
                    .lock()
                    .unwrap()
                    .clone()
                    .into_iter()
                    .filter(|p| http_get(*p, "/readyz").is_some_and(|r| r.0 == 200))
                    .collect();
                *ready.0.lock().unwrap() = now;
                ready.1.notify_all();
            }
        })
    };
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let load = {
        let (ready, stop, ok, failed, accepted) = (
            ready.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            accepted.clone(),
        );
        let auth = format!("Bearer {token}");
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let Some(port) = ({
                    let r = ready.0.lock().unwrap();
                    // Nothing ready: the balancer holds the call until the probe looks again.
                    let r = ready
                        .1
                        .wait_timeout_while(r, std::time::Duration::from_millis(200), |r| {
                            r.is_empty()
                        })
                        .unwrap()
                        .0;
                    (!r.is_empty()).then(|| r[i % r.len()])
                }) else {
                    continue;
                };
                i += 1;
                let sync = !i.is_multiple_of(4);
                let path = format!(
                    "/v1/namespaces/default/functions/hello/runs{}",
                    if sync { "" } else { "?wait=false" }
                );
                let res = http(
                    port,
                    "POST",
                    &path,
                    &[
                        ("authorization", auth.as_str()),
                        ("content-type", "application/json"),
                    ],
                    r#"{"input": {"name": "roll"}}"#,
                );
                match res {
                    Some((200, _, _)) if sync => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Some((202, _, body)) if !sync => {
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                        accepted
                            .lock()
                            .unwrap()
                            .push(v["id"].as_str().unwrap().to_string());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed
                        .lock()
                        .unwrap()
                        .push(format!("{port} {path}: {other:?}")),
                }
            }
        })
    };
    eventually("load to flow", || {
        (ok.load(Ordering::Relaxed) > 20).then_some(())
    });
    for i in 0..3 {
        let s = servers.remove(0);
        let old = s.api;
        let dir = s.stop_gracefully();
        let s = cluster.start(dir);
        {
            let mut p = ports.lock().unwrap();
            p.retain(|x| *x != old);
            p.push(s.api);
        }
        servers.push(s);
        let before = ok.load(Ordering::Relaxed);
        eventually("calls to flow after a restart", || {
            (ok.load(Ordering::Relaxed) > before + 20).then_some(())
        });
        eprintln!("server {i} restarted");
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    prober.join().unwrap();
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} failed: {failed:#?}", failed.len());
    let accepted = accepted.lock().unwrap().clone();
    assert!(!accepted.is_empty());
    let s = &servers[0];
    for id in &accepted {
        eventually("every accepted async run to succeed", || {
            let r = s.json(&["get", "run", id, "-o", "json"]);
            (r["status"]["phase"] == "SUCCEEDED").then_some(())
        });
    }
    eprintln!(
        "{} calls answered during the rolling restart, {} async runs SUCCEEDED",
        ok.load(Ordering::Relaxed),
        accepted.len()
    );
}
