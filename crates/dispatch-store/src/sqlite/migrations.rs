//! The schema of a store's SQLite file, one migration per change (never edit a shipped one).

use rusqlite_migration::M;

pub(super) const MIGRATIONS: &[M<'static>] = &[
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
    // Run history in a budget: each record's stored size, a running count and
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
    // Event deliveries that are not queued: pending (their function's queue was
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
    // A job execution is keyed by its namespace and id: an id may be a name given in a
    // manifest, and two namespaces may give the same one (keyed by id alone, one tenant's
    // execution replaced another's).
    M::up(
        "CREATE TABLE job_executions_ns (
        namespace TEXT NOT NULL,
        uuid TEXT NOT NULL,
        name TEXT NOT NULL,
        phase TEXT NOT NULL,
        expires_ms INTEGER,
        body TEXT NOT NULL,
        PRIMARY KEY (namespace, uuid)
    );
    INSERT INTO job_executions_ns (namespace, uuid, name, phase, expires_ms, body)
        SELECT namespace, uuid, name, phase, expires_ms, body FROM job_executions;
    DROP TABLE job_executions;
    ALTER TABLE job_executions_ns RENAME TO job_executions;
    CREATE INDEX jobs_by_template ON job_executions (namespace, name, uuid);
    CREATE INDEX jobs_active ON job_executions (uuid) WHERE phase IN ('Waiting', 'Active');
    CREATE INDEX jobs_expiring ON job_executions (expires_ms) WHERE expires_ms IS NOT NULL;",
    ),
    // No query reads runs by finish time (age pruning is a range of the ULID primary key,
    // counts and budgets go by function and namespace), yet every recorded run and every
    // pruned one updated this index: one b-tree less per sync call's record (issue 26).
    M::up("DROP INDEX IF EXISTS runs_finished;"),
    // Function versions (issue 23): one row per build that became READY with a new digest;
    // the counter keeps numbers from being given twice once old versions are removed.
    M::up(
        "CREATE TABLE function_versions (
        namespace TEXT NOT NULL,
        function TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (namespace, function, version)
    ) WITHOUT ROWID;
    CREATE INDEX function_versions_by_digest ON function_versions (namespace, function, digest);
    CREATE TABLE function_version_counters (
        namespace TEXT NOT NULL,
        function TEXT NOT NULL,
        last INTEGER NOT NULL,
        PRIMARY KEY (namespace, function)
    ) WITHOUT ROWID;",
    ),
    // Sync calls' history in chunks (issue 26): the records of one batch of succeeded sync
    // calls of one function, compressed into one row (`chunks.rs`), instead of a row and
    // five index entries per call. `bytes` is what the records take uncompressed (what
    // budgets count, as for a row); the body is smaller on disk.
    M::up(
        "CREATE TABLE run_chunks (
        seq INTEGER PRIMARY KEY,
        namespace TEXT NOT NULL,
        function TEXT NOT NULL,
        first_id TEXT NOT NULL,
        last_id TEXT NOT NULL,
        runs INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX run_chunks_newest ON run_chunks (namespace, last_id, first_id);
    CREATE INDEX run_chunks_newest_of_function ON run_chunks (namespace, function, last_id, first_id);
    CREATE INDEX run_chunks_oldest ON run_chunks (namespace, first_id);
    CREATE INDEX run_chunks_oldest_of_function ON run_chunks (namespace, function, first_id);
    CREATE INDEX run_chunks_by_age ON run_chunks (first_id);",
    ),
];

#[cfg(test)]
mod tests {
    use dispatch_core::{JobExecution, JobPhase, Logs};
    use rusqlite_migration::Migrations;

    use super::MIGRATIONS;
    use crate::{RecordStore, SqliteStore};

    fn execution(ns: &str, id: &str, payload: &str) -> JobExecution {
        JobExecution {
            uuid: id.into(),
            name: "echo".into(),
            namespace: ns.into(),
            phase: JobPhase::Completed,
            reason: String::new(),
            payload: payload.into(),
            rendered: serde_json::Value::Null,
            images: vec![],
            runtime: dispatch_core::jobs::JobRuntime::Host,
            attempts: 1,
            exit_code: Some(0),
            logs: Logs::default(),
            created_at: jiff::Timestamp::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            expires_at: None,
            replica: None,
            trace: None,
        }
    }

    /// A file made before job executions were keyed by namespace keeps its executions, and
    /// from then on one id may be used once per namespace.
    #[test]
    fn job_executions_are_keyed_by_namespace_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dispatch.db");
        {
            let mut conn = rusqlite::Connection::open(&file).unwrap();
            // Up to the one that keys executions by namespace (the fourth from the end).
            Migrations::from_slice(&MIGRATIONS[..MIGRATIONS.len() - 4])
                .to_latest(&mut conn)
                .unwrap();
            let old = execution("team-a", "nightly", "a");
            conn.execute(
                "INSERT INTO job_executions (uuid, namespace, name, phase, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![old.uuid, old.namespace, old.name, old.phase.as_str(),
                    serde_json::to_string(&old).unwrap()],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&file).unwrap();
        assert_eq!(
            s.get_job("team-a", "nightly").unwrap().map(|j| j.payload),
            Some("a".to_string())
        );
        assert!(s.insert_job(&execution("team-b", "nightly", "b")).unwrap());
        assert!(
            !s.insert_job(&execution("team-a", "nightly", "again"))
                .unwrap()
        );
        s.put_job(&execution("team-b", "nightly", "b2")).unwrap();
        let payload = |ns| s.get_job(ns, "nightly").unwrap().unwrap().payload;
        assert_eq!(
            (payload("team-a"), payload("team-b")),
            ("a".into(), "b2".into())
        );
    }
}
