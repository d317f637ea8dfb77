//! [`Store`] on one SQLite file in WAL mode.
//!
//! One connection behind a `std::sync::Mutex`: every call is a short, blocking statement (the
//! server runs them on the blocking pool), and SQLite serializes writers anyway. No lock is
//! held across an `.await` because nothing here is async.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use dispatch_core::auth::{ApiToken, AuditEntry};
use dispatch_core::events::{Delivery, DeliveryState, StoredEvent};
use dispatch_core::{CallbackState, JobExecution, Kind, Object, Run, RunStatus, Status};
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use crate::{
    DeliveryCount, DeliveryRecord, NamespaceRecord, Redeliver, Result, Retention, RunFilter,
    RunUsage, Store, StoreError,
};

const MIGRATIONS: &[M<'static>] = &[
    M::up(
        "CREATE TABLE resources (
        namespace TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        resource_version INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (namespace, kind, name)
    ) WITHOUT ROWID;
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        namespace TEXT NOT NULL,
        function TEXT NOT NULL,
        status TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX runs_by_function ON runs (namespace, function, id);
    CREATE INDEX runs_by_status ON runs (namespace, status, id);",
    ),
    // Async runs (DESIGN §6): the queue is the runs table. Finished time for retention, a
    // flag for callbacks still to deliver, a partial index over the active runs.
    M::up(
        "ALTER TABLE runs ADD COLUMN finished_ms INTEGER;
    ALTER TABLE runs ADD COLUMN callback_pending INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX runs_active ON runs (id) WHERE status IN ('QUEUED', 'RUNNING');
    CREATE INDEX runs_callbacks ON runs (id) WHERE callback_pending = 1;
    CREATE INDEX runs_finished ON runs (finished_ms) WHERE finished_ms IS NOT NULL;",
    ),
    // Job executions (DESIGN §7).
    M::up(
        "CREATE TABLE job_executions (
        uuid TEXT PRIMARY KEY,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        phase TEXT NOT NULL,
        expires_ms INTEGER,
        body TEXT NOT NULL
    );
    CREATE INDEX jobs_by_template ON job_executions (namespace, name, uuid);
    CREATE INDEX jobs_active ON job_executions (uuid) WHERE phase IN ('Waiting', 'Active');
    CREATE INDEX jobs_expiring ON job_executions (expires_ms) WHERE expires_ms IS NOT NULL;",
    ),
    // API tokens (hashes only) and the audit log (DESIGN §9).
    M::up(
        "CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        body TEXT NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        body TEXT NOT NULL
    );",
    ),
    // Namespaces (Dispatch's organizations): `default` exists without a row.
    M::up(
        "CREATE TABLE namespaces (
        name TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL
    );",
    ),
    // Events (CloudEvents, kept for a TTL) and the last fire of each cron driver.
    M::up(
        "CREATE TABLE events (
        namespace TEXT NOT NULL,
        source TEXT NOT NULL,
        id TEXT NOT NULL,
        type TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (namespace, source, id)
    );
    CREATE INDEX events_by_time ON events (namespace, received_ms);
    CREATE INDEX events_expiring ON events (expires_ms);
    CREATE TABLE cron_state (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        last_fire_ms INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );",
    ),
    // Run history in a budget (issue 26): each record's stored size, a running count and
    // size per function (retention reads it instead of scanning the runs; kept by the
    // writes and deletes of this file, a batch at a time — a trigger cost 5 µs a row),
    // and indexes so that every listing (namespace; function; status; function and status)
    // reads its newest rows in order instead of sorting the namespace. Age is read from the
    // id (a ULID: creation time), so the index on finish times goes — each index is a write
    // per call recorded and per run pruned.
    M::up(
        "ALTER TABLE runs ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE runs SET bytes = length(body);
    CREATE INDEX runs_by_function_status ON runs (namespace, function, status, id);
    CREATE INDEX runs_by_namespace ON runs (namespace, id);
    DROP INDEX runs_finished;
    CREATE TABLE run_usage (
        namespace TEXT NOT NULL,
        function TEXT NOT NULL,
        runs INTEGER NOT NULL,
        finished INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (namespace, function)
    ) WITHOUT ROWID;
    INSERT INTO run_usage
        SELECT namespace, function, COUNT(*), SUM(finished_ms IS NOT NULL), SUM(bytes)
        FROM runs GROUP BY namespace, function;",
    ),
    // Event deliveries that are not queued (issue 27): pending (their function's queue was
    // full) or dead (their event's TTL ended first). A queued delivery is only in its
    // event's body (`matched`, with its run id); these rows are the deliverer's work list,
    // in arrival order per subscription.
    M::up(
        "CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY,
        namespace TEXT NOT NULL,
        subscription TEXT NOT NULL,
        function TEXT NOT NULL,
        source TEXT NOT NULL,
        event_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        received_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        last_error TEXT
    );
    CREATE INDEX deliveries_by_subscription ON deliveries (namespace, subscription, state, seq);
    CREATE INDEX deliveries_by_event ON deliveries (namespace, source, event_id);",
    ),
    // Where a broker driver is in its source (a Kafka partition's next offset).
    M::up(
        "CREATE TABLE driver_cursors (
        namespace TEXT NOT NULL,
        driver TEXT NOT NULL,
        key TEXT NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (namespace, driver, key)
    ) WITHOUT ROWID;",
    ),
    // A namespace's own run-history budget (bytes; NULL: the server's --run-history-budget).
    M::up("ALTER TABLE namespaces ADD COLUMN run_history_budget INTEGER;"),
];

/// Rows deleted per transaction by purges and function deletes (retention has its own batch).
const DELETE_BATCH: i64 = 1000;
/// Pages a purge releases between two truncations of the WAL.
const PURGE_COMPACT_PAGES: u64 = 256;

pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// Dropped with the store: stops the checkpointer thread.
    _checkpointer: Option<std::sync::mpsc::Sender<()>>,
    /// When [`Store::reclaim`] last truncated the write-ahead log.
    truncated: Mutex<Option<std::time::Instant>>,
}

/// WAL pages after which a commit checkpoints inline (a safety net: normally the
/// checkpointer thread keeps the WAL far below this).
const INLINE_CHECKPOINT_PAGES: i64 = 20_000;
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Moves WAL checkpoints off the commit path: SQLite's default checkpoints inside the commit
/// that crosses 1000 pages, which took the p99 of a durable enqueue from ~1 ms to ~5 ms. A
/// second connection runs a PASSIVE checkpoint (it never blocks writers) twice a second.
fn spawn_checkpointer(path: &Path) -> Option<std::sync::mpsc::Sender<()>> {
    let conn = Connection::open(path).ok()?;
    conn.busy_timeout(std::time::Duration::from_secs(1)).ok()?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!("wal checkpoint failed: {e}");
                }
            }
        });
    spawned.ok().map(|_| stop)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, in WAL mode, and migrates it.
    pub fn open(path: &Path) -> Result<Self> {
        private_files(path)?;
        let conn = Connection::open(path)?;
        let mut store = Self::init(conn)?;
        store
            .conn()
            .pragma_update(None, "wal_autocheckpoint", INLINE_CHECKPOINT_PAGES)?;
        store._checkpointer = spawn_checkpointer(path);
        Ok(store)
    }

    /// An in-memory database (tests and benchmarks that need no file).
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        // Pages freed by deletes go back to the file system on `compact` (issue 26). Set
        // before the first table exists; an older database is converted once by a VACUUM.
        let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        if auto_vacuum != 2 {
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            if pages > 0 {
                let t = std::time::Instant::now();
                conn.execute_batch("VACUUM")?;
                tracing::info!(
                    pages,
                    seconds = t.elapsed().as_secs_f64(),
                    "database switched to incremental vacuum (once)"
                );
            }
        }
        // WAL lets readers run beside the writer; NORMAL is durable across process crashes
        // (only an OS crash can lose the last commits), the usual WAL trade-off.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // A WAL that grew in a burst is cut back to this after a checkpoint, so the disk
        // space comes back (a full disk otherwise stays full: issue 28's fault matrix).
        conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            _checkpointer: None,
            truncated: Mutex::new(None),
        })
    }

    fn runs_where(&self, condition: &str) -> Result<Vec<Run>> {
        self.bodies(
            &format!("SELECT body FROM runs WHERE {condition} ORDER BY id"),
            [],
        )
    }

    /// Runs a `SELECT body …` of at most one row and decodes its JSON body.
    fn body<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<T>> {
        let body: Option<String> = self
            .conn()
            .query_row(sql, params, |r| r.get(0))
            .optional()?;
        Ok(match body {
            Some(b) => Some(serde_json::from_str(&b)?),
            None => None,
        })
    }

    /// Runs a `SELECT body …` and decodes every row's JSON body.
    fn bodies<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<T>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for body in rows {
            out.push(serde_json::from_str(&body?)?);
        }
        Ok(out)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are
        // atomic), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn read_row(conn: &Connection, ns: &str, kind: Kind, name: &str) -> Result<Option<Object>> {
    let body: Option<String> = conn
        .query_row(
            "SELECT body FROM resources WHERE namespace = ?1 AND kind = ?2 AND name = ?3",
            params![ns, kind.as_str(), name],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match body {
        Some(b) => Some(serde_json::from_str(&b)?),
        None => None,
    })
}

fn write_row(conn: &Connection, obj: &Object, rv: i64) -> Result<()> {
    conn.execute(
        "INSERT INTO resources (namespace, kind, name, resource_version, body)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (namespace, kind, name)
         DO UPDATE SET resource_version = excluded.resource_version, body = excluded.body",
        params![
            obj.namespace(),
            obj.kind.as_str(),
            obj.name(),
            rv,
            serde_json::to_string(obj)?
        ],
    )?;
    Ok(())
}

fn not_found(kind: Kind, ns: &str, name: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

fn rv_of(obj: &Object) -> i64 {
    obj.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Store for SqliteStore {
    fn reclaim(&self) -> u64 {
        let conn = self.conn();
        // At most once a second: a flood of refused calls must not checkpoint each time.
        let due = self
            .truncated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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

    fn get(&self, namespace: &str, kind: Kind, name: &str) -> Result<Option<Object>> {
        read_row(&self.conn(), namespace, kind, name)
    }

    fn list(&self, namespace: Option<&str>, kind: Kind) -> Result<Vec<Object>> {
        self.bodies(
            "SELECT body FROM resources WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2)
             ORDER BY namespace, name",
            params![kind.as_str(), namespace],
        )
    }

    fn create(&self, mut object: Object) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ns = object.namespace().to_string();
        if read_row(&tx, &ns, object.kind, object.name())?.is_some() {
            return Err(StoreError::AlreadyExists {
                kind: object.kind,
                namespace: ns,
                name: object.metadata.name.clone(),
            });
        }
        let now = Timestamp::now();
        let m = &mut object.metadata;
        m.namespace = Some(ns);
        m.uid = Some(ulid::Ulid::new().to_string().to_ascii_lowercase());
        m.generation = Some(1);
        m.created_at = Some(now);
        m.updated_at = Some(now);
        m.resource_version = Some("1".to_string());
        write_row(&tx, &object, 1)?;
        tx.commit()?;
        Ok(object)
    }

    fn update(&self, object: Object) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ns = object.namespace().to_string();
        let Some(mut stored) = read_row(&tx, &ns, object.kind, object.name())? else {
            return Err(not_found(object.kind, &ns, object.name()));
        };
        let current = rv_of(&stored);
        if let Some(expected) = &object.metadata.resource_version
            && *expected != current.to_string()
        {
            return Err(StoreError::Conflict {
                kind: object.kind,
                name: object.metadata.name.clone(),
                expected: expected.clone(),
                actual: current.to_string(),
            });
        }
        if stored.spec != object.spec {
            stored.metadata.generation = Some(stored.metadata.generation.unwrap_or(0) + 1);
        }
        stored.spec = object.spec;
        stored.metadata.labels = object.metadata.labels;
        stored.metadata.updated_at = Some(Timestamp::now());
        stored.metadata.resource_version = Some((current + 1).to_string());
        write_row(&tx, &stored, current + 1)?;
        tx.commit()?;
        Ok(stored)
    }

    fn update_status(
        &self,
        namespace: &str,
        kind: Kind,
        name: &str,
        status: Status,
    ) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some(mut stored) = read_row(&tx, namespace, kind, name)? else {
            return Err(not_found(kind, namespace, name));
        };
        let next = rv_of(&stored) + 1;
        stored.status = status;
        stored.metadata.resource_version = Some(next.to_string());
        write_row(&tx, &stored, next)?;
        tx.commit()?;
        Ok(stored)
    }

    fn delete(&self, namespace: &str, kind: Kind, name: &str) -> Result<Object> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some(stored) = read_row(&tx, namespace, kind, name)? else {
            return Err(not_found(kind, namespace, name));
        };
        tx.execute(
            "DELETE FROM resources WHERE namespace = ?1 AND kind = ?2 AND name = ?3",
            params![namespace, kind.as_str(), name],
        )?;
        tx.commit()?;
        Ok(stored)
    }

    fn put_runs(&self, runs: &[Run]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        write_runs(&tx, runs)?;
        tx.commit()?;
        Ok(())
    }

    fn get_run(&self, namespace: &str, id: &str) -> Result<Option<Run>> {
        self.body(
            "SELECT body FROM runs WHERE namespace = ?1 AND id = ?2",
            params![namespace, id],
        )
    }

    fn list_runs(&self, namespace: &str, filter: &RunFilter) -> Result<Vec<Run>> {
        let (sql, args) = list_runs_sql(namespace, filter);
        self.bodies(&sql, rusqlite::params_from_iter(args))
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
        let n = self.delete_in_batches(
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
        let mut left = batch as i64;
        let mut usage = Usage::default();
        // Age: ids are ULIDs, so "created before" is a range of the primary key.
        left -= usage.delete(
            &tx,
            "DELETE FROM runs WHERE id IN (
               SELECT id FROM runs WHERE id < ?1 AND finished_ms IS NOT NULL LIMIT ?2)",
            params![id_at(rules.created_before), left],
        )? as i64;
        usage.apply(&tx)?;
        // Count per function: run_usage says which functions are over (no scan of the runs).
        while left > 0 {
            let over: Option<(String, String, i64)> = tx
                .query_row(
                    "SELECT namespace, function, finished - ?1 FROM run_usage
                     WHERE finished > ?1 LIMIT 1",
                    params![rules.keep_per_function as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((ns, function, excess)) = over else {
                break;
            };
            let n = usage.delete(
                &tx,
                "DELETE FROM runs WHERE id IN (
                   SELECT id FROM runs WHERE namespace = ?1 AND function = ?2
                     AND finished_ms IS NOT NULL ORDER BY id LIMIT ?3)",
                params![ns, function, excess.min(left)],
            )? as i64;
            usage.apply(&tx)?;
            if n == 0 {
                break;
            }
            left -= n;
        }
        // Bytes per namespace: the oldest finished records until the namespace is under.
        // A namespace's own budget (namespaces.run_history_budget) before the server's.
        {
            let max = rules
                .max_bytes_per_namespace
                .map(|m| m.min(i64::MAX as u64) as i64);
            while left > 0 {
                let over: Option<(String, i64)> = tx
                    .query_row(
                        "SELECT u.namespace, SUM(u.bytes) - COALESCE(n.run_history_budget, ?1)
                         FROM run_usage u LEFT JOIN namespaces n ON n.name = u.namespace
                         GROUP BY u.namespace
                         HAVING SUM(u.bytes) > COALESCE(n.run_history_budget, ?1) LIMIT 1",
                        params![max],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((ns, mut excess)) = over else {
                    break;
                };
                let oldest: Vec<(String, i64)> = {
                    let mut stmt = tx.prepare_cached(
                        "SELECT id, bytes FROM runs WHERE namespace = ?1
                           AND finished_ms IS NOT NULL ORDER BY id LIMIT ?2",
                    )?;
                    stmt.query_map(params![ns, left], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<_>>()?
                };
                if oldest.is_empty() {
                    break;
                }
                for (id, bytes) in oldest {
                    if excess <= 0 {
                        break;
                    }
                    usage.delete(&tx, "DELETE FROM runs WHERE id = ?1", params![id])?;
                    excess -= bytes;
                    left -= 1;
                }
                usage.apply(&tx)?;
            }
        }
        tx.commit()?;
        Ok((batch as i64 - left) as u64)
    }

    fn run_usage(&self) -> Result<Vec<RunUsage>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT namespace, SUM(runs), SUM(finished), SUM(bytes) FROM run_usage
             GROUP BY namespace ORDER BY namespace",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(RunUsage {
                namespace: r.get(0)?,
                runs: r.get::<_, i64>(1)?.max(0) as u64,
                finished: r.get::<_, i64>(2)?.max(0) as u64,
                bytes: r.get::<_, i64>(3)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
        self.conn().execute(
            "INSERT OR REPLACE INTO job_executions (uuid, namespace, name, phase, expires_ms, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                job.uuid,
                job.namespace,
                job.name,
                job.phase.as_str(),
                job.expires_at.map(|t| t.as_millisecond()),
                serde_json::to_string(job)?
            ],
        )?;
        Ok(())
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
        write_runs(&tx, &runs)?;
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
            set_matched(
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
        set_matched(&tx, d, &d.delivery())?;
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
            set_matched(&tx, d, &d.delivery())?;
        }
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

    fn put_namespace(&self, name: &str, created: Timestamp) -> Result<bool> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO namespaces (name, created_ms) VALUES (?1, ?2)",
            params![name, created.as_millisecond()],
        )?;
        Ok(n == 1)
    }

    fn list_namespaces(&self) -> Result<Vec<NamespaceRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, created_ms, run_history_budget FROM namespaces ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(NamespaceRecord {
                name: r.get(0)?,
                created: ms_to_ts(r.get(1)?),
                run_history_budget: r.get::<_, Option<i64>>(2)?.map(|b| b.max(0) as u64),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn set_run_history_budget(
        &self,
        name: &str,
        budget: Option<u64>,
        created: Timestamp,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO namespaces (name, created_ms, run_history_budget) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET run_history_budget = excluded.run_history_budget",
            params![
                name,
                created.as_millisecond(),
                budget.map(|b| b.min(i64::MAX as u64) as i64)
            ],
        )?;
        Ok(())
    }

    fn delete_namespace(&self, name: &str) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // Everything in it goes too (the server refuses unless --cascade or empty).
        tx.execute("DELETE FROM resources WHERE namespace = ?1", params![name])?;
        tx.execute("DELETE FROM runs WHERE namespace = ?1", params![name])?;
        tx.execute(
            "DELETE FROM job_executions WHERE namespace = ?1",
            params![name],
        )?;
        tx.execute("DELETE FROM events WHERE namespace = ?1", params![name])?;
        tx.execute("DELETE FROM deliveries WHERE namespace = ?1", params![name])?;
        tx.execute(
            "DELETE FROM driver_cursors WHERE namespace = ?1",
            params![name],
        )?;
        tx.execute("DELETE FROM cron_state WHERE namespace = ?1", params![name])?;
        let n = tx.execute("DELETE FROM namespaces WHERE name = ?1", params![name])?;
        tx.commit()?;
        Ok(n == 1)
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
        self.delete_in_batches(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs
               WHERE namespace = ?1 AND function = ?2 LIMIT ?3)",
            params![namespace, function, DELETE_BATCH],
        )
    }
}

impl SqliteStore {
    /// Runs a `DELETE … LIMIT batch` until it deletes nothing, one transaction each, so that
    /// writers (the recorder, an enqueue) get the database between batches.
    /// Checkpoints the whole write-ahead log into the database and truncates it to zero
    /// bytes (writers wait while it copies); a failure is logged, the WAL stays as it was.
    fn truncate_wal(&self, conn: &Connection) {
        *self.truncated.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::warn!("truncating the write-ahead log to free disk space: {e}");
        }
    }

    fn delete_in_batches(&self, sql: &str, params: impl rusqlite::Params + Clone) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let mut usage = Usage::default();
            let n = usage.delete(&tx, sql, params.clone())?;
            usage.apply(&tx)?;
            tx.commit()?;
            total += n;
            if (n as i64) < DELETE_BATCH {
                return Ok(total);
            }
        }
    }
}

/// Writes one delivery into its event's `matched` (at the delivery's place).
fn set_matched(
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

fn ms_to_ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Inserts or replaces run records, keeping `run_usage` (the caller commits).
fn write_runs(tx: &rusqlite::Transaction<'_>, runs: &[Run]) -> Result<()> {
    let mut usage = Usage::default();
    {
        // The row a write replaces (an async run's next state), for the usage counts.
        let mut old =
            tx.prepare_cached("SELECT bytes, finished_ms IS NOT NULL FROM runs WHERE id = ?1")?;
        let mut stmt = tx.prepare_cached(
            "INSERT INTO runs
               (id, namespace, function, status, body, finished_ms, callback_pending, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body,
               finished_ms = excluded.finished_ms,
               callback_pending = excluded.callback_pending, bytes = excluded.bytes",
        )?;
        for run in runs {
            let body = serde_json::to_string(run)?;
            let bytes = body.len() as i64;
            let finished = run.status.is_final() && run.finished_at.is_some();
            // Only an async run is written again (its next state); a sync run's record
            // is written once, so the look-up is skipped on the hot path.
            let before: Option<(i64, bool)> = if run.is_async {
                old.query_row(params![run.id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?
            } else {
                None
            };
            let (runs_d, fin_d, bytes_d) = match before {
                None => (1, finished as i64, bytes),
                Some((b, f)) => (0, finished as i64 - f as i64, bytes - b),
            };
            usage.add(&run.namespace, &run.function, runs_d, fin_d, bytes_d);
            stmt.execute(params![
                run.id,
                run.namespace,
                run.function,
                run.status.as_str(),
                body,
                run.finished_at
                    .filter(|_| run.status.is_final())
                    .map(|t| t.as_millisecond()),
                run.status.is_final()
                    && run
                        .callback
                        .as_ref()
                        .is_some_and(|c| c.state == CallbackState::Pending),
                bytes
            ])?;
        }
    }
    usage.apply(tx)?;
    Ok(())
}

/// Changes to `run_usage` gathered over a transaction's writes and deletes, applied once per
/// function at its end.
#[derive(Default)]
struct Usage(std::collections::HashMap<(String, String), (i64, i64, i64)>);

impl Usage {
    fn add(&mut self, namespace: &str, function: &str, runs: i64, finished: i64, bytes: i64) {
        let e = self
            .0
            .entry((namespace.to_string(), function.to_string()))
            .or_default();
        e.0 += runs;
        e.1 += finished;
        e.2 += bytes;
    }

    /// Runs `sql` (a DELETE on runs) with a RETURNING clause that tells what went; returns
    /// how many rows.
    fn delete(&mut self, tx: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<u64> {
        let mut stmt = tx.prepare_cached(&format!(
            "{sql} RETURNING namespace, function, bytes, finished_ms IS NOT NULL"
        ))?;
        let mut rows = stmt.query(params)?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let (ns, f): (String, String) = (r.get(0)?, r.get(1)?);
            let (bytes, finished): (i64, bool) = (r.get(2)?, r.get(3)?);
            self.add(&ns, &f, -1, -(finished as i64), -bytes);
            n += 1;
        }
        Ok(n)
    }

    fn apply(&mut self, tx: &Connection) -> Result<()> {
        let mut up = tx.prepare_cached(
            "INSERT INTO run_usage VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (namespace, function) DO UPDATE SET runs = runs + excluded.runs,
               finished = finished + excluded.finished, bytes = bytes + excluded.bytes",
        )?;
        for ((ns, f), (runs, finished, bytes)) in self.0.drain() {
            up.execute(params![ns, f, runs, finished, bytes])?;
        }
        tx.execute("DELETE FROM run_usage WHERE runs <= 0", [])?;
        Ok(())
    }
}

/// The query of `list_runs`: newest first, with only the filters given (an `?x IS NULL OR`
/// pattern would keep SQLite from using the indexes). `after` and a time window bound the
/// ids: run ids are ULIDs, ordered by creation time.
fn list_runs_sql(namespace: &str, filter: &RunFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = String::from("SELECT body FROM runs WHERE namespace = ?1");
    let mut args = vec![Value::Text(namespace.to_string())];
    let mut and = |cond: &str, v: Value| {
        args.push(v);
        sql.push_str(&format!(" AND {cond} ?{}", args.len()));
    };
    if let Some(f) = &filter.function {
        and("function =", Value::Text(f.clone()));
    }
    if let Some(st) = filter.status {
        and("status =", Value::Text(st.as_str().to_string()));
    }
    let upper = match (&filter.after, filter.until.map(id_at)) {
        (Some(a), Some(u)) => Some(a.clone().min(u)),
        (a, u) => a.clone().or(u),
    };
    if let Some(u) = upper {
        and("id <", Value::Text(u));
    }
    if let Some(l) = filter.since.map(id_at) {
        and("id >=", Value::Text(l));
    }
    args.push(Value::Integer(filter.limit.unwrap_or(100) as i64));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
    (sql, args)
}

impl SqliteStore {
    /// SQLite's plan for `list_runs` with `filter` (`EXPLAIN QUERY PLAN`, one line per step):
    /// the tests check that listing never scans the runs table.
    pub fn list_runs_plan(&self, namespace: &str, filter: &RunFilter) -> Result<Vec<String>> {
        let (sql, args) = list_runs_sql(namespace, filter);
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// The smallest run id (a ULID) created at `t`: ids of runs created at or after `t` compare
/// greater or equal.
fn id_at(t: Timestamp) -> String {
    let ms = t.as_millisecond().max(0) as u64;
    ulid::Ulid::from_parts(ms, 0).to_string()
}

/// The database holds every run's input and output: it is created 0600 (SQLite gives its
/// `-wal` and `-shm` files the database's mode), and files left looser by older versions are
/// narrowed.
fn private_files(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| StoreError::Io {
        action: "make private",
        path: path.display().to_string(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    for suffix in ["", "-wal", "-shm"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(meta) = std::fs::metadata(&file)
            && meta.permissions().mode() & 0o077 != 0
        {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
    }
    Ok(())
}
