//! A VM's domain: its template component substituted into a [`Spec`], and the libvirt domain
//! XML of that spec, every path and address escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{domain_name, Settings};
use crate::model::{self, AppRecord, Vars};
use crate::template::{ComponentTemplate, ImageFormat};
use crate::util;

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
pub(super) fn esc(s: &str) -> String {
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
