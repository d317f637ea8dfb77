//! Async runs (DESIGN §6): the queue is the runs table; this is its scheduler.
//!
//! - **Durable first**: a run is committed (group commit through the recorder) before the
//!   202 that accepts it; every state change after that is committed before the next step.
//! - **Fair**: ready runs wait per function; the dispatcher starts them round-robin across
//!   functions, at most `maxWorkers` at once per function and `max_running` in all, so a hot
//!   function cannot starve the others.
//! - **At least once**: at start-up QUEUED runs are loaded and RUNNING ones (their server
//!   died mid-attempt, and so did their workers: see the bootstraps' parent watchdog) count
//!   a failed attempt and are retried per policy.
//! - **Retries**: FunctionError, SystemError and timeouts are retried with exponential backoff
//!   and jitter up to `retry.maxAttempts` and `retry.maxAge`; then DEAD, every attempt's error
//!   kept. InputError fails at once (FAILED).
//! - **Cancel**: a waiting run is removed; a running one is aborted (its worker is discarded
//!   and its process group killed).
//!
//! Time comes from [`Clock`], so tests drive backoff and max age with paused tokio time.

use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use dispatch_core::{Run, RunStatus};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

pub use dispatch_core::run::{FunctionQueue, Refused};
pub(crate) use runs::accepted_span;
pub use runs::{admit, after_failure, cancel, cancel_here, enqueue, recover, redrive};

/// Why the queue refuses a run or a change to one.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A bound is reached (function, namespace, bytes); retry later.
    #[error("{0}")]
    Full(String),
    #[error("function {function:?} not found in namespace {namespace:?}")]
    FunctionNotFound { namespace: String, function: String },
    #[error(
        "async payloads are limited to {} (--max-async-payload) and this one is {}: call \
         synchronously, or store the data elsewhere and pass a reference",
        runs::human(*limit),
        runs::human(*size)
    )]
    PayloadTooLarge { limit: u64, size: u64 },
    #[error("run {id:?} not found in namespace {namespace:?}")]
    RunNotFound { namespace: String, id: String },
    #[error("run {id:?} already finished ({status}): nothing to cancel")]
    Finished { id: String, status: RunStatus },
    #[error(
        "run {id:?} is {status} and not in the queue (a sync run, or one finishing now): it \
         cannot be cancelled"
    )]
    NotCancellable { id: String, status: RunStatus },
    #[error(
        "run {id:?} runs on another server ({replica}), which was asked to cancel it and did not \
         confirm within 10 s: get the run to see whether it ended"
    )]
    CancelUnconfirmed { id: String, replica: String },
    #[error("run {id:?} is {status}, not DEAD: only dead runs are redriven")]
    NotDead { id: String, status: RunStatus },
    /// The store refused the run (the reason is in the server log).
    #[error("failed to store the run: see the server log")]
    NotStored,
    #[error(transparent)]
    Invalid(#[from] dispatch_core::ValidationError),
    /// A version or an alias it names is not there.
    #[error(transparent)]
    Version(#[from] crate::versions::VersionError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

impl QueueError {
    /// What a record users read (an event delivery) says of this refusal: the server's own
    /// failures go to its log, not into the record.
    pub fn recorded(&self) -> String {
        match self {
            QueueError::State(s) if s.is_transient() => {
                tracing::warn!("queueing a run: {s}");
                "the server could not queue it now: it is tried again".to_string()
            }
            e => e.to_string(),
        }
    }
}

mod runs;
use runs::{NOT_READY_DELAY, human, run_one, stored_retry};

use crate::clock::Clock;
use crate::state::AppState;

/// Namespace and function.
type FnKey = (String, String);

struct RunningRun {
    key: FnKey,
    abort: AbortHandle,
}

/// One function's line in `/metrics`: accepted runs not final, 429s by bound, and the age of
/// its oldest waiting run (0 when none waits).
pub struct QueueLine {
    pub key: FnKey,
    pub queued: usize,
    pub refused: Refused,
    pub oldest_age_seconds: f64,
}

struct Waiting {
    key: FnKey,
    /// When the run's age starts (created, or redriven), in ms: for maxAge.
    origin_ms: i64,
}

#[derive(Default)]
struct Sched {
    /// Ready runs per function, oldest first.
    ready: HashMap<FnKey, VecDeque<String>>,
    /// Functions with ready runs, in round-robin order.
    rr: VecDeque<FnKey>,
    /// Runs waiting for their time (backoff): (due, id).
    delayed: BinaryHeap<Reverse<(i64, String)>>,
    /// Every waiting run (ready or delayed). A run missing here was cancelled or started;
    /// queues drop such ids lazily.
    waiting: HashMap<String, Waiting>,
    running: HashMap<String, RunningRun>,
    running_per_fn: HashMap<FnKey, u32>,
    /// Accepted runs not final yet (waiting, running, or between the two, admitted ones
    /// still being stored included), with their count and payload bytes per namespace and
    /// their count per function: the admission bounds.
    active: HashMap<String, Active>,
    depth: HashMap<String, usize>,
    bytes: HashMap<String, u64>,
    fn_depth: HashMap<FnKey, usize>,
    /// Async calls refused (429) per function since start, by bound.
    refused: HashMap<FnKey, Refused>,
}

struct Active {
    key: FnKey,
    bytes: u64,
}

/// The admission bounds of the queue (flags of `dispatch server`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Runs accepted and not final per namespace.
    pub per_namespace: usize,
    /// Payload bytes of those runs per namespace.
    pub bytes_per_namespace: u64,
    /// Runs accepted and not final per function, unless its spec says `maxQueued`.
    pub per_function: usize,
}

impl Sched {
    fn make_ready(&mut self, id: String, key: FnKey) {
        let q = self.ready.entry(key.clone()).or_default();
        if q.is_empty() {
            self.rr.push_back(key);
        }
        q.push_back(id);
    }

    fn promote_due(&mut self, now_ms: i64) {
        while let Some(Reverse((due, _))) = self.delayed.peek() {
            if *due > now_ms {
                break;
            }
            let Some(Reverse((_, id))) = self.delayed.pop() else {
                break;
            };
            if let Some(key) = self.waiting.get(&id).map(|w| w.key.clone()) {
                self.make_ready(id, key);
            }
        }
    }

    /// The next waiting run of `key`, skipping ids that were cancelled.
    fn pop_ready(&mut self, key: &FnKey) -> Option<String> {
        let q = self.ready.get_mut(key)?;
        while let Some(id) = q.pop_front() {
            if self.waiting.get(&id).is_some_and(|w| w.key == *key) {
                return Some(id);
            }
        }
        None
    }

    fn unwait(&mut self, id: &str) -> Option<FnKey> {
        self.waiting.remove(id).map(|w| w.key)
    }

    /// Counts a run as accepted (once).
    fn activate(&mut self, id: &str, key: &FnKey, bytes: u64) {
        if self.active.contains_key(id) {
            return;
        }
        self.active.insert(
            id.to_string(),
            Active {
                key: key.clone(),
                bytes,
            },
        );
        *self.depth.entry(key.0.clone()).or_default() += 1;
        *self.bytes.entry(key.0.clone()).or_default() += bytes;
        *self.fn_depth.entry(key.clone()).or_default() += 1;
    }

    fn retire(&mut self, id: &str) {
        let Some(a) = self.active.remove(id) else {
            return;
        };
        if let Some(d) = self.depth.get_mut(&a.key.0) {
            *d = d.saturating_sub(1);
        }
        if let Some(b) = self.bytes.get_mut(&a.key.0) {
            *b = b.saturating_sub(a.bytes);
        }
        if let Some(d) = self.fn_depth.get_mut(&a.key) {
            *d = d.saturating_sub(1);
            if *d == 0 {
                self.fn_depth.remove(&a.key);
            }
        }
    }

    /// Moves a waiting run to running and spawns its attempt. Spawned under the lock, so
    /// that a cancel always finds the abort handle.
    fn start(&mut self, state: &Arc<AppState>, key: FnKey, id: String) {
        self.unwait(&id);
        *self.running_per_fn.entry(key.clone()).or_default() += 1;
        let task = tokio::spawn(run_one(state.clone(), key.0.clone(), id.clone()));
        let abort = task.abort_handle();
        self.running.insert(id, RunningRun { key, abort });
    }

    fn end_running(&mut self, id: &str) -> Option<RunningRun> {
        let r = self.running.remove(id)?;
        if let Some(n) = self.running_per_fn.get_mut(&r.key) {
            *n = n.saturating_sub(1);
        }
        Some(r)
    }
}

/// What [`Queue::cancel`] found.
pub enum Cancelled {
    /// It was waiting: it will not run.
    Waiting,
    /// It was running: its attempt is aborted.
    Running,
    /// Not in the queue (finished, or not an async run).
    NotActive,
}

pub struct Queue {
    pub clock: Clock,
    sched: Mutex<Sched>,
    wake: Notify,
    /// Notified when a run stops counting against the bounds (event deliveries that wait
    /// for room try again).
    pub room: Notify,
    bounds: Bounds,
    max_running: usize,
}

impl Queue {
    pub fn new(clock: Clock, bounds: Bounds, max_running: usize) -> Queue {
        Queue {
            clock,
            sched: Mutex::new(Sched::default()),
            wake: Notify::new(),
            room: Notify::new(),
            bounds,
            max_running: max_running.max(1),
        }
    }

    // A std mutex: every section is a few map operations, never held across an await.
    fn sched(&self) -> parking_lot::MutexGuard<'_, Sched> {
        self.sched.lock()
    }

    /// Adds a QUEUED run (ready now, or at its `nextAttemptAt`).
    pub fn push(&self, run: &Run) {
        let key = (run.namespace.clone(), run.function.clone());
        let now = self.clock.now().as_millisecond();
        {
            let mut s = self.sched();
            let origin_ms = run.redriven_at.unwrap_or(run.created_at).as_millisecond();
            s.waiting.insert(
                run.id.clone(),
                Waiting {
                    key: key.clone(),
                    origin_ms,
                },
            );
            s.activate(&run.id, &key, run.input.get().len() as u64);
            match run.next_attempt_at.map(|t| t.as_millisecond()) {
                Some(due) if due > now => s.delayed.push(Reverse((due, run.id.clone()))),
                _ => s.make_ready(run.id.clone(), key),
            }
        }
        self.wake.notify_one();
    }

    /// Admits a new run of `key` with a payload of `bytes`, or refuses it (429) when its
    /// function, its namespace or the namespace's payload bytes are at their bound. Checked
    /// and counted under one lock, so concurrent callers never overshoot; the run counts
    /// from here (a failed store must [`Queue::retire`] it).
    pub fn admit(
        &self,
        id: &str,
        key: &FnKey,
        bytes: u64,
        max_queued: Option<usize>,
    ) -> Result<(), QueueError> {
        let b = self.bounds;
        let per_function = max_queued.unwrap_or(b.per_function);
        let mut s = self.sched();
        let (ns, function) = (&key.0, &key.1);
        let depth = s.depth.get(ns).copied().unwrap_or(0);
        let held = s.bytes.get(ns).copied().unwrap_or(0);
        let fn_depth = s.fn_depth.get(key).copied().unwrap_or(0);
        let refusal = if fn_depth >= per_function {
            Some((
                format!(
                    "function {function:?} has {fn_depth} async runs queued or running, its limit \
                     (spec.maxQueued, or the server's --max-queued-per-function): retry later"
                ),
                0,
            ))
        } else if depth >= b.per_namespace {
            Some((
                format!(
                    "namespace {ns:?} has {depth} async runs queued or running, its limit \
                     (--max-queue-depth): retry later"
                ),
                1,
            ))
        } else if held + bytes > b.bytes_per_namespace {
            Some((
                format!(
                    "namespace {ns:?} holds {} of async payloads waiting, and this one ({}) would \
                     pass its limit of {} (--max-queued-bytes): retry later",
                    human(held),
                    human(bytes),
                    human(b.bytes_per_namespace)
                ),
                2,
            ))
        } else {
            None
        };
        if let Some((message, bound)) = refusal {
            let r = s.refused.entry(key.clone()).or_default();
            match bound {
                0 => r.function_full += 1,
                1 => r.namespace_full += 1,
                _ => r.namespace_bytes_full += 1,
            }
            return Err(QueueError::Full(message));
        }
        s.activate(id, key, bytes);
        Ok(())
    }

    /// Counts a sync call refused because the function's workers and wait bound were full.
    pub fn count_busy(&self, ns: &str, function: &str) {
        let key = (ns.to_string(), function.to_string());
        self.sched().refused.entry(key).or_default().workers_busy += 1;
    }

    /// What the queue holds of one function now, and what it refused since start.
    pub fn function_queue(&self, key: &FnKey, max_queued: Option<usize>) -> FunctionQueue {
        let s = self.sched();
        FunctionQueue {
            queued: s.fn_depth.get(key).copied().unwrap_or(0),
            running: s.running_per_fn.get(key).copied().unwrap_or(0),
            max_queued: max_queued.unwrap_or(self.bounds.per_function),
            refused: s.refused.get(key).copied().unwrap_or_default(),
        }
    }

    /// Queued runs and refusals of every function that has either, and how long its oldest
    /// waiting run has waited, in seconds (`/metrics`; a walk of the waiting runs, at most
    /// the queue's bound).
    pub fn per_function(&self) -> Vec<QueueLine> {
        let now = self.clock.now().as_millisecond();
        let s = self.sched();
        let mut oldest: HashMap<&FnKey, i64> = HashMap::new();
        for w in s.waiting.values() {
            let o = oldest.entry(&w.key).or_insert(w.origin_ms);
            *o = (*o).min(w.origin_ms);
        }
        let mut keys: Vec<&FnKey> = s.fn_depth.keys().chain(s.refused.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|k| QueueLine {
                key: k.clone(),
                queued: s.fn_depth.get(k).copied().unwrap_or(0),
                refused: s.refused.get(k).copied().unwrap_or_default(),
                oldest_age_seconds: oldest.get(k).map_or(0.0, |o| (now - o).max(0) as f64 / 1e3),
            })
            .collect()
    }

    /// A run reached a final state (or was deleted): it no longer counts against the depth.
    pub fn retire(&self, id: &str) {
        self.sched().retire(id);
        self.room.notify_one();
    }

    pub fn waiting(&self) -> usize {
        self.sched().waiting.len()
    }

    pub fn running(&self) -> usize {
        self.sched().running.len()
    }

    /// Removes a run from the queue or aborts its attempt.
    pub fn cancel(&self, id: &str) -> Cancelled {
        let mut s = self.sched();
        if s.unwait(id).is_some() {
            return Cancelled::Waiting;
        }
        match s.end_running(id) {
            Some(r) => {
                r.abort.abort();
                drop(s);
                self.wake.notify_one();
                Cancelled::Running
            }
            None => Cancelled::NotActive,
        }
    }

    /// Forgets every run (this server lost its lease; another server takes them over):
    /// waiting ones leave the queue, running attempts are aborted without writing.
    pub fn forget_all(&self) {
        let mut s = self.sched();
        for (_, r) in s.running.drain() {
            r.abort.abort();
        }
        *s = Sched {
            refused: std::mem::take(&mut s.refused),
            ..Sched::default()
        };
        drop(s);
        self.room.notify_waiters();
    }

    /// Drops every run of a deleted function: waiting ones leave the queue, running ones
    /// are aborted. Their records are deleted with the function.
    pub fn forget_function(&self, ns: &str, function: &str) {
        let key = (ns.to_string(), function.to_string());
        let mut s = self.sched();
        let ids: Vec<String> = s
            .waiting
            .iter()
            .filter(|(_, w)| w.key == key)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            s.unwait(&id);
            s.retire(&id);
        }
        s.ready.remove(&key);
        let running: Vec<String> = s
            .running
            .iter()
            .filter(|(_, r)| r.key == key)
            .map(|(id, _)| id.clone())
            .collect();
        for id in running {
            if let Some(r) = s.end_running(&id) {
                r.abort.abort();
            }
            s.retire(&id);
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Ends a run's attempt; `false` when it was cancelled meanwhile (the canceller owns the
    /// record then).
    fn finish(&self, id: &str) -> bool {
        let ended = self.sched().end_running(id).is_some();
        self.wake.notify_one();
        ended
    }

    /// Starts what may start now: one run per function per round, round-robin.
    fn start_ready(&self, state: &Arc<AppState>) {
        let now = self.clock.now().as_millisecond();
        let mut s = self.sched();
        s.promote_due(now);
        loop {
            let mut started = false;
            for _ in 0..s.rr.len() {
                if s.running.len() >= self.max_running {
                    return;
                }
                let Some(key) = s.rr.pop_front() else { break };
                // Runs of a function that is not deployed (building, failed) stay parked: no
                // store traffic while they wait. A deploy wakes the queue; the expiry sweep
                // ends those that outlive their maxAge.
                let limit = state.deployed(&key.0, &key.1).map(|d| d.max_workers.max(1));
                let busy = s.running_per_fn.get(&key).copied().unwrap_or(0);
                if limit.is_some_and(|l| busy < l)
                    && let Some(id) = s.pop_ready(&key)
                {
                    s.start(state, key.clone(), id);
                    started = true;
                }
                if s.ready.get(&key).is_some_and(|q| !q.is_empty()) {
                    s.rr.push_back(key);
                } else {
                    s.ready.remove(&key);
                }
            }
            if !started {
                return;
            }
        }
    }

    /// Wakes the dispatcher (a function was deployed: its parked runs may start).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Parked runs of functions that are not deployed: (function, [(id, origin ms)]).
    fn parked(&self, state: &AppState) -> Vec<(FnKey, Vec<(String, i64)>)> {
        let s = self.sched();
        let mut by_fn: HashMap<FnKey, Vec<(String, i64)>> = HashMap::new();
        for (id, w) in &s.waiting {
            if state.deployed(&w.key.0, &w.key.1).is_none() {
                by_fn
                    .entry(w.key.clone())
                    .or_default()
                    .push((id.clone(), w.origin_ms));
            }
        }
        by_fn.into_iter().collect()
    }

    /// Starts the given parked runs now (their attempt finds the function not deployed and
    /// ends them, or runs them if it just was).
    fn force_start(&self, state: &Arc<AppState>, key: &FnKey, ids: Vec<String>) {
        let mut s = self.sched();
        for id in ids {
            if s.waiting.contains_key(&id) {
                s.start(state, key.clone(), id);
            }
        }
    }

    /// Every second: parked runs older than their function's maxAge are ended (DEAD).
    pub fn spawn_expiry(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(NOT_READY_DELAY);
            loop {
                tick.tick().await;
                let q = &state.queue;
                for (key, runs) in q.parked(&state) {
                    let retry = match stored_retry(&state, &key.0, &key.1).await {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            // The function is gone; its runs went with it.
                            q.forget_function(&key.0, &key.1);
                            continue;
                        }
                        Err(_) => continue,
                    };
                    let now = q.clock.now().as_millisecond();
                    let max_age = i64::try_from(retry.max_age.as_millis()).unwrap_or(i64::MAX);
                    let expired: Vec<String> = runs
                        .into_iter()
                        .filter(|(_, origin)| now.saturating_sub(*origin) > max_age)
                        .map(|(id, _)| id)
                        .collect();
                    if !expired.is_empty() {
                        q.force_start(&state, &key, expired);
                    }
                }
            }
        })
    }

    fn next_due(&self) -> Option<i64> {
        self.sched().delayed.peek().map(|Reverse((due, _))| *due)
    }

    /// The dispatcher: starts runs whenever something changes or a backoff ends.
    pub fn spawn(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let q = &state.queue;
            loop {
                q.start_ready(&state);
                let due = q.next_due().map(|ms| {
                    let t = jiff::Timestamp::from_millisecond(ms).unwrap_or_else(|_| q.clock.now());
                    q.clock.instant_at(t)
                });
                match due {
                    Some(at) => {
                        tokio::select! {
                            _ = q.wake.notified() => {}
                            _ = tokio::time::sleep_until(at) => {}
                        }
                    }
                    None => q.wake.notified().await,
                }
            }
        })
    }
}
