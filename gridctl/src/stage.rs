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

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blocktree::{self, block_cv, block_len, blocks, zero_cv, Stamp, ZeroCvs};
use crate::chunk::{Chunk, Pool};
use crate::client::{self, ImportOpts};
use crate::model::{self, AppRecord};
use crate::protocol::{Reply, Request};
use crate::template::VolumeKind;
use crate::transfer::{self, bad, Progress, WireVolume, CHUNK};
use crate::volume::{self, DirEntry};

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

/// The source of a pre-copy: every file volume of a (possibly running) application, as a full
/// import sends it; dir volumes wait for the delta (a running application may change them
/// between their listing and their reading).
pub fn export_stage(
    app_dir: &Path,
    record: &AppRecord,
    compress: bool,
    fault: Option<u64>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let header = Header {
        format: FORMAT,
        mode: Mode::Stage,
        record: record.clone(),
        volumes: wire_volumes(app_dir, record, false)?,
    };
    write_header(out, &header)?;
    // The test hook `corrupt-export-after` applies here too: a pre-copy that fails on the way.
    let mut fault = transfer::Fault {
        after: fault,
        sent: 0,
    };
    for v in &record.volumes {
        if v.kind == VolumeKind::File {
            let p = model::volume_path(app_dir, &v.name);
            transfer::export_file(&p, v.size, compress, &mut fault, out)?;
        }
    }
    out.write_all(b"Z")?;
    out.flush()?;
    // While the source still runs (and the target hashes its copy), the CVs of zero blocks the
    // delta will need for the holes, so that it does not hash them while the source is stopped.
    ZeroCvs::load(app_dir, most_blocks(record), true);
    Ok(())
}

/// The block count of the largest file volume of `record`.
fn most_blocks(record: &AppRecord) -> u64 {
    record
        .volumes
        .iter()
        .filter(|v| v.kind == VolumeKind::File)
        .map(|v| blocks(v.size))
        .max()
        .unwrap_or(0)
}

/// Reads the target's block digests (see the module doc), refusing another format.
fn read_wanted(r: &mut dyn BufRead) -> io::Result<BTreeMap<String, Vec<Digest>>> {
    let mut line = Vec::new();
    (&mut *r)
        .take(transfer::MAX_HEADER)
        .read_until(b'\n', &mut line)?;
    let w: Wanted =
        serde_json::from_slice(&line).map_err(|e| bad(format!("bad block digest request: {e}")))?;
    if w.format != FORMAT {
        return Err(bad(format!(
            "the target grid asks for a delta of format {}, this grid sends format {FORMAT}: \
             run the same gridctl version on both grids",
            w.format
        )));
    }
    if w.digest != DIGEST {
        return Err(bad(format!(
            "the target grid compares blocks by {:?}, this grid by {DIGEST:?}: run the same \
             gridctl version on both grids",
            if w.digest.is_empty() {
                "blake3"
            } else {
                &w.digest
            }
        )));
    }
    let mut out = BTreeMap::new();
    let mut total = 0u64;
    for v in w.volumes {
        total = total.saturating_add(v.blocks);
        if total > MAX_BLOCKS {
            return Err(bad("the block digest request is too large"));
        }
        let mut d = vec![[0u8; 32]; v.blocks as usize];
        for x in &mut d {
            r.read_exact(x)?;
        }
        out.insert(v.name, d);
    }
    Ok(out)
}

/// The source of a final pull: reads the target's block digests from `input`, then sends each
/// file volume's changed blocks and every dir volume whole. The application is stopped.
pub fn export_delta(
    app_dir: &Path,
    record: &AppRecord,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> io::Result<()> {
    let wanted = read_wanted(input)?;
    let header = Header {
        format: FORMAT,
        mode: Mode::Delta,
        record: record.clone(),
        volumes: wire_volumes(app_dir, record, true)?,
    };
    write_header(out, &header)?;
    let mut fault = transfer::Fault {
        after: None,
        sent: 0,
    };
    let zeros = Arc::new(ZeroCvs::load(app_dir, most_blocks(record), false));
    for v in &record.volumes {
        let p = model::volume_path(app_dir, &v.name);
        match v.kind {
            VolumeKind::File => {
                let theirs = wanted
                    .get(&v.name)
                    .filter(|d| d.len() as u64 == blocks(v.size));
                send_changed(&p, v.size, theirs.map(Vec::as_slice), &zeros, out)?
            }
            VolumeKind::Dir => transfer::export_dir(&p, &mut fault, out)?,
        }
    }
    out.write_all(b"Z")?;
    out.flush()
}

/// One block the reader found changed: its data, or `None` for a hole.
type Changed = (u64, usize, Option<Chunk>);
/// The delta's hashing threads: one per core of the 2-core machines it is measured on, where
/// hashing the stopped source's data is most of the downtime.
const HASHERS: u64 = 2;
/// The blocks a hashing thread takes at a time (64 MiB): big enough that the hand-over between
/// threads is rare, small enough that neither waits long for the other's run to be sent.
const RUN: u64 = 64;

fn send_changed(
    path: &Path,
    size: u64,
    theirs: Option<&[Digest]>,
    zeros: &Arc<ZeroCvs>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let zeros = zeros.clone();
    let f = File::open(path)?;
    // Taken before the read: the whole-volume BLAKE3 this pass makes is cached for the verify's
    // `app checksum` only if the (stopped) volume did not change meanwhile.
    let stamp = Stamp::of(path)?;
    let extents = volume::data_extents(&f, size)?;
    // Through the page cache, unlike a full export: a source stopped a moment ago has its
    // volume there, hot from running, and `O_DIRECT` would read it from the disk again, in the
    // stopped time (1 GiB: 2.5 s direct against 0.4 s cached on this machine's disk).
    let theirs: Arc<Option<Vec<Digest>>> = Arc::new(theirs.map(<[Digest]>::to_vec));
    let extents = Arc::new(extents);
    let n = blocks(size);
    // Reading and hashing (the cost of a delta) on [`HASHERS`] threads, each taking every
    // HASHERS-th run of [`RUN`] blocks, so that both cores hash; sending on this one, in order.
    let mut rxs = Vec::new();
    let mut hashers = Vec::new();
    for k in 0..HASHERS {
        let (tx, rx) = sync_channel::<io::Result<Option<Changed>>>(8);
        rxs.push(rx);
        let (f, zeros, theirs, extents) = (
            f.try_clone()?,
            zeros.clone(),
            theirs.clone(),
            extents.clone(),
        );
        hashers.push(std::thread::spawn(move || -> Option<Vec<(u64, Digest)>> {
            let pool = Pool::new(BLOCK, 10);
            let mut direct: Option<File> = None;
            let mut mine = Vec::new();
            let mut at = 0;
            let mut run = k;
            while run * RUN < n {
                for i in run * RUN..((run + 1) * RUN).min(n) {
                    let off = i * BLOCK as u64;
                    let len = block_len(size, i);
                    let (d, data) = if has_data(&extents, &mut at, off, len as u64) {
                        let mut buf = pool.get(len);
                        if let Err(e) = transfer::read_chunk(&f, &mut direct, off, &mut buf) {
                            let _ = tx.send(Err(e));
                            return None;
                        }
                        (block_cv(i, &buf), Some(buf))
                    } else {
                        (zeros.get(i, len), None)
                    };
                    mine.push((i, d));
                    if (*theirs).as_ref().is_some_and(|t| t[i as usize] == d) {
                        continue;
                    }
                    if tx.send(Ok(Some((off, len, data)))).is_err() {
                        return None;
                    }
                }
                // The end of this run: the sender turns to the next hasher.
                if tx.send(Ok(None)).is_err() {
                    return None;
                }
                run += HASHERS;
            }
            Some(mine)
        }));
    }
    let stopped = || io::Error::other("a hashing thread stopped");
    for run in 0..n.div_ceil(RUN) {
        let rx = &rxs[(run % HASHERS) as usize];
        while let Some((off, len, data)) = rx.recv().map_err(|_| stopped())?? {
            match data {
                Some(mut c) => {
                    c.set_head(&transfer::d_head(off, len, len, 0));
                    out.write_all(c.frame())?;
                }
                None => {
                    let mut h = [0u8; 17];
                    h[0] = b'H';
                    h[1..9].copy_from_slice(&off.to_le_bytes());
                    h[9..17].copy_from_slice(&(len as u64).to_le_bytes());
                    out.write_all(&h)?;
                }
            }
        }
    }
    let mut mine = vec![[0u8; 32]; n as usize];
    for h in hashers {
        let part = h
            .join()
            .map_err(|_| io::Error::other("a hashing thread panicked"))?
            .ok_or_else(stopped)?;
        for (i, d) in part {
            mine[i as usize] = d;
        }
    }
    let hash = whole(path, &mine, size)?;
    blocktree::remember(path, &stamp, &hash);
    out.write_all(b"E")?;
    out.write_all(hash.as_bytes())
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

/// Receives a pre-copy into `app_dir` (created by the daemon) and hashes its blocks; returns the
/// staged copy's record.
pub fn receive_stage(
    r: &mut dyn BufRead,
    state: &Path,
    app: &str,
    new_name: &str,
    overrides: &[dialect::Prop],
    app_dir: &Path,
    progress: &mut Progress,
) -> Result<AppRecord, String> {
    let h = read_header(r, Mode::Stage).map_err(|e| e.to_string())?;
    if h.record.name != app {
        return Err(format!("the source sent {} instead", h.record.name));
    }
    let local = transfer::local_template(state, app, &h.record.template)?;
    let mut rec = transfer::imported_record(&as_full(&h), &local, new_name, overrides)?;
    rec.staged = true;
    let io = |e: io::Error| e.to_string();
    progress.total = h
        .volumes
        .iter()
        .filter(|v| v.kind == VolumeKind::File)
        .map(|v| v.data_bytes)
        .try_fold(0u64, u64::checked_add)
        .ok_or("the volumes' announced sizes add up past 2^64 bytes")?;
    progress.emit().map_err(io)?;
    fs::create_dir_all(app_dir.join("stage")).map_err(io)?;
    for v in &h.volumes {
        let p = model::volume_path(app_dir, &v.name);
        match v.kind {
            VolumeKind::Dir => volume::create(&p, v.kind, 0, None).map_err(io)?,
            VolumeKind::File => {
                if let Some((sent, got)) =
                    transfer::import_file(r, &p, v.size, progress).map_err(io)?
                {
                    return Err(format!(
                        "volume {}: BLAKE3 mismatch (source {}, received {}): the stream was corrupted",
                        v.name,
                        sent.to_hex(),
                        got.to_hex()
                    ));
                }
                let stamp = Stamp::of(&p).map_err(io)?;
                let d = block_digests(&p, v.size).map_err(io)?;
                fs::write(digest_file(app_dir, &v.name), d.concat()).map_err(io)?;
                // Without a stamp (the file moved while it was hashed) the delta hashes again.
                if stamp.holds(&p) {
                    let s = serde_json::to_vec(&stamp).map_err(|e| e.to_string())?;
                    fs::write(stamp_file(app_dir, &v.name), s).map_err(io)?;
                }
            }
        }
    }
    match transfer::read_u8(r).map_err(io)? {
        b'Z' => Ok(rec),
        t => Err(format!("unexpected frame {t:#x} at the end of the stream")),
    }
}

/// The block digests of the staged copy's file volumes, from the pre-copy: trusted only while the
/// volume has the stamp it had when they were computed (no write since), since the copy's
/// checksum for the verify is built from them; computed again when missing or stale (e.g. after
/// an interrupted delta, which wrote some blocks).
fn staged_digests(app_dir: &Path, rec: &AppRecord) -> io::Result<BTreeMap<String, Vec<Digest>>> {
    let mut out = BTreeMap::new();
    for v in rec.volumes.iter().filter(|v| v.kind == VolumeKind::File) {
        let n = blocks(v.size) as usize;
        let path = model::volume_path(app_dir, &v.name);
        let fresh = fs::read(stamp_file(app_dir, &v.name))
            .ok()
            .and_then(|b| serde_json::from_slice::<Stamp>(&b).ok())
            .is_some_and(|s| s.holds(&path));
        let stored = fs::read(digest_file(app_dir, &v.name))
            .ok()
            .filter(|_| fresh);
        let d: Vec<Digest> = match stored.filter(|b| b.len() == n * 32) {
            Some(b) => b
                .chunks_exact(32)
                .map(|c| c.try_into().expect("32 bytes"))
                .collect(),
            None => block_digests(&path, v.size)?,
        };
        out.insert(v.name.clone(), d);
    }
    Ok(out)
}

fn write_wanted(w: &mut dyn Write, d: &BTreeMap<String, Vec<Digest>>) -> io::Result<()> {
    let req = Wanted {
        format: FORMAT,
        digest: DIGEST.to_string(),
        volumes: d
            .iter()
            .map(|(name, b)| WantedVolume {
                name: name.clone(),
                blocks: b.len() as u64,
            })
            .collect(),
    };
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    w.write_all(&line)?;
    for b in d.values() {
        w.write_all(&b.concat())?;
    }
    w.flush()
}

/// Applies a delta to the staged copy in `app_dir` whose record is `staged`; returns the record
/// it becomes. Progress counts the bytes that moved.
pub fn receive_delta(
    r: &mut dyn BufRead,
    state: &Path,
    staged: &AppRecord,
    mut digests: BTreeMap<String, Vec<Digest>>,
    overrides: &[dialect::Prop],
    app_dir: &Path,
    progress: &mut Progress,
) -> Result<AppRecord, String> {
    let io = |e: io::Error| e.to_string();
    let h = read_header(r, Mode::Delta).map_err(io)?;
    let same = h.record.volumes.len() == staged.volumes.len()
        && h.record
            .volumes
            .iter()
            .zip(&staged.volumes)
            .all(|(a, b)| a.name == b.name && a.kind == b.kind && a.size == b.size);
    if !same {
        return Err(format!(
            "the source's volumes changed since the pre-copy of {}: pull it again from scratch",
            staged.name
        ));
    }
    let local = transfer::local_template(state, &h.record.name, &h.record.template)?;
    let rec = transfer::imported_record(&as_full(&h), &local, &staged.name, overrides)?;
    progress.total = h
        .volumes
        .iter()
        .map(|v| v.data_bytes)
        .try_fold(0u64, u64::checked_add)
        .ok_or("the volumes' announced sizes add up past 2^64 bytes")?;
    progress.emit().map_err(io)?;
    for v in &h.volumes {
        let p = model::volume_path(app_dir, &v.name);
        let mismatch = match v.kind {
            VolumeKind::File => {
                let mine = digests.remove(&v.name).unwrap_or_default();
                // Its blocks change from here on: a delta that stops half-way leaves digests
                // that the next one must not trust.
                let _ = fs::remove_file(stamp_file(app_dir, &v.name));
                apply_file(r, &p, v.size, mine, progress).map_err(io)?
            }
            VolumeKind::Dir => {
                if p.exists() {
                    fs::remove_dir_all(&p).map_err(io)?;
                }
                transfer::import_dir(r, &p, v.data_bytes, progress).map_err(io)?
            }
        };
        if let Some((sent, got)) = mismatch {
            return Err(format!(
                "volume {}: BLAKE3 mismatch after the delta (source {}, copy {}): the copy is \
                 not the source's volume",
                v.name,
                sent.to_hex(),
                got.to_hex()
            ));
        }
    }
    match transfer::read_u8(r).map_err(io)? {
        b'Z' => {}
        t => return Err(format!("unexpected frame {t:#x} at the end of the stream")),
    }
    // What moved is the whole of it now: the last progress line says so.
    progress.total = progress.done;
    Ok(rec)
}

fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(f.as_raw_fd(), flags, off as i64, len as i64).is_err() {
        // A file system without holes: zeros read the same.
        f.write_all_at(&vec![0u8; len as usize], off)?;
    }
    Ok(())
}

/// Applies one file volume's changed blocks to the staged file; the whole-volume digest is
/// computed from `mine` (the staged blocks' digests) and what arrived.
fn apply_file(
    r: &mut dyn Read,
    path: &Path,
    size: u64,
    mut mine: Vec<Digest>,
    progress: &mut Progress,
) -> io::Result<transfer::Mismatch> {
    if mine.len() as u64 != blocks(size) {
        return Err(bad(format!(
            "the staged volume {} has no block digests",
            path.display()
        )));
    }
    // The blocks change from here on: a checksum cached for the staged copy is stale.
    blocktree::forget(path);
    let f = OpenOptions::new().write(true).open(path)?;
    let mut next = 0u64;
    let mut buf = vec![0u8; BLOCK];
    let check = |off: u64, len: u64, next: u64| -> io::Result<u64> {
        let i = off / BLOCK as u64;
        if !off.is_multiple_of(BLOCK as u64)
            || off < next
            || i >= blocks(size)
            || len != block_len(size, i) as u64
        {
            return Err(bad(format!("bad delta frame at offset {off}")));
        }
        Ok(i)
    };
    loop {
        match transfer::read_u8(r)? {
            b'D' => {
                let off = transfer::read_u64(r)?;
                let raw = transfer::read_u32(r)? as u64;
                let enc = transfer::read_u32(r)? as u64;
                let codec = transfer::read_u8(r)?;
                let i = check(off, raw, next)?;
                if codec != 0 || enc != raw {
                    return Err(bad(format!("bad delta frame at offset {off}")));
                }
                let data = &mut buf[..raw as usize];
                r.read_exact(data)?;
                f.write_all_at(data, off)?;
                mine[i as usize] = block_cv(i, data);
                progress.add(raw)?;
                next = off + raw;
            }
            b'H' => {
                let off = transfer::read_u64(r)?;
                let len = transfer::read_u64(r)?;
                let i = check(off, len, next)?;
                punch_hole(&f, off, len)?;
                mine[i as usize] = zero_cv(i, len as usize);
                next = off + len;
            }
            b'E' => {
                let sent = transfer::read_hash(r)?;
                f.sync_all()?;
                // The copy's BLAKE3 without reading it: the staged blocks' digests (checked
                // against the stamp of the file they were computed from) and those just written.
                // Cached for the verify's `app checksum` only when it equals the source's: the
                // staged copy never starts, and its daemon lease keeps other pulls out.
                let stamp = Stamp::of(path)?;
                let got = whole(path, &mine, size)?;
                if sent == got {
                    blocktree::remember(path, &stamp, &got);
                }
                return Ok((sent != got).then_some((sent, got)));
            }
            t => return Err(bad(format!("unexpected frame {t:#x} in a delta"))),
        }
    }
}

/// The message for a source whose gridctl refused `peer export --stage/--delta`: it has no
/// staged copies.
fn old_source(remote: &str, stderr: &str) -> String {
    format!(
        "the source grid {remote} runs a gridctl without staged copies (stream format {FORMAT}): \
         it refused the pre-copy ({stderr}); run the same gridctl version on both grids, or \
         migrate with precopy = off"
    )
}

/// Runs `peer export APP FLAGS` on the remote grid; `feed` writes what the source reads first
/// (the delta's block digests); `receive` reads the stream. Returns what `receive` returned.
fn pull<T>(
    state: &Path,
    o: &ImportOpts,
    flag: &str,
    feed: Option<Vec<u8>>,
    receive: impl FnOnce(&mut dyn BufRead, &mut Progress) -> Result<T, String>,
) -> Result<T, String> {
    let mut remote_cmd = vec!["peer", "export", o.app, flag];
    if o.nocompress {
        remote_cmd.push("--nocompress");
    }
    let mut child = client::peer_ssh(state, o.remote, &shell_words::join(remote_cmd))
        .stdin(if feed.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ssh: {e}"))?;
    let err_pipe = child.stderr.take().expect("piped");
    let err_reader =
        std::thread::spawn(move || client::read_bounded(err_pipe, client::MAX_REMOTE_ERR));
    // On its own thread: a source that refuses the request stops reading, and must not stall us.
    let feeder = child.stdin.take().zip(feed).map(|(mut w, bytes)| {
        std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        })
    });
    let stdout_pipe = child.stdout.take().expect("piped");
    transfer::grow_pipe(&stdout_pipe);
    // `--max_rate` holds for the pre-copy and the delta as for a full pull: on the link's bytes.
    let stdout_pipe: Box<dyn Read + Send> = match o.max_rate {
        Some(rate) => Box::new(crate::throttle::Throttled::new(stdout_pipe, rate)),
        None => Box::new(stdout_pipe),
    };
    let mut r = BufReader::with_capacity(64 << 10, stdout_pipe);
    let stdout = io::stdout();
    let mut print = |done: u64, total: u64| -> io::Result<()> {
        let mut out = stdout.lock();
        writeln!(out, "progress {done} {total}")?;
        out.flush()
    };
    let mut progress = Progress::new(
        o.progress_on_stdout
            .then_some(&mut print as transfer::ProgressSink),
    );
    let res = receive(&mut r, &mut progress);
    // A source that sent nothing has ended (a refusal, say): its exit code tells why, so it is
    // waited for; one that stopped mid-stream is killed.
    if res.as_ref().is_err_and(|e| !e.contains("sent nothing")) {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if let Some(t) = feeder {
        let _ = t.join();
    }
    let remote_err = err_reader.join().unwrap_or_default();
    let remote_err = remote_err.trim().trim_start_matches("gridctl: ");
    let refused = status.code() == Some(client::REFUSED) && remote_err.contains("peer export");
    match res {
        _ if refused => Err(old_source(&o.remote.to_string(), remote_err)),
        Ok(v) if status.success() => {
            progress.emit().map_err(|e| e.to_string())?;
            Ok(v)
        }
        Ok(_) => Err(format!("the source grid failed: {remote_err}")),
        Err(_) if !status.success() && !remote_err.is_empty() => Err(remote_err.to_string()),
        Err(e) => Err(e),
    }
}

/// `app migrate REMOTE APP .name=NEW --import --stage`: the pre-copy into a staged copy.
pub fn import_staged(state: &Path, o: &ImportOpts) -> Result<(), String> {
    client::import_with(state, o, |app_dir| {
        pull(state, o, "--stage", None, |r, p| {
            receive_stage(r, state, o.app, o.new_name, o.props, app_dir, p)
        })
    })
}

/// `app migrate REMOTE APP .name=NEW --import --delta`: the final pull into the staged copy NEW.
pub fn import_delta(state: &Path, o: &ImportOpts) -> Result<(), String> {
    client::check_peer(state, o.remote)?;
    let mut conn = client::connect(state)?;
    let (staged, app_dir) = match conn.call(&Request::StageBegin {
        name: o.new_name.to_string(),
    }) {
        Ok(Reply::Export { record, app_dir }) => (record, app_dir),
        Ok(Reply::Done { stderr, .. }) => return Err(stderr),
        Ok(other) => return Err(format!("unexpected reply from the daemon: {other:?}")),
        Err(e) => return Err(format!("talking to the grid daemon: {e}")),
    };
    let digests = staged_digests(&app_dir, &staged).map_err(|e| e.to_string())?;
    let mut feed = Vec::new();
    write_wanted(&mut feed, &digests).map_err(|e| e.to_string())?;
    let rec = pull(state, o, "--delta", Some(feed), |r, p| {
        receive_delta(r, state, &staged, digests, o.props, &app_dir, p)
    })?;
    // Stale from here on: a later delta must not trust them.
    let _ = fs::remove_dir_all(app_dir.join("stage"));
    client::done(conn.call(&Request::StageCommit { record: rec }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{State, Volume};

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

    const T: &str = "[[volumes]]\nname = \"data\"\nsize = \"1M\"\n[[volumes]]\nname = \"conf\"\nkind = \"dir\"\n";

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
            e.to_string().contains(
                "the target grid compares blocks by \"blake3\", this grid by \"blake3-cv\""
            ),
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
}
