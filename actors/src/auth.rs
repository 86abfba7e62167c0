//! Authentication, in one place: the GUI's HTTP basic credentials (and, with the operations, the
//! signing of handoffs). Every secret comparison here runs in constant time.

use base64::Engine;
use subtle::ConstantTimeEq;

use crate::properties::Secret;

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
