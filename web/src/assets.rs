//! The pages' script and style, embedded in the binary (the grids may be offline: no build step,
//! no CDN, no external font), and the headers every page and asset is served with. The pages carry
//! no inline script, so [`CONTENT_SECURITY_POLICY`] needs no `'unsafe-inline'`.

/// A policy the pages satisfy: scripts and styles only from this origin, and connections to any
/// HTTP origin, because the monitor follows the operation to the MigHelper and the target MIG.
/// `frame-ancestors 'none'` keeps the form from being framed by another site (clickjacking).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' http: https:; \
     img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

const CSS: &str = include_str!("../assets/mig.css");
const FORM_JS: &str = include_str!("../assets/form.js");
const MONITOR_JS: &str = include_str!("../assets/monitor.js");

/// The embedded static files, by the path the pages use (`/static/...`): content type and bytes.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    let (ctype, body) = match path {
        "/static/mig.css" => ("text/css; charset=utf-8", CSS),
        "/static/form.js" => ("text/javascript; charset=utf-8", FORM_JS),
        "/static/monitor.js" => ("text/javascript; charset=utf-8", MONITOR_JS),
        _ => return None,
    };
    Some((ctype, body.as_bytes()))
}

/// A page as an HTTP response, with the headers it is written for: the CSP, no sniffing, no
/// caching (an op's page changes), and no referrer (the monitor URL holds the op id, which is
/// what lets a reader see the operation).
pub fn html_response(body: String) -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cache-Control", "no-store"))
        .body(body)
}

/// Registers `GET /static/{file}` serving [`asset`], for an actix-web `App::configure`.
pub fn configure_assets(cfg: &mut actix_web::web::ServiceConfig) {
    let r = actors::api::STATIC;
    cfg.route(r.path, crate::ops::on(r).to(serve_asset));
}

async fn serve_asset(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    match asset(req.path()) {
        Some((ctype, body)) => actix_web::HttpResponse::Ok()
            .content_type(ctype)
            .insert_header(("Cache-Control", "no-cache"))
            .insert_header(("X-Content-Type-Options", "nosniff"))
            .body(body),
        None => actix_web::HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("no such file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::APP_NAME_PATTERN;

    #[test]
    fn assets_are_embedded_with_types() {
        let (ct, body) = asset("/static/monitor.js").unwrap();
        assert!(ct.starts_with("text/javascript"));
        assert!(!body.is_empty());
        assert!(asset("/static/mig.css").unwrap().0.starts_with("text/css"));
        assert!(asset("/static/form.js").is_some());
        assert!(asset("/static/../Cargo.toml").is_none());
        assert!(asset("/static/nope.js").is_none());
        // Nothing loaded from elsewhere: the grids may be offline.
        for p in ["/static/mig.css", "/static/form.js", "/static/monitor.js"] {
            let text = std::str::from_utf8(asset(p).unwrap().1).unwrap();
            assert!(!text.contains("@import") && !text.contains("//cdn"), "{p}");
        }
    }

    #[test]
    fn the_script_checks_names_with_the_dialect_rule() {
        let js = std::str::from_utf8(asset("/static/form.js").unwrap().1).unwrap();
        assert!(
            js.contains(&format!("/^{APP_NAME_PATTERN}$/")),
            "form.js pattern"
        );
    }

    /// Paths come from the contract the page carries (`actors::api::page_contract`), so a
    /// script that writes one of its own would drift from the server's table unseen.
    #[test]
    fn no_script_writes_an_api_path_and_every_route_it_names_exists() {
        let contract = actors::api::page_contract();
        for p in ["/static/form.js", "/static/monitor.js"] {
            let js = std::str::from_utf8(asset(p).unwrap().1).unwrap();
            assert!(!js.contains("/api/"), "{p} writes an /api/ path of its own");
            assert!(
                !js.contains("X-Mig-Csrf"),
                "{p} names the CSRF header itself"
            );
            for (i, _) in js.match_indices("route(\"") {
                let name = &js[i + 7..];
                let name = &name[..name.find('"').unwrap()];
                assert!(
                    contract["routes"][name].is_string(),
                    "{p} uses route {name:?}, which the contract does not have"
                );
            }
        }
    }
}
