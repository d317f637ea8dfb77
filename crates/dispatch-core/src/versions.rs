//! Function versions (issue 23, its first part): every build of a function that reached READY
//! with a new digest is kept as an immutable, numbered version — what it was made of, and when
//! — so that `dispatch get versions` shows what ran and `dispatch rollback` returns to it.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Versions kept per function (older ones are removed as new ones come).
pub const KEEP_VERSIONS: usize = 10;

/// One build of a function, numbered from 1 in the order they first became READY.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionVersion {
    pub namespace: String,
    pub function: String,
    pub version: u32,
    /// The function digest (image + source + handler + settings): one version per digest.
    pub digest: String,
    /// The function's spec that built it (its source archive's digest included): what a
    /// rollback writes back.
    pub spec: serde_json::Value,
    /// The function's generation whose spec this was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// When it first became READY.
    pub created_at: Timestamp,
}
