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

/// The name of a function's Deployment, Service and autoscaler: `fn-hello`; a version
/// deployed beside the current build (`hello@3`, issue 23) is `fv-hello-3`, which no
/// function's objects can be named.
pub fn object_name(name: &str) -> String {
    match dispatch_core::versions::split_deploy_name(name) {
        (f, Some(v)) => format!("fv-{f}-{v}"),
        _ => format!("fn-{name}"),
    }
}

/// The labels of a function's objects, which also select its pods. A version deployed beside
/// the current build is labelled `hello.v3` (a value no function name can be, so that neither
/// selects the other's pods) and `dispatch.dev/version`.
fn labels(ns: &str, name: &str) -> BTreeMap<String, String> {
    let (function, version) = dispatch_core::versions::split_deploy_name(name);
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/managed-by".into(), "dispatch".into()),
        ("dispatch.dev/namespace".into(), ns.into()),
    ]);
    match version {
        Some(v) => {
            l.insert("dispatch.dev/function".into(), format!("{function}.v{v}"));
            l.insert("dispatch.dev/version".into(), v.to_string());
        }
        None => {
            l.insert("dispatch.dev/function".into(), function.into());
        }
    }
    l
}
