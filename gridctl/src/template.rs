//! Templates: data files in `STATE/templates/NAME.toml` from which applications are provisioned.
//! The format is documented in the crate docs; [`Template::load`] validates it and names the file
//! and field in every error.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

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

/// One process of an application. Kept verbatim in the descriptor and substituted at each start,
/// so a `config` change takes effect at the next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentTemplate {
    pub name: String,
    /// The argument vector (never a shell line), each word substituted.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `HOST:PORT` that must accept TCP before the application is `running`.
    #[serde(default)]
    pub ready: Option<String>,
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_secs: u64,
    /// How long `stop` waits after SIGTERM before SIGKILL.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
    /// `never` (default) or `on-failure`.
    #[serde(default)]
    pub restart: Restart,
    /// The delay before the first automatic restart; it doubles with each one, up to 30 s.
    #[serde(default = "default_restart_delay")]
    pub restart_delay_ms: u64,
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
            if c.command.is_empty() {
                return Err(format!("component {}: empty command", c.name));
            }
        }
        Ok(())
    }
}

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
mod tests {
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
        let e = Template::parse(
            "[[components]]\nname = \"c\"\ncommand = [\"x\"]\nrestart = \"always\"\n",
        )
        .unwrap_err();
        assert!(e.contains("always") && e.contains("on-failure"), "{e}");
    }
}
