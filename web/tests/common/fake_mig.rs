//! Scripted stand-ins for the three instances an operation visits: the source MIG, MigHelper and
//! the final MIG, each an actix-web server on its own loopback address (127.0.60.1/2/3) serving
//! `web`'s pages and assets and the operation routes the real server has (serving the public
//! [`web::OpView`], as the real server does to a reader without credentials). A test plays a
//! script of operation states (built with the real `actors::op` model) into them, and kills an
//! instance the way an application stop would: its listener closes and its streams end.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::DefaultHeaders;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web as aw, App, HttpRequest, HttpResponse, HttpServer};
use actors::op::{Op, Role};
use bytes::Bytes;
use tokio::sync::watch;
use web::PageContext;

/// What one instance knows of the operation.
#[derive(Clone, Debug)]
pub enum Copy {
    Nothing,
    Op(Box<Op>),
    /// The instance is gone (its application stopped).
    Dead,
}

pub const CSRF: &str = "csrf-6f1d2a";
/// The GUI credentials when an instance asks for them (`username` set): admin / s3cret.
pub const USER: &str = "admin";
pub const PASSWORD: &str = "s3cret";
const BASIC: &str = "Basic YWRtaW46czNjcmV0";

struct State {
    role: Role,
    copy: watch::Sender<Copy>,
    page: Mutex<Option<PageContext>>,
    /// Every `POST /api/v1/ops` that reached the server, valid or not.
    posts: AtomicUsize,
    /// The bodies of the accepted posts, for the test to start its script.
    started: Mutex<Vec<serde_json::Value>>,
    /// The id `POST /api/v1/ops` hands out.
    next_id: Mutex<String>,
    /// Whether every route but the operation status ones needs [`USER`] and [`PASSWORD`].
    auth: std::sync::atomic::AtomicBool,
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
    handle: ServerHandle,
}

impl Instance {
    /// Starts an instance on `127.0.60.N` (N = 1, 2, 3 for source, helper and final).
    pub async fn start(role: Role) -> Instance {
        let n = match role {
            Role::Source => 1,
            Role::Helper => 2,
            Role::Target => 3,
        };
        let (copy, _) = watch::channel(Copy::Nothing);
        let state = Arc::new(State {
            role,
            copy,
            page: Mutex::new(None),
            posts: AtomicUsize::new(0),
            started: Mutex::new(Vec::new()),
            next_id: Mutex::new(String::new()),
            auth: std::sync::atomic::AtomicBool::new(false),
            unauthorized: AtomicUsize::new(0),
            dry_runs: AtomicUsize::new(0),
            cancels: AtomicUsize::new(0),
        });
        let data = aw::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                // The status routes are readable from any origin (docs/architecture.md); the test serves
                // everything with it, which only makes the page's own origin checks weaker.
                .wrap(from_fn(require_credentials))
                .wrap(DefaultHeaders::new().add((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")))
                .configure(web::configure_assets)
                .route("/", aw::get().to(index))
                .route("/ops/{id}", aw::get().to(monitor))
                .route("/api/v1/ops", aw::post().to(post_op))
                .route("/api/v1/csrf", aw::get().to(csrf))
                .route("/api/v1/ops/{id}/cancel", aw::post().to(cancel))
                .route("/api/v1/ops/{id}", aw::get().to(get_op))
                .route("/api/v1/ops/{id}/events", aw::get().to(events))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 60, n)), 0))
        .expect("binding a 127.0.60.N address");
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Instance {
            url: format!("http://{addr}"),
            state,
            handle,
        }
    }

    pub fn set_page(&self, ctx: PageContext) {
        *self.state.page.lock().unwrap() = Some(ctx);
    }

    pub fn set_next_id(&self, id: &str) {
        *self.state.next_id.lock().unwrap() = id.to_string();
    }

    /// Asks for HTTP basic auth on every route except the operation status routes.
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

    /// This instance's copy of the operation becomes `op`; its live streams send it.
    pub fn set(&self, op: &Op) {
        self.state.copy.send_replace(Copy::Op(Box::new(op.clone())));
    }

    /// The instance goes away: streams end, the listener closes, connections are refused.
    pub async fn kill(&self) {
        self.state.copy.send_replace(Copy::Dead);
        self.handle.stop(false).await;
    }
}

/// Basic auth as the real server does it: everything but `GET /api/v1/ops/{id}[/events]`, which
/// the page reads across grids with only the operation id.
async fn require_credentials(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req.app_data::<aw::Data<State>>().expect("State").clone();
    let status_route =
        req.method() == actix_web::http::Method::GET && req.path().starts_with("/api/v1/ops/");
    if state.auth.load(Ordering::SeqCst) && !status_route {
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

fn html(body: String) -> HttpResponse {
    web::html_response(body)
}

async fn index(state: aw::Data<State>) -> HttpResponse {
    match &*state.page.lock().unwrap() {
        Some(ctx) => html(web::index_page(ctx)),
        None => HttpResponse::NotFound().body("this instance serves no form"),
    }
}

async fn monitor(path: aw::Path<String>) -> HttpResponse {
    html(web::monitor_page(&path))
}

async fn post_op(
    state: aw::Data<State>,
    req: HttpRequest,
    body: aw::Json<serde_json::Value>,
) -> HttpResponse {
    state.posts.fetch_add(1, Ordering::SeqCst);
    let token = req
        .headers()
        .get(web::CSRF_HEADER)
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
        .json(serde_json::json!({"id": id, "monitor_url": format!("/ops/{id}")}))
}

async fn csrf() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "csrf": CSRF }))
}

async fn cancel(state: aw::Data<State>, req: HttpRequest, path: aw::Path<String>) -> HttpResponse {
    let token = req
        .headers()
        .get(web::CSRF_HEADER)
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

fn current(state: &State, id: &str) -> Option<Op> {
    match &*state.copy.borrow() {
        Copy::Op(op) if op.id == id => Some((**op).clone()),
        _ => None,
    }
}

async fn get_op(state: aw::Data<State>, path: aw::Path<String>) -> HttpResponse {
    match current(&state, &path) {
        Some(op) => HttpResponse::Ok().json(web::OpView::of(&op)),
        None => HttpResponse::NotFound().json(serde_json::json!({"error": "no such operation"})),
    }
}

/// `GET /api/v1/ops/{id}/events`: the instance's copy now and on every change, as `event: op`;
/// the stream ends once the copy is final or owned by another instance, or the instance dies.
async fn events(state: aw::Data<State>, path: aw::Path<String>) -> HttpResponse {
    let id = path.into_inner();
    if current(&state, &id).is_none() {
        return HttpResponse::NotFound().json(serde_json::json!({"error": "no such operation"}));
    }
    let rx = state.copy.subscribe();
    let role = state.role;
    let stream = futures_util::stream::unfold((rx, true, false), move |(mut rx, first, ended)| {
        let id = id.clone();
        async move {
            if ended {
                return None;
            }
            let mut first = first;
            loop {
                if !first {
                    // A short keep-alive: a dead instance's stream must end even if no change comes.
                    match tokio::time::timeout(Duration::from_secs(5), rx.changed()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return None,
                        Err(_) => {
                            return Some((
                                Ok::<_, actix_web::Error>(Bytes::from_static(b": ka\n\n")),
                                (rx, false, false),
                            ))
                        }
                    }
                }
                first = false;
                let copy = rx.borrow_and_update().clone();
                match copy {
                    Copy::Dead => return None,
                    Copy::Nothing => continue,
                    Copy::Op(op) if op.id != id => continue,
                    Copy::Op(op) => {
                        let end = op.state.is_final() || op.owner != role;
                        let json = serde_json::to_string(&web::OpView::of(&op))
                            .expect("an OpView serialises");
                        let event = Bytes::from(format!("event: op\ndata: {json}\n\n"));
                        return Some((Ok(event), (rx, false, end)));
                    }
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream)
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
