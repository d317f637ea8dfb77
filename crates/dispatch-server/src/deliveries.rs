//! Event deliveries that wait (DESIGN §6). An event is accepted (202) only once it
//! is stored with one delivery per matching subscription, in one transaction: a queued run,
//! or a pending delivery when its function's queue has no room (or a delivery of the same
//! subscription already waits: arrival order). This module moves the pending ones along:
//! per subscription, oldest first, tried again when the queue frees room and with back-off
//! while it stays full, until each is queued or its event's TTL ends — then it is dead: kept,
//! listed (`dispatch get events --undelivered`) and redelivered on demand.
//!
//! It also keeps the counts that ingest's high-water mark (`--max-pending-deliveries`: 429,
//! nothing stored), `GET …/subscriptions/{name}/deliveries` and `/metrics` read.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::Trigger;
use dispatch_core::events::{DeliveryState, DeliveryStats};
use dispatch_store::{DeliveryRecord, Redeliver};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::events::EventError;
use crate::invoke::Invocation;
use crate::state::AppState;
use crate::state::StateError;

/// The first wait after a refused try, doubled per refusal up to [`BACKOFF_MAX`]; room in
/// the queue (a run finished) ends a wait early.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Pending deliveries read per subscription at a time (one after a refusal: the next try
/// most likely fails too).
const BATCH: usize = 64;
/// How often events past their TTL and dead deliveries past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// (namespace, subscription)
type SubKey = (String, String);

/// A metric: name, type, help, and its value in a subscription's stats.
type MetricRow = (
    &'static str,
    &'static str,
    &'static str,
    fn(&DeliveryStats) -> f64,
);

#[derive(Default)]
struct Sub {
    pending: u64,
    dead: u64,
    queued: u64,
    retried: u64,
    oldest_pending: Option<jiff::Timestamp>,
    backoff: Duration,
    /// Not tried again before this (back-off after a refusal).
    next_try: Option<Instant>,
    /// Rows to read next time: [`BATCH`], or 1 after a refusal.
    read: usize,
}

#[derive(Default)]
struct Inner {
    subs: HashMap<SubKey, Sub>,
    pending_ns: HashMap<String, u64>,
    /// Events refused (429) per namespace: its pending deliveries were at the high-water mark.
    refused_ns: HashMap<String, u64>,
}

#[derive(Default)]
pub struct Deliveries {
    inner: Mutex<Inner>,
    wake: Notify,
    waiting_log: crate::serve::LogThrottle,
}

impl Deliveries {
    fn inner(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Ok while the namespace's pending deliveries are below `max`; else counts a refusal
    /// and answers the 429 the producer gets (nothing is stored).
    pub fn admit_event(&self, ns: &str, max: usize) -> Result<(), EventError> {
        let mut i = self.inner();
        let pending = i.pending_ns.get(ns).copied().unwrap_or(0);
        if pending < max as u64 {
            return Ok(());
        }
        *i.refused_ns.entry(ns.to_string()).or_default() += 1;
        Err(EventError::DeliveriesPending {
            namespace: ns.to_string(),
            pending,
        })
    }

    /// Whether a delivery of this subscription waits (a new one must wait behind it).
    pub fn has_pending(&self, ns: &str, subscription: &str) -> bool {
        self.inner()
            .subs
            .get(&(ns.to_string(), subscription.to_string()))
            .is_some_and(|s| s.pending > 0)
    }

    /// A new delivery waits (counted before it is stored, so that the next event of the
    /// subscription waits behind it; [`Deliveries::unpend`] if the store fails).
    pub fn pend(&self, ns: &str, subscription: &str, at: jiff::Timestamp, why: &str) {
        {
            let mut i = self.inner();
            *i.pending_ns.entry(ns.to_string()).or_default() += 1;
            let s = i
                .subs
                .entry((ns.to_string(), subscription.to_string()))
                .or_default();
            s.pending += 1;
            s.oldest_pending.get_or_insert(at);
        }
        self.waiting_log.run(|| {
            tracing::warn!(
                namespace = ns,
                subscription,
                "event deliveries wait for room in their function's queue: {why}"
            )
        });
    }

    /// Takes back [`Deliveries::pend`]s whose event was not stored.
    pub fn unpend(&self, ns: &str, subscription: &str) {
        let mut i = self.inner();
        if let Some(n) = i.pending_ns.get_mut(ns) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = i.subs.get_mut(&(ns.to_string(), subscription.to_string())) {
            s.pending = s.pending.saturating_sub(1);
            if s.pending == 0 {
                s.oldest_pending = None;
            }
        }
    }

    /// A delivery's run was queued (at ingest, or later by the deliverer).
    pub fn count_queued(&self, ns: &str, subscription: &str) {
        self.inner()
            .subs
            .entry((ns.to_string(), subscription.to_string()))
            .or_default()
            .queued += 1;
    }

    /// Wakes the deliverer (new pending deliveries, or redelivered ones).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Counts at start-up, from the store.
    /// Pending and dead counts as the store has them now (other servers sharing it added
    /// some), then the deliverer looks again.
    fn reload(&self, counts: Vec<dispatch_store::DeliveryCount>) {
        {
            let mut i = self.inner();
            for s in i.subs.values_mut() {
                s.pending = 0;
                s.dead = 0;
                s.oldest_pending = None;
            }
            i.pending_ns.clear();
        }
        self.load(counts);
        self.wake.notify_one();
    }

    fn load(&self, counts: Vec<dispatch_store::DeliveryCount>) {
        let mut i = self.inner();
        for c in counts {
            let s = i
                .subs
                .entry((c.namespace.clone(), c.subscription.clone()))
                .or_default();
            match c.state {
                DeliveryState::Pending => {
                    s.pending += c.count;
                    s.oldest_pending = Some(c.oldest);
                    *i.pending_ns.entry(c.namespace).or_default() += c.count;
                }
                DeliveryState::Dead => s.dead += c.count,
                DeliveryState::Queued => {}
            }
        }
    }

    /// One subscription's deliveries now.
    pub fn stats(&self, ns: &str, subscription: &str, now: jiff::Timestamp) -> DeliveryStats {
        let i = self.inner();
        i.subs
            .get(&(ns.to_string(), subscription.to_string()))
            .map(|s| stats_of(s, now))
            .unwrap_or_default()
    }

    /// Per subscription and per namespace, in the Prometheus text format.
    pub fn render_metrics(&self, now: jiff::Timestamp) -> String {
        let i = self.inner();
        let mut subs: Vec<_> = i.subs.iter().collect();
        subs.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = String::new();
        let rows: [MetricRow; 5] = [
            (
                "dispatch_event_deliveries_queued_total",
                "counter",
                "Event deliveries whose run was queued, by subscription.",
                |s| s.queued as f64,
            ),
            (
                "dispatch_event_deliveries_retried_total",
                "counter",
                "Tries to queue a pending delivery that its function's queue refused.",
                |s| s.retried as f64,
            ),
            (
                "dispatch_event_deliveries_pending",
                "gauge",
                "Event deliveries waiting for room in their function's queue.",
                |s| s.pending as f64,
            ),
            (
                "dispatch_event_deliveries_dead",
                "gauge",
                "Event deliveries not queued before their event's TTL ended (redeliverable).",
                |s| s.dead as f64,
            ),
            (
                "dispatch_event_deliveries_oldest_pending_seconds",
                "gauge",
                "Age of the oldest pending delivery (0: none).",
                |s| s.oldest_pending_seconds.unwrap_or(0.0),
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((ns, sub), s) in &subs {
                let v = value(&stats_of(s, now));
                let _ = writeln!(
                    out,
                    "{name}{{namespace=\"{ns}\",subscription=\"{sub}\"}} {v}"
                );
            }
        }
        let name = "dispatch_events_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Events answered 429 because the namespace's pending deliveries were \
             at --max-pending-deliveries.\n# TYPE {name} counter"
        );
        let mut refused: Vec<_> = i.refused_ns.iter().collect();
        refused.sort();
        for (ns, n) in refused {
            let _ = writeln!(out, "{name}{{namespace=\"{ns}\"}} {n}");
        }
        out
    }

    /// Subscriptions with pending deliveries that may be tried now (`room`: the queue freed
    /// room, so back-off ends early), and the soonest time another one may.
    fn due(&self, now: Instant, room: bool) -> (Vec<(SubKey, usize)>, Option<Instant>) {
        let i = self.inner();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (k, s) in &i.subs {
            if s.pending == 0 {
                continue;
            }
            match s.next_try {
                Some(t) if t > now && !room => next = Some(next.map_or(t, |n| n.min(t))),
                _ => due.push((k.clone(), s.read.max(1))),
            }
        }
        (due, next)
    }

    fn with_sub(&self, key: &SubKey, f: impl FnOnce(&mut Sub, &mut HashMap<String, u64>)) {
        let mut i = self.inner();
        let Inner {
            subs, pending_ns, ..
        } = &mut *i;
        f(subs.entry(key.clone()).or_default(), pending_ns);
    }
}

fn stats_of(s: &Sub, now: jiff::Timestamp) -> DeliveryStats {
    DeliveryStats {
        pending: s.pending,
        dead: s.dead,
        queued: s.queued,
        retried: s.retried,
        oldest_pending_seconds: s
            .oldest_pending
            .filter(|_| s.pending > 0)
            .map(|t| now.duration_since(t).as_secs_f64().max(0.0)),
    }
}

/// The trigger of a delivery's run: a cron driver's own function runs as `cron`.
pub fn trigger_of(source: &str) -> Trigger {
    if source.starts_with("dispatch/cron/") {
        Trigger::Cron
    } else {
        Trigger::Event
    }
}

/// Marks a delivery dead (its TTL ended, or its event is gone), kept for a redelivery.
async fn bury(state: &Arc<AppState>, key: &SubKey, mut d: DeliveryRecord) -> bool {
    let now = state.queue.clock.now();
    let retention = jiff::SignedDuration::try_from(state.config.dead_delivery_retention)
        .unwrap_or(jiff::SignedDuration::MAX);
    d.state = DeliveryState::Dead;
    d.last_error = Some(format!(
        "not queued before the event's TTL ended (--event-ttl){}",
        d.last_error
            .as_deref()
            .map(|e| format!("; last refusal: {e}"))
            .unwrap_or_default()
    ));
    d.expires_at = now.checked_add(retention).unwrap_or(now);
    if state.db(move |s| s.update_delivery(&d)).await.is_err() {
        return false;
    }
    state.deliveries.with_sub(key, |s, ns| {
        s.pending = s.pending.saturating_sub(1);
        s.dead += 1;
        if let Some(n) = ns.get_mut(&key.0) {
            *n = n.saturating_sub(1);
        }
    });
    true
}

/// A refused try: counted, written now and then, and the subscription backs off.
async fn refused(state: &Arc<AppState>, key: &SubKey, mut d: DeliveryRecord, why: String) {
    d.attempts += 1;
    let changed = d.last_error.as_deref() != Some(why.as_str());
    d.last_error = Some(why);
    // Written when the reason changes and then at attempts 2, 4, 8, …: a full queue is
    // tried often, and each try must not be a write.
    if changed || d.attempts.is_power_of_two() {
        let _ = state.db(move |s| s.update_delivery(&d)).await;
    }
    state.deliveries.with_sub(key, |s, _| {
        s.retried += 1;
        s.backoff = (s.backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
        s.next_try = Some(Instant::now() + s.backoff);
        s.read = 1;
    });
}

/// Tries the pending deliveries of one subscription, oldest first, until one is refused;
/// the admitted ones are stored in one transaction.
async fn deliver_sub(state: &Arc<AppState>, key: SubKey, read: usize) {
    let (ns, sub) = key.clone();
    let rows = match state
        .db(move |s| s.pending_deliveries(&ns, &sub, read))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("reading pending event deliveries: {}", e);
            state.deliveries.with_sub(&key, |s, _| {
                s.next_try = Some(Instant::now() + BACKOFF_MAX);
            });
            return;
        }
    };
    if rows.is_empty() {
        // None stored: the count drifted (a namespace deleted, say); it is zero.
        state.deliveries.with_sub(&key, |s, ns| {
            if let Some(n) = ns.get_mut(&key.0) {
                *n = n.saturating_sub(s.pending);
            }
            s.pending = 0;
            s.oldest_pending = None;
        });
        return;
    }
    let head = rows[0].0.received_at;
    state
        .deliveries
        .with_sub(&key, |s, _| s.oldest_pending = Some(head));
    let now = state.queue.clock.now();
    let mut batch: Vec<(DeliveryRecord, dispatch_core::Run)> = Vec::new();
    let mut was_refused = false;
    for (d, event) in rows {
        let Some(event) = event.filter(|_| d.expires_at > now) else {
            if !bury(state, &key, d).await {
                break;
            }
            continue;
        };
        let inv = Invocation::new(
            &d.namespace,
            &d.function,
            crate::events::payload_of(&event.event),
            trigger_of(&d.source),
        )
        .event(event.event.attributes());
        let admitted = crate::queue::admit(state, inv).await;
        match admitted {
            Ok(run) => batch.push((d, run)),
            Err(e) => {
                refused(state, &key, d, e.recorded()).await;
                was_refused = true;
                break;
            }
        }
    }
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let stored = batch.clone();
    if let Err(e) = state.db(move |s| s.deliver(&stored)).await {
        for (_, run) in &batch {
            state.queue.retire(&run.id);
        }
        tracing::warn!("queueing pending event deliveries: {}", e);
        state.deliveries.with_sub(&key, |s, _| {
            s.next_try = Some(Instant::now() + BACKOFF_MAX);
        });
        return;
    }
    for (_, run) in &batch {
        state.queue.push(run);
        crate::queue::accepted_span(state, run, crate::otlp::nanos(run.created_at));
    }
    state.deliveries.with_sub(&key, |s, ns| {
        s.pending = s.pending.saturating_sub(n);
        s.queued += n;
        if !was_refused {
            s.backoff = Duration::ZERO;
            s.next_try = None;
            s.read = BATCH;
        }
        if s.pending == 0 {
            s.oldest_pending = None;
        }
        if let Some(p) = ns.get_mut(&key.0) {
            *p = p.saturating_sub(n);
        }
    });
}

/// The deliverer: one task; wakes on new pending deliveries, on room in the queue, at the
/// end of a back-off, and to prune expired events.
pub fn spawn(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        match state.db(|s| s.delivery_counts()).await {
            Ok(c) => state.deliveries.load(c),
            Err(e) => tracing::error!("loading pending event deliveries: {}", e),
        }
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut room = false;
        loop {
            let (due, next) = state.deliveries.due(Instant::now(), room);
            for (key, read) in due.iter().cloned() {
                deliver_sub(&state, key, read).await;
            }
            if !due.is_empty() {
                // Look again at once: what was tried set its next try (or has more rows).
                room = false;
                tokio::task::yield_now().await;
                continue;
            }
            let waiting = next.is_some();
            tokio::select! {
                _ = state.deliveries.wake.notified() => room = false,
                _ = state.queue.room.notified(), if waiting => room = true,
                _ = async { tokio::time::sleep_until(next.unwrap_or_else(Instant::now)).await }, if waiting => room = false,
                _ = prune.tick() => {
                    let now = state.queue.clock.now();
                    if let Err(e) = state.db(move |s| s.prune_events(now)).await {
                        tracing::warn!("pruning events: {}", e);
                    }
                    room = false;
                }
            }
        }
    })
}

/// On a store several servers share, run by the elected one: pending deliveries other
/// servers stored (a server that stopped left its own) are counted here and delivered.
pub async fn resync(state: &AppState) {
    match state.db(|s| s.delivery_counts()).await {
        Ok(c) => state.deliveries.reload(c),
        Err(e) => tracing::warn!("reading pending event deliveries: {}", e),
    }
}

/// Dead deliveries back to pending (a subscription's, or one event's), with a new TTL.
pub async fn redeliver(state: &AppState, ns: &str, which: Redeliver) -> Result<u64, StateError> {
    let now = state.queue.clock.now();
    let ttl =
        jiff::SignedDuration::try_from(state.config.event_ttl).unwrap_or(jiff::SignedDuration::MAX);
    let expires = now.checked_add(ttl).unwrap_or(now);
    let n = ns.to_string();
    let records = state.db(move |s| s.redeliver(&n, &which, expires)).await?;
    for r in &records {
        state
            .deliveries
            .with_sub(&(r.namespace.clone(), r.subscription.clone()), |s, pns| {
                s.dead = s.dead.saturating_sub(1);
                s.pending += 1;
                s.oldest_pending.get_or_insert(r.received_at);
                s.next_try = None;
                *pns.entry(r.namespace.clone()).or_default() += 1;
            });
    }
    state.deliveries.wake();
    Ok(records.len() as u64)
}
