//! MQTT drivers: QoS 1 in a persistent session (a stable client id, PUBACK only after the
//! message's event is stored) and stable event ids numbered in the store, so a message
//! redelivered after a crash does not run twice.

use std::sync::Arc;
use std::time::Duration;

use dispatch_core::Phase;
use dispatch_core::events::EventDriverSpec;

use super::{Backoff, failed, offer, set_state};
use crate::state::AppState;

pub(super) async fn run_mqtt(
    state: Arc<AppState>,
    ns: String,
    name: String,
    spec: EventDriverSpec,
) {
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
    let mut backoff = Backoff::new();
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
                backoff.reset();
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
                let reason = format!("MQTT connection to {url}: {e}");
                failed(&state, (&ns, &name), reason, &mut backoff).await;
            }
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
