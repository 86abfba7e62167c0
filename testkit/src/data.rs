//! An application's data as its users reach it (HTTP on the application's address), and the
//! fault points of a lab's MIG instances.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::lab::Lab;

/// An application's data as written: (key, value) pairs.
pub type Data = Vec<(String, Vec<u8>)>;

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

/// Bytes actually allocated to a file (what `du` reports).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Switches the lab's MIG instances (the demo application's and MigHelper's) to the fault points
/// under the returned directory (property `fault_dir`); a point is on while its file exists.
/// Call it before the applications are provisioned.
pub fn fault_points(lab: &Lab) -> PathBuf {
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

/// Turns a fault point on.
pub fn on(dir: &Path, point: &str) {
    std::fs::write(dir.join(point), "").unwrap();
}

/// Turns a fault point off.
pub fn off(dir: &Path, point: &str) {
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
