//! The data dir's free space: below a reserve (`--min-free-disk`, default 5 % of its file
//! system, at most 1 GiB) new work is refused with 507 `InsufficientStorage`, so that the
//! space left goes to finishing what was already accepted — an accepted run's later states
//! (RUNNING, SUCCEEDED) need room too, and losing them would lose the run (in the fault matrix
//! of `dispatch bench faults` a full disk once lost an accepted run and failed every write
//! after).
//!
//! The free space is read with `statvfs` on each admission (a microsecond); when it is
//! short, the store's own free pages (retention frees pages SQLite reuses before it gives
//! them back) count too. `dispatch runs purge` gives the space back to the file system
//! before it answers, a MiB at a time so that it needs little room itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// New work refused for want of disk space (507 at the edge). The message names no path:
/// gateway callers are anonymous.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server is short of disk space ({} free, {} kept in reserve for work already \
     accepted) and accepts no new {what}: retry later; an operator frees space \
     (dispatch runs purge, dispatch gc) or lowers --min-free-disk",
    dispatch_core::quantity::human_bytes(*available),
    dispatch_core::quantity::human_bytes(*reserve)
)]
pub struct DiskFull {
    pub what: String,
    pub available: u64,
    pub reserve: u64,
}

/// Default reserve: this share of the file system, at most [`MAX_DEFAULT_RESERVE`].
const DEFAULT_SHARE: u64 = 20;
const MAX_DEFAULT_RESERVE: u64 = 1 << 30;

pub struct DiskGuard {
    dir: PathBuf,
    reserve: Option<u64>,
    refusals: AtomicU64,
    warnings: crate::serve::LogThrottle,
}

#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub available: u64,
    pub total: u64,
    pub reserve: u64,
}

impl DiskGuard {
    /// Watches the file system of `dir`; `reserve` none = the default share.
    pub fn new(dir: impl Into<PathBuf>, reserve: Option<u64>) -> DiskGuard {
        DiskGuard {
            dir: dir.into(),
            reserve,
            refusals: AtomicU64::new(0),
            warnings: Default::default(),
        }
    }

    /// The space now; none when the file system cannot be read.
    pub fn space(&self) -> Option<Space> {
        let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        let frag = st.fragment_size() as u64;
        let total = st.blocks() as u64 * frag;
        Some(Space {
            available: st.blocks_available() as u64 * frag,
            total,
            reserve: self
                .reserve
                .unwrap_or((total / DEFAULT_SHARE).min(MAX_DEFAULT_RESERVE)),
        })
    }

    /// Whether `incoming` more bytes leave the reserve free; `reusable` (the store's own free
    /// space) is asked only when the disk alone is short.
    pub fn fits(&self, incoming: u64, reusable: impl FnOnce() -> u64) -> Result<(), Space> {
        let Some(s) = self.space() else {
            return Ok(());
        };
        let need = s.reserve.saturating_add(incoming);
        if s.available >= need || s.available.saturating_add(reusable()) >= need {
            Ok(())
        } else {
            Err(s)
        }
    }

    /// Counts a refusal for want of space and says why (the edge answers 507).
    pub fn refuse(&self, what: &str, s: Space) -> DiskFull {
        let refused = self.refusals.fetch_add(1, Ordering::Relaxed) + 1;
        self.warnings.run(|| {
            tracing::warn!(
                available = s.available,
                reserve = s.reserve,
                refused,
                "refused {what}: the data dir's disk is below its reserve (--min-free-disk)"
            )
        });
        DiskFull {
            what: what.to_string(),
            available: s.available,
            reserve: s.reserve,
        }
    }

    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_reserve_and_not_above() {
        let dir = tempfile::tempdir().unwrap();
        let open = DiskGuard::new(dir.path(), Some(0));
        assert!(open.fits(0, || 0).is_ok());
        let s = open.space().unwrap();
        assert!(s.total > 0 && s.available <= s.total);
        // More incoming than the disk has: refused, unless the store has that much free.
        assert!(open.fits(s.total + 1, || 0).is_err());
        assert!(open.fits(s.total + 1, || s.total + 1).is_ok());
        let full = DiskGuard::new(dir.path(), Some(u64::MAX));
        let short = full.fits(0, || 0).unwrap_err();
        let e = full.refuse("async runs", short);
        let message = e.to_string();
        assert!(message.contains("--min-free-disk"), "{message}");
        assert!(!message.contains(&dir.path().display().to_string()));
        assert_eq!(full.refusals(), 1);
        // The default reserve: 5 % of the file system, at most 1 GiB.
        let d = DiskGuard::new(dir.path(), None).space().unwrap();
        assert_eq!(d.reserve, (d.total / 20).min(1 << 30));
    }
}
