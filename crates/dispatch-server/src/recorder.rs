//! Writes run records off the hot path (DESIGN §5, §10): calls hand their record to a channel;
//! one task batches whatever is waiting into a single SQLite transaction. `flush` gives
//! read-your-writes to the API (a `get run` right after an exec finds it) and to shutdown.

use std::sync::Arc;

use dispatch_core::Run;
use dispatch_store::Store;
use tokio::sync::{mpsc, oneshot};

/// Records waiting beyond this make callers wait (backpressure, never loss).
const CHANNEL_BOUND: usize = 16 * 1024;
/// Most records per transaction.
const BATCH: usize = 512;

enum Msg {
    Run(Box<Run>),
    /// Acknowledged once committed: `true` when the write succeeded.
    Durable(Box<Run>, oneshot::Sender<bool>),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Msg>,
}

impl Recorder {
    pub fn start(store: Arc<dyn Store>) -> Recorder {
        let (tx, rx) = mpsc::channel(CHANNEL_BOUND);
        tokio::spawn(write_loop(store, rx));
        Recorder { tx }
    }

    /// Queues a record for writing.
    pub async fn record(&self, run: Run) {
        if self.tx.send(Msg::Run(Box::new(run))).await.is_err() {
            tracing::error!("run recorder stopped: a run record was not stored");
        }
    }

    /// Stores a record and returns once it is committed (async runs: nothing accepted is
    /// lost). Concurrent callers share one transaction (group commit).
    pub async fn record_durable(&self, run: Run) -> bool {
        let (done, wait) = oneshot::channel();
        if self
            .tx
            .send(Msg::Durable(Box::new(run), done))
            .await
            .is_err()
        {
            return false;
        }
        wait.await.unwrap_or(false)
    }

    /// Whether the writer has stopped (the server is stopping).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until every record queued before this call is stored.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write_loop(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Msg>) {
    let mut runs: Vec<Run> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut acks: Vec<oneshot::Sender<bool>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Run(r) => runs.push(*r),
                Msg::Durable(r, ack) => {
                    runs.push(*r);
                    acks.push(ack);
                }
                Msg::Flush(w) => waiters.push(w),
            }
            if runs.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        let mut ok = true;
        if !runs.is_empty() {
            let batch = std::mem::take(&mut runs);
            let store = store.clone();
            let n = batch.len();
            let res = tokio::task::spawn_blocking(move || store.put_runs(&batch)).await;
            ok = matches!(res, Ok(Ok(())));
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("failed to store {n} run records: {e}"),
                Err(e) => tracing::error!("failed to store {n} run records: {e}"),
            }
        }
        for a in acks.drain(..) {
            let _ = a.send(ok);
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}
