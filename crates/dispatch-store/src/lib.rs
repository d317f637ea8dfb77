//! Persistence: two seams, [`ResourceStore`] (resources and namespaces) and [`RecordStore`]
//! (runs, the queue, job executions, events, drivers' state, tokens, audit), both implemented
//! by [`SqliteStore`] (WAL, migrations), and the on-disk content-addressed [`BlobStore`] for
//! source archives. On Kubernetes the resources are custom resources (`dispatch-k8s`'s
//! `CrStore` implements only [`ResourceStore`]); the records stay in SQL. The server keeps
//! sync calls' history in a [`RecordStore`] of its own (a second SQLite file), so that durable
//! writes never share a write-ahead log with 10k history records a second.
//!
//! Both traits are synchronous on purpose: SQLite calls block, so the server runs them on the
//! blocking pool (`spawn_blocking`), never on an async worker thread. A trait object
//! (`Arc<dyn RecordStore>`) is the seam where a fake or a second SQL backend plugs in.

mod blobs;
mod error;
mod pg;
mod shared;
mod sqlite;

use dispatch_core::auth::{ApiToken, AuditEntry};
use dispatch_core::events::{DeliveryState, StoredEvent};
use dispatch_core::versions::FunctionVersion;
use dispatch_core::{JobExecution, Kind, Object, Run, RunStatus, Status};

pub use blobs::{BlobInfo, BlobStore};
pub use error::StoreError;
pub use pg::{PgOptions, PgStore};
pub use sqlite::SqliteStore;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which runs to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub function: Option<String>,
    pub status: Option<RunStatus>,
    /// At most this many (default 100).
    pub limit: Option<usize>,
    /// Keyset pagination: only runs older than this run id (the last id of the previous page).
    pub after: Option<String>,
    /// Only runs created at or after / before this time (run ids are time-ordered ULIDs, so
    /// a window is a range of ids).
    pub since: Option<jiff::Timestamp>,
    pub until: Option<jiff::Timestamp>,
}

/// What run retention keeps (`dispatch server --run-retention`, `--runs-per-function`,
/// `--run-history-budget`). Active (QUEUED, RUNNING) runs are never pruned.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Finished runs created before this go.
    pub created_before: jiff::Timestamp,
    /// Finished runs beyond the newest this many of their function go.
    pub keep_per_function: usize,
    /// Run records of one namespace beyond this many bytes (their stored size): the oldest
    /// finished ones go. A namespace in `budgets` has that budget instead.
    pub max_bytes_per_namespace: Option<u64>,
    /// Namespaces' own budgets in bytes ([`ResourceStore::set_run_history_budget`]), or what
    /// is left of them for this store when other stores hold part of a namespace's records.
    pub budgets: std::collections::BTreeMap<String, u64>,
    /// Functions (namespace, name) that keep fewer than `keep_per_function` here: what other
    /// stores' finished runs of the function leave of it (see [`Retention::less`]).
    pub kept: std::collections::BTreeMap<(String, String), usize>,
}

impl Retention {
    /// The byte budget of `namespace` (`None`: unbounded).
    pub fn budget_of(&self, namespace: &str) -> Option<u64> {
        self.budgets
            .get(namespace)
            .copied()
            .or(self.max_bytes_per_namespace)
    }

    /// How many finished runs of a function are kept.
    pub fn keep_of(&self, namespace: &str, function: &str) -> usize {
        self.kept
            .get(&(namespace.to_string(), function.to_string()))
            .copied()
            .unwrap_or(self.keep_per_function)
    }

    /// The rules for a store that shares the bounds with stores that hold `used` (after
    /// their own prune): what is left of each namespace's budget and each function's count.
    pub fn less(&self, used: &[FunctionUsage]) -> Retention {
        let mut left = self.clone();
        for u in used {
            if let Some(budget) = left.budget_of(&u.namespace) {
                left.budgets
                    .insert(u.namespace.clone(), budget.saturating_sub(u.bytes));
            }
            let keep = left.keep_of(&u.namespace, &u.function);
            left.kept.insert(
                (u.namespace.clone(), u.function.clone()),
                keep.saturating_sub(u.finished as usize),
            );
        }
        left
    }
}

/// What one function's run records take in a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionUsage {
    pub namespace: String,
    pub function: String,
    pub finished: u64,
    pub bytes: u64,
}

/// A registered namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRecord {
    pub name: String,
    pub created: jiff::Timestamp,
    /// Its own budget for run records, in bytes (`None`: the server's `--run-history-budget`).
    pub run_history_budget: Option<u64>,
}

/// What the run records of one namespace take.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunUsage {
    pub namespace: String,
    pub runs: u64,
    pub finished: u64,
    pub bytes: u64,
}

/// A delivery that is not queued: waiting for room in its function's queue, or dead.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    /// Arrival order.
    pub seq: i64,
    pub namespace: String,
    pub subscription: String,
    pub function: String,
    pub source: String,
    pub event_id: String,
    /// Its place in its event's `matched`.
    pub index: usize,
    pub state: DeliveryState,
    pub attempts: u32,
    pub received_at: jiff::Timestamp,
    /// Pending: when its event's TTL ends; dead: when it is forgotten.
    pub expires_at: jiff::Timestamp,
    pub last_error: Option<String>,
}

impl DeliveryRecord {
    /// As its event's record shows it.
    pub fn delivery(&self) -> dispatch_core::events::Delivery {
        dispatch_core::events::Delivery {
            subscription: self.subscription.clone(),
            function: self.function.clone(),
            state: self.state,
            run_id: None,
            error: self.last_error.clone(),
            attempts: self.attempts,
        }
    }
}

/// Which dead deliveries to redeliver.
#[derive(Debug, Clone)]
pub enum Redeliver {
    Subscription(String),
    Event { id: String, source: Option<String> },
}

/// Deliveries of one subscription in one state.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryCount {
    pub namespace: String,
    pub subscription: String,
    pub state: DeliveryState,
    pub count: u64,
    pub oldest: jiff::Timestamp,
}

/// A resource changed by someone else than this process (`kubectl`, another server): what
/// [`ResourceStore::on_external_change`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// It is gone (otherwise it was created or changed: read it again).
    pub deleted: bool,
}

/// What a store calls with each [`Changed`].
pub type OnChange = Box<dyn Fn(Changed) + Send + Sync>;

/// What another server that shares the store (PostgreSQL) tells this one: what
/// [`RecordStore::on_shared_change`] reports. Tokens and namespaces: a copy this server keeps
/// in memory changed, read it again. `Cancel`: a run this server may own is to be cancelled
/// ([`RecordStore::request_cancel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    Tokens,
    Namespaces,
    Cancel { namespace: String, id: String },
}

/// Which records [`RecordStore::take_over`] takes on a shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOver {
    /// At start-up: [`TakeOver::Orphans`], and the records this server's id holds already
    /// (a server started again under the id it had).
    Start,
    /// On each renewal: the records of servers whose lease ended (a look-up by owner).
    Expired,
    /// Now and then: also the records of no server (written before servers had leases) or of
    /// a server without a lease (taken over while it still ran).
    Orphans,
}

/// What a server takes charge of ([`RecordStore::take_over`]): active async runs, finished
/// runs whose callback is still to be sent, and Waiting or Active job executions.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    pub runs: Vec<Run>,
    pub callbacks: Vec<Run>,
    pub jobs: Vec<JobExecution>,
}

impl Taken {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.callbacks.is_empty() && self.jobs.is_empty()
    }
}

/// What a store calls with each [`Shared`] change.
pub type OnShared = Box<dyn Fn(Shared) + Send + Sync>;

/// Resources and the namespaces they live in: SQLite in the embedded mode, custom resources on
/// Kubernetes (DESIGN §8). Every method is a short blocking call.
pub trait ResourceStore: Send + Sync + 'static {
    /// Registers what to call when a resource is changed from outside this process. A store
    /// that alone holds its resources (SQLite) never calls it; one that keeps them elsewhere
    /// (custom resources on Kubernetes) does, from its watch.
    fn on_external_change(&self, _f: OnChange) {}

    /// One resource, or `None`.
    fn get(&self, namespace: &str, kind: Kind, name: &str) -> Result<Option<Object>>;

    /// Every resource of `kind`, in `namespace` or in all namespaces, ordered by name.
    fn list(&self, namespace: Option<&str>, kind: Kind) -> Result<Vec<Object>>;

    /// Stores a new resource: sets uid, generation 1, timestamps and resourceVersion.
    /// [`StoreError::AlreadyExists`] when the name is taken.
    fn create(&self, object: Object) -> Result<Object>;

    /// Replaces labels and spec. When `object.metadata.resourceVersion` is set it must match
    /// the stored one ([`StoreError::Conflict`] otherwise). A changed spec bumps the
    /// generation; the status is kept.
    fn update(&self, object: Object) -> Result<Object>;

    /// Replaces only the status (what controllers write).
    fn update_status(
        &self,
        namespace: &str,
        kind: Kind,
        name: &str,
        status: Status,
    ) -> Result<Object>;

    /// Removes a resource and returns it.
    fn delete(&self, namespace: &str, kind: Kind, name: &str) -> Result<Object>;

    /// Registers a namespace; `false` when it exists.
    fn put_namespace(&self, name: &str, created: jiff::Timestamp) -> Result<bool>;

    fn list_namespaces(&self) -> Result<Vec<NamespaceRecord>>;

    /// Sets (or, with `None`, clears: the server's default applies) a namespace's own budget
    /// for run records, registering the namespace (as of `created`) if it has no row yet.
    fn set_run_history_budget(
        &self,
        name: &str,
        budget: Option<u64>,
        created: jiff::Timestamp,
    ) -> Result<()>;

    /// Deletes a namespace with every resource in it (its records: [`RecordStore::delete_records_of`]).
    fn delete_namespace(&self, name: &str) -> Result<bool>;
}

/// Run records, the async queue, job executions, events and their deliveries, drivers' state,
/// tokens and the audit log: the records a server writes, always in SQL. Every method is a
/// short blocking call.
pub trait RecordStore: Send + Sync + 'static {
    /// Asked when the disk is short: gives space back to the disk where it can (SQLite:
    /// truncates its write-ahead log after a checkpoint) and answers the bytes it has free
    /// inside its files and will reuse before it grows them (SQLite's free pages, e.g. after
    /// a purge). 0 if unknown.
    fn reclaim(&self) -> u64 {
        0
    }

    /// Registers what to call when another server that shares this store changes tokens or
    /// namespaces (PostgreSQL: LISTEN/NOTIFY). A store only this process writes (SQLite)
    /// never calls it.
    fn on_shared_change(&self, _f: OnShared) {}

    /// Whether several servers may share this store (PostgreSQL): each then holds a lease
    /// ([`RecordStore::lease`]), owns the async runs and job executions it accepted (their
    /// `replica`), and takes over those of servers whose lease ended.
    fn shared(&self) -> bool {
        false
    }

    /// Joins (`join`) or renews this server's lease for `ttl`, measured by the store's clock.
    /// `false` when renewing a lease that is gone: another server took this one's work over.
    fn lease(&self, _replica: &str, _ttl: std::time::Duration, _join: bool) -> Result<bool> {
        Ok(true)
    }

    /// Ends this server's lease now (a clean stop): others take its work over at once.
    fn leave(&self, _replica: &str) -> Result<()> {
        Ok(())
    }

    /// Takes charge of the work nobody else holds: with one server, every active run, pending
    /// callback and active job execution (start-up); on a shared store, what `how` says, now
    /// owned by `replica` — each record taken by one server only.
    fn take_over(&self, _replica: &str, _how: TakeOver) -> Result<Taken> {
        Ok(Taken {
            runs: self.active_runs()?,
            callbacks: self.pending_callbacks()?,
            jobs: self.active_jobs()?,
        })
    }

    /// Tells the server that owns the run to cancel it (a shared store: this server does not
    /// own it): recorded on the run, and notified. Nothing to do with one server.
    fn request_cancel(&self, _namespace: &str, _id: &str) -> Result<()> {
        Ok(())
    }

    /// Active runs `replica` owns that another server asked to cancel: (namespace, id). What
    /// a lost notification left undone is found here.
    fn cancel_requests(&self, _replica: &str) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    /// Calls `f` with `true` while this server is the one elected among the servers sharing
    /// the store (for work only one may do: the cron scheduler, brokers' consumers, pending
    /// event deliveries), `false` when it stops being it. `false`: the store holds no
    /// election (one server: it always leads).
    fn elect(&self, _f: Box<dyn Fn(bool) + Send + Sync>) -> bool {
        false
    }

    /// Keeps a source archive for the other servers sharing the store (they fetch it with
    /// [`RecordStore::get_blob`]). Nothing with one server: its blob folder is the copy.
    fn put_blob(&self, _digest: &str, _data: &[u8]) -> Result<()> {
        Ok(())
    }

    fn get_blob(&self, _digest: &str) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Shared archives stored before `before` (gc: the unreferenced ones go).
    fn list_blobs(&self, _before: jiff::Timestamp) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn delete_blob(&self, _digest: &str) -> Result<()> {
        Ok(())
    }

    /// A setting every server sharing the store must agree on: stores `value` under `name`
    /// unless one is stored, and returns the stored one.
    fn agree(&self, _name: &str, value: &str) -> Result<String> {
        Ok(value.to_string())
    }

    /// Inserts or replaces run records, in one transaction.
    fn put_runs(&self, runs: &[Run]) -> Result<()>;

    fn get_run(&self, namespace: &str, id: &str) -> Result<Option<Run>>;

    fn list_runs(&self, namespace: &str, filter: &RunFilter) -> Result<Vec<Run>>;

    /// QUEUED and RUNNING runs of every namespace, oldest first (the queue at start-up).
    fn active_runs(&self) -> Result<Vec<Run>>;

    /// Finished runs whose callback is still to be delivered.
    fn pending_callbacks(&self) -> Result<Vec<Run>>;

    /// Deletes finished runs of `namespace` (of one function / one status); never active ones.
    fn purge_runs(
        &self,
        namespace: &str,
        function: Option<&str>,
        status: Option<RunStatus>,
    ) -> Result<u64>;

    /// One step of retention, one short transaction: deletes at most `batch` finished runs
    /// that `rules` no longer keep (oldest first). Fewer than `batch` deleted: nothing more
    /// to do for now. The caller repeats it, yielding in between, so that no prune holds the
    /// database for long.
    fn prune_runs(&self, rules: &Retention, batch: usize) -> Result<u64>;

    /// What run records take, per namespace.
    fn run_usage(&self) -> Result<Vec<RunUsage>> {
        Ok(Vec::new())
    }

    /// What run records take, per function.
    fn function_usage(&self) -> Result<Vec<FunctionUsage>> {
        Ok(Vec::new())
    }

    /// After large deletes: gives freed space back to the file system (SQLite: incremental
    /// vacuum of at most `max_pages` free pages). Returns the pages released.
    fn compact(&self, _max_pages: u64) -> Result<u64> {
        Ok(0)
    }

    /// Inserts or replaces a job execution.
    fn put_job(&self, job: &JobExecution) -> Result<()>;

    /// Records a new job execution unless its namespace has one of that id; `false` then
    /// (nothing written). One statement: two requests for one name make one execution.
    fn insert_job(&self, job: &JobExecution) -> Result<bool>;

    fn get_job(&self, namespace: &str, uuid: &str) -> Result<Option<JobExecution>>;

    /// Newest first, of one template or all.
    fn list_jobs(
        &self,
        namespace: &str,
        template: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobExecution>>;

    /// Waiting and Active executions of every namespace, oldest first (start-up).
    fn active_jobs(&self) -> Result<Vec<JobExecution>>;

    /// Deletes every execution of a template (deleting a template deletes its executions).
    fn delete_jobs(&self, namespace: &str, template: &str) -> Result<u64>;

    /// Deletes executions whose `ttlSecondsAfterFinished` has passed.
    fn prune_jobs(&self, now: jiff::Timestamp) -> Result<u64>;

    /// Stores events, each with the runs its queued deliveries start and a pending delivery
    /// for each of its `matched` that is pending, in one transaction (all or nothing: an
    /// event is never stored with a subset of its deliveries; concurrent ingests share the
    /// commit). Per event `false`, with nothing of it stored, when an event with its
    /// namespace, source and id exists (and `replace` is off).
    fn ingest_events(&self, batch: &[(StoredEvent, Vec<Run>)], replace: bool) -> Result<Vec<bool>>;

    /// Newest first, of one type or all; `undelivered`: only events with a pending or dead
    /// delivery.
    fn list_events(
        &self,
        namespace: &str,
        event_type: Option<&str>,
        undelivered: bool,
        limit: usize,
    ) -> Result<Vec<StoredEvent>>;

    /// Deletes events past their TTL (not those with a pending or dead delivery) and dead
    /// deliveries past their retention.
    fn prune_events(&self, now: jiff::Timestamp) -> Result<u64>;

    /// Pending deliveries of one subscription, oldest first, each with its event (none: the
    /// event is gone).
    fn pending_deliveries(
        &self,
        namespace: &str,
        subscription: &str,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Option<StoredEvent>)>>;

    /// Pending deliveries' runs are queued: the runs stored, the deliveries gone from the
    /// pending ones and their events' records updated, in one transaction.
    fn deliver(&self, deliveries: &[(DeliveryRecord, Run)]) -> Result<()>;

    /// Writes a pending delivery's new state (a refused try, or dead) to it and its event.
    fn update_delivery(&self, delivery: &DeliveryRecord) -> Result<()>;

    /// Dead deliveries of a subscription, or of one event (by id, and source when given),
    /// become pending again with the TTL `expires_at`; returns them.
    fn redeliver(
        &self,
        namespace: &str,
        which: &Redeliver,
        expires_at: jiff::Timestamp,
    ) -> Result<Vec<DeliveryRecord>>;

    /// Pending and dead deliveries per subscription (start-up: the deliverer's counts).
    fn delivery_counts(&self) -> Result<Vec<DeliveryCount>>;

    /// Where a broker driver is in its source (`key`: a Kafka topic and partition).
    fn driver_cursor(&self, namespace: &str, driver: &str, key: &str) -> Result<Option<i64>>;

    fn set_driver_cursor(&self, namespace: &str, driver: &str, key: &str, value: i64)
    -> Result<()>;

    /// Forgets a deleted driver's state: its last cron fire and its cursors.
    fn forget_driver(&self, namespace: &str, driver: &str) -> Result<()>;

    /// The last fire of a cron driver.
    fn cron_last_fire(&self, namespace: &str, name: &str) -> Result<Option<jiff::Timestamp>>;

    /// Records (or, with `None`, forgets) the last fire of a cron driver.
    fn set_cron_last_fire(
        &self,
        namespace: &str,
        name: &str,
        at: Option<jiff::Timestamp>,
    ) -> Result<()>;

    /// Stores a new token; `false` when the name is taken.
    fn put_token(&self, token: &ApiToken) -> Result<bool>;

    fn list_tokens(&self) -> Result<Vec<ApiToken>>;

    /// `false` when there was no such token.
    fn delete_token(&self, name: &str) -> Result<bool>;

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()>;

    /// Newest first.
    fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>>;

    /// Deletes every run of a function (deleting a function deletes its runs).
    fn delete_runs_of(&self, namespace: &str, function: &str) -> Result<u64>;

    /// Records `v` as its function's next version unless a version with its digest exists
    /// (a rollback, a restart's redeploy); returns the number of the version with that digest.
    /// Keeps the newest `keep` versions, that one and those in `pinned` (named by an alias
    /// or an endpoint); numbers are never given twice.
    fn record_version(&self, v: &FunctionVersion, keep: usize, pinned: &[u32]) -> Result<u32>;

    /// A function's versions, newest first.
    fn list_versions(&self, namespace: &str, function: &str) -> Result<Vec<FunctionVersion>>;

    /// Deletes a function's versions (deleting a function deletes them).
    fn delete_versions_of(&self, namespace: &str, function: &str) -> Result<()>;

    /// Deletes every record of a namespace: runs, job executions, events and deliveries,
    /// drivers' cursors and cron state (a deleted namespace's).
    fn delete_records_of(&self, namespace: &str) -> Result<()>;
}

/// Both halves in one (SQLite keeps them in one file).
pub trait Store: ResourceStore + RecordStore {}

impl<T: ResourceStore + RecordStore> Store for T {}
