//! The Kubernetes side of the sandbox (DESIGN §9): function and job pods run under the Pod
//! Security Standard "restricted" — not root, a read-only root file system with an emptyDir
//! `/tmp`, every capability dropped, the runtime's default seccomp profile, no privilege
//! escalation, no service-account token — with requests and limits from `spec.resources`,
//! and a NetworkPolicy that denies all egress for `spec.network: none`.
//! [`restricted_violations`] checks a pod spec against those rules (tests use it on every
//! object this crate makes).

use std::collections::BTreeMap;

use dispatch_core::resource::Limits;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

/// The uid and gid user code runs as in pods that do not name a non-root user themselves
/// (the "nonroot" user of distroless images).
pub const SANDBOX_UID: i64 = 65532;

/// Memory of the runner process itself in a function pod, beyond its workers'.
pub const RUNNER_MEMORY: u64 = 64 << 20;

/// The emptyDir that is a pod's writable `/tmp`.
const TMP_VOLUME: &str = "tmp";

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

/// A container's restricted security context; keeps a non-root uid the container names.
fn container_security(existing: Option<&SecurityContext>) -> SecurityContext {
    let uid = existing
        .and_then(|s| s.run_as_user)
        .filter(|u| *u != 0)
        .unwrap_or(SANDBOX_UID);
    let gid = existing
        .and_then(|s| s.run_as_group)
        .filter(|g| *g != 0)
        .unwrap_or(SANDBOX_UID);
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(gid),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

/// Memory and CPU of a container running `workers` workers of `limits` each (requests equal
/// limits for memory, so a pod is never overcommitted into the OOM killer's choice).
pub fn resources(limits: &Limits, workers: u32, overhead: u64) -> ResourceRequirements {
    let memory = limits
        .memory
        .saturating_mul(u64::from(workers.max(1)))
        .saturating_add(overhead);
    let mut req = BTreeMap::from([("memory".to_string(), Quantity(memory.to_string()))]);
    let mut lim = req.clone();
    if let Some(m) = limits.cpu_millis {
        let cpu = Quantity(format!("{}m", m.saturating_mul(u64::from(workers.max(1)))));
        req.insert("cpu".into(), cpu.clone());
        lim.insert("cpu".into(), cpu);
    }
    let tmp = Quantity(limits.tmp.to_string());
    req.insert("ephemeral-storage".into(), tmp.clone());
    lim.insert("ephemeral-storage".into(), tmp);
    ResourceRequirements {
        requests: Some(req),
        limits: Some(lim),
        ..Default::default()
    }
}

/// Makes `pod` restricted: its and every container's security context, no service-account
/// token, and an emptyDir `/tmp` of `tmp_bytes` mounted in every container that has none.
/// Containers without resources get `default_resources`.
pub fn restrict_pod(pod: &mut PodSpec, tmp_bytes: u64, default_resources: &ResourceRequirements) {
    let fs_group = pod
        .security_context
        .as_ref()
        .and_then(|s| s.fs_group)
        .filter(|g| *g != 0)
        .unwrap_or(SANDBOX_UID);
    pod.security_context = Some(PodSecurityContext {
        run_as_non_root: Some(true),
        fs_group: Some(fs_group),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    });
    pod.automount_service_account_token = Some(false);
    pod.host_network = None;
    pod.host_pid = None;
    pod.host_ipc = None;
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    if !volumes.iter().any(|v| v.name == TMP_VOLUME) {
        volumes.push(Volume {
            name: TMP_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: None,
                size_limit: Some(Quantity(tmp_bytes.to_string())),
            }),
            ..Default::default()
        });
    }
    let all = pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten());
    for c in all {
        restrict_container(c, default_resources);
    }
}

fn restrict_container(c: &mut Container, default_resources: &ResourceRequirements) {
    c.security_context = Some(container_security(c.security_context.as_ref()));
    let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
    if !mounts.iter().any(|m| m.mount_path == "/tmp") {
        mounts.push(VolumeMount {
            name: TMP_VOLUME.into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        });
    }
    let has_limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .is_some_and(|l| l.contains_key("memory"));
    if !has_limits {
        c.resources = Some(default_resources.clone());
    }
}

/// The NetworkPolicy of a function with `spec.network: none`: its pods may open no
/// connection at all (egress denied, DNS included); the server still reaches them.
pub fn deny_egress(ns: &str, name: &str, labels: BTreeMap<String, String>) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(crate::object_name(name)),
            namespace: Some(ns.into()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels),
                ..Default::default()
            }),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(Vec::new()),
            ingress: None,
        }),
    }
}

/// What in `pod` breaks the Pod Security Standard "restricted" (v1.34), as messages; empty
/// when it complies.
pub fn restricted_violations(pod: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    let psc = pod.security_context.clone().unwrap_or_default();
    if pod.host_network == Some(true) || pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        out.push("host namespaces".into());
    }
    for v in pod.volumes.iter().flatten() {
        let allowed = v.config_map.is_some()
            || v.csi.is_some()
            || v.downward_api.is_some()
            || v.empty_dir.is_some()
            || v.ephemeral.is_some()
            || v.persistent_volume_claim.is_some()
            || v.projected.is_some()
            || v.secret.is_some();
        if !allowed {
            out.push(format!(
                "volume {} has a type restricted pods may not use",
                v.name
            ));
        }
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|s| s.type_.as_str());
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let sc = c.security_context.clone().unwrap_or_default();
        let n = &c.name;
        if sc.privileged == Some(true) {
            out.push(format!("{n}: privileged"));
        }
        if sc.allow_privilege_escalation != Some(false) {
            out.push(format!("{n}: allowPrivilegeEscalation must be false"));
        }
        if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
            out.push(format!("{n}: runAsNonRoot must be true"));
        }
        if sc.run_as_user.or(psc.run_as_user) == Some(0) {
            out.push(format!("{n}: runAsUser 0"));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|s| s.type_.as_str())
            .or(pod_seccomp);
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            out.push(format!(
                "{n}: seccompProfile must be RuntimeDefault or Localhost"
            ));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.iter().flatten().any(|d| d == "ALL") {
            out.push(format!("{n}: capabilities must drop ALL"));
        }
        if caps.add.iter().flatten().any(|a| a != "NET_BIND_SERVICE") {
            out.push(format!("{n}: adds capabilities"));
        }
        for p in c.ports.iter().flatten() {
            if p.host_port.is_some_and(|h| h != 0) {
                out.push(format!("{n}: hostPort"));
            }
        }
    }
    out
}
