//! Polling until something holds, failing the test with what it waited for.

use std::time::{Duration, Instant};

/// Waits until `f` returns Some, or panics after `secs` saying what it waited for.
pub fn wait_for<T>(what: &str, secs: u64, f: impl FnMut() -> Option<T>) -> T {
    wait_for_every(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(100),
        f,
    )
}

/// Like [`wait_for`], polling every `every` (a check that is cheap and a change that is quick).
pub fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}
