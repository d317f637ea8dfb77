//! Kafka drivers: every partition of a topic consumed with rskafka, offsets kept in our
//! store (`driver_cursors`) and written after the message's event is stored.

use std::sync::Arc;
use std::time::Duration;

use dispatch_core::Phase;
use dispatch_core::events::EventDriverSpec;

use super::{Backoff, failed, offer, set_state};
use crate::state::AppState;

/// A Kafka topic, every partition (`config.brokers`, `config.topic`, `config.group`
/// naming the cursor, default `dispatch-NS-NAME`; `config.offset` where a new one starts:
/// earliest, the default, or latest). Offsets are kept in our store, advanced only after
/// the records' events are stored with their deliveries; the event id is
/// `TOPIC-PARTITION-OFFSET`, so a record read again after a crash between the two writes is
/// a duplicate that is not delivered twice. Under back-pressure a partition's consumption
/// pauses (the record is offered again with back-off).
/// How long rskafka retries one request (connecting included) before the driver reports
/// ERROR and reconnects with its own back-off. rskafka's default retries forever with waits
/// that triple up to 500 s: a broker that was slow to answer at first left the driver with no
/// status for minutes.
const KAFKA_RETRY_DEADLINE: Duration = Duration::from_secs(5);

pub(super) async fn run_kafka(
    state: Arc<AppState>,
    ns: String,
    name: String,
    spec: EventDriverSpec,
) {
    let mut backoff = Backoff::new();
    loop {
        let reason = match consume_kafka(&state, (&ns, &name), &spec).await {
            Ok(()) => "the Kafka consumer ended; consuming again".to_string(),
            Err(e) => e,
        };
        failed(&state, (&ns, &name), reason, &mut backoff).await;
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
        .backoff_config(rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
            deadline: Some(KAFKA_RETRY_DEADLINE),
        })
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
        .map_err(|e| e.to_string())?;
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
                .map_err(|e| format!("storing the offset of {topic}/{partition}: {e}"))?;
        }
    }
}
