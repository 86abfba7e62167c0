//! The grid.info file: which grids exist, how to reach their controllers and where MIG and MigHelper
//! live on each.
//!
//! The parser reports **every** problem it finds, in file order, each as `PATH:LINE:COL: message`
//! with LINE and COL (1-based, COL counted in characters) on the offending token, so that
//! `mig check` shows a user everything to fix in one go. It recovers line by line: one bad line
//! never hides the problems of the next.
//!
//! Format (see `conf/sample.grid.info`, the template users copy):
//!
//! ```text
//! # comment lines start with '#', blank lines are ignored
//! grid g1:                 # `{` on this line or the next; a comment may follow `:`, `{` and `}`
//! {
//!   controller = 10.0.0.5  # host, host:port or user@host[:port]
//!   location = Los Angeles # free text; a `#` after a blank starts a comment, `Rack#4` keeps it
//!   MIG_ip = 10.0.1.10:8080
//!   app_config = "in_ip=10.0.1.10 motd='hello world'"
//!   MigHelper_config = "in_ip=10.0.1.20 out_ip=10.0.1.21 netmask=255.255.255.0 gateway=10.0.1.1"
//! }
//! ```
//!
//! A value is either unquoted (the rest of the line up to a comment, trimmed: a `#` that follows a
//! space or tab starts a comment, a `#` inside a word such as `Rack#4` is part of the value) or
//! wrapped in `"..."`, where `\"` and `\\` are the only escapes, a `#` is part of the value, and a
//! comment may follow the closing quote. A property list (`app_config`, `MigHelper_config`) holds
//! `name=value` pairs separated by spaces or tabs; a value that needs a space is wrapped in single
//! quotes, or in double quotes written `\"` inside the outer quotes; there are no escapes inside
//! those inner quotes, so `'` can hold `"` and the other way round.
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use dialect::Controller;
use serde::Serialize;

mod parser;

pub use parser::{parse, split_lines};

/// grid.info holds a handful of grid blocks; anything larger is the wrong file.
pub const MAX_SIZE: u64 = 1024 * 1024;

/// Past this many problems, more lines of them only bury the first ones (e.g. a binary file).
const MAX_DIAGNOSTICS: usize = 100;

/// One problem in a grid.info file. `line` and `col` are 1-based; both are 0 for a problem with
/// the file as a whole (cannot read it, too large, no grid in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `PATH:LINE:COL: message`, or `PATH: message` for a problem with the whole file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            let (p, l, c) = (self.path.display(), self.line, self.col);
            write!(f, "{p}:{l}:{c}: {}", self.message)
        }
    }
}

/// A `host:port` address (`[v6addr]:port` for IPv6), port 1-65535.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a `host:port` was refused; `offset` is the character offset of the bad part in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct HostPortError {
    pub offset: usize,
    pub reason: String,
}

impl FromStr for HostPort {
    type Err = HostPortError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |offset: usize, reason: String| HostPortError { offset, reason };
        let chars_to = |byte: usize| s[..byte].chars().count();
        let (host, port, port_byte) = if let Some(rest) = s.strip_prefix('[') {
            let Some(end) = rest.find(']') else {
                return Err(err(
                    0,
                    "`[` opens an IPv6 address but no `]` closes it".into(),
                ));
            };
            let host = &rest[..end];
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(err(1, format!("`{host}` is not an IPv6 address")));
            }
            let Some(port) = rest[end + 1..].strip_prefix(':') else {
                let reason = "expected `:PORT` after `]`, e.g. [::1]:8080".into();
                return Err(err(chars_to(end + 2), reason));
            };
            (host, port, end + 3)
        } else {
            let Some((host, port)) = s.rsplit_once(':') else {
                let reason = format!("`{s}` has no port: write HOST:PORT, e.g. 10.0.1.10:8080");
                return Err(err(s.chars().count(), reason));
            };
            if host.contains(':') {
                let reason = "an IPv6 address needs brackets: [ADDRESS]:PORT".into();
                return Err(err(0, reason));
            }
            validate_host(host).map_err(|r| err(0, r))?;
            (host, port, host.len() + 1)
        };
        let port = parse_port(port).map_err(|r| err(chars_to(port_byte), r))?;
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

/// A host name or an IPv4 address. Something that looks like an address must be a valid one.
fn validate_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty: write HOST:PORT, e.g. 10.0.1.10:8080".into());
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return match host.parse::<Ipv4Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("`{host}` is not a valid IPv4 address")),
        };
    }
    let ok = host.len() <= 253
        && !host.starts_with(['-', '.'])
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{host}` is not a valid host name: use letters, digits, '-' and '.'"
        ))
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() {
        return Err("the port is missing after `:`: use a number 1-65535".into());
    }
    if !p.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("`{p}` is not a port number: use 1-65535"));
    }
    match p.parse::<u16>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("port {p} is out of range: use 1-65535")),
    }
}

fn serialize_display<T: fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// One grid block of grid.info, fully validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grid {
    pub id: String,
    #[serde(serialize_with = "serialize_display")]
    pub controller: Controller,
    pub location: Option<String>,
    pub mig_ip: HostPort,
    /// `app_config`'s properties, in file order (empty when the key is absent).
    pub app_config: Vec<(String, String)>,
    /// `MigHelper_config`'s properties, in file order; `in_ip`, `out_ip`, `netmask` and `gateway`
    /// are always there and valid IPv4 addresses.
    pub mighelper_config: Vec<(String, String)>,
    /// The line of `grid ID:`.
    pub line: usize,
}

impl Grid {
    /// The value of a `MigHelper_config` property.
    pub fn mighelper(&self, name: &str) -> Option<&str> {
        lookup(&self.mighelper_config, name)
    }

    /// The value of an `app_config` property.
    pub fn app(&self, name: &str) -> Option<&str> {
        lookup(&self.app_config, name)
    }
}

fn lookup<'a>(props: &'a [(String, String)], name: &str) -> Option<&'a str> {
    props
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A whole grid.info file: its grids, in file order, ids unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GridInfo {
    pub path: PathBuf,
    pub grids: Vec<Grid>,
}

impl GridInfo {
    pub fn get(&self, id: &str) -> Option<&Grid> {
        self.grids.iter().find(|g| g.id == id)
    }
}

/// Reads and parses a grid.info file; failing to read it is a [`Diagnostic`] too.
pub fn load(path: &Path) -> Result<GridInfo, Vec<Diagnostic>> {
    let whole = |message: String| vec![file_level(path, message)];
    let file = std::fs::File::open(path).map_err(|e| {
        whole(format!(
            "cannot read: {e}; copy conf/sample.grid.info there or set grid_info_file"
        ))
    })?;
    let meta = file
        .metadata()
        .map_err(|e| whole(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(whole(
            "is not a regular file: grid_info_file must name a file".into(),
        ));
    }
    if meta.len() > MAX_SIZE {
        return Err(whole(too_large(meta.len())));
    }
    // `take` guards against a file that grows between the size check and the read.
    let mut bytes = Vec::new();
    file.take(MAX_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| whole(format!("cannot read: {e}")))?;
    parse(path, &bytes)
}

fn file_level(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        path: path.to_path_buf(),
        line: 0,
        col: 0,
        message,
    }
}

fn too_large(len: u64) -> String {
    format!(
        "file is larger than 1 MiB ({len} bytes): grid.info holds a few grid blocks; \
         check that grid_info_file names the right file"
    )
}
