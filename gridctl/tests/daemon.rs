//! The daemon's own guarantees, over its Unix socket (no sshd): export leases, imports that are
//! never committed, and state that survives a restart.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gridctl::protocol::{Conn, Reply, Request};

/// A daemon on a temporary state dir; dropping it ends its applications too.
struct Daemon(Child, std::path::PathBuf);

impl Daemon {
    fn start(state: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_gridctl"))
            .arg("daemon")
            .arg("--state")
            .arg(state)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Conn::connect(state).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child, state.to_path_buf())
    }

    /// Dies like a crash: SIGKILL, applications left running.
    fn crash(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        self.1 = std::path::PathBuf::new();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.1.as_os_str().is_empty() {
            if let Ok(mut c) = Conn::connect(&self.1) {
                let _ = c.call(&Request::Shutdown);
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cmd(state: &Path, line: &str) -> (i32, String) {
    match Conn::connect(state)
        .unwrap()
        .call(&Request::Command { line: line.into() })
        .unwrap()
    {
        Reply::Done {
            code,
            stdout,
            stderr,
        } => (code, stdout + &stderr),
        other => panic!("{other:?}"),
    }
}

fn setup() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("templates")).unwrap();
    std::fs::write(
        d.path().join("templates/idle.toml"),
        "[properties]\nx = \"1\"\n[[volumes]]\nname = \"v\"\nsize = \"1M\"\n\
         [[components]]\nname = \"c\"\ncommand = [\"/bin/sleep\", \"300\"]\n",
    )
    .unwrap();
    d
}

#[test]
fn an_export_lease_holds_the_source_stopped_until_its_connection_closes() {
    let d = setup();
    let s = d.path();
    let _daemon = Daemon::start(s);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.join("daemon.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the daemon's socket is root's alone");
    assert_eq!(cmd(s, "app provision idle a").0, 0);
    let mut lease = Conn::connect(s).unwrap();
    // Running: no export.
    match lease
        .call(&Request::ExportBegin {
            app: "a".into(),
            live: false,
        })
        .unwrap()
    {
        Reply::Done {
            code: 1, stderr, ..
        } => assert!(stderr.contains("it is running"), "{stderr}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(cmd(s, "app stop a").0, 0);
    assert!(matches!(
        lease
            .call(&Request::ExportBegin {
                app: "a".into(),
                live: false,
            })
            .unwrap(),
        Reply::Export { .. }
    ));
    let (code, msg) = cmd(s, "app start a");
    assert_eq!(code, 1);
    assert!(msg.contains("being copied"), "{msg}");
    let (code, msg) = cmd(s, "app destroy a");
    assert_eq!(code, 1);
    assert!(msg.contains("being copied"), "{msg}");
    drop(lease);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cmd(s, "app start a").0 != 0 {
        assert!(Instant::now() < deadline, "lease not released");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cmd(s, "app stop a").0, 0);
}

#[test]
fn an_import_not_committed_is_removed_and_its_name_freed() {
    let d = setup();
    let s = d.path();
    let _daemon = Daemon::start(s);
    let mut c = Conn::connect(s).unwrap();
    let dir = match c.call(&Request::ImportBegin { name: "n".into() }).unwrap() {
        Reply::Import { app_dir } => app_dir,
        other => panic!("{other:?}"),
    };
    std::fs::write(dir.join("vols/partial"), b"half").unwrap();
    // The name is taken meanwhile.
    let (code, msg) = cmd(s, "app provision idle n");
    assert_eq!(code, 1);
    assert!(msg.contains("already exists"), "{msg}");
    assert_eq!(
        cmd(s, "app list --batch").1,
        "",
        "an import in progress is not listed"
    );
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() {
        assert!(Instant::now() < deadline, "partial import left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cmd(s, "app provision idle n").0, 0);
}

#[test]
fn state_survives_a_restart_and_half_done_work_is_cleaned() {
    let d = setup();
    let s = d.path();
    let daemon = Daemon::start(s);
    assert_eq!(cmd(s, "app provision idle a").0, 0);
    assert_eq!(cmd(s, "app stop a").0, 0);
    assert_eq!(cmd(s, "app config a x=2").0, 0);
    assert_eq!(cmd(s, "app provision idle b").0, 0);
    daemon.crash();
    // A crash left an import directory without a descriptor.
    std::fs::create_dir_all(s.join("apps/ghost/vols")).unwrap();
    let _daemon = Daemon::start(s);
    assert_eq!(
        cmd(s, "app list --batch").1,
        "a\tstopped\tidle\nb\trunning\tidle\n",
        "b's sleep outlived the daemon and was adopted"
    );
    assert!(cmd(s, "app info a --batch").1.contains("prop.x\t2\n"));
    assert!(!s.join("apps/ghost").exists());
    assert_eq!(cmd(s, "app stop b").0, 0);
    // A second daemon on the same state refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_gridctl"))
        .args(["daemon", "--state"])
        .arg(s)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serves"));
}
