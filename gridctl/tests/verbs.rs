//! Every verb of the dialect through real sshd, the refusals, and the life of an application's
//! processes (readiness, a component that exits, stop, templates as data files).

mod common;

use common::*;

#[test]
fn every_verb_through_ssh() {
    let lab = Lab::up(1, 110);
    let ip = lab.ip(1, 10);
    let addr = format!("{ip}:8000");
    let out = lab.ok(
        1,
        &format!("app provision kvstore shop in_ip={ip} data_size=16M"),
    );
    assert!(out.contains("provisioned shop"), "{out}");
    assert_eq!(lab.ok(1, "app list --batch"), "shop\trunning\tkvstore\n");
    assert!(lab.ok(1, "app list").contains("shop"));
    let info = lab.ok(1, "app info shop --batch");
    assert_eq!(info_field(&info, "state").unwrap(), "running");
    assert_eq!(info_field(&info, "template").unwrap(), "kvstore");
    assert_eq!(info_field(&info, "prop.in_ip").unwrap(), ip);
    assert_eq!(info_field(&info, "prop.port").unwrap(), "8000");
    assert_eq!(
        info_field(&info, "volume.data").unwrap(),
        (16 << 20).to_string()
    );
    assert_eq!(info_field(&info, "volume.data.kind").unwrap(), "file");
    assert!(lab.ok(1, "app info shop").contains("state:    running"));
    assert_eq!(http(&addr, "PUT", "/kv/greeting", b"hello grid").0, 204);
    // Refused while running: config and destroy, with the reason and the app named.
    let r = lab.ssh(1, "app config shop port=8001");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("cannot configure shop: it is running"),
        "{r:?}"
    );
    let r = lab.ssh(1, "app destroy shop");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("cannot destroy shop: it is running; stop it first"),
        "{r:?}"
    );
    let r = lab.ssh(1, "app provision kvstore shop in_ip=127.0.0.1");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("already exists"), "{r:?}");
    // Stop, reconfigure, start: the data is still there and the new port is used.
    assert!(lab.ok(1, "app stop shop").contains("stopped shop"));
    assert_eq!(lab.state_of(1, "shop"), "stopped");
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still listening after stop"
    );
    lab.ok(1, "app config shop port=8001");
    let r = lab.ssh(1, "app config shop nosuch=1");
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("has no property nosuch"), "{r:?}");
    let sum = lab.ok(1, "app checksum shop");
    let fields: Vec<&str> = sum.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 3, "{sum}");
    assert_eq!(fields[0], "data");
    assert_eq!(fields[1], (16 << 20).to_string());
    assert!(
        fields[2].starts_with("blake3:") && fields[2].len() == 7 + 64,
        "{sum}"
    );
    lab.ok(1, "app start shop");
    let (code, body) = http(&format!("{ip}:8001"), "GET", "/kv/greeting", b"");
    assert_eq!((code, body.as_slice()), (200, &b"hello grid"[..]));
    lab.ok(1, "app stop shop");
    assert!(lab.ok(1, "app destroy shop").contains("destroyed shop"));
    assert_eq!(lab.ok(1, "app list --batch"), "");
    assert!(!lab.app_dir(1, "shop").exists());
    let r = lab.ssh(1, "app info shop");
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no application named shop"), "{r:?}");
}

#[test]
fn anything_outside_the_dialect_is_refused_with_exit_2() {
    let lab = Lab::up(1, 112);
    for line in [
        "ls -la",
        "app stop 'x; rm -rf /'",
        "app info $(id)",
        "app info `id`",
        "app list; id",
        "app reboot now",
        "app provision kvstore 'a b'",
        "app migrate 127.0.113.1:2222 a .name=b",
        "peer export anything",
        "bash -c id",
    ] {
        let r = lab.ssh(1, line);
        assert_eq!(r.code, 2, "`{line}` was not refused: {r:?}");
        assert!(r.stderr.contains("refused"), "`{line}`: {r:?}");
        assert!(!r.stdout.contains("uid="), "`{line}` ran a command: {r:?}");
    }
    // No command at all is an interactive login: refused too.
    let r = std::process::Command::new("ssh")
        .arg("-F")
        .arg(lab.dir().join("ssh_config"))
        .arg("g1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    // A hostile property value is one argument, stored verbatim, never run.
    let ip = lab.ip(1, 10);
    lab.ok(1, &format!("app provision kvstore kv in_ip={ip}"));
    lab.ok(1, "app stop kv");
    lab.ok(1, "app config kv data_size='$(id); rm -rf / `reboot`'");
    let info = lab.ok(1, "app info kv --batch");
    assert_eq!(
        info_field(&info, "prop.data_size").unwrap(),
        "$(id); rm -rf / `reboot`"
    );
}

#[test]
fn components_readiness_failure_and_stop() {
    let lab = Lab::up(1, 114);
    let ip = lab.ip(1, 10);
    // A component that exits after starting makes the application failed.
    lab.write_template(
        1,
        "flaky",
        r#"
[properties]
delay = "1"
[[components]]
name = "worker"
command = ["/bin/sh", "-c", "sleep ${delay}; exit 3"]
"#,
    );
    lab.ok(1, "app provision flaky f");
    lab.wait_state(1, "f", "failed", 10);
    let info = lab.ok(1, "app info f --batch");
    assert!(
        info_field(&info, "error")
            .unwrap()
            .contains("component worker exited"),
        "{info}"
    );
    // A failed application may be destroyed.
    lab.ok(1, "app destroy f");
    // Not ready in time: failed, and its processes are killed.
    lab.write_template(
        1,
        "deaf",
        &format!(
            r#"
[[components]]
name = "mute"
command = ["/bin/sleep", "300"]
ready = "{ip}:9"
ready_timeout_secs = 1
"#
        ),
    );
    let r = lab.ssh(1, "app provision deaf d");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("did not accept connections"), "{r:?}");
    assert_eq!(lab.state_of(1, "d"), "failed");
    let rec: gridctl::model::AppRecord = serde_json::from_str(
        &std::fs::read_to_string(lab.app_dir(1, "d").join("app.json")).unwrap(),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !gridctl::util::pid_alive(rec.pids[0]),
        "sleep still running"
    );
    // SIGTERM ignored: stop escalates to SIGKILL after stop_timeout_secs.
    lab.write_template(
        1,
        "stubborn",
        r#"
[[components]]
name = "s"
command = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
stop_timeout_secs = 1
"#,
    );
    lab.ok(1, "app provision stubborn s");
    let t = std::time::Instant::now();
    lab.ok(1, "app stop s");
    assert!(t.elapsed() < std::time::Duration::from_secs(8));
    assert_eq!(lab.state_of(1, "s"), "stopped");
    // A template error names the template and the field.
    lab.write_template(1, "broken", "[[volumes]]\nname = \"v\"\n");
    let r = lab.ssh(1, "app provision broken b");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("broken.toml") && r.stderr.contains("needs a size"),
        "{r:?}"
    );
    let r = lab.ssh(1, "app provision nosuch b");
    assert!(r.stderr.contains("no template named nosuch"), "{r:?}");
}

#[test]
fn a_dir_volume_is_initialised_from_its_source_and_the_env_is_substituted() {
    // A fake `mig` stands in for the real one: it records its arguments and environment, and
    // listens on in_ip:8080 like `mig helper` does.
    let lab = Lab::up(1, 116);
    let fake = lab.dir().join("fake-mig");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor a; do case $a in listen=*) ip=${a#listen=};; state_dir=*) sd=${a#state_dir=};; esac; done\n\
         printf '%s' \"$MIG_HELPER_ENV\" > \"$sd/env\"\necho \"$@\" > \"$sd/args\"\nenv > \"$sd/environ\"\n\
         exec python3 -m http.server 8080 --bind \"$ip\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = lab.lab_up(&["--mig-bin", &fake.display().to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    let ip = lab.ip(1, 20);
    let env = "k_op=abc 'quoted' $(id)";
    lab.ok(
        1,
        &shell_words::join([
            "app",
            "provision",
            "MigHelper",
            "mighelper-1",
            &format!("in_ip={ip}"),
            &format!("out_ip={}", lab.ip(1, 21)),
            "netmask=255.0.0.0",
            "gateway=127.0.0.1",
            &format!("env={env}"),
        ]),
    );
    let state = lab.app_dir(1, "mighelper-1").join("vols/state");
    assert_eq!(std::fs::read_to_string(state.join("env")).unwrap(), env);
    let environ = std::fs::read_to_string(state.join("environ")).unwrap();
    assert!(environ.contains("PATH=/"), "{environ}");
    assert!(
        !environ.contains("CARGO"),
        "the test runner's environment leaked into the application: {environ}"
    );
    let args = std::fs::read_to_string(state.join("args")).unwrap();
    assert!(
        args.contains(&format!("helper --set listen={ip} --set port_no=8080")),
        "{args}"
    );
    lab.ok(1, "app stop mighelper-1");
    lab.ok(1, "app destroy mighelper-1");
    // A template with a dir volume copied from the lab's MIG config volume.
    lab.write_template(
        1,
        "withconf",
        r#"
[[volumes]]
name = "config"
kind = "dir"
init_from = "${lab}/mig"
[[components]]
name = "idle"
command = ["/bin/sleep", "300"]
"#,
    );
    lab.ok(1, "app provision withconf w");
    let conf = lab.app_dir(1, "w").join("vols/config");
    assert_eq!(
        std::fs::read(conf.join("grid.info")).unwrap(),
        std::fs::read(lab.dir().join("mig/grid.info")).unwrap()
    );
    let sum = lab.ok(1, "app checksum w");
    assert!(sum.starts_with("config\t"), "{sum}");
    assert!(lab
        .ok(1, "app info w --batch")
        .contains("volume.config.kind\tdir\n"));
}

/// `restart = "on-failure"`: a running application whose component dies is started again by the
/// daemon, and one that keeps dying is left `failed` after five restarts, saying so.
#[test]
fn on_failure_components_are_restarted_a_bounded_number_of_times() {
    let lab = Lab::up(1, 118);
    let runs = |name: &str| {
        std::fs::read_to_string(lab.tmp.path().join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let pid_of = |app: &str| -> i32 {
        let rec: gridctl::model::AppRecord = serde_json::from_str(
            &std::fs::read_to_string(lab.app_dir(1, app).join("app.json")).unwrap(),
        )
        .unwrap();
        rec.pids[0]
    };
    // A template whose one component notes each run in NAME.runs, then runs `then`.
    let template = |name: &str, then: &str| {
        let runs = lab.tmp.path().join(format!("{name}.runs"));
        lab.write_template(
            1,
            name,
            &format!(
                r#"
[[components]]
name = "main"
command = ["/bin/sh", "-c", "echo run >> {}; {then}"]
restart = "on-failure"
restart_delay_ms = 50
"#,
                runs.display()
            ),
        );
    };
    template("phoenix", "exec sleep 300");
    lab.ok(1, "app provision phoenix p");
    let first = pid_of("p");
    let st = std::process::Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while runs("phoenix.runs") < 2 || lab.state_of(1, "p") != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted: {} runs, state {}",
            runs("phoenix.runs"),
            lab.state_of(1, "p")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_ne!(pid_of("p"), first, "a new process runs");
    // A stop is a stop: nothing restarts it.
    lab.ok(1, "app stop p");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(lab.state_of(1, "p"), "stopped");
    assert_eq!(runs("phoenix.runs"), 2);

    // One that dies every time: five restarts, then failed with the reason.
    template("crashy", "sleep 0.3; exit 3");
    lab.ok(1, "app provision crashy c");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let error = loop {
        let info = lab.ok(1, "app info c --batch");
        let error = info_field(&info, "error").unwrap_or_default().to_string();
        if error.contains("not restarted") {
            break error;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still restarting: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(error.contains("5 restarts in a row failed"), "{error}");
    assert!(error.contains("component main exited"), "{error}");
    assert_eq!(lab.state_of(1, "c"), "failed");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(runs("crashy.runs"), 6, "the first run and five restarts");
    // Someone's start resets the count: it runs (and restarts) again.
    lab.ok(1, "app start c");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(runs("crashy.runs") >= 8, "{} runs", runs("crashy.runs"));
}

/// Template `secret` properties: `app info` (plain and `--batch`) and `app list` show `***`, an
/// error that quotes a substituted command hides it, and app.json is owner-only. And `mig_op`,
/// MIG's tag, is accepted by every template.
#[test]
fn secret_properties_are_never_shown_and_app_json_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::up(1, 140);
    // A fake `mig helper` that records the env it got and listens like the real one.
    let fake = lab.dir().join("fake-mig");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor a; do case $a in listen=*) ip=${a#listen=};; state_dir=*) sd=${a#state_dir=};; esac; done\n\
         printf '%s' \"$MIG_HELPER_ENV\" > \"$sd/env\"\nexec python3 -m http.server 8080 --bind \"$ip\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = lab.lab_up(&["--mig-bin", &fake.display().to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    let secret = "k_op-5ecr3t-private-key-material";
    lab.ok(
        1,
        &format!(
            "app provision MigHelper mighelper-x in_ip={} env={secret}",
            lab.ip(1, 20)
        ),
    );
    // The helper itself gets it.
    let got = lab.app_dir(1, "mighelper-x").join("vols/state/env");
    assert_eq!(std::fs::read_to_string(got).unwrap(), secret);
    let info = lab.ok(1, "app info mighelper-x --batch");
    assert_eq!(info_field(&info, "prop.env").unwrap(), "***", "{info}");
    assert!(!info.contains(secret), "{info}");
    let human = lab.ok(1, "app info mighelper-x");
    assert!(human.contains("env = ***"), "{human}");
    assert!(!human.contains(secret), "{human}");
    assert!(!lab.ok(1, "app list").contains(secret));
    let json = lab.app_dir(1, "mighelper-x").join("app.json");
    let mode = std::fs::metadata(&json).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "app.json is {mode:o}");
    // An error that would quote the secret (a substituted command) hides it, in the reply,
    // the record's error and the daemon's log.
    lab.write_template(
        1,
        "leaky",
        "secret = [\"tok\"]\n[properties]\ntok = \"\"\n\
         [[components]]\nname = \"c\"\ncommand = [\"/nonexistent/${tok}\"]\n",
    );
    let r = lab.ssh(1, &format!("app provision leaky lk tok={secret}"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("/nonexistent/***"), "{r:?}");
    assert!(!r.stderr.contains(secret), "{r:?}");
    let info = lab.ok(1, "app info lk --batch");
    assert!(
        info_field(&info, "error")
            .unwrap()
            .contains("/nonexistent/***"),
        "{info}"
    );
    assert!(!info.contains(secret), "{info}");
    let log = std::fs::read_to_string(lab.dir().join("g1/daemon.log")).unwrap();
    assert!(!log.contains(secret), "the daemon logged the secret");
    // `mig_op` on provision and config of a template that does not declare it.
    let tag = "fedcba9876543210fedcba9876543210";
    lab.ok(
        1,
        &format!(
            "app provision kvstore kv in_ip={} mig_op={tag}",
            lab.ip(1, 10)
        ),
    );
    let info = lab.ok(1, "app info kv --batch");
    assert_eq!(info_field(&info, "prop.mig_op").unwrap(), tag);
    lab.ok(1, "app stop kv");
    let tag2 = "00000000000000000000000000000001";
    lab.ok(1, &format!("app config kv mig_op={tag2}"));
    let info = lab.ok(1, "app info kv --batch");
    assert_eq!(info_field(&info, "prop.mig_op").unwrap(), tag2);
    for bad in ["123", &tag.to_uppercase()] {
        let r = lab.ssh(1, &format!("app config kv mig_op={bad}"));
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains("32 hex digits"), "{r:?}");
    }
    let r = lab.ssh(1, "app config kv mig_tag=1");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("has no property mig_tag"), "{r:?}");
}
