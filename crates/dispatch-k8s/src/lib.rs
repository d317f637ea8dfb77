//! The Kubernetes shapes of Dispatch (DESIGN §8), as typed `k8s-openapi` objects so that every
//! generated object is valid by construction: CRDs for every kind ([`crds`]), a function's
//! `apps/v1` Deployment and Service or Knative Service ([`function_objects`],
//! [`knative_service`]), and a job execution's `batch/v1` Job ([`job`]).
//!
//! It also applies them with kube (server-side apply of a function's Deployment and Service,
//! Jobs for executions, deletes), tested against kube's tower-test mock API server; builds
//! function images without a daemon ([`oci`], [`image`]); and [`backend::KubernetesBackend`]
//! puts these together behind the server's `Backend` seam (`dispatch server --backend
//! kubernetes`), which also runs job executions as Jobs and elects the cron scheduler's
//! server by Lease ([`lease`]); [`store::CrStore`] keeps resources as custom resources;
//! [`install`] renders what installs it.

pub mod backend;
pub mod image;
pub mod install;
pub mod lease;
pub mod oci;
pub mod security;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

use std::collections::BTreeMap;

use dispatch_core::{FunctionSpec, JobExecution, Kind, Language};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, PodSpec, PodTemplateSpec, Probe, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
    CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
    CustomResourceSubresources, CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The API group of Dispatch's CRDs (`dispatch.dev/v1`).
pub const GROUP: &str = "dispatch.dev";
/// The port `dispatch runner` listens on in function pods.
pub const RUNNER_PORT: i32 = 8080;

fn labels(ns: &str, function: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".into(), "dispatch".into()),
        ("dispatch.dev/namespace".into(), ns.into()),
        ("dispatch.dev/function".into(), function.into()),
    ])
}

fn column(name: &str, type_: &str, path: &str, priority: i32) -> CustomResourceColumnDefinition {
    CustomResourceColumnDefinition {
        name: name.into(),
        type_: type_.into(),
        json_path: path.into(),
        priority: (priority > 0).then_some(priority),
        ..Default::default()
    }
}

/// The OpenAPI v3 schema of `T` as a CRD takes it: inlined and structural (schemars with
/// kube's rewriters, as kube's `CustomResource` derive does), doc comments as descriptions
/// (`kubectl explain`), and fields that hold any JSON (a Job spec to template, system
/// dependencies) kept whole with `x-kubernetes-preserve-unknown-fields`.
pub fn schema_of<T: schemars::JsonSchema>() -> JSONSchemaProps {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .with_transform(kube_core::schema::OptionalEnum)
        .into_generator();
    let mut v =
        serde_json::to_value(generator.into_root_schema_for::<T>()).expect("a schema is JSON");
    if let Some(root) = v.as_object_mut() {
        root.remove("title");
    }
    keep_any_json(&mut v);
    without_design_refs(&mut v);
    serde_json::from_value(v).expect("schemars' OpenAPI schema is a JSONSchemaProps")
}

/// Drops " (DESIGN §n)" from descriptions: doc comments point maintainers at the design,
/// `kubectl explain` readers do not have it.
fn without_design_refs(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::String(d)) = o.get_mut("description") {
                while let Some(start) = d.find(" (DESIGN §") {
                    let end = d[start..].find(')').map_or(d.len(), |e| start + e + 1);
                    d.replace_range(start..end, "");
                }
            }
            o.values_mut().for_each(without_design_refs);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_design_refs),
        _ => {}
    }
}

/// Marks "anything" subschemas (`true`, or only a description) the way Kubernetes takes
/// them: `x-kubernetes-preserve-unknown-fields`.
fn keep_any_json(v: &mut serde_json::Value) {
    use serde_json::Value;
    const SHAPES: [&str; 8] = [
        "type",
        "properties",
        "items",
        "additionalProperties",
        "enum",
        "anyOf",
        "oneOf",
        "allOf",
    ];
    fn mark(s: &mut Value) {
        if *s == Value::Bool(true) {
            *s = Value::Object(Default::default());
        }
        if let Some(o) = s.as_object_mut()
            && !SHAPES.iter().any(|k| o.contains_key(*k))
        {
            o.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
        }
        keep_any_json(s);
    }
    let Some(o) = v.as_object_mut() else { return };
    if let Some(Value::Object(props)) = o.get_mut("properties") {
        props.values_mut().for_each(mark);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(s) = o.get_mut(key) {
            mark(s);
        }
    }
}

/// The schema of a kind's `spec` as stored (a secret's is sealed: its keys and ciphertext).
pub fn spec_schema(kind: Kind) -> JSONSchemaProps {
    use dispatch_core::events::{EventDriverSpec, SubscriptionSpec};
    use dispatch_core::jobs::JobTemplateSpec;
    use dispatch_core::{BaseImageSpec, EndpointSpec, ImageSpec, SealedSecret};
    match kind {
        Kind::BaseImage => schema_of::<BaseImageSpec>(),
        Kind::Image => schema_of::<ImageSpec>(),
        Kind::Function => schema_of::<FunctionSpec>(),
        Kind::Endpoint => schema_of::<EndpointSpec>(),
        Kind::Secret => schema_of::<SealedSecret>(),
        Kind::JobTemplate => schema_of::<JobTemplateSpec>(),
        Kind::Subscription => schema_of::<SubscriptionSpec>(),
        Kind::EventDriver => schema_of::<EventDriverSpec>(),
    }
}

/// One CRD per kind: namespaced, `dispatch.dev/v1`, a status subresource, and a structural
/// schema generated from the core types: the kind's spec and the common status, so that the
/// API server refuses a malformed object (`kubectl apply` of a Function without an image, a
/// base image of an unknown language) and prunes unknown fields.
pub fn crds() -> Vec<CustomResourceDefinition> {
    Kind::ALL
        .iter()
        .map(|k| {
            let plural = k.plural().to_string();
            let schema = JSONSchemaProps {
                type_: Some("object".into()),
                properties: Some(BTreeMap::from([
                    ("spec".to_string(), spec_schema(*k)),
                    ("status".to_string(), schema_of::<dispatch_core::Status>()),
                ])),
                ..Default::default()
            };
            CustomResourceDefinition {
                metadata: ObjectMeta {
                    name: Some(format!("{plural}.{GROUP}")),
                    ..Default::default()
                },
                spec: CustomResourceDefinitionSpec {
                    group: GROUP.into(),
                    names: CustomResourceDefinitionNames {
                        kind: k.as_str().into(),
                        plural: plural.clone(),
                        singular: Some(k.as_str().to_ascii_lowercase()),
                        categories: Some(vec!["dispatch".into()]),
                        ..Default::default()
                    },
                    scope: "Namespaced".into(),
                    versions: vec![CustomResourceDefinitionVersion {
                        name: "v1".into(),
                        served: true,
                        storage: true,
                        // `kubectl get functions` shows what `dispatch get functions` does.
                        additional_printer_columns: Some(vec![
                            column("Phase", "string", ".status.phase", 0),
                            column("Reason", "string", ".status.reason", 1),
                            column("Age", "date", ".metadata.creationTimestamp", 0),
                        ]),
                        schema: Some(CustomResourceValidation {
                            open_api_v3_schema: Some(schema),
                        }),
                        subresources: Some(CustomResourceSubresources {
                            status: Some(CustomResourceSubresourceStatus(
                                serde_json::Value::Object(Default::default()),
                            )),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                status: None,
            }
        })
        .collect()
}

/// How a function runs: its environment and concurrency (from its spec, or a deploy).
#[derive(Debug, Clone)]
pub struct Workload {
    pub env: BTreeMap<String, String>,
    pub timeout: std::time::Duration,
    pub max_workers: u32,
    pub min_workers: u32,
    /// Limits of each worker (`spec.resources`): the pod's requests and limits.
    pub limits: dispatch_core::resource::Limits,
    /// `false` (`spec.network: none`): a NetworkPolicy denies the pods all egress.
    pub network: bool,
}

impl Workload {
    pub fn of(spec: &FunctionSpec) -> Workload {
        Workload {
            env: spec.env.clone(),
            timeout: spec.timeout().unwrap_or(std::time::Duration::from_secs(30)),
            max_workers: spec.max_workers(),
            min_workers: spec.min_workers(),
            limits: spec.resources.limits().unwrap_or_default(),
            network: spec.network != Some(dispatch_core::resource::NetworkMode::None),
        }
    }
}

/// Workers (concurrent calls) one function pod runs at most; more concurrency is more pods.
pub const WORKERS_PER_POD: u32 = 4;

impl Workload {
    /// Workers in each pod: `maxWorkers`, up to [`WORKERS_PER_POD`].
    pub fn workers_per_pod(&self) -> u32 {
        self.max_workers.clamp(1, WORKERS_PER_POD)
    }

    /// Pods at least and at most: enough for `minWorkers` (at least one) and for
    /// `maxWorkers`, [`Workload::workers_per_pod`] each.
    pub fn replicas(&self) -> (u32, u32) {
        let per = self.workers_per_pod();
        let min = self.min_workers.div_ceil(per).max(1);
        (min, self.max_workers.div_ceil(per).max(min))
    }
}

/// The `autoscaling/v2` HorizontalPodAutoscaler of a function whose concurrency spans more
/// than one pod count: between the [`Workload::replicas`] bounds, on the pods' average CPU
/// (an absolute value, so that pods need no CPU request). `None` when the count is fixed.
pub fn function_hpa(ns: &str, name: &str, spec: &Workload) -> Option<HorizontalPodAutoscaler> {
    let (min, max) = spec.replicas();
    (max > min).then(|| HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some(format!("fn-{name}")),
            namespace: Some(ns.into()),
            labels: Some(labels(ns, name)),
            ..Default::default()
        },
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: format!("fn-{name}"),
            },
            min_replicas: Some(min as i32),
            max_replicas: max as i32,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(HPA_CPU_PER_POD.into())),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The average CPU per pod above which the autoscaler adds pods.
pub const HPA_CPU_PER_POD: &str = "500m";

/// What a function needs to run on Kubernetes.
pub struct FunctionImage<'a> {
    /// Pullable reference of the built image (`registry/ns/fn@sha256:…`).
    pub reference: &'a str,
    pub language: Language,
    /// The resolved handler.
    pub handler: &'a str,
    /// Function digest (annotated, so a rebuild rolls the Deployment).
    pub digest: &'a str,
    /// A `kubernetes.io/dockerconfigjson` Secret in the function's namespace to pull with.
    pub pull_secret: Option<&'a str>,
}

/// A function's Deployment (`dispatch runner` as the entrypoint, readiness from /healthz)
/// and its Service.
pub fn function_objects(
    ns: &str,
    name: &str,
    spec: &Workload,
    image: &FunctionImage,
) -> (Deployment, Service) {
    let labels = labels(ns, name);
    let timeout = spec.timeout.as_secs().max(1);
    let mut env = vec![
        EnvVar {
            name: "DISPATCH_LANGUAGE".into(),
            value: Some(image.language.as_str().into()),
            ..Default::default()
        },
        EnvVar {
            name: "DISPATCH_HANDLER".into(),
            value: Some(image.handler.into()),
            ..Default::default()
        },
        EnvVar {
            name: "DISPATCH_TIMEOUT".into(),
            value: Some(format!("{timeout}s")),
            ..Default::default()
        },
        EnvVar {
            name: "DISPATCH_MAX_WORKERS".into(),
            value: Some(spec.workers_per_pod().to_string()),
            ..Default::default()
        },
        EnvVar {
            name: "PORT".into(),
            value: Some(RUNNER_PORT.to_string()),
            ..Default::default()
        },
    ];
    env.extend(spec.env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: Some(v.clone()),
        ..Default::default()
    }));
    let container = Container {
        name: "function".into(),
        image: Some(image.reference.into()),
        command: Some(vec![image::RUNNER_PATH.into(), "runner".into()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            container_port: RUNNER_PORT,
            name: Some("http".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(RUNNER_PORT),
                ..Default::default()
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    };
    let meta = ObjectMeta {
        name: Some(format!("fn-{name}")),
        namespace: Some(ns.into()),
        labels: Some(labels.clone()),
        annotations: Some(BTreeMap::from([(
            "dispatch.dev/digest".into(),
            image.digest.into(),
        )])),
        ..Default::default()
    };
    let deployment = Deployment {
        metadata: meta.clone(),
        spec: Some(DeploymentSpec {
            // With an autoscaler the replica count is its to set (not in this apply).
            replicas: match spec.replicas() {
                (min, max) if min == max => Some(min as i32),
                _ => None,
            },
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    annotations: Some(BTreeMap::from([(
                        "dispatch.dev/digest".into(),
                        image.digest.into(),
                    )])),
                    ..Default::default()
                }),
                spec: Some({
                    let mut pod = PodSpec {
                        containers: vec![container],
                        image_pull_secrets: image.pull_secret.map(|s| {
                            vec![k8s_openapi::api::core::v1::LocalObjectReference {
                                name: s.into(),
                            }]
                        }),
                        ..Default::default()
                    };
                    // Restricted, with room for every worker of the pod (DESIGN §9).
                    security::restrict_pod(
                        &mut pod,
                        spec.limits.tmp,
                        &security::resources(
                            &spec.limits,
                            spec.workers_per_pod(),
                            security::RUNNER_MEMORY,
                        ),
                    );
                    pod
                }),
            },
            ..Default::default()
        }),
        status: None,
    };
    let service = Service {
        metadata: ObjectMeta {
            annotations: None,
            ..meta
        },
        spec: Some(ServiceSpec {
            selector: Some(labels),
            ports: Some(vec![ServicePort {
                port: 80,
                target_port: Some(IntOrString::Int(RUNNER_PORT)),
                name: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    (deployment, service)
}

/// The Knative `serving.knative.dev/v1` Service of a function (`--knative`): scale bounds
/// from the concurrency settings, `containerConcurrency`, `timeoutSeconds`.
pub fn knative_service(
    ns: &str,
    name: &str,
    spec: &Workload,
    image: &FunctionImage,
) -> serde_json::Value {
    let (deployment, _) = function_objects(ns, name, spec, image);
    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .unwrap_or_default();
    let container = pod
        .containers
        .first()
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .unwrap_or_default();
    let mut service = serde_json::json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": format!("fn-{name}"), "namespace": ns, "labels": labels(ns, name)},
        "spec": {"template": {
            "metadata": {"labels": labels(ns, name), "annotations": {
                "autoscaling.knative.dev/min-scale": spec.min_workers.to_string(),
                "autoscaling.knative.dev/max-scale": spec.max_workers.to_string(),
                "autoscaling.knative.dev/target": "1",
                "dispatch.dev/digest": image.digest,
            }},
            "spec": {
                "containerConcurrency": 1,
                "timeoutSeconds": spec.timeout.as_secs().max(1),
                "containers": [container],
                "securityContext": pod.security_context,
                "automountServiceAccountToken": false,
                "volumes": pod.volumes,
            },
        }},
    });
    if let Some(secret) = image.pull_secret {
        service["spec"]["template"]["spec"]["imagePullSecrets"] =
            serde_json::json!([{"name": secret}]);
    }
    service
}

/// A job execution's `batch/v1` Job: the rendered template's spec, labelled with the
/// execution's uuid and, when its JobTemplate is a custom resource (`template_uid`), owned
/// by it (deleting the template deletes the Jobs).
pub fn job(exec: &JobExecution, template_uid: Option<&str>) -> Result<Job, serde_json::Error> {
    let mut spec: JobSpec =
        serde_json::from_value(exec.rendered.get("spec").cloned().unwrap_or_default())?;
    // Job pods are restricted too (DESIGN §9); containers without limits get a job's defaults.
    if let Some(pod) = spec.template.spec.as_mut() {
        let limits = dispatch_core::resource::Limits {
            memory: 1 << 30,
            tmp: 256 << 20,
            ..Default::default()
        };
        security::restrict_pod(pod, limits.tmp, &security::resources(&limits, 1, 0));
    }
    let mut labels: BTreeMap<String, String> = exec
        .rendered
        .pointer("/metadata/labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    labels.insert("app.kubernetes.io/managed-by".into(), "dispatch".into());
    labels.insert("dispatch.dev/jobtemplate".into(), exec.name.clone());
    labels.insert("dispatch.dev/execution".into(), exec.uuid.clone());
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}-{}",
                exec.name,
                exec.uuid
                    .chars()
                    .filter(|c| *c != '-')
                    .take(8)
                    .collect::<String>()
            )),
            namespace: Some(exec.namespace.clone()),
            labels: Some(labels),
            owner_references: template_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: format!("{GROUP}/v1"),
                    kind: "JobTemplate".into(),
                    name: exec.name.clone(),
                    uid: uid.into(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]
            }),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// The field manager of Dispatch's server-side applies.
pub const FIELD_MANAGER: &str = "dispatch";

/// Applies a function's Deployment and Service (server-side apply: creates or updates, and a
/// rebuild's new digest annotation rolls the pods).
pub async fn apply_function(
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: &Workload,
    image: &FunctionImage<'_>,
) -> Result<(), kube::Error> {
    use kube::api::{Api, Patch, PatchParams};
    let (deployment, service) = function_objects(ns, name, spec, image);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let object_name = format!("fn-{name}");
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(&object_name, &pp, &Patch::Apply(&deployment))
        .await?;
    Api::<Service>::namespaced(client.clone(), ns)
        .patch(&object_name, &pp, &Patch::Apply(&service))
        .await?;
    apply_network_policy(client, ns, name, spec, &pp).await?;
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns);
    match function_hpa(ns, name, spec) {
        Some(hpa) => {
            hpas.patch(&object_name, &pp, &Patch::Apply(&hpa)).await?;
        }
        // A fixed pod count now: an autoscaler from before must go.
        None => gone(
            hpas.delete(&object_name, &kube::api::DeleteParams::background())
                .await,
        )?,
    }
    Ok(())
}

/// The egress-denying NetworkPolicy of a function with `spec.network: none`, or none (an
/// earlier one deleted).
async fn apply_network_policy(
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: &Workload,
    pp: &kube::api::PatchParams,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::{Api, Patch};
    let api = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
    if spec.network {
        delete_network_policy(client, ns, name).await
    } else {
        let policy = security::deny_egress(ns, name, labels(ns, name));
        api.patch(&format!("fn-{name}"), pp, &Patch::Apply(&policy))
            .await?;
        Ok(())
    }
}

/// A delete's result where "not found" is success: what is gone is gone.
fn gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes a function's Deployment and Service (absent ones are fine).
pub async fn delete_function(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error> {
    use kube::api::{Api, DeleteParams};
    let object_name = format!("fn-{name}");
    gone(
        Api::<Deployment>::namespaced(client.clone(), ns)
            .delete(&object_name, &DeleteParams::background())
            .await,
    )?;
    gone(
        Api::<Service>::namespaced(client.clone(), ns)
            .delete(&object_name, &DeleteParams::background())
            .await,
    )?;
    gone(
        Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns)
            .delete(&object_name, &DeleteParams::background())
            .await,
    )?;
    delete_network_policy(client, ns, name).await
}

fn knative_api(client: &kube::Client, ns: &str) -> kube::Api<kube::api::DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("serving.knative.dev", "v1", "Service");
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, "services");
    kube::Api::namespaced_with(client.clone(), ns, &resource)
}

/// Applies a function's Knative Service (server-side apply; Knative rolls out the new
/// revision and routes to it once it is ready).
pub async fn apply_knative(
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: &Workload,
    image: &FunctionImage<'_>,
) -> Result<(), kube::Error> {
    use kube::api::{Patch, PatchParams};
    let service = knative_service(ns, name, spec, image);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    knative_api(client, ns)
        .patch(&format!("fn-{name}"), &pp, &Patch::Apply(&service))
        .await?;
    apply_network_policy(client, ns, name, spec, &pp).await
}

/// Deletes a function's Knative Service (an absent one is fine).
pub async fn delete_knative(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error> {
    gone(
        knative_api(client, ns)
            .delete(
                &format!("fn-{name}"),
                &kube::api::DeleteParams::background(),
            )
            .await,
    )?;
    delete_network_policy(client, ns, name).await
}

/// Deletes a function's NetworkPolicy (an absent one is fine).
async fn delete_network_policy(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    gone(
        kube::Api::<NetworkPolicy>::namespaced(client.clone(), ns)
            .delete(
                &format!("fn-{name}"),
                &kube::api::DeleteParams::background(),
            )
            .await,
    )
}

/// Starts a job execution as a `batch/v1` Job; cancelling deletes it with its pods.
pub async fn start_job(
    client: &kube::Client,
    exec: &JobExecution,
    template_uid: Option<&str>,
) -> Result<Job, kube::Error> {
    use kube::api::{Api, PostParams};
    let job = job(exec, template_uid).map_err(kube::Error::SerdeError)?;
    Api::<Job>::namespaced(client.clone(), &exec.namespace)
        .create(&PostParams::default(), &job)
        .await
}

pub async fn cancel_job(
    client: &kube::Client,
    ns: &str,
    job_name: &str,
) -> Result<(), kube::Error> {
    use kube::api::{Api, DeleteParams};
    Api::<Job>::namespaced(client.clone(), ns)
        .delete(job_name, &DeleteParams::background())
        .await
        .map(|_| ())
}
