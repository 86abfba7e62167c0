use super::*;

fn round_trip(c: Command) {
    let line = c.to_command_line();
    assert_eq!(Command::parse(&line).unwrap(), c, "{line}");
}

#[test]
fn every_verb_round_trips_through_its_command_line() {
    let n = |s: &str| AppName::new(s).unwrap();
    round_trip(Command::List { batch: true });
    round_trip(Command::Info {
        name: n("shop"),
        batch: false,
    });
    round_trip(Command::Provision {
        template: n("MigHelper"),
        name: n("mighelper-0123abcd"),
        props: vec![
            Prop::new("in_ip", "127.0.2.20").unwrap(),
            Prop::new("env", "a b 'c' \"d\" $(id) ; rm -rf /").unwrap(),
        ],
    });
    round_trip(Command::Stop { name: n("shop") });
    round_trip(Command::Migrate {
        remote: "root@127.0.1.1:2222".parse().unwrap(),
        app: n("shop"),
        new_name: n("shop2"),
        import: true,
        novols: false,
        nocompress: true,
        props: vec![Prop::new("in_ip", "127.0.2.10").unwrap()],
        progress_on_stdout: true,
        max_rate: None,
        stage: false,
        delta: false,
    });
    round_trip(Command::Migrate {
        remote: "127.0.1.1".parse().unwrap(),
        app: n("shop"),
        new_name: n("shop2"),
        import: true,
        novols: false,
        nocompress: false,
        props: vec![],
        progress_on_stdout: true,
        max_rate: Some(8 << 20),
        stage: false,
        delta: false,
    });
    for (stage, delta) in [(true, false), (false, true)] {
        round_trip(Command::Migrate {
            remote: "127.0.1.1:2222".parse().unwrap(),
            app: n("shop"),
            new_name: n("shop2"),
            import: true,
            novols: false,
            nocompress: false,
            props: vec![],
            progress_on_stdout: true,
            max_rate: None,
            stage,
            delta,
        });
    }
}

#[test]
fn the_bandwidth_limit_is_one_option_with_a_positive_number() {
    let c = Command::parse("app migrate g1 shop .name=shop2 --import --max_rate=8388608").unwrap();
    assert!(matches!(
        c,
        Command::Migrate {
            max_rate: Some(8388608),
            ..
        }
    ));
    assert!(c.to_command_line().contains("--max_rate=8388608"));
    for bad in [
        "--max_rate=",
        "--max_rate=0",
        "--max_rate=8M",
        "--max_rate=-1",
    ] {
        let e = Command::parse(&format!("app migrate g1 shop .name=s2 --import {bad}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max_rate"), "{bad}: {e}");
    }
    let e = Command::parse("app migrate g1 shop .name=s2 --max_rate=1 --max_rate=2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("given twice"), "{e}");
}

#[test]
fn stage_and_delta_are_two_runs_and_need_volumes() {
    for (line, want) in [
        (
            "app migrate g1 a .name=b --import --stage --delta",
            "two separate runs",
        ),
        (
            "app migrate g1 a .name=b --import --delta --novols",
            "do not go with --novols",
        ),
    ] {
        let e = Command::parse(line).unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
}

#[test]
fn the_dry_runs_forms_round_trip_and_check_takes_no_other_option() {
    round_trip(Command::Grid { batch: true });
    let check = Command::MigrateCheck {
        remote: "root@127.0.1.1:2222".parse().unwrap(),
        app: AppName::new("shop").unwrap(),
        new_name: AppName::new("shop2").unwrap(),
    };
    assert_eq!(
        check.to_command_line(),
        "app migrate root@127.0.1.1:2222 shop '.name=shop2' --import --check"
    );
    round_trip(check);
    for bad in [
        "app migrate g1 shop .name=shop2 --check",
        "app migrate g1 shop .name=shop2 --import --check --novols",
        "app migrate g1 shop .name=shop2 --import --check in_ip=1.2.3.4",
        "app grid extra",
    ] {
        assert!(Command::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_hostile_value_stays_one_argument() {
    let c = Command::Config {
        name: AppName::new("shop").unwrap(),
        props: vec![Prop::new("x", "$(id); rm -rf / `reboot`").unwrap()],
    };
    let line = c.to_command_line();
    assert_eq!(
        shell_words::split(&line).unwrap(),
        vec!["app", "config", "shop", "x=$(id); rm -rf / `reboot`"]
    );
}

#[test]
fn injection_in_names_is_refused() {
    for bad in [
        "x; rm -rf /",
        "$(id)",
        "`id`",
        "a b",
        "",
        "-rf",
        "1abc",
        "a/b",
    ] {
        assert!(AppName::new(bad).is_err(), "{bad:?} accepted");
    }
    assert!(matches!(
        Command::parse("app stop 'x; rm -rf /'"),
        Err(DialectError::Name(_))
    ));
    assert!(matches!(
        Command::parse("app info $(id)"),
        Err(DialectError::Name(_))
    ));
}

#[test]
fn anything_outside_the_dialect_is_refused() {
    for line in [
        "ls -la",
        "app",
        "app reboot",
        "app list extra",
        "app stop",
        "app migrate a b c",
        "app list --force",
        "app info shop --batch --batch",
        "app config shop novalue",
        "app config shop x=\"unterminated",
    ] {
        assert!(Command::parse(line).is_err(), "{line:?} accepted");
    }
}

#[test]
fn property_values_with_control_characters_are_refused() {
    assert!(Prop::new("x", "a\nb").is_err());
    assert!(Prop::new("x", "a\u{7f}").is_err());
    assert!(Prop::new("1x", "a").is_err());
    assert!(Prop::new(".name", "a").is_err());
    assert!(Prop::new("a.b_c", "with spaces and 'quotes'").is_ok());
}

#[test]
fn controller_addresses() {
    let c: Controller = "admin@grid-1.example:2222".parse().unwrap();
    assert_eq!(c.user.as_deref(), Some("admin"));
    assert_eq!(c.host, "grid-1.example");
    assert_eq!(c.port, Some(2222));
    assert_eq!(c.to_string(), "admin@grid-1.example:2222");
    let c: Controller = "10.0.0.5".parse().unwrap();
    assert_eq!((c.port_or_default(), c.user_or_default()), (22, "root"));
    for bad in [
        "",
        "h:0",
        "h:99999",
        "a b",
        "@h",
        "Root@h",
        "-oProxy=x",
        "h:",
    ] {
        assert!(bad.parse::<Controller>().is_err(), "{bad:?} accepted");
    }
}
