//! Process metrics in the Prometheus text format (`GET /metrics` on the API, viewer token):
//! cold starts as histograms, split by how the worker started and by step, and finished runs
//! by status. Atomic counters only: recording is a few relaxed adds on the run path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use dispatch_core::{ColdStart, RunStatus, StartMethod};

use crate::serve::{Edge, EdgeCounters};

const EDGES: [Edge; 2] = [Edge::Api, Edge::Gateway];

/// One counter of a listener's [`EdgeCounters`].
type EdgeField = fn(&EdgeCounters) -> &AtomicU64;

/// Upper bounds of the histogram buckets, in seconds (+Inf is implied).
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    /// Observations at or below each bound (not cumulative; summed when rendered).
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of observations in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
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

#[derive(Default)]
pub struct Metrics {
    /// [method][step]
    cold: [[Histogram; STEPS.len()]; METHODS.len()],
    runs: [AtomicU64; STATUSES.len()],
    warm: AtomicU64,
    /// Connections of the API and the gateway listeners.
    edges: [std::sync::Arc<EdgeCounters>; 2],
}

impl Metrics {
    /// The connection counters of one listener (shared with its accept loop).
    pub fn edge(&self, edge: Edge) -> std::sync::Arc<EdgeCounters> {
        self.edges[EDGES.iter().position(|e| *e == edge).unwrap_or(0)].clone()
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
        out
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
}
