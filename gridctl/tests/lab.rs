//! `gridctl lab up|down` over real sshd: files, trust, idempotence, leftovers, a taken port, and
//! applications surviving a daemon restart.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn lab_up_writes_trust_and_config_is_idempotent_and_down_leaves_nothing() {
    let lab = Lab::up(2, 100);
    let dir = lab.dir();
    // MIG's config volume.
    let info = std::fs::read_to_string(dir.join("mig/grid.info")).unwrap();
    for want in [
        "grid g2:",
        "controller = 127.0.102.1:2222",
        "location = Lab 2",
        "MIG_ip = 127.0.101.10:8080",
        "app_config = \"in_ip=127.0.102.10 web_ip=127.0.102.11\"",
        "MigHelper_config = \"in_ip=127.0.101.20 out_ip=127.0.101.21 netmask=255.0.0.0 gateway=127.0.0.1\"",
    ] {
        assert!(info.contains(want), "grid.info lacks {want:?}:\n{info}");
    }
    let key = std::fs::metadata(dir.join("mig/private.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    let kh = std::fs::read_to_string(dir.join("mig/known_hosts")).unwrap();
    assert!(kh.contains("[127.0.101.1]:2222 ssh-ed25519 "), "{kh}");
    assert!(kh.contains("[127.0.102.1]:2222 ssh-ed25519 "), "{kh}");
    let cfg = std::fs::read_to_string(dir.join("ssh_config")).unwrap();
    assert!(
        cfg.contains("Host g2\n  HostName 127.0.102.1\n  Port 2222\n  User root\n"),
        "{cfg}"
    );
    assert!(cfg.contains("StrictHostKeyChecking yes"), "{cfg}");
    // The forced command starts without the account's ~/.bashrc (bash skips it above shell
    // level 1): a heavy one otherwise costs every command its start-up time.
    let sshd = std::fs::read_to_string(dir.join("g1/sshd_config")).unwrap();
    assert!(sshd.contains("\nSetEnv SHLVL=1\n"), "{sshd}");
    // Every grid answers over real SSH with MIG's key.
    for n in 1..=2 {
        assert_eq!(lab.ok(n, "app list --batch"), "");
    }
    lab.ok(
        1,
        &format!("app provision kvstore kv in_ip={}", lab.ip(1, 10)),
    );
    // Idempotent: a second `up` neither fails nor restarts anything.
    let pids = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let before = (pids("g1/sshd.pid"), pids("g1/daemon.pid"));
    let r = lab.lab_up(&[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!((pids("g1/sshd.pid"), pids("g1/daemon.pid")), before);
    assert_eq!(lab.ok(1, "app list --batch"), "kv\trunning\tkvstore\n");
    assert!(!gridctl::lab::processes_mentioning(&dir).is_empty());
    // Down: sshd, daemons and the application's processes are all gone.
    let r = gridctl(&["lab", "down", "--dir", &dir.display().to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    let left = gridctl::lab::processes_mentioning(&dir);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(std::net::TcpStream::connect("127.0.101.1:2222").is_err());
    assert!(std::net::TcpStream::connect(format!("{}:8000", lab.ip(1, 10))).is_err());
}

#[test]
fn a_taken_port_fails_loudly_naming_the_address_and_leaves_nothing_running() {
    let _squatter = std::net::TcpListener::bind("127.0.104.1:2222").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let d = dir.display().to_string();
    let r = gridctl(&["lab", "up", "--grids", "1", "--base", "103", "--dir", &d]);
    // What the failed `up` started (g1's daemon came up before its sshd failed) is gone already.
    let left = gridctl::lab::processes_mentioning(&dir);
    gridctl(&["lab", "down", "--dir", &d]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("127.0.104.1:2222 is already in use"),
        "{r:?}"
    );
    assert!(
        left.is_empty(),
        "left running after a failed lab up: {left:?}"
    );
}

#[test]
fn a_running_application_survives_a_daemon_restart_and_is_still_watched() {
    let lab = Lab::up(1, 105);
    let ip = lab.ip(1, 10);
    lab.ok(1, &format!("app provision kvstore kv in_ip={ip}"));
    let daemon: i32 = std::fs::read_to_string(lab.dir().join("g1/daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while gridctl::util::pid_alive(daemon) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // `lab up` again restarts the missing daemon, which adopts the running application.
    let r = lab.lab_up(&[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(lab.state_of(1, "kv"), "running");
    assert_eq!(http(&format!("{ip}:8000"), "PUT", "/kv/a", b"1").0, 204);
    // Its component dies: the adopted application becomes failed.
    let info = std::fs::read_to_string(lab.app_dir(1, "kv").join("app.json")).unwrap();
    let rec: gridctl::model::AppRecord = serde_json::from_str(&info).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rec.pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    lab.wait_state(1, "kv", "failed", 10);
    let info = lab.ok(1, "app info kv --batch");
    assert!(
        info_field(&info, "error").unwrap().contains("exited"),
        "{info}"
    );
}

#[test]
fn lab_up_from_another_binary_makes_the_running_sshd_use_it() {
    let lab = Lab::up(1, 107);
    let dir = lab.dir();
    let other = dir.join("gridctl-other");
    std::fs::copy(GRIDCTL, &other).unwrap();
    let d = dir.display().to_string();
    let run_other = |args: &[&str]| {
        let out = std::process::Command::new(&other)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    run_other(&["lab", "up", "--grids", "1", "--base", "107", "--dir", &d]);
    let cfg = std::fs::read_to_string(dir.join("g1/sshd_config")).unwrap();
    assert!(
        cfg.contains("ForceCommand ") && cfg.contains("gridctl-other ssh"),
        "{cfg}"
    );
    // Without that binary, logins fail: proof that sshd re-read its config.
    std::fs::remove_file(&other).unwrap();
    wait_for("sshd to stop running the old command", 10, || {
        (lab.ssh(1, "app list --batch").code == 127).then_some(())
    });
    // And back.
    assert_eq!(lab.lab_up(&[]).code, 0);
    wait_for("sshd to come back to gridctl", 10, || {
        (lab.ssh(1, "app list --batch").code == 0).then_some(())
    });
}

/// `--netns`: each grid in its own network namespace behind a router, reachable from here over
/// veth links, the grids reaching each other only through the router (where tests cut links);
/// `lab down` removes every namespace, link and route it made.
#[test]
fn a_netns_lab_runs_each_grid_in_its_own_namespace_and_down_removes_them() {
    let lab = Lab::up_with(2, 160, &["--netns"]);
    let dir = lab.dir();
    let listing = std::fs::read_to_string(dir.join("netns")).unwrap();
    let names: Vec<String> = listing
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3, "{listing}");
    for n in &names {
        assert!(std::path::Path::new("/run/netns").join(n).exists(), "{n}");
    }
    let info = std::fs::read_to_string(dir.join("mig/grid.info")).unwrap();
    assert!(info.contains("controller = 198.18.162.1:2222"), "{info}");
    // Reached over SSH from here, through the router.
    assert_eq!(lab.ok(2, "app list --batch"), "");
    lab.ok(1, "app provision kvstore kv in_ip=198.18.161.10");
    // The application runs in g1's namespace: its address is not this namespace's.
    assert!(std::net::TcpListener::bind("198.18.161.10:0").is_err());
    let (code, _) = http("198.18.161.10:8000", "GET", "/kv/none", b"");
    assert_eq!(code, 404);
    // g2 reaches g1 through the router; a rule there cuts it off.
    let g2 = names.iter().find(|n| n.ends_with("-g2")).unwrap();
    let router = names.iter().find(|n| n.ends_with("-r")).unwrap();
    let reach = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", g2, "bash", "-c"])
            .arg("exec 3<>/dev/tcp/198.18.161.10/8000")
            .status()
            .unwrap()
            .success()
    };
    assert!(reach());
    let nft = |rules: &str| {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", router, "nft", rules])
            .status()
            .unwrap();
        assert!(st.success(), "nft {rules}");
    };
    nft(
        "add table inet cut; add chain inet cut forward { type filter hook forward priority 0; }; \
         add rule inet cut forward ip daddr 198.18.161.0/24 reject with tcp reset",
    );
    assert!(!reach(), "the cut holds");
    nft("delete table inet cut");
    assert!(reach(), "healed");
    // `lab up` again changes nothing (and needs no --netns to know).
    let r = lab.lab_up(&[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(lab.ok(1, "app list --batch"), "kv\trunning\tkvstore\n");

    let r = gridctl(&["lab", "down", "--dir", &dir.display().to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(gridctl::lab::processes_mentioning(&dir).is_empty());
    for n in &names {
        assert!(
            !std::path::Path::new("/run/netns").join(n).exists(),
            "{n} left"
        );
    }
    let routes = std::process::Command::new("ip")
        .args(["route", "show", "198.18.161.0/24"])
        .output()
        .unwrap();
    assert!(routes.stdout.is_empty(), "a route left behind");
}
