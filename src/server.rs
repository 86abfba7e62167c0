//! The HTTP side of `mig serve` and `mig helper`: the GUI port (`/api/v1`) and the `mon` port.
//! This file holds the state and the wiring; the handlers are split by concern: `auth` (Host
//! check, credentials, CSRF, audit), `ops` (the GUI's own API), `peers` (what other instances
//! call) and `mon`; the public operation routes are `mig_web::ops`. Paths come from `actors::api`.
//!
//! [`run`] takes listeners that are already bound, so a test binds port 0 and talks to the real
//! server over real sockets, and `main` can report a port that cannot be bound before anything starts.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Recipient};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use actors::api;
use actors::auth::GuiCredentials;
use actors::book::OpBook;
use actors::cancel::Canceller;
use actors::faults::Faults;
use actors::handoff::{Handoff, StatusQuery};
use actors::op::Role;
use actors::source::Source;
use mig_web::ops::on;
use proxy::ProxyStats;
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::host_check::{HostCheck, LocalAddr};
use crate::site::Site;

mod auth;
mod mon;
mod ops;
mod peers;

pub use auth::{audit_request, who};

/// How long in-flight requests get when MIG stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The header a state-changing GUI request carries: a token only a page (or client) that could
/// read this MIG's own responses knows, so a cross-site form cannot start an operation. One
/// constant, the page's, so the page and the server cannot disagree.
pub use mig_web::CSRF_HEADER;

/// Largest handoff body accepted (an operation with its steps is a few KiB).
const MAX_HANDOFF: usize = 256 * 1024;

/// Live event streams one client address may hold open at once (the streams are `mig_web::ops`').
pub use mig_web::MAX_STREAMS_PER_CLIENT;

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
    let feed = web::Data::new(mig_web::OpsFeed::new(shared.book.clone(), &shared.roles));
    let shared = web::Data::new(shared);

    let gui_shared = shared.clone();
    let gui_server = HttpServer::new(move || {
        App::new()
            .app_data(gui_shared.clone())
            .app_data(feed.clone())
            .app_data(web::PayloadConfig::new(MAX_HANDOFF))
            .app_data(web::JsonConfig::default().limit(16 * 1024))
            .wrap(from_fn(auth::require_credentials))
            // Outermost: a request for another host is refused before anything else looks at it.
            .wrap(from_fn(auth::check_host))
            // Every path and method from the route table (`actors::api`), which also says which
            // routes skip the credentials; the public operation routes are the page's own
            // (`mig_web::ops`), which the browser tests' fake MIG serves too.
            .route(api::INDEX.path, on(api::INDEX).to(ops::index))
            .configure(mig_web::configure_ops)
            .configure(mig_web::configure_assets)
            .route(api::GRIDS.path, on(api::GRIDS).to(ops::grids))
            .route(api::CSRF.path, on(api::CSRF).to(ops::csrf))
            .route(api::START.path, on(api::START).to(ops::start_op))
            .route(api::LIST.path, on(api::LIST).to(ops::list_ops))
            .route(api::AUDIT.path, on(api::AUDIT).to(ops::audit_log))
            .route(api::RECORD.path, on(api::RECORD).to(ops::get_record))
            .route(api::CANCEL.path, on(api::CANCEL).to(ops::cancel_op))
            .route(api::STATUS.path, on(api::STATUS).to(peers::op_status))
            .route(api::HANDOFF.path, on(api::HANDOFF).to(peers::handoff))
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
            .route("/healthz", web::get().to(mon::healthz))
            .route("/readyz", web::get().to(mon::readyz))
            .route("/metrics", web::get().to(mon::metrics))
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
