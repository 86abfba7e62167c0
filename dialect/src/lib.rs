//! The AppLogic command dialect, the one language MIG and a grid controller share.
//!
//! MIG builds [`Command`]s and sends [`Command::to_command_line`] over SSH; a controller (gridctl)
//! receives that line and turns it back into a [`Command`] with [`Command::parse`]. Both ends go
//! through the same validation, so a name or a property value can never smuggle a shell command:
//! values are checked here and quoted with a real shell-words quoter on the way out.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// What was wrong with a command or one of its parts. The messages name the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialectError {
    #[error("invalid application name {0:?}: use 1-64 letters, digits, '-' or '_', starting with a letter")]
    Name(String),
    #[error("invalid property name {0:?}: use letters, digits, '_' and '.', not starting with a digit or '.'")]
    PropName(String),
    #[error("invalid value for property {name}: {reason}")]
    PropValue { name: String, reason: &'static str },
    #[error("invalid property argument {0:?}: expected NAME=VALUE")]
    PropSyntax(String),
    #[error("invalid controller address {0:?}: expected host, host:port or user@host[:port]")]
    Controller(String),
    #[error("cannot split the command line: {0}")]
    Split(String),
    #[error("not an AppLogic command: {0}")]
    Unknown(String),
    #[error("{verb}: {reason}")]
    Usage { verb: &'static str, reason: String },
}

/// An application or template name, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppName(String);

impl AppName {
    pub fn new(s: &str) -> Result<Self, DialectError> {
        let ok = (1..=64).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(AppName(s.to_string()))
        } else {
            Err(DialectError::Name(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for AppName {
    type Err = DialectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AppName::new(s)
    }
}

/// Checks a property name: `[A-Za-z_][A-Za-z0-9_.]*`, at most 128 characters.
pub fn validate_prop_name(name: &str) -> Result<(), DialectError> {
    let ok = (1..=128).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(DialectError::PropName(name.to_string()))
    }
}

/// Checks a property value: no control characters (newlines included), at most 64 KiB.
pub fn validate_prop_value(name: &str, value: &str) -> Result<(), DialectError> {
    if value.len() > 65536 {
        return Err(DialectError::PropValue {
            name: name.to_string(),
            reason: "longer than 65536 bytes",
        });
    }
    if value.chars().any(char::is_control) {
        return Err(DialectError::PropValue {
            name: name.to_string(),
            reason: "contains a control character",
        });
    }
    Ok(())
}

/// One `name=value` property argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prop {
    pub name: String,
    pub value: String,
}

impl Prop {
    pub fn new(name: &str, value: &str) -> Result<Self, DialectError> {
        validate_prop_name(name)?;
        validate_prop_value(name, value)?;
        Ok(Prop {
            name: name.to_string(),
            value: value.to_string(),
        })
    }
}

impl FromStr for Prop {
    type Err = DialectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| DialectError::PropSyntax(s.to_string()))?;
        Prop::new(name, value)
    }
}

impl fmt::Display for Prop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

/// A grid controller's address: `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Controller {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl Controller {
    /// The port to connect to, 22 when none was given.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(22)
    }

    /// The user to log in as, `root` when none was given (AppLogic's default).
    pub fn user_or_default(&self) -> &str {
        self.user.as_deref().unwrap_or("root")
    }
}

impl FromStr for Controller {
    type Err = DialectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DialectError::Controller(s.to_string());
        let (user, rest) = match s.split_once('@') {
            Some((u, r)) => (Some(u), r),
            None => (None, s),
        };
        if let Some(u) = user {
            let ok = !u.is_empty()
                && u.len() <= 32
                && u.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && u.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !ok {
                return Err(bad());
            }
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p.parse().map_err(|_| bad())?;
                if port == 0 {
                    return Err(bad());
                }
                (h, Some(port))
            }
            None => (rest, None),
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && !host.starts_with(['-', '.'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !host_ok {
            return Err(bad());
        }
        Ok(Controller {
            user: user.map(str::to_string),
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

mod command;
pub use command::{Command, MAX_RATE_OPTION};

/// Application states, lowercase as AppLogic prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Stopped => "stopped",
            AppState::Starting => "starting",
            AppState::Running => "running",
            AppState::Stopping => "stopping",
            AppState::Failed => "failed",
        }
    }
}

impl fmt::Display for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AppState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stopped" => AppState::Stopped,
            "starting" => AppState::Starting,
            "running" => AppState::Running,
            "stopping" => AppState::Stopping,
            "failed" => AppState::Failed,
            other => return Err(format!("unknown application state {other:?}")),
        })
    }
}

#[cfg(test)]
mod tests;
