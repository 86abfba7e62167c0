//! The target's side: receiving a staged copy, applying a delta to it, and the pulls that run
//! them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;

use crate::blocktree::{self, block_cv, block_len, blocks, zero_cv, Stamp};
use crate::client::{self, ImportOpts};
use crate::model::{self, AppRecord};
use crate::protocol::{Reply, Request};
use crate::template::VolumeKind;
use crate::transfer::{self, bad, Progress};
use crate::volume;

use super::*;

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
pub(super) fn staged_digests(
    app_dir: &Path,
    rec: &AppRecord,
) -> io::Result<BTreeMap<String, Vec<Digest>>> {
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

pub(super) fn write_wanted(w: &mut dyn Write, d: &BTreeMap<String, Vec<Digest>>) -> io::Result<()> {
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

pub(super) fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
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
pub(super) fn apply_file(
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
pub(super) fn old_source(remote: &str, stderr: &str) -> String {
    format!(
        "the source grid {remote} runs a gridctl without staged copies (stream format {FORMAT}): \
         it refused the pre-copy ({stderr}); run the same gridctl version on both grids, or \
         migrate with precopy = off"
    )
}

/// Runs `peer export APP FLAGS` on the remote grid; `feed` writes what the source reads first
/// (the delta's block digests); `receive` reads the stream. Returns what `receive` returned.
pub(super) fn pull<T>(
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
    // `--max_rate` holds for the pre-copy and the delta as for a full pull: on the link's bytes.
    let mut r = client::link_reader(child.stdout.take().expect("piped"), o.max_rate);
    let mut print = client::print_progress;
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
