//! The GUI's own API: the form page, the grids, starting an operation (or its dry run), cancelling
//! one, the history, the audit log and the full record. The public operation routes (view, live
//! stream, timeline, monitor page) are `mig_web::ops`, shared with the browser tests' fake MIG.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actors::cancel::{CancelError, SignedCancel};
use actors::source::{DryRun, StartError, StartOp};
use mig_web::ops::error;
use serde::{Deserialize, Serialize};

use super::auth::{audit_request, csrf_refusal};
use super::{Shared, CSRF_HEADER};
use crate::audit::action;
use crate::site::Site;

#[derive(Serialize)]
struct GridView<'a> {
    id: &'a str,
    location: Option<&'a str>,
    controller: String,
    mig_ip: String,
    /// The grid this MIG runs on.
    own: bool,
}

#[derive(Serialize)]
struct GridsView<'a> {
    /// The id of the grid MIG runs on, when it can tell.
    own_grid: Option<&'a str>,
    /// Why operations are not offered, when they are not.
    unavailable: Option<String>,
    grids: Vec<GridView<'a>>,
}

/// `GET /api/v1/grids`: the grids of grid.info, with the one MIG runs on marked.
pub(super) async fn grids(shared: web::Data<Shared>) -> HttpResponse {
    let Some(site) = &shared.site else {
        return error(404, "MigHelper has no grids");
    };
    let own = site.own_grid.as_deref().ok();
    let grids = site
        .grid_info
        .iter()
        .flat_map(|gi| &gi.grids)
        .map(|g| GridView {
            id: &g.id,
            location: g.location.as_deref(),
            controller: g.controller.to_string(),
            mig_ip: g.mig_ip.to_string(),
            own: Some(g.id.as_str()) == own,
        })
        .collect();
    HttpResponse::Ok().json(GridsView {
        own_grid: own,
        unavailable: site.operations_unavailable(),
        grids,
    })
}

/// `GET /`: the form (or, in MigHelper, a page that says what it is and names no operation: its
/// id is what lets a reader see the operation).
pub(super) async fn index(shared: web::Data<Shared>) -> HttpResponse {
    let Some(site) = &shared.site else {
        return mig_web::html_response(mig_web::helper_page());
    };
    let own = site.own();
    let ctx = mig_web::PageContext {
        app_name: site.props.app_name.clone(),
        own_grid: own.map(|g| (g.id.clone(), g.location.clone())),
        unavailable: match (&shared.source, site.operations_unavailable()) {
            (_, Some(why)) => Some(why),
            (None, None) => {
                Some("the application's private key is not usable (run `mig check`)".into())
            }
            (Some(_), None) => None,
        },
        mode: site.props.mode,
        targets: site
            .grid_info
            .iter()
            .flat_map(|gi| &gi.grids)
            .filter(|g| Some(g.id.as_str()) != own.map(|o| o.id.as_str()))
            .map(|g| (g.id.clone(), g.location.clone()))
            .collect(),
        csrf_token: shared.csrf_token.clone(),
        open: shared.credentials.is_none(),
        history: mig_web::OpSummary::history(&shared.book.all(), HISTORY),
    };
    mig_web::html_response(mig_web::index_page(&ctx))
}

/// `GET /api/v1/csrf`: the token for state-changing requests (behind the GUI credentials, and not
/// readable cross-origin).
pub(super) async fn csrf(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"csrf": shared.csrf_token}))
}

#[derive(Deserialize)]
pub(super) struct StartBody {
    kind: String,
    target_app: String,
    target_grid: String,
    /// The copy's bandwidth limit: `"8M"`, a number of bytes per second, or `""` for none;
    /// absent, the `max_rate` property applies.
    #[serde(default)]
    max_rate: Option<serde_json::Value>,
    /// Run the checks only: 200 `{checks: [{name, ok, detail}]}`, nothing changed on any grid.
    #[serde(default)]
    dry_run: bool,
}

/// The request's `max_rate`, or the property's when it names none.
pub(super) fn requested_rate(
    given: Option<&serde_json::Value>,
    default: Option<u64>,
) -> Result<Option<u64>, String> {
    let bad = |why: String| format!("max_rate: {why}");
    match given {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::String(s)) => actors::properties::parse_rate(s).map_err(bad),
        Some(serde_json::Value::Number(n)) => {
            actors::properties::parse_rate(&n.to_string()).map_err(bad)
        }
        Some(_) => Err(bad(actors::properties::parse_rate("?").unwrap_err())),
    }
}

/// `POST /api/v1/ops/{id}/cancel`: 202 `{id, cancelled: {user, from, at}, monitor_url}` once the
/// cancel has won (the operation then rolls back and ends `cancelled`); 409 past the cut-over or
/// when it has ended; 404 when this instance does not know it. From a person: the GUI credentials
/// and the CSRF token. From another instance: signed for this one ([`actors::cancel`]).
pub(super) async fn cancel_op(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let id = id.into_inner();
    if !actors::op::valid_id(&id) {
        return error(404, "not an operation id");
    }
    let Some(canceller) = shared.canceller.clone() else {
        return error(503, "this instance cannot take operations (see mig check)");
    };
    let signed = SignedCancel::from_headers(&id, &body, |name| {
        req.headers().get(name).and_then(|v| v.to_str().ok())
    });
    let r = match signed {
        Some(Ok(s)) => canceller.from_peer(s).await,
        Some(Err(e)) => Err(e),
        None => {
            if let Some(resp) = csrf_refusal(&req, &shared) {
                audit_request(
                    &req,
                    &shared,
                    action::CANCEL,
                    Some(&id),
                    &format!("refused (403): missing or wrong {CSRF_HEADER} header"),
                );
                return resp;
            }
            let by = actors::op::Cancelled {
                user: shared
                    .credentials
                    .as_ref()
                    .map_or("anonymous", |c| c.username())
                    .to_string(),
                from: req
                    .peer_addr()
                    .map_or("unknown".into(), |a| a.ip().to_canonical().to_string()),
                at: actors::op::now(),
            };
            canceller.from_user(&id, by).await
        }
    };
    match r {
        Ok(by) => {
            tracing::warn!(op_id = %id, %by, "operation cancelled");
            audit_request(
                &req,
                &shared,
                action::CANCEL,
                Some(&id),
                &format!("accepted: {by}"),
            );
            HttpResponse::Accepted().json(serde_json::json!({
                "id": id,
                "cancelled": by,
                "monitor_url": actors::api::MONITOR_PAGE.for_op(&id),
            }))
        }
        Err(e) => {
            let e: CancelError = e;
            tracing::info!(op_id = %id, status = e.status(), error = %e, "cancel refused");
            audit_request(
                &req,
                &shared,
                action::CANCEL,
                Some(&id),
                &format!("refused ({}): {e}", e.status()),
            );
            error(e.status(), e.to_string())
        }
    }
}

/// `POST /api/v1/ops`: 202 `{id, monitor_url}`, or 400/403/409/503/502 with `{error}`.
pub(super) async fn start_op(
    req: HttpRequest,
    shared: web::Data<Shared>,
    body: web::Json<StartBody>,
) -> HttpResponse {
    let refuse = |status: u16, msg: String| {
        audit_request(
            &req,
            &shared,
            action::START,
            None,
            &format!("refused ({status}): {msg}"),
        );
        error(status, msg)
    };
    if let Some(resp) = csrf_refusal(&req, &shared) {
        audit_request(
            &req,
            &shared,
            action::START,
            None,
            &format!("refused (403): missing or wrong {CSRF_HEADER} header"),
        );
        return resp;
    }
    let Some(source) = &shared.source else {
        let why = shared
            .site
            .as_ref()
            .and_then(Site::operations_unavailable)
            .unwrap_or_else(|| "this instance does not start operations".into());
        return refuse(503, format!("operations are not offered here: {why}"));
    };
    let body = body.into_inner();
    let default_rate = shared.site.as_ref().and_then(|s| s.props.max_rate);
    let max_rate = match requested_rate(body.max_rate.as_ref(), default_rate) {
        Ok(r) => r,
        Err(e) => return refuse(400, e),
    };
    let what = format!(
        "{} as {} to grid {}{}",
        body.kind,
        body.target_app,
        body.target_grid,
        max_rate
            .map(|r| format!(", max_rate {r} B/s"))
            .unwrap_or_default()
    );
    if body.dry_run {
        let msg = DryRun {
            kind: body.kind,
            target_app: body.target_app,
            target_grid: body.target_grid,
        };
        let (resp, result) = match source.send(msg).await {
            Ok(Ok(checks)) => {
                let failed = checks.iter().filter(|c| !c.ok).count();
                let result = format!("{what}: {failed} of {} checks failed", checks.len());
                (
                    HttpResponse::Ok().json(serde_json::json!({ "checks": checks })),
                    result,
                )
            }
            Ok(Err(e)) => (
                error(e.status(), e.to_string()),
                format!("refused ({}): {e}", e.status()),
            ),
            Err(e) => (
                error(500, format!("the Source actor is gone: {e}")),
                format!("error: {e}"),
            ),
        };
        audit_request(&req, &shared, action::DRY_RUN, None, &result);
        return resp;
    }
    let msg = StartOp {
        kind: body.kind,
        target_app: body.target_app,
        target_grid: body.target_grid,
        max_rate,
    };
    match source.send(msg).await {
        Ok(Ok(started)) => {
            audit_request(
                &req,
                &shared,
                action::START,
                Some(&started.id),
                &format!("accepted: {what}"),
            );
            HttpResponse::Accepted().json(serde_json::json!({
                "id": started.id,
                "monitor_url": actors::api::MONITOR_PAGE.for_op(&started.id),
            }))
        }
        Ok(Err(StartError::Checks(checks))) => {
            let e = StartError::Checks(checks.clone());
            tracing::info!(status = e.status(), error = %e, "operation refused by its checks");
            audit_request(
                &req,
                &shared,
                action::START,
                None,
                &format!("refused ({}): {what}: {e}", e.status()),
            );
            HttpResponse::build(StatusCode::PRECONDITION_FAILED)
                .json(serde_json::json!({"error": e.to_string(), "checks": checks}))
        }
        Ok(Err(e)) => {
            tracing::info!(status = e.status(), error = %e, "operation refused");
            refuse(e.status(), format!("{what}: {e}"))
        }
        Err(e) => refuse(500, format!("the Source actor is gone: {e}")),
    }
}

/// How many operations the history lists.
const HISTORY: usize = 50;

/// `GET /api/v1/ops`: this instance's recent operations, newest first, from its journal (the
/// same list the form page shows).
pub(super) async fn list_ops(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "ops": mig_web::OpSummary::history(&shared.book.all(), HISTORY),
    }))
}

#[derive(Deserialize)]
pub(super) struct AuditParams {
    since: Option<String>,
}

/// `GET /api/v1/audit?since=RFC3339`: the audit log's entries at or after `since` (all without
/// it), oldest first, behind the GUI credentials.
pub(super) async fn audit_log(
    shared: web::Data<Shared>,
    q: web::Query<AuditParams>,
) -> HttpResponse {
    if shared.site.is_none() {
        return error(
            403,
            "MigHelper has no GUI credentials to check, so it serves no audit log",
        );
    }
    let since = match q.since.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match humantime::parse_rfc3339_weak(s) {
            Ok(t) => Some(t),
            Err(_) => {
                return error(
                    400,
                    format!("since: {s:?} is not an RFC 3339 time, e.g. 2026-12-02T17:00:00Z"),
                )
            }
        },
    };
    HttpResponse::Ok().json(serde_json::json!({"entries": shared.audit.read(since)}))
}

/// `GET /api/v1/ops/{id}/record`: the operation's full record (plan, leftovers with the commands
/// that clear them, the controllers' own words), behind the GUI credentials and not readable
/// cross-origin. MigHelper has no credentials to check, so it serves no record.
pub(super) async fn get_record(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    if shared.site.is_none() {
        return error(
            403,
            format!(
                "MigHelper has no GUI credentials to check, so it serves only the public view \
                 (GET {}); read the full record on the source or final MIG",
                actors::api::OP.path
            ),
        );
    }
    match shared.book.get(&id) {
        Some(op) => HttpResponse::Ok().json(op),
        None => error(404, format!("no operation {id} here")),
    }
}

#[cfg(test)]
mod tests {
    use super::requested_rate;
    use serde_json::json;

    #[test]
    fn a_request_s_max_rate_overrides_the_property_and_a_bad_one_names_the_field() {
        let d = Some(1 << 20);
        assert_eq!(requested_rate(None, d), Ok(d));
        assert_eq!(requested_rate(Some(&json!(null)), d), Ok(d));
        assert_eq!(requested_rate(Some(&json!("8M")), d), Ok(Some(8 << 20)));
        assert_eq!(requested_rate(Some(&json!(4096)), d), Ok(Some(4096)));
        assert_eq!(
            requested_rate(Some(&json!("")), d),
            Ok(None),
            "explicitly none"
        );
        for bad in [
            json!("8X"),
            json!(0),
            json!(-1),
            json!(1.5),
            json!(true),
            json!(["8M"]),
        ] {
            let e = requested_rate(Some(&bad), d).unwrap_err();
            assert!(
                e.starts_with("max_rate: must be bytes per second"),
                "{bad}: {e}"
            );
        }
    }
}
