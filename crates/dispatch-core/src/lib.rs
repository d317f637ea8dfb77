//! Dispatch's vocabulary: resource types with the Kubernetes shape
//! (`apiVersion/kind/metadata/spec/status`), name and spec validation, YAML/JSON manifests,
//! the invocation envelope and the run record. No I/O and no async: every other crate
//! depends on this one, and it depends on none of them.
//!
//! Start with [`resource`] (the [`Object`] every store row and API body is), then
//! [`envelope`] (what a function call answers) and [`run`] (what a call leaves behind).

pub mod auth;
pub mod digest;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod events;
pub mod jobs;
pub mod manifest;
pub mod names;
pub mod quantity;
pub mod resource;
pub mod run;

pub use envelope::{Envelope, ErrorObject, ErrorType, Logs};
pub use error::ValidationError;
pub use jobs::{JobExecution, JobPhase, JobTemplateSpec};
pub use resource::{
    API_VERSION, BaseImageSpec, EndpointSpec, FunctionSpec, ImageSpec, Kind, Language, Metadata,
    Object, Phase, Retry, RetryPolicy, SealedSecret, SecretSpec, Status,
};
pub use run::{
    AttemptError, Callback, CallbackState, ColdStart, Run, RunStatus, StartMethod, Timings, Trigger,
};

/// The namespace used when none is given (Dispatch's default organization).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Largest payload accepted for a call, in bytes (DESIGN §5: default max 6 MiB → 413).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;
