//! Function images pushed to a real registry: the CNCF registry (Debian's `docker-registry`)
//! on a loopback port, `dispatch k8s image` as a user runs it, `skopeo inspect` reading the
//! result back, and the image's layers unpacked and served by `dispatch runner` from them.

mod support;

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};

use dispatch_k8s::oci::{LayerBuilder, Registry, RegistryOptions};
use dispatch_k8s::testing::FakeApi;
use serde_json::{Value, json};
use support::*;

/// A small base image of our own in the registry: one layer, a Python-image-like config.
fn push_base(host: &str) -> String {
    let mut b = LayerBuilder::new();
    b.file("/etc/os-release", 0o644, &b"ID=test\n"[..]).unwrap();
    let layer = b.finish("base").unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHON_VERSION=3.11.7"], "Cmd": ["python3"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created_by": "test base"}]
    });
    let reference = format!("{host}/base/python:3.11");
    let reg = Registry::new(RegistryOptions {
        insecure: vec![host.to_string()],
        ..Default::default()
    });
    rt().block_on(reg.push_scratch(&reference, &[layer], &config))
        .unwrap();
    reference
}

fn dispatch_image(args: &[&str]) -> std::process::Output {
    Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
        .args(["k8s", "image"])
        .args(args)
        .env_remove("DOCKER_CONFIG")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()
}

fn pushed(args: &[&str]) -> Value {
    let out = dispatch_image(args);
    assert!(
        out.status.success(),
        "dispatch k8s image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn skopeo(args: &[&str]) -> Value {
    let out = Command::new(program("skopeo"))
        .args(["inspect", "--tls-verify=false"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Files of a layer blob: path → bytes.
fn layer_files(host: &str, repo: &str, digest: &str) -> Vec<(String, Vec<u8>)> {
    let url = format!("http://{host}/v2/{repo}/blobs/{digest}");
    let gz = rt().block_on(async { reqwest::get(&url).await.unwrap().bytes().await.unwrap() });
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (e.path().unwrap().display().to_string(), data)
        })
        .collect()
}

#[test]
fn function_images_are_built_pushed_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry(dir.path());
    let base = push_base(&host);

    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(
        src.join("hello.py"),
        "import six\n\ndef handle(context, payload):\n    return {'six': six.__name__, 'hi': payload}\n",
    )
    .unwrap();
    let reqs = dir.path().join("requirements.txt");
    std::fs::write(&reqs, "six==1.16.0\n").unwrap();
    let repository = format!("{host}/dispatch");
    let args = [
        "hello",
        src.to_str().unwrap(),
        "--language",
        "python3",
        "--base",
        &base,
        "--repository",
        &repository,
        "--dependencies",
        reqs.to_str().unwrap(),
        "--insecure-registry",
        &host,
        "-o",
        "json",
    ];
    let first = pushed(&args);
    let reference = first["reference"].as_str().unwrap();
    assert!(
        reference.starts_with(&format!("{host}/dispatch/hello@sha256:")),
        "{first}"
    );
    // runner, bootstrap, dependencies, source, config (the base layer was mounted).
    assert_eq!(first["blobsPushed"], 5, "{first}");
    assert_eq!(first["blobsMounted"], 1, "{first}");
    assert_eq!(first["manifestPushed"], true);

    // skopeo reads it back, by digest.
    let inspected = skopeo(&[&format!("docker://{reference}")]);
    assert_eq!(inspected["Digest"], first["digest"]);
    let layers: Vec<&str> = inspected["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(layers.len(), 5, "base + runner + bootstrap + deps + source");
    let config = skopeo(&["--config", &format!("docker://{reference}")]);
    assert_eq!(
        config["config"]["Entrypoint"],
        json!(["/dispatch/bin/dispatch", "runner"])
    );
    let env: Vec<&str> = config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for want in [
        "PYTHON_VERSION=3.11.7",
        "DISPATCH_LANGUAGE=python3",
        "DISPATCH_HANDLER=hello.handle",
        "PYTHONPATH=/dispatch/deps/python",
        "PORT=8080",
    ] {
        assert!(env.contains(&want), "{want} not in {env:?}");
    }

    // The layers hold the runner (this very binary), the bootstrap, six and the source.
    let files: Vec<Vec<(String, Vec<u8>)>> = layers[1..]
        .iter()
        .map(|d| layer_files(&host, "dispatch/hello", d))
        .collect();
    let find = |path: &str| {
        files
            .iter()
            .flatten()
            .find(|(p, _)| p == path)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("{path} is in no layer"))
    };
    assert_eq!(
        find("dispatch/bin/dispatch"),
        std::fs::read(assert_cmd::cargo::cargo_bin("dispatch")).unwrap()
    );
    assert!(
        String::from_utf8(find("dispatch/runtimes/bootstrap.py"))
            .unwrap()
            .contains("def serve(")
    );
    assert!(!find("dispatch/deps/python/six.py").is_empty());
    assert!(
        String::from_utf8(find("function/hello.py"))
            .unwrap()
            .contains("import six")
    );

    // Unchanged: nothing is pushed, same digest.
    let again = pushed(&args);
    assert_eq!(again["digest"], first["digest"]);
    assert_eq!(again["blobsPushed"], 0, "{again}");
    assert_eq!(again["manifestPushed"], false);

    // The unpacked layers are a working function: dispatch runner serves it with the image's
    // bootstrap and dependencies.
    let root = unpack(&files, &dir.path().join("rootfs"));
    let answer = serve(&root, &config, json!({"payload": "there"}));
    assert_eq!(answer["payload"], json!({"six": "six", "hi": "there"}));

    // A changed source pushes its layer, the config and the manifest; nothing else.
    std::fs::write(
        src.join("hello.py"),
        "def handle(context, payload):\n    return 2\n",
    )
    .unwrap();
    let changed = pushed(&args);
    assert_ne!(changed["digest"], first["digest"]);
    assert_eq!(changed["blobsPushed"], 2, "{changed}");
    assert_eq!(changed["manifestPushed"], true);
}

/// Writes the layers' files under `root` (later layers win).
fn unpack(layers: &[Vec<(String, Vec<u8>)>], root: &Path) -> std::path::PathBuf {
    for layer in layers {
        for (path, data) in layer {
            let p = root.join(path);
            if path.ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, data).unwrap();
            }
        }
    }
    root.to_path_buf()
}

/// Starts `dispatch runner` on an unpacked image with the environment its config declares
/// (image paths moved under `root`; the host's PATH; PORT = `port`).
fn start_runner(
    root: &Path,
    config: &Value,
    port: u16,
    container_env: &[(String, String)],
) -> Proc {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("dispatch"));
    cmd.arg("runner")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for e in config["config"]["Env"].as_array().unwrap() {
        let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
        match (k, v) {
            ("PATH", _) => {}
            ("PORT", _) => {
                cmd.env(k, port.to_string());
            }
            (_, v) if v.starts_with("/dispatch") || v.starts_with("/function") => {
                cmd.env(k, root.join(&v[1..]));
            }
            _ => {
                cmd.env(k, v);
            }
        }
    }
    // The pod's own variables (the Deployment's container env) come on top, as in a pod.
    cmd.envs(container_env.iter().filter(|(k, _)| k != "PORT").cloned());
    Proc(cmd.spawn().unwrap())
}

/// Runs the unpacked image and makes one call.
fn serve(root: &Path, config: &Value, call: Value) -> Value {
    let port = free_port();
    let _runner = start_runner(root, config, port, &[]);
    eventually("the runner to be ready", || {
        (http_get(port, "/healthz")?.0 == 200).then_some(())
    });
    rt().block_on(async {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/"))
            .json(&call)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

#[test]
fn node_function_images_carry_pure_packages() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry(dir.path());
    let base = push_base(&host);
    let src = dir.path().join("check.js");
    std::fs::write(
        &src,
        "const isNumber = require('is-number');\nmodule.exports = async (context, payload) => ({ n: isNumber(payload) });\n",
    )
    .unwrap();
    let pkg = dir.path().join("package.json");
    std::fs::write(
        &pkg,
        r#"{"name": "check", "version": "1.0.0", "dependencies": {"is-number": "7.0.0"}}"#,
    )
    .unwrap();
    let repository = format!("{host}/dispatch");
    let first = pushed(&[
        "check",
        src.to_str().unwrap(),
        "--base",
        &base,
        "--repository",
        &repository,
        "--dependencies",
        pkg.to_str().unwrap(),
        "--insecure-registry",
        &host,
        "-o",
        "json",
    ]);
    let reference = first["reference"].as_str().unwrap();
    let inspected = skopeo(&[&format!("docker://{reference}")]);
    let files: Vec<_> = inspected["Layers"].as_array().unwrap()[1..]
        .iter()
        .map(|d| layer_files(&host, "dispatch/check", d.as_str().unwrap()))
        .collect();
    let paths: Vec<&str> = files.iter().flatten().map(|(p, _)| p.as_str()).collect();
    for want in [
        "dispatch/runtimes/bootstrap.js",
        "dispatch/deps/node_modules/is-number/index.js",
        "function/check.js",
    ] {
        assert!(paths.contains(&want), "{want} not in {paths:?}");
    }
    let config = skopeo(&["--config", &format!("docker://{reference}")]);
    assert!(
        config["config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&json!("NODE_PATH=/dispatch/deps/node_modules")),
        "{config}"
    );
    let root = unpack(&files, &dir.path().join("rootfs"));
    let answer = serve(&root, &config, json!({"payload": 7}));
    assert_eq!(answer["payload"], json!({"n": true}), "{answer}");
}

#[test]
fn image_errors_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry(dir.path());
    let base = push_base(&host);
    let hello = examples().join("python3/hello.py");
    let repository = format!("{host}/dispatch");
    let fails = |extra: &[&str]| {
        let mut args = vec![hello.to_str().unwrap(), "--repository", &repository];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--insecure-registry", &host]);
        let mut all = vec!["hello"];
        all.extend(args);
        let out = dispatch_image(&all);
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = format!("{host}/base/none:1");
    let err = fails(&["--base", &missing]);
    assert!(
        err.contains("base/none") && err.contains("reading the manifest"),
        "{err}"
    );
    let err = fails(&["--base", &base, "--handler", "nope.handle"]);
    assert!(err.contains("nope"), "{err}");
    // Nothing was pushed for the failed builds.
    let tags = http_get(
        host.rsplit_once(':').unwrap().1.parse().unwrap(),
        "/v2/dispatch/hello/tags/list",
    )
    .unwrap();
    assert_eq!(tags.0, 404, "{tags:?}");
}

type MockHandle =
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

/// Answers the next API request with `status` and `body` (null: what was sent, as an apply
/// answers); returns method, path and body sent.
async fn api_answer(h: &mut MockHandle, status: u16, body: Value) -> (String, String, Value) {
    let (req, send) = h.next_request().await.expect("a request to the API server");
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let body = if body.is_null() { sent.clone() } else { body };
    send.send_response(
        http::Response::builder()
            .status(status)
            .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    (method, uri, sent)
}

/// The Kubernetes backend end to end, with the cluster's API server mocked (kube's
/// tower-test) and everything else real: the image is pushed to the registry and pullable,
/// the Deployment names it, the deploy waits for the rollout, calls reach the function's
/// "Service" (a dispatch runner on a local port), removal deletes both objects.
#[test]
fn kubernetes_backend_deploys_calls_and_removes() {
    use dispatch_k8s::backend::{KubernetesBackend, KubernetesOptions};
    use dispatch_runtime::backend::{Backend, BaseImageCheck, FunctionDeploy};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry(dir.path());
    let base = push_base(&host);
    // The function's Service: a runner serving the same source.
    let port = free_port();
    let _service = Proc(
        Command::new(assert_cmd::cargo::cargo_bin("dispatch"))
            .args([
                "runner",
                "--language",
                "python3",
                "--port",
                &port.to_string(),
            ])
            .arg("--function-dir")
            .arg(examples().join("python3"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("the function's runner", || {
        (http_get(port, "/healthz")?.0 == 200).then_some(())
    });

    rt().block_on(async {
        let (svc, mut api) = tower_test::mock::pair();
        let client = kube::Client::new(svc, "default");
        let mut options = KubernetesOptions::new(
            format!("{host}/dispatch"),
            assert_cmd::cargo::cargo_bin("dispatch"),
        );
        options.registry = RegistryOptions {
            insecure: vec![host.clone()],
            ..Default::default()
        };
        options.poll_interval = Duration::from_millis(10);
        options.function_url = Arc::new(move |_, _| format!("http://127.0.0.1:{port}"));
        let backend = KubernetesBackend::new(client, options);

        let base_check = BaseImageCheck {
            image: base.clone(),
            language: dispatch_core::Language::Python3,
            interpreter: None,
        };
        backend.check_base_image(&base_check).await.unwrap();
        let missing = BaseImageCheck {
            image: format!("{host}/base/none:1"),
            ..base_check.clone()
        };
        let err = backend.check_base_image(&missing).await.unwrap_err();
        assert!(err.to_string().contains("base/none"), "{err}");

        let archive = dispatch_client::pack::pack_path(&examples().join("python3/hello.py")).unwrap();
        let deploy = FunctionDeploy {
            namespace: "default".into(),
            name: "hello".into(),
            digest: dispatch_core::digest::sha256_parts([archive.as_slice()]),
            base: base_check,
            archive: Arc::new(archive),
            image_build: None,
            dependencies: None,
            index_url: None,
            handler: None,
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            timeout: Duration::from_secs(10),
            max_workers: 3,
            min_workers: 1,
            idle_timeout: Duration::from_secs(300),
            preload: None,
            limits: Default::default(),
            network: true,
            container: false,
            stream: false,
            steps: Default::default(),
        };
        let cluster = tokio::spawn(async move {
            let (m, uri, deployment) = api_answer(&mut api, 200, Value::Null).await;
            assert_eq!(m, "PATCH");
            assert!(uri.starts_with("/apis/apps/v1/namespaces/default/deployments/fn-hello?"), "{uri}");
            let (m, uri, _) = api_answer(&mut api, 200, Value::Null).await;
            assert!(m == "PATCH" && uri.starts_with("/api/v1/namespaces/default/services/fn-hello?"), "{uri}");
            // Network allowed: no NetworkPolicy (one from before is deleted).
            let (m, uri, _) = api_answer(&mut api, 404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "gone"})).await;
            assert!(m == "DELETE" && uri.contains("/networkpolicies/fn-hello"), "{uri}");
            // maxWorkers 3 fits one pod: no autoscaler (one from before is deleted).
            let (m, uri, _) = api_answer(&mut api, 404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "gone"})).await;
            assert!(m == "DELETE" && uri.contains("/horizontalpodautoscalers/fn-hello"), "{uri}");
            // Rolling out, then rolled out.
            let mut d = deployment.clone();
            d["metadata"]["generation"] = json!(2);
            d["status"] = json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1});
            let (m, uri, _) = api_answer(&mut api, 200, d.clone()).await;
            assert!(m == "GET" && uri.starts_with("/apis/apps/v1/namespaces/default/deployments/fn-hello"), "{uri}");
            d["status"] = json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1});
            api_answer(&mut api, 200, d).await;
            // Removal.
            let (m, uri, _) = api_answer(&mut api, 200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})).await;
            assert!(m == "DELETE" && uri.contains("/deployments/fn-hello"), "{uri}");
            let (m, uri, _) = api_answer(&mut api, 404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "gone"})).await;
            assert!(m == "DELETE" && uri.contains("/services/fn-hello"), "{uri}");
            let (m, uri, _) = api_answer(&mut api, 404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "gone"})).await;
            assert!(m == "DELETE" && uri.contains("/horizontalpodautoscalers/fn-hello"), "{uri}");
            let (m, uri, _) = api_answer(&mut api, 404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "gone"})).await;
            assert!(m == "DELETE" && uri.contains("/networkpolicies/fn-hello"), "{uri}");
            deployment
        });
        let t = Instant::now();
        backend.deploy_function(deploy.clone()).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(60));

        let ctx = serde_json::value::to_raw_value(&json!({})).unwrap();
        let payload = serde_json::value::to_raw_value(&json!({"name": "k8s"})).unwrap();
        let out = backend
            .invoke("default", "hello", &ctx, &payload, Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        let env = serde_json::to_value(&out.envelope).unwrap();
        assert_eq!(env["payload"]["myField"], "Hello, k8s from Nowhere", "{env}");
        assert!(!out.timed_out);
        // No answer by the deadline: a typed timeout (the run's TIMEOUT status), not a
        // message to parse.
        let late = backend
            .invoke("default", "hello", &ctx, &payload, Instant::now())
            .await
            .unwrap();
        assert!(late.timed_out, "{:?}", late.envelope.context.error);
        let err = backend
            .invoke("default", "ghost", &ctx, &payload, Instant::now() + Duration::from_secs(10))
            .await
            .expect_err("an undeployed function");
        assert!(err.to_string().contains("ghost"), "{err}");

        // The same build again: nothing to do (no request reaches the API server).
        backend.deploy_function(deploy).await.unwrap();
        backend.remove_function("default", "hello").await;
        let deployment = cluster.await.unwrap();

        // The Deployment runs the pushed image, pullable by digest.
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let image = container["image"].as_str().unwrap().to_string();
        assert!(image.starts_with(&format!("{host}/dispatch/default/hello@sha256:")), "{image}");
        assert!(container["env"].as_array().unwrap().contains(&json!({"name": "GREETING", "value": "hi"})));
        assert_eq!(container["env"][1], json!({"name": "DISPATCH_HANDLER", "value": "hello.handle"}));
        tokio::task::spawn_blocking(move || skopeo(&[&format!("docker://{image}")]))
            .await
            .unwrap();
    });
}

/// A stand-in for a cluster behind kube's mock API server: applied Deployments are "run" by
/// pulling their image from the registry, unpacking its layers and starting its entrypoint
/// (`dispatch runner`) with the image's environment on a free port; GETs report them rolled
/// out; deletes stop them. Functions are reached at their runner's port.
struct FakeCluster {
    ports: Arc<Mutex<HashMap<String, u16>>>,
    _task: tokio::task::JoinHandle<()>,
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

impl FakeCluster {
    fn start(mut api: MockHandle, host: String, root: std::path::PathBuf) -> FakeCluster {
        let ports: Arc<Mutex<HashMap<String, u16>>> = Arc::default();
        let ports2 = ports.clone();
        let task = tokio::spawn(async move {
            let mut running: HashMap<String, Proc> = HashMap::new();
            let mut applied: HashMap<String, Value> = HashMap::new();
            let mut jobs: HashMap<String, Value> = HashMap::new();
            while let Some((req, send)) = api.next_request().await {
                let method = req.method().to_string();
                let path = req.uri().path().to_string();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let name = path.rsplit('/').next().unwrap().to_string();
                // Jobs complete at once; their one pod printed a line.
                if path.contains("/jobs") || path.contains("/pods") {
                    let body = match method.as_str() {
                        "POST" => {
                            let name = sent["metadata"]["name"].as_str().unwrap().to_string();
                            jobs.insert(name.clone(), sent.clone());
                            sent.clone()
                        }
                        _ if path.ends_with("/log") => {
                            send.send_response(
                                http::Response::builder()
                                    .status(200)
                                    .body(kube::client::Body::from(
                                        b"ran in the cluster\n".to_vec(),
                                    ))
                                    .unwrap(),
                            );
                            continue;
                        }
                        _ if path.contains("/pods") => {
                            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                            {"metadata": {"name": "job-pod"}, "spec": {"containers": [{"name": "main"}]}}]})
                        }
                        _ => {
                            let mut j = jobs.get(&name).cloned().unwrap_or(Value::Null);
                            j["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
                            j
                        }
                    };
                    send.send_response(
                        http::Response::builder()
                            .status(200)
                            .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                let (status, body) = match (method.as_str(), path.contains("/deployments/")) {
                    ("PATCH", true) => {
                        let image = sent["spec"]["template"]["spec"]["containers"][0]["image"]
                            .as_str()
                            .unwrap()
                            .to_string();
                        let env: Vec<(String, String)> =
                            sent["spec"]["template"]["spec"]["containers"][0]["env"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(|e| {
                                    let v = e["value"].as_str().unwrap_or_default();
                                    (e["name"].as_str().unwrap().to_string(), v.to_string())
                                })
                                .collect();
                        let (host, image) = (host.clone(), image.clone());
                        let dir = root.join(&name).join(image.rsplit(':').next().unwrap());
                        let (proc, port) = tokio::task::spawn_blocking(move || {
                            run_image(&host, &image, &dir, &env)
                        })
                        .await
                        .unwrap();
                        running.insert(name.clone(), proc);
                        ports2.lock().unwrap().insert(name.clone(), port);
                        let mut d = sent.clone();
                        d["metadata"]["generation"] = json!(1);
                        d["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1});
                        applied.insert(name.clone(), d.clone());
                        (200, d)
                    }
                    ("GET", true) => match applied.get(&name) {
                        Some(d) => (200, d.clone()),
                        None => (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
                        ),
                    },
                    ("DELETE", is_deployment) => {
                        if is_deployment {
                            running.remove(&name);
                            applied.remove(&name);
                            ports2.lock().unwrap().remove(&name);
                        }
                        (
                            200,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                        )
                    }
                    _ => (200, sent),
                };
                send.send_response(
                    http::Response::builder()
                        .status(status)
                        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
            }
        });
        FakeCluster { ports, _task: task }
    }

    fn function_url(&self) -> dispatch_k8s::backend::FunctionUrl {
        let ports = self.ports.clone();
        Arc::new(move |_, name| {
            let port = ports
                .lock()
                .unwrap()
                .get(&format!("fn-{name}"))
                .copied()
                .unwrap_or(1);
            format!("http://127.0.0.1:{port}")
        })
    }
}

/// Pulls `image` (by digest) from the registry at `host`, unpacks it under `dir` and starts
/// its runner on a free port.
fn run_image(host: &str, image: &str, dir: &Path, env: &[(String, String)]) -> (Proc, u16) {
    let (repo, digest) = image
        .strip_prefix(&format!("{host}/"))
        .unwrap()
        .split_once('@')
        .unwrap();
    let manifest: Value = rt().block_on(async {
        reqwest::Client::new()
            .get(format!("http://{host}/v2/{repo}/manifests/{digest}"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let layers: Vec<_> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| layer_files(host, repo, l["digest"].as_str().unwrap()))
        .collect();
    let root = unpack(&layers, dir);
    let config = skopeo(&["--config", &format!("docker://{image}")]);
    let port = free_port();
    let proc = start_runner(&root, &config, port, env);
    eventually("the function's runner", || {
        (http_get(port, "/healthz")?.0 == 200).then_some(())
    });
    (proc, port)
}

/// The API scenario both backends pass: a base image, an image with a dependency, a function
/// on it, a call through the API and one through an endpoint, then deletion.
/// `image`: where the function's image must be (Kubernetes), `None`: no image (embedded).
async fn hello_scenario(
    c: &dispatch_client::Client,
    gateway: &str,
    base_image: &str,
    image: Option<&str>,
    kubectl: Option<&FakeApi>,
) {
    use dispatch_core::{Kind, Object, Phase};
    let object = |kind, name: &str, spec: Value| Object::new(kind, "default", name, spec);
    let settled = |kind, name: &'static str| async move {
        let what = format!("{kind} {name} to settle");
        eventually_async(&what, move || async move {
            let o = c.get(kind, name).await.unwrap();
            matches!(o.phase(), Some(Phase::Ready | Phase::Error)).then_some(o)
        })
        .await
    };
    c.create(&object(
        Kind::BaseImage,
        "pybase",
        json!({"image": base_image, "language": "python3"}),
    ))
    .await
    .unwrap();
    c.create(&object(
        Kind::Image,
        "py",
        json!({"baseImage": "pybase", "runtimeDependencies": {"manifest": "six==1.16.0\n"}}),
    ))
    .await
    .unwrap();
    let img = settled(Kind::Image, "py").await;
    assert_eq!(img.phase(), Some(Phase::Ready), "{:?}", img.status);
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("hello.py"),
        "import os, six\n\ndef handle(context, payload):\n    return {'hi': payload, 'six': six.__name__, 'greeting': os.environ.get('GREETING')}\n",
    )
    .unwrap();
    let digest = c
        .upload_source(
            "default",
            "hello",
            dispatch_client::pack::pack_path(&src.path().join("hello.py")).unwrap(),
        )
        .await
        .unwrap();
    c.create(&object(
        Kind::Function,
        "hello",
        json!({"image": "py", "source": digest, "env": {"GREETING": "hi"}}),
    ))
    .await
    .unwrap();
    let f = settled(Kind::Function, "hello").await;
    assert_eq!(f.phase(), Some(Phase::Ready), "{:?}", f.status);
    match image {
        Some(prefix) => assert!(
            f.status
                .image
                .as_deref()
                .is_some_and(|i| i.starts_with(prefix)),
            "status.image {:?} is not under {prefix}",
            f.status.image
        ),
        None => assert_eq!(f.status.image, None),
    }
    let r = c
        .exec(
            "hello",
            &serde_json::value::to_raw_value(&json!("there")).unwrap(),
        )
        .await
        .unwrap();
    let payload: Value = serde_json::from_str(r.envelope.payload.get()).unwrap();
    assert_eq!(
        payload,
        json!({"hi": "there", "six": "six", "greeting": "hi"})
    );
    let run = c.get_run(&r.run_id.unwrap()).await.unwrap();
    assert_eq!(run.status, dispatch_core::RunStatus::Succeeded);
    c.create(&object(
        Kind::Endpoint,
        "hello",
        json!({"function": "hello", "methods": ["POST"], "paths": ["/hello"]}),
    ))
    .await
    .unwrap();
    let answer: Value = reqwest::Client::new()
        .post(format!("{gateway}/hello"))
        .json(&json!("gateway"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["hi"], "gateway", "{answer}");
    if let Some(api) = kubectl {
        with_kubectl(c, gateway, api, &f).await;
    }
    c.delete(Kind::Endpoint, "hello").await.unwrap();
    c.delete(Kind::Function, "hello").await.unwrap();
}

/// A server on `backend`; with `resources`, its resources are custom resources there.
/// Resources are custom resources: what the API made is in the cluster, and what kubectl
/// does there is what the server does (route, stop routing, redeploy with a new env).
async fn with_kubectl(
    c: &dispatch_client::Client,
    gateway: &str,
    api: &FakeApi,
    f: &dispatch_core::Object,
) {
    let cr = api.object("functions", "default", "hello").unwrap();
    assert_eq!(cr["kind"], "Function");
    assert_eq!(cr["status"]["phase"], "READY", "{cr}");
    assert_eq!(cr["status"]["image"].as_str(), f.status.image.as_deref());
    assert_eq!(
        api.object("endpoints", "default", "hello").unwrap()["spec"]["paths"],
        json!(["/hello"])
    );

    let post = |path: &'static str| async move {
        reqwest::Client::new()
            .post(format!("{gateway}{path}"))
            .json(&json!("kubectl"))
            .send()
            .await
            .unwrap()
    };
    api.apply(json!({"apiVersion": "dispatch.dev/v1", "kind": "Endpoint",
        "metadata": {"name": "applied", "namespace": "default"},
        "spec": {"function": "hello", "methods": ["post"], "paths": ["/applied"]}}));
    let answer: Value = eventually_async("the applied endpoint to route", || async {
        let r = post("/applied").await;
        (r.status() == 200).then_some(r)
    })
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(answer["hi"], "kubectl");
    // Filled in as the API would have: methods in capitals.
    let applied = api.object("endpoints", "default", "applied").unwrap();
    assert_eq!(applied["spec"]["methods"], json!(["POST"]), "{applied}");
    assert!(api.remove("endpoints", "default", "applied"));
    // What the API would refuse is marked ERROR with the reason, and does not route.
    api.apply(json!({"apiVersion": "dispatch.dev/v1", "kind": "Endpoint",
        "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"function": "hello", "methods": ["POST"], "paths": ["no-slash"]}}));
    let broken = eventually_async("the broken endpoint to be marked", || async {
        let o = c.get(dispatch_core::Kind::Endpoint, "broken").await.ok()?;
        (o.phase() == Some(dispatch_core::Phase::Error)).then_some(o)
    })
    .await;
    assert!(
        broken.status.reason.contains("must start with '/'"),
        "{:?}",
        broken.status
    );
    assert_eq!(
        api.object("endpoints", "default", "broken").unwrap()["status"]["phase"],
        "ERROR"
    );
    assert!(api.remove("endpoints", "default", "broken"));
    eventually_async("the deleted endpoint to stop routing", || async {
        (post("/applied").await.status() == 404).then_some(())
    })
    .await;

    // kubectl edit: a new env reaches the function's pods.
    let mut edited = api.object("functions", "default", "hello").unwrap();
    edited["spec"]["env"]["GREETING"] = json!("edited");
    api.apply(edited);
    eventually_async("the edited function to answer", || async {
        let r = c
            .exec(
                "hello",
                &serde_json::value::to_raw_value(&json!("x")).unwrap(),
            )
            .await
            .ok()?;
        let payload: Value = serde_json::from_str(r.envelope.payload.get()).ok()?;
        (payload["greeting"] == "edited").then_some(())
    })
    .await;
}

/// One kube client for two fakes: custom resources (and namespaces) to `crs`, the rest to
/// the mock API server behind `cluster`.
fn one_client(
    crs: FakeApi,
    cluster: tower_test::mock::Mock<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >,
) -> kube::Client {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let (crs, cluster) = (crs.clone(), cluster.clone());
        async move {
            if FakeApi::serves(req.uri().path()) {
                return Ok(crs.serve(req).await.expect("served"));
            }
            let resp = cluster.oneshot(req).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(resp.map(|b| {
                b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .boxed_unsync()
            }))
        }
    });
    kube::Client::new(svc, "default")
}

async fn scenario_server(
    backend: Arc<dyn dispatch_runtime::Backend>,
    dir: &Path,
    resources: Option<kube::Client>,
) -> (dispatch_server::Server, dispatch_client::Client, String) {
    let mut stores = dispatch_server::Stores::open(dir).unwrap();
    if let Some(client) = resources {
        stores.resources = Arc::new(
            dispatch_k8s::store::CrStore::start(client, stores.resources)
                .await
                .unwrap(),
        );
    }
    let blobs = dispatch_store::BlobStore::open(dir.join("blobs")).unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = dispatch_server::Options {
        auth: false,
        jobs_dir: dir.join("jobs"),
        ..Default::default()
    };
    let server = dispatch_server::Server::builder()
        .stores(stores)
        .blobs(blobs)
        .backend(backend)
        .api_listener(api)
        .gateway_listener(gw)
        .options(options)
        .start()
        .await
        .unwrap();
    let client = dispatch_client::Client::new(&dispatch_client::Target {
        server: format!("http://{}", server.api_addr),
        token: None,
        namespace: "default".into(),
        insecure: false,
    })
    .unwrap();
    let gateway = format!("http://{}", server.gateway_addr);
    (server, client, gateway)
}

#[test]
fn api_scenario_on_the_embedded_backend() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let backend = dispatch_runtime::LocalBackend::new(dir.path()).unwrap();
        let (server, c, gw) = scenario_server(backend, dir.path(), None).await;
        hello_scenario(&c, &gw, "python:3.11-slim", None, None).await;
        server.stop().await.unwrap();
    });
}

/// Resources kept as custom resources outlive the server: a restarted server (same volume
/// for its SQL and blobs, nothing of the resources in it) reads them back from its watch and
/// serves the function again.
#[test]
fn resources_in_the_cluster_outlive_the_server() {
    use dispatch_core::{Kind, Object, Phase};
    let crs = FakeApi::new();
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("hello.py"),
        "def handle(context, payload):\n    return {'hi': payload}\n",
    )
    .unwrap();
    for round in 0..2 {
        rt().block_on(async {
            let backend = dispatch_runtime::LocalBackend::new(dir.path()).unwrap();
            let (server, c, _) = scenario_server(backend, dir.path(), Some(crs.client())).await;
            if round == 0 {
                let spec = json!({"image": "python:3.11-slim", "language": "python3"});
                c.create(&Object::new(Kind::BaseImage, "default", "pybase", spec))
                    .await
                    .unwrap();
                let spec = json!({"baseImage": "pybase"});
                c.create(&Object::new(Kind::Image, "default", "py", spec))
                    .await
                    .unwrap();
                let archive =
                    dispatch_client::pack::pack_path(&src.path().join("hello.py")).unwrap();
                let digest = c.upload_source("default", "hello", archive).await.unwrap();
                let spec = json!({"image": "py", "source": digest});
                c.create(&Object::new(Kind::Function, "default", "hello", spec))
                    .await
                    .unwrap();
            } else {
                let sql =
                    dispatch_store::SqliteStore::open(&dir.path().join("dispatch.db")).unwrap();
                use dispatch_store::ResourceStore as _;
                assert!(
                    sql.list(None, Kind::Function).unwrap().is_empty(),
                    "not in SQL"
                );
            }
            let answer = eventually_async("the function to answer", || async {
                let raw = serde_json::value::to_raw_value(&json!("again")).unwrap();
                let r = c.exec("hello", &raw).await.ok()?;
                serde_json::from_str::<Value>(r.envelope.payload.get()).ok()
            })
            .await;
            assert_eq!(answer, json!({"hi": "again"}), "round {round}");
            // The controller writes READY just after the deploy that made the call possible.
            eventually_async("the function's status to read READY", || async {
                let f = c.get(Kind::Function, "hello").await.ok()?;
                let cr = crs.object("functions", "default", "hello")?;
                (f.phase() == Some(Phase::Ready) && cr["status"]["phase"] == "READY").then_some(())
            })
            .await;
            server.stop().await.unwrap();
        });
    }
}

#[test]
fn api_scenario_on_the_kubernetes_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, host) = registry(dir.path());
    let base = push_base(&host);
    rt().block_on(async {
        let (svc, api) = tower_test::mock::pair();
        let cluster = FakeCluster::start(api, host.clone(), dir.path().join("nodes"));
        // Custom resources go to an API server fake that keeps them and streams watches;
        // everything else to the cluster above.
        let crs = FakeApi::new();
        let client = one_client(crs.clone(), svc);
        let mut options = dispatch_k8s::backend::KubernetesOptions::new(
            format!("{host}/dispatch"),
            assert_cmd::cargo::cargo_bin("dispatch"),
        );
        options.registry = RegistryOptions {
            insecure: vec![host.clone()],
            ..Default::default()
        };
        options.poll_interval = std::time::Duration::from_millis(10);
        options.function_url = cluster.function_url();
        options.job_owners = true;
        options.executions = true;
        let backend = dispatch_k8s::backend::KubernetesBackend::new(client.clone(), options);
        let (server, c, gw) = scenario_server(backend, dir.path(), Some(client)).await;
        let image = format!("{host}/dispatch/default/hello@sha256:");
        hello_scenario(&c, &gw, &base, Some(&image), Some(&crs)).await;
        for (plural, name) in [("functions", "hello"), ("endpoints", "hello"), ("images", "py")] {
            let left = crs.object(plural, "default", name);
            assert_eq!(left.is_some(), plural == "images", "{plural}/{name}: {left:?}");
        }
        assert!(
            cluster.ports.lock().unwrap().is_empty(),
            "deleting the function stopped its pods"
        );

        // A job execution runs as a Job in the cluster, not as a local process.
        c.create(&dispatch_core::Object::new(
            dispatch_core::Kind::JobTemplate,
            "default",
            "sample",
            json!({"jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "main", "image": "alpine:3", "command": ["sh", "-c", "exit 7"]}]}}}}}),
        ))
        .await
        .unwrap();
        let started = c.execute("sample", b"payload".to_vec()).await.unwrap();
        let uuid = started["uuid"].as_str().unwrap().to_string();
        let job = eventually_async("the job execution to end", || async {
            let j = c.get_job(&uuid).await.unwrap();
            j.phase.is_final().then_some(j)
        })
        .await;
        assert_eq!(job.phase, dispatch_core::JobPhase::Completed, "{job:?}");
        assert_eq!(job.logs.stdout, ["ran in the cluster"], "a local sh would have exited 7");

        // dispatcher's JobExecution made with kubectl: the execution starts under its name,
        // and its status says how it went, with the Job it ran as.
        crs.apply(json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": "by-kubectl", "namespace": "default"},
            "spec": {"jobTemplateName": "sample", "payload": "from kubectl"}}));
        let cr = eventually_async("the JobExecution to read Completed", || async {
            let cr = crs.object("jobexecutions", "default", "by-kubectl")?;
            (cr["status"]["phase"] == "Completed").then_some(cr)
        })
        .await;
        let job = c.get_job("by-kubectl").await.unwrap();
        assert_eq!((job.phase, job.payload.as_str()), (dispatch_core::JobPhase::Completed, "from kubectl"));
        assert_eq!(cr["status"]["job"]["name"], dispatch_k8s::job_name(&job), "{cr}");
        assert_eq!(cr["status"]["conditions"][0]["type"], "Complete", "{cr}");
        assert_eq!(cr["status"]["attempts"], 1, "{cr}");
        // One made before its template: Invalid, saying so, until the template exists.
        crs.apply(json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": "early", "namespace": "default"},
            "spec": {"jobTemplateName": "later", "payload": {"n": 1}}}));
        let cr = eventually_async("the early JobExecution to read Invalid", || async {
            let cr = crs.object("jobexecutions", "default", "early")?;
            (cr["status"]["phase"] == "Invalid").then_some(cr)
        })
        .await;
        let reason = cr["status"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("\"later\" not found"), "{reason}");
        c.create(&dispatch_core::Object::new(
            dispatch_core::Kind::JobTemplate,
            "default",
            "later",
            json!({"jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "main", "image": "alpine:3", "command": ["echo", "{{ .Payload }}"]}]}}}}}),
        ))
        .await
        .unwrap();
        eventually_async("the early JobExecution to complete", || async {
            let cr = crs.object("jobexecutions", "default", "early")?;
            (cr["status"]["phase"] == "Completed").then_some(())
        })
        .await;
        assert_eq!(c.get_job("early").await.unwrap().payload, r#"{"n":1}"#);
        // One without a template name is marked Invalid with the reason.
        crs.apply(json!({"apiVersion": "dispatcher.ivan.vc/v1alpha1", "kind": "JobExecution",
            "metadata": {"name": "nameless", "namespace": "default"}, "spec": {}}));
        eventually_async("the nameless JobExecution to read Invalid", || async {
            let cr = crs.object("jobexecutions", "default", "nameless")?;
            let reason = cr["status"]["reason"].as_str()?.to_string();
            (cr["status"]["phase"] == "Invalid" && reason.contains("spec.jobTemplateName")).then_some(())
        })
        .await;
        server.stop().await.unwrap();
    });
}
