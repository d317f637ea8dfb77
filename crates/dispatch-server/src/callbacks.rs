//! Callbacks: the final record of an async run is POSTed (JSON) to its callback URL
//! (`spec.callbackUrl` or the call's `callbackUrl`). Delivery runs in its own task, never in
//! the queue's way; failures are retried with backoff (1s doubling to 5m, 10 attempts), and
//! the delivery state is stored on the run, so a restart resumes pending deliveries.

use std::sync::Arc;
use std::time::Duration;

use dispatch_core::{CallbackState, Run};

use crate::state::AppState;

const ATTEMPTS: u32 = 10;
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(300);
const TIMEOUT: Duration = Duration::from_secs(10);

pub fn spawn_delivery(state: Arc<AppState>, run: Run) {
    tokio::spawn(deliver(state, run));
}

async fn deliver(state: Arc<AppState>, mut run: Run) {
    let Some(url) = run.callback.as_ref().map(|c| c.url.clone()) else {
        return;
    };
    let mut delay = FIRST_DELAY;
    loop {
        let attempt = run.callback.as_ref().map_or(0, |c| c.attempts) + 1;
        let mut request = state
            .http
            .post(&url)
            .timeout(TIMEOUT)
            .header("content-type", "application/json")
            .header("x-dispatch-run-id", &run.id);
        // The receiver's work joins the run's trace.
        if let Some(t) = &run.trace {
            request = request.header("traceparent", t.traceparent());
        }
        let result = request
            .body(serde_json::to_vec(&run).unwrap_or_default())
            .send()
            .await;
        let error = match result {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("{url} answered {}", r.status())),
            Err(e) => Some(format!("POST {url} failed: {e}")),
        };
        let done = error.is_none() || attempt >= ATTEMPTS;
        if let Some(cb) = &mut run.callback {
            cb.attempts = attempt;
            cb.last_error = error.clone();
            cb.state = match (&error, done) {
                (None, _) => CallbackState::Delivered,
                (Some(_), true) => CallbackState::Failed,
                (Some(_), false) => CallbackState::Pending,
            };
        }
        state.recorder.record(run.clone()).await;
        if done {
            if let Some(e) = error {
                tracing::warn!(run = %run.id, "callback given up after {attempt} attempts: {e}");
            }
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// Resumes deliveries a stop interrupted (this server's at start-up, or a server's whose
/// lease ended).
pub fn resume(state: &Arc<AppState>, runs: Vec<Run>) {
    for r in runs {
        spawn_delivery(state.clone(), r);
    }
}
