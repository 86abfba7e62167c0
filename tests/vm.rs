//! A real VM moved by MIG: the `vmapp` demo (a busybox guest with its data on its disk) on grids
//! that drive libvirt. Needs root, libvirtd, QEMU and passt (scripts/setup installs them); the test
//! builds the guest (scripts/build-vmapp, or MIG_VMAPP_DIR names a directory holding vmlinuz and
//! initrd.img) and runs its own libvirtd (scripts/vm-libvirtd: its own socket and directories, no
//! /dev/kvm), so it meets neither the host's libvirtd nor another run's. scripts/test-vm runs it
//! alone, in a network namespace of its own.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU8;

use common::lab::{curl, wait_for, Lab};
use common::mig;

// The last addresses of the mig package's range (tests/controls.rs has 250..=253).
static BASES: AtomicU8 = AtomicU8::new(246);

/// Software emulation on a busy machine: a guest may take a minute to serve its page.
const BOOT_SECS: u64 = 180;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The guest's files: MIG_VMAPP_DIR, else built into target/vmapp (a no-op once built).
fn vmapp_dir() -> String {
    if let Ok(d) = std::env::var("MIG_VMAPP_DIR") {
        return d;
    }
    // target/debug/mig -> target/vmapp
    let target = Path::new(env!("CARGO_BIN_EXE_mig"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("vmapp");
    run(
        "scripts/build-vmapp",
        Command::new(script("build-vmapp")).arg(&target),
    );
    target.display().to_string()
}

/// passt copies the guest's address and route from an interface with a default route. A network
/// namespace made for tests has only `lo`: it gets a veth pair (a dummy link needs a module that
/// containers may lack) and a default route through it, by which nothing leaves (the guests are
/// reached through their forwarded ports only).
fn ensure_default_route() {
    let routes = run(
        "ip route",
        Command::new("ip").args(["route", "show", "default"]),
    );
    if !routes.trim().is_empty() {
        return;
    }
    let links = run("ip link", Command::new("ip").args(["-o", "link", "show"]));
    let others: Vec<&str> = links
        .lines()
        .filter(|l| !l.contains(": lo:") && !l.contains(": migvm"))
        .collect();
    assert!(
        others.is_empty(),
        "no default route here, so passt cannot give a guest an address; add one \
         (interfaces: {others:?})"
    );
    if !links.contains(": migvm0@") {
        run(
            "ip link add migvm0",
            Command::new("ip").args([
                "link", "add", "migvm0", "type", "veth", "peer", "name", "migvm1",
            ]),
        );
        run(
            "ip addr add",
            Command::new("ip").args(["addr", "add", "10.254.0.2/24", "dev", "migvm0"]),
        );
    }
    for link in ["migvm0", "migvm1"] {
        run(
            "ip link set up",
            Command::new("ip").args(["link", "set", link, "up"]),
        );
    }
    run(
        "ip route add default",
        Command::new("ip").args([
            "route",
            "replace",
            "default",
            "via",
            "10.254.0.1",
            "dev",
            "migvm0",
        ]),
    );
}

/// This test's own libvirtd (scripts/vm-libvirtd), stopped on drop, or by a watchdog if the test
/// process dies first. Declared before the lab, so that it outlives the lab's `lab down`.
struct Libvirtd {
    dir: tempfile::TempDir,
    uri: String,
}

impl Libvirtd {
    fn start() -> Libvirtd {
        ensure_default_route();
        let dir = tempfile::Builder::new()
            .prefix("mig-virt")
            .tempdir()
            .unwrap();
        let vm_libvirtd = script("vm-libvirtd");
        run(
            "scripts/vm-libvirtd start",
            Command::new(&vm_libvirtd).arg("start").arg(dir.path()),
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; '{}' stop '{}' >/dev/null 2>&1",
                std::process::id(),
                vm_libvirtd.display(),
                dir.path().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let uri = std::fs::read_to_string(dir.path().join("uri"))
            .unwrap()
            .trim()
            .to_string();
        Libvirtd { dir, uri }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new(script("vm-libvirtd"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Installs vmapp on every grid, the guest's files as the grid variable `vmapp_dir` (a missing
/// directory on grid `bad_vmapp_dir_on`), this test's libvirt URI, and domain names unique to
/// this lab.
fn prepare(lab: &Lab, virt: &Libvirtd, bad_vmapp_dir_on: Option<u8>) {
    let dir = vmapp_dir();
    let template =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/templates/vmapp.toml");
    for n in 1..=lab.grids {
        let state = lab.state(n);
        std::fs::copy(&template, state.join("templates/vmapp.toml")).unwrap();
        // `lab up` writes only [vars]: a key appended here is one of them.
        let vmapp_dir = if bad_vmapp_dir_on == Some(n) {
            "/nonexistent/vmapp".to_string()
        } else {
            dir.clone()
        };
        let mut toml = std::fs::read_to_string(state.join("grid.toml")).unwrap();
        assert!(toml.trim_start().starts_with("[vars]") && toml.matches('[').count() == 1);
        toml.push_str(&format!(
            "vmapp_dir = \"{vmapp_dir}\"\n\n[vm]\nuri = \"{}\"\nname_prefix = \"miglab{}-g{n}-\"\n",
            virt.uri, lab.base
        ));
        std::fs::write(state.join("grid.toml"), toml).unwrap();
    }
}

fn provision_vmapp(lab: &Lab, n: u8, name: &str) {
    let in_ip = format!("in_ip={}", lab.ip(n, 10));
    let web_ip = format!("web_ip={}", lab.ip(n, 11));
    let out = lab.app(n, &["provision", "vmapp", name, &in_ip, &web_ip]);
    assert!(
        out.status.success(),
        "provision: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest's data through MIG's pass-through on grid n, once the guest answers.
fn read_data(lab: &Lab, n: u8) -> Vec<u8> {
    let url = format!("{}/cgi-bin/data", lab.data_url(n));
    wait_for(&format!("the guest's page on g{n}"), BOOT_SECS, || {
        curl(&[&url])
    })
}

fn write_data(lab: &Lab, n: u8, data: &str) {
    read_data(lab, n);
    let url = format!("{}/cgi-bin/data", lab.data_url(n));
    let r = curl(&["--max-time", "30", "--data-binary", data, &url]);
    assert!(r.is_some(), "POST {url}");
}

fn names(apps: &[(String, String)]) -> Vec<(&str, &str)> {
    apps.iter().map(|(n, s)| (n.as_str(), s.as_str())).collect()
}

/// libvirt's domains whose names start with `prefix`.
fn domains(virt: &Libvirtd, prefix: &str) -> Vec<String> {
    let out = Command::new("virsh")
        .args(["--connect", &virt.uri, "list", "--all", "--name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn run_cli(kind: &str, url: &str, to: &str, name: &str) -> (bool, String) {
    let out = mig()
        .args([kind, "--url", url, "--to", to, "--name", name, "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.success(),
        format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// `app checksum` of the guest's disk.
fn disk_sum(lab: &Lab, n: u8, app: &str) -> String {
    lab.checksum(n, app)
        .lines()
        .find(|l| l.starts_with("data\t"))
        .expect("a data volume")
        .to_string()
}

#[test]
fn a_vm_migrates_snapshots_and_rolls_back_with_its_disk() {
    let virt = Libvirtd::start();
    let lab = Lab::up(3, &BASES);
    // g3's guest files are missing: a VM imported there cannot start.
    prepare(&lab, &virt, Some(3));
    let prefix = format!("miglab{}-", lab.base);
    provision_vmapp(&lab, 1, "vmshop");
    write_data(&lab, 1, "written in the guest on g1");
    assert_eq!(read_data(&lab, 1), b"written in the guest on g1");

    // Migrate g1 -> g2: the data comes back through the guest on g2; g1 keeps nothing, not
    // even a libvirt definition.
    let (ok, out) = run_cli("migrate", &lab.mig_url(1), "g2", "vmshop2");
    assert!(ok, "migrate failed:\n{out}");
    assert_eq!(names(&lab.apps(1)), [] as [(&str, &str); 0]);
    assert_eq!(names(&lab.apps(2)), [("vmshop2", "running")]);
    assert_eq!(read_data(&lab, 2), b"written in the guest on g1");
    assert_eq!(domains(&virt, &prefix), [format!("{prefix}g2-vmshop2-web")]);

    // Roll-back: the target VM cannot start on g3; the source runs again with its disk intact.
    let before = disk_sum(&lab, 2, "vmshop2");
    let (ok, out) = run_cli("migrate", &lab.mig_url(2), "g3", "vmshop3");
    assert!(
        !ok,
        "a migrate to a grid that cannot boot the VM succeeded:\n{out}"
    );
    assert_eq!(names(&lab.apps(2)), [("vmshop2", "running")], "{out}");
    assert_eq!(names(&lab.apps(3)), [] as [(&str, &str); 0], "{out}");
    assert_eq!(read_data(&lab, 2), b"written in the guest on g1");
    let stop = lab.app(2, &["stop", "vmshop2"]);
    assert!(stop.status.success());
    assert_eq!(disk_sum(&lab, 2, "vmshop2"), before);
    let start = lab.app(2, &["start", "vmshop2"]);
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );

    // Snapshot g2 -> g3 (no start there): g3 holds a stopped copy of the same disk, and g2 runs
    // again. (g3 cannot boot it, which a snapshot does not need.)
    write_data(&lab, 2, "written in the guest on g2");
    let (ok, out) = run_cli("snapshot", &lab.mig_url(2), "g3", "vmcopy");
    assert!(ok, "snapshot failed:\n{out}");
    assert_eq!(names(&lab.apps(3)), [("vmcopy", "stopped")]);
    assert_eq!(names(&lab.apps(2)), [("vmshop2", "running")]);
    assert_eq!(read_data(&lab, 2), b"written in the guest on g2");
    let stop = lab.app(2, &["stop", "vmshop2"]);
    let said = String::from_utf8_lossy(&stop.stdout).to_string();
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    // The guest runs busybox acpid: it powers off by ACPI, not by force.
    assert!(said.contains("vm web shut down"), "{said}");
    assert_eq!(disk_sum(&lab, 2, "vmshop2"), disk_sum(&lab, 3, "vmcopy"));

    // Destroy undefines: nothing of this lab stays in libvirt.
    for (n, app) in [(2, "vmshop2"), (3, "vmcopy")] {
        let out = lab.app(n, &["destroy", app]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(domains(&virt, &prefix), [] as [String; 0]);
}
