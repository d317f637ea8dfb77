//! The container tier (DESIGN §9): OCI images pulled from a registry into a content-addressed
//! store ([`images`]), unpacked safely ([`unpack`]), and run with an OCI runtime from a bundle
//! written with oci-spec ([`engine`]). Job templates run their containers' images this way.

pub mod engine;
pub mod images;
pub mod unpack;

pub use engine::{Container, Engine};
pub use images::{ImageError, Images, PullPolicy, PulledImage, Ready};

/// The identity of containers when the server has no per-namespace uids (`--isolation none`).
pub const NOBODY: u32 = 65534;

/// The uid and gid a container of namespace `ns` runs as: the sandbox's uid for it (a root
/// server), else nobody.
pub fn identity(sandboxes: Option<&crate::sandbox::Sandboxes>, ns: &str) -> (u32, u32) {
    match sandboxes.map(|s| s.identity(ns)) {
        Some(crate::sandbox::Identity::Uid { uid, gid }) => (uid, gid),
        _ => (NOBODY, NOBODY),
    }
}

/// What the embedded server needs to run containers: the image store and the OCI runtime.
pub struct Containers {
    pub images: Images,
    pub engine: std::sync::Arc<Engine>,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}
