//! The Proxy actor: every connection to a pass-through port on `in` is spliced, unchanged, to the
//! same port on `aux` (DESIGN.md, "Terminals").
//!
//! MIG sits in the application's path, so the pass-through must be invisible: no byte changed, FIN in
//! one direction does not end the other (half-close), TCP_NODELAY on both ends, and as fast as a
//! direct connection. On Linux streams move with `splice(2)` through a pipe, never through our
//! memory; small messages (a read that does not fill 16 KiB) are read and written straight on,
//! which takes fewer calls than the pipe's three. A pipe is borrowed from a small per-thread pool
//! only while bytes sit in it, so an idle connection costs its two sockets and nothing else (the
//! `tokio-splice2` crate keeps two pipes, four descriptors, per connection for its whole life:
//! 10 000 connections would need 60 000 descriptors). A copy loop with 64 KiB buffers takes over when a pipe cannot be made, or
//! everywhere when [`ProxyConfig::splice`] is false. `nix` wraps the syscalls safely; this module
//! has no `unsafe`.
//!
//! Concurrency limit: a semaphore of [`ProxyConfig::max_connections`] permits is held by the
//! listeners. When all permits are taken the listeners stop calling `accept`, so the next
//! connection **waits** in the kernel's accept backlog (its TCP handshake completes, its bytes are
//! not read) until a live connection ends; it is not refused. Past the backlog (4096 or
//! `net.core.somaxconn`, whichever is smaller) the kernel drops new SYNs and clients retry.
//! Each time a listener finds every permit taken it counts it (`limit_reached`).
//!
//! Per-client cap: one client address may hold at most
//! [`ProxyConfig::max_connections_per_client`] connections at once, across every port; otherwise
//! one client holding `max_connections` idle sockets would stop the pass-through for everyone.
//! A connection past the cap is accepted and reset at once (waiting in the backlog would make
//! every other client wait behind it), and counted (`refused_per_client`). IPv4 clients that
//! reach an IPv6 listener as v4-mapped addresses count as their IPv4 address.
//!
//! A connection that cannot be served (aux unset, refusing, or slower than the connect timeout)
//! is reset at once, as a closed port would be, and counted as refused.
//!
//! Connections run as tasks on the thread of the actor's arbiter; [`Proxy::start_on`] puts the
//! proxy on an arbiter of its own.

#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use serde::Serialize;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default of the `max_connections` property.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of the `max_connections_per_client` property. Generous for clients behind one NAT
/// address (some 40 browsers at their 6 connections per host), yet small against
/// [`DEFAULT_MAX_CONNECTIONS`]: filling the global limit takes 40 addresses, not one.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// How long a connection to `aux` may take before the client is closed.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long live connections may go on after shutdown begins.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

/// Copy-loop buffer per direction; allocated only while bytes flow, so idle connections cost none.
const COPY_CHUNK: usize = 64 * 1024;
/// Accept backlog asked of the kernel (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;
/// Pause after an `accept` error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the proxy listens on and where it sends connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The `in` address the pass-through listeners bind.
    pub listen: IpAddr,
    /// Upstream host (name or IP); `None` leaves `aux` unconnected: connections are accepted and
    /// closed at once, counted as refused.
    pub aux: Option<String>,
    /// Pass-through ports (see [`parse_passthrough`]); port 0 binds an ephemeral port (tests).
    pub ports: Vec<u16>,
    /// When set, every listener connects to this port on `aux` instead of its own port number.
    /// For tests and benchmarks that bind port 0; `mig serve` leaves it `None`.
    pub upstream_port: Option<u16>,
    /// Concurrent connections at most; past it new connections wait in the accept backlog.
    pub max_connections: usize,
    /// Concurrent connections from one client address at most, all ports together; past it that
    /// address's new connections are reset at once while other clients still get in.
    pub max_connections_per_client: usize,
    /// Time allowed to resolve and connect to `aux`.
    pub connect_timeout: Duration,
    /// A connection with no byte moving in either direction for this long is cut.
    pub idle_timeout: Option<Duration>,
    /// On [`Shutdown`], how long live connections may go on before they are cut.
    pub drain: Duration,
    /// `splice(2)` fast path; false forces the copy loop.
    pub splice: bool,
}

impl ProxyConfig {
    /// A configuration with the documented defaults for everything but the addresses.
    pub fn new(listen: IpAddr, aux: Option<String>, ports: Vec<u16>) -> Self {
        ProxyConfig {
            listen,
            aux,
            ports,
            upstream_port: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: None,
            drain: DEFAULT_DRAIN,
            splice: true,
        }
    }
}

/// Parses the `passthrough` property: ports and inclusive ranges separated by commas, e.g.
/// `80,443,5000-5010`. Spaces around items are allowed; an empty string means no pass-through.
/// The error names the offending item and why it is wrong.
pub fn parse_passthrough(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    if s.trim().is_empty() {
        return Ok(ports);
    }
    let mut seen = std::collections::HashSet::new();
    for (i, item) in s.split(',').enumerate() {
        let item = item.trim();
        let n = i + 1;
        if item.is_empty() {
            return Err(format!(
                "item {n} is empty (expected a port like 443 or a range like 5000-5010)"
            ));
        }
        let (lo, hi) = match item.split_once('-') {
            None => {
                let p = parse_port(item, n)?;
                (p, p)
            }
            Some((a, b)) => {
                let lo = parse_port(a.trim(), n)?;
                let hi = parse_port(b.trim(), n)?;
                if lo > hi {
                    return Err(format!(
                        "range '{item}' (item {n}) runs backwards; write {hi}-{lo}"
                    ));
                }
                (lo, hi)
            }
        };
        for p in lo..=hi {
            if !seen.insert(p) {
                return Err(format!(
                    "port {p} is listed twice (again in '{item}', item {n})"
                ));
            }
            ports.push(p);
        }
    }
    Ok(ports)
}

fn parse_port(text: &str, item: usize) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Err(format!("port 0 in item {item} is not a port (use 1-65535)")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!(
            "'{text}' in item {item} is not a port number (use 1-65535)"
        )),
    }
}

/// Live counters of the proxy, per listening port, shared with whoever exports them (the mon
/// terminal). Updated with relaxed atomics on the data path; read with [`ProxyStats::snapshot`].
#[derive(Debug, Default)]
pub struct ProxyStats {
    ports: Mutex<Vec<Arc<PortCounters>>>,
}

/// One port's counters, as plain data.
///
/// `bytes_in` is what clients sent (client → aux), `bytes_out` what they received (aux → client).
/// `total` counts every accepted connection, `refused` those closed without relaying because of
/// aux (unset, refusing or too slow), `refused_per_client` those reset because their client
/// address already held `max_connections_per_client`, `active` those relaying now.
/// `limit_reached` counts the times this port's listener found all `max_connections` live and
/// stopped accepting (new connections then wait in the backlog; they are not refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortStats {
    pub port: u16,
    pub upstream_port: u16,
    pub active: u64,
    pub total: u64,
    pub refused: u64,
    pub refused_per_client: u64,
    pub limit_reached: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug)]
struct PortCounters {
    port: u16,
    upstream_port: u16,
    active: AtomicU64,
    total: AtomicU64,
    refused: AtomicU64,
    refused_per_client: AtomicU64,
    limit_reached: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl ProxyStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters of every port, in the order the ports were bound.
    pub fn snapshot(&self) -> Vec<PortStats> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports
            .iter()
            .map(|c| PortStats {
                port: c.port,
                upstream_port: c.upstream_port,
                active: c.active.load(Ordering::Relaxed),
                total: c.total.load(Ordering::Relaxed),
                refused: c.refused.load(Ordering::Relaxed),
                refused_per_client: c.refused_per_client.load(Ordering::Relaxed),
                limit_reached: c.limit_reached.load(Ordering::Relaxed),
                bytes_in: c.bytes_in.load(Ordering::Relaxed),
                bytes_out: c.bytes_out.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn register(&self, port: u16, upstream_port: u16) -> Arc<PortCounters> {
        let c = Arc::new(PortCounters {
            port,
            upstream_port,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refused_per_client: AtomicU64::new(0),
            limit_reached: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }
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

/// Begins a graceful stop: the listeners close first, live connections get the configured drain
/// period, then whatever is left is cut. The reply comes when every connection has ended.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Shutdown;

/// The pass-through listeners and their connections. Bind with [`Proxy::bind`], then start it on
/// an actix arbiter; stopping the actor without [`Shutdown`] cuts every connection at once.
pub struct Proxy {
    listeners: Vec<Listener>,
    local_addrs: Vec<SocketAddr>,
    conn: Arc<ConnSettings>,
    limit: Arc<Semaphore>,
    clients: Arc<Clients>,
    drain: Duration,
    /// Cancelled when the listeners must stop accepting.
    stop_accepting: CancellationToken,
    /// Cancelled when live connections must be cut.
    cut: CancellationToken,
    accepting: TaskTracker,
    connections: TaskTracker,
}

struct Listener {
    listener: TcpListener,
    counters: Arc<PortCounters>,
}

/// What each connection needs from the configuration.
#[derive(Debug)]
struct ConnSettings {
    aux: Option<String>,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    splice: bool,
}

impl Proxy {
    /// Binds one listener per pass-through port on the `in` address. An error names the port that
    /// could not be bound. Call it on the runtime the actor will run on (its reactor owns the
    /// sockets).
    pub async fn bind(config: ProxyConfig, stats: Arc<ProxyStats>) -> io::Result<Proxy> {
        if config.max_connections == 0 || config.max_connections > Semaphore::MAX_PERMITS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "max_connections is {}; it must be between 1 and {}",
                    config.max_connections,
                    Semaphore::MAX_PERMITS
                ),
            ));
        }
        if config.max_connections_per_client == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "max_connections_per_client is 0; it must be at least 1",
            ));
        }
        if config.max_connections_per_client >= config.max_connections {
            tracing::warn!(
                max_connections = config.max_connections,
                max_connections_per_client = config.max_connections_per_client,
                "one client address can take every pass-through connection; set \
                 max_connections_per_client below max_connections"
            );
        }
        warn_if_fd_limit_is_low(config.max_connections);
        let mut listeners = Vec::with_capacity(config.ports.len());
        let mut local_addrs = Vec::with_capacity(config.ports.len());
        for &port in &config.ports {
            let addr = SocketAddr::new(config.listen, port);
            let listener = listen(addr).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on pass-through port {port} ({addr}): {e}"),
                )
            })?;
            let local = listener.local_addr()?;
            let upstream_port = config.upstream_port.unwrap_or(local.port());
            let counters = stats.register(local.port(), upstream_port);
            local_addrs.push(local);
            listeners.push(Listener { listener, counters });
        }
        Ok(Proxy {
            listeners,
            local_addrs,
            conn: Arc::new(ConnSettings {
                aux: config.aux,
                connect_timeout: config.connect_timeout,
                idle_timeout: config.idle_timeout,
                splice: config.splice,
            }),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            clients: Arc::new(Clients::new(config.max_connections_per_client)),
            drain: config.drain,
            stop_accepting: CancellationToken::new(),
            cut: CancellationToken::new(),
            accepting: TaskTracker::new(),
            connections: TaskTracker::new(),
        })
    }

    /// The bound addresses, one per port in the order of [`ProxyConfig::ports`].
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    /// Binds and starts the proxy on `arbiter`'s thread, so that the sockets, the accepting and
    /// every connection live on that thread and bulk traffic cannot delay the other actors.
    /// Returns the actor's address and the bound addresses.
    pub async fn start_on(
        arbiter: &actix::ArbiterHandle,
        config: ProxyConfig,
        stats: Arc<ProxyStats>,
    ) -> io::Result<(Addr<Proxy>, Vec<SocketAddr>)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = arbiter.spawn(async move {
            let started = Proxy::bind(config, stats).await.map(|proxy| {
                let addrs = proxy.local_addrs();
                (proxy.start(), addrs)
            });
            let _ = tx.send(started);
        });
        if !spawned {
            return Err(io::Error::other("the proxy's arbiter has stopped"));
        }
        rx.await
            .map_err(|_| io::Error::other("the proxy's arbiter stopped while binding"))?
    }
}

/// Each connection holds two sockets; past the open-file limit `accept` fails with EMFILE and
/// clients wait. Say so at start-up rather than under load.
fn warn_if_fd_limit_is_low(max_connections: usize) {
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

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted MIG must rebind at once even with connections of the old one in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

impl Actor for Proxy {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for l in self.listeners.drain(..) {
            let port = l.counters.port;
            tracing::info!(
                port,
                upstream_port = l.counters.upstream_port,
                aux = self.conn.aux.as_deref().unwrap_or("(unset)"),
                "pass-through listening"
            );
            let fut = accept_loop(
                l,
                self.conn.clone(),
                self.limit.clone(),
                self.clients.clone(),
                self.stop_accepting.clone(),
                self.cut.clone(),
                self.connections.clone(),
            );
            ctx.spawn(actix::fut::wrap_future(self.accepting.track_future(fut)));
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.stop_accepting.cancel();
        self.cut.cancel();
    }
}

impl Handler<Shutdown> for Proxy {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Self::Context) -> Self::Result {
        let stop_accepting = self.stop_accepting.clone();
        let cut = self.cut.clone();
        let accepting = self.accepting.clone();
        let connections = self.connections.clone();
        let drain = self.drain;
        Box::pin(async move {
            stop_accepting.cancel();
            accepting.close();
            accepting.wait().await;
            connections.close();
            let live = connections.len();
            tracing::info!(live, ?drain, "pass-through listeners closed; draining");
            if tokio::time::timeout(drain, connections.wait())
                .await
                .is_err()
            {
                tracing::info!(
                    left = connections.len(),
                    "drain period over; cutting connections"
                );
                cut.cancel();
                connections.wait().await;
            }
            tracing::info!("pass-through stopped");
        })
    }
}

async fn accept_loop(
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
struct Clients {
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
    fn new(cap: usize) -> Self {
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
    let relay = relay(
        &mut client,
        &mut upstream,
        conn.splice,
        &counters,
        &last_activity,
    );
    tokio::select! {
        r = relay => match r {
            Ok(()) => tracing::debug!(port, %peer, "pass-through connection closed"),
            Err(e) => tracing::debug!(port, %peer, error = %e, "pass-through connection ended"),
        },
        _ = cut.cancelled() => tracing::info!(port, %peer, "pass-through connection cut at shutdown"),
        _ = idle(conn.idle_timeout, &last_activity) => {
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
async fn idle(timeout: Option<Duration>, last_activity: &Cell<Instant>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        // Sleep to the deadline as it stood, then look again: cheaper than resetting a timer on
        // every chunk.
        let deadline = last_activity.get() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// One direction of a connection.
enum Direction {
    Splice(SpliceState),
    Copy(CopyState),
    Done,
}

impl Direction {
    fn new(splice: bool) -> Self {
        if splice {
            Direction::Splice(SpliceState::default())
        } else {
            Direction::Copy(CopyState::default())
        }
    }
}

/// Splice state: bytes go socket → pipe → socket. The pipe is borrowed from the thread's pool
/// only while it holds bytes, so an idle connection holds no pipe.
///
/// Small messages skip the pipe: after the source has run dry, the next read is a plain `read`
/// into a [`SMALL_READ`] buffer on the stack, written straight on. A short read tells that the
/// socket is empty, so no further call is needed to learn it (splice cannot tell: it may stop
/// short with bytes left). A full read means a stream is flowing, and splice takes over.
struct SpliceState {
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// Read with `read` (small messages) rather than splice; true until a read fills the buffer.
    probe: bool,
    /// What a probe read left unwritten (allocated only when the writer could not take it all).
    buf: Vec<u8>,
    written: usize,
    eof: bool,
}

impl Default for SpliceState {
    fn default() -> Self {
        SpliceState {
            pipe: None,
            in_pipe: 0,
            probe: true,
            buf: Vec::new(),
            written: 0,
            eof: false,
        }
    }
}

#[derive(Default)]
struct CopyState {
    buf: Vec<u8>,
    written: usize,
    eof: bool,
}

/// Moves bytes both ways until both directions have seen EOF (each EOF is passed on as a
/// `shutdown(Write)` of the other socket), or until an error on either side.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    splice: bool,
    counters: &PortCounters,
    last_activity: &Cell<Instant>,
) -> io::Result<()> {
    let mut up = Direction::new(splice);
    let mut down = Direction::new(splice);
    let count_in = |n: usize| {
        counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.set(Instant::now());
    };
    let count_out = |n: usize| {
        counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.set(Instant::now());
    };
    poll_fn(|cx| {
        let up_done = poll_direction(&mut up, cx, client, upstream, &count_in)?;
        let down_done = poll_direction(&mut down, cx, upstream, client, &count_out)?;
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Drives one direction as far as it goes without blocking; `Ok(true)` once it is finished.
fn poll_direction(
    dir: &mut Direction,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> io::Result<bool> {
    loop {
        let r = match dir {
            Direction::Splice(st) => match poll_splice(st, cx, src, dst, count) {
                Poll::Ready(Err(SpliceError::NoPipe(e))) => {
                    // Out of descriptors or pipe pages: this direction still works, by copying.
                    tracing::debug!(error = %e, "no pipe for splice; copying instead");
                    *dir = Direction::Copy(CopyState {
                        buf: std::mem::take(&mut st.buf),
                        written: st.written,
                        eof: st.eof,
                    });
                    continue;
                }
                Poll::Ready(Err(SpliceError::Io(e))) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
            Direction::Copy(st) => poll_copy(st, cx, src, dst, count),
            Direction::Done => return Ok(true),
        };
        match r {
            Poll::Pending => return Ok(false),
            Poll::Ready(Ok(())) => *dir = Direction::Done,
            Poll::Ready(Err(e)) => return Err(e),
        }
    }
}

/// Pipe size asked of the kernel: fewer, larger splices. Unprivileged users past
/// `fs.pipe-user-pages-soft` are refused it and keep the default 64 KiB, which still works.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept for reuse per thread; beyond that they are closed.
const PIPE_POOL_MAX: usize = 64;
/// Largest read that goes by `read` rather than splice; a request or an answer usually fits.
const SMALL_READ: usize = 16 * 1024;
const SPLICE_FLAGS: SpliceFFlags =
    SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

thread_local! {
    static PIPE_POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static PIPES_HELD: Cell<usize> = const { Cell::new(0) };
    static BYTES_SPLICED: Cell<u64> = const { Cell::new(0) };
}

/// Bytes that connections on the calling thread moved through a pipe (the rest went by `read`
/// and `write`). For tests: streams must go by splice, small messages need not.
pub fn bytes_spliced_on_this_thread() -> u64 {
    BYTES_SPLICED.with(Cell::get)
}

/// Pipes that connections on the calling thread hold right now (each holds one only while bytes
/// sit in it). For tests and the mon terminal: idle connections must hold none.
pub fn pipes_held_on_this_thread() -> usize {
    PIPES_HELD.with(Cell::get)
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        let pipe = match PIPE_POOL.with(|p| p.borrow_mut().pop()) {
            Some(p) => p,
            None => {
                let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
                let raw = write.as_raw_fd();
                let size = match fcntl(raw, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
                    Ok(n) => n,
                    Err(_) => fcntl(raw, FcntlArg::F_GETPIPE_SZ)?,
                };
                Pipe {
                    read,
                    write,
                    size: usize::try_from(size).unwrap_or(64 * 1024),
                }
            }
        };
        PIPES_HELD.with(|n| n.set(n.get() + 1));
        Ok(pipe)
    }

    /// Returns an empty pipe to the pool. Only empty: bytes left in a pipe would surface in
    /// another connection, so a pipe with bytes in it is dropped (closed) instead.
    fn give_back(self) {
        PIPES_HELD.with(|n| n.set(n.get() - 1));
        PIPE_POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < PIPE_POOL_MAX {
                p.push(self);
            }
        });
    }
}

impl Drop for SpliceState {
    fn drop(&mut self) {
        if self.pipe.take().is_some() {
            // Dropped mid-transfer (error or cut): the pipe may hold bytes; close it.
            PIPES_HELD.with(|n| n.set(n.get() - 1));
        }
    }
}

enum SpliceError {
    /// No pipe could be made; the caller falls back to copying.
    NoPipe(io::Error),
    Io(io::Error),
}

/// The splice loop: socket → pipe (up to the pipe's size), pipe → socket until empty, repeat;
/// on EOF shut down the writer.
fn poll_splice(
    st: &mut SpliceState,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<Result<(), SpliceError>> {
    loop {
        if let (Some(pipe), true) = (&st.pipe, st.in_pipe > 0) {
            ready!(dst.poll_write_ready(cx)).map_err(SpliceError::Io)?;
            let out = &*dst;
            match dst.try_io(Interest::WRITABLE, || {
                Ok(splice(
                    &pipe.read,
                    None,
                    out,
                    None,
                    st.in_pipe,
                    SPLICE_FLAGS,
                )?)
            }) {
                Ok(0) => return Poll::Ready(Err(SpliceError::Io(io::ErrorKind::WriteZero.into()))),
                Ok(n) => {
                    st.in_pipe -= n;
                    BYTES_SPLICED.with(|b| b.set(b.get() + n as u64));
                    count(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(SpliceError::Io(e))),
            }
            continue;
        }
        if let Some(pipe) = st.pipe.take() {
            pipe.give_back();
        }
        if st.written < st.buf.len() {
            ready!(poll_write_some(&st.buf, &mut st.written, cx, dst, count))
                .map_err(SpliceError::Io)?;
            if st.written == st.buf.len() {
                st.buf = Vec::new();
                st.written = 0;
            }
            continue;
        }
        if st.eof {
            ready!(Pin::new(&mut *dst).poll_shutdown(cx)).map_err(SpliceError::Io)?;
            return Poll::Ready(Ok(()));
        }
        if st.probe {
            ready!(probe_read(st, cx, src, dst, count)).map_err(SpliceError::Io)?;
            continue;
        }
        ready!(src.poll_read_ready(cx)).map_err(SpliceError::Io)?;
        let pipe = Pipe::take().map_err(SpliceError::NoPipe)?;
        let from = &*src;
        match src.try_io(Interest::READABLE, || {
            Ok(splice(
                from,
                None,
                &pipe.write,
                None,
                pipe.size,
                SPLICE_FLAGS,
            )?)
        }) {
            Ok(0) => {
                st.eof = true;
                pipe.give_back();
            }
            Ok(n) => {
                st.in_pipe = n;
                st.pipe = Some(pipe);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The stream has paused; the next bytes may be a small message.
                st.probe = true;
                pipe.give_back();
            }
            Err(e) => {
                pipe.give_back();
                return Poll::Ready(Err(SpliceError::Io(e)));
            }
        }
    }
}

/// One `read` of up to [`SMALL_READ`] bytes, written straight to `dst`; what `dst` cannot take
/// now waits in `st.buf`. tokio's `poll_read` marks the socket not ready after a short read, so
/// the next wake-up comes from epoll rather than from a read that fails.
fn probe_read(
    st: &mut SpliceState,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<io::Result<()>> {
    let mut raw = [std::mem::MaybeUninit::<u8>::uninit(); SMALL_READ];
    let mut rb = tokio::io::ReadBuf::uninit(&mut raw);
    ready!(Pin::new(&mut *src).poll_read(cx, &mut rb))?;
    let data = rb.filled();
    if data.is_empty() {
        st.eof = true;
        return Poll::Ready(Ok(()));
    }
    if data.len() == SMALL_READ {
        // A full buffer: a stream is flowing; move the rest through the pipe.
        st.probe = false;
    }
    let sent = match dst.try_write(data) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Poll::Ready(Err(e)),
    };
    if sent > 0 {
        count(sent);
    }
    if sent < data.len() {
        st.buf = data[sent..].to_vec();
        st.written = 0;
    }
    Poll::Ready(Ok(()))
}

/// Once `dst` is writable, one write of `buf[*written..]`, counted. A write that would block is
/// no error: the caller loops and waits for writability again.
fn poll_write_some(
    buf: &[u8],
    written: &mut usize,
    cx: &mut std::task::Context<'_>,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<io::Result<()>> {
    ready!(dst.poll_write_ready(cx))?;
    match dst.try_write(&buf[*written..]) {
        Ok(0) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        Ok(n) => {
            *written += n;
            count(n);
            Poll::Ready(Ok(()))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
        Err(e) => Poll::Ready(Err(e)),
    }
}

/// The copy loop: read up to 64 KiB, write it all, repeat; on EOF shut down the writer.
fn poll_copy(
    st: &mut CopyState,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<io::Result<()>> {
    loop {
        if st.written < st.buf.len() {
            ready!(poll_write_some(&st.buf, &mut st.written, cx, dst, count))?;
            continue;
        }
        if st.eof {
            ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
            return Poll::Ready(Ok(()));
        }
        st.buf.clear();
        st.written = 0;
        if src.poll_read_ready(cx).is_pending() {
            // Give the buffer back while the source is quiet: 10 000 idle connections must not
            // hold 1.25 GiB of buffers.
            st.buf = Vec::new();
            return Poll::Pending;
        }
        if st.buf.capacity() == 0 {
            st.buf.reserve_exact(COPY_CHUNK);
        }
        // Through tokio's poll_read, which marks the socket drained after a short read: no
        // further read that fails with EAGAIN just to learn it.
        match tokio_util::io::poll_read_buf(Pin::new(&mut *src), cx, &mut st.buf) {
            Poll::Ready(Ok(0)) => st.eof = true,
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                st.buf = Vec::new();
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_lists_and_ranges() {
        assert_eq!(
            parse_passthrough("80,443,5000-5003").unwrap(),
            vec![80, 443, 5000, 5001, 5002, 5003]
        );
        assert_eq!(parse_passthrough(" 22 , 7-7 ").unwrap(), vec![22, 7]);
        assert_eq!(parse_passthrough("").unwrap(), Vec::<u16>::new());
        assert_eq!(parse_passthrough("65535").unwrap(), vec![65535]);
    }

    #[test]
    fn passthrough_errors_name_the_bad_part() {
        let cases = [
            ("80,http", "'http' in item 2 is not a port"),
            ("80,,443", "item 2 is empty"),
            ("443,", "item 2 is empty"),
            ("0", "port 0 in item 1"),
            ("70000", "'70000' in item 1"),
            (
                "5010-5000",
                "range '5010-5000' (item 1) runs backwards; write 5000-5010",
            ),
            (
                "5000-5010,5005",
                "port 5005 is listed twice (again in '5005', item 2)",
            ),
            ("1-x", "'x' in item 1"),
            ("-5", "'' in item 1"),
        ];
        for (input, want) in cases {
            let err = parse_passthrough(input).unwrap_err();
            assert!(err.contains(want), "{input:?}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn fd_limit_room() {
        assert_eq!(connections_fitting(20_000), 9_872);
        assert_eq!(connections_fitting(1024), 384);
        assert_eq!(connections_fitting(100), 0);
        // The default limit of 10 000 connections needs more than the usual 1024 or 20 000.
        assert!(connections_fitting(20_000) < DEFAULT_MAX_CONNECTIONS as u64);
    }

    #[test]
    fn config_defaults() {
        let c = ProxyConfig::new("127.0.0.1".parse().unwrap(), None, vec![80]);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_connections_per_client, 256);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.drain, Duration::from_secs(5));
        assert!(c.splice);
        assert_eq!(c.upstream_port, None);
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
