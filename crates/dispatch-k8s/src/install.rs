//! What installs Dispatch on a cluster (`dispatch k8s manifests`, `deploy/kubernetes/`): its
//! namespace, the CRDs, a service account with least-privilege RBAC, a volume claim for the
//! SQL store, the server Deployment (`dispatch server --backend kubernetes`) and Services for
//! the API and the gateway. With a database Secret ([`Install::database_secret`]): no volume,
//! several active replicas on PostgreSQL, rolled one at a time behind their readiness, and a
//! PodDisruptionBudget. Every object is a typed k8s-openapi value.

use dispatch_core::Kind;
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, Namespace,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, SecretKeySelector,
    SecretVolumeSource, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Choices of an installation.
#[derive(Debug, Clone)]
pub struct Install {
    /// The namespace of the server itself.
    pub namespace: String,
    /// The server's image: the `dispatch` binary with python3/pip and node/npm (function
    /// images are built by the server, their dependencies installed by those tools).
    pub image: String,
    /// Where function images are pushed.
    pub registry: String,
    /// Registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// A `kubernetes.io/dockerconfigjson` Secret (in `namespace`) with push credentials;
    /// optional: the server starts without it.
    pub registry_secret: String,
    /// Functions as Knative Services.
    pub knative: bool,
    /// Size of the SQL store's volume (SQLite; not with a database).
    pub storage: String,
    /// A Secret (in `namespace`) with the PostgreSQL database: key `url` (required),
    /// `password` (optional) and `secret-key` (the 32-byte key that seals secrets, the same
    /// for every replica). With it, records live in that database and the server runs as
    /// `replicas` active replicas; without it, one replica on a SQLite volume.
    pub database_secret: Option<String>,
    /// Server replicas (with a database only).
    pub replicas: i32,
}

impl Install {
    pub fn new(image: &str, registry: &str) -> Install {
        Install {
            namespace: "dispatch".into(),
            image: image.into(),
            registry: registry.into(),
            insecure_registries: Vec::new(),
            registry_secret: "dispatch-registry".into(),
            knative: false,
            storage: "1Gi".into(),
            database_secret: None,
            replicas: 1,
        }
    }
}

const NAME: &str = "dispatch-server";
pub const API_PORT: i32 = 8080;
pub const GATEWAY_PORT: i32 = 8081;
/// How long a stopping replica answers /readyz with 503 while it still serves, so that the
/// Services stop sending it requests before its listeners close (`--shutdown-delay`).
const SHUTDOWN_DELAY_SECONDS: i64 = 5;

fn meta(name: &str, ns: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(str::to_string),
        labels: Some(app_labels()),
        ..Default::default()
    }
}

fn app_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "dispatch".into()),
        ("app.kubernetes.io/component".into(), "server".into()),
    ])
}

/// What binds role `kind` (`Role` or `ClusterRole`) named like the server to its service
/// account in `namespace`.
fn binding(kind: &str, namespace: &str) -> (RoleRef, Option<Vec<Subject>>) {
    (
        RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: kind.into(),
            name: NAME.into(),
        },
        Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: NAME.into(),
            namespace: Some(namespace.into()),
            ..Default::default()
        }]),
    )
}

/// A variable from the pod's own fields (the downward API).
fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(s(groups)),
        resources: Some(s(resources)),
        verbs: s(verbs),
        ..Default::default()
    }
}

/// What the server does in the cluster, and nothing more: Dispatch's custom resources are
/// watched and written (their status too), dispatcher's JobExecutions watched (their status
/// written); a Dispatch namespace's Kubernetes namespace is
/// created when missing; function Deployments, Services and autoscalers (or Knative
/// Services) are applied, read (rollout) and deleted; Jobs are created, read and deleted,
/// their pods listed and their logs read; in the namespaces of Dispatch's namespaces (hence
/// a ClusterRole).
pub fn cluster_role(i: &Install) -> ClusterRole {
    let verbs = ["get", "patch", "delete"];
    let plurals: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
    let statuses: Vec<String> = plurals.iter().map(|p| format!("{p}/status")).collect();
    let statuses: Vec<&str> = statuses.iter().map(String::as_str).collect();
    let mut rules = vec![
        rule(
            &[crate::GROUP],
            &plurals,
            &["get", "list", "watch", "create", "update", "delete"],
        ),
        rule(&[crate::GROUP], &statuses, &["update"]),
        // dispatcher's JobExecutions made with kubectl: followed, their status written.
        rule(
            &[crate::EXECUTION_GROUP],
            &["jobexecutions"],
            &["get", "list", "watch"],
        ),
        rule(
            &[crate::EXECUTION_GROUP],
            &["jobexecutions/status"],
            &["patch"],
        ),
        rule(&[""], &["namespaces"], &["create"]),
        rule(&["apps"], &["deployments"], &verbs),
        rule(&[""], &["services"], &verbs),
        rule(&["autoscaling"], &["horizontalpodautoscalers"], &verbs),
        // spec.network: none is a NetworkPolicy denying the function's pods all egress.
        rule(&["networking.k8s.io"], &["networkpolicies"], &verbs),
        // Job executions: a Job per execution, followed to its end, its last pod's logs.
        rule(&["batch"], &["jobs"], &["create", "get", "watch", "delete"]),
        rule(&[""], &["pods"], &["list"]),
        rule(&[""], &["pods/log"], &["get"]),
    ];
    if i.knative {
        rules.push(rule(&["serving.knative.dev"], &["services"], &verbs));
    }
    ClusterRole {
        metadata: meta(NAME, None),
        rules: Some(rules),
        ..Default::default()
    }
}

/// Every object, in the order `kubectl apply` needs them.
pub fn objects(i: &Install) -> Vec<serde_json::Value> {
    let ns = Some(i.namespace.as_str());
    let selector = app_labels();
    let mut out: Vec<serde_json::Value> = Vec::new();
    let mut push = |v: serde_json::Result<serde_json::Value>| out.push(v.expect("serializable"));
    push(serde_json::to_value(Namespace {
        metadata: meta(&i.namespace, None),
        ..Default::default()
    }));
    for crd in crate::crds() {
        push(serde_json::to_value(crd));
    }
    push(serde_json::to_value(crate::job_execution_crd()));
    push(serde_json::to_value(ServiceAccount {
        metadata: meta(NAME, ns),
        ..Default::default()
    }));
    push(serde_json::to_value(cluster_role(i)));
    let (role_ref, subjects) = binding("ClusterRole", &i.namespace);
    push(serde_json::to_value(ClusterRoleBinding {
        metadata: meta(NAME, None),
        role_ref,
        subjects,
    }));
    // The scheduler's Lease, in the server's own namespace only.
    push(serde_json::to_value(Role {
        metadata: meta(NAME, ns),
        rules: Some(vec![rule(
            &["coordination.k8s.io"],
            &["leases"],
            &["get", "create", "update"],
        )]),
    }));
    let (role_ref, subjects) = binding("Role", &i.namespace);
    push(serde_json::to_value(RoleBinding {
        metadata: meta(NAME, ns),
        role_ref,
        subjects,
    }));
    let db = i.database_secret.as_deref();
    if db.is_none() {
        push(serde_json::to_value(PersistentVolumeClaim {
            metadata: meta("dispatch-data", ns),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".into(),
                        Quantity(i.storage.clone()),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }));
    }
    let mut args: Vec<String> = [
        "server",
        "--backend",
        "kubernetes",
        // A folder of its own on the volume: a volume's root is often group-writable
        // (fsGroup, provisioners), which the server refuses for its data dir.
        "--data-dir",
        "/data/dispatch",
        "--api-addr",
        "0.0.0.0:8080",
        "--gateway-addr",
        "0.0.0.0:8081",
        "--registry",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(i.registry.clone());
    for r in &i.insecure_registries {
        args.extend(["--insecure-registry".to_string(), r.clone()]);
    }
    if i.knative {
        args.push("--knative".into());
    }
    if db.is_some() {
        // The URL and password come from the Secret through the environment.
        args.extend(
            [
                "--secret-key-file",
                "/etc/dispatch/secret-key/key",
                "--shutdown-delay",
            ]
            .map(String::from),
        );
        args.push(format!("{SHUTDOWN_DELAY_SECONDS}s"));
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(API_PORT),
            ..Default::default()
        }),
        period_seconds: Some(if db.is_some() { 1 } else { 5 }),
        ..Default::default()
    };
    let secret_env = |name: &str, key: &str, optional: bool| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: db.unwrap_or_default().into(),
                key: key.into(),
                optional: optional.then_some(true),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut env = vec![
        EnvVar {
            // The registry Secret's .dockerconfigjson, mounted as config.json.
            name: "DOCKER_CONFIG".into(),
            value: Some("/etc/dispatch/registry".into()),
            ..Default::default()
        },
        // Who holds the scheduler's Lease, and where it lives.
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..Default::default()
        },
        VolumeMount {
            name: "registry".into(),
            mount_path: "/etc/dispatch/registry".into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    if db.is_some() {
        env.push(secret_env("DISPATCH_DATABASE_URL", "url", false));
        env.push(secret_env("DISPATCH_DATABASE_PASSWORD", "password", true));
        mounts.push(VolumeMount {
            name: "secret-key".into(),
            mount_path: "/etc/dispatch/secret-key".into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let container = Container {
        name: "server".into(),
        image: Some(i.image.clone()),
        command: Some(vec!["dispatch".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("api".into()),
                container_port: API_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("gateway".into()),
                container_port: GATEWAY_PORT,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let data = match db {
        // The data dir keeps builds and a copy of source archives: the database has the rest.
        Some(_) => Volume {
            name: "data".into(),
            empty_dir: Some(Default::default()),
            ..Default::default()
        },
        None => Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "dispatch-data".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let mut volumes = vec![
        data,
        Volume {
            name: "registry".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(i.registry_secret.clone()),
                optional: Some(true),
                items: Some(vec![KeyToPath {
                    key: ".dockerconfigjson".into(),
                    path: "config.json".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if let Some(secret) = db {
        volumes.push(Volume {
            name: "secret-key".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                items: Some(vec![KeyToPath {
                    key: "secret-key".into(),
                    path: "key".into(),
                    ..Default::default()
                }]),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let (replicas, strategy) = match db {
        // Active replicas on one database: one replaced at a time, a new one ready before an
        // old one stops (and that one unready before its listeners close).
        Some(_) => (
            i.replicas.max(1),
            DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            },
        ),
        // One writer of the SQLite store: never two servers at once, even while rolling.
        None => (
            1,
            DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            },
        ),
    };
    push(serde_json::to_value(Deployment {
        metadata: meta(NAME, ns),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            strategy: Some(strategy),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(selector.clone()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(NAME.into()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    // The shutdown delay, then in-flight calls drain (30 s at most).
                    termination_grace_period_seconds: db.map(|_| SHUTDOWN_DELAY_SECONDS + 35),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }));
    if db.is_some() && replicas > 1 {
        // A node drain takes one replica at a time.
        push(serde_json::to_value(PodDisruptionBudget {
            metadata: meta(NAME, ns),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }));
    }
    // The ports are named for their listener: a ServiceMonitor's `port: api` then scrapes
    // the API's /metrics and never the gateway, whose paths are users' (both Services select
    // the same pods with the same labels).
    for (name, port, port_name) in [
        ("dispatch-api", API_PORT, "api"),
        ("dispatch-gateway", GATEWAY_PORT, "gateway"),
    ] {
        push(serde_json::to_value(Service {
            metadata: meta(name, ns),
            spec: Some(ServiceSpec {
                selector: Some(selector.clone()),
                ports: Some(vec![ServicePort {
                    port,
                    target_port: Some(IntOrString::Int(port)),
                    name: Some(port_name.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }));
    }
    out
}

/// The objects as one multi-document YAML stream, with a header saying how it was made.
pub fn yaml(i: &Install, header: &str) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    for o in objects(i) {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&o).expect("YAML"));
    }
    out
}
