//! What follows a change to a stored resource, whoever made it (this server's API, `kubectl`,
//! another server): an endpoint routes, subscriptions and drivers are re-indexed, the
//! controller reconciles; a delete stops what served the resource. And what a delete must
//! not break: a resource still named by another is refused.

use std::sync::Arc;

use dispatch_core::{Kind, Object};

use crate::controller::Key;
use crate::jobs::JobError;
use crate::state::{AppState, StateError};

/// Why a change to a resource is refused or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// Other resources still name it.
    #[error(
        "{} {name:?} is used by {} {}: delete or change them first",
        what.human(),
        by.plural(),
        users.join(", ")
    )]
    InUse {
        what: Kind,
        name: String,
        by: Kind,
        users: Vec<String>,
    },
    /// A namespace that still holds resources, deleted without cascade.
    #[error(
        "namespace {namespace:?} is not empty ({count} resources: {}{}): delete them, or pass \
         --cascade",
        first.join(", "),
        if *count > first.len() { ", …" } else { "" }
    )]
    NotEmpty {
        namespace: String,
        count: usize,
        /// The first ten, as `kind/name`.
        first: Vec<String>,
    },
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// After a write: endpoints route at once (the response means the route is live), and the
/// controller reconciles the resource.
pub async fn stored_changed(state: &AppState, stored: &Object) -> Result<(), StateError> {
    if stored.kind == Kind::Endpoint {
        state.set_route(stored.namespace(), stored.name(), Some(stored));
    }
    if matches!(stored.kind, Kind::Subscription | Kind::EventDriver) {
        crate::events::rebuild(state).await?;
    }
    state.enqueue(Key::of(stored));
    Ok(())
}

/// Refused while a resource of another kind still names `kind` `name` (a function: its
/// endpoints, subscriptions and event drivers).
pub async fn check_unused(
    state: &AppState,
    ns: &str,
    kind: Kind,
    name: &str,
) -> Result<(), ResourceError> {
    for by in kind.referrers() {
        let (nsc, by) = (ns.to_string(), *by);
        let all = state.res(move |s| s.list(Some(&nsc), by)).await?;
        let users: Vec<String> = all
            .into_iter()
            .filter(|o| o.refers_to(kind, name))
            .map(|o| o.metadata.name)
            .collect();
        if !users.is_empty() {
            return Err(ResourceError::InUse {
                what: kind,
                name: name.to_string(),
                by,
                users,
            });
        }
    }
    Ok(())
}

/// After a delete (through the API, or seen by the store's watch): a function stops serving
/// and its runs go, an endpoint stops routing, a template's executions go, subscriptions and
/// drivers stop; the controller has the last word.
pub async fn forget(
    state: &Arc<AppState>,
    ns: &str,
    kind: Kind,
    name: &str,
) -> Result<(), ResourceError> {
    match kind {
        Kind::Function => {
            stop_function(state, ns, name).await;
            state.recorder.flush().await;
            state.delete_runs_of(ns, name).await?;
            let (n, m) = (ns.to_string(), name.to_string());
            state.db(move |s| s.delete_versions_of(&n, &m)).await?;
        }
        Kind::Endpoint => state.set_route(ns, name, None),
        Kind::Alias => crate::versions::forget_alias(state, ns, name),
        Kind::JobTemplate => crate::jobs::forget_template(state, ns, name).await?,
        Kind::Subscription => crate::events::rebuild(state).await?,
        Kind::EventDriver => {
            let (n, m) = (ns.to_string(), name.to_string());
            state.db(move |s| s.forget_driver(&n, &m)).await?;
            crate::events::rebuild(state).await?;
        }
        _ => {}
    }
    state.enqueue(Key::new(ns, kind, name));
    Ok(())
}

/// A deleted function serves no more calls: out of the deployments, its queued runs
/// forgotten by the scheduler, its workers stopped.
async fn stop_function(state: &AppState, ns: &str, name: &str) {
    crate::versions::forget_function(state, ns, name).await;
    state.set_deployed(ns, name, None);
    state.queue.forget_function(ns, name);
    state.backend.remove_function(ns, name).await;
}

/// A change the store saw that did not come through this server's API (`kubectl apply` or
/// `delete` of a custom resource, another server): handled as the API would after its write.
pub async fn changed_elsewhere(
    state: &Arc<AppState>,
    change: dispatch_store::Changed,
) -> Result<(), ResourceError> {
    let (ns, kind, name) = (&change.namespace, change.kind, &change.name);
    tracing::info!(%kind, namespace = %ns, name = %name, deleted = change.deleted, "resource changed outside this server");
    if change.deleted {
        return forget(state, ns, kind, name).await;
    }
    let Some(mut stored) = state.get(ns, kind, name).await? else {
        return Ok(());
    };
    if state.require_namespace(ns).is_err() {
        state.create_namespace(ns).await?;
    }
    // What the API would have checked and filled in (a secret is sealed: only the API can
    // write one).
    if kind != Kind::Secret {
        let mut normal = stored.clone();
        match normal.validate() {
            Ok(()) if normal.spec != stored.spec => {
                match state.res(move |s| s.update(normal)).await {
                    Ok(o) => stored = o,
                    // Changed again meanwhile: that change comes next.
                    Err(StateError::Store(dispatch_store::StoreError::Conflict { .. })) => {
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(()) => {}
            Err(e) => {
                if kind == Kind::Endpoint {
                    state.set_route(ns, name, None);
                }
                let status = dispatch_core::Status {
                    phase: Some(dispatch_core::Phase::Error),
                    reason: format!("{} (this spec did not come through the API)", e.message),
                    ..stored.status.clone()
                };
                let (n, m) = (ns.to_string(), name.to_string());
                state
                    .res(move |s| s.update_status(&n, kind, &m, status))
                    .await?;
                return Ok(());
            }
        }
    }
    Ok(stored_changed(state, &stored).await?)
}

/// Deletes a namespace (refused while it holds resources, unless `cascade`): what runs there
/// stops before its resources and records go. Answers how many resources went with it.
pub async fn delete_namespace(
    state: &Arc<AppState>,
    ns: &str,
    cascade: bool,
) -> Result<usize, ResourceError> {
    state.require_namespace(ns)?;
    let nsc = ns.to_string();
    let contents = state
        .res(move |s| {
            let mut found = Vec::new();
            for kind in Kind::ALL {
                for o in s.list(Some(&nsc), kind)? {
                    found.push((kind, o.metadata.name));
                }
            }
            Ok(found)
        })
        .await?;
    if !contents.is_empty() && !cascade {
        return Err(ResourceError::NotEmpty {
            namespace: ns.to_string(),
            count: contents.len(),
            first: contents
                .iter()
                .take(10)
                .map(|(k, n)| format!("{}/{n}", k.cli_name()))
                .collect(),
        });
    }
    // Stop what runs there before the records go.
    for (kind, name) in &contents {
        match kind {
            Kind::Function => stop_function(state, ns, name).await,
            Kind::Alias => crate::versions::forget_alias(state, ns, name),
            Kind::JobTemplate => crate::jobs::forget_template(state, ns, name).await?,
            _ => {}
        }
    }
    state.recorder.flush().await;
    state.delete_namespace(ns).await?;
    state.rebuild_routes().await?;
    Ok(contents.len())
}
