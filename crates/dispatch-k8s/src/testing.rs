//! For tests only (feature `testing`): an in-memory stand-in for the part of a Kubernetes API
//! server that [`crate::store::CrStore`] talks to — `dispatch.dev/v1` custom resources
//! (create, get, list, replace, status, delete, and watches that stream) and namespaces —
//! and dispatcher's `dispatcher.ivan.vc/v1alpha1` JobExecutions (the same, and merge patches
//! of their status).
//!
//! It keeps what an API server guarantees and the store relies on: one resource version
//! counter for every write, `409 AlreadyExists` / `409 Conflict` / `404 NotFound`, the status
//! subresource (a status sent with the object is ignored; `/status` changes only the status),
//! `metadata.generation` bumped by a changed spec, and watches from a version that replay
//! every later event. It is not a cluster: nothing runs.

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use dispatch_core::Kind;
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use serde_json::{Value, json};

/// The body of a fake answer (whole, or a watch that streams).
pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// What a watch replays: one event of one object.
struct Logged {
    version: u64,
    plural: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    version: u64,
    uids: u64,
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    log: Vec<Logged>,
    namespaces: BTreeSet<String>,
    requests: Vec<String>,
    /// Watches hear nothing while set (a network partition).
    cut: bool,
    /// Watches started before the last `partition` end with it.
    epoch: u64,
    /// Versions before this one are gone (a watch from one gets 410 Gone).
    compacted: u64,
}

/// See the module docs. Clones share one state.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    tick: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

fn whole(status: u16, body: &Value) -> http::Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            http_body_util::Full::new(bytes)
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        )
        .unwrap_or_default()
}

fn failure(code: u16, reason: &str, message: String) -> http::Response<Body> {
    whole(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "message": message, "code": code}),
    )
}

fn kind_of(plural: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.plural() == plural)
}

/// dispatcher's JobExecutions, the one kind served outside `dispatch.dev/v1`.
const EXECUTIONS: &str = "jobexecutions";

/// `apiVersion` and `kind` of a plural this fake serves.
fn type_of(plural: &str) -> Option<(String, &'static str)> {
    if plural == EXECUTIONS {
        return Some((
            format!("{}/{}", crate::EXECUTION_GROUP, crate::EXECUTION_VERSION),
            "JobExecution",
        ));
    }
    kind_of(plural).map(|k| (format!("{}/v1", crate::GROUP), k.as_str()))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The parts of a request path this fake serves.
enum Target {
    Namespaces,
    /// (plural, namespace or all, name, status subresource)
    Resources(String, Option<String>, Option<String>, bool),
}

fn target(path: &str) -> Option<Target> {
    if path == "/api/v1/namespaces" {
        return Some(Target::Namespaces);
    }
    let executions = format!(
        "/apis/{}/{}/",
        crate::EXECUTION_GROUP,
        crate::EXECUTION_VERSION
    );
    let rest = match path.strip_prefix(&executions) {
        Some(rest) if rest.ends_with(EXECUTIONS) || rest.contains(&format!("/{EXECUTIONS}/")) => {
            rest
        }
        Some(_) => return None,
        None => path.strip_prefix(&format!("/apis/{}/v1/", crate::GROUP))?,
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let s = |x: &str| x.to_string();
    match parts.as_slice() {
        [plural] => Some(Target::Resources(s(plural), None, None, false)),
        ["namespaces", ns, plural] => Some(Target::Resources(s(plural), Some(s(ns)), None, false)),
        ["namespaces", ns, plural, name] => Some(Target::Resources(
            s(plural),
            Some(s(ns)),
            Some(s(name)),
            false,
        )),
        ["namespaces", ns, plural, name, "status"] => Some(Target::Resources(
            s(plural),
            Some(s(ns)),
            Some(s(name)),
            true,
        )),
        _ => None,
    }
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

impl FakeApi {
    pub fn new() -> FakeApi {
        FakeApi {
            state: Arc::default(),
            tick: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// A kube client whose every request this fake answers (404 for what it does not serve).
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let me = me.clone();
            async move {
                Ok::<_, Infallible>(match me.serve(req).await {
                    Some(r) => r,
                    None => failure(404, "NotFound", "not served by the fake".into()),
                })
            }
        });
        kube::Client::new(svc, "default")
    }

    /// Whether this fake serves `path` (to share a client with another fake).
    pub fn serves(path: &str) -> bool {
        target(path).is_some()
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// The stored object, as `kubectl get -o json` would show it.
    pub fn object(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.iter().cloned().collect()
    }

    /// Stores an object as `kubectl apply` would (create, or replace labels, annotations
    /// and spec), and returns it as stored.
    pub fn apply(&self, object: Value) -> Value {
        let plural = match object["kind"].as_str() {
            Some("JobExecution") => EXECUTIONS.to_string(),
            k => k
                .and_then(Kind::parse)
                .map(|k| k.plural())
                .unwrap_or_default()
                .to_string(),
        };
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let exists = self.object(&plural, &ns, name);
        let (_, v) = match exists {
            None => self.create(&plural, &ns, object),
            Some(old) => {
                let mut next = old.clone();
                next["metadata"]["labels"] = object["metadata"]["labels"].clone();
                next["metadata"]["annotations"] = object["metadata"]["annotations"].clone();
                next["spec"] = object["spec"].clone();
                self.replace(&plural, &ns, name, next, false)
            }
        };
        v
    }

    /// Deletes an object as `kubectl delete` would; `false` when there was none.
    pub fn remove(&self, plural: &str, ns: &str, name: &str) -> bool {
        self.delete(plural, ns, name).0 == 200
    }

    fn record(&self, st: &mut State, plural: &str, ns: &str, kind: &'static str, object: &Value) {
        st.log.push(Logged {
            version: st.version,
            plural: plural.into(),
            namespace: ns.into(),
            kind,
            object: object.clone(),
        });
        self.tick.send_replace(st.version);
    }

    fn create(&self, plural: &str, ns: &str, mut object: Value) -> (u16, Value) {
        let mut st = self.lock();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let key = (plural.to_string(), ns.to_string(), name.clone());
        if st.objects.contains_key(&key) {
            return (409, json!(format!("{plural} {name:?} already exists")));
        }
        st.version += 1;
        st.uids += 1;
        let m = &mut object["metadata"];
        m["namespace"] = json!(ns);
        m["uid"] = json!(format!("uid-{}", st.uids));
        m["generation"] = json!(1);
        m["resourceVersion"] = json!(st.version.to_string());
        m["creationTimestamp"] = json!(
            jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .unwrap_or_default()
                .to_string()
        );
        if let Some(o) = object.as_object_mut() {
            o.remove("status");
        }
        st.objects.insert(key, object.clone());
        self.record(&mut st, plural, ns, "ADDED", &object);
        (201, object)
    }

    fn replace(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        sent: Value,
        status: bool,
    ) -> (u16, Value) {
        let mut st = self.lock();
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        let Some(old) = st.objects.get(&key).cloned() else {
            return (404, json!(format!("{plural} {name:?} not found")));
        };
        let asked = sent["metadata"]["resourceVersion"].as_str();
        let have = old["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if asked.is_some_and(|a| a != have) {
            return (
                409,
                json!(format!(
                    "Operation cannot be fulfilled on {plural} {name:?}: the object has been modified; please apply your changes to the latest version and try again"
                )),
            );
        }
        let mut next = old.clone();
        if status {
            next["status"] = sent["status"].clone();
        } else {
            next["metadata"]["labels"] = sent["metadata"]["labels"].clone();
            next["metadata"]["annotations"] = sent["metadata"]["annotations"].clone();
            next["spec"] = sent["spec"].clone();
            if old["spec"] != sent["spec"] {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                next["metadata"]["generation"] = json!(g + 1);
            }
        }
        if next == old {
            return (200, old);
        }
        st.version += 1;
        next["metadata"]["resourceVersion"] = json!(st.version.to_string());
        st.objects.insert(key, next.clone());
        self.record(&mut st, plural, ns, "MODIFIED", &next);
        (200, next)
    }

    fn delete(&self, plural: &str, ns: &str, name: &str) -> (u16, Value) {
        let mut st = self.lock();
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        let Some(mut gone) = st.objects.remove(&key) else {
            return (404, json!(format!("{plural} {name:?} not found")));
        };
        st.version += 1;
        gone["metadata"]["resourceVersion"] = json!(st.version.to_string());
        self.record(&mut st, plural, ns, "DELETED", &gone);
        (200, gone)
    }

    fn list(&self, plural: &str, ns: Option<&str>) -> Value {
        let st = self.lock();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((p, n, _), _)| p == plural && ns.is_none_or(|ns| n == ns))
            .map(|(_, v)| v.clone())
            .collect();
        let (api_version, kind) = type_of(plural).unwrap_or_else(|| (String::new(), "Unknown"));
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": st.version.to_string()}, "items": items})
    }

    /// A watch: every event after `from`, then each new one as it happens, until the client
    /// hangs up.
    /// Cuts every watch off while `changes` runs, then ends them and forgets the versions
    /// they had reached (etcd compaction): a watcher must list again (410 Gone) to learn what
    /// changed meanwhile.
    pub fn partition(&self, changes: impl FnOnce(&FakeApi)) {
        self.lock().cut = true;
        changes(self);
        let mut st = self.lock();
        st.cut = false;
        st.epoch += 1;
        st.compacted = st.version;
        self.tick.send_replace(st.version);
    }

    fn watch(&self, plural: String, ns: Option<String>, from: u64) -> http::Response<Body> {
        let me = self.clone();
        let rx = self.tick.subscribe();
        let (epoch, compacted) = {
            let st = self.lock();
            (st.epoch, st.compacted)
        };
        if from < compacted {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({compacted})")}});
            return whole(200, &gone);
        }
        let events = futures_util::stream::unfold((from, rx), move |(mut seen, mut rx)| {
            let me = me.clone();
            let (plural, ns) = (plural.clone(), ns.clone());
            async move {
                loop {
                    let (ended, cut) = {
                        let st = me.lock();
                        (st.epoch != epoch, st.cut)
                    };
                    if ended {
                        return None;
                    }
                    if cut {
                        rx.changed().await.ok()?;
                        continue;
                    }
                    let mut lines = Vec::new();
                    {
                        let st = me.lock();
                        let after = seen;
                        for e in st.log.iter().filter(|e| e.version > after) {
                            seen = e.version;
                            if e.plural == plural && ns.as_ref().is_none_or(|n| *n == e.namespace) {
                                let ev = json!({"type": e.kind, "object": e.object});
                                lines.extend(serde_json::to_vec(&ev).unwrap_or_default());
                                lines.push(b'\n');
                            }
                        }
                    }
                    if !lines.is_empty() {
                        let frame = http_body::Frame::data(Bytes::from(lines));
                        return Some((Ok::<_, Infallible>(frame), (seen, rx)));
                    }
                    rx.changed().await.ok()?;
                }
            }
        });
        http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(
                StreamBody::new(events)
                    .map_err(|never: Infallible| match never {})
                    .boxed_unsync(),
            )
            .unwrap_or_default()
    }

    /// Answers a request this fake serves; `None` for any other.
    pub async fn serve(
        &self,
        req: http::Request<kube::client::Body>,
    ) -> Option<http::Response<Body>> {
        let target = target(req.uri().path())?;
        let method = req.method().as_str().to_string();
        let uri = req.uri().clone();
        self.lock().requests.push(format!(
            "{method} {}",
            uri.path_and_query().map(|p| p.as_str()).unwrap_or_default()
        ));
        let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let answer = |(code, v): (u16, Value)| match code {
            200 | 201 => whole(code, &v),
            404 => failure(404, "NotFound", v.as_str().unwrap_or_default().into()),
            _ if v.as_str().is_some_and(|m| m.contains("already exists")) => {
                failure(409, "AlreadyExists", v.as_str().unwrap_or_default().into())
            }
            _ => failure(code, "Conflict", v.as_str().unwrap_or_default().into()),
        };
        Some(match target {
            Target::Namespaces => {
                let name = sent["metadata"]["name"].as_str().unwrap_or_default();
                if self.lock().namespaces.insert(name.to_string()) {
                    whole(201, &sent)
                } else {
                    failure(
                        409,
                        "AlreadyExists",
                        format!("namespaces {name:?} already exists"),
                    )
                }
            }
            Target::Resources(plural, ns, name, status) => {
                if type_of(&plural).is_none() {
                    return Some(failure(404, "NotFound", format!("no resource {plural}")));
                }
                let ns_or_default = ns.clone().unwrap_or_else(|| "default".into());
                match (method.as_str(), name) {
                    ("GET", None)
                        if query(&uri, "watch").is_some_and(|w| w == "true" || w == "1") =>
                    {
                        let from = query(&uri, "resourceVersion")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        self.watch(plural, ns, from)
                    }
                    ("GET", None) => whole(200, &self.list(&plural, ns.as_deref())),
                    ("POST", None) => answer(self.create(&plural, &ns_or_default, sent)),
                    ("GET", Some(name)) => match self.object(&plural, &ns_or_default, &name) {
                        Some(v) => whole(200, &v),
                        None => failure(404, "NotFound", format!("{plural} {name:?} not found")),
                    },
                    ("PUT", Some(name)) => {
                        answer(self.replace(&plural, &ns_or_default, &name, sent, status))
                    }
                    ("DELETE", Some(name)) => answer(self.delete(&plural, &ns_or_default, &name)),
                    ("PATCH", Some(name)) => {
                        let Some(mut next) = self.object(&plural, &ns_or_default, &name) else {
                            return Some(failure(
                                404,
                                "NotFound",
                                format!("{plural} {name:?} not found"),
                            ));
                        };
                        merge(&mut next, &sent);
                        if let Some(m) = next["metadata"].as_object_mut() {
                            m.remove("resourceVersion");
                        }
                        answer(self.replace(&plural, &ns_or_default, &name, next, status))
                    }
                    _ => failure(405, "MethodNotAllowed", format!("{method} is not served")),
                }
            }
        })
    }
}
