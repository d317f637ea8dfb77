//! A function's spec: its image, source and handler, concurrency, resources and limits,
//! network, retries of async runs, history policy.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::duration::parse_duration;
use crate::names::validate_name;

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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// A streaming call (chunks, WebSocket replies) fails with a timeout when its handler
    /// sends nothing for this long between two chunks (a duration; absent: only `timeout`
    /// bounds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// exec handlers: what the program writes to stdout is streamed as it comes (chunks)
    /// instead of being its answer once it exits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
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
    /// Versions kept besides those an alias or an endpoint names (default 10, at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_versions: Option<u32>,
    /// What a synchronous call leaves in the run history (`all` when absent). Async, event,
    /// cron and job runs are always recorded: they are the durable record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<History>,
    /// `history: sample`: the share of successful sync calls recorded, 0 < rate ≤ 1
    /// (default 0.01); failed calls are always recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_sample_rate: Option<f64>,
    /// `container`: its workers run inside its base image (pulled from the image's registry)
    /// with an OCI runtime, started by `dispatch runner` as on Kubernetes; absent or
    /// `sandbox`: the server's isolation (a sandbox around a local interpreter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<FunctionIsolation>,
}

/// `spec.isolation` of a function.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionIsolation {
    /// The server's isolation for local workers.
    #[default]
    Sandbox,
    /// The function's base image, run with an OCI runtime (the container tier).
    Container,
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
    /// `spec.keepVersions`, or the default.
    pub fn keep_versions(&self) -> usize {
        self.keep_versions
            .map_or(crate::versions::KEEP_VERSIONS, |k| k as usize)
    }

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
    pub(super) fn normalize(self) -> Result<Self, ValidationError> {
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
        self.stream_idle_timeout()?;
        self.retry()?;
        if let Some(k) = self.keep_versions
            && !(1..=crate::versions::MAX_KEEP_VERSIONS).contains(&k)
        {
            return Err(ValidationError::new(format!(
                "keepVersions {k} is not between 1 and {}",
                crate::versions::MAX_KEEP_VERSIONS
            )));
        }
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

    /// The longest silence between a stream's chunks (`spec.idleTimeout`), if bounded.
    pub fn stream_idle_timeout(&self) -> Result<Option<Duration>, ValidationError> {
        let Some(s) = &self.idle_timeout else {
            return Ok(None);
        };
        let d = parse_duration(s)
            .map_err(|e| ValidationError::new(format!("spec.idleTimeout: {}", e.message)))?;
        if d.is_zero() {
            return Err(ValidationError::new(
                "spec.idleTimeout must be longer than 0s",
            ));
        }
        Ok(Some(d))
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
