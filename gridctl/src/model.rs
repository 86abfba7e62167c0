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

/// The descriptor and state of one application. Its `Debug` hides the secret properties' values.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Properties whose values are never shown (the template's `secret`).
    #[serde(default)]
    pub secret: Vec<String>,
    pub volumes: Vec<Volume>,
    pub components: Vec<ComponentTemplate>,
    /// Pids of the running components, and their process group.
    #[serde(default)]
    pub pids: Vec<i32>,
    #[serde(default)]
    pub pgid: i32,
    /// A staged copy (`app migrate … --import --stage`): the pre-copy of an application that
    /// still runs elsewhere, never started; `--delta` completes it into an application.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub staged: bool,
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

/// The grid-side tag of the MIG operation that created an application: accepted by every
/// application, declared or not, so that MIG can destroy only what its own operation created.
pub const MIG_OP: &str = "mig_op";

/// Checks a `mig_op` value: an operation id as MIG writes it, 32 lowercase hex digits (one
/// spelling, so that comparing tags is comparing strings).
fn validate_mig_op(v: &str) -> Result<(), String> {
    if v.len() == 32 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!(
            "invalid value for property {MIG_OP}: expected an operation id of 32 hex digits \
             (0-9, a-f)"
        ))
    }
}

/// Applies `name=value` overrides to `props`; a property the application does not declare is
/// refused, naming it and the known ones. `mig_op` ([`MIG_OP`]) is accepted by every application.
pub fn apply_props(
    app: &str,
    props: &mut BTreeMap<String, String>,
    overrides: &[dialect::Prop],
) -> Result<(), String> {
    for p in overrides {
        if p.name == MIG_OP {
            validate_mig_op(&p.value)?;
            props.insert(p.name.clone(), p.value.clone());
            continue;
        }
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
            secret: t.secret.clone(),
            volumes,
            components: t.components.clone(),
            pids: Vec::new(),
            pgid: 0,
            staged: false,
        },
        inits,
    ))
}

impl fmt::Debug for AppRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .props
            .iter()
            .map(|(k, v)| (k.as_str(), self.shown(k, v)))
            .collect();
        f.debug_struct("AppRecord")
            .field("name", &self.name)
            .field("template", &self.template)
            .field("state", &self.state)
            .field("error", &self.error)
            .field("props", &props)
            .field("required", &self.required)
            .field("secret", &self.secret)
            .field("volumes", &self.volumes)
            .field("components", &self.components)
            .field("pids", &self.pids)
            .field("pgid", &self.pgid)
            .finish()
    }
}

impl AppRecord {
    /// Writes `app.json`, created 0600 from the start: it holds the secret properties.
    pub fn save(&self, state: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        util::write_atomic_private(&app_dir(state, &self.name).join("app.json"), &json)
    }

    /// A property's value as listings show it: `***` for a secret one.
    pub fn shown<'a>(&self, name: &str, value: &'a str) -> &'a str {
        if self.secret.iter().any(|s| s == name) {
            "***"
        } else {
            value
        }
    }

    /// `text` with every secret property's value replaced by `***`: for errors and logs that
    /// may quote a substituted command or address.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secret {
            if let Some(v) = self.props.get(s).filter(|v| !v.is_empty()) {
                out = out.replace(v.as_str(), "***");
            }
        }
        out
    }

    /// Checks what the grid later turns into paths: the application's, template's and volumes'
    /// names (a volume named `../../x` would make `checksum` and `peer export` read outside).
    pub fn validate(&self) -> Result<(), String> {
        dialect::AppName::new(&self.name).map_err(|e| e.to_string())?;
        dialect::AppName::new(&self.template).map_err(|e| format!("template: {e}"))?;
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.volumes {
            dialect::AppName::new(&v.name).map_err(|e| format!("volume: {e}"))?;
            if !seen.insert(&v.name) {
                return Err(format!("volume {} listed twice", v.name));
            }
        }
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<AppRecord, String> {
        let p = dir.join("app.json");
        let text = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))
    }

    /// `app info --batch` lines (format in the crate docs).
    pub fn info_batch(&self) -> String {
        // One line per field: an error that spans lines (a component's or a tool's message)
        // would otherwise break every reader of this format.
        let error: String = self
            .error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut s = format!(
            "name\t{}\nstate\t{}\ntemplate\t{}\nerror\t{error}\n",
            self.name, self.state, self.template
        );
        for (k, v) in &self.props {
            s.push_str(&format!("prop.{k}\t{}\n", self.shown(k, v)));
        }
        for v in &self.volumes {
            s.push_str(&format!("volume.{}\t{}\n", v.name, v.size));
            s.push_str(&format!("volume.{}.kind\t{}\n", v.name, v.kind.as_str()));
        }
        if self.staged {
            s.push_str("staged\ttrue\n");
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
        if self.staged {
            s.push_str("  staged:   a pre-copy, not startable until its final pull (--delta)\n");
        }
        s.push_str("  properties:\n");
        for (k, v) in &self.props {
            s.push_str(&format!("    {k} = {}\n", self.shown(k, v)));
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
        let mut r = r;
        r.error = "virsh failed:\nline two\tand a tab".into();
        let b = r.info_batch();
        assert!(
            b.contains("error\tvirsh failed: line two and a tab\nprop."),
            "{b}"
        );
        assert!(b.lines().all(|l| l.split('\t').count() == 2), "{b}");
    }

    #[test]
    fn mig_op_is_accepted_by_every_application_and_checked() {
        let mut props: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        let p = |s: &str| s.parse::<dialect::Prop>().unwrap();
        let tag = "0123456789abcdef0123456789abcdef";
        apply_props("x", &mut props, &[p(&format!("mig_op={tag}"))]).unwrap();
        assert_eq!(props["mig_op"], tag);
        for bad in [
            "",
            "0123",
            "0123456789ABCDEF0123456789ABCDEF",
            &format!("{tag}0"),
        ] {
            let e = apply_props("x", &mut props, &[p(&format!("mig_op={bad}"))]).unwrap_err();
            assert!(e.contains("32 hex digits"), "{bad}: {e}");
        }
        let e = apply_props("x", &mut props, &[p("mig_opx=1")]).unwrap_err();
        assert!(e.contains("has no property mig_opx"), "{e}");
    }

    #[test]
    fn secret_values_are_hidden_from_info_debug_and_redacted_text() {
        let d = tempfile::tempdir().unwrap();
        let t = Template::parse(crate::template::MIG_HELPER).unwrap();
        let (r, _) = record_from_template(
            d.path(),
            "MigHelper",
            &t,
            "mighelper-1",
            &[
                "in_ip=1.2.3.4".parse().unwrap(),
                "env=TOPSECRET".parse().unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(r.props["env"], "TOPSECRET");
        for shown in [r.info_batch(), r.info_human(), format!("{r:?}")] {
            assert!(!shown.contains("TOPSECRET"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
        assert!(r.info_batch().contains("prop.env\t***\n"));
        assert!(r.info_batch().contains("prop.in_ip\t1.2.3.4\n"));
        assert_eq!(
            r.redact("component helper (/x/TOPSECRET): gone"),
            "component helper (/x/***): gone"
        );
        // A secret left empty hides nothing else.
        let mut empty = r.clone();
        empty.props.insert("env".into(), String::new());
        assert_eq!(empty.redact("a b"), "a b");
    }
}
