use super::*;

#[test]
fn list_output_parses_and_bad_lines_are_named() {
    let l = parse::list("shop\trunning\tkvstore\nh1\tstopped\tMigHelper\n\n").unwrap();
    assert_eq!(l.len(), 2);
    assert_eq!(l[1].name, "h1");
    assert_eq!(l[1].state, AppState::Stopped);
    assert_eq!(l[1].template, "MigHelper");
    assert!(parse::list("").unwrap().is_empty());
    let e = parse::list("shop\tsleeping\tkvstore\n").unwrap_err();
    assert!(e.contains("sleeping"), "{e}");
    let e = parse::list("shop running kvstore\n").unwrap_err();
    assert!(e.contains("got 1"), "{e}");
}

#[test]
fn info_output_parses_props_volumes_and_extras() {
    // As gridctl prints it.
    let out = "name\tshop\nstate\trunning\ntemplate\tkvstore\nerror\t\nprop.in_ip\t127.0.1.10\n\
                   prop.env\ta b = c\nvolume.data\t67108864\nvolume.data.kind\tfile\n";
    let i = parse::info(out).unwrap();
    assert_eq!(i.name, "shop");
    assert_eq!(i.state, AppState::Running);
    assert_eq!(i.prop("env"), Some("a b = c"));
    assert_eq!(i.volumes, vec![("data".to_string(), 67108864)]);
    assert_eq!(i.error, None);
    assert_eq!(
        i.extra,
        vec![("volume.data.kind".to_string(), "file".to_string())]
    );
    let failed = parse::info("name\tx\nstate\tfailed\ntemplate\tt\nerror\tweb exited 1\n").unwrap();
    assert_eq!(failed.error.as_deref(), Some("web exited 1"));
    assert!(parse::info("name\tshop\nstate\trunning\n")
        .unwrap_err()
        .contains("template"));
    assert!(
        parse::info("name\tshop\nstate\trunning\ntemplate\tt\nvolume.d\tbig\n")
            .unwrap_err()
            .contains("volume d")
    );
}

#[test]
fn checksum_output_requires_a_blake3_digest() {
    let hex = "ab".repeat(32);
    let c = parse::checksum(&format!("data\t1024\tblake3:{hex}\n")).unwrap();
    assert_eq!(
        c,
        vec![VolumeChecksum {
            volume: "data".into(),
            size: 1024,
            blake3: hex
        }]
    );
    assert!(parse::checksum("data\t1024\tsha256:00\n").is_err());
    assert!(parse::checksum("data\t1024\tblake3:xyz\n").is_err());
}

#[test]
fn progress_lines() {
    assert_eq!(parse::progress("progress 10 100"), Some((10, 100)));
    assert_eq!(parse::progress("progress 10"), None);
    assert_eq!(parse::progress("copying data"), None);
    assert_eq!(parse::progress("progress 1 2 3"), None);
}

#[test]
fn commands_refuse_bad_names_and_values() {
    assert!(matches!(
        commands::stop("x; rm -rf /"),
        Err(DialectError::Name(_))
    ));
    assert!(commands::provision("kvstore", "shop", &[("x".into(), "a\nb".into())]).is_err());
    let bad_remote = Controller {
        user: None,
        host: "-oProxyCommand=id".into(),
        port: None,
    };
    assert!(
        commands::migrate_import(&bad_remote, "shop", "shop2", &[], MigrateOptions::default())
            .is_err()
    );
}

#[test]
fn errors_say_what_to_do() {
    let e = GridError::UnknownHostKey {
        addr: "root@127.0.1.1:2222".into(),
        host: "127.0.1.1".into(),
        port: 2222,
        fingerprint: "SHA256:abc".into(),
        known_hosts: "/cfg/known_hosts".into(),
    };
    let m = e.to_string();
    assert!(m.contains("SHA256:abc"), "{m}");
    assert!(
        m.contains("ssh-keyscan -p 2222 127.0.1.1 >> /cfg/known_hosts"),
        "{m}"
    );
    let e = GridError::Command {
        addr: "g".into(),
        command: "app stop shop".into(),
        exit_code: Some(2),
        status: "exited with code 2".into(),
        stderr: "no such application\n".into(),
    };
    assert!(e.is_refused());
    assert_eq!(
        e.to_string(),
        "grid controller g: `app stop shop` exited with code 2: no such application"
    );
}
