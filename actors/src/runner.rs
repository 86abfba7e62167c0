//! What the three operation actors share to run their steps: the op book, a way to reach grid
//! controllers, an HTTP client, and the step bookkeeping (journal before a step starts, again when
//! it ends), so each actor's file reads as its steps in order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::OpKey;
use crate::book::OpBook;
use crate::controller::{GridController, GridError};
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
pub struct StepRunner {
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

impl StepRunner {
    pub fn new(book: OpBook, connect: Arc<dyn Connect>) -> StepRunner {
        StepRunner {
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

    /// The same runner with fault points under `faults`.
    pub fn with_faults(mut self, faults: Faults) -> StepRunner {
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

mod grid;
#[cfg(test)]
mod tests;
mod traced;

pub use grid::{
    app_state, destroy_if_ours, ensure_destroyed, ensure_running, ensure_stopped, helper_leftover,
    leftover, manual_command,
};
use traced::Traced;
