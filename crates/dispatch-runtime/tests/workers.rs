//! The runtime with real `python3` and `node` processes: deploy, call, errors, timeouts,
//! crashes, scaling and rebuilds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_core::{ErrorType, Language};
use dispatch_runtime::LocalBackend;
use dispatch_runtime::backend::{Backend, BaseImageCheck, FunctionDeploy};
use flate2::{Compression, write::GzEncoder};
use serde_json::json;
use serde_json::value::RawValue;

fn archive(files: &[(&str, &str, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (path, body, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

const HELLO_PY: &str = include_str!("../../../examples/python3/hello.py");
const HELLO_JS: &str = include_str!("../../../examples/nodejs/hello.js");

struct Fx {
    _dir: tempfile::TempDir,
    backend: Arc<LocalBackend>,
}

fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let backend = LocalBackend::new(dir.path()).unwrap();
    Fx { _dir: dir, backend }
}

fn deploy(
    name: &str,
    lang: Language,
    files: &[(&str, &str, u32)],
    handler: Option<&str>,
) -> FunctionDeploy {
    let archive = archive(files);
    FunctionDeploy {
        namespace: "default".into(),
        name: name.into(),
        digest: dispatch_core::digest::sha256_parts([
            archive.as_slice(),
            handler.unwrap_or("").as_bytes(),
        ]),
        base: BaseImageCheck {
            image: String::new(),
            language: lang,
            interpreter: None,
        },
        archive: Arc::new(archive),
        image_build: None,
        dependencies: None,
        index_url: None,
        handler: handler.map(str::to_string),
        env: BTreeMap::new(),
        timeout: Duration::from_secs(10),
        max_workers: 2,
        min_workers: 0,
        idle_timeout: Duration::from_secs(300),
        preload: None,
        limits: Default::default(),
        network: true,
        container: false,
        stream: false,
        steps: Default::default(),
    }
}

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_string()).unwrap()
}

async fn call(b: &LocalBackend, name: &str, payload: &str) -> (serde_json::Value, bool) {
    let ctx = raw(r#"{"secrets":{}}"#);
    let out = b
        .invoke(
            "default",
            name,
            &ctx,
            &raw(payload),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
    (serde_json::to_value(&out.envelope).unwrap(), out.cold)
}

#[tokio::test]
async fn python_hello_returns_the_envelope_and_reuses_the_warm_worker() {
    let f = fx();
    f.backend
        .deploy_function(deploy(
            "hello",
            Language::Python3,
            &[("hello.py", HELLO_PY, 0o644)],
            None,
        ))
        .await
        .unwrap();
    let (env, cold) = call(&f.backend, "hello", r#"{"name":"user"}"#).await;
    assert_eq!(env["payload"]["myField"], "Hello, user from Nowhere");
    assert_eq!(
        env["context"]["logs"]["stdout"][0],
        "messages to stdout show up in logs"
    );
    assert_eq!(env["context"]["logs"]["stderr"], serde_json::json!([]));
    assert!(env["context"]["error"].is_null());
    assert!(!cold, "the validation worker stays warm");
    let pool = f.backend.pool("default", "hello").unwrap();
    let pid = pool.idle_pids();
    let (_, cold) = call(&f.backend, "hello", "null").await;
    assert!(!cold);
    assert_eq!(pool.idle_pids(), pid, "the same worker served both calls");
}

#[tokio::test]
async fn node_hello_works_with_module_export_and_named_handler() {
    let f = fx();
    f.backend
        .deploy_function(deploy(
            "hello-js",
            Language::Nodejs,
            &[("hello.js", HELLO_JS, 0o644)],
            None,
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "hello-js", r#"{"name":"node"}"#).await;
    assert_eq!(env["payload"]["myField"], "Hello, node from Nowhere");
    assert_eq!(
        env["context"]["logs"]["stdout"][0],
        "messages to stdout show up in logs"
    );
    f.backend
        .deploy_function(deploy(
            "named",
            Language::Nodejs,
            &[("hello.js", HELLO_JS, 0o644)],
            Some("hello.handle"),
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "named", "{}").await;
    assert_eq!(env["payload"]["myField"], "Hello, Noone from Nowhere");
}

#[tokio::test]
async fn python_errors_map_to_input_and_function_errors() {
    let f = fx();
    let src = "def handle(ctx, p):\n    if p == 'bad':\n        raise ValueError('bad input')\n    if p == 'boom':\n        raise RuntimeError('boom')\n    import sys\n    print('to stderr', file=sys.stderr)\n    return ctx['secrets']\n";
    f.backend
        .deploy_function(deploy(
            "errs",
            Language::Python3,
            &[("errs.py", src, 0o644)],
            None,
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "errs", r#""bad""#).await;
    assert_eq!(env["context"]["error"]["type"], "InputError");
    assert_eq!(env["context"]["error"]["message"], "bad input");
    assert!(env["payload"].is_null());
    let (env, _) = call(&f.backend, "errs", r#""boom""#).await;
    assert_eq!(env["context"]["error"]["type"], "FunctionError");
    let trace = env["context"]["error"]["stacktrace"].as_array().unwrap();
    assert!(
        trace
            .iter()
            .any(|l| l.as_str().unwrap().contains("errs.py")),
        "{trace:?}"
    );
    assert!(
        !trace
            .iter()
            .any(|l| l.as_str().unwrap().contains("bootstrap.py")),
        "{trace:?}"
    );
    // As Dispatch's function servers do (their tests assert the two equal): the traceback
    // is in the logs too.
    assert_eq!(
        env["context"]["logs"]["stderr"], env["context"]["error"]["stacktrace"],
        "{env}"
    );
    let (env, _) = call(&f.backend, "errs", "1").await;
    assert_eq!(env["payload"], serde_json::json!({}));
    assert_eq!(env["context"]["logs"]["stderr"][0], "to stderr");
}

#[tokio::test]
async fn node_errors_put_their_stack_in_the_logs_too() {
    let f = fx();
    let src =
        "module.exports = async (ctx, p) => { console.error('before'); throw new Error('boom'); };";
    f.backend
        .deploy_function(deploy(
            "nerrs",
            Language::Nodejs,
            &[("nerrs.js", src, 0o644)],
            None,
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "nerrs", "{}").await;
    assert_eq!(env["context"]["error"]["message"], "boom");
    let stack = env["context"]["error"]["stacktrace"].as_array().unwrap();
    assert!(stack[0].as_str().unwrap().contains("Error: boom"), "{env}");
    let mut want = vec![serde_json::json!("before")];
    want.extend(stack.iter().cloned());
    assert_eq!(env["context"]["logs"]["stderr"], serde_json::json!(want));
}

#[tokio::test]
async fn a_handler_that_does_not_load_fails_the_build_with_the_reason() {
    let f = fx();
    let err = f
        .backend
        .deploy_function(deploy(
            "bad",
            Language::Python3,
            &[("bad.py", "def other(c, p):\n    pass\n", 0o644)],
            Some("bad.handle"),
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("has no attribute 'handle'"),
        "{err}"
    );
    let err = f
        .backend
        .deploy_function(deploy(
            "syntax",
            Language::Python3,
            &[("s.py", "def handle(:\n", 0o644)],
            None,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("SyntaxError"), "{err}");
    let err = f
        .backend
        .deploy_function(deploy(
            "nojs",
            Language::Nodejs,
            &[("x.js", "module.exports = 42;", 0o644)],
            None,
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not export a function"),
        "{err}"
    );
    assert!(f.backend.pool("default", "bad").is_none());
}

#[tokio::test]
async fn timeouts_kill_the_process_group_and_the_next_call_gets_a_new_worker() {
    let f = fx();
    // "block": a grandchild that never exits, and a handler that waits until it is killed.
    let src = "import select, subprocess\ndef handle(ctx, p):\n    if p == 'block':\n        subprocess.Popen(['tail', '-f', '/dev/null'])\n        select.select([], [], [])\n    return 'ok'\n";
    let mut d = deploy("slow", Language::Python3, &[("slow.py", src, 0o644)], None);
    d.timeout = Duration::from_millis(500);
    f.backend.deploy_function(d).await.unwrap();
    let pool = f.backend.pool("default", "slow").unwrap();
    let pid = pool.idle_pids()[0];
    let ctx = raw("{}");
    let out = f
        .backend
        .invoke(
            "default",
            "slow",
            &ctx,
            &raw(r#""block""#),
            Instant::now() + Duration::from_millis(500),
        )
        .await
        .unwrap();
    let err = out.envelope.context.error.unwrap();
    assert_eq!(err.kind, ErrorType::SystemError);
    assert_eq!(err.message, "function timed out after 500ms");
    // The worker and its grandchild are gone (same process group).
    wait_until(|| !pid_alive(pid)).await;
    // SIGKILL reaches every member of the group; each dies when next scheduled.
    wait_until(|| !pgroup_has_members(pid)).await;
    let (env, cold) = call(&f.backend, "slow", r#""fast""#).await;
    assert_eq!(env["payload"], "ok");
    assert!(cold);
}

#[tokio::test]
async fn a_crashing_worker_is_a_system_error_and_is_replaced() {
    let f = fx();
    let src = "import os\ndef handle(ctx, p):\n    if p == 'die':\n        os._exit(3)\n    return 'alive'\n";
    f.backend
        .deploy_function(deploy(
            "crash",
            Language::Python3,
            &[("crash.py", src, 0o644)],
            None,
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "crash", r#""die""#).await;
    assert_eq!(env["context"]["error"]["type"], "SystemError");
    assert!(
        env["context"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exited unexpectedly"),
        "{env}"
    );
    let (env, cold) = call(&f.backend, "crash", "1").await;
    assert_eq!(env["payload"], "alive");
    assert!(cold);
}

#[tokio::test]
async fn exec_handlers_read_stdin_and_write_json() {
    let f = fx();
    let script =
        "#!/bin/sh\nread -r input\necho \"got $input\" >&2\nprintf '{\"echo\": %s}' \"$input\"\n";
    f.backend
        .deploy_function(deploy(
            "ex",
            Language::Exec,
            &[("run.sh", script, 0o755)],
            None,
        ))
        .await
        .unwrap();
    let (env, cold) = call(&f.backend, "ex", r#"{"a":1}"#).await;
    assert_eq!(env["payload"], serde_json::json!({"echo": {"a": 1}}));
    assert_eq!(env["context"]["logs"]["stderr"][0], r#"got {"a":1}"#);
    assert!(cold);
    let bad = "#!/bin/sh\necho not json\nexit 0\n";
    f.backend
        .deploy_function(deploy(
            "ex-bad",
            Language::Exec,
            &[("bad.sh", bad, 0o755)],
            None,
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "ex-bad", "1").await;
    assert_eq!(env["context"]["error"]["type"], "FunctionError");
    let failing = "#!/bin/sh\necho oops >&2\nexit 4\n";
    f.backend
        .deploy_function(deploy(
            "ex-fail",
            Language::Exec,
            &[("f.sh", failing, 0o755)],
            None,
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "ex-fail", "1").await;
    assert!(
        env["context"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exit status: 4"),
        "{env}"
    );
    assert_eq!(env["context"]["logs"]["stderr"][0], "oops");
}

#[tokio::test]
async fn workers_get_only_the_declared_environment() {
    let f = fx();
    let src = "import os\ndef handle(ctx, p):\n    return {k: os.environ.get(k) for k in ['GREETING', 'CARGO', 'HOME']}\n";
    let mut d = deploy("envf", Language::Python3, &[("envf.py", src, 0o644)], None);
    d.env.insert("GREETING".into(), "hi".into());
    f.backend.deploy_function(d).await.unwrap();
    let (env, _) = call(&f.backend, "envf", "1").await;
    assert_eq!(env["payload"]["GREETING"], "hi");
    assert!(
        env["payload"]["CARGO"].is_null(),
        "server env must not leak: {env}"
    );
}

#[tokio::test]
async fn concurrency_is_bounded_by_max_workers() {
    let f = fx();
    // Each call holds its worker for 0.2 s (a select timeout), so that the six overlap.
    let src = "import select, os\ndef handle(ctx, p):\n    select.select([], [], [], 0.2)\n    return os.getpid()\n";
    f.backend
        .deploy_function(deploy(
            "conc",
            Language::Python3,
            &[("conc.py", src, 0o644)],
            None,
        ))
        .await
        .unwrap();
    let b = f.backend.clone();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { call(&b, "conc", "1").await.0["payload"].as_i64().unwrap() })
        })
        .collect();
    let mut pids = Vec::new();
    for c in calls {
        pids.push(c.await.unwrap());
    }
    pids.sort();
    pids.dedup();
    assert_eq!(
        pids.len(),
        2,
        "maxWorkers=2 → at most two distinct workers: {pids:?}"
    );
    assert_eq!(f.backend.pool("default", "conc").unwrap().live_workers(), 2);
}

/// maxWorkers busy and the bounded queue full: the next call is refused at once (429 above),
/// not queued without limit.
#[tokio::test]
async fn calls_past_the_waiting_bound_are_refused() {
    let f = fx();
    f.backend.set_max_waiting_calls(1);
    // Blocks until killed: the calls below never finish on their own.
    let src = "import select\ndef handle(ctx, p):\n    select.select([], [], [])\n";
    let mut d = deploy("busy", Language::Python3, &[("busy.py", src, 0o644)], None);
    d.max_workers = 1;
    f.backend.deploy_function(d).await.unwrap();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let b = f.backend.clone();
            tokio::spawn(async move { call(&b, "busy", "1").await })
        })
        .collect();
    let pool = f.backend.pool("default", "busy").unwrap();
    // One runs, one waits: the queue (of one) is full.
    wait_until(|| pool.waiting() == 1).await;
    let ctx = raw(r#"{"secrets":{}}"#);
    let err = f
        .backend
        .invoke(
            "default",
            "busy",
            &ctx,
            &raw("1"),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "busy: 1 calls running and 1 waiting; retry later or raise concurrency.maxWorkers"
        ),
        "{err}"
    );
    assert_eq!(pool.waiting(), 1, "the refused call did not join the queue");
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn a_rebuild_switches_traffic_and_stops_the_old_workers() {
    let f = fx();
    // The replaced build stays warm for a rollback only this long (60 s by default).
    f.backend.set_retired_grace(Duration::from_millis(100));
    let old = f
        .backend
        .deploy_function(deploy(
            "v",
            Language::Python3,
            &[("v.py", "def handle(c, p):\n    return 1\n", 0o644)],
            None,
        ))
        .await
        .unwrap();
    let old_pid = f.backend.pool("default", "v").unwrap().idle_pids()[0];
    let new = f
        .backend
        .deploy_function(deploy(
            "v",
            Language::Python3,
            &[("v.py", "def handle(c, p):\n    return 2\n", 0o644)],
            None,
        ))
        .await
        .unwrap();
    let (env, _) = call(&f.backend, "v", "1").await;
    assert_eq!(env["payload"], 2);
    wait_until(|| !pid_alive(old_pid)).await;
    // The handles a deploy returns call their own build, with no lookup by name: the new one
    // answers 2; a caller still holding the old one is served by the old build (its closed
    // pool starts a worker for the call and stops it after), not failed.
    let by_handle = |h: dispatch_runtime::FunctionHandle| async move {
        let out = h
            .invoke(
                &raw("{}"),
                &raw("1"),
                Instant::now() + Duration::from_secs(10),
            )
            .await
            .unwrap();
        serde_json::to_value(&out.envelope).unwrap()["payload"].clone()
    };
    assert_eq!(by_handle(new.clone()).await, 2);
    assert_eq!(by_handle(old.clone()).await, 1);
    f.backend.remove_function("default", "v").await;
    assert!(f.backend.pool("default", "v").is_none());
    assert!(f.backend.function("default", "v").is_none());
}

#[tokio::test]
async fn idle_workers_are_reaped_down_to_min_workers() {
    let f = fx();
    let mut d = deploy(
        "idle",
        Language::Python3,
        &[("idle.py", "def handle(c, p):\n    return 1\n", 0o644)],
        None,
    );
    d.idle_timeout = Duration::from_millis(1);
    f.backend.deploy_function(d).await.unwrap();
    let pool = f.backend.pool("default", "idle").unwrap();
    assert_eq!(pool.live_workers(), 1);
    pool.reap(Instant::now() + Duration::from_secs(1));
    assert_eq!(pool.live_workers(), 0, "scale to zero");
    let mut d = deploy(
        "warm",
        Language::Python3,
        &[("warm.py", "def handle(c, p):\n    return 1\n", 0o644)],
        None,
    );
    d.min_workers = 2;
    d.idle_timeout = Duration::from_millis(1);
    f.backend.deploy_function(d).await.unwrap();
    let pool = f.backend.pool("default", "warm").unwrap();
    assert_eq!(pool.live_workers(), 2);
    pool.reap(Instant::now() + Duration::from_secs(1));
    assert_eq!(pool.live_workers(), 2, "minWorkers stay warm");
}

fn pid_alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

fn pgroup_has_members(pgid: i32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| {
            let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.len() > 3 && fields[2] == pgid.to_string() && fields[0] != "Z"
        })
    })
}

/// Polls `cond` until it holds, failing after 10 s.
async fn wait_until(cond: impl Fn() -> bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let met = tokio::time::timeout(Duration::from_secs(10), async {
        while !cond() {
            tick.tick().await;
        }
    })
    .await;
    assert!(met.is_ok(), "condition not met within 10 s");
}

/// The sorted names of `payload.env` (a handler's whole environment).
fn env_keys(payload: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = payload["env"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    keys
}

fn ppid_of(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = s.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Kills every idle worker of a function (scale to zero).
fn scale_to_zero(b: &LocalBackend, name: &str) {
    let pool = b.pool("default", name).unwrap();
    pool.reap(Instant::now() + Duration::from_secs(24 * 3600));
    assert_eq!(pool.live_workers(), 0);
}

async fn cold_call(b: &LocalBackend, name: &str) -> dispatch_runtime::pool::CallOutcome {
    let ctx = raw(r#"{"secrets":{}}"#);
    b.invoke(
        "default",
        name,
        &ctx,
        &raw("null"),
        Instant::now() + Duration::from_secs(10),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn python_workers_are_forked_from_the_zygote_with_a_fresh_environment() {
    let f = fx();
    // `cenv`: what a subprocess inherits (the C environment, not only os.environ).
    let src = "import os, sys, random, subprocess\ndef handle(ctx, p):\n    cenv = dict(l.split('=', 1) for l in subprocess.check_output(['env']).decode().splitlines())\n    return {'env': dict(os.environ), 'cenv': cenv, 'cwd': os.getcwd(), 'pid': os.getpid(), 'pgid': os.getpgid(0), 'r': random.random(), 'stdin': sys.stdin.read()}\n";
    let mut d = deploy("zy", Language::Python3, &[("zy.py", src, 0o644)], None);
    d.env.insert("GREETING".into(), "hi".into());
    f.backend.deploy_function(d).await.unwrap();
    scale_to_zero(&f.backend, "zy");

    let out = cold_call(&f.backend, "zy").await;
    assert!(out.cold);
    let cs = out.cold_start.expect("a cold call records its cold start");
    assert_eq!(cs.method, dispatch_core::StartMethod::Fork);
    assert!(
        cs.total_ms >= cs.spawn_ms + cs.import_ms && cs.first_call_ms > 0.0,
        "{cs:?}"
    );
    let v = serde_json::to_value(&out.envelope).unwrap();
    let p = &v["payload"];
    let pid = p["pid"].as_i64().unwrap() as i32;
    // Its parent is the zygote; it leads its own process group; only the declared variables.
    let zygote = f.backend.zygotes()[0].pid().await.unwrap();
    assert_eq!(ppid_of(pid), zygote);
    assert_eq!(p["pgid"], p["pid"]);
    assert_eq!(
        env_keys(p),
        [
            "GREETING",
            "HOME",
            "LANG",
            "PATH",
            "PYTHONDONTWRITEBYTECODE",
            "PYTHONUNBUFFERED"
        ]
    );
    assert!(
        p["cwd"]
            .as_str()
            .unwrap()
            .ends_with(p["env"]["HOME"].as_str().unwrap())
    );
    assert_eq!(p["env"]["GREETING"], "hi");
    assert_eq!(p["cenv"], p["env"], "subprocesses see the same environment");
    assert_eq!(p["stdin"], "", "stdin is empty, not the protocol socket");

    // A second fork is another process with its own random state.
    let r1 = p["r"].clone();
    scale_to_zero(&f.backend, "zy");
    wait_until(|| !pgroup_has_members(pid)).await;
    let out = cold_call(&f.backend, "zy").await;
    let v = serde_json::to_value(&out.envelope).unwrap();
    assert_ne!(v["payload"]["pid"].as_i64().unwrap() as i32, pid);
    assert_ne!(v["payload"]["r"], r1, "random is reseeded after fork");
}

#[tokio::test]
async fn a_dead_zygote_is_restarted_and_its_workers_live_on() {
    let f = fx();
    let src = "import os\ndef handle(ctx, p):\n    return os.getpid()\n";
    f.backend
        .deploy_function(deploy(
            "zd",
            Language::Python3,
            &[("zd.py", src, 0o644)],
            None,
        ))
        .await
        .unwrap();
    let z = f.backend.zygotes()[0].clone();
    assert_eq!(z.starts(), 1);
    let warm_pid = f.backend.pool("default", "zd").unwrap().idle_pids()[0];
    let zpid = z.pid().await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(zpid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(|| !pid_alive(zpid)).await;
    // The warm worker does not depend on its zygote.
    let out = cold_call(&f.backend, "zd").await;
    assert!(!out.cold);
    assert_eq!(out.envelope.payload.get(), warm_pid.to_string());
    // The next cold start starts a new zygote.
    scale_to_zero(&f.backend, "zd");
    let out = cold_call(&f.backend, "zd").await;
    assert_eq!(
        out.cold_start.map(|c| c.method),
        Some(dispatch_core::StartMethod::Fork)
    );
    assert_eq!(z.starts(), 2);
}

#[tokio::test]
async fn a_forked_worker_dies_when_the_host_drops_it_even_mid_call() {
    let f = fx();
    let src = "import select\ndef handle(ctx, p):\n    select.select([], [], [])\n";
    let mut d = deploy("zs", Language::Python3, &[("zs.py", src, 0o644)], None);
    d.timeout = Duration::from_millis(300);
    f.backend.deploy_function(d).await.unwrap();
    let pid = f.backend.pool("default", "zs").unwrap().idle_pids()[0];
    // The server passes the function's timeout as the call's deadline.
    let out = f
        .backend
        .invoke(
            "default",
            "zs",
            &raw("{}"),
            &raw("null"),
            Instant::now() + Duration::from_millis(300),
        )
        .await
        .unwrap();
    assert_eq!(
        out.envelope.context.error.unwrap().kind,
        ErrorType::SystemError
    );
    wait_until(|| !pid_alive(pid)).await;
}

#[tokio::test]
async fn interpreter_settings_in_the_environment_mean_a_spawned_worker() {
    let f = fx();
    let src = "import os, sys\ndef handle(ctx, p):\n    return [os.environ['PYTHONHASHSEED'], sys.flags.hash_randomization]\n";
    let mut d = deploy(
        "seeded",
        Language::Python3,
        &[("seeded.py", src, 0o644)],
        None,
    );
    d.env.insert("PYTHONHASHSEED".into(), "0".into());
    f.backend.deploy_function(d).await.unwrap();
    scale_to_zero(&f.backend, "seeded");
    let out = cold_call(&f.backend, "seeded").await;
    assert_eq!(
        out.cold_start.map(|c| c.method),
        Some(dispatch_core::StartMethod::Spawn)
    );
    assert_eq!(out.envelope.payload.get(), r#"["0",0]"#);
}

#[tokio::test]
async fn node_cold_starts_specialise_a_spare_generic_worker() {
    let f = fx();
    let src = "module.exports = async () => ({ env: process.env, cwd: process.cwd(), pid: process.pid });\n";
    let mut d = deploy("sp", Language::Nodejs, &[("sp.js", src, 0o644)], None);
    d.env.insert("GREETING".into(), "hi".into());
    f.backend.deploy_function(d).await.unwrap();
    scale_to_zero(&f.backend, "sp");
    // The deploy took a generic worker and started a spare in its place.
    let pool = f.backend.pool("default", "sp").unwrap();
    let spares = match &pool.config().launcher {
        dispatch_runtime::pool::Launcher::Spares(s) => s.clone(),
        other => panic!("node pools use spares, not {other:?}"),
    };
    wait_until(|| spares.ready() == 1).await;
    let out = cold_call(&f.backend, "sp").await;
    let cs = out.cold_start.unwrap();
    assert_eq!(cs.method, dispatch_core::StartMethod::Specialize);
    let v = serde_json::to_value(&out.envelope).unwrap();
    let p = &v["payload"];
    assert_eq!(
        env_keys(p),
        [
            "GREETING",
            "HOME",
            "LANG",
            "PATH",
            "PYTHONDONTWRITEBYTECODE",
            "PYTHONUNBUFFERED"
        ]
    );
    assert_eq!(p["cwd"], p["env"]["HOME"]);
    // A failing handler in a spare still fails with its reason.
    let bad = deploy(
        "bad",
        Language::Nodejs,
        &[("bad.js", "throw new Error('nope')", 0o644)],
        None,
    );
    let err = f
        .backend
        .deploy_function(bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

/// The socket watch runs in a SIGIO handler; signals arrive whenever they like, also while
/// the handler itself runs. A storm of them during calls must not break a worker (it once
/// did: the nested handler hit "concurrent poll() invocation" and the worker died mid-call,
/// about once in 100,000 calls under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_storms_do_not_break_a_worker() {
    let f = fx();
    f.backend
        .deploy_function(deploy(
            "storm",
            Language::Python3,
            &[("storm.py", "def handle(c, p):\n    return p\n", 0o644)],
            None,
        ))
        .await
        .unwrap();
    let pid = f.backend.pool("default", "storm").unwrap().idle_pids()[0];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            // Bounded: a Python process flooded without end spends all its time in handlers.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 20_000 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGIO,
                );
                sent += 1;
            }
            sent
        })
    };
    for i in 0..300 {
        let (env, _) = call(&f.backend, "storm", &i.to_string()).await;
        assert!(env["context"]["error"].is_null(), "call {i}: {env}");
        assert_eq!(env["payload"], i);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(storm.join().unwrap() > 1000, "the storm sent signals");
    assert_eq!(
        f.backend.pool("default", "storm").unwrap().idle_pids(),
        [pid],
        "the same worker served every call"
    );
}

/// The cases of dispatchframework/python3-base-image's `tests/test_main.py` (its function
/// server's unit tests), written against our Python worker from what each asserts.
#[tokio::test]
async fn python3_base_image_cases() {
    let f = fx();
    let src = r#"
import sys

def hello(ctx, payload):
    name, place = "Noone", "Nowhere"
    if payload:
        name = payload.get("name", name)
        place = payload.get("place", place)
    return "Hello, %s from %s" % (name, place)

def fail(ctx, payload):
    raise ZeroDivisionError("oh no!")

def logger(ctx, payload):
    print("stdout")
    print("stderr", file=sys.stderr)
    print("stdout2")
    print("stderr2", file=sys.stderr)

def lower(ctx, payload):
    if type(payload) is not str:
        raise TypeError("payload is not of type str")
    return payload.lower()

def bad_payload(ctx, payload):
    return b"bytes"
"#;
    for h in ["hello", "fail", "logger", "lower", "bad_payload"] {
        f.backend
            .deploy_function(deploy(
                &format!("t-{}", h.replace('_', "-")),
                Language::Python3,
                &[("cases.py", src, 0o644)],
                Some(&format!("cases.{h}")),
            ))
            .await
            .unwrap();
    }
    let logs = |env: &serde_json::Value, k: &str| env["context"]["logs"][k].clone();
    // test_process_msg_valid
    let (env, _) = call(
        &f.backend,
        "t-hello",
        r#"{"name": "Jon", "place": "Winterfell"}"#,
    )
    .await;
    assert_eq!(env["payload"], "Hello, Jon from Winterfell");
    assert_eq!(
        (logs(&env, "stdout"), logs(&env, "stderr")),
        (json!([]), json!([]))
    );
    assert!(env["context"]["error"].is_null());
    // test_process_msg_function_error
    let (env, _) = call(&f.backend, "t-fail", "null").await;
    let err = &env["context"]["error"];
    assert!(env["payload"].is_null());
    assert_eq!(
        (err["type"].as_str(), err["message"].as_str()),
        (Some("FunctionError"), Some("oh no!"))
    );
    assert_eq!(err["stacktrace"], logs(&env, "stderr"));
    assert_eq!(logs(&env, "stdout"), json!([]));
    // test_process_msg_input_error
    let (env, _) = call(&f.backend, "t-lower", "1").await;
    let err = &env["context"]["error"];
    assert_eq!(
        (err["type"].as_str(), err["message"].as_str()),
        (Some("InputError"), Some("payload is not of type str"))
    );
    assert_eq!(err["stacktrace"], logs(&env, "stderr"));
    // test_process_msg_logs
    let (env, _) = call(&f.backend, "t-logger", "null").await;
    assert!(env["payload"].is_null() && env["context"]["error"].is_null());
    assert_eq!(logs(&env, "stderr"), json!(["stderr", "stderr2"]));
    assert_eq!(logs(&env, "stdout"), json!(["stdout", "stdout2"]));
    // test_process_msg_non_serializable_json
    let (env, _) = call(&f.backend, "t-bad-payload", "null").await;
    let err = &env["context"]["error"];
    assert!(env["payload"].is_null());
    assert_eq!(err["type"], "FunctionError");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("not JSON serializable"),
        "{err}"
    );
    assert!(!err["stacktrace"].as_array().unwrap().is_empty(), "{err}");
    assert!(!logs(&env, "stderr").as_array().unwrap().is_empty());
    assert_eq!(logs(&env, "stdout"), json!([]));
}

/// The cases of dispatchframework/nodejs-base-image's `server-spec.js` ("function wrap"),
/// written against our Node worker from what each asserts.
#[tokio::test]
async fn nodejs_base_image_cases() {
    let f = fx();
    let cases = [
        (
            "n-hello",
            "module.exports = (context, params) => { let name = params.name || 'Noone'; \
             let place = params.place || 'Nowhere'; return {myField: 'Hello, ' + name + ' from ' + place}; };",
        ),
        (
            "n-fail",
            "module.exports = (context, params) => { let a = undefinedVariable; };",
        ),
        (
            "n-lower",
            "module.exports = (context, params) => { if (typeof params !== 'string') { \
             throw new TypeError('payload is not of type string'); } return params.toLowerCase(); };",
        ),
        (
            "n-logger",
            "module.exports = (context, params) => { console.log('log'); console.info('info'); \
             console.warn('warn'); console.error('error'); console.log('log2'); \
             console.info('info2'); console.warn('warn2'); console.error('error2'); };",
        ),
    ];
    for (name, src) in cases {
        let file = format!("{name}.js");
        f.backend
            .deploy_function(deploy(name, Language::Nodejs, &[(&file, src, 0o644)], None))
            .await
            .unwrap();
    }
    let logs = |env: &serde_json::Value, k: &str| env["context"]["logs"][k].clone();
    // should return valid response with hello function
    let (env, _) = call(
        &f.backend,
        "n-hello",
        r#"{"name": "Jon", "place": "Winterfell"}"#,
    )
    .await;
    assert!(env["context"]["error"].is_null());
    assert_eq!(
        (logs(&env, "stdout"), logs(&env, "stderr")),
        (json!([]), json!([]))
    );
    assert_eq!(
        env["payload"],
        json!({"myField": "Hello, Jon from Winterfell"})
    );
    // should return a FunctionError with fail function
    let (env, _) = call(&f.backend, "n-fail", "null").await;
    let err = &env["context"]["error"];
    assert_eq!(err["type"], "FunctionError");
    assert_eq!(err["message"], "undefinedVariable is not defined");
    assert_eq!(err["stacktrace"], logs(&env, "stderr"));
    assert!(
        logs(&env, "stderr")[0]
            .as_str()
            .unwrap()
            .starts_with("ReferenceError: undefinedVariable is not defined")
    );
    assert_eq!(logs(&env, "stdout"), json!([]));
    assert!(env["payload"].is_null());
    // should return an InputError with lower function on invalid input
    let (env, _) = call(&f.backend, "n-lower", "1").await;
    let err = &env["context"]["error"];
    assert_eq!(err["type"], "InputError", "{env}");
    assert_eq!(err["message"], "payload is not of type string");
    assert_eq!(err["stacktrace"], logs(&env, "stderr"));
    assert!(
        logs(&env, "stderr")[0]
            .as_str()
            .unwrap()
            .starts_with("TypeError: payload is not of type string")
    );
    assert!(env["payload"].is_null());
    // should return correct logs with logger function
    let (env, _) = call(&f.backend, "n-logger", "null").await;
    assert!(env["context"]["error"].is_null());
    assert_eq!(
        logs(&env, "stdout"),
        json!(["log", "info", "log2", "info2"])
    );
    assert_eq!(
        logs(&env, "stderr"),
        json!(["warn", "error", "warn2", "error2"])
    );
    assert!(env["payload"].is_null());
}

/// The pool a deploy replaced stays warm for the rollback grace (issue 23): deploying its
/// build again takes it back with its worker — the first call is warm, served by the same
/// process — and once the grace ends it is closed (its idle worker gone).
#[tokio::test]
async fn a_rollback_within_the_grace_serves_the_replaced_build_warm() {
    let f = fx();
    f.backend.set_retired_grace(Duration::from_millis(300));
    let v = |text: &str| {
        let code = format!("def handle(context, payload):\n    return {text:?}\n");
        deploy("f", Language::Python3, &[("f.py", &code, 0o644)], None)
    };
    let (one, two) = (v("one"), v("two"));
    f.backend.deploy_function(one.clone()).await.unwrap();
    let (env, _) = call(&f.backend, "f", "null").await;
    assert_eq!(env["payload"], "one");
    let first = f.backend.pool("default", "f").unwrap();
    let pids = first.idle_pids();
    f.backend.set_retired_grace(Duration::from_secs(60));
    f.backend.deploy_function(two.clone()).await.unwrap();
    assert_eq!(call(&f.backend, "f", "null").await.0["payload"], "two");
    let retired = f.backend.retired_pool("default", "f").expect("kept warm");
    assert!(Arc::ptr_eq(&retired, &first));

    f.backend.deploy_function(one.clone()).await.unwrap();
    let (env, cold) = call(&f.backend, "f", "null").await;
    assert_eq!(env["payload"], "one");
    assert!(!cold, "the replaced build's worker answered");
    assert!(Arc::ptr_eq(
        &f.backend.pool("default", "f").unwrap(),
        &first
    ));
    assert_eq!(first.idle_pids(), pids, "the same process");

    // Forward again with a short grace: the build left behind is closed when it ends.
    f.backend.set_retired_grace(Duration::from_millis(200));
    f.backend.deploy_function(two).await.unwrap();
    let left = f.backend.retired_pool("default", "f").unwrap();
    wait_until(|| f.backend.retired_pool("default", "f").is_none()).await;
    assert_eq!(left.idle_count(), 0, "closed: its idle worker is gone");
}
