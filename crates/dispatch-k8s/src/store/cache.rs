//! The watch-fed cache of every kind's objects: what reads answer from, what writes apply
//! their answers to, and what tells a change this process did not make from its own.

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};

use dispatch_core::{Kind, Object};
use dispatch_store::{Changed, OnChange};
use kube::api::DynamicObject;

use super::*;

pub(super) type Key = (String, String);

/// What the watches and this process's own writes know of the cluster's resources.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) objects: RwLock<HashMap<Kind, BTreeMap<Key, Object>>>,
    /// Objects this process deleted, with their last version, until the watch reports the
    /// delete: an older event still on its way must not bring them back.
    pub(super) deleted: Mutex<HashMap<(Kind, String, String), Option<u64>>>,
    /// Objects this process is writing now: their watch events may come before the write's
    /// answer, and are not told.
    pub(super) writing: Mutex<HashMap<(Kind, String, String), usize>>,
    pub(super) listener: RwLock<Option<OnChange>>,
}

/// Marks an object as being written by this process while it lives.
pub(super) struct Writing<'a> {
    cache: &'a Cache,
    key: (Kind, String, String),
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut w = self.cache.writing.lock();
        if let Some(n) = w.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.key);
            }
        }
    }
}

impl Cache {
    pub(super) fn writing(&self, kind: Kind, ns: &str, name: &str) -> Writing<'_> {
        let key = (kind, ns.to_string(), name.to_string());
        *self.writing.lock().entry(key.clone()).or_default() += 1;
        Writing { cache: self, key }
    }

    pub(super) fn ours(&self, kind: Kind, ns: &str, name: &str) -> bool {
        self.writing
            .lock()
            .contains_key(&(kind, ns.to_string(), name.to_string()))
    }

    /// Stores `o` unless the cache has it at the same or a newer version; `true` when it
    /// changed.
    pub(super) fn apply(&self, o: Object) -> bool {
        let key = (o.namespace().to_string(), o.name().to_string());
        let v = version(&o);
        if let Some(gone) = self
            .deleted
            .lock()
            .get(&(o.kind, key.0.clone(), key.1.clone()))
            && !older(*gone, v)
        {
            return false;
        }
        let mut all = self.objects.write();
        let of_kind = all.entry(o.kind).or_default();
        match of_kind.get(&key) {
            Some(have) if have.metadata.resource_version == o.metadata.resource_version => false,
            Some(have) if older(v, version(have)) => false,
            _ => {
                of_kind.insert(key, o);
                true
            }
        }
    }

    /// Removes an object; `true` when the cache had it.
    pub(super) fn remove(&self, kind: Kind, ns: &str, name: &str) -> bool {
        let mut all = self.objects.write();
        all.get_mut(&kind)
            .and_then(|m| m.remove(&(ns.to_string(), name.to_string())))
            .is_some()
    }

    pub(super) fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Object> {
        let all = self.objects.read();
        all.get(&kind)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    pub(super) fn list(&self, kind: Kind, ns: Option<&str>) -> Vec<Object> {
        let all = self.objects.read();
        let mut out: Vec<Object> = all
            .get(&kind)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| ns.is_none_or(|ns| o.namespace() == ns))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            a.name()
                .cmp(b.name())
                .then(a.namespace().cmp(b.namespace()))
        });
        out
    }

    pub(super) fn tell(&self, kind: Kind, ns: &str, name: &str, deleted: bool) {
        if let Some(f) = &*self.listener.read() {
            f(Changed {
                kind,
                namespace: ns.to_string(),
                name: name.to_string(),
                deleted,
            });
        }
    }

    /// One event of a kind's watch; changes this process did not make are told.
    pub(super) fn watched(&self, kind: Kind, cr: &DynamicObject, deleted: bool) {
        let o = from_custom_resource(kind, cr);
        let (ns, name) = (o.namespace().to_string(), o.name().to_string());
        if deleted {
            let ours = self
                .deleted
                .lock()
                .remove(&(kind, ns.clone(), name.clone()))
                .is_some();
            if self.remove(kind, &ns, &name) && !ours && !self.ours(kind, &ns, &name) {
                self.tell(kind, &ns, &name, true);
            }
        } else if self.apply(o) && !self.ours(kind, &ns, &name) {
            self.tell(kind, &ns, &name, false);
        }
    }

    /// A full list of a kind (the watch started over): what is not in it is gone.
    pub(super) fn relisted(&self, kind: Kind, listed: Vec<DynamicObject>) {
        let now: BTreeMap<Key, Object> = listed
            .iter()
            .map(|cr| from_custom_resource(kind, cr))
            .map(|o| ((o.namespace().to_string(), o.name().to_string()), o))
            .collect();
        let before: Vec<Key> = {
            let all = self.objects.read();
            all.get(&kind)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        };
        for (ns, name) in before {
            if !now.contains_key(&(ns.clone(), name.clone())) && self.remove(kind, &ns, &name) {
                self.tell(kind, &ns, &name, true);
            }
        }
        self.deleted
            .lock()
            .retain(|(k, ns, name), _| *k != kind || now.contains_key(&(ns.clone(), name.clone())));
        for ((ns, name), o) in now {
            if self.apply(o) {
                self.tell(kind, &ns, &name, false);
            }
        }
    }
}
