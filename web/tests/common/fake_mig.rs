//! Scripted stand-ins for the three instances an operation visits: the source MIG, MigHelper and
//! the final MIG, each an actix-web server on its own loopback address (127.0.60.1/2/3). What the
//! page follows is served by the REAL handlers (`mig_web::ops`: the public view, its live stream, the
//! timeline, the monitor page) over a real op book, with the roles the real instances play and the
//! real rule for which routes need credentials (`actors::api::is_public`), so the page's script is
//! tested against the stream production sends. Only the form's side (its page, starting, the dry
//! run, cancelling) is scripted here. A test plays a script of operation states (built with the
//! real `actors::op` model) into them, and kills an instance the way an application stop would:
//! its listener closes and its connections drop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actors::api;
use actors::book::OpBook;
use actors::journal::Journal;
use actors::op::{Op, Role};
use mig_web::ops::on;
use mig_web::{OpsFeed, PageContext};

pub const CSRF: &str = "csrf-6f1d2a";
/// The GUI credentials when an instance asks for them (`username` set): admin / s3cret.
pub const USER: &str = "admin";
pub const PASSWORD: &str = "s3cret";
const BASIC: &str = "Basic YWRtaW46czNjcmV0";

/// The scripted side of one instance: the form page and what was posted to it.
struct State {
    page: Mutex<Option<PageContext>>,
    /// Every `POST /api/v1/ops` that reached the server, valid or not.
    posts: AtomicUsize,
    /// The bodies of the accepted posts, for the test to start its script.
    started: Mutex<Vec<serde_json::Value>>,
    /// The id `POST /api/v1/ops` hands out.
    next_id: Mutex<String>,
    /// Whether the routes that are not public need [`USER`] and [`PASSWORD`].
    auth: AtomicBool,
    /// Requests refused for want of credentials.
    unauthorized: AtomicUsize,
    /// `POST /api/v1/ops` with `"dry_run": true` that reached the server.
    dry_runs: AtomicUsize,
    /// `POST /api/v1/ops/{id}/cancel` with the right CSRF token.
    cancels: AtomicUsize,
}

pub struct Instance {
    pub url: String,
    state: Arc<State>,
    /// The op book the real handlers read; [`Instance::set`] publishes into it.
    book: OpBook,
    handle: ServerHandle,
    _journal: tempfile::TempDir,
}

/// The roles the real instance in `role`'s place plays: the source and the final MIG are each a
/// `mig serve` (source of what it starts, final MIG of what it is handed).
pub fn roles_of(role: Role) -> &'static [Role] {
    match role {
        Role::Source | Role::Target => api::SERVE_ROLES,
        Role::Helper => api::HELPER_ROLES,
    }
}

impl Instance {
    /// Starts an instance on `127.0.60.N` (N = 1, 2, 3 for source, helper and final).
    pub async fn start(role: Role) -> Instance {
        let n = match role {
            Role::Source => 1,
            Role::Helper => 2,
            Role::Target => 3,
        };
        Instance::start_at(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 60, n)), 0),
            role,
        )
        .await
    }

    /// Starts an instance in `role` listening on `addr`.
    pub async fn start_at(addr: SocketAddr, role: Role) -> Instance {
        let dir = tempfile::tempdir().expect("a journal directory");
        let book = OpBook::open(Journal::open(dir.path()).expect("a journal")).expect("an op book");
        let state = Arc::new(State {
            page: Mutex::new(None),
            posts: AtomicUsize::new(0),
            started: Mutex::new(Vec::new()),
            next_id: Mutex::new(String::new()),
            auth: AtomicBool::new(false),
            unauthorized: AtomicUsize::new(0),
            dry_runs: AtomicUsize::new(0),
            cancels: AtomicUsize::new(0),
        });
        let data = web::Data::from(state.clone());
        let feed = web::Data::new(OpsFeed::new(book.clone(), roles_of(role)));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(feed.clone())
                .wrap(from_fn(require_credentials))
                .configure(mig_web::configure_ops)
                .configure(mig_web::configure_assets)
                .route(api::INDEX.path, on(api::INDEX).to(index))
                .route(api::START.path, on(api::START).to(post_op))
                .route(api::CSRF.path, on(api::CSRF).to(csrf))
                .route(api::CANCEL.path, on(api::CANCEL).to(cancel))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .bind(addr)
        .expect("binding a 127.0.60.N address");
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Instance {
            url: format!("http://{addr}"),
            state,
            book,
            handle,
            _journal: dir,
        }
    }

    pub fn set_page(&self, ctx: PageContext) {
        *self.state.page.lock().unwrap() = Some(ctx);
    }

    pub fn set_next_id(&self, id: &str) {
        *self.state.next_id.lock().unwrap() = id.to_string();
    }

    /// Asks for HTTP basic auth on every route that is not public.
    pub fn require_auth(&self) {
        self.state.auth.store(true, Ordering::SeqCst);
    }

    pub fn unauthorized(&self) -> usize {
        self.state.unauthorized.load(Ordering::SeqCst)
    }

    pub fn posts(&self) -> usize {
        self.state.posts.load(Ordering::SeqCst)
    }

    pub fn dry_runs(&self) -> usize {
        self.state.dry_runs.load(Ordering::SeqCst)
    }

    pub fn cancels(&self) -> usize {
        self.state.cancels.load(Ordering::SeqCst)
    }

    pub fn started(&self) -> Vec<serde_json::Value> {
        self.state.started.lock().unwrap().clone()
    }

    /// This instance's copy of the operation becomes `op` (as a real instance's book takes it:
    /// never an older `version`); its live streams send it.
    pub fn set(&self, op: &Op) {
        self.book.publish(op.clone());
    }

    /// The instance goes away: the listener closes, its connections (and streams) drop.
    pub async fn kill(&self) {
        self.handle.stop(false).await;
    }
}

/// Basic auth where the real server asks for it: on every route the route table does not make
/// public.
async fn require_credentials(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<State>>().expect("State").clone();
    let public = api::is_public(
        req.method().as_str(),
        req.path(),
        req.headers().contains_key(actors::auth::H_SIGNATURE),
    );
    if state.auth.load(Ordering::SeqCst) && !public {
        let given = req.headers().get(header::AUTHORIZATION);
        if given.and_then(|v| v.to_str().ok()) != Some(BASIC) {
            state.unauthorized.fetch_add(1, Ordering::SeqCst);
            let resp = HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, r#"Basic realm="MIG""#))
                .json(serde_json::json!({"error": "this MIG needs its GUI username and password"}));
            return Ok(req.into_response(resp));
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

async fn index(state: web::Data<State>) -> HttpResponse {
    match &*state.page.lock().unwrap() {
        Some(ctx) => mig_web::html_response(mig_web::index_page(ctx)),
        None => HttpResponse::NotFound().body("this instance serves no form"),
    }
}

async fn post_op(
    state: web::Data<State>,
    req: HttpRequest,
    body: web::Json<serde_json::Value>,
) -> HttpResponse {
    state.posts.fetch_add(1, Ordering::SeqCst);
    let token = req
        .headers()
        .get(mig_web::CSRF_HEADER)
        .and_then(|v| v.to_str().ok());
    if token != Some(CSRF) {
        return HttpResponse::Forbidden()
            .json(serde_json::json!({"error": "missing or wrong CSRF token"}));
    }
    let name = body["target_app"].as_str().unwrap_or_default();
    if dialect::AppName::new(name).is_err() {
        return HttpResponse::BadRequest()
            .json(serde_json::json!({"error": format!("bad target_app {name:?}")}));
    }
    if body["dry_run"] == true {
        // Two checks, one of them failed, as the real dry run answers.
        state.dry_runs.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::Ok().json(serde_json::json!({"checks": [
            {"name": "target name", "ok": true, "detail": format!("{name} is free on grid g2")},
            {"name": "room", "ok": false, "detail": "grid g2 has 10 bytes free, shop's volumes need 64: free space on it, or pick another grid"},
        ]}));
    }
    state.started.lock().unwrap().push(body.into_inner());
    let id = state.next_id.lock().unwrap().clone();
    HttpResponse::Accepted()
        .json(serde_json::json!({"id": id, "monitor_url": api::MONITOR_PAGE.for_op(&id)}))
}

async fn csrf() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "csrf": CSRF }))
}

async fn cancel(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let token = req
        .headers()
        .get(mig_web::CSRF_HEADER)
        .and_then(|v| v.to_str().ok());
    if token != Some(CSRF) {
        return HttpResponse::Forbidden()
            .json(serde_json::json!({"error": "missing or wrong CSRF token"}));
    }
    state.cancels.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Accepted().json(serde_json::json!({
        "id": path.into_inner(),
        "cancelled": {"user": "anonymous", "from": "127.0.0.1", "at": "2026-01-01T00:00:00Z"},
    }))
}

/// The three instances of one operation.
pub struct Trio {
    pub source: Instance,
    pub helper: Instance,
    pub target: Instance,
}

impl Trio {
    pub async fn start() -> Trio {
        Trio {
            source: Instance::start(Role::Source).await,
            helper: Instance::start(Role::Helper).await,
            target: Instance::start(Role::Target).await,
        }
    }

    /// For a snapshot the final MIG is the re-started source's; here it is the third instance
    /// either way, since the stand-in source is gone by then.
    pub fn plan(&self) -> actors::op::Plan {
        let final_url = self.target.url.clone();
        let mut p = testkit::sample_plan();
        p.target_app = "shop-eu".into();
        p.source_mig_url = self.source.url.clone();
        p.helper_url = self.helper.url.clone();
        p.final_mig_url = final_url;
        p.helper_app = "mighelper-0a1b2c3d".into();
        p.helper_config = vec![];
        p
    }
}
