//! Cancelling an operation before its cut-over: `POST /api/v1/ops/{id}/cancel` on any instance
//! that knows it.
//!
//! One winner. The actor that owns the operation holds a [`Gate`]; a cancel closes it as
//! `Cancelled`, the step that passes the point of no return (MigHelper starting the target, or
//! re-starting the source of a snapshot; the Source handing the operation to MigHelper) closes it
//! as `CutOver`. Whichever comes first wins, under one lock, and the other is told so: a cancel
//! that lost gets 409 "past the cut-over", a cut-over that lost rolls back instead.
//!
//! An instance that does not own the operation forwards the cancel, once, to the one its journal
//! names, signed with `k_op` for that receiver (role and application) with a timestamp and a fresh
//! nonce, so a captured cancel can be neither replayed nor sent to another instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Message, Recipient};
use tokio::sync::watch;

use crate::auth::{AppKey, CancelSig, OpKey, H_NONCE, H_OP, H_SIGNATURE, H_TIMESTAMP, MAX_SKEW};
use crate::book::OpBook;
use crate::op::{Cancelled, Kind, Op, Role};

/// Where the owner of an operation stands with respect to its cut-over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateState {
    /// Nothing decided: a cancel may still win.
    Open,
    /// A cancel won; the operation rolls back.
    Cancelled(Cancelled),
    /// The point of no return was passed first; a cancel is refused.
    CutOver,
    /// A failure is being rolled back already; a cancel has nothing left to stop.
    RollingBack,
}

/// The one place where a cancel and the cut-over meet (see the module's doc).
#[derive(Debug, Clone)]
pub struct Gate(Arc<watch::Sender<GateState>>);

impl Gate {
    pub fn new(state: GateState) -> Gate {
        Gate(Arc::new(watch::channel(state).0))
    }

    /// The gate of an operation as the journal left it.
    pub fn of(op: &Op) -> Gate {
        Gate::new(match (&op.cancelled, op.rolling_back) {
            (Some(c), _) => GateState::Cancelled(c.clone()),
            (None, true) => GateState::RollingBack,
            (None, false) => GateState::Open,
        })
    }

    /// Closes the gate as cancelled by `by`, unless something was decided first. A second cancel
    /// is answered with the first one, which stands. `Err` is what was decided instead.
    pub fn cancel(&self, by: Cancelled) -> Result<Cancelled, GateState> {
        let mut out = Err(GateState::Open);
        self.0.send_if_modified(|s| match s {
            GateState::Open => {
                out = Ok(by.clone());
                *s = GateState::Cancelled(by.clone());
                true
            }
            GateState::Cancelled(c) => {
                out = Ok(c.clone());
                false
            }
            other => {
                out = Err(other.clone());
                false
            }
        });
        out
    }

    /// Passes the point of no return unless a cancel came first (then `Err` says whose).
    pub fn pass(&self) -> Result<(), Cancelled> {
        let mut out = Ok(());
        self.0.send_if_modified(|s| match s {
            GateState::Open => {
                *s = GateState::CutOver;
                true
            }
            GateState::Cancelled(c) => {
                out = Err(c.clone());
                false
            }
            _ => false,
        });
        out
    }

    /// A failure rolls back: from now on a cancel is refused (unless one already won).
    pub fn rolling_back(&self) {
        self.0.send_if_modified(|s| {
            let open = *s == GateState::Open;
            if open {
                *s = GateState::RollingBack;
            }
            open
        });
    }

    pub fn cancelled(&self) -> Option<Cancelled> {
        match &*self.0.borrow() {
            GateState::Cancelled(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Resolves once a cancel has won (never, if none does).
    pub async fn wait_cancelled(&self) -> Cancelled {
        let mut rx = self.0.subscribe();
        let found = match rx.wait_for(|s| matches!(s, GateState::Cancelled(_))).await {
            Ok(s) => match &*s {
                GateState::Cancelled(c) => Some(c.clone()),
                _ => None,
            },
            Err(_) => None,
        };
        match found {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }
}

/// A cancel for the actor that owns the operation on this instance.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Cancelled, CancelError>")]
pub struct Cancel {
    pub op_id: String,
    pub by: Cancelled,
}

/// Why a cancel was not taken. Nothing changed in any of these cases.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CancelError {
    #[error("{0}")]
    NotFound(String),
    /// Past the cut-over, already rolling back, or ended.
    #[error("{0}")]
    Conflict(String),
    /// The actor here handed the operation on; ask its next owner.
    #[error("the operation was handed on")]
    Moved,
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Bad(String),
    /// The owner could not be reached.
    #[error("{0}")]
    Unreachable(String),
}

impl CancelError {
    pub fn status(&self) -> u16 {
        match self {
            CancelError::NotFound(_) => 404,
            CancelError::Conflict(_) | CancelError::Moved => 409,
            CancelError::Auth(_) => 401,
            CancelError::Bad(_) => 400,
            CancelError::Unreachable(_) => 502,
        }
    }
}

/// The 409 of an operation whose owner is the Target: past the cut-over, or already undone.
pub fn too_late(op: &Op) -> CancelError {
    if !op.state.is_running() {
        return CancelError::Conflict(format!(
            "operation {} has already ended ({})",
            op.id,
            serde_json::to_value(op.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ));
    }
    if op.rolling_back {
        return CancelError::Conflict(format!(
            "operation {} is already being rolled back ({})",
            op.id,
            op.error.as_deref().unwrap_or("a step failed")
        ));
    }
    past_cut_over(op)
}

/// The 409 of a cancel that came after the cut-over.
pub fn past_cut_over(op: &Op) -> CancelError {
    CancelError::Conflict(format!(
        "past the cut-over: the application already runs on {}",
        op.runs_on_after_cut_over()
    ))
}

/// The instance that owns `op` (as `op` says) and who it is: its URL, role and application.
fn owner_of(op: &Op) -> (String, Role, String) {
    let p = &op.plan;
    match op.owner {
        Role::Source => (p.source_mig_url.clone(), Role::Source, p.source_app.clone()),
        Role::Helper => (p.helper_url.clone(), Role::Helper, p.helper_app.clone()),
        Role::Target if op.rolling_back || op.kind == Kind::Snapshot => {
            (p.source_mig_url.clone(), Role::Target, p.source_app.clone())
        }
        Role::Target => (p.final_mig_url.clone(), Role::Target, p.target_app.clone()),
    }
}

/// The keys this instance can sign and check cancels with.
#[derive(Clone)]
pub enum Keys {
    /// A MIG: every operation of its application.
    App(AppKey),
    /// MigHelper: its one operation.
    One(String, OpKey),
}

impl Keys {
    fn get(&self, op_id: &str) -> Option<OpKey> {
        match self {
            Keys::App(k) => Some(k.op_key(op_id)),
            Keys::One(id, k) => (id == op_id).then(|| k.clone()),
        }
    }
}

/// A forwarded cancel as it arrived: its signing headers and body.
#[derive(Debug, Clone)]
pub struct SignedCancel {
    pub op_id: String,
    pub timestamp: u64,
    pub nonce: String,
    pub signature: String,
    pub body: Vec<u8>,
}

impl SignedCancel {
    fn sig(&self) -> CancelSig<'_> {
        CancelSig {
            timestamp: self.timestamp,
            nonce: &self.nonce,
            signature: &self.signature,
        }
    }

    /// Reads the headers; `get` looks one up by name. `None` when the request is not signed.
    pub fn from_headers<'a>(
        op_id: &str,
        body: &[u8],
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Option<Result<SignedCancel, CancelError>> {
        let signature = get(H_SIGNATURE)?;
        let bad =
            |h: &str| CancelError::Auth(format!("a signed cancel without a valid {h} header"));
        Some((|| {
            if get(H_OP) != Some(op_id) {
                return Err(bad(H_OP));
            }
            let timestamp = get(H_TIMESTAMP)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(H_TIMESTAMP))?;
            let nonce = get(H_NONCE)
                .filter(|n| crate::handoff::valid_nonce(n))
                .ok_or_else(|| bad(H_NONCE))?;
            Ok(SignedCancel {
                op_id: op_id.to_string(),
                timestamp,
                nonce: nonce.to_string(),
                signature: signature.to_string(),
                body: body.to_vec(),
            })
        })())
    }
}

/// What answers `POST /api/v1/ops/{id}/cancel` on one instance: it hands the cancel to the local
/// actor that owns the operation, or forwards it (signed, once) to the instance that does.
pub struct Canceller {
    pub book: OpBook,
    pub http: reqwest::Client,
    pub keys: Keys,
    /// The roles this instance plays and the application each lives in.
    pub me: Vec<(Role, String)>,
    pub source: Option<Recipient<Cancel>>,
    pub helper: Option<Recipient<Cancel>>,
    /// Nonces of the forwarded cancels taken, with their timestamps, for [`MAX_SKEW`] each.
    nonces: Mutex<HashMap<String, u64>>,
}

/// How long a cancel that reached the Source while it hands the operation to MigHelper waits for
/// that handoff to settle before it is forwarded (a handoff gives up after 90 s).
const HANDOFF_SETTLE: Duration = Duration::from_secs(100);

impl Canceller {
    pub fn new(book: OpBook, keys: Keys, me: Vec<(Role, String)>) -> Canceller {
        Canceller {
            book,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client with default settings builds"),
            keys,
            me,
            source: None,
            helper: None,
            nonces: Mutex::default(),
        }
    }

    fn plays(&self, role: Role) -> bool {
        self.me.iter().any(|(r, _)| *r == role)
    }

    /// A person's cancel (already authenticated, CSRF checked): to the owner, here or elsewhere.
    pub async fn from_user(&self, op_id: &str, by: Cancelled) -> Result<Cancelled, CancelError> {
        let deadline = tokio::time::Instant::now() + HANDOFF_SETTLE;
        loop {
            let op = self.known(op_id)?;
            if op.state.is_running() && self.plays(op.owner) {
                match self.deliver(&op, by.clone()).await {
                    // The Source is handing the operation to MigHelper: wait until its journal
                    // says how that went, then ask the new owner.
                    Err(CancelError::Moved) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(CancelError::Moved) => {
                        return Err(CancelError::Unreachable(format!(
                            "operation {op_id} is being handed to MigHelper; cancel it at {}/ops/{op_id}",
                            op.plan.helper_url
                        )))
                    }
                    other => return other,
                }
            }
            if !op.state.is_running() || op.owner == Role::Target {
                return Err(too_late(&op));
            }
            return self.forward(&op, &by).await;
        }
    }

    fn known(&self, op_id: &str) -> Result<Op, CancelError> {
        self.book.get(op_id).ok_or_else(|| {
            CancelError::NotFound(format!(
                "no operation {op_id} here; cancel it on the MIG that started it, or on MigHelper while it copies"
            ))
        })
    }

    /// To the local actor that owns `op`.
    async fn deliver(&self, op: &Op, by: Cancelled) -> Result<Cancelled, CancelError> {
        let to = match op.owner {
            Role::Source => self.source.as_ref(),
            Role::Helper => self.helper.as_ref(),
            Role::Target => return Err(too_late(op)),
        };
        let Some(to) = to else {
            return Err(CancelError::Conflict(
                "this instance does not run operations".into(),
            ));
        };
        let msg = Cancel {
            op_id: op.id.clone(),
            by,
        };
        to.send(msg)
            .await
            .map_err(|e| CancelError::Unreachable(format!("the actor is gone: {e}")))?
    }

    /// Sends the cancel to the owner that `op` names, signed for it, and returns its answer.
    async fn forward(&self, op: &Op, by: &Cancelled) -> Result<Cancelled, CancelError> {
        let key = self.keys.get(&op.id).ok_or_else(|| {
            CancelError::NotFound(format!(
                "this instance holds no key for operation {}",
                op.id
            ))
        })?;
        let (url, role, app) = owner_of(op);
        let body = serde_json::to_vec(by).expect("serializes");
        let nonce = crate::handoff::nonce();
        let (ts, sig) = key.sign_cancel(&op.id, &nonce, (role, &app), &body);
        let target = format!("{url}{}", crate::api::cancel(&op.id));
        tracing::info!(op_id = %op.id, to = %target, "forwarding a cancel to the instance that drives the operation");
        let r = self
            .http
            .post(&target)
            .timeout(Duration::from_secs(20))
            .header("content-type", "application/json")
            .header(H_OP, &op.id)
            .header(H_TIMESTAMP, ts.to_string())
            .header(H_NONCE, &nonce)
            .header(H_SIGNATURE, sig)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                CancelError::Unreachable(format!(
                    "the instance that drives operation {} ({url}) did not answer: {e}",
                    op.id
                ))
            })?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        if status.is_success() {
            return serde_json::from_value(v["cancelled"].clone()).map_err(|e| {
                CancelError::Unreachable(format!("{url} answered without who cancelled: {e}"))
            });
        }
        let text = v["error"].as_str().unwrap_or("no reason given").to_string();
        Err(match status.as_u16() {
            404 => CancelError::NotFound(text),
            409 => CancelError::Conflict(text),
            400 => CancelError::Bad(text),
            401 | 403 => CancelError::Auth(format!("{url} refused the forwarded cancel: {text}")),
            _ => CancelError::Unreachable(format!("{url} answered {status}: {text}")),
        })
    }

    /// A cancel forwarded by another instance: checked (signature for this instance, fresh, never
    /// seen), then given to the local owner. Never forwarded again.
    pub async fn from_peer(&self, s: SignedCancel) -> Result<Cancelled, CancelError> {
        let op = self.known(&s.op_id)?;
        let key = self
            .keys
            .get(&s.op_id)
            .ok_or_else(|| CancelError::Auth("no key for that operation here".into()))?;
        let now = crate::auth::unix_now();
        let signed_for_me = self.me.iter().any(|(role, app)| {
            key.verify_cancel(&s.op_id, s.sig(), (*role, app), &s.body, now)
                .is_ok()
        });
        if !signed_for_me {
            return Err(CancelError::Auth(
                "the cancel is not signed for this instance and operation, or is stale".into(),
            ));
        }
        {
            let mut seen = self.nonces.lock().expect("nonce lock");
            seen.retain(|_, ts| now.abs_diff(*ts) <= MAX_SKEW.as_secs());
            if seen.insert(s.nonce.clone(), s.timestamp).is_some() {
                return Err(CancelError::Auth(
                    "a cancel replayed (its nonce was used)".into(),
                ));
            }
        }
        let by: Cancelled =
            serde_json::from_slice(&s.body).map_err(|e| CancelError::Bad(e.to_string()))?;
        if op.state.is_running() && self.plays(op.owner) {
            return match self.deliver(&op, by).await {
                Err(CancelError::Moved) => Err(CancelError::Conflict(
                    "the operation is being handed on; try again in a moment".into(),
                )),
                other => other,
            };
        }
        if !op.state.is_running() || op.owner == Role::Target {
            return Err(too_late(&op));
        }
        Err(CancelError::Conflict(format!(
            "this instance does not drive operation {} now",
            op.id
        )))
    }
}

#[cfg(test)]
mod tests;
