//! [`crate::ResourceStore`] and [`crate::RecordStore`] on one SQLite file in WAL mode (`migrations`: its
//! schema; `resources`, `records`, `runs`: the two traits' halves).
//!
//! One connection behind a `parking_lot::Mutex`: every call is a short, blocking statement (the
//! server runs them on the blocking pool), and SQLite serializes writers anyway. No lock is
//! held across an `.await` because nothing here is async.

mod chunks;
mod events;
mod migrations;
mod records;
mod resources;
mod runs;

use parking_lot::{Mutex, MutexGuard};
use std::path::Path;

use dispatch_core::Run;
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension};

use runs::Usage;
use rusqlite_migration::Migrations;

use crate::{Result, StoreError};

use migrations::MIGRATIONS;

/// Rows deleted per transaction by purges and function deletes (retention has its own batch).
pub(crate) const DELETE_BATCH: i64 = 1000;
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
/// The history file's `journal_size_limit`.
pub const HISTORY_WAL_LIMIT: u64 = 8 << 20;
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
    /// [`SqliteStore::open`] for sync calls' history (`history.db`): its WAL is cut back to
    /// [`HISTORY_WAL_LIMIT`] each time it restarts, not 64 MiB. Its records are compressed
    /// chunks, so the WAL's high-water mark was most of the file's size (2.5 × a 16 MiB
    /// budget); below the limit the WAL is written over in place as before.
    pub fn open_history(path: &Path) -> Result<Self> {
        let store = Self::open(path)?;
        store
            .conn()
            .pragma_update(None, "journal_size_limit", HISTORY_WAL_LIMIT as i64)?;
        Ok(store)
    }

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
        // Pages freed by deletes go back to the file system on `compact`. Set
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
        // space comes back (a full disk otherwise stays full: the fault matrix of `dispatch bench faults`).
        conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement of the write, prune and listing paths stays prepared (rusqlite's
        // default keeps 16, fewer than the statements one connection uses).
        conn.set_prepared_statement_cache_capacity(64);
        Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            _checkpointer: None,
            truncated: Mutex::new(None),
        })
    }

    pub(crate) fn runs_where(&self, condition: &str) -> Result<Vec<Run>> {
        self.bodies(
            &format!("SELECT body FROM runs WHERE {condition} ORDER BY id"),
            [],
        )
    }

    /// Runs a `SELECT body …` of at most one row and decodes its JSON body.
    pub(crate) fn body<T: serde::de::DeserializeOwned>(
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
    pub(crate) fn bodies<T: serde::de::DeserializeOwned>(
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

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are
        // atomic), so a poisoned lock is still safe to use.
        self.conn.lock()
    }
}
impl SqliteStore {
    /// Checkpoints the whole write-ahead log into the database and truncates it to zero
    /// bytes (writers wait while it copies); a failure is logged, the WAL stays as it was.
    /// Another connection's checkpoint under way (the checkpointer thread's) makes it answer
    /// "busy" at once, without waiting: it is tried again for up to a second.
    pub(crate) fn truncate_wal(&self, conn: &Connection) {
        *self.truncated.lock() = Some(std::time::Instant::now());
        for _ in 0..100 {
            match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
                Ok(0) => return,
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(e) => {
                    tracing::warn!("truncating the write-ahead log to free disk space: {e}");
                    return;
                }
            }
        }
        tracing::warn!("truncating the write-ahead log: still busy after a second; it stays");
    }

    /// Runs a `DELETE … LIMIT batch` until it deletes nothing, one transaction each, so that
    /// writers (the recorder, an enqueue) get the database between batches.
    pub(crate) fn delete_in_batches(
        &self,
        sql: &str,
        params: impl rusqlite::Params + Clone,
    ) -> Result<u64> {
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
impl SqliteStore {
    /// Deletes a namespace's (a function's) history chunks, a few per transaction; the
    /// records deleted.
    pub(crate) fn delete_chunks(&self, namespace: &str, function: Option<&str>) -> Result<u64> {
        let mut total = 0;
        loop {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let mut usage = Usage::default();
            let (runs, chunks) = chunks::delete_some(&tx, namespace, function, &mut usage)?;
            usage.apply(&tx)?;
            tx.commit()?;
            total += runs;
            if (chunks as i64) < chunks::DELETE_CHUNKS {
                return Ok(total);
            }
        }
    }
}
pub(crate) fn ms_to_ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
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
