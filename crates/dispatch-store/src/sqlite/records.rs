//! [`RecordStore`] on SQLite: runs (their SQL in `runs`), job executions, events and their
//! deliveries, drivers' cursors and cron state, tokens and the audit log.

use dispatch_core::auth::{ApiToken, AuditEntry};
use dispatch_core::events::{Delivery, DeliveryState, StoredEvent};
use dispatch_core::versions::FunctionVersion;
use dispatch_core::{JobExecution, Run, RunStatus};
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::chunks;
use super::events;
use super::runs::{
    USAGE_PER_FUNCTION, USAGE_PER_NAMESPACE, count, list_runs_sql, usage_rows, write_runs,
};
use super::{DELETE_BATCH, PURGE_COMPACT_PAGES, SqliteStore, ms_to_ts};
use crate::{
    DeliveryCount, DeliveryRecord, FunctionUsage, RecordStore, Redeliver, Result, Retention,
    RunFilter, RunUsage,
};

impl RecordStore for SqliteStore {
    fn reclaim(&self) -> u64 {
        let conn = self.conn();
        // At most once a second: a flood of refused calls must not checkpoint each time.
        let due = self
            .truncated
            .lock()
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if due {
            self.truncate_wal(&conn);
        }
        let pragma = |name: &str| {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
                .unwrap_or(0)
                .max(0) as u64
        };
        pragma("freelist_count") * pragma("page_size")
    }

    fn put_runs(&self, runs: &[Run]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        write_runs(&tx, runs)?;
        tx.commit()?;
        Ok(())
    }

    fn get_run(&self, namespace: &str, id: &str) -> Result<Option<Run>> {
        let row = self.body(
            "SELECT body FROM runs WHERE namespace = ?1 AND id = ?2",
            params![namespace, id],
        )?;
        match row {
            Some(run) => Ok(Some(run)),
            None => chunks::get(&self.conn(), namespace, id),
        }
    }

    fn list_runs(&self, namespace: &str, filter: &RunFilter) -> Result<Vec<Run>> {
        let conn = self.conn();
        let (sql, args) = list_runs_sql(namespace, filter);
        let mut found: Vec<(String, Vec<u8>)> = {
            let mut stmt = conn.prepare_cached(&sql)?;
            stmt.query_map(rusqlite::params_from_iter(args), |r| {
                Ok((r.get(0)?, r.get::<_, String>(1)?.into_bytes()))
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        let from_chunks = chunks::newest(&conn, namespace, filter)?;
        drop(conn);
        if !from_chunks.is_empty() {
            found.extend(from_chunks);
            found.sort_unstable_by(|a, b| b.0.cmp(&a.0));
            found.truncate(filter.limit.unwrap_or(100));
        }
        found.iter().map(|(_, body)| chunks::parse(body)).collect()
    }

    fn active_runs(&self) -> Result<Vec<Run>> {
        self.runs_where("status IN ('QUEUED', 'RUNNING')")
    }

    fn pending_callbacks(&self) -> Result<Vec<Run>> {
        self.runs_where("callback_pending = 1")
    }

    fn purge_runs(
        &self,
        namespace: &str,
        function: Option<&str>,
        status: Option<RunStatus>,
    ) -> Result<u64> {
        let mut n = self.delete_in_batches(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE namespace = ?1
               AND status NOT IN ('QUEUED', 'RUNNING')
               AND (?2 IS NULL OR function = ?2) AND (?3 IS NULL OR status = ?3) LIMIT ?4)",
            params![
                namespace,
                function,
                status.map(|s| s.as_str()),
                DELETE_BATCH
            ],
        )?;
        // Chunks hold succeeded calls only.
        if status.is_none_or(|s| s == RunStatus::Succeeded) {
            n += self.delete_chunks(namespace, function)?;
        }
        // A purge is how an operator makes room on a short disk: the space goes back to the
        // file system now, not at the next background compaction. Releasing pages moves
        // pages, and a moved page is written to the WAL first: a MiB at a time, the WAL
        // truncated after each, so that the purge itself needs little room. Rare and
        // explicit, so the TRUNCATE checkpoints' waits are paid here.
        if n > 0 {
            loop {
                self.truncate_wal(&self.conn());
                if self.compact(PURGE_COMPACT_PAGES)? < PURGE_COMPACT_PAGES {
                    break;
                }
            }
            self.truncate_wal(&self.conn());
        }
        Ok(n)
    }

    fn prune_runs(&self, rules: &Retention, batch: usize) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = super::runs::prune(&tx, rules, batch)?;
        tx.commit()?;
        Ok(n)
    }

    fn run_usage(&self) -> Result<Vec<RunUsage>> {
        usage_rows(&self.conn(), USAGE_PER_NAMESPACE, |r| {
            Ok(RunUsage {
                namespace: r.get(0)?,
                runs: count(r, 1)?,
                finished: count(r, 2)?,
                bytes: count(r, 3)?,
            })
        })
    }

    fn function_usage(&self) -> Result<Vec<FunctionUsage>> {
        usage_rows(&self.conn(), USAGE_PER_FUNCTION, |r| {
            Ok(FunctionUsage {
                namespace: r.get(0)?,
                function: r.get(1)?,
                finished: count(r, 2)?,
                bytes: count(r, 3)?,
            })
        })
    }

    fn compact(&self, max_pages: u64) -> Result<u64> {
        let conn = self.conn();
        let free = |c: &Connection| -> rusqlite::Result<i64> {
            c.query_row("PRAGMA freelist_count", [], |r| r.get(0))
        };
        let before = free(&conn)?;
        // Each step of this pragma frees one page: step it to the end.
        let mut stmt = conn.prepare(&format!(
            "PRAGMA incremental_vacuum({})",
            max_pages.min(i64::MAX as u64)
        ))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        drop(rows);
        drop(stmt);
        // The WAL is not truncated here (a TRUNCATE checkpoint copies the whole WAL while
        // writers wait): the checkpointer thread's PASSIVE checkpoints reset it and
        // journal_size_limit cuts it back.
        Ok((before - free(&conn)?).max(0) as u64)
    }

    fn put_job(&self, job: &JobExecution) -> Result<()> {
        self.write_job(
            job,
            "DO UPDATE SET name = excluded.name, phase = excluded.phase, \
             expires_ms = excluded.expires_ms, body = excluded.body",
        )?;
        Ok(())
    }

    fn insert_job(&self, job: &JobExecution) -> Result<bool> {
        Ok(self.write_job(job, "DO NOTHING")? == 1)
    }

    fn get_job(&self, namespace: &str, uuid: &str) -> Result<Option<JobExecution>> {
        self.body(
            "SELECT body FROM job_executions WHERE namespace = ?1 AND uuid = ?2",
            params![namespace, uuid],
        )
    }

    fn list_jobs(
        &self,
        namespace: &str,
        template: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobExecution>> {
        self.bodies(
            "SELECT body FROM job_executions WHERE namespace = ?1 AND (?2 IS NULL OR name = ?2)
             ORDER BY uuid DESC LIMIT ?3",
            params![namespace, template, limit as i64],
        )
    }

    fn active_jobs(&self) -> Result<Vec<JobExecution>> {
        self.bodies(
            "SELECT body FROM job_executions WHERE phase IN ('Waiting', 'Active') ORDER BY uuid",
            [],
        )
    }

    fn delete_jobs(&self, namespace: &str, template: &str) -> Result<u64> {
        let n = self.conn().execute(
            "DELETE FROM job_executions WHERE namespace = ?1 AND name = ?2",
            params![namespace, template],
        )?;
        Ok(n as u64)
    }

    fn prune_jobs(&self, now: Timestamp) -> Result<u64> {
        let n = self.conn().execute(
            "DELETE FROM job_executions WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
            params![now.as_millisecond()],
        )?;
        Ok(n as u64)
    }

    fn ingest_events(&self, batch: &[(StoredEvent, Vec<Run>)], replace: bool) -> Result<Vec<bool>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let stored = events::ingest(&tx, batch, replace)?;
        tx.commit()?;
        Ok(stored)
    }

    fn list_events(
        &self,
        namespace: &str,
        event_type: Option<&str>,
        undelivered: bool,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.bodies(
            "SELECT body FROM events WHERE namespace = ?1 AND (?2 IS NULL OR type = ?2)
               AND (NOT ?3 OR EXISTS (SELECT 1 FROM deliveries d WHERE d.namespace = ?1
                 AND d.source = events.source AND d.event_id = events.id))
             ORDER BY received_ms DESC, id DESC LIMIT ?4",
            params![namespace, event_type, undelivered, limit as i64],
        )
    }

    fn prune_events(&self, now: Timestamp) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM deliveries WHERE state = 'DEAD' AND expires_ms <= ?1",
            params![now.as_millisecond()],
        )?;
        let n = tx.execute(
            "DELETE FROM events WHERE expires_ms <= ?1 AND NOT EXISTS (SELECT 1 FROM deliveries d
               WHERE d.namespace = events.namespace AND d.source = events.source
                 AND d.event_id = events.id)",
            params![now.as_millisecond()],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }

    fn pending_deliveries(
        &self,
        namespace: &str,
        subscription: &str,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Option<StoredEvent>)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT d.seq, d.namespace, d.subscription, d.function, d.source, d.event_id, d.idx,
               d.state, d.attempts, d.received_ms, d.expires_ms, d.last_error, e.body
             FROM deliveries d LEFT JOIN events e ON e.namespace = d.namespace
               AND e.source = d.source AND e.id = d.event_id
             WHERE d.namespace = ?1 AND d.subscription = ?2 AND d.state = 'PENDING'
             ORDER BY d.seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![namespace, subscription, limit as i64], |r| {
            let record = DeliveryRecord {
                seq: r.get(0)?,
                namespace: r.get(1)?,
                subscription: r.get(2)?,
                function: r.get(3)?,
                source: r.get(4)?,
                event_id: r.get(5)?,
                index: r.get::<_, i64>(6)? as usize,
                state: DeliveryState::parse(&r.get::<_, String>(7)?)
                    .unwrap_or(DeliveryState::Pending),
                attempts: r.get(8)?,
                received_at: ms_to_ts(r.get(9)?),
                expires_at: ms_to_ts(r.get(10)?),
                last_error: r.get(11)?,
            };
            Ok((record, r.get::<_, Option<String>>(12)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (record, body) = row?;
            let event = match body {
                Some(b) => Some(serde_json::from_str(&b)?),
                None => None,
            };
            out.push((record, event));
        }
        Ok(out)
    }

    fn deliver(&self, deliveries: &[(DeliveryRecord, Run)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let runs: Vec<Run> = deliveries.iter().map(|(_, r)| r.clone()).collect();
        write_runs(&tx, &runs)?;
        for (d, run) in deliveries {
            tx.prepare_cached("DELETE FROM deliveries WHERE seq = ?1")?
                .execute(params![d.seq])?;
            events::set_matched(
                &tx,
                d,
                &Delivery {
                    subscription: d.subscription.clone(),
                    function: d.function.clone(),
                    state: DeliveryState::Queued,
                    run_id: Some(run.id.clone()),
                    error: None,
                    attempts: d.attempts,
                },
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn update_delivery(&self, d: &DeliveryRecord) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE deliveries SET state = ?2, attempts = ?3, expires_ms = ?4, last_error = ?5
             WHERE seq = ?1",
            params![
                d.seq,
                d.state.as_str(),
                d.attempts,
                d.expires_at.as_millisecond(),
                d.last_error
            ],
        )?;
        events::set_matched(&tx, d, &d.delivery())?;
        tx.commit()?;
        Ok(())
    }

    fn redeliver(
        &self,
        namespace: &str,
        which: &Redeliver,
        expires_at: Timestamp,
    ) -> Result<Vec<DeliveryRecord>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let dead = events::redeliver(&tx, namespace, which, expires_at)?;
        tx.commit()?;
        Ok(dead)
    }

    fn delivery_counts(&self) -> Result<Vec<DeliveryCount>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT namespace, subscription, state, COUNT(*), MIN(received_ms) FROM deliveries
             GROUP BY namespace, subscription, state",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeliveryCount {
                namespace: r.get(0)?,
                subscription: r.get(1)?,
                state: DeliveryState::parse(&r.get::<_, String>(2)?)
                    .unwrap_or(DeliveryState::Pending),
                count: r.get::<_, i64>(3)? as u64,
                oldest: ms_to_ts(r.get(4)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn driver_cursor(&self, namespace: &str, driver: &str, key: &str) -> Result<Option<i64>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM driver_cursors WHERE namespace = ?1 AND driver = ?2 AND key = ?3",
                params![namespace, driver, key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_driver_cursor(
        &self,
        namespace: &str,
        driver: &str,
        key: &str,
        value: i64,
    ) -> Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO driver_cursors (namespace, driver, key, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (namespace, driver, key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![namespace, driver, key, value])?;
        Ok(())
    }

    fn forget_driver(&self, namespace: &str, driver: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM cron_state WHERE namespace = ?1 AND name = ?2",
            params![namespace, driver],
        )?;
        tx.execute(
            "DELETE FROM driver_cursors WHERE namespace = ?1 AND driver = ?2",
            params![namespace, driver],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn cron_last_fire(&self, namespace: &str, name: &str) -> Result<Option<Timestamp>> {
        let ms: Option<i64> = self
            .conn()
            .query_row(
                "SELECT last_fire_ms FROM cron_state WHERE namespace = ?1 AND name = ?2",
                params![namespace, name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(ms.and_then(|m| Timestamp::from_millisecond(m).ok()))
    }

    fn set_cron_last_fire(&self, namespace: &str, name: &str, at: Option<Timestamp>) -> Result<()> {
        match at {
            Some(t) => self.conn().execute(
                "INSERT OR REPLACE INTO cron_state (namespace, name, last_fire_ms) VALUES (?1, ?2, ?3)",
                params![namespace, name, t.as_millisecond()],
            )?,
            None => self.conn().execute(
                "DELETE FROM cron_state WHERE namespace = ?1 AND name = ?2",
                params![namespace, name],
            )?,
        };
        Ok(())
    }

    fn put_token(&self, token: &ApiToken) -> Result<bool> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO tokens (name, hash, body) VALUES (?1, ?2, ?3)",
            params![token.name, token.hash, serde_json::to_string(token)?],
        )?;
        Ok(n == 1)
    }

    fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        self.bodies("SELECT body FROM tokens ORDER BY name", [])
    }

    fn delete_token(&self, name: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM tokens WHERE name = ?1", params![name])?;
        Ok(n == 1)
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("INSERT INTO audit (at_ms, body) VALUES (?1, ?2)")?;
            for e in entries {
                stmt.execute(params![e.at.as_millisecond(), serde_json::to_string(e)?])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        self.bodies(
            "SELECT body FROM audit ORDER BY id DESC LIMIT ?1",
            params![limit as i64],
        )
    }

    fn delete_runs_of(&self, namespace: &str, function: &str) -> Result<u64> {
        Ok(self.delete_in_batches(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs
               WHERE namespace = ?1 AND function = ?2 LIMIT ?3)",
            params![namespace, function, DELETE_BATCH],
        )? + self.delete_chunks(namespace, Some(function))?)
    }

    fn record_version(&self, v: &FunctionVersion, keep: usize, pinned: &[u32]) -> Result<u32> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (ns, f) = (v.namespace.as_str(), v.function.as_str());
        let known: Option<u32> = tx
            .query_row(
                "SELECT version FROM function_versions
                 WHERE namespace = ?1 AND function = ?2 AND digest = ?3",
                params![ns, f, v.digest],
                |r| r.get(0),
            )
            .optional()?;
        let n = match known {
            Some(n) => n,
            None => {
                // Numbers are never reused: the next is one past the highest ever given.
                let next: u32 = tx.query_row(
                    "SELECT COALESCE(MAX(last), 0) + 1 FROM function_version_counters
                     WHERE namespace = ?1 AND function = ?2",
                    params![ns, f],
                    |r| r.get(0),
                )?;
                let body = serde_json::to_string(&FunctionVersion {
                    version: next,
                    ..v.clone()
                })?;
                tx.execute(
                    "INSERT INTO function_versions (namespace, function, version, digest, body)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![ns, f, next, v.digest, body],
                )?;
                tx.execute(
                    "INSERT INTO function_version_counters (namespace, function, last)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (namespace, function) DO UPDATE SET last = excluded.last",
                    params![ns, f, next],
                )?;
                next
            }
        };
        // The newest `keep`, the one this build is and the pinned ones.
        tx.execute(
            "DELETE FROM function_versions WHERE namespace = ?1 AND function = ?2
               AND version <> ?3 AND version NOT IN (
                 SELECT version FROM function_versions WHERE namespace = ?1 AND function = ?2
                 ORDER BY version DESC LIMIT ?4)
               AND version NOT IN (SELECT value FROM json_each(?5))",
            params![ns, f, n, keep as i64, serde_json::to_string(pinned)?],
        )?;
        tx.commit()?;
        Ok(n)
    }

    fn list_versions(&self, namespace: &str, function: &str) -> Result<Vec<FunctionVersion>> {
        self.bodies(
            "SELECT body FROM function_versions WHERE namespace = ?1 AND function = ?2
             ORDER BY version DESC",
            params![namespace, function],
        )
    }

    fn delete_versions_of(&self, namespace: &str, function: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["function_versions", "function_version_counters"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE namespace = ?1 AND function = ?2"),
                params![namespace, function],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_records_of(&self, namespace: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in [
            "runs",
            "run_chunks",
            "run_usage",
            "job_executions",
            "events",
            "deliveries",
            "driver_cursors",
            "cron_state",
            "function_versions",
            "function_version_counters",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE namespace = ?1"),
                params![namespace],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl SqliteStore {
    /// Writes a job execution; `on_conflict` says what happens when its namespace has one of
    /// that id. The number of rows written.
    fn write_job(&self, job: &JobExecution, on_conflict: &str) -> Result<usize> {
        Ok(self.conn().execute(
            &format!(
                "INSERT INTO job_executions (uuid, namespace, name, phase, expires_ms, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (namespace, uuid) {on_conflict}"
            ),
            params![
                job.uuid,
                job.namespace,
                job.name,
                job.phase.as_str(),
                job.expires_at.map(|t| t.as_millisecond()),
                serde_json::to_string(job)?
            ],
        )?)
    }
}
