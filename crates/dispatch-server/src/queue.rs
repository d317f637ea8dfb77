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
use std::hash::Hasher;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use dispatch_core::{
    AttemptError, Callback, CallbackState, ErrorObject, ErrorType, FunctionSpec, Kind, Retry, Run,
    RunStatus,
};
use dispatch_runtime::InvokeError;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

pub use dispatch_core::run::{FunctionQueue, Refused};

use crate::clock::Clock;
use crate::error::ApiError;
use crate::invoke::{Invocation, apply_outcome, call_backend};
use crate::state::AppState;

/// Namespace and function.
type FnKey = (String, String);

/// How long a run waits before it is looked at again when its function cannot take it now
/// (not READY yet, or its workers are all busy).
const NOT_READY_DELAY: Duration = Duration::from_secs(1);
const BUSY_DELAY: Duration = Duration::from_millis(200);

struct RunningRun {
    key: FnKey,
    abort: AbortHandle,
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
    ) -> Result<(), ApiError> {
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
            return Err(
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "QueueFull", message)
                    .with_retry_after(5),
            );
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

    /// Queued runs and refusals of every function that has either (`/metrics`).
    pub fn per_function(&self) -> Vec<(FnKey, usize, Refused)> {
        let s = self.sched();
        let mut keys: Vec<&FnKey> = s.fn_depth.keys().chain(s.refused.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|k| {
                (
                    k.clone(),
                    s.fn_depth.get(k).copied().unwrap_or(0),
                    s.refused.get(k).copied().unwrap_or_default(),
                )
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

/// A number in [0, 1) fixed by the run and the attempt: jitter that needs no RNG and is the
/// same if a decision is replayed.
fn jitter(id: &str, attempt: u32) -> f64 {
    // SipHash with fixed keys: the same on every run of every server.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    h.write(id.as_bytes());
    h.write_u32(attempt);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

fn millis(d: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX)
}

/// Records a failed attempt and decides: QUEUED again after a backoff (true), or DEAD.
pub fn after_failure(run: &mut Run, retry: &Retry, clock: &Clock, err: ErrorObject) -> bool {
    let now = clock.now();
    run.attempt_errors.push(AttemptError {
        attempt: run.attempts,
        error: err.clone(),
        at: now,
    });
    run.error = Some(err);
    run.output = None;
    let delay = retry.delay(run.attempts + 1, jitter(&run.id, run.attempts));
    let origin = run.redriven_at.unwrap_or(run.created_at);
    let age_then = clock.age(origin) + delay;
    if run.attempts < retry.max_attempts && age_then <= retry.max_age {
        run.status = RunStatus::Queued;
        run.next_attempt_at = now.checked_add(millis(delay)).ok();
        true
    } else {
        run.status = RunStatus::Dead;
        run.finished_at = Some(now);
        run.next_attempt_at = None;
        false
    }
}

/// The retry policy of a function from the store (for runs whose function is not deployed).
async fn stored_retry(state: &AppState, ns: &str, name: &str) -> Result<Option<Retry>, ApiError> {
    let Some(f) = state.get(ns, Kind::Function, name).await? else {
        return Ok(None);
    };
    let spec: FunctionSpec = f.typed_spec()?;
    Ok(Some(spec.retry().unwrap_or_default()))
}

/// A run as stored (async runs' records are committed, never only in the recorder).
async fn get_run(state: &AppState, ns: &str, id: &str) -> Option<Run> {
    let (ns, id) = (ns.to_string(), id.to_string());
    match state.db(move |s| s.get_run(&ns, &id)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("failed to read a run: {}", e.message);
            None
        }
    }
}

/// Stores an accepted run's new state (committed before returning). A refusal of the store (a full or failing disk) is
/// retried, with backoff up to 5 s, until it succeeds: dropping the state would leave the
/// run in no queue, with a stale record, until the next start. Gives up (false) only when
/// the recorder is gone (the server is stopping; the next start recovers the run from its
/// last stored state).
async fn save(state: &AppState, run: &Run) -> bool {
    let mut wait = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        if state.recorder.record_durable(run.clone()).await {
            if failures > 0 {
                tracing::info!(run = %run.id, "stored the async run's state after {failures} failed tries");
            }
            return true;
        }
        if state.recorder.is_closed() {
            return false;
        }
        if failures == 0 || wait == MAX_SAVE_BACKOFF && failures.is_multiple_of(12) {
            tracing::error!(run = %run.id, status = %run.status, "failed to store an async run's state: retrying until it is stored");
        }
        failures += 1;
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_SAVE_BACKOFF);
    }
}

const MAX_SAVE_BACKOFF: Duration = Duration::from_secs(5);

/// Puts a run back in the queue for later without counting an attempt.
async fn requeue_later(state: &AppState, mut run: Run, after: Duration) {
    run.status = RunStatus::Queued;
    run.next_attempt_at = state.queue.clock.now().checked_add(millis(after)).ok();
    if save(state, &run).await {
        state.queue.push(&run);
    }
}

/// Ends a run for good: committed, then its callback (if any) goes out.
async fn finalize(state: &Arc<AppState>, mut run: Run) {
    state.queue.retire(&run.id);
    if run.finished_at.is_none() {
        run.finished_at = Some(state.queue.clock.now());
    }
    if let Some(cb) = &mut run.callback {
        cb.state = CallbackState::Pending;
    }
    if save(state, &run).await && run.callback.is_some() {
        crate::callbacks::spawn_delivery(state.clone(), run);
    }
}

/// One attempt of one async run.
async fn run_one(state: Arc<AppState>, ns: String, id: String) {
    // If this task panics, its slot is still freed.
    struct Slot<'a>(&'a Queue, &'a str, bool);
    impl Drop for Slot<'_> {
        fn drop(&mut self) {
            if self.2 {
                self.0.finish(self.1);
            }
        }
    }
    let q = &state.queue;
    let mut slot = Slot(q, &id, true);
    let mut run = match get_run(&state, &ns, &id).await {
        Some(r) if r.status == RunStatus::Queued => r,
        _ => {
            // Deleted with its function, or cancelled.
            q.retire(&id);
            return;
        }
    };
    let Some(deployed) = state.deployed(&run.namespace, &run.function) else {
        slot.2 = false;
        if !q.finish(&id) {
            return;
        }
        return not_deployed(&state, run).await;
    };
    let origin = run.redriven_at.unwrap_or(run.created_at);
    if q.clock.age(origin) > deployed.retry.max_age {
        slot.2 = false;
        if q.finish(&id) {
            expire(&state, run, &deployed.retry).await;
        }
        return;
    }
    run.attempts += 1;
    run.status = RunStatus::Running;
    run.started_at = Some(q.clock.now());
    run.next_attempt_at = None;
    run.digest = Some(deployed.digest.clone());
    if !save(&state, &run).await {
        slot.2 = false;
        if q.finish(&id) {
            run.attempts -= 1;
            requeue_later(&state, run, NOT_READY_DELAY).await;
        }
        return;
    }
    let outcome = call_backend(&state, &deployed, &run, run.http_context.as_ref()).await;
    // Claim the end of the attempt; a cancel that came first owns the record.
    slot.2 = false;
    if !q.finish(&id) {
        return;
    }
    match outcome {
        Err(InvokeError::Busy(_)) => {
            run.attempts -= 1;
            requeue_later(&state, run, BUSY_DELAY).await;
        }
        Err(InvokeError::NotDeployed { .. }) => {
            run.attempts -= 1;
            not_deployed(&state, run).await;
        }
        Ok(mut outcome) => {
            apply_outcome(&mut run, &mut outcome, &deployed, &state);
            match outcome.envelope.context.error {
                None => {
                    run.next_attempt_at = None;
                    finalize(&state, run).await;
                }
                Some(e) if e.kind == ErrorType::InputError => {
                    run.attempt_errors.push(AttemptError {
                        attempt: run.attempts,
                        error: e,
                        at: q.clock.now(),
                    });
                    finalize(&state, run).await;
                }
                Some(e) => {
                    let status = run.status;
                    if after_failure(&mut run, &deployed.retry, &q.clock, e) {
                        if save(&state, &run).await {
                            q.push(&run);
                        }
                    } else {
                        tracing::info!(run = %run.id, function = %run.function, last = %status, "async run is DEAD after {} attempts", run.attempts);
                        finalize(&state, run).await;
                    }
                }
            }
        }
    }
}

/// The function cannot take the run now: wait for it (it may be building) until the run's
/// max age; a deleted function's runs are gone with it.
async fn not_deployed(state: &Arc<AppState>, run: Run) {
    match stored_retry(state, &run.namespace, &run.function).await {
        Ok(None) => {}
        Ok(Some(retry)) => {
            let origin = run.redriven_at.unwrap_or(run.created_at);
            if state.queue.clock.age(origin) > retry.max_age {
                expire(state, run, &retry).await;
            } else {
                requeue_later(state, run, NOT_READY_DELAY).await;
            }
        }
        Err(e) => {
            tracing::warn!("async run {}: {}", run.id, e.message);
            requeue_later(state, run, NOT_READY_DELAY).await;
        }
    }
}

async fn expire(state: &Arc<AppState>, mut run: Run, retry: &Retry) {
    let err = ErrorObject::system(format!(
        "the run did not complete within retry.maxAge ({})",
        dispatch_core::duration::format_duration(retry.max_age)
    ));
    run.attempt_errors.push(AttemptError {
        attempt: run.attempts,
        error: err.clone(),
        at: state.queue.clock.now(),
    });
    run.error = Some(err);
    run.status = RunStatus::Dead;
    finalize(state, run).await;
}

/// Accepts an invocation for later: admitted to the queue's bounds, stored durably, then
/// pushed to the scheduler. Refused as [`admit`] says, or when the store refuses it.
pub async fn enqueue(state: &Arc<AppState>, inv: Invocation) -> Result<Run, ApiError> {
    let run = admit(state, inv).await?;
    if !state.recorder.record_durable(run.clone()).await {
        state.queue.retire(&run.id);
        // Refused for want of space: say so (507), not "internal".
        state.disk_admits("async runs", 0).await?;
        return Err(run_not_stored());
    }
    state.queue.push(&run);
    Ok(run)
}

/// A run the store refused (the reason is in the server log).
fn run_not_stored() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal",
        "failed to store the run: see the server log",
    )
}

/// A new async run admitted to the queue's bounds (it counts from here) and not stored yet:
/// the caller stores it and then [`Queue::push`]es it, or [`Queue::retire`]s it. Refused
/// with 404 (no such function), 413 (payload), 507 (disk) or 429 (`QueueFull`).
pub async fn admit(state: &Arc<AppState>, inv: Invocation) -> Result<Run, ApiError> {
    let Invocation {
        namespace,
        function,
        payload,
        trigger,
        http,
        event,
        callback: callback_url,
    } = inv;
    let (ns, function) = (namespace.as_str(), function.as_str());
    let (spec_callback, max_queued) = match state.deployed(ns, function) {
        Some(d) => (d.callback_url.clone(), d.max_queued),
        None => {
            let Some(f) = state.get(ns, Kind::Function, function).await? else {
                return Err(ApiError::not_found(format!(
                    "function {function:?} not found in namespace {ns:?}"
                )));
            };
            let spec = f.typed_spec::<FunctionSpec>()?;
            (spec.callback_url, spec.max_queued.map(|n| n as usize))
        }
    };
    let max_payload = state.config.max_async_payload;
    if payload.get().len() > max_payload {
        return Err(ApiError::too_large(format!(
            "async payloads are limited to {} (--max-async-payload) and this one is {}: call \
             synchronously, or store the data elsewhere and pass a reference",
            human(max_payload as u64),
            human(payload.get().len() as u64)
        )));
    }
    state
        .disk_admits("async runs", payload.get().len() as u64)
        .await?;
    let id = dispatch_core::run::new_run_id();
    let key = (ns.to_string(), function.to_string());
    state
        .queue
        .admit(&id, &key, payload.get().len() as u64, max_queued)?;
    let mut run = Run::new(id, ns, function, trigger, payload, state.queue.clock.now());
    run.is_async = true;
    run.event = event;
    run.http_context = http;
    run.callback = callback_url.or(spec_callback).map(|url| Callback {
        url,
        state: CallbackState::Pending,
        attempts: 0,
        last_error: None,
    });
    Ok(run)
}

fn human(bytes: u64) -> String {
    dispatch_core::quantity::human_bytes(bytes)
}

/// Cancels a run: a waiting one will not run, a running one's attempt is killed.
pub async fn cancel(state: &Arc<AppState>, ns: &str, id: &str) -> Result<Run, ApiError> {
    // A sync call's record sits in the history store: found there, it is refused below.
    let Some(mut run) = state.get_run(ns, id).await? else {
        return Err(ApiError::not_found(format!(
            "run {id:?} not found in namespace {ns:?}"
        )));
    };
    match state.queue.cancel(id) {
        Cancelled::Waiting | Cancelled::Running => {
            // The record may have moved on (RUNNING) since it was read.
            if let Some(latest) = get_run(state, ns, id).await {
                run = latest;
            }
            run.status = RunStatus::Cancelled;
            run.next_attempt_at = None;
            run.finished_at = Some(state.queue.clock.now());
            run.error = Some(ErrorObject::system("cancelled"));
            finalize(state, run.clone()).await;
            Ok(run)
        }
        Cancelled::NotActive if run.status.is_final() => Err(ApiError::conflict(format!(
            "run {id:?} already finished ({}): nothing to cancel",
            run.status
        ))),
        Cancelled::NotActive => Err(ApiError::new(
            StatusCode::CONFLICT,
            "NotCancellable",
            format!(
                "run {id:?} is {} and not in the queue (a sync run, or one finishing now): it cannot be cancelled",
                run.status
            ),
        )),
    }
}

/// Re-queues a DEAD run: attempts start again, earlier errors are kept.
pub async fn redrive(state: &Arc<AppState>, mut run: Run) -> Result<Run, ApiError> {
    if run.status != RunStatus::Dead {
        return Err(ApiError::conflict(format!(
            "run {:?} is {}, not DEAD: only dead runs are redriven",
            run.id, run.status
        )));
    }
    run.status = RunStatus::Queued;
    run.attempts = 0;
    run.error = None;
    run.finished_at = None;
    run.next_attempt_at = None;
    run.redriven_at = Some(state.queue.clock.now());
    if let Some(cb) = &mut run.callback {
        cb.state = CallbackState::Pending;
        cb.attempts = 0;
        cb.last_error = None;
    }
    if !save(state, &run).await {
        return Err(run_not_stored());
    }
    state.queue.push(&run);
    Ok(run)
}

/// Start-up: QUEUED runs go back in the queue; RUNNING ones were interrupted by the stop
/// of the previous server, which counts as a failed attempt (retried per policy).
pub async fn recover(state: &Arc<AppState>) {
    let active = match state.db(|s| s.active_runs()).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("failed to load the queue: {}", e.message);
            return;
        }
    };
    let (mut queued, mut retried, mut dead) = (0, 0, 0);
    for mut run in active {
        if run.status == RunStatus::Queued {
            state.queue.push(&run);
            queued += 1;
            continue;
        }
        let retry = match stored_retry(state, &run.namespace, &run.function).await {
            Ok(Some(r)) => r,
            Ok(None) => continue, // its function is gone
            Err(_) => Retry::default(),
        };
        let err = ErrorObject::system(format!(
            "the server stopped while attempt {} was running",
            run.attempts
        ));
        if after_failure(&mut run, &retry, &state.queue.clock, err) {
            if save(state, &run).await {
                state.queue.push(&run);
            }
            retried += 1;
        } else {
            finalize(state, run).await;
            dead += 1;
        }
    }
    if queued + retried + dead > 0 {
        tracing::info!(queued, retried, dead, "async runs recovered");
    }
}
