//! Handing an operation to the next actor: `POST /api/v1/handoff`, signed with `k_op`, and the
//! `env` property that carries what MigHelper needs.
//!
//! The receiver answers 200 only once it has journalled the operation; the sender counts the
//! handoff as done only then. A sender that gets no answer it can trust asks the receiver for a
//! signed status ([`StatusQuery`]) before it does anything else: a lost 200 must not make it undo
//! what the receiver is already driving.

use std::time::Duration;

use actix::Message;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::auth::{Audience, HandoffAuthError, OpKey, Signed, Transition};
use crate::book::OpBook;
use crate::op::{Op, OpState, Role};

/// The environment variable through which gridctl's MigHelper template passes the `env` property.
pub const HELPER_ENV_VAR: &str = "MIG_HELPER_ENV";

/// How long a sender keeps trying to reach the next instance (it may still be starting).
pub const SEND_PATIENCE: Duration = Duration::from_secs(90);

/// A handoff as it arrived: the signing headers and the raw body they sign.
#[derive(Message)]
#[rtype(result = "Result<(), HandoffError>")]
pub struct Handoff {
    pub signed: Signed,
    pub body: Vec<u8>,
}

/// Why a handoff was not accepted. Nothing is changed in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(transparent)]
    Auth(#[from] HandoffAuthError),
    #[error("bad handoff: {0}")]
    Bad(String),
    #[error("this instance cannot take the operation: {0}")]
    Refused(String),
    #[error("cannot journal the operation: {0}")]
    Journal(String),
}

impl HandoffError {
    pub fn status(&self) -> u16 {
        match self {
            HandoffError::Auth(_) => 401,
            HandoffError::Bad(_) => 400,
            HandoffError::Refused(_) => 409,
            HandoffError::Journal(_) => 500,
        }
    }
}

/// Checks a handoff against `key`, received by `me` (this actor's role and application), and what
/// `book` already knows, and returns the operation it carries. The caller journals it before
/// answering.
pub fn accept(
    h: &Handoff,
    key: &OpKey,
    me: (Role, &str),
    book: &OpBook,
) -> Result<Op, HandoffError> {
    let known = book.get(&h.signed.op_id);
    let last_seq = known.as_ref().map_or(0, |op| op.seq);
    let audience = Audience {
        role: me.0,
        app: me.1.to_string(),
        transition: h.signed.transition,
    };
    key.verify(
        &h.signed,
        &audience,
        &h.body,
        last_seq,
        crate::auth::unix_now(),
    )?;
    // An ended operation stays ended, whatever a later message says.
    if let Some(op) = known.filter(|op| !op.state.is_running()) {
        return Err(HandoffError::Refused(format!(
            "operation {} has already ended",
            op.id
        )));
    }
    let mut op: Op =
        serde_json::from_slice(&h.body).map_err(|e| HandoffError::Bad(e.to_string()))?;
    if op.id != h.signed.op_id {
        return Err(HandoffAuthError::OpMismatch {
            header: h.signed.op_id.clone(),
            body: op.id,
        }
        .into());
    }
    op.check_shape().map_err(HandoffError::Bad)?;
    if !op.state.is_running() {
        return Err(HandoffError::Refused(format!(
            "operation {} has already ended",
            op.id
        )));
    }
    if op.rolling_back != (h.signed.transition == Transition::RollBack) {
        return Err(HandoffError::Bad(format!(
            "a {} handoff must {}carry a roll-back",
            h.signed.transition.as_str(),
            if op.rolling_back { "not " } else { "" }
        )));
    }
    op.seq = h.signed.seq;
    op.trace(
        "handoff",
        format!("handoff accepted (seq {})", op.seq),
        None,
        None,
    );
    Ok(op)
}

/// Who sends a handoff that makes `op.owner` the owner: the actor before it in the chain.
fn previous_owner(op: &Op) -> Role {
    match op.owner {
        Role::Source | Role::Helper => Role::Source,
        Role::Target => Role::Helper,
    }
}

/// Who receives `op` when it is handed to `op.owner`: the role, the application it lives in, and
/// the transition. The receiver checks the same from its side.
pub fn audience(op: &Op) -> Audience {
    let (app, transition) = match (op.owner, op.rolling_back, op.kind) {
        (Role::Helper, _, _) | (Role::Source, _, _) => {
            (op.plan.helper_app.clone(), Transition::Forward)
        }
        (Role::Target, true, _) => (op.plan.source_app.clone(), Transition::RollBack),
        (Role::Target, false, crate::op::Kind::Migrate) => {
            (op.plan.target_app.clone(), Transition::Forward)
        }
        (Role::Target, false, crate::op::Kind::Snapshot) => {
            (op.plan.source_app.clone(), Transition::Forward)
        }
    };
    Audience {
        role: op.owner,
        app,
        transition,
    }
}

/// Why a handoff was not taken.
#[derive(Debug, Clone)]
pub enum SendError {
    /// The receiver answered and refused it (4xx): final for this message.
    Refused(String),
    /// No answer, or not a usable one, within [`SEND_PATIENCE`].
    Unanswered(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Refused(e) | SendError::Unanswered(e) => f.write_str(e),
        }
    }
}

/// Sends `op` (already carrying its new owner and a fresh sequence number, journalled by the
/// caller) to `base_url`'s handoff route, signed for its receiver, retrying while the receiver
/// cannot be reached. A refusal (4xx but 408) is final.
pub async fn send(
    http: &reqwest::Client,
    base_url: &str,
    key: &OpKey,
    op: &mut Op,
) -> Result<(), SendError> {
    op.version += 1;
    let to = audience(op);
    // The sender's instance names the event: the owner changes only on the receiving side.
    let mut sent = op.clone();
    sent.owner = previous_owner(op);
    sent.trace(
        "handoff",
        format!("handoff to {base_url} (seq {})", op.seq),
        None,
        None,
    );
    op.trace = sent.trace;
    let body = serde_json::to_vec(op).expect("an Op always serializes");
    let url = format!("{base_url}{}", crate::api::HANDOFF.path);
    let deadline = tokio::time::Instant::now() + SEND_PATIENCE;
    let mut last_err = String::new();
    while tokio::time::Instant::now() < deadline {
        // Signed afresh each try so the timestamp stays current.
        let signed = key.sign(&op.id, op.seq, &to, &body);
        let mut req = http
            .post(&url)
            .timeout(Duration::from_secs(30))
            .body(body.clone());
        req = req
            .header("content-type", "application/json")
            .header("traceparent", op.traceparent());
        for (k, v) in signed.headers() {
            req = req.header(k, v);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(to = %url, seq = op.seq, "handoff accepted");
                return Ok(());
            }
            // 408: the receiver's server gave up waiting for the request (a link that drops
            // it), so nothing was taken: not a refusal, try again (issue 14's partition).
            Ok(r) if r.status().is_client_error() && r.status() != 408 => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                return Err(SendError::Refused(crate::op::bounded(&format!(
                    "{url} refused the handoff ({status}): {text}"
                ))));
            }
            Ok(r) => last_err = format!("{url} answered {}", r.status()),
            Err(e) => last_err = format!("{url}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(SendError::Unanswered(format!(
        "could not hand the operation over within {} s: {last_err}",
        SEND_PATIENCE.as_secs()
    )))
}

/// A question to the actor of this instance that would own an operation: do you, and since which
/// handoff? Asked with a fresh nonce, answered signed with `k_op`, so the asker can trust the
/// answer although the route needs no credentials.
#[derive(Message)]
#[rtype(result = "Option<SignedStatus>")]
pub struct StatusQuery {
    pub op_id: String,
    pub nonce: String,
}

/// What an instance says of one operation, with who says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub op_id: String,
    pub nonce: String,
    /// The answering actor and the application it lives in.
    pub role: Role,
    pub app: String,
    /// Whether this instance knows the operation at all; the rest is empty when it does not.
    pub known: bool,
    pub owner: Option<Role>,
    pub seq: u64,
    pub state: Option<OpState>,
    pub rolling_back: bool,
}

/// A status answer's JSON and its signature (`x-mig-signature`).
#[derive(Debug, Clone)]
pub struct SignedStatus {
    pub body: Vec<u8>,
    pub signature: String,
}

/// Answers a [`StatusQuery`] from `book`, as `me`, signed with `key`.
pub fn answer_status(
    book: &OpBook,
    key: &OpKey,
    me: (Role, &str),
    q: &StatusQuery,
) -> SignedStatus {
    let op = book.get(&q.op_id);
    let answer = StatusAnswer {
        op_id: q.op_id.clone(),
        nonce: q.nonce.clone(),
        role: me.0,
        app: me.1.to_string(),
        known: op.is_some(),
        owner: op.as_ref().map(|o| o.owner),
        seq: op.as_ref().map_or(0, |o| o.seq),
        state: op.as_ref().map(|o| o.state),
        rolling_back: op.as_ref().is_some_and(|o| o.rolling_back),
    };
    let body = serde_json::to_vec(&answer).expect("an answer serializes");
    let signature = key.sign_status(&body);
    SignedStatus { body, signature }
}

/// A nonce for a status query: 128 random bits as hex.
pub fn nonce() -> String {
    crate::op::new_id()
}

/// Whether `nonce` looks like one of ours (it is echoed into a signed answer).
pub fn valid_nonce(nonce: &str) -> bool {
    crate::op::valid_id(nonce)
}

/// What MigHelper needs, carried in its `env` property: the operation id, `k_op` (so it can sign
/// for this operation and no other), and the SSH credentials it uses on both grids (the
/// application's key and pinned host keys). Never logged; see the README's security section.
#[derive(Clone, Serialize, Deserialize)]
pub struct HelperEnv {
    pub op_id: String,
    pub k_op: String,
    pub private_key: String,
    pub known_hosts: String,
    /// Where the Source exports its spans: MigHelper's go there too, so the trace is whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// The source MIG's GUI username and its password's MAC under `k_op` (never the password):
    /// MigHelper asks for the same credentials before it takes a cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gui: Option<(String, String)>,
}

impl std::fmt::Debug for HelperEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelperEnv")
            .field("op_id", &self.op_id)
            .finish_non_exhaustive()
    }
}

impl HelperEnv {
    /// One token with no spaces or quotes, safe as a property value.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("serializes");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    pub fn decode(s: &str) -> Result<HelperEnv, String> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|e| format!("{HELPER_ENV_VAR} is not base64: {e}"))?;
        let env: HelperEnv = serde_json::from_slice(&json)
            .map_err(|e| format!("{HELPER_ENV_VAR} is not a helper environment: {e}"))?;
        if !crate::op::valid_id(&env.op_id) || OpKey::from_hex(&env.k_op).is_none() {
            return Err(format!(
                "{HELPER_ENV_VAR} holds a malformed operation id or key"
            ));
        }
        Ok(env)
    }

    pub fn op_key(&self) -> OpKey {
        OpKey::from_hex(&self.k_op).expect("checked in decode")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_env_round_trips_as_one_safe_token_and_hides_secrets() {
        let k = crate::auth::AppKey::from_secret_bytes(b"k").op_key("x");
        let env = HelperEnv {
            op_id: crate::op::new_id(),
            k_op: k.to_hex(),
            private_key: "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n".into(),
            known_hosts: "[127.0.1.1]:2222 ssh-ed25519 AAAA\n".into(),
            otlp_endpoint: Some("http://127.0.0.1:4318/v1/traces".into()),
            gui: None,
        };
        let token = env.encode();
        assert!(token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        let back = HelperEnv::decode(&token).unwrap();
        assert_eq!(back.op_key(), k);
        assert_eq!(back.private_key, env.private_key);
        assert_eq!(back.otlp_endpoint, env.otlp_endpoint);
        let dbg = format!("{env:?}");
        assert!(!dbg.contains("OPENSSH") && !dbg.contains(&env.k_op));
        assert!(HelperEnv::decode("not base64 !").is_err());
        assert!(HelperEnv::decode("e30").is_err());
    }
}
