//! Test-only fault points: named places in the actors and the server where a test can hold an
//! operation still, or make one answer fail, deterministically instead of guessing with sleeps.
//!
//! They are off unless the property `fault_dir` names a directory; a point is active while a file
//! of its name exists there. Production configurations leave `fault_dir` empty, and nothing here
//! runs then but one `Option` check.

use std::path::PathBuf;
use std::time::Duration;

/// MigHelper waits here, after the target grid pulled the copy and before the checksums are
/// compared: a test changes the copy to see the verify catch it.
pub const HOLD_VERIFY: &str = "hold-verify";
/// MigHelper waits here before it stops the source (or until a cancel wins): the source MIG still
/// runs, so a test can cancel there and see the cancel forwarded to MigHelper.
pub const HOLD_STOP_SOURCE: &str = "hold-stop-source";
/// MigHelper waits here before each copy attempt: a test takes the target name meanwhile.
pub const HOLD_COPY: &str = "hold-copy";
/// MigHelper waits here after the pre-copy, before it stops the source: a test writes to the
/// running source, then lets the operation go on to see those writes arrive.
pub const HOLD_PRECOPIED: &str = "hold-precopied";
/// MigHelper waits here after the verify, before the cut-over: a test starts the source meanwhile,
/// as an operator could while a MigHelper was down between the two.
pub const HOLD_START_TARGET: &str = "hold-start-target";
/// The Target waits here before its clean-up steps: a test cuts a grid off after the cut-over
/// and before the clean-up reaches it.
pub const HOLD_CLEAN_UP: &str = "hold-clean-up";
/// The handoff route journals and hands an accepted handoff to its actor, then answers 503 as if
/// the 200 had been lost on the way.
pub const DROP_HANDOFF_REPLY: &str = "drop-handoff-reply";
/// The signed status route answers 503, as if the instance could not be reached.
pub const FAIL_STATUS: &str = "fail-status";

#[derive(Debug, Clone, Default)]
pub struct Faults {
    dir: Option<PathBuf>,
}

impl Faults {
    /// Fault points under `dir`; `None` (the default) turns them all off.
    pub fn new(dir: Option<PathBuf>) -> Faults {
        Faults { dir }
    }

    /// Whether the point `name` is active now.
    pub fn active(&self, name: &str) -> bool {
        self.dir.as_ref().is_some_and(|d| d.join(name).exists())
    }

    /// Waits while the point `name` is active.
    pub async fn hold(&self, name: &str) {
        if self.active(name) {
            tracing::warn!(point = name, "held at a test fault point");
            while self.active(name) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
