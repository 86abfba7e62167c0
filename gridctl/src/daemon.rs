//! The grid's supervisor: owns the applications' processes and their state, and answers the
//! requests of [`crate::protocol`] on `STATE/daemon.sock`.
//!
//! Every state change is written to `app.json` before it is acted on, so a restarted daemon finds
//! each application where it was: running applications whose processes are all alive are adopted
//! (and watched by polling), anything caught half-way is made safe (`starting` → `failed`,
//! `stopping` → `stopped`, processes killed). SIGTERM ends the daemon alone, leaving the
//! applications running for the next daemon; only the `Shutdown` request (`lab down`) stops them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use dialect::Command;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::model::{self, AppRecord, State, Vars};
use crate::protocol::{socket_path, Reply, Request};
use crate::template::{ComponentKind, ComponentTemplate, Restart, Template, MAX_RESTARTS};
use crate::util;
use crate::vm;
use crate::volume;

struct Entry {
    rec: AppRecord,
    /// Export connections holding the application stopped.
    leases: u32,
    /// Bumped by every start and stop, so a watcher of an older run leaves the state alone.
    generation: u64,
    /// Automatic restarts since the last start someone asked for.
    restarts: u32,
}

#[derive(Default)]
struct Inner {
    apps: BTreeMap<String, Entry>,
    /// Names being provisioned or imported, not yet listed.
    reserved: BTreeSet<String>,
}

pub struct Daemon {
    state: PathBuf,
    inner: Mutex<Inner>,
    shutdown: Notify,
}

type Res = Result<String, String>;

/// Runs the daemon until a `Shutdown` request.
pub async fn run(state: PathBuf) -> anyhow::Result<()> {
    fs::create_dir_all(model::apps_dir(&state))
        .with_context(|| format!("creating {}", state.display()))?;
    fs::create_dir_all(state.join("templates"))?;
    let sock = socket_path(&state);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        anyhow::bail!("another gridctl daemon already serves {}", state.display());
    }
    let _ = fs::remove_file(&sock);
    let d = Arc::new(Daemon {
        state: state.clone(),
        inner: Mutex::new(Inner::default()),
        shutdown: Notify::new(),
    });
    d.load().context("loading the applications")?;
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    // Whoever can talk to the daemon runs the grid: root only.
    fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tracing::info!(state = %state.display(), "gridctl daemon listening");
    loop {
        tokio::select! {
            _ = d.shutdown.notified() => break,
            acc = listener.accept() => match acc {
                Ok((s, _)) => { tokio::spawn(serve_conn(d.clone(), s)); }
                Err(e) => tracing::warn!("accept: {e}"),
            }
        }
    }
    let _ = fs::remove_file(&sock);
    tracing::info!("gridctl daemon stopped");
    Ok(())
}

async fn serve_conn(d: Arc<Daemon>, s: UnixStream) {
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut leases: Vec<String> = Vec::new();
    let mut import: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let req = serde_json::from_str::<Request>(&line);
        let shutdown = matches!(req, Ok(Request::Shutdown));
        let reply = match req {
            Err(e) => Reply::fail(2, format!("bad request: {e}")),
            Ok(req) => d.handle(req, &mut leases, &mut import).await,
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            break;
        }
        if shutdown {
            d.shutdown.notify_one();
        }
    }
    // The connection is gone: leases end, an uncommitted import is removed.
    let mut inner = d.inner.lock().unwrap();
    for name in leases {
        if let Some(e) = inner.apps.get_mut(&name) {
            e.leases = e.leases.saturating_sub(1);
        }
    }
    if let Some(name) = import {
        d.abort_import(&mut inner, &name);
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

impl Daemon {
    async fn handle(
        self: &Arc<Self>,
        req: Request,
        leases: &mut Vec<String>,
        import: &mut Option<String>,
    ) -> Reply {
        let done = |r: Res| match r {
            Ok(out) => Reply::ok(out),
            Err(e) => Reply::fail(1, e),
        };
        match req {
            Request::Ping => Reply::ok("pong\n"),
            Request::Command { line } => match Command::parse(&line) {
                Err(e) => Reply::fail(2, format!("refused: {e}")),
                Ok(cmd) => self.command(cmd).await,
            },
            Request::ExportBegin { app, live } => match self.export_begin(&app, live) {
                Ok((record, app_dir)) => {
                    leases.push(app);
                    Reply::Export { record, app_dir }
                }
                Err(e) => Reply::fail(1, e),
            },
            Request::ImportBegin { name } => {
                if import.is_some() {
                    return Reply::fail(2, "one import per connection");
                }
                match self.import_begin(&name) {
                    Ok(app_dir) => {
                        *import = Some(name);
                        Reply::Import { app_dir }
                    }
                    Err(e) => Reply::fail(1, e),
                }
            }
            Request::ImportCommit { record } => match import.take() {
                Some(name) if name == record.name => done(self.import_commit(record)),
                other => {
                    *import = other;
                    Reply::fail(2, "commit without a matching import")
                }
            },
            Request::ImportAbort => {
                if let Some(name) = import.take() {
                    let mut inner = self.inner.lock().unwrap();
                    self.abort_import(&mut inner, &name);
                }
                Reply::ok("")
            }
            Request::StageBegin { name } => match self.stage_begin(&name) {
                Ok((record, app_dir)) => {
                    leases.push(name);
                    Reply::Export { record, app_dir }
                }
                Err(e) => Reply::fail(1, e),
            },
            Request::StageCommit { record } => {
                if !leases.contains(&record.name) {
                    return Reply::fail(2, "commit of a staged copy this connection does not hold");
                }
                done(self.stage_commit(record))
            }
            Request::Shutdown => done(self.shutdown_apps().await),
        }
    }

    async fn command(self: &Arc<Self>, cmd: Command) -> Reply {
        let r = match cmd {
            Command::List { batch } => Ok(self.list(batch)),
            Command::Info { name, batch } => self.with_app(name.as_str(), |e| {
                Ok(if batch {
                    e.rec.info_batch()
                } else {
                    e.rec.info_human()
                })
            }),
            Command::Provision {
                template,
                name,
                props,
            } => {
                self.provision(template.as_str(), name.as_str(), &props)
                    .await
            }
            Command::Start { name } => {
                let _ = self.with_app(name.as_str(), |e| {
                    e.restarts = 0;
                    Ok(())
                });
                self.start(name.as_str()).await
            }
            Command::Stop { name } => self.stop(name.as_str()).await,
            Command::Destroy { name } => self.destroy(name.as_str()).await,
            Command::Config { name, props } => self.config(name.as_str(), &props),
            Command::Checksum { name } => self.checksum(name.as_str()).await,
            Command::Grid { batch } => self.grid(batch),
            Command::Migrate { .. } | Command::MigrateCheck { .. } => {
                return Reply::fail(
                    2,
                    "refused: app migrate is run by gridctl ssh, not the daemon",
                )
            }
        };
        match r {
            Ok(out) => Reply::ok(out),
            Err(e) => Reply::fail(1, e),
        }
    }

    fn with_app<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Entry) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut inner = self.inner.lock().unwrap();
        match inner.apps.get_mut(name) {
            Some(e) => f(e),
            None => err(format!("no application named {name} on this grid")),
        }
    }

    fn persist(&self, rec: &AppRecord) {
        if let Err(e) = rec.save(&self.state) {
            tracing::error!(app = %rec.name, "cannot save app.json: {e}");
        }
    }

    fn list(&self, batch: bool) -> String {
        let inner = self.inner.lock().unwrap();
        let mut s = String::new();
        if !batch {
            s.push_str(&format!("{:<24} {:<9} {}\n", "NAME", "STATE", "TEMPLATE"));
        }
        for e in inner.apps.values() {
            if batch {
                s.push_str(&format!(
                    "{}\t{}\t{}\n",
                    e.rec.name, e.rec.state, e.rec.template
                ));
            } else {
                s.push_str(&format!(
                    "{:<24} {:<9} {}\n",
                    e.rec.name, e.rec.state, e.rec.template
                ));
            }
        }
        s
    }

    /// `app grid`: what a new application needs of this grid, for MIG's dry run: the room for
    /// volumes (free bytes of the state directory's file system), the templates, and the IP
    /// addresses the applications' properties hold.
    fn grid(&self, batch: bool) -> Res {
        let st = nix::sys::statvfs::statvfs(&self.state).map_err(|e| {
            format!(
                "cannot read the free space of {}: {e}",
                self.state.display()
            )
        })?;
        #[allow(clippy::unnecessary_cast)] // the field types differ by platform
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        let mut templates: Vec<String> = std::fs::read_dir(self.state.join("templates"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.strip_suffix(".toml").map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        templates.sort();
        let addresses: std::collections::BTreeSet<String> = {
            let inner = self.inner.lock().unwrap();
            inner
                .apps
                .values()
                .flat_map(|e| e.rec.props.values())
                .filter_map(|v| {
                    let host = v.rsplit_once(':').map_or(v.as_str(), |(h, _)| h);
                    host.parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| ip.to_string())
                })
                .collect()
        };
        let mut out = String::new();
        let sep = if batch { "\t" } else { ": " };
        out.push_str(&format!("free_bytes{sep}{free}\n"));
        for t in &templates {
            out.push_str(&format!("template{sep}{t}\n"));
        }
        for a in &addresses {
            out.push_str(&format!("address{sep}{a}\n"));
        }
        Ok(out)
    }

    fn reserve(&self, name: &str) -> Result<(), String> {
        let mut inner = self.inner.lock().unwrap();
        if inner.apps.contains_key(name) || inner.reserved.contains(name) {
            return err(format!(
                "an application named {name} already exists on this grid"
            ));
        }
        inner.reserved.insert(name.to_string());
        Ok(())
    }

    async fn provision(
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
            let mut inner = self.inner.lock().unwrap();
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

    async fn start(self: &Arc<Self>, name: &str) -> Res {
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

    /// Marks `name` failed if `generation` is still its current run; returns the group to kill
    /// and whether the run was `running` (not still starting, which its starter reports).
    fn fail(&self, name: &str, generation: u64, reason: &str) -> (i32, bool) {
        let mut inner = self.inner.lock().unwrap();
        match inner.apps.get_mut(name) {
            Some(e) if e.generation == generation => {
                let was_running = e.rec.state == State::Running;
                if matches!(e.rec.state, State::Starting | State::Running) {
                    tracing::warn!(app = name, "failed: {reason}");
                    e.rec.state = State::Failed;
                    e.rec.error = reason.to_string();
                    self.persist(&e.rec);
                }
                (e.rec.pgid, was_running)
            }
            _ => (0, false),
        }
    }

    /// After component `component` of a running `name` exited: starts the application again if
    /// the component asks for it, with a doubling delay, until a start holds or
    /// [`MAX_RESTARTS`] are spent. Gives up as soon as anyone else starts, stops or destroys it.
    // Boxed as a `Send` future: it starts the application, whose watcher may call it again,
    // and the compiler cannot infer `Send` through that cycle.
    fn restart_on_failure(
        self: Arc<Self>,
        name: String,
        mut generation: u64,
        component: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            loop {
                let delay = self.with_app(&name, |e| {
                    let policy = e.rec.components.iter().find(|c| c.name == component);
                    let Some(c) = policy.filter(|c| c.restart == Restart::OnFailure) else {
                        return Ok(None);
                    };
                    if e.generation != generation || e.rec.state != State::Failed {
                        return Ok(None);
                    }
                    if e.restarts >= MAX_RESTARTS {
                        e.rec.error = format!(
                            "{} (not restarted: {MAX_RESTARTS} restarts in a row failed)",
                            e.rec.error
                        );
                        self.persist(&e.rec);
                        return Ok(None);
                    }
                    e.restarts += 1;
                    let ms = c
                        .restart_delay_ms
                        .saturating_mul(1 << (e.restarts - 1))
                        .min(30_000);
                    Ok(Some(Duration::from_millis(ms)))
                });
                let Ok(Some(delay)) = delay else { return };
                tokio::time::sleep(delay).await;
                // Only if nobody touched it meanwhile: `start` bumps the generation it checks.
                let unchanged = self.with_app(&name, |e| {
                    Ok(e.generation == generation && e.rec.state == State::Failed)
                });
                if unchanged != Ok(true) {
                    return;
                }
                tracing::info!(app = %name, "restarting after a failure");
                match self.start(&name).await {
                    // Running again: its own watcher takes over from here.
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(app = %name, "restart failed: {e}");
                        match self.with_app(&name, |e| Ok(e.generation)) {
                            Ok(g) => generation = g,
                            Err(_) => return,
                        }
                    }
                }
            }
        })
    }

    /// Spawns the components as one process group, watches them, and waits until each is ready.
    async fn launch(self: &Arc<Self>, rec: &AppRecord, generation: u64) -> Result<(), String> {
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
        let mut inner = self.inner.lock().unwrap();
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
    fn set_pids(&self, name: &str, generation: u64, pids: Vec<i32>, pgid: i32) {
        let mut inner = self.inner.lock().unwrap();
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
    fn failure_of(&self, name: &str, generation: u64) -> Option<String> {
        let inner = self.inner.lock().unwrap();
        match inner.apps.get(name) {
            Some(e) if e.generation == generation && e.rec.state == State::Failed => {
                Some(e.rec.error.clone())
            }
            Some(e) if e.generation == generation => None,
            _ => Some("it was stopped or destroyed while starting".into()),
        }
    }

    async fn stop(self: &Arc<Self>, name: &str) -> Res {
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
    async fn stop_vms(&self, name: &str) -> Result<String, String> {
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
    async fn halt_vms(&self, name: &str, generation: u64) {
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

    /// A VM has no child process to wait for: polls libvirt while the run lasts, and fails the
    /// application when a VM is no longer running (the guest powered off or crashed).
    async fn watch_vms(self: Arc<Self>, name: String, generation: u64) {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let comps = self.with_app(&name, |e| {
                Ok((e.generation == generation
                    && matches!(e.rec.state, State::Starting | State::Running))
                .then(|| e.rec.components.clone()))
            });
            let Ok(Some(comps)) = comps else { return };
            let (state, app) = (self.state.clone(), name.clone());
            let down =
                tokio::task::spawn_blocking(move || vm::first_down(&state, &app, &comps)).await;
            let Ok(Ok(Some((c, st)))) = down else {
                continue;
            };
            let (pgid, was_running) = self.fail(&name, generation, &format!("vm {c} is {st}"));
            terminate_group(pgid, Duration::from_secs(2)).await;
            self.halt_vms(&name, generation).await;
            // A VM that died (its guest crashed, its qemu was killed) is restarted like a process.
            if was_running {
                self.restart_on_failure(name, generation, c).await;
            }
            return;
        }
    }

    async fn destroy(self: &Arc<Self>, name: &str) -> Res {
        let pgid = {
            let mut inner = self.inner.lock().unwrap();
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

    fn config(&self, name: &str, props: &[dialect::Prop]) -> Res {
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

    async fn checksum(&self, name: &str) -> Res {
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

    fn export_begin(&self, name: &str, live: bool) -> Result<(AppRecord, PathBuf), String> {
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

    fn import_begin(&self, name: &str) -> Result<PathBuf, String> {
        self.reserve(name)?;
        let dir = model::app_dir(&self.state, name);
        if let Err(e) = fs::create_dir_all(dir.join("vols")) {
            self.inner.lock().unwrap().reserved.remove(name);
            return err(format!("creating {}: {e}", dir.display()));
        }
        Ok(dir)
    }

    fn import_commit(&self, mut rec: AppRecord) -> Res {
        if let Err(e) = rec.validate() {
            let mut inner = self.inner.lock().unwrap();
            self.abort_import(&mut inner, &rec.name);
            return err(format!("refusing the imported record of {}: {e}", rec.name));
        }
        rec.state = State::Stopped;
        rec.pids.clear();
        rec.pgid = 0;
        rec.error.clear();
        let mut inner = self.inner.lock().unwrap();
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
    fn stage_begin(&self, name: &str) -> Result<(AppRecord, PathBuf), String> {
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

    fn stage_commit(&self, mut rec: AppRecord) -> Res {
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

    fn abort_import(&self, inner: &mut Inner, name: &str) {
        if inner.reserved.remove(name) {
            let dir = model::app_dir(&self.state, name);
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::error!("removing the partial import {}: {e}", dir.display());
            }
        }
    }

    /// `lab down`: every application's processes are ended and it is left `stopped`.
    async fn shutdown_apps(self: &Arc<Self>) -> Res {
        let groups: Vec<(String, i32, Vec<ComponentTemplate>)> = {
            let mut inner = self.inner.lock().unwrap();
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
        let mut inner = self.inner.lock().unwrap();
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

    /// Loads every application at start-up and makes half-done work safe.
    fn load(self: &Arc<Self>) -> anyhow::Result<()> {
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
            self.inner.lock().unwrap().apps.insert(
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

    /// Watches an application started by an earlier daemon: it is not our child, so poll.
    async fn poll_adopted(self: Arc<Self>, name: String) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (generation, dead) = {
                let inner = self.inner.lock().unwrap();
                match inner.apps.get(&name) {
                    // The pids are in the components' order (see `launch`).
                    Some(e) if e.generation == 0 && e.rec.state == State::Running => (
                        e.generation,
                        e.rec
                            .pids
                            .iter()
                            .zip(
                                e.rec
                                    .components
                                    .iter()
                                    .filter(|c| c.kind == ComponentKind::Process),
                            )
                            .find_map(|(p, c)| {
                                (!util::pid_alive(*p)).then(|| (*p, c.name.clone()))
                            }),
                    ),
                    _ => return,
                }
            };
            if let Some((pid, component)) = dead {
                let (pgid, was_running) = self.fail(
                    &name,
                    generation,
                    &format!("component {component} (process {pid}) exited"),
                );
                terminate_group(pgid, Duration::from_secs(2)).await;
                if was_running {
                    self.restart_on_failure(name, generation, component).await;
                }
                return;
            }
        }
    }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn group_exists(pgid: i32) -> bool {
    pgid > 0 && killpg(Pid::from_raw(pgid), None).is_ok()
}

fn kill_group_now(pgid: i32) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// SIGTERM to the group, SIGKILL after `timeout`, then waits (briefly) until it is gone.
pub async fn terminate_group(pgid: i32, timeout: Duration) {
    if !group_exists(pgid) {
        return;
    }
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    let mut pause = Pause::new(Duration::from_millis(50));
    while group_exists(pgid) && Instant::now() < deadline {
        pause.wait().await;
    }
    if group_exists(pgid) {
        tracing::warn!(pgid, "process group ignored SIGTERM; sending SIGKILL");
        kill_group_now(pgid);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pause = Pause::new(Duration::from_millis(20));
        while group_exists(pgid) && Instant::now() < deadline {
            pause.wait().await;
        }
    }
}

/// The waits of a poll: 1 ms, then twice as long each time up to `max`. A component that exits
/// or starts listening within milliseconds (most do) is seen within milliseconds, so `app stop`
/// and `app start` answer at once, while a slow one is still polled only every `max`.
struct Pause {
    next: Duration,
    max: Duration,
}

impl Pause {
    fn new(max: Duration) -> Pause {
        Pause {
            next: Duration::from_millis(1).min(max),
            max,
        }
    }

    /// How long the next wait lasts.
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.step()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_start_at_a_millisecond_and_back_off_to_their_cap() {
        let mut p = Pause::new(Duration::from_millis(50));
        let waits: Vec<u128> = (0..9).map(|_| p.step().as_millis()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 50, 50, 50]);
        let mut tiny = Pause::new(Duration::from_micros(500));
        assert_eq!(tiny.step(), Duration::from_micros(500));
    }
}
