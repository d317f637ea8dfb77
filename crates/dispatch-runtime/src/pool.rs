//! The warm worker pool of one function build (DESIGN §5).
//!
//! At most `maxWorkers` calls run at once (a semaphore); each takes the most recently used
//! idle worker (LIFO keeps few workers hot) or starts one (a cold start). Callers beyond that
//! wait in a bounded queue; past its bound a call is refused ([`PoolError::Busy`], HTTP 429).
//! Idle workers beyond `minWorkers` are reaped after `idleTimeout` ([`Pool::reap`]).
//! A closed pool (its function was rebuilt or deleted) lets in-flight calls finish and kills
//! each worker as it comes back: traffic moves to the new pool without failed calls.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dispatch_core::{ColdStart, Envelope, ErrorObject, Language, Logs, Timings};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::budget::{BudgetFull, WorkerBudget};
use crate::exec::run_exec;
use crate::worker::{StartError, Worker, WorkerSpec};
use crate::zygote::{ForkError, Spares, Zygote};

/// How a pool gets a new worker.
#[derive(Clone, Default)]
pub enum Launcher {
    /// A new interpreter process.
    #[default]
    Spawn,
    /// A fork of the image's zygote (Python); a zygote that cannot start means a spawn.
    Zygote(Arc<Zygote>),
    /// A pre-spawned generic worker of the image, given the function (Node).
    Spares(Arc<Spares>),
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::Spawn => "Spawn",
            Launcher::Zygote(_) => "Zygote",
            Launcher::Spares(_) => "Spares",
        })
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub language: Language,
    pub worker: WorkerSpec,
    pub launcher: Launcher,
    pub timeout: Duration,
    pub max_workers: u32,
    pub min_workers: u32,
    pub idle_timeout: Duration,
    /// Calls allowed to wait for a worker beyond the running ones.
    pub max_queue: usize,
    /// The server-wide worker budget every cold start reserves from (none: unbounded).
    pub budget: Option<Arc<WorkerBudget>>,
}

/// The result of one call through a pool.
/// The header with which `dispatch runner` (a function's pod) tells the server that the
/// call ran out of time: the envelope alone says it only in words.
pub const TIMED_OUT_HEADER: &str = "x-dispatch-timed-out";

#[derive(Debug)]
pub struct CallOutcome {
    pub envelope: Envelope,
    pub cold: bool,
    /// The split of the cold start this call paid for.
    pub cold_start: Option<ColdStart>,
    pub timings: Timings,
    /// The function ran out of time (the envelope carries the SystemError saying so).
    pub timed_out: bool,
    /// It streamed (chunks were yielded): how much.
    pub stream: Option<dispatch_core::StreamStats>,
    /// The stream's reader went away and the call was stopped.
    pub cancelled: bool,
}

impl CallOutcome {
    /// The outcome of a call that needed no cold start and took `exec`: not timed out,
    /// streamed nothing, not cancelled (set those on it when they are so).
    pub fn warm(envelope: Envelope, exec: Duration) -> CallOutcome {
        CallOutcome {
            envelope,
            cold: false,
            cold_start: None,
            timings: Timings {
                exec_ms: exec.as_millis() as u64,
                ..Default::default()
            },
            timed_out: false,
            stream: None,
            cancelled: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "function {function} is busy: {running} calls running and {waiting} waiting; retry later or raise concurrency.maxWorkers"
    )]
    Busy {
        function: String,
        running: u32,
        waiting: usize,
    },
    /// The server-wide worker budget is full and nothing idle could be evicted.
    #[error(transparent)]
    OverBudget(#[from] BudgetFull),
}

/// A worker taken out of the pool for one call; dropping it unreturned discards the worker.
struct Checkout<'a> {
    pool: &'a Pool,
    worker: Option<Worker>,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            self.pool.discard(w);
        }
    }
}

pub struct Pool {
    cfg: PoolConfig,
    digest: String,
    /// Idle workers, most recently used last. A std mutex: held only to push or pop.
    idle: Mutex<Vec<Worker>>,
    permits: Semaphore,
    waiting: AtomicUsize,
    /// Workers alive (idle or busy).
    live: AtomicUsize,
    closed: AtomicBool,
}

impl Pool {
    pub fn new(cfg: PoolConfig, digest: String) -> Self {
        Pool {
            permits: Semaphore::new(cfg.max_workers as usize),
            cfg,
            digest,
            idle: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// How its workers start.
    pub fn launcher(&self) -> &Launcher {
        &self.cfg.launcher
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    fn idle(&self) -> parking_lot::MutexGuard<'_, Vec<Worker>> {
        // Only Vec push/pop happen under this lock; a poisoned lock holds a valid Vec.
        self.idle.lock()
    }

    /// What one worker of this pool counts against the worker budget: its memory limit.
    fn cost(&self) -> u64 {
        self.cfg
            .worker
            .jail
            .as_ref()
            .map_or(dispatch_core::resource::DEFAULT_MEMORY, |j| j.limits.memory)
    }

    /// Starts a worker of this pool (a cold start), once the worker budget has room.
    pub async fn start_worker(&self) -> Result<Worker, StartError> {
        // Interpreters start in well under a second; a handler that imports something heavy
        // gets the function's own timeout, but never less than 10 s.
        let ready_within = self.cfg.timeout.max(Duration::from_secs(10));
        self.start_worker_by(Instant::now() + ready_within, ready_within)
            .await
    }

    /// [`Pool::start_worker`], waiting for room in the budget until `deadline` at most.
    async fn start_worker_by(
        &self,
        deadline: Instant,
        ready_within: Duration,
    ) -> Result<Worker, StartError> {
        if let Some(b) = &self.cfg.budget {
            b.reserve(self.cost(), deadline).await?;
        }
        let started = self.launch(ready_within).await;
        match started {
            Ok(w) => {
                self.live.fetch_add(1, Ordering::Relaxed);
                Ok(w)
            }
            Err(e) => {
                if let Some(b) = &self.cfg.budget {
                    b.release(self.cost());
                }
                Err(e)
            }
        }
    }

    async fn launch(&self, ready_within: Duration) -> Result<Worker, StartError> {
        let spec = &self.cfg.worker;
        let w = match &self.cfg.launcher {
            Launcher::Spawn => Worker::start(spec, ready_within).await?,
            Launcher::Spares(s) => s.take(spec, ready_within).await?,
            Launcher::Zygote(z) => match z.fork(spec, ready_within).await {
                Ok(w) => w,
                Err(ForkError::Worker(e)) => return Err(e),
                Err(ForkError::Zygote(e)) => {
                    tracing::warn!(function = %spec.label, "zygote unavailable, spawning: {e}");
                    Worker::start(spec, ready_within).await?
                }
            },
        };
        Ok(w)
    }

    /// Hands a worker to the pool (after a call, or a worker started ahead of traffic).
    pub fn put_idle(&self, mut w: Worker) {
        if self.closed.load(Ordering::Acquire) {
            self.discard(w);
            return;
        }
        w.last_used = Instant::now();
        self.idle().push(w);
    }

    fn discard(&self, w: Worker) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        drop(w); // kills its process group
        if let Some(b) = &self.cfg.budget {
            b.release(self.cost());
        }
    }

    /// When the least recently used idle worker that may be evicted was last used (none:
    /// nothing idle beyond `minWorkers`).
    pub fn oldest_evictable(&self) -> Option<Instant> {
        let idle = self.idle();
        (self.live.load(Ordering::Relaxed) > self.cfg.min_workers as usize)
            .then(|| idle.first().map(|w| w.last_used))
            .flatten()
    }

    /// Stops the least recently used idle worker (beyond `minWorkers`) to make room for
    /// another function's; false when there is none.
    pub fn evict_oldest_idle(&self) -> bool {
        let victim = {
            let mut idle = self.idle();
            (self.live.load(Ordering::Relaxed) > self.cfg.min_workers as usize && !idle.is_empty())
                .then(|| idle.remove(0))
        };
        match victim {
            Some(w) => {
                self.discard(w);
                true
            }
            None => false,
        }
    }

    /// Runs one call. Function and system errors come back inside the envelope; only
    /// overload is an `Err`.
    pub async fn call(
        &self,
        context: &RawValue,
        payload: &RawValue,
        deadline: Instant,
    ) -> Result<CallOutcome, PoolError> {
        self.call_streaming(context, payload, deadline, None).await
    }

    /// [`Pool::call`], the chunks a streaming handler yields sent to `sink` as they come
    /// (without a sink they are the answer).
    pub async fn call_streaming(
        &self,
        context: &RawValue,
        payload: &RawValue,
        deadline: Instant,
        sink: Option<&crate::stream::Sink>,
    ) -> Result<CallOutcome, PoolError> {
        let t0 = Instant::now();
        let mut timings = Timings::default();
        let permit = match self.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
                if waiting >= self.cfg.max_queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(PoolError::Busy {
                        function: self.cfg.worker.label.clone(),
                        running: self.cfg.max_workers,
                        waiting,
                    });
                }
                let got = tokio::time::timeout_at(deadline.into(), self.permits.acquire()).await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                match got {
                    Ok(Ok(p)) => p,
                    // The semaphore is never closed; treat it like a timeout all the same.
                    Ok(Err(_)) | Err(_) => {
                        timings.queued_ms = ms(t0.elapsed());
                        return Ok(self.failed(
                            ErrorObject::system(format!(
                                "no worker became free within the function's timeout ({} waiting)",
                                dispatch_core::duration::format_duration(self.cfg.timeout)
                            )),
                            false,
                            timings,
                        ));
                    }
                }
            }
        };
        timings.queued_ms = ms(t0.elapsed());
        let remaining = deadline.saturating_duration_since(Instant::now());

        if self.cfg.language == Language::Exec {
            let t1 = Instant::now();
            let result = run_exec(&self.cfg.worker, context, payload, remaining, sink).await;
            timings.exec_ms = ms(t1.elapsed());
            drop(permit);
            let ((envelope, stream), timed_out, cancelled) = match result {
                Ok(answer) => (answer, false, false),
                Err(f) => (
                    (Envelope::error(f.error, Logs::default()), None),
                    f.timed_out,
                    f.cancelled,
                ),
            };
            return Ok(CallOutcome {
                envelope,
                cold: true,
                cold_start: None,
                timings,
                timed_out,
                stream,
                cancelled,
            });
        }

        let reused = self.idle().pop();
        let (worker, cold) = match reused {
            Some(w) => (w, false),
            None => {
                let t1 = Instant::now();
                let ready_within = self.cfg.timeout.max(Duration::from_secs(10));
                match self.start_worker_by(deadline, ready_within).await {
                    Ok(w) => {
                        timings.cold_start_ms = ms(t1.elapsed());
                        (w, true)
                    }
                    Err(StartError::OverBudget(e)) => return Err(PoolError::OverBudget(e)),
                    Err(e) => {
                        timings.cold_start_ms = ms(t1.elapsed());
                        return Ok(self.failed(e.to_error_object(), true, timings));
                    }
                }
            }
        };
        let t2 = Instant::now();
        let remaining = deadline.saturating_duration_since(Instant::now());
        // If this future is dropped mid-call (a cancelled run), the checkout discards the
        // worker: its process group is killed and the next call starts a fresh one.
        let mut checkout = Checkout {
            pool: self,
            worker: None,
        };
        let mut cold_start = cold.then_some(worker.cold_start);
        let result = checkout
            .worker
            .insert(worker)
            .call(context, payload, remaining, self.cfg.timeout, sink)
            .await;
        let took = t2.elapsed();
        timings.exec_ms = ms(took);
        if let Some(c) = cold_start.as_mut() {
            c.first_call_ms = took.as_secs_f64() * 1e3;
            c.total_ms += c.first_call_ms;
        }
        let worker = checkout.worker.take();
        let ((envelope, stream), timed_out, cancelled) = match (result, worker) {
            (Ok(answer), Some(w)) => {
                if w.spent() {
                    self.discard(w);
                } else {
                    self.put_idle(w);
                }
                (answer, false, false)
            }
            (Ok(answer), None) => (answer, false, false),
            (Err(f), w) => {
                if let Some(w) = w {
                    self.discard(w);
                }
                (
                    (Envelope::error(f.error, Logs::default()), None),
                    f.timed_out,
                    f.cancelled,
                )
            }
        };
        drop(permit);
        Ok(CallOutcome {
            envelope,
            cold,
            cold_start,
            timings,
            timed_out,
            stream,
            cancelled,
        })
    }

    fn failed(&self, err: ErrorObject, cold: bool, timings: Timings) -> CallOutcome {
        CallOutcome {
            envelope: Envelope::error(err, Logs::default()),
            cold,
            cold_start: None,
            timings,
            timed_out: false,
            stream: None,
            cancelled: false,
        }
    }

    /// Kills idle workers unused for `idleTimeout`, keeping `minWorkers` alive.
    pub fn reap(&self, now: Instant) {
        let victims: Vec<Worker> = {
            let mut idle = self.idle();
            let min = self.cfg.min_workers as usize;
            let mut alive = self.live.load(Ordering::Relaxed);
            let mut out = Vec::new();
            // Oldest first: the front of the Vec was used least recently.
            while alive > min
                && idle.first().is_some_and(|w| {
                    now.saturating_duration_since(w.last_used) >= self.cfg.idle_timeout
                })
            {
                out.push(idle.remove(0));
                alive -= 1;
            }
            out
        };
        for w in victims {
            self.discard(w);
        }
    }

    /// Starts workers until `minWorkers` are alive (exec functions keep none).
    pub async fn warm(&self) -> Result<(), StartError> {
        if self.cfg.language == Language::Exec {
            return Ok(());
        }
        while self.live.load(Ordering::Relaxed) < self.cfg.min_workers as usize
            && !self.closed.load(Ordering::Acquire)
        {
            let w = self.start_worker().await?;
            self.put_idle(w);
        }
        Ok(())
    }

    /// Stops taking workers back and kills the idle ones; busy ones die as they return.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let idle: Vec<Worker> = std::mem::take(&mut *self.idle());
        for w in idle {
            self.discard(w);
        }
    }

    /// Calls waiting for a worker now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Workers alive (idle or busy).
    pub fn live_workers(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Idle workers now.
    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }

    /// Process ids of idle workers (tests check that they are gone after close).
    pub fn idle_pids(&self) -> Vec<i32> {
        self.idle().iter().filter_map(Worker::pid).collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
