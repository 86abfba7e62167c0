//! What the three operation actors share to run their steps: the op book, a way to reach grid
//! controllers, an HTTP client, and the step bookkeeping (journal before a step starts, again when
//! it ends), so each actor's file reads as its steps in order.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dialect::AppState;

use crate::auth::OpKey;
use crate::book::OpBook;
use crate::controller::{
    AppInfo, AppSummary, GridController, GridFuture, MigrateOptions, ProgressFn, VolumeChecksum,
};
use crate::handoff;
use crate::op::Op;
use crate::ssh::SshGrid;

/// Reaches a grid controller by its address from grid.info (`[user@]host[:port]`).
pub trait Connect: Send + Sync {
    fn connect(&self, controller: &str) -> Result<Arc<dyn GridController>, String>;
}

/// The real one: SSH with the application's key, host keys pinned in known_hosts.
pub struct SshConnect {
    pub key_file: PathBuf,
    pub known_hosts: PathBuf,
}

impl Connect for SshConnect {
    fn connect(&self, controller: &str) -> Result<Arc<dyn GridController>, String> {
        let c: dialect::Controller = controller.parse().map_err(|e| format!("{e}"))?;
        Ok(Arc::new(SshGrid::new(c, &self.key_file, &self.known_hosts)))
    }
}

#[derive(Clone)]
pub struct Driver {
    pub book: OpBook,
    pub connect: Arc<dyn Connect>,
    pub http: reqwest::Client,
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
            commands: Arc::default(),
        }
    }

    /// The controller at `controller`, every command through it timed into the trace.
    pub fn grid(&self, controller: &str) -> Result<Arc<dyn GridController>, String> {
        let inner = self.connect.connect(controller)?;
        Ok(Arc::new(Traced {
            inner,
            log: self.commands.clone(),
        }))
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
        step: &str,
        work: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        op.start_step(step);
        self.commit(op)?;
        tracing::info!(step, "step started");
        let started = std::time::Instant::now();
        let r = work.await;
        match &r {
            Ok(_) => {
                op.finish_step(step, None);
                tracing::info!(step, secs = started.elapsed().as_secs_f64(), "step done");
            }
            Err(e) => {
                op.fail_step(step, e);
                tracing::warn!(step, error = %e, "step failed");
            }
        }
        self.commit(op)?;
        r
    }

    /// Whether the instance at `base_url` already owns `op` (as handed to it: same owner, this
    /// sequence number or a later one). A handoff it took can still look refused to the sender:
    /// the answer was lost and the retry (same sequence number) is refused as a replay, or the
    /// sender was restarted before it journalled the answer and sends again. Undoing the
    /// operation then would undo what the receiver is already driving.
    pub async fn taken_by(&self, base_url: &str, op: &Op) -> bool {
        let url = format!("{base_url}/api/v1/ops/{}", op.id);
        let theirs = async {
            let r = self
                .http
                .get(&url)
                .header("traceparent", op.traceparent())
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())?;
            r.json::<Op>().await.ok()
        }
        .await;
        theirs.is_some_and(|t| t.owner == op.owner && t.seq >= op.seq)
    }

    /// Hands `next` to the instance at `base_url` ([`handoff::send`]). A refusal is checked
    /// with [`Driver::taken_by`] before it counts: a receiver that already owns the operation
    /// has taken it.
    pub async fn hand_off(&self, base_url: &str, key: &OpKey, next: &mut Op) -> Result<(), String> {
        match handoff::send(&self.http, base_url, key, next).await {
            Err(e) if self.taken_by(base_url, next).await => {
                tracing::info!(to = base_url, error = %e, "the handoff looked refused, but the receiver already owns the operation");
                Ok(())
            }
            r => r,
        }
    }

    /// Runs `f` until it succeeds, backing off between tries; returns the last error.
    pub async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let mut last = String::new();
        for (i, wait) in std::iter::once(0).chain(BACKOFF).enumerate() {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match f().await {
                Ok(v) => return Ok(v),
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
pub async fn app_state(grid: &dyn GridController, name: &str) -> Result<Option<AppState>, String> {
    let apps = grid.list().await.map_err(|e| e.to_string())?;
    Ok(apps.into_iter().find(|a| a.name == name).map(|a| a.state))
}

/// Stops `name` unless it is already stopped (or absent). Idempotent.
pub async fn ensure_stopped(grid: &dyn GridController, name: &str) -> Result<(), String> {
    match app_state(grid, name).await? {
        None | Some(AppState::Stopped) => Ok(()),
        Some(_) => grid.stop(name).await.map_err(|e| e.to_string()),
    }
}

/// Starts `name` unless it is already running. Idempotent.
pub async fn ensure_running(grid: &dyn GridController, name: &str) -> Result<(), String> {
    match app_state(grid, name).await? {
        Some(AppState::Running) => Ok(()),
        None => Err(format!(
            "application {name} does not exist on {}",
            grid.controller()
        )),
        Some(AppState::Failed) | Some(AppState::Starting) | Some(AppState::Stopping) => {
            // A failed or half-way application is stopped first so `start` begins clean.
            let _ = grid.stop(name).await;
            grid.start(name).await.map_err(|e| e.to_string())
        }
        Some(AppState::Stopped) => grid.start(name).await.map_err(|e| e.to_string()),
    }
}

/// Stops (if needed) and destroys `name` unless it is already gone. Idempotent.
pub async fn ensure_destroyed(grid: &dyn GridController, name: &str) -> Result<(), String> {
    match app_state(grid, name).await? {
        None => Ok(()),
        Some(AppState::Stopped) | Some(AppState::Failed) => {
            grid.destroy(name).await.map_err(|e| e.to_string())
        }
        Some(_) => {
            grid.stop(name).await.map_err(|e| e.to_string())?;
            grid.destroy(name).await.map_err(|e| e.to_string())
        }
    }
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

/// Tests and dry runs reach in-memory grids the same way.
impl Connect for crate::controller::memory::MemoryLab {
    fn connect(&self, controller: &str) -> Result<Arc<dyn GridController>, String> {
        controller
            .parse::<dialect::Controller>()
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(self.grid(controller)))
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
        self.run(
            format!("app migrate {remote} {app} .name={new_name} --import"),
            self.inner
                .migrate_import(remote, app, new_name, props, opts, progress),
        )
    }
    fn checksum<'a>(&'a self, name: &'a str) -> GridFuture<'a, Vec<VolumeChecksum>> {
        self.run(format!("app checksum {name}"), self.inner.checksum(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Kind, Role};
    use std::io::{Read, Write};

    fn driver(dir: &std::path::Path) -> Driver {
        let book = OpBook::open(crate::journal::Journal::open(dir).unwrap()).unwrap();
        Driver::new(book, Arc::new(crate::controller::memory::MemoryLab::new()))
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

    /// Serves one HTTP request with `status` and `body`; returns the base URL.
    fn answer_once(status: &'static str, body: String) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        url
    }

    #[tokio::test]
    async fn a_receiver_that_owns_the_operation_has_taken_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let mine = op();
        let same = answer_once("200 OK", serde_json::to_string(&mine).unwrap());
        assert!(d.taken_by(&same, &mine).await);
        let mut later = mine.clone();
        later.seq = 4;
        let ahead = answer_once("200 OK", serde_json::to_string(&later).unwrap());
        assert!(d.taken_by(&ahead, &mine).await, "a later sequence number");
    }

    #[tokio::test]
    async fn anything_else_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let mine = op();
        let mut other_owner = mine.clone();
        other_owner.owner = Role::Helper;
        let url = answer_once("200 OK", serde_json::to_string(&other_owner).unwrap());
        assert!(!d.taken_by(&url, &mine).await, "another owner");
        let mut older = mine.clone();
        older.seq = 2;
        let url = answer_once("200 OK", serde_json::to_string(&older).unwrap());
        assert!(!d.taken_by(&url, &mine).await, "an older sequence number");
        let url = answer_once("404 Not Found", r#"{"error":"no operation"}"#.into());
        assert!(!d.taken_by(&url, &mine).await, "unknown there");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        assert!(!d.taken_by(&closed, &mine).await, "nothing listening");
    }
}
