//! The application's private key: the start-up checks the appliance asks for.
//!
//! The key reaches every grid controller and, through a derivation, signs every handoff, so MIG
//! refuses one that others could read or that it could not use unattended (a passphrase). The key is
//! parsed, not guessed at from its text.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why the private key cannot be used; each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: private key not found: put the application's OpenSSH private key there, or set private_key_file")]
    Missing { path: PathBuf },
    #[error("{path}: cannot read the private key: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the private key is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: the private key is readable or writable by others (mode {mode:03o}): run `chmod 600 {path}`")]
    Mode { path: PathBuf, mode: u32 },
    #[error("{path}: not an OpenSSH private key ({reason}): convert it with `ssh-keygen -p -f {path}` or make one with `ssh-keygen -t ed25519 -N '' -f {path}`")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: the private key has a passphrase; MIG needs one without: run `ssh-keygen -p -N '' -f {path}`")]
    Encrypted { path: PathBuf },
}

/// Checks the key at `path` (exists, regular file, mode 600 or stricter, OpenSSH, no passphrase)
/// and returns it parsed.
pub fn check_private_key(path: &Path) -> Result<ssh_key::PrivateKey, KeyError> {
    let p = || path.to_path_buf();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing { path: p() });
        }
        Err(source) => return Err(KeyError::Read { path: p(), source }),
    };
    if !meta.is_file() {
        return Err(KeyError::NotAFile { path: p() });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode { path: p(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::InvalidData => KeyError::Format {
            path: p(),
            reason: "the file is not text".into(),
        },
        _ => KeyError::Read { path: p(), source },
    })?;
    let key = ssh_key::PrivateKey::from_openssh(text.trim()).map_err(|e| KeyError::Format {
        path: p(),
        reason: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(KeyError::Encrypted { path: p() });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn keygen(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
        let path = dir.join(name);
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", passphrase, "-C", "test", "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success());
        path
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_fresh_unencrypted_key_passes() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "k", "");
        assert!(check_private_key(&key).is_ok());
        chmod(&key, 0o400);
        assert!(check_private_key(&key).is_ok());
    }

    #[test]
    fn an_encrypted_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "k", "secret phrase");
        let e = check_private_key(&key).unwrap_err();
        assert!(matches!(e, KeyError::Encrypted { .. }), "{e}");
        assert!(e.to_string().contains("ssh-keygen -p -N ''"), "{e}");
    }

    #[test]
    fn a_key_others_can_read_is_refused_with_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "k", "");
        for mode in [0o644, 0o640, 0o602] {
            chmod(&key, mode);
            let e = check_private_key(&key).unwrap_err();
            assert!(matches!(e, KeyError::Mode { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains(&format!("chmod 600 {}", key.display())),
                "{e}"
            );
        }
    }

    #[test]
    fn garbage_missing_and_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("pem");
        std::fs::write(
            &pem,
            "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        chmod(&pem, 0o600);
        assert!(matches!(
            check_private_key(&pem),
            Err(KeyError::Format { .. })
        ));
        let bin = dir.path().join("bin");
        std::fs::write(&bin, [0xff, 0xfe, 0x00, 0x80]).unwrap();
        chmod(&bin, 0o600);
        assert!(matches!(
            check_private_key(&bin),
            Err(KeyError::Format { .. })
        ));
        let e = check_private_key(&dir.path().join("none")).unwrap_err();
        assert!(matches!(e, KeyError::Missing { .. }));
        assert!(e.to_string().contains("private_key_file"));
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        chmod(&sub, 0o700);
        assert!(matches!(
            check_private_key(&sub),
            Err(KeyError::NotAFile { .. })
        ));
    }
}
