//! SSH keys made with the system's `ssh-keygen`, as MIG's operators make them.

use std::path::Path;
use std::process::{Command, Stdio};

/// A fresh ed25519 key pair without a passphrase at `path` (and `path.pub`).
pub fn keygen(path: &Path) {
    keygen_type(path, "ed25519")
}

/// A fresh key pair of `kind` (`ed25519`, `ecdsa`, `rsa`) without a passphrase.
pub fn keygen_type(path: &Path, kind: &str) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "mig-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen");
    assert!(st.success(), "ssh-keygen failed for {}", path.display());
}

/// `SHA256:…` of a public key file, as `ssh-keygen -l` prints it.
pub fn fingerprint(pub_file: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pub_file)
        .output()
        .expect("run ssh-keygen -l");
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no fingerprint for {}", pub_file.display()))
        .to_string()
}
