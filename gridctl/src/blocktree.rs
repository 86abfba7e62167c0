//! BLAKE3 of a file volume built from its blocks, and a cache of a volume's checksum, so that the
//! stopped phase of a pre-copied migration reads each volume once, not three times.
//!
//! A [`BLOCK`] (1 MiB, 1024 BLAKE3 chunks: a power of two) at a block-aligned offset is a whole
//! subtree of BLAKE3's tree, so the chaining value ("CV") of each block, merged as BLAKE3 merges
//! subtrees, gives the plain BLAKE3 of the file: what `app checksum` computes by reading it all.
//! The delta compares these CVs block by block (a CV depends on its offset too, which costs
//! nothing there: blocks are only ever compared with the block at the same offset).
//!
//! The cache (`APP/sums/VOLUME`) holds a file volume's BLAKE3 with the identity and times of the
//! file it was computed for: device, inode, size, mtime and ctime. It is written only where
//! gridctl itself just read or wrote every block of a volume that nothing else writes (the
//! stopped source of a delta, the staged copy a delta completed, which never starts), and only
//! if those stamps did not move while it did. It is trusted only while they still match: any
//! write, truncation or replacement of the file moves one (ctime cannot be set from user space),
//! and then `app checksum` reads the whole file as before.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use serde::{Deserialize, Serialize};

/// The block of the tree: a power-of-two multiple of BLAKE3's 1 KiB chunk, so every block at a
/// multiple of it is a subtree of its own.
pub const BLOCK: usize = 1 << 20;
const _: () = assert!(BLOCK.is_power_of_two() && BLOCK >= blake3::CHUNK_LEN);

/// The number of blocks of a file of `size` bytes.
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64)
}

/// The length of block `i` of a file of `size` bytes (the last one may be short).
pub fn block_len(size: u64, i: u64) -> usize {
    (size - i * BLOCK as u64).min(BLOCK as u64) as usize
}

/// The chaining value of block `i`, whose bytes are `data` (not empty).
pub fn block_cv(i: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(i * BLOCK as u64);
    h.update(data);
    h.finalize_non_root()
}

/// The chaining value of block `i` of zeros (a hole): it depends on the offset, so it is hashed.
pub fn zero_cv(i: u64, len: usize) -> ChainingValue {
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    block_cv(i, &ZEROS[..len])
}

/// The CVs of whole blocks of zeros by index, for the holes of an application's volumes: a hole's
/// CV depends on its offset, so without them a delta would hash as many zeros as the volumes
/// have holes while the source is stopped. Remembered in `APP/zero-cvs` (32 bytes a block, at
/// most [`ZeroCvs::MAX`] blocks), filled by the pre-copy while the source still runs. A zero CV
/// is a pure function of its index: one entry is checked again at each load, and a file that
/// fails the check is computed anew (a wrong one could only fail a delta, never pass a bad one:
/// the target hashes its own zeros).
pub struct ZeroCvs(Vec<ChainingValue>);

impl ZeroCvs {
    /// 256 GiB of volume: an 8 MiB file. Blocks past it are hashed when needed.
    pub const MAX: u64 = 1 << 18;

    fn path(app_dir: &Path) -> PathBuf {
        app_dir.join("zero-cvs")
    }

    /// The remembered CVs of `app_dir`, extended to cover `n` blocks (computing and saving
    /// those missing) when `fill`; else only what is there.
    pub fn load(app_dir: &Path, n: u64, fill: bool) -> ZeroCvs {
        let p = Self::path(app_dir);
        let mut cvs: Vec<ChainingValue> = fs::read(&p)
            .unwrap_or_default()
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        // The last entry, hashed again: a torn or foreign file is dropped.
        if let Some(last) = cvs.last() {
            let i = cvs.len() as u64 - 1;
            if *last != zero_cv(i, BLOCK) {
                tracing::warn!(
                    "{} is not what it should be: computing it again",
                    p.display()
                );
                cvs.clear();
            }
        }
        let want = n.min(Self::MAX) as usize;
        if fill && cvs.len() < want {
            for i in cvs.len()..want {
                cvs.push(zero_cv(i as u64, BLOCK));
            }
            let tmp = p.with_extension("tmp");
            let res = fs::write(&tmp, cvs.concat()).and_then(|_| fs::rename(&tmp, &p));
            if let Err(e) = res {
                tracing::debug!("not remembering zero CVs in {}: {e}", p.display());
            }
        }
        ZeroCvs(cvs)
    }

    /// The CV of block `i` of zeros, `len` bytes long.
    pub fn get(&self, i: u64, len: usize) -> ChainingValue {
        match self.0.get(i as usize) {
            Some(cv) if len == BLOCK => *cv,
            _ => zero_cv(i, len),
        }
    }
}

/// The CV of the subtree of `len` bytes made of `cvs` (each a whole block but maybe the last).
fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs, len);
    merge_subtrees_non_root(&subtree(l.0, l.1), &subtree(r.0, r.1), Mode::Hash)
}

type Part<'a> = (&'a [ChainingValue], u64);

/// BLAKE3's split of `len` bytes (more than a block): the largest power-of-two number of chunks
/// that leaves something on the right, which for `len > BLOCK` is a whole number of blocks.
fn split(cvs: &[ChainingValue], len: u64) -> (Part<'_>, Part<'_>) {
    let left = left_subtree_len(len);
    let k = (left / BLOCK as u64) as usize;
    debug_assert!(left.is_multiple_of(BLOCK as u64) && k < cvs.len());
    ((&cvs[..k], left), (&cvs[k..], len - left))
}

/// The plain BLAKE3 of a file of `size` bytes from its blocks' CVs; `None` for a file of one
/// block or less, whose root is no merge (hash it whole: it is at most a block).
pub fn root(cvs: &[ChainingValue], size: u64) -> Option<blake3::Hash> {
    if cvs.len() < 2 || cvs.len() as u64 != blocks(size) {
        return None;
    }
    let (l, r) = split(cvs, size);
    Some(merge_subtrees_root(
        &subtree(l.0, l.1),
        &subtree(r.0, r.1),
        Mode::Hash,
    ))
}

/// What identifies the content of a file without reading it, for as long as nobody writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(path: &Path) -> io::Result<Stamp> {
        let m = fs::metadata(path)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Whether the file at `path` still has this stamp.
    pub fn holds(&self, path: &Path) -> bool {
        Stamp::of(path).is_ok_and(|now| now == *self)
    }
}

#[derive(Serialize, Deserialize)]
struct Cached {
    stamp: Stamp,
    blake3: String,
}

/// `APP/sums/VOLUME` for the volume `APP/vols/VOLUME`.
fn cache_path(volume: &Path) -> Option<PathBuf> {
    let name = volume.file_name()?;
    let app = volume.parent()?.parent()?;
    Some(app.join("sums").join(name))
}

/// Remembers `hash` as the BLAKE3 of the volume at `path`, computed from its content while it had
/// `stamp` (taken before the volume was read or written). Nothing is cached if the file moved
/// since; a failure to write only costs the next `app checksum` a read.
pub fn remember(path: &Path, stamp: &Stamp, hash: &blake3::Hash) {
    let Some(p) = cache_path(path) else { return };
    let _ = fs::remove_file(&p);
    if !stamp.holds(path) {
        return;
    }
    let c = Cached {
        stamp: stamp.clone(),
        blake3: hash.to_hex().to_string(),
    };
    let tmp = p.with_extension("tmp");
    let res = fs::create_dir_all(p.parent().expect("sums dir"))
        .and_then(|_| fs::write(&tmp, serde_json::to_vec(&c)?))
        .and_then(|_| fs::rename(&tmp, &p));
    if let Err(e) = res {
        tracing::debug!("not caching the checksum of {}: {e}", path.display());
    }
}

/// The cached BLAKE3 of the volume at `path` and its size, if the file is still the one it was
/// computed for (see the module doc); else `None`, and the caller reads the file.
pub fn recall(path: &Path) -> Option<(u64, blake3::Hash)> {
    let c: Cached = serde_json::from_slice(&fs::read(cache_path(path)?).ok()?).ok()?;
    if !c.stamp.holds(path) {
        return None;
    }
    let h = blake3::Hash::from_hex(&c.blake3).ok()?;
    Some((c.stamp.size, h))
}

/// Drops the cached checksum of the volume at `path` (before its content changes).
pub fn forget(path: &Path) {
    if let Some(p) = cache_path(path) {
        let _ = fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    /// The CVs of a file, block by block, reading holes as the zeros they are.
    fn cvs_of(path: &Path) -> Vec<ChainingValue> {
        let data = fs::read(path).unwrap();
        let size = data.len() as u64;
        (0..blocks(size))
            .map(|i| {
                let off = (i * BLOCK as u64) as usize;
                let b = &data[off..off + block_len(size, i)];
                if b.iter().all(|&x| x == 0) {
                    zero_cv(i, b.len())
                } else {
                    block_cv(i, b)
                }
            })
            .collect()
    }

    #[test]
    fn the_hash_from_block_cvs_is_the_plain_blake3_of_the_file() {
        let d = tempfile::tempdir().unwrap();
        let k = 1024u64;
        let b = BLOCK as u64;
        // Two blocks exactly, a short last block, one chunk past, odd sizes, and many blocks
        // (uneven trees: 3, 5, 7, 9 blocks).
        let sizes = [
            2 * b,
            2 * b - 1,
            b + 1,
            b + k,
            3 * b,
            3 * b + 17,
            5 * b - 3 * k,
            7 * b + b / 2,
            9 * b + 1,
        ];
        for (n, size) in sizes.into_iter().enumerate() {
            let p = d.path().join(format!("v{n}"));
            let f = File::create(&p).unwrap();
            f.set_len(size).unwrap();
            // Data at the start, inside a middle block, and in the last (partial) block; the
            // rest holes.
            f.write_all_at(&[1u8; 5000], 0).unwrap();
            f.write_all_at(&vec![7u8; BLOCK / 3], size / 2).unwrap();
            f.write_all_at(b"end", size - 3).unwrap();
            let want = blake3::hash(&fs::read(&p).unwrap());
            assert_eq!(root(&cvs_of(&p), size), Some(want), "size {size}");
        }
    }

    #[test]
    fn remembered_zero_cvs_are_those_of_zeros_and_a_bad_file_is_redone() {
        let d = tempfile::tempdir().unwrap();
        let z = ZeroCvs::load(d.path(), 5, true);
        for i in 0..7 {
            assert_eq!(z.get(i, BLOCK), zero_cv(i, BLOCK), "block {i}");
        }
        assert_eq!(z.get(2, 100), zero_cv(2, 100));
        assert_eq!(fs::read(d.path().join("zero-cvs")).unwrap().len(), 5 * 32);
        // A file whose last entry is wrong is not used.
        let mut b = fs::read(d.path().join("zero-cvs")).unwrap();
        b[4 * 32] ^= 1;
        fs::write(d.path().join("zero-cvs"), &b).unwrap();
        let z = ZeroCvs::load(d.path(), 5, false);
        assert_eq!(z.0.len(), 0);
        assert_eq!(z.get(4, BLOCK), zero_cv(4, BLOCK));
    }

    #[test]
    fn one_block_or_less_has_no_merged_root() {
        assert_eq!(root(&[block_cv(0, b"x")], 1), None);
        assert_eq!(root(&[], 0), None);
    }

    #[test]
    fn a_cached_checksum_holds_until_the_file_changes() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("vols")).unwrap();
        let p = d.path().join("vols/data");
        fs::write(&p, b"hello").unwrap();
        let h = blake3::hash(b"hello");
        let s = Stamp::of(&p).unwrap();
        remember(&p, &s, &h);
        assert_eq!(recall(&p), Some((5, h)));
        // A write of the same length moves the stamps; the cache is not used.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"J", 0).unwrap();
        assert_eq!(recall(&p), None);
        // A stamp taken before a change is not cached at all.
        remember(&p, &s, &h);
        assert!(!d.path().join("sums/data").exists());
        // A replaced file (another inode) is not the cached one either.
        let s = Stamp::of(&p).unwrap();
        remember(&p, &s, &blake3::hash(b"hello!"));
        assert!(recall(&p).is_some());
        fs::rename(&p, d.path().join("old")).unwrap();
        fs::write(&p, b"hello!").unwrap();
        assert_eq!(recall(&p), None);
    }
}
