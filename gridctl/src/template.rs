//! Templates: data files in `STATE/templates/NAME.toml` from which applications are provisioned.
//! The format is documented in the crate docs; [`Template::load`] validates it and names the file
//! and field in every error.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::util;

/// A volume's kind: a sparse file, or a directory (e.g. a configuration volume).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    #[default]
    File,
    Dir,
}

impl VolumeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::File => "file",
            VolumeKind::Dir => "dir",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeTemplate {
    pub name: String,
    #[serde(default)]
    pub kind: VolumeKind,
    /// Size of a `file` volume, e.g. `"64M"` or `"${data_size}"`.
    #[serde(default)]
    pub size: String,
    /// A path copied into a `dir` volume when the application is provisioned.
    #[serde(default)]
    pub init_from: Option<String>,
}

fn default_ready_timeout() -> u64 {
    30
}

fn default_stop_timeout() -> u64 {
    10
}

fn default_restart_delay() -> u64 {
    1000
}

/// What the grid does when a component of a running application exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// The application stays `failed` until someone starts it.
    #[default]
    Never,
    /// The grid starts the application again, after a delay that doubles with each restart, at
    /// most [`MAX_RESTARTS`] times in a row (a start by anyone else resets the count).
    OnFailure,
}

/// The most automatic restarts in a row before an application is left `failed`.
pub const MAX_RESTARTS: u32 = 5;

/// What a component is: a process the daemon spawns, or a libvirt virtual machine (see
/// [`crate::vm`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    #[default]
    Process,
    Vm,
}

impl ComponentKind {
    fn is_process(&self) -> bool {
        *self == ComponentKind::Process
    }
}

/// A VM disk image's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// A TCP port of the guest forwarded from an address of the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// `IP:PORT` on the host, substituted (e.g. `"${web_ip}:8000"`).
    pub host: String,
    /// The guest's port.
    pub guest: u16,
}

fn default_vcpus() -> u32 {
    1
}

/// The machine of a `kind = "vm"` component. Boots either a kernel (with an optional initrd and
/// command line) or a disk image; its `disks` are the application's file volumes, attached as
/// raw virtio disks in order, so they stay volumes that export and import move unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmTemplate {
    /// Memory, e.g. `"128M"` (binary units, substituted).
    pub memory: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A disk image to boot from (attached first); put it in a volume (`${vol:root}`) for it to
    /// travel with the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub image_format: ImageFormat,
    /// Names of the application's `file` volumes attached as disks (`vda`, `vdb`, … after the image).
    #[serde(default)]
    pub disks: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
}

/// The most disks a VM may attach (`vda` … `vdz`, the image included).
pub const MAX_VM_DISKS: usize = 26;

/// One component of an application: a process, or a VM (`kind = "vm"`). Kept verbatim in the
/// descriptor and substituted at each start, so a `config` change takes effect at the next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentTemplate {
    pub name: String,
    /// `process` (default) or `vm`.
    #[serde(default, skip_serializing_if = "ComponentKind::is_process")]
    pub kind: ComponentKind,
    /// The argument vector (never a shell line), each word substituted; processes only.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `HOST:PORT` that must accept TCP before the application is `running`.
    #[serde(default)]
    pub ready: Option<String>,
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_secs: u64,
    /// How long `stop` waits after SIGTERM (a VM: after the ACPI shutdown request) before SIGKILL
    /// (a VM: before it is forced off).
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
    /// `never` (default) or `on-failure`.
    #[serde(default)]
    pub restart: Restart,
    /// The delay before the first automatic restart; it doubles with each one, up to 30 s.
    #[serde(default = "default_restart_delay")]
    pub restart_delay_ms: u64,
    /// The machine, for `kind = "vm"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmTemplate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    #[serde(default)]
    pub description: String,
    /// Properties that must be non-empty when the application is provisioned.
    #[serde(default)]
    pub required: Vec<String>,
    /// Every property the application accepts, with its default.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Properties whose values no listing, log or error shows (`app info` prints `***`).
    #[serde(default)]
    pub secret: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<VolumeTemplate>,
    #[serde(default)]
    pub components: Vec<ComponentTemplate>,
}

impl Template {
    /// Reads and validates `STATE/templates/NAME.toml`.
    pub fn load(state: &Path, name: &str) -> Result<Template, String> {
        let path = state.join("templates").join(format!("{name}.toml"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("no template named {name} on this grid"))
            }
            Err(e) => return Err(format!("cannot read template {}: {e}", path.display())),
        };
        Template::parse(&text).map_err(|e| format!("template {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Template, String> {
        let t: Template = toml::from_str(text).map_err(|e| e.to_string())?;
        t.validate()?;
        Ok(t)
    }

    fn validate(&self) -> Result<(), String> {
        for (k, v) in &self.properties {
            dialect::Prop::new(k, v).map_err(|e| format!("properties.{k}: {e}"))?;
        }
        for r in &self.required {
            if !self.properties.contains_key(r) {
                return Err(format!(
                    "required property {r} is not declared in [properties]"
                ));
            }
        }
        for s in &self.secret {
            if !self.properties.contains_key(s) {
                return Err(format!(
                    "secret property {s} is not declared in [properties]"
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.volumes {
            dialect::AppName::new(&v.name).map_err(|e| format!("volumes: {e}"))?;
            if !seen.insert(&v.name) {
                return Err(format!("volume {} declared twice", v.name));
            }
            if v.kind == VolumeKind::File && v.size.is_empty() {
                return Err(format!("volume {}: a file volume needs a size", v.name));
            }
            if v.kind == VolumeKind::File && v.init_from.is_some() {
                return Err(format!(
                    "volume {}: init_from is only for dir volumes",
                    v.name
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.components {
            dialect::AppName::new(&c.name).map_err(|e| format!("components: {e}"))?;
            if !seen.insert(&c.name) {
                return Err(format!("component {} declared twice", c.name));
            }
            match c.kind {
                ComponentKind::Process => {
                    if c.vm.is_some() {
                        return Err(format!(
                            "component {}: a vm table needs kind = \"vm\"",
                            c.name
                        ));
                    }
                    if c.command.is_empty() {
                        return Err(format!("component {}: empty command", c.name));
                    }
                }
                ComponentKind::Vm => self
                    .validate_vm(c)
                    .map_err(|e| format!("component {}: {e}", c.name))?,
            }
        }
        Ok(())
    }

    /// Checks a `kind = "vm"` component; errors name the field (`vm.disks`, …).
    fn validate_vm(&self, c: &ComponentTemplate) -> Result<(), String> {
        let Some(vm) = &c.vm else {
            return Err(
                "kind = \"vm\" needs a [components.vm] table (memory, kernel or image)".into(),
            );
        };
        if !c.command.is_empty() || !c.env.is_empty() {
            return Err("command and env are for processes; a vm has none".into());
        }
        if vm.memory.is_empty() {
            return Err("vm.memory: empty (e.g. \"128M\")".into());
        }
        if !vm.memory.contains("${") {
            let m = util::parse_size(&vm.memory).map_err(|e| format!("vm.memory: {e}"))?;
            if m < MIN_VM_MEMORY {
                return Err(format!("vm.memory: {} is less than 16M", vm.memory));
            }
        }
        if !(1..=64).contains(&vm.vcpus) {
            return Err(format!("vm.vcpus: {} is not between 1 and 64", vm.vcpus));
        }
        match (&vm.kernel, &vm.image) {
            (Some(_), Some(_)) => {
                return Err("vm.kernel and vm.image: boot one or the other, not both".into())
            }
            (None, None) => return Err("vm: needs a kernel or an image to boot".into()),
            (None, Some(_)) if vm.initrd.is_some() || vm.cmdline.is_some() => {
                return Err("vm.initrd and vm.cmdline go with vm.kernel, not vm.image".into())
            }
            _ => {}
        }
        for (k, v) in [
            ("kernel", &vm.kernel),
            ("initrd", &vm.initrd),
            ("image", &vm.image),
        ] {
            if v.as_ref().is_some_and(|p| p.is_empty()) {
                return Err(format!("vm.{k}: empty path"));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &vm.disks {
            match self.volumes.iter().find(|v| &v.name == d) {
                None => return Err(format!("vm.disks: no volume named {d}")),
                Some(v) if v.kind != VolumeKind::File => {
                    return Err(format!(
                        "vm.disks: volume {d} is a dir; a disk is a file volume"
                    ))
                }
                _ => {}
            }
            if !seen.insert(d) {
                return Err(format!("vm.disks: {d} attached twice"));
            }
        }
        if vm.disks.len() + usize::from(vm.image.is_some()) > MAX_VM_DISKS {
            return Err(format!("vm.disks: more than {MAX_VM_DISKS} disks"));
        }
        for (i, p) in vm.ports.iter().enumerate() {
            if p.host.is_empty() {
                return Err(format!("vm.ports[{i}].host: empty (IP:PORT)"));
            }
            if p.guest == 0 {
                return Err(format!("vm.ports[{i}].guest: 0 is not a port"));
            }
        }
        Ok(())
    }
}

/// The least memory a VM may have: less does not boot a Linux kernel.
const MIN_VM_MEMORY: u64 = 16 << 20;

/// The built-in `kvstore` template: a small HTTP key-value store on its `data` volume.
pub const KVSTORE: &str = r#"description = "A small HTTP key-value store (PUT/GET /kv/KEY) on its data volume"
required = ["in_ip"]

[properties]
in_ip = ""
port = "8000"
data_size = "64M"

[[volumes]]
name = "data"
size = "${data_size}"

[[components]]
name = "kv"
command = ["${gridctl}", "kvstore", "--listen", "${in_ip}:${port}", "--data", "${vol:data}"]
ready = "${in_ip}:${port}"
"#;

/// The built-in `MigHelper` template: runs `mig helper` (`${mig_bin}` comes from `STATE/grid.toml`).
pub const MIG_HELPER: &str = r#"description = "MIG's helper application: runs `mig helper` for one operation"
required = ["in_ip"]
# The operation's key and credentials: `app info` shows `***`.
secret = ["env"]

[properties]
in_ip = ""
out_ip = ""
netmask = ""
gateway = ""
env = ""

[[volumes]]
name = "state"
kind = "dir"

[[components]]
name = "helper"
command = ["${mig_bin}", "helper", "--set", "listen=${in_ip}", "--set", "port_no=8080", "--set", "state_dir=${vol:state}"]
env = { MIG_HELPER_ENV = "${env}" }
ready = "${in_ip}:8080"
# A MigHelper that dies mid-operation (the source stopped, the copy half done) must not leave the
# application down until an operator notices: started again, it resumes from its journal.
restart = "on-failure"
"#;

#[cfg(test)]
mod tests;
