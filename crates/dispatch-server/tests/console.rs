//! The web console (`/ui/`): its files and their headers, the figures its charts draw
//! (`GET …/stats`) and the source list its function page shows (`GET …/functions/F/source`),
//! and the console itself in headless Chromium driven by Playwright for Python
//! (`console_drive.py`): sign in, functions listed, exec from a function's page, a run's
//! live lines, a chart, a viewer without buttons and refused when forcing, output never run
//! as markup, a phone's width. Screenshots are kept (see tests/README.md).

mod support;

use dispatch_client::{Client, Target};
use dispatch_core::Kind;
use dispatch_core::auth::Role;
use serde_json::json;
use support::*;

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap()
}

/// The page, its script and style: served to anyone (they hold no data) with headers that
/// keep other origins' script and frames out; `/` and `/ui` lead to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_are_public_and_locked_down() {
    let dir = tempfile::tempdir().unwrap();
    // Tokens on: the files need none.
    let t = start_with(dir, dispatch_server::Options::default()).await;
    let api = t.api();
    for path in ["/", "/ui"] {
        let r = get(&format!("{api}{path}")).await;
        assert_eq!(r.status(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/ui/", "{path}");
    }
    for (path, mime) in [
        ("/ui/", "text/html"),
        ("/ui/console.js", "text/javascript"),
        ("/ui/console.css", "text/css"),
    ] {
        let r = get(&format!("{api}{path}")).await;
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(mime),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for rule in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(rule), "{path}: {csp}");
        }
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
        // A browser asks again with the tag and gets 304.
        let tag = h["etag"].to_str().unwrap().to_string();
        let again = reqwest::Client::new()
            .get(format!("{api}{path}"))
            .header("if-none-match", &tag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    // Anything else under /ui/ is the API's JSON 404 — and data still needs a token.
    let r = get(&format!("{api}/ui/../v1/namespaces")).await;
    assert_eq!(r.status(), 401);
    let r = get(&format!("{api}/ui/secret.txt")).await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("\"error\""));
    // The gateway does not serve it (its paths are users').
    let r = get(&format!("{}/ui/", t.gateway)).await;
    assert_eq!(r.status(), 404);
    t.stop().await;
}

const FAILS_ON_ASK: &str = r#"
def handle(context, payload):
    if payload.get("fail"):
        raise ValueError("asked to")
    return "ok"
"#;

/// `GET …/stats`: the hour minute by minute, counted per call whatever the history policy
/// keeps; `GET …/functions/F/source`: the files of its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_source_files() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    // Nothing recorded: no calls, no function in the hour.
    ready_function(c, "counted", FAILS_ON_ASK, json!({"history": "none"})).await;
    let stats = |q: &'static str| {
        let api = t.api();
        async move {
            let r = reqwest::get(format!("{api}/v1/namespaces/default/stats{q}"))
                .await
                .unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, s) = stats("").await;
    assert_eq!(status, 200);
    assert_eq!(s["functions"], json!([]), "{s}");
    assert_eq!(s["step"], 60);
    for i in 0..5 {
        let fail = i == 4;
        let _ = c
            .exec("counted", &raw(json!({ "fail": fail })))
            .await
            .unwrap();
    }
    let (_, s) = stats("?function=counted").await;
    let f = &s["functions"][0];
    assert_eq!(f["name"], "counted");
    let col = |k: &str| -> Vec<serde_json::Value> { f[k].as_array().unwrap().clone() };
    let sum = |k: &str| col(k).iter().map(|v| v.as_u64().unwrap()).sum::<u64>();
    assert_eq!(col("calls").len(), 60);
    assert_eq!(sum("calls"), 5, "every call, though history is none: {f}");
    assert_eq!(sum("errors"), 1, "{f}");
    // Cold starts as /metrics counts them (a READY function may have a worker waiting).
    let cold = metrics(&t)
        .await
        .lines()
        .find(|l| {
            l.starts_with("dispatch_function_cold_starts_total{") && l.contains("\"counted\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(sum("coldStarts"), cold, "{f}");
    // A minute with calls has its latency; one without has none.
    let busy = col("calls")
        .iter()
        .position(|c| c.as_u64() > Some(0))
        .unwrap();
    assert!(col("p50Ms")[busy].as_f64().unwrap() > 0.0, "{f}");
    assert!(col("p99Ms")[busy].as_f64().unwrap() >= col("p50Ms")[busy].as_f64().unwrap());
    if busy > 0 {
        assert!(col("p50Ms")[0].is_null(), "{f}");
    }
    let start = s["start"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(start % 60 == 0 && now - start < 3600 + 60, "{start} {now}");
    assert_eq!(stats("?function=other").await.1["functions"], json!([]));
    let (status, e) = stats("?function=No_Such").await;
    assert_eq!(status, 400, "{e}");
    let r = reqwest::get(format!("{}/v1/namespaces/nowhere/stats", t.api()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Deleted: its figures go with it.
    c.delete(Kind::Function, "counted").await.unwrap();
    eventually("the deleted function's figures to go", || async {
        stats("").await.1["functions"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;

    // Source files: what the archive holds.
    ready_function(c, "listed", FAILS_ON_ASK, json!({})).await;
    let r = reqwest::get(format!(
        "{}/v1/namespaces/default/functions/listed/source",
        t.api()
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let files: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        files["files"],
        json!([{"path": "listed.py", "size": FAILS_ON_ASK.len(), "executable": false}])
    );
    assert!(files["digest"].as_str().unwrap().starts_with("sha256:"));
    let r = reqwest::get(format!(
        "{}/v1/namespaces/default/functions/absent/source",
        t.api()
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    t.stop().await;
}

const TALKY: &str = r#"
import socket
def handle(context, payload):
    print("first line", flush=True)
    s = socket.create_connection(("127.0.0.1", payload["port"]))
    s.recv(1)
    print("second line", flush=True)
    return "done"
"#;

const EVIL: &str = r#"
def handle(context, payload):
    print("<script>window.__pwned=2</script>")
    return '<img src=x onerror="window.__pwned=1">'
"#;

const GATED_JOB: &str = "import os, socket\nprint('job one', flush=True)\n\
socket.create_connection(('127.0.0.1', int(os.environ['PORT']))).recv(1)\nprint('job two', flush=True)\n";

/// Where screenshots go: `$DISPATCH_TEST_ARTIFACTS/console`, else `target/tmp/console`.
fn artifacts() -> std::path::PathBuf {
    std::env::var_os("DISPATCH_TEST_ARTIFACTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
        .join("console")
}

/// Headless Chromium and Playwright for Python, or `None` (outside CI) when this machine
/// lacks them.
fn browser() -> Option<std::process::Command> {
    let mut cmd = python_with("playwright");
    cmd.arg("-c").arg("import playwright.sync_api");
    let ok = std::path::Path::new("/usr/bin/chromium").exists()
        && cmd.output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "the console test needs /usr/bin/chromium (apt-get install chromium) and Playwright for Python (.ci/run installs both)"
        );
        eprintln!("warning: no chromium or playwright here: the console's browser test is skipped");
        return None;
    }
    let mut cmd = python_with("playwright");
    // The browser is Debian's: Playwright must never fetch one.
    cmd.env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
    Some(cmd)
}

/// A server with the console's functions (made through the API with an admin's token) and
/// the tokens of an admin, a developer and a viewer of `default`.
async fn console_server() -> (TestServer, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let t = start_with(dir, dispatch_server::Options::default()).await;
    let state = &t.server.as_ref().unwrap().state;
    let mut tokens = Vec::new();
    for (name, role) in [
        ("root", Role::Admin),
        ("dev", Role::Developer),
        ("viewer", Role::Viewer),
    ] {
        let ns = if role == Role::Admin { "*" } else { "default" };
        tokens.push(state.create_token(name, role, ns, None).await.unwrap().0);
    }
    let c = Client::new(&Target {
        server: t.api(),
        token: Some(tokens[0].clone()),
        namespace: "default".into(),
        insecure: false,
    })
    .unwrap();
    images(&c).await;
    ready_function(&c, "hello", HELLO_PY, json!({})).await;
    ready_function(&c, "talky", TALKY, json!({})).await;
    ready_function(&c, "evil", EVIL, json!({})).await;
    c.create(&object(
        Kind::Endpoint,
        "hello",
        json!({"function": "hello", "paths": ["/hello"], "methods": ["GET", "POST"]}),
    ))
    .await
    .unwrap();
    // A job that prints a line, waits on the port its payload names, then prints another.
    c.create(&object(
        Kind::JobTemplate,
        "gated",
        json!({"runtime": "host", "jobTemplate": {"spec": {"backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "main",
                "image": "alpine:3", "env": [{"name": "PORT", "value": "{{ .Payload }}"}],
                "command": ["python3", "-c", GATED_JOB]}]}}}}}),
    ))
    .await
    .unwrap();
    // A cron driver that fires next new year, and a subscription.
    c.create(&object(
        Kind::EventDriver,
        "yearly",
        json!({"type": "cron", "schedule": "0 0 1 1 *", "function": "hello"}),
    ))
    .await
    .unwrap();
    subscribe(&c, "on-ping", "ping", "hello").await;
    // A call before the browser comes: the charts have something to draw.
    c.exec("hello", &raw(json!({"name": "Setup"})))
        .await
        .unwrap();
    (t, tokens)
}

/// Runs `cmd` (a browser script) with `args`; fails with its output unless it says `ok`.
async fn drive(mut cmd: std::process::Command, args: Vec<String>, ok: &'static str) {
    let out = tokio::task::spawn_blocking(move || cmd.args(args).output().unwrap())
        .await
        .unwrap();
    let say = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success() && say(&out.stdout).contains(ok),
        "the console's browser test failed (screenshots in {}):\n{}\n{}",
        artifacts().display(),
        say(&out.stdout),
        say(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium() {
    let Some(mut python) = browser() else {
        return;
    };
    let (t, tokens) = console_server().await;
    python.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/console_drive.py"
    ));
    let mut args = vec![t.api()];
    args.extend(tokens);
    args.push(artifacts().display().to_string());
    drive(python, args, "console: ok").await;
    t.stop().await;
}

/// A server without tokens (`--insecure-no-auth`): the console opens without a sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_a_server_without_tokens() {
    let Some(mut python) = browser() else {
        return;
    };
    let t = start().await;
    python.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/console_drive.py"
    ));
    let mut args = vec![t.api()];
    args.extend(["-".to_string(), "-".to_string(), "-".to_string()]);
    args.push(artifacts().display().to_string());
    drive(python, args, "console: ok (no tokens)").await;
    t.stop().await;
}

/// geckodriver (`$DISPATCH_GECKODRIVER`, else the one `.ci/run` builds into
/// `~/.cache/dispatch-tools/geckodriver`) and Debian's Firefox, or `None` (outside CI).
fn firefox() -> Option<(String, String)> {
    let driver = std::env::var_os("DISPATCH_GECKODRIVER")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                std::path::PathBuf::from(h)
                    .join(".cache/dispatch-tools/geckodriver/bin/geckodriver")
            })
        })
        .filter(|p| p.is_file());
    let browser = std::path::Path::new("/usr/bin/firefox-esr");
    match driver {
        Some(d) if browser.exists() => {
            Some((d.display().to_string(), browser.display().to_string()))
        }
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the console's Firefox test needs /usr/bin/firefox-esr (apt-get install firefox-esr) and geckodriver (cargo install geckodriver; .ci/run does both)"
            );
            eprintln!(
                "warning: no firefox-esr or geckodriver here: the console's Firefox test is skipped"
            );
            None
        }
    }
}

/// The same console in Firefox, through geckodriver's WebDriver: sign in, list, charts, exec,
/// the run's page, a narrow window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_firefox() {
    let Some((driver, firefox)) = firefox() else {
        return;
    };
    let (t, tokens) = console_server().await;
    let mut python = std::process::Command::new("python3");
    python.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/console_firefox.py"
    ));
    let args = vec![
        t.api(),
        tokens[1].clone(),
        artifacts().display().to_string(),
        driver,
        firefox,
    ];
    drive(python, args, "firefox: ok").await;
    t.stop().await;
}
