//! Job templates (DESIGN §3 JobTemplate, §7; dispatcher's CRD): a `batch/v1`
//! JobTemplateSpec whose every string (not map keys) is a Go `text/template`, rendered per
//! execution with `.Payload`, `.Name`, `.Namespace`, `.UUID`, `.ShortUUID`, `.Date`.
//!
//! Rendering works on the parsed spec, string by string: a payload is only ever the value of
//! the strings that name it, so quotes, newlines, `{{` or YAML/JSON syntax in it cannot
//! inject fields. An unknown variable is an error (Go's `missingkey=error`).

use std::collections::BTreeMap;
use std::sync::Arc;

use gotmpl::{MissingKey, Template, Value as TValue};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::Logs;
use crate::error::ValidationError;
use crate::names::validate_name;

/// `spec` of a JobTemplate (dispatcher's shape, plus `maxActive`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobTemplateSpec {
    /// A `batch/v1` JobTemplateSpec: `{metadata?, spec: JobSpec}`, kept verbatim.
    pub job_template: Value,
    /// Executions of this template running at once; more wait (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active: Option<u32>,
    /// Where the embedded backend runs a container that names an `image`: `container` (the
    /// default: the image, pulled and run with an OCI runtime) or `host` (its command as a
    /// sandboxed process on this host; the image is only recorded). Kubernetes always runs
    /// the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<JobRuntime>,
}

/// Where the embedded backend runs a job's containers (`spec.runtime`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobRuntime {
    /// The container's image with an OCI runtime (containers without an image: as `host`).
    #[default]
    Container,
    /// The command as a (sandboxed) process on this host.
    Host,
}

impl JobRuntime {
    /// Executions recorded before `spec.runtime` existed ran on the host.
    fn recorded_default() -> JobRuntime {
        JobRuntime::Host
    }
}

pub const DEFAULT_MAX_ACTIVE: u32 = 10;
/// Kubernetes' default `backoffLimit`.
pub const DEFAULT_BACKOFF_LIMIT: u32 = 6;

/// The part of a (rendered) Job the embedded runner uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    #[serde(default)]
    pub backoff_limit: Option<u32>,
    #[serde(default)]
    pub active_deadline_seconds: Option<u64>,
    #[serde(default)]
    pub parallelism: Option<u32>,
    #[serde(default)]
    pub completions: Option<u32>,
    #[serde(default)]
    pub ttl_seconds_after_finished: Option<u64>,
    pub template: PodTemplateView,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PodTemplateView {
    pub spec: PodView,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    #[serde(default)]
    pub containers: Vec<ContainerView>,
    #[serde(default)]
    pub restart_policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `Always`, `IfNotPresent` or `Never` (absent: Always for `:latest`, else IfNotPresent).
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    pub resources: ContainerResources,
}

/// A container's `resources` (its `limits` bound the container tier's cgroup).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ContainerResources {
    #[serde(default)]
    pub limits: BTreeMap<String, Value>,
}

impl ContainerView {
    /// `resources.limits.memory` in bytes and `.cpu` in thousandths of a core.
    pub fn limits(&self) -> Result<(Option<u64>, Option<u64>), String> {
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let memory = self
            .resources
            .limits
            .get("memory")
            .map(|v| crate::quantity::parse_bytes(&text(v)))
            .transpose()?;
        let cpu = self
            .resources
            .limits
            .get("cpu")
            .map(|v| crate::quantity::parse_cpu_millis(&text(v)))
            .transpose()?;
        Ok((memory, cpu))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

impl JobTemplateSpec {
    /// Checks the shape the runner needs and that every string parses as a template; errors
    /// name the field path (`spec.jobTemplate.spec.template.spec.containers[0].command[1]`).
    pub fn validate(&self) -> Result<(), ValidationError> {
        walk_strings(&self.job_template, "spec.jobTemplate", &mut |path, s| {
            parse(s)
                .map(|_| ())
                .map_err(|e| ValidationError::new(format!("{path}: {e}")))
        })?;
        self.job_view(&self.job_template)?;
        if let Some(m) = self.max_active
            && m == 0
        {
            return Err(ValidationError::new("spec.maxActive must be at least 1"));
        }
        Ok(())
    }

    /// The runner's view of a (rendered) job template, checked.
    pub fn job_view(&self, rendered: &Value) -> Result<JobView, ValidationError> {
        let spec = rendered.get("spec").ok_or_else(|| {
            ValidationError::new("spec.jobTemplate.spec is missing: it holds the Job's spec (template, backoffLimit, …)")
        })?;
        let job: JobView = serde_json::from_value(spec.clone()).map_err(|e| {
            ValidationError::new(format!(
                "spec.jobTemplate.spec is not a valid Job spec: {e}"
            ))
        })?;
        let at = "spec.jobTemplate.spec.template.spec";
        if job.template.spec.containers.is_empty() {
            return Err(ValidationError::new(format!(
                "{at}.containers: a job needs at least one container"
            )));
        }
        for (i, c) in job.template.spec.containers.iter().enumerate() {
            validate_name("container", &c.name).map_err(|e| {
                ValidationError::new(format!("{at}.containers[{i}].name: {}", e.message))
            })?;
            let in_image =
                c.image.is_some() && self.runtime.unwrap_or_default() == JobRuntime::Container;
            if c.command.is_empty() && !in_image {
                return Err(ValidationError::new(format!(
                    "{at}.containers[{i}].command: without an image run as a container (spec.runtime: host, or no image) the embedded runner runs command + args as a local process; give a command"
                )));
            }
            if let Some(p) = &c.image_pull_policy
                && !["Always", "IfNotPresent", "Never"].contains(&p.as_str())
            {
                return Err(ValidationError::new(format!(
                    "{at}.containers[{i}].imagePullPolicy: Always, IfNotPresent or Never, not {p:?}"
                )));
            }
            c.limits().map_err(|e| {
                ValidationError::new(format!("{at}.containers[{i}].resources.limits: {e}"))
            })?;
        }
        if let Some(p) = &job.template.spec.restart_policy
            && p != "Never"
            && p != "OnFailure"
        {
            return Err(ValidationError::new(format!(
                "{at}.restartPolicy: a Job's restartPolicy is Never or OnFailure, not {p:?}"
            )));
        }
        for (field, v) in [
            ("parallelism", job.parallelism),
            ("completions", job.completions),
        ] {
            if v.is_some_and(|n| n > 1) {
                return Err(ValidationError::new(format!(
                    "spec.jobTemplate.spec.{field}: the embedded runner runs one pod per execution (1); more needs the kubernetes backend"
                )));
            }
        }
        Ok(job)
    }

    pub fn max_active(&self) -> u32 {
        self.max_active.unwrap_or(DEFAULT_MAX_ACTIVE)
    }
}

fn walk_strings(
    v: &Value,
    path: &str,
    f: &mut dyn FnMut(&str, &str) -> Result<(), ValidationError>,
) -> Result<(), ValidationError> {
    match v {
        Value::String(s) => f(path, s),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk_strings(x, &format!("{path}[{i}]"), f)?;
            }
            Ok(())
        }
        Value::Object(m) => {
            for (k, x) in m {
                walk_strings(x, &format!("{path}.{k}"), f)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What a template sees.
#[derive(Debug, Clone)]
pub struct RenderData {
    pub payload: String,
    pub name: String,
    pub namespace: String,
    pub uuid: String,
    pub created: Timestamp,
}

impl RenderData {
    fn to_value(&self) -> TValue {
        let short: String = self.uuid.chars().filter(|c| *c != '-').take(8).collect();
        let date = self.created.strftime("%Y%m%d").to_string();
        let mut m: BTreeMap<Arc<str>, TValue> = BTreeMap::new();
        for (k, v) in [
            ("Payload", self.payload.as_str()),
            ("Name", self.name.as_str()),
            ("Namespace", self.namespace.as_str()),
            ("UUID", self.uuid.as_str()),
            ("ShortUUID", short.as_str()),
            ("Date", date.as_str()),
        ] {
            m.insert(Arc::from(k), TValue::String(Arc::from(v)));
        }
        TValue::Map(Arc::new(m))
    }
}

/// The Sprig subset DESIGN §3 promises, on top of Go's builtins.
fn parse(src: &str) -> gotmpl::Result<Template> {
    let arg =
        |args: &[TValue], i: usize| -> String { args.get(i).map(to_text).unwrap_or_default() };
    Template::new("")
        .missing_key(MissingKey::Error)
        .func("quote", move |a| {
            Ok(TValue::String(Arc::from(format!("{:?}", arg(a, 0)))))
        })
        .func("upper", move |a| {
            Ok(TValue::String(Arc::from(arg(a, 0).to_uppercase())))
        })
        .func("lower", move |a| {
            Ok(TValue::String(Arc::from(arg(a, 0).to_lowercase())))
        })
        .func("trim", move |a| {
            Ok(TValue::String(Arc::from(arg(a, 0).trim())))
        })
        .func("b64enc", move |a| {
            Ok(TValue::String(Arc::from(base64(arg(a, 0).as_bytes()))))
        })
        .func("toJson", move |a| {
            let v = a.first().map(to_json).unwrap_or(Value::Null);
            Ok(TValue::String(Arc::from(v.to_string())))
        })
        // Sprig's `default DEFAULT VALUE` (pipelines put the value last).
        .func("default", move |a| {
            let fallback = a.first().cloned().unwrap_or(TValue::Nil);
            Ok(match a.get(1) {
                Some(v) if v.is_truthy() => v.clone(),
                _ => fallback,
            })
        })
        .parse(src)
}

fn to_text(v: &TValue) -> String {
    match v {
        TValue::String(s) => s.to_string(),
        TValue::Nil => String::new(),
        other => format!("{other}"),
    }
}

fn to_json(v: &TValue) -> Value {
    match v {
        TValue::Nil => Value::Null,
        TValue::Bool(b) => Value::Bool(*b),
        TValue::Int(i) => Value::from(*i),
        TValue::Uint(u) => Value::from(*u),
        TValue::Float(f) => Value::from(*f),
        TValue::String(s) => Value::String(s.to_string()),
        TValue::List(l) => Value::Array(l.iter().map(to_json).collect()),
        TValue::Map(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
        }
        other => Value::String(format!("{other}")),
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Renders every string of a job template; the first failure names its field path.
pub fn render(job_template: &Value, data: &RenderData) -> Result<Value, ValidationError> {
    let ctx = data.to_value();
    render_value(job_template, "spec.jobTemplate", &ctx)
}

fn render_value(v: &Value, path: &str, ctx: &TValue) -> Result<Value, ValidationError> {
    Ok(match v {
        // Plain strings need no template engine (and most strings are plain).
        Value::String(s) if !s.contains("{{") => v.clone(),
        Value::String(s) => {
            let out = parse(s)
                .and_then(|t| t.execute_to_string(ctx))
                .map_err(|e| ValidationError::new(format!("{path}: {e}")))?;
            Value::String(out)
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| render_value(x, &format!("{path}[{i}]"), ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), render_value(x, &format!("{path}.{k}"), ctx)?)))
                .collect::<Result<_, ValidationError>>()?,
        ),
        other => other.clone(),
    })
}

/// A UUID string (RFC 9562 version 7 layout: 48-bit ms timestamp first) from a ULID.
pub fn new_uuid() -> String {
    let mut n: u128 = ulid_u128();
    n = (n & !(0xF_u128 << 76)) | (0x7_u128 << 76); // version 7
    n = (n & !(0x3_u128 << 62)) | (0x2_u128 << 62); // RFC variant
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn ulid_u128() -> u128 {
    // 48-bit ms timestamp + 80 random bits: sortable by creation, like UUIDv7.
    ulid::Ulid::new().0
}

/// Phases of a JobExecution (dispatcher's conditions map onto them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobPhase {
    Waiting,
    Active,
    Completed,
    Failed,
    Cancelled,
    Invalid,
}

impl JobPhase {
    pub const ALL: [JobPhase; 6] = [
        JobPhase::Waiting,
        JobPhase::Active,
        JobPhase::Completed,
        JobPhase::Failed,
        JobPhase::Cancelled,
        JobPhase::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Waiting => "Waiting",
            JobPhase::Active => "Active",
            JobPhase::Completed => "Completed",
            JobPhase::Failed => "Failed",
            JobPhase::Cancelled => "Cancelled",
            JobPhase::Invalid => "Invalid",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobPhase::Waiting | JobPhase::Active)
    }

    pub fn parse(s: &str) -> Option<JobPhase> {
        JobPhase::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One execution of a job template (dispatcher's JobExecution, with what it lacked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecution {
    pub uuid: String,
    /// The template's name.
    pub name: String,
    pub namespace: String,
    pub phase: JobPhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub payload: String,
    /// The rendered `jobTemplate`.
    #[serde(default)]
    pub rendered: Value,
    /// The containers' images.
    #[serde(default)]
    pub images: Vec<String>,
    /// Where the embedded backend runs it (the template's `spec.runtime` when it started).
    #[serde(default = "JobRuntime::recorded_default")]
    pub runtime: JobRuntime,
    /// Pod attempts started (1 + retries).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub logs: Logs,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// When a finished execution is deleted (`ttlSecondsAfterFinished`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// The server that runs it while it is Waiting or Active, when several servers share one
    /// store (see [`crate::Run::replica`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The W3C trace it runs in (the caller's `traceparent`, else a new one); its
    /// containers get it as `TRACEPARENT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::Trace>,
}

impl JobExecution {
    /// `TRACEPARENT` for its containers, unless a container sets it itself.
    pub fn trace_env(&self) -> Option<(&'static str, String)> {
        self.trace
            .as_ref()
            .map(|t| ("TRACEPARENT", t.traceparent()))
    }

    /// dispatcher's status word: Waiting, Running, Succeeded, Failed.
    pub fn status(&self) -> &'static str {
        match self.phase {
            JobPhase::Waiting => "Waiting",
            JobPhase::Active => "Running",
            JobPhase::Completed => "Succeeded",
            JobPhase::Failed | JobPhase::Invalid => "Failed",
            JobPhase::Cancelled => "Cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> JobTemplateSpec {
        serde_json::from_value(json!({"jobTemplate": {"spec": {
            "template": {"spec": {"containers": [{
                "name": "my-container", "image": "alpine:latest",
                "command": ["sh", "-c", "echo \"$PAYLOAD\""],
                "env": [{"name": "PAYLOAD", "value": "{{ .Payload }}"}]
            }], "restartPolicy": "Never"}},
            "backoffLimit": 0
        }}}))
        .unwrap()
    }

    fn data(payload: &str) -> RenderData {
        RenderData {
            payload: payload.into(),
            name: "jobtemplate-sample".into(),
            namespace: "default".into(),
            uuid: "0193c1f2-8e4b-7a00-8000-123456789abc".into(),
            created: "2026-11-23T10:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn payload_renders_byte_for_byte_and_injects_nothing() {
        let s = sample();
        s.validate().unwrap();
        let nasty =
            "it's \"quoted\"\nnew line {{ .UUID }} }}: {\"a\": [1]}\n- key: value\n---\n$HOME `x`";
        let out = render(&s.job_template, &data(nasty)).unwrap();
        let c = &out["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["env"][0]["value"], nasty,
            "the payload is data, never template source"
        );
        assert_eq!(c["env"].as_array().unwrap().len(), 1);
        assert_eq!(out["spec"]["backoffLimit"], 0);
    }

    #[test]
    fn variables_and_helpers() {
        let t = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "command": [
            "{{ .Name }}/{{ .Namespace }}/{{ .ShortUUID }}/{{ .Date }}",
            "{{ .Payload | upper }}", "{{ .Payload | quote }}", "{{ .Payload | b64enc }}",
            "{{ .Payload | toJson }}", "{{ \"  x \" | trim }}", "{{ \"\" | default \"none\" }}",
            "{{ len .Payload }}"
        ]}]}}}});
        let out = render(&t, &data("hi \"you\"")).unwrap();
        let cmd: Vec<&str> = out["spec"]["template"]["spec"]["containers"][0]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            cmd,
            [
                "jobtemplate-sample/default/0193c1f2/20261123",
                "HI \"YOU\"",
                "\"hi \\\"you\\\"\"",
                "aGkgInlvdSI=",
                "\"hi \\\"you\\\"\"",
                "x",
                "none",
                "8",
            ]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let t = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "command": ["{{ .Nope }}"]}]}}}});
        let e = render(&t, &data("")).unwrap_err();
        assert!(
            e.message
                .starts_with("spec.jobTemplate.spec.template.spec.containers[0].command[0]:"),
            "{e}"
        );
        let bad: JobTemplateSpec = serde_json::from_value(json!({"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "c", "command": ["{{ .Payload"]}]}}}}})).unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .message
                .contains("containers[0].command[0]")
        );
        let none: JobTemplateSpec = serde_json::from_value(
            json!({"jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}}),
        )
        .unwrap();
        assert!(
            none.validate()
                .unwrap_err()
                .message
                .contains("at least one container")
        );
        let bad_name: JobTemplateSpec = serde_json::from_value(json!({"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "Bad_Name", "command": ["x"]}]}}}}})).unwrap();
        assert!(
            bad_name
                .validate()
                .unwrap_err()
                .message
                .contains("containers[0].name")
        );
    }

    #[test]
    fn uuids_are_v7_shaped_and_distinct() {
        let a = new_uuid();
        let b = new_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }
}
