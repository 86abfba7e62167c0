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
//!
//! This file holds the wire format (header, frames, digest, progress); the source's side is in
//! `export`, the target's in `import`, the page-cache bypass in `direct`, the test hooks in
//! `hooks`.

use std::io::{self, BufRead, Read};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::AppRecord;
use crate::template::VolumeKind;

mod direct;
mod export;
mod hooks;
mod import;
#[cfg(test)]
mod tests;

pub(crate) use direct::{open_direct, read_chunk};
pub use export::export;
pub(crate) use export::{export_dir, export_file};
pub(crate) use hooks::Fault;
pub use hooks::{hold_start_answer, hold_while_asked, take_fault};
pub(crate) use import::{import_dir, import_file, Mismatch};
pub use import::{import_volumes, imported_record, local_template, receive};
#[cfg(test)]
use {
    direct::direct_ok,
    export::{Adapt, Squeeze},
    import::write_extents,
};

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
