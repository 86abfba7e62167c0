//! A real lab of grids for one test: `gridctl lab up` on its own addresses, the demo application
//! template installed, torn down on drop, and by a watchdog if the test process dies first.
//!
//! Address plan: grid n of a lab with base B is 127.0.(B+n).x. The `mig` package's tests own bases
//! 200..=253 (gridctl's own tests use 100..=199), handed out per test binary by `BASES`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

const APP_NAME_SET: &str = r#""--set", "app_name=${app}""#;
const PRECOPY_OFF: &str = r#""--set", "precopy=off""#;
const PRECOPY_ON: &str = r#""--set", "precopy=on""#;

pub struct Lab {
    pub dir: tempfile::TempDir,
    pub base: u8,
    pub grids: u8,
    /// Each grid in its own network namespace (`gridctl lab up --netns`): addresses 198.18.x.
    pub netns: bool,
}

/// The `gridctl` binary beside `mig`, built on demand (it is another package's binary).
pub fn gridctl() -> PathBuf {
    let mig = PathBuf::from(env!("CARGO_BIN_EXE_mig"));
    let g = mig.with_file_name("gridctl");
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

impl Lab {
    /// Brings up `grids` grids at the next free base of `bases` (a per-binary counter).
    pub fn up(grids: u8, bases: &AtomicU8) -> Lab {
        Lab::up_with(grids, bases, false)
    }

    /// Like [`Lab::up`], with `netns` as `gridctl lab up --netns`.
    pub fn up_with(grids: u8, bases: &AtomicU8, netns: bool) -> Lab {
        let base = bases.fetch_add(grids, Ordering::SeqCst);
        // tests/controls.rs has 250..=253 (two labs of two grids; grid n is 127.0.(base+n)).
        assert!(
            (200..=253).contains(&base) && u16::from(base) + u16::from(grids) <= 255,
            "out of lab addresses: base {base}"
        );
        let dir = tempfile::Builder::new()
            .prefix("mig-lab")
            .tempdir()
            .unwrap();
        let lab = Lab {
            dir,
            base,
            grids,
            netns,
        };
        lab.run_lab_up("lab up");
        // A watchdog tears the lab down if this process dies without running Drop (a panic in
        // another thread aborting, a kill).
        let pid = std::process::id();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 1; done; '{}' lab down --dir '{}' >/dev/null 2>&1",
                gridctl().display(),
                lab.path().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/templates/demoapp.toml");
        // The tests written for stop-and-copy keep its steps: `precopy` is off in their labs
        // (tests/precopy.rs turns it on with `set_precopy`).
        let t = std::fs::read_to_string(&template).unwrap().replacen(
            APP_NAME_SET,
            &format!("{APP_NAME_SET}, {PRECOPY_OFF}"),
            1,
        );
        for n in 1..=grids {
            std::fs::write(lab.state(n).join("templates/demoapp.toml"), &t).unwrap();
        }
        lab
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

    /// `gridctl lab up` with this lab's options. Idempotent: run again, it restarts only what is
    /// missing (a killed sshd) and leaves what runs alone.
    pub fn run_lab_up(&self, what: &str) {
        let out = Command::new(gridctl())
            .args([
                "lab",
                "up",
                "--grids",
                &self.grids.to_string(),
                "--base",
                &self.base.to_string(),
                "--dir",
            ])
            .arg(self.path())
            .arg("--mig-bin")
            .arg(env!("CARGO_BIN_EXE_mig"))
            .args(self.netns.then_some("--netns"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state(&self, n: u8) -> PathBuf {
        self.path().join(format!("g{n}/state"))
    }

    /// `127.0.(base+n).host`, or `198.18.(base+n).host` in a `--netns` lab.
    pub fn ip(&self, n: u8, host: u8) -> String {
        let prefix = if self.netns { "198.18" } else { "127.0" };
        format!("{prefix}.{}.{host}", self.base + n)
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

    /// `ssh -F DIR/ssh_config gN app ARGS...`
    pub fn app(&self, n: u8, args: &[&str]) -> Output {
        Command::new("ssh")
            .arg("-F")
            .arg(self.path().join("ssh_config"))
            .arg(format!("g{n}"))
            .arg("app")
            .args(args)
            .output()
            .unwrap()
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

    pub fn checksum(&self, n: u8, app: &str) -> String {
        let out = self.app(n, &["checksum", app]);
        assert!(
            out.status.success(),
            "checksum: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Provisions the demo application `name` on grid n at that grid's MIG_ip, and waits for its MIG.
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

    /// Rewrites a line of the lab's grid.info (what new applications' config volumes start from).
    pub fn edit_grid_info(&self, from: &str, to: &str) {
        let p = self.path().join("mig/grid.info");
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{from:?} not in grid.info:\n{s}");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(gridctl())
            .args(["lab", "down", "--dir"])
            .arg(self.path())
            .output();
    }
}

/// Waits until `f` returns Some, or panics after `secs` saying what it waited for.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// The application's data, as its users reach it (through MIG's pass-through on `in`).

/// `curl -fsS --max-time 5 ARGS`: the body, or None on any failure.
pub fn curl(args: &[&str]) -> Option<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5"])
        .args(args)
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

/// `PUT URL/kv/KEY` with `value` (up to a minute, for large values).
pub fn put(url: &str, key: &str, value: &[u8]) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), value).unwrap();
    let body = format!("@{}", f.path().display());
    let r = curl(&[
        "--max-time",
        "60",
        "-X",
        "PUT",
        "--data-binary",
        &body,
        &format!("{url}/kv/{key}"),
    ]);
    assert!(r.is_some(), "PUT {url}/kv/{key}");
}

/// `GET URL/kv/KEY`.
pub fn get(url: &str, key: &str) -> Option<Vec<u8>> {
    curl(&[&format!("{url}/kv/{key}")])
}

/// `n` pseudo-random bytes (xorshift): incompressible, and the same for the same seed.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An application's data as written: (key, value) pairs.
pub type Data = Vec<(String, Vec<u8>)>;

/// Switches the lab's MIG instances (the demo application's and MigHelper's) to the fault points
/// under the returned directory (property `fault_dir`); a point is on while its file exists.
/// Call it before the applications are provisioned.
pub fn fault_points(lab: &Lab) -> std::path::PathBuf {
    let dir = lab.path().join("mig-faults");
    std::fs::create_dir_all(&dir).unwrap();
    for n in 1..=lab.grids {
        for (file, anchor) in [
            ("demoapp.toml", r#""--set", "app_name=${app}""#),
            ("MigHelper.toml", r#""--set", "state_dir=${vol:state}""#),
        ] {
            let p = lab.state(n).join("templates").join(file);
            let t = std::fs::read_to_string(&p).unwrap();
            assert!(t.contains(anchor), "{anchor} not in {}", p.display());
            let with = format!(r#"{anchor}, "--set", "fault_dir={}""#, dir.display());
            std::fs::write(&p, t.replacen(anchor, &with, 1)).unwrap();
        }
    }
    dir
}

pub fn on(dir: &std::path::Path, point: &str) {
    std::fs::write(dir.join(point), "").unwrap();
}

pub fn off(dir: &std::path::Path, point: &str) {
    std::fs::remove_file(dir.join(point)).unwrap();
}

/// `shop` on g1 with a little data (the copy's size does not matter to the paths that use it).
pub fn small_shop(lab: &Lab) -> (Data, String) {
    lab.provision_demo(1, "shop");
    let data: Data = vec![
        ("greeting".into(), b"hello".to_vec()),
        ("blob".into(), random_bytes(1 << 20, 7)),
    ];
    for (k, v) in &data {
        put(&lab.data_url(1), k, v);
    }
    (data, lab.checksum(1, "shop"))
}
