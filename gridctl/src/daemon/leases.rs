//! Holding applications for the data path: an export lease keeps an application stopped while
//! it is copied; an import is reserved, filled and committed (or removed with its connection);
//! a staged copy (pre-copy) is held for its final pull.

use std::fs;
use std::path::PathBuf;

use super::{err, Daemon, Entry, Inner, Res};
use crate::model::{self, AppRecord, State};

impl Daemon {
    pub(super) fn export_begin(
        &self,
        name: &str,
        live: bool,
    ) -> Result<(AppRecord, PathBuf), String> {
        self.with_app(name, |e| {
            if e.rec.staged {
                return err(format!(
                    "cannot copy {name}: it is a staged copy, not an application"
                ));
            }
            if !live && e.rec.state != State::Stopped {
                return err(format!(
                    "cannot copy {name}: it is {}; stop it first",
                    e.rec.state
                ));
            }
            e.leases += 1;
            Ok((e.rec.clone(), model::app_dir(&self.state, name)))
        })
    }

    pub(super) fn import_begin(&self, name: &str) -> Result<PathBuf, String> {
        self.reserve(name)?;
        let dir = model::app_dir(&self.state, name);
        if let Err(e) = fs::create_dir_all(dir.join("vols")) {
            self.lock().reserved.remove(name);
            return err(format!("creating {}: {e}", dir.display()));
        }
        Ok(dir)
    }

    pub(super) fn import_commit(&self, mut rec: AppRecord) -> Res {
        if let Err(e) = rec.validate() {
            let mut inner = self.lock();
            self.abort_import(&mut inner, &rec.name);
            return err(format!("refusing the imported record of {}: {e}", rec.name));
        }
        rec.state = State::Stopped;
        rec.pids.clear();
        rec.pgid = 0;
        rec.error.clear();
        let mut inner = self.lock();
        if let Err(e) = rec.save(&self.state) {
            self.abort_import(&mut inner, &rec.name);
            return err(format!("saving {}: {e}", rec.name));
        }
        inner.reserved.remove(&rec.name);
        let name = rec.name.clone();
        inner.apps.insert(
            name.clone(),
            Entry {
                rec,
                leases: 0,
                generation: 0,
                restarts: 0,
            },
        );
        Ok(format!("imported {name}\n"))
    }

    /// The staged copy `name`, held for its final pull (see [`Request::StageBegin`]).
    pub(super) fn stage_begin(&self, name: &str) -> Result<(AppRecord, PathBuf), String> {
        self.with_app(name, |e| {
            if !e.rec.staged {
                return err(format!(
                    "{name} is not a staged copy: a final pull (--delta) needs the pre-copy \
                     (--stage) first"
                ));
            }
            if e.leases > 0 {
                return err(format!("{name} is already being updated"));
            }
            e.leases += 1;
            Ok((e.rec.clone(), model::app_dir(&self.state, name)))
        })
    }

    pub(super) fn stage_commit(&self, mut rec: AppRecord) -> Res {
        rec.validate()
            .map_err(|e| format!("refusing the record of {}: {e}", rec.name))?;
        rec.staged = false;
        rec.state = State::Stopped;
        rec.pids.clear();
        rec.pgid = 0;
        rec.error.clear();
        let name = rec.name.clone();
        self.with_app(&name, |e| {
            if !e.rec.staged {
                return err(format!("{name} is not a staged copy"));
            }
            rec.save(&self.state)
                .map_err(|err| format!("saving {name}: {err}"))?;
            e.rec = rec;
            Ok(format!("imported {name}\n"))
        })
    }

    pub(super) fn abort_import(&self, inner: &mut Inner, name: &str) {
        if inner.reserved.remove(name) {
            let dir = model::app_dir(&self.state, name);
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::error!("removing the partial import {}: {e}", dir.display());
            }
        }
    }
}
