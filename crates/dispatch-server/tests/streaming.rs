//! Streamed answers (issue 22, its first part) end to end: Python generator handlers in real
//! sandboxed workers, called through the gateway and the API with a real HTTP client. The
//! handlers wait on a TCP socket the test holds, so that "before the handler returns" is a
//! fact the test controls, not a timing.

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;

use dispatch_core::{Kind, RunStatus};
use serde_json::json;
use support::*;

/// Yields `first`, then waits until the test sends a byte on the socket it connects to, then
/// yields `second`.
const GATED: &str = r#"
import socket
def handle(context, payload):
    yield "first;"
    s = socket.create_connection(("127.0.0.1", payload["port"]))
    s.recv(1)
    yield "second;"
    yield {"n": 3}
"#;

/// Yields 64 KiB chunks, telling the test (one byte each) as it yields.
const FLOOD: &str = r#"
import socket
def handle(context, payload):
    s = socket.create_connection(("127.0.0.1", payload["port"]))
    for i in range(payload["n"]):
        yield "x" * 65536
        s.sendall(b"+")
"#;

const FAILS_MIDWAY: &str = r#"
def handle(context, payload):
    yield "a"
    raise RuntimeError("broken mid-stream")
"#;

/// Yields, then waits on a socket the test never writes to: it outlasts its timeout.
const STUCK: &str = r#"
import socket
def handle(context, payload):
    yield "a"
    s = socket.create_connection(("127.0.0.1", payload["port"]))
    s.recv(1)
    yield "never"
"#;

async fn endpoint(
    c: &dispatch_client::Client,
    name: &str,
    function: &str,
    extra: serde_json::Value,
) {
    let mut spec =
        json!({"function": function, "paths": [format!("/{name}")], "methods": ["POST"]});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    c.create(&object(Kind::Endpoint, name, spec)).await.unwrap();
}

async fn post(t: &TestServer, path: &str, body: serde_json::Value, sse: bool) -> reqwest::Response {
    let http = reqwest::Client::new();
    eventually(&format!("{path} to answer"), || async {
        let mut rb = http.post(format!("{}{path}", t.gateway)).json(&body);
        if sse {
            rb = rb.header("accept", "text/event-stream");
        }
        let r = rb.send().await.ok()?;
        (r.status() != 404).then_some(r)
    })
    .await
}

async fn next_text(r: &mut reqwest::Response) -> String {
    String::from_utf8(r.chunk().await.unwrap().unwrap_or_default().to_vec()).unwrap()
}

/// The run id a streamed answer names in its headers.
fn run_id_of(r: &reqwest::Response) -> String {
    r.headers()["x-dispatch-run-id"]
        .to_str()
        .unwrap()
        .to_string()
}

async fn run_of(c: &dispatch_client::Client, r: &reqwest::Response) -> dispatch_core::Run {
    let id = run_id_of(r);
    eventually("the run record", || async {
        let run = c.get_run(&id).await.ok()?;
        run.status.is_final().then_some(run)
    })
    .await
}

/// Chunks reach the client while the handler is still running; the record keeps their
/// concatenation, their count and the time to the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_arrive_before_the_handler_returns() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "gated", GATED, json!({})).await;
    endpoint(c, "gated", "gated", json!({})).await;
    let gate = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();

    let mut r = post(&t, "/gated", json!({"port": port}), false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(
        next_text(&mut r).await,
        "first;",
        "the first chunk, the handler still waiting"
    );
    let (mut s, _) = gate.accept().unwrap();
    s.write_all(b"!").unwrap();
    let mut rest = String::new();
    while let Some(b) = r.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&b).unwrap());
    }
    assert_eq!(rest, "second;{\"n\":3}");
    let run = run_of(c, &r).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.output.unwrap().get(), "\"first;second;{\\\"n\\\":3}\"");
    let stream = run.stream.unwrap();
    assert_eq!((stream.chunks, stream.bytes), (3, 20));

    // Server-sent events, asked for by the client: one event per chunk, then `end`.
    let mut r = post(&t, "/gated", json!({"port": port}), true).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(next_text(&mut r).await, "data: first;\n\n");
    let (mut s, _) = gate.accept().unwrap();
    s.write_all(b"!").unwrap();
    let mut rest = String::new();
    while let Some(b) = r.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&b).unwrap());
    }
    let run = run_of(c, &r).await;
    assert_eq!(
        rest,
        format!(
            "data: second;\n\ndata: {{\"n\":3}}\n\nevent: end\ndata: {{\"runId\":\"{}\"}}\n\n",
            run.id
        )
    );
    // A handler that returns a value still answers whole, as JSON.
    ready_function(
        c,
        "plain",
        "def handle(context, payload):\n    return {'ok': 1}\n",
        json!({}),
    )
    .await;
    endpoint(c, "plain", "plain", json!({"stream": "sse"})).await;
    let r = post(&t, "/plain", json!({}), false).await;
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), "{\"ok\":1}");
    t.stop().await;
}

/// A client that stops reading holds the handler back (it does not run ahead into server
/// memory); one that disconnects cancels the call, recorded CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_handler_and_a_gone_one_cancels_it() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "flood", FLOOD, json!({"timeout": "60s"})).await;
    endpoint(c, "flood", "flood", json!({})).await;
    let progress = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = progress.local_addr().unwrap().port();
    let mut r = post(&t, "/flood", json!({"port": port, "n": 2000}), false).await;
    let first = r.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // Not reading: the handler's yields stop once the channel and the sockets are full. Its
    // progress is polled until it stays the same from one poll to the next (a handler running
    // ahead into server memory would go on to all 2,000 at once).
    let (mut s, _) = progress.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let mut seen = (0usize, usize::MAX);
    let yielded = eventually_within(
        "the handler to be held",
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(60),
        || {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => seen.0 += n,
                    Err(_) => break, // nothing more now
                }
            }
            let held = seen.0 > 0 && seen.0 == seen.1;
            seen.1 = seen.0;
            std::future::ready(held.then_some(seen.0))
        },
    )
    .await;
    assert!(
        yielded < 200,
        "a client reading nothing let the handler yield {yielded} of 2,000 chunks (64 KiB each)"
    );
    // Gone: the call is stopped and recorded as cancelled.
    let id = run_id_of(&r);
    drop(r);
    let run = eventually("the cancelled run", || async {
        let run = c.get_run(&id).await.ok()?;
        run.status.is_final().then_some(run)
    })
    .await;
    assert_eq!(run.status, RunStatus::Cancelled, "{:?}", run.error);
    assert!(run.error.unwrap().message.contains("disconnected"));
    t.stop().await;
}

/// An error after the first chunk ends the stream with an `error` event (SSE) or an
/// `x-dispatch-error` trailer, and is recorded; so does running out of time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_timeouts_after_the_first_chunk_end_the_stream() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "midway", FAILS_MIDWAY, json!({})).await;
    ready_function(c, "slow", STUCK, json!({"timeout": "2s"})).await;
    endpoint(c, "midway", "midway", json!({"stream": "sse"})).await;
    endpoint(c, "slow", "slow", json!({"stream": "sse"})).await;
    let r = post(&t, "/midway", json!({}), false).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let id = run_id_of(&r);
    let body = r.text().await.unwrap();
    let (data, error) = body.split_once("event: error\ndata: ").unwrap();
    assert_eq!(data, "data: a\n\n");
    let error: serde_json::Value = serde_json::from_str(error.trim()).unwrap();
    assert_eq!(error["message"], "broken mid-stream");
    assert_eq!(
        error["stacktrace"],
        json!([]),
        "no traceback on the gateway"
    );
    let run = final_run(c, &id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error.unwrap().message.contains("broken mid-stream"));

    let never = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = never.local_addr().unwrap().port();
    let r = post(&t, "/slow", json!({"port": port}), false).await;
    let id = run_id_of(&r);
    let body = r.text().await.unwrap();
    assert!(body.starts_with("data: a\n\nevent: error\n"), "{body}");
    assert!(body.contains("timed out"), "{body}");
    assert_eq!(final_run(c, &id).await.status, RunStatus::Timeout);

    // The API streams too (`?stream=true`), with the whole error for a token holder.
    let http = reqwest::Client::new();
    let r = http
        .post(format!(
            "{}/v1/namespaces/default/functions/midway/runs?stream=true",
            t.api()
        ))
        .json(&json!({"input": null}))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    let (_, error) = body.split_once("event: error\ndata: ").unwrap();
    let error: serde_json::Value = serde_json::from_str(error.trim()).unwrap();
    assert!(
        error["error"]["stacktrace"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{error}"
    );
    // Without asking to stream, the chunks are the answer (their concatenation).
    let r = c.exec("midway", &raw(json!(null))).await.unwrap();
    assert!(r.envelope.context.error.is_some());
    t.stop().await;
}

/// A Node handler streams too: an async generator's chunks arrive before it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_async_generators_stream() {
    const NODE_GATED: &str = r#"
const net = require('net');
module.exports.handle = async function* (context, payload) {
  yield 'first;';
  await new Promise((resolve) => {
    const s = net.connect(payload.port, '127.0.0.1');
    s.once('data', () => { s.destroy(); resolve(); });
  });
  yield 'second;';
  yield { n: 3 };
};
"#;
    let t = start().await;
    let c = &t.client;
    images(c).await;
    create_function(
        c,
        "ngated",
        "js",
        "ngated.js",
        NODE_GATED,
        json!({"handler": "ngated.handle"}),
    )
    .await
    .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "ngated").await.phase(),
        Some(dispatch_core::Phase::Ready)
    );
    endpoint(c, "ngated", "ngated", json!({"stream": "sse"})).await;
    let gate = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();
    let mut r = post(&t, "/ngated", json!({"port": port}), false).await;
    assert_eq!(next_text(&mut r).await, "data: first;\n\n");
    let (mut s, _) = gate.accept().unwrap();
    s.write_all(b"!").unwrap();
    let mut rest = String::new();
    while let Some(b) = r.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&b).unwrap());
    }
    assert!(
        rest.starts_with("data: second;\n\ndata: {\"n\":3}\n\nevent: end\n"),
        "{rest}"
    );
    let run = run_of(c, &r).await;
    assert_eq!(
        (run.status, run.stream.unwrap().chunks),
        (RunStatus::Succeeded, 3)
    );
    // An array is an answer, not a stream.
    create_function(
        c,
        "arr",
        "js",
        "arr.js",
        "module.exports.handle = async () => [1, 2];\n",
        json!({"handler": "arr.handle"}),
    )
    .await
    .unwrap();
    settled(c, Kind::Function, "arr").await;
    let r = c.exec("arr", &raw(json!(null))).await.unwrap();
    assert_eq!(r.envelope.payload.get(), "[1,2]");
    // context.stream.write: chunks from a handler that returns nothing.
    create_function(
        c,
        "nwrites",
        "js",
        "nwrites.js",
        "module.exports.handle = async (context) => {\n  await context.stream.write('a;');\n  await context.stream.write({ b: 2 });\n};\n",
        json!({"handler": "nwrites.handle"}),
    )
    .await
    .unwrap();
    settled(c, Kind::Function, "nwrites").await;
    endpoint(c, "nwrites", "nwrites", json!({})).await;
    let r = post(&t, "/nwrites", json!({}), false).await;
    assert_eq!(r.text().await.unwrap(), "a;{\"b\":2}");
    t.stop().await;
}

/// Writes through `context.stream` (not a generator), waiting on the test's gate between.
const WRITES: &str = r#"
import socket
def handle(context, payload):
    context.stream.write("first;")
    s = socket.create_connection(("127.0.0.1", payload["port"]))
    s.recv(1)
    context.stream.write({"second": 2})
"#;

/// httpx with httpx-sse (PyPI): prints each event as a JSON line as it arrives.
const SSE_CLIENT: &str = r#"
import json, sys, httpx
from httpx_sse import connect_sse
with httpx.Client(timeout=60) as client:
    with connect_sse(client, "POST", sys.argv[1], json={"port": int(sys.argv[2])}) as source:
        for ev in source.iter_sse():
            print(json.dumps({"event": ev.event, "data": ev.data}), flush=True)
"#;

/// Real clients: curl -N and httpx-sse see the first chunk while the handler still waits on
/// the test's gate, then the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_read_the_chunks_as_they_come() {
    use tokio::io::AsyncBufReadExt as _;
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "writes", WRITES, json!({})).await;
    endpoint(c, "writes", "writes", json!({})).await;
    let gate = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();
    let url = format!("{}/writes", t.gateway);
    // Routed once (the first answer may be a 404 while the route is added).
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let probe_port = probe.local_addr().unwrap().port();
    let mut warm = post(&t, "/writes", json!({"port": probe_port}), false).await;
    assert_eq!(next_text(&mut warm).await, "first;");
    probe.accept().unwrap().0.write_all(b"!").unwrap();
    drop(warm);

    let mut curl = tokio::process::Command::new("curl")
        .args(["-sSN", "-H", "content-type: application/json", "-d"])
        .arg(json!({"port": port}).to_string())
        .arg(&url)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = curl.stdout.take().unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut out, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf[..n], b"first;", "curl -N has the first chunk");
    gate.accept().unwrap().0.write_all(b"!").unwrap();
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut out, &mut rest)
        .await
        .unwrap();
    assert_eq!(rest, b"{\"second\":2}");
    assert!(curl.wait().await.unwrap().success());

    let mut py = tokio::process::Command::new("python3")
        .args(["-c", SSE_CLIENT, &url, &port.to_string()])
        .env("PYTHONPATH", py_wheels(&["httpx-", "httpx_sse-"]))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(py.stdout.take().unwrap()).lines();
    let first: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(first, json!({"event": "message", "data": "first;"}));
    gate.accept().unwrap().0.write_all(b"!").unwrap();
    let mut events = Vec::new();
    while let Some(l) = lines.next_line().await.unwrap() {
        events.push(serde_json::from_str::<serde_json::Value>(&l).unwrap());
    }
    assert_eq!(
        events[0],
        json!({"event": "message", "data": "{\"second\":2}"})
    );
    assert_eq!(events[1]["event"], "end", "{events:?}");
    assert!(py.wait().await.unwrap().success());
    t.stop().await;
}

/// `spec.idleTimeout` bounds the silence between chunks; `spec.timeout` stays the whole
/// call's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_ends_at_its_idle_timeout() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(
        c,
        "quiet",
        STUCK,
        json!({"timeout": "10m", "idleTimeout": "1s"}),
    )
    .await;
    endpoint(c, "quiet", "quiet", json!({"stream": "sse"})).await;
    let never = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = never.local_addr().unwrap().port();
    let r = post(&t, "/quiet", json!({"port": port}), false).await;
    let id = run_id_of(&r);
    let body = r.text().await.unwrap();
    assert!(body.starts_with("data: a\n\nevent: error\n"), "{body}");
    let run = final_run(c, &id).await;
    assert_eq!(run.status, RunStatus::Timeout);
    assert!(
        run.error.unwrap().message.contains("spec.idleTimeout"),
        "the record says which bound"
    );
    let e = c
        .create(&object(
            Kind::Function,
            "bad",
            json!({"image": "py", "source": format!("sha256:{}", "0".repeat(64)), "idleTimeout": "soon"}),
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.idleTimeout"), "{e}");
    t.stop().await;
}

/// An exec handler with `spec.stream: true`: what it writes to stdout goes out as it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_handlers_stream_their_stdout() {
    let t = start().await;
    let c = &t.client;
    exec_images(c).await;
    exec_function(
        c,
        "tick",
        "#!/usr/bin/env python3\nimport json, socket, sys\np = json.load(sys.stdin)\n\
         print('first;', end='', flush=True)\n\
         socket.create_connection(('127.0.0.1', p['port'])).recv(1)\n\
         print('second;', end='', flush=True)\n",
        json!({"stream": true}),
    )
    .await;
    assert_eq!(
        settled(c, Kind::Function, "tick").await.phase(),
        Some(dispatch_core::Phase::Ready)
    );
    endpoint(c, "tick", "tick", json!({})).await;
    let gate = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();
    let mut r = post(&t, "/tick", json!({"port": port}), false).await;
    assert_eq!(next_text(&mut r).await, "first;", "before the program ends");
    gate.accept().unwrap().0.write_all(b"!").unwrap();
    let mut rest = String::new();
    while let Some(b) = r.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&b).unwrap());
    }
    assert_eq!(rest, "second;");
    let run = run_of(c, &r).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    assert_eq!(run.output.unwrap().get(), "\"first;second;\"");
    assert_eq!(run.stream.unwrap().chunks, 2);
    t.stop().await;
}

/// Print `one TAG`, wait until the test sends a byte on the socket at `port` (when the payload
/// names one), then print `two TAG` (Python: to stdout, in two writes; Node: to stderr).
const TALKY_PY: &str = r#"
import socket
def handle(context, payload):
    print("one", payload.get("tag"))
    if payload.get("port"):
        s = socket.create_connection(("127.0.0.1", payload["port"]))
        s.recv(1)
    print("two", payload.get("tag"), end="")
    print("")
    return "done"
"#;
const TALKY_JS: &str = r#"
const net = require('net');
module.exports.handle = async (context, payload) => {
  console.log('one', payload.tag);
  if (payload.port) {
    await new Promise((resolve) => {
      const s = net.connect(payload.port, '127.0.0.1');
      s.once('data', () => { s.destroy(); resolve(); });
    });
  }
  console.error('two', payload.tag);
  return 'done';
};
"#;

/// Function `name` on image `sh`: an executable file `script` (`extra` merged into its spec).
async fn exec_function(
    c: &dispatch_client::Client,
    name: &str,
    script: &str,
    extra: serde_json::Value,
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(name);
    std::fs::write(&file, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let source = dispatch_client::pack::pack_path(&file).unwrap();
    let digest = c.upload_source("default", name, source).await.unwrap();
    let mut spec = json!({"image": "sh", "source": digest});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    c.create(&object(Kind::Function, name, spec)).await.unwrap();
}

/// An exec handler that talks on stderr (its logs; stdout is its answer).
const TALKY_EXEC: &str = "#!/usr/bin/env python3\nimport json, socket, sys\np = json.load(sys.stdin)\n\
print('one', p.get('tag'), file=sys.stderr, flush=True)\n\
if p.get('port'):\n    socket.create_connection(('127.0.0.1', p['port'])).recv(1)\n\
print('two', p.get('tag'), file=sys.stderr, flush=True)\nprint(json.dumps('done'))\n";

/// The talky handlers as functions `talky` (Python), `jtalky` (Node) and `xtalky` (an
/// executable), ready.
async fn talky_functions(c: &dispatch_client::Client) {
    exec_images(c).await;
    exec_function(c, "xtalky", TALKY_EXEC, json!({})).await;
    settled(c, Kind::Function, "xtalky").await;
    images(c).await;
    ready_function(c, "talky", TALKY_PY, json!({})).await;
    create_function(
        c,
        "jtalky",
        "js",
        "jtalky.js",
        TALKY_JS,
        json!({"handler": "jtalky.handle"}),
    )
    .await
    .unwrap();
    settled(c, Kind::Function, "jtalky").await;
}

/// An async run's lines reach its follower as they are printed (Python and Node), before the
/// handler returns; the record keeps them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_runs_lines_are_followed_as_they_are_printed() {
    let t = start().await;
    let c = &t.client;
    talky_functions(c).await;
    for (function, stream) in [
        ("talky", "stdout"),
        ("jtalky", "stdout"),
        ("xtalky", "stderr"),
    ] {
        let gate = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = gate.local_addr().unwrap().port();
        let accepted = c
            .exec_async(function, &raw(json!({"port": port, "tag": "async"})), None)
            .await
            .unwrap();
        let id = accepted["id"].as_str().unwrap().to_string();
        // Running once the handler is waiting on the gate.
        let (held, _) = tokio::task::spawn_blocking(move || gate.accept().unwrap())
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let follower = {
            let (c, id) = (c.clone(), id.clone());
            tokio::spawn(async move {
                c.follow_run_logs(&id, |stream, line| {
                    let _ = tx.send((stream.to_string(), line.to_string()));
                })
                .await
                .unwrap()
            })
        };
        assert_eq!(
            rx.recv().await.unwrap(),
            (stream.to_string(), "one async".to_string()),
            "{function}: the first line while the handler waits"
        );
        let mut held = held;
        held.write_all(b"!").unwrap();
        let second = rx.recv().await.unwrap();
        assert_eq!(second.1, "two async", "{function}");
        assert!(follower.await.unwrap(), "{function}: it kept up");
        let done = final_run(c, &id).await;
        assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
        let kept = match stream {
            "stdout" => &done.logs.stdout,
            _ => &done.logs.stderr,
        };
        assert_eq!(kept[0], "one async", "{function}");
        assert_eq!(done.output.unwrap().get(), "\"done\"", "{function}");
    }
    t.stop().await;
}

/// A followed function's sync calls — through the gateway (Python) and the API (Node) — send
/// their lines to its follower as they are printed, each with its run's id, before the handler
/// returns; a shutdown ends the following.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_functions_sync_calls_send_their_lines_as_they_are_printed() {
    let t = start().await;
    let c = &t.client;
    talky_functions(c).await;
    endpoint(c, "talky", "talky", json!({})).await;

    // Asked wrongly: what to fix.
    let http = reqwest::Client::new();
    let r = http
        .get(format!(
            "{}/v1/namespaces/default/functions/talky/logs",
            t.api()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("follow=true"));
    let err = c
        .follow_function_logs("nobody", |_| ())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nobody") && err.contains("not found"), "{err}");

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let followers: Vec<_> = ["talky", "jtalky"]
        .into_iter()
        .map(|function| {
            let (tx, c) = (tx.clone(), c.clone());
            tokio::spawn(async move {
                c.follow_function_logs(function, |l| {
                    if let dispatch_client::FunctionLog::Line { run, stream, line } = l {
                        let _ = tx.send((run.to_string(), stream.to_string(), line.to_string()));
                    }
                })
                .await
            })
        })
        .collect();
    // Followed once an untagged call's line comes (calls that start before are not).
    let (lines, seen) = (
        std::cell::RefCell::new(rx),
        std::cell::Cell::new((false, false)),
    );
    eventually("the follower of both functions to be attached", || async {
        post(&t, "/talky", json!({}), false).await;
        c.exec("jtalky", &raw(json!({}))).await.unwrap();
        while let Ok((_, _, line)) = lines.borrow_mut().try_recv() {
            let (py, js) = seen.get();
            seen.set((py || line == "one None", js || line == "one undefined"));
        }
        (seen.get() == (true, true)).then_some(())
    })
    .await;
    let mut rx = lines.into_inner();

    for (tag, stderr) in [("gw", "stdout"), ("api", "stderr")] {
        let gate = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = gate.local_addr().unwrap().port();
        let body = json!({"port": port, "tag": tag});
        let call = if tag == "gw" {
            let (t_gateway, body) = (t.gateway.clone(), body.clone());
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(format!("{t_gateway}/talky"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                run_id_of(&r)
            })
        } else {
            let c = c.clone();
            tokio::spawn(async move { c.exec("jtalky", &raw(body)).await.unwrap().run_id.unwrap() })
        };
        let (mut held, _) = tokio::task::spawn_blocking(move || gate.accept().unwrap())
            .await
            .unwrap();
        // The handler waits on the gate: its first line has come all the same.
        let (run, stream, _) = loop {
            let l = rx.recv().await.unwrap();
            if l.2 == format!("one {tag}") {
                break l;
            }
        };
        assert_eq!(stream, "stdout", "{tag}");
        assert!(!call.is_finished(), "{tag}: the call is still running");
        held.write_all(b"!").unwrap();
        let (run2, stream2, _) = loop {
            let l = rx.recv().await.unwrap();
            if l.2 == format!("two {tag}") {
                break l;
            }
        };
        assert_eq!((&run2, stream2.as_str()), (&run, stderr), "{tag}");
        assert_eq!(
            call.await.unwrap(),
            run,
            "{tag}: the lines' run is the call's"
        );
    }

    // A shutdown ends the following: each follower's answer ends whole (a connection cut
    // at the end of the drain would be an error here).
    t.stop().await;
    for f in followers {
        tokio::time::timeout(std::time::Duration::from_secs(60), f)
            .await
            .expect("the following to end with the server (it outlived the drain)")
            .unwrap()
            .expect("the following ended cleanly");
    }
}
