//! The PostgreSQL schema, one migration per change (never edit a shipped one), applied at
//! connect under an advisory lock: several servers starting on one database migrate once.
//! The tables are the SQLite store's; keys that order (run ids are ULIDs, names) compare
//! byte by byte (`COLLATE "C"`) whatever the database's locale, as SQLite compares them.

use crate::{Result, StoreError};

/// `pg_advisory_xact_lock` key held while migrating ("dispatch" in ASCII).
const MIGRATION_LOCK: i64 = 0x6469_7370_6174_6368;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE resources (
    namespace TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    resource_version BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (namespace, kind, name)
);
CREATE TABLE namespaces (
    name TEXT COLLATE "C" PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    run_history_budget BIGINT
);
CREATE TABLE runs (
    id TEXT COLLATE "C" PRIMARY KEY,
    namespace TEXT COLLATE "C" NOT NULL,
    function TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    finished_ms BIGINT,
    callback_pending BOOLEAN NOT NULL DEFAULT FALSE,
    bytes BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_function_status ON runs (namespace, function, status, id);
CREATE INDEX runs_by_function ON runs (namespace, function, id);
CREATE INDEX runs_by_status ON runs (namespace, status, id);
CREATE INDEX runs_by_namespace ON runs (namespace, id);
CREATE INDEX runs_active ON runs (id) WHERE status IN ('QUEUED', 'RUNNING');
CREATE INDEX runs_callbacks ON runs (id) WHERE callback_pending;
CREATE TABLE run_usage (
    namespace TEXT COLLATE "C" NOT NULL,
    function TEXT COLLATE "C" NOT NULL,
    runs BIGINT NOT NULL,
    finished BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (namespace, function)
);
CREATE TABLE job_executions (
    namespace TEXT COLLATE "C" NOT NULL,
    uuid TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    phase TEXT NOT NULL,
    expires_ms BIGINT,
    body TEXT NOT NULL,
    PRIMARY KEY (namespace, uuid)
);
CREATE INDEX jobs_by_template ON job_executions (namespace, name, uuid);
CREATE INDEX jobs_active ON job_executions (uuid) WHERE phase IN ('Waiting', 'Active');
CREATE INDEX jobs_expiring ON job_executions (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE TABLE tokens (
    name TEXT COLLATE "C" PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE events (
    namespace TEXT COLLATE "C" NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    type TEXT COLLATE "C" NOT NULL,
    received_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (namespace, source, id)
);
CREATE INDEX events_by_time ON events (namespace, received_ms);
CREATE INDEX events_expiring ON events (expires_ms);
CREATE TABLE cron_state (
    namespace TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    last_fire_ms BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE deliveries (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace TEXT COLLATE "C" NOT NULL,
    subscription TEXT COLLATE "C" NOT NULL,
    function TEXT NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    event_id TEXT COLLATE "C" NOT NULL,
    idx BIGINT NOT NULL,
    state TEXT COLLATE "C" NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    received_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    last_error TEXT
);
CREATE INDEX deliveries_by_subscription ON deliveries (namespace, subscription, state, seq);
CREATE INDEX deliveries_by_event ON deliveries (namespace, source, event_id);
CREATE TABLE driver_cursors (
    namespace TEXT COLLATE "C" NOT NULL,
    driver TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (namespace, driver, key)
);
"#,
    r#"
CREATE TABLE run_usage_delta (
    namespace TEXT COLLATE "C" NOT NULL,
    function TEXT COLLATE "C" NOT NULL,
    runs BIGINT NOT NULL,
    finished BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
"#,
    // Several active servers: each holds a lease and owns what it accepted.
    r#"
CREATE TABLE replicas (
    id TEXT COLLATE "C" PRIMARY KEY,
    lease_until TIMESTAMPTZ NOT NULL,
    joined TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE runs ADD COLUMN owner TEXT COLLATE "C";
ALTER TABLE runs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX runs_owned ON runs (owner) WHERE status IN ('QUEUED', 'RUNNING') OR callback_pending;
ALTER TABLE job_executions ADD COLUMN owner TEXT COLLATE "C";
CREATE INDEX jobs_owned ON job_executions (owner) WHERE phase IN ('Waiting', 'Active');
CREATE TABLE blobs (
    digest TEXT COLLATE "C" PRIMARY KEY,
    data BYTEA NOT NULL,
    stored TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE settings (
    name TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    // Function versions (issue 23): one row per build that became READY with a new digest;
    // the counter keeps numbers from being given twice once old versions are removed.
    r#"
CREATE TABLE function_versions (
    namespace TEXT COLLATE "C" NOT NULL,
    function TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (namespace, function, version)
);
CREATE INDEX function_versions_by_digest ON function_versions (namespace, function, digest);
CREATE TABLE function_version_counters (
    namespace TEXT COLLATE "C" NOT NULL,
    function TEXT COLLATE "C" NOT NULL,
    last BIGINT NOT NULL,
    PRIMARY KEY (namespace, function)
);
"#,
];

/// Brings the schema up to date in one transaction (see the module docs). A database
/// migrated by a newer server is refused: this one would not know its tables.
pub(super) fn migrate(client: &mut postgres::Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS dispatch_schema (version BIGINT NOT NULL)")?;
    let at: i64 = match tx.query_opt("SELECT version FROM dispatch_schema", &[])? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO dispatch_schema (version) VALUES (0)", &[])?;
            0
        }
    };
    let known = MIGRATIONS.len() as i64;
    if at > known {
        return Err(StoreError::Remote {
            action: "use the database".into(),
            detail: format!(
                "its schema is version {at}, made by a newer Dispatch server; this one knows \
                 versions up to {known}: upgrade this server"
            ),
        });
    }
    for m in &MIGRATIONS[at as usize..] {
        tx.batch_execute(m)?;
    }
    tx.execute("UPDATE dispatch_schema SET version = $1", &[&known])?;
    tx.commit()?;
    Ok(())
}
