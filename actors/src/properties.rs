//! MIG's properties: the appliance's six plus ours, read in layers and checked once.
//!
//! Layers, later wins: the built-in defaults (`conf/mig.toml`, embedded), `CONFIG_DIR/mig.toml`,
//! `MIG_<NAME>` environment variables, then `--set NAME=VALUE`. Each value remembers the layer it came
//! from so that a bad one is reported as `mode = "copy" (from MIG_MODE): must be …`. Nothing
//! downstream re-parses a string: everything leaves here typed, with relative file names resolved
//! against the config dir.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{FileFormat, Source};

/// The embedded defaults; also the documentation of every property.
pub const DEFAULTS: &str = include_str!("../../conf/mig.toml");

/// Where the appliance keeps its config volume unless told otherwise.
pub const DEFAULT_CONFIG_DIR: &str = "/var/lib/mig/config";

/// The optional per-volume property file, inside the config dir.
pub const FILE_NAME: &str = "mig.toml";

/// Prefix of the environment layer: `MIG_PORT_NO` sets `port_no`.
pub const ENV_PREFIX: &str = "MIG_";

/// Every property name, in the order the defaults file documents them.
pub const NAMES: &[&str] = &[
    "username",
    "password",
    "mode",
    "port_no",
    "private_key_file",
    "handoff_key_file",
    "grid_info_file",
    "listen",
    "aux",
    "passthrough",
    "mon_port",
    "known_hosts_file",
    "grid",
    "app_name",
    "state_dir",
    "max_connections",
    "max_connections_per_client",
    "proxy_path",
    "connect_timeout",
    "idle_timeout",
    "drain_timeout",
    "otlp_endpoint",
    "fault_dir",
    "allowed_hosts",
    "max_rate",
    "webhook_url",
    "webhook_secret",
    "precopy",
];

/// Properties whose values are never shown, not even a bad one.
const SECRET_NAMES: &[&str] = &["password", "webhook_secret"];

mod parse;
#[cfg(test)]
mod tests;
mod types;

use parse::Typed;
pub use parse::{parse_rate, split_host_port};
pub use types::{AllowedHost, Mode, Origin, PropertyError, Secret};

/// The typed, validated properties of one MIG instance.
#[derive(Debug, Clone)]
pub struct Properties {
    pub config_dir: PathBuf,
    pub username: String,
    pub password: Secret,
    pub mode: Mode,
    /// 0 lets the OS pick (tests).
    pub port_no: u16,
    pub private_key_file: PathBuf,
    /// The application's handoff secret, from which `K_app` is derived (created when missing).
    pub handoff_key_file: PathBuf,
    pub grid_info_file: PathBuf,
    pub listen: IpAddr,
    pub aux: Option<String>,
    pub passthrough: Vec<u16>,
    /// 0 lets the OS pick (tests).
    pub mon_port: u16,
    pub known_hosts_file: PathBuf,
    pub grid: Option<String>,
    /// The application MIG lives in, as its grid names it.
    pub app_name: Option<String>,
    pub state_dir: PathBuf,
    pub max_connections: usize,
    /// Pass-through connections one client address may hold at once, all ports together.
    pub max_connections_per_client: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    /// Where to send the tracing spans over OTLP/HTTP (a `mig` built with the `otlp` feature).
    pub otlp_endpoint: Option<String>,
    /// Test-only: the directory of the fault points ([`crate::faults`]); `None` turns them off.
    pub fault_dir: Option<PathBuf>,
    /// More names the GUI answers to in a request's `Host` header, beyond its own addresses.
    pub allowed_hosts: Vec<AllowedHost>,
    /// `precopy = on`: copy the data while the source runs, stop it only to move what changed.
    pub precopy: bool,
    /// How the pass-through moves bytes: `auto` (sockmap where BPF works, else splice), or forced
    /// `sockmap`, `splice` or `copy`.
    pub proxy_path: proxy::ProxyPath,
    /// The most bytes per second an operation's copy may move, unless the request names its own;
    /// `None`: no limit.
    pub max_rate: Option<u64>,
    /// Where each operation's start and end are POSTed (http:// or https:// URLs).
    pub webhook_url: Vec<String>,
    /// The HMAC-SHA256 key of the webhooks' `X-Mig-Signature`; required with `webhook_url`.
    pub webhook_secret: Secret,
}

impl Properties {
    /// GUI authentication is on only when a username is set (the appliance's rule).
    pub fn auth_required(&self) -> bool {
        !self.username.is_empty()
    }
}

/// A raw value and where it came from.
#[derive(Debug, Clone)]
struct Raw {
    value: String,
    origin: Origin,
}

/// Reads every layer for `config_dir` and returns the typed properties, or every problem found.
///
/// `env` is passed in (rather than read here) so tests need not touch the process environment; the
/// binary passes `std::env::vars()`. Unknown `MIG_*` variables are ignored because other programs
/// (and MigHelper's `MIG_HELPER_ENV`) share the prefix; unknown names in the file or `--set` are errors.
pub fn load(
    config_dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<Properties, Vec<PropertyError>> {
    let mut errors = Vec::new();
    let mut raw: BTreeMap<String, Raw> = BTreeMap::new();

    let defaults = config::File::from_str(DEFAULTS, FileFormat::Toml);
    layer_file(&defaults, Origin::Default, &mut raw, &mut errors);
    debug_assert!(errors.is_empty(), "the embedded defaults must be valid");

    let file_path = config_dir.join(FILE_NAME);
    if file_path.exists() {
        let file = config::File::from(file_path.as_path()).format(FileFormat::Toml);
        layer_file(
            &file,
            Origin::File(file_path.clone()),
            &mut raw,
            &mut errors,
        );
    }

    for (key, value) in env {
        if let Some(name) = key.strip_prefix(ENV_PREFIX) {
            let name = name.to_ascii_lowercase();
            if NAMES.contains(&name.as_str()) {
                raw.insert(
                    name,
                    Raw {
                        value,
                        origin: Origin::Env(key),
                    },
                );
            }
        }
    }

    for set in sets {
        match set.split_once('=') {
            Some((name, value)) if NAMES.contains(&name) => {
                raw.insert(
                    name.to_string(),
                    Raw {
                        value: value.to_string(),
                        origin: Origin::Set,
                    },
                );
            }
            Some((name, _)) => errors.push(unknown(name, Origin::Set)),
            None => errors.push(PropertyError {
                name: set.clone(),
                origin: Origin::Set,
                given: None,
                problem: "expected NAME=VALUE".into(),
            }),
        }
    }

    let props = Typed::new(config_dir, &raw, &mut errors).finish();
    if errors.is_empty() {
        Ok(props)
    } else {
        Err(errors)
    }
}

fn unknown(name: &str, origin: Origin) -> PropertyError {
    let close = NAMES
        .iter()
        .map(|n| (strsim::jaro_winkler(n, name), n))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let problem = match close {
        Some((_, n)) => format!("unknown property; did you mean `{n}`?"),
        None => format!("unknown property; known ones are {}", NAMES.join(", ")),
    };
    PropertyError {
        name: name.to_string(),
        origin,
        given: None,
        problem,
    }
}

fn layer_file(
    file: &dyn Source,
    origin: Origin,
    raw: &mut BTreeMap<String, Raw>,
    errors: &mut Vec<PropertyError>,
) {
    let map = match file.collect() {
        Ok(m) => m,
        Err(e) => {
            errors.push(PropertyError {
                name: FILE_NAME.into(),
                origin,
                given: None,
                problem: format!("cannot read: {e}"),
            });
            return;
        }
    };
    for (name, value) in map {
        if !NAMES.contains(&name.as_str()) {
            errors.push(unknown(&name, origin.clone()));
            continue;
        }
        match value.into_string() {
            Ok(value) => {
                raw.insert(
                    name,
                    Raw {
                        value,
                        origin: origin.clone(),
                    },
                );
            }
            Err(_) => errors.push(PropertyError {
                name,
                origin: origin.clone(),
                given: None,
                problem: "must be a single value, not a table or a list".into(),
            }),
        }
    }
}
