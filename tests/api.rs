//! The operations API in-process, over real HTTP, with in-memory grids: what is refused before any
//! grid is touched (mode, names, grids, CSRF, auth), and handoff trust (forged, replayed, cross-op,
//! tampered, stale: 401 and no state change; a good one runs the clean-up).

mod common;

use std::net::TcpListener;
use std::sync::Arc;

use actix::Actor;
use actors::auth::{AppKey, OpKey};
use actors::book::OpBook;
use actors::journal::Journal;
use actors::memory_lab::MemoryLab;
use actors::op::{self, Kind, Op, Plan, Role};
use actors::properties;
use actors::runner::StepRunner;
use actors::source::{Source, SourceConfig};
use actors::target::Target;
use dialect::AppState;
use mig::server::Shared;
use mig::site::Site;
use tokio_util::sync::CancellationToken;

const KEY: &[u8] = b"-----BEGIN OPENSSH PRIVATE KEY----- the application's key";

struct Api {
    url: String,
    lab: MemoryLab,
    book: OpBook,
    csrf: String,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A `mig serve` for application `shop` on g1 of common::GRID_INFO, with memory grids.
fn start(mode: &str, sets: &[&str]) -> Api {
    start_in("shop", mode, sets)
}

/// The same, in the MIG of application `app` (`shop2` is the target of [`plan`]).
fn start_in(app: &str, mode: &str, sets: &[&str]) -> Api {
    let dir = common::config_dir();
    let mut all: Vec<String> = vec![
        format!("mode={mode}"),
        "grid=g1".into(),
        "app_name=shop".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    let props = properties::load(dir.path(), std::iter::empty(), &all).unwrap();
    let site = Site::inspect(props.clone());
    let lab = testkit::shop_lab("root@127.0.2.1:2222", b"bytes");
    let book = OpBook::open(Journal::open(&props.state_dir).unwrap()).unwrap();
    let runner = StepRunner::new(book.clone(), Arc::new(lab.clone()));
    let app_key = AppKey::from_secret_bytes(KEY);
    let source = Source::new(
        SourceConfig {
            mode: props.mode,
            app_name: Some("shop".into()),
            site: Ok((site.grid_info.clone().unwrap(), "g1".into())),
            app_key: app_key.clone(),
            private_key: String::new(),
            known_hosts: String::new(),
            otlp_endpoint: None,
            precopy: false,
            gui: None,
        },
        runner.clone(),
    )
    .start();
    let target = Target::new(app_key, Some(app.to_string()), runner).start();
    let mut shared = Shared::new(Some(site), book.clone(), vec![Role::Source, Role::Target]);
    shared.source = Some(source);
    shared.handoff = Some(target.clone().recipient());
    shared.status = Some(target.recipient());
    let csrf = shared.csrf_token.clone();
    let gui = TcpListener::bind("127.0.0.1:0").unwrap();
    let mon = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", gui.local_addr().unwrap());
    let stop = CancellationToken::new();
    actix_rt::spawn(mig::server::run(shared, gui, mon, stop.clone()));
    Api {
        url,
        lab,
        book,
        csrf,
        _dir: dir,
        stop,
    }
}

impl Api {
    async fn post_op(&self, kind: &str, app: &str, grid: &str) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/ops", self.url))
            .header("x-mig-csrf", &self.csrf)
            .json(&serde_json::json!({"kind": kind, "target_app": app, "target_grid": grid}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    fn grid_logs(&self) -> Vec<String> {
        let mut l = self.lab.grid("127.0.1.1:2222").log();
        l.extend(self.lab.grid("root@127.0.2.1:2222").log());
        l
    }
}

#[actix_rt::test]
async fn mode_forbids_the_other_kind_with_403_before_any_grid_is_touched() {
    let api = start("migrate", &[]);
    let (status, body) = api.post_op("snapshot", "copy", "g2").await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("mode"), "{body}");
    let (status, _) = api.post_op("copy", "copy", "g2").await;
    assert_eq!(status, 400, "an unknown kind");
    assert!(api.grid_logs().is_empty(), "{:?}", api.grid_logs());
    assert!(api.book.all().is_empty());
}

#[actix_rt::test]
async fn bad_names_and_grids_are_400_before_any_ssh() {
    let api = start("both", &[]);
    for (app, grid, fragment) in [
        ("x; rm -rf /", "g2", "invalid application name"),
        ("$(id)", "g2", "invalid application name"),
        ("", "g2", "invalid application name"),
        ("ok", "g1", "is the grid this application runs on"),
        ("ok", "nowhere", "no grid \"nowhere\""),
    ] {
        let (status, body) = api.post_op("migrate", app, grid).await;
        assert_eq!(status, 400, "{app:?} {grid:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains(fragment), "{body}");
    }
    assert!(api.grid_logs().is_empty(), "{:?}", api.grid_logs());
    // A name already taken on the target is found by asking the grid, and refused too.
    api.lab
        .grid("root@127.0.2.1:2222")
        .put_app("taken", "demoapp", AppState::Stopped, &[], &[]);
    let (status, body) = api.post_op("migrate", "taken", "g2").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already has an application taken"),
        "{body}"
    );
    assert!(api.book.all().is_empty());
}

#[actix_rt::test]
async fn with_a_username_starting_an_operation_needs_it_but_status_does_not() {
    let api = start("both", &["username=ops", "password=pw"]);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/v1/ops", api.url))
        .header("x-mig-csrf", &api.csrf)
        .json(&serde_json::json!({"kind": "migrate", "target_app": "a", "target_grid": "g2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{}/api/v1/csrf", api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "the CSRF token is behind the credentials too"
    );
    let r = http
        .get(format!("{}/api/v1/ops/{}", api.url, op::new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "status reads need only the id");
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(api.grid_logs().is_empty());
}

fn plan() -> Plan {
    let mut p = testkit::sample_plan();
    p.target_controller = "root@127.0.2.1:2222".into();
    p.helper_app = "mighelper-x".into();
    p.helper_config = vec![];
    p
}

/// An operation as MigHelper hands it to the target MIG: everything before the clean-up done.
fn handed_over() -> Op {
    let mut op = Op::new(op::new_id(), Kind::Migrate, plan());
    op.plan.helper_app = op::helper_app_name(&op.id);
    for s in [
        op::PROVISIONING_HELPER,
        op::STOPPING_SOURCE,
        op::MIGRATING,
        op::STARTING_TARGET,
    ] {
        op.finish_step(s, None);
    }
    op.owner = Role::Target;
    op
}

async fn send(api: &Api, key: &OpKey, op: &Op, seq: u64, tamper: bool, skew: i64) -> u16 {
    send_to(
        api,
        key,
        op,
        seq,
        &actors::handoff::audience(op),
        tamper,
        skew,
    )
    .await
    .0
}

/// Sends `op` signed for `to` (a receiver and transition); returns the status and body.
async fn send_to(
    api: &Api,
    key: &OpKey,
    op: &Op,
    seq: u64,
    to: &actors::auth::Audience,
    tamper: bool,
    skew: i64,
) -> (u16, String) {
    let body = serde_json::to_vec(op).unwrap();
    send_raw(api, key, &op.id, body, seq, to, tamper, skew).await
}

#[allow(clippy::too_many_arguments)]
async fn send_raw(
    api: &Api,
    key: &OpKey,
    op_id: &str,
    body: Vec<u8>,
    seq: u64,
    to: &actors::auth::Audience,
    tamper: bool,
    skew: i64,
) -> (u16, String) {
    let mut signed = key.sign(op_id, seq, to, &body);
    if skew != 0 {
        // Re-sign with a timestamp far from now: the signature is right, the time is not.
        signed = actors::auth::Signed {
            timestamp: (signed.timestamp as i64 + skew) as u64,
            ..signed
        };
    }
    let mut body = body;
    if tamper {
        let i = body.len() / 2;
        body[i] ^= 1;
    }
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/v1/handoff", api.url))
        .body(body);
    for (k, v) in signed.headers() {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[actix_rt::test]
async fn forged_replayed_cross_op_tampered_and_stale_handoffs_are_401_and_change_nothing() {
    // The MIG of the target application, to which MigHelper hands a migrate.
    let api = start_in("shop2", "both", &[]);
    let app_key = AppKey::from_secret_bytes(KEY);
    let op = handed_over();
    let k_op = app_key.op_key(&op.id);

    // Another application's key, another operation's key, a changed body, a stale signature.
    let wrong_app = AppKey::from_secret_bytes(b"another application").op_key(&op.id);
    assert_eq!(send(&api, &wrong_app, &op, 1, false, 0).await, 401);
    let other_op = app_key.op_key(&op::new_id());
    assert_eq!(send(&api, &other_op, &op, 1, false, 0).await, 401);
    assert_eq!(send(&api, &k_op, &op, 1, true, 0).await, 401);
    assert_eq!(send(&api, &k_op, &op, 1, false, -3600).await, 401);
    let unsigned = reqwest::Client::new()
        .post(format!("{}/api/v1/handoff", api.url))
        .body(serde_json::to_vec(&op).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    assert!(
        api.book.get(&op.id).is_none(),
        "a refused handoff must not be journalled"
    );
    assert!(
        api.grid_logs().is_empty(),
        "a refused handoff must not touch a grid"
    );

    // The real one is taken and runs the clean-up; the same message again is a replay.
    assert_eq!(send(&api, &k_op, &op, 1, false, 0).await, 200);
    assert_eq!(send(&api, &k_op, &op, 1, false, 0).await, 401);
    let mut done = None;
    for _ in 0..100 {
        if let Some(o) = api.book.get(&op.id).filter(|o| !o.state.is_running()) {
            done = Some(o);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let done = done.expect("the clean-up finished");
    assert_eq!(done.state, op::OpState::Succeeded, "{:?}", done.error);
    assert!(
        api.lab.grid("127.0.1.1:2222").app_names().is_empty(),
        "the source is destroyed"
    );
    // A replay after the end does not reopen it either.
    assert_eq!(send(&api, &k_op, &op, 2, false, 0).await, 409);
}

/// A handoff captured on its way to the target MIG (issue 13: replayed to the source MIG, it made
/// that MIG run the migrate clean-up and destroy the source). Bound to its receiver, it is refused
/// there; and even one signed for the source MIG is refused when its plan does not end with the
/// source application running.
#[actix_rt::test]
async fn a_handoff_for_the_target_mig_replayed_to_the_source_mig_destroys_nothing() {
    let api = start_in("shop", "both", &[]);
    let app_key = AppKey::from_secret_bytes(KEY);
    let op = handed_over();
    let k_op = app_key.op_key(&op.id);

    let captured = actors::handoff::audience(&op);
    assert_eq!(captured.app, "shop2");
    let (status, body) = send_to(&api, &k_op, &op, 1, &captured, false, 0).await;
    assert_eq!(status, 401, "{body}");
    // As a roll-back, or to MigHelper: the transition and the role are signed too.
    for other in [
        actors::auth::Audience {
            transition: actors::auth::Transition::RollBack,
            ..captured.clone()
        },
        actors::auth::Audience {
            role: Role::Helper,
            ..captured.clone()
        },
    ] {
        assert_eq!(send_to(&api, &k_op, &op, 1, &other, false, 0).await.0, 401);
    }
    // Signed for this MIG, but the plan ends with shop2 running, not shop.
    let for_me = actors::auth::Audience {
        app: "shop".into(),
        ..captured.clone()
    };
    let (status, body) = send_to(&api, &k_op, &op, 1, &for_me, false, 0).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("shop2") && body.contains("shop"), "{body}");

    assert!(api.book.get(&op.id).is_none(), "nothing journalled");
    assert!(api.grid_logs().is_empty(), "no grid touched");
    assert_eq!(
        api.lab.grid("127.0.1.1:2222").app_names(),
        ["shop"],
        "the source is still there"
    );
}

/// Wire data names a step the actors do not know, or leaves one out: 400, never a panic, and the
/// instance goes on taking good handoffs.
#[actix_rt::test]
async fn an_unknown_or_missing_step_is_400_and_the_instance_stays_up() {
    let api = start_in("shop2", "both", &[]);
    let app_key = AppKey::from_secret_bytes(KEY);
    let op = handed_over();
    let k_op = app_key.op_key(&op.id);
    let to = actors::handoff::audience(&op);

    let mut v = serde_json::to_value(&op).unwrap();
    v["monitors"][2]["steps"][0]["name"] = "formatting the disk".into();
    let body = serde_json::to_vec(&v).unwrap();
    let (status, text) = send_raw(&api, &k_op, &op.id, body, 1, &to, false, 0).await;
    assert_eq!(status, 400, "{text}");

    let mut v = serde_json::to_value(&op).unwrap();
    v["monitors"][2]["steps"].as_array_mut().unwrap().remove(0);
    let body = serde_json::to_vec(&v).unwrap();
    let (status, text) = send_raw(&api, &k_op, &op.id, body, 2, &to, false, 0).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("steps"), "{text}");
    assert!(api.book.get(&op.id).is_none());

    assert_eq!(send(&api, &k_op, &op, 3, false, 0).await, 200);
}

/// MigHelper's probe: the status route answers, signed with the operation's key over the nonce
/// it was asked with, who owns the operation here and since which handoff.
#[actix_rt::test]
async fn the_status_route_answers_signed_over_the_askers_nonce() {
    let api = start_in("shop2", "both", &[]);
    let app_key = AppKey::from_secret_bytes(KEY);
    let op = handed_over();
    let k_op = app_key.op_key(&op.id);
    let ask = |nonce: String| {
        let url = format!("{}/api/v1/ops/{}/status?nonce={nonce}", api.url, op.id);
        async move { reqwest::get(url).await.unwrap() }
    };
    let read = |r: reqwest::Response| {
        let k_op = k_op.clone();
        async move {
            let sig = r.headers()["x-mig-signature"].to_str().unwrap().to_string();
            let body = r.bytes().await.unwrap();
            assert!(k_op.verify_status(&body, &sig), "signed with k_op");
            serde_json::from_slice::<actors::handoff::StatusAnswer>(&body).unwrap()
        }
    };
    let nonce = op::new_id();
    let a = read(ask(nonce.clone()).await).await;
    assert_eq!(
        (a.known, a.nonce.as_str(), a.app.as_str()),
        (false, nonce.as_str(), "shop2")
    );

    assert_eq!(send(&api, &k_op, &op, 5, false, 0).await, 200);
    let a = read(ask(op::new_id()).await).await;
    assert!(a.known);
    assert_eq!((a.owner, a.seq), (Some(Role::Target), 5));

    assert_eq!(ask("nothex".into()).await.status(), 400);
}

/// An ended operation whose full record holds everything the public must not read: controllers
/// as `user@host:port`, configuration values, a leftover's command, a controller's stderr.
fn revealing_op() -> Op {
    let mut plan = plan();
    plan.source_controller = "admin@127.0.1.1:2222".into();
    plan.target_app_config = vec![("db_password".into(), "hunter2-secret".into())];
    plan.helper_config = vec![("gateway".into(), "10.99.0.1".into())];
    let mut op = Op::new(op::new_id(), Kind::Migrate, plan);
    op.finish_step(op::PROVISIONING_HELPER, None);
    op.start_step(op::STOPPING_SOURCE);
    op.trace(
        "command",
        "app stop shop on admin@127.0.1.1:2222".into(),
        Some(40),
        Some(
            "grid controller admin@127.0.1.1:2222: `app stop shop` exited with code 1: STDERR-TEXT"
                .into(),
        ),
    );
    op.fail_step(
        op::STOPPING_SOURCE,
        "grid controller admin@127.0.1.1:2222: `app stop shop` exited with code 1: STDERR-TEXT \
         db_password=hunter2-secret via 10.99.0.1",
    );
    op.leftovers.push(
        "MigHelper mighelper-x on grid g2: ssh -p 2222 root@127.0.2.1 app destroy mighelper-x"
            .into(),
    );
    op.end(
        op::OpState::Failed,
        Some(
            "the source application did not stop: grid controller admin@127.0.1.1:2222: \
             `app stop shop` exited with code 1: STDERR-TEXT"
                .into(),
        ),
    );
    op
}

/// What must not be in a public answer about [`revealing_op`].
const SECRETS: [&str; 7] = [
    "admin@",
    "127.0.1.1:",
    "root@127.0.2.1",
    "hunter2",
    "10.99.0.1",
    "STDERR-TEXT",
    "ssh -p",
];

fn assert_tells_nothing(what: &str, body: &str) {
    for s in SECRETS {
        assert!(!body.contains(s), "{what} shows {s:?}: {body}");
    }
}

#[actix_rt::test]
async fn the_public_routes_tell_no_controller_config_command_or_stderr_but_the_record_does() {
    let api = start("both", &["username=ops", "password=pw"]);
    let op = revealing_op();
    api.book.commit(&op).unwrap();
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{}{path}", api.url);
        async move {
            let r = http.get(url).send().await.unwrap();
            let cors = r.headers().get("access-control-allow-origin").cloned();
            (r.status().as_u16(), cors, r.text().await.unwrap())
        }
    };
    let id = &op.id;

    let (status, cors, view) = get(format!("/api/v1/ops/{id}")).await;
    assert_eq!((status, cors.unwrap()), (200, "*".parse().unwrap()));
    assert_tells_nothing("the public view", &view);
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(v["state"], "failed");
    assert_eq!(
        v["leftovers"],
        serde_json::json!(["MigHelper mighelper-x on grid g2"])
    );
    let detail = v["monitors"][1]["steps"][0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(
            "grid controller grid g1's controller: `app stop shop` exited with code 1"
        ),
        "{detail}"
    );
    assert_eq!(v["plan"]["final_mig_url"], "http://127.0.2.10:8080");

    // The live stream of an ended operation: one event, then the end.
    let (status, _, events) = get(format!("/api/v1/ops/{id}/events")).await;
    assert_eq!(status, 200);
    assert!(events.starts_with("event: op\ndata: {"), "{events}");
    assert_tells_nothing("the event stream", &events);

    for path in [
        format!("/api/v1/ops/{id}/trace"),
        format!("/ops/{id}/trace"),
    ] {
        let (status, _, trace) = get(path.clone()).await;
        assert_eq!(status, 200, "{path}");
        assert_tells_nothing(&path, &trace);
        assert!(
            trace.contains("app stop shop on grid g1&#39;s controller")
                || trace.contains("app stop shop on grid g1's controller"),
            "{trace}"
        );
    }

    // The full record is behind the credentials, and not readable cross-origin.
    let (status, _, _) = get(format!("/api/v1/ops/{id}/record")).await;
    assert_eq!(status, 401);
    let r = http
        .get(format!("{}/api/v1/ops/{id}/record", api.url))
        .basic_auth("ops", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let record = r.text().await.unwrap();
    for s in SECRETS {
        assert!(record.contains(s), "the record lacks {s:?}: {record}");
    }

    // `mig status`: the public view without credentials, the record with them.
    let status = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = common::mig().arg("status").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    };
    let public = status(vec!["--url".into(), api.url.clone(), id.clone()])
        .await
        .unwrap();
    assert_tells_nothing("mig status", &public);
    let full = status(vec![
        "--url".into(),
        api.url.clone(),
        "--user".into(),
        "ops".into(),
        "--password".into(),
        "pw".into(),
        id.clone(),
    ])
    .await
    .unwrap();
    assert!(
        full.contains("ssh -p 2222 root@127.0.2.1 app destroy mighelper-x"),
        "{full}"
    );
}

#[actix_rt::test]
async fn a_ninth_live_stream_from_one_client_gets_429() {
    let api = start("both", &[]);
    let mut op = handed_over();
    op.owner = Role::Source; // running and owned here: its streams stay open
    api.book.commit(&op).unwrap();
    let url = format!("{}/api/v1/ops/{}/events", api.url, op.id);
    let http = reqwest::Client::new();
    let mut open = Vec::new();
    for i in 0..mig::server::MAX_STREAMS_PER_CLIENT {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "stream {}", i + 1);
        open.push(r);
    }
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already holds 8 live operation streams"),
        "{body}"
    );
    // The status reads themselves are not capped.
    let r = http
        .get(format!("{}/api/v1/ops/{}", api.url, op.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A closed stream frees its place (once the server notices, at the latest at the next
    // keep-alive comment).
    drop(open.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(25);
    loop {
        let r = http.get(&url).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed stream's place never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[actix_rt::test]
async fn a_request_for_another_host_gets_421_and_changes_nothing() {
    let api = start("both", &[]);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/v1/ops", api.url))
        .header("host", "evil.example")
        .header("x-mig-csrf", &api.csrf)
        .json(&serde_json::json!({"kind": "migrate", "target_app": "copy", "target_grid": "g2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    let body: serde_json::Value = r.json().await.unwrap();
    let e = body["error"].as_str().unwrap();
    assert!(
        e.contains("\"evil.example\"") && e.contains("allowed_hosts"),
        "{e}"
    );
    for path in ["/", "/api/v1/csrf", "/api/v1/grids"] {
        let r = http
            .get(format!("{}{path}", api.url))
            .header("host", "evil.example:8080")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 421, "{path}");
    }
    assert!(api.book.all().is_empty());
    assert!(api.grid_logs().is_empty(), "{:?}", api.grid_logs());

    // MIG's own names pass: the address it was reached at, localhost, a MIG_ip of grid.info.
    for host in ["localhost", "127.0.2.10:8080", &api.url[7..]] {
        let r = http
            .get(format!("{}/api/v1/grids", api.url))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }

    // A name in allowed_hosts passes.
    let api = start("both", &["allowed_hosts=mig.example.net,Evil.Example"]);
    let (status, body) = {
        let r = http
            .post(format!("{}/api/v1/ops", api.url))
            .header("host", "evil.example:8080")
            .header("x-mig-csrf", &api.csrf)
            .json(
                &serde_json::json!({"kind": "migrate", "target_app": "copy", "target_grid": "g2"}),
            )
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert_eq!(status, 202, "{body}");
}

#[actix_rt::test]
async fn mighelper_names_no_operation_at_its_root_and_serves_no_record() {
    let dir = common::config_dir();
    let props = properties::load(dir.path(), std::iter::empty(), &[]).unwrap();
    let book = OpBook::open(Journal::open(&props.state_dir).unwrap()).unwrap();
    let mut op = revealing_op();
    op.owner = Role::Helper;
    book.commit(&op).unwrap();
    let shared = Shared::new(None, book, vec![Role::Helper]);
    let gui = TcpListener::bind("127.0.0.1:0").unwrap();
    let mon = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", gui.local_addr().unwrap());
    let stop = CancellationToken::new();
    actix_rt::spawn(mig::server::run(shared, gui, mon, stop.clone()));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("location").is_none());
    let page = r.text().await.unwrap();
    assert!(page.contains("This is MigHelper"), "{page}");
    assert!(
        !page.contains(&op.id) && !page.contains(op.short_id()),
        "{page}"
    );
    let r = http
        .get(format!("{url}/api/v1/ops/{}/record", op.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .get(format!("{url}/api/v1/ops/{}", op.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_tells_nothing("MigHelper's view", &r.text().await.unwrap());
    stop.cancel();
}
