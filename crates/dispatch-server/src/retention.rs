//! Run retention: every ten minutes, finished runs older than `--run-retention` (default 7
//! days) are deleted, and each function keeps at most its newest `runs_per_function`
//! finished runs. QUEUED and RUNNING runs are never touched.

use std::sync::Arc;
use std::time::Duration;

use crate::state::AppState;

const PERIOD: Duration = Duration::from_secs(600);

pub async fn prune(state: &AppState) -> Result<u64, crate::ApiError> {
    let retention = jiff::SignedDuration::try_from(state.config.run_retention)
        .unwrap_or(jiff::SignedDuration::MAX);
    let before = state
        .queue
        .clock
        .now()
        .checked_sub(retention)
        .unwrap_or(jiff::Timestamp::MIN);
    let keep = state.config.runs_per_function;
    state.recorder.flush().await;
    let n = state.db(move |s| s.prune_runs(before, keep)).await?;
    if n > 0 {
        tracing::info!(deleted = n, "run retention");
    }
    Ok(n)
}

pub fn spawn(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PERIOD);
        loop {
            tick.tick().await;
            if let Err(e) = prune(&state).await {
                tracing::warn!("run retention failed: {}", e.message);
            }
        }
    })
}
