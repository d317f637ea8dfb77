//! A function's workload as typed objects: Deployment and Service (and an autoscaler), or a
//! Knative Service; a job execution's `batch/v1` Job.

use std::collections::BTreeMap;

use dispatch_core::{FunctionSpec, JobExecution, Language};
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
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::*;

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
    /// exec handlers (`spec.stream`): the runner streams their stdout.
    pub stream: bool,
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
            stream: spec.stream,
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
            name: Some(object_name(name)),
            namespace: Some(ns.into()),
            labels: Some(labels(ns, name)),
            ..Default::default()
        },
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: object_name(name),
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
    if spec.stream {
        env.push(EnvVar {
            name: "DISPATCH_STREAM".into(),
            value: Some("true".into()),
            ..Default::default()
        });
    }
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
        name: Some(object_name(name)),
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
        "metadata": {"name": object_name(name), "namespace": ns, "labels": labels(ns, name)},
        "spec": {"template": {
            "metadata": {"labels": labels(ns, name), "annotations": {
                "autoscaling.knative.dev/min-scale": spec.min_workers.to_string(),
                "autoscaling.knative.dev/max-scale": spec.max_workers.to_string(),
                "autoscaling.knative.dev/target": "1",
                // A WebSocket session's messages go up the request while the answer comes
                // down: the queue-proxy must pass both at once.
                "features.knative.dev/http-full-duplex": "Enabled",
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

/// The Job of an execution: its template's name (cut to fit) and ten hex digits of the
/// SHA-256 of the execution's id — the same for the same execution (a restarted server finds
/// its Job), different for two executions even when their ids share a prefix (UUIDs made in
/// the same minute do; so may names given in a manifest), and 63 characters at most (the
/// `job-name` label of its pods).
pub fn job_name(exec: &JobExecution) -> String {
    let digest = dispatch_core::digest::sha256(exec.uuid.as_bytes());
    let suffix = &dispatch_core::digest::hex_part(&digest)[..10];
    let prefix: String = exec.name.chars().take(63 - 1 - suffix.len()).collect();
    format!("{}-{suffix}", prefix.trim_end_matches('-'))
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
        // The execution's W3C trace, unless a container sets TRACEPARENT itself.
        if let Some((name, value)) = exec.trace_env() {
            for c in &mut pod.containers {
                let env = c.env.get_or_insert_with(Vec::new);
                if !env.iter().any(|e| e.name == name) {
                    env.push(k8s_openapi::api::core::v1::EnvVar {
                        name: name.into(),
                        value: Some(value.clone()),
                        value_from: None,
                    });
                }
            }
        }
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
            name: Some(job_name(exec)),
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
