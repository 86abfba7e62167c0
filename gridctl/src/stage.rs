//! Staged copies and deltas: the pre-copy of a running application, and the final pull that moves
//! only what changed since, so that a migration's downtime depends on what changed, not on how
//! much there is.
//!
//! * `app migrate REMOTE APP .name=NEW --import --stage` (APP may run) pulls APP's file volumes
//!   into NEW, a **staged copy**: listed `stopped`, `app info` says `staged true`, it keeps the
//!   `mig_op` mark it was given, and it never starts. Its dir volumes stay empty. Then the target
//!   hashes each [`BLOCK`] of its file volumes into `NEW/stage/VOLUME`.
//! * `… --import --delta` (APP stopped) sends those block digests to the source, which reads and
//!   hashes its volumes once more and sends only the blocks that differ (a hole where the copy
//!   has data), then every dir volume whole. NEW becomes a stopped application, its record
//!   built as for a full import. A failed delta leaves NEW staged; a later delta repairs it.
//!
//! The source's side is in `stage/export.rs`, the target's (and the pulls) in `stage/import.rs`.
//!
//! Both streams are format [`FORMAT`]; a gridctl without staging refuses the flags (the target
//! names that), and a stream of another format is refused by name.
//!
//! ```text
//! target → source, delta only, on ssh's stdin:
//!   {"format":3,"digest":"blake3-cv","volumes":[{"name":N,"blocks":B}]}\n
//!   then B × 32 bytes per volume: each block's BLAKE3 chaining value (see blocktree)
//! source → target: one JSON Header line, then per volume of the record:
//!   stage, file volume   transfer's D frames and E (its extent digest)
//!   stage, dir volume    nothing (the delta carries it)
//!   delta, file volume   D frames (one whole block each, raw), H offset:u64 len:u64 (a hole),
//!                        E the volume's BLAKE3 (from every block's chaining value)
//!   delta, dir volume    transfer's K/F/L frames and E
//!   Z
//! ```
//! The delta's `E` covers the whole volume, not only what moved: it is the volume's plain BLAKE3,
//! which the target computes from its own block digests and the blocks it received (BLAKE3's
//! tree, see [`crate::blocktree`]), and a hole's digest is that of zeros, so a hole and zeros
//! agree as `app checksum` sees them. Both sides cache that BLAKE3 for `app checksum` (see
//! [`crate::blocktree`]): the verify after a delta then reads neither volume again.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::blocktree::{self, block_cv, block_len, blocks, zero_cv};
use crate::chunk::Pool;
use crate::model::{self, AppRecord};
use crate::template::VolumeKind;
use crate::transfer::{self, bad, WireVolume, CHUNK};
use crate::volume::{self, DirEntry};

mod export;
mod import;
#[cfg(test)]
mod tests;

pub use export::{export_delta, export_stage};
pub use import::{import_delta, import_staged, receive_delta, receive_stage};
#[cfg(test)]
use {
    export::{read_wanted, RUN},
    import::{old_source, punch_hole, staged_digests, write_wanted},
};

/// The version of the staged and delta streams (the full import's is [`transfer::FORMAT`]).
pub const FORMAT: u32 = 3;
/// The unit the delta compares: a changed byte moves its whole block. A whole subtree of
/// BLAKE3's tree, so that the blocks' digests make the volume's BLAKE3.
pub const BLOCK: usize = blocktree::BLOCK;
const _: () = assert!(BLOCK == CHUNK);
/// What the block digests are; a target that asks with other digests is refused by name.
const DIGEST: &str = "blake3-cv";
/// The most block digests a request may carry (64 TiB of volumes in 1 MiB blocks).
const MAX_BLOCKS: u64 = 64 << 20;
/// A test hook: `peer export` refuses `--stage` and `--delta` as a gridctl without staging does.
pub const NO_STAGING_HOOK: &str = "no-staging";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Stage,
    Delta,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub mode: Mode,
    pub record: AppRecord,
    pub volumes: Vec<WireVolume>,
}

/// What the target asks a delta for: the digest of each block of its staged file volumes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Wanted {
    format: u32,
    /// [`DIGEST`]; empty from a gridctl whose digests were each block's own BLAKE3.
    #[serde(default)]
    digest: String,
    volumes: Vec<WantedVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WantedVolume {
    name: String,
    blocks: u64,
}

/// A block's BLAKE3 chaining value at its offset (see [`crate::blocktree`]).
type Digest = blake3::hazmat::ChainingValue;

/// Whether block `[off, off+len)` holds data, walking `extents` (sorted) with the cursor `at`.
fn has_data(extents: &[(u64, u64)], at: &mut usize, off: u64, len: u64) -> bool {
    while *at < extents.len() && extents[*at].0 + extents[*at].1 <= off {
        *at += 1;
    }
    *at < extents.len() && extents[*at].0 < off + len
}

/// The whole-volume digest of the delta: the plain BLAKE3 of the file at `path`, from its blocks'
/// digests (a file of one block or less is hashed whole: it is at most a block).
fn whole(path: &Path, digests: &[Digest], size: u64) -> io::Result<blake3::Hash> {
    match blocktree::root(digests, size) {
        Some(h) => Ok(h),
        None => Ok(volume::file_digest(path)?.1),
    }
}

/// The digest of each block of the file at `path` (holes hashed as zeros, never read).
pub fn block_digests(path: &Path, size: u64) -> io::Result<Vec<Digest>> {
    let f = File::open(path)?;
    let extents = volume::data_extents(&f, size)?;
    let mut direct = transfer::open_direct(path, false);
    let pool = Pool::new(BLOCK, 2);
    let mut at = 0;
    let mut out = Vec::with_capacity(blocks(size) as usize);
    for i in 0..blocks(size) {
        let off = i * BLOCK as u64;
        let len = block_len(size, i);
        if has_data(&extents, &mut at, off, len as u64) {
            let mut buf = pool.get(len);
            transfer::read_chunk(&f, &mut direct, off, &mut buf)?;
            out.push(block_cv(i, &buf));
        } else {
            out.push(zero_cv(i, len));
        }
    }
    Ok(out)
}

fn digest_file(app_dir: &Path, vol: &str) -> PathBuf {
    app_dir.join("stage").join(vol)
}

/// The stamp of the staged volume its digests were computed for (see [`staged_digests`]).
fn stamp_file(app_dir: &Path, vol: &str) -> PathBuf {
    app_dir.join("stage").join(format!("{vol}.stamp"))
}

fn write_header(out: &mut dyn Write, h: &Header) -> io::Result<()> {
    let mut line = serde_json::to_vec(h)?;
    line.push(b'\n');
    out.write_all(&line)
}

fn wire_volumes(app_dir: &Path, rec: &AppRecord, dirs: bool) -> io::Result<Vec<WireVolume>> {
    let mut v = Vec::new();
    for vol in &rec.volumes {
        let p = model::volume_path(app_dir, &vol.name);
        let data_bytes = match vol.kind {
            VolumeKind::File => volume::data_extents(&File::open(&p)?, vol.size)?
                .iter()
                .map(|e| e.1)
                .sum(),
            VolumeKind::Dir if dirs => volume::walk_dir(&p)?
                .iter()
                .map(|e| match e {
                    DirEntry::File { size, .. } => *size,
                    _ => 0,
                })
                .sum(),
            VolumeKind::Dir => 0,
        };
        v.push(WireVolume {
            name: vol.name.clone(),
            kind: vol.kind,
            size: vol.size,
            data_bytes,
        });
    }
    Ok(v)
}

/// Reads the header of a staged or delta stream, refusing another format or mode by name.
pub fn read_header(r: &mut dyn BufRead, want: Mode) -> io::Result<Header> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(transfer::MAX_HEADER + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the source grid sent nothing",
        ));
    }
    if n as u64 > transfer::MAX_HEADER {
        return Err(bad("the stream header is longer than 4 MiB: refused"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&line).map_err(|e| bad(format!("bad stream header: {e}")))?;
    let format = v.get("format").and_then(|f| f.as_u64()).unwrap_or(1);
    if format != FORMAT as u64 {
        return Err(bad(format!(
            "the source grid sends stream format {format}, and a staged copy needs format \
             {FORMAT}: run the same gridctl version on both grids, or migrate without pre-copy"
        )));
    }
    let h: Header =
        serde_json::from_value(v).map_err(|e| bad(format!("bad stream header: {e}")))?;
    if h.mode != want {
        return Err(bad(format!(
            "the source grid sent a {:?} stream where a {want:?} was asked for",
            h.mode
        )));
    }
    Ok(h)
}

/// The full import's header for the same record and volumes, to build the record with.
fn as_full(h: &Header) -> transfer::Header {
    transfer::Header {
        record: h.record.clone(),
        volumes: h.volumes.clone(),
        with_data: true,
        format: transfer::FORMAT,
    }
}
