use super::*;

#[test]
fn a_huge_remote_stderr_is_drained_but_kept_bounded() {
    let huge = io::repeat(b'e').take(50 << 20);
    let s = read_bounded(huge, MAX_REMOTE_ERR);
    assert!(s.len() < MAX_REMOTE_ERR + 100, "{} bytes kept", s.len());
    assert!(
        s.ends_with(&format!(
            "({} more bytes not shown)",
            (50 << 20) - MAX_REMOTE_ERR
        )),
        "{}",
        &s[s.len() - 60..]
    );
    assert_eq!(read_bounded(&b"short"[..], MAX_REMOTE_ERR), "short");
}

#[test]
fn the_ssh_malloc_tunables_keep_the_callers_own() {
    let ours = ssh_malloc_tunables(None);
    assert!(
        ours.contains("glibc.malloc.mmap_threshold=33554432"),
        "{ours}"
    );
    assert_eq!(ssh_malloc_tunables(Some(String::new())), ours);
    let merged = ssh_malloc_tunables(Some("glibc.malloc.arena_max=2".into()));
    assert_eq!(merged, format!("{ours}:glibc.malloc.arena_max=2"));
}
