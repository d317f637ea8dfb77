//! The Kubernetes shapes of Dispatch (DESIGN §8), as typed `k8s-openapi` objects so that every
//! generated object is valid by construction: CRDs for every kind ([`crds`]), a function's
//! `apps/v1` Deployment and Service or Knative Service ([`function_objects`],
//! [`knative_service`]), and a job execution's `batch/v1` Job ([`job`]).
//!
//! It also applies them with kube (server-side apply of a function's Deployment and Service,
//! Jobs for executions, deletes), tested against kube's tower-test mock API server; builds
//! function images without a daemon ([`oci`], [`image`]); and [`backend::KubernetesBackend`]
//! puts these together behind the server's `Backend` seam (`dispatch server --backend
//! kubernetes`), which also runs job executions as Jobs and elects the cron scheduler's
//! server by Lease ([`lease`]); [`store::CrStore`] keeps resources as custom resources;
//! [`install`] renders what installs it.

pub mod backend;
pub mod install;
pub mod lease;
/// OCI images live in the runtime crate (the container tier pulls them too).
pub use dispatch_runtime::oci;
/// Function images: in the runtime crate too (the container tier installs their dependencies).
pub use dispatch_runtime::oci::function as image;
pub mod security;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

mod apply;
mod crds;
mod objects;

pub use apply::*;
pub use crds::*;
pub use objects::*;

use std::collections::BTreeMap;

/// The API group of Dispatch's CRDs (`dispatch.dev/v1`).
pub const GROUP: &str = "dispatch.dev";
/// The port `dispatch runner` listens on in function pods.
pub const RUNNER_PORT: i32 = 8080;

fn labels(ns: &str, function: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".into(), "dispatch".into()),
        ("dispatch.dev/namespace".into(), ns.into()),
        ("dispatch.dev/function".into(), function.into()),
    ])
}
