//! `gridctl ssh --state STATE`: the grid's sshd ForceCommand.
//!
//! It reads `SSH_ORIGINAL_COMMAND`, refuses (exit 2) anything that is not a dialect command,
//! forwards the command to the daemon and prints its answer. `app migrate … --import` runs here:
//! it pulls the application from the remote grid with OpenSSH's `ssh` and this grid's own key.
//! `peer export APP [--nocompress] [--novols]` is the source side of that pull; only keys listed
//! in `STATE/peer/peer_keys` may run it (sshd's `ExposeAuthInfo` tells which key logged in).

use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command as Proc, Stdio};

use dialect::{Command, Controller};

use crate::protocol::{Conn, Reply, Request};
use crate::transfer;

/// Exit codes: 0 ok, 1 the operation failed, 2 refused.
pub const OK: i32 = 0;
pub const FAILED: i32 = 1;
pub const REFUSED: i32 = 2;

pub fn main(state: &Path) -> i32 {
    let Ok(line) = std::env::var("SSH_ORIGINAL_COMMAND") else {
        eprintln!(
            "gridctl: refused: this grid accepts only AppLogic commands, e.g. `app list`; \
             interactive logins are not allowed"
        );
        return REFUSED;
    };
    if line == "peer" || line.starts_with("peer ") {
        return peer(state, &line);
    }
    let cmd = match Command::parse(&line) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gridctl: refused: {e}");
            return REFUSED;
        }
    };
    match cmd {
        Command::Migrate {
            remote,
            app,
            new_name,
            import,
            novols,
            nocompress,
            props,
            progress_on_stdout,
            max_rate,

            stage,
            delta,
        } => {
            if !import {
                eprintln!(
                    "gridctl: refused: this grid only pulls: run `app migrate REMOTE APP .name=NEW --import` on the target grid"
                );
                return REFUSED;
            }
            let opts = ImportOpts {
                remote: &remote,
                app: app.as_str(),
                new_name: new_name.as_str(),
                novols,
                nocompress,
                props: &props,
                progress_on_stdout,
                max_rate,
            };
            let imported = if stage {
                crate::stage::import_staged(state, &opts)
            } else if delta {
                crate::stage::import_delta(state, &opts)
            } else {
                import_app(state, &opts)
            };
            match imported {
                Ok(()) => {
                    // With --progress_on_stdout, stdout carries progress lines only.
                    if !progress_on_stdout && stage {
                        println!("staged a copy of {app} from {remote} as {new_name}; it cannot start until `--delta`");
                    } else if !progress_on_stdout {
                        println!("imported {app} from {remote} as {new_name}; it is stopped");
                    }
                    OK
                }
                Err(e) => {
                    eprintln!(
                        "gridctl: app migrate: cannot import {} from {} as {}: {e}",
                        app, remote, new_name
                    );
                    FAILED
                }
            }
        }
        Command::MigrateCheck {
            remote,
            app,
            new_name,
        } => check_import(state, &remote, app.as_str(), new_name.as_str()),
        Command::Start { .. } => {
            let code = forward(state, &cmd.to_command_line());
            if code == OK {
                transfer::hold_start_answer(state);
            }
            code
        }
        cmd => forward(state, &cmd.to_command_line()),
    }
}

/// `app migrate REMOTE APP .name=NEW --import --check`: everything an import needs except the
/// copy. This grid knows REMOTE's host key, NEW is free here, and REMOTE takes this grid's key and
/// answers `peer check APP` (APP exists there; its state and size are printed).
fn check_import(state: &Path, remote: &Controller, app: &str, new_name: &str) -> i32 {
    let fail = |e: String| {
        eprintln!("gridctl: app migrate --check: {e}");
        FAILED
    };
    if !is_known_peer(state, remote) {
        return fail(format!(
            "{remote} is not a known peer grid (its host key is not in {}): add it there",
            state.join("peer/known_hosts").display()
        ));
    }
    let listed = daemon_command(state, "app list --batch".into());
    match listed {
        Ok(Reply::Done {
            code: 0, stdout, ..
        }) => {
            if stdout
                .lines()
                .any(|l| l.split('\t').next() == Some(new_name))
            {
                return fail(format!("{new_name} already exists on this grid"));
            }
        }
        Ok(other) => return fail(format!("unexpected reply from the daemon: {other:?}")),
        Err(e) => return fail(e),
    }
    let out = peer_ssh(state, remote, &format!("peer check {app}"))
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            print!("{}", String::from_utf8_lossy(&o.stdout));
            OK
        }
        Ok(o) => fail(format!(
            "{remote} could not be reached or refused this grid's key ({}): {}",
            o.status,
            read_bounded(&o.stderr[..], 4096).trim()
        )),
        Err(e) => fail(format!("cannot run ssh: {e}")),
    }
}

/// `peer check APP`, on the source grid for another grid: APP's state and the bytes of its
/// volumes, `KEY\tVALUE` lines. Nothing is held or sent.
fn peer_check(state: &Path, app: &str) -> i32 {
    let reply = daemon_command(state, format!("app info {app} --batch"));
    match reply {
        Ok(Reply::Done {
            code: 0, stdout, ..
        }) => {
            let mut app_state = "";
            let mut bytes: u64 = 0;
            for l in stdout.lines() {
                match l.split_once('\t') {
                    Some(("state", v)) => app_state = v,
                    Some((k, v)) if k.starts_with("volume.") && !k.ends_with(".kind") => {
                        bytes += v.parse::<u64>().unwrap_or(0)
                    }
                    _ => {}
                }
            }
            println!("app_state\t{app_state}\napp_bytes\t{bytes}");
            OK
        }
        Ok(Reply::Done { stderr, .. }) => {
            eprintln!("gridctl: {stderr}");
            FAILED
        }
        Ok(other) => failed(format!("unexpected reply from the daemon: {other:?}")),
        Err(e) => failed(e),
    }
}

pub(crate) fn connect(state: &Path) -> Result<Conn, String> {
    Conn::connect(state).map_err(|e| {
        format!(
            "the grid daemon is not reachable on {}: {e}",
            crate::protocol::socket_path(state).display()
        )
    })
}

/// Runs one command line on this grid's daemon and returns its answer.
fn daemon_command(state: &Path, line: String) -> Result<Reply, String> {
    connect(state).and_then(|mut c| {
        c.call(&Request::Command { line })
            .map_err(|e| format!("talking to the grid daemon: {e}"))
    })
}

/// Says why the command failed, on stderr, and returns its exit code.
fn failed(why: impl std::fmt::Display) -> i32 {
    eprintln!("gridctl: {why}");
    FAILED
}

fn forward(state: &Path, line: &str) -> i32 {
    let reply = daemon_command(state, line.to_string());
    match reply {
        Ok(Reply::Done {
            code,
            stdout,
            stderr,
        }) => {
            print!("{stdout}");
            let _ = io::stdout().flush();
            if !stderr.is_empty() {
                eprintln!("gridctl: {stderr}");
            }
            code
        }
        Ok(other) => failed(format!("unexpected reply from the daemon: {other:?}")),
        Err(e) => failed(e),
    }
}

/// Is the key this session logged in with one of the other grids' keys?
fn is_peer_session(state: &Path) -> bool {
    let Ok(auth_file) = std::env::var("SSH_USER_AUTH") else {
        return false;
    };
    let Ok(auth) = std::fs::read_to_string(auth_file) else {
        return false;
    };
    let Ok(peers) = std::fs::read_to_string(state.join("peer").join("peer_keys")) else {
        return false;
    };
    let key_of = |l: &str| -> Option<(String, String)> {
        let mut w = l.split_whitespace();
        Some((w.next()?.to_string(), w.next()?.to_string()))
    };
    // sshd writes "publickey TYPE BASE64" for each successful method.
    let used: Vec<_> = auth
        .lines()
        .filter_map(|l| l.strip_prefix("publickey "))
        .filter_map(key_of)
        .collect();
    !used.is_empty()
        && used
            .iter()
            .all(|k| peers.lines().filter_map(key_of).any(|p| &p == k))
}

fn peer(state: &Path, line: &str) -> i32 {
    if !is_peer_session(state) {
        eprintln!("gridctl: refused: peer commands are only for other grids of this lab");
        return REFUSED;
    }
    let words = match shell_words::split(line) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("gridctl: refused: {e}");
            return REFUSED;
        }
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    if let ["peer", "check", app] = w.as_slice() {
        if let Err(e) = dialect::AppName::new(app) {
            eprintln!("gridctl: refused: {e}");
            return REFUSED;
        }
        return peer_check(state, app);
    }
    // A gridctl without staged copies refused these; the test hook makes this one do the same.
    let staging = !state
        .join("faults")
        .join(crate::stage::NO_STAGING_HOOK)
        .exists();
    let (app, flags) = match w.as_slice() {
        ["peer", "export", app, flags @ ..]
            if flags.iter().all(|f| {
                ["--nocompress", "--novols"].contains(f)
                    || (staging && ["--stage", "--delta"].contains(f))
            }) =>
        {
            (*app, flags)
        }
        _ => {
            if staging {
                eprintln!("gridctl: refused: expected `peer export APP [--nocompress] [--novols] [--stage|--delta]`");
            } else {
                eprintln!("gridctl: refused: expected `peer export APP [--nocompress] [--novols]`");
            }
            return REFUSED;
        }
    };
    if let Err(e) = dialect::AppName::new(app) {
        eprintln!("gridctl: refused: {e}");
        return REFUSED;
    }
    let mut conn = match connect(state) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gridctl: {e}");
            return FAILED;
        }
    };
    // The lease lasts as long as `conn`: the application cannot start or vanish meanwhile.
    let stage = flags.contains(&"--stage");
    let delta = flags.contains(&"--delta");
    let (record, app_dir) = match conn.call(&Request::ExportBegin {
        app: app.to_string(),
        live: stage,
    }) {
        Ok(Reply::Export { record, app_dir }) => (record, app_dir),
        Ok(Reply::Done { stderr, .. }) => {
            eprintln!("gridctl: {stderr}");
            return FAILED;
        }
        Ok(other) => {
            eprintln!("gridctl: unexpected reply from the daemon: {other:?}");
            return FAILED;
        }
        Err(e) => {
            eprintln!("gridctl: talking to the grid daemon: {e}");
            return FAILED;
        }
    };
    let fault = transfer::take_fault(state);
    transfer::hold_while_asked(state);
    // Not through Rust's Stdout: it is line-buffered, so every 1 MiB chunk was searched for
    // newlines and cut at the last one into extra writes. A BufWriter on the raw descriptor
    // gathers the small frames and lets a whole data frame through in one write.
    let raw = match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("gridctl: exporting {app}: duplicating stdout: {e}");
            return FAILED;
        }
    };
    transfer::grow_pipe(&raw);
    let mut out = io::BufWriter::with_capacity(64 << 10, raw);
    let compress = !flags.contains(&"--nocompress");
    let r = if stage {
        crate::stage::export_stage(&app_dir, &record, compress, fault, &mut out)
    } else if delta {
        crate::stage::export_delta(&app_dir, &record, &mut io::stdin().lock(), &mut out)
    } else {
        transfer::export(
            &app_dir,
            &record,
            flags.contains(&"--novols"),
            compress,
            fault,
            &mut out,
        )
    };
    drop(conn);
    match r {
        Ok(()) => OK,
        Err(e) => {
            eprintln!("gridctl: exporting {app}: {e}");
            FAILED
        }
    }
}

mod import;
pub use import::*;

#[cfg(test)]
mod tests;
