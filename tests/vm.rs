//! A real VM moved by MIG: the `vmapp` demo (a busybox guest with its data on its disk) on grids
//! that drive libvirt. Ignored by `cargo test` and scripts/test: it needs libvirtd, QEMU, passt and
//! the guest's files. Run it with scripts/test-vm, which sets all of that up (MIG_VMAPP_DIR names
//! the directory holding vmlinuz and initrd.img from scripts/build-vmapp).

mod common;

use std::process::Command;
use std::sync::atomic::AtomicU8;

use common::lab::{curl, wait_for, Lab};
use common::mig;

// The last addresses of the mig package's range: this binary runs alone, in scripts/test-vm.
static BASES: AtomicU8 = AtomicU8::new(246);

/// Software emulation on a busy machine: a guest may take a minute to serve its page.
const BOOT_SECS: u64 = 180;

/// Installs vmapp on every grid, the guest's files as the grid variable `vmapp_dir` (or
/// `vmapp_dir` for grid n if given), and domain names unique to this lab.
fn prepare(lab: &Lab, bad_vmapp_dir_on: Option<u8>) {
    let dir =
        std::env::var("MIG_VMAPP_DIR").expect("MIG_VMAPP_DIR: run this test with scripts/test-vm");
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
            "vmapp_dir = \"{vmapp_dir}\"\n\n[vm]\nname_prefix = \"miglab{}-g{n}-\"\n",
            lab.base
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

/// libvirt's domains whose names start with `prefix`, with their states.
fn domains(prefix: &str) -> Vec<String> {
    let out = Command::new("virsh")
        .args(["--connect", "qemu:///system", "list", "--all", "--name"])
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
#[ignore = "needs libvirtd, QEMU and the vmapp guest: run scripts/test-vm"]
fn a_vm_migrates_snapshots_and_rolls_back_with_its_disk() {
    let lab = Lab::up(3, &BASES);
    // g3's guest files are missing: a VM imported there cannot start.
    prepare(&lab, Some(3));
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
    assert_eq!(domains(&prefix), [format!("{prefix}g2-vmshop2-web")]);

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
    assert_eq!(domains(&prefix), [] as [String; 0]);
}
