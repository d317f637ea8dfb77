//! [`RecordStore`] on PostgreSQL: runs (their SQL in `runs`), job executions, events and
//! their deliveries, drivers' cursors and cron state, tokens and the audit log.

use dispatch_core::auth::{ApiToken, AuditEntry};
use dispatch_core::events::{Delivery, DeliveryState, StoredEvent};
use dispatch_core::versions::FunctionVersion;
use dispatch_core::{JobExecution, Run, RunStatus};
use jiff::Timestamp;
use postgres::GenericClient;
use postgres::types::ToSql;

use super::listen;
use super::runs::{list_runs_sql, usage_per_function, usage_per_namespace, write_runs};
use super::{DELETE_BATCH, Params, PgStore, ms_to_ts, unsigned};
use crate::{
    DeliveryCount, DeliveryRecord, FunctionUsage, OnShared, RecordStore, Redeliver, Result,
    Retention, RunFilter, RunUsage, Shared,
};

impl RecordStore for PgStore {
    fn on_shared_change(&self, f: OnShared) {
        self.listener.on_shared(f);
    }

    fn shared(&self) -> bool {
        true
    }

    fn lease(&self, replica: &str, ttl: std::time::Duration, join: bool) -> Result<bool> {
        self.lease_for(replica, ttl, join)
    }

    fn leave(&self, replica: &str) -> Result<()> {
        self.leave_now(replica)
    }

    fn take_over(&self, replica: &str, how: crate::TakeOver) -> Result<crate::Taken> {
        self.take(replica, how)
    }

    fn request_cancel(&self, namespace: &str, id: &str) -> Result<()> {
        self.cancel_elsewhere(namespace, id)
    }

    fn cancel_requests(&self, replica: &str) -> Result<Vec<(String, String)>> {
        self.cancels_for(replica)
    }

    fn elect(&self, f: Box<dyn Fn(bool) + Send + Sync>) -> bool {
        self.start_election(f);
        true
    }

    fn put_blob(&self, digest: &str, data: &[u8]) -> Result<()> {
        self.put_blob_row(digest, data)
    }

    fn get_blob(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.get_blob_row(digest)
    }

    fn list_blobs(&self, before: Timestamp) -> Result<Vec<String>> {
        self.list_blob_rows(before)
    }

    fn delete_blob(&self, digest: &str) -> Result<()> {
        self.delete_blob_row(digest)
    }

    fn agree(&self, name: &str, value: &str) -> Result<String> {
        self.agree_on(name, value)
    }

    fn put_runs(&self, runs: &[Run]) -> Result<()> {
        // No transaction around it: each of write_runs' statements is atomic (a run with
        // its usage change), and an enqueue (new runs only) is one statement, one round trip
        // and one commit — BEGIN and COMMIT would add two.
        self.with_writer(|w| w.put(runs))
    }

    fn get_run(&self, namespace: &str, id: &str) -> Result<Option<Run>> {
        self.body(
            "SELECT body FROM runs WHERE namespace = $1 AND id = $2",
            &[&namespace, &id],
        )
    }

    fn list_runs(&self, namespace: &str, filter: &RunFilter) -> Result<Vec<Run>> {
        let (sql, args) = list_runs_sql(namespace, filter);
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref()).collect();
        self.bodies(&sql, &params)
    }

    fn active_runs(&self) -> Result<Vec<Run>> {
        self.bodies(
            "SELECT body FROM runs WHERE status IN ('QUEUED', 'RUNNING') ORDER BY id",
            &[],
        )
    }

    fn pending_callbacks(&self) -> Result<Vec<Run>> {
        self.bodies(
            "SELECT body FROM runs WHERE callback_pending ORDER BY id",
            &[],
        )
    }

    fn purge_runs(
        &self,
        namespace: &str,
        function: Option<&str>,
        status: Option<RunStatus>,
    ) -> Result<u64> {
        self.delete_in_batches(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE namespace = $1
               AND status NOT IN ('QUEUED', 'RUNNING')
               AND ($2::text IS NULL OR function = $2) AND ($3::text IS NULL OR status = $3)
               LIMIT $4)",
            &[
                &namespace,
                &function,
                &status.map(|s| s.as_str()),
                &DELETE_BATCH,
            ],
        )
    }

    fn prune_runs(&self, rules: &Retention, batch: usize) -> Result<u64> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let n = super::runs::prune(&mut tx, rules, batch)?;
        tx.commit()?;
        Ok(n)
    }

    fn run_usage(&self) -> Result<Vec<RunUsage>> {
        Ok(self
            .conn()?
            .query(&usage_per_namespace(), &[])?
            .iter()
            .map(|r| RunUsage {
                namespace: r.get(0),
                runs: unsigned(r.get(1)),
                finished: unsigned(r.get(2)),
                bytes: unsigned(r.get(3)),
            })
            .collect())
    }

    fn function_usage(&self) -> Result<Vec<FunctionUsage>> {
        Ok(self
            .conn()?
            .query(&usage_per_function(), &[])?
            .iter()
            .map(|r| FunctionUsage {
                namespace: r.get(0),
                function: r.get(1),
                finished: unsigned(r.get(2)),
                bytes: unsigned(r.get(3)),
            })
            .collect())
    }

    fn put_job(&self, job: &JobExecution) -> Result<()> {
        // An active execution is written only by its owner (see `UPDATE_RUNS`).
        self.write_job(
            job,
            "DO UPDATE SET name = EXCLUDED.name, phase = EXCLUDED.phase, \
             expires_ms = EXCLUDED.expires_ms, body = EXCLUDED.body, owner = EXCLUDED.owner \
             WHERE job_executions.phase NOT IN ('Waiting', 'Active') \
               OR job_executions.owner IS NULL OR job_executions.owner = EXCLUDED.owner",
        )?;
        Ok(())
    }

    fn insert_job(&self, job: &JobExecution) -> Result<bool> {
        Ok(self.write_job(job, "DO NOTHING")? == 1)
    }

    fn get_job(&self, namespace: &str, uuid: &str) -> Result<Option<JobExecution>> {
        self.body(
            "SELECT body FROM job_executions WHERE namespace = $1 AND uuid = $2",
            &[&namespace, &uuid],
        )
    }

    fn list_jobs(
        &self,
        namespace: &str,
        template: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobExecution>> {
        self.bodies(
            "SELECT body FROM job_executions WHERE namespace = $1
               AND ($2::text IS NULL OR name = $2)
             ORDER BY uuid DESC LIMIT $3",
            &[&namespace, &template, &(limit as i64)],
        )
    }

    fn active_jobs(&self) -> Result<Vec<JobExecution>> {
        self.bodies(
            "SELECT body FROM job_executions WHERE phase IN ('Waiting', 'Active') ORDER BY uuid",
            &[],
        )
    }

    fn delete_jobs(&self, namespace: &str, template: &str) -> Result<u64> {
        Ok(self.conn()?.execute(
            "DELETE FROM job_executions WHERE namespace = $1 AND name = $2",
            &[&namespace, &template],
        )?)
    }

    fn prune_jobs(&self, now: Timestamp) -> Result<u64> {
        Ok(self.conn()?.execute(
            "DELETE FROM job_executions WHERE expires_ms IS NOT NULL AND expires_ms <= $1",
            &[&now.as_millisecond()],
        )?)
    }

    fn ingest_events(&self, batch: &[(StoredEvent, Vec<Run>)], replace: bool) -> Result<Vec<bool>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let stored = ingest(&mut tx, batch, replace)?;
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
            "SELECT body FROM events WHERE namespace = $1 AND ($2::text IS NULL OR type = $2)
               AND (NOT $3::bool OR EXISTS (SELECT 1 FROM deliveries d WHERE d.namespace = $1
                 AND d.source = events.source AND d.event_id = events.id))
             ORDER BY received_ms DESC, id DESC LIMIT $4",
            &[&namespace, &event_type, &undelivered, &(limit as i64)],
        )
    }

    fn prune_events(&self, now: Timestamp) -> Result<u64> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let now = now.as_millisecond();
        tx.execute(
            "DELETE FROM deliveries WHERE state = 'DEAD' AND expires_ms <= $1",
            &[&now],
        )?;
        let n = tx.execute(
            "DELETE FROM events WHERE expires_ms <= $1 AND NOT EXISTS (SELECT 1 FROM deliveries d
               WHERE d.namespace = events.namespace AND d.source = events.source
                 AND d.event_id = events.id)",
            &[&now],
        )?;
        tx.commit()?;
        Ok(n)
    }

    fn pending_deliveries(
        &self,
        namespace: &str,
        subscription: &str,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Option<StoredEvent>)>> {
        let rows = self.conn()?.query(
            "SELECT d.seq, d.namespace, d.subscription, d.function, d.source, d.event_id, d.idx,
               d.state, d.attempts, d.received_ms, d.expires_ms, d.last_error, e.body
             FROM deliveries d LEFT JOIN events e ON e.namespace = d.namespace
               AND e.source = d.source AND e.id = d.event_id
             WHERE d.namespace = $1 AND d.subscription = $2 AND d.state = 'PENDING'
             ORDER BY d.seq LIMIT $3",
            &[&namespace, &subscription, &(limit as i64)],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let record = DeliveryRecord {
                seq: r.get(0),
                namespace: r.get(1),
                subscription: r.get(2),
                function: r.get(3),
                source: r.get(4),
                event_id: r.get(5),
                index: r.get::<_, i64>(6) as usize,
                state: DeliveryState::parse(r.get(7)).unwrap_or(DeliveryState::Pending),
                attempts: r.get::<_, i64>(8) as u32,
                received_at: ms_to_ts(r.get(9)),
                expires_at: ms_to_ts(r.get(10)),
                last_error: r.get(11),
            };
            let event = match r.get::<_, Option<&str>>(12) {
                Some(b) => Some(serde_json::from_str(b)?),
                None => None,
            };
            out.push((record, event));
        }
        Ok(out)
    }

    fn deliver(&self, deliveries: &[(DeliveryRecord, Run)]) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // Claimed first: another server delivering the same rows (both read them pending)
        // finds them gone, and nothing of its batch is written.
        let seqs: Vec<i64> = deliveries.iter().map(|(d, _)| d.seq).collect();
        let claimed = tx.execute(
            "DELETE FROM deliveries WHERE seq = ANY($1) AND state = 'PENDING'",
            &[&seqs],
        )?;
        if claimed != seqs.len() as u64 {
            return Err(crate::StoreError::Taken(
                "another server delivered some of these pending deliveries: read them again".into(),
            ));
        }
        let runs: Vec<Run> = deliveries.iter().map(|(_, r)| r.clone()).collect();
        write_runs(&mut tx, &runs)?;
        for (d, run) in deliveries {
            set_matched(
                &mut tx,
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
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        tx.execute(
            "UPDATE deliveries SET state = $2, attempts = $3, expires_ms = $4, last_error = $5
             WHERE seq = $1",
            &[
                &d.seq,
                &d.state.as_str(),
                &(d.attempts as i64),
                &d.expires_at.as_millisecond(),
                &d.last_error,
            ],
        )?;
        set_matched(&mut tx, d, &d.delivery())?;
        tx.commit()?;
        Ok(())
    }

    fn redeliver(
        &self,
        namespace: &str,
        which: &Redeliver,
        expires_at: Timestamp,
    ) -> Result<Vec<DeliveryRecord>> {
        let (subscription, id, source) = match which {
            Redeliver::Subscription(s) => (Some(s.as_str()), None, None),
            Redeliver::Event { id, source } => (None, Some(id.as_str()), source.as_deref()),
        };
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let dead: Vec<DeliveryRecord> = tx
            .query(
                "UPDATE deliveries SET state = 'PENDING', attempts = 0, expires_ms = $5,
                   last_error = NULL
                 WHERE namespace = $1 AND state = 'DEAD' AND ($2::text IS NULL OR subscription = $2)
                   AND ($3::text IS NULL OR event_id = $3) AND ($4::text IS NULL OR source = $4)
                 RETURNING seq, subscription, function, source, event_id, idx, received_ms",
                &[
                    &namespace,
                    &subscription,
                    &id,
                    &source,
                    &expires_at.as_millisecond(),
                ],
            )?
            .iter()
            .map(|r| DeliveryRecord {
                seq: r.get(0),
                namespace: namespace.to_string(),
                subscription: r.get(1),
                function: r.get(2),
                source: r.get(3),
                event_id: r.get(4),
                index: r.get::<_, i64>(5) as usize,
                state: DeliveryState::Pending,
                attempts: 0,
                received_at: ms_to_ts(r.get(6)),
                expires_at,
                last_error: None,
            })
            .collect();
        for d in &dead {
            set_matched(&mut tx, d, &d.delivery())?;
        }
        tx.commit()?;
        Ok(dead)
    }

    fn delivery_counts(&self) -> Result<Vec<DeliveryCount>> {
        Ok(self
            .conn()?
            .query(
                "SELECT namespace, subscription, state, COUNT(*), MIN(received_ms) FROM deliveries
                 GROUP BY namespace, subscription, state",
                &[],
            )?
            .iter()
            .map(|r| DeliveryCount {
                namespace: r.get(0),
                subscription: r.get(1),
                state: DeliveryState::parse(r.get(2)).unwrap_or(DeliveryState::Pending),
                count: unsigned(r.get(3)),
                oldest: ms_to_ts(r.get(4)),
            })
            .collect())
    }

    fn driver_cursor(&self, namespace: &str, driver: &str, key: &str) -> Result<Option<i64>> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT value FROM driver_cursors WHERE namespace = $1 AND driver = $2 AND key = $3",
                &[&namespace, &driver, &key],
            )?
            .map(|r| r.get(0)))
    }

    fn set_driver_cursor(
        &self,
        namespace: &str,
        driver: &str,
        key: &str,
        value: i64,
    ) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO driver_cursors (namespace, driver, key, value) VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, driver, key) DO UPDATE SET value = EXCLUDED.value",
            &[&namespace, &driver, &key, &value],
        )?;
        Ok(())
    }

    fn forget_driver(&self, namespace: &str, driver: &str) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM cron_state WHERE namespace = $1 AND name = $2",
            &[&namespace, &driver],
        )?;
        tx.execute(
            "DELETE FROM driver_cursors WHERE namespace = $1 AND driver = $2",
            &[&namespace, &driver],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn cron_last_fire(&self, namespace: &str, name: &str) -> Result<Option<Timestamp>> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT last_fire_ms FROM cron_state WHERE namespace = $1 AND name = $2",
                &[&namespace, &name],
            )?
            .and_then(|r| Timestamp::from_millisecond(r.get(0)).ok()))
    }

    fn set_cron_last_fire(&self, namespace: &str, name: &str, at: Option<Timestamp>) -> Result<()> {
        match at {
            Some(t) => self.conn()?.execute(
                "INSERT INTO cron_state (namespace, name, last_fire_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (namespace, name) DO UPDATE SET last_fire_ms = EXCLUDED.last_fire_ms",
                &[&namespace, &name, &t.as_millisecond()],
            )?,
            None => self.conn()?.execute(
                "DELETE FROM cron_state WHERE namespace = $1 AND name = $2",
                &[&namespace, &name],
            )?,
        };
        Ok(())
    }

    fn put_token(&self, token: &ApiToken) -> Result<bool> {
        let told = listen::shared(&self.listener.origin, Shared::Tokens);
        let n = self.conn()?.query(
            "WITH ins AS (INSERT INTO tokens (name, hash, body) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING RETURNING 1)
             SELECT pg_notify($4, $5) FROM ins",
            &[
                &token.name,
                &token.hash,
                &serde_json::to_string(token)?,
                &listen::CHANNEL,
                &told,
            ],
        )?;
        Ok(n.len() == 1)
    }

    fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        self.bodies("SELECT body FROM tokens ORDER BY name", &[])
    }

    fn delete_token(&self, name: &str) -> Result<bool> {
        let told = listen::shared(&self.listener.origin, Shared::Tokens);
        let n = self.conn()?.query(
            "WITH del AS (DELETE FROM tokens WHERE name = $1 RETURNING 1)
             SELECT pg_notify($2, $3) FROM del",
            &[&name, &listen::CHANNEL, &told],
        )?;
        Ok(n.len() == 1)
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let insert = tx.prepare("INSERT INTO audit (at_ms, body) VALUES ($1, $2)")?;
        for e in entries {
            tx.execute(
                &insert,
                &[&e.at.as_millisecond(), &serde_json::to_string(e)?],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        self.bodies(
            "SELECT body FROM audit ORDER BY id DESC LIMIT $1",
            &[&(limit as i64)],
        )
    }

    fn delete_runs_of(&self, namespace: &str, function: &str) -> Result<u64> {
        self.delete_in_batches(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs
               WHERE namespace = $1 AND function = $2 LIMIT $3)",
            &[&namespace, &function, &DELETE_BATCH],
        )
    }

    fn record_version(&self, v: &FunctionVersion, keep: usize, pinned: &[u32]) -> Result<u32> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let (ns, f) = (v.namespace.as_str(), v.function.as_str());
        // Servers that share the database record the same build: one at a time per function.
        let lock = format!("function-versions/{ns}/{f}");
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock])?;
        let known = tx.query_opt(
            "SELECT version FROM function_versions
             WHERE namespace = $1 AND function = $2 AND digest = $3",
            &[&ns, &f, &v.digest],
        )?;
        let n: i64 = match known {
            Some(row) => row.get(0),
            None => {
                // Numbers are never reused: the next is one past the highest ever given.
                let next: i64 = tx
                    .query_one(
                        "SELECT COALESCE(MAX(last), 0) + 1 FROM function_version_counters
                         WHERE namespace = $1 AND function = $2",
                        &[&ns, &f],
                    )?
                    .get(0);
                let body = serde_json::to_string(&FunctionVersion {
                    version: next as u32,
                    ..v.clone()
                })?;
                tx.execute(
                    "INSERT INTO function_versions (namespace, function, version, digest, body)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&ns, &f, &next, &v.digest, &body],
                )?;
                tx.execute(
                    "INSERT INTO function_version_counters (namespace, function, last)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (namespace, function) DO UPDATE SET last = excluded.last",
                    &[&ns, &f, &next],
                )?;
                next
            }
        };
        // The newest `keep`, the one this build is and the pinned ones.
        let pinned: Vec<i64> = pinned.iter().map(|&p| i64::from(p)).collect();
        tx.execute(
            "DELETE FROM function_versions WHERE namespace = $1 AND function = $2
               AND version <> $3 AND version NOT IN (
                 SELECT version FROM function_versions WHERE namespace = $1 AND function = $2
                 ORDER BY version DESC LIMIT $4)
               AND version <> ALL($5)",
            &[&ns, &f, &n, &(keep as i64), &pinned],
        )?;
        tx.commit()?;
        Ok(n as u32)
    }

    fn list_versions(&self, namespace: &str, function: &str) -> Result<Vec<FunctionVersion>> {
        self.bodies(
            "SELECT body FROM function_versions WHERE namespace = $1 AND function = $2
             ORDER BY version DESC",
            &[&namespace, &function],
        )
    }

    fn delete_versions_of(&self, namespace: &str, function: &str) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        for table in ["function_versions", "function_version_counters"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE namespace = $1 AND function = $2"),
                &[&namespace, &function],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_records_of(&self, namespace: &str) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        for table in [
            "runs",
            "run_usage",
            "run_usage_delta",
            "job_executions",
            "events",
            "deliveries",
            "driver_cursors",
            "cron_state",
            "function_versions",
            "function_version_counters",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE namespace = $1"),
                &[&namespace],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl PgStore {
    /// Writes a job execution; `on_conflict` says what happens when its namespace has one of
    /// that id. The number of rows written.
    fn write_job(&self, job: &JobExecution, on_conflict: &str) -> Result<u64> {
        Ok(self.conn()?.execute(
            &format!(
                "INSERT INTO job_executions (uuid, namespace, name, phase, expires_ms, body, owner)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (namespace, uuid) {on_conflict}"
            ),
            &[
                &job.uuid,
                &job.namespace,
                &job.name,
                &job.phase.as_str(),
                &job.expires_at.map(|t| t.as_millisecond()),
                &serde_json::to_string(job)?,
                &job.replica,
            ],
        )?)
    }

    /// Runs a `DELETE … LIMIT` on runs until it deletes fewer than a batch, one transaction
    /// each (keeping `run_usage`), so that writers get the tables between batches.
    fn delete_in_batches(&self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let mut conn = self.conn()?;
            let mut tx = conn.transaction()?;
            let mut usage = super::runs::Usage::default();
            let n = usage.delete(&mut tx, sql, params)?;
            usage.apply(&mut tx)?;
            tx.commit()?;
            total += n;
            if (n as i64) < DELETE_BATCH {
                return Ok(total);
            }
        }
    }
}

/// Stores events (a duplicate source and id: nothing of it), their pending deliveries and
/// their admitted runs inside `tx`; whether each event was stored.
fn ingest(
    tx: &mut impl GenericClient,
    batch: &[(StoredEvent, Vec<Run>)],
    replace: bool,
) -> Result<Vec<bool>> {
    let insert = tx.prepare(&format!(
        "INSERT INTO events (namespace, source, id, type, received_ms, expires_ms, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (namespace, source, id) {}",
        if replace {
            "DO UPDATE SET type = EXCLUDED.type, received_ms = EXCLUDED.received_ms,
               expires_ms = EXCLUDED.expires_ms, body = EXCLUDED.body"
        } else {
            "DO NOTHING"
        }
    ))?;
    let pending = tx.prepare(
        "INSERT INTO deliveries (namespace, subscription, function, source, event_id, idx,
           state, attempts, received_ms, expires_ms, last_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )?;
    let mut stored = Vec::with_capacity(batch.len());
    let mut runs: Vec<Run> = Vec::new();
    for (e, event_runs) in batch {
        let n = tx.execute(
            &insert,
            &[
                &e.namespace,
                &e.event.source,
                &e.event.id,
                &e.event.kind,
                &e.received_at.as_millisecond(),
                &e.expires_at.as_millisecond(),
                &serde_json::to_string(e)?,
            ],
        )?;
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
            tx.execute(
                &pending,
                &[
                    &e.namespace,
                    &d.subscription,
                    &d.function,
                    &e.event.source,
                    &e.event.id,
                    &(i as i64),
                    &d.state.as_str(),
                    &(d.attempts as i64),
                    &e.received_at.as_millisecond(),
                    &e.expires_at.as_millisecond(),
                    &d.error,
                ],
            )?;
        }
    }
    write_runs(tx, &runs)?;
    Ok(stored)
}

/// Writes one delivery into its event's `matched` (at the delivery's place).
fn set_matched(tx: &mut impl GenericClient, d: &DeliveryRecord, delivery: &Delivery) -> Result<()> {
    tx.execute(
        "UPDATE events SET body = jsonb_set(body::jsonb, ARRAY['matched', $4], $5::text::jsonb)::text
         WHERE namespace = $1 AND source = $2 AND id = $3",
        &[
            &d.namespace,
            &d.source,
            &d.event_id,
            &d.index.to_string(),
            &serde_json::to_string(delivery)?,
        ],
    )?;
    Ok(())
}
