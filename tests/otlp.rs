//! The optional OTLP export of MIG's tracing spans (`otlp_endpoint`, cargo feature `otlp`).

mod common;

use common::*;

/// A plain build refuses the property instead of silently sending nothing.
#[cfg(not(feature = "otlp"))]
#[test]
fn without_the_feature_an_endpoint_is_refused_with_how_to_get_it() {
    let dir = config_dir();
    let out = mig()
        .args(["serve", "--config-dir"])
        .arg(dir.path())
        .args(["--set", "otlp_endpoint=http://127.0.0.1:4318/v1/traces"])
        .args(["--set", "port_no=0", "--set", "mon_port=0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built without the `otlp` feature"),
        "{stderr}"
    );
}

/// With the feature, the spans reach a collector over OTLP/HTTP (protobuf), flushed at shutdown.
#[cfg(feature = "otlp")]
#[test]
fn spans_reach_an_otlp_collector() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};

    // A minimal OTLP/HTTP collector: records each request's path, content type and body.
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1/traces", collector.local_addr().unwrap());
    /// Path, content type and body of one request the collector received.
    type Request = (String, String, Vec<u8>);
    let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for stream in collector.incoming().flatten() {
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                r.read_line(&mut line).unwrap_or(0);
                let path = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let (mut len, mut ctype) = (0usize, String::new());
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap_or(("", ""));
                    match k.trim().to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap_or(0),
                        "content-type" => ctype = v.trim().to_string(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                seen.lock().unwrap().push((path, ctype, body));
                let _ = r.get_mut().write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                );
            }
        });
    }

    let dir = config_dir();
    let mut child = mig()
        .args(["--log-format", "json", "serve", "--config-dir"])
        .arg(dir.path())
        .args(["--set", &format!("otlp_endpoint={endpoint}")])
        .args([
            "--set",
            "listen=127.0.0.1",
            "--set",
            "port_no=0",
            "--set",
            "mon_port=0",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut serving = false;
    for line in stderr.lines().map_while(Result::ok) {
        if line.contains("\"serving\"") {
            serving = true;
            break;
        }
    }
    assert!(serving, "mig serve did not start");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());

    let seen = seen.lock().unwrap();
    let traces: Vec<_> = seen.iter().filter(|(p, _, _)| p == "/v1/traces").collect();
    assert!(
        !traces.is_empty(),
        "no export reached the collector: {:?}",
        seen.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let (_, ctype, body) = traces[0];
    assert_eq!(ctype, "application/x-protobuf");
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(b"service.name") && has(b"mig"),
        "the resource names the service"
    );
    assert!(has(b"serve"), "the daemon's span is in the export");
}
