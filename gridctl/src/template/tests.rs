use super::*;

#[test]
fn builtin_templates_parse() {
    let k = Template::parse(KVSTORE).unwrap();
    assert_eq!(k.properties["port"], "8000");
    assert_eq!(k.volumes[0].size, "${data_size}");
    let m = Template::parse(MIG_HELPER).unwrap();
    assert_eq!(m.volumes[0].kind, VolumeKind::Dir);
    assert_eq!(m.components[0].env["MIG_HELPER_ENV"], "${env}");
    assert_eq!(m.components[0].restart, Restart::OnFailure);
    assert_eq!(k.components[0].restart, Restart::Never);
    assert_eq!(m.secret, ["env"]);
    assert!(k.secret.is_empty());
}

#[test]
fn bad_templates_say_what_is_wrong() {
    let e = Template::parse("[[volumes]]\nname = \"d\"\n").unwrap_err();
    assert!(e.contains("needs a size"), "{e}");
    let e = Template::parse("required = [\"x\"]\n").unwrap_err();
    assert!(e.contains("required property x"), "{e}");
    let e = Template::parse("secret = [\"x\"]\n").unwrap_err();
    assert!(e.contains("secret property x"), "{e}");
    let e = Template::parse("bogus = 1\n").unwrap_err();
    assert!(e.contains("bogus"), "{e}");
    let e = Template::parse("[[components]]\nname = \"c\"\ncommand = []\n").unwrap_err();
    assert!(e.contains("empty command"), "{e}");
    let e =
        Template::parse("[[components]]\nname = \"c\"\ncommand = [\"x\"]\nrestart = \"always\"\n")
            .unwrap_err();
    assert!(e.contains("always") && e.contains("on-failure"), "{e}");
}

#[test]
fn bad_vm_components_name_the_field() {
    let base = "[[volumes]]\nname = \"data\"\nsize = \"1G\"\n[[volumes]]\nname = \"cfg\"\nkind = \"dir\"\n\
                    [[components]]\nname = \"guest\"\nkind = \"vm\"\n";
    let vm = |extra: &str, table: &str| format!("{base}{extra}[components.vm]\n{table}");
    let ok = "memory = \"128M\"\nkernel = \"/k\"\ninitrd = \"/i\"\ndisks = [\"data\"]\n\
                  ports = [{ host = \"${x}:80\", guest = 80 }]\n";
    let t = Template::parse(&vm("", ok)).unwrap();
    assert_eq!(t.components[0].kind, ComponentKind::Vm);
    assert_eq!(t.components[0].vm.as_ref().unwrap().vcpus, 1);
    // The daemon restarts a VM that died, as it restarts a process.
    let r = Template::parse(&vm("restart = \"on-failure\"\n", ok)).unwrap();
    assert_eq!(r.components[0].restart, Restart::OnFailure);
    for (text, want) in [
        (base.to_string(), "needs a [components.vm] table"),
        (
            vm("command = [\"x\"]\n", ok),
            "command and env are for processes",
        ),
        (vm("", "memory = \"lots\"\nkernel = \"/k\"\n"), "vm.memory"),
        (
            vm("", "memory = \"1M\"\nkernel = \"/k\"\n"),
            "vm.memory: 1M is less than 16M",
        ),
        (
            vm("", "memory = \"\"\nkernel = \"/k\"\n"),
            "vm.memory: empty",
        ),
        (
            vm("", "memory = \"128M\"\nvcpus = 0\nkernel = \"/k\"\n"),
            "vm.vcpus",
        ),
        (vm("", "memory = \"128M\"\n"), "needs a kernel or an image"),
        (
            vm("", "memory = \"128M\"\nkernel = \"/k\"\nimage = \"/i\"\n"),
            "not both",
        ),
        (
            vm("", "memory = \"128M\"\nimage = \"/i\"\ncmdline = \"x\"\n"),
            "go with vm.kernel",
        ),
        (
            vm("", "memory = \"128M\"\nkernel = \"\"\n"),
            "vm.kernel: empty path",
        ),
        (
            vm(
                "",
                "memory = \"128M\"\nkernel = \"/k\"\ndisks = [\"nope\"]\n",
            ),
            "vm.disks: no volume named nope",
        ),
        (
            vm(
                "",
                "memory = \"128M\"\nkernel = \"/k\"\ndisks = [\"cfg\"]\n",
            ),
            "vm.disks: volume cfg is a dir",
        ),
        (
            vm(
                "",
                "memory = \"128M\"\nkernel = \"/k\"\ndisks = [\"data\", \"data\"]\n",
            ),
            "attached twice",
        ),
        (
            vm(
                "",
                "memory = \"128M\"\nkernel = \"/k\"\nports = [{ host = \"\", guest = 80 }]\n",
            ),
            "vm.ports[0].host",
        ),
        (
            vm(
                "",
                "memory = \"128M\"\nkernel = \"/k\"\nports = [{ host = \"a:1\", guest = 0 }]\n",
            ),
            "vm.ports[0].guest",
        ),
        (
            vm("", "memory = \"128M\"\nkernel = \"/k\"\nbogus = 1\n"),
            "bogus",
        ),
        (
            format!("[[components]]\nname = \"p\"\ncommand = [\"x\"]\n[components.vm]\n{ok}"),
            "needs kind = \"vm\"",
        ),
    ] {
        let e = Template::parse(&text).unwrap_err();
        assert!(e.contains(want), "{text}\n=> {e}");
        if !want.contains("bogus") && !want.contains("kind") {
            assert!(e.contains("component guest: "), "{e}");
        }
    }
}

#[test]
fn process_components_serialize_as_before() {
    // Descriptors written before VMs existed must read back, and a process keeps its shape.
    let k = Template::parse(KVSTORE).unwrap();
    let json = serde_json::to_string(&k.components[0]).unwrap();
    assert!(!json.contains("kind") && !json.contains("\"vm\""), "{json}");
    let back: ComponentTemplate = serde_json::from_str(&json).unwrap();
    assert_eq!(back, k.components[0]);
}

#[test]
fn the_vmapp_demo_template_parses() {
    let t = Template::parse(include_str!("../../../conf/templates/vmapp.toml")).unwrap();
    let web = &t.components[0];
    assert_eq!(web.kind, ComponentKind::Vm);
    assert_eq!(web.vm.as_ref().unwrap().disks, ["data"]);
    assert_eq!(t.components[1].kind, ComponentKind::Process);
}
