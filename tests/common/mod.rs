//! Shared by the `mig` binary's integration tests: a config volume in a temp dir, and the binary.
#![allow(dead_code)]

pub mod lab;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const GRID_INFO: &str = r#"# two grids, as the lab writes them
grid g1:
{
  controller = 127.0.1.1:2222
  location = Lab 1
  MIG_ip = 127.0.1.10:8080
  app_config = "in_ip=127.0.1.10 web_ip=127.0.1.11"
  MigHelper_config = "in_ip=127.0.1.20 out_ip=127.0.1.21 netmask=255.0.0.0 gateway=127.0.0.1"
}
grid g2: {
  controller = root@127.0.2.1:2222
  location = Lab 2
  MIG_ip = 127.0.2.10:8080
  MigHelper_config = "in_ip=127.0.2.20 out_ip=127.0.2.21 netmask=255.0.0.0 gateway=127.0.0.1"
}
"#;

/// A valid config volume: grid.info, a fresh key (mode 600), an empty known_hosts.
pub fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("grid.info"), GRID_INFO).unwrap();
    testkit::keygen(&dir.path().join("private.key"));
    std::fs::write(dir.path().join("known_hosts"), "").unwrap();
    // Journal inside the temp dir, never in the system's /var/lib/mig.
    std::fs::write(
        dir.path().join("mig.toml"),
        format!(
            "state_dir = {:?}\n",
            state_dir(dir.path()).display().to_string()
        ),
    )
    .unwrap();
    dir
}

pub fn write_script(path: &Path, body: &str, mode: u32) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mig() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mig"));
    // The test's own environment must not leak properties into the layers under test.
    for (k, _) in std::env::vars() {
        if k.starts_with("MIG_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "info");
    c
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}
