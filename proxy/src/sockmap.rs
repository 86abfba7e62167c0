//! The sockmap path: each connection pair's bytes move from one socket to the other inside the
//! kernel, by the BPF stream-verdict program of bpf/sockmap.c, without waking this process.
//!
//! Userspace keeps the rest: accept, connect and limits (listener.rs), then per pair: enter both
//! sockets in the maps, wait for EOF or an error on each, forward half-closes, and report bytes
//! for the idle timeout and mon from the program's counters.
//!
//! Order matters twice. Entering a pair: both sockets first go into `MIG_PEERS` (no program
//! there), then into `MIG_SOCKS` (the verdict program), so the program never meets a socket whose
//! peer is missing; bytes that arrived before are taken by the program once nudged
//! ([`sys::kick_receive`]), in order. Half-close: the program hands bytes to the peer's queue and
//! a kernel worker sends them later, so a FIN forwarded at once could overtake them; the EOF is
//! forwarded only once the peer's remote end has acknowledged every byte redirected to it.

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use socket2::SockRef;
use tokio::net::TcpStream;

use crate::stats::PortCounters;
use crate::sys;

thread_local! {
    static READ_IN_USERSPACE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bytes that sockmap connections on the calling thread had to read and write in userspace
/// because the program had not taken them. For tests: it must stay 0.
pub fn bytes_read_by_sockmap_userspace_on_this_thread() -> u64 {
    READ_IN_USERSPACE.with(std::cell::Cell::get)
}

/// The program built by build.rs; empty when clang was missing at build time.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmap.bpf.o"));

/// The loaded program and its maps, one per proxy.
pub(crate) struct Sockmap {
    maps: Mutex<Maps>,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sockmap")
    }
}

struct Maps {
    peers: SockHash<MapData, u64>,
    socks: SockHash<MapData, u64>,
    meta: BpfHashMap<MapData, u64, [u64; 2]>,
    port_bytes: Array<MapData, u64>,
    /// Holds the program, attached to `socks`, for the proxy's life.
    _bpf: Ebpf,
}

fn map<T>(bpf: &mut Ebpf, name: &str) -> Result<T, String>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = bpf
        .take_map(name)
        .ok_or_else(|| format!("the BPF object has no map {name}"))?;
    T::try_from(m).map_err(|e| format!("map {name}: {e}"))
}

impl Sockmap {
    /// Loads and attaches the program. The error says why the sockmap path cannot be used here.
    pub(crate) fn load(max_connections: usize, ports: usize) -> Result<Sockmap, String> {
        if PROGRAM.is_empty() {
            return Err(
                "the BPF program was not built (clang was missing when MIG was \
                        compiled; scripts/setup installs it)"
                    .into(),
            );
        }
        let sockets = u32::try_from(max_connections.saturating_mul(2)).unwrap_or(u32::MAX);
        let counters = u32::try_from(ports.max(1) * 2).unwrap_or(u32::MAX);
        let mut bpf = EbpfLoader::new()
            .map_max_entries("MIG_PEERS", sockets)
            .map_max_entries("MIG_SOCKS", sockets)
            .map_max_entries("MIG_META", sockets)
            .map_max_entries("MIG_PORT_BYTES", counters)
            .load(PROGRAM)
            .map_err(|e| format!("loading the BPF maps failed ({e}); it needs root (or CAP_BPF and CAP_NET_ADMIN) and a kernel with BPF sockmap"))?;
        let peers: SockHash<MapData, u64> = map(&mut bpf, "MIG_PEERS")?;
        let socks: SockHash<MapData, u64> = map(&mut bpf, "MIG_SOCKS")?;
        let meta = map(&mut bpf, "MIG_META")?;
        let port_bytes = map(&mut bpf, "MIG_PORT_BYTES")?;
        let prog: &mut SkSkb = bpf
            .program_mut("mig_verdict")
            .ok_or("the BPF object has no program mig_verdict")?
            .try_into()
            .map_err(|e| format!("mig_verdict: {e}"))?;
        prog.load()
            .map_err(|e| format!("the kernel refused the verdict program: {e}"))?;
        prog.attach(socks.fd())
            .map_err(|e| format!("attaching the verdict program failed: {e}"))?;
        Ok(Sockmap {
            maps: Mutex::new(Maps {
                peers,
                socks,
                meta,
                port_bytes,
                _bpf: bpf,
            }),
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes the program moved for one port's listener `index`: (in, out).
    pub(crate) fn port_bytes(&self, index: u32) -> (u64, u64) {
        let m = self.maps();
        let get = |i: u32| m.port_bytes.get(&i, 0).unwrap_or(0);
        (get(index * 2), get(index * 2 + 1))
    }

    /// Bytes the program moved from the socket with `cookie` to its peer.
    pub(crate) fn moved(&self, cookie: u64) -> u64 {
        self.maps().meta.get(&cookie, 0).map(|m| m[0]).unwrap_or(0)
    }

    /// Enters a pair; the returned guard forgets it however the pair ends (closing a socket also
    /// takes it out of the socket maps). A socket map takes only ESTABLISHED sockets: a pair one
    /// of whose ends has already sent its FIN (a request sent and half-closed at once) is
    /// refused, and the caller relays that pair with splice.
    pub(crate) fn enter<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
        index: u32,
    ) -> io::Result<Pair<'a>> {
        self.enter_with(client, upstream, index, || {})
    }

    /// [`Sockmap::enter`], with `between` run once the client is in `MIG_SOCKS` and before the
    /// upstream goes in: where a test puts the upstream's FIN.
    fn enter_with<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
        index: u32,
        between: impl FnOnce(),
    ) -> io::Result<Pair<'a>> {
        let (ci, ui) = (sys::tcp_info(client)?, sys::tcp_info(upstream)?);
        if !(ci.established && ui.established) {
            return Err(io::Error::other(
                "a peer closed before the pair entered the socket map",
            ));
        }
        let c = SockRef::from(client).cookie()?;
        let u = SockRef::from(upstream).cookie()?;
        let pair = Pair {
            sm: self,
            cookies: [c, u],
            acked_base: [ci.bytes_acked, ui.bytes_acked],
        };
        let mut m = self.maps();
        let err = |what: &str, e: aya::maps::MapError| {
            io::Error::other(format!(
                "sockmap: cannot enter the pair in {what}: {e} ({:?})",
                std::error::Error::source(&e)
            ))
        };
        m.meta
            .insert(c, [0, u64::from(index * 2)], 0)
            .map_err(|e| err("MIG_META", e))?;
        m.meta
            .insert(u, [0, u64::from(index * 2 + 1)], 0)
            .map_err(|e| err("MIG_META", e))?;
        m.peers
            .insert(c, upstream.as_raw_fd(), 0)
            .map_err(|e| err("MIG_PEERS", e))?;
        m.peers
            .insert(u, client.as_raw_fd(), 0)
            .map_err(|e| err("MIG_PEERS", e))?;
        m.socks
            .insert(c, client.as_raw_fd(), 0)
            .map_err(|e| err("MIG_SOCKS", e))?;
        between();
        // From here the client's bytes may already have gone to the upstream's queue: dropping
        // the pair to relay it with splice would lose them. If the upstream cannot enter now (it
        // received a FIN since the check: a socket map takes only ESTABLISHED sockets), the pair
        // stays half in the kernel: the client's bytes redirected, the upstream's read by
        // `forward` in userspace, which relays whatever reaches it.
        if let Err(e) = m.socks.insert(u, upstream.as_raw_fd(), 0) {
            tracing::debug!(error = %e, "sockmap: the upstream closed while its pair entered; its direction runs in userspace");
        }
        drop(m);
        // Bytes that arrived before the sockets were entered may wait in their queues; make sure
        // the program takes them now rather than at the next arrival (on 6.18 it already has:
        // sockmap_takes_bytes_sent_before_the_pair_entered passes without this; older kernels
        // are not known to).
        // Not `?`: the client is in the map, so falling back to splice now could lose bytes
        // already redirected; without the kick the queued bytes go at the next arrival.
        for s in [client.as_raw_fd(), upstream.as_raw_fd()] {
            if let Err(e) = sys::kick_receive(&s) {
                tracing::debug!(error = %e, "sockmap: could not kick a socket's receive queue");
            }
        }
        Ok(pair)
    }
}

/// A pair in the maps.
pub(crate) struct Pair<'a> {
    sm: &'a Sockmap,
    cookies: [u64; 2],
    /// Each socket's `tcpi_bytes_acked` when it entered: the half-close waits from there.
    acked_base: [u64; 2],
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        let mut m = self.sm.maps();
        // Both sockets leave the socket map first: a segment arriving meanwhile then reaches
        // userspace instead of meeting a socket without its peer, which the program drops.
        for c in self.cookies {
            let _ = m.socks.remove(&c);
        }
        for c in self.cookies {
            let _ = m.meta.remove(&c);
            let _ = m.peers.remove(&c);
        }
    }
}

/// Relays one pair through the kernel until both directions have ended (Ok) or one failed.
/// The idle check learns of activity from [`Sockmap::moved`] (bytes that reach userspace also
/// stamp `last_activity`).
pub(crate) async fn relay(
    pair: Pair<'_>,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &PortCounters,
    last_activity: &Cell<Instant>,
) -> io::Result<()> {
    let [c, u] = pair.cookies;
    let count_in = |n: usize| {
        counters
            .bytes_in
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        last_activity.set(Instant::now());
    };
    let count_out = |n: usize| {
        counters
            .bytes_out
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        last_activity.set(Instant::now());
    };
    let to_upstream = forward(pair.sm, client, upstream, c, pair.acked_base[1], &count_in);
    let to_client = forward(pair.sm, upstream, client, u, pair.acked_base[0], &count_out);
    let r = tokio::try_join!(to_upstream, to_client).map(|_| ());
    drop(pair);
    r
}

/// One direction: waits for EOF (or an error) on `src`; bytes normally never reach userspace,
/// but any that do (the program had not taken them) are written on to `dst` and counted. On EOF,
/// once `dst`'s remote end has acknowledged everything sent to it, shuts down `dst`'s writing.
async fn forward(
    sm: &Sockmap,
    src: &TcpStream,
    dst: &TcpStream,
    src_cookie: u64,
    dst_acked_base: u64,
    count: &dyn Fn(usize),
) -> io::Result<()> {
    let mut written = 0u64;
    loop {
        src.readable().await?;
        // The buffer lives only for the read: kept across the await it would cost every idle
        // connection 4 KiB per direction.
        let got = {
            let mut buf = [0u8; 4096];
            src.try_read(&mut buf).map(|n| buf[..n].to_vec())
        };
        match got {
            Ok(data) if data.is_empty() => break,
            Ok(data) => {
                let n = data.len();
                READ_IN_USERSPACE.with(|b| b.set(b.get() + n as u64));
                write_all(dst, &data).await?;
                written += n as u64;
                count(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // A reset: what `src` sent before it may still sit in the kernel's queue for
                // `dst`, and closing `dst` now would drop it (the splice path had written it to
                // `dst`'s socket already). Give it a moment to go out.
                let delivered = delivered(sm, dst, src_cookie, written, dst_acked_base);
                let _ = tokio::time::timeout(RESET_GRACE, delivered).await;
                return Err(e);
            }
        }
    }
    delivered(sm, dst, src_cookie, written, dst_acked_base).await?;
    SockRef::from(dst).shutdown(std::net::Shutdown::Write)
}

/// How long bytes already redirected may take to reach `dst`'s remote end after `src` reset.
const RESET_GRACE: Duration = Duration::from_secs(1);

/// Resolves once `dst`'s remote end has acknowledged every byte that came from `src`: redirected
/// by the program or `written` by us.
async fn delivered(
    sm: &Sockmap,
    dst: &TcpStream,
    src_cookie: u64,
    written: u64,
    dst_acked_base: u64,
) -> io::Result<()> {
    let mut pause = Duration::from_micros(20);
    loop {
        let sent = sm.moved(src_cookie) + written;
        let acked = sys::tcp_info(dst)?
            .bytes_acked
            .saturating_sub(dst_acked_base);
        if acked >= sent {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn connected() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The upstream half-closes between the client's entry and its own: the pair must go on
    /// (the client's bytes may already be redirected), not fall back to splice and lose them.
    #[tokio::test]
    async fn an_upstream_fin_while_the_pair_enters_loses_no_byte() {
        let sm = Sockmap::load(4, 1).expect("this machine runs the sockmap path (root, BPF)");
        let (mut client_remote, client) = connected().await;
        let (upstream, mut upstream_remote) = connected().await;
        upstream_remote.write_all(b"tail").await.unwrap();
        let pair = sm
            .enter_with(&client, &upstream, 0, || {
                SockRef::from(&upstream_remote)
                    .shutdown(std::net::Shutdown::Write)
                    .unwrap();
                let t = Instant::now();
                while sys::tcp_info(&upstream).unwrap().established {
                    assert!(t.elapsed() < Duration::from_secs(5), "no FIN arrived");
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .expect("the pair goes on once the client is in the map");
        let counters = PortCounters {
            port: 0,
            index: 0,
            upstream_port: 0,
            active: Default::default(),
            total: Default::default(),
            refused: Default::default(),
            refused_per_client: Default::default(),
            limit_reached: Default::default(),
            bytes_in: Default::default(),
            bytes_out: Default::default(),
        };
        let activity = Cell::new(Instant::now());
        let ends = async {
            client_remote.write_all(b"hello").await.unwrap();
            client_remote.shutdown().await.unwrap();
            let mut at_upstream = Vec::new();
            upstream_remote.read_to_end(&mut at_upstream).await.unwrap();
            let mut at_client = Vec::new();
            client_remote.read_to_end(&mut at_client).await.unwrap();
            (at_upstream, at_client)
        };
        let (relayed, (at_upstream, at_client)) =
            tokio::join!(relay(pair, &client, &upstream, &counters, &activity), ends);
        relayed.unwrap();
        assert_eq!(at_upstream, b"hello");
        assert_eq!(at_client, b"tail");
    }
}
