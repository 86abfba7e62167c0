//! The live stream the monitor page follows, as the browser tests' fake MIG serves it, which is as
//! production serves it: the fake wires the real handlers (`mig_web::ops`), so these pin production's
//! stream (its end condition, the roles an instance follows, its keep-alive and its CORS header)
//! for the page's tests too.

mod common;

use std::time::{Duration, Instant};

use actors::api;
use actors::op::{self, Kind, Op, OpState, Role};
use common::fake_mig::Trio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OP_ID: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a9";

/// One HTTP/1.1 GET, read as it arrives: the head, then the body's chunks one at a time.
struct Get {
    tcp: TcpStream,
    buf: Vec<u8>,
    head: String,
}

impl Get {
    async fn open(base: &str, path: &str) -> Get {
        let host = base.trim_start_matches("http://");
        let mut tcp = TcpStream::connect(host)
            .await
            .expect("the instance listens");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://127.0.60.9\r\n\
             Accept: text/event-stream\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut g = Get {
            tcp,
            buf: Vec::new(),
            head: String::new(),
        };
        let end = loop {
            if let Some(i) = g.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(g.fill().await, "the connection closed before the head");
        };
        g.head = String::from_utf8(g.buf[..end].to_vec()).unwrap();
        g.buf.drain(..end + 4);
        g
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = self.tcp.read(&mut chunk).await.unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The next chunk of a chunked body: `Some(text)`, or `None` once the body has ended.
    async fn chunk(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let len = std::str::from_utf8(&self.buf[..i]).unwrap();
                let len = usize::from_str_radix(len.trim(), 16).expect("a chunk size");
                if len == 0 {
                    return None;
                }
                while self.buf.len() < i + 2 + len + 2 {
                    assert!(self.fill().await, "the connection closed inside a chunk");
                }
                let text = String::from_utf8(self.buf[i + 2..i + 2 + len].to_vec()).unwrap();
                self.buf.drain(..i + 2 + len + 2);
                return Some(text);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next chunk if one comes within `wait`; `Err(())` if none does.
    async fn chunk_within(&mut self, wait: Duration) -> Result<Option<String>, ()> {
        tokio::time::timeout(wait, self.chunk())
            .await
            .map_err(|_| ())
    }
}

fn op_of(trio: &Trio) -> Op {
    let mut op = Op::new(OP_ID.into(), Kind::Migrate, trio.plan());
    op.start_step(op::PROVISIONING_HELPER);
    op
}

const QUIET: Duration = Duration::from_millis(700);

/// The public reads carry `Access-Control-Allow-Origin: *` (the page reads them from another
/// instance's origin); the rest of the instance does not.
#[actix_web::test]
async fn the_stream_and_the_view_are_readable_from_any_origin() {
    let trio = Trio::start().await;
    let op = op_of(&trio);
    trio.source.set(&op);
    for path in [api::EVENTS.for_op(OP_ID), api::OP.for_op(OP_ID)] {
        let g = Get::open(&trio.source.url, &path).await;
        assert!(g.head.starts_with("HTTP/1.1 200"), "{path}: {}", g.head);
        assert_eq!(
            g.header("access-control-allow-origin").as_deref(),
            Some("*"),
            "{path}"
        );
    }
    let g = Get::open(&trio.source.url, &api::EVENTS.for_op(&op::new_id())).await;
    assert!(g.head.starts_with("HTTP/1.1 404"), "{}", g.head);
    assert_eq!(
        g.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    for path in [api::CSRF.path.to_string(), api::MONITOR_PAGE.for_op(OP_ID)] {
        let g = Get::open(&trio.source.url, &path).await;
        assert!(g.head.starts_with("HTTP/1.1 200"), "{path}: {}", g.head);
        assert_eq!(g.header("access-control-allow-origin"), None, "{path}");
    }
}

/// Each event is the contract's framing of the public view; the stream ends right after the
/// event in which the operation ended, or moved to an instance in a role this one does not play
/// — and not when it moved to another role this one plays too (the final MIG is the re-started
/// source's `mig serve` during a roll-back after the handoff).
#[actix_web::test]
async fn the_stream_ends_once_the_operation_ends_or_leaves_every_role_here() {
    let trio = Trio::start().await;
    let mut op = op_of(&trio);
    op.owner = Role::Target;
    let tgt = &trio.target;
    tgt.set(&op);
    let mut g = Get::open(&tgt.url, &api::EVENTS.for_op(OP_ID)).await;
    assert_eq!(
        g.chunk().await.unwrap(),
        api::event(&mig_web::OpView::of(&op)),
        "the contract's framing of the public view"
    );
    assert!(g.chunk_within(QUIET).await.is_err(), "owned here: open");

    // Rolling back at the source: the same `mig serve` plays both roles, so the stream stays.
    op.owner = Role::Source;
    op.rolling_back = true;
    op.version += 1;
    tgt.set(&op);
    let e = g.chunk().await.unwrap();
    assert!(e.contains("\"owner\":\"source\""), "{e}");
    assert!(
        g.chunk_within(QUIET).await.is_err(),
        "the source is a role of this instance too: the stream stays open"
    );
    op.end(OpState::RolledBack, None);
    tgt.set(&op);
    let e = g.chunk().await.unwrap();
    assert!(e.contains("\"state\":\"rolled_back\""), "{e}");
    assert_eq!(g.chunk().await, None, "ended: the stream ends");

    // MigHelper's stream ends with the event that hands the operation to the final MIG.
    let mut op = op_of(&trio);
    op.owner = Role::Helper;
    trio.helper.set(&op);
    let mut g = Get::open(&trio.helper.url, &api::EVENTS.for_op(OP_ID)).await;
    g.chunk().await.unwrap();
    assert!(g.chunk_within(QUIET).await.is_err(), "owned here: open");
    op.owner = Role::Target;
    op.version += 1;
    trio.helper.set(&op);
    let e = g.chunk().await.unwrap();
    assert!(e.contains("\"owner\":\"target\""), "{e}");
    assert_eq!(g.chunk().await, None, "moved on: the stream ends");
}

/// An idle stream says so every `api::KEEP_ALIVE`, with a comment the page ignores.
#[actix_web::test]
async fn an_idle_stream_keeps_alive_at_the_contract_s_interval() {
    let trio = Trio::start().await;
    let src = &trio.source;
    src.set(&op_of(&trio));
    let mut g = Get::open(&src.url, &api::EVENTS.for_op(OP_ID)).await;
    g.chunk().await.unwrap();
    let t0 = Instant::now();
    let ka = g
        .chunk_within(api::KEEP_ALIVE + Duration::from_secs(2))
        .await
        .expect("a keep-alive within the interval");
    let took = t0.elapsed();
    assert_eq!(ka.as_deref(), Some(api::KEEP_ALIVE_COMMENT));
    assert!(
        took + Duration::from_millis(300) >= api::KEEP_ALIVE,
        "a keep-alive after {took:?}, before the interval"
    );
}
