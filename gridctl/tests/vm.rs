//! The daemon's handling of `kind = "vm"` components, against a fake `virsh` (a shell script that
//! keeps each domain's state in a file), so that it runs anywhere: define and start at provision,
//! ACPI stop or a forced one reported as such, a VM that powers off fails its application, and
//! destroy undefines. The real libvirt path is tests/vm.rs of the mig package (scripts/test-vm).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gridctl::protocol::{Conn, Reply, Request};

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
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(mut c) = Conn::connect(&self.1) {
            let _ = c.call(&Request::Shutdown);
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

/// libvirt in miniature: `def-NAME` while defined, `state-NAME` its state; every call is logged
/// to `calls`. A guest ignores the ACPI request while `ignore-acpi` exists.
const FAKE_VIRSH: &str = r#"#!/bin/sh
d=$(dirname "$0")
shift 2   # --connect URI
echo "$*" >> "$d/calls"
verb=$1; name=$2
case "$verb" in
  define) name=$(sed -n 's:.*<name>\(.*\)</name>.*:\1:p' "$2"); touch "$d/def-$name"
          [ -f "$d/state-$name" ] || echo "shut off" > "$d/state-$name" ;;
  domstate) [ -f "$d/def-$name" ] || { echo "error: failed to get domain '$name'" >&2; exit 1; }
            cat "$d/state-$name" ;;
  start) echo running > "$d/state-$name" ;;
  shutdown) [ -f "$d/ignore-acpi" ] || echo "shut off" > "$d/state-$name" ;;
  destroy) echo "shut off" > "$d/state-$name" ;;
  undefine) rm -f "$d/def-$name" "$d/state-$name" ;;
  *) echo "error: unknown verb $verb" >&2; exit 1 ;;
esac
"#;

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("state");
    let fake = d.path().join("libvirt");
    std::fs::create_dir_all(s.join("templates")).unwrap();
    std::fs::create_dir_all(&fake).unwrap();
    let virsh = fake.join("virsh");
    std::fs::write(&virsh, FAKE_VIRSH).unwrap();
    std::fs::set_permissions(&virsh, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        s.join("grid.toml"),
        format!("[vm]\nvirsh = \"{}\"\n", virsh.display()),
    )
    .unwrap();
    std::fs::write(
        s.join("templates/box.toml"),
        "[[volumes]]\nname = \"data\"\nsize = \"1M\"\n\
         [[components]]\nname = \"guest\"\nkind = \"vm\"\nstop_timeout_secs = 1\n\
         [components.vm]\nmemory = \"64M\"\nkernel = \"/boot/k\"\ndisks = [\"data\"]\n\
         ports = [{ host = \"127.0.0.1:18080\", guest = 80 }]\n",
    )
    .unwrap();
    (d, fake)
}

fn calls(fake: &Path) -> Vec<String> {
    std::fs::read_to_string(fake.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn info(s: &Path, app: &str, key: &str) -> String {
    let (_, out) = cmd(s, &format!("app info {app} --batch"));
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}\t")))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_vm_is_defined_started_stopped_failed_and_undefined_by_the_daemon() {
    let (d, fake) = setup();
    let s = d.path().join("state");
    let _daemon = Daemon::start(&s);
    let dom = "gridctl-b1-guest";

    let (code, out) = cmd(&s, "app provision box b1");
    assert_eq!(code, 0, "{out}");
    let xml = s.join("apps/b1/vm-guest.xml");
    let text = std::fs::read_to_string(&xml).unwrap();
    assert!(text.starts_with("<domain type='qemu'>"), "{text}");
    assert!(text.contains(&format!("<name>{dom}</name>")), "{text}");
    assert!(
        text.contains(&format!(
            "<source file='{}'/>",
            s.join("apps/b1/vols/data").display()
        )),
        "{text}"
    );
    let c = calls(&fake);
    assert_eq!(c[0], format!("define {}", xml.display()), "{c:?}");
    assert_eq!(c.last().unwrap(), &format!("start {dom}"), "{c:?}");
    assert_eq!(info(&s, "b1", "state"), "running");

    // Stop: the guest obeys the ACPI request.
    let (code, out) = cmd(&s, "app stop b1");
    assert_eq!(
        (code, out.as_str()),
        (0, "vm guest shut down\nstopped b1\n")
    );
    assert!(calls(&fake).contains(&format!("shutdown {dom} --mode acpi")));

    // Stop: the guest ignores it, and is forced off after stop_timeout_secs, as the output says.
    assert_eq!(cmd(&s, "app start b1").0, 0);
    std::fs::write(fake.join("ignore-acpi"), "").unwrap();
    let t = Instant::now();
    let (code, out) = cmd(&s, "app stop b1");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("vm guest forced off: it did not power off within 1s"),
        "{out}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(calls(&fake).last().unwrap(), &format!("destroy {dom}"));
    assert_eq!(info(&s, "b1", "state"), "stopped");

    // A guest that powers off by itself fails its application.
    assert_eq!(cmd(&s, "app start b1").0, 0);
    std::fs::write(fake.join(format!("state-{dom}")), "shut off\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while info(&s, "b1", "state") != "failed" {
        assert!(Instant::now() < deadline, "the application did not fail");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(info(&s, "b1", "error"), "vm guest is shut off");

    // Destroy undefines the domain.
    let (code, out) = cmd(&s, "app destroy b1");
    assert_eq!((code, out.as_str()), (0, "destroyed b1\n"));
    assert_eq!(calls(&fake).last().unwrap(), &format!("undefine {dom}"));
    assert!(!fake.join(format!("def-{dom}")).exists());
}

#[test]
fn a_process_only_application_never_calls_virsh() {
    let (d, fake) = setup();
    let s = d.path().join("state");
    std::fs::write(
        s.join("templates/idle.toml"),
        "[[components]]\nname = \"c\"\ncommand = [\"/bin/sleep\", \"300\"]\n",
    )
    .unwrap();
    let _daemon = Daemon::start(&s);
    assert_eq!(cmd(&s, "app provision idle i").0, 0);
    assert_eq!(cmd(&s, "app stop i").1, "stopped i\n");
    assert_eq!(cmd(&s, "app destroy i").0, 0);
    assert_eq!(calls(&fake), [] as [String; 0]);
}

#[test]
fn a_vm_that_dies_is_restarted_when_its_component_asks_for_it() {
    let (d, fake) = setup();
    let s = d.path().join("state");
    let box_toml = std::fs::read_to_string(s.join("templates/box.toml")).unwrap();
    std::fs::write(
        s.join("templates/sturdy.toml"),
        box_toml.replace(
            "stop_timeout_secs = 1\n",
            "stop_timeout_secs = 1\nrestart = \"on-failure\"\nrestart_delay_ms = 100\n",
        ),
    )
    .unwrap();
    let _daemon = Daemon::start(&s);
    let dom = "gridctl-s1-guest";
    assert_eq!(cmd(&s, "app provision sturdy s1").0, 0);
    let starts = || {
        calls(&fake)
            .iter()
            .filter(|c| *c == &format!("start {dom}"))
            .count()
    };
    assert_eq!(starts(), 1);

    // Its qemu is killed: libvirt says the domain is shut off. The daemon sees it, fails the
    // application and starts it again, as it would restart a process that exited.
    std::fs::write(fake.join(format!("state-{dom}")), "shut off\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while starts() < 2 {
        assert!(
            Instant::now() < deadline,
            "the VM was not restarted: {:?}",
            calls(&fake)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while info(&s, "s1", "state") != "running" {
        assert!(Instant::now() < deadline, "not running again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_to_string(fake.join(format!("state-{dom}"))).unwrap(),
        "running\n"
    );

    // A stop someone asked for is not a failure: nothing restarts it.
    assert_eq!(cmd(&s, "app stop s1").0, 0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(info(&s, "s1", "state"), "stopped");
    assert_eq!(starts(), 2);
}
