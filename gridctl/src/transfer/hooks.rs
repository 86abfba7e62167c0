//! The data path's test hooks, planted by tests under `STATE/faults/`.

use std::fs;
use std::path::Path;
use std::time::Duration;

/// Flips one bit after `after` payload bytes: the test hook `STATE/faults/corrupt-export-after`.
pub(crate) struct Fault {
    pub(crate) after: Option<u64>,
    pub(crate) sent: u64,
}

impl Fault {
    /// Accounts for `data` being sent; returns a corrupted copy when the fault hits it.
    pub(super) fn apply(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let a = self.after?;
        let start = self.sent;
        self.sent += data.len() as u64;
        if a >= self.sent || data.is_empty() {
            return None;
        }
        self.after = None;
        let mut v = data.to_vec();
        let i = (a.saturating_sub(start) as usize).min(v.len() - 1);
        v[i] ^= 0x01;
        Some(v)
    }
}

/// Test hook `STATE/faults/hold-export`: an export waits before it sends anything while that file
/// exists, so that a test can find the source's side of a copy and act on it in flight, however
/// fast copies have become.
pub fn hold_while_asked(state: &Path) {
    let p = state.join("faults").join("hold-export");
    if p.exists() {
        tracing::warn!(
            "test hook: holding this export while {} exists",
            p.display()
        );
    }
    while p.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Test hook `STATE/faults/hold-start-answer`: an `app start` that succeeded holds its answer (the
/// command does not end) while that file exists, so that a test can lose that answer: the
/// application runs, but whoever asked cannot know it.
pub fn hold_start_answer(state: &Path) {
    let p = state.join("faults").join("hold-start-answer");
    while p.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads and consumes the fault hook, if a test planted it.
pub fn take_fault(state: &Path) -> Option<u64> {
    let p = state.join("faults").join("corrupt-export-after");
    let n = fs::read_to_string(&p).ok()?.trim().parse().ok()?;
    let _ = fs::remove_file(&p);
    tracing::warn!("test hook: corrupting this export after {n} bytes");
    Some(n)
}
