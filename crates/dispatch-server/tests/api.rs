//! The API end to end on 127.0.0.1:0 with real python3/node workers and SQLite in a tempdir.

mod support;

use dispatch_core::{ErrorType, Kind, Phase, RunStatus};
use serde_json::json;
use serde_json::value::RawValue;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_version_and_builtins() {
    let t = start().await;
    let http = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let r = http.get(format!("{}{path}", t.api())).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let v = t.client.version().await.unwrap();
    assert_eq!(v["backend"], "embedded");
    let bases = t.client.list(Kind::BaseImage).await.unwrap();
    let names: Vec<&str> = bases.iter().map(|b| b.name()).collect();
    assert_eq!(names, ["nodejs", "python3"]);
    let err = t
        .client
        .delete(Kind::BaseImage, "python3")
        .await
        .unwrap_err();
    assert_eq!(
        (err.status().unwrap().as_u16(), err.code()),
        (409, Some("BuiltIn"))
    );
    // Unknown routes and kinds answer the one error shape.
    let r = http
        .get(format!("{}/v1/namespaces/default/widgets", t.api()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown resource kind \"widgets\"")
    );
    t.stop().await;
}

/// Every list reads one query shape: a bad `?limit=` is the same 400 on each (job executions
/// once ignored it, events took 0 and capped 20000 silently), a good one is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_refuses_a_bad_limit_alike() {
    let t = start().await;
    let http = reqwest::Client::new();
    for list in ["runs", "events", "jobexecutions"] {
        for bad in ["abc", "0", "20000"] {
            let r = http
                .get(format!(
                    "{}/v1/namespaces/default/{list}?limit={bad}",
                    t.api()
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{list}?limit={bad}");
            let body: serde_json::Value = r.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("from 1 to 10000"),
                "{list}?limit={bad}: {message}"
            );
        }
        let r = http
            .get(format!("{}/v1/namespaces/default/{list}?limit=5", t.api()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{list}?limit=5");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_functions_exec_and_leave_run_records() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    let f = create_function(c, "hello", "py", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    assert_eq!(
        f.spec["handler"], "hello.handle",
        "default handler filled in"
    );
    create_function(c, "hello-js", "js", "hello.js", HELLO_JS, json!({}))
        .await
        .unwrap();
    for name in ["hello", "hello-js"] {
        let f = settled(c, Kind::Function, name).await;
        assert_eq!(f.phase(), Some(Phase::Ready), "{:?}", f.status);
        assert!(f.status.digest.as_deref().unwrap().starts_with("sha256:"));

        let r = c.exec(name, &raw(json!({"name": "user"}))).await.unwrap();
        let env = r.envelope;
        assert!(env.context.error.is_none(), "{:?}", env.context.error);
        let payload: serde_json::Value = serde_json::from_str(env.payload.get()).unwrap();
        assert_eq!(payload, json!({"myField": "Hello, user from Nowhere"}));
        assert_eq!(
            env.context.logs.stdout,
            ["messages to stdout show up in logs"]
        );

        let id = r.run_id.unwrap();
        let run = c.get_run(&id).await.unwrap();
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(run.function, name);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(run.input.get()).unwrap(),
            json!({"name": "user"})
        );
        assert_eq!(run.output.unwrap().get(), env.payload.get());
        assert_eq!(run.logs.stdout, ["messages to stdout show up in logs"]);
        assert!(run.finished_at.is_some());
        assert_eq!(c.run_logs(&id).await.unwrap().stdout, run.logs.stdout);
        assert!(
            !run.cold,
            "the worker that validated the deploy serves warm"
        );

        // Scale to zero; the next call pays a cold start, recorded with its steps.
        let pool = t.local.pool("default", name).unwrap();
        pool.reap(std::time::Instant::now() + std::time::Duration::from_secs(3600));
        let id = c.exec(name, &raw(json!({}))).await.unwrap().run_id.unwrap();
        let run = c.get_run(&id).await.unwrap();
        let cold = run.cold_start.expect("a run after scale to zero is cold");
        assert!(run.cold);
        let method = if name == "hello" {
            "fork"
        } else {
            "specialize"
        };
        assert_eq!(cold.method.as_str(), method);
        assert!(cold.spawn_ms > 0.0 && cold.import_ms > 0.0 && cold.first_call_ms > 0.0);
        assert!(cold.spawn_ms + cold.import_ms + cold.first_call_ms <= cold.total_ms + 0.01);
        // timings.coldStartMs: starting the worker; coldStart.totalMs adds the first call.
        assert!(run.timings.cold_start_ms as f64 <= cold.total_ms + 1.0);
    }
    // The histogram saw both cold starts, nothing else; warm calls are counted.
    let text = reqwest::get(format!("{}/metrics", t.api()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
    };
    for (method, n) in [("fork", 1.0), ("specialize", 1.0), ("spawn", 0.0)] {
        for step in ["total", "spawn", "import", "first_call"] {
            let s =
                format!("dispatch_cold_start_seconds_count{{method=\"{method}\",step=\"{step}\"}}");
            assert_eq!(metric(&s), n, "{s}");
        }
    }
    assert!(metric("dispatch_cold_start_seconds_sum{method=\"fork\",step=\"total\"}") > 0.0);
    assert_eq!(metric("dispatch_runs_total{status=\"SUCCEEDED\"}"), 4.0);
    assert_eq!(metric("dispatch_warm_calls_total"), 2.0);
    let runs = c
        .list_runs(&dispatch_client::RunQuery {
            function: Some("hello".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs[0].cold && !runs[1].cold, "newest first");
    let err = c
        .list_runs(&dispatch_client::RunQuery {
            status: Some("bogus".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown run status \"bogus\""),
        "{err}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_errors_map_to_types_and_statuses() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    let code = "def handle(context, payload):\n    if payload.get('bad'):\n        raise ValueError('bad input')\n    raise RuntimeError('boom')\n";
    create_function(c, "fails", "py", "fails.py", code, json!({}))
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "fails").await.phase(),
        Some(Phase::Ready)
    );
    let r = c.exec("fails", &raw(json!({"bad": true}))).await.unwrap();
    assert_eq!(
        r.envelope.context.error.as_ref().unwrap().kind,
        ErrorType::InputError
    );
    let r = c.exec("fails", &raw(json!({}))).await.unwrap();
    let e = r.envelope.context.error.unwrap();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorType::FunctionError, "boom")
    );
    assert!(!e.stacktrace.is_empty());
    let run = c.get_run(&r.run_id.unwrap()).await.unwrap();
    assert_eq!(run.status, RunStatus::Failed);

    // A handler that does not import ends in ERROR with the reason.
    create_function(
        c,
        "broken",
        "py",
        "broken.py",
        "import nosuchmodule_xyz\ndef handle(c, p):\n    return 1\n",
        json!({}),
    )
    .await
    .unwrap();
    let f = settled(c, Kind::Function, "broken").await;
    assert_eq!(f.phase(), Some(Phase::Error));
    assert!(
        f.status.reason.contains("nosuchmodule_xyz"),
        "{}",
        f.status.reason
    );
    let err = c.exec("broken", &raw(json!({}))).await.unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 409);
    assert!(err.to_string().contains("failed to build"), "{err}");

    // Timeouts are enforced and recorded.
    let slow = "import select\ndef handle(c, p):\n    select.select([], [], [])\n";
    create_function(
        c,
        "slow",
        "py",
        "slow.py",
        slow,
        json!({"timeout": "300ms"}),
    )
    .await
    .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "slow").await.phase(),
        Some(Phase::Ready)
    );
    let r = c.exec("slow", &raw(json!({}))).await.unwrap();
    assert!(
        r.envelope
            .context
            .error
            .unwrap()
            .message
            .contains("timed out")
    );
    assert_eq!(
        c.get_run(&r.run_id.unwrap()).await.unwrap().status,
        RunStatus::Timeout
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_and_stores_nothing() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    let status = |e: dispatch_client::ClientError| (e.status().map(|s| s.as_u16()), e.to_string());

    let (s, m) = status(
        create_function(c, "Bad_Name", "py", "hello.py", HELLO_PY, json!({}))
            .await
            .unwrap_err(),
    );
    assert_eq!(s, Some(400), "{m}");
    let (s, m) = status(
        create_function(c, "hello", "nope", "hello.py", HELLO_PY, json!({}))
            .await
            .unwrap_err(),
    );
    assert_eq!(s, Some(422));
    assert!(m.contains("image \"nope\" not found"), "{m}");
    let (s, m) = status(
        create_function(
            c,
            "hello",
            "py",
            "hello.py",
            HELLO_PY,
            json!({"handler": "other.handle"}),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s, Some(400));
    assert!(m.contains("no module other"), "{m}");
    let (s, _) = status(
        c.create(&object(Kind::Image, "i2", json!({"baseImage": "nobase"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(s, Some(422));
    let (s, m) = status(
        c.create(&object(
            Kind::Image,
            "i3",
            json!({"baseImage": "python3", "systemDependencies": [{"name": "libpq"}]}),
        ))
        .await
        .unwrap_err(),
    );
    assert_eq!(s, Some(400));
    assert!(m.contains("kubernetes backend"), "{m}");
    let (s, _) = status(
        c.create(&object(
            Kind::Endpoint,
            "e",
            json!({"function": "ghost", "paths": ["/x"]}),
        ))
        .await
        .unwrap_err(),
    );
    assert_eq!(s, Some(422));
    let (s, m) = status(
        c.create(&object(
            Kind::Function,
            "nosrc",
            json!({"image": "py", "source": format!("sha256:{}", "0".repeat(64))}),
        ))
        .await
        .unwrap_err(),
    );
    assert_eq!(s, Some(422));
    assert!(m.contains("was not uploaded"), "{m}");
    assert!(c.list(Kind::Function).await.unwrap().is_empty());
    assert_eq!(c.list(Kind::Image).await.unwrap().len(), 2);

    // Duplicate create, stale update, malformed JSON.
    create_function(c, "hello", "py", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    let (s, m) = status(
        create_function(c, "hello", "py", "hello.py", HELLO_PY, json!({}))
            .await
            .unwrap_err(),
    );
    assert_eq!(s, Some(409));
    assert!(m.contains("already exists"), "{m}");
    let mut stale = c.get(Kind::Function, "hello").await.unwrap();
    stale.metadata.resource_version = Some("999".into());
    assert_eq!(status(c.update(&stale).await.unwrap_err()).0, Some(409));
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/namespaces/default/functions", t.api()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidJson");

    // Deleting an image still used by functions names them.
    let (s, m) = status(c.delete(Kind::Image, "py").await.unwrap_err());
    assert_eq!(s, Some(409));
    assert!(m.contains("used by functions hello"), "{m}");

    // Unsafe archives are rejected before anything is stored.
    let evil = {
        let mut h = tar_header("../evil.py");
        let mut tar_bytes = h.as_bytes().to_vec();
        h.set_cksum();
        tar_bytes.clear();
        tar_bytes.extend_from_slice(h.as_bytes());
        tar_bytes.extend_from_slice(&[0u8; 1024]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
        gz.finish().unwrap()
    };
    let (s, m) = status(c.upload_source("default", "evil", evil).await.unwrap_err());
    assert_eq!(s, Some(400));
    assert!(m.contains(".."), "{m}");

    // Payloads over 6 MiB: 413.
    assert_eq!(
        settled(c, Kind::Function, "hello").await.phase(),
        Some(Phase::Ready)
    );
    let big = format!("\"{}\"", "x".repeat(6 * 1024 * 1024 + 10));
    let (s, _) = status(
        c.exec("hello", &RawValue::from_string(big).unwrap())
            .await
            .unwrap_err(),
    );
    assert_eq!(s, Some(413));
    let (s, _) = status(c.exec("ghost", &raw(json!({}))).await.unwrap_err());
    assert_eq!(s, Some(404));
    t.stop().await;
}

fn tar_header(name: &str) -> tar::Header {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_endpoints_and_maps_payloads() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    create_function(c, "hello", "py", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    let echo = "import os\ndef handle(context, payload):\n    if payload == 'raise':\n        raise ValueError('nope')\n    if payload == 'crash':\n        print('worker at', os.getcwd(), flush=True)\n        os._exit(3)\n    return {'payload': payload, 'http': context['httpContext']}\n";
    create_function(c, "echo", "py", "echo.py", echo, json!({}))
        .await
        .unwrap();
    for f in ["hello", "echo"] {
        assert_eq!(
            settled(c, Kind::Function, f).await.phase(),
            Some(Phase::Ready)
        );
    }
    c.create(&object(
        Kind::Endpoint,
        "get-hello",
        json!({"function": "hello", "methods": ["GET", "POST"], "paths": ["/hello"]}),
    ))
    .await
    .unwrap();
    c.create(&object(Kind::Endpoint, "echo", json!({"function": "echo", "methods": ["POST", "GET"], "paths": ["/echo/{id}"], "cors": true})))
        .await
        .unwrap();
    // Same method and path shape: a conflict.
    let err = c
        .create(&object(
            Kind::Endpoint,
            "dup",
            json!({"function": "echo", "methods": ["GET"], "paths": ["/hello"]}),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 409, "{err}");

    let http = reqwest::Client::new();
    let g = &t.gateway;
    let r = http
        .get(format!("{g}/hello?name=Jon"))
        .header("Host", "default.default.dispatch.local")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-dispatch-run-id"));
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"myField": "Hello, Jon from Nowhere"})
    );
    let r = http
        .post(format!("{g}/hello"))
        .json(&json!({"name": "Ann", "place": "Oslo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["myField"],
        "Hello, Ann from Oslo"
    );
    let r = http.delete(format!("{g}/hello")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST");
    assert_eq!(
        http.get(format!("{g}/nowhere"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Text body → string payload; form → object; params and headers in httpContext.
    let r = http
        .post(format!("{g}/echo/42"))
        .header("content-type", "text/plain")
        .header("authorization", "secret")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["payload"], "hi");
    assert_eq!(v["http"]["params"]["id"], "42");
    assert_eq!(v["http"]["method"], "POST");
    assert!(
        v["http"]["headers"].get("authorization").is_none(),
        "authorization is never passed on"
    );
    let r = http
        .post(format!("{g}/echo/1"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["payload"],
        json!({"a": "1"})
    );
    let r = http
        .post(format!("{g}/echo/1"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["message"],
        "request body is not json"
    );
    // InputError → 400 with the error object.
    let r = http
        .post(format!("{g}/echo/1"))
        .header("content-type", "text/plain")
        .body("raise")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (v["error"]["type"].as_str(), v["error"]["message"].as_str()),
        (Some("InputError"), Some("nope"))
    );
    // JSON nested past the limit: 400 before any worker parses it (it once crashed one).
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let r = http
        .post(format!("{g}/echo/1"))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "InputError", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("deeper than 64 levels"), "{msg}");
    // A platform failure tells the caller what failed and which run, nothing of the
    // platform (paths, the bootstrap's traceback); the run record keeps the details.
    let r = http
        .post(format!("{g}/echo/1"))
        .header("content-type", "text/plain")
        .body("crash")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let v: serde_json::Value = r.json().await.unwrap();
    let e = &v["error"];
    assert_eq!(e["type"], "SystemError", "{v}");
    assert_eq!(e["stacktrace"], json!([]), "{v}");
    let text = v.to_string();
    assert!(!text.contains('/') && !text.contains("python"), "{text}");
    let run = c.get_run(e["runId"].as_str().unwrap()).await.unwrap();
    let kept = run.error.unwrap().message;
    assert!(kept.contains("exited"), "the run keeps the details: {kept}");
    // CORS preflight.
    let r = http
        .request(reqwest::Method::OPTIONS, format!("{g}/echo/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-methods"], "GET, POST");

    // A deleted endpoint stops routing at once; a function with endpoints cannot be deleted.
    let err = c.delete(Kind::Function, "hello").await.unwrap_err();
    assert!(
        err.to_string().contains("used by endpoints get-hello"),
        "{err}"
    );
    c.delete(Kind::Endpoint, "get-hello").await.unwrap();
    assert_eq!(
        http.get(format!("{g}/hello"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // Gateway calls leave run records too.
    c.delete(Kind::Function, "hello").await.unwrap();
    let runs = c.list_runs(&Default::default()).await.unwrap();
    assert!(
        runs.iter().all(|r| r.function == "echo"),
        "deleting a function deletes its runs"
    );
    assert!(!runs.is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_changes_digest_and_restart_redeploys() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    create_function(c, "hello", "py", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    let before = settled(c, Kind::Function, "hello").await;
    let mut f = before.clone();
    let v2 = HELLO_PY.replace("Hello,", "Hi,");
    f.spec["source"] = c
        .upload_source("default", "hello", archive_of("hello.py", &v2))
        .await
        .unwrap()
        .into();
    c.update(&f).await.unwrap();
    let after = eventually("a new digest", || async {
        let o = c.get(Kind::Function, "hello").await.unwrap();
        (o.phase() == Some(Phase::Ready) && o.status.digest != before.status.digest).then_some(o)
    })
    .await;
    assert_eq!(after.metadata.generation, Some(2));
    let r = c.exec("hello", &raw(json!({"name": "x"}))).await.unwrap();
    assert!(r.envelope.payload.get().contains("Hi, x"));

    // Restart on the same data dir: the function comes back READY and serves.
    let dir = t.stop().await;
    let t = start_in(dir).await;
    let r = eventually("the function to be redeployed", || async {
        match t.client.exec("hello", &raw(json!({"name": "y"}))).await {
            Ok(r) => Some(r),
            Err(e) => {
                assert_eq!(e.status().map(|s| s.as_u16()), Some(503), "{e}");
                None
            }
        }
    })
    .await;
    assert!(r.envelope.payload.get().contains("Hi, y"));
    assert_eq!(
        t.client
            .get(Kind::Function, "hello")
            .await
            .unwrap()
            .status
            .digest,
        after.status.digest
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_language_runs_any_executable() {
    let t = start().await;
    let c = &t.client;
    let err = c
        .create(&object(
            Kind::BaseImage,
            "shell",
            json!({"image": "debian:12-slim", "language": "exec", "interpreter": "sh"}),
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("spec.interpreter is not used"),
        "{err}"
    );
    exec_images(c).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("wrap.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'to stderr' >&2\nprintf '{\"wrapped\":%s}' \"$(cat)\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let digest = c
        .upload_source(
            "default",
            "wrap",
            dispatch_client::pack::pack_path(&script).unwrap(),
        )
        .await
        .unwrap();
    let f = c
        .create(&object(
            Kind::Function,
            "wrap",
            json!({"image": "sh", "source": digest}),
        ))
        .await
        .unwrap();
    assert_eq!(f.spec["handler"], "wrap.sh");
    assert_eq!(
        settled(c, Kind::Function, "wrap").await.phase(),
        Some(Phase::Ready)
    );
    let r = c.exec("wrap", &raw(json!({"a": 1}))).await.unwrap();
    assert!(
        r.envelope.context.error.is_none(),
        "{:?}",
        r.envelope.context.error
    );
    let v: serde_json::Value = serde_json::from_str(r.envelope.payload.get()).unwrap();
    assert_eq!(v, json!({"wrapped": {"a": 1}}));
    assert_eq!(r.envelope.context.logs.stderr, ["to stderr"]);
    t.stop().await;
}

/// A function whose workers are all busy and whose waiting line is full answers 429 with
/// Retry-After on the API and the gateway, and records nothing for the refused calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_function_answers_429_with_retry_after() {
    let t = start().await;
    t.local.set_max_waiting_calls(1);
    let c = &t.client;
    images(c).await;
    let src = "import select\ndef handle(ctx, p):\n    select.select([], [], [])\n";
    create_function(
        c,
        "stuck",
        "py",
        "stuck.py",
        src,
        json!({"concurrency": {"maxWorkers": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "stuck").await.phase(),
        Some(Phase::Ready)
    );
    c.create(&object(
        Kind::Endpoint,
        "stuck",
        json!({"function": "stuck", "paths": ["/stuck"]}),
    ))
    .await
    .unwrap();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.exec("stuck", &raw(json!(1))).await })
        })
        .collect();
    let pool = t.local.pool("default", "stuck").unwrap();
    eventually("a call waiting", || async {
        (pool.waiting() == 1).then_some(())
    })
    .await;

    let http = reqwest::Client::new();
    let api = http
        .post(format!(
            "{}/v1/namespaces/default/functions/stuck/runs",
            t.api()
        ))
        .json(&json!({"input": 1}))
        .send()
        .await
        .unwrap();
    let gw = eventually("the gateway route", || async {
        let r = http
            .get(format!("{}/stuck", t.gateway))
            .send()
            .await
            .unwrap();
        (r.status() != 404).then_some(r)
    })
    .await;
    for r in [api, gw] {
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body.to_string().contains("raise concurrency.maxWorkers"),
            "{body}"
        );
    }
    let runs = c
        .list_runs(&dispatch_client::RunQuery {
            function: Some("stuck".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(runs.is_empty(), "refused calls leave no run: {runs:?}");
    for h in held {
        h.abort();
    }
    t.stop().await;
}

/// Rollbacks back to back (issue 23): each is one call that succeeds even while the controller
/// writes the status of the one before (a 409 "changed by someone else" before the rollback
/// retried such a conflict: 3 of 3 runs of `benches/rollback.rs`), and the next answers come
/// from the version rolled to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollbacks_back_to_back_each_succeed_and_serve_their_version() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    let says = |text: &str| format!("def handle(context, payload):\n    return {text:?}\n");
    create_function(c, "f", "py", "f.py", &says("one"), json!({}))
        .await
        .unwrap();
    let v1 = settled(c, Kind::Function, "f").await;
    let mut f = v1.clone();
    f.spec["source"] = c
        .upload_source("default", "f", archive_of("f.py", &says("two")))
        .await
        .unwrap()
        .into();
    c.update(&f).await.unwrap();
    eventually("version 2 to serve", || async {
        let o = c.get(Kind::Function, "f").await.unwrap();
        (o.phase() == Some(Phase::Ready) && o.status.digest != v1.status.digest).then_some(())
    })
    .await;
    let answer = || async {
        let r = c.exec("f", &raw(json!(null))).await.unwrap();
        r.envelope.payload.get().trim_matches('"').to_string()
    };
    // Rollbacks one after the other, each while the controller deploys the one before.
    for i in 0..40u32 {
        let to = 1 + i % 2;
        let r = c.rollback("f", Some(to), None).await.unwrap();
        assert_eq!(r["version"], to);
    }
    // Then back and forth, each waiting for its first answer only.
    for _ in 0..10 {
        for (to, want) in [(1, "one"), (2, "two")] {
            c.rollback("f", Some(to), None).await.unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while answer().await != want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "version {to} never answered"
                );
            }
        }
    }
}
