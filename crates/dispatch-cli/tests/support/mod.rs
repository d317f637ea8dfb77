//! Test support: the real `dispatch server` on random loopback ports, the CLI pointed at it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

/// Polls `probe` until it gives a value, failing with `what` after 60 s. The only wait in
/// these tests: a deadline-bounded poll (every 20 ms), never a fixed delay standing in for
/// readiness. For sync tests: the probe runs on the caller's thread (it may block on a
/// runtime of its own); the ticks come from a small runtime of this function's.
pub fn eventually<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    dispatch_testkit::eventually(what, POLL_LIMIT, probe)
}

const POLL_LIMIT: Duration = Duration::from_secs(60);

fn poll_interval() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// [`eventually`] for async probes, when the server under test runs on the caller's runtime
/// (a blocking wait would stall it).
pub async fn eventually_async<T, F>(what: &str, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let mut tick = poll_interval();
    let polled = tokio::time::timeout(POLL_LIMIT, async {
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

// Not every test binary takes ports.
#[allow(unused_imports)]
pub use dispatch_testkit::{free_port, free_ports};

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path, &[], "").map(|(code, _, body)| (code, body))
}

/// One HTTP/1.1 request (`Connection: close`): status, head (lower-case), body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    if !body.is_empty() || method != "GET" {
        req += &format!("Content-Length: {}\r\n", body.len());
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Some((code, head.to_ascii_lowercase(), body.to_string()))
}

/// Where a server's log goes: nowhere, or with `DISPATCH_TEST_LOGS=DIR` to `DIR/<api port>.log`
/// (to read what a failing test's servers did).
fn server_log(api: u16) -> Stdio {
    match std::env::var_os("DISPATCH_TEST_LOGS") {
        Some(dir) => std::fs::File::create(Path::new(&dir).join(format!("{api}.log")))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        None => Stdio::null(),
    }
}

pub struct ServerProc {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub api: u16,
    pub gateway: u16,
    /// The admin token the server wrote on its first start.
    pub token: String,
}

impl ServerProc {
    pub fn start() -> ServerProc {
        Self::start_in(tempfile::tempdir().unwrap())
    }

    /// A server on the data dir `dir/data` (a restart reuses it).
    pub fn start_in(dir: tempfile::TempDir) -> ServerProc {
        Self::start_with(dir, &[])
    }

    /// Like [`ServerProc::start_in`], with more `dispatch server` flags.
    pub fn start_with(dir: tempfile::TempDir, flags: &[&str]) -> ServerProc {
        Self::spawn(dir, flags, None)
    }

    /// A server whose stderr (its own log) goes to `dir/server.log`, with these flags.
    pub fn start_logged(flags: &[&str]) -> (ServerProc, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let s = Self::spawn(dir, flags, Some(&log));
        (s, log)
    }

    fn spawn(dir: tempfile::TempDir, flags: &[&str], log: Option<&Path>) -> ServerProc {
        let (api, gateway) = free_ports();
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => server_log(api),
        };
        let child = Command::cargo_bin("dispatch")
            .unwrap()
            .arg("server")
            .args(flags)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--api-addr",
                &format!("127.0.0.1:{api}"),
                "--gateway-addr",
                &format!("127.0.0.1:{gateway}"),
            ])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut s = ServerProc {
            child,
            dir,
            api,
            gateway,
            token: String::new(),
        };
        eventually("the server to be ready", || {
            (http_get(api, "/readyz")?.0 == 200).then_some(())
        });
        // Written before the server is ready (first start), kept on a restart.
        s.token = std::fs::read_to_string(s.dir.path().join("data").join("admin-token"))
            .expect("the server writes DATA_DIR/admin-token on first start")
            .trim()
            .to_string();
        s
    }

    /// The ids of the containers runc still knows of for this server (container tier).
    pub fn containers(&self) -> Vec<String> {
        let out = Command::new(program("runc"))
            .arg("--root")
            .arg(self.dir.path().join("data/containers/state"))
            .args(["list", "-q"])
            .output()
            .unwrap();
        let ids = String::from_utf8_lossy(&out.stdout);
        ids.lines().map(str::to_string).collect()
    }

    /// A Python handler `v.py` (handler `v.handle`) returning `text`, in a folder of its
    /// own under the test's dir; its path (each text is another build of a function).
    pub fn python_returning(&self, text: &str) -> String {
        let p = self.dir.path().join(format!("{text}/v.py"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(
            &p,
            format!("def handle(context, payload):\n    return {text:?}\n"),
        )
        .unwrap();
        p.to_str().unwrap().to_string()
    }

    /// The CLI pointed at this server, with an empty config file.
    pub fn cli(&self) -> Command {
        let mut c = Command::cargo_bin("dispatch").unwrap();
        c.env("DISPATCH_SERVER", format!("http://127.0.0.1:{}", self.api))
            .env("DISPATCH_CONFIG", self.dir.path().join("config.json"))
            .env("DISPATCH_TOKEN", &self.token)
            .env_remove("DISPATCH_NAMESPACE");
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "dispatch {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "dispatch {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8(out.stderr).unwrap();
        // Progress lines of --wait (without a terminal) may come first: the error from its
        // `error: ` line on.
        let at = if err.starts_with("error: ") {
            Some(0)
        } else {
            err.find("\nerror: ").map(|i| i + 1)
        };
        let Some(at) = at else {
            panic!("no `error: ` line: {err}");
        };
        err[at..].to_string()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    pub fn exec(&self, function: &str, stdin: &str) -> (bool, Value) {
        let mut child = self
            .cli()
            .args(["exec", function])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("not json: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.success(), v)
    }

    /// SIGKILL (no shutdown at all), then hands back the data dir for a restart.
    pub fn kill9(mut self) -> tempfile::TempDir {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// A typed client for this server (needs a tokio runtime).
    pub fn client(&self) -> dispatch_client::Client {
        dispatch_client::Client::new(&dispatch_client::Target {
            server: format!("http://127.0.0.1:{}", self.api),
            token: Some(self.token.clone()),
            namespace: "default".into(),
            insecure: false,
        })
        .unwrap()
    }

    /// SIGTERM, then wait for a clean exit.
    /// SIGTERM, then waits for the server to stop (its shutdown delay, its drain) and hands
    /// back its folder for a restart.
    pub fn stop_gracefully(mut self) -> tempfile::TempDir {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = eventually("the server to stop on SIGTERM", || {
            self.child.try_wait().unwrap()
        });
        assert!(status.success(), "the server stopped with {status}");
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        eventually("the server to stop on SIGTERM", || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(cmd);
            }
        }
    }
    found
}

/// Reads the log an async test function writes (`start ID PID`, `end ID PID`, and a
/// `restart` line the test writes after killing a server) and panics if a run ran twice at
/// once: an attempt cut by the kill may still write its end after the marker (its worker
/// notices the server's death within 100 ms), but only if no new attempt of that run had
/// started by then. Returns how many attempts of each run ended.
pub fn attempts_never_overlap(text: &str) -> std::collections::HashMap<String, usize> {
    use std::collections::HashMap;
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
    ended
}

/// Writes `tick.py` — an async test function that appends `start ID PID` and `end ID PID`
/// around `work_ms` of work to `log` (read by [`attempts_never_overlap`]) — and a manifest of
/// it (image `py`, function `tick` with retries, plus `extra` spec lines) into `dir`; returns
/// the manifest's path.
pub fn tick_function(dir: &Path, log: &Path, work_ms: u32, extra: &str) -> PathBuf {
    let code = format!(
        r#"
import os, select

def handle(context, payload):
    fd = os.open(os.environ["LOG_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("start %s %d\n" % (context["runId"], os.getpid())).encode())
    select.select([], [], [], {work})  # work, so that a kill lands mid-run
    os.write(fd, ("end %s %d\n" % (context["runId"], os.getpid())).encode())
    os.close(fd)
    return {{"ok": True}}
"#,
        work = f64::from(work_ms) / 1000.0
    );
    std::fs::write(dir.join("tick.py"), code).unwrap();
    let manifest = dir.join("tick.yaml");
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
{extra}"#,
            log.display()
        ),
    )
    .unwrap();
    manifest
}

/// How many attempts ended in a [`tick_function`] log so far.
pub fn tick_ends(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("end "))
        .count()
}

/// A child process killed when dropped (a registry).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Debian program's path; fails saying it is missing.
pub fn program(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p.display().to_string();
        }
    }
    panic!("{name} is not installed (Debian package; .ci/run installs it)");
}

/// The CNCF registry on a free port, storing in `dir`.
pub fn registry(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(program("docker-registry"))
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    eventually("the registry to answer /v2/", || {
        (http_get(port, "/v2/")?.0 == 200).then_some(())
    });
    (p, format!("127.0.0.1:{port}"))
}

/// A current-thread runtime for async helpers in sync tests.
pub fn rt() -> tokio::runtime::Runtime {
    dispatch_client::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A registry serving a tiny image built from Debian's static busybox as Docker Hub's
/// `library/alpine:latest` and `library/busybox:latest` (so dispatcher's sample runs verbatim
/// through `--registry-mirror`).
/// Two layers: busybox and its applets, then one that whites out `/etc/removed` and adds
/// `/etc/layer2`. Returns the registry, its folder and `host:port`.
pub struct ImageRegistry {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub host: String,
}

impl ImageRegistry {
    pub fn start() -> ImageRegistry {
        use dispatch_runtime::oci::{LayerBuilder, Registry, RegistryOptions};
        let dir = tempfile::tempdir().unwrap();
        let (proc, host) = registry(dir.path());
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::copy(program("busybox"), bin.join("busybox")).unwrap();
        for applet in [
            "sh", "echo", "cat", "env", "id", "sleep", "head", "dd", "ls", "test", "printf",
            "touch", "wc", "pwd", "hostname", "mount", "tail", "kill",
        ] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        let mut base = LayerBuilder::new();
        base.tree("/bin", &bin).unwrap();
        for d in ["/tmp", "/proc", "/dev", "/sys", "/work"] {
            base.dir(d).unwrap();
        }
        base.file("/etc/removed", 0o644, &b"lower layer\n"[..])
            .unwrap();
        base.file("/etc/os-release", 0o644, &b"ID=busybox-test\n"[..])
            .unwrap();
        let base = base.finish("busybox").unwrap();
        let mut top = LayerBuilder::new();
        top.file("/etc/.wh.removed", 0o644, &b""[..]).unwrap();
        top.file("/etc/layer2", 0o644, &b"upper layer\n"[..])
            .unwrap();
        let top = top.finish("whiteout").unwrap();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {
                "Env": ["PATH=/bin", "FROM_IMAGE=yes"],
                "Cmd": ["sh", "-c", "echo default cmd in $(pwd)"],
                "WorkingDir": "/work"
            },
            "rootfs": {"type": "layers", "diff_ids": [base.diff_id, top.diff_id]},
            "history": [{"created_by": "busybox"}, {"created_by": "whiteout"}]
        });
        let reg = Registry::new(RegistryOptions {
            insecure: vec![host.clone()],
            ..Default::default()
        });
        for name in ["alpine", "busybox"] {
            rt().block_on(reg.push_scratch(
                &format!("{host}/library/{name}:latest"),
                &[base.clone(), top.clone()],
                &config,
            ))
            .unwrap();
        }
        ImageRegistry { proc, dir, host }
    }

    /// The server flag that sends Docker Hub references here.
    pub fn mirror_flag(&self) -> String {
        format!("--registry-mirror=http://{}", self.host)
    }
}

impl ImageRegistry {
    /// Pushes a Python base image made of this host's Python 3 (its interpreter, standard
    /// library and the shared libraries it and the `dispatch` runner link) as
    /// `HOST/test/python:3`; returns that reference. ~40 MB unpacked; the standard library's
    /// compiled modules (`__pycache__`) come along, as in real Python images.
    pub fn push_python(&self) -> String {
        let stage = tempfile::tempdir().unwrap();
        let root = stage.path();
        let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
        let version = python.file_name().unwrap().to_str().unwrap().to_string(); // python3.11
        let xy = version.trim_start_matches("python").to_string();
        copy_keeping_mtime(&python, &root.join("usr/bin/python3"));
        let stdlib = Path::new("/usr/lib").join(&version);
        let skip = [
            "test",
            "idlelib",
            "tkinter",
            "ensurepip",
            "lib2to3",
            "pydoc_data",
            "site-packages",
            "dist-packages",
            "turtledemo",
            "unittest",
        ];
        let mut stack = vec![stdlib.clone()];
        let mut libs = vec![python.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let p = e.path();
                if skip.contains(&name.as_str())
                    || name.starts_with("config-")
                    || name.starts_with("_test")
                {
                    continue;
                }
                let meta = std::fs::metadata(&p).unwrap();
                let dest = root.join(p.strip_prefix("/").unwrap());
                if meta.is_dir() {
                    stack.push(p);
                } else if meta.is_file() {
                    if name.ends_with(".so") {
                        libs.push(p.clone());
                    }
                    copy_keeping_mtime(&p, &dest);
                }
            }
        }
        let env = [
            "PATH=/usr/bin:/bin".to_string(),
            format!("PYTHON_VERSION={xy}"),
        ];
        self.push_host_image(root, &libs, ("python", "3"), &env, "python3")
    }

    /// Pushes a Node.js base image made of this host's `node` (and the shared libraries it
    /// links) as `HOST/test/node:20`; returns that reference.
    pub fn push_node(&self) -> String {
        let stage = tempfile::tempdir().unwrap();
        let root = stage.path();
        let node = std::fs::canonicalize(program("node")).unwrap();
        copy_keeping_mtime(&node, &root.join("usr/bin/node"));
        let env = ["PATH=/usr/bin:/bin".to_string()];
        self.push_host_image(root, &[node], ("node", "20"), &env, "node")
    }

    /// Pushes the folder `root` as a one-layer image `HOST/test/NAME:TAG`, with the shared
    /// libraries `bins` and the `dispatch` runner link, a few empty system folders and
    /// `/etc/os-release` saying `ID=NAME-test`.
    fn push_host_image(
        &self,
        root: &Path,
        bins: &[std::path::PathBuf],
        (name, tag): (&str, &str),
        env: &[String],
        cmd: &str,
    ) -> String {
        use dispatch_runtime::oci::{Registry, RegistryOptions};
        let mut bins = bins.to_vec();
        // The runner is the dispatch binary next to this test's.
        bins.push(std::path::PathBuf::from(env!("CARGO_BIN_EXE_dispatch")));
        // The shared libraries all of them link, by the paths the loader asks for.
        for bin in &bins {
            let out = Command::new("ldd").arg(bin).output().unwrap();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let path = line
                    .split_whitespace()
                    .find(|w| w.starts_with('/'))
                    .map(std::path::PathBuf::from);
                if let Some(path) = path.filter(|p| p.is_file()) {
                    let dest = root.join(path.strip_prefix("/").unwrap());
                    if !dest.exists() {
                        copy_keeping_mtime(&std::fs::canonicalize(&path).unwrap(), &dest);
                    }
                }
            }
        }
        for d in ["tmp", "proc", "dev", "sys", "etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/os-release"), format!("ID={name}-test\n")).unwrap();
        // A tar of its own (not LayerBuilder's, which zeroes mtimes): the files keep their
        // mtimes, so that Python's compiled standard library stays valid, as in real images.
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        tar.append_dir_all(".", root).unwrap();
        let raw = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let data = gz.finish().unwrap();
        let layer = dispatch_runtime::oci::Layer {
            digest: dispatch_runtime::oci::sha256(&data),
            diff_id: dispatch_runtime::oci::sha256(&raw),
            data: data.into(),
            created_by: name.into(),
        };
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": env, "Cmd": [cmd]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
            "history": [{"created_by": format!("this host's {name}")}]
        });
        let reference = format!("{}/test/{name}:{tag}", self.host);
        let reg = Registry::new(RegistryOptions {
            insecure: vec![self.host.clone()],
            ..Default::default()
        });
        rt().block_on(reg.push_scratch(&reference, &[layer], &config))
            .unwrap();
        reference
    }
}

/// Copies a file keeping its mtime (Python's compiled modules name their source's).
fn copy_keeping_mtime(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
    let mtime = std::fs::metadata(from).unwrap().modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(to)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

impl ImageRegistry {
    /// Pushes `HOST/multi:1`, an image index (manifest list) of two busybox images whose
    /// `/etc/os-release` names their platform: `ID=linux-arm64` and `ID=linux-amd64`.
    pub fn push_index(&self) -> String {
        use dispatch_runtime::oci::{LayerBuilder, Registry, RegistryOptions};
        let reg = Registry::new(RegistryOptions {
            insecure: vec![self.host.clone()],
            ..Default::default()
        });
        let mut entries = Vec::new();
        for arch in ["arm64", "amd64"] {
            let mut l = LayerBuilder::new();
            l.file(
                "/bin/busybox",
                0o755,
                std::fs::read(program("busybox")).unwrap(),
            )
            .unwrap();
            l.file(
                "/etc/os-release",
                0o644,
                format!("ID=linux-{arch}\n").into_bytes(),
            )
            .unwrap();
            l.dir("/tmp").unwrap();
            let layer = l.finish(arch).unwrap();
            let config = serde_json::json!({
                "architecture": arch, "os": "linux",
                "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/busybox", "cat", "/etc/os-release"]},
                "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}
            });
            let pushed = rt()
                .block_on(reg.push_scratch(
                    &format!("{}/multi:{arch}", self.host),
                    &[layer],
                    &config,
                ))
                .unwrap();
            let url = format!("http://{}/v2/multi/manifests/{}", self.host, pushed.digest);
            let size = rt().block_on(async {
                reqwest::Client::new()
                    .get(&url)
                    .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
                    .len()
            });
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": pushed.digest, "size": size,
                "platform": {"architecture": arch, "os": "linux"}
            }));
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries
        });
        let status = rt().block_on(async {
            reqwest::Client::new()
                .put(format!("http://{}/v2/multi/manifests/1", self.host))
                .header("Content-Type", "application/vnd.oci.image.index.v1+json")
                .body(index.to_string())
                .send()
                .await
                .unwrap()
                .status()
        });
        assert!(status.is_success(), "pushing the index: {status}");
        format!("{}/multi:1", self.host)
    }
}
