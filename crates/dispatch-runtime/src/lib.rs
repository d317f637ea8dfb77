//! Running functions on this host: the language bootstraps (`runtimes/`, embedded with
//! `include_str!`), source archives, handler resolution, the worker protocol, worker
//! processes, the warm worker pool, and the [`Backend`] seam with its embedded
//! implementation [`LocalBackend`].
//!
//! Start reading at [`backend`] (what the server calls), then [`pool`] (how a call finds a
//! worker) and [`worker`] (one process and its protocol).

pub mod backend;
pub mod budget;
pub mod build;
pub mod container;
pub mod exec;
pub mod handler;
pub mod host;
pub mod jobrun;
pub mod local;
pub mod oci;
pub mod pool;
pub mod protocol;
pub mod sandbox;
pub mod source;
pub mod stream;
pub mod worker;
pub mod zygote;

pub use backend::{
    Backend, BaseImageCheck, BuildError, DeployedFunction, FunctionDeploy, FunctionHandle, GcKeep,
    ImageBuild, InvokeError, Removed, Steps,
};
pub use build::Progress;
pub use local::{DEFAULT_MAX_WAITING_CALLS, LocalBackend};
pub use pool::{CallOutcome, Pool, PoolError};
pub use stream::{Chunk, Inbound, Opened, Sink};
