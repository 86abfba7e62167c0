//! The commands of the dialect: each verb with its validated arguments, the line that carries it
//! ([`Command::to_command_line`]) and that line parsed back ([`Command::parse`]).

use std::fmt;

use crate::{AppName, Controller, DialectError, Prop};

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
