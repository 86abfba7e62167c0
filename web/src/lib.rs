//! MIG's GUI: the page where a person starts a migrate or a snapshot, and the page that follows the
//! operation live across the three instances that run it (source MIG, MigHelper, final MIG).
//! The package is `mig-web` (`mig_web::` in code) so that it never shadows `actix_web::web`.
//!
//! - [`pages`]: the pages, rendered by pure functions from plain data.
//! - [`assets`]: the embedded script and style, and the headers pages are served with
//!   ([`CONTENT_SECURITY_POLICY`]; the pages carry no inline script).
//! - [`ops`]: the public operation routes (view, live stream, timeline, monitor and timeline
//!   pages) as actix-web handlers over an [`OpsFeed`]; `mig serve` and the browser tests' fake MIG
//!   wire the same handlers, so the page is tested against the stream production sends.
//! - [`view`]: the operation's public wire view; it lives with the route table in
//!   `actors::api`, which every path here comes from.
//!
//! # Wiring it into the server
//!
//! - `GET /` → `html_response(index_page(&ctx))`; `ctx.csrf_token` is a random secret of the
//!   process, and `POST /api/v1/ops` refuses (403 `{error}`) a request whose [`CSRF_HEADER`] does
//!   not match it (compare in constant time). The page posts JSON `{kind, target_app,
//!   target_grid}` to the contract's `start` route with the browser's credentials, expects
//!   202 `{id, monitor_url}` and goes to `monitor_url` (e.g. `/ops/{id}`); on 400/403/409 it
//!   shows the body's `error` to the user, so write it for a person.
//! - `App::configure(mig_web::configure_ops)` with an [`OpsFeed`] as app data serves the public
//!   operation routes, `App::configure(mig_web::configure_assets)` serves `/static/*` (they reveal
//!   nothing, so they may skip authentication: `actors::api::is_public` says which may).
//! - The monitor reads the public view and its live stream on every instance of the plan,
//!   cross-origin and without credentials; the page keeps the copy with the highest `version`
//!   and ignores older ones, so the receiver of a handoff must continue the sender's `version`,
//!   never restart it.

#![forbid(unsafe_code)]

use actors::properties::Mode;

pub mod assets;
mod html;
pub mod ops;
pub mod pages;

/// The operation's public wire view (moved to `actors::api::view`, beside the routes).
pub use actors::api::view;
pub use assets::{asset, configure_assets, html_response, CONTENT_SECURITY_POLICY};
pub use html::escape;
pub use ops::{configure_ops, OpsFeed, MAX_STREAMS_PER_CLIENT};
pub use pages::{helper_page, index_page, monitor_page, trace_page};
pub use view::{OpSummary, OpView, TraceView};

/// Everything the form page shows, gathered by the server from its properties and grid.info.
#[derive(Debug, Clone)]
pub struct PageContext {
    /// The name of the application MIG lives in, when it knows it.
    pub app_name: Option<String>,
    /// The grid MIG runs on: id and location.
    pub own_grid: Option<(String, Option<String>)>,
    /// Why operations are not offered, when they are not; the page then offers nothing.
    pub unavailable: Option<String>,
    /// What the form offers.
    pub mode: Mode,
    /// The other grids of grid.info: id and location.
    pub targets: Vec<(String, Option<String>)>,
    /// Sent back in the `X-Mig-Csrf` header of `POST /api/v1/ops`.
    pub csrf_token: String,
    /// No `username` is set, so the form and the API need no credentials: the page says so.
    pub open: bool,
    /// This instance's recent operations, newest first (`GET /api/v1/ops` serves the same).
    pub history: Vec<OpSummary>,
}

/// The header a state-changing request must carry, holding [`PageContext::csrf_token`].
pub use actors::api::CSRF_HEADER;

/// The same rule as `dialect::AppName`, for the browser: 1–64 letters, digits, '-' and '_',
/// starting with a letter. The script holds the same expression; a test checks they agree.
pub const APP_NAME_PATTERN: &str = "[A-Za-z][A-Za-z0-9_-]{0,63}";
