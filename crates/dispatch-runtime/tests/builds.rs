//! Image builds with real pip and npm (PyPI and the npm registry, reached through the
//! machine's configured index): content-addressed reuse, one build per digest, failures
//! that leave nothing behind, functions importing their image's dependencies, gc.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatch_core::Language;
use dispatch_runtime::LocalBackend;
use dispatch_runtime::backend::{Backend, BaseImageCheck, FunctionDeploy, GcKeep, ImageBuild};
use dispatch_runtime::{BuildError, Progress};
use flate2::{Compression, write::GzEncoder};
use serde_json::value::RawValue;

fn archive(name: &str, body: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, body.as_bytes()).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

fn image(lang: Language, manifest: &str) -> ImageBuild {
    ImageBuild {
        base: BaseImageCheck {
            image: String::new(),
            language: lang,
            interpreter: None,
        },
        runtime_dependencies: Some(manifest.to_string()),
        index_url: None,
        system_dependencies: 0,
    }
}

/// A progress sink that remembers the steps.
fn steps() -> (Progress, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        Arc::new(move |step: &str| s.lock().unwrap().push(step.to_string())),
        seen,
    )
}

fn deploy(name: &str, lang: Language, file: &str, body: &str, image_build: &str) -> FunctionDeploy {
    let archive = archive(file, body);
    FunctionDeploy {
        namespace: "default".into(),
        name: name.into(),
        digest: dispatch_core::digest::sha256_parts([archive.as_slice(), image_build.as_bytes()]),
        base: BaseImageCheck {
            image: String::new(),
            language: lang,
            interpreter: None,
        },
        archive: Arc::new(archive),
        image_build: Some(image_build.to_string()),
        dependencies: None,
        index_url: None,
        handler: None,
        env: BTreeMap::new(),
        timeout: Duration::from_secs(10),
        max_workers: 1,
        min_workers: 0,
        idle_timeout: Duration::from_secs(60),
        preload: None,
        limits: Default::default(),
        network: true,
        container: false,
        stream: false,
        steps: Default::default(),
    }
}

async fn call(b: &LocalBackend, name: &str) -> serde_json::Value {
    let ctx = RawValue::from_string("{}".into()).unwrap();
    let payload = RawValue::from_string("{}".into()).unwrap();
    let out = b
        .invoke(
            "default",
            name,
            &ctx,
            &payload,
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(
        out.envelope.context.error.is_none(),
        "{:?}",
        out.envelope.context.error
    );
    serde_json::from_str(out.envelope.payload.get()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_dependencies_build_once_per_digest_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    let build = image(Language::Python3, "six==1.16.0\n");
    let digest = "sha256:".to_string() + &"a".repeat(64);
    // Two builds of the same digest at once: one pip run, the other waits and reuses it.
    let (p1, _) = steps();
    let (p2, seen2) = steps();
    let (r1, r2) = tokio::join!(
        b.build_image(&digest, &build, p1),
        b.build_image(&digest, &build, p2)
    );
    r1.unwrap();
    r2.unwrap();
    assert_eq!(b.dependency_installs(), 1);
    let (p3, seen3) = steps();
    b.build_image(&digest, &build, p3).await.unwrap();
    assert_eq!(
        b.dependency_installs(),
        1,
        "the same digest is never rebuilt"
    );
    assert!(
        seen3
            .lock()
            .unwrap()
            .contains(&"reusing the existing build".to_string())
    );
    let all: Vec<String> = seen2.lock().unwrap().clone();
    assert!(
        all.iter()
            .any(|s| s.contains("pip") || s.contains("reusing")),
        "{all:?}"
    );
    assert!(b.build_log(&digest).await.unwrap().contains("six"));

    let code = "import six\ndef handle(context, payload):\n    return {'six': six.__version__}\n";
    b.deploy_function(deploy(
        "uses-six",
        Language::Python3,
        "uses_six.py",
        code,
        &digest,
    ))
    .await
    .unwrap();
    assert_eq!(
        call(&b, "uses-six").await,
        serde_json::json!({"six": "1.16.0"})
    );

    // gc keeps what is referenced or in use, removes the rest.
    let keep = GcKeep {
        images: HashSet::from([digest.clone()]),
        functions: HashSet::new(),
    };
    assert!(
        b.gc(&keep, Duration::ZERO).await.is_empty(),
        "referenced image and live function build are kept"
    );
    b.remove_function("default", "uses-six").await;
    let removed = b.gc(&GcKeep::default(), Duration::ZERO).await;
    let kinds: Vec<&str> = removed.iter().map(|r| r.what).collect();
    assert!(
        kinds.contains(&"image-build") && kinds.contains(&"function-build"),
        "{removed:?}"
    );
    assert!(
        !dir.path()
            .join("builds/images")
            .join("a".repeat(64))
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_package_fails_with_pips_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    let build = image(
        Language::Python3,
        "no-such-package-dispatch-test-0x1f==9.9.9\n",
    );
    let digest = "sha256:".to_string() + &"b".repeat(64);
    let (p, seen) = steps();
    let err = b.build_image(&digest, &build, p).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BuildError::Step { .. }), "{msg}");
    assert!(
        msg.contains("pip install failed") && msg.contains("no-such-package-dispatch-test-0x1f"),
        "{msg}"
    );
    assert!(
        !dir.path()
            .join("builds/images")
            .join("b".repeat(64))
            .exists(),
        "no half-built venv is left"
    );
    assert!(b.build_log(&digest).await.unwrap().contains("ERROR"));
    assert!(seen.lock().unwrap().iter().any(|s| s.contains("pip")));
    // A function on it cannot deploy: the build is missing, and says so.
    let err = b
        .deploy_function(deploy(
            "f",
            Language::Python3,
            "f.py",
            "def handle(c, p):\n    return 1\n",
            &digest,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rebuild the image"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_dependencies_are_required_by_functions() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path()).unwrap();
    let build = image(
        Language::Nodejs,
        r#"{"dependencies":{"is-number":"7.0.0"}}"#,
    );
    let digest = "sha256:".to_string() + &"c".repeat(64);
    let (p, _) = steps();
    b.build_image(&digest, &build, p).await.unwrap();
    let code = "const isNumber = require('is-number');\nmodule.exports = async () => ({ five: isNumber(5), word: isNumber('x') });\n";
    b.deploy_function(deploy("isnum", Language::Nodejs, "isnum.js", code, &digest))
        .await
        .unwrap();
    assert_eq!(
        call(&b, "isnum").await,
        serde_json::json!({"five": true, "word": false})
    );
}
