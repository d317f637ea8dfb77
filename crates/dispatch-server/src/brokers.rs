//! Broker event drivers (DESIGN §6): a NATS subject or an MQTT topic filter whose messages
//! become events (type = the subject / topic, or the driver's `eventType`) or runs of the
//! driver's function. Each driver is a task that connects, subscribes, reconnects with
//! back-off, and reports CONNECTED or ERROR (with the reason) in its status. Messages are
//! handled one at a time, so runs are enqueued in the broker's order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::events::EventDriverSpec;
use dispatch_core::{Kind, Phase, Status};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::events::Fire;
use crate::state::AppState;

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

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
async fn set_state(state: &AppState, ns: &str, name: &str, phase: Phase, reason: String) {
    let (n, m) = (ns.to_string(), name.to_string());
    let Ok(Some(o)) = state.get(&n, Kind::EventDriver, &m).await else {
        return;
    };
    if o.status.phase == Some(phase) && o.status.reason == reason {
        return;
    }
    let st = Status {
        phase: Some(phase),
        reason,
        observed_generation: o.metadata.generation,
        ..o.status
    };
    let _ = state
        .db(move |s| s.update_status(&n, Kind::EventDriver, &m, st))
        .await;
}

/// One message → an event (or a run).
async fn handle(
    state: &Arc<AppState>,
    ns: &str,
    name: &str,
    spec: &EventDriverSpec,
    channel: &str,
    payload: &[u8],
) {
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
        id: ulid::Ulid::new().to_string(),
        time: state.queue.clock.now(),
        data,
        content_type: None,
    };
    if let Err(e) = crate::events::emit_from_driver(state, fire).await {
        tracing::warn!(driver = %name, "message from {channel} not delivered: {}", e.message);
    }
}

async fn run_nats(state: Arc<AppState>, ns: String, name: String, spec: EventDriverSpec) {
    let url = spec.config.get("url").cloned().unwrap_or_default();
    let subject = spec.config.get("subject").cloned().unwrap_or_default();
    let mut backoff = BACKOFF_FIRST;
    loop {
        let st = state.clone();
        let (cns, cname) = (ns.clone(), name.clone());
        let opts = async_nats::ConnectOptions::new().event_callback(move |ev| {
            let (st, ns, name) = (st.clone(), cns.clone(), cname.clone());
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        set_state(&st, &ns, &name, Phase::Connected, String::new()).await
                    }
                    async_nats::Event::Disconnected => {
                        set_state(
                            &st,
                            &ns,
                            &name,
                            Phase::Error,
                            "disconnected from the NATS server; reconnecting".into(),
                        )
                        .await
                    }
                    _ => {}
                }
            }
        });
        let client = match opts.connect(url.as_str()).await {
            Ok(c) => c,
            Err(e) => {
                set_state(
                    &state,
                    &ns,
                    &name,
                    Phase::Error,
                    format!("cannot connect to {url}: {e}"),
                )
                .await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let mut sub = match client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                set_state(
                    &state,
                    &ns,
                    &name,
                    Phase::Error,
                    format!("cannot subscribe to {subject}: {e}"),
                )
                .await;
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        set_state(&state, &ns, &name, Phase::Connected, String::new()).await;
        backoff = BACKOFF_FIRST;
        while let Some(msg) = sub.next().await {
            handle(
                &state,
                &ns,
                &name,
                &spec,
                msg.subject.as_str(),
                &msg.payload,
            )
            .await;
        }
        set_state(
            &state,
            &ns,
            &name,
            Phase::Error,
            "the subscription ended; resubscribing".into(),
        )
        .await;
        tokio::time::sleep(backoff).await;
    }
}

async fn run_mqtt(state: Arc<AppState>, ns: String, name: String, spec: EventDriverSpec) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let url = spec.config.get("url").cloned().unwrap_or_default();
    let topic = spec.config.get("topic").cloned().unwrap_or_default();
    let hostport = url.trim_start_matches("mqtt://").trim_end_matches('/');
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(1883)),
        None => (hostport.to_string(), 1883),
    };
    let mut opts = MqttOptions::new(
        format!("dispatch-{ns}-{name}-{}", std::process::id()),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut backoff = BACKOFF_FIRST;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // A clean session forgets subscriptions: subscribe on every connect.
                if let Err(e) = client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                    set_state(
                        &state,
                        &ns,
                        &name,
                        Phase::Error,
                        format!("cannot subscribe to {topic}: {e}"),
                    )
                    .await;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                set_state(&state, &ns, &name, Phase::Connected, String::new()).await;
                backoff = BACKOFF_FIRST;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                handle(&state, &ns, &name, &spec, &p.topic, &p.payload).await;
            }
            Ok(_) => {}
            Err(e) => {
                set_state(
                    &state,
                    &ns,
                    &name,
                    Phase::Error,
                    format!("MQTT connection to {url}: {e}"),
                )
                .await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Keeps one task per broker driver: starts new ones, stops deleted or changed ones.
pub fn spawn_supervisor(state: Arc<AppState>, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut running = Running::default();
        loop {
            let wanted: HashMap<(String, String), EventDriverSpec> =
                match state.db(|s| s.list(None, Kind::EventDriver)).await {
                    Ok(all) => all
                        .into_iter()
                        .filter_map(|o| {
                            let spec: EventDriverSpec = o.typed_spec().ok()?;
                            spec.is_broker()
                                .then(|| ((o.namespace().to_string(), o.name().to_string()), spec))
                        })
                        .collect(),
                    Err(_) => HashMap::new(),
                };
            {
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
                    let task = if spec.kind == "nats" {
                        tokio::spawn(run_nats(state.clone(), ns, name, spec.clone()))
                    } else {
                        tokio::spawn(run_mqtt(state.clone(), ns, name, spec.clone()))
                    };
                    r.insert(k, (spec, task.abort_handle()));
                }
            }
            wake.notified().await;
        }
    })
}
