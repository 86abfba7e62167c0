//! Each grid's `sshd`: started, reloaded when its config changed, and the privilege-separation
//! directory it needs.

use super::*;

pub(super) fn sshd_alive(g: &Grid) -> bool {
    let Some(pid) = read_pid(&g.dir.join("sshd.pid")) else {
        return false;
    };
    let cfg = g.dir.join("sshd_config").display().to_string();
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&cfg))
        .unwrap_or(false)
}

/// Starts the grid's sshd, or, when it runs and its config changed (e.g. `lab up` from another
/// gridctl binary), makes it re-read the config with SIGHUP.
pub(super) fn start_sshd(g: &Grid, config_changed: bool) -> Result<()> {
    if sshd_alive(g) {
        if config_changed {
            if let Some(pid) = read_pid(&g.dir.join("sshd.pid")) {
                kill(Pid::from_raw(pid), Signal::SIGHUP)
                    .with_context(|| format!("reloading sshd of {}", g.name()))?;
            }
        }
        return Ok(());
    }
    let addr = g.controller();
    // In its own namespace the grid's address is free by construction (and not bindable here).
    match TcpListener::bind(addr) {
        _ if g.netns.is_some() => {}
        Ok(l) => drop(l),
        Err(e) => bail!(
            "{addr} is already in use by another process ({e}); grid {} cannot listen there \
             (stop that process, or pick other addresses with --base)",
            g.name()
        ),
    }
    let log = g.dir.join("sshd.log");
    let run = || -> Result<Option<String>> {
        let before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = command_in(&g.netns, Path::new("/usr/sbin/sshd"))
            .arg("-f")
            .arg(g.dir.join("sshd_config"))
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .output()
            .context("running /usr/sbin/sshd (is openssh-server installed? see scripts/setup)")?;
        if out.status.success() {
            return Ok(None);
        }
        // With -E, sshd's own reason goes to its log: what this attempt added to it.
        let logged = fs::read(&log)
            .map(|l| String::from_utf8_lossy(&l[(before as usize).min(l.len())..]).into_owned())
            .unwrap_or_default();
        Ok(Some(format!(
            "{}{}{logged}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        )))
    };
    let mut failed = run()?;
    // The directory comes with the openssh-server service, so a host that never ran it (a
    // container) lacks it; the lab runs as root and makes it, as that service would.
    if let Some(dir) = failed.as_deref().and_then(missing_privsep_dir) {
        ensure_privsep_dir(&dir)?;
        failed = run()?;
    }
    if let Some(why) = failed {
        bail!(
            "sshd of {} failed to start: {}(see {})",
            g.name(),
            why,
            log.display()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "sshd of {} does not accept connections on {addr}; see {}",
        g.name(),
        g.dir.join("sshd.log").display()
    )
}

/// The directory sshd says is missing, from its `Missing privilege separation directory: DIR`.
pub(super) fn missing_privsep_dir(output: &str) -> Option<PathBuf> {
    output
        .lines()
        .find_map(|l| l.split_once("Missing privilege separation directory: "))
        .map(|(_, p)| PathBuf::from(p.trim()))
        .filter(|p| p.is_absolute())
}

/// Makes sshd's privilege-separation directory (Debian's `/run/sshd`) as sshd requires it: a
/// directory that only its owner (root, running the lab) can write.
pub fn ensure_privsep_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => bail!(
            "{} is not a directory, but sshd needs it as its privilege-separation directory: \
             remove it and run lab up again",
            path.display()
        ),
        Err(_) => {}
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .with_context(|| {
            format!(
                "creating sshd's privilege-separation directory {p} (as root: mkdir -p -m 755 {p})",
                p = path.display()
            )
        })
}
