//! Reading and writing volumes past the page cache (`O_DIRECT`) where the chunk allows.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::chunk::{Chunk, ALIGN};

/// Reads a chunk with the `O_DIRECT` handle where it is aligned, else through the cache (and
/// from then on if the handle refuses it).
pub(crate) fn read_chunk(
    f: &File,
    direct: &mut Option<File>,
    off: u64,
    buf: &mut Chunk,
) -> io::Result<()> {
    if let Some(d) = direct.as_ref().filter(|_| direct_ok(off, buf)) {
        match d.read_exact_at(buf, off) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tracing::debug!("O_DIRECT refused a chunk, reading through the cache");
                *direct = None;
            }
            Err(e) => return Err(e),
        }
    }
    f.read_exact_at(buf, off)
}

/// A second handle on a volume that bypasses the page cache (`O_DIRECT`), for writing or for
/// reading, or `None` where the filesystem has no such thing (tmpfs). Copying each byte into
/// the page cache and writing it back later costs about a CPU-second per GiB here, on a path
/// where CPU is the limit; the direct write has the disk read the chunk from our buffer instead.
pub(crate) fn open_direct(path: &Path, write: bool) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .inspect_err(|e| tracing::debug!("no O_DIRECT on {}: {e}", path.display()))
        .ok()
}

/// Whether `O_DIRECT` can write this chunk: buffer, offset and length all block-aligned.
pub(super) fn direct_ok(off: u64, data: &Chunk) -> bool {
    off.is_multiple_of(ALIGN as u64) && data.len().is_multiple_of(ALIGN) && data.is_aligned()
}
