//! The Proxy actor over real loopback sockets: bytes through unchanged both ways (sockmap, splice
//! and copy paths), half-close, a peer's reset, many connections, aux down or unset, the
//! connection limit, drain on shutdown, idle timeout, the per-client cap and the counters.
//!
//! Every case runs on the sockmap path and on the splice path (`on_paths!`), some on copy too.
//! The sockmap cases need root and a kernel with BPF sockmap (this project's machines have both):
//! they fail rather than skip where the path cannot be used.
//!
//! The proxy runs on the test's actix System; clients and upstream servers run on a separate
//! two-thread tokio runtime (`ends()`) so they do not share the proxy's thread.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use proxy::{PortStats, Proxy, ProxyConfig, ProxyPath, ProxyStats, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const LOCALHOST: &str = "127.0.0.1";

/// The runtime of clients and upstream servers; never dropped (a runtime cannot be dropped from
/// inside another).
fn ends() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // RUST_LOG=proxy=debug shows the proxy's view of each connection.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        // 2 000 connections need ~16 000 descriptors in this one process.
        let _ = proxy::raise_fd_limit();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

/// Runs `f` on the ends' runtime and waits for it from the actix thread.
async fn on_ends<F>(f: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    ends().spawn(f).await.expect("client/server task panicked")
}

/// Binds a listener of the ends' runtime on `ip`, port 0 unless given.
fn bind_upstream(ip: &str, port: u16) -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind((ip, port)).expect("bind upstream");
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// An upstream that echoes every byte and passes the client's EOF on once all is echoed.
fn spawn_echo(ip: &str) -> SocketAddr {
    let (l, addr) = bind_upstream(ip, 0);
    ends().spawn(async move {
        let l = TcpListener::from_std(l).unwrap();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// The proxy's configuration for one upstream on 127.0.0.1, listening on an ephemeral port.
fn config(upstream: SocketAddr, path: ProxyPath) -> ProxyConfig {
    ProxyConfig {
        upstream_port: Some(upstream.port()),
        path,
        ..ProxyConfig::new(
            LOCALHOST.parse().unwrap(),
            Some(upstream.ip().to_string()),
            vec![0],
        )
    }
}

/// Runs each named case, an `async fn(ProxyPath)`, as two tests: `case::sockmap` and
/// `case::splice`.
macro_rules! on_paths {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[actix_rt::test]
            async fn sockmap() {
                super::$case(ProxyPath::Sockmap).await;
            }

            #[actix_rt::test]
            async fn splice() {
                super::$case(ProxyPath::Splice).await;
            }
        }
    )*};
}

struct Running {
    addr: Addr<Proxy>,
    local: SocketAddr,
    stats: Arc<ProxyStats>,
}

async fn start(config: ProxyConfig) -> Running {
    ends();
    let stats = Arc::new(ProxyStats::new());
    let asked = config.path;
    let proxy = Proxy::bind(config, stats.clone())
        .await
        .expect("bind proxy");
    if asked != ProxyPath::Auto {
        assert_eq!(proxy.path(), asked, "the path the proxy runs");
    }
    let local = proxy.local_addrs()[0];
    Running {
        addr: proxy.start(),
        local,
        stats,
    }
}

impl Running {
    fn port_stats(&self) -> PortStats {
        self.stats.snapshot()[0]
    }

    /// Waits (up to 5 s) until the counters satisfy `ok`: the proxy's side of a connection ends a
    /// moment after the client's.
    async fn stats_until(&self, ok: impl Fn(&PortStats) -> bool) -> PortStats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.port_stats();
            if ok(&s) || Instant::now() > deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Sends `data`, half-closes, and returns everything read back until EOF.
async fn send_and_read_all(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    on_ends(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect to proxy");
        let (mut r, mut w) = s.split();
        let mut back = Vec::new();
        let write = async {
            w.write_all(&data).await.expect("write");
            w.shutdown().await.expect("shutdown write");
        };
        let read = async {
            r.read_to_end(&mut back).await.expect("read");
        };
        tokio::join!(write, read);
        back
    })
    .await
}

/// Deterministic, non-repeating test bytes.
fn pattern(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

async fn echo_case(path: ProxyPath, len: usize) {
    let upstream = spawn_echo(LOCALHOST);
    let p = start(config(upstream, path)).await;
    let data = pattern(&format!("echo {len}"), len);
    let back = send_and_read_all(p.local, data.clone()).await;
    assert_eq!(back.len(), len, "echoed length");
    assert_eq!(
        blake3::hash(&back),
        blake3::hash(&data),
        "echoed bytes differ"
    );
    let s = p
        .stats_until(|s| s.active == 0 && s.bytes_out == len as u64)
        .await;
    assert_eq!((s.total, s.refused, s.active), (1, 0, 0), "{s:?}");
    assert_eq!((s.bytes_in, s.bytes_out), (len as u64, len as u64), "{s:?}");
    if path == ProxyPath::Splice && len == 1 {
        // A small message goes by read and write: a pipe would cost more calls than it saves.
        assert_eq!(proxy::bytes_spliced_on_this_thread(), 0);
    }
    if path == ProxyPath::Sockmap {
        // The client's FIN comes with its bytes, before the pair could enter the socket map
        // (which takes only ESTABLISHED sockets): this connection goes by splice, and nothing is
        // read by the sockmap path's userspace side.
        assert_eq!(proxy::bytes_read_by_sockmap_userspace_on_this_thread(), 0);
    }
}

#[actix_rt::test]
async fn echo_one_byte_sockmap() {
    echo_case(ProxyPath::Sockmap, 1).await;
}

#[actix_rt::test]
async fn echo_one_byte_splice() {
    echo_case(ProxyPath::Splice, 1).await;
}

#[actix_rt::test]
async fn echo_one_byte_copy() {
    echo_case(ProxyPath::Copy, 1).await;
}

#[actix_rt::test]
async fn echo_64k_sockmap() {
    echo_case(ProxyPath::Sockmap, 64 * 1024).await;
}

#[actix_rt::test]
async fn echo_64k_splice() {
    echo_case(ProxyPath::Splice, 64 * 1024).await;
}

#[actix_rt::test]
async fn echo_64k_copy() {
    echo_case(ProxyPath::Copy, 64 * 1024).await;
}

/// Streams `len` bytes from seed `seed` into `w` in 1 MiB chunks, then half-closes; returns the
/// hash of what was sent.
async fn send_stream(
    mut w: impl tokio::io::AsyncWrite + Unpin,
    seed: &str,
    len: u64,
) -> blake3::Hash {
    let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n]).await.expect("bulk write");
        left -= n as u64;
    }
    w.shutdown().await.expect("bulk shutdown");
    hasher.finalize()
}

/// Reads `r` to EOF; returns the byte count and hash.
async fn hash_stream(mut r: impl tokio::io::AsyncRead + Unpin) -> (u64, blake3::Hash) {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await.expect("bulk read");
        if n == 0 {
            return (total, hasher.finalize());
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// 256 MiB each way at the same time, checked with BLAKE3 on both ends.
async fn bulk_case(path: ProxyPath) {
    const LEN: u64 = 256 << 20;
    let (l, upstream) = bind_upstream(LOCALHOST, 0);
    let (tx, mut rx) = mpsc::channel(1);
    ends().spawn(async move {
        let l = TcpListener::from_std(l).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let (r, w) = s.split();
        let (sent, received) = tokio::join!(send_stream(w, "down", LEN), hash_stream(r));
        tx.send((sent, received)).await.unwrap();
    });
    let p = start(config(upstream, path)).await;
    let local = p.local;
    let (client_sent, client_received) = on_ends(async move {
        let mut s = TcpStream::connect(local).await.unwrap();
        let (r, w) = s.split();
        tokio::join!(send_stream(w, "up", LEN), hash_stream(r))
    })
    .await;
    let (server_sent, server_received) = rx.recv().await.unwrap();
    assert_eq!(server_received, (LEN, client_sent), "client → aux bytes");
    assert_eq!(client_received, (LEN, server_sent), "aux → client bytes");
    let s = p.stats_until(|s| s.active == 0).await;
    assert_eq!((s.bytes_in, s.bytes_out, s.total), (LEN, LEN, 1), "{s:?}");
    let spliced = proxy::bytes_spliced_on_this_thread();
    match path {
        // A stream goes through the pipe, bar the first read of each burst.
        ProxyPath::Splice => assert!(spliced > LEN, "only {spliced} of {} bytes spliced", 2 * LEN),
        ProxyPath::Sockmap => {
            assert_eq!(spliced, 0, "splice is off");
            // The kernel moved the bytes; the counters came from the BPF program.
            assert_eq!(proxy::bytes_read_by_sockmap_userspace_on_this_thread(), 0);
        }
        _ => assert_eq!(spliced, 0, "splice is off"),
    }
}

#[actix_rt::test]
async fn bulk_256mib_both_ways_sockmap() {
    bulk_case(ProxyPath::Sockmap).await;
}

#[actix_rt::test]
async fn bulk_256mib_both_ways_splice() {
    bulk_case(ProxyPath::Splice).await;
}

#[actix_rt::test]
async fn bulk_256mib_both_ways_copy() {
    bulk_case(ProxyPath::Copy).await;
}

/// The client half-closes first; aux answers only after it saw that EOF, and the answer must
/// still reach the client.
async fn client_half_close_case(path: ProxyPath) {
    let (l, upstream) = bind_upstream(LOCALHOST, 0);
    ends().spawn(async move {
        let l = TcpListener::from_std(l).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        s.write_all(b"answer to ").await.unwrap();
        s.write_all(&req).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let p = start(config(upstream, path)).await;
    let back = send_and_read_all(p.local, b"question".to_vec()).await;
    assert_eq!(back, b"answer to question");
}

#[actix_rt::test]
async fn half_close_by_client_sockmap() {
    client_half_close_case(ProxyPath::Sockmap).await;
}

#[actix_rt::test]
async fn half_close_by_client_splice() {
    client_half_close_case(ProxyPath::Splice).await;
}

#[actix_rt::test]
async fn half_close_by_client_copy() {
    client_half_close_case(ProxyPath::Copy).await;
}

/// Aux half-closes first (greets, then FIN); the client must see that EOF and still be able to
/// send, and aux must receive it.
async fn aux_half_close_case(path: ProxyPath) {
    let (l, upstream) = bind_upstream(LOCALHOST, 0);
    let (tx, mut rx) = mpsc::channel(1);
    ends().spawn(async move {
        let l = TcpListener::from_std(l).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"greeting").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        tx.send(got).await.unwrap();
    });
    let p = start(config(upstream, path)).await;
    let local = p.local;
    let greeting = on_ends(async move {
        let mut s = TcpStream::connect(local).await.unwrap();
        let mut greeting = Vec::new();
        s.read_to_end(&mut greeting).await.unwrap();
        // aux's direction is closed; ours must still carry bytes.
        s.write_all(b"late reply").await.unwrap();
        s.shutdown().await.unwrap();
        greeting
    })
    .await;
    assert_eq!(greeting, b"greeting");
    let late = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("aux never got the client's bytes after its own FIN")
        .unwrap();
    assert_eq!(late, b"late reply");
}

#[actix_rt::test]
async fn half_close_by_aux_sockmap() {
    aux_half_close_case(ProxyPath::Sockmap).await;
}

#[actix_rt::test]
async fn half_close_by_aux_splice() {
    aux_half_close_case(ProxyPath::Splice).await;
}

#[actix_rt::test]
async fn half_close_by_aux_copy() {
    aux_half_close_case(ProxyPath::Copy).await;
}

async fn two_thousand_concurrent_connections(path: ProxyPath) {
    const N: usize = 2000;
    let upstream = spawn_echo(LOCALHOST);
    let mut c = config(upstream, path);
    // Every client here is 127.0.0.1.
    c.max_connections_per_client = N;
    let p = start(c).await;
    let local = p.local;
    // Every client connects and round-trips one byte, then all wait together (the test counts
    // them live), then each sends its own 4 KiB and checks the echo.
    let connected = Arc::new(tokio::sync::Barrier::new(N + 1));
    let go = Arc::new(tokio::sync::Barrier::new(N + 1));
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let (connected, go) = (connected.clone(), go.clone());
        clients.push(ends().spawn(async move {
            let mut s = TcpStream::connect(local).await.expect("connect");
            s.write_all(&[1]).await.unwrap();
            let mut one = [0u8; 1];
            s.read_exact(&mut one).await.unwrap();
            connected.wait().await;
            go.wait().await;
            let data = pattern(&format!("client {i}"), 4096);
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back == data
        }));
    }
    tokio::time::timeout(Duration::from_secs(30), connected.wait())
        .await
        .expect("not all 2 000 connections got through");
    assert_eq!(p.port_stats().active, N as u64, "live at once");
    go.wait().await;
    let mut right = 0;
    for c in clients {
        right += usize::from(c.await.unwrap());
    }
    assert_eq!(right, N, "connections whose bytes came back right");
    let s = p.stats_until(|s| s.active == 0).await;
    assert_eq!((s.total, s.refused, s.active), (N as u64, 0, 0), "{s:?}");
    assert_eq!(s.bytes_in, (N * 4097) as u64, "{s:?}");
    assert_eq!(s.bytes_out, (N * 4097) as u64, "{s:?}");
}

/// `n` connections to `local`, each answered once (a ping and its echo), kept open.
async fn open_pinged(local: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(local).await.unwrap();
        assert!(ping(&mut s, Duration::from_secs(5)).await);
        open.push(s);
    }
    open
}

async fn idle_spliced_connections_hold_no_pipe(path: ProxyPath) {
    let upstream = spawn_echo(LOCALHOST);
    let p = start(config(upstream, path)).await;
    let conns = on_ends(open_pinged(p.local, 50)).await;
    // The proxy runs on this thread: every echo has arrived, so every splice has finished.
    assert_eq!(p.port_stats().active, 50);
    assert_eq!(proxy::pipes_held_on_this_thread(), 0);
    drop(conns);
}

/// Connects and reads; returns how long until the proxy reset the connection.
async fn time_to_reset(addr: SocketAddr) -> Duration {
    on_ends(async move {
        let started = Instant::now();
        // A quick reset can beat the client's own check of its connect.
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("connect to proxy: {e}"),
        };
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => started.elapsed(),
            Ok(r) => panic!("want a reset, got {r:?}"),
            Err(_) => panic!("connection left hanging"),
        }
    })
    .await
}

fn free_port() -> SocketAddr {
    let ip: std::net::IpAddr = LOCALHOST.parse().unwrap();
    (ip, testkit::free_port_on(ip)).into()
}

async fn aux_down_closes_the_client_at_once(path: ProxyPath) {
    let p = start(config(free_port(), path)).await;
    let took = time_to_reset(p.local).await;
    assert!(took < Duration::from_secs(2), "closed after {took:?}"); // at once, not after the 5 s connect timeout
    let s = p.stats_until(|s| s.refused == 1).await;
    assert_eq!((s.total, s.refused, s.active), (1, 1, 0), "{s:?}");
}

async fn aux_unset_accepts_and_closes(path: ProxyPath) {
    let mut c = config(free_port(), path);
    c.aux = None;
    let p = start(c).await;
    for _ in 0..2 {
        let took = time_to_reset(p.local).await;
        assert!(took < Duration::from_secs(2), "closed after {took:?}"); // at once, not after the 5 s connect timeout
    }
    let s = p.stats_until(|s| s.refused == 2).await;
    assert_eq!((s.total, s.refused, s.active), (2, 2, 0), "{s:?}");
}

async fn aux_too_slow_to_accept_hits_connect_timeout(path: ProxyPath) {
    // An upstream whose accept queue is full drops new SYNs: connecting to it hangs.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&free_port().into()).unwrap();
    sock.listen(0).unwrap();
    let upstream = sock.local_addr().unwrap().as_socket().unwrap();
    let fillers = on_ends(async move {
        let mut held = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(upstream)).await
            {
                held.push(s);
            }
        }
        held
    })
    .await;
    let mut c = config(upstream, path);
    c.connect_timeout = Duration::from_millis(300);
    let p = start(c).await;
    let took = time_to_reset(p.local).await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "closed after {took:?}, want about the 300 ms connect timeout"
    );
    let s = p.stats_until(|s| s.refused == 1).await;
    assert_eq!((s.total, s.refused, s.active), (1, 1, 0), "{s:?}");
    drop((fillers, sock));
}

/// One byte there and back on an open connection, within `within`.
async fn ping(s: &mut TcpStream, within: Duration) -> bool {
    if s.write_all(&[7]).await.is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(1))
    )
}

async fn at_the_limit_the_next_connection_waits_in_the_backlog(path: ProxyPath) {
    let upstream = spawn_echo(LOCALHOST);
    let mut c = config(upstream, path);
    c.max_connections = 2;
    let p = start(c).await;
    let local = p.local;
    let (mut first, _second, mut third) = on_ends(async move {
        let mut a = TcpStream::connect(local).await.unwrap();
        let mut b = TcpStream::connect(local).await.unwrap();
        assert!(ping(&mut a, Duration::from_secs(5)).await);
        assert!(ping(&mut b, Duration::from_secs(5)).await);
        // The kernel completes the handshake; the proxy does not accept it yet.
        let mut c = TcpStream::connect(local).await.expect("third connect");
        assert!(
            !ping(&mut c, Duration::from_millis(300)).await,
            "third connection served beyond max_connections = 2"
        );
        (a, b, c)
    })
    .await;
    let s = p.port_stats();
    assert_eq!((s.total, s.active, s.refused), (2, 2, 0), "{s:?}");
    // Waiting is not refusing; the pause is counted for mon.
    assert_eq!((s.refused_per_client, s.limit_reached), (0, 1), "{s:?}");
    first.shutdown().await.ok();
    drop(first);
    // The byte the third client sent waits in its socket; once a permit frees it is served.
    let served = on_ends(async move {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), third.read(&mut b)).await,
            Ok(Ok(1))
        )
    })
    .await;
    assert!(served, "third connection not served after a slot freed");
    assert_eq!(p.port_stats().total, 3);
}

/// Connects to `to` from `from`, an address of this host (any 127.0.0.0/8 address on loopback).
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(to).await
}

/// Whether the proxy resets a new connection from `from` at once (rather than serving it).
async fn reset_at_once(from: &'static str, to: SocketAddr) -> bool {
    on_ends(async move {
        let mut s = match connect_from(from, to).await {
            Ok(s) => s,
            // A quick reset can beat the client's own check of its connect.
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset
        )
    })
    .await
}

/// A connection from `from` that answers a ping through the proxy.
async fn served_from(from: &'static str, to: SocketAddr) -> TcpStream {
    on_ends(async move {
        let mut s = connect_from(from, to).await.expect("connect to proxy");
        assert!(
            ping(&mut s, Duration::from_secs(5)).await,
            "connection from {from} not served"
        );
        s
    })
    .await
}

async fn at_its_cap_a_client_is_reset_while_another_still_gets_in(path: ProxyPath) {
    let upstream = spawn_echo(LOCALHOST);
    let mut c = config(upstream, path);
    c.max_connections_per_client = 2;
    let p = start(c).await;
    let local = p.local;
    let a1 = served_from("127.0.0.1", local).await;
    let _a2 = served_from("127.0.0.1", local).await;
    assert!(
        reset_at_once("127.0.0.1", local).await,
        "a third connection from 127.0.0.1 was not reset"
    );
    let s = p.stats_until(|s| s.refused_per_client == 1).await;
    assert_eq!(
        (s.total, s.active, s.refused, s.refused_per_client),
        (3, 2, 0, 1),
        "{s:?}"
    );

    // Another client address is not held back by the first one's cap: it connects and relays.
    let data = pattern("second client", 256 * 1024);
    let sent = data.clone();
    let back = on_ends(async move {
        let s = connect_from("127.0.0.2", local)
            .await
            .expect("connect from 127.0.0.2");
        let (mut r, mut w) = s.into_split();
        let write = async {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(write, read);
        n.unwrap();
        back
    })
    .await;
    assert_eq!(
        blake3::hash(&back),
        blake3::hash(&data),
        "127.0.0.2's bytes"
    );

    // Once one of the first client's connections ends, its count goes down and it gets in again.
    drop(a1);
    let s = p.stats_until(|s| s.active == 1).await;
    assert_eq!(s.active, 1, "{s:?}");
    let _a3 = served_from("127.0.0.1", local).await;
    let s = p.port_stats();
    assert_eq!((s.total, s.refused_per_client), (5, 1), "{s:?}");
}

/// A cap of one: the next connection from the same address is served only if the last one's
/// place was given back.
async fn a_clients_place_is_given_back_however_its_connection_ends(path: ProxyPath) {
    let upstream = spawn_echo(LOCALHOST);
    let mut c = config(upstream, path);
    c.max_connections_per_client = 1;
    c.idle_timeout = Some(Duration::from_secs(1));
    let p = start(c).await;
    let local = p.local;

    // Closed by the client with a reset (an error on the proxy's side).
    let s = served_from("127.0.0.1", local).await;
    s.set_zero_linger().unwrap();
    drop(s);
    assert_eq!(p.stats_until(|s| s.active == 0).await.active, 0);

    // Cut by the proxy for idling.
    let mut s = served_from("127.0.0.1", local).await;
    let cut = on_ends(async move {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        matches!(r, Ok(Ok(0)) | Ok(Err(_)))
    })
    .await;
    assert!(cut, "idle connection not cut");
    assert_eq!(p.stats_until(|s| s.active == 0).await.active, 0);

    // Closed cleanly, both directions; meanwhile the cap holds.
    let mut s = served_from("127.0.0.1", local).await;
    assert!(
        reset_at_once("127.0.0.1", local).await,
        "cap of 1 not applied"
    );
    on_ends(async move {
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
    })
    .await;
    assert_eq!(p.stats_until(|s| s.active == 0).await.active, 0);

    let _last = served_from("127.0.0.1", local).await;
    let s = p.port_stats();
    assert_eq!((s.total, s.refused_per_client), (5, 1), "{s:?}");
}

async fn a_connection_aux_refuses_gives_its_clients_place_back(path: ProxyPath) {
    let mut c = config(free_port(), path);
    c.max_connections_per_client = 1;
    let p = start(c).await;
    for _ in 0..3 {
        time_to_reset(p.local).await;
    }
    let s = p.stats_until(|s| s.refused == 3).await;
    assert_eq!(
        (s.total, s.refused, s.refused_per_client),
        (3, 3, 0),
        "{s:?}"
    );
}

/// A proxy to an echo server with `drain`, and one connection through it, answering.
async fn start_with_live_connection(path: ProxyPath, drain: Duration) -> (Running, TcpStream) {
    let upstream = spawn_echo(LOCALHOST);
    let mut c = config(upstream, path);
    c.drain = drain;
    let p = start(c).await;
    let local = p.local;
    let live = on_ends(async move {
        let mut s = TcpStream::connect(local).await.unwrap();
        assert!(ping(&mut s, Duration::from_secs(5)).await);
        s
    })
    .await;
    (p, live)
}

async fn shutdown_drains_then_cuts(path: ProxyPath) {
    let (p, mut live) = start_with_live_connection(path, Duration::from_millis(1500)).await;
    let local = p.local;
    let started = Instant::now();
    let shutdown = actix_rt::spawn(p.addr.send(Shutdown));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Listeners close first: a new connection is refused by the kernel.
    let refused = on_ends(async move { TcpStream::connect(local).await.is_err() }).await;
    assert!(refused, "listener still open during drain");
    // The live connection keeps working during the drain period.
    let (alive, back) = on_ends(async move {
        let ok = ping(&mut live, Duration::from_secs(1)).await;
        (ok, live)
    })
    .await;
    live = back;
    assert!(alive, "live connection broken inside the drain period");
    assert!(
        !shutdown.is_finished(),
        "shutdown resolved while a connection was live"
    );

    // Then it is cut, and shutdown resolves.
    let (cut_at, _) = on_ends(async move {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), live.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "not cut: {r:?}");
        (Instant::now(), live)
    })
    .await;
    let cut_after = cut_at - started;
    assert!(
        cut_after >= Duration::from_millis(1400) && cut_after < Duration::from_secs(4),
        "cut after {cut_after:?}, drain is 1.5 s"
    );
    tokio::time::timeout(Duration::from_secs(2), shutdown)
        .await
        .expect("shutdown did not resolve after the cut")
        .unwrap()
        .unwrap();
    assert_eq!(p.port_stats().active, 0);
}

async fn shutdown_ends_early_when_connections_finish(path: ProxyPath) {
    let (p, mut live) = start_with_live_connection(path, Duration::from_secs(30)).await;
    let started = Instant::now();
    let shutdown = actix_rt::spawn(p.addr.send(Shutdown));
    tokio::time::sleep(Duration::from_millis(100)).await;
    on_ends(async move {
        live.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = live.read_to_end(&mut rest).await;
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown waited for the whole drain period")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

async fn idle_connections_are_cut_and_busy_ones_kept(path: ProxyPath) {
    let upstream = spawn_echo(LOCALHOST);
    let mut c = config(upstream, path);
    c.idle_timeout = Some(Duration::from_millis(800));
    let p = start(c).await;
    let local = p.local;
    let (idle_cut, busy_ok) = on_ends(async move {
        let mut idle = TcpStream::connect(local).await.unwrap();
        let mut busy = TcpStream::connect(local).await.unwrap();
        assert!(ping(&mut idle, Duration::from_secs(5)).await);
        // 20 pings 100 ms apart: 2 s of life, never 800 ms quiet.
        let mut busy_ok = true;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            busy_ok &= ping(&mut busy, Duration::from_secs(1)).await;
        }
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(100), idle.read(&mut b)).await;
        (matches!(r, Ok(Ok(0)) | Ok(Err(_))), busy_ok)
    })
    .await;
    assert!(idle_cut, "idle connection not cut after the idle timeout");
    assert!(busy_ok, "busy connection cut");
}

async fn each_port_goes_to_the_same_port_on_aux(path: ProxyPath) {
    // Two upstreams on 127.0.78.1 that say which port they are; the proxy listens on 127.0.77.1
    // with the same port numbers and no override.
    let mut ports = Vec::new();
    for _ in 0..2 {
        let (l, addr) = bind_upstream("127.0.78.1", 0);
        ports.push(addr.port());
        ends().spawn(async move {
            let l = TcpListener::from_std(l).unwrap();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let tag = format!("port {}", addr.port());
                let _ = s.write_all(tag.as_bytes()).await;
            }
        });
    }
    let config = ProxyConfig {
        path,
        ..ProxyConfig::new(
            "127.0.77.1".parse().unwrap(),
            Some("127.0.78.1".into()),
            ports.clone(),
        )
    };
    let stats = Arc::new(ProxyStats::new());
    let proxy = Proxy::bind(config, stats.clone()).await.unwrap();
    let locals = proxy.local_addrs();
    let _addr = proxy.start();
    for (local, port) in locals.into_iter().zip(&ports) {
        assert_eq!(local.port(), *port);
        let got = send_and_read_all(local, Vec::new()).await;
        assert_eq!(String::from_utf8(got).unwrap(), format!("port {port}"));
    }
    let snap = stats.snapshot();
    assert_eq!(
        snap.iter()
            .map(|s| (s.port, s.upstream_port, s.total))
            .collect::<Vec<_>>(),
        ports.iter().map(|&p| (p, p, 1)).collect::<Vec<_>>()
    );
}

async fn aux_may_be_a_host_name(path: ProxyPath) {
    let upstream = spawn_echo(LOCALHOST);
    let mut c = config(upstream, path);
    c.aux = Some("localhost".into());
    let p = start(c).await;
    assert_eq!(send_and_read_all(p.local, b"hi".to_vec()).await, b"hi");
}

async fn ipv6_in_and_aux(path: ProxyPath) {
    let upstream = spawn_echo("::1");
    let mut c = config(upstream, path);
    c.listen = "::1".parse().unwrap();
    c.aux = Some("::1".into());
    let p = start(c).await;
    assert!(p.local.is_ipv6());
    assert_eq!(send_and_read_all(p.local, b"v6".to_vec()).await, b"v6");
}

async fn runs_on_an_arbiter_of_its_own(path: ProxyPath) {
    let upstream = spawn_echo(LOCALHOST);
    let arbiter = actix::Arbiter::new();
    let stats = Arc::new(ProxyStats::new());
    let (addr, locals) = Proxy::start_on(&arbiter.handle(), config(upstream, path), stats.clone())
        .await
        .expect("start the proxy on its arbiter");
    assert_eq!(
        send_and_read_all(locals[0], b"there".to_vec()).await,
        b"there"
    );
    assert_eq!(stats.snapshot()[0].total, 1);
    addr.send(Shutdown).await.unwrap();
    arbiter.stop();
}

async fn bind_error_names_the_port(path: ProxyPath) {
    let (_taken, addr) = bind_upstream(LOCALHOST, 0);
    let c = ProxyConfig {
        path,
        ..ProxyConfig::new(addr.ip(), Some(LOCALHOST.into()), vec![addr.port()])
    };
    let err = Proxy::bind(c, Arc::new(ProxyStats::new()))
        .await
        .err()
        .expect("bound a port already in use");
    let text = err.to_string();
    assert!(
        text.contains(&format!("pass-through port {}", addr.port())),
        "{text}"
    );
}

async fn zero_max_connections_per_client_is_refused(path: ProxyPath) {
    let mut c = config(free_port(), path);
    c.max_connections_per_client = 0;
    let err = Proxy::bind(c, Arc::new(ProxyStats::new()))
        .await
        .err()
        .expect("accepted max_connections_per_client = 0");
    assert!(
        err.to_string().contains("max_connections_per_client is 0"),
        "{err}"
    );
}

async fn zero_max_connections_is_refused(path: ProxyPath) {
    let mut c = config(free_port(), path);
    c.max_connections = 0;
    let err = Proxy::bind(c, Arc::new(ProxyStats::new()))
        .await
        .err()
        .expect("accepted max_connections = 0");
    assert!(err.to_string().contains("max_connections is 0"), "{err}");
}

/// A peer that resets: the other end sees its connection end (EOF or reset) and the proxy's
/// side is gone, the same on every path. `aux_resets` picks which end resets.
async fn peer_reset_case(path: ProxyPath, aux_resets: bool) {
    let (l, upstream) = bind_upstream(LOCALHOST, 0);
    let (tx, mut rx) = mpsc::channel(1);
    ends().spawn(async move {
        let l = TcpListener::from_std(l).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(&b).await.unwrap();
        if aux_resets {
            s.set_zero_linger().unwrap();
            drop(s);
            return;
        }
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        tx.send(matches!(r, Ok(Ok(0)) | Ok(Err(_)))).await.unwrap();
    });
    let p = start(config(upstream, path)).await;
    let local = p.local;
    let client_saw_end = on_ends(async move {
        let mut s = TcpStream::connect(local).await.unwrap();
        assert!(ping(&mut s, Duration::from_secs(5)).await);
        if !aux_resets {
            s.set_zero_linger().unwrap();
            drop(s);
            return true;
        }
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        matches!(r, Ok(Ok(0)) | Ok(Err(_)))
    })
    .await;
    assert!(
        client_saw_end,
        "the client's connection outlived aux's reset"
    );
    if !aux_resets {
        let aux_saw_end = tokio::time::timeout(Duration::from_secs(6), rx.recv())
            .await
            .expect("aux never saw the client's reset")
            .unwrap();
        assert!(aux_saw_end, "aux's connection outlived the client's reset");
    }
    let s = p.stats_until(|s| s.active == 0).await;
    assert_eq!(
        (s.active, s.total, s.bytes_in, s.bytes_out),
        (0, 1, 1, 1),
        "{s:?}"
    );
}

async fn client_resets(path: ProxyPath) {
    peer_reset_case(path, false).await;
}

async fn aux_resets(path: ProxyPath) {
    peer_reset_case(path, true).await;
}

on_paths!(client_resets, aux_resets);

/// `proxy_path = sockmap` runs the sockmap path here (root, a kernel with sockmap: this machine
/// has both, so this asserts rather than skips), `auto` picks it, and the stats that feed the
/// `mig_proxy_path` metric say so.
#[actix_rt::test]
async fn sockmap_runs_when_asked_and_auto_picks_it() {
    let upstream = spawn_echo(LOCALHOST);
    assert!(
        ProxyStats::new().path_gauge().is_empty(),
        "no path before bind"
    );
    for (asked, runs) in [
        (ProxyPath::Sockmap, ProxyPath::Sockmap),
        (ProxyPath::Auto, ProxyPath::Sockmap),
        (ProxyPath::Splice, ProxyPath::Splice),
        (ProxyPath::Copy, ProxyPath::Copy),
    ] {
        let stats = Arc::new(ProxyStats::new());
        let proxy = Proxy::bind(config(upstream, asked), stats.clone())
            .await
            .unwrap_or_else(|e| panic!("proxy_path = {asked}: {e}"));
        assert_eq!(proxy.path(), runs, "proxy_path = {asked}");
        assert_eq!(stats.path(), Some(runs), "the metric's path for {asked}");
        // mig_proxy_path{path}: 1 for the path that runs, 0 for the others.
        let gauge = stats.path_gauge();
        assert_eq!(gauge.len(), 3, "{gauge:?}");
        for (path, value) in gauge {
            assert_eq!(
                value,
                f64::from(u8::from(path == runs.as_str())),
                "{path} on {runs}"
            );
        }
        let local = proxy.local_addrs()[0];
        let _addr = proxy.start();
        assert_eq!(send_and_read_all(local, b"path".to_vec()).await, b"path");
        let s = stats.snapshot()[0];
        assert_eq!(
            (s.bytes_in, s.bytes_out),
            (4, 4),
            "counters on {runs}: {s:?}"
        );
    }
}

/// Clients that write at once after connecting: their byte usually waits in the proxy's socket
/// before the pair enters the socket map. The program must still take it (no userspace copy),
/// and the BPF counters must count it.
#[actix_rt::test]
async fn sockmap_takes_bytes_sent_before_the_pair_entered() {
    let upstream = spawn_echo(LOCALHOST);
    let p = start(config(upstream, ProxyPath::Sockmap)).await;
    let conns = on_ends(open_pinged(p.local, 50)).await;
    assert_eq!(proxy::bytes_read_by_sockmap_userspace_on_this_thread(), 0);
    let s = p.port_stats();
    assert_eq!((s.active, s.bytes_in, s.bytes_out), (50, 50, 50), "{s:?}");
    drop(conns);
}

on_paths!(
    two_thousand_concurrent_connections,
    idle_spliced_connections_hold_no_pipe,
    aux_down_closes_the_client_at_once,
    aux_unset_accepts_and_closes,
    aux_too_slow_to_accept_hits_connect_timeout,
    at_the_limit_the_next_connection_waits_in_the_backlog,
    at_its_cap_a_client_is_reset_while_another_still_gets_in,
    a_connection_aux_refuses_gives_its_clients_place_back,
    shutdown_drains_then_cuts,
    shutdown_ends_early_when_connections_finish,
    idle_connections_are_cut_and_busy_ones_kept,
    each_port_goes_to_the_same_port_on_aux,
    aux_may_be_a_host_name,
    ipv6_in_and_aux,
    runs_on_an_arbiter_of_its_own,
    bind_error_names_the_port,
    zero_max_connections_per_client_is_refused,
    zero_max_connections_is_refused,
    a_clients_place_is_given_back_however_its_connection_ends,
);

/// The per-client place test as it ran before the sockmap path: on the copy loop.
#[actix_rt::test]
async fn a_clients_place_is_given_back_on_the_copy_path() {
    a_clients_place_is_given_back_however_its_connection_ends(ProxyPath::Copy).await;
}
