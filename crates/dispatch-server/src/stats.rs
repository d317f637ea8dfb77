//! The last hour of each function's calls, minute by minute: what the console's charts draw
//! (`GET /v1/namespaces/{ns}/stats`). It hangs off the function's
//! [`FunctionMetrics`](crate::metrics::FunctionMetrics) beside its Prometheus counters: a
//! ring of 60 one-minute slots, made at the function's first call (a function never called
//! costs nothing; one called costs ~5.8 KB), and a few relaxed adds per call.
//!
//! A slot is reused when its minute comes round again: the first call of the new minute
//! zeroes it. Calls that race that reset may be lost or counted in the wrong minute — the
//! figures are for charts; `/metrics` has the exact counters.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::Serialize;

/// Minutes kept: one hour.
pub const MINUTES: usize = 60;

struct Slot<const N: usize> {
    /// The unix minute this slot counts (0: never used).
    minute: AtomicU64,
    calls: AtomicU32,
    errors: AtomicU32,
    cold: AtomicU32,
    /// Calls by duration bucket (the function's histogram's bounds).
    durations: [AtomicU32; N],
}

impl<const N: usize> Slot<N> {
    fn new() -> Self {
        Slot {
            minute: AtomicU64::new(0),
            calls: AtomicU32::new(0),
            errors: AtomicU32::new(0),
            cold: AtomicU32::new(0),
            durations: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    fn reset(&self) {
        for c in [&self.calls, &self.errors, &self.cold]
            .into_iter()
            .chain(&self.durations)
        {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Its counts if it holds `minute`.
    fn counts(&self, minute: u64) -> Option<(u32, u32, u32, [u32; N])> {
        if self.minute.load(Ordering::Acquire) != minute {
            return None;
        }
        let l = |c: &AtomicU32| c.load(Ordering::Relaxed);
        Some((
            l(&self.calls),
            l(&self.errors),
            l(&self.cold),
            std::array::from_fn(|i| l(&self.durations[i])),
        ))
    }
}

/// One function's last hour; `N` duration buckets with upper bounds `bounds` (seconds, the
/// last +Inf).
pub struct LastHour<const N: usize> {
    bounds: &'static [f64; N],
    slots: OnceLock<Box<[Slot<N>; MINUTES]>>,
}

impl<const N: usize> LastHour<N> {
    pub fn new(bounds: &'static [f64; N]) -> Self {
        LastHour {
            bounds,
            slots: OnceLock::new(),
        }
    }

    /// A call that ended in unix minute `minute`, in duration bucket `bucket`.
    pub fn record(&self, minute: u64, error: bool, cold: bool, bucket: usize) {
        let slots = self
            .slots
            .get_or_init(|| Box::new(std::array::from_fn(|_| Slot::new())));
        let slot = &slots[(minute % MINUTES as u64) as usize];
        let held = slot.minute.load(Ordering::Acquire);
        if held != minute {
            if held > minute {
                // A call from a minute already gone round (the clock is monotonic, but calls
                // end out of order): not counted.
                return;
            }
            if slot
                .minute
                .compare_exchange(held, minute, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.reset();
            }
        }
        slot.calls.fetch_add(1, Ordering::Relaxed);
        if error {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
        if cold {
            slot.cold.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(d) = slot.durations.get(bucket) {
            d.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The hour up to unix minute `now` (oldest first); `None` when nothing was called in it.
    pub fn hour(&self, name: &str, now: u64) -> Option<FunctionHour> {
        let slots = self.slots.get()?;
        let first = now.saturating_sub(MINUTES as u64 - 1);
        let mut h = FunctionHour {
            name: name.to_string(),
            ..FunctionHour::default()
        };
        for minute in first..=now {
            let (calls, errors, cold, durations) = slots[(minute % MINUTES as u64) as usize]
                .counts(minute)
                .unwrap_or((0, 0, 0, [0; N]));
            h.calls.push(calls);
            h.errors.push(errors);
            h.cold_starts.push(cold);
            h.p50_ms.push(quantile(self.bounds, &durations, 0.50));
            h.p99_ms.push(quantile(self.bounds, &durations, 0.99));
        }
        h.calls.iter().any(|c| *c > 0).then_some(h)
    }
}

/// The `q` quantile of bucketed counts, in milliseconds, interpolated within its bucket (the
/// +Inf bucket answers its lower bound). `None` without counts.
fn quantile<const N: usize>(bounds: &[f64; N], counts: &[u32; N], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().map(|c| u64::from(*c)).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, c) in counts.iter().enumerate() {
        let c = u64::from(*c);
        if c > 0 && (below + c) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let upper = bounds[i];
            let s = if upper.is_infinite() {
                lower
            } else {
                lower + (upper - lower) * ((rank - below as f64) / c as f64).clamp(0.0, 1.0)
            };
            return Some((s * 1e6).round() / 1e3);
        }
        below += c;
    }
    None
}

/// One function's hour, one value per minute (oldest first) in each column.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionHour {
    pub name: String,
    pub calls: Vec<u32>,
    pub errors: Vec<u32>,
    pub cold_starts: Vec<u32>,
    /// Milliseconds, estimated from the duration histogram; null in a minute without calls.
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
}

/// `GET …/stats`: the namespace's functions called in the hour.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceHour {
    /// Unix time (seconds) of the first minute.
    pub start: u64,
    /// Seconds per value: 60.
    pub step: u64,
    pub functions: Vec<FunctionHour>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: [f64; 4] = [0.001, 0.01, 0.1, f64::INFINITY];

    #[test]
    fn counts_land_in_their_minute_and_a_slot_is_reused_an_hour_later() {
        let h = LastHour::new(&B);
        assert!(h.hour("f", 1000).is_none(), "nothing recorded: no hour");
        h.record(1000, false, true, 0);
        h.record(1000, true, false, 1);
        h.record(999, false, false, 1);
        let hour = h.hour("f", 1000).unwrap();
        assert_eq!(hour.calls.len(), MINUTES);
        assert_eq!(hour.calls[MINUTES - 1], 2);
        assert_eq!(hour.calls[MINUTES - 2], 1);
        assert_eq!(hour.errors[MINUTES - 1], 1);
        assert_eq!(hour.cold_starts[MINUTES - 1], 1);
        assert_eq!(hour.p50_ms[MINUTES - 3], None);
        // An hour on, minute 1060 takes 1000's slot: 1000's counts are gone.
        h.record(1060, false, false, 0);
        let later = h.hour("f", 1060).unwrap();
        assert_eq!(later.calls.iter().sum::<u32>(), 1);
        // A late call of minute 1000 does not land in 1060's slot.
        h.record(1000, false, false, 0);
        assert_eq!(h.hour("f", 1060).unwrap().calls[MINUTES - 1], 1);
        assert!(h.hour("f", 1200).is_none(), "an hour without calls");
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        // 100 calls in (1 ms, 10 ms]: the median halfway through it.
        assert_eq!(quantile(&B, &[0, 100, 0, 0], 0.5), Some(5.5));
        // 99 fast and 1 beyond the last bound: p99 is in the fast bucket, p100 the bound.
        assert_eq!(quantile(&B, &[99, 0, 0, 1], 0.99), Some(1.0));
        assert_eq!(quantile(&B, &[99, 0, 0, 1], 1.0), Some(100.0));
        assert_eq!(quantile(&B, &[0, 0, 0, 0], 0.5), None);
    }
}
