//! WebSocket endpoints (issue 22) end to end: real Python and Node workers behind the
//! gateway, driven by the `websockets` client from PyPI (its wheel in `$DISPATCH_PY_WHEELS`,
//! downloaded by `.ci/run`), as a user's client would be.

mod support;

use dispatch_core::{Kind, RunStatus};
use serde_json::{Value, json};
use support::*;

/// Per message: the payload back, or its chunks one message each.
const ECHO: &str = r#"
def handle(context, payload):
    c = context["connection"]
    if payload == "many":
        return (str(i) for i in range(3))
    if payload == "bytes":
        return (b for b in [b"\x00\x01"])
    if payload == "fail":
        raise RuntimeError("told to fail")
    return {"got": payload, "index": c["index"], "id": c["id"]}
"#;

/// A session: one call for the connection, its messages as they come.
const CHAT: &str = r#"
def handle(context, messages):
    n = 0
    for m in messages:
        n += 1
        yield "echo %d: %s" % (n, m)
    print("closed after", n)
"#;

const NODE_CHAT: &str = r#"
module.exports.handle = async function* (context, messages) {
  let n = 0;
  for await (const m of messages) {
    n += 1;
    yield `node ${n}: ${m}`;
  }
};
"#;

/// The client: runs `steps` (a JSON list) against one URL and prints what happened.
const CLIENT: &str = r#"
import json, os, sys
from websockets.sync.client import connect
from websockets.exceptions import InvalidStatus, ConnectionClosed

url, steps = sys.argv[1], json.loads(sys.argv[2])
headers = json.loads(os.environ.get("WS_HEADERS", "{}"))
out = {"received": []}
try:
    ws = connect(url, open_timeout=30, close_timeout=5, additional_headers=headers)
except InvalidStatus as e:
    out["status"] = e.response.status_code
    out["body"] = e.response.body.decode()
    print(json.dumps(out)); sys.exit(0)
for step in steps:
    kind, arg = step[0], step[1] if len(step) > 1 else None
    if kind == "send":
        ws.send(arg)
    elif kind == "sendbytes":
        ws.send(bytes(arg))
    elif kind == "recv":
        m = ws.recv(timeout=60)
        out["received"].append(m if isinstance(m, str) else {"bytes": list(m)})
    elif kind == "wait_close":
        try:
            while True:
                m = ws.recv(timeout=60)
                out["received"].append(m)
        except ConnectionClosed as e:
            out["close"] = [e.rcvd.code, e.rcvd.reason] if e.rcvd else None
    elif kind == "close":
        ws.close()
print(json.dumps(out))
"#;

async fn client(t: &TestServer, path: &str, steps: Value) -> Value {
    client_with(t, path, steps, json!({})).await
}

/// [`client`], its upgrade request with these headers.
async fn client_with(t: &TestServer, path: &str, steps: Value, headers: Value) -> Value {
    let url = format!("{}{path}", t.gateway.replace("http://", "ws://"));
    let out = tokio::process::Command::new("python3")
        .args(["-c", CLIENT, &url, &steps.to_string()])
        .env("PYTHONPATH", py_wheels(&["websockets-"]))
        .env("WS_HEADERS", headers.to_string())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The first finished run of `function` (there is one per session; waits for it).
async fn finished_run(
    c: &dispatch_client::Client,
    function: &str,
    what: &str,
) -> dispatch_core::Run {
    eventually(what, || async {
        let runs = c
            .list_runs(&dispatch_client::RunQuery {
                function: Some(function.into()),
                ..Default::default()
            })
            .await
            .ok()?;
        runs.into_iter().find(|r| r.status.is_final())
    })
    .await
}

async fn ws_endpoint(c: &dispatch_client::Client, name: &str, function: &str, extra: Value) {
    let mut spec =
        json!({"function": function, "paths": [format!("/{name}")], "protocol": "websocket"});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    c.create(&object(Kind::Endpoint, name, spec)).await.unwrap();
}

/// Waits until the gateway routes `path` (it answers 426 to a plain GET).
async fn routed(t: &TestServer, path: &str) {
    let http = reqwest::Client::new();
    let url = format!("{}{path}", t.gateway);
    eventually(&format!("{path} to be routed"), || async {
        let r = http.get(&url).send().await.ok()?;
        (r.status() == 426).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_is_a_call_and_its_answer_comes_back() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "echo", ECHO, json!({})).await;
    ws_endpoint(c, "echo", "echo", json!({})).await;
    routed(&t, "/echo").await;
    // A plain GET is told to upgrade.
    let r = reqwest::get(format!("{}/echo", t.gateway)).await.unwrap();
    assert_eq!(r.status(), 426);
    assert!(r.text().await.unwrap().contains("WebSocket"));

    let out = client(
        &t,
        "/echo",
        json!([
            ["send", "{\"a\": 1}"],
            ["recv"],
            ["send", "plain text"],
            ["recv"],
            ["send", "many"],
            ["recv"],
            ["recv"],
            ["recv"],
            ["send", "bytes"],
            ["recv"],
            ["send", "fail"],
            ["recv"],
            ["sendbytes", [1, 2, 3]],
            ["recv"],
            ["close"]
        ]),
    )
    .await;
    let got: Vec<Value> = out["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m.as_str() {
            Some(s) => serde_json::from_str(s).unwrap_or(json!(s)),
            None => m.clone(),
        })
        .collect();
    assert_eq!(got[0]["got"], json!({"a": 1}), "JSON text is JSON: {got:?}");
    assert_eq!(got[0]["index"], 0);
    assert_eq!(got[1]["got"], "plain text");
    assert_eq!(got[1]["index"], 1);
    assert_eq!(got[1]["id"], got[0]["id"], "one connection id");
    assert_eq!(
        &got[2..5],
        &[json!(0), json!(1), json!(2)],
        "a chunk a message"
    );
    assert_eq!(
        got[5],
        json!({"bytes": [0, 1]}),
        "bytes go as a binary message"
    );
    assert_eq!(got[6]["error"]["message"], "told to fail");
    assert_eq!(got[6]["error"]["stacktrace"], json!([]));
    assert_eq!(got[7]["got"], "AQID", "a binary message arrives as base64");
    // Each message left a run record.
    let runs = eventually("a record per message", || async {
        let runs = c
            .list_runs(&dispatch_client::RunQuery {
                function: Some("echo".into()),
                ..Default::default()
            })
            .await
            .ok()?;
        (runs.len() == 6).then_some(runs)
    })
    .await;
    assert!(runs.iter().any(|r| r.status == RunStatus::Failed));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_binds_one_worker_to_the_connection() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "chat", CHAT, json!({})).await;
    ws_endpoint(c, "chat", "chat", json!({"session": true})).await;
    create_function(
        c,
        "nchat",
        "js",
        "nchat.js",
        NODE_CHAT,
        json!({"handler": "nchat.handle"}),
    )
    .await
    .unwrap();
    settled(c, Kind::Function, "nchat").await;
    ws_endpoint(c, "nchat", "nchat", json!({"session": true})).await;
    routed(&t, "/chat").await;
    routed(&t, "/nchat").await;

    let out = client(
        &t,
        "/chat",
        json!([["send", "a"], ["recv"], ["send", "b"], ["recv"], ["close"]]),
    )
    .await;
    assert_eq!(out["received"], json!(["echo 1: a", "echo 2: b"]));
    // The client's close ends the handler's messages: it returns, recorded once.
    let run = finished_run(c, "chat", "the session's record").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    assert_eq!(run.logs.stdout, vec!["closed after 2"]);
    assert_eq!(run.stream.unwrap().chunks, 2);

    let out = client(
        &t,
        "/nchat",
        json!([["send", "x"], ["recv"], ["send", "y"], ["recv"], ["close"]]),
    )
    .await;
    assert_eq!(out["received"], json!(["node 1: x", "node 2: y"]));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_per_namespace_and_by_idleness() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_with(
        dir,
        dispatch_server::Options {
            max_websockets_per_namespace: 2,
            ..no_auth()
        },
    )
    .await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "chat", CHAT, json!({})).await;
    ws_endpoint(
        c,
        "chat",
        "chat",
        json!({"session": true, "idleTimeout": "1s"}),
    )
    .await;
    ready_function(c, "echo", ECHO, json!({})).await;
    ws_endpoint(c, "echo", "echo", json!({"idleTimeout": "1s"})).await;
    routed(&t, "/chat").await;

    // Two held, the third refused with 429 and a reason.
    let url = format!("{}/echo", t.gateway.replace("http://", "ws://"));
    let three = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json\nfrom websockets.sync.client import connect\nfrom websockets.exceptions import InvalidStatus\na = connect(sys.argv[1]); b = connect(sys.argv[1])\ntry:\n    connect(sys.argv[1]); print(json.dumps({'status': 101}))\nexcept InvalidStatus as e:\n    print(json.dumps({'status': e.response.status_code, 'body': e.response.body.decode()}))\n",
            &url,
        ])
        .env("PYTHONPATH", py_wheels(&["websockets-"]))
        .output()
        .await
        .unwrap();
    let three: Value = serde_json::from_slice(&three.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&three.stderr)));
    assert_eq!(three["status"], 429, "{three}");
    assert!(
        three["body"]
            .as_str()
            .unwrap()
            .contains("--max-websockets-per-namespace"),
        "{three}"
    );
    let metrics = reqwest::get(format!("{}/metrics", t.api()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dispatch_websocket_connections_refused_total 1"),
        "{metrics}"
    );
    // Closed once silent for idleTimeout, saying why; the session's handler sees its
    // messages end and returns.
    let out = client(
        &t,
        "/chat",
        json!([["send", "a"], ["recv"], ["wait_close"]]),
    )
    .await;
    assert_eq!(out["close"][0], 1000, "{out}");
    assert!(
        out["close"][1].as_str().unwrap().contains("idleTimeout"),
        "{out}"
    );
    let run = finished_run(c, "chat", "the idle session's record").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    assert_eq!(run.logs.stdout, vec!["closed after 1"]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_settings_are_checked() {
    let t = start().await;
    let c = &t.client;
    for (spec, says) in [
        (
            json!({"function": "f", "paths": ["/w"], "protocol": "websocket", "methods": ["POST"]}),
            "GET only",
        ),
        (
            json!({"function": "f", "paths": ["/w"], "session": true}),
            "protocol: websocket",
        ),
        (
            json!({"function": "f", "paths": ["/w"], "protocol": "websocket", "idleTimeout": "2h"}),
            "longer than maxDuration",
        ),
        (
            json!({"function": "f", "paths": ["/w"], "protocol": "ftp"}),
            "expected `http` or `websocket`",
        ),
    ] {
        let e = c
            .create(&object(Kind::Endpoint, "w", spec.clone()))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{spec}: {e}");
    }
    t.stop().await;
}

/// A client that sends a message and then never reads cannot hold the handler streaming to
/// it: once nothing goes out for the endpoint's idleTimeout the call is stopped (CANCELLED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_hold_a_worker() {
    const FOREVER: &str =
        "def handle(context, payload):\n    while True:\n        yield 'x' * 65536\n";
    const DEAF: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect((host, port))
s.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 101"), head
mask, body = b"\x01\x02\x03\x04", b"go"
s.sendall(bytes([0x81, 0x80 | len(body)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
print("sent", flush=True)
sys.stdin.read()
"#;
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "forever", FOREVER, json!({"timeout": "10m"})).await;
    ws_endpoint(c, "forever", "forever", json!({"idleTimeout": "1s"})).await;
    routed(&t, "/forever").await;
    let addr: std::net::SocketAddr = t.gateway.trim_start_matches("http://").parse().unwrap();
    let mut deaf = tokio::process::Command::new("python3")
        .args(["-c", DEAF, &addr.ip().to_string(), &addr.port().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(deaf.stdout.take().unwrap()));
    assert_eq!(out.next_line().await.unwrap().as_deref(), Some("sent"));
    let run = finished_run(c, "forever", "the deaf client's call to be stopped").await;
    assert_eq!(run.status, RunStatus::Cancelled, "{:?}", run.error);
    drop(deaf);
    t.stop().await;
}

/// A message's call runs in the trace of the upgrade request's `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_calls_join_the_upgrade_requests_trace() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(
        c,
        "traced",
        "def handle(context, payload):\n    return context['trace']['traceId']\n",
        json!({}),
    )
    .await;
    ws_endpoint(c, "traced", "traced", json!({})).await;
    routed(&t, "/traced").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let out = client_with(
        &t,
        "/traced",
        json!([["send", "x"], ["recv"], ["close"]]),
        json!({"traceparent": format!("00-{trace}-00f067aa0ba902b7-01")}),
    )
    .await;
    assert_eq!(out["received"], json!([trace]), "{out}");
    let run = finished_run(c, "traced", "the message's run").await;
    assert_eq!(run.trace.map(|t| t.trace_id).as_deref(), Some(trace));
    t.stop().await;
}
