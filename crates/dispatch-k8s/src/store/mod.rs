//! Resources as custom resources (DESIGN §8): [`CrStore`] keeps base images, images,
//! functions, endpoints, secrets, job templates, subscriptions and event drivers as
//! `dispatch.dev/v1` objects in the cluster, one per Dispatch resource, in the Kubernetes
//! namespace of the same name. It is only a [`ResourceStore`]: run records, job executions,
//! events, tokens and the audit log stay in the server's SQL [`dispatch_store::RecordStore`]
//! (they are many, short-lived and queried by time); namespaces' rows stay in the SQL store
//! it is given.
//!
//! Reads come from a cache that one watch per kind keeps (kube-runtime's watcher: list, then
//! watch from that version, relist when the watch expires); writes go to the API server and
//! are applied to the cache from its answer, so a read right after a write sees it. A change
//! the watch brings that this process did not make (`kubectl apply`, `kubectl delete`, a
//! second server) is reported to [`ResourceStore::on_external_change`]; the server reconciles it as
//! if it came through its API.
//!
//! [`ResourceStore`]'s methods are blocking: the resource methods wait for the API server on the
//! runtime the store was started on, so call them off the async threads (the server does,
//! on the blocking pool).

use std::collections::BTreeMap;
use std::sync::Arc;

use dispatch_core::{Kind, Object, Status};
use dispatch_store::{OnChange, ResourceStore, Result, StoreError};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

mod cache;
mod convert;

use cache::Cache;
pub use convert::*;

/// Resources as custom resources, everything else in `sql`. See the module docs.
pub struct CrStore {
    /// Namespaces' rows (the server's SQL store).
    sql: Arc<dyn ResourceStore>,
    client: kube::Client,
    rt: tokio::runtime::Handle,
    cache: Arc<Cache>,
    watches: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for CrStore {
    fn drop(&mut self) {
        self.watches.iter().for_each(|w| w.abort());
    }
}

fn remote(action: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
    StoreError::Remote {
        action: action.into(),
        detail: e.to_string(),
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl CrStore {
    /// Checks that every kind's CRD is served and readable, starts one watch per kind and
    /// returns once each has listed what exists.
    pub async fn start(client: kube::Client, sql: Arc<dyn ResourceStore>) -> Result<CrStore> {
        let cache = Arc::new(Cache::default());
        let mut watches = Vec::new();
        let mut synced = Vec::new();
        for kind in Kind::ALL {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(kind));
            let probe = kube::api::ListParams::default().limit(1);
            if let Err(e) = api.list(&probe).await {
                let hint = match api_code(&e) {
                    Some(404) => {
                        ": are Dispatch's CRDs installed? (`dispatch k8s manifests | kubectl apply -f -`)"
                    }
                    Some(403) => {
                        ": the server's ServiceAccount may not list them (see `dispatch k8s manifests`)"
                    }
                    _ => "",
                };
                return Err(remote(
                    format!("list {} in the cluster", kind.plural()),
                    format!("{e}{hint}"),
                ));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            synced.push((kind, rx));
            watches.push(tokio::spawn(watch(kind, api, cache.clone(), tx)));
        }
        for (kind, rx) in synced {
            match tokio::time::timeout(FIRST_SYNC, rx).await {
                Ok(Ok(())) => {}
                _ => {
                    watches.iter().for_each(|w| w.abort());
                    return Err(remote(
                        format!("watch {} in the cluster", kind.plural()),
                        format!("no complete list within {} s", FIRST_SYNC.as_secs()),
                    ));
                }
            }
        }
        Ok(CrStore {
            sql,
            client,
            rt: tokio::runtime::Handle::current(),
            cache,
            watches,
        })
    }

    fn api(&self, ns: &str, kind: Kind) -> Api<DynamicObject> {
        resource_api(&self.client, ns, kind)
    }

    /// Waits for an API call on the store's runtime: from the blocking pool (where the server
    /// calls the store), or from a worker thread of a multi-threaded runtime.
    fn wait<F: std::future::Future>(&self, f: F) -> F::Output {
        tokio::task::block_in_place(|| self.rt.block_on(f))
    }

    /// The object as the API server has it now.
    fn fetch(&self, ns: &str, kind: Kind, name: &str) -> Result<DynamicObject> {
        match self.wait(self.api(ns, kind).get_opt(name)) {
            Ok(Some(cr)) => Ok(cr),
            Ok(None) => Err(not_found(kind, ns, name)),
            Err(e) => Err(remote(format!("read {} {name:?}", kind.human()), e)),
        }
    }

    /// Stores the API server's answer to one of our writes.
    fn written(&self, kind: Kind, cr: &DynamicObject) -> Object {
        let o = from_custom_resource(kind, cr);
        self.cache.apply(o.clone());
        o
    }
}

fn not_found(kind: Kind, ns: &str, name: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

fn refused(kind: Kind, name: &str, action: &str, e: kube::Error) -> StoreError {
    match (api_code(&e), &e) {
        (Some(400 | 422), kube::Error::Api(s)) => StoreError::Invalid {
            kind: kind.human(),
            name: name.to_string(),
            detail: s.message.clone(),
        },
        _ => remote(format!("{action} {} {name:?}", kind.human()), e),
    }
}

/// One kind's watch, for as long as the store lives: errors are logged and retried with
/// backoff (the watcher relists when its version expired).
async fn watch(
    kind: Kind,
    api: Api<DynamicObject>,
    cache: Arc<Cache>,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let mut synced = Some(synced);
    let mut listing: Vec<DynamicObject> = Vec::new();
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(cr)) => listing.push(cr),
            Ok(Event::InitDone) => {
                cache.relisted(kind, std::mem::take(&mut listing));
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Apply(cr)) => cache.watched(kind, &cr, false),
            Ok(Event::Delete(cr)) => cache.watched(kind, &cr, true),
            Err(e) => {
                tracing::warn!(kind = %kind, "watching {} failed (retrying): {e}", kind.plural())
            }
        }
    }
}

impl ResourceStore for CrStore {
    fn on_external_change(&self, f: OnChange) {
        *self.cache.listener.write() = Some(f);
    }

    fn get(&self, namespace: &str, kind: Kind, name: &str) -> Result<Option<Object>> {
        Ok(self.cache.get(kind, namespace, name))
    }

    fn list(&self, namespace: Option<&str>, kind: Kind) -> Result<Vec<Object>> {
        Ok(self.cache.list(kind, namespace))
    }

    fn create(&self, mut object: Object) -> Result<Object> {
        let (ns, kind, name) = (
            object.namespace().to_string(),
            object.kind,
            object.name().to_string(),
        );
        object.metadata.resource_version = None;
        object.metadata.updated_at = Some(jiff::Timestamp::now());
        let status = std::mem::take(&mut object.status);
        let _writing = self.cache.writing(kind, &ns, &name);
        let created = match self.wait(
            self.api(&ns, kind)
                .create(&PostParams::default(), &to_custom_resource(&object)),
        ) {
            Ok(cr) => cr,
            Err(e) if api_code(&e) == Some(409) => {
                return Err(StoreError::AlreadyExists {
                    kind,
                    namespace: ns,
                    name,
                });
            }
            Err(e) => return Err(refused(kind, &name, "create", e)),
        };
        let created = self.written(kind, &created);
        // The status subresource ignores a status sent with the object.
        if status != Status::default() {
            return self.update_status(&ns, kind, &name, status);
        }
        Ok(created)
    }

    fn update(&self, object: Object) -> Result<Object> {
        let (ns, kind, name) = (
            object.namespace().to_string(),
            object.kind,
            object.name().to_string(),
        );
        let asked = object.metadata.resource_version.clone();
        let _writing = self.cache.writing(kind, &ns, &name);
        for _ in 0..RETRIES {
            let mut cr = self.fetch(&ns, kind, &name)?;
            let now = cr.metadata.resource_version.clone().unwrap_or_default();
            if let Some(asked) = &asked
                && *asked != now
            {
                return Err(StoreError::Conflict {
                    kind,
                    name,
                    expected: asked.clone(),
                    actual: now,
                });
            }
            cr.metadata.labels =
                (!object.metadata.labels.is_empty()).then(|| object.metadata.labels.clone());
            let annotations = cr.metadata.annotations.get_or_insert_default();
            annotations.insert(UPDATED_AT.into(), jiff::Timestamp::now().to_string());
            match &object.metadata.updated_by {
                Some(who) => annotations.insert(UPDATED_BY.into(), who.clone()),
                None => annotations.remove(UPDATED_BY),
            };
            cr.data["spec"] = object.spec.clone();
            match self.wait(
                self.api(&ns, kind)
                    .replace(&name, &PostParams::default(), &cr),
            ) {
                Ok(cr) => return Ok(self.written(kind, &cr)),
                Err(e) if api_code(&e) == Some(409) && asked.is_none() => continue,
                Err(e) if api_code(&e) == Some(409) => {
                    let actual = self
                        .fetch(&ns, kind, &name)
                        .ok()
                        .and_then(|c| c.metadata.resource_version)
                        .unwrap_or_default();
                    return Err(StoreError::Conflict {
                        kind,
                        name,
                        expected: asked.unwrap_or_default(),
                        actual,
                    });
                }
                Err(e) if api_code(&e) == Some(404) => return Err(not_found(kind, &ns, &name)),
                Err(e) => return Err(refused(kind, &name, "update", e)),
            }
        }
        Err(remote(
            format!("update {} {name:?}", kind.human()),
            "it kept changing under this write: try again",
        ))
    }

    fn update_status(
        &self,
        namespace: &str,
        kind: Kind,
        name: &str,
        status: Status,
    ) -> Result<Object> {
        let status = serde_json::to_value(&status)?;
        let _writing = self.cache.writing(kind, namespace, name);
        // The cached object first (its version is usually current); the API's on a conflict.
        let mut current = self
            .cache
            .get(kind, namespace, name)
            .map(|o| to_custom_resource(&o));
        for _ in 0..RETRIES {
            let mut cr = match current.take() {
                Some(cr) => cr,
                None => self.fetch(namespace, kind, name)?,
            };
            cr.data["status"] = status.clone();
            let api = self.api(namespace, kind);
            match self.wait(api.replace_status(name, &PostParams::default(), &cr)) {
                Ok(cr) => return Ok(self.written(kind, &cr)),
                Err(e) if api_code(&e) == Some(409) => continue,
                Err(e) if api_code(&e) == Some(404) => {
                    return Err(not_found(kind, namespace, name));
                }
                Err(e) => return Err(refused(kind, name, "write the status of", e)),
            }
        }
        Err(remote(
            format!("write the status of {} {name:?}", kind.human()),
            "it kept changing under this write: try again",
        ))
    }

    fn delete(&self, namespace: &str, kind: Kind, name: &str) -> Result<Object> {
        let api = self.api(namespace, kind);
        let _writing = self.cache.writing(kind, namespace, name);
        let gone = match self.wait(api.delete(name, &DeleteParams::background())) {
            Ok(either) => either.left(),
            Err(e) if api_code(&e) == Some(404) => {
                self.cache.remove(kind, namespace, name);
                return Err(not_found(kind, namespace, name));
            }
            Err(e) => return Err(refused(kind, name, "delete", e)),
        };
        let cached = self.cache.get(kind, namespace, name);
        let last = gone
            .map(|cr| from_custom_resource(kind, &cr))
            .or(cached)
            .unwrap_or_else(|| Object::new(kind, namespace, name, serde_json::json!({})));
        // Unless the watch already saw the delete (then every older event too), older events
        // still on their way must not bring it back.
        if self.cache.get(kind, namespace, name).is_some() {
            self.cache.deleted.lock().insert(
                (kind, namespace.to_string(), name.to_string()),
                version(&last),
            );
            self.cache.remove(kind, namespace, name);
        }
        Ok(last)
    }

    /// Also creates the Kubernetes namespace of that name when it is missing (resources of
    /// a Dispatch namespace live in it).
    fn put_namespace(&self, name: &str, created: jiff::Timestamp) -> Result<bool> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "dispatch".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        match self.wait(api.create(&PostParams::default(), &ns)) {
            Ok(_) => {}
            Err(e) if api_code(&e) == Some(409) => {}
            Err(e) => {
                return Err(remote(
                    format!("create the Kubernetes namespace {name:?}"),
                    format!("{e} (create it with `kubectl create namespace {name}`)"),
                ));
            }
        }
        self.sql.put_namespace(name, created)
    }

    fn list_namespaces(&self) -> Result<Vec<dispatch_store::NamespaceRecord>> {
        self.sql.list_namespaces()
    }

    fn set_run_history_budget(
        &self,
        name: &str,
        budget: Option<u64>,
        created: jiff::Timestamp,
    ) -> Result<()> {
        self.sql.set_run_history_budget(name, budget, created)
    }

    /// Deletes the namespace's custom resources (the Kubernetes namespace stays: it may hold
    /// more than Dispatch's).
    fn delete_namespace(&self, name: &str) -> Result<bool> {
        for kind in Kind::ALL {
            for o in self.cache.list(kind, Some(name)) {
                match self.delete(name, kind, o.name()) {
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.sql.delete_namespace(name)
    }
}
