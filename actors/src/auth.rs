//! Authentication, in one place: the GUI's HTTP basic credentials, the signing of handoffs
//! (`k_op = HMAC(K_app, op_id)`, HMAC-SHA256 over a header naming the operation, a timestamp, a
//! sequence number, who the handoff is for and which transition it is, then the body), and the
//! signed status answers a sender asks for when it does not know whether its handoff was taken.
//! Every secret comparison here runs in constant time.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Mac, SimpleHmac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::properties::Secret;

type HmacSha256 = SimpleHmac<Sha256>;

/// Headers of a signed handoff.
pub const H_OP: &str = "x-mig-op";
pub const H_TIMESTAMP: &str = "x-mig-timestamp";
pub const H_SEQ: &str = "x-mig-seq";
pub const H_SIGNATURE: &str = "x-mig-signature";
pub const H_TRANSITION: &str = "x-mig-transition";

/// Which way a handoff moves an operation. Signed, so a forward handoff cannot be replayed as a
/// roll-back or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Source to MigHelper, or MigHelper to the MIG of the application that runs at the end.
    Forward,
    /// MigHelper back to the source MIG after undoing the operation.
    RollBack,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Forward => "forward",
            Transition::RollBack => "roll-back",
        }
    }

    pub fn parse(s: &str) -> Option<Transition> {
        match s {
            "forward" => Some(Transition::Forward),
            "roll-back" => Some(Transition::RollBack),
            _ => None,
        }
    }
}

/// Who a handoff is for: the receiving actor's role and the application it lives in. Signed, so a
/// handoff captured on its way to one instance is refused by every other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    pub role: crate::op::Role,
    pub app: String,
    pub transition: Transition,
}

/// How far a handoff's timestamp may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

fn hmac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac
}

/// `K_app`: the application's handoff key, derived from its handoff secret (`handoff_key_file`),
/// which every MIG instance of the application shares through its config volume. It never leaves
/// the volume. It is not derived from the application's SSH key: MigHelper holds that key (it
/// must reach both grids), and it must not be able to sign for any operation but its own.
#[derive(Clone)]
pub struct AppKey([u8; 32]);

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppKey(***)")
    }
}

impl AppKey {
    /// Derives `K_app` from the handoff secret file, creating the file (256 random bits, mode
    /// 0600 from the start, never readable by others) when the config volume has none yet. A copy
    /// of the application carries the file with its config volume, so its MIG derives the same key.
    pub fn load_or_create(path: &Path) -> std::io::Result<AppKey> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                let secret = format!(
                    "{:032x}{:032x}\n",
                    rand::random::<u128>(),
                    rand::random::<u128>()
                );
                f.write_all(secret.as_bytes())?;
                f.sync_all()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let bytes = std::fs::read(path)?;
        let secret = bytes.trim_ascii();
        if secret.len() < 32 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds fewer than 32 bytes: not a handoff secret",
                    path.display()
                ),
            ));
        }
        Ok(AppKey::from_secret_bytes(secret))
    }

    pub fn from_secret_bytes(secret: &[u8]) -> AppKey {
        let out = hmac(b"mig K_app v2", &[secret]).finalize().into_bytes();
        AppKey(out.into())
    }

    /// `k_op = HMAC(K_app, op_id)`: the key for one operation only.
    pub fn op_key(&self, op_id: &str) -> OpKey {
        OpKey(
            hmac(&self.0, &[op_id.as_bytes()])
                .finalize()
                .into_bytes()
                .into(),
        )
    }
}

/// `k_op`: signs and checks the handoffs of one operation, and no other.
#[derive(Clone, PartialEq, Eq)]
pub struct OpKey([u8; 32]);

impl std::fmt::Debug for OpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpKey(***)")
    }
}

/// Why a handoff was refused. None of these change any state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffAuthError {
    #[error("handoff without a valid {0} header")]
    Missing(&'static str),
    #[error("handoff timestamp {ts} is more than {} s from this clock", MAX_SKEW.as_secs())]
    Stale { ts: u64 },
    #[error("handoff sequence {seq} was already used (last accepted: {last})")]
    Replay { seq: u64, last: u64 },
    #[error("handoff signature does not match (another operation's key, another receiver or transition, or a changed body)")]
    BadSignature,
    #[error("handoff is for operation {header} but its body is for {body}")]
    OpMismatch { header: String, body: String },
}

/// The signing headers of one handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub op_id: String,
    pub timestamp: u64,
    pub seq: u64,
    pub transition: Transition,
    pub signature: String,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl OpKey {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<OpKey> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        }
        Some(OpKey(out))
    }

    fn mac(&self, op_id: &str, timestamp: u64, seq: u64, to: &Audience, body: &[u8]) -> HmacSha256 {
        // v2: v1 did not name the receiver or the transition (see docs/architecture.md).
        let head = format!(
            "mig-handoff-v2\n{op_id}\n{timestamp}\n{seq}\n{}\n{}\n{}\n",
            to.role.actor(),
            to.app,
            to.transition.as_str()
        );
        hmac(&self.0, &[head.as_bytes(), body])
    }

    /// Signs `body` (the handoff JSON) for `op_id` with sequence number `seq`, for `to`, now.
    pub fn sign(&self, op_id: &str, seq: u64, to: &Audience, body: &[u8]) -> Signed {
        let timestamp = unix_now();
        let tag = self
            .mac(op_id, timestamp, seq, to, body)
            .finalize()
            .into_bytes();
        Signed {
            op_id: op_id.to_string(),
            timestamp,
            seq,
            transition: to.transition,
            signature: hex(&tag),
        }
    }

    /// Checks a handoff received as `me` (this instance's role and application; the transition is
    /// the one the handoff says): signature (constant time), freshness, and that `seq` is newer
    /// than the last one accepted for this operation.
    pub fn verify(
        &self,
        s: &Signed,
        me: &Audience,
        body: &[u8],
        last_seq: u64,
        now: u64,
    ) -> Result<(), HandoffAuthError> {
        let sig = OpKey::from_hex(&s.signature).ok_or(HandoffAuthError::Missing(H_SIGNATURE))?;
        self.mac(&s.op_id, s.timestamp, s.seq, me, body)
            .verify_slice(&sig.0)
            .map_err(|_| HandoffAuthError::BadSignature)?;
        if now.abs_diff(s.timestamp) > MAX_SKEW.as_secs() {
            return Err(HandoffAuthError::Stale { ts: s.timestamp });
        }
        if s.seq <= last_seq {
            return Err(HandoffAuthError::Replay {
                seq: s.seq,
                last: last_seq,
            });
        }
        Ok(())
    }

    /// Signs a status answer (its JSON). The domain differs from a handoff's, so an answer can
    /// never pass for a handoff.
    pub fn sign_status(&self, body: &[u8]) -> String {
        hex(&hmac(&self.0, &[b"mig-status-v1\n", body])
            .finalize()
            .into_bytes())
    }

    /// Checks a status answer's signature (constant time).
    pub fn verify_status(&self, body: &[u8], signature: &str) -> bool {
        OpKey::from_hex(signature).is_some_and(|sig| {
            hmac(&self.0, &[b"mig-status-v1\n", body])
                .verify_slice(&sig.0)
                .is_ok()
        })
    }
}

/// Headers of a forwarded cancel: the op (`x-mig-op`), its timestamp (`x-mig-timestamp`) and
/// signature (`x-mig-signature`) as a handoff's, and a fresh nonce instead of a sequence number.
pub const H_NONCE: &str = "x-mig-nonce";

/// A forwarded cancel's stamp: when it was signed, its nonce, and the signature.
#[derive(Debug, Clone, Copy)]
pub struct CancelSig<'a> {
    pub timestamp: u64,
    pub nonce: &'a str,
    pub signature: &'a str,
}

impl OpKey {
    fn cancel_mac(
        &self,
        op_id: &str,
        timestamp: u64,
        nonce: &str,
        to: (crate::op::Role, &str),
        body: &[u8],
    ) -> HmacSha256 {
        // Its own domain: a cancel can never pass for a handoff or a status answer.
        let head = format!(
            "mig-cancel-v1\n{op_id}\n{timestamp}\n{nonce}\n{}\n{}\n",
            to.0.actor(),
            to.1
        );
        hmac(&self.0, &[head.as_bytes(), body])
    }

    /// Signs a forwarded cancel of `op_id` (its JSON `body`) for the actor `to` (role and
    /// application) with a fresh `nonce`, now; returns the timestamp and the signature.
    pub fn sign_cancel(
        &self,
        op_id: &str,
        nonce: &str,
        to: (crate::op::Role, &str),
        body: &[u8],
    ) -> (u64, String) {
        let ts = unix_now();
        let tag = self
            .cancel_mac(op_id, ts, nonce, to, body)
            .finalize()
            .into_bytes();
        (ts, hex(&tag))
    }

    /// Checks a forwarded cancel received by `me`: signature (constant time) and freshness. The
    /// caller also refuses a nonce it has seen (see `cancel::Nonces`).
    pub fn verify_cancel(
        &self,
        op_id: &str,
        sig: CancelSig<'_>,
        me: (crate::op::Role, &str),
        body: &[u8],
        now: u64,
    ) -> Result<(), HandoffAuthError> {
        let tag = OpKey::from_hex(sig.signature).ok_or(HandoffAuthError::Missing(H_SIGNATURE))?;
        self.cancel_mac(op_id, sig.timestamp, sig.nonce, me, body)
            .verify_slice(&tag.0)
            .map_err(|_| HandoffAuthError::BadSignature)?;
        if now.abs_diff(sig.timestamp) > MAX_SKEW.as_secs() {
            return Err(HandoffAuthError::Stale { ts: sig.timestamp });
        }
        Ok(())
    }

    /// What MigHelper keeps of the GUI password to check a cancel with: a MAC under this
    /// operation's key, so the password itself never goes into MigHelper's `env`.
    pub fn password_mac(&self, password: &str) -> String {
        hex(
            &hmac(&self.0, &[b"mig-gui-password-v1\n", password.as_bytes()])
                .finalize()
                .into_bytes(),
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Signed {
    /// The headers to send.
    pub fn headers(&self) -> [(&'static str, String); 5] {
        [
            (H_OP, self.op_id.clone()),
            (H_TIMESTAMP, self.timestamp.to_string()),
            (H_SEQ, self.seq.to_string()),
            (H_TRANSITION, self.transition.as_str().to_string()),
            (H_SIGNATURE, self.signature.clone()),
        ]
    }

    /// Reads the headers back; `get` looks one up by name.
    pub fn from_headers<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Signed, HandoffAuthError> {
        let op_id = get(H_OP)
            .filter(|v| crate::op::valid_id(v))
            .ok_or(HandoffAuthError::Missing(H_OP))?;
        let timestamp = get(H_TIMESTAMP)
            .and_then(|v| v.parse().ok())
            .ok_or(HandoffAuthError::Missing(H_TIMESTAMP))?;
        let seq = get(H_SEQ)
            .and_then(|v| v.parse().ok())
            .ok_or(HandoffAuthError::Missing(H_SEQ))?;
        let transition = get(H_TRANSITION)
            .and_then(Transition::parse)
            .ok_or(HandoffAuthError::Missing(H_TRANSITION))?;
        let signature = get(H_SIGNATURE).ok_or(HandoffAuthError::Missing(H_SIGNATURE))?;
        Ok(Signed {
            op_id: op_id.to_string(),
            timestamp,
            seq,
            transition,
            signature: signature.to_string(),
        })
    }
}

/// The GUI credentials; `None` username means no authentication (the appliance's rule: an empty
/// `username` turns authentication off, even if `password` is set).
#[derive(Debug, Clone)]
pub struct GuiCredentials {
    username: String,
    password: Password,
}

/// How the password is checked: as given (`mig serve`), or by its MAC under the operation's key
/// (MigHelper, which is handed only the MAC).
#[derive(Clone)]
enum Password {
    Plain(Secret),
    Mac(OpKey, String),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl GuiCredentials {
    pub fn new(username: &str, password: &Secret) -> Option<Self> {
        (!username.is_empty()).then(|| GuiCredentials {
            username: username.to_string(),
            password: Password::Plain(password.clone()),
        })
    }

    /// MigHelper's copy: the username and the password's MAC under `key` ([`OpKey::password_mac`]).
    pub fn from_mac(username: &str, key: &OpKey, mac: &str) -> Option<Self> {
        (!username.is_empty()).then(|| GuiCredentials {
            username: username.to_string(),
            password: Password::Mac(key.clone(), mac.to_string()),
        })
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    /// What to hand MigHelper: the username and the password's MAC under `key`.
    pub fn for_helper(&self, key: &OpKey) -> (String, String) {
        let mac = match &self.password {
            Password::Plain(p) => key.password_mac(p.expose()),
            Password::Mac(_, m) => m.clone(),
        };
        (self.username.clone(), mac)
    }

    /// Checks an `Authorization` header value (`Basic base64(user:pass)`).
    pub fn check_header(&self, header: Option<&str>) -> bool {
        let Some(encoded) = header.and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        }) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
        // Both compared, always, so the time taken does not tell which one was wrong.
        let user_ok = user.ct_eq(self.username.as_bytes());
        let pass_ok = match &self.password {
            Password::Plain(p) => pass.ct_eq(p.expose().as_bytes()),
            Password::Mac(key, mac) => {
                let given = key.password_mac(&String::from_utf8_lossy(pass));
                given.as_bytes().ct_eq(mac.as_bytes())
            }
        };
        (user_ok & pass_ok).into()
    }
}

/// The username an HTTP basic `Authorization` header names (never its password), for the audit
/// log; `None` when the header is absent or not basic auth.
pub fn basic_user(header: Option<&str>) -> Option<String> {
    let (scheme, rest) = header?.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(String::from_utf8_lossy(&decoded[..colon]).into_owned())
}

#[cfg(test)]
mod tests;
