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
//!
//! By concern: [`domain`] turns a component into a domain XML, [`virsh`] drives libvirt; this
//! file holds the grid's settings and what the daemon calls per application.

mod domain;
#[cfg(test)]
mod tests;
mod virsh;

pub use domain::{domain_uuid, domain_xml, resolve, Boot, Spec};
pub use virsh::{
    define_and_start, domstate, halt, stop, undefine, Stopped, Virsh, VirshCli, VirshError,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{self, AppRecord};
use crate::template::{ComponentKind, ComponentTemplate};

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
