//! The operator controls of issue 16 that watch and pace an operation, over a real lab: the
//! bandwidth limit reaches the grid's pull and the copy still verifies, the audit log records each
//! action (and no secret), webhooks are received with a valid signature while a receiver that does
//! not answer delays nothing, and `GET /api/v1/ops` lists the history.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::AtomicU8;
use std::sync::mpsc;

use common::lab::{get, put, random_bytes, wait_for, Lab};
use common::mig;

/// Bases 220.. are this binary's (see tests/common/lab.rs).
static BASES: AtomicU8 = AtomicU8::new(220);

const USER: &str = "ops";
const PASSWORD: &str = "pw-Zq81-never-logged";
const WEBHOOK_SECRET: &str = "whsec-Kx93-never-logged";
/// The path of the receiver that never answers: a chat service's hook URL holds its token there.
const HOOK_TOKEN: &str = "T0K3N-in-the-path";

/// One request a receiver got: its headers (lowercase names) and body.
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A webhook receiver on 127.0.0.1 answering 200 to every POST; returns its URL and what it got.
fn receiver() -> (String, mpsc::Receiver<Received>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((n, v)) = line.trim_end().split_once(':') {
                    headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .unwrap();
            let _ = tx.send(Received { headers, body });
        }
    });
    (url, rx)
}

/// `curl` with the GUI credentials (or others): (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap_or(0), body.to_string())
}

fn creds() -> String {
    format!("{USER}:{PASSWORD}")
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// The audit entries a MIG serves.
fn audit(url: &str, since: &str) -> Vec<serde_json::Value> {
    let (code, body) = curl(&["-u", &creds(), &format!("{url}/api/v1/audit?since={since}")]);
    assert_eq!(code, 200, "{body}");
    json(&body)["entries"].as_array().unwrap().clone()
}

fn has(entries: &[serde_json::Value], action: &str, result_starts: &str) -> bool {
    entries
        .iter()
        .any(|e| e["action"] == action && e["result"].as_str().unwrap().starts_with(result_starts))
}

#[test]
fn a_limited_migrate_is_audited_announced_and_listed_and_a_dead_webhook_delays_nothing() {
    let lab = Lab::up(2, &BASES);
    let (hook, hooks) = receiver();
    // A receiver that is down: its port refuses, so each attempt fails at once and is retried
    // with back-off for about two minutes.
    let dead_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead_url = format!("http://127.0.0.1:{dead_port}/{HOOK_TOKEN}");
    std::fs::write(
        lab.path().join("mig/mig.toml"),
        format!(
            "username = {USER:?}\npassword = {PASSWORD:?}\nwebhook_url = \"{hook}, {dead_url}\"\n\
             webhook_secret = {WEBHOOK_SECRET:?}\n"
        ),
    )
    .unwrap();
    lab.provision_demo(1, "shop");
    let value = random_bytes(1 << 20, 16);
    put(&lab.data_url(1), "blob", &value);
    let (g1, g2) = (lab.mig_url(1), lab.mig_url(2));

    // A bad limit is refused, naming the field, before anything moves; so is a wrong password.
    let (code, csrf) = curl(&["-u", &creds(), &format!("{g1}/api/v1/csrf")]);
    assert_eq!(code, 200);
    let csrf = json(&csrf)["csrf"].as_str().unwrap().to_string();
    let (code, body) = curl(&[
        "-u",
        &creds(),
        "-H",
        &format!("X-Mig-Csrf: {csrf}"),
        "-H",
        "Content-Type: application/json",
        "--data",
        r#"{"kind":"migrate","target_app":"shop2","target_grid":"g2","max_rate":"8X"}"#,
        &format!("{g1}/api/v1/ops"),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("max_rate: must be bytes per second"),
        "{body}"
    );
    let (code, _) = curl(&[
        "-u",
        &format!("{USER}:wrong-{PASSWORD}"),
        &format!("{g1}/api/v1/ops"),
    ]);
    assert_eq!(code, 401);
    // The audit log is behind the credentials, and checks its `since`.
    assert_eq!(curl(&[&format!("{g1}/api/v1/audit")]).0, 401);
    assert_eq!(
        curl(&[
            "-u",
            &creds(),
            &format!("{g1}/api/v1/audit?since=yesterday")
        ])
        .0,
        400
    );
    // A forged handoff is refused (and audited) without touching anything.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "--data",
        "{}",
        &format!("{g1}/api/v1/handoff"),
    ]);
    assert_eq!(code, 401);

    // The CLI's --max-rate reaches the pull; 4 MiB/s keeps the 1 MiB copy short.
    let out = mig()
        .args([
            "migrate",
            "--url",
            &g1,
            "--to",
            "g2",
            "--name",
            "shop2",
            "--max-rate",
            "4M",
            "--user",
            USER,
            "--quiet",
        ])
        .env("MIG_PASSWORD_CLI", PASSWORD)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "migrate failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout.split_whitespace().nth(1).unwrap().to_string();
    // Succeeded means the copy verified (every volume's digest equal on both grids).
    assert_eq!(get(&lab.data_url(2), "blob").as_deref(), Some(&value[..]));
    let (code, record) = curl(&["-u", &creds(), &format!("{g2}/api/v1/ops/{id}/record")]);
    assert_eq!(code, 200, "{record}");
    let record = json(&record);
    assert_eq!(record["state"], "succeeded");
    assert_eq!(record["plan"]["max_rate"], 4 << 20);
    let pull = record["trace"]
        .as_array()
        .unwrap()
        .iter()
        // The pull itself, not the dry run's `--check` that the start runs first.
        .find(|e| {
            let what = e["what"].as_str().unwrap();
            what.starts_with("app migrate ") && !what.contains(" --check")
        })
        .expect("the pull is in the timeline")
        .clone();
    assert!(
        pull["what"]
            .as_str()
            .unwrap()
            .contains(" --import --max_rate=4194304 "),
        "{pull}"
    );
    // The monitor (the public view) has the limit to show beside the rate.
    let (_, public) = curl(&[&format!("{g2}/api/v1/ops/{id}")]);
    assert_eq!(json(&public)["plan"]["max_rate"], 4 << 20);

    // Webhooks: "started" from the source MIG, "ended" from the target MIG, each signed.
    let mut got = Vec::new();
    while got.len() < 2 {
        let r = hooks
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("two webhooks within a minute");
        let sig = r.header("x-mig-signature").expect("signed").to_string();
        assert!(
            mig::webhook::verify(WEBHOOK_SECRET.as_bytes(), &r.body, &sig),
            "bad signature {sig}"
        );
        assert!(!mig::webhook::verify(b"another key", &r.body, &sig));
        assert_eq!(r.header("content-type"), Some("application/json"));
        got.push(json(std::str::from_utf8(&r.body).unwrap()));
    }
    got.sort_by_key(|v| v["event"].as_str().unwrap().to_string());
    let (ended, started) = (&got[0], &got[1]);
    assert_eq!(started["event"], "started");
    assert_eq!(started["state"], "running");
    assert_eq!(ended["event"], "ended");
    assert_eq!(ended["state"], "succeeded");
    for v in [started, ended] {
        assert_eq!(v["id"], id.as_str());
        assert_eq!(v["kind"], "migrate");
        assert_eq!(v["source"]["grid"], "g1");
        assert_eq!(v["target"]["app"], "shop2");
        assert_eq!(v["max_rate"], 4 << 20);
    }
    assert!(
        ended["bytes"].as_u64().unwrap() >= value.len() as u64,
        "{ended}"
    );
    assert!(ended["duration_secs"].as_f64().unwrap() > 0.0, "{ended}");

    // The source MIG is gone with its application; its audit log stays in its state dir.
    let g1_log = lab.state(1).join("mig-state/shop/audit.log");
    let g1_audit: Vec<serde_json::Value> = std::fs::read_to_string(&g1_log)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    let hook_target = mig::webhook::target(&hook);
    // The entry follows the receiver's answer.
    let g2_audit = wait_for("the target MIG's delivery in its audit log", 30, || {
        let a = audit(&g2, "2000-01-01T00:00:00Z");
        has(
            &a,
            "webhook",
            &format!("delivered: ended event to {hook_target}"),
        )
        .then_some(a)
    });
    assert!(
        has(&g1_audit, "start", "refused (400): max_rate"),
        "{g1_audit:#?}"
    );
    assert!(has(&g1_audit, "login", "refused (401)"), "{g1_audit:#?}");
    assert!(has(&g1_audit, "handoff", "refused (401)"), "{g1_audit:#?}");
    let start = g1_audit
        .iter()
        .find(|e| e["action"] == "start" && e["result"].as_str().unwrap().starts_with("accepted"))
        .expect("the start is audited");
    assert_eq!(start["op_id"], id.as_str());
    assert_eq!(start["user"], USER);
    assert_eq!(start["client"], "127.0.0.1");
    let login = g1_audit.iter().find(|e| e["action"] == "login").unwrap();
    assert_eq!(login["user"], USER, "the name tried, never the password");
    assert!(has(&g2_audit, "handoff", "accepted"), "{g2_audit:#?}");
    assert!(
        has(
            &g1_audit,
            "webhook",
            &format!("delivered: started event to {hook_target}")
        ),
        "{g1_audit:#?}"
    );
    // `since` leaves out what came before it.
    let last = g2_audit.last().unwrap()["time"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(audit(&g2, &last).len() < g2_audit.len());

    // The receiver that is down delayed nothing. Its deliveries are retried for about two
    // minutes before they give up; one in the operation's path would have held the first step
    // that long. By the operation's own timestamps, the first step started within a minute of
    // the first failed attempt, and the whole operation took less than the retries do.
    let dead_target = mig::webhook::target(&dead_url);
    let failed_first = |entries: &[serde_json::Value], event: &str| {
        entries
            .iter()
            .find(|e| {
                e["action"] == "webhook"
                    && e["result"].as_str().unwrap().starts_with(&format!(
                        "failed: {event} event to {dead_target}, attempt 1: cannot connect; \
                         next attempt in 1 s"
                    ))
            })
            .cloned()
    };
    let first_dead = failed_first(&g1_audit, "started").expect("the failed attempt is audited");
    let at = |v: &serde_json::Value| humantime::parse_rfc3339(v.as_str().unwrap()).unwrap();
    let steps: Vec<&serde_json::Value> = record["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["steps"].as_array().unwrap())
        .collect();
    let (first_step, last_step) = (
        at(&steps[0]["started_at"]),
        at(&steps.last().unwrap()["ended_at"]),
    );
    let after_attempt = first_step
        .duration_since(at(&first_dead["time"]))
        .unwrap_or_default();
    assert!(
        after_attempt.as_secs() < 60,
        "the first step started {after_attempt:?} after the first failed delivery"
    );
    let took = last_step.duration_since(first_step).unwrap();
    let retries: u64 = mig::webhook::BACKOFF.iter().map(|d| d.as_secs()).sum();
    assert!(took.as_secs() < retries, "the operation took {took:?}");
    let ended_dead = wait_for("the target MIG's failed attempt", 30, || {
        failed_first(&audit(&g2, "2000-01-01T00:00:00Z"), "ended")
    });
    assert_eq!(ended_dead["op_id"], id.as_str());
    let metrics = curl(&[&format!("http://{}:9480/metrics", lab.ip(2, 10))]).1;
    for result in ["delivered", "failed"] {
        assert!(
            metrics.contains(&format!(
                "mig_webhook_attempts_total{{result=\"{result}\"}}"
            )),
            "{metrics}"
        );
    }

    // No secret in any audit log: the password, the webhook secret, the hook's token path, the
    // credentials as the header carries them, the application's key.
    let key = std::fs::read_to_string(lab.path().join("mig/private.key")).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    let g2_log = std::fs::read_to_string(lab.state(2).join("mig-state/shop2/audit.log")).unwrap();
    for text in [std::fs::read_to_string(&g1_log).unwrap(), g2_log] {
        for secret in [PASSWORD, WEBHOOK_SECRET, HOOK_TOKEN, key_line, &csrf] {
            assert!(
                !text.contains(secret),
                "{secret:?} in the audit log:\n{text}"
            );
        }
        assert!(!text.contains("Basic "));
    }

    // History: the target MIG lists the operation, with its monitor and timeline.
    let (code, list) = curl(&["-u", &creds(), &format!("{g2}/api/v1/ops")]);
    assert_eq!(code, 200, "{list}");
    let list = json(&list);
    let ops = list["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 1, "{list}");
    assert_eq!(ops[0]["id"], id.as_str());
    assert_eq!(ops[0]["kind"], "migrate");
    assert_eq!(ops[0]["state"], "succeeded");
    assert_eq!(ops[0]["target_app"], "shop2");
    assert_eq!(ops[0]["monitor_url"], format!("/ops/{id}"));
    assert!(ops[0]["duration_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(
        curl(&[&format!("{g2}/api/v1/ops")]).0,
        401,
        "behind the credentials"
    );
    let (_, form) = curl(&["-u", &creds(), &format!("{g2}/")]);
    assert!(
        form.contains(&format!("href=\"/ops/{id}/trace\"")),
        "{form}"
    );
    assert!(form.contains("href=\"/api/v1/audit\""));
}

#[test]
fn a_bad_max_rate_is_refused_by_the_cli_before_anything_is_sent() {
    // Port 1 on loopback: were anything sent, the error would be that MIG cannot be reached.
    let out = mig()
        .args([
            "migrate",
            "--url",
            "http://127.0.0.1:1",
            "--to",
            "g2",
            "--name",
            "shop2",
            "--max-rate",
            "8 MB/s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-rate \"8 MB/s\": must be bytes per second"),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
}
