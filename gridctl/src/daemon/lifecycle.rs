//! An application's life as someone asks for it: provision, start (its processes spawned as one
//! group, its VMs defined and started, each component waited for), stop, destroy, configure,
//! checksum.

use std::fs::{self, OpenOptions};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::supervise::{kill_group_now, terminate_group, Pause};
use super::{err, Daemon, Entry, Res};
use crate::model::{self, AppRecord, State, Vars};
use crate::template::{ComponentKind, Template};
use crate::vm;
use crate::volume;

impl Daemon {
    pub(super) async fn provision(
        self: &Arc<Self>,
        template: &str,
        name: &str,
        props: &[dialect::Prop],
    ) -> Res {
        let t = Template::load(&self.state, template)?;
        let (rec, inits) = model::record_from_template(&self.state, template, &t, name, props)?;
        self.reserve(name)?;
        let dir = model::app_dir(&self.state, name);
        let state = self.state.clone();
        let rec2 = rec.clone();
        let created = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let dir = model::app_dir(&state, &rec2.name);
            fs::create_dir_all(dir.join("vols")).map_err(|e| format!("{}: {e}", dir.display()))?;
            for (v, init) in rec2.volumes.iter().zip(&inits) {
                volume::create(
                    &model::volume_path(&dir, &v.name),
                    v.kind,
                    v.size,
                    init.as_deref(),
                )
                .map_err(|e| format!("creating volume {} of {}: {e}", v.name, rec2.name))?;
            }
            rec2.save(&state)
                .map_err(|e| format!("saving {}: {e}", rec2.name))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        {
            let mut inner = self.lock();
            inner.reserved.remove(name);
            if let Err(e) = created {
                let _ = fs::remove_dir_all(&dir);
                return err(format!("cannot provision {name}: {e}"));
            }
            inner.apps.insert(
                name.to_string(),
                Entry {
                    rec,
                    leases: 0,
                    generation: 0,
                    restarts: 0,
                },
            );
        }
        match self.start(name).await {
            Ok(_) => Ok(format!(
                "provisioned {name} from {template}; it is running\n"
            )),
            Err(e) => err(format!("provisioned {name} from {template}, but {e}")),
        }
    }

    pub(super) async fn start(self: &Arc<Self>, name: &str) -> Res {
        let started = self.with_app(name, |e| {
            match e.rec.state {
                State::Running => return Ok(None),
                State::Stopped | State::Failed => {}
                s => return err(format!("cannot start {name}: it is {s}")),
            }
            if e.leases > 0 {
                return err(format!(
                    "cannot start {name}: it is being copied to another grid"
                ));
            }
            if e.rec.staged {
                return err(format!(
                    "cannot start {name}: it is a staged copy (the pre-copy of a migration, {}); \
                     only its final pull (`app migrate … --import --delta`) makes it an application",
                    e.rec.props.get(model::MIG_OP).map_or("no operation".to_string(), |op| format!("operation {op}"))
                ));
            }
            e.generation += 1;
            e.rec.state = State::Starting;
            e.rec.error.clear();
            self.persist(&e.rec);
            Ok(Some((e.rec.clone(), e.generation)))
        })?;
        let Some((rec, generation)) = started else {
            return Ok(format!("{name} is already running\n"));
        };
        // A launch error may quote a substituted command or address: no secret in it.
        match self
            .launch(&rec, generation)
            .await
            .map_err(|e| rec.redact(&e))
        {
            Ok(()) => Ok(format!("started {name}\n")),
            Err(reason) => {
                let (pgid, _) = self.fail(name, generation, &reason);
                terminate_group(pgid, Duration::from_secs(2)).await;
                self.halt_vms(name, generation).await;
                err(format!("{name} failed to start: {reason}"))
            }
        }
    }

    /// Spawns the components as one process group, watches them, and waits until each is ready.
    pub(super) async fn launch(
        self: &Arc<Self>,
        rec: &AppRecord,
        generation: u64,
    ) -> Result<(), String> {
        let vars = Vars {
            state: &self.state,
            app: &rec.name,
            props: &rec.props,
            grid: model::grid_vars(&self.state),
        };
        let dir = model::app_dir(&self.state, &rec.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .map_err(|e| format!("opening its log: {e}"))?;
        // Substitute everything first, so a bad template fails before anything runs.
        let mut plans = Vec::new();
        let mut ready = Vec::new();
        for c in &rec.components {
            let sub = |w: &String| {
                vars.subst(w)
                    .map_err(|e| format!("component {}: {e}", c.name))
            };
            let argv: Vec<String> = c.command.iter().map(sub).collect::<Result<_, _>>()?;
            let env: Vec<(String, String)> = c
                .env
                .iter()
                .map(|(k, v)| sub(v).map(|v| (k.clone(), v)))
                .collect::<Result<_, _>>()?;
            if let Some(r) = &c.ready {
                ready.push((
                    c.name.clone(),
                    sub(r)?,
                    Duration::from_secs(c.ready_timeout_secs),
                ));
            }
            // A VM is started below, through libvirt.
            if c.kind == ComponentKind::Process {
                plans.push((c.name.clone(), argv, env));
            }
        }
        let vms = vm::prepare(&self.state, rec)?;
        let mut pgid = 0;
        let mut pids = Vec::new();
        let mut children = JoinSet::new();
        for (cname, argv, env) in plans {
            let mut cmd = tokio::process::Command::new(&argv[0]);
            // Components get a clean environment, as on a real grid: nothing of whoever started
            // the daemon (a test runner's MIG_* variables, say) leaks into an application.
            cmd.args(&argv[1..])
                .env_clear()
                .env(
                    "PATH",
                    std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
                )
                .env("HOME", "/root")
                .envs(env)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log.try_clone().map_err(|e| e.to_string())?)
                .process_group(pgid);
            let mut child = match cmd.spawn() {
                Ok(ch) => ch,
                Err(e) => {
                    self.set_pids(&rec.name, generation, pids, pgid);
                    return Err(format!("component {cname} ({}): {e}", argv[0]));
                }
            };
            let pid = child.id().unwrap_or(0) as i32;
            if pgid == 0 {
                pgid = pid;
            }
            pids.push(pid);
            children.spawn(async move {
                let st = child.wait().await;
                (
                    cname,
                    st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                )
            });
        }
        self.set_pids(&rec.name, generation, pids, pgid);
        // A component that exits makes the application failed.
        let d = self.clone();
        let name = rec.name.clone();
        tokio::spawn(async move {
            if let Some(Ok((c, status))) = children.join_next().await {
                let (pgid, was_running) = d.fail(
                    &name,
                    generation,
                    &format!("component {c} exited ({status})"),
                );
                terminate_group(pgid, Duration::from_secs(2)).await;
                d.halt_vms(&name, generation).await;
                if was_running {
                    tokio::spawn(d.clone().restart_on_failure(name.clone(), generation, c));
                }
            }
            while children.join_next().await.is_some() {}
        });
        if let Some((settings, specs)) = vms {
            let (state, name) = (self.state.clone(), rec.name.clone());
            tokio::task::spawn_blocking(move || vm::start_all(&state, &name, &settings, &specs))
                .await
                .map_err(|e| e.to_string())??;
            tokio::spawn(self.clone().watch_vms(rec.name.clone(), generation));
        }
        for (c, addr, timeout) in ready {
            let deadline = Instant::now() + timeout;
            let mut pause = Pause::new(Duration::from_millis(100));
            loop {
                if let Some(reason) = self.failure_of(&rec.name, generation) {
                    return Err(reason);
                }
                let conn = tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(&addr),
                )
                .await;
                if matches!(conn, Ok(Ok(_))) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "component {c} did not accept connections on {addr} within {}s",
                        timeout.as_secs()
                    ));
                }
                pause.wait().await;
            }
        }
        let mut inner = self.lock();
        match inner.apps.get_mut(&rec.name) {
            Some(e) if e.generation == generation && e.rec.state == State::Starting => {
                e.rec.state = State::Running;
                self.persist(&e.rec);
                Ok(())
            }
            Some(e) if e.generation == generation => Err(e.rec.error.clone()),
            _ => Err("it was stopped or destroyed while starting".into()),
        }
    }

    /// Records the processes of this run; if the run was stopped meanwhile (a stop that could
    /// not know the group yet), the group is killed here so nothing is orphaned.
    pub(super) fn set_pids(&self, name: &str, generation: u64, pids: Vec<i32>, pgid: i32) {
        let mut inner = self.lock();
        match inner.apps.get_mut(name) {
            Some(e) if e.generation == generation => {
                e.rec.pids = pids;
                e.rec.pgid = pgid;
                self.persist(&e.rec);
            }
            _ => kill_group_now(pgid),
        }
    }

    /// The failure reason if this run of `name` has failed (or is gone).
    pub(super) fn failure_of(&self, name: &str, generation: u64) -> Option<String> {
        let inner = self.lock();
        match inner.apps.get(name) {
            Some(e) if e.generation == generation && e.rec.state == State::Failed => {
                Some(e.rec.error.clone())
            }
            Some(e) if e.generation == generation => None,
            _ => Some("it was stopped or destroyed while starting".into()),
        }
    }

    pub(super) async fn stop(self: &Arc<Self>, name: &str) -> Res {
        let r = self.with_app(name, |e| {
            match e.rec.state {
                State::Stopped => return Ok(None),
                State::Stopping => return err(format!("{name} is already stopping")),
                _ => {}
            }
            e.generation += 1;
            e.rec.state = State::Stopping;
            self.persist(&e.rec);
            let timeout = e
                .rec
                .components
                .iter()
                .map(|c| c.stop_timeout_secs)
                .max()
                .unwrap_or(10);
            Ok(Some((
                e.rec.pgid,
                Duration::from_secs(timeout),
                e.generation,
            )))
        })?;
        let Some((pgid, timeout, generation)) = r else {
            return Ok(format!("{name} is already stopped\n"));
        };
        let (_, vms) = tokio::join!(terminate_group(pgid, timeout), self.stop_vms(name));
        self.with_app(name, |e| {
            if e.generation == generation {
                // A VM that libvirt could not be shown to stop may still use its disks: the
                // application stays `failed` (no export) until a stop succeeds.
                if let Err(reason) = &vms {
                    e.rec.state = State::Failed;
                    e.rec.error = format!("stopping: {reason}");
                    self.persist(&e.rec);
                    return err(format!("cannot stop {name}: {reason}"));
                }
                e.rec.state = State::Stopped;
                e.rec.pids.clear();
                e.rec.pgid = 0;
                self.persist(&e.rec);
            }
            Ok(format!("{}stopped {name}\n", vms.as_deref().unwrap_or("")))
        })
    }

    /// Stops the VMs of `name` (see [`vm::stop_all`]); nothing for an application without one.
    pub(super) async fn stop_vms(&self, name: &str) -> Result<String, String> {
        let comps = self.with_app(name, |e| Ok(e.rec.components.clone()))?;
        if !vm::has_vm(&comps) {
            return Ok(String::new());
        }
        let (state, name) = (self.state.clone(), name.to_string());
        tokio::task::spawn_blocking(move || vm::stop_all(&state, &name, &comps))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Forces the VMs of run `generation` of `name` off: the run failed, so nothing of it may
    /// keep running (a later run's VMs are left alone).
    pub(super) async fn halt_vms(&self, name: &str, generation: u64) {
        let comps = self.with_app(name, |e| {
            Ok((e.generation == generation).then(|| e.rec.components.clone()))
        });
        let Ok(Some(comps)) = comps else { return };
        if !vm::has_vm(&comps) {
            return;
        }
        let (state, app) = (self.state.clone(), name.to_string());
        match tokio::task::spawn_blocking(move || vm::halt_all(&state, &app, &comps)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(app = name, "cannot force its VMs off: {e}"),
            Err(e) => tracing::error!(app = name, "cannot force its VMs off: {e}"),
        }
    }

    pub(super) async fn destroy(self: &Arc<Self>, name: &str) -> Res {
        let pgid = {
            let mut inner = self.lock();
            let Some(e) = inner.apps.get(name) else {
                return err(format!("no application named {name} on this grid"));
            };
            match e.rec.state {
                State::Stopped | State::Failed => {}
                s => return err(format!("cannot destroy {name}: it is {s}; stop it first")),
            }
            if e.leases > 0 {
                return err(format!(
                    "cannot destroy {name}: it is being copied to another grid"
                ));
            }
            let pgid = e.rec.pgid;
            let comps = e.rec.components.clone();
            // Renamed away first so that a crash mid-delete never leaves a half application.
            let dir = model::app_dir(&self.state, name);
            let trash = model::apps_dir(&self.state)
                .join(format!(".destroy-{name}-{}", std::process::id()));
            if let Err(e) = fs::rename(&dir, &trash) {
                return err(format!("cannot destroy {name}: {e}"));
            }
            inner.apps.remove(name);
            tokio::task::spawn_blocking(move || fs::remove_dir_all(trash));
            (pgid, comps)
        };
        let (pgid, comps) = pgid;
        terminate_group(pgid, Duration::from_secs(2)).await;
        if vm::has_vm(&comps) {
            let (state, app) = (self.state.clone(), name.to_string());
            let r = tokio::task::spawn_blocking(move || vm::undefine_all(&state, &app, &comps))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            if let Err(e) = r {
                return Ok(format!(
                    "destroyed {name}, but its VM definition stays: {e}\n"
                ));
            }
        }
        Ok(format!("destroyed {name}\n"))
    }

    pub(super) fn config(&self, name: &str, props: &[dialect::Prop]) -> Res {
        self.with_app(name, |e| {
            match e.rec.state {
                State::Stopped | State::Failed => {}
                s => return err(format!("cannot configure {name}: it is {s}; stop it first")),
            }
            let mut p = e.rec.props.clone();
            model::apply_props(name, &mut p, props)?;
            for r in &e.rec.required {
                if p.get(r).is_none_or(|v| v.is_empty()) {
                    return err(format!(
                        "cannot configure {name}: property {r} must not be empty"
                    ));
                }
            }
            e.rec.props = p;
            self.persist(&e.rec);
            Ok(format!("configured {name}\n"))
        })
    }

    pub(super) async fn checksum(&self, name: &str) -> Res {
        let rec = self.with_app(name, |e| Ok(e.rec.clone()))?;
        let dir = model::app_dir(&self.state, name);
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = String::new();
            for v in &rec.volumes {
                let line =
                    volume::checksum_line(&v.name, v.kind, &model::volume_path(&dir, &v.name))
                        .map_err(|e| format!("checksum of {name} volume {}: {e}", v.name))?;
                out.push_str(&line);
                out.push('\n');
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
