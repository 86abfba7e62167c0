//! MIG's SSH client against a real OpenSSH sshd on loopback (see `common`): every verb, the exact
//! line that reaches the controller, progress streaming, and each failure's own clear error.

mod common;

use std::fs;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actors::controller::{GridController, GridError, MigrateOptions};
use actors::ssh::SshGrid;
use common::{FakeGrid, FAKE_BLAKE3, HOST};
use dialect::{AppName, AppState, Command, Controller, Prop};

fn n(s: &str) -> AppName {
    AppName::new(s).unwrap()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn props(p: &[(&str, &str)]) -> Vec<Prop> {
    p.iter().map(|(a, b)| Prop::new(a, b).unwrap()).collect()
}

#[tokio::test]
async fn every_verb_round_trips_and_the_controller_gets_exactly_the_quoted_line() {
    let g = FakeGrid::start();
    let c = g.client();
    let mut expected = Vec::new();

    let apps = c.list().await.unwrap();
    expected.push(Command::List { batch: true });
    assert_eq!(apps.len(), 2);
    assert_eq!(
        (
            apps[0].name.as_str(),
            apps[0].state,
            apps[0].template.as_str()
        ),
        ("shop", AppState::Running, "kvstore")
    );
    assert_eq!(apps[1].state, AppState::Stopped);

    let info = c.info("shop").await.unwrap();
    expected.push(Command::Info {
        name: n("shop"),
        batch: true,
    });
    assert_eq!(info.name, "shop");
    assert_eq!(info.state, AppState::Stopped);
    assert_eq!(info.template, "kvstore");
    assert_eq!(info.prop("in_ip"), Some("127.0.1.10"));
    assert_eq!(info.volumes, vec![("data".to_string(), 67108864)]);

    let p = [("in_ip", "127.0.2.20"), ("env", "k=v with spaces")];
    c.provision("MigHelper", "helper1", &pairs(&p))
        .await
        .unwrap();
    expected.push(Command::Provision {
        template: n("MigHelper"),
        name: n("helper1"),
        props: props(&p),
    });
    c.start("shop").await.unwrap();
    expected.push(Command::Start { name: n("shop") });
    c.stop("shop").await.unwrap();
    expected.push(Command::Stop { name: n("shop") });
    c.destroy("shop").await.unwrap();
    expected.push(Command::Destroy { name: n("shop") });
    c.config("shop", &pairs(&[("port", "8001")])).await.unwrap();
    expected.push(Command::Config {
        name: n("shop"),
        props: props(&[("port", "8001")]),
    });

    let sums = c.checksum("shop").await.unwrap();
    expected.push(Command::Checksum { name: n("shop") });
    assert_eq!(sums.len(), 1);
    assert_eq!(
        (
            sums[0].volume.as_str(),
            sums[0].size,
            sums[0].blake3.as_str()
        ),
        ("data", 67108864, FAKE_BLAKE3)
    );

    let remote: Controller = "root@127.0.1.1:2222".parse().unwrap();
    let mut last = (0, 0);
    c.migrate_import(
        &remote,
        "shop",
        "shop2",
        &pairs(&[("in_ip", "127.0.2.10")]),
        MigrateOptions {
            nocompress: true,
            max_rate: Some(4 << 20),
            ..Default::default()
        },
        &mut |d, t| last = (d, t),
    )
    .await
    .unwrap();
    assert_eq!(last, (1024, 1024));
    expected.push(Command::Migrate {
        remote,
        app: n("shop"),
        new_name: n("shop2"),
        import: true,
        novols: false,
        nocompress: true,
        max_rate: Some(4 << 20),
        props: props(&[("in_ip", "127.0.2.10")]),
        progress_on_stdout: true,
        stage: false,
        delta: false,
    });

    let sent: Vec<String> = expected.iter().map(Command::to_command_line).collect();
    assert_eq!(g.logged(), sent);
    // And the controller parses each line back into the very command MIG meant.
    for (line, cmd) in g.logged().iter().zip(&expected) {
        assert_eq!(&Command::parse(line).unwrap(), cmd);
    }
}

#[tokio::test]
async fn concurrent_commands_each_get_their_own_answer() {
    let g = FakeGrid::start();
    let c = g.client();
    let names: Vec<String> = (0..8).map(|i| format!("app{i}")).collect();
    let infos = join_all_in_one_task(names.iter().map(|name| c.info(name))).await;
    for (name, info) in names.iter().zip(infos) {
        assert_eq!(&info.unwrap().name, name);
    }
    assert_eq!(g.logged().len(), 8);
}

/// Polls all futures in this one task, as an actor's arbiter interleaves its spawned futures.
async fn join_all_in_one_task<F: std::future::Future>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut set: Vec<_> = fs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in set.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn a_hostile_property_value_arrives_as_one_literal_argument() {
    let g = FakeGrid::start();
    let pwned = g.path("pwned");
    let hostile = format!(
        "$(id); rm -rf / `touch {0}` $(touch {0}) ' \" \\",
        pwned.display()
    );
    g.client()
        .config("shop", &pairs(&[("x", &hostile)]))
        .await
        .unwrap();
    let logged = g.logged();
    assert_eq!(logged.len(), 1);
    assert_eq!(
        shell_words::split(&logged[0]).unwrap(),
        vec![
            "app".to_string(),
            "config".into(),
            "shop".into(),
            format!("x={hostile}")
        ]
    );
    assert!(!pwned.exists(), "a command in a property value ran");
}

#[tokio::test]
async fn injection_in_names_is_refused_before_any_connection() {
    let g = FakeGrid::start();
    let c = g.client();
    let remote: Controller = "root@127.0.1.1:2222".parse().unwrap();
    for bad in ["x; rm -rf /", "$(id)", "`id`", "a b", "-rf", ""] {
        let results = [
            c.info(bad).await.map(drop),
            c.stop(bad).await,
            c.provision(bad, "ok", &[]).await,
            c.provision("kvstore", bad, &[]).await,
            c.config("shop", &pairs(&[(bad, "v")])).await,
            c.migrate_import(
                &remote,
                "shop",
                bad,
                &[],
                MigrateOptions::default(),
                &mut |_, _| {},
            )
            .await,
        ];
        for r in results {
            match r {
                Err(GridError::Invalid(e)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!("{bad:?}")),
                        "{msg} does not name {bad:?}"
                    );
                }
                other => panic!("{bad:?}: expected Invalid, got {other:?}"),
            }
        }
    }
    // A value with a newline, and a remote controller address built around the parser.
    let r = c.config("shop", &pairs(&[("x", "a\nb")])).await;
    assert!(matches!(r, Err(GridError::Invalid(_))), "{r:?}");
    let bad_remote = Controller {
        user: None,
        host: "h -oProxyCommand=id".into(),
        port: None,
    };
    let r = c
        .migrate_import(
            &bad_remote,
            "shop",
            "shop2",
            &[],
            MigrateOptions::default(),
            &mut |_, _| {},
        )
        .await;
    assert!(matches!(r, Err(GridError::Invalid(_))), "{r:?}");
    assert!(g.logged().is_empty(), "sent: {:?}", g.logged());
    assert!(
        !g.sshd_log().contains("Accepted publickey"),
        "a session was opened"
    );
}

#[tokio::test]
async fn migrate_progress_streams_as_it_arrives() {
    let g = FakeGrid::start();
    let seen: Arc<Mutex<Vec<(Instant, u64, u64)>>> = Arc::default();
    let s = seen.clone();
    g.client()
        .migrate_import(
            &"127.0.1.1:2222".parse().unwrap(),
            "shop",
            "shop2",
            &[],
            MigrateOptions::default(),
            &mut |d, t| s.lock().unwrap().push((Instant::now(), d, t)),
        )
        .await
        .unwrap();
    let ended = Instant::now();
    let seen = seen.lock().unwrap();
    let values: Vec<(u64, u64)> = seen.iter().map(|&(_, d, t)| (d, t)).collect();
    assert_eq!(
        values,
        vec![(256, 1024), (512, 1024), (768, 1024), (1024, 1024)]
    );
    // The fake sleeps 0.4 s after each line: had we waited for the end, all would arrive at once.
    let early = seen
        .iter()
        .filter(|(at, _, _)| ended.duration_since(*at) >= Duration::from_millis(600))
        .count();
    assert!(early >= 2, "only {early} updates arrived before the end");
}

#[tokio::test]
async fn a_silent_migration_times_out_on_idleness() {
    let g = FakeGrid::start();
    let c = g
        .client()
        .with_migrate_idle_timeout(Duration::from_millis(1500));
    let mut updates = 0;
    let t = Instant::now();
    let r = c
        .migrate_import(
            &"127.0.1.1:2222".parse().unwrap(),
            "stalls",
            "shop2",
            &[],
            MigrateOptions::default(),
            &mut |_, _| updates += 1,
        )
        .await;
    assert!(matches!(r, Err(GridError::Timeout { .. })), "{r:?}");
    assert_eq!(updates, 1);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_failed_command_carries_exit_code_and_stderr() {
    let g = FakeGrid::start();
    let c = g.client();
    let e = c.stop("failing").await.unwrap_err();
    match &e {
        GridError::Command {
            exit_code, stderr, ..
        } => {
            assert_eq!(*exit_code, Some(1));
            assert!(stderr.contains("application failing is not stopped"));
        }
        other => panic!("expected Command, got {other:?}"),
    }
    assert!(!e.is_refused());
    let msg = e.to_string();
    assert!(msg.contains(&g.controller().to_string()), "{msg}");
    assert!(msg.contains("app stop failing"), "{msg}");
    assert!(msg.contains("exited with code 1"), "{msg}");

    let e = c.destroy("refused").await.unwrap_err();
    assert!(e.is_refused(), "{e}");
    assert!(e.to_string().contains("no such application"), "{e}");
}

#[tokio::test]
async fn a_command_killed_by_a_signal_or_a_dropped_connection_is_never_success() {
    let g = FakeGrid::start();
    let c = g.client();
    let e = c.stop("killed").await.unwrap_err();
    match &e {
        GridError::Command {
            exit_code, status, ..
        } => {
            assert_eq!(*exit_code, None);
            assert!(status.contains("signal TERM"), "{status}");
        }
        other => panic!("expected Command, got {other:?}"),
    }
    let e = c.stop("dropped").await.unwrap_err();
    assert!(matches!(e, GridError::Session { .. }), "{e:?}");
}

#[tokio::test]
async fn secrets_in_properties_stay_out_of_error_messages() {
    let g = FakeGrid::start();
    let e = g
        .client()
        .provision(
            "failing",
            "helper1",
            &pairs(&[("in_ip", "127.0.2.20"), ("env", "k_op=c0ffee")]),
        )
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("in_ip=127.0.2.20"), "{msg}");
    assert!(!msg.contains("c0ffee"), "{msg}");
    // The controller itself got the real value.
    assert!(g.logged()[0].contains("env=k_op=c0ffee"));
}

#[tokio::test]
async fn unparseable_output_is_a_parse_error_naming_the_command() {
    let g = FakeGrid::start();
    let e = g.client().info("broken").await.unwrap_err();
    assert!(matches!(e, GridError::Parse { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("app info broken --batch"), "{msg}");
}

#[tokio::test]
async fn a_command_that_hangs_times_out() {
    let g = FakeGrid::start();
    let c = g
        .client()
        .with_timeouts(Duration::from_secs(3), Duration::from_secs(1));
    let t = Instant::now();
    let e = c.start("slow").await.unwrap_err();
    assert!(
        matches!(&e, GridError::Timeout { after, .. } if *after == Duration::from_secs(1)),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(e.to_string().contains("timed out after 1s"), "{e}");
}

#[tokio::test]
async fn an_unknown_host_key_is_refused_with_its_fingerprint_and_how_to_trust_it() {
    let g = FakeGrid::start();
    let expected_fp = common::fingerprint(&g.host_key_pub);
    for known_hosts in [g.path("empty_known_hosts"), g.path("missing_known_hosts")] {
        if known_hosts.ends_with("empty_known_hosts") {
            fs::write(&known_hosts, "# nothing trusted yet\n").unwrap();
        }
        let c = SshGrid::new(g.controller(), &g.client_key, &known_hosts)
            .with_timeouts(Duration::from_secs(10), Duration::from_secs(20));
        let t = Instant::now();
        let e = c.list().await.unwrap_err();
        // Refused, not timed out: well inside the connect timeout (generous for a loaded machine).
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        match &e {
            GridError::UnknownHostKey { fingerprint, .. } => assert_eq!(fingerprint, &expected_fp),
            other => panic!("expected UnknownHostKey, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&expected_fp), "{msg}");
        let advice = format!(
            "ssh-keyscan -p {} {HOST} >> {}",
            g.port,
            known_hosts.display()
        );
        assert!(msg.contains(&advice), "{msg}");
    }
    assert!(g.logged().is_empty(), "a command ran on an untrusted host");

    // Following the advice makes the controller trusted.
    let known_hosts = g.path("missing_known_hosts");
    let scan = std::process::Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &g.port.to_string(), HOST])
        .output()
        .unwrap();
    assert!(scan.status.success());
    fs::write(&known_hosts, &scan.stdout).unwrap();
    let c = SshGrid::new(g.controller(), &g.client_key, &known_hosts);
    assert_eq!(c.list().await.unwrap().len(), 2);

    // Hashed host names (HashKnownHosts, Debian's default for `ssh`) are matched too.
    let st = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&known_hosts)
        .output()
        .unwrap();
    assert!(st.status.success());
    let hashed = fs::read_to_string(&known_hosts).unwrap();
    assert!(
        hashed.starts_with("|1|") && !hashed.contains(HOST),
        "{hashed}"
    );
    assert_eq!(c.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_changed_host_key_is_refused() {
    let g = FakeGrid::start();
    let other = g.path("other_host_key");
    common::keygen(&other);
    let pinned = fs::read_to_string(g.path("other_host_key.pub")).unwrap();
    let known_hosts = g.path("stale_known_hosts");
    // A line libssh2 cannot read must not hide the pinned key after it.
    fs::write(
        &known_hosts,
        format!(
            "@cert-authority *.example ssh-ed25519 AAAAgarbage\n[{HOST}]:{} {pinned}",
            g.port
        ),
    )
    .unwrap();
    let c = SshGrid::new(g.controller(), &g.client_key, &known_hosts)
        .with_timeouts(Duration::from_secs(10), Duration::from_secs(20));
    let e = c.stop("shop").await.unwrap_err();
    match &e {
        GridError::HostKeyChanged { fingerprint, .. } => {
            assert_eq!(fingerprint, &common::fingerprint(&g.host_key_pub))
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    assert!(e.to_string().contains("ssh-keygen -R"), "{e}");
    assert!(g.logged().is_empty(), "a command ran on an impostor");
}

#[tokio::test]
async fn the_host_key_type_pinned_in_known_hosts_is_the_one_negotiated() {
    // `ssh` writes only the key type it negotiated; another client preferring another type must
    // not mistake that for a changed key.
    let g = FakeGrid::start();
    let ecdsa = fs::read_to_string(g.path("host_key_ecdsa.pub")).unwrap();
    let known_hosts = g.path("ecdsa_only_known_hosts");
    fs::write(&known_hosts, format!("[{HOST}]:{} {ecdsa}", g.port)).unwrap();
    let c = SshGrid::new(g.controller(), &g.client_key, &known_hosts);
    assert_eq!(c.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_key_the_controller_does_not_authorize_is_an_auth_error() {
    let g = FakeGrid::start();
    let wrong = g.path("wrong_key");
    common::keygen(&wrong);
    let c = SshGrid::new(g.controller(), &wrong, &g.known_hosts)
        .with_timeouts(Duration::from_secs(10), Duration::from_secs(20));
    let t = Instant::now();
    let e = c.list().await.unwrap_err();
    // Refused, not timed out: well inside the connect timeout (generous for a loaded machine).
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    match &e {
        GridError::Auth { user, key_file, .. } => {
            assert_eq!(user, "root");
            assert_eq!(key_file, &wrong);
        }
        other => panic!("expected Auth, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("refused key {} for user root", wrong.display())),
        "{msg}"
    );
    // The key's contents never appear in the message.
    let secret = fs::read_to_string(&wrong).unwrap();
    let body = secret.lines().nth(1).unwrap();
    assert!(!msg.contains(body));

    let missing = g.path("no_such_key");
    let e = SshGrid::new(g.controller(), &missing, &g.known_hosts)
        .list()
        .await
        .unwrap_err();
    assert!(matches!(e, GridError::Key { .. }), "{e:?}");
    assert!(e.to_string().contains("no_such_key"), "{e}");

    // A file that is no key, and a key with a passphrase (MIG's key must have none).
    let garbage = g.path("garbage_key");
    fs::write(&garbage, "not a key\n").unwrap();
    let locked = g.path("locked_key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "sesame", "-f"])
        .arg(&locked)
        .status()
        .unwrap();
    assert!(st.success());
    fs::copy(g.path("locked_key.pub"), g.path("authorized_keys")).unwrap();
    for key in [&garbage, &locked] {
        let e = SshGrid::new(g.controller(), key, &g.known_hosts)
            .list()
            .await
            .unwrap_err();
        assert!(matches!(e, GridError::Key { .. }), "{e:?}");
    }
    assert!(g.logged().is_empty());
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error_at_once() {
    let port = common::free_port();
    let c = SshGrid::new(
        format!("{HOST}:{port}").parse().unwrap(),
        "/nonexistent/key",
        "/nonexistent/known_hosts",
    )
    .with_timeouts(Duration::from_secs(10), Duration::from_secs(20));
    let t = Instant::now();
    let e = c.list().await.unwrap_err();
    // Refused at once, not timed out (generous for a loaded machine).
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    match &e {
        GridError::Connect { addr, reason } => {
            assert_eq!(addr, &format!("root@{HOST}:{port}"));
            assert!(reason.contains("refused"), "{reason}");
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

/// A listener that accepts connections and holds them open without a word (a hung or wrong
/// server): its port, the task that holds them, and how many it accepted.
async fn silent_listener() -> (u16, tokio::task::JoinHandle<()>, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind((HOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(Mutex::new(0usize));
    let count = accepted.clone();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            *count.lock().unwrap() += 1;
            held.push(s);
        }
    });
    (port, hold, accepted)
}

#[tokio::test]
async fn a_listener_that_never_speaks_ssh_times_out_within_the_connect_timeout() {
    let (port, hold, _) = silent_listener().await;
    let c = SshGrid::new(
        format!("{HOST}:{port}").parse().unwrap(),
        "/nonexistent/key",
        "/nonexistent/known_hosts",
    )
    .with_timeouts(Duration::from_millis(1500), Duration::from_secs(10));
    let t = Instant::now();
    let e = c.list().await.unwrap_err();
    let took = t.elapsed();
    assert!(
        // It gives up at the configured timeout: not before, and not never (the upper bound is
        // generous for a loaded machine).
        took >= Duration::from_millis(1400) && took < Duration::from_secs(10),
        "{took:?}"
    );
    match &e {
        GridError::Connect { reason, .. } => {
            assert!(reason.contains("no SSH handshake within 1.5s"), "{reason}")
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    hold.abort();
}

#[tokio::test]
async fn the_commands_of_an_operation_share_one_ssh_session() {
    let g = FakeGrid::start();
    let c = g.client();
    c.list().await.unwrap();
    c.info("shop").await.unwrap();
    c.stop("shop").await.unwrap();
    // A failed command leaves the session as good as a successful one.
    c.stop("failing").await.unwrap_err();
    // Clones (one per actor or step that asks for the grid) share the same session.
    let again = c.clone();
    again.start("shop").await.unwrap();
    again.checksum("shop").await.unwrap();
    assert_eq!(g.logged().len(), 6, "every command still ran");
    assert_eq!(
        g.logins(),
        1,
        "one login for six commands:\n{}",
        g.sshd_log()
    );
}

#[tokio::test]
async fn every_actor_reaching_a_controller_through_ssh_connect_shares_its_session() {
    use actors::runner::{Connect, SshConnect};
    let g = FakeGrid::start();
    let connect = SshConnect {
        key_file: g.client_key.clone(),
        known_hosts: g.known_hosts.clone(),
        grids: Default::default(),
    };
    let addr = g.controller().to_string();
    // As the Source's check, its provisioning step, and the Target's clean-up each ask.
    for _ in 0..3 {
        let grid = connect.connect(&addr).unwrap();
        grid.list().await.unwrap();
    }
    assert_eq!(g.logged().len(), 3);
    assert_eq!(g.logins(), 1, "{}", g.sshd_log());
}

#[tokio::test]
async fn a_dropped_session_is_reopened_without_the_caller_noticing() {
    let g = FakeGrid::start();
    let c = g.client();
    c.list().await.unwrap();
    g.drop_connections();
    // The pooled session is dead: the next command logs in again and runs once.
    assert_eq!(c.list().await.unwrap().len(), 2);
    c.stop("shop").await.unwrap();
    assert_eq!(
        g.logged(),
        ["app list --batch", "app list --batch", "app stop shop"]
    );
    assert_eq!(g.logins(), 2, "{}", g.sshd_log());
}

#[tokio::test]
async fn a_changed_host_key_is_refused_when_the_session_is_reopened() {
    let mut g = FakeGrid::start();
    let c = g.client();
    c.list().await.unwrap();
    let impostor = g.path("impostor_key");
    common::keygen(&impostor);
    g.restart_with_host_key(&impostor);
    let e = c.stop("shop").await.unwrap_err();
    match &e {
        GridError::HostKeyChanged { fingerprint, .. } => {
            assert_eq!(
                fingerprint,
                &common::fingerprint(&g.path("impostor_key.pub"))
            )
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    assert_eq!(
        g.logged(),
        ["app list --batch"],
        "a command ran on an impostor"
    );
    // And it stays refused: no session was kept from the attempt.
    assert!(matches!(
        c.list().await,
        Err(GridError::HostKeyChanged { .. })
    ));
}

#[tokio::test]
async fn an_idle_session_is_closed() {
    let g = FakeGrid::start();
    let c = g.client().with_idle_timeout(Duration::from_millis(300));
    c.list().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // sshd logs the client's goodbye.
    while !g.sshd_log().contains("Received disconnect") {
        assert!(Instant::now() < deadline, "{}", g.sshd_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next command simply logs in again.
    c.list().await.unwrap();
    assert_eq!(g.logins(), 2);
}

#[tokio::test]
async fn a_login_ahead_serves_the_next_commands_even_one_that_comes_while_it_runs() {
    let g = FakeGrid::start();
    let c = g.client();
    // A command that starts while the login ahead is under way waits for it: one login.
    // The login is claimed at the call: the command, sent before the login's future first
    // runs (as when an actor spawns it), still waits for it.
    let warming = Arc::new(c.clone()).warm_up();
    let (listed, warmed) = tokio::join!(c.list(), warming);
    warmed.unwrap();
    listed.unwrap();
    assert_eq!(g.logins(), 1, "{}", g.sshd_log());
    c.stop("shop").await.unwrap();
    // Logging in ahead again with a session kept is nothing more.
    Arc::new(c.clone()).warm_up().await.unwrap();
    assert_eq!(g.logged(), ["app list --batch", "app stop shop"]);
    assert_eq!(g.logins(), 1, "{}", g.sshd_log());
}

#[tokio::test]
async fn a_command_waiting_for_a_failed_login_ahead_gets_its_error_without_trying_again() {
    let (port, hold, accepted) = silent_listener().await;
    let c = SshGrid::new(
        format!("{HOST}:{port}").parse().unwrap(),
        "/nonexistent/key",
        "/nonexistent/known_hosts",
    )
    .with_timeouts(Duration::from_millis(500), Duration::from_secs(10));
    let warming = Arc::new(c.clone()).warm_up();
    let (listed, warmed) = tokio::join!(c.list(), warming);
    for e in [warmed.unwrap_err(), listed.unwrap_err()] {
        match &e {
            GridError::Connect { reason, .. } => {
                assert!(reason.contains("no SSH handshake within 0.5s"), "{reason}")
            }
            other => panic!("expected Connect, got {other:?}"),
        }
    }
    assert_eq!(*accepted.lock().unwrap(), 1, "the command connected again");
    // A later command tries for itself.
    c.list().await.unwrap_err();
    assert_eq!(*accepted.lock().unwrap(), 2);
    hold.abort();
}
