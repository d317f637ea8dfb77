//! Several active servers on one shared store (PostgreSQL, DESIGN §8). Each server is a
//! replica with an id and a lease in the store that it renews every quarter of
//! `--replica-lease`; it owns the async runs and job executions it accepted (their
//! `replica`) and alone runs and writes them. Every renewal also takes over the work of
//! replicas whose lease ended (one taker each: see `RecordStore::take_over`): their QUEUED
//! runs join this server's queue, RUNNING ones count a failed attempt and are retried per
//! their policy, pending callbacks are sent, active job executions run again.
//!
//! A replica that cannot renew for three quarters of its lease stops its attempts and forgets
//! its queue before the lease can end (others will take that work over), then joins again
//! under a new id: no run executes twice at once. One replica is elected (the store's
//! advisory lock, or the Kubernetes Lease) for work only one may do: cron fires and brokers'
//! consumers. With one server (SQLite) none of this runs: start-up takes every active record.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dispatch_store::{TakeOver, Taken};
use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::state::AppState;

/// This server's identity among the replicas.
#[derive(Default)]
pub struct Replica {
    /// `None`: the only server of its store.
    id: RwLock<Option<String>>,
    /// The store's election, when it holds one (set at start-up).
    elected: std::sync::OnceLock<watch::Receiver<bool>>,
    /// `DATA_DIR/replica`, locked while this process lives: the id a server started again
    /// on the same data dir takes back (with its work, at once rather than after its lease).
    file: parking_lot::Mutex<Option<std::fs::File>>,
    /// Runs and job executions taken over from servers whose lease ended (`/metrics`).
    taken: AtomicU64,
    /// Lease renewals that failed, and times this server fenced itself (`/metrics`).
    renew_failures: AtomicU64,
    fenced: AtomicU64,
}

impl Replica {
    /// The id that owns what this server accepts now (`None` with one server).
    pub fn id(&self) -> Option<String> {
        self.id.read().clone()
    }

    /// Whether a record owned by `owner` is this server's (no copy of the id).
    pub fn owns(&self, owner: Option<&str>) -> bool {
        self.id.read().as_deref() == owner
    }

    fn set(&self, id: String) {
        if let Some(f) = self.file.lock().as_mut() {
            use std::io::{Seek as _, Write as _};
            let saved = f
                .set_len(0)
                .and_then(|()| f.rewind())
                .and_then(|()| f.write_all(id.as_bytes()));
            if let Err(e) = saved {
                tracing::warn!("saving this server's replica id: {e}");
            }
        }
        *self.id.write() = Some(id);
    }

    /// The id saved in the data dir by this server's last run there, if this process could
    /// lock the file (no other process uses the data dir); the file stays locked.
    fn saved(&self, data_dir: Option<&std::path::Path>) -> Option<String> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = data_dir?.join("replica");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ok()?;
        if f.try_lock().is_err() {
            tracing::warn!(
                "another process uses {}: this server takes a new replica id",
                path.display()
            );
            return None;
        }
        let mut id = String::new();
        let _ = f.read_to_string(&mut id);
        *self.file.lock() = Some(f);
        let id = id.trim().to_string();
        (!id.is_empty()).then_some(id)
    }
}

/// A new replica id: the host's name (a pod's name on Kubernetes) and a unique suffix.
fn new_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "dispatch".into());
    let unique = dispatch_core::run::new_run_id().to_lowercase();
    format!("{host}-{}", &unique[unique.len() - 8..])
}

/// Whether this server leads its installation now, for work only one server may do: the
/// backend's election (a Kubernetes Lease), else the store's; `None`: it is the only server.
pub fn leadership(state: &AppState) -> Option<watch::Receiver<bool>> {
    state
        .backend
        .leadership()
        .or_else(|| state.replica.elected.get().cloned())
}

/// Start-up: joins the replicas (a shared store) and takes charge of the work nobody holds
/// (with one server: every active record).
pub async fn join(state: &Arc<AppState>) -> Taken {
    let shared = state.stores.records.shared();
    if shared {
        let saved = state.replica.saved(state.config.data_dir.as_deref());
        let mut wait = Duration::from_millis(100);
        loop {
            let id = saved.clone().unwrap_or_else(new_id);
            let ttl = state.config.replica_lease;
            let i = id.clone();
            match state.db(move |s| s.lease(&i, ttl, true)).await {
                Ok(_) => {
                    tracing::info!(replica = %id, lease = ?ttl, "joined the servers sharing the store");
                    state.replica.set(id);
                    break;
                }
                Err(e) => {
                    tracing::error!("joining the servers sharing the store (retrying): {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        let (tx, rx) = watch::channel(false);
        if state.stores.records.elect(Box::new(move |leads| {
            tx.send_replace(leads);
        })) {
            let _ = state.replica.elected.set(rx);
        }
    }
    take(state, TakeOver::Start).await.unwrap_or_default()
}

/// Takes over what `how` says nobody holds; `None` when the store could not be asked.
async fn take(state: &Arc<AppState>, how: TakeOver) -> Option<Taken> {
    let me = state.replica.id().unwrap_or_default();
    match state.db(move |s| s.take_over(&me, how)).await {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!("taking over work nobody holds: {e}");
            None
        }
    }
}

/// The replica's gauges and counters for `/metrics` (nothing with one server).
pub fn render_metrics(state: &AppState) -> String {
    let mut out = String::new();
    if !state.stores.records.shared() {
        return out;
    }
    let r = &state.replica;
    let leads = leadership(state).is_none_or(|rx| *rx.borrow());
    let rows: [(&str, &str, &str, u64); 4] = [
        (
            "dispatch_replica_leader",
            "gauge",
            "1 when this server is the elected one of those sharing its database (cron, brokers).",
            leads as u64,
        ),
        (
            "dispatch_replica_taken_over_total",
            "counter",
            "Async runs, callbacks and job executions taken over from servers whose lease ended.",
            r.taken.load(Ordering::Relaxed),
        ),
        (
            "dispatch_replica_lease_renewal_failures_total",
            "counter",
            "Renewals of this server's lease that failed.",
            r.renew_failures.load(Ordering::Relaxed),
        ),
        (
            "dispatch_replica_fenced_total",
            "counter",
            "Times this server dropped its work because its lease could not be kept.",
            r.fenced.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}
# TYPE {name} {kind}
{name} {v}"
        );
    }
    out
}

/// Runs, callbacks and job executions this server just took charge of.
pub async fn adopt(state: &Arc<AppState>, taken: Taken) {
    crate::queue::recover(state, taken.runs).await;
    crate::callbacks::resume(state, taken.callbacks);
    crate::jobs::recover(state, taken.jobs).await;
}

/// The lease keeper (a shared store only): renews, takes over, and fences this server when
/// its lease cannot be kept.
pub fn spawn(state: Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    if !state.stores.records.shared() {
        return None;
    }
    Some(tokio::spawn(async move {
        let ttl = state.config.replica_lease;
        let mut tick = tokio::time::interval(ttl / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed = Instant::now();
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            let Some(id) = state.replica.id() else {
                return;
            };
            let asked = Instant::now();
            let i = id.clone();
            match state.db(move |s| s.lease(&i, ttl, false)).await {
                Ok(true) => renewed = asked,
                Ok(false) => {
                    tracing::error!(replica = %id, "this server's lease was taken over: its work now runs elsewhere");
                    fence(&state).await;
                    renewed = Instant::now();
                    continue;
                }
                Err(e) => {
                    state.replica.renew_failures.fetch_add(1, Ordering::Relaxed);
                    if renewed.elapsed() >= ttl * 3 / 4 {
                        tracing::error!(replica = %id, "the lease could not be renewed in time ({e}): stopping this server's runs before another server takes them over");
                        fence(&state).await;
                        renewed = Instant::now();
                    } else {
                        tracing::warn!(replica = %id, "renewing the lease (retrying): {e}");
                    }
                    continue;
                }
            }
            // Records of no live server arise only from a race (a server taken over while it
            // still accepted runs): looked for once a minute, not on every renewal.
            ticks += 1;
            let how = if ticks.is_multiple_of(ORPHAN_SWEEP_TICKS) {
                TakeOver::Orphans
            } else {
                TakeOver::Expired
            };
            if let Some(taken) = take(&state, how).await
                && !taken.is_empty()
            {
                let n = taken.runs.len() + taken.callbacks.len() + taken.jobs.len();
                state.replica.taken.fetch_add(n as u64, Ordering::Relaxed);
                adopt(&state, taken).await;
            }
            // Cancels asked by other servers whose notification did not arrive.
            let i = id.clone();
            if let Ok(asked) = state.db(move |s| s.cancel_requests(&i)).await {
                for (ns, run) in asked {
                    if crate::queue::cancel_here(&state, &ns, &run, None)
                        .await
                        .is_some()
                    {
                        tracing::info!(%run, "cancelled a run another server asked to cancel");
                    }
                }
            }
            if leadership(&state).is_some_and(|rx| *rx.borrow()) {
                crate::deliveries::resync(&state).await;
            }
        }
    }))
}

/// Renewals between two looks for records of no live server (24 × a quarter of the default
/// 10 s lease: once a minute).
const ORPHAN_SWEEP_TICKS: u64 = 24;

/// This server may no longer own what it holds: its attempts stop without writing (their
/// records stay as they are, for the server that takes them over), its queue and its job
/// executions are forgotten, and it joins again under a new id.
async fn fence(state: &Arc<AppState>) {
    state.replica.fenced.fetch_add(1, Ordering::Relaxed);
    state.queue.forget_all();
    crate::jobs::stop_all(state);
    let id = new_id();
    let ttl = state.config.replica_lease;
    let i = id.clone();
    match state.db(move |s| s.lease(&i, ttl, true)).await {
        Ok(_) => tracing::info!(replica = %id, "joined again under a new id"),
        Err(e) => {
            tracing::error!(replica = %id, "joining again (retried at the next renewal): {e}")
        }
    }
    state.replica.set(id);
}

/// A clean stop: the lease ends now, so that the others take this server's work over at
/// their next renewal instead of after the lease.
pub async fn leave(state: &AppState) {
    if !state.stores.records.shared() {
        return;
    }
    if let Some(id) = state.replica.id() {
        let store = state.stores.records.clone();
        let _ = tokio::task::spawn_blocking(move || store.leave(&id)).await;
    }
}
