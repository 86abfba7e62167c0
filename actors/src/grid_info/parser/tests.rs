use super::*;

fn diags(src: &str) -> Vec<String> {
    match parse(Path::new("g.info"), src.as_bytes()) {
        Ok(_) => Vec::new(),
        Err(d) => d.iter().map(|d| d.to_string()).collect(),
    }
}

const GOOD: &str = "grid g1:\n{\n  controller = 10.0.0.5\n  MIG_ip = 10.0.1.10:8080\n  \
        MigHelper_config = \"in_ip=10.0.1.20 out_ip=10.0.1.21 netmask=255.255.255.0 gateway=10.0.1.1\"\n}\n";

#[test]
fn host_port_parses_and_displays() {
    let hp: HostPort = "10.0.1.10:8080".parse().unwrap();
    assert_eq!((hp.host.as_str(), hp.port), ("10.0.1.10", 8080));
    assert_eq!(hp.to_string(), "10.0.1.10:8080");
    let v6: HostPort = "[::1]:65535".parse().unwrap();
    assert_eq!((v6.host.as_str(), v6.port), ("::1", 65535));
    assert_eq!(v6.to_string(), "[::1]:65535");
    assert_eq!(
        "mig.example:1".parse::<HostPort>().unwrap().host,
        "mig.example"
    );
}

#[test]
fn host_port_refusals_point_at_the_bad_part() {
    let e = |s: &str| s.parse::<HostPort>().unwrap_err();
    assert_eq!(e("10.0.1.10").offset, 9);
    assert!(e("10.0.1.10").reason.contains("no port"));
    assert_eq!(e("10.0.1.10:0").offset, 10);
    assert!(e("10.0.1.10:0").reason.contains("out of range"));
    assert!(e("h:65536").reason.contains("out of range"));
    assert!(e("h:99999999999999999999").reason.contains("out of range"));
    assert!(e("h:8o").reason.contains("not a port number"));
    assert!(e("h:").reason.contains("port is missing"));
    assert_eq!(e(":80").offset, 0);
    assert!(e("10.0.1.300:80").reason.contains("not a valid IPv4"));
    assert!(e("bad_host:80").reason.contains("not a valid host name"));
    assert!(e("::1:80").reason.contains("brackets"));
    assert!(e("[::1]").reason.contains("expected `:PORT`"));
    assert!(e("[zz]:1").reason.contains("not an IPv6"));
    assert!(e("[::1:1").reason.contains("no `]`"));
}

#[test]
fn netmasks_must_be_contiguous() {
    assert!(contiguous_mask(Ipv4Addr::new(255, 255, 255, 0)));
    assert!(contiguous_mask(Ipv4Addr::new(255, 255, 255, 255)));
    assert!(contiguous_mask(Ipv4Addr::new(255, 255, 128, 0)));
    assert!(!contiguous_mask(Ipv4Addr::new(255, 0, 255, 0)));
    assert!(!contiguous_mask(Ipv4Addr::new(0, 0, 0, 255)));
}

#[test]
fn key_suggestions() {
    assert_eq!(suggest_key("controler"), Some("controller"));
    assert_eq!(suggest_key("mig_ip"), Some("MIG_ip"));
    assert_eq!(suggest_key("MigHelper"), Some("MigHelper_config"));
    assert_eq!(suggest_key("app_conf"), Some("app_config"));
    assert_eq!(suggest_key("zzz"), None);
}

#[test]
fn headers_and_keys_named_grid() {
    assert!(is_header("grid g1:"));
    assert!(is_header("grid\tg1 :"));
    assert!(is_header("grid:"));
    assert!(!is_header("grid = x"));
    assert!(!is_header("gridx:"));
}

#[test]
fn split_lines_ignores_only_the_final_newline() {
    assert_eq!(split_lines(b"").len(), 0);
    assert_eq!(split_lines(b"a").len(), 1);
    assert_eq!(split_lines(b"a\n").len(), 1);
    assert_eq!(split_lines(b"a\n\n").len(), 2);
}

#[test]
fn a_minimal_grid_parses() {
    let info = parse(Path::new("g.info"), GOOD.as_bytes()).unwrap();
    let g = info.get("g1").unwrap();
    assert_eq!(g.controller.to_string(), "10.0.0.5");
    assert_eq!(g.mig_ip.to_string(), "10.0.1.10:8080");
    assert_eq!(g.mighelper("gateway"), Some("10.0.1.1"));
    assert!(g.app_config.is_empty());
    assert_eq!(g.location, None);
    assert_eq!(g.line, 1);
    assert!(info.get("g2").is_none());
}

#[test]
fn display_of_diagnostics() {
    let d = Diagnostic {
        path: "a/grid.info".into(),
        line: 3,
        col: 7,
        message: "m".into(),
    };
    assert_eq!(d.to_string(), "a/grid.info:3:7: m");
    let whole = file_level(Path::new("a/grid.info"), "no grid defined".into());
    assert_eq!(whole.to_string(), "a/grid.info: no grid defined");
}

#[test]
fn quoted_values_unescape_and_keep_source_columns() {
    let src = GOOD.replace(
        "}\n",
        "  location = \"say \\\"hi\\\" \\\\ there\" # note\n}\n",
    );
    let info = parse(Path::new("g.info"), src.as_bytes()).unwrap();
    assert_eq!(
        info.grids[0].location.as_deref(),
        Some("say \"hi\" \\ there")
    );
    // The bad IPv4 sits after two escapes; its column is the column in the file.
    let src = GOOD.replace("in_ip=10.0.1.20", "x=\\\"a b\\\" in_ip=10.0.1.999");
    let d = diags(&src);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("g.info:5:39: `in_ip`"), "{d:?}");
}

#[test]
fn unquoted_values_keep_hashes_inside_words_and_quotes() {
    // Issue 13: a `#` after a blank starts a comment, also at the end of a value line.
    let src = GOOD.replace("}\n", "  location = Rack#4 #  row 2\n}\n");
    let info = parse(Path::new("g.info"), src.as_bytes()).unwrap();
    assert_eq!(info.grids[0].location.as_deref(), Some("Rack#4"));
    let src = GOOD.replace("}\n", "  location = \"Rack #4\"\n}\n");
    let info = parse(Path::new("g.info"), src.as_bytes()).unwrap();
    assert_eq!(info.grids[0].location.as_deref(), Some("Rack #4"));
    let src = GOOD.replace("}\n", "  location =\t# only a comment\n}\n");
    assert!(diags(&src)[0].contains("`location` has no value after `=`"));
}

#[test]
fn inner_quotes_in_property_lists() {
    let src = GOOD.replace(
        "}\n",
        "  app_config = \"motd='hello \\\"world\\\"' tag=\\\"it's\\\" empty=\"\n}\n",
    );
    let info = parse(Path::new("g.info"), src.as_bytes()).unwrap();
    let g = &info.grids[0];
    assert_eq!(g.app("motd"), Some("hello \"world\""));
    assert_eq!(g.app("tag"), Some("it's"));
    assert_eq!(g.app("empty"), Some(""));
}

#[test]
fn too_large_is_refused_before_parsing() {
    let big = vec![b'#'; MAX_SIZE as usize + 1];
    let d = parse(Path::new("g.info"), &big).unwrap_err();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].line, d[0].col), (0, 0));
    assert!(d[0].message.starts_with("file is larger than 1 MiB"));
    // Exactly 1 MiB is allowed (and has no grid).
    let d = parse(Path::new("g.info"), &big[1..]).unwrap_err();
    assert!(d[0].message.starts_with("no grid defined"), "{d:?}");
}

#[test]
fn a_byte_order_mark_is_ignored() {
    let src = format!("\u{feff}{GOOD}");
    assert!(parse(Path::new("g.info"), src.as_bytes()).is_ok());
}

#[test]
fn header_problems_read_well_without_a_usable_id() {
    let d = diags("grid g.1: x\n");
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(
        d[0].starts_with("g.info:1:6: invalid grid id `g.1`"),
        "{d:?}"
    );
    assert!(
        d[1].starts_with("g.info:1:10: expected `{` after `grid ID:`"),
        "{d:?}"
    );
    assert!(
        d[2].starts_with("g.info:1:11: unexpected text after `grid ID:`"),
        "{d:?}"
    );
}

#[test]
fn garbage_is_capped() {
    let src = "x\n".repeat(500);
    let d = diags(&src);
    assert_eq!(d.len(), MAX_DIAGNOSTICS + 1);
    assert!(d.last().unwrap().contains("501 problems in all"), "{d:?}");
}
