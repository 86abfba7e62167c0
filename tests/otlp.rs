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

/// A minimal OTLP/HTTP collector on loopback: records each request's path, content type and body.
#[cfg(feature = "otlp")]
mod collector {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;

    /// Path, content type and body of one request the collector received.
    pub type Request = (String, String, Vec<u8>);

    pub struct Collector {
        pub endpoint: String,
        pub seen: Arc<Mutex<Vec<Request>>>,
    }

    /// One exported span, with what the tests look at.
    #[derive(Debug, Clone)]
    pub struct Span {
        pub name: String,
        pub trace_id: String,
        pub span_id: String,
        /// Empty for a root.
        pub parent: String,
        pub attrs: Vec<(String, String)>,
    }

    impl Span {
        pub fn attr(&self, key: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    impl Collector {
        pub fn start() -> Collector {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
            let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
            let record = seen.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let record = record.clone();
                    std::thread::spawn(move || serve(stream, &record));
                }
            });
            Collector { endpoint, seen }
        }

        /// Every span received so far, decoded.
        pub fn spans(&self) -> Vec<Span> {
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let mut out = Vec::new();
            for (path, _, body) in self.seen.lock().unwrap().iter() {
                if path != "/v1/traces" {
                    continue;
                }
                let req = ExportTraceServiceRequest::decode(&body[..]).expect("OTLP protobuf");
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            let attrs = s
                                .attributes
                                .iter()
                                .map(|kv| {
                                    let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                        Some(Value::StringValue(s)) => s.clone(),
                                        other => format!("{other:?}"),
                                    };
                                    (kv.key.clone(), v)
                                })
                                .collect();
                            out.push(Span {
                                name: s.name,
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attrs,
                            });
                        }
                    }
                }
            }
            out
        }
    }

    fn serve(stream: std::net::TcpStream, seen: &Mutex<Vec<Request>>) {
        let mut r = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
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
            if r.read_exact(&mut body).is_err() {
                return;
            }
            seen.lock().unwrap().push((path, ctype, body));
            if r
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                .is_err()
            {
                return;
            }
        }
    }
}

/// With the feature, the spans reach a collector over OTLP/HTTP (protobuf), flushed at shutdown.
#[cfg(feature = "otlp")]
#[test]
fn spans_reach_an_otlp_collector() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let collector = collector::Collector::start();
    let dir = config_dir();
    let mut child = mig()
        .args(["--log-format", "json", "serve", "--config-dir"])
        .arg(dir.path())
        .args(["--set", &format!("otlp_endpoint={}", collector.endpoint)])
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

    let seen = collector.seen.lock().unwrap();
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

/// A migrate across a real lab, every MIG exporting to one collector: the Source's, MigHelper's
/// and the target MIG's operation spans arrive as one trace (the operation's trace id), each
/// continuing the one before it, and the handoffs' receiving spans hang under their senders.
#[cfg(feature = "otlp")]
#[test]
fn a_migrate_is_one_trace_across_the_three_instances() {
    use std::sync::atomic::AtomicU8;

    use common::lab::{wait_for, Lab};

    static BASES: AtomicU8 = AtomicU8::new(214);
    let collector = collector::Collector::start();
    let lab = Lab::up(2, &BASES);
    // The config volume every demo application starts from: the Source and the target MIG read
    // it; MigHelper inherits the endpoint from the Source.
    std::fs::write(
        lab.path().join("mig/mig.toml"),
        format!("otlp_endpoint = {:?}\n", collector.endpoint),
    )
    .unwrap();
    lab.provision_demo(1, "shop");
    let out = mig()
        .args([
            "migrate",
            "--url",
            &lab.mig_url(1),
            "--to",
            "g2",
            "--name",
            "shop2",
            "--quiet",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "migrate failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout.split_whitespace().nth(1).unwrap().to_string();
    let status = mig()
        .args(["status", "--url", &lab.mig_url(2), &id])
        .output()
        .unwrap();
    let op: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let trace_id = op["trace_id"].as_str().unwrap().to_string();

    // The Source and MigHelper flushed when they were stopped; the target MIG's batch goes out
    // within the exporter's delay (5 s).
    let spans = wait_for("the three actors' op spans at the collector", 60, || {
        let spans: Vec<_> = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        let actors = ["source", "mig_helper", "target"];
        actors
            .iter()
            .all(|a| {
                spans
                    .iter()
                    .any(|s| s.name == "op" && s.attr("actor") == Some(a))
            })
            .then_some(spans)
    });
    let op_span = |actor: &str| {
        let found: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "op" && s.attr("actor") == Some(actor))
            .collect();
        assert_eq!(found.len(), 1, "one {actor} op span: {found:#?}");
        found[0].clone()
    };
    let (source, helper, target) = (op_span("source"), op_span("mig_helper"), op_span("target"));
    assert_eq!(source.parent, "", "the Source's span is the trace's root");
    assert_eq!(
        helper.parent, source.span_id,
        "MigHelper continues the Source"
    );
    assert_eq!(
        target.parent, helper.span_id,
        "the target MIG continues MigHelper"
    );
    assert_eq!(source.attr("op_id"), Some(id.as_str()));
    assert!(helper.attr("instance").unwrap().starts_with("MigHelper"));
    // Each handoff received is a child of the span that sent it.
    let received: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "op" && s.attr("traceparent").is_some())
        .collect();
    assert!(
        received.iter().any(|s| s.parent == source.span_id)
            && received.iter().any(|s| s.parent == helper.span_id),
        "handoff spans: {received:#?}"
    );
    // Every span of the trace hangs on one of its spans: nothing dangles.
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in &spans {
        assert!(
            s.parent.is_empty() || ids.contains(&s.parent.as_str()),
            "{s:#?} has a parent outside the trace"
        );
    }
}
