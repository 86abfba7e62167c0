//! [`SshGrid`]: the [`GridController`] that talks to a real grid controller over SSH (the `net`
//! terminal), with async-ssh2-lite on tokio.
//!
//! One authenticated SSH session per controller, kept between commands: each command gets its own
//! channel on it, so an operation's dozen commands pay the TCP connect, key exchange and login
//! once instead of a dozen times. A session is checked against a known_hosts file when it is
//! opened (unknown or changed host key: refused), logs in with the private key file, and then
//! runs one validated and quoted dialect command per channel, returning its stdout, or an error
//! with the remote exit code and stderr.
//!
//! A session that broke while idle (controller restarted, link dropped) is found out when it
//! cannot open a channel, before the command is sent; it is dropped and a new session opened, host
//! key checked again, so the caller never sees it. A command that fails after it was sent is
//! never re-sent (it may have run). Sessions idle for [`SshGrid::with_idle_timeout`] are closed,
//! so a grid is held only while an operation uses it; clones of an [`SshGrid`] share its sessions.
//!
//! Opening a session (handshake, host key check, login) is in `ssh/login.rs`; this file keeps the
//! pool and the commands.
//!
//! An actor that knows it will need a grid later logs in ahead ([`GridController::warm_up`]) while
//! it works elsewhere; a command that finds no idle session while that login is under way waits
//! for it rather than logging in a second time.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_ssh2_lite::ssh2::{CheckResult, ErrorCode, HashType, KnownHostFileKind, MethodType};
use async_ssh2_lite::{AsyncChannel, AsyncSession, TokioTcpStream};
use dialect::{Command, Controller};
use tokio::io::AsyncReadExt;
use tokio::time::{sleep_until, timeout_at, Instant};
use tracing::{debug, warn, Instrument};

use crate::controller::{
    commands, parse, AppInfo, AppSummary, GridController, GridError, GridFuture, GridSummary,
    MigrateOptions, ProgressFn, VolumeChecksum,
};

/// Output kept per stream; a controller printing more than this is misbehaving.
const MAX_OUTPUT: usize = 16 << 20;

mod login;

type Session = AsyncSession<TokioTcpStream>;
type Channel = AsyncChannel<TokioTcpStream>;

/// A grid controller reached over SSH. Clones share one pool of sessions.
#[derive(Debug, Clone)]
pub struct SshGrid {
    controller: Controller,
    key_file: PathBuf,
    known_hosts: PathBuf,
    connect_timeout: Duration,
    command_timeout: Duration,
    migrate_idle_timeout: Duration,
    idle_timeout: Duration,
    pool: Arc<Pool>,
}

/// Authenticated sessions not running a command right now, newest last. A command takes one
/// (or opens one) for itself, so commands that run at the same time never share a session.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    /// Held while a session is opened ahead of the commands; holds why the last one failed.
    opening: Arc<tokio::sync::Mutex<Option<GridError>>>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<(Session, Instant)>,
    /// A task closes sessions once they have been idle too long; at most one per pool.
    reaper: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.state.lock().map(|s| s.idle.len()).unwrap_or(0);
        f.debug_struct("Pool").field("idle", &idle).finish()
    }
}

impl Pool {
    /// The most recently used session that has not been idle for `idle_timeout`; older ones are
    /// dropped on the way.
    fn take(&self, idle_timeout: Duration) -> Option<Session> {
        let mut st = self.state.lock().expect("pool lock");
        while let Some((s, since)) = st.idle.pop() {
            if since.elapsed() < idle_timeout {
                return Some(s);
            }
        }
        None
    }

    /// Waits for a session being opened ahead, if one is: `Some` is why that failed, which is
    /// then this command's error too (trying again at once would wait as long again).
    async fn wait_opening(&self) -> Option<GridError> {
        match self.opening.try_lock() {
            // Nothing under way: an older failure says nothing about now.
            Ok(mut failed) => {
                *failed = None;
                None
            }
            Err(_) => self.opening.lock().await.clone(),
        }
    }

    fn has_idle(&self, idle_timeout: Duration) -> bool {
        let st = self.state.lock().expect("pool lock");
        st.idle
            .iter()
            .any(|(_, since)| since.elapsed() < idle_timeout)
    }

    /// Keeps `session` for the next command, and makes sure something closes it when no command
    /// comes within `idle_timeout`.
    fn put_back(self: &Arc<Self>, session: Session, idle_timeout: Duration) {
        let mut st = self.state.lock().expect("pool lock");
        st.idle.push((session, Instant::now()));
        if st.reaper {
            return;
        }
        // Outside a tokio runtime nothing can be spawned: the session is closed when the pool is
        // dropped, or found stale by the next command.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            st.reaper = true;
            rt.spawn(reap(Arc::downgrade(self), idle_timeout));
        }
    }
}

/// Closes the pool's sessions as they pass `idle_timeout`; ends when none is left, or when the
/// pool itself is gone.
async fn reap(pool: Weak<Pool>, idle_timeout: Duration) {
    let mut wait = idle_timeout;
    loop {
        tokio::time::sleep(wait).await;
        let Some(p) = pool.upgrade() else { return };
        let (expired, done) = {
            let mut st = p.state.lock().expect("pool lock");
            let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|(_, since)| since.elapsed() >= idle_timeout);
            st.idle = fresh;
            match st.idle.iter().map(|(_, since)| *since).min() {
                Some(oldest) => {
                    wait = (oldest + idle_timeout).saturating_duration_since(Instant::now())
                }
                // Decided under the lock, so a session put back after this starts a new reaper.
                None => st.reaper = false,
            }
            let old: Vec<Session> = old.into_iter().map(|(s, _)| s).collect();
            (old, !st.reaper)
        };
        drop(p);
        for s in expired {
            debug!("closing an idle SSH session");
            close(s).await;
        }
        if done {
            return;
        }
    }
}

/// Says goodbye to the controller, best effort: the socket closes when `session` drops anyway.
async fn close(session: Session) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        session.disconnect(None, "done", None),
    )
    .await;
}

/// What a command printed.
#[derive(Debug, Default)]
struct Output {
    stdout: String,
}

/// How long a command may run: in total, or as long as it keeps printing (a migration moving
/// gigabytes reports progress; one that falls silent is stuck).
#[derive(Debug, Clone, Copy)]
enum Limit {
    Total(Duration),
    Idle(Duration),
}

impl SshGrid {
    /// Default timeouts: 10 s to connect and log in, 120 s per command, and a migration may run
    /// as long as it reports progress at least every 5 minutes.
    pub fn new(
        controller: Controller,
        key_file: impl Into<PathBuf>,
        known_hosts: impl Into<PathBuf>,
    ) -> Self {
        SshGrid {
            controller,
            key_file: key_file.into(),
            known_hosts: known_hosts.into(),
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(120),
            migrate_idle_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            pool: Arc::default(),
        }
    }

    /// `connect`: TCP connect, SSH handshake, host key check and login together.
    /// `command`: each command except `migrate`, from opening the channel to its exit.
    pub fn with_timeouts(mut self, connect: Duration, command: Duration) -> Self {
        self.connect_timeout = connect;
        self.command_timeout = command;
        self
    }

    /// How long `migrate_import` may go without any output before it is abandoned.
    pub fn with_migrate_idle_timeout(mut self, idle: Duration) -> Self {
        self.migrate_idle_timeout = idle;
        self
    }

    /// How long a session is kept open without a command (default 60 s): long enough to span
    /// the gaps between an operation's commands, short enough not to hold a grid after it.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    fn addr(&self) -> String {
        let c = &self.controller;
        format!("{}@{}:{}", c.user_or_default(), c.host, c.port_or_default())
    }

    fn connect_err(&self, reason: impl Into<String>) -> GridError {
        GridError::Connect {
            addr: self.addr(),
            reason: reason.into(),
        }
    }

    /// Logs in and keeps the session for the next command, unless one is kept already. A command
    /// sent after this call, even before the returned future first runs, waits for this login
    /// instead of making its own: the login is claimed here, at the call.
    pub fn open_ahead(
        self: Arc<Self>,
    ) -> impl std::future::Future<Output = Result<(), GridError>> + Send + 'static {
        let claimed = self.pool.opening.clone().try_lock_owned().ok();
        async move {
            let mut failed = match claimed {
                Some(g) => g,
                None => self.pool.opening.clone().lock_owned().await,
            };
            *failed = None;
            if self.pool.has_idle(self.idle_timeout) {
                return Ok(());
            }
            match self.open().await {
                Ok(session) => {
                    debug!(controller = %self.addr(), "logged in ahead of the commands");
                    self.pool.put_back(session, self.idle_timeout);
                    Ok(())
                }
                Err(e) => {
                    *failed = Some(e.clone());
                    Err(e)
                }
            }
        }
    }

    /// Runs one command on its own channel of a pooled session (or a new one). `on_line` sees
    /// each stdout line as it arrives.
    async fn run(
        &self,
        cmd: &Command,
        on_line: Option<&mut (dyn FnMut(&str) + Send)>,
        limit: Limit,
    ) -> Result<Output, GridError> {
        let shown = redacted(cmd);
        let span = tracing::debug_span!("grid", controller = %self.addr(), verb = cmd.verb());
        async {
            let (session, channel, started) = self.channel(limit, &shown).await?;
            let result = self
                .exec(channel, cmd, &shown, on_line, limit, started)
                .await;
            // The session is kept only when the command ended cleanly on it (its exit status
            // arrived, zero or not); after a timeout or a broken read its state is unknown.
            match &result {
                Ok(_) | Err(GridError::Command { .. }) => {
                    self.pool.put_back(session, self.idle_timeout)
                }
                Err(_) => close(session).await,
            }
            result
        }
        .instrument(span)
        .await
    }

    /// A session, a fresh channel on it, and when the command's time (`limit`) started: once
    /// the session was there, so logging in never eats into a command's budget. A pooled session
    /// that cannot open a channel broke while idle: nothing was sent on it, so it is dropped and
    /// the next one (or a new session, its host key checked as always) is used instead.
    async fn channel(
        &self,
        limit: Limit,
        shown: &str,
    ) -> Result<(Session, Channel, Instant), GridError> {
        let budget = match limit {
            Limit::Total(d) | Limit::Idle(d) => d,
        };
        // The pool, then (once) a login under way for the commands, then the pool again.
        for waited in [false, true] {
            while let Some(session) = self.pool.take(self.idle_timeout) {
                let started = Instant::now();
                // A live session answers at once; one whose peer vanished may never answer, so
                // it gets the connect timeout, not the command's.
                let wait = started + budget.min(self.connect_timeout);
                match timeout_at(wait, session.channel_session()).await {
                    Ok(Ok(channel)) => {
                        debug!("reusing the SSH session");
                        return Ok((session, channel, started));
                    }
                    Ok(Err(e)) => {
                        debug!(error = %describe(&e), "the idle SSH session broke; reconnecting")
                    }
                    Err(_) => debug!("the idle SSH session does not answer; reconnecting"),
                }
            }
            if !waited {
                if let Some(e) = self.pool.wait_opening().await {
                    return Err(e);
                }
            }
        }
        let session = self.open().await?;
        let started = Instant::now();
        let channel = timeout_at(started + budget, session.channel_session())
            .await
            .map_err(|_| GridError::Timeout {
                addr: self.addr(),
                command: shown.to_string(),
                after: budget,
            })?
            .map_err(|e| GridError::Session {
                addr: self.addr(),
                command: shown.to_string(),
                reason: format!("cannot open a channel: {}", describe(&e)),
            })?;
        Ok((session, channel, started))
    }

    async fn exec(
        &self,
        mut channel: Channel,
        cmd: &Command,
        shown: &str,
        mut on_line: Option<&mut (dyn FnMut(&str) + Send)>,
        limit: Limit,
        started: Instant,
    ) -> Result<Output, GridError> {
        let (after, total_deadline) = match limit {
            Limit::Total(d) => (d, Some(started + d)),
            Limit::Idle(d) => (d, None),
        };
        let timed_out = || GridError::Timeout {
            addr: self.addr(),
            command: shown.to_string(),
            after,
        };
        let broke = |what: &str, e: &dyn std::fmt::Display| GridError::Session {
            addr: self.addr(),
            command: shown.to_string(),
            reason: format!("{what}: {e}"),
        };
        // Steps other than reading output get the whole budget (total) or one idle period.
        let step_deadline = || total_deadline.unwrap_or_else(|| Instant::now() + after);

        // The line is already validated and every argument shell-quoted (dialect::Command).
        timeout_at(step_deadline(), channel.exec(&cmd.to_command_line()))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| broke("exec refused", &describe(&e)))?;
        debug!(command = %shown, "sent");

        let mut out_stream = channel.stream(0);
        let mut err_stream = channel.stderr();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let (mut obuf, mut ebuf) = (vec![0u8; 16384], vec![0u8; 16384]);
        let (mut out_eof, mut err_eof) = (false, false);
        let mut last_activity = Instant::now();
        // Reads are re-polled on this tick too: async-ssh2-lite may park a read without a
        // wake-up when libssh2 reports no blocking direction; the tick makes that harmless.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !(out_eof && err_eof) {
            let deadline = total_deadline.unwrap_or(last_activity + after);
            tokio::select! {
                r = out_stream.read(&mut obuf), if !out_eof => {
                    let n = r.map_err(|e| broke("reading stdout", &e))?;
                    last_activity = Instant::now();
                    if n == 0 {
                        out_eof = true;
                    } else if stdout.len() < MAX_OUTPUT {
                        stdout.extend_from_slice(&obuf[..n]);
                    }
                    if let Some(cb) = on_line.as_deref_mut() {
                        // Streamed output is handed on line by line and not kept, so a long
                        // migration's progress never fills the buffer.
                        let mut start = 0;
                        while let Some(i) = stdout[start..].iter().position(|&b| b == b'\n') {
                            cb(String::from_utf8_lossy(&stdout[start..start + i]).trim_end());
                            start += i + 1;
                        }
                        if out_eof && start < stdout.len() {
                            cb(String::from_utf8_lossy(&stdout[start..]).trim_end());
                            start = stdout.len();
                        }
                        stdout.drain(..start);
                    }
                }
                r = err_stream.read(&mut ebuf), if !err_eof => {
                    let n = r.map_err(|e| broke("reading stderr", &e))?;
                    last_activity = Instant::now();
                    if n == 0 {
                        err_eof = true;
                    } else if stderr.len() < MAX_OUTPUT {
                        stderr.extend_from_slice(&ebuf[..n]);
                    }
                }
                _ = sleep_until(deadline) => return Err(timed_out()),
                _ = tick.tick() => {}
            }
        }
        timeout_at(step_deadline(), channel.wait_close())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| broke("waiting for the exit status", &describe(&e)))?;
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        let signal = channel.exit_signal().await.ok().and_then(|s| s.exit_signal);
        let code = channel
            .exit_status()
            .map_err(|e| broke("reading the exit status", &describe(&e)))?;
        let failed = |exit_code: Option<i32>, status: String| GridError::Command {
            addr: self.addr(),
            command: shown.to_string(),
            exit_code,
            status,
            stderr: stderr.clone(),
        };
        if let Some(sig) = signal {
            return Err(failed(None, format!("was killed by signal {sig}")));
        }
        if code != 0 {
            return Err(failed(Some(code), format!("exited with code {code}")));
        }
        debug!(elapsed = ?started.elapsed(), "done");
        Ok(Output {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
        })
    }

    async fn run_simple(
        &self,
        cmd: Result<Command, dialect::DialectError>,
    ) -> Result<Output, GridError> {
        let cmd = cmd?;
        self.run(&cmd, None, Limit::Total(self.command_timeout))
            .await
    }

    fn parse_err(&self, cmd: &Command, reason: String) -> GridError {
        GridError::Parse {
            addr: self.addr(),
            command: redacted(cmd),
            reason,
        }
    }
}

impl GridController for SshGrid {
    fn controller(&self) -> &Controller {
        &self.controller
    }

    fn list(&self) -> GridFuture<'_, Vec<AppSummary>> {
        Box::pin(async move {
            let cmd = commands::list();
            let out = self.run_simple(Ok(cmd.clone())).await?;
            parse::list(&out.stdout).map_err(|r| self.parse_err(&cmd, r))
        })
    }

    fn info<'a>(&'a self, name: &'a str) -> GridFuture<'a, AppInfo> {
        Box::pin(async move {
            let cmd = commands::info(name)?;
            let out = self.run_simple(Ok(cmd.clone())).await?;
            parse::info(&out.stdout).map_err(|r| self.parse_err(&cmd, r))
        })
    }

    fn provision<'a>(
        &'a self,
        template: &'a str,
        name: &'a str,
        props: &'a [(String, String)],
    ) -> GridFuture<'a, ()> {
        Box::pin(async move {
            self.run_simple(commands::provision(template, name, props))
                .await
                .map(drop)
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        Box::pin(async move { self.run_simple(commands::start(name)).await.map(drop) })
    }

    fn stop<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        Box::pin(async move { self.run_simple(commands::stop(name)).await.map(drop) })
    }

    fn destroy<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        Box::pin(async move { self.run_simple(commands::destroy(name)).await.map(drop) })
    }

    fn config<'a>(&'a self, name: &'a str, props: &'a [(String, String)]) -> GridFuture<'a, ()> {
        Box::pin(async move {
            self.run_simple(commands::config(name, props))
                .await
                .map(drop)
        })
    }

    fn migrate_import<'a>(
        &'a self,
        remote: &'a Controller,
        app: &'a str,
        new_name: &'a str,
        props: &'a [(String, String)],
        opts: MigrateOptions,
        progress: ProgressFn<'a>,
    ) -> GridFuture<'a, ()> {
        Box::pin(async move {
            let cmd = commands::migrate_import(remote, app, new_name, props, opts)?;
            let mut on_line = |line: &str| match parse::progress(line) {
                Some((done, total)) => progress(done, total),
                None => debug!(line, "migrate output"),
            };
            self.run(
                &cmd,
                Some(&mut on_line),
                Limit::Idle(self.migrate_idle_timeout),
            )
            .await
            .map(drop)
        })
    }

    fn checksum<'a>(&'a self, name: &'a str) -> GridFuture<'a, Vec<VolumeChecksum>> {
        Box::pin(async move {
            let cmd = commands::checksum(name)?;
            let out = self.run_simple(Ok(cmd.clone())).await?;
            parse::checksum(&out.stdout).map_err(|r| self.parse_err(&cmd, r))
        })
    }

    fn grid_summary(&self) -> GridFuture<'_, GridSummary> {
        Box::pin(async move {
            let cmd = commands::grid();
            let out = self.run_simple(Ok(cmd.clone())).await?;
            parse::grid(&out.stdout).map_err(|r| self.parse_err(&cmd, r))
        })
    }

    fn check_import<'a>(
        &'a self,
        remote: &'a Controller,
        app: &'a str,
        new_name: &'a str,
    ) -> GridFuture<'a, ()> {
        Box::pin(async move {
            self.run_simple(commands::check_import(remote, app, new_name))
                .await
                .map(|_| ())
        })
    }

    fn warm_up(self: Arc<Self>) -> GridFuture<'static, ()> {
        Box::pin(self.open_ahead())
    }
}

/// The command line as errors and logs show it: values of properties that may hold secrets
/// (MigHelper's `env` carries the operation key) are replaced.
pub fn redacted(cmd: &Command) -> String {
    let mut c = cmd.clone();
    if let Command::Provision { props, .. }
    | Command::Config { props, .. }
    | Command::Migrate { props, .. } = &mut c
    {
        for p in props.iter_mut() {
            let n = p.name.to_ascii_lowercase();
            if ["env", "password", "secret", "key", "token"]
                .iter()
                .any(|s| n.contains(s))
            {
                p.value = "<redacted>".into();
            }
        }
    }
    c.to_command_line()
}

fn ssh2_code(e: &async_ssh2_lite::Error) -> Option<i32> {
    match e.as_ssh2()?.code() {
        ErrorCode::Session(c) => Some(c),
        ErrorCode::SFTP(_) => None,
    }
}

/// async-ssh2-lite's Display is its Debug; say it in words.
fn describe(e: &async_ssh2_lite::Error) -> String {
    match e {
        async_ssh2_lite::Error::Ssh2(s) => s.message().to_string(),
        async_ssh2_lite::Error::Io(io) => io.to_string(),
        async_ssh2_lite::Error::Other(o) => o.to_string(),
    }
}

#[cfg(test)]
mod tests;
