//! A lab of real sshd grids for one test, brought down when the test ends (even on failure).
//!
//! Every test uses its own `--base`, so tests run in parallel without sharing addresses:
//! gridctl's tests own bases 100..=199 (grid n of base B is 127.0.(B+n).x).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const GRIDCTL: &str = env!("CARGO_BIN_EXE_gridctl");

pub struct Lab {
    pub tmp: tempfile::TempDir,
    pub base: u8,
    pub grids: u8,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn gridctl(args: &[&str]) -> Run {
    run(Command::new(GRIDCTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap())
}

impl Lab {
    pub fn up(grids: u8, base: u8) -> Lab {
        Lab::up_with(grids, base, &[])
    }

    pub fn up_with(grids: u8, base: u8, extra: &[&str]) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let lab = Lab { tmp, base, grids };
        let r = lab.lab_up(extra);
        assert_eq!(r.code, 0, "lab up failed: {r:?}");
        lab
    }

    pub fn lab_up(&self, extra: &[&str]) -> Run {
        let g = self.grids.to_string();
        let b = self.base.to_string();
        let mut args = vec!["lab", "up", "--grids", &g, "--base", &b, "--dir"];
        let d = self.dir().display().to_string();
        args.push(&d);
        args.extend_from_slice(extra);
        gridctl(&args)
    }

    pub fn dir(&self) -> PathBuf {
        std::fs::canonicalize(self.tmp.path()).unwrap()
    }

    pub fn state(&self, n: u8) -> PathBuf {
        self.dir().join(format!("g{n}/state"))
    }

    /// `127.0.(base+n).host`
    pub fn ip(&self, n: u8, host: u8) -> String {
        format!("127.0.{}.{host}", self.base + n)
    }

    pub fn controller(&self, n: u8) -> String {
        format!("{}:2222", self.ip(n, 1))
    }

    /// `ssh -F DIR/ssh_config gN LINE`, as MIG's operators would type it.
    pub fn ssh(&self, n: u8, line: &str) -> Run {
        run(Command::new("ssh")
            .arg("-F")
            .arg(self.dir().join("ssh_config"))
            .arg(format!("g{n}"))
            .arg(line)
            .stdin(Stdio::null())
            .output()
            .unwrap())
    }

    /// Like [`Lab::ssh`], asserting success.
    pub fn ok(&self, n: u8, line: &str) -> String {
        let r = self.ssh(n, line);
        assert_eq!(r.code, 0, "g{n} `{line}`: {r:?}");
        r.stdout
    }

    pub fn app_dir(&self, n: u8, app: &str) -> PathBuf {
        self.state(n).join("apps").join(app)
    }

    pub fn state_of(&self, n: u8, app: &str) -> String {
        let info = self.ok(n, &format!("app info {app} --batch"));
        info_field(&info, "state").unwrap()
    }

    pub fn wait_state(&self, n: u8, app: &str, want: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.state_of(n, app);
            if s == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{app} on g{n} is {s}, not {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn write_template(&self, n: u8, name: &str, toml: &str) {
        std::fs::write(self.state(n).join(format!("templates/{name}.toml")), toml).unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let r = gridctl(&["lab", "down", "--dir", &self.dir().display().to_string()]);
        if r.code != 0 {
            eprintln!("lab down failed: {r:?}");
        }
    }
}

pub fn info_field(info: &str, key: &str) -> Option<String> {
    info.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&resp[9..12]).parse().unwrap();
    (status, resp[end + 4..].to_vec())
}

/// Bytes actually allocated to a file (what `du` reports).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}
