//! The real `dispatch` binary against a real `dispatch server` on random loopback ports.

mod support;

use std::io::Write;
use std::process::Stdio;

use assert_cmd::cargo::CommandCargoExt as _;
use serde_json::Value;
use support::*;

#[test]
fn seed_quickstart_flow_and_graceful_shutdown() {
    let s = ServerProc::start();
    let hello = examples().join("python3/hello.py");
    assert!(
        s.ok(&[
            "create",
            "base-image",
            "python3-base",
            "dispatchframework/python3-base:0.0.13-knative"
        ])
        .contains("base-image/python3-base created")
    );
    // Without a terminal (CI logs) --wait prints a line per step and one for the outcome.
    let out = s
        .cli()
        .args(["create", "image", "python3", "python3-base", "--wait"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    let last = log.lines().last().unwrap_or("");
    assert!(
        last.starts_with("image python3 READY ("),
        "the outcome is the last line: {log}"
    );
    // The embedded backend says that it runs the host's interpreter, not the image: at create
    // time and in the base image's status (a NOTE column).
    let out = s
        .cli()
        .args(["create", "base-image", "node-base", "node:20-slim"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "note: this server's embedded backend runs base images on the host's interpreter"
        ),
        "{out:?}"
    );
    let table = s.ok(&["get", "base-images"]);
    assert!(
        table.contains("NOTE")
            && table.contains("the embedded backend runs this host's python3; the image dispatchframework/python3-base:0.0.13-knative is used by the Kubernetes backend"),
        "{table}"
    );
    // The seed's argument order.
    s.ok(&[
        "create",
        "function",
        "--image",
        "python3",
        "hello",
        hello.to_str().unwrap(),
        "--wait",
    ]);
    let table = s.ok(&["get", "functions"]);
    assert!(
        table.lines().next().unwrap().contains("NAME") && table.contains("CREATED DATE"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("hello") && l.contains("READY")),
        "{table}"
    );
    assert!(
        s.ok(&["get", "function", "hello", "-o", "yaml"])
            .contains("phase: READY")
    );

    let (ok, env) = s.exec("hello", r#"{"name": "user"}"#);
    assert!(ok);
    assert_eq!(env["payload"]["myField"], "Hello, user from Nowhere");
    assert_eq!(
        env["context"]["logs"]["stdout"][0],
        "messages to stdout show up in logs"
    );
    assert_eq!(env["context"]["error"], Value::Null);
    let (_, env) = s.exec("hello", "");
    assert_eq!(
        env["payload"]["myField"], "Hello, Noone from Nowhere",
        "empty stdin = null payload"
    );
    let names = s.ok(&["get", "runs", "--function", "hello", "-o", "name"]);
    assert!(
        names.lines().count() >= 2 && names.lines().all(|l| l.starts_with("run/")),
        "{names}"
    );

    let runs = s.json(&["get", "runs", "--function", "hello", "-o", "json"]);
    assert_eq!(runs.as_array().unwrap().len(), 2);
    let id = runs[1]["metadata"]["name"].as_str().unwrap().to_string();
    // A run prints as resources do: apiVersion, kind, metadata, spec (what was asked),
    // status (what happened).
    let run = s.json(&["get", "run", &id, "-o", "json"]);
    assert_eq!(
        (
            run["kind"].as_str(),
            run["metadata"]["name"].as_str(),
            run["status"]["phase"].as_str(),
            run["spec"]["input"]["name"].as_str()
        ),
        (
            Some("Run"),
            Some(id.as_str()),
            Some("SUCCEEDED"),
            Some("user")
        )
    );
    assert!(run["status"]["cold"].is_boolean() && run["status"]["timings"]["execMs"].is_u64());
    assert_eq!(
        s.ok(&["logs", "run", &id]),
        "messages to stdout show up in logs\n"
    );
    // A function's last runs' lines, oldest first, each after its run id.
    let newer = runs[0]["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        s.ok(&["logs", "function", "hello"]),
        format!(
            "{id}  messages to stdout show up in logs\n{newer}  messages to stdout show up in logs\n"
        )
    );
    let last = s.ok(&["logs", "function", "hello", "--runs", "1", "-o", "json"]);
    let last: Value = serde_json::from_str(last.trim()).unwrap();
    assert_eq!(
        last,
        serde_json::json!({"run": newer, "stream": "stdout", "line": "messages to stdout show up in logs"})
    );
    assert!(s.fails(&["logs", "function", "nobody"]).contains("nobody"));
    assert!(s.ok(&["get", "runs"]).contains("SUCCEEDED"));

    // New source → new digest.
    let before = s.json(&["get", "function", "hello", "-o", "json"])["status"]["digest"].clone();
    let v2 = s.dir.path().join("hello.py");
    std::fs::write(
        &v2,
        std::fs::read_to_string(&hello)
            .unwrap()
            .replace("Hello,", "Hi,"),
    )
    .unwrap();
    assert!(
        s.ok(&[
            "update",
            "function",
            "hello",
            v2.to_str().unwrap(),
            "--wait"
        ])
        .contains("function/hello updated")
    );
    let after = s.json(&["get", "function", "hello", "-o", "json"]);
    assert_ne!(after["status"]["digest"], before);
    assert_eq!(
        s.exec("hello", r#"{"name": "v2"}"#).1["payload"]["myField"],
        "Hi, v2 from Nowhere"
    );

    s.ok(&[
        "create",
        "endpoint",
        "get-hello",
        "hello",
        "--method",
        "GET",
        "--method",
        "POST",
        "--path",
        "/hello",
    ]);
    let (code, body) = http_get(s.gateway, "/hello?name=Jon").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Hi, Jon from Nowhere"), "{body}");
    assert!(
        s.fails(&["delete", "function", "hello"])
            .contains("used by endpoints get-hello")
    );
    assert!(
        s.fails(&["delete", "image", "python3"])
            .contains("used by functions hello")
    );
    // describe: status, spec and what is around the function.
    let d = s.ok(&["describe", "function", "hello"]);
    for want in [
        "Name:               hello",
        "Phase:              READY",
        "\n  image: python3\n",
        "Endpoints:          get-hello",
        "Subscriptions:      <none>",
        "async queue: 0 of",
        "Recent runs:\n  ",
        "SUCCEEDED",
    ] {
        assert!(d.contains(want), "{want:?} in {d}");
    }
    assert!(
        s.ok(&["describe", "image", "python3"])
            .contains("Functions:          hello")
    );
    assert!(
        s.fails(&["describe", "widget", "x"])
            .contains("unknown kind \"widget\"")
    );

    // A warm worker is running; SIGTERM stops the server and every worker.
    let marker = s
        .dir
        .path()
        .join("data")
        .join("runtimes")
        .display()
        .to_string();
    assert!(
        !processes_mentioning(&marker).is_empty(),
        "a warm worker should be running"
    );
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    eventually("every worker to exit", || {
        processes_mentioning(&marker).is_empty().then_some(())
    });
}

/// The data dir and its secrets are the server's alone (README "Security"): 0700, the
/// database, its WAL and the key files 0600; a data dir others can write is refused.
#[test]
fn the_data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let s = ServerProc::start();
    // A write, so that the WAL exists.
    s.ok(&["create", "namespace", "team-x"]);
    let data = s.dir.path().join("data");
    assert_eq!(mode(&data), 0o700, "{}", data.display());
    for f in [
        "dispatch.db",
        "dispatch.db-wal",
        "dispatch.db-shm",
        "history.db",
        "history.db-wal",
        "admin-token",
        "secret.key",
    ] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    drop(s);
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (api, gw) = free_ports();
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args(["server", "--data-dir"])
        .arg(&open)
        .args(["--api-addr", &format!("127.0.0.1:{api}")])
        .args(["--gateway-addr", &format!("127.0.0.1:{gw}")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("writable by other users") && err.contains("chmod 700"),
        "{err}"
    );
    assert!(!open.join("dispatch.db").exists(), "nothing was created");
    // An OTLP endpoint that is not an http(s) URL is refused before anything starts.
    let fresh = dir.path().join("fresh");
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args(["server", "--otlp-endpoint", "collector:4318", "--data-dir"])
        .arg(&fresh)
        .args(["--api-addr", &format!("127.0.0.1:{api}")])
        .args(["--gateway-addr", &format!("127.0.0.1:{gw}")])
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--otlp-endpoint") && err.contains("http://otel-collector:4318"),
        "{err}"
    );
    assert!(!fresh.join("dispatch.db").exists(), "nothing was created");
}

/// `--log-format json` makes every line of the server's stderr a JSON object (the start-up
/// words too), with no colour codes in a file; `--access-log` adds one line per request with
/// its edge, method, route template, status, duration, run id and the client's trace id; a
/// method a route does not take is answered with the JSON error shape and `Allow`.
#[test]
fn server_logs_as_json_with_an_access_log_and_405_as_json() {
    let (s, log) = ServerProc::start_logged(&["--log-format", "json", "--access-log"]);
    let seed = examples().join("seed.yaml");
    s.ok(&["apply", "-f", seed.to_str().unwrap()]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let run_id = eventually("hello to answer through the gateway", || {
        let (code, head, _) = http(
            s.gateway,
            "GET",
            "/hello?secret=hunter2",
            &[("traceparent", &traceparent)],
            "",
        )?;
        (code == 200).then_some(())?;
        head.lines()
            .find_map(|l| l.strip_prefix("x-dispatch-run-id: "))
            .map(|v| v.trim().to_string())
    });
    for (port, method, path, allow) in [
        (s.api, "PATCH", "/v1/version", "allow: get,head"),
        (
            s.gateway,
            "GET",
            "/execute/default/hello",
            "allow: put,post",
        ),
    ] {
        let bearer = format!("Bearer {}", s.token);
        let (code, head, body) =
            http(port, method, path, &[("authorization", &bearer)], "").unwrap();
        assert_eq!(code, 405, "{head}\n{body}");
        assert!(head.contains(allow), "{head}");
        let v: Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(v["error"]["code"], "MethodNotAllowed", "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains(method) && m.contains(path) && m.contains("Allow"),
            "{m}"
        );
    }
    // The access lines are written as the requests end: poll the file for the last one.
    let lines = eventually("the access lines of every request", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("/execute/{ns}/{name}").then_some(text)
    });
    assert!(
        !lines.contains('\u{1b}'),
        "no colour codes in a file: {lines}"
    );
    let objects: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    assert!(
        objects.iter().any(|o| o["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("dispatch server: api"))),
        "the start-up words are JSON events too: {lines}"
    );
    let access: Vec<&Value> = objects
        .iter()
        .filter(|o| o["target"] == "dispatch::access")
        .collect();
    let call = access
        .iter()
        // (the helper lower-cases the head it returns)
        .find(|o| {
            o["run_id"]
                .as_str()
                .is_some_and(|r| r.eq_ignore_ascii_case(&run_id))
        })
        .unwrap_or_else(|| panic!("no access line with run {run_id}: {lines}"));
    assert_eq!(call["edge"], "gateway");
    assert_eq!(call["method"], "GET");
    assert_eq!(call["route"], "/hello", "the path without its query");
    assert_eq!(call["status"], 200);
    assert_eq!(call["trace_id"], trace);
    assert!(
        call["duration_ms"].as_f64().is_some_and(|d| d > 0.0),
        "{call}"
    );
    assert!(!lines.contains("hunter2"), "queries are not logged");
    let refused = access
        .iter()
        .find(|o| o["route"] == "/v1/version")
        .expect("the API's 405");
    assert_eq!(refused["edge"], "api");
    assert_eq!(refused["status"], 405);
    assert!(refused.get("trace_id").is_none(), "{refused}");
    // The API logs its route templates, not the names in them.
    s.ok(&["get", "function", "hello"]);
    eventually("the API's templated route", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("\"route\":\"/v1/namespaces/{ns}/{kind}/{name}\"")
            .then_some(())
    });
    // Text, the default, has no colour codes either when stderr is not a terminal.
    let (_t, log) = ServerProc::start_logged(&[]);
    let text = eventually("the text log's ready line", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("dispatch server ready").then_some(text)
    });
    assert!(!text.contains('\u{1b}'), "{text:?}");
}

#[test]
fn apply_and_delete_manifests() {
    let s = ServerProc::start();
    let seed = examples().join("seed.yaml");
    let seed = seed.to_str().unwrap();
    let out = s.ok(&["apply", "-f", seed]);
    assert_eq!(
        out,
        "image/python3 created\nfunction/hello created\nendpoint/get-hello created\n"
    );
    let out = s.ok(&["apply", "-f", seed]);
    assert_eq!(
        out,
        "image/python3 unchanged\nfunction/hello unchanged\nendpoint/get-hello unchanged\n"
    );
    // -o name and -o json for scripts: kind/name lines; the objects as stored.
    assert_eq!(
        s.ok(&["apply", "-f", seed, "-o", "name"]),
        "image/python3\nfunction/hello\nendpoint/get-hello\n"
    );
    let applied = s.json(&["apply", "-f", seed, "-o", "json"]);
    let kinds: Vec<&str> = applied
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Image", "Function", "Endpoint"]);
    let created = s.json(&[
        "create", "endpoint", "other", "hello", "--path", "/other", "-o", "json",
    ]);
    assert_eq!(created["metadata"]["name"], "other", "one object for one");
    assert_eq!(
        s.ok(&["delete", "endpoint", "other"]),
        "endpoint/other deleted\n"
    );
    // A WebSocket endpoint from the flags, shown as one; its settings checked by the API.
    let ws = s.json(&[
        "create",
        "endpoint",
        "chat",
        "hello",
        "--path",
        "/chat",
        "--protocol",
        "websocket",
        "--session",
        "--idle-timeout",
        "30s",
        "-o",
        "json",
    ]);
    assert_eq!(
        (
            &ws["spec"]["protocol"],
            &ws["spec"]["session"],
            &ws["spec"]["idleTimeout"]
        ),
        (
            &serde_json::json!("websocket"),
            &serde_json::json!(true),
            &serde_json::json!("30s")
        )
    );
    let listed = s.ok(&["get", "endpoints"]);
    assert!(listed.contains("GET (websocket session)"), "{listed}");
    let refused = s.fails(&[
        "create",
        "endpoint",
        "late",
        "hello",
        "--path",
        "/late",
        "--max-duration",
        "1h",
    ]);
    assert!(refused.contains("--protocol websocket"), "{refused}");
    s.ok(&["delete", "endpoint", "chat"]);
    // kubectl habits: -o name, --no-headers, -l (the API filters by labels).
    assert_eq!(
        s.ok(&["get", "functions", "-o", "name"]),
        "function/hello\n"
    );
    // -o jsonpath=TEMPLATE as kubectl reads it: a list is {"kind":"List","items":[…]}.
    assert_eq!(
        s.ok(&[
            "get",
            "functions",
            "-o",
            "jsonpath={.items[*].metadata.name}"
        ]),
        "hello"
    );
    assert_eq!(
        s.ok(&[
            "get",
            "functions",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.kind}{"\n"}{end}"#,
        ]),
        "hello=Function\n"
    );
    assert_eq!(
        s.ok(&["get", "function", "hello", "-o", "jsonpath={.spec.image}"]),
        "python3"
    );
    assert!(
        s.fails(&["get", "functions", "-o", "jsonpath={range .items[*]}"])
            .contains("has no {end}")
    );
    let wide = s.ok(&["get", "functions", "-o", "wide"]);
    let header = wide.lines().next().unwrap_or("");
    assert!(
        header.contains("CREATED DATE") && header.contains("AGE") && header.contains("LABELS"),
        "{wide}"
    );
    assert!(
        s.fails(&["get", "runs", "-o", "wide"])
            .contains("-o wide is for tables of resources")
    );
    let bare = s.ok(&["get", "functions", "--no-headers"]);
    assert!(
        bare.starts_with(" hello") && !bare.contains("NAME"),
        "{bare}"
    );
    assert!(
        s.fails(&["get", "functions", "-l", "team"])
            .contains("is not key=value")
    );
    assert_eq!(
        s.ok(&["get", "functions", "-l", "nobody=here", "-o", "name"]),
        ""
    );
    let mut ep = s.json(&["get", "endpoint", "get-hello", "-o", "json"]);
    ep["metadata"]["labels"] = serde_json::json!({"team": "web"});
    let labelled = s.dir.path().join("labelled.json");
    std::fs::write(&labelled, ep.to_string()).unwrap();
    s.ok(&["apply", "-f", labelled.to_str().unwrap()]);
    assert_eq!(
        s.ok(&["get", "endpoints", "-l", "team=web", "-o", "name"]),
        "endpoint/get-hello\n"
    );
    let v = s.json(&["version", "-o", "json"]);
    assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["server"]["backend"].is_string(), "{v}");
    assert!(s.fails(&["create", "-f", seed]).contains("already exists"));
    eventually("hello to be READY", || {
        (s.json(&["get", "function", "hello", "-o", "json"])["status"]["phase"] == "READY")
            .then_some(())
    });
    assert_eq!(
        s.exec("hello", r#"{"name":"m"}"#).1["payload"]["myField"],
        "Hello, m from Nowhere"
    );
    let out = s.ok(&["delete", "-f", seed]);
    assert_eq!(
        out,
        "endpoint/get-hello deleted\nfunction/hello deleted\nimage/python3 deleted\n"
    );
    assert_eq!(
        s.json(&["get", "functions", "-o", "json"]),
        serde_json::json!([])
    );

    // JSON manifests from stdin work too; a bad document stops with its position.
    let mut child = s
        .cli()
        .args(["create", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"[{"apiVersion":"dispatch.dev/v1","kind":"Image","metadata":{"name":"img"},"spec":{"baseImage":"nodejs"}},{"apiVersion":"dispatch.dev/v1","kind":"Image","metadata":{"name":"Bad"},"spec":{"baseImage":"nodejs"}}]"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "image/img created\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("document 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let s = ServerProc::start();
    let hello = examples().join("python3/hello.py");
    let hello = hello.to_str().unwrap();
    assert!(
        s.fails(&["create", "function", "hello", hello, "--image", "nope"])
            .contains("image \"nope\" not found")
    );
    assert!(
        s.fails(&["create", "function", "Hello", hello, "--image", "python3"])
            .contains("function name \"Hello\" is not valid: use 1-63 lower-case")
    );
    assert!(
        s.fails(&[
            "create",
            "function",
            "hello",
            "/no/such/file.py",
            "--image",
            "python3"
        ])
        .contains("/no/such/file.py")
    );
    assert!(
        s.fails(&["create", "base-image", "b", "example.com/custom:1"])
            .contains("--language")
    );
    assert!(
        s.fails(&["get", "widgets"])
            .contains("unknown kind \"widgets\"")
    );
    assert!(
        s.fails(&["get", "function", "ghost"])
            .contains("function \"ghost\" not found")
    );
    assert!(
        s.fails(&["exec", "hello", "--input", "{nope"])
            .contains("input is not valid JSON")
    );
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let bad = s.dir.path().join("bad.py");
    std::fs::write(
        &bad,
        "def handle(context, payload):\n    raise RuntimeError('boom')\n",
    )
    .unwrap();
    assert!(
        s.fails(&[
            "create",
            "function",
            "bad",
            bad.to_str().unwrap(),
            "--image",
            "py",
            "--handler",
            "nothere.handle"
        ])
        .contains("no module nothere")
    );
    s.ok(&[
        "create",
        "function",
        "bad",
        bad.to_str().unwrap(),
        "--image",
        "py",
        "--wait",
    ]);
    let (ok, env) = s.exec("bad", "{}");
    assert!(!ok, "exec exits non-zero when context.error is set");
    assert_eq!(env["context"]["error"]["type"], "FunctionError");
    assert_eq!(
        s.json(&["get", "functions", "-o", "json"])
            .as_array()
            .unwrap()
            .len(),
        1,
        "failed creates stored nothing"
    );

    // Unreachable server.
    let port = free_port();
    let out = s
        .cli()
        .args(["get", "functions"])
        .env("DISPATCH_SERVER", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the dispatch server"));
}

#[test]
fn config_contexts_version_and_completion() {
    let s = ServerProc::start();
    let cfg = s.dir.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"current":"local","contexts":{{"local":{{"host":"127.0.0.1","port":{},"scheme":"http","insecure":false,"namespace":"team-a","token":""}}}}}}"#, s.api),
    )
    .unwrap();
    s.ok(&["create", "namespace", "team-a"]);
    let out = s
        .cli()
        .env_remove("DISPATCH_SERVER")
        .args(["create", "image", "py", "python3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It went to the context's namespace.
    assert_eq!(
        s.json(&["get", "images", "-n", "team-a", "-o", "json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.json(&["get", "images", "-n", "default", "-o", "json"]),
        serde_json::json!([])
    );
    std::fs::write(&cfg, "{broken").unwrap();
    assert!(s.fails(&["get", "images"]).contains("config file"));
    std::fs::remove_file(&cfg).unwrap();
    assert!(s.ok(&["version"]).contains("embedded backend"));
    for shell in ["bash", "zsh", "fish"] {
        let script = s.ok(&["completion", shell]);
        assert!(script.contains("__complete-names"), "{shell}: {script}");
    }
    // Names come from the server where a command takes KIND NAME.
    s.ok(&["create", "image", "py", "python3"]);
    assert_eq!(s.ok(&["__complete-names", "images"]), "py\n");
    assert_eq!(s.ok(&["__complete-names", "audit"]), "");
    // Without a server to ask: nothing, and no error a shell would print.
    let out = s
        .cli()
        .env("DISPATCH_SERVER", "http://127.0.0.1:9")
        .args(["__complete-names", "images"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty());
    // bash, driven as it completes `dispatch get image p<TAB>`.
    let dir = assert_cmd::cargo::cargo_bin("dispatch");
    let path = format!(
        "{}:{}",
        dir.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = s.dir.path().join("completion.bash");
    std::fs::write(&script, s.ok(&["completion", "bash"])).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(dispatch get image p); COMP_CWORD=3; _dispatch_with_names; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .env("PATH", path)
        .env("DISPATCH_SERVER", format!("http://127.0.0.1:{}", s.api))
        .env("DISPATCH_CONFIG", s.dir.path().join("config.json"))
        .env("DISPATCH_TOKEN", &s.token)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "py\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn images_with_dependencies_logs_and_gc() {
    let s = ServerProc::start();
    let deps = examples().join("python3-deps");
    let manifest = deps.join("deps.yaml");
    let out = s.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert_eq!(
        out,
        "image/python3-six created\nfunction/uses-six created\n"
    );
    eventually("uses-six to be READY", || {
        let f = s.json(&["get", "function", "uses-six", "-o", "json"]);
        assert_ne!(f["status"]["phase"], "ERROR", "{f}");
        (f["status"]["phase"] == "READY").then_some(())
    });
    let out = s.ok(&["exec", "uses-six", "--input", r#"{"text": "hi"}"#]);
    let env: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        env["payload"],
        serde_json::json!({"six": "1.16.0", "text": "hi"})
    );
    assert!(s.ok(&["logs", "image", "python3-six"]).contains("six"));
    assert_eq!(
        s.ok(&["apply", "-f", manifest.to_str().unwrap()]),
        "image/python3-six unchanged\nfunction/uses-six unchanged\n"
    );

    // Same inputs from the flag: same digest, READY at once from the existing build.
    let req = deps.join("requirements.txt");
    s.ok(&[
        "create",
        "image",
        "again",
        "python3",
        "--runtime-deps",
        req.to_str().unwrap(),
        "--wait",
    ]);
    let a = s.json(&["get", "image", "python3-six", "-o", "json"]);
    let b = s.json(&["get", "image", "again", "-o", "json"]);
    assert_eq!(a["status"]["digest"], b["status"]["digest"]);

    let bad = s.dir.path().join("requirements.txt");
    std::fs::write(&bad, "no-such-package-dispatch-test-0x3c==0.1\n").unwrap();
    let err = s.fails(&[
        "create",
        "image",
        "bad",
        "python3",
        "--runtime-deps",
        bad.to_str().unwrap(),
        "--wait",
    ]);
    assert!(
        err.contains("pip install failed") && err.contains("no-such-package-dispatch-test-0x3c"),
        "{err}"
    );
    assert!(
        s.fails(&[
            "create",
            "image",
            "sys",
            "python3",
            "--system-deps",
            "libpq"
        ])
        .contains("kubernetes backend")
    );
    assert!(
        s.fails(&[
            "create",
            "image",
            "x",
            "python3",
            "--index-url",
            "http://mirror"
        ])
        .contains("--runtime-deps")
    );

    let f = s.json(&["get", "function", "uses-six", "-o", "json"]);
    s.ok(&["delete", "-f", manifest.to_str().unwrap()]);
    let report = s.json(&["gc", "--grace", "0s", "-o", "json"]);
    let removed: Vec<(&str, &str)> = report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["what"].as_str().unwrap(), r["digest"].as_str().unwrap()))
        .collect();
    assert!(
        removed.contains(&("source-blob", f["spec"]["source"].as_str().unwrap())),
        "{removed:?}"
    );
    assert!(
        removed.contains(&("function-build", f["status"]["digest"].as_str().unwrap())),
        "{removed:?}"
    );
    assert!(
        !removed
            .iter()
            .any(|(w, d)| *w == "image-build" && *d == b["status"]["digest"].as_str().unwrap()),
        "image `again` still uses it"
    );
    assert!(s.ok(&["gc", "--grace", "0s"]).contains("0 removed"));
}

#[test]
fn async_runs_from_the_cli() {
    let s = ServerProc::start();
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let code = s.dir.path().join("job.py");
    std::fs::write(
        &code,
        "import select\ndef handle(context, payload):\n    if payload.get('hang'):\n        select.select([], [], [])  # until cancelled\n    print('working on', payload.get('name'))\n    if payload.get('fail'):\n        raise RuntimeError('always fails')\n    return {'done': payload.get('name')}\n",
    )
    .unwrap();
    s.ok(&[
        "create",
        "function",
        "job",
        code.to_str().unwrap(),
        "--image",
        "py",
        "--wait",
    ]);
    // Its own bound on queued runs, shown with what the queue holds and refused.
    s.ok(&["update", "function", "job", "--max-queued", "50"]);
    let shown = s.ok(&["get", "function", "job"]);
    assert!(
        shown.contains("async queue: 0 of 50 (maxQueued)"),
        "{shown}"
    );
    assert!(shown.contains("refused with 429"), "{shown}");
    let e = s.fails(&["update", "function", "job", "--max-queued", "0"]);
    assert!(e.contains("spec.maxQueued must be between 1"), "{e}");

    let accepted: Value =
        serde_json::from_str(&s.ok(&["exec", "job", "--async", "--input", r#"{"name": "a"}"#]))
            .unwrap();
    assert_eq!(accepted["status"], "QUEUED");
    let id = accepted["id"].as_str().unwrap().to_string();
    // --follow waits for the end and prints the logs.
    assert_eq!(s.ok(&["logs", "run", &id, "--follow"]), "working on a\n");
    let run = s.json(&["get", "run", &id, "-o", "json"]);
    assert_eq!(
        (
            run["status"]["phase"].as_str(),
            run["spec"]["async"].as_bool()
        ),
        (Some("SUCCEEDED"), Some(true))
    );
    assert_eq!(run["status"]["output"]["done"], "a");

    // Default retry policy: 3 attempts, then DEAD; visible with --status dead.
    let dead: Value =
        serde_json::from_str(&s.ok(&["exec", "job", "--async", "--input", r#"{"fail": true}"#]))
            .unwrap();
    let dead_id = dead["id"].as_str().unwrap().to_string();
    let out = s
        .cli()
        .args(["logs", "run", &dead_id, "--follow"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("attempt 3 failed: FunctionError: always fails")
    );
    let table = s.ok(&["get", "runs", "--status", "dead"]);
    assert!(
        table.contains(&dead_id) && table.contains("DEAD"),
        "{table}"
    );
    assert!(s.ok(&["runs", "redrive", &dead_id]).contains("queued"));
    let out = s
        .cli()
        .args(["logs", "run", &dead_id, "-f"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        s.json(&["get", "run", &dead_id, "-o", "json"])["status"]["attemptErrors"]
            .as_array()
            .unwrap()
            .len(),
        6
    );

    // Cancel a running run.
    let long: Value =
        serde_json::from_str(&s.ok(&["exec", "job", "--async", "--input", r#"{"hang": true}"#]))
            .unwrap();
    let long_id = long["id"].as_str().unwrap().to_string();
    eventually("the long run to be RUNNING", || {
        (s.json(&["get", "run", &long_id, "-o", "json"])["status"]["phase"] == "RUNNING")
            .then_some(())
    });
    assert_eq!(
        s.ok(&["cancel", "run", &long_id]),
        format!("run/{long_id} cancelled\n")
    );
    assert!(
        s.fails(&["cancel", "run", &long_id])
            .contains("already finished")
    );
    assert!(
        s.ok(&["runs", "purge", "--status", "dead"])
            .contains("1 runs deleted")
    );
    assert!(
        s.fails(&["runs", "purge", "--status", "queued"])
            .contains("only finished runs")
    );
    // Usage errors come from clap: exit 1 (as every failure) with the flag named.
    let out = s
        .cli()
        .args(["exec", "job", "--callback-url", "http://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--async"));
}

#[test]
fn run_history_pages_and_policies_from_the_cli() {
    let s = ServerProc::start();
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let code = s.dir.path().join("h.py");
    std::fs::write(&code, "def handle(context, payload):\n    return payload\n").unwrap();
    s.ok(&[
        "create",
        "function",
        "h",
        code.to_str().unwrap(),
        "--image",
        "py",
        "--wait",
    ]);
    for i in 0..7 {
        s.ok(&["exec", "h", "--input", &format!("{{\"i\": {i}}}")]);
    }
    let page = |after: Option<&str>| -> Vec<String> {
        let mut args = vec![
            "get",
            "runs",
            "--function",
            "h",
            "--limit",
            "3",
            "-o",
            "json",
        ];
        if let Some(a) = after {
            args.extend(["--after", a]);
        }
        s.json(&args)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut seen = page(None);
    let mut after = seen.last().cloned();
    while let Some(a) = after {
        let p = page(Some(&a));
        after = p.last().cloned();
        seen.extend(p);
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (7, 7), "{seen:?}");
    let table = s.ok(&["get", "runs", "--function", "h", "--limit", "3"]);
    let rows = table
        .lines()
        .filter(|l| unique.iter().any(|id| l.contains(id.as_str())));
    assert_eq!(rows.count(), 3, "3 runs: {table}");
    let window = |flag: &str| s.json(&["get", "runs", flag, "1h", "-o", "json"]);
    assert_eq!(window("--since").as_array().unwrap().len(), 7);
    assert_eq!(window("--until").as_array().unwrap().len(), 0);
    let e = s.fails(&["get", "runs", "--after", "nope"]);
    assert!(e.contains("is not a run id"), "{e}");
    let e = s.fails(&["get", "runs", "--since", "yesterday-ish"]);
    assert!(e.contains("neither a time"), "{e}");
    // A policy: successes no longer recorded, failures are.
    s.ok(&["update", "function", "h", "--history", "errors"]);
    s.ok(&["exec", "h", "--input", "{}"]);
    assert_eq!(
        s.json(&["get", "runs", "--function", "h", "-o", "json"])
            .as_array()
            .unwrap()
            .len(),
        7
    );
    let e = s.fails(&["update", "function", "h", "--history-sample-rate", "0.5"]);
    assert!(e.contains("history: sample"), "{e}");
    s.ok(&[
        "update",
        "function",
        "h",
        "--history",
        "sample",
        "--history-sample-rate",
        "0.5",
    ]);
    let f = s.json(&["get", "function", "h", "-o", "json"]);
    assert_eq!(
        (
            f["spec"]["history"].as_str(),
            f["spec"]["historySampleRate"].as_f64()
        ),
        (Some("sample"), Some(0.5))
    );
}

#[test]
fn job_templates_from_the_cli() {
    // dispatcher's sample names alpine:latest: it runs that image (busybox here, from a
    // local registry standing in for Docker Hub).
    let hub = ImageRegistry::start();
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &[&hub.mirror_flag()]);
    let sample = examples().join("jobs/jobtemplate-sample.yaml");
    assert_eq!(
        s.ok(&["apply", "-f", sample.to_str().unwrap()]),
        "jobtemplate/jobtemplate-sample created\n"
    );
    let table = s.ok(&["get", "jobtemplates"]);
    assert!(
        table.contains("jobtemplate-sample") && table.contains("alpine:latest"),
        "{table}"
    );

    // --wait follows the logs and exits with the job's code.
    let out = s
        .cli()
        .args([
            "execute",
            "jobtemplate-sample",
            "--payload",
            "my test payload",
            "--wait",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "my test payload\n");
    let started: Value =
        serde_json::from_str(&s.ok(&["execute", "jobtemplate-sample", "-p", "again"])).unwrap();
    let uuid = started["uuid"].as_str().unwrap().to_string();
    // --follow blocks until the execution ends and exits with its code.
    assert_eq!(
        s.ok(&["logs", "jobexecution", &uuid, "--follow"]),
        "again\n"
    );
    let job = s.ok(&["get", "jobexecution", &uuid, "-o", "yaml"]);
    assert!(
        job.contains("kind: JobExecution")
            && job.contains("jobTemplateName: jobtemplate-sample")
            && job.contains("phase: Completed"),
        "{job}"
    );
    assert_eq!(s.ok(&["logs", "jobexecution", &uuid]), "again\n");
    let list = s.ok(&["get", "jobexecutions", "--template", "jobtemplate-sample"]);
    assert_eq!(
        list.lines().count(),
        4,
        "header, rule, two executions: {list}"
    );

    // dispatcher's samples folder, as `kubectl apply -f config/samples/` takes it: the
    // template (unchanged), then the execution sample, which runs once.
    let samples = examples().join("jobs");
    let samples = samples.to_str().unwrap();
    assert_eq!(
        s.ok(&["apply", "-f", samples]),
        "jobtemplate/jobtemplate-sample unchanged\njobexecution/jobexecution-sample created\n"
    );
    assert_eq!(
        s.ok(&["logs", "jobexecution", "jobexecution-sample", "--follow"]),
        "test-payload\n"
    );
    assert_eq!(
        s.ok(&["apply", "-f", samples]),
        "jobtemplate/jobtemplate-sample unchanged\njobexecution/jobexecution-sample unchanged\n"
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(
        s.fails(&["apply", "-f", empty.path().to_str().unwrap()])
            .contains("holds no .yaml, .yml or .json file")
    );

    // A JobExecution resource, as dispatcher documents it: apply starts it under its name;
    // applied again it is unchanged; another payload under that name is refused.
    let execution = s.dir.path().join("execution.yaml");
    let write_execution = |payload: &str| {
        std::fs::write(
            &execution,
            format!(
                "apiVersion: dispatcher.ivan.vc/v1alpha1\nkind: JobExecution\nmetadata: {{name: nightly}}\nspec: {{jobTemplateName: jobtemplate-sample, payload: {payload}}}\n"
            ),
        )
        .unwrap();
    };
    write_execution("from-apply");
    let path = execution.to_str().unwrap();
    assert_eq!(
        s.ok(&["apply", "-f", path, "--dry-run"]),
        "jobexecution/nightly created (dry run)\n"
    );
    assert_eq!(
        s.ok(&["apply", "-f", path]),
        "jobexecution/nightly created\n"
    );
    assert_eq!(
        s.ok(&["logs", "jobexecution", "nightly", "--follow"]),
        "from-apply\n"
    );
    let job = s.json(&["get", "jobexecution", "nightly", "-o", "json"]);
    assert_eq!(
        (
            job["metadata"]["name"].as_str(),
            job["spec"]["payload"].as_str(),
            job["status"]["phase"].as_str()
        ),
        (Some("nightly"), Some("from-apply"), Some("Completed"))
    );
    assert_eq!(
        s.ok(&["apply", "-f", path]),
        "jobexecution/nightly unchanged\n"
    );
    assert_eq!(
        s.ok(&["diff", "-f", path]),
        "",
        "the same execution: no diff"
    );
    write_execution("changed");
    let diff = s.cli().args(["diff", "-f", path]).output().unwrap();
    let text = String::from_utf8_lossy(&diff.stdout);
    assert_eq!(diff.status.code(), Some(1), "{text}");
    assert!(
        text.contains("-  payload: from-apply") && text.contains("+  payload: changed"),
        "{text}"
    );
    assert!(
        s.fails(&["apply", "-f", path])
            .contains("an execution does not change")
    );
    assert!(
        s.fails(&["create", "-f", path])
            .contains("is started by `dispatch apply -f`")
    );
    // delete -f of an ended one: nothing to stop, its record stays.
    assert_eq!(
        s.ok(&["delete", "-f", path]),
        "jobexecution/nightly ended already (its record stays)\n"
    );

    let tpl = s.dir.path().join("jobs.yaml");
    std::fs::write(
        &tpl,
        "apiVersion: dispatch.dev/v1\nkind: JobTemplate\nmetadata: {name: exit-7}\nspec:\n  jobTemplate:\n    spec:\n      backoffLimit: 0\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n          - {name: main, image: busybox, command: [sh, -c, 'echo failing >&2; exit 7']}\n---\napiVersion: dispatch.dev/v1\nkind: JobTemplate\nmetadata: {name: blocker}\nspec:\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n          - {name: main, image: busybox, command: [tail, -f, /dev/null]}\n",
    )
    .unwrap();
    s.ok(&["apply", "-f", tpl.to_str().unwrap()]);
    let out = s
        .cli()
        .args(["execute", "exit-7", "--wait"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failing"));
    let started: Value = serde_json::from_str(&s.ok(&["execute", "blocker"])).unwrap();
    let uuid = started["uuid"].as_str().unwrap().to_string();
    assert_eq!(
        s.ok(&["cancel", "jobexecution", &uuid]),
        format!("jobexecution/{uuid} cancelled\n")
    );
    assert!(
        s.fails(&["execute", "nope"])
            .contains("job template \"nope\" not found")
    );
    // delete -f of a running one stops it, as deleting its custom resource does.
    let blocked = s.dir.path().join("blocked.yaml");
    std::fs::write(
        &blocked,
        "apiVersion: dispatcher.ivan.vc/v1alpha1\nkind: JobExecution\nmetadata: {name: blocked}\nspec: {jobTemplateName: blocker}\n",
    )
    .unwrap();
    let blocked = blocked.to_str().unwrap();
    s.ok(&["apply", "-f", blocked]);
    assert_eq!(
        s.ok(&["delete", "-f", blocked]),
        "jobexecution/blocked cancelled\n"
    );
    assert!(
        s.ok(&["get", "jobexecution", "blocked", "-o", "yaml"])
            .contains("phase: Cancelled")
    );
    assert!(
        s.ok(&["delete", "jobtemplate", "blocker"])
            .contains("deleted")
    );
    assert!(s.fails(&["delete", "-f", blocked]).contains("not found"));
    assert_eq!(s.ok(&["delete", "-f", blocked, "--ignore-not-found"]), "");
}

#[test]
fn tokens_login_and_audit_from_the_cli() {
    let s = ServerProc::start();
    // Without a token the server refuses, and says how to get one.
    let out = s
        .cli()
        .env_remove("DISPATCH_TOKEN")
        .args(["get", "images"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin-token"));

    let dev = s
        .ok(&["create", "token", "ci", "--role", "developer"])
        .trim()
        .to_string();
    assert!(dev.starts_with("dsp_"));
    // Scripts get the secret without scraping text.
    let t = s.json(&[
        "create", "token", "ci-json", "--role", "viewer", "-o", "json",
    ]);
    assert!(t["token"].as_str().unwrap().starts_with("dsp_"), "{t}");
    assert_eq!(t["role"], "viewer");
    // login stores a context; later commands need neither --server nor --token.
    let out = s
        .cli()
        .env_remove("DISPATCH_TOKEN")
        .args([
            "login",
            "--server",
            &format!("http://127.0.0.1:{}", s.api),
            "--token",
            &dev,
            "--context-name",
            "ci",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("as ci (developer, namespace default)"));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["current"], "ci");
    assert_eq!(cfg["contexts"]["ci"]["token"], dev.as_str());
    // kubectl-style config: the contexts (never their tokens), the current one, switching.
    let contexts = s.json(&["config", "get-contexts", "-o", "json"]);
    assert_eq!(contexts[0]["name"], "ci");
    assert_eq!(contexts[0]["current"], true);
    assert_eq!(
        contexts[0]["token"], true,
        "whether one is set, not the token"
    );
    assert!(!contexts.to_string().contains(&dev));
    let table = s.ok(&["config", "get-contexts"]);
    assert!(table.contains("CURRENT") && table.contains("ci"), "{table}");
    assert_eq!(s.ok(&["config", "current-context"]), "ci\n");
    assert!(
        s.fails(&["config", "use-context", "elsewhere"])
            .contains("context \"elsewhere\" is not in")
    );
    assert_eq!(
        s.ok(&["config", "use-context", "ci"]),
        "switched to context ci\n"
    );
    let as_dev = |args: &[&str]| {
        s.cli()
            .env_remove("DISPATCH_TOKEN")
            .env_remove("DISPATCH_SERVER")
            .args(args)
            .output()
            .unwrap()
    };
    // whoami: the context's token as the server sees it.
    let me = as_dev(&["whoami"]);
    let text = String::from_utf8_lossy(&me.stdout);
    assert!(
        text.starts_with("ci (developer, namespace default) at http://127.0.0.1:"),
        "{text}"
    );
    let me: Value = serde_json::from_slice(&as_dev(&["whoami", "-o", "json"]).stdout).unwrap();
    assert_eq!(
        (
            me["name"].as_str(),
            me["role"].as_str(),
            me["allNamespaces"].as_bool()
        ),
        (Some("ci"), Some("developer"), Some(false))
    );
    assert!(
        as_dev(&["create", "image", "py", "python3"])
            .status
            .success()
    );
    let out = as_dev(&[
        "create",
        "token",
        "sneaky",
        "--role",
        "admin",
        "--token-namespace",
        "*",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an admin of every namespace"));
    let out = as_dev(&["get", "images", "-n", "other"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespace \"other\" not found"));

    let table = s.ok(&["get", "tokens"]);
    assert!(
        table.contains("admin") && table.contains("ci") && table.contains("developer"),
        "{table}"
    );
    assert!(!table.contains(&dev), "tokens are never shown again");
    let audit = s.ok(&["get", "audit"]);
    assert!(
        audit.contains("/v1/namespaces/default/images") && audit.contains("ci"),
        "{audit}"
    );
    // One date format across tables: no RFC 3339 (with nanoseconds) in tokens and audit.
    let year = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .year()
        .to_string();
    for t in [&table, &audit] {
        let row = t.lines().nth(2).unwrap_or("");
        assert!(
            row.contains(&year) && !row.contains(&format!("{year}-")),
            "{t}"
        );
    }
    assert_eq!(s.ok(&["delete", "token", "ci"]), "token/ci deleted\n");
    assert_eq!(as_dev(&["get", "images"]).status.code(), Some(1));
}

#[test]
fn namespaces_and_secrets_from_the_cli() {
    let s = ServerProc::start();
    assert_eq!(
        s.ok(&["create", "namespace", "team-b"]),
        "namespace/team-b created\n"
    );
    let table = s.ok(&["get", "namespaces"]);
    assert!(
        table.contains("default") && table.contains("team-b"),
        "{table}"
    );
    // A namespace's own run-history budget: set, shown, refused when bad, cleared.
    assert!(
        s.fails(&[
            "create",
            "namespace",
            "team-c",
            "--run-history-budget",
            "huge"
        ])
        .contains("spec.runHistoryBudget is not valid")
    );
    s.fails(&["get", "namespace", "team-c"]);
    s.ok(&[
        "create",
        "namespace",
        "team-c",
        "--run-history-budget",
        "4Mi",
    ]);
    let table = s.ok(&["get", "namespace", "team-c"]);
    assert!(
        table.contains("RUN HISTORY")
            && table.contains("0 runs, 0 bytes")
            && table.contains("4Mi (own)"),
        "{table}"
    );
    let shown = s.json(&["get", "namespace", "team-c", "-o", "json"]);
    assert_eq!(shown["spec"]["runHistoryBudget"], "4Mi");
    assert!(
        s.ok(&[
            "update",
            "namespace",
            "team-c",
            "--run-history-budget",
            "default"
        ])
        .contains("from the server")
    );
    assert!(
        s.fails(&[
            "update",
            "namespace",
            "team-c",
            "--run-history-budget",
            "10"
        ])
        .contains("below the least budget of 1Mi")
    );
    assert!(
        s.json(&["get", "namespace", "team-c", "-o", "json"])["spec"]
            .get("runHistoryBudget")
            .is_none()
    );
    assert!(
        s.fails(&["create", "image", "py", "python3", "-n", "nowhere"])
            .contains("create it first (dispatch create namespace nowhere)")
    );

    let file = s.dir.path().join("db.json");
    std::fs::write(&file, r#"{"user": "app"}"#).unwrap();
    s.ok(&[
        "create",
        "secret",
        "db",
        file.to_str().unwrap(),
        "--from-literal",
        "password=s3cr3t-value-9",
        "-n",
        "team-b",
    ]);
    let table = s.ok(&["get", "secrets", "-n", "team-b"]);
    assert!(
        table.contains("password,user") && !table.contains("s3cr3t"),
        "{table}"
    );
    assert!(
        !s.ok(&["get", "secret", "db", "-n", "team-b", "-o", "yaml"])
            .contains("s3cr3t")
    );
    let revealed = s.json(&[
        "get", "secret", "db", "--reveal", "-n", "team-b", "-o", "json",
    ]);
    assert_eq!(revealed["spec"]["data"]["password"], "s3cr3t-value-9");
    s.ok(&[
        "update",
        "secret",
        "db",
        "--from-literal",
        "password=rotated-value",
        "-n",
        "team-b",
    ]);
    assert_eq!(
        s.json(&[
            "get", "secret", "db", "--reveal", "-n", "team-b", "-o", "json"
        ])["spec"]["data"]["password"],
        "rotated-value"
    );

    assert!(
        s.fails(&["delete", "namespace", "team-b"])
            .contains("is not empty (1 resources: secret/db)")
    );
    assert_eq!(
        s.ok(&["delete", "namespace", "team-b", "--cascade"]),
        "namespace/team-b deleted (1 resources)\n"
    );
    assert!(
        s.fails(&["get", "namespace", "team-b"])
            .contains("namespace \"team-b\" not found")
    );
    assert!(
        s.fails(&["delete", "namespace", "default"])
            .contains("cannot be deleted")
    );
}

#[test]
fn tls_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed to make a test certificate (.ci/run installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (api, gw) = free_ports();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
        .args(["server", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--api-addr",
            &format!("127.0.0.1:{api}"),
            "--gateway-addr",
            &format!("127.0.0.1:{gw}"),
            "--tls-cert",
        ])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cli = |extra: &[&str]| {
        let token =
            std::fs::read_to_string(dir.path().join("data/admin-token")).unwrap_or_default();
        std::process::Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
            .env("DISPATCH_SERVER", format!("https://127.0.0.1:{api}"))
            .env("DISPATCH_TOKEN", token.trim())
            .env("DISPATCH_CONFIG", dir.path().join("config.json"))
            .args(extra)
            .output()
            .unwrap()
    };
    eventually("the TLS server to answer", || {
        cli(&["--insecure", "get", "namespaces"])
            .status
            .success()
            .then_some(())
    });
    // A self-signed certificate is refused unless --insecure (or a context's insecure: true).
    let out = cli(&["get", "namespaces"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP does not get an answer from a TLS port.
    assert!(http_get(api, "/healthz").is_none_or(|(code, _)| code != 200));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn events_subscriptions_and_drivers_from_the_cli() {
    let s = ServerProc::start();
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let code = s.dir.path().join("on_event.py");
    std::fs::write(&code, "def handle(context, payload):\n    return {'type': context['event']['type'], 'data': payload}\n").unwrap();
    s.ok(&[
        "create",
        "function",
        "on-event",
        code.to_str().unwrap(),
        "--image",
        "py",
        "--wait",
    ]);
    assert!(
        s.ok(&[
            "create",
            "subscription",
            "orders",
            "--event-type",
            "order.*",
            "--function",
            "on-event"
        ])
        .contains("created")
    );
    let r: Value = serde_json::from_str(&s.ok(&[
        "emit",
        "order.created",
        "--data",
        r#"{"total": 3}"#,
        "--subject",
        "o-1",
    ]))
    .unwrap();
    let run_id = r["matched"][0]["runId"].as_str().unwrap().to_string();
    // --follow blocks until the run is final (exit 0: SUCCEEDED).
    s.ok(&["logs", "run", &run_id, "--follow"]);
    let run = s.json(&["get", "run", &run_id, "-o", "json"]);
    assert_eq!(run["status"]["phase"], "SUCCEEDED", "{run}");
    assert_eq!(
        run["status"]["output"],
        serde_json::json!({"type": "order.created", "data": {"total": 3}})
    );
    s.ok(&["emit", "user.signup"]);
    let table = s.ok(&["get", "events"]);
    assert!(
        table.contains("order.created")
            && table.contains("user.signup")
            && table.contains("unmatched"),
        "{table}"
    );
    assert_eq!(
        s.json(&["get", "events", "--type", "user.signup", "-o", "json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A cron driver runs the function on its own.
    assert!(
        s.fails(&[
            "create",
            "eventdriver",
            "bad",
            "--type",
            "cron",
            "--schedule",
            "* 99 * * *",
            "--function",
            "on-event"
        ])
        .contains("field 2 (hour)")
    );
    s.ok(&[
        "create",
        "eventdriver",
        "tick",
        "--type",
        "cron",
        "--schedule",
        "@every 1s",
        "--function",
        "on-event",
    ]);
    eventually("a cron run", || {
        let runs = s.json(&["get", "runs", "--function", "on-event", "-o", "json"]);
        runs.as_array()
            .unwrap()
            .iter()
            .any(|r| r["spec"]["trigger"] == "cron" && r["status"]["phase"] == "SUCCEEDED")
            .then_some(())
    });
    let table = s.ok(&["get", "eventdrivers"]);
    assert!(
        table.contains("NEXT FIRE") && table.contains("@every 1s") && table.contains("READY"),
        "{table}"
    );
    s.ok(&["delete", "eventdriver", "tick"]);
    s.ok(&["delete", "subscription", "orders"]);
}

/// `dispatch bench` end to end on its own embedded server: every measure present and sane.
/// The bench itself fails when a run after scale to zero is not cold, or was started another
/// way than the one measured (the run record's `coldStart`, read back through the API).
#[test]
fn bench_quick_reports_every_measure() {
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args([
            "bench",
            "--quick",
            "--cold-samples",
            "3",
            "--functions",
            "40",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    // Both isolations side by side, the default: one report each, the scale test once.
    let both: Value =
        serde_json::from_slice(&out.stdout).expect("-o json prints one JSON document");
    let both = both.as_array().expect("two reports, one per isolation");
    assert_eq!(both.len(), 2);
    assert_eq!(both[0]["isolation"], "none");
    assert!(both[0].get("scale").is_none(), "the scale test runs once");
    assert_eq!(both[1]["isolation"], "sandbox");
    for r in both {
        bench_report_is_sane(r);
    }
    let r = &both[1];
    assert_eq!(r["scale"]["functions"], 40);
    assert!(r["scale"]["rss_after_kib"].as_u64().unwrap() > 0);
    assert!(r["scale"]["route_lookup_ns_all"].as_f64().unwrap() > 0.0);

    bench_refuses_bad_input();
}

/// Every measure of one `dispatch bench` report present and sane.
fn bench_report_is_sane(r: &Value) {
    assert!(r["bare_worker"]["calls"].as_u64().unwrap() > 0);
    let warm = r["warm"].as_array().unwrap();
    let mut seen: Vec<(String, u64)> = warm
        .iter()
        .map(|l| {
            assert!(l["requests"].as_u64().unwrap() > 0, "{l}");
            assert_eq!(l["errors"], 0, "{l}");
            assert!(l["p50_us"].as_f64().unwrap() <= l["p99_us"].as_f64().unwrap());
            (
                l["via"].as_str().unwrap().to_string(),
                l["concurrency"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [("api", 1), ("api", 32), ("gateway", 1), ("gateway", 32)].map(|(v, c)| (v.to_string(), c))
    );
    assert!(r["overhead_p50_us"]["gateway"].is_f64());
    let methods: Vec<&str> = r["cold_start"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["samples"], 3, "{c}");
            let total = c["total_p50_ms"].as_f64().unwrap();
            assert!(
                total > 0.0 && total <= c["e2e_p50_ms"].as_f64().unwrap() + 1.0,
                "{c}"
            );
            assert!(c["import_p50_ms"].as_f64().unwrap() > 0.0, "{c}");
            c["method"].as_str().unwrap()
        })
        .collect();
    assert_eq!(methods, ["fork", "spawn", "specialize"]);
    for u in r["idle_worker_uss_kib"].as_array().unwrap() {
        let (uss, rss) = (
            u["uss_kib"].as_u64().unwrap(),
            u["rss_kib"].as_u64().unwrap(),
        );
        assert!(uss > 0 && uss < rss, "{u}");
    }
}

fn bench_refuses_bad_input() {
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args(["bench", "--concurrency", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--concurrency"), "{err}");
}

/// deploy/kubernetes/dispatch.yaml is what `dispatch k8s manifests` prints for the command in
/// its header: the committed install file cannot drift from the code.
#[test]
fn committed_install_manifests_match_the_generator() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes/dispatch.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    let command = committed
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# Made by: dispatch "))
        .expect("a header naming the command");
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args(command.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        committed,
        "regenerate: dispatch {command} > deploy/kubernetes/dispatch.yaml"
    );
    // Kubernetes flags without the Kubernetes backend are refused, not ignored.
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args(["server", "--knative", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need --backend kubernetes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad namespace is refused.
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args([
            "k8s",
            "manifests",
            "--image",
            "i",
            "--registry",
            "r",
            "--namespace",
            "Bad_NS",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// Output cut short by its reader (`dispatch completion zsh | head -1`) ends the command
/// quietly with 0: it panicked on the closed pipe.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::io::Read as _;
    for args in [&["completion", "zsh"][..], &["completion", "bash"][..]] {
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The script is larger than a pipe's buffer: the writer is still writing when the
        // reader goes, as `head -1` does.
        let mut first = [0u8; 16];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}

/// Every failure exits 1, usage errors too (clap's own code is 2); help and version exit 0.
#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let run = |args: &[&str]| {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["get"][..],
        &["--no-such-flag"][..],
        &["create", "token"][..],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    }
    for args in [&["--help"][..], &["get", "--help"][..], &["--version"][..]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty());
    }
    // The help points at the API's contract.
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    assert!(help.contains("GET /v1/openapi.json"), "{help}");
    // The server's help has the server's flags, not the client's (--server, --token, -n).
    let help = String::from_utf8(run(&["server", "--help"]).stdout).unwrap();
    assert!(
        help.contains("--data-dir") && !help.contains("--token"),
        "{help}"
    );
    let help = String::from_utf8(run(&["get", "--help"]).stdout).unwrap();
    assert!(help.contains("--token"), "{help}");
}

/// `apply` of a manifest whose function source changed says `configured` (it redeploys with
/// a new digest), and `unchanged` only when nothing stored changed.
#[test]
fn apply_reports_a_changed_source_as_configured() {
    let s = ServerProc::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("h.py");
    std::fs::write(&src, "def handle(c, p):\n    return 1\n").unwrap();
    let manifest = dir.path().join("m.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: dispatch.dev/v1\nkind: Function\nmetadata: {name: h}\nspec: {image: python3, sourcePath: h.py}\n",
    )
    .unwrap();
    let m = manifest.to_str().unwrap();
    s.ok(&["create", "image", "python3", "python3", "--wait"]);
    // A dry run stores nothing.
    assert_eq!(
        s.ok(&["apply", "-f", m, "--dry-run"]),
        "function/h created (dry run)\n"
    );
    s.fails(&["get", "function", "h"]);
    assert_eq!(s.ok(&["apply", "-f", m]), "function/h created\n");
    assert_eq!(s.ok(&["apply", "-f", m]), "function/h unchanged\n");
    assert_eq!(s.ok(&["diff", "-f", m]), "", "no change, no diff, exit 0");
    std::fs::write(&src, "def handle(c, p):\n    return 2\n").unwrap();
    let stored = s.json(&["get", "function", "h", "-o", "json"])["spec"]["source"].clone();
    assert_eq!(
        s.ok(&["apply", "-f", m, "--dry-run"]),
        "function/h configured (dry run)\n"
    );
    // diff: exit 1 and the changed line, against the server's normalized form.
    let out = s.cli().args(["diff", "-f", m]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let diff = String::from_utf8_lossy(&out.stdout);
    assert!(
        diff.contains("--- function/h (stored)")
            && diff.contains(&format!("-  source: {}", stored.as_str().unwrap()))
            && diff.contains("+  source: sha256:")
            && !diff.contains("-  handler"),
        "{diff}"
    );
    assert_eq!(
        s.json(&["get", "function", "h", "-o", "json"])["spec"]["source"],
        stored,
        "dry runs changed nothing"
    );
    assert_eq!(s.ok(&["apply", "-f", m]), "function/h configured\n");
    eventually("the new source to answer", || {
        let out = s.cli().args(["exec", "h"]).output().unwrap();
        let env: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (env["payload"] == 2).then_some(())
    });
}

/// `dispatch explain` reads the CRDs' schemas: a kind, a field path, an unknown field.
#[test]
fn explain_shows_what_fields_mean() {
    let run = |args: &[&str]| {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["explain", "functions.spec.concurrency"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("FIELD:    spec.concurrency <object>")
            && text.contains("maxWorkers\t<integer>")
            && text.contains("default 0: scale to zero"),
        "{text}"
    );
    let text = String::from_utf8(run(&["explain", "function.spec"]).stdout).unwrap();
    assert!(text.contains("image\t<string> -required-"), "{text}");
    let schema: Value =
        serde_json::from_slice(&run(&["explain", "endpoint.spec.paths", "-o", "json"]).stdout)
            .unwrap();
    assert_eq!(schema["type"], "array");
    let out = run(&["explain", "function.spec.nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no field \"nope\" (fields: "));
    let out = run(&["explain", "widget"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kind \"widget\""));
    // dispatcher's JobExecution, from its CRD.
    let text = String::from_utf8(run(&["explain", "jobexecution.spec"]).stdout).unwrap();
    assert!(
        text.contains("VERSION:  dispatcher.ivan.vc/v1alpha1")
            && text.contains("jobTemplateName\t<string> -required-"),
        "{text}"
    );
}

/// `get KIND --watch`: the list, then a row for each resource that appears or changes, and a
/// line for one that goes.
#[test]
fn get_watch_follows_changes() {
    use std::io::BufRead as _;
    let s = ServerProc::start();
    let mut child = s
        .cli()
        .args(["get", "endpoints", "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line with {what:?} within 60 s"),
            }
        }
    };
    wait_for("NAME");
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let f = s.dir.path().join("w.py");
    std::fs::write(&f, "def handle(c, p):\n    return 1\n").unwrap();
    s.ok(&[
        "create",
        "function",
        "--image",
        "py",
        "w",
        f.to_str().unwrap(),
    ]);
    s.ok(&["create", "endpoint", "watched", "w", "--path", "/w"]);
    let row = wait_for("watched");
    assert!(!row.contains("NAME"), "a row, not a new table: {row}");
    s.ok(&["delete", "endpoint", "watched"]);
    wait_for("endpoint/watched deleted");
    let _ = child.kill();
    let _ = child.wait();
}

/// `dispatch server --database postgres://…` (a real PostgreSQL): resources, runs, tokens and
/// the audit log live in the database — no SQLite file in the data dir — and are all there
/// after a `kill -9` and a restart; an accepted async run queued before the kill runs after it.
#[test]
fn a_server_on_postgres_keeps_everything_in_the_database() {
    let pg = dispatch_testkit::postgres::Postgres::start();
    let url = pg.create_database("dispatch");
    let flags = ["--database", url.as_str()];
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &flags);
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let hello = examples().join("python3/hello.py");
    s.ok(&[
        "create",
        "function",
        "hello",
        hello.to_str().unwrap(),
        "--image",
        "py",
        "--wait",
    ]);
    let (ok, out) = s.exec("hello", r#"{"name": "pg"}"#);
    assert!(ok, "{out}");
    let token: Value =
        serde_json::from_str(&s.ok(&["create", "token", "ci", "--role", "viewer", "-o", "json"]))
            .unwrap();
    assert!(token["token"].as_str().is_some(), "{token}");
    let accepted: Value = serde_json::from_str(&s.ok(&[
        "exec",
        "hello",
        "--async",
        "--input",
        r#"{"name": "after"}"#,
    ]))
    .unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    let data = s.dir.path().join("data");
    for file in ["dispatch.db", "history.db"] {
        assert!(
            !data.join(file).exists(),
            "{file}: records are in PostgreSQL"
        );
    }
    // The audit entry is written just after the answer: there before the kill.
    eventually("the token's audit entry", || {
        s.ok(&["get", "audit"]).contains("/v1/tokens").then_some(())
    });

    let dir = s.kill9();
    let s = ServerProc::start_with(dir, &flags);
    let f = s.json(&["get", "function", "hello", "-o", "json"]);
    assert_eq!(f["spec"]["image"], "py");
    let run = eventually("the async run to end after the restart", || {
        let r = s.json(&["get", "run", &id, "-o", "json"]);
        (r["status"]["phase"] == "SUCCEEDED").then_some(r)
    });
    assert_eq!(
        run["status"]["output"]["myField"],
        "Hello, after from Nowhere"
    );
    // Just after a start the function is deployed again: 503 + Retry-After meanwhile.
    let out = eventually("hello to answer after the restart", || {
        let out = s
            .cli()
            .args(["exec", "hello", "--input", r#"{"name": "again"}"#])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            assert!(err.contains("being deployed on this server"), "{err}");
            return None;
        }
        Some(out)
    });
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hello, again"));
    let runs = s.ok(&["get", "runs", "--function", "hello"]);
    assert!(runs.lines().count() >= 5, "header, rule, 3 runs: {runs}");
    assert!(s.ok(&["get", "tokens"]).contains("ci"));
    assert!(s.ok(&["get", "audit"]).contains("/v1/tokens"));
    assert!(!pg.log().contains("ERROR:  relation"), "{}", pg.log());

    let bad = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args(["server", "--database", "mysql://x", "--data-dir"])
        .arg(s.dir.path().join("other"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("takes a PostgreSQL URL"));
}

/// `--shutdown-delay`: on SIGTERM `/readyz` answers 503 at once while `/healthz` and the API
/// still answer (a load balancer stops sending before the listeners close); a second signal
/// stops the server at once, cleanly.
#[test]
fn shutdown_goes_unready_before_it_stops() {
    let s = ServerProc::start_with(tempfile::tempdir().unwrap(), &["--shutdown-delay", "60s"]);
    let pid = s.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    eventually("/readyz to answer 503", || {
        (http_get(s.api, "/readyz")?.0 == 503).then_some(())
    });
    assert_eq!(http_get(s.api, "/healthz").map(|r| r.0), Some(200));
    assert!(s.ok(&["get", "images"]).contains("NAME"));
    let started = std::time::Instant::now();
    assert!(s.terminate().success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the second signal did not wait out the delay"
    );
}

/// Versions and rollback (issue 23, its first part): a version for each build with a new
/// digest and none for a change that builds the same; `gc` keeps what versions name; a
/// rollback serves the earlier build on the next call and makes no version; a deleted function
/// made again starts at 1.
#[test]
fn versions_are_kept_and_rollback_serves_an_earlier_build() {
    let s = ServerProc::start();
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let code = |text: &str| s.python_returning(text);
    let says = || {
        let (ok, out) = s.exec("f", "null");
        assert!(ok, "{out}");
        out["payload"].as_str().unwrap_or_default().to_string()
    };
    let numbers = || -> Vec<u64> {
        let v = s.json(&["get", "versions", "f", "-o", "json"]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect()
    };
    s.ok(&[
        "create",
        "function",
        "f",
        &code("one"),
        "--image",
        "py",
        "--handler",
        "v.handle",
        "--wait",
    ]);
    assert_eq!(says(), "one");
    s.ok(&["update", "function", "f", &code("two"), "--wait"]);
    assert_eq!(says(), "two");
    // The same code again builds the same: no version.
    s.ok(&["update", "function", "f", &code("two"), "--wait"]);
    s.ok(&["update", "function", "f", &code("three"), "--wait"]);
    assert_eq!(says(), "three");
    assert_eq!(numbers(), [3, 2, 1]);
    let table = s.ok(&["get", "versions", "f"]);
    let row = |n: char| {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(n))
            .unwrap_or_default()
            .trim_end()
            .to_string()
    };
    assert!(
        table.trim_start().starts_with("VERSION")
            && row('3').ends_with('*')
            && !row('2').ends_with('*'),
        "the serving version is marked: {table}"
    );
    // What versions name survives a gc with no grace.
    s.ok(&["gc", "--grace", "0s"]);

    let out = s.ok(&["rollback", "f", "--wait"]);
    assert!(out.contains("rolled back to version 2"), "{out}");
    assert_eq!(says(), "two");
    // The run record names the version that served it.
    let newest = s.json(&[
        "get",
        "runs",
        "--function",
        "f",
        "--limit",
        "1",
        "-o",
        "json",
    ]);
    assert_eq!(newest[0]["status"]["version"], 2, "{newest}");
    s.ok(&["rollback", "f", "--wait"]);
    assert_eq!(says(), "one");
    let e = s.fails(&["rollback", "f"]);
    assert!(e.contains("no version before 1"), "{e}");
    s.ok(&["rollback", "f", "--to", "3", "--wait"]);
    assert_eq!(says(), "three");
    assert_eq!(numbers(), [3, 2, 1], "a rollback makes no version");
    let e = s.fails(&["rollback", "f", "--to", "9"]);
    assert!(
        e.contains("no version 9") && e.contains("dispatch get versions f"),
        "{e}"
    );
    let e = s.fails(&["get", "versions", "nope"]);
    assert!(e.contains("not found"), "{e}");

    s.ok(&["delete", "function", "f"]);
    s.ok(&[
        "create",
        "function",
        "f",
        &code("four"),
        "--image",
        "py",
        "--handler",
        "v.handle",
        "--wait",
    ]);
    assert_eq!(numbers(), [1]);
    assert_eq!(says(), "four");
}

/// Versions, aliases and promotion from the command line (issue 23): `exec f@N`, `create
/// alias … --traffic`, `get aliases`, `kind: Alias` in `apply -f` (applied with the function
/// it names, which it waits for), `promote --wait`, `rollback --alias`, and who made each
/// version (the token's name).
#[test]
fn aliases_and_promotion_from_the_command_line() {
    let s = ServerProc::start();
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let code = |text: &str| s.python_returning(text);
    let create = |text: &str| {
        s.ok(&[
            "create",
            "function",
            "f",
            &code(text),
            "--image",
            "py",
            "--handler",
            "v.handle",
            "--wait",
        ])
    };
    let says = |target: &str| {
        let (ok, out) = s.exec(target, "null");
        assert!(ok, "{target}: {out}");
        out["payload"].as_str().unwrap_or_default().to_string()
    };
    create("one");
    s.ok(&["update", "function", "f", &code("two"), "--wait"]);
    assert_eq!(
        (says("f@1"), says("f@2"), says("f")),
        ("one".into(), "two".into(), "two".into())
    );
    let versions = s.json(&["get", "versions", "f", "-o", "json"]);
    let whoami = s.json(&["whoami", "-o", "json"]);
    assert_eq!(
        versions[0]["createdBy"], whoami["name"],
        "{versions} / {whoami}"
    );
    let e = s.fails(&["exec", "f@7"]);
    assert!(e.contains("no version 7"), "{e}");

    let out = s.ok(&["create", "alias", "f", "prod", "--traffic", "1=90,2=10"]);
    assert!(out.contains("alias/f.prod created"), "{out}");
    let table = s.ok(&["get", "aliases"]);
    assert!(
        table.contains("f.prod") && table.contains("1=90%,2=10%"),
        "{table}"
    );
    let e = s.fails(&["create", "alias", "f", "beta", "--traffic", "1=90,2=20"]);
    assert!(e.contains("110%"), "{e}");
    let e = s.fails(&["create", "alias", "f", "beta"]);
    assert!(e.contains("--version") || e.contains("--traffic"), "{e}");
    s.ok(&["update", "alias", "f", "prod", "--version", "1"]);
    assert_eq!(says("f@prod"), "one");

    // A manifest with a function and an alias of it.
    let dir = s.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("g.py"),
        "def handle(context, payload):\n    return 'gee'\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("m.yaml"),
        "apiVersion: dispatch.dev/v1\nkind: Function\nmetadata:\n  name: g\nspec:\n  image: py\n  \
         handler: g.handle\n  sourcePath: g.py\n---\napiVersion: dispatch.dev/v1\nkind: Alias\n\
         metadata:\n  name: g.live\nspec:\n  traffic:\n  - version: 1\n    percent: 100\n",
    )
    .unwrap();
    let out = s.ok(&["apply", "-f", dir.join("m.yaml").to_str().unwrap()]);
    assert!(
        out.contains("function/g created") && out.contains("alias/g.live created"),
        "{out}"
    );
    assert_eq!(says("g@live"), "gee");
    let out = s.ok(&["apply", "-f", dir.join("m.yaml").to_str().unwrap()]);
    assert!(out.contains("alias/g.live unchanged"), "{out}");

    // A promotion to a version that answers, followed to its end.
    let out = s.ok(&[
        "promote", "f", "--alias", "prod", "--to", "2", "--step", "50%", "--every", "1s", "--wait",
    ]);
    assert!(out.contains("promotion to 2 done"), "{out}");
    assert_eq!(says("f@prod"), "two");
    let e = s.fails(&[
        "promote", "f", "--alias", "prod", "--to", "2", "--step", "0%",
    ]);
    assert!(e.contains("--step"), "{e}");

    // Rollback moves the function and the alias in one call.
    let out = s.ok(&["rollback", "f", "--to", "1", "--alias", "prod", "--wait"]);
    assert!(
        out.contains("rolled back to version 1")
            && out.contains("alias/f.prod points to version 1"),
        "{out}"
    );
    assert_eq!((says("f"), says("f@prod")), ("one".into(), "one".into()));
    s.ok(&["delete", "alias", "f.prod"]);
    let e = s.fails(&["exec", "f@prod"]);
    assert!(e.contains("no alias"), "{e}");
}

/// `dispatch exec --stream` (issue 22): a generator's chunks printed as they come; an error
/// after the first chunk on stderr with exit 1; a handler that returns prints its envelope.
#[test]
fn exec_streams_a_generators_chunks() {
    let s = ServerProc::start();
    s.ok(&["create", "image", "py", "python3", "--wait"]);
    let dir = s.dir.path().join("gen");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, code) in [
        (
            "gen",
            "def handle(context, payload):\n    for w in ['a', 'b', 'c']:\n        yield w\n",
        ),
        (
            "bad",
            "def handle(context, payload):\n    yield 'a'\n    raise RuntimeError('midway')\n",
        ),
        ("val", "def handle(context, payload):\n    return 42\n"),
    ] {
        let p = dir.join(format!("{name}.py"));
        std::fs::write(&p, code).unwrap();
        s.ok(&[
            "create",
            "function",
            name,
            p.to_str().unwrap(),
            "--image",
            "py",
            "--handler",
            &format!("{name}.handle"),
            "--wait",
        ]);
    }
    assert_eq!(s.ok(&["exec", "gen", "--stream"]), "abc\n");
    let out = s.cli().args(["exec", "bad", "--stream"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("midway"),
        "{out:?}"
    );
    let whole: serde_json::Value =
        serde_json::from_str(&s.ok(&["exec", "val", "--stream"])).unwrap();
    assert_eq!(whole["payload"], 42);
    // Without --stream the chunks are the payload.
    let (ok, env) = s.exec("gen", "null");
    assert!(ok);
    assert_eq!(env["payload"], "abc");
}
