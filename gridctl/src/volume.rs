//! Volumes on disk: sparse files and directories, their data extents and their digests.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::template::VolumeKind;

/// Zeros, to hash the holes of a sparse file without reading them.
pub static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// Feeds `n` zero bytes to a hasher.
pub fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Creates an empty volume: a sparse file of `size` bytes, or a directory (copied from `init`).
pub fn create(path: &Path, kind: VolumeKind, size: u64, init: Option<&Path>) -> io::Result<()> {
    match kind {
        VolumeKind::File => {
            let f = OpenOptions::new().write(true).create_new(true).open(path)?;
            f.set_len(size)?;
            f.sync_all()
        }
        VolumeKind::Dir => match init {
            Some(src) => copy_dir(src, path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("copying {} into the volume: {e}", src.display()),
                )
            }),
            None => fs::create_dir(path),
        },
    }
}

/// Copies a directory tree, keeping modes and symlinks.
pub fn copy_dir(src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir(dst)?;
    fs::set_permissions(dst, fs::metadata(src)?.permissions())?;
    for e in fs::read_dir(src)? {
        let e = e?;
        let ty = e.file_type()?;
        let to = dst.join(e.file_name());
        if ty.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path())?, &to)?;
        } else if ty.is_file() {
            fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

/// The data extents `(offset, len)` of a file, found with SEEK_DATA/SEEK_HOLE so that holes are
/// never read or sent. A file system without hole support reports one extent: the whole file.
pub fn data_extents(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size = size as i64;
    while pos < size {
        let start = match lseek(fd, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(Errno::ENXIO) => break, // no data after pos
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, start, Whence::SeekHole) {
            Ok(e) => e.min(size),
            Err(e) => return Err(e.into()),
        };
        out.push((start as u64, (end - start) as u64));
        pos = end;
    }
    Ok(out)
}

/// BLAKE3 of a file's logical content (holes as zeros), reading only its data extents.
pub fn file_digest(path: &Path) -> io::Result<(u64, blake3::Hash)> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    for (off, len) in data_extents(&f, size)? {
        hash_zeros(&mut h, off - pos);
        let mut done = 0;
        while done < len {
            let k = (len - done).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..k], off + done)?;
            h.update(&buf[..k]);
            done += k as u64;
        }
        pos = off + len;
    }
    hash_zeros(&mut h, size - pos);
    Ok((size, h.finalize()))
}

/// One entry of a directory volume, in the canonical (sorted, depth-first) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEntry {
    Dir { path: String, mode: u32 },
    File { path: String, mode: u32, size: u64 },
    Symlink { path: String, target: String },
}

/// Walks a directory volume in canonical order: entries sorted by name, parents before children.
pub fn walk_dir(root: &Path) -> io::Result<Vec<DirEntry>> {
    fn rec(root: &Path, rel: &str, out: &mut Vec<DirEntry>) -> io::Result<()> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut names: Vec<_> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for n in names {
            let name = n
                .to_str()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 file name"))?;
            let r = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let md = fs::symlink_metadata(root.join(&r))?;
            let mode = md.permissions().mode() & 0o7777;
            if md.file_type().is_symlink() {
                let target = fs::read_link(root.join(&r))?.display().to_string();
                out.push(DirEntry::Symlink { path: r, target });
            } else if md.is_dir() {
                out.push(DirEntry::Dir {
                    path: r.clone(),
                    mode,
                });
                rec(root, &r, out)?;
            } else if md.is_file() {
                out.push(DirEntry::File {
                    path: r,
                    mode,
                    size: md.size(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    rec(root, "", &mut out)?;
    Ok(out)
}

/// The canonical header of an entry, hashed before a file's content.
pub fn entry_header(e: &DirEntry) -> Vec<u8> {
    match e {
        DirEntry::Dir { path, mode } => format!("D {path}\0{mode:o}\n").into_bytes(),
        DirEntry::File { path, mode, size } => format!("F {path}\0{mode:o} {size}\n").into_bytes(),
        DirEntry::Symlink { path, target } => format!("L {path}\0{target}\n").into_bytes(),
    }
}

/// The digest of a directory volume: BLAKE3 over, for each entry of [`walk_dir`], its
/// [`entry_header`] followed by the file's content. Returns (sum of file sizes, digest).
pub fn dir_digest(root: &Path) -> io::Result<(u64, blake3::Hash)> {
    let mut h = blake3::Hasher::new();
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    for e in walk_dir(root)? {
        h.update(&entry_header(&e));
        if let DirEntry::File { path, size, .. } = &e {
            let mut f = File::open(root.join(path))?;
            let mut left = *size;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let k = f.read(&mut buf[..want])?;
                if k == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{path} shrank while hashing"),
                    ));
                }
                h.update(&buf[..k]);
                left -= k as u64;
            }
            total += size;
        }
    }
    Ok((total, h.finalize()))
}

/// The `app checksum` line of a volume: `VOLUME\tSIZE\tblake3:HEX`. A file volume's BLAKE3 comes
/// from the cache a delta left for it while the file is unchanged since (see
/// [`crate::blocktree`]), else from reading it.
pub fn checksum_line(name: &str, kind: VolumeKind, path: &Path) -> io::Result<String> {
    let (size, hash) = match kind {
        VolumeKind::File => match crate::blocktree::recall(path) {
            Some(cached) => cached,
            None => file_digest(path)?,
        },
        VolumeKind::Dir => dir_digest(path)?,
    };
    Ok(format!("{name}\t{size}\tblake3:{}", hash.to_hex()))
}

/// Checks that a relative path from the wire stays inside the volume: only normal components,
/// and no symlink on the way (a symlink sent earlier must not redirect a later file outside).
pub fn safe_rel(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let p = Path::new(rel);
    let refuse = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("refusing path {rel:?} outside the volume"),
        )
    };
    if rel.is_empty()
        || !p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(refuse());
    }
    let mut at = root.to_path_buf();
    let n = p.components().count();
    for c in p.components().take(n - 1) {
        at.push(c);
        if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(refuse());
        }
    }
    Ok(root.join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_skip_holes_and_digest_counts_them_as_zeros() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v");
        create(&p, VolumeKind::File, 64 << 20, None).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"hello", 10 << 20).unwrap();
        f.sync_all().unwrap();
        let ext = data_extents(&f, 64 << 20).unwrap();
        assert_eq!(ext.len(), 1, "{ext:?}");
        assert!(ext[0].0 <= 10 << 20 && ext[0].1 < 1 << 20, "{ext:?}");
        // The same logical content, written densely, has the same digest.
        let mut dense = vec![0u8; 64 << 20];
        dense[10 << 20..(10 << 20) + 5].copy_from_slice(b"hello");
        let (size, h) = file_digest(&p).unwrap();
        assert_eq!(size, 64 << 20);
        assert_eq!(h, blake3::hash(&dense));
    }

    #[test]
    fn dir_digest_changes_with_content_and_ignores_nothing() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::create_dir_all(a.join("sub")).unwrap();
        fs::write(a.join("sub/x"), "1").unwrap();
        fs::write(a.join("y"), "22").unwrap();
        let b = d.path().join("b");
        copy_dir(&a, &b).unwrap();
        let (sa, ha) = dir_digest(&a).unwrap();
        assert_eq!(sa, 3);
        assert_eq!(dir_digest(&b).unwrap(), (sa, ha));
        fs::write(b.join("y"), "23").unwrap();
        assert_ne!(dir_digest(&b).unwrap().1, ha);
    }

    #[test]
    fn wire_paths_cannot_escape() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        assert!(safe_rel(r, "a/b").is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(safe_rel(r, bad).is_err(), "{bad}");
        }
        // A symlink in the volume may exist, but nothing is written through it.
        std::os::unix::fs::symlink("/etc", r.join("l")).unwrap();
        assert!(safe_rel(r, "l").is_ok());
        assert!(safe_rel(r, "l/passwd").is_err());
    }
}
