//! `mig serve`: start-up (.rc.local, binding), the grids API, health, auth and graceful shutdown,
//! over real HTTP.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Stdio};
use std::time::Duration;

use actors::book::OpBook;
use actors::journal::Journal;
use actors::op::Role;
use actors::properties;
use common::*;
use mig::server::Shared;
use mig::site::Site;
use tokio_util::sync::CancellationToken;

/// Starts the real server in-process on port 0; returns the GUI and mon base URLs.
fn start_in_process(
    dir: &std::path::Path,
    sets: &[&str],
) -> (
    String,
    String,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    sets.push(format!("state_dir={}", state_dir(dir).display()));
    let props = properties::load(dir, std::iter::empty(), &sets).unwrap();
    let book = OpBook::open(Journal::open(&props.state_dir).unwrap()).unwrap();
    let shared = Shared::new(
        Some(Site::inspect(props)),
        book,
        vec![Role::Source, Role::Target],
    );
    let gui = TcpListener::bind("127.0.0.1:0").unwrap();
    let mon = TcpListener::bind("127.0.0.1:0").unwrap();
    let urls = (
        format!("http://{}", gui.local_addr().unwrap()),
        format!("http://{}", mon.local_addr().unwrap()),
    );
    let token = CancellationToken::new();
    let task = actix_rt::spawn(mig::server::run(shared, gui, mon, token.clone()));
    (urls.0, urls.1, token, task)
}

#[actix_rt::test]
async fn grids_api_marks_the_own_grid_and_health_answers() {
    let dir = config_dir();
    let (gui, mon, token, task) = start_in_process(dir.path(), &["grid=g2"]);
    let body: serde_json::Value = reqwest::get(format!("{gui}/api/v1/grids"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["own_grid"], "g2");
    assert_eq!(body["unavailable"], serde_json::Value::Null);
    let grids = body["grids"].as_array().unwrap();
    assert_eq!(grids.len(), 2);
    assert_eq!(grids[0]["id"], "g1");
    assert_eq!(grids[0]["location"], "Lab 1");
    assert_eq!(grids[0]["mig_ip"], "127.0.1.10:8080");
    assert_eq!(grids[0]["own"], false);
    assert_eq!(grids[1]["controller"], "root@127.0.2.1:2222");
    assert_eq!(grids[1]["own"], true);

    let health = reqwest::get(format!("{mon}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap()["status"],
        "alive"
    );

    token.cancel();
    task.await.unwrap().unwrap();
    assert!(
        reqwest::get(format!("{mon}/healthz")).await.is_err(),
        "mon still serving after shutdown"
    );
}

#[actix_rt::test]
async fn grids_api_says_why_operations_are_off() {
    let dir = config_dir();
    // listen on every address: MIG cannot tell its grid.
    let (gui, _mon, token, task) = start_in_process(dir.path(), &[]);
    let body: serde_json::Value = reqwest::get(format!("{gui}/api/v1/grids"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["own_grid"], serde_json::Value::Null);
    assert!(
        body["unavailable"]
            .as_str()
            .unwrap()
            .contains("cannot match itself to a MIG_ip"),
        "{body}"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

#[actix_rt::test]
async fn the_gui_routes_need_the_credentials_when_a_username_is_set() {
    let dir = config_dir();
    let (gui, mon, token, task) = start_in_process(dir.path(), &["username=ops", "password=pa ss"]);
    let client = reqwest::Client::new();
    let url = format!("{gui}/api/v1/grids");
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let r = client
        .get(&url)
        .basic_auth("ops", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(&url)
        .basic_auth("ops", Some("pa ss"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health is for probes, not people: no credentials there.
    assert_eq!(
        reqwest::get(format!("{mon}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

#[actix_rt::test]
async fn a_password_without_username_means_no_authentication() {
    let dir = config_dir();
    let (gui, _mon, token, task) = start_in_process(dir.path(), &["password=set"]);
    let r = reqwest::get(format!("{gui}/api/v1/grids")).await.unwrap();
    assert_eq!(r.status(), 200);
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Runs `mig serve` on ports the OS picks; returns the child once it logged that it serves, with
/// the GUI and mon base URLs, and the log lines before that one.
fn spawn_serve(dir: &std::path::Path, extra: &[&str]) -> (Child, String, String, Vec<String>) {
    let mut cmd = mig();
    cmd.args(["--log-format", "json", "serve", "--config-dir"])
        .arg(dir)
        .arg("--set")
        .arg(format!("state_dir={}", state_dir(dir).display()))
        .args([
            "--set",
            "listen=127.0.0.1",
            "--set",
            "port_no=0",
            "--set",
            "mon_port=0",
        ]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut before = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline - std::time::Instant::now()) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "serving" {
            let gui = v["gui"].as_str().unwrap().trim_end_matches('/').to_string();
            let mon = v["mon"].as_str().unwrap().trim_end_matches("/healthz");
            return (child, gui, mon.to_string(), before);
        }
        before.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("mig serve did not say it was serving");
}

fn sigterm(child: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn serve_binary_runs_rc_local_first_serves_and_stops_on_sigterm() {
    let dir = config_dir();
    let marker = dir.path().join("rc-ran");
    write_script(
        &dir.path().join(".rc.local"),
        &format!("pwd > {}", path_str(&marker)),
        0o755,
    );
    let (mut child, gui, _mon, _) = spawn_serve(dir.path(), &[]);
    // The script ran to the end before the GUI started, in the config dir.
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        path_str(&dir.path().canonicalize().unwrap())
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::get(format!("{gui}/api/v1/grids"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Connects to `to` from `from`, an address of this host (any 127.0.0.0/8 address on loopback).
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(to).await
}

/// One byte there and back through an echoing pass-through; false on reset, EOF or silence.
async fn ping(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut b = [0u8; 1];
    s.write_all(&[7]).await.is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(1))
        )
}

#[test]
fn the_per_client_cap_resets_one_address_lets_others_in_and_shows_on_metrics() {
    // aux: an echo server on 127.0.0.3; the pass-through port is the same number on 127.0.0.1.
    let upstream = TcpListener::bind("127.0.0.3:0").unwrap();
    let port = upstream.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in upstream.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    let dir = config_dir();
    let passthrough = format!("passthrough={port}");
    let (mut child, _gui, mon, _) = spawn_serve(
        dir.path(),
        &[
            "aux=127.0.0.3",
            &passthrough,
            "max_connections_per_client=1",
        ],
    );
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = rt.block_on(async {
        let mut first = connect_from("127.0.0.1", to).await.unwrap();
        assert!(ping(&mut first).await, "first connection not served");
        // The second from the same address is reset at once: at the first byte, as closed if the
        // reset came before the byte was sent, or at connect itself if it came that fast.
        match connect_from("127.0.0.1", to).await {
            Ok(mut second) => assert!(
                !ping(&mut second).await,
                "second connection from 127.0.0.1 served"
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        let mut other = connect_from("127.0.0.2", to).await.unwrap();
        assert!(ping(&mut other).await, "127.0.0.2 not served");
        reqwest::get(format!("{mon}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    for (reason, n) in [("per_client", 1), ("aux", 0)] {
        let line = format!(
            r#"mig_proxy_connections_refused_total{{port="{port}",reason="{reason}"}} {n}"#
        );
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    let line = format!(r#"mig_proxy_connections_total{{port="{port}"}} 3"#);
    assert!(
        metrics.lines().any(|l| l == line),
        "no `{line}` in\n{metrics}"
    );
}

#[test]
fn a_taken_gui_port_stops_mig_with_httpd_did_not_start() {
    let dir = config_dir();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = mig()
        .args(["serve", "--config-dir"])
        .arg(dir.path())
        .args([
            "--set",
            "listen=127.0.0.1",
            "--set",
            &format!("port_no={port}"),
            "--set",
            "mon_port=0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "httpd did not start: cannot listen on 127.0.0.1:{port}: Address already in use"
        )),
        "{stderr}"
    );
}

/// Runs `mig serve` on ports the OS picks, expecting it to stop with exit 1; returns its stderr.
fn serve_failing(dir: &std::path::Path) -> String {
    let out = mig()
        .args(["serve", "--config-dir"])
        .arg(dir)
        .args(["--set", "port_no=0", "--set", "mon_port=0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_failing_rc_local_stops_mig_with_its_return_code() {
    let dir = config_dir();
    let rc = dir.path().join(".rc.local");
    write_script(&rc, "exit 3", 0o755);
    let stderr = serve_failing(dir.path());
    assert!(
        stderr.contains(&format!(
            "{}: .rc.local script failed, ret = 3",
            path_str(&rc)
        )),
        "{stderr}"
    );
}

#[test]
fn a_non_executable_rc_local_stops_mig() {
    let dir = config_dir();
    let rc = dir.path().join(".rc.local");
    write_script(&rc, "exit 0", 0o644);
    let stderr = serve_failing(dir.path());
    assert!(
        stderr.contains(&format!(
            "{}: .rc.local script is not executable.",
            path_str(&rc)
        )),
        "{stderr}"
    );
}

#[test]
fn bad_properties_stop_serve_with_exit_2_and_one_line_each() {
    let dir = config_dir();
    let out = mig()
        .env("MIG_MODE", "copy")
        .args(["serve", "--config-dir"])
        .arg(dir.path())
        .args(["--set", "prot_no=1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "prot_no (from --set): unknown property; did you mean `port_no`?",
            r#"mode = "copy" (from MIG_MODE): must be migrate, snapshot or both"#,
        ]
    );
}

#[actix_rt::test]
async fn readiness_says_what_is_wrong_and_metrics_answer() {
    let dir = config_dir();
    let (_gui, mon, token, task) = start_in_process(dir.path(), &["grid=g1"]);
    let r = reqwest::get(format!("{mon}/readyz")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["ready"], true);

    // The journal's directory becomes a file: not ready, and the body says why.
    let ops = state_dir(dir.path()).join("ops");
    std::fs::remove_dir_all(&ops).unwrap();
    std::fs::write(&ops, "not a directory").unwrap();
    let r = reqwest::get(format!("{mon}/readyz")).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["ready"], false);
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .contains("journal is not writable"),
        "{body}"
    );

    let text = reqwest::get(format!("{mon}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("# TYPE mig_process_resident_memory_bytes gauge"),
        "{text}"
    );
    assert!(text.contains(r#"mig_build_info{version=""#), "{text}");
    token.cancel();
    task.await.unwrap().unwrap();
}

#[actix_rt::test]
async fn readiness_is_false_while_the_own_grid_is_unknown() {
    let dir = config_dir();
    let (_gui, mon, token, task) = start_in_process(dir.path(), &[]);
    let r = reqwest::get(format!("{mon}/readyz")).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .contains("cannot match itself"),
        "{body}"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

/// An empty `username` means no authentication (the seed's rule), said loudly: a warning at
/// start-up and a banner on the form; with a username, neither.
#[test]
fn an_open_mig_warns_at_start_up_and_on_the_form() {
    let dir = config_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (extra, open) in [
        (&[][..], true),
        (&["username=ops", "password=pw"][..], false),
    ] {
        let (mut child, gui, _, log) = spawn_serve(dir.path(), extra);
        let warned = log.iter().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no username is set"))
        });
        assert_eq!(warned, open, "{extra:?}: {log:#?}");
        let page = rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{gui}/"))
                .basic_auth("ops", Some("pw"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        assert_eq!(page.contains("id=\"open-warning\""), open, "{page}");
        sigterm(&child);
        assert!(child.wait().unwrap().success());
    }
}
