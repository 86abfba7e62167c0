//! The typed parse and validation of each property: raw strings in, typed values or one error per
//! bad property out.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{AllowedHost, Mode, Properties, PropertyError, Raw, Secret};

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

/// Turns raw strings into typed values, collecting every error.
pub(super) struct Typed<'a> {
    dir: &'a Path,
    raw: &'a BTreeMap<String, Raw>,
    errors: &'a mut Vec<PropertyError>,
}

impl<'a> Typed<'a> {
    pub(super) fn new(
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

    pub(super) fn finish(mut self) -> Properties {
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
