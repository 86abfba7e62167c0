//! The operator's controls over a real lab (issue 16): a cancel during the copy rolls back and
//! ends `cancelled` with the source running on its data; a cancel sent to the source MIG, which
//! no longer drives the operation, is forwarded to MigHelper; a cancel after the cut-over is
//! refused with 409 and changes nothing; the dry run's every check fails once on purpose, with
//! its message, changing nothing on any grid; `mig migrate --dry-run` exits 0 only when all pass.
//!
//! Operations are held still with the fault points (`fault_dir`), never with sleeps.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU8;
use std::time::{Duration, Instant};

use common::lab::{
    curl, fault_points, get, names, off, on, op_at, put, small_shop, step, wait_for, Data, Lab,
};

/// This binary's lab addresses: bases 250..=253, two labs of two grids.
static BASES: AtomicU8 = AtomicU8::new(250);

const MIGRATING: &str =
    "migrating the source application to the target grid as the target application";

fn helper_url(lab: &Lab, n: u8) -> String {
    format!("http://{}:8080", lab.ip(n, 20))
}

/// `curl` returning the HTTP status and the body, whatever the status.
fn call(args: &[&str]) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn csrf(url: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&curl(&[&format!("{url}/api/v1/csrf")]).unwrap()).unwrap();
    v["csrf"].as_str().unwrap().to_string()
}

/// `POST /api/v1/ops` with `body`, as the page does.
fn post_op(url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    call(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        &format!("x-mig-csrf: {}", csrf(url)),
        "--data",
        &body.to_string(),
        &format!("{url}/api/v1/ops"),
    ])
}

fn start_migrate(url: &str, target_app: &str) -> String {
    let (code, v) = post_op(
        url,
        serde_json::json!({"kind": "migrate", "target_app": target_app, "target_grid": "g2"}),
    );
    assert_eq!(code, 202, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// `POST /api/v1/ops/{id}/cancel` at `url`, with that instance's CSRF token.
fn cancel(url: &str, id: &str) -> (u16, serde_json::Value) {
    call(&[
        "-X",
        "POST",
        "-H",
        &format!("x-mig-csrf: {}", csrf(url)),
        &format!("{url}/api/v1/ops/{id}/cancel"),
    ])
}

fn wait_op(
    url: &str,
    id: &str,
    what: &str,
    secs: u64,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(what, secs, || op_at(url, id).filter(|op| f(op)))
}

fn wait_end(url: &str, id: &str) -> serde_json::Value {
    wait_op(url, id, "the end of the operation", 120, |op| {
        op["state"] != "running"
    })
}

/// `shop` runs on g1 with its data, g2 holds nothing (no partial target, no MigHelper).
fn assert_untouched(lab: &Lab, data: &Data, sum: &str) {
    assert_eq!(names(&lab.apps(1)), [("shop", "running")]);
    assert_eq!(
        names(&lab.apps(2)),
        [] as [(&str, &str); 0],
        "g2 holds nothing"
    );
    for (k, v) in data {
        assert_eq!(get(&lab.data_url(1), k).as_deref(), Some(&v[..]), "{k}");
    }
    assert_eq!(
        lab.checksum(1, "shop"),
        sum,
        "the source's data is untouched"
    );
}

/// The end of an operation cancelled before the cut-over: `cancelled`, saying who and when,
/// every step before the cut-over undone or not run, MigHelper destroyed, nothing left over.
fn assert_cancelled(op: &serde_json::Value) {
    assert_eq!(op["state"], "cancelled", "{op:#}");
    assert_eq!(op["leftovers"], serde_json::json!([]), "{op:#}");
    let error = op["error"].as_str().unwrap_or_default();
    // (The public view blanks the lab's gateway address, 127.0.0.1, out of free text.)
    assert!(
        error.starts_with("cancelled by anonymous from ") && error.contains(" at 20"),
        "who and when: {op:#}"
    );
    assert_eq!(op["cancelled"]["user"], "anonymous", "{op:#}");
    assert_eq!(op["cancelled"]["from"], "127.0.0.1", "{op:#}");
    assert_eq!(
        step(op, "starting the target application")["state"],
        "rolled_back"
    );
    assert_eq!(step(op, "destroying MigHelper")["state"], "done", "{op:#}");
}

/// A cancel during the copy (held at `hold-copy`, asked of MigHelper, which drives the operation
/// then) rolls back: the source runs again with every byte, nothing is left on g2, and the
/// operation ends `cancelled`. A second operation is cancelled at the source MIG while MigHelper
/// holds before stopping the source: the source MIG forwards it, signed, and it wins there too.
#[test]
fn a_cancel_before_the_cut_over_rolls_back_wherever_it_is_asked() {
    let lab = Lab::up(2, &BASES);
    let faults = fault_points(&lab);
    let (data, sum) = small_shop(&lab);
    let (source, helper) = (lab.mig_url(1), helper_url(&lab, 2));

    // Every check passes here: the dry run's table, exit 0, and nothing started.
    let (ok, out) = cli_dry_run(&source, "migrate");
    assert!(ok && out.contains("every check passed"), "{out}");
    assert!(out.contains("ok     pull trust"), "{out}");
    assert_untouched(&lab, &data, &sum);

    // Started with the CLI; Ctrl-C stops it following, not the operation, and it says where to
    // cancel: MigHelper, since the source MIG is stopped with its application during the copy.
    on(&faults, "hold-copy");
    let mut cli = Command::new(env!("CARGO_BIN_EXE_mig"))
        .args(["migrate", "--url", &source, "--to", "g2", "--name", "shop2"])
        .env_remove("MIG_PASSWORD_CLI")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = cli.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let id = first.split_whitespace().nth(1).unwrap().to_string();
    wait_op(&helper, &id, "the copy to be held", 60, |op| {
        step(op, MIGRATING)["state"] == "running"
    });
    // The follower has seen MigHelper own it (it polls every 200 ms).
    std::thread::sleep(Duration::from_millis(600));
    assert!(Command::new("kill")
        .args(["-INT", &cli.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = cli.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(said.contains("stopped following"), "{said}");
    assert!(
        said.contains(&format!("mig cancel --url {helper} {id}")),
        "{said}"
    );
    assert_eq!(
        op_at(&helper, &id).unwrap()["state"],
        "running",
        "the operation goes on"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_mig"))
        .args(["cancel", "--url", &helper, &id])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("cancelled by anonymous from 127.0.0.1"),
        "{said}"
    );
    // The same cancel again is answered with the first, which stands.
    let (code, again) = cancel(&helper, &id);
    assert!(code == 202 || code == 409, "{code} {again}");
    let op = wait_end(&source, &id);
    assert_cancelled(&op);
    assert_eq!(step(&op, MIGRATING)["state"], "rolled_back", "{op:#}");
    assert!(
        step(&op, MIGRATING)["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("interrupted: cancelled by")),
        "{op:#}"
    );
    off(&faults, "hold-copy");
    assert_untouched(&lab, &data, &sum);

    on(&faults, "hold-stop-source");
    let id = start_migrate(&source, "shop2");
    wait_op(&helper, &id, "MigHelper to own the operation", 60, |op| {
        op["owner"] == "helper"
    });
    let (code, v) = cancel(&source, &id);
    assert_eq!(code, 202, "forwarded to MigHelper: {v}");
    let op = wait_end(&source, &id);
    assert_cancelled(&op);
    assert_eq!(
        step(&op, "stopping the source application")["state"],
        "rolled_back",
        "never run: {op:#}"
    );
    off(&faults, "hold-stop-source");
    assert_untouched(&lab, &data, &sum);
    let started = Instant::now();
    let (code, v) = cancel(&source, &id);
    assert_eq!(code, 409, "an ended operation: {v}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Both cancels asked of the source MIG are in its audit log: the one it forwarded and won,
    // and the late one it refused.
    let cancels: Vec<_> = audited(&lab, "cancel")
        .into_iter()
        .filter(|e| e["op_id"] == id.as_str())
        .collect();
    assert!(
        cancels
            .iter()
            .any(|e| result_of(e).starts_with("accepted: cancelled by")),
        "{cancels:#?}"
    );
    assert!(
        cancels
            .iter()
            .any(|e| result_of(e).starts_with("refused (409)")),
        "{cancels:#?}"
    );

    // Past the cut-over (the target MIG holds before its clean-up): refused everywhere, and the
    // migrate finishes as if nobody had asked.
    on(&faults, "hold-clean-up");
    let id = start_migrate(&source, "shop2");
    let target = lab.mig_url(2);
    wait_op(
        &target,
        &id,
        "the target MIG to own the operation",
        60,
        |op| op["owner"] == "target",
    );
    for url in [&target, &helper] {
        let (code, v) = cancel(url, &id);
        assert_eq!(code, 409, "at {url}: {v}");
        assert_eq!(
            v["error"], "past the cut-over: the application already runs on g2",
            "at {url}"
        );
    }
    off(&faults, "hold-clean-up");
    let op = wait_end(&target, &id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert!(op.get("cancelled").is_none(), "{op:#}");
    assert_eq!(names(&lab.apps(1)), [] as [(&str, &str); 0]);
    assert_eq!(names(&lab.apps(2)), [("shop2", "running")]);
    for (k, v) in &data {
        assert_eq!(get(&lab.data_url(2), k).as_deref(), Some(&v[..]), "{k}");
    }
}

/// The audit entries of `action` in the source MIG's audit log (in its state directory, which
/// outlives a stopped application).
fn audited(lab: &Lab, action: &str) -> Vec<serde_json::Value> {
    let log = lab.state(1).join("mig-state/shop/audit.log");
    std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["action"] == action)
        .collect()
}

fn result_of(e: &serde_json::Value) -> &str {
    e["result"].as_str().unwrap_or_default()
}

/// `mig KIND --url URL --to g2 --name shop2 --dry-run`: whether it exited 0, and its output.
fn cli_dry_run(url: &str, kind: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mig"))
        .args([
            kind,
            "--url",
            url,
            "--to",
            "g2",
            "--name",
            "shop2",
            "--dry-run",
        ])
        .env_remove("MIG_PASSWORD_CLI")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The names of the checks that failed in a dry run's answer (200 expected).
fn dry(url: &str, kind: &str, target_app: &str) -> (Vec<String>, serde_json::Value) {
    let (code, v) = post_op(
        url,
        serde_json::json!({"kind": kind, "target_app": target_app, "target_grid": "g2", "dry_run": true}),
    );
    assert_eq!(code, 200, "{v}");
    let failed = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    (failed, v)
}

fn detail(v: &serde_json::Value, name: &str) -> String {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["detail"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn sshd_pid(lab: &Lab, n: u8) -> String {
    std::fs::read_to_string(lab.path().join(format!("g{n}/sshd.pid")))
        .unwrap()
        .trim()
        .to_string()
}

/// Every check of the dry run fails once, on purpose, with a message that says what to fix, and
/// nothing changes on either grid. `shop`'s data volume is 15 TiB (sparse), more than any test
/// machine has free, so `room` fails throughout: each case adds its own failure to it. A real
/// start runs the same checks and refuses with the list (412).
#[test]
fn every_dry_run_check_fails_once_with_what_to_fix_and_nothing_changes() {
    let lab = Lab::up(2, &BASES);
    // This MIG offers migrate only, so a snapshot's `mode` check fails.
    let p = lab.state(1).join("templates/demoapp.toml");
    let anchor = r#""--set", "app_name=${app}""#;
    let t = std::fs::read_to_string(&p).unwrap();
    assert!(t.contains(anchor));
    std::fs::write(
        &p,
        t.replacen(anchor, &format!(r#"{anchor}, "--set", "mode=migrate""#), 1),
    )
    .unwrap();
    let out = lab.app(
        1,
        &[
            "provision",
            "demoapp",
            "shop",
            &format!("in_ip={}", lab.ip(1, 10)),
            &format!("web_ip={}", lab.ip(1, 11)),
            "data_size=15T",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    put(&lab.data_url(1), "greeting", b"hello");
    let url = lab.mig_url(1);
    let unchanged = || {
        assert_eq!(names(&lab.apps(1)), [("shop", "running")]);
        assert_eq!(names(&lab.apps(2)), [] as [(&str, &str); 0]);
        assert_eq!(
            get(&lab.data_url(1), "greeting").as_deref(),
            Some(&b"hello"[..])
        );
    };

    let (failed, v) = dry(&url, "migrate", "shop2");
    assert_eq!(failed, ["room"], "{v:#}");
    assert!(
        detail(&v, "room").contains("free space on it, or pick another grid"),
        "{v:#}"
    );
    let (ok, out) = cli_dry_run(&url, "migrate");
    assert!(!ok, "exit 1 when a check fails: {out}");
    assert!(
        out.contains("FAILED room") && out.contains("1 check(s) failed"),
        "{out}"
    );

    let (failed, v) = dry(&url, "snapshot", "shop2");
    assert_eq!(failed, ["mode", "room"], "{v:#}");
    assert!(detail(&v, "mode").contains("set the mode property to snapshot or both"));

    // Another application on g2 named `other`, on MigHelper's address of grid.info.
    let out = lab.app(
        2,
        &[
            "provision",
            "demoapp",
            "other",
            &format!("in_ip={}", lab.ip(2, 20)),
            &format!("web_ip={}", lab.ip(2, 22)),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (failed, v) = dry(&url, "migrate", "other");
    assert_eq!(
        failed,
        ["target name", "pull trust", "room", "addresses"],
        "{v:#}"
    );
    assert!(detail(&v, "target name").contains("pick another target name"));
    let (failed, v) = dry(&url, "migrate", "shop2");
    assert_eq!(failed, ["room", "addresses"], "{v:#}");
    assert!(
        detail(&v, "addresses").contains(&format!("{} (MigHelper_config)", lab.ip(2, 20))),
        "{v:#}"
    );
    for verb in ["stop", "destroy"] {
        assert!(lab.app(2, &[verb, "other"]).status.success());
    }

    let tpl = lab.state(2).join("templates/demoapp.toml");
    std::fs::rename(&tpl, tpl.with_extension("off")).unwrap();
    let (failed, v) = dry(&url, "migrate", "shop2");
    std::fs::rename(tpl.with_extension("off"), &tpl).unwrap();
    assert_eq!(failed, ["templates", "room"], "{v:#}");
    assert!(
        detail(&v, "templates").contains("lacks template demoapp"),
        "{v:#}"
    );

    let trust = lab.state(2).join("peer/known_hosts");
    std::fs::rename(&trust, trust.with_extension("off")).unwrap();
    let (failed, v) = dry(&url, "migrate", "shop2");
    std::fs::rename(trust.with_extension("off"), &trust).unwrap();
    assert_eq!(failed, ["pull trust", "room"], "{v:#}");
    assert!(
        detail(&v, "pull trust").contains("not a known peer grid"),
        "{v:#}"
    );

    for (n, which) in [(1, "source controller"), (2, "target controller")] {
        // A controller that is down: its sessions (MIG keeps one open per controller) and its
        // listener.
        let pid = sshd_pid(&lab, n);
        let _ = Command::new("pkill").args(["-KILL", "-P", &pid]).status();
        assert!(Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success());
        let (failed, v) = dry(&url, "migrate", "shop2");
        lab.run_lab_up("lab up again");
        assert_eq!(failed.first().map(String::as_str), Some(which), "{v:#}");
        assert!(
            detail(&v, which).contains(&format!("127.0.{}.1", lab.base + n)),
            "{v:#}"
        );
    }

    // A real start runs the same checks and refuses with them.
    let (code, v) = post_op(
        &url,
        serde_json::json!({"kind": "migrate", "target_app": "shop2", "target_grid": "g2"}),
    );
    assert_eq!(code, 412, "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("room: "), "{v:#}");
    assert_eq!(v["checks"].as_array().unwrap().len(), 9, "{v:#}");
    unchanged();
    // Each dry run is audited with how many checks failed, and the refused start with why.
    let dry_runs = audited(&lab, "dry_run");
    assert!(
        dry_runs.len() >= 8
            && dry_runs
                .iter()
                .all(|e| result_of(e).contains("checks failed")),
        "{dry_runs:#?}"
    );
    assert!(
        audited(&lab, "start")
            .iter()
            .any(|e| result_of(e).starts_with("refused (412)")),
        "the refused start is audited"
    );
}
