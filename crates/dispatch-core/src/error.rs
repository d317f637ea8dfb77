//! The one error of this crate: something a user wrote is not valid.

/// A user-supplied value (name, spec field, manifest) is not valid. The message says what was
/// wrong and, where it helps, how to fix it; the API answers it with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// Human-readable, lower case, no trailing period.
    pub message: String,
}

impl ValidationError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}
