use super::*;

#[test]
fn a_missing_privsep_dir_is_recognised_and_made() {
    let log =
        "debug1: sshd version OpenSSH_9.6\nMissing privilege separation directory: /run/sshd\n";
    assert_eq!(missing_privsep_dir(log), Some(PathBuf::from("/run/sshd")));
    assert_eq!(missing_privsep_dir("Bind to port 2222 failed"), None);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("run/sshd");
    ensure_privsep_dir(&p).unwrap();
    let m = fs::metadata(&p).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o022, 0, "writable by others");
    // Already there: fine, unchanged.
    ensure_privsep_dir(&p).unwrap();
    // A file in its place: a clear error, not a silent pass.
    let f = d.path().join("file");
    fs::write(&f, "").unwrap();
    let e = ensure_privsep_dir(&f).unwrap_err().to_string();
    assert!(e.contains("is not a directory"), "{e}");
}
