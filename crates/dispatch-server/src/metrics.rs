//! Process metrics in the Prometheus text format (`GET /metrics` on the API, viewer token):
//! cold starts as histograms, split by how the worker started and by step, finished runs by
//! status, and per function its calls by status, errors by type, cold starts and a duration
//! histogram. Atomic counters only: recording is a few relaxed adds on the run path (a
//! function's counters hang off its deployment: no look-up per call).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dispatch_core::jobs::JobPhase;
use dispatch_core::{ColdStart, ErrorType, RunStatus, StartMethod};

use crate::serve::{Edge, EdgeCounters};
use crate::stats::{FunctionHour, LastHour, NamespaceHour};

const EDGES: [Edge; 2] = [Edge::Api, Edge::Gateway];

/// One counter of a listener's [`EdgeCounters`].
type EdgeField = fn(&EdgeCounters) -> &AtomicU64;

/// Upper bounds of the cold starts' buckets, in seconds (the last is +Inf).
const BUCKETS: [f64; 15] = [
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    f64::INFINITY,
];

/// Upper bounds of calls' durations, in seconds: from a warm call's 100 µs to a long job's
/// minutes (the last is +Inf).
const DURATION_BUCKETS: [f64; 18] = [
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
    60.0,
    300.0,
    f64::INFINITY,
];

struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    /// Observations at or below each bound (not cumulative; summed when rendered).
    counts: [AtomicU64; N],
    /// Sum of observations in nanoseconds.
    sum_ns: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// The bucket `seconds` falls in.
    fn bucket(&self, seconds: f64) -> usize {
        self.bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(N - 1)
    }

    fn observe(&self, seconds: f64) {
        self.observe_in(self.bucket(seconds), seconds);
    }

    fn observe_in(&self, i: usize, seconds: f64) {
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let le = if b.is_infinite() {
                "+Inf".to_string()
            } else {
                b.to_string()
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

const METHODS: [StartMethod; 3] = [
    StartMethod::Spawn,
    StartMethod::Fork,
    StartMethod::Specialize,
];
const STEPS: [&str; 4] = ["total", "spawn", "import", "first_call"];
const STATUSES: [RunStatus; 3] = [RunStatus::Succeeded, RunStatus::Failed, RunStatus::Dead];
/// What one call (an attempt) of a function ends as.
const CALL_STATUSES: [RunStatus; 4] = [
    RunStatus::Succeeded,
    RunStatus::Failed,
    RunStatus::Timeout,
    RunStatus::Cancelled,
];
const ERROR_TYPES: [ErrorType; 3] = [
    ErrorType::InputError,
    ErrorType::FunctionError,
    ErrorType::SystemError,
];

/// A metric family's HELP and TYPE lines.
pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One metric family: its HELP and TYPE lines, then `each` row's samples.
pub(crate) fn family<T>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    rows: &[T],
    mut each: impl FnMut(&mut String, &T),
) {
    header(out, name, kind, help);
    for r in rows {
        each(out, r);
    }
}

/// One counter family of labelled rows: `name{labels,key="k"} v` for each `(k, v)` a row's
/// `values` gives.
fn counters_by<T, K: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    key: &str,
    rows: &[(String, T)],
    values: impl Fn(&T) -> Vec<(K, u64)>,
) {
    family(out, name, "counter", help, rows, |out, (labels, row)| {
        for (k, v) in values(row) {
            let _ = writeln!(out, "{name}{{{labels},{key}=\"{k}\"}} {v}");
        }
    });
}

/// What a build made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// An image: its base and dependencies.
    Image,
    /// A function's deploy of a new build: unpacking, installing, its first workers.
    Function,
}

const BUILDS: [(Build, &str); 2] = [(Build::Image, "image"), (Build::Function, "function")];

impl Build {
    /// Its name in labels and spans.
    pub fn as_str(self) -> &'static str {
        BUILDS
            .iter()
            .find(|(b, _)| *b == self)
            .map_or("", |(_, n)| n)
    }
}

/// One function's calls (every attempt: sync, async, event, cron), whatever its history
/// policy records.
pub struct FunctionMetrics {
    calls: [AtomicU64; CALL_STATUSES.len()],
    errors: [AtomicU64; ERROR_TYPES.len()],
    cold: AtomicU64,
    /// From the call's start on the server (waiting for a worker and a cold start included)
    /// to its outcome.
    duration: Histogram<{ DURATION_BUCKETS.len() }>,
    /// The last hour, minute by minute (the console's charts).
    hour: LastHour<{ DURATION_BUCKETS.len() }>,
}

impl std::fmt::Debug for FunctionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionMetrics")
            .field("calls", &self.total())
            .finish_non_exhaustive()
    }
}

impl Default for FunctionMetrics {
    fn default() -> Self {
        FunctionMetrics {
            calls: Default::default(),
            errors: Default::default(),
            cold: AtomicU64::new(0),
            duration: Histogram::new(&DURATION_BUCKETS),
            hour: LastHour::new(&DURATION_BUCKETS),
        }
    }
}

impl FunctionMetrics {
    /// One call that ended in unix minute `minute`.
    pub fn record(
        &self,
        status: RunStatus,
        error: Option<ErrorType>,
        cold: bool,
        took: Duration,
        minute: u64,
    ) {
        if let Some(i) = CALL_STATUSES.iter().position(|s| *s == status) {
            self.calls[i].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(i) = error.and_then(|e| ERROR_TYPES.iter().position(|t| *t == e)) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        if cold {
            self.cold.fetch_add(1, Ordering::Relaxed);
        }
        let seconds = took.as_secs_f64();
        let bucket = self.duration.bucket(seconds);
        self.duration.observe_in(bucket, seconds);
        self.hour.record(minute, error.is_some(), cold, bucket);
    }

    /// The hour up to unix minute `now`, if it was called in it.
    pub fn hour(&self, name: &str, now: u64) -> Option<FunctionHour> {
        self.hour.hour(name, now)
    }

    fn total(&self) -> u64 {
        self.calls.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

pub struct Metrics {
    /// [method][step]
    cold: [[Histogram<{ BUCKETS.len() }>; STEPS.len()]; METHODS.len()],
    runs: [AtomicU64; STATUSES.len()],
    warm: AtomicU64,
    /// Connections of the API and the gateway listeners.
    edges: [std::sync::Arc<EdgeCounters>; 2],
    /// Builds by [`BUILDS`] and outcome (ready, error).
    builds: [[Histogram<{ DURATION_BUCKETS.len() }>; 2]; BUILDS.len()],
    /// Job executions that ended, by final phase (`JobPhase::ALL`'s order).
    jobs_ended: [AtomicU64; JobPhase::ALL.len()],
    /// (namespace, function) → its counters, shared with its deployments.
    functions: parking_lot::RwLock<BTreeMap<(String, String), Arc<FunctionMetrics>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            cold: std::array::from_fn(|_| std::array::from_fn(|_| Histogram::new(&BUCKETS))),
            runs: Default::default(),
            warm: AtomicU64::new(0),
            edges: Default::default(),
            builds: std::array::from_fn(|_| {
                std::array::from_fn(|_| Histogram::new(&DURATION_BUCKETS))
            }),
            jobs_ended: Default::default(),
            functions: Default::default(),
        }
    }
}

impl Metrics {
    /// The connection counters of one listener (shared with its accept loop).
    pub fn edge(&self, edge: Edge) -> std::sync::Arc<EdgeCounters> {
        self.edges[EDGES.iter().position(|e| *e == edge).unwrap_or(0)].clone()
    }

    /// A build of a new digest ended, READY (`ok`) or ERROR, after `took`.
    pub fn build_done(&self, kind: Build, ok: bool, took: Duration) {
        let k = BUILDS.iter().position(|(b, _)| *b == kind).unwrap_or(0);
        self.builds[k][usize::from(!ok)].observe(took.as_secs_f64());
    }

    /// A job execution ended in `phase` (Completed, Failed, Cancelled, Invalid).
    pub fn job_ended(&self, phase: JobPhase) {
        if let Some(i) = JobPhase::ALL.iter().position(|p| *p == phase) {
            self.jobs_ended[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Job executions waiting and running on this server (gauges), and those that ended by
    /// phase (counters).
    pub fn render_jobs(&self, out: &mut String, waiting: usize, active: usize) {
        let name = "dispatch_job_executions";
        let help = "Job executions on this server now, by phase (Waiting: for a slot of their template's maxActive).";
        let now = [("Waiting", waiting), ("Active", active)];
        family(out, name, "gauge", help, &now, |out, (p, n)| {
            let _ = writeln!(out, "{name}{{phase=\"{p}\"}} {n}");
        });
        let name = "dispatch_job_executions_ended_total";
        let ended: Vec<_> = JobPhase::ALL
            .iter()
            .zip(&self.jobs_ended)
            .filter(|(p, _)| p.is_final())
            .collect();
        let help = "Job executions that ended, by final phase.";
        family(out, name, "counter", help, &ended, |out, (p, c)| {
            let v = c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{phase=\"{p}\"}} {v}");
        });
    }

    /// The counters of a function (its versions share them), made on its first deploy.
    pub fn function(&self, namespace: &str, function: &str) -> Arc<FunctionMetrics> {
        let key = (namespace.to_string(), function.to_string());
        if let Some(m) = self.functions.read().get(&key) {
            return m.clone();
        }
        self.functions.write().entry(key).or_default().clone()
    }

    /// `GET …/stats`: the hour up to unix minute `now` of the namespace's functions (only
    /// `function`, when given) that were called in it.
    pub fn namespace_hour(
        &self,
        namespace: &str,
        function: Option<&str>,
        now: u64,
    ) -> NamespaceHour {
        let functions = self
            .functions
            .read()
            .iter()
            .filter(|((ns, f), _)| ns == namespace && function.is_none_or(|want| want == f))
            .map(|((_, f), m)| (f.clone(), m.clone()))
            .collect::<Vec<_>>();
        NamespaceHour {
            start: now.saturating_sub(crate::stats::MINUTES as u64 - 1) * 60,
            step: 60,
            functions: functions
                .into_iter()
                .filter_map(|(f, m)| m.hour(&f, now))
                .collect(),
        }
    }

    /// A function no longer served: its series go (they start from zero if it comes back).
    pub fn forget_function(&self, namespace: &str, function: &str) {
        self.functions
            .write()
            .remove(&(namespace.to_string(), function.to_string()));
    }

    /// Records one finished call: its cold start (if any) and its status.
    pub fn record(&self, status: RunStatus, cold: Option<&ColdStart>) {
        if let Some(i) = STATUSES.iter().position(|s| *s == status) {
            self.runs[i].fetch_add(1, Ordering::Relaxed);
        }
        let Some(c) = cold else {
            self.warm.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let m = METHODS.iter().position(|m| *m == c.method).unwrap_or(0);
        for (h, ms) in
            self.cold[m]
                .iter()
                .zip([c.total_ms, c.spawn_ms, c.import_ms, c.first_call_ms])
        {
            h.observe(ms / 1e3);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP dispatch_cold_start_seconds Cold starts of function workers, by start method and step.\n# TYPE dispatch_cold_start_seconds histogram\n",
        );
        for (m, row) in METHODS.iter().zip(&self.cold) {
            for (step, h) in STEPS.iter().zip(row) {
                let labels = format!("method=\"{}\",step=\"{step}\"", m.as_str());
                h.render(&mut out, "dispatch_cold_start_seconds", &labels);
            }
        }
        out.push_str(
            "# HELP dispatch_runs_total Finished function calls, by status.\n# TYPE dispatch_runs_total counter\n",
        );
        for (s, c) in STATUSES.iter().zip(&self.runs) {
            let _ = writeln!(
                out,
                "dispatch_runs_total{{status=\"{s}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP dispatch_warm_calls_total Calls served by a warm worker.\n# TYPE dispatch_warm_calls_total counter\n",
        );
        let _ = writeln!(
            out,
            "dispatch_warm_calls_total {}",
            self.warm.load(Ordering::Relaxed)
        );
        let families: [(&str, &str, &str, EdgeField); 4] = [
            (
                "dispatch_connections_open",
                "gauge",
                "Open connections, by listener.",
                |c| &c.open,
            ),
            (
                "dispatch_connections_max",
                "gauge",
                "The cap on open connections, by listener.",
                |c| &c.cap,
            ),
            (
                "dispatch_connections_accepted_total",
                "counter",
                "Connections served, by listener.",
                |c| &c.accepted,
            ),
            (
                "dispatch_connections_refused_total",
                "counter",
                "Connections refused at the cap (answered 503 and closed), by listener.",
                |c| &c.refused,
            ),
        ];
        for (name, kind, help, field) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (e, c) in EDGES.iter().zip(&self.edges) {
                let v = field(c).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{listener=\"{}\"}} {v}", e.as_str());
            }
        }
        header(
            &mut out,
            "dispatch_build_duration_seconds",
            "histogram",
            "Builds of a new digest, by what they made (an image; a function's deploy: unpacking, installing, its first workers) and how they ended.",
        );
        for ((_, kind), by_outcome) in BUILDS.iter().zip(&self.builds) {
            for (outcome, h) in ["ready", "error"].iter().zip(by_outcome) {
                let labels = format!("kind=\"{kind}\",outcome=\"{outcome}\"");
                h.render(&mut out, "dispatch_build_duration_seconds", &labels);
            }
        }
        self.render_functions(&mut out);
        out
    }

    /// The per-function families; a function not called since it was deployed has no
    /// series yet (10,000 idle functions cost the scrape nothing).
    fn render_functions(&self, out: &mut String) {
        let functions: Vec<_> = self
            .functions
            .read()
            .iter()
            .filter(|(_, m)| m.total() > 0)
            .map(|((ns, f), m)| (format!("namespace=\"{ns}\",function=\"{f}\""), m.clone()))
            .collect();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counters_by(
            out,
            "dispatch_function_calls_total",
            "Finished calls (attempts) of a function, by status.",
            "status",
            &functions,
            |m| CALL_STATUSES.iter().zip(m.calls.iter().map(load)).collect(),
        );
        counters_by(
            out,
            "dispatch_function_errors_total",
            "Failed calls of a function, by error type (InputError: the caller's input; FunctionError: the handler; SystemError: the platform, a timeout included).",
            "type",
            &functions,
            |m| ERROR_TYPES.iter().zip(m.errors.iter().map(load)).collect(),
        );
        family(
            out,
            "dispatch_function_cold_starts_total",
            "counter",
            "Calls of a function that started a worker.",
            &functions,
            |out, (labels, m)| {
                let _ = writeln!(
                    out,
                    "dispatch_function_cold_starts_total{{{labels}}} {}",
                    load(&m.cold)
                );
            },
        );
        family(
            out,
            "dispatch_function_duration_seconds",
            "histogram",
            "Calls of a function from their start on the server (a wait for a worker and a cold start included) to their outcome.",
            &functions,
            |out, (labels, m)| {
                m.duration
                    .render(out, "dispatch_function_duration_seconds", labels)
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_starts_land_in_cumulative_buckets() {
        let m = Metrics::default();
        let c = ColdStart {
            method: StartMethod::Fork,
            spawn_ms: 2.0,
            import_ms: 1.0,
            first_call_ms: 0.5,
            total_ms: 3.5,
        };
        m.record(RunStatus::Succeeded, Some(&c));
        m.record(RunStatus::Succeeded, None);
        let text = m.render();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .to_string()
        };
        assert_eq!(
            line(r#"dispatch_cold_start_seconds_bucket{method="fork",step="total",le="0.0025"}"#),
            r#"dispatch_cold_start_seconds_bucket{method="fork",step="total",le="0.0025"} 0"#
        );
        assert!(
            line(r#"dispatch_cold_start_seconds_bucket{method="fork",step="total",le="0.005"}"#)
                .ends_with(" 1")
        );
        assert!(
            line(r#"dispatch_cold_start_seconds_bucket{method="fork",step="total",le="+Inf"}"#)
                .ends_with(" 1")
        );
        assert!(
            line(r#"dispatch_cold_start_seconds_count{method="spawn",step="total"}"#)
                .ends_with(" 0")
        );
        assert!(line(r#"dispatch_runs_total{status="SUCCEEDED"}"#).ends_with(" 2"));
        assert!(line("dispatch_warm_calls_total").ends_with(" 1"));
    }

    #[test]
    fn a_functions_calls_are_counted_by_status_error_and_duration() {
        let m = Metrics::default();
        let idle = m.function("default", "idle");
        let f = m.function("team", "hello");
        assert!(
            Arc::ptr_eq(&f, &m.function("team", "hello")),
            "its deployments share one set of counters"
        );
        f.record(
            RunStatus::Succeeded,
            None,
            true,
            Duration::from_micros(180),
            1,
        );
        f.record(
            RunStatus::Succeeded,
            None,
            false,
            Duration::from_micros(90),
            1,
        );
        f.record(
            RunStatus::Timeout,
            Some(ErrorType::SystemError),
            false,
            Duration::from_secs(3),
            1,
        );
        let text = m.render();
        let l = r#"namespace="team",function="hello""#;
        for (series, v) in [
            (
                format!(r#"dispatch_function_calls_total{{{l},status="SUCCEEDED"}}"#),
                2,
            ),
            (
                format!(r#"dispatch_function_calls_total{{{l},status="TIMEOUT"}}"#),
                1,
            ),
            (
                format!(r#"dispatch_function_calls_total{{{l},status="FAILED"}}"#),
                0,
            ),
            (
                format!(r#"dispatch_function_errors_total{{{l},type="SystemError"}}"#),
                1,
            ),
            (
                format!(r#"dispatch_function_errors_total{{{l},type="InputError"}}"#),
                0,
            ),
            (format!(r#"dispatch_function_cold_starts_total{{{l}}}"#), 1),
            (
                format!(r#"dispatch_function_duration_seconds_bucket{{{l},le="0.0001"}}"#),
                1,
            ),
            (
                format!(r#"dispatch_function_duration_seconds_bucket{{{l},le="0.00025"}}"#),
                2,
            ),
            (
                format!(r#"dispatch_function_duration_seconds_bucket{{{l},le="2.5"}}"#),
                2,
            ),
            (
                format!(r#"dispatch_function_duration_seconds_bucket{{{l},le="10"}}"#),
                3,
            ),
            (
                format!(r#"dispatch_function_duration_seconds_count{{{l}}}"#),
                3,
            ),
        ] {
            assert!(
                text.lines().any(|x| x == format!("{series} {v}")),
                "no {series} {v} in\n{text}"
            );
        }
        assert!(
            !text.contains(r#"function="idle""#),
            "uncalled: no series yet"
        );
        drop(idle);
        m.forget_function("team", "hello");
        assert!(!m.render().contains(r#"function="hello""#));
    }
}
