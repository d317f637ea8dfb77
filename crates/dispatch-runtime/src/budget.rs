//! The server-wide worker budget: how many function workers may be alive at once, and how much
//! memory they may hold together, counted at each worker's memory limit (`spec.resources.memory`,
//! which its cgroup enforces). Every pool shares it. A cold start reserves its share first;
//! when the budget is full the least recently used idle worker of any function is evicted;
//! when none is idle the start waits for one to free up until its deadline, and is then
//! refused (HTTP 429 with Retry-After) — the machine never runs out of memory for workers.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::Notify;

use crate::pool::Pool;

/// Workers alive at once by default, whatever their memory.
pub const DEFAULT_MAX_WORKERS_TOTAL: usize = 1024;

/// The memory budget by default: three quarters of the machine's RAM (the rest is for the
/// server, zygotes, builds and the page cache).
pub fn default_memory_budget() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib * 1024);
    total / 4 * 3
}

/// What the budget holds now and did since start (`/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetUse {
    pub workers: usize,
    /// Of them, idle in their pools (the rest are calling, or starting).
    pub idle: usize,
    pub memory: u64,
    pub max_workers: usize,
    pub max_memory: u64,
    /// Idle workers stopped to make room for another function's.
    pub evictions: u64,
    /// Cold starts refused: the budget was full and nothing idle to evict.
    pub refusals: u64,
}

/// A cold start could not get room in the budget before its deadline.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server runs as many workers as its budget allows ({workers} of {max_workers} workers, \
     {memory} of {max_memory} of memory) and none is idle: retry later, or raise \
     --max-workers-total / --worker-memory-budget"
)]
pub struct BudgetFull {
    pub workers: usize,
    pub max_workers: usize,
    pub memory: String,
    pub max_memory: String,
}

#[derive(Default)]
struct Used {
    workers: usize,
    memory: u64,
}

impl std::fmt::Debug for WorkerBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBudget")
            .field("usage", &self.usage())
            .finish()
    }
}

pub struct WorkerBudget {
    max_workers: usize,
    max_memory: u64,
    used: Mutex<Used>,
    freed: Notify,
    /// Every pool that may hold idle workers (dropped pools are pruned as they are seen).
    pools: Mutex<Vec<Weak<Pool>>>,
    evictions: AtomicU64,
    refusals: AtomicU64,
}

impl WorkerBudget {
    pub fn new(max_workers: usize, max_memory: u64) -> Arc<Self> {
        Arc::new(WorkerBudget {
            max_workers: max_workers.max(1),
            max_memory: max_memory.max(1),
            used: Mutex::new(Used::default()),
            freed: Notify::new(),
            pools: Mutex::new(Vec::new()),
            evictions: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        })
    }

    fn used(&self) -> parking_lot::MutexGuard<'_, Used> {
        self.used.lock()
    }

    /// A pool whose idle workers may be evicted to make room.
    pub fn register(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock();
        pools.retain(|w| w.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    fn try_reserve(&self, cost: u64) -> bool {
        let mut u = self.used();
        if u.workers < self.max_workers && u.memory + cost <= self.max_memory {
            u.workers += 1;
            u.memory += cost;
            true
        } else {
            false
        }
    }

    /// Gives back what a worker reserved (it exited, was killed, or did not start).
    pub fn release(&self, cost: u64) {
        {
            let mut u = self.used();
            u.workers = u.workers.saturating_sub(1);
            u.memory = u.memory.saturating_sub(cost);
        }
        self.freed.notify_waiters();
    }

    /// Room for one worker costing `cost` bytes: at once, after evicting idle workers of
    /// other functions (least recently used first), or once one frees up before `deadline`.
    pub async fn reserve(&self, cost: u64, deadline: Instant) -> Result<(), BudgetFull> {
        if cost > self.max_memory {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            return Err(self.full());
        }
        loop {
            if self.try_reserve(cost) {
                return Ok(());
            }
            if self.evict_lru() {
                continue;
            }
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_reserve(cost) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), freed)
                .await
                .is_err()
            {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                return Err(self.full());
            }
        }
    }

    fn full(&self) -> BudgetFull {
        let u = self.used();
        BudgetFull {
            workers: u.workers,
            max_workers: self.max_workers,
            memory: dispatch_core::quantity::human_bytes(u.memory),
            max_memory: dispatch_core::quantity::human_bytes(self.max_memory),
        }
    }

    /// Stops the idle worker unused the longest, of any pool; false when none is idle.
    fn evict_lru(&self) -> bool {
        let pools: Vec<Arc<Pool>> = {
            let mut pools = self.pools.lock();
            pools.retain(|w| w.strong_count() > 0);
            pools.iter().filter_map(Weak::upgrade).collect()
        };
        let oldest = pools
            .iter()
            .filter_map(|p| p.oldest_evictable().map(|t| (t, p)))
            .min_by_key(|(t, _)| *t);
        let Some((_, pool)) = oldest else {
            return false;
        };
        // Another caller may have taken it meanwhile: then the scan runs again.
        if pool.evict_oldest_idle() {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    pub fn usage(&self) -> BudgetUse {
        let idle = self
            .pools
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .map(|p| p.idle_count())
            .sum();
        let u = self.used();
        BudgetUse {
            workers: u.workers,
            idle,
            memory: u.memory,
            max_workers: self.max_workers,
            max_memory: self.max_memory,
            evictions: self.evictions.load(Ordering::Relaxed),
            refusals: self.refusals.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn reservations_wait_for_room_then_give_up() {
        let b = WorkerBudget::new(2, 300);
        let soon = Instant::now() + Duration::from_secs(1);
        b.reserve(100, soon).await.unwrap();
        b.reserve(100, soon).await.unwrap();
        // Count full: the third waits until one is released.
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                b.reserve(100, Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        b.release(100);
        waiter.await.unwrap().unwrap();
        // Memory full (300 of 300 with one more): refused at the deadline, counted.
        let e = b
            .reserve(200, Instant::now() + Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("2 of 2 workers"), "{e}");
        let u = b.usage();
        assert_eq!((u.workers, u.memory, u.refusals), (2, 200, 1));
        // More than the whole budget can never fit: refused at once.
        assert!(b.reserve(301, Instant::now()).await.is_err());
    }
}
