//! The target's side: reading a stream into volumes, and the record an import keeps.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};

use crate::chunk::{Chunk, Pool};
use crate::model::{self, AppRecord, State};
use crate::template::{Template, VolumeKind};
use crate::volume::{self, DirEntry};

use super::direct::direct_ok;
use super::*;

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

pub(super) fn write_extents(
    f: File,
    mut direct: Option<File>,
    rx: Receiver<(u64, Chunk)>,
) -> io::Result<()> {
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
pub(super) fn check_volumes(rec: &AppRecord, wire: &[WireVolume]) -> Result<(), String> {
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
