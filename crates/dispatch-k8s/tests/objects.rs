//! Every generated object reads back as its k8s-openapi type, and matches its snapshot
//! (insta; see `golden`).

use dispatch_core::jobs::{RenderData, render};
use dispatch_core::{FunctionSpec, JobExecution, JobPhase, JobTemplateSpec, Language, Logs};
use dispatch_k8s::{FunctionImage, Workload, crds, function_objects, job, knative_service};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::json;

/// A snapshot (insta, YAML) of a generated object: `tests/snapshots/objects__<name>.snap`.
/// After a deliberate change: `cargo insta review`, or `INSTA_UPDATE=always cargo test -p
/// dispatch-k8s` and read the diff.
fn golden(name: &str, value: &serde_json::Value) {
    insta::assert_yaml_snapshot!(name, value);
}

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
    golden("crd-function", &json[2]);
    golden("crds", &serde_json::Value::Array(json.clone()));
}

/// dispatcher's JobExecution CRD: valid, structural, every field described, dispatcher's
/// phases, and the template's name in `kubectl get jobexecutions`.
#[test]
fn the_job_execution_crd() {
    let v = round_trip::<CustomResourceDefinition>(&dispatch_k8s::job_execution_crd());
    assert_eq!(v["metadata"]["name"], "jobexecutions.dispatcher.ivan.vc");
    let version = &v["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let schema = &version["schema"]["openAPIV3Schema"];
    let mut errors = Vec::new();
    structural("JobExecution", schema, &mut errors);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(
        schema["properties"]["spec"]["required"],
        json!(["jobTemplateName"])
    );
    let phases = &schema["properties"]["status"]["properties"]["phase"]["enum"];
    for p in ["Waiting", "Active", "Completed", "Invalid"] {
        assert!(phases.as_array().unwrap().contains(&json!(p)), "{phases}");
    }
    assert_eq!(
        version["additionalPrinterColumns"][0]["jsonPath"],
        ".spec.jobTemplateName"
    );
}

/// Every field of every CRD has a description (what `kubectl explain` and `dispatch
/// explain` show): 58 of 121 had none.
#[test]
fn every_crd_field_is_described() {
    fn walk(path: &str, node: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = node["properties"].as_object() {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(p.clone());
                }
                walk(&p, v, missing);
                walk(&format!("{p}[]"), &v["items"], missing);
                walk(&format!("{p}{{}}"), &v["additionalProperties"], missing);
            }
        }
    }
    let mut missing = Vec::new();
    for crd in crds()
        .into_iter()
        .chain([dispatch_k8s::job_execution_crd()])
    {
        let v = round_trip::<CustomResourceDefinition>(&crd);
        let schema = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(
            v["spec"]["names"]["kind"].as_str().unwrap(),
            schema,
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
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
    golden("function-deployment", &d);
    golden("function-service", &s);
    let k = knative_service("default", "hello", &Workload::of(&hello()), &image());
    assert_eq!(
        k["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"],
        "3"
    );
    assert_eq!(k["spec"]["template"]["spec"]["timeoutSeconds"], 10);
    golden("function-knative", &k);

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
        runtime: dispatch_core::jobs::JobRuntime::Host,
        attempts: 0,
        exit_code: None,
        logs: Logs::default(),
        created_at: data.created,
        started_at: None,
        finished_at: None,
        expires_at: None,
        replica: None,
        trace: None,
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
    golden("job-sample", &j);
}

#[test]
fn install_objects_are_valid_and_least_privilege() {
    use dispatch_k8s::install::{Install, objects};
    use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let mut install = Install::new("reg.example/dispatch/server:1", "reg.example/fns");
    install.insecure_registries = vec!["reg.local:5000".into()];
    let all = objects(&install);
    golden("install", &serde_json::Value::Array(all.clone()));
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
    // beyond Dispatch's resources, function objects and creating namespaces.
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
            "dispatch.dev/baseimages,images,functions,endpoints,jobtemplates,secrets,subscriptions,eventdrivers,aliases: get,list,watch,create,update,delete",
            "dispatch.dev/baseimages/status,images/status,functions/status,endpoints/status,jobtemplates/status,secrets/status,subscriptions/status,eventdrivers/status,aliases/status: update",
            "dispatcher.ivan.vc/jobexecutions: get,list,watch",
            "dispatcher.ivan.vc/jobexecutions/status: patch",
            "/namespaces: create",
            "apps/deployments: get,patch,delete",
            "/services: get,patch,delete",
            "autoscaling/horizontalpodautoscalers: get,patch,delete",
            "networking.k8s.io/networkpolicies: get,patch,delete",
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
        ["--data-dir", "/data/dispatch"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
}

/// `--database-secret NAME --replicas 3`: active replicas on PostgreSQL, no volume, rolled
/// one at a time behind their readiness, a PodDisruptionBudget, every object valid.
#[test]
fn an_ha_install_runs_replicas_on_a_database_without_a_volume() {
    use dispatch_k8s::install::{Install, objects};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let mut install = Install::new("reg.example/dispatch/server:1", "reg.example/fns");
    install.database_secret = Some("dispatch-db".into());
    install.replicas = 3;
    let all = objects(&install);
    assert!(
        !all.iter().any(|o| o["kind"] == "PersistentVolumeClaim"),
        "no volume"
    );
    let d = all.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let d = round_trip::<Deployment>(&serde_json::from_value(d.clone()).unwrap());
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["emptyDir"], json!({}));
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        ["--secret-key-file", "/etc/dispatch/secret-key/key"],
        ["--shutdown-delay", "5s"],
        ["--backend", "kubernetes"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    assert!(
        !args.contains(&"--database"),
        "the URL comes from the Secret, not the command line"
    );
    let env = c["env"].as_array().unwrap();
    let from_secret = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["secretKeyRef"].clone())
            .unwrap_or_else(|| panic!("{name} in {env:?}"))
    };
    assert_eq!(
        from_secret("DISPATCH_DATABASE_URL"),
        json!({"name": "dispatch-db", "key": "url"})
    );
    assert_eq!(
        from_secret("DISPATCH_DATABASE_PASSWORD"),
        json!({"name": "dispatch-db", "key": "password", "optional": true})
    );
    assert!(
        pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 5,
        "longer than the shutdown delay"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let pdb = all
        .iter()
        .find(|o| o["kind"] == "PodDisruptionBudget")
        .expect("a PodDisruptionBudget");
    let pdb = round_trip::<PodDisruptionBudget>(&serde_json::from_value(pdb.clone()).unwrap());
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        d["spec"]["selector"]["matchLabels"]
    );
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
        limits: Default::default(),
        network: true,
        stream: false,
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
    golden("function-hpa", &hpa);
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

/// The rules Kubernetes sets for CRD schemas ("structural"), a little stricter: every node
/// has a type unless it keeps any JSON; no `$ref`, no `anyOf`/`oneOf`/`allOf`/`not`; never
/// `properties` with `additionalProperties`, nor `additionalProperties: false`.
fn structural(path: &str, s: &serde_json::Value, errors: &mut Vec<String>) {
    let o = s.as_object().unwrap();
    if o.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true)) {
        return;
    }
    if !o.get("type").is_some_and(|t| t.is_string()) {
        errors.push(format!("{path}: no type"));
    }
    for k in ["$ref", "anyOf", "oneOf", "allOf", "not"] {
        if o.contains_key(k) {
            errors.push(format!("{path}: {k}"));
        }
    }
    if o.contains_key("properties") && o.contains_key("additionalProperties") {
        errors.push(format!("{path}: properties and additionalProperties"));
    }
    if o.get("additionalProperties") == Some(&json!(false)) {
        errors.push(format!("{path}: additionalProperties: false"));
    }
    for (k, v) in o
        .get("properties")
        .and_then(|p| p.as_object())
        .into_iter()
        .flatten()
    {
        structural(&format!("{path}.{k}"), v, errors);
    }
    for k in ["items", "additionalProperties"] {
        if let Some(v) = o.get(k).filter(|v| v.is_object()) {
            structural(&format!("{path}[{k}]"), v, errors);
        }
    }
}

/// What an API server would do with `value` under `schema`: the fields it would prune and the
/// values of the wrong type, as paths.
fn refused(path: &str, v: &serde_json::Value, s: &serde_json::Value, errors: &mut Vec<String>) {
    if s.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true)) {
        return;
    }
    if v.is_null() {
        if s.get("nullable") != Some(&json!(true)) {
            errors.push(format!("{path}: null"));
        }
        return;
    }
    let ok = match s["type"].as_str().unwrap() {
        "object" => {
            let o = v.as_object();
            for (k, x) in o.into_iter().flatten() {
                match (
                    s.pointer(&format!("/properties/{k}")),
                    s.get("additionalProperties"),
                ) {
                    (Some(p), _) | (None, Some(p)) => refused(&format!("{path}.{k}"), x, p, errors),
                    (None, None) => errors.push(format!("{path}.{k}: pruned")),
                }
            }
            for r in s["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if o.is_some_and(|o| !o.contains_key(r)) {
                    errors.push(format!("{path}.{r}: required"));
                }
            }
            o.is_some()
        }
        "array" => {
            for (i, x) in v.as_array().into_iter().flatten().enumerate() {
                refused(&format!("{path}[{i}]"), x, &s["items"], errors);
            }
            v.is_array()
        }
        "string" => {
            let allowed = s["enum"].as_array().is_none_or(|e| e.contains(v));
            v.is_string() && allowed
        }
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        other => panic!("{path}: type {other}"),
    };
    if !ok {
        errors.push(format!("{path}: {v} does not fit {}", s["type"]));
    }
}

/// What `refused` finds in `value` under the `field` ("spec" or "status") of `kind`'s CRD.
fn misfits(kind: dispatch_core::Kind, field: &str, value: &serde_json::Value) -> Vec<String> {
    let mut errors = Vec::new();
    refused(
        field,
        value,
        &schema(kind)["properties"][field],
        &mut errors,
    );
    errors
}

fn schema(kind: dispatch_core::Kind) -> serde_json::Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind.as_str())
        .unwrap();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .clone()
            .unwrap()
            .open_api_v3_schema,
    )
    .unwrap()
}

/// The CRDs' schemas are generated from the core types and structural: Kubernetes accepts
/// them, and validates and prunes with them.
#[test]
fn crd_schemas_are_structural_and_typed() {
    for kind in dispatch_core::Kind::ALL {
        let s = schema(kind);
        let mut errors = Vec::new();
        structural(kind.as_str(), &s, &mut errors);
        assert!(errors.is_empty(), "{kind}: {errors:#?}");
        assert_eq!(
            s["properties"]["status"]["properties"]["phase"]["type"],
            "string"
        );
        let text = s.to_string();
        assert!(
            !text.contains("DESIGN"),
            "{kind}: design references are for maintainers"
        );
    }
    let function = schema(dispatch_core::Kind::Function);
    assert_eq!(function["properties"]["spec"]["required"], json!(["image"]));
    assert_eq!(
        function["properties"]["spec"]["properties"]["concurrency"]["properties"]["maxWorkers"]["type"],
        "integer"
    );
    let base = schema(dispatch_core::Kind::BaseImage);
    assert_eq!(
        base["properties"]["spec"]["properties"]["language"]["enum"],
        json!(["python3", "nodejs", "exec", null]),
        "optional: null (nullable) or one of the languages"
    );
    // A secret is stored sealed: its keys and ciphertext, never `data`.
    let secret = schema(dispatch_core::Kind::Secret);
    let fields: Vec<&String> = secret["properties"]["spec"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(fields, ["keys", "sealed"]);
    // A job template's Job is kept whole (it is templated: any field may hold `{{ }}`).
    let job = schema(dispatch_core::Kind::JobTemplate);
    assert_eq!(
        job["properties"]["spec"]["properties"]["jobTemplate"]["x-kubernetes-preserve-unknown-fields"],
        true
    );

    // The checker finds what it must.
    let bad = json!({"imag": "typo", "concurrency": {"maxWorkers": "four"}});
    assert_eq!(
        misfits(dispatch_core::Kind::Function, "spec", &bad),
        [
            "spec.concurrency.maxWorkers: \"four\" does not fit \"integer\"",
            "spec.imag: pruned",
            "spec.image: required"
        ]
    );
}

/// Every field the server stores survives the API server's pruning and validation: a spec of
/// each kind with every field set, in the normal form the API stores.
#[test]
fn stored_specs_fit_their_crds() {
    use dispatch_core::{Kind, Object};
    let specs = [
        (
            Kind::BaseImage,
            json!({"image": "python:3.11-slim", "interpreter": "python3.11"}),
        ),
        (
            Kind::Image,
            json!({"baseImage": "py", "runtimeDependencies": {"manifest": "six\n", "indexUrl": "https://pypi.example/simple"},
            "systemDependencies": [{"name": "libxml2"}], "preload": ["six", "os.path"]}),
        ),
        (
            Kind::Function,
            json!({"image": "py", "handler": "hello.handle", "source": format!("sha256:{}", "a".repeat(64)),
            "timeout": "10s", "env": {"A": "1"}, "concurrency": {"maxWorkers": 8, "minWorkers": 1, "idleTimeout": "1m"},
            "retry": {"maxAttempts": 5, "backoff": {"initial": "1s", "max": "1m"}, "maxAge": "1h"},
            "callbackUrl": "https://example.com/cb", "secrets": ["db"]}),
        ),
        (
            Kind::Endpoint,
            json!({"function": "hello", "methods": ["get", "post"], "paths": ["/hello"], "hosts": ["example.com"],
            "cors": true, "auth": "token"}),
        ),
        (
            Kind::Subscription,
            json!({"eventType": "order.*", "source": "shop", "function": "hello"}),
        ),
        (
            Kind::EventDriver,
            json!({"type": "cron", "function": "hello", "schedule": "*/5 * * * *", "timezone": "Europe/Paris",
            "missedRuns": "once", "config": {"x": "y"}}),
        ),
        (
            Kind::JobTemplate,
            json!({"jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "main", "image": "alpine:3", "command": ["echo", "{{ .UUID }}"]}]}}}},
            "maxActive": 2}),
        ),
    ];
    for (kind, spec) in specs {
        let mut o = Object::new(kind, "default", "sample", spec);
        o.validate().unwrap_or_else(|e| panic!("{kind}: {e}"));
        let errors = misfits(kind, "spec", &o.spec);
        assert!(errors.is_empty(), "{kind} {}: {errors:#?}", o.spec);
    }
    // An alias (named FUNCTION.ALIAS) with traffic and a promotion as the server stores it.
    let mut a = Object::new(
        Kind::Alias,
        "default",
        "hello.prod",
        json!({"traffic": [{"version": 3, "percent": 90}, {"version": 4, "percent": 10}],
        "promotion": {"to": 4, "step": 10, "every": "1m", "maxErrorRate": 1.5, "minCalls": 20,
        "startedAt": "2026-12-07T10:00:00Z", "from": [{"version": 3, "percent": 100}]}}),
    );
    a.validate().unwrap();
    assert_eq!(a.spec["function"], "hello");
    let errors = misfits(Kind::Alias, "spec", &a.spec);
    assert!(errors.is_empty(), "alias {}: {errors:#?}", a.spec);
    let sealed = serde_json::to_value(dispatch_core::SealedSecret {
        keys: vec!["password".into()],
        sealed: "bm9uY2U=".into(),
    })
    .unwrap();
    let errors = misfits(Kind::Secret, "spec", &sealed);
    assert!(errors.is_empty(), "{errors:#?}");
    // And the status the controller writes.
    let status = serde_json::to_value(dispatch_core::Status {
        phase: Some(dispatch_core::Phase::Ready),
        reason: "ok".into(),
        digest: Some("sha256:x".into()),
        observed_generation: Some(3),
        image: Some("r/x@sha256:y".into()),
        next_fire: Some("2026-11-23T10:00:00Z".parse().unwrap()),
    })
    .unwrap();
    let errors = misfits(Kind::Function, "status", &status);
    assert!(errors.is_empty(), "{errors:#?}");
}

/// A resource as the Kubernetes backend stores it: a `dispatch.dev/v1` custom resource whose
/// metadata, spec and status read back as the same Dispatch object.
#[test]
fn resources_as_custom_resources() {
    use dispatch_core::{Kind, Object, Phase, Status};
    use dispatch_k8s::store::{from_custom_resource, to_custom_resource};
    let mut o = Object::new(
        Kind::Function,
        "team-a",
        "hello",
        json!({"image": "py", "source": "sha256:abcd", "env": {"GREETING": "hi"}}),
    );
    o.metadata.labels.insert("app".into(), "demo".into());
    o.metadata.updated_at = Some("2026-11-23T10:00:00Z".parse().unwrap());
    o.metadata.resource_version = Some("42".into());
    o.status = Status {
        phase: Some(Phase::Ready),
        digest: Some("sha256:feed".into()),
        observed_generation: Some(1),
        image: Some("reg.example/fns/team-a/hello@sha256:feed".into()),
        ..Status::default()
    };
    let cr = serde_json::to_value(to_custom_resource(&o)).unwrap();
    golden("custom-resource-function", &cr);
    let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
        serde_json::from_value(cr["metadata"].clone()).unwrap();
    assert_eq!(meta.namespace.as_deref(), Some("team-a"));
    let back = from_custom_resource(Kind::Function, &serde_json::from_value(cr).unwrap());
    assert_eq!(back, o);
}

/// Every pod this crate makes runs restricted (DESIGN §9): the Pod Security Standard, plus
/// a read-only root with an emptyDir /tmp and no service-account token.
fn assert_sandboxed(what: &str, pod: &k8s_openapi::api::core::v1::PodSpec) {
    let v = dispatch_k8s::security::restricted_violations(pod);
    assert!(v.is_empty(), "{what} breaks PSS restricted: {v:?}");
    assert_eq!(pod.automount_service_account_token, Some(false), "{what}");
    for c in &pod.containers {
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
        assert_ne!(sc.run_as_user, Some(0), "{what}");
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        let tmp = mounts
            .iter()
            .find(|m| m.mount_path == "/tmp")
            .expect("a /tmp");
        let vol = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == tmp.name)
            .unwrap();
        assert!(vol.empty_dir.is_some(), "{what}: /tmp is an emptyDir");
        let limits = c.resources.clone().unwrap().limits.unwrap();
        assert!(limits.contains_key("memory"), "{what}: a memory limit");
    }
}

#[test]
fn function_and_job_pods_are_restricted_with_limits_from_the_spec() {
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let mut spec = hello();
    spec.resources.memory = Some("128Mi".into());
    spec.resources.cpu = Some("250m".into());
    spec.resources.tmp = Some("32Mi".into());
    spec.network = Some(dispatch_core::resource::NetworkMode::None);
    let w = Workload::of(&spec);
    let (d, _) = function_objects("default", "hello", &w, &image());
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_sandboxed("function pod", &pod);
    let res = pod.containers[0].resources.clone().unwrap();
    let limits = res.limits.unwrap();
    // maxWorkers 3 → 3 workers in the pod, 128Mi each, plus the runner's 64Mi.
    assert_eq!(limits["memory"].0, ((3 * 128 + 64) << 20).to_string());
    assert_eq!(limits["cpu"].0, "750m");
    let tmp = pod.volumes.unwrap()[0]
        .empty_dir
        .clone()
        .unwrap()
        .size_limit
        .unwrap();
    assert_eq!(tmp.0, (32 << 20).to_string());

    let k = knative_service("default", "hello", &w, &image());
    let kpod: PodSpec = serde_json::from_value(k["spec"]["template"]["spec"].clone()).unwrap();
    assert_sandboxed("knative pod", &kpod);
    assert_eq!(
        k["spec"]["template"]["metadata"]["labels"]["dispatch.dev/function"],
        "hello"
    );

    let policy = round_trip::<NetworkPolicy>(&dispatch_k8s::security::deny_egress(
        "default",
        "hello",
        [("dispatch.dev/function".to_string(), "hello".to_string())].into(),
    ));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Egress"]));
    assert_eq!(policy["spec"]["egress"], json!([]));
    golden("function-networkpolicy", &policy);

    // A job template that asks for root and privileges gets neither.
    let mut exec = sample_execution();
    exec.rendered["spec"]["template"]["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 0, "privileged": true, "allowPrivilegeEscalation": true,
               "capabilities": {"add": ["SYS_ADMIN"]}});
    exec.rendered["spec"]["template"]["spec"]["hostPID"] = json!(true);
    let j: k8s_openapi::api::batch::v1::Job = job(&exec, None).unwrap();
    let jpod = j.spec.unwrap().template.spec.unwrap();
    assert_sandboxed("job pod", &jpod);
    // The checker itself finds what it must.
    let mut bad = jpod.clone();
    bad.host_pid = Some(true);
    bad.containers[0].security_context = None;
    let v = dispatch_k8s::security::restricted_violations(&bad);
    assert_eq!(
        v,
        [
            "host namespaces",
            "my-container: allowPrivilegeEscalation must be false",
            "my-container: capabilities must drop ALL"
        ]
    );
}

/// An execution's W3C trace reaches its Job's containers as TRACEPARENT, unless a container
/// sets it itself.
#[test]
fn a_job_gets_its_executions_traceparent() {
    let mut exec = sample_execution();
    let none = job(&exec, None).unwrap();
    let env_of = |j: &k8s_openapi::api::batch::v1::Job| -> Vec<(String, Option<String>)> {
        j.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value))
            .collect()
    };
    assert!(env_of(&none).iter().all(|(n, _)| n != "TRACEPARENT"));
    let trace = dispatch_core::trace::Trace::child_of(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    exec.trace = Some(trace.clone());
    let env = env_of(&job(&exec, None).unwrap());
    assert!(
        env.contains(&("TRACEPARENT".into(), Some(trace.traceparent()))),
        "{env:?}"
    );
    // A container's own TRACEPARENT wins.
    exec.rendered["spec"]["template"]["spec"]["containers"][0]["env"] =
        json!([{"name": "TRACEPARENT", "value": "mine"}]);
    let env = env_of(&job(&exec, None).unwrap());
    assert_eq!(
        env.iter()
            .filter(|(n, _)| n == "TRACEPARENT")
            .collect::<Vec<_>>(),
        [&("TRACEPARENT".to_string(), Some("mine".to_string()))]
    );
}

fn sample_execution() -> JobExecution {
    let sample = include_str!("../../../examples/jobs/jobtemplate-sample.yaml");
    let doc = dispatch_core::manifest::parse_manifest(sample)
        .unwrap()
        .remove(0)
        .object;
    let spec: JobTemplateSpec = doc.typed_spec().unwrap();
    let data = RenderData {
        payload: "p".into(),
        name: "jobtemplate-sample".into(),
        namespace: "default".into(),
        uuid: "0193c1f2-8e4b-7a00-8000-123456789abc".into(),
        created: "2026-11-23T10:00:00Z".parse().unwrap(),
    };
    let rendered = render(&spec.job_template, &data).unwrap();
    JobExecution {
        uuid: data.uuid.clone(),
        name: data.name.clone(),
        namespace: "default".into(),
        phase: JobPhase::Waiting,
        reason: String::new(),
        payload: data.payload.clone(),
        rendered,
        images: vec![],
        runtime: dispatch_core::jobs::JobRuntime::Host,
        attempts: 0,
        exit_code: None,
        logs: Logs::default(),
        created_at: data.created,
        started_at: None,
        finished_at: None,
        expires_at: None,
        replica: None,
        trace: None,
    }
}

#[test]
fn every_execution_gets_its_own_job_name() {
    let base = sample_execution();
    let name_of = |uuid: &str, template: &str| {
        let mut e = base.clone();
        e.uuid = uuid.into();
        e.name = template.into();
        job(&e, None).unwrap().metadata.name.unwrap()
    };
    // Two generated UUIDs a second apart share their first 8 hex digits (the timestamp's
    // top bits), and named executions may share a prefix: each still gets its own Job (a
    // restarted server would otherwise follow another execution's Job and report its end).
    let a = name_of("0193c1f2-8e4b-7a00-8000-123456789abc", "jobtemplate-sample");
    let b = name_of("0193c1f2-9a01-7c00-8000-fedcba987654", "jobtemplate-sample");
    let c = name_of("nightly-1", "jobtemplate-sample");
    let d = name_of("nightly-12", "jobtemplate-sample");
    let names = std::collections::BTreeSet::from([&a, &b, &c, &d]);
    assert_eq!(names.len(), 4, "{a} {b} {c} {d}");
    // The same execution always gets the same name (a restart finds its Job).
    assert_eq!(
        a,
        name_of("0193c1f2-8e4b-7a00-8000-123456789abc", "jobtemplate-sample")
    );
    // A long template name still makes a valid Job name (its pods' job-name label is 63 at most).
    let long = name_of("nightly-1", &"t".repeat(63));
    assert!(long.len() <= 63, "{long}");
    assert!(
        dispatch_core::names::validate_name("job", &long).is_ok(),
        "{long}"
    );
}
