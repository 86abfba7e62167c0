//! The data path's unit tests: streams end to end in memory, the adaptive compression, the
//! refusals of hostile or mismatched streams.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::Duration;

use crate::chunk::Pool;
use crate::model::{AppRecord, State};
use crate::template::{Template, VolumeKind};
use crate::volume;

use super::*;
use crate::model::Volume;

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
