//! Secrets: sealed at rest, shown as keys, revealed to admins only, injected into
//! `context.secrets`, redacted from logs, errors and run records; a missing one is an ERROR.

mod support;

use dispatch_core::{Kind, Phase};
use serde_json::json;
use serde_json::value::RawValue;
use support::*;

const PASSWORD: &str = "correct-horse-battery-staple-42";

const USES_SECRET: &str = r#"
def handle(context, payload):
    s = context["secrets"]
    print("connecting with", s["password"])
    print("length", len(s["password"]))
    if payload.get("fail"):
        raise RuntimeError("login refused for " + s["password"])
    return {"keys": sorted(s.keys()), "echo": s["password"] if payload.get("leak") else "no"}
"#;

fn files_contain(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for e in walk(dir) {
        if std::fs::read(&e).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            hits.push(e.display().to_string());
        }
    }
    hits
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_injected_and_redacted() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    // A function whose secret does not exist yet is in ERROR, not running with an empty value.
    create_function(
        c,
        "db-client",
        "py",
        "db.py",
        USES_SECRET,
        json!({"secrets": ["db"], "retry": {"maxAttempts": 1}}),
    )
    .await
    .unwrap();
    let f = settled(c, Kind::Function, "db-client").await;
    assert_eq!(f.phase(), Some(Phase::Error));
    assert!(
        f.status.reason.contains("secret \"db\" not found"),
        "{}",
        f.status.reason
    );

    c.create(&object(
        Kind::Secret,
        "db",
        json!({"data": {"user": "app", "password": PASSWORD}}),
    ))
    .await
    .unwrap();
    // Creating the secret rebuilds its functions.
    eventually("the function to recover", || async {
        let f = c.get(Kind::Function, "db-client").await.unwrap();
        (f.phase() == Some(Phase::Ready)).then_some(())
    })
    .await;

    // Shown as keys; values only when revealed.
    let shown = c.get(Kind::Secret, "db").await.unwrap();
    assert_eq!(shown.spec, json!({"keys": ["password", "user"]}));
    let listed = serde_json::to_string(&c.list(Kind::Secret).await.unwrap()).unwrap();
    assert!(!listed.contains(PASSWORD) && !listed.contains("sealed"));
    let revealed = c.get_revealed(Kind::Secret, "db").await.unwrap();
    assert_eq!(revealed.spec["data"]["password"], PASSWORD);

    // Injected, and redacted from what the call printed and from its records.
    let r = c
        .exec("db-client", &RawValue::from_string("{}".into()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        r.envelope.payload.get(),
        r#"{"keys":["password","user"],"echo":"no"}"#
    );
    assert_eq!(
        r.envelope.context.logs.stdout,
        ["connecting with [redacted]", "length 31"]
    );
    let r = c
        .exec(
            "db-client",
            &RawValue::from_string(r#"{"fail": true}"#.into()).unwrap(),
        )
        .await
        .unwrap();
    let e = r.envelope.context.error.unwrap();
    assert_eq!(e.message, "login refused for [redacted]");
    let r = c
        .exec(
            "db-client",
            &RawValue::from_string(r#"{"leak": true}"#.into()).unwrap(),
        )
        .await
        .unwrap();
    let run = c.get_run(&r.run_id.unwrap()).await.unwrap();
    assert!(
        !run.output.unwrap().get().contains(PASSWORD),
        "the run record's output is redacted"
    );
    // Async attempts keep their errors: redacted too.
    let a = c
        .exec_async(
            "db-client",
            &RawValue::from_string(r#"{"fail": true}"#.into()).unwrap(),
            None,
        )
        .await
        .unwrap();
    let dead = final_run(c, a["id"].as_str().unwrap()).await;
    assert_eq!(
        dead.attempt_errors[0].error.message,
        "login refused for [redacted]"
    );
    let runs = serde_json::to_string(&c.list_runs(&Default::default()).await.unwrap()).unwrap();
    assert!(!runs.contains(PASSWORD), "no run record holds the value");

    // At rest: nothing under the data dir holds the value.
    t.server.as_ref().unwrap().state.recorder.flush().await;
    assert_eq!(
        files_contain(t.dir.path(), PASSWORD.as_bytes()),
        Vec::<String>::new()
    );

    // In use: cannot be deleted; an update reaches the function.
    let err = c.delete(Kind::Secret, "db").await.unwrap_err();
    assert!(
        err.to_string().contains("used by functions db-client"),
        "{err}"
    );
    let mut s = c.get(Kind::Secret, "db").await.unwrap();
    s.spec = json!({"data": {"user": "app", "password": "rotated-password-2"}});
    c.update(&s).await.unwrap();
    eventually("the function to see the new value", || async {
        let r = c
            .exec("db-client", &RawValue::from_string("{}".into()).unwrap())
            .await
            .unwrap();
        let seen = r.envelope.context.logs.stdout.get(1).map(String::as_str) == Some("length 18");
        seen.then_some(())
    })
    .await;
    let rev = c.get_revealed(Kind::Secret, "db").await.unwrap();
    assert_eq!(rev.spec["data"]["password"], "rotated-password-2");
    // Bad input: empty data, bad keys, PATCH.
    let e = c
        .create(&object(Kind::Secret, "empty", json!({"data": {}})))
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().as_u16(), 400);
    let e = c
        .create(&object(
            Kind::Secret,
            "badkey",
            json!({"data": {"a b": "x"}}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().as_u16(), 400);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_reveal_or_change_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_with(dir, dispatch_server::Options::default()).await;
    let state = t.server.as_ref().unwrap().state.clone();
    let client = |tok: String| {
        dispatch_client::Client::new(&dispatch_client::Target {
            server: t.api(),
            token: Some(tok),
            namespace: "default".into(),
            insecure: false,
        })
        .unwrap()
    };
    let (admin, _) = state
        .create_token("root", dispatch_core::auth::Role::Admin, "*", None)
        .await
        .unwrap();
    let (dev, _) = state
        .create_token("dev", dispatch_core::auth::Role::Developer, "default", None)
        .await
        .unwrap();
    let admin = client(admin);
    let dev = client(dev);
    admin
        .create(&object(
            Kind::Secret,
            "s",
            json!({"data": {"k": "value-1234"}}),
        ))
        .await
        .unwrap();
    assert_eq!(
        dev.get(Kind::Secret, "s").await.unwrap().spec,
        json!({"keys": ["k"]})
    );
    assert_eq!(
        dev.get_revealed(Kind::Secret, "s")
            .await
            .unwrap_err()
            .status()
            .unwrap()
            .as_u16(),
        403
    );
    let e = dev
        .create(&object(Kind::Secret, "t", json!({"data": {"k": "v"}})))
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().as_u16(), 403);
    assert_eq!(
        dev.delete(Kind::Secret, "s")
            .await
            .unwrap_err()
            .status()
            .unwrap()
            .as_u16(),
        403
    );
    assert_eq!(
        admin.get_revealed(Kind::Secret, "s").await.unwrap().spec["data"]["k"],
        "value-1234"
    );
    t.stop().await;
}
