//! The Proxy actor: every connection to a pass-through port on `in` is spliced, unchanged, to the
//! same port on `aux` (docs/architecture.md, "Terminals").
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

// `deny`, not `forbid`: src/sys.rs alone allows `unsafe` for two socket options (see there).
#![deny(unsafe_code)]

mod config;
mod listener;
mod relay;
mod sockmap;
mod splice;
mod stats;
mod sys;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{
    parse_passthrough, ProxyConfig, ProxyPath, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
};
pub use listener::raise_fd_limit;
pub use sockmap::bytes_read_by_sockmap_userspace_on_this_thread;
pub use splice::{bytes_spliced_on_this_thread, pipes_held_on_this_thread};
pub use stats::{PortStats, ProxyStats};

use listener::{accept_loop, listen, warn_if_fd_limit_is_low, Clients, ConnSettings, Listener};
use sockmap::Sockmap;

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
        let (path, sockmap) = choose_path(&config)?;
        stats.set_path(path, sockmap.clone());
        Ok(Proxy {
            listeners,
            local_addrs,
            conn: Arc::new(ConnSettings {
                aux: config.aux,
                connect_timeout: config.connect_timeout,
                idle_timeout: config.idle_timeout,
                splice: path != ProxyPath::Copy,
                sockmap,
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

    /// The path connections take: never `Auto` (that chooses one).
    pub fn path(&self) -> ProxyPath {
        if self.conn.sockmap.is_some() {
            ProxyPath::Sockmap
        } else if self.conn.splice {
            ProxyPath::Splice
        } else {
            ProxyPath::Copy
        }
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

/// Resolves `proxy_path`: `auto` takes sockmap where the BPF program loads and splice otherwise;
/// a forced `sockmap` that cannot work is an error naming the property and the reason.
fn choose_path(config: &ProxyConfig) -> io::Result<(ProxyPath, Option<Arc<Sockmap>>)> {
    choose_path_with(config.path, || {
        Sockmap::load(config.max_connections, config.ports.len())
    })
}

fn choose_path_with(
    asked: ProxyPath,
    load: impl FnOnce() -> Result<Sockmap, String>,
) -> io::Result<(ProxyPath, Option<Arc<Sockmap>>)> {
    let chosen = match asked {
        ProxyPath::Splice | ProxyPath::Copy => (asked, None),
        ProxyPath::Sockmap => match load() {
            Ok(s) => (ProxyPath::Sockmap, Some(Arc::new(s))),
            Err(why) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("proxy_path = sockmap cannot be used here: {why}"),
                ))
            }
        },
        ProxyPath::Auto => match load() {
            Ok(s) => (ProxyPath::Sockmap, Some(Arc::new(s))),
            Err(why) => {
                tracing::info!(reason = %why, "pass-through: the sockmap path is unavailable; using splice");
                (ProxyPath::Splice, None)
            }
        },
    };
    tracing::info!(path = %chosen.0, requested = %asked, "pass-through path");
    Ok(chosen)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Result<Sockmap, String> {
        Err("loading the BPF maps failed (Operation not permitted)".into())
    }

    #[test]
    fn a_forced_sockmap_that_cannot_work_is_an_error_naming_the_property_and_why() {
        let e =
            choose_path_with(ProxyPath::Sockmap, refused).expect_err("forced sockmap without BPF");
        assert_eq!(
            e.to_string(),
            "proxy_path = sockmap cannot be used here: loading the BPF maps failed (Operation \
             not permitted)"
        );
    }

    #[test]
    fn auto_falls_back_to_splice_where_sockmap_cannot_work() {
        let (path, sockmap) = choose_path_with(ProxyPath::Auto, refused).unwrap();
        assert_eq!(path, ProxyPath::Splice);
        assert!(sockmap.is_none());
        // Forced splice and copy never try BPF.
        for p in [ProxyPath::Splice, ProxyPath::Copy] {
            let never = || -> Result<Sockmap, String> { panic!("{p} loaded BPF") };
            assert_eq!(choose_path_with(p, never).unwrap().0, p);
        }
    }
}
