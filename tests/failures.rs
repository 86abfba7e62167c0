//! The failure paths of migrate over a real lab (issue 5): MigHelper killed during the copy, the
//! source controller unreachable during the copy, the target MIG killed during its clean-up,
//! MigHelper killed during its roll-back, and MigHelper restarted with its final handoff
//! unjournalled. Each test checks the end state on every grid (applications, data read back through the
//! application's own address, checksums), not only the operation's state.
//!
//! The copy is held still deterministically: gridctl's test hook makes the source grid's side of
//! it (the `gridctl ssh` that runs `peer export APP` for the target grid) wait before it sends
//! anything; the test finds that process, stops it (SIGSTOP), lifts the hook, does what it needs
//! while the step is `running`, then lets it go on (SIGCONT). That process exists only once the
//! target grid's SSH session to the source is up, so what the test does next (killing the
//! source's sshd, the helper, ...) always meets a copy in flight. No guesses about how long a
//! copy takes, which matters now that a small one takes milliseconds.
//!
//! Design decisions these tests pin down: a component that exits makes gridctl mark its
//! application `failed`. The MigHelper template asks the grid to start it again
//! (`restart = "on-failure"`), so a killed MigHelper comes back by itself; the demo application
//! does not, so after its MIG is killed the test does what an operator does, `app start NAME`.
//! Either way the restarted instance resumes from its journal (the helper's on its state volume,
//! the MIG's in its state_dir).

mod common;

use std::process::Command;
use std::sync::atomic::AtomicU8;
use std::time::Duration;

use common::lab::{
    curl, fault_points, get, names, off, on, op_at, put, random_bytes, small_shop, start_op, step,
    wait_for, Data, Lab,
};

/// This binary's lab addresses: two grids a test from base 200 up to 253. They overlap other
/// binaries' ranges, which is safe only because `cargo test` runs one test binary at a time
/// (scripts/test says why it uses cargo test): this binary holds more labs than a range of its own
/// leaves room for.
static BASES: AtomicU8 = AtomicU8::new(200);

const MIGRATING: &str =
    "migrating the source application to the target grid as the target application";
const DESTROYING_SOURCE: &str = "destroying the source application";
const PRECOPYING: &str = "pre-copying the source application's data to the target grid";

/// Starts a migrate through the API (as the page does) and returns the operation id.
fn start_migrate(mig_url: &str, target_grid: &str, target_app: &str) -> String {
    start_op(mig_url, "migrate", target_grid, target_app)
}

/// Every step of the operation, as (name, state).
fn step_states(op: &serde_json::Value) -> Vec<(String, String)> {
    op["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["steps"].as_array().unwrap())
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The helper's API on grid n of the lab (its template's in_ip, port 8080).
fn helper_url(lab: &Lab, n: u8) -> String {
    format!("http://{}:8080", lab.ip(n, 20))
}

/// A process of this machine: pid, parent pid, argv.
struct Proc {
    pid: i32,
    ppid: i32,
    argv: Vec<String>,
    env: Vec<String>,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let (Ok(cmd), Ok(stat)) = (
            std::fs::read(format!("/proc/{pid}/cmdline")),
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
        ) else {
            continue;
        };
        // The fields after the parenthesised command name: state, then ppid.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        let strings = |b: &[u8]| {
            b.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        };
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        out.push(Proc {
            pid,
            ppid,
            argv: strings(&cmd),
            env: strings(&env),
        });
    }
    out
}

/// The one process that satisfies `f`, waiting up to 30 s for it to appear. Polls often: the
/// copy's processes live for a fraction of a second.
fn find_process(what: &str, f: impl Fn(&Proc) -> bool) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found: Vec<i32> = processes()
            .into_iter()
            .filter(|p| f(p))
            .map(|p| p.pid)
            .collect();
        match found[..] {
            [pid] => return pid,
            [] => {}
            _ => panic!("more than one process is {what}: {found:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after 30 s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(pid: i32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// SIGKILL to `pid` and every process below it (one that is gone by then is no matter).
fn kill_tree(pid: i32) {
    let all = processes();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().filter(|p| p.ppid == parent).map(|p| p.pid));
        i += 1;
    }
    for pid in tree {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Makes the next copies from grid `from` wait before they send anything (gridctl's test hook
/// `STATE/faults/hold-export`), until [`stopped_export`] has one in hand.
fn hold_exports(lab: &Lab, from: u8) {
    std::fs::write(lab.state(from).join("faults/hold-export"), "").unwrap();
}

/// The held copy from grid `from`, stopped (SIGSTOP) and the hold lifted: it goes on at SIGCONT.
fn stopped_export(lab: &Lab, from: u8, app: &str) -> i32 {
    let pid = exporting(lab, from, app);
    signal(pid, "STOP");
    std::fs::remove_file(lab.state(from).join("faults/hold-export")).unwrap();
    pid
}

/// The source grid's side of a copy: the `gridctl ssh` on grid `from` that runs
/// `peer export APP` for another grid.
fn exporting(lab: &Lab, from: u8, app: &str) -> i32 {
    let state = lab.state(from).display().to_string();
    let cmd = format!("SSH_ORIGINAL_COMMAND=peer export {app}");
    find_process(&format!("the export of {app} from g{from}"), |p| {
        p.argv.first().is_some_and(|c| c.ends_with("gridctl"))
            && p.argv.get(1).is_some_and(|c| c == "ssh")
            && p.argv.contains(&state)
            && p.env.iter().any(|e| e.starts_with(&cmd))
    })
}

fn sshd_pid(lab: &Lab, n: u8) -> i32 {
    pid_file(lab, n, "sshd.pid")
}

fn daemon_pid(lab: &Lab, n: u8) -> i32 {
    pid_file(lab, n, "daemon.pid")
}

fn pid_file(lab: &Lab, n: u8, file: &str) -> i32 {
    std::fs::read_to_string(lab.path().join(format!("g{n}/{file}")))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// What every instance and grid knows of operation `id`, and the helper's log: for a failure.
fn dump(lab: &Lab, id: &str) -> String {
    let mut why = String::new();
    for u in [lab.mig_url(1), helper_url(lab, 2), lab.mig_url(2)] {
        why += &format!("--- at {u}: {:#}\n", op_at(&u, id).unwrap_or_default());
    }
    for n in 1..=lab.grids {
        why += &format!("--- g{n}: {:?}\n", lab.apps(n));
    }
    let log = lab.state(2).join(format!("apps/{}/log", helper_app(id)));
    why += &format!(
        "--- helper log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    why
}

/// Waits until `f` holds of the operation at `url`, and returns it; on a time-out, panics with
/// [`dump`].
fn wait_op(
    lab: &Lab,
    url: &str,
    id: &str,
    what: &str,
    secs: u64,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(op) = op_at(url, id).filter(|op| f(op)) {
            return op;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {secs} s waiting for {what} at {url}\n{}",
                dump(lab, id)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the operation has reached a step of `name` in `state` at `url`.
fn wait_step(
    lab: &Lab,
    url: &str,
    id: &str,
    name: &str,
    state: &str,
    secs: u64,
) -> serde_json::Value {
    wait_op(lab, url, id, &format!("{name} to be {state}"), secs, |op| {
        step(op, name)["state"] == state
    })
}

/// Waits until the operation has ended at `url`, and returns it.
fn wait_end(lab: &Lab, url: &str, id: &str, secs: u64) -> serde_json::Value {
    wait_op(lab, url, id, "the end", secs, |op| op["state"] != "running")
}

/// Demo application `shop` on g1 holding three values of 15 MiB of random bytes and a short one
/// (45 MiB take long enough to move that the test sees the copy's `ssh` before it ends); returns
/// the data and the checksum of its volumes.
fn shop_with_data(lab: &Lab) -> (Data, String) {
    lab.provision_demo(1, "shop");
    let mut data: Data = (0..3)
        .map(|i| (format!("blob{i}"), random_bytes(15 << 20, 11 + i)))
        .collect();
    data.push(("greeting".into(), b"hello".to_vec()));
    for (k, v) in &data {
        put(&lab.data_url(1), k, v);
    }
    (data, lab.checksum(1, "shop"))
}

/// Every value of `data` reads back the same at `url`.
/// A migrate of `shop` (holding [`Data`]) from g1 to g2 as `shop2`, its copy held in flight:
/// the source's export found and stopped (SIGCONT lets it go on), the step `running` at
/// MigHelper.
struct Held {
    data: Data,
    sum: String,
    id: String,
    helper: String,
    export: i32,
}

fn held_migrate(lab: &Lab) -> Held {
    let (data, sum) = shop_with_data(lab);
    hold_exports(lab, 1);
    let id = start_migrate(&lab.mig_url(1), "g2", "shop2");
    let helper = helper_url(lab, 2);
    let export = stopped_export(lab, 1, "shop");
    let op = wait_step(lab, &helper, &id, MIGRATING, "running", 30);
    assert_eq!(op["state"], "running");
    Held {
        data,
        sum,
        id,
        helper,
        export,
    }
}

/// The end state of a migrate rolled back with nothing left over: the copy's step failed, the
/// target's start undone, MigHelper destroyed; `shop` runs on g1 as it was, g2 holds nothing.
fn assert_rolled_back(lab: &Lab, op: &serde_json::Value, data: &Data, sum: &str) {
    assert_eq!(op["state"], "rolled_back", "{op:#}");
    assert_eq!(op["leftovers"], serde_json::json!([]), "{op:#}");
    assert_eq!(step(op, MIGRATING)["state"], "failed");
    assert_eq!(
        step(op, "starting the target application")["state"],
        "rolled_back"
    );
    assert_eq!(step(op, "destroying MigHelper")["state"], "done");
    assert_eq!(names(&lab.apps(1)), [("shop", "running")]);
    assert_eq!(
        names(&lab.apps(2)),
        [] as [(&str, &str); 0],
        "no partial target, no MigHelper"
    );
    assert_data(&lab.data_url(1), data);
    assert_eq!(
        lab.checksum(1, "shop"),
        sum,
        "the source's data is untouched"
    );
}

/// The end state of a migrate that succeeded with nothing left over: every step done, the source
/// gone from g1, only `shop2` on g2 (no MigHelper, no second copy), holding every byte.
fn assert_moved(lab: &Lab, op: &serde_json::Value, data: &Data, sum: &str) {
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(op["leftovers"], serde_json::json!([]), "{op:#}");
    for (name, state) in step_states(op) {
        assert_eq!(state, "done", "{name} in {op:#}");
    }
    assert_eq!(
        names(&lab.apps(1)),
        [] as [(&str, &str); 0],
        "source destroyed"
    );
    assert_eq!(
        names(&lab.apps(2)),
        [("shop2", "running")],
        "only the target on g2: no MigHelper, no second copy"
    );
    assert_data(&lab.data_url(2), data);
    assert_eq!(
        lab.checksum(2, "shop2"),
        sum,
        "every volume of the target as the source had it"
    );
}

fn assert_data(url: &str, data: &Data) {
    for (k, v) in data {
        let got = get(url, k);
        assert!(
            got.as_deref() == Some(&v[..]),
            "{url}/kv/{k}: {} bytes read back, {} written",
            got.map_or(0, |g| g.len()),
            v.len()
        );
    }
}

/// The helper application of an operation.
/// The `mig helper` process of operation `id` on grid 2 other than `not`, waiting for it.
fn helper_process(lab: &Lab, id: &str, not: i32) -> i32 {
    let helper_state = lab
        .state(2)
        .join(format!("apps/{}", helper_app(id)))
        .display()
        .to_string();
    find_process("mig helper", |p| {
        p.pid != not
            && p.argv.get(1).is_some_and(|c| c == "helper")
            && p.argv.iter().any(|x| x.contains(&helper_state))
    })
}

/// Waits until grid 2 has started MigHelper again after `killed`: a new process, `running`.
fn wait_restarted(lab: &Lab, id: &str, killed: i32) {
    helper_process(lab, id, killed);
    wait_for("the grid to restart MigHelper", 30, || {
        lab.apps(2)
            .iter()
            .any(|(n, s)| *n == helper_app(id) && s == "running")
            .then_some(())
    });
}

fn helper_app(id: &str) -> String {
    format!("mighelper-{}", &id[..8])
}

#[test]
fn a_killed_mighelper_is_restarted_by_its_grid_and_resumes_from_its_journal() {
    let lab = Lab::up(2, &BASES);
    // Hold the copy in the middle, then kill `mig helper` outright.
    let Held {
        data,
        sum,
        id,
        export,
        ..
    } = held_migrate(&lab);
    let mig_helper = helper_process(&lab, &id, 0);
    signal(mig_helper, "KILL");

    // Its grid starts it again by itself. It resumes from its journal (its state volume) while
    // the copy the killed helper began is still held on the target grid...
    wait_restarted(&lab, &id, mig_helper);
    std::thread::sleep(Duration::from_secs(2));
    // ... and only then does that orphaned copy go on, and end.
    signal(export, "CONT");

    let op = wait_end(&lab, &lab.mig_url(2), &id, 120);
    assert_moved(&lab, &op, &data, &sum);
}

#[test]
fn an_unreachable_source_controller_during_the_copy_rolls_back_once_it_answers() {
    let lab = Lab::up(2, &BASES);
    let Held {
        data,
        sum,
        id,
        helper,
        ..
    } = held_migrate(&lab);
    // g1's controller goes away: its sshd and every session it serves, the copy's included.
    kill_tree(sshd_pid(&lab, 1));
    let op = wait_step(&lab, &helper, &id, MIGRATING, "failed", 30);
    assert!(
        step(&op, MIGRATING)["detail"]
            .as_str()
            .unwrap()
            .contains("copy from grid g1 failed"),
        "{op:#}"
    );
    // The roll-back keeps trying to start the source until g1 answers again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(op_at(&helper, &id).unwrap()["state"], "running");
    lab.run_lab_up("lab up again");

    let op = wait_end(&lab, &lab.mig_url(1), &id, 90);
    assert_rolled_back(&lab, &op, &data, &sum);
    assert!(
        op["error"].as_str().unwrap().contains(MIGRATING),
        "the error names the failed step: {op:#}"
    );
    assert_eq!(
        step(&op, "stopping the source application")["state"],
        "rolled_back"
    );
    assert_eq!(step(&op, DESTROYING_SOURCE)["state"], "rolled_back");
}

#[test]
fn a_target_mig_killed_during_its_clean_up_finishes_it_when_started_again() {
    let lab = Lab::up(2, &BASES);
    let faults = fault_points(&lab);
    // g1's controller stops taking connections once the target MIG has taken the operation, so
    // its first clean-up step cannot reach it and keeps retrying.
    let Held {
        data,
        sum,
        id,
        export,
        ..
    } = held_migrate(&lab);
    cut_over_then_lose_the_source(&lab, &faults, &id, export);
    let target = lab.mig_url(2);

    // The target MIG dies mid-step; its grid marks the application failed.
    let state_dir = lab.state(2).join("mig-state/shop2").display().to_string();
    let serve = find_process("the target's mig serve", |p| {
        p.argv.get(1).is_some_and(|c| c == "serve") && p.argv.iter().any(|x| x.contains(&state_dir))
    });
    signal(serve, "KILL");
    wait_for("the grid to mark shop2 failed", 30, || {
        lab.apps(2)
            .iter()
            .any(|(n, s)| n == "shop2" && s == "failed")
            .then_some(())
    });

    // g1 answers again; the operator starts the target again; its MIG resumes the clean-up.
    lab.run_lab_up("lab up again");
    let out = lab.app(2, &["start", "shop2"]);
    assert!(
        out.status.success(),
        "app start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let op = wait_end(&lab, &target, &id, 90);
    assert_moved(&lab, &op, &data, &sum);
}

#[test]
fn a_mighelper_killed_during_the_roll_back_goes_on_rolling_back_when_restarted() {
    let lab = Lab::up(2, &BASES);
    // The copy fails because g1's controller is gone; the roll-back then waits for g1 to start
    // the source again...
    let Held {
        data,
        sum,
        id,
        helper,
        ..
    } = held_migrate(&lab);
    kill_tree(sshd_pid(&lab, 1));
    wait_step(&lab, &helper, &id, MIGRATING, "failed", 30);
    std::thread::sleep(Duration::from_secs(1));

    // ... and MigHelper dies while it waits.
    let mig_helper = helper_process(&lab, &id, 0);
    signal(mig_helper, "KILL");

    // Its grid starts it again, and g1 answers again: it must finish the roll-back, not take up
    // the copy of an operation it was undoing.
    wait_restarted(&lab, &id, mig_helper);
    lab.run_lab_up("lab up again");
    let op = wait_end(&lab, &lab.mig_url(1), &id, 60);
    assert_rolled_back(&lab, &op, &data, &sum);
}

#[test]
fn a_mighelper_that_forgot_its_final_handoff_does_not_undo_the_cut_over() {
    let lab = Lab::up(2, &BASES);
    let faults = fault_points(&lab);
    let target = lab.mig_url(2);
    // Hold the operation after the cut-over: the target MIG took it and cannot reach g1 to
    // destroy the source (g1's sshd is gone).
    let Held {
        data,
        sum,
        id,
        helper,
        export,
    } = held_migrate(&lab);
    cut_over_then_lose_the_source(&lab, &faults, &id, export);

    // MigHelper dies, and its journal is put back to where it was before the target's answer
    // reached it: what a helper killed between that answer and its journal write (or one whose
    // answer was lost on the way) has on record. It is frozen while the journal is edited, so
    // that neither it nor its restart (the grid's) sees the journal half-way.
    let mig_helper = helper_process(&lab, &id, 0);
    signal(mig_helper, "STOP");
    let journal = lab
        .state(2)
        .join(format!("apps/{}/vols/state/ops/{id}.json", helper_app(&id)));
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&journal).unwrap()).unwrap();
    assert_eq!(rec["owner"], "target", "{rec:#}");
    rec["owner"] = "helper".into();
    rec["seq"] = (rec["seq"].as_u64().unwrap() - 1).into();
    std::fs::write(&journal, serde_json::to_vec(&rec).unwrap()).unwrap();
    signal(mig_helper, "KILL");

    // Restarted by its grid, it sends the handoff again, which the target refuses as a replay:
    // the helper must see that the target already owns the operation, not roll back the target.
    wait_restarted(&lab, &id, mig_helper);
    let seen = wait_for("the restarted helper to settle", 60, || {
        op_at(&helper, &id).filter(|op| op["owner"] == "target" || op["rolling_back"] == true)
    });
    assert_eq!(seen["rolling_back"], false, "{seen:#}");
    assert!(
        names(&lab.apps(2)).contains(&("shop2", "running")),
        "the target runs on: {:?}",
        lab.apps(2)
    );

    lab.run_lab_up("lab up again");
    let op = wait_end(&lab, &target, &id, 90);
    assert_moved(&lab, &op, &data, &sum);
}

/// Waits until g2 holds the imported copy `shop2` (MigHelper holds at `hold-verify` after it).
fn wait_imported(lab: &Lab, helper: &str, id: &str) {
    wait_op(lab, helper, id, "the copy to be imported", 60, |_| {
        lab.apps(2).iter().any(|(n, _)| n == "shop2")
    });
}

/// Issue 13, item 1: the target MIG takes the cut-over handoff, but its 200 is lost, MigHelper's
/// retry is refused as a replay, and its status probes fail for a while. Before, MigHelper then
/// rolled back and destroyed the started target while the target MIG destroyed the source: no
/// copy left. Now MigHelper never destroys a started target; the target MIG finishes the move.
#[test]
fn a_lost_answer_to_the_cut_over_handoff_never_costs_the_application() {
    let lab = Lab::up(2, &BASES);
    let faults = fault_points(&lab);
    let (data, sum) = small_shop(&lab);
    // Hold MigHelper before its verify, so the faults below meet only the cut-over handoff.
    on(&faults, "hold-verify");
    let id = start_migrate(&lab.mig_url(1), "g2", "shop2");
    let helper = helper_url(&lab, 2);
    wait_imported(&lab, &helper, &id);
    on(&faults, "drop-handoff-reply");
    on(&faults, "fail-status");
    off(&faults, "hold-verify");

    // The target MIG took the operation (its answer was dropped) and cleans up.
    let target = lab.mig_url(2);
    let op = wait_end(&lab, &target, &id, 120);
    off(&faults, "drop-handoff-reply");
    off(&faults, "fail-status");
    assert!(
        step(&op, MIGRATING)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("blake3 equal")),
        "{op:#}"
    );
    assert_moved(&lab, &op, &data, &sum);
}

/// Issue 13, item 3: an application given the target's name after the operation started (here by
/// a person, while MigHelper is about to copy) is not MigHelper's to destroy. The operation fails
/// and rolls back; the other application keeps running with its data.
#[test]
fn a_target_name_taken_mid_operation_is_left_alone_and_the_operation_rolls_back() {
    let lab = Lab::up(2, &BASES);
    let faults = fault_points(&lab);
    let (data, sum) = small_shop(&lab);
    on(&faults, "hold-copy");
    let id = start_migrate(&lab.mig_url(1), "g2", "shop2");
    let helper = helper_url(&lab, 2);
    wait_step(&lab, &helper, &id, MIGRATING, "running", 60);
    lab.provision_demo(2, "shop2");
    put(&lab.data_url(2), "theirs", b"not the operation's");
    off(&faults, "hold-copy");

    let op = wait_end(&lab, &lab.mig_url(1), &id, 120);
    assert_eq!(op["state"], "rolled_back", "{op:#}");
    assert!(
        step(&op, MIGRATING)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("did not create")),
        "{op:#}"
    );
    assert_eq!(names(&lab.apps(1)), [("shop", "running")]);
    assert_eq!(
        names(&lab.apps(2)),
        [("shop2", "running")],
        "the other application stays; MigHelper is gone"
    );
    assert_eq!(
        get(&lab.data_url(2), "theirs").as_deref(),
        Some(&b"not the operation's"[..])
    );
    assert_data(&lab.data_url(1), &data);
    assert_eq!(lab.checksum(1, "shop"), sum);
}

/// Issue 13, item 4: the copy changed on the target after the transfer (a bad disk, a bug): the
/// verify compares every volume with the stopped source, refuses to start it and rolls back.
#[test]
fn a_copy_that_differs_from_the_source_never_starts_and_rolls_back() {
    let lab = Lab::up(2, &BASES);
    let faults = fault_points(&lab);
    let (data, sum) = small_shop(&lab);
    on(&faults, "hold-verify");
    let id = start_migrate(&lab.mig_url(1), "g2", "shop2");
    let helper = helper_url(&lab, 2);
    wait_imported(&lab, &helper, &id);
    let vol = lab.state(2).join("apps/shop2/vols/data");
    let mut bytes = std::fs::read(&vol).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&vol, bytes).unwrap();
    off(&faults, "hold-verify");

    let op = wait_end(&lab, &lab.mig_url(1), &id, 120);
    assert!(
        step(&op, MIGRATING)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("differs") && d.contains("data")),
        "{op:#}"
    );
    assert_rolled_back(&lab, &op, &data, &sum);
}

/// Lets the held copy go on to the cut-over, then takes g1's controller away (its sshd killed)
/// before the target MIG's clean-up reaches it: the target MIG waits at its clean-up fault point
/// until then. Not earlier: MigHelper's verify reads the source's checksums on g1 before the
/// target starts, and without them it rightly refuses to start the copy.
fn cut_over_then_lose_the_source(lab: &Lab, faults: &std::path::Path, id: &str, export: i32) {
    let target = lab.mig_url(2);
    on(faults, "hold-clean-up");
    signal(export, "CONT");
    wait_op(
        lab,
        &target,
        id,
        "the target MIG to take the operation",
        60,
        |op| op["owner"] == "target",
    );
    signal(sshd_pid(lab, 1), "KILL");
    off(faults, "hold-clean-up");
    wait_step(lab, &target, id, DESTROYING_SOURCE, "running", 60);
}

/// A crash point: where the operation is held, and what is killed there.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// `mig helper`; its grid starts it again (`restart = "on-failure"`).
    Helper,
    /// The MIG that takes the operation at the end (the target's after a migrate, the
    /// re-started source's after a snapshot); an operator `app start`s its application.
    FinalMig,
    /// Grid n's sshd (the listener; the sessions it serves go on); `lab up` starts it again, as
    /// its supervisor would.
    Sshd(u8),
    /// Grid n's `gridctl daemon`; `lab up` starts it again, as its supervisor would, and the new
    /// daemon adopts the applications still running and makes half-done work safe.
    Daemon(u8),
}

impl Victim {
    fn name(self) -> String {
        match self {
            Victim::Helper => "MigHelper".into(),
            Victim::FinalMig => "final MIG".into(),
            Victim::Sshd(n) => format!("g{n}'s sshd"),
            Victim::Daemon(n) => format!("g{n}'s daemon"),
        }
    }
}

/// Holds a migrate or snapshot (`kind`) at fault point `point` (a MIG point, or gridctl's
/// `hold-export` on g1), kills `victim` with SIGKILL, brings it back as its supervisor would, lets
/// the operation go on, and checks the invariant within a bounded time: the operation has ended,
/// no MigHelper is left, and for a migrate exactly one copy runs, with the source's bytes; for a
/// snapshot the source runs with its bytes and the copy is either absent or stopped with the same
/// bytes. Returns how long the end took after the fault was healed, or what broke.
fn crash_trial(kind: &str, point: &str, victim: Victim) -> Result<Outcome, Violation> {
    let lab = trial_lab(false);
    let faults = fault_points(&lab);
    let (_, sum) = small_shop(&lab);
    let snapshot = kind == "snapshot";
    // The application that runs at the end, and its MIG.
    let (final_grid, final_app) = if snapshot { (1, "shop") } else { (2, "shop2") };
    let final_mig = lab.mig_url(final_grid);
    if point == "hold-export" {
        hold_exports(&lab, 1);
    } else {
        on(&faults, point);
    }
    let id = start_op(&lab.mig_url(1), kind, "g2", "shop2");
    let helper = helper_url(&lab, 2);
    // Wait until the operation stands at the point.
    let mut export = None;
    match point {
        "hold-export" => export = Some(stopped_export(&lab, 1, "shop")),
        "hold-copy" => drop(wait_step(&lab, &helper, &id, MIGRATING, "running", 60)),
        "hold-verify" => wait_imported(&lab, &helper, &id),
        "hold-clean-up" => drop(wait_op(&lab, &final_mig, &id, "the final MIG", 60, |op| {
            op["owner"] == "target"
        })),
        other => return Err(Violation::new(format!("unknown point {other}"))),
    }
    match victim {
        Victim::Helper => {
            let pid = helper_process(&lab, &id, 0);
            signal(pid, "KILL");
        }
        Victim::FinalMig => {
            let state_dir = lab
                .state(final_grid)
                .join(format!("mig-state/{final_app}"))
                .display()
                .to_string();
            let serve = find_process("the final mig serve", |p| {
                p.argv.get(1).is_some_and(|c| c == "serve")
                    && p.argv.iter().any(|x| x.contains(&state_dir))
            });
            signal(serve, "KILL");
        }
        Victim::Sshd(n) => signal(sshd_pid(&lab, n), "KILL"),
        Victim::Daemon(n) => signal(daemon_pid(&lab, n), "KILL"),
    }
    // Heal: lift the point, bring the victim back.
    if let Some(pid) = export {
        signal(pid, "CONT");
    } else {
        off(&faults, point);
    }
    let healed = std::time::Instant::now();
    match victim {
        Victim::Helper => {}
        Victim::Sshd(_) | Victim::Daemon(_) => lab.run_lab_up("the grid's sshd and daemon back"),
        Victim::FinalMig => {
            wait_for("the grid to mark the application failed", 30, || {
                lab.apps(final_grid)
                    .iter()
                    .any(|(n, s)| n == final_app && s == "failed")
                    .then_some(())
            });
            let out = lab.app(final_grid, &["start", final_app]);
            if !out.status.success() {
                let e = String::from_utf8_lossy(&out.stderr);
                return Err(Violation::new(format!("app start {final_app}: {e}")));
            }
        }
    }
    check_invariant(&lab, &id, kind, &sum, healed)
}

/// How long a trial may take to reach a final state after its fault is healed.
const BOUND: Duration = Duration::from_secs(240);

/// What a trial ended with: the operation's final state and how long it took after the heal.
#[derive(Debug)]
struct Outcome {
    state: String,
    took: Duration,
}

/// An invariant that did not hold; `data_lost` when no running copy holds the source's bytes.
#[derive(Debug)]
struct Violation {
    what: String,
    data_lost: bool,
}

impl Violation {
    fn new(what: impl Into<String>) -> Violation {
        Violation {
            what: what.into(),
            data_lost: false,
        }
    }

    fn lost(what: impl Into<String>) -> Violation {
        Violation {
            what: what.into(),
            data_lost: true,
        }
    }
}

/// `mig status --url URL ID`: the operation as the CLI reports it.
fn mig_status(url: &str, id: &str) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_mig"))
        .args(["status", "--url", url, id])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// The invariant of issue 14, checked within [`BOUND`] of `healed`: the operation reaches a final
/// state; no MigHelper is left; never two running copies; for a migrate exactly one copy runs with
/// the source's bytes (`sum`), for a snapshot the source runs with them and the copy is either
/// absent or stopped with the same bytes. And the operation's final state, as the API (what the
/// monitor page shows) and `mig status` report it, is the grids' reality: `succeeded` only if the
/// copy is where the operation put it, `rolled_back`/`failed` only if the source runs and no copy
/// is left.
fn check_invariant(
    lab: &Lab,
    id: &str,
    kind: &str,
    sum: &str,
    healed: std::time::Instant,
) -> Result<Outcome, Violation> {
    check_invariant_with(lab, id, kind, sum, sum, healed)
}

/// The applications that run on g1 and g2 (grid, name), MigHelper aside.
fn running_copies<'a>(
    g1: &'a [(String, String)],
    g2: &'a [(String, String)],
) -> Vec<(u8, &'a str)> {
    g1.iter()
        .map(|a| (1, a))
        .chain(g2.iter().map(|a| (2, a)))
        .filter(|(_, (n, s))| s == "running" && !n.starts_with("mighelper-"))
        .map(|(g, (n, _))| (g, n.as_str()))
        .collect()
}

/// [`check_invariant`] where the source changed after the copy (someone started it and wrote):
/// the running copy must hold `sum`, a snapshot's copy `copy_sum` (the source at the copy).
fn check_invariant_with(
    lab: &Lab,
    id: &str,
    kind: &str,
    sum: &str,
    copy_sum: &str,
    healed: std::time::Instant,
) -> Result<Outcome, Violation> {
    let deadline = healed + BOUND;
    loop {
        let (g1, g2) = (lab.apps(1), lab.apps(2));
        let running = running_copies(&g1, &g2);
        if running.len() > 1 {
            return Err(Violation::new(format!("two running copies: {running:?}")));
        }
        let helpers = g2.iter().any(|(n, _)| n.starts_with("mighelper-"));
        // The operation as the MIG of the application that runs now reports it.
        let ended = running.first().and_then(|&(g, _)| {
            let url = lab.mig_url(g);
            op_at(&url, id)
                .filter(|op| op["state"] != "running")
                .map(|op| (url, op))
        });
        if let (Some((url, op)), false) = (&ended, helpers) {
            // The grids again, now that the operation has ended: the lists above may predate its
            // last steps (with one SSH session per grid, the clean-up can destroy the source,
            // stop and destroy MigHelper between listing g1 and listing g2).
            let (g1, g2) = (lab.apps(1), lab.apps(2));
            let running = running_copies(&g1, &g2);
            if running.len() != 1 {
                return Err(Violation::new(format!(
                    "the operation ended {} but the running copies are {running:?}",
                    op["state"]
                )));
            }
            let (g, app) = running[0];
            if lab.checksum(g, app) != sum {
                return Err(Violation::lost(format!(
                    "{app} on g{g} does not hold the source's bytes"
                )));
            }
            let state = op["state"].as_str().unwrap_or_default().to_string();
            let copy = g2
                .iter()
                .find(|(n, _)| n == "shop2")
                .map(|(_, s)| s.as_str());
            let truth = match (kind, state.as_str()) {
                ("migrate", "succeeded") => (g, app) == (2, "shop2") && g1.is_empty(),
                ("snapshot", "succeeded") => (g, app) == (1, "shop") && copy == Some("stopped"),
                (_, "rolled_back" | "failed" | "cancelled") => {
                    (g, app) == (1, "shop") && copy.is_none()
                }
                _ => false,
            };
            if !truth {
                return Err(Violation::new(format!(
                    "the operation says {state} at {url} but g1 holds {g1:?} and g2 {g2:?}"
                )));
            }
            if kind == "snapshot" && copy.is_some() && lab.checksum(2, "shop2") != copy_sum {
                return Err(Violation::lost(
                    "the snapshot's copy on g2 is not the source's bytes",
                ));
            }
            match mig_status(url, id) {
                Some(s) if s["state"] == op["state"] => {}
                other => {
                    return Err(Violation::new(format!(
                        "mig status says {other:?}, the API {state}"
                    )))
                }
            }
            return Ok(Outcome {
                state,
                took: healed.elapsed(),
            });
        }
        // Held for an operator: the operation ended saying why, and what is left (MigHelper among
        // it) and how to finish; one copy runs, with every byte.
        let held = op_at(&helper_url(lab, 2), id).filter(|op| {
            op["state"] != "running"
                && op["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("held for an operator"))
        });
        if let (Some(op), [(g, app)]) = (held, &running[..]) {
            let names_helper = op["leftovers"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|x| x.as_str().unwrap_or("").contains("MigHelper"))
            });
            if !names_helper {
                return Err(Violation::new(format!(
                    "held, but the leftovers do not name MigHelper: {op:#}"
                )));
            }
            if lab.checksum(*g, app) != sum {
                return Err(Violation::lost(format!(
                    "held, and {app} on g{g} does not hold the source's bytes"
                )));
            }
            return Ok(Outcome {
                state: "held".into(),
                took: healed.elapsed(),
            });
        }
        if std::time::Instant::now() > deadline {
            let lost = !running.iter().any(|&(g, a)| lab.checksum(g, a) == sum);
            let what = format!(
                "no final state within {BOUND:?}: g1 {g1:?}, g2 {g2:?}\n{}",
                dump(lab, id)
            );
            return Err(Violation {
                what,
                data_lost: lost,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The lab of one trial (two grids at base 230: trials run one at a time), its directory and
/// namespaces noted for [`left_behind`].
fn trial_lab(netns: bool) -> Lab {
    trial_lab_of(2, netns)
}

fn trial_lab_of(grids: u8, netns: bool) -> Lab {
    // The sweep runs its trials one at a time, alone (scripts/fault-sweep): one base will do.
    // A trial kept as a test takes the next of this binary's bases.
    let sweep_base = AtomicU8::new(230);
    let bases = match (IN_SWEEP.get(), netns) {
        (true, _) => &sweep_base,
        (false, false) => &BASES,
        (false, true) => &NETNS_BASES,
    };
    let lab = Lab::up_with(grids, bases, netns);
    // `scripts/fault-sweep --precopy on`: the trials meet the default path, pre-copy and delta.
    if IN_SWEEP.get() && std::env::var("FAULT_SWEEP_PRECOPY").as_deref() == Ok("on") {
        lab.set_precopy(true);
    }
    let names = if netns {
        (0..=grids).map(|n| netns_of(&lab, n)).collect()
    } else {
        Vec::new()
    };
    *LAST_LAB.lock().unwrap() = Some((lab.path().to_path_buf(), names));
    lab
}

thread_local! {
    static IN_SWEEP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `--netns` labs' bases: their addresses (198.18.x) and namespaces are their own, so they need
/// only differ from each other.
static NETNS_BASES: AtomicU8 = AtomicU8::new(230);

static LAST_LAB: std::sync::Mutex<Option<(std::path::PathBuf, Vec<String>)>> =
    std::sync::Mutex::new(None);

/// What the last trial's lab left behind once it was dropped: processes that mention its
/// directory, network namespaces it made.
fn left_behind() -> Vec<String> {
    let Some((dir, names)) = LAST_LAB.lock().unwrap().take() else {
        return Vec::new();
    };
    let dir = dir.display().to_string();
    let mut left: Vec<String> = processes()
        .into_iter()
        .filter(|p| p.argv.iter().any(|a| a.contains(&dir)) && !p.argv[0].ends_with("sh"))
        .map(|p| format!("process {} {:?}", p.pid, p.argv))
        .collect();
    left.extend(
        names
            .into_iter()
            .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
            .map(|n| format!("namespace {n}")),
    );
    left
}

/// The network namespace of grid `n` (0: the router) of a `--netns` lab, from `DIR/netns`.
fn netns_of(lab: &Lab, n: u8) -> String {
    let which = if n == 0 {
        "router".into()
    } else {
        format!("g{n}")
    };
    let t = std::fs::read_to_string(lab.path().join("netns")).unwrap();
    t.lines()
        .find_map(|l| l.strip_prefix(&format!("{which} ")))
        .unwrap_or_else(|| panic!("no {which} in {t}"))
        .to_string()
}

/// Runs `argv` in grid `n`'s namespace (0: the router), asserting success.
fn in_netns(lab: &Lab, n: u8, argv: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns_of(lab, n)])
        .args(argv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?} in {}: {}",
        netns_of(lab, n),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs nftables `rules` (one table `fault`, its rules counted) in grid `n`'s namespace.
fn nft_fault(lab: &Lab, n: u8, hook: &str, rules: &[String]) {
    let mut s = format!(
        "add table inet fault\nadd chain inet fault {hook} {{ type filter hook {hook} priority 0; }}\n"
    );
    for r in rules {
        s += &format!("add rule inet fault {hook} {r} counter drop\n");
    }
    let f = lab.path().join("fault.nft");
    std::fs::write(&f, s).unwrap();
    in_netns(lab, n, &["nft", "-f", &f.display().to_string()]);
}

/// Removes the table `fault` from grid `n`'s namespace and returns how many packets it dropped.
fn nft_heal(lab: &Lab, n: u8) -> u64 {
    let listed = in_netns(lab, n, &["nft", "list", "table", "inet", "fault"]);
    in_netns(lab, n, &["nft", "delete", "table", "inet", "fault"]);
    listed
        .split("packets ")
        .skip(1)
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A network fault of the sweep (grids in their own namespaces, `gridctl lab up --netns`).
#[derive(Debug, Clone, Copy)]
enum NetFault {
    /// The link between the two grids cut for a while (both directions) in the middle of the copy.
    CutMidCopy,
    /// MigHelper's cut-over handoff to the final MIG never arrives: the final MIG's grid drops
    /// every packet with data from MigHelper's grid to its port (the handshake passes, so the
    /// grid's own readiness check does too).
    DropHandoffRequest,
    /// The handoff arrives and is taken, but the answer (and every status answer) is dropped.
    DropHandoffReply,
    /// The copy is found bad (one byte flipped on the target), and the source grid is cut off
    /// from everything while MigHelper rolls back.
    CutSourceDuringRollBack,
    /// The link to the target grid limited to 40 Mbit/s (tc tbf) for the whole operation.
    SlowLink,
}

impl NetFault {
    fn name(self) -> &'static str {
        match self {
            NetFault::CutMidCopy => "cut g1-g2 mid-copy",
            NetFault::DropHandoffRequest => "drop the handoff request",
            NetFault::DropHandoffReply => "drop the handoff reply",
            NetFault::CutSourceDuringRollBack => "cut g1 off in the roll-back",
            NetFault::SlowLink => "slow link (tbf 40 Mbit/s)",
        }
    }
}

/// How long a cut or partition lasts before it is healed: longer than one handoff attempt
/// (30 s), so that MigHelper meets a time-out and retries.
const PARTITION: Duration = Duration::from_secs(35);

/// A `kind` operation from g1 to g2 in a `--netns` lab, with `fault` on the network; the fault
/// is healed after [`PARTITION`] (the slow link at the end) and the invariant checked. A fault
/// that never met the operation (no packet dropped) is a broken trial, not a pass.
fn net_trial(kind: &str, fault: NetFault) -> Result<Outcome, Violation> {
    let lab = trial_lab(true);
    let faults = fault_points(&lab);
    let snapshot = kind == "snapshot";
    let (data, sum) = if matches!(fault, NetFault::SlowLink) {
        shop_with_data(&lab)
    } else {
        small_shop(&lab)
    };
    let bytes: usize = data.iter().map(|(_, v)| v.len()).sum();
    let net = |n: u8| format!("{}/24", lab.ip(n, 0));
    let final_grid = if snapshot { 1 } else { 2 };
    let final_mig = lab.ip(final_grid, 10);
    let helper = helper_url(&lab, 2);
    match fault {
        NetFault::CutMidCopy => hold_exports(&lab, 1),
        NetFault::SlowLink => {
            in_netns(
                &lab,
                0,
                &[
                    "tc", "qdisc", "add", "dev", "g2", "root", "tbf", "rate", "40mbit", "burst",
                    "64kb", "latency", "500ms",
                ],
            );
        }
        _ => on(&faults, "hold-verify"),
    }
    let started = std::time::Instant::now();
    let id = start_op(&lab.mig_url(1), kind, "g2", "shop2");
    let mut dropped = None;
    let healed = match fault {
        NetFault::CutMidCopy => {
            let export = stopped_export(&lab, 1, "shop");
            nft_fault(
                &lab,
                0,
                "forward",
                &[
                    format!("ip saddr {} ip daddr {}", net(1), net(2)),
                    format!("ip saddr {} ip daddr {}", net(2), net(1)),
                ],
            );
            signal(export, "CONT");
            std::thread::sleep(PARTITION);
            dropped = Some(nft_heal(&lab, 0));
            std::time::Instant::now()
        }
        NetFault::DropHandoffRequest | NetFault::DropHandoffReply => {
            wait_imported(&lab, &helper, &id);
            let (hook, rule) = if matches!(fault, NetFault::DropHandoffRequest) {
                (
                    "input",
                    format!("ip saddr {} ip daddr {final_mig} tcp dport 8080", net(2)),
                )
            } else {
                (
                    "output",
                    format!("ip saddr {final_mig} tcp sport 8080 ip daddr {}", net(2)),
                )
            };
            nft_fault(
                &lab,
                final_grid,
                hook,
                &[format!("{rule} meta length > 64")],
            );
            off(&faults, "hold-verify");
            std::thread::sleep(PARTITION);
            dropped = Some(nft_heal(&lab, final_grid));
            std::time::Instant::now()
        }
        NetFault::CutSourceDuringRollBack => {
            wait_imported(&lab, &helper, &id);
            let vol = lab.state(2).join("apps/shop2/vols/data");
            let mut b = std::fs::read(&vol).unwrap();
            b[0] ^= 0xff;
            std::fs::write(&vol, b).unwrap();
            nft_fault(
                &lab,
                0,
                "forward",
                &[
                    format!("ip saddr {}", net(1)),
                    format!("ip daddr {}", net(1)),
                ],
            );
            off(&faults, "hold-verify");
            wait_step(&lab, &helper, &id, MIGRATING, "failed", 60);
            std::thread::sleep(PARTITION);
            dropped = Some(nft_heal(&lab, 0));
            std::time::Instant::now()
        }
        NetFault::SlowLink => {
            wait_step(&lab, &helper, &id, MIGRATING, "done", 120);
            let took = started.elapsed();
            // 40 Mbit/s is 5 MB/s: a copy much faster than that never met the limit.
            let least = Duration::from_secs_f64(bytes as f64 / 5e6 * 0.7);
            if took < least {
                return Err(Violation::new(format!(
                    "the copy of {bytes} bytes took {took:.1?}, under {least:.1?}: the limit did not apply"
                )));
            }
            in_netns(&lab, 0, &["tc", "qdisc", "del", "dev", "g2", "root"]);
            std::time::Instant::now()
        }
    };
    if dropped == Some(0) {
        return Err(Violation::new(format!(
            "{}: no packet was dropped, the fault never met the operation",
            fault.name()
        )));
    }
    let outcome = check_invariant(&lab, &id, kind, &sum, healed)?;
    if matches!(fault, NetFault::SlowLink) && outcome.state != "succeeded" {
        return Err(Violation::new(format!(
            "a slow link must not fail the operation: it {}",
            outcome.state
        )));
    }
    Ok(outcome)
}

fn net_trials() -> Vec<Trial> {
    let mut trials = Vec::new();
    for kind in ["migrate", "snapshot"] {
        for fault in [
            NetFault::CutMidCopy,
            NetFault::DropHandoffRequest,
            NetFault::DropHandoffReply,
            NetFault::CutSourceDuringRollBack,
            NetFault::SlowLink,
        ] {
            trials.push(Trial {
                name: format!("{kind:<8} {}", fault.name()),
                run: Box::new(move || net_trial(kind, fault)),
            });
        }
    }
    trials
}

/// An operator `app start`s the source by hand while the operation holds it stopped, at `point`:
/// in the middle of the copy (`hold-export`), or after the copy and before the cut-over
/// (`hold-verify`), and a user then writes to it. Whatever the operation does, that write must
/// not be lost and no two copies may run: the copy that runs at the end holds it. With `write`
/// false nobody writes before the verify (whose checksums then agree): the target MIG is held
/// before its clean-up, so that two running copies, if the operation makes them, are seen.
fn operator_start_trial(kind: &str, point: &str, write: bool) -> Result<Outcome, Violation> {
    let lab = trial_lab(false);
    let faults = fault_points(&lab);
    let (_, sum) = small_shop(&lab);
    let helper = helper_url(&lab, 2);
    let mut export = None;
    if point == "hold-export" {
        hold_exports(&lab, 1);
    } else {
        on(&faults, point);
    }
    let id = start_op(&lab.mig_url(1), kind, "g2", "shop2");
    if point == "hold-export" {
        export = Some(stopped_export(&lab, 1, "shop"));
    } else {
        wait_imported(&lab, &helper, &id);
    }
    let started = lab.app(1, &["start", "shop"]).status.success();
    let mut now_sum = sum.clone();
    if started && !write {
        on(&faults, "hold-clean-up");
    }
    if started && write {
        wait_for("the source's MIG to answer", 30, || {
            curl(&[&format!("{}/kv/none", lab.data_url(1))])
                .map(|_| ())
                .or_else(|| op_at(&lab.mig_url(1), &id).map(|_| ()))
        });
        put(&lab.data_url(1), "late", b"written after the copy");
        now_sum = lab.checksum(1, "shop");
    }
    match export {
        Some(pid) => signal(pid, "CONT"),
        None => off(&faults, point),
    }
    if started && !write {
        let final_mig = lab.mig_url(if kind == "snapshot" { 1 } else { 2 });
        wait_for("the cut-over or the end", 60, || {
            let ended = [lab.mig_url(1), lab.mig_url(2), helper.clone()]
                .iter()
                .filter_map(|u| op_at(u, &id))
                .any(|op| op["state"] != "running");
            // The final actor took it: the target MIG after the cut-over, or the source's MIG
            // after a roll-back (both then hold before their clean-up).
            let taken = [final_mig.clone(), lab.mig_url(1)]
                .iter()
                .filter_map(|u| op_at(u, &id))
                .any(|f| f["owner"] == "target");
            (ended || taken).then_some(())
        });
        std::thread::sleep(Duration::from_secs(1));
        let running = [(1, lab.apps(1)), (2, lab.apps(2))]
            .into_iter()
            .flat_map(|(g, apps)| apps.into_iter().map(move |a| (g, a)))
            .filter(|(_, (n, s))| s == "running" && !n.starts_with("mighelper-"))
            .count();
        off(&faults, "hold-clean-up");
        if running > 1 {
            return Err(Violation::new(
                "the source was started by hand before the cut-over, and the target was started too: two running copies",
            ));
        }
    }
    let healed = std::time::Instant::now();
    let o = check_invariant_with(&lab, &id, kind, &now_sum, &sum, healed)?;
    if started && o.state == "succeeded" && kind == "migrate" {
        return Err(Violation::lost(
            "the source was started and written to after the copy, and the migrate still succeeded",
        ));
    }
    Ok(Outcome {
        state: format!(
            "{}{}",
            o.state,
            if started { "" } else { " (start refused)" }
        ),
        took: o.took,
    })
}

/// `POST URL/api/v1/handoff` of `op`, signed with `key` for `seq` and the receiver `op`'s owner
/// names, as the real sender signs it: the HTTP status.
fn post_handoff(url: &str, key: &actors::auth::OpKey, op: &actors::op::Op, seq: u64) -> u16 {
    let body = serde_json::to_vec(op).unwrap();
    let signed = key.sign(&op.id, seq, &actors::handoff::audience(op), &body);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &body).unwrap();
    let mut args = vec![
        "-s".to_string(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "-X".into(),
        "POST".into(),
        "-H".into(),
        "content-type: application/json".into(),
    ];
    for (k, v) in signed.headers() {
        args.push("-H".into());
        args.push(format!("{k}: {v}"));
    }
    args.push("--data-binary".into());
    args.push(format!("@{}", f.path().display()));
    args.push(format!("{url}/api/v1/handoff"));
    let out = Command::new("curl").args(&args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

/// The operation's full record at `url` (the lab's MIG instances have no GUI credentials).
fn record_at(url: &str, id: &str) -> actors::op::Op {
    let b = curl(&[&format!("{url}/api/v1/ops/{id}/record")]).expect("the record");
    serde_json::from_slice(&b).unwrap()
}

/// Replays, with the application's own handoff key (what an attacker who captured a handoff has
/// in effect): the source's handoff to MigHelper again while MigHelper copies; then, once the
/// operation ended, the final handoff to the final MIG again, and a fresh one signed for the
/// next sequence number (a handoff for an ended operation). Each must be refused and change
/// nothing; the operation ends as it would have.
fn replay_trial(kind: &str) -> Result<Outcome, Violation> {
    let lab = trial_lab(false);
    let faults = fault_points(&lab);
    let (_, sum) = small_shop(&lab);
    let secret = lab.state(1).join("apps/shop/vols/config/handoff.key");
    on(&faults, "hold-copy");
    let id = start_op(&lab.mig_url(1), kind, "g2", "shop2");
    let helper = helper_url(&lab, 2);
    wait_step(&lab, &helper, &id, MIGRATING, "running", 60);
    let key = actors::auth::AppKey::load_or_create(&secret)
        .unwrap()
        .op_key(&id);
    // MigHelper serves no record (it has no credentials to check): its journal is the record.
    let journal = lab
        .state(2)
        .join(format!("apps/{}/vols/state/ops/{id}.json", helper_app(&id)));
    let read_journal =
        || -> actors::op::Op { serde_json::from_slice(&std::fs::read(&journal).unwrap()).unwrap() };
    let at_helper = read_journal();
    let code = post_handoff(&helper, &key, &at_helper, at_helper.seq);
    if code == 200 {
        return Err(Violation::new("MigHelper took its handoff a second time"));
    }
    let after = read_journal();
    if after.seq != at_helper.seq || after.rolling_back {
        return Err(Violation::new(format!(
            "the replay to MigHelper ({code}) changed the operation: seq {} → {}, rolling back {}",
            at_helper.seq, after.seq, after.rolling_back
        )));
    }
    off(&faults, "hold-copy");
    let healed = std::time::Instant::now();
    let o = check_invariant(&lab, &id, kind, &sum, healed)?;
    let final_mig = lab.mig_url(if kind == "snapshot" || o.state != "succeeded" {
        1
    } else {
        2
    });
    let done = record_at(&final_mig, &id);
    let again = post_handoff(&final_mig, &key, &done, done.seq);
    let later = post_handoff(&final_mig, &key, &done, done.seq + 1);
    if again == 200 || later == 200 {
        return Err(Violation::new(format!(
            "the final MIG took a handoff for an ended operation ({again}, {later})"
        )));
    }
    // Nothing changed: the same end, the same grids.
    let o2 = check_invariant(&lab, &id, kind, &sum, std::time::Instant::now())?;
    if o2.state != o.state {
        return Err(Violation::new(format!("{} became {}", o.state, o2.state)));
    }
    Ok(Outcome {
        state: format!("{} (replays {code}, {again}, {later})", o.state),
        took: o.took,
    })
}

/// Two migrates race for one target name: `shop` from g1 and `shop3` from g3, both to g2 as
/// `twin`, started together. At most one may make `twin`; each source either moved into it, with
/// every byte, or runs where it was with its bytes; no MigHelper is left; and each operation's
/// state says which.
fn race_trial() -> Result<Outcome, Violation> {
    let lab = trial_lab_of(3, false);
    lab.provision_demo(1, "shop");
    lab.provision_demo(3, "shop3");
    put(&lab.data_url(1), "who", b"shop");
    put(&lab.data_url(3), "who", b"shop3");
    let sources = [
        (1, "shop", lab.checksum(1, "shop")),
        (3, "shop3", lab.checksum(3, "shop3")),
    ];
    let ids: Vec<String> = sources
        .iter()
        .map(|(g, _, _)| start_op(&lab.mig_url(*g), "migrate", "g2", "twin"))
        .collect();
    let started = std::time::Instant::now();
    let deadline = started + BOUND;
    let states = loop {
        let states: Vec<Option<String>> = ids
            .iter()
            .zip(&sources)
            .map(|(id, (g, _, _))| {
                [lab.mig_url(*g), lab.mig_url(2), helper_url(&lab, 2)]
                    .iter()
                    .filter_map(|u| op_at(u, id))
                    .find(|op| op["state"] != "running")
                    .map(|op| op["state"].as_str().unwrap_or_default().to_string())
            })
            .collect();
        let helpers = lab.apps(2).iter().any(|(n, _)| n.starts_with("mighelper-"));
        if states.iter().all(Option::is_some) && !helpers {
            break states.into_iter().flatten().collect::<Vec<_>>();
        }
        if std::time::Instant::now() > deadline {
            return Err(Violation::new(format!(
                "no final state within {BOUND:?}: {states:?}, g2 {:?}",
                lab.apps(2)
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let g2 = lab.apps(2);
    let twins: Vec<&(String, String)> = g2.iter().filter(|(n, _)| n == "twin").collect();
    let moved: Vec<usize> = (0..2).filter(|&i| states[i] == "succeeded").collect();
    if moved.len() > 1 || twins.len() > 1 {
        return Err(Violation::new(format!(
            "both took the name: {states:?}, g2 {g2:?}"
        )));
    }
    for (i, (g, app, sum)) in sources.iter().enumerate() {
        let here = lab.apps(*g);
        if moved.contains(&i) {
            if !here.is_empty() || twins.first().map(|t| t.1.as_str()) != Some("running") {
                return Err(Violation::new(format!(
                    "{app} moved, but g{g} holds {here:?} and g2 {g2:?}"
                )));
            }
            if lab.checksum(2, "twin") != *sum {
                return Err(Violation::lost(format!("twin does not hold {app}'s bytes")));
            }
        } else if names(&here) != [(*app, "running")] || lab.checksum(*g, app) != *sum {
            return Err(Violation::lost(format!(
                "{app}'s operation {} but g{g} holds {here:?}",
                states[i]
            )));
        }
    }
    if moved.is_empty() && !twins.is_empty() {
        return Err(Violation::new(format!(
            "neither moved, yet g2 holds {g2:?}"
        )));
    }
    Ok(Outcome {
        state: states.join(" + "),
        took: started.elapsed(),
    })
}

fn adversarial_trials() -> Vec<Trial> {
    let mut trials = vec![Trial {
        name: "migrate  two operations race for one target name".into(),
        run: Box::new(race_trial),
    }];
    for kind in ["migrate", "snapshot"] {
        for (point, write) in [
            ("hold-export", true),
            ("hold-verify", true),
            ("hold-verify", false),
        ] {
            let what = if write { "and writes" } else { "" };
            trials.push(Trial {
                name: format!("{kind:<8} {point:<14} operator app start {what}"),
                run: Box::new(move || operator_start_trial(kind, point, write)),
            });
        }
        trials.push(Trial {
            name: format!("{kind:<8} replayed handoffs, one for the ended operation"),
            run: Box::new(move || replay_trial(kind)),
        });
    }
    trials
}

/// One trial of the sweep: a name, and what it does.
struct Trial {
    name: String,
    run: Box<dyn Fn() -> Result<Outcome, Violation>>,
}

/// The crash points: every point × victim for a migrate and a snapshot.
fn crash_trials() -> Vec<Trial> {
    let mut trials = Vec::new();
    for kind in ["migrate", "snapshot"] {
        for (point, victim) in [
            ("hold-export", Victim::Helper),
            ("hold-copy", Victim::Helper),
            ("hold-verify", Victim::Helper),
            ("hold-verify", Victim::Sshd(1)),
            ("hold-clean-up", Victim::Helper),
            ("hold-clean-up", Victim::FinalMig),
            ("hold-clean-up", Victim::Sshd(1)),
            // The grids' own processes: the daemons and the target's sshd.
            ("hold-export", Victim::Daemon(1)),
            ("hold-export", Victim::Daemon(2)),
            ("hold-export", Victim::Sshd(2)),
            ("hold-copy", Victim::Daemon(2)),
            ("hold-verify", Victim::Daemon(1)),
            ("hold-verify", Victim::Daemon(2)),
            ("hold-verify", Victim::Sshd(2)),
            ("hold-clean-up", Victim::Daemon(1)),
            ("hold-clean-up", Victim::Daemon(2)),
            ("hold-clean-up", Victim::Sshd(2)),
        ] {
            trials.push(Trial {
                name: format!("{kind:<8} {point:<14} kill {}", victim.name()),
                run: Box::new(move || crash_trial(kind, point, victim)),
            });
        }
    }
    trials
}

/// Runs the trials whose name contains `FAULT_SWEEP_ONLY` (all when it is unset; `|` between
/// alternatives; spaces count as one), one line each,
/// then the summary table; panics if any broke the invariant.
fn sweep(trials: Vec<Trial>) {
    IN_SWEEP.set(true);
    let only = std::env::var("FAULT_SWEEP_ONLY").unwrap_or_default();
    let (mut run, mut held, mut lost) = (0, 0, 0);
    let mut longest = Duration::ZERO;
    let mut ends = std::collections::BTreeMap::<String, u32>::new();
    let mut broken = Vec::new();
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    for t in trials
        .iter()
        .filter(|t| only.split('|').any(|o| words(&t.name).contains(&words(o))))
    {
        run += 1;
        let r = (t.run)();
        // Every process the trial started ended, every namespace it made removed.
        let left = left_behind();
        let r = match r {
            Ok(_) if !left.is_empty() => Err(Violation::new(format!("left behind: {left:?}"))),
            r => r,
        };
        match r {
            Ok(o) => {
                held += 1;
                longest = longest.max(o.took);
                *ends.entry(o.state.clone()).or_default() += 1;
                println!(
                    "trial {:<44} invariant held: {} in {:.1?}",
                    t.name, o.state, o.took
                );
            }
            Err(v) => {
                lost += u32::from(v.data_lost);
                println!("trial {:<44} VIOLATED: {}", t.name, v.what);
                broken.push(format!("{}: {}", t.name, v.what));
            }
        }
    }
    let ends: Vec<String> = ends.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!("\n| trials run | invariant held | data lost | longest time to a final state | operations ended |");
    println!("|---|---|---|---|---|");
    println!(
        "| {run} | {held} | {lost} | {longest:.1?} | {} |",
        ends.join(", ")
    );
    assert!(broken.is_empty(), "{broken:#?}");
}

/// Found by the sweep (issue 14): an operator starts the source by hand after the copy and before
/// the cut-over, and nobody writes to it yet. Before, the verify compared the checksums (equal),
/// MigHelper started the target too, and two copies ran until the target MIG destroyed the
/// source, with whatever it had taken meanwhile. Now the verify sees the source running and the
/// operation rolls back.
#[test]
fn a_source_started_by_hand_before_the_cut_over_rolls_the_operation_back() {
    let o = operator_start_trial("migrate", "hold-verify", false)
        .unwrap_or_else(|v| panic!("{}", v.what));
    assert_eq!(o.state, "rolled_back");
}

/// Found by the sweep (issue 14): the network drops the cut-over handoff for 35 s. The target
/// MIG's server answered 408 (no request came), which MigHelper took for a refusal and held the
/// operation for an operator; now a 408 is tried again, and the handoff goes through once the
/// link heals.
#[test]
fn a_handoff_lost_on_the_network_goes_through_once_the_link_heals() {
    let o =
        net_trial("migrate", NetFault::DropHandoffRequest).unwrap_or_else(|v| panic!("{}", v.what));
    assert_eq!(o.state, "succeeded");
}

/// A grid daemon killed in the middle of the copy (the target's, which runs the import) and
/// started again as `lab up` does: the operation ends, one copy runs with every byte.
#[test]
fn a_target_grid_daemon_killed_mid_copy_costs_nothing() {
    crash_trial("migrate", "hold-copy", Victim::Daemon(2)).unwrap_or_else(|v| panic!("{}", v.what));
}

/// A pre-copy cut by the target grid's daemon dying mid-stream (the source's export held, then
/// the daemon killed) costs only another try: the source runs all along, the pre-copy starts over
/// once the daemon is back, and the operation ends with every byte on the target.
#[test]
fn a_pre_copy_cut_by_the_target_daemon_dying_is_tried_again() {
    let lab = trial_lab(false);
    lab.set_precopy(true);
    let (_, sum) = small_shop(&lab);
    hold_exports(&lab, 1);
    let id = start_op(&lab.mig_url(1), "migrate", "g2", "shop2");
    // The first export from g1 is the pre-copy's: the source still runs.
    let export = stopped_export(&lab, 1, "shop");
    assert!(
        lab.apps(1)
            .iter()
            .any(|(n, s)| n == "shop" && s == "running"),
        "the source runs during the pre-copy"
    );
    signal(daemon_pid(&lab, 2), "KILL");
    signal(export, "CONT");
    lab.run_lab_up("g2's daemon back");
    let outcome = check_invariant(&lab, &id, "migrate", &sum, std::time::Instant::now())
        .unwrap_or_else(|v| panic!("{}", v.what));
    assert_eq!(outcome.state, "succeeded", "{outcome:?}");
    let op = op_at(&lab.mig_url(2), &id).expect("the target's MIG has the operation");
    let detail = step(&op, PRECOPYING)["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("pre-copied while the source ran, after ")
            && detail.contains("interrupted attempt"),
        "{detail}"
    );
}

/// The target started, but the answer to its start was lost with its grid's sshd (gridctl's hook
/// holds the answer; the test kills that session and the grid's sshd). MigHelper's start step
/// fails, and its roll-back cannot destroy the target: it must not start the source again (that
/// made two running copies), but hold for an operator with the source stopped and kept.
#[test]
fn a_target_start_whose_answer_is_lost_with_its_grid_is_held_not_doubled() {
    let lab = trial_lab(false);
    let (_, sum) = small_shop(&lab);
    let hook = lab.state(2).join("faults/hold-start-answer");
    std::fs::write(&hook, "").unwrap();
    let id = start_op(&lab.mig_url(1), "migrate", "g2", "shop2");
    let state = lab.state(2).display().to_string();
    let starting = find_process("the start of shop2 on g2", |p| {
        p.argv.first().is_some_and(|c| c.ends_with("gridctl"))
            && p.argv.contains(&state)
            && p.env
                .iter()
                .any(|e| e == "SSH_ORIGINAL_COMMAND=app start shop2")
    });
    wait_for("shop2 running on g2", 30, || {
        lab.apps(2)
            .iter()
            .any(|(n, st)| n == "shop2" && st == "running")
            .then_some(())
    });
    // The grid stops answering, and the held answer goes with its session.
    signal(sshd_pid(&lab, 2), "KILL");
    let all = processes();
    let mut session = all.iter().find(|p| p.pid == starting);
    while let Some(p) = session.filter(|p| !p.argv.first().is_some_and(|a| a.starts_with("sshd"))) {
        session = all.iter().find(|q| q.pid == p.ppid && q.pid > 1);
    }
    kill_tree(session.expect("the sshd session above the held start").pid);
    std::fs::remove_file(&hook).unwrap();
    // MigHelper tries the start, then the target's destroy, for about a minute each; then it
    // holds, or (the hole this test closes) starts the source again.
    wait_for("MigHelper to hold, or the source to run again", 300, || {
        let held = op_at(&helper_url(&lab, 2), &id).is_some_and(|op| op["state"] != "running");
        let source_runs = lab
            .apps(1)
            .iter()
            .any(|(n, st)| n == "shop" && st == "running");
        (held || source_runs).then_some(())
    });
    lab.run_lab_up("g2's sshd back");
    let outcome = check_invariant(&lab, &id, "migrate", &sum, std::time::Instant::now())
        .unwrap_or_else(|v| panic!("{}", v.what));
    assert_eq!(outcome.state, "held", "{outcome:?}");
    let op = op_at(&helper_url(&lab, 2), &id).unwrap();
    assert!(
        op["error"]
            .as_str()
            .is_some_and(|e| e.contains("may be running")),
        "{op:#}"
    );
    assert_eq!(
        lab.apps(1),
        [("shop".to_string(), "stopped".to_string())],
        "the source is stopped and kept"
    );
}

/// An operator starts the source after the verify and before the target starts (as one could
/// while a MigHelper was down between the two): the target is not started, the operation rolls
/// back, and the source runs with every byte.
#[test]
fn a_source_started_again_after_the_verify_keeps_the_target_from_starting() {
    let lab = trial_lab(false);
    let faults = fault_points(&lab);
    let (_, sum) = small_shop(&lab);
    on(&faults, "hold-start-target");
    let id = start_op(&lab.mig_url(1), "migrate", "g2", "shop2");
    wait_step(&lab, &helper_url(&lab, 2), &id, MIGRATING, "done", 60);
    let out = lab.app(1, &["start", "shop"]);
    assert!(out.status.success(), "app start shop: {out:?}");
    off(&faults, "hold-start-target");
    let outcome = check_invariant(&lab, &id, "migrate", &sum, std::time::Instant::now())
        .unwrap_or_else(|v| panic!("{}", v.what));
    assert_eq!(outcome.state, "rolled_back", "{outcome:?}");
}

/// The crash-point sweep (`scripts/fault-sweep`): every trial of [`crash_trial`], one line each,
/// then a summary. Ignored by `cargo test`; the same points are covered one by one above.
#[test]
#[ignore = "the sweep takes minutes: scripts/fault-sweep runs it"]
fn fault_sweep() {
    let mut trials = crash_trials();
    trials.extend(net_trials());
    trials.extend(adversarial_trials());
    sweep(trials);
}

/// `GET path` on `addr` over a fresh connection, read to the end: how long it took, if it answered
/// 200. Raw HTTP/1.0, so that the figure is the server's and not a client's start-up.
fn timed_get(addr: &str, path: &str) -> Option<Duration> {
    use std::io::{Read, Write};
    let t = std::time::Instant::now();
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let host = addr.split(':').next()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    buf.starts_with(b"HTTP/1.1 200")
        .then(|| t.elapsed())
        .or_else(|| buf.starts_with(b"HTTP/1.0 200").then(|| t.elapsed()))
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get((v.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

/// The open-file limit of this process (the soft one), from /proc.
fn open_file_limit() -> usize {
    let t = std::fs::read_to_string("/proc/self/limits").unwrap();
    t.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

/// The load trial (`scripts/fault-sweep --load`, which raises the open-file limit first): a
/// migrate while as many pass-through connections as the limit allows are open on the source's
/// MIG (each costs it two descriptors) and a bulk transfer runs through its proxy. The GUI and the
/// API keep answering (p99 under 100 ms, measured until the source stops), the operation
/// succeeds, and the connections, all to the source, end when it stops.
#[test]
#[ignore = "needs a raised open-file limit: scripts/fault-sweep --load runs it"]
fn load_trial() {
    let lab = Lab::up(2, &AtomicU8::new(230));
    // One client address holds every connection here: lift the per-client cap for this test.
    let anchor = r#""--set", "app_name=${app}""#;
    let p = lab.state(1).join("templates/demoapp.toml");
    let t = std::fs::read_to_string(&p).unwrap();
    let with = format!(
        r#"{anchor}, "--set", "max_connections_per_client=1000000", "--set", "max_connections=1000000""#
    );
    std::fs::write(&p, t.replacen(anchor, &with, 1)).unwrap();
    let (data, sum) = small_shop(&lab);

    let n = ((open_file_limit().saturating_sub(300)) / 2).min(10_000);
    let pass = format!("{}:8000", lab.ip(1, 10));
    let sa: std::net::SocketAddr = pass.parse().unwrap();
    let t = std::time::Instant::now();
    let conns: Vec<std::net::TcpStream> = (0..n)
        .map(|i| {
            std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("pass-through connection {i} of {n}: {e}"))
        })
        .collect();
    println!(
        "load: {n} pass-through connections open in {:.1?}",
        t.elapsed()
    );
    // They are spliced, not only accepted: the last one answers a request.
    {
        use std::io::{Read, Write};
        let mut c = conns.last().unwrap();
        c.write_all(b"GET /kv/greeting HTTP/1.0\r\n\r\n").unwrap();
        let mut b = Vec::new();
        c.read_to_end(&mut b).unwrap();
        assert!(b.ends_with(b"hello"), "{}", String::from_utf8_lossy(&b));
    }
    let conns = &conns[..n - 1];

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A bulk transfer through the proxy: 15 MiB up and down (the kvstore's largest value), over
    // and over until the source stops; the first round before the operation, to know it works.
    let round = |url: &str, v: &[u8]| -> Option<usize> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), v).unwrap();
        let body = format!("@{}", f.path().display());
        let kv = format!("{url}/kv/bulk");
        curl(&["--max-time", "60", "-X", "PUT", "--data-binary", &body, &kv])?;
        let down = curl(&["--max-time", "60", &kv])?;
        (down == v).then_some(2 * v.len())
    };
    let v = random_bytes(15 << 20, 99);
    let first = round(&lab.data_url(1), &v).expect("a bulk round through the proxy");
    let bulk = {
        let (stop, url, v) = (stop.clone(), lab.data_url(1), v.clone());
        std::thread::spawn(move || {
            let mut moved = first;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match round(&url, &v) {
                    Some(n) => moved += n,
                    None => break, // the source stopped
                }
            }
            moved
        })
    };
    let mig = format!("{}:8080", lab.ip(1, 10));
    let id = start_migrate(&lab.mig_url(1), "g2", "shop2");
    // GUI and API latency on the source's MIG, until it stops answering (the source stopped).
    let (mut gui, mut api) = (Vec::new(), Vec::new());
    while let (Some(g), Some(a)) = (
        timed_get(&mig, "/"),
        timed_get(&mig, &format!("/api/v1/ops/{id}")),
    ) {
        gui.push(g);
        api.push(a);
        std::thread::sleep(Duration::from_millis(20));
    }
    let op = wait_end(&lab, &lab.mig_url(2), &id, 240);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let moved = bulk.join().unwrap();
    // Every pass-through connection went to the source, so every one has ended.
    let ended = conns
        .iter()
        .filter(|c| {
            use std::io::Read;
            c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            match (&**c).read(&mut [0u8; 1]) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
        .count();
    let (gp, ap) = (p99(gui.clone()), p99(api.clone()));
    println!(
        "load: {n} connections, {} MiB through the proxy meanwhile; GUI p99 {gp:.1?}, API p99 {ap:.1?} \
         over {} samples each; operation {}; {ended} of {} connections ended with the source",
        moved >> 20,
        gui.len(),
        op["state"],
        conns.len()
    );
    assert!(gui.len() >= 10, "too few samples: {}", gui.len());
    assert!(gp < Duration::from_millis(100), "GUI p99 {gp:?}");
    assert!(ap < Duration::from_millis(100), "API p99 {ap:?}");
    // The bulk writes changed the source after `sum`: the data, read back, is the proof.
    let _ = sum;
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(names(&lab.apps(1)), [] as [(&str, &str); 0]);
    assert_eq!(names(&lab.apps(2)), [("shop2", "running")]);
    assert_data(&lab.data_url(2), &data);
    assert!(
        get(&lab.data_url(2), "bulk").is_some_and(|b| b == v),
        "the bulk value moved"
    );
    assert_eq!(
        ended,
        conns.len(),
        "connections to the stopped source still open"
    );
}
