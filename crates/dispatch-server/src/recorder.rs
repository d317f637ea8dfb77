//! Writes run records off the hot path (DESIGN §5, §10): calls hand their record to a channel;
//! one task batches whatever is waiting into a single SQLite transaction. `flush` gives
//! read-your-writes to the API (a `get run` right after an exec finds it) and to shutdown.
//!
//! Durable writes (an async run's states, which its caller or the queue waits for) and
//! flushes come on a channel of their own that the writer serves first: under a sustained
//! load of sync calls they never wait behind thousands of queued sync records, only behind
//! the one transaction in flight (an enqueue's p99 was ~100 ms at 15k calls/s).
//!
//! Two writers: sync calls' records go to the history store, async runs' to the record
//! store, each with its own task (and, with a history file of its own, its own connection,
//! WAL and fsyncs), so that a durable write never waits behind a batch of history.

use std::sync::Arc;

use dispatch_core::Run;
use dispatch_store::RecordStore;
use tokio::sync::{mpsc, oneshot};

/// Sync records waiting beyond this make callers wait (backpressure, never loss).
const CHANNEL_BOUND: usize = 16 * 1024;
/// Durable writes and flushes waiting (their callers wait for the commit anyway).
const URGENT_BOUND: usize = 4096;
/// Most sync records per transaction (the wait of a durable write behind one).
const BATCH: usize = 256;
/// How long the history's writer waits for a batch to fill before it writes what it has.
/// Each transaction writes its pages (the chunk, its index entries, the usage row) to the WAL
/// whatever it holds: under a load of 16k calls/s the writer committed a few records at a
/// time, ~3,000 commits a second, most of their cost pages written again and again. A flush
/// or a durable write ends the wait at once (read-your-writes holds).
const HISTORY_LINGER: std::time::Duration = std::time::Duration::from_millis(20);

enum Urgent {
    /// Acknowledged once committed: `true` when the write succeeded.
    Durable(Box<Run>, oneshot::Sender<bool>),
    Flush(oneshot::Sender<()>),
}

/// One store's writer task.
#[derive(Clone)]
struct Writer {
    tx: mpsc::Sender<Box<Run>>,
    urgent: mpsc::Sender<Urgent>,
}

impl Writer {
    fn start(store: Arc<dyn RecordStore>, linger: Option<std::time::Duration>) -> Writer {
        let (tx, rx) = mpsc::channel(CHANNEL_BOUND);
        let (urgent, urgent_rx) = mpsc::channel(URGENT_BOUND);
        tokio::spawn(write_loop(store, rx, urgent_rx, linger));
        Writer { tx, urgent }
    }

    async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.urgent.send(Urgent::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

#[derive(Clone)]
pub struct Recorder {
    /// Async runs' states (the record store).
    records: Writer,
    /// Sync calls' records (the history store).
    history: Writer,
}

impl Recorder {
    pub fn start(records: Arc<dyn RecordStore>, history: Arc<dyn RecordStore>) -> Recorder {
        Recorder {
            records: Writer::start(records, None),
            history: Writer::start(history, Some(HISTORY_LINGER)),
        }
    }

    /// Queues a record for writing: a sync call's to the history, an async run's (a
    /// callback's progress) to the record store.
    pub async fn record(&self, run: Run) {
        let writer = if run.is_async {
            &self.records
        } else {
            &self.history
        };
        if writer.tx.send(Box::new(run)).await.is_err() {
            tracing::error!("run recorder stopped: a run record was not stored");
        }
    }

    /// Stores a record and returns once it is committed (async runs: nothing accepted is
    /// lost). Concurrent callers share one transaction (group commit).
    pub async fn record_durable(&self, run: Run) -> bool {
        let (done, wait) = oneshot::channel();
        if self
            .records
            .urgent
            .send(Urgent::Durable(Box::new(run), done))
            .await
            .is_err()
        {
            return false;
        }
        wait.await.unwrap_or(false)
    }

    /// Whether the writer has stopped (the server is stopping).
    pub fn is_closed(&self) -> bool {
        self.records.urgent.is_closed()
    }

    /// Waits until every record queued before this call is stored.
    pub async fn flush(&self) {
        tokio::join!(self.records.flush(), self.history.flush());
    }
}

async fn write_loop(
    store: Arc<dyn RecordStore>,
    mut rx: mpsc::Receiver<Box<Run>>,
    mut urgent_rx: mpsc::Receiver<Urgent>,
    linger: Option<std::time::Duration>,
) {
    let mut runs: Vec<Run> = Vec::new();
    let mut acks: Vec<oneshot::Sender<bool>> = Vec::new();
    // A flush is answered once the sync records queued before it are written: it waits for
    // `pulled` (sync records taken from the channel so far) to reach its mark, in the usual
    // small transactions — a flush under load must not make one giant transaction that
    // durable writes would wait behind.
    let mut flushes: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut pulled: u64 = 0;
    let (mut sync_open, mut urgent_open) = (true, true);
    loop {
        let mut urgent = Vec::new();
        tokio::select! {
            biased;
            u = urgent_rx.recv(), if urgent_open => match u {
                Some(u) => urgent.push(u),
                None => urgent_open = false,
            },
            r = rx.recv(), if sync_open => match r {
                Some(r) => {
                    runs.push(*r);
                    pulled += 1;
                }
                None => sync_open = false,
            },
            else => break,
        }
        while let Ok(u) = urgent_rx.try_recv() {
            urgent.push(u);
        }
        // Sync records only so far: wait a little for more to share their transaction.
        if let Some(linger) = linger
            && urgent.is_empty()
            && !runs.is_empty()
            && runs.len() + rx.len() < BATCH
        {
            let until = tokio::time::Instant::now() + linger;
            let mut more = Vec::new();
            while runs.len() < BATCH {
                tokio::select! {
                    biased;
                    u = urgent_rx.recv(), if urgent_open => {
                        match u {
                            Some(u) => urgent.push(u),
                            None => urgent_open = false,
                        }
                        break;
                    }
                    n = rx.recv_many(&mut more, BATCH - runs.len()), if sync_open => {
                        if n == 0 {
                            sync_open = false;
                            break;
                        }
                        pulled += n as u64;
                        runs.extend(more.drain(..).map(|r| *r));
                    }
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        for u in urgent {
            match u {
                Urgent::Durable(r, ack) => {
                    runs.push(*r);
                    acks.push(ack);
                }
                Urgent::Flush(w) => flushes.push((pulled + rx.len() as u64, w)),
            }
        }
        while runs.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => {
                    runs.push(*r);
                    pulled += 1;
                }
                Err(_) => break,
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
        // Everything pulled is written (or failed and logged): flushes up to here are done.
        // A flush whose records are not in the channel any more (closed) is done too.
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut flushes)
            .into_iter()
            .partition(|(mark, _)| *mark <= pulled || !sync_open);
        flushes = waiting;
        for (_, w) in done {
            let _ = w.send(());
        }
    }
    for (_, w) in flushes {
        let _ = w.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatch_store::{RunFilter, SqliteStore};

    fn call(id: &str) -> Run {
        let input = serde_json::value::RawValue::from_string("null".into()).unwrap();
        let mut r = Run::new(
            id.into(),
            "default",
            "hello",
            dispatch_core::Trigger::Exec,
            input,
            jiff::Timestamp::now(),
        );
        r.status = dispatch_core::RunStatus::Succeeded;
        r.finished_at = Some(jiff::Timestamp::now());
        r
    }

    fn stored(s: &SqliteStore) -> usize {
        let all = RunFilter {
            limit: Some(1000),
            ..Default::default()
        };
        s.list_runs("default", &all).unwrap().len()
    }

    /// Two sync calls' records 10 ms apart share one transaction (one chunk): the history's
    /// writer waits up to HISTORY_LINGER for company. Without the wait, two chunks.
    #[tokio::test(start_paused = true)]
    async fn sync_records_a_moment_apart_are_written_together() {
        let s = Arc::new(SqliteStore::in_memory().unwrap());
        let r = Recorder::start(s.clone(), s.clone());
        r.record(call("01A")).await;
        tokio::time::sleep(HISTORY_LINGER / 2).await;
        r.record(call("01B")).await;
        // Paused time: the sleeps advance it as far as the writer's wait needs.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while stored(&s) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not written");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let chunks = s.history_chunks().unwrap();
        assert_eq!(chunks, [("default".into(), "hello".into(), 2)]);
    }

    /// A flush (read-your-writes: `get run` right after a call) does not wait for the batch
    /// to fill: the record is stored before the wait would have ended.
    #[tokio::test(start_paused = true)]
    async fn a_flush_ends_the_wait() {
        let s = Arc::new(SqliteStore::in_memory().unwrap());
        let r = Recorder::start(s.clone(), s.clone());
        let t0 = tokio::time::Instant::now();
        r.record(call("01A")).await;
        r.flush().await;
        assert_eq!(stored(&s), 1);
        assert!(t0.elapsed() < HISTORY_LINGER, "{:?}", t0.elapsed());
    }
}
