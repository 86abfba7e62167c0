//! The HTTP side of `mig serve`: the GUI port (page and `/api/v1`) and the `mon` port.
//!
//! [`run`] takes listeners that are already bound, so a test binds port 0 and talks to the real
//! server over real sockets, and `main` can report a port that cannot be bound before anything starts.

use std::net::TcpListener;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web as aw, App, HttpResponse, HttpServer};
use actors::auth::GuiCredentials;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::site::Site;

/// How long in-flight requests get when MIG stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by every request handler.
pub struct Shared {
    pub site: Site,
    pub credentials: Option<GuiCredentials>,
}

/// Serves the GUI on `gui` and health and metrics on `mon` until `shutdown` is cancelled.
pub async fn run(
    site: Site,
    gui: TcpListener,
    mon: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let credentials = GuiCredentials::new(&site.props.username, &site.props.password);
    let shared = aw::Data::new(Shared { site, credentials });

    let gui_shared = shared.clone();
    let gui_server = HttpServer::new(move || {
        App::new()
            .app_data(gui_shared.clone())
            .wrap(from_fn(require_credentials))
            .service(aw::scope("/api/v1").route("/grids", aw::get().to(grids)))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    .listen(gui)?
    .run();

    let mon_shared = shared.clone();
    let mon_server = HttpServer::new(move || {
        App::new()
            .app_data(mon_shared.clone())
            .route("/healthz", aw::get().to(healthz))
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

/// HTTP basic auth on every GUI route when `username` is set. (The operation status routes, which
/// must be readable across grids with only the unguessable id, are exempted when they exist.)
async fn require_credentials(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let shared = req
        .app_data::<aw::Data<Shared>>()
        .expect("Shared is registered")
        .clone();
    if let Some(creds) = &shared.credentials {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !creds.check_header(given) {
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
    let site = &shared.site;
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

/// `GET /healthz` on mon: the process is alive and serving.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "alive"}))
}
