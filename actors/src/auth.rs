//! Authentication, in one place: the GUI's HTTP basic credentials and the signing of handoffs
//! (`k_op = HMAC(K_app, op_id)`, HMAC-SHA256 over a header naming the operation, a timestamp and a
//! sequence number, then the body). Every secret comparison here runs in constant time.

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

/// How far a handoff's timestamp may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

fn hmac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac
}

/// `K_app`: the application's handoff key, derived from its private key, which every MIG instance
/// of the application shares through its config volume. It never leaves the volume.
#[derive(Clone)]
pub struct AppKey([u8; 32]);

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppKey(***)")
    }
}

impl AppKey {
    /// Derives `K_app` from the private key file's contents.
    pub fn from_private_key_file(path: &Path) -> std::io::Result<AppKey> {
        let bytes = std::fs::read(path)?;
        Ok(AppKey::from_private_key_bytes(bytes.trim_ascii()))
    }

    pub fn from_private_key_bytes(key: &[u8]) -> AppKey {
        let out = hmac(b"mig K_app v1", &[key]).finalize().into_bytes();
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
    #[error("handoff signature does not match (another operation's key, or a changed body)")]
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

    fn mac(&self, op_id: &str, timestamp: u64, seq: u64, body: &[u8]) -> HmacSha256 {
        let head = format!("mig-handoff-v1\n{op_id}\n{timestamp}\n{seq}\n");
        hmac(&self.0, &[head.as_bytes(), body])
    }

    /// Signs `body` (the handoff JSON) for `op_id` with sequence number `seq`, now.
    pub fn sign(&self, op_id: &str, seq: u64, body: &[u8]) -> Signed {
        let timestamp = unix_now();
        let tag = self
            .mac(op_id, timestamp, seq, body)
            .finalize()
            .into_bytes();
        Signed {
            op_id: op_id.to_string(),
            timestamp,
            seq,
            signature: tag.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// Checks a handoff: signature (constant time), freshness, and that `seq` is newer than the
    /// last one accepted for this operation.
    pub fn verify(
        &self,
        s: &Signed,
        body: &[u8],
        last_seq: u64,
        now: u64,
    ) -> Result<(), HandoffAuthError> {
        let sig = OpKey::from_hex(&s.signature).ok_or(HandoffAuthError::Missing(H_SIGNATURE))?;
        self.mac(&s.op_id, s.timestamp, s.seq, body)
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
}

impl Signed {
    /// The headers to send.
    pub fn headers(&self) -> [(&'static str, String); 4] {
        [
            (H_OP, self.op_id.clone()),
            (H_TIMESTAMP, self.timestamp.to_string()),
            (H_SEQ, self.seq.to_string()),
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
        let signature = get(H_SIGNATURE).ok_or(HandoffAuthError::Missing(H_SIGNATURE))?;
        Ok(Signed {
            op_id: op_id.to_string(),
            timestamp,
            seq,
            signature: signature.to_string(),
        })
    }
}

/// The GUI credentials; `None` username means no authentication (the appliance's rule: an empty
/// `username` turns authentication off, even if `password` is set).
#[derive(Debug, Clone)]
pub struct GuiCredentials {
    username: String,
    password: Secret,
}

impl GuiCredentials {
    pub fn new(username: &str, password: &Secret) -> Option<Self> {
        (!username.is_empty()).then(|| GuiCredentials {
            username: username.to_string(),
            password: password.clone(),
        })
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
        let pass_ok = pass.ct_eq(self.password.expose().as_bytes());
        (user_ok & pass_ok).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    fn keys() -> (AppKey, String, OpKey) {
        let app = AppKey::from_private_key_bytes(b"-----BEGIN OPENSSH PRIVATE KEY----- test");
        let id = crate::op::new_id();
        let k = app.op_key(&id);
        (app, id, k)
    }

    #[test]
    fn a_signed_handoff_verifies_once() {
        let (_, id, k) = keys();
        let s = k.sign(&id, 1, b"{\"op\":1}");
        assert_eq!(k.verify(&s, b"{\"op\":1}", 0, unix_now()), Ok(()));
        // The same message again is a replay.
        assert_eq!(
            k.verify(&s, b"{\"op\":1}", 1, unix_now()),
            Err(HandoffAuthError::Replay { seq: 1, last: 1 })
        );
    }

    #[test]
    fn tampered_body_wrong_key_other_op_and_stale_are_refused() {
        let (app, id, k) = keys();
        let s = k.sign(&id, 2, b"body");
        assert_eq!(
            k.verify(&s, b"bodY", 0, unix_now()),
            Err(HandoffAuthError::BadSignature)
        );
        let other_app = AppKey::from_private_key_bytes(b"another key");
        assert_eq!(
            other_app.op_key(&id).verify(&s, b"body", 0, unix_now()),
            Err(HandoffAuthError::BadSignature)
        );
        // k_op of another operation cannot sign for this one.
        let other_op = crate::op::new_id();
        let forged = app.op_key(&other_op).sign(&id, 2, b"body");
        assert_eq!(
            k.verify(&forged, b"body", 0, unix_now()),
            Err(HandoffAuthError::BadSignature)
        );
        // A changed header (sequence) breaks the signature too.
        let bumped = Signed {
            seq: 3,
            ..s.clone()
        };
        assert_eq!(
            k.verify(&bumped, b"body", 0, unix_now()),
            Err(HandoffAuthError::BadSignature)
        );
        let later = unix_now() + MAX_SKEW.as_secs() + 5;
        assert_eq!(
            k.verify(&s, b"body", 0, later),
            Err(HandoffAuthError::Stale { ts: s.timestamp })
        );
    }

    #[test]
    fn headers_round_trip_and_op_keys_hex() {
        let (_, id, k) = keys();
        let s = k.sign(&id, 7, b"x");
        let h = s.headers();
        let back =
            Signed::from_headers(|n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str()))
                .unwrap();
        assert_eq!(back, s);
        assert_eq!(OpKey::from_hex(&k.to_hex()), Some(k.clone()));
        assert_eq!(OpKey::from_hex("zz"), None);
        assert!(!format!("{k:?}").contains(&k.to_hex()[..8]));
        assert_eq!(
            Signed::from_headers(|n| if n == H_OP { Some("../x") } else { Some("1") }),
            Err(HandoffAuthError::Missing(H_OP))
        );
    }

    #[test]
    fn an_empty_username_means_no_authentication() {
        assert!(GuiCredentials::new("", &Secret::new("set anyway")).is_none());
    }

    #[test]
    fn only_the_right_pair_passes() {
        let c = GuiCredentials::new("ops", &Secret::new("s3cret:with colon")).unwrap();
        assert!(c.check_header(Some(&header("ops", "s3cret:with colon"))));
        assert!(c.check_header(Some(
            &header("ops", "s3cret:with colon").replace("Basic", "basic")
        )));
        assert!(!c.check_header(Some(&header("ops", "s3cret"))));
        assert!(!c.check_header(Some(&header("op", "s3cret:with colon"))));
        assert!(!c.check_header(Some(&header("", ""))));
        assert!(!c.check_header(None));
        assert!(!c.check_header(Some("Bearer abc")));
        assert!(!c.check_header(Some("Basic !!!notbase64")));
        assert!(!c.check_header(Some("Basic")));
    }
}
