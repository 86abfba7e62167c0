//! Pre-copy, then a delta (`precopy = on`), on real sshd grids: writes made while the source ran
//! reach the target, a roll-back after the pre-copy leaves no staged copy, a gridctl without
//! staging is refused clearly, and `precopy = off` keeps the seed's steps.
//!
//! Lab bases 220..=229 (see tests/common/lab.rs).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::lab::{curl, fault_points, get, op_at, put, random_bytes, step, wait_for, Lab};

static BASES: AtomicU8 = AtomicU8::new(220);

const PRECOPYING: &str = "pre-copying the source application's data to the target grid";
const STOPPING_SOURCE: &str = "stopping the source application";
const MIGRATING: &str =
    "migrating the source application to the target grid as the target application";
const STARTING_TARGET: &str = "starting the target application";

/// Starts an operation of `kind` through the API, as the page does; returns its id.
fn start_op(lab: &Lab, kind: &str) -> String {
    common::lab::start_op(&lab.mig_url(1), kind, "g2", "shop2")
}

fn helper_url(lab: &Lab) -> String {
    format!("http://{}:8080", lab.ip(2, 20))
}

/// Waits until the operation at `url` satisfies `f`.
fn wait_op(
    url: &str,
    id: &str,
    secs: u64,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(&format!("operation {id} at {url}"), secs, || {
        op_at(url, id).filter(|op| f(op))
    })
}

fn wait_end(url: &str, id: &str) -> serde_json::Value {
    wait_op(url, id, 120, |op| op["state"] != "running")
}

fn helper_steps(op: &serde_json::Value) -> Vec<String> {
    op["monitors"][1]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// A lab of two grids with `shop` (a few MiB of data) on g1, `precopy` as asked.
fn lab_with_shop(precopy: bool) -> Lab {
    let lab = Lab::up(2, &BASES);
    lab.set_precopy(precopy);
    lab.provision_demo(1, "shop");
    for i in 0..3 {
        put(
            &lab.data_url(1),
            &format!("blob{i}"),
            &random_bytes(4 << 20, i + 1),
        );
    }
    lab
}

/// A write the application acknowledged: key and value.
type Write = (String, Vec<u8>);

fn names(apps: &[(String, String)]) -> Vec<&str> {
    apps.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn every_write_acknowledged_before_the_source_stopped_is_on_the_target() {
    let lab = lab_with_shop(true);
    let faults = fault_points(&lab);
    std::fs::write(faults.join("hold-precopied"), "").unwrap();

    // A writer changes the data while the pre-copy runs and after it, until told to stop.
    let acked: Arc<Mutex<Vec<Write>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, count, stop) = (acked.clone(), count.clone(), stop.clone());
        let url = lab.data_url(1);
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Overwrites an old value now and then, so that a block changes, not only grows.
                let key = format!("w{}", i % 40);
                let value = random_bytes(16 << 10, 100 + i);
                put(&url, &key, &value);
                // Paced, so that the 64 MiB log of the demo's data volume cannot fill up.
                std::thread::sleep(Duration::from_millis(20));
                let mut a = acked.lock().unwrap();
                a.retain(|(k, _)| *k != key);
                a.push((key, value));
                count.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
            i
        })
    };
    wait_for("the writer's first writes", 20, || {
        (count.load(Ordering::SeqCst) >= 3).then_some(())
    });
    let id = start_op(&lab, "migrate");
    let helper = helper_url(&lab);
    let op = wait_op(&helper, &id, 60, |op| {
        op["monitors"][1]["steps"][0]["state"] == "done"
    });
    assert_eq!(
        helper_steps(&op),
        [PRECOPYING, STOPPING_SOURCE, MIGRATING, STARTING_TARGET]
    );
    let pre = step(&op, PRECOPYING);
    assert!(pre["bytes_done"].as_u64().unwrap() >= 12 << 20, "{pre:#}");
    assert_eq!(step(&op, STOPPING_SOURCE)["state"], "pending");
    // Held between the pre-copy and the stop: the staged copy is there, marked, not startable.
    let info = lab.app(2, &["info", "shop2", "--batch"]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("staged\ttrue\n"), "{info}");
    assert!(info.contains(&format!("prop.mig_op\t{id}\n")), "{info}");
    let start = lab.app(2, &["start", "shop2"]);
    assert!(
        String::from_utf8_lossy(&start.stderr).contains("is a staged copy"),
        "{start:?}"
    );
    // The writes the writer makes now are in no pre-copy: only the delta can carry them.
    let n = count.load(Ordering::SeqCst);
    wait_for("writes after the pre-copy", 20, || {
        (count.load(Ordering::SeqCst) >= n + 5).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    std::fs::remove_file(faults.join("hold-precopied")).unwrap();

    let op = wait_end(&lab.mig_url(2), &id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let detail = step(&op, MIGRATING)["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("pre-copied, ") && detail.contains("changed since; verified 2 volumes"),
        "{detail}"
    );
    assert_eq!(names(&lab.apps(2)), ["shop2"]);
    for (k, v) in acked.lock().unwrap().iter() {
        assert!(
            get(&lab.data_url(2), k).as_deref() == Some(&v[..]),
            "{k}: an acknowledged write is not on the target ({writes} writes)"
        );
    }
    for i in 0..3 {
        assert!(get(&lab.data_url(2), &format!("blob{i}")) == Some(random_bytes(4 << 20, i + 1)));
    }
    let info = lab.app(2, &["info", "shop2", "--batch"]);
    assert!(!String::from_utf8_lossy(&info.stdout).contains("staged"));
}

/// Makes g1's gridctl refuse staging, as one older than stream format 3 does.
fn old_gridctl(lab: &Lab) {
    let faults = lab.state(1).join("faults");
    std::fs::create_dir_all(&faults).unwrap();
    std::fs::write(faults.join("no-staging"), "").unwrap();
}

/// A roll-back: failed, the source runs again with its data, nothing of the copy on g2.
fn assert_rolled_back(lab: &Lab, op: &serde_json::Value) {
    assert_eq!(op["state"], "rolled_back", "{op:#}");
    assert_eq!(op["leftovers"], serde_json::json!([]), "{op:#}");
    assert_eq!(lab.apps(1), [("shop".to_string(), "running".to_string())]);
    assert!(get(&lab.data_url(1), "blob0") == Some(random_bytes(4 << 20, 1)));
    wait_for("g2 to hold nothing", 30, || {
        lab.apps(2).is_empty().then_some(())
    });
}

#[test]
fn a_roll_back_after_the_pre_copy_leaves_no_staged_copy() {
    let lab = lab_with_shop(true);
    let faults = fault_points(&lab);
    std::fs::write(faults.join("hold-precopied"), "").unwrap();
    let id = start_op(&lab, "migrate");
    wait_op(&helper_url(&lab), &id, 60, |op| {
        op["monitors"][1]["steps"][0]["state"] == "done"
    });
    assert_eq!(
        names(&lab.apps(2))
            .iter()
            .filter(|n| **n == "shop2")
            .count(),
        1
    );
    // The final pull fails: the source's gridctl no longer stages.
    old_gridctl(&lab);
    std::fs::remove_file(faults.join("hold-precopied")).unwrap();
    let op = wait_end(&lab.mig_url(1), &id);
    assert_rolled_back(&lab, &op);
    assert_eq!(step(&op, PRECOPYING)["state"], "rolled_back", "{op:#}");
    let why = step(&op, MIGRATING)["detail"].as_str().unwrap().to_string();
    assert!(why.contains("without staged copies"), "{why}");
}

/// A cancel during the pre-copy takes effect at once, not when the pre-copy ends: here the
/// pre-copy's export is held (gridctl's `hold-export` hook) and never ends while the test waits.
#[test]
fn a_cancel_during_the_pre_copy_stops_it_and_rolls_back() {
    let lab = lab_with_shop(true);
    let hook = lab.state(1).join("faults/hold-export");
    std::fs::write(&hook, "").unwrap();
    let id = start_op(&lab, "migrate");
    wait_op(&helper_url(&lab), &id, 60, |op| {
        step(op, PRECOPYING)["state"] == "running"
    });
    let source = lab.mig_url(1);
    let csrf: serde_json::Value =
        serde_json::from_slice(&curl(&[&format!("{source}/api/v1/csrf")]).unwrap()).unwrap();
    let answer = curl(&[
        "-X",
        "POST",
        "-H",
        &format!("x-mig-csrf: {}", csrf["csrf"].as_str().unwrap()),
        &format!("{source}/api/v1/ops/{id}/cancel"),
    ]);
    assert!(answer.is_some(), "the cancel was refused");
    let op = wait_op(&source, &id, 60, |op| op["state"] != "running");
    std::fs::remove_file(&hook).unwrap();
    assert_eq!(op["state"], "cancelled", "{op:#}");
    assert_eq!(lab.apps(1), [("shop".to_string(), "running".to_string())]);
    wait_for("g2 to hold nothing", 30, || {
        lab.apps(2).is_empty().then_some(())
    });
}

#[test]
fn a_source_gridctl_without_staging_is_refused_clearly() {
    let lab = lab_with_shop(true);
    old_gridctl(&lab);
    let t = Instant::now();
    let id = start_op(&lab, "migrate");
    let op = wait_end(&lab.mig_url(1), &id);
    assert_rolled_back(&lab, &op);
    let why = step(&op, PRECOPYING)["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("grid g1's controller runs a gridctl without staged copies (stream format 3)")
            && why.contains("set precopy = off"),
        "{why}"
    );
    // Refused at once, not after a copy.
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn precopy_off_shows_the_seed_s_steps_and_a_snapshot_pre_copies_too() {
    let lab = lab_with_shop(false);
    let id = start_op(&lab, "migrate");
    let op = wait_end(&lab.mig_url(2), &id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(
        helper_steps(&op),
        [STOPPING_SOURCE, MIGRATING, STARTING_TARGET]
    );
    assert!(!step(&op, MIGRATING)["detail"]
        .as_str()
        .unwrap()
        .contains("pre-copied"));

    // Another lab, `precopy = on`: a snapshot pre-copies too.
    let lab = lab_with_shop(true);
    let sum = lab.checksum(1, "shop");
    let id = start_op(&lab, "snapshot");
    let op = wait_end(&lab.mig_url(1), &id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(
        helper_steps(&op),
        [
            PRECOPYING,
            STOPPING_SOURCE,
            MIGRATING,
            "re-starting the source application"
        ]
    );
    assert_eq!(lab.checksum(2, "shop2"), sum);
    assert_eq!(lab.apps(2), [("shop2".to_string(), "stopped".to_string())]);
}

#[test]
fn the_cli_shows_the_pre_copy_s_bytes_rate_and_eta() {
    let lab = lab_with_shop(true);
    // Paced, so that the pre-copy of the shop's 12 MiB lasts a few of the CLI's polls.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mig"))
        .args([
            "migrate",
            "--url",
            &lab.mig_url(1),
            "--to",
            "g2",
            "--name",
            "shop2",
        ])
        .args(["--max-rate", "3M"])
        .env_remove("MIG_PASSWORD_CLI")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    // The limit held for the pre-copy too (12 MiB at 3 MiB/s).
    let pre = said
        .lines()
        .find(|l| l.contains(PRECOPYING))
        .unwrap_or_default();
    let secs: f64 = pre
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or_default();
    assert!(pre.contains("done") && secs >= 3.0, "{said}");
    // Not a terminal here: the bar's plain lines, on stderr.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with(&format!("  {PRECOPYING}: ")))
        .collect();
    assert!(!lines.is_empty(), "no pre-copy progress in:\n{err}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" of ") && l.contains("/s, eta ")),
        "{err}"
    );
    assert_eq!(names(&lab.apps(2)), ["shop2"]);
}

#[test]
fn an_interrupted_pre_copy_is_tried_again_before_anything_rolls_back() {
    let lab = lab_with_shop(true);
    // gridctl's one-shot test hook: the next export from g1 (the pre-copy) is corrupted on the
    // way after 1 MiB, so the target refuses it, as it would a stream cut short.
    let faults = lab.state(1).join("faults");
    std::fs::create_dir_all(&faults).unwrap();
    std::fs::write(faults.join("corrupt-export-after"), "1048576").unwrap();
    let id = start_op(&lab, "migrate");
    let op = wait_end(&lab.mig_url(2), &id);
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert!(!faults.join("corrupt-export-after").exists());
    let detail = step(&op, PRECOPYING)["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("pre-copied while the source ran, after 1 interrupted attempt")
            && detail.contains("pre-copy from grid g1 failed"),
        "{detail}"
    );
    assert_eq!(names(&lab.apps(2)), ["shop2"]);
    for i in 0..3 {
        assert!(get(&lab.data_url(2), &format!("blob{i}")) == Some(random_bytes(4 << 20, i + 1)));
    }
}
