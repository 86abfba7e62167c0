//! The value types properties are read into, and how a bad one is reported.

use std::fmt;
use std::path::PathBuf;

use super::SECRET_NAMES;

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

/// One entry of `allowed_hosts`: a host name or IP address (lowercase, IPv6 without brackets),
/// and the port it must come with, when one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    pub host: String,
    pub port: Option<u16>,
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
