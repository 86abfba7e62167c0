//! The public operation routes: the view (`GET /api/v1/ops/{id}`), its live stream (`…/events`),
//! its timeline (`…/trace`) and the monitor and timeline pages, as actix-web handlers over an
//! [`OpsFeed`]. `mig serve` wires them with its op book and roles; the browser tests' fake MIG
//! wires the very same handlers with a book of its own, so the page's script is tested against
//! the stream production sends. Paths, stream framing and end condition come from
//! [`actors::api`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use actors::api;
use actors::book::OpBook;
use actors::op::Role;

use crate::{html_response, monitor_page, trace_page, OpView, TraceView};

/// Live event streams one client address may hold open at once: a few monitor pages' worth. The
/// streams are public, so without a cap one client could hold every connection MIG has.
pub const MAX_STREAMS_PER_CLIENT: usize = 8;

/// What the public operation routes read: the instance's op book and the roles it plays (its
/// streams end when the operation moves on to another), and the streams open per client.
pub struct OpsFeed {
    pub book: OpBook,
    pub roles: Vec<Role>,
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl OpsFeed {
    pub fn new(book: OpBook, roles: &[Role]) -> OpsFeed {
        OpsFeed {
            book,
            roles: roles.to_vec(),
            streams: Arc::default(),
        }
    }
}

/// An actix-web route guarded by `r`'s method, for `.route(r.path, on(r).to(handler))`.
pub fn on(r: api::Route) -> actix_web::Route {
    match r.method {
        api::Method::Get => web::get(),
        api::Method::Post => web::post(),
    }
}

/// Registers the public operation routes, for an actix-web `App::configure`; the app needs
/// `web::Data<OpsFeed>`.
pub fn configure_ops(cfg: &mut web::ServiceConfig) {
    cfg.route(api::MONITOR_PAGE.path, on(api::MONITOR_PAGE).to(monitor))
        .route(api::TRACE_PAGE.path, on(api::TRACE_PAGE).to(trace_html))
        .route(api::OP.path, on(api::OP).to(get_op))
        .route(api::EVENTS.path, on(api::EVENTS).to(op_events))
        .route(api::TRACE.path, on(api::TRACE).to(op_trace));
}

/// A JSON `{error}` answer with `status`.
pub fn error(status: u16, msg: impl Into<String>) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .json(serde_json::json!({"error": msg.into()}))
}

/// `resp`, readable from any origin: the public routes are read by the monitor page of another
/// instance.
pub fn cors(mut resp: HttpResponse) -> HttpResponse {
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    resp
}

/// `GET /ops/{id}`: the monitor page, which follows the operation wherever it runs.
async fn monitor(id: web::Path<String>) -> HttpResponse {
    if !actors::op::valid_id(&id) {
        return error(404, "not an operation id");
    }
    html_response(monitor_page(&id))
}

/// `GET /ops/{id}/trace`: the operation's timeline as a page.
async fn trace_html(feed: web::Data<OpsFeed>, id: web::Path<String>) -> HttpResponse {
    match feed.book.get(&id) {
        Some(op) => html_response(trace_page(&TraceView::of(&op))),
        None => error(
            404,
            format!("no operation {id} here; its timeline is on the instance that ended it"),
        ),
    }
}

/// `GET /api/v1/ops/{id}`: the operation as far as this instance knows it, as its public view
/// ([`OpView`]: no controller addresses, configuration values or controller output).
async fn get_op(feed: web::Data<OpsFeed>, id: web::Path<String>) -> HttpResponse {
    match feed.book.get(&id) {
        Some(op) => cors(HttpResponse::Ok().json(OpView::of(&op))),
        None => cors(error(404, format!("no operation {id} here"))),
    }
}

/// `GET /api/v1/ops/{id}/trace`: the operation's timeline across every instance that ran it, as
/// far as this instance knows it (the last one knows all of it).
async fn op_trace(feed: web::Data<OpsFeed>, id: web::Path<String>) -> HttpResponse {
    match feed.book.get(&id) {
        Some(op) => cors(HttpResponse::Ok().json(TraceView::of(&op))),
        None => cors(error(404, format!("no operation {id} here"))),
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

/// `GET /api/v1/ops/{id}/events`: the public view, live, as server-sent events
/// ([`api::event`]), a comment every [`api::KEEP_ALIVE`] while idle. The stream ends once the
/// operation has ended or has moved on to another instance ([`api::stream_ends`]). One client
/// address holds at most [`MAX_STREAMS_PER_CLIENT`] streams (429 beyond; the page then polls).
async fn op_events(
    req: HttpRequest,
    feed: web::Data<OpsFeed>,
    id: web::Path<String>,
) -> HttpResponse {
    let Some(mut rx) = feed.book.watch(&id) else {
        return cors(error(404, format!("no operation {id} here")));
    };
    let client = req
        .peer_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical());
    let Some(slot) = StreamSlot::take(&feed.streams, client) else {
        return cors(error(
            429,
            format!(
                "{client} already holds {MAX_STREAMS_PER_CLIENT} live operation streams here; \
                 close some monitor pages, or poll GET {} instead",
                api::OP.for_op(&id)
            ),
        ));
    };
    let roles = feed.roles.clone();
    let stream = async_stream::stream! {
        let _slot = slot;
        loop {
            let op = rx.borrow_and_update().clone();
            yield Ok::<_, actix_web::Error>(web::Bytes::from(api::event(&OpView::of(&op))));
            if api::stream_ends(&op, &roles) {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(api::KEEP_ALIVE) => {
                    yield Ok(web::Bytes::from_static(api::KEEP_ALIVE_COMMENT.as_bytes()));
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
