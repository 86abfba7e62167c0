//! The `app migrate --import` data path: the wire format between `peer export` (on the source
//! grid, writing to its SSH channel) and the importer (on the target grid, reading from `ssh`).
//!
//! Stream: one JSON [`Header`] line, then per volume a sequence of frames and an `E` frame with
//! the sender's BLAKE3 of the volume, then `Z`. File volumes send only their data extents
//! (SEEK_DATA/SEEK_HOLE), so holes stay holes; each chunk is zstd level 1 unless the import asked
//! for `--nocompress` or the data does not compress. Both ends hash what moves: for a file
//! volume, each chunk's offset, length and data, then the volume's size (holes are not hashed:
//! the receiver's new sparse file reads them as zeros by construction, and hashing gigabytes of
//! zeros on both ends made a sparse volume cost twice its data); any difference fails the import.
//! The header's `format` names that digest, so gridctl versions that differ fail clearly.
//!
//! ```text
//! D offset:u64 raw_len:u32 enc_len:u32 codec:u8 payload   file data (codec 0 raw, 1 zstd)
//! K plen:u32 path mode:u32                                 dir volume: a directory
//! F plen:u32 path mode:u32 size:u64 content                dir volume: a regular file
//! L plen:u32 path tlen:u32 target                          dir volume: a symlink
//! E blake3:[u8;32]                                         end of a volume
//! Z                                                        end of the stream
//! ```
//! Integers are little-endian.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::chunk::{Chunk, Pool, ALIGN};
use crate::model::{self, AppRecord, State};
use crate::template::{Template, VolumeKind};
use crate::volume::{self, DirEntry};

pub(crate) const CHUNK: usize = 1 << 20;
/// The longest header line read; the source's record (properties of at most 64 KiB each) fits.
pub const MAX_HEADER: u64 = 4 << 20;
/// Mode bits a received file or directory may keep: setuid and setgid are stripped, so that a
/// volume from another grid cannot bring a program that runs with its owner's rights here.
const KEEP_MODE: u32 = 0o1777;
const MAX_CHUNK: usize = 8 << 20;
/// Bytes of a `D` frame before its payload.
pub(crate) const D_HEAD: usize = 18;
/// Idle chunk buffers kept per transfer: enough for the channels between threads.
pub(crate) const POOL_KEEP: usize = 40;

/// The header of a `D` frame.
pub(crate) fn d_head(off: u64, raw: usize, enc: usize, codec: u8) -> [u8; D_HEAD] {
    let mut h = [0u8; D_HEAD];
    h[0] = b'D';
    h[1..9].copy_from_slice(&off.to_le_bytes());
    h[9..13].copy_from_slice(&(raw as u32).to_le_bytes());
    h[13..17].copy_from_slice(&(enc as u32).to_le_bytes());
    h[17] = codec;
    h
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireVolume {
    pub name: String,
    pub kind: VolumeKind,
    pub size: u64,
    /// Bytes that will move: data extents of a file, file contents of a dir.
    pub data_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub record: AppRecord,
    pub volumes: Vec<WireVolume>,
    /// False with `--novols`: volumes are announced but no data follows.
    pub with_data: bool,
    /// The stream's version ([`FORMAT`]); absent (1) from gridctl before the extent digest.
    #[serde(default = "format_1")]
    pub format: u32,
}

/// Version 2: file volumes' digests cover the data extents only (see the module doc).
pub const FORMAT: u32 = 2;

fn format_1() -> u32 {
    1
}

pub(crate) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Flips one bit after `after` payload bytes: the test hook `STATE/faults/corrupt-export-after`.
pub(crate) struct Fault {
    pub(crate) after: Option<u64>,
    pub(crate) sent: u64,
}

impl Fault {
    /// Accounts for `data` being sent; returns a corrupted copy when the fault hits it.
    fn apply(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let a = self.after?;
        let start = self.sent;
        self.sent += data.len() as u64;
        if a >= self.sent || data.is_empty() {
            return None;
        }
        self.after = None;
        let mut v = data.to_vec();
        let i = (a.saturating_sub(start) as usize).min(v.len() - 1);
        v[i] ^= 0x01;
        Some(v)
    }
}

/// BLAKE3 of what moves of a file volume: each chunk's offset, length and data, then the
/// volume's size. Fed by the thread that just read the chunk, while its bytes are still in the
/// CPU's cache: a hashing thread of its own cost a hand-off per chunk and re-read cold memory.
struct ExtentHash(blake3::Hasher);

impl ExtentHash {
    fn new() -> ExtentHash {
        ExtentHash(blake3::Hasher::new())
    }

    fn add(&mut self, off: u64, data: &[u8]) {
        self.0.update(&off.to_le_bytes());
        self.0.update(&(data.len() as u64).to_le_bytes());
        self.0.update(data);
    }

    fn finish(mut self, size: u64) -> blake3::Hash {
        self.0.update(&size.to_le_bytes());
        self.0.finalize()
    }
}

/// Pipe capacity asked for on both ends of the SSH link: a 1 MiB chunk fits whole, so writer
/// and reader wake once per chunk instead of once per 64 KiB (Linux's default).
pub const PIPE_SIZE: i32 = 1 << 20;

/// Grows the pipe behind `fd` to [`PIPE_SIZE`], if it is a pipe and the system allows; a
/// failure only costs speed, so it is logged, not returned.
pub fn grow_pipe(fd: &impl std::os::fd::AsRawFd) {
    use nix::fcntl::{fcntl, FcntlArg};
    if let Err(e) = fcntl(fd.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        tracing::debug!("could not grow a pipe to {PIPE_SIZE} bytes: {e}");
    }
}

/// Test hook `STATE/faults/hold-export`: an export waits before it sends anything while that file
/// exists, so that a test can find the source's side of a copy and act on it in flight, however
/// fast copies have become.
pub fn hold_while_asked(state: &Path) {
    let p = state.join("faults").join("hold-export");
    if p.exists() {
        tracing::warn!(
            "test hook: holding this export while {} exists",
            p.display()
        );
    }
    while p.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads and consumes the fault hook, if a test planted it.
pub fn take_fault(state: &Path) -> Option<u64> {
    let p = state.join("faults").join("corrupt-export-after");
    let n = fs::read_to_string(&p).ok()?.trim().parse().ok()?;
    let _ = fs::remove_file(&p);
    tracing::warn!("test hook: corrupting this export after {n} bytes");
    Some(n)
}

/// Writes the export stream of a stopped application to `out`.
pub fn export(
    app_dir: &Path,
    record: &AppRecord,
    novols: bool,
    compress: bool,
    fault: Option<u64>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut volumes = Vec::new();
    for v in &record.volumes {
        let p = model::volume_path(app_dir, &v.name);
        let data_bytes = match v.kind {
            VolumeKind::File => {
                let f = File::open(&p)?;
                volume::data_extents(&f, v.size)?.iter().map(|e| e.1).sum()
            }
            VolumeKind::Dir => volume::walk_dir(&p)?
                .iter()
                .map(|e| match e {
                    DirEntry::File { size, .. } => *size,
                    _ => 0,
                })
                .sum(),
        };
        volumes.push(WireVolume {
            name: v.name.clone(),
            kind: v.kind,
            size: v.size,
            data_bytes,
        });
    }
    let header = Header {
        record: record.clone(),
        volumes,
        with_data: !novols,
        format: FORMAT,
    };
    let mut line = serde_json::to_vec(&header)?;
    line.push(b'\n');
    out.write_all(&line)?;
    let mut fault = Fault {
        after: fault,
        sent: 0,
    };
    if !novols {
        for v in &record.volumes {
            let p = model::volume_path(app_dir, &v.name);
            match v.kind {
                VolumeKind::File => export_file(&p, v.size, compress, &mut fault, out)?,
                VolumeKind::Dir => export_dir(&p, &mut fault, out)?,
            }
        }
    }
    out.write_all(b"Z")?;
    out.flush()
}

pub(crate) fn export_file(
    path: &Path,
    size: u64,
    compress: bool,
    fault: &mut Fault,
    out: &mut dyn Write,
) -> io::Result<()> {
    let f = File::open(path)?;
    let extents = volume::data_extents(&f, size)?;
    // Aligned chunks are read past the page cache: the disk puts them in our buffer, where a
    // cached read would copy them (and fill the cache with a volume read once).
    let mut direct = open_direct(path, false);
    // Reading and hashing run on their own thread, compressing and sending on this one.
    let pool = Pool::new(CHUNK, POOL_KEEP);
    let (tx, rx) = sync_channel::<io::Result<(u64, Chunk)>>(8);
    let reader = std::thread::spawn(move || {
        let mut hash = ExtentHash::new();
        for (off, len) in extents {
            let mut done = 0;
            while done < len {
                let k = (len - done).min(CHUNK as u64) as usize;
                let mut buf = pool.get(k);
                if let Err(e) = read_chunk(&f, &mut direct, off + done, &mut buf) {
                    let _ = tx.send(Err(e));
                    return None;
                }
                hash.add(off + done, &buf);
                buf.set_head(&d_head(off + done, k, k, 0));
                if tx.send(Ok((off + done, buf))).is_err() {
                    return None;
                }
                done += k as u64;
            }
        }
        Some(hash.finish(size))
    });
    let mut squeeze = Squeeze::default();
    let mut adapt = Adapt::new(compress);
    for item in rx.iter() {
        let (off, data) = item?;
        let t = Instant::now();
        let try_zstd = adapt.compress_next();
        // Data that does not compress is sent as it is.
        let zlen = if try_zstd {
            squeeze.squeeze(&data)?
        } else {
            None
        };
        if let Some(bad) = fault.apply(&data) {
            // The test hook's path: header and corrupted payload, raw.
            out.write_all(&d_head(off, data.len(), data.len(), 0))?;
            out.write_all(&bad)?;
        } else if let Some(n) = zlen {
            out.write_all(squeeze.frame(off, data.len(), n))?;
        } else {
            out.write_all(data.frame())?;
        }
        // Flushed per chunk so that the time measured includes the link's back-pressure.
        out.flush()?;
        adapt.record(try_zstd, data.len(), zlen.is_some(), t.elapsed());
    }
    let hash = reader
        .join()
        .map_err(|_| io::Error::other("reader thread panicked"))?
        .ok_or_else(|| io::Error::other("the reader thread stopped"))?;
    out.write_all(b"E")?;
    out.write_all(hash.as_bytes())
}

/// The sender's zstd: compresses a chunk when asked and says whether that made it at least a
/// tenth smaller. While chunks do not shrink (random or already compressed data), a try first
/// compresses only a [`Squeeze::SAMPLE`] of the chunk, and a sample that does not shrink sends
/// the chunk raw without compressing the rest: a probe of incompressible data costs 64 KiB of
/// zstd instead of a whole chunk. The compressor and its buffer exist only once a chunk is tried.
#[derive(Default)]
struct Squeeze {
    comp: Option<zstd::bulk::Compressor<'static>>,
    /// Compressed frames are built here, header first, and reused chunk after chunk.
    zbuf: Vec<u8>,
    /// Whether the last chunk compressed whole shrank; only then is the next one tried whole
    /// at once. Starts out false: the first try is sampled too.
    shrinking: bool,
    /// Bytes handed to zstd so far.
    fed: u64,
}

impl Squeeze {
    const SAMPLE: usize = 64 << 10;

    /// `Some(len)` when `data` compressed to `len` bytes, a tenth or more below its size; the
    /// frame is then [`Squeeze::frame`]. `None`: send `data` raw.
    fn squeeze(&mut self, data: &[u8]) -> io::Result<Option<usize>> {
        let worth = |n: usize, len: usize| n < len - len / 10;
        let need = D_HEAD + zstd::zstd_safe::compress_bound(data.len());
        if self.zbuf.len() < need {
            // Fresh zeroed memory, not a resize: the kernel maps it zeroed, so only the pages
            // zstd writes are ever touched (a sample's output, for incompressible data).
            self.zbuf = vec![0u8; need];
        }
        let comp = match &mut self.comp {
            Some(c) => c,
            None => self.comp.insert(zstd::bulk::Compressor::new(1)?),
        };
        if !self.shrinking && data.len() >= 2 * Self::SAMPLE {
            let sample = &data[..Self::SAMPLE];
            self.fed += sample.len() as u64;
            let n = comp.compress_to_buffer(sample, &mut self.zbuf[D_HEAD..])?;
            if !worth(n, sample.len()) {
                return Ok(None);
            }
        }
        self.fed += data.len() as u64;
        let n = comp.compress_to_buffer(data, &mut self.zbuf[D_HEAD..])?;
        self.shrinking = worth(n, data.len());
        Ok(self.shrinking.then_some(n))
    }

    /// The `D` frame of the chunk at `off` (`raw` bytes) that [`Squeeze::squeeze`] just
    /// compressed to `n` bytes: header and payload, contiguous, for one write.
    fn frame(&mut self, off: u64, raw: usize, n: usize) -> &[u8] {
        self.zbuf[..D_HEAD].copy_from_slice(&d_head(off, raw, n, 1));
        &self.zbuf[..D_HEAD + n]
    }
}

/// Chooses, chunk by chunk, whether compressing pays: in every cycle of chunks it sends
/// [`Adapt::PROBE`] raw and as many compressed, measures the raw bytes each moved per second
/// (compression time and the link's back-pressure included), and uses the faster for the rest
/// of the cycle. So a link faster than the compressor gets raw data, a slow link gets zstd.
/// Data the probes could not shrink gets no zstd whatever the timings said, and each such cycle
/// is twice as long as the last (up to [`Adapt::MAX_CYCLE`]), so random data pays for few probes;
/// a probe that shrinks data brings the cycle back to [`Adapt::CYCLE`].
struct Adapt {
    enabled: bool,
    i: u32,
    raw: (u64, Duration),
    zst: (u64, Duration),
    /// Whether a compressed probe of this cycle came out smaller than the data.
    shrank: bool,
    use_zstd: bool,
    cycle: u32,
}

impl Adapt {
    const CYCLE: u32 = 64;
    const MAX_CYCLE: u32 = 512;
    const PROBE: u32 = 4;

    fn new(enabled: bool) -> Adapt {
        Adapt {
            enabled,
            i: 0,
            raw: (0, Duration::ZERO),
            zst: (0, Duration::ZERO),
            shrank: false,
            use_zstd: true,
            cycle: Self::CYCLE,
        }
    }

    fn compress_next(&self) -> bool {
        if !self.enabled {
            return false;
        }
        match self.i {
            i if i < Self::PROBE => false,
            i if i < 2 * Self::PROBE => true,
            _ => self.use_zstd,
        }
    }

    /// Accounts for a chunk of `bytes` sent in `t`, compressed if `zstd`, and whether
    /// compression made it smaller (`shrank`, false when not compressed).
    fn record(&mut self, zstd: bool, bytes: usize, shrank: bool, t: Duration) {
        if !self.enabled {
            return;
        }
        if self.i < 2 * Self::PROBE {
            let m = if zstd { &mut self.zst } else { &mut self.raw };
            m.0 += bytes as u64;
            m.1 += t;
            self.shrank |= shrank;
        }
        self.i += 1;
        if self.i == 2 * Self::PROBE {
            let rate = |(b, t): (u64, Duration)| b as f64 / t.as_secs_f64().max(1e-9);
            self.use_zstd = self.shrank && rate(self.zst) > rate(self.raw);
            self.cycle = if self.shrank {
                Self::CYCLE
            } else {
                (self.cycle * 2).min(Self::MAX_CYCLE)
            };
            tracing::debug!(
                use_zstd = self.use_zstd,
                cycle = self.cycle,
                "compression probe"
            );
        }
        if self.i == self.cycle {
            *self = Adapt {
                cycle: self.cycle,
                ..Adapt::new(true)
            };
        }
    }
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
}

pub(crate) fn export_dir(root: &Path, fault: &mut Fault, out: &mut dyn Write) -> io::Result<()> {
    let mut h = blake3::Hasher::new();
    for e in volume::walk_dir(root)? {
        h.update(&volume::entry_header(&e));
        let mut frame = Vec::new();
        match &e {
            DirEntry::Dir { path, mode } => {
                frame.push(b'K');
                put_str(&mut frame, path);
                frame.extend_from_slice(&mode.to_le_bytes());
                out.write_all(&frame)?;
            }
            DirEntry::Symlink { path, target } => {
                frame.push(b'L');
                put_str(&mut frame, path);
                put_str(&mut frame, target);
                out.write_all(&frame)?;
            }
            DirEntry::File { path, mode, size } => {
                frame.push(b'F');
                put_str(&mut frame, path);
                frame.extend_from_slice(&mode.to_le_bytes());
                frame.extend_from_slice(&size.to_le_bytes());
                out.write_all(&frame)?;
                let mut f = File::open(root.join(path))?;
                let mut left = *size;
                let mut buf = vec![0u8; 1 << 16];
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    f.read_exact(&mut buf[..k])?;
                    h.update(&buf[..k]);
                    let corrupted = fault.apply(&buf[..k]);
                    out.write_all(corrupted.as_deref().unwrap_or(&buf[..k]))?;
                    left -= k as u64;
                }
            }
        }
    }
    out.write_all(b"E")?;
    out.write_all(h.finalize().as_bytes())
}

/// Where progress goes; an error means whoever asked for it is gone.
pub type ProgressSink<'a> = &'a mut dyn FnMut(u64, u64) -> io::Result<()>;

/// Progress of an import, reported at most every 250 ms. When the sink fails (the SSH client
/// that asked for `--progress_on_stdout` went away), the import fails too: nobody would learn
/// of a copy that completed after its requester gave up.
pub struct Progress<'a> {
    pub done: u64,
    pub total: u64,
    last: Option<Instant>,
    /// The least time between two reports.
    every: Duration,
    sink: Option<ProgressSink<'a>>,
}

impl<'a> Progress<'a> {
    pub fn new(sink: Option<ProgressSink<'a>>) -> Self {
        Progress {
            done: 0,
            total: 0,
            last: None,
            every: Duration::from_millis(250),
            sink,
        }
    }

    pub(crate) fn add(&mut self, n: u64) -> io::Result<()> {
        self.done += n;
        if self.last.is_none_or(|t| t.elapsed() >= self.every) {
            self.emit()?;
        }
        Ok(())
    }

    pub fn emit(&mut self) -> io::Result<()> {
        self.last = Some(Instant::now());
        match self.sink.as_mut() {
            Some(s) => s(self.done, self.total).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("the client went away (writing progress: {e})"),
                )
            }),
            None => Ok(()),
        }
    }
}

pub(crate) fn read_u8(r: &mut dyn Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}
pub(crate) fn read_u32(r: &mut dyn Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}
pub(crate) fn read_u64(r: &mut dyn Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
fn read_str(r: &mut dyn Read) -> io::Result<String> {
    let n = read_u32(r)? as usize;
    if n > 4096 {
        return Err(bad("path longer than 4096 bytes in the stream"));
    }
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| bad("non-UTF-8 path in the stream"))
}
pub(crate) fn read_hash(r: &mut dyn Read) -> io::Result<blake3::Hash> {
    let mut b = [0u8; 32];
    r.read_exact(&mut b)?;
    Ok(blake3::Hash::from_bytes(b))
}

/// Reads the stream's header, at most [`MAX_HEADER`] bytes of it.
pub fn read_header(r: &mut dyn BufRead) -> io::Result<Header> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_HEADER + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the source grid sent nothing",
        ));
    }
    if n as u64 > MAX_HEADER {
        return Err(bad(format!(
            "the stream header is longer than {} MiB: refused",
            MAX_HEADER >> 20
        )));
    }
    let h: Header =
        serde_json::from_slice(&line).map_err(|e| bad(format!("bad stream header: {e}")))?;
    if h.format != FORMAT {
        return Err(bad(format!(
            "the source grid sends stream format {}, this grid reads format {FORMAT}: \
             run the same gridctl version on both grids",
            h.format
        )));
    }
    Ok(h)
}

/// Reads every volume of the stream into `app_dir/vols/`, verifying each digest.
pub fn import_volumes(
    r: &mut dyn Read,
    header: &Header,
    app_dir: &Path,
    progress: &mut Progress,
) -> io::Result<()> {
    progress.total = if header.with_data {
        header
            .volumes
            .iter()
            .try_fold(0u64, |a, v| a.checked_add(v.data_bytes))
            .ok_or_else(|| bad("the volumes' announced sizes add up past 2^64 bytes"))?
    } else {
        0
    };
    progress.emit()?;
    for v in &header.volumes {
        dialect::AppName::new(&v.name).map_err(|e| bad(e.to_string()))?;
        let p = model::volume_path(app_dir, &v.name);
        if !header.with_data {
            volume::create(&p, v.kind, v.size, None)?;
            continue;
        }
        let ok = match v.kind {
            VolumeKind::File => import_file(r, &p, v.size, progress)?,
            VolumeKind::Dir => import_dir(r, &p, v.data_bytes, progress)?,
        };
        if let Some((sent, got)) = ok {
            return Err(bad(format!(
                "volume {}: BLAKE3 mismatch (source {}, received {}): the stream was corrupted",
                v.name,
                sent.to_hex(),
                got.to_hex()
            )));
        }
    }
    match read_u8(r)? {
        b'Z' => Ok(()),
        t => Err(bad(format!(
            "unexpected frame {t:#x} at the end of the stream"
        ))),
    }
}

pub(crate) type Mismatch = Option<(blake3::Hash, blake3::Hash)>;

pub(crate) fn import_file(
    r: &mut dyn Read,
    path: &Path,
    size: u64,
    progress: &mut Progress,
) -> io::Result<Mismatch> {
    let f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.set_len(size)?;
    let direct = open_direct(path, true);
    // Writing runs on its own thread; reading, decompressing and hashing on this one.
    let (tx, rx) = sync_channel::<(u64, Chunk)>(8);
    let writer = std::thread::spawn(move || write_extents(f, direct, rx));
    let mut hash = ExtentHash::new();
    let mut dec = zstd::bulk::Decompressor::new()?;
    let pool = Pool::new(CHUNK, POOL_KEEP);
    // Compressed payloads land here; raw ones go straight into their chunk.
    let mut zbuf = Vec::new();
    let mut pos = 0u64;
    let res = (|| -> io::Result<(blake3::Hash, blake3::Hash)> {
        loop {
            match read_u8(r)? {
                b'D' => {
                    let off = read_u64(r)?;
                    let raw = read_u32(r)? as usize;
                    let enc = read_u32(r)? as usize;
                    let codec = read_u8(r)?;
                    if raw > MAX_CHUNK
                        || enc > MAX_CHUNK + 1024
                        || off < pos
                        || off.checked_add(raw as u64).is_none_or(|end| end > size)
                    {
                        return Err(bad(format!("bad data frame at offset {off}")));
                    }
                    let mut data = if raw <= CHUNK {
                        pool.get(raw)
                    } else {
                        // A sender with bigger chunks than ours: correct, just not pooled.
                        Pool::new(raw, 0).get(raw)
                    };
                    match codec {
                        0 if enc == raw => r.read_exact(&mut data)?,
                        1 => {
                            if zbuf.len() < enc {
                                zbuf.resize(enc, 0);
                            }
                            r.read_exact(&mut zbuf[..enc])?;
                            let n = dec.decompress_to_buffer(&zbuf[..enc], &mut data[..])?;
                            if n != raw {
                                return Err(bad("decompressed chunk has the wrong size"));
                            }
                        }
                        _ => return Err(bad(format!("bad codec {codec}"))),
                    }
                    pos = off + raw as u64;
                    progress.add(raw as u64)?;
                    hash.add(off, &data);
                    if tx.send((off, data)).is_err() {
                        return Err(io::Error::other("the volume writer stopped"));
                    }
                }
                b'E' => return Ok((read_hash(r)?, hash.finish(size))),
                t => return Err(bad(format!("unexpected frame {t:#x} in a file volume"))),
            }
        }
    })();
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| io::Error::other("writer thread panicked"))?;
    let (sent, got) = res?;
    written?;
    Ok((sent != got).then_some((sent, got)))
}

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
fn direct_ok(off: u64, data: &Chunk) -> bool {
    off.is_multiple_of(ALIGN as u64) && data.len().is_multiple_of(ALIGN) && data.is_aligned()
}

fn write_extents(f: File, mut direct: Option<File>, rx: Receiver<(u64, Chunk)>) -> io::Result<()> {
    // The kernel would keep gigabytes dirty and flush them all at the final fsync; a flusher
    // thread syncs as buffered data arrives, so the disk works while the network does.
    let (tick, ticks) = sync_channel::<()>(1);
    let f2 = f.try_clone()?;
    let flusher = std::thread::spawn(move || -> io::Result<()> {
        for () in ticks {
            f2.sync_data()?;
        }
        Ok(())
    });
    let mut unsynced = 0usize;
    let res = (|| -> io::Result<()> {
        for (off, data) in rx {
            if let Some(d) = direct.as_ref().filter(|_| direct_ok(off, &data)) {
                match d.write_all_at(&data, off) {
                    Ok(()) => continue,
                    // Stricter alignment than ours (or no direct I/O after all): buffered
                    // from here on; a partial direct write is simply written again.
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        tracing::debug!("O_DIRECT refused a chunk, writing through the cache");
                        direct = None;
                    }
                    Err(e) => return Err(e),
                }
            }
            f.write_all_at(&data, off)?;
            unsynced += data.len();
            if unsynced >= 64 << 20 {
                unsynced = 0;
                let _ = tick.try_send(());
            }
        }
        Ok(())
    })();
    drop(tick);
    let flushed = flusher
        .join()
        .map_err(|_| io::Error::other("flusher thread panicked"))?;
    res?;
    flushed?;
    // Durability before success, direct writes included: their block allocations are metadata.
    f.sync_all()
}

/// Reads a dir volume's entries into `root`; its files may hold at most `announced` bytes in all
/// (the header's `data_bytes`), so a stream cannot fill the disk past what it declared.
pub(crate) fn import_dir(
    r: &mut dyn Read,
    root: &Path,
    announced: u64,
    progress: &mut Progress,
) -> io::Result<Mismatch> {
    fs::create_dir(root)?;
    let mut budget = announced;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match read_u8(r)? {
            b'K' => {
                let path = read_str(r)?;
                let mode = read_u32(r)?;
                let p = volume::safe_rel(root, &path)?;
                h.update(&volume::entry_header(&DirEntry::Dir { path, mode }));
                fs::create_dir(&p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode & KEEP_MODE))?;
            }
            b'L' => {
                let path = read_str(r)?;
                let target = read_str(r)?;
                let p = volume::safe_rel(root, &path)?;
                std::os::unix::fs::symlink(&target, &p)?;
                h.update(&volume::entry_header(&DirEntry::Symlink { path, target }));
            }
            b'F' => {
                let path = read_str(r)?;
                let mode = read_u32(r)?;
                let size = read_u64(r)?;
                let p = volume::safe_rel(root, &path)?;
                budget = budget.checked_sub(size).ok_or_else(|| {
                    bad(format!(
                        "file {path:?} of {size} bytes is more than its volume announced \
                         ({announced} bytes in all)"
                    ))
                })?;
                h.update(&volume::entry_header(&DirEntry::File {
                    path: path.clone(),
                    mode,
                    size,
                }));
                // Owner-only until complete; its own mode (setuid/setgid stripped) comes last.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)?;
                let mut left = size;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    r.read_exact(&mut buf[..k])?;
                    h.update(&buf[..k]);
                    f.write_all(&buf[..k])?;
                    left -= k as u64;
                    progress.add(k as u64)?;
                }
                f.sync_all()?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode & KEEP_MODE))?;
            }
            b'E' => {
                let sent = read_hash(r)?;
                let got = h.finalize();
                return Ok((sent != got).then_some((sent, got)));
            }
            t => return Err(bad(format!("unexpected frame {t:#x} in a dir volume"))),
        }
    }
}

/// This grid's template `name` of an application being imported; an import needs it, because
/// what runs is this grid's choice, never the source's.
pub fn local_template(state: &Path, app: &str, name: &str) -> Result<Template, String> {
    if dialect::AppName::new(name).is_err() {
        return Err(format!(
            "the source says {app} comes from template {name:?}, which is not a template name"
        ));
    }
    if !state
        .join("templates")
        .join(format!("{name}.toml"))
        .exists()
    {
        return Err(format!(
            "{app} comes from template {name}, which this grid lacks: install it as {} first \
             (an imported application runs this grid's own template)",
            state
                .join("templates")
                .join(format!("{name}.toml"))
                .display()
        ));
    }
    Template::load(state, name)
}

/// Checks the source's record against what its stream carries: the same volumes (name, kind,
/// size), in the same order, each name a plain name. The record is kept, and later `checksum`
/// and `peer export` open its volumes by name, so a name like `../../x` must never get in.
fn check_volumes(rec: &AppRecord, wire: &[WireVolume]) -> Result<(), String> {
    for v in rec
        .volumes
        .iter()
        .map(|v| &v.name)
        .chain(wire.iter().map(|v| &v.name))
    {
        if dialect::AppName::new(v).is_err() {
            return Err(format!(
                "the source sent a volume named {v:?}: a volume name is 1-64 letters, digits, \
                 '-' or '_', starting with a letter"
            ));
        }
    }
    let names = |it: &mut dyn Iterator<Item = &String>| -> String {
        it.map(String::as_str).collect::<Vec<_>>().join(" ")
    };
    let same = rec.volumes.len() == wire.len()
        && rec
            .volumes
            .iter()
            .zip(wire)
            .all(|(r, w)| r.name == w.name && r.kind == w.kind && r.size == w.size);
    if !same {
        return Err(format!(
            "the source's record lists volumes ({}) that differ from those its stream carries \
             ({}): refused",
            names(&mut rec.volumes.iter().map(|v| &v.name)),
            names(&mut wire.iter().map(|v| &v.name))
        ));
    }
    Ok(())
}

/// The record the target grid keeps. From the source: the volumes (checked against the stream
/// header) and the values of the properties this grid's template declares. From this grid's
/// template `local`: the components (what runs), `required` and `secret`. The source's other
/// properties are dropped: a property shadows a grid variable of the same name in `${…}`, so a
/// source's `mig_bin` would otherwise choose what this grid runs; so is its `mig_op` tag (see
/// [`model::MIG_OP`]), since this is a new application (an override sets a new one).
pub fn imported_record(
    header: &Header,
    local: &Template,
    new_name: &str,
    overrides: &[dialect::Prop],
) -> Result<AppRecord, String> {
    let src = &header.record;
    check_volumes(src, &header.volumes)?;
    let mut local_vols: Vec<_> = local
        .volumes
        .iter()
        .map(|v| (&v.name, v.kind.as_str()))
        .collect();
    let mut src_vols: Vec<_> = src
        .volumes
        .iter()
        .map(|v| (&v.name, v.kind.as_str()))
        .collect();
    local_vols.sort();
    src_vols.sort();
    if local_vols != src_vols {
        let show = |v: &[(&String, &str)]| {
            v.iter()
                .map(|(n, k)| format!("{n} ({k})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "the source's volumes [{}] differ from template {}'s on this grid [{}]",
            show(&src_vols),
            src.template,
            show(&local_vols)
        ));
    }
    let mut props = local.properties.clone();
    for (k, v) in &src.props {
        if let Some(p) = props.get_mut(k) {
            dialect::Prop::new(k, v).map_err(|e| format!("the source's {e}"))?;
            *p = v.clone();
        }
    }
    model::apply_props(new_name, &mut props, overrides)?;
    for r in &local.required {
        if props.get(r).is_none_or(|v| v.is_empty()) {
            return Err(format!(
                "template {} requires property {r}, which is empty: give it as {r}=VALUE",
                src.template
            ));
        }
    }
    let rec = AppRecord {
        name: new_name.to_string(),
        template: src.template.clone(),
        state: State::Stopped,
        error: String::new(),
        props,
        required: local.required.clone(),
        secret: local.secret.clone(),
        volumes: src.volumes.clone(),
        components: local.components.clone(),
        pids: Vec::new(),
        pgid: 0,
        staged: false,
    };
    rec.validate()?;
    Ok(rec)
}

/// The receiving side of an import, after the connection: reads the header of the stream from
/// `r`, checks that it carries `app`, builds the record `new_name` will have, and reads the
/// volumes into `app_dir`. Nothing is written before the header and record have been checked.
pub fn receive(
    r: &mut dyn BufRead,
    state: &Path,
    app: &str,
    new_name: &str,
    overrides: &[dialect::Prop],
    app_dir: &Path,
    progress: &mut Progress,
) -> Result<AppRecord, String> {
    let header = read_header(r).map_err(|e| e.to_string())?;
    if header.record.name != app {
        return Err(format!("the source sent {} instead", header.record.name));
    }
    let local = local_template(state, app, &header.record.template)?;
    let rec = imported_record(&header, &local, new_name, overrides)?;
    import_volumes(r, &header, app_dir, progress).map_err(|e| e.to_string())?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{State, Volume};

    fn record(vols: Vec<Volume>) -> AppRecord {
        AppRecord {
            name: "src".into(),
            template: "t".into(),
            state: State::Stopped,
            error: String::new(),
            props: [("a".to_string(), "1".to_string())].into(),
            required: vec![],
            secret: vec![],
            volumes: vols,
            components: vec![],
            pids: vec![],
            pgid: 0,
            staged: false,
        }
    }

    fn setup() -> (tempfile::TempDir, AppRecord) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("vols/conf/sub")).unwrap();
        fs::write(src.join("vols/conf/sub/k"), "key").unwrap();
        std::os::unix::fs::symlink("sub/k", src.join("vols/conf/link")).unwrap();
        let data = src.join("vols/data");
        volume::create(&data, VolumeKind::File, 256 << 20, None).unwrap();
        let f = OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(&vec![7u8; 3 << 20], 100 << 20).unwrap();
        f.write_all_at(b"tail", (256 << 20) - 4).unwrap();
        let rec = record(vec![
            Volume {
                name: "data".into(),
                kind: VolumeKind::File,
                size: 256 << 20,
            },
            Volume {
                name: "conf".into(),
                kind: VolumeKind::Dir,
                size: 0,
            },
        ]);
        (d, rec)
    }

    fn run(d: &Path, rec: &AppRecord, compress: bool, fault: Option<u64>) -> io::Result<()> {
        let mut wire = Vec::new();
        export(&d.join("src"), rec, false, compress, fault, &mut wire).unwrap();
        let dst = d.join("dst");
        let _ = fs::remove_dir_all(&dst);
        fs::create_dir_all(dst.join("vols")).unwrap();
        let mut r = io::BufReader::new(&wire[..]);
        let h = read_header(&mut r).unwrap();
        let mut lines = Vec::new();
        let mut sink = |a, b| {
            lines.push((a, b));
            Ok(())
        };
        let mut p = Progress::new(Some(&mut sink));
        let res = import_volumes(&mut r, &h, &dst, &mut p);
        let _ = p;
        res?;
        let (done, total) = *lines.last().unwrap();
        assert_eq!(total, h.volumes.iter().map(|v| v.data_bytes).sum::<u64>());
        assert!(done <= total);
        Ok(())
    }

    #[test]
    fn a_sparse_file_and_a_dir_arrive_identical_with_holes_kept() {
        let (d, rec) = setup();
        for compress in [true, false] {
            run(d.path(), &rec, compress, None).unwrap();
            for v in ["data", "conf"] {
                let k = if v == "data" {
                    VolumeKind::File
                } else {
                    VolumeKind::Dir
                };
                assert_eq!(
                    volume::checksum_line(v, k, &d.path().join("src/vols").join(v)).unwrap(),
                    volume::checksum_line(v, k, &d.path().join("dst/vols").join(v)).unwrap()
                );
            }
            let md = fs::metadata(d.path().join("dst/vols/data")).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!(md.len(), 256 << 20);
            assert!(
                md.blocks() * 512 < 16 << 20,
                "holes were filled: {} blocks",
                md.blocks()
            );
        }
    }

    #[test]
    fn the_writer_mixes_direct_and_cached_writes_into_one_exact_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("v");
        let size = (3 << 20) + 5000;
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        let pool = Pool::new(2 * CHUNK, 4);
        let chunk = |len: usize, byte: u8| {
            let mut c = pool.get(len);
            c.fill(byte);
            c
        };
        // Aligned (direct where the filesystem allows), then an unaligned length, then an
        // unaligned offset running to the odd end of the file.
        let parts = [
            (0u64, chunk(1 << 20, 1)),
            ((1 << 20) as u64, chunk(10_000, 2)),
            ((2 << 20) as u64 + 100, chunk((1 << 20) + 4900, 3)),
        ];
        assert!(direct_ok(parts[0].0, &parts[0].1));
        assert!(!direct_ok(parts[1].0, &parts[1].1));
        assert!(!direct_ok(parts[2].0, &parts[2].1));
        let mut want = vec![0u8; size as usize];
        for (off, c) in &parts {
            want[*off as usize..*off as usize + c.len()].copy_from_slice(c);
        }
        let (tx, rx) = sync_channel(8);
        for p in parts {
            tx.send(p).unwrap();
        }
        drop(tx);
        write_extents(f, open_direct(&path, true), rx).unwrap();
        assert!(fs::read(&path).unwrap() == want, "file content differs");
    }

    /// Feeds one probe phase: raw chunks take `raw_ms`, compressed ones `zstd_ms`.
    fn probe(a: &mut Adapt, raw_ms: u64, zstd_ms: u64, shrinks: bool) {
        for _ in 0..2 * Adapt::PROBE {
            let z = a.compress_next();
            let ms = if z { zstd_ms } else { raw_ms };
            a.record(z, 1 << 20, z && shrinks, Duration::from_millis(ms));
        }
    }

    /// Sends the rest of the cycle (the choice made) and returns its length in chunks.
    fn rest_of_cycle(a: &mut Adapt, want: bool) -> u32 {
        let mut n = 2 * Adapt::PROBE;
        while a.i != 0 {
            assert_eq!(a.compress_next(), want, "chunk {n}");
            a.record(want, 1 << 20, want, Duration::from_millis(1));
            n += 1;
        }
        n
    }

    #[test]
    fn the_reader_reads_aligned_and_unaligned_chunks_alike() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("v");
        let content: Vec<u8> = (0..(2 << 20) + 777).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &content).unwrap();
        let f = File::open(&path).unwrap();
        let mut direct = open_direct(&path, false);
        let pool = Pool::new(CHUNK, 2);
        for (off, len) in [(0, 1 << 20), (1 << 20, 4096), (100, 5000), (2 << 20, 777)] {
            let mut c = pool.get(len);
            read_chunk(&f, &mut direct, off as u64, &mut c).unwrap();
            assert!(c[..] == content[off..off + len], "chunk at {off}");
        }
    }

    /// `len` bytes that no compressor can shrink (BLAKE3's output stream).
    fn random(seed: u8, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut v);
        v
    }

    #[test]
    fn incompressible_chunks_go_raw_after_a_sample_of_zstd() {
        let mut z = Squeeze::default();
        for seed in 0..16 {
            assert_eq!(z.squeeze(&random(seed, CHUNK)).unwrap(), None);
        }
        // 16 MiB tried, 1 MiB of it compressed: one sample per chunk, never the whole chunk.
        assert_eq!(z.fed, 16 * Squeeze::SAMPLE as u64);
    }

    #[test]
    fn compressible_chunks_are_compressed_whole_and_arrive_intact() {
        let text: Vec<u8> = b"volume data that repeats, as logs and tables do; "
            .iter()
            .copied()
            .cycle()
            .take(CHUNK)
            .collect();
        let mut z = Squeeze::default();
        // Random data first: from then on a try starts with a sample.
        assert_eq!(z.squeeze(&random(1, CHUNK)).unwrap(), None);
        let fed = z.fed;
        let n = z.squeeze(&text).unwrap().expect("text shrinks");
        assert_eq!(
            z.fed - fed,
            (Squeeze::SAMPLE + CHUNK) as u64,
            "sample, then whole"
        );
        // Once data shrinks, the next chunk is compressed whole at once.
        let fed = z.fed;
        let n2 = z.squeeze(&text).unwrap().expect("text shrinks");
        assert_eq!((n2, z.fed - fed), (n, CHUNK as u64));
        let frame = z.frame(4096, text.len(), n).to_vec();
        assert_eq!(frame[..D_HEAD], d_head(4096, text.len(), n, 1));
        let back = zstd::bulk::decompress(&frame[D_HEAD..], CHUNK).unwrap();
        assert!(back == text);
        // A chunk too small to sample is tried whole.
        let mut z = Squeeze::default();
        assert_eq!(z.squeeze(&random(2, 1000)).unwrap(), None);
        assert_eq!(z.fed, 1000);
    }

    #[test]
    fn compression_is_used_only_where_it_moves_bytes_faster() {
        for (raw_ms, zstd_ms, want) in [(10, 30, false), (30, 10, true)] {
            let mut a = Adapt::new(true);
            probe(&mut a, raw_ms, zstd_ms, true);
            assert_eq!(rest_of_cycle(&mut a, want), Adapt::CYCLE);
            // A new cycle probes again.
            assert!(!a.compress_next());
        }
        let off = Adapt::new(false);
        assert!(!off.compress_next());
    }

    #[test]
    fn data_that_does_not_shrink_gets_no_zstd_and_ever_rarer_probes() {
        let mut a = Adapt::new(true);
        let mut cycles = Vec::new();
        for _ in 0..6 {
            // Compressing looks faster (noise), but it saved nothing: no zstd.
            probe(&mut a, 30, 10, false);
            cycles.push(rest_of_cycle(&mut a, false));
        }
        assert_eq!(cycles, [128, 256, 512, 512, 512, 512]);
        // Once data compresses again, zstd is back and probes are frequent again.
        probe(&mut a, 30, 10, true);
        assert_eq!(rest_of_cycle(&mut a, true), Adapt::CYCLE);
    }

    #[test]
    fn an_import_stops_when_its_progress_reader_is_gone() {
        let (d, rec) = setup();
        let mut wire = Vec::new();
        export(&d.path().join("src"), &rec, false, true, None, &mut wire).unwrap();
        let dst = d.path().join("dst");
        fs::create_dir_all(dst.join("vols")).unwrap();
        let mut r = io::BufReader::new(&wire[..]);
        let h = read_header(&mut r).unwrap();
        let mut calls = 0;
        let mut sink = |_, _| {
            calls += 1;
            if calls > 1 {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            } else {
                Ok(())
            }
        };
        let mut p = Progress::new(Some(&mut sink));
        p.every = Duration::ZERO;
        let e = import_volumes(&mut r, &h, &dst, &mut p).unwrap_err();
        assert!(e.to_string().contains("the client went away"), "{e}");
    }

    /// Exports the setup's app, lets `tamper` edit the wire, imports; the import's result.
    fn import_tampered(tamper: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let (d, rec) = setup();
        let mut wire = Vec::new();
        export(&d.path().join("src"), &rec, false, false, None, &mut wire).unwrap();
        tamper(&mut wire);
        let dst = d.path().join("dst");
        fs::create_dir_all(dst.join("vols")).unwrap();
        let mut r = io::BufReader::new(&wire[..]);
        let h = read_header(&mut r)?;
        import_volumes(&mut r, &h, &dst, &mut Progress::new(None))
    }

    #[test]
    fn a_chunk_moved_to_another_offset_is_detected() {
        let e = import_tampered(|w| {
            // The first frame after the header line: `D`, then its offset.
            let d = w.iter().position(|&b| b == b'\n').unwrap() + 1;
            assert_eq!(w[d], b'D');
            let off = u64::from_le_bytes(w[d + 1..d + 9].try_into().unwrap());
            w[d + 1..d + 9].copy_from_slice(&(off - 4096).to_le_bytes());
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("volume data: BLAKE3 mismatch"),
            "{e}"
        );
    }

    #[test]
    fn a_stream_of_another_format_is_refused_by_name() {
        let e = import_tampered(|w| {
            let s = String::from_utf8_lossy(w).replacen(",\"format\":2", "", 1);
            *w = s.into_bytes();
        });
        // (lossy UTF-8 mangles the binary part, but the header is refused before it is read)
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("stream format 1, this grid reads format 2"),
            "{e}"
        );
    }

    #[test]
    fn a_corrupted_stream_is_detected() {
        let (d, rec) = setup();
        let e = run(d.path(), &rec, true, Some(1000)).unwrap_err();
        assert!(e.to_string().contains("BLAKE3 mismatch"), "{e}");
        // In the dir volume too (after all file data: 3 MiB plus the 4 KiB block of the tail).
        let e = run(d.path(), &rec, false, Some((3 << 20) + 4096 + 1)).unwrap_err();
        assert!(e.to_string().contains("volume conf"), "{e}");
    }

    /// This grid's template `t`, for the setup's application: the same volumes, its own
    /// component and properties.
    const LOCAL_T: &str = r#"
secret = ["tok"]
[properties]
a = "0"
tok = ""
[[volumes]]
name = "data"
size = "1M"
[[volumes]]
name = "conf"
kind = "dir"
[[components]]
name = "local"
command = ["/bin/true", "${a}"]
"#;

    /// Exports the setup's app (its record edited by `edit` first), lets `tamper` edit the
    /// decoded header, and receives the stream as `dst` on a grid whose state dir is the tempdir.
    fn receive_hostile(
        edit: impl FnOnce(&mut AppRecord),
        tamper: impl FnOnce(&mut Header),
        with_template: bool,
    ) -> (tempfile::TempDir, Result<AppRecord, String>) {
        let (d, mut rec) = setup();
        edit(&mut rec);
        let mut wire = Vec::new();
        export(&d.path().join("src"), &rec, false, false, None, &mut wire).unwrap();
        let nl = wire.iter().position(|&b| b == b'\n').unwrap();
        let mut h: Header = serde_json::from_slice(&wire[..nl]).unwrap();
        tamper(&mut h);
        let mut line = serde_json::to_vec(&h).unwrap();
        line.extend_from_slice(&wire[nl..]);
        if with_template {
            fs::create_dir_all(d.path().join("templates")).unwrap();
            fs::write(d.path().join("templates/t.toml"), LOCAL_T).unwrap();
        }
        let dst = d.path().join("apps/dst");
        fs::create_dir_all(dst.join("vols")).unwrap();
        let over = ["a=2".parse().unwrap()];
        let r = receive(
            &mut io::BufReader::new(&line[..]),
            d.path(),
            "src",
            "dst",
            &over,
            &dst,
            &mut Progress::new(None),
        );
        (d, r)
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_imported_record_runs_this_grid_s_components_and_drops_undeclared_props() {
        let (_d, r) = receive_hostile(
            |rec| {
                rec.components = Template::parse(
                    "[[components]]\nname = \"evil\"\ncommand = [\"/bin/sh\", \"-c\", \"id\"]\n",
                )
                .unwrap()
                .components;
                // A property shadows grid variables in `${…}`: it must not choose `mig_bin`.
                rec.props.insert("mig_bin".into(), "/tmp/evil".into());
                rec.props.insert("mig_op".into(), "0".repeat(32));
                rec.props.insert("tok".into(), "s3cret".into());
            },
            |_| {},
            true,
        );
        let rec = r.unwrap();
        let local = Template::parse(LOCAL_T).unwrap();
        assert_eq!(rec.components, local.components);
        assert_eq!(rec.name, "dst");
        assert_eq!(rec.secret, ["tok"]);
        let props: Vec<(&str, &str)> = rec
            .props
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(props, [("a", "2"), ("tok", "s3cret")]);
    }

    #[test]
    fn an_import_of_an_application_whose_template_this_grid_lacks_is_refused() {
        let (d, r) = receive_hostile(|_| {}, |_| {}, false);
        let e = r.unwrap_err();
        assert!(
            e.contains("src comes from template t, which this grid lacks")
                && e.contains("templates/t.toml"),
            "{e}"
        );
        assert!(names(&d.path().join("apps/dst/vols")).is_empty());
        // A template name that is a path is not even looked for.
        let (_d, r) = receive_hostile(|rec| rec.template = "../../etc/x".into(), |_| {}, true);
        let e = r.unwrap_err();
        assert!(
            e.contains("\"../../etc/x\", which is not a template name"),
            "{e}"
        );
    }

    #[test]
    fn a_record_whose_volumes_differ_from_the_stream_is_refused_and_nothing_is_written() {
        // A record volume named like a path, the stream's header innocent.
        let (d, r) = receive_hostile(
            |_| {},
            |h| h.record.volumes[1].name = "../../x".into(),
            true,
        );
        let e = r.unwrap_err();
        assert!(
            e.contains("the source sent a volume named \"../../x\""),
            "{e}"
        );
        assert!(names(&d.path().join("apps/dst/vols")).is_empty());
        assert_eq!(names(d.path()), ["apps", "src", "templates"]);
        assert_eq!(names(&d.path().join("apps")), ["dst"]);
        // A record volume the stream does not carry.
        let (d, r) = receive_hostile(
            |_| {},
            |h| {
                h.record.volumes.push(crate::model::Volume {
                    name: "extra".into(),
                    kind: VolumeKind::File,
                    size: 1,
                })
            },
            true,
        );
        let e = r.unwrap_err();
        assert!(
            e.contains(
                "volumes (data conf extra) that differ from those its stream carries (data conf)"
            ),
            "{e}"
        );
        assert!(names(&d.path().join("apps/dst/vols")).is_empty());
        // A size that differs from the stream's.
        let (_d, r) = receive_hostile(|_| {}, |h| h.record.volumes[0].size += 1, true);
        assert!(r.unwrap_err().contains("differ from those its stream"));
        // Volumes that this grid's template does not have.
        let (_d, r) = receive_hostile(
            |_| {},
            |h| {
                h.record.volumes[1].name = "other".into();
                h.volumes[1].name = "other".into();
            },
            true,
        );
        let e = r.unwrap_err();
        assert!(e.contains("differ from template t's on this grid"), "{e}");
    }

    #[test]
    fn received_files_and_dirs_lose_setuid_and_setgid() {
        let (d, rec) = setup();
        let conf = d.path().join("src/vols/conf");
        fs::write(conf.join("sub/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(conf.join("sub/tool"), fs::Permissions::from_mode(0o6755)).unwrap();
        fs::set_permissions(conf.join("sub"), fs::Permissions::from_mode(0o3775)).unwrap();
        run(d.path(), &rec, false, None).unwrap();
        let mode = |p: &str| {
            fs::symlink_metadata(d.path().join("dst/vols/conf").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("sub/tool"), 0o755);
        // The sticky bit stays: it only restricts.
        assert_eq!(mode("sub"), 0o1775);
    }

    #[test]
    fn an_overlong_header_line_is_refused_without_reading_it_all() {
        let mut r = io::BufReader::new(io::repeat(b'x').take(64 << 20));
        let e = read_header(&mut r).unwrap_err().to_string();
        assert!(e.contains("header is longer than 4 MiB"), "{e}");
        // It stopped just past the limit.
        let left = io::copy(&mut r, &mut io::sink()).unwrap();
        assert!(left >= (64 << 20) - MAX_HEADER - (1 << 20), "{left}");
    }

    #[test]
    fn an_offset_whose_end_overflows_is_refused() {
        let e = import_tampered(|w| {
            let d = w.iter().position(|&b| b == b'\n').unwrap() + 1;
            assert_eq!(w[d], b'D');
            w[d + 1..d + 9].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
        })
        .unwrap_err();
        assert!(e.to_string().contains("bad data frame at offset"), "{e}");
    }

    #[test]
    fn announced_sizes_bound_what_a_stream_may_write() {
        // A dir volume's files may not exceed what its header announced.
        let (d, rec) = setup();
        let mut wire = Vec::new();
        export(&d.path().join("src"), &rec, false, false, None, &mut wire).unwrap();
        let nl = wire.iter().position(|&b| b == b'\n').unwrap();
        let reheader = |edit: &dyn Fn(&mut Header)| {
            let mut h: Header = serde_json::from_slice(&wire[..nl]).unwrap();
            edit(&mut h);
            let mut w = serde_json::to_vec(&h).unwrap();
            w.extend_from_slice(&wire[nl..]);
            w
        };
        let import = |w: Vec<u8>| {
            let dst = d.path().join("dst");
            let _ = fs::remove_dir_all(&dst);
            fs::create_dir_all(dst.join("vols")).unwrap();
            let mut r = io::BufReader::new(&w[..]);
            let h = read_header(&mut r)?;
            import_volumes(&mut r, &h, &dst, &mut Progress::new(None))
        };
        let e = import(reheader(&|h| h.volumes[1].data_bytes = 1)).unwrap_err();
        assert!(
            e.to_string()
                .contains("file \"sub/k\" of 3 bytes is more than its volume announced (1 bytes"),
            "{e}"
        );
        let e = import(reheader(&|h| {
            h.volumes[0].data_bytes = u64::MAX;
            h.volumes[1].data_bytes = 2;
        }))
        .unwrap_err();
        assert!(e.to_string().contains("add up past 2^64"), "{e}");
    }
}
