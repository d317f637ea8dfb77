//! Run retention: finished runs go when they were created longer ago than
//! `--run-retention` (default 7 days), beyond the newest `--runs-per-function` of their function, or beyond
//! `--run-history-budget` bytes of run records in their namespace (oldest first). QUEUED and
//! RUNNING runs are never touched.
//!
//! Pruning never stalls a caller: it runs continuously, in steps of at most [`BATCH`] rows,
//! each its own short transaction, yielding between steps so that the recorder and durable
//! enqueues get the database in between (a prune used to be one statement: 3 million rows,
//! 40 s during which an async call waited 21 s for its 202). After large deletes the freed
//! pages go back to the file system (incremental vacuum, WAL truncated), also in steps.

use std::sync::Arc;
use std::time::Duration;

use dispatch_store::Retention;

use crate::state::AppState;

/// Rows deleted per step (one transaction: a few milliseconds with the runs' indexes).
pub const BATCH: usize = 250;
/// Between steps while there is a backlog: room for other writers.
const BETWEEN_STEPS: Duration = Duration::from_millis(2);
/// Deleted rows after which free pages are given back to the file system.
const COMPACT_AFTER: u64 = 10_000;
/// Pages released per compaction step (1 MiB: a short transaction).
const COMPACT_PAGES: u64 = 256;

/// The rules as of now.
pub fn rules(state: &AppState) -> Retention {
    let retention = jiff::SignedDuration::try_from(state.config.run_retention)
        .unwrap_or(jiff::SignedDuration::MAX);
    Retention {
        created_before: state
            .queue
            .clock
            .now()
            .checked_sub(retention)
            .unwrap_or(jiff::Timestamp::MIN),
        keep_per_function: state.config.runs_per_function,
        max_bytes_per_namespace: state.config.run_history_budget,
        budgets: state
            .namespaces()
            .into_iter()
            .filter_map(|(ns, info)| Some((ns, info.run_history_budget?)))
            .collect(),
        kept: Default::default(),
    }
}

/// One step: at most `batch` runs deleted in each store that holds run records (durable
/// runs, then sync calls' history), one transaction each. The bounds are shared: the
/// history gets what the durable runs leave of a namespace's byte budget and of a
/// function's count. The age applies to each store alike.
pub async fn step(state: &AppState, batch: usize) -> Result<u64, crate::state::StateError> {
    let rules = rules(state);
    state
        .with_run_stores(move |stores| {
            let shared = stores.len() > 1;
            let mut used = Vec::new();
            let mut deleted = 0;
            for s in stores {
                deleted += s.prune_runs(&rules.less(&used), batch)?;
                if shared {
                    used.extend(s.function_usage()?);
                }
            }
            Ok(deleted)
        })
        .await
}

/// Prunes until nothing is over the rules (in steps), then compacts if much went; returns
/// the runs deleted. Records still on their way to the store are not waited for (a caller
/// that needs them counted flushes the recorder first).
pub async fn prune(state: &AppState) -> Result<u64, crate::state::StateError> {
    let mut total = 0;
    loop {
        let n = step(state, BATCH).await?;
        total += n;
        if n < BATCH as u64 {
            break;
        }
        tokio::time::sleep(BETWEEN_STEPS).await;
    }
    if total > 0 {
        tracing::info!(deleted = total, "run retention");
    }
    if total >= COMPACT_AFTER {
        compact(state).await?;
    }
    Ok(total)
}

/// Gives free pages back to the file system, a step at a time.
pub async fn compact(state: &AppState) -> Result<u64, crate::state::StateError> {
    let mut released = 0;
    loop {
        let n: u64 = state
            .each_run_store(|s| s.compact(COMPACT_PAGES))
            .await?
            .into_iter()
            .sum();
        released += n;
        if n < COMPACT_PAGES {
            return Ok(released);
        }
        tokio::time::sleep(BETWEEN_STEPS).await;
    }
}

pub fn spawn(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // First the interval: a test that drives the steps itself sets it long.
            tokio::time::sleep(state.config.retention_interval).await;
            if let Err(e) = prune(&state).await {
                tracing::warn!("run retention failed: {e}");
            }
        }
    })
}
