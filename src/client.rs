//! The operator's side of the API: `mig migrate|snapshot` start an operation and follow it across
//! the three instances that run it, as the browser page does (reading the public view, as the page
//! does); `mig status` prints one operation, its full record when given the GUI credentials.

use std::time::{Duration, Instant};

use actors::api;
use actors::op::{Op, StepId, StepState, MIGRATING, PRECOPYING};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use mig_web::OpView;

/// How often the follower asks for news: the end of an operation reached the CLI up to this late
/// (measured: 0.18 s of a 2.3 s demo migrate at 200 ms); a GET of one operation costs little.
const POLL: Duration = Duration::from_millis(50);
/// How long every instance may be unreachable before the follower gives up.
const LOST_AFTER: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Credentials {
    pub user: Option<String>,
    pub password: Option<String>,
}

fn with_auth(req: reqwest::RequestBuilder, c: &Credentials) -> reqwest::RequestBuilder {
    match &c.user {
        Some(u) => req.basic_auth(u, c.password.as_deref()),
        None => req,
    }
}

async fn error_text(r: reqwest::Response) -> String {
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    match body["error"].as_str() {
        Some(e) => format!("{status}: {e}"),
        None => status.to_string(),
    }
}

/// Starts an operation on the MIG at `url`; returns its id. `max_rate` (e.g. `8M`, or empty for
/// no limit) overrides the MIG's `max_rate` property for this operation.
pub async fn start(
    url: &str,
    kind: &str,
    to: &str,
    name: &str,
    max_rate: Option<&str>,
    creds: &Credentials,
) -> anyhow::Result<String> {
    let url = url.trim_end_matches('/');
    let mut body = serde_json::json!({"kind": kind, "target_app": name, "target_grid": to});
    if let Some(r) = max_rate {
        body["max_rate"] = r.into();
    }
    let v = post_op(
        url,
        &body,
        creds,
        |s| s == reqwest::StatusCode::ACCEPTED,
        &format!("MIG at {url} did not start the {kind}"),
    )
    .await?;
    v["id"]
        .as_str()
        .map(str::to_string)
        .context("the answer has no operation id")
}

/// Reads one operation's public view from one instance.
pub async fn fetch(http: &reqwest::Client, url: &str, id: &str) -> anyhow::Result<OpView> {
    get_json(
        http,
        url,
        &api::OP.for_op(id),
        &Credentials::default(),
        "an operation",
    )
    .await
}

/// Reads one operation's full record (`GET /api/v1/ops/{id}/record`), with the GUI credentials
/// when given (a MIG without a `username` needs none).
pub async fn fetch_record(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    creds: &Credentials,
) -> anyhow::Result<Op> {
    let path = api::RECORD.for_op(id);
    get_json(http, url, &path, creds, "an operation record").await
}

/// `GET url+path` as JSON of type `T` (`what` names it in the error).
async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    creds: &Credentials,
    what: &str,
) -> anyhow::Result<T> {
    let url = url.trim_end_matches('/');
    let r = with_auth(http.get(format!("{url}{path}")), creds)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    if !r.status().is_success() {
        bail!("{url}: {}", error_text(r).await);
    }
    r.json().await.with_context(|| format!("{url}: not {what}"))
}

/// The instance that drives `op` now.
pub fn owner_url(op: &OpView) -> &str {
    op.owner_url()
}

/// Follows operation `id` from `url` to its end, across instances, drawing progress; returns the
/// final operation.
pub async fn follow(url: &str, id: &str, quiet: bool) -> anyhow::Result<OpView> {
    follow_noting_owner(url, id, quiet, &std::sync::Mutex::default()).await
}

/// [`follow`], keeping in `owner` the URL of the instance that drives the operation now (where a
/// cancel goes when the follower is stopped).
pub async fn follow_noting_owner(
    url: &str,
    id: &str,
    quiet: bool,
    owner: &std::sync::Mutex<String>,
) -> anyhow::Result<OpView> {
    let http = reqwest::Client::new();
    let mut op = fetch(&http, url, id).await?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg}\n  [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut last_seen = Instant::now();
    let mut printed: Vec<(actors::op::StepId, StepState)> = Vec::new();
    let mut moving: Option<Moving> = None;
    loop {
        for m in &op.monitors {
            for s in &m.steps {
                let key = (s.name, s.state);
                if s.state != StepState::Pending && !printed.contains(&key) {
                    printed.push(key);
                    let detail = s
                        .detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default();
                    bar.println(format!(
                        "{:<11} {} — {}{detail}",
                        format!("{:?}", s.state).to_lowercase(),
                        m.name,
                        s.name
                    ));
                }
                // The bar follows the step that moves bytes now: the pre-copy, then the copy.
                let (Some(d), Some(t)) = (s.bytes_done, s.bytes_total) else {
                    continue;
                };
                if !matches!(s.name, PRECOPYING | MIGRATING) || s.state != StepState::Running {
                    continue;
                }
                if moving.as_ref().is_none_or(|m| m.step != s.name) {
                    bar.reset();
                    moving = Some(Moving::new(s.name, d));
                }
                bar.set_length(t);
                bar.set_position(d);
                // Without a terminal the bar is not drawn: a plain line now and then instead.
                if bar.is_hidden() && !quiet {
                    if let Some(line) = moving.as_mut().and_then(|m| m.line(d, t)) {
                        eprintln!("{line}");
                    }
                }
            }
        }
        *owner.lock().expect("owner lock") = owner_url(&op).to_string();
        bar.set_message(format!(
            "{} {}: {:?}, at {}",
            op.kind.as_str(),
            op.id,
            op.state,
            owner_url(&op)
        ));
        if !op.state.is_running() {
            bar.finish_and_clear();
            return Ok(op);
        }
        tokio::time::sleep(POLL).await;
        // Ask the owner first; if it has moved on or is gone, ask the others.
        let p = &op.plan;
        let mut urls = vec![owner_url(&op).to_string()];
        for u in [&p.source_mig_url, &p.helper_url, &p.final_mig_url] {
            if !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        for u in urls {
            if let Ok(newer) = fetch(&http, &u, id).await {
                last_seen = Instant::now();
                if newer.version >= op.version {
                    op = newer;
                    break;
                }
            }
        }
        if last_seen.elapsed() > LOST_AFTER {
            bar.finish_and_clear();
            bail!(
                "lost operation {id}: no instance answered for {} s (last known at {})",
                LOST_AFTER.as_secs(),
                owner_url(&op)
            );
        }
    }
}

/// The step whose bytes the follower shows, for the plain progress lines written where the bar
/// cannot be drawn (stderr not a terminal: a log, a CI job, a test).
struct Moving {
    step: StepId,
    since: Instant,
    from: u64,
    last_line: Instant,
}

impl Moving {
    /// How often a plain progress line is written.
    const EVERY: Duration = Duration::from_secs(1);

    /// The first line comes [`Moving::EVERY`] after the step was first seen, with a rate.
    fn new(step: StepId, done: u64) -> Moving {
        Moving {
            step,
            since: Instant::now(),
            from: done,
            last_line: Instant::now(),
        }
    }

    /// `  STEP: DONE of TOTAL, RATE/s, eta N s`, at most every [`Moving::EVERY`].
    fn line(&mut self, done: u64, total: u64) -> Option<String> {
        if self.last_line.elapsed() < Self::EVERY {
            return None;
        }
        self.last_line = Instant::now();
        let secs = self.since.elapsed().as_secs_f64();
        let rate = (done.saturating_sub(self.from) as f64 / secs.max(0.001)) as u64;
        let eta = if rate > 0 {
            format!("{} s", total.saturating_sub(done).div_ceil(rate))
        } else {
            "unknown".to_string()
        };
        Some(format!(
            "  {}: {} of {}, {}/s, eta {eta}",
            self.step,
            actors::mig_helper::human_bytes(done),
            actors::mig_helper::human_bytes(total),
            actors::mig_helper::human_bytes(rate)
        ))
    }
}

/// One line per step with its duration, for the end of a run.
pub fn summary(op: &OpView) -> String {
    let mut out = String::new();
    for m in &op.monitors {
        out.push_str(&format!("{} ({})\n", m.name, m.grid));
        for s in &m.steps {
            let secs = match (&s.started_at, &s.ended_at) {
                (Some(a), Some(b)) => {
                    match (humantime::parse_rfc3339(a), humantime::parse_rfc3339(b)) {
                        (Ok(a), Ok(b)) => b
                            .duration_since(a)
                            .map(|d| format!("{:.1} s", d.as_secs_f64()))
                            .unwrap_or_default(),
                        _ => String::new(),
                    }
                }
                _ => String::new(),
            };
            out.push_str(&format!(
                "  {:<11} {:>8}  {}\n",
                format!("{:?}", s.state).to_lowercase(),
                secs,
                s.name
            ));
        }
    }
    out.push_str(&format!("operation {}: {:?}", op.id, op.state));
    if let Some(e) = &op.error {
        out.push_str(&format!(": {e}"));
    }
    for l in &op.leftovers {
        out.push_str(&format!("\n  left over: {l}"));
    }
    if !op.leftovers.is_empty() {
        // The public view leaves the commands out: they name the grid controllers.
        out.push_str(&format!(
            "\n  the commands that clear them: mig status --url {} --user USER {}",
            owner_url(op),
            op.id
        ));
    }
    out
}

/// This MIG's CSRF token, read with the GUI credentials (what a state-changing request carries).
async fn csrf_token(
    http: &reqwest::Client,
    url: &str,
    creds: &Credentials,
) -> anyhow::Result<String> {
    let r = with_auth(http.get(format!("{url}{}", api::CSRF.path)), creds)
        .send()
        .await
        .with_context(|| format!("cannot reach MIG at {url}"))?;
    if !r.status().is_success() {
        bail!("MIG at {url} refused: {}", error_text(r).await);
    }
    let token: serde_json::Value = r.json().await.context("reading the CSRF token")?;
    Ok(token["csrf"].as_str().unwrap_or_default().to_string())
}

/// `POST` of an operation request (`body`) to the MIG at `url`, started or only checked
/// (`dry_run`): one route, one CSRF exchange.
async fn post_op(
    url: &str,
    body: &serde_json::Value,
    creds: &Credentials,
    ok: fn(reqwest::StatusCode) -> bool,
    failed: &str,
) -> anyhow::Result<serde_json::Value> {
    let http = reqwest::Client::new();
    post_with_csrf(&http, url, api::START.path, Some(body), creds, ok, failed).await
}

/// `POST url+path` (with `body` as JSON, if any) carrying this MIG's CSRF token, read first with
/// the credentials: the answer's JSON when `ok(status)`, else an error that starts with `failed`.
async fn post_with_csrf(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    creds: &Credentials,
    ok: fn(reqwest::StatusCode) -> bool,
    failed: &str,
) -> anyhow::Result<serde_json::Value> {
    let token = csrf_token(http, url, creds).await?;
    let mut req =
        with_auth(http.post(format!("{url}{path}")), creds).header(api::CSRF_HEADER, token);
    if let Some(body) = body {
        req = req.json(body);
    }
    let r = req
        .send()
        .await
        .with_context(|| format!("cannot reach MIG at {url}"))?;
    if !ok(r.status()) {
        bail!("{failed}: {}", error_text(r).await);
    }
    r.json().await.context("reading the answer")
}

/// `POST /api/v1/ops/{id}/cancel` on the instance at `url` (it forwards to the one that drives
/// the operation); returns who cancelled it and when, as the owner recorded it.
pub async fn cancel(url: &str, id: &str, creds: &Credentials) -> anyhow::Result<serde_json::Value> {
    let http = reqwest::Client::new();
    let url = url.trim_end_matches('/');
    let v = post_with_csrf(
        &http,
        url,
        &api::CANCEL.for_op(id),
        None,
        creds,
        |s| s == reqwest::StatusCode::ACCEPTED,
        &format!("{url} did not cancel operation {id}"),
    )
    .await?;
    Ok(v["cancelled"].clone())
}

/// What `mig migrate|snapshot` prints when Ctrl-C stops it following: the operation goes on.
/// `owner` is the instance that drove it last (MigHelper during the copy, when the source's MIG is
/// stopped with its application), where a cancel can reach it.
pub fn detached(kind: &str, url: &str, owner: &str, id: &str) -> String {
    let owner = if owner.is_empty() { url } else { owner };
    let page = api::MONITOR_PAGE.for_op(id);
    format!(
        "stopped following; the {kind} {id} goes on.\n  follow it again: {url}{page} (or mig status --url {owner} {id})\n  cancel it (before the cut-over): mig cancel --url {owner} {id}"
    )
}

/// `POST /api/v1/ops` with `"dry_run": true`: the checks, nothing started or changed.
pub async fn dry_run(
    url: &str,
    kind: &str,
    to: &str,
    name: &str,
    creds: &Credentials,
) -> anyhow::Result<Vec<actors::dry_run::Check>> {
    let url = url.trim_end_matches('/');
    let body = serde_json::json!({
        "kind": kind, "target_app": name, "target_grid": to, "dry_run": true
    });
    let v = post_op(
        url,
        &body,
        creds,
        |s| s.is_success(),
        &format!("MIG at {url} did not run the checks"),
    )
    .await?;
    serde_json::from_value(v["checks"].clone()).context("the answer has no list of checks")
}

/// The checks as a table: one line each, `ok` or `FAILED`, the name, and what was found or what
/// to fix.
pub fn checks_table(checks: &[actors::dry_run::Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    checks
        .iter()
        .map(|c| {
            format!(
                "{:<6} {:<width$}  {}",
                if c.ok { "ok" } else { "FAILED" },
                c.name,
                c.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
