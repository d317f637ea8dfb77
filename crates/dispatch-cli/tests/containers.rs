//! The container tier on the embedded backend (DESIGN §9): job templates run their images
//! with runc (Debian), pulled from the CNCF registry (Debian's `docker-registry`) on a loopback
//! port standing in for Docker Hub through `--registry-mirror`. The image is built from
//! Debian's static busybox, in two layers, the second with a whiteout.

mod support;

use serde_json::Value;
use support::*;

const TEMPLATES: &str = r#"
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: defaults}
spec:
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: main, image: alpine:latest}
---
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: probe}
spec:
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: main
            image: alpine:latest
            env: [{name: FROM_SPEC, value: "yes"}]
            command:
            - sh
            - -c
            - |
              cat /etc/layer2
              test -e /etc/removed && echo removed-is-back || echo whiteout-applied
              echo "image env $FROM_IMAGE, spec env $FROM_SPEC"
              echo "uid $(id -u) gid $(id -g)"
              touch /etc/x 2>/dev/null && echo root-writable || echo root-read-only
              touch /tmp/x && echo tmp-writable; ls -ld /tmp
              cat /etc/os-release
              test -e /usr/lib/os-release && echo host-usr-visible || echo host-usr-hidden
              grep CapEff /proc/self/status
              grep NoNewPrivs /proc/self/status
              grep Seccomp: /proc/self/status
              mount -t tmpfs none /tmp 2>/dev/null && echo mount-allowed || echo mount-refused
              echo "pid $$ sees $(ls /proc | grep -c '^[0-9]') processes"
---
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: echo}
spec:
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: main
            image: alpine:latest
            command: [sh, -c, 'printf "%s" "$PAYLOAD"']
            env: [{name: PAYLOAD, value: "{{ .Payload }}"}]
---
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: fails}
spec:
  jobTemplate:
    spec:
      backoffLimit: 1
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: main, image: alpine:latest, imagePullPolicy: IfNotPresent, command: [sh, -c, 'echo try >&2; exit 3']}
---
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: hungry}
spec:
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: main
            image: alpine:latest
            resources: {limits: {memory: 32Mi}}
            command: [dd, if=/dev/zero, of=/dev/null, bs=256M, count=1]
---
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: on-host}
spec:
  runtime: host
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: main, image: alpine:latest, command: [cat, /etc/os-release]}
---
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: unreachable}
spec:
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: main, image: "127.0.0.1:9/nothing/here:1", command: ["true"]}
"#;

fn server(hub: &ImageRegistry) -> ServerProc {
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &[&hub.mirror_flag()]);
    let file = s.dir.path().join("templates.yaml");
    std::fs::write(&file, TEMPLATES).unwrap();
    s.ok(&["apply", "-f", file.to_str().unwrap()]);
    s
}

/// Starts an execution, follows it to its end; its logs (stdout then stderr, where `logs
/// --follow` also says how it ended) and its record.
fn run(s: &ServerProc, template: &str, payload: &str) -> (String, Value) {
    let started: Value =
        serde_json::from_str(&s.ok(&["execute", template, "-p", payload])).unwrap();
    let uuid = started["uuid"].as_str().unwrap().to_string();
    let out = s
        .cli()
        .args(["logs", "jobexecution", &uuid, "--follow"])
        .output()
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (logs, s.json(&["get", "jobexecution", &uuid, "-o", "json"]))
}

#[test]
fn job_templates_run_their_images_in_containers() {
    let hub = ImageRegistry::start();
    let s = server(&hub);

    // No command: the image's entrypoint/cmd in its working dir.
    let (logs, job) = run(&s, "defaults", "");
    assert!(logs.contains("default cmd in /work"), "{logs}");
    // The pull's progress, in the logs of the execution that waited for it.
    assert!(
        logs.contains("[dispatch] pulling alpine:latest (sha256:")
            && logs.contains("layer 2/2")
            && logs.contains("[dispatch] unpacked alpine:latest"),
        "{logs}"
    );
    assert_eq!(job["status"]["phase"], "Completed", "{job}");
    assert_eq!(job["status"]["runtime"], "container");
    assert_eq!(job["status"]["images"][0], "alpine:latest");

    // The image's files (both layers, the whiteout applied), its env under the spec's, an
    // unprivileged identity, a read-only root with a writable /tmp, none of the host's
    // files, no capabilities, no_new_privs, seccomp, no mounts, its own PID namespace.
    let (logs, job) = run(&s, "probe", "");
    assert_eq!(job["status"]["phase"], "Completed", "{logs}");
    for line in [
        "upper layer",
        "whiteout-applied",
        "image env yes, spec env yes",
        "root-read-only",
        "tmp-writable",
        "ID=busybox-test",
        "host-usr-hidden",
        "CapEff:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "mount-refused",
        "pid 1 sees",
    ] {
        assert!(logs.contains(line), "{line:?} missing in:\n{logs}");
    }
    let uid: u64 = logs
        .lines()
        .find_map(|l| l.strip_prefix("uid "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= 2_000_000_000, "a namespace's uid, not root: {uid}");

    // A hostile payload reaches the container byte for byte, as data.
    let payload = "it's \"quoted\" $(touch /tmp/pwned) `id` {{ .Name }}\n\\n ünïcödé ✓";
    let (logs, _) = run(&s, "echo", payload);
    assert!(
        logs.starts_with(&format!("{payload}\njobexecution ")),
        "{logs}"
    );

    // Exit codes and backoffLimit.
    let (logs, job) = run(&s, "fails", "");
    assert_eq!(job["status"]["phase"], "Failed");
    assert_eq!(job["status"]["exitCode"], 3);
    assert_eq!(job["status"]["attempts"], 2, "backoffLimit 1: two attempts");
    assert_eq!(logs.matches("try\n").count(), 2, "{logs}");

    // Over its memory limit the container is killed, and the logs say why.
    let (logs, job) = run(&s, "hungry", "");
    assert_eq!(job["status"]["exitCode"], 137, "{logs}");
    assert!(logs.contains("memory limit (32Mi)"), "{logs}");

    // spec.runtime: host runs the command on this host (the image is only recorded).
    let (logs, job) = run(&s, "on-host", "");
    assert_eq!(job["status"]["runtime"], "host");
    assert!(!logs.contains("busybox-test"), "{logs}");

    // A container function on an image without glibc (the runner needs it) says so.
    s.ok(&[
        "create",
        "base-image",
        "bb",
        "alpine:latest",
        "--language",
        "python3",
    ]);
    s.ok(&["create", "image", "bb", "bb", "--wait"]);
    let code = s.dir.path().join("f.py");
    std::fs::write(&code, "def handle(c, p):\n    return p\n").unwrap();
    let err = s.fails(&[
        "create",
        "function",
        "--image",
        "bb",
        "musl",
        code.to_str().unwrap(),
        "--isolation",
        "container",
        "--wait",
    ]);
    assert!(
        err.contains("has no glibc") && err.contains("-slim"),
        "{err}"
    );

    // An image that cannot be pulled fails the execution with the reason.
    let (_, job) = run(&s, "unreachable", "");
    assert_eq!(job["status"]["phase"], "Failed");
    let reason = job["status"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("ErrImagePull") && reason.contains("127.0.0.1:9"),
        "{reason}"
    );

    // One pull served every run; the pull's progress is in the first execution's logs.
    let pulled = s.json(&["get", "pulled-images", "-o", "json"]);
    let pulled = pulled.as_array().unwrap();
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(
        pulled[0]["references"],
        serde_json::json!(["alpine:latest"])
    );
    assert_eq!(pulled[0]["layers"].as_array().unwrap().len(), 2);
    assert!(
        pulled[0]["unpackedBytes"].as_u64().unwrap() > 500_000,
        "busybox"
    );
    let table = s.ok(&["get", "pulled-images"]);
    assert!(
        table.contains("alpine:latest") && table.contains("1.9Mi"),
        "{table}"
    );
    assert!(s.containers().is_empty(), "every container was deleted");
}

#[test]
fn cancel_deadline_and_gc_leave_no_container_behind() {
    let hub = ImageRegistry::start();
    let s = server(&hub);
    let file = s.dir.path().join("sleepers.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: sleeper}
spec:
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: main, image: alpine:latest, command: [sh, -c, 'echo started; sleep 31337']}
---
apiVersion: dispatch.dev/v1
kind: JobTemplate
metadata: {name: late}
spec:
  jobTemplate:
    spec:
      activeDeadlineSeconds: 1
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: main, image: alpine:latest, command: [sleep, "31338"]}
"#,
    )
    .unwrap();
    s.ok(&["apply", "-f", file.to_str().unwrap()]);

    let started: Value = serde_json::from_str(&s.ok(&["execute", "sleeper"])).unwrap();
    let uuid = started["uuid"].as_str().unwrap().to_string();
    eventually("the sleeper to start", || {
        s.ok(&["logs", "jobexecution", &uuid])
            .contains("started")
            .then_some(())
    });
    assert!(!s.containers().is_empty());
    assert!(!processes_mentioning("sleep 31337").is_empty());
    s.ok(&["cancel", "jobexecution", &uuid]);
    eventually("the cancelled container to go", || {
        (s.containers().is_empty() && processes_mentioning("sleep 31337").is_empty()).then_some(())
    });

    let (_, job) = run(&s, "late", "");
    assert!(
        job["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("DeadlineExceeded"),
        "{job}"
    );
    eventually("the late container to go", || {
        (s.containers().is_empty() && processes_mentioning("sleep 31338").is_empty()).then_some(())
    });

    // gc keeps an image that a template names; once none does, it goes with its layers.
    let gc = s.json(&["gc", "--grace", "0s", "-o", "json"]);
    assert!(!gc.to_string().contains("pulled-image"), "{gc}");
    assert_eq!(
        s.json(&["get", "pulled-images", "-o", "json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    for t in [
        "defaults",
        "probe",
        "echo",
        "fails",
        "hungry",
        "on-host",
        "unreachable",
        "sleeper",
        "late",
    ] {
        s.ok(&["delete", "jobtemplate", t]);
    }
    let gc = s.json(&["gc", "--grace", "0s", "-o", "json"]);
    let removed: Vec<&str> = gc["removed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["what"].as_str())
        .collect();
    assert_eq!(
        removed.iter().filter(|w| **w == "pulled-image").count(),
        1,
        "{gc}"
    );
    assert_eq!(
        removed.iter().filter(|w| **w == "image-layer").count(),
        2,
        "{gc}"
    );
    assert_eq!(
        s.json(&["get", "pulled-images", "-o", "json"]),
        serde_json::json!([])
    );
    let left = std::fs::read_dir(s.dir.path().join("data/images/rootfs"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

#[test]
fn a_server_killed_with_a_container_running_reaps_it_on_restart() {
    let hub = ImageRegistry::start();
    let s = server(&hub);
    let file = s.dir.path().join("sleeper.yaml");
    std::fs::write(
        &file,
        "apiVersion: dispatch.dev/v1\nkind: JobTemplate\nmetadata: {name: sleeper}\nspec:\n  jobTemplate:\n    spec:\n      backoffLimit: 0\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n          - {name: main, image: alpine:latest, command: [sh, -c, 'echo started; sleep 31339']}\n",
    )
    .unwrap();
    s.ok(&["apply", "-f", file.to_str().unwrap()]);
    let started: Value = serde_json::from_str(&s.ok(&["execute", "sleeper"])).unwrap();
    let uuid = started["uuid"].as_str().unwrap().to_string();
    eventually("the sleeper to start", || {
        s.ok(&["logs", "jobexecution", &uuid])
            .contains("started")
            .then_some(())
    });
    let dir = s.kill9();
    assert!(
        !processes_mentioning("sleep 31339").is_empty(),
        "the container outlives a server killed with -9"
    );
    let s = ServerProc::start_with(dir, &[&hub.mirror_flag()]);
    // The restart deletes what the dead server left, then runs the execution again (it was
    // Active: adopted as after any crash).
    eventually("the orphan container to go", || {
        processes_mentioning("sleep 31339")
            .iter()
            .all(|p| !p.contains("sleep 31339"))
            .then_some(())
    });
    // Its attempt died with the server: with backoffLimit 0 the execution failed.
    let job = eventually("the execution to end", || {
        let job = s.json(&["get", "jobexecution", &uuid, "-o", "json"]);
        (job["status"]["phase"] == "Failed").then_some(job)
    });
    assert_eq!(job["status"]["attempts"], 1, "{job}");
}

/// An exec handler: the payload on stdin, the answer on stdout, logs on stderr.
const ECHO_EXEC: &str = r#"#!/usr/bin/python3
import json, os, sys
payload = json.load(sys.stdin)
print('exec log line', file=sys.stderr)
print(json.dumps({'got': payload, 'context': 'DISPATCH_CONTEXT' in os.environ,
                  'os': open('/etc/os-release').read().strip()}))
"#;

#[test]
fn a_function_with_isolation_container_runs_in_its_base_image() {
    let hub = ImageRegistry::start();
    let base = hub.push_python();
    let insecure = format!("--insecure-registry={}", hub.host);
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &[&insecure]);
    s.ok(&["create", "base-image", "py", &base, "--language", "python3"]);
    s.ok(&["create", "image", "py", "py", "--wait"]);
    let code = s.dir.path().join("where.py");
    std::fs::write(
        &code,
        "import os, sys\n\
         def handle(context, payload):\n\
         \x20   print('hello from the container')\n\
         \x20   return {'uid': os.getuid(), 'os': open('/etc/os-release').read().strip(),\n\
         \x20           'root': sorted(os.listdir('/')), 'cwd': os.getcwd(),\n\
         \x20           'env': os.environ.get('GREETING'), 'payload': payload}\n",
    )
    .unwrap();
    s.ok(&[
        "create",
        "function",
        "--image",
        "py",
        "where",
        code.to_str().unwrap(),
        "--isolation",
        "container",
        "--env",
        "GREETING=hi",
        "--wait",
    ]);
    let f = s.json(&["get", "function", "where", "-o", "json"]);
    assert_eq!(f["status"]["phase"], "READY", "{f}");
    assert_eq!(f["spec"]["isolation"], "container");
    let (ok, out) = s.exec("where", r#"{"n": 1}"#);
    assert!(ok, "{out}");
    let v = &out["payload"];
    assert_eq!(v["os"], "ID=python-test", "the base image's files: {out}");
    assert_eq!(v["cwd"], "/function");
    assert_eq!(v["env"], "hi");
    assert_eq!(v["payload"]["n"], 1);
    assert!(v["uid"].as_u64().unwrap() >= 2_000_000_000, "{out}");
    let root: Vec<&str> = v["root"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        root.contains(&"function") && root.contains(&"dispatch"),
        "{root:?}"
    );
    assert!(
        !root.contains(&"work") && !root.contains(&"home"),
        "nothing of the host: {root:?}"
    );
    assert!(
        out["context"]["logs"]["stdout"]
            .as_array()
            .unwrap()
            .contains(&"hello from the container".into()),
        "{out}"
    );
    // An exec handler in the same image: one container per call, the payload on its stdin,
    // the context in DISPATCH_CONTEXT, its stderr as logs.
    s.ok(&["create", "base-image", "pyx", &base, "--language", "exec"]);
    s.ok(&["create", "image", "pyx", "pyx", "--wait"]);
    let dir = s.dir.path().join("exec");
    std::fs::create_dir(&dir).unwrap();
    let prog = dir.join("echo.py");
    std::fs::write(&prog, ECHO_EXEC).unwrap();
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.ok(&[
        "create",
        "function",
        "--image",
        "pyx",
        "echo",
        dir.to_str().unwrap(),
        "--handler",
        "echo.py",
        "--isolation",
        "container",
        "--wait",
    ]);
    let (ok, out) = s.exec("echo", r#"{"n": 2}"#);
    assert!(ok, "{out}");
    assert_eq!(out["payload"]["got"]["n"], 2, "{out}");
    assert_eq!(out["payload"]["context"], true);
    assert_eq!(out["payload"]["os"], "ID=python-test");
    assert!(
        out["context"]["logs"]["stderr"]
            .as_array()
            .unwrap()
            .contains(&"exec log line".into()),
        "{out}"
    );
    s.ok(&["delete", "function", "echo"]);

    // An image with dependencies: installed for the base image's Python and platform (as in
    // the Kubernetes image), shown read-only at /dispatch/deps/python.
    let req = examples().join("python3-deps/requirements.txt");
    s.ok(&[
        "create",
        "image",
        "py-six",
        "py",
        "--runtime-deps",
        req.to_str().unwrap(),
        "--wait",
    ]);
    let six = s.dir.path().join("six_user.py");
    std::fs::write(
        &six,
        "import six
def handle(context, payload):
    return {'six': six.__version__, 'at': six.__file__}
",
    )
    .unwrap();
    s.ok(&[
        "create",
        "function",
        "--image",
        "py-six",
        "six-user",
        six.to_str().unwrap(),
        "--isolation",
        "container",
        "--wait",
    ]);
    let (ok, out) = s.exec("six-user", "null");
    assert!(ok, "{out}");
    assert_eq!(out["payload"]["six"], "1.16.0", "{out}");
    assert!(
        out["payload"]["at"]
            .as_str()
            .unwrap()
            .starts_with("/dispatch/deps/python/"),
        "{out}"
    );
    s.ok(&["delete", "function", "six-user"]);

    // Its warm worker is a container; removing the function removes it.
    assert!(!s.containers().is_empty());
    s.ok(&["delete", "function", "where"]);
    eventually("the function's containers to go", || {
        s.containers().is_empty().then_some(())
    });
}

/// The Node bootstrap in a container: a Node base image (this host's `node`), its handler's
/// answer, the image's files and an unprivileged identity.
#[test]
fn a_node_function_runs_in_its_node_base_image() {
    let hub = ImageRegistry::start();
    let base = hub.push_node();
    let insecure = format!("--insecure-registry={}", hub.host);
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &[&insecure]);
    s.ok(&[
        "create",
        "base-image",
        "node",
        &base,
        "--language",
        "nodejs",
    ]);
    s.ok(&["create", "image", "node", "node", "--wait"]);
    let code = s.dir.path().join("where.js");
    std::fs::write(
        &code,
        "const fs = require('fs');\n\
         module.exports = async (context, payload) => {\n\
         \x20 console.log('hello from node');\n\
         \x20 return {uid: process.getuid(), os: fs.readFileSync('/etc/os-release', 'utf8').trim(),\n\
         \x20         cwd: process.cwd(), root: fs.readdirSync('/'), payload};\n\
         };\n",
    )
    .unwrap();
    s.ok(&[
        "create",
        "function",
        "--image",
        "node",
        "where",
        code.to_str().unwrap(),
        "--isolation",
        "container",
        "--wait",
    ]);
    let (ok, out) = s.exec("where", r#"{"n": 2}"#);
    assert!(ok, "{out}");
    let v = &out["payload"];
    assert_eq!(v["os"], "ID=node-test", "the base image's files: {out}");
    assert_eq!(v["cwd"], "/function");
    assert_eq!(v["payload"]["n"], 2);
    assert!(v["uid"].as_u64().unwrap() >= 2_000_000_000, "{out}");
    assert!(
        !v["root"].as_array().unwrap().contains(&"work".into()),
        "nothing of the host: {out}"
    );
    assert!(
        out["context"]["logs"]["stdout"]
            .as_array()
            .unwrap()
            .contains(&"hello from node".into()),
        "{out}"
    );
    assert!(!s.containers().is_empty(), "its warm worker is a container");
}

#[test]
fn a_manifest_list_runs_this_platform_and_big_images_are_refused() {
    let hub = ImageRegistry::start();
    let multi = hub.push_index();
    let insecure = format!("--insecure-registry={}", hub.host);
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &[&insecure]);
    let file = s.dir.path().join("t.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: dispatch.dev/v1\nkind: JobTemplate\nmetadata: {{name: multi}}\nspec:\n  jobTemplate:\n    spec:\n      backoffLimit: 0\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n          - {{name: main, image: \"{multi}\"}}\n"
        ),
    )
    .unwrap();
    s.ok(&["apply", "-f", file.to_str().unwrap()]);
    let (logs, job) = run(&s, "multi", "");
    let this = match std::env::consts::ARCH {
        "aarch64" => "ID=linux-arm64",
        _ => "ID=linux-amd64",
    };
    assert!(logs.contains(this), "{logs}");
    assert_eq!(job["status"]["phase"], "Completed");

    // A limit smaller than busybox's layer (~1 MiB compressed): alpine:latest is refused,
    // nothing downloaded.
    drop(s);
    let s = ServerProc::start_with(
        tempfile::tempdir().unwrap(),
        &[&hub.mirror_flag(), "--max-image-size=512Ki"],
    );
    let file = s.dir.path().join("big.yaml");
    std::fs::write(&file, TEMPLATES).unwrap();
    s.ok(&["apply", "-f", file.to_str().unwrap()]);
    let (_, job) = run(&s, "defaults", "");
    let reason = job["status"]["reason"].as_str().unwrap();
    assert!(reason.contains("--max-image-size"), "{reason}");
    assert_eq!(
        s.json(&["get", "pulled-images", "-o", "json"]),
        serde_json::json!([])
    );
    let blobs = std::fs::read_dir(s.dir.path().join("data/images/blobs/sha256")).unwrap();
    assert_eq!(blobs.count(), 0, "no layer downloaded");
}
