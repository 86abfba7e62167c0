//! `app migrate … --import`: the pull from the remote grid over OpenSSH with this grid's own key,
//! checked against the peers it trusts, and the record the daemon commits or aborts.

use super::*;

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
pub(super) fn known_hosts_name(c: &Controller) -> String {
    match c.port_or_default() {
        22 => c.host.clone(),
        p => format!("[{}]:{p}", c.host),
    }
}

pub(super) fn is_known_peer(state: &Path, c: &Controller) -> bool {
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

pub(super) fn import_app(state: &Path, o: &ImportOpts) -> Result<(), String> {
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

/// The reader of the stream an import pulls through ssh's stdout (a full pull, a pre-copy or a
/// delta alike). `max_rate` applies to the bytes on the link (compressed where they are): reading
/// no faster makes ssh, and TCP under it, hold the source back.
pub(crate) fn link_reader(
    stdout_pipe: std::process::ChildStdout,
    max_rate: Option<u64>,
) -> BufReader<Box<dyn Read + Send>> {
    transfer::grow_pipe(&stdout_pipe);
    let stdout_pipe: Box<dyn Read + Send> = match max_rate {
        Some(rate) => Box::new(crate::throttle::Throttled::new(stdout_pipe, rate)),
        None => Box::new(stdout_pipe),
    };
    // Small on purpose: a payload read bigger than the buffer bypasses it and lands directly in
    // its chunk, so only frame headers are copied twice.
    BufReader::with_capacity(64 << 10, stdout_pipe)
}

/// The progress sink of `--progress`: one `progress DONE TOTAL` line on stdout, flushed, for the
/// daemon that runs this import to read.
pub(crate) fn print_progress(done: u64, total: u64) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "progress {done} {total}")?;
    out.flush()
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
pub(super) fn ssh_malloc_tunables(inherited: Option<String>) -> String {
    const OURS: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728";
    match inherited {
        Some(t) if !t.is_empty() => format!("{OURS}:{t}"),
        _ => OURS.to_string(),
    }
}

pub(super) fn pull(
    state: &Path,
    o: &ImportOpts,
    app_dir: &Path,
) -> Result<crate::model::AppRecord, String> {
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
    let mut r = link_reader(child.stdout.take().expect("piped"), o.max_rate);
    let mut print = print_progress;
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
