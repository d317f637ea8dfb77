//! The isolation attack suite (DESIGN §9): handlers of a developer of namespace `team-b` —
//! Python, Node, an `exec` program and a job template — try to reach the server, its data
//! dir and another tenant, on a real `dispatch server` with its default isolation. Each attack
//! must fail, and the platform must keep serving.

mod support;

use std::process::{Output, Stdio};

use serde_json::Value;
use support::ServerProc;

/// A developer of `team-b` and a victim function in `team-a`.
struct Tenants {
    s: ServerProc,
    dev: String,
    data: std::path::PathBuf,
    victim_source: std::path::PathBuf,
    /// Host pids of team-a's sandboxed processes (its zygote and worker).
    victim_pids: Vec<i32>,
    src: tempfile::TempDir,
}

/// The parent of `pid`.
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …: comm may hold spaces, so read after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Host pids of the processes of server `server` running as a namespace's sandbox uid.
fn sandboxed_pids(server: u32) -> Vec<i32> {
    let descends = |mut p: i32| {
        while p > 1 {
            if p == server as i32 {
                return true;
            }
            p = ppid(p).unwrap_or(0);
        }
        false
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if uid.is_some_and(|u| u >= dispatch_runtime::sandbox::UID_BASE) && descends(pid) {
            out.push(pid);
        }
    }
    out
}

const VICTIM: &str = r#"SECRET_OF_TEAM_A = 'team-a-source-marker'
import os
def handle(context, payload):
    return os.getpid()
"#;

impl Tenants {
    fn new() -> Tenants {
        Self::with_flags(&[])
    }

    /// Tenants on a server started with more flags (a registry mirror for the container tier).
    fn with_flags(flags: &[&str]) -> Tenants {
        let s = ServerProc::start_with(tempfile::tempdir().unwrap(), flags);
        let src = tempfile::tempdir().unwrap();
        for ns in ["team-a", "team-b"] {
            s.ok(&["create", "namespace", ns]);
            s.ok(&["create", "image", "py", "python3", "-n", ns, "--wait"]);
            s.ok(&["create", "image", "js", "nodejs", "-n", ns, "--wait"]);
        }
        let victim = src.path().join("victim.py");
        std::fs::write(&victim, VICTIM).unwrap();
        s.ok(&[
            "create",
            "function",
            "victim",
            victim.to_str().unwrap(),
            "--image",
            "py",
            "-n",
            "team-a",
            "--wait",
        ]);
        let dev = s
            .ok(&[
                "create",
                "token",
                "attacker",
                "--role",
                "developer",
                "--token-namespace",
                "team-b",
            ])
            .trim()
            .to_string();
        let data = s.dir.path().join("data");
        // Only team-a has run user code so far: every sandboxed process is its.
        let called = s.ok(&["exec", "victim", "-n", "team-a", "--input", "1"]);
        assert!(called.contains("payload"), "{called}");
        let victim_pids = sandboxed_pids(s.child.id());
        assert!(
            !victim_pids.is_empty(),
            "team-a's worker runs as a sandbox uid"
        );
        // Where the victim's source was unpacked, to aim at it.
        let victim_source = walk(&data.join("builds").join("functions"))
            .into_iter()
            .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("team-a-source-marker")))
            .expect("the victim's source is unpacked under builds/functions");
        Tenants {
            s,
            dev,
            data,
            victim_source,
            victim_pids,
            src,
        }
    }

    /// The CLI as the attacker (developer of team-b).
    fn attacker(&self, args: &[&str]) -> Output {
        self.s
            .cli()
            .env("DISPATCH_TOKEN", &self.dev)
            .args(args)
            .args(["-n", "team-b"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.attacker(args);
        assert!(
            out.status.success(),
            "dispatch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Creates function `name` of team-b from `file` with `body`, plus extra flags.
    fn function(&self, name: &str, file: &str, body: &str, image: &str, extra: &[&str]) {
        let path = self.src.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        let f = path.join(file);
        std::fs::write(&f, body).unwrap();
        if file.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut args = vec![
            "create",
            "function",
            name,
            path.to_str().unwrap(),
            "--image",
            image,
            "--wait",
        ];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// Calls a team-b function with `input`: its whole answer.
    fn call(&self, name: &str, input: &Value) -> Value {
        let out = self.attacker(&["exec", name, "--input", &input.to_string()]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "exec {name}: not JSON: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The victim still answers (the platform keeps serving the other tenant).
    fn victim_serves(&self) {
        let out = self
            .s
            .cli()
            .args(["exec", "victim", "-n", "team-a", "--input", "1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the other tenant's function stopped answering: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The victim still answers, its processes live and the server's token is there.
    fn victim_unharmed(&self) {
        self.victim_serves();
        for pid in &self.victim_pids {
            assert!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "team-a's process {pid} was killed"
            );
        }
        assert!(self.data.join("admin-token").exists());
    }

    /// Paths an attacker wants, with the host pid of the server.
    fn targets(&self) -> Value {
        serde_json::json!({
            "files": [
                self.data.join("admin-token"),
                self.data.join("secret.key"),
                self.data.join("dispatch.db"),
                self.data.join("history.db"),
                self.victim_source,
                format!("/proc/{}/environ", self.s.child.id()),
                "/root/.bashrc",
                "/etc/shadow",
            ],
            "server": self.s.child.id(),
            "victims": self.victim_pids,
        })
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Python: every read, signal, ptrace and write of the list, each expected to fail. The
/// handler answers what succeeded.
const PY_ATTACKS: &str = r#"
import ctypes, os, signal
def handle(context, t):
    got = []
    for f in t["files"]:
        try:
            with open(f, "rb") as fh:
                fh.read(16)
            got.append("read " + f)
        except Exception:
            pass
    for pid in [t["server"]] + t["victims"]:
        try:
            os.kill(pid, signal.SIGKILL)
            got.append("killed %d" % pid)
        except Exception:
            pass
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, t["server"], 0, 0) == 0:
        got.append("ptrace attached to the server")
    if libc.ptrace(0, 0, 0, 0) == 0:
        got.append("ptrace TRACEME")
    for w in ["/etc/owned", os.getcwd() + "/owned", "/usr/owned"]:
        try:
            open(w, "w").write("x")
            got.append("wrote " + w)
        except Exception:
            pass
    if libc.unshare(0x10000000) == 0:
        got.append("new user namespace")
    if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0:
        got.append("mounted")
    open("/tmp/ok", "w").write("private tmp works")
    return {"got": got, "uid": os.getuid(), "pid": os.getpid()}
"#;

#[test]
fn a_python_handler_of_another_namespace_reaches_nothing() {
    let t = Tenants::new();
    t.function(
        "attack",
        "attack.py",
        PY_ATTACKS,
        "py",
        &["--handler", "attack.handle"],
    );
    // The victim's worker: its host pid.
    let victim_pid =
        t.s.cli()
            .args(["exec", "victim", "-n", "team-a", "--input", "1"])
            .output()
            .unwrap();
    assert!(victim_pid.status.success());
    let mut targets = t.targets();
    let victims: Vec<i32> = support::processes_mentioning("victim")
        .iter()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    targets["victim"] = victims.first().copied().unwrap_or(0).into();
    let answer = t.call("attack", &targets);
    assert!(answer["context"]["error"].is_null(), "{answer}");
    let got = &answer["payload"]["got"];
    assert_eq!(got, &serde_json::json!([]), "the handler reached: {got}");
    assert_ne!(
        answer["payload"]["uid"], 0,
        "user code must not run as root"
    );
    t.victim_unharmed();
}

#[test]
fn node_and_exec_handlers_reach_nothing_either() {
    let t = Tenants::new();
    let js = r#"
const fs = require('fs');
module.exports = async (context, t) => {
  const got = [];
  for (const f of t.files) { try { fs.readFileSync(f); got.push('read ' + f); } catch (e) {} }
  try { process.kill(t.server, 'SIGKILL'); got.push('killed the server'); } catch (e) {}
  try { fs.writeFileSync('/etc/owned', 'x'); got.push('wrote /etc'); } catch (e) {}
  return {got, uid: process.getuid()};
};
"#;
    t.function("attack-js", "attack.js", js, "js", &["--handler", "attack"]);
    let answer = t.call("attack-js", &t.targets());
    assert_eq!(answer["payload"]["got"], serde_json::json!([]), "{answer}");
    assert_ne!(answer["payload"]["uid"], 0);

    let sh = format!(
        "#!/bin/sh\nfor f in {} {} {}; do cat \"$f\" >/dev/null 2>&1 && echo \"read $f\" >&2 && exit 3; done\n\
         kill -9 {} 2>/dev/null && exit 4\necho '\"clean\"'\n",
        t.data.join("admin-token").display(),
        t.data.join("secret.key").display(),
        t.victim_source.display(),
        t.s.child.id()
    );
    t.ok(&[
        "create",
        "base-image",
        "shell",
        "debian:12-slim",
        "--language",
        "exec",
        "--wait",
    ]);
    t.ok(&["create", "image", "sh", "shell", "--wait"]);
    t.function(
        "attack-sh",
        "attack.sh",
        &sh,
        "sh",
        &["--handler", "attack.sh"],
    );
    let answer = t.call("attack-sh", &Value::Null);
    assert_eq!(answer["payload"], "clean", "{answer}");
    t.victim_serves();
}

#[test]
fn a_job_template_command_reaches_nothing() {
    job_attack(&Tenants::new(), "host");
}

/// The same attack from inside the job's image (busybox standing in for alpine:latest).
#[test]
fn a_job_container_reaches_nothing() {
    let hub = support::ImageRegistry::start();
    let t = Tenants::with_flags(&[&hub.mirror_flag()]);
    job_attack(&t, "container");
}

/// The Python attacks from a function with `spec.isolation: container` (its base image: this
/// host's Python, from a local registry).
#[test]
fn a_python_handler_in_a_container_reaches_nothing() {
    let hub = support::ImageRegistry::start();
    let base = hub.push_python();
    let t = Tenants::with_flags(&[&format!("--insecure-registry={}", hub.host)]);
    t.s.ok(&[
        "create",
        "base-image",
        "pyc",
        &base,
        "--language",
        "python3",
        "-n",
        "team-b",
    ]);
    t.s.ok(&["create", "image", "pyc", "pyc", "-n", "team-b", "--wait"]);
    t.function(
        "attack",
        "attack.py",
        PY_ATTACKS,
        "pyc",
        &["--handler", "attack.handle", "--isolation", "container"],
    );
    let answer = t.call("attack", &t.targets());
    assert!(answer["context"]["error"].is_null(), "{answer}");
    let got = &answer["payload"]["got"];
    assert_eq!(got, &serde_json::json!([]), "the handler reached: {got}");
    let uid = answer["payload"]["uid"].as_u64().unwrap();
    assert!(
        uid >= u64::from(dispatch_runtime::sandbox::UID_BASE),
        "uid {uid}"
    );
    t.victim_unharmed();
}

/// A job template's command tries to read the token and the victim's source, kill the server
/// and write a system file; `runtime` is the template's `spec.runtime`.
fn job_attack(t: &Tenants, runtime: &str) {
    let manifest = format!(
        r#"apiVersion: dispatcher.ivan.vc/v1alpha1
kind: JobTemplate
metadata:
  name: attack
spec:
  runtime: {runtime}
  jobTemplate:
    spec:
      template:
        spec:
          containers:
          - name: c
            image: alpine:latest
            command: ["sh", "-c", "cat {token} && echo READ-TOKEN; cat {victim} && echo READ-SOURCE; kill -9 {server} && echo KILLED; touch /etc/owned && echo WROTE; echo done-$(id -u)"]
          restartPolicy: Never
      backoffLimit: 0
"#,
        token = t.data.join("admin-token").display(),
        victim = t.victim_source.display(),
        server = t.s.child.id(),
    );
    let f = t.src.path().join("job.yaml");
    std::fs::write(&f, manifest).unwrap();
    t.ok(&["apply", "-f", f.to_str().unwrap()]);
    let out = t.attacker(&["execute", "attack", "--wait"]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{logs}");
    for bad in ["READ-TOKEN", "READ-SOURCE", "KILLED", "WROTE", "done-0"] {
        assert!(!logs.contains(bad), "the job did {bad}: {logs}");
    }
    assert!(logs.contains("done-"), "the job ran to its end: {logs}");
    t.victim_serves();
}

#[test]
fn limits_stop_fork_bombs_memory_hogs_tmp_fillers_and_the_network() {
    let t = Tenants::new();
    let py = r#"
import os, socket
def handle(context, what):
    if what == "fork":
        n = 0
        try:
            for _ in range(2000):
                if os.fork() == 0:
                    import select; select.select([], [], [], 5); os._exit(0)
                n += 1
        except OSError as e:
            return {"forks": n, "stopped": str(e)}
        return {"forks": n}
    if what == "memory":
        hog = []
        while True:
            hog.append(b"x" * (16 << 20))
    if what == "tmp":
        written = 0
        try:
            with open("/tmp/fill", "wb") as f:
                while written < (64 << 20):
                    f.write(b"x" * (1 << 20)); f.flush(); written += 1 << 20
        except OSError as e:
            return {"written": written, "stopped": str(e)}
        return {"written": written}
    if what == "net":
        try:
            s = socket.create_connection(("127.0.0.1", context.get("port", 1)), timeout=2)
            return "connected"
        except OSError as e:
            return "refused: " + str(e)
    return "ok"
"#;
    t.function(
        "limited",
        "limited.py",
        py,
        "py",
        &[
            "--handler",
            "limited.handle",
            "--memory",
            "96Mi",
            "--pids",
            "32",
            "--tmp",
            "8Mi",
            "--network",
            "none",
            "--max-workers",
            "1",
        ],
    );
    let fork = t.call("limited", &"fork".into());
    let forks = fork["payload"]["forks"].as_u64().unwrap_or(u64::MAX);
    assert!(forks < 32, "the pids limit stops a fork bomb: {fork}");
    assert!(fork["payload"]["stopped"].is_string(), "{fork}");

    let mem = t.call("limited", &"memory".into());
    let err = &mem["context"]["error"];
    assert_eq!(err["type"], "SystemError", "{mem}");
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("memory limit of 96Mi"),
        "{mem}"
    );
    // The next call gets a fresh worker.
    let next = t.call("limited", &"ok".into());
    assert_eq!(next["payload"], "ok", "{next}");

    let tmp = t.call("limited", &"tmp".into());
    let written = tmp["payload"]["written"].as_u64().unwrap_or(u64::MAX);
    assert!(written <= 8 << 20, "/tmp is capped: {tmp}");
    assert!(tmp["payload"]["stopped"].is_string(), "{tmp}");

    let net = t.call("limited", &"net".into());
    let said = net["payload"].as_str().unwrap_or("");
    assert!(
        said.starts_with("refused"),
        "network none has no network: {net}"
    );
    t.victim_serves();
}

#[test]
fn isolation_none_is_explicit_and_loopback_only() {
    let out = assert_cmd::Command::cargo_bin("dispatch")
        .unwrap()
        .args([
            "server",
            "--isolation",
            "none",
            "--api-addr",
            "0.0.0.0:0",
            "--gateway-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing --isolation none"), "{err}");

    let out = assert_cmd::Command::cargo_bin("dispatch")
        .unwrap()
        .args(["server", "--sandbox-without", "everything"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("landlock, seccomp and cgroups"));
}

#[test]
fn the_sandbox_launcher_refuses_a_bad_plan_without_running_anything() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dispatch"))
        .args(["sandbox", "{not json", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plan is not valid"));
}
