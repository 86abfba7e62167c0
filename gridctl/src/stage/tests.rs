//! The staged and delta streams end to end in memory: what moves, what the copy and the caches
//! end as, and the refusals.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::blocktree;
use crate::model::{AppRecord, State, Volume};
use crate::template::VolumeKind;
use crate::transfer::{self, Progress};
use crate::volume;

use super::*;

fn record(size: u64) -> AppRecord {
    AppRecord {
        name: "src".into(),
        template: "t".into(),
        state: State::Stopped,
        error: String::new(),
        props: BTreeMap::new(),
        required: vec![],
        secret: vec![],
        volumes: vec![
            Volume {
                name: "data".into(),
                kind: VolumeKind::File,
                size,
            },
            Volume {
                name: "conf".into(),
                kind: VolumeKind::Dir,
                size: 0,
            },
        ],
        components: vec![],
        pids: vec![],
        pgid: 0,
        staged: false,
    }
}

const T: &str =
    "[[volumes]]\nname = \"data\"\nsize = \"1M\"\n[[volumes]]\nname = \"conf\"\nkind = \"dir\"\n";

/// A grid state dir with template `t`, the source app `src` (a sparse file volume of
/// `size` bytes and a dir volume) and the target's app dir `dst`.
fn setup(size: u64) -> (tempfile::TempDir, AppRecord) {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("templates")).unwrap();
    fs::write(d.path().join("templates/t.toml"), T).unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("vols/conf")).unwrap();
    fs::write(src.join("vols/conf/k"), "v1").unwrap();
    volume::create(&src.join("vols/data"), VolumeKind::File, size, None).unwrap();
    fs::create_dir_all(d.path().join("dst/vols")).unwrap();
    (d, record(size))
}

fn write_at(d: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(d.join("src/vols/data"))
        .unwrap();
    f.write_all_at(data, off).unwrap();
}

fn stage(d: &Path, rec: &AppRecord) -> AppRecord {
    let mut wire = Vec::new();
    export_stage(&d.join("src"), rec, true, None, &mut wire).unwrap();
    receive_stage(
        &mut &wire[..],
        d,
        "src",
        "dst",
        &[],
        &d.join("dst"),
        &mut Progress::new(None),
    )
    .unwrap()
}

/// A delta from `src` into the staged `dst`; the bytes that moved, or the error.
fn delta(
    d: &Path,
    rec: &AppRecord,
    staged: &AppRecord,
    tamper: impl FnOnce(&mut Vec<u8>),
) -> Result<u64, String> {
    let digests = staged_digests(&d.join("dst"), staged).unwrap();
    let mut req = Vec::new();
    write_wanted(&mut req, &digests).unwrap();
    let mut wire = Vec::new();
    export_delta(&d.join("src"), rec, &mut &req[..], &mut wire).unwrap();
    tamper(&mut wire);
    let mut p = Progress::new(None);
    receive_delta(
        &mut &wire[..],
        d,
        staged,
        digests,
        &[],
        &d.join("dst"),
        &mut p,
    )?;
    // As `import_delta` does: the pre-copy's digests are stale now.
    let _ = fs::remove_dir_all(d.join("dst/stage"));
    Ok(p.done)
}

/// `app checksum` of the data volume, read whole (no cache).
fn read_sum(d: &Path, app: &str) -> blake3::Hash {
    volume::file_digest(&d.join(app).join("vols/data"))
        .unwrap()
        .1
}

fn sums(d: &Path, app: &str) -> Vec<String> {
    [("data", VolumeKind::File), ("conf", VolumeKind::Dir)]
        .iter()
        .map(|(v, k)| volume::checksum_line(v, *k, &d.join(app).join("vols").join(v)).unwrap())
        .collect()
}

#[test]
fn a_delta_moves_only_the_changed_blocks_and_the_copy_ends_equal() {
    let size = (32 << 20) + 1000;
    let (d, rec) = setup(size);
    for i in 0..10u64 {
        write_at(d.path(), i * (3 << 20), &vec![i as u8 + 1; 1 << 20]);
    }
    write_at(d.path(), size - 10, b"tail-bytes");
    let staged = stage(d.path(), &rec);
    assert!(staged.staged);
    assert!(fs::read_dir(d.path().join("dst/vols/conf"))
        .unwrap()
        .next()
        .is_none());
    // While "running": one block changed, one block punched to a hole, one new block in a
    // hole, the tail changed, and the dir volume changed.
    write_at(d.path(), 3 << 20, b"changed");
    let f = OpenOptions::new()
        .write(true)
        .open(d.path().join("src/vols/data"))
        .unwrap();
    punch_hole(&f, 6 << 20, 1 << 20).unwrap();
    write_at(d.path(), 20 << 20, b"new data in a hole");
    write_at(d.path(), size - 3, b"xyz");
    fs::write(d.path().join("src/vols/conf/k"), "v2").unwrap();
    let moved = delta(d.path(), &rec, &staged, |_| {}).unwrap();
    // Three data blocks (the tail is 1000 bytes) and the 2-byte file.
    assert_eq!(moved, (2 << 20) + 1000 + 2);
    assert_eq!(sums(d.path(), "src"), sums(d.path(), "dst"));
    // The checksums both sides cached are the volumes' plain BLAKE3, as a read finds it.
    let src_vol = d.path().join("src/vols/data");
    let dst_vol = d.path().join("dst/vols/data");
    assert_eq!(
        blocktree::recall(&src_vol).unwrap().1,
        read_sum(d.path(), "src")
    );
    assert_eq!(
        blocktree::recall(&dst_vol).unwrap().1,
        read_sum(d.path(), "dst")
    );
    // Nothing changed: a second delta moves only the dir volume.
    let moved = delta(d.path(), &rec, &staged, |_| {}).unwrap();
    assert_eq!(moved, 2);
}

#[test]
fn changes_in_every_hashing_thread_s_runs_arrive_in_order() {
    let b = BLOCK as u64;
    let size = (2 * RUN + 5) * b + 100;
    let (d, rec) = setup(size);
    for i in [1, 70, 130] {
        write_at(d.path(), i * b, &vec![i as u8; BLOCK]);
    }
    write_at(d.path(), size - 100, &[9u8; 100]);
    let staged = stage(d.path(), &rec);
    // Runs 0, 1 and 2 (threads 0, 1, 0), a hole punched, the short last block.
    for i in [2, RUN + 1, 2 * RUN + 1] {
        write_at(d.path(), i * b, b"changed");
    }
    let f = OpenOptions::new()
        .write(true)
        .open(d.path().join("src/vols/data"))
        .unwrap();
    punch_hole(&f, 70 * b, b).unwrap();
    write_at(d.path(), size - 1, b"!");
    let moved = delta(d.path(), &rec, &staged, |_| {}).unwrap();
    assert_eq!(moved, 3 * b + 100 + 2);
    assert_eq!(read_sum(d.path(), "src"), read_sum(d.path(), "dst"));
    assert_eq!(sums(d.path(), "src"), sums(d.path(), "dst"));
}

#[test]
fn the_checksum_after_a_delta_is_cached_until_a_volume_changes() {
    let size = 5 << 20;
    let (d, rec) = setup(size);
    write_at(d.path(), 0, &vec![3u8; 3 << 20]);
    let staged = stage(d.path(), &rec);
    write_at(d.path(), 2 << 20, b"changed");
    delta(d.path(), &rec, &staged, |_| {}).unwrap();
    let dst_vol = d.path().join("dst/vols/data");
    let cached = blocktree::recall(&dst_vol).unwrap();
    assert_eq!(cached, (size, read_sum(d.path(), "dst")));
    assert_eq!(sums(d.path(), "src"), sums(d.path(), "dst"));
    // A write to the copy after the delta: `app checksum` reads it and sees the change.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = OpenOptions::new().write(true).open(&dst_vol).unwrap();
    f.write_all_at(b"X", 4 << 20).unwrap();
    assert!(blocktree::recall(&dst_vol).is_none());
    assert_ne!(sums(d.path(), "src"), sums(d.path(), "dst"));
}

#[test]
fn staged_digests_are_not_trusted_after_the_staged_copy_changed() {
    let size = 4 << 20;
    let (d, rec) = setup(size);
    write_at(d.path(), 0, &vec![5u8; size as usize]);
    let staged = stage(d.path(), &rec);
    // Someone writes into the staged copy behind the pre-copy's back: its stored digests
    // no longer describe it, and a delta built on them would leave that write in place
    // while the copy's cached checksum claimed the source's.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = OpenOptions::new()
        .write(true)
        .open(d.path().join("dst/vols/data"))
        .unwrap();
    f.write_all_at(b"stray", 1 << 20).unwrap();
    let moved = delta(d.path(), &rec, &staged, |_| {}).unwrap();
    // The block hashed again, found different, and moved.
    assert_eq!(moved, (1 << 20) + 2);
    assert_eq!(read_sum(d.path(), "src"), read_sum(d.path(), "dst"));
    assert_eq!(sums(d.path(), "src"), sums(d.path(), "dst"));
}

#[test]
fn a_volume_of_one_block_or_less_gets_its_whole_volume_digest_too() {
    for size in [0u64, 1, 4096, 1 << 20] {
        let (d, rec) = setup(size);
        if size > 0 {
            write_at(d.path(), 0, b"a");
        }
        let staged = stage(d.path(), &rec);
        if size > 1 {
            write_at(d.path(), size - 1, b"z");
        }
        delta(d.path(), &rec, &staged, |_| {}).unwrap();
        assert_eq!(
            read_sum(d.path(), "src"),
            read_sum(d.path(), "dst"),
            "size {size}"
        );
        assert_eq!(sums(d.path(), "src"), sums(d.path(), "dst"), "size {size}");
    }
}

#[test]
fn a_corrupted_delta_is_detected_by_the_whole_volume_digest() {
    let (d, rec) = setup(8 << 20);
    write_at(d.path(), 0, &vec![1u8; 4 << 20]);
    let staged = stage(d.path(), &rec);
    write_at(d.path(), 1 << 20, b"changed");
    let e = delta(d.path(), &rec, &staged, |w| {
        let nl = w.iter().position(|&b| b == b'\n').unwrap();
        assert_eq!(w[nl + 1], b'D');
        w[nl + 1 + transfer::D_HEAD + 5] ^= 1;
    })
    .unwrap_err();
    assert!(
        e.contains("volume data: BLAKE3 mismatch after the delta"),
        "{e}"
    );
}

#[test]
fn streams_of_another_format_or_mode_are_refused_by_name() {
    let (d, rec) = setup(1 << 20);
    let mut wire = Vec::new();
    export_stage(&d.path().join("src"), &rec, false, None, &mut wire).unwrap();
    let e = read_header(&mut &wire[..], Mode::Delta).unwrap_err();
    assert!(
        e.to_string().contains("a Stage stream where a Delta"),
        "{e}"
    );
    // A full import's stream (format 2), as a gridctl without staging sends it.
    let mut full = Vec::new();
    transfer::export(&d.path().join("src"), &rec, false, false, None, &mut full).unwrap();
    let e = read_header(&mut &full[..], Mode::Stage).unwrap_err();
    assert!(
        e.to_string()
            .contains("sends stream format 2, and a staged copy needs format 3"),
        "{e}"
    );
    let e = read_wanted(&mut &b"{\"format\":2,\"volumes\":[]}\n"[..]).unwrap_err();
    assert!(e.to_string().contains("a delta of format 2"), "{e}");
    // A target whose block digests are each block's own BLAKE3 (no "digest" field).
    let e = read_wanted(&mut &b"{\"format\":3,\"volumes\":[]}\n"[..]).unwrap_err();
    assert!(
        e.to_string()
            .contains("the target grid compares blocks by \"blake3\", this grid by \"blake3-cv\""),
        "{e}"
    );
}

#[test]
fn the_refusal_of_an_old_source_names_the_way_out() {
    let m = old_source("127.0.1.1:2222", "refused: expected `peer export APP`");
    assert!(
        m.contains("without staged copies") && m.contains("precopy = off"),
        "{m}"
    );
}
