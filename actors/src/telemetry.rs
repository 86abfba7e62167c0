//! How one operation's spans, in three processes on two grids, join one distributed trace.
//!
//! The operation carries a W3C trace id from its start. Each actor's `op` span gets an id derived
//! from that trace id and its role ([`Op::span_id`]), and its parent is the role before it
//! (Source → MigHelper → Target), so every instance can name its own span and its parent without
//! asking the others; the `traceparent` header of a handoff names the sender's span. Deriving the
//! ids keeps the actors free of OpenTelemetry: the `mig` binary, when it exports spans (OTLP),
//! installs a [`Linker`] that gives the span those ids.

use std::sync::OnceLock;

use crate::op::{Op, Role};

/// The OpenTelemetry identity a span should take: hex ids as in a `traceparent` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanIds {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits; `None`: any new id.
    pub span_id: Option<String>,
    /// The span this one continues (16 hex digits), in this process or another; `None`: the root.
    pub parent: Option<String>,
}

impl SpanIds {
    /// The ids a W3C `traceparent` header (`00-TRACE-PARENT-FLAGS`) names as the parent of a new
    /// span; `None` when the header is malformed.
    pub fn child_of(traceparent: &str) -> Option<SpanIds> {
        let mut parts = traceparent.split('-');
        let (v, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let ok = v == "00"
            && parts.next().is_none()
            && hex(trace, 32)
            && hex(parent, 16)
            && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0')
            && parent.bytes().any(|b| b != b'0');
        ok.then(|| SpanIds {
            trace_id: trace.to_ascii_lowercase(),
            span_id: None,
            parent: Some(parent.to_ascii_lowercase()),
        })
    }
}

/// Gives a new span the OpenTelemetry ids. Called once per span, before the span is entered.
pub type Linker = fn(&tracing::Span, &SpanIds);

static LINKER: OnceLock<Linker> = OnceLock::new();

/// Installs the process's linker; only the first call counts (false for later ones).
pub fn install(linker: Linker) -> bool {
    LINKER.set(linker).is_ok()
}

/// Passes `span` and its ids to the installed linker, if any.
pub fn link(span: &tracing::Span, ids: &SpanIds) {
    if let Some(l) = LINKER.get() {
        l(span, ids);
    }
}

/// The span in which `role` drives `op`: the operation id, trace id, actor and instance on every
/// line logged in it. It is a root for `tracing` (not a child of the daemon's span), since in the
/// exported trace it belongs to the operation, not to the process that happens to run it.
pub fn op_span(role: Role, op: &Op) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "op",
        op_id = %op.id,
        trace_id = %op.trace_id,
        actor = role.actor(),
        instance = %op.instance(),
    );
    link(
        &span,
        &SpanIds {
            trace_id: op.trace_id.clone(),
            span_id: Some(op.span_id(role)),
            parent: role.previous().map(|p| op.span_id(p)),
        },
    );
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_names_the_parent_and_a_bad_one_is_ignored() {
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        let ids = SpanIds::child_of(&format!("00-{t}-00f067aa0ba902b7-01")).unwrap();
        assert_eq!(ids.trace_id, t);
        assert_eq!(ids.parent.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(ids.span_id, None);
        for bad in [
            String::new(),
            "00-abc-00f067aa0ba902b7-01".into(),
            format!("01-{t}-00f067aa0ba902b7-01"),
            format!("00-{t}-0000000000000000-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{t}-00f067aa0ba902b7-01-extra"),
            format!("00-{t}-00f067aa0ba902bz-01"),
        ] {
            assert_eq!(SpanIds::child_of(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_role_continues_the_one_before_it_and_handoffs_name_the_sender() {
        let mut op = crate::op::tests::sample_op();
        let ids: Vec<String> = [Role::Source, Role::Helper, Role::Target]
            .iter()
            .map(|r| op.span_id(*r))
            .collect();
        assert!(ids.iter().all(|i| i.len() == 16 && i != "0000000000000000"));
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        assert_eq!(Role::Source.previous(), None);
        assert_eq!(Role::Helper.previous(), Some(Role::Source));
        assert_eq!(Role::Target.previous(), Some(Role::Helper));
        // A handoff to MigHelper (op.owner already the receiver) names the Source's span.
        op.owner = Role::Helper;
        let tp = SpanIds::child_of(&op.traceparent()).unwrap();
        assert_eq!(tp.trace_id, op.trace_id);
        assert_eq!(tp.parent.as_deref(), Some(ids[0].as_str()));
        op.owner = Role::Target;
        let tp = SpanIds::child_of(&op.traceparent()).unwrap();
        assert_eq!(tp.parent.as_deref(), Some(ids[1].as_str()));
        // Another operation: other ids.
        let other = crate::op::tests::sample_op();
        assert_ne!(other.span_id(Role::Source), ids[0]);
    }
}
