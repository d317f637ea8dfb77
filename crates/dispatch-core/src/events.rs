//! Events (DESIGN §6): CloudEvents 1.0, subscriptions that turn matching events into async
//! runs, and event drivers (cron, webhook; brokers later) that produce events or runs.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{Timestamp, Zoned};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ValidationError;

/// A CloudEvent 1.0 (structured JSON form). Extension attributes are kept as they come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    #[serde(default)]
    pub specversion: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub source: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(flatten)]
    pub extensions: BTreeMap<String, Value>,
}

impl CloudEvent {
    /// Checks the required attributes (CloudEvents 1.0 §3.1), naming the first one missing.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (name, v) in [
            ("specversion", &self.specversion),
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.kind),
        ] {
            if v.trim().is_empty() {
                return Err(ValidationError::new(format!(
                    "CloudEvent attribute {name:?} is required"
                )));
            }
        }
        if self.specversion != "1.0" {
            return Err(ValidationError::new(format!(
                "CloudEvent specversion {:?} is not supported: use \"1.0\"",
                self.specversion
            )));
        }
        if let Some(t) = &self.time {
            t.parse::<Timestamp>().map_err(|e| {
                ValidationError::new(format!(
                    "CloudEvent attribute \"time\" is not RFC 3339: {e}"
                ))
            })?;
        }
        Ok(())
    }

    /// The event without its data: what handlers get as `context.event`.
    pub fn attributes(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(m) = v.as_object_mut() {
            m.remove("data");
        }
        v
    }
}

/// An event as stored: the event, when it arrived, and which subscriptions it matched —
/// each with its delivery: a queued run, or waiting for room in its function's queue, or
/// dead (DESIGN §6: an accepted event is delivered or lands somewhere visible).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    pub namespace: String,
    pub event: CloudEvent,
    pub received_at: Timestamp,
    /// Subscriptions it matched (and a driver's own function), each with its delivery.
    #[serde(default)]
    pub matched: Vec<Delivery>,
    pub expires_at: Timestamp,
    /// Stored but not yet handed to its subscriptions: only events stored by a server from
    /// before deliveries were stored with their event (start-up hands them over).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

impl StoredEvent {
    /// Whether any delivery is not queued (pending or dead).
    pub fn undelivered(&self) -> bool {
        self.matched
            .iter()
            .any(|d| d.state != DeliveryState::Queued)
    }
}

/// One matched subscription's delivery of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The subscription (`driver/NAME` for a driver that names its function itself).
    pub subscription: String,
    pub function: String,
    #[serde(default)]
    pub state: DeliveryState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Why it is not queued yet (the last refusal), or why it died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Tries to queue its run that were refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Its run is queued (`runId`): from here the queue's retries and dead letters apply.
    #[default]
    Queued,
    /// Its function's queue had no room: retried with back-off, in arrival order per
    /// subscription, until it is queued or the event's TTL ends.
    Pending,
    /// Not queued before the event's TTL ended: kept and listed until redelivered (or its
    /// retention ends).
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "QUEUED",
            DeliveryState::Pending => "PENDING",
            DeliveryState::Dead => "DEAD",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryState> {
        Some(match s {
            "QUEUED" => DeliveryState::Queued,
            "PENDING" => DeliveryState::Pending,
            "DEAD" => DeliveryState::Dead,
            _ => return None,
        })
    }
}

/// A subscription's deliveries (`GET …/subscriptions/{name}/deliveries`): pending and dead
/// now, and queued and retried since the server started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStats {
    pub pending: u64,
    pub dead: u64,
    pub queued: u64,
    pub retried: u64,
    /// Age of the oldest pending delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_seconds: Option<f64>,
}

/// `eventType` exact (`order.created`) or a prefix (`order.*`, `*`).
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

fn validate_type_pattern(t: &str, field: &str) -> Result<(), ValidationError> {
    let bad = t.is_empty()
        || t.contains(char::is_whitespace)
        || t[..t.len().saturating_sub(1)].contains('*');
    if bad {
        return Err(ValidationError::new(format!(
            "{field} {t:?} is not valid: an event type (order.created) or a prefix ending in * (order.*)"
        )));
    }
    Ok(())
}

/// Turns the CloudEvents that match it into async runs of a function (payload: the event's
/// data; `context.event`: its attributes), each event delivered once per subscription.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// The event type it matches: exact (`order.created`) or a prefix ending in `*`
    /// (`order.*`).
    pub event_type: String,
    /// Only events of this source (absent: any source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The function (same namespace) it runs.
    pub function: String,
}

impl SubscriptionSpec {
    pub(crate) fn normalize(self) -> Result<Self, ValidationError> {
        validate_type_pattern(&self.event_type, "eventType")?;
        crate::versions::validate_target(&self.function)?;
        Ok(self)
    }

    pub fn matches(&self, e: &CloudEvent) -> bool {
        type_matches(&self.event_type, &e.kind)
            && self.source.as_deref().is_none_or(|s| s == e.source)
    }
}

/// What to do with cron fires missed while the server was down.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissedRuns {
    /// Drop them.
    #[default]
    Skip,
    /// One fire at start-up if any were missed.
    Once,
    /// Every missed fire (at most [`MAX_CATCH_UP`]).
    All,
}

/// Most missed fires replayed by `missedRuns: all`.
pub const MAX_CATCH_UP: usize = 1000;

/// Produces events (or runs of one function): on a schedule (cron), from HTTP requests
/// (webhook) or from a broker (nats, mqtt, kafka; at least once).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventDriverSpec {
    /// cron | webhook | nats | mqtt | kafka
    #[serde(rename = "type")]
    pub kind: String,
    /// The event type it emits (subscriptions pick it up)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// …or the function it runs directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// cron: 5 fields, 6 with seconds, `@hourly`-style macros, or `@every 30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// cron: an IANA time zone (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "is_skip")]
    pub missed_runs: MissedRuns,
    /// webhook: the gateway path that turns requests into events (`/hooks/github`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Driver-specific settings. nats: url, subject, and stream (+ durable) for a JetStream
    /// durable consumer; mqtt: url, topic; kafka: brokers, topic, group, offset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

fn is_skip(m: &MissedRuns) -> bool {
    *m == MissedRuns::Skip
}

impl EventDriverSpec {
    /// A driver that keeps a connection to a broker (NATS, MQTT, Kafka); its connection
    /// sets its phase (CONNECTED/ERROR).
    pub fn is_broker(&self) -> bool {
        matches!(self.kind.as_str(), "nats" | "mqtt" | "kafka")
    }

    pub(crate) fn normalize(self) -> Result<Self, ValidationError> {
        let broker = self.is_broker();
        match (&self.event_type, &self.function) {
            (Some(t), None) => validate_type_pattern(t, "eventType")?,
            (None, Some(f)) => crate::versions::validate_target(f)?,
            // Brokers: the subject (NATS) or topic (MQTT) is the event type.
            (None, None) if broker => {}
            _ => {
                return Err(ValidationError::new(
                    "an event driver emits events (eventType) or runs a function (function): give exactly one",
                ));
            }
        }
        if self.event_type.as_deref().is_some_and(|t| t.ends_with('*')) {
            return Err(ValidationError::new(
                "an event driver emits one event type, not a prefix",
            ));
        }
        match self.kind.as_str() {
            "cron" => {
                let schedule = self.schedule.as_deref().ok_or_else(|| {
                    ValidationError::new(
                        "a cron driver needs a schedule (--schedule \"*/5 * * * *\")",
                    )
                })?;
                let tz = self.timezone.as_deref().unwrap_or("UTC");
                Schedule::parse(schedule, tz)?;
            }
            "webhook" => {
                let p = self.path.as_deref().unwrap_or("");
                if !p.starts_with('/')
                    || p.contains(char::is_whitespace)
                    || p.contains('{')
                    || p.contains('*')
                {
                    return Err(ValidationError::new(format!(
                        "a webhook driver needs a literal gateway path such as /hooks/github, not {p:?}"
                    )));
                }
            }
            "nats" | "mqtt" => {
                let (scheme, what) = if self.kind == "nats" {
                    ("nats://", "subject")
                } else {
                    ("mqtt://", "topic")
                };
                let url = self.config.get("url").map(String::as_str).unwrap_or("");
                if !url.starts_with(scheme) {
                    return Err(ValidationError::new(format!(
                        "a {} driver needs config.url = {scheme}host:port (--config url={scheme}127.0.0.1:…)",
                        self.kind
                    )));
                }
                if self.config.get(what).is_none_or(|s| s.trim().is_empty()) {
                    return Err(ValidationError::new(format!(
                        "a {} driver needs config.{what} (the {what} to subscribe to)",
                        self.kind
                    )));
                }
            }
            "kafka" => {
                let brokers = self.config.get("brokers").map(String::as_str).unwrap_or("");
                if brokers.is_empty()
                    || brokers.split(',').any(|b| {
                        b.trim()
                            .rsplit_once(':')
                            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                    })
                {
                    return Err(ValidationError::new(
                        "a kafka driver needs config.brokers = host:port[,host:port…] (--config brokers=127.0.0.1:9092)",
                    ));
                }
                if self.config.get("topic").is_none_or(|s| s.trim().is_empty()) {
                    return Err(ValidationError::new(
                        "a kafka driver needs config.topic (the topic to consume)",
                    ));
                }
                if let Some(o) = self.config.get("offset")
                    && o != "earliest"
                    && o != "latest"
                {
                    return Err(ValidationError::new(format!(
                        "config.offset {o:?}: where a new consumer starts is earliest or latest"
                    )));
                }
            }
            other => {
                return Err(ValidationError::new(format!(
                    "event driver type {other:?} is not known: use cron, webhook, nats, mqtt or kafka"
                )));
            }
        }
        Ok(self)
    }
}

/// A cron schedule in a time zone, or a fixed interval.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        cron: Box<croner::Cron>,
        tz: jiff::tz::TimeZone,
    },
    Every(Duration),
}

const FIELD_NAMES: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day of month",
    "month",
    "day of week",
];

impl Schedule {
    /// Parses a schedule; errors say which field is wrong.
    pub fn parse(schedule: &str, timezone: &str) -> Result<Schedule, ValidationError> {
        let s = schedule.trim();
        if let Some(d) = s.strip_prefix("@every") {
            let d = crate::duration::parse_duration(d.trim())
                .map_err(|e| ValidationError::new(format!("schedule {s:?}: {}", e.message)))?;
            if d < Duration::from_secs(1) {
                return Err(ValidationError::new(format!(
                    "schedule {s:?}: @every needs at least 1s"
                )));
            }
            return Ok(Schedule::Every(d));
        }
        let tz = jiff::tz::TimeZone::get(timezone).map_err(|_| {
            ValidationError::new(format!(
                "timezone {timezone:?} is not a known IANA time zone (e.g. Europe/Oslo)"
            ))
        })?;
        let fields: Vec<&str> = s.split_whitespace().collect();
        if !s.starts_with('@') && !(5..=6).contains(&fields.len()) {
            return Err(ValidationError::new(format!(
                "schedule {s:?} has {} fields: use 5 (minute hour day month weekday), 6 with seconds first, or @hourly/@daily/@every 30s",
                fields.len()
            )));
        }
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build();
        let cron = parser.parse(s).map_err(|e| {
            // Find the field at fault by parsing each on its own within a neutral pattern.
            let offset = if fields.len() == 6 { 0 } else { 1 };
            let culprit = fields.iter().enumerate().find(|(i, f)| {
                let mut probe = ["0", "0", "0", "1", "1", "*"];
                probe[i + offset] = f;
                parser.parse(&probe.join(" ")).is_err()
            });
            match culprit {
                Some((i, f)) => ValidationError::new(format!(
                    "schedule {s:?}: field {} ({}) {f:?} is not valid: {e}",
                    i + 1,
                    FIELD_NAMES[i + offset]
                )),
                None => ValidationError::new(format!("schedule {s:?} is not valid: {e}")),
            }
        })?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            tz,
        })
    }

    /// The first fire strictly after `after`.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every(d) => {
                // Aligned to the epoch, like a clock: every 30s fires at :00 and :30.
                let step = i64::try_from(d.as_millis()).ok()?.max(1);
                let ms = after.as_millisecond();
                Timestamp::from_millisecond((ms.div_euclid(step) + 1) * step).ok()
            }
            Schedule::Cron { cron, tz } => {
                let z: Zoned = after.to_zoned(tz.clone());
                cron.find_next_occurrence(&z, false)
                    .ok()
                    .map(|n| n.timestamp())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn types_match_exactly_or_by_prefix() {
        assert!(type_matches("order.created", "order.created"));
        assert!(!type_matches("order.created", "order.created.v2"));
        assert!(type_matches("order.*", "order.created"));
        assert!(type_matches("*", "anything"));
        assert!(!type_matches("order.*", "orders.x"));
    }

    #[test]
    fn cloudevents_need_their_attributes() {
        let mut e: CloudEvent = serde_json::from_value(serde_json::json!({
            "specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": {"a": 1}, "traceparent": "x"
        }))
        .unwrap();
        e.validate().unwrap();
        assert_eq!(e.extensions["traceparent"], "x");
        assert!(e.attributes().get("data").is_none());
        e.source.clear();
        assert!(
            e.validate()
                .unwrap_err()
                .message
                .contains("\"source\" is required")
        );
    }

    #[test]
    fn schedules_parse_and_fire_in_their_time_zone() {
        let s = Schedule::parse("*/5 * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-01T10:02:00Z")),
            Some(ts("2026-01-01T10:05:00Z"))
        );
        let s = Schedule::parse("30 * * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-01T10:00:00Z")),
            Some(ts("2026-01-01T10:00:30Z"))
        );
        let s = Schedule::parse("@hourly", "UTC").unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-01T10:00:00Z")),
            Some(ts("2026-01-01T11:00:00Z"))
        );
        let s = Schedule::parse("@every 30s", "UTC").unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-01T10:00:10Z")),
            Some(ts("2026-01-01T10:00:30Z"))
        );
        // 02:30 every day in Oslo: across the spring-forward night (2026-03-29, 02:00 → 03:00)
        // the local time does not exist; the next fire is the following day.
        let s = Schedule::parse("30 2 * * *", "Europe/Oslo").unwrap();
        let before = ts("2026-03-28T01:30:00Z"); // 02:30 CET on the 28th
        assert_eq!(s.next_after(ts("2026-03-28T00:00:00Z")), Some(before));
        let next = s.next_after(before).unwrap();
        assert!(
            next >= ts("2026-03-29T00:30:00Z") && next <= ts("2026-03-30T00:30:00Z"),
            "{next}"
        );
        // 09:00 Oslo is 08:00 UTC in winter, 07:00 UTC in summer.
        let s = Schedule::parse("0 9 * * *", "Europe/Oslo").unwrap();
        assert_eq!(
            s.next_after(ts("2026-03-28T12:00:00Z")),
            Some(ts("2026-03-29T07:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_say_where() {
        let e = Schedule::parse("*/5 25 * * *", "UTC").unwrap_err();
        assert!(e.message.contains("field 2 (hour)"), "{e}");
        let e = Schedule::parse("* * *", "UTC").unwrap_err();
        assert!(e.message.contains("has 3 fields"), "{e}");
        assert!(
            Schedule::parse("* * * * *", "Mars/Olympus")
                .unwrap_err()
                .message
                .contains("time zone")
        );
        assert!(Schedule::parse("@every 10ms", "UTC").is_err());
    }
}
