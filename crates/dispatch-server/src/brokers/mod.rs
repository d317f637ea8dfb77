//! Broker event drivers (DESIGN §6): a NATS subject, an MQTT topic filter or a Kafka topic
//! whose messages become events (type = the subject / topic, or the driver's `eventType`) or
//! runs of the driver's function. Each driver is a task that connects, subscribes,
//! reconnects with back-off, and reports CONNECTED or ERROR (with the reason) in its status.
//! Messages are handled one at a time, so runs are enqueued in the broker's order.
//!
//! At least once: a JetStream durable consumer, an MQTT QoS 1 persistent session
//! and a Kafka partition consumer acknowledge (ack, PUBACK, stored offset) only after the
//! message's event is stored with its deliveries, and pause under back-pressure instead of
//! dropping. Core NATS (no `stream`) is at most once, as NATS itself is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::events::EventDriverSpec;
use dispatch_core::{Kind, Phase, Status};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::events::EventError;
use crate::events::Fire;
use crate::state::AppState;

mod kafka;
mod mqtt;
mod nats;

use kafka::run_kafka;
use mqtt::run_mqtt;
use nats::run_nats;

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Waits between tries: doubling from [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`], back to the
/// first after a success.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_FIRST)
    }

    /// The wait now (the next one is twice as long).
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        now
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next()).await;
    }

    fn reset(&mut self) {
        self.0 = BACKOFF_FIRST;
    }
}

/// A try failed: the driver shows ERROR with the reason, and waits its back-off.
async fn failed(state: &AppState, driver: (&str, &str), reason: String, backoff: &mut Backoff) {
    set_state(state, driver.0, driver.1, Phase::Error, reason).await;
    backoff.wait().await;
}

/// Running driver tasks: (namespace, name) → (spec it runs, its task). Dropped with the
/// supervisor (server stop): every driver task stops with it.
#[derive(Default)]
struct Running(HashMap<(String, String), (EventDriverSpec, AbortHandle)>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, (_, task)) in self.0.drain() {
            task.abort();
        }
    }
}

/// Writes a driver's connection state (only when it changes).
/// A store that refuses (busy under load) is tried again a few times: the state is written
/// only when it changes, so a lost write would show the old state for as long as it holds.
async fn set_state(state: &AppState, ns: &str, name: &str, phase: Phase, reason: String) {
    let mut wait = Duration::from_millis(100);
    for attempt in 1..=STATE_TRIES {
        match try_set_state(state, ns, name, phase, reason.clone()).await {
            Ok(()) => return,
            Err(e) if attempt == STATE_TRIES => {
                tracing::warn!(driver = %name, "recording the driver's state {phase}: {e}");
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

/// Tries of [`set_state`] (about 3 s in all).
const STATE_TRIES: u32 = 5;

async fn try_set_state(
    state: &AppState,
    ns: &str,
    name: &str,
    phase: Phase,
    reason: String,
) -> Result<(), crate::state::StateError> {
    let (n, m) = (ns.to_string(), name.to_string());
    let Some(o) = state.get(&n, Kind::EventDriver, &m).await? else {
        return Ok(());
    };
    // The generation too: the controller leaves a broker driver's status to this task, so a
    // changed spec is observed when its new task reports.
    if o.status.phase == Some(phase)
        && o.status.reason == reason
        && o.status.observed_generation == o.metadata.generation
    {
        return Ok(());
    }
    let st = Status {
        phase: Some(phase),
        reason,
        observed_generation: o.metadata.generation,
        ..o.status
    };
    state
        .res(
            move |s| match s.update_status(&n, Kind::EventDriver, &m, st) {
                Ok(_) | Err(dispatch_store::StoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            },
        )
        .await
}

/// One message → an event (or a run), with `id` as its event id (none: a fresh one).
async fn handle(
    state: &Arc<AppState>,
    ns: &str,
    name: &str,
    spec: &EventDriverSpec,
    channel: &str,
    payload: &[u8],
    id: Option<String>,
) -> Result<(), EventError> {
    let data = serde_json::from_slice::<serde_json::Value>(payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
    });
    let mut spec = spec.clone();
    if spec.event_type.is_none() {
        // The subject / topic is the type; MQTT's slashes become dots (sensors/t → sensors.t).
        spec.event_type = Some(channel.replace('/', "."));
    }
    let fire = Fire {
        ns,
        driver: name,
        spec: &spec,
        id: id.unwrap_or_else(|| ulid::Ulid::new().to_string()),
        time: state.queue.clock.now(),
        data,
        content_type: None,
    };
    crate::events::emit_from_driver(state, fire)
        .await
        .map(|_| ())
}

/// A refusal that passes (back-pressure, a short disk, a store hiccup): the message is
/// offered again; any other (too large, say) never passes.
fn passes(e: &EventError) -> bool {
    e.is_transient()
}

/// Offers a message until it is accepted (stored with its deliveries): back-pressure pauses
/// the consumer here, with back-off. `false`: refused for good (logged; the broker may move
/// on). At-least-once consumers acknowledge only after this returns.
async fn offer(
    state: &Arc<AppState>,
    driver: (&str, &str),
    spec: &EventDriverSpec,
    channel: &str,
    payload: &[u8],
    id: Option<String>,
) -> bool {
    let (ns, name) = driver;
    let id = id.unwrap_or_else(|| ulid::Ulid::new().to_string());
    let mut backoff = Backoff::new();
    loop {
        match handle(state, ns, name, spec, channel, payload, Some(id.clone())).await {
            Ok(()) => return true,
            Err(e) if passes(&e) => {
                tracing::debug!(driver = %name, "message from {channel} waits: {e}");
                backoff.wait().await;
            }
            Err(e) => {
                tracing::warn!(driver = %name, "message from {channel} refused: {e}");
                return false;
            }
        }
    }
}

/// Keeps one task per broker driver: starts new ones, stops deleted or changed ones.
pub fn spawn_supervisor(state: Arc<AppState>, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut running = Running::default();
        // With several servers, only the leader consumes (a Kubernetes Lease, or the shared
        // store's election): the others would deliver every message again.
        let mut leader = crate::replicas::leadership(&state);
        loop {
            let leads = leader.as_ref().is_none_or(|rx| *rx.borrow());
            // `None`: the drivers could not be listed (a busy store): the running ones go on
            // as they are and the list is tried again in a second.
            let wanted: Option<HashMap<(String, String), EventDriverSpec>> = if !leads {
                Some(HashMap::new())
            } else {
                match state.res(|s| s.list(None, Kind::EventDriver)).await {
                    Ok(all) => Some(
                        all.into_iter()
                            .filter_map(|o| {
                                let spec: EventDriverSpec = o.typed_spec().ok()?;
                                spec.is_broker().then(|| {
                                    ((o.namespace().to_string(), o.name().to_string()), spec)
                                })
                            })
                            .collect(),
                    ),
                    Err(e) => {
                        tracing::warn!("listing broker drivers (tried again in a second): {e}");
                        None
                    }
                }
            };
            let retry = wanted.is_none();
            if let Some(wanted) = wanted {
                let r = &mut running.0;
                r.retain(|k, (spec, task)| {
                    let keep = wanted.get(k) == Some(spec);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for (k, spec) in wanted {
                    if r.contains_key(&k) {
                        continue;
                    }
                    let (ns, name) = k.clone();
                    let task = match spec.kind.as_str() {
                        "nats" => tokio::spawn(run_nats(state.clone(), ns, name, spec.clone())),
                        "kafka" => tokio::spawn(run_kafka(state.clone(), ns, name, spec.clone())),
                        _ => tokio::spawn(run_mqtt(state.clone(), ns, name, spec.clone())),
                    };
                    r.insert(k, (spec, task.abort_handle()));
                }
            }
            let again = async {
                if retry {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            match leader.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = again => {}
                        changed = rx.changed() => {
                            if changed.is_err() {
                                // The election stopped: nobody leads from here.
                                for (_, (_, task)) in running.0.drain() {
                                    task.abort();
                                }
                                return;
                            }
                        }
                    }
                }
                None => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = again => {}
                    }
                }
            }
        }
    })
}
