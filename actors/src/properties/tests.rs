use super::*;

fn load_with(
    dir: &Path,
    env: &[(&str, &str)],
    sets: &[&str],
) -> Result<Properties, Vec<PropertyError>> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    load(dir, env, &sets)
}

fn one_error(dir: &Path, env: &[(&str, &str)], sets: &[&str]) -> String {
    let errs = load_with(dir, env, sets).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs[0].to_string()
}

#[test]
fn defaults_are_the_appliance_documented_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = load_with(dir.path(), &[], &[]).unwrap();
    assert_eq!(p.username, "");
    assert!(p.password.is_empty());
    assert!(!p.auth_required());
    assert_eq!(p.mode, Mode::Both);
    assert_eq!(p.port_no, 8080);
    assert_eq!(p.private_key_file, dir.path().join("private.key"));
    assert_eq!(p.grid_info_file, dir.path().join("grid.info"));
    assert_eq!(p.known_hosts_file, dir.path().join("known_hosts"));
    assert_eq!(p.aux, None);
    assert!(p.passthrough.is_empty());
    assert_eq!(p.grid, None);
    assert_eq!(p.state_dir, PathBuf::from("/var/lib/mig/state"));
    assert_eq!(p.idle_timeout, None);
    assert_eq!(p.max_connections_per_client, 256);
    // Every documented name is in the defaults, and nothing else is.
    let map = config::File::from_str(DEFAULTS, FileFormat::Toml)
        .collect()
        .unwrap();
    let mut keys: Vec<_> = map.keys().cloned().collect();
    let mut names: Vec<_> = NAMES.iter().map(|s| s.to_string()).collect();
    keys.sort();
    names.sort();
    assert_eq!(keys, names);
}

#[test]
fn each_layer_overrides_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(FILE_NAME),
        "port_no = 8081\nmode = \"migrate\"\n",
    )
    .unwrap();
    let p = load_with(dir.path(), &[], &[]).unwrap();
    assert_eq!((p.port_no, p.mode), (8081, Mode::Migrate));
    let p = load_with(dir.path(), &[("MIG_PORT_NO", "8082")], &[]).unwrap();
    assert_eq!((p.port_no, p.mode), (8082, Mode::Migrate));
    let p = load_with(dir.path(), &[("MIG_PORT_NO", "8082")], &["port_no=8083"]).unwrap();
    assert_eq!(p.port_no, 8083);
    // The last --set of the same name wins.
    let p = load_with(dir.path(), &[], &["mode=snapshot", "mode=both"]).unwrap();
    assert_eq!(p.mode, Mode::Both);
}

#[test]
fn a_bad_value_names_property_layer_value_and_what_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        one_error(dir.path(), &[("MIG_MODE", "copy")], &[]),
        r#"mode = "copy" (from MIG_MODE): must be migrate, snapshot or both"#
    );
    assert_eq!(
        one_error(dir.path(), &[], &["port_no=http"]),
        r#"port_no = "http" (from --set): must be a port number from 1 to 65535 (0 lets the system pick one)"#
    );
    std::fs::write(dir.path().join(FILE_NAME), "listen = \"10.0.0.300\"\n").unwrap();
    let e = one_error(dir.path(), &[], &[]);
    assert!(
        e.starts_with(&format!(
            "listen = \"10.0.0.300\" (from {}): must be an IP address",
            dir.path().join(FILE_NAME).display()
        )),
        "{e}"
    );
}

#[test]
fn bad_values_per_property() {
    let dir = tempfile::tempdir().unwrap();
    for (set, fragment) in [
        ("username=a:b", "must not contain ':'"),
        ("mon_port=70000", "port number"),
        ("private_key_file=", "must name a file"),
        ("aux=not a host", "host name or an IP"),
        ("aux=-bad.example", "host name or an IP"),
        ("passthrough=80,abc", "'abc' in item 2 is not a port number"),
        ("passthrough=90-80", "runs backwards"),
        ("passthrough=0", "is not a port"),
        ("grid=g 1", "must be a grid id"),
        ("max_connections=0", "from 1 to 1000000"),
        ("max_connections_per_client=0", "from 1 to 1000000"),
        ("max_connections_per_client=", "from 1 to 1000000"),
        ("max_connections_per_client=many", "from 1 to 1000000"),
        ("connect_timeout=0", "more than 0 seconds"),
        ("idle_timeout=-1", "whole number of seconds"),
        ("drain_timeout=1.5", "whole number of seconds"),
        ("otlp_endpoint=collector:4318", "http:// or https:// URL"),
        (
            "allowed_hosts=mig.example,evil example",
            "\"evil example\" is not a host name",
        ),
        (
            "allowed_hosts=mig.example:0",
            "is not a host name, an IP address",
        ),
        ("allowed_hosts=[::1", "is not a host name"),
        ("passthrough=8000-8080", "includes the GUI port 8080"),
        ("passthrough=9480", "includes the mon port 9480"),
        ("mon_port=8080", "same as port_no"),
        ("max_rate=8X", "bytes per second"),
        ("max_rate=fast", "bytes per second"),
        ("max_rate=0", "more than 0"),
        ("max_rate=-8M", "bytes per second"),
        (
            "webhook_url=ftp://x.example/h",
            "not an http:// or https:// URL",
        ),
        ("webhook_url=http://a.example/h", "webhook_secret is empty"),
    ] {
        let e = one_error(dir.path(), &[], &[set]);
        assert!(e.contains(fragment), "{set}: {e}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let errs = load_with(dir.path(), &[("MIG_MODE", "x")], &["port_no=x", "aux=a b"]).unwrap_err();
    let names: Vec<_> = errs.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["mode", "port_no", "aux"]);
}

#[test]
fn unknown_names_in_file_or_set_suggest_a_close_one() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        one_error(dir.path(), &[], &["port=8081"]),
        "port (from --set): unknown property; did you mean `port_no`?"
    );
    std::fs::write(dir.path().join(FILE_NAME), "pasthrough = \"80\"\n").unwrap();
    let e = one_error(dir.path(), &[], &[]);
    assert!(
        e.ends_with("unknown property; did you mean `passthrough`?"),
        "{e}"
    );
    std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
    let e = one_error(dir.path(), &[], &["zzz=1"]);
    assert!(e.contains("known ones are username, password"), "{e}");
    assert_eq!(
        one_error(dir.path(), &[], &["mode"]),
        "mode (from --set): expected NAME=VALUE"
    );
    // Other programs' MIG_* variables are not ours to judge.
    assert!(load_with(dir.path(), &[("MIG_HELPER_ENV", "x")], &[]).is_ok());
}

#[test]
fn a_malformed_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), "port_no = = 3\n").unwrap();
    let e = one_error(dir.path(), &[], &[]);
    assert!(e.starts_with("mig.toml (from "), "{e}");
    assert!(e.contains("cannot read"), "{e}");
    std::fs::write(dir.path().join(FILE_NAME), "[aux]\nhost = \"x\"\n").unwrap();
    let e = one_error(dir.path(), &[], &[]);
    assert!(e.contains("must be a single value"), "{e}");
}

#[test]
fn relative_files_resolve_against_the_config_dir_and_absolute_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let p = load_with(
        dir.path(),
        &[],
        &[
            "private_key_file=keys/id",
            "grid_info_file=/etc/mig/grid.info",
        ],
    )
    .unwrap();
    assert_eq!(p.private_key_file, dir.path().join("keys/id"));
    assert_eq!(p.grid_info_file, PathBuf::from("/etc/mig/grid.info"));
}

#[test]
fn the_password_is_never_shown() {
    let p = Properties {
        password: Secret::new("hunter2"),
        ..load_with(Path::new("/x"), &[], &[]).unwrap()
    };
    assert!(!format!("{p:?}").contains("hunter2"));
    let e = PropertyError {
        name: "password".into(),
        origin: Origin::Set,
        given: Some("hunter2".into()),
        problem: "x".into(),
    };
    assert!(!e.to_string().contains("hunter2"));
}

#[test]
fn allowed_hosts_are_names_or_addresses_with_an_optional_port() {
    let dir = tempfile::tempdir().unwrap();
    let p = load_with(dir.path(), &[], &[]).unwrap();
    assert!(p.allowed_hosts.is_empty());
    let p = load_with(
        dir.path(),
        &[],
        &["allowed_hosts= MIG.Example.NET , 10.0.1.10:8080,[FE80::1]:81,::1,"],
    )
    .unwrap();
    let got: Vec<_> = p
        .allowed_hosts
        .iter()
        .map(|a| (a.host.as_str(), a.port))
        .collect();
    assert_eq!(
        got,
        [
            ("mig.example.net", None),
            ("10.0.1.10", Some(8080)),
            ("fe80::1", Some(81)),
            ("::1", None)
        ]
    );
}

#[test]
fn rates_take_k_m_g_suffixes_and_empty_means_no_limit() {
    assert_eq!(parse_rate(""), Ok(None));
    assert_eq!(parse_rate(" "), Ok(None));
    assert_eq!(parse_rate("1"), Ok(Some(1)));
    assert_eq!(parse_rate("512k"), Ok(Some(512 << 10)));
    assert_eq!(parse_rate("8M"), Ok(Some(8 << 20)));
    assert_eq!(parse_rate("2G"), Ok(Some(2 << 30)));
    assert_eq!(parse_rate("1024G"), Ok(Some(1 << 40)));
    for bad in [
        "0",
        "0M",
        "M",
        "8MB",
        "1.5M",
        "8 M",
        "-1",
        "1025G",
        "99999999999999999999",
    ] {
        assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
    }
    let dir = tempfile::tempdir().unwrap();
    let p = load_with(dir.path(), &[], &[]).unwrap();
    assert_eq!(p.max_rate, None);
    let p = load_with(dir.path(), &[("MIG_MAX_RATE", "8M")], &[]).unwrap();
    assert_eq!(p.max_rate, Some(8 << 20));
}

#[test]
fn webhooks_take_several_urls_and_need_a_secret_that_is_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let p = load_with(
        dir.path(),
        &[],
        &[
            "webhook_url=http://a.example/h, https://b.example:8443/x?y=1",
            "webhook_secret=s3cret-value",
        ],
    )
    .unwrap();
    assert_eq!(
        p.webhook_url,
        ["http://a.example/h", "https://b.example:8443/x?y=1"]
    );
    assert_eq!(p.webhook_secret.expose(), "s3cret-value");
    assert!(!format!("{p:?}").contains("s3cret-value"));
    let e = PropertyError {
        name: "webhook_secret".into(),
        origin: Origin::Set,
        given: Some("s3cret-value".into()),
        problem: "x".into(),
    };
    assert!(!e.to_string().contains("s3cret-value"));
}

#[test]
fn precopy_is_on_by_default_and_only_on_or_off() {
    let dir = tempfile::tempdir().unwrap();
    assert!(load_with(dir.path(), &[], &[]).unwrap().precopy);
    assert!(
        !load_with(dir.path(), &[], &["precopy=off"])
            .unwrap()
            .precopy
    );
    assert_eq!(
        one_error(dir.path(), &[], &["precopy=yes"]),
        r#"precopy = "yes" (from --set): must be on or off"#
    );
}

#[test]
fn mode_allows() {
    assert!(Mode::Both.allows("migrate") && Mode::Both.allows("snapshot"));
    assert!(Mode::Migrate.allows("migrate") && !Mode::Migrate.allows("snapshot"));
    assert!(!Mode::Snapshot.allows("migrate") && !Mode::Both.allows("copy"));
}

#[test]
fn proxy_path_is_auto_by_default_and_one_of_four() {
    let dir = tempfile::tempdir().unwrap();
    let p = load_with(dir.path(), &[], &[]).unwrap();
    assert_eq!(p.proxy_path, proxy::ProxyPath::Auto);
    for (set, want) in [
        ("proxy_path=sockmap", proxy::ProxyPath::Sockmap),
        ("proxy_path=splice", proxy::ProxyPath::Splice),
        ("proxy_path=copy", proxy::ProxyPath::Copy),
    ] {
        assert_eq!(load_with(dir.path(), &[], &[set]).unwrap().proxy_path, want);
    }
    assert_eq!(
        one_error(dir.path(), &[], &["proxy_path=fast"]),
        r#"proxy_path = "fast" (from --set): 'fast' is not a pass-through path (use auto, sockmap, splice or copy)"#
    );
}
