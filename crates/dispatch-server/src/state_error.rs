//! What the shared state's calls fail with ([`StateError`]), and an error's causes as one
//! line for logs ([`chain`]).

use dispatch_store::StoreError;

/// What the shared state's calls fail with: the store's errors, and the few of its own. The
/// HTTP edge (`error.rs`) decides what status each is.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Shown with its causes (SQLite's own message), for the logs that print it.
    #[error("{}", chain(.0))]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] dispatch_core::ValidationError),
    #[error("namespace {0:?} not found: create it first (dispatch create namespace {0})")]
    NamespaceNotFound(String),
    #[error("token {0:?} already exists: delete it first or pick another name")]
    TokenExists(String),
    /// The data dir's disk is below its reserve (the message names no path).
    #[error(transparent)]
    DiskFull(#[from] crate::disk::DiskFull),
    /// A failure of the server itself; `context` says what it was doing.
    #[error("{context}: {}", chain(source.as_ref()))]
    Internal {
        context: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// An error and its causes, `: `-separated.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl StateError {
    /// Whether the same request may succeed later unchanged: the store or the disk failed,
    /// not the request.
    pub fn is_transient(&self) -> bool {
        match self {
            StateError::Store(e) => !matches!(
                e,
                StoreError::NotFound { .. }
                    | StoreError::AlreadyExists { .. }
                    | StoreError::Conflict { .. }
                    | StoreError::Invalid { .. }
            ),
            StateError::DiskFull(_) | StateError::Internal { .. } => true,
            StateError::Invalid(_)
            | StateError::NamespaceNotFound(_)
            | StateError::TokenExists(_) => false,
        }
    }

    pub fn internal(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StateError::Internal {
            context,
            source: source.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logs print a state error with `{e}`: the store's cause must be in it (a bare "sqlite
    /// error" would hide why loading failed).
    #[test]
    fn a_store_error_shows_its_cause() {
        let e = StateError::from(StoreError::Io {
            action: "read",
            path: "blob".into(),
            source: std::io::Error::other("nope"),
        });
        assert_eq!(e.to_string(), "failed to read blob: nope");
        let e = StateError::internal("doing a thing", std::io::Error::other("the reason"));
        assert_eq!(e.to_string(), "doing a thing: the reason");
    }
}
