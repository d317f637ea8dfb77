//! W3C trace context through the platform: a call joins the trace of the client's
//! `traceparent` (gateway, API, sync and async, a CloudEvent's `traceparent` extension) or
//! starts one; the handler gets it as `context.trace` — the server's span for the call as the
//! parent —, the run record keeps it, an async run's callback carries it; with an OTLP
//! endpoint the server's spans reach a collector (decoded by the official Python
//! `opentelemetry-proto`) with their parents.

mod support;

use std::sync::{Arc, Mutex};

use dispatch_core::Kind;
use dispatch_core::trace::Trace;
use serde_json::{Value, json};
use support::*;

const ECHO_TRACE: &str = "def handle(context, payload):\n    return context.get('trace')\n";
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
}

/// `POST …/functions/echo/runs?wait=WAIT` with the client's traceparent.
fn exec_traced(http: &reqwest::Client, t: &TestServer, wait: bool) -> reqwest::RequestBuilder {
    http.post(format!(
        "{}/v1/namespaces/default/functions/echo/runs?wait={wait}",
        t.api()
    ))
    .header("traceparent", traceparent())
    .json(&json!({"input": {}}))
}

/// Emits a `traced.event` CloudEvent `id` (with the client's traceparent as its extension, or
/// as the request's header); the final run of its first delivery.
async fn deliver(t: &TestServer, id: &str, as_extension: bool) -> dispatch_core::Run {
    let mut event =
        json!({"specversion": "1.0", "id": id, "source": "/t", "type": "traced.event", "data": {}});
    let mut rb = reqwest::Client::new()
        .post(format!("{}/v1/namespaces/default/events", t.api()))
        .header("content-type", "application/cloudevents+json");
    if as_extension {
        event["traceparent"] = traceparent().into();
    } else {
        rb = rb.header("traceparent", traceparent());
    }
    let r = rb.body(event.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    final_run(&t.client, v["matched"][0]["runId"].as_str().unwrap()).await
}

/// What the handler saw agrees with the run record: the same trace and span, a traceparent
/// naming the server's span, its parent the client's span (when it sent one).
fn check(seen: &Value, record: &Trace, trace_id: Option<&str>) {
    assert_eq!(seen["traceId"], record.trace_id.as_str(), "{seen}");
    assert_eq!(seen["spanId"], record.span_id.as_str(), "{seen}");
    assert_eq!(
        seen["traceparent"],
        format!("00-{}-{}-01", record.trace_id, record.span_id),
        "{seen}"
    );
    assert!(
        dispatch_core::trace::parse(seen["traceparent"].as_str().unwrap()).is_some(),
        "{seen}"
    );
    match trace_id {
        Some(t) => {
            assert_eq!(record.trace_id, t);
            assert_eq!(record.parent_id.as_deref(), Some(CLIENT_SPAN));
            assert_ne!(record.span_id, CLIENT_SPAN, "the server's span is its own");
        }
        None => {
            assert_ne!(record.trace_id, CLIENT_TRACE);
            assert_eq!(record.parent_id, None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_join_the_callers_trace_or_start_one() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "echo", ECHO_TRACE, json!({})).await;
    c.create(&object(
        Kind::Endpoint,
        "echo",
        json!({"function": "echo", "methods": ["POST"], "paths": ["/echo"]}),
    ))
    .await
    .unwrap();
    let http = reqwest::Client::new();

    // Through the gateway, with and without the client's traceparent.
    for sent in [Some(traceparent()), None, Some("00-junk".to_string())] {
        let mut rb = http.post(format!("{}/echo", t.gateway)).json(&json!({}));
        if let Some(tp) = &sent {
            rb = rb.header("traceparent", tp);
        }
        let r = eventually("the endpoint to answer", || {
            let rb = rb.try_clone().unwrap();
            async move { rb.send().await.ok().filter(|r| r.status() == 200) }
        })
        .await;
        let run_id = r.headers()["x-dispatch-run-id"]
            .to_str()
            .unwrap()
            .to_string();
        let seen: Value = r.json().await.unwrap();
        let run = c.get_run(&run_id).await.unwrap();
        let trace = run.trace.expect("the record keeps the trace");
        let valid = sent.as_deref() == Some(traceparent().as_str());
        check(&seen, &trace, valid.then_some(CLIENT_TRACE));
    }

    // The API: sync, then async (accepted in the trace, run in it).
    let exec = |wait: bool| exec_traced(&http, &t, wait);
    let r = exec(true).send().await.unwrap();
    let run_id = r.headers()["x-dispatch-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    let envelope: Value = r.json().await.unwrap();
    let run = c.get_run(&run_id).await.unwrap();
    check(
        &envelope["payload"],
        &run.trace.unwrap(),
        Some(CLIENT_TRACE),
    );
    let r = exec(false).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let accepted: Value = r.json().await.unwrap();
    let run = final_run(c, accepted["id"].as_str().unwrap()).await;
    let seen: Value = serde_json::from_str(run.output.as_ref().unwrap().get()).unwrap();
    check(&seen, run.trace.as_ref().unwrap(), Some(CLIENT_TRACE));

    // A CloudEvent with the distributed-tracing extension: its delivery is in its trace;
    // without it, the event joins the trace of the request that brought it.
    subscribe(c, "traced", "traced.event", "echo").await;
    for (id, as_extension) in [("t1", true), ("t2", false)] {
        let run = deliver(&t, id, as_extension).await;
        let seen: Value = serde_json::from_str(run.output.as_ref().unwrap().get()).unwrap();
        check(&seen, run.trace.as_ref().unwrap(), Some(CLIENT_TRACE));
    }
    t.stop().await;
}

/// An async run's callback is POSTed with the run's traceparent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_runs_callback_carries_its_trace() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "echo", ECHO_TRACE, json!({})).await;
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let g = g.clone();
            async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none");
                g.lock().unwrap().push(tp.to_string());
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cb", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/namespaces/default/functions/echo/runs?wait=false",
            t.api()
        ))
        .header("traceparent", traceparent())
        .json(&json!({"input": {}, "callbackUrl": url}))
        .send()
        .await
        .unwrap();
    let accepted: Value = r.json().await.unwrap();
    let run = final_run(c, accepted["id"].as_str().unwrap()).await;
    let trace = run.trace.unwrap();
    let sent = eventually("the callback", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(sent, trace.traceparent());
    assert_eq!(trace.trace_id, CLIENT_TRACE);
    t.stop().await;
}

/// A job execution joins the trace of the `PUT /execute` request; its commands get it as
/// `TRACEPARENT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_in_its_callers_trace() {
    let t = start().await;
    let c = &t.client;
    let job = json!({"template": {"spec": {"containers": [{"name": "main", "image": "alpine:3",
        "command": ["sh", "-c", "echo \"$TRACEPARENT\""]}], "restartPolicy": "Never"}},
        "backoffLimit": 0});
    c.create(&object(
        Kind::JobTemplate,
        "traced",
        json!({"jobTemplate": {"spec": job}, "runtime": "host"}),
    ))
    .await
    .unwrap();
    let r = reqwest::Client::new()
        .put(format!("{}/execute/default/traced", t.api()))
        .header("traceparent", traceparent())
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let uuid = r.json::<Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{}/v1/namespaces/default/jobexecutions/{uuid}", t.api());
    let done: dispatch_core::JobExecution = eventually("the job to end", || async {
        let j: dispatch_core::JobExecution = reqwest::get(&url).await.ok()?.json().await.ok()?;
        j.phase.is_final().then_some(j)
    })
    .await;
    assert_eq!(done.phase, dispatch_core::JobPhase::Completed, "{done:?}");
    let trace = done.trace.expect("the execution keeps its trace");
    assert_eq!(trace.trace_id, CLIENT_TRACE);
    assert_eq!(trace.parent_id.as_deref(), Some(CLIENT_SPAN));
    assert_eq!(done.logs.stdout, [trace.traceparent()]);
    t.stop().await;
}

/// Turns the OTLP requests a collector got into one span per line (hex ids), with the
/// official Python bindings.
const DECODE_OTLP: &str = r#"
import json, sys, base64
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
for line in sys.stdin:
    req = ExportTraceServiceRequest()
    req.ParseFromString(base64.b64decode(line))
    for rs in req.resource_spans:
        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
        for ss in rs.scope_spans:
            for s in ss.spans:
                attrs = {}
                for a in s.attributes:
                    v = a.value
                    attrs[a.key] = getattr(v, v.WhichOneof("value"))
                print(json.dumps({"service": service, "scope": ss.scope.name, "name": s.name,
                    "trace": s.trace_id.hex(), "span": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                    "kind": s.kind, "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                    "status": s.status.code, "attrs": attrs}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_their_parents() {
    use base64::Engine as _;
    // The collector: keeps each request's protobuf body.
    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let g = g.clone();
                async move {
                    assert_eq!(headers["content-type"], "application/x-protobuf");
                    g.lock().unwrap().push(body.to_vec());
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let options = dispatch_server::Options {
        otlp_traces_url: Some(url),
        ..no_auth()
    };
    let t = start_with(tempfile::tempdir().unwrap(), options).await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "echo", ECHO_TRACE, json!({})).await;
    let http = reqwest::Client::new();
    let exec = |wait: bool| exec_traced(&http, &t, wait);
    let r = exec(true).send().await.unwrap();
    let sync_id = r.headers()["x-dispatch-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    let accepted: Value = exec(false).send().await.unwrap().json().await.unwrap();
    let async_run = final_run(c, accepted["id"].as_str().unwrap()).await;
    let sync_run = c.get_run(&sync_id).await.unwrap();
    // A request that is not a call: a span of its own, named by its route.
    let r = http
        .get(format!("{}/v1/namespaces/default/functions", t.api()))
        .header("traceparent", traceparent())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // An event brought by a traced request: its delivery's acceptance under the request's span.
    subscribe(c, "traced", "traced.event", "echo").await;
    let event_run = deliver(&t, "t3", false).await;
    let sent = eventually("the exporter to count sent spans", || async {
        let m = metrics(&t).await;
        let n: u64 = m.lines().find_map(|l| {
            l.strip_prefix("dispatch_trace_spans_sent_total ")?
                .parse()
                .ok()
        })?;
        (n > 0).then_some(m)
    })
    .await;
    assert!(
        sent.contains("dispatch_trace_spans_dropped_total 0"),
        "{sent}"
    );
    // The stop sends what waits.
    t.stop().await;

    let lines: String = got
        .lock()
        .unwrap()
        .iter()
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b) + "\n")
        .collect();
    let mut decode = python_with("opentelemetry-proto");
    decode.args(["-c", DECODE_OTLP]);
    let out = run_with_input(decode, lines.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |name: &str, span: Option<&str>| -> Value {
        spans
            .iter()
            .find(|s| s["name"] == name && span.is_none_or(|id| s["span"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("no span {name} {span:?} in {spans:#?}"))
    };
    for s in &spans {
        assert_eq!(s["service"], "dispatch");
        assert_eq!(s["scope"], "dispatch");
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{s}");
    }
    // The sync call: the server's span, the client's span its parent; the worker call under it.
    let st = sync_run.trace.clone().unwrap();
    let call = find("call echo", Some(&st.span_id));
    assert_eq!(call["trace"], CLIENT_TRACE);
    assert_eq!(call["parent"], CLIENT_SPAN);
    assert_eq!(call["kind"], 2, "server");
    assert_eq!(call["status"], 1, "ok");
    assert_eq!(call["attrs"]["dispatch.run_id"], sync_id.as_str());
    assert_eq!(call["attrs"]["dispatch.function"], "echo");
    assert_eq!(call["attrs"]["dispatch.trigger"], "exec");
    assert_eq!(
        call["attrs"]["dispatch.version"],
        sync_run.version.expect("a recorded version")
    );
    let worker = spans
        .iter()
        .find(|s| s["name"] == "worker call" && s["parent"] == call["span"])
        .unwrap_or_else(|| panic!("no worker call under the call in {spans:#?}"));
    assert_eq!(worker["trace"], CLIENT_TRACE);
    // The async run: its acceptance in the client's trace, the attempt under it.
    let at = async_run.trace.unwrap();
    let accept = find("accept echo", Some(&at.span_id));
    assert_eq!(
        (&accept["trace"], &accept["parent"]),
        (&json!(CLIENT_TRACE), &json!(CLIENT_SPAN))
    );
    let attempt = find("attempt 1 echo", None);
    assert_eq!(attempt["parent"], accept["span"]);
    assert_eq!(attempt["kind"], 5, "consumer");
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "worker call" && s["parent"] == attempt["span"]),
        "{spans:#?}"
    );
    // Its wait in the queue, under the acceptance, ending where the attempt starts.
    let queued = spans
        .iter()
        .find(|s| s["name"] == "queued" && s["parent"] == accept["span"])
        .unwrap_or_else(|| panic!("no queued span under the acceptance in {spans:#?}"));
    assert!(
        queued["end"].as_u64() <= attempt["start"].as_u64(),
        "{queued} {attempt}"
    );
    // The list request: the client's span its parent, the route its name.
    let list = find("GET /v1/namespaces/{ns}/{kind}", None);
    assert_eq!(
        (&list["trace"], &list["parent"], &list["kind"]),
        (&json!(CLIENT_TRACE), &json!(CLIENT_SPAN), &json!(2))
    );
    assert_eq!(list["attrs"]["http.route"], "/v1/namespaces/{ns}/{kind}");
    assert_eq!(list["attrs"]["http.response.status_code"], 200);
    // The event's ingest, and its delivery's acceptance under it.
    let ingest = find("POST /v1/namespaces/{ns}/events", None);
    assert_eq!(ingest["trace"], CLIENT_TRACE);
    let et = event_run.trace.unwrap();
    assert_eq!(et.trace_id, CLIENT_TRACE);
    let delivered = find("accept echo", Some(&et.span_id));
    assert_eq!(delivered["parent"], ingest["span"], "{spans:#?}");
    // Probes, scrapes and calls have no request span (a call's span is the request's).
    for s in &spans {
        let name = s["name"].as_str().unwrap();
        assert!(
            !name.contains("/metrics") && !name.contains("/healthz") && !name.ends_with("/runs"),
            "{name}"
        );
    }
    // Builds are spans of their own traces.
    let build = find("build function echo", None);
    assert_eq!(build["parent"], "");
    assert_eq!(build["attrs"]["dispatch.build"], "function");
}
