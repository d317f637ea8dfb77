//! The life of one async run, around the scheduler of [`super::Queue`]: admitted and stored
//! (`enqueue`, `admit`), run attempt by attempt (`run_one`: deployed or parked, busy or
//! called, then retried with backoff, DEAD or final), stored after every step (`save`, which
//! retries a refusing store rather than lose a state), cancelled, redriven and recovered at
//! start-up.

use std::hash::Hasher;
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::{
    AttemptError, Callback, CallbackState, ErrorObject, ErrorType, FunctionSpec, Kind, Retry, Run,
    RunStatus,
};
use dispatch_runtime::InvokeError;

use super::{Cancelled, Queue, QueueError};
use crate::clock::Clock;
use crate::invoke::{Invocation, apply_outcome, call_deployed};
use crate::state::AppState;

/// How long a run waits before it is looked at again when its function cannot take it now
/// (not READY yet, or its workers are all busy).
pub(super) const NOT_READY_DELAY: Duration = Duration::from_secs(1);
const BUSY_DELAY: Duration = Duration::from_millis(200);

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
pub(super) async fn stored_retry(
    state: &AppState,
    ns: &str,
    name: &str,
) -> Result<Option<Retry>, QueueError> {
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
            tracing::error!("failed to read a run: {e}");
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
pub(super) async fn run_one(state: Arc<AppState>, ns: String, id: String) {
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
        // Another server's now (it took this one's work over while it could not renew its
        // lease): not run here.
        Some(r) if r.status == RunStatus::Queued && state.replica.owns(r.replica.as_deref()) => r,
        _ => {
            // Deleted with its function, or cancelled.
            q.retire(&id);
            return;
        }
    };
    let deployed = match run.pinned_version {
        None => state.deployed(&run.namespace, &run.function),
        Some(v) => {
            match crate::versions::deployment(&state, &run.namespace, &run.function, v).await {
                Ok(d) => Some(d),
                // The version is gone (or cannot be built again): the run cannot run, ever.
                Err(
                    e @ (crate::versions::VersionError::NoVersion { .. }
                    | crate::versions::VersionError::Unavailable { .. }),
                ) => {
                    slot.2 = false;
                    if q.finish(&id) {
                        run.error = Some(ErrorObject::system(e.to_string()));
                        run.status = RunStatus::Dead;
                        finalize(&state, run).await;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("async run {}: {e}", run.id);
                    None
                }
            }
        }
    };
    let Some(deployed) = deployed else {
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
    run.version = deployed.version;
    if !save(&state, &run).await {
        slot.2 = false;
        if q.finish(&id) {
            run.attempts -= 1;
            requeue_later(&state, run, NOT_READY_DELAY).await;
        }
        return;
    }
    // Its lines go to whoever follows the run while the attempt runs (`logs --follow`).
    let (listener, live) = state.live_logs.open(
        &run.id,
        (&run.namespace, &run.function),
        crate::invoke::secret_values(&deployed),
    );
    let sink = dispatch_runtime::Sink::logs_only(listener);
    let started = std::time::Instant::now();
    let outcome = call_deployed(
        &deployed,
        &run,
        crate::invoke::Extras {
            http: run.http_context.as_ref(),
            sink: Some(&sink),
            ..Default::default()
        },
    )
    .await;
    drop(live);
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
            apply_outcome(&mut run, &mut outcome, &deployed, &state, started.elapsed());
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
            tracing::warn!("async run {}: {e}", run.id);
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

/// The span of an async run's acceptance from `started_ns`, when spans are exported.
pub(crate) fn accepted_span(state: &AppState, run: &Run, started_ns: u64) {
    if let Some(e) = state.otlp.get() {
        crate::otlp::accept_span(e, run, started_ns);
    }
}

/// Accepts an invocation for later: admitted to the queue's bounds, stored durably, then
/// pushed to the scheduler. Refused as [`admit`] says, or when the store refuses it.
pub async fn enqueue(state: &Arc<AppState>, inv: Invocation) -> Result<Run, QueueError> {
    // Read only when spans are made.
    let started = state.otlp.get().map(|_| crate::otlp::now_ns());
    let run = admit(state, inv).await?;
    if !state.recorder.record_durable(run.clone()).await {
        state.queue.retire(&run.id);
        // Refused for want of space: say so (507), not "internal".
        state.disk_admits("async runs", 0).await?;
        return Err(QueueError::NotStored);
    }
    state.queue.push(&run);
    if let Some(started) = started {
        accepted_span(state, &run, started);
    }
    Ok(run)
}

/// A new async run admitted to the queue's bounds (it counts from here) and not stored yet:
/// the caller stores it and then [`Queue::push`]es it, or [`Queue::retire`]s it. Refused
/// with 404 (no such function), 413 (payload), 507 (disk) or 429 (`QueueFull`).
pub async fn admit(state: &Arc<AppState>, inv: Invocation) -> Result<Run, QueueError> {
    let Invocation {
        namespace,
        function,
        payload,
        trigger,
        http,
        event,
        callback: callback_url,
        affinity,
        stream: _,
        run_id: _,
        connection: _,
        timeout: _,
        trace,
    } = inv;
    // `hello@3`, `hello@prod`: the version is chosen now and every attempt runs it.
    let (function, pinned) = if function.contains('@') {
        let t = dispatch_core::versions::Target::parse(&function)?;
        let pinned =
            crate::versions::version_of(state, &namespace, &t, affinity.as_deref()).await?;
        if let Some(v) = pinned {
            crate::versions::check_version(state, &namespace, &t.function, v).await?;
        }
        (t.function, pinned)
    } else {
        (function, None)
    };
    let (ns, function) = (namespace.as_str(), function.as_str());
    let (spec_callback, max_queued) = match state.deployed(ns, function) {
        Some(d) => (d.callback_url.clone(), d.max_queued),
        None => {
            let Some(f) = state.get(ns, Kind::Function, function).await? else {
                return Err(QueueError::FunctionNotFound {
                    namespace: ns.to_string(),
                    function: function.to_string(),
                });
            };
            let spec = f.typed_spec::<FunctionSpec>()?;
            (spec.callback_url, spec.max_queued.map(|n| n as usize))
        }
    };
    let max_payload = state.config.max_async_payload;
    if payload.get().len() > max_payload {
        return Err(QueueError::PayloadTooLarge {
            limit: max_payload as u64,
            size: payload.get().len() as u64,
        });
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
    // Every attempt and retry stays in the trace it was accepted in.
    run.trace = Some(trace.unwrap_or_else(|| dispatch_core::trace::Trace::child_of(None)));
    run.pinned_version = pinned;
    run.replica = state.replica.id();
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

pub(super) fn human(bytes: u64) -> String {
    dispatch_core::quantity::human_bytes(bytes)
}

/// Cancels a run: a waiting one will not run, a running one's attempt is killed. A run
/// another server owns (a shared store) is cancelled by that server, asked through the
/// store; the answer waits (up to [`CANCEL_WAIT`]) for its record to say so.
pub async fn cancel(state: &Arc<AppState>, ns: &str, id: &str) -> Result<Run, QueueError> {
    // A sync call's record sits in the history store: found there, it is refused below.
    let Some(run) = state.get_run(ns, id).await? else {
        return Err(QueueError::RunNotFound {
            namespace: ns.to_string(),
            id: id.to_string(),
        });
    };
    if let Some(cancelled) = cancel_here(state, ns, id, Some(run.clone())).await {
        return Ok(cancelled);
    }
    if run.status.is_final() {
        return Err(QueueError::Finished {
            id: id.to_string(),
            status: run.status,
        });
    }
    let Some(owner) = run
        .replica
        .clone()
        .filter(|r| run.is_async && !state.replica.owns(Some(r)))
    else {
        return Err(QueueError::NotCancellable {
            id: id.to_string(),
            status: run.status,
        });
    };
    let (n, i) = (ns.to_string(), id.to_string());
    state.db(move |s| s.request_cancel(&n, &i)).await?;
    let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(latest) = get_run(state, ns, id).await
            && latest.status.is_final()
        {
            return Ok(latest);
        }
    }
    Err(QueueError::CancelUnconfirmed {
        id: id.to_string(),
        replica: owner,
    })
}

/// How long a cancel waits for the server that owns the run to confirm it.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// Cancels a run in this server's queue (asked here, or by another server sharing the store);
/// `None` when the queue does not hold it. `read`: the record as the caller read it, used if
/// it cannot be read again.
pub async fn cancel_here(
    state: &Arc<AppState>,
    ns: &str,
    id: &str,
    read: Option<Run>,
) -> Option<Run> {
    match state.queue.cancel(id) {
        Cancelled::Waiting | Cancelled::Running => {
            // The record may have moved on (RUNNING) since it was read.
            let Some(mut run) = get_run(state, ns, id).await.or(read) else {
                tracing::error!(run = %id, "a cancelled run could not be read: it stays as stored until the next start");
                state.queue.retire(id);
                return None;
            };
            run.status = RunStatus::Cancelled;
            run.next_attempt_at = None;
            run.finished_at = Some(state.queue.clock.now());
            run.error = Some(ErrorObject::system("cancelled"));
            finalize(state, run.clone()).await;
            Some(run)
        }
        Cancelled::NotActive => None,
    }
}

/// Re-queues a DEAD run: attempts start again, earlier errors are kept.
pub async fn redrive(state: &Arc<AppState>, mut run: Run) -> Result<Run, QueueError> {
    if run.status != RunStatus::Dead {
        return Err(QueueError::NotDead {
            id: run.id,
            status: run.status,
        });
    }
    run.status = RunStatus::Queued;
    run.attempts = 0;
    run.error = None;
    run.finished_at = None;
    run.next_attempt_at = None;
    run.redriven_at = Some(state.queue.clock.now());
    run.replica = state.replica.id();
    if let Some(cb) = &mut run.callback {
        cb.state = CallbackState::Pending;
        cb.attempts = 0;
        cb.last_error = None;
    }
    if !save(state, &run).await {
        return Err(QueueError::NotStored);
    }
    state.queue.push(&run);
    Ok(run)
}

/// Runs this server took charge of (start-up, or a server whose lease ended): QUEUED ones
/// go in the queue; RUNNING ones were interrupted by the stop of the server that ran them,
/// which counts as a failed attempt (retried per policy).
pub async fn recover(state: &Arc<AppState>, active: Vec<Run>) {
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
