//! MIG's properties: the appliance's six plus ours, read in layers and checked once.
//!
//! Layers, later wins: the built-in defaults (`conf/mig.toml`, embedded), `CONFIG_DIR/mig.toml`,
//! `MIG_<NAME>` environment variables, then `--set NAME=VALUE`. Each value remembers the layer it came
//! from so that a bad one is reported as `mode = "copy" (from MIG_MODE): must be …`. Nothing
//! downstream re-parses a string: everything leaves here typed, with relative file names resolved
//! against the config dir.

use std::collections::BTreeMap;
use std::fmt;
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
    "proxy_path",
];

/// Properties whose values are never shown, not even a bad one.
const SECRET_NAMES: &[&str] = &["password", "webhook_secret"];

/// Which operations the GUI offers and the API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Migrate,
    Snapshot,
    Both,
}

impl Mode {
    /// Whether an operation of `kind` ("migrate" or "snapshot") is allowed.
    pub fn allows(self, kind: &str) -> bool {
        matches!(
            (self, kind),
            (Mode::Both, "migrate" | "snapshot")
                | (Mode::Migrate, "migrate")
                | (Mode::Snapshot, "snapshot")
        )
    }
}

/// A string that never shows itself in logs or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

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

/// The largest `max_rate` accepted: 1 TiB/s is past any link; beyond it is surely a typo.
const MAX_RATE_LIMIT: u64 = 1 << 40;

/// Parses a bandwidth limit: bytes per second, a whole number with an optional `K`, `M` or `G`
/// suffix (1024-based, either case), e.g. `8M`; empty means no limit (`None`). The error says what
/// is allowed, for the caller to prefix with the property or field it came from.
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    const ALLOWED: &str = "must be bytes per second: a whole number with an optional K, M or G \
                           suffix (1024-based), e.g. 8M, more than 0 and at most 1024G; or empty \
                           for no limit";
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, ' '),
    };
    let shift = match unit {
        ' ' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(ALLOWED.into()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ALLOWED.into());
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| (1..=MAX_RATE_LIMIT).contains(n))
        .map(Some)
        .ok_or_else(|| ALLOWED.into())
}

/// Parses `webhook_url`: URLs separated by commas or spaces, each http:// or https:// with a host.
fn parse_webhook_urls(s: &str) -> Result<Vec<String>, String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|u| !u.is_empty())
        .map(|u| match reqwest::Url::parse(u) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Ok(u.to_string())
            }
            _ => Err(format!(
                "{u:?} is not an http:// or https:// URL with a host (separate several with commas)"
            )),
        })
        .collect()
}

/// One entry of `allowed_hosts`: a host name or IP address (lowercase, IPv6 without brackets),
/// and the port it must come with, when one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    pub host: String,
    pub port: Option<u16>,
}

/// Splits a `Host` header value (or an `allowed_hosts` entry) into host and port: `name`,
/// `name:port`, `1.2.3.4:port`, `[::1]:port`. The host comes back lowercase, without brackets
/// or a trailing dot; `None` when the text is not of that shape.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            // A bare IPv6 address (no brackets, so no port).
            Some(_) => (s, None),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => None,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (host.parse::<IpAddr>().is_ok() || is_host_name(&host)).then_some((host, port))
}

impl Properties {
    /// GUI authentication is on only when a username is set (the appliance's rule).
    pub fn auth_required(&self) -> bool {
        !self.username.is_empty()
    }
}

/// The layer a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Set,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(v) => f.write_str(v),
            Origin::Set => f.write_str("--set"),
        }
    }
}

/// One problem with one property, printed as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyError {
    pub name: String,
    pub origin: Origin,
    /// The value as given; `None` when the problem is not about a value (a malformed `--set`).
    pub given: Option<String>,
    pub problem: String,
}

impl fmt::Display for PropertyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.given {
            // Never echo a password back, not even a bad one.
            Some(_) if SECRET_NAMES.contains(&self.name.as_str()) => {
                write!(f, "{} (from {}): {}", self.name, self.origin, self.problem)
            }
            Some(g) => write!(
                f,
                "{} = {:?} (from {}): {}",
                self.name, g, self.origin, self.problem
            ),
            None => write!(f, "{} (from {}): {}", self.name, self.origin, self.problem),
        }
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

/// Turns raw strings into typed values, collecting every error.
struct Typed<'a> {
    dir: &'a Path,
    raw: &'a BTreeMap<String, Raw>,
    errors: &'a mut Vec<PropertyError>,
}

impl<'a> Typed<'a> {
    fn new(
        dir: &'a Path,
        raw: &'a BTreeMap<String, Raw>,
        errors: &'a mut Vec<PropertyError>,
    ) -> Self {
        Typed { dir, raw, errors }
    }

    /// Parses one property; on error records it and returns `fallback` so checking goes on.
    fn get<T>(
        &mut self,
        name: &str,
        fallback: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        let raw = &self.raw[name];
        match parse(raw.value.trim()) {
            Ok(v) => v,
            Err(problem) => {
                self.errors.push(PropertyError {
                    name: name.to_string(),
                    origin: raw.origin.clone(),
                    given: Some(raw.value.clone()),
                    problem,
                });
                fallback
            }
        }
    }

    fn error(&mut self, name: &str, problem: String) {
        let raw = &self.raw[name];
        self.errors.push(PropertyError {
            name: name.to_string(),
            origin: raw.origin.clone(),
            given: Some(raw.value.clone()),
            problem,
        });
    }

    fn path(&mut self, name: &str) -> PathBuf {
        let dir = self.dir;
        self.get(name, PathBuf::new(), |s| {
            if s.is_empty() {
                return Err("must name a file".into());
            }
            Ok(dir.join(s))
        })
    }

    fn finish(mut self) -> Properties {
        let username = self.get("username", String::new(), |s| {
            if s.contains(':') || s.chars().any(char::is_control) {
                Err(
                    "must not contain ':' or control characters (it is sent with HTTP basic auth)"
                        .into(),
                )
            } else {
                Ok(s.to_string())
            }
        });
        // The password is taken as given: spaces may be part of it.
        let password = Secret::new(self.raw["password"].value.clone());
        let mode = self.get("mode", Mode::Both, |s| match s {
            "migrate" => Ok(Mode::Migrate),
            "snapshot" => Ok(Mode::Snapshot),
            "both" => Ok(Mode::Both),
            _ => Err("must be migrate, snapshot or both".into()),
        });
        let port_no = self.get("port_no", 8080, port);
        let mon_port = self.get("mon_port", 9480, port);
        let private_key_file = self.path("private_key_file");
        let handoff_key_file = self.path("handoff_key_file");
        let grid_info_file = self.path("grid_info_file");
        let known_hosts_file = self.path("known_hosts_file");
        let listen = self.get("listen", IpAddr::from([0, 0, 0, 0]), |s| {
            s.parse()
                .map_err(|_| "must be an IP address, e.g. 0.0.0.0 or 10.0.1.10".into())
        });
        let aux = self.get("aux", None, |s| {
            if s.is_empty() {
                Ok(None)
            } else if s.parse::<IpAddr>().is_ok() || is_host_name(s) {
                Ok(Some(s.to_string()))
            } else {
                Err(
                    "must be a host name or an IP address, or empty to leave aux unconnected"
                        .into(),
                )
            }
        });
        let passthrough = self.get("passthrough", Vec::new(), proxy::parse_passthrough);
        let grid = self.get("grid", None, |s| {
            if s.is_empty() {
                Ok(None)
            } else if s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                Ok(Some(s.to_string()))
            } else {
                Err("must be a grid id from grid.info (letters, digits, '-', '_')".into())
            }
        });
        let app_name = self.get("app_name", None, |s| {
            if s.is_empty() {
                Ok(None)
            } else {
                dialect::AppName::new(s)
                    .map(|n| Some(n.to_string()))
                    .map_err(|e| e.to_string())
            }
        });
        let state_dir = self.path("state_dir");
        let max_connections = self.get("max_connections", 10_000, |s| match s.parse::<usize>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err("must be a whole number from 1 to 1000000".into()),
        });
        let max_connections_per_client = self.get(
            "max_connections_per_client",
            proxy::DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            |s| match s.parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
                _ => Err("must be a whole number from 1 to 1000000 (connections one client address may hold at once)".into()),
            },
        );
        let connect_timeout = self.get("connect_timeout", Duration::from_secs(5), |s| {
            seconds(s).and_then(|d| {
                if d.is_zero() {
                    Err("must be more than 0 seconds".into())
                } else {
                    Ok(d)
                }
            })
        });
        let idle_timeout = self.get("idle_timeout", None, |s| {
            seconds(s).map(|d| (!d.is_zero()).then_some(d))
        });
        let drain_timeout = self.get("drain_timeout", Duration::from_secs(5), seconds);
        let otlp_endpoint = self.get("otlp_endpoint", None, |s| {
            if s.is_empty() {
                Ok(None)
            } else if (s.starts_with("http://") || s.starts_with("https://"))
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                Ok(Some(s.to_string()))
            } else {
                Err("must be an http:// or https:// URL of an OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces, or empty".into())
            }
        });
        let fault_dir = self.get("fault_dir", None, |s| {
            if s.is_empty() {
                Ok(None)
            } else if Path::new(s).is_absolute() {
                Ok(Some(PathBuf::from(s)))
            } else {
                Err("must be an absolute directory path (test-only fault points), or empty".into())
            }
        });

        let allowed_hosts = self.get("allowed_hosts", Vec::new(), |s| {
            s.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(|e| {
                    split_host_port(e)
                        .map(|(host, port)| AllowedHost { host, port })
                        .ok_or_else(|| {
                            format!("{e:?} is not a host name, an IP address or either with :port (entries are separated by commas)")
                        })
                })
                .collect()
        });

        let max_rate = self.get("max_rate", None, parse_rate);
        let webhook_url = self.get("webhook_url", Vec::new(), parse_webhook_urls);
        let webhook_secret = Secret::new(self.raw["webhook_secret"].value.clone());
        if !webhook_url.is_empty() && webhook_secret.expose().trim().is_empty() {
            self.error(
                "webhook_url",
                "is set but webhook_secret is empty: set webhook_secret, so that receivers can \
                 check the X-Mig-Signature of each POST"
                    .into(),
            );
        }

        let precopy = self.get("precopy", true, |s| match s {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err("must be on or off".into()),
        });
        let proxy_path = self.get("proxy_path", proxy::ProxyPath::Auto, |s| {
            s.parse::<proxy::ProxyPath>()
        });

        // Cross-property rules: the GUI and mon ports are never passed through.
        if port_no != 0 && passthrough.contains(&port_no) {
            self.error(
                "passthrough",
                format!("includes the GUI port {port_no} (port_no); the GUI port is never passed through"),
            );
        }
        if mon_port != 0 && passthrough.contains(&mon_port) {
            self.error(
                "passthrough",
                format!("includes the mon port {mon_port} (mon_port); remove it or move mon_port"),
            );
        }
        if mon_port != 0 && mon_port == port_no {
            self.error(
                "mon_port",
                format!("is the same as port_no ({port_no}); the GUI and mon need their own ports"),
            );
        }

        Properties {
            config_dir: self.dir.to_path_buf(),
            username,
            password,
            mode,
            port_no,
            private_key_file,
            handoff_key_file,
            grid_info_file,
            listen,
            aux,
            passthrough,
            mon_port,
            known_hosts_file,
            grid,
            app_name,
            state_dir,
            max_connections,
            max_connections_per_client,
            connect_timeout,
            idle_timeout,
            drain_timeout,
            otlp_endpoint,
            fault_dir,
            allowed_hosts,
            max_rate,
            webhook_url,
            webhook_secret,

            precopy,
            proxy_path,
        }
    }
}

fn port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| "must be a port number from 1 to 65535 (0 lets the system pick one)".into())
}

fn seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if n <= 86_400 => Ok(Duration::from_secs(n)),
        _ => Err("must be a whole number of seconds from 0 to 86400".into()),
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(
        dir: &Path,
        env: &[(&str, &str)],
        sets: &[&str],
    ) -> Result<Properties, Vec<PropertyError>> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load(dir, env, &sets)
    }

    fn one_error(dir: &Path, env: &[(&str, &str)], sets: &[&str]) -> String {
        let errs = load_with(dir, env, sets).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs[0].to_string()
    }

    #[test]
    fn defaults_are_the_appliance_documented_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = load_with(dir.path(), &[], &[]).unwrap();
        assert_eq!(p.username, "");
        assert!(p.password.is_empty());
        assert!(!p.auth_required());
        assert_eq!(p.mode, Mode::Both);
        assert_eq!(p.port_no, 8080);
        assert_eq!(p.private_key_file, dir.path().join("private.key"));
        assert_eq!(p.grid_info_file, dir.path().join("grid.info"));
        assert_eq!(p.known_hosts_file, dir.path().join("known_hosts"));
        assert_eq!(p.aux, None);
        assert!(p.passthrough.is_empty());
        assert_eq!(p.grid, None);
        assert_eq!(p.state_dir, PathBuf::from("/var/lib/mig/state"));
        assert_eq!(p.idle_timeout, None);
        assert_eq!(p.max_connections_per_client, 256);
        // Every documented name is in the defaults, and nothing else is.
        let map = config::File::from_str(DEFAULTS, FileFormat::Toml)
            .collect()
            .unwrap();
        let mut keys: Vec<_> = map.keys().cloned().collect();
        let mut names: Vec<_> = NAMES.iter().map(|s| s.to_string()).collect();
        keys.sort();
        names.sort();
        assert_eq!(keys, names);
    }

    #[test]
    fn each_layer_overrides_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            "port_no = 8081\nmode = \"migrate\"\n",
        )
        .unwrap();
        let p = load_with(dir.path(), &[], &[]).unwrap();
        assert_eq!((p.port_no, p.mode), (8081, Mode::Migrate));
        let p = load_with(dir.path(), &[("MIG_PORT_NO", "8082")], &[]).unwrap();
        assert_eq!((p.port_no, p.mode), (8082, Mode::Migrate));
        let p = load_with(dir.path(), &[("MIG_PORT_NO", "8082")], &["port_no=8083"]).unwrap();
        assert_eq!(p.port_no, 8083);
        // The last --set of the same name wins.
        let p = load_with(dir.path(), &[], &["mode=snapshot", "mode=both"]).unwrap();
        assert_eq!(p.mode, Mode::Both);
    }

    #[test]
    fn a_bad_value_names_property_layer_value_and_what_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            one_error(dir.path(), &[("MIG_MODE", "copy")], &[]),
            r#"mode = "copy" (from MIG_MODE): must be migrate, snapshot or both"#
        );
        assert_eq!(
            one_error(dir.path(), &[], &["port_no=http"]),
            r#"port_no = "http" (from --set): must be a port number from 1 to 65535 (0 lets the system pick one)"#
        );
        std::fs::write(dir.path().join(FILE_NAME), "listen = \"10.0.0.300\"\n").unwrap();
        let e = one_error(dir.path(), &[], &[]);
        assert!(
            e.starts_with(&format!(
                "listen = \"10.0.0.300\" (from {}): must be an IP address",
                dir.path().join(FILE_NAME).display()
            )),
            "{e}"
        );
    }

    #[test]
    fn bad_values_per_property() {
        let dir = tempfile::tempdir().unwrap();
        for (set, fragment) in [
            ("username=a:b", "must not contain ':'"),
            ("mon_port=70000", "port number"),
            ("private_key_file=", "must name a file"),
            ("aux=not a host", "host name or an IP"),
            ("aux=-bad.example", "host name or an IP"),
            ("passthrough=80,abc", "'abc' in item 2 is not a port number"),
            ("passthrough=90-80", "runs backwards"),
            ("passthrough=0", "is not a port"),
            ("grid=g 1", "must be a grid id"),
            ("max_connections=0", "from 1 to 1000000"),
            ("max_connections_per_client=0", "from 1 to 1000000"),
            ("max_connections_per_client=", "from 1 to 1000000"),
            ("max_connections_per_client=many", "from 1 to 1000000"),
            ("connect_timeout=0", "more than 0 seconds"),
            ("idle_timeout=-1", "whole number of seconds"),
            ("drain_timeout=1.5", "whole number of seconds"),
            ("otlp_endpoint=collector:4318", "http:// or https:// URL"),
            (
                "allowed_hosts=mig.example,evil example",
                "\"evil example\" is not a host name",
            ),
            (
                "allowed_hosts=mig.example:0",
                "is not a host name, an IP address",
            ),
            ("allowed_hosts=[::1", "is not a host name"),
            ("passthrough=8000-8080", "includes the GUI port 8080"),
            ("passthrough=9480", "includes the mon port 9480"),
            ("mon_port=8080", "same as port_no"),
            ("max_rate=8X", "bytes per second"),
            ("max_rate=fast", "bytes per second"),
            ("max_rate=0", "more than 0"),
            ("max_rate=-8M", "bytes per second"),
            (
                "webhook_url=ftp://x.example/h",
                "not an http:// or https:// URL",
            ),
            ("webhook_url=http://a.example/h", "webhook_secret is empty"),
        ] {
            let e = one_error(dir.path(), &[], &[set]);
            assert!(e.contains(fragment), "{set}: {e}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let errs =
            load_with(dir.path(), &[("MIG_MODE", "x")], &["port_no=x", "aux=a b"]).unwrap_err();
        let names: Vec<_> = errs.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["mode", "port_no", "aux"]);
    }

    #[test]
    fn unknown_names_in_file_or_set_suggest_a_close_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            one_error(dir.path(), &[], &["port=8081"]),
            "port (from --set): unknown property; did you mean `port_no`?"
        );
        std::fs::write(dir.path().join(FILE_NAME), "pasthrough = \"80\"\n").unwrap();
        let e = one_error(dir.path(), &[], &[]);
        assert!(
            e.ends_with("unknown property; did you mean `passthrough`?"),
            "{e}"
        );
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        let e = one_error(dir.path(), &[], &["zzz=1"]);
        assert!(e.contains("known ones are username, password"), "{e}");
        assert_eq!(
            one_error(dir.path(), &[], &["mode"]),
            "mode (from --set): expected NAME=VALUE"
        );
        // Other programs' MIG_* variables are not ours to judge.
        assert!(load_with(dir.path(), &[("MIG_HELPER_ENV", "x")], &[]).is_ok());
    }

    #[test]
    fn a_malformed_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "port_no = = 3\n").unwrap();
        let e = one_error(dir.path(), &[], &[]);
        assert!(e.starts_with("mig.toml (from "), "{e}");
        assert!(e.contains("cannot read"), "{e}");
        std::fs::write(dir.path().join(FILE_NAME), "[aux]\nhost = \"x\"\n").unwrap();
        let e = one_error(dir.path(), &[], &[]);
        assert!(e.contains("must be a single value"), "{e}");
    }

    #[test]
    fn relative_files_resolve_against_the_config_dir_and_absolute_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let p = load_with(
            dir.path(),
            &[],
            &[
                "private_key_file=keys/id",
                "grid_info_file=/etc/mig/grid.info",
            ],
        )
        .unwrap();
        assert_eq!(p.private_key_file, dir.path().join("keys/id"));
        assert_eq!(p.grid_info_file, PathBuf::from("/etc/mig/grid.info"));
    }

    #[test]
    fn the_password_is_never_shown() {
        let p = Properties {
            password: Secret::new("hunter2"),
            ..load_with(Path::new("/x"), &[], &[]).unwrap()
        };
        assert!(!format!("{p:?}").contains("hunter2"));
        let e = PropertyError {
            name: "password".into(),
            origin: Origin::Set,
            given: Some("hunter2".into()),
            problem: "x".into(),
        };
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn allowed_hosts_are_names_or_addresses_with_an_optional_port() {
        let dir = tempfile::tempdir().unwrap();
        let p = load_with(dir.path(), &[], &[]).unwrap();
        assert!(p.allowed_hosts.is_empty());
        let p = load_with(
            dir.path(),
            &[],
            &["allowed_hosts= MIG.Example.NET , 10.0.1.10:8080,[FE80::1]:81,::1,"],
        )
        .unwrap();
        let got: Vec<_> = p
            .allowed_hosts
            .iter()
            .map(|a| (a.host.as_str(), a.port))
            .collect();
        assert_eq!(
            got,
            [
                ("mig.example.net", None),
                ("10.0.1.10", Some(8080)),
                ("fe80::1", Some(81)),
                ("::1", None)
            ]
        );
    }

    #[test]
    fn rates_take_k_m_g_suffixes_and_empty_means_no_limit() {
        assert_eq!(parse_rate(""), Ok(None));
        assert_eq!(parse_rate(" "), Ok(None));
        assert_eq!(parse_rate("1"), Ok(Some(1)));
        assert_eq!(parse_rate("512k"), Ok(Some(512 << 10)));
        assert_eq!(parse_rate("8M"), Ok(Some(8 << 20)));
        assert_eq!(parse_rate("2G"), Ok(Some(2 << 30)));
        assert_eq!(parse_rate("1024G"), Ok(Some(1 << 40)));
        for bad in [
            "0",
            "0M",
            "M",
            "8MB",
            "1.5M",
            "8 M",
            "-1",
            "1025G",
            "99999999999999999999",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = load_with(dir.path(), &[], &[]).unwrap();
        assert_eq!(p.max_rate, None);
        let p = load_with(dir.path(), &[("MIG_MAX_RATE", "8M")], &[]).unwrap();
        assert_eq!(p.max_rate, Some(8 << 20));
    }

    #[test]
    fn webhooks_take_several_urls_and_need_a_secret_that_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let p = load_with(
            dir.path(),
            &[],
            &[
                "webhook_url=http://a.example/h, https://b.example:8443/x?y=1",
                "webhook_secret=s3cret-value",
            ],
        )
        .unwrap();
        assert_eq!(
            p.webhook_url,
            ["http://a.example/h", "https://b.example:8443/x?y=1"]
        );
        assert_eq!(p.webhook_secret.expose(), "s3cret-value");
        assert!(!format!("{p:?}").contains("s3cret-value"));
        let e = PropertyError {
            name: "webhook_secret".into(),
            origin: Origin::Set,
            given: Some("s3cret-value".into()),
            problem: "x".into(),
        };
        assert!(!e.to_string().contains("s3cret-value"));
    }

    #[test]
    fn precopy_is_on_by_default_and_only_on_or_off() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_with(dir.path(), &[], &[]).unwrap().precopy);
        assert!(
            !load_with(dir.path(), &[], &["precopy=off"])
                .unwrap()
                .precopy
        );
        assert_eq!(
            one_error(dir.path(), &[], &["precopy=yes"]),
            r#"precopy = "yes" (from --set): must be on or off"#
        );
    }

    #[test]
    fn proxy_path_is_auto_by_default_and_one_of_four() {
        let dir = tempfile::tempdir().unwrap();
        let p = load_with(dir.path(), &[], &[]).unwrap();
        assert_eq!(p.proxy_path, proxy::ProxyPath::Auto);
        for (set, want) in [
            ("proxy_path=sockmap", proxy::ProxyPath::Sockmap),
            ("proxy_path=splice", proxy::ProxyPath::Splice),
            ("proxy_path=copy", proxy::ProxyPath::Copy),
        ] {
            assert_eq!(load_with(dir.path(), &[], &[set]).unwrap().proxy_path, want);
        }
        assert_eq!(
            one_error(dir.path(), &[], &["proxy_path=fast"]),
            r#"proxy_path = "fast" (from --set): 'fast' is not a pass-through path (use auto, sockmap, splice or copy)"#
        );
    }

    #[test]
    fn mode_allows() {
        assert!(Mode::Both.allows("migrate") && Mode::Both.allows("snapshot"));
        assert!(Mode::Migrate.allows("migrate") && !Mode::Migrate.allows("snapshot"));
        assert!(!Mode::Snapshot.allows("migrate") && !Mode::Both.allows("copy"));
    }
}
