//! The HTTP side of `mig serve` and `mig helper`: the GUI port (`/api/v1`) and the `mon` port.
//!
//! [`run`] takes listeners that are already bound, so a test binds port 0 and talks to the real
//! server over real sockets, and `main` can report a port that cannot be bound before anything starts.

use std::collections::HashMap;
use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Addr, Recipient};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web as aw, App, HttpRequest, HttpResponse, HttpServer};
use actors::auth::{GuiCredentials, Signed};
use actors::book::OpBook;
use actors::cancel::{CancelError, Canceller, SignedCancel};
use actors::faults::{self, Faults};
use actors::handoff::{self, Handoff, StatusQuery};
use actors::op::Role;
use actors::source::{DryRun, Source, StartError, StartOp};
use proxy::ProxyStats;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::audit::{action, Audit};
use crate::host_check::{HostCheck, LocalAddr};
use crate::site::Site;

/// How long in-flight requests get when MIG stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The header a state-changing GUI request carries: a token only a page (or client) that could
/// read this MIG's own responses knows, so a cross-site form cannot start an operation. One
/// constant, the page's, so the page and the server cannot disagree.
pub use web::CSRF_HEADER;

/// Largest handoff body accepted (an operation with its steps is a few KiB).
const MAX_HANDOFF: usize = 256 * 1024;

/// Live event streams one client address may hold open at once: a few monitor pages' worth. The
/// streams are public, so without a cap one client could hold every connection MIG has.
pub const MAX_STREAMS_PER_CLIENT: usize = 8;

/// State shared by every request handler.
pub struct Shared {
    /// The start-up findings (`mig serve`); `None` in MigHelper, which has no grid.info.
    pub site: Option<Site>,
    pub credentials: Option<GuiCredentials>,
    pub book: OpBook,
    /// Starts operations (`mig serve` with operations on).
    pub source: Option<Addr<Source>>,
    /// Takes handoffs: Target in `mig serve`, MigHelper in `mig helper`.
    pub handoff: Option<Recipient<Handoff>>,
    /// Answers signed status queries: the same actor as `handoff`.
    pub status: Option<Recipient<StatusQuery>>,
    /// Test-only fault points (off unless `fault_dir` is set).
    pub faults: Faults,
    /// The roles this instance plays; its event streams end when the operation moves on.
    pub roles: Vec<Role>,
    pub csrf_token: String,
    /// The pass-through counters, for `/metrics`.
    pub proxy_stats: Option<Arc<ProxyStats>>,
    /// The names the GUI port answers to in a request's `Host` header.
    pub hosts: HostCheck,
    /// Live event streams open, by client address.
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// `state_dir/audit.log`: every state-changing request and its outcome.
    pub audit: Arc<Audit>,
    /// Takes `POST /api/v1/ops/{id}/cancel`: to the local owner, or forwarded to the remote one.
    pub canceller: Option<Arc<Canceller>>,
}

impl Shared {
    pub fn new(site: Option<Site>, book: OpBook, roles: Vec<Role>) -> Shared {
        let credentials = site
            .as_ref()
            .and_then(|s| GuiCredentials::new(&s.props.username, &s.props.password));
        if let (Some(site), None) = (&site, &credentials) {
            // The seed's rule (no username, no authentication) stays; nobody should run so
            // without having been told.
            tracing::warn!(
                port = site.props.port_no,
                "no username is set: the GUI and API ask for no credentials, so anyone who can \
                 reach this port can move or copy the application; set the username and password \
                 properties"
            );
        }
        let hosts = site
            .as_ref()
            .map(|s| HostCheck::new(&s.props, s.grid_info.as_ref()))
            .unwrap_or_default();
        // The journal is `state_dir/ops`; the audit log sits beside it.
        let state_dir = book
            .journal()
            .dir()
            .parent()
            .map_or_else(|| book.journal().dir().to_path_buf(), |p| p.to_path_buf());
        Shared {
            audit: Arc::new(Audit::open(&state_dir)),
            site,
            credentials,
            book,
            source: None,
            handoff: None,
            status: None,
            faults: Faults::default(),
            roles,
            csrf_token: actors::op::new_id(),
            proxy_stats: None,
            hosts,
            streams: Arc::default(),
            canceller: None,
        }
    }
}

/// Serves the GUI on `gui` and health on `mon` until `shutdown` is cancelled.
pub async fn run(
    shared: Shared,
    gui: TcpListener,
    mon: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Before anything records: a metric recorded before the recorder exists is lost.
    crate::metrics::install();
    let shared = aw::Data::new(shared);

    let gui_shared = shared.clone();
    let gui_server = HttpServer::new(move || {
        App::new()
            .app_data(gui_shared.clone())
            .app_data(aw::PayloadConfig::new(MAX_HANDOFF))
            .app_data(aw::JsonConfig::default().limit(16 * 1024))
            .wrap(from_fn(require_credentials))
            // Outermost: a request for another host is refused before anything else looks at it.
            .wrap(from_fn(check_host))
            .route("/", aw::get().to(index))
            .route("/ops/{id}", aw::get().to(monitor))
            .route("/ops/{id}/trace", aw::get().to(trace_page))
            .configure(web::configure_assets)
            .service(
                aw::scope("/api/v1")
                    .route("/grids", aw::get().to(grids))
                    .route("/csrf", aw::get().to(csrf))
                    .route("/ops", aw::post().to(start_op))
                    .route("/ops", aw::get().to(list_ops))
                    .route("/audit", aw::get().to(audit_log))
                    .route("/ops/{id}", aw::get().to(get_op))
                    .route("/ops/{id}/record", aw::get().to(get_record))
                    .route("/ops/{id}/events", aw::get().to(op_events))
                    .route("/ops/{id}/trace", aw::get().to(op_trace))
                    .route("/ops/{id}/status", aw::get().to(op_status))
                    .route("/ops/{id}/cancel", aw::post().to(cancel_op))
                    .route("/handoff", aw::post().to(handoff)),
            )
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    // The Host check accepts the address a connection arrived at.
    .on_connect(|conn, ext| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            if let Ok(a) = tcp.local_addr() {
                ext.insert(LocalAddr(a));
            }
        }
    })
    .listen(gui)?
    .run();

    let mon_shared = shared.clone();
    let mon_server = HttpServer::new(move || {
        App::new()
            .app_data(mon_shared.clone())
            .route("/healthz", aw::get().to(healthz))
            .route("/readyz", aw::get().to(readyz))
            .route("/metrics", aw::get().to(metrics))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    .listen(mon)?
    .run();

    let (gui_handle, mon_handle) = (gui_server.handle(), mon_server.handle());
    let stopper = async move {
        shutdown.cancelled().await;
        tracing::info!("shutting down: finishing requests in flight");
        tokio::join!(gui_handle.stop(true), mon_handle.stop(true));
    };
    let (gui_res, mon_res, ()) = tokio::join!(gui_server, mon_server, stopper);
    gui_res.and(mon_res)
}

/// Routes anyone may call without the GUI credentials: an operation's public view (readable with
/// its unguessable id, from any origin, so the page can follow it across grids) and the handoff
/// (which carries its own signature). The full record (`/record`) is not one of them.
fn is_public(req: &ServiceRequest) -> bool {
    let path = req.path();
    let get = req.method() == Method::GET && !path.ends_with("/record");
    // The monitor page and its script reveal nothing without the operation id; they must load on
    // the MigHelper and the target MIG, whose credentials the person may not have.
    (get && (path.starts_with("/api/v1/ops/")
        || path.starts_with("/ops/")
        || path.starts_with("/static/")))
        || (req.method() == Method::POST && path == "/api/v1/handoff")
        // A cancel forwarded by another instance carries its own signature (checked by the route).
        || (req.method() == Method::POST
            && path.starts_with("/api/v1/ops/")
            && path.ends_with("/cancel")
            && req.headers().contains_key(actors::auth::H_SIGNATURE))
}

/// 421 for a request whose `Host` is not a name this MIG answers to (see [`crate::host_check`]).
async fn check_host(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let shared = req
        .app_data::<aw::Data<Shared>>()
        .expect("Shared is registered")
        .clone();
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
async fn require_credentials(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let shared = req
        .app_data::<aw::Data<Shared>>()
        .expect("Shared is registered")
        .clone();
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

fn error(status: u16, msg: impl Into<String>) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .json(serde_json::json!({"error": msg.into()}))
}

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
async fn grids(shared: aw::Data<Shared>) -> HttpResponse {
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
async fn index(shared: aw::Data<Shared>) -> HttpResponse {
    let Some(site) = &shared.site else {
        return web::html_response(web::helper_page());
    };
    let own = site.own();
    let ctx = web::PageContext {
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
        history: web::OpSummary::history(&shared.book.all(), HISTORY),
    };
    web::html_response(web::index_page(&ctx))
}

/// `GET /ops/{id}`: the monitor page, which follows the operation wherever it runs.
async fn monitor(id: aw::Path<String>) -> HttpResponse {
    if !actors::op::valid_id(&id) {
        return error(404, "not an operation id");
    }
    web::html_response(web::monitor_page(&id))
}

/// `GET /api/v1/csrf`: the token for state-changing requests (behind the GUI credentials, and not
/// readable cross-origin).
async fn csrf(shared: aw::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"csrf": shared.csrf_token}))
}

#[derive(Deserialize)]
struct StartBody {
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

/// The request's `max_rate`, or the property's when it names none.
fn requested_rate(
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

/// The 403 to answer unless the request carries this instance's CSRF token.
fn csrf_refusal(req: &HttpRequest, shared: &Shared) -> Option<HttpResponse> {
    let token = req
        .headers()
        .get(CSRF_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !bool::from(token.ct_eq(shared.csrf_token.as_bytes())) {
        return Some(error(
            403,
            format!("missing or wrong {CSRF_HEADER} header: reload the page (or GET /api/v1/csrf)"),
        ));
    }
    None
}

/// `POST /api/v1/ops/{id}/cancel`: 202 `{id, cancelled: {user, from, at}, monitor_url}` once the
/// cancel has won (the operation then rolls back and ends `cancelled`); 409 past the cut-over or
/// when it has ended; 404 when this instance does not know it. From a person: the GUI credentials
/// and the CSRF token. From another instance: signed for this one ([`actors::cancel`]).
async fn cancel_op(
    req: HttpRequest,
    shared: aw::Data<Shared>,
    id: aw::Path<String>,
    body: aw::Bytes,
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
                "monitor_url": format!("/ops/{id}"),
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
async fn start_op(
    req: HttpRequest,
    shared: aw::Data<Shared>,
    body: aw::Json<StartBody>,
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
                "monitor_url": format!("/ops/{}", started.id),
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
async fn list_ops(shared: aw::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "ops": web::OpSummary::history(&shared.book.all(), HISTORY),
    }))
}

#[derive(Deserialize)]
struct AuditParams {
    since: Option<String>,
}

/// `GET /api/v1/audit?since=RFC3339`: the audit log's entries at or after `since` (all without
/// it), oldest first, behind the GUI credentials.
async fn audit_log(shared: aw::Data<Shared>, q: aw::Query<AuditParams>) -> HttpResponse {
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

fn cors(mut resp: HttpResponse) -> HttpResponse {
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    resp
}

/// `GET /api/v1/ops/{id}`: the operation as far as this instance knows it, as its public view
/// ([`web::OpView`]: no controller addresses, configuration values or controller output).
async fn get_op(shared: aw::Data<Shared>, id: aw::Path<String>) -> HttpResponse {
    match shared.book.get(&id) {
        Some(op) => cors(HttpResponse::Ok().json(web::OpView::of(&op))),
        None => cors(error(404, format!("no operation {id} here"))),
    }
}

/// `GET /api/v1/ops/{id}/record`: the operation's full record (plan, leftovers with the commands
/// that clear them, the controllers' own words), behind the GUI credentials and not readable
/// cross-origin. MigHelper has no credentials to check, so it serves no record.
async fn get_record(shared: aw::Data<Shared>, id: aw::Path<String>) -> HttpResponse {
    if shared.site.is_none() {
        return error(
            403,
            "MigHelper has no GUI credentials to check, so it serves only the public view \
             (GET /api/v1/ops/{id}); read the full record on the source or final MIG",
        );
    }
    match shared.book.get(&id) {
        Some(op) => HttpResponse::Ok().json(op),
        None => error(404, format!("no operation {id} here")),
    }
}

/// `GET /api/v1/ops/{id}/trace`: the operation's timeline across every instance that ran it, as far
/// as this instance knows it (the last one knows all of it).
async fn op_trace(shared: aw::Data<Shared>, id: aw::Path<String>) -> HttpResponse {
    match shared.book.get(&id) {
        Some(op) => cors(HttpResponse::Ok().json(web::TraceView::of(&op))),
        None => cors(error(404, format!("no operation {id} here"))),
    }
}

/// `GET /ops/{id}/trace`: the same as a page.
async fn trace_page(shared: aw::Data<Shared>, id: aw::Path<String>) -> HttpResponse {
    match shared.book.get(&id) {
        Some(op) => web::html_response(web::trace_page(&web::TraceView::of(&op))),
        None => error(
            404,
            format!("no operation {id} here; its timeline is on the instance that ended it"),
        ),
    }
}

/// One open event stream of a client, counted while it lives.
struct StreamSlot {
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl StreamSlot {
    /// A slot for `client`, or `None` when it holds [`MAX_STREAMS_PER_CLIENT`] already.
    fn take(streams: &Arc<Mutex<HashMap<IpAddr, usize>>>, client: IpAddr) -> Option<StreamSlot> {
        let mut open = streams.lock().expect("stream count lock");
        let n = open.entry(client).or_default();
        if *n >= MAX_STREAMS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            streams: streams.clone(),
            client,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.lock().expect("stream count lock");
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// `GET /api/v1/ops/{id}/events`: the same public view, live, as server-sent events (`event: op`).
/// The stream ends once the operation has ended or has moved on to another instance. One client
/// address holds at most [`MAX_STREAMS_PER_CLIENT`] streams (429 beyond; the page then polls).
async fn op_events(
    req: HttpRequest,
    shared: aw::Data<Shared>,
    id: aw::Path<String>,
) -> HttpResponse {
    let Some(mut rx) = shared.book.watch(&id) else {
        return cors(error(404, format!("no operation {id} here")));
    };
    let client = req
        .peer_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical());
    let Some(slot) = StreamSlot::take(&shared.streams, client) else {
        return cors(error(
            429,
            format!(
                "{client} already holds {MAX_STREAMS_PER_CLIENT} live operation streams here; \
                 close some monitor pages, or poll GET /api/v1/ops/{id} instead"
            ),
        ));
    };
    let roles = shared.roles.clone();
    let stream = async_stream::stream! {
        let _slot = slot;
        loop {
            let op = rx.borrow_and_update().clone();
            let data = serde_json::to_string(&web::OpView::of(&op)).expect("an OpView serializes");
            yield Ok::<_, actix_web::Error>(aw::Bytes::from(format!("event: op\ndata: {data}\n\n")));
            if !op.state.is_running() || !roles.contains(&op.owner) {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                // A comment now and then keeps proxies from closing an idle stream, and finds a
                // client that has gone (a write fails), which frees its place under the cap.
                () = tokio::time::sleep(Duration::from_secs(5)) => {
                    yield Ok(aw::Bytes::from_static(b": keep-alive\n\n"));
                }
            }
        }
    };
    cors(
        HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, "text/event-stream"))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .streaming(stream),
    )
}

/// `POST /api/v1/handoff`: a signed operation from the previous actor.
async fn handoff(req: HttpRequest, shared: aw::Data<Shared>, body: aw::Bytes) -> HttpResponse {
    let Some(recipient) = &shared.handoff else {
        audit_request(
            &req,
            &shared,
            action::HANDOFF,
            None,
            "refused (503): this instance cannot take operations",
        );
        return error(503, "this instance cannot take operations (see mig check)");
    };
    let signed =
        match Signed::from_headers(|name| req.headers().get(name).and_then(|v| v.to_str().ok())) {
            Ok(s) => s,
            Err(e) => {
                audit_request(
                    &req,
                    &shared,
                    action::HANDOFF,
                    None,
                    &format!("refused (401): {e}"),
                );
                return error(401, e.to_string());
            }
        };
    let op_id = signed.op_id.clone();
    let seq = signed.seq;
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let span = tracing::info_span!("op", op_id = %signed.op_id, traceparent);
    if let Some(ids) = actors::telemetry::SpanIds::child_of(traceparent) {
        actors::telemetry::link(&span, &ids);
    }
    let sent = recipient.send(Handoff {
        signed,
        body: body.to_vec(),
    });
    async move {
        let (answer, result) = match sent.await {
            Ok(Ok(())) if shared.faults.active(faults::DROP_HANDOFF_REPLY) => {
                tracing::warn!("handoff accepted; its answer dropped at a test fault point");
                (
                    error(
                        503,
                        "fault point: the answer to an accepted handoff is dropped",
                    ),
                    format!("accepted (seq {seq}); the answer dropped at a test fault point"),
                )
            }
            Ok(Ok(())) => (
                HttpResponse::Ok().json(serde_json::json!({"accepted": true})),
                format!("accepted (seq {seq})"),
            ),
            Ok(Err(e)) => {
                tracing::warn!(status = e.status(), error = %e, "handoff refused");
                (
                    error(e.status(), e.to_string()),
                    format!("refused ({}) (seq {seq}): {e}", e.status()),
                )
            }
            Err(e) => (
                error(500, format!("the actor is gone: {e}")),
                format!("refused (500) (seq {seq}): the actor is gone"),
            ),
        };
        // The op id is the signed header's: a refused one may be anyone's claim, and says so.
        let op_id = actors::op::valid_id(&op_id).then_some(op_id.as_str());
        audit_request(&req, &shared, action::HANDOFF, op_id, &result);
        answer
    }
    .instrument(span)
    .await
}

#[derive(serde::Deserialize)]
struct StatusParams {
    nonce: String,
}

/// `GET /api/v1/ops/{id}/status?nonce=HEX`: whether this instance owns the operation, and since
/// which handoff, signed with the operation's key over the asker's nonce. A sender whose handoff
/// went unanswered trusts only this before it undoes anything.
async fn op_status(
    shared: aw::Data<Shared>,
    id: aw::Path<String>,
    q: aw::Query<StatusParams>,
) -> HttpResponse {
    if !actors::op::valid_id(&id) || !handoff::valid_nonce(&q.nonce) {
        return error(
            400,
            "the operation id and nonce are 32 lowercase hex digits",
        );
    }
    if shared.faults.active(faults::FAIL_STATUS) {
        return error(503, "fault point: status unavailable");
    }
    let Some(recipient) = &shared.status else {
        return error(503, "this instance cannot take operations (see mig check)");
    };
    let query = StatusQuery {
        op_id: id.into_inner(),
        nonce: q.into_inner().nonce,
    };
    match recipient.send(query).await {
        Ok(Some(a)) => cors(
            HttpResponse::Ok()
                .content_type("application/json")
                .insert_header((actors::auth::H_SIGNATURE, a.signature))
                .body(a.body),
        ),
        Ok(None) => error(404, "this instance does not answer for that operation"),
        Err(e) => error(500, format!("the actor is gone: {e}")),
    }
}

/// `GET /healthz` on mon: the process is alive and serving.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "alive"}))
}

/// `GET /readyz` on mon: 200 when this instance can do its job (configuration loaded, its grid
/// known, GUI bound, journal writable), else 503 with what is wrong.
async fn readyz(shared: aw::Data<Shared>) -> HttpResponse {
    let mut problems = Vec::new();
    if let Some(site) = &shared.site {
        if let Some(why) = site.operations_unavailable() {
            problems.push(why);
        }
    }
    if let Err(e) = shared.book.journal().probe() {
        problems.push(format!("the journal is not writable: {e}"));
    }
    let body = serde_json::json!({"ready": problems.is_empty(), "problems": problems});
    if problems.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `GET /metrics` on mon: Prometheus text.
async fn metrics(shared: aw::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::render(shared.proxy_stats.as_deref()))
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
