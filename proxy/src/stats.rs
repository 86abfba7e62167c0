//! Live counters per pass-through port, read by the mon terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::ProxyPath;
use crate::sockmap::Sockmap;

/// Live counters of the proxy, per listening port, shared with whoever exports them (the mon
/// terminal). Updated with relaxed atomics on the data path; read with [`ProxyStats::snapshot`].
#[derive(Debug, Default)]
pub struct ProxyStats {
    ports: Mutex<Vec<Arc<PortCounters>>>,
    /// The path connections take, once the proxy is bound (never `Auto`).
    path: Mutex<Option<ProxyPath>>,
    /// On the sockmap path most bytes are counted by the BPF program, read at snapshot time.
    sockmap: Mutex<Option<Arc<Sockmap>>>,
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
pub(crate) struct PortCounters {
    pub(crate) port: u16,
    /// The listener's place among the proxy's ports: its slots in the BPF byte counters.
    pub(crate) index: u32,
    pub(crate) upstream_port: u16,
    pub(crate) active: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) refused_per_client: AtomicU64,
    pub(crate) limit_reached: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}

impl ProxyStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters of every port, in the order the ports were bound.
    pub fn snapshot(&self) -> Vec<PortStats> {
        let sockmap = self
            .sockmap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports
            .iter()
            .map(|c| {
                let (bpf_in, bpf_out) = sockmap
                    .as_ref()
                    .map(|s| s.port_bytes(c.index))
                    .unwrap_or((0, 0));
                PortStats {
                    port: c.port,
                    upstream_port: c.upstream_port,
                    active: c.active.load(Ordering::Relaxed),
                    total: c.total.load(Ordering::Relaxed),
                    refused: c.refused.load(Ordering::Relaxed),
                    refused_per_client: c.refused_per_client.load(Ordering::Relaxed),
                    limit_reached: c.limit_reached.load(Ordering::Relaxed),
                    bytes_in: c.bytes_in.load(Ordering::Relaxed) + bpf_in,
                    bytes_out: c.bytes_out.load(Ordering::Relaxed) + bpf_out,
                }
            })
            .collect()
    }

    /// The path the proxy's connections take (`sockmap`, `splice` or `copy`), once it is bound:
    /// what `proxy_path = auto` chose. For the `mig_proxy_path` metric.
    pub fn path(&self) -> Option<ProxyPath> {
        *self.path.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `mig_proxy_path{path}` gauge: 1 for the path that runs, 0 for the others; empty until
    /// the proxy is bound.
    pub fn path_gauge(&self) -> Vec<(&'static str, f64)> {
        let Some(active) = self.path() else {
            return Vec::new();
        };
        [ProxyPath::Sockmap, ProxyPath::Splice, ProxyPath::Copy]
            .into_iter()
            .map(|p| (p.as_str(), if p == active { 1.0 } else { 0.0 }))
            .collect()
    }

    pub(crate) fn set_path(&self, path: ProxyPath, sockmap: Option<Arc<Sockmap>>) {
        *self.path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
        *self.sockmap.lock().unwrap_or_else(|e| e.into_inner()) = sockmap;
    }

    pub(crate) fn register(&self, port: u16, upstream_port: u16) -> Arc<PortCounters> {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let c = Arc::new(PortCounters {
            port,
            index: ports.len() as u32,
            upstream_port,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refused_per_client: AtomicU64::new(0),
            limit_reached: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        ports.push(c.clone());
        c
    }
}
