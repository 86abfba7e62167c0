//! `kind = "vm"` components: libvirt domains that gridctl defines, starts, stops and undefines
//! through the `virsh` CLI (a small surface with clear errors, against any libvirt the host has).
//!
//! Every `virsh` call is one argument vector, never a shell line, with a bounded wait. Domain
//! names are built from validated parts (the grid's prefix, the application's and component's
//! names), and every path and address in the domain XML is escaped.
//!
//! The domain is (re)defined at each start from the descriptor, so a `config` change applies at
//! the next start and an imported application is defined where it lands; it is undefined on
//! destroy. A stop asks the guest to power off by ACPI, waits up to the component's
//! `stop_timeout_secs`, then forces it off and says so.
//!
//! Grid settings, in `STATE/grid.toml`:
//!
//! ```toml
//! [vm]
//! uri = "qemu:///system"       # the libvirt connection
//! domain_type = "qemu"         # qemu (software emulation, the default), kvm, or auto:
//!                              # kvm only where /dev/kvm opens and the CPU has vmx or svm
//! virsh = "virsh"              # the virsh executable
//! name_prefix = "gridctl-g1-"  # default: gridctl-${grid}- (vars.grid), else gridctl-
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::model::{self, AppRecord, Vars};
use crate::template::{ComponentKind, ComponentTemplate, ImageFormat};
use crate::util;

/// The domain type a grid's VMs run with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// QEMU's software emulation: works everywhere, the default.
    #[default]
    Qemu,
    Kvm,
    /// `kvm` where it works (see [`kvm_usable`]), else `qemu`.
    Auto,
}

/// The `[vm]` table of `STATE/grid.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub uri: String,
    pub domain_type: DomainType,
    pub virsh: String,
    pub name_prefix: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            uri: "qemu:///system".into(),
            domain_type: DomainType::Qemu,
            virsh: "virsh".into(),
            name_prefix: None,
        }
    }
}

impl Settings {
    /// Reads `[vm]` from `STATE/grid.toml` (defaults when absent); errors name the field.
    pub fn load(state: &Path) -> Result<Settings, String> {
        #[derive(Deserialize, Default)]
        struct GridToml {
            #[serde(default)]
            vm: Option<toml::Value>,
        }
        let path = state.join("grid.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let g: GridToml = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let s = match g.vm {
            None => Settings::default(),
            Some(v) => {
                Settings::deserialize(v).map_err(|e| format!("{} [vm]: {e}", path.display()))?
            }
        };
        s.validate()
            .map_err(|e| format!("{} [vm]: {e}", path.display()))?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        if self.uri.is_empty()
            || !self.uri.contains(":/")
            || self
                .uri
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "uri: {:?} is not a libvirt URI (e.g. qemu:///system)",
                self.uri
            ));
        }
        if self.virsh.is_empty() || self.virsh.starts_with('-') {
            return Err(format!("virsh: {:?} is not an executable", self.virsh));
        }
        if let Some(p) = &self.name_prefix {
            if !p.chars().all(name_char) {
                return Err(format!(
                    "name_prefix: {p:?} may hold only letters, digits, '-', '_' and '.'"
                ));
            }
        }
        Ok(())
    }

    /// The prefix of this grid's domain names: grids sharing one libvirt must not collide.
    fn prefix(&self, grid_vars: &BTreeMap<String, String>) -> String {
        if let Some(p) = &self.name_prefix {
            return p.clone();
        }
        match grid_vars.get("grid") {
            Some(g) if !g.is_empty() && g.chars().all(name_char) => format!("gridctl-{g}-"),
            _ => "gridctl-".into(),
        }
    }

    /// The domain type to write: `auto` resolved on this host.
    pub fn resolved_type(&self) -> &'static str {
        match self.domain_type {
            DomainType::Qemu => "qemu",
            DomainType::Kvm => "kvm",
            DomainType::Auto if kvm_usable() => "kvm",
            DomainType::Auto => "qemu",
        }
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Hardware virtualisation is usable: the CPU has vmx or svm and `/dev/kvm` opens read-write.
pub fn kvm_usable() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    cpu && std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The libvirt domain name of component `component` of application `app`.
pub fn domain_name(
    settings: &Settings,
    grid_vars: &BTreeMap<String, String>,
    app: &str,
    component: &str,
) -> String {
    format!("{}{app}-{component}", settings.prefix(grid_vars))
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
    },
    /// The image is the first disk.
    Image,
}

/// One VM, substituted and checked: everything the domain XML says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The component's name in the template.
    pub component: String,
    /// The libvirt domain's name.
    pub name: String,
    pub domain_type: &'static str,
    pub memory_kib: u64,
    pub vcpus: u32,
    pub boot: Boot,
    /// In attachment order (`vda`, `vdb`, …).
    pub disks: Vec<(PathBuf, ImageFormat)>,
    /// (host address, guest port).
    pub ports: Vec<(SocketAddr, u16)>,
    /// Where the guest's serial console is written.
    pub console_log: PathBuf,
}

/// Substitutes component `c` of `rec` into a [`Spec`]; errors name the component and field.
pub fn resolve(
    state: &Path,
    settings: &Settings,
    rec: &AppRecord,
    c: &ComponentTemplate,
) -> Result<Spec, String> {
    let vm =
        c.vm.as_ref()
            .ok_or_else(|| format!("component {}: kind vm without a vm table", c.name))?;
    let grid = model::grid_vars(state);
    let vars = Vars {
        state,
        app: &rec.name,
        props: &rec.props,
        grid: grid.clone(),
    };
    let sub = |field: &str, s: &str| {
        vars.subst(s)
            .map_err(|e| format!("component {}: vm.{field}: {e}", c.name))
    };
    let path = |field: &str, s: &str| -> Result<PathBuf, String> {
        let p = PathBuf::from(sub(field, s)?);
        if !p.is_absolute() {
            return Err(format!(
                "component {}: vm.{field}: {} is not an absolute path",
                c.name,
                p.display()
            ));
        }
        Ok(p)
    };
    let memory = util::parse_size(&sub("memory", &vm.memory)?)
        .map_err(|e| format!("component {}: vm.memory: {e}", c.name))?;
    let dir = model::app_dir(state, &rec.name);
    let mut disks = Vec::new();
    let boot = match (&vm.kernel, &vm.image) {
        (Some(k), _) => Boot::Kernel {
            kernel: path("kernel", k)?,
            initrd: vm
                .initrd
                .as_deref()
                .map(|i| path("initrd", i))
                .transpose()?,
            cmdline: vm
                .cmdline
                .as_deref()
                .map(|s| sub("cmdline", s))
                .transpose()?,
        },
        (None, Some(i)) => {
            disks.push((path("image", i)?, vm.image_format));
            Boot::Image
        }
        (None, None) => return Err(format!("component {}: vm: no kernel or image", c.name)),
    };
    for d in &vm.disks {
        if !rec.volumes.iter().any(|v| &v.name == d) {
            return Err(format!(
                "component {}: vm.disks: no volume named {d}",
                c.name
            ));
        }
        disks.push((model::volume_path(&dir, d), ImageFormat::Raw));
    }
    let mut ports = Vec::new();
    for (i, p) in vm.ports.iter().enumerate() {
        let field = format!("ports[{i}].host");
        let h = sub(&field, &p.host)?;
        let addr: SocketAddr = h
            .parse()
            .map_err(|_| format!("component {}: vm.{field}: {h:?} is not IP:PORT", c.name))?;
        ports.push((addr, p.guest));
    }
    Ok(Spec {
        component: c.name.clone(),
        name: domain_name(settings, &grid, &rec.name, &c.name),
        domain_type: settings.resolved_type(),
        memory_kib: memory / 1024,
        vcpus: vm.vcpus,
        boot,
        disks,
        ports,
        console_log: dir.join(format!("console-{}.log", c.name)),
    })
}

/// A UUID that is a function of the domain's name: libvirt refuses to redefine a domain under a
/// new UUID, and gridctl redefines it at each start.
pub fn domain_uuid(name: &str) -> String {
    let h = blake3::hash(format!("gridctl vm domain {name}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    // RFC 4122 version 4 and variant bits, as libvirt generates them.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `s` escaped for XML text and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

fn esc_path(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

/// The libvirt domain XML of `spec`: user networking through passt with its port forwards, raw
/// virtio disks, ACPI (so that a stop can ask the guest), the serial console to a file.
pub fn domain_xml(spec: &Spec) -> String {
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{}'>", spec.domain_type);
    let _ = writeln!(x, "  <name>{}</name>", esc(&spec.name));
    let _ = writeln!(x, "  <uuid>{}</uuid>", domain_uuid(&spec.name));
    let _ = writeln!(x, "  <memory unit='KiB'>{}</memory>", spec.memory_kib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", spec.vcpus);
    x.push_str("  <os>\n    <type>hvm</type>\n");
    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let _ = writeln!(x, "    <kernel>{}</kernel>", esc_path(kernel));
            if let Some(i) = initrd {
                let _ = writeln!(x, "    <initrd>{}</initrd>", esc_path(i));
            }
            if let Some(c) = cmdline {
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(c));
            }
        }
        Boot::Image => x.push_str("    <boot dev='hd'/>\n"),
    }
    x.push_str("  </os>\n  <features>\n    <acpi/>\n  </features>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n");
    x.push_str("  <on_crash>destroy</on_crash>\n  <devices>\n");
    for (i, (path, format)) in spec.disks.iter().enumerate() {
        let dev = format!("vd{}", (b'a' + i as u8) as char);
        let _ = write!(
            x,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      \
             <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
            format.as_str(),
            esc_path(path)
        );
    }
    x.push_str("    <interface type='user'>\n      <backend type='passt'/>\n");
    // One portForward per host address, its ports as ranges of one.
    let mut by_addr: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
    for (h, g) in &spec.ports {
        by_addr
            .entry(h.ip().to_string())
            .or_default()
            .push((h.port(), *g));
    }
    for (addr, ranges) in by_addr {
        let _ = writeln!(
            x,
            "      <portForward proto='tcp' address='{}'>",
            esc(&addr)
        );
        for (h, g) in ranges {
            let _ = writeln!(x, "        <range start='{h}' to='{g}'/>");
        }
        x.push_str("      </portForward>\n");
    }
    x.push_str("      <model type='virtio'/>\n    </interface>\n");
    let _ = write!(
        x,
        "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n",
        esc_path(&spec.console_log)
    );
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// A failed `virsh` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirshError {
    pub args: Vec<String>,
    pub message: String,
}

impl VirshError {
    /// libvirt has no such domain (already undefined, or never defined here).
    pub fn no_domain(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        m.contains("failed to get domain") || m.contains("domain not found")
    }
}

impl std::fmt::Display for VirshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "virsh {}: {}", self.args.join(" "), self.message)
    }
}

/// Runs one `virsh` command; a test stands in with a fake.
pub trait Virsh {
    fn run(&self, args: &[&str]) -> Result<String, VirshError>;
}

/// The real `virsh`, on the grid's libvirt URI, each call bounded by `timeout`.
pub struct VirshCli {
    pub program: String,
    pub uri: String,
    pub timeout: Duration,
}

impl VirshCli {
    pub fn new(settings: &Settings) -> VirshCli {
        VirshCli {
            program: settings.virsh.clone(),
            uri: settings.uri.clone(),
            timeout: Duration::from_secs(60),
        }
    }
}

impl Virsh for VirshCli {
    fn run(&self, args: &[&str]) -> Result<String, VirshError> {
        let fail = |message: String| VirshError {
            args: args.iter().map(|s| s.to_string()).collect(),
            message,
        };
        let mut child = Command::new(&self.program)
            .arg("--connect")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.program)))?;
        // Read both pipes on threads so that a chatty virsh cannot block on a full pipe.
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_string(&mut s);
            }
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "no answer within {}s (is libvirtd running at {}?)",
                        self.timeout.as_secs(),
                        self.uri
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(fail(e.to_string())),
            }
        };
        let out = out_t.join().unwrap_or_default();
        let err = err_t.join().unwrap_or_default();
        if status.success() {
            Ok(out)
        } else {
            // One line: the message ends up in `app info --batch`, one KEY\tVALUE per line.
            let msg: Vec<&str> = err
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            Err(fail(if msg.is_empty() {
                status.to_string()
            } else {
                msg.join("; ")
            }))
        }
    }
}

/// libvirt's state of a domain, as `virsh domstate` names it; `None` when it is not defined.
pub fn domstate(v: &dyn Virsh, name: &str) -> Result<Option<String>, VirshError> {
    match v.run(&["domstate", name]) {
        Ok(s) => Ok(Some(s.lines().next().unwrap_or("").trim().to_string())),
        Err(e) if e.no_domain() => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_off(state: &Option<String>) -> bool {
    matches!(state.as_deref(), None | Some("shut off") | Some("crashed"))
}

/// Writes the domain XML beside the application and (re)defines and starts the domain.
pub fn define_and_start(v: &dyn Virsh, spec: &Spec, xml_path: &Path) -> Result<(), String> {
    util::write_atomic(xml_path, domain_xml(spec).as_bytes())
        .map_err(|e| format!("writing {}: {e}", xml_path.display()))?;
    let xml = xml_path.to_string_lossy();
    v.run(&["define", &xml]).map_err(|e| e.to_string())?;
    if !is_off(&domstate(v, &spec.name).map_err(|e| e.to_string())?) {
        return Ok(());
    }
    v.run(&["start", &spec.name]).map_err(|e| e.to_string())?;
    Ok(())
}

/// How a VM came to be off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running (or not defined).
    AlreadyOff,
    /// The guest powered off after the ACPI request.
    ShutDown,
    /// It did not within the wait, or refused the request, and was forced off.
    Forced { reason: String },
}

/// ACPI shutdown, a wait of at most `timeout` (polling every `poll`), then a hard stop.
pub fn stop(
    v: &dyn Virsh,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<Stopped, String> {
    if is_off(&domstate(v, name).map_err(|e| e.to_string())?) {
        return Ok(Stopped::AlreadyOff);
    }
    let reason = match v.run(&["shutdown", name, "--mode", "acpi"]) {
        Err(e) => format!("the ACPI shutdown request failed ({e})"),
        Ok(_) => {
            let deadline = Instant::now() + timeout;
            loop {
                if is_off(&domstate(v, name).map_err(|e| e.to_string())?) {
                    return Ok(Stopped::ShutDown);
                }
                if Instant::now() >= deadline {
                    break format!(
                        "it did not power off within {}s of the ACPI request",
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(poll);
            }
        }
    };
    halt(v, name)?;
    Ok(Stopped::Forced { reason })
}

/// Forces the domain off, if it runs.
pub fn halt(v: &dyn Virsh, name: &str) -> Result<(), String> {
    if is_off(&domstate(v, name).map_err(|e| e.to_string())?) {
        return Ok(());
    }
    match v.run(&["destroy", name]) {
        Ok(_) => Ok(()),
        // It went off by itself meanwhile.
        Err(_) if is_off(&domstate(v, name).map_err(|e| e.to_string())?) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Forces the domain off and removes its definition; a domain already gone is fine.
pub fn undefine(v: &dyn Virsh, name: &str) -> Result<(), String> {
    halt(v, name)?;
    match v.run(&["undefine", name]) {
        Err(e) if !e.no_domain() => Err(e.to_string()),
        _ => Ok(()),
    }
}

/// The VM components of an application, with their domain names.
pub fn vm_components<'a>(
    state: &Path,
    settings: &Settings,
    app: &str,
    components: &'a [ComponentTemplate],
) -> Vec<(&'a ComponentTemplate, String)> {
    let grid = model::grid_vars(state);
    components
        .iter()
        .filter(|c| c.kind == ComponentKind::Vm)
        .map(|c| (c, domain_name(settings, &grid, app, &c.name)))
        .collect()
}

/// Where the domain XML of component `component` is written.
pub fn xml_path(state: &Path, app: &str, component: &str) -> PathBuf {
    model::app_dir(state, app).join(format!("vm-{component}.xml"))
}

/// Does any of these components run as a VM? (Applications without one never call virsh.)
pub fn has_vm(components: &[ComponentTemplate]) -> bool {
    components.iter().any(|c| c.kind == ComponentKind::Vm)
}

/// The grid's settings and each VM of `rec`, substituted: done before anything of a start runs,
/// so that a bad template or setting fails it cleanly. `None` for an application without VMs.
pub fn prepare(state: &Path, rec: &AppRecord) -> Result<Option<(Settings, Vec<Spec>)>, String> {
    if !has_vm(&rec.components) {
        return Ok(None);
    }
    let settings = Settings::load(state)?;
    let specs = rec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Vm)
        .map(|c| resolve(state, &settings, rec, c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((settings, specs)))
}

/// Defines and starts every prepared VM of `app`, in order.
pub fn start_all(
    state: &Path,
    app: &str,
    settings: &Settings,
    specs: &[Spec],
) -> Result<(), String> {
    let v = VirshCli::new(settings);
    for spec in specs {
        let c = &spec.component;
        define_and_start(&v, spec, &xml_path(state, app, c)).map_err(|e| format!("vm {c}: {e}"))?;
    }
    Ok(())
}

/// Stops every VM of `app` (ACPI, bounded wait, forced); one line per VM that was running, saying
/// how it stopped.
pub fn stop_all(
    state: &Path,
    app: &str,
    components: &[ComponentTemplate],
) -> Result<String, String> {
    let settings = Settings::load(state)?;
    let v = VirshCli::new(&settings);
    let mut out = String::new();
    for (c, name) in vm_components(state, &settings, app, components) {
        let t = Duration::from_secs(c.stop_timeout_secs);
        match stop(&v, &name, t, Duration::from_millis(200))
            .map_err(|e| format!("vm {}: {e}", c.name))?
        {
            Stopped::AlreadyOff => {}
            Stopped::ShutDown => out.push_str(&format!("vm {} shut down\n", c.name)),
            Stopped::Forced { reason } => {
                out.push_str(&format!("vm {} forced off: {reason}\n", c.name))
            }
        }
    }
    Ok(out)
}

/// Forces every VM of `app` off (a run that failed, or a grid going down).
pub fn halt_all(state: &Path, app: &str, components: &[ComponentTemplate]) -> Result<(), String> {
    let settings = Settings::load(state)?;
    let v = VirshCli::new(&settings);
    for (c, name) in vm_components(state, &settings, app, components) {
        halt(&v, &name).map_err(|e| format!("vm {}: {e}", c.name))?;
    }
    Ok(())
}

/// Forces every VM of `app` off and removes its definition (destroy).
pub fn undefine_all(
    state: &Path,
    app: &str,
    components: &[ComponentTemplate],
) -> Result<(), String> {
    let settings = Settings::load(state)?;
    let v = VirshCli::new(&settings);
    for (c, name) in vm_components(state, &settings, app, components) {
        undefine(&v, &name).map_err(|e| format!("vm {}: {e}", c.name))?;
    }
    Ok(())
}

/// The first VM of `app` that is not running, with libvirt's word for its state.
pub fn first_down(
    state: &Path,
    app: &str,
    components: &[ComponentTemplate],
) -> Result<Option<(String, String)>, String> {
    let settings = Settings::load(state)?;
    let v = VirshCli::new(&settings);
    for (c, name) in vm_components(state, &settings, app, components) {
        match domstate(&v, &name).map_err(|e| format!("vm {}: {e}", c.name))? {
            Some(s) if s == "running" || s == "paused" || s == "in shutdown" => {}
            other => {
                return Ok(Some((
                    c.name.clone(),
                    other.unwrap_or_else(|| "not defined".into()),
                )))
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::Template;
    use std::cell::RefCell;
    use std::collections::VecDeque;

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
        let vdb = format!(
            "<source file='{st}/apps/vm1/vols/logs'/>\n      <target dev='vdb' bus='virtio'/>"
        );
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
}
