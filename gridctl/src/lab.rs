//! `gridctl lab up|down`: N real grids on one host, each a real `sshd` on its own loopback
//! address with a `gridctl daemon` behind it, trusting each other for `app migrate --import`.
//! File layout in the crate docs.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::protocol::{Conn, Request};
use crate::template;
use crate::util::{self, pid_alive, read_pid, write_atomic};

pub const SSH_PORT: u16 = 2222;

/// One grid of the lab.
pub struct Grid {
    pub n: u8,
    /// The third octet of its addresses: base + n.
    pub net: u8,
    pub dir: PathBuf,
    /// The network namespace it runs in (`--netns`), or none: the caller's.
    pub netns: Option<String>,
}

impl Grid {
    pub fn name(&self) -> String {
        format!("g{}", self.n)
    }
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        let [a, b] = if self.netns.is_some() {
            NETNS_PREFIX
        } else {
            [127, 0]
        };
        Ipv4Addr::new(a, b, self.net, host)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn controller(&self) -> SocketAddr {
        SocketAddr::new(self.ip(1).into(), SSH_PORT)
    }
}

pub struct UpOpts {
    pub grids: u8,
    pub dir: PathBuf,
    pub base: u8,
    pub mig_bin: Option<PathBuf>,
    /// Each grid in its own network namespace behind a router namespace (see [`Netns`]).
    pub netns: bool,
}

mod netns;
mod sshd;

use netns::*;
pub use netns::{Netns, NETNS_PREFIX};
pub use sshd::ensure_privsep_dir;
use sshd::*;

/// `exe` as a command, run in `netns` when there is one.
fn command_in(netns: &Option<String>, exe: &Path) -> Proc {
    match netns {
        Some(ns) => {
            let mut c = Proc::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Proc::new(exe),
    }
}

fn q(p: &Path) -> String {
    shell_words::quote(&p.display().to_string()).into_owned()
}

fn keygen(path: &Path, comment: &str) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let st = Proc::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .context("running ssh-keygen (is openssh-client installed? see scripts/setup)")?;
    if !st.success() {
        bail!("ssh-keygen failed for {}", path.display());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// `TYPE BASE64` of a public key file (the comment dropped).
fn pubkey(path: &Path) -> Result<String> {
    let p = PathBuf::from(format!("{}.pub", path.display()));
    let t = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let w: Vec<&str> = t.split_whitespace().take(2).collect();
    if w.len() != 2 {
        bail!("{}: not an OpenSSH public key", p.display());
    }
    Ok(w.join(" "))
}

fn grids_of(dir: &Path, n: u8, base: u8, netns: Option<&Netns>) -> Vec<Grid> {
    (1..=n)
        .map(|i| Grid {
            n: i,
            net: base + i,
            dir: dir.join(format!("g{i}")),
            netns: netns.map(|ns| ns.grid(i)),
        })
        .collect()
}

/// Brings the lab up; a second call with the same options changes nothing and succeeds. One that
/// fails takes the lab down again (daemons, sshds, namespaces), so that a grid whose sshd could not
/// start leaves no daemon behind and the next `up` starts clean.
pub fn up(o: &UpOpts) -> Result<()> {
    if o.grids == 0 || o.base as u16 + o.grids as u16 > 254 {
        bail!(
            "--grids must be 1..=254-base (got --grids {} --base {})",
            o.grids,
            o.base
        );
    }
    fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
    let dir = fs::canonicalize(&o.dir)?;
    bring_up(o, &dir).inspect_err(|_| {
        if let Err(e) = down(&dir) {
            eprintln!("gridctl: lab up failed, and taking down what it started failed too: {e:#}");
        }
    })
}

fn bring_up(o: &UpOpts, dir: &Path) -> Result<()> {
    let exe = util::self_exe();
    let mig_bin = match &o.mig_bin {
        Some(p) => std::path::absolute(p)?,
        None => exe.with_file_name("mig"),
    };
    let mig = dir.join("mig");
    fs::create_dir_all(&mig)?;
    keygen(&mig.join("private.key"), "mig@lab")?;
    // A lab made with --netns stays one when `lab up` runs again to restart what is missing.
    let netns = (o.netns || dir.join("netns").exists()).then(|| Netns::new(dir, o.base));
    let grids = grids_of(dir, o.grids, o.base, netns.as_ref());
    if let Some(ns) = &netns {
        // Listed first, so that `lab down` finds them even if making them fails half-way.
        write_atomic(&dir.join("netns"), ns.listing(&grids).as_bytes())?;
        ns.make(&grids)?;
    }
    for g in &grids {
        for d in ["templates", "apps", "peer", "faults"] {
            fs::create_dir_all(g.state().join(d))?;
        }
        keygen(
            &g.dir.join("ssh_host_ed25519_key"),
            &format!("{}-host", g.name()),
        )?;
        keygen(
            &g.state().join("peer/id_ed25519"),
            &format!("{}-peer", g.name()),
        )?;
    }
    let mig_pub = pubkey(&mig.join("private.key"))?;
    let mut peer_keys = String::new();
    let mut known_hosts = String::new();
    for g in &grids {
        peer_keys.push_str(&format!(
            "{} {}-peer\n",
            pubkey(&g.state().join("peer/id_ed25519"))?,
            g.name()
        ));
        known_hosts.push_str(&format!(
            "[{}]:{SSH_PORT} {}\n",
            g.ip(1),
            pubkey(&g.dir.join("ssh_host_ed25519_key"))?
        ));
    }
    write_atomic(&mig.join("known_hosts"), known_hosts.as_bytes())?;
    for g in &grids {
        let state = g.state();
        let mut auth = format!("restrict {mig_pub} mig\n");
        for l in peer_keys.lines() {
            auth.push_str(&format!("restrict {l}\n"));
        }
        write_atomic(&g.dir.join("authorized_keys"), auth.as_bytes())?;
        write_atomic(&state.join("peer/peer_keys"), peer_keys.as_bytes())?;
        write_atomic(&state.join("peer/known_hosts"), known_hosts.as_bytes())?;
        write_atomic(
            &state.join("templates/kvstore.toml"),
            template::KVSTORE.as_bytes(),
        )?;
        write_atomic(
            &state.join("templates/MigHelper.toml"),
            template::MIG_HELPER.as_bytes(),
        )?;
        let mut vars = toml::Table::new();
        vars.insert("lab".into(), dir.display().to_string().into());
        vars.insert("grid".into(), g.name().into());
        vars.insert("mig_bin".into(), mig_bin.display().to_string().into());
        let mut top = toml::Table::new();
        top.insert("vars".into(), vars.into());
        write_atomic(&state.join("grid.toml"), toml::to_string(&top)?.as_bytes())?;
        // `SetEnv SHLVL=1`: sshd runs the forced command through the account's shell, and bash
        // sources ~/.bashrc when sshd starts it at shell level 1; a heavy one (root's here runs
        // `pyenv init`) cost every command 0.15 s. Started at level 2, bash skips it.
        let sshd_config = format!(
            "# Written by gridctl lab up: grid {name}.\n\
             ListenAddress {addr}\n\
             HostKey {gdir}/ssh_host_ed25519_key\n\
             PidFile {gdir}/sshd.pid\n\
             AuthorizedKeysFile {gdir}/authorized_keys\n\
             ForceCommand {exe} ssh --state {state}\n\
             ExposeAuthInfo yes\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             DisableForwarding yes\n\
             PermitTTY no\n\
             PrintMotd no\n\
             MaxStartups 100:30:200\n\
             MaxSessions 50\n\
             SetEnv SHLVL=1\n",
            name = g.name(),
            addr = g.controller(),
            gdir = g.dir.display(),
            exe = q(&exe),
            state = q(&state),
        );
        let cfg_path = g.dir.join("sshd_config");
        let changed = fs::read(&cfg_path).ok().as_deref() != Some(sshd_config.as_bytes());
        if changed {
            write_atomic(&cfg_path, sshd_config.as_bytes())?;
        }
        start_daemon(g, &exe)?;
        start_sshd(g, changed)?;
    }
    write_atomic(&dir.join("ssh_config"), ssh_config(dir, &grids).as_bytes())?;
    write_atomic(&mig.join("grid.info"), grid_info(&grids).as_bytes())?;
    println!(
        "lab up: {} grid(s) in {}; try: ssh -F {}/ssh_config g1 app list",
        grids.len(),
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn ssh_config(dir: &Path, grids: &[Grid]) -> String {
    let mut s = String::from("# Written by gridctl lab up.\n");
    for g in grids {
        s.push_str(&format!(
            "Host {name}\n  HostName {ip}\n  Port {SSH_PORT}\n  User root\n  IdentityFile {d}/mig/private.key\n  \
             IdentitiesOnly yes\n  UserKnownHostsFile {d}/mig/known_hosts\n  StrictHostKeyChecking yes\n  \
             BatchMode yes\n  LogLevel ERROR\n",
            name = g.name(),
            ip = g.ip(1),
            d = dir.display()
        ));
    }
    s
}

fn grid_info(grids: &[Grid]) -> String {
    let mut s = String::from("# Written by gridctl lab up: the grids of this lab.\n");
    for g in grids {
        s.push_str(&format!(
            "grid {name}:\n{{\n  controller = {ctl}\n  location = Lab {n}\n  MIG_ip = {mig}:8080\n  \
             app_config = \"in_ip={mig} web_ip={web}\"\n  \
             MigHelper_config = \"in_ip={hin} out_ip={hout} netmask=255.0.0.0 gateway=127.0.0.1\"\n}}\n",
            name = g.name(),
            ctl = g.controller(),
            n = g.n,
            mig = g.ip(10),
            web = g.ip(11),
            hin = g.ip(20),
            hout = g.ip(21),
        ));
    }
    s
}

fn daemon_alive(g: &Grid) -> bool {
    let alive = read_pid(&g.dir.join("daemon.pid")).is_some_and(pid_alive);
    alive
        && Conn::connect(&g.state())
            .and_then(|mut c| c.call(&Request::Ping))
            .is_ok()
}

fn start_daemon(g: &Grid, exe: &Path) -> Result<()> {
    if daemon_alive(g) {
        return Ok(());
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(g.dir.join("daemon.log"))?;
    // The daemon makes itself a session leader (setsid), so it outlives this command. `ip netns
    // exec` execs it in place, so the pid is the daemon's.
    let child = command_in(&g.netns, exe)
        .arg("daemon")
        .arg("--state")
        .arg(g.state())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the daemon of {}", g.name()))?;
    write_atomic(&g.dir.join("daemon.pid"), child.id().to_string().as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if Conn::connect(&g.state())
            .and_then(|mut c| c.call(&Request::Ping))
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the daemon of {} did not come up; see {}",
        g.name(),
        g.dir.join("daemon.log").display()
    )
}

/// Processes whose command line mentions `dir` (this process excluded).
pub fn processes_mentioning(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(&needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Stops every grid of the lab in `dir` and leaves no process behind.
pub fn down(dir: &Path) -> Result<()> {
    let dir = fs::canonicalize(dir).with_context(|| format!("no lab in {}", dir.display()))?;
    let mut grids = Vec::new();
    for e in fs::read_dir(&dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix('g').and_then(|n| n.parse::<u8>().ok()) {
            grids.push(Grid {
                n,
                net: 0,
                dir: e.path(),
                netns: None,
            });
        }
    }
    for g in &grids {
        if let Some(pid) = read_pid(&g.dir.join("sshd.pid")).filter(|_| sshd_alive(g)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        // Application groups, in case the daemon cannot be asked.
        let mut pgids = Vec::new();
        if let Ok(rd) = fs::read_dir(g.state().join("apps")) {
            for a in rd.flatten() {
                if let Ok(r) = crate::model::AppRecord::load(&a.path()) {
                    if r.pgid > 0 {
                        pgids.push(r.pgid);
                    }
                }
            }
        }
        if let Ok(mut c) = Conn::connect(&g.state()) {
            let _ = c.call(&Request::Shutdown);
        }
        for pg in pgids {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
        }
        if let Some(pid) = read_pid(&g.dir.join("daemon.pid")) {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&g.state().display().to_string()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
    }
    // Whatever is left and belongs to this lab (SSH sessions, stray components) is killed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first = true;
    loop {
        let left = processes_mentioning(&dir);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "processes of the lab in {} did not exit: {left:?}",
                dir.display()
            );
        }
        if !first {
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        first = false;
        std::thread::sleep(Duration::from_millis(200));
    }
    for g in &grids {
        let _ = fs::remove_file(g.state().join("daemon.sock"));
        let _ = fs::remove_file(g.dir.join("daemon.pid"));
    }
    // A `--netns` lab's namespaces go once nothing runs in them; the veth links and routes go
    // with them.
    let listing = dir.join("netns");
    if let Ok(t) = fs::read_to_string(&listing) {
        for name in t.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if Netns::exists(name) {
                ip(&["netns", "del", name])?;
            }
        }
        fs::remove_file(&listing)?;
    }
    println!(
        "lab down: {} grid(s) in {} stopped",
        grids.len(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests;
