//! The proxy's configuration and the `passthrough` property's syntax.

use std::net::IpAddr;
use std::time::Duration;

pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of the `max_connections_per_client` property. Generous for clients behind one NAT
/// address (some 40 browsers at their 6 connections per host), yet small against
/// [`DEFAULT_MAX_CONNECTIONS`]: filling the global limit takes 40 addresses, not one.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// How long a connection to `aux` may take before the client is closed.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long live connections may go on after shutdown begins.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

/// What the proxy listens on and where it sends connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The `in` address the pass-through listeners bind.
    pub listen: IpAddr,
    /// Upstream host (name or IP); `None` leaves `aux` unconnected: connections are accepted and
    /// closed at once, counted as refused.
    pub aux: Option<String>,
    /// Pass-through ports (see [`parse_passthrough`]); port 0 binds an ephemeral port (tests).
    pub ports: Vec<u16>,
    /// When set, every listener connects to this port on `aux` instead of its own port number.
    /// For tests and benchmarks that bind port 0; `mig serve` leaves it `None`.
    pub upstream_port: Option<u16>,
    /// Concurrent connections at most; past it new connections wait in the accept backlog.
    pub max_connections: usize,
    /// Concurrent connections from one client address at most, all ports together; past it that
    /// address's new connections are reset at once while other clients still get in.
    pub max_connections_per_client: usize,
    /// Time allowed to resolve and connect to `aux`.
    pub connect_timeout: Duration,
    /// A connection with no byte moving in either direction for this long is cut.
    pub idle_timeout: Option<Duration>,
    /// On [`Shutdown`], how long live connections may go on before they are cut.
    pub drain: Duration,
    /// How bytes move (the `proxy_path` property): `Auto` takes the sockmap path where BPF works
    /// and splice elsewhere.
    pub path: ProxyPath,
}

/// How the pass-through moves bytes: the `proxy_path` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyPath {
    /// The sockmap path where it can be used (root, a kernel with sockmap, the BPF program
    /// built and accepted), splice otherwise.
    #[default]
    Auto,
    /// Bytes redirected inside the kernel by a BPF program; an error where that cannot work.
    Sockmap,
    /// `splice(2)` through a pipe.
    Splice,
    /// A plain read/write copy loop.
    Copy,
}

impl ProxyPath {
    /// The property's and the metric's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyPath::Auto => "auto",
            ProxyPath::Sockmap => "sockmap",
            ProxyPath::Splice => "splice",
            ProxyPath::Copy => "copy",
        }
    }
}

impl std::fmt::Display for ProxyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProxyPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ProxyPath::Auto),
            "sockmap" => Ok(ProxyPath::Sockmap),
            "splice" => Ok(ProxyPath::Splice),
            "copy" => Ok(ProxyPath::Copy),
            _ => Err(format!(
                "'{s}' is not a pass-through path (use auto, sockmap, splice or copy)"
            )),
        }
    }
}

impl ProxyConfig {
    /// A configuration with the documented defaults for everything but the addresses.
    pub fn new(listen: IpAddr, aux: Option<String>, ports: Vec<u16>) -> Self {
        ProxyConfig {
            listen,
            aux,
            ports,
            upstream_port: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: None,
            drain: DEFAULT_DRAIN,
            path: ProxyPath::Auto,
        }
    }
}

/// Parses the `passthrough` property: ports and inclusive ranges separated by commas, e.g.
/// `80,443,5000-5010`. Spaces around items are allowed; an empty string means no pass-through.
/// The error names the offending item and why it is wrong.
pub fn parse_passthrough(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    if s.trim().is_empty() {
        return Ok(ports);
    }
    let mut seen = std::collections::HashSet::new();
    for (i, item) in s.split(',').enumerate() {
        let item = item.trim();
        let n = i + 1;
        if item.is_empty() {
            return Err(format!(
                "item {n} is empty (expected a port like 443 or a range like 5000-5010)"
            ));
        }
        let (lo, hi) = match item.split_once('-') {
            None => {
                let p = parse_port(item, n)?;
                (p, p)
            }
            Some((a, b)) => {
                let lo = parse_port(a.trim(), n)?;
                let hi = parse_port(b.trim(), n)?;
                if lo > hi {
                    return Err(format!(
                        "range '{item}' (item {n}) runs backwards; write {hi}-{lo}"
                    ));
                }
                (lo, hi)
            }
        };
        for p in lo..=hi {
            if !seen.insert(p) {
                return Err(format!(
                    "port {p} is listed twice (again in '{item}', item {n})"
                ));
            }
            ports.push(p);
        }
    }
    Ok(ports)
}

fn parse_port(text: &str, item: usize) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Err(format!("port 0 in item {item} is not a port (use 1-65535)")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!(
            "'{text}' in item {item} is not a port number (use 1-65535)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_path_names() {
        for p in [
            ProxyPath::Auto,
            ProxyPath::Sockmap,
            ProxyPath::Splice,
            ProxyPath::Copy,
        ] {
            assert_eq!(p.as_str().parse::<ProxyPath>(), Ok(p));
        }
        let e = "fast".parse::<ProxyPath>().unwrap_err();
        assert!(
            e.contains("'fast'") && e.contains("auto, sockmap, splice or copy"),
            "{e}"
        );
    }

    #[test]
    fn passthrough_lists_and_ranges() {
        assert_eq!(
            parse_passthrough("80,443,5000-5003").unwrap(),
            vec![80, 443, 5000, 5001, 5002, 5003]
        );
        assert_eq!(parse_passthrough(" 22 , 7-7 ").unwrap(), vec![22, 7]);
        assert_eq!(parse_passthrough("").unwrap(), Vec::<u16>::new());
        assert_eq!(parse_passthrough("65535").unwrap(), vec![65535]);
    }

    #[test]
    fn passthrough_errors_name_the_bad_part() {
        let cases = [
            ("80,http", "'http' in item 2 is not a port"),
            ("80,,443", "item 2 is empty"),
            ("443,", "item 2 is empty"),
            ("0", "port 0 in item 1"),
            ("70000", "'70000' in item 1"),
            (
                "5010-5000",
                "range '5010-5000' (item 1) runs backwards; write 5000-5010",
            ),
            (
                "5000-5010,5005",
                "port 5005 is listed twice (again in '5005', item 2)",
            ),
            ("1-x", "'x' in item 1"),
            ("-5", "'' in item 1"),
        ];
        for (input, want) in cases {
            let err = parse_passthrough(input).unwrap_err();
            assert!(err.contains(want), "{input:?}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn config_defaults() {
        let c = ProxyConfig::new("127.0.0.1".parse().unwrap(), None, vec![80]);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_connections_per_client, 256);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.drain, Duration::from_secs(5));
        assert_eq!(c.path, ProxyPath::Auto);
        assert_eq!(c.upstream_port, None);
    }
}
