//! The `mon` port: liveness, readiness and Prometheus metrics.

use actix_web::{web, HttpResponse};

use super::Shared;

/// `GET /healthz` on mon: the process is alive and serving.
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "alive"}))
}

/// `GET /readyz` on mon: 200 when this instance can do its job (configuration loaded, its grid
/// known, GUI bound, journal writable), else 503 with what is wrong.
pub(super) async fn readyz(shared: web::Data<Shared>) -> HttpResponse {
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
pub(super) async fn metrics(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::render(shared.proxy_stats.as_deref()))
}
