//! `dispatch runner`: the function-server contract (POST / → envelope, GET /healthz) on a port,
//! for Python, Node and a handler that does not load.

mod support;

use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};
use support::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn runner(dir: &std::path::Path, language: &str, port: u16) -> Proc {
    runner_with(dir, language, port, &[])
}

/// `dispatch runner` serving `dir` on `port`, with `extra` flags.
fn runner_with(dir: &std::path::Path, language: &str, port: u16, extra: &[&str]) -> Proc {
    Proc(
        Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
            .args([
                "runner",
                "--language",
                language,
                "--port",
                &port.to_string(),
            ])
            .args(extra)
            .arg("--function-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn ready(port: u16) {
    eventually("the runner to be ready", || {
        (http_get(port, "/healthz")?.0 == 200).then_some(())
    });
}

fn post(port: u16, body: Value) -> (u16, Value) {
    let (code, _, env) = post_with_headers(port, body);
    (code, env)
}

fn post_with_headers(port: u16, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        dispatch_client::install_crypto_provider();
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (code, headers) = (r.status().as_u16(), r.headers().clone());
        (code, headers, r.json().await.unwrap())
    })
}

#[test]
fn serves_python_and_node_functions() {
    for (lang, dir) in [("python3", "python3"), ("nodejs", "nodejs")] {
        let port = free_port();
        let _r = runner(&examples().join(dir), lang, port);
        ready(port);
        let (code, env) = post(
            port,
            json!({"context": {"runId": "x"}, "payload": {"name": "pod"}}),
        );
        assert_eq!(code, 200);
        assert_eq!(
            env["payload"]["myField"], "Hello, pod from Nowhere",
            "{lang}: {env}"
        );
        assert_eq!(
            env["context"]["logs"]["stdout"][0],
            "messages to stdout show up in logs"
        );
        let (code, env) = post(port, json!({"nope": 1}));
        assert_eq!(
            (code, env["context"]["error"]["type"].as_str()),
            (400, Some("InputError")),
            "{env}"
        );
    }
}

/// A call that runs out of time says so in a header as well as in words: the Kubernetes
/// backend gives the run its TIMEOUT status from the header, never from the message.
#[test]
fn a_timed_out_call_says_so_in_a_header() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("slow.py"),
        // A slow call blocks on nothing ever becoming ready (no sleep).
        "import select\n\ndef handle(context, payload):\n    if payload.get('block'):\n        select.select([], [], [])\n    return 'done'\n",
    )
    .unwrap();
    let port = free_port();
    let _r = runner_with(dir.path(), "python3", port, &["--timeout", "500ms"]);
    ready(port);
    let header = dispatch_runtime::pool::TIMED_OUT_HEADER;
    let (code, headers, env) = post_with_headers(port, json!({"payload": {"block": false}}));
    assert_eq!(
        (code, env["payload"].as_str()),
        (200, Some("done")),
        "{env}"
    );
    assert!(headers.get(header).is_none());
    let (code, headers, env) = post_with_headers(port, json!({"payload": {"block": true}}));
    assert_eq!(code, 200);
    assert_eq!(
        env["context"]["error"]["message"], "function timed out after 500ms",
        "{env}"
    );
    assert_eq!(
        headers.get(header).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
}

/// A Python handler (`module.handle`, its source `py`) served by `dispatch runner`, the
/// Kubernetes backend's handle to it, a gate its handler can wait on, and a runtime to call it
/// from.
struct Remote {
    _runner: Proc,
    _dir: tempfile::TempDir,
    handle: dispatch_runtime::backend::FunctionHandle,
    gate: std::net::TcpListener,
    rt: tokio::runtime::Runtime,
}

fn remote(module: &str, py: &str, extra: &[&str]) -> Remote {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format!("{module}.py")), py).unwrap();
    let port = free_port();
    let handler = format!("{module}.handle");
    let mut flags = vec!["--handler", &handler];
    flags.extend_from_slice(extra);
    let runner = runner_with(dir.path(), "python3", port, &flags);
    ready(port);
    dispatch_client::install_crypto_provider();
    Remote {
        _runner: runner,
        _dir: dir,
        handle: dispatch_k8s::backend::remote_function(
            reqwest::Client::new(),
            module,
            &format!("http://127.0.0.1:{port}"),
            "img",
        ),
        gate: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    }
}

/// One call on `handle` in a task of its own (a minute to end): `payload` as its payload,
/// its chunks, lines or messages through `sink`.
fn spawn_call(
    handle: &dispatch_runtime::backend::FunctionHandle,
    payload: Value,
    sink: dispatch_runtime::Sink,
) -> tokio::task::JoinHandle<dispatch_runtime::CallOutcome> {
    let handle = handle.clone();
    tokio::spawn(async move {
        let ctx = serde_json::value::to_raw_value(&json!({})).unwrap();
        let payload = serde_json::value::to_raw_value(&payload).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        handle
            .invoke_streaming(&ctx, &payload, deadline, &sink)
            .await
            .unwrap()
    })
}

/// A streamed call that ended without an error after `chunks` chunks.
fn streamed_ok(out: dispatch_runtime::CallOutcome, chunks: u64) {
    assert!(
        out.envelope.context.error.is_none(),
        "{:?}",
        out.envelope.context.error
    );
    assert_eq!(out.stream.unwrap().chunks, chunks);
}

/// The Kubernetes backend streams through the function's Service: its handle asks the
/// runner for frames and hands each chunk on as it comes (the handler still waiting on the
/// test's gate), then how the call ended; a caller that goes away stops the call there.
#[test]
fn the_kubernetes_handle_streams_through_the_runner() {
    use std::io::Write as _;
    let r = remote(
        "gated",
        "import socket\ndef handle(context, payload):\n    yield 'first;'\n    \
         socket.create_connection(('127.0.0.1', payload['port'])).recv(1)\n    yield b'\\x00'\n",
        &[],
    );
    // Moved out one by one: the runner and its directory stay until the test ends.
    let (handle, gate, rt) = (r.handle, r.gate, r.rt);
    let gate_port = gate.local_addr().unwrap().port();
    rt.block_on(async move {
        let (sink, opened) = dispatch_runtime::Sink::new(4);
        let call = spawn_call(&handle, json!({"port": gate_port}), sink);
        let mut rx = opened.await.unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!((&first.data[..], first.binary), (&b"first;"[..], false));
        let gate = tokio::task::spawn_blocking(move || {
            gate.accept().unwrap().0.write_all(b"!").unwrap();
            gate
        })
        .await
        .unwrap();
        let second = rx.recv().await.unwrap();
        assert_eq!((&second.data[..], second.binary), (&b"\x00"[..], true));
        streamed_ok(call.await.unwrap(), 2);

        // Gone after the first chunk: the call ends cancelled.
        let (sink, opened) = dispatch_runtime::Sink::new(1);
        let call = spawn_call(&handle, json!({"port": gate_port}), sink);
        let mut rx = opened.await.unwrap();
        rx.recv().await.unwrap();
        drop(rx);
        tokio::task::spawn_blocking(move || gate.accept().unwrap().0.write_all(b"!").unwrap())
            .await
            .unwrap();
        let out = call.await.unwrap();
        assert!(out.cancelled, "{:?}", out.envelope.context.error);
    });
}

/// Through the runner, the Kubernetes handle also follows a call's lines as they are printed
/// (the handler still waiting on the test's gate) and serves a WebSocket session: messages go
/// up the request's body as they come, what the handler yields comes back, and the end of
/// the messages ends the call.
#[test]
fn the_kubernetes_handle_follows_lines_and_serves_sessions_through_the_runner() {
    use std::io::Write as _;
    let r = remote(
        "both",
        r#"import socket
def handle(context, payload):
    if isinstance(payload, dict):
        print("one")
        socket.create_connection(("127.0.0.1", payload["port"])).recv(1)
        print("two")
        return "done"
    return echo(payload)

def echo(messages):
    for m in messages:
        yield m.upper() if isinstance(m, str) else m[::-1]
"#,
        &[],
    );
    // Moved out one by one: the runner and its directory stay until the test ends.
    let (handle, gate, rt) = (r.handle, r.gate, r.rt);
    let gate_port = gate.local_addr().unwrap().port();
    rt.block_on(async move {
        use dispatch_runtime::{Inbound, Sink};
        // Live lines.
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        let sink = Sink::logs_only(std::sync::Arc::new(move |l| {
            let _ = tx.send(l);
        }));
        let call = spawn_call(&handle, json!({"port": gate_port}), sink);
        let one = lines.recv().await.unwrap();
        assert_eq!((one.stream, one.line.as_str()), ("stdout", "one"));
        assert!(!call.is_finished(), "the handler waits on the gate");
        tokio::task::spawn_blocking(move || gate.accept().unwrap().0.write_all(b"!").unwrap())
            .await
            .unwrap();
        assert_eq!(lines.recv().await.unwrap().line, "two");
        let out = call.await.unwrap();
        assert_eq!(out.envelope.payload.get(), r#""done""#);
        assert_eq!(out.envelope.context.logs.stdout, ["one", "two"]);

        // A session.
        let (messages, inbox) = tokio::sync::mpsc::channel(4);
        let (sink, opened) = Sink::new(4);
        let call = spawn_call(&handle, json!(null), sink.with_inbox(inbox));
        messages.send(Inbound::Text("hi".into())).await.unwrap();
        let mut rx = opened.await.unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!((&first.data[..], first.binary), (&b"HI"[..], false));
        assert!(!call.is_finished(), "the session is open");
        messages
            .send(Inbound::Binary(bytes::Bytes::from_static(b"\x01\x02")))
            .await
            .unwrap();
        let second = rx.recv().await.unwrap();
        assert_eq!((&second.data[..], second.binary), (&b"\x02\x01"[..], true));
        drop(messages);
        streamed_ok(call.await.unwrap(), 2);
    });
}

/// A session through the runner lasts as long as the server says (the endpoint's
/// maxDuration), not the function's timeout: a runner whose calls may take 1 ms still echoes
/// a session's messages (before, the session ended at once with a timeout).
#[test]
fn a_session_through_the_runner_outlasts_the_functions_timeout() {
    let r = remote(
        "echo",
        "def handle(context, messages):\n    for m in messages:\n        yield m.upper()\n",
        &["--timeout", "1ms"],
    );
    let handle = r.handle;
    r.rt.block_on(async move {
        let (messages, inbox) = tokio::sync::mpsc::channel(4);
        let (sink, opened) = dispatch_runtime::Sink::new(4);
        let call = spawn_call(&handle, json!(null), sink.with_inbox(inbox));
        messages
            .send(dispatch_runtime::Inbound::Text("hi".into()))
            .await
            .unwrap();
        let mut rx = opened.await.expect("an echo, not a timeout");
        assert_eq!(&rx.recv().await.unwrap().data[..], b"HI");
        drop(messages);
        streamed_ok(call.await.unwrap(), 1);
    });
}

#[test]
fn a_handler_that_does_not_load_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.py"), "import no_such_module_q\n").unwrap();
    let out = Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
        .args([
            "runner",
            "--language",
            "python3",
            "--port",
            &free_port().to_string(),
            "--function-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not load") && err.contains("no_such_module_q"),
        "{err}"
    );
}

#[test]
fn prints_crds_for_every_kind() {
    let out = Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
        .args(["k8s", "crds"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.matches("kind: CustomResourceDefinition").count(),
        dispatch_core::Kind::ALL.len()
    );
    assert!(
        text.contains("name: functions.dispatch.dev")
            && text.contains("name: jobtemplates.dispatch.dev")
    );
}
