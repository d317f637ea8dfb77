//! What servers sharing one database tell each other: every write of a resource's spec
//! (create, update, delete — not a status), of a token or of a namespace sends a
//! notification on one channel (`pg_notify`, in the writing statement or transaction: it is
//! delivered when that commits, and only then). Each store listens on a connection of its
//! own, in a thread of its own, and hands the others' changes to the callbacks the server
//! registered ([`crate::ResourceStore::on_external_change`],
//! [`crate::RecordStore::on_shared_change`]); its own writes it skips (each store has an
//! origin id). After its connection is lost and made again, what changed meanwhile is not
//! known: every resource is reported changed, tokens and namespaces read again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dispatch_core::Kind;
use parking_lot::RwLock;
use postgres::GenericClient;
use postgres::fallible_iterator::FallibleIterator as _;
use serde_json::{Value, json};

use crate::{Changed, OnChange, OnShared, Result, Shared};

/// The channel every server of a database listens on.
pub(super) const CHANNEL: &str = "dispatch_changes";

/// Opens the listener's own connection.
pub(super) type Connect = Box<dyn Fn() -> Result<postgres::Client> + Send + Sync>;

/// The callbacks, the thread's state, and how to connect.
pub(super) struct Listener {
    pub(super) origin: String,
    on_change: RwLock<Option<OnChange>>,
    on_shared: RwLock<Option<OnShared>>,
    started: AtomicBool,
    pub(super) stop: AtomicBool,
    connect: Connect,
    /// Resources as `get` read them, while the listener hears every change (see [`Cache`]).
    pub(super) cache: Cache,
    /// The listening connection made with the store ([`Listener::prepare`]).
    prepared: parking_lot::Mutex<Option<postgres::Client>>,
}

/// A connection that listens on [`CHANNEL`].
fn listening(connect: &Connect) -> Result<postgres::Client> {
    let mut c = connect()?;
    c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    Ok(c)
}

/// Resources by (namespace, kind, name) as last read, `None` for absent ones: a `get` that
/// finds its key answers without the database. Only while the listening connection is up
/// (`live`): every write of a resource — this server's, and others' through their
/// notifications (specs and statuses) — drops its entry; a lost connection drops them all.
/// A read that raced with a drop does not fill the cache (`generation`).
#[derive(Default)]
pub(super) struct Cache {
    entries:
        RwLock<std::collections::HashMap<(String, Kind, String), Option<dispatch_core::Object>>>,
    generation: std::sync::atomic::AtomicU64,
    live: AtomicBool,
}

/// At most this many resources are kept (a bound on memory; past it the cache starts over).
const CACHE_MAX: usize = 100_000;

impl Cache {
    pub(super) fn get(
        &self,
        key: &(String, Kind, String),
    ) -> Option<Option<dispatch_core::Object>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        self.entries.read().get(key).cloned()
    }

    /// The generation to pass to [`Cache::fill`] (read before the database is).
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(super) fn fill(
        &self,
        key: (String, Kind, String),
        value: Option<dispatch_core::Object>,
        generation: u64,
    ) {
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        let mut e = self.entries.write();
        // Checked under the lock that drops take too: no drop came between the read and now.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if e.len() >= CACHE_MAX {
            e.clear();
        }
        e.insert(key, value);
    }

    pub(super) fn drop_key(&self, ns: &str, kind: Kind, name: &str) {
        let mut e = self.entries.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        e.remove(&(ns.to_string(), kind, name.to_string()));
    }

    pub(super) fn drop_namespace(&self, ns: &str) {
        let mut e = self.entries.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        e.retain(|k, _| k.0 != ns);
    }

    fn set_live(&self, live: bool) {
        let mut e = self.entries.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        e.clear();
        self.live.store(live, Ordering::Release);
    }
}

impl Listener {
    pub(super) fn new(connect: Connect) -> Arc<Listener> {
        Arc::new(Listener {
            origin: ulid::Ulid::new().to_string(),
            on_change: RwLock::new(None),
            on_shared: RwLock::new(None),
            started: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            connect,
            cache: Cache::default(),
            prepared: parking_lot::Mutex::new(None),
        })
    }

    /// Opens the listening connection now (the store is being made, before the server reads
    /// anything), for the thread to take when it starts; left to the thread if it fails.
    pub(super) fn prepare(&self) {
        match listening(&self.connect) {
            Ok(c) => *self.prepared.lock() = Some(c),
            Err(e) => tracing::warn!("listening for other servers' changes (retried): {e}"),
        }
    }

    /// The prepared connection if the thread never took it (to close it off async threads).
    pub(super) fn take_prepared(&self) -> Option<postgres::Client> {
        self.prepared.lock().take()
    }

    /// A new connection of its own kind (plain or TLS) to the database.
    pub(super) fn connect(&self) -> Result<postgres::Client> {
        (self.connect)()
    }

    pub(super) fn on_change(self: &Arc<Self>, f: OnChange) {
        *self.on_change.write() = Some(f);
        self.start();
    }

    pub(super) fn on_shared(self: &Arc<Self>, f: OnShared) {
        *self.on_shared.write() = Some(f);
        self.start();
    }

    fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("postgres-listen".into())
            .spawn(move || me.run());
    }

    /// Listens until the store is dropped; a lost connection is made again (backing off up
    /// to 5 s), then everything is reported changed.
    fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        // The connection made with the store listens from before the server's first read:
        // nothing changed since is missed. Any other one (that one failed, or a reconnect)
        // starts by reporting everything changed.
        let mut gap = true;
        let mut prepared = self.prepared.lock().take();
        if prepared.is_some() {
            gap = false;
        }
        while !self.stop.load(Ordering::Acquire) {
            let made = match prepared.take() {
                Some(c) => Ok(c),
                None => listening(&self.connect),
            };
            let mut client = match made {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("listening for other servers' changes (retrying): {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // From here every change is heard: the cache may answer.
            tracing::debug!(gap, "listening for other servers' changes");
            self.cache.set_live(true);
            if gap {
                self.everything_changed(&mut client);
            }
            gap = true;
            loop {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                // A new iterator for every wait: one `TimeoutIter` keeps its elapsed timer
                // after a quiet half second, and from then on returns at once without reading
                // the socket — the thread spun on a core and heard nothing more.
                let mut notifications = client.notifications();
                let next = notifications
                    .timeout_iter(Duration::from_millis(500))
                    .next();
                match next {
                    Ok(Some(n)) => self.told(n.payload()),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("the connection for other servers' changes ended: {e}");
                        self.cache.set_live(false);
                        break;
                    }
                }
            }
        }
    }

    /// One notification: another server's change, handed on (ours are skipped).
    fn told(&self, payload: &str) {
        tracing::debug!(payload, "a notification from the database");
        let Ok(v) = serde_json::from_str::<Value>(payload) else {
            return;
        };
        if v["o"].as_str() == Some(self.origin.as_str()) {
            return;
        }
        match v["t"].as_str() {
            Some("tokens") => self.shared(Shared::Tokens),
            Some("namespaces") => self.shared(Shared::Namespaces),
            Some("cancel") => {
                if let (Some(ns), Some(id)) = (v["ns"].as_str(), v["id"].as_str()) {
                    self.shared(Shared::Cancel {
                        namespace: ns.to_string(),
                        id: id.to_string(),
                    });
                }
            }
            Some(t @ ("resource" | "status")) => {
                let (Some(kind), Some(ns), Some(name)) = (
                    v["kind"].as_str().and_then(Kind::parse),
                    v["ns"].as_str(),
                    v["name"].as_str(),
                ) else {
                    return;
                };
                self.cache.drop_key(ns, kind, name);
                if t == "status" {
                    // A status another server wrote: read again, nothing to reconcile.
                    return;
                }
                if let Some(f) = &*self.on_change.read() {
                    f(Changed {
                        kind,
                        namespace: ns.to_string(),
                        name: name.to_string(),
                        deleted: v["deleted"].as_bool().unwrap_or(false),
                    });
                }
            }
            _ => {}
        }
    }

    fn shared(&self, what: Shared) {
        if let Some(f) = &*self.on_shared.read() {
            f(what);
        }
    }

    /// After a gap: every resource as changed, tokens and namespaces read again.
    fn everything_changed(&self, client: &mut postgres::Client) {
        self.shared(Shared::Tokens);
        self.shared(Shared::Namespaces);
        let Some(f) = &*self.on_change.read() else {
            return;
        };
        match client.query("SELECT kind, namespace, name FROM resources", &[]) {
            Ok(rows) => {
                for r in rows {
                    if let Some(kind) = Kind::parse(r.get(0)) {
                        f(Changed {
                            kind,
                            namespace: r.get(1),
                            name: r.get(2),
                            deleted: false,
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!("reading resources after a gap in other servers' changes: {e}")
            }
        }
    }
}

/// The payload of a resource's change.
pub(super) fn resource(origin: &str, kind: Kind, ns: &str, name: &str, deleted: bool) -> String {
    json!({"o": origin, "t": "resource", "kind": kind.as_str(), "ns": ns, "name": name,
        "deleted": deleted})
    .to_string()
}

/// The payload of a resource's new status (it only drops other servers' cached copies).
pub(super) fn status(origin: &str, kind: Kind, ns: &str, name: &str) -> String {
    json!({"o": origin, "t": "status", "kind": kind.as_str(), "ns": ns, "name": name}).to_string()
}

/// The payload of a change to tokens or namespaces, or of a cancel request.
pub(super) fn shared(origin: &str, what: Shared) -> String {
    match what {
        Shared::Tokens => json!({"o": origin, "t": "tokens"}),
        Shared::Namespaces => json!({"o": origin, "t": "namespaces"}),
        Shared::Cancel { namespace, id } => {
            json!({"o": origin, "t": "cancel", "ns": namespace, "id": id})
        }
    }
    .to_string()
}

/// Sends a notification from `c` (delivered when its transaction commits).
pub(super) fn notify(c: &mut impl GenericClient, payload: &str) -> Result<()> {
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])?;
    Ok(())
}
