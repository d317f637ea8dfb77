//! The resource model (DESIGN §3): every resource has the Kubernetes shape
//! `apiVersion/kind/metadata/spec/status`, in the store, on the wire and in manifests.
//!
//! [`Object`] keeps `spec` as JSON so that the store and the API treat every kind alike;
//! [`Object::validate`] parses it into the kind's typed spec (`deny_unknown_fields`, so a typo
//! is an error, not a silently ignored field) and checks it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ValidationError;
use crate::duration::parse_duration;
use crate::names::validate_name;

/// The apiVersion of every Dispatch resource.
pub const API_VERSION: &str = "dispatch.dev/v1";

/// Every kind of resource (DESIGN §3): what the API, the CLI, manifests and the Kubernetes
/// CRDs (one per kind) name. A new kind goes here, in [`Kind::ALL`] and in its spec type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    BaseImage,
    Image,
    Function,
    Endpoint,
    JobTemplate,
    Secret,
    Subscription,
    EventDriver,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::BaseImage,
        Kind::Image,
        Kind::Function,
        Kind::Endpoint,
        Kind::JobTemplate,
        Kind::Secret,
        Kind::Subscription,
        Kind::EventDriver,
    ];

    /// The plural lower-case form used in API paths (`/v1/namespaces/{ns}/functions`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::BaseImage => "baseimages",
            Kind::Image => "images",
            Kind::Function => "functions",
            Kind::Endpoint => "endpoints",
            Kind::JobTemplate => "jobtemplates",
            Kind::Secret => "secrets",
            Kind::Subscription => "subscriptions",
            Kind::EventDriver => "eventdrivers",
        }
    }

    /// The CLI spelling (`base-image`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Kind::BaseImage => "base-image",
            Kind::Image => "image",
            Kind::Function => "function",
            Kind::Endpoint => "endpoint",
            Kind::JobTemplate => "jobtemplate",
            Kind::Secret => "secret",
            Kind::Subscription => "subscription",
            Kind::EventDriver => "eventdriver",
        }
    }

    /// The spelling in messages (`base image`).
    pub fn human(self) -> &'static str {
        match self {
            Kind::BaseImage => "base image",
            Kind::Image => "image",
            Kind::Function => "function",
            Kind::Endpoint => "endpoint",
            Kind::JobTemplate => "job template",
            Kind::Secret => "secret",
            Kind::Subscription => "subscription",
            Kind::EventDriver => "event driver",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::BaseImage => "BaseImage",
            Kind::Image => "Image",
            Kind::Function => "Function",
            Kind::Endpoint => "Endpoint",
            Kind::JobTemplate => "JobTemplate",
            Kind::Secret => "Secret",
            Kind::Subscription => "Subscription",
            Kind::EventDriver => "EventDriver",
        }
    }

    /// Parses any spelling users write: `Function`, `function`, `functions`, `base-image`,
    /// `base-images`, `baseimage`, `baseimages`; `api`/`apis` (Dispatch's word) for endpoints.
    pub fn parse(s: &str) -> Option<Kind> {
        let norm: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        let singular = norm.strip_suffix('s').unwrap_or(&norm);
        // Dispatch called endpoints APIs.
        if singular == "api" {
            return Some(Kind::Endpoint);
        }
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().to_ascii_lowercase() == singular)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Dispatch's lifecycle states.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    Initialized,
    Creating,
    Ready,
    Error,
    Updating,
    Deleting,
    /// Broker event drivers: subscribed to their broker.
    Connected,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Initialized => "INITIALIZED",
            Phase::Creating => "CREATING",
            Phase::Ready => "READY",
            Phase::Error => "ERROR",
            Phase::Updating => "UPDATING",
            Phase::Deleting => "DELETING",
            Phase::Connected => "CONNECTED",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// What the controller last made of the resource (written by the server, not by users).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Why the phase is what it is: the build step under way, the error that ended a build
    /// in ERROR, or a note on a READY resource.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Content address (`sha256:…`) of the build or settings the phase is about: the same
    /// inputs give the same digest and reuse one build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The `metadata.generation` the controller last acted on: the status describes the
    /// current spec when the two are equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Functions on the Kubernetes backend: the pullable image they run
    /// (`registry/…@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Cron event drivers: when they fire next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    pub next_fire: Option<Timestamp>,
}

impl Status {
    pub fn phase(phase: Phase) -> Self {
        Status {
            phase: Some(phase),
            ..Status::default()
        }
    }
}

/// One resource of any kind, with its spec as JSON. What the store keeps and the API moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    pub api_version: String,
    pub kind: Kind,
    pub metadata: Metadata,
    #[serde(default = "empty_spec")]
    pub spec: serde_json::Value,
    #[serde(default)]
    pub status: Status,
}

fn empty_spec() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl Object {
    /// A new object of `kind` named `name` in `namespace` with `spec`.
    pub fn new(kind: Kind, namespace: &str, name: &str, spec: impl Serialize) -> Self {
        Object {
            api_version: API_VERSION.to_string(),
            kind,
            metadata: Metadata {
                name: name.to_string(),
                namespace: Some(namespace.to_string()),
                ..Metadata::default()
            },
            spec: serde_json::to_value(spec).unwrap_or_else(|_| empty_spec()),
            status: Status::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(crate::DEFAULT_NAMESPACE)
    }

    pub fn phase(&self) -> Option<Phase> {
        self.status.phase
    }

    /// The spec parsed as `T`; unknown fields and wrong types are a [`ValidationError`]
    /// that names the kind and the resource.
    pub fn typed_spec<T: DeserializeOwned>(&self) -> Result<T, ValidationError> {
        serde_json::from_value(self.spec.clone()).map_err(|e| {
            ValidationError::new(format!(
                "{} {:?} has an invalid spec: {e}",
                self.kind.human(),
                self.metadata.name
            ))
        })
    }

    /// Validates the name, apiVersion and spec, and writes the spec back in normal form
    /// (defaults filled, methods upper-cased, language inferred): what the API stores.
    pub fn validate(&mut self) -> Result<(), ValidationError> {
        let dispatcher = self.kind == Kind::JobTemplate
            && self.api_version == crate::manifest::DISPATCHER_API_VERSION;
        if self.api_version != API_VERSION && !dispatcher {
            return Err(ValidationError::new(format!(
                "apiVersion {:?} is not supported for kind {}: use {API_VERSION}",
                self.api_version, self.kind
            )));
        }
        validate_name(self.kind.human(), &self.metadata.name)?;
        if let Some(ns) = &self.metadata.namespace {
            validate_name("namespace", ns)?;
        }
        let spec = match self.kind {
            Kind::BaseImage => normal(self.typed_spec::<BaseImageSpec>()?.normalize(self)?),
            Kind::Image => normal(self.typed_spec::<ImageSpec>()?.normalize()?),
            Kind::Function => normal(self.typed_spec::<FunctionSpec>()?.normalize()?),
            Kind::Endpoint => normal(self.typed_spec::<EndpointSpec>()?.normalize()?),
            Kind::Secret => normal(self.typed_spec::<SecretSpec>()?.normalize()?),
            Kind::Subscription => normal(
                self.typed_spec::<crate::events::SubscriptionSpec>()?
                    .normalize()?,
            ),
            Kind::EventDriver => normal(
                self.typed_spec::<crate::events::EventDriverSpec>()?
                    .normalize()?,
            ),
            Kind::JobTemplate => {
                let spec: crate::jobs::JobTemplateSpec = self.typed_spec()?;
                spec.validate()?;
                // Kept verbatim: the Kubernetes backend creates Jobs from it as written.
                self.spec.clone()
            }
        };
        self.spec = spec;
        Ok(())
    }
}

fn normal(spec: impl Serialize) -> serde_json::Value {
    serde_json::to_value(spec).unwrap_or_else(|_| empty_spec())
}

/// The language a base image runs.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python3,
    Nodejs,
    Exec,
}

impl Language {
    pub fn parse(s: &str) -> Option<Language> {
        match s.to_ascii_lowercase().as_str() {
            "python3" | "python" => Some(Language::Python3),
            "nodejs" | "node" => Some(Language::Nodejs),
            "exec" => Some(Language::Exec),
            _ => None,
        }
    }

    /// Infers the language from an image reference that names it
    /// (`dispatchframework/python3-base:0.0.13` → python3, `node:20` → nodejs).
    pub fn infer_from_image(reference: &str) -> Option<Language> {
        let repo = reference.rsplit('/').next().unwrap_or(reference);
        let repo = repo
            .split([':', '@'])
            .next()
            .unwrap_or(repo)
            .to_ascii_lowercase();
        if repo.contains("python") {
            Some(Language::Python3)
        } else if repo.contains("node") {
            Some(Language::Nodejs)
        } else {
            None
        }
    }

    /// The interpreter run in embedded mode when the base image names none.
    pub fn default_interpreter(self) -> Option<&'static str> {
        match self {
            Language::Python3 => Some("python3"),
            Language::Nodejs => Some("node"),
            Language::Exec => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python3 => "python3",
            Language::Nodejs => "nodejs",
            Language::Exec => "exec",
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A language runtime that images build on: an OCI image reference (what the Kubernetes
/// backend runs) and its language; the embedded backend runs the host's interpreter.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BaseImageSpec {
    /// OCI reference (used as is by the Kubernetes backend).
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<Language>,
    /// Embedded mode: interpreter path or name on PATH (default `python3` / `node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
}

impl BaseImageSpec {
    fn normalize(mut self, obj: &Object) -> Result<Self, ValidationError> {
        if self.image.trim().is_empty() {
            return Err(ValidationError::new(format!(
                "base image {:?} needs spec.image, an image reference such as python:3.11-slim",
                obj.metadata.name
            )));
        }
        if self.language.is_none() {
            self.language = Language::infer_from_image(&self.image);
        }
        if self.language.is_none() {
            return Err(ValidationError::new(format!(
                "cannot tell the language of base image {:?} from {:?}: set the language \
                 (--language python3|nodejs|exec, or spec.language)",
                obj.metadata.name, self.image
            )));
        }
        if self.language == Some(Language::Exec) && self.interpreter.is_some() {
            return Err(ValidationError::new(format!(
                "base image {:?}: exec base images run the handler itself (an executable), so \
                 spec.interpreter is not used: remove it, or use python3 / nodejs",
                obj.metadata.name
            )));
        }
        Ok(self)
    }

    /// The language; set by normalization, so always present on a stored base image.
    pub fn lang(&self) -> Language {
        self.language.unwrap_or(Language::Exec)
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeDependencies {
    /// Text of requirements.txt (Python) or package.json (Node).
    #[serde(default)]
    pub manifest: String,
    /// Package index: pip's `--index-url` / npm's `--registry` (default: the server's
    /// environment, e.g. `PIP_INDEX_URL`, `npm_config_registry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_url: Option<String>,
}

impl RuntimeDependencies {
    /// The manifest in normal form for `language`, `None` when it declares nothing: what the
    /// image digest covers, so that comments, blank lines, whitespace and JSON key order do
    /// not cause a rebuild. requirements.txt: trimmed lines without comments; package.json:
    /// re-encoded with sorted keys.
    pub fn normalized(&self, language: Language) -> Result<Option<String>, ValidationError> {
        let text = self.manifest.trim();
        if text.is_empty() {
            return Ok(None);
        }
        match language {
            Language::Python3 => {
                if text.starts_with('{') {
                    return Err(ValidationError::new(
                        "python3 images take a requirements.txt (one requirement per line), not a package.json",
                    ));
                }
                let lines: Vec<&str> = text
                    .lines()
                    .map(|l| match l.find(" #") {
                        Some(i) => l[..i].trim(),
                        None => l.trim(),
                    })
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect();
                Ok((!lines.is_empty()).then(|| lines.join("\n") + "\n"))
            }
            Language::Nodejs => {
                let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    ValidationError::new(format!(
                        "nodejs images take a package.json; this one is not valid JSON: {e}"
                    ))
                })?;
                if !v.is_object() {
                    return Err(ValidationError::new("package.json must be a JSON object"));
                }
                Ok(Some(v.to_string()))
            }
            Language::Exec => Err(ValidationError::new(
                "exec images have no runtime dependencies to install: package what the executable needs with it",
            )),
        }
    }
}

/// An image: a base image plus language dependencies, built once per digest (the SHA-256
/// of the base image and the normalized manifest).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// The base image (same namespace, or a built-in one: python3, nodejs) it builds on.
    pub base_image: String,
    /// Language dependencies installed into the image: a requirements.txt (python3) or
    /// package.json (nodejs) manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_dependencies: Option<RuntimeDependencies>,
    /// System packages: refused by both backends for now (install them in the base image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system_dependencies: Vec<serde_json::Value>,
    /// Python: modules the image's zygote imports once, before it forks workers, so that a
    /// cold start does not import them again. Unset: every top-level module the image's
    /// dependencies installed; `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload: Option<Vec<String>>,
}

impl ImageSpec {
    fn normalize(self) -> Result<Self, ValidationError> {
        validate_name("base image", &self.base_image)?;
        if let Some(list) = &self.preload {
            for (i, m) in list.iter().enumerate() {
                let ok = !m.is_empty()
                    && m.split('.').all(|part| {
                        let mut c = part.chars();
                        c.next()
                            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                    });
                if !ok {
                    return Err(ValidationError::new(format!(
                        "spec.preload[{i}]: {m:?} is not a Python module name (like numpy or os.path)"
                    )));
                }
            }
        }
        Ok(self)
    }
}

/// Worker scaling of a function (DESIGN §5).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Concurrency {
    /// Most worker processes of the function at once (default 4, at most 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    /// Workers kept warm when idle (default 0: scale to zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_workers: Option<u32>,
    /// How long a worker beyond `minWorkers` stays idle before it is stopped (a duration
    /// such as 5m, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// Defaults: a function call may take 30 s (Dispatch's default), up to 4 warm workers per
/// function (2 cores here; raise it per function), none kept warm, idle workers reaped after 5 min.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_WORKERS: u32 = 4;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Upper bound on `maxWorkers`, so that one spec cannot fork-bomb the host.
pub const MAX_WORKERS_LIMIT: u32 = 256;

/// A function: a handler in an uploaded source archive, run on an image, called
/// synchronously, asynchronously (durable runs), from endpoints and from events.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FunctionSpec {
    /// The image (same namespace, or a built-in base image: python3, nodejs) it runs on.
    pub image: String,
    /// `module.function` (Python), `file.export` or `file` (Node), a path (exec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Digest of the uploaded source archive (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Most time one call may take (a duration such as 30s, the default); past it the call
    /// ends with a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Environment variables of its workers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub concurrency: Concurrency,
    /// Retries of async runs (DESIGN §6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Where the final record of every async run is POSTed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Secrets (names, same namespace) merged into `context.secrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Limits of each worker process (its memory, processes, CPU, `/tmp`, answer size).
    #[serde(default, skip_serializing_if = "is_default")]
    pub resources: Resources,
    /// `none`: the function runs without any network (an empty network namespace; on
    /// Kubernetes a NetworkPolicy that denies all traffic). Absent: network allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    /// Async runs of this function accepted and not final at most; past it an async call
    /// gets 429 (absent: the server's `--max-queued-per-function`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
    /// What a synchronous call leaves in the run history (`all` when absent). Async, event,
    /// cron and job runs are always recorded: they are the durable record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<History>,
    /// `history: sample`: the share of successful sync calls recorded, 0 < rate ≤ 1
    /// (default 0.01); failed calls are always recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_sample_rate: Option<f64>,
}

/// `spec.history` of a function: which synchronous calls are recorded as runs. Counts,
/// latency and cold starts reach `/metrics` whatever it says.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum History {
    /// Every call (until retention prunes it).
    #[default]
    All,
    /// Calls that failed (any error), none that succeeded.
    Errors,
    /// Failed calls, and `historySampleRate` of the successful ones.
    Sample,
    /// No sync call at all.
    None,
}

/// `historySampleRate` when `history: sample` does not say.
pub const DEFAULT_HISTORY_SAMPLE_RATE: f64 = 0.01;

/// A function's `history` and `historySampleRate`, resolved (what a deployment keeps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryPolicy {
    pub history: History,
    pub sample_rate: f64,
}

impl Default for HistoryPolicy {
    fn default() -> Self {
        HistoryPolicy {
            history: History::All,
            sample_rate: DEFAULT_HISTORY_SAMPLE_RATE,
        }
    }
}

impl HistoryPolicy {
    /// Whether a sync run ending `failed` (an error of any kind) with run id `id` (a ULID,
    /// whose random part decides a sample) is recorded.
    pub fn records(&self, failed: bool, id: &str) -> bool {
        match self.history {
            History::All => true,
            History::None => false,
            History::Errors => failed,
            History::Sample => {
                failed || {
                    // Ids made in the same millisecond differ by one (a monotonic ULID
                    // generator): mixed (splitmix64) so that a burst is sampled evenly.
                    let v = ulid::Ulid::from_string(id)
                        .map(u128::from)
                        .unwrap_or_default();
                    let mut x = (v as u64) ^ ((v >> 64) as u64);
                    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    x ^= x >> 31;
                    ((x >> 11) as f64 / (1u64 << 53) as f64) < self.sample_rate
                }
            }
        }
    }
}

impl FunctionSpec {
    pub fn history_policy(&self) -> HistoryPolicy {
        HistoryPolicy {
            history: self.history.unwrap_or_default(),
            sample_rate: self
                .history_sample_rate
                .unwrap_or(DEFAULT_HISTORY_SAMPLE_RATE),
        }
    }
}

/// Upper bound on `spec.maxQueued` (the namespace's own bound applies on top).
pub const MAX_QUEUED_LIMIT: u32 = 1_000_000;

/// Network access of a function.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Network allowed (the default).
    Default,
    /// No network at all.
    None,
}

/// Limits of each worker of a function (DESIGN §9), in Kubernetes quantities.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Memory of one worker, e.g. `256Mi` (the default); over it the worker is killed and
    /// the call answers a SystemError that says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU of one worker, e.g. `500m` or `1`; default: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Processes and threads of one worker (default 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// Size of the worker's private `/tmp`, e.g. `64Mi` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp: Option<String>,
    /// Largest answer (payload and logs) a call may return, e.g. `16Mi` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<String>,
}

pub const DEFAULT_MEMORY: u64 = 256 << 20;
pub const DEFAULT_PIDS: u32 = 128;
pub const DEFAULT_TMP: u64 = 64 << 20;
pub const DEFAULT_MAX_OUTPUT: u64 = 16 << 20;

/// Resources in numbers, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory: u64,
    pub cpu_millis: Option<u64>,
    pub pids: u32,
    pub tmp: u64,
    pub max_output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: DEFAULT_MEMORY,
            cpu_millis: None,
            pids: DEFAULT_PIDS,
            tmp: DEFAULT_TMP,
            max_output_bytes: DEFAULT_MAX_OUTPUT,
        }
    }
}

impl Resources {
    /// The limits these resources ask for, or what is wrong with them.
    pub fn limits(&self) -> Result<Limits, ValidationError> {
        let bytes = |field: &str, v: &Option<String>, default: u64, min: u64| {
            let n = match v {
                None => return Ok(default),
                Some(s) => crate::quantity::parse_bytes(s)
                    .map_err(|e| ValidationError::new(format!("spec.resources.{field}: {e}")))?,
            };
            if n < min {
                return Err(ValidationError::new(format!(
                    "spec.resources.{field} must be at least {min} bytes, got {n}"
                )));
            }
            Ok(n)
        };
        let cpu_millis = match &self.cpu {
            None => None,
            Some(s) => Some(
                crate::quantity::parse_cpu_millis(s)
                    .map_err(|e| ValidationError::new(format!("spec.resources.cpu: {e}")))?,
            ),
        };
        if cpu_millis == Some(0) {
            return Err(ValidationError::new("spec.resources.cpu must be above 0"));
        }
        let pids = self.pids.unwrap_or(DEFAULT_PIDS);
        if !(4..=65536).contains(&pids) {
            return Err(ValidationError::new(format!(
                "spec.resources.pids must be between 4 and 65536, got {pids}"
            )));
        }
        Ok(Limits {
            memory: bytes("memory", &self.memory, DEFAULT_MEMORY, 16 << 20)?,
            cpu_millis,
            pids,
            tmp: bytes("tmp", &self.tmp, DEFAULT_TMP, 1 << 20)?,
            max_output_bytes: bytes(
                "maxOutputBytes",
                &self.max_output_bytes,
                DEFAULT_MAX_OUTPUT,
                1024,
            )?,
        })
    }
}

/// A secret as written by users: string values. The server stores it sealed
/// ([`SealedSecret`]) and shows only the keys unless asked to reveal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

impl SecretSpec {
    fn normalize(self) -> Result<Self, ValidationError> {
        if self.data.is_empty() {
            return Err(ValidationError::new(
                "a secret needs at least one key in spec.data",
            ));
        }
        for k in self.data.keys() {
            let ok = !k.is_empty()
                && k.len() <= 253
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(ValidationError::new(format!(
                    "secret key {k:?} is not valid: use letters, digits, '-', '_' and '.'"
                )));
            }
        }
        Ok(self)
    }
}

/// How a secret is stored: its keys in clear, its data as AEAD ciphertext.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedSecret {
    /// The secret's keys (its values are only in `sealed`).
    pub keys: Vec<String>,
    /// base64 of nonce (12 bytes) + ciphertext of the JSON `data`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealed: String,
}

/// Backoff between attempts: `initial` doubles per attempt up to `max`, with jitter.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// The wait before the second attempt (a duration; default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<String>,
    /// The longest wait between attempts (a duration; default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

/// How an async run is retried after a FunctionError, SystemError or timeout (never after
/// an InputError: the same input fails the same way).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// A run older than this is not started again (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A retry policy with every default applied and every duration parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
    pub max_age: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial: DEFAULT_BACKOFF_INITIAL,
            max: DEFAULT_BACKOFF_MAX,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

impl Retry {
    /// The delay before attempt `next` (2, 3, …): `initial · 2^(next-2)` capped at `max`,
    /// then "equal jitter" (half fixed, half drawn from `jitter` in [0, 1)) so that runs that
    /// failed together do not all come back at the same instant.
    pub fn delay(&self, next: u32, jitter: f64) -> Duration {
        let exp = next.saturating_sub(2).min(30);
        let base = self.initial.saturating_mul(1u32 << exp).min(self.max);
        let half = base / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

impl RetryPolicy {
    pub fn resolve(&self) -> Result<Retry, ValidationError> {
        let d = Retry::default();
        let dur = |what: &str, v: &Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => {
                parse_duration(s).map_err(|e| ValidationError::new(format!("retry.{what}: {e}")))
            }
        };
        let backoff = self.backoff.clone().unwrap_or_default();
        let r = Retry {
            max_attempts: self.max_attempts.unwrap_or(d.max_attempts),
            initial: dur("backoff.initial", &backoff.initial, d.initial)?,
            max: dur("backoff.max", &backoff.max, d.max)?,
            max_age: dur("maxAge", &self.max_age, d.max_age)?,
        };
        if r.max_attempts == 0 || r.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(ValidationError::new(format!(
                "retry.maxAttempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}",
                r.max_attempts
            )));
        }
        if r.max < r.initial {
            return Err(ValidationError::new(
                "retry.backoff.max is shorter than retry.backoff.initial",
            ));
        }
        Ok(r)
    }
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

impl FunctionSpec {
    fn normalize(self) -> Result<Self, ValidationError> {
        validate_name("image", &self.image)?;
        match &self.source {
            None => {
                return Err(ValidationError::new(
                    "function has no source: upload it first (dispatch create function NAME PATH does)",
                ));
            }
            Some(s) if !crate::digest::is_sha256(s) => {
                return Err(ValidationError::new(format!(
                    "spec.source {s:?} is not a source digest (sha256:<64 hex digits>)"
                )));
            }
            Some(_) => {}
        }
        if let Some(h) = &self.handler
            && (h.trim().is_empty() || h.contains('\0'))
        {
            return Err(ValidationError::new("spec.handler is empty"));
        }
        self.timeout()?;
        self.idle_timeout()?;
        self.retry()?;
        self.resources.limits()?;
        if let Some(url) = &self.callback_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ValidationError::new(format!(
                "callbackUrl {url:?} must be an http:// or https:// URL"
            )));
        }
        if let Some(r) = self.history_sample_rate {
            if self.history != Some(History::Sample) {
                return Err(ValidationError::new(
                    "spec.historySampleRate is for history: sample (set both, or neither)",
                ));
            }
            if !(r > 0.0 && r <= 1.0) {
                return Err(ValidationError::new(format!(
                    "spec.historySampleRate must be above 0 and at most 1 (0.01 keeps one call \
                     in a hundred), got {r}"
                )));
            }
        }
        if let Some(q) = self.max_queued
            && (q == 0 || q > MAX_QUEUED_LIMIT)
        {
            return Err(ValidationError::new(format!(
                "spec.maxQueued must be between 1 and {MAX_QUEUED_LIMIT}, got {q}"
            )));
        }
        let (min, max) = (self.min_workers(), self.max_workers());
        if max == 0 || max > MAX_WORKERS_LIMIT {
            return Err(ValidationError::new(format!(
                "concurrency.maxWorkers must be between 1 and {MAX_WORKERS_LIMIT}, got {max}"
            )));
        }
        if min > max {
            return Err(ValidationError::new(format!(
                "concurrency.minWorkers ({min}) is larger than maxWorkers ({max})"
            )));
        }
        for name in &self.secrets {
            validate_name("secret", name)?;
        }
        for key in self.env.keys() {
            let ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(ValidationError::new(format!(
                    "environment variable name {key:?} is not valid: use letters, digits and '_', not starting with a digit"
                )));
            }
        }
        Ok(self)
    }

    pub fn timeout(&self) -> Result<Duration, ValidationError> {
        let t = match &self.timeout {
            None => DEFAULT_TIMEOUT,
            Some(s) => {
                parse_duration(s).map_err(|e| ValidationError::new(format!("spec.timeout: {e}")))?
            }
        };
        if t.is_zero() {
            return Err(ValidationError::new("spec.timeout must be longer than 0s"));
        }
        Ok(t)
    }

    /// The retry policy with defaults (3 attempts, 1s doubling to 5m, 24h max age).
    pub fn retry(&self) -> Result<Retry, ValidationError> {
        match &self.retry {
            None => Ok(Retry::default()),
            Some(r) => r.resolve(),
        }
    }

    pub fn idle_timeout(&self) -> Result<Duration, ValidationError> {
        match &self.concurrency.idle_timeout {
            None => Ok(DEFAULT_IDLE_TIMEOUT),
            Some(s) => parse_duration(s)
                .map_err(|e| ValidationError::new(format!("concurrency.idleTimeout: {e}"))),
        }
    }

    pub fn max_workers(&self) -> u32 {
        self.concurrency.max_workers.unwrap_or(DEFAULT_MAX_WORKERS)
    }

    pub fn min_workers(&self) -> u32 {
        self.concurrency.min_workers.unwrap_or(0)
    }
}

/// HTTP methods an endpoint may route.
pub const HTTP_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// An HTTP route on the gateway to a function: the request becomes the payload (query
/// parameters, a JSON or form body) and the answer the response.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    /// The function (same namespace) it calls.
    pub function: String,
    /// HTTP methods it routes (GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS; default GET).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths it routes, at least one: `/hello`, `{name}` segments as parameters, a trailing
    /// `/*` for a prefix.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Host names it routes (absent: any host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Answer CORS preflights and allow any origin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cors: bool,
    /// `public` (default) or `token`: callers need an API token with the developer role in
    /// the endpoint's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

impl EndpointSpec {
    /// Whether callers need a token.
    pub fn needs_token(&self) -> bool {
        self.auth.as_deref() == Some("token")
    }

    fn normalize(mut self) -> Result<Self, ValidationError> {
        validate_name("function", &self.function)?;
        if self.methods.is_empty() {
            self.methods.push("GET".to_string());
        }
        for m in &mut self.methods {
            *m = m.to_ascii_uppercase();
            if !HTTP_METHODS.contains(&m.as_str()) {
                return Err(ValidationError::new(format!(
                    "method {m:?} is not supported: use one of {}",
                    HTTP_METHODS.join(", ")
                )));
            }
        }
        self.methods.sort();
        self.methods.dedup();
        if self.paths.is_empty() {
            return Err(ValidationError::new(
                "endpoint needs at least one path (--path /hello)",
            ));
        }
        if let Some(a) = &self.auth
            && a != "public"
            && a != "token"
        {
            return Err(ValidationError::new(format!(
                "auth {a:?} is not valid: use public or token"
            )));
        }
        for p in &self.paths {
            validate_path(p)?;
        }
        for h in &mut self.hosts {
            *h = h.to_ascii_lowercase();
            if h.is_empty() || h.contains(['/', ' ']) {
                return Err(ValidationError::new(format!(
                    "host {h:?} is not a host name"
                )));
            }
        }
        Ok(self)
    }
}

/// A route path: starts with `/`; segments are literals or `{param}`; a final `*` segment
/// matches any rest (`/api/*`).
fn validate_path(p: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| {
        ValidationError::new(format!(
            "path {p:?} is not valid: {why} (examples: /hello, /users/{{id}}, /api/*)"
        ))
    };
    if !p.starts_with('/') {
        return Err(bad("it must start with '/'"));
    }
    let segs: Vec<&str> = p[1..].split('/').collect();
    for (i, s) in segs.iter().enumerate() {
        if *s == "*" {
            if i + 1 != segs.len() {
                return Err(bad("'*' may only be the last segment"));
            }
        } else if s.starts_with('{') || s.ends_with('}') {
            let name = s.trim_start_matches('{').trim_end_matches('}');
            if !(s.starts_with('{') && s.ends_with('}'))
                || name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(bad("a parameter segment looks like {name}"));
            }
        } else if s.contains(['{', '}', '*', '?', '#', ' ']) {
            return Err(bad(
                "segments may not contain '{', '}', '*', '?', '#' or spaces",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_policies_keep_what_they_say() {
        let spec = |v: serde_json::Value| -> FunctionSpec {
            let mut base =
                serde_json::json!({"image": "py", "source": format!("sha256:{}", "0".repeat(64))});
            base.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
            serde_json::from_value(base).unwrap()
        };
        let ids: Vec<String> = (0..20_000).map(|_| crate::run::new_run_id()).collect();
        let kept = |s: &FunctionSpec, failed: bool| {
            let p = s.history_policy();
            ids.iter().filter(|id| p.records(failed, id)).count()
        };
        let all = spec(serde_json::json!({}));
        assert_eq!((kept(&all, false), kept(&all, true)), (20_000, 20_000));
        let errors = spec(serde_json::json!({"history": "errors"}));
        assert_eq!((kept(&errors, false), kept(&errors, true)), (0, 20_000));
        let none = spec(serde_json::json!({"history": "none"}));
        assert_eq!((kept(&none, false), kept(&none, true)), (0, 0));
        let tenth = spec(serde_json::json!({"history": "sample", "historySampleRate": 0.1}));
        let n = kept(&tenth, false);
        assert!((1_600..2_400).contains(&n), "about a tenth of 20000: {n}");
        assert_eq!(kept(&tenth, true), 20_000, "failures are always kept");
        let default_rate = spec(serde_json::json!({"history": "sample"}));
        assert!(kept(&default_rate, false) < 400);
        // The same id decides the same way every time (a retry of a read sees the same).
        let p = tenth.history_policy();
        assert!(
            ids.iter()
                .all(|id| p.records(false, id) == p.records(false, id))
        );
        // Bad specs say what is wrong.
        for (bad, says) in [
            (
                serde_json::json!({"historySampleRate": 0.5}),
                "history: sample",
            ),
            (
                serde_json::json!({"history": "sample", "historySampleRate": 0}),
                "above 0",
            ),
            (
                serde_json::json!({"history": "sample", "historySampleRate": 2}),
                "at most 1",
            ),
        ] {
            let e = spec(bad).normalize().unwrap_err();
            assert!(e.message.contains(says), "{}", e.message);
        }
        assert!(
            serde_json::from_value::<FunctionSpec>(
                serde_json::json!({"image": "py", "history": "some"})
            )
            .is_err()
        );
    }

    #[test]
    fn retry_delays_double_cap_and_jitter() {
        let r = Retry {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
            max_age: DEFAULT_MAX_AGE,
        };
        assert_eq!(r.delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(r.delay(2, 0.999), Duration::from_micros(999_500));
        assert_eq!(r.delay(3, 0.0), Duration::from_secs(1));
        assert_eq!(
            r.delay(5, 0.0),
            Duration::from_secs(2),
            "capped at max, then halved"
        );
        assert_eq!(r.delay(60, 1.0), Duration::from_secs(4));
        let bad = RetryPolicy {
            max_attempts: Some(0),
            ..Default::default()
        };
        assert!(bad.resolve().unwrap_err().message.contains("maxAttempts"));
        let inverted = RetryPolicy {
            backoff: Some(Backoff {
                initial: Some("10s".into()),
                max: Some("1s".into()),
            }),
            ..Default::default()
        };
        assert!(inverted.resolve().is_err());
    }

    #[test]
    fn dependency_manifests_normalize() {
        let deps = |m: &str| RuntimeDependencies {
            manifest: m.into(),
            index_url: None,
        };
        let a = deps("# deps\nsix==1.16.0  # small\n\n  requests>=2\n")
            .normalized(Language::Python3)
            .unwrap();
        assert_eq!(a.as_deref(), Some("six==1.16.0\nrequests>=2\n"));
        assert_eq!(
            deps(" \n# only comments\n")
                .normalized(Language::Python3)
                .unwrap(),
            None
        );
        let j1 = deps(r#"{"name":"x","dependencies":{"is-number":"7.0.0"}}"#)
            .normalized(Language::Nodejs)
            .unwrap();
        let j2 = deps("{\n  \"dependencies\": {\"is-number\": \"7.0.0\"},\n  \"name\": \"x\"\n}")
            .normalized(Language::Nodejs)
            .unwrap();
        assert_eq!(j1, j2);
        assert!(
            deps("six")
                .normalized(Language::Nodejs)
                .unwrap_err()
                .message
                .contains("package.json")
        );
        assert!(
            deps("{}")
                .normalized(Language::Python3)
                .unwrap_err()
                .message
                .contains("requirements.txt")
        );
        assert!(deps("six").normalized(Language::Exec).is_err());
    }
    use serde_json::json;

    #[test]
    fn kinds_parse_from_every_spelling() {
        for s in ["base-image", "base-images", "BaseImage", "baseimages"] {
            assert_eq!(Kind::parse(s), Some(Kind::BaseImage), "{s}");
        }
        assert_eq!(Kind::parse("functions"), Some(Kind::Function));
        assert_eq!(Kind::parse("Endpoint"), Some(Kind::Endpoint));
        assert_eq!(Kind::parse("gadget"), None);
        assert_eq!(Kind::parse("apis"), Some(Kind::Endpoint), "Dispatch's word");
    }

    #[test]
    fn base_image_language_is_inferred_or_required() {
        let mut o = Object::new(
            Kind::BaseImage,
            "default",
            "py",
            json!({"image": "dispatchframework/python3-base:0.0.13-knative"}),
        );
        o.validate().unwrap();
        assert_eq!(o.spec["language"], "python3");
        let mut o = Object::new(
            Kind::BaseImage,
            "default",
            "x",
            json!({"image": "alpine:3"}),
        );
        let err = o.validate().unwrap_err();
        assert!(err.message.contains("--language"), "{err}");
    }

    #[test]
    fn unknown_spec_fields_are_rejected_with_the_resource_name() {
        let mut o = Object::new(
            Kind::Function,
            "default",
            "hello",
            json!({"image": "python3", "source": crate::digest::sha256(b"x"), "retyr": 1}),
        );
        let err = o.validate().unwrap_err();
        assert!(err.message.contains("function \"hello\""), "{err}");
        assert!(err.message.contains("retyr"), "{err}");
    }

    #[test]
    fn function_limits_are_checked() {
        let src = crate::digest::sha256(b"x");
        let mut o = Object::new(
            Kind::Function,
            "default",
            "f",
            json!({"image": "python3", "source": src, "concurrency": {"minWorkers": 5, "maxWorkers": 2}}),
        );
        assert!(o.validate().unwrap_err().message.contains("minWorkers"));
        let mut o = Object::new(
            Kind::Function,
            "default",
            "f",
            json!({"image": "python3", "source": src, "timeout": "soon"}),
        );
        assert!(o.validate().unwrap_err().message.contains("spec.timeout"));
        let mut o = Object::new(
            Kind::Function,
            "default",
            "f",
            json!({"image": "python3", "source": src, "env": {"1BAD": "x"}}),
        );
        assert!(o.validate().unwrap_err().message.contains("1BAD"));
    }

    #[test]
    fn endpoints_normalize_methods_and_check_paths() {
        let mut o = Object::new(
            Kind::Endpoint,
            "default",
            "e",
            json!({"function": "hello", "methods": ["post", "get"], "paths": ["/hello", "/u/{id}", "/api/*"]}),
        );
        o.validate().unwrap();
        assert_eq!(o.spec["methods"], json!(["GET", "POST"]));
        for bad in ["hello", "/a/*/b", "/u/{}", "/u/{id"] {
            let mut o = Object::new(
                Kind::Endpoint,
                "default",
                "e",
                json!({"function": "hello", "paths": [bad]}),
            );
            assert!(o.validate().is_err(), "{bad}");
        }
        let mut o = Object::new(
            Kind::Endpoint,
            "default",
            "e",
            json!({"function": "hello", "methods": ["FETCH"], "paths": ["/x"]}),
        );
        assert!(o.validate().unwrap_err().message.contains("FETCH"));
    }

    #[test]
    fn objects_round_trip_in_kubernetes_shape() {
        let o = Object::new(
            Kind::Image,
            "default",
            "python3",
            json!({"baseImage": "python3"}),
        );
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["kind"], "Image");
        assert_eq!(v["metadata"]["name"], "python3");
        let back: Object = serde_json::from_value(v).unwrap();
        assert_eq!(back, o);
    }
}
