//! The one interface through which MIG touches a grid: [`GridController`].
//!
//! The actors never build command strings. They call these methods with plain names and property
//! pairs; an implementation validates them into a [`dialect::Command`] (so a hostile name is refused
//! before anything leaves MIG), sends it, and turns the controller's `--batch` output into the typed
//! results below. [`crate::ssh::SshGrid`] is the real implementation; tests and future drivers (e.g.
//! libvirt) can stand in.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dialect::{AppName, AppState, Command, Controller, DialectError, Prop};

/// One line of `app list --batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSummary {
    pub name: String,
    pub state: AppState,
    pub template: String,
}

/// `app info NAME --batch`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppInfo {
    pub name: String,
    pub state: AppState,
    pub template: String,
    /// The controller's last failure for this application (`error` line), when it reports one.
    pub error: Option<String>,
    /// `prop.NAME` lines, in the controller's order.
    pub props: Vec<(String, String)>,
    /// `volume.NAME` lines: volume name and size in bytes.
    pub volumes: Vec<(String, u64)>,
    /// Any other `key<TAB>value` line (e.g. `volume.data.kind`), kept so a newer controller does
    /// not break an older MIG.
    pub extra: Vec<(String, String)>,
}

impl AppInfo {
    /// The value of property `name`, if the application has it.
    pub fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One line of `app checksum NAME`: a volume, its size and its BLAKE3 digest (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeChecksum {
    pub volume: String,
    pub size: u64,
    pub blake3: String,
}

/// Called with `(bytes_done, bytes_total)` as a migration reports progress.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// The future every [`GridController`] method returns: boxed so the trait stays object safe
/// (`Arc<dyn GridController>`), and `Send` so actors can run it with `ctx.spawn` on any arbiter.
pub type GridFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, GridError>> + Send + 'a>>;

/// Everything MIG does to a grid. Names are validated by the implementation (bad ones give
/// [`GridError::Invalid`] before any connection is made).
pub trait GridController: Send + Sync {
    /// The controller this talks to, for messages and logs.
    fn controller(&self) -> &Controller;
    fn list(&self) -> GridFuture<'_, Vec<AppSummary>>;
    fn info<'a>(&'a self, name: &'a str) -> GridFuture<'a, AppInfo>;
    /// Creates, configures and starts `name` from `template`.
    fn provision<'a>(
        &'a self,
        template: &'a str,
        name: &'a str,
        props: &'a [(String, String)],
    ) -> GridFuture<'a, ()>;
    fn start<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()>;
    fn stop<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()>;
    fn destroy<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()>;
    fn config<'a>(&'a self, name: &'a str, props: &'a [(String, String)]) -> GridFuture<'a, ()>;
    /// Runs `app migrate REMOTE APP .name=NEW --import … --progress_on_stdout` on this grid: pulls
    /// `app` from the controller `remote` as `new_name`. `progress` is called as each progress
    /// line arrives, not at the end.
    fn migrate_import<'a>(
        &'a self,
        remote: &'a Controller,
        app: &'a str,
        new_name: &'a str,
        props: &'a [(String, String)],
        opts: MigrateOptions,
        progress: ProgressFn<'a>,
    ) -> GridFuture<'a, ()>;
    /// gridctl's extension: the BLAKE3 digest of each volume, to prove bytes arrived intact.
    fn checksum<'a>(&'a self, name: &'a str) -> GridFuture<'a, Vec<VolumeChecksum>>;
    /// gridctl's extension (`app grid --batch`), for the dry run: room for volumes, templates,
    /// addresses in use.
    fn grid_summary(&self) -> GridFuture<'_, GridSummary>;
    /// `app migrate REMOTE APP .name=NEW --import --check`, for the dry run: the pull's own
    /// trust (this grid reaches `remote` and may export `app`) and `new_name` free, no copy.
    fn check_import<'a>(
        &'a self,
        remote: &'a Controller,
        app: &'a str,
        new_name: &'a str,
    ) -> GridFuture<'a, ()>;
    /// Gets ready for commands without sending one (over SSH: logs in and keeps the session), so a
    /// step's first command later does not wait for the login. A command sent after this call
    /// uses what it prepares rather than preparing its own. Nothing to do by default.
    fn warm_up(self: Arc<Self>) -> GridFuture<'static, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// `app grid --batch`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GridSummary {
    /// Bytes free for new volumes.
    pub free_bytes: u64,
    pub templates: Vec<String>,
    /// IP addresses the grid's applications' properties hold.
    pub addresses: Vec<String>,
}

/// The optional flags of `app migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateOptions {
    /// `--nocompress`: send volumes as they are (best on a fast link).
    pub nocompress: bool,
    /// `--novols`: copy the descriptor only.
    pub novols: bool,
    /// `--max_rate=BYTES`: the most bytes per second the pull may move (property `max_rate`).
    pub max_rate: Option<u64>,
    /// `--stage`: pre-copy the (running) application into a staged copy, not startable.
    pub stage: bool,
    /// `--delta`: the final pull into the staged copy: only the chunks that changed move.
    pub delta: bool,
}

/// What went wrong talking to a grid controller. Every variant names the controller; command
/// failures carry the remote exit code and stderr.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GridError {
    #[error("cannot connect to grid controller {addr}: {reason}")]
    Connect { addr: String, reason: String },

    #[error(
        "grid controller {addr} presented a host key that is not in {known_hosts}: {fingerprint}. \
         Refusing to connect. If this is the controller's key (check the fingerprint out of band, \
         e.g. `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the controller), trust it with: \
         ssh-keyscan -p {port} {host} >> {known_hosts}",
        known_hosts = known_hosts.display()
    )]
    UnknownHostKey {
        addr: String,
        host: String,
        port: u16,
        fingerprint: String,
        known_hosts: PathBuf,
    },

    #[error(
        "grid controller {addr} presented host key {fingerprint}, which is NOT the key pinned for it \
         in {known_hosts}: refusing to connect (someone may be intercepting the connection). If the \
         controller's key was changed on purpose, check the new fingerprint out of band, then run \
         `ssh-keygen -R '[{host}]:{port}' -f {known_hosts}` and \
         `ssh-keyscan -p {port} {host} >> {known_hosts}`",
        known_hosts = known_hosts.display()
    )]
    HostKeyChanged {
        addr: String,
        host: String,
        port: u16,
        fingerprint: String,
        known_hosts: PathBuf,
    },

    #[error("cannot read known hosts file {}: {reason}", path.display())]
    KnownHosts { path: PathBuf, reason: String },

    #[error(
        "grid controller {addr} refused key {} for user {user} ({reason}); authorize its public \
         key on the controller",
        key_file.display()
    )]
    Auth {
        addr: String,
        user: String,
        key_file: PathBuf,
        reason: String,
    },

    #[error("cannot use private key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },

    #[error("grid controller {addr}: `{command}` timed out after {}", fmt_duration(*after))]
    Timeout {
        addr: String,
        command: String,
        after: Duration,
    },

    #[error("grid controller {addr}: `{command}` {status}{}", fmt_stderr(stderr))]
    Command {
        addr: String,
        command: String,
        /// The remote exit code; `None` when the command died of a signal.
        exit_code: Option<i32>,
        /// `exited with code N` or `was killed by signal S`.
        status: String,
        stderr: String,
    },

    #[error("SSH session with grid controller {addr} broke during `{command}`: {reason}")]
    Session {
        addr: String,
        command: String,
        reason: String,
    },

    #[error("grid controller {addr}: cannot parse the output of `{command}`: {reason}")]
    Parse {
        addr: String,
        command: String,
        reason: String,
    },

    #[error("refused before sending anything to the grid: {0}")]
    Invalid(#[from] DialectError),
}

impl GridError {
    /// True when the controller refused the command as outside the dialect or not allowed (exit 2).
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            GridError::Command {
                exit_code: Some(2),
                ..
            }
        )
    }
}

fn fmt_stderr(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        " (no stderr)".to_string()
    } else {
        format!(": {s}")
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn props(pairs: &[(String, String)]) -> Result<Vec<Prop>, DialectError> {
    pairs.iter().map(|(n, v)| Prop::new(n, v)).collect()
}

/// Builds the validated [`Command`]s behind each trait method, so every implementation refuses
/// the same bad input in the same way.
pub mod commands;

/// Parsers for the controller's `--batch` outputs. They return a reason; the caller adds which
/// controller and command.
pub mod parse;

#[cfg(test)]
mod tests;
