//! The HTTP paths the instances call on one another, in one place for the senders here and the
//! server that routes them.

/// `POST`: a signed handoff.
pub const HANDOFF: &str = "/api/v1/handoff";

/// `GET …?nonce=HEX`: the signed status of one operation ([`crate::handoff::StatusQuery`]).
pub fn status(op_id: &str) -> String {
    format!("/api/v1/ops/{op_id}/status")
}

/// `POST`: cancel one operation before its cut-over ([`crate::cancel`]).
pub fn cancel(op_id: &str) -> String {
    format!("/api/v1/ops/{op_id}/cancel")
}
