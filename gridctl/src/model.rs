//! An application as the grid stores it: its descriptor and state in `STATE/apps/NAME/app.json`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::template::{ComponentTemplate, Template, VolumeKind};
use crate::util;

/// AppLogic's application states, lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Failed => "failed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A volume of an application, its size resolved when it was provisioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub kind: VolumeKind,
    /// Logical size in bytes of a `file` volume (0 for `dir`).
    pub size: u64,
}

/// The descriptor and state of one application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    pub template: String,
    pub state: State,
    /// The last failure, empty when none.
    #[serde(default)]
    pub error: String,
    pub props: BTreeMap<String, String>,
    #[serde(default)]
    pub required: Vec<String>,
    pub volumes: Vec<Volume>,
    pub components: Vec<ComponentTemplate>,
    /// Pids of the running components, and their process group.
    #[serde(default)]
    pub pids: Vec<i32>,
    #[serde(default)]
    pub pgid: i32,
}

pub fn apps_dir(state: &Path) -> PathBuf {
    state.join("apps")
}

pub fn app_dir(state: &Path, name: &str) -> PathBuf {
    apps_dir(state).join(name)
}

pub fn volume_path(app_dir: &Path, vol: &str) -> PathBuf {
    app_dir.join("vols").join(vol)
}

/// Variables from `STATE/grid.toml` `[vars]`, e.g. `lab`, `grid`, `mig_bin`.
pub fn grid_vars(state: &Path) -> BTreeMap<String, String> {
    #[derive(Deserialize, Default)]
    struct GridToml {
        #[serde(default)]
        vars: BTreeMap<String, String>,
    }
    std::fs::read_to_string(state.join("grid.toml"))
        .ok()
        .and_then(|t| toml::from_str::<GridToml>(&t).ok())
        .unwrap_or_default()
        .vars
}

/// What `${…}` may refer to for one application.
pub struct Vars<'a> {
    pub state: &'a Path,
    pub app: &'a str,
    pub props: &'a BTreeMap<String, String>,
    pub grid: BTreeMap<String, String>,
}

impl Vars<'_> {
    pub fn lookup(&self, name: &str) -> Option<String> {
        if let Some(v) = name.strip_prefix("vol:") {
            return Some(
                volume_path(&app_dir(self.state, self.app), v)
                    .display()
                    .to_string(),
            );
        }
        match name {
            "app" => Some(self.app.to_string()),
            "gridctl" => Some(util::self_exe().display().to_string()),
            "state" => Some(self.state.display().to_string()),
            _ => self
                .props
                .get(name)
                .or_else(|| self.grid.get(name))
                .cloned(),
        }
    }

    pub fn subst(&self, s: &str) -> Result<String, String> {
        util::substitute(s, &|n| self.lookup(n))
    }
}

/// Applies `name=value` overrides to `props`; a property the application does not declare is
/// refused, naming it and the known ones.
pub fn apply_props(
    app: &str,
    props: &mut BTreeMap<String, String>,
    overrides: &[dialect::Prop],
) -> Result<(), String> {
    for p in overrides {
        match props.get_mut(&p.name) {
            Some(v) => *v = p.value.clone(),
            None => {
                let known: Vec<&str> = props.keys().map(String::as_str).collect();
                return Err(format!(
                    "application {app} has no property {} (known: {})",
                    p.name,
                    known.join(" ")
                ));
            }
        }
    }
    Ok(())
}

/// Builds a new application's record from a template (volumes not yet created).
pub fn record_from_template(
    state: &Path,
    template_name: &str,
    t: &Template,
    name: &str,
    overrides: &[dialect::Prop],
) -> Result<(AppRecord, Vec<Option<PathBuf>>), String> {
    let mut props = t.properties.clone();
    apply_props(name, &mut props, overrides)?;
    for r in &t.required {
        if props.get(r).is_none_or(|v| v.is_empty()) {
            return Err(format!(
                "cannot provision {name}: template {template_name} requires property {r}"
            ));
        }
    }
    let vars = Vars {
        state,
        app: name,
        props: &props,
        grid: grid_vars(state),
    };
    let mut volumes = Vec::new();
    let mut inits = Vec::new();
    for v in &t.volumes {
        let size = match v.kind {
            VolumeKind::File => {
                let s = vars
                    .subst(&v.size)
                    .map_err(|e| format!("volume {}: {e}", v.name))?;
                util::parse_size(&s).map_err(|e| format!("volume {}: {e}", v.name))?
            }
            VolumeKind::Dir => 0,
        };
        let init = match &v.init_from {
            Some(p) => Some(PathBuf::from(
                vars.subst(p)
                    .map_err(|e| format!("volume {}: {e}", v.name))?,
            )),
            None => None,
        };
        volumes.push(Volume {
            name: v.name.clone(),
            kind: v.kind,
            size,
        });
        inits.push(init);
    }
    Ok((
        AppRecord {
            name: name.to_string(),
            template: template_name.to_string(),
            state: State::Stopped,
            error: String::new(),
            props,
            required: t.required.clone(),
            volumes,
            components: t.components.clone(),
            pids: Vec::new(),
            pgid: 0,
        },
        inits,
    ))
}

impl AppRecord {
    pub fn save(&self, state: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        util::write_atomic(&app_dir(state, &self.name).join("app.json"), &json)
    }

    pub fn load(dir: &Path) -> Result<AppRecord, String> {
        let p = dir.join("app.json");
        let text = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))
    }

    /// `app info --batch` lines (format in the crate docs).
    pub fn info_batch(&self) -> String {
        let mut s = format!(
            "name\t{}\nstate\t{}\ntemplate\t{}\nerror\t{}\n",
            self.name, self.state, self.template, self.error
        );
        for (k, v) in &self.props {
            s.push_str(&format!("prop.{k}\t{v}\n"));
        }
        for v in &self.volumes {
            s.push_str(&format!("volume.{}\t{}\n", v.name, v.size));
            s.push_str(&format!("volume.{}.kind\t{}\n", v.name, v.kind.as_str()));
        }
        s
    }

    /// `app info` for a person.
    pub fn info_human(&self) -> String {
        let mut s = format!(
            "Application {}\n  state:    {}\n  template: {}\n",
            self.name, self.state, self.template
        );
        if !self.error.is_empty() {
            s.push_str(&format!("  error:    {}\n", self.error));
        }
        s.push_str("  properties:\n");
        for (k, v) in &self.props {
            s.push_str(&format!("    {k} = {v}\n"));
        }
        s.push_str("  volumes:\n");
        for v in &self.volumes {
            s.push_str(&format!(
                "    {} ({}, {} bytes)\n",
                v.name,
                v.kind.as_str(),
                v.size
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provision_record_resolves_sizes_and_refuses_unknown_props() {
        let d = tempfile::tempdir().unwrap();
        let t = Template::parse(crate::template::KVSTORE).unwrap();
        let p = |s: &str| s.parse::<dialect::Prop>().unwrap();
        let (r, _) = record_from_template(
            d.path(),
            "kvstore",
            &t,
            "kv1",
            &[p("in_ip=127.0.0.1"), p("data_size=1G")],
        )
        .unwrap();
        assert_eq!(r.volumes[0].size, 1 << 30);
        assert_eq!(r.props["port"], "8000");
        let e = record_from_template(d.path(), "kvstore", &t, "kv1", &[p("nope=1")]).unwrap_err();
        assert!(e.contains("no property nope"), "{e}");
        let e = record_from_template(d.path(), "kvstore", &t, "kv1", &[]).unwrap_err();
        assert!(e.contains("requires property in_ip"), "{e}");
    }

    #[test]
    fn info_batch_is_tab_separated() {
        let d = tempfile::tempdir().unwrap();
        let t = Template::parse(crate::template::KVSTORE).unwrap();
        let (r, _) = record_from_template(
            d.path(),
            "kvstore",
            &t,
            "kv1",
            &["in_ip=1.2.3.4".parse().unwrap()],
        )
        .unwrap();
        let b = r.info_batch();
        assert!(b.starts_with("name\tkv1\nstate\tstopped\ntemplate\tkvstore\nerror\t\n"));
        assert!(b.contains("prop.in_ip\t1.2.3.4\n"));
        assert!(b.contains("volume.data\t67108864\nvolume.data.kind\tfile\n"));
    }
}
