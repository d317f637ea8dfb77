//! Test support: a real server (SQLite in a tempdir, real workers) on 127.0.0.1:0, a client
//! for it, and helpers that poll with a deadline instead of waiting a fixed time.

#![allow(dead_code)]

pub mod fake;

use std::sync::Arc;
use std::time::Duration;

use dispatch_client::{Client, Target, pack};
use dispatch_core::{Kind, Object, Phase};
use dispatch_runtime::{Backend, LocalBackend};
use dispatch_server::Server;
use dispatch_store::BlobStore;

pub const HELLO_PY: &str = include_str!("../../../../examples/python3/hello.py");
pub const HELLO_JS: &str = include_str!("../../../../examples/nodejs/hello.js");

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub local: Arc<LocalBackend>,
    pub server: Option<Server>,
    pub client: Client,
    pub gateway: String,
}

pub async fn start() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir).await
}

pub async fn start_in(dir: tempfile::TempDir) -> TestServer {
    start_with(dir, no_auth()).await
}

/// Options for tests that are not about auth: no tokens needed.
pub fn no_auth() -> dispatch_server::Options {
    dispatch_server::Options {
        auth: false,
        ..Default::default()
    }
}

pub async fn start_with(dir: tempfile::TempDir, options: dispatch_server::Options) -> TestServer {
    start_wrapped(dir, options, |s| s).await
}

/// [`start_with`], its stores first passed through `wrap` (a test's own wrapper).
pub async fn start_wrapped(
    dir: tempfile::TempDir,
    mut options: dispatch_server::Options,
    wrap: impl FnOnce(dispatch_server::Stores) -> dispatch_server::Stores,
) -> TestServer {
    options
        .secret_key_file
        .get_or_insert_with(|| dir.path().join("secret.key"));
    options.jobs_dir = dir.path().join("jobs");
    let stores = wrap(dispatch_server::Stores::open(dir.path()).unwrap());
    let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
    let local = LocalBackend::new(dir.path()).unwrap();
    let sandboxes = sandboxes(dir.path()).await;
    local.set_sandboxes(sandboxes.clone());
    options.sandboxes = sandboxes;
    let backend: Arc<dyn Backend> = local.clone();
    // Ports handed out by `free_port`, not by the kernel: a port just picked for another
    // test's broker must not become this server's listener.
    let (api, gw) = dispatch_testkit::free_ports();
    let api = tokio::net::TcpListener::bind(("127.0.0.1", api))
        .await
        .unwrap();
    let gw = tokio::net::TcpListener::bind(("127.0.0.1", gw))
        .await
        .unwrap();
    let server = Server::builder()
        .stores(stores)
        .blobs(blobs)
        .backend(backend)
        .api_listener(api)
        .gateway_listener(gw)
        .options(options)
        .start()
        .await
        .unwrap();
    let client = Client::new(&Target {
        server: format!("http://{}", server.api_addr),
        token: None,
        namespace: "default".into(),
        insecure: false,
    })
    .unwrap();
    let gateway = format!("http://{}", server.gateway_addr);
    TestServer {
        dir,
        local,
        server: Some(server),
        client,
        gateway,
    }
}

/// The sandboxes every test server runs user code in, as `dispatch server` does by default
/// (DESIGN §9): launched by the `dispatch` binary that `cargo test --workspace` builds
/// (`DISPATCH_SANDBOX_LAUNCHER` names another). Without that binary the suite runs
/// unsandboxed with a warning, except in CI, where that is an error.
pub async fn sandboxes(
    data_dir: &std::path::Path,
) -> Option<Arc<dispatch_runtime::sandbox::Sandboxes>> {
    let launcher = std::env::var_os("DISPATCH_SANDBOX_LAUNCHER")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("dispatch"))
        })?;
    if !launcher.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no sandbox launcher at {}: build it first (cargo build --bin dispatch)",
            launcher.display()
        );
        eprintln!(
            "warning: no sandbox launcher at {}: this suite runs unsandboxed (cargo build --bin dispatch)",
            launcher.display()
        );
        return None;
    }
    let s = Arc::new(
        dispatch_runtime::sandbox::Sandboxes::new(launcher, data_dir, Default::default())
            .expect("the sandbox runs on this machine"),
    );
    s.check().await.expect("a test sandbox starts");
    Some(s)
}

impl TestServer {
    /// Stops the server and hands back its data dir (for restart tests).
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
        self.dir
    }

    pub fn api(&self) -> String {
        self.client.server().to_string()
    }
}

/// A tar.gz of one file.
pub fn archive_of(name: &str, body: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, body).unwrap();
    pack::pack_path(&p).unwrap()
}

pub fn object(kind: Kind, name: &str, spec: serde_json::Value) -> Object {
    Object::new(kind, "default", name, spec)
}

/// Uploads `file` and creates function `name` on `image`; returns the stored object.
pub async fn create_function(
    c: &Client,
    name: &str,
    image: &str,
    file: &str,
    body: &str,
    extra: serde_json::Value,
) -> Result<Object, dispatch_client::ClientError> {
    let digest = c
        .upload_source(c.namespace(), name, archive_of(file, body))
        .await?;
    let mut spec = serde_json::json!({"image": image, "source": digest});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    c.create(&Object::new(Kind::Function, c.namespace(), name, spec))
        .await
}

// Not every test binary takes ports.
#[allow(unused_imports)]
pub use dispatch_testkit::free_port;

/// A JSON value as a raw payload.
pub fn raw(v: serde_json::Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&v).unwrap()
}

/// Polls `probe` until it gives a value, failing with `what` after 60 s (the pause is the
/// poll interval; tests never wait a fixed time for readiness).
pub async fn eventually<T, F>(what: &str, probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    eventually_within(
        what,
        Duration::from_millis(20),
        Duration::from_secs(60),
        probe,
    )
    .await
}

/// [`eventually`] with its own poll interval and deadline; in a paused-time test both are
/// virtual (the clock moves on only while every task waits).
pub async fn eventually_within<T, F>(
    what: &str,
    every: Duration,
    limit: Duration,
    mut probe: impl FnMut() -> F,
) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let polled = tokio::time::timeout(limit, async {
        loop {
            tick.tick().await;
            if let Some(v) = probe().await {
                return v;
            }
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Paused-time tests: lets `d` of virtual time go by while the server's tasks run.
pub async fn let_pass(d: Duration) {
    let _ = tokio::time::timeout(d, std::future::pending::<()>()).await;
}

/// A run once it is final.
pub async fn final_run(c: &Client, id: &str) -> dispatch_core::Run {
    eventually(&format!("run {id} to finish"), || async {
        let r = c.get_run(id).await.unwrap();
        r.status.is_final().then_some(r)
    })
    .await
}

/// Polls until the resource leaves INITIALIZED/CREATING (30 s deadline); returns it.
pub async fn settled(c: &Client, kind: Kind, name: &str) -> Object {
    eventually(&format!("{kind} {name} to settle"), || async {
        let o = c.get(kind, name).await.unwrap();
        matches!(o.phase(), Some(Phase::Ready | Phase::Error)).then_some(o)
    })
    .await
}

/// Subscription `name`: events of `event_type` (exact, or a prefix ending in `*`) run
/// `function`.
pub async fn subscribe(c: &Client, name: &str, event_type: &str, function: &str) {
    c.create(&object(
        Kind::Subscription,
        name,
        serde_json::json!({"eventType": event_type, "function": function}),
    ))
    .await
    .unwrap();
}

/// Python function `name` (its source `NAME.py`) on image `py`, READY.
pub async fn ready_function(c: &Client, name: &str, body: &str, extra: serde_json::Value) {
    create_function(c, name, "py", &format!("{name}.py"), body, extra)
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, name).await.phase(),
        Some(Phase::Ready)
    );
}

/// Image `py` on the built-in python3 base and `js` on nodejs, both READY, in the client's
/// namespace.
pub async fn images(c: &Client) {
    for (name, base) in [("py", "python3"), ("js", "nodejs")] {
        c.create(&Object::new(
            Kind::Image,
            c.namespace(),
            name,
            serde_json::json!({"baseImage": base}),
        ))
        .await
        .unwrap();
        assert_eq!(
            settled(c, Kind::Image, name).await.phase(),
            Some(Phase::Ready)
        );
    }
}

/// Base image `shell` (language exec) and image `sh` on it, both READY.
#[allow(dead_code)]
pub async fn exec_images(c: &Client) {
    c.create(&object(
        Kind::BaseImage,
        "shell",
        serde_json::json!({"image": "debian:12-slim", "language": "exec"}),
    ))
    .await
    .unwrap();
    let b = settled(c, Kind::BaseImage, "shell").await;
    assert_eq!(b.phase(), Some(Phase::Ready), "{:?}", b.status);
    c.create(&object(
        Kind::Image,
        "sh",
        serde_json::json!({"baseImage": "shell"}),
    ))
    .await
    .unwrap();
    assert_eq!(
        settled(c, Kind::Image, "sh").await.phase(),
        Some(Phase::Ready)
    );
}

/// The PyPI wheels the tests' real clients import (the CloudEvents SDK, httpx, websockets),
/// as a PYTHONPATH: `$DISPATCH_PY_WHEELS`, else `~/.cache/dispatch-tools/py` (.ci/run
/// downloads them there). Each of `needed` must be among them.
#[allow(dead_code)]
pub fn py_wheels(needed: &[&str]) -> String {
    let dir = std::env::var_os("DISPATCH_PY_WHEELS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/dispatch-tools/py"))
        })
        .expect("HOME or DISPATCH_PY_WHEELS");
    let wheels: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "whl"))
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    for n in needed {
        assert!(
            wheels
                .iter()
                .any(|w| w.rsplit('/').next().is_some_and(|f| f.starts_with(n))),
            "the wheel {n}* is not in {}: .ci/run downloads the tests' Python clients there \
             (python3 -m pip download --only-binary=:all: -d DIR ...)",
            dir.display()
        );
    }
    wheels.join(":")
}

#[allow(dead_code)]
/// A PyPI tool `.ci/run` installs into a folder of the wheel cache
/// (`$DISPATCH_PY_WHEELS/NAME`, else `~/.cache/dispatch-tools/py/NAME`): a `python3` that
/// imports it from there (or, without the folder, from the interpreter's own packages).
pub fn python_with(name: &str) -> std::process::Command {
    let dir = std::env::var_os("DISPATCH_PY_WHEELS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/dispatch-tools/py"))
        })
        .map(|d| d.join(name));
    let mut cmd = std::process::Command::new("python3");
    if let Some(d) = dir.filter(|d| d.is_dir()) {
        cmd.env("PYTHONPATH", d);
    }
    cmd
}

/// The server's `/metrics` text.
#[allow(dead_code)]
pub async fn metrics(t: &TestServer) -> String {
    reqwest::get(format!("{}/metrics", t.api()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Runs `cmd` with `input` on its stdin; its output.
#[allow(dead_code)]
pub fn run_with_input(mut cmd: std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the program");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}
