//! A bound on how long a collective may wait: a rank that died or hangs must not leave the
//! others waiting forever.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit status of a rank whose collective timed out.
pub const TIMED_OUT: i32 = 124;

/// Watches the collective in progress from a thread of its own, and ends the process with a
/// message when it has waited longer than the timeout.
pub struct Watchdog {
    pending: Arc<Mutex<Option<(&'static str, Instant)>>>,
}

/// Marks a collective in progress; dropping it marks the collective done.
pub struct Waiting<'a>(&'a Watchdog);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        *self.0.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Watchdog {
    /// Starts watching the collectives of rank `rank`.
    pub fn start(rank: usize, timeout: Duration) -> Watchdog {
        let pending: Arc<Mutex<Option<(&'static str, Instant)>>> = Arc::default();
        let watched = Arc::clone(&pending);
        let tick = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_secs(1));
        std::thread::spawn(move || loop {
            std::thread::sleep(tick);
            let late = watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .filter(|(_, since)| since.elapsed() > timeout);
            if let Some((op, since)) = late {
                eprintln!(
                    "error: rank {rank} waited {:.0} s in `{op}` for the other ranks (timeout {} s): a rank died or hangs. Nothing was written by this step; continue from the last complete checkpoint with `frugal train --resume DIR`, or raise --collective-timeout if a rank is just slow.",
                    since.elapsed().as_secs_f64(),
                    timeout.as_secs_f64()
                );
                // SAFETY: `_exit` ends the process at once; no other thread runs code of ours
                // afterwards, and nothing is half-written because writes are atomic renames.
                unsafe { libc::_exit(TIMED_OUT) }
            }
        });
        Watchdog { pending }
    }

    /// Marks the collective `op` in progress until the returned guard is dropped.
    pub fn waiting(&self, op: &'static str) -> Waiting<'_> {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((op, Instant::now()));
        Waiting(self)
    }
}
