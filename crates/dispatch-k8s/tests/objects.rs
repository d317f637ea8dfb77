//! Every generated object reads back as its k8s-openapi type, and matches its golden file
//! (`UPDATE_GOLDEN=1 cargo test -p dispatch-k8s` rewrites them after a deliberate change).

use dispatch_core::jobs::{RenderData, render};
use dispatch_core::{FunctionSpec, JobExecution, JobPhase, JobTemplateSpec, Language, Logs};
use dispatch_k8s::{FunctionImage, Workload, crds, function_objects, job, knative_service};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::json;

fn golden(name: &str, value: &serde_json::Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = serde_saphyr::to_string(value).unwrap();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no golden file {}: run with UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(text, want, "{name} changed: review, then UPDATE_GOLDEN=1");
}

/// Serializes, reads back as `T`, and compares: the object is valid for its type.
fn round_trip<T: serde::Serialize + DeserializeOwned>(v: &T) -> serde_json::Value {
    let json = serde_json::to_value(v).unwrap();
    let back: T = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(back).unwrap(), json);
    json
}

fn hello() -> FunctionSpec {
    serde_json::from_value(json!({"image": "python3", "handler": "hello.handle", "source": format!("sha256:{}", "a".repeat(64)),
        "timeout": "10s", "env": {"GREETING": "hi"}, "concurrency": {"maxWorkers": 3, "minWorkers": 1}}))
    .unwrap()
}

fn image() -> FunctionImage<'static> {
    FunctionImage {
        reference: "registry.local:5000/default/hello@sha256:0123",
        language: Language::Python3,
        handler: "hello.handle",
        digest: "sha256:abcd",
        pull_secret: None,
    }
}

#[test]
fn crds_for_every_kind() {
    let all = crds();
    assert_eq!(all.len(), dispatch_core::Kind::ALL.len());
    let json: Vec<serde_json::Value> = all
        .iter()
        .map(round_trip::<CustomResourceDefinition>)
        .collect();
    assert_eq!(json[2]["metadata"]["name"], "functions.dispatch.dev");
    golden("crd-function.yaml", &json[2]);
}

#[test]
fn function_deployment_and_service() {
    let (d, s) = function_objects("default", "hello", &Workload::of(&hello()), &image());
    let d = round_trip::<Deployment>(&d);
    let s = round_trip::<Service>(&s);
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["command"],
        json!(["/dispatch/bin/dispatch", "runner"])
    );
    golden("function-deployment.yaml", &d);
    golden("function-service.yaml", &s);
    let k = knative_service("default", "hello", &Workload::of(&hello()), &image());
    assert_eq!(
        k["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"],
        "3"
    );
    assert_eq!(k["spec"]["template"]["spec"]["timeoutSeconds"], 10);
    golden("function-knative.yaml", &k);

    // A private registry: pods pull with the named Secret.
    let private = FunctionImage {
        pull_secret: Some("regcred"),
        ..image()
    };
    let (d, _) = function_objects("default", "hello", &Workload::of(&hello()), &private);
    let d = round_trip::<Deployment>(&d);
    assert_eq!(
        d["spec"]["template"]["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
    let k = knative_service("default", "hello", &Workload::of(&hello()), &private);
    assert_eq!(
        k["spec"]["template"]["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
}

#[test]
fn job_from_a_rendered_template() {
    let sample = include_str!("../../../examples/jobs/jobtemplate-sample.yaml");
    let doc = dispatch_core::manifest::parse_manifest(sample)
        .unwrap()
        .remove(0)
        .object;
    let spec: JobTemplateSpec = doc.typed_spec().unwrap();
    let data = RenderData {
        payload: "my test payload".into(),
        name: "jobtemplate-sample".into(),
        namespace: "default".into(),
        uuid: "0193c1f2-8e4b-7a00-8000-123456789abc".into(),
        created: "2026-11-23T10:00:00Z".parse().unwrap(),
    };
    let rendered = render(&spec.job_template, &data).unwrap();
    let exec = JobExecution {
        uuid: data.uuid.clone(),
        name: data.name.clone(),
        namespace: "default".into(),
        phase: JobPhase::Waiting,
        reason: String::new(),
        payload: data.payload.clone(),
        rendered,
        images: vec![],
        attempts: 0,
        exit_code: None,
        logs: Logs::default(),
        created_at: data.created,
        started_at: None,
        finished_at: None,
        expires_at: None,
    };
    let j = round_trip::<Job>(&job(&exec, Some("uid-1")).unwrap());
    assert_eq!(
        j["metadata"]["labels"]["dispatch.dev/execution"],
        data.uuid.as_str()
    );
    assert_eq!(
        j["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"],
        "my test payload"
    );
    golden("job-sample.yaml", &j);
}

#[test]
fn install_objects_are_valid_and_least_privilege() {
    use dispatch_k8s::install::{Install, objects};
    use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let mut install = Install::new("reg.example/dispatch/server:1", "reg.example/fns");
    install.insecure_registries = vec!["reg.local:5000".into()];
    let all = objects(&install);
    let mut kinds = Vec::new();
    for o in &all {
        let kind = o["kind"].as_str().unwrap();
        match kind {
            "Namespace" => drop(round_trip::<Namespace>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "CustomResourceDefinition" => drop(round_trip::<CustomResourceDefinition>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "ServiceAccount" => drop(round_trip::<ServiceAccount>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "ClusterRole" => drop(round_trip::<ClusterRole>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "Role" => drop(round_trip::<Role>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "RoleBinding" => drop(round_trip::<RoleBinding>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "PersistentVolumeClaim" => drop(round_trip::<PersistentVolumeClaim>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "Deployment" => drop(round_trip::<Deployment>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            "Service" => drop(round_trip::<Service>(
                &serde_json::from_value(o.clone()).unwrap(),
            )),
            other => panic!("unexpected kind {other}"),
        }
        if kinds.last() != Some(&kind) {
            kinds.push(kind);
        }
    }
    assert_eq!(
        kinds,
        [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "PersistentVolumeClaim",
            "Deployment",
            "Service"
        ]
    );
    // RBAC: named resources and verbs only, no wildcards, no secrets, nothing cluster-wide
    // beyond function objects.
    let role = all.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
    let rules = role["rules"].as_array().unwrap();
    let granted: Vec<String> = rules
        .iter()
        .map(|r| {
            let list = |field: &str| {
                let items: Vec<&str> = r[field]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                assert!(!items.contains(&"*"), "no wildcards: {r}");
                items.join(",")
            };
            format!(
                "{}/{}: {}",
                list("apiGroups"),
                list("resources"),
                list("verbs")
            )
        })
        .collect();
    assert_eq!(
        granted,
        [
            "apps/deployments: get,patch,delete",
            "/services: get,patch,delete",
            "autoscaling/horizontalpodautoscalers: get,patch,delete",
            "batch/jobs: create,get,watch,delete",
            "/pods: list",
            "/pods/log: get",
        ]
    );
    // The scheduler's Lease: in the server's namespace only, nothing else.
    let role = all.iter().find(|o| o["kind"] == "Role").unwrap();
    assert_eq!(role["metadata"]["namespace"], "dispatch");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}])
    );
    install.knative = true;
    let role = dispatch_k8s::install::cluster_role(&install);
    assert!(
        role.rules
            .unwrap()
            .iter()
            .any(|r| r.api_groups.as_deref() == Some(&["serving.knative.dev".to_string()][..])),
        "--knative may manage Knative Services"
    );
    // The server: one replica, never two at once, the Kubernetes backend, its registry.
    let d = all.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
    let args = d["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        ["--backend", "kubernetes"],
        ["--registry", "reg.example/fns"],
        ["--insecure-registry", "reg.local:5000"],
        ["--data-dir", "/data"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
}

#[test]
fn concurrency_beyond_one_pod_gets_an_autoscaler() {
    use dispatch_k8s::function_hpa;
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    let w = |min, max| Workload {
        env: Default::default(),
        timeout: std::time::Duration::from_secs(10),
        max_workers: max,
        min_workers: min,
    };
    // (minWorkers, maxWorkers) → workers per pod, (min pods, max pods).
    for ((min, max), per, pods) in [
        ((0, 1), 1, (1, 1)),
        ((1, 3), 3, (1, 1)),
        ((0, 4), 4, (1, 1)),
        ((2, 20), 4, (1, 5)),
        ((9, 20), 4, (3, 5)),
        ((20, 20), 4, (5, 5)),
    ] {
        assert_eq!(w(min, max).workers_per_pod(), per, "{min}..{max}");
        assert_eq!(w(min, max).replicas(), pods, "{min}..{max}");
    }
    assert!(function_hpa("default", "hello", &w(1, 3)).is_none());
    let hpa = function_hpa("default", "hello", &w(2, 20)).unwrap();
    let hpa = round_trip::<HorizontalPodAutoscaler>(&hpa);
    assert_eq!(hpa["spec"]["minReplicas"], 1);
    assert_eq!(hpa["spec"]["maxReplicas"], 5);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "fn-hello");
    golden("function-hpa.yaml", &hpa);
    let (d, _) = function_objects("default", "hello", &w(2, 20), &image());
    let d = round_trip::<Deployment>(&d);
    assert!(
        d["spec"].get("replicas").is_none(),
        "the autoscaler sets the count; an apply must not fight it"
    );
    let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .contains(&json!({"name": "DISPATCH_MAX_WORKERS", "value": "4"})),
        "{env}"
    );
}

#[test]
fn kubectl_get_shows_phase_reason_and_age() {
    for crd in crds() {
        let json = round_trip::<CustomResourceDefinition>(&crd);
        let cols: Vec<(&str, &str)> = json["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap(), c["jsonPath"].as_str().unwrap()))
            .collect();
        assert_eq!(
            cols,
            [
                ("Phase", ".status.phase"),
                ("Reason", ".status.reason"),
                ("Age", ".metadata.creationTimestamp")
            ]
        );
    }
}
