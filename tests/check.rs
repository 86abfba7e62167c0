//! `mig check`: every start-up check, no side effects, exit 0 or 2 with one line per problem.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

fn check(dir: &std::path::Path, sets: &[&str]) -> (Option<i32>, String) {
    let mut cmd = mig();
    cmd.args(["check", "--config-dir"]).arg(dir);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn a_good_volume_passes_and_names_its_grid() {
    let dir = config_dir();
    let (code, out) = check(dir.path(), &["listen=127.0.2.10"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("own grid: g2 (Lab 2), MIG_ip 127.0.2.10:8080"),
        "{out}"
    );
    assert!(out.contains("ok: 2 grid(s)"), "{out}");
}

#[test]
fn an_unknown_own_grid_is_said_but_is_not_a_problem() {
    let dir = config_dir();
    let (code, out) = check(dir.path(), &["listen=127.0.9.10"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("own grid: cannot tell: no grid in"), "{out}");
    assert!(out.contains("has MIG_ip = 127.0.9.10:8080"), "{out}");
}

#[test]
fn a_grid_property_naming_no_grid_is_a_problem() {
    let dir = config_dir();
    let (code, out) = check(dir.path(), &["grid=g9"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("grid = \"g9\": no grid \"g9\" in"), "{out}");
    assert!(out.contains("it has g1, g2"), "{out}");
}

#[test]
fn every_problem_is_one_line_and_nothing_runs() {
    let dir = config_dir();
    let gi = dir.path().join("grid.info");
    // Two grid.info problems: a bad MIG_ip and a missing controller.
    std::fs::write(
        &gi,
        "grid g1:\n{\n  MIG_ip = 127.0.1.10\n  MigHelper_config = \"in_ip=1.1.1.1 out_ip=1.1.1.2 netmask=255.0.0.0 gateway=1.1.1.3\"\n}\n",
    )
    .unwrap();
    let key = dir.path().join("private.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(dir.path().join("known_hosts")).unwrap();
    let marker = dir.path().join("ran");
    write_script(
        &dir.path().join(".rc.local"),
        &format!("touch {}", path_str(&marker)),
        0o644,
    );
    let state = state_dir(dir.path());
    let state_set = format!("state_dir={}", path_str(&state));

    let (code, out) = check(dir.path(), &[&state_set]);
    assert_eq!(code, Some(2), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let gi = path_str(&gi);
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("{gi}:3:"))),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{gi}:1:")) && l.contains("controller")),
        "{out}"
    );
    assert!(lines.iter().any(|l| l.contains("chmod 600")), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("known_hosts_file not found")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(".rc.local script is not executable.")),
        "{out}"
    );
    assert_eq!(lines.len(), 5, "{out}");
    assert!(!marker.exists(), "check ran .rc.local");
    assert!(!state.exists(), "check created the state dir");
}
