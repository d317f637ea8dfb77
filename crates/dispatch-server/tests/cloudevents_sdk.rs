//! CloudEvents conformance with the official Python SDK (PyPI `cloudevents` 1.x):
//! events made by the SDK's own `to_binary` / `to_structured`, and a batch of its structured
//! events (`application/cloudevents-batch+json`), are posted to a real server; the function
//! they reach sees their data as the SDK meant it (JSON as JSON — the SDK sends binary-mode
//! JSON without a content type —, text as text, bytes base64-encoded) and their attributes,
//! extensions included, in `context.event`.
//!
//! The SDK comes as wheels (pure Python, imported from the zip files): `$DISPATCH_PY_WHEELS`
//! or `~/.cache/dispatch-tools/py`, filled by `.ci/run` with
//! `pip download --only-binary=:all: cloudevents==1.11.0`.

mod support;

use dispatch_core::RunStatus;
use serde_json::{Value, json};
use support::*;

const ECHO: &str = r#"
def handle(context, payload):
    return {"payload": payload, "event": context["event"]}
"#;

/// Posts events made by the SDK; prints, per case, the server's answer.
const SENDER: &str = r#"
import http.client, json, sys, urllib.parse
from cloudevents.http import CloudEvent
from cloudevents.conversion import to_binary, to_structured

url = urllib.parse.urlsplit(sys.argv[1])

# http.client sends exactly these headers, as requests.post(url, headers=h, data=body) does
# in the SDK's examples (urllib would add a form content type).
def post(headers, body):
    conn = http.client.HTTPConnection(url.hostname, url.port)
    conn.request("POST", url.path, body=body, headers=headers)
    r = conn.getresponse()
    answer = r.read()
    if r.status != 202:
        sys.exit(f"{r.status}: {answer!r}")
    return json.loads(answer)

def event(id, data, **attrs):
    return CloudEvent({"type": "sdk.test", "source": "/sdk", "id": id, "tenant": "a", **attrs}, data)

out = {}
out["binary-json"] = post(*to_binary(event("b-json", {"total": 7})))
out["structured-json"] = post(*to_structured(event("s-json", {"total": 8})))
# Text goes as bytes: the SDK's default marshaller would JSON-encode a str ("\"paid…\"").
out["binary-text"] = post(*to_binary(event("b-text", b"paid in full", datacontenttype="text/plain")))
out["binary-bytes"] = post(*to_binary(event("b-bytes", b"\x00\xff")))
out["structured-bytes"] = post(*to_structured(event("s-bytes", b"\x00\xff")))
batch = [json.loads(to_structured(event(f"batch-{i}", {"n": i}))[1]) for i in range(2)]
out["batch"] = post({"content-type": "application/cloudevents-batch+json"}, json.dumps(batch).encode())
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_the_official_python_sdk() {
    let pythonpath = py_wheels(&["cloudevents-"]);
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "echo", ECHO, json!({})).await;
    subscribe(c, "sdk", "sdk.*", "echo").await;
    let url = format!("{}/v1/namespaces/default/events", t.api());
    let out = tokio::process::Command::new("python3")
        .args(["-c", SENDER, &url])
        .env("PYTHONPATH", pythonpath)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Value = serde_json::from_slice(&out.stdout).unwrap();
    // What each function run saw.
    let seen = |answer: &Value| {
        let ids: Vec<String> = match answer.as_array() {
            // A batch answers per event.
            Some(all) => all
                .iter()
                .map(|a| a["matched"][0]["runId"].as_str().unwrap().to_string())
                .collect(),
            None => vec![answer["matched"][0]["runId"].as_str().unwrap().to_string()],
        };
        ids
    };
    let mut got = std::collections::BTreeMap::new();
    for (case, answer) in answers.as_object().unwrap() {
        for (i, id) in seen(answer).into_iter().enumerate() {
            let run = final_run(c, &id).await;
            assert_eq!(run.status, RunStatus::Succeeded, "{case}: {run:?}");
            let v: Value = serde_json::from_str(run.output.unwrap().get()).unwrap();
            got.insert(format!("{case}/{i}"), v);
        }
    }
    let payload = |k: &str| got[k]["payload"].clone();
    assert_eq!(
        payload("binary-json/0"),
        json!({"total": 7}),
        "JSON, not a string"
    );
    assert_eq!(payload("structured-json/0"), json!({"total": 8}));
    assert_eq!(payload("binary-text/0"), json!("paid in full"));
    assert_eq!(payload("binary-bytes/0"), json!("AP8="), "bytes, base64");
    assert_eq!(payload("structured-bytes/0"), json!("AP8="));
    assert_eq!(payload("batch/0"), json!({"n": 0}));
    assert_eq!(payload("batch/1"), json!({"n": 1}));
    for (case, v) in &got {
        let e = &v["event"];
        assert_eq!(
            (
                e["type"].as_str(),
                e["source"].as_str(),
                e["tenant"].as_str()
            ),
            (Some("sdk.test"), Some("/sdk"), Some("a")),
            "{case}: attributes and the extension in context.event: {e}"
        );
        assert!(e.get("data").is_none(), "{case}: no data in context.event");
    }
    assert_eq!(got.len(), 7);
    t.stop().await;
}
