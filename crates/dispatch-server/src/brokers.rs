//! Broker event drivers (DESIGN §6): a NATS subject, an MQTT topic filter or a Kafka topic
//! whose messages become events (type = the subject / topic, or the driver's `eventType`) or
//! runs of the driver's function. Each driver is a task that connects, subscribes,
//! reconnects with back-off, and reports CONNECTED or ERROR (with the reason) in its status.
//! Messages are handled one at a time, so runs are enqueued in the broker's order.
//!
//! At least once (issue 27): a JetStream durable consumer, an MQTT QoS 1 persistent session
//! and a Kafka partition consumer acknowledge (ack, PUBACK, stored offset) only after the
//! message's event is stored with its deliveries, and pause under back-pressure instead of
//! dropping. Core NATS (no `stream`) is at most once, as NATS itself is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::events::EventDriverSpec;
use dispatch_core::{Kind, Phase, Status};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::error::ApiError;
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
        .res(move |s| s.update_status(&n, Kind::EventDriver, &m, st))
        .await;
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
) -> Result<(), ApiError> {
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
fn passes(e: &ApiError) -> bool {
    matches!(e.status.as_u16(), 429 | 503 | 507) || e.status.is_server_error()
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
    let mut backoff = BACKOFF_FIRST;
    loop {
        match handle(state, ns, name, spec, channel, payload, Some(id.clone())).await {
            Ok(()) => return true,
            Err(e) if passes(&e) => {
                tracing::debug!(driver = %name, "message from {channel} waits: {}", e.message);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                tracing::warn!(driver = %name, "message from {channel} refused: {}", e.message);
                return false;
            }
        }
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
        if let Some(stream) = spec.config.get("stream") {
            let reason = match run_jetstream(&state, (&ns, &name), &spec, client, stream).await {
                Ok(()) => "the JetStream consumer ended; consuming again".to_string(),
                Err(e) => e,
            };
            set_state(&state, &ns, &name, Phase::Error, reason).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
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
            // Core NATS is at most once: a message refused for good is gone (log only).
            offer(
                &state,
                (&ns, &name),
                &spec,
                msg.subject.as_str(),
                &msg.payload,
                None,
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

/// A JetStream durable pull consumer (`config.stream`, `config.durable`, default
/// `dispatch-NS-NAME`): one message in flight (max_ack_pending 1, so runs are queued in the
/// stream's order), acknowledged only once its event is stored with its deliveries; under
/// back-pressure it is nak'd with a delay (redelivered then, nothing overtakes it). The
/// event id is `STREAM-SEQUENCE`, so a message redelivered after a crash between the commit
/// and the ack is a duplicate that is not delivered twice.
async fn run_jetstream(
    state: &Arc<AppState>,
    driver: (&str, &str),
    spec: &EventDriverSpec,
    client: async_nats::Client,
    stream: &str,
) -> Result<(), String> {
    use async_nats::jetstream::{self, AckKind, consumer};
    let (ns, name) = driver;
    let subject = spec.config.get("subject").cloned().unwrap_or_default();
    let durable = spec
        .config
        .get("durable")
        .cloned()
        .unwrap_or_else(|| format!("dispatch-{ns}-{name}"));
    let js = jetstream::new(client);
    let st = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("JetStream stream {stream:?}: {e}"))?;
    let consumer: consumer::PullConsumer = st
        .get_or_create_consumer(
            &durable,
            consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: subject.clone(),
                ack_policy: consumer::AckPolicy::Explicit,
                // A message unacknowledged this long (its server died) comes again; the
                // ingest it waits for takes milliseconds (back-pressure is a nak).
                ack_wait: Duration::from_secs(5),
                max_ack_pending: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("JetStream consumer {durable:?} on {stream:?}: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("consuming {durable:?}: {e}"))?;
    set_state(state, ns, name, Phase::Connected, String::new()).await;
    let mut backoff = BACKOFF_FIRST;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| format!("JetStream consumer {durable:?}: {e}"))?;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
        let id = format!("{stream}-{seq}");
        match handle(
            state,
            ns,
            name,
            spec,
            m.subject.as_str(),
            &m.payload,
            Some(id),
        )
        .await
        {
            Ok(()) => {
                backoff = BACKOFF_FIRST;
                m.ack()
                    .await
                    .map_err(|e| format!("acknowledging {stream} #{seq}: {e}"))?;
            }
            Err(e) if passes(&e) => {
                tracing::debug!(driver = %name, "JetStream message {seq} waits: {}", e.message);
                m.ack_with(AckKind::Nak(Some(backoff)))
                    .await
                    .map_err(|e| format!("nak of {stream} #{seq}: {e}"))?;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                tracing::warn!(driver = %name, "JetStream message {seq} refused: {}", e.message);
                m.ack_with(AckKind::Term)
                    .await
                    .map_err(|e| format!("terminating {stream} #{seq}: {e}"))?;
            }
        }
    }
    Ok(())
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
    // QoS 1 in a persistent session: the client id is the driver's (the same after a
    // restart), the broker keeps the subscription and every message not acknowledged, and
    // the PUBACK goes only once the message's event is stored (manual acks).
    let mut opts = MqttOptions::new(
        spec.config
            .get("clientId")
            .cloned()
            .unwrap_or_else(|| format!("dispatch-{ns}-{name}")),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut backoff = BACKOFF_FIRST;
    // Messages read and not yet offered, and the message whose PUBACK is on its way out:
    // the next one is offered only once that PUBACK is written, so that at a crash at most
    // one stored message is unacknowledged (the broker sends it again: a duplicate run).
    // The client reads packets in batches, and acknowledgements it has not written yet
    // would otherwise pile up behind them.
    let mut backlog: std::collections::VecDeque<rumqttc::Publish> = Default::default();
    let mut acking: Option<u16> = None;
    loop {
        if acking.is_none()
            && let Some(p) = backlog.pop_front()
        {
            // Back-pressure waits here (the broker holds the session's other messages).
            let id = mqtt_event_id(&state, (&ns, &name), &p).await;
            offer(&state, (&ns, &name), &spec, &p.topic, &p.payload, id).await;
            if p.qos != QoS::AtMostOnce {
                match client.try_ack(&p) {
                    Ok(()) => acking = Some(p.pkid),
                    Err(e) => tracing::warn!(driver = %name, "acknowledging an MQTT message: {e}"),
                }
            }
            continue;
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Subscribed on every connect (a session the broker lost has none).
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
            Ok(Event::Incoming(Packet::Publish(p))) => backlog.push_back(p),
            Ok(Event::Outgoing(rumqttc::Outgoing::PubAck(pkid))) if acking == Some(pkid) => {
                acking = None;
            }
            Ok(_) => {}
            Err(e) => {
                // What was read and not acknowledged comes again with the session.
                backlog.clear();
                acking = None;
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

/// A Kafka topic, every partition (`config.brokers`, `config.topic`, `config.group`
/// naming the cursor, default `dispatch-NS-NAME`; `config.offset` where a new one starts:
/// earliest, the default, or latest). Offsets are kept in our store, advanced only after
/// the records' events are stored with their deliveries; the event id is
/// `TOPIC-PARTITION-OFFSET`, so a record read again after a crash between the two writes is
/// a duplicate that is not delivered twice. Under back-pressure a partition's consumption
/// pauses (the record is offered again with back-off).
async fn run_kafka(state: Arc<AppState>, ns: String, name: String, spec: EventDriverSpec) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let reason = match consume_kafka(&state, (&ns, &name), &spec).await {
            Ok(()) => "the Kafka consumer ended; consuming again".to_string(),
            Err(e) => e,
        };
        set_state(&state, &ns, &name, Phase::Error, reason).await;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn consume_kafka(
    state: &Arc<AppState>,
    driver: (&str, &str),
    spec: &EventDriverSpec,
) -> Result<(), String> {
    use rskafka::client::ClientBuilder;
    use rskafka::client::partition::UnknownTopicHandling;
    let (ns, name) = driver;
    let brokers: Vec<String> = spec
        .config
        .get("brokers")
        .map(|b| b.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    let topic = spec.config.get("topic").cloned().unwrap_or_default();
    let client = ClientBuilder::new(brokers.clone())
        .build()
        .await
        .map_err(|e| format!("cannot connect to Kafka at {}: {e}", brokers.join(",")))?;
    let partitions = client
        .list_topics()
        .await
        .map_err(|e| format!("listing Kafka topics: {e}"))?
        .into_iter()
        .find(|t| t.name == topic)
        .map(|t| t.partitions)
        .ok_or_else(|| format!("Kafka topic {topic:?} does not exist"))?;
    let mut tasks = tokio::task::JoinSet::new();
    for p in partitions {
        let pc = client
            .partition_client(topic.clone(), p, UnknownTopicHandling::Retry)
            .await
            .map_err(|e| format!("Kafka partition {topic}/{p}: {e}"))?;
        let (state, spec) = (state.clone(), spec.clone());
        let (ns, name) = (ns.to_string(), name.to_string());
        tasks.spawn(async move { consume_partition(&state, (&ns, &name), &spec, pc).await });
    }
    set_state(state, ns, name, Phase::Connected, String::new()).await;
    // The first partition that fails ends them all (the caller reconnects).
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(format!("a Kafka partition consumer stopped: {e}")),
        None => Ok(()),
    }
}

async fn consume_partition(
    state: &Arc<AppState>,
    driver: (&str, &str),
    spec: &EventDriverSpec,
    pc: rskafka::client::partition::PartitionClient,
) -> Result<(), String> {
    use rskafka::client::partition::OffsetAt;
    let (ns, name) = driver;
    let (topic, partition) = (pc.topic().to_string(), pc.partition());
    let group = spec
        .config
        .get("group")
        .cloned()
        .unwrap_or_else(|| format!("dispatch-{ns}-{name}"));
    let key = format!("{group}/{topic}/{partition}");
    let (n, d, k) = (ns.to_string(), name.to_string(), key.clone());
    let stored = state
        .db(move |s| s.driver_cursor(&n, &d, &k))
        .await
        .map_err(|e| e.message)?;
    let mut offset = match stored {
        Some(o) => o,
        None => {
            let at = match spec.config.get("offset").map(String::as_str) {
                Some("latest") => OffsetAt::Latest,
                _ => OffsetAt::Earliest,
            };
            pc.get_offset(at)
                .await
                .map_err(|e| format!("offset of {topic}/{partition}: {e}"))?
        }
    };
    loop {
        let (records, _high) = pc
            .fetch_records(offset, 1..4 * 1024 * 1024, 500)
            .await
            .map_err(|e| format!("fetching {topic}/{partition} at {offset}: {e}"))?;
        let before = offset;
        // A fetch may start inside a batch: records before the offset are skipped.
        for r in records.into_iter().filter(|r| r.offset >= before) {
            let payload = r.record.value.unwrap_or_default();
            let id = format!("{topic}-{partition}-{}", r.offset);
            offer(state, driver, spec, &topic, &payload, Some(id)).await;
            offset = r.offset + 1;
        }
        if offset != before {
            let (n, d, k) = (ns.to_string(), name.to_string(), key.clone());
            state
                .db(move |s| s.set_driver_cursor(&n, &d, &k, offset))
                .await
                .map_err(|e| format!("storing the offset of {topic}/{partition}: {}", e.message))?;
        }
    }
}

/// A stable event id for an MQTT message, so that the one message stored but not yet
/// acknowledged at a crash, which the broker sends again (DUP set, same packet id, topic and
/// payload), is dropped as a duplicate instead of running twice. MQTT 3.1.1 messages carry no
/// id: the driver numbers them itself ([`mqtt_sequence`]) before offering them. None (a fresh
/// id) when the store cannot be read or written.
async fn mqtt_event_id(
    state: &Arc<AppState>,
    driver: (&str, &str),
    p: &rumqttc::Publish,
) -> Option<String> {
    let key = mqtt_key(p);
    let (ns, name, dup) = (driver.0.to_string(), driver.1.to_string(), p.dup);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let seq = state
        .db(move |s| mqtt_sequence(s, (&ns, &name), key, dup, now))
        .await
        .ok()?;
    Some(format!("mqtt-{}-{}-{seq}", driver.0, driver.1))
}

/// What identifies a redelivered MQTT message: its packet id, topic and payload (15 hex
/// digits of their digest fit an i64 cursor; a collision would need a DUP redelivery too).
fn mqtt_key(p: &rumqttc::Publish) -> i64 {
    let digest = dispatch_core::digest::sha256_parts([
        p.pkid.to_be_bytes().as_slice(),
        p.topic.as_bytes(),
        p.payload.as_ref(),
    ]);
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    i64::from_str_radix(&hex[..15], 16).unwrap_or_default()
}

/// The number of an MQTT message: a redelivery (`dup`) of the last message numbered gets
/// its number again, any other message the next one. The number and the message's key are
/// stored before the message is offered. Numbering starts at the clock (`now`, µs), so a
/// driver deleted and created again never reuses an id of its earlier self.
fn mqtt_sequence(
    s: &dyn dispatch_store::RecordStore,
    driver: (&str, &str),
    key: i64,
    dup: bool,
    now: i64,
) -> Result<i64, dispatch_store::StoreError> {
    let (ns, name) = driver;
    let last_key = s.driver_cursor(ns, name, "mqtt/last-key")?;
    let last_seq = s.driver_cursor(ns, name, "mqtt/last-seq")?;
    if let (true, Some(seq)) = (dup && last_key == Some(key), last_seq) {
        return Ok(seq);
    }
    let seq = last_seq.map_or(now, |l| (l + 1).max(now));
    // The number first: a crash between the two writes gives the redelivery a new number
    // (it runs twice), never the previous message's (it would be dropped as a duplicate).
    s.set_driver_cursor(ns, name, "mqtt/last-seq", seq)?;
    s.set_driver_cursor(ns, name, "mqtt/last-key", key)?;
    Ok(seq)
}

/// Keeps one task per broker driver: starts new ones, stops deleted or changed ones.
pub fn spawn_supervisor(state: Arc<AppState>, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut running = Running::default();
        loop {
            let wanted: HashMap<(String, String), EventDriverSpec> =
                match state.res(|s| s.list(None, Kind::EventDriver)).await {
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
                    let task = match spec.kind.as_str() {
                        "nats" => tokio::spawn(run_nats(state.clone(), ns, name, spec.clone())),
                        "kafka" => tokio::spawn(run_kafka(state.clone(), ns, name, spec.clone())),
                        _ => tokio::spawn(run_mqtt(state.clone(), ns, name, spec.clone())),
                    };
                    r.insert(k, (spec, task.abort_handle()));
                }
            }
            wake.notified().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatch_store::{RecordStore, SqliteStore};

    fn publish(pkid: u16, payload: &str, dup: bool) -> rumqttc::Publish {
        let mut p = rumqttc::Publish::new(
            "t/1",
            rumqttc::QoS::AtLeastOnce,
            payload.as_bytes().to_vec(),
        );
        p.pkid = pkid;
        p.dup = dup;
        p
    }

    #[test]
    fn an_mqtt_redelivery_of_the_message_in_flight_keeps_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("d.db")).unwrap();
        let d = ("ns", "m");
        let number = |p: &rumqttc::Publish, now| mqtt_sequence(&s, d, mqtt_key(p), p.dup, now);
        let first = number(&publish(1, "a", false), 1_000).unwrap();
        assert_eq!(first, 1_000, "numbering starts at the clock");
        let second = number(&publish(2, "b", false), 1_000).unwrap();
        assert_eq!(second, 1_001);
        // The broker sends the unacknowledged message again after a crash: same number.
        assert_eq!(number(&publish(2, "b", true), 5_000).unwrap(), second);
        // A DUP of anything else (another packet id or payload) is a new message.
        assert_eq!(number(&publish(3, "b", true), 1_000).unwrap(), 1_002);
        assert_eq!(number(&publish(3, "c", true), 1_000).unwrap(), 1_003);
        // The same packet id, topic and payload without DUP is a new message too.
        assert_eq!(number(&publish(3, "c", false), 1_000).unwrap(), 1_004);
        // A driver deleted and created again numbers from the clock, past its earlier ids.
        s.forget_driver("ns", "m").unwrap();
        assert_eq!(number(&publish(1, "a", false), 9_000).unwrap(), 9_000);
        // A clock stepped back never reuses a number.
        assert_eq!(number(&publish(2, "a", false), 10).unwrap(), 9_001);
    }
}
