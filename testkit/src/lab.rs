//! A real lab of grids for one test: `gridctl lab up` on its own addresses, torn down on drop.
//!
//! Address plan: grid n of a lab with base B is 127.0.(B+n).x (198.18.(B+n).x with `--netns`).
//! gridctl's own tests own bases 100..=199 and pick theirs by number (`Lab::up(2, 120)`); the
//! `mig` package's tests own 200..=253, handed out per test binary by a counter
//! (`Lab::up(2, &BASES)`). A lab from a counter is a lab *with MIG*: its grids run the `mig`
//! binary beside gridctl (`--mig-bin`), the demo application's template has `precopy` off (the
//! tests written for stop-and-copy keep their steps; [`Lab::set_precopy`] turns it on), and a
//! watchdog brings it down if the test process dies without running Drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::wait::wait_for;

const APP_NAME_SET: &str = r#""--set", "app_name=${app}""#;
const PRECOPY_OFF: &str = r#""--set", "precopy=off""#;
const PRECOPY_ON: &str = r#""--set", "precopy=on""#;

/// Where a lab's addresses start: a base of gridctl's own tests, or the next one of a `mig` test
/// binary's counter (which makes the lab one with MIG, see the module's doc).
pub enum Base<'a> {
    At(u8),
    Next(&'a AtomicU8),
}

impl From<u8> for Base<'_> {
    fn from(b: u8) -> Self {
        Base::At(b)
    }
}

impl<'a> From<&'a AtomicU8> for Base<'a> {
    fn from(c: &'a AtomicU8) -> Self {
        Base::Next(c)
    }
}

/// What [`Lab::up_with`] adds to `gridctl lab up`: `--netns` or not, or the arguments as given.
pub struct Extra(Vec<String>);

impl From<bool> for Extra {
    fn from(netns: bool) -> Self {
        Extra(netns.then(|| "--netns".to_string()).into_iter().collect())
    }
}

impl From<&[&str]> for Extra {
    fn from(args: &[&str]) -> Self {
        Extra(args.iter().map(|a| a.to_string()).collect())
    }
}

impl<const N: usize> From<&[&str; N]> for Extra {
    fn from(args: &[&str; N]) -> Self {
        Extra::from(&args[..])
    }
}

/// One lab: `grids` grids from `base`, in a temporary directory.
pub struct Lab {
    pub tmp: tempfile::TempDir,
    pub base: u8,
    pub grids: u8,
    /// Each grid in its own network namespace (`gridctl lab up --netns`): addresses 198.18.x.
    pub netns: bool,
    /// The grids run MIG (`--mig-bin`); see the module's doc.
    with_mig: bool,
}

/// The directory of the workspace's binaries: a test binary runs from `target/debug/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the test binary's directory");
    deps.parent().unwrap_or(deps).to_path_buf()
}

/// The `gridctl` binary, built on demand (another package's binary for the `mig` tests).
pub fn gridctl_bin() -> PathBuf {
    let g = bin_dir().join("gridctl");
    if !g.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "gridctl", "--bin", "gridctl"])
            .status()
            .expect("cargo runs");
        assert!(st.success(), "building gridctl failed");
    }
    g
}

/// The `mig` binary the lab's grids run.
pub fn mig_bin() -> PathBuf {
    bin_dir().join("mig")
}

/// A command's exit code and output, as text.
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

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `gridctl ARGS` with no stdin.
pub fn gridctl(args: &[&str]) -> Run {
    Command::new(gridctl_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
        .into()
}

impl Lab {
    /// Brings up `grids` grids at `base` (see [`Base`]).
    pub fn up<'a>(grids: u8, base: impl Into<Base<'a>>) -> Lab {
        Lab::up_with(grids, base, false)
    }

    /// Like [`Lab::up`], with `extra` added to `gridctl lab up` (`true` is `--netns`).
    pub fn up_with<'a>(grids: u8, base: impl Into<Base<'a>>, extra: impl Into<Extra>) -> Lab {
        let Extra(extra) = extra.into();
        let netns = extra.iter().any(|a| a == "--netns");
        let (base, with_mig) = match base.into() {
            Base::At(b) => (b, false),
            Base::Next(bases) => {
                let base = bases.fetch_add(grids, Ordering::SeqCst);
                assert!(
                    (200..=253).contains(&base) && u16::from(base) + u16::from(grids) <= 255,
                    "out of lab addresses: base {base}"
                );
                (base, true)
            }
        };
        let tmp = tempfile::Builder::new()
            .prefix("mig-lab")
            .tempdir()
            .unwrap();
        let lab = Lab {
            tmp,
            base,
            grids,
            netns,
            with_mig,
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let r = lab.lab_up(&extra);
        assert_eq!(r.code, 0, "lab up failed: {r:?}");
        if with_mig {
            lab.watchdog();
            lab.demo_template_precopy_off();
        }
        lab
    }

    /// Tears the lab down if this process dies without running Drop (a panic in another thread
    /// aborting, a kill).
    fn watchdog(&self) {
        let pid = std::process::id();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 1; done; '{}' lab down --dir '{}' >/dev/null 2>&1",
                gridctl_bin().display(),
                self.dir().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// The tests written for stop-and-copy keep its steps: `precopy` is off in their labs.
    fn demo_template_precopy_off(&self) {
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/templates/demoapp.toml");
        let t = std::fs::read_to_string(&template).unwrap().replacen(
            APP_NAME_SET,
            &format!("{APP_NAME_SET}, {PRECOPY_OFF}"),
            1,
        );
        for n in 1..=self.grids {
            std::fs::write(self.state(n).join("templates/demoapp.toml"), &t).unwrap();
        }
    }

    /// Sets the demo application's `precopy` property on every grid; call it before the
    /// applications are provisioned.
    pub fn set_precopy(&self, on: bool) {
        let want = if on { PRECOPY_ON } else { PRECOPY_OFF };
        for n in 1..=self.grids {
            let p = self.state(n).join("templates/demoapp.toml");
            let t = std::fs::read_to_string(&p).unwrap();
            let t = t.replace(PRECOPY_OFF, want).replace(PRECOPY_ON, want);
            std::fs::write(&p, t).unwrap();
        }
    }

    /// `gridctl lab up` with this lab's grids, base, directory (and `mig`, `--netns`), plus
    /// `extra`.
    pub fn lab_up(&self, extra: &[&str]) -> Run {
        let g = self.grids.to_string();
        let b = self.base.to_string();
        let d = self.dir().display().to_string();
        let mut args = vec!["lab", "up", "--grids", &g, "--base", &b, "--dir", &d];
        let mig = mig_bin().display().to_string();
        if self.with_mig {
            args.extend(["--mig-bin", &mig]);
        }
        if self.netns && !extra.contains(&"--netns") {
            args.push("--netns");
        }
        args.extend_from_slice(extra);
        gridctl(&args)
    }

    /// `gridctl lab up` again with this lab's options. Idempotent: it restarts only what is
    /// missing (a killed sshd) and leaves what runs alone.
    pub fn run_lab_up(&self, what: &str) {
        let r = self.lab_up(&[]);
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
    }

    /// The lab's directory.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// The lab's directory, canonical (as gridctl writes it into the files it makes).
    pub fn dir(&self) -> PathBuf {
        std::fs::canonicalize(self.tmp.path()).unwrap()
    }

    pub fn state(&self, n: u8) -> PathBuf {
        self.dir().join(format!("g{n}/state"))
    }

    pub fn app_dir(&self, n: u8, app: &str) -> PathBuf {
        self.state(n).join("apps").join(app)
    }

    /// `127.0.(base+n).host`, or `198.18.(base+n).host` in a `--netns` lab.
    pub fn ip(&self, n: u8, host: u8) -> String {
        let prefix = if self.netns { "198.18" } else { "127.0" };
        format!("{prefix}.{}.{host}", self.base + n)
    }

    pub fn controller(&self, n: u8) -> String {
        format!("{}:2222", self.ip(n, 1))
    }

    /// The MIG GUI of an application at grid n's MIG_ip.
    pub fn mig_url(&self, n: u8) -> String {
        format!("http://{}:8080", self.ip(n, 10))
    }

    /// The application's data through MIG's pass-through on the application's address (`in`),
    /// as its users reach it.
    pub fn data_url(&self, n: u8) -> String {
        format!("http://{}:8000", self.ip(n, 10))
    }

    /// `ssh -F DIR/ssh_config gN ARGS...` as MIG's operators would type it.
    fn ssh_command(&self, n: u8) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(self.dir().join("ssh_config"))
            .arg(format!("g{n}"));
        c
    }

    /// `ssh -F DIR/ssh_config gN app ARGS...`
    pub fn app(&self, n: u8, args: &[&str]) -> Output {
        self.ssh_command(n).arg("app").args(args).output().unwrap()
    }

    /// `ssh -F DIR/ssh_config gN LINE`, with no stdin.
    pub fn ssh(&self, n: u8, line: &str) -> Run {
        self.ssh_command(n)
            .arg(line)
            .stdin(Stdio::null())
            .output()
            .unwrap()
            .into()
    }

    /// Like [`Lab::ssh`], asserting success.
    pub fn ok(&self, n: u8, line: &str) -> String {
        let r = self.ssh(n, line);
        assert_eq!(r.code, 0, "g{n} `{line}`: {r:?}");
        r.stdout
    }

    /// `app list --batch` on grid n as (name, state) pairs.
    pub fn apps(&self, n: u8) -> Vec<(String, String)> {
        let out = self.app(n, &["list", "--batch"]);
        assert!(
            out.status.success(),
            "app list on g{n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0].to_string(), f[1].to_string())
            })
            .collect()
    }

    pub fn state_of(&self, n: u8, app: &str) -> String {
        let info = self.ok(n, &format!("app info {app} --batch"));
        info_field(&info, "state").unwrap()
    }

    pub fn wait_state(&self, n: u8, app: &str, want: &str, secs: u64) {
        wait_for(&format!("{app} on g{n} to be {want}"), secs, || {
            (self.state_of(n, app) == want).then_some(())
        });
    }

    pub fn checksum(&self, n: u8, app: &str) -> String {
        let out = self.app(n, &["checksum", app]);
        assert!(
            out.status.success(),
            "checksum: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Provisions the demo application `name` on grid n at that grid's MIG_ip.
    pub fn provision_demo(&self, n: u8, name: &str) {
        let in_ip = format!("in_ip={}", self.ip(n, 10));
        let web_ip = format!("web_ip={}", self.ip(n, 11));
        let out = self.app(n, &["provision", "demoapp", name, &in_ip, &web_ip]);
        assert!(
            out.status.success(),
            "provision: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn write_template(&self, n: u8, name: &str, toml: &str) {
        std::fs::write(self.state(n).join(format!("templates/{name}.toml")), toml).unwrap();
    }

    /// Rewrites a line of the lab's grid.info (what new applications' config volumes start from).
    pub fn edit_grid_info(&self, from: &str, to: &str) {
        let p = self.dir().join("mig/grid.info");
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{from:?} not in grid.info:\n{s}");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
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

/// An application list as (name, state) pairs of `&str`, to compare with a literal.
pub fn names(apps: &[(String, String)]) -> Vec<(&str, &str)> {
    apps.iter().map(|(n, s)| (n.as_str(), s.as_str())).collect()
}

/// The value of `key` in `app info --batch` output.
pub fn info_field(info: &str, key: &str) -> Option<String> {
    info.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}
