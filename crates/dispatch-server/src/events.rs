//! Events (DESIGN §6): CloudEvents in, stored for a TTL, matched against subscriptions; each
//! match enqueues one async run (`payload = data`, `context.event` = the attributes), with
//! the queue's retries and dead letters. Webhook drivers turn gateway requests into events;
//! cron drivers ([`spawn_cron`]) fire on schedule, also with zero warm workers.
//!
//! An event is accepted only once it is stored together with one delivery per matching
//! subscription, in one transaction: a queued run, or a pending delivery that
//! [`crate::deliveries`] queues when its function's queue has room (accepted means
//! delivered, or dead and listed; never a subset of its subscriptions). An event whose
//! source and id were seen already is not delivered twice.

use std::collections::HashMap;
use std::sync::Arc;

use dispatch_core::events::{
    CloudEvent, Delivery, DeliveryState, EventDriverSpec, MissedRuns, Schedule, StoredEvent,
    SubscriptionSpec,
};
use dispatch_core::{Kind, Object};
use tokio::sync::Notify;

use crate::state::StateError;

/// Why an event is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Invalid(#[from] dispatch_core::ValidationError),
    #[error(
        "event data is {} and runs of events take at most {} (--max-async-payload)",
        dispatch_core::quantity::human_bytes(*size),
        dispatch_core::quantity::human_bytes(*limit)
    )]
    TooLarge { size: u64, limit: u64 },
    /// The namespace's deliveries waiting for room are at `--max-pending-deliveries`.
    #[error(
        "namespace {namespace:?} has {pending} event deliveries waiting for room in their \
         functions' queues, its limit (--max-pending-deliveries): nothing was stored; retry \
         later"
    )]
    DeliveriesPending { namespace: String, pending: u64 },
    #[error("the server is stopping: retry")]
    Stopping,
    /// The store refused a batch of events this one was in.
    #[error(transparent)]
    Batch(Arc<StateError>),
    #[error(transparent)]
    State(#[from] StateError),
}

impl EventError {
    /// Whether the same event may be accepted later (back-pressure, a short disk, a store
    /// failure), as opposed to never (invalid, too large).
    pub fn is_transient(&self) -> bool {
        match self {
            EventError::Invalid(_) | EventError::TooLarge { .. } => false,
            EventError::DeliveriesPending { .. } | EventError::Stopping => true,
            EventError::Batch(e) => e.is_transient(),
            EventError::State(e) => e.is_transient(),
        }
    }
}
use crate::invoke::Invocation;
use crate::state::AppState;

/// Subscriptions and webhook drivers, rebuilt whole on every change.
#[derive(Default)]
pub struct EventIndex {
    /// (namespace, subscription name, spec)
    pub subscriptions: Vec<(String, String, SubscriptionSpec)>,
    /// gateway path → (namespace, driver name, spec)
    pub webhooks: HashMap<String, (String, String, EventDriverSpec)>,
}

/// Reloads the index from the store and wakes the cron scheduler. Rebuilds run one at a
/// time: the API's (after a write) and the controller's (after its reconcile) once raced, and
/// an index read before a new subscription replaced one read after it (an event then missed
/// that subscription).
pub async fn rebuild(state: &AppState) -> Result<(), StateError> {
    let _one_at_a_time = state.event_index_rebuild.lock().await;
    let (subs, drivers) = state
        .res(|s| {
            Ok((
                s.list(None, Kind::Subscription)?,
                s.list(None, Kind::EventDriver)?,
            ))
        })
        .await?;
    let mut idx = EventIndex::default();
    for o in subs {
        if let Ok(spec) = o.typed_spec::<SubscriptionSpec>() {
            idx.subscriptions
                .push((o.namespace().to_string(), o.name().to_string(), spec));
        }
    }
    for o in drivers {
        if let Ok(spec) = o.typed_spec::<EventDriverSpec>()
            && spec.kind == "webhook"
            && let Some(p) = spec.path.clone()
        {
            idx.webhooks
                .insert(p, (o.namespace().to_string(), o.name().to_string(), spec));
        }
    }
    state.set_event_index(idx);
    state.cron_wake.notify_one();
    state.broker_wake.notify_one();
    Ok(())
}

/// What an ingest did.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ingested {
    pub id: String,
    pub source: String,
    /// Seen before (same source and id): not delivered again.
    pub duplicate: bool,
    pub matched: Vec<Delivery>,
}

/// Stores an event with a delivery per matching subscription.
pub async fn ingest(
    state: &Arc<AppState>,
    ns: &str,
    event: CloudEvent,
) -> Result<Ingested, EventError> {
    let targets: Vec<(String, String)> = state
        .event_index()
        .subscriptions
        .iter()
        .filter(|(n, _, spec)| n == ns && spec.matches(&event))
        .map(|(_, name, spec)| (name.clone(), spec.function.clone()))
        .collect();
    accept(state, ns, event, targets).await
}

/// Accepts an event for `targets` (subscription, function): stored with one delivery per
/// target in one transaction — a run queued now, or a pending delivery when the function's
/// queue has no room or the subscription has deliveries waiting already (arrival order).
/// Refused before anything is stored: a bad event (400), data over `--max-async-payload`
/// (413), a short disk (507), or a namespace at `--max-pending-deliveries` (429).
async fn accept(
    state: &Arc<AppState>,
    ns: &str,
    event: CloudEvent,
    targets: Vec<(String, String)>,
) -> Result<Ingested, EventError> {
    event.validate()?;
    // Its data becomes each matching run's payload: refused here, not after the 202.
    let payload = payload_of(&event);
    let size = payload.get().len();
    if size > state.config.max_async_payload {
        return Err(EventError::TooLarge {
            size: size as u64,
            limit: state.config.max_async_payload as u64,
        });
    }
    state
        .disk_admits("events", (size * (1 + targets.len())) as u64)
        .await?;
    state
        .deliveries
        .admit_event(ns, state.config.max_pending_deliveries)?;
    let now = state.queue.clock.now();
    let ttl =
        jiff::SignedDuration::try_from(state.config.event_ttl).unwrap_or(jiff::SignedDuration::MAX);
    let attrs = event.attributes();
    let mut runs = Vec::new();
    let mut matched = Vec::new();
    for (subscription, function) in targets {
        let mut d = Delivery {
            subscription,
            function,
            state: DeliveryState::Pending,
            run_id: None,
            error: None,
            attempts: 0,
        };
        if state.deliveries.has_pending(ns, &d.subscription) {
            d.error = Some("earlier deliveries of its subscription wait".into());
        } else {
            let trigger = crate::deliveries::trigger_of(&event.source);
            let inv =
                Invocation::new(ns, &d.function, payload.clone(), trigger).event(attrs.clone());
            match crate::queue::admit(state, inv).await {
                Ok(run) => {
                    d.state = DeliveryState::Queued;
                    d.run_id = Some(run.id.clone());
                    runs.push(run);
                }
                Err(e) => {
                    d.attempts = 1;
                    d.error = Some(e.recorded());
                }
            }
        }
        if d.state == DeliveryState::Pending {
            let why = d.error.as_deref().unwrap_or_default();
            state.deliveries.pend(ns, &d.subscription, now, why);
        }
        matched.push(d);
    }
    let stored = StoredEvent {
        namespace: ns.to_string(),
        event,
        received_at: now,
        matched,
        expires_at: now.checked_add(ttl).unwrap_or(now),
        pending: false,
    };
    let result = state.events.store(stored.clone(), runs.clone()).await;
    let stored_ok = matches!(result, Ok(true));
    for d in &stored.matched {
        match (d.state, stored_ok) {
            (DeliveryState::Pending, false) => state.deliveries.unpend(ns, &d.subscription),
            (DeliveryState::Queued, true) => state.deliveries.count_queued(ns, &d.subscription),
            _ => {}
        }
    }
    for run in &runs {
        if stored_ok {
            state.queue.push(run);
            crate::queue::accepted_span(state, run, crate::otlp::nanos(run.created_at));
        } else {
            state.queue.retire(&run.id);
        }
    }
    if stored_ok && stored.undelivered() {
        state.deliveries.wake();
    }
    match result {
        Ok(true) => Ok(Ingested {
            id: stored.event.id,
            source: stored.event.source,
            duplicate: false,
            matched: stored.matched,
        }),
        Ok(false) => Ok(Ingested {
            id: stored.event.id,
            source: stored.event.source,
            duplicate: true,
            matched: Vec::new(),
        }),
        Err(e) => {
            // Refused for want of space: say so (507).
            state.disk_admits("events", 0).await?;
            Err(e)
        }
    }
}

/// Group commit of ingests: events arriving together are stored in one transaction (each
/// still all or nothing), so that producers at thousands of events a second do not each pay
/// a commit and a turn at the single writer.
pub struct EventWriter {
    tx: tokio::sync::mpsc::Sender<Ingest>,
}

type Ingest = (
    (StoredEvent, Vec<dispatch_core::Run>),
    tokio::sync::oneshot::Sender<Result<bool, Arc<StateError>>>,
);

/// Most events per transaction.
const INGEST_BATCH: usize = 64;

impl EventWriter {
    pub fn start(store: Arc<dyn dispatch_store::RecordStore>) -> EventWriter {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Ingest>(1024);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < INGEST_BATCH {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                let (writes, acks): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let store = store.clone();
                let result =
                    tokio::task::spawn_blocking(move || store.ingest_events(&writes, false)).await;
                match result {
                    Ok(Ok(stored)) => {
                        for (ack, ok) in acks.into_iter().zip(stored) {
                            let _ = ack.send(Ok(ok));
                        }
                    }
                    Ok(Err(e)) => {
                        let e = Arc::new(StateError::from(e));
                        for ack in acks {
                            let _ = ack.send(Err(e.clone()));
                        }
                    }
                    Err(e) => {
                        let e = Arc::new(StateError::internal("storing events", e));
                        for ack in acks {
                            let _ = ack.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        EventWriter { tx }
    }

    /// Stores an event with its runs and pending deliveries; `false`: a duplicate, nothing
    /// stored.
    pub async fn store(
        &self,
        event: StoredEvent,
        runs: Vec<dispatch_core::Run>,
    ) -> Result<bool, EventError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx
            .send(((event, runs), ack))
            .await
            .map_err(|_| EventError::Stopping)?;
        done.await
            .map_err(|_| EventError::Stopping)?
            .map_err(EventError::Batch)
    }
}

/// What the function gets: the event's data, or its `data_base64` (binary data) as a string.
pub(crate) fn payload_of(e: &CloudEvent) -> Box<serde_json::value::RawValue> {
    let v = e
        .data
        .clone()
        .or_else(|| e.extensions.get("data_base64").cloned())
        .unwrap_or(serde_json::Value::Null);
    serde_json::value::to_raw_value(&v).unwrap_or_else(|_| dispatch_core::envelope::null_raw())
}

/// Start-up: events a server from before stored deliveries with their events left
/// undelivered get their deliveries now (all pending: the deliverer queues them).
pub async fn recover(state: &Arc<AppState>) {
    for (ns, _) in state.namespaces() {
        let n = ns.clone();
        let Ok(events) = state
            .db(move |s| s.list_events(&n, None, false, 100_000))
            .await
        else {
            continue;
        };
        for mut e in events.into_iter().filter(|e| e.pending) {
            e.pending = false;
            e.matched = state
                .event_index()
                .subscriptions
                .iter()
                .filter(|(n, _, spec)| *n == e.namespace && spec.matches(&e.event))
                .map(|(_, name, spec)| Delivery {
                    subscription: name.clone(),
                    function: spec.function.clone(),
                    state: DeliveryState::Pending,
                    run_id: None,
                    error: None,
                    attempts: 0,
                })
                .collect();
            let id = e.event.id.clone();
            if let Err(err) = state
                .db(move |s| s.ingest_events(&[(e, Vec::new())], true))
                .await
            {
                tracing::warn!("redelivering event {id}: {err}");
            }
        }
    }
}

/// One event a driver produces.
pub struct Fire<'a> {
    pub ns: &'a str,
    pub driver: &'a str,
    pub spec: &'a EventDriverSpec,
    /// Event id (cron: fixed by driver and fire time, so a replay is a duplicate).
    pub id: String,
    pub time: jiff::Timestamp,
    pub data: serde_json::Value,
    pub content_type: Option<String>,
}

/// A cron or webhook driver's event (or direct run).
pub async fn emit_from_driver(
    state: &Arc<AppState>,
    fire: Fire<'_>,
) -> Result<serde_json::Value, EventError> {
    let Fire {
        ns,
        driver,
        spec,
        id,
        time,
        data,
        content_type,
    } = fire;
    let event = CloudEvent {
        specversion: "1.0".into(),
        id,
        source: format!("dispatch/{}/{ns}/{driver}", spec.kind),
        kind: spec
            .event_type
            .clone()
            .unwrap_or_else(|| format!("dispatch.{}", spec.kind)),
        subject: None,
        time: Some(time.to_string()),
        datacontenttype: content_type.or(Some("application/json".into())),
        dataschema: None,
        data: Some(data),
        extensions: Default::default(),
    };
    let r = match &spec.function {
        // The driver names its function: one delivery, as if by a subscription of its own.
        Some(f) => {
            accept(
                state,
                ns,
                event,
                vec![(format!("driver/{driver}"), f.clone())],
            )
            .await?
        }
        None => ingest(state, ns, event).await?,
    };
    Ok(serde_json::to_value(r).unwrap_or_default())
}

/// A cron driver as the scheduler sees it.
struct CronDriver {
    ns: String,
    name: String,
    spec: EventDriverSpec,
    schedule: Schedule,
    object: Object,
}

async fn cron_drivers(state: &AppState) -> Vec<CronDriver> {
    let Ok(all) = state.res(|s| s.list(None, Kind::EventDriver)).await else {
        return Vec::new();
    };
    all.into_iter()
        .filter_map(|o| {
            let spec: EventDriverSpec = o.typed_spec().ok()?;
            if spec.kind != "cron" {
                return None;
            }
            let schedule = Schedule::parse(
                spec.schedule.as_deref()?,
                spec.timezone.as_deref().unwrap_or("UTC"),
            )
            .ok()?;
            Some(CronDriver {
                ns: o.namespace().to_string(),
                name: o.name().to_string(),
                spec,
                schedule,
                object: o,
            })
        })
        .collect()
}

async fn fire(state: &Arc<AppState>, d: &CronDriver, at: jiff::Timestamp) {
    // The id is fixed by driver and fire time: a fire replayed after a crash is a duplicate.
    let id = format!("{}/{}/{}", d.ns, d.name, at.as_millisecond());
    let data = serde_json::json!({"scheduled": at.to_string(), "driver": d.name});
    let fire = Fire {
        ns: &d.ns,
        driver: &d.name,
        spec: &d.spec,
        id,
        time: at,
        data,
        content_type: None,
    };
    if let Err(e) = emit_from_driver(state, fire).await {
        tracing::warn!(driver = %d.name, "cron fire failed: {}", e);
    }
}

/// The cron scheduler: one task holds every cron driver's next fire. Fires are recorded, so
/// a restart applies `missedRuns` to the ones missed while it was down.
pub fn spawn_cron(state: Arc<AppState>, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let clock = state.queue.clock;
        // With several servers, only the leader fires (a Kubernetes Lease, or the shared
        // store's election).
        let mut leader = crate::replicas::leadership(&state);
        loop {
            if let Some(rx) = leader.as_mut()
                && rx.wait_for(|leads| *leads).await.is_err()
            {
                return; // the election stopped: so does the scheduler
            }
            let drivers = cron_drivers(&state).await;
            let now = clock.now();
            let mut next_wake: Option<jiff::Timestamp> = None;
            for d in &drivers {
                let (ns, name) = (d.ns.clone(), d.name.clone());
                let last = state
                    .db(move |s| s.cron_last_fire(&ns, &name))
                    .await
                    .ok()
                    .flatten();
                let last = match last {
                    Some(l) => l,
                    None => {
                        // A new driver starts from now: nothing before its creation is missed.
                        let (ns, name) = (d.ns.clone(), d.name.clone());
                        let _ = state
                            .db(move |s| s.set_cron_last_fire(&ns, &name, Some(now)))
                            .await;
                        now
                    }
                };
                // Fires due since the last one (missed ones after a stop, or just due).
                let mut due = Vec::new();
                let mut t = last;
                while let Some(n) = d.schedule.next_after(t) {
                    if n > now || due.len() > dispatch_core::events::MAX_CATCH_UP {
                        break;
                    }
                    due.push(n);
                    t = n;
                }
                let catching_up = due.len() > 1
                    || due
                        .first()
                        .is_some_and(|f| now.duration_since(*f).as_secs() > 2);
                let to_fire: Vec<jiff::Timestamp> = match (catching_up, d.spec.missed_runs) {
                    (false, _) => due.clone(),
                    (true, MissedRuns::Skip) => Vec::new(),
                    (true, MissedRuns::Once) => due.last().copied().into_iter().collect(),
                    (true, MissedRuns::All) => due
                        .iter()
                        .copied()
                        .take(dispatch_core::events::MAX_CATCH_UP)
                        .collect(),
                };
                for at in &to_fire {
                    fire(&state, d, *at).await;
                }
                if let Some(latest) = due.last().copied() {
                    let (ns, name) = (d.ns.clone(), d.name.clone());
                    let _ = state
                        .db(move |s| s.set_cron_last_fire(&ns, &name, Some(latest)))
                        .await;
                }
                let next = d
                    .schedule
                    .next_after(due.last().copied().unwrap_or(last).max(now));
                if d.object.status.next_fire != next {
                    let mut st = d.object.status.clone();
                    st.next_fire = next;
                    st.phase = Some(dispatch_core::Phase::Ready);
                    let (ns, name) = (d.ns.clone(), d.name.clone());
                    let _ = state
                        .res(move |s| s.update_status(&ns, Kind::EventDriver, &name, st))
                        .await;
                }
                if let Some(n) = next {
                    next_wake = Some(next_wake.map_or(n, |w| w.min(n)));
                }
            }
            let lost = async {
                match leader.as_mut() {
                    Some(rx) => {
                        let _ = rx.wait_for(|leads| !*leads).await;
                    }
                    None => std::future::pending().await,
                }
            };
            match next_wake {
                Some(at) => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep_until(clock.instant_at(at)) => {}
                        _ = lost => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = lost => {}
                    }
                }
            }
        }
    })
}
