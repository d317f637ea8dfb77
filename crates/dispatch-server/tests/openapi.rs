//! The API's contract (`GET /v1/openapi.json`, OpenAPI 3.1): it lists every route the router
//! has and no other, each with exactly the methods the router takes (an undocumented method
//! is a 405, a documented one is not); junk requests to every operation get a 4xx, never a
//! 5xx; a real validator (PyPI `openapi-spec-validator`) accepts the document; and
//! `schemathesis` (PyPI), generating requests from it for every operation, finds no 5xx;
//! and real answers of the main operations match the schemas the document gives them.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::*;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_is_every_route_and_method_and_a_valid_document() {
    let t = start().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let doc: Value = http
        .get(format!("{}/v1/openapi.json", t.api()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let routed: BTreeSet<String> = dispatch_server::api::routes().paths.into_iter().collect();
    let documented: BTreeSet<String> = paths.keys().cloned().collect();
    assert_eq!(
        routed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "routes missing from the contract"
    );
    assert_eq!(
        documented.difference(&routed).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "documented paths the router does not have"
    );
    for (path, ops) in paths {
        // A namespace and names that do not exist: handlers refuse, nothing is changed.
        let concrete = path
            .replace("{ns}", "no-such-ns")
            .replace("{kind}", "functions")
            .replace("{name}", "x")
            .replace("{id}", "x")
            .replace("{uuid}", "x");
        for method in METHODS {
            let documented = ops.get(method.to_ascii_lowercase()).is_some();
            let r = http
                .request(method.parse().unwrap(), format!("{}{concrete}", t.api()))
                .header("content-type", "application/json")
                .body("{\"junk\":")
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {concrete}: {e}"));
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            assert_eq!(
                status == 405,
                !documented,
                "{method} {path}: {status} {body} (documented: {documented})"
            );
            assert!(
                !body.contains("no such API route"),
                "{method} {path} fell through to the fallback: {body}"
            );
            assert!(status < 500, "{method} {concrete}: {status} {body}");
            if status >= 400 {
                let e: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|_| panic!("{method} {concrete}: not JSON: {body}"));
                assert!(
                    e["error"]["message"].is_string(),
                    "{method} {concrete}: {e}"
                );
            }
        }
    }
    validate_with_python(&doc);
    t.stop().await;
}

/// Runs PyPI's `openapi-spec-validator` on the document.
fn validate_with_python(doc: &Value) {
    let mut validate = python_with("openapi-spec-validator");
    validate.args([
        "-c",
        "import json, sys\nfrom openapi_spec_validator import validate\n\
         from openapi_spec_validator.validation import OpenAPIV31SpecValidator\n\
         validate(json.load(sys.stdin), cls=OpenAPIV31SpecValidator)\nprint('valid')",
    ]);
    let out = run_with_input(validate, doc.to_string().as_bytes());
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("valid"),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// schemathesis reads the served document and sends what it generates for each operation
/// (its examples and fuzzed inputs, a fixed seed): no answer may be a server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    let t = start().await;
    let api = t.api();
    // It keeps a cache where it runs: a folder of the test's, not the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        python_with("schemathesis")
            .current_dir(cwd)
            .args(["-m", "schemathesis.cli", "run"])
            .arg(format!("{api}/v1/openapi.json"))
            .args(["--url", &api])
            .args(["--checks", "not_a_server_error"])
            .args([
                "--max-examples",
                "5",
                "--seed",
                "1",
                "--request-timeout",
                "20",
            ])
            .args(["--phases", "examples,fuzzing", "--no-color"])
            .output()
            .expect("python3 -m schemathesis")
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every operation was sent something (none skipped for want of a serializer).
    let count = |label: &str| -> Option<String> {
        report.lines().find_map(|l| {
            l.trim()
                .strip_prefix(label)
                .map(str::trim)
                .map(String::from)
        })
    };
    let selected = count("Selected:").and_then(|s| s.split('/').nth(1).map(String::from));
    assert!(
        selected.is_some() && count("Tested:") == selected,
        "{report}"
    );
    t.stop().await;
}

/// Checks each (path, method, status, body) against the schema the document gives that
/// answer, with the validator's own OpenAPI 3.1 schema validator.
const CHECK_ANSWERS: &str = r#"
import json, sys
from openapi_schema_validator import OAS31Validator
data = json.load(sys.stdin)
doc = data["doc"]
bad = []
for path, method, status, body in data["answers"]:
    schema = doc["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    root = dict(schema, components=doc["components"])
    errors = [e.message for e in OAS31Validator(root).iter_errors(body)]
    if errors:
        bad.append("%s %s %s: %s" % (method, path, status, errors[:3]))
print("\n".join(bad) if bad else "all match")
sys.exit(1 if bad else 0)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_their_schemas() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    ready_function(c, "hello", HELLO_PY, serde_json::json!({})).await;
    c.create(&object(
        dispatch_core::Kind::JobTemplate,
        "echo",
        serde_json::json!({"runtime": "host", "jobTemplate": {"spec": {"backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "main", "image": "alpine:3", "command": ["true"]}]}}}}}),
    ))
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let api = t.api();
    let ns = "/v1/namespaces/{ns}";
    let mut answers: Vec<Value> = Vec::new();
    let mut take = async |path: &str, method: &str, url: String, body: Option<Value>| -> Value {
        let rb = http.request(method.parse().unwrap(), format!("{api}{url}"));
        let rb = match body {
            Some(b) => rb.json(&b),
            None => rb,
        };
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        answers.push(serde_json::json!([
            path,
            method.to_ascii_lowercase(),
            status,
            v
        ]));
        v
    };
    let p = |rest: &str| format!("{ns}{rest}");
    let d = |rest: &str| format!("/v1/namespaces/default{rest}");
    let envelope = take(
        &p("/functions/{name}/runs"),
        "POST",
        d("/functions/hello/runs"),
        Some(serde_json::json!({"input": {"name": "Jon", "place": "Winterfell"}})),
    )
    .await;
    assert!(envelope["payload"].is_object(), "{envelope}");
    let runs = take(&p("/runs"), "GET", d("/runs"), None).await;
    let id = runs[0]["id"].as_str().unwrap().to_string();
    take(&p("/runs/{id}"), "GET", d(&format!("/runs/{id}")), None).await;
    take(&p("/{kind}"), "GET", d("/functions"), None).await;
    // The console's figures and source list.
    take(&p("/stats"), "GET", d("/stats"), None).await;
    take(
        &p("/functions/{name}/source"),
        "GET",
        d("/functions/hello/source"),
        None,
    )
    .await;
    take(&p("/{kind}/{name}"), "GET", d("/functions/hello"), None).await;
    take(
        "/v1/namespaces",
        "POST",
        "/v1/namespaces".into(),
        Some(serde_json::json!({"name": "team-a", "spec": {"runHistoryBudget": "64Mi"}})),
    )
    .await;
    take("/v1/namespaces", "GET", "/v1/namespaces".into(), None).await;
    take(
        "/v1/tokens",
        "POST",
        "/v1/tokens".into(),
        Some(serde_json::json!({"name": "ci", "role": "viewer", "namespace": "team-a"})),
    )
    .await;
    take("/v1/tokens", "GET", "/v1/tokens".into(), None).await;
    let accepted = take(
        "/execute/{ns}/{name}",
        "PUT",
        "/execute/default/echo".into(),
        Some(serde_json::json!("p")),
    )
    .await;
    let uuid = accepted["uuid"].as_str().unwrap().to_string();
    eventually("the job to end", || async {
        let j: Value = reqwest::get(format!("{api}/v1/namespaces/default/jobexecutions/{uuid}"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (j["phase"] == "Completed").then_some(())
    })
    .await;
    take(
        &p("/jobexecutions/{uuid}"),
        "GET",
        d(&format!("/jobexecutions/{uuid}")),
        None,
    )
    .await;
    take(&p("/jobexecutions"), "GET", d("/jobexecutions"), None).await;
    take(
        &p("/jobexecutions/{uuid}/logs"),
        "GET",
        d(&format!("/jobexecutions/{uuid}/logs")),
        None,
    )
    .await;
    let input =
        serde_json::json!({"doc": dispatch_server::api::openapi::document(), "answers": answers});
    let mut check = python_with("openapi-spec-validator");
    check.args(["-c", CHECK_ANSWERS]);
    let out = run_with_input(check, input.to_string().as_bytes());
    assert!(
        out.status.success(),
        "answers that do not match the contract:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    t.stop().await;
}
