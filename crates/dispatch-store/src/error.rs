use dispatch_core::Kind;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} {name:?} not found in namespace {namespace:?}", kind.human())]
    NotFound {
        kind: Kind,
        namespace: String,
        name: String,
    },
    #[error("{} {name:?} already exists in namespace {namespace:?}", kind.human())]
    AlreadyExists {
        kind: Kind,
        namespace: String,
        name: String,
    },
    #[error(
        "{} {name:?} was changed by someone else (resourceVersion {expected} is stale, now {actual}): get it again and retry",
        kind.human()
    )]
    Conflict {
        kind: Kind,
        name: String,
        expected: String,
        actual: String,
    },
    /// The object was refused by where resources are kept (a Kubernetes API server's
    /// validation): the message says what.
    #[error("{kind} {name:?} was refused: {detail}")]
    Invalid {
        kind: &'static str,
        name: String,
        detail: String,
    },
    /// Where resources are kept (a Kubernetes API server) could not be reached or failed.
    #[error("failed to {action}: {detail}")]
    Remote { action: String, detail: String },
    /// Another server sharing the store took what this write was about first.
    #[error("{0}")]
    Taken(String),
    #[error("sqlite error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgresql error")]
    Postgres(#[from] postgres::Error),
    /// No connection to PostgreSQL could be had from the pool in time.
    #[error("no connection to the database")]
    Pool(#[from] r2d2::Error),
    #[error("failed to migrate the database schema")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("stored record is not valid json")]
    Corrupt(#[from] serde_json::Error),
    /// A chunk of sync calls' history (`run_chunks`) that does not decode.
    #[error("stored run history is not readable: {0}")]
    CorruptChunk(String),
    /// A blob's bytes no longer match its digest (altered on disk).
    #[error(
        "the stored blob {digest} is corrupt (its bytes no longer match its digest): upload the \
         same source again to repair it"
    )]
    CorruptBlob { digest: String },
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the write failed for want of space (SQLite's SQLITE_FULL, or ENOSPC/EDQUOT).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Postgres(e) => e.code() == Some(&postgres::error::SqlState::DISK_FULL),
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_apart() {
        let full = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ));
        assert!(full.is_disk_full());
        let enospc = StoreError::Io {
            action: "write",
            path: "x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert!(enospc.is_disk_full());
        let busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert!(!busy.is_disk_full());
    }
}
