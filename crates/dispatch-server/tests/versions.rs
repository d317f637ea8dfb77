//! Versions, aliases, weighted traffic and promotion (issue 23) end to end: real Python
//! workers, SQLite in a tempdir, calls through the API and the gateway.

mod support;

use std::collections::HashMap;

use dispatch_client::Client;
use dispatch_core::{Kind, Phase, RunStatus};
use serde_json::json;
use support::*;

fn says(text: &str) -> String {
    format!("def handle(context, payload):\n    return {text:?}\n")
}

const FAILS: &str = "def handle(context, payload):\n    raise RuntimeError('broken build')\n";

/// Writes new code for `f` and waits until it serves it; its version number.
async fn deploy(c: &Client, f: &str, code: &str) -> u64 {
    let before = c.get(Kind::Function, f).await.unwrap();
    let mut o = before.clone();
    o.spec["source"] = c
        .upload_source("default", f, archive_of("f.py", code))
        .await
        .unwrap()
        .into();
    c.update(&o).await.unwrap();
    eventually("the new build to serve", || async {
        let o = c.get(Kind::Function, f).await.unwrap();
        (o.phase() == Some(Phase::Ready) && o.status.digest != before.status.digest).then_some(())
    })
    .await;
    newest(c, f).await
}

async fn newest(c: &Client, f: &str) -> u64 {
    c.versions(f).await.unwrap()[0]["version"].as_u64().unwrap()
}

async fn numbers(c: &Client, f: &str) -> Vec<u64> {
    c.versions(f)
        .await
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect()
}

/// The payload of one sync call of `target`, or the error's message.
async fn answer(c: &Client, target: &str) -> Result<String, String> {
    match c.exec(target, &raw(json!(null))).await {
        Ok(r) => match r.envelope.context.error {
            None => Ok(r.envelope.payload.get().trim_matches('"').to_string()),
            Some(e) => Err(e.message),
        },
        Err(e) => Err(e.to_string()),
    }
}

async fn first(c: &Client) {
    images(c).await;
    create_function(c, "f", "py", "f.py", &says("one"), json!({}))
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "f").await.phase(),
        Some(Phase::Ready)
    );
}

fn alias(name: &str, spec: serde_json::Value) -> dispatch_core::Object {
    object(Kind::Alias, name, spec)
}

/// A version for each new digest only; `hello@N` runs that build (sync and async, the run
/// naming it) beside the current one; unknown versions and aliases are 404s that say what
/// exists; a bad reference is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_to_the_version_they_name() {
    let t = start().await;
    let c = &t.client;
    first(c).await;
    assert_eq!(deploy(c, "f", &says("two")).await, 2);
    // A change that builds the same (a label) is no version.
    let mut o = c.get(Kind::Function, "f").await.unwrap();
    o.metadata.labels.insert("team".into(), "a".into());
    c.update(&o).await.unwrap();
    assert_eq!(deploy(c, "f", &says("three")).await, 3);
    assert_eq!(numbers(c, "f").await, [3, 2, 1]);

    assert_eq!(answer(c, "f").await.unwrap(), "three");
    assert_eq!(answer(c, "f@latest").await.unwrap(), "three");
    assert_eq!(answer(c, "f@1").await.unwrap(), "one");
    assert_eq!(answer(c, "f@2").await.unwrap(), "two");
    assert_eq!(answer(c, "f@3").await.unwrap(), "three");
    // The run record names the version that served it.
    let runs = c
        .list_runs(&dispatch_client::RunQuery {
            function: Some("f".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let served: Vec<Option<u32>> = runs.iter().take(5).map(|r| r.version).collect();
    assert_eq!(served, [Some(3), Some(2), Some(1), Some(3), Some(3)]);

    // Async: the version is kept for every attempt, even after the function moves on.
    let accepted = c.exec_async("f@1", &raw(json!(null)), None).await.unwrap();
    let id = accepted["runId"]
        .as_str()
        .or(accepted["id"].as_str())
        .unwrap()
        .to_string();
    let run = final_run(c, &id).await;
    assert_eq!(
        (
            run.status,
            run.version,
            run.output.map(|o| o.get().to_string())
        ),
        (RunStatus::Succeeded, Some(1), Some("\"one\"".into()))
    );

    let e = answer(c, "f@9").await.unwrap_err();
    assert!(
        e.contains("no version 9") && e.contains("dispatch get versions f"),
        "{e}"
    );
    let e = answer(c, "f@prod").await.unwrap_err();
    assert!(
        e.contains("no alias \"prod\"") && e.contains("create alias"),
        "{e}"
    );
    let e = c
        .exec_async("f@9", &raw(json!(null)), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no version 9"),
        "an async run of a missing version is refused: {e}"
    );
    let http = reqwest::Client::new();
    for bad in ["f@", "f@0", "f@Prod", "F@1", "f@1@2"] {
        let r = http
            .post(format!(
                "{}/v1/namespaces/default/functions/{bad}/runs",
                t.api()
            ))
            .json(&json!({"input": null}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body.contains("version") || body.contains("name"),
            "{bad}: {body}"
        );
    }
    // An endpoint may name a version; one the function does not keep is refused.
    let e = c
        .create(&object(
            Kind::Endpoint,
            "e9",
            json!({"function": "f@9", "paths": ["/e9"]}),
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no version 9"), "{e}");
    c.create(&object(
        Kind::Endpoint,
        "e1",
        json!({"function": "f@1", "paths": ["/e1"]}),
    ))
    .await
    .unwrap();
    let body = eventually("the endpoint to answer", || async {
        let r = http.get(format!("{}/e1", t.gateway)).send().await.ok()?;
        (r.status() == 200).then_some(())?;
        r.text().await.ok()
    })
    .await;
    assert_eq!(body, "\"one\"");

    // A subscription may name one too: its runs are version 1's.
    subscribe(c, "s1", "order.created", "f@1").await;
    c.emit(&json!({"specversion": "1.0", "id": "e-1", "source": "/shop", "type": "order.created", "data": {}}))
        .await
        .unwrap();
    let run = eventually("the event's run", || async {
        let runs = c
            .list_runs(&dispatch_client::RunQuery {
                function: Some("f".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        runs.into_iter()
            .find(|r| r.trigger == dispatch_core::Trigger::Event && r.status.is_final())
    })
    .await;
    assert_eq!((run.status, run.version), (RunStatus::Succeeded, Some(1)));
    t.stop().await;
}

/// An alias at 90/10 over 2,000 gateway calls lands within ±3 %; a caller with an affinity
/// key (header or cookie) stays on one version; keys spread over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_splits_traffic_by_weight_and_keys_stick() {
    let t = start().await;
    let c = &t.client;
    first(c).await;
    deploy(c, "f", &says("two")).await;
    c.create(&alias(
        "f.prod",
        json!({"traffic": [{"version": 1, "percent": 90}, {"version": 2, "percent": 10}]}),
    ))
    .await
    .unwrap();
    let a = settled(c, Kind::Alias, "f.prod").await;
    assert_eq!(a.phase(), Some(Phase::Ready), "{:?}", a.status);
    c.create(&object(
        Kind::Endpoint,
        "e",
        json!({"function": "f@prod", "paths": ["/p"]}),
    ))
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/p", t.gateway);
    eventually("the endpoint to answer", || async {
        let r = http.get(&url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let mut count: HashMap<String, u32> = HashMap::new();
    for _ in 0..2000 {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        *count.entry(r.text().await.unwrap()).or_default() += 1;
    }
    let two = count.get("\"two\"").copied().unwrap_or(0);
    assert_eq!(count.values().sum::<u32>(), 2000);
    assert!(
        (140..=260).contains(&two),
        "10 % ± 3 % of 2,000 is 140..260: {count:?}"
    );

    // Sticky: each key always gets one version; over 40 keys both versions are seen.
    let mut seen = HashMap::new();
    for k in 0..40 {
        let key = format!("user-{k}");
        let mut got = std::collections::BTreeSet::new();
        for i in 0..5 {
            let req = if i % 2 == 0 {
                http.get(&url).header("X-Dispatch-Affinity", &key)
            } else {
                http.get(&url)
                    .header("cookie", format!("theme=dark; dispatch-affinity={key}"))
            };
            got.insert(req.send().await.unwrap().text().await.unwrap());
        }
        assert_eq!(got.len(), 1, "key {key} saw {got:?}");
        *seen.entry(got.into_iter().next().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "40 keys land on both versions: {seen:?}");
    // The API's exec takes the same header.
    let r = http
        .post(format!(
            "{}/v1/namespaces/default/functions/f@prod/runs",
            t.api()
        ))
        .header("X-Dispatch-Affinity", "user-1")
        .json(&json!({"input": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Changing the weights moves the calls at once (the gateway reads the alias in memory).
    let mut a = c.get(Kind::Alias, "f.prod").await.unwrap();
    a.spec = json!({"version": 2});
    c.update(&a).await.unwrap();
    eventually("all calls on version 2", || async {
        let r = http.get(&url).send().await.ok()?;
        (r.text().await.ok()? == "\"two\"").then_some(())
    })
    .await;
    for _ in 0..50 {
        assert_eq!(
            http.get(&url).send().await.unwrap().text().await.unwrap(),
            "\"two\""
        );
    }
    // Weights that do not add up, or name a version the function does not keep: 400 / 422.
    for (spec, want) in [
        (
            json!({"traffic": [{"version": 1, "percent": 50}, {"version": 2, "percent": 60}]}),
            "110%",
        ),
        (json!({"version": 7}), "no version 7"),
        (
            json!({"traffic": [{"version": 1, "percent": 50}, {"version": 1, "percent": 50}]}),
            "twice",
        ),
    ] {
        let e = c
            .create(&alias("f.bad", spec))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    for (name, want) in [
        ("f.latest", "cannot be named"),
        ("nope.x", "not found"),
        ("f", "FUNCTION.ALIAS"),
    ] {
        let e = c
            .create(&alias(name, json!({"version": 1})))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
    // What names the alias keeps it (and the function) from being deleted.
    let e = c
        .delete(Kind::Alias, "f.prod")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("used by endpoints e"), "{e}");
    let e = c.delete(Kind::Function, "f").await.unwrap_err().to_string();
    assert!(e.contains("used by"), "{e}");
    t.stop().await;
}

/// A promotion whose new version fails is stopped and undone: the alias goes back to where it
/// was, and says why; one whose version answers goes to 100 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_rolls_back_when_the_new_version_fails() {
    let t = start().await;
    let c = &t.client;
    first(c).await;
    let good = deploy(c, "f", &says("two")).await;
    let bad = deploy(c, "f", FAILS).await;
    c.create(&alias("f.prod", json!({"version": 1})))
        .await
        .unwrap();
    settled(c, Kind::Alias, "f.prod").await;
    let promote = |to: u64| async move {
        let mut a = c.get(Kind::Alias, "f.prod").await.unwrap();
        a.spec["promotion"] =
            json!({"to": to, "step": 20, "every": "1s", "maxErrorRate": 5.0, "minCalls": 5});
        c.update(&a).await.unwrap();
    };
    promote(bad).await;
    // Calls flow while the promotion goes on; it must end by itself.
    let ended = eventually("the failing promotion to stop", || async {
        for _ in 0..10 {
            let _ = answer(c, "f@prod").await;
        }
        let a = c.get(Kind::Alias, "f.prod").await.unwrap();
        a.spec.get("promotion").is_none().then_some(a)
    })
    .await;
    assert_eq!(
        ended.spec["traffic"],
        json!([{"version": 1, "percent": 100}]),
        "{ended:?}"
    );
    assert!(
        ended
            .status
            .reason
            .contains(&format!("promotion to {bad} stopped"))
            && ended.status.reason.contains("errors"),
        "{:?}",
        ended.status
    );
    for _ in 0..20 {
        assert_eq!(
            answer(c, "f@prod").await.unwrap(),
            "one",
            "every call back on version 1"
        );
    }

    promote(good).await;
    let ended = eventually("the good promotion to finish", || async {
        for _ in 0..10 {
            assert!(answer(c, "f@prod").await.is_ok());
        }
        let a = c.get(Kind::Alias, "f.prod").await.unwrap();
        a.spec.get("promotion").is_none().then_some(a)
    })
    .await;
    assert_eq!(
        ended.spec["traffic"],
        json!([{"version": good, "percent": 100}])
    );
    assert!(ended.status.reason.contains("done"), "{:?}", ended.status);
    t.stop().await;
}

/// `spec.keepVersions` bounds what is kept, except versions an alias or an endpoint names;
/// a rollback with an alias moves both in one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_aliases_and_endpoints_name() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    create_function(
        c,
        "f",
        "py",
        "f.py",
        &says("one"),
        json!({"keepVersions": 2}),
    )
    .await
    .unwrap();
    settled(c, Kind::Function, "f").await;
    deploy(c, "f", &says("two")).await;
    c.create(&alias("f.prod", json!({"version": 1})))
        .await
        .unwrap();
    c.create(&object(
        Kind::Endpoint,
        "e",
        json!({"function": "f@2", "paths": ["/two"]}),
    ))
    .await
    .unwrap();
    for (n, text) in [(3, "three"), (4, "four"), (5, "five")] {
        assert_eq!(deploy(c, "f", &says(text)).await, n);
    }
    assert_eq!(
        numbers(c, "f").await,
        [5, 4, 2, 1],
        "3 went; 1 and 2 are named"
    );
    assert_eq!(answer(c, "f@1").await.unwrap(), "one");
    assert_eq!(answer(c, "f@prod").await.unwrap(), "one");
    let e = answer(c, "f@3").await.unwrap_err();
    assert!(e.contains("no version 3"), "{e}");
    // What is no longer named goes with the next version.
    c.delete(Kind::Endpoint, "e").await.unwrap();
    deploy(c, "f", &says("six")).await;
    assert_eq!(numbers(c, "f").await, [6, 5, 1]);
    // gc keeps the builds of what is kept.
    c.gc(Some("0s")).await.unwrap();
    assert_eq!(answer(c, "f@1").await.unwrap(), "one");

    let r = c.rollback("f", Some(5), Some("prod")).await.unwrap();
    assert_eq!(r["version"], 5);
    assert_eq!(
        r["alias"]["spec"]["traffic"],
        json!([{"version": 5, "percent": 100}])
    );
    eventually("version 5 to serve", || async {
        (answer(c, "f").await.ok()? == "five").then_some(())
    })
    .await;
    assert_eq!(answer(c, "f@prod").await.unwrap(), "five");
    let e = c
        .rollback("f", Some(5), Some("nope"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no alias \"nope\""), "{e}");
    t.stop().await;
}

/// The version a deploy replaced, called by number (an alias on it) within the grace, is
/// served by the replaced pool: its first call is warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replaced_version_called_by_number_is_served_warm() {
    let t = start().await;
    let c = &t.client;
    first(c).await;
    assert_eq!(answer(c, "f").await.unwrap(), "one");
    deploy(c, "f", &says("two")).await;
    let r = c.exec("f@1", &raw(json!(null))).await.unwrap();
    assert_eq!(r.envelope.payload.get(), "\"one\"");
    let run = c.get_run(r.run_id.as_deref().unwrap()).await.unwrap();
    assert_eq!((run.version, run.cold), (Some(1), false), "{run:?}");
    t.stop().await;
}
