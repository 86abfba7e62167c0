//! The audit log: who asked this MIG to change something, and what came of it.
//!
//! Every state-changing request and its outcome (an operation started or refused, cancelled, a
//! dry run, a handoff accepted or refused, a failed login) and every webhook delivery attempt is
//! appended to `state_dir/audit.log` as one JSON object per line: `time`, `client`, `user`,
//! `action`, `op_id`, `result`. The file is size-bounded: past [`MAX_BYTES`] it is rotated to
//! `audit.log.1` … `audit.log.N` ([`KEEP`]), the oldest dropped. `GET /api/v1/audit?since=`
//! reads it back.
//!
//! What goes in is chosen by the callers, never copied from a request: no password, no
//! `Authorization` header, no CSRF token, no handoff signature, no `webhook_secret`, and a webhook
//! is named by its scheme, host and port only (its path may be a token).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The file's name in `state_dir`.
pub const FILE_NAME: &str = "audit.log";
/// Size at which the log is rotated.
pub const MAX_BYTES: u64 = 1 << 20;
/// Rotated files kept besides the live one.
pub const KEEP: usize = 4;
/// The most entries one `GET /api/v1/audit` returns (the newest that match).
pub const MAX_READ: usize = 5000;
/// The longest `result` text kept.
const MAX_RESULT: usize = 1000;

/// The actions, as they appear in `action`.
pub mod action {
    /// `POST /api/v1/ops`: an operation started, or refused.
    pub const START: &str = "start";
    /// `POST /api/v1/ops/{id}/cancel` (recorded by the cancel route).
    pub const CANCEL: &str = "cancel";
    /// `POST /api/v1/ops` with `"dry_run": true` (recorded by the dry-run path).
    pub const DRY_RUN: &str = "dry_run";
    /// `POST /api/v1/handoff`: accepted or refused.
    pub const HANDOFF: &str = "handoff";
    /// A request with wrong GUI credentials.
    pub const LOGIN: &str = "login";
    /// One webhook delivery attempt.
    pub const WEBHOOK: &str = "webhook";
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339, UTC, with milliseconds.
    pub time: String,
    /// The client's address; `None` for what MIG does by itself (a webhook).
    pub client: Option<String>,
    /// The GUI user the request authenticated as (or tried to); `None` without credentials.
    pub user: Option<String>,
    pub action: String,
    pub op_id: Option<String>,
    /// What came of it, in words: `accepted …`, `refused (409): …`, `delivered …`.
    pub result: String,
}

/// The audit log of one instance. Appends are serialized; a failure to write is logged, never
/// passed to the request that caused it (the audit must not break the thing it watches).
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    lock: Mutex<()>,
}

impl Audit {
    /// The log at `state_dir/audit.log`.
    pub fn open(state_dir: &Path) -> Audit {
        Audit::with_limits(state_dir, MAX_BYTES, KEEP)
    }

    /// The same with other bounds (tests).
    pub fn with_limits(state_dir: &Path, max_bytes: u64, keep: usize) -> Audit {
        Audit {
            path: state_dir.join(FILE_NAME),
            max_bytes,
            keep,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry, stamped now. The hook other routes (cancel, dry run) call.
    pub fn record(
        &self,
        client: Option<IpAddr>,
        user: Option<&str>,
        action: &str,
        op_id: Option<&str>,
        result: &str,
    ) {
        let mut result = result.to_string();
        if result.len() > MAX_RESULT {
            let mut end = MAX_RESULT;
            while !result.is_char_boundary(end) {
                end -= 1;
            }
            result.truncate(end);
            result.push('…');
        }
        self.append(&Entry {
            time: actors::op::now(),
            client: client.map(|c| c.to_canonical().to_string()),
            user: user.map(str::to_string),
            action: action.to_string(),
            op_id: op_id.map(str::to_string),
            result,
        });
    }

    fn append(&self, e: &Entry) {
        let mut line = serde_json::to_string(e).expect("an audit entry serializes");
        line.push('\n');
        let _one = self.lock.lock().expect("audit lock");
        let r = self.rotate_for(line.len() as u64).and_then(|()| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?
                .write_all(line.as_bytes())
        });
        if let Err(err) = r {
            tracing::error!(path = %self.path.display(), error = %err, action = %e.action, "cannot write the audit log");
        }
    }

    /// Rotates when `adding` more bytes would take the live file past the bound.
    fn rotate_for(&self, adding: u64) -> std::io::Result<()> {
        let size = fs::metadata(&self.path).map_or(0, |m| m.len());
        if size == 0 || size + adding <= self.max_bytes {
            return Ok(());
        }
        if self.keep == 0 {
            return fs::remove_file(&self.path);
        }
        let _ = fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        fs::rename(&self.path, self.rotated(1))
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    /// The entries at or after `since` (all when `None`), oldest first, at most the newest
    /// [`MAX_READ`]. Rotated files are read too; a line that is not an entry is skipped.
    pub fn read(&self, since: Option<SystemTime>) -> Vec<Entry> {
        let since = since.map(|t| humantime::format_rfc3339_millis(t).to_string());
        let _one = self.lock.lock().expect("audit lock");
        let mut files: Vec<PathBuf> = (1..=self.keep).rev().map(|n| self.rotated(n)).collect();
        files.push(self.path.clone());
        let mut out = Vec::new();
        for f in files {
            let Ok(file) = File::open(&f) else { continue };
            for line in BufReader::new(file).lines().map_while(Result::ok) {
                let Ok(e) = serde_json::from_str::<Entry>(&line) else {
                    continue;
                };
                // RFC 3339 UTC with milliseconds sorts as text.
                if since.as_ref().is_none_or(|s| e.time >= *s) {
                    out.push(e);
                }
            }
        }
        let extra = out.len().saturating_sub(MAX_READ);
        out.drain(..extra);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, 9]))
    }

    #[test]
    fn entries_are_json_lines_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path());
        a.record(ip(), Some("ops"), action::START, Some("ab"), "accepted");
        // Times are kept to the millisecond: two entries in one would both be `since` the second.
        std::thread::sleep(std::time::Duration::from_millis(5));
        a.record(None, None, action::WEBHOOK, None, "delivered");
        let text = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 2);
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["client"], "127.0.0.9");
        assert_eq!(first["user"], "ops");
        assert_eq!(first["action"], "start");
        assert_eq!(first["op_id"], "ab");
        assert!(first["time"].as_str().unwrap().ends_with('Z'));
        let all = a.read(None);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].action, "webhook");
        // `since` is inclusive and later than every entry leaves none.
        let t = humantime::parse_rfc3339(&all[1].time).unwrap();
        assert_eq!(a.read(Some(t)).len(), 1);
        assert!(a
            .read(Some(SystemTime::now() + std::time::Duration::from_secs(60)))
            .is_empty());
    }

    #[test]
    fn the_log_rotates_at_its_bound_and_keeps_only_so_many_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::with_limits(dir.path(), 1000, 2);
        for i in 0..100 {
            a.record(ip(), None, action::LOGIN, None, &format!("refused #{i}"));
        }
        let live = dir.path().join(FILE_NAME);
        assert!(fs::metadata(&live).unwrap().len() <= 1000);
        assert!(dir.path().join("audit.log.1").exists());
        assert!(dir.path().join("audit.log.2").exists());
        assert!(!dir.path().join("audit.log.3").exists(), "only 2 kept");
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(total <= 3000, "{total} bytes on disk");
        // What is read back is the newest, in order, across the files.
        let got = a.read(None);
        assert_eq!(got.last().unwrap().result, "refused #99");
        let nums: Vec<u32> = got
            .iter()
            .map(|e| e.result.trim_start_matches("refused #").parse().unwrap())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
    }

    #[test]
    fn a_long_result_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path());
        a.record(None, None, action::HANDOFF, None, &"é".repeat(2000));
        assert!(a.read(None)[0].result.len() <= MAX_RESULT + 3);
    }
}
