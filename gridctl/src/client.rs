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
    let listed = connect(state).and_then(|mut c| {
        c.call(&Request::Command {
            line: "app list --batch".into(),
        })
        .map_err(|e| format!("talking to the grid daemon: {e}"))
    });
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
    let reply = connect(state).and_then(|mut c| {
        c.call(&Request::Command {
            line: format!("app info {app} --batch"),
        })
        .map_err(|e| format!("talking to the grid daemon: {e}"))
    });
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
        Ok(other) => {
            eprintln!("gridctl: unexpected reply from the daemon: {other:?}");
            FAILED
        }
        Err(e) => {
            eprintln!("gridctl: {e}");
            FAILED
        }
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

fn forward(state: &Path, line: &str) -> i32 {
    let reply = connect(state).and_then(|mut c| {
        c.call(&Request::Command {
            line: line.to_string(),
        })
        .map_err(|e| format!("talking to the grid daemon: {e}"))
    });
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
        Ok(other) => {
            eprintln!("gridctl: unexpected reply from the daemon: {other:?}");
            FAILED
        }
        Err(e) => {
            eprintln!("gridctl: {e}");
            FAILED
        }
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

pub struct ImportOpts<'a> {
    pub remote: &'a Controller,
    pub app: &'a str,
    pub new_name: &'a str,
    pub novols: bool,
    pub nocompress: bool,
    pub props: &'a [dialect::Prop],
    pub progress_on_stdout: bool,
    /// `--max_rate`: the most bytes per second read from the source grid.
    pub max_rate: Option<u64>,
}

/// The `known_hosts` name of a controller: `host`, or `[host]:port` off port 22.
fn known_hosts_name(c: &Controller) -> String {
    match c.port_or_default() {
        22 => c.host.clone(),
        p => format!("[{}]:{p}", c.host),
    }
}

fn is_known_peer(state: &Path, c: &Controller) -> bool {
    let name = known_hosts_name(c);
    std::fs::read_to_string(state.join("peer").join("known_hosts"))
        .map(|t| {
            t.lines().any(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|h| h.split(',').any(|p| p == name))
            })
        })
        .unwrap_or(false)
}

/// The `ssh` command that runs `peer export` on the remote grid with this grid's key.
pub fn peer_ssh(state: &Path, remote: &Controller, remote_cmd: &str) -> Proc {
    let peer = state.join("peer");
    let mut c = Proc::new("ssh");
    c.arg("-F")
        .arg("/dev/null")
        .arg("-i")
        .arg(peer.join("id_ed25519"))
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            peer.join("known_hosts").display()
        ))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            // A link that dies mid-stream fails the import within seconds instead of hanging.
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
            // AES-GCM runs at nearly twice chacha20's speed where AES-NI exists
            // (docs/architecture.md, "The data path between grids").
            "-c",
            "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com",
            "-p",
        ])
        .arg(remote.port_or_default().to_string())
        .arg("-l")
        .arg(remote.user_or_default())
        .arg(&remote.host)
        .arg(remote_cmd);
    c
}

/// An import pulls only from a grid whose host key this grid pinned.
pub(crate) fn check_peer(state: &Path, remote: &Controller) -> Result<(), String> {
    if !is_known_peer(state, remote) {
        return Err(format!(
            "{} is not a known peer grid (its host key is not in {})",
            remote,
            state.join("peer/known_hosts").display()
        ));
    }
    Ok(())
}

fn import_app(state: &Path, o: &ImportOpts) -> Result<(), String> {
    import_with(state, o, |app_dir| pull(state, o, app_dir))
}

/// The daemon's answer to a request that only succeeds or fails, as this command's result.
pub(crate) fn done(reply: Result<Reply, impl std::fmt::Display>) -> Result<(), String> {
    match reply {
        Ok(Reply::Done { code: 0, .. }) => Ok(()),
        Ok(Reply::Done { stderr, .. }) => Err(stderr),
        Ok(other) => Err(format!("unexpected reply from the daemon: {other:?}")),
        Err(e) => Err(format!("talking to the grid daemon: {e}")),
    }
}

/// An import as the daemon sees it: begin (the daemon reserves the name and a directory), pull
/// into that directory, then commit the record, or abort when anything failed. Every kind of pull
/// (whole, staged, delta) goes through it.
pub(crate) fn import_with(
    state: &Path,
    o: &ImportOpts,
    pull: impl FnOnce(&Path) -> Result<crate::model::AppRecord, String>,
) -> Result<(), String> {
    check_peer(state, o.remote)?;
    let mut conn = connect(state)?;
    let app_dir = match conn.call(&Request::ImportBegin {
        name: o.new_name.to_string(),
    }) {
        Ok(Reply::Import { app_dir }) => app_dir,
        Ok(Reply::Done { stderr, .. }) => return Err(stderr),
        Ok(other) => return Err(format!("unexpected reply from the daemon: {other:?}")),
        Err(e) => return Err(format!("talking to the grid daemon: {e}")),
    };
    let r = pull(&app_dir).and_then(|rec| done(conn.call(&Request::ImportCommit { record: rec })));
    if r.is_err() {
        // Wait for the partial copy to be gone before saying so.
        let _ = conn.call(&Request::ImportAbort);
    }
    r
}

/// The most of the source's stderr an import keeps for its error message.
pub(crate) const MAX_REMOTE_ERR: usize = 16 << 10;

/// Reads `r` to its end but keeps only its first `limit` bytes (as text), saying how much more
/// there was: the other side's stderr must be drained, or it would block, but not stored whole.
pub(crate) fn read_bounded(mut r: impl Read, limit: usize) -> String {
    let mut kept = Vec::new();
    let mut more = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let k = n.min(limit - kept.len());
                kept.extend_from_slice(&buf[..k]);
                more += (n - k) as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut s = String::from_utf8_lossy(&kept).into_owned();
    if more > 0 {
        s.push_str(&format!(" … ({more} more bytes not shown)"));
    }
    s
}

/// glibc malloc settings for the `ssh` that carries a volume. Whenever our pipe cannot take all
/// it decrypted, ssh buffers the rest; glibc serves such buffers with fresh mmaps and gives
/// them back right after, so ssh page-faulted ~60k times per GiB (measured: `ssh cat | dd`).
/// Keeping freed memory in its heap cuts that to ~3.5k and ssh's CPU by ~15%. Tunables the
/// caller already set (`inherited`) still apply, after ours, so theirs win; libcs other than
/// glibc ignore the variable.
fn ssh_malloc_tunables(inherited: Option<String>) -> String {
    const OURS: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728";
    match inherited {
        Some(t) if !t.is_empty() => format!("{OURS}:{t}"),
        _ => OURS.to_string(),
    }
}

fn pull(state: &Path, o: &ImportOpts, app_dir: &Path) -> Result<crate::model::AppRecord, String> {
    let mut remote_cmd = vec!["peer", "export", o.app];
    if o.nocompress {
        remote_cmd.push("--nocompress");
    }
    if o.novols {
        remote_cmd.push("--novols");
    }
    let mut child = peer_ssh(state, o.remote, &shell_words::join(remote_cmd))
        .env(
            "GLIBC_TUNABLES",
            ssh_malloc_tunables(std::env::var("GLIBC_TUNABLES").ok()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ssh: {e}"))?;
    let err_pipe = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || read_bounded(err_pipe, MAX_REMOTE_ERR));
    let stdout_pipe = child.stdout.take().expect("piped");
    transfer::grow_pipe(&stdout_pipe);
    // The limit applies to the bytes on the link (compressed where they are): reading no faster
    // makes ssh, and TCP under it, hold the source back.
    let stdout_pipe: Box<dyn Read + Send> = match o.max_rate {
        Some(rate) => Box::new(crate::throttle::Throttled::new(stdout_pipe, rate)),
        None => Box::new(stdout_pipe),
    };
    // Small on purpose: a payload read bigger than the buffer bypasses it and lands directly in
    // its chunk, so only frame headers are copied twice.
    let mut r = BufReader::with_capacity(64 << 10, stdout_pipe);
    let stdout = io::stdout();
    let mut print = |done: u64, total: u64| -> io::Result<()> {
        let mut out = stdout.lock();
        writeln!(out, "progress {done} {total}")?;
        out.flush()
    };
    let mut progress = transfer::Progress::new(
        o.progress_on_stdout
            .then_some(&mut print as transfer::ProgressSink),
    );
    let res = transfer::receive(
        &mut r,
        state,
        o.app,
        o.new_name,
        o.props,
        app_dir,
        &mut progress,
    );
    if res.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let remote_err = err_reader.join().unwrap_or_default();
    let remote_err = remote_err.trim().trim_start_matches("gridctl: ");
    match res {
        Ok(rec) if status.success() => {
            progress.emit().map_err(|e| e.to_string())?;
            Ok(rec)
        }
        Ok(_) => Err(format!("the source grid failed: {remote_err}")),
        Err(_) if !status.success() && !remote_err.is_empty() => Err(remote_err.to_string()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_remote_stderr_is_drained_but_kept_bounded() {
        let huge = io::repeat(b'e').take(50 << 20);
        let s = read_bounded(huge, MAX_REMOTE_ERR);
        assert!(s.len() < MAX_REMOTE_ERR + 100, "{} bytes kept", s.len());
        assert!(
            s.ends_with(&format!(
                "({} more bytes not shown)",
                (50 << 20) - MAX_REMOTE_ERR
            )),
            "{}",
            &s[s.len() - 60..]
        );
        assert_eq!(read_bounded(&b"short"[..], MAX_REMOTE_ERR), "short");
    }

    #[test]
    fn the_ssh_malloc_tunables_keep_the_callers_own() {
        let ours = ssh_malloc_tunables(None);
        assert!(
            ours.contains("glibc.malloc.mmap_threshold=33554432"),
            "{ours}"
        );
        assert_eq!(ssh_malloc_tunables(Some(String::new())), ours);
        let merged = ssh_malloc_tunables(Some("glibc.malloc.arena_max=2".into()));
        assert_eq!(merged, format!("{ours}:glibc.malloc.arena_max=2"));
    }
}
