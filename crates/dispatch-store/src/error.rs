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
    #[error("sqlite error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("failed to migrate the database schema")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("stored record is not valid json")]
    Corrupt(#[from] serde_json::Error),
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}
