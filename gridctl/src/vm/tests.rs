//! The VM driver against scripted and fake `virsh`: domain XML, settings, stop and start.

use super::domain::esc;
use super::*;
use crate::template::Template;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::Instant;

const SAMPLE: &str = r#"
required = ["web_ip"]
[properties]
web_ip = ""
mem = "128M"
[[volumes]]
name = "data"
size = "256M"
[[volumes]]
name = "logs"
size = "16M"
[[components]]
name = "guest"
kind = "vm"
stop_timeout_secs = 30
ready = "${web_ip}:8000"
[components.vm]
memory = "${mem}"
kernel = "${state}/img/vmlinuz"
initrd = "${state}/img/initrd.img"
cmdline = "console=ttyS0 quiet app=${app}"
disks = ["data", "logs"]
ports = [{ host = "${web_ip}:8000", guest = 80 }, { host = "${web_ip}:2222", guest = 22 }]
"#;

fn record(state: &Path, t: &Template, name: &str, web_ip: &str) -> AppRecord {
    let p = format!("web_ip={web_ip}").parse().unwrap();
    model::record_from_template(state, "vmapp", t, name, &[p])
        .unwrap()
        .0
}

#[test]
fn domain_xml_of_a_sample_template() {
    let d = tempfile::tempdir().unwrap();
    // A state path that needs escaping: XML metacharacters and a quote.
    let state = d.path().join("a&b<'c'>");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("grid.toml"), "[vars]\ngrid = \"g1\"\n").unwrap();
    let t = Template::parse(SAMPLE).unwrap();
    let rec = record(&state, &t, "vm1", "127.0.1.10");
    let settings = Settings::default();
    let spec = resolve(&state, &settings, &rec, &t.components[0]).unwrap();
    assert_eq!(spec.name, "gridctl-g1-vm1-guest");
    assert_eq!(spec.memory_kib, 128 * 1024);
    let x = domain_xml(&spec);
    let st = esc(&state.to_string_lossy());
    assert!(st.contains("a&amp;b&lt;&apos;c&apos;&gt;"), "{st}");
    assert!(!x.contains("a&b"), "{x}");
    assert!(x.starts_with("<domain type='qemu'>\n"), "{x}");
    assert!(!x.contains("kvm"), "{x}");
    assert!(x.contains("<name>gridctl-g1-vm1-guest</name>"), "{x}");
    // The same UUID at every definition (libvirt refuses a redefinition under a new one),
    // a different one for another domain.
    let uuid = domain_uuid("gridctl-g1-vm1-guest");
    assert!(x.contains(&format!("<uuid>{uuid}</uuid>")), "{x}");
    assert_eq!(uuid.len(), 36);
    assert_eq!(&uuid[14..15], "4");
    assert_ne!(uuid, domain_uuid("gridctl-g2-vm1-guest"));
    assert!(x.contains("<memory unit='KiB'>131072</memory>"), "{x}");
    assert!(x.contains("<vcpu>1</vcpu>"), "{x}");
    assert!(
        x.contains(&format!("<kernel>{st}/img/vmlinuz</kernel>")),
        "{x}"
    );
    assert!(
        x.contains(&format!("<initrd>{st}/img/initrd.img</initrd>")),
        "{x}"
    );
    assert!(
        x.contains("<cmdline>console=ttyS0 quiet app=vm1</cmdline>"),
        "{x}"
    );
    assert!(x.contains("<acpi/>"), "{x}");
    // The volumes, in order, as raw virtio disks.
    let vda = format!(
        "<driver name='qemu' type='raw'/>\n      <source file='{st}/apps/vm1/vols/data'/>\n      \
         <target dev='vda' bus='virtio'/>"
    );
    let vdb =
        format!("<source file='{st}/apps/vm1/vols/logs'/>\n      <target dev='vdb' bus='virtio'/>");
    assert!(x.contains(&vda), "{x}");
    assert!(x.contains(&vdb), "{x}");
    // User networking through passt, both ports on the application's address.
    assert!(
        x.contains("<interface type='user'>\n      <backend type='passt'/>\n"),
        "{x}"
    );
    assert!(
        x.contains(
            "<portForward proto='tcp' address='127.0.1.10'>\n        \
             <range start='8000' to='80'/>\n        <range start='2222' to='22'/>\n      \
             </portForward>"
        ),
        "{x}"
    );
    assert!(
        x.contains(&format!("<source path='{st}/apps/vm1/console-guest.log'/>")),
        "{x}"
    );
    // A property value cannot inject XML.
    let mut rec2 = rec.clone();
    rec2.props.insert("mem".into(), "64M".into());
    let mut c = t.components[0].clone();
    c.vm.as_mut().unwrap().cmdline = Some("x</cmdline><devices>".into());
    let x2 = domain_xml(&resolve(&state, &settings, &rec2, &c).unwrap());
    assert!(
        x2.contains("<cmdline>x&lt;/cmdline&gt;&lt;devices&gt;</cmdline>"),
        "{x2}"
    );
    assert!(x2.contains("<memory unit='KiB'>65536</memory>"), "{x2}");
}

#[test]
fn an_image_boots_from_the_first_disk_and_kvm_only_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let t = Template::parse(
        "[[volumes]]\nname = \"root\"\nsize = \"1G\"\n[[components]]\nname = \"m\"\nkind = \"vm\"\n\
         [components.vm]\nmemory = \"256M\"\nvcpus = 2\nimage = \"${vol:root}\"\nimage_format = \"qcow2\"\n",
    )
    .unwrap();
    let (rec, _) = model::record_from_template(d.path(), "t", &t, "a", &[]).unwrap();
    let mut s = Settings {
        domain_type: DomainType::Kvm,
        name_prefix: Some("x-".into()),
        ..Settings::default()
    };
    let x = domain_xml(&resolve(d.path(), &s, &rec, &t.components[0]).unwrap());
    assert!(x.starts_with("<domain type='kvm'>"), "{x}");
    assert!(
        x.contains("<name>x-a-m</name>") && x.contains("<boot dev='hd'/>"),
        "{x}"
    );
    assert!(x.contains("<driver name='qemu' type='qcow2'/>"), "{x}");
    assert!(
        x.contains("<target dev='vda' bus='virtio'/>") && !x.contains("vdb"),
        "{x}"
    );
    assert!(!x.contains("<portForward"), "{x}");
    s.domain_type = DomainType::Auto;
    assert_eq!(s.resolved_type(), if kvm_usable() { "kvm" } else { "qemu" });
}

#[test]
fn a_bad_forwarded_address_names_the_field() {
    let d = tempfile::tempdir().unwrap();
    let t = Template::parse(SAMPLE).unwrap();
    let rec = record(d.path(), &t, "vm1", "not-an-ip");
    let e = resolve(d.path(), &Settings::default(), &rec, &t.components[0]).unwrap_err();
    assert!(
        e.contains("component guest: vm.ports[0].host") && e.contains("not-an-ip:8000"),
        "{e}"
    );
}

#[test]
fn grid_settings_are_checked() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(Settings::load(d.path()).unwrap(), Settings::default());
    let w = |s: &str| std::fs::write(d.path().join("grid.toml"), s).unwrap();
    w("[vars]\ngrid = \"g1\"\n[vm]\nuri = \"qemu+ssh://h/system\"\ndomain_type = \"auto\"\n");
    let s = Settings::load(d.path()).unwrap();
    assert_eq!(
        (s.uri.as_str(), s.domain_type),
        ("qemu+ssh://h/system", DomainType::Auto)
    );
    for (bad, what) in [
        ("[vm]\nuri = \"qemu:///system; rm -rf /\"\n", "uri"),
        ("[vm]\nuri = \"nope\"\n", "uri"),
        ("[vm]\ndomain_type = \"xen\"\n", "xen"),
        ("[vm]\nname_prefix = \"a/b\"\n", "name_prefix"),
        ("[vm]\nvirsh = \"--help\"\n", "virsh"),
        ("[vm]\nbogus = 1\n", "bogus"),
    ] {
        w(bad);
        let e = Settings::load(d.path()).unwrap_err();
        assert!(e.contains("[vm]") && e.contains(what), "{bad}: {e}");
    }
}

/// Answers each call with the next scripted reply for its verb, and records the calls.
struct Fake {
    calls: RefCell<Vec<String>>,
    replies: RefCell<BTreeMap<String, VecDeque<Result<String, String>>>>,
}

impl Fake {
    fn new(script: &[(&str, Result<&str, &str>)]) -> Fake {
        let mut replies: BTreeMap<String, VecDeque<Result<String, String>>> = BTreeMap::new();
        for (verb, r) in script {
            replies
                .entry(verb.to_string())
                .or_default()
                .push_back(r.map(str::to_string).map_err(str::to_string));
        }
        Fake {
            calls: RefCell::new(Vec::new()),
            replies: RefCell::new(replies),
        }
    }
    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

impl Virsh for Fake {
    fn run(&self, args: &[&str]) -> Result<String, VirshError> {
        self.calls.borrow_mut().push(args.join(" "));
        let mut r = self.replies.borrow_mut();
        let q = r.entry(args[0].to_string()).or_default();
        // The last reply for a verb repeats.
        let reply = if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().cloned()
        };
        match reply.unwrap_or(Ok(String::new())) {
            Ok(s) => Ok(s),
            Err(message) => Err(VirshError {
                args: args.iter().map(|s| s.to_string()).collect(),
                message,
            }),
        }
    }
}

fn fake_virsh(dir: &Path, script: &str, timeout: Duration) -> VirshCli {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("virsh");
    std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    VirshCli {
        program: p.display().to_string(),
        uri: "test:///default".into(),
        timeout,
    }
}

#[test]
fn the_virsh_cli_passes_argv_and_reports_on_one_line_within_its_timeout() {
    let d = tempfile::tempdir().unwrap();
    // Each argument arrives as one word, whatever it holds.
    let v = fake_virsh(d.path(), r#"printf '%s|' "$@""#, Duration::from_secs(10));
    assert_eq!(
        v.run(&["define", "/a b/$(x);y.xml"]).unwrap(),
        "--connect|test:///default|define|/a b/$(x);y.xml|"
    );
    let v = fake_virsh(
        d.path(),
        "echo 'error: Failed to start domain' >&2; echo >&2; echo 'error: internal error: x' >&2; exit 1",
        Duration::from_secs(10),
    );
    let e = v.run(&["start", "d"]).unwrap_err();
    assert_eq!(
        e.message,
        "error: Failed to start domain; error: internal error: x"
    );
    assert_eq!(e.to_string().lines().count(), 1);
    let v = fake_virsh(d.path(), "exec sleep 5", Duration::from_millis(200));
    let t = Instant::now();
    let e = v.run(&["list"]).unwrap_err();
    assert!(e.message.contains("no answer within"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

const T: Duration = Duration::from_millis(30);
const P: Duration = Duration::from_millis(1);

#[test]
fn stop_shuts_down_by_acpi_when_the_guest_obeys() {
    let f = Fake::new(&[
        ("domstate", Ok("running\n")),
        ("domstate", Ok("running\n")),
        ("domstate", Ok("shut off\n")),
    ]);
    assert_eq!(stop(&f, "d", T, P).unwrap(), Stopped::ShutDown);
    assert_eq!(
        f.calls(),
        [
            "domstate d",
            "shutdown d --mode acpi",
            "domstate d",
            "domstate d"
        ]
    );
}

#[test]
fn stop_forces_a_guest_that_ignores_acpi_and_says_so() {
    let f = Fake::new(&[("domstate", Ok("running\n"))]);
    let Stopped::Forced { reason } = stop(&f, "d", T, P).unwrap() else {
        panic!("not forced: {:?}", f.calls());
    };
    assert!(reason.contains("did not power off within 0s"), "{reason}");
    let calls = f.calls();
    assert_eq!(calls[1], "shutdown d --mode acpi");
    assert_eq!(calls.last().unwrap(), "destroy d");
    // A failed ACPI request goes straight to the hard stop.
    let f = Fake::new(&[
        ("domstate", Ok("running\n")),
        ("shutdown", Err("error: Requested operation is not valid")),
    ]);
    let Stopped::Forced { reason } = stop(&f, "d", T, P).unwrap() else {
        panic!("not forced");
    };
    assert!(reason.contains("ACPI shutdown request failed"), "{reason}");
    assert_eq!(
        f.calls(),
        [
            "domstate d",
            "shutdown d --mode acpi",
            "domstate d",
            "destroy d"
        ]
    );
}

#[test]
fn stop_of_an_off_or_missing_domain_does_nothing() {
    let f = Fake::new(&[("domstate", Ok("shut off\n"))]);
    assert_eq!(stop(&f, "d", T, P).unwrap(), Stopped::AlreadyOff);
    assert_eq!(f.calls(), ["domstate d"]);
    let f = Fake::new(&[("domstate", Err("error: failed to get domain 'd'"))]);
    assert_eq!(stop(&f, "d", T, P).unwrap(), Stopped::AlreadyOff);
    // libvirt unreachable is an error, not "off".
    let f = Fake::new(&[(
        "domstate",
        Err("error: failed to connect to the hypervisor"),
    )]);
    let e = stop(&f, "d", T, P).unwrap_err();
    assert!(
        e.contains("failed to connect") && e.contains("virsh domstate d"),
        "{e}"
    );
}

#[test]
fn undefine_halts_first_and_tolerates_a_missing_domain() {
    let f = Fake::new(&[
        ("domstate", Ok("running\n")),
        ("domstate", Ok("shut off\n")),
    ]);
    undefine(&f, "d").unwrap();
    assert_eq!(f.calls(), ["domstate d", "destroy d", "undefine d"]);
    let f = Fake::new(&[
        ("domstate", Err("error: failed to get domain 'd'")),
        ("undefine", Err("error: failed to get domain 'd'")),
    ]);
    undefine(&f, "d").unwrap();
}

#[test]
fn define_and_start_writes_the_xml_and_starts_once() {
    let d = tempfile::tempdir().unwrap();
    let t = Template::parse(SAMPLE).unwrap();
    let rec = record(d.path(), &t, "vm1", "127.0.0.1");
    let spec = resolve(d.path(), &Settings::default(), &rec, &t.components[0]).unwrap();
    let xml = d.path().join("vm-guest.xml");
    let f = Fake::new(&[("domstate", Ok("shut off\n"))]);
    define_and_start(&f, &spec, &xml).unwrap();
    assert_eq!(std::fs::read_to_string(&xml).unwrap(), domain_xml(&spec));
    let x = xml.to_string_lossy();
    assert_eq!(
        f.calls(),
        [
            format!("define {x}"),
            "domstate gridctl-vm1-guest".into(),
            "start gridctl-vm1-guest".into()
        ]
    );
    let f = Fake::new(&[("define", Err("error: XML error: bad"))]);
    let e = define_and_start(&f, &spec, &xml).unwrap_err();
    assert!(e.contains("virsh define") && e.contains("XML error"), "{e}");
}
