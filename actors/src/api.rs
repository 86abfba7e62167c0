//! MIG's HTTP contract in one place: every route (method, path, who may call it), the operation's
//! public wire view ([`view`]) and the framing of its live stream. The server routes with this
//! table and asks it which requests skip the GUI credentials ([`is_public`]); the CLI client and
//! the actors build their URLs from it; the pages carry it to their scripts ([`page_contract`]),
//! which write no path of their own; and the browser tests' fake MIG serves the same handlers.
//! A path changes here or nowhere.

use std::time::Duration;

use crate::op::{Op, Role};

pub mod view;

/// The HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// Who may call a route on a MIG that has a `username` set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: it reveals nothing without the operation's unguessable id (the page follows the
    /// operation across grids, on instances whose credentials the person may not have), or the
    /// request carries its own signature, which the route checks.
    Public,
    /// Only with the GUI credentials.
    Credentials,
    /// Without credentials only when it carries [`crate::auth::H_SIGNATURE`] (another instance
    /// forwarding it; the route checks the signature); from a person, with the credentials.
    SignedOrCredentials,
}

/// One route of the GUI port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The name the pages' scripts know it by.
    pub name: &'static str,
    pub method: Method,
    /// As actix-web routes it: `{id}` (an operation id) and `{file}` stand for one path segment.
    pub path: &'static str,
    pub access: Access,
}

impl Route {
    /// The path of this route for operation `op_id`.
    pub fn for_op(&self, op_id: &str) -> String {
        self.path.replace("{id}", op_id)
    }

    /// Whether a request `method path` is for this route (a `{…}` segment matches any one
    /// non-empty segment).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if method != self.method.as_str() {
            return false;
        }
        let (mut want, mut got) = (self.path.split('/'), path.split('/'));
        loop {
            match (want.next(), got.next()) {
                (None, None) => return true,
                (Some(w), Some(g)) if w.starts_with('{') && w.ends_with('}') && !g.is_empty() => {}
                (Some(w), Some(g)) if w == g => {}
                _ => return false,
            }
        }
    }
}

const fn route(name: &'static str, method: Method, path: &'static str, access: Access) -> Route {
    Route {
        name,
        method,
        path,
        access,
    }
}

use Access::{Credentials, Public, SignedOrCredentials};
use Method::{Get, Post};

/// The form page (MigHelper's page saying what it is).
pub const INDEX: Route = route("index", Get, "/", Credentials);
/// The monitor page: it follows the operation wherever it runs.
pub const MONITOR_PAGE: Route = route("monitor_page", Get, "/ops/{id}", Public);
/// The operation's timeline as a page.
pub const TRACE_PAGE: Route = route("trace_page", Get, "/ops/{id}/trace", Public);
/// The pages' embedded script and style.
pub const STATIC: Route = route("static", Get, "/static/{file}", Public);
/// The grids of grid.info, with the one MIG runs on marked.
pub const GRIDS: Route = route("grids", Get, "/api/v1/grids", Credentials);
/// The CSRF token a state-changing request carries in [`CSRF_HEADER`].
pub const CSRF: Route = route("csrf", Get, "/api/v1/csrf", Credentials);
/// Starts an operation (or, with `"dry_run": true`, only runs its checks).
pub const START: Route = route("start", Post, "/api/v1/ops", Credentials);
/// This instance's recent operations.
pub const LIST: Route = route("list", Get, "/api/v1/ops", Credentials);
/// The audit log (`?since=RFC3339`).
pub const AUDIT: Route = route("audit", Get, "/api/v1/audit", Credentials);
/// One operation's public view ([`view::OpView`]), from any origin.
pub const OP: Route = route("op", Get, "/api/v1/ops/{id}", Public);
/// One operation's full record: behind the credentials, not readable cross-origin.
pub const RECORD: Route = route("record", Get, "/api/v1/ops/{id}/record", Credentials);
/// The public view, live: server-sent events ([`event`]).
pub const EVENTS: Route = route("events", Get, "/api/v1/ops/{id}/events", Public);
/// The operation's public timeline ([`view::TraceView`]).
pub const TRACE: Route = route("trace", Get, "/api/v1/ops/{id}/trace", Public);
/// The signed status of one operation, `?nonce=HEX` ([`crate::handoff::StatusQuery`]).
pub const STATUS: Route = route("status", Get, "/api/v1/ops/{id}/status", Public);
/// Cancels one operation before its cut-over ([`crate::cancel`]).
pub const CANCEL: Route = route(
    "cancel",
    Post,
    "/api/v1/ops/{id}/cancel",
    SignedOrCredentials,
);
/// A signed handoff from the previous actor ([`crate::handoff`]).
pub const HANDOFF: Route = route("handoff", Post, "/api/v1/handoff", Public);

/// Every route of the GUI port.
pub const ROUTES: &[Route] = &[
    INDEX,
    MONITOR_PAGE,
    TRACE_PAGE,
    STATIC,
    GRIDS,
    CSRF,
    START,
    LIST,
    AUDIT,
    OP,
    RECORD,
    EVENTS,
    TRACE,
    STATUS,
    CANCEL,
    HANDOFF,
];

/// Whether a request may skip the GUI credentials: its route is [`Access::Public`], or it is
/// [`Access::SignedOrCredentials`] and `signed`. A path no route has is not public.
pub fn is_public(method: &str, path: &str, signed: bool) -> bool {
    ROUTES
        .iter()
        .find(|r| r.matches(method, path))
        .is_some_and(|r| match r.access {
            Public => true,
            Credentials => false,
            SignedOrCredentials => signed,
        })
}

/// `GET` this of another instance: the signed status of `op_id` (add `?nonce=HEX`).
pub fn status(op_id: &str) -> String {
    STATUS.for_op(op_id)
}

/// `POST` this to cancel `op_id` ([`crate::cancel`]).
pub fn cancel(op_id: &str) -> String {
    CANCEL.for_op(op_id)
}

/// The header a state-changing GUI request carries: a token only a page (or client) that could
/// read this MIG's own responses knows, so a cross-site form cannot start an operation.
pub const CSRF_HEADER: &str = "X-Mig-Csrf";

/// The roles a `mig serve` plays: the source MIG of the operations it starts, and the final MIG
/// of those handed to it.
pub const SERVE_ROLES: &[Role] = &[Role::Source, Role::Target];
/// The role MigHelper plays.
pub const HELPER_ROLES: &[Role] = &[Role::Helper];

/// The name of the live stream's events: each carries one [`view::OpView`] as JSON.
pub const EVENT: &str = "op";

/// How long an idle stream waits before it sends [`KEEP_ALIVE_COMMENT`]: it keeps proxies from
/// closing the stream, and finds a client that has gone (the write fails), which frees its place.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// What an idle stream sends every [`KEEP_ALIVE`]: a comment, which `EventSource` ignores.
pub const KEEP_ALIVE_COMMENT: &str = ": keep-alive\n\n";

/// One event of the live stream: `event: op` with the public view as its data.
pub fn event(op: &view::OpView) -> String {
    let data = serde_json::to_string(op).expect("an OpView serializes");
    format!("event: {EVENT}\ndata: {data}\n\n")
}

/// Whether an instance playing `roles` ends the stream after sending `op`: once the operation has
/// ended, or has moved on to an instance in another role (the page then looks for it there).
pub fn stream_ends(op: &Op, roles: &[Role]) -> bool {
    !op.state.is_running() || !roles.contains(&op.owner)
}

/// What the pages' scripts need of the contract, as the JSON each page carries: every route's
/// path by name, the CSRF header and the stream's event name.
pub fn page_contract() -> serde_json::Value {
    let routes: serde_json::Map<String, serde_json::Value> = ROUTES
        .iter()
        .map(|r| (r.name.to_string(), r.path.into()))
        .collect();
    serde_json::json!({"routes": routes, "csrf_header": CSRF_HEADER, "event": EVENT})
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn routes_are_unique_by_name_and_by_method_and_path() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert_ne!(a.name, b.name);
                assert!((a.method, a.path) != (b.method, b.path), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn a_route_matches_its_own_paths_and_no_other() {
        assert!(OP.matches("GET", &OP.for_op(ID)));
        assert!(!OP.matches("POST", &OP.for_op(ID)));
        assert!(!OP.matches("GET", "/api/v1/ops/"), "an empty id");
        assert!(!OP.matches("GET", &EVENTS.for_op(ID)));
        assert!(INDEX.matches("GET", "/") && !INDEX.matches("GET", "/x"));
        assert!(STATIC.matches("GET", "/static/monitor.js"));
        assert!(!STATIC.matches("GET", "/static/a/b"));
        assert_eq!(status(ID), format!("/api/v1/ops/{ID}/status"));
        assert_eq!(cancel(ID), format!("/api/v1/ops/{ID}/cancel"));
    }

    /// The rule the server applied before the table (prefixes), for every route it has.
    #[test]
    fn public_is_what_it_was_for_every_route() {
        let public_gets = [
            MONITOR_PAGE.for_op(ID),
            TRACE_PAGE.for_op(ID),
            "/static/mig.css".into(),
            OP.for_op(ID),
            EVENTS.for_op(ID),
            TRACE.for_op(ID),
            STATUS.for_op(ID),
        ];
        for p in &public_gets {
            assert!(is_public("GET", p, false), "{p}");
        }
        for p in [
            "/",
            "/api/v1/grids",
            "/api/v1/csrf",
            "/api/v1/ops",
            "/api/v1/audit",
        ] {
            assert!(!is_public("GET", p, false), "{p}");
        }
        assert!(!is_public("GET", &RECORD.for_op(ID), false));
        assert!(!is_public("GET", &RECORD.for_op(ID), true));
        assert!(!is_public("POST", "/api/v1/ops", true));
        assert!(is_public("POST", HANDOFF.path, false));
        assert!(!is_public("POST", &cancel(ID), false));
        assert!(is_public("POST", &cancel(ID), true));
        assert!(
            !is_public("GET", "/api/v1/nothing", false),
            "no route, not public"
        );
        assert!(!is_public("POST", &OP.for_op(ID), false));
    }

    #[test]
    fn the_page_contract_names_every_route() {
        let c = page_contract();
        for r in ROUTES {
            assert_eq!(c["routes"][r.name], r.path);
        }
        assert_eq!(c["csrf_header"], CSRF_HEADER);
        assert_eq!(c["event"], "op");
    }

    #[test]
    fn a_stream_ends_once_the_operation_ends_or_leaves_every_role_here() {
        let plan = crate::test_support::sample_plan();
        let mut op = Op::new(ID.into(), crate::op::Kind::Migrate, plan);
        assert!(!stream_ends(&op, SERVE_ROLES));
        op.owner = Role::Helper;
        assert!(stream_ends(&op, SERVE_ROLES) && !stream_ends(&op, HELPER_ROLES));
        op.owner = Role::Target;
        assert!(
            !stream_ends(&op, SERVE_ROLES),
            "the final MIG is a mig serve too"
        );
        op.end(crate::op::OpState::Succeeded, None);
        assert!(stream_ends(&op, SERVE_ROLES));
        let e = event(&view::OpView::of(&op));
        assert!(
            e.starts_with("event: op\ndata: {") && e.ends_with("}\n\n"),
            "{e}"
        );
    }
}
