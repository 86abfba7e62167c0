//! Migrate and snapshot end to end over a real lab: three grids behind real sshd, the demo
//! application's data written before and read after, and the end state of every grid checked.

mod common;

use std::sync::atomic::AtomicU8;
use std::time::Duration;

use common::lab::{get, names, put, random_bytes, wait_for, Lab};
use common::mig;

static BASES: AtomicU8 = AtomicU8::new(200);

fn scrape(url: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "5", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET {url}");
    String::from_utf8(out.stdout).unwrap()
}

/// The value of one sample in Prometheus text, by its exact name and labels.
fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Runs `mig migrate|snapshot` and returns (exit ok, stdout).
fn run_cli(kind: &str, url: &str, to: &str, name: &str) -> (bool, String) {
    let out = mig()
        .args([kind, "--url", url, "--to", to, "--name", name, "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{stdout}\n{stderr}"))
}

/// The operation id the CLI printed.
fn op_id(cli_out: &str) -> String {
    cli_out
        .split_whitespace()
        .nth(1)
        .expect("the CLI names the operation")
        .to_string()
}

#[test]
fn migrate_then_snapshot_keep_every_byte_and_leave_nothing_behind() {
    let lab = Lab::up(3, &BASES);
    lab.provision_demo(1, "shop");
    let value = random_bytes(3 << 20, 7);
    put(&lab.data_url(1), "blob", &value);
    put(&lab.data_url(1), "greeting", b"hello");

    // Logins with MIG's key on grid n so far (sshd logs each with the key's fingerprint).
    let mig_key = testkit::fingerprint(&lab.path().join("mig/private.key.pub"));
    let mig_logins = |n: u8| {
        let log = std::fs::read_to_string(lab.path().join(format!("g{n}/sshd.log"))).unwrap();
        log.lines()
            .filter(|l| l.contains("Accepted publickey") && l.contains(&mig_key))
            .count()
    };

    // Migrate g1 -> g2.
    let before = [mig_logins(1), mig_logins(2)];
    let (ok, out) = run_cli("migrate", &lab.mig_url(1), "g2", "shop2");
    // The test's own `ssh g1 app list` below logs in with the same key: count before those.
    let after = [mig_logins(1), mig_logins(2)];
    assert!(ok, "migrate failed:\n{out}");
    assert!(out.contains("Succeeded"), "{out}");
    for step in [
        "provisioning MigHelper on the target grid",
        "destroying MigHelper",
    ] {
        assert!(
            out.contains(step),
            "{step} missing from the summary:\n{out}"
        );
    }
    assert_eq!(
        names(&lab.apps(1)),
        [] as [(&str, &str); 0],
        "the source is destroyed"
    );
    assert_eq!(
        names(&lab.apps(2)),
        [("shop2", "running")],
        "only the target, no MigHelper"
    );
    assert_eq!(get(&lab.data_url(2), "blob").as_deref(), Some(&value[..]));
    assert_eq!(
        get(&lab.data_url(2), "greeting").as_deref(),
        Some(&b"hello"[..])
    );
    // The target MIG answers for the whole operation.
    let status = mig()
        .args(["status", "--url", &lab.mig_url(2), &op_id(&out)])
        .output()
        .unwrap();
    assert!(status.status.success());
    let op: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(op["state"], "succeeded");
    let monitors: Vec<&str> = op["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        monitors,
        [
            "Source Application Monitor",
            "MigHelper Application Monitor",
            "Target Application Monitor"
        ]
    );
    for m in op["monitors"].as_array().unwrap() {
        for s in m["steps"].as_array().unwrap() {
            assert_eq!(s["state"], "done", "{s}");
        }
    }
    let copy = &op["monitors"][1]["steps"][1];
    assert!(
        copy["bytes_total"].as_u64().unwrap() >= value.len() as u64,
        "{copy}"
    );
    assert_eq!(copy["bytes_done"], copy["bytes_total"]);

    // The target MIG's metrics: exactly this one operation ended there, its three clean-up steps
    // timed, and the data read through its pass-through counted.
    let metrics = scrape(&format!("http://{}:9480/metrics", lab.ip(2, 10)));
    assert_eq!(
        metric(
            &metrics,
            r#"mig_operations_ended_total{kind="migrate",state="succeeded"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, r#"mig_operations_started_total{kind="migrate"}"#),
        None,
        "the target started nothing"
    );
    for step in [
        "destroying the source application",
        "stopping MigHelper",
        "destroying MigHelper",
    ] {
        let key = format!(r#"mig_step_duration_seconds_count{{step="{step}",state="done"}}"#);
        assert_eq!(metric(&metrics, &key), Some(1.0), "{key}\n{metrics}");
    }
    let read = metric(
        &metrics,
        r#"mig_proxy_bytes_total{port="8000",direction="out"}"#,
    )
    .unwrap_or(0.0);
    assert!(
        read >= value.len() as f64,
        "pass-through bytes to clients: {read}\n{metrics}"
    );
    assert!(metric(&metrics, "mig_process_resident_memory_bytes").unwrap() > 0.0);

    // The target MIG serves the whole timeline: events from all three instances, the two handoffs
    // in order, under one trace id.
    let trace: serde_json::Value = serde_json::from_str(&scrape(&format!(
        "{}/api/v1/ops/{}/trace",
        lab.mig_url(2),
        op_id(&out)
    )))
    .unwrap();
    assert_eq!(trace["trace_id"].as_str().unwrap().len(), 32);
    let events = trace["events"].as_array().unwrap();
    let instances: std::collections::BTreeSet<&str> = events
        .iter()
        .map(|e| e["instance"].as_str().unwrap())
        .collect();
    assert_eq!(
        instances.into_iter().collect::<Vec<_>>(),
        ["MigHelper (g2)", "source MIG (g1)", "target MIG (g2)"],
        "{trace}"
    );
    let handoffs: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "handoff")
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    assert_eq!(handoffs.len(), 4, "{handoffs:?}");
    assert!(
        handoffs[0].starts_with("handoff to http://") && handoffs[0].ends_with("(seq 1)"),
        "{handoffs:?}"
    );
    assert_eq!(handoffs[1], "handoff accepted (seq 1)");
    assert!(
        handoffs[2].ends_with("(seq 2)") && handoffs[3] == "handoff accepted (seq 2)",
        "{handoffs:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "command"
                && e["what"].as_str().unwrap().starts_with("app migrate ")),
        "the copy command is in the timeline"
    );
    let times: Vec<&str> = events.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "events in time order: {times:?}"
    );

    // One SSH session per grid and instance: the source MIG, MigHelper and the target MIG each
    // logged in to each grid at most once with MIG's key for all their commands, and the
    // timeline still gives each command its own time.
    let commands = events.iter().filter(|e| e["kind"] == "command").count();
    assert!(commands >= 10, "{trace}");
    assert!(
        events
            .iter()
            .filter(|e| e["kind"] == "command")
            .all(|e| e["millis"].is_u64()),
        "{trace}"
    );
    for (n, (a, b)) in after.iter().zip(before).enumerate() {
        let logins = a - b;
        assert!(
            (1..=3).contains(&logins),
            "g{}: {logins} logins for {commands} commands",
            n + 1
        );
    }

    // Snapshot g2 -> g3: a stopped copy there, the source running on.
    put(&lab.data_url(2), "after-move", b"written on g2");
    let (ok, out) = run_cli("snapshot", &lab.mig_url(2), "g3", "shop3");
    assert!(ok, "snapshot failed:\n{out}");
    assert!(out.contains("Re-Start Source Application Monitor"), "{out}");
    assert_eq!(names(&lab.apps(2)), [("shop2", "running")]);
    assert_eq!(names(&lab.apps(3)), [("shop3", "stopped")]);
    assert_eq!(lab.checksum(2, "shop2"), lab.checksum(3, "shop3"));
    assert_eq!(
        get(&lab.data_url(2), "after-move").as_deref(),
        Some(&b"written on g2"[..])
    );
}

#[test]
fn a_target_that_cannot_start_rolls_back_to_the_running_source() {
    let lab = Lab::up(3, &BASES);
    // g2's app_config gives the copy a web address no interface has: it cannot start there.
    let g2_web = format!("web_ip={}", lab.ip(2, 11));
    lab.edit_grid_info(&g2_web, "web_ip=192.0.2.1");
    lab.provision_demo(1, "shop");
    put(&lab.data_url(1), "k", b"precious");
    let before = lab.checksum(1, "shop");

    let (ok, out) = run_cli("migrate", &lab.mig_url(1), "g2", "shop2");
    assert!(
        !ok,
        "a migrate whose target cannot start must not succeed:\n{out}"
    );
    assert!(out.contains("RolledBack"), "{out}");
    assert!(out.contains("starting the target application"), "{out}");

    wait_for("no MigHelper left", 30, || {
        lab.apps(2).is_empty().then_some(())
    });
    assert_eq!(names(&lab.apps(1)), [("shop", "running")]);
    assert_eq!(
        get(&lab.data_url(1), "k").as_deref(),
        Some(&b"precious"[..])
    );
    assert_eq!(
        lab.checksum(1, "shop"),
        before,
        "the source's data is untouched"
    );

    // The source MIG, running again, answers for the whole operation.
    let status = mig()
        .args(["status", "--url", &lab.mig_url(1), &op_id(&out)])
        .output()
        .unwrap();
    let op: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(op["state"], "rolled_back");
    let helper = &op["monitors"][1]["steps"];
    assert_eq!(
        helper[0]["state"], "rolled_back",
        "stopping the source was undone"
    );
    assert_eq!(helper[1]["state"], "rolled_back", "the copy was destroyed");
    assert_eq!(helper[2]["state"], "failed");
    assert!(
        helper[2]["detail"]
            .as_str()
            .unwrap()
            .contains("did not start"),
        "{}",
        helper[2]
    );
    let last = &op["monitors"][2]["steps"];
    assert_eq!(
        last[0]["state"], "rolled_back",
        "the source was not destroyed"
    );
    assert_eq!(last[1]["state"], "done");
    assert_eq!(last[2]["state"], "done");
}

#[test]
fn a_corrupted_copy_is_caught_and_rolled_back() {
    let lab = Lab::up(2, &BASES);
    lab.provision_demo(1, "shop");
    put(&lab.data_url(1), "k", &random_bytes(1 << 20, 3));
    let before = lab.checksum(1, "shop");
    // gridctl's test hook: the source grid flips one bit of its next export after 1000 bytes.
    std::fs::write(lab.state(1).join("faults/corrupt-export-after"), "1000").unwrap();

    let (ok, out) = run_cli("migrate", &lab.mig_url(1), "g2", "shop2");
    assert!(!ok, "{out}");
    assert!(out.contains("RolledBack"), "{out}");
    wait_for("no MigHelper left", 30, || {
        lab.apps(2).is_empty().then_some(())
    });
    assert_eq!(names(&lab.apps(1)), [("shop", "running")]);
    assert_eq!(lab.checksum(1, "shop"), before);
}

#[test]
fn one_operation_at_a_time_and_bad_requests_change_nothing() {
    let lab = Lab::up(2, &BASES);
    lab.provision_demo(1, "shop");
    let url = lab.mig_url(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let token: serde_json::Value = http.get(format!("{url}/api/v1/csrf")).send().await.unwrap().json().await.unwrap();
        let token = token["csrf"].as_str().unwrap().to_string();
        let post = |body: serde_json::Value, token: &str| {
            http.post(format!("{url}/api/v1/ops"))
                .header("x-mig-csrf", token)
                .json(&body)
                .send()
        };
        // Bad requests: nothing starts.
        let r = post(serde_json::json!({"kind": "migrate", "target_app": "x; rm -rf /", "target_grid": "g2"}), &token).await.unwrap();
        assert_eq!(r.status(), 400);
        let r = post(serde_json::json!({"kind": "migrate", "target_app": "ok", "target_grid": "g1"}), &token).await.unwrap();
        assert_eq!(r.status(), 400, "the own grid is not a target");
        let r = post(serde_json::json!({"kind": "migrate", "target_app": "ok", "target_grid": "g9"}), &token).await.unwrap();
        assert_eq!(r.status(), 400);
        let r = post(serde_json::json!({"kind": "migrate", "target_app": "ok", "target_grid": "g2"}), "forged").await.unwrap();
        assert_eq!(r.status(), 403, "no CSRF token, no operation");
        assert_eq!(names(&lab.apps(2)), [] as [(&str, &str); 0]);

        // One runs; a second one is refused, naming the first.
        let r = post(serde_json::json!({"kind": "snapshot", "target_app": "copy1", "target_grid": "g2"}), &token).await.unwrap();
        assert_eq!(r.status(), 202);
        let first: serde_json::Value = r.json().await.unwrap();
        let id = first["id"].as_str().unwrap().to_string();
        assert_eq!(first["monitor_url"], format!("/ops/{id}"));
        let r = post(serde_json::json!({"kind": "snapshot", "target_app": "copy2", "target_grid": "g2"}), &token).await.unwrap();
        assert_eq!(r.status(), 409);
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains(&id), "{e}");
    });
    // Let the first one finish so the lab goes down clean.
    wait_for("the snapshot to finish", 60, || {
        (lab.apps(2)
            .iter()
            .any(|(n, s)| n == "copy1" && s == "stopped")
            && lab.apps(2).len() == 1)
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(200));
}
