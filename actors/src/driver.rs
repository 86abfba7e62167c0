//! What the three operation actors share to run their steps: the op book, a way to reach grid
//! controllers, an HTTP client, and the step bookkeeping (journal before a step starts, again when
//! it ends), so each actor's file reads as its steps in order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dialect::AppState;

use crate::auth::OpKey;
use crate::book::OpBook;
use crate::controller::{
    AppInfo, AppSummary, GridController, GridError, GridFuture, MigrateOptions, ProgressFn,
    VolumeChecksum,
};
use crate::faults::Faults;
use crate::handoff::{self, SendError, StatusAnswer};
use crate::op::{Op, Role, StepId};
use crate::ssh::SshGrid;
use tracing::Instrument;

/// Why a step (or one command of it) failed, and whether trying again can help. Grid errors keep
/// their kind this far, so a refused key or a changed host key fails the step at once with its own
/// message instead of being retried for a minute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepError {
    pub message: String,
    /// True when the same command will fail the same way however often it runs.
    pub permanent: bool,
}

impl StepError {
    pub fn permanent(message: impl Into<String>) -> StepError {
        StepError {
            message: message.into(),
            permanent: true,
        }
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(self, what: impl std::fmt::Display) -> StepError {
        StepError {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for StepError {
    fn from(message: String) -> StepError {
        StepError {
            message,
            permanent: false,
        }
    }
}

impl From<GridError> for StepError {
    fn from(e: GridError) -> StepError {
        let permanent = matches!(
            e,
            GridError::UnknownHostKey { .. }
                | GridError::HostKeyChanged { .. }
                | GridError::KnownHosts { .. }
                | GridError::Auth { .. }
                | GridError::Key { .. }
                | GridError::Invalid(_)
        ) || e.is_refused();
        StepError {
            message: crate::op::bounded(&e.to_string()),
            permanent,
        }
    }
}

/// The property that marks an application as made by one operation (its id): MIG destroys only
/// what carries its own operation's mark.
pub const MARK: &str = "mig_op";

/// How long a sender keeps asking a receiver that may have taken its handoff before it holds the
/// operation for an operator.
pub const PROBE_PATIENCE: Duration = Duration::from_secs(600);

/// What a signed status answer says of a handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The receiver owns the operation as handed to it (this handoff or a later one).
    Taken,
    /// The receiver answered, signed, and does not own it.
    NotTaken(String),
    /// No answer that can be trusted.
    Unknown(String),
}

/// Why a handoff did not go through.
#[derive(Debug, Clone)]
pub struct HandOffError {
    pub message: String,
    /// True when the receiver said, in a signed answer, that it does not own the operation:
    /// the sender may undo. False: it may own it, and nothing it drives may be undone.
    pub not_taken: bool,
}

impl std::fmt::Display for HandOffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Reaches a grid controller by its address from grid.info (`[user@]host[:port]`).
pub trait Connect: Send + Sync {
    fn connect(&self, controller: &str) -> Result<Arc<dyn GridController>, String>;
}

/// The real one: SSH with the application's key, host keys pinned in known_hosts. It keeps one
/// [`SshGrid`] per controller, so every step of every actor here reuses that grid's session
/// instead of logging in again for each command.
#[derive(Default)]
pub struct SshConnect {
    pub key_file: PathBuf,
    pub known_hosts: PathBuf,
    /// The controllers reached so far, by their grid.info address.
    pub grids: Mutex<HashMap<String, SshGrid>>,
}

impl Connect for SshConnect {
    fn connect(&self, controller: &str) -> Result<Arc<dyn GridController>, String> {
        let mut grids = self.grids.lock().expect("grids lock");
        if let Some(g) = grids.get(controller) {
            return Ok(Arc::new(g.clone()));
        }
        let c: dialect::Controller = controller.parse().map_err(|e| format!("{e}"))?;
        let g = SshGrid::new(c, &self.key_file, &self.known_hosts);
        grids.insert(controller.to_string(), g.clone());
        Ok(Arc::new(g))
    }
}

#[derive(Clone)]
pub struct Driver {
    pub book: OpBook,
    pub connect: Arc<dyn Connect>,
    pub http: reqwest::Client,
    /// Test-only fault points (off unless `fault_dir` is set).
    pub faults: Faults,
    /// Grid commands run since the last commit, for the operation's timeline.
    commands: Arc<Mutex<Vec<CommandEvent>>>,
}

/// One grid command, as the timeline records it: the verb and the application, never the
/// property values (MigHelper's `env` holds secrets).
#[derive(Debug, Clone)]
struct CommandEvent {
    /// When it started, RFC 3339.
    at: String,
    what: String,
    millis: u64,
    error: Option<String>,
}

/// Back-off (seconds) between retries of a clean-up or roll-back command.
pub const BACKOFF: [u64; 6] = [1, 2, 4, 8, 15, 30];

impl Driver {
    pub fn new(book: OpBook, connect: Arc<dyn Connect>) -> Driver {
        Driver {
            book,
            connect,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client with default TLS-less settings builds"),
            faults: Faults::default(),
            commands: Arc::default(),
        }
    }

    /// The same driver with fault points under `faults`.
    pub fn with_faults(mut self, faults: Faults) -> Driver {
        self.faults = faults;
        self
    }

    /// The controller at `controller`, every command through it timed into the trace.
    pub fn grid(&self, controller: &str) -> Result<Arc<dyn GridController>, String> {
        let inner = self.connect.connect(controller)?;
        Ok(Arc::new(Traced {
            inner,
            log: self.commands.clone(),
        }))
    }

    /// Logs in to each of `controllers` in the background, so that a later step's first command
    /// there does not wait for the login (one SSH connection costs ~0.1 s, several times that
    /// under load). A failure only logs: the first command meets it again and says why.
    pub fn warm_up<'a>(&self, controllers: impl IntoIterator<Item = &'a str>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for c in controllers {
            let Ok(grid) = self.connect.connect(c) else {
                continue;
            };
            let span = tracing::debug_span!("warm_up", controller = c);
            // Called here, not in the task: a command sent right after this waits for its login.
            let warming = grid.warm_up();
            rt.spawn(
                async move {
                    if let Err(e) = warming.await {
                        tracing::debug!(error = %e, "could not log in ahead");
                    }
                }
                .instrument(span),
            );
        }
    }

    /// Journals `op` (with the grid commands run since the last commit added to its timeline); a
    /// journal that cannot be written stops the operation where it is, since going on would leave
    /// no record to resume from.
    pub fn commit(&self, op: &mut Op) -> Result<(), String> {
        let commands: Vec<CommandEvent> =
            std::mem::take(&mut *self.commands.lock().expect("trace lock"));
        for c in commands {
            op.trace_at(c.at, "command", c.what, Some(c.millis), c.error);
        }
        self.book.commit(op).map_err(|e| e.to_string())
    }

    /// Marks `step` running (journalled), runs `work`, then marks it done or failed (journalled).
    pub async fn step<T>(
        &self,
        op: &mut Op,
        step: StepId,
        work: impl std::future::Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        op.start_step(step);
        self.commit(op)?;
        tracing::info!(%step, "step started");
        let started = std::time::Instant::now();
        let r = work.await;
        match &r {
            Ok(_) => {
                op.finish_step(step, None);
                tracing::info!(%step, secs = started.elapsed().as_secs_f64(), "step done");
            }
            Err(e) => {
                op.fail_step(step, &e.message);
                tracing::warn!(%step, error = %e, permanent = e.permanent, "step failed");
            }
        }
        self.commit(op)?;
        r
    }

    /// Asks the instance at `base_url` (whose application should be `app`) whether it owns `op` as
    /// handed to it: same owner, this sequence number or a later one. The answer counts only when
    /// it is signed with `key` over the nonce sent, by that application.
    pub async fn probe(&self, base_url: &str, key: &OpKey, app: &str, op: &Op) -> Probe {
        let nonce = handoff::nonce();
        let url = format!("{base_url}{}", crate::api::status(&op.id));
        let answer = async {
            let r = self
                .http
                .get(&url)
                .query(&[("nonce", &nonce)])
                .header("traceparent", op.traceparent())
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            if !r.status().is_success() {
                return Err(format!("{url} answered {}", r.status()));
            }
            let sig = r
                .headers()
                .get(crate::auth::H_SIGNATURE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| format!("{url} sent an unsigned status"))?;
            let body = r.bytes().await.map_err(|e| format!("{url}: {e}"))?;
            if !key.verify_status(&body, &sig) {
                return Err(format!("{url} sent a status not signed for this operation"));
            }
            serde_json::from_slice::<StatusAnswer>(&body).map_err(|e| format!("{url}: {e}"))
        }
        .await;
        let a = match answer {
            Ok(a) => a,
            Err(e) => return Probe::Unknown(e),
        };
        if a.nonce != nonce || a.op_id != op.id || a.app != app || a.role != op.owner {
            return Probe::Unknown(format!(
                "{url} answered for {} {} (operation {}), not for {app}",
                a.role.actor(),
                a.app,
                a.op_id
            ));
        }
        if a.known && a.owner == Some(op.owner) && a.seq >= op.seq {
            Probe::Taken
        } else if a.known {
            Probe::NotTaken(format!(
                "{app} knows the operation but does not own it as handed (owner {:?}, handoff {} of {})",
                a.owner, a.seq, op.seq
            ))
        } else {
            Probe::NotTaken(format!("{app} does not know the operation"))
        }
    }

    /// Hands `op` to `owner` at `base_url`: each attempt takes a fresh sequence number, journalled
    /// before it is sent, so no two messages ever share one. When a handoff looks refused or
    /// goes unanswered, a signed status decides: taken (the answer was lost), not taken (send
    /// again, or give up if the receiver refused it), or unknown (keep asking, up to
    /// [`PROBE_PATIENCE`]). Returns the operation as handed over.
    pub async fn hand_off(
        &self,
        base_url: &str,
        key: &OpKey,
        op: &mut Op,
        owner: Role,
    ) -> Result<Op, HandOffError> {
        let deadline = tokio::time::Instant::now() + PROBE_PATIENCE;
        let mut waits = std::iter::once(0)
            .chain(BACKOFF)
            .chain(std::iter::repeat(30));
        loop {
            op.seq += 1;
            self.commit(op).map_err(|e| HandOffError {
                message: e,
                not_taken: true,
            })?;
            let mut next = op.clone();
            next.owner = owner;
            let app = handoff::audience(&next).app;
            let refused = match handoff::send(&self.http, base_url, key, &mut next).await {
                Ok(()) => return Ok(next),
                Err(e) => e,
            };
            tracing::warn!(to = base_url, error = %refused, "the handoff did not go through; asking who owns the operation");
            // Ask until the answer can be trusted.
            let verdict = loop {
                match self.probe(base_url, key, &app, &next).await {
                    Probe::Unknown(e) if tokio::time::Instant::now() < deadline => {
                        let wait = waits.next().unwrap_or(30);
                        tracing::warn!(error = %e, "no trustworthy status yet; asking again in {wait} s");
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    other => break other,
                }
            };
            match verdict {
                Probe::Taken => {
                    tracing::info!(to = base_url, error = %refused, "the handoff looked refused, but the receiver owns the operation");
                    return Ok(next);
                }
                Probe::NotTaken(why) => {
                    if let SendError::Refused(_) = refused {
                        return Err(HandOffError {
                            message: format!("{refused} ({why})"),
                            not_taken: true,
                        });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(HandOffError {
                            message: format!("{refused} ({why})"),
                            not_taken: true,
                        });
                    }
                    tracing::info!(%why, "the receiver does not own the operation; sending it again");
                }
                Probe::Unknown(e) => {
                    return Err(HandOffError {
                        message: format!(
                            "{refused}; whether it was taken is unknown after {} s: {e}",
                            PROBE_PATIENCE.as_secs()
                        ),
                        not_taken: false,
                    })
                }
            }
        }
    }

    /// Runs `f` until it succeeds, backing off between tries; returns the last error. A permanent
    /// error ends the tries at once.
    pub async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, StepError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>>,
    {
        let mut last = StepError::from(String::new());
        for (i, wait) in std::iter::once(0).chain(BACKOFF).enumerate() {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.permanent => {
                    tracing::warn!(attempt = i + 1, error = %e, "{what} failed, and trying again cannot help");
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(attempt = i + 1, error = %e, "{what} failed; retrying");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// The state of `name` on `grid`, `None` when the grid has no such application.
pub async fn app_state(
    grid: &dyn GridController,
    name: &str,
) -> Result<Option<AppState>, StepError> {
    let apps = grid.list().await?;
    Ok(apps.into_iter().find(|a| a.name == name).map(|a| a.state))
}

/// Stops `name` unless it is already stopped (or absent). Idempotent.
pub async fn ensure_stopped(grid: &dyn GridController, name: &str) -> Result<(), StepError> {
    match app_state(grid, name).await? {
        None | Some(AppState::Stopped) => Ok(()),
        Some(_) => Ok(grid.stop(name).await?),
    }
}

/// Starts `name` unless it is already running. Idempotent.
pub async fn ensure_running(grid: &dyn GridController, name: &str) -> Result<(), StepError> {
    match app_state(grid, name).await? {
        Some(AppState::Running) => Ok(()),
        None => Err(StepError::permanent(format!(
            "application {name} does not exist on {}",
            grid.controller()
        ))),
        Some(AppState::Failed) | Some(AppState::Starting) | Some(AppState::Stopping) => {
            // A failed or half-way application is stopped first so `start` begins clean.
            let _ = grid.stop(name).await;
            Ok(grid.start(name).await?)
        }
        Some(AppState::Stopped) => Ok(grid.start(name).await?),
    }
}

/// Stops (if needed) and destroys `name` unless it is already gone. Idempotent.
pub async fn ensure_destroyed(grid: &dyn GridController, name: &str) -> Result<(), StepError> {
    match app_state(grid, name).await? {
        None => Ok(()),
        Some(state) => destroy(grid, name, state).await,
    }
}

async fn destroy(grid: &dyn GridController, name: &str, state: AppState) -> Result<(), StepError> {
    if !matches!(state, AppState::Stopped | AppState::Failed) {
        grid.stop(name).await?;
    }
    Ok(grid.destroy(name).await?)
}

/// Destroys `name` if it carries operation `op_id`'s [`MARK`]. One that does not is another's
/// (given the name after the operation started) and is left untouched: `Ok(Some(why))` says so.
/// Absent is done (`Ok(None)`).
pub async fn destroy_if_ours(
    grid: &dyn GridController,
    name: &str,
    op_id: &str,
) -> Result<Option<String>, StepError> {
    let Some(state) = app_state(grid, name).await? else {
        return Ok(None);
    };
    let info = grid.info(name).await?;
    let mark = info.props.iter().find(|(k, _)| k == MARK).map(|(_, v)| v);
    if mark.map(String::as_str) != Some(op_id) {
        return Ok(Some(format!(
            "grid controller {} has an application {name} that this operation did not create \
             ({MARK} {}), so it was left untouched",
            grid.controller(),
            mark.map_or("not set".to_string(), |m| format!("is {m:?}"))
        )));
    }
    destroy(grid, name, state).await?;
    Ok(None)
}

/// The leftover that a MigHelper not destroyed is: where it is, and the command that clears it.
pub fn helper_leftover(plan: &crate::op::Plan) -> String {
    format!(
        "MigHelper {} on grid {}: {}",
        plan.helper_app,
        plan.target_grid,
        manual_command(&plan.target_controller, "destroy", &plan.helper_app)
    )
}

/// The exact command an operator runs to do `verb NAME` by hand on a controller.
pub fn manual_command(controller: &str, verb: &str, name: &str) -> String {
    match controller.parse::<dialect::Controller>() {
        Ok(c) => format!(
            "ssh -p {} {}@{} app {verb} {name}",
            c.port_or_default(),
            c.user_or_default(),
            c.host
        ),
        Err(_) => format!("ssh {controller} app {verb} {name}"),
    }
}

/// A [`GridController`] that times every command into the operation's trace and the log (inside
/// the caller's span, so with the operation id).
struct Traced {
    inner: Arc<dyn GridController>,
    log: Arc<Mutex<Vec<CommandEvent>>>,
}

impl Traced {
    fn run<'a, T: Send + 'a>(&'a self, what: String, fut: GridFuture<'a, T>) -> GridFuture<'a, T> {
        Box::pin(async move {
            let at = crate::op::now();
            let start = Instant::now();
            let r = fut.await;
            let millis = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            let error = r.as_ref().err().map(ToString::to_string);
            let controller = self.inner.controller();
            match &error {
                None => tracing::info!(%controller, command = %what, millis, "grid command"),
                Some(e) => {
                    tracing::warn!(%controller, command = %what, millis, error = %e, "grid command failed")
                }
            }
            self.log.lock().expect("trace lock").push(CommandEvent {
                at,
                what: format!("{what} on {controller}"),
                millis,
                error,
            });
            r
        })
    }
}

impl GridController for Traced {
    fn controller(&self) -> &dialect::Controller {
        self.inner.controller()
    }
    fn list(&self) -> GridFuture<'_, Vec<AppSummary>> {
        self.run("app list".into(), self.inner.list())
    }
    fn info<'a>(&'a self, name: &'a str) -> GridFuture<'a, AppInfo> {
        self.run(format!("app info {name}"), self.inner.info(name))
    }
    fn provision<'a>(
        &'a self,
        template: &'a str,
        name: &'a str,
        props: &'a [(String, String)],
    ) -> GridFuture<'a, ()> {
        self.run(
            format!("app provision {template} {name}"),
            self.inner.provision(template, name, props),
        )
    }
    fn start<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        self.run(format!("app start {name}"), self.inner.start(name))
    }
    fn stop<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        self.run(format!("app stop {name}"), self.inner.stop(name))
    }
    fn destroy<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        self.run(format!("app destroy {name}"), self.inner.destroy(name))
    }
    fn config<'a>(&'a self, name: &'a str, props: &'a [(String, String)]) -> GridFuture<'a, ()> {
        self.run(format!("app config {name}"), self.inner.config(name, props))
    }
    fn migrate_import<'a>(
        &'a self,
        remote: &'a dialect::Controller,
        app: &'a str,
        new_name: &'a str,
        props: &'a [(String, String)],
        opts: MigrateOptions,
        progress: ProgressFn<'a>,
    ) -> GridFuture<'a, ()> {
        // The limit is named in the timeline: it explains a copy slower than the link.
        let limit = opts
            .max_rate
            .map(|r| format!(" {}{r}", dialect::MAX_RATE_OPTION))
            .unwrap_or_default();
        self.run(
            format!("app migrate {remote} {app} .name={new_name} --import{limit}"),
            self.inner
                .migrate_import(remote, app, new_name, props, opts, progress),
        )
    }
    fn checksum<'a>(&'a self, name: &'a str) -> GridFuture<'a, Vec<VolumeChecksum>> {
        self.run(format!("app checksum {name}"), self.inner.checksum(name))
    }
    fn grid_summary(&self) -> GridFuture<'_, crate::controller::GridSummary> {
        self.run("app grid".into(), self.inner.grid_summary())
    }
    fn check_import<'a>(
        &'a self,
        remote: &'a dialect::Controller,
        app: &'a str,
        new_name: &'a str,
    ) -> GridFuture<'a, ()> {
        self.run(
            format!("app migrate {remote} {app} .name={new_name} --import --check"),
            self.inner.check_import(remote, app, new_name),
        )
    }
    /// Not a command: no entry in the timeline (the login's time shows in no step).
    fn warm_up(self: Arc<Self>) -> GridFuture<'static, ()> {
        self.inner.clone().warm_up()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Kind, Role};
    use std::io::{Read, Write};

    fn driver(dir: &std::path::Path) -> Driver {
        let book = OpBook::open(crate::journal::Journal::open(dir).unwrap()).unwrap();
        Driver::new(book, Arc::new(crate::memory_lab::MemoryLab::new()))
    }

    fn op() -> Op {
        let plan: crate::op::Plan = serde_json::from_value(serde_json::json!({
            "source_grid": "g1", "target_grid": "g2", "source_app": "shop", "target_app": "shop2",
            "source_controller": "127.0.1.1:2222", "target_controller": "127.0.2.1:2222",
            "source_mig_url": "http://a", "helper_url": "http://b", "final_mig_url": "http://c",
            "helper_app": "mighelper-x", "helper_config": [], "target_app_config": []
        }))
        .unwrap();
        let mut op = Op::new(crate::op::new_id(), Kind::Migrate, plan);
        op.owner = Role::Target;
        op.seq = 3;
        op
    }

    /// Serves one status request: `answer` builds the body from the nonce the request carries;
    /// `sign` signs it (or not). Returns the base URL.
    fn answer_once(
        status: &'static str,
        answer: impl FnOnce(String) -> String + Send + 'static,
        sign: Option<OpKey>,
    ) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = c.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let nonce = req
                .split("nonce=")
                .nth(1)
                .map(|r| r.chars().take_while(|c| c.is_ascii_hexdigit()).collect())
                .unwrap_or_default();
            let body = answer(nonce);
            let sig = sign
                .map(|k| format!("x-mig-signature: {}\r\n", k.sign_status(body.as_bytes())))
                .unwrap_or_default();
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{sig}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        url
    }

    /// A status answer for `op` as its receiver, the target MIG of `shop2`, would sign it.
    fn says(op: &Op, owner: Role, seq: u64) -> impl FnOnce(String) -> String {
        let id = op.id.clone();
        move |nonce| {
            serde_json::to_string(&StatusAnswer {
                op_id: id,
                nonce,
                role: Role::Target,
                app: "shop2".into(),
                known: true,
                owner: Some(owner),
                seq,
                state: Some(crate::op::OpState::Running),
                rolling_back: false,
            })
            .unwrap()
        }
    }

    fn key_of(op: &Op) -> OpKey {
        crate::auth::AppKey::from_secret_bytes(b"k").op_key(&op.id)
    }

    #[tokio::test]
    async fn a_signed_answer_that_the_receiver_owns_the_operation_means_taken() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let mine = op();
        let k = key_of(&mine);
        let same = answer_once("200 OK", says(&mine, Role::Target, 3), Some(k.clone()));
        assert_eq!(d.probe(&same, &k, "shop2", &mine).await, Probe::Taken);
        let ahead = answer_once("200 OK", says(&mine, Role::Target, 4), Some(k.clone()));
        assert_eq!(
            d.probe(&ahead, &k, "shop2", &mine).await,
            Probe::Taken,
            "a later sequence number"
        );
    }

    #[tokio::test]
    async fn a_signed_answer_of_another_owner_or_an_older_handoff_means_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let mine = op();
        let k = key_of(&mine);
        let url = answer_once("200 OK", says(&mine, Role::Helper, 3), Some(k.clone()));
        assert!(matches!(
            d.probe(&url, &k, "shop2", &mine).await,
            Probe::NotTaken(_)
        ));
        let url = answer_once("200 OK", says(&mine, Role::Target, 2), Some(k.clone()));
        assert!(matches!(
            d.probe(&url, &k, "shop2", &mine).await,
            Probe::NotTaken(_)
        ));
        let id = mine.id.clone();
        let unknown = move |nonce| {
            serde_json::to_string(&StatusAnswer {
                op_id: id,
                nonce,
                role: Role::Target,
                app: "shop2".into(),
                known: false,
                owner: None,
                seq: 0,
                state: None,
                rolling_back: false,
            })
            .unwrap()
        };
        let url = answer_once("200 OK", unknown, Some(k.clone()));
        assert!(matches!(
            d.probe(&url, &k, "shop2", &mine).await,
            Probe::NotTaken(_)
        ));
    }

    #[tokio::test]
    async fn an_answer_that_cannot_be_trusted_decides_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let mine = op();
        let k = key_of(&mine);
        let unknown = |p: Probe| matches!(p, Probe::Unknown(_));
        // Unsigned, signed with another operation's key, an old answer replayed (another
        // nonce), another application's, an error, nothing listening.
        let url = answer_once("200 OK", says(&mine, Role::Target, 3), None);
        assert!(unknown(d.probe(&url, &k, "shop2", &mine).await), "unsigned");
        let other = crate::auth::AppKey::from_secret_bytes(b"k").op_key(&crate::op::new_id());
        let url = answer_once("200 OK", says(&mine, Role::Target, 3), Some(other));
        assert!(
            unknown(d.probe(&url, &k, "shop2", &mine).await),
            "another key"
        );
        let stale = says(&mine, Role::Target, 3);
        let url = answer_once(
            "200 OK",
            move |_| stale(crate::op::new_id()),
            Some(k.clone()),
        );
        assert!(
            unknown(d.probe(&url, &k, "shop2", &mine).await),
            "another nonce"
        );
        let url = answer_once("200 OK", says(&mine, Role::Target, 3), Some(k.clone()));
        assert!(
            unknown(d.probe(&url, &k, "shop", &mine).await),
            "another application"
        );
        let url = answer_once("503 Service Unavailable", |_| "{}".into(), Some(k.clone()));
        assert!(unknown(d.probe(&url, &k, "shop2", &mine).await), "an error");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        assert!(
            unknown(d.probe(&closed, &k, "shop2", &mine).await),
            "nothing listening"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_not_retried_and_a_passing_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let r: Result<(), StepError> = d
            .retry("x", || async {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err(StepError::permanent("refused key"))
            })
            .await;
        assert_eq!(r.unwrap_err().message, "refused key");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let r: Result<(), StepError> = d
            .retry("x", || async {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err(StepError::from("connection reset".to_string()))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1 + BACKOFF.len()
        );
    }

    #[test]
    fn grid_errors_that_cannot_pass_are_permanent() {
        let refused = GridError::Auth {
            addr: "a".into(),
            user: "root".into(),
            key_file: "k".into(),
            reason: "denied".into(),
        };
        assert!(StepError::from(refused).permanent);
        let exit2 = GridError::Command {
            addr: "a".into(),
            command: "app start x".into(),
            exit_code: Some(2),
            status: "exited with code 2".into(),
            stderr: "no such application".into(),
        };
        assert!(StepError::from(exit2).permanent);
        let broke = GridError::Connect {
            addr: "a".into(),
            reason: "connection refused".into(),
        };
        assert!(!StepError::from(broke).permanent);
        let huge = GridError::Command {
            addr: "a".into(),
            command: "app start x".into(),
            exit_code: Some(1),
            status: "exited with code 1".into(),
            stderr: "e".repeat(16 << 20),
        };
        let e = StepError::from(huge);
        assert!(e.message.len() < 8192, "{}", e.message.len());
        assert!(e.message.ends_with("bytes more"));
    }
}
