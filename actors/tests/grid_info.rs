//! grid.info against fixture files: every bad file yields exactly the problems its `.expect` lists
//! (see actors/tests/fixtures/grid_info/README.md), the good ones parse to the expected grids, and no
//! input at all makes the parser panic.
use std::fs;
use std::path::{Path, PathBuf};

use actors::grid_info::{self, Diagnostic, Grid, GridInfo, HostPort};
use proptest::prelude::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grid_info");
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/sample.grid.info");

/// One line of a `.expect` file: `LINE:COL: message fragment`.
#[derive(Debug)]
struct Expected {
    line: usize,
    col: usize,
    fragment: String,
}

fn read_expect(path: &Path) -> Vec<Expected> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let bad = || panic!("{}:{}: expected LINE:COL: fragment", path.display(), i + 1);
            let mut parts = l.splitn(3, ':');
            let (Some(line), Some(col), Some(fragment)) =
                (parts.next(), parts.next(), parts.next())
            else {
                bad()
            };
            Expected {
                line: line.trim().parse().unwrap_or_else(|_| bad()),
                col: col.trim().parse().unwrap_or_else(|_| bad()),
                fragment: fragment.trim().to_string(),
            }
        })
        .collect()
}

fn fixtures(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(Path::new(FIXTURES).join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "info"))
        .collect();
    files.sort();
    files
}

/// Matches the diagnostics of one file against its expectations, both ways; returns the mismatches.
fn check_bad(info: &Path) -> Vec<String> {
    let expect_path = info.with_extension("expect");
    let expected = read_expect(&expect_path);
    let name = info.file_name().unwrap().to_string_lossy().into_owned();
    let mut diags = match grid_info::load(info) {
        Ok(_) => return vec![format!("{name}: parsed without any problem")],
        Err(d) => d,
    };
    if std::env::var_os("GRID_INFO_DUMP").is_some() {
        for d in &diags {
            eprintln!("{name} {}:{}: {}", d.line, d.col, d.message);
        }
    }
    let mut problems = Vec::new();
    for d in &diags {
        // Every diagnostic names the file it is about, as given.
        if d.path != info {
            problems.push(format!("{name}: diagnostic for {}", d.path.display()));
        }
        let shown = d.to_string();
        let prefix = if d.line == 0 {
            format!("{}: ", info.display())
        } else {
            format!("{}:{}:{}: ", info.display(), d.line, d.col)
        };
        if !shown.starts_with(&prefix) {
            problems.push(format!("{name}: displayed as {shown:?}"));
        }
    }
    let mut sorted = diags.clone();
    sorted.sort_by_key(|d| (d.line, d.col));
    if sorted != diags {
        problems.push(format!("{name}: diagnostics are not in file order"));
    }
    for e in &expected {
        let found = diags
            .iter()
            .position(|d| d.line == e.line && d.col == e.col && d.message.contains(&e.fragment));
        match found {
            Some(i) => {
                diags.remove(i);
            }
            None => problems.push(format!(
                "{name}: missing {}:{}: {}",
                e.line, e.col, e.fragment
            )),
        }
    }
    for d in diags {
        problems.push(format!(
            "{name}: unexpected {}:{}: {}",
            d.line, d.col, d.message
        ));
    }
    problems
}

#[test]
fn every_bad_fixture_reports_exactly_its_expected_problems() {
    let files = fixtures("bad");
    assert!(files.len() >= 30, "only {} bad fixtures", files.len());
    let problems: Vec<String> = files.iter().flat_map(|f| check_bad(f)).collect();
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn every_bad_fixture_has_an_expectation_and_back() {
    for f in fixtures("bad") {
        let e = f.with_extension("expect");
        assert!(e.is_file(), "{} has no {}", f.display(), e.display());
        assert!(
            !read_expect(&e).is_empty(),
            "{} expects nothing",
            e.display()
        );
    }
    for e in fs::read_dir(Path::new(FIXTURES).join("bad")).unwrap() {
        let e = e.unwrap().path();
        if e.extension().is_some_and(|x| x == "expect") {
            assert!(
                e.with_extension("info").is_file(),
                "{} is orphaned",
                e.display()
            );
        }
    }
}

fn load_ok(path: &Path) -> GridInfo {
    grid_info::load(path).unwrap_or_else(|d| {
        let lines: Vec<String> = d.iter().map(Diagnostic::to_string).collect();
        panic!("{} should parse:\n{}", path.display(), lines.join("\n"))
    })
}

fn good(name: &str) -> GridInfo {
    load_ok(&Path::new(FIXTURES).join("good").join(name))
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn mighelper(n: u8) -> Vec<(String, String)> {
    pairs(&[
        ("in_ip", &format!("10.0.{n}.20")),
        ("out_ip", &format!("10.0.{n}.21")),
        ("netmask", "255.255.255.0"),
        ("gateway", &format!("10.0.{n}.1")),
    ])
}

fn hp(host: &str, port: u16) -> HostPort {
    HostPort {
        host: host.into(),
        port,
    }
}

#[test]
fn the_sample_parses_to_its_two_grids() {
    let info = load_ok(Path::new(SAMPLE));
    assert_eq!(info.path, Path::new(SAMPLE));
    let ids: Vec<&str> = info.grids.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["g1", "g2"]);
    let g1 = info.get("g1").unwrap();
    assert_eq!(
        g1,
        &Grid {
            id: "g1".into(),
            controller: "10.0.0.5".parse().unwrap(),
            location: Some("Los Angeles".into()),
            mig_ip: hp("10.0.1.10", 8080),
            app_config: pairs(&[("in_ip", "10.0.1.10"), ("out_ip", "10.0.1.11")]),
            mighelper_config: mighelper(1),
            line: g1.line,
        }
    );
    let g2 = info.get("g2").unwrap();
    assert_eq!(g2.controller.user.as_deref(), Some("admin"));
    assert_eq!(g2.controller.host, "grid2.example.net");
    assert_eq!(g2.controller.port, Some(2222));
    assert_eq!(g2.location.as_deref(), Some("Frankfurt, rack \"B\""));
    assert_eq!(g2.mig_ip, hp("10.0.2.10", 8080));
    assert_eq!(g2.app("motd"), Some("welcome to Frankfurt"));
    assert_eq!(g2.mighelper_config, mighelper(2));
    assert!(g1.line < g2.line);
    // The `line` of a grid is its `grid ID:` line.
    let text = fs::read_to_string(SAMPLE).unwrap();
    assert!(text
        .lines()
        .nth(g1.line - 1)
        .unwrap()
        .starts_with("grid g1:"));
    assert!(text
        .lines()
        .nth(g2.line - 1)
        .unwrap()
        .starts_with("grid g2:"));
}

#[test]
fn the_sample_serializes_for_the_api() {
    let info = load_ok(Path::new(SAMPLE));
    let json = serde_json::to_value(&info).unwrap();
    let g2 = &json["grids"][1];
    assert_eq!(g2["id"], "g2");
    assert_eq!(g2["controller"], "admin@grid2.example.net:2222");
    assert_eq!(g2["mig_ip"]["port"], 8080);
    assert_eq!(g2["location"], "Frankfurt, rack \"B\"");
}

#[test]
fn brace_on_the_next_line_and_no_optional_keys() {
    let info = good("01-brace-next-line.info");
    assert_eq!(
        info.grids,
        [Grid {
            id: "east-1".into(),
            controller: "grid-east".parse().unwrap(),
            location: None,
            mig_ip: hp("mig.east.example", 443),
            app_config: vec![],
            mighelper_config: mighelper(3),
            line: 3,
        }]
    );
}

#[test]
fn controller_with_user_and_port_and_ipv6_mig_ip() {
    let info = good("02-user-host-port.info");
    let g = info.get("g_2").unwrap();
    assert_eq!(g.controller.user.as_deref(), Some("applogic"));
    assert_eq!(g.controller.host, "10.0.0.6");
    assert_eq!(g.controller.port, Some(2022));
    assert_eq!(g.controller.to_string(), "applogic@10.0.0.6:2022");
    assert_eq!(g.mig_ip, hp("::1", 8080));
    assert_eq!(g.mig_ip.to_string(), "[::1]:8080");
    let plain = info.get("G3").unwrap();
    assert_eq!(plain.controller.user, None);
    assert_eq!(plain.controller.port, Some(22));
    assert_eq!(plain.mig_ip, hp("127.0.3.10", 1));
}

#[test]
fn quoted_values_with_escapes_and_inner_quotes() {
    let info = good("03-quoted-escapes.info");
    let g = &info.grids[0];
    assert_eq!(g.controller.to_string(), "root@grid1");
    assert_eq!(
        g.location.as_deref(),
        Some(r#"Building "A" \ floor 2 # not a comment"#)
    );
    assert_eq!(g.mig_ip, hp("10.0.1.10", 65535));
    assert_eq!(
        g.app_config,
        pairs(&[
            ("motd", "hello, world"),
            ("banner", "say \"hi\""),
            ("quote", "it's"),
            ("path", r"C:\data"),
            ("empty", ""),
            ("a.b_c", "1"),
        ])
    );
    assert_eq!(g.mighelper_config, mighelper(1));
}

#[test]
fn crlf_line_endings() {
    let path = Path::new(FIXTURES).join("good/04-crlf.info");
    // Guard against a checkout that converted the fixture: it must really hold CRLF.
    assert!(fs::read(&path).unwrap().windows(2).any(|w| w == b"\r\n"));
    let info = good("04-crlf.info");
    let ids: Vec<&str> = info.grids.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["g1", "g2"]);
    let g1 = &info.grids[0];
    assert_eq!(g1.location.as_deref(), Some("Los Angeles"));
    assert_eq!(g1.app("out_ip"), Some("10.0.1.11"));
    assert_eq!(g1.mighelper_config, mighelper(1));
    assert_eq!(info.grids[1].mighelper_config, mighelper(2));
    assert_eq!(info.grids[1].line, 10);
}

#[test]
fn no_app_config_extra_mighelper_properties_and_comments_everywhere() {
    let info = good("05-no-app-config.info");
    let g = info.get("lab").unwrap();
    assert!(g.app_config.is_empty());
    assert_eq!(g.location.as_deref(), Some("lab"));
    let mut want = mighelper(9);
    want.insert(0, ("mtu".into(), "9000".into()));
    assert_eq!(g.mighelper_config, want);
    assert_eq!(g.mighelper("mtu"), Some("9000"));
}

#[test]
fn the_crlf_fixture_is_the_lf_one_with_other_line_ends() {
    // The same grids from a CRLF and an LF file: line endings change nothing else.
    let crlf = fs::read(Path::new(FIXTURES).join("good/04-crlf.info")).unwrap();
    let lf: Vec<u8> = crlf.iter().copied().filter(|&b| b != b'\r').collect();
    let a = grid_info::parse(Path::new("x"), &crlf).unwrap();
    let b = grid_info::parse(Path::new("x"), &lf).unwrap();
    assert_eq!(a, b);
}

#[test]
fn load_reports_a_missing_file_a_directory_and_a_large_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("grid.info");
    let d = grid_info::load(&missing).unwrap_err();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].line, d[0].col), (0, 0));
    assert!(d[0].message.starts_with("cannot read"), "{d:?}");
    assert!(d[0]
        .to_string()
        .starts_with(&format!("{}: cannot read", missing.display())));

    let d = grid_info::load(dir.path()).unwrap_err();
    assert!(d[0].message.contains("not a regular file"), "{d:?}");

    let big = dir.path().join("big.info");
    let mut text = fs::read(SAMPLE).unwrap();
    text.resize(grid_info::MAX_SIZE as usize + 1, b'\n');
    fs::write(&big, &text).unwrap();
    let d = grid_info::load(&big).unwrap_err();
    assert_eq!(d.len(), 1);
    assert!(
        d[0].message.starts_with("file is larger than 1 MiB"),
        "{d:?}"
    );
    // One byte less is fine: the sample padded with blank lines.
    text.pop();
    fs::write(&big, &text).unwrap();
    assert_eq!(load_ok(&big).grids.len(), 2);
}

/// Lines as the parser counts them: a final newline does not start another line.
fn line_count(bytes: &[u8]) -> usize {
    grid_info::split_lines(bytes).len()
}

/// The parser must not panic, and what it reports must point inside the file.
fn check_any(bytes: &[u8]) -> Result<(), TestCaseError> {
    let lines = line_count(bytes);
    match grid_info::parse(Path::new("fuzz.info"), bytes) {
        Ok(info) => {
            prop_assert!(!info.grids.is_empty());
            for g in &info.grids {
                prop_assert!(g.line >= 1 && g.line <= lines);
            }
        }
        Err(diags) => {
            prop_assert!(!diags.is_empty());
            for d in &diags {
                if d.line == 0 {
                    prop_assert_eq!(d.col, 0, "{}", d);
                } else {
                    prop_assert!(d.line <= lines, "{} (file has {} lines)", d, lines);
                    prop_assert!(d.col >= 1, "{}", d);
                }
                prop_assert!(!d.message.is_empty());
            }
        }
    }
    Ok(())
}

/// A change to the sample: these are the ways a hand-edited file goes wrong.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, byte: u8 },
    Delete { line: usize },
    Duplicate { line: usize },
    Truncate { at: usize },
    Insert { at: usize, byte: u8 },
}

fn apply(sample: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = sample.to_vec();
    for m in mutations {
        let mut lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        match *m {
            Mutation::Flip { at, byte } if !bytes.is_empty() => {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            Mutation::Insert { at, byte } => {
                let at = at % (bytes.len() + 1);
                bytes.insert(at, byte);
            }
            Mutation::Truncate { at } => bytes.truncate(at % (bytes.len() + 1)),
            Mutation::Delete { line } => {
                lines.remove(line % lines.len());
                bytes = lines.join(&b'\n');
            }
            Mutation::Duplicate { line } => {
                let i = line % lines.len();
                lines.insert(i, lines[i].clone());
                bytes = lines.join(&b'\n');
            }
            Mutation::Flip { .. } => {}
        }
    }
    bytes
}

/// Bytes a grid.info is made of, so that mutations hit the syntax more often than pure noise.
fn syntax_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}:=\"'\\#\n\r\t .@-_ gx0".to_vec()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), syntax_byte()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        (any::<usize>(), syntax_byte()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|line| Mutation::Delete { line }),
        any::<usize>().prop_map(|line| Mutation::Duplicate { line }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_any(&bytes)?;
    }

    #[test]
    fn random_syntax_never_panics(bytes in prop::collection::vec(syntax_byte(), 0..512)) {
        check_any(&bytes)?;
    }

    #[test]
    fn mutated_samples_never_panic(mutations in prop::collection::vec(mutation(), 1..8)) {
        let sample = fs::read(SAMPLE).unwrap();
        check_any(&apply(&sample, &mutations))?;
    }

    #[test]
    fn mutated_good_fixtures_never_panic(
        which in 0usize..5,
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let files = fixtures("good");
        let original = fs::read(&files[which % files.len()]).unwrap();
        check_any(&apply(&original, &mutations))?;
    }
}

/// Parses `bytes` (which must be at most 1 MiB) and returns how long it took.
fn timed(bytes: &[u8]) -> std::time::Duration {
    assert!(bytes.len() as u64 <= grid_info::MAX_SIZE);
    let t = std::time::Instant::now();
    let _ = grid_info::parse(Path::new("big.info"), bytes);
    t.elapsed()
}

#[test]
fn the_largest_files_parse_in_linear_time() {
    // Each is close to 1 MiB and built to hit one loop hard; a quadratic step takes minutes here.
    let n = grid_info::MAX_SIZE as usize - 200;
    let long_quoted = format!("grid g1: {{\n  location = \"{}\"\n}}\n", "a".repeat(n));
    let mut props = String::new();
    for i in 0.. {
        if props.len() > n - 100 {
            break;
        }
        props += &format!("p{i}=1 ");
    }
    let many_props = format!("grid g1: {{\n  app_config = \"{props}\"\n}}\n");
    let mut bad_lines = b"\xff\n".repeat(n / 2);
    bad_lines.truncate(n);
    let many_grids: String = (0..n / 40)
        .map(|i| format!("grid g{i}: {{\n}}\n"))
        .collect();
    for (name, bytes) in [
        ("one long quoted value", long_quoted.into_bytes()),
        ("many properties", many_props.into_bytes()),
        ("many non-UTF-8 lines", bad_lines),
        ("many grids", many_grids.into_bytes()),
    ] {
        let took = timed(&bytes);
        assert!(took.as_secs() < 20, "{name}: {took:?}");
    }
}

#[test]
fn comments_after_values_outside_quotes() {
    let info = good("06-trailing-comments.info");
    let g = info.get("west").unwrap();
    assert_eq!(g.controller.to_string(), "admin@10.9.0.1:2222");
    assert_eq!(g.location.as_deref(), Some("Rack#4"));
    assert_eq!(g.mig_ip, hp("10.9.0.10", 8080));
    assert_eq!(g.app_config, pairs(&[("motd", "#1 shop"), ("tag", "a#b")]));
    let mut helper = mighelper(9);
    helper.push(("note".into(), "a #b".into()));
    assert_eq!(g.mighelper_config, helper);
}
