//! The pages, rendered by pure functions from plain data: the form ([`index_page`]), the monitor
//! ([`monitor_page`]), the timeline ([`trace_page`]) and MigHelper's own page ([`helper_page`]).
//! Every page that runs a script carries the HTTP contract its script reads its paths from
//! (`actors::api::page_contract`, in a `mig-api` meta element), so no script writes a path.

use actors::api;
use actors::properties::Mode;

use crate::{escape, OpSummary, PageContext, TraceView, APP_NAME_PATTERN};

/// The document head; `script` is the page's one script, or empty for a page without one.
/// A page with a script also carries the HTTP contract (`mig-api`): the script's paths.
fn head(title: &str, script: &str, extra_meta: &str) -> String {
    let script = if script.is_empty() {
        String::new()
    } else {
        format!(
            "<meta name=\"mig-api\" content=\"{}\">\n<script src=\"/static/{script}\" defer></script>\n",
            escape(&api::page_contract().to_string())
        )
    };
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n{extra_meta}\
         <title>{title}</title>\n<link rel=\"icon\" href=\"data:,\">\n\
         <link rel=\"stylesheet\" href=\"/static/mig.css\">\n{script}</head>\n",
        title = escape(title),
    )
}

fn grid_label(id: &str, location: Option<&str>) -> String {
    match location {
        Some(loc) if !loc.is_empty() => format!("{} ({})", escape(id), escape(loc)),
        _ => escape(id),
    }
}

fn banner(app: &str, grid: &str) -> String {
    format!(
        "<header class=\"bar\"><div class=\"wrap\"><span class=\"brand\">MIG</span>\
         <span class=\"where\">{app} · {grid}</span></div></header>\n"
    )
}

/// The form page (`GET /`): operation, target application name and target grid.
pub fn index_page(ctx: &PageContext) -> String {
    let app = ctx.app_name.as_deref().map(escape);
    let app_shown = app.clone().unwrap_or_else(|| "this application".into());
    let own = match &ctx.own_grid {
        Some((id, loc)) => grid_label(id, loc.as_deref()),
        None => "unknown grid".into(),
    };
    let mut out = head(
        &format!("MIG · {}", ctx.app_name.as_deref().unwrap_or("application")),
        "form.js",
        &format!(
            "<meta name=\"mig-csrf\" content=\"{}\">\n",
            escape(&ctx.csrf_token)
        ),
    );
    out.push_str("<body>\n");
    out.push_str(&banner(&app_shown, &own));
    out.push_str("<main class=\"wrap\" id=\"main\">\n");
    out.push_str(&format!(
        "<h1>Move or copy <span class=\"app\">{app_shown}</span> to another grid</h1>\n\
         <dl class=\"facts\"><div><dt>Application</dt><dd id=\"app-name\">{app_shown}</dd></div>\
         <div><dt>Runs on grid</dt><dd id=\"own-grid\">{own}</dd></div></dl>\n"
    ));

    if ctx.open {
        out.push_str(OPEN_BANNER);
    }
    if let Some(why) = &ctx.unavailable {
        out.push_str(&format!(
            "<section class=\"notice error\" id=\"unavailable\" role=\"alert\">\
             <h2>Operations are not available</h2><p>{}</p>\
             <p>Fix this in MIG's configuration and restart MIG. The application itself keeps \
             running and its traffic still passes through.</p></section>\n",
            escape(why)
        ));
        out.push_str(&history_section(&ctx.history));
        out.push_str("</main>\n</body>\n</html>\n");
        return out;
    }

    out.push_str("<form id=\"op-form\" novalidate>\n");
    out.push_str(&operation_fieldset(ctx.mode));
    out.push_str(&format!(
        "<div class=\"field\"><label for=\"target-app\">Target application name</label>\
         <input id=\"target-app\" name=\"target_app\" type=\"text\" required maxlength=\"64\" \
         pattern=\"{APP_NAME_PATTERN}\" autocomplete=\"off\" autocapitalize=\"off\" \
         spellcheck=\"false\" aria-describedby=\"target-app-hint target-app-error\">\
         <p class=\"hint\" id=\"target-app-hint\">1 to 64 letters, digits, “-” or “_”, \
         starting with a letter.</p>\
         <p class=\"field-error\" id=\"target-app-error\" aria-live=\"polite\"></p></div>\n"
    ));
    out.push_str(
        "<div class=\"field\"><label for=\"target-grid\">Target grid</label>\
         <select id=\"target-grid\" name=\"target_grid\" required>",
    );
    for (id, loc) in &ctx.targets {
        out.push_str(&format!(
            "<option value=\"{}\">{}</option>",
            escape(id),
            grid_label(id, loc.as_deref())
        ));
    }
    out.push_str("</select>");
    if ctx.targets.is_empty() {
        out.push_str(
            "<p class=\"field-error\" id=\"no-targets\">grid.info lists no grid other than \
             this one: add the target grid there first.</p>",
        );
    }
    out.push_str("</div>\n");
    out.push_str(
        "<div class=\"field\"><label for=\"max-rate\">Bandwidth limit (optional)</label>\
         <input id=\"max-rate\" name=\"max_rate\" type=\"text\" maxlength=\"16\" \
         autocomplete=\"off\" spellcheck=\"false\" placeholder=\"e.g. 8M\" \
         aria-describedby=\"max-rate-hint\">\
         <p class=\"hint\" id=\"max-rate-hint\">Bytes per second the copy may take of the link, \
         with K, M or G (1024-based). Empty: this MIG's <code>max_rate</code> property.</p></div>\n",
    );
    out.push_str(&format!(
        "<div class=\"actions\"><button type=\"submit\" id=\"submit\"{0}>Start</button>\
         <button type=\"button\" id=\"check\" class=\"secondary\"{0}>Check</button>\
         <span class=\"hint\" id=\"submit-hint\" aria-live=\"polite\"></span></div>\n\
         <section id=\"checks\" aria-live=\"polite\" hidden><h2>Checks</h2>\
         <ul id=\"check-list\" class=\"checks\"></ul></section>\n\
         <p class=\"notice error\" id=\"form-error\" role=\"alert\" hidden></p>\n</form>\n",
        if ctx.targets.is_empty() {
            " disabled"
        } else {
            ""
        }
    ));
    out.push_str(&history_section(&ctx.history));
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

/// `RolledBack` → `rolled_back`: a state as the API spells it, from its `Debug` name.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// "Recent operations": this instance's history, newest first, each with its monitor and
/// timeline, and a link to the audit log.
fn history_section(history: &[OpSummary]) -> String {
    let mut out =
        String::from("<section id=\"history\" class=\"history\"><h2>Recent operations</h2>\n");
    if history.is_empty() {
        out.push_str("<p class=\"muted\" id=\"history-empty\">None yet on this MIG.</p>\n");
    } else {
        out.push_str(
            "<table class=\"timeline\"><thead><tr><th scope=\"col\">operation</th>\
             <th scope=\"col\">target</th><th scope=\"col\">state</th>\
             <th scope=\"col\">when (UTC)</th><th scope=\"col\">took</th>\
             <th scope=\"col\"></th></tr></thead>\n<tbody>\n",
        );
        for h in history {
            let state = snake_case(&format!("{:?}", h.state));
            let when = h
                .started_at
                .as_deref()
                .map(|t| t.get(..19).unwrap_or(t).replace('T', " "))
                .unwrap_or_default();
            let took = h
                .duration_secs
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_default();
            out.push_str(&format!(
                "<tr class=\"op-{state}\" data-op-id=\"{id}\"><td>{kind}</td>\
                 <td>{app} on {grid}</td><td>{state}</td><td>{when}</td><td>{took}</td>\
                 <td><a href=\"{monitor}\">monitor</a> · <a href=\"{trace}\">timeline</a></td></tr>\n",
                id = escape(&h.id),
                kind = escape(h.kind.as_str()),
                app = escape(&h.target_app),
                grid = escape(&h.target_grid),
                state = escape(&state),
                when = escape(&when),
                monitor = escape(&h.monitor_url),
                trace = escape(&h.trace_url),
            ));
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str(&format!(
        "<p class=\"muted small\"><a href=\"{}\">as JSON</a> · \
             <a href=\"{}\" id=\"audit-link\">audit log</a> (who did what here)</p>\n\
             </section>\n",
        api::LIST.path,
        api::AUDIT.path
    ));
    out
}

/// Said on the form when `username` is empty: the seed's rule (no username, no authentication)
/// stays, but nobody should run that way without knowing it.
const OPEN_BANNER: &str = "<section class=\"notice warn\" id=\"open-warning\" role=\"note\">\
     <h2>No authentication</h2><p>This MIG has no <code>username</code> set, so anyone who can \
     reach this page can move or copy the application. Set <code>username</code> and \
     <code>password</code> in MIG's properties and restart it.</p></section>\n";

fn operation_fieldset(mode: Mode) -> String {
    const MIGRATE: (&str, &str, &str) = (
        "migrate",
        "Migrate",
        "Move the application to the target grid. The source is stopped and destroyed.",
    );
    const SNAPSHOT: (&str, &str, &str) = (
        "snapshot",
        "Snapshot",
        "Copy the application to the target grid, stopped. The source is started again.",
    );
    let (kinds, fixed): (&[_], bool) = match mode {
        Mode::Both => (&[MIGRATE, SNAPSHOT], false),
        Mode::Migrate => (&[MIGRATE], true),
        Mode::Snapshot => (&[SNAPSHOT], true),
    };
    let mut out = String::from("<fieldset class=\"kinds\"><legend>Operation</legend>");
    for (i, (value, label, help)) in kinds.iter().enumerate() {
        // With one kind the choice is shown, checked and fixed: a disabled radio still reads
        // as checked to the script and to screen readers.
        let attrs = if fixed {
            " checked disabled"
        } else if i == 0 {
            " checked"
        } else {
            ""
        };
        out.push_str(&format!(
            "<label class=\"kind\"><input type=\"radio\" name=\"kind\" value=\"{value}\" \
             id=\"kind-{value}\"{attrs} aria-describedby=\"kind-{value}-help\">\
             <span><strong>{label}</strong><span class=\"hint\" id=\"kind-{value}-help\">{help}\
             </span></span></label>"
        ));
    }
    if fixed {
        out.push_str(&format!(
            "<p class=\"hint\" id=\"mode-fixed\">This MIG offers only this operation \
             (mode = {}).</p>",
            kinds[0].0
        ));
    }
    out.push_str("</fieldset>\n");
    out
}

/// MigHelper's `GET /`: what this is, and where the operation's page is. It names no operation:
/// the operation id is what lets a reader see the operation, and MigHelper asks for no credentials.
pub fn helper_page() -> String {
    let mut out = head("MigHelper", "", "");
    out.push_str("<body>\n");
    out.push_str(&banner("MigHelper", "target grid"));
    out.push_str(
        "<main class=\"wrap\" id=\"helper\">\n<h1>MigHelper</h1>\n\
         <p>This is MigHelper, the helper MIG provisions on the target grid to move one \
         application, and destroys once the move is over.</p>\n\
         <p>It shows nothing here. Follow the operation on its monitor page, which the source \
         application's MIG opened when the operation started (<code>/ops/</code> followed by the \
         operation id); that page follows the operation here by itself.</p>\n\
         </main>\n</body>\n</html>\n",
    );
    out
}

/// The monitor page (`GET /ops/{id}`): the script fetches the operation and follows it live.
/// It changes nothing, so it needs no CSRF token; `op_id` should already be checked with
/// `actors::op::valid_id`, and is escaped regardless.
pub fn monitor_page(op_id: &str) -> String {
    let id = escape(op_id);
    let short: String = op_id.chars().take(8).collect();
    let mut out = head(&format!("MIG · operation {short}"), "monitor.js", "");
    out.push_str("<body>\n");
    out.push_str(&banner("Operation monitor", &escape(&short)));
    out.push_str(&format!(
        "<main class=\"wrap\" id=\"monitor\" data-op-id=\"{id}\">\n\
         <h1 id=\"title\">Operation <code>{short}</code></h1>\n\
         <p id=\"plan\" class=\"muted\"></p>\n\
         <p id=\"summary\" class=\"summary\" role=\"status\" aria-live=\"polite\">Connecting…</p>\n\
         <p id=\"following\" class=\"muted small\"></p>\n\
         <div id=\"outcome\"></div>\n\
         <div class=\"actions\" id=\"cancel-box\" hidden><button type=\"button\" id=\"cancel\" \
         class=\"danger\">Cancel the operation</button>\
         <span class=\"hint\" id=\"cancel-hint\" aria-live=\"polite\"></span></div>\n\
         <div id=\"monitors\" class=\"monitors\"></div>\n\
         <noscript><p class=\"notice error\">This page needs JavaScript to follow the operation. \
         <a href=\"{json}\">The operation as JSON</a> shows the same.</p></noscript>\n\
         </main>\n</body>\n</html>\n",
        short = escape(&short),
        json = api::OP.for_op(&id),
    ));
    out
}

/// The timeline page (`GET /ops/{id}/trace`): every step, handoff and grid command of the
/// operation across the instances that ran it, in order, with the time since the first event and
/// how long each took. Rendered on the server from the operation's own trace: no script needed.
pub fn trace_page(op: &TraceView) -> String {
    let short: String = op.id.chars().take(8).collect();
    let mut out = head(&format!("MIG · timeline {short}"), "", "");
    out.push_str("<body>\n");
    out.push_str(&banner("Operation timeline", &escape(&short)));
    out.push_str(&format!(
        "<main class=\"wrap\" id=\"trace\" data-trace-id=\"{tid}\">\n\
         <h1>Timeline of operation <code>{short}</code></h1>\n\
         <p class=\"muted\">{kind} · {state} · trace id <code>{tid}</code> · \
         <a href=\"{monitor}\">back to the monitor</a> · <a href=\"{json}\">as JSON</a></p>\n\
         <table class=\"timeline\"><caption class=\"muted\">{n} events, oldest first</caption>\n\
         <thead><tr><th scope=\"col\">+s</th><th scope=\"col\">instance</th><th scope=\"col\">kind</th>\
         <th scope=\"col\">what</th><th scope=\"col\">took</th></tr></thead>\n<tbody>\n",
        tid = escape(&op.trace_id),
        short = escape(&short),
        monitor = api::MONITOR_PAGE.for_op(&escape(&op.id)),
        json = api::TRACE.for_op(&escape(&op.id)),
        kind = escape(op.kind.as_str()),
        state = escape(&format!("{:?}", op.state).to_lowercase()),
        n = op.events.len(),
    ));
    let t0 = op
        .events
        .first()
        .and_then(|e| humantime::parse_rfc3339(&e.at).ok());
    for e in &op.events {
        let offset = match (t0, humantime::parse_rfc3339(&e.at)) {
            (Some(a), Ok(b)) => b
                .duration_since(a)
                .map(|d| format!("{:.3}", d.as_secs_f64()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let took = e
            .millis
            .map(|ms| format!("{:.3} s", ms as f64 / 1000.0))
            .unwrap_or_default();
        let error = e
            .error
            .as_deref()
            .map(|x| format!("<br><span class=\"reason\">{}</span>", escape(x)))
            .unwrap_or_default();
        out.push_str(&format!(
            "<tr class=\"ev-{kind}{failed}\" data-instance=\"{inst}\"><td>{offset}</td><td>{inst}</td>\
             <td>{kind}</td><td>{what}{error}</td><td>{took}</td></tr>\n",
            kind = escape(&e.kind),
            failed = if e.error.is_some() { " failed" } else { "" },
            inst = escape(&e.instance),
            what = escape(&e.what),
        ));
    }
    out.push_str("</tbody></table>\n</main>\n</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{asset, configure_assets, html_response, CONTENT_SECURITY_POLICY};

    #[test]
    fn the_timeline_lists_every_event_escaped() {
        let plan = actors::test_support::sample_plan();
        let mut op = actors::op::Op::new(actors::op::new_id(), actors::op::Kind::Migrate, plan);
        op.start_step(actors::op::PROVISIONING_HELPER);
        op.fail_step(actors::op::PROVISIONING_HELPER, "<script>boom</script>");
        op.trace("command", "app list on <h>".into(), Some(1500), None);
        let html = trace_page(&TraceView::of(&op));
        assert_eq!(html.matches("<tr class=\"ev-").count(), 3, "{html}");
        assert!(html.contains("&lt;script&gt;boom") && !html.contains("<script>boom"));
        assert!(html.contains("1.500 s"));
        assert!(html.contains(&op.trace_id));
    }

    #[test]
    fn the_form_offers_check_beside_start_and_the_monitor_a_cancel_button() {
        let form = index_page(&ctx());
        // After Start in keyboard order: the form's tab order stays kind, name, grid, Start.
        let (check, start) = (
            form.find("id=\"check\"").unwrap(),
            form.find("id=\"submit\"").unwrap(),
        );
        assert!(start < check);
        assert!(form.contains("id=\"check-list\""));
        let monitor = monitor_page(&actors::op::new_id());
        assert!(monitor.contains("id=\"cancel\"") && monitor.contains("id=\"cancel-box\" hidden"));
    }

    fn ctx() -> PageContext {
        PageContext {
            app_name: Some("shop".into()),
            own_grid: Some(("g1".into(), Some("Los Angeles".into()))),
            unavailable: None,
            mode: Mode::Both,
            targets: vec![("g2".into(), Some("Frankfurt".into())), ("g3".into(), None)],
            csrf_token: "tok123".into(),
            open: false,
            history: Vec::new(),
        }
    }

    #[test]
    fn the_form_lists_recent_operations_newest_first_and_links_the_audit_log() {
        let page = index_page(&ctx());
        assert!(page.contains("id=\"history-empty\""), "{page}");
        assert!(
            page.contains("id=\"max-rate\" name=\"max_rate\""),
            "the limit field"
        );
        assert!(page.contains("href=\"/api/v1/audit\""));
        let plan: actors::op::Plan = serde_json::from_value(serde_json::json!({
            "source_grid": "g1", "target_grid": "g2", "source_app": "a", "target_app": "<b>",
            "source_controller": "h:1", "target_controller": "h:2", "source_mig_url": "x",
            "helper_url": "y", "final_mig_url": "z", "helper_app": "m", "helper_config": [],
            "target_app_config": []}))
        .unwrap();
        let mut old = actors::op::Op::new(
            actors::op::new_id(),
            actors::op::Kind::Migrate,
            plan.clone(),
        );
        old.start_step(actors::op::PROVISIONING_HELPER);
        old.end(actors::op::OpState::RolledBack, None);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut new = actors::op::Op::new(actors::op::new_id(), actors::op::Kind::Snapshot, plan);
        new.start_step(actors::op::PROVISIONING_HELPER);
        let mut c = ctx();
        c.history = OpSummary::history(&[old.clone(), new.clone()], 10);
        assert_eq!(c.history[0].id, new.id);
        assert!(c.history[1].ended_at.is_some() && c.history[0].ended_at.is_none());
        let page = index_page(&c);
        let (a, b) = (page.find(&new.id).unwrap(), page.find(&old.id).unwrap());
        assert!(a < b, "newest first");
        assert!(page.contains(&format!("href=\"/ops/{}/trace\"", old.id)));
        assert!(page.contains("rolled_back") && page.contains("&lt;b&gt; on g2"));
        assert!(!page.contains("<b>"));
        // Also where operations are not offered: the history is still this instance's.
        c.unavailable = Some("no grid".into());
        assert!(index_page(&c).contains(&old.id));
    }

    #[test]
    fn an_open_mig_says_so_on_the_form() {
        assert!(!index_page(&ctx()).contains("open-warning"));
        let mut c = ctx();
        c.open = true;
        let page = index_page(&c);
        assert!(page.contains("id=\"open-warning\""), "{page}");
        assert!(page.contains("no <code>username</code> set"));
        assert!(page.find("open-warning") < page.find("<form"));
    }

    #[test]
    fn hostile_names_are_escaped_everywhere() {
        let evil = "<script>alert(1)</script>\"'&";
        let mut c = ctx();
        c.app_name = Some(evil.into());
        c.own_grid = Some((evil.into(), Some(evil.into())));
        c.targets = vec![(evil.into(), Some(evil.into()))];
        c.csrf_token = evil.into();
        let page = index_page(&c);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("\"'&"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));

        c.unavailable = Some(evil.into());
        assert!(!index_page(&c).contains("<script>alert"));

        let page = monitor_page(evil);
        assert!(!page.contains("<script>alert"));
        assert!(page.contains("data-op-id=\"&lt;script&gt;"));
    }

    #[test]
    fn the_form_offers_what_mode_allows() {
        let both = index_page(&ctx());
        assert!(both.contains("id=\"kind-migrate\" checked "));
        assert!(both.contains("id=\"kind-snapshot\" aria"));
        assert!(!both.contains("mode-fixed"));

        let mut c = ctx();
        c.mode = Mode::Snapshot;
        let snap = index_page(&c);
        assert!(!snap.contains("kind-migrate"));
        assert!(snap.contains("id=\"kind-snapshot\" checked disabled"));
        assert!(snap.contains("mode = snapshot"));

        c.mode = Mode::Migrate;
        let mig = index_page(&c);
        assert!(!mig.contains("kind-snapshot"));
        assert!(mig.contains("id=\"kind-migrate\" checked disabled"));
    }

    #[test]
    fn the_form_lists_other_grids_and_shows_where_it_runs() {
        let page = index_page(&ctx());
        assert!(page.contains("<option value=\"g2\">g2 (Frankfurt)</option>"));
        assert!(page.contains("<option value=\"g3\">g3</option>"));
        assert!(page.contains("id=\"own-grid\">g1 (Los Angeles)</dd>"));
        assert!(page.contains("id=\"app-name\">shop</dd>"));
        assert!(page.contains("<meta name=\"mig-csrf\" content=\"tok123\">"));
        assert!(!page.contains("id=\"submit\" disabled"));

        let mut c = ctx();
        c.targets.clear();
        let page = index_page(&c);
        assert!(page.contains("id=\"no-targets\""));
        assert!(page.contains("id=\"submit\" disabled"));
    }

    #[test]
    fn unavailable_offers_nothing_and_says_why() {
        let mut c = ctx();
        c.own_grid = None;
        c.unavailable = Some("no MIG_ip in grid.info matches 10.0.0.9:8080".into());
        let page = index_page(&c);
        assert!(page.contains("no MIG_ip in grid.info matches 10.0.0.9:8080"));
        assert!(page.contains("id=\"unavailable\" role=\"alert\""));
        assert!(!page.contains("<form"));
        assert!(!page.contains("<option"));
        assert!(page.contains("unknown grid"));
    }

    #[test]
    fn pages_have_no_inline_script_and_name_their_assets() {
        for page in [
            index_page(&ctx()),
            monitor_page("0123456789abcdef0123456789abcdef"),
        ] {
            // Every <script> has a src, so the CSP needs no 'unsafe-inline'.
            assert_eq!(
                page.matches("<script").count(),
                page.matches("<script src=\"/static/").count()
            );
            assert!(page.contains("/static/mig.css"));
            assert!(!page.contains("http://") && !page.contains("https://"));
        }
        assert!(monitor_page("0123456789abcdef0123456789abcdef")
            .contains("data-op-id=\"0123456789abcdef0123456789abcdef\""));
    }

    #[actix_web::test]
    async fn pages_and_assets_are_served_with_their_headers() {
        use actix_web::{test, web, App};
        let app = test::init_service(App::new().configure(configure_assets).route(
            "/",
            web::get().to(|| async { html_response(index_page(&ctx())) }),
        ))
        .await;
        let resp = test::call_service(&app, test::TestRequest::get().uri("/").to_request()).await;
        assert_eq!(resp.status(), 200);
        let h = |name: &str| {
            resp.headers()
                .get(name)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(h("content-security-policy"), CONTENT_SECURITY_POLICY);
        assert_eq!(h("referrer-policy"), "no-referrer");
        assert_eq!(h("content-type"), "text/html; charset=utf-8");

        let req = test::TestRequest::get()
            .uri("/static/monitor.js")
            .to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("x-content-type-options").unwrap(),
            "nosniff"
        );
        let body = test::read_body(resp).await;
        assert_eq!(&body[..], asset("/static/monitor.js").unwrap().1);

        let req = test::TestRequest::get()
            .uri("/static/secret.key")
            .to_request();
        assert_eq!(test::call_service(&app, req).await.status(), 404);
    }
}
