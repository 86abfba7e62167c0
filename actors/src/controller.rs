//! The one interface through which MIG touches a grid: [`GridController`].
//!
//! The actors never build command strings. They call these methods with plain names and property
//! pairs; an implementation validates them into a [`dialect::Command`] (so a hostile name is refused
//! before anything leaves MIG), sends it, and turns the controller's `--batch` output into the typed
//! results below. [`crate::ssh::SshGrid`] is the real implementation; tests and future drivers (e.g.
//! libvirt) can stand in.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use dialect::{AppName, AppState, Command, Controller, DialectError, Prop};

/// One line of `app list --batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSummary {
    pub name: String,
    pub state: AppState,
    pub template: String,
}

/// `app info NAME --batch`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppInfo {
    pub name: String,
    pub state: AppState,
    pub template: String,
    /// The controller's last failure for this application (`error` line), when it reports one.
    pub error: Option<String>,
    /// `prop.NAME` lines, in the controller's order.
    pub props: Vec<(String, String)>,
    /// `volume.NAME` lines: volume name and size in bytes.
    pub volumes: Vec<(String, u64)>,
    /// Any other `key<TAB>value` line (e.g. `volume.data.kind`), kept so a newer controller does
    /// not break an older MIG.
    pub extra: Vec<(String, String)>,
}

impl AppInfo {
    /// The value of property `name`, if the application has it.
    pub fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One line of `app checksum NAME`: a volume, its size and its BLAKE3 digest (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeChecksum {
    pub volume: String,
    pub size: u64,
    pub blake3: String,
}

/// Called with `(bytes_done, bytes_total)` as a migration reports progress.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// The future every [`GridController`] method returns: boxed so the trait stays object safe
/// (`Arc<dyn GridController>`), and `Send` so actors can run it with `ctx.spawn` on any arbiter.
pub type GridFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, GridError>> + Send + 'a>>;

/// Everything MIG does to a grid. Names are validated by the implementation (bad ones give
/// [`GridError::Invalid`] before any connection is made).
pub trait GridController: Send + Sync {
    /// The controller this talks to, for messages and logs.
    fn controller(&self) -> &Controller;
    fn list(&self) -> GridFuture<'_, Vec<AppSummary>>;
    fn info<'a>(&'a self, name: &'a str) -> GridFuture<'a, AppInfo>;
    /// Creates, configures and starts `name` from `template`.
    fn provision<'a>(
        &'a self,
        template: &'a str,
        name: &'a str,
        props: &'a [(String, String)],
    ) -> GridFuture<'a, ()>;
    fn start<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()>;
    fn stop<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()>;
    fn destroy<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()>;
    fn config<'a>(&'a self, name: &'a str, props: &'a [(String, String)]) -> GridFuture<'a, ()>;
    /// Runs `app migrate REMOTE APP .name=NEW --import … --progress_on_stdout` on this grid: pulls
    /// `app` from the controller `remote` as `new_name`. `progress` is called as each progress
    /// line arrives, not at the end.
    fn migrate_import<'a>(
        &'a self,
        remote: &'a Controller,
        app: &'a str,
        new_name: &'a str,
        props: &'a [(String, String)],
        opts: MigrateOptions,
        progress: ProgressFn<'a>,
    ) -> GridFuture<'a, ()>;
    /// gridctl's extension: the BLAKE3 digest of each volume, to prove bytes arrived intact.
    fn checksum<'a>(&'a self, name: &'a str) -> GridFuture<'a, Vec<VolumeChecksum>>;
    /// gridctl's extension (`app grid --batch`), for the dry run: room for volumes, templates,
    /// addresses in use.
    fn grid_summary(&self) -> GridFuture<'_, GridSummary>;
    /// `app migrate REMOTE APP .name=NEW --import --check`, for the dry run: the pull's own
    /// trust (this grid reaches `remote` and may export `app`) and `new_name` free, no copy.
    fn check_import<'a>(
        &'a self,
        remote: &'a Controller,
        app: &'a str,
        new_name: &'a str,
    ) -> GridFuture<'a, ()>;
}

/// `app grid --batch`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GridSummary {
    /// Bytes free for new volumes.
    pub free_bytes: u64,
    pub templates: Vec<String>,
    /// IP addresses the grid's applications' properties hold.
    pub addresses: Vec<String>,
}

/// The optional flags of `app migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateOptions {
    /// `--nocompress`: send volumes as they are (best on a fast link).
    pub nocompress: bool,
    /// `--novols`: copy the descriptor only.
    pub novols: bool,
    /// `--max_rate=BYTES`: the most bytes per second the pull may move (property `max_rate`).
    pub max_rate: Option<u64>,
    /// `--stage`: pre-copy the (running) application into a staged copy, not startable.
    pub stage: bool,
    /// `--delta`: the final pull into the staged copy: only the chunks that changed move.
    pub delta: bool,
}

/// What went wrong talking to a grid controller. Every variant names the controller; command
/// failures carry the remote exit code and stderr.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("cannot connect to grid controller {addr}: {reason}")]
    Connect { addr: String, reason: String },

    #[error(
        "grid controller {addr} presented a host key that is not in {known_hosts}: {fingerprint}. \
         Refusing to connect. If this is the controller's key (check the fingerprint out of band, \
         e.g. `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the controller), trust it with: \
         ssh-keyscan -p {port} {host} >> {known_hosts}",
        known_hosts = known_hosts.display()
    )]
    UnknownHostKey {
        addr: String,
        host: String,
        port: u16,
        fingerprint: String,
        known_hosts: PathBuf,
    },

    #[error(
        "grid controller {addr} presented host key {fingerprint}, which is NOT the key pinned for it \
         in {known_hosts}: refusing to connect (someone may be intercepting the connection). If the \
         controller's key was changed on purpose, check the new fingerprint out of band, then run \
         `ssh-keygen -R '[{host}]:{port}' -f {known_hosts}` and \
         `ssh-keyscan -p {port} {host} >> {known_hosts}`",
        known_hosts = known_hosts.display()
    )]
    HostKeyChanged {
        addr: String,
        host: String,
        port: u16,
        fingerprint: String,
        known_hosts: PathBuf,
    },

    #[error("cannot read known hosts file {}: {reason}", path.display())]
    KnownHosts { path: PathBuf, reason: String },

    #[error(
        "grid controller {addr} refused key {} for user {user} ({reason}); authorize its public \
         key on the controller",
        key_file.display()
    )]
    Auth {
        addr: String,
        user: String,
        key_file: PathBuf,
        reason: String,
    },

    #[error("cannot use private key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },

    #[error("grid controller {addr}: `{command}` timed out after {}", fmt_duration(*after))]
    Timeout {
        addr: String,
        command: String,
        after: Duration,
    },

    #[error("grid controller {addr}: `{command}` {status}{}", fmt_stderr(stderr))]
    Command {
        addr: String,
        command: String,
        /// The remote exit code; `None` when the command died of a signal.
        exit_code: Option<i32>,
        /// `exited with code N` or `was killed by signal S`.
        status: String,
        stderr: String,
    },

    #[error("SSH session with grid controller {addr} broke during `{command}`: {reason}")]
    Session {
        addr: String,
        command: String,
        reason: String,
    },

    #[error("grid controller {addr}: cannot parse the output of `{command}`: {reason}")]
    Parse {
        addr: String,
        command: String,
        reason: String,
    },

    #[error("refused before sending anything to the grid: {0}")]
    Invalid(#[from] DialectError),
}

impl GridError {
    /// True when the controller refused the command as outside the dialect or not allowed (exit 2).
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            GridError::Command {
                exit_code: Some(2),
                ..
            }
        )
    }
}

fn fmt_stderr(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        " (no stderr)".to_string()
    } else {
        format!(": {s}")
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn props(pairs: &[(String, String)]) -> Result<Vec<Prop>, DialectError> {
    pairs.iter().map(|(n, v)| Prop::new(n, v)).collect()
}

/// Builds the validated [`Command`]s behind each trait method, so every implementation refuses
/// the same bad input in the same way.
pub mod commands {
    use super::*;

    pub fn list() -> Command {
        Command::List { batch: true }
    }

    pub fn info(name: &str) -> Result<Command, DialectError> {
        Ok(Command::Info {
            name: AppName::new(name)?,
            batch: true,
        })
    }

    pub fn provision(
        template: &str,
        name: &str,
        p: &[(String, String)],
    ) -> Result<Command, DialectError> {
        Ok(Command::Provision {
            template: AppName::new(template)?,
            name: AppName::new(name)?,
            props: props(p)?,
        })
    }

    pub fn start(name: &str) -> Result<Command, DialectError> {
        Ok(Command::Start {
            name: AppName::new(name)?,
        })
    }

    pub fn stop(name: &str) -> Result<Command, DialectError> {
        Ok(Command::Stop {
            name: AppName::new(name)?,
        })
    }

    pub fn destroy(name: &str) -> Result<Command, DialectError> {
        Ok(Command::Destroy {
            name: AppName::new(name)?,
        })
    }

    pub fn config(name: &str, p: &[(String, String)]) -> Result<Command, DialectError> {
        Ok(Command::Config {
            name: AppName::new(name)?,
            props: props(p)?,
        })
    }

    pub fn migrate_import(
        remote: &Controller,
        app: &str,
        new_name: &str,
        p: &[(String, String)],
        opts: MigrateOptions,
    ) -> Result<Command, DialectError> {
        // A `Controller` has public fields, so it may not have come through `FromStr`: re-check.
        let remote: Controller = remote.to_string().parse()?;
        Ok(Command::Migrate {
            remote,
            app: AppName::new(app)?,
            new_name: AppName::new(new_name)?,
            import: true,
            novols: opts.novols,
            nocompress: opts.nocompress,
            props: props(p)?,
            progress_on_stdout: true,
            max_rate: opts.max_rate,
            stage: opts.stage,
            delta: opts.delta,
        })
    }

    pub fn checksum(name: &str) -> Result<Command, DialectError> {
        Ok(Command::Checksum {
            name: AppName::new(name)?,
        })
    }

    pub fn grid() -> Command {
        Command::Grid { batch: true }
    }

    pub fn check_import(
        remote: &Controller,
        app: &str,
        new_name: &str,
    ) -> Result<Command, DialectError> {
        Ok(Command::MigrateCheck {
            remote: remote.clone(),
            app: AppName::new(app)?,
            new_name: AppName::new(new_name)?,
        })
    }
}

/// Parsers for the controller's `--batch` outputs. They return a reason; the caller adds which
/// controller and command.
pub mod parse {
    use super::*;

    fn fields<'a>(line: &'a str, n: usize, what: &str) -> Result<Vec<&'a str>, String> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() == n {
            Ok(f)
        } else {
            Err(format!(
                "expected {n} tab-separated fields ({what}), got {}: {line:?}",
                f.len()
            ))
        }
    }

    fn state(s: &str, line: &str) -> Result<AppState, String> {
        s.parse().map_err(|e| format!("{e} in line {line:?}"))
    }

    fn lines(out: &str) -> impl Iterator<Item = &str> {
        out.lines().filter(|l| !l.trim().is_empty())
    }

    /// `NAME\tSTATE\tTEMPLATE` per line.
    pub fn list(out: &str) -> Result<Vec<AppSummary>, String> {
        lines(out)
            .map(|line| {
                let f = fields(line, 3, "NAME, STATE, TEMPLATE")?;
                Ok(AppSummary {
                    name: f[0].to_string(),
                    state: state(f[1], line)?,
                    template: f[2].to_string(),
                })
            })
            .collect()
    }

    /// `key\tvalue` per line; `name`, `state` and `template` are required.
    pub fn info(out: &str) -> Result<AppInfo, String> {
        let (mut name, mut st, mut template, mut error) = (None, None, None, None);
        let (mut props, mut volumes, mut extra) = (Vec::new(), Vec::new(), Vec::new());
        for line in lines(out) {
            let (k, v) = line
                .split_once('\t')
                .ok_or_else(|| format!("expected KEY<TAB>VALUE, got {line:?}"))?;
            if let Some(p) = k.strip_prefix("prop.") {
                props.push((p.to_string(), v.to_string()));
            } else if let Some(vol) = k.strip_prefix("volume.").filter(|v| !v.contains('.')) {
                let size = v
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("volume {vol}: size {v:?} is not a byte count"))?;
                volumes.push((vol.to_string(), size));
            } else {
                match k {
                    "name" => name = Some(v.to_string()),
                    "state" => st = Some(state(v, line)?),
                    "template" => template = Some(v.to_string()),
                    "error" => error = Some(v.to_string()).filter(|e| !e.trim().is_empty()),
                    _ => extra.push((k.to_string(), v.to_string())),
                }
            }
        }
        let missing = |k: &str| format!("no `{k}` line");
        Ok(AppInfo {
            name: name.ok_or_else(|| missing("name"))?,
            state: st.ok_or_else(|| missing("state"))?,
            template: template.ok_or_else(|| missing("template"))?,
            error,
            props,
            volumes,
            extra,
        })
    }

    /// `VOLUME\tSIZE\tblake3:HEX` per line.
    pub fn checksum(out: &str) -> Result<Vec<VolumeChecksum>, String> {
        lines(out)
            .map(|line| {
                let f = fields(line, 3, "VOLUME, SIZE, blake3:HEX")?;
                let size = f[1]
                    .parse()
                    .map_err(|_| format!("size {:?} is not a byte count in {line:?}", f[1]))?;
                let hex = f[2]
                    .strip_prefix("blake3:")
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| format!("expected blake3:<64 hex digits>, got {:?}", f[2]))?;
                Ok(VolumeChecksum {
                    volume: f[0].to_string(),
                    size,
                    blake3: hex.to_ascii_lowercase(),
                })
            })
            .collect()
    }

    /// `free_bytes\tN`, `template\tNAME`…, `address\tIP`… (other keys ignored).
    pub fn grid(out: &str) -> Result<GridSummary, String> {
        let mut g = GridSummary::default();
        let mut free = None;
        for line in lines(out) {
            let f = fields(line, 2, "KEY, VALUE")?;
            match f[0] {
                "free_bytes" => {
                    free = Some(
                        f[1].parse()
                            .map_err(|_| format!("free_bytes {:?} is not a byte count", f[1]))?,
                    )
                }
                "template" => g.templates.push(f[1].to_string()),
                "address" => g.addresses.push(f[1].to_string()),
                _ => {}
            }
        }
        g.free_bytes = free.ok_or("no `free_bytes` line")?;
        Ok(g)
    }

    /// One line of `--progress_on_stdout`: `progress DONE TOTAL`. `None` for any other line.
    pub fn progress(line: &str) -> Option<(u64, u64)> {
        let mut w = line.split_ascii_whitespace();
        match (w.next(), w.next(), w.next(), w.next()) {
            (Some("progress"), Some(d), Some(t), None) => Some((d.parse().ok()?, t.parse().ok()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_output_parses_and_bad_lines_are_named() {
        let l = parse::list("shop\trunning\tkvstore\nh1\tstopped\tMigHelper\n\n").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].name, "h1");
        assert_eq!(l[1].state, AppState::Stopped);
        assert_eq!(l[1].template, "MigHelper");
        assert!(parse::list("").unwrap().is_empty());
        let e = parse::list("shop\tsleeping\tkvstore\n").unwrap_err();
        assert!(e.contains("sleeping"), "{e}");
        let e = parse::list("shop running kvstore\n").unwrap_err();
        assert!(e.contains("got 1"), "{e}");
    }

    #[test]
    fn info_output_parses_props_volumes_and_extras() {
        // As gridctl prints it.
        let out =
            "name\tshop\nstate\trunning\ntemplate\tkvstore\nerror\t\nprop.in_ip\t127.0.1.10\n\
                   prop.env\ta b = c\nvolume.data\t67108864\nvolume.data.kind\tfile\n";
        let i = parse::info(out).unwrap();
        assert_eq!(i.name, "shop");
        assert_eq!(i.state, AppState::Running);
        assert_eq!(i.prop("env"), Some("a b = c"));
        assert_eq!(i.volumes, vec![("data".to_string(), 67108864)]);
        assert_eq!(i.error, None);
        assert_eq!(
            i.extra,
            vec![("volume.data.kind".to_string(), "file".to_string())]
        );
        let failed =
            parse::info("name\tx\nstate\tfailed\ntemplate\tt\nerror\tweb exited 1\n").unwrap();
        assert_eq!(failed.error.as_deref(), Some("web exited 1"));
        assert!(parse::info("name\tshop\nstate\trunning\n")
            .unwrap_err()
            .contains("template"));
        assert!(
            parse::info("name\tshop\nstate\trunning\ntemplate\tt\nvolume.d\tbig\n")
                .unwrap_err()
                .contains("volume d")
        );
    }

    #[test]
    fn checksum_output_requires_a_blake3_digest() {
        let hex = "ab".repeat(32);
        let c = parse::checksum(&format!("data\t1024\tblake3:{hex}\n")).unwrap();
        assert_eq!(
            c,
            vec![VolumeChecksum {
                volume: "data".into(),
                size: 1024,
                blake3: hex
            }]
        );
        assert!(parse::checksum("data\t1024\tsha256:00\n").is_err());
        assert!(parse::checksum("data\t1024\tblake3:xyz\n").is_err());
    }

    #[test]
    fn progress_lines() {
        assert_eq!(parse::progress("progress 10 100"), Some((10, 100)));
        assert_eq!(parse::progress("progress 10"), None);
        assert_eq!(parse::progress("copying data"), None);
        assert_eq!(parse::progress("progress 1 2 3"), None);
    }

    #[test]
    fn commands_refuse_bad_names_and_values() {
        assert!(matches!(
            commands::stop("x; rm -rf /"),
            Err(DialectError::Name(_))
        ));
        assert!(commands::provision("kvstore", "shop", &[("x".into(), "a\nb".into())]).is_err());
        let bad_remote = Controller {
            user: None,
            host: "-oProxyCommand=id".into(),
            port: None,
        };
        assert!(commands::migrate_import(
            &bad_remote,
            "shop",
            "shop2",
            &[],
            MigrateOptions::default()
        )
        .is_err());
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = GridError::UnknownHostKey {
            addr: "root@127.0.1.1:2222".into(),
            host: "127.0.1.1".into(),
            port: 2222,
            fingerprint: "SHA256:abc".into(),
            known_hosts: "/cfg/known_hosts".into(),
        };
        let m = e.to_string();
        assert!(m.contains("SHA256:abc"), "{m}");
        assert!(
            m.contains("ssh-keyscan -p 2222 127.0.1.1 >> /cfg/known_hosts"),
            "{m}"
        );
        let e = GridError::Command {
            addr: "g".into(),
            command: "app stop shop".into(),
            exit_code: Some(2),
            status: "exited with code 2".into(),
            stderr: "no such application\n".into(),
        };
        assert!(e.is_refused());
        assert_eq!(
            e.to_string(),
            "grid controller g: `app stop shop` exited with code 2: no such application"
        );
    }
}
