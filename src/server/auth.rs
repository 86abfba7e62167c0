//! Who may do what on the GUI port: the `Host` check, HTTP basic auth on every route the route
//! table ([`actors::api`]) does not make public, the CSRF token of state-changing requests, and
//! the audit log's view of a request.

use std::net::IpAddr;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use mig_web::ops::error;
use subtle::ConstantTimeEq;

use super::{Shared, CSRF_HEADER};
use crate::audit::action;
use crate::host_check::LocalAddr;

/// Routes anyone may call without the GUI credentials, as the route table says: an operation's
/// public view (readable with its unguessable id, from any origin, so the page can follow it across
/// grids), the monitor page and its script, the handoff (which carries its own signature), and a
/// cancel forwarded by another instance (signed; the route checks it). The full record is not one.
fn is_public(req: &ServiceRequest) -> bool {
    actors::api::is_public(
        req.method().as_str(),
        req.path(),
        req.headers().contains_key(actors::auth::H_SIGNATURE),
    )
}

/// The server's shared state, which every middleware here reads.
fn shared(req: &ServiceRequest) -> web::Data<Shared> {
    req.app_data::<web::Data<Shared>>()
        .expect("Shared is registered")
        .clone()
}

/// 421 for a request whose `Host` is not a name this MIG answers to (see [`crate::host_check`]).
pub(super) async fn check_host(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let shared = shared(&req);
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("(not text)"));
    let local = req.request().conn_data::<LocalAddr>().map(|a| a.0.ip());
    if let Err(why) = shared.hosts.check(host, local) {
        tracing::warn!(
            host = host.unwrap_or_default(),
            path = req.path(),
            "request for another host refused (421)"
        );
        return Ok(req.into_response(error(421, why)));
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// HTTP basic auth on every other GUI route when `username` is set.
pub(super) async fn require_credentials(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let shared = shared(&req);
    if let (Some(creds), false) = (&shared.credentials, is_public(&req)) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !creds.check_header(given) {
            // A request without credentials is how every browser starts; a wrong one is not.
            if given.is_some() {
                let client = req.peer_addr().map(|a| a.ip());
                let user = actors::auth::basic_user(given);
                shared.audit.record(
                    client,
                    user.as_deref(),
                    action::LOGIN,
                    None,
                    &format!(
                        "refused (401): wrong username or password for {} {}",
                        req.method(),
                        req.path()
                    ),
                );
            }
            let resp = HttpResponse::Unauthorized()
                .insert_header((
                    header::WWW_AUTHENTICATE,
                    r#"Basic realm="MIG", charset="UTF-8""#,
                ))
                .json(serde_json::json!({"error": "this MIG needs its GUI username and password"}));
            return Ok(req.into_response(resp));
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// The client address and the GUI user of a request, as the audit log names them.
pub fn who(req: &HttpRequest, shared: &Shared) -> (Option<IpAddr>, Option<String>) {
    let client = req.peer_addr().map(|a| a.ip());
    let user = shared.credentials.as_ref().and_then(|_| {
        actors::auth::basic_user(
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
    });
    (client, user)
}

/// Appends one audit entry for `req` (the hook for the cancel and dry-run routes too).
pub fn audit_request(
    req: &HttpRequest,
    shared: &Shared,
    action: &str,
    op_id: Option<&str>,
    result: &str,
) {
    let (client, user) = who(req, shared);
    shared
        .audit
        .record(client, user.as_deref(), action, op_id, result);
}

/// The 403 to answer unless the request carries this instance's CSRF token.
pub(super) fn csrf_refusal(req: &HttpRequest, shared: &Shared) -> Option<HttpResponse> {
    let token = req
        .headers()
        .get(CSRF_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !bool::from(token.ct_eq(shared.csrf_token.as_bytes())) {
        return Some(error(
            403,
            format!(
                "missing or wrong {CSRF_HEADER} header: reload the page (or GET {})",
                actors::api::CSRF.path
            ),
        ));
    }
    None
}
