//! The source's side: `peer export` writes the stream of a stopped application.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use crate::chunk::{Chunk, Pool};
use crate::model::{self, AppRecord};
use crate::template::VolumeKind;
use crate::volume::{self, DirEntry};

use super::*;

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
pub(super) struct Squeeze {
    pub(super) comp: Option<zstd::bulk::Compressor<'static>>,
    /// Compressed frames are built here, header first, and reused chunk after chunk.
    pub(super) zbuf: Vec<u8>,
    /// Whether the last chunk compressed whole shrank; only then is the next one tried whole
    /// at once. Starts out false: the first try is sampled too.
    pub(super) shrinking: bool,
    /// Bytes handed to zstd so far.
    pub(super) fed: u64,
}

impl Squeeze {
    pub(super) const SAMPLE: usize = 64 << 10;

    /// `Some(len)` when `data` compressed to `len` bytes, a tenth or more below its size; the
    /// frame is then [`Squeeze::frame`]. `None`: send `data` raw.
    pub(super) fn squeeze(&mut self, data: &[u8]) -> io::Result<Option<usize>> {
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
    pub(super) fn frame(&mut self, off: u64, raw: usize, n: usize) -> &[u8] {
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
pub(super) struct Adapt {
    pub(super) enabled: bool,
    pub(super) i: u32,
    pub(super) raw: (u64, Duration),
    pub(super) zst: (u64, Duration),
    /// Whether a compressed probe of this cycle came out smaller than the data.
    pub(super) shrank: bool,
    pub(super) use_zstd: bool,
    pub(super) cycle: u32,
}

impl Adapt {
    pub(super) const CYCLE: u32 = 64;
    pub(super) const MAX_CYCLE: u32 = 512;
    pub(super) const PROBE: u32 = 4;

    pub(super) fn new(enabled: bool) -> Adapt {
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

    pub(super) fn compress_next(&self) -> bool {
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
    pub(super) fn record(&mut self, zstd: bool, bytes: usize, shrank: bool, t: Duration) {
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

pub(super) fn put_str(v: &mut Vec<u8>, s: &str) {
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
