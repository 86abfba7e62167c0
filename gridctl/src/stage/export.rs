//! The source's side: the staged stream of a running application, and the delta of a stopped
//! one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use crate::blocktree::{self, block_cv, block_len, blocks, Stamp, ZeroCvs};
use crate::chunk::{Chunk, Pool};
use crate::model::{self, AppRecord};
use crate::template::VolumeKind;
use crate::transfer::{self, bad};
use crate::volume;

use super::*;

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
pub(super) fn most_blocks(record: &AppRecord) -> u64 {
    record
        .volumes
        .iter()
        .filter(|v| v.kind == VolumeKind::File)
        .map(|v| blocks(v.size))
        .max()
        .unwrap_or(0)
}

/// Reads the target's block digests (see the module doc), refusing another format.
pub(super) fn read_wanted(r: &mut dyn BufRead) -> io::Result<BTreeMap<String, Vec<Digest>>> {
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
pub(super) type Changed = (u64, usize, Option<Chunk>);
/// The delta's hashing threads: one per core of the 2-core machines it is measured on, where
/// hashing the stopped source's data is most of the downtime.
pub(super) const HASHERS: u64 = 2;
/// The blocks a hashing thread takes at a time (64 MiB): big enough that the hand-over between
/// threads is rare, small enough that neither waits long for the other's run to be sent.
pub(super) const RUN: u64 = 64;

pub(super) fn send_changed(
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
