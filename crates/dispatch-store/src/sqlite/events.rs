//! The SQL of events and their deliveries that does more than one statement: storing a batch
//! of events with their pending deliveries and runs, re-queuing dead deliveries, and
//! writing a delivery's state into its event's `matched` list.

use dispatch_core::Run;
use dispatch_core::events::{Delivery, DeliveryState, StoredEvent};
use jiff::Timestamp;
use rusqlite::params;

use super::ms_to_ts;
use super::runs::write_runs;
use crate::{DeliveryRecord, Redeliver, Result};

/// Stores events (a duplicate source and id: nothing of it), their pending deliveries and
/// their admitted runs inside `tx`; whether each event was stored.
pub(super) fn ingest(
    tx: &rusqlite::Transaction<'_>,
    batch: &[(StoredEvent, Vec<Run>)],
    replace: bool,
) -> Result<Vec<bool>> {
    let sql = if replace {
        "INSERT OR REPLACE INTO events (namespace, source, id, type, received_ms, expires_ms, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    } else {
        "INSERT OR IGNORE INTO events (namespace, source, id, type, received_ms, expires_ms, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    };
    let mut stored = Vec::with_capacity(batch.len());
    let mut runs: Vec<Run> = Vec::new();
    {
        let mut insert = tx.prepare_cached(sql)?;
        let mut pending = tx.prepare_cached(
            "INSERT INTO deliveries (namespace, subscription, function, source, event_id, idx,
                   state, attempts, received_ms, expires_ms, last_error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for (e, event_runs) in batch {
            let n = insert.execute(params![
                e.namespace,
                e.event.source,
                e.event.id,
                e.event.kind,
                e.received_at.as_millisecond(),
                e.expires_at.as_millisecond(),
                serde_json::to_string(e)?
            ])?;
            // A duplicate (source and id seen): nothing of it is stored.
            stored.push(n == 1);
            if n == 0 {
                continue;
            }
            runs.extend(event_runs.iter().cloned());
            for (i, d) in e.matched.iter().enumerate() {
                if d.state == DeliveryState::Queued {
                    continue;
                }
                pending.execute(params![
                    e.namespace,
                    d.subscription,
                    d.function,
                    e.event.source,
                    e.event.id,
                    i as i64,
                    d.state.as_str(),
                    d.attempts,
                    e.received_at.as_millisecond(),
                    e.expires_at.as_millisecond(),
                    d.error
                ])?;
            }
        }
    }
    write_runs(tx, &runs)?;
    Ok(stored)
}

/// Dead deliveries back to pending inside `tx` (their events' `matched` too); those moved.
pub(super) fn redeliver(
    tx: &rusqlite::Transaction<'_>,
    namespace: &str,
    which: &Redeliver,
    expires_at: Timestamp,
) -> Result<Vec<DeliveryRecord>> {
    let (subscription, id, source) = match which {
        Redeliver::Subscription(s) => (Some(s.as_str()), None, None),
        Redeliver::Event { id, source } => (None, Some(id.as_str()), source.as_deref()),
    };
    let dead: Vec<DeliveryRecord> = {
        let mut stmt = tx.prepare(
            "UPDATE deliveries SET state = 'PENDING', attempts = 0, expires_ms = ?5,
                   last_error = NULL
                 WHERE namespace = ?1 AND state = 'DEAD' AND (?2 IS NULL OR subscription = ?2)
                   AND (?3 IS NULL OR event_id = ?3) AND (?4 IS NULL OR source = ?4)
                 RETURNING seq, subscription, function, source, event_id, idx, received_ms",
        )?;
        let rows = stmt.query_map(
            params![
                namespace,
                subscription,
                id,
                source,
                expires_at.as_millisecond()
            ],
            |r| {
                Ok(DeliveryRecord {
                    seq: r.get(0)?,
                    namespace: namespace.to_string(),
                    subscription: r.get(1)?,
                    function: r.get(2)?,
                    source: r.get(3)?,
                    event_id: r.get(4)?,
                    index: r.get::<_, i64>(5)? as usize,
                    state: DeliveryState::Pending,
                    attempts: 0,
                    received_at: ms_to_ts(r.get(6)?),
                    expires_at,
                    last_error: None,
                })
            },
        )?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for d in &dead {
        set_matched(tx, d, &d.delivery())?;
    }
    Ok(dead)
}

/// Writes one delivery into its event's `matched` (at the delivery's place).
pub(super) fn set_matched(
    tx: &rusqlite::Transaction<'_>,
    d: &DeliveryRecord,
    delivery: &Delivery,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE events SET body = json_set(body, '$.matched[' || ?4 || ']', json(?5))
         WHERE namespace = ?1 AND source = ?2 AND id = ?3",
    )?
    .execute(params![
        d.namespace,
        d.source,
        d.event_id,
        d.index as i64,
        serde_json::to_string(delivery)?
    ])?;
    Ok(())
}
