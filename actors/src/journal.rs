//! The journal: each instance's durable record of the operations it took part in.
//!
//! An actor writes the operation here before it acknowledges a handoff or starts a step, so a MIG or
//! MigHelper restarted mid-operation picks up where it was. One JSON file per operation, replaced
//! atomically (write, fsync, rename, fsync the directory): a crash leaves the old or the new copy,
//! never half of one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::op::{self, Op};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path}: not an operation record: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating if needed) the journal under `state_dir/ops`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let dir = state_dir.join("ops");
        fs::create_dir_all(&dir).map_err(|source| JournalError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Journal { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        debug_assert!(op::valid_id(id));
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `op` durably. The fsyncs run on the caller's thread (for a handoff, the actor's),
    /// on purpose: a receiver must not answer 200, nor an actor start a step, before the record
    /// it would resume from is on disk, and an operation commits a few dozen times in all, so the
    /// milliseconds this holds the arbiter are worth the order they guarantee.
    pub fn save(&self, op: &Op) -> Result<(), JournalError> {
        let path = self.path(&op.id);
        let tmp = self.dir.join(format!(".{}.tmp", op.id));
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(op).expect("an Op always serializes");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    pub fn load(&self, id: &str) -> Result<Option<Op>, JournalError> {
        if !op::valid_id(id) {
            return Ok(None);
        }
        let path = self.path(id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| JournalError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io { path, source }),
        }
    }

    /// Every operation in the journal. A corrupt record is reported, not skipped silently.
    pub fn load_all(&self) -> Result<Vec<Op>, JournalError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| JournalError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut ops = Vec::new();
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(op) = self.load(id)? {
                ops.push(op);
            }
        }
        ops.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ops)
    }

    /// Checks the journal can be written (for readiness): writes and removes a probe file.
    pub fn probe(&self) -> Result<(), JournalError> {
        let p = self.dir.join(".probe");
        let io = |source| JournalError::Io {
            path: p.clone(),
            source,
        };
        File::create(&p).and_then(|f| f.sync_all()).map_err(io)?;
        fs::remove_file(&p).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Kind, Plan, MIGRATING};

    fn op() -> Op {
        let plan: Plan = serde_json::from_value(serde_json::json!({
            "source_grid": "g1", "target_grid": "g2", "source_app": "shop", "target_app": "shop2",
            "source_controller": "127.0.1.1:2222", "target_controller": "127.0.2.1:2222",
            "source_mig_url": "http://a", "helper_url": "http://b", "final_mig_url": "http://c",
            "helper_app": "mighelper-x", "helper_config": [], "target_app_config": []
        }))
        .unwrap();
        Op::new(op::new_id(), Kind::Migrate, plan)
    }

    #[test]
    fn saves_replace_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut o = op();
        j.save(&o).unwrap();
        o.start_step(MIGRATING);
        j.save(&o).unwrap();
        assert_eq!(j.load(&o.id).unwrap().unwrap(), o);
        assert_eq!(j.load_all().unwrap(), vec![o.clone()]);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(j.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(format!("{}.json", o.id))]);
    }

    #[test]
    fn unknown_and_hostile_ids_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.load(&op::new_id()).unwrap().is_none());
        assert!(j.load("../../etc/passwd").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = op::new_id();
        fs::write(j.dir().join(format!("{id}.json")), b"{not json").unwrap();
        let e = j.load_all().unwrap_err().to_string();
        assert!(
            e.contains(&id) && e.contains("not an operation record"),
            "{e}"
        );
    }

    #[test]
    fn an_unwritable_journal_fails_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.probe().is_ok());
        fs::remove_dir_all(j.dir()).unwrap();
        fs::write(j.dir(), b"a file where the dir was").unwrap();
        assert!(j.probe().is_err());
    }
}
