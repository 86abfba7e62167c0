//! The listeners and their limits: the open-file limit, the global connection limit (a semaphore
//! held while accepting), the per-client cap, and each connection's life from accept to the end of
//! its relay.

/// Accept backlog asked of the kernel (capped by `net.core.somaxconn`).
use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::relay::relay;
use crate::sockmap::{self, Sockmap};

use crate::stats::PortCounters;

const LISTEN_BACKLOG: i32 = 4096;
/// Pause after an `accept` error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub(crate) struct Listener {
    pub(crate) listener: TcpListener,
    pub(crate) counters: Arc<PortCounters>,
}

/// What each connection needs from the configuration.
#[derive(Debug)]
pub(crate) struct ConnSettings {
    pub(crate) aux: Option<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) splice: bool,
    /// The sockmap path, when it runs; it takes precedence over `splice`.
    pub(crate) sockmap: Option<Arc<Sockmap>>,
}

/// Raises this process's soft limit on open files to its hard limit and returns the new limit.
/// A spliced connection holds up to six descriptors (two sockets, two pipes), so 10 000
/// connections need far more than the usual 1024.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard.max(soft))
}

/// Each connection holds two sockets; past the open-file limit `accept` fails with EMFILE and
/// clients wait. Say so at start-up rather than under load.
pub(crate) fn warn_if_fd_limit_is_low(max_connections: usize) {
    use nix::sys::resource::{getrlimit, Resource};
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let fits = connections_fitting(soft);
        if fits < max_connections as u64 {
            tracing::warn!(
                open_file_limit = soft,
                max_connections,
                "the open-file limit allows about {fits} pass-through connections; raise it \
                 (ulimit -n, or proxy::raise_fd_limit) or lower max_connections"
            );
        }
    }
}

/// Descriptors kept aside for everything else the process opens.
const FD_RESERVE: u64 = 256;

/// How many pass-through connections (two sockets each) an open-file limit leaves room for.
fn connections_fitting(open_file_limit: u64) -> u64 {
    open_file_limit.saturating_sub(FD_RESERVE) / 2
}

pub(crate) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted MIG must rebind at once even with connections of the old one in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

pub(crate) async fn accept_loop(
    l: Listener,
    conn: Arc<ConnSettings>,
    limit: Arc<Semaphore>,
    clients: Arc<Clients>,
    stop: CancellationToken,
    cut: CancellationToken,
    connections: TaskTracker,
) {
    let Listener { listener, counters } = l;
    loop {
        // Take the permit before accepting: at the limit, connections wait in the backlog.
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                counters.limit_reached.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    port = counters.port,
                    "max_connections live; new connections wait in the backlog"
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    p = limit.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break, // the semaphore is never closed; nothing to serve if it were
                    },
                }
            }
        };
        let (client, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(port = counters.port, error = %e, "accept failed");
                    drop(permit);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        counters.total.fetch_add(1, Ordering::Relaxed);
        let slot = match clients.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(first) => {
                counters.refused_per_client.fetch_add(1, Ordering::Relaxed);
                // Once per episode: a client hammering at its cap must not flood the log.
                if first {
                    tracing::warn!(port = counters.port, %peer, cap = clients.cap,
                        "client address at max_connections_per_client; resetting its new \
                         pass-through connections until one of its connections ends");
                }
                refuse(client);
                continue;
            }
        };
        connections.spawn_local(serve_connection(
            client,
            peer,
            conn.clone(),
            counters.clone(),
            cut.clone(),
            permit,
            slot,
        ));
    }
    tracing::debug!(port = counters.port, "pass-through listener closed");
}

/// Live connections per client address, across every port: the per-client cap. Touched once
/// when a connection is accepted and once when it ends, never on the data path. An address
/// with no live connection has no entry, so the map holds at most `max_connections` entries.
#[derive(Debug)]
pub(crate) struct Clients {
    cap: usize,
    live: Mutex<HashMap<IpAddr, ClientEntry>>,
}

#[derive(Debug, Default)]
struct ClientEntry {
    live: usize,
    /// A refusal was logged since this client last had no live connection: one warning per
    /// episode, however long a client keeps knocking at its cap.
    warned: bool,
}

impl Clients {
    pub(crate) fn new(cap: usize) -> Self {
        Clients {
            cap,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// One more connection from `ip`, or `Err` when it already holds `cap`; `Err(true)` for the
    /// first refusal of the episode (worth a log line).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ClientSlot, bool> {
        // A v4 client on a dual-stack listener appears as ::ffff:a.b.c.d; it is the same client.
        let ip = ip.to_canonical();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let entry = live.entry(ip).or_default();
        if entry.live >= self.cap {
            return Err(!std::mem::replace(&mut entry.warned, true));
        }
        entry.live += 1;
        Ok(ClientSlot {
            clients: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn live(&self, ip: IpAddr) -> Option<usize> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&ip.to_canonical()).map(|e| e.live)
    }
}

/// One live connection's place in its client's count. Dropped exactly once however the
/// connection ends (closed, reset, error, idle, drained, cut, or its task dropped), which gives
/// the place back.
struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut live = self.clients.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = live.get_mut(&self.ip) {
            entry.live -= 1;
            if entry.live == 0 {
                live.remove(&self.ip);
            }
        }
    }
}

/// Decrements `active` however the connection ends.
struct ActiveGuard<'a>(&'a PortCounters);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    client: TcpStream,
    peer: SocketAddr,
    conn: Arc<ConnSettings>,
    counters: Arc<PortCounters>,
    cut: CancellationToken,
    _permit: OwnedSemaphorePermit,
    _client_slot: ClientSlot,
) {
    let port = counters.port;
    let Some(aux) = conn.aux.as_deref() else {
        counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(port, %peer, "aux is not set; closing pass-through connection");
        return refuse(client);
    };
    let target = (aux, counters.upstream_port);
    let connected = tokio::select! {
        _ = cut.cancelled() => return,
        r = tokio::time::timeout(conn.connect_timeout, TcpStream::connect(target)) => r,
    };
    let upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(port, %peer, aux, upstream_port = target.1, error = %e,
                "cannot connect to aux; closing the client's connection");
            return refuse(client);
        }
        Err(_) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(port, %peer, aux, upstream_port = target.1, timeout = ?conn.connect_timeout,
                "connecting to aux timed out; closing the client's connection");
            return refuse(client);
        }
    };
    // Small writes (request/response protocols) must not wait for Nagle on our hop.
    for s in [&client, &upstream] {
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!(port, error = %e, "TCP_NODELAY not set");
        }
    }
    counters.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&counters);
    let mut client = client;
    let mut upstream = upstream;
    let last_activity = Cell::new(Instant::now());
    // On the sockmap path bytes move without us: the idle check asks the BPF counters.
    let moved = Cell::new(0u64);
    let cookies = conn.sockmap.as_ref().map(|_| {
        let cookie = |s: &TcpStream| socket2::SockRef::from(s).cookie().unwrap_or(0);
        (cookie(&client), cookie(&upstream))
    });
    let refresh = || {
        if let (Some(sm), Some((c, u))) = (&conn.sockmap, cookies) {
            let now = sm.moved(c) + sm.moved(u);
            if now != moved.get() {
                moved.set(now);
                last_activity.set(Instant::now());
            }
        }
    };
    let relay = async {
        let pair = match &conn.sockmap {
            Some(sm) => match sm.enter(&client, &upstream, counters.index) {
                Ok(pair) => Some(pair),
                Err(e) => {
                    tracing::debug!(port, %peer, error = %e, "not on the sockmap path; this connection goes by splice");
                    None
                }
            },
            None => None,
        };
        match pair {
            Some(pair) => sockmap::relay(pair, &client, &upstream, &counters, &last_activity).await,
            None => {
                relay(
                    &mut client,
                    &mut upstream,
                    conn.splice,
                    &counters,
                    &last_activity,
                )
                .await
            }
        }
    };
    tokio::select! {
        r = relay => match r {
            Ok(()) => tracing::debug!(port, %peer, "pass-through connection closed"),
            Err(e) => tracing::debug!(port, %peer, error = %e, "pass-through connection ended"),
        },
        _ = cut.cancelled() => tracing::info!(port, %peer, "pass-through connection cut at shutdown"),
        _ = idle(conn.idle_timeout, &last_activity, &refresh) => {
            tracing::info!(port, %peer, "pass-through connection idle too long; cut");
        }
    }
}

/// Closes a client we cannot serve with a reset, as a closed port on aux would: a plain FIN could
/// pass for an empty but complete answer.
fn refuse(client: TcpStream) {
    if let Err(e) = client.set_zero_linger() {
        tracing::debug!(error = %e, "SO_LINGER not set; closing with FIN");
    }
}

/// Resolves once nothing has moved for `timeout`; never when there is no timeout.
/// `refresh` brings `last_activity` up to date where bytes move without us (sockmap).
async fn idle(timeout: Option<Duration>, last_activity: &Cell<Instant>, refresh: &dyn Fn()) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        refresh();
        // Sleep to the deadline as it stood, then look again: cheaper than resetting a timer on
        // every chunk.
        let deadline = last_activity.get() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_MAX_CONNECTIONS;

    #[test]
    fn fd_limit_room() {
        assert_eq!(connections_fitting(20_000), 9_872);
        assert_eq!(connections_fitting(1024), 384);
        assert_eq!(connections_fitting(100), 0);
        // The default limit of 10 000 connections needs more than the usual 1024 or 20 000.
        assert!(connections_fitting(20_000) < DEFAULT_MAX_CONNECTIONS as u64);
    }

    #[test]
    fn the_per_client_count_goes_up_to_the_cap_and_down_once_per_slot() {
        let clients = Arc::new(Clients::new(2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let a1 = clients.admit(a).unwrap();
        let a2 = clients.admit(a).unwrap();
        // The first refusal of an episode is the one worth a log line.
        assert!(matches!(clients.admit(a), Err(true)));
        assert!(matches!(clients.admit(a), Err(false)));
        // Another address has its own count.
        let b1 = clients.admit(b).unwrap();
        assert_eq!((clients.live(a), clients.live(b)), (Some(2), Some(1)));
        drop(a1);
        assert_eq!(clients.live(a), Some(1));
        let a3 = clients.admit(a).unwrap();
        drop((a2, a3, b1));
        // No entry is left for addresses without a live connection.
        assert!(clients.live.lock().unwrap().is_empty());
        assert!(clients.admit(a).is_ok());
    }

    #[test]
    fn a_v4_mapped_client_counts_as_its_v4_address() {
        let clients = Arc::new(Clients::new(1));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let _slot = clients.admit(v4).unwrap();
        assert!(clients.admit(mapped).is_err());
        assert_eq!(clients.live(mapped), Some(1));
    }
}
