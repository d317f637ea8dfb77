//! Images with dependencies through the API: real pip and npm, content-addressed reuse,
//! functions waiting for their image, failures with the tool's reason, restart mid-build, gc.

mod support;

use std::time::Duration;

use dispatch_core::{Kind, Phase};
use serde_json::json;
use support::*;

const REQUIREMENTS: &str = include_str!("../../../examples/python3-deps/requirements.txt");
const USES_SIX: &str = include_str!("../../../examples/python3-deps/uses_six.py");

fn deps_image(name: &str, base: &str, manifest: &str) -> dispatch_core::Object {
    object(
        Kind::Image,
        name,
        json!({"baseImage": base, "runtimeDependencies": {"manifest": manifest}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_build_once_and_functions_import_them() {
    let t = start().await;
    let c = &t.client;
    c.create(&deps_image("six-a", "python3", REQUIREMENTS))
        .await
        .unwrap();
    // Created while its image is still building: the function waits for it.
    create_function(c, "uses-six", "six-a", "uses_six.py", USES_SIX, json!({}))
        .await
        .unwrap();
    let f = settled(c, Kind::Function, "uses-six").await;
    assert_eq!(f.phase(), Some(Phase::Ready), "{:?}", f.status);
    let r = c
        .exec("uses-six", &raw(json!({"text": "hi"})))
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(r.envelope.payload.get()).unwrap(),
        json!({"six": "1.16.0", "text": "hi"})
    );

    // Same inputs (modulo comments and blank lines): same digest, no second pip run.
    c.create(&deps_image(
        "six-b",
        "python3",
        &format!("# the same\n\n{REQUIREMENTS}\n"),
    ))
    .await
    .unwrap();
    let a = settled(c, Kind::Image, "six-a").await;
    let b = settled(c, Kind::Image, "six-b").await;
    assert_eq!(b.phase(), Some(Phase::Ready));
    assert_eq!(a.status.digest, b.status.digest);
    assert_eq!(t.local.dependency_installs(), 1);
    assert!(c.image_log("six-b").await.unwrap().contains("six"));
    let err = c.image_log("nope").await.unwrap_err();
    assert_eq!(err.status().unwrap().as_u16(), 404);

    // An unchanged update does nothing: same generation, same digest, no rebuild.
    let before = c.get(Kind::Function, "uses-six").await.unwrap();
    let after = c.update(&before).await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(
        settled(c, Kind::Function, "uses-six").await.status.digest,
        before.status.digest
    );

    // Node: a package from the npm registry.
    c.create(&deps_image(
        "isnum",
        "nodejs",
        r#"{"dependencies": {"is-number": "7.0.0"}}"#,
    ))
    .await
    .unwrap();
    let code = "const isNumber = require('is-number');\nmodule.exports = async (ctx, p) => ({ n: isNumber(p.n) });\n";
    create_function(c, "isnum", "isnum", "isnum.js", code, json!({}))
        .await
        .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "isnum").await.phase(),
        Some(Phase::Ready)
    );
    let r = c.exec("isnum", &raw(json!({"n": 3}))).await.unwrap();
    assert_eq!(r.envelope.payload.get(), r#"{"n":true}"#);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_package_is_an_error_with_pips_reason_and_a_fix_rebuilds() {
    let t = start().await;
    let c = &t.client;
    c.create(&deps_image(
        "bad",
        "python3",
        "no-such-package-dispatch-test-0x2e==1.0\n",
    ))
    .await
    .unwrap();
    create_function(c, "f", "bad", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    let img = settled(c, Kind::Image, "bad").await;
    assert_eq!(img.phase(), Some(Phase::Error));
    assert!(
        img.status.reason.contains("pip install failed")
            && img
                .status
                .reason
                .contains("no-such-package-dispatch-test-0x2e"),
        "{}",
        img.status.reason
    );
    assert!(
        c.image_log("bad")
            .await
            .unwrap()
            .contains("no-such-package-dispatch-test-0x2e")
    );
    let f = settled(c, Kind::Function, "f").await;
    assert_eq!(f.phase(), Some(Phase::Error));
    assert!(
        f.status.reason.contains("image \"bad\" failed"),
        "{}",
        f.status.reason
    );

    // Fixing the image rebuilds it and then its functions.
    let mut fixed = c.get(Kind::Image, "bad").await.unwrap();
    fixed.spec = json!({"baseImage": "python3", "runtimeDependencies": {"manifest": REQUIREMENTS}});
    c.update(&fixed).await.unwrap();
    let (every, limit) = (Duration::from_millis(50), Duration::from_secs(120));
    eventually_within("the function to be rebuilt", every, limit, || async {
        let f = c.get(Kind::Function, "f").await.unwrap();
        (f.phase() == Some(Phase::Ready)).then_some(())
    })
    .await;
    assert!(
        c.exec("f", &raw(json!({"name": "x"})))
            .await
            .unwrap()
            .envelope
            .context
            .error
            .is_none()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_must_match_the_language_and_system_deps_are_refused() {
    let t = start().await;
    let c = &t.client;
    let cases = [
        (deps_image("x", "nodejs", "six==1.16.0"), "package.json"),
        (
            deps_image("x", "python3", r#"{"dependencies": {}}"#),
            "requirements.txt",
        ),
        (
            object(
                Kind::Image,
                "x",
                json!({"baseImage": "python3", "systemDependencies": [{"name": "libpq"}]}),
            ),
            "kubernetes backend",
        ),
    ];
    for (img, expect) in cases {
        let err = c.create(&img).await.unwrap_err();
        assert_eq!(err.status().unwrap().as_u16(), 400, "{err}");
        assert!(err.to_string().contains(expect), "{err}");
    }
    assert!(c.list(Kind::Image).await.unwrap().is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_build_finishes_it() {
    let t = start().await;
    t.client
        .create(&deps_image("six", "python3", REQUIREMENTS))
        .await
        .unwrap();
    // Stop while the build most likely runs (pip is killed with the controller's task).
    let dir = t.stop().await;
    let t = start_in(dir).await;
    let img = settled(&t.client, Kind::Image, "six").await;
    assert_eq!(img.phase(), Some(Phase::Ready), "{:?}", img.status);
    create_function(
        &t.client,
        "uses-six",
        "six",
        "uses_six.py",
        USES_SIX,
        json!({}),
    )
    .await
    .unwrap();
    assert_eq!(
        settled(&t.client, Kind::Function, "uses-six").await.phase(),
        Some(Phase::Ready)
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_only_what_nothing_references() {
    let t = start().await;
    let c = &t.client;
    images(c).await;
    create_function(c, "keep", "py", "hello.py", HELLO_PY, json!({}))
        .await
        .unwrap();
    create_function(
        c,
        "drop",
        "py",
        "drop.py",
        "def handle(c, p):\n    return 'drop'\n",
        json!({}),
    )
    .await
    .unwrap();
    assert_eq!(
        settled(c, Kind::Function, "keep").await.phase(),
        Some(Phase::Ready)
    );
    assert_eq!(
        settled(c, Kind::Function, "drop").await.phase(),
        Some(Phase::Ready)
    );
    let dropped = c.get(Kind::Function, "drop").await.unwrap();
    // Within the default grace nothing goes.
    assert_eq!(c.gc(None).await.unwrap()["removed"], json!([]));
    c.delete(Kind::Function, "drop").await.unwrap();
    let report = c.gc(Some("0s")).await.unwrap();
    let removed: Vec<(String, String)> = report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["what"].as_str().unwrap().to_string(),
                r["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        removed.contains(&(
            "source-blob".into(),
            dropped.spec["source"].as_str().unwrap().into()
        )),
        "{removed:?}"
    );
    assert!(
        removed.contains(&(
            "function-build".into(),
            dropped.status.digest.clone().unwrap()
        )),
        "{removed:?}"
    );
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(report["freedBytes"].as_u64().unwrap() > 0);
    // What is left still works, and a second pass finds nothing.
    assert!(
        c.exec("keep", &raw(json!({})))
            .await
            .unwrap()
            .envelope
            .context
            .error
            .is_none()
    );
    assert_eq!(c.gc(Some("0s")).await.unwrap()["removed"], json!([]));
    t.stop().await;
}
