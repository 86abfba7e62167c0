//! `app migrate REMOTE APP .name=NEW --import` between two real grids over their own SSH trust.

mod common;

use std::time::Duration;

use common::*;

fn provision_with_data(lab: &Lab, app: &str, size: &str) -> String {
    let ip = lab.ip(1, 10);
    lab.ok(
        1,
        &format!("app provision kvstore {app} in_ip={ip} data_size={size}"),
    );
    let addr = format!("{ip}:8000");
    assert_eq!(http(&addr, "PUT", "/kv/order-1", b"two coffees").0, 204);
    assert_eq!(http(&addr, "PUT", "/kv/big", &vec![b'x'; 3 << 20]).0, 204);
    lab.ok(1, &format!("app stop {app}"));
    lab.ok(1, &format!("app checksum {app}"))
}

#[test]
fn kvstore_data_written_on_g1_is_read_on_g2_after_migrate() {
    let lab = Lab::up(2, 120);
    let sum = provision_with_data(&lab, "shop", "64M");
    let ip2 = lab.ip(2, 10);
    let out = lab.ok(
        2,
        &format!(
            "app migrate {} shop .name=shop2 --import in_ip={ip2} --progress_on_stdout",
            lab.controller(1)
        ),
    );
    // Progress lines, the last one complete.
    let lines: Vec<(u64, u64)> = out
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            assert_eq!(w.len(), 3, "{l}");
            assert_eq!(w[0], "progress", "{l}");
            (w[1].parse().unwrap(), w[2].parse().unwrap())
        })
        .collect();
    let (done, total) = *lines.last().unwrap();
    assert_eq!(done, total, "{out}");
    assert!(total >= 3 << 20, "{out}");
    assert_eq!(lab.ok(2, "app checksum shop2"), sum);
    let info = lab.ok(2, "app info shop2 --batch");
    assert_eq!(info_field(&info, "state").unwrap(), "stopped");
    assert_eq!(info_field(&info, "prop.in_ip").unwrap(), ip2);
    // The source is untouched.
    assert_eq!(lab.state_of(1, "shop"), "stopped");
    lab.ok(2, "app start shop2");
    let (code, body) = http(&format!("{ip2}:8000"), "GET", "/kv/order-1", b"");
    assert_eq!((code, body.as_slice()), (200, &b"two coffees"[..]));
    assert_eq!(
        http(&format!("{ip2}:8000"), "GET", "/kv/big", b"").1.len(),
        3 << 20
    );
    // --novols: the descriptor and empty volumes of the same size.
    let out = lab.ok(
        2,
        &format!(
            "app migrate {} shop .name=shell --import --novols in_ip={ip2}",
            lab.controller(1)
        ),
    );
    assert!(
        out.contains("imported shop from") && out.contains("as shell"),
        "{out}"
    );
    let info = lab.ok(2, "app info shell --batch");
    assert_eq!(
        info_field(&info, "volume.data").unwrap(),
        (64 << 20).to_string()
    );
    assert_ne!(lab.ok(2, "app checksum shell"), sum);
}

#[test]
fn a_sparse_volume_keeps_its_holes_compressed_or_not() {
    let lab = Lab::up(2, 122);
    let sum = provision_with_data(&lab, "big", "4G");
    let src = lab.app_dir(1, "big").join("vols/data");
    assert!(allocated(&src) < 16 << 20);
    for (name, flag) in [("big2", ""), ("big3", "--nocompress")] {
        lab.ok(
            2,
            &format!(
                "app migrate {} big .name={name} --import {flag}",
                lab.controller(1)
            ),
        );
        let dst = lab.app_dir(2, name).join("vols/data");
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 4 << 30);
        assert!(
            allocated(&dst) < 16 << 20,
            "{name}: {} bytes allocated for 3 MiB of data",
            allocated(&dst)
        );
        assert_eq!(lab.ok(2, &format!("app checksum {name}")), sum);
    }
}

#[test]
fn a_corrupted_stream_is_detected_and_leaves_nothing_on_the_target() {
    let lab = Lab::up(2, 124);
    provision_with_data(&lab, "shop", "64M");
    // The test hook: the source flips one bit after 1 MB of its next export.
    std::fs::write(lab.state(1).join("faults/corrupt-export-after"), "1000000").unwrap();
    let r = lab.ssh(
        2,
        &format!(
            "app migrate {} shop .name=shop2 --import",
            lab.controller(1)
        ),
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("BLAKE3 mismatch"), "{r:?}");
    assert!(r.stderr.contains("shop"), "{r:?}");
    assert_eq!(lab.ok(2, "app list --batch"), "");
    assert!(
        !lab.app_dir(2, "shop2").exists(),
        "partial copy left behind"
    );
    // The hook was used once: the next migrate succeeds.
    lab.ok(
        2,
        &format!(
            "app migrate {} shop .name=shop2 --import",
            lab.controller(1)
        ),
    );
}

#[test]
fn refusals_source_running_new_exists_unknown_remote() {
    let lab = Lab::up(2, 126);
    let ip = lab.ip(1, 10);
    lab.ok(1, &format!("app provision kvstore shop in_ip={ip}"));
    let ctl = lab.controller(1);
    let r = lab.ssh(2, &format!("app migrate {ctl} shop .name=shop2 --import"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("shop: it is running; stop it first"),
        "{r:?}"
    );
    assert_eq!(lab.ok(2, "app list --batch"), "");
    lab.ok(1, "app stop shop");
    let r = lab.ssh(2, &format!("app migrate {ctl} nosuch .name=x --import"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no application named nosuch"), "{r:?}");
    lab.ok(2, &format!("app migrate {ctl} shop .name=shop2 --import"));
    let r = lab.ssh(2, &format!("app migrate {ctl} shop .name=shop2 --import"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("shop2 already exists"), "{r:?}");
    let r = lab.ssh(2, "app migrate 127.0.99.1:2222 shop .name=shop3 --import");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("127.0.99.1:2222 is not a known peer"),
        "{r:?}"
    );
    let r = lab.ssh(
        2,
        &format!("app migrate {ctl} shop .name=shop3 --import bogus=1"),
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no property bogus"), "{r:?}");
    assert!(!lab.app_dir(2, "shop3").exists());
    // The copies released their hold on the source: it starts again.
    lab.ok(1, "app start shop");
    // MIG's key cannot use the peer verbs directly.
    let r = lab.ssh(1, "peer export shop");
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn a_changed_host_key_or_a_dead_source_controller_fails_with_ssh_s_reason() {
    let lab = Lab::up(2, 128);
    lab.ok(
        1,
        &format!("app provision kvstore shop in_ip={}", lab.ip(1, 10)),
    );
    lab.ok(1, "app stop shop");
    let ctl = lab.controller(1);
    // g2 pins a different host key for g1: the pull is refused by ssh itself.
    let kh = lab.state(2).join("peer/known_hosts");
    let pinned = std::fs::read_to_string(&kh).unwrap();
    let other_key = std::fs::read_to_string(lab.dir().join("mig/private.key.pub")).unwrap();
    let forged: String = pinned
        .lines()
        .map(|l| {
            if l.starts_with(&format!("[{}]", lab.ip(1, 1))) {
                let key: Vec<&str> = other_key.split_whitespace().take(2).collect();
                format!("[{}]:2222 {}\n", lab.ip(1, 1), key.join(" "))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&kh, forged).unwrap();
    let r = lab.ssh(2, &format!("app migrate {ctl} shop .name=shop2 --import"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("Host key verification failed"), "{r:?}");
    assert!(!lab.app_dir(2, "shop2").exists());
    std::fs::write(&kh, pinned).unwrap();
    // g1's sshd is gone: the reason is ssh's, within seconds.
    let pid: i32 = std::fs::read_to_string(lab.dir().join("g1/sshd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for_every(
        "sshd to stop",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || std::net::TcpStream::connect(&ctl).is_err().then_some(()),
    );
    let t = std::time::Instant::now();
    let r = lab.ssh(2, &format!("app migrate {ctl} shop .name=shop2 --import"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("Connection refused"), "{r:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(lab.ok(2, "app list --batch"), "");
}

#[test]
fn an_import_whose_client_went_away_leaves_nothing() {
    let lab = Lab::up(2, 130);
    lab.write_template(1, "blob", "[[volumes]]\nname = \"data\"\nsize = \"512M\"\n");
    // An import runs the target grid's own template: g2 needs it too.
    lab.write_template(2, "blob", "[[volumes]]\nname = \"data\"\nsize = \"512M\"\n");
    lab.ok(1, "app provision blob b");
    lab.ok(1, "app stop b");
    let st = std::process::Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=1M",
            "count=256",
            "conv=notrunc",
            "status=none",
        ])
        .arg(format!(
            "of={}",
            lab.app_dir(1, "b").join("vols/data").display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let mut client = std::process::Command::new("ssh")
        .arg("-F")
        .arg(lab.dir().join("ssh_config"))
        .arg("g2")
        .arg(format!(
            "app migrate {} b .name=b2 --import --nocompress --progress_on_stdout",
            lab.controller(1)
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("progress 0 "), "{first}");
    client.kill().unwrap();
    client.wait().unwrap();
    // The import notices at its next progress line and removes its partial copy.
    wait_for("the partial import to be removed", 30, || {
        (!lab.app_dir(2, "b2").exists()).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(lab.ok(2, "app list --batch"), "");
    // The source is released: it starts again.
    lab.ok(1, "app start b");
}

/// The pid of the `gridctl ssh` on grid `from` that runs `peer export APP` (the source's side
/// of a copy), found by its SSH_ORIGINAL_COMMAND.
fn export_pid(lab: &Lab, from: u8, app: &str) -> Option<i32> {
    let state = lab.state(from).display().to_string();
    let want = format!("SSH_ORIGINAL_COMMAND=peer export {app}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_front = args.first().is_some_and(|a| a.ends_with("gridctl"))
            && args.iter().any(|a| a == "ssh")
            && args.contains(&state);
        if is_front
            && environ
                .split(|b| *b == 0)
                .any(|v| v.starts_with(want.as_bytes()))
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn an_import_whose_requester_goes_away_while_the_source_stalls_ends_at_once() {
    let lab = Lab::up(2, 132);
    provision_with_data(&lab, "shop", "64M");
    let hold = lab.state(1).join("faults/hold-export");
    std::fs::write(&hold, "").unwrap();
    let line = format!(
        "app migrate {} shop .name=shop2 --import --progress_on_stdout",
        lab.controller(1)
    );
    let mut requester = std::process::Command::new("ssh")
        .arg("-F")
        .arg(lab.dir().join("ssh_config"))
        .arg("g2")
        .arg(&line)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Hold the source's side still, so the import writes no progress while the requester dies.
    let export = wait_for_every(
        "the export to start",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || export_pid(&lab, 1, "shop"),
    );
    let signal = |sig: &str, pid: i32| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
    };
    signal("-STOP", export);
    std::fs::remove_file(&hold).unwrap();
    requester.kill().unwrap();
    requester.wait().unwrap();
    // While the source is still stalled, the target grid gives the name back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let freed = loop {
        let list = lab.ok(2, "app list --batch");
        if !list.lines().any(|l| l.starts_with("shop2\t")) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    signal("-CONT", export);
    assert!(freed, "the orphaned import still holds shop2 on g2");
    // And it stays gone once the source could go on.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(!lab.ok(2, "app list --batch").contains("shop2"));
}

/// A template `tool` whose one component notes who wrote it (`ran-by` in the app's directory).
fn tool_template(by: &str) -> String {
    format!(
        r#"
[properties]
note = ""
[[volumes]]
name = "conf"
kind = "dir"
[[components]]
name = "main"
command = ["/bin/sh", "-c", "echo {by} > ran-by; exec sleep 300"]
"#
    )
}

#[test]
fn an_import_runs_this_grid_s_template_strips_setuid_and_keeps_its_mig_op_tag() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::up(2, 134);
    let ctl = lab.controller(1);
    lab.write_template(1, "tool", &tool_template("source"));
    lab.write_template(2, "tool", &tool_template("local"));
    lab.ok(1, "app provision tool t note=hi");
    lab.ok(1, "app stop t");
    let conf = lab.app_dir(1, "t").join("vols/conf");
    std::fs::write(conf.join("suid"), "#!/bin/sh\nid\n").unwrap();
    std::fs::set_permissions(conf.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::create_dir(conf.join("sgid")).unwrap();
    std::fs::set_permissions(conf.join("sgid"), std::fs::Permissions::from_mode(0o2775)).unwrap();
    // A tag that is not an operation id is refused; other undeclared names still are.
    let r = lab.ssh(
        2,
        &format!("app migrate {ctl} t .name=t2 --import mig_op=nothex"),
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("mig_op: expected an operation id of 32 hex digits"),
        "{r:?}"
    );
    assert!(!lab.app_dir(2, "t2").exists());
    let tag = "0123456789abcdef0123456789abcdef";
    lab.ok(
        2,
        &format!("app migrate {ctl} t .name=t2 --import mig_op={tag}"),
    );
    let info = lab.ok(2, "app info t2 --batch");
    assert_eq!(info_field(&info, "prop.mig_op").unwrap(), tag);
    assert_eq!(info_field(&info, "prop.note").unwrap(), "hi");
    let mode = |p: &str| {
        std::fs::metadata(lab.app_dir(2, "t2").join("vols/conf").join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("suid"), 0o755, "setuid survived the import");
    assert_eq!(mode("sgid"), 0o775, "setgid survived the import");
    // What runs is g2's template, not the source's.
    lab.ok(2, "app start t2");
    let ran_by = lab.app_dir(2, "t2").join("ran-by");
    wait_for_every(
        "t2 to run",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || ran_by.exists().then_some(()),
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(std::fs::read_to_string(&ran_by).unwrap(), "local\n");
    lab.ok(2, "app stop t2");
    // An application whose template g2 lacks is refused, saying so, leaving nothing.
    lab.write_template(1, "lonely", "[[volumes]]\nname = \"data\"\nsize = \"1M\"\n");
    lab.ok(1, "app provision lonely l");
    lab.ok(1, "app stop l");
    let r = lab.ssh(2, &format!("app migrate {ctl} l .name=l2 --import"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("l comes from template lonely, which this grid lacks"),
        "{r:?}"
    );
    assert!(!lab.app_dir(2, "l2").exists());
    assert!(!lab.ok(2, "app list --batch").contains("l2"));
    // The refusal released the source.
    lab.ok(1, "app start l");
}
