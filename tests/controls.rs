//! The operator's controls over a real lab (issue 16): a cancel during the copy rolls back and
//! ends `cancelled` with the source running on its data; a cancel sent to the source MIG, which
//! no longer drives the operation, is forwarded to MigHelper; a cancel after the cut-over is
//! refused with 409 and changes nothing; the dry run's every check fails once on purpose, with
//! its message, changing nothing on any grid; `mig migrate --dry-run` exits 0 only when all pass.
//!
//! Operations are held still with the fault points (`fault_dir`), never with sleeps.

mod common;

use std::process::Command;
use std::sync::atomic::AtomicU8;
use std::time::{Duration, Instant};

use common::lab::{curl, get, put, random_bytes, wait_for, Lab};

/// This binary's lab addresses: bases 250..=253, two labs of two grids.
static BASES: AtomicU8 = AtomicU8::new(250);

const MIGRATING: &str =
    "migrating the source application to the target grid as the target application";

type Data = Vec<(String, Vec<u8>)>;

fn names(apps: &[(String, String)]) -> Vec<(&str, &str)> {
    apps.iter().map(|(n, s)| (n.as_str(), s.as_str())).collect()
}

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

fn op_at(url: &str, id: &str) -> Option<serde_json::Value> {
    curl(&[&format!("{url}/api/v1/ops/{id}")]).and_then(|b| serde_json::from_slice(&b).ok())
}

fn step<'a>(op: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    op["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["steps"].as_array().unwrap())
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {op}"))
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

/// Switches the lab's MIG instances (the demo application's and MigHelper's) to fault points
/// under the returned directory; call it before the applications are provisioned.
fn fault_points(lab: &Lab) -> std::path::PathBuf {
    let dir = lab.path().join("mig-faults");
    std::fs::create_dir_all(&dir).unwrap();
    for n in 1..=lab.grids {
        for (file, anchor) in [
            ("demoapp.toml", r#""--set", "app_name=${app}""#),
            ("MigHelper.toml", r#""--set", "state_dir=${vol:state}""#),
        ] {
            let p = lab.state(n).join("templates").join(file);
            let t = std::fs::read_to_string(&p).unwrap();
            assert!(t.contains(anchor), "{anchor} not in {}", p.display());
            let with = format!(r#"{anchor}, "--set", "fault_dir={}""#, dir.display());
            std::fs::write(&p, t.replacen(anchor, &with, 1)).unwrap();
        }
    }
    dir
}

fn on(dir: &std::path::Path, point: &str) {
    std::fs::write(dir.join(point), "").unwrap();
}

fn off(dir: &std::path::Path, point: &str) {
    std::fs::remove_file(dir.join(point)).unwrap();
}

/// `shop` on g1 with a little data; returns it and the checksum of its volumes.
fn small_shop(lab: &Lab) -> (Data, String) {
    lab.provision_demo(1, "shop");
    let data: Data = vec![
        ("greeting".into(), b"hello".to_vec()),
        ("blob".into(), random_bytes(1 << 20, 7)),
    ];
    for (k, v) in &data {
        put(&lab.data_url(1), k, v);
    }
    (data, lab.checksum(1, "shop"))
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

    on(&faults, "hold-copy");
    let id = start_migrate(&source, "shop2");
    wait_op(&helper, &id, "the copy to be held", 60, |op| {
        step(op, MIGRATING)["state"] == "running"
    });
    let (code, v) = cancel(&helper, &id);
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["cancelled"]["user"], "anonymous");
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
}
