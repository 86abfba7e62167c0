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

/// The prefix of `app migrate`'s bandwidth limit, `--max_rate=BYTES` (bytes per second): the
/// target grid's pull moves at most that many bytes a second over the link.
pub const MAX_RATE_OPTION: &str = "--max_rate=";

/// One command of the dialect, fully validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    List {
        batch: bool,
    },
    Info {
        name: AppName,
        batch: bool,
    },
    /// Creates, configures and starts an application from a template.
    Provision {
        template: AppName,
        name: AppName,
        props: Vec<Prop>,
    },
    Start {
        name: AppName,
    },
    Stop {
        name: AppName,
    },
    Destroy {
        name: AppName,
    },
    Config {
        name: AppName,
        props: Vec<Prop>,
    },
    /// Run on the target grid with `import`: pulls `app` from the controller `remote`.
    Migrate {
        remote: Controller,
        app: AppName,
        new_name: AppName,
        import: bool,
        novols: bool,
        nocompress: bool,
        props: Vec<Prop>,
        progress_on_stdout: bool,
        /// `--max_rate=BYTES`: the most bytes per second the pull may move (MIG's `max_rate`).
        max_rate: Option<u64>,
        /// `--stage`: a pre-copy of a running `app` into a staged copy `new_name` (not startable).
        stage: bool,
        /// `--delta`: the final pull into the staged copy `new_name`: only what changed moves.
        delta: bool,
    },
    /// gridctl's extension for tests and operators: one `VOLUME\tSIZE\tblake3:HEX` line per volume.
    Checksum {
        name: AppName,
    },
    /// The grid itself (gridctl's extension, for MIG's dry run): with `--batch`, `KEY\tVALUE`
    /// lines: `free_bytes` (room for new volumes), one `template` per template, one `address`
    /// per IP address an application's properties hold.
    Grid {
        batch: bool,
    },
    /// `app migrate REMOTE APP .name=NEW --import --check`: the pull's own trust tested without
    /// copying: this grid reaches REMOTE with its own key and pinned host key, REMOTE lets it
    /// export APP, and NEW is free here. Prints `KEY\tVALUE` lines (`app_state`, `app_bytes`).
    MigrateCheck {
        remote: Controller,
        app: AppName,
        new_name: AppName,
    },
}

impl Command {
    /// The verb, as written after `app`.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::List { .. } => "list",
            Command::Info { .. } => "info",
            Command::Provision { .. } => "provision",
            Command::Start { .. } => "start",
            Command::Stop { .. } => "stop",
            Command::Destroy { .. } => "destroy",
            Command::Config { .. } => "config",
            Command::Migrate { .. } => "migrate",
            Command::Checksum { .. } => "checksum",
            Command::Grid { .. } => "grid",
            Command::MigrateCheck { .. } => "migrate",
        }
    }

    /// The argument vector, starting with `app`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["app".to_string(), self.verb().to_string()];
        let props = |a: &mut Vec<String>, p: &[Prop]| a.extend(p.iter().map(Prop::to_string));
        match self {
            Command::List { batch } | Command::Grid { batch } => {
                if *batch {
                    a.push("--batch".into());
                }
            }
            Command::MigrateCheck {
                remote,
                app,
                new_name,
            } => {
                a.push(remote.to_string());
                a.push(app.to_string());
                a.push(format!(".name={new_name}"));
                a.push("--import".into());
                a.push("--check".into());
            }
            Command::Info { name, batch } => {
                a.push(name.to_string());
                if *batch {
                    a.push("--batch".into());
                }
            }
            Command::Provision {
                template,
                name,
                props: p,
            } => {
                a.push(template.to_string());
                a.push(name.to_string());
                props(&mut a, p);
            }
            Command::Start { name }
            | Command::Stop { name }
            | Command::Destroy { name }
            | Command::Checksum { name } => a.push(name.to_string()),
            Command::Config { name, props: p } => {
                a.push(name.to_string());
                props(&mut a, p);
            }
            Command::Migrate {
                remote,
                app,
                new_name,
                import,
                novols,
                nocompress,
                props: p,
                progress_on_stdout,
                max_rate,
                stage,
                delta,
            } => {
                a.push(remote.to_string());
                a.push(app.to_string());
                a.push(format!(".name={new_name}"));
                for (on, flag) in [
                    (*import, "--import"),
                    (*novols, "--novols"),
                    (*nocompress, "--nocompress"),
                    (*stage, "--stage"),
                    (*delta, "--delta"),
                ] {
                    if on {
                        a.push(flag.into());
                    }
                }
                if let Some(r) = max_rate {
                    a.push(format!("{MAX_RATE_OPTION}{r}"));
                }
                props(&mut a, p);
                if *progress_on_stdout {
                    a.push("--progress_on_stdout".into());
                }
            }
        }
        a
    }

    /// The command line to send over SSH, every argument shell-quoted.
    pub fn to_command_line(&self) -> String {
        shell_words::join(self.to_args())
    }

    /// Parses a command line as a controller receives it (e.g. from `SSH_ORIGINAL_COMMAND`).
    pub fn parse(line: &str) -> Result<Command, DialectError> {
        let words = shell_words::split(line).map_err(|e| DialectError::Split(e.to_string()))?;
        Command::from_args(&words)
    }

    /// Parses an argument vector that starts with `app`.
    pub fn from_args<S: AsRef<str>>(words: &[S]) -> Result<Command, DialectError> {
        let words: Vec<&str> = words.iter().map(AsRef::as_ref).collect();
        match words.as_slice() {
            ["app", verb, rest @ ..] => parse_verb(verb, rest),
            _ => Err(DialectError::Unknown(shell_words::join(&words))),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_command_line())
    }
}

fn usage(verb: &'static str, reason: impl Into<String>) -> DialectError {
    DialectError::Usage {
        verb,
        reason: reason.into(),
    }
}

/// Splits the arguments of a verb into flags (from `allowed`) and positional words.
fn split_flags<'a>(
    verb: &'static str,
    rest: &[&'a str],
    allowed: &[&str],
) -> Result<(Vec<&'a str>, Vec<&'a str>), DialectError> {
    let mut flags = Vec::new();
    let mut words = Vec::new();
    for w in rest {
        if w.starts_with("--") {
            if !allowed.contains(w) {
                return Err(usage(verb, format!("unknown option {w}")));
            }
            if flags.contains(w) {
                return Err(usage(verb, format!("option {w} given twice")));
            }
            flags.push(*w);
        } else {
            words.push(*w);
        }
    }
    Ok((flags, words))
}

fn parse_props(words: &[&str]) -> Result<Vec<Prop>, DialectError> {
    words.iter().map(|w| w.parse()).collect()
}

fn parse_verb(verb: &str, rest: &[&str]) -> Result<Command, DialectError> {
    let one_name = |v: &'static str, rest: &[&str]| -> Result<AppName, DialectError> {
        let (_, words) = split_flags(v, rest, &[])?;
        match words.as_slice() {
            [name] => AppName::new(name),
            _ => Err(usage(v, "expects exactly one application name")),
        }
    };
    match verb {
        "list" => {
            let (flags, words) = split_flags("list", rest, &["--batch"])?;
            if !words.is_empty() {
                return Err(usage("list", "takes no arguments"));
            }
            Ok(Command::List {
                batch: !flags.is_empty(),
            })
        }
        "info" => {
            let (flags, words) = split_flags("info", rest, &["--batch"])?;
            match words.as_slice() {
                [name] => Ok(Command::Info {
                    name: AppName::new(name)?,
                    batch: !flags.is_empty(),
                }),
                _ => Err(usage("info", "expects exactly one application name")),
            }
        }
        "provision" => {
            let (_, words) = split_flags("provision", rest, &[])?;
            match words.as_slice() {
                [template, name, props @ ..] => Ok(Command::Provision {
                    template: AppName::new(template)?,
                    name: AppName::new(name)?,
                    props: parse_props(props)?,
                }),
                _ => Err(usage("provision", "expects TEMPLATE NAME [prop=val ...]")),
            }
        }
        "start" => Ok(Command::Start {
            name: one_name("start", rest)?,
        }),
        "stop" => Ok(Command::Stop {
            name: one_name("stop", rest)?,
        }),
        "destroy" => Ok(Command::Destroy {
            name: one_name("destroy", rest)?,
        }),
        "checksum" => Ok(Command::Checksum {
            name: one_name("checksum", rest)?,
        }),
        "grid" => {
            let (flags, words) = split_flags("grid", rest, &["--batch"])?;
            if !words.is_empty() {
                return Err(usage("grid", "takes no arguments"));
            }
            Ok(Command::Grid {
                batch: !flags.is_empty(),
            })
        }
        "config" => {
            let (_, words) = split_flags("config", rest, &[])?;
            match words.as_slice() {
                [name, props @ ..] => Ok(Command::Config {
                    name: AppName::new(name)?,
                    props: parse_props(props)?,
                }),
                _ => Err(usage("config", "expects NAME [prop=val ...]")),
            }
        }
        "migrate" => {
            let allowed = [
                "--import",
                "--novols",
                "--nocompress",
                "--progress_on_stdout",
                "--stage",
                "--delta",
                "--check",
            ];
            // The one option with a value: taken out before the plain flags are checked.
            let mut max_rate = None;
            let mut others = Vec::new();
            for w in rest {
                match w.strip_prefix(MAX_RATE_OPTION) {
                    Some(_) if max_rate.is_some() => {
                        return Err(usage("migrate", "option --max_rate given twice"))
                    }
                    Some(v) => {
                        max_rate = Some(v.parse::<u64>().ok().filter(|r| *r > 0).ok_or_else(
                            || {
                                usage(
                                    "migrate",
                                    format!("--max_rate={v}: expected a whole number of bytes per second, more than 0"),
                                )
                            },
                        )?)
                    }
                    None => others.push(*w),
                }
            }
            let (flags, words) = split_flags("migrate", &others, &allowed)?;
            let has = |f: &str| flags.contains(&f);
            if has("--stage") && has("--delta") {
                return Err(usage(
                    "migrate",
                    "--stage (the pre-copy) and --delta (the final pull) are two separate runs",
                ));
            }
            if (has("--stage") || has("--delta")) && has("--novols") {
                return Err(usage(
                    "migrate",
                    "--stage and --delta copy volumes; they do not go with --novols",
                ));
            }
            let [remote, app, new, props @ ..] = words.as_slice() else {
                return Err(usage(
                    "migrate",
                    "expects REMOTE_GRID APP .name=NEW [options] [prop=val ...]",
                ));
            };
            let new = new
                .strip_prefix(".name=")
                .ok_or_else(|| usage("migrate", "the third argument must be .name=NEW"))?;
            if flags.contains(&"--check") {
                if flags.len() != 2 || !flags.contains(&"--import") || !props.is_empty() {
                    return Err(usage(
                        "migrate",
                        "--check goes with --import alone: REMOTE_GRID APP .name=NEW --import --check",
                    ));
                }
                return Ok(Command::MigrateCheck {
                    remote: remote.parse()?,
                    app: AppName::new(app)?,
                    new_name: AppName::new(new)?,
                });
            }
            Ok(Command::Migrate {
                remote: remote.parse()?,
                app: AppName::new(app)?,
                new_name: AppName::new(new)?,
                import: flags.contains(&"--import"),
                novols: flags.contains(&"--novols"),
                nocompress: flags.contains(&"--nocompress"),
                props: parse_props(props)?,
                progress_on_stdout: flags.contains(&"--progress_on_stdout"),
                max_rate,
                stage: has("--stage"),
                delta: has("--delta"),
            })
        }
        other => Err(DialectError::Unknown(format!("app {other}"))),
    }
}

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
mod tests {
    use super::*;

    fn round_trip(c: Command) {
        let line = c.to_command_line();
        assert_eq!(Command::parse(&line).unwrap(), c, "{line}");
    }

    #[test]
    fn every_verb_round_trips_through_its_command_line() {
        let n = |s: &str| AppName::new(s).unwrap();
        round_trip(Command::List { batch: true });
        round_trip(Command::Info {
            name: n("shop"),
            batch: false,
        });
        round_trip(Command::Provision {
            template: n("MigHelper"),
            name: n("mighelper-0123abcd"),
            props: vec![
                Prop::new("in_ip", "127.0.2.20").unwrap(),
                Prop::new("env", "a b 'c' \"d\" $(id) ; rm -rf /").unwrap(),
            ],
        });
        round_trip(Command::Stop { name: n("shop") });
        round_trip(Command::Migrate {
            remote: "root@127.0.1.1:2222".parse().unwrap(),
            app: n("shop"),
            new_name: n("shop2"),
            import: true,
            novols: false,
            nocompress: true,
            props: vec![Prop::new("in_ip", "127.0.2.10").unwrap()],
            progress_on_stdout: true,
            max_rate: None,
            stage: false,
            delta: false,
        });
        round_trip(Command::Migrate {
            remote: "127.0.1.1".parse().unwrap(),
            app: n("shop"),
            new_name: n("shop2"),
            import: true,
            novols: false,
            nocompress: false,
            props: vec![],
            progress_on_stdout: true,
            max_rate: Some(8 << 20),
            stage: false,
            delta: false,
        });
        for (stage, delta) in [(true, false), (false, true)] {
            round_trip(Command::Migrate {
                remote: "127.0.1.1:2222".parse().unwrap(),
                app: n("shop"),
                new_name: n("shop2"),
                import: true,
                novols: false,
                nocompress: false,
                props: vec![],
                progress_on_stdout: true,
                max_rate: None,
                stage,
                delta,
            });
        }
    }

    #[test]
    fn the_bandwidth_limit_is_one_option_with_a_positive_number() {
        let c =
            Command::parse("app migrate g1 shop .name=shop2 --import --max_rate=8388608").unwrap();
        assert!(matches!(
            c,
            Command::Migrate {
                max_rate: Some(8388608),
                ..
            }
        ));
        assert!(c.to_command_line().contains("--max_rate=8388608"));
        for bad in [
            "--max_rate=",
            "--max_rate=0",
            "--max_rate=8M",
            "--max_rate=-1",
        ] {
            let e = Command::parse(&format!("app migrate g1 shop .name=s2 --import {bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("--max_rate"), "{bad}: {e}");
        }
        let e = Command::parse("app migrate g1 shop .name=s2 --max_rate=1 --max_rate=2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn stage_and_delta_are_two_runs_and_need_volumes() {
        for (line, want) in [
            (
                "app migrate g1 a .name=b --import --stage --delta",
                "two separate runs",
            ),
            (
                "app migrate g1 a .name=b --import --delta --novols",
                "do not go with --novols",
            ),
        ] {
            let e = Command::parse(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn the_dry_runs_forms_round_trip_and_check_takes_no_other_option() {
        round_trip(Command::Grid { batch: true });
        let check = Command::MigrateCheck {
            remote: "root@127.0.1.1:2222".parse().unwrap(),
            app: AppName::new("shop").unwrap(),
            new_name: AppName::new("shop2").unwrap(),
        };
        assert_eq!(
            check.to_command_line(),
            "app migrate root@127.0.1.1:2222 shop '.name=shop2' --import --check"
        );
        round_trip(check);
        for bad in [
            "app migrate g1 shop .name=shop2 --check",
            "app migrate g1 shop .name=shop2 --import --check --novols",
            "app migrate g1 shop .name=shop2 --import --check in_ip=1.2.3.4",
            "app grid extra",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hostile_value_stays_one_argument() {
        let c = Command::Config {
            name: AppName::new("shop").unwrap(),
            props: vec![Prop::new("x", "$(id); rm -rf / `reboot`").unwrap()],
        };
        let line = c.to_command_line();
        assert_eq!(
            shell_words::split(&line).unwrap(),
            vec!["app", "config", "shop", "x=$(id); rm -rf / `reboot`"]
        );
    }

    #[test]
    fn injection_in_names_is_refused() {
        for bad in [
            "x; rm -rf /",
            "$(id)",
            "`id`",
            "a b",
            "",
            "-rf",
            "1abc",
            "a/b",
        ] {
            assert!(AppName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            Command::parse("app stop 'x; rm -rf /'"),
            Err(DialectError::Name(_))
        ));
        assert!(matches!(
            Command::parse("app info $(id)"),
            Err(DialectError::Name(_))
        ));
    }

    #[test]
    fn anything_outside_the_dialect_is_refused() {
        for line in [
            "ls -la",
            "app",
            "app reboot",
            "app list extra",
            "app stop",
            "app migrate a b c",
            "app list --force",
            "app info shop --batch --batch",
            "app config shop novalue",
            "app config shop x=\"unterminated",
        ] {
            assert!(Command::parse(line).is_err(), "{line:?} accepted");
        }
    }

    #[test]
    fn property_values_with_control_characters_are_refused() {
        assert!(Prop::new("x", "a\nb").is_err());
        assert!(Prop::new("x", "a\u{7f}").is_err());
        assert!(Prop::new("1x", "a").is_err());
        assert!(Prop::new(".name", "a").is_err());
        assert!(Prop::new("a.b_c", "with spaces and 'quotes'").is_ok());
    }

    #[test]
    fn controller_addresses() {
        let c: Controller = "admin@grid-1.example:2222".parse().unwrap();
        assert_eq!(c.user.as_deref(), Some("admin"));
        assert_eq!(c.host, "grid-1.example");
        assert_eq!(c.port, Some(2222));
        assert_eq!(c.to_string(), "admin@grid-1.example:2222");
        let c: Controller = "10.0.0.5".parse().unwrap();
        assert_eq!((c.port_or_default(), c.user_or_default()), (22, "root"));
        for bad in [
            "",
            "h:0",
            "h:99999",
            "a b",
            "@h",
            "Root@h",
            "-oProxy=x",
            "h:",
        ] {
            assert!(bad.parse::<Controller>().is_err(), "{bad:?} accepted");
        }
    }
}
