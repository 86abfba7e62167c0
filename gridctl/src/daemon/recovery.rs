//! Start-up and `lab down`: a restarted daemon adopts the runs that survived it and makes
//! half-done work safe; `Shutdown` stops every application.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::supervise::{kill_group_now, terminate_group};
use super::{Daemon, Entry, Res};
use crate::model::{self, AppRecord, State};
use crate::template::{ComponentKind, ComponentTemplate, Template};
use crate::util;
use crate::vm;

impl Daemon {
    /// Loads every application at start-up and makes half-done work safe.
    pub(super) fn load(self: &Arc<Self>) -> anyhow::Result<()> {
        let apps = model::apps_dir(&self.state);
        let mut adopted = Vec::new();
        for ent in fs::read_dir(&apps)? {
            let ent = ent?;
            let name = ent.file_name().to_string_lossy().to_string();
            let path = ent.path();
            if name.starts_with('.') || !path.join("app.json").exists() {
                // A destroy or an import that did not finish.
                tracing::warn!("removing leftover {}", path.display());
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            let mut rec = match AppRecord::load(&path).and_then(|r| r.validate().map(|()| r)) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("skipping {}: {e}", path.display());
                    continue;
                }
            };
            // Records written before templates could mark secrets learn them from the template.
            if rec.secret.is_empty() {
                if let Ok(t) = Template::load(&self.state, &rec.template) {
                    rec.secret = t.secret;
                }
            }
            let procs = rec
                .components
                .iter()
                .any(|c| c.kind == ComponentKind::Process);
            let mut alive =
                (!procs || rec.pgid > 0) && rec.pids.iter().all(|p| util::pid_alive(*p));
            if vm::has_vm(&rec.components) && rec.state != State::Stopped {
                let vms_up = matches!(
                    vm::first_down(&self.state, &rec.name, &rec.components),
                    Ok(None)
                );
                alive &= vms_up && rec.state == State::Running;
                if !alive {
                    // Whatever is left of a run that cannot be adopted is ended, VMs included.
                    if let Err(e) = vm::halt_all(&self.state, &rec.name, &rec.components) {
                        tracing::error!(app = %rec.name, "cannot force its VMs off: {e}");
                    }
                }
            }
            match rec.state {
                State::Running if alive => adopted.push(rec.name.clone()),
                State::Stopped => {}
                State::Stopping => {
                    kill_group_now(rec.pgid);
                    rec.state = State::Stopped;
                    rec.pids.clear();
                    rec.pgid = 0;
                }
                State::Failed => kill_group_now(rec.pgid),
                State::Running | State::Starting => {
                    kill_group_now(rec.pgid);
                    rec.error = format!(
                        "its processes did not survive while the grid daemon was down (was {})",
                        rec.state
                    );
                    rec.state = State::Failed;
                }
            }
            self.persist(&rec);
            self.lock().apps.insert(
                rec.name.clone(),
                Entry {
                    rec,
                    leases: 0,
                    generation: 0,
                    restarts: 0,
                },
            );
        }
        for name in adopted {
            tracing::info!(app = %name, "adopted running application");
            if self.with_app(&name, |e| Ok(vm::has_vm(&e.rec.components))) == Ok(true) {
                tokio::spawn(self.clone().watch_vms(name.clone(), 0));
            }
            let d = self.clone();
            tokio::spawn(async move { d.poll_adopted(name).await });
        }
        Ok(())
    }

    /// `lab down`: every application's processes are ended and it is left `stopped`.
    pub(super) async fn shutdown_apps(self: &Arc<Self>) -> Res {
        let groups: Vec<(String, i32, Vec<ComponentTemplate>)> = {
            let mut inner = self.lock();
            inner
                .apps
                .values_mut()
                .filter(|e| e.rec.state != State::Stopped)
                .map(|e| {
                    e.generation += 1;
                    e.rec.state = State::Stopping;
                    self.persist(&e.rec);
                    (e.rec.name.clone(), e.rec.pgid, e.rec.components.clone())
                })
                .collect()
        };
        let mut set = JoinSet::new();
        for (name, pgid, comps) in &groups {
            set.spawn(terminate_group(*pgid, Duration::from_secs(3)));
            if vm::has_vm(comps) {
                let (state, app, comps) = (self.state.clone(), name.clone(), comps.clone());
                set.spawn(async move {
                    let r = tokio::task::spawn_blocking(move || vm::halt_all(&state, &app, &comps));
                    if let Ok(Err(e)) = r.await {
                        tracing::error!("cannot force VMs off: {e}");
                    }
                });
            }
        }
        while set.join_next().await.is_some() {}
        let mut inner = self.lock();
        for (name, _, _) in groups {
            if let Some(e) = inner.apps.get_mut(&name) {
                e.rec.state = State::Stopped;
                e.rec.pids.clear();
                e.rec.pgid = 0;
                self.persist(&e.rec);
            }
        }
        Ok("shut down\n".into())
    }
}
