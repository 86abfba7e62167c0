//! A real OpenSSH `sshd` on loopback whose forced command is a small shell script standing in for
//! gridctl: it logs the raw `SSH_ORIGINAL_COMMAND` and answers each verb with canned `--batch`
//! output. MIG's SSH client is tested against it end to end: host keys, login, exit codes, stderr.
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actors::ssh::SshGrid;
use dialect::Controller;

/// The loopback address the fake controllers listen on (one sshd per test, each on its own port).
pub const HOST: &str = "127.0.90.1";

/// Canned digest the fake prints for `app checksum`.
pub const FAKE_BLAKE3: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The fake gridctl. `__DIR__` is replaced by the grid's directory. Unquoted `$SSH_ORIGINAL_COMMAND`
/// with `set -f` is only split on blanks, never evaluated, so the fake itself runs nothing it is sent.
const FAKE_GRIDCTL: &str = r#"#!/bin/sh
printf '%s\n' "$SSH_ORIGINAL_COMMAND" >> __DIR__/commands.log
set -f
set -- $SSH_ORIGINAL_COMMAND
verb=$2
name=$3
case "$verb" in
list)
    printf 'shop\trunning\tkvstore\nMigHelper-1\tstopped\tMigHelper\n' ;;
info)
    case "$name" in
    broken) echo 'this is not batch output' ;;
    # The format gridctl prints (its crate docs): name, state, template, error, props, volumes.
    *) printf 'name\t%s\nstate\tstopped\ntemplate\tkvstore\nerror\t\nprop.in_ip\t127.0.1.10\nprop.port\t8000\nvolume.data\t67108864\nvolume.data.kind\tfile\n' "$name" ;;
    esac ;;
checksum)
    printf 'data\t67108864\tblake3:__BLAKE3__\n' ;;
migrate)
    # $4 is APP: `stalls` reports once and then hangs, anything else reports every 0.4 s.
    if [ "$4" = stalls ]; then echo 'progress 1 1024'; sleep 8; fi
    echo 'importing shop'
    for i in 1 2 3; do echo "progress $((i * 256)) 1024"; sleep 0.4; done
    # The last line has no newline: it still counts.
    printf 'progress 1024 1024'; sleep 0.4 ;;
*)
    case "$name" in
    failing) echo "gridctl: application failing is not stopped" >&2; exit 1 ;;
    refused) echo "gridctl: refused: no such application" >&2; exit 2 ;;
    slow) sleep 8 ;;
    killed) kill -TERM $$ ;;
    # Kill the sshd session process: the connection drops with no exit status at all.
    dropped) echo partial; kill -KILL $PPID; sleep 5 ;;
    esac ;;
esac
exit 0
"#;

/// One fake grid controller: a real sshd, its keys, and the log of what it was sent.
pub struct FakeGrid {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// A client key the controller authorizes.
    pub client_key: PathBuf,
    /// A known_hosts file pinning this controller's host key.
    pub known_hosts: PathBuf,
    /// The controller's host public key file.
    pub host_key_pub: PathBuf,
    child: Child,
}

pub use testkit::{fingerprint, keygen, keygen_type};

/// A port free on [`HOST`] right now.
pub fn free_port() -> u16 {
    testkit::free_port_on(HOST.parse::<std::net::Ipv4Addr>().unwrap())
}

/// `sshd -D -e -f CONF` in the foreground, its log (stdout and stderr) to `log`.
fn sshd(conf: &Path, log: fs::File) -> Child {
    Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start /usr/sbin/sshd")
}

impl FakeGrid {
    pub fn start() -> FakeGrid {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let host_key = d.join("host_key");
        let client_key = d.join("client_key");
        keygen(&host_key);
        // A second host key of another type, as real servers have: when only that type is pinned
        // in known_hosts, the client must negotiate it rather than see a "changed" key.
        let ecdsa_key = d.join("host_key_ecdsa");
        keygen_type(&ecdsa_key, "ecdsa");
        keygen(&client_key);
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();

        let script = d.join("fake-gridctl");
        fs::write(
            &script,
            FAKE_GRIDCTL
                .replace("__DIR__", &d.display().to_string())
                .replace("__BLAKE3__", FAKE_BLAKE3),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();

        let port = free_port();
        let conf = d.join("sshd_config");
        fs::write(
            &conf,
            format!(
                "ListenAddress {HOST}:{port}\n\
                 HostKey {ek}\n\
                 HostKey {hk}\n\
                 PidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 AuthenticationMethods publickey\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PermitRootLogin prohibit-password\n\
                 ForceCommand {script}\n\
                 MaxStartups 100\n\
                 LogLevel VERBOSE\n\
                 SetEnv SHLVL=1\n",
                hk = host_key.display(),
                ek = ecdsa_key.display(),
                d = d.display(),
                script = script.display(),
            ),
        )
        .unwrap();

        let known_hosts = d.join("known_hosts");
        let host_pub = fs::read_to_string(d.join("host_key.pub")).unwrap();
        fs::write(&known_hosts, format!("[{HOST}]:{port} {host_pub}")).unwrap();

        let child = sshd(&conf, fs::File::create(d.join("sshd.log")).unwrap());
        let mut grid = FakeGrid {
            port,
            client_key,
            known_hosts,
            host_key_pub: d.join("host_key.pub"),
            child,
            dir,
        };
        grid.wait_ready();
        grid
    }

    /// Waits until sshd sends its banner, or fails with its log.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("sshd exited with {st}:\n{}", self.sshd_log());
            }
            if let Ok(mut s) = TcpStream::connect((HOST, self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 8];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sshd not ready within 10 s:\n{}",
                self.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many times a client logged in to this controller so far (sshd logs each login).
    pub fn logins(&self) -> usize {
        self.sshd_log().matches("Accepted publickey for").count()
    }

    /// Drops every open connection, as a controller restart or a cut link would: sshd's
    /// per-connection processes (the listener's children) are killed; the listener stays.
    pub fn drop_connections(&self) {
        let listener = self.child.id();
        for pid in children_of(listener) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // Until they are gone, a new command could still land on a dying one.
        testkit::wait::wait_for_every(
            "sshd's connections to go",
            Duration::from_secs(5),
            Duration::from_millis(10),
            || children_of(listener).is_empty().then_some(()),
        );
    }

    /// Restarts the controller's sshd on the same port with another ed25519 host key (the
    /// ECDSA one stays), dropping every open connection: what a client sees when the machine
    /// behind the address is replaced.
    pub fn restart_with_host_key(&mut self, key: &Path) {
        self.drop_connections();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let conf = self.path("sshd_config");
        let old = format!("HostKey {}\n", self.path("host_key").display());
        let text = fs::read_to_string(&conf).unwrap();
        assert!(text.contains(&old), "{text}");
        fs::write(
            &conf,
            text.replace(&old, &format!("HostKey {}\n", key.display())),
        )
        .unwrap();
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.path("sshd.log"))
            .unwrap();
        self.child = sshd(&conf, log);
        self.wait_ready();
    }

    pub fn sshd_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    pub fn controller(&self) -> Controller {
        format!("root@{HOST}:{}", self.port).parse().unwrap()
    }

    /// A client for this controller with short timeouts, as the tests want errors within seconds.
    pub fn client(&self) -> SshGrid {
        SshGrid::new(self.controller(), &self.client_key, &self.known_hosts)
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(10))
    }

    /// The command lines the fake controller received, raw, one per command.
    pub fn logged(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("commands.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for FakeGrid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after its `)`.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        let me: Option<u32> = head.split_whitespace().next().and_then(|p| p.parse().ok());
        if let (Some(me), Some(ppid)) = (me, ppid) {
            if ppid == pid && me != pid {
                out.push(me);
            }
        }
    }
    out
}
